"""PgBouncer in front of a test server, in transaction mode, as production runs it.

``PgBouncer(target_dsn)`` is one PgBouncer process in front of the server that
``target_dsn`` reaches (every database of it: a ``*`` entry), listening on a free
port on 127.0.0.1, with ``pool_mode = transaction``. It runs as the server's own OS
user (PgBouncer, like PostgreSQL, refuses root), in the foreground, and is stopped by
its PID. Its files (config, auth file, log) are in a 0700 folder of that user's.

Logins: clients log in with the server's password (the test DSNs name the password
file); PgBouncer checks it against the user's SCRAM secret, read from ``pg_authid``
into its ``auth_file``, and logs in to the server with the keys of the client's own
SCRAM exchange. No password is written anywhere. A server that trusts its clients
(``rolpassword`` NULL) gets ``auth_type = trust`` in PgBouncer too.

``query_wait_timeout`` (PgBouncer's default 120 s: a caller waits that long for a
dead server) and ``server_login_retry`` are arguments; any other setting goes in
``settings``. ``per_node(servers)`` starts one per server, as a pooler on every node
of a replicated group.

Where the ``pgbouncer`` program is missing or cannot run, ``running_pgbouncer`` and
``per_node`` skip the test with the reason (``skip_unless_available``); under
``.ci/run``, which installs it, that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from pgaccess.embedded import EmbeddedServer, free_port, scratch_dir, server_user
from support.dedicated import admin_query
from support.tools import skip_unless_available

__all__ = [
    "PgBouncer",
    "per_node",
    "pgbouncer_program",
    "pgbouncer_unavailable",
    "running_pgbouncer",
]


def pgbouncer_program() -> Optional[str]:
    """The pgbouncer executable (Debian installs it in /usr/sbin), or None."""
    return shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path="/usr/sbin:/usr/local/sbin"
    )


def pgbouncer_unavailable() -> Optional[str]:
    """Why PgBouncer cannot run here, or None when it can."""
    program = pgbouncer_program()
    if program is None:
        return (
            "pgbouncer is not installed (Debian: apt-get install pgbouncer); the "
            "tests through PgBouncer need it"
        )
    try:
        proc = subprocess.run(
            [program, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            user=server_user(),
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{program} cannot run as the server's user: {exc}"
    if proc.returncode != 0:
        return f"{program} --version failed: {proc.stderr.strip()}"
    return None


class PgBouncer:
    """One PgBouncer process in front of the server ``target_dsn`` reaches."""

    #: How long ``start()`` waits for PgBouncer to listen.
    START_TIMEOUT = 30.0

    def __init__(
        self,
        target_dsn: str,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 20,
        query_wait_timeout: Optional[float] = None,
        server_login_retry: Optional[float] = None,
        settings: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.target_dsn = target_dsn
        params = parse_dsn(target_dsn)
        self.user = params.get("user") or "postgres"
        self.passfile = params.get("passfile")
        self.settings: Dict[str, Any] = {
            "pool_mode": pool_mode,
            "default_pool_size": pool_size,
            "max_client_conn": 1000,
            "admin_users": self.user,
        }
        if query_wait_timeout is not None:
            self.settings["query_wait_timeout"] = query_wait_timeout
        if server_login_retry is not None:
            self.settings["server_login_retry"] = server_login_retry
        self.settings.update(settings or {})
        self.port = free_port()
        self.folder: Optional[Path] = None
        self.process: Optional[subprocess.Popen[bytes]] = None

    def __repr__(self) -> str:
        return f"<PgBouncer 127.0.0.1:{self.port} pid={self.pid}>"

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def dsn(self, dbname: str = "postgres", **params: Any) -> str:
        """A DSN for ``dbname`` through this PgBouncer (TCP, the server's password)."""
        return str(
            make_dsn(
                host="127.0.0.1",
                port=self.port,
                user=self.user,
                dbname=dbname,
                passfile=self.passfile,
                sslmode="disable",
                **params,
            )
        )

    def admin(self, command: str) -> List[Dict[str, Any]]:
        """A command on PgBouncer's admin console (``SHOW POOLS``, ``RECONNECT``)."""
        conn = psycopg2.connect(self.dsn("pgbouncer"))
        try:
            conn.autocommit = True  # the console has no transactions
            with conn.cursor() as cur:
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [d.name for d in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()

    # --------------------------------------------------------------- control
    def start(self) -> PgBouncer:
        """Write the config and start PgBouncer; return once it listens."""
        program = pgbouncer_program()
        if program is None:
            raise RuntimeError(pgbouncer_unavailable())
        self.folder = scratch_dir("pgaccess-pgbouncer-")
        config = self._write_files(self.folder)
        self.process = subprocess.Popen(
            [program, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=server_user(),
            cwd="/",
        )
        deadline = time.monotonic() + self.START_TIMEOUT
        while not self._listens():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"PgBouncer did not start; its log:\n{log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL after 10 s); delete its files. Idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def kill(self) -> None:
        """SIGKILL, as a crashed pooler: its clients lose their connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        if self.folder is None:
            return ""
        try:
            return (self.folder / "pgbouncer.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    # --------------------------------------------------------------- helpers
    def _listens(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _write_files(self, folder: Path) -> Path:
        target = parse_dsn(self.target_dsn)
        secret = self._secret()
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256" if secret else "trust",
            "auth_file": str(folder / "userlist.txt"),
            "logfile": str(folder / "pgbouncer.log"),
            "log_connections": 0,
            "log_disconnections": 0,
            **self.settings,
        }
        host = target.get("host") or "/tmp"
        port = target.get("port") or 5432
        lines = ["[databases]", f"* = host={host} port={port}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        user = server_user()
        self._write(folder / "userlist.txt", f'"{self.user}" "{secret or ""}"\n', user)
        config = folder / "pgbouncer.ini"
        self._write(config, "\n".join(lines) + "\n", user)
        return config

    @staticmethod
    def _write(path: Path, text: str, user: Optional[str]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        if user is not None:
            shutil.chown(path, user=user)

    def _secret(self) -> Optional[str]:
        rows = admin_query(
            self.target_dsn,
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s",
            (self.user,),
        )
        secret = rows[0][0] if rows else None
        if secret is not None and not str(secret).startswith("SCRAM-SHA-256$"):
            raise RuntimeError(
                f"the password of {self.user!r} is not a SCRAM secret, which this "
                "PgBouncer set-up needs"
            )
        return str(secret) if secret is not None else None


@contextlib.contextmanager
def running_pgbouncer(target_dsn: str, **options: Any) -> Iterator[PgBouncer]:
    """A started PgBouncer in front of ``target_dsn``'s server; stopped afterwards.

    Skips the calling test, with the reason, where PgBouncer cannot run.
    """
    skip_unless_available(pgbouncer_unavailable())
    bouncer = PgBouncer(target_dsn, **options)
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()


@contextlib.contextmanager
def per_node(
    targets: Sequence[Union[EmbeddedServer, str]], **options: Any
) -> Iterator[List[PgBouncer]]:
    """One started PgBouncer in front of each target, in order; stopped afterwards.

    A target is an ``EmbeddedServer`` (reached over its socket) or a node's DSN (a
    Patroni node's ``node_dsn()``).
    """
    skip_unless_available(pgbouncer_unavailable())
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(
                running_pgbouncer(
                    t.dsn() if isinstance(t, EmbeddedServer) else t, **options
                )
            )
            for t in targets
        ]
