"""Worker processes for the queue chaos tests (``tests/scenarios/test_queue_chaos.py``).

They run in processes made by a ``forkserver`` context that preloads pgaccess, so
starting one is a fork of a small, single-threaded server (about 10 ms), not a fresh
interpreter importing psycopg2 (about 200 ms): the chaos test starts a replacement
for every worker it kills, five a second.

A worker process never talks to its parent through a lock (a SIGKILL while holding
one would hang the parent); it writes its counts to a file, replaced whole twice a
second, and stops when a stop file appears.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from typing import Any, Dict

from pgaccess import Database
from pgaccess.jobs import JobLost, Metrics, VideoJobs, Worker

#: Jobs whose ``src_hash`` starts with this fail in the handler, every attempt.
DOOMED = "doomed-"


def _write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def chaos_worker(
    dsn: str,
    name: str,
    threads: int,
    handler_seconds: float,
    heartbeat_interval: float,
    stats_path: str,
    stop_path: str,
) -> None:
    """Run a ``Worker`` with ``threads`` threads until ``stop_path`` exists.

    The handler leaves a trace of every run (a ``handler_run`` metric, committed
    before the work), works for about ``handler_seconds``, raises for doomed jobs,
    and otherwise returns a highlight that names the attempt, so a job completed
    twice would show two highlights.
    """
    # What pgaccess logs (failed jobs, JobLost, reclaims) goes to a file beside the
    # counts, not to the test's terminal.
    logging.basicConfig(
        filename=stats_path.replace(".json", ".log"),
        level=logging.INFO,
        format="%(asctime)s %(threadName)s %(levelname)s %(message)s",
    )
    with Database(dsn=dsn, maxconn=threads + 2, timeout=30) as db:
        jobs = VideoJobs(db)
        jobs.HEARTBEAT_INTERVAL = heartbeat_interval
        jobs.BACKOFF_BASE, jobs.BACKOFF_MAX = 0.01, 0.05
        metrics = Metrics(db)

        def handler(job: Dict[str, Any]) -> Dict[str, Any]:
            metrics.record(job["id"], "handler_run", 0.0)
            time.sleep(handler_seconds * random.uniform(0.5, 1.5))
            if job["src_hash"].startswith(DOOMED):
                raise RuntimeError(f"job {job['id']} is doomed")
            attempt = float(job["attempts"])
            return {"highlights": [{"start": attempt, "end": attempt + 1, "score": 1}]}

        worker = Worker(
            db,
            handler,
            threads=threads,
            worker_id=name,
            jobs=jobs,
            idle_min=0.01,
            idle_max=0.05,
        )
        worker.start()
        try:
            while not os.path.exists(stop_path):
                _write_json(stats_path, worker.stats())
                time.sleep(0.5)
        finally:
            worker.stop()
            worker.join(30)
            _write_json(stats_path, worker.stats())


def hold_until_told(
    dsn: str, worker_id: str, heartbeat_interval: float, conn: Any
) -> None:
    """Claim one job and hold it (heartbeat running) until ``conn`` says go; then
    complete it, and report through ``conn`` what the completion did.

    Sends ``("holding", job_id)`` once the job is claimed, then ``("completed",)``
    or ``("lost", job_id, status, holder)`` when ``complete`` raised ``JobLost``.
    """
    with Database(dsn=dsn, maxconn=2) as db:
        jobs = VideoJobs(db)
        jobs.HEARTBEAT_INTERVAL = heartbeat_interval
        try:
            with jobs.processing(worker_id) as job:
                if job is None:
                    conn.send(("nothing",))
                    return
                conn.send(("holding", job.id))
                conn.recv()  # go
                job.add_highlight(100, 101, 0.1, "late")
                job.record("late", 1.0)
                job.output_path = "/out/late"
            conn.send(("completed",))
        except JobLost as exc:
            conn.send(("lost", exc.job_id, exc.status, exc.holder, exc.action))
        finally:
            conn.close()
