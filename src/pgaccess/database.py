"""Database: the facade on a pool. Each call is one autocommit statement.

``find_one``, ``insert``, ``count``, ... (``facade.py``) build their statement once per
shape, borrow a connection, run one statement, and give it back: one round trip, no
BEGIN/COMMIT. Inside ``with db.transaction()`` on the same thread, the same calls join
the open transaction instead.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, TypeVar, cast

from .config import slow_query_ms_from_env
from .connector import PREFER_STANDBY, PRIMARY, STANDBY, dsn_parameters
from .default import default_pool
from .errors import TransactionError
from .executor import Autocommit, Retrying
from .facade import Facade
from .policies import PIPELINE, WritePolicies
from .pool import ConnectionPool
from .retry import READ, TRANSIENT, RetryPolicy, global_stats
from .routing import ReadRouter, StandbyReads, WriteMarks, lsn_int
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

    ``read_dsn=`` (standbys) gives the reads outside a transaction a pool of their
    own, ``read_pool_kwargs`` its settings (the write pool's ``maxconn``, ``timeout``
    and ``statement_timeout`` by default); its connections must be standbys, else the
    primary (``target_session_attrs=prefer-standby`` unless the DSN says otherwise).
    With ``read_your_writes`` (the default), a thread reads its own writes: see
    ``routing.py``; ``read_wait`` is how long a read waits for a lagging standby
    before it goes to the primary. The write pool then needs a primary.

    ``session_dsn=``: where what needs a session goes (the Worker's LISTEN) when
    ``dsn`` is a transaction-mode pooler (``pooler="transaction"``, which also makes
    ``execute`` refuse session state: SET, LISTEN, session advisory locks, ...).
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
        read_dsn: Optional[str] = None,
        read_pool: Optional[ConnectionPool] = None,
        read_your_writes: bool = True,
        read_wait: float = 0.25,
        read_pool_kwargs: Optional[Dict[str, Any]] = None,
        session_dsn: Optional[str] = None,
        **pool_kwargs: Any,
    ) -> None:
        if pool is not None and (dsn is not None or pool_kwargs):
            raise TypeError("pass either pool= or connection settings, not both")
        if read_pool is not None and (read_dsn is not None or read_pool_kwargs):
            raise TypeError("pass either read_pool= or read_dsn=, not both")
        if not read_wait >= 0:
            raise ValueError(f"read_wait must be >= 0 seconds, got {read_wait}")
        replicas = read_dsn is not None or read_pool is not None
        if replicas and "role" not in pool_kwargs and pool is None:
            # Writes need the primary: checked after connect, a pooler cannot fool it.
            pool_kwargs["role"] = PRIMARY
        if not isinstance(write_policies, WritePolicies):
            raise TypeError(
                "write_policies must be a WritePolicies, got "
                f"{type(write_policies).__name__}"
            )
        self._owns_pool = pool is None and (dsn is not None or bool(pool_kwargs))
        if self._owns_pool:
            pool = ConnectionPool(dsn, **pool_kwargs)
        self._given_pool = pool
        #: A DSN that reaches the server directly or through a session-mode pooler,
        #: for what needs a session of its own (the Worker's LISTEN) when ``dsn`` is
        #: a transaction-mode pooler.
        self.session_dsn = session_dsn
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
        primary = Retrying(self._autocommit)
        self._owns_read_pool = read_pool is None and read_dsn is not None
        if read_dsn is not None:
            read_pool = ConnectionPool(read_dsn, **_read_pool_settings(
                read_dsn, self.pool, read_pool_kwargs or {}
            ))  # fmt: skip
        self.read_pool = read_pool
        #: The read executor (None without a read pool): its ``lagging`` and
        #: ``refused`` count the reads the primary served instead.
        self.router: Optional[ReadRouter] = None
        self._marks: Optional[WriteMarks] = None
        if read_pool is not None:
            if read_your_writes:
                self._marks = self.pool.writes = WriteMarks()
            reads = StandbyReads(
                read_pool, self._record, self.pool, self._marks, read_wait
            )
            self.router = ReadRouter(primary, Retrying(reads))
        super().__init__(
            primary,
            write_policies,
            self.read_policy if retry_reads else None,
            self.router,
        )

    def __repr__(self) -> str:
        return f"<Database pool={self._given_pool or 'default'!r}>"

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool this facade borrows from."""
        return self._autocommit.pool

    def close(self) -> None:
        """Close the pools this Database made (``Database(dsn=..., read_dsn=...)``)."""
        if self._owns_pool:
            self.pool.close()
        if self._owns_read_pool and self.read_pool is not None:
            self.read_pool.close()

    # ------------------------------------------------------- read-your-writes
    def write_token(self) -> str:
        """Where this thread's writes end in the primary's WAL, as a token for
        ``read_after`` in another thread or process ('0/0' with no read pool)."""
        if self._marks is None:
            return "0/0"
        lsn = self._marks.required(self.pool)
        return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"

    def read_after(self, token: str) -> None:
        """Make this thread's reads see what was written up to ``token`` (from
        ``write_token``, maybe another process's): they wait for a standby that has
        replayed it, or go to the primary."""
        if self._marks is not None:
            self._marks.require(lsn_int(token))

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
        result = {
            "pool": self.pool.stats(),
            "retries": global_stats.snapshot(),
            "queries": query_stats(top),
        }
        if self.read_pool is not None and self.router is not None:
            result["read_pool"] = dict(
                self.read_pool.stats(),
                lagging_reads=self.router.lagging,
                writing_reads=self.router.refused,
            )
        return result


def _read_pool_settings(
    read_dsn: str, primary: ConnectionPool, given: Dict[str, Any]
) -> Dict[str, Any]:
    """The read pool's settings: the write pool's size, timeouts, then ``given``."""
    target = dsn_parameters(read_dsn).get("target_session_attrs", "")
    settings: Dict[str, Any] = {
        "maxconn": primary.maxconn,
        "timeout": primary.timeout,
        "statement_timeout": primary.settings.statement_timeout_ms,
        "name": f"{primary.name}-reads",
        "role": STANDBY if target in ("standby", "read-only") else PREFER_STANDBY,
    }
    settings.update(given)
    return settings
