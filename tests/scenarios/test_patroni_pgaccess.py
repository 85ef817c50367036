"""pgaccess under a real HA manager: a synchronous Patroni cluster of three nodes
(``-m patroni``; ``make test-ha`` and ``.ci/run`` run it, ``make test`` does not).

The clients are pgaccess's own: a ``Database`` on a DSN naming every node with
``target_session_attrs=read-write``, its inserts acknowledged by Patroni's synchronous
standby, and a ``Worker``. What a switchover and a SIGKILL of the leader may cost is
asserted: no acknowledged write lost, writes back within Patroni's own bound, every
job completed once.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from support.dedicated import admin_query
from support.patroni import PatroniCluster, patroni_cluster

from pgaccess import Database, DatabaseError, schema
from pgaccess.jobs import VideoJobs, Worker

pytestmark = [pytest.mark.patroni, pytest.mark.xdist_group("patroni")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[PatroniCluster]:
    with patroni_cluster(3, synchronous=True) as started:
        leader = started.wait_ready()
        schema.apply(started.node_dsn(leader))
        admin_query(
            started.node_dsn(leader),
            "CREATE TABLE IF NOT EXISTS ha_writes (k text PRIMARY KEY)",
        )
        yield started


@pytest.fixture
def db(cluster: PatroniCluster) -> Iterator[Database]:
    dsn = cluster.dsn(target_session_attrs="read-write")
    with Database(dsn=dsn, maxconn=6, timeout=60, connect_timeout=2) as database:
        yield database


def sync_standby(cluster: PatroniCluster, timeout: float = 60) -> str:
    """The name of the synchronous standby, once Patroni has one (a switchover in
    synchronous mode must go to it)."""
    deadline = time.monotonic() + timeout
    while True:
        cluster.wait_ready()
        for member in cluster.members():
            if member.get("role") == "sync_standby" and member.get("state") in (
                "running",
                "streaming",
            ):
                return str(member["name"])
        assert time.monotonic() < deadline, cluster.members()
        time.sleep(0.2)


class Writers:
    """Threads inserting unique keys through ``db``; what was acknowledged, when."""

    def __init__(self, db: Database, threads: int = 4) -> None:
        self.db = db
        self.stop = threading.Event()
        self.acked: List[Tuple[float, str]] = []
        self.errors: List[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self, me: int) -> None:
        n = 0
        while not self.stop.is_set():
            key = f"{time.monotonic_ns()}-{me}-{n}"
            n += 1
            try:
                self.db.execute("INSERT INTO ha_writes (k) VALUES (%s)", (key,))
            except DatabaseError as exc:
                self.errors.append(type(exc).__name__)
                time.sleep(0.02)
                continue
            self.acked.append((time.monotonic(), key))

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, (len(self.acked), self.errors[-5:])
            time.sleep(0.02)

    def first_after(self, t: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            later = [at for at, _ in self.acked if at > t]
            if later:
                return min(later)
            assert time.monotonic() < deadline, self.errors[-5:]
            time.sleep(0.02)


def _lost(cluster: PatroniCluster, leader: str, acked: List[Tuple[float, str]]) -> int:
    rows = admin_query(cluster.node_dsn(leader), "SELECT k FROM ha_writes")
    present = {r[0] for r in rows}
    return sum(1 for _, key in acked if key not in present)


def test_a_switchover_under_write_load_loses_nothing(
    cluster: PatroniCluster, db: Database
) -> None:
    old = cluster.wait_ready()
    candidate = sync_standby(cluster)
    with Writers(db) as writers:
        writers.wait_for(50, 30)
        new, took = cluster.switchover(candidate)
        done = time.monotonic()
        writers.first_after(done, 60)
        writers.wait_for(len(writers.acked) + 20, 30)
    assert new != old
    assert _lost(cluster, new, writers.acked) == 0
    # The longest time without an acknowledged write, around the switchover.
    times = sorted(at for at, _ in writers.acked if at > done - took - 1)
    gap = max(b - a for a, b in zip(times, times[1:]))
    assert gap < took + 10, (gap, took, writers.errors[-5:])
    print(
        f"\npatroni+pgaccess: switchover {old} -> {new} in {took:.2f} s; writes "
        f"stopped for {gap:.2f} s at most; {len(writers.acked)} acknowledged, none "
        f"lost; errors meanwhile: {len(writers.errors)} ({sorted(set(writers.errors))})"
    )
    cluster.wait_ready()


def test_a_killed_leader_loses_no_acknowledged_write(
    cluster: PatroniCluster, db: Database
) -> None:
    old = cluster.wait_ready()
    sync_standby(cluster)  # a synchronous standby holds every acknowledged commit
    with Writers(db) as writers:
        writers.wait_for(50, 30)
        killed = time.monotonic()
        cluster.kill_node(old)  # SIGKILL of Patroni and of its postmaster
        back = writers.first_after(killed + 0.5, cluster.TTL * 4) - killed
        writers.wait_for(len(writers.acked) + 20, 30)
    new = cluster.leader()
    assert new is not None and new != old
    assert _lost(cluster, new, writers.acked) == 0
    assert back < cluster.TTL * 3, back  # Patroni's ttl bounds the election
    print(
        f"\npatroni+pgaccess: SIGKILL of {old}: writes back on {new} after "
        f"{back:.2f} s (ttl {cluster.TTL} s); {len(writers.acked)} acknowledged, "
        f"none lost"
    )
    cluster.start_node(old)
    cluster.wait_ready()


def test_a_worker_drains_the_queue_across_a_switchover(
    cluster: PatroniCluster, db: Database
) -> None:
    done: Dict[str, int] = {}
    lock = threading.Lock()

    def handler(job: Dict[str, Any]) -> None:
        time.sleep(0.01)
        with lock:
            done[job["src_hash"]] = done.get(job["src_hash"], 0) + 1

    jobs = VideoJobs(db)
    keys = [f"ha-{time.monotonic_ns()}-{i}" for i in range(300)]
    jobs.enqueue_many([{"src_hash": k, "input_path": "/in"} for k in keys])
    worker = Worker(db, handler, threads=3, reclaim_after=3.0)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while len(done) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        cluster.switchover(sync_standby(cluster))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = {
                r["status"]: r["n"]
                for r in db.execute(
                    "SELECT status, count(*) AS n FROM video_job"
                    " WHERE src_hash = ANY(%s) GROUP BY status",
                    (keys,),
                )
            }
            if counts.get("completed") == len(keys):
                break
            time.sleep(0.2)
        assert worker.alive
    finally:
        worker.stop()
        worker.join(30)
    assert counts == {"completed": len(keys)}, counts
    assert set(done) == set(keys)
