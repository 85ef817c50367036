"""Waking idle workers by LISTEN/NOTIFY, against a real PostgreSQL.

The workers here poll rarely (``idle_min``/``idle_max`` of 30 s) unless a test is
about polling, so a job that starts at once was started by the notification.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, List

import pytest
from support.faultproxy import FaultProxy

from pgaccess import Database
from pgaccess.jobs import VideoJobs, Worker
from pgaccess.jobs import queries as Q
from pgaccess.jobs.listener import Listener, Wakeup

NEVER = 30.0  # idle_min = idle_max: a worker that (practically) never polls


class Starts:
    """A handler that notes when each job started (time.monotonic())."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.at: Dict[str, float] = {}
        self.changed = threading.Condition(self.lock)

    def __call__(self, job: Dict[str, Any]) -> None:
        with self.lock:
            self.at[job["src_hash"]] = time.monotonic()
            self.changed.notify_all()

    def wait_for(self, key: str, timeout: float) -> float:
        with self.lock:
            assert self.changed.wait_for(lambda: key in self.at, timeout), key
            return self.at[key]


def idle_worker(
    db: Database, running: List[Worker], handler: Any, threads: int, **kwargs: Any
) -> Worker:
    kwargs.setdefault("idle_min", NEVER)
    kwargs.setdefault("idle_max", NEVER)
    worker = Worker(db, handler, threads=threads, **kwargs)
    running.append(worker)
    worker.start()
    assert worker.listener is not None and worker.listener.connected.wait(10)
    # Every thread has found the queue empty and waits: the count has reached one
    # claim per thread and stays put (the wake-up the listener sends on connect may
    # make a few threads claim once more, later on a loaded machine).
    deadline = time.monotonic() + 10
    last, since = -1, time.monotonic()
    while True:
        now = time.monotonic()
        assert now < deadline
        empty = worker.stats()["empty_claims"]
        if empty != last:
            last, since = empty, now
        elif empty >= threads and now - since >= 0.25:
            return worker
        time.sleep(0.01)


def test_an_idle_worker_starts_a_job_within_100_ms_of_its_enqueue(
    db: Database, running: List[Worker]
) -> None:
    """The workers poll every 30 s (NEVER): only the notification can start a job
    this soon. The median is the claim; the bound on the slowest of ten leaves room
    for a loaded machine running the suite on four workers at once."""
    starts = Starts()
    jobs = VideoJobs(db)
    idle_worker(db, running, starts, threads=2)
    late = []
    for i in range(10):
        t0 = time.monotonic()
        jobs.enqueue(f"wake{i}", "/in/w")
        started = starts.wait_for(f"wake{i}", 5)
        late.append(started - t0)
        time.sleep(0.05)
    assert sorted(late)[len(late) // 2] < 0.1, late
    assert max(late) < 1.0, late


def test_only_as_many_threads_wake_as_there_are_jobs(
    db: Database, running: List[Worker]
) -> None:
    starts = Starts()
    jobs = VideoJobs(db)
    worker = idle_worker(db, running, starts, threads=8)
    before = worker.stats()["empty_claims"]
    jobs.enqueue_many([{"src_hash": f"two{i}", "input_path": "/in"} for i in range(2)])
    starts.wait_for("two0", 5)
    starts.wait_for("two1", 5)
    time.sleep(0.3)
    # Each thread woken takes its job and then finds the queue empty once: 2 empty
    # claims for 2 jobs, where waking every idle thread would make 7 or 8.
    assert worker.stats()["empty_claims"] - before <= 2


def test_a_notification_per_insert_statement_not_per_row(
    db: Database, pgaccess_dsn: str
) -> None:
    got: List[int] = []
    listener = Listener(pgaccess_dsn, Q.CHANNEL, got.append)
    listener.start()
    try:
        assert listener.connected.wait(10)
        deadline = time.monotonic() + 5
        while got != [1]:  # the wake-up every (re)connect sends
            assert time.monotonic() < deadline
            time.sleep(0.01)
        VideoJobs(db).enqueue_many(
            [{"src_hash": f"n{i}", "input_path": "/in"} for i in range(500)]
        )
        # A transaction of single-row inserts: as many jobs, not one folded NOTIFY.
        with db.transaction() as tx:
            for i in range(3):
                tx.insert("video_job", {"src_hash": f"tx{i}", "input_path": "/in"})
        # Jobs due later are found by polling: no notification.
        VideoJobs(db).enqueue("later", "/in", run_after=3600)
        deadline = time.monotonic() + 5
        while sum(got) < 1 + 500 + 3:
            assert time.monotonic() < deadline, got
            time.sleep(0.01)
        time.sleep(0.2)
        assert got[0] == 1 and sum(got) == 504
        assert listener.notifications == 1 + 3
    finally:
        listener.stop()
        assert listener.join(10)


def test_the_listener_comes_back_after_pg_terminate_backend_and_polling_covers_the_gap(
    db: Database,
    running: List[Worker],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Listener, "INITIAL_DELAY", 1.5)  # down long enough to look
    starts = Starts()
    jobs = VideoJobs(db)
    with caplog.at_level(logging.INFO, logger="pgaccess.jobs.listener"):
        worker = idle_worker(
            db, running, starts, threads=2, idle_min=0.05, idle_max=0.3
        )
        listener = worker.listener
        assert listener is not None
        pid = listener.backend_pid
        assert db.execute("SELECT pg_terminate_backend(%s) AS ok", (pid,))[0]["ok"]
        deadline = time.monotonic() + 5
        while listener.connected.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # Down: the job starts anyway, by polling (idle_max 0.3 s), within the
        # 1 s bound the README promises for a worker whose listener is down.
        t0 = time.monotonic()
        jobs.enqueue("while-down", "/in")
        assert starts.wait_for("while-down", 5) - t0 < 1.0
        assert not listener.connected.is_set()
        # Back: a new session listens.
        assert listener.connected.wait(10)
        assert listener.connects == 2 and listener.backend_pid != pid
    mine = [r for r in caplog.records if r.name == "pgaccess.jobs.listener"]
    lost = [r for r in mine if "was lost" in r.getMessage()]
    back = [r for r in mine if "listening again" in r.getMessage()]
    assert [r.levelname for r in lost] == ["WARNING"]
    assert [r.levelname for r in back] == ["INFO"]


def test_a_listener_that_cannot_reconnect_logs_once_and_backs_off(
    db: Database,
    proxy_dsn: str,
    fault_proxy: FaultProxy,
    running: List[Worker],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Listener, "INITIAL_DELAY", 0.02)
    monkeypatch.setattr(Listener, "MAX_DELAY", 0.16)
    starts = Starts()
    with caplog.at_level(logging.DEBUG, logger="pgaccess.jobs.listener"):
        worker = idle_worker(
            db,
            running,
            starts,
            threads=1,
            listen_dsn=proxy_dsn,
            idle_min=0.05,
            idle_max=0.3,
        )
        listener = worker.listener
        assert listener is not None
        fault_proxy.refuse(None)
        fault_proxy.reset_all()
        time.sleep(1.5)
        assert not listener.connected.is_set()
        VideoJobs(db).enqueue("meanwhile", "/in")
        starts.wait_for("meanwhile", 2)
        fault_proxy.allow()
        assert listener.connected.wait(5)
    messages = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "pgaccess.jobs.listener"
    ]
    failed = [m for m in messages if "reconnect failed" in m[1]]
    warnings = [m for m in messages if m[0] == "WARNING"]
    # 1.5 s of delays 0.02, 0.04, 0.08, 0.16, 0.16, ...: several attempts, one line
    # at WARNING (the loss), the attempts at DEBUG, and the return at INFO.
    assert 4 <= len(failed) <= 15, failed
    assert len(warnings) == 1, warnings
    assert [m for m in messages if m[0] == "INFO"] == [
        ("INFO", "pgaccess-worker-listener: listening again")
    ]


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize(
    "rows", [20_000, pytest.param(100_000, marks=pytest.mark.slow)]
)
def test_a_storm_of_enqueues_wakes_no_more_threads_than_jobs_and_memory_stays_flat(
    db: Database, running: List[Worker], rows: int
) -> None:
    if not os.path.exists(f"/proc/{os.getpid()}/status"):
        pytest.skip("reads VmRSS from /proc")
    done = threading.Semaphore(0)
    worker = idle_worker(
        db, running, lambda job: done.release(), threads=4, record_metrics=False
    )
    listener = worker.listener
    assert listener is not None
    jobs = VideoJobs(db)
    before_empty = worker.stats()["empty_claims"]
    before_notes = listener.notifications
    rss_before = _rss_kb()
    statements = 4
    per = rows // statements
    for s in range(statements):
        jobs.enqueue_many(
            [{"src_hash": f"s{s}-{i}", "input_path": "/in"} for i in range(per)]
        )
    deadline = time.monotonic() + 300
    while worker.stats()["completed"] < rows:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    # One notification per statement, however many rows.
    assert listener.notifications - before_notes == statements
    # A thread finds the queue empty at most once per wave of jobs: not per job.
    empty = worker.stats()["empty_claims"] - before_empty
    assert empty <= worker.threads * (statements + 1), empty
    # Nothing piles up: 100k jobs through 4 threads leave the process's memory
    # within a few MB (the enqueue's own lists included).
    assert _rss_kb() - rss_before < 40_000


def test_wakeup_never_hands_out_more_permits_than_threads_wait() -> None:
    wakeup = Wakeup()
    woken: List[bool] = []
    threads = [
        threading.Thread(target=lambda: woken.append(wakeup.wait(2.0)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while wakeup.idle < 3:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert wakeup.wake(100_000) == 3  # a storm: three waiters, three permits
    for t in threads:
        t.join(5)
    assert woken == [True, True, True]
    assert wakeup.wake(5) == 0  # nobody waits: nothing kept for later
    t0 = time.monotonic()
    assert wakeup.wait(0.1) is False
    assert time.monotonic() - t0 >= 0.09


def test_a_wake_during_a_claim_is_not_lost_for_a_thread_that_was_not_waiting() -> None:
    wakeup = Wakeup()
    seen = wakeup.generation  # read before a claim ...
    assert wakeup.wake(1) == 0  # ... a job is announced while it runs: nobody waits
    t0 = time.monotonic()
    assert wakeup.wait(5.0, seen) is True  # the claim that follows is not put off
    assert time.monotonic() - t0 < 0.1
    assert wakeup.wait(0.05, wakeup.generation) is False  # nothing new: it waits
