"""The exception hierarchy, without a server: every class a DatabaseError, where each
sits, and that each survives pickling (for multiprocessing)."""

from __future__ import annotations

import inspect
import pickle
from typing import List

import pytest
from support.pickling import check_pickle

import pgaccess
import pgaccess.errors
from pgaccess import (
    CheckViolation,
    DatabaseError,
    DataError,
    DeadlockDetected,
    ForeignKeyViolation,
    IntegrityError,
    NotNullViolation,
    OperationalError,
    ProgrammingError,
    QueryCanceled,
    SerializationFailure,
    TransactionRollback,
    UniqueViolation,
    UnknownColumn,
    UnknownTable,
)


def _exported_exceptions() -> List[type]:
    found = []
    for name in pgaccess.__all__:
        obj = getattr(pgaccess, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            found.append(obj)
    return found


def test_every_error_is_a_database_error() -> None:
    exported = _exported_exceptions()
    assert len(exported) >= 20
    for cls in exported:
        if cls is pgaccess.Rollback:  # a signal to leave a block, not an error
            continue
        assert issubclass(cls, DatabaseError), cls
        assert cls.__module__ == "pgaccess"
    defined = [
        obj
        for _, obj in inspect.getmembers(pgaccess.errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == "pgaccess"
    ]
    assert set(defined) <= set(exported)
    assert all(issubclass(c, DatabaseError) for c in defined)


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        (pgaccess.InvalidQuery, ValueError),
        (pgaccess.PoolTimeout, pgaccess.PoolError),
        (pgaccess.PoolClosed, pgaccess.PoolError),
        (pgaccess.PoolError, OperationalError),
        (pgaccess.ConnectionFailed, OperationalError),
        (pgaccess.ConnectionLost, OperationalError),
        (pgaccess.CommitOutcomeUnknown, pgaccess.ConnectionLost),
        (QueryCanceled, OperationalError),
        (TransactionRollback, OperationalError),
        (SerializationFailure, TransactionRollback),
        (DeadlockDetected, TransactionRollback),
        (NotNullViolation, IntegrityError),
        (ForeignKeyViolation, IntegrityError),
        (UniqueViolation, IntegrityError),
        (CheckViolation, IntegrityError),
        (UnknownTable, ProgrammingError),
        (UnknownColumn, ProgrammingError),
        (DataError, DatabaseError),
        (pgaccess.TransactionError, DatabaseError),
    ],
)
def test_hierarchy(child: type, parent: type) -> None:
    assert issubclass(child, parent)


@pytest.mark.parametrize("cls", _exported_exceptions(), ids=lambda c: c.__name__)
def test_constructed_errors_pickle(cls: type) -> None:
    if cls is pgaccess.Rollback:
        again = pickle.loads(pickle.dumps(cls()))
        assert type(again) is cls and again.transaction is None
        return
    if cls is pgaccess.JobLost:
        lost = cls(7, "w1", "complete", "processing", "w2")
        again = pickle.loads(pickle.dumps(lost))
        assert type(again) is cls and str(again) == str(lost)
        assert (again.job_id, again.worker_id, again.holder) == (7, "w1", "w2")
        return
    if cls is pgaccess.JobBusy:
        busy = cls("abc", "processing", "w2")
        again = pickle.loads(pickle.dumps(busy))
        assert type(again) is cls and str(again) == str(busy)
        assert (again.src_hash, again.status) == ("abc", "processing")
        assert again.holder == "w2"
        return
    err = cls("something failed", sqlstate="XX000", statement="SELECT %s")
    check_pickle(err)
    assert str(err) == "something failed (SQLSTATE XX000)\n  statement: SELECT %s"
