#!/usr/bin/env python
"""Throughput of pgaccess against its peers, same workloads, one run, one server.

    python benchmarks/compare.py [--quick] [--threads 1,4,16] [--out benchmarks/results]
        [--clients pgaccess,psycopg2-pool,...] [--workloads find_one,txn5,...]
        [--dsn DSN | env PGACCESS_DSN] [--tcp] [--duration S] [--rounds R]

Clients: pgaccess, psycopg2-pool (ThreadedConnectionPool), psycopg3-pool (psycopg_pool),
sqlalchemy (Core on psycopg2, QueuePool) and bare-autocommit (one psycopg2 connection
per thread, autocommit, no pool: the limit). The pools hold ``--pool-size`` (4)
connections. Each cell (workload x threads x client) runs for a fixed duration, its
threads released together by a barrier, in R rounds; the median ops/s is reported.

Without ``--dsn`` the script starts an embedded server in a temporary directory and
destroys it at the end. With ``--dsn`` (or ``PGACCESS_DSN``) it works inside its own
schemas (``pgaccess_bench``, ``pgaccess_bench_jobs``), dropped at the end, so the
database's own tables are never touched.

Writes ``latest.json``, ``latest.md`` and ``throughput.png`` into ``--out``.

To adjust a workload, edit its small function below: every client x workload pair is
one function ``(handle, stack) -> op`` in the ``CLIENTS`` registry, called once per
thread (``stack`` is an ExitStack closed when the thread ends); ``op()`` does one
operation. ``run_cell(setup, threads, duration)`` is the one timing harness.

Each client is used the ordinary way: the peers run every statement in a transaction
(psycopg2's implicit BEGIN, commit on return); psycopg2's ThreadedConnectionPool
raises PoolError when all its connections are out, counted as an error and retried
after 1 ms. txn5's update sets ``priority = 1`` for every client (pgaccess's update
takes values). Other workloads: ``insert_many_100k`` (single thread, rows/s) and
``claim_complete`` (pgaccess.jobs only, jobs/s at 1, 4 and 8 threads) and
``contention`` (find_one at 1, 4 and 16 threads over the pool, each cell on a fresh
pool so that pgaccess's ``max_wait`` is that cell's; the 16/4 ratio; uncontended
checkout); pgbench -S (C, select-only) gives the server's own limit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import psycopg2
import psycopg2.extras
import psycopg2.pool
from psycopg2.extensions import make_dsn, parse_dsn

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "sql" / "schema.sql"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

PRELOAD_JOBS = 10_000  # video_job rows 1..PRELOAD_JOBS, for find_one / insert / txn5
POOL_SIZE = 4  # 2 x cores on the machine the brief was written for
GRID_WORKLOADS = ("find_one", "insert", "count", "txn5", "checkout")
CHART_WORKLOADS = ("find_one", "insert", "count", "txn5")
BULK = "insert_many_100k"
CLAIM = "claim_complete"
CONTENTION = "contention"
ALL_WORKLOADS = (*GRID_WORKLOADS, BULK, CLAIM, CONTENTION)
# The contention section: find_one over a pool of --pool-size at these thread counts
# (the last over the second is the ratio reported), and checkout at 1 thread.
CONTENTION_THREADS = (1, 4, 16)
PGACCESS = "pgaccess"
NOSTATS = "pgaccess-nostats"  # the same, with per-statement statistics off: their cost
PEERS = ("psycopg2-pool", "psycopg3-pool", "sqlalchemy")  # the pooled peers
LIMIT = "bare-autocommit"
ALL_CLIENTS = (PGACCESS, NOSTATS, *PEERS, LIMIT)
CLAIM_THREADS = (1, 4, 8)

ERROR_BACKOFF_S = 0.001  # after a failed op a thread sleeps this long, then retries
# Errors that mean "the benchmark code does not match the API", not "the database was
# busy": the cell stops at once and reports the message instead of retrying.
FATAL_ERRORS = (
    TypeError,
    AttributeError,
    NameError,
    ImportError,
    KeyError,
    NotImplementedError,
)

Op = Callable[[], object]  # one operation; returning DONE ends the thread's loop
Factory = Callable[[Any, ExitStack], Op]  # (client handle, per-thread stack) -> op
Run = Callable[[str, Tuple[Any, ...]], Any]  # execute one statement, fetch its row
DONE = object()
T = TypeVar("T")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rand_job_id() -> int:
    return random.randint(1, PRELOAD_JOBS)


def close_quietly(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        with suppress(Exception):
            close()


# --------------------------------------------------------------------------- SQL
# The peers run the statements pgaccess is expected to send for the same call.
SQL_FIND_ONE = "SELECT * FROM video_job WHERE id = %s LIMIT 1"
SQL_INSERT_METRIC = (
    "INSERT INTO processing_metrics (job_id, stage, duration_ms) "
    "VALUES (%s, %s, %s) RETURNING id"
)
SQL_COUNT = "SELECT count(*) FROM video_job WHERE status = %s"
# pgaccess's update takes values, so the peers set priority to a value as well.
SQL_UPDATE_PRIORITY = "UPDATE video_job SET priority = %s WHERE id = %s"
SQL_BULK_INSERT = "INSERT INTO bench_rows (a, b, c) VALUES (%s, %s, %s)"


def txn5_statements(run: Run) -> None:
    """The 5 statements of txn5: 2 selects by pk, 2 inserts, 1 update."""
    a, b = rand_job_id(), rand_job_id()
    run(SQL_FIND_ONE, (a,))
    run(SQL_FIND_ONE, (b,))
    run(SQL_INSERT_METRIC, (a, "bench", 1.0))
    run(SQL_INSERT_METRIC, (b, "bench", 1.0))
    run(SQL_UPDATE_PRIORITY, (1, a))


def cursor_runner(cur: Any) -> Run:
    """A Run over a psycopg2 cursor (or anything whose execute returns a cursor)."""

    def run(query: str, params: Tuple[Any, ...]) -> Any:
        res = cur.execute(query, params)
        res = cur if res is None else res  # psycopg2 returns None, psycopg 3 a cursor
        return res.fetchone() if res.description is not None else None

    return run


# ---------------------------------------------------------------------- pgaccess
@dataclass
class PgaccessHandle:
    pool: Any
    db: Any


def open_pgaccess(dsn: str, pool_size: int) -> PgaccessHandle:
    from pgaccess import ConnectionPool, Database

    pool = ConnectionPool(dsn, maxconn=pool_size)
    return PgaccessHandle(pool=pool, db=Database(pool=pool))


def open_pgaccess_nostats(dsn: str, pool_size: int) -> PgaccessHandle:
    from pgaccess import ConnectionPool, Database

    pool = ConnectionPool(dsn, maxconn=pool_size)
    return PgaccessHandle(pool=pool, db=Database(pool=pool, query_stats=False))


def close_pgaccess(h: PgaccessHandle) -> None:
    close_quietly(h.db)
    close_quietly(h.pool)


def pga_find_one(h: PgaccessHandle, _: ExitStack) -> Op:
    db = h.db
    return lambda: db.find_one("video_job", {"id": rand_job_id()})


def metric(job_id: int) -> Dict[str, Any]:
    return {"job_id": job_id, "stage": "bench", "duration_ms": 1.0}


def pga_insert(h: PgaccessHandle, _: ExitStack) -> Op:
    db = h.db
    return lambda: db.insert("processing_metrics", metric(rand_job_id()))


def pga_count(h: PgaccessHandle, _: ExitStack) -> Op:
    db = h.db
    return lambda: db.count("video_job", {"status": "queued"})


def pga_txn5(h: PgaccessHandle, _: ExitStack) -> Op:
    db = h.db

    def op() -> None:
        a, b = rand_job_id(), rand_job_id()
        with db.transaction() as tx:
            tx.find_one("video_job", {"id": a})
            tx.find_one("video_job", {"id": b})
            tx.insert("processing_metrics", metric(a))
            tx.insert("processing_metrics", metric(b))
            tx.update("video_job", {"priority": 1}, {"id": a})

    return op


def pga_checkout(h: PgaccessHandle, _: ExitStack) -> Op:
    pool = h.pool

    def op() -> None:
        with pool.connection():
            pass

    return op


# ----------------------------------------------------------------- psycopg2 pool
def open_p2pool(dsn: str, pool_size: int) -> Any:
    return psycopg2.pool.ThreadedConnectionPool(1, pool_size, dsn)


@contextmanager
def p2_conn(pool: Any) -> Iterator[Any]:
    """The ordinary psycopg2 pattern: getconn, work, commit (or roll back), putconn.

    getconn raises PoolError("connection pool exhausted") when all are out: the
    harness counts it as an error and retries after a short sleep.
    """
    conn = pool.getconn()
    try:
        with conn:  # commit on success, roll back on error; does not close
            yield conn
    finally:
        pool.putconn(conn)


def p2_find_one(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with p2_conn(pool) as conn, conn.cursor() as cur:
            cur.execute(SQL_FIND_ONE, (rand_job_id(),))
            cur.fetchone()

    return op


def p2_insert(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with p2_conn(pool) as conn, conn.cursor() as cur:
            cur.execute(SQL_INSERT_METRIC, (rand_job_id(), "bench", 1.0))
            cur.fetchone()

    return op


def p2_count(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with p2_conn(pool) as conn, conn.cursor() as cur:
            cur.execute(SQL_COUNT, ("queued",))
            cur.fetchone()

    return op


def p2_txn5(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with p2_conn(pool) as conn, conn.cursor() as cur:
            txn5_statements(cursor_runner(cur))

    return op


def p2_checkout(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        pool.putconn(pool.getconn())

    return op


# ----------------------------------------------------------------- psycopg3 pool
def open_p3pool(dsn: str, pool_size: int) -> Any:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(dsn, min_size=pool_size, max_size=pool_size, open=True)
    pool.wait()
    return pool


def p3_find_one(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with pool.connection() as conn:
            conn.execute(SQL_FIND_ONE, (rand_job_id(),)).fetchone()

    return op


def p3_insert(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with pool.connection() as conn:
            conn.execute(SQL_INSERT_METRIC, (rand_job_id(), "bench", 1.0)).fetchone()

    return op


def p3_count(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with pool.connection() as conn:
            conn.execute(SQL_COUNT, ("queued",)).fetchone()

    return op


def p3_txn5(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with pool.connection() as conn:  # one transaction, committed on exit
            txn5_statements(cursor_runner(conn))

    return op


def p3_checkout(pool: Any, _: ExitStack) -> Op:
    def op() -> None:
        with pool.connection():
            pass

    return op


# -------------------------------------------------------------------- SQLAlchemy
@dataclass
class SaHandle:
    engine: Any
    find_one: Any
    insert: Any
    count: Any
    update: Any


def open_sqlalchemy(dsn: str, pool_size: int) -> SaHandle:
    from sqlalchemy import create_engine, text

    engine = create_engine(
        "postgresql+psycopg2://",
        creator=partial(psycopg2.connect, dsn),
        pool_size=pool_size,
        max_overflow=0,
    )
    return SaHandle(
        engine=engine,
        find_one=text("SELECT * FROM video_job WHERE id = :id LIMIT 1"),
        insert=text(
            "INSERT INTO processing_metrics (job_id, stage, duration_ms) "
            "VALUES (:job_id, :stage, :duration_ms) RETURNING id"
        ),
        count=text("SELECT count(*) FROM video_job WHERE status = :status"),
        update=text("UPDATE video_job SET priority = :priority WHERE id = :id"),
    )


def close_sqlalchemy(h: SaHandle) -> None:
    h.engine.dispose()


def sa_find_one(h: SaHandle, _: ExitStack) -> Op:
    def op() -> None:
        with h.engine.begin() as conn:
            conn.execute(h.find_one, {"id": rand_job_id()}).fetchone()

    return op


def sa_insert(h: SaHandle, _: ExitStack) -> Op:
    def op() -> None:
        with h.engine.begin() as conn:
            conn.execute(h.insert, metric(rand_job_id())).scalar_one()

    return op


def sa_count(h: SaHandle, _: ExitStack) -> Op:
    def op() -> None:
        with h.engine.begin() as conn:
            conn.execute(h.count, {"status": "queued"}).scalar_one()

    return op


def sa_txn5(h: SaHandle, _: ExitStack) -> Op:
    def op() -> None:
        a, b = rand_job_id(), rand_job_id()
        with h.engine.begin() as conn:
            conn.execute(h.find_one, {"id": a}).fetchone()
            conn.execute(h.find_one, {"id": b}).fetchone()
            conn.execute(h.insert, metric(a)).scalar_one()
            conn.execute(h.insert, metric(b)).scalar_one()
            conn.execute(h.update, {"priority": 1, "id": a})

    return op


def sa_checkout(h: SaHandle, _: ExitStack) -> Op:
    def op() -> None:
        h.engine.raw_connection().close()

    return op


# --------------------------------------------------- bare autocommit (the limit)
def bare_cursor(dsn: str, stack: ExitStack) -> Any:
    """This thread's own connection, autocommit, closed when the thread ends."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    stack.callback(conn.close)
    return conn.cursor()


def bare_statement(query: str, params: Callable[[], Tuple[Any, ...]]) -> Factory:
    def factory(dsn: str, stack: ExitStack) -> Op:
        cur = bare_cursor(dsn, stack)

        def op() -> None:
            cur.execute(query, params())
            cur.fetchone()

        return op

    return factory


def bare_txn5(dsn: str, stack: ExitStack) -> Op:
    cur = bare_cursor(dsn, stack)
    run = cursor_runner(cur)

    def op() -> None:
        cur.execute("BEGIN")
        try:
            txn5_statements(run)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    return op


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ClientSpec:
    open: Callable[[str, int], Any]  # (dsn, pool size) -> handle
    close: Callable[[Any], None]
    workloads: Dict[str, Factory]  # workload -> per-thread factory


CLIENTS: Dict[str, ClientSpec] = {
    PGACCESS: ClientSpec(
        open_pgaccess,
        close_pgaccess,
        {
            "find_one": pga_find_one,
            "insert": pga_insert,
            "count": pga_count,
            "txn5": pga_txn5,
            "checkout": pga_checkout,
        },
    ),
    NOSTATS: ClientSpec(
        open_pgaccess_nostats,
        close_pgaccess,
        {"find_one": pga_find_one, "insert": pga_insert, "txn5": pga_txn5},
    ),
    "psycopg2-pool": ClientSpec(
        open_p2pool,
        lambda pool: pool.closeall(),
        {
            "find_one": p2_find_one,
            "insert": p2_insert,
            "count": p2_count,
            "txn5": p2_txn5,
            "checkout": p2_checkout,
        },
    ),
    "psycopg3-pool": ClientSpec(
        open_p3pool,
        close_quietly,
        {
            "find_one": p3_find_one,
            "insert": p3_insert,
            "count": p3_count,
            "txn5": p3_txn5,
            "checkout": p3_checkout,
        },
    ),
    "sqlalchemy": ClientSpec(
        open_sqlalchemy,
        close_sqlalchemy,
        {
            "find_one": sa_find_one,
            "insert": sa_insert,
            "count": sa_count,
            "txn5": sa_txn5,
            "checkout": sa_checkout,
        },
    ),
    LIMIT: ClientSpec(
        lambda dsn, _size: dsn,  # no pool: each thread connects in its setup
        lambda _dsn: None,
        {
            "find_one": bare_statement(SQL_FIND_ONE, lambda: (rand_job_id(),)),
            "insert": bare_statement(
                SQL_INSERT_METRIC, lambda: (rand_job_id(), "bench", 1.0)
            ),
            "count": bare_statement(SQL_COUNT, lambda: ("queued",)),
            "txn5": bare_txn5,
            # no "checkout": there is no pool
        },
    ),
}


# ----------------------------------------------------------------------- harness
@dataclass
class CellResult:
    ops: int = 0
    seconds: float = 0.0
    errors: int = 0
    first_error: Optional[str] = None
    fatal: Optional[str] = None  # the cell could not run (setup failed, API mismatch)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def run_cell(
    setup: Callable[[ExitStack], Op],
    threads: int,
    duration: float,
    *,
    warmup: bool = True,
) -> CellResult:
    """Run ``threads`` threads, each calling ``setup(stack)()`` in a loop, for duration.

    Each thread calls ``setup`` (not timed) and one warm-up op (unless ``warmup`` is
    false: for ops that consume work), then all are released
    together by a barrier and loop until the deadline, or until the op returns DONE.
    A failing op is counted as an error and retried after ERROR_BACKOFF_S; an error in
    FATAL_ERRORS ends the cell. Throughput is ops / (last thread end - release).
    """
    start = [0.0]
    barrier = threading.Barrier(
        threads, action=lambda: start.__setitem__(0, time.perf_counter())
    )
    results = [CellResult() for _ in range(threads)]
    ends = [0.0] * threads

    def worker(idx: int) -> None:
        res = results[idx]
        with ExitStack() as stack:
            try:
                op = setup(stack)
                if warmup:
                    with suppress(Exception):
                        op()  # a busy pool is fine here; a bad API fails the loop
            except BaseException as exc:
                res.fatal = describe(exc)
                barrier.abort()
                return
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            deadline = start[0] + duration
            ops = errors = 0
            while time.perf_counter() < deadline:
                try:
                    if op() is DONE:
                        break
                except FATAL_ERRORS as exc:
                    res.fatal = describe(exc)
                    break
                except Exception as exc:
                    errors += 1
                    if res.first_error is None:
                        res.first_error = describe(exc)
                    time.sleep(ERROR_BACKOFF_S)
                    continue
                ops += 1
            ends[idx] = time.perf_counter()
            res.ops, res.errors = ops, errors

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = CellResult(
        ops=sum(r.ops for r in results),
        seconds=max(ends) - start[0] if start[0] else 0.0,
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), None),
        fatal=next((r.fatal for r in results if r.fatal), None),
    )
    return total


@dataclass
class Cell:
    """One workload x threads x client, over the rounds."""

    workload: str
    threads: int
    client: str
    rounds: List[CellResult] = field(default_factory=list)

    @property
    def fatal(self) -> Optional[str]:
        return next((r.fatal for r in self.rounds if r.fatal), None)

    @property
    def ops_per_s(self) -> Optional[float]:
        ok = [r.ops_per_s for r in self.rounds if not r.fatal]
        return statistics.median(ok) if ok and not self.fatal else None

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)

    @property
    def us_per_op(self) -> Optional[float]:
        """Mean time one thread spends per op (waiting for the pool included)."""
        ops = self.ops_per_s
        return self.threads * 1e6 / ops if ops else None

    def to_json(self) -> Dict[str, Any]:
        return {
            "workload": self.workload,
            "threads": self.threads,
            "client": self.client,
            "ops_per_s": self.ops_per_s,
            "us_per_op": self.us_per_op if self.workload == "checkout" else None,
            "rounds_ops_per_s": [r.ops_per_s for r in self.rounds],
            "errors": self.errors,
            "first_error": next(
                (r.first_error for r in self.rounds if r.first_error), None
            ),
            "fatal": self.fatal,
        }


Grid = Dict[Tuple[str, int, str], Cell]


def cell_line(cell: Cell, res: CellResult) -> str:
    """One progress line: workload, threads, client, ops/s, errors."""
    speed = "FAILED" if res.fatal else fmt_ops(res.ops_per_s)
    line = f"{cell.workload:<9} x{cell.threads:<3} {cell.client:<16} {speed:>9} ops/s"
    line += f"  errors {res.errors}"
    why = res.fatal or res.first_error
    return f"{line}  ({why})" if why else line


def settle(dsn: str) -> None:
    """VACUUM video_job before a cell, so every client meets the same table.

    txn5's updates leave dead rows and clear visibility-map bits, and autovacuum
    runs when it likes; count's index-only scan on the partial index depends on
    those bits, so without this the client measured after an autovacuum wins.
    """
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("VACUUM video_job")
    finally:
        conn.close()


def run_grid(plan: Plan, dsn: str) -> Grid:
    """All grid cells, rounds outermost (so drift spreads over every client)."""
    grid: Grid = {}
    for rnd in range(plan.rounds):
        shift = rnd % len(plan.clients)  # rotate the client order between rounds
        for client in plan.clients[shift:] + plan.clients[:shift]:
            spec = CLIENTS[client]
            work = [
                w for w in GRID_WORKLOADS if w in plan.workloads and w in spec.workloads
            ]
            if not work:
                continue
            try:
                handle = spec.open(dsn, plan.pool_size)
            except Exception as exc:
                log(f"  {client}: cannot open: {describe(exc)}")
                for w in work:
                    for n in plan.threads:
                        cell = grid.setdefault((w, n, client), Cell(w, n, client))
                        cell.rounds.append(CellResult(fatal=describe(exc)))
                continue
            try:
                for w in work:
                    for n in plan.threads:
                        cell = grid.setdefault((w, n, client), Cell(w, n, client))
                        if cell.fatal:
                            continue
                        settle(dsn)
                        res = run_cell(
                            partial(spec.workloads[w], handle), n, plan.duration
                        )
                        cell.rounds.append(res)
                        log(f"  [{rnd + 1}/{plan.rounds}] {cell_line(cell, res)}")
            finally:
                spec.close(handle)
    return grid


# ----------------------------------------------------------- insert_many (bulk)
@dataclass(frozen=True)
class BulkRows:
    tuples: List[Tuple[int, str, float]]
    dicts: List[Dict[str, Any]]

    @classmethod
    def make(cls, n: int) -> BulkRows:
        tuples = [(i, f"row-{i}", i * 0.5) for i in range(n)]
        return cls(tuples, [{"a": a, "b": b, "c": c} for a, b, c in tuples])

    def head(self, n: int) -> BulkRows:
        return BulkRows(self.tuples[:n], self.dicts[:n])


def p2_connect(dsn: str) -> Any:
    return psycopg2.connect(dsn)


def bulk_executemany(conn: Any, rows: BulkRows) -> None:
    with conn, conn.cursor() as cur:
        cur.executemany(SQL_BULK_INSERT, rows.tuples)


def bulk_execute_values(conn: Any, rows: BulkRows) -> None:
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            "INSERT INTO bench_rows (a, b, c) VALUES %s",
            rows.tuples,
            page_size=1000,
        )


def bulk_copy_expert(conn: Any, rows: BulkRows) -> None:
    buf = io.StringIO()
    buf.writelines(f"{a}\t{b}\t{c!r}\n" for a, b, c in rows.tuples)
    buf.seek(0)
    with conn, conn.cursor() as cur:
        cur.copy_expert("COPY bench_rows (a, b, c) FROM STDIN", buf)


def p3_connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn)


def bulk_p3_copy(conn: Any, rows: BulkRows) -> None:
    with conn.cursor() as cur, cur.copy("COPY bench_rows (a, b, c) FROM STDIN") as cp:
        for row in rows.tuples:
            cp.write_row(row)
    conn.commit()


def bulk_pgaccess(h: PgaccessHandle, rows: BulkRows) -> None:
    h.db.insert_many("bench_rows", rows.dicts)


@dataclass(frozen=True)
class BulkMethod:
    client: str  # run when this client is selected
    connect: Callable[[str], Any]  # dsn -> handle (not timed)
    load: Callable[[Any, BulkRows], None]
    close: Callable[[Any], None] = close_quietly
    sample: bool = False  # too slow for all rows: timed on plan.bulk_sample rows


BULK_METHODS: Dict[str, BulkMethod] = {
    "pgaccess insert_many": BulkMethod(
        PGACCESS,
        partial(open_pgaccess, pool_size=POOL_SIZE),
        bulk_pgaccess,
        close_pgaccess,
    ),
    "psycopg2 executemany": BulkMethod(
        "psycopg2-pool", p2_connect, bulk_executemany, sample=True
    ),
    "psycopg2 execute_values": BulkMethod(
        "psycopg2-pool", p2_connect, bulk_execute_values
    ),
    "psycopg2 copy_expert": BulkMethod("psycopg2-pool", p2_connect, bulk_copy_expert),
    "psycopg3 copy": BulkMethod("psycopg3-pool", p3_connect, bulk_p3_copy),
}


def run_bulk(plan: Plan, dsn: str) -> List[Dict[str, Any]]:
    full = BulkRows.make(plan.bulk_rows)
    out: List[Dict[str, Any]] = []
    admin = admin_connect(dsn)
    try:
        for name, method in BULK_METHODS.items():
            if method.client not in plan.clients:
                continue
            rows = full.head(plan.bulk_sample) if method.sample else full
            n = len(rows.tuples)
            speeds: List[float] = []
            error = None
            try:
                handle = method.connect(dsn)
            except Exception as exc:
                error = describe(exc)
                out.append({"method": name, "client": method.client, "error": error})
                log(f"  {name:<24} cannot connect: {error}")
                continue
            try:
                for _ in range(plan.rounds):
                    admin.cursor().execute("TRUNCATE bench_rows")
                    t0 = time.perf_counter()
                    method.load(handle, rows)
                    elapsed = time.perf_counter() - t0
                    cur = admin.cursor()
                    cur.execute("SELECT count(*) FROM bench_rows")
                    stored = cur.fetchone()[0]
                    if stored != n:
                        error = f"{stored} rows stored, {n} expected"
                        break
                    speeds.append(n / elapsed)
            except Exception as exc:
                error = describe(exc)
            finally:
                method.close(handle)
            rate = statistics.median(speeds) if speeds and not error else None
            entry: Dict[str, Any] = {
                "method": name,
                "client": method.client,
                "rows": plan.bulk_rows,
                "timed_rows": n,
                "rows_per_s": rate,
                "rounds_rows_per_s": speeds,
                "error": error,
            }
            out.append(entry)
            log(
                f"  {name:<24} {fmt_ops(rate)} rows/s (on {n:,} rows)"
                + (f"  {error}" if error else "")
            )
    finally:
        admin.cursor().execute("TRUNCATE bench_rows")
        admin.close()
    return out


# ------------------------------------------------------- claim_complete (jobs)
def claim_complete_op(jobs: Any, stack: ExitStack) -> Op:
    """Claim one job, complete it; DONE when the queue is empty."""
    worker_id = f"bench-{uuid.uuid4().hex[:8]}"

    def op() -> object:
        batch = jobs.claim(worker_id, limit=1)
        if not batch:
            return DONE
        for job in batch:
            jobs.complete(job["id"], worker_id)
        return None

    return op


def enqueue_jobs(jobs: Any, tag: str, n: int) -> None:
    jobs.enqueue_many(
        [
            {"src_hash": f"{tag}-{i}", "input_path": f"/videos/{tag}/{i}.mp4"}
            for i in range(n)
        ]
    )


def run_claim(plan: Plan, dsn: str) -> Dict[str, Any]:
    try:
        from pgaccess.jobs import VideoJobs
    except ImportError as exc:
        msg = f"skipped: pgaccess.jobs does not import ({describe(exc)})"
        log(f"  claim_complete {msg}")
        return {"skipped": msg}
    handle = open_pgaccess(dsn, plan.pool_size)
    admin = admin_connect(dsn)
    cells: List[Dict[str, Any]] = []
    try:
        jobs = VideoJobs(handle.db)
        warm = partial(pga_count, handle)  # open every pool connection, untimed
        run_cell(warm, plan.pool_size, 0.1)
        for n in CLAIM_THREADS:
            speeds: List[float] = []
            problem = None
            for rnd in range(plan.rounds):
                enqueue_jobs(jobs, f"cc-{n}-{rnd}", plan.claim_jobs)
                # a safety cap: the cell ends when the queue is empty
                res = run_cell(partial(claim_complete_op, jobs), n, 600.0, warmup=False)
                cur = admin.cursor()
                cur.execute("SELECT status, count(*) FROM video_job GROUP BY status")
                by_status = dict(cur.fetchall())
                left = {s: c for s, c in by_status.items() if s != "completed"}
                if res.fatal:
                    problem = res.fatal
                elif res.ops != plan.claim_jobs or left:
                    problem = f"{res.ops} jobs done of {plan.claim_jobs}; left: {left}"
                if problem:
                    break
                speeds.append(res.ops_per_s)
                log(
                    f"  claim_complete x{n}: {fmt_ops(res.ops_per_s)} jobs/s "
                    f"errors {res.errors}"
                )
            cells.append(
                {
                    "threads": n,
                    "jobs": plan.claim_jobs,
                    "jobs_per_s": statistics.median(speeds)
                    if speeds and not problem
                    else None,
                    "rounds_jobs_per_s": speeds,
                    "error": problem,
                }
            )
            if problem:
                log(f"  claim_complete x{n}: {problem}")
    finally:
        close_pgaccess(handle)
        admin.close()
    return {"cells": cells}


# ----------------------------------------------------------------------- pgbench
# ------------------------------------------------------------------ contention
def run_contention(plan: Plan, dsn: str) -> Dict[str, Any]:
    """find_one by id at CONTENTION_THREADS over a pool of ``plan.pool_size``, and
    checkout + return at 1 thread, for each pooled client selected.

    Each cell opens its own client, so pgaccess's ``stats()["max_wait"]`` (the longest
    a caller waited in line) is that cell's alone; ``None`` where the pool does not
    report it. Rounds outermost, the client order rotated, as in the grid.
    """
    clients = [c for c in plan.clients if "checkout" in CLIENTS[c].workloads]
    cells: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    for rnd in range(plan.rounds):
        shift = rnd % max(len(clients), 1)
        for client in clients[shift:] + clients[:shift]:
            spec = CLIENTS[client]
            plan_cells = [("find_one", n) for n in CONTENTION_THREADS]
            plan_cells.append(("checkout", 1))
            for workload, n in plan_cells:
                settle(dsn)
                handle = spec.open(dsn, plan.pool_size)
                try:
                    res = run_cell(
                        partial(spec.workloads[workload], handle), n, plan.duration
                    )
                    stats = getattr(getattr(handle, "pool", None), "stats", None)
                    max_wait = stats().get("max_wait") if stats else None
                finally:
                    spec.close(handle)
                cells.setdefault((client, workload, n), []).append(
                    {
                        "ops_per_s": None if res.fatal else res.ops_per_s,
                        "errors": res.errors,
                        "max_wait_s": max_wait,
                        "fatal": res.fatal,
                    }
                )
                log(
                    f"  [{rnd + 1}/{plan.rounds}] {client:<16} {workload} x{n:<3} "
                    f"{fmt_ops(res.ops_per_s)} ops/s"
                    + (f", max wait {max_wait * 1e3:.1f} ms" if max_wait else "")
                )
    out = []
    for (client, workload, n), rounds in cells.items():
        speeds = [r["ops_per_s"] for r in rounds if r["ops_per_s"]]
        waits = [r["max_wait_s"] for r in rounds if r["max_wait_s"] is not None]
        out.append(
            {
                "client": client,
                "workload": workload,
                "threads": n,
                "ops_per_s": statistics.median(speeds) if speeds else None,
                "rounds_ops_per_s": [r["ops_per_s"] for r in rounds],
                "max_wait_s": max(waits) if waits else None,
                "errors": sum(r["errors"] for r in rounds),
            }
        )
    return {"pool_size": plan.pool_size, "cells": out}


def contention_table(
    contention: Dict[str, Any],
) -> Tuple[List[str], List[List[str]]]:
    """One row per client: find_one ops/s by threads, the ratio of the last two thread
    counts, the longest wait at the most threads, and checkout at 1 thread."""
    by = {(c["client"], c["workload"], c["threads"]): c for c in contention["cells"]}
    few, many = CONTENTION_THREADS[-2], CONTENTION_THREADS[-1]
    headers = [
        "client",
        *(f"find_one x{n}" for n in CONTENTION_THREADS),
        f"x{many} / x{few}",
        f"max wait x{many} (ms)",
        "checkout x1 (us)",
    ]
    rows = []
    for client in dict.fromkeys(c["client"] for c in contention["cells"]):
        ops = [
            by.get((client, "find_one", n), {}).get("ops_per_s")
            for n in CONTENTION_THREADS
        ]
        wait = by.get((client, "find_one", many), {}).get("max_wait_s")
        checkout = by.get((client, "checkout", 1), {}).get("ops_per_s")
        rows.append(
            [
                client,
                *(fmt_ops(v) for v in ops),
                fmt_ratio(ops[-1], ops[-2]),
                "-" if wait is None else f"{wait * 1e3:.1f}",
                f"{1e6 / checkout:.2f}" if checkout else "-",
            ]
        )
    return headers, rows


def pgbench_exe() -> Optional[str]:
    found = shutil.which("pgbench")
    if found:
        return found
    with suppress(Exception):
        from pgaccess.embedded import _bin_dir

        exe = _bin_dir() / "pgbench"
        if exe.exists():
            return str(exe)
    return None


def run_pgbench(
    dsn: Optional[str], threads: Sequence[int], seconds: int
) -> Dict[str, Any]:
    exe = pgbench_exe()
    if exe is None:
        return {"skipped": "pgbench not found"}
    if dsn is None:
        return {"skipped": "no database for pgbench (CREATE DATABASE not allowed?)"}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    try:
        subprocess.run(
            [exe, "-i", "-s", "1", "-q", dsn],
            check=True,
            capture_output=True,
            text=True,
        )
        tps: Dict[int, float] = {}
        for n in threads:
            proc = subprocess.run(
                [exe, "-S", "-n", "-c", str(n), "-j", str(n), "-T", str(seconds), dsn],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            match = re.search(r"^tps = ([\d.]+)", proc.stdout, re.MULTILINE)
            if match:
                tps[n] = float(match.group(1))
                log(f"  pgbench -S -c {n}: {fmt_ops(tps[n])} tps")
    except subprocess.CalledProcessError as exc:
        return {"skipped": f"pgbench failed: {(exc.stderr or '').strip()[-300:]}"}
    return {
        "version": version.strip(),
        "command": f"pgbench -S -n -c N -j N -T {seconds}",
        "tps": {str(k): v for k, v in tps.items()},
    }


# ------------------------------------------------------------------ the server
@dataclass
class Target:
    dsn: str  # the main database: video_job preloaded, bench_rows
    jobs_dsn: str  # an empty schema for claim_complete
    pgbench_dsn: Optional[str]
    where: str


def admin_connect(dsn: str) -> Any:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


def with_search_path(dsn: str, schema: str) -> str:
    options = parse_dsn(dsn).get("options", "")
    return make_dsn(dsn, options=f"{options} -c search_path={schema}".strip())


@contextmanager
def embedded_target(tcp: bool) -> Iterator[Target]:
    from pgaccess.embedded import EmbeddedServer, scratch_dir

    tmp = scratch_dir("pgaccess-bench-")  # one the server's user can enter
    srv = EmbeddedServer(tmp / "data", durable=False, tcp=tcp)
    try:
        t0 = time.perf_counter()
        srv.start()
        dsns = {}
        for name in ("bench", "bench_jobs", "bench_pgbench"):
            srv.create_database(name, drop_existing=True)
            dsns[name] = srv.tcp_dsn(name) if tcp else srv.dsn(name)
        log(f"embedded server up in {time.perf_counter() - t0:.1f} s ({srv.datadir})")
        yield Target(
            dsn=dsns["bench"],
            jobs_dsn=dsns["bench_jobs"],
            pgbench_dsn=dsns["bench_pgbench"],
            where="embedded server, fsync off, "
            + ("TCP 127.0.0.1" if tcp else "Unix socket"),
        )
    finally:
        srv.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def external_target(dsn: str) -> Iterator[Target]:
    """Work in schemas of our own in the given database; drop them at the end."""
    from pgaccess.config import redact_dsn

    schemas = ("pgaccess_bench", "pgaccess_bench_jobs")
    pgbench_db = "pgaccess_bench_pgbench"
    admin = admin_connect(dsn)
    pgbench_dsn: Optional[str] = None
    try:
        cur = admin.cursor()
        for s in schemas:
            cur.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE; CREATE SCHEMA {s}")
        try:
            cur.execute(f"DROP DATABASE IF EXISTS {pgbench_db}")
            cur.execute(f"CREATE DATABASE {pgbench_db}")
            pgbench_dsn = make_dsn(dsn, dbname=pgbench_db)
        except psycopg2.Error as exc:
            log(f"pgbench will be skipped: {describe(exc)}")
        log(f"using {redact_dsn(dsn)!r}, schemas {', '.join(schemas)}")
        yield Target(
            dsn=with_search_path(dsn, schemas[0]),
            jobs_dsn=with_search_path(dsn, schemas[1]),
            pgbench_dsn=pgbench_dsn,
            where="the given DSN, in schemas of the benchmark's own",
        )
    finally:
        cur = admin.cursor()
        for s in schemas:
            with suppress(psycopg2.Error):
                cur.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        if pgbench_dsn:
            with suppress(psycopg2.Error):
                cur.execute(f"DROP DATABASE IF EXISTS {pgbench_db}")
        admin.close()


def prepare(target: Target) -> str:
    """Apply the schema (both databases), preload video_job; the server's version."""
    schema = SCHEMA_FILE.read_text()
    for dsn in (target.dsn, target.jobs_dsn):
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute(schema)  # the whole file in one statement
        conn.close()
    conn = admin_connect(target.dsn)
    try:
        cur = conn.cursor()
        cur.execute(
            "DROP TABLE IF EXISTS bench_rows;"
            "CREATE TABLE bench_rows (a int, b text, c double precision)"
        )
        cur.execute("TRUNCATE video_job RESTART IDENTITY CASCADE")
        psycopg2.extras.execute_values(
            cur,
            "INSERT INTO video_job (src_hash, input_path, priority) VALUES %s",
            [(f"bench-{i}", f"/videos/{i}.mp4", 0) for i in range(PRELOAD_JOBS)],
            page_size=1000,
        )
        cur.execute("SELECT min(id), max(id) FROM video_job")
        assert cur.fetchone() == (1, PRELOAD_JOBS), "preloaded ids must be 1..N"
        cur.execute("VACUUM ANALYZE video_job")
        cur.execute("SHOW server_version")
        return str(cur.fetchone()[0])
    finally:
        conn.close()


# ---------------------------------------------------------------------- output
def fmt_ops(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}" if num and den else "-"


def cell_text(cell: Optional[Cell]) -> str:
    if cell is None:
        return "n/a"
    if cell.fatal:
        return "failed"
    return fmt_ops(cell.ops_per_s)


def grid_table(plan: Plan, grid: Grid) -> Tuple[List[str], List[List[str]]]:
    clients = list(plan.clients)
    headers = ["workload", "threads", *clients]
    peers = [c for c in PEERS if c in clients]
    if PGACCESS in clients and peers:
        headers.append("pgaccess/best-peer")
    if PGACCESS in clients and LIMIT in clients:
        headers.append("pgaccess/limit")
    headers.append("errors")
    rows = []
    for w in GRID_WORKLOADS:
        for n in plan.threads:
            cells = {c: grid.get((w, n, c)) for c in clients}
            if all(cell is None for cell in cells.values()):
                continue
            ops = {c: cell.ops_per_s if cell else None for c, cell in cells.items()}
            row = [w, str(n), *(cell_text(cells[c]) for c in clients)]
            if "pgaccess/best-peer" in headers:
                best = max((v for c in peers if (v := ops[c])), default=None)
                row.append(fmt_ratio(ops[PGACCESS], best))
            if "pgaccess/limit" in headers:
                row.append(fmt_ratio(ops[PGACCESS], ops[LIMIT]))
            errs = [
                f"{c} {cell.errors:,}"
                for c, cell in cells.items()
                if cell and cell.errors
            ]
            row.append("; ".join(errs) or "0")
            rows.append(row)
    return headers, rows


def checkout_table(plan: Plan, grid: Grid) -> Tuple[List[str], List[List[str]]]:
    clients = [c for c in plan.clients if "checkout" in CLIENTS[c].workloads]
    rows = []
    for n in plan.threads:
        cells = [grid.get(("checkout", n, c)) for c in clients]
        if any(cells):
            rows.append(
                [
                    str(n),
                    *(
                        f"{cell.us_per_op:.1f}"
                        if cell and cell.us_per_op
                        else cell_text(cell)
                        for cell in cells
                    ),
                ]
            )
    return ["threads", *clients], rows


def bulk_table(bulk: List[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    rows = []
    for b in bulk:
        note = b.get("error") or ""
        if not note and b.get("timed_rows") != b.get("rows"):
            note = f"timed on {b['timed_rows']:,} rows (too slow for {b['rows']:,})"
        rows.append([b["method"], fmt_ops(b.get("rows_per_s")), note])
    return ["method", "rows/s", "note"], rows


def claim_table(claim: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    rows = [
        [str(c["threads"]), str(c["jobs"]), fmt_ops(c["jobs_per_s"]), c["error"] or ""]
        for c in claim.get("cells", [])
    ]
    return ["threads", "jobs", "jobs/s", "note"], rows


TEXT_COLUMNS = (
    "workload",
    "threads",
    "method",
    "note",
    "errors",
    "client",
)  # left-aligned


def render_text(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    left = [h in TEXT_COLUMNS for h in headers]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def render_md(headers: List[str], rows: List[List[str]]) -> str:
    rule = ["---" if h in TEXT_COLUMNS else "---:" for h in headers]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "pgaccess",
        "psycopg2-binary",
        "psycopg",
        "psycopg-pool",
        "SQLAlchemy",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    with suppress(ImportError):
        import psycopg

        out["psycopg"] += f" ({psycopg.pq.__impl__} libpq wrapper)"
    return out


def psycopg3_note() -> Optional[str]:
    """A warning when psycopg 3 runs on its slow pure-Python libpq wrapper."""
    try:
        import psycopg
    except ImportError:
        return None
    if psycopg.pq.__impl__ != "python":
        return None
    return (
        "psycopg 3 runs on its pure-Python libpq wrapper here (neither psycopg[binary] "
        "nor psycopg[c] is installed): its figures are lower than with the C one"
    )


def header_lines(meta: Dict[str, Any]) -> List[str]:
    libs = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return [
        f"date: {meta['date']}",
        f"machine: {meta['cores']} cores available ({meta['platform']}), "
        f"load average {meta['load_average']['start']} before the run",
        f"PostgreSQL {meta['server_version']} ({meta['where']})",
        f"libraries: {libs}",
        f"settings: {meta['duration_s']} s per cell, "
        f"median of {meta['rounds']} round(s), "
        f"pool size {meta['pool_size']}, {PRELOAD_JOBS:,} preloaded jobs",
    ]


def pgbench_line(pgbench: Dict[str, Any]) -> str:
    if "tps" not in pgbench:
        return f"server limit (pgbench): {pgbench.get('skipped', 'not run')}"
    parts = ", ".join(f"{n} thr {fmt_ops(t)}" for n, t in pgbench["tps"].items())
    return f"server limit ({pgbench['command']}, select-only, C client): {parts} tps"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


COLORS = {
    PGACCESS: "#d62728",
    NOSTATS: "#ff9896",
    "psycopg2-pool": "#1f77b4",
    "psycopg3-pool": "#2ca02c",
    "sqlalchemy": "#9467bd",
    LIMIT: "#7f7f7f",
}
MARKERS = {
    PGACCESS: "o",
    NOSTATS: ".",
    "psycopg2-pool": "s",
    "psycopg3-pool": "^",
    "sqlalchemy": "D",
    LIMIT: "x",
}


def write_chart(path: Path, plan: Plan, grid: Grid, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, w in zip(axes.flat, CHART_WORKLOADS):
        ax.set_title(w, fontsize=13)
        plotted = False
        for c in plan.clients:
            pts = [
                (n, grid[(w, n, c)].ops_per_s)
                for n in plan.threads
                if (w, n, c) in grid and grid[(w, n, c)].ops_per_s
            ]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(
                xs,
                ys,
                marker=MARKERS[c],
                color=COLORS[c],
                label=c,
                linewidth=2.5 if c == PGACCESS else 1.5,
                markersize=7,
                linestyle="--" if c == LIMIT else "-",
                zorder=3 if c == PGACCESS else 2,
            )
            plotted = True
        if not plotted:
            ax.text(
                0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes
            )
            ax.set_axis_off()
            continue
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(plan.threads))
        ax.set_xticklabels([str(n) for n in plan.threads])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("threads")
        ax.set_ylabel("ops/s")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.grid(alpha=0.3)
    handles: Dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        ncol=len(handles),
        fontsize=11,
        frameon=False,
    )
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# -------------------------------------------------------------------------- main
@dataclass(frozen=True)
class Plan:
    clients: Tuple[str, ...]
    workloads: Tuple[str, ...]
    threads: Tuple[int, ...]
    duration: float
    rounds: int
    pool_size: int
    bulk_rows: int
    bulk_sample: int
    claim_jobs: int
    pgbench_seconds: int

    def estimate_s(self) -> float:
        cells = sum(
            1
            for c in self.clients
            for w in GRID_WORKLOADS
            if w in self.workloads and w in CLIENTS[c].workloads
        ) * len(self.threads)
        total = cells * self.rounds * (self.duration + 0.05)
        if BULK in self.workloads:
            total += 2.0 * self.rounds * self.bulk_rows / 100_000
        if CLAIM in self.workloads and PGACCESS in self.clients:
            total += len(CLAIM_THREADS) * self.rounds * self.claim_jobs / 500
        if CONTENTION in self.workloads:
            pooled = [c for c in self.clients if "checkout" in CLIENTS[c].workloads]
            per_cell = self.duration + 0.5  # + a fresh pool and a VACUUM per cell
            total += (
                len(pooled) * (len(CONTENTION_THREADS) + 1) * self.rounds * per_cell
            )
        return total + len(self.threads) * (self.pgbench_seconds + 0.5) + 5


def csv_arg(valid: Sequence[str]) -> Callable[[str], Tuple[str, ...]]:
    def parse(raw: str) -> Tuple[str, ...]:
        items = tuple(x.strip() for x in raw.split(",") if x.strip())
        bad = [x for x in items if x not in valid]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {bad}; choose from {list(valid)}"
            )
        return items

    return parse


def int_list(raw: str) -> Tuple[int, ...]:
    try:
        items = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {raw!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError("thread counts must be >= 1")
    return items


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="0.5 s cells, 1 round, 20,000 bulk rows, 300 jobs (< 1 min)",
    )
    p.add_argument("--threads", type=int_list, default=(1, 4, 16))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--clients", type=csv_arg(ALL_CLIENTS), default=ALL_CLIENTS)
    p.add_argument("--workloads", type=csv_arg(ALL_WORKLOADS), default=ALL_WORKLOADS)
    p.add_argument(
        "--dsn",
        default=os.environ.get("PGACCESS_DSN"),
        help="benchmark this server (default: an embedded one)",
    )
    p.add_argument("--tcp", action="store_true", help="embedded server over TCP")
    p.add_argument("--duration", type=float, help="seconds per cell (2, quick 0.5)")
    p.add_argument("--rounds", type=int, help="rounds per cell (3, quick 1)")
    p.add_argument("--pool-size", type=int, default=POOL_SIZE)
    args = p.parse_args(argv)
    plan = Plan(
        clients=tuple(c for c in ALL_CLIENTS if c in args.clients),
        workloads=tuple(w for w in ALL_WORKLOADS if w in args.workloads),
        threads=tuple(sorted(set(args.threads))),
        duration=args.duration or (0.5 if args.quick else 2.0),
        rounds=args.rounds or (1 if args.quick else 3),
        pool_size=args.pool_size,
        bulk_rows=20_000 if args.quick else 100_000,
        bulk_sample=2_000 if args.quick else 10_000,
        claim_jobs=300 if args.quick else 1500,
        pgbench_seconds=1 if args.quick else 5,
    )
    return args, plan


def check_pgaccess(plan: Plan) -> Tuple[Plan, Optional[str]]:
    """Drop the pgaccess client (with a message) while its API does not import yet."""
    if PGACCESS not in plan.clients:
        return plan, None
    try:
        from pgaccess import ConnectionPool, Database  # noqa: F401
    except ImportError as exc:
        msg = f"pgaccess skipped: its API does not import yet ({describe(exc)})"
        log(msg)
        return replace(
            plan, clients=tuple(c for c in plan.clients if c != PGACCESS)
        ), msg
    return plan, None


@dataclass
class Results:
    grid: Grid
    bulk: List[Dict[str, Any]]
    claim: Dict[str, Any]
    pgbench: Dict[str, Any]
    phases_s: Dict[str, float]
    contention: Dict[str, Any] = field(default_factory=dict)


def measure(plan: Plan, target: Target) -> Results:
    """Every selected measurement, in order; each phase's wall time is kept."""
    phases: Dict[str, float] = {}

    def phase(name: str, fn: Callable[[], T]) -> T:
        log(f"{name}:")
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            phases[name] = round(time.perf_counter() - t0, 1)
            log(f"{name} took {phases[name]:.0f} s")

    grid = phase("grid", partial(run_grid, plan, target.dsn))
    bulk: List[Dict[str, Any]] = []
    if BULK in plan.workloads:
        bulk = phase(BULK, partial(run_bulk, plan, target.dsn))
    claim: Dict[str, Any] = {"skipped": "not selected"}
    if CLAIM in plan.workloads and PGACCESS in plan.clients:
        claim = phase(CLAIM, partial(run_claim, plan, target.jobs_dsn))
    elif CLAIM in plan.workloads:
        claim = {"skipped": "needs the pgaccess client"}
    contention: Dict[str, Any] = {}
    if CONTENTION in plan.workloads:
        contention = phase(CONTENTION, partial(run_contention, plan, target.dsn))
    pgbench = phase(
        "pgbench",
        partial(run_pgbench, target.pgbench_dsn, plan.threads, plan.pgbench_seconds),
    )
    return Results(grid, bulk, claim, pgbench, phases, contention)


Section = Tuple[str, Tuple[List[str], List[List[str]]]]  # title, (headers, rows)


def sections(plan: Plan, res: Results, quick: bool) -> List[Section]:
    out: List[Section] = []
    if res.grid:
        out.append(("throughput, ops/s (median)", grid_table(plan, res.grid)))
    if any(w == "checkout" for w, _n, _c in res.grid):
        title = (
            "checkout + return, microseconds per op per thread (pool waits included)"
        )
        out.append((title, checkout_table(plan, res.grid)))
    if res.bulk:
        title = (
            f"{BULK}: {plan.bulk_rows:,} rows (a int, b text, c float), single thread"
            + (" (--quick: fewer rows)" if quick else "")
        )
        out.append((title, bulk_table(res.bulk)))
    if res.contention.get("cells"):
        title = (
            f"{CONTENTION}: find_one by id (ops/s) over a pool of "
            f"{res.contention['pool_size']}, each cell on a fresh pool"
        )
        out.append((title, contention_table(res.contention)))
    if "cells" in res.claim:
        title = (
            f"{CLAIM}: pgaccess.jobs claim(limit=1) + complete, "
            f"pool size {plan.pool_size}"
        )
        out.append((title, claim_table(res.claim)))
    return out


def notes(plan: Plan, res: Results, meta: Dict[str, Any]) -> List[str]:
    out = [pgbench_line(res.pgbench)]
    if meta["pgaccess_skipped"]:
        out.append(meta["pgaccess_skipped"])
    if "psycopg3-pool" in plan.clients:
        out += [n for n in (psycopg3_note(),) if n]
    if "skipped" in res.claim and CLAIM in plan.workloads:
        out.append(f"{CLAIM}: {res.claim['skipped']}")
    load = meta["load_average"]["start"]
    if load > 0.5 * meta["cores"]:
        out.append(
            f"warning: the machine was busy before the run (load average {load:.1f} "
            f"on {meta['cores']} cores): the figures are noisy; run again idle"
        )
    return out


def run_meta(
    plan: Plan, target: Target, server_version: str, load_at_start: float
) -> Dict[str, Any]:
    now = datetime.now(timezone.utc).astimezone()
    return {
        "date": now.isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "platform": f"{platform.system()} {platform.machine()}",
        "load_average": {"start": load_at_start},
        "server_version": server_version,
        "where": target.where,
        "versions": versions(),
        "duration_s": plan.duration,
        "rounds": plan.rounds,
        "pool_size": plan.pool_size,
        "threads": list(plan.threads),
        "clients": list(plan.clients),
        "workloads": list(plan.workloads),
    }


def write_outputs(
    out: Path,
    plan: Plan,
    res: Results,
    meta: Dict[str, Any],
    tables: List[Section],
    extra: List[str],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": meta,
        "grid": [cell.to_json() for cell in res.grid.values()],
        "insert_many": res.bulk,
        "claim_complete": res.claim,
        "pgbench": res.pgbench,
        "contention": res.contention,
    }
    write_atomic(out / "latest.json", json.dumps(result, indent=2).encode())
    md = ["### Benchmark results", "", *(f"- {x}" for x in header_lines(meta)), ""]
    for title, (headers, rows) in tables:
        md += [f"**{title}**", "", render_md(headers, rows), ""]
    md += [f"- {n}" for n in extra]
    write_atomic(out / "latest.md", ("\n".join(md) + "\n").encode())
    written = [out / "latest.json", out / "latest.md"]
    if any(w in CHART_WORKLOADS for w, _n, _c in res.grid):
        title = (
            f"pgaccess vs peers: {meta['cores']} cores, "
            f"PostgreSQL {meta['server_version']}, pool size {plan.pool_size}, "
            f"median of {plan.rounds} x {plan.duration} s"
        )
        write_chart(out / "throughput.png", plan, res.grid, title)
        written.append(out / "throughput.png")
    log(f"wrote {', '.join(map(str, written))}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, plan = parse_args(argv)
    plan, skipped = check_pgaccess(plan)
    if not plan.clients:
        log("no client to benchmark")
        return 2
    started = time.perf_counter()
    load = round(os.getloadavg()[0], 2)  # before this run adds its own
    log(f"estimated run time: ~{plan.estimate_s() / 60:.1f} min")
    target_cm = external_target(args.dsn) if args.dsn else embedded_target(args.tcp)
    with target_cm as target:
        meta = run_meta(plan, target, prepare(target), load)
        meta["pgaccess_skipped"] = skipped
        for line in header_lines(meta):
            print(line)
        print(flush=True)
        res = measure(plan, target)
    meta["load_average"]["end"] = round(os.getloadavg()[0], 2)
    meta["phases_s"] = res.phases_s
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)

    tables = sections(plan, res, args.quick)
    extra = notes(plan, res, meta)
    for title, (headers, rows) in tables:
        print(f"{title}\n{render_text(headers, rows)}\n")
    for note in extra:
        print(note)
    print(f"total time {meta['elapsed_s']:.0f} s")
    write_outputs(args.out, plan, res, meta, tables, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
