"""Real server errors, translated by SQLSTATE: statement, cause, pickling."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Type

import psycopg2
import psycopg2.errors
import pytest
from support.pickling import check_pickle
from support.raw import Raw

from pgaccess import (
    CheckViolation,
    ConnectionLost,
    ConnectionPool,
    Database,
    DatabaseError,
    DataError,
    DeadlockDetected,
    ForeignKeyViolation,
    IntegrityError,
    InvalidQuery,
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

# A value that must never appear in a statement: statements carry placeholders only.
SECRET = "SECRET-VALUE-7f3a9c"


def check(
    err: DatabaseError,
    cls: Type[DatabaseError],
    sqlstate: str,
    cause: Type[BaseException],
    *,
    statement_has: str,
) -> None:
    """The common contract of a translated server error."""
    assert type(err) is cls, type(err)
    assert isinstance(err, DatabaseError)
    assert err.sqlstate == sqlstate
    assert isinstance(err.__cause__, cause), type(err.__cause__)
    assert isinstance(err.__cause__, psycopg2.Error)
    assert err.__cause__.pgcode == sqlstate
    assert err.statement is not None and statement_has in err.statement
    assert SECRET not in err.statement  # the statement, never the values
    text = str(err)
    assert f"SQLSTATE {sqlstate}" in text
    assert "statement:" in text
    check_pickle(err)


# ------------------------------------------------------------------- integrity
def test_unique_violation(db: Database, raw: Raw) -> None:
    db.insert("video_job", {"src_hash": SECRET, "input_path": "/one"})
    with pytest.raises(UniqueViolation) as ei:
        db.insert("video_job", {"src_hash": SECRET, "input_path": "/two"})
    err = ei.value
    check(
        err,
        UniqueViolation,
        "23505",
        psycopg2.errors.UniqueViolation,
        statement_has='INSERT INTO "video_job"',
    )
    assert isinstance(err, IntegrityError)
    assert "%s" in err.statement
    assert raw.rows("SELECT input_path FROM video_job") == [("/one",)]


def test_foreign_key_violation(db: Database, raw: Raw) -> None:
    with pytest.raises(ForeignKeyViolation) as ei:
        db.insert(
            "highlight",
            {
                "job_id": 987654321,
                "start_time": 1,
                "end_time": 2,
                "score": 1,
                "label": SECRET,
            },
        )
    check(
        ei.value,
        ForeignKeyViolation,
        "23503",
        psycopg2.errors.ForeignKeyViolation,
        statement_has='INSERT INTO "highlight"',
    )
    assert isinstance(ei.value, IntegrityError)
    assert raw.one("SELECT count(*) FROM highlight") == 0


def test_not_null_violation(db: Database, raw: Raw) -> None:
    with pytest.raises(NotNullViolation) as ei:
        db.insert("video_job", {"input_path": SECRET})
    check(
        ei.value,
        NotNullViolation,
        "23502",
        psycopg2.errors.NotNullViolation,
        statement_has='INSERT INTO "video_job"',
    )
    assert isinstance(ei.value, IntegrityError)
    assert "src_hash" in str(ei.value)
    assert raw.one("SELECT count(*) FROM video_job") == 0


@pytest.mark.parametrize(
    ("table", "data"),
    [
        ("video_job", {"src_hash": SECRET, "status": "bogus"}),
        ("video_job", {"src_hash": SECRET, "max_attempts": 0}),
        ("highlight", {"start_time": 5, "end_time": 1, "score": 1, "label": SECRET}),
    ],
)
def test_check_violation(
    db: Database, raw: Raw, table: str, data: Dict[str, Any]
) -> None:
    if table == "highlight":
        data = {**data, "job_id": db.insert("video_job", {"src_hash": "j"})}
    with pytest.raises(CheckViolation) as ei:
        db.insert(table, data)
    check(
        ei.value,
        CheckViolation,
        "23514",
        psycopg2.errors.CheckViolation,
        statement_has=f'INSERT INTO "{table}"',
    )
    assert isinstance(ei.value, IntegrityError)
    assert raw.one("SELECT count(*) FROM highlight") == 0


def test_integrity_errors_through_update_and_execute(db: Database) -> None:
    a = db.insert("video_job", {"src_hash": "a"})
    db.insert("video_job", {"src_hash": "b"})
    with pytest.raises(UniqueViolation) as ei:
        db.update("video_job", {"src_hash": "b"}, {"id": a})
    assert ei.value.statement.startswith('UPDATE "video_job"')
    with pytest.raises(CheckViolation):
        db.execute("UPDATE video_job SET attempts = %s WHERE id = %s", (-1, a))
    with pytest.raises(UniqueViolation):
        db.execute_many(
            "INSERT INTO video_job (src_hash) VALUES (%s)", [("c",), ("a",)]
        )
    assert db.count("video_job") == 2


# ------------------------------------------------------------- unknown objects
UNKNOWN_TABLE_CALLS: Dict[str, Callable[[Database], Any]] = {
    "find_one": lambda db: db.find_one("video_jobs", {"src_hash": SECRET}),
    "find_many": lambda db: db.find_many("video_jobs", {"src_hash": SECRET}),
    "count": lambda db: db.count("video_jobs"),
    "exists": lambda db: db.exists("video_jobs"),
    "insert": lambda db: db.insert("video_jobs", {"src_hash": SECRET}),
    "insert_many": lambda db: db.insert_many("video_jobs", [{"src_hash": SECRET}]),
    "update": lambda db: db.update(
        "video_jobs", {"status": "failed"}, {"src_hash": SECRET}
    ),
    "delete": lambda db: db.delete("video_jobs", {"src_hash": SECRET}),
    "upsert": lambda db: db.upsert(
        "video_jobs", {"src_hash": SECRET}, conflict="src_hash"
    ),
    "schema-qualified": lambda db: db.find_one("public.video_jobs"),
}


@pytest.mark.parametrize("call", sorted(UNKNOWN_TABLE_CALLS))
def test_unknown_table_suggests(db: Database, call: str) -> None:
    with pytest.raises(UnknownTable) as ei:
        UNKNOWN_TABLE_CALLS[call](db)
    err = ei.value
    assert err.sqlstate == "42P01"
    assert isinstance(err, ProgrammingError)
    assert isinstance(err.__cause__, psycopg2.errors.UndefinedTable)
    assert "video_jobs" in str(err)
    assert "did you mean 'video_job'" in str(err)
    assert err.statement is not None and SECRET not in err.statement
    check_pickle(err)
    assert db.pool.stats()["in_use"] == 0


def test_unknown_table_without_close_match_lists_tables(db: Database) -> None:
    with pytest.raises(UnknownTable) as ei:
        db.find_one("zzzqqqxxx")
    assert "did you mean" not in str(ei.value)
    assert "video_job" in str(ei.value)  # what exists


def test_unknown_table_inside_transaction(db: Database) -> None:
    with pytest.raises(UnknownTable) as ei, db.transaction() as tx:
        tx.find_one("video_jobs")
    assert "did you mean 'video_job'" in str(ei.value)
    assert db.pool.stats()["in_use"] == 0


UNKNOWN_COLUMN_CALLS: Dict[str, Callable[[Database], Any]] = {
    "where": lambda db: db.find_one("video_job", {"stauts": SECRET}),
    "find_many-where": lambda db: db.find_many("video_job", {"stauts": ("!=", SECRET)}),
    "columns": lambda db: db.find_many("video_job", columns=["id", "stauts"]),
    "order_by": lambda db: db.find_many("video_job", order_by="-stauts"),
    "count": lambda db: db.count("video_job", {"stauts": SECRET}),
    "exists": lambda db: db.exists("video_job", {"stauts": SECRET}),
    "insert": lambda db: db.insert(
        "video_job", {"src_hash": SECRET, "stauts": "queued"}
    ),
    "insert_many": lambda db: db.insert_many(
        "video_job", [{"src_hash": "x", "stauts": SECRET}]
    ),
    "update-data": lambda db: db.update("video_job", {"stauts": SECRET}, {"id": 1}),
    "update-where": lambda db: db.update(
        "video_job", {"status": "failed"}, {"stauts": SECRET}
    ),
    "delete": lambda db: db.delete("video_job", {"stauts": SECRET}),
    "upsert": lambda db: db.upsert("video_job", {"src_hash": "x", "stauts": SECRET}),
}


@pytest.mark.parametrize("call", sorted(UNKNOWN_COLUMN_CALLS))
def test_unknown_column_suggests(db: Database, call: str) -> None:
    db.insert("video_job", {"src_hash": "present"})
    with pytest.raises(UnknownColumn) as ei:
        UNKNOWN_COLUMN_CALLS[call](db)
    err = ei.value
    assert err.sqlstate == "42703"
    assert isinstance(err, ProgrammingError)
    assert isinstance(err.__cause__, psycopg2.errors.UndefinedColumn)
    assert "stauts" in str(err)
    assert "did you mean 'status'" in str(err)
    assert err.statement is not None and SECRET not in err.statement
    check_pickle(err)
    assert db.count("video_job") == 1


def test_unknown_column_through_execute(db: Database) -> None:
    with pytest.raises(UnknownColumn) as ei:
        db.execute("SELECT stauts FROM video_job WHERE src_hash = %s", (SECRET,))
    check(
        ei.value,
        UnknownColumn,
        "42703",
        psycopg2.errors.UndefinedColumn,
        statement_has="SELECT stauts FROM video_job",
    )


# ------------------------------------------------------------------ operational
def test_query_canceled_by_set_local_statement_timeout(db: Database, raw: Raw) -> None:
    started = time.monotonic()
    with pytest.raises(QueryCanceled) as ei, db.transaction() as tx:
        tx.insert("video_job", {"src_hash": "in-tx"})
        tx.execute("SET LOCAL statement_timeout = 100")
        tx.execute("SELECT pg_sleep(5), %s::text", (SECRET,))
    assert time.monotonic() - started < 3
    check(
        ei.value,
        QueryCanceled,
        "57014",
        psycopg2.errors.QueryCanceled,
        statement_has="SELECT pg_sleep(5)",
    )
    assert isinstance(ei.value, OperationalError)
    assert raw.one("SELECT count(*) FROM video_job") == 0  # the block was rolled back
    assert db.execute("SHOW statement_timeout") == [{"statement_timeout": "0"}]


def test_query_canceled_by_pool_statement_timeout(pgaccess_dsn: str) -> None:
    with Database(dsn=pgaccess_dsn, statement_timeout=100, maxconn=1) as tdb:
        assert tdb.execute("SHOW statement_timeout") == [{"statement_timeout": "100ms"}]
        started = time.monotonic()
        with pytest.raises(QueryCanceled) as ei:
            tdb.execute("SELECT pg_sleep(5)")
        assert time.monotonic() - started < 3
        assert ei.value.sqlstate == "57014"
        assert isinstance(ei.value.__cause__, psycopg2.errors.QueryCanceled)
        # Not transient: it was not retried (one attempt, about one timeout long).
        assert time.monotonic() - started < 1.5
        assert tdb.execute("SELECT 1 AS one") == [{"one": 1}]


def test_serialization_failure(db: Database, raw: Raw) -> None:
    jid = db.insert("video_job", {"src_hash": "s", "priority": 0})
    with (
        pytest.raises(SerializationFailure) as ei,
        db.transaction(isolation="repeatable read") as tx,
    ):
        assert tx.find_one("video_job", {"id": jid})["priority"] == 0  # the snapshot
        other = threading.Thread(
            target=db.update, args=("video_job", {"priority": 1}, {"id": jid})
        )
        other.start()
        other.join(timeout=10)
        assert not other.is_alive()
        tx.update("video_job", {"priority": 2, "error": SECRET}, {"id": jid})
    check(
        ei.value,
        SerializationFailure,
        "40001",
        psycopg2.errors.SerializationFailure,
        statement_has='UPDATE "video_job"',
    )
    assert isinstance(ei.value, TransactionRollback)
    assert isinstance(ei.value, OperationalError)
    assert raw.rows("SELECT priority, error FROM video_job") == [(1, None)]


def test_serialization_failure_at_commit_or_write(db: Database, raw: Raw) -> None:
    # Write skew: two serializable transactions each read what the other writes.
    barrier = threading.Barrier(2)
    outcome: Dict[str, Any] = {}

    def worker(name: str) -> None:
        try:
            with db.transaction(isolation="serializable") as tx:
                n = tx.count("video_job")
                barrier.wait(timeout=10)
                tx.insert("video_job", {"src_hash": f"{name}-{n}"})
                barrier.wait(timeout=10)
            outcome[name] = "committed"
        except DatabaseError as exc:
            outcome[name] = exc
        except threading.BrokenBarrierError as exc:  # pragma: no cover
            outcome[name] = exc

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in threads)
    failures = [v for v in outcome.values() if v != "committed"]
    assert len(failures) == 1, outcome
    assert type(failures[0]) is SerializationFailure and failures[0].sqlstate == "40001"
    assert raw.one("SELECT count(*) FROM video_job") == 1
    assert db.pool.stats()["in_use"] == 0


def test_deadlock_detected(db: Database, raw: Raw) -> None:
    a = db.insert("video_job", {"src_hash": "a"})
    b = db.insert("video_job", {"src_hash": "b"})
    superuser = raw.one("SHOW is_superuser") == "on"
    barrier = threading.Barrier(2)
    outcome: Dict[str, Any] = {}

    def worker(name: str, first: int, second: int) -> None:
        try:
            with db.transaction() as tx:
                if superuser:  # detect it in 50 ms rather than the default 1 s
                    tx.execute("SET LOCAL deadlock_timeout = 50")
                tx.update("video_job", {"error": name}, {"id": first})
                barrier.wait(timeout=10)
                tx.update("video_job", {"error": name}, {"id": second})
            outcome[name] = "committed"
        except DatabaseError as exc:
            outcome[name] = exc

    threads = [
        threading.Thread(target=worker, args=("t1", a, b)),
        threading.Thread(target=worker, args=("t2", b, a)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in threads)
    winners = [k for k, v in outcome.items() if v == "committed"]
    losers = [v for v in outcome.values() if v != "committed"]
    assert len(winners) == 1 and len(losers) == 1, outcome
    err = losers[0]
    check(
        err,
        DeadlockDetected,
        "40P01",
        psycopg2.errors.DeadlockDetected,
        statement_has='UPDATE "video_job"',
    )
    assert isinstance(err, TransactionRollback)
    # The winner's two updates, and none of the loser's.
    assert {r[0] for r in raw.rows("SELECT error FROM video_job")} == {winners[0]}
    assert db.pool.stats()["in_use"] == 0


def test_connection_lost(pgaccess_dsn: str, raw: Raw) -> None:
    with ConnectionPool(pgaccess_dsn, maxconn=1, name="lost") as pool:
        tdb = Database(pool=pool)
        with pytest.raises(ConnectionLost) as ei, tdb.transaction() as tx:
            pid = tx.execute("SELECT pg_backend_pid() AS pid")[0]["pid"]
            assert raw.one("SELECT pg_terminate_backend(%s, 5000)", (pid,)) is True
            tx.execute("SELECT 1")
        assert isinstance(ei.value, OperationalError)
        assert isinstance(ei.value.__cause__, psycopg2.Error)
        check_pickle(ei.value)
        # The dead connection was discarded; the pool serves a fresh one.
        assert pool.stats()["in_use"] == 0
        assert tdb.execute("SELECT pg_backend_pid() AS pid")[0]["pid"] != pid


# -------------------------------------------------------------- programming/data
def test_syntax_error_is_programming_error(db: Database) -> None:
    with pytest.raises(ProgrammingError) as ei:
        db.execute("SELEC %s", (SECRET,))
    assert type(ei.value) is ProgrammingError
    check(
        ei.value,
        ProgrammingError,
        "42601",
        psycopg2.errors.SyntaxError,
        statement_has="SELEC %s",
    )


def test_undefined_function_falls_back_to_its_class(db: Database) -> None:
    with pytest.raises(ProgrammingError) as ei:
        db.execute("SELECT no_such_function_here(%s)", (SECRET,))
    check(
        ei.value,
        ProgrammingError,
        "42883",
        psycopg2.errors.UndefinedFunction,
        statement_has="no_such_function_here",
    )


def test_data_errors(db: Database) -> None:
    with pytest.raises(DataError) as ei:
        db.find_one("video_job", {"id": SECRET})
    check(
        ei.value,
        DataError,
        "22P02",
        psycopg2.errors.InvalidTextRepresentation,
        statement_has='WHERE "id" = %s',
    )
    with pytest.raises(DataError) as ei:
        db.execute("SELECT 1 / %s", (0,))
    check(
        ei.value,
        DataError,
        "22012",
        psycopg2.errors.DivisionByZero,
        statement_has="SELECT 1 / %s",
    )


def test_nul_value_is_data_error_without_sqlstate(db: Database) -> None:
    with pytest.raises(DataError) as ei:
        db.insert("video_job", {"src_hash": SECRET + "\x00"})
    err = ei.value
    assert err.sqlstate is None
    assert isinstance(err.__cause__, ValueError)
    assert "NUL" in str(err)
    assert err.statement is not None and SECRET not in err.statement
    check_pickle(err)
    assert db.count("video_job") == 0


def test_invalid_query_is_a_value_error(db: Database) -> None:
    with pytest.raises(ValueError) as ei:
        db.find_one('video_job"; --')
    assert isinstance(ei.value, InvalidQuery) and isinstance(ei.value, DatabaseError)
    assert ei.value.sqlstate is None and ei.value.statement is None
    check_pickle(ei.value)


# --------------------------------------------------------------------- hierarchy
