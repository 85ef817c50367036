"""Transactions: commit, rollback, savepoints, nesting, joining, isolation, cleanup.

What was committed is always checked from an independent psycopg2 connection.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterator

import psycopg2.extensions as ext
import pytest
from support.raw import Raw

from pgaccess import (
    CommitOutcomeUnknown,
    ConnectionPool,
    Database,
    DatabaseError,
    DataError,
    InvalidQuery,
    ProgrammingError,
    Rollback,
    Savepoint,
    Transaction,
    TransactionError,
    TransactionStatus,
    UniqueViolation,
)


@pytest.fixture
def small_pool(pgaccess_dsn: str) -> Iterator[ConnectionPool]:
    """One connection only: a connection not given back makes the next call time out."""
    with ConnectionPool(pgaccess_dsn, maxconn=1, timeout=3, name="tx-one") as pool:
        yield pool


def job(h: str) -> Dict[str, Any]:
    return {"src_hash": h, "input_path": f"/v/{h}.mp4"}


# ---------------------------------------------------------------- commit/rollback
def test_commit(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        assert isinstance(tx, Transaction)
        assert tx.status is TransactionStatus.ACTIVE
        a = tx.insert("video_job", job("a"))
        tx.insert("video_job", job("b"))
        tx.update("video_job", {"status": "processing"}, {"id": a})
        assert raw.hashes() == []  # nothing visible before COMMIT
    assert tx.status is TransactionStatus.COMMITTED
    assert raw.rows("SELECT src_hash, status FROM video_job ORDER BY id") == [
        ("a", "processing"),
        ("b", "queued"),
    ]


def test_exception_rolls_back_and_propagates(db: Database, raw: Raw) -> None:
    with pytest.raises(RuntimeError, match="boom"), db.transaction() as tx:
        tx.insert("video_job", job("a"))
        tx.insert_many("video_job", [job("b"), job("c")])
        raise RuntimeError("boom")
    assert tx.status is TransactionStatus.ROLLED_BACK
    assert raw.hashes() == []


def test_database_error_rolls_back_and_propagates(db: Database, raw: Raw) -> None:
    with pytest.raises(UniqueViolation), db.transaction() as tx:
        tx.insert("video_job", job("a"))
        tx.insert("video_job", job("a"))
    assert tx.status is TransactionStatus.ROLLED_BACK
    assert raw.hashes() == []


def test_raise_rollback_leaves_quietly(db: Database, raw: Raw) -> None:
    reached = []
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        raise Rollback()
    reached.append(True)  # the block was left without an exception
    assert reached == [True]
    assert tx.status is TransactionStatus.ROLLED_BACK
    assert raw.hashes() == []


def test_raise_rollback_of_this_transaction(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        raise Rollback(tx)
    assert raw.hashes() == []


def test_rollback_of_another_transaction_propagates(db: Database, raw: Raw) -> None:
    with db.transaction() as first:
        pass
    with pytest.raises(Rollback), db.transaction() as tx:
        tx.insert("video_job", job("a"))
        raise Rollback(first)
    assert raw.hashes() == []


# ------------------------------------------------------------------- savepoints
def test_rollback_to_savepoint_keeps_earlier_writes(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        sp = tx.savepoint("before_b")
        assert isinstance(sp, Savepoint) and sp.name == "before_b"
        tx.insert("video_job", job("b"))
        tx.rollback_to_savepoint("before_b")
        tx.insert("video_job", job("c"))
        # The savepoint stays set: rolling back to it again undoes c as well.
        tx.rollback_to_savepoint("before_b")
        tx.insert("video_job", job("d"))
        assert [r["src_hash"] for r in tx.find_many("video_job", order_by="id")] == [
            "a",
            "d",
        ]
    assert raw.hashes() == ["a", "d"]


def test_savepoint_block_rolls_back_and_reraises(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        with pytest.raises(ValueError, match="step failed"), tx.savepoint("step"):
            tx.insert("video_job", job("b"))
            raise ValueError("step failed")
        assert tx.count("video_job") == 1
        tx.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "c"]


def test_savepoint_block_recovers_from_a_failed_statement(
    db: Database, raw: Raw
) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        with pytest.raises(UniqueViolation), tx.savepoint("step"):
            tx.insert("video_job", job("b"))
            tx.insert("video_job", job("a"))  # aborts the transaction ...
        # ... and rolling back to the savepoint made it usable again.
        tx.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "c"]


def test_savepoint_block_clean_exit_releases_and_keeps(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        with tx.savepoint("step"):
            tx.insert("video_job", job("a"))
        # Released: it is gone (3B001 invalid_savepoint_specification).
        with pytest.raises(DatabaseError) as err, tx.savepoint("guard"):
            tx.rollback_to_savepoint("step")
        assert err.value.sqlstate == "3B001"
    assert raw.hashes() == ["a"]


def test_savepoint_block_with_rollback_is_quiet(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        with tx.savepoint("step"):
            tx.insert("video_job", job("b"))
            raise Rollback()
        tx.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "c"]


def test_release_savepoint_keeps_work(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        tx.savepoint("s")
        tx.insert("video_job", job("b"))
        tx.release_savepoint("s")
        with pytest.raises(DatabaseError) as err, tx.savepoint("guard"):
            tx.rollback_to_savepoint("s")
        assert err.value.sqlstate == "3B001"
        tx.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "b", "c"]


def test_release_savepoint_releases_later_ones_too(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.savepoint("outer")
        tx.insert("video_job", job("a"))
        tx.savepoint("inner")
        tx.insert("video_job", job("b"))
        tx.release_savepoint("outer")
        with pytest.raises(DatabaseError) as err, tx.savepoint("guard"):
            tx.rollback_to_savepoint("inner")
        assert err.value.sqlstate == "3B001"
    assert raw.hashes() == ["a", "b"]


def test_auto_named_savepoint(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        sp = tx.savepoint()
        other = tx.savepoint()
        assert sp.name != other.name
        tx.insert("video_job", job("b"))
        tx.rollback_to_savepoint(sp.name)
    assert raw.hashes() == ["a"]


HOSTILE_SAVEPOINTS = [
    'x"; ROLLBACK; --',
    "x; COMMIT",
    "sp name",
    "",
    "1sp",
    "sp\x00x",
    "sp%s",
    "a" * 64,
    "spé",
    "a.b",
    None,
    5,
]


@pytest.mark.parametrize("name", HOSTILE_SAVEPOINTS, ids=repr)
def test_savepoint_names_are_validated(db: Database, raw: Raw, name: Any) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        tx.savepoint("good")
        if name is not None:  # savepoint(None) picks a name of its own
            with pytest.raises(InvalidQuery):
                tx.savepoint(name)
        with pytest.raises(InvalidQuery):
            tx.rollback_to_savepoint(name)
        with pytest.raises(InvalidQuery):
            tx.release_savepoint(name)
        # Nothing was sent: the transaction is healthy and the savepoint still set.
        tx.insert("video_job", job("b"))
        tx.rollback_to_savepoint("good")
        tx.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "c"]


# ---------------------------------------------------------------------- nesting
def test_nested_transaction_is_a_savepoint(db: Database, raw: Raw) -> None:
    with db.transaction() as outer:
        outer.insert("video_job", job("a"))
        try:
            with db.transaction() as inner:
                assert inner is outer
                inner.insert("video_job", job("b"))
                raise ValueError("inner failed")
        except ValueError:
            pass
        assert outer.status is TransactionStatus.ACTIVE
        assert outer.count("video_job") == 1
        outer.insert("video_job", job("c"))
        with db.transaction() as inner:
            inner.insert("video_job", job("d"))  # a clean inner exit keeps its work
    assert raw.hashes() == ["a", "c", "d"]


def test_nested_transaction_database_error(db: Database, raw: Raw) -> None:
    with db.transaction() as outer:
        outer.insert("video_job", job("a"))
        with pytest.raises(UniqueViolation), db.transaction():
            db.insert("video_job", job("b"))
            db.insert("video_job", job("a"))
        outer.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "c"]


def test_nested_rollback_is_quiet_and_only_inner(db: Database, raw: Raw) -> None:
    with db.transaction() as outer:
        outer.insert("video_job", job("a"))
        with db.transaction() as inner:
            inner.insert("video_job", job("b"))
            raise Rollback()
        outer.insert("video_job", job("c"))
    assert raw.hashes() == ["a", "c"]


def test_rollback_of_outer_from_nested_block_rolls_back_everything(
    db: Database, raw: Raw
) -> None:
    after_inner = []
    with db.transaction() as outer:
        outer.insert("video_job", job("a"))
        with db.transaction() as inner:
            inner.insert("video_job", job("b"))
            raise Rollback(outer)
        after_inner.append(True)  # not reached: Rollback(outer) leaves the outer block
        outer.insert("video_job", job("c"))
    assert after_inner == []
    assert outer.status is TransactionStatus.ROLLED_BACK
    assert raw.hashes() == []


def test_rollback_of_tx_from_savepoint_block_rolls_back_everything(
    db: Database, raw: Raw
) -> None:
    with db.transaction() as tx:
        tx.insert("video_job", job("a"))
        with tx.savepoint("step"):
            tx.insert("video_job", job("b"))
            raise Rollback(tx)
        tx.insert("video_job", job("c"))  # not reached
    assert tx.status is TransactionStatus.ROLLED_BACK
    assert raw.hashes() == []


def test_nested_block_cannot_change_isolation(db: Database, raw: Raw) -> None:
    with pytest.raises(TransactionError), db.transaction() as tx:
        tx.insert("video_job", job("a"))
        with db.transaction(isolation="serializable"):
            pass  # pragma: no cover
    assert raw.hashes() == []


def test_run_in_transaction_refuses_inside_a_transaction(db: Database) -> None:
    with db.transaction(), pytest.raises(TransactionError):
        db.run_in_transaction(lambda tx: None)


# ---------------------------------------------------------------------- joining
def test_calls_through_db_on_same_thread_join(db: Database, raw: Raw) -> None:
    with db.transaction() as tx:
        assert db.current_transaction() is tx
        jid = db.insert("video_job", job("a"))
        db.insert_many("video_job", [job("b"), job("c")])
        db.update("video_job", {"status": "processing"}, {"id": jid})
        # Visible inside, through tx and through db ...
        assert tx.find_one("video_job", {"id": jid})["status"] == "processing"
        assert db.count("video_job") == 3
        assert db.execute("SELECT count(*) AS n FROM video_job") == [{"n": 3}]
        # ... invisible from another connection until COMMIT.
        assert raw.hashes() == []
        # Another Database on the same pool joins too.
        other = Database(pool=db.pool)
        assert other.count("video_job") == 3
    assert db.current_transaction() is None
    assert raw.hashes() == ["a", "b", "c"]


def test_joined_calls_roll_back_with_the_transaction(db: Database, raw: Raw) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.insert("video_job", job("a"))
        db.execute_many(
            "INSERT INTO video_job (src_hash) VALUES (%s)", [("b",), ("c",)]
        )
        db.upsert("video_job", job("d"))
        raise RuntimeError
    assert raw.hashes() == []


def test_calls_from_another_thread_do_not_join(db: Database, raw: Raw) -> None:
    seen: Dict[str, Any] = {}
    with db.transaction() as tx:
        tx.insert("video_job", job("mine"))

        def other() -> None:
            seen["tx"] = db.current_transaction()
            seen["id"] = db.insert("video_job", job("theirs"))
            seen["visible"] = sorted(r["src_hash"] for r in db.find_many("video_job"))

        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=10)
        assert not t.is_alive()
        assert seen["tx"] is None
        # The other thread ran in autocommit: committed at once, visible to all ...
        assert raw.hashes() == ["theirs"]
        # ... and it did not see this transaction's uncommitted row.
        assert seen["visible"] == ["theirs"]
        raise Rollback()
    assert raw.hashes() == ["theirs"]


# --------------------------------------------------------------- clean return
def _end_commit(tx: Transaction) -> None:
    tx.insert("video_job", job("x"))


def _end_exception(tx: Transaction) -> None:
    tx.insert("video_job", job("x"))
    raise RuntimeError("boom")


def _end_rollback(tx: Transaction) -> None:
    tx.insert("video_job", job("x"))
    raise Rollback()


def _end_database_error(tx: Transaction) -> None:
    tx.execute("SELECT 1/0")


def _end_swallowed_error(tx: Transaction) -> None:
    tx.insert("video_job", job("x"))
    with contextlib.suppress(DatabaseError):
        tx.execute("SELECT 1/0")


def _end_savepoint_open(tx: Transaction) -> None:
    tx.savepoint("left_open")
    tx.insert("video_job", job("x"))
    tx.execute("SET LOCAL statement_timeout = 1234")


def _end_empty(tx: Transaction) -> None:
    pass


ENDINGS: Dict[str, Callable[[Transaction], None]] = {
    "commit": _end_commit,
    "exception": _end_exception,
    "rollback": _end_rollback,
    "database-error": _end_database_error,
    "swallowed-error": _end_swallowed_error,
    "savepoint-and-set-local": _end_savepoint_open,
    "empty": _end_empty,
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
@pytest.mark.parametrize("isolation", [None, "serializable"])
def test_connection_goes_back_clean(
    small_pool: ConnectionPool, raw: Raw, db: Database, ending: str, isolation: Any
) -> None:
    sdb = Database(pool=small_pool)
    pid = sdb.execute("SELECT pg_backend_pid() AS pid")[0]["pid"]
    conns = []
    try:
        with sdb.transaction(isolation=isolation) as tx:
            ENDINGS[ending](tx)
            conns.append(tx.connection)
    except (RuntimeError, DatabaseError):
        pass
    stats = small_pool.stats()
    assert stats["in_use"] == 0
    assert stats["waiting"] == 0
    for conn in conns:
        assert conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
        assert conn.autocommit
    # The next call gets the (single) connection at once, outside any transaction,
    # with the session defaults.
    assert sdb.execute("SELECT pg_backend_pid() AS pid")[0]["pid"] == pid
    assert sdb.execute("SHOW transaction_isolation") == [
        {"transaction_isolation": "read committed"}
    ]
    assert sdb.execute("SHOW statement_timeout")[0]["statement_timeout"] == "0"
    sdb.insert("video_job", job("after"))
    expected = (
        ["x", "after"] if ending in ("commit", "savepoint-and-set-local") else ["after"]
    )
    assert raw.hashes() == expected


def test_swallowed_error_raises_at_commit_and_commits_nothing(
    db: Database, raw: Raw
) -> None:
    with pytest.raises(TransactionError), db.transaction() as tx:
        tx.insert("video_job", job("a"))
        with contextlib.suppress(UniqueViolation):
            tx.insert("video_job", job("a"))
    assert tx.status is TransactionStatus.ROLLED_BACK
    assert raw.hashes() == []
    assert db.pool.stats()["in_use"] == 0


def test_swallowed_error_in_first_statement_raises_at_commit(
    db: Database, raw: Raw
) -> None:
    db.insert("video_job", job("a"))
    with pytest.raises(TransactionError), db.transaction() as tx:
        swallow = contextlib.suppress(UniqueViolation)
        with swallow:
            tx.insert("video_job", job("a"))  # BEGIN ran, then this failed
    assert raw.hashes() == ["a"]


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda tx: tx.execute("SELEC 1"), id="syntax-error"),
        pytest.param(lambda tx: tx.insert("video_job", job("a\x00")), id="nul-value"),
    ],
)
def test_failed_first_statement_keeps_later_writes_in_the_transaction(
    db: Database, raw: Raw, first: Callable[[Transaction], Any]
) -> None:
    # "BEGIN" travels with the first statement. When that statement fails before
    # anything ran (a parse error, a value psycopg2 cannot send), BEGIN did not run
    # either; the statements after it must still be inside the transaction.
    with pytest.raises(RuntimeError), db.transaction() as tx:
        with pytest.raises((ProgrammingError, DataError)):
            first(tx)
        tx.insert("video_job", job("b"))
        assert raw.hashes() == []  # not autocommitted
        raise RuntimeError("undo")
    assert raw.hashes() == []


def test_failed_first_statement_then_rollback_to_savepoint(
    db: Database, raw: Raw
) -> None:
    with db.transaction() as tx:
        with pytest.raises(ProgrammingError):
            tx.execute("SELEC 1")
        tx.savepoint("s")  # would fail outside a transaction block
        tx.insert("video_job", job("a"))
        tx.rollback_to_savepoint("s")
        tx.insert("video_job", job("b"))
        assert raw.hashes() == []
    assert raw.hashes() == ["b"]


# ------------------------------------------------------------ isolation & access
@pytest.mark.parametrize(
    ("isolation", "shown"),
    [
        ("serializable", "serializable"),
        ("repeatable read", "repeatable read"),
        ("read committed", "read committed"),
        ("REPEATABLE_READ", "repeatable read"),
        ("Serializable", "serializable"),
        ("  repeatable   read ", "repeatable read"),
        (None, "read committed"),
    ],
)
def test_isolation_is_set(db: Database, isolation: Any, shown: str) -> None:
    with db.transaction(isolation=isolation) as tx:
        assert tx.execute("SHOW transaction_isolation") == [
            {"transaction_isolation": shown}
        ]
        assert db.execute("SHOW transaction_isolation")[0]["transaction_isolation"] == (
            shown
        )
        tx.insert("video_job", job("a"))
    assert db.execute("SHOW transaction_isolation") == [
        {"transaction_isolation": "read committed"}
    ]


@pytest.mark.parametrize(
    ("isolation", "sees_new_row"),
    [("read committed", True), ("repeatable read", False), ("serializable", False)],
)
def test_isolation_takes_effect(
    db: Database, raw: Raw, isolation: str, sees_new_row: bool
) -> None:
    with db.transaction(isolation=isolation) as tx:
        assert tx.count("video_job") == 0  # takes the snapshot
        raw.rows("INSERT INTO video_job (src_hash) VALUES ('concurrent')")
        assert tx.count("video_job") == (1 if sees_new_row else 0)


def test_read_only_rejects_writes(db: Database, raw: Raw) -> None:
    with pytest.raises(DatabaseError) as err, db.transaction(read_only=True) as tx:
        assert tx.execute("SHOW transaction_read_only") == [
            {"transaction_read_only": "on"}
        ]
        assert tx.count("video_job") == 0
        tx.insert("video_job", job("a"))
    assert err.value.sqlstate == "25006"  # read_only_sql_transaction
    assert raw.hashes() == []
    assert db.execute("SHOW transaction_read_only") == [
        {"transaction_read_only": "off"}
    ]
    db.insert("video_job", job("b"))
    assert raw.hashes() == ["b"]


def test_read_only_serializable(db: Database) -> None:
    with db.transaction(isolation="serializable", read_only=True) as tx:
        assert tx.execute("SHOW transaction_isolation")[0]["transaction_isolation"] == (
            "serializable"
        )
        assert (
            tx.execute("SHOW transaction_read_only")[0]["transaction_read_only"] == "on"
        )


@pytest.mark.parametrize(
    "isolation",
    [
        "chaos",
        "read uncommitted",
        "serializable; DROP TABLE video_job",
        "serializable --",
        "",
        5,
        "SERIALIZABLE READ ONLY",
    ],
)
def test_invalid_isolation_is_rejected(db: Database, raw: Raw, isolation: Any) -> None:
    with pytest.raises(InvalidQuery), db.transaction(isolation=isolation):
        pass  # pragma: no cover
    assert isinstance(InvalidQuery("x"), ValueError)
    assert db.pool.stats()["in_use"] == 0
    assert raw.one("SELECT count(*) FROM pg_tables WHERE tablename = 'video_job'") == 1


# ------------------------------------------------------------ after the block
AFTER_BLOCK: Dict[str, Callable[[Transaction], Any]] = {
    "insert": lambda tx: tx.insert("video_job", job("late")),
    "insert_many": lambda tx: tx.insert_many("video_job", [job("late")]),
    "find_one": lambda tx: tx.find_one("video_job"),
    "find_many": lambda tx: tx.find_many("video_job"),
    "count": lambda tx: tx.count("video_job"),
    "exists": lambda tx: tx.exists("video_job"),
    "update": lambda tx: tx.update("video_job", {"status": "failed"}, {"id": 1}),
    "delete": lambda tx: tx.delete("video_job", {"id": 1}),
    "upsert": lambda tx: tx.upsert("video_job", job("late")),
    "execute": lambda tx: tx.execute("SELECT 1"),
    "execute_many": lambda tx: tx.execute_many("SELECT %s", [(1,)]),
    "savepoint": lambda tx: tx.savepoint("s"),
    "rollback_to_savepoint": lambda tx: tx.rollback_to_savepoint("s"),
    "release_savepoint": lambda tx: tx.release_savepoint("s"),
    "connection": lambda tx: tx.connection,
}


@pytest.mark.parametrize("use", sorted(AFTER_BLOCK))
@pytest.mark.parametrize("ending", ["commit", "rollback", "empty"])
def test_using_tx_after_the_block_raises(
    db: Database, raw: Raw, use: str, ending: str
) -> None:
    with db.transaction() as tx:
        if ending != "empty":
            tx.insert("video_job", job("a"))
        if ending == "rollback":
            raise Rollback()
    before = raw.hashes()
    with pytest.raises(TransactionError):
        AFTER_BLOCK[use](tx)
    assert raw.hashes() == before
    assert db.pool.stats()["in_use"] == 0


# ------------------------------------------------------------ empty transaction
def test_empty_transaction_sends_nothing(small_pool: ConnectionPool, raw: Raw) -> None:
    sdb = Database(pool=small_pool)
    pid = sdb.execute("SELECT pg_backend_pid() AS pid")[0]["pid"]
    marker = "SELECT 'empty-transaction-marker' AS m"

    def last_statement() -> str:
        return str(raw.one("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)))

    sdb.execute(marker)
    assert last_statement() == marker
    with sdb.transaction() as tx:
        pass
    assert tx.status is TransactionStatus.COMMITTED
    with sdb.transaction(isolation="serializable", read_only=True):
        raise Rollback()
    assert last_statement() == marker  # no BEGIN, no COMMIT, no ROLLBACK
    # The control: a transaction that runs something ends with COMMIT.
    with sdb.transaction() as tx:
        tx.execute("SELECT 1")
    assert last_statement() == "COMMIT"
    assert small_pool.stats()["in_use"] == 0


# ------------------------------------------------------------- lost COMMIT reply
def test_commit_whose_reply_is_lost_is_outcome_unknown(
    proxy_db: Database, fault_proxy: Any, raw: Raw, db: Database
) -> None:
    fault_proxy.drop_after("COMMIT")
    with pytest.raises(CommitOutcomeUnknown) as err, proxy_db.transaction() as tx:
        tx.insert("video_job", job("a"))
    assert err.value.statement == "COMMIT"
    assert fault_proxy.drops == 1
    assert raw.hashes() == ["a"]  # it was committed; pgaccess could not know
    assert proxy_db.pool.stats()["in_use"] == 0
    assert proxy_db.count("video_job") == 1  # the pool serves again


def test_run_in_transaction_does_not_rerun_after_a_lost_commit(
    proxy_db: Database, fault_proxy: Any, raw: Raw, db: Database
) -> None:
    calls = []

    def work(tx: Transaction) -> None:
        calls.append(1)
        tx.insert("video_job", job(f"r{len(calls)}"))

    fault_proxy.drop_after("COMMIT")
    with pytest.raises(CommitOutcomeUnknown):
        proxy_db.run_in_transaction(work)
    assert calls == [1]
    assert raw.hashes() == ["r1"]
