"""ConnectionPool against a real server: waiting, healing, hygiene, stats, fork."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, List, Sequence, Tuple

import psycopg2
import psycopg2.pool
import pytest

from pgaccess import (
    ConnectionPool,
    Database,
    DatabaseError,
    PoolClosed,
    PoolError,
    PoolTimeout,
)
from pgaccess import schema as pg_schema
from pgaccess.config import Settings, default_pool_size, redact_dsn
from pgaccess.pool import PooledConnection

MakePool = Callable[..., ConnectionPool]


@pytest.fixture
def make_pool(pgaccess_dsn: str) -> Iterator[MakePool]:
    pools: List[ConnectionPool] = []

    def make(**kwargs: object) -> ConnectionPool:
        pool = ConnectionPool(pgaccess_dsn, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def backend_pid(pool: ConnectionPool) -> int:
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def server_backends(dsn: str, application_name: str = "pgaccess") -> List[int]:
    """Backend pids of this database's pgaccess sessions, as the server sees them."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            )
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


# ----------------------------------------------------------------- waiting
def test_16_threads_over_4_connections_all_succeed(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=4, timeout=30)
    barrier = threading.Barrier(16)
    errors: List[BaseException] = []
    pids: set[int] = set()
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            for i in range(200):
                with pool.connection() as conn, conn.cursor() as cur:
                    cur.execute("SELECT pg_backend_pid(), %s", (i,))
                    pid, echoed = cur.fetchone()
                    assert echoed == i
                    with lock:
                        pids.add(pid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    stats = pool.stats()
    assert stats["requests"] == 16 * 200
    assert stats["requests_waiting"] > 0  # the pool was contended ...
    assert stats["timeouts"] == 0
    # ... yet never held more than its maximum, and never churned connections.
    assert len(pids) <= 4
    assert stats["connections_opened"] == len(pids)
    assert stats["in_use"] == 0 and stats["size"] <= 4


def test_waiter_times_out_within_20_percent(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1, timeout=0.5)
    held = pool.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.acquire()
        waited = time.monotonic() - started
    finally:
        pool.release(held)
    assert waited == pytest.approx(0.5, rel=0.2)
    message = str(info.value)
    assert pool.name in message and "1 of 1 in use" in message
    assert pool.stats()["timeouts"] == 1
    # The pool is fine afterwards.
    assert backend_pid(pool) > 0


def test_timeout_error_is_a_database_error_not_psycopg2_exhaustion(
    make_pool: MakePool,
) -> None:
    pool = make_pool(maxconn=1, timeout=0.05)
    with pool.connection(), pytest.raises(DatabaseError) as info:
        pool.acquire()
    assert not isinstance(info.value.__cause__, psycopg2.pool.PoolError)
    assert "exhausted" not in str(info.value)


def test_waiters_are_served_first_come_first_served(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1, timeout=10)
    held = pool.acquire()
    order: List[int] = []
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: _take_and_log(pool, i, order))
        t.start()
        threads.append(t)
        # Line them up: wait until this one is queued before starting the next.
        _wait_for(lambda n=i + 1: pool.stats()["waiting"] == n)
    pool.release(held)
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]


def _start_waiter(pool: ConnectionPool) -> Tuple[threading.Thread, List[float]]:
    """A thread that borrows a connection once, queued behind ``pool``'s busy ones;
    returns it and the list that receives how long it waited."""
    waited: List[float] = []
    queued = pool.stats()["waiting"]

    def wait_for_it() -> None:
        started = time.monotonic()
        with pool.connection():
            waited.append(time.monotonic() - started)

    t = threading.Thread(target=wait_for_it)
    t.start()
    _wait_for(lambda: pool.stats()["waiting"] == queued + 1)
    return t, waited


def test_a_running_thread_takes_a_returned_connection_while_the_line_is_young(
    make_pool: MakePool,
) -> None:
    # Handing every return to a sleeping waiter costs a context switch per checkout;
    # while nobody has waited HANDOFF_AFTER, the running thread takes it again.
    pool = make_pool(maxconn=1, timeout=10)
    pool.HANDOFF_AFTER = 0.5
    held = pool.acquire()
    t, waited = _start_waiter(pool)
    pool.release(held)
    again = pool.acquire(timeout=0.1)  # no wait behind the young waiter
    assert again is held and waited == []
    time.sleep(0.6)  # now the waiter is past the bound: the next return is its
    pool.release(again)
    t.join(timeout=5)
    assert len(waited) == 1 and waited[0] >= 0.6
    assert pool.stats()["max_wait"] == pytest.approx(waited[0], abs=0.05)


def test_a_waiter_serves_itself_at_the_bound_when_nobody_takes_the_slot(
    make_pool: MakePool,
) -> None:
    pool = make_pool(maxconn=1, timeout=10)
    pool.HANDOFF_AFTER = 0.3
    held = pool.acquire()
    t, waited = _start_waiter(pool)
    pool.release(held)  # the waiter is young: the slot is left free, not handed over
    t.join(timeout=5)
    # Served at the bound, not at its 10 s timeout.
    assert len(waited) == 1 and 0.25 <= waited[0] < 0.3 + 0.5


def _take_and_log(pool: ConnectionPool, i: int, order: List[int]) -> None:
    with pool.connection():
        order.append(i)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def test_close_wakes_waiters_and_refuses_new_requests(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1, timeout=10)
    held = pool.acquire()
    caught: List[BaseException] = []
    t = threading.Thread(target=lambda: _catch(pool.acquire, caught))
    t.start()
    _wait_for(lambda: pool.stats()["waiting"] == 1)
    pool.close()
    t.join(timeout=5)
    assert len(caught) == 1 and isinstance(caught[0], PoolClosed)
    with pytest.raises(PoolClosed, match=pool.name):
        pool.acquire()
    pool.release(held)  # a late return after close is harmless
    assert held.closed
    pool.close()  # idempotent


def _catch(fn: Callable[[], object], into: List[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


# ---------------------------------------------------------------- returns
def _intact(pool: ConnectionPool, in_use: int, idle: int) -> None:
    stats = pool.stats()
    assert (stats["in_use"], stats["idle"], stats["connections_discarded"]) == (
        in_use,
        idle,
        0,
    )


def test_a_second_release_is_refused_and_the_pool_stays_intact(
    make_pool: MakePool,
) -> None:
    pool = make_pool(maxconn=2)
    conn = pool.acquire()
    pool.release(conn)
    with pytest.raises(PoolError, match="returned twice"):
        pool.release(conn)
    assert not conn.closed  # one of the pool's idle connections: not closed
    _intact(pool, in_use=0, idle=1)
    assert backend_pid(pool) == conn.get_backend_pid()


@contextlib.contextmanager
def lent_elsewhere(
    pool: ConnectionPool, before: Sequence[str] = (), after: str = "SELECT 1"
) -> Iterator[Tuple[PooledConnection, List[Any]]]:
    """For the block, a connection lent to another thread, which ran ``before`` on it
    and runs ``after`` when the block ends; yields it and the list that receives the
    row ``after`` returns (empty if it failed)."""
    lent, done = threading.Event(), threading.Event()
    taken: List[PooledConnection] = []
    rows: List[Any] = []

    def borrower() -> None:
        with pool.connection() as conn, conn.cursor() as cur:
            for statement in before:
                cur.execute(statement)
            taken.append(conn)
            lent.set()
            done.wait(10)
            cur.execute(after)  # still a working connection of its own
            rows.append(cur.fetchone())

    t = threading.Thread(target=borrower)
    t.start()
    try:
        assert lent.wait(10)
        yield taken[0], rows
    finally:
        done.set()
        t.join(timeout=10)
    assert not t.is_alive()


def test_a_second_release_never_takes_the_connection_from_its_new_borrower(
    make_pool: MakePool,
) -> None:
    # Measured before the fix: acquire, release, acquire in another thread (the same
    # connection), release the first again: the next acquire got the connection
    # still in use by the other thread.
    pool = make_pool(maxconn=2)
    first = pool.acquire()
    pool.release(first)
    with lent_elsewhere(pool) as (theirs, rows):
        assert theirs is first  # the same object: only the lease tells them apart
        with pytest.raises(PoolError, match="not lent to"):
            pool.release(first)
        _intact(pool, in_use=1, idle=0)
        other = pool.acquire()
        assert other is not first and not first.closed
        pool.release(other)
    assert rows == [(1,)]
    _intact(pool, in_use=0, idle=2)


def test_a_connection_of_another_pool_is_refused(make_pool: MakePool) -> None:
    ours, theirs = make_pool(maxconn=1, name="ours"), make_pool(maxconn=1)
    foreign = theirs.acquire()
    with pytest.raises(PoolError, match="not lent by the pool 'ours'"):
        ours.release(foreign)
    assert not foreign.closed
    _intact(ours, in_use=0, idle=0)
    theirs.release(foreign)
    _intact(theirs, in_use=0, idle=1)


def test_a_release_from_a_thread_the_connection_is_not_lent_to_is_refused(
    make_pool: MakePool,
) -> None:
    pool = make_pool(maxconn=1)
    conn = pool.acquire()
    caught: List[BaseException] = []
    t = threading.Thread(target=lambda: _catch(lambda: pool.release(conn), caught))
    t.start()
    t.join(timeout=10)
    assert len(caught) == 1 and isinstance(caught[0], PoolError)
    _intact(pool, in_use=1, idle=0)
    pool.release(conn)  # its borrower can
    _intact(pool, in_use=0, idle=1)


def test_a_refused_release_of_a_connection_in_a_transaction_leaves_it_alone(
    make_pool: MakePool,
) -> None:
    # The slow path (rollback, reset) must check the lease before any I/O.
    pool = make_pool(maxconn=1)
    conn = pool.acquire()
    pool.release(conn)
    # now() is when the transaction began: in the same one, it is not the statement's
    # own time; after a rollback (autocommit again) it would be.
    after = "SELECT now() = statement_timestamp()"
    with lent_elsewhere(pool, before=["BEGIN"], after=after) as (theirs, rows):
        assert theirs is conn
        with pytest.raises(PoolError):
            pool.release(conn)  # in a transaction: the slow path
    assert rows == [(False,)]  # the borrower's transaction was left open
    assert pool.stats()["returned_in_transaction"] == 1  # the borrower's own return


# ------------------------------------------------------------------ healing
def test_terminated_backends_are_replaced(
    make_pool: MakePool, pgaccess_dsn: str
) -> None:
    app = f"pgaccess-terminate-{os.getpid()}"
    pool = make_pool(maxconn=4, application_name=app)
    conns = [pool.acquire() for _ in range(4)]
    for conn in conns:
        pool.release(conn)
    before = server_backends(pgaccess_dsn, app)
    assert len(before) == 4
    admin = psycopg2.connect(pgaccess_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (before,)
        )
    admin.close()
    _wait_for(lambda: not server_backends(pgaccess_dsn, app))

    db = Database(pool=pool, retry_reads=False)  # no retry: the pool itself must heal
    for _ in range(20):
        assert db.execute("SELECT 1 AS one") == [{"one": 1}]
    stats = pool.stats()
    assert stats["connections_lost"] >= 1
    after = server_backends(pgaccess_dsn, app)
    assert after and not set(before) & set(after)


def test_broken_connection_is_discarded_and_its_slot_freed(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1, timeout=2)
    with pool.connection() as conn:
        pid_before = conn.get_backend_pid()
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # now inside a transaction
        # Cut the socket under psycopg2: the rollback on return will fail.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, conn.fileno())
        os.close(devnull)
    # psycopg2's own pool would lose this slot for good (rollback raises in putconn);
    # with a pool of one, the next checkout proves the slot came back.
    assert backend_pid(pool) != pid_before
    stats = pool.stats()
    assert stats["in_use"] == 0
    assert stats["connections_discarded"] == 1


def test_returned_mid_transaction_comes_back_clean(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("CREATE TEMP TABLE leftover (x int)")
        pid = conn.get_backend_pid()
    with pool.connection() as conn, conn.cursor() as cur:
        assert conn.get_backend_pid() == pid  # kept, not replaced
        assert conn.autocommit
        cur.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'leftover'")
        assert cur.fetchone()[0] == 0  # rolled back
        assert (
            conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        )
    assert pool.stats()["returned_in_transaction"] == 1


def test_changed_session_attributes_are_reset(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1)
    with pool.get_connection() as conn:
        conn.set_session(readonly=True, isolation_level="SERIALIZABLE")
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SHOW transaction_read_only")
        assert cur.fetchone()[0] == "off"
        assert conn.isolation_level is None or conn.isolation_level == 1


def test_connections_older_than_max_lifetime_are_replaced(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=1, max_lifetime=0.2)
    first = backend_pid(pool)
    time.sleep(0.25)
    backend_pid(pool)  # returned past its lifetime: closed on return
    assert backend_pid(pool) != first
    assert pool.stats()["connections_discarded"] >= 1


# --------------------------------------------------------------- the guide
def test_get_cursor_commits_and_returns_dict_rows(
    make_pool: MakePool, db: Database
) -> None:
    pool = make_pool(maxconn=2)
    job_id = db.insert("video_job", {"src_hash": "p1", "input_path": "/p1"})
    with pool.get_cursor() as cursor:
        cursor.execute(
            "UPDATE video_job SET status = %s WHERE id = %s", ("failed", job_id)
        )
        cursor.execute("SELECT status FROM video_job WHERE id = %s", (job_id,))
        assert cursor.fetchone() == {"status": "failed"}
    assert db.find_one("video_job", {"id": job_id})["status"] == "failed"


def test_get_connection_rolls_back_on_exception(
    make_pool: MakePool, db: Database
) -> None:
    pool = make_pool(maxconn=2)
    with pytest.raises(RuntimeError), pool.get_connection() as conn:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO video_job (src_hash, input_path) VALUES ('gone', '/g')"
            )
        raise RuntimeError("boom")
    assert db.count("video_job", {"src_hash": "gone"}) == 0
    assert pool.stats()["in_use"] == 0


# -------------------------------------------------------------------- stats
def test_stats_add_up(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=2, timeout=0.05)
    a = pool.acquire()
    b = pool.acquire()
    stats = pool.stats()
    assert (stats["in_use"], stats["idle"], stats["size"]) == (2, 0, 2)
    with pytest.raises(PoolTimeout):
        pool.acquire()
    pool.release(a)
    stats = pool.stats()
    assert (stats["in_use"], stats["idle"], stats["size"]) == (1, 1, 2)
    pool.release(b)
    stats = pool.stats()
    assert stats["requests"] == 3
    assert stats["requests_waiting"] == 1 and stats["timeouts"] == 1
    # The one waiter waited out its timeout (less the moment before it joined the
    # line), and that is both the total and the longest wait (a pool that did not time
    # the wait would report 0).
    assert 0.045 <= stats["wait_time"] < 0.05 + 0.2
    assert stats["max_wait"] == stats["wait_time"]
    assert stats["connections_opened"] == 2 and stats["idle"] == 2
    assert stats["in_use"] + stats["idle"] == stats["size"] <= stats["maxconn"]


# --------------------------------------------------------------------- fork
def _child_query(pool: ConnectionPool, out: multiprocessing.Queue[object]) -> None:
    try:
        out.put(backend_pid(pool))
    except BaseException as exc:
        out.put(repr(exc))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_gets_its_own_connections(make_pool: MakePool) -> None:
    pool = make_pool(maxconn=2)
    parent_pid = backend_pid(pool)  # an idle connection exists before the fork
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[object] = ctx.Queue()
    child = ctx.Process(target=_child_query, args=(pool, out))
    child.start()
    child_backend = out.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert isinstance(child_backend, int) and child_backend != parent_pid
    # The parent's connection survived the child (which never touched its socket).
    assert backend_pid(pool) == parent_pid
    assert pool.stats()["connections_lost"] == 0


# ------------------------------------------------------------ configuration
def test_default_size_is_twice_the_cores_available() -> None:
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    assert default_pool_size() == 2 * (cores or 1)
    assert Settings.resolve(environ={}).maxconn == 2 * (cores or 1)


def test_settings_come_from_arguments_then_environment() -> None:
    env = {
        "PGACCESS_DSN": "dbname=a",
        "DATABASE_URL": "postgresql://b",
        "PGACCESS_POOL_SIZE": "7",
        "PGACCESS_POOL_TIMEOUT": "2.5",
    }
    s = Settings.resolve(environ=env)
    assert (s.dsn, s.maxconn, s.timeout) == ("dbname=a", 7, 2.5)
    s = Settings.resolve("dbname=c", maxconn=3, timeout=1, environ=env)
    assert (s.dsn, s.maxconn, s.timeout) == ("dbname=c", 3, 1)
    assert (
        Settings.resolve(environ={"DATABASE_URL": "postgresql://b"}).dsn
        == "postgresql://b"
    )
    with pytest.raises(ValueError, match="PGACCESS_POOL_SIZE"):
        Settings.resolve(environ={"PGACCESS_POOL_SIZE": "zero"})


def test_a_facade_on_a_given_pool_reads_only_its_own_variable(
    pgaccess_pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool's variables were the pool's business: malformed ones do not stop a
    # facade made on a pool that exists; the facade's own one is still checked.
    monkeypatch.setenv("PGACCESS_POOL_TIMEOUT", "soon")
    monkeypatch.setenv("PGACCESS_POOL_SIZE", "many")
    monkeypatch.setenv("PGACCESS_SLOW_QUERY_MS", "250")
    db = Database(pool=pgaccess_pool)
    assert db.slow_query_ms == 250.0
    assert db.find_one("video_job", {"id": -1}) is None
    monkeypatch.setenv("PGACCESS_SLOW_QUERY_MS", "slow")
    with pytest.raises(ValueError, match="PGACCESS_SLOW_QUERY_MS='slow'"):
        Database(pool=pgaccess_pool)


def test_a_pool_never_reads_the_facades_variables(
    pgaccess_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGACCESS_SLOW_QUERY_MS", "slow")
    with ConnectionPool(pgaccess_dsn, maxconn=1) as pool:
        assert backend_pid(pool) > 0


def test_passwords_never_shown() -> None:
    assert "hunter2" not in redact_dsn("postgresql://u:hunter2@h/db")
    assert "hunter2" not in redact_dsn("host=h password=hunter2 dbname=x")
    pool = ConnectionPool("postgresql://u:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in repr(pool)
    pool.close()


def test_import_never_connects() -> None:
    # A DSN that cannot work: importing and building the facade must still succeed.
    code = "import pgaccess; db = pgaccess.Database(); print(repr(pgaccess.db_pool))"
    env = dict(os.environ, PGACCESS_DSN="host=127.0.0.1 port=1 connect_timeout=1")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "not created" in out.stdout


def test_first_connect_failure_is_immediate_and_clear() -> None:
    pool = ConnectionPool("host=127.0.0.1 port=1 connect_timeout=2", timeout=10)
    started = time.monotonic()
    with pytest.raises(DatabaseError, match="could not connect"):
        pool.acquire()
    assert time.monotonic() - started < 5  # not the whole 10 s timeout
    pool.close()


# ------------------------------------------------------------------- schema
def test_schema_applies_twice(pgaccess_server: object, pgaccess_dsn: str) -> None:
    pg_schema.apply(pgaccess_dsn)
    pg_schema.apply(pgaccess_dsn)
    conn = psycopg2.connect(pgaccess_dsn)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN "
            "('video_job', 'highlight', 'processing_metrics')"
        )
        assert cur.fetchone()[0] == 3
    conn.close()


@pytest.mark.parametrize(
    ("table", "row"),
    [
        ("video_job", {"src_hash": "s", "status": "bogus"}),
        ("video_job", {"input_path": "/no-hash"}),
        ("video_job", {"src_hash": "s", "max_attempts": 0}),
        ("highlight", {"job_id": 999, "start_time": 1, "end_time": 2, "score": 1}),
        ("processing_metrics", {"stage": "s", "duration_ms": -1}),
    ],
)
def test_schema_constraints_reject_bad_rows(
    db: Database, table: str, row: dict
) -> None:
    from pgaccess import IntegrityError

    with pytest.raises(IntegrityError):
        db.insert(table, row)
    assert db.count(table) == 0


def test_highlight_span_must_be_positive(db: Database) -> None:
    from pgaccess import CheckViolation

    job = db.insert("video_job", {"src_hash": "h", "input_path": "/h"})
    with pytest.raises(CheckViolation):
        db.insert(
            "highlight", {"job_id": job, "start_time": 5, "end_time": 5, "score": 1}
        )
    assert db.count("highlight") == 0


def test_schema_ships_inside_the_package() -> None:
    text = pg_schema.schema_sql()
    assert "CREATE TABLE IF NOT EXISTS video_job" in text
