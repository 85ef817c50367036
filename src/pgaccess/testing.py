"""pytest plugin: a PostgreSQL server, a database per xdist worker, clean tables.

Enable it in a ``conftest.py``::

    pytest_plugins = ["pgaccess.testing"]

The server is ``PGACCESS_TEST_DSN`` when set (a DSN with the right to create
databases); otherwise an embedded PostgreSQL (the ``embedded`` extra) is started once
by the pytest process that runs the session and shared by its xdist workers, in a
temporary directory removed at the end (also when the session is killed: a small
reaper process watches it). Logins need the cluster's password, which the DSNs
carry as a password file (``passfile=``); the server listens on TCP too only with
``pgaccess_embedded_tcp = true`` in the pytest ini (pgaccess's own suite sets it
for its TCP fault proxies). Each worker gets a database of its own with
the pipeline's schema applied, and ``PGACCESS_DSN`` pointing at it, so ``Database()``
with no arguments works in tests as it does in production.

Fixtures:

- ``pgaccess_server``: the :class:`TestServer` (``.admin_dsn``, ``.dsn(dbname)``,
  ``.embedded`` when the embedded server is used).
- ``pgaccess_dsn``: this worker's database.
- ``pgaccess_pool``: a session-wide ``ConnectionPool`` on it.
- ``db``: a ``Database`` on that pool, the pipeline's tables emptied before the test.
- ``rollback_db``: the same ``Database``, with everything the test does through it on
  its thread rolled back at the end (fast isolation without truncation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

from . import schema
from .database import Database
from .default import reset_default_pool
from .embedded import EmbeddedServer, scratch_dir
from .policies import PIPELINE
from .pool import ConnectionPool
from .transaction import Rollback

__all__ = ["TestServer"]

PIPELINE_TABLES = tuple(PIPELINE)
_WORKER_KEY = "pgaccess_admin_dsn"


class TestServer:
    """The server the tests run against, and how to make databases on it."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, admin_dsn: str, embedded: Optional[EmbeddedServer]) -> None:
        self.admin_dsn = admin_dsn
        self.embedded = embedded

    def dsn(self, dbname: str) -> str:
        """The DSN of database ``dbname`` on this server."""
        return str(psycopg2.extensions.make_dsn(self.admin_dsn, dbname=dbname))

    def create_database(self, name: str) -> str:
        """(Re)create database ``name``, empty; return its DSN."""
        self.drop_database(name)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, ending its sessions."""
        self._admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )

    def _admin(self, statement: sql.Composable) -> None:
        # CREATE/DROP DATABASE cannot run in a transaction: a connection in autocommit.
        conn = psycopg2.connect(self.admin_dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()


# ------------------------------------------------------------ the server
_started: Optional[EmbeddedServer] = None
_tmpdir: Optional[Path] = None
_reaper: Optional[subprocess.Popen[bytes]] = None
_reaper_pipe: Optional[int] = None


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "pgaccess_embedded_tcp",
        type="bool",
        default=False,
        help="pgaccess: the embedded server also listens on 127.0.0.1 (password "
        "logins only); for tests that reach it through TCP proxies",
    )


def _start_reaper(datadir: Path, scratch: Path) -> None:
    """A process that destroys the server once this one exits, however it exits.

    It waits for the end of a pipe only this process writes to; the kernel closes
    it on any exit (SIGTERM, SIGKILL, a crash), so no server outlives its session.
    pytest_unconfigure stops the server itself first; the reaper then finds nothing.
    Its own session keeps a Ctrl-C at the terminal from reaching it.
    """
    global _reaper, _reaper_pipe
    read_end, _reaper_pipe = os.pipe()
    try:
        _reaper = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from pgaccess.embedded import _reap; "
                "_reap(sys.argv[1], sys.argv[2])",
                str(datadir),
                str(scratch),
            ],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(read_end)


def pytest_configure(config: pytest.Config) -> None:
    global _started, _tmpdir
    if _is_worker(config) or os.environ.get("PGACCESS_TEST_DSN"):
        return
    _tmpdir = scratch_dir("pgaccess-test-")
    _start_reaper(_tmpdir / "data", _tmpdir)
    _started = EmbeddedServer(
        _tmpdir / "data",
        durable=False,
        tcp=bool(config.getini("pgaccess_embedded_tcp")),
    )
    _started.start()
    config.stash[_admin_key] = _started.dsn("postgres")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"pgaccess: testing against an embedded PostgreSQL in {_tmpdir}, "
            f"password logins only{', also on TCP' if _started.tcp else ''} "
            "(set PGACCESS_TEST_DSN to use another server)"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    global _started, _tmpdir, _reaper, _reaper_pipe
    try:
        if _started is not None:
            _started.destroy()
            _started = None
        if _tmpdir is not None:
            shutil.rmtree(_tmpdir, ignore_errors=True)
            _tmpdir = None
    finally:
        if _reaper_pipe is not None:
            os.close(_reaper_pipe)
            _reaper_pipe = None
        if _reaper is not None:
            _reaper.wait(timeout=60)
            _reaper = None


_admin_key = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: hand the embedded server's DSN to each worker."""
    admin = node.config.stash.get(_admin_key, None)
    if admin is not None:
        node.workerinput[_WORKER_KEY] = admin


def _admin_dsn(config: pytest.Config) -> str:
    env = os.environ.get("PGACCESS_TEST_DSN")
    if env:
        return env
    if _is_worker(config):
        return str(config.workerinput[_WORKER_KEY])  # type: ignore[attr-defined]
    return config.stash[_admin_key]


def _worker_id(config: pytest.Config) -> str:
    if _is_worker(config):
        return str(config.workerinput["workerid"])  # type: ignore[attr-defined]
    return "main"


# -------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def pgaccess_server(pytestconfig: pytest.Config) -> TestServer:
    """The PostgreSQL server of this test session."""
    return TestServer(_admin_dsn(pytestconfig), _started)


@pytest.fixture(scope="session")
def pgaccess_dsn(
    pgaccess_server: TestServer, pytestconfig: pytest.Config
) -> Iterator[str]:
    """This worker's own database, with the schema; PGACCESS_DSN points at it."""
    name = f"pgaccess_test_{_worker_id(pytestconfig)}"
    dsn = pgaccess_server.create_database(name)
    schema.apply(dsn)
    saved = os.environ.get("PGACCESS_DSN")
    os.environ["PGACCESS_DSN"] = dsn
    reset_default_pool()
    yield dsn
    reset_default_pool()
    if saved is None:
        os.environ.pop("PGACCESS_DSN", None)
    else:
        os.environ["PGACCESS_DSN"] = saved
    pgaccess_server.drop_database(name)


@pytest.fixture(scope="session")
def pgaccess_pool(pgaccess_dsn: str) -> Iterator[ConnectionPool]:
    """A pool on this worker's database, shared by the session's tests."""
    with ConnectionPool(pgaccess_dsn, maxconn=8, timeout=10, name="test") as pool:
        yield pool


def truncate_pipeline(pool: ConnectionPool) -> None:
    """Empty the pipeline's tables and restart their ids."""
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in PIPELINE_TABLES)
            )
        )


@pytest.fixture
def db(pgaccess_pool: ConnectionPool) -> Database:
    """A ``Database`` on this worker's database, with the pipeline's tables empty."""
    truncate_pipeline(pgaccess_pool)
    return Database(pool=pgaccess_pool)


@pytest.fixture
def rollback_db(db: Database) -> Iterator[Database]:
    """``db``, inside a transaction rolled back when the test ends."""
    with db.transaction() as tx:
        yield db
        raise Rollback(tx)
