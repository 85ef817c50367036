"""``VideoJobs.processing()`` claims ahead on a deep queue, against a real PostgreSQL.

Each test reads the database or counts statements, and fails with its part of the
feature taken out: a claim per block, no heartbeat for the jobs claimed ahead, no
timer to give them back, no skip of a job lost meanwhile, no release of them on
``KeyboardInterrupt``, a fixed batch size instead of the adaptive one.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from support.workers import (
    CLAIM_MARK,
    COMPLETE_ONE_MARK,
    RecordingJobs,
    enqueue_n,
    statement_calls,
    wait_until,
)

from pgaccess import Database
from pgaccess.jobs import VideoJobs


@pytest.fixture
def jobs(db: Database) -> Iterator[RecordingJobs]:
    queue = RecordingJobs(db)
    queue.BACKOFF_BASE = 0.0
    yield queue
    queue.release_prefetched()


def rows_by_id(db: Database) -> Dict[int, Dict[str, Any]]:
    return {r["id"]: r for r in db.find_many("video_job")}


def states(db: Database, ids: List[int]) -> Set[Tuple[str, int]]:
    """The (status, attempts) pairs of these jobs."""
    rows = rows_by_id(db)
    return {(rows[i]["status"], rows[i]["attempts"]) for i in ids}


def take_one(jobs: VideoJobs, worker_id: str = "w") -> Optional[int]:
    """Run one empty block; the id of the job it completed."""
    with jobs.processing(worker_id) as job:
        return None if job is None else job.id


def fill_buffer(
    db: Database, jobs: VideoJobs, hold: float
) -> Tuple[List[int], List[int]]:
    """Ten jobs and four blocks, with ``PREFETCH_HOLD`` = ``hold``: claims of 1, 2
    and 4 jobs; the last leaves three of its four waiting for the next calls (fewer
    on a machine so slow that four blocks take longer than half of ``hold``).
    Returns the ten ids and those waiting, best first."""
    jobs.PREFETCH_HOLD = hold
    ids = enqueue_n(jobs, 10)
    done = [take_one(jobs) for _ in range(4)]
    assert done == ids[:4]
    waiting = [
        r["id"]
        for r in db.find_many(
            "video_job", {"status": "processing", "locked_by": "w"}, order_by="id"
        )
    ]
    assert waiting == ids[4 : 4 + len(waiting)] and len(waiting) >= 2, waiting
    return ids, waiting


# ---------------------------------------------------------------- batching
def test_a_deep_queue_drained_by_processing_is_claimed_in_batches(
    db: Database, jobs: RecordingJobs
) -> None:
    jobs.PREFETCH_HOLD = 5.0  # the batch sizes below, on a slow machine too
    n = 300
    ids = enqueue_n(jobs, n)
    claims0 = statement_calls(db, CLAIM_MARK)
    completes0 = statement_calls(db, COMPLETE_ONE_MARK)
    done = []
    while True:
        job_id = take_one(jobs)
        if job_id is None:
            break
        done.append(job_id)
    assert done == ids  # best first, each once
    claims = statement_calls(db, CLAIM_MARK) - claims0
    # 1, 2, 4, 8, then 16 at a time: about 23 claims (and the empty one), not 300.
    assert claims <= n // 10, claims
    limits = [limit for limit, _ in jobs.claims]
    assert limits[:5] == [1, 2, 4, 8, 16]
    assert max(limits) == VideoJobs.PREFETCH_MAX
    # The completion is still the block's own, durable when it exits: one each.
    assert statement_calls(db, COMPLETE_ONE_MARK) - completes0 == n
    assert states(db, ids) == {("completed", 1)}


def test_a_short_queue_is_claimed_one_job_at_a_time(
    db: Database, jobs: RecordingJobs
) -> None:
    for i in range(8):
        job_id = jobs.enqueue(f"trickle{i}", "/in/t")
        with jobs.processing("w") as job:
            assert job is not None and job.id == job_id
            # Nothing waits in a buffer: the block's job is the only one held.
            assert db.count("video_job", {"status": "processing"}) == 1
        time.sleep(0.02)
    # Each claim found the one job there was; the limit only probes (1, then 2
    # after a full batch of 1, back to 1 after a short one), as Worker's does.
    assert [got for _, got in jobs.claims] == [1] * 8
    assert max(limit for limit, _ in jobs.claims) <= 2
    assert take_one(jobs) is None


# ----------------------------------------------------- the jobs claimed ahead
def test_jobs_claimed_ahead_are_heartbeated(db: Database, jobs: RecordingJobs) -> None:
    jobs.HEARTBEAT_INTERVAL = 0.05
    _, waiting = fill_buffer(db, jobs, 30.0)  # buffered for the whole test
    rows = rows_by_id(db)
    assert {rows[i]["status"] for i in waiting} == {"processing"}
    claimed_at = {i: rows[i]["heartbeat_at"] for i in waiting}

    def beaten() -> bool:
        now = rows_by_id(db)
        return all(now[i]["heartbeat_at"] > claimed_at[i] for i in waiting)

    wait_until(beaten, 5, "a heartbeat of the jobs claimed ahead")
    assert jobs.reclaim_stale(1.0) == 0  # never stale while they wait
    assert [take_one(jobs) for _ in waiting] == waiting


def test_jobs_left_in_the_buffer_go_back_after_prefetch_hold(
    db: Database, jobs: RecordingJobs
) -> None:
    # A hold long enough that four blocks fit in it on a loaded CI machine.
    hold = 1.5
    ids, waiting = fill_buffer(db, jobs, hold)
    left_at = time.monotonic()

    # No processing() call comes: the timer alone gives them back.
    def back() -> bool:
        return states(db, waiting) == {("queued", 0)}

    wait_until(back, hold + 3.0, "the jobs claimed ahead to go back")
    took = time.monotonic() - left_at
    assert 0.3 <= took <= hold + 1.5, took
    # Another worker gets them at once, best first.
    other = VideoJobs(db).claim("other", limit=len(waiting))
    assert [r["id"] for r in other] == waiting
    # The worker that let them go claims one at a time again.
    assert take_one(jobs) == ids[4 + len(waiting)]
    assert jobs.claims[-1][0] == 1


def test_release_prefetched_gives_them_back_at_once(
    db: Database, jobs: RecordingJobs
) -> None:
    _, waiting = fill_buffer(db, jobs, 30.0)
    assert jobs.release_prefetched("someone else") == 0
    assert jobs.release_prefetched("w") == len(waiting)
    assert states(db, waiting) == {("queued", 0)}
    assert jobs.release_prefetched() == 0


def test_a_job_lost_while_it_waited_is_skipped(
    db: Database, jobs: RecordingJobs
) -> None:
    jobs.HEARTBEAT_INTERVAL = 0.05
    _, (first, second, *_) = fill_buffer(db, jobs, 30.0)
    assert jobs.cancel(first)
    time.sleep(0.3)  # several heartbeats: they find it gone
    with jobs.processing("w") as job:
        assert job is not None and job.id == second
    rows = rows_by_id(db)
    assert rows[first]["status"] == "cancelled"
    assert rows[second]["status"] == "completed"


def test_keyboard_interrupt_in_a_block_releases_its_job_and_those_claimed_ahead(
    db: Database, jobs: RecordingJobs
) -> None:
    # Held longer than the test: the timer cannot be what gives them back.
    ids, waiting = fill_buffer(db, jobs, 30.0)
    with pytest.raises(KeyboardInterrupt), jobs.processing("w") as job:
        assert job is not None and job.id == waiting[0]
        raise KeyboardInterrupt
    assert states(db, waiting) == {("queued", 0)}
    assert states(db, ids[:4]) == {("completed", 1)}
    assert db.count("video_job", {"status": "processing"}) == 0


# ------------------------------------------------------------------ threads
def test_threads_drain_the_queue_exactly_once(
    db: Database, jobs: RecordingJobs
) -> None:
    """Two worker ids, two threads each: different ids claim on their own, threads
    sharing an id share its batches; each job is yielded once."""
    jobs.PREFETCH_HOLD = 5.0
    n = 600
    ids = enqueue_n(jobs, n)
    seen: collections.Counter[int] = collections.Counter()
    by: Dict[str, Set[int]] = collections.defaultdict(set)
    lock = threading.Lock()
    errors: List[BaseException] = []

    def drain(worker_id: str) -> None:
        try:
            while True:
                with jobs.processing(worker_id) as job:
                    if job is None:
                        return
                    with lock:
                        seen[job.id] += 1
                        by[worker_id].add(job.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=drain, args=(wid,)) for wid in ("a", "a", "b", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(seen) == ids and set(seen.values()) == {1}
    assert states(db, ids) == {("completed", 1)}
    rows = rows_by_id(db)
    assert by["a"] and by["b"]  # both ids took part
    assert all(rows[i]["locked_by"] == wid for wid, got in by.items() for i in got)
    assert len(jobs.claims) < n // 4  # in batches
