"""The Worker's batches against a real PostgreSQL: batch claims, batched completions,
what a clean stop gives back, and what a failure inside a batch does to its mates.

Every test counts statements or reads the database; each fails with its feature
taken out (claims of one job, a completion statement per job, no hold on jobs not
started, no fallback for a refused batch, no check of what a lost reply did).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Dict, List, Optional

import pytest
from support.faultproxy import FaultProxy
from support.workers import (
    CLAIM_MARK,
    COMPLETE_MANY_MARK,
    COMPLETE_ONE_MARK,
    RecordingJobs,
    enqueue_n,
    statement_calls,
    wait_until,
)

from pgaccess import Database
from pgaccess.jobs import VideoJobs, Worker


@pytest.fixture
def jobs(db: Database) -> RecordingJobs:
    queue = RecordingJobs(db)
    queue.BACKOFF_BASE = 0.0
    return queue


def start(running: List[Worker], worker: Worker) -> Worker:
    running.append(worker)
    worker.start()
    return worker


def statuses(db: Database) -> Dict[str, int]:
    rows = db.execute("SELECT status, count(*) AS n FROM video_job GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


# --------------------------------------------------------------- batch claims
def test_a_deep_queue_is_claimed_and_completed_in_batches(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    n = 1000
    enqueue_n(jobs, n)
    claims0 = statement_calls(db, CLAIM_MARK)
    completes0 = statement_calls(db, COMPLETE_MANY_MARK)
    singles0 = statement_calls(db, COMPLETE_ONE_MARK)  # counts are per process
    worker = Worker(db, lambda job: None, threads=1, jobs=jobs)
    start(running, worker)
    wait_until(lambda: worker.stats()["completed"] == n, what="the drain")
    sizes = jobs.batch_sizes()
    assert sum(sizes) == n
    # 1, 2, 4, ... up to the cap, then the cap: about 20 claims, not 1,000.
    assert max(sizes) == Worker.CLAIM_BATCH_MAX
    assert sizes[:4] == [1, 2, 4, 8]
    claims = statement_calls(db, CLAIM_MARK) - claims0
    completions = statement_calls(db, COMPLETE_MANY_MARK) - completes0
    assert claims <= 30, claims
    # One statement per batch, and more only when a completion would otherwise
    # wait over FLUSH_AFTER (a loaded machine stalls a thread that long now and
    # then): far fewer than one per job either way.
    assert len(sizes) <= completions < n // 10, completions
    assert statement_calls(db, COMPLETE_ONE_MARK) == singles0
    assert statuses(db) == {"completed": n}
    # The worker's own timing went in with each completion, once.
    assert db.count("processing_metrics", {"stage": "handler"}) == n


def test_a_short_queue_is_claimed_one_job_at_a_time(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    seen: List[int] = []
    worker = Worker(
        db, lambda job: seen.append(job["id"]), threads=2, jobs=jobs, idle_max=0.05
    )
    start(running, worker)
    for i in range(8):
        jobs.enqueue(f"trickle{i}", "/in/t")
        wait_until(lambda n=i + 1: len(seen) == n, what="the job")
        time.sleep(0.03)
    assert set(jobs.batch_sizes()) == {1}


def test_a_batch_is_kept_under_batch_seconds_of_handler_time(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    enqueue_n(jobs, 40)
    worker = Worker(db, lambda job: time.sleep(0.02), threads=1, jobs=jobs)
    worker.BATCH_SECONDS = 0.05  # two or three jobs of 20 ms
    start(running, worker)
    wait_until(lambda: worker.stats()["completed"] == 40, what="the drain")
    assert max(jobs.batch_sizes()) <= 4


def test_jobs_claimed_but_not_started_are_held_and_given_back_on_stop(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    jobs.HEARTBEAT_INTERVAL = 0.05
    ids = jobs.enqueue_many(
        [
            {"src_hash": f"p{i}", "input_path": "/in", "priority": 10 - i}
            for i in range(6)
        ]
    )
    in_second = threading.Event()
    go_on = threading.Event()
    order: List[int] = []

    def handler(job: Dict[str, Any]) -> None:
        order.append(job["id"])
        if len(order) == 2:  # the first job of the second batch (of two)
            in_second.set()
            assert go_on.wait(20)

    worker = Worker(db, handler, threads=1, jobs=jobs)
    start(running, worker)
    assert in_second.wait(20)
    assert order == ids[:2]
    waiting = ids[2]  # claimed with ids[1], not started
    row = db.find_one("video_job", {"id": waiting})
    assert row is not None and row["status"] == "processing"
    claimed_at = row["locked_at"]

    def beaten() -> bool:
        r = db.find_one("video_job", {"id": waiting})
        return r is not None and r["heartbeat_at"] > claimed_at

    wait_until(beaten, 5, "a heartbeat of the job not started")
    worker.stop()
    go_on.set()
    assert worker.join(15)
    rows = {r["id"]: r for r in db.find_many("video_job")}
    assert rows[ids[1]]["status"] == "completed"  # the job in hand was finished
    assert (rows[waiting]["status"], rows[waiting]["attempts"]) == ("queued", 0)
    assert {(rows[i]["status"], rows[i]["attempts"]) for i in ids[3:]} == {
        ("queued", 0)
    }
    stats = worker.stats()
    assert (stats["claimed"], stats["completed"], stats["released"]) == (3, 2, 1)
    # Given back at once, to the next worker.
    assert [j["id"] for j in VideoJobs(db).claim("next")] == [waiting]


# ------------------------------------------------------ failures in a batch
def test_a_handler_that_raises_fails_its_own_job_and_not_its_batch_mates(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    ids = enqueue_n(jobs, 30)
    doomed = ids[10]  # in the batch of 8 (jobs 7 to 14)

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        if job["id"] == doomed:
            raise ValueError("bad frame")
        return {"highlights": [{"start": 0, "end": 1, "score": 0.5}]}

    jobs.BACKOFF_BASE = 3600.0  # the failed job stays out of the way
    worker = Worker(db, handler, threads=1, jobs=jobs)
    start(running, worker)
    wait_until(lambda: worker.stats()["completed"] == 29, what="the drain")
    assert 8 in jobs.batch_sizes()
    row = db.find_one("video_job", {"id": doomed})
    assert row is not None
    assert (row["status"], row["error"]) == ("queued", "ValueError: bad frame")
    assert statuses(db) == {"completed": 29, "queued": 1}
    assert db.count("highlight") == 29
    assert worker.stats()["failed"] == 1


def test_a_highlight_the_schema_refuses_fails_its_own_job_only(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    ids = enqueue_n(jobs, 30)
    bad = ids[10]

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        start = -1.0 if job["id"] == bad else 0.0  # start_time >= 0 is required
        return {"highlights": [{"start": start, "end": 1, "score": 0.5}]}

    jobs.BACKOFF_BASE = 3600.0
    worker = Worker(db, handler, threads=1, jobs=jobs)
    start(running, worker)
    wait_until(lambda: worker.stats()["completed"] == 29, what="the drain")
    row = db.find_one("video_job", {"id": bad})
    assert row is not None and row["status"] == "queued"
    assert row["error"].startswith("could not complete: CheckViolation")
    assert statuses(db) == {"completed": 29, "queued": 1}
    assert db.count("highlight") == 29
    assert db.count("highlight", {"job_id": bad}) == 0
    assert worker.stats()["failed"] == 1


def test_a_batch_whose_reply_was_lost_is_completed_exactly_once(
    db: Database, proxy_db: Database, fault_proxy: FaultProxy, running: List[Worker]
) -> None:
    jobs = RecordingJobs(proxy_db)
    jobs.RETRY = dataclasses.replace(VideoJobs.RETRY, delay=0.01)
    ids = enqueue_n(jobs, 40)

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "highlights": [{"start": 0, "end": 1, "score": 0.5}],
            "metrics": {"encode": 1.0},
        }

    # The first batch's completion commits on the server; its reply never arrives.
    fault_proxy.drop_after(COMPLETE_MANY_MARK, times=1)
    worker = Worker(proxy_db, handler, threads=1, jobs=jobs, listen=False)
    start(running, worker)
    wait_until(lambda: worker.stats()["completed"] == 40, what="the drain")
    assert fault_proxy.drops == 1
    stats = worker.stats()
    assert (stats["completed"], stats["lost"], stats["errors"]) == (40, 0, 0)
    assert statuses(db) == {"completed": 40}
    for table, stage in (("highlight", None), ("processing_metrics", "encode")):
        where = "" if stage is None else f" WHERE stage = '{stage}'"
        rows = db.execute(
            f"SELECT job_id, count(*) AS n FROM {table}{where} GROUP BY job_id"
        )
        assert {r["job_id"]: r["n"] for r in rows} == dict.fromkeys(ids, 1), table


def test_a_job_reclaimed_mid_batch_is_lost_to_its_worker_alone(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    _, b, c = jobs.enqueue_many(
        [
            {"src_hash": h, "input_path": "/in", "priority": p}
            for h, p in (("a", 3), ("b", 2), ("c", 1))
        ]
    )
    other = VideoJobs(db)
    taken: List[Optional[int]] = []

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        if job["id"] == b:  # the first job of the second batch, [b, c]
            # c, claimed with b, is reclaimed meanwhile and another worker takes it.
            db.execute(
                "UPDATE video_job SET heartbeat_at = now() - interval '1 hour' "
                "WHERE id = %s",
                (c,),
            )
            assert other.reclaim_stale(60) == 1
            taken.extend(r["id"] for r in other.claim("other"))
        return {"highlights": [{"start": 0, "end": 1, "score": 0.5}]}

    worker = Worker(db, handler, threads=1, jobs=jobs)
    start(running, worker)
    wait_until(lambda: worker.stats()["lost"] == 1, what="the JobLost")
    assert taken == [c]
    assert jobs.batch_sizes()[:2] == [1, 2]
    stats = worker.stats()
    assert (stats["completed"], stats["lost"]) == (2, 1)
    rows = {r["id"]: r for r in db.find_many("video_job")}
    assert (rows[b]["status"], rows[c]["status"]) == ("completed", "processing")
    assert rows[c]["locked_by"] == "other"
    assert db.count("highlight", {"job_id": c}) == 0  # the late completion: nothing
    other.complete(c, "other", highlights=[{"start": 5, "end": 6, "score": 1}])
    assert db.count("highlight", {"job_id": c}) == 1


def test_purge_after_runs_purge_on_an_interval(
    db: Database, jobs: RecordingJobs, running: List[Worker]
) -> None:
    enqueue_n(jobs, 5)
    worker = Worker(db, lambda job: None, jobs=jobs, purge_after=0.2)
    worker.PURGE_INTERVAL = 0.1
    start(running, worker)
    wait_until(lambda: db.count("video_job") == 0, 10, "the purge")
    assert worker.stats()["completed"] == 5
