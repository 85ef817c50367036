"""Scale-out against real topologies: a streaming standby, failover, PgBouncer in
transaction mode (one server, or one per node).

The topologies come from tests/support/topology.py (a primary and a standby of the
embedded PostgreSQL) and tests/support/pgbouncer.py (Debian's pgbouncer; skipped with
the reason where it is missing, a failure under .ci/run).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from support.pgbouncer import per_node, running_pgbouncer

from pgaccess import (
    ConnectionLost,
    Database,
    DatabaseError,
    InvalidQuery,
    QueryCanceled,
)
from pgaccess.jobs import VideoJobs, Worker

if TYPE_CHECKING:
    from support.topology import Replicated

# A plugin, not an import: pytest rewrites its asserts only if it loads it first.
pytest_plugins = ["support.topology"]


# ------------------------------------------------------- reads on a standby


def test_a_thread_reads_its_own_writes_on_the_standby(replicated: Replicated) -> None:
    """Every read right after the thread's own write sees it (no stale read in 300),
    and the reads are served by the standby's pool."""
    primary, standby = replicated
    with Database(
        dsn=replicated.dsn(primary), read_dsn=replicated.dsn(standby), maxconn=2
    ) as db:
        assert db.read_pool is not None and db.router is not None
        reads0 = db.read_pool.stats()["requests"]
        missing = []
        for i in range(300):
            key = f"ryw-{i}-{uuid.uuid4().hex[:6]}"
            db.insert("video_job", {"src_hash": key})
            if db.find_one("video_job", {"src_hash": key}) is None:
                missing.append(key)
        assert missing == []
        served = db.read_pool.stats()["requests"] - reads0
        # A read the standby could not serve within read_wait went to the primary.
        assert served + db.router.lagging >= 300
        # Most on an idle machine (all but 0-1 of 300); a loaded CI machine's standby
        # may lag past read_wait more often, and those reads go to the primary.
        assert served >= 30, (served, db.router.lagging)
        with db.read_pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            assert cur.fetchone() == (True,)


def test_a_token_carries_read_your_writes_to_another_thread(
    replicated: Replicated,
) -> None:
    primary, standby = replicated
    with Database(
        dsn=replicated.dsn(primary), read_dsn=replicated.dsn(standby), maxconn=2
    ) as db:
        seen: List[Optional[Dict[str, Any]]] = []
        for i in range(50):
            key = f"tok-{i}-{uuid.uuid4().hex[:6]}"
            db.insert("video_job", {"src_hash": key})
            token = db.write_token()

            def read(key: str = key, token: str = token) -> None:
                db.read_after(token)
                seen.append(db.find_one("video_job", {"src_hash": key}))

            reader = threading.Thread(target=read)
            reader.start()
            reader.join(30)
        assert len(seen) == 50 and all(row is not None for row in seen)


def test_a_read_that_writes_goes_to_the_primary_from_a_standby(
    replicated: Replicated,
) -> None:
    primary, standby = replicated
    replicated.query(primary, "CREATE SEQUENCE IF NOT EXISTS scaleout_seq")
    replicated.catch_up()
    with Database(dsn=replicated.dsn(primary), read_dsn=replicated.dsn(standby)) as db:
        first = db.execute("SELECT nextval('scaleout_seq') AS n")[0]["n"]
        assert db.execute("SELECT nextval('scaleout_seq') AS n") == [{"n": first + 1}]
        assert db.router is not None and db.router.refused == 2


# ---------------------------------------------------------------- failover


def _writer(
    db: Database,
    stop: threading.Event,
    acked: List[str],
    failures: List[str],
    first_ok_after: Dict[str, float],
    promoted: threading.Event,
) -> None:
    n = 0
    while not stop.is_set():
        key = f"w-{threading.get_ident()}-{n}"
        n += 1
        try:
            db.insert("video_job", {"src_hash": key})
        except DatabaseError as exc:
            failures.append(type(exc).__name__)
            time.sleep(0.01)
            continue
        acked.append(key)
        if promoted.is_set() and "at" not in first_ok_after:
            first_ok_after["at"] = time.monotonic()


def test_failover_under_write_load_loses_no_acknowledged_write(
    replicated_sync: Replicated,
) -> None:
    """Four threads insert through a multi-host DSN while the primary is stopped
    (immediate) and the synchronous standby promoted: every acknowledged insert is on
    the new primary, and writes succeed again within seconds of the promotion."""
    old, new = replicated_sync.primary, replicated_sync.standby
    dsn = replicated_sync.multi_host_dsn(target_session_attrs="read-write")
    with Database(dsn=dsn, maxconn=4, timeout=30, connect_timeout=2) as db:
        stop, promoted = threading.Event(), threading.Event()
        acked: List[str] = []
        failures: List[str] = []
        first_ok: Dict[str, float] = {}
        threads = [
            threading.Thread(
                target=_writer, args=(db, stop, acked, failures, first_ok, promoted)
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            before = len(acked)
            old.stop("immediate")
            new.promote()
            promoted_at = time.monotonic()
            promoted.set()
            deadline = time.monotonic() + 30
            while "at" not in first_ok and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert before > 0 and "at" in first_ok, (before, failures[-5:])
        back_after = first_ok["at"] - promoted_at
        assert back_after < 10, back_after  # measured 0.0x-0.5 s on an idle machine
        present = {
            row[0]
            for row in replicated_sync.query(new, "SELECT src_hash FROM video_job")
        }
        lost = [key for key in acked if key not in present]
        assert lost == [], f"{len(lost)} acknowledged writes lost: {lost[:5]}"
        print(f"writes back {back_after:.3f} s after the promotion; {len(acked)} acked")


def test_the_queue_keeps_working_across_a_failover(replicated_sync: Replicated) -> None:
    """A Worker on a multi-host DSN drains a queue while the primary is stopped and the
    standby promoted: every job ends completed exactly once, none is left behind, and
    the Worker keeps running (jobs whose claim died with the old primary come back
    through reclaim_stale)."""
    old, new = replicated_sync.primary, replicated_sync.standby
    dsn = replicated_sync.multi_host_dsn(target_session_attrs="read-write")
    done: Dict[str, int] = {}
    lock = threading.Lock()

    def handler(job: Dict[str, Any]) -> None:
        time.sleep(0.005)
        with lock:
            done[job["src_hash"]] = done.get(job["src_hash"], 0) + 1

    with Database(dsn=dsn, maxconn=6, timeout=30, connect_timeout=2) as db:
        jobs = VideoJobs(db)
        keys = [f"fo-{i}" for i in range(300)]
        jobs.enqueue_many([{"src_hash": k, "input_path": "/in"} for k in keys])
        worker = Worker(db, handler, threads=3, reclaim_after=2.0, listen=False)
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while len(done) < 50 and time.monotonic() < deadline:
                time.sleep(0.01)
            old.stop("immediate")
            new.promote()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                counts = dict(
                    replicated_sync.query(
                        new, "SELECT status, count(*) FROM video_job GROUP BY status"
                    )
                )
                if counts.get("completed", 0) == len(keys):
                    break
                if not worker.alive:
                    break
                time.sleep(0.2)
            assert worker.alive
        finally:
            worker.stop()
            worker.join(30)
    assert counts == {"completed": len(keys)}, counts
    # At least once: a job whose completion died with the old primary ran again;
    # it still ended completed once (the row), whatever the handler saw.
    assert set(done) == set(keys)


# ---------------------------------------------------------------- PgBouncer


def test_the_statement_timeout_works_through_pgbouncer_and_leaks_nothing(
    pgaccess_dsn: str,
) -> None:
    with running_pgbouncer(pgaccess_dsn, pool_size=2) as bouncer:
        dsn = bouncer.dsn(_dbname(pgaccess_dsn))
        with Database(
            dsn=dsn, statement_timeout=200, pooler="transaction", maxconn=4
        ) as db:
            started = time.monotonic()
            with pytest.raises(QueryCanceled):
                db.execute("SELECT pg_sleep(1.5)")
            assert time.monotonic() - started < 1.4
            with pytest.raises(QueryCanceled), db.transaction() as tx:
                tx.execute("SELECT pg_sleep(1.5)")
        # Another client, no timeout of its own, over every server connection: none
        # kept the 200 ms.
        with Database(dsn=dsn, pooler="transaction", maxconn=4) as other:
            shown = _show_on_every_backend(other, "statement_timeout")
            assert shown == {"0"}, shown


def test_the_facade_transactions_and_queue_through_pgbouncer(
    pgaccess_dsn: str,
) -> None:
    """Transaction mode, a server pool of 2 for 4 client connections: the whole API
    works, and no session state reaches another client."""
    with running_pgbouncer(pgaccess_dsn, pool_size=2) as bouncer:
        dsn = bouncer.dsn(_dbname(pgaccess_dsn))
        with Database(
            dsn=dsn, pooler="transaction", session_dsn=pgaccess_dsn, maxconn=4
        ) as db:
            key = uuid.uuid4().hex
            job_id = db.insert("video_job", {"src_hash": key}, returning="id")
            assert db.find_one("video_job", {"id": job_id})["src_hash"] == key
            assert db.update("video_job", {"priority": 3}, {"id": job_id}) == 1
            assert db.upsert("video_job", {"src_hash": key, "priority": 4}) is not None
            assert db.count("video_job", {"priority": 4}) == 1
            assert (
                db.insert_many(
                    "video_job", [{"src_hash": f"{key}-{i}"} for i in range(50)]
                )
                == 50
            )
            with db.transaction() as tx:
                tx.insert("video_job", {"src_hash": f"{key}-tx"})
                with db.transaction():  # a savepoint
                    tx.update("video_job", {"priority": 9}, {"src_hash": f"{key}-tx"})
            assert db.find_one("video_job", {"src_hash": f"{key}-tx"})["priority"] == 9
            assert db.delete("video_job", {"src_hash": f"{key}-0"}) == 1
            with pytest.raises(InvalidQuery, match="needs a session"):
                db.execute("SET search_path = nowhere")

            # The queue: a Worker listening on the session DSN drains 100 jobs.
            jobs = VideoJobs(db)
            jobs.enqueue_many(
                [{"src_hash": f"q-{key}-{i}", "input_path": "/in"} for i in range(100)]
            )
            done: List[str] = []

            def queued_done(done: List[str]) -> bool:
                return sum(1 for d in done if d.startswith("q-")) >= 100

            worker = Worker(db, lambda job: done.append(job["src_hash"]), threads=3)
            worker.start()
            try:
                deadline = time.monotonic() + 60
                while not queued_done(done) and time.monotonic() < deadline:
                    time.sleep(0.02)
            finally:
                worker.stop()
                worker.join(30)
            # The rows inserted above are queued jobs too: the worker ran them all.
            queued = {f"q-{key}-{i}" for i in range(100)}
            assert queued <= set(done) and len(done) == len(set(done))
            completed = db.execute(
                "SELECT count(*) AS n FROM video_job"
                " WHERE status = 'completed' AND src_hash = ANY(%s)",
                (done,),
            )
            assert completed == [{"n": len(done)}]
            for setting in (
                "statement_timeout",
                "search_path",
                "transaction_read_only",
            ):
                assert len(_show_on_every_backend(db, setting)) == 1, setting


def test_a_switchover_behind_per_node_pgbouncers(replicated: Replicated) -> None:
    """One PgBouncer per node, a DSN naming both: PgBouncer answers logins from its
    own state, so libpq's read-write check is fooled; pgaccess's own role check and
    the drain on 25006 find the new primary within seconds of the switchover,
    without restarting PgBouncer."""
    with per_node(replicated.nodes, pool_size=4, query_wait_timeout=5) as bouncers:
        hosts = ",".join("127.0.0.1" for _ in bouncers)
        ports = ",".join(str(b.port) for b in bouncers)
        dsn = make_dsn(
            bouncers[0].dsn(replicated.dbname),
            host=hosts,
            port=ports,
            target_session_attrs="read-write",
        )
        with Database(
            dsn=dsn, pooler="transaction", maxconn=2, timeout=20, connect_timeout=2
        ) as db:
            db.insert("video_job", {"src_hash": "before"})
            replicated.switchover()
            switched = time.monotonic()
            errors: List[str] = []
            while True:
                try:
                    db.insert("video_job", {"src_hash": "after"})
                    break
                except DatabaseError as exc:
                    errors.append(type(exc).__name__)
                    assert time.monotonic() - switched < 30, errors
                    time.sleep(0.05)
            back = time.monotonic() - switched
            assert back < 10, (back, errors)
            assert db.count("video_job", {"src_hash": "after"}) == 1
            # The first host's PgBouncer took the write to its node, a standby now:
            # refused (25006), the pool reconnected to the node that is the primary.
            assert db.pool.stats()["drains"] >= 1
            with db.pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
                assert cur.fetchone()[1] is False
            print(f"writes back {back:.3f} s after the switchover; errors: {errors}")


def _dbname(dsn: str) -> str:
    return str(parse_dsn(dsn)["dbname"])


def _show_on_every_backend(db: Database, setting: str) -> Set[str]:
    """``SHOW setting`` on as many server connections as can be had at once."""
    values: Set[str] = set()
    barrier = threading.Barrier(4)

    def show() -> None:
        with db.transaction() as tx:
            barrier.wait(10)  # four transactions open at once: four server backends
            values.add(tx.execute(f"SHOW {setting}")[0][setting])
            tx.execute("SELECT pg_sleep(0.05)")

    threads = [threading.Thread(target=show) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return values


def test_a_dead_node_behind_pgbouncer_costs_the_connect_timeout_not_120_s(
    replicated: Replicated,
) -> None:
    """The standby's node is down but its PgBouncer is up and listed first: it
    accepts the login and holds the role check for its query_wait_timeout (120 s,
    PgBouncer's default). pgaccess cuts the check at connect_timeout and goes on to
    the next host."""
    primary, standby = replicated
    order = [standby, primary]
    with per_node(order, pool_size=2) as bouncers:
        dsn = make_dsn(
            bouncers[0].dsn(replicated.dbname),
            host="127.0.0.1,127.0.0.1",
            port=f"{bouncers[0].port},{bouncers[1].port}",
            target_session_attrs="read-write",
        )
        standby.stop("immediate")
        with Database(dsn=dsn, maxconn=1, timeout=30, connect_timeout=2) as db:
            started = time.monotonic()
            db.insert("video_job", {"src_hash": "past-a-dead-node"})
            took = time.monotonic() - started
        assert took < 15, took  # about connect_timeout, not PgBouncer's 120 s
        assert replicated.query(
            primary,
            "SELECT count(*) FROM video_job WHERE src_hash = 'past-a-dead-node'",
        ) == [(1,)]
        print(f"a dead node behind PgBouncer cost {took:.2f} s (connect_timeout 2 s)")


def test_a_statement_queued_in_pgbouncer_is_bounded_by_stall_timeout(
    pgaccess_dsn: str,
) -> None:
    """PgBouncer's one server connection is held by another client's transaction: a
    statement waits in PgBouncer's queue, where no statement timeout applies (the
    server never sees it). ``stall_timeout`` cuts it."""
    with running_pgbouncer(pgaccess_dsn, pool_size=1) as bouncer:
        dsn = bouncer.dsn(_dbname(pgaccess_dsn))
        holder = psycopg2.connect(dsn)
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1")  # BEGIN: the server connection is held
            with Database(
                dsn=dsn, pooler="transaction", maxconn=1, stall_timeout=1.0
            ) as db:
                started = time.monotonic()
                with pytest.raises(ConnectionLost):
                    db.execute("SELECT 1")
                waited = time.monotonic() - started
            assert 0.9 < waited < 10, waited
        finally:
            holder.close()
