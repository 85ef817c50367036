"""Transaction: the facade's methods on one held connection, with savepoints.

``with db.transaction() as tx:`` borrows one connection for the block. BEGIN is not a
round trip of its own: it is sent in front of the block's first statement, and a block
that runs nothing sends nothing. COMMIT on a clean exit, ROLLBACK on an exception
(``Rollback`` leaves the block quietly), and the connection goes back to the pool
either way. While the block runs, calls made through the same pool's ``Database`` on
the same thread join it, and a nested ``db.transaction()`` becomes a savepoint.
"""

from __future__ import annotations

import enum
import itertools
import logging
from types import TracebackType
from typing import List, Optional, Type

from psycopg2 import sql

from . import sql as q
from .errors import DatabaseError, InvalidQuery, TransactionError
from .executor import Retrying, TransactionExecutor, joined
from .facade import Facade
from .policies import WritePolicies
from .pool import ConnectionPool, PooledConnection
from .stats import Recorder

__all__ = [
    "Rollback",
    "Savepoint",
    "Transaction",
    "TransactionBlock",
    "TransactionStatus",
    "current_transaction",
]

logger = logging.getLogger("pgaccess.transaction")

_ISOLATION = {
    "read committed": "ISOLATION LEVEL READ COMMITTED",
    "repeatable read": "ISOLATION LEVEL REPEATABLE READ",
    "serializable": "ISOLATION LEVEL SERIALIZABLE",
}


def current_transaction(pool: ConnectionPool) -> Optional[Transaction]:
    """The transaction this thread has open on ``pool``, if any."""
    tx = joined(pool)
    return None if tx is None else tx.facade


def begin_statement(isolation: Optional[str], read_only: bool) -> str:
    """BEGIN with the isolation level and access mode, from fixed words only."""
    parts = ["BEGIN"]
    if isolation is not None:
        level = _ISOLATION.get(
            " ".join(str(isolation).replace("_", " ").lower().split())
        )
        if level is None:
            raise InvalidQuery(
                f"isolation must be one of {sorted(_ISOLATION)}, got {isolation!r}"
            )
        parts.append(level)
    if read_only:
        parts.append("READ ONLY")
    return " ".join(parts)


class TransactionStatus(enum.Enum):
    """Where a transaction is in its life."""

    ACTIVE = TransactionExecutor.ACTIVE
    COMMITTED = TransactionExecutor.COMMITTED
    ROLLED_BACK = TransactionExecutor.ROLLED_BACK


class Rollback(Exception):
    """Raise inside a transaction block to roll it back and leave the block quietly.

    ``raise Rollback()`` rolls back the innermost block; ``raise Rollback(tx)`` is only
    swallowed by the block of ``tx``.
    """

    def __init__(self, transaction: Optional[Transaction] = None) -> None:
        super().__init__(transaction)
        self.transaction = transaction


class Savepoint:
    """A savepoint; as a context manager, rolled back to if its block raises."""

    def __init__(self, tx: Transaction, name: str) -> None:
        self.tx = tx
        self.name = name

    def __enter__(self) -> Savepoint:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        if exc_type is None:
            self.tx.release_savepoint(self.name)
            return False
        if self.tx.status is TransactionStatus.ACTIVE and not self.tx.executor.dead:
            try:
                self.tx.rollback_to_savepoint(self.name)
                self.tx.release_savepoint(self.name)
            except DatabaseError:
                logger.warning(
                    "could not roll back to savepoint %r", self.name, exc_info=True
                )
        # Only a bare Rollback() stops here. Rollback(tx) names the transaction, whose
        # own block must end (rolled back) even when raised inside a savepoint block
        # or a nested db.transaction() (which yields the same tx).
        return isinstance(exc, Rollback) and exc.transaction is None


class Transaction(Facade):
    """Statements on one held connection; every facade method, plus savepoints.

    Made by ``Database.transaction()``; not thread-safe (use it from the thread that
    opened it). After the block ends, using it raises ``TransactionError``.
    """

    _names = itertools.count(1)

    def __init__(self, executor: TransactionExecutor, policies: WritePolicies) -> None:
        super().__init__(Retrying(executor), policies, None)
        self.executor = executor
        executor.facade = self
        self._savepoints: List[str] = []

    def __repr__(self) -> str:
        return f"<Transaction {self.status.value} on pool {self.executor.pool.name!r}>"

    @property
    def status(self) -> TransactionStatus:
        """Active, committed or rolled back."""
        return TransactionStatus(self.executor.status)

    @property
    def connection(self) -> PooledConnection:
        """The held psycopg2 connection (for what the facade does not cover)."""
        self.executor.check()
        self.executor.begin_now()
        return self.executor.conn

    # ------------------------------------------------------- savepoints
    def _savepoint_sql(self, template: str, name: str) -> None:
        self.executor.check()
        ident = sql.Identifier(q.identifier(name, "savepoint"))
        self.executor.command(
            sql.SQL(template).format(ident).as_string(self.executor.conn)
        )

    def savepoint(self, name: Optional[str] = None) -> Savepoint:
        """Set a savepoint now; usable as ``with tx.savepoint("step"):`` too.

        As a context manager, the block's exception rolls back to the savepoint (then
        propagates); a clean exit releases it. Names are validated and quoted.
        """
        if name is None:
            name = f"pgaccess_sp_{next(self._names)}"
        self._savepoint_sql("SAVEPOINT {}", name)
        self._savepoints.append(name)
        return Savepoint(self, name)

    def rollback_to_savepoint(self, name: str) -> None:
        """Undo everything done since savepoint ``name``; the savepoint stays set."""
        self._savepoint_sql("ROLLBACK TO SAVEPOINT {}", name)

    def release_savepoint(self, name: str) -> None:
        """Forget savepoint ``name`` (and those after it), keeping their work."""
        self._savepoint_sql("RELEASE SAVEPOINT {}", name)
        if name in self._savepoints:
            del self._savepoints[self._savepoints.index(name) :]


class TransactionBlock:
    """``with db.transaction()``: a new transaction, or a savepoint of the open one."""

    def __init__(
        self,
        pool: ConnectionPool,
        isolation: Optional[str],
        read_only: bool,
        record: Recorder,
        policies: WritePolicies,
    ) -> None:
        self._pool = pool
        self._record = record
        self._policies = policies
        self._begin = begin_statement(isolation, read_only)
        self._explicit = isolation is not None or read_only
        self._tx: Optional[Transaction] = None
        self._savepoint: Optional[Savepoint] = None

    def __enter__(self) -> Transaction:
        outer = current_transaction(self._pool)
        if outer is not None:
            if self._explicit:
                raise TransactionError(
                    "a transaction is already open on this thread; a nested block is a "
                    "savepoint of it and cannot set its own isolation or read_only"
                )
            self._savepoint = outer.savepoint()
            self._tx = outer
            return outer
        conn = self._pool.acquire()
        try:
            executor = TransactionExecutor(self._pool, conn, self._begin, self._record)
            tx = Transaction(executor, self._policies)
        except BaseException:
            self._pool.release(conn)  # nothing was sent: the slot goes back at once
            raise
        self._tx = tx
        executor.enter()
        return tx

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        tx = self._tx
        assert tx is not None
        if self._savepoint is not None:
            return self._savepoint.__exit__(exc_type, exc, tb)
        executor = tx.executor
        try:
            executor.__exit__(exc_type)
        finally:
            executor.leave()
            self._pool.release(executor.conn)
        return isinstance(exc, Rollback) and exc.transaction in (None, tx)
