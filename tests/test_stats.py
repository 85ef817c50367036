"""Query statistics and the slow-query log, counted on real statements."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest

from pgaccess import ConnectionPool, Database, UnknownColumn


def _entry(db: Database, marker: str) -> dict:
    matches = [q for q in db.stats(top=None)["queries"] if marker in q["statement"]]
    assert len(matches) == 1, matches
    return matches[0]


def test_calls_errors_and_times_per_statement_from_all_threads(db: Database) -> None:
    marker = f"m_{uuid.uuid4().hex}"
    query = f"SELECT %s::int AS {marker}"
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for i in range(25):
            db.execute(query, (i,))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    with pytest.raises(Exception):  # noqa: B017 - any error counts as one
        db.execute(query, ("not a number",))
    entry = _entry(db, marker)
    assert entry["calls"] == 101
    assert entry["errors"] == 1
    assert 0 < entry["max_ms"] <= entry["total_ms"]
    assert entry["mean_ms"] == pytest.approx(entry["total_ms"] / 101, rel=0.01)


def test_facade_statements_are_counted_by_shape(db: Database) -> None:
    db.insert("video_job", {"src_hash": "s1", "input_path": "/1"})
    before = db.stats(top=None)["queries"]
    for i in range(3):
        db.find_one("video_job", {"src_hash": f"s{i}"}, order_by="-created_at")
    after = db.stats(top=None)["queries"]
    shape = 'SELECT * FROM "video_job" WHERE "src_hash" = %s ORDER BY "created_at" DESC'

    def calls(entries: list) -> int:
        return sum(e["calls"] for e in entries if e["statement"].startswith(shape))

    # One entry for the shape, counted three times: the values are not part of it.
    assert calls(after) - calls(before) == 3


def test_slow_queries_are_logged(
    pgaccess_pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    # A threshold a loaded CI machine does not reach with SELECT 1 (50 ms did, once,
    # with four test workers and a pip install sharing two cores).
    db = Database(pool=pgaccess_pool, slow_query_ms=600)
    with caplog.at_level(logging.WARNING, logger="pgaccess.stats"):
        db.execute("SELECT pg_sleep(0.7)")
        db.execute("SELECT 1")
    slow = [r for r in caplog.records if "slow query" in r.getMessage()]
    assert len(slow) == 1 and "pg_sleep" in slow[0].getMessage()


def test_statistics_can_be_turned_off(pgaccess_pool: ConnectionPool) -> None:
    db = Database(pool=pgaccess_pool, query_stats=False)
    marker = f"off_{uuid.uuid4().hex}"
    db.execute(f"SELECT 1 AS {marker}")
    with db.transaction() as tx:
        tx.execute(f"SELECT 2 AS {marker}")
    assert not [q for q in db.stats(top=None)["queries"] if marker in q["statement"]]


def test_unknown_column_errors_are_counted(db: Database) -> None:
    with pytest.raises(UnknownColumn):
        db.count("video_job", {"no_such_column_x": 1})
    entry = _entry(db, '"no_such_column_x"')
    assert entry["errors"] == 1
