"""The executor: raw params checked before sending, slots never leaked, fork-safe locks.

Every claim is checked against the server: what the backend last ran, what the pool
counts, what a forked child can still do.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any, Callable, Iterator, List

import pytest
from support.raw import Raw

from pgaccess import ConnectionPool, Database, InvalidQuery
from pgaccess.jobs import VideoJobs


@pytest.fixture
def one_conn_db(pgaccess_dsn: str) -> Iterator[Database]:
    db = Database(pgaccess_dsn, maxconn=1, timeout=10)
    try:
        yield db
    finally:
        db.close()


def last_statement(db: Database, raw: Raw) -> str:
    """What the pool's only connection last sent to the server."""
    with db.pool.connection() as conn:
        pid = conn.get_backend_pid()
    return str(raw.one("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)))


# ------------------------------------------------------------ raw params
@pytest.mark.parametrize(
    ("query", "params", "message"),
    [
        ("SELECT %s, %s", (1,), "2 placeholders, 1 parameter"),
        ("SELECT %s", (1, 2), "1 placeholder, 2 parameters"),
        ("SELECT %s", "abc", "not str: did you mean ('abc',)?"),
        ("SELECT %s", b"ab", "not bytes: did you mean (b'ab',)?"),
        ("SELECT %s", 5, "not int: did you mean (5,)?"),
        ("SELECT %(a)s, %(b)s", {"a": 1}, "no parameter for the placeholders ['b']"),
        ("SELECT %(a)s", (1,), "named placeholders ['a'], which take a dict"),
        ("SELECT %s", {"a": 1}, "1 positional placeholder"),
    ],
)
def test_params_that_do_not_fit_raise_before_anything_is_sent(
    one_conn_db: Database, raw: Raw, query: str, params: Any, message: str
) -> None:
    one_conn_db.execute("SELECT 'the last statement sent'")
    with pytest.raises(InvalidQuery) as info:
        one_conn_db.execute(query, params)
    assert message in str(info.value)
    assert last_statement(one_conn_db, raw) == "SELECT 'the last statement sent'"


def test_params_that_do_not_fit_leave_an_open_transaction_usable(db: Database) -> None:
    with db.transaction() as tx:
        with pytest.raises(InvalidQuery, match="2 placeholders, 1 parameter"):
            tx.execute("SELECT %s, %s", (1,))
        assert tx.execute("SELECT 1 AS one") == [{"one": 1}]


def test_execute_many_checks_every_params_before_sending_any(
    db: Database, scratch_table: Callable[..., str]
) -> None:
    table = scratch_table("v int")
    with pytest.raises(InvalidQuery, match="1 placeholder, 2 parameters"):
        db.execute_many(f"INSERT INTO {table} (v) VALUES (%s)", [(1,), (2,), (3, 4)])
    with pytest.raises(InvalidQuery, match="did you mean"):
        db.execute_many(f"INSERT INTO {table} (v) VALUES (%s)", [(1,), "2"])
    with db.transaction() as tx:  # inside an open one, its first rows stay unsent
        with pytest.raises(InvalidQuery):
            tx.execute_many(f"INSERT INTO {table} (v) VALUES (%s)", [(1,), ()])
        assert tx.count(table) == 0
    assert db.count(table) == 0


# ------------------------------------------------------------ the slot
def test_a_failure_while_a_transaction_is_made_gives_the_slot_back(
    one_conn_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt between taking the connection and making the Transaction (a
    Ctrl-C, say) used to keep the slot for ever."""
    import pgaccess.transaction as transaction_module

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transaction_module.Transaction, "__init__", interrupted)
        with pytest.raises(KeyboardInterrupt), one_conn_db.transaction():
            pass
    assert one_conn_db.pool.stats()["in_use"] == 0
    with one_conn_db.transaction() as tx:  # the pool of one serves again at once
        assert tx.execute("SELECT 1 AS one") == [{"one": 1}]


# ------------------------------------------------------------ fork
def _child_runs_the_facade(pool: ConnectionPool, out: Any) -> None:
    db = Database(pool=pool)
    jobs = VideoJobs(db)
    job_id = jobs.enqueue("forked-child", "/v/forked")
    with jobs.processing("child") as job:
        assert job is not None and job.id == job_id
    db.find_one("video_job", {"id": job_id})
    db.stats()  # takes the retry statistics' lock
    out.put(db.count("video_job"))


@pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)
def test_a_child_forked_while_module_locks_are_held_does_not_deadlock(
    pgaccess_pool: ConnectionPool,
) -> None:
    """Threads of the parent hold every module-level lock of the statement path at
    the moment of fork(): the child has no such threads, so a copied lock would
    stay held for ever and its first statement would hang."""
    import pgaccess.retry as retry_module
    import pgaccess.sql as sql_module
    import pgaccess.stats as stats_module

    db = Database(pool=pgaccess_pool)
    jobs = VideoJobs(db)
    heartbeater = jobs._heartbeats
    locks: List[Any] = [
        stats_module._lock,
        sql_module._cache_lock,
        retry_module.global_stats._lock,
        heartbeater._cond,
    ]
    held = threading.Barrier(len(locks) + 1, timeout=10)
    release = threading.Event()

    def hold(lock: Any) -> None:
        with lock:
            held.wait()
            release.wait(30)

    holders = [threading.Thread(target=hold, args=(lock,)) for lock in locks]
    for t in holders:
        t.start()
    held.wait()
    try:
        ctx = multiprocessing.get_context("fork")
        out: Any = ctx.Queue()
        child = ctx.Process(target=_child_runs_the_facade, args=(db.pool, out))
        child.start()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0, "the forked child hung or failed"
        count = out.get(timeout=5)
        assert count >= 1
    finally:
        release.set()
        for t in holders:
            t.join(10)
