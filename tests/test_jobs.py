"""The pipeline layer (pgaccess.jobs) against a real PostgreSQL.

Every assertion reads the database: statuses, attempts, timestamps computed by the
server, how many rows a handler left behind.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import multiprocessing
import threading
import time
from typing import Any, Dict, Iterator, List

import psycopg2
import pytest
from support import jobworker
from support.faultproxy import FaultProxy

from pgaccess import CheckViolation, CommitOutcomeUnknown, Database
from pgaccess.jobs import Highlights, JobLost, Metrics, VideoJobs, Worker


@pytest.fixture
def jobs(db: Database) -> VideoJobs:
    queue = VideoJobs(db)
    # Small, but far above a statement's duration, so backoff steps can be measured.
    queue.BACKOFF_BASE = 0.2
    queue.BACKOFF_MAX = 0.6
    return queue


def job_row(db: Database, job_id: int) -> Dict[str, Any]:
    row = db.find_one("video_job", {"id": job_id})
    assert row is not None
    return row


def enqueue_n(jobs: VideoJobs, n: int, prefix: str = "v") -> List[int]:
    return jobs.enqueue_many(
        [{"src_hash": f"{prefix}{i}", "input_path": f"/in/{i}.mp4"} for i in range(n)]
    )


def handler_runs(db: Database) -> Dict[int, int]:
    """How many times the handler ran, per job (its 'handler_run' metric rows)."""
    rows = db.execute(
        "SELECT job_id, count(*) AS n FROM processing_metrics "
        "WHERE stage = 'handler_run' GROUP BY job_id"
    )
    return {r["job_id"]: r["n"] for r in rows}


def status_counts(db: Database) -> Dict[str, int]:
    rows = db.execute("SELECT status, count(*) AS n FROM video_job GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


# ------------------------------------------------------------------ enqueue
def test_enqueue_is_idempotent_on_src_hash(db: Database, jobs: VideoJobs) -> None:
    first = jobs.enqueue("abc", "/in/a.mp4", priority=2)
    again = jobs.enqueue("abc", "/in/other.mp4", priority=9)
    assert again == first
    assert db.count("video_job") == 1
    row = job_row(db, first)
    assert (row["input_path"], row["priority"], row["status"]) == (
        "/in/a.mp4",
        2,
        "queued",
    )


def test_enqueue_many_returns_ids_in_order_including_existing(
    db: Database, jobs: VideoJobs
) -> None:
    existing = jobs.enqueue("b", "/in/b.mp4")
    ids = jobs.enqueue_many(
        [
            {"src_hash": "a", "input_path": "/in/a.mp4"},
            {"src_hash": "b", "input_path": "/in/b2.mp4"},
            {"src_hash": "c", "input_path": "/in/c.mp4", "priority": 5},
            {"src_hash": "a", "input_path": "/in/a-again.mp4"},
        ]
    )
    assert db.count("video_job") == 3
    by_hash = {r["src_hash"]: r for r in db.find_many("video_job")}
    assert ids == [by_hash["a"]["id"], existing, by_hash["c"]["id"], by_hash["a"]["id"]]
    assert by_hash["a"]["input_path"] == "/in/a.mp4"
    assert by_hash["b"]["input_path"] == "/in/b.mp4"
    assert by_hash["c"]["priority"] == 5
    assert jobs.enqueue_many([]) == []


def test_enqueue_racing_an_uncommitted_enqueue_returns_its_id(
    db: Database, jobs: VideoJobs, pgaccess_dsn: str
) -> None:
    other = psycopg2.connect(pgaccess_dsn)
    try:
        with other.cursor() as cur:
            cur.execute(
                "INSERT INTO video_job (src_hash, input_path) VALUES ('x', '/in/x') "
                "RETURNING id"
            )
            (theirs,) = cur.fetchone()
        result: List[int] = []
        racer = threading.Thread(
            target=lambda: result.append(jobs.enqueue("x", "/in/mine"))
        )
        racer.start()
        time.sleep(0.2)  # the racer now waits on the uncommitted row
        assert racer.is_alive() and not result
        other.commit()
        racer.join(10)
    finally:
        other.close()
    assert result == [theirs]
    assert db.count("video_job") == 1


# -------------------------------------------------------------------- claim
def test_claim_sets_the_lease(db: Database, jobs: VideoJobs) -> None:
    job_id = jobs.enqueue("v", "/in/v.mp4")
    (claimed,) = jobs.claim("w1")
    row = job_row(db, job_id)
    assert claimed["id"] == job_id
    assert row["status"] == "processing"
    assert row["locked_by"] == "w1"
    assert row["attempts"] == 1
    assert row["locked_at"] is not None and row["heartbeat_at"] == row["locked_at"]
    assert jobs.claim("w2") == []


def test_claim_never_takes_attempts_past_max_attempts(
    db: Database, jobs: VideoJobs
) -> None:
    spent = jobs.enqueue("spent", "/in/s", max_attempts=2, priority=9)
    # An operator lowered the limit below what the job has used: it must not run.
    db.update("video_job", {"attempts": 2}, {"id": spent})
    fresh = jobs.enqueue("fresh", "/in/f")
    assert [j["id"] for j in jobs.claim("w", limit=5)] == [fresh]
    row = job_row(db, spent)
    assert (row["status"], row["attempts"]) == ("queued", 2)


def test_claim_honours_priority_then_age(db: Database, jobs: VideoJobs) -> None:
    low_old = jobs.enqueue("low-old", "/in/1", priority=0)
    high = jobs.enqueue("high", "/in/2", priority=5)
    low_new = jobs.enqueue("low-new", "/in/3", priority=0)
    mid = jobs.enqueue("mid", "/in/4", priority=1)
    order = [jobs.claim(f"w{i}")[0]["id"] for i in range(4)]
    assert order == [high, mid, low_old, low_new]
    # created_at is the server's: the older of equal priority really is older.
    assert job_row(db, low_old)["created_at"] <= job_row(db, low_new)["created_at"]


def test_claim_with_limit_returns_the_best_in_order(jobs: VideoJobs) -> None:
    ids = jobs.enqueue_many(
        [{"src_hash": f"p{p}", "input_path": "/in", "priority": p} for p in range(5)]
    )
    claimed = jobs.claim("w", limit=3)
    assert [j["id"] for j in claimed] == [ids[4], ids[3], ids[2]]


def test_claim_waits_for_run_after(db: Database, jobs: VideoJobs) -> None:
    later = jobs.enqueue("later", "/in/l", priority=9, run_after=0.4)
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    jobs.enqueue("tomorrow", "/in/t", priority=9, run_after=future)
    now = jobs.enqueue("now", "/in/n", priority=0)
    assert [j["id"] for j in jobs.claim("w", limit=5)] == [now]
    row = job_row(db, later)
    assert row["run_after"] - row["created_at"] == datetime.timedelta(seconds=0.4)
    time.sleep(0.45)
    assert [j["id"] for j in jobs.claim("w", limit=5)] == [later]


def test_claim_skips_rows_locked_by_another_transaction(
    db: Database, jobs: VideoJobs, pgaccess_dsn: str
) -> None:
    first, second = enqueue_n(jobs, 2)
    other = psycopg2.connect(pgaccess_dsn)
    claimed: List[List[Dict[str, Any]]] = []
    try:
        with other.cursor() as cur:
            cur.execute("SELECT 1 FROM video_job WHERE id = %s FOR UPDATE", (first,))
        claimer = threading.Thread(
            target=lambda: claimed.append(jobs.claim("w", limit=2)), daemon=True
        )
        claimer.start()
        claimer.join(2.0)
        assert not claimer.is_alive(), "claim queued behind a locked row"
    finally:
        other.close()  # ends the lock, so a claim that did queue cannot hang the test
    assert [[j["id"] for j in c] for c in claimed] == [[second]]
    assert job_row(db, first)["status"] == "queued"


# -------------------------------------------------------- held-job updates
def test_fail_backs_off_exponentially_then_fails_for_good(
    db: Database, jobs: VideoJobs
) -> None:
    job_id = jobs.enqueue("flaky", "/in/f", max_attempts=3)
    waits = []
    for attempt in (1, 2, 3):
        deadline = time.monotonic() + 5
        while not (claimed := jobs.claim("w")):
            assert time.monotonic() < deadline, "the job never became due again"
            time.sleep(0.02)
        assert claimed[0]["id"] == job_id and claimed[0]["attempts"] == attempt
        status = jobs.fail(job_id, "w", RuntimeError(f"boom {attempt}"))
        row = job_row(db, job_id)
        assert row["status"] == status
        assert row["error"] == f"RuntimeError: boom {attempt}"
        if attempt < 3:
            assert status == "queued" and row["finished_at"] is None
            # run_after and updated_at come from the same statement's now().
            waits.append((row["run_after"] - row["updated_at"]).total_seconds())
            assert jobs.claim("w") == []  # not due yet
    assert waits == pytest.approx([0.2, 0.4])
    row = job_row(db, job_id)
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert row["finished_at"] is not None
    assert jobs.claim("w") == []


def test_backoff_is_capped(db: Database, jobs: VideoJobs) -> None:
    jobs.BACKOFF_BASE, jobs.BACKOFF_MAX = 0.05, 0.1
    job_id = jobs.enqueue("capped", "/in/c", max_attempts=10)
    db.update("video_job", {"attempts": 6}, {"id": job_id})
    jobs.claim("w")
    jobs.fail(job_id, "w", "again")
    row = job_row(db, job_id)
    assert (row["run_after"] - row["updated_at"]).total_seconds() == pytest.approx(0.1)


def test_updates_by_a_worker_that_does_not_hold_the_job_raise_job_lost(
    db: Database, jobs: VideoJobs
) -> None:
    job_id = jobs.enqueue("v", "/in/v")
    jobs.claim("holder")
    for call in (
        lambda: jobs.heartbeat(job_id, "intruder"),
        lambda: jobs.complete(job_id, "intruder"),
        lambda: jobs.fail(job_id, "intruder", "no"),
        lambda: jobs.release(job_id, "intruder"),
    ):
        with pytest.raises(JobLost, match="reclaimed, cancelled or completed") as info:
            call()
        assert info.value.holder == "holder"
    row = job_row(db, job_id)
    assert (row["status"], row["locked_by"], row["attempts"]) == (
        "processing",
        "holder",
        1,
    )


def test_complete_is_idempotent_for_its_worker(db: Database, jobs: VideoJobs) -> None:
    job_id = jobs.enqueue("v", "/in/v")
    jobs.claim("w")
    spans = [{"start": 0, "end": 1, "score": 0.9}, {"start": 2, "end": 3, "score": 0.1}]
    jobs.complete(job_id, "w", "/out/v", highlights=spans, metrics={"encode": 12.5})
    jobs.complete(job_id, "w", "/out/v", highlights=spans, metrics={"encode": 12.5})
    row = job_row(db, job_id)
    assert (row["status"], row["output_path"]) == ("completed", "/out/v")
    assert row["finished_at"] is not None
    assert db.count("highlight", {"job_id": job_id}) == 2
    assert db.count("processing_metrics", {"job_id": job_id, "stage": "encode"}) == 1
    with pytest.raises(JobLost):
        jobs.complete(job_id, "someone-else")


def test_release_gives_the_attempt_back(db: Database, jobs: VideoJobs) -> None:
    job_id = jobs.enqueue("v", "/in/v")
    jobs.claim("w")
    jobs.release(job_id, "w")
    row = job_row(db, job_id)
    assert (row["status"], row["attempts"]) == ("queued", 0)
    assert jobs.claim("w2")[0]["id"] == job_id


# ------------------------------------------- highlights with the completion
def test_a_rejected_highlight_leaves_the_job_uncompleted(
    db: Database, jobs: VideoJobs
) -> None:
    job_id = jobs.enqueue("v", "/in/v")
    jobs.claim("w")
    good = {"start": 0.0, "end": 1.0, "score": 0.5}
    backwards = {"start": 5.0, "end": 4.0, "score": 0.5}  # violates end > start
    with pytest.raises(CheckViolation):
        jobs.complete(job_id, "w", "/out", highlights=[good, backwards])
    row = job_row(db, job_id)
    assert (row["status"], row["output_path"]) == ("processing", None)
    assert db.count("highlight") == 0
    jobs.complete(job_id, "w", "/out", highlights=[good])
    assert job_row(db, job_id)["status"] == "completed"
    assert db.count("highlight", {"job_id": job_id}) == 1


def test_processing_fails_the_job_when_its_highlights_are_rejected(
    db: Database, jobs: VideoJobs
) -> None:
    job_id = jobs.enqueue("v", "/in/v")
    with pytest.raises(CheckViolation), jobs.processing("w") as job:
        assert job is not None
        job.add_highlight(1.0, 2.0, 0.3)
        job.add_highlight(-1.0, 2.0, 0.3)  # start_time >= 0 is required
    row = job_row(db, job_id)
    assert row["status"] == "queued"
    assert row["error"].startswith("could not complete: CheckViolation")
    assert db.count("highlight") == 0


def test_highlights_are_not_doubled_when_a_job_is_retried(
    db: Database, jobs: VideoJobs
) -> None:
    jobs.BACKOFF_BASE = 0.0
    job_id = jobs.enqueue("v", "/in/v")
    spans = [{"start": float(i), "end": i + 0.5, "score": i / 10} for i in range(4)]
    # Attempt 1 writes half of its highlights on its own, then crashes.
    with pytest.raises(RuntimeError), jobs.processing("w") as job:
        assert job is not None
        Highlights(db).add(job.id, spans[:2])
        raise RuntimeError("decoder crashed")
    assert job_row(db, job_id)["status"] == "queued"
    # Attempt 2 finds the same highlights, all four, and completes.
    with jobs.processing("w") as job:
        assert job is not None and job.id == job_id
        job.add_highlights(spans)
    assert job_row(db, job_id)["status"] == "completed"
    rows = db.find_many("highlight", {"job_id": job_id}, order_by="start_time")
    assert [(r["start_time"], r["end_time"]) for r in rows] == [
        (s["start"], s["end"]) for s in spans
    ]


def test_a_retried_complete_whose_reply_was_lost_succeeds_once(
    db: Database,
    proxy_db: Database,
    fault_proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs = VideoJobs(proxy_db)
    retried_after: List[BaseException] = []

    def recording(exc: BaseException) -> bool:
        retried_after.append(exc)
        return VideoJobs.RETRY.retries(exc)

    jobs.RETRY = dataclasses.replace(VideoJobs.RETRY, delay=0.01, retry_on=recording)
    job_id = jobs.enqueue("v", "/in/v")
    jobs.claim("w")
    spans = [{"start": 0, "end": 1, "score": 1.0}, {"start": 1, "end": 2, "score": 0.5}]
    # The first attempt runs and commits on the server; its reply never arrives.
    fault_proxy.drop_after("status = 'completed'")
    with caplog.at_level(logging.DEBUG, logger="pgaccess.jobs"):
        jobs.complete(job_id, "w", "/out/v", highlights=spans, metrics={"encode": 1})
    assert fault_proxy.drops == 1
    assert [type(e) for e in retried_after] == [CommitOutcomeUnknown]
    # The retry matched no row and recognised the first attempt's work as its own.
    assert f"complete of job {job_id} was already applied" in caplog.text
    row = job_row(db, job_id)
    assert (row["status"], row["locked_by"], row["output_path"]) == (
        "completed",
        "w",
        "/out/v",
    )
    assert db.count("highlight", {"job_id": job_id}) == 2
    assert db.count("processing_metrics", {"job_id": job_id}) == 1


# ------------------------------------------------------------- processing()
def test_processing_completes_on_a_clean_exit(db: Database, jobs: VideoJobs) -> None:
    job_id = jobs.enqueue("v", "/in/v.mp4")
    with jobs.processing("w") as job:
        assert job is not None
        assert (job.id, job["input_path"]) == (job_id, "/in/v.mp4")
        assert job_row(db, job_id)["status"] == "processing"
        job.add_highlight(3.0, 4.5, 0.8, "goal")
        job.output_path = "/out/v.mp4"
        with job.timer("detect"):
            time.sleep(0.01)
    row = job_row(db, job_id)
    assert (row["status"], row["output_path"]) == ("completed", "/out/v.mp4")
    (hl,) = Highlights(db).for_job(job_id)
    assert (hl["start_time"], hl["end_time"], hl["score"], hl["label"]) == (
        3.0,
        4.5,
        0.8,
        "goal",
    )
    (metric,) = db.find_many("processing_metrics", {"job_id": job_id})
    assert metric["stage"] == "detect" and metric["duration_ms"] >= 10.0


def test_processing_fails_on_an_exception_and_reraises(
    db: Database, jobs: VideoJobs
) -> None:
    job_id = jobs.enqueue("v", "/in/v")

    class DecodeError(Exception):
        pass

    with pytest.raises(DecodeError, match="bad frame"), jobs.processing("w") as job:
        assert job is not None
        job.add_highlight(0, 1, 1.0)
        raise DecodeError("bad frame 42")
    row = job_row(db, job_id)
    assert (row["status"], row["attempts"]) == ("queued", 1)
    assert row["error"] == "DecodeError: bad frame 42"
    assert db.count("highlight") == 0


def test_processing_yields_none_when_nothing_is_due(jobs: VideoJobs) -> None:
    with jobs.processing("w") as job:
        assert job is None


def test_processing_releases_the_job_on_keyboard_interrupt(
    db: Database, jobs: VideoJobs
) -> None:
    job_id = jobs.enqueue("v", "/in/v")
    with pytest.raises(KeyboardInterrupt), jobs.processing("w"):
        raise KeyboardInterrupt
    row = job_row(db, job_id)
    assert (row["status"], row["attempts"]) == ("queued", 0)


def test_processing_keeps_the_heartbeat_fresh(db: Database, jobs: VideoJobs) -> None:
    jobs.HEARTBEAT_INTERVAL = 0.05
    job_id = jobs.enqueue("v", "/in/v")
    with jobs.processing("w") as job:
        assert job is not None
        first = job_row(db, job_id)["heartbeat_at"]
        seen = {first}
        for _ in range(6):
            time.sleep(0.06)
            seen.add(job_row(db, job_id)["heartbeat_at"])
        assert max(seen) - first >= datetime.timedelta(seconds=0.2)
        assert len(seen) >= 4
        # A job beating this often is never stale to a reclaimer asking for 1 s.
        assert jobs.reclaim_stale(1.0) == 0
    assert job_row(db, job_id)["status"] == "completed"


def test_a_job_cancelled_while_processing_is_lost_to_its_worker(
    db: Database, jobs: VideoJobs
) -> None:
    jobs.HEARTBEAT_INTERVAL = 0.05
    job_id = jobs.enqueue("v", "/in/v")
    with pytest.raises(JobLost, match="cancelled"), jobs.processing("w") as job:
        assert job is not None
        assert jobs.cancel(job_id)
        assert job.lost.wait(2.0)  # the heartbeat noticed
    row = job_row(db, job_id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None


# -------------------------------------------------------------- maintenance
def test_reclaim_stale_requeues_or_fails_silent_jobs(
    db: Database, jobs: VideoJobs
) -> None:
    fresh, stale, exhausted = (
        jobs.enqueue("fresh", "/in/1"),
        jobs.enqueue("stale", "/in/2"),
        jobs.enqueue("exhausted", "/in/3", max_attempts=1),
    )
    jobs.claim("w", limit=3)
    db.execute(
        "UPDATE video_job SET heartbeat_at = now() - interval '10 minutes' "
        "WHERE id = ANY(%s)",
        ([stale, exhausted],),
    )
    assert jobs.reclaim_stale(datetime.timedelta(minutes=5)) == 2
    assert job_row(db, fresh)["status"] == "processing"
    row = job_row(db, stale)
    assert (row["status"], row["locked_by"]) == ("queued", None)
    assert row["error"].startswith("reclaimed: no heartbeat from w")
    row = job_row(db, exhausted)
    assert row["status"] == "failed" and row["finished_at"] is not None
    assert jobs.reclaim_stale(300) == 0


def test_retry_failed_cancel_and_purge(db: Database, jobs: VideoJobs) -> None:
    failed = jobs.enqueue("failed", "/in/1", max_attempts=1)
    jobs.claim("w")
    assert jobs.fail(failed, "w", "broken") == "failed"
    assert jobs.retry_failed(failed)
    row = job_row(db, failed)
    assert (row["status"], row["attempts"], row["finished_at"]) == ("queued", 0, None)
    assert not jobs.retry_failed(failed)  # not failed any more

    assert jobs.cancel(failed)
    assert not jobs.cancel(failed)
    done = jobs.enqueue("done", "/in/2")
    jobs.claim("w")
    jobs.complete(done, "w", highlights=[{"start": 0, "end": 1, "score": 1}])
    waiting = jobs.enqueue("waiting", "/in/3")

    assert jobs.purge(3600) == 0
    time.sleep(0.05)
    assert jobs.purge(0.01) == 2
    assert [r["id"] for r in db.find_many("video_job")] == [waiting]
    assert db.count("highlight") == 0  # went with their job


def test_stats_agree_with_the_table(db: Database, jobs: VideoJobs) -> None:
    ids = enqueue_n(jobs, 6)
    for job_id in ids[:3]:
        jobs.claim("w")
        time.sleep(0.01)
        jobs.complete(job_id, "w")
    jobs.claim("w")
    jobs.BACKOFF_BASE = 0
    db.update("video_job", {"max_attempts": 1}, {"id": ids[3]})
    jobs.fail(ids[3], "w", "x")
    jobs.claim("w")  # ids[4] stays processing

    stats = jobs.stats()
    assert {k: stats[k] for k in ("queued", "processing", "completed", "failed")} == (
        {"queued": 1, "processing": 1, "completed": 3, "failed": 1}
    )
    assert stats["total"] == 6 and stats["cancelled"] == 0
    assert stats["success_rate"] == pytest.approx(3 / 4)
    assert stats["finished_per_minute"] == pytest.approx(4 / 5)
    (expected,) = db.execute(
        "SELECT extract(epoch FROM now() - created_at)::float8 AS age,"
        " (SELECT avg(extract(epoch FROM finished_at - locked_at))::float8"
        "  FROM video_job WHERE status = 'completed') AS mean"
        " FROM video_job WHERE id = %s",
        (ids[5],),
    )
    assert stats["oldest_queued_s"] == pytest.approx(expected["age"], abs=0.5)
    assert stats["mean_processing_s"] == pytest.approx(expected["mean"])
    assert stats["mean_processing_s"] >= 0.01
    assert stats["p95_processing_s"] >= stats["mean_processing_s"] * 0.5
    only = jobs.stats(job_ids=ids[:2])
    assert (only["total"], only["completed"]) == (2, 2)


# -------------------------------------------------------- highlights, metrics
def test_highlights_add_is_idempotent_and_reads_back(
    db: Database, jobs: VideoJobs
) -> None:
    a, b = enqueue_n(jobs, 2)
    store = Highlights(db)
    spans = [
        {"start": 0, "end": 2, "score": 0.2, "label": "kick-off"},
        {"start_time": 10, "end_time": 12, "score": 0.9},
        {"start": 20, "end": 21, "score": 0.6},
    ]
    assert store.add(a, spans) == 3
    assert store.add(a, spans) == 0
    assert store.add(b, [{"start": 1, "end": 2, "score": 0.95}]) == 1
    assert db.count("highlight") == 4
    assert [h["start_time"] for h in store.for_job(a)] == [0, 10, 20]
    assert [h["score"] for h in store.for_job(a, min_score=0.5)] == [0.9, 0.6]
    assert [(h["job_id"], h["score"]) for h in store.top(2)] == [(b, 0.95), (a, 0.9)]


def test_metrics_record_once_per_op_id_and_summarise(
    db: Database, jobs: VideoJobs
) -> None:
    (job_id,) = enqueue_n(jobs, 1)
    metrics = Metrics(db)
    metrics.record(job_id, "decode", 5.0, op_id="00000000-0000-0000-0000-000000000001")
    metrics.record(job_id, "decode", 5.0, op_id="00000000-0000-0000-0000-000000000001")
    for ms in (1.0, 2.0, 3.0, 10.0):
        metrics.record(job_id, "detect", ms)
    with metrics.timer(job_id, "upload"):
        time.sleep(0.02)
    with pytest.raises(ValueError), metrics.timer(job_id, "upload"):
        raise ValueError("recorded anyway")
    summary = metrics.summary()
    assert summary["decode"]["count"] == 1
    values = sorted(
        r["duration_ms"]
        for r in db.find_many("processing_metrics", {"stage": "detect"})
    )

    def percentile(p: float) -> float:  # percentile_cont: linear interpolation
        pos = p * (len(values) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)

    detect = summary["detect"]
    assert detect["count"] == len(values) == 4
    assert detect["p50_ms"] == pytest.approx(percentile(0.5))
    assert detect["p95_ms"] == pytest.approx(percentile(0.95))
    assert detect["mean_ms"] == pytest.approx(sum(values) / len(values))
    assert detect["max_ms"] == max(values)
    assert summary["upload"]["count"] == 2 and summary["upload"]["max_ms"] >= 20
    assert Metrics(db).summary(job_ids=[job_id + 1]) == {}


# ------------------------------------------------------------- concurrency
N_JOBS = 2000


def assert_drained_exactly_once(db: Database, ids: List[int]) -> None:
    assert status_counts(db) == {"completed": len(ids)}
    runs = handler_runs(db)
    assert set(runs) == set(ids)  # every job's handler ran ...
    assert set(runs.values()) == {1}  # ... exactly once
    rows = db.execute("SELECT DISTINCT attempts FROM video_job")
    assert [r["attempts"] for r in rows] == [1]


def test_eight_threads_drain_the_queue_exactly_once(
    db: Database, jobs: VideoJobs
) -> None:
    ids = enqueue_n(jobs, N_JOBS)
    metrics = Metrics(db)
    seen: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        with lock:
            seen[job["id"]] += 1
        metrics.record(job["id"], "handler_run", 0.0)
        return {"highlights": [{"start": 0, "end": 1, "score": 0.5}]}

    worker = Worker(db, handler, threads=8, jobs=jobs, idle_min=0.01, idle_max=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while jobworker.unfinished(db):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        worker.stop()
        assert worker.join(10)
    assert set(seen.values()) == {1} and len(seen) == N_JOBS
    assert_drained_exactly_once(db, ids)
    assert db.count("highlight") == N_JOBS
    # The worker's own timings were written with each completion.
    assert db.count("processing_metrics", {"stage": "handler"}) == N_JOBS
    holders = db.execute("SELECT count(DISTINCT locked_by) AS n FROM video_job")
    assert holders[0]["n"] > 1  # the threads shared the work
    stats = worker.stats()
    assert (stats["claimed"], stats["completed"], stats["failed"]) == (
        N_JOBS,
        N_JOBS,
        0,
    )


def test_four_processes_drain_the_queue_exactly_once(
    db: Database, jobs: VideoJobs, pgaccess_dsn: str
) -> None:
    ids = enqueue_n(jobs, N_JOBS)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=jobworker.drain, args=(pgaccess_dsn, f"proc{i}", 2))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert_drained_exactly_once(db, ids)
    rows = db.execute(
        "SELECT DISTINCT split_part(locked_by, '-', 1) AS proc FROM video_job"
    )
    assert len(rows) > 1  # more than one process took part


def test_a_killed_workers_job_is_reclaimed_and_its_late_complete_refused(
    db: Database, jobs: VideoJobs, pgaccess_dsn: str
) -> None:
    job_id = jobs.enqueue("orphan", "/in/o")
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=jobworker.claim_and_die, args=(pgaccess_dsn, "dead", sender)
    )
    proc.start()
    sender.close()
    assert receiver.poll(30)
    assert receiver.recv() == job_id
    proc.join(30)
    assert proc.exitcode == -9  # SIGKILL: no cleanup ran
    row = job_row(db, job_id)
    assert (row["status"], row["locked_by"]) == ("processing", "dead")

    assert jobs.reclaim_stale(0) == 1
    assert job_row(db, job_id)["status"] == "queued"
    with jobs.processing("alive") as job:
        assert job is not None and job.id == job_id
        job.add_highlight(0, 1, 0.7)
    with pytest.raises(JobLost, match="completed") as info:
        jobs.complete(job_id, "dead", highlights=[{"start": 5, "end": 6, "score": 1}])
    assert info.value.holder == "alive"
    row = job_row(db, job_id)
    assert (row["status"], row["locked_by"], row["attempts"]) == (
        "completed",
        "alive",
        2,
    )
    assert db.count("highlight", {"job_id": job_id}) == 1


def test_worker_retries_failing_jobs_until_they_succeed_or_run_out(
    db: Database, jobs: VideoJobs
) -> None:
    jobs.BACKOFF_BASE, jobs.BACKOFF_MAX = 0.01, 0.02
    ids = jobs.enqueue_many(
        [
            {"src_hash": f"f{i}", "input_path": "/in", "max_attempts": 3}
            for i in range(6)
        ]
    )
    flaky, hopeless = set(ids[:3]), set(ids[3:])
    tries: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def handler(job: Dict[str, Any]) -> None:
        with lock:
            tries[job["id"]] += 1
            n = tries[job["id"]]
        if job["id"] in hopeless or n < 2:
            raise OSError(f"try {n}")

    worker = Worker(db, handler, threads=3, jobs=jobs, idle_min=0.005, idle_max=0.02)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while jobworker.unfinished(db):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        worker.stop()
        worker.join(10)
    rows = {r["id"]: r for r in db.find_many("video_job")}
    assert {rows[i]["status"] for i in flaky} == {"completed"}
    assert {rows[i]["attempts"] for i in flaky} == {2}
    assert {rows[i]["status"] for i in hopeless} == {"failed"}
    assert {rows[i]["attempts"] for i in hopeless} == {3}
    assert {rows[i]["error"] for i in hopeless} == {"OSError: try 3"}
    assert all(tries[i] == rows[i]["attempts"] for i in ids)


def test_worker_stop_finishes_the_job_in_hand(db: Database, jobs: VideoJobs) -> None:
    job_id = jobs.enqueue("slow", "/in/s")
    started = threading.Event()

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        started.set()
        time.sleep(0.3)
        return {"output_path": "/out/s"}

    worker = Worker(db, handler, threads=2, jobs=jobs)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()
    assert started.wait(10)
    stop.set()
    runner.join(10)
    assert not runner.is_alive() and not worker.alive
    row = job_row(db, job_id)
    assert (row["status"], row["output_path"]) == ("completed", "/out/s")


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while any(t.name.startswith("pgaccess-worker") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "worker threads outlived their test"
        time.sleep(0.01)
