"""Per-key concurrency limits against a real PostgreSQL: ``enqueue(...,
concurrency_key=...)`` and ``set_concurrency(key, n)``; never more than n jobs of a
key processing, across threads and processes, checked by sampling the table."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any, Dict, Iterator, List

import psycopg2
import pytest

from pgaccess import Database, InvalidQuery
from pgaccess.jobs import Metrics, VideoJobs, Worker


@pytest.fixture
def jobs(db: Database) -> Iterator[VideoJobs]:
    # The limits table is not among the pipeline's tables the plugin empties per test
    # (it holds settings, not work): each test here starts and ends without limits.
    db.execute("DELETE FROM video_job_concurrency")
    yield VideoJobs(db)
    db.execute("DELETE FROM video_job_concurrency")


def keys_of(db: Database, ids: List[int]) -> List[Any]:
    rows = db.execute(
        "SELECT concurrency_key FROM video_job WHERE id = ANY(%s) ORDER BY id", (ids,)
    )
    return [r["concurrency_key"] for r in rows]


def claimed(jobs: VideoJobs, worker_id: str, limit: int = 100) -> List[int]:
    return [r["id"] for r in jobs.claim(worker_id, limit=limit)]


def test_a_full_key_is_skipped_and_the_other_jobs_taken(
    db: Database, jobs: VideoJobs
) -> None:
    cam = [
        jobs.enqueue(f"cam{i}", None, concurrency_key="cam", priority=9)
        for i in range(5)
    ]
    free = [jobs.enqueue(f"free{i}", None, concurrency_key="free") for i in range(3)]
    plain = [jobs.enqueue(f"plain{i}", None) for i in range(3)]
    jobs.set_concurrency("cam", 2)
    got = claimed(jobs, "w1")
    assert sorted(got) == sorted(cam[:2] + free + plain)  # cam's best two, the rest
    assert claimed(jobs, "w2") == []  # cam is full
    jobs.complete(cam[0], "w1")
    assert claimed(jobs, "w2") == [cam[2]]  # one slot freed, one taken
    assert jobs.concurrency_limits() == {"cam": {"max_running": 2, "processing": 2}}


def test_zero_pauses_a_key_and_none_removes_its_limit(
    db: Database, jobs: VideoJobs
) -> None:
    ids = [jobs.enqueue(f"p{i}", None, concurrency_key="paused") for i in range(3)]
    jobs.set_concurrency("paused", 0)
    assert claimed(jobs, "w") == []
    jobs.set_concurrency("paused", None)
    assert jobs.concurrency_limits() == {}
    assert sorted(claimed(jobs, "w")) == ids


def test_a_limit_set_elsewhere_holds_at_once(db: Database, jobs: VideoJobs) -> None:
    here, elsewhere = jobs, VideoJobs(db)
    here.LIMITS_RECHECK = 0.3
    assert claimed(here, "w") == []  # here has looked: no limit anywhere
    ids = [here.enqueue(f"e{i}", None, concurrency_key="cam-12") for i in range(4)]
    elsewhere.set_concurrency("cam-12", 1)
    # here has not looked again, yet claims none of the limited key's jobs ...
    assert claimed(here, "w") == []
    time.sleep(0.35)
    # ... and once it has, no more than the limit.
    assert claimed(here, "w") == [ids[0]]
    assert claimed(here, "w") == []


def test_bad_limits_and_keys_are_refused_and_change_nothing(
    db: Database, jobs: VideoJobs
) -> None:
    for key, limit in (("", 1), ("k", -1), ("k", 1.5), ("k", True), (None, 1)):
        with pytest.raises(InvalidQuery):
            jobs.set_concurrency(key, limit)  # type: ignore[arg-type]
    with pytest.raises(InvalidQuery, match="concurrency_key"):
        jobs.enqueue("x", None, concurrency_key="")
    assert db.count("video_job_concurrency") == 0
    assert db.count("video_job") == 0


# ------------------------------------------------------------- the sampler
KEYS = [f"key{i}" for i in range(10)]
LIMITS = {k: 1 + i % 2 for i, k in enumerate(KEYS)}  # 15 slots for 16 threads
N_JOBS = 2000
PROCESSES, THREADS = 4, 4


def drain_keyed(dsn: str, name: str, threads: int) -> None:
    """A Worker process: each job's handler takes a moment and leaves a trace."""
    with Database(dsn=dsn, maxconn=threads + 2) as db:
        metrics = Metrics(db)

        def handler(job: Dict[str, Any]) -> None:
            time.sleep(0.002)
            metrics.record(job["id"], "handler_run", 0.0)

        worker = Worker(
            db, handler, threads=threads, worker_id=name, idle_min=0.01, idle_max=0.05
        )
        worker.start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                left = db.execute(
                    "SELECT count(*) AS n FROM video_job WHERE status <> 'completed'"
                )
                if not left[0]["n"]:
                    break
                time.sleep(0.05)
        finally:
            worker.stop()
            worker.join(30)


def test_sixteen_threads_over_four_processes_never_exceed_a_keys_limit(
    db: Database, jobs: VideoJobs, pgaccess_dsn: str
) -> None:
    for key, limit in LIMITS.items():
        jobs.set_concurrency(key, limit)
    ids = jobs.enqueue_many(
        [
            {"src_hash": f"s{i}", "input_path": None, "concurrency_key": KEYS[i % 10]}
            for i in range(N_JOBS)
        ]
    )
    peak: Dict[str, int] = dict.fromkeys(KEYS, 0)
    over: List[Dict[str, int]] = []
    samples = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal samples
        conn = psycopg2.connect(pgaccess_dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    cur.execute(
                        "SELECT concurrency_key, count(*) FROM video_job "
                        "WHERE status = 'processing' GROUP BY 1"
                    )
                    now = dict(cur.fetchall())
                    samples += 1
                    for key, n in now.items():
                        peak[key] = max(peak[key], n)
                    if any(n > LIMITS[k] for k, n in now.items()):
                        over.append(now)
        finally:
            conn.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=drain_keyed, args=(pgaccess_dsn, f"proc{i}", THREADS))
        for i in range(PROCESSES)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
    finally:
        stop.set()
        sampler.join(30)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert not over, over[:5]
    assert samples > 20
    # The limits were reached (the test saw contention), never passed.
    assert any(peak[k] == LIMITS[k] for k in KEYS), peak
    assert all(peak[k] <= LIMITS[k] for k in KEYS), peak
    # Every job ran, once.
    assert db.count("video_job", {"status": "completed"}) == N_JOBS
    runs = db.execute(
        "SELECT count(*) AS n, count(DISTINCT job_id) AS jobs FROM processing_metrics "
        "WHERE stage = 'handler_run'"
    )
    assert (runs[0]["n"], runs[0]["jobs"]) == (N_JOBS, N_JOBS)
    assert sorted(keys_of(db, ids[:10])) == sorted(KEYS)
    procs_seen = db.execute(
        "SELECT count(DISTINCT split_part(locked_by, '-', 1)) AS n FROM video_job"
    )
    assert procs_seen[0]["n"] > 1
