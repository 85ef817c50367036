"""ConnectionPool: psycopg2's ThreadedConnectionPool, made to wait, heal and report.

psycopg2's ``ThreadedConnectionPool`` stays the owner of the connections (its ``_pool``
of idle ones, its ``_used`` bookkeeping, its lock), but pgaccess drives it so that its
known faults cannot happen:

- it raises "connection pool exhausted" the moment every connection is out: here a
  caller waits, first come first served, up to ``timeout``, then gets ``PoolTimeout``;
- it connects while holding its lock, so one slow connect stalls every thread: here a
  slot is reserved under the lock and the connect happens outside it;
- it closes every returned connection above ``minconn`` (constant reconnect churn):
  here its ``minconn`` is set to the maximum, so returned connections stay open;
- it rolls back inside ``putconn`` under its lock, and loses the slot for good if that
  ``rollback()`` raises: here the rollback happens before ``putconn``, outside the lock,
  and a connection that cannot be cleaned goes back with ``putconn(conn, close=True)``.

Sizing: every process has its own pool, so processes x ``maxconn`` must fit within the
server's ``max_connections`` (less its reserved slots), or within PgBouncer's pool.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import select
import threading
import time
import traceback
import weakref
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterator, List, Optional

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import psycopg2.pool

from .config import Settings, redact_dsn
from .errors import (
    CommitOutcomeUnknown,
    ConnectionFailed,
    PoolClosed,
    PoolTimeout,
    translate,
)

__all__ = ["ConnectionPool", "PooledConnection", "db_pool", "default_pool"]

logger = logging.getLogger("pgaccess.pool")

_STATUS_IDLE = ext.TRANSACTION_STATUS_IDLE


class PooledConnection(ext.connection):
    """A psycopg2 connection that remembers its age, last use and reusable cursor."""

    created_at: float
    last_used: float
    cursor_cache: Optional[ext.cursor]

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.created_at = self.last_used = time.monotonic()
        self.cursor_cache = None
        # Registered once: polling a ready-made poll object costs a third of select().
        self.poller = select.poll()
        self.poller.register(self.fileno(), select.POLLIN)

    def has_unread_data(self) -> bool:
        """Whether the server sent something unasked (when idle: bad news)."""
        return bool(self.poller.poll(0))


class _Store(psycopg2.pool.ThreadedConnectionPool):
    """ThreadedConnectionPool as the owner of the connections; no I/O under its lock."""

    # psycopg2's own private state, which the stubs leave out.
    _pool: List[PooledConnection]
    _used: Dict[int, PooledConnection]
    _rused: Dict[int, int]
    _lock: threading.Lock
    _keys: int
    if TYPE_CHECKING:

        def _getkey(self) -> int: ...
        def _getconn(self, key: Any = None) -> PooledConnection: ...
        def _putconn(self, conn: Any, key: Any = None, close: bool = False) -> None: ...

    def __init__(self, maxconn: int) -> None:
        super().__init__(0, maxconn)  # minconn 0: nothing is connected eagerly ...
        # ... and minconn = maxconn afterwards: its _putconn closes every connection
        # returned while len(_pool) >= minconn, which would make every return a close.
        self.minconn = maxconn

    def take_idle(self) -> PooledConnection:
        """Lend the most recently used idle connection (caller holds the lock).

        What ``_getconn`` does when an idle connection exists, minus its re-checks.
        """
        conn = self._pool.pop()
        self._keys += 1
        self._used[self._keys] = conn
        self._rused[id(conn)] = self._keys
        return conn

    def put_idle(self, conn: PooledConnection) -> bool:
        """Take back a lent connection already found clean (caller holds the lock).

        What ``_putconn`` does for a clean idle connection, without asking it for
        its state again. False if the connection is not one of this store's (one
        lent before a fork, returned in the child).
        """
        key = self._rused.pop(id(conn), None)
        if key is None:
            return False
        del self._used[key]
        self._pool.append(conn)
        return True

    def adopt(self, conn: PooledConnection) -> None:
        """Register a connection made outside the lock as lent (lock held)."""
        key = self._getkey()
        self._used[key] = conn
        self._rused[id(conn)] = key


class _Waiter:
    """One caller waiting for a connection; woken alone, in arrival order."""

    __slots__ = ("cond", "error", "granted")

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.granted = False
        self.error: Optional[BaseException] = None


_names = itertools.count(1)
_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


class ConnectionPool:
    """A thread-safe pool of psycopg2 connections, at most ``maxconn`` of them.

    Use ``with pool.connection() as conn:`` (autocommit; the facade's path), or the
    transactional ``get_connection()`` / ``get_cursor()`` of the usage guide. A caller
    finding every connection out waits up to ``timeout`` seconds, then gets
    ``PoolTimeout``. Broken connections are discarded and replaced on demand, so the
    pool serves again by itself after a server restart. Thread-safe; fork-safe (a child
    process gets fresh connections and never touches its parent's).
    """

    #: A connection idle longer than this gets a round-trip check before it is lent.
    CHECK_IDLE_AFTER = 60.0
    #: After a failed connect, wait this long before the next, doubling up to the max.
    RECONNECT_INITIAL_DELAY = 0.05
    RECONNECT_MAX_DELAY = 0.5

    def __init__(
        self,
        dsn: Optional[str] = None,
        *,
        maxconn: Optional[int] = None,
        timeout: Optional[float] = None,
        name: Optional[str] = None,
        max_lifetime: float = 3600.0,
        statement_timeout: Optional[int] = None,
        connect_timeout: int = 10,
        leak_threshold: Optional[float] = None,
        settings: Optional[Settings] = None,
        **connect_kwargs: Any,
    ) -> None:
        if settings is None:
            settings = Settings.resolve(
                dsn,
                maxconn=maxconn,
                timeout=timeout,
                statement_timeout=statement_timeout,
            )
        self.settings = settings
        self.name = name or f"pool-{next(_names)}"
        self.maxconn = settings.maxconn
        self.timeout = settings.timeout
        self.max_lifetime = max_lifetime
        self.leak_threshold = leak_threshold
        kwargs: Dict[str, Any] = {
            "connect_timeout": connect_timeout,
            # A dead peer must not hang a call forever (psycopg2's defaults would):
            # TCP keepalives and a cap on unacknowledged data. Ignored on Unix sockets.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
            "application_name": "pgaccess",
        }
        if settings.statement_timeout_ms:
            kwargs["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
        kwargs.update(connect_kwargs)
        self._connect_kwargs = kwargs
        self._closed = False
        self._reset_state()
        _live_pools.add(self)

    def _reset_state(self) -> None:
        self._store = _Store(self.maxconn)
        # One lock for the store and for the waiting: a checkout takes it once.
        self._lock: threading.Lock = self._store._lock
        self._waiters: Deque[_Waiter] = collections.deque()
        self._out = 0  # connections lent out, or being connected for a borrower
        self._ever_connected = False
        self._next_connect_at = 0.0
        self._connect_delay = self.RECONNECT_INITIAL_DELAY
        self._borrowers: Dict[int, Any] = {}
        # Counters, changed under the lock (plain attributes: the cheapest to bump).
        self._requests = self._requests_waiting = self._timeouts = 0
        self._opened = self._discarded = self._lost = self._connect_errors = 0
        self._returned_in_transaction = self._leaks_reported = 0
        self._wait_time = 0.0

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._out}/{self.maxconn} in use"
        dsn = redact_dsn(self.settings.dsn)
        return f"<ConnectionPool {self.name!r} {state} dsn={dsn!r}>"

    # ------------------------------------------------------------ checkout
    def acquire(self, timeout: Optional[float] = None) -> PooledConnection:
        """Borrow a connection in autocommit; give it back with :meth:`release`.

        Prefer ``with pool.connection()``: a connection never released is a slot lost
        until the pool is closed. Blocks up to ``timeout`` (default: the pool's) and
        raises ``PoolTimeout``, ``PoolClosed`` or ``ConnectionFailed``.
        """
        # The fast path: a free slot and an idle connection, one lock round trip.
        conn: Optional[PooledConnection] = None
        with self._lock:
            if self._out < self.maxconn and not self._waiters and not self._closed:
                store = self._store
                if store._pool:
                    self._out += 1
                    self._requests += 1
                    conn = store.take_idle()
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
        while True:
            if conn is None:
                conn = self._reserve(deadline, wait)
            if conn is not None:
                if self._usable(conn):
                    break
                self._discard(conn, lost=True)
                conn = None
                continue
            try:
                conn = self._connect(deadline)
            except BaseException:
                self._give_back_slot()
                raise
            if conn is not None:
                break
        if self.leak_threshold is not None:
            self._watch_for_leak(conn)
        return conn

    def _reserve(self, deadline: float, wait: float) -> Optional[PooledConnection]:
        """Take a slot, waiting in line if none is free; return an idle connection or
        None (meaning: connect a new one for this slot)."""
        with self._lock:
            if self._closed:
                raise PoolClosed(f"the pool {self.name!r} is closed")
            self._requests += 1
            if self._out < self.maxconn and not self._waiters:
                self._out += 1
            else:
                self._wait_in_line(deadline, wait)
            store = self._store
            return store.take_idle() if store._pool else None

    def _wait_in_line(self, deadline: float, wait: float) -> None:
        # Caller holds the lock. The releaser hands its slot straight to the first
        # waiter (granted=True), so a newcomer can never barge ahead of the line.
        waiter = _Waiter(self._lock)
        self._waiters.append(waiter)
        started = time.monotonic()
        self._requests_waiting += 1
        try:
            while not waiter.granted and waiter.error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiter.cond.wait(remaining)
        finally:
            self._wait_time += time.monotonic() - started
        if waiter.error is not None:
            raise waiter.error
        if not waiter.granted:
            self._waiters.remove(waiter)
            self._timeouts += 1
            raise PoolTimeout(
                f"no connection free in the pool {self.name!r} after {wait:.3g} s: "
                f"{self._out} of {self.maxconn} in use, "
                f"{len(self._waiters)} other callers waiting"
            )

    def _connect(self, deadline: float) -> Optional[PooledConnection]:
        """Open a connection for a reserved slot, outside the lock.

        After the pool has connected once, a failure is taken as an outage (a restart,
        a full server) and retried with backoff until the caller's deadline, giving up
        the slot between attempts so a connection returned meanwhile can be used. The
        first connect of a pool fails at once: that is a wrong DSN, not an outage.
        Returns None to ask the caller to reserve again.
        """
        pause = self._next_connect_at - time.monotonic()
        if pause > 0:
            if time.monotonic() + pause > deadline:
                raise ConnectionFailed(
                    f"the server is unreachable (pool {self.name!r}); "
                    f"the next connection attempt is due in {pause:.2f} s, "
                    "after this call's timeout"
                )
            time.sleep(pause)
        try:
            conn = psycopg2.connect(
                self.settings.dsn,
                connection_factory=PooledConnection,
                **self._connect_kwargs,
            )
            conn.autocommit = True
        except psycopg2.Error as exc:
            with self._lock:
                self._connect_errors += 1
                self._next_connect_at = time.monotonic() + self._connect_delay
                self._connect_delay = min(
                    self._connect_delay * 2, self.RECONNECT_MAX_DELAY
                )
                ever = self._ever_connected
            err = translate(exc)
            failed = ConnectionFailed(
                f"could not connect (pool {self.name!r}): {err.args[0]}",
                sqlstate=err.sqlstate,
            )
            if not ever or time.monotonic() >= deadline:
                raise failed from exc
            logger.warning("%s; retrying until the call's timeout", failed.args[0])
            self._give_back_slot()
            return None
        with self._lock:
            self._opened += 1
            self._ever_connected = True
            self._connect_delay = self.RECONNECT_INITIAL_DELAY
            self._next_connect_at = 0.0
            self._store.adopt(conn)
        return conn  # type: ignore[no-any-return]

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
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            except psycopg2.Error:
                return False
        return True

    # -------------------------------------------------------------- return
    def release(self, conn: PooledConnection) -> None:
        """Give back a connection from :meth:`acquire`; it is cleaned or discarded.

        A connection left in a transaction is rolled back (outside the pool's lock);
        one that is broken, cannot be rolled back, or is older than ``max_lifetime``
        is closed and its slot freed for a new one.
        """
        now = time.monotonic()
        if (
            conn.closed
            or conn.get_transaction_status() != _STATUS_IDLE
            or not conn.autocommit
            or now - conn.created_at > self.max_lifetime
            or self.leak_threshold is not None
        ):
            self._release_slow(conn)
            return
        conn.last_used = now
        with self._lock:
            if not self._closed and self._store.put_idle(conn):
                if self._waiters:
                    self._hand_over()
                else:
                    self._out -= 1
                return
        conn.close()

    def _owns(self, conn: PooledConnection) -> bool:
        # False for a connection borrowed before a fork and returned in the child: the
        # child's pool started afresh and never counted it.
        return id(conn) in self._store._rused

    def _release_slow(self, conn: PooledConnection) -> None:
        self._borrowers.pop(id(conn), None)
        if conn.closed:
            self._discard(conn, lost=True)
            return
        if conn.get_transaction_status() != _STATUS_IDLE or not conn.autocommit:
            self._returned_in_transaction += 1
            if not self._clean(conn):
                self._discard(conn, lost=bool(conn.closed))
                return
        now = time.monotonic()
        if now - conn.created_at > self.max_lifetime:
            self._discard(conn, lost=False)
            return
        conn.last_used = now
        with self._lock:
            if not self._closed and self._store.put_idle(conn):
                self._hand_over()
                return
        conn.close()

    def _clean(self, conn: PooledConnection) -> bool:
        """Roll back and restore the session defaults; False if that failed."""
        try:
            if conn.get_transaction_status() != _STATUS_IDLE:
                if conn.autocommit:
                    # A transaction begun with an explicit BEGIN: psycopg2's rollback()
                    # is a no-op in autocommit, so the ROLLBACK must be sent as SQL.
                    with conn.cursor() as cur:
                        cur.execute("ROLLBACK")
                else:
                    conn.rollback()
            conn.set_session(
                isolation_level="DEFAULT", readonly="default", deferrable="default",
                autocommit=True,
            )  # fmt: skip
        except psycopg2.Error:
            return False
        return conn.get_transaction_status() == _STATUS_IDLE

    def _discard(self, conn: PooledConnection, *, lost: bool) -> None:
        with contextlib.suppress(psycopg2.Error):
            conn.close()  # outside the lock; a dead connection closes locally
        with self._lock:
            self._discarded += 1
            if lost:
                self._lost += 1
            if not self._closed and self._owns(conn):
                self._store._putconn(conn, close=True)
                self._hand_over()

    def _give_back_slot(self) -> None:
        with self._lock:
            self._hand_over()

    def _hand_over(self) -> None:
        # Caller holds the lock and has just freed a slot: the first waiter gets it.
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.cond.notify()
        else:
            self._out -= 1

    # -------------------------------------------------- context managers
    @contextlib.contextmanager
    def connection(self, timeout: Optional[float] = None) -> Iterator[PooledConnection]:
        """Borrow a connection in autocommit for the block; it goes back in any case."""
        conn = self.acquire(timeout)
        try:
            yield conn
        finally:
            self.release(conn)

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
                if isinstance(err, CommitOutcomeUnknown):
                    raise err from exc
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
        """Counters and gauges: size, in use, idle, waiting, requests, waits, ..."""
        with self._lock:
            idle = len(self._store._pool)
            out = self._out
            result: Dict[str, Any] = {
                "name": self.name,
                "maxconn": self.maxconn,
                "size": len(self._store._used) + idle,
                "in_use": out,
                "idle": idle,
                "waiting": len(self._waiters),
            }
            result.update(
                requests=self._requests,
                requests_waiting=self._requests_waiting,
                wait_time=self._wait_time,
                timeouts=self._timeouts,
                connections_opened=self._opened,
                connections_discarded=self._discarded,
                connections_lost=self._lost,
                connect_errors=self._connect_errors,
                returned_in_transaction=self._returned_in_transaction,
                leaks_reported=self._leaks_reported,
            )
        return result

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close every idle connection; borrowed ones are closed as they come back.

        Idempotent. Waiting callers and later requests get ``PoolClosed``; a closed
        pool cannot be reopened.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle: List[PooledConnection] = list(self._store._pool)
            self._store._pool.clear()
            while self._waiters:
                waiter = self._waiters.popleft()
                waiter.error = PoolClosed(f"the pool {self.name!r} was closed")
                waiter.cond.notify()
        for conn in idle:  # outside the lock: closing a live connection sends a message
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- leaks
    def _watch_for_leak(self, conn: PooledConnection) -> None:
        stack = "".join(traceback.format_stack(limit=14)[:-4])
        token = object()
        self._borrowers[id(conn)] = token
        assert self.leak_threshold is not None

        def report() -> None:
            if self._borrowers.get(id(conn)) is token:
                self._leaks_reported += 1
                logger.warning(
                    "a connection of the pool %r has been held for more than %.3g s; "
                    "borrowed at:\n%s",
                    self.name, self.leak_threshold, stack,
                )  # fmt: skip

        timer = threading.Timer(self.leak_threshold, report)
        timer.daemon = True
        timer.start()

    # --------------------------------------------------------------- fork
    def _after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them.

        The child's copies of the parent's sockets are pointed at /dev/null before the
        connection objects are dropped, so that closing them (which sends a Terminate
        message) cannot end the parent's sessions.
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


def _reinit_pools_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_pools_in_child)


# ------------------------------------------------------------- the default
_default: Optional[ConnectionPool] = None
_default_lock = threading.Lock()


def default_pool() -> ConnectionPool:
    """The process-wide pool, created from the environment on first use."""
    global _default
    pool = _default
    if pool is None:
        with _default_lock:
            if _default is None:
                _default = ConnectionPool(name="default")
            pool = _default
    return pool


def _reset_default_pool() -> None:
    """Close and forget the default pool (for tests that change the environment)."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.close()


class _LazyDefaultPool:
    """Stands for the default pool; importing pgaccess never connects."""

    def __getattr__(self, name: str) -> Any:
        return getattr(default_pool(), name)

    def __repr__(self) -> str:
        return repr(_default) if _default is not None else "<default pool, not created>"


#: The default pool of the usage guide: ``with db_pool.get_connection() as conn``.
db_pool: ConnectionPool = _LazyDefaultPool()  # type: ignore[assignment]
