"""Streaming reads: ``iter_many`` and ``stream`` over a server-side cursor.

Most tests use a pool of ONE connection: a stream that failed to give its connection
back would make the next call wait and fail with ``PoolTimeout``, and ``in_use``
says at once whether it came back.
"""

from __future__ import annotations

import gc
import threading
import uuid
from typing import Any, Dict, Iterator, List

import pytest
from psycopg2.extensions import parse_dsn

from pgaccess import (
    Database,
    DatabaseError,
    DataError,
    InvalidQuery,
    QueryCanceled,
    TransactionError,
    UnknownColumn,
    UnknownTable,
)
from pgaccess.stats import query_stats

ROWS = 2500


@pytest.fixture
def one(db: Database, pgaccess_dsn: str) -> Iterator[Database]:
    """A Database on a pool of one connection, over video_job with ROWS rows."""
    db.insert_many(
        "video_job",
        [
            {"src_hash": f"h{i:05d}", "input_path": f"/in/{i}", "priority": i % 7}
            for i in range(ROWS)
        ],
    )
    with Database(dsn=pgaccess_dsn, maxconn=1, timeout=2) as small:
        yield small
    # Leave the worker's database as empty as it was found: tests that do not use
    # the db fixture run on the same database.
    db.delete("video_job", all_rows=True)


def in_use(d: Database) -> int:
    return int(d.pool.stats()["in_use"])


def backend_states(d: Database) -> List[str]:
    """The transaction state of every other session on this database."""
    rows = d.execute(
        "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    return [r["state"] for r in rows]


# ------------------------------------------------------------------ rows
def test_iter_many_yields_the_rows_of_find_many(one: Database) -> None:
    want = one.find_many("video_job", order_by="id")
    got = list(one.iter_many("video_job", order_by="id", batch_size=1000))
    assert len(got) == ROWS
    assert got == want
    assert in_use(one) == 0


def test_iter_many_where_columns_and_order(one: Database) -> None:
    where: Dict[str, Any] = {"priority": (">=", 5)}
    want = one.find_many(
        "video_job", where, columns=["id", "src_hash"], order_by=["-priority", "id"]
    )
    got = list(
        one.iter_many(
            "video_job",
            where,
            columns=["id", "src_hash"],
            order_by=["-priority", "id"],
            batch_size=7,
        )
    )
    assert got == want and len(got) > 100
    assert set(got[0]) == {"id", "src_hash"}


def test_stream_runs_sql_with_params_a_batch_per_round_trip(one: Database) -> None:
    tag = uuid.uuid4().hex  # a statement shape of this test alone, for the stats
    query = f"SELECT i, %s AS tag FROM generate_series(1, %s) i /* {tag} */"
    rows = list(one.stream(query, ("x", 2500), batch_size=1000))
    assert [r["i"] for r in rows] == list(range(1, 2501))
    assert {r["tag"] for r in rows} == {"x"}
    counts = {s["statement"]: s["calls"] for s in query_stats(None)}
    # The DECLARE brought the first 1000, two FETCHes the other 1500.
    fetches = [c for text, c in counts.items() if tag in text and "FETCH" in text]
    assert fetches == [2]


# ------------------------------------------------- the connection goes back
def test_a_result_that_fills_whole_batches_ends_on_an_empty_fetch(
    one: Database,
) -> None:
    rows = one.stream("SELECT i FROM generate_series(1, 2000) i", batch_size=1000)
    assert [r["i"] for r in rows] == list(range(1, 2001))
    assert in_use(one) == 0
    assert list(rows) == []


def test_exhausted_stream_gives_the_connection_back_with_the_last_batch(
    one: Database,
) -> None:
    rows = one.stream("SELECT i FROM generate_series(1, 10) i", batch_size=100)
    assert next(rows) == {"i": 1}
    assert in_use(one) == 0  # all ten arrived in the first batch: already back
    assert [r["i"] for r in rows] == list(range(2, 11))
    assert one.count("video_job") == ROWS  # the one connection serves again


def test_breaking_out_early_gives_the_connection_back(
    one: Database, db: Database
) -> None:
    for seen, _row in enumerate(one.iter_many("video_job", batch_size=100), 1):
        if seen == 150:
            assert in_use(one) == 1
            break
    assert in_use(one) == 0
    assert "idle in transaction" not in backend_states(db)
    assert one.count("video_job") == ROWS


def test_close_and_with_give_the_connection_back(one: Database) -> None:
    rows = one.iter_many("video_job", batch_size=100)
    next(rows)
    rows.close()
    rows.close()  # idempotent
    assert in_use(one) == 0
    assert list(rows) == []
    with one.iter_many("video_job", batch_size=100) as rows:
        next(rows)
        assert in_use(one) == 1
    assert in_use(one) == 0


def test_garbage_collection_gives_the_connection_back(one: Database) -> None:
    rows = one.iter_many("video_job", batch_size=100)
    next(rows)
    del rows
    assert in_use(one) == 0
    # In a reference cycle, only the cycle collector frees it.
    holder: Dict[str, Any] = {"rows": one.iter_many("video_job", batch_size=100)}
    holder["self"] = holder
    next(holder["rows"])
    del holder
    gc.collect()
    assert in_use(one) == 0
    assert one.count("video_job") == ROWS


def test_a_stream_opened_in_one_thread_can_be_read_in_another(one: Database) -> None:
    made: List[Any] = []
    opener = threading.Thread(
        target=lambda: made.append(one.iter_many("video_job", batch_size=300))
    )
    opener.start()
    opener.join(30)
    assert len(list(made.pop())) == ROWS
    assert in_use(one) == 0
    assert one.count("video_job") == ROWS


# --------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"table": "video_job; DROP TABLE video_job"},
        {"table": "video_job", "columns": ["id", "src_hash FROM video_job --"]},
        {"table": "video_job", "order_by": "id; DROP TABLE video_job"},
        {"table": "video_job", "where": {"id = 1 OR 1": 1}},
        {"table": "video_job", "batch_size": 0},
        {"table": "video_job", "batch_size": "100"},
    ],
)
def test_bad_names_and_arguments_are_refused_before_anything_is_sent(
    one: Database, kwargs: Dict[str, Any]
) -> None:
    with pytest.raises(InvalidQuery):
        one.iter_many(**kwargs)
    assert in_use(one) == 0
    assert one.count("video_job") == ROWS


def test_unknown_names_are_pgaccess_errors_with_suggestions(one: Database) -> None:
    with pytest.raises(UnknownColumn, match="did you mean 'src_hash'"):
        one.iter_many("video_job", {"src_hsh": "x"})
    with pytest.raises(UnknownTable, match="did you mean 'video_job'"):
        one.iter_many("video_jobs")
    with pytest.raises(InvalidQuery):
        one.stream("SELECT %s, %s", (1,))
    with pytest.raises(InvalidQuery):
        one.stream("SELECT %s", "not a tuple")
    assert in_use(one) == 0
    assert one.count("video_job") == ROWS


def test_an_error_midway_rolls_back_and_gives_the_connection_back(
    one: Database, db: Database
) -> None:
    rows = one.stream(
        "SELECT i, 1 / (i - 1500) AS x FROM generate_series(1, 3000) i",
        batch_size=1000,
    )
    got = []
    with pytest.raises(DataError, match="division by zero") as failed:
        for row in rows:
            got.append(row["i"])
    assert isinstance(failed.value, DatabaseError)
    assert failed.value.sqlstate == "22012"
    assert got == list(range(1, 1001))  # the first batch arrived whole
    assert in_use(one) == 0
    assert "idle in transaction (aborted)" not in backend_states(db)
    assert one.count("video_job") == ROWS


def test_the_pools_statement_timeout_bounds_each_fetch_and_stays_local(
    pgaccess_dsn: str,
) -> None:
    with Database(dsn=pgaccess_dsn, maxconn=1, statement_timeout=300) as timed:
        rows = timed.stream(
            "SELECT i, CASE WHEN i = 5 THEN pg_sleep(2) END "
            "FROM generate_series(1, 9) i",
            batch_size=4,
        )
        assert len([next(rows) for _ in range(4)]) == 4
        with pytest.raises(QueryCanceled):
            next(rows)  # the second FETCH reaches the slow row
        assert in_use(timed) == 0
        # The same (only) connection: the timeout was not left in its session.
        with timed.pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("0",)


# ---------------------------------------------------------- transactions
def test_inside_a_transaction_the_stream_uses_its_connection(
    one: Database, db: Database
) -> None:
    with one.transaction() as tx:
        tx.insert("video_job", {"src_hash": "uncommitted", "input_path": "/u"})
        # Only the transaction's own connection sees its uncommitted row, and the
        # pool has one connection: the stream can only have run on it.
        hashes = [r["src_hash"] for r in one.iter_many("video_job", batch_size=500)]
        assert "uncommitted" in hashes and len(hashes) == ROWS + 1
        assert in_use(one) == 1
        rows = tx.stream(
            "SELECT src_hash FROM video_job WHERE src_hash = %s", ("uncommitted",)
        )
        assert list(rows) == [{"src_hash": "uncommitted"}]
        # A stream left early closes its cursor, and the transaction goes on.
        for _row in one.iter_many("video_job", batch_size=10):
            break
        tx.insert("video_job", {"src_hash": "after", "input_path": "/a"})
    assert in_use(one) == 0
    assert db.count("video_job", {"src_hash": ["uncommitted", "after"]}) == 2


def test_a_stream_outliving_its_transaction_says_so(one: Database) -> None:
    with one.transaction():
        rows = one.iter_many("video_job", batch_size=10)
        next(rows)
    with pytest.raises(TransactionError, match="before the transaction ends"):
        list(rows)
    assert in_use(one) == 0


def test_an_error_inside_a_transaction_rolls_the_block_back(
    one: Database, db: Database
) -> None:
    with pytest.raises(DataError), one.transaction() as tx:
        tx.insert("video_job", {"src_hash": "doomed", "input_path": "/d"})
        list(one.stream("SELECT 1 / 0"))
    assert in_use(one) == 0
    assert db.count("video_job", {"src_hash": "doomed"}) == 0


# ------------------------------------------------------------- PgBouncer
def test_a_stream_works_through_pgbouncer_in_transaction_mode(
    one: Database, pgaccess_dsn: str
) -> None:
    # PgBouncer hands each transaction any server connection: a cursor outside a
    # transaction would be looked for on the wrong one. Other statements run between
    # the batches, on the other server connection of the two.
    pgbouncer = pytest.importorskip(
        "support.pgbouncer", reason="tests/support/pgbouncer.py is not in this tree"
    )
    dbname = parse_dsn(pgaccess_dsn)["dbname"]
    want = [r["id"] for r in one.find_many("video_job", columns="id", order_by="id")]
    with (
        pgbouncer.running_pgbouncer(pgaccess_dsn, pool_size=2) as bouncer,
        Database(dsn=bouncer.dsn(dbname), maxconn=2) as via,
    ):
        got = []
        rows = via.iter_many("video_job", columns="id", order_by="id", batch_size=99)
        for n, row in enumerate(rows):
            got.append(row["id"])
            if n % 99 == 50:
                assert via.count("video_job") == ROWS
        assert got == want
        assert in_use(via) == 0
        for _row in via.stream("SELECT 1 FROM video_job", batch_size=10):
            break
        assert in_use(via) == 0
        assert via.count("video_job") == ROWS
