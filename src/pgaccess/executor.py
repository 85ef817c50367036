"""Run one statement: the autocommit, transaction and retrying executors.

Layers that call only downward, as httpx's ``Client.send`` -> ``_send_single_request``:

- :func:`execute` does what every statement needs, once: time it, run it, fetch the
  result, record it, translate a psycopg2 error by SQLSTATE.
- :class:`Autocommit` borrows a connection, runs one statement with ``execute`` and
  gives the connection back: one round trip, no BEGIN/COMMIT. When the calling thread
  has a transaction open on the same pool, the statement joins it instead.
- :class:`TransactionExecutor` runs statements on the connection a transaction holds;
  BEGIN travels in front of the first one.
- :class:`Retrying` wraps either: it makes the first attempt through the executor it
  wraps and, on failure, lets the call's :class:`~pgaccess.RetryPolicy` decide about
  the next. Never inside a transaction (its first error aborted it).

The facade (``facade.py``) builds the statements and hands them to one of these.

A pool's statement timeout travels with the statements, as ``SET LOCAL
statement_timeout = N`` in the same simple-query string (an implicit transaction,
so it ends with the statement) or after a transaction's BEGIN: never as a session
setting, which a transaction-mode pooler would leak to other clients.

A write refused as read-only (SQLSTATE 25006, ``ReadOnlyNode``) outside a
transaction means the pool's server is a standby now: the pool drains
(``ConnectionPool.drain``) and the retrying executor runs the statement again,
whether or not it is idempotent, since nothing was written.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from time import perf_counter
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import psycopg2
import psycopg2.extensions as ext

from . import sql as q
from .connector import PREFER_STANDBY, STANDBY
from .errors import (
    DatabaseError,
    InvalidQuery,
    ReadOnlyNode,
    TransactionError,
    translate,
)
from .pool import ConnectionPool, PooledConnection
from .retry import REFUSED, RetryPolicy
from .stats import Recorder

__all__ = [
    "Autocommit",
    "Retrying",
    "TransactionExecutor",
    "execute",
    "joined",
]

logger = logging.getLogger("pgaccess.executor")

T = TypeVar("T")
Row = Dict[str, Any]
Params = Union[None, Sequence[Any], Dict[str, Any]]

_STATUS_IDLE = ext.TRANSACTION_STATUS_IDLE
_STATUS_INERROR = ext.TRANSACTION_STATUS_INERROR


# ------------------------------------------------------------------ results
def _names(cur: Any) -> List[str]:
    # d.name, not d[0]: psycopg2's Column.__getitem__ costs six times the attribute,
    # which on a 16-column row was most of the facade's overhead per call.
    return [d.name for d in cur.description]


def fetch_one(cur: Any) -> Optional[Row]:
    row = cur.fetchone()
    return None if row is None else dict(zip(_names(cur), row))


def fetch_rows(cur: Any) -> List[Row]:
    if cur.description is None:
        return []
    names = _names(cur)
    return [dict(zip(names, row)) for row in cur.fetchall()]


def fetch_scalar(cur: Any) -> Any:
    row = cur.fetchone()
    return None if row is None else row[0]


def fetch_rowcount(cur: Any) -> int:
    return int(cur.rowcount)


#: What a statement returns: the first row, every row, the first value, the count.
ONE, ROWS, SCALAR, ROWCOUNT = range(4)
FETCH: Tuple[Callable[[Any], Any], ...] = (
    fetch_one,
    fetch_rows,
    fetch_scalar,
    fetch_rowcount,
)


# -------------------------------------------------------------- one statement
def execute(
    conn: PooledConnection,
    cur: Any,
    label: str,
    work: Callable[[Any], T],
    record: Recorder,
    *,
    write: bool,
    params: Params = None,
) -> T:
    """Run ``work(cur)`` (one statement and its fetch, a COPY, ...) as every
    statement runs: timed, handed to ``record`` under ``label``, a psycopg2 error
    translated to its pgaccess error by SQLSTATE (``write``: a lost connection means
    the outcome is unknown). ``params`` that do not fit the placeholders of ``label``
    raise ``InvalidQuery``: psycopg2 finds that out before anything is sent.
    """
    t0 = perf_counter()
    try:
        result = work(cur)
    except (psycopg2.Error, ValueError) as exc:
        record(label, perf_counter() - t0, True)
        raise translate(exc, label, connection=conn, write_in_flight=write) from exc
    except (IndexError, KeyError, TypeError) as exc:
        if params is None:
            raise
        raise InvalidQuery(q.params_mismatch(label, params)) from exc
    record(label, perf_counter() - t0, False)
    return result


def statement(
    sent: str, params: Params, fetch: Callable[[Any], T]
) -> Callable[[Any], T]:
    """The work of one statement: send ``sent`` with ``params``, then ``fetch``."""

    def work(cur: Any) -> T:
        cur.execute(sent, params)
        return fetch(cur)

    return work


# Statements PostgreSQL refuses inside a transaction block, the implicit one of a
# multi-statement string included: they go without the SET LOCAL.
_NO_TRANSACTION_BLOCK = re.compile(
    r"\s*(VACUUM|CREATE\s+DATABASE|DROP\s+DATABASE|ALTER\s+SYSTEM|CREATE\s+TABLESPACE"
    r"|DROP\s+TABLESPACE|REINDEX\s+(SYSTEM|DATABASE)|BEGIN|START|COMMIT|END|ROLLBACK"
    r"|ABORT|PREPARE\s+TRANSACTION|SAVEPOINT|RELEASE)\b|.*\bCONCURRENTLY\b",
    re.IGNORECASE | re.DOTALL,
)


@functools.lru_cache(maxsize=1024)
def with_set_local(set_local: str, text: str) -> str:
    """``text`` with the pool's ``SET LOCAL`` in front, in the same round trip.

    Cached: the facade's statements are cached texts, and this runs on every call
    of a pool with a statement timeout (the regex reads the whole text)."""
    if not set_local or _NO_TRANSACTION_BLOCK.match(text):
        return text
    return f"{set_local}; {text}"


#: How a write refused by a standby is retried once the pool has drained: for a
#: failover's length (Patroni's switchover takes seconds), whatever the write.
FAILOVER_RETRY = RetryPolicy(
    max_attempts=20, delay=0.05, max_delay=1.0, max_time=30.0, retry_on=REFUSED
)


def first_words(st: q.Statement, n: int = 4) -> List[str]:
    """The first words of a statement, to name it in a log line."""
    return (st.text or repr(st.composed)).split()[:n]


# ----------------------------------------------- the thread's open transactions
# {pool: TransactionExecutor} of the transactions open on this thread.
_local = threading.local()


def joined(pool: ConnectionPool) -> Optional[TransactionExecutor]:
    """The executor of the transaction this thread has open on ``pool``, if any."""
    txs: Optional[Dict[ConnectionPool, TransactionExecutor]] = _local.__dict__.get(
        "txs"
    )
    return txs.get(pool) if txs else None


# ----------------------------------------------------------------- executors
class Autocommit:
    """Borrow a connection, run one statement, give it back; join an open transaction.

    ``pool`` None means the default pool, found on first use (``default``).
    """

    __slots__ = ("_default", "_pool", "record")

    def __init__(
        self,
        pool: Optional[ConnectionPool],
        record: Recorder,
        default: Callable[[], ConnectionPool],
    ) -> None:
        self._pool = pool
        self._default = default
        self.record = record

    @property
    def pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is None:
            pool = self._pool = self._default()
        return pool

    def transaction(self) -> Optional[TransactionExecutor]:
        """The transaction this thread has open on the pool, which calls join."""
        return joined(self._pool or self.pool)

    def run(self, st: q.Statement, params: Params, mode: int, write: bool) -> Any:
        """Run one cached statement; return what ``mode`` fetches. The hot path."""
        pool = self._pool or self.pool
        txs = _local.__dict__.get("txs")  # joined(), inlined: the hot path
        if txs:
            tx = txs.get(pool)
            if tx is not None:
                return tx.run(st, params, mode, write)
        if write:
            marks = pool.writes
            if marks is not None:
                marks.wrote()
        conn = pool.acquire()
        try:
            return self.run_on(pool, conn, st, params, mode, write)
        finally:
            pool.release(conn)

    def run_on(
        self,
        pool: ConnectionPool,
        conn: PooledConnection,
        st: q.Statement,
        params: Params,
        mode: int,
        write: bool,
    ) -> Any:
        """Run one statement on ``conn``, borrowed from ``pool`` by the caller."""
        cur = conn.cursor_cache
        if cur is None or cur.closed:
            cur = conn.cursor_cache = conn.cursor()
        text = st.text or st.render(cur)
        sent = with_set_local(pool.set_local, text) if pool.set_local else text
        work = statement(sent, params, FETCH[mode])
        try:
            return execute(
                conn, cur, text, work, self.record, write=write, params=params
            )
        except ReadOnlyNode as exc:
            exc.reconnected = wrong_node(pool)
            raise

    def call(
        self, fn: Callable[[Any], T], label: str, write: bool, *, atomic: bool = False
    ) -> T:
        """Run ``fn(cursor)``; ``atomic``: in a transaction of its own (or the open
        one), committed when ``fn`` returns."""
        pool = self.pool
        tx = joined(pool)
        if tx is not None:
            return tx.call(fn, label, write)
        if write and pool.writes is not None:
            pool.writes.wrote()
        conn = pool.acquire()
        try:
            # With a statement timeout, even one statement goes in a transaction: the
            # SET LOCAL needs one, and fn's statements are not one string.
            if atomic or pool.set_local:
                tx = TransactionExecutor(pool, conn, "BEGIN", self.record)
                with tx:
                    return tx.call(fn, label, write)
            with conn.cursor() as cur:
                return execute(conn, cur, label, fn, self.record, write=write)
        except ReadOnlyNode as exc:
            exc.reconnected = wrong_node(pool)
            raise
        finally:
            pool.release(conn)


def wrong_node(pool: ConnectionPool) -> bool:
    """A write was refused as read-only: a pool for writes reconnects (a read pool
    is on a standby by design; the router sends such a statement to the primary).
    Whether it did."""
    if pool.role in (STANDBY, PREFER_STANDBY):
        return False
    pool.drain()
    return True


class TransactionExecutor:
    """Statements on the connection a transaction holds; BEGIN goes with the first.

    Not thread-safe: the transaction's thread uses it. ``with tx:`` commits on a
    clean exit and rolls back on an exception; the caller returns the connection.
    """

    __slots__ = (
        "_cur",
        "_pending_begin",
        "conn",
        "facade",
        "pool",
        "read_only",
        "record",
        "status",
    )

    ACTIVE, COMMITTED, ROLLED_BACK = "active", "committed", "rolled back"

    def __init__(
        self,
        pool: ConnectionPool,
        conn: PooledConnection,
        begin: str,
        record: Recorder,
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.record = record
        #: Begun READ ONLY: a write refused in it is the caller's, not a failover.
        self.read_only = "READ ONLY" in begin.upper()
        if pool.set_local:
            begin = f"{begin}; {pool.set_local}"
        self._cur = conn.cursor()
        self._pending_begin: Optional[str] = begin
        self.status = self.ACTIVE
        #: The facade this executor serves (``db.current_transaction()`` returns it).
        self.facade: Any = None

    def transaction(self) -> TransactionExecutor:
        return self

    def check(self) -> None:
        """Raise ``TransactionError`` unless the transaction is still open."""
        if self.status is not self.ACTIVE:
            raise TransactionError(f"the transaction is {self.status}; open a new one")

    @property
    def dead(self) -> bool:
        """Whether the connection is gone."""
        return bool(self.conn.closed)

    def enter(self) -> None:
        """Become the transaction this thread's calls on the pool join."""
        _local.__dict__.setdefault("txs", {})[self.pool] = self

    def leave(self) -> None:
        """Stop being the transaction this thread's calls join."""
        txs = _local.__dict__.get("txs")
        if txs and txs.get(self.pool) is self:
            del txs[self.pool]

    def begin_now(self) -> None:
        """Send a pending BEGIN now (before handing out the raw connection)."""
        begin = self._pending_begin
        if begin is not None:
            self._pending_begin = None
            self.command(begin)

    def command(self, text: str) -> None:
        """Run a control statement (BEGIN, SAVEPOINT ...): not counted in statistics,
        whose shapes would fill up with savepoint names."""
        self.check()
        self.begin_now()
        try:
            self._cur.execute(text)
        except (psycopg2.Error, ValueError) as exc:
            raise translate(exc, text, connection=self.conn) from exc

    def run(self, st: q.Statement, params: Params, mode: int, write: bool) -> Any:
        if self.status is not self.ACTIVE:
            self.check()
        cur = self._cur
        text = st.text or st.render(cur)
        begin = self._pending_begin
        if begin is None:
            work = statement(text, params, FETCH[mode])
            try:
                return execute(self.conn, cur, text, work, self.record, write=False,
                               params=params)  # fmt: skip
            except ReadOnlyNode as exc:
                self._refused(exc)
                raise
        # One round trip for BEGIN and the first statement (simple query protocol).
        self._pending_begin = None
        work = statement(f"{begin}; {text}", params, FETCH[mode])
        try:
            return execute(self.conn, cur, text, work, self.record, write=False,
                           params=params)  # fmt: skip
        except BaseException as exc:
            if isinstance(exc, ReadOnlyNode):
                self._refused(exc)
            if self.conn.get_transaction_status() == _STATUS_IDLE:
                # BEGIN did not run either: a parse error fails the whole "BEGIN; ..."
                # string, a value psycopg2 cannot adapt fails before sending. Keep
                # BEGIN pending, or the block's next statements would autocommit.
                self._pending_begin = begin
            raise

    def call(self, fn: Callable[[Any], T], label: str, write: bool) -> T:
        self.check()
        self.begin_now()
        try:
            return execute(self.conn, self._cur, label, fn, self.record, write=False)
        except ReadOnlyNode as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: ReadOnlyNode) -> None:
        if not self.read_only:
            exc.reconnected = wrong_node(self.pool)

    # ------------------------------------------------------------ the end
    def __enter__(self) -> TransactionExecutor:
        return self

    def __exit__(self, exc_type: Optional[type], *_: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def commit(self) -> None:
        """COMMIT; a lost connection meanwhile raises ``CommitOutcomeUnknown``."""
        if self._pending_begin is not None:  # nothing was run: nothing to commit
            self._pending_begin = None
            self.status = self.COMMITTED
            return
        if not self.read_only and self.pool.writes is not None:
            self.pool.writes.wrote()  # before COMMIT: a lost reply may have committed
        if self.conn.get_transaction_status() == _STATUS_INERROR:
            # COMMIT of a failed transaction silently rolls back; say so instead.
            self.rollback()
            raise TransactionError(
                "a statement in the transaction failed (and the error was caught "
                "inside the block), so the transaction was rolled back, not committed"
            )
        try:
            self._cur.execute("COMMIT")
        except (psycopg2.Error, ValueError) as exc:
            self.status = self.ROLLED_BACK
            err = translate(exc, "COMMIT", connection=self.conn, write_in_flight=True)
            raise err from exc
        self.status = self.COMMITTED

    def rollback(self) -> None:
        """ROLLBACK; a failure is logged, never raised over the error that caused it."""
        self.status = self.ROLLED_BACK
        if self._pending_begin is not None or self.conn.closed:
            self._pending_begin = None
            return
        try:
            self._cur.execute("ROLLBACK")
        except psycopg2.Error:
            # The pool discards the connection if it is broken.
            logger.warning("ROLLBACK failed", exc_info=True)


class Retrying:
    """An executor that retries a failed statement by the policy the call gives.

    The first attempt goes straight through (tenacity stays off the success path);
    after a failure, ``retry`` decides, and ``again(first_error)`` (default: the
    same statement) runs each next attempt. Inside a transaction nothing is retried.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Union[Autocommit, TransactionExecutor]) -> None:
        self.inner = inner

    @property
    def pool(self) -> ConnectionPool:
        return self.inner.pool

    def transaction(self) -> Optional[TransactionExecutor]:
        return self.inner.transaction()

    def run(
        self,
        st: q.Statement,
        params: Params,
        mode: int,
        write: bool,
        retry: Optional[RetryPolicy] = None,
        again: Optional[Callable[[BaseException], Any]] = None,
    ) -> Any:
        try:
            return self.inner.run(st, params, mode, write)
        except DatabaseError as exc:
            if retry is None or not retry.retries(exc):
                # Refused by a standby and reconnected since: nothing was written, so
                # any write may run again.
                if not FAILOVER_RETRY.retries(exc):
                    raise
                retry = FAILOVER_RETRY
            if self.inner.transaction() is not None:
                raise
            first = exc

        def attempt() -> Any:
            if again is not None:
                return again(first)
            return self.inner.run(st, params, mode, write)

        # The retry log names what is retried: the facade method, or the statement.
        attempt.__qualname__ = (
            again.__qualname__ if again is not None else " ".join(first_words(st))
        )
        return retry.call_after_failure(first, attempt)

    def call(
        self, fn: Callable[[Any], T], label: str, write: bool, *, atomic: bool = False
    ) -> T:
        if isinstance(self.inner, TransactionExecutor):
            return self.inner.call(fn, label, write)
        return self.inner.call(fn, label, write, atomic=atomic)
