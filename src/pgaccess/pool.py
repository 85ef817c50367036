"""ConnectionPool: psycopg2's ThreadedConnectionPool, made to wait, heal and report.

psycopg2's ``ThreadedConnectionPool`` stays the owner of the connections (its ``_pool``
of idle ones, its ``_used`` bookkeeping, its lock), but pgaccess drives it so that its
known faults cannot happen:

- it raises "connection pool exhausted" the moment every connection is out: here a
  caller waits, up to ``timeout``, then gets ``PoolTimeout``;
- it connects while holding its lock, so one slow connect stalls every thread: here a
  slot is reserved under the lock and the connect happens outside it;
- it closes every returned connection above ``minconn`` (constant reconnect churn):
  here its ``minconn`` is set to the maximum, so returned connections stay open;
- it rolls back inside ``putconn`` under its lock, and loses the slot for good if that
  ``rollback()`` raises: here the rollback happens before the connection is taken back,
  outside the lock, and a connection that cannot be cleaned is forgotten and closed,
  its slot freed;
- it takes back whatever it is given: here a connection returned twice, returned by a
  thread it is not lent to, or not lent by this pool is refused with ``PoolError``.

Why psycopg2's pool at all, and through its private attributes: the project is a pool
over psycopg2's ``ThreadedConnectionPool``, and its public ``getconn``/``putconn`` do
exactly what is listed above. So ``_Store`` keeps psycopg2's bookkeeping (``_pool``,
``_used``, ``_rused``, ``_keys``/``_getkey``, ``_lock``) and moves connections through
it under that lock; ``tests/test_pool_store.py`` pins each of them, so a psycopg2
upgrade that changes one fails there, by name, and not here at run time.

Its helpers live beside it: ``connector`` opens connections and holds the outage
backoff, ``watch`` runs the monitor thread (leaks, stalls), ``default`` the lazy
default pool and the fork handling.

Sizing: every process has its own pool, so processes x ``maxconn`` must fit within the
server's ``max_connections`` (less its reserved slots), or within PgBouncer's pool.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Tuple,
)

import psycopg2
import psycopg2.extras
import psycopg2.pool

from .adapters import register_adapters
from .config import Settings, redact_dsn
from .connection import STATUS_IDLE, PooledConnection
from .connector import CONNECT_DEFAULTS, Backoff, Connector
from .errors import ConnectionFailed, PoolClosed, PoolError, PoolTimeout, translate
from .watch import (
    LEAKS_REPORTED,
    STALLS_DETECTED,
    TCP_INFO_AVAILABLE,
    borrower_stack,
    start_monitor,
)

__all__ = [
    "CONNECT_DEFAULTS",
    "ConnectionPool",
    "PooledConnection",
    "live_pools",
]

logger = logging.getLogger("pgaccess.pool")

# The statistics, each named once (psycopg_pool's habit): counts in ``counters``,
# seconds in ``timings``; ``stats()`` reports them under these names.
REQUESTS_NUM = "requests"
REQUESTS_WAITING = "requests_waiting"
REQUESTS_TIMEOUTS = "timeouts"
CONNECTIONS_OPENED = "connections_opened"
CONNECTIONS_DISCARDED = "connections_discarded"
CONNECTIONS_LOST = "connections_lost"
CONNECT_ERRORS = "connect_errors"
RETURNED_IN_TRANSACTION = "returned_in_transaction"
DRAINS = "drains"
_COUNTERS = (
    REQUESTS_NUM,
    REQUESTS_WAITING,
    REQUESTS_TIMEOUTS,
    CONNECTIONS_OPENED,
    CONNECTIONS_DISCARDED,
    CONNECTIONS_LOST,
    CONNECT_ERRORS,
    RETURNED_IN_TRANSACTION,
    DRAINS,
    LEAKS_REPORTED,
    STALLS_DETECTED,
)
WAIT_TIME = "wait_time"  # total seconds callers spent in line
MAX_WAIT = "max_wait"  # the longest one caller spent in line


class WriteListener(Protocol):
    """What a pool tells before each write through it (see ``routing``)."""

    def wrote(self) -> None: ...


class _Store(psycopg2.pool.ThreadedConnectionPool):
    """ThreadedConnectionPool as the owner of the connections; no I/O under its lock.

    Why private attributes: the project's premise is a pool over psycopg2's own, but
    its public ``getconn``/``putconn`` connect, roll back and close under its lock and
    raise "exhausted" instead of waiting, which is what pgaccess exists to avoid. So
    pgaccess keeps psycopg2's store of connections (``_pool`` idle, ``_used`` and
    ``_rused`` lent, keyed by ``_getkey()``/``_keys``, guarded by ``_lock``) and moves
    connections in and out of it itself, under that lock. ``tests/test_pool_store.py``
    pins every attribute and behaviour relied on here, so a psycopg2 release that
    changes them fails that test rather than this pool at run time.
    """

    # psycopg2's own private state, which the stubs leave out.
    _pool: List[PooledConnection]
    _used: Dict[int, PooledConnection]
    _rused: Dict[int, int]
    _lock: threading.Lock
    _keys: int
    if TYPE_CHECKING:

        def _getkey(self) -> int: ...

    def __init__(self, maxconn: int) -> None:
        super().__init__(0, maxconn)  # minconn 0: nothing is connected eagerly ...
        # ... and minconn = maxconn afterwards: its _putconn closes every connection
        # returned while len(_pool) >= minconn, which would make every return a close.
        self.minconn = maxconn

    def take_idle(self, thread: int) -> PooledConnection:
        """Lend the most recently used idle connection to ``thread`` (lock held).

        What ``_getconn`` does when an idle connection exists, minus its re-checks.
        """
        conn = self._pool.pop()
        self._keys += 1
        key = conn.lease = self._keys
        conn.lent_to = thread
        self._used[key] = conn
        self._rused[id(conn)] = key
        return conn

    def adopt(self, conn: PooledConnection, thread: int) -> None:
        """Register a connection made outside the lock as lent to ``thread``."""
        key = conn.lease = self._getkey()
        conn.lent_to = thread
        self._used[key] = conn
        self._rused[id(conn)] = key

    def lends(self, conn: PooledConnection) -> bool:
        """Whether ``conn`` is out on its current lease (lock held)."""
        return self._used.get(conn.lease) is conn

    def put_idle(self, conn: PooledConnection) -> None:
        """Take back a lent connection already found clean (lock held, lease checked).

        What ``_putconn`` does for a clean idle connection, without asking it for its
        state again.
        """
        self.forget(conn)
        self._pool.append(conn)

    def forget(self, conn: PooledConnection) -> None:
        """End a checked lease without keeping the connection (lock held)."""
        del self._used[conn.lease]
        del self._rused[id(conn)]
        conn.lent_to = 0
        conn.borrower_stack = None

    def holds_idle(self, conn: PooledConnection) -> bool:
        """Whether ``conn`` is among the idle connections (lock held)."""
        return any(idle is conn for idle in self._pool)


class _Waiter:
    """One caller waiting for a connection; woken alone, in arrival order."""

    __slots__ = ("cond", "error", "granted", "since")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.since = time.monotonic()
        self.granted = False
        self.error: Optional[BaseException] = None


class _Borrowed:
    """``with pool.connection() as conn``: acquire on entry, release on exit."""

    __slots__ = ("conn", "pool", "timeout")

    def __init__(self, pool: ConnectionPool, timeout: Optional[float]) -> None:
        self.pool = pool
        self.timeout = timeout

    def __enter__(self) -> PooledConnection:
        self.conn = self.pool.acquire(self.timeout)
        return self.conn

    def __exit__(self, *exc_info: object) -> None:
        self.pool.release(self.conn)


_names = itertools.count(1)
_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
_get_ident = threading.get_ident


def live_pools() -> List[ConnectionPool]:
    """Every pool of this process not yet freed (for the fork handling)."""
    return list(_live_pools)


class ConnectionPool:
    """A thread-safe pool of psycopg2 connections, at most ``maxconn`` of them.

    Use ``with pool.connection() as conn:`` (autocommit; the facade's path), or the
    transactional ``get_connection()`` / ``get_cursor()`` of the usage guide. A caller
    finding every connection out waits up to ``timeout`` seconds, then gets
    ``PoolTimeout``. Broken connections are discarded and replaced on demand, so the
    pool serves again by itself after a server restart. Thread-safe; fork-safe (a child
    process gets fresh connections and never touches its parent's).

    Waiting: callers in line are served in arrival order, but a running thread may
    take a connection just given back while no caller has waited longer than
    ``HANDOFF_AFTER``; past that, the connection goes straight to the longest waiter.
    Handing every return to a sleeping thread costs a context switch per checkout (16
    threads over 4 connections ran at half the speed of 4); the bound keeps the longest
    wait short (``stats()["max_wait"]``).

    Each connection gets ``CONNECT_DEFAULTS`` (TCP keepalives, ``tcp_user_timeout``,
    ``application_name``) for what its DSN does not set, so a statement on a network
    path that drops every packet fails within 10 s. Keyword arguments given here
    (``connect_timeout``, or any libpq parameter) override both; ``connect_timeout``
    otherwise comes from the DSN, then PGCONNECT_TIMEOUT, then 10 s.

    Options for faults a healthy pool never sees:

    - ``leak_threshold`` (seconds): a connection held longer is logged once, at
      WARNING, with the borrower's stack.
    - ``stall_timeout`` (seconds; Linux, TCP only): a command that has waited this
      long with no data received or sent is taken as a dead network path even though
      TCP still acknowledges (a proxy or middlebox that stopped forwarding, which
      keepalives cannot see): its socket is shut down, so the call fails with
      ``ConnectionLost`` instead of hanging. It must exceed the longest statement
      you run (set ``statement_timeout`` below it) and any pause of your own in a
      COPY.
    - ``reset_session``: ``DISCARD ALL`` on every return (one round trip), for code
      that leaves session state behind (``SET``, temporary tables, WITH HOLD cursors,
      session advisory locks, LISTEN). Without it, a connection comes back with its
      transaction rolled back and psycopg2's session attributes reset, but session
      state made with SQL stays: use ``SET LOCAL`` inside a transaction instead.
    """

    #: A connection idle longer than this gets a round-trip check before it is lent.
    CHECK_IDLE_AFTER = 60.0
    #: During an outage, how often a caller waiting for its turn to connect looks for
    #: a connection given back meanwhile.
    OUTAGE_POLL = 0.02
    #: Seconds a caller may wait in line before a returned connection goes straight to
    #: it; until then a running thread may take it (see the class docstring). Measured
    #: on 2 cores, find_one at 16 threads over 4 connections against 4 threads: 0.51
    #: to 0.86 x at 5 ms, 0.92 to 1.05 x at 20 ms (the longest wait about 25 ms), and no
    #: better at 50 ms: below about 20 ms most returns still go to a sleeping thread.
    HANDOFF_AFTER = 0.02

    def __init__(
        self,
        dsn: Optional[str] = None,
        *,
        maxconn: Optional[int] = None,
        timeout: Optional[float] = None,
        name: Optional[str] = None,
        max_lifetime: float = 3600.0,
        statement_timeout: Optional[int] = None,
        connect_timeout: Optional[int] = None,
        leak_threshold: Optional[float] = None,
        stall_timeout: Optional[float] = None,
        reset_session: bool = False,
        role: Optional[str] = None,
        pooler: Optional[str] = None,
        settings: Optional[Settings] = None,
        **connect_kwargs: Any,
    ) -> None:
        if settings is None:
            settings = Settings.resolve(
                dsn,
                maxconn=maxconn,
                timeout=timeout,
                statement_timeout=statement_timeout,
                pooler=pooler,
            )
        for what, value in (
            ("leak_threshold", leak_threshold),
            ("stall_timeout", stall_timeout),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{what} must be > 0 seconds, got {value}")
        if stall_timeout is not None and not TCP_INFO_AVAILABLE:
            raise ValueError("stall_timeout needs Linux (the kernel's TCP_INFO)")
        self.settings = settings
        self.name = name or f"pool-{next(_names)}"
        self.maxconn = settings.maxconn
        self.timeout = settings.timeout
        self.max_lifetime = max_lifetime
        self.leak_threshold = leak_threshold
        self.stall_timeout = stall_timeout
        self.reset_session = reset_session
        # One test in release()'s fast path for both: every return is watched or reset.
        self._slow_release = leak_threshold is not None or reset_session
        self._connector = Connector(
            settings,
            max_lifetime=max_lifetime,
            connect_timeout=connect_timeout,
            watch_tcp=stall_timeout is not None,
            connect_kwargs=connect_kwargs,
            role=role,
        )
        #: What each connection must be (``connector.PRIMARY`` ...), checked after
        #: connect; from ``role=``, else the DSN's ``target_session_attrs``.
        self.role = self._connector.role
        #: The statement timeout, as the SQL that sets it for one transaction: sent
        #: with each statement, never as a session setting (see ``executor``).
        ms = settings.statement_timeout_ms
        self.set_local = f"SET LOCAL statement_timeout = {int(ms)}" if ms else ""
        #: Told before each write through this pool, when a Database reads on
        #: standbys (read-your-writes, ``routing.WriteMarks``); else None.
        self.writes: Optional[WriteListener] = None
        self._closed = False
        self._reset_state()
        register_adapters()
        _live_pools.add(self)

    def _reset_state(self) -> None:
        self._store = _Store(self.maxconn)
        #: One lock for the store, the waiting and the statistics: a checkout takes it
        #: once. Public within the package: the monitor decides under it.
        self.lock: threading.Lock = self._store._lock
        self._waiters: Deque[_Waiter] = collections.deque()
        self._out = 0  # slots taken: connections lent, or being connected, or granted
        self._backoff = Backoff()
        self._connect_turn = threading.Condition(self.lock)
        self.monitor: Optional[threading.Thread] = None
        #: Statistics, changed under the lock; keys are the constants above. A plain
        #: dict, not a Counter: a Counter's += costs three times as much, on every
        #: checkout.
        self.counters: Dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.timings: Dict[str, float] = {WAIT_TIME: 0.0, MAX_WAIT: 0.0}

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._out}/{self.maxconn} in use"
        dsn = redact_dsn(self.settings.dsn)
        return f"<ConnectionPool {self.name!r} {state} dsn={dsn!r}>"

    # ------------------------------------------------------------ checkout
    def acquire(self, timeout: Optional[float] = None) -> PooledConnection:
        """Borrow a connection in autocommit; give it back with :meth:`release`.

        Prefer ``with pool.connection()``: a connection never released is a slot lost
        until the pool is closed. The connection is lent to the calling thread, and
        only that thread may release it. Blocks up to ``timeout`` (default: the
        pool's) and raises ``PoolTimeout``, ``PoolClosed`` or ``ConnectionFailed``.
        """
        # The fast path: a free slot and an idle connection, one lock round trip.
        conn: Optional[PooledConnection] = None
        me = _get_ident()
        with self.lock:
            if (
                self._out < self.maxconn
                and not self._closed
                and (
                    not self._waiters
                    or time.monotonic() - self._waiters[0].since < self.HANDOFF_AFTER
                )
            ):
                store = self._store
                if store._pool:
                    self._out += 1
                    self.counters[REQUESTS_NUM] += 1
                    conn = store.take_idle(me)
        if (
            conn is not None
            and not conn.poller.poll(0)
            and time.monotonic() - conn.last_used < self.CHECK_IDLE_AFTER
            and not conn.closed
            and self.leak_threshold is None
        ):
            return conn
        return self._acquire_slow(conn, timeout)

    def _acquire_slow(
        self, conn: Optional[PooledConnection], timeout: Optional[float]
    ) -> PooledConnection:
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        counted = conn is not None  # the fast path counted this request already
        while True:
            if conn is None:
                conn = self._reserve(deadline, wait, counted)
                counted = True
                if conn is None:
                    try:
                        conn = self._connect(deadline)
                    except BaseException:
                        self._give_back_slot()
                        raise
            if self._usable(conn):
                break
            self._discard(conn, lost=True)
            conn = None
        if self.leak_threshold is not None:
            stack = borrower_stack()
            with self.lock:  # the monitor reads a lease's record under the lock
                conn.lent_at = time.monotonic()
                conn.leak_reported = False
                conn.borrower_stack = stack
            if self.monitor is None:
                start_monitor(self)
        return conn

    def _reserve(
        self, deadline: float, wait: float, counted: bool
    ) -> Optional[PooledConnection]:
        """Take a slot, waiting in line if none is free; return an idle connection or
        None (meaning: connect a new one for this slot)."""
        with self.lock:
            if self._closed:
                raise PoolClosed(f"the pool {self.name!r} is closed")
            if not counted:
                self.counters[REQUESTS_NUM] += 1
            if self._slot_free_for_newcomer():
                self._out += 1
            else:
                self._wait_in_line(deadline, wait)
            store = self._store
            return store.take_idle(_get_ident()) if store._pool else None

    def _slot_free_for_newcomer(self) -> bool:
        # Lock held. A newcomer may take a free slot unless someone has waited past
        # HANDOFF_AFTER: then the line is served first, and the newcomer joins it.
        if self._out >= self.maxconn:
            return False
        waiters = self._waiters
        if waiters and time.monotonic() - waiters[0].since >= self.HANDOFF_AFTER:
            self._grant_free_slots()
            return self._out < self.maxconn and not waiters
        return True

    def _wait_in_line(self, deadline: float, wait: float) -> None:
        # Lock held. A waiter is served in one of two ways: a releaser hands it a slot
        # (granted) once it has waited HANDOFF_AFTER, or it wakes at that bound and
        # takes the slots freed meanwhile for the line, first come first served.
        waiter = _Waiter(self.lock)
        self._waiters.append(waiter)
        started = waiter.since
        serve_at = started + self.HANDOFF_AFTER
        self.counters[REQUESTS_WAITING] += 1
        try:
            while not waiter.granted and waiter.error is None:
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    break
                if now < serve_at:
                    waiter.cond.wait(min(remaining, serve_at - now))
                    continue
                if self._out < self.maxconn:
                    self._grant_free_slots()
                    if waiter.granted:
                        break
                waiter.cond.wait(remaining)
        finally:
            waited = time.monotonic() - started
            timings = self.timings
            timings[WAIT_TIME] += waited
            if waited > timings[MAX_WAIT]:
                timings[MAX_WAIT] = waited
        if waiter.error is not None:
            raise waiter.error
        if not waiter.granted:
            self._waiters.remove(waiter)
            self.counters[REQUESTS_TIMEOUTS] += 1
            raise PoolTimeout(
                f"no connection free in the pool {self.name!r} after {wait:.3g} s: "
                f"{self._out} of {self.maxconn} in use, "
                f"{len(self._waiters)} other callers waiting"
            )

    def _grant_free_slots(self) -> None:
        # Lock held: the free slots go to the line, in arrival order.
        waiters = self._waiters
        while waiters and self._out < self.maxconn:
            waiter = waiters.popleft()
            waiter.granted = True
            self._out += 1
            waiter.cond.notify()

    def _free_slot(self) -> None:
        # Lock held, a slot just freed: straight to the first waiter if it has waited
        # past HANDOFF_AFTER; otherwise free for whoever asks first (a running thread,
        # or the first waiter when it wakes at that bound).
        waiters = self._waiters
        if waiters and time.monotonic() - waiters[0].since >= self.HANDOFF_AFTER:
            waiter = waiters.popleft()
            waiter.granted = True
            waiter.cond.notify()
        else:
            self._out -= 1

    def _connect(self, deadline: float) -> PooledConnection:
        """A connection for a reserved slot: a new one, or one given back meanwhile.

        Normally a plain connect, as many at once as callers need. After a failure
        (once the pool has connected before) the pool is in an outage (a restart, a
        full server, a network fault) until a connect succeeds: then callers take
        turns, one attempt at a time, spaced as ``Backoff`` says however many callers
        wait, and a caller waiting for its turn takes any connection given back
        meanwhile (a full server: the pool runs at the size it can reach). A caller
        gets ``ConnectionFailed`` at its deadline, or at once when no attempt is due
        before it and the pool has no connection that could come back. The first
        connect of a pool fails at once: that is a wrong DSN, not an outage. Each
        attempt's ``connect_timeout`` is cut to the caller's remaining time (libpq
        waits 2 s at least).
        """
        backoff = self._backoff
        while True:
            probing = False
            with self.lock:
                while backoff.in_outage:
                    if self._closed:
                        raise PoolClosed(f"the pool {self.name!r} is closed")
                    store = self._store
                    if store._pool:
                        return store.take_idle(_get_ident())
                    now = time.monotonic()
                    if not backoff.probing and backoff.due(now):
                        backoff.probing = probing = True
                        break
                    if now >= deadline or (
                        not backoff.probing
                        and backoff.next_at > deadline
                        and not store._used
                    ):
                        raise self._unreachable(now)
                    self._connect_turn.wait(min(self.OUTAGE_POLL, deadline - now))
                backoff.connecting += 1
            try:
                conn = self._connector.open(deadline)
            except BaseException as exc:
                with self.lock:
                    backoff.connecting -= 1
                    if probing:
                        backoff.probing = False
                    self._connect_turn.notify_all()
                    if not isinstance(exc, psycopg2.Error):
                        raise
                    failed, level = self._connect_failed(exc, probing, deadline)
                    ever = backoff.ever_connected
                if not ever or time.monotonic() >= deadline:
                    raise failed from exc
                logger.log(level, "%s; retrying within each call's timeout", failed)
                continue
            with self.lock:
                backoff.connecting -= 1
                self.counters[CONNECTIONS_OPENED] += 1
                first = not backoff.ever_connected
                backoff.ever_connected = True
                if probing:
                    backoff.probing = False
                recovered = backoff.failures if backoff.in_outage else 0
                if backoff.in_outage:  # the outage is over: everyone may connect
                    backoff.reset()
                    self._connect_turn.notify_all()
                elif first:
                    self._connect_turn.notify_all()
                self._store.adopt(conn, _get_ident())
            if recovered:
                logger.warning(
                    "pool %r: connected again after %d failed attempts",
                    self.name, recovered,
                )  # fmt: skip
            if self.stall_timeout is not None and self.monitor is None:
                start_monitor(self)
            return conn

    def _connect_failed(
        self, exc: psycopg2.Error, probing: bool, deadline: float
    ) -> Tuple[ConnectionFailed, int]:
        """Count a failed connect and plan the next (lock held): the error to raise,
        and the level to log it at if the caller retries.

        The first connect of a pool fails at once (a wrong DSN, not an outage),
        unless another connect of it, still under way, succeeds: a cold start on a
        server with room for only part of the pool. Then the pool is in an outage.
        """
        backoff = self._backoff
        err = translate(exc)
        failed = ConnectionFailed(
            f"could not connect (pool {self.name!r}): {err.args[0]}",
            sqlstate=err.sqlstate,
        )
        self.counters[CONNECT_ERRORS] += 1
        backoff.last_error = err.args[0]
        while not backoff.ever_connected and backoff.connecting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._connect_turn.wait(remaining)
        if not backoff.ever_connected:
            return failed, logging.WARNING
        # An outage: its first failure is logged as a WARNING, the next at DEBUG.
        level = logging.DEBUG if backoff.in_outage else logging.WARNING
        backoff.failures = backoff.failures + 1 if backoff.in_outage else 1
        if probing or not backoff.in_outage:
            backoff.update_delay(time.monotonic())
        return failed, level

    def _unreachable(self, now: float) -> ConnectionFailed:
        # Lock held.
        backoff = self._backoff
        if backoff.next_at > now + 0.001 and not backoff.probing:
            when = (
                f"the next attempt is due in {backoff.next_at - now:.2f} s, "
                "after this call's timeout"
            )
        else:
            when = "no connection could be made within this call's timeout"
        return ConnectionFailed(
            f"the server is unreachable (pool {self.name!r}): {when}; "
            f"the last attempt failed with: {backoff.last_error}"
        )

    def _usable(self, conn: PooledConnection) -> bool:
        """Whether an idle connection is alive; no round trip unless it is suspect."""
        if conn.closed:
            return False
        # An idle connection has nothing to read. If its socket is readable, the server
        # has said something unasked: almost always a FATAL before closing (terminate,
        # shutdown) or EOF.
        if (
            conn.has_unread_data()
            or time.monotonic() - conn.last_used > self.CHECK_IDLE_AFTER
        ):
            return conn.execute_quietly("SELECT 1")
        return True

    # -------------------------------------------------------------- return
    def release(self, conn: PooledConnection) -> None:
        """Give back a connection from :meth:`acquire`; it is cleaned or discarded.

        A connection left in a transaction is rolled back (outside the pool's lock)
        and its psycopg2 session attributes reset; one that is broken, cannot be
        cleaned, or is older than ``max_lifetime`` is closed and its slot freed.

        Only the thread the connection is lent to may release it, once per
        ``acquire()``. Refused with ``PoolError``, the pool left as it was (nothing
        closed, no slot freed): a connection already idle in the pool ("returned
        twice"); one not lent by this pool; one lent to another thread, which is what
        a second release becomes once the connection was lent again (thread A releases
        twice while thread B holds it: B keeps it). What cannot be told apart: the
        same thread releasing twice after it borrowed the same connection again in
        between (pools reuse the most recent connection, so that is the same object):
        the stale release then returns the current lease. Telling that apart needs a
        handle per checkout (SQLAlchemy's ``_ConnectionFairy``) instead of the
        connection itself; ``with pool.connection()`` never releases twice.

        A connection lent before ``os.fork()`` and released in the child is closed
        (its socket was already pointed away from the parent's session); one released
        after ``close()`` is closed too.
        """
        now = time.monotonic()
        if (
            conn.closed
            or conn.get_transaction_status() != STATUS_IDLE
            or not conn.autocommit
            or now > conn.expires_at  # also a changed session: see PooledConnection
            or self._slow_release
        ):
            self._release_slow(conn)
            return
        me = _get_ident()
        store = self._store
        with self.lock:
            used = store._used
            lease = conn.lease
            if conn.lent_to == me and used.get(lease) is conn and not self._closed:
                # _Store.put_idle and _free_slot, inlined: this is the hot path. (An
                # idle connection's lease is not in _used any more, so a second
                # release is refused without resetting lent_to here.)
                del used[lease]
                del store._rused[id(conn)]
                conn.last_used = now
                store._pool.append(conn)
                waiters = self._waiters
                if waiters and now - waiters[0].since >= self.HANDOFF_AFTER:
                    waiter = waiters.popleft()
                    waiter.granted = True
                    waiter.cond.notify()
                else:
                    self._out -= 1
                return
            self._refuse(conn)
        with contextlib.suppress(psycopg2.Error):
            conn.close()

    def _refuse(self, conn: PooledConnection) -> None:
        """A return that is not the caller's lease to end, or one after close (lock
        held): raise ``PoolError``, or forget the connection for the caller to close.

        Like psycopg_pool's ``_check_pool_putconn``: nothing here changes the pool
        unless the lease is the caller's own.
        """
        store = self._store
        lent = store.lends(conn)
        if lent and conn.lent_to == _get_ident():  # the pool was closed: let it go
            store.forget(conn)
            return
        if conn.opened_by_pid != os.getpid():
            return  # lent before a fork; the child's pool never counted it
        if lent:
            raise PoolError(
                f"a connection was returned to the pool {self.name!r} by a thread it "
                "is not lent to: returned twice and lent again since, or passed to "
                "another thread; it stays lent to its borrower"
            )
        if store.holds_idle(conn):
            raise PoolError(
                f"a connection was returned twice to the pool {self.name!r}: it is "
                "already idle there"
            )
        raise PoolError(f"a connection not lent by the pool {self.name!r} was returned")

    def _release_slow(self, conn: PooledConnection) -> None:
        with self.lock:
            mine = (
                not self._closed
                and conn.lent_to == _get_ident()
                and self._store.lends(conn)
            )
            if mine:
                conn.borrower_stack = None  # the lease's leak watch ends here
            else:
                self._refuse(conn)
        if not mine:
            with contextlib.suppress(psycopg2.Error):
                conn.close()
            return
        if conn.closed:
            self._discard(conn, lost=True)
            return
        in_transaction = (
            conn.get_transaction_status() != STATUS_IDLE or not conn.autocommit
        )
        if in_transaction or conn.session_changed:
            if in_transaction:
                with self.lock:
                    self.counters[RETURNED_IN_TRANSACTION] += 1
            if not conn.clean():
                self._discard(conn, lost=bool(conn.closed))
                return
        if self.reset_session and not conn.execute_quietly("DISCARD ALL"):
            self._discard(conn, lost=bool(conn.closed))
            return
        now = time.monotonic()
        if now > conn.lifetime_ends:
            self._discard(conn, lost=False)
            return
        conn.last_used = now
        with self.lock:
            if not self._closed:
                self._store.put_idle(conn)
                self._free_slot()
                return
            self._store.forget(conn)
        with contextlib.suppress(psycopg2.Error):
            conn.close()

    def _discard(self, conn: PooledConnection, *, lost: bool) -> None:
        # Forgotten first, under the lock, then closed: the monitor looks only at
        # connections still lent, so it never reads one being closed.
        with self.lock:
            owned = not self._closed and self._store.lends(conn)
            if owned:
                self._store.forget(conn)
        with contextlib.suppress(psycopg2.Error):
            conn.close()  # outside the lock; a dead connection closes locally
        with self.lock:
            self.counters[CONNECTIONS_DISCARDED] += 1
            if lost:
                self.counters[CONNECTIONS_LOST] += 1
            if owned and not self._closed:
                self._free_slot()

    def _give_back_slot(self) -> None:
        with self.lock:
            self._free_slot()

    # --------------------------------------- what the monitor needs (watch.py)
    @property
    def closed(self) -> bool:
        return self._closed

    def lent_connections(self) -> Iterable[PooledConnection]:
        """The connections out on a lease (caller holds ``lock``)."""
        return list(self._store._used.values())

    def still_lent(self, conn: PooledConnection, lease: int) -> bool:
        """Whether ``conn`` is still out on ``lease`` (caller holds ``lock``)."""
        return conn.lease == lease and self._store.lends(conn)

    # -------------------------------------------------- context managers
    def connection(self, timeout: Optional[float] = None) -> _Borrowed:
        """Borrow a connection in autocommit for the block; it goes back in any case.

        ``with pool.connection() as conn:``. A small class rather than a generator
        context manager: this is the pool's hot path, and a generator's frame and
        exception plumbing cost as much again as the checkout itself.
        """
        return _Borrowed(self, timeout)

    @contextlib.contextmanager
    def get_connection(
        self, timeout: Optional[float] = None
    ) -> Iterator[PooledConnection]:
        """Borrow a connection with psycopg2's transactional behaviour, as in the guide.

        The block runs in a transaction: committed on a clean exit, rolled back on an
        exception; then the connection goes back to the pool. A connection lost while
        the COMMIT was in flight raises ``CommitOutcomeUnknown``.
        """
        conn = self.acquire(timeout)
        try:
            conn.autocommit = False
            try:
                if self.set_local:  # psycopg2 sends BEGIN first: local to the block
                    with conn.cursor() as cur:
                        cur.execute(self.set_local)
                yield conn
            except BaseException:
                if not conn.closed:
                    with contextlib.suppress(psycopg2.Error):
                        conn.rollback()
                raise
            try:
                conn.commit()
            except psycopg2.Error as exc:
                err = translate(exc, "COMMIT", connection=conn, write_in_flight=True)
                raise err from exc
        finally:
            self.release(conn)

    @contextlib.contextmanager
    def get_cursor(self, timeout: Optional[float] = None) -> Iterator[Any]:
        """A cursor giving rows as dicts, in a transaction committed on a clean exit."""
        with (
            self.get_connection(timeout) as conn,
            conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
        ):
            yield cur

    # --------------------------------------------------------------- state
    def stats(self) -> Dict[str, Any]:
        """Counters and gauges: size, in use, idle, waiting, requests, waits, ...

        ``wait_time`` is the total and ``max_wait`` the longest time (seconds) one
        caller spent in line.
        """
        with self.lock:
            idle = len(self._store._pool)
            result: Dict[str, Any] = {
                "name": self.name,
                "maxconn": self.maxconn,
                "size": len(self._store._used) + idle,
                "in_use": self._out,
                "idle": idle,
                "waiting": len(self._waiters),
                "reconnecting": self._backoff.in_outage,
            }
            result.update(self.counters)
            result.update(self.timings)
        return result

    def drain(self) -> int:
        """Replace every connection: the idle ones are closed now, the lent ones as
        they come back; return how many idle ones were closed.

        For a server that changed role under the pool (a failover made it a standby:
        SQLSTATE 25006): new connections go through the DSN again, and with a role
        set, to the node that has it. Thread-safe; the pool stays open.
        """
        with self.lock:
            idle: List[PooledConnection] = list(self._store._pool)
            self._store._pool.clear()
            for conn in self._store._used.values():
                conn.expires_at = conn.lifetime_ends = 0.0
            self.counters[DRAINS] += 1
        for conn in idle:
            with contextlib.suppress(psycopg2.Error):
                conn.close()
        logger.warning(
            "pool %r: the server refused a write as read-only (a failover?); "
            "reconnecting every connection",
            self.name,
        )
        return len(idle)

    def close(self) -> None:
        """Close every idle connection; borrowed ones are closed as they come back.

        Idempotent. Waiting callers and later requests get ``PoolClosed``; a closed
        pool cannot be reopened.
        """
        with self.lock:
            if self._closed:
                return
            self._closed = True
            idle: List[PooledConnection] = list(self._store._pool)
            self._store._pool.clear()
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.error = PoolClosed(f"the pool {self.name!r} was closed")
                waiter.cond.notify()
            self._connect_turn.notify_all()
        for conn in idle:  # outside the lock: closing a live connection sends a message
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- fork
    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them.

        The child's copies of the parent's sockets are pointed at /dev/null before the
        connection objects are dropped, so that closing them (which sends a Terminate
        message) cannot end the parent's sessions. The lock is replaced: another
        thread of the parent may have held it at the fork. Called by ``default``'s
        at-fork hook, before anything else of pgaccess runs in the child.
        """
        with contextlib.suppress(Exception):
            conns = list(self._store._pool) + list(self._store._used.values())
            if conns:
                devnull = os.open(os.devnull, os.O_RDWR)
                try:
                    for conn in conns:
                        with contextlib.suppress(Exception):
                            if not conn.closed:
                                os.dup2(devnull, conn.fileno())
                finally:
                    os.close(devnull)
        self._reset_state()
