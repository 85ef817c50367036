"""The test topologies themselves: a streaming standby, promotion, rejoin.

The scale-out tests stand on these; each fact they rely on is checked here against
the servers (``pg_is_in_recovery()``, ``pg_stat_replication``, rows), not against the
helpers' own bookkeeping.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg2
import psycopg2.errors
import pytest
import support.patroni
import support.pgbouncer
from psycopg2.extensions import make_dsn, parse_dsn
from support.dedicated import admin_query
from support.pgbouncer import per_node, running_pgbouncer
from support.tools import skip_unless_available

from pgaccess.embedded import EmbeddedServer, EmbeddedUnavailable, scratch_dir

if TYPE_CHECKING:
    from support.pgbouncer import PgBouncer
    from support.topology import Replicated

# A plugin, not an import: pytest rewrites its asserts only if it loads it first.
pytest_plugins = ["support.topology"]


def test_a_row_written_on_the_primary_is_read_on_the_standby(
    replicated: Replicated,
) -> None:
    primary, standby = replicated
    assert not primary.in_recovery() and standby.in_recovery()
    replicated.query(primary, "CREATE TABLE seen (x int)")
    replicated.query(primary, "INSERT INTO seen VALUES (42)")
    replicated.catch_up()
    assert replicated.query(standby, "SELECT x FROM seen") == [(42,)]
    # The standby is a standby: the server refuses writes there (SQLSTATE 25006).
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        replicated.query(standby, "INSERT INTO seen VALUES (1)")
    # The pipeline's schema is on both, and the multi-host DSN finds the primary.
    dsn = replicated.multi_host_dsn(target_session_attrs="read-write")
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), count(*) FROM video_job")
            assert cur.fetchone() == (False, 0)
    finally:
        conn.close()


def test_replication_logs_in_with_the_password_of_a_file_only_its_user_reads(
    replicated: Replicated,
) -> None:
    primary, standby = replicated
    rows = primary.query("SELECT usename, state FROM pg_stat_replication")
    assert rows == [("postgres", "streaming")]
    rules = primary.query(
        "SELECT type, auth_method FROM pg_hba_file_rules "
        "WHERE 'replication' = ANY(database)"
    )
    assert {method for _, method in rules} == {"scram-sha-256"}
    assert "local" in {kind for kind, _ in rules}
    st = standby.server_passfile.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == (standby._uid if os.geteuid() == 0 else os.getuid())
    assert standby.passfile.read_text() == standby.server_passfile.read_text()


def test_promote_makes_the_standby_writable(replicated: Replicated) -> None:
    primary, standby = replicated
    replicated.query(primary, "CREATE TABLE kept (x int)")
    replicated.query(primary, "INSERT INTO kept VALUES (1)")
    replicated.catch_up()
    primary.stop("immediate")  # the primary dies
    standby.promote()
    assert not standby.in_recovery()
    replicated.query(standby, "INSERT INTO kept VALUES (2)")
    assert replicated.query(standby, "SELECT x FROM kept ORDER BY x") == [(1,), (2,)]


def test_rejoin_makes_the_old_primary_a_standby_of_the_new_one(
    replicated: Replicated,
) -> None:
    old, new = replicated
    replicated.query(old, "CREATE TABLE t (x text)")
    replicated.catch_up()
    new.promote()
    # Split brain for a moment: the old primary still takes a write that the new
    # one never sees; rejoining rewinds it away.
    replicated.query(old, "INSERT INTO t VALUES ('lost')")
    replicated.query(new, "INSERT INTO t VALUES ('after')")
    old.rejoin(new)
    assert old.in_recovery() and not new.in_recovery()
    replicated.query(new, "INSERT INTO t VALUES ('streamed')")
    old.wait_for_replay(new)
    assert replicated.query(old, "SELECT x FROM t ORDER BY x") == [
        ("after",),
        ("streamed",),
    ]
    streaming = new.query(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
    )
    assert streaming == [(old.name,)]
    assert replicated.healthy() and replicated.primary is new


def test_a_clean_switchover_keeps_every_row_and_swaps_the_roles(
    replicated: Replicated,
) -> None:
    first = replicated.primary
    replicated.query(first, "CREATE TABLE t (x int)")
    replicated.query(first, "INSERT INTO t SELECT generate_series(1, 100)")
    replicated.switchover()
    assert replicated.standby is first and first.in_recovery()
    replicated.query(replicated.primary, "INSERT INTO t VALUES (101)")
    replicated.catch_up()
    assert replicated.query(first, "SELECT count(*) FROM t") == [(101,)]


def test_a_synchronous_standby_holds_the_primarys_commits(
    replicated_sync: Replicated,
) -> None:
    primary, standby = replicated_sync
    assert primary.query("SHOW synchronous_commit") == [("on",)]
    # Copied by pg_basebackup and cleared: promoted, it waits for nobody.
    assert standby.query("SHOW synchronous_standby_names") == [("",)]
    replicated_sync.query(primary, "CREATE TABLE t (x int)")
    standby.stop()
    done = threading.Event()

    def insert() -> None:
        replicated_sync.query(primary, "INSERT INTO t VALUES (1)")
        done.set()

    writer = threading.Thread(target=insert, daemon=True)
    writer.start()
    try:
        # Without its synchronous standby the commit is not acknowledged.
        assert not done.wait(1.0)
    finally:
        standby.start()
    assert done.wait(60), "the commit was not acknowledged after the standby came back"
    writer.join(10)
    assert replicated_sync.query(standby, "SELECT x FROM t") == [(1,)]


def test_a_replica_needs_a_replication_node() -> None:
    root = scratch_dir("pgaccess-norepl-")
    server = EmbeddedServer(root / "data", durable=False)
    try:
        server.start()
        with pytest.raises(EmbeddedUnavailable, match="replication=True"):
            server.replica(root / "standby")
        assert not (root / "standby").exists()
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ PgBouncer
def test_a_query_through_pgbouncer_reaches_the_server(
    pgbouncer: PgBouncer, pgbouncer_dsn: str
) -> None:
    dbname = parse_dsn(pgbouncer_dsn)["dbname"]
    conn = psycopg2.connect(make_dsn(pgbouncer_dsn, application_name="through"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT current_database(), to_regclass('video_job')::text")
            assert cur.fetchone() == (dbname, "video_job")
            clients = pgbouncer.admin("SHOW CLIENTS")
            assert any(c["application_name"] == "through" for c in clients)
            servers = pgbouncer.admin("SHOW SERVERS")
            assert any(s["database"] == dbname for s in servers)
            # The server's end: a backend of PgBouncer's, with the client's
            # application_name (a parameter PgBouncer tracks and sets per client).
            backends = admin_query(
                pgbouncer.target_dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name = 'through'",
                (dbname,),
            )
            assert backends == [(1,)]
    finally:
        conn.close()


def test_pgbouncer_stops_by_its_pid(pgaccess_dsn: str) -> None:
    with running_pgbouncer(pgaccess_dsn) as bouncer:
        assert bouncer.admin("SHOW CONFIG")  # the admin console answers
        pid = bouncer.pid
        assert pid is not None
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_session_set_leaks_between_clients_in_transaction_mode(
    pgaccess_dsn: str,
) -> None:
    """The hazard the library must avoid: session state outlives the client's turn.

    With one server connection, a ``SET`` one client sends outside a transaction is
    what the next client, another connection, finds on the shared backend.
    """
    dbname = parse_dsn(pgaccess_dsn)["dbname"]
    with running_pgbouncer(pgaccess_dsn, pool_size=1) as bouncer:
        first = psycopg2.connect(bouncer.dsn(dbname))
        second = psycopg2.connect(bouncer.dsn(dbname))
        try:
            first.autocommit = second.autocommit = True
            with first.cursor() as a, second.cursor() as b:
                a.execute("SELECT pg_backend_pid()")
                b.execute("SELECT pg_backend_pid()")
                assert a.fetchone() == b.fetchone()  # one backend for both
                b.execute("SHOW statement_timeout")
                assert b.fetchone() == ("0",)
                a.execute("SET statement_timeout = '1234ms'")
                b.execute("SHOW statement_timeout")
                assert b.fetchone() == ("1234ms",)
                # SET LOCAL, inside the client's own transaction, does not leak.
                a.execute("RESET statement_timeout")
                a.execute("BEGIN; SET LOCAL statement_timeout = '999ms'; COMMIT")
                b.execute("SHOW statement_timeout")
                assert b.fetchone() == ("0",)
        finally:
            first.close()
            second.close()


def test_pgbouncer_gives_up_after_its_query_wait_timeout(pgaccess_dsn: str) -> None:
    dbname = parse_dsn(pgaccess_dsn)["dbname"]
    with running_pgbouncer(
        pgaccess_dsn, pool_size=1, query_wait_timeout=1, server_login_retry=2
    ) as bouncer:
        config = {r["key"]: r["value"] for r in bouncer.admin("SHOW CONFIG")}
        assert (config["query_wait_timeout"], config["server_login_retry"]) == (
            "1",
            "2",
        )
        holder = psycopg2.connect(bouncer.dsn(dbname))  # holds the one server
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1")  # a transaction left open
            waiter = psycopg2.connect(bouncer.dsn(dbname))
            t0 = time.monotonic()
            # PgBouncer sends the reason and hangs up; libpq may report either.
            with pytest.raises(psycopg2.OperationalError), waiter.cursor() as cur:
                cur.execute("SELECT 1")
            waited = time.monotonic() - t0
            waiter.close()
            assert "query_wait_timeout" in bouncer.log()
        finally:
            holder.close()
    assert 0.5 < waited < 30  # its own 1 s, not PgBouncer's default 120 s


def test_one_pgbouncer_per_node_reaches_its_own_node(replicated: Replicated) -> None:
    with per_node(replicated.nodes, pool_size=2) as bouncers:
        roles = [
            admin_query(b.dsn(replicated.dbname), "SELECT pg_is_in_recovery()")[0][0]
            for b in bouncers
        ]
        assert roles == [node.in_recovery() for node in replicated.nodes]
        assert sorted(roles) == [False, True]


def test_a_missing_program_skips_with_its_reason_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(support.pgbouncer, "pgbouncer_program", lambda: None)
    monkeypatch.setattr(support.patroni, "_etcd_program", lambda: None)
    reasons = [support.pgbouncer.pgbouncer_unavailable()]
    if importlib.util.find_spec("patroni") is not None:
        reasons.append(support.patroni.patroni_unavailable())
    for reason in reasons:
        assert reason is not None and "apt-get install" in reason
        monkeypatch.setenv("PGACCESS_CI", "0")
        with pytest.raises(pytest.skip.Exception, match="is not installed"):
            skip_unless_available(reason)
        monkeypatch.setenv("PGACCESS_CI", "1")
        with pytest.raises(pytest.fail.Exception, match="CI must have it"):
            skip_unless_available(reason)


def test_a_killed_test_run_leaves_no_replicated_pair_behind() -> None:
    script = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from support.topology import replicated_pair\n"
        "with replicated_pair() as pair:\n"
        "    print(pair.root, *(n.datadir / 'postmaster.pid' for n in pair.nodes),"
        " flush=True)\n"
        "    time.sleep(600)\n"
    )
    tests = str(Path(__file__).parent)
    with subprocess.Popen(
        [sys.executable, "-c", script, tests], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            root, *pidfiles = child.stdout.readline().split()
            pids = [int(Path(p).read_text().split()[0]) for p in pidfiles]
        finally:
            child.kill()  # SIGKILL: no finally block of its runs
    deadline = time.monotonic() + 60
    while Path(root).exists() or any(map(alive, pids)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not Path(root).exists()
    assert [pid for pid in pids if alive(pid)] == []  # both postmasters are gone


def alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"
