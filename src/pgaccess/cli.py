"""The ``pgaccess`` command: argument parsing and dispatch (init-db ... demo).

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
import re
import secrets
import signal
import sys
import threading
from datetime import datetime
from types import FrameType
from typing import Any, Callable, Iterator, List, Optional, Sequence, TextIO

from . import schema, terminal
from .config import redact_dsn
from .database import Database
from .demo import print_stages, print_summary, run_demo
from .errors import DatabaseError
from .jobs import Handler, Metrics, VideoJobs, Worker

# run_demo stays importable from here, where it was before pgaccess.demo.
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
        applied = schema.migrate(db.pool)
        where = _where(db)
    print(f"pgaccess: schema applied to {where}: {_applied(applied)}", file=out)
    return 0


def _cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    with _database(args, 1) as db:
        where = _where(db)
        if args.dry_run:
            script = schema.dry_run_sql(db.pool)
            print(script or f"-- {where} is up to date: nothing to run", file=out)
            return 0
        if args.status:
            _print_status(schema.status(db.pool), where, out)
            return 0
        applied = schema.migrate(db.pool)
        version = schema.status(db.pool).version
    print(f"pgaccess: {where}: schema version {version}, {_applied(applied)}", file=out)
    return 0


def _when(moment: Optional[datetime]) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S %Z}"


def _where(db: Database) -> str:
    return redact_dsn(db.pool.settings.dsn) or "libpq's default database"


def _applied(applied: Sequence[schema.Migration]) -> str:
    if not applied:
        return "up to date, nothing to apply"
    return "applied " + ", ".join(m.label for m in applied)


def _print_status(state: schema.SchemaStatus, where: str, out: TextIO) -> None:
    """``pgaccess migrate --status``: each migration, applied (when, by what) or
    pending."""
    rows = [
        (a.label, _when(a.applied_at), a.pgaccess_version + " (baseline)" * a.baseline)
        for a in state.applied
    ]
    rows += [(m.label, "pending", "") for m in state.pending]
    rows += [
        (
            a.label,
            _when(a.applied_at),
            f"{a.pgaccess_version} (unknown to this pgaccess)",
        )
        for a in state.unknown
    ]
    terminal.table(
        out,
        f"schema of {where}: version {state.version}",
        terminal.columns_of("migration", "applied at", "by pgaccess"),
        sorted(rows),
    )


def _cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    with _database(args, 2) as db:
        queue = VideoJobs(db).stats()
        stages = Metrics(db).summary()
        queries = db.stats()["queries"]
    if args.json:
        report = {"queue": queue, "stages": stages, "queries": queries}
        print(json.dumps(report, indent=2, default=str), file=out)
        return 0
    rate = queue["success_rate"]
    rows: List[List[Any]] = [
        [status, queue[status]]
        for status in (
            "queued",
            "processing",
            "waiting",
            "completed",
            "failed",
            "cancelled",
        )
    ]
    rows += [
        ["oldest queued", _fmt_seconds(queue["oldest_queued_s"])],
        ["finished/min", f"{queue['finished_per_minute']:.1f} (last 5 min)"],
        ["success rate", "-" if rate is None else f"{rate:.1%}"],
        [
            "processing time",
            f"mean {_fmt_seconds(queue['mean_processing_s'])}, "
            f"p95 {_fmt_seconds(queue['p95_processing_s'])}",
        ],
    ]
    terminal.table(out, "queue", terminal.columns_of("", ">"), rows)
    print_stages(stages, out, full=True)
    terminal.table(
        out,
        "top statements of this command (pgaccess counts per process)",
        terminal.columns_of(">calls", ">total ms", "statement"),
        [
            [q["calls"], f"{q['total_ms']:.1f}", " ".join(q["statement"].split())]
            for q in queries[: args.top]
        ],
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
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
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


def _cmd_dashboard(args: argparse.Namespace, out: TextIO) -> int:
    from .dashboard import DashboardServer

    token = args.token or os.environ.get("PGACCESS_DASHBOARD_TOKEN") or None
    if args.token_generate:
        token = secrets.token_urlsafe(24)
    with _database(args, 2) as db:
        try:
            server = DashboardServer(
                db, args.host, args.port, token=token, refresh=args.refresh
            )
        except (OSError, ValueError) as exc:
            print(f"pgaccess dashboard: {exc}", file=sys.stderr)
            return 1
        print(f"pgaccess dashboard: {server.url} (Ctrl-C stops it)", file=out)
        if args.token_generate:
            print(
                f"pgaccess dashboard: log in with {server.url}?token={token}", file=out
            )
        elif token is None:
            print("pgaccess dashboard: read-only (no --token)", file=out)
        out.flush()
        stop = threading.Event()
        with _stop_on_signals(stop, "stopping the dashboard"):
            server.run(stop)
    return 0


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
                segments=args.segments,
            )
    except RuntimeError as exc:
        print(f"pgaccess demo: {exc}", file=sys.stderr)
        return 1
    print_summary(summary, out)
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

    p = sub.add_parser("init-db", help="create the pipeline's schema (= migrate)")
    p.set_defaults(run=_cmd_init_db)

    p = sub.add_parser("migrate", help="apply the schema migrations not applied yet")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--status", action="store_true", help="list applied and pending migrations"
    )
    how.add_argument(
        "--dry-run", action="store_true", help="print the SQL, apply nothing"
    )
    p.set_defaults(run=_cmd_migrate)

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
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at /metrics on this port (needs the "
        "pgaccess[metrics] extra)",
    )
    p.add_argument(
        "--metrics-addr",
        default="0.0.0.0",
        metavar="ADDR",
        help="the address /metrics listens on (0.0.0.0: every interface)",
    )
    p.set_defaults(run=_cmd_worker)

    p = sub.add_parser("dashboard", help="the queue in a browser")
    p.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1: this machine only)",
    )
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        help="enable the retry and cancel buttons for who shows this token "
        "(default: PGACCESS_DASHBOARD_TOKEN; none: read-only)",
    )
    tokens.add_argument(
        "--token-generate",
        action="store_true",
        help="make a token and print the URL that logs in with it",
    )
    p.add_argument("--refresh", type=_duration, default=5.0, help="page refresh (5s)")
    p.set_defaults(run=_cmd_dashboard)

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
        "--segments",
        type=int,
        default=0,
        help="split each video into N child jobs, merged when they are done (0)",
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
