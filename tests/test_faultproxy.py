"""Tests of the fault-injection proxy in tests/support/faultproxy.py."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import psycopg2
import pytest
from support.faultproxy import FaultProxy

from pgaccess.testing import TestServer

pytestmark = pytest.mark.faults

RESET_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


class EchoServer:
    """Threaded echo server on 127.0.0.1 (or a Unix socket) that records resets."""

    def __init__(self, unix_path: Optional[str] = None) -> None:
        family = socket.AF_UNIX if unix_path else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(unix_path or ("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.address: Any = self.listener.getsockname()
        self.resets = 0
        self.eofs = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.05)
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    with self._lock:
                        self.resets += 1
                    return
                except OSError:
                    return
                if not data:
                    with self._lock:
                        self.eofs += 1
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._accept_thread.join(5)
        self.listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.address[1]) as p:
        yield p


def connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, payload: bytes) -> float:
    start = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - start


def wait_for(predicate: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def proxy_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- generic behaviour (echo server) ---------------------------------------------


def test_forwards_both_directions(proxy: FaultProxy) -> None:
    payload = os.urandom(300_000)
    with connect(proxy) as a, connect(proxy) as b:
        roundtrip(a, payload)
        roundtrip(b, b"hello")
        roundtrip(a, b"x")
        assert proxy.connections_total == 2
        assert proxy.active_connections == 2
    assert wait_for(lambda: proxy.active_connections == 0)
    assert proxy.connections_total == 2


def test_half_close_is_propagated(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        roundtrip(sock, b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""  # echo server saw EOF and closed
    assert wait_for(lambda: echo.eofs == 1)
    assert wait_for(lambda: proxy.active_connections == 0)


def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert roundtrip(sock, b"warm") < 0.2
        proxy.set_latency(0.15)
        elapsed = roundtrip(sock, b"slow")
        assert 0.3 - 0.01 <= elapsed < 1.0
        proxy.set_latency(0)
        assert roundtrip(sock, b"fast") < 0.1


def test_reset_all_resets_client_and_server(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    with connect(proxy) as a, connect(proxy) as b:
        roundtrip(a, b"1")
        roundtrip(b, b"2")
        assert proxy.reset_all() == 2
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            a.recv(10)
        assert time.monotonic() - start < 0.5
        with pytest.raises(RESET_ERRORS):
            b.sendall(b"more")
            b.recv(10)
    assert proxy.active_connections == 0
    assert wait_for(lambda: echo.resets == 2)
    assert proxy.reset_all() == 0
    with connect(proxy) as c:  # still accepting afterwards
        roundtrip(c, b"3")


def assert_refused(proxy: FaultProxy) -> None:
    errors = (*RESET_ERRORS, ConnectionRefusedError, EOFError)
    with pytest.raises(errors), connect(proxy) as sock:
        sock.sendall(b"hello")
        recv_exactly(sock, 5)


def test_refuse_until_allow(proxy: FaultProxy) -> None:
    with connect(proxy) as existing:
        roundtrip(existing, b"before")
        proxy.refuse(None)
        assert_refused(proxy)
        assert_refused(proxy)
        roundtrip(existing, b"open connections are unaffected")
    assert proxy.connections_refused == 2
    proxy.allow()
    with connect(proxy) as sock:
        roundtrip(sock, b"after")
    assert proxy.connections_total == 2


def test_refuse_for_seconds(proxy: FaultProxy) -> None:
    proxy.refuse(0.3)
    assert_refused(proxy)
    time.sleep(0.35)
    with connect(proxy) as sock:
        roundtrip(sock, b"back")


def test_stall_blackholes_until_unstall(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        roundtrip(sock, b"before")
        proxy.stall()
        sock.settimeout(0.5)
        sock.sendall(b"held")
        with pytest.raises(socket.timeout):
            sock.recv(10)
        assert proxy.active_connections == 1
        assert echo.resets == 0 and echo.eofs == 0
        proxy.unstall()
        sock.settimeout(2)
        assert recv_exactly(sock, 4) == b"held"
        roundtrip(sock, b"after")


def test_stop_is_idempotent_and_leaks_nothing(echo: EchoServer) -> None:
    fds_before = open_fds()
    proxy = FaultProxy("127.0.0.1", echo.address[1]).start()
    port = proxy.port
    assert len(proxy_threads()) == 1
    with connect(proxy) as a, connect(proxy) as b:
        roundtrip(a, b"a")
        roundtrip(b, b"b")
        proxy.stop()
        proxy.stop()
        assert not proxy_threads()
        for sock in (a, b):
            with contextlib.suppress(*RESET_ERRORS):
                assert sock.recv(10) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert wait_for(lambda: open_fds() <= fds_before)
    assert proxy.reset_all() == 0
    with pytest.raises(RuntimeError):
        proxy.start()


def test_stop_before_start_and_port_before_start() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(RuntimeError):
        _ = proxy.port
    assert proxy.reset_all() == 0
    proxy.stop()
    assert not proxy_threads()


def test_target_down_resets_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        assert_refused(proxy)
        assert wait_for(lambda: proxy.active_connections == 0)


def test_unix_socket_target(tmp_path: Path) -> None:
    path = str(tmp_path / ".s.PGSQL.5432")
    server = EchoServer(unix_path=path)
    try:
        with pytest.raises(ValueError):
            FaultProxy.unix(tmp_path)
        with FaultProxy.unix(path) as proxy, connect(proxy) as sock:
            roundtrip(sock, b"via unix socket")
    finally:
        server.close()


# -- drop_after against a real PostgreSQL -------------------------------------------


def pg_target(server: TestServer) -> Tuple[str, int]:
    """The session's server over TCP (the embedded one listens on 127.0.0.1 too)."""
    target = os.environ.get("PGACCESS_TEST_PROXY_TARGET")
    if target:
        host, _, port = target.rpartition(":")
        return host, int(port)
    params = psycopg2.extensions.parse_dsn(server.admin_dsn)
    host = params.get("host") or "127.0.0.1"
    if host.startswith("/"):
        host = "127.0.0.1"
    return host, int(params.get("port") or 5432)


PG_USER = os.environ.get("PGUSER", "postgres")
PG_DBNAME = os.environ.get("PGDATABASE", "postgres")
#: The session server's credentials (the embedded one's password file), set by ``pg``.
PG_AUTH: Dict[str, str] = {}


def pg_connect(host: str, port: int) -> Any:
    conn = psycopg2.connect(
        host=host,
        port=port,
        user=PG_USER,
        dbname=PG_DBNAME,
        sslmode="disable",
        connect_timeout=5,
        **PG_AUTH,
    )
    conn.autocommit = True
    return conn


@pytest.fixture
def pg(pgaccess_server: TestServer) -> Iterator[Tuple[str, int]]:
    params = psycopg2.extensions.parse_dsn(pgaccess_server.admin_dsn)
    PG_AUTH.clear()
    PG_AUTH.update({k: params[k] for k in ("passfile", "password") if k in params})
    yield pg_target(pgaccess_server)


@pytest.fixture
def scratch(pg: Tuple[str, int]) -> Iterator[str]:
    table = f"faultproxy_scratch_{uuid.uuid4().hex[:12]}"
    conn = pg_connect(*pg)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id int)")
        yield table
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        conn.close()


def rows(pg: Tuple[str, int], table: str) -> List[int]:
    conn = pg_connect(*pg)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT id FROM {table} ORDER BY id")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def test_drop_after_insert_commits_but_client_fails(
    pg: Tuple[str, int], scratch: str
) -> None:
    with FaultProxy(*pg) as proxy:
        proxy.drop_after(f"INSERT INTO {scratch}")
        conn = pg_connect(proxy.host, proxy.port)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 41 + 1")  # not matching: forwarded normally
                assert cur.fetchone() == (42,)
                start = time.monotonic()
                with pytest.raises(psycopg2.OperationalError):
                    cur.execute(f"INSERT INTO {scratch} VALUES (1)")
                assert time.monotonic() - start < 1.5  # dropped at the reply
            assert conn.closed != 0
        finally:
            conn.close()
        assert proxy.drops == 1
        assert rows(pg, scratch) == [1]

        # The rule has disarmed: the same statement now goes through.
        conn = pg_connect(proxy.host, proxy.port)
        try:
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {scratch} VALUES (2)")
                cur.execute(f"SELECT count(*) FROM {scratch}")
                assert cur.fetchone() == (2,)
        finally:
            conn.close()
        assert proxy.drops == 1
        assert proxy.connections_total == 2


def test_drop_after_times_and_other_connections(
    pg: Tuple[str, int], scratch: str
) -> None:
    with FaultProxy(*pg) as proxy:
        proxy.drop_after(f"INSERT INTO {scratch} VALUES (7", times=2)
        bystander = pg_connect(proxy.host, proxy.port)
        try:
            for value in (70, 71):
                conn = pg_connect(proxy.host, proxy.port)
                try:
                    with pytest.raises(psycopg2.OperationalError):
                        conn.cursor().execute(f"INSERT INTO {scratch} VALUES ({value})")
                    assert conn.closed != 0
                finally:
                    conn.close()
                with bystander.cursor() as cur:  # unaffected connection
                    cur.execute(f"INSERT INTO {scratch} VALUES ({value - 60})")
            with bystander.cursor() as cur:
                cur.execute(f"INSERT INTO {scratch} VALUES (72)")  # disarmed
        finally:
            bystander.close()
        assert proxy.drops == 2
    assert rows(pg, scratch) == [10, 11, 70, 71, 72]


def test_drop_after_parse_message(pg: Tuple[str, int], scratch: str) -> None:
    psycopg = pytest.importorskip("psycopg")  # psycopg 3: extended protocol
    with FaultProxy(*pg) as proxy:
        proxy.drop_after(f"INSERT INTO {scratch}")
        with psycopg.connect(
            host=proxy.host,
            port=proxy.port,
            user=PG_USER,
            dbname=PG_DBNAME,
            sslmode="disable",
            autocommit=True,
            **PG_AUTH,
        ) as conn:
            assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
            with pytest.raises(psycopg.OperationalError):
                conn.execute(f"INSERT INTO {scratch} VALUES (%s)", (3,))
            assert conn.closed
        assert proxy.drops == 1
    assert rows(pg, scratch) == [3]


def test_faults_through_postgres(pg: Tuple[str, int]) -> None:
    with FaultProxy(*pg) as proxy:
        conn = pg_connect(proxy.host, proxy.port)
        try:
            proxy.set_latency(0.1)
            start = time.monotonic()
            conn.cursor().execute("SELECT 1")
            assert time.monotonic() - start >= 0.2 - 0.01
            proxy.set_latency(0)
            assert proxy.reset_all() == 1
            with pytest.raises(psycopg2.OperationalError):
                conn.cursor().execute("SELECT 1")
        finally:
            conn.close()
        proxy.refuse(None)
        with pytest.raises(psycopg2.OperationalError):
            pg_connect(proxy.host, proxy.port)
        proxy.allow()
        pg_connect(proxy.host, proxy.port).close()
