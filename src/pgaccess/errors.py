"""pgaccess's exceptions, and the one place psycopg2's errors are translated into them.

The hierarchy (the review checklist)::

    DatabaseError                      every error pgaccess raises
    ├── InvalidQuery (ValueError)      bad input caught before any SQL was sent
    ├── TransactionError               a transaction used the wrong way
    ├── MigrationError                 a schema migration could not be applied
    │   └── SchemaVersionError         the schema is older than this pgaccess needs
    ├── OperationalError               the server or the connection, not the statement
    │   ├── PoolError
    │   │   ├── PoolTimeout            no connection free within the timeout
    │   │   └── PoolClosed             the pool was closed
    │   ├── ConnectionFailed           could not connect (08xxx, 57P03, 53300)
    │   ├── ConnectionLost             the connection died while in use
    │   │   └── CommitOutcomeUnknown   ... while a COMMIT or autocommit write was sent
    │   ├── QueryCanceled              57014: statement_timeout or a cancel
    │   ├── ReadOnlyNode               25006: a write refused by a standby (failover)
    │   └── TransactionRollback        40xxx
    │       ├── SerializationFailure   40001
    │       └── DeadlockDetected       40P01
    ├── IntegrityError                 23xxx
    │   ├── NotNullViolation           23502
    │   ├── ForeignKeyViolation        23503
    │   ├── UniqueViolation            23505
    │   └── CheckViolation             23514
    ├── DataError                      22xxx: a value the column cannot take
    └── ProgrammingError               42xxx: the statement itself is wrong
        ├── UnknownTable               42P01
        └── UnknownColumn              42703

Every translated error carries ``sqlstate`` (None when the server sent none, as for a
dead connection), ``statement`` (the SQL text, never the parameter values) and chains
the psycopg2 error as ``__cause__``. Decisions are made by SQLSTATE, never by message
text; a dead connection is recognised by ``conn.closed != 0`` (psycopg2 reports those
as ``OperationalError`` with no pgcode at all).
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Type

import psycopg2

__all__ = [
    "CheckViolation",
    "CommitOutcomeUnknown",
    "ConnectionFailed",
    "ConnectionLost",
    "DataError",
    "DatabaseError",
    "DeadlockDetected",
    "ForeignKeyViolation",
    "IntegrityError",
    "InvalidQuery",
    "MigrationError",
    "NotNullViolation",
    "OperationalError",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ProgrammingError",
    "QueryCanceled",
    "ReadOnlyNode",
    "SchemaVersionError",
    "SerializationFailure",
    "TransactionError",
    "TransactionRollback",
    "UniqueViolation",
    "UnknownColumn",
    "UnknownTable",
    "suggest",
    "translate",
]

_STATEMENT_SHOWN = 500  # characters of the statement kept in the message


class DatabaseError(Exception):
    """Base of every pgaccess error."""

    sqlstate: Optional[str]
    statement: Optional[str]

    def __init__(
        self,
        message: str,
        *,
        sqlstate: Optional[str] = None,
        statement: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.statement = statement

    def __str__(self) -> str:
        text = str(self.args[0]) if self.args else ""
        if self.sqlstate:
            text += f" (SQLSTATE {self.sqlstate})"
        if self.statement:
            stmt = " ".join(self.statement.split())
            if len(stmt) > _STATEMENT_SHOWN:
                stmt = stmt[:_STATEMENT_SHOWN] + " ..."
            text += f"\n  statement: {stmt}"
        return text

    def __reduce__(self) -> Any:
        # Keep the keyword-only attributes across pickling (multiprocessing workers).
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: Type[DatabaseError], args: Any, state: Dict[str, Any]
) -> DatabaseError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class InvalidQuery(DatabaseError, ValueError):
    """Bad input (a name, a where clause, an order_by, ...) rejected before any SQL."""


class TransactionError(DatabaseError):
    """A transaction used the wrong way: finished, or retried inside another."""


class MigrationError(DatabaseError):
    """A migration could not be applied; the database stays at the version before it."""


class SchemaVersionError(MigrationError):
    """The database's schema is older than this pgaccess needs: run ``pgaccess
    migrate``."""


class OperationalError(DatabaseError):
    """A problem with the server or the connection rather than with the statement."""


class PoolError(OperationalError):
    """A problem of the connection pool."""


class PoolTimeout(PoolError):
    """No connection became free within the pool's timeout."""


class PoolClosed(PoolError):
    """The pool was closed; a closed pool cannot be reopened."""


class ConnectionFailed(OperationalError):
    """A new connection could not be made (server down, refusing, or full)."""


class ConnectionLost(OperationalError):
    """The connection died while in use; the statement may or may not have run."""


class CommitOutcomeUnknown(ConnectionLost):
    """The connection died while a COMMIT or an autocommit write was in flight.

    The write may have been applied or not; pgaccess cannot tell, so it never retries
    one blindly. Re-run it only if it is idempotent.
    """


class QueryCanceled(OperationalError):
    """The statement was canceled: statement_timeout, or a cancel request."""


class ReadOnlyNode(OperationalError):
    """25006: the server refused a write because it is read-only, nothing was written.

    Outside a transaction this means the connection reached a standby: a failover
    moved the primary, or a pooler sent the connection to the wrong node. The pool
    then reconnects every connection and the write is tried again (see the README's
    "Scaling out"). Inside ``SET TRANSACTION READ ONLY`` it is the caller's own doing.
    """

    #: Whether the pool reconnected every connection after it (a pool for writes
    #: does; a read pool, on a standby by design, does not): only then is it retried.
    reconnected = False


class TransactionRollback(OperationalError):
    """The server rolled the transaction back; running it again may succeed."""


class SerializationFailure(TransactionRollback):
    """40001: could not serialize access due to concurrent update."""


class DeadlockDetected(TransactionRollback):
    """40P01: the server broke a deadlock by aborting this transaction."""


class IntegrityError(DatabaseError):
    """A constraint rejected the write."""


class NotNullViolation(IntegrityError):
    """23502: a NOT NULL column got no value."""


class ForeignKeyViolation(IntegrityError):
    """23503: a referenced row does not exist (or is still referenced)."""


class UniqueViolation(IntegrityError):
    """23505: a unique key already exists."""


class CheckViolation(IntegrityError):
    """23514: a CHECK constraint rejected the row."""


class DataError(DatabaseError):
    """22xxx: a value the column cannot take (wrong type, out of range, NUL, ...)."""


class ProgrammingError(DatabaseError):
    """The statement itself is wrong (syntax, an object that does not exist, ...)."""


class UnknownTable(ProgrammingError):
    """42P01: the table does not exist."""


class UnknownColumn(ProgrammingError):
    """42703: a column does not exist."""


# The exact SQLSTATEs first, then the class (first two characters).
_BY_SQLSTATE: Dict[str, Type[DatabaseError]] = {
    "23502": NotNullViolation,
    "23503": ForeignKeyViolation,
    "23505": UniqueViolation,
    "23514": CheckViolation,
    "40001": SerializationFailure,
    "40P01": DeadlockDetected,
    "42P01": UnknownTable,
    "42703": UnknownColumn,
    "57014": QueryCanceled,
    "25006": ReadOnlyNode,
    "57P01": ConnectionLost,  # admin_shutdown: pg_terminate_backend, fast shutdown
    "57P02": ConnectionLost,  # crash_shutdown
    "57P03": ConnectionFailed,  # cannot_connect_now: starting up or shutting down
    "53300": ConnectionFailed,  # too_many_connections
}
_BY_CLASS: Dict[str, Type[DatabaseError]] = {
    "08": ConnectionLost,
    "22": DataError,
    "23": IntegrityError,
    "40": TransactionRollback,
    "42": ProgrammingError,
    "53": OperationalError,
    "57": OperationalError,
    "58": OperationalError,
}


def translate(
    exc: BaseException,
    statement: Optional[str] = None,
    *,
    connection: Any = None,
    write_in_flight: bool = False,
) -> DatabaseError:
    """The pgaccess error for a psycopg2 error; the caller raises it ``from exc``.

    ``connection`` tells a dead connection from a statement error (``closed != 0``);
    ``write_in_flight`` says a COMMIT or autocommit write was being sent, so a lost
    connection means the outcome is unknown.
    """
    if isinstance(exc, DatabaseError):
        return exc
    sqlstate: Optional[str] = getattr(exc, "pgcode", None)
    message = _primary_message(exc)
    dead = connection is not None and bool(getattr(connection, "closed", 0))
    cls: Type[DatabaseError]
    if dead or (
        sqlstate is None
        and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
    ):
        cls = CommitOutcomeUnknown if write_in_flight else ConnectionLost
    elif sqlstate is not None:
        cls = _BY_SQLSTATE.get(sqlstate) or _BY_CLASS.get(sqlstate[:2], DatabaseError)
    elif isinstance(exc, psycopg2.DataError):
        cls = DataError
    elif isinstance(exc, psycopg2.ProgrammingError):
        cls = ProgrammingError
        if message.startswith("can't adapt type 'dict'"):
            message += (
                ": a dict meant for a json or jsonb column goes in "
                "psycopg2.extras.Json(value)"
            )
    elif isinstance(exc, (ValueError, TypeError)):
        # psycopg2 raises these for values it cannot adapt, e.g. a NUL byte in a string.
        cls = DataError
    else:
        cls = DatabaseError
    return cls(message, sqlstate=sqlstate, statement=statement)


def _primary_message(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        detail = getattr(diag, "message_detail", None)
        return f"{primary}: {detail}" if detail else str(primary)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def suggest(name: str, candidates: Iterable[str]) -> List[str]:
    """The candidates closest to ``name``, best first (for "did you mean ...?")."""
    pool: Sequence[str] = sorted(set(candidates))
    return difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
