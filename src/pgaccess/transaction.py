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
import threading
from time import perf_counter as _clock
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Type, TypeVar

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql

from . import sql as q
from .errors import (
    DatabaseError,
    InvalidQuery,
    TransactionError,
    translate,
)
from .operations import FETCH, Operations, Params, record
from .pool import ConnectionPool, PooledConnection

__all__ = [
    "Rollback",
    "Savepoint",
    "Transaction",
    "TransactionBlock",
    "TransactionStatus",
    "current_transaction",
]

logger = logging.getLogger("pgaccess.transaction")

T = TypeVar("T")
Recorder = Callable[[str, float, bool, Optional[float]], None]

_ISOLATION = {
    "read committed": "ISOLATION LEVEL READ COMMITTED",
    "repeatable read": "ISOLATION LEVEL REPEATABLE READ",
    "serializable": "ISOLATION LEVEL SERIALIZABLE",
}

# The open transactions of this thread: {pool: Transaction}.
_local = threading.local()


def current_transaction(pool: ConnectionPool) -> Optional[Transaction]:
    """The transaction this thread has open on ``pool``, if any."""
    txs: Optional[Dict[ConnectionPool, Transaction]] = _local.__dict__.get("txs")
    return txs.get(pool) if txs else None


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

    ACTIVE = "active"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"


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
        if self.tx.status is TransactionStatus.ACTIVE and not self.tx._dead():
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


class Transaction(Operations):
    """Statements on one held connection; every facade method, plus savepoints.

    Made by ``Database.transaction()``; not thread-safe (use it from the thread that
    opened it). After the block ends, using it raises ``TransactionError``.
    """

    _names = itertools.count(1)

    def __init__(
        self,
        pool: ConnectionPool,
        conn: PooledConnection,
        begin: str,
        slow_query_ms: Optional[float],
        recorder: Recorder = record,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._record = recorder
        self._cur = conn.cursor()
        self._pending_begin: Optional[str] = begin
        self._slow_ms = slow_query_ms
        self._savepoints: List[str] = []
        self.status = TransactionStatus.ACTIVE

    def __repr__(self) -> str:
        return f"<Transaction {self.status.value} on pool {self._pool.name!r}>"

    @property
    def connection(self) -> PooledConnection:
        """The held psycopg2 connection (for what the facade does not cover)."""
        self._check()
        self._flush_begin()
        return self._conn

    # -------------------------------------------------------- executor
    def _check(self) -> None:
        if self.status is not TransactionStatus.ACTIVE:
            raise TransactionError(
                f"the transaction is {self.status.value}; open a new one"
            )

    def _dead(self) -> bool:
        return bool(self._conn.closed)

    def _flush_begin(self) -> None:
        begin = self._pending_begin
        if begin is not None:
            self._pending_begin = None
            self._exec(begin, None)

    def _exec(self, text: str, params: Params) -> Any:
        try:
            self._cur.execute(text, params)
        except (psycopg2.Error, ValueError) as exc:
            raise translate(exc, text, connection=self._conn) from exc

    def _run(self, st: q.Statement, params: Params, mode: int, write: bool) -> Any:
        if self.status is not TransactionStatus.ACTIVE:
            self._check()
        cur = self._cur
        text = st.text or st.render(cur)
        begin = self._pending_begin
        if begin is not None:
            # One round trip for BEGIN and the first statement (simple query protocol).
            self._pending_begin = None
            sent = f"{begin}; {text}"
        else:
            sent = text
        t0 = _clock()
        try:
            cur.execute(sent, params)
            result = FETCH[mode](cur)
        except BaseException as exc:
            if begin is not None and (
                self._conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
            ):
                # BEGIN did not run either: a parse error fails the whole "BEGIN; ..."
                # string, a value psycopg2 cannot adapt fails before sending. Keep
                # BEGIN pending, or the block's next statements would autocommit.
                self._pending_begin = begin
            if not isinstance(exc, (psycopg2.Error, ValueError)):
                raise
            self._record(text, _clock() - t0, True, None)
            raise translate(exc, text, connection=self._conn) from exc
        self._record(text, _clock() - t0, False, self._slow_ms)
        return result

    def _call(self, fn: Callable[[Any], T], text: str, write: bool) -> T:
        self._check()
        self._flush_begin()
        t0 = _clock()
        try:
            result = fn(self._cur)
        except (psycopg2.Error, ValueError) as exc:
            self._record(text, _clock() - t0, True, None)
            raise translate(exc, text, connection=self._conn) from exc
        self._record(text, _clock() - t0, False, self._slow_ms)
        return result

    def _atomic(self, fn: Callable[[Operations], T]) -> T:
        return fn(self)

    def _catalog_pool(self) -> ConnectionPool:
        return self._pool

    # ------------------------------------------------------- savepoints
    def savepoint(self, name: Optional[str] = None) -> Savepoint:
        """Set a savepoint now; usable as ``with tx.savepoint("step"):`` too.

        As a context manager, the block's exception rolls back to the savepoint (then
        propagates); a clean exit releases it. Names are validated and quoted.
        """
        self._check()
        if name is None:
            name = f"pgaccess_sp_{next(self._names)}"
        ident = sql.Identifier(q.identifier(name, "savepoint"))
        self._flush_begin()
        self._exec(sql.SQL("SAVEPOINT {}").format(ident).as_string(self._cur), None)
        self._savepoints.append(name)
        return Savepoint(self, name)

    def rollback_to_savepoint(self, name: str) -> None:
        """Undo everything done since savepoint ``name``; the savepoint stays set."""
        self._check()
        ident = sql.Identifier(q.identifier(name, "savepoint"))
        self._exec(
            sql.SQL("ROLLBACK TO SAVEPOINT {}").format(ident).as_string(self._cur), None
        )

    def release_savepoint(self, name: str) -> None:
        """Forget savepoint ``name`` (and those after it), keeping their work."""
        self._check()
        ident = sql.Identifier(q.identifier(name, "savepoint"))
        self._exec(
            sql.SQL("RELEASE SAVEPOINT {}").format(ident).as_string(self._cur), None
        )
        if name in self._savepoints:
            del self._savepoints[self._savepoints.index(name) :]

    # ----------------------------------------------------------- finish
    def _commit(self) -> None:
        if self._pending_begin is not None:  # nothing was run: nothing to commit
            self._pending_begin = None
            self.status = TransactionStatus.COMMITTED
            return
        conn = self._conn
        if conn.get_transaction_status() == ext.TRANSACTION_STATUS_INERROR:
            # COMMIT of a failed transaction silently rolls back; say so instead.
            self._rollback()
            raise TransactionError(
                "a statement in the transaction failed (and the error was caught "
                "inside the block), so the transaction was rolled back, not committed"
            )
        try:
            self._cur.execute("COMMIT")
        except (psycopg2.Error, ValueError) as exc:
            self.status = TransactionStatus.ROLLED_BACK
            err = translate(exc, "COMMIT", connection=conn, write_in_flight=True)
            raise err from exc
        self.status = TransactionStatus.COMMITTED

    def _rollback(self) -> None:
        self.status = TransactionStatus.ROLLED_BACK
        if self._pending_begin is not None or self._conn.closed:
            self._pending_begin = None
            return
        try:
            self._cur.execute("ROLLBACK")
        except psycopg2.Error:
            # Never hide the error that caused the rollback; the pool discards the
            # connection if it is broken.
            logger.warning("ROLLBACK failed", exc_info=True)


class TransactionBlock:
    """``with db.transaction()``: a new transaction, or a savepoint of the open one."""

    def __init__(
        self,
        pool: ConnectionPool,
        isolation: Optional[str],
        read_only: bool,
        slow_query_ms: Optional[float],
        recorder: Recorder = record,
    ) -> None:
        self._pool = pool
        self._record = recorder
        self._begin = begin_statement(isolation, read_only)
        self._explicit = isolation is not None or read_only
        self._slow_ms = slow_query_ms
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
        tx = self._tx = Transaction(
            self._pool, conn, self._begin, self._slow_ms, self._record
        )
        txs = _local.__dict__.setdefault("txs", {})
        txs[self._pool] = tx
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
        try:
            if exc_type is None:
                tx._commit()
            else:
                tx._rollback()
        finally:
            _local.__dict__["txs"].pop(self._pool, None)
            self._pool.release(tx._conn)
        return isinstance(exc, Rollback) and exc.transaction in (None, tx)
