"""Every example of the usage guide (../shared/seeds/002_52a843c423099ae8.txt).

The guide's code is kept as written (between ``fmt: off`` and ``fmt: on``); only the
imports differ (``from pgaccess import ...`` for ``from db import ...``). The free
names an example uses (``highlights``, ``error_condition``, ``external_service``,
``job_id``, ``data``, ``logger``) are defined by each test, and the state the example
leaves in the database is checked from an independent psycopg2 connection.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from typing import List

import psycopg2
import pytest
from support.raw import Raw

from pgaccess import Database, DatabaseError, db_pool, with_retry

# Every test starts with the pipeline's tables empty (the plugin's `db` fixture) and
# uses the guide's own `Database()`: the default pool, configured from PGACCESS_DSN.
pytestmark = pytest.mark.usefixtures("db")

BASE = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def seed_jobs(raw: Raw, status: str, n: int, prefix: str) -> List[int]:
    """n jobs of ``status``; each one created a minute before the previous one."""
    return [
        raw.one(
            "INSERT INTO video_job (src_hash, status, input_path, created_at) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (
                f"{prefix}{i}",
                status,
                f"/v/{prefix}{i}.mp4",
                BASE - i * datetime.timedelta(minutes=1),
            ),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- Simple Operations
def test_simple_operations(raw: Raw) -> None:
    # Other queued jobs, created before the guide's, in an order unlike their ids.
    seed_jobs(raw, "queued", 12, "older-")

    # fmt: off
    # -- the guide's example --
    db = Database()

    # Insert a record
    job_id = db.insert('video_job', {
        'src_hash': 'abc123...',
        'status': 'queued',
        'input_path': '/path/to/video.mp4'
    })

    # Find a record
    job = db.find_one('video_job', {'id': job_id})

    # Update a record
    db.update('video_job', {'status': 'processing'}, {'id': job_id})

    # Find multiple records
    pending_jobs = db.find_many('video_job',
        where={'status': 'queued'},
        order_by='created_at',
        limit=10
    )

    # Count records
    queue_size = db.count('video_job', {'status': 'queued'})
    # -- end --
    # fmt: on

    assert isinstance(job_id, int)
    assert raw.one("SELECT id FROM video_job WHERE src_hash = 'abc123...'") == job_id
    assert job is not None
    assert (job["id"], job["src_hash"], job["status"], job["input_path"]) == (
        job_id,
        "abc123...",
        "queued",
        "/path/to/video.mp4",
    )
    assert (
        raw.one("SELECT status FROM video_job WHERE id = %s", (job_id,)) == "processing"
    )
    expected = [
        r[0]
        for r in raw.rows(
            "SELECT id FROM video_job WHERE status = 'queued' "
            "ORDER BY created_at LIMIT 10"
        )
    ]
    assert [j["id"] for j in pending_jobs] == expected
    assert len(pending_jobs) == 10
    assert job_id not in expected
    created = [j["created_at"] for j in pending_jobs]
    assert created == sorted(created)
    assert all(j["status"] == "queued" for j in pending_jobs)
    assert queue_size == raw.one(
        "SELECT count(*) FROM video_job WHERE status = 'queued'"
    )
    assert queue_size == 12


# --------------------------------------------------------------------- Transactions
HIGHLIGHTS = [
    {"start": 0.0, "end": 4.5, "score": 0.91},
    {"start": 10.0, "end": 12.25, "score": 0.42},
    {"start": 30.5, "end": 31.0, "score": 0.77},
]


@pytest.mark.parametrize("error_condition", [False, True])
def test_transactions(raw: Raw, error_condition: bool) -> None:
    highlights = HIGHLIGHTS

    # fmt: off
    # -- the guide's example --
    db = Database()

    # Using transaction context manager
    with db.transaction() as tx:
        # All operations in the transaction
        job_id = tx.execute(
            "INSERT INTO video_job (src_hash, status) VALUES (%s, %s) RETURNING id",
            ('hash123', 'queued')
        )[0]['id']

        # Create savepoint
        tx.savepoint('before_highlights')

        # Insert highlights
        for highlight in highlights:
            tx.execute(
                "INSERT INTO highlight (job_id, start_time, end_time, score) VALUES (%s, %s, %s, %s)",  # noqa: E501
                (job_id, highlight['start'], highlight['end'], highlight['score'])
            )

        # Rollback to savepoint if needed
        if error_condition:
            tx.rollback_to_savepoint('before_highlights')
    # -- end --
    # fmt: on

    # The job is committed either way; the highlights only without the error.
    assert raw.rows("SELECT id, src_hash, status, input_path FROM video_job") == [
        (job_id, "hash123", "queued", None)
    ]
    stored = raw.rows(
        "SELECT job_id, start_time, end_time, score FROM highlight ORDER BY start_time"
    )
    if error_condition:
        assert stored == []
    else:
        assert stored == [
            (job_id, h["start"], h["end"], h["score"]) for h in highlights
        ]
    assert db.pool.stats()["in_use"] == 0


def test_transactions_rolled_back_when_the_block_raises(raw: Raw) -> None:
    db = Database()
    with pytest.raises(ZeroDivisionError), db.transaction() as tx:
        tx.execute(
            "INSERT INTO video_job (src_hash, status) VALUES (%s, %s) RETURNING id",
            ("hash123", "queued"),
        )
        tx.savepoint("before_highlights")
        1 / 0  # noqa: B018
    assert raw.one("SELECT count(*) FROM video_job") == 0
    assert db.pool.stats()["in_use"] == 0


# ---------------------------------------------------------------------- Raw Queries
def test_raw_queries(raw: Raw) -> None:
    completed = seed_jobs(raw, "completed", 12, "done-")
    seed_jobs(raw, "queued", 3, "todo-")
    for n, jid in enumerate(completed):
        for k in range(n % 4):
            raw.rows(
                "INSERT INTO highlight (job_id, start_time, end_time, score) "
                "VALUES (%s, %s, %s, 0.5)",
                (jid, k, k + 1),
            )

    # fmt: off
    # -- the guide's example --
    db = Database()

    # Execute raw query
    results = db.execute("""
        SELECT j.*, COUNT(h.id) as highlight_count
        FROM video_job j
        LEFT JOIN highlight h ON j.id = h.job_id
        WHERE j.status = %s
        GROUP BY j.id
        ORDER BY j.created_at DESC
        LIMIT %s
    """, ('completed', 10))
    # -- end --
    # fmt: on

    expected = raw.rows(
        "SELECT j.id, (SELECT count(*) FROM highlight h WHERE h.job_id = j.id) "
        "FROM video_job j WHERE j.status = 'completed' "
        "ORDER BY j.created_at DESC LIMIT 10"
    )
    assert [(r["id"], r["highlight_count"]) for r in results] == expected
    assert len(results) == 10
    assert all(type(r) is dict for r in results)
    assert all(r["status"] == "completed" for r in results)
    assert "src_hash" in results[0] and "input_path" in results[0]


# ------------------------------------------------------- Connection Pool Direct Access
def test_connection_pool_direct_access(raw: Raw) -> None:
    ids = seed_jobs(raw, "processing", 3, "p-")
    job_id = ids[1]

    # fmt: off
    # -- the guide's example --
    # Get a connection directly from pool
    with db_pool.get_connection() as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT * FROM video_job")
        results = cursor.fetchall()
        cursor.close()

    # Get a cursor with automatic cleanup
    with db_pool.get_cursor() as cursor:
        cursor.execute("UPDATE video_job SET status = %s WHERE id = %s", ('failed', job_id))  # noqa: E501
    # -- end --
    # fmt: on

    assert sorted(r[0] for r in results) == sorted(ids)  # plain tuples, id first
    assert len(results) == 3
    # The UPDATE was committed when the block ended.
    assert raw.rows("SELECT id, status FROM video_job ORDER BY id") == [
        (ids[0], "processing"),
        (job_id, "failed"),
        (ids[2], "processing"),
    ]
    assert db_pool.stats()["in_use"] == 0


def test_connection_pool_get_cursor_rows_are_dicts(raw: Raw) -> None:
    ids = seed_jobs(raw, "queued", 2, "d-")
    with db_pool.get_cursor() as cursor:
        cursor.execute("SELECT id, src_hash FROM video_job ORDER BY id")
        rows = cursor.fetchall()
    assert all(isinstance(r, dict) for r in rows)
    assert [dict(r) for r in rows] == [
        {"id": ids[0], "src_hash": "d-0"},
        {"id": ids[1], "src_hash": "d-1"},
    ]


def test_connection_pool_blocks_are_transactions(raw: Raw) -> None:
    # A block that raises is rolled back, as psycopg2's own connection blocks are.
    (job_id,) = seed_jobs(raw, "queued", 1, "t-")
    with pytest.raises(RuntimeError), db_pool.get_cursor() as cursor:
        cursor.execute(
            "UPDATE video_job SET status = %s WHERE id = %s", ("failed", job_id)
        )
        raise RuntimeError("changed my mind")
    assert raw.one("SELECT status FROM video_job") == "queued"
    with pytest.raises(RuntimeError), db_pool.get_connection() as conn:
        cur = conn.cursor()
        cur.execute("DELETE FROM video_job")
        raise RuntimeError("changed my mind")
    assert raw.one("SELECT count(*) FROM video_job") == 1
    assert db_pool.stats()["in_use"] == 0


# ------------------------------------------------------------------ Retry Mechanism
class ExternalService:
    """Not ready for the first ``not_ready`` checks, then ready."""

    def __init__(self, not_ready: int) -> None:
        self.not_ready = not_ready
        self.checks = 0

    def is_ready(self) -> bool:
        self.checks += 1
        return self.checks > self.not_ready


def test_retry_mechanism(raw: Raw) -> None:
    (job_id,) = seed_jobs(raw, "processing", 1, "r-")
    external_service = ExternalService(not_ready=2)

    # fmt: off
    # -- the guide's example (delay=0.01 rather than 1.0, to keep the test fast) --
    db = Database()

    # Retry a flaky operation
    def update_with_external_check():
        # Check external service
        if not external_service.is_ready():
            raise psycopg2.OperationalError("Service not ready")

        return db.update('video_job', {'status': 'completed'}, {'id': job_id})

    result = with_retry(update_with_external_check, max_attempts=3, delay=0.01)
    # -- end --
    # fmt: on

    assert result == 1  # one row updated
    assert external_service.checks == 3
    assert (
        raw.one("SELECT status FROM video_job WHERE id = %s", (job_id,)) == "completed"
    )


def test_retry_mechanism_gives_up_after_max_attempts(raw: Raw) -> None:
    (job_id,) = seed_jobs(raw, "processing", 1, "r-")
    external_service = ExternalService(not_ready=3)
    db = Database()

    def update_with_external_check() -> int:
        if not external_service.is_ready():
            raise psycopg2.OperationalError("Service not ready")
        return db.update("video_job", {"status": "completed"}, {"id": job_id})

    with pytest.raises(psycopg2.OperationalError, match="Service not ready"):
        with_retry(update_with_external_check, max_attempts=3, delay=0.01)
    assert external_service.checks == 3
    assert (
        raw.one("SELECT status FROM video_job WHERE id = %s", (job_id,)) == "processing"
    )


def test_retry_mechanism_with_the_guides_delay(raw: Raw) -> None:
    # The guide's literal delay=1.0, with one failure: one wait of 1 s (plus jitter).
    (job_id,) = seed_jobs(raw, "processing", 1, "r-")
    external_service = ExternalService(not_ready=1)
    db = Database()

    def update_with_external_check() -> int:
        if not external_service.is_ready():
            raise psycopg2.OperationalError("Service not ready")
        return db.update("video_job", {"status": "completed"}, {"id": job_id})

    started = time.monotonic()
    result = with_retry(update_with_external_check, max_attempts=3, delay=1.0)
    waited = time.monotonic() - started
    assert result == 1
    assert 1.0 <= waited < 3.0
    assert (
        raw.one("SELECT status FROM video_job WHERE id = %s", (job_id,)) == "completed"
    )


# ---------------------------------------------------------------------- Thread Safety
def test_thread_safety(raw: Raw) -> None:
    (job_id,) = seed_jobs(raw, "processing", 1, "ts-")

    # fmt: off
    # -- the guide's example --
    db = Database()

    def worker(thread_id):
        for i in range(100):
            db.insert('processing_metrics', {
                'job_id': job_id,
                'stage': f'thread_{thread_id}',
                'duration_ms': i * 100
            })

    # Safe to use from multiple threads
    threads = []
    for i in range(4):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)

    for t in threads:
        t.join(timeout=60)  # the guide has no timeout; a test must not hang
    # -- end --
    # fmt: on

    assert not any(t.is_alive() for t in threads)
    assert raw.one("SELECT count(*) FROM processing_metrics") == 400
    per_stage = raw.rows(
        "SELECT stage, count(*), sum(duration_ms), count(DISTINCT duration_ms), "
        "bool_and(job_id = %s) FROM processing_metrics GROUP BY stage ORDER BY stage",
        (job_id,),
    )
    assert per_stage == [
        (f"thread_{i}", 100, float(sum(k * 100 for k in range(100))), 100, True)
        for i in range(4)
    ]
    assert raw.one("SELECT count(DISTINCT op_id) FROM processing_metrics") == 400
    assert db.pool.stats()["in_use"] == 0


# ----------------------------------------------------------------- Exception handling
BAD_DATA = {
    "missing src_hash": {"status": "queued", "input_path": "/x.mp4"},
    "unknown status": {"src_hash": "bad-status", "status": "exploded"},
    "unknown column": {"src_hash": "bad-column", "stauts": "queued"},
    "duplicate src_hash": {"src_hash": "taken"},
    "NUL in a value": {"src_hash": "nul\x00byte"},
    "hostile column name": {"src_hash": "x", 'status"; DROP TABLE video_job; --': "q"},
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_exception_handling(
    raw: Raw, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    raw.rows("INSERT INTO video_job (src_hash) VALUES ('taken')")
    data = BAD_DATA[case]
    logger = logging.getLogger("pipeline.worker")
    result = "not set"

    with caplog.at_level(logging.ERROR, logger="pipeline.worker"):
        # fmt: off
        # -- the guide's example --
        db = Database()

        try:
            result = db.insert('video_job', data)
        except DatabaseError as e:
            logger.error(f"Database operation failed: {e}")
            # Handle appropriately
        except Exception as e:
            logger.error(f"Unexpected error: {e}")
            # Handle appropriately
        # -- end --
        # fmt: on

    assert result == "not set"
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.worker"]
    assert len(messages) == 1
    assert messages[0].startswith("Database operation failed: "), messages[0]
    assert raw.rows("SELECT src_hash FROM video_job") == [("taken",)]


def test_exception_handling_good_data(
    raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"src_hash": "fine", "input_path": "/fine.mp4"}
    logger = logging.getLogger("pipeline.worker")
    db = Database()
    with caplog.at_level(logging.ERROR, logger="pipeline.worker"):
        try:
            result = db.insert("video_job", data)
        except DatabaseError as e:  # pragma: no cover
            logger.error(f"Database operation failed: {e}")
        except Exception as e:  # pragma: no cover
            logger.error(f"Unexpected error: {e}")
    assert [r for r in caplog.records if r.name == "pipeline.worker"] == []
    assert raw.rows("SELECT id, src_hash FROM video_job") == [(result, "fine")]


# -------------------------------------------------------- Performance Considerations
def test_execute_many_for_bulk_inserts(raw: Raw) -> None:
    # "Use `execute_many()` for bulk inserts"
    db = Database()
    n = db.execute_many(
        "INSERT INTO video_job (src_hash, input_path) VALUES (%s, %s)",
        [(f"bulk{i}", f"/v/{i}.mp4") for i in range(50)],
    )
    assert n == 50
    assert raw.one("SELECT count(*) FROM video_job WHERE src_hash LIKE 'bulk%%'") == 50


def test_pool_size_is_twice_the_cores() -> None:
    # "Pool size is automatically set to 2x CPU cores" (the cores this process may use)
    if os.environ.get("PGACCESS_POOL_SIZE"):
        pytest.skip("PGACCESS_POOL_SIZE overrides the default")
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # pragma: no cover
        cores = os.cpu_count() or 1
    assert db_pool.stats()["maxconn"] == 2 * cores
