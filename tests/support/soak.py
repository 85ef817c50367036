"""The soak harness: worker threads of mixed operations, a fault at a steady rhythm,
and a report of what was lost, how fast it ran, and what it cost.

``Soak(server, dbname, config).run()`` returns the report (a dict). It drives:

- ``config.threads`` workers through one ``Database`` (a pool of ``config.maxconn``)
  reaching a dedicated server through a FaultProxy that runs in a process of its own
  (so neither its GIL share nor its sockets blur this process's latency, memory and
  descriptor figures);
- a baseline phase without faults, then a fault every ``config.fault_every`` seconds,
  rotating: a fast restart of the server, pg_terminate_backend of every pooled
  session, the proxy refusing connections for 3 s (open ones reset), the proxy
  resetting every connection;
- a sampler (each second: server sessions, descriptors, resident memory).

What it checks is gathered in ``report["violations"]``: an acknowledged write missing
or doubled, a row nobody was told about, a read not seeing an acknowledged write, an
error that is not one a fault explains. Keys are derived from (thread, sequence), and
acknowledgements kept as bitmaps (a bit per key: a few MB over a 30-minute run),
which the report subtracts from the memory growth it checks.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psycopg2
import psycopg2.extensions

from pgaccess import (
    CommitOutcomeUnknown,
    ConnectionFailed,
    ConnectionLost,
    Database,
    DatabaseError,
    PoolTimeout,
)

from .dedicated import Dedicated
from .faultproxy import FaultProxy

__all__ = [
    "FAULTS",
    "ProxyProcess",
    "Soak",
    "SoakConfig",
    "format_report",
    "write_report",
]

FAULTS = ("restart", "terminate", "refuse", "reset")
EXPLAINED_BY_FAULTS = (ConnectionFailed, ConnectionLost, PoolTimeout)
KINDS = ("insert", "find", "update", "count", "transaction")
WEIGHTS = (35, 20, 15, 15, 15)


@dataclass
class SoakConfig:
    seconds: float  # the phase with faults
    baseline_seconds: float
    fault_every: float
    threads: int = 8
    maxconn: int = 8
    timeout: float = 10.0
    refuse_seconds: float = 3.0
    recovery_margin: float = 2.0  # after a fault ends, still counted as its window
    faults: Tuple[str, ...] = FAULTS  # rotated through; () for a control run


# ------------------------------------------------------------------ figures
class Histogram:
    """Latencies in log-spaced buckets (5 % wide): fixed memory, any run length."""

    RATIO = 1.05
    LOW = 1e-5  # 10 us

    def __init__(self) -> None:
        self.counts = [0] * 400
        self.n = 0
        self.max = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        i = 0
        if seconds > self.LOW:
            i = min(int(math.log(seconds / self.LOW, self.RATIO)) + 1, 399)
        with self._lock:
            self.counts[i] += 1
            self.n += 1
            if seconds > self.max:
                self.max = seconds

    def quantile(self, q: float) -> float:
        if not self.n:
            return float("nan")
        rank = q * self.n
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return self.LOW * self.RATIO**i  # the bucket's upper bound
        return self.max

    def summary(self) -> Dict[str, Any]:
        return {
            "n": self.n,
            "p50_ms": round(self.quantile(0.5) * 1000, 3),
            "p99_ms": round(self.quantile(0.99) * 1000, 3),
            "max_ms": round(self.max * 1000, 3),
        }


class Bitmap:
    """Which sequence numbers were acknowledged (one bit each)."""

    def __init__(self) -> None:
        self.bits = bytearray(1024)
        self.count = 0

    def set(self, i: int) -> None:
        if i >> 3 >= len(self.bits):
            self.bits.extend(bytes(len(self.bits)))
        if not self.get(i):
            self.bits[i >> 3] |= 1 << (i & 7)
            self.count += 1

    def get(self, i: int) -> bool:
        return i >> 3 < len(self.bits) and bool(self.bits[i >> 3] & (1 << (i & 7)))

    def members(self) -> List[int]:
        return [
            (byte << 3) + bit
            for byte, value in enumerate(self.bits)
            if value
            for bit in range(8)
            if value & (1 << bit)
        ]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------- the proxy, out of process
def _serve_proxy(host: str, port: int, control: Any) -> None:
    with FaultProxy(host, port) as proxy:
        control.send(proxy.port)
        while True:
            command, args = control.recv()
            if command == "stop":
                break
            control.send(getattr(proxy, command)(*args))
    control.send(None)


class ProxyProcess:
    """A FaultProxy in a process of its own, driven through a pipe."""

    def __init__(self, host: str, port: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._control, child_end = ctx.Pipe()
        self._lock = threading.Lock()
        self.process = ctx.Process(
            target=_serve_proxy, args=(host, port, child_end), daemon=True
        )
        self.process.start()
        child_end.close()
        if not self._control.poll(30):
            raise RuntimeError("the proxy process did not start")
        self.port: int = self._control.recv()

    def call(self, command: str, *args: Any) -> Any:
        with self._lock:
            self._control.send((command, args))
            if not self._control.poll(30):
                raise RuntimeError(f"the proxy process did not answer {command!r}")
            return self._control.recv()

    def stop(self) -> None:
        try:
            with self._lock:
                self._control.send(("stop", ()))
                self._control.poll(10)
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)


# ------------------------------------------------------------- the clock
class FaultClock:
    """Tells an operation whether it ran outside every fault window."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.generation = 0
        self.active = False
        self.quiet_from = 0.0

    def start(self) -> None:
        self.generation += 1
        self.active = True

    def end(self) -> None:
        self.active = False
        self.quiet_from = time.monotonic() + self.margin

    def mark(self) -> Tuple[int, bool]:
        """At an operation's start: (generation, quiet so far)."""
        return self.generation, not self.active and time.monotonic() >= self.quiet_from

    def quiet(self, mark: Tuple[int, bool]) -> bool:
        """At its end: was it quiet all along?"""
        return mark[1] and mark[0] == self.generation and not self.active


# ------------------------------------------------------------------ soak
class Soak:
    """One soak run; see the module's docstring."""

    def __init__(self, server: Dedicated, dbname: str, config: SoakConfig) -> None:
        self.server = server
        self.dbname = dbname
        self.config = config
        self.run_id = random.getrandbits(30)
        self.clock = FaultClock(config.recovery_margin)
        self.phase = "warmup"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latency = {p: Histogram() for p in ("baseline", "quiet", "fault")}
        # Outside fault windows, minute by minute: a trend (or a spike) shows here.
        self.quiet_by_minute: Dict[int, Histogram] = {}
        self.faults_started = 0.0
        self.ops = {k: 0 for k in KINDS}
        self.errors: Dict[str, Dict[str, int]] = {"quiet": {}, "fault": {}}
        self.violations: List[str] = []
        self.faults: List[Dict[str, Any]] = []
        self.pending_recovery: List[Dict[str, Any]] = []
        n = config.threads
        self.jobs: List[int] = []
        self.inserted = [Bitmap() for _ in range(n)]
        self.insert_unknown: List[set[int]] = [set() for _ in range(n)]
        self.committed = [Bitmap() for _ in range(n)]
        self.commit_unknown: List[set[int]] = [set() for _ in range(n)]
        self.not_committed: List[set[int]] = [set() for _ in range(n)]
        self.priority_acked = [0] * n
        self.priority_tried = [0] * n
        self.samples: Dict[str, List[float]] = {"server": [], "fds": [], "rss": []}

    # -------------------------------------------------------------- keys
    def op_key(self, thread: int, seq: int) -> uuid.UUID:
        return uuid.UUID(int=(self.run_id << 64) | (thread << 40) | seq)

    def op_id(self, thread: int, seq: int) -> str:
        return str(self.op_key(thread, seq))

    def decode(self, op_id: str) -> Tuple[int, int, int]:
        value = uuid.UUID(op_id).int
        return value >> 64, (value >> 40) & 0xFFFFFF, value & (2**40 - 1)

    def src_hash(self, thread: int, seq: int) -> str:
        return f"soak-{self.run_id}-{thread}-{seq}"

    def violation(self, text: str) -> None:
        with self.lock:
            if len(self.violations) < 50:
                self.violations.append(text)

    # ------------------------------------------------------------ workers
    def worker(self, i: int, db: Database, barrier: threading.Barrier) -> None:
        rng = random.Random(i)
        job = self.jobs[i]
        seq = 0
        barrier.wait(timeout=60)
        while not self.stop.is_set():
            seq += 1
            kind = rng.choices(KINDS, WEIGHTS)[0]
            mark = self.clock.mark()
            phase = self.phase
            t0 = time.monotonic()
            try:
                self.operation(kind, i, job, seq, db, rng)
                error: Optional[BaseException] = None
            except DatabaseError as exc:
                error = exc
            except Exception as exc:  # a violation, reported below
                self.violation(f"{kind}: unexpected {exc!r}")
                error = exc
            t1 = time.monotonic()
            quiet = self.clock.quiet(mark)
            window = "quiet" if quiet else "fault"
            with self.lock:
                self.ops[kind] += 1
                if error is not None:
                    name = type(error).__name__
                    self.errors[window][name] = self.errors[window].get(name, 0) + 1
                elif self.pending_recovery:
                    for fault in self.pending_recovery:
                        if t1 >= fault["_end"]:
                            fault["recovered_after_s"] = round(t1 - fault["_end"], 3)
                    self.pending_recovery = [
                        f for f in self.pending_recovery if "recovered_after_s" not in f
                    ]
            if error is not None and not isinstance(error, EXPLAINED_BY_FAULTS):
                self.violation(f"{kind}: {type(error).__name__}: {error}")
            elif error is not None and quiet:
                self.violation(f"{kind}: {type(error).__name__} outside any fault")
            if error is None and phase != "warmup":
                hist = "baseline" if phase == "baseline" else window
                self.latency[hist].add(t1 - t0)
                if hist == "quiet":
                    minute = int((t1 - self.faults_started) // 60)
                    by_minute = self.quiet_by_minute.get(minute)
                    if by_minute is None:
                        by_minute = self.quiet_by_minute.setdefault(minute, Histogram())
                    by_minute.add(t1 - t0)

    def operation(
        self, kind: str, i: int, job: int, seq: int, db: Database, rng: random.Random
    ) -> None:
        if kind == "insert":
            op = self.op_id(i, seq)
            row = {"op_id": op, "job_id": job, "stage": "soak", "duration_ms": seq}
            try:
                db.insert("processing_metrics", row)
            except CommitOutcomeUnknown:
                self.insert_unknown[i].add(seq)
                raise
            self.inserted[i].set(seq)
        elif kind == "find":
            acked = self.inserted[i]
            if not acked.count or seq < 2:
                return
            for _ in range(8):  # a random acknowledged insert of this thread
                pick = rng.randrange(1, seq)
                if acked.get(pick):
                    found = db.find_one(
                        "processing_metrics", {"op_id": self.op_id(i, pick)}
                    )
                    if found is None or found["job_id"] != job:
                        self.violation(f"find: acknowledged insert {i}/{pick} not read")
                    return
        elif kind == "update":
            self.priority_tried[i] = seq
            if db.update("video_job", {"priority": seq}, {"id": job}) != 1:
                self.violation(f"update: job {job} not found")
            self.priority_acked[i] = seq
        elif kind == "count":
            # The thread's recent acknowledged inserts, counted by their keys: a cost
            # that stays the same however long the run (counting all of a job's rows
            # grew with the table, and with it the latency figures).
            acked = self.inserted[i]
            recent = [s for s in range(max(1, seq - 48), seq) if acked.get(s)]
            if not recent:
                return
            keys = [self.op_key(i, s) for s in recent]
            counted = db.count("processing_metrics", {"op_id": keys, "job_id": job})
            if counted != len(recent):
                self.violation(f"count: {counted} of {len(recent)} acknowledged seen")
        else:
            src_hash = self.src_hash(i, seq)

            def enqueue(tx: Any) -> None:
                new = tx.insert("video_job", {"src_hash": src_hash, "input_path": "/s"})
                tx.insert(
                    "highlight",
                    {"job_id": new, "start_time": 0.0, "end_time": 1.0, "score": 0.5},
                    returning=None,
                )

            try:
                db.run_in_transaction(enqueue)
            except CommitOutcomeUnknown:
                self.commit_unknown[i].add(seq)
                raise
            except DatabaseError:
                self.not_committed[i].add(seq)
                raise
            self.committed[i].set(seq)

    # ------------------------------------------------------------- faults
    def inject(self, kind: str, proxy: ProxyProcess) -> None:
        if kind == "restart":
            self.server.restart("fast")
        elif kind == "terminate":
            self.server.terminate(self.dbname)
        elif kind == "refuse":
            proxy.call("refuse", self.config.refuse_seconds)
            proxy.call("reset_all")
            time.sleep(self.config.refuse_seconds)
        else:
            proxy.call("reset_all")

    def faults_loop(self, proxy: ProxyProcess, started: float) -> None:
        cfg = self.config
        k = 0
        while cfg.faults:  # none: a control run
            at = started + (k + 0.5) * cfg.fault_every
            kind = cfg.faults[k % len(cfg.faults)]
            # The last fault must end, and be recovered from, inside the run.
            lasts = {"refuse": cfg.refuse_seconds, "restart": 1.0}.get(kind, 0.5)
            if at + lasts + cfg.recovery_margin > started + cfg.seconds:
                return
            if self.stop.wait(max(at - time.monotonic(), 0)):
                return
            self.clock.start()
            begun = time.monotonic()
            try:
                self.inject(kind, proxy)
            except Exception as exc:  # reported; the run goes on
                self.violation(f"fault {kind} could not be injected: {exc!r}")
            ended = time.monotonic()
            self.clock.end()
            record = {
                "kind": kind,
                "at_s": round(begun - started, 3),
                "duration_s": round(ended - begun, 3),
                "_end": ended,
            }
            with self.lock:
                self.faults.append(record)
                self.pending_recovery.append(record)
            k += 1

    def own_bytes(self) -> int:
        """Memory held by the harness's acknowledgement bitmaps."""
        return sum(len(b.bits) for b in (*self.inserted, *self.committed))

    # ------------------------------------------------------------ sampler
    def server_sessions(self) -> Optional[int]:
        try:
            return len(self.server.backends(self.dbname))
        except psycopg2.Error:
            return None  # restarting: no sample

    def settled_sessions(self, expected: int) -> Optional[int]:
        """The server's count of the pool's sessions, once discarded ones are gone."""
        deadline = time.monotonic() + 5
        sessions = self.server_sessions()
        while sessions != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            sessions = self.server_sessions()
        return sessions

    def sampler(self) -> None:
        while not self.stop.wait(1.0):
            mark = self.clock.mark()
            sessions = self.server_sessions()
            with self.lock:
                # In a fault window the server may still list a session the pool has
                # already replaced (a terminated backend on its way out): count the
                # pool's sessions only when no fault is near.
                if sessions is not None and self.clock.quiet(mark):
                    self.samples["server"].append(sessions)
                self.samples["fds"].append(open_fds())
                self.samples["rss"].append(rss_bytes())

    # ---------------------------------------------------------------- run
    def setup(self) -> None:
        conn = psycopg2.connect(self.server.dsn(self.dbname))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for i in range(self.config.threads):
                    cur.execute(
                        "INSERT INTO video_job (src_hash, input_path) VALUES (%s, %s) "
                        "RETURNING id",
                        (f"soak-{self.run_id}-job-{i}", "/soak"),
                    )
                    self.jobs.append(cur.fetchone()[0])
        finally:
            conn.close()

    def run(self) -> Dict[str, Any]:
        cfg = self.config
        self.setup()
        proxy = ProxyProcess("127.0.0.1", self.server.port)
        dsn = psycopg2.extensions.make_dsn(
            self.server.tcp_dsn(self.dbname),
            port=proxy.port,
            sslmode="disable",
            gssencmode="disable",
        )
        db = Database(dsn=dsn, maxconn=cfg.maxconn, timeout=cfg.timeout, name="soak")
        barrier = threading.Barrier(cfg.threads + 1)
        threads = [
            threading.Thread(target=self.worker, args=(i, db, barrier), daemon=True)
            for i in range(cfg.threads)
        ]
        sampler = threading.Thread(target=self.sampler, daemon=True)
        faults: Optional[threading.Thread] = None
        for t in threads:
            t.start()
        try:
            barrier.wait(timeout=60)
            time.sleep(min(2.0, cfg.baseline_seconds / 4))  # warm-up: not measured
            self.phase = "baseline"
            time.sleep(cfg.baseline_seconds)
            gc.collect()
            warm = {"rss": rss_bytes(), "fds": open_fds(), "own": self.own_bytes()}
            warm_sessions = self.server_sessions()
            sampler.start()
            started = self.faults_started = time.monotonic()
            self.phase = "faults"
            faults = threading.Thread(
                target=self.faults_loop, args=(proxy, started), daemon=True
            )
            faults.start()
            self.stop.wait(cfg.seconds)
        finally:
            self.stop.set()
            for t in threads:
                t.join(cfg.timeout * 6)
            if faults is not None:
                faults.join(60)
            stuck = [t.name for t in threads if t.is_alive()]
            pool_stats = db.pool.stats()
            gc.collect()
            end = {"rss": rss_bytes(), "fds": open_fds(), "own": self.own_bytes()}
            end_sessions = self.settled_sessions(pool_stats["size"])
            db.close()
            proxy.stop()
        if stuck:
            self.violation(f"threads still running at the end: {stuck}")
        report = self.report(warm, end, warm_sessions, end_sessions, pool_stats)
        report["verification"] = self.verify()
        return report

    # ------------------------------------------------------------- verify
    def verify(self) -> Dict[str, int]:
        """Compare what the server holds with what callers were told."""
        conn = psycopg2.connect(self.server.dsn(self.dbname))
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT op_id::text FROM processing_metrics WHERE job_id = ANY(%s)",
                    (self.jobs,),
                )
                metrics = [r[0] for r in cur.fetchall()]
                cur.execute(
                    "SELECT j.src_hash, count(h.id) FROM video_job j "
                    "LEFT JOIN highlight h ON h.job_id = j.id "
                    "WHERE j.src_hash LIKE %s GROUP BY j.src_hash",
                    (f"soak-{self.run_id}-%",),
                )
                jobs = dict(cur.fetchall())
                cur.execute(
                    "SELECT id, priority FROM video_job WHERE id = ANY(%s)",
                    (self.jobs,),
                )
                priorities = dict(cur.fetchall())
        finally:
            conn.close()
        n = self.config.threads
        lost = duplicated = phantom = 0
        present: List[set[int]] = [set() for _ in range(n)]
        for op_id in metrics:
            _run, thread, seq = self.decode(op_id)
            if seq in present[thread]:
                duplicated += 1
            present[thread].add(seq)
        for i in range(n):
            acked = set(self.inserted[i].members())
            lost += len(acked - present[i])
            phantom += len(present[i] - acked - self.insert_unknown[i])
        for i in range(n):
            for seq in self.committed[i].members():
                highlights = jobs.get(self.src_hash(i, seq))
                if highlights is None:
                    lost += 1
                elif highlights != 1:
                    duplicated += 1
            for seq in self.not_committed[i] - self.commit_unknown[i]:
                if self.src_hash(i, seq) in jobs:
                    phantom += 1
            for seq in self.commit_unknown[i]:
                if jobs.get(self.src_hash(i, seq)) not in (None, 1):
                    duplicated += 1  # half a transaction
            final = priorities[self.jobs[i]]
            if not self.priority_acked[i] <= final <= self.priority_tried[i]:
                lost += 1
                self.violation(
                    f"update: job {self.jobs[i]} has priority {final}, acknowledged "
                    f"{self.priority_acked[i]}, last tried {self.priority_tried[i]}"
                )
        if lost or duplicated or phantom:
            self.violation(f"lost {lost}, duplicated {duplicated}, phantom {phantom}")
        return {
            "acknowledged_inserts": sum(b.count for b in self.inserted),
            "acknowledged_transactions": sum(b.count for b in self.committed),
            "unknown_outcomes": sum(map(len, self.insert_unknown))
            + sum(map(len, self.commit_unknown)),
            "lost": lost,
            "duplicated": duplicated,
            "phantom": phantom,
        }

    # ------------------------------------------------------------- report
    def report(
        self,
        warm: Dict[str, int],
        end: Dict[str, int],
        warm_sessions: Optional[int],
        end_sessions: Optional[int],
        pool_stats: Dict[str, Any],
    ) -> Dict[str, Any]:
        base = self.latency["baseline"].summary()
        quiet = self.latency["quiet"].summary()
        samples = self.samples
        return {
            "seconds": self.config.seconds,
            "baseline_seconds": self.config.baseline_seconds,
            "threads": self.config.threads,
            "maxconn": self.config.maxconn,
            "faults": [
                {k: v for k, v in f.items() if not k.startswith("_")}
                for f in self.faults
            ],
            "operations": dict(self.ops, total=sum(self.ops.values())),
            "errors_in_fault_windows": self.errors["fault"],
            "errors_outside_fault_windows": self.errors["quiet"],
            "latency": {
                "baseline": base,
                "outside_faults": quiet,
                "in_fault_windows": self.latency["fault"].summary(),
                "p99_ratio": round(quiet["p99_ms"] / base["p99_ms"], 3)
                if base["n"] and quiet["n"]
                else None,
                "outside_faults_p99_by_minute_ms": [
                    self.quiet_by_minute[m].summary()["p99_ms"]
                    for m in sorted(self.quiet_by_minute)
                ],
            },
            "memory": {
                "rss_warm_mb": round(warm["rss"] / 2**20, 2),
                "rss_end_mb": round(end["rss"] / 2**20, 2),
                "rss_max_mb": round(max(samples["rss"], default=0) / 2**20, 2),
                "growth_pct": round(100 * (end["rss"] - warm["rss"]) / warm["rss"], 2),
                # Less the harness's own bookkeeping (a bit per operation key): the
                # growth that is pgaccess's and psycopg2's.
                "harness_mb": round(end["own"] / 2**20, 2),
                "growth_pct_net": round(
                    100
                    * (end["rss"] - warm["rss"] - (end["own"] - warm["own"]))
                    / warm["rss"],
                    2,
                ),
            },
            "fds": {
                "warm": warm["fds"],
                "end": end["fds"],
                "max": max(samples["fds"], default=warm["fds"]),
            },
            "server_sessions": {
                "warm": warm_sessions,
                "end": end_sessions,
                "max": max(samples["server"], default=0),
                "median": sorted(samples["server"])[len(samples["server"]) // 2]
                if samples["server"]
                else None,
            },
            "pool": pool_stats,
            "violations": self.violations,
        }


def format_report(report: Dict[str, Any]) -> str:
    """The report as a few readable lines (the JSON file has every figure)."""
    lat = report["latency"]
    mem = report["memory"]
    ver = report.get("verification", {})
    lines = [
        f"soak: {report['seconds']:.0f} s with faults after a "
        f"{report['baseline_seconds']:.0f} s baseline, {report['threads']} threads, "
        f"pool of {report['maxconn']}",
        "faults: "
        + ", ".join(
            f"{f['kind']}@{f['at_s']:.0f}s ({f['duration_s']:.2f}s, back after "
            f"{f.get('recovered_after_s', 'never')}s)"
            for f in report["faults"]
        ),
        f"operations: {report['operations']}",
        f"errors in fault windows: {report['errors_in_fault_windows']}; "
        f"outside: {report['errors_outside_fault_windows']}",
        f"latency p50/p99/max ms: baseline {lat['baseline']['p50_ms']}/"
        f"{lat['baseline']['p99_ms']}/{lat['baseline']['max_ms']}, outside faults "
        f"{lat['outside_faults']['p50_ms']}/{lat['outside_faults']['p99_ms']}/"
        f"{lat['outside_faults']['max_ms']} (p99 ratio {lat['p99_ratio']}), in fault "
        f"windows {lat['in_fault_windows']['p99_ms']}/"
        f"{lat['in_fault_windows']['max_ms']}",
        f"memory: {mem['rss_warm_mb']} MB -> {mem['rss_end_mb']} MB "
        f"({mem['growth_pct']:+.2f} %; {mem['growth_pct_net']:+.2f} % less the "
        f"harness's {mem['harness_mb']} MB of bitmaps), fds {report['fds']}, "
        "server sessions "
        f"{report['server_sessions']}",
        f"verification: {ver}",
        f"violations: {report['violations'] or 'none'}",
    ]
    return "\n".join(lines)


def write_report(report: Dict[str, Any], directory: Path) -> Path:
    """Write the report as JSON (to ``PGACCESS_SOAK_REPORT`` if set); its path."""
    target = os.environ.get("PGACCESS_SOAK_REPORT")
    path = Path(target) if target else directory / "soak-report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return path
