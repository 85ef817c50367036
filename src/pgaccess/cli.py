"""The ``pgaccess`` command: init-db, stats, reclaim, worker and demo.

``main(argv)`` returns the exit status: 0, 1 for a database error (printed on one
line, without a traceback), 130 when interrupted. The DSN is ``--dsn``, else
``PGACCESS_DSN``, else ``DATABASE_URL``, else libpq's defaults; only ``demo`` starts
the embedded PostgreSQL, when none of them is set, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from time import perf_counter
from types import FrameType
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    TextIO,
    Tuple,
)

from . import schema
from .config import redact_dsn
from .database import Database
from .errors import DatabaseError
from .jobs import Handler, Metrics, VideoJobs, Worker

__all__ = ["load_handler", "main", "parse_duration", "run_demo"]

logger = logging.getLogger("pgaccess.cli")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``, ``"250ms"`` or ``"90"``.

    A bare number is seconds. Raises ``ValueError`` for anything else.
    """
    compact = "".join(text.split())
    parts = list(_DURATION_PART.finditer(compact))
    if not compact or "".join(p.group(0) for p in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration; use e.g. 30s, 5m, 1h30m (or plain seconds)"
        )
    return sum(
        float(p.group(1)) * _UNIT_SECONDS[(p.group(2) or "s").lower()] for p in parts
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate between 0 and 1")
    return value


# ------------------------------------------------------------------ commands
def _database(args: argparse.Namespace, maxconn: int) -> Database:
    return Database(dsn=args.dsn, maxconn=maxconn)


def _cmd_init_db(args: argparse.Namespace, out: TextIO) -> int:
    with _database(args, 1) as db:
        schema.apply(db.pool)
        where = redact_dsn(db.pool.settings.dsn) or "libpq's default database"
    print(f"pgaccess: schema applied to {where}", file=out)
    return 0


def _cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    with _database(args, 2) as db:
        queue = VideoJobs(db).stats()
        stages = Metrics(db).summary()
        queries = db.stats()["queries"]
    if args.json:
        report = {"queue": queue, "stages": stages, "queries": queries}
        print(json.dumps(report, indent=2, default=str), file=out)
        return 0
    print("queue", file=out)
    for status in ("queued", "processing", "completed", "failed", "cancelled"):
        print(f"  {status:<12} {queue[status]:>10}", file=out)
    print(f"  {'oldest queued':<20} {_fmt_seconds(queue['oldest_queued_s'])}", file=out)
    print(
        f"  {'finished/min':<20} {queue['finished_per_minute']:.1f} (last 5 min)",
        file=out,
    )
    rate = queue["success_rate"]
    print(f"  {'success rate':<20} {'-' if rate is None else f'{rate:.1%}'}", file=out)
    print(
        f"  {'processing time':<20} mean {_fmt_seconds(queue['mean_processing_s'])},"
        f" p95 {_fmt_seconds(queue['p95_processing_s'])}",
        file=out,
    )
    _print_stages(stages, out, full=True)
    print("top statements of this command (pgaccess counts per process)", file=out)
    for q in queries[: args.top]:
        print(
            f"  {q['calls']:>6} calls {q['total_ms']:>9.1f} ms  {q['statement'][:90]}",
            file=out,
        )
    return 0


def _cmd_reclaim(args: argparse.Namespace, out: TextIO) -> int:
    with _database(args, 1) as db:
        count = VideoJobs(db).reclaim_stale(args.older_than)
    print(
        f"pgaccess: reclaimed {count} jobs with no heartbeat for "
        f"{_fmt_seconds(args.older_than)}",
        file=out,
    )
    return 0


def load_handler(spec: str) -> Handler:
    """The function named by ``"package.module:function"``.

    The current directory is searched first, so a handler next to the caller's
    scripts is found. Raises ``ValueError`` with the reason when it cannot be loaded.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--handler {spec!r}: expected module:function")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"--handler {spec!r}: cannot import {module_name}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"--handler {spec!r}: {module_name} has no {attr}"
            ) from None
    if not callable(target):
        raise ValueError(f"--handler {spec!r}: {attr} is not callable")
    handler: Handler = target
    return handler


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, what: str) -> Iterator[None]:
    """Set ``stop`` on the first SIGINT/SIGTERM; the second one ends the process.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        if stop.is_set():
            # A second signal: leave now. The jobs in hand stay 'processing' until
            # reclaim_stale returns them to the queue.
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            raise KeyboardInterrupt
        logger.warning(
            "%s: %s (send it again to exit at once)",
            signal.Signals(signum).name,
            what,
        )
        stop.set()

    for sig in signals:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_worker(args: argparse.Namespace, out: TextIO) -> int:
    try:
        handler = load_handler(args.handler)
    except ValueError as exc:
        print(f"pgaccess: error: {exc}", file=sys.stderr)
        return 2
    with _database(args, args.threads + 2) as db:
        worker = Worker(
            db,
            handler,
            threads=args.threads,
            worker_id=args.worker_id,
            reclaim_after=args.reclaim_after,
        )
        stop = threading.Event()
        with _stop_on_signals(stop, "finishing the jobs in hand, then stopping"):
            worker.run(stop)
        counts = worker.stats()
    print(
        "pgaccess: worker stopped: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        file=out,
    )
    return 0


# ---------------------------------------------------------------------- demo
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


_DEMO_DATABASE = "pgaccess_demo"


def _demo_dsn(
    explicit: Optional[str], out: TextIO
) -> Tuple[str, Optional[Callable[[], None]]]:
    """The demo's DSN, and how to stop the embedded server if the demo started it."""
    dsn = explicit or os.environ.get("PGACCESS_DSN") or os.environ.get("DATABASE_URL")
    if dsn:
        return dsn, None
    from .embedded import EmbeddedServer

    datadir = Path.cwd() / ".pgaccess" / "pgdata"
    server = EmbeddedServer(datadir)
    was_running = server.is_running()
    server.start()
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
        f"embedded PostgreSQL in {datadir} (database {_DEMO_DATABASE}, kept between "
        f"runs; {'already running' if was_running else 'stopped again at the end'})",
        file=out,
    )
    return server.dsn(_DEMO_DATABASE), None if was_running else server.stop


_PROGRESS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('queued', 'processing')) AS unfinished,
       count(*) FILTER (WHERE attempts > 1) AS retried
FROM video_job WHERE id = ANY(%(ids)s::bigint[])
"""

_RUN_TOTALS = """
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status IN ('queued', 'processing')) AS unfinished,
       count(*) FILTER (WHERE attempts > 1) AS retried,
       coalesce(sum(attempts), 0) AS attempts,
       (SELECT count(*) FROM highlight WHERE job_id = ANY(%(ids)s::bigint[]))
           AS highlights,
       extract(epoch FROM max(finished_at) - %(started)s::timestamptz)::float8
           AS elapsed_s
FROM video_job WHERE id = ANY(%(ids)s::bigint[])
"""

_FOREIGN_WORK = """
SELECT count(*) AS n FROM video_job
WHERE status IN ('queued', 'processing') AND NOT starts_with(src_hash, %(prefix)s)
"""


class _Progress:
    """A plain-text progress bar: redrawn in place on a terminal, lines otherwise."""

    WIDTH = 30
    TTY_EVERY = 0.1
    LINE_EVERY = 2.0

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.started = perf_counter()
        # A terminal shows the bar at once; a log gets its first line after a while.
        self.last = 0.0 if self.tty else self.started
        self.drawn = 0

    def show(self, row: Dict[str, Any], final: bool = False) -> None:
        now = perf_counter()
        if not final and now - self.last < (
            self.TTY_EVERY if self.tty else self.LINE_EVERY
        ):
            return
        self.last = now
        done = int(row["completed"]) + int(row["failed"])
        frac = done / self.total if self.total else 1.0
        filled = int(frac * self.WIDTH)
        rate = done / max(now - self.started, 1e-9)
        text = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac:4.0%} "
            f"{done}/{self.total} done, {row['failed']} failed, "
            f"{row['retried']} retried, {rate:.0f} jobs/s"
        )
        if self.tty:
            # Pad to the longest line drawn, so a shorter one leaves nothing behind.
            self.drawn = max(self.drawn, len(text))
            self.out.write("\r" + text.ljust(self.drawn) + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()


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
) -> Dict[str, Any]:
    """Run the pipeline demo and return its summary (this run's jobs only).

    Enqueues ``jobs`` synthetic videos under a fresh run id, processes them with
    ``workers`` threads, shows progress on ``out``, and returns the counts read back
    from the database. Refuses (``RuntimeError``) a database holding queued work
    that is not the demo's, unless ``force``: its workers would take it. Blocks until
    every job of the run is finished or ``stop`` is set.
    """
    seed = random.randrange(2**31) if seed is None else seed
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dsn, stop_server = _demo_dsn(dsn, out)
    try:
        with Database(dsn=dsn, maxconn=workers + 2, name="demo") as db:
            schema.apply(db.pool)
            foreign = db.execute(_FOREIGN_WORK, {"prefix": "demo-"})[0]["n"]
            if foreign and not force:
                raise RuntimeError(
                    f"the database holds {foreign} queued or processing jobs that are "
                    "not the demo's, and the demo's workers would take them; run it "
                    "on a scratch database (or pass --force)"
                )
            return _run_demo(
                db, run_id, jobs, workers, fail_rate, seed, zero_cost, out, stop
            )
    finally:
        if stop_server is not None:
            stop_server()


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
    print(
        f"pgaccess demo: run {run_id}: {n_jobs} videos, {workers} worker threads, "
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
    progress = _Progress(out, n_jobs)
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
            row = db.execute(_PROGRESS, params)[0]
            if row["unfinished"] == 0 or (stop is not None and stop.is_set()):
                break
            progress.show(row)
            time.sleep(0.02 if n_jobs <= 1000 else 0.1)
    finally:
        worker.stop()
        worker.join()
        jobs_logger.setLevel(saved_level)
    totals = db.execute(_RUN_TOTALS, {"ids": ids, "started": started})[0]
    progress.show(totals, final=True)
    stages = Metrics(db).summary(job_ids=ids)
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


def _print_summary(s: Dict[str, Any], out: TextIO) -> None:
    lines = [
        f"pgaccess demo summary: run {s['run_id']}",
        f"  jobs completed       {s['completed']:>8}",
        f"  jobs failed          {s['failed']:>8}   (out of attempts)",
        f"  jobs retried         {s['retried']:>8}   "
        f"(needed more than one attempt; {s['failed_attempts']} failed attempts)",
        f"  highlights written   {s['highlights']:>8}",
    ]
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
        _print_stages(s["stages"], out, full=False)
    else:
        print("  stages               none recorded (--zero-cost)", file=out)


def _print_stages(stages: Dict[str, Dict[str, float]], out: TextIO, full: bool) -> None:
    head = "  stage            count    p50 ms    p95 ms"
    print(head + ("   mean ms    max ms" if full else ""), file=out)
    for stage, s in stages.items():
        line = f"  {stage:<14} {s['count']:>7} {s['p50_ms']:>9.2f} {s['p95_ms']:>9.2f}"
        if full:
            line += f" {s['mean_ms']:>9.2f} {s['max_ms']:>9.2f}"
        print(line, file=out)


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    stop = threading.Event()
    try:
        with _stop_on_signals(stop, "stopping the demo after the jobs in hand"):
            summary = run_demo(
                jobs=args.jobs,
                workers=args.workers,
                fail_rate=args.fail_rate,
                seed=args.seed,
                zero_cost=args.zero_cost,
                dsn=args.dsn,
                force=args.force,
                out=out,
                stop=stop,
            )
    except RuntimeError as exc:
        print(f"pgaccess demo: {exc}", file=sys.stderr)
        return 1
    _print_summary(summary, out)
    return 130 if stop.is_set() else 0


def _fmt_seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


# ---------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgaccess",
        description="The video pipeline's queue on PostgreSQL: schema, workers, stats.",
    )
    parser.add_argument(
        "--dsn",
        help="libpq DSN or URL (default: PGACCESS_DSN, then DATABASE_URL)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-db", help="apply the pipeline's schema (idempotent)")
    p.set_defaults(run=_cmd_init_db)

    p = sub.add_parser("stats", help="queue, stage timings and statement statistics")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--top", type=int, default=10, help="statements shown (10)")
    p.set_defaults(run=_cmd_stats)

    p = sub.add_parser("reclaim", help="requeue processing jobs with no heartbeat")
    p.add_argument(
        "--older-than",
        type=_duration,
        default=300.0,
        metavar="DURATION",
        help="heartbeat age, e.g. 30s, 5m, 1h (default 5m)",
    )
    p.set_defaults(run=_cmd_reclaim)

    p = sub.add_parser("worker", help="process jobs until SIGINT/SIGTERM")
    p.add_argument("--threads", type=_positive_int, default=4, help="threads (4)")
    p.add_argument(
        "--handler",
        required=True,
        metavar="MODULE:FUNCTION",
        help="handler(job: dict) -> None or dict(highlights, output_path, metrics)",
    )
    p.add_argument("--worker-id", help="prefix of the thread ids (default host:pid)")
    p.add_argument(
        "--reclaim-after",
        type=_duration,
        metavar="DURATION",
        help="also requeue other workers' jobs silent this long (default: never)",
    )
    p.set_defaults(run=_cmd_worker)

    p = sub.add_parser("demo", help="run the pipeline on synthetic videos")
    p.add_argument("--jobs", type=_positive_int, default=500, help="videos (500)")
    p.add_argument("--workers", type=_positive_int, default=8, help="threads (8)")
    p.add_argument(
        "--fail-rate", type=_rate, default=0.05, help="failed attempts (0.05)"
    )
    p.add_argument("--seed", type=int, help="random seed (default: random)")
    p.add_argument(
        "--zero-cost",
        action="store_true",
        help="a handler that does nothing: measures claim + complete throughput",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="run even if the database holds queued jobs that are not the demo's",
    )
    p.set_defaults(run=_cmd_demo)
    return parser


def _configure_logging(verbose: int, command: str) -> None:
    level = logging.WARNING
    if verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1 or command == "worker":
        level = logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``pgaccess`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status; argparse exits (status 2) on bad arguments.
    """
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose, args.command)
    out = sys.stdout
    try:
        run: Callable[[argparse.Namespace, TextIO], int] = args.run
        return run(args, out)
    except DatabaseError as exc:
        print(f"pgaccess {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pgaccess {args.command}: interrupted", file=sys.stderr)
        return 130
