"""The Patroni tier: a real HA manager over three nodes (``-m patroni``).

Not in ``make test`` (it needs Patroni and etcd, and a switchover takes seconds);
``make test-ha`` and ``.ci/run`` run it. The cluster (``tests/support/patroni.py``)
is shared by the module's tests, which run in order on one xdist worker; each test
reads the leader from Patroni and from the servers, never assumes it.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator, List, Optional, Tuple

import psycopg2
import pytest
from support.dedicated import admin_query
from support.patroni import PatroniCluster, patroni_cluster
from support.pgbouncer import per_node

pytestmark = [pytest.mark.patroni, pytest.mark.xdist_group("patroni")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[PatroniCluster]:
    t0 = time.monotonic()
    with patroni_cluster(3) as started:
        print(f"\npatroni: 3 nodes and etcd ready in {time.monotonic() - t0:.1f} s")
        yield started


@pytest.fixture(autouse=True)
def healed(request: pytest.FixtureRequest) -> None:
    """Each test using the shared cluster starts with every node up and streaming."""
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").heal()


def roles_of(
    cluster: PatroniCluster, exclude: Optional[str] = None
) -> List[Tuple[str, bool]]:
    """(node, in recovery), as each server says (but ``exclude``, a stopped one)."""
    query = "SELECT pg_is_in_recovery()"
    return [
        (n.name, admin_query(cluster.node_dsn(n.name), query)[0][0])
        for n in cluster.nodes
        if n.name != exclude
    ]


def test_a_leader_is_elected_and_the_others_stream_from_it(
    cluster: PatroniCluster,
) -> None:
    leader = cluster.wait_ready()
    assert [name for name, standby in roles_of(cluster) if not standby] == [leader]
    streaming = admin_query(
        cluster.node_dsn(leader),
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
    )
    assert sorted(r[0] for r in streaming) == sorted(
        n.name for n in cluster.nodes if n.name != leader
    )


def test_a_switchover_through_the_rest_api_moves_the_leader(
    cluster: PatroniCluster,
) -> None:
    old = cluster.wait_ready()
    new, took = cluster.switchover()
    print(f"\npatroni: switchover {old} -> {new} in {took:.2f} s")
    assert new != old
    assert [name for name, standby in roles_of(cluster) if not standby] == [new]
    assert took < 60  # Patroni's own bound is a few seconds; this is a loaded box


class Writer(threading.Thread):
    """Writes a row a few ms apart through one connection; reconnects on error.

    Records (time, server port) of every acknowledged write, and the errors.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.acked: List[Tuple[float, int, int]] = []
        self.errors: List[str] = []

    def run(self) -> None:
        conn: Optional[psycopg2.extensions.connection] = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg2.connect(self.dsn, connect_timeout=2)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    n += 1
                    cur.execute(
                        "INSERT INTO failover_writes (n) VALUES (%s) "
                        "RETURNING inet_server_port()",
                        (n,),
                    )
                    row = cur.fetchone()
                    assert row is not None
                    self.acked.append((time.monotonic(), int(row[0]), n))
            except psycopg2.Error as exc:
                self.errors.append(type(exc).__name__)
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(0.05)
            time.sleep(0.005)
        if conn is not None:
            conn.close()


def test_writes_through_a_multi_host_dsn_reach_the_new_leader_after_a_switchover(
    cluster: PatroniCluster,
) -> None:
    old = cluster.wait_ready()
    admin_query(
        cluster.node_dsn(old),
        "CREATE TABLE IF NOT EXISTS failover_writes (n int PRIMARY KEY)",
    )
    writer = Writer(cluster.dsn(target_session_attrs="read-write"))
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while len(writer.acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        t_switch = time.monotonic()
        new, took = cluster.switchover()
        new_port = cluster.node(new).pg_port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            port == new_port for _, port, _ in writer.acked
        ):
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        writer.stop.set()
        writer.join(30)
    old_port = cluster.node(old).pg_port
    on_old = [t for t, port, _ in writer.acked if port == old_port]
    on_new = [t for t, port, _ in writer.acked if port == new_port]
    assert on_old and on_new, (writer.errors, len(writer.acked))
    # Once a write reached the new leader, none went anywhere else.
    first_new = min(on_new)
    assert all(port == new_port for t, port, _ in writer.acked if t >= first_new)
    gap = first_new - max(t for t in on_old if t < first_new)
    print(
        f"\npatroni: writes through target_session_attrs=read-write: last on "
        f"{old}, first on {new} {gap:.2f} s later (switchover call {took:.2f} s, "
        f"from its start {first_new - t_switch:.2f} s); errors meanwhile: "
        f"{len(writer.errors)}"
    )
    assert gap < 60
    # Every acknowledged write is on the new leader (a switchover loses nothing).
    acked = {n for _, _, n in writer.acked}
    rows = admin_query(cluster.node_dsn(new), "SELECT n FROM failover_writes")
    assert acked <= {r[0] for r in rows}


def wait_for_new_leader(cluster: PatroniCluster, old: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        leader = cluster.leader()
        if leader is not None and leader != old:
            return leader
        assert time.monotonic() < deadline, f"no new leader {timeout:.0f} s after {old}"
        time.sleep(0.1)


def test_a_stopped_leader_hands_over_and_rejoins(cluster: PatroniCluster) -> None:
    old = cluster.wait_ready()
    t0 = time.monotonic()
    cluster.stop_node(old)  # SIGTERM: Patroni stops PostgreSQL, gives the key up
    new = wait_for_new_leader(cluster, old, 60)
    assert cluster.wait_ready(replicas=1) == new
    print(
        f"\npatroni: SIGTERM of the leader {old}: {new} leads after "
        f"{time.monotonic() - t0:.2f} s"
    )
    assert [
        name for name, standby in roles_of(cluster, exclude=old) if not standby
    ] == [new]
    cluster.start_node(old)
    assert cluster.wait_ready() == new  # the old leader streams again


def test_a_killed_leader_is_replaced_within_the_ttl_and_rejoins(
    cluster: PatroniCluster,
) -> None:
    old = cluster.wait_ready()
    admin_query(cluster.node_dsn(old), "CREATE TABLE IF NOT EXISTS kill_probe (n int)")
    t0 = time.monotonic()
    cluster.kill_node(old)  # SIGKILL of Patroni and of its postmaster
    new = wait_for_new_leader(cluster, old, cluster.TTL * 4)
    assert cluster.wait_ready(replicas=1) == new
    took = time.monotonic() - t0
    print(
        f"\npatroni: SIGKILL of the leader {old}: {new} leads after {took:.2f} s "
        f"(ttl {cluster.TTL} s)"
    )
    admin_query(cluster.node_dsn(new), "INSERT INTO kill_probe VALUES (1)")
    t1 = time.monotonic()
    cluster.start_node(old)
    assert cluster.wait_ready() == new
    print(f"patroni: {old} back as a replica after {time.monotonic() - t1:.2f} s")
    rows = admin_query(cluster.node_dsn(old), "SELECT pg_is_in_recovery()")
    assert rows == [(True,)]


def test_a_synchronous_cluster_behind_per_node_pgbouncers() -> None:
    """``synchronous=True``: Patroni keeps one synchronous standby; PgBouncers work."""
    with patroni_cluster(3, synchronous=True) as sync_cluster:
        leader = sync_cluster.wait_ready()
        deadline = time.monotonic() + 60
        while True:
            states = admin_query(
                sync_cluster.node_dsn(leader),
                "SELECT sync_state FROM pg_stat_replication",
            )
            roles = sorted(m["role"] for m in sync_cluster.members())
            if sorted(s for (s,) in states) == ["async", "sync"] and roles == [
                "leader",
                "replica",
                "sync_standby",
            ]:
                break
            assert time.monotonic() < deadline, (states, roles)
            time.sleep(0.1)
        assert admin_query(
            sync_cluster.node_dsn(leader), "SHOW synchronous_standby_names"
        ) != [("",)]
        dsns = [sync_cluster.node_dsn(n.name) for n in sync_cluster.nodes]
        with per_node(dsns, pool_size=2) as bouncers:
            through = [
                admin_query(b.dsn(), "SELECT pg_is_in_recovery()")[0][0]
                for b in bouncers
            ]
        assert through == [n.name != leader for n in sync_cluster.nodes]
