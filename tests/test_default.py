"""The default pool (``db_pool``) and the fork handling of every module lock."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Iterator

import pytest

import pgaccess.default
from pgaccess import ConnectionPool, Database, db_pool
from pgaccess import schema as pg_schema
from pgaccess.default import default_pool, reinit_after_fork, reset_default_pool


@pytest.fixture
def fresh_default(pgaccess_dsn: str) -> Iterator[None]:
    """The default pool made anew for the test (PGACCESS_DSN is this worker's
    database), and closed after."""
    reset_default_pool()
    yield
    reset_default_pool()


def test_db_pool_goes_where_a_connection_pool_goes(fresh_default: None) -> None:
    assert isinstance(db_pool, ConnectionPool)
    pg_schema.apply(db_pool)  # an isinstance check inside: it refused db_pool before
    with db_pool as pool:  # TypeError before: `with` looks past __getattr__
        assert pool is default_pool()
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert pool.closed
    # The block closed that pool; db_pool goes on with a new one.
    with db_pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    assert default_pool() is not pool


def test_db_pool_and_the_default_pool_are_one_pool_for_transactions(
    fresh_default: None,
) -> None:
    # The thread's open transaction is found by its pool: db_pool must count as it.
    assert db_pool == default_pool() and hash(db_pool) == hash(default_pool())
    with Database(pool=db_pool).transaction():
        pid = Database().execute("SELECT pg_backend_pid() AS p")[0]["p"]
        inside = Database(pool=db_pool).execute("SELECT pg_backend_pid() AS p")
    assert inside[0]["p"] == pid
    assert default_pool().stats()["size"] == 1


def test_repr_and_introspection_never_create_the_pool() -> None:
    reset_default_pool()
    assert "not created" in repr(db_pool)
    assert not isinstance(db_pool, type)  # what pgaccess/__init__ asks at import
    assert pgaccess.default._default is None


# --------------------------------------------------------------------- fork
needs_fork = pytest.mark.skipif(sys.platform != "linux", reason="os.fork")
multi_threaded_fork = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def _fork_while_held(
    lock_holder: Callable[[threading.Event], None], child: Callable[[], None]
) -> int:
    """Fork while another thread holds a lock; run ``child`` in the child; return its
    exit code (-1 if it hung for 10 s: it was killed)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        lock_holder(held)
        release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - reports through its exit code
            code = 1
            try:
                child()
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return -1
    finally:
        release.set()
        t.join(timeout=10)


@needs_fork
@multi_threaded_fork
def test_child_forked_while_the_default_pool_lock_is_held_does_not_deadlock(
    fresh_default: None,
) -> None:
    def hold(held: threading.Event) -> None:
        pgaccess.default._lock.acquire()  # as default_pool() does while creating
        held.set()

    try:
        code = _fork_while_held(hold, lambda: default_pool().close())
    finally:
        pgaccess.default._lock.release()
    assert code == 0, "the child deadlocked on the default pool's lock"


@needs_fork
@multi_threaded_fork
def test_child_forked_while_a_pool_lock_is_held_uses_the_pool(
    pgaccess_dsn: str,
) -> None:
    pool = ConnectionPool(pgaccess_dsn, maxconn=2)
    try:
        with pool.connection():
            pass

        def child() -> None:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")

        def hold(held: threading.Event) -> None:
            pool.lock.acquire()
            held.set()

        try:
            code = _fork_while_held(hold, child)
        finally:
            pool.lock.release()
        assert code == 0
    finally:
        pool.close()


@needs_fork
@multi_threaded_fork
def test_registered_locks_are_replaced_in_the_child() -> None:
    state = {"lock": threading.Lock()}
    reinit_after_fork(lambda: state.__setitem__("lock", threading.Lock()))

    def hold(held: threading.Event) -> None:
        state["lock"].acquire()
        held.set()

    def child() -> None:
        if not state["lock"].acquire(timeout=5):
            raise SystemExit("still held in the child")

    lock = state["lock"]
    try:
        code = _fork_while_held(hold, child)
    finally:
        lock.release()
    assert code == 0
