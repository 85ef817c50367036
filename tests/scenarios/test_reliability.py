"""Reliability under faults (issue 7): restarts, crashes, lost and stalled networks,
a full server, dirty returns, leaks, forks.

Real server, real threads and processes, no mocks. Tests that restart, crash or
resize a server use a dedicated embedded server (``tests/support/dedicated.py``), so
the other xdist workers never notice; network faults go through a FaultProxy in front
of this worker's database. The long versions are marked ``slow`` (``make soak``).
"""

from __future__ import annotations

import gc
import io
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest
from support.blackhole import blackhole
from support.blackhole import unavailable as blackhole_unavailable
from support.dedicated import Dedicated, admin_query, dedicated_server
from support.faultproxy import FaultProxy

from pgaccess import (
    CommitOutcomeUnknown,
    ConnectionFailed,
    ConnectionLost,
    ConnectionPool,
    Database,
    DatabaseError,
    DeadlockDetected,
    PoolTimeout,
    QueryCanceled,
    UnknownTable,
)
from pgaccess.connector import CONNECT_DEFAULTS, Backoff

pytestmark = pytest.mark.faults

MakePool = Callable[..., ConnectionPool]
EXPECTED_IN_FAULTS = (ConnectionFailed, ConnectionLost, PoolTimeout)


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def dedicated() -> Iterator[Dedicated]:
    """A server of this module's own (per xdist worker), free to restart or crash."""
    with dedicated_server() as server:
        yield server


@pytest.fixture
def make_pool() -> Iterator[MakePool]:
    pools: List[ConnectionPool] = []

    def make(dsn: str, **kwargs: Any) -> ConnectionPool:
        pool = ConnectionPool(dsn, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def backend_pid(pool: ConnectionPool, timeout: Optional[float] = None) -> int:
    with pool.connection(timeout) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def pgaccess_backends(dsn: str) -> Set[int]:
    rows = admin_query(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'pgaccess' AND pid <> pg_backend_pid()",
    )
    return {r[0] for r in rows}


def active_backend(dsn: str, marker: str, timeout: float = 10.0) -> int:
    """The pid of the session running a statement that contains ``marker``."""
    found: List[int] = []

    def running() -> bool:
        rows = admin_query(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        )
        found[:] = [r[0] for r in rows]
        return bool(found)

    wait_for(running, timeout)
    return found[0]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def join_all(threads: Sequence[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.01))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout} s: {alive}"


@dataclass
class Call:
    """One timed call and how it ended (its result, or the exception)."""

    started: float
    ended: float
    key: Any
    outcome: Any

    @property
    def ok(self) -> bool:
        return not isinstance(self.outcome, BaseException)

    @property
    def duration(self) -> float:
        return self.ended - self.started


def timed(key: Any, fn: Callable[[], Any]) -> Call:
    started = time.monotonic()
    try:
        outcome = fn()
    except DatabaseError as exc:
        outcome = exc
    return Call(started, time.monotonic(), key, outcome)


class Sleeper:
    """Runs ``fn`` in a thread; the call, once it has ended, is in ``.call``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.call: Optional[Call] = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        self.call = timed(None, fn)

    def result(self, timeout: float) -> Call:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the call still blocks after {timeout} s"
        assert self.call is not None
        return self.call


# ------------------------------------------- 1. fast restart under load
def run_inserts_across_restarts(
    server: Dedicated,
    seconds: float,
    restart_at: Sequence[float],
    *,
    threads: int = 8,
    timeout: float = 5.0,
) -> None:
    """``threads`` threads insert metrics while the server restarts (``-m fast``)."""
    dbname = server.new_database("restart")
    db = Database(
        dsn=server.dsn(dbname), maxconn=threads, timeout=timeout, name="restart"
    )
    calls: List[Call] = []
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        barrier.wait(timeout=30)
        n = 0
        while not stop.is_set():
            n += 1
            op = str(uuid.uuid4())  # the unique client key: a retry cannot double it
            row = {"op_id": op, "stage": f"w{i}", "duration_ms": n}
            calls.append(timed(op, partial(db.insert, "processing_metrics", row)))

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    barrier.wait(timeout=30)
    started = time.monotonic()
    restarts = []
    try:
        for at in restart_at:
            time.sleep(max(started + at - time.monotonic(), 0))
            begun = time.monotonic()
            server.restart("fast")  # returns once the server accepts again
            restarts.append((begun, time.monotonic()))
        time.sleep(max(started + seconds - time.monotonic(), 0))
    finally:
        stop.set()
        join_all(workers, timeout + 30)
    stats = db.pool.stats()
    db.close()

    acked = {c.key: c.outcome for c in calls if c.ok}
    failed = [c for c in calls if not c.ok]
    rows = dict(
        server.execute(dbname, "SELECT op_id::text, id FROM processing_metrics")
    )
    # Every insert that returned is there, under the id it returned, once.
    assert [op for op, rid in acked.items() if rows.get(op) != rid] == []
    assert len(set(acked.values())) == len(acked)
    # A row nobody was told about can only come from a call whose outcome was unknown.
    unknown = {c.key for c in failed if isinstance(c.outcome, ConnectionLost)}
    assert set(rows) - set(acked) <= unknown
    assert [
        c.outcome for c in failed if not isinstance(c.outcome, EXPECTED_IN_FAULTS)
    ] == []
    # The restarts were felt (connections lost) and yet no call failed: the pool
    # reconnects within the call's timeout and the insert is re-run by its key.
    assert stats["connections_lost"] >= 1
    assert failed == [], [repr(c.outcome) for c in failed]
    # No call blocked longer than its timeout.
    slowest = max(c.duration for c in calls)
    assert slowest < timeout, f"a call took {slowest:.2f} s"
    # The pool served again within 2 s of the server accepting.
    for begun, ready in restarts:
        assert any(c.started < ready and c.ended > begun for c in calls)
        first = min(c.ended for c in calls if c.ok and c.ended >= ready)
        assert first - ready < 2.0, f"first success {first - ready:.2f} s after ready"
        print(
            f"restart took {ready - begun:.3f} s; first success "
            f"{first - ready:.3f} s after; slowest call {slowest:.3f} s; "
            f"{len(acked)} inserts; pool {stats}"
        )
    assert len(acked) > 100 * seconds  # the load really ran throughout
    server.drop_database(dbname)


def test_inserts_survive_a_fast_restart(dedicated: Dedicated) -> None:
    run_inserts_across_restarts(dedicated, 6.0, [2.5])


@pytest.mark.slow
@pytest.mark.xdist_group("slow")  # one after the other: each measures load
def test_inserts_survive_fast_restarts_for_20_seconds(dedicated: Dedicated) -> None:
    run_inserts_across_restarts(dedicated, 20.0, [5.0, 12.0])


def facade_calls(db: Database) -> Dict[str, Callable[[], Any]]:
    """A read and a write of the facade that it retries on transient errors."""
    row = {"op_id": str(uuid.uuid4()), "stage": "timeout", "duration_ms": 1}
    return {
        "count": lambda: db.count("processing_metrics"),
        "insert": lambda: db.insert("processing_metrics", row),
    }


@pytest.mark.parametrize("operation", ["count", "insert"])
def test_facade_call_on_a_busy_pool_waits_no_longer_than_the_timeout(
    make_pool: MakePool, pgaccess_dsn: str, operation: str
) -> None:
    # DESIGN, principle 4: a caller finding every connection out waits up to the
    # pool's timeout, then gets PoolTimeout. The facade must not multiply that wait.
    pool = make_pool(pgaccess_dsn, maxconn=1, timeout=0.3)
    call_it = facade_calls(Database(pool=pool))[operation]
    held = pool.acquire()
    try:
        call = timed(None, call_it)
    finally:
        pool.release(held)
    assert isinstance(call.outcome, PoolTimeout)
    assert call.duration < 0.3 + 0.2, f"waited {call.duration:.2f} s"


@pytest.mark.parametrize("operation", ["count", "insert"])
def test_facade_call_in_an_outage_fails_within_the_timeout(
    make_pool: MakePool,
    fault_proxy: FaultProxy,
    proxy_dsn: str,
    pgaccess_dsn: str,
    operation: str,
) -> None:
    pool = make_pool(proxy_dsn, maxconn=2, timeout=0.5)
    db = Database(pool=pool)
    call_it = facade_calls(db)[operation]
    assert backend_pid(pool) > 0  # connected once: what follows is an outage
    fault_proxy.refuse(None)
    fault_proxy.reset_all()
    try:
        call = timed(None, call_it)
    finally:
        fault_proxy.allow()
    assert isinstance(call.outcome, ConnectionFailed), repr(call.outcome)
    assert call.duration < 0.5 + 0.3, f"failed after {call.duration:.2f} s"
    assert operation == "count" or not admin_query(
        pgaccess_dsn, "SELECT 1 FROM processing_metrics WHERE stage = 'timeout'"
    )


# ------------------------------------------------ 2. crash mid-commit
SLOW_COMMITS = """
CREATE TABLE ledger (id bigserial PRIMARY KEY, op bigint NOT NULL);
-- A deferred trigger runs at COMMIT. It takes advisory lock 42 shared, so while the
-- test holds it exclusively every COMMIT waits in flight: the crash is sure to catch
-- some, whatever the machine's load. Otherwise a commit takes 30 ms.
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared(42); PERFORM pg_sleep(0.03);
RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER ledger_slow_commit AFTER INSERT ON ledger
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
-- And autocommit inserts of metrics, the same way: held in flight by the same lock.
CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared(42); PERFORM pg_sleep(0.03);
RETURN NEW; END $$;
CREATE TRIGGER metrics_slow_insert BEFORE INSERT ON processing_metrics
    FOR EACH ROW EXECUTE FUNCTION slow_insert();
"""


def test_crash_mid_commit_loses_no_acknowledged_commit(
    dedicated: Dedicated, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgaccess.retry")
    dbname = dedicated.new_database("crash")
    dedicated.execute(dbname, SLOW_COMMITS)
    db = Database(dsn=dedicated.dsn(dbname), maxconn=8, timeout=10, name="crash")
    ops = itertools.count(1)
    attempts: Dict[int, int] = {}
    ledger: List[Call] = []  # not idempotent: a transaction adding a row
    metrics: List[Call] = []  # idempotent: an insert with a unique client key
    stop = threading.Event()
    barrier = threading.Barrier(9)

    def add_to_ledger(tx: Any, op: int) -> None:
        attempts[op] = attempts.get(op, 0) + 1
        tx.insert("ledger", {"op": op}, returning=None)

    def ledger_worker() -> None:
        barrier.wait(timeout=30)
        while not stop.is_set():
            op = next(ops)
            ledger.append(timed(op, partial(db.run_in_transaction, add_to_ledger, op)))

    def metrics_worker() -> None:
        barrier.wait(timeout=30)
        while not stop.is_set():
            row = {"op_id": str(uuid.uuid4()), "stage": "crash", "duration_ms": 1}
            metrics.append(
                timed(row["op_id"], partial(db.insert, "processing_metrics", row))
            )

    workers = [threading.Thread(target=ledger_worker) for _ in range(6)]
    workers += [threading.Thread(target=metrics_worker) for _ in range(2)]
    for t in workers:
        t.start()
    barrier.wait(timeout=30)
    gate = psycopg2.connect(dedicated.dsn(dbname))
    gate.autocommit = True
    try:
        time.sleep(1.0)
        with gate.cursor() as cur:  # from now on every COMMIT and insert waits ...
            cur.execute("SELECT pg_advisory_lock(42)")
        time.sleep(0.5)
        dedicated.stop("immediate")  # ... when the crash comes: no goodbye
        time.sleep(0.3)
        dedicated.start()  # crash recovery
        back = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        join_all(workers, 60)
        gate.close()
    db.close()

    rows: Dict[int, int] = {}
    for (op,) in dedicated.execute(dbname, "SELECT op FROM ledger"):
        rows[op] = rows.get(op, 0) + 1
    assert [op for op, n in rows.items() if n > 1] == []  # nothing written twice
    outcomes: Dict[type, int] = {}
    for c in ledger:
        outcomes[type(c.outcome)] = outcomes.get(type(c.outcome), 0) + 1
        if c.ok:
            assert rows.get(c.key) == 1, f"acknowledged commit {c.key} lost"
        elif isinstance(c.outcome, CommitOutcomeUnknown):
            pass  # landed or not: the caller was told it cannot know
        else:
            # Never sent, or lost before COMMIT: nothing was committed.
            assert isinstance(c.outcome, EXPECTED_IN_FAULTS), repr(c.outcome)
            assert c.key not in rows
    # The crash hit commits in flight, and those were reported as unknown rather than
    # re-run: a re-run would have succeeded after the restart.
    assert outcomes.get(CommitOutcomeUnknown, 0) >= 1, outcomes
    assert any(c.ok and c.started > back for c in ledger)
    retried_unknown = [
        r.getMessage()
        for r in caplog.records
        if "CommitOutcomeUnknown" in r.getMessage()
    ]
    assert not [m for m in retried_unknown if "run_in_transaction" in m]

    # The idempotent inserts caught by the crash were re-run by their key: every
    # one returned, and each is there once.
    present = dict(
        dedicated.execute(dbname, "SELECT op_id::text, id FROM processing_metrics")
    )
    assert [c for c in metrics if not c.ok] == []
    assert all(present.get(c.key) == c.outcome for c in metrics)
    assert len(present) == len(metrics)
    assert [m for m in retried_unknown if "Facade.insert" in m], (
        "no insert was in flight"
    )
    dedicated.drop_database(dbname)


# --------------------------------------------- 3. terminated backends
def test_all_idle_backends_terminated_every_next_call_succeeds(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    pool = make_pool(pgaccess_dsn, maxconn=4, timeout=10)
    held = [pool.acquire() for _ in range(4)]
    before = {conn.get_backend_pid() for conn in held}
    for conn in held:
        pool.release(conn)
    admin_query(
        pgaccess_dsn,
        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid",
        (list(before),),
    )
    wait_for(lambda: not before & pgaccess_backends(pgaccess_dsn))

    # Eight threads at once, no retry: the pool itself must hide the dead ones.
    db = Database(pool=pool, retry_reads=False)
    barrier = threading.Barrier(8)
    calls: List[Call] = []

    def worker() -> None:
        barrier.wait(timeout=10)
        for _ in range(5):
            calls.append(
                timed(None, lambda: db.execute("SELECT pg_backend_pid() AS pid"))
            )

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    join_all(threads, 30)
    assert [c.outcome for c in calls if not c.ok] == []
    after = {c.outcome[0]["pid"] for c in calls}
    assert after and not after & before
    stats = pool.stats()
    assert stats["connections_lost"] == 4  # each dead one counted, exactly once
    assert stats["connections_discarded"] == 4
    assert stats["connections_opened"] == 4 + len(after) <= 8
    assert stats["in_use"] == 0 and stats["size"] <= 4


def test_backend_terminated_mid_query_fails_fast_and_is_replaced(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    pool = make_pool(pgaccess_dsn, maxconn=2, timeout=10)
    db = Database(pool=pool, retry_reads=False)
    marker = uuid.uuid4().hex
    sleeper = Sleeper(lambda: db.execute("SELECT pg_sleep(30), %s AS m", (marker,)))
    victim = active_backend(pgaccess_dsn, marker)
    terminated = time.monotonic()
    admin_query(pgaccess_dsn, "SELECT pg_terminate_backend(%s)", (victim,))
    call = sleeper.result(timeout=10)
    assert isinstance(call.outcome, ConnectionLost)
    assert not isinstance(call.outcome, CommitOutcomeUnknown)  # a read, not a write
    assert call.ended - terminated < 1.0
    stats = pool.stats()
    assert stats["connections_lost"] == 1 and stats["connections_discarded"] == 1
    assert stats["in_use"] == 0 and stats["size"] == 0  # discarded, never returned
    assert backend_pid(pool) != victim
    assert victim not in pgaccess_backends(pgaccess_dsn)


# ---------------------------------------------------------- 4. exhaustion
def test_exhausted_pool_times_out_exactly_the_excess_callers(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    existing = pgaccess_backends(pgaccess_dsn)
    pool = make_pool(pgaccess_dsn, maxconn=2, timeout=0.1)
    warm = [pool.acquire(), pool.acquire()]  # two idle connections to hand out
    for conn in warm:
        pool.release(conn)
    barrier = threading.Barrier(4)
    calls: List[Call] = []
    pids: Set[int] = set()

    def hold() -> int:
        with pool.connection() as conn:
            pids.add(conn.get_backend_pid())
            time.sleep(0.2)
        return 1

    def worker() -> None:
        barrier.wait(timeout=10)
        calls.append(timed(None, hold))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    join_all(threads, 10)
    timeouts = [c for c in calls if isinstance(c.outcome, PoolTimeout)]
    assert len(timeouts) == 2 and sum(c.ok for c in calls) == 2
    for c in timeouts:
        assert 0.1 <= c.duration <= 0.2, c.duration
    stats = pool.stats()
    assert stats["timeouts"] == 2 and stats["connections_opened"] == 2
    assert len(pids) == 2
    # On the server: this pool's sessions, no more than its maximum.
    assert pgaccess_backends(pgaccess_dsn) - existing == pids


# ------------------------------------------- 5. server unreachable 3 s
def test_unreachable_server_calls_fail_in_time_and_reconnects_back_off(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    timeout = 1.0
    pool = make_pool(proxy_dsn, maxconn=4, timeout=timeout)
    warm = [pool.acquire() for _ in range(4)]
    for conn in warm:
        pool.release(conn)
    calls: List[Call] = []
    refused: List[float] = []  # when each refused connection attempt was seen
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            calls.append(timed(None, lambda: backend_pid(pool, timeout)))
            time.sleep(0.01)

    def sampler() -> None:
        seen = 0
        while not stop.is_set():
            now = fault_proxy.connections_refused
            refused.extend([time.monotonic()] * (now - seen))
            seen = now
            time.sleep(0.002)

    fault_start = time.monotonic()
    fault_proxy.refuse(3.0)
    back = time.monotonic() + 3.0  # the proxy accepts again from here
    fault_proxy.reset_all()  # and the pool's connections die: it must reconnect
    threads = [threading.Thread(target=worker) for _ in range(4)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    time.sleep(back + 2.0 - time.monotonic())
    errors_at_back = pool.stats()["connect_errors"]
    stop.set()
    join_all(threads, 10)

    # Every call, failed or not, returned within its timeout (plus scheduling slack:
    # on a loaded 2-core machine a woken thread can wait a few hundred ms for a core).
    slowest = max(c.duration for c in calls)
    assert slowest <= timeout + 0.6, f"a call took {slowest:.2f} s"
    failed = [c for c in calls if not c.ok]
    assert failed and all(isinstance(c.outcome, EXPECTED_IN_FAULTS) for c in failed)
    assert not [c for c in calls if c.ok and fault_start + 0.1 < c.ended < back - 0.1]
    # Served again within 1 s of the server's return.
    first = min(c.ended for c in calls if c.ok and c.ended > back)
    assert first - back < 1.0, f"first success {first - back:.2f} s after the return"
    # Reconnects back off: one attempt at a time, spaced by a doubling delay
    # (capped at Backoff.MAX_DELAY), however many callers wait.
    during = [t for t in refused if t < back]
    assert errors_at_back == len(refused)
    assert 5 <= len(during) <= 16, len(during)
    half = fault_start + 1.5
    assert sum(t < half for t in during) > sum(t >= half for t in during)
    probes = [t for t in during if t > during[0] + 0.02]  # after the first burst
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert all(g <= Backoff.MAX_DELAY + 0.15 for g in gaps), gaps
    assert all(b >= a * 0.7 for a, b in zip(gaps, gaps[1:])), gaps
    print(
        f"slowest call {slowest:.3f} s; first success {first - back:.3f} s after the "
        f"return; {len(during)} connect attempts in 3 s, gaps {gaps}"
    )


# ------------------------------------------------------- 6. blackhole
# A real blackhole (tests/support/blackhole.py): packets dropped, nothing answers.
needs_blackhole = pytest.mark.skipif(
    blackhole_unavailable() is not None, reason=str(blackhole_unavailable())
)
needs_tcp_options = pytest.mark.skipif(
    not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options"
)

# A client on psycopg2's defaults: connects, says so, runs SELECT 1 when told.
PLAIN_CLIENT = r"""
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
cur = conn.cursor()
print("ready", flush=True)
sys.stdin.readline()
cur.execute("SELECT 1")
print("answered", cur.fetchone()[0], flush=True)
"""


def dead_peer_options(conn: Any) -> Dict[str, int]:
    """The dead-peer settings on a connection's own socket, as the kernel has them."""
    with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
        tcp = socket.IPPROTO_TCP
        return {
            "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "keepalives_idle": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
            "keepalives_interval": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
            "keepalives_count": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
            "tcp_user_timeout": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
        }


@needs_tcp_options
def test_dead_peer_settings_are_on_the_socket_and_yield_to_the_dsn(
    make_pool: MakePool, proxy_dsn: str
) -> None:
    defaults = {k: v for k, v in CONNECT_DEFAULTS.items() if k != "application_name"}
    plain = psycopg2.connect(proxy_dsn)
    try:
        assert dead_peer_options(plain)["tcp_user_timeout"] == 0  # psycopg2: none
    finally:
        plain.close()

    pool = make_pool(proxy_dsn, maxconn=1)
    with pool.connection() as conn, conn.cursor() as cur:
        assert dead_peer_options(conn) == defaults
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0] == CONNECT_DEFAULTS["application_name"]

    # What the DSN sets is kept; pgaccess fills in only the rest.
    mine = {"keepalives_idle": 30, "tcp_user_timeout": 20_000}
    dsn = psycopg2.extensions.make_dsn(proxy_dsn, application_name="mine", **mine)
    pool = make_pool(dsn, maxconn=1)
    with pool.connection() as conn, conn.cursor() as cur:
        assert dead_peer_options(conn) == {**defaults, **mine}
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0] == "mine"

    # And a keyword argument of the pool's overrides both.
    pool = make_pool(dsn, maxconn=1, keepalives_idle=7)
    with pool.connection() as conn:
        assert dead_peer_options(conn) == {**defaults, **mine, "keepalives_idle": 7}


@needs_blackhole
def test_blackholed_path_fails_a_statement_within_10_s_by_default(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    pool = make_pool(proxy_dsn, maxconn=1, timeout=30)
    db = Database(pool=pool, retry_reads=False)
    before = backend_pid(pool)
    plain = subprocess.Popen(
        [sys.executable, "-c", PLAIN_CLIENT, proxy_dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert plain.stdin is not None and plain.stdout is not None
    try:
        assert plain.stdout.readline().strip() == "ready"
        with blackhole(fault_proxy.port):
            plain.stdin.write("go\n")
            plain.stdin.flush()
            call = timed(None, lambda: db.execute("SELECT 1 AS one"))
            plain_waiting = plain.poll() is None
    finally:
        plain.kill()
        told, _ = plain.communicate(timeout=10)
    # Nothing acknowledged the statement: tcp_user_timeout (8 s) failed the call.
    assert isinstance(call.outcome, ConnectionLost), repr(call.outcome)
    assert 6.0 < call.duration < 10.0, call.duration
    # psycopg2's defaults, in the same blackhole at the same time: still waiting.
    assert plain_waiting and "answered" not in told
    print(f"statement into the blackhole failed after {call.duration:.2f} s")
    assert backend_pid(pool) != before  # the path is back: a new connection
    assert pool.stats()["connections_lost"] == 1


@needs_blackhole
def test_blackhole_during_a_long_statement_fails_it_within_10_s(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str, pgaccess_dsn: str
) -> None:
    pool = make_pool(proxy_dsn, maxconn=1, timeout=30)
    db = Database(pool=pool, retry_reads=False)
    marker = uuid.uuid4().hex
    sleeper = Sleeper(lambda: db.execute("SELECT pg_sleep(20), %s AS m", (marker,)))
    victim = active_backend(pgaccess_dsn, marker)  # sent and acknowledged
    try:
        with blackhole(fault_proxy.port):
            dark = time.monotonic()
            call = sleeper.result(timeout=15)
    finally:
        admin_query(pgaccess_dsn, "SELECT pg_terminate_backend(%s)", (victim,))
    # No data is in flight: the keepalive probes went unanswered, and the call failed.
    assert isinstance(call.outcome, ConnectionLost), repr(call.outcome)
    assert call.ended - dark < 10.0, call.ended - dark
    print(f"long statement failed {call.ended - dark:.2f} s into the blackhole")
    assert pool.stats()["connections_lost"] == 1


@needs_blackhole
def test_blackholed_path_fails_a_new_connection_within_the_dsns_connect_timeout(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    dsn = psycopg2.extensions.make_dsn(proxy_dsn, connect_timeout=2)
    pool = make_pool(dsn, maxconn=1, timeout=20)
    with blackhole(fault_proxy.port):  # the SYN is dropped: libpq waits
        call = timed(None, lambda: backend_pid(pool))
    assert isinstance(call.outcome, ConnectionFailed), repr(call.outcome)
    assert 1.5 < call.duration < 4.0, call.duration  # the DSN's 2 s, not the pool's
    assert backend_pid(pool) > 0


# A path that keeps acknowledging but forwards nothing (FaultProxy.stall: a proxy or
# middlebox that stopped): keepalives cannot see it; stall_timeout can.
def test_stalled_network_new_connection_fails_within_connect_timeout(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    pool = make_pool(proxy_dsn, maxconn=2, timeout=10, connect_timeout=2)
    held = pool.acquire()  # the pool has connected once: later failures are outages
    fault_proxy.stall()
    try:
        call = timed(None, lambda: backend_pid(pool, timeout=2))
    finally:
        fault_proxy.unstall()
        pool.release(held)
    assert isinstance(call.outcome, ConnectionFailed)
    assert 1.5 < call.duration < 4.0, call.duration  # libpq waits 2 s at least


def test_stalled_network_established_connection_fails_after_stall_timeout(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    pool = make_pool(proxy_dsn, maxconn=2, timeout=5, stall_timeout=1.0)
    db = Database(pool=pool, retry_reads=False)
    before = backend_pid(pool)
    fault_proxy.stall()  # no RST, no FIN: the proxy's kernel still ACKs everything
    try:
        call = timed(None, lambda: db.execute("SELECT pg_backend_pid() AS pid"))
    finally:
        fault_proxy.unstall()
    assert isinstance(call.outcome, ConnectionLost), repr(call.outcome)
    assert 0.9 < call.duration < 3.0, call.duration
    stats = pool.stats()
    assert stats["stalls_detected"] == 1 and stats["connections_lost"] == 1
    assert backend_pid(pool) != before  # the next call works, on a new connection


def test_stalled_network_without_stall_timeout_waits_for_the_path(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    # The documented limit: TCP keepalives and tcp_user_timeout cannot see a path
    # that keeps acknowledging, so without stall_timeout the call waits for it.
    pool = make_pool(proxy_dsn, maxconn=1, timeout=5)
    before = backend_pid(pool)
    fault_proxy.stall()
    sleeper = Sleeper(lambda: backend_pid(pool))
    sleeper.thread.join(2.0)
    assert sleeper.thread.is_alive()
    fault_proxy.unstall()
    assert sleeper.result(timeout=5).outcome == before


# ------------------------------------------------------------ 7. reset
def test_reset_mid_query_fails_at_once_and_the_next_call_reconnects(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str, pgaccess_dsn: str
) -> None:
    pool = make_pool(proxy_dsn, maxconn=2, timeout=5)
    db = Database(pool=pool, retry_reads=False)
    marker = uuid.uuid4().hex
    sleeper = Sleeper(lambda: db.execute("SELECT pg_sleep(3), %s AS m", (marker,)))
    victim = active_backend(pgaccess_dsn, marker)
    reset = time.monotonic()
    assert fault_proxy.reset_all() == 1
    call = sleeper.result(timeout=5)
    assert isinstance(call.outcome, ConnectionLost), repr(call.outcome)
    assert call.ended - reset < 0.1, call.ended - reset
    assert backend_pid(pool) != victim
    assert pool.stats()["connections_lost"] == 1


def test_reset_of_idle_connections_is_invisible_to_callers(
    make_pool: MakePool, fault_proxy: FaultProxy, proxy_dsn: str
) -> None:
    pool = make_pool(proxy_dsn, maxconn=3, timeout=5)
    held = [pool.acquire() for _ in range(3)]
    before = {conn.get_backend_pid() for conn in held}
    for conn in held:
        pool.release(conn)
    assert fault_proxy.reset_all() == 3
    db = Database(pool=pool, retry_reads=False)
    after = [db.execute("SELECT pg_backend_pid() AS pid")[0]["pid"] for _ in range(3)]
    assert not set(after) & before
    assert pool.stats()["connections_lost"] == 3


# ---------------------------------------------------- 8. return hygiene
def _aborted_transaction(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        with pytest.raises(psycopg2.errors.DivisionByZero):
            cur.execute("SELECT 1/0")
    assert (
        conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
    )


def _named_cursor_mid_result(conn: Any) -> None:
    conn.autocommit = False
    cur = conn.cursor("left_open")
    cur.execute("SELECT generate_series(1, 100000)")
    assert len(cur.fetchmany(10)) == 10  # the portal stays open on the server


def _copy_out_interrupted(conn: Any) -> None:
    class Broken(io.StringIO):
        def write(self, data: str) -> int:
            raise RuntimeError("disk full")

    with conn.cursor() as cur, pytest.raises(RuntimeError):
        cur.copy_expert("COPY (SELECT generate_series(1, 100000)) TO STDOUT", Broken())


def _set_session_in_autocommit(conn: Any) -> None:
    # psycopg2 sends SET default_transaction_... : server state, in autocommit.
    conn.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True)


def _session_properties_in_autocommit(conn: Any) -> None:
    conn.readonly = True
    conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ


def _client_side_attributes(conn: Any) -> None:
    conn.cursor_factory = psycopg2.extras.RealDictCursor
    conn.set_client_encoding("LATIN1")


@pytest.mark.parametrize(
    "dirty",
    [
        _aborted_transaction,
        _named_cursor_mid_result,
        _copy_out_interrupted,
        _set_session_in_autocommit,
        _session_properties_in_autocommit,
        _client_side_attributes,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_returned_connection_comes_back_clean(
    make_pool: MakePool, pgaccess_dsn: str, dirty: Callable[[Any], None]
) -> None:
    pool = make_pool(pgaccess_dsn, maxconn=1)
    with pool.connection() as conn:
        pid = conn.get_backend_pid()
        dirty(conn)
    with pool.connection() as conn, conn.cursor() as cur:
        assert conn.get_backend_pid() == pid  # cleaned and kept, not replaced
        assert conn.autocommit and conn.readonly is None
        assert conn.isolation_level is None and conn.deferrable is None
        assert conn.cursor_factory is None and type(cur) is psycopg2.extensions.cursor
        assert conn.encoding == "UTF8"
        cur.execute(
            "SELECT current_setting('default_transaction_read_only'), "
            "current_setting('default_transaction_isolation'), "
            "current_setting('default_transaction_deferrable'), "
            "current_setting('client_encoding'), "
            "(SELECT count(*) FROM pg_cursors)"
        )
        assert cur.fetchone() == ("off", "read committed", "off", "UTF8", 0)
        assert (
            conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        )
    stats = pool.stats()
    assert stats["connections_opened"] == 1 and stats["connections_discarded"] == 0


SESSION_STATE = [
    "SET search_path TO pg_catalog",
    "CREATE TEMP TABLE scratch_left (x int)",
    "SELECT pg_advisory_lock(424242)",
    "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
]
SESSION_PROBE = (
    "SELECT current_setting('search_path'), "
    "(to_regclass('pg_temp.scratch_left') IS NOT NULL)::int, "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    " AND pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_cursors)"
)


def test_sql_session_state_is_kept_unless_reset_session(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    # The decision (see ConnectionPool's docstring): session state made with SQL in
    # autocommit survives a return, since resetting it costs a round trip on every
    # return; pgaccess itself never relies on it (SET LOCAL in a transaction). A pool
    # made with reset_session=True runs DISCARD ALL on each return.
    for reset, expected in ((False, ("pg_catalog", 1, 1, 1)), (True, None)):
        pool = make_pool(pgaccess_dsn, maxconn=1, reset_session=reset)
        with pool.connection() as conn, conn.cursor() as cur:
            pid = conn.get_backend_pid()
            cur.execute(SESSION_PROBE)
            clean = cur.fetchone()
            for statement in SESSION_STATE:
                cur.execute(statement)
        with pool.connection() as conn, conn.cursor() as cur:
            assert conn.get_backend_pid() == pid
            cur.execute(SESSION_PROBE)
            assert cur.fetchone() == (expected or clean)
        pool.close()


def test_set_local_in_a_transaction_does_not_outlive_it(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    pool = make_pool(pgaccess_dsn, maxconn=1)
    db = Database(pool=pool)
    with db.transaction() as tx:
        tx.execute("SET LOCAL search_path TO pg_catalog")
        tx.execute("SET LOCAL statement_timeout = 1234")
    assert db.execute("SELECT current_setting('search_path') AS p")[0]["p"] != (
        "pg_catalog"
    )
    assert db.execute("SHOW statement_timeout")[0]["statement_timeout"] == "0"


# ------------------------------------------------------ 9. leak detection
def test_leak_is_reported_once_with_the_borrowers_stack(
    make_pool: MakePool, pgaccess_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgaccess.watch")
    pool = make_pool(pgaccess_dsn, maxconn=2, leak_threshold=0.2)
    conn = pool.acquire()  # the raw pair: the borrower is this function itself
    time.sleep(0.7)  # well past the threshold: still one report
    pool.release(conn)
    with pool.connection():
        time.sleep(0.05)  # under the threshold: no report
    time.sleep(0.3)
    with pool.connection():  # the context manager: the borrower is still this test
        time.sleep(0.5)
    time.sleep(0.1)
    reports = [r for r in caplog.records if r.name == "pgaccess.watch"]
    assert len(reports) == 2, [r.getMessage() for r in reports]
    for record in reports:
        assert record.levelno == logging.WARNING
        message = record.getMessage()
        assert "held for more than 0.2 s" in message and pool.name in message
        assert "test_leak_is_reported_once_with_the_borrowers_stack" in message
        # the borrower's frames, not the pool's
        assert "pool.py" not in message and "watch.py" not in message
    assert pool.stats()["leaks_reported"] == 2


def test_no_leak_report_without_the_option(
    make_pool: MakePool, pgaccess_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgaccess")
    pool = make_pool(pgaccess_dsn, maxconn=1)
    with pool.connection():
        time.sleep(0.5)
    assert [r for r in caplog.records if r.name == "pgaccess.watch"] == []
    assert pool.stats()["leaks_reported"] == 0
    monitors = [
        t for t in threading.enumerate() if t.name == f"pgaccess-monitor-{pool.name}"
    ]
    assert monitors == []  # no thread is started for an option not asked for


# --------------------------------------------- 10. a full server
def test_server_full_pool_runs_at_the_size_it_can_reach(make_pool: MakePool) -> None:
    settings = {
        "max_connections": 5,
        "superuser_reserved_connections": 0,
        "reserved_connections": 0,  # PostgreSQL 16+; the embedded server is 18
    }
    with dedicated_server(settings) as server:
        pool = make_pool(server.dsn(), maxconn=10, timeout=10)
        barrier = threading.Barrier(10)
        calls: List[Call] = []

        def query() -> int:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid(), pg_sleep(0.02)")
                return int(cur.fetchone()[0])

        def worker() -> None:
            barrier.wait(timeout=10)
            for _ in range(15):
                calls.append(timed(None, query))

        threads = [threading.Thread(target=worker) for _ in range(10)]
        for t in threads:
            t.start()
        join_all(threads, 60)
        stats = pool.stats()
        pool.close()
        assert [repr(c.outcome) for c in calls if not c.ok] == []
        assert max(c.duration for c in calls) < 10
        pids = {c.outcome for c in calls}
        assert 1 <= len(pids) <= 5
        assert stats["connect_errors"] >= 1  # "too many clients" was met ...
        assert stats["size"] <= 5 and stats["timeouts"] == 0  # ... and lived with
        wait_for(lambda: _no_backends_left(server))


def _no_backends_left(server: Dedicated) -> bool:
    try:  # the closed pool's sessions may hold the 5 slots a moment longer
        return not server.backends("postgres")
    except psycopg2.OperationalError:
        return False


# ------------------------------------------- 11. statement errors
def test_statement_errors_keep_the_connection(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    pool = make_pool(pgaccess_dsn, maxconn=1, statement_timeout=50)
    db = Database(pool=pool)
    pid = backend_pid(pool)
    with pytest.raises(UnknownTable):
        db.execute("SELECT * FROM no_such_table_here")
    assert backend_pid(pool) == pid
    with pytest.raises(QueryCanceled) as info:
        db.execute("SELECT pg_sleep(2)")  # the pool's statement_timeout: 50 ms
    assert info.value.sqlstate == "57014"
    assert backend_pid(pool) == pid
    with pytest.raises(QueryCanceled), db.transaction() as tx:
        tx.execute("SET LOCAL statement_timeout = 20")
        tx.execute("SELECT pg_sleep(2)")
    assert backend_pid(pool) == pid
    assert db.execute("SHOW statement_timeout")[0]["statement_timeout"] == "50ms"
    stats = pool.stats()
    assert stats["connections_opened"] == 1 and stats["connections_discarded"] == 0


def test_deadlock_keeps_both_connections(
    make_pool: MakePool, pgaccess_dsn: str, scratch_table: Callable[..., str]
) -> None:
    table = scratch_table("id int PRIMARY KEY, v int")
    pool = make_pool(pgaccess_dsn, maxconn=2, timeout=10)
    db = Database(pool=pool)
    db.execute_many(f'INSERT INTO "{table}" VALUES (%s, 0)', [(1,), (2,)])
    held = [pool.acquire(), pool.acquire()]
    pids = {conn.get_backend_pid() for conn in held}
    for conn in held:
        pool.release(conn)
    barrier = threading.Barrier(2)
    outcomes: List[Any] = []

    def worker(first: int, second: int) -> None:
        try:
            with db.transaction() as tx:
                tx.execute("SET LOCAL deadlock_timeout = '100ms'")
                tx.update(table, {"v": first}, {"id": first})
                barrier.wait(timeout=10)
                tx.update(table, {"v": first}, {"id": second})
            outcomes.append("committed")
        except DatabaseError as exc:
            outcomes.append(exc)

    threads = [
        threading.Thread(target=worker, args=(1, 2)),
        threading.Thread(target=worker, args=(2, 1)),
    ]
    for t in threads:
        t.start()
    join_all(threads, 30)
    assert sorted(type(o).__name__ for o in outcomes) == ["DeadlockDetected", "str"]
    assert isinstance(next(o for o in outcomes if o != "committed"), DeadlockDetected)
    held = [pool.acquire(), pool.acquire()]
    assert {conn.get_backend_pid() for conn in held} == pids  # both reused
    for conn in held:
        pool.release(conn)
    stats = pool.stats()
    assert stats["connections_opened"] == 2 and stats["connections_discarded"] == 0


# ------------------------------------------------------------- 16. fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)
def test_raw_fork_child_never_uses_the_parents_connections(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    pool = make_pool(pgaccess_dsn, maxconn=3)
    held = pool.acquire()  # one lent out at the fork ...
    parent_held = held.get_backend_pid()
    parent_idle = backend_pid(pool)  # ... and one idle in the pool
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read_end)
            result = {"backend": backend_pid(pool)}
            pool.release(held)  # its copy of the parent's lent connection
            pool.close()
            del held
            gc.collect()  # the parent's connection objects are freed here
            os.write(write_end, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)  # never back into pytest
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and "backend" in report
    assert report["backend"] not in (parent_idle, parent_held)
    with held.cursor() as cur:  # the lent connection still works ...
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] == parent_held
    pool.release(held)
    assert backend_pid(pool) in (parent_idle, parent_held)  # ... and the idle one
    assert {parent_idle, parent_held} <= pgaccess_backends(pgaccess_dsn)
    assert report["backend"] not in pgaccess_backends(pgaccess_dsn)
    stats = pool.stats()
    assert stats["connections_lost"] == 0 and stats["connections_opened"] == 2


FORK_SCRIPT = r"""
import gc, json, os, sys
from pgaccess import ConnectionPool, Database

mode = sys.argv[1]
pool = ConnectionPool(os.environ["FORK_DSN"], maxconn=3)
db = Database(pool=pool)  # the facade, made before the fork too

def backend():
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]

held = pool.acquire()  # one lent out at the fork, one idle
idle = backend()
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    os.close(read_end)
    report = {}
    if mode == "facade":
        report["backend"] = db.execute("SELECT pg_backend_pid() AS pid")[0]["pid"]
    elif mode != "idle":
        report["backend"] = backend()
    if mode == "release":
        pool.release(held)
    if mode == "close":
        pool.close()
    if mode == "del":
        del pool, held
        gc.collect()
    os.write(write_end, json.dumps(report).encode())
    os.close(write_end)
    sys.exit(0)  # a normal exit: atexit, finalizers, every object freed
os.close(write_end)
with os.fdopen(read_end) as pipe:
    report = json.loads(pipe.read())
_, status = os.waitpid(child, 0)
idle_conn = pool.acquire()  # both of the parent's connections, still alive:
after = []
for conn in (held, idle_conn):
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        after.append(cur.fetchone()[0])
    pool.release(conn)
stats = pool.stats()
print(json.dumps({
    "before": [held.get_backend_pid(), idle], "after": after,
    "child": report.get("backend"), "status": os.waitstatus_to_exitcode(status),
    "lost": stats["connections_lost"], "opened": stats["connections_opened"],
}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("mode", ["use", "facade", "release", "close", "del", "idle"])
def test_forked_child_exiting_normally_leaves_the_parent_alone(
    pgaccess_dsn: str, mode: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, mode],
        env=dict(os.environ, FORK_DSN=pgaccess_dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == 0
    # The parent's two sessions survived the child, whatever the child did.
    assert report["after"] == report["before"]
    assert report["lost"] == 0 and report["opened"] == 2
    if mode != "idle":
        assert report["child"] not in report["before"]
