"""pytest fixtures shared by the fault tests: a FaultProxy in front of this worker's
database, the DSN through it, a ``Database`` on a pool of its own through it, and
scratch tables made and dropped per test; and ``running``, the Workers a test starts,
stopped and joined at its end.

Enabled in ``tests/conftest.py`` (``pytest_plugins``). The proxy targets the server
the session tests against (see ``pgaccess.testing``):

- the embedded server, when this process started it: TCP 127.0.0.1:<its port>;
- otherwise the host and port of the admin DSN (``PGACCESS_TEST_DSN``, or the embedded
  server's DSN handed to an xdist worker). A host that is a directory is a Unix socket
  directory, and the proxy forwards to the socket file ``<dir>/.s.PGSQL.<port>``.

Clients reach the proxy over TCP with ``sslmode=disable``: a TLS stream would hide the
statements from ``drop_after``.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Iterator, List

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

from pgaccess import Database, Worker
from pgaccess.testing import TestServer
from support.faultproxy import FaultProxy

__all__ = [
    "fault_proxy",
    "make_fault_proxy",
    "proxy_db",
    "proxy_dsn",
    "running",
    "scratch_table",
]

#: The pool a ``proxy_db`` gets: as many connections as the session's test pool.
PROXY_POOL_SIZE = 8
PROXY_POOL_TIMEOUT = 10.0


def make_fault_proxy(server: TestServer) -> FaultProxy:
    """A FaultProxy (not started) in front of ``server``."""
    if server.embedded is not None and server.embedded.port is not None:
        return FaultProxy("127.0.0.1", server.embedded.port)
    params = psycopg2.extensions.parse_dsn(server.admin_dsn)
    host = params.get("host") or os.environ.get("PGHOST") or "127.0.0.1"
    port = int(params.get("port") or os.environ.get("PGPORT") or 5432)
    host = host.split(",")[0]  # a multi-host DSN: the first is the one libpq tries
    if host.startswith("/"):
        return FaultProxy.unix(os.path.join(host, f".s.PGSQL.{port}"))
    return FaultProxy(host, port)


def dsn_through(proxy: FaultProxy, dsn: str) -> str:
    """``dsn`` pointed at ``proxy`` instead of the server, without TLS or GSS."""
    return str(
        psycopg2.extensions.make_dsn(
            dsn,
            host=proxy.host,
            port=proxy.port,
            sslmode="disable",
            gssencmode="disable",
        )
    )


@pytest.fixture
def fault_proxy(pgaccess_server: TestServer) -> Iterator[FaultProxy]:
    """A started FaultProxy in front of this worker's database server; stopped after."""
    with make_fault_proxy(pgaccess_server) as proxy:
        yield proxy


@pytest.fixture
def proxy_dsn(fault_proxy: FaultProxy, pgaccess_dsn: str) -> str:
    """The DSN of this worker's database through ``fault_proxy``."""
    return dsn_through(fault_proxy, pgaccess_dsn)


@pytest.fixture
def proxy_db(proxy_dsn: str) -> Iterator[Database]:
    """A ``Database`` with a pool of its own through ``fault_proxy``; closed after.

    Its pool is closed before the proxy stops (fixtures end in reverse order).
    """
    database = Database(
        dsn=proxy_dsn,
        maxconn=PROXY_POOL_SIZE,
        timeout=PROXY_POOL_TIMEOUT,
        name="through-proxy",
    )
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def scratch_table(pgaccess_dsn: str) -> Iterator[Callable[..., str]]:
    """Make tables unique to this test: ``scratch_table("id serial, v int")``.

    Returns the new table's name; every table made is dropped when the test ends.
    ``columns`` is fixed SQL written by the test, never user input.
    """
    made: List[str] = []

    def execute(statement: sql.Composable) -> None:
        conn = psycopg2.connect(pgaccess_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def make(
        columns: str = "id serial PRIMARY KEY, v int", prefix: str = "scratch"
    ) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        execute(
            sql.SQL("CREATE TABLE {} ({})").format(
                sql.Identifier(name), sql.SQL(columns)
            )
        )
        made.append(name)
        return name

    yield make
    for name in made:
        execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def running() -> Iterator[List[Worker]]:
    """Workers a test starts; stopped and joined at its end whatever happens."""
    workers: List[Worker] = []
    yield workers
    for w in workers:
        w.stop()
    for w in workers:
        assert w.join(15), "a worker did not stop"
