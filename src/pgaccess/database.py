"""Database: the facade. Each call is one autocommit statement on a pooled connection.

``find_one``, ``insert``, ``count``, ... build their statement once per shape (see
``sql``), borrow a connection, run one statement, and give it back: one round trip, no
BEGIN/COMMIT. Inside ``with db.transaction()`` on the same thread, the same calls join
the open transaction instead.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from time import perf_counter
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar, cast

import psycopg2
from psycopg2 import sql

from . import sql as q
from .config import slow_query_ms_from_env
from .errors import (
    CommitOutcomeUnknown,
    DatabaseError,
    TransactionError,
    UniqueViolation,
    translate,
)
from .operations import FETCH, SCALAR, Operations, Params, query_stats, record
from .pool import ConnectionPool, default_pool
from .retry import (
    RetryPolicy,
    global_stats,
    is_transient_or_unknown,
    retry_within_call,
    table_policy,
)
from .transaction import Transaction, TransactionBlock, current_transaction
from .transaction import _local as _open

__all__ = ["Database"]

logger = logging.getLogger("pgaccess.database")

T = TypeVar("T")


class Database(Operations):
    """The facade of the usage guide: ``insert``, ``find_one``, ``update``, ...

    ``Database()`` uses the default pool (from ``PGACCESS_DSN`` / ``DATABASE_URL``),
    ``Database(dsn=...)`` makes a pool of its own, ``Database(pool=...)`` shares one.
    Thread-safe: share one instance between threads. Reads (``find_one``,
    ``find_many``, ``count``, ``exists``, a SELECT through ``execute``) are retried on
    transient errors outside transactions; writes are retried only where that is
    safe (see ``retry.TABLE_POLICIES``).
    """

    def __init__(
        self,
        dsn: Optional[str] = None,
        *,
        pool: Optional[ConnectionPool] = None,
        retry_reads: bool = True,
        read_policy: Optional[RetryPolicy] = None,
        transaction_policy: Optional[RetryPolicy] = None,
        slow_query_ms: Optional[float] = None,
        query_stats: bool = True,
        **pool_kwargs: Any,
    ) -> None:
        if pool is not None and (dsn is not None or pool_kwargs):
            raise TypeError("pass either pool= or connection settings, not both")
        self._owns_pool = pool is None and (dsn is not None or bool(pool_kwargs))
        if self._owns_pool:
            pool = ConnectionPool(dsn, **pool_kwargs)
        self._pool: Optional[ConnectionPool] = pool  # None: the default, on first use
        self.retry_reads = retry_reads
        self.read_policy = read_policy or RetryPolicy(
            max_attempts=3, delay=0.05, max_delay=1.0, retry_on=retry_within_call
        )
        self.transaction_policy = transaction_policy or RetryPolicy(
            max_attempts=5, delay=0.02, max_delay=1.0
        )
        if slow_query_ms is None:
            # Only the variable this facade uses: the pool's were read by the pool.
            slow_query_ms = slow_query_ms_from_env()
        self.slow_query_ms = slow_query_ms
        # Per-statement counts cost a lock and a dict update per call; off, nothing.
        self._record = record if query_stats else _ignore

    def __repr__(self) -> str:
        return f"<Database pool={self._pool or 'default'!r}>"

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool this facade borrows from."""
        pool = self._pool
        if pool is None:
            pool = self._pool = default_pool()
        return pool

    def close(self) -> None:
        """Close the pool if this Database made it (``Database(dsn=...)``)."""
        if self._owns_pool and self._pool is not None:
            self._pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------- executor
    def _run(self, st: q.Statement, params: Params, mode: int, write: bool) -> Any:
        pool = self._pool or self.pool
        txs = _open.__dict__.get("txs")  # current_transaction(), inlined: hot path
        if txs:
            tx = txs.get(pool)
            if tx is not None:
                return tx._run(st, params, mode, write)
        conn = pool.acquire()
        try:
            cur = conn.cursor_cache
            if cur is None or cur.closed:
                cur = conn.cursor_cache = conn.cursor()
            text = st.text or st.render(cur)
            t0 = perf_counter()
            try:
                cur.execute(text, params)
                result = FETCH[mode](cur)
            except (psycopg2.Error, ValueError) as exc:
                self._record(text, perf_counter() - t0, True, None)
                raise translate(
                    exc, text, connection=conn, write_in_flight=write
                ) from exc
        finally:
            pool.release(conn)
        self._record(text, perf_counter() - t0, False, self.slow_query_ms)
        return result

    def _read(self, st: q.Statement, params: Params, mode: int) -> Any:
        try:
            return self._run(st, params, mode, False)
        except DatabaseError as exc:
            if (
                not self.retry_reads
                or not retry_within_call(exc)
                or current_transaction(self.pool) is not None
            ):
                raise
            return self.read_policy.call_after_failure(
                exc, lambda: self._run(st, params, mode, False)
            )

    def _call(self, fn: Callable[[Any], T], text: str, write: bool) -> T:
        tx = current_transaction(self.pool)
        if tx is not None:
            return tx._call(fn, text, write)
        with self.pool.connection() as conn:
            t0 = perf_counter()
            try:
                with conn.cursor() as cur:
                    result = fn(cur)
            except (psycopg2.Error, ValueError) as exc:
                self._record(text, perf_counter() - t0, True, None)
                raise translate(
                    exc, text, connection=conn, write_in_flight=write
                ) from exc
            self._record(text, perf_counter() - t0, False, self.slow_query_ms)
            return result

    def _atomic(self, fn: Callable[[Operations], T]) -> T:
        with self.transaction() as tx:
            return fn(tx)
        return cast(T, None)  # fn raised Rollback: the block was rolled back quietly

    def _catalog_pool(self) -> ConnectionPool:
        return self.pool

    def _write(
        self,
        table: str,
        st: q.Statement,
        params: List[Any],
        mode: int,
        data: Mapping[str, Any],
        returning: Any,
    ) -> Any:
        try:
            return self._run(st, params, mode, True)
        except DatabaseError as exc:
            policy = table_policy(table)
            if (
                policy is None
                or current_transaction(self.pool) is not None
                or not is_transient_or_unknown(exc)
                or not all(k in data for k in policy.key)
            ):
                raise
            # Every further attempt is the idempotent form, whatever the first error
            # was: any of them may itself lose its reply after it landed.
            return replace(
                policy.policy, retry_on=is_transient_or_unknown
            ).call_after_failure(
                exc, lambda: self._insert_again(table, data, policy.key, returning, st)
            )

    def _insert_again(
        self,
        table: str,
        data: Mapping[str, Any],
        key: Any,
        returning: Any,
        st: q.Statement,
    ) -> Any:
        """Re-run an insert whose first outcome is unknown, without writing twice."""
        row = self.upsert(table, data, conflict=key, update=())
        if not self._holds(table, key, data):
            raise UniqueViolation(
                f"a row with the same {', '.join(key)} already exists in {table} "
                "with other values; this call did not write it",
                sqlstate="23505",
                statement=st.text,
            )
        if returning is None or returning == "*":
            return None if returning is None else row
        if isinstance(returning, str):
            return row[returning]
        return {c: row[c] for c in returning}

    def _holds(self, table: str, key: Any, data: Mapping[str, Any]) -> bool:
        """Whether the row with ``data``'s key holds exactly ``data``'s values.

        Compared by the server, with the same casts the insert applied (a naive
        datetime into timestamptz, NaN, JSON), not by Python equality of what
        comes back.
        """
        cols = tuple(data)
        composed = sql.SQL(
            "SELECT ROW({}) IS NOT DISTINCT FROM ROW({}) FROM {} WHERE ({}) = ({})"
        ).format(
            sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in cols),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            q.table_identifier(table),
            sql.SQL(", ").join(sql.Identifier(q.identifier(c)) for c in key),
            sql.SQL(", ").join(sql.Placeholder() * len(key)),
        )
        st = q.statement(("holds", table, cols, tuple(key)), lambda: composed)
        params = [*data.values(), *(data[c] for c in key)]
        return bool(self._run(st, params, SCALAR, False))

    def _idempotent_write(self, table: str, st: q.Statement, params: List[Any]) -> int:
        # The facade's updates set absolute values and deletes are idempotent, so on
        # the pipeline's tables one is re-run after a transient error or an unknown
        # outcome: running it twice leaves the same state (its count may differ).
        try:
            return Operations._idempotent_write(self, table, st, params)
        except DatabaseError as exc:
            policy = table_policy(table)
            if (
                policy is None
                or current_transaction(self.pool) is not None
                or not is_transient_or_unknown(exc)
            ):
                raise
            unknown = isinstance(exc, CommitOutcomeUnknown)
            first = exc

            def again() -> int:
                nonlocal unknown
                try:
                    count = Operations._idempotent_write(self, table, st, params)
                except CommitOutcomeUnknown:
                    unknown = True
                    raise
                if count == 0 and unknown:
                    # The earlier attempt may have changed these rows already: "0"
                    # would tell the caller it changed nothing, which may be false.
                    raise CommitOutcomeUnknown(
                        "the connection was lost while this write was in flight, and "
                        "running it again matched no rows: the first attempt may or "
                        "may not have applied it",
                        statement=st.text,
                    ) from first
                return count

            retry = replace(policy.policy, retry_on=is_transient_or_unknown)
            return retry.call_after_failure(exc, again)

    # ---------------------------------------------------- transactions
    def transaction(
        self, isolation: Optional[str] = None, read_only: bool = False
    ) -> TransactionBlock:
        """``with db.transaction() as tx:``: BEGIN ... COMMIT on one connection.

        Rolled back if the block raises (``Rollback`` leaves it quietly). Nested in an
        open transaction of this thread, it is a savepoint of that one.
        ``isolation``: "read committed", "repeatable read" or "serializable".
        """
        return TransactionBlock(
            self.pool, isolation, read_only, self.slow_query_ms, self._record
        )

    def run_in_transaction(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        policy: Optional[RetryPolicy] = None,
        isolation: Optional[str] = None,
        read_only: bool = False,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(tx, *args, **kwargs)`` in a transaction, re-running it on transient
        errors (serialization failures, deadlocks, lost connections) raised before
        COMMIT was sent; return what ``fn`` returns.

        A connection lost during COMMIT raises ``CommitOutcomeUnknown`` and is not
        re-run. Refuses to run inside an open transaction: a retry there could only
        fail, since the open transaction is aborted by the first error.
        """
        if current_transaction(self.pool) is not None:
            raise TransactionError(
                "run_in_transaction() cannot run inside an open transaction: a retry "
                "would run in the same, already aborted, transaction"
            )

        def attempt() -> T:
            with self.transaction(isolation=isolation, read_only=read_only) as tx:
                return fn(tx, *args, **kwargs)
            return cast(T, None)  # fn raised Rollback

        return (policy or self.transaction_policy).call(attempt)

    def current_transaction(self) -> Optional[Transaction]:
        """The transaction this thread has open on this pool, if any."""
        return current_transaction(self.pool)

    # ------------------------------------------------------------ state
    def stats(self, top: Optional[int] = 20) -> Dict[str, Any]:
        """The pool's numbers, the retries of every thread, and the ``top`` statements
        by total time (every statement for ``top=None``)."""
        return {
            "pool": self.pool.stats(),
            "retries": global_stats.snapshot(),
            "queries": query_stats(top),
        }


def _ignore(text: str, elapsed: float, failed: bool, slow_ms: Optional[float]) -> None:
    """The recorder of a Database made with ``query_stats=False``."""
