"""The demo that ``pgaccess demo`` runs: synthetic videos through the job queue.

``run_demo()`` enqueues a run of synthetic jobs, works them off with a ``Worker`` and
returns a summary read back from the database; ``print_summary()`` prints it. With no
DSN it uses the embedded PostgreSQL (``pgaccess.embedded``) and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import threading
import time
import uuid
from pathlib import Path
from time import perf_counter
from typing import Any, Dict, Iterator, List, Optional, TextIO

from . import schema, terminal
from .database import Database
from .jobs import Handler, Metrics, VideoJobs, Worker
from .jobs import queries as Q

__all__ = ["SyntheticFailure", "print_stages", "print_summary", "run_demo"]


class SyntheticFailure(Exception):
    """The demo handler's injected failure (retried like any other)."""


def _synthetic_handler(seed: int, fail_rate: float) -> Handler:
    """1-5 ms of pretend work per video, 1-4 highlights, failures at ``fail_rate``.

    Its random choices depend on the seed, the video and the attempt only, so a run
    with ``--seed`` makes the same choices whichever thread gets which job.
    """

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        rng = random.Random(f"{seed}:{job['src_hash']}:{job['attempts']}")
        t0 = perf_counter()
        time.sleep(rng.uniform(0.001, 0.003))
        decode_ms = (perf_counter() - t0) * 1000.0
        if rng.random() < fail_rate:
            raise SyntheticFailure(f"could not decode {job['input_path']}")
        t1 = perf_counter()
        time.sleep(rng.uniform(0.0, 0.002))
        starts = sorted(rng.sample(range(0, 590, 10), rng.randint(1, 4)))
        highlights = [
            {
                "start": float(s),
                "end": s + rng.uniform(2.0, 9.0),
                "score": round(rng.random(), 3),
                "label": rng.choice(("goal", "save", "crowd", "replay")),
            }
            for s in starts
        ]
        return {
            "highlights": highlights,
            "output_path": f"/demo/out/{job['src_hash']}.json",
            "metrics": {"decode": decode_ms, "detect": (perf_counter() - t1) * 1000.0},
        }

    return handler


def _zero_cost_handler(job: Dict[str, Any]) -> None:
    return None


def _splitting_handler(queue: VideoJobs, segment: Handler, segments: int) -> Handler:
    """A video split into ``segments`` children, each run by ``segment``, then merged.

    First run of a video: spawn its segments (they start when this run ends, and the
    video waits). Last segment finished: the video comes back with
    ``children_done``; the merge reads the segments and writes the video's output,
    or fails when a segment failed for good.
    """

    def handler(job: Dict[str, Any]) -> Any:
        if job["parent_id"] is not None:
            return segment(job)
        if not job["children_done"]:
            length = 600.0 / segments
            return {
                "spawn": [
                    {
                        "src_hash": f"{job['src_hash']}/seg{k}",
                        "input_path": f"{job['input_path']}#t={k * length:g},"
                        f"{(k + 1) * length:g}",
                        "priority": job["priority"],
                    }
                    for k in range(segments)
                ]
            }
        t0 = perf_counter()
        parts = queue.children(job["id"])
        lost = [p["job_number"] for p in parts if p["status"] != "completed"]
        if lost:
            raise SyntheticFailure(f"segments {', '.join(lost)} did not complete")
        return {
            "output_path": f"/demo/out/{job['src_hash']}.json",
            "metrics": {"merge": (perf_counter() - t0) * 1000.0},
        }

    return handler


_DEMO_DATABASE = "pgaccess_demo"


@contextlib.contextmanager
def _demo_database(explicit: Optional[str], out: TextIO) -> Iterator[str]:
    """The demo's DSN for a block; the embedded server when no DSN is set.

    The embedded server is stopped when the block ends on any path (an error while
    creating the demo's database, Ctrl-C, SIGTERM), unless another demo still uses
    it. A server left running by a killed demo is reused, then stopped the same way.
    """
    dsn = explicit or os.environ.get("PGACCESS_DSN") or os.environ.get("DATABASE_URL")
    if dsn:
        yield dsn
        return
    from .embedded import EmbeddedServer, project_datadir

    datadir = project_datadir(Path.cwd())
    server = EmbeddedServer(datadir)
    with server.running():
        conn = server.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (_DEMO_DATABASE,)
                )
                exists = cur.fetchone() is not None
        finally:
            conn.close()
        if not exists:
            server.create_database(_DEMO_DATABASE)
        print(
            "pgaccess demo: PGACCESS_DSN and DATABASE_URL are not set, so using the "
            f"embedded PostgreSQL in {datadir} (database {_DEMO_DATABASE}, kept "
            f"between runs; {'started' if server.started_here else 'already running'}"
            ", stopped at the end unless another demo uses it)",
            file=out,
        )
        yield server.dsn(_DEMO_DATABASE)


def run_demo(
    *,
    jobs: int = 500,
    workers: int = 8,
    fail_rate: float = 0.05,
    seed: Optional[int] = None,
    zero_cost: bool = False,
    dsn: Optional[str] = None,
    force: bool = False,
    out: TextIO = sys.stdout,
    stop: Optional[threading.Event] = None,
    segments: int = 0,
) -> Dict[str, Any]:
    """Run the pipeline demo and return its summary (this run's jobs only).

    Enqueues ``jobs`` synthetic videos under a fresh run id, processes them with
    ``workers`` threads, shows progress on ``out``, and returns the counts read back
    from the database. ``segments``: each video is split into that many child jobs
    (``JobHandle.spawn``), processed in parallel, and merged when the last one
    finished. Refuses (``RuntimeError``) a database holding queued work
    that is not the demo's, unless ``force``: its workers would take it. Blocks until
    every job of the run is finished or ``stop`` is set.
    """
    if segments < 0:
        raise RuntimeError(f"segments must be 0 or more, not {segments}")
    seed = random.randrange(2**31) if seed is None else seed
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with contextlib.ExitStack() as stack:
        # Closed in reverse: the pool first, then the embedded server (if any).
        where = stack.enter_context(_demo_database(dsn, out))
        db = stack.enter_context(Database(dsn=where, maxconn=workers + 2, name="demo"))
        schema.apply(db.pool)
        foreign = db.execute(Q.DEMO_FOREIGN_WORK, {"prefix": "demo-"})[0]["n"]
        if foreign and not force:
            raise RuntimeError(
                f"the database holds {foreign} queued or processing jobs that "
                "are not the demo's, and the demo's workers would take them; "
                "run it on a scratch database (or pass --force)"
            )
        return _run_demo(
            db, run_id, jobs, workers, fail_rate, seed, zero_cost, out, stop, segments
        )


def _run_demo(
    db: Database,
    run_id: str,
    n_jobs: int,
    workers: int,
    fail_rate: float,
    seed: int,
    zero_cost: bool,
    out: TextIO,
    stop: Optional[threading.Event],
    segments: int = 0,
) -> Dict[str, Any]:
    rng = random.Random(seed)
    queue = VideoJobs(db)
    # Small backoff so that retried failures finish within the demo.
    queue.BACKOFF_BASE, queue.BACKOFF_MAX = 0.02, 0.2
    ids: List[int] = []
    for first in range(0, n_jobs, 1000):
        ids += queue.enqueue_many(
            {
                "src_hash": f"demo-{run_id}-{i:07d}",
                "input_path": f"/demo/videos/{run_id}/{i:07d}.mp4",
                "priority": rng.choice((0, 0, 0, 1, 2)),
            }
            for i in range(first, min(first + 1000, n_jobs))
        )
    handler = _zero_cost_handler if zero_cost else _synthetic_handler(seed, fail_rate)
    if segments:
        handler = _splitting_handler(queue, handler, segments)
    print(
        f"pgaccess demo: run {run_id}: {n_jobs} videos"
        + (f" in {segments} segments each" if segments else "")
        + f", {workers} worker threads, "
        + (
            "zero-cost handler"
            if zero_cost
            else f"fail rate {fail_rate:g}, seed {seed}"
        ),
        file=out,
    )
    worker = Worker(
        db,
        handler,
        threads=workers,
        worker_id=f"demo-{run_id}",
        jobs=queue,
        record_metrics=not zero_cost,
        idle_min=0.002,
        idle_max=0.05,
    )
    progress = terminal.progress(out, n_jobs)
    jobs_logger = logging.getLogger("pgaccess.jobs")
    saved_level = jobs_logger.level
    if not jobs_logger.isEnabledFor(logging.INFO):
        # Injected failures are the point of the demo, not warnings to the user.
        jobs_logger.setLevel(logging.ERROR)
    started = db.execute("SELECT clock_timestamp() AS t")[0]["t"]
    worker.start()
    try:
        params = {"ids": ids}
        while True:
            row = db.execute(Q.DEMO_PROGRESS, params)[0]
            if row["unfinished"] == 0 or (stop is not None and stop.is_set()):
                break
            progress.show(row)
            time.sleep(0.02 if n_jobs <= 1000 else 0.1)
    except BaseException:
        progress.close()  # a live view gives the terminal back
        raise
    finally:
        worker.stop()
        worker.join()
        jobs_logger.setLevel(saved_level)
    totals = db.execute(Q.DEMO_RUN_TOTALS, {"ids": ids, "started": started})[0]
    progress.show(totals, final=True)
    stages = Metrics(db).summary(job_ids=ids)
    split = db.execute(Q.DEMO_SEGMENTS, {"ids": ids})[0] if segments else None
    pool = db.stats()["pool"]
    finished = int(totals["completed"]) + int(totals["failed"])
    elapsed = totals["elapsed_s"] or 0.0
    return {
        "run_id": run_id,
        "jobs": n_jobs,
        "workers": workers,
        "fail_rate": fail_rate,
        "seed": seed,
        "zero_cost": zero_cost,
        "completed": int(totals["completed"]),
        "failed": int(totals["failed"]),
        "cancelled": int(totals["cancelled"]),
        "unfinished": int(totals["unfinished"]),
        "retried": int(totals["retried"]),
        "failed_attempts": int(totals["attempts"]) - int(totals["completed"]),
        "highlights": int(totals["highlights"]),
        "segments": None if split is None else {k: int(v) for k, v in split.items()},
        "stages": stages,
        "elapsed_s": elapsed,
        "jobs_per_s": finished / elapsed if elapsed > 0 else None,
        "pool": {
            "maxconn": pool.get("maxconn"),
            "requests": pool.get("requests"),
            "waits": pool.get("requests_waiting"),
            "timeouts": pool.get("timeouts"),
            "wait_time_s": pool.get("wait_time"),
        },
        "worker": worker.stats(),
    }


def print_summary(s: Dict[str, Any], out: TextIO) -> None:
    lines = [
        f"pgaccess demo summary: run {s['run_id']}",
        f"  jobs completed       {s['completed']:>8}",
        f"  jobs failed          {s['failed']:>8}   (out of attempts)",
        f"  jobs retried         {s['retried']:>8}   "
        f"(needed more than one attempt; {s['failed_attempts']} failed attempts)",
        f"  highlights written   {s['highlights']:>8}",
    ]
    split = s.get("segments")
    if split:
        lines.append(
            f"  segments completed   {split['completed']:>8}   (of {split['total']}, "
            f"{split['failed']} failed; each video merged from its segments)"
        )
    if s["unfinished"] or s["cancelled"]:
        lines.append(
            f"  jobs unfinished      {s['unfinished']:>8}   "
            f"(cancelled {s['cancelled']})"
        )
    rate = s["jobs_per_s"]
    lines.append(
        f"  throughput           {'-' if rate is None else f'{rate:8.1f}'} jobs/s "
        f"({s['completed'] + s['failed']} jobs in {s['elapsed_s']:.2f} s, "
        f"{s['workers']} threads)"
    )
    p = s["pool"]
    lines.append(
        f"  pool                 maxconn {p['maxconn']}, requests {p['requests']}, "
        f"waits {p['waits']}, timeouts {p['timeouts']}, "
        f"wait time {p['wait_time_s'] or 0:.3f} s"
    )
    for line in lines:
        print(line, file=out)
    if s["stages"]:
        print_stages(s["stages"], out, full=False)
    else:
        print("  stages               none recorded (--zero-cost)", file=out)


def print_stages(stages: Dict[str, Dict[str, float]], out: TextIO, full: bool) -> None:
    """The per-stage timings as a table (with mean and max when ``full``)."""
    keys = ["count", "p50_ms", "p95_ms"] + (["mean_ms", "max_ms"] if full else [])
    columns = terminal.columns_of(
        "stage", ">count", ">p50 ms", ">p95 ms", *([">mean ms", ">max ms"] * full)
    )
    rows: List[List[Any]] = [
        [stage, *(s[k] if k == "count" else f"{s[k]:.2f}" for k in keys)]
        for stage, s in stages.items()
    ]
    terminal.table(out, "stages", columns, rows)
