"""Worker code tests run in other processes (multiprocessing, ``pgaccess worker``).

Each process makes its own ``Database`` from a DSN (or ``PGACCESS_DSN``): a pool is
never shared across processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, Optional

from pgaccess import Database
from pgaccess.jobs import Metrics, VideoJobs, Worker

_db: Optional[Database] = None
_db_lock = threading.Lock()


def _default_db() -> Database:
    """One Database per process, on PGACCESS_DSN (for handlers run by the CLI)."""
    global _db
    with _db_lock:
        if _db is None:
            _db = Database(dsn=os.environ["PGACCESS_DSN"], maxconn=4)
        return _db


def unfinished(db: Database) -> int:
    """How many jobs are still queued or processing."""
    rows = db.execute(
        "SELECT count(*) AS n FROM video_job WHERE status IN ('queued', 'processing')"
    )
    return int(rows[0]["n"])


def record_run(job: Dict[str, Any]) -> Dict[str, Any]:
    """A handler that leaves a trace of every run: a 'handler_run' metric row."""
    Metrics(_default_db()).record(job["id"], "handler_run", 0.0)
    return {"highlights": [{"start": 1.0, "end": 2.0, "score": 0.5, "label": "x"}]}


def slow(job: Dict[str, Any]) -> Dict[str, Any]:
    """A handler that sleeps SLOW_SECONDS, then leaves a trace as record_run does."""
    time.sleep(float(os.environ.get("SLOW_SECONDS", "1.0")))
    return record_run(job)


def drain(dsn: str, name: str, threads: int) -> Dict[str, int]:
    """Run a Worker in this process until no job is queued or processing."""
    with Database(dsn=dsn, maxconn=threads + 2) as db:
        metrics = Metrics(db)

        def handler(job: Dict[str, Any]) -> None:
            metrics.record(job["id"], "handler_run", 0.0)

        worker = Worker(
            db, handler, threads=threads, worker_id=name, idle_min=0.01, idle_max=0.05
        )
        worker.start()
        try:
            while unfinished(db):
                time.sleep(0.05)
        finally:
            worker.stop()
            worker.join(30)
        return worker.stats()


def claim_and_die(dsn: str, worker_id: str, conn: Any) -> None:
    """Claim one job, send its id through ``conn``, then die by SIGKILL (no cleanup)."""
    with Database(dsn=dsn, maxconn=2) as db:
        jobs = VideoJobs(db)
        claimed = jobs.claim(worker_id)
        conn.send(claimed[0]["id"] if claimed else None)
        conn.close()
        os.kill(os.getpid(), signal.SIGKILL)
