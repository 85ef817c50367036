"""pgaccess: thread-pooled PostgreSQL access for multithreaded Python worker scripts.

Importing pgaccess never connects: the default pool is created on first use.
"""

from .database import Database
from .default import db_pool
from .errors import (
    CheckViolation,
    CommitOutcomeUnknown,
    ConnectionFailed,
    ConnectionLost,
    DatabaseError,
    DataError,
    DeadlockDetected,
    ForeignKeyViolation,
    IntegrityError,
    InvalidQuery,
    MigrationError,
    NotNullViolation,
    OperationalError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ProgrammingError,
    QueryCanceled,
    ReadOnlyNode,
    SchemaVersionError,
    SerializationFailure,
    TransactionError,
    TransactionRollback,
    UniqueViolation,
    UnknownColumn,
    UnknownTable,
)
from .jobs import Highlights, JobBusy, JobHandle, JobLost, Metrics, VideoJobs, Worker
from .policies import WritePolicies, WritePolicy
from .pool import ConnectionPool
from .retry import RetryPolicy, is_transient, retrying, with_retry
from .transaction import Rollback, Savepoint, Transaction, TransactionStatus

__version__ = "0.1.0"

__all__ = [
    "CheckViolation",
    "CommitOutcomeUnknown",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionPool",
    "DataError",
    "Database",
    "DatabaseError",
    "DeadlockDetected",
    "ForeignKeyViolation",
    "Highlights",
    "IntegrityError",
    "InvalidQuery",
    "JobBusy",
    "JobHandle",
    "JobLost",
    "Metrics",
    "MigrationError",
    "NotNullViolation",
    "OperationalError",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "ProgrammingError",
    "QueryCanceled",
    "ReadOnlyNode",
    "RetryPolicy",
    "Rollback",
    "Savepoint",
    "SchemaVersionError",
    "SerializationFailure",
    "Transaction",
    "TransactionError",
    "TransactionRollback",
    "TransactionStatus",
    "UniqueViolation",
    "UnknownColumn",
    "UnknownTable",
    "VideoJobs",
    "Worker",
    "WritePolicies",
    "WritePolicy",
    "db_pool",
    "is_transient",
    "retrying",
    "with_retry",
]

# Public classes report under pgaccess, as httpx and psycopg do.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "pgaccess"
del _name, _obj
