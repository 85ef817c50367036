"""Scale-out on one server: the statement timeout as SET LOCAL, pool roles, the drain
on SQLSTATE 25006, the read pool's routing, and the transaction-pooler refusals.

Standbys, failover and PgBouncer are in tests/scenarios/test_scaleout.py.
"""

from __future__ import annotations

import uuid

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from support.dedicated import admin_query

from pgaccess import (
    ConnectionFailed,
    ConnectionPool,
    Database,
    InvalidQuery,
    QueryCanceled,
    ReadOnlyNode,
)
from pgaccess.jobs import Worker

# ------------------------------------------------------------ statement timeout


def test_the_statement_timeout_cuts_a_statement_and_leaves_the_session_alone(
    pgaccess_dsn: str,
) -> None:
    with Database(dsn=pgaccess_dsn, statement_timeout=100, maxconn=1) as db:
        with pytest.raises(QueryCanceled):
            db.execute("SELECT pg_sleep(2)")
        with pytest.raises(QueryCanceled), db.transaction() as tx:
            tx.execute("SELECT pg_sleep(2)")
        # Every statement carries it ...
        assert db.execute("SHOW statement_timeout") == [{"statement_timeout": "100ms"}]
        # ... and none leaves it in the session, as a startup option or SET would:
        # the one connection, used raw, has the server's default.
        with db.pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("0",)
        assert db.pool.stats()["connections_opened"] == 1


def test_statements_that_refuse_a_transaction_block_still_run(
    pgaccess_dsn: str,
) -> None:
    """VACUUM cannot run in the implicit transaction SET LOCAL needs: it goes alone."""
    with Database(dsn=pgaccess_dsn, statement_timeout=5000, maxconn=1) as db:
        db.execute("VACUUM video_job")
        assert db.insert_many("video_job", [{"src_hash": uuid.uuid4().hex}]) == 1


def test_the_guide_connection_block_has_the_timeout_for_its_transaction(
    pgaccess_dsn: str,
) -> None:
    with ConnectionPool(pgaccess_dsn, maxconn=1, statement_timeout=150) as pool:
        with pool.get_connection() as conn, conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("150ms",)
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == ("0",)


# ------------------------------------------------------------ roles


def test_a_pool_that_needs_a_standby_refuses_the_primary(pgaccess_dsn: str) -> None:
    with (
        ConnectionPool(pgaccess_dsn, role="standby", timeout=1) as pool,
        pytest.raises(ConnectionFailed, match="primary"),
    ):
        pool.acquire()


def test_the_connector_tries_the_next_host_for_the_role(pgaccess_dsn: str) -> None:
    """The first host refuses connections; the second is the primary."""
    given = parse_dsn(pgaccess_dsn)
    dead = "127.0.0.1"
    with socket_port() as closed_port:
        dsn = str(
            make_dsn(
                pgaccess_dsn,
                host=f"{dead},{given['host']}",
                port=f"{closed_port},{given['port']}",
                target_session_attrs="read-write",
            )
        )
        with ConnectionPool(dsn, maxconn=1, timeout=10) as pool:
            assert pool.role == "primary"
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                assert cur.fetchone() == (False,)


class socket_port:
    """A TCP port on 127.0.0.1 that refuses connections while the block runs."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# --------------------------------------------------- 25006: drain and retry


def test_a_refused_write_reconnects_the_pool_and_runs_once(db: Database) -> None:
    """A plain insert (not idempotent) refused with 25006 is run again once the pool
    has reconnected: nothing was written the first time. The pool's connections are
    made read-only sessions first, which is what connections to a demoted primary
    are: without the drain, every retry would meet the same refusal."""
    pool = db.pool
    held = [pool.acquire() for _ in range(pool.maxconn)]
    for conn in held:
        with conn.cursor() as cur:
            cur.execute("SET default_transaction_read_only = on")
    for conn in held:
        pool.release(conn)
    before = pool.stats()
    key = uuid.uuid4().hex
    db.insert("video_job", {"src_hash": key})
    after = pool.stats()
    assert db.count("video_job", {"src_hash": key}) == 1
    assert after["drains"] - before["drains"] == 1
    assert after["connections_opened"] > before["connections_opened"]
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SHOW default_transaction_read_only")
        assert cur.fetchone() == ("off",)


def test_a_read_only_transaction_is_the_callers_error_not_a_failover(
    db: Database,
) -> None:
    before = db.pool.stats()["drains"]
    with pytest.raises(ReadOnlyNode) as caught, db.transaction(read_only=True) as tx:
        tx.insert("video_job", {"src_hash": uuid.uuid4().hex})
    assert not caught.value.reconnected
    assert db.pool.stats()["drains"] == before


# ------------------------------------------------------------ the read pool


def test_reads_go_to_the_read_pool_writes_and_transactions_to_the_primary(
    pgaccess_dsn: str,
) -> None:
    """One server serves as both here (prefer-standby takes the primary when no
    standby answers): the pools' counts tell where each call went."""
    key = uuid.uuid4().hex
    with Database(dsn=pgaccess_dsn, read_dsn=pgaccess_dsn, maxconn=2) as db:
        assert db.pool.role == "primary" and db.read_pool is not None
        assert db.read_pool.role == "prefer-standby"
        writes0 = db.pool.stats()["requests"]
        reads0 = db.read_pool.stats()["requests"]
        db.insert("video_job", {"src_hash": key})
        assert db.pool.stats()["requests"] > writes0
        assert db.find_one("video_job", {"src_hash": key}) is not None
        assert db.count("video_job", {"src_hash": key}) == 1
        assert db.read_pool.stats()["requests"] - reads0 == 2
        with db.transaction() as tx:
            tx.update("video_job", {"priority": 5}, {"src_hash": key})
            # Inside the transaction, reads join it: they see its own write.
            assert db.find_one("video_job", {"src_hash": key})["priority"] == 5
        assert db.read_pool.stats()["requests"] - reads0 == 2
        assert db.write_token() != "0/0"
        assert db.stats()["read_pool"]["lagging_reads"] == 0


def test_a_read_that_writes_goes_to_the_primary(pgaccess_dsn: str) -> None:
    """A standby refuses nextval(): the read pool here is forced read-only per
    session, as a standby is, and the router re-runs the statement on the primary."""
    name = f"seq_{uuid.uuid4().hex[:8]}"
    admin_query(pgaccess_dsn, f"CREATE SEQUENCE {name}")
    try:
        with Database(
            dsn=pgaccess_dsn,
            read_dsn=str(
                make_dsn(pgaccess_dsn, options="-c default_transaction_read_only=on")
            ),
        ) as db:
            assert db.execute(f"SELECT nextval('{name}') AS n") == [{"n": 1}]
            assert db.router is not None and db.router.refused == 1
            assert db.read_pool is not None and db.read_pool.stats()["drains"] == 0
    finally:
        admin_query(pgaccess_dsn, f"DROP SEQUENCE {name}")


# ------------------------------------------------ a transaction-mode pooler


@pytest.mark.parametrize(
    "statement",
    [
        "LISTEN anything",
        "SELECT pg_advisory_lock(1)",
        "select pg_try_advisory_lock_shared(1, 2)",
        "SET statement_timeout = 5",
        "RESET ALL",
        "PREPARE p AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t (x int)",
    ],
)
def test_a_transaction_pooler_refuses_session_state(
    pgaccess_dsn: str, statement: str
) -> None:
    with Database(dsn=pgaccess_dsn, pooler="transaction", maxconn=1) as db:
        with pytest.raises(InvalidQuery, match="needs a session"):
            db.execute(statement)
        # What is local to a transaction stays allowed.
        with db.transaction() as tx:
            tx.execute("SET LOCAL statement_timeout = 5000")
            tx.execute("SELECT pg_advisory_xact_lock(1)")
            tx.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
        with db.pool.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            assert cur.fetchone() == (0,)


def test_a_worker_behind_a_transaction_pooler_needs_a_session_dsn(
    pgaccess_dsn: str,
) -> None:
    with (
        Database(dsn=pgaccess_dsn, pooler="transaction", maxconn=2) as db,
        pytest.raises(InvalidQuery, match="listen_dsn"),
    ):
        Worker(db, lambda job: None, threads=1).start()
    with Database(
        dsn=pgaccess_dsn, pooler="transaction", session_dsn=pgaccess_dsn, maxconn=2
    ) as db:
        worker = Worker(db, lambda job: None, threads=1)
        worker.start()
        try:
            assert worker.listener is not None and worker.listener.connected.wait(10)
        finally:
            worker.stop()
            worker.join(10)


def test_a_bad_pooler_setting_is_refused(pgaccess_dsn: str) -> None:
    with pytest.raises(ValueError, match="pooler must be one of"):
        ConnectionPool(pgaccess_dsn, pooler="statement-mode")


def test_a_raw_session_on_a_dead_port_fails_fast() -> None:
    """Sanity of the helper above: the port refuses (not a hang)."""
    with socket_port() as port, pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=port, connect_timeout=3)
