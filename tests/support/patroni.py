"""A three-node Patroni cluster on loopback, for the ``patroni`` test tier.

``patroni_cluster()`` starts one etcd (Debian's ``etcd-server``) and three Patroni
nodes (Patroni from PyPI: the ``ha`` extra) on 127.0.0.1, on the embedded server's
binaries (``server_bin_dir()``), as the server's OS user; waits for a leader and two
streaming replicas; and stops everything on the way out, however the block ends.

What a test can do with it: ask who leads (``leader()``, from Patroni's REST API),
``switchover()`` through that API, ``stop_node()`` (SIGTERM: Patroni stops
PostgreSQL and hands the leader key over), ``kill_node()`` (SIGKILL of Patroni and of
its postmaster: a node that dies; the others wait for the key's ``ttl``),
``start_node()`` (a stopped node rejoins, rewound by ``pg_rewind``), and reach the
cluster through ``dsn()``: ``host=127.0.0.1,... port=p1,p2,p3`` with any libpq
parameters, e.g. ``target_session_attrs="read-write"``.

Logins need the cluster's password (scram, as for the embedded server); test clients
read it from a password file of the invoking user's (``passfile``), Patroni from its
own config file (the server user's, 0600). Replication logs in as ``replicator``.

Patroni runs as the server's user, so that user must be able to run a Python with
Patroni installed: this interpreter, or the system's Python of the same version with
this environment's site-packages on ``PYTHONPATH``. Where that, etcd or Patroni is
missing, the test skips with the reason (``skip_unless_available``; a failure under
``.ci/run``, which installs them).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import psycopg2
from psycopg2.extensions import make_dsn

from pgaccess.embedded import (
    free_port,
    scratch_dir,
    server_bin_dir,
    server_user,
    system_home,
)
from support.tools import skip_unless_available

__all__ = ["PatroniCluster", "patroni_cluster", "patroni_unavailable"]

SUPERUSER = "postgres"
REPLICATOR = "replicator"


def _etcd_program() -> Optional[str]:
    return shutil.which("etcd") or shutil.which("etcd", path="/usr/sbin:/usr/bin")


@functools.cache
def _python_for_server_user() -> Tuple[Optional[str], Dict[str, str], str]:
    """A Python the server's user can run Patroni with, its environment; or why not.

    First this interpreter's own packages; where the server's user cannot read them
    (a virtualenv under root's 0700 home, as a CI checkout may be), a copy of Patroni
    installed once into a folder of pgaccess's own that it can read
    (``_server_readable_site``)."""
    site = os.pathsep.join(
        dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    )
    python, env, why = _probe_pythons(site)
    if python is None and os.geteuid() == 0:
        try:
            python, env, why = _probe_pythons(_server_readable_site())
        except (OSError, subprocess.SubprocessError) as exc:
            why += f"; a copy it could read could not be installed: {exc}"
    return python, env, why


def _probe_pythons(site: str) -> Tuple[Optional[str], Dict[str, str], str]:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": site, "LC_ALL": "C.UTF-8"}
    why = ""
    for python in dict.fromkeys(candidates):
        if not os.path.exists(python):
            continue
        try:
            probe = subprocess.run(
                [python, "-c", "import patroni.__main__, psycopg2, yaml"],
                capture_output=True,
                text=True,
                timeout=60,
                user=server_user(),
                env=env,
                cwd="/",
            )
        except OSError as exc:  # e.g. a folder on its path the user cannot enter
            why = f"{python}: {exc.strerror}"
            continue
        if probe.returncode == 0:
            return python, env, ""
        why = f"{python}: {probe.stderr.strip().splitlines()[-1:]}"
    return None, env, why


def _server_readable_site() -> str:
    """Patroni (the version installed here) and what it imports, installed once with
    this interpreter's pip into ``/var/lib/pgaccess/patroni-<version>-py<X.Y>``: a
    folder pgaccess creates (root's, 0755), which the server's user can read."""
    from importlib.metadata import version

    wanted = [
        f"patroni[etcd3]=={version('patroni')}",
        f"psycopg2-binary=={version('psycopg2-binary')}",
    ]
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    target = system_home() / f"patroni-{version('patroni')}-py{py}"
    if (target / ".complete").exists():
        return str(target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--target",
            str(partial),
            *wanted,
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    (partial / ".complete").touch()
    try:
        partial.rename(target)
    except OSError:  # another run made it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def patroni_unavailable() -> Optional[str]:
    """Why a Patroni cluster cannot run here, or None when it can."""
    try:
        import patroni  # noqa: F401
    except ImportError:
        return (
            "Patroni is not installed (pip install -e '.[ha]'); the patroni tests "
            "need it"
        )
    if _etcd_program() is None:
        return (
            "etcd is not installed (Debian: apt-get install etcd-server); the "
            "patroni tests need it"
        )
    python, _env, why = _python_for_server_user()
    if python is None:
        return (
            f"Patroni runs as the server's user {server_user()}, which cannot run a "
            f"Python with Patroni installed ({why})"
        )
    return None


def _die_with_parent() -> None:
    """In the child: SIGTERM when pytest dies, so no cluster outlives a killed run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


class _Process:
    """A program run as the server's user, logging to a file, stopped by its PID."""

    def __init__(self, args: List[str], log: Path, env: Dict[str, str]) -> None:
        self.args = args
        self.log = log
        self.env = env
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=server_user(),
                env=self.env,
                cwd="/",
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""


class PatroniNode:
    """One Patroni process and the PostgreSQL it runs."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self.datadir = folder / "data"
        self.pg_port = free_port()
        self.api_port = free_port()
        self.process: Optional[_Process] = None

    def __repr__(self) -> str:
        return f"<PatroniNode {self.name} pg={self.pg_port} api={self.api_port}>"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def postmaster_pid(self) -> Optional[int]:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, PermissionError):
            return None
        return int(first) if first.strip().isdigit() else None


class PatroniCluster:
    """etcd and Patroni nodes on loopback; see the module's docstring."""

    #: Patroni's own timings: ``ttl`` of the leader key (Patroni's minimum, 20 s),
    #: the HA loop, and how long a DCS or PostgreSQL call is retried.
    TTL = 20
    LOOP_WAIT = 1
    RETRY_TIMEOUT = 5
    START_TIMEOUT = 120.0

    def __init__(self, nodes: int = 3, *, synchronous: bool = False) -> None:
        self.synchronous = synchronous
        self.scope = f"pgaccess-{secrets.token_hex(4)}"
        self.root = scratch_dir("pgaccess-patroni-")
        self.password = secrets.token_urlsafe(24)
        #: The test clients' password file (the invoking user's, 0600).
        self.passfile = self.root.with_name(self.root.name + ".pgpass")
        self.nodes = [
            PatroniNode(f"node{i + 1}", self.root / f"node{i + 1}")
            for i in range(nodes)
        ]
        self.etcd_port = free_port()
        self._etcd: Optional[_Process] = None
        python, self._env, _why = _python_for_server_user()
        self._python = python or sys.executable

    def __repr__(self) -> str:
        return f"<PatroniCluster {self.scope} {self.nodes}>"

    # ----------------------------------------------------------------- reach
    def dsn(self, dbname: str = "postgres", **params: Any) -> str:
        """Every node in one libpq DSN, in node order, plus ``params``."""
        return str(
            make_dsn(
                host=",".join("127.0.0.1" for _ in self.nodes),
                port=",".join(str(n.pg_port) for n in self.nodes),
                user=SUPERUSER,
                dbname=dbname,
                passfile=str(self.passfile),
                sslmode="disable",
                **params,
            )
        )

    def node_dsn(self, name: str, dbname: str = "postgres", **params: Any) -> str:
        node = self.node(name)
        return str(
            make_dsn(
                host="127.0.0.1",
                port=node.pg_port,
                user=SUPERUSER,
                dbname=dbname,
                passfile=str(self.passfile),
                sslmode="disable",
                **params,
            )
        )

    def node(self, name: str) -> PatroniNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def members(self) -> List[Dict[str, Any]]:
        """Patroni's view (``GET /cluster``), asked of any node that answers."""
        error: Optional[Exception] = None
        for node in self.nodes:
            try:
                return list(_http("GET", f"{node.api}/cluster", timeout=3)["members"])
            except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
                error = exc
        raise RuntimeError(f"no Patroni node answers: {error}")

    def leader(self) -> Optional[str]:
        """The running leader's name, or None while there is none."""
        with contextlib.suppress(RuntimeError):
            for member in self.members():
                if member.get("role") == "leader" and member.get("state") == "running":
                    return str(member["name"])
        return None

    def wait_ready(
        self, timeout: float = START_TIMEOUT, replicas: Optional[int] = None
    ) -> str:
        """Wait for a running leader and ``replicas`` streaming ones; the leader."""
        want = len(self.nodes) - 1 if replicas is None else replicas
        deadline = time.monotonic() + timeout
        while True:
            members: List[Dict[str, Any]] = []
            with contextlib.suppress(RuntimeError):
                members = self.members()
            leaders = [
                m["name"]
                for m in members
                if m.get("role") == "leader" and m.get("state") == "running"
            ]
            streaming = [m for m in members if m.get("state") == "streaming"]
            # Patroni names the leader as soon as it holds the key; the server may
            # still be promoting. Ready means writable.
            ready = len(leaders) == 1 and len(streaming) >= want
            if ready and self._writable(leaders[0]):
                return str(leaders[0])
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no leader with {want} streaming replicas after {timeout:.0f} s: "
                    f"{members}\n{self._logs()}"
                )
            time.sleep(0.1)

    def _writable(self, name: str) -> bool:
        try:
            conn = psycopg2.connect(self.node_dsn(name), connect_timeout=3)
        except psycopg2.Error:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                row = cur.fetchone()
                return row is not None and not row[0]
        except psycopg2.Error:
            return False
        finally:
            conn.close()

    # ---------------------------------------------------------------- control
    def heal(self) -> str:
        """Start every node that is not running; wait until the cluster is ready.

        What a test calls first, so that it does not inherit a node an earlier
        test stopped or killed. Returns the leader.
        """
        for node in self.nodes:
            if node.process is None or not node.process.alive():
                self.start_node(node.name)
        return self.wait_ready()

    def start(self) -> PatroniCluster:
        """Start etcd and every node; return once the cluster is ready."""
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:*:*:{SUPERUSER}:{self.password}\n")
        self._start_etcd()
        for node in self.nodes:
            self._own(node.folder, directory=True)
            self._write_config(node)
            self.start_node(node.name)
        self.wait_ready()
        return self

    def switchover(self, candidate: Optional[str] = None) -> Tuple[str, float]:
        """Switch over through the leader's REST API; (new leader, seconds it took).

        The seconds run from the request to the new leader taking writes; returns
        once every other node streams from it again.
        """
        leader = self.wait_ready()
        body: Dict[str, Any] = {"leader": leader}
        if candidate is not None:
            body["candidate"] = candidate
        t0 = time.monotonic()
        _http("POST", f"{self.node(leader).api}/switchover", body, timeout=60)
        deadline = time.monotonic() + self.START_TIMEOUT
        while True:
            new = self.leader()
            if new is not None and new != leader and self._writable(new):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the switchover from {leader} did not happen")
            time.sleep(0.05)
        took = time.monotonic() - t0
        self.wait_ready()
        return new, took

    def start_node(self, name: str) -> None:
        node = self.node(name)
        node.process = _Process(
            [self._python, "-m", "patroni", str(node.folder / "patroni.yml")],
            node.folder / "patroni.log",
            self._env,
        )
        node.process.start()

    def stop_node(self, name: str) -> None:
        """SIGTERM to Patroni: it stops PostgreSQL and gives the leader key up."""
        node = self.node(name)
        if node.process is not None:
            node.process.stop(signal.SIGTERM, timeout=60)

    def kill_node(self, name: str) -> None:
        """SIGKILL to Patroni and to its postmaster: the node dies at once."""
        node = self.node(name)
        postmaster = node.postmaster_pid()
        if node.process is not None:
            node.process.stop(signal.SIGKILL)
        if postmaster is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGKILL)

    def close(self) -> None:
        """Stop every node and etcd, then delete every file. Idempotent."""
        # SIGTERM to every Patroni at once (each stops its PostgreSQL), then wait.
        for node in self.nodes:
            if node.process is not None:
                node.process.send(signal.SIGTERM)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.stop_node(node.name)
        for node in self.nodes:  # a postmaster whose Patroni was killed
            pid = node.postmaster_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)  # immediate shutdown
        if self._etcd is not None:
            self._etcd.stop()
        for node in self.nodes:
            self._wait_gone(node)
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.passfile.unlink()

    # --------------------------------------------------------------- helpers
    @staticmethod
    def _wait_gone(node: PatroniNode, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while (pid := node.postmaster_pid()) is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    def _start_etcd(self) -> None:
        program = _etcd_program()
        assert program is not None
        folder = self.root / "etcd"
        self._own(folder, directory=True)
        peer = f"http://127.0.0.1:{free_port()}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self._etcd = _Process(
            [
                program, "--name", "etcd0", "--data-dir", str(folder / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd0={peer}",
                "--initial-cluster-state", "new",
            ],
            folder / "etcd.log",
            {"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        self._etcd.start()
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                if _http("GET", f"{client}/health", timeout=2).get("health") == "true":
                    return
            if not self._etcd.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start; its log:\n{self._etcd.tail()}")
            time.sleep(0.05)

    def _write_config(self, node: PatroniNode) -> None:
        socket_dir = node.folder / "socket"
        self._own(socket_dir, directory=True)
        hba = [
            "local all all scram-sha-256",
            "host all all 127.0.0.1/32 scram-sha-256",
            "local replication all scram-sha-256",
            "host replication all 127.0.0.1/32 scram-sha-256",
        ]
        parameters = {
            "max_connections": 200,
            "wal_level": "replica",
            "hot_standby": "on",
            "wal_log_hints": "on",
            "full_page_writes": "on",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "256MB",
            "synchronous_commit": "on",
            "fsync": "off",  # throwaway clusters; no OS crash is simulated
            "unix_socket_directories": str(socket_dir),
            "unix_socket_permissions": "0700",
            "password_encryption": "scram-sha-256",
        }
        config = {
            "scope": self.scope,
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"127.0.0.1:{node.api_port}",
                "connect_address": f"127.0.0.1:{node.api_port}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": self.TTL,
                    "loop_wait": self.LOOP_WAIT,
                    "retry_timeout": self.RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": self.synchronous,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": parameters,
                        "pg_hba": hba,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.pg_port}",
                "connect_address": f"127.0.0.1:{node.pg_port}",
                "data_dir": str(node.datadir),
                "bin_dir": str(server_bin_dir()),
                "pgpass": str(node.folder / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": self.password},
                    "replication": {
                        "username": REPLICATOR,
                        "password": self.password,
                    },
                    "rewind": {"username": SUPERUSER, "password": self.password},
                },
                "parameters": {
                    "unix_socket_directories": str(socket_dir),
                    "unix_socket_permissions": "0700",
                },
                "pg_hba": hba,
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        path = node.folder / "patroni.yml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, indent=1)  # JSON is YAML
        self._own(path)

    @staticmethod
    def _own(path: Path, directory: bool = False) -> None:
        """Make ``path`` (0700 if a folder) the server user's."""
        if directory:
            path.mkdir(mode=0o700, exist_ok=True)
        user = server_user()
        if user is not None:
            shutil.chown(path, user=user)

    def _logs(self) -> str:
        parts = []
        for node in self.nodes:
            if node.process is not None:
                parts.append(f"--- {node.name}:\n{node.process.tail()}")
        return "\n".join(parts)


@contextlib.contextmanager
def patroni_cluster(
    nodes: int = 3, *, synchronous: bool = False
) -> Iterator[PatroniCluster]:
    """A started Patroni cluster; stopped and deleted afterwards, on every path.

    Skips the calling test, with the reason, where Patroni or etcd cannot run.
    """
    skip_unless_available(patroni_unavailable())
    cluster = PatroniCluster(nodes, synchronous=synchronous)
    try:
        yield cluster.start()
    finally:
        cluster.close()
