#!/usr/bin/env python
"""Scale-out figures, one run: reads on a standby, read-your-writes, the statement
timeout as SET LOCAL, and the time a failover costs a writer.

    python benchmarks/scaleout_bench.py [--pairs 300] [--calls 5000]

Starts an embedded primary and an asynchronous streaming standby (the embedded
server's ``replica()``; durability as PostgreSQL's defaults: fsync on,
synchronous_commit on), prints a table, destroys both. Measured:

1. Stale reads: a thread inserts a row on the primary and at once looks it up on the
   standby, ``--pairs`` times: through ``Database(read_dsn=...,
   read_your_writes=False)`` (what plain replica reads give) and with
   read-your-writes on (the default); how many lookups missed their own row, and the
   median time of one insert + lookup against the same pair on the primary alone.
2. The statement timeout: ``find_one`` by primary key, ``--calls`` times on one
   thread, with ``statement_timeout`` (sent as ``SET LOCAL`` with each statement,
   so that it works behind PgBouncer) against without; and psycopg2's own way,
   the startup option ``-c statement_timeout``, which PgBouncer refuses.
3. Failover: four threads insert through ``host=a,b target_session_attrs=read-write``;
   the primary is stopped (immediate) and the standby promoted; the time from the
   promotion to the first acknowledged insert, and acknowledged inserts lost (the
   standby is asynchronous here: a loss is the server's choice; the tests use a
   synchronous one and assert none).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
import uuid
from typing import Callable, Dict, List

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from pgaccess import Database, DatabaseError, schema
from pgaccess.embedded import EmbeddedServer, scratch_dir


def _median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def stale_reads(primary_dsn: str, standby_dsn: str, pairs: int) -> List[str]:
    rows = []
    for label, kwargs in (
        ("primary only", {}),
        ("standby, read_your_writes=False", {"read_dsn": standby_dsn,
                                             "read_your_writes": False}),
        ("standby, read-your-writes (default)", {"read_dsn": standby_dsn}),
    ):  # fmt: skip
        with Database(dsn=primary_dsn, maxconn=2, **kwargs) as db:  # type: ignore[arg-type]
            missed = 0
            times = []
            for i in range(pairs):
                key = f"{label[:3]}-{i}-{uuid.uuid4().hex[:8]}"
                t0 = time.perf_counter()
                db.insert("video_job", {"src_hash": key})
                found = db.find_one("video_job", {"src_hash": key})
                times.append(time.perf_counter() - t0)
                missed += found is None
            lagging = db.router.lagging if db.router is not None else 0
        rows.append(
            f"| {label} | {missed} of {pairs} | "
            f"{statistics.median(times) * 1000:.2f} ms | {lagging} |"
        )
    return rows


def statement_timeout(primary_dsn: str, calls: int) -> List[str]:
    rows = []
    with Database(dsn=primary_dsn, maxconn=1) as db:
        job_id = db.insert("video_job", {"src_hash": uuid.uuid4().hex}, returning="id")
    results: Dict[str, float] = {}
    for label, kwargs in (
        ("pgaccess find_one, no statement timeout", {}),
        (
            "pgaccess find_one, statement_timeout (SET LOCAL)",
            {"statement_timeout": 5000},
        ),
    ):
        with Database(dsn=primary_dsn, maxconn=1, **kwargs) as db:  # type: ignore[arg-type]
            for _ in range(200):
                db.find_one("video_job", {"id": job_id})
            results[label] = _median_ms(
                lambda db=db: db.find_one("video_job", {"id": job_id}), calls
            )
    conn = psycopg2.connect(primary_dsn, options="-c statement_timeout=5000")
    conn.autocommit = True
    cur = conn.cursor()

    def raw() -> None:
        cur.execute("SELECT * FROM video_job WHERE id = %s LIMIT 1", (job_id,))
        cur.fetchone()

    for _ in range(200):
        raw()
    results["psycopg2, startup option (refused by PgBouncer)"] = _median_ms(raw, calls)
    conn.close()
    base = results["pgaccess find_one, no statement timeout"]
    for label, ms in results.items():
        rows.append(f"| {label} | {ms * 1000:.0f} µs | {ms / base:.2f} x |")
    return rows


def failover(primary: EmbeddedServer, standby: EmbeddedServer, dbname: str) -> str:
    first = parse_dsn(primary.tcp_dsn(dbname))
    dsn = make_dsn(
        primary.tcp_dsn(dbname),
        host="127.0.0.1,127.0.0.1",
        port=f"{first['port']},{standby.port}",
        target_session_attrs="read-write",
    )
    acked: List[str] = []
    stop, promoted = threading.Event(), threading.Event()
    first_ok: List[float] = []

    def writer(db: Database, n: int = 0) -> None:
        while not stop.is_set():
            key = f"fo-{threading.get_ident()}-{n}"
            n += 1
            try:
                db.insert("video_job", {"src_hash": key})
            except DatabaseError:
                time.sleep(0.01)
                continue
            acked.append(key)
            if promoted.is_set() and not first_ok:
                first_ok.append(time.monotonic())

    with Database(dsn=dsn, maxconn=4, connect_timeout=2) as db:
        threads = [threading.Thread(target=writer, args=(db,)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        primary.stop("immediate")
        stopped = time.monotonic()
        standby.promote()
        promoted_at = time.monotonic()
        promoted.set()
        deadline = time.monotonic() + 30
        while not first_ok and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(60)
    present = {
        r[0] for r in standby.query("SELECT src_hash FROM video_job", dbname=dbname)
    }
    lost = sum(1 for key in acked if key not in present)
    back = first_ok[0] - promoted_at if first_ok else float("nan")
    return (
        f"| failover, 4 writer threads | promotion took {promoted_at - stopped:.2f} s "
        f"| first write {back * 1000:.0f} ms after it | {lost} of {len(acked)} "
        "acknowledged inserts lost (asynchronous standby) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    root = scratch_dir("pgaccess-scaleout-bench-")
    primary = EmbeddedServer(root / "node1", tcp=True, replication=True)
    nodes = [primary]
    try:
        primary.start()
        dbname = "bench_scaleout"
        primary.create_database(dbname)
        schema.apply(primary.tcp_dsn(dbname))
        standby = primary.replica(root / "node2")
        nodes.append(standby)
        standby.wait_for_replay(primary)
        p_dsn, s_dsn = primary.tcp_dsn(dbname), standby.tcp_dsn(dbname)
        print("## Reads right after the thread's own insert\n")
        print("| reads | lookups that missed their own row | insert + lookup, "
              "median | reads the primary served (standby lagging) |")  # fmt: skip
        print("| --- | ---: | ---: | ---: |")
        for row in stale_reads(p_dsn, s_dsn, args.pairs):
            print(row)
        print("\n## The statement timeout, one thread, find_one by key\n")
        print("| | median per call | against no timeout |")
        print("| --- | ---: | ---: |")
        for row in statement_timeout(p_dsn, args.calls):
            print(row)
        print("\n## Failover\n")
        print(failover(primary, standby, dbname))
    finally:
        for node in nodes:
            node.destroy()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
