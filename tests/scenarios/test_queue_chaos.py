"""The job queue under chaos (issue 7, item 12): worker processes killed and paused
while they drain it, and nothing completed twice or lost.

Worker processes (``support.chaos``) drain the queue while, every 200 ms, the test
SIGKILLs a random one and starts a replacement; every 15th tick it SIGSTOPs one
instead, for long enough that its jobs are reclaimed and done by others, then lets
it go on. The test process reclaims stale jobs as a supervisor would. Afterwards the
database must show every job completed exactly once (one set of completion rows,
written by the attempt that completed it) or failed with its attempts spent.

``make test`` runs it for 10 s; ``make soak`` (slow marker) for 60 s with 5,000 jobs.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import signal
import time
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from support import chaos

from pgaccess import Database
from pgaccess.jobs import VideoJobs

pytestmark = pytest.mark.faults

TICK = 0.2  # a fault every 200 ms
PAUSE_EVERY = 15  # ticks: one pause every 3 s ...
HEARTBEAT = 0.2  # ... of 5 heartbeats' length beyond RECLAIM_AFTER
RECLAIM_AFTER = 1.0
PAUSE_SECONDS = 2.5


def _context() -> ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    # Imported by the fork server once, so a worker start is a fork, not an import
    # of psycopg2 and pgaccess (200 ms). Not support.chaos: before CPython's fix of
    # gh-117378 (3.12 and 3.13 releases) the fork server ignores the tests'
    # sys.path, and it skips a preload that fails without a word; each child
    # imports that small module itself.
    ctx.set_forkserver_preload(["pgaccess", "pgaccess.jobs"])
    return ctx


@dataclasses.dataclass
class ChaosConfig:
    jobs: int
    seconds: float
    processes: int = 4
    threads: int = 2
    # Long enough that the workers cannot drain the queue before the chaos ends.
    handler_seconds: float = 0.05
    doomed_every: int = 50  # one job in 50 fails in its handler, every attempt
    max_attempts: int = 3


class Chaos:
    """Worker processes, and the test's hand on them: kill, pause, resume, replace."""

    def __init__(self, dsn: str, tmp: Path, config: ChaosConfig) -> None:
        self.dsn, self.tmp, self.config = dsn, tmp, config
        self.ctx = _context()
        self.stop_path = str(tmp / "stop")
        self.procs: Dict[str, BaseProcess] = {}
        self.paused: Dict[str, float] = {}  # name -> when to resume
        self.resumed: Dict[str, float] = {}  # name -> when it was resumed
        self.spawned = 0
        self.killed = 0
        self.pauses = 0

    def spawn(self) -> None:
        self.spawned += 1
        name = f"w{self.spawned}"
        proc = self.ctx.Process(
            target=chaos.chaos_worker,
            args=(
                self.dsn,
                name,
                self.config.threads,
                self.config.handler_seconds,
                HEARTBEAT,
                str(self.tmp / f"{name}.json"),
                self.stop_path,
            ),
            daemon=True,
        )
        proc.start()
        self.procs[name] = proc

    def kill_one(self, rng: random.Random) -> bool:
        now = time.monotonic()
        # Not a paused one, nor one just resumed: its late completions are the point.
        candidates = [
            n
            for n in self.procs
            if n not in self.paused and now - self.resumed.get(n, -1e9) > 2.0
        ]
        if not candidates:
            return False
        name = rng.choice(candidates)
        proc = self.procs.pop(name)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        self.killed += 1
        self.spawn()
        return True

    def pause_one(self, rng: random.Random) -> None:
        candidates = [n for n in self.procs if n not in self.paused]
        name = rng.choice(candidates)
        pid = self.procs[name].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.paused[name] = time.monotonic() + PAUSE_SECONDS
        self.pauses += 1

    def resume_due(self, *, all_of_them: bool = False) -> None:
        now = time.monotonic()
        for name, when in list(self.paused.items()):
            if all_of_them or now >= when:
                pid = self.procs[name].pid
                assert pid is not None
                os.kill(pid, signal.SIGCONT)
                del self.paused[name]
                self.resumed[name] = now

    def stop(self) -> List[Dict[str, int]]:
        """Stop the living workers cleanly; the counts of every worker that ran."""
        self.resume_due(all_of_them=True)
        Path(self.stop_path).touch()
        for proc in self.procs.values():
            proc.join(60)
            assert proc.exitcode == 0, proc
        counts = []
        for path in sorted(self.tmp.glob("w*.json")):
            counts.append(json.loads(path.read_text()))
        return counts

    def abort(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)


def enqueue(jobs: VideoJobs, config: ChaosConfig) -> Tuple[List[int], List[int]]:
    items = [
        {
            "src_hash": f"{chaos.DOOMED if i % config.doomed_every == 0 else 'v-'}{i}",
            "input_path": f"/in/{i}.mp4",
            "max_attempts": config.max_attempts,
        }
        for i in range(config.jobs)
    ]
    ids = jobs.enqueue_many(items)
    doomed = [j for j, item in zip(ids, items) if item["src_hash"].startswith("doomed")]
    return ids, doomed


def unfinished(db: Database) -> int:
    return db.count("video_job", {"status": ["queued", "processing"]})


def run_chaos(db: Database, dsn: str, tmp: Path, config: ChaosConfig) -> Dict[str, Any]:
    jobs = VideoJobs(db)
    ids, doomed = enqueue(jobs, config)
    rng = random.Random(1234)
    chaos_run = Chaos(dsn, tmp, config)
    reclaimed = skipped = 0
    try:
        for _ in range(config.processes):
            chaos_run.spawn()
        start = time.monotonic()
        tick = 0
        while time.monotonic() - start < config.seconds and unfinished(db):
            tick += 1
            next_tick = start + tick * TICK
            chaos_run.resume_due()
            if tick % PAUSE_EVERY == 0:
                chaos_run.pause_one(rng)
            elif not chaos_run.kill_one(rng):
                skipped += 1
            reclaimed += jobs.reclaim_stale(RECLAIM_AFTER)
            time.sleep(max(0.0, next_tick - time.monotonic()))
        chaos_seconds = time.monotonic() - start
        # The chaos is over: the workers left finish the queue, the supervisor goes
        # on returning the jobs of the killed ones.
        chaos_run.resume_due(all_of_them=True)
        left_at_end = unfinished(db)
        deadline = time.monotonic() + 120
        while unfinished(db):
            assert time.monotonic() < deadline, "the queue was not drained"
            reclaimed += jobs.reclaim_stale(RECLAIM_AFTER)
            time.sleep(0.2)
        counts = chaos_run.stop()
    except BaseException:
        chaos_run.abort()
        raise
    return {
        "ids": ids,
        "doomed": doomed,
        "killed": chaos_run.killed,
        "pauses": chaos_run.pauses,
        "spawned": chaos_run.spawned,
        "reclaimed": reclaimed,
        "chaos_seconds": chaos_seconds,
        "ticks": tick,
        "skipped": skipped,
        "unfinished_when_chaos_ended": left_at_end,
        "worker_counts": counts,
    }


def check_exactly_once(db: Database, run: Dict[str, Any], config: ChaosConfig) -> None:
    rows = db.execute(
        """
        SELECT v.id, v.status, v.attempts, v.max_attempts, v.locked_by,
               (SELECT count(*) FROM highlight h WHERE h.job_id = v.id) AS highlights,
               (SELECT min(h.start_time) FROM highlight h WHERE h.job_id = v.id)
                   AS highlight_attempt,
               (SELECT count(*) FROM processing_metrics m
                WHERE m.job_id = v.id AND m.stage = 'handler') AS completions,
               (SELECT count(*) FROM processing_metrics m
                WHERE m.job_id = v.id AND m.stage = 'handler_run') AS runs
        FROM video_job v
        """
    )
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == sorted(run["ids"])  # none lost, none made up
    doomed = set(run["doomed"])
    completed = failed = 0
    for job_id, r in by_id.items():
        assert r["attempts"] <= r["max_attempts"], r
        assert r["runs"] <= r["attempts"], r  # a run is always preceded by a claim
        if r["status"] == "completed":
            completed += 1
            assert job_id not in doomed, r
            # Exactly one completion: one highlight and one 'handler' timing, both
            # written by the completing statement, and its highlight names the
            # attempt that is the job's last.
            assert (r["highlights"], r["completions"]) == (1, 1), r
            assert r["highlight_attempt"] == r["attempts"], r
            assert r["runs"] >= 1, r
        else:
            assert r["status"] == "failed", r  # nothing left queued or processing
            failed += 1
            assert r["attempts"] == r["max_attempts"], r  # its attempts were spent
            assert (r["highlights"], r["completions"]) == (0, 0), r
    # Every doomed job failed; the others failed only if killed on every attempt.
    assert {by_id[j]["status"] for j in doomed} == {"failed"}
    assert completed + failed == config.jobs
    # The worker processes agree: no completion was acknowledged that the database
    # does not show (a killed process's last half second of counts is lost, so ≤).
    acknowledged = sum(c["completed"] for c in run["worker_counts"])
    assert acknowledged <= completed


def report(run: Dict[str, Any], db: Database) -> str:
    counts = run["worker_counts"]
    statuses = {
        r["status"]: r["n"]
        for r in db.execute("SELECT status, count(*) AS n FROM video_job GROUP BY 1")
    }
    retried = db.count("video_job", {"attempts": [2, 3, 4, 5]})
    return (
        f"chaos {run['chaos_seconds']:.1f} s, {run['ticks']} ticks (one every "
        f"{run['chaos_seconds'] / max(run['ticks'], 1) * 1000:.0f} ms): "
        f"{run['killed']} workers SIGKILLed, "
        f"{run['pauses']} paused, {run['spawned']} started, {run['reclaimed']} jobs "
        f"reclaimed; {run['unfinished_when_chaos_ended']} unfinished when it ended; "
        f"final {statuses}; {retried} jobs took more than one attempt; JobLost seen by "
        f"workers {sum(c['lost'] for c in counts)}"
    )


def chaos_test(db: Database, dsn: str, tmp: Path, config: ChaosConfig) -> None:
    run = run_chaos(db, dsn, tmp, config)
    print("\n" + report(run, db))
    check_exactly_once(db, run, config)
    # The chaos ran its course: a fault every tick (none skipped: there was always a
    # worker to kill), and the queue was not drained before it ended.
    assert run["unfinished_when_chaos_ended"] > 0
    assert run["ticks"] >= 0.9 * config.seconds / TICK  # one every 200 ms, kept up
    assert run["skipped"] == 0
    assert run["killed"] + run["pauses"] == run["ticks"]
    assert run["pauses"] == run["ticks"] // PAUSE_EVERY >= 1
    # Killing workers mid-job left jobs to reclaim, and they were done by others.
    assert run["reclaimed"] > 0
    # Paused workers came back to find their jobs gone: their completions raised
    # JobLost (counted by the workers) and, as checked above, changed nothing.
    assert sum(c["lost"] for c in run["worker_counts"]) >= 1


def test_queue_exactly_once_while_workers_are_killed(
    db: Database, pgaccess_dsn: str, tmp_path: Path
) -> None:
    chaos_test(db, pgaccess_dsn, tmp_path, ChaosConfig(jobs=1200, seconds=10.0))


@pytest.mark.slow
@pytest.mark.xdist_group("slow")  # one after the other: each measures load
def test_queue_exactly_once_while_workers_are_killed_for_a_minute(
    db: Database, pgaccess_dsn: str, tmp_path: Path
) -> None:
    chaos_test(
        db,
        pgaccess_dsn,
        tmp_path,
        ChaosConfig(jobs=5000, seconds=60.0, handler_seconds=0.1),
    )


def test_a_paused_workers_late_complete_raises_job_lost_and_changes_nothing(
    db: Database, pgaccess_dsn: str
) -> None:
    jobs = VideoJobs(db)
    job_id = jobs.enqueue("paused", "/in/p.mp4")
    ctx = _context()
    receiver, sender = ctx.Pipe()
    proc = ctx.Process(
        target=chaos.hold_until_told, args=(pgaccess_dsn, "sleeper", 0.1, sender)
    )
    proc.start()
    try:
        assert receiver.poll(30)
        assert receiver.recv() == ("holding", job_id)

        def heartbeat_at() -> Any:
            row = db.find_one("video_job", {"id": job_id})
            assert row is not None
            return row["heartbeat_at"]

        # Its heartbeat runs while it holds the job ...
        first = heartbeat_at()
        deadline = time.monotonic() + 5
        while heartbeat_at() == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        # ... and stops while it is paused, so the job goes stale and is reclaimed.
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.3)  # a beat already sent lands
        paused_at = heartbeat_at()
        time.sleep(0.6)
        assert heartbeat_at() == paused_at
        assert jobs.reclaim_stale(0.5) == 1
        with jobs.processing("alive") as job:
            assert job is not None and job.id == job_id
            job.add_highlight(1, 2, 0.9, "on time")
            job.record("handler", 5.0)
            job.output_path = "/out/on-time"

        def snapshot() -> Tuple[Any, ...]:
            return (
                db.find_one("video_job", {"id": job_id}),
                db.find_many("highlight", {"job_id": job_id}, order_by="id"),
                db.find_many("processing_metrics", {"job_id": job_id}, order_by="id"),
            )

        before = snapshot()
        assert before[0] is not None and before[0]["locked_by"] == "alive"
        os.kill(proc.pid, signal.SIGCONT)
        sender.close()
        receiver.send("go")
        assert receiver.poll(30)
        assert receiver.recv() == ("lost", job_id, "completed", "alive", "complete")
        proc.join(30)
        assert proc.exitcode == 0
        assert snapshot() == before  # the late completion changed nothing
    finally:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
