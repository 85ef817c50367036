"""Database: the facade on a pool. Each call is one autocommit statement.

``find_one``, ``insert``, ``count``, ... (``facade.py``) build their statement once per
shape, borrow a connection, run one statement, and give it back: one round trip, no
BEGIN/COMMIT. Inside ``with db.transaction()`` on the same thread, the same calls join
the open transaction instead.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, TypeVar, cast

from .config import slow_query_ms_from_env
from .default import default_pool
from .errors import TransactionError
from .executor import Autocommit, Retrying
from .facade import Facade
from .policies import PIPELINE, WritePolicies
from .pool import ConnectionPool
from .retry import READ, TRANSIENT, RetryPolicy, global_stats
from .stats import Recorder, query_stats
from .transaction import Transaction, TransactionBlock, current_transaction

__all__ = ["Database"]

T = TypeVar("T")


class Database(Facade):
    """The facade of the usage guide: ``insert``, ``find_one``, ``update``, ...

    ``Database()`` uses the default pool (from ``PGACCESS_DSN`` / ``DATABASE_URL``),
    ``Database(dsn=...)`` makes a pool of its own, ``Database(pool=...)`` shares one.
    Thread-safe: share one instance between threads. Reads (``find_one``,
    ``find_many``, ``count``, ``exists``, a SELECT through ``execute``) are retried on
    transient errors outside transactions (``read_policy``); writes are re-run only
    where ``write_policies`` say that is safe (the pipeline's tables by default: see
    ``policies.py``).
    """

    def __init__(
        self,
        dsn: Optional[str] = None,
        *,
        pool: Optional[ConnectionPool] = None,
        retry_reads: bool = True,
        read_policy: Optional[RetryPolicy] = None,
        transaction_policy: Optional[RetryPolicy] = None,
        write_policies: WritePolicies = PIPELINE,
        slow_query_ms: Optional[float] = None,
        query_stats: bool = True,
        **pool_kwargs: Any,
    ) -> None:
        if pool is not None and (dsn is not None or pool_kwargs):
            raise TypeError("pass either pool= or connection settings, not both")
        if not isinstance(write_policies, WritePolicies):
            raise TypeError(
                "write_policies must be a WritePolicies, got "
                f"{type(write_policies).__name__}"
            )
        self._owns_pool = pool is None and (dsn is not None or bool(pool_kwargs))
        if self._owns_pool:
            pool = ConnectionPool(dsn, **pool_kwargs)
        self._given_pool = pool
        self.retry_reads = retry_reads
        self.read_policy = read_policy or RetryPolicy(
            max_attempts=3, delay=0.05, max_delay=1.0, retry_on=READ
        )
        self.transaction_policy = transaction_policy or RetryPolicy(
            max_attempts=5, delay=0.02, max_delay=1.0, retry_on=TRANSIENT
        )
        if slow_query_ms is None:
            # Only the variable this facade uses: the pool's were read by the pool.
            slow_query_ms = slow_query_ms_from_env()
        self.slow_query_ms = slow_query_ms
        self._record = Recorder(counting=query_stats, slow_query_ms=slow_query_ms)
        # pool None: the default pool, made on first use (importing never connects).
        self._autocommit = Autocommit(pool, self._record, default_pool)
        super().__init__(
            Retrying(self._autocommit),
            write_policies,
            self.read_policy if retry_reads else None,
        )

    def __repr__(self) -> str:
        return f"<Database pool={self._given_pool or 'default'!r}>"

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool this facade borrows from."""
        return self._autocommit.pool

    def close(self) -> None:
        """Close the pool if this Database made it (``Database(dsn=...)``)."""
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            self.pool, isolation, read_only, self._record, self.write_policies
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
