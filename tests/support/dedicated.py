"""A PostgreSQL server of a test's own, for the tests that restart or crash it.

The session's server is shared by every xdist worker (and is ``PGACCESS_TEST_DSN``
when that is set), so a test that restarts, crashes or resizes a server starts its
own embedded one instead: ``dedicated_server()``. It keeps one TCP port and one
socket directory for its whole life, so DSNs, pools and proxies made before a
``restart()`` or a ``stop()``/``start()`` reach it again afterwards.

``synchronous_commit`` is on (``durable=False`` turns it off): with it off, a crash
may lose commits that were acknowledged, which is the server's choice, not a bug of
the client, and would make "every acknowledged commit survives" untestable.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from pgaccess import schema
from pgaccess.embedded import EmbeddedServer, free_port, scratch_dir

__all__ = ["Dedicated", "dedicated_server"]


def _explained(action: Callable[..., Any], *args: Any) -> None:
    try:
        action(*args)
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise RuntimeError(
            f"pg_ctl {exc.cmd[3] if len(exc.cmd) > 3 else ''} failed "
            f"({exc.returncode}): {err.strip()}"
        ) from exc


def admin_query(dsn: str, statement: Any, params: Any = None) -> List[Any]:
    """One statement on a fresh plain connection (never one of a pool under test)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description is not None else []
    finally:
        conn.close()


class Dedicated:
    """A started EmbeddedServer, plus helpers for databases and backends on it."""

    def __init__(self, server: EmbeddedServer, port: int) -> None:
        self.server = server
        self.port = port

    # pg_ctl's own words, which EmbeddedServer keeps in CalledProcessError.stderr.
    def restart(self, mode: str = "fast") -> None:
        _explained(self.server.restart, mode)

    def stop(self, mode: str = "fast") -> None:
        _explained(self.server.stop, mode)

    def start(self) -> None:
        _explained(self.server.start)

    def dsn(self, dbname: str = "postgres") -> str:
        """Over the Unix socket (the same path across restarts)."""
        return self._dsn(str(self.server.socket_dir), dbname)

    def tcp_dsn(self, dbname: str = "postgres") -> str:
        return self._dsn("127.0.0.1", dbname)

    def _dsn(self, host: str, dbname: str) -> str:
        # Built here rather than by the server: it must work while it is stopped.
        return str(
            make_dsn(
                host=host,
                port=self.port,
                user="postgres",
                dbname=dbname,
                passfile=str(self.server.passfile),
            )
        )

    def new_database(self, prefix: str = "t", *, pipeline: bool = True) -> str:
        """A new, empty database (with the pipeline's schema); returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.server.create_database(name)
        if pipeline:
            schema.apply(self.dsn(name))
        return name

    def execute(self, dbname: str, statement: Any, params: Any = None) -> List[Any]:
        """Run one statement on a fresh connection (not pgaccess's); return its rows."""
        return admin_query(self.dsn(dbname), statement, params)

    def backends(self, dbname: str, application_name: str = "pgaccess") -> List[int]:
        """The pids of the sessions of ``application_name`` on ``dbname``."""
        rows = self.execute(
            dbname,
            "SELECT pid FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = %s AND pid <> pg_backend_pid()",
            (dbname, application_name),
        )
        return [r[0] for r in rows]

    def terminate(self, dbname: str, application_name: str = "pgaccess") -> int:
        """pg_terminate_backend every session of ``application_name`` on ``dbname``."""
        rows = self.execute(
            dbname,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = %s AND pid <> pg_backend_pid()",
            (dbname, application_name),
        )
        return int(rows[0][0])

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(psycopg2.Error):
            self.execute(
                "postgres",
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                ),
            )


@contextlib.contextmanager
def dedicated_server(settings: Optional[Dict[str, Any]] = None) -> Iterator[Dedicated]:
    """Start a throwaway server (TCP too); stop and delete it afterwards.

    Its data lives in a ``scratch_dir()``, not in pytest's ``tmp_path``: under root
    the server's user cannot enter pytest's folders (/tmp/pytest-of-root is 0700).
    """
    port = free_port()
    conf: Dict[str, Any] = {"synchronous_commit": "on", "port": port}
    conf.update(settings or {})
    root = scratch_dir("pgaccess-dedicated-")
    server = EmbeddedServer(root / "data", durable=False, settings=conf, tcp=True)
    try:
        server.start()
        yield Dedicated(server, port)
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)
