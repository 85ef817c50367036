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
  and a connection that cannot be cleaned is forgotten and closed, its slot freed.

And what it never did: when connects fail (a restart, a full server, a network
fault), callers take turns, one attempt at a time with a doubling delay, and take
the connections given back meanwhile; session attributes changed through psycopg2
are reset on return; a forked child leaves its parent's sockets alone; leak reports
and stall detection, when asked for, run in one monitor thread per pool.

Sizing: every process has its own pool, so processes x ``maxconn`` must fit within the
server's ``max_connections`` (less its reserved slots), or within PgBouncer's pool.
"""

from __future__ import annotations

import collections
import contextlib
import decimal
import itertools
import logging
import math
import os
import select
import socket
import struct
import sys
import threading
import time
import traceback
import uuid
import weakref
from types import FrameType
from typing import (
    TYPE_CHECKING,
    Any,
    Deque,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
)

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import psycopg2.pool

from .config import Settings, redact_dsn
from .errors import (
    ConnectionFailed,
    PoolClosed,
    PoolTimeout,
    translate,
)

__all__ = [
    "CONNECT_DEFAULTS",
    "ConnectionPool",
    "PooledConnection",
    "db_pool",
    "default_pool",
]

logger = logging.getLogger("pgaccess.pool")

_STATUS_IDLE = ext.TRANSACTION_STATUS_IDLE
_STATUS_ACTIVE = ext.TRANSACTION_STATUS_ACTIVE
_BASE_CURSOR_FACTORY: Any = vars(ext.connection)["cursor_factory"]


def _marking(name: str) -> Any:
    """psycopg2's ``connection.<name>``, as a property whose setter marks the change."""
    base = vars(ext.connection)[name]

    def set_value(self: PooledConnection, value: Any) -> None:
        base.__set__(self, value)
        self._session_changed()

    return property(base.__get__, set_value)


class PooledConnection(ext.connection):
    """A psycopg2 connection that remembers its age, last use and reusable cursor."""

    created_at: float
    #: When the pool replaces it; 0 also means "changed: reset me on return".
    expires_at: float
    last_used: float
    cursor_cache: Optional[ext.cursor]
    #: Session attributes were changed through psycopg2 (see ``_session_changed``).
    session_changed: bool
    #: (fd, local address, peer address) of a TCP connection watched for stalls.
    tcp_ident: Optional[Tuple[int, Any, Any]]

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.created_at = self.last_used = time.monotonic()
        self.expires_at = math.inf
        self.session_changed = False
        self.tcp_ident = None
        self.cursor_cache = None
        self.initial_encoding = self.encoding
        # Registered once: polling a ready-made poll object costs a third of select().
        self.poller = select.poll()
        self.poller.register(self.fileno(), select.POLLIN)

    def has_unread_data(self) -> bool:
        """Whether the server sent something unasked (when idle: bad news)."""
        return bool(self.poller.poll(0))

    # In autocommit, psycopg2 applies session attributes with SET (default_transaction_
    # read_only, ...): server state that the next borrower would inherit. Every way to
    # change them marks the connection, and ``expires_at = 0`` sends its return down the
    # slow path (which resets them) through a test release() makes anyway: a clean
    # connection's return costs nothing more.
    def _session_changed(self) -> None:
        self.session_changed = True
        self.expires_at = 0.0

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        super().set_session(*args, **kwargs)
        self._session_changed()

    def set_isolation_level(self, level: Optional[int]) -> None:
        super().set_isolation_level(level)
        self._session_changed()

    def set_client_encoding(self, encoding: str) -> None:
        super().set_client_encoding(encoding)
        self._session_changed()

    readonly = _marking("readonly")
    isolation_level = _marking("isolation_level")
    deferrable = _marking("deferrable")
    cursor_factory = _marking("cursor_factory")


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


class _Borrow:
    """A watched checkout (``leak_threshold``): since when, and by whom."""

    __slots__ = ("reported", "since", "stack")

    def __init__(self, since: float, stack: str) -> None:
        self.since = since
        self.stack = stack
        self.reported = False


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
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB = contextlib.__file__

# struct tcp_info (linux/tcp.h): tcpi_last_data_sent, tcpi_last_ack_sent and
# tcpi_last_data_recv, milliseconds since then, start at byte 44.
_TCP_TIMES = struct.Struct("III")
_TCP_TIMES_AT = 44
_TCP_INFO_LEN = _TCP_TIMES_AT + _TCP_TIMES.size
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only

#: libpq parameters every pool connection gets unless its DSN (or, for
#: ``application_name``, PGAPPNAME) sets them. A dead peer or a network path that
#: drops every packet must not hang a call (with psycopg2's defaults a statement sent
#: into such a path waits for TCP to give up, about 15 minutes on Linux): data left
#: unacknowledged for 8 s, or an idle wait whose keepalive probes (from 4 s, every
#: 2 s) go unanswered until then, fails the call with ``ConnectionLost``. Either way
#: under 10 s. Ignored on Unix sockets.
CONNECT_DEFAULTS: Dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 4,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 8_000,
    "application_name": "pgaccess",
}


def _adapt_decimal(value: decimal.Decimal) -> Any:
    """A Decimal as SQL; psycopg2's own adapter writes every non-finite Decimal as
    ``'NaN'::numeric``, so an infinity would be stored as NaN. Infinities are written
    as numeric infinities (PostgreSQL 14+; an older server rejects them with an error
    rather than storing NaN)."""
    if value.is_infinite():
        return ext.AsIs(
            "'-Infinity'::numeric" if value.is_signed() else "'Infinity'::numeric"
        )
    return _psycopg2_decimal(value)


_psycopg2_decimal = ext.adapters[(decimal.Decimal, ext.ISQLQuote)]


def _register_adapters() -> None:
    """Install pgaccess's value adapters where psycopg2's own are still in place.

    psycopg2's adapters are per process, so these apply to all its users: infinite
    Decimals are written as infinities, and ``uuid.UUID`` values (which psycopg2
    cannot adapt until ``register_uuid()``) as ``uuid`` literals; reading is
    unchanged (a uuid column still comes back as ``str``). An adapter the
    application registered itself is left alone.
    """
    if ext.adapters.get((decimal.Decimal, ext.ISQLQuote)) is _psycopg2_decimal:
        ext.register_adapter(decimal.Decimal, _adapt_decimal)
    if (uuid.UUID, ext.ISQLQuote) not in ext.adapters:
        ext.register_adapter(uuid.UUID, psycopg2.extras.UUID_adapter)


def _dsn_parameters(dsn: str) -> Dict[str, str]:
    """The parameters ``dsn`` sets; none when libpq cannot parse it (connecting will
    then say why)."""
    if not dsn:
        return {}
    try:
        return dict(ext.parse_dsn(dsn))
    except psycopg2.ProgrammingError:
        return {}


def _int_or_none(raw: Optional[str]) -> Optional[int]:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


class ConnectionPool:
    """A thread-safe pool of psycopg2 connections, at most ``maxconn`` of them.

    Use ``with pool.connection() as conn:`` (autocommit; the facade's path), or the
    transactional ``get_connection()`` / ``get_cursor()`` of the usage guide. A caller
    finding every connection out waits up to ``timeout`` seconds, then gets
    ``PoolTimeout``. Broken connections are discarded and replaced on demand, so the
    pool serves again by itself after a server restart. Thread-safe; fork-safe (a child
    process gets fresh connections and never touches its parent's).

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
    #: After a failed connect, wait this long before the next, doubling up to the max.
    RECONNECT_INITIAL_DELAY = 0.05
    RECONNECT_MAX_DELAY = 0.5
    #: During an outage, how often a caller waiting for its turn to connect looks for
    #: a connection given back meanwhile.
    OUTAGE_POLL = 0.02

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
        for what, value in (
            ("leak_threshold", leak_threshold),
            ("stall_timeout", stall_timeout),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{what} must be > 0 seconds, got {value}")
        if stall_timeout is not None and _TCP_INFO is None:
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
        given = _dsn_parameters(settings.dsn)
        if "PGAPPNAME" in os.environ:  # libpq's own source for application_name
            given.setdefault("application_name", os.environ["PGAPPNAME"])
        if connect_timeout is None:
            connect_timeout = _int_or_none(
                given.get("connect_timeout", os.environ.get("PGCONNECT_TIMEOUT"))
            )
        self._connect_timeout = 10 if connect_timeout is None else connect_timeout
        # pgaccess's defaults fill in what the user set nowhere: connect() arguments
        # would otherwise override the DSN's own keepalive or application settings.
        kwargs: Dict[str, Any] = {
            key: value for key, value in CONNECT_DEFAULTS.items() if key not in given
        }
        if settings.statement_timeout_ms:
            kwargs["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
        kwargs.update(connect_kwargs)
        self._connect_kwargs = kwargs
        self._closed = False
        self._reset_state()
        _register_adapters()
        _live_pools.add(self)

    def _reset_state(self) -> None:
        self._store = _Store(self.maxconn)
        # One lock for the store and for the waiting: a checkout takes it once.
        self._lock: threading.Lock = self._store._lock
        self._waiters: Deque[_Waiter] = collections.deque()
        self._out = 0  # connections lent out, or being connected for a borrower
        self._ever_connected = False
        # An outage (a failed connect, not yet followed by a good one): when the next
        # attempt may start, whether one is under way, and the delay after the next.
        self._next_connect_at = 0.0
        self._probing = False
        self._connecting = 0  # connects under way, in or out of an outage
        self._outage_errors = 0
        self._connect_delay = self.RECONNECT_INITIAL_DELAY
        self._last_connect_error = ""
        self._connect_turn = threading.Condition(self._lock)
        self._borrowers: Dict[int, _Borrow] = {}
        self._monitor: Optional[threading.Thread] = None
        # Counters, changed under the lock (plain attributes: the cheapest to bump).
        self._requests = self._requests_waiting = self._timeouts = 0
        self._opened = self._discarded = self._lost = self._connect_errors = 0
        self._returned_in_transaction = self._leaks_reported = self._stalls = 0
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
            self._watch_for_leak(conn)
        return conn

    def _reserve(
        self, deadline: float, wait: float, counted: bool
    ) -> Optional[PooledConnection]:
        """Take a slot, waiting in line if none is free; return an idle connection or
        None (meaning: connect a new one for this slot)."""
        with self._lock:
            if self._closed:
                raise PoolClosed(f"the pool {self.name!r} is closed")
            if not counted:
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

    def _connect(self, deadline: float) -> PooledConnection:
        """A connection for a reserved slot: a new one, or one given back meanwhile.

        Normally a plain connect, as many at once as callers need. After a failure
        (once the pool has connected before) the pool is in an outage (a restart, a
        full server, a network fault) until a connect succeeds: then callers take
        turns, one attempt at a time, spaced by a delay doubling from
        ``RECONNECT_INITIAL_DELAY`` to ``RECONNECT_MAX_DELAY`` however many callers
        wait, and a caller waiting for its turn takes any connection given back
        meanwhile (a full server: the pool runs at the size it can reach). A caller
        gets ``ConnectionFailed`` at its deadline, or at once when no attempt is due
        before it and the pool has no connection that could come back. The first
        connect of a pool fails at once: that is a wrong DSN, not an outage. Each
        attempt's ``connect_timeout`` is cut to the caller's remaining time (libpq
        waits 2 s at least).
        """
        while True:
            probing = False
            with self._lock:
                while self._next_connect_at:
                    if self._closed:
                        raise PoolClosed(f"the pool {self.name!r} is closed")
                    store = self._store
                    if store._pool:
                        return store.take_idle()
                    now = time.monotonic()
                    if not self._probing and now >= self._next_connect_at:
                        self._probing = probing = True
                        break
                    if now >= deadline or (
                        not self._probing
                        and self._next_connect_at > deadline
                        and not store._used
                    ):
                        raise self._unreachable(now)
                    self._connect_turn.wait(min(self.OUTAGE_POLL, deadline - now))
                self._connecting += 1
            try:
                conn = self._open(deadline)
            except BaseException as exc:
                with self._lock:
                    self._connecting -= 1
                    if probing:
                        self._probing = False
                    self._connect_turn.notify_all()
                    if not isinstance(exc, psycopg2.Error):
                        raise
                    failed, level = self._connect_failed(exc, probing, deadline)
                    ever = self._ever_connected
                if not ever or time.monotonic() >= deadline:
                    raise failed from exc
                logger.log(level, "%s; retrying within each call's timeout", failed)
                continue
            with self._lock:
                self._connecting -= 1
                self._opened += 1
                first = not self._ever_connected
                self._ever_connected = True
                if probing:
                    self._probing = False
                recovered = self._outage_errors if self._next_connect_at else 0
                if recovered:  # the outage is over: everyone may connect
                    self._next_connect_at = 0.0
                    self._connect_delay = self.RECONNECT_INITIAL_DELAY
                    self._connect_turn.notify_all()
                elif first:
                    self._connect_turn.notify_all()
                self._store.adopt(conn)
            if recovered:
                logger.warning(
                    "pool %r: connected again after %d failed attempts",
                    self.name, recovered,
                )  # fmt: skip
            if self.stall_timeout is not None and self._monitor is None:
                self._start_monitor()
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
        err = translate(exc)
        failed = ConnectionFailed(
            f"could not connect (pool {self.name!r}): {err.args[0]}",
            sqlstate=err.sqlstate,
        )
        self._connect_errors += 1
        self._last_connect_error = err.args[0]
        while not self._ever_connected and self._connecting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._connect_turn.wait(remaining)
        if not self._ever_connected:
            return failed, logging.WARNING
        # An outage: its first failure is logged as a WARNING, the next at DEBUG.
        level = logging.DEBUG if self._next_connect_at else logging.WARNING
        self._outage_errors = self._outage_errors + 1 if self._next_connect_at else 1
        if probing or self._next_connect_at == 0.0:
            self._next_connect_at = time.monotonic() + self._connect_delay
            self._connect_delay = min(self._connect_delay * 2, self.RECONNECT_MAX_DELAY)
        return failed, level

    def _open(self, deadline: float) -> PooledConnection:
        """A new connection in autocommit, its connect cut to the time left."""
        limit = max(2, math.ceil(deadline - time.monotonic()))
        if self._connect_timeout > 0:
            limit = min(limit, self._connect_timeout)
        conn: PooledConnection = psycopg2.connect(
            self.settings.dsn,
            connection_factory=PooledConnection,
            connect_timeout=limit,
            **self._connect_kwargs,
        )
        try:
            conn.autocommit = True
            conn.expires_at = conn.created_at + self.max_lifetime
            if self.stall_timeout is not None:
                conn.tcp_ident = _tcp_ident(conn.fileno())
        except BaseException:
            conn.close()
            raise
        return conn

    def _unreachable(self, now: float) -> ConnectionFailed:
        # Caller holds the lock.
        if self._next_connect_at > now + 0.001 and not self._probing:
            when = (
                f"the next attempt is due in {self._next_connect_at - now:.2f} s, "
                "after this call's timeout"
            )
        else:
            when = "no connection could be made within this call's timeout"
        return ConnectionFailed(
            f"the server is unreachable (pool {self.name!r}): {when}; "
            f"the last attempt failed with: {self._last_connect_error}"
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
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            except psycopg2.Error:
                return False
        return True

    # -------------------------------------------------------------- return
    def release(self, conn: PooledConnection) -> None:
        """Give back a connection from :meth:`acquire`; it is cleaned or discarded.

        A connection left in a transaction is rolled back (outside the pool's lock)
        and its psycopg2 session attributes reset; one that is broken, cannot be
        cleaned, or is older than ``max_lifetime`` is closed and its slot freed.
        """
        now = time.monotonic()
        if (
            conn.closed
            or conn.get_transaction_status() != _STATUS_IDLE
            or not conn.autocommit
            or now > conn.expires_at  # also a changed session: see PooledConnection
            or self._slow_release
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
        if self._borrowers:
            self._borrowers.pop(id(conn), None)
        if conn.closed:
            self._discard(conn, lost=True)
            return
        in_transaction = (
            conn.get_transaction_status() != _STATUS_IDLE or not conn.autocommit
        )
        if in_transaction or conn.session_changed:
            if in_transaction:
                with self._lock:
                    self._returned_in_transaction += 1
            if not self._clean(conn):
                self._discard(conn, lost=bool(conn.closed))
                return
        if self.reset_session and not self._discard_session_state(conn):
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
            # The base class's methods: PooledConnection's own would mark it again.
            ext.connection.set_session(
                conn, isolation_level="DEFAULT", readonly="default",
                deferrable="default", autocommit=True,
            )  # fmt: skip
            if conn.session_changed:
                if conn.encoding != conn.initial_encoding:
                    ext.connection.set_client_encoding(conn, conn.initial_encoding)
                _BASE_CURSOR_FACTORY.__set__(conn, None)
                conn.session_changed = False
                conn.expires_at = conn.created_at + self.max_lifetime
        except psycopg2.Error:
            return False
        return conn.get_transaction_status() == _STATUS_IDLE

    def _discard_session_state(self, conn: PooledConnection) -> bool:
        """``DISCARD ALL`` (for ``reset_session``); False if that failed."""
        try:
            with conn.cursor() as cur:
                cur.execute("DISCARD ALL")
        except psycopg2.Error:
            return False
        return True

    def _discard(self, conn: PooledConnection, *, lost: bool) -> None:
        # Forgotten first, under the lock, then closed: the monitor looks only at
        # connections still registered, so it never reads one being closed.
        with self._lock:
            owned = not self._closed and self._owns(conn)
            if owned:
                key = self._store._rused.pop(id(conn))
                del self._store._used[key]
        with contextlib.suppress(psycopg2.Error):
            conn.close()  # outside the lock; a dead connection closes locally
        with self._lock:
            self._discarded += 1
            if lost:
                self._lost += 1
            if owned and not self._closed:
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
                reconnecting=bool(self._next_connect_at),
                returned_in_transaction=self._returned_in_transaction,
                leaks_reported=self._leaks_reported,
                stalls_detected=self._stalls,
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
            self._connect_turn.notify_all()
        for conn in idle:  # outside the lock: closing a live connection sends a message
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------- leaks and stalls
    def _watch_for_leak(self, conn: PooledConnection) -> None:
        self._borrowers[id(conn)] = _Borrow(time.monotonic(), _borrower_stack())
        if self._monitor is None:
            self._start_monitor()

    def _start_monitor(self) -> None:
        """Start the thread that looks at the borrowed connections (once per pool).

        One thread per pool, only when ``leak_threshold`` or ``stall_timeout`` is
        set; checkouts and returns never wait for it.
        """
        periods = [
            limit / 4
            for limit in (self.leak_threshold, self.stall_timeout)
            if limit is not None
        ]
        period = min(max(min(periods), 0.01), 1.0)
        with self._lock:
            if self._monitor is not None or self._closed:
                return
            thread = threading.Thread(
                target=_run_monitor,
                args=(weakref.ref(self), period),
                name=f"pgaccess-monitor-{self.name}",
                daemon=True,
            )
            self._monitor = thread
        thread.start()

    def _inspect(self) -> None:
        """One look by the monitor: report leaks, cut stalled connections."""
        now = time.monotonic()
        limit = self.leak_threshold
        if limit is not None and self._borrowers:
            for borrow in list(self._borrowers.values()):
                if not borrow.reported and now - borrow.since > limit:
                    borrow.reported = True  # once per checkout
                    with self._lock:
                        self._leaks_reported += 1
                    logger.warning(
                        "a connection of the pool %r has been held for more than "
                        "%.3g s; borrowed at:\n%s",
                        self.name, limit, borrow.stack,
                    )  # fmt: skip
        stall = self.stall_timeout
        if stall is not None:
            with self._lock:
                lent = list(self._store._used.values())
            for conn in lent:
                ident = conn.tcp_ident
                if ident is None:
                    continue
                silent = _silent_for(ident)
                if silent is None or silent < stall:
                    continue
                with self._lock:
                    # Still lent (the pool forgets a connection before closing it,
                    # so this one is open) and waiting for the reply to a command.
                    waiting = (
                        id(conn) in self._store._rused
                        and not conn.closed
                        and conn.get_transaction_status() == _STATUS_ACTIVE
                    )
                    if waiting:  # counted before the borrower can wake up
                        self._stalls += 1
                if waiting and _shut_down(ident):
                    logger.warning(
                        "pool %r: a command has waited %.1f s with no byte received "
                        "or sent (stall_timeout %.3g s); the network path looks dead, "
                        "so its socket was shut down and the call fails with "
                        "ConnectionLost",
                        self.name, silent, stall,
                    )  # fmt: skip

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


def _run_monitor(ref: weakref.ReferenceType[ConnectionPool], period: float) -> None:
    """The monitor thread: holds its pool weakly, ends when the pool is closed."""
    me = threading.current_thread()
    while True:
        time.sleep(period)
        pool = ref()
        if pool is None or pool._closed or pool._monitor is not me:
            return
        try:
            pool._inspect()
        except Exception:
            logger.exception("the monitor of the pool %r failed", pool.name)
        del pool


def _borrower_stack(limit: int = 12) -> str:
    """The caller's stack, from the first frame outside pgaccess and contextlib."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        or frame.f_code.co_filename == _CONTEXTLIB
    ):
        frame = frame.f_back
    return "".join(traceback.format_stack(frame or sys._getframe(1), limit=limit))


def _tcp_ident(fd: int) -> Optional[Tuple[int, Any, Any]]:
    """(fd, local address, peer address) of a TCP socket; None for a Unix socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return (fd, sock.getsockname(), sock.getpeername())
    except OSError:
        return None
    finally:
        sock.detach()  # libpq owns the descriptor


def _socket_of(ident: Tuple[int, Any, Any]) -> Optional[socket.socket]:
    """A socket object on the descriptor, if it is still the same connection.

    The connection may have been closed since, and its number reused by another.
    The caller must ``detach()`` it: libpq owns the descriptor.
    """
    fd, local, peer = ident
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.getsockname() == local and sock.getpeername() == peer:
            return sock
    except OSError:
        pass
    sock.detach()
    return None


def _silent_for(ident: Tuple[int, Any, Any]) -> Optional[float]:
    """Seconds since data last went either way on a TCP connection, as the kernel
    counts it: ACKs and keepalives do not count, so a path that stopped delivering
    shows here even when TCP's own timers cannot see it (a proxy or a middlebox that
    keeps acknowledging, a peer whose kernel answers while its process is frozen)."""
    sock = _socket_of(ident)
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)  # type: ignore[arg-type]
    except OSError:
        return None
    finally:
        sock.detach()
    sent, _acked, received = _TCP_TIMES.unpack_from(info, _TCP_TIMES_AT)
    return float(min(sent, received)) / 1000


def _shut_down(ident: Tuple[int, Any, Any]) -> bool:
    """Shut a connection's socket down; the thread blocked in libpq on it wakes up
    and reports the connection lost."""
    sock = _socket_of(ident)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        sock.detach()
    return True


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
