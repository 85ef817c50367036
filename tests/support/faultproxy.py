"""TCP proxy on 127.0.0.1 that injects network faults between libpq and PostgreSQL.

Point a client at ``127.0.0.1:proxy.port`` instead of the server, then call
``reset_all``, ``refuse``, ``set_latency``, ``stall`` or ``drop_after`` while the
test runs. Bytes are forwarded unchanged; the proxy only *reads* the PostgreSQL
wire protocol (to find statements for ``drop_after``).

What callers must know:

* Connect with ``sslmode=disable`` (and preferably ``gssencmode=disable``). A
  connection that negotiates TLS or GSS encryption is forwarded opaquely, so
  ``drop_after`` can never fire on it; every other fault still works.
* All sockets are served by one daemon thread using ``selectors``; every public
  method is thread-safe and may be called from any thread.
* ``stop()`` (or leaving the ``with`` block) closes the listener and every
  connection and joins the thread. A stopped proxy cannot be started again.
* Target the server by host/port, or by its Unix socket file with
  ``FaultProxy.unix("/run/postgresql/.s.PGSQL.5432")``.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future
from functools import partial
from types import TracebackType
from typing import Callable, Deque, List, Optional, Tuple, Type, TypeVar, Union

__all__ = ["FaultProxy"]

_T = TypeVar("_T")

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_MAX_STARTUP_LEN = 10_000
_MAX_MESSAGE_LEN = 1 << 30
_RECV_SIZE = 65536
_HIGH_WATER = 1 << 20  # stop reading a side while its peer has this much unsent
_MAX_SELECT_WAIT = 1.0
_JOIN_TIMEOUT = 10.0

_Q = ord("Q")  # simple query
_P = ord("P")  # Parse (extended protocol)
_S = ord("S")  # Sync
_F = ord("F")  # FunctionCall (answered with ReadyForQuery like 'Q')
_Z = ord("Z")  # ReadyForQuery (server -> client)

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


def _rst(sock: socket.socket) -> None:
    """Close ``sock`` abortively (SO_LINGER 0 makes TCP send RST, not FIN)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _MessageReader:
    """Incremental splitter of typed PostgreSQL messages (type byte, int32 length).

    ``feed`` returns the completed messages as ``(type, body)``; the body is only
    kept for types in ``keep`` (``None`` otherwise). ``broken`` becomes True on a
    length that cannot be PostgreSQL, after which nothing more is reported.
    """

    def __init__(self, keep: Tuple[int, ...]) -> None:
        self._keep = keep
        self._header = bytearray()
        self._remaining = 0
        self._in_body = False
        self._type = 0
        self._body: Optional[bytearray] = None
        self.broken = False

    def feed(self, data: bytes) -> List[Tuple[int, Optional[bytes]]]:
        out: List[Tuple[int, Optional[bytes]]] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end and not self.broken:
            if not self._in_body:
                take = min(5 - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < 5:
                    break
                length = struct.unpack("!i", self._header[1:5])[0]
                if length < 4 or length > _MAX_MESSAGE_LEN:
                    self.broken = True
                    break
                self._type = self._header[0]
                self._header.clear()
                self._remaining = length - 4
                self._body = bytearray() if self._type in self._keep else None
                self._in_body = True
            else:
                take = min(self._remaining, end - pos)
                if self._body is not None:
                    self._body += view[pos : pos + take]
                pos += take
                self._remaining -= take
            if self._in_body and self._remaining == 0:
                body = bytes(self._body) if self._body is not None else None
                out.append((self._type, body))
                self._in_body = False
                self._body = None
        return out


def _query_text(mtype: int, body: bytes) -> Optional[str]:
    """Return the SQL text of a 'Q' or 'P' message body, or None if malformed."""
    if mtype == _P:
        name_end = body.find(b"\0")
        if name_end < 0:
            return None
        body = body[name_end + 1 :]
    text_end = body.find(b"\0")
    if text_end < 0:
        return None
    return body[:text_end].decode("utf-8", errors="replace")


class _Protocol:
    """Tracks one connection's PostgreSQL protocol state in both directions.

    Counts sync points sent by the client ('Q', 'F', 'S' and the startup packet)
    and ReadyForQuery messages received from the server: the n-th ReadyForQuery
    answers the n-th sync point, which is how a drop waits for "the reply to"
    a statement. TLS/GSS-encrypted or unparsable streams become ``opaque``.
    """

    def __init__(self) -> None:
        self.phase = "startup"  # startup | negotiating | messages | opaque
        self._startup = bytearray()
        self._client = _MessageReader(keep=(_Q, _P))
        self._server = _MessageReader(keep=())
        self.syncs = 0
        self.ready = 0

    def from_client(self, data: bytes) -> List[Tuple[str, int]]:
        """Feed client bytes; return ``(query text, ReadyForQuery index)`` pairs."""
        if self.phase == "startup":
            data = self._feed_startup(data)
        elif self.phase == "negotiating" and data:
            self.phase = "opaque"  # client must wait for the server's answer
        if self.phase != "messages" or not data:
            return []
        found: List[Tuple[str, int]] = []
        for mtype, body in self._client.feed(data):
            if mtype in (_Q, _F, _S):
                self.syncs += 1
            if body is not None:
                text = _query_text(mtype, body)
                if text is not None:
                    # A Parse is answered at the next Sync; a Query by itself.
                    found.append((text, self.syncs + (1 if mtype == _P else 0)))
        if self._client.broken:
            self.phase = "opaque"
        return found

    def from_server(self, data: bytes) -> None:
        """Feed server bytes (counts ReadyForQuery messages)."""
        if self.phase == "negotiating":
            if data[:1] == b"N" and len(data) == 1:
                self.phase = "startup"  # plaintext; client sends a new packet
            else:
                self.phase = "opaque"  # 'S'/'G': encrypted from here on
            return
        if self.phase != "messages":
            return
        for mtype, _body in self._server.feed(data):
            if mtype == _Z:
                self.ready += 1
        if self._server.broken:
            self.phase = "opaque"

    def _feed_startup(self, data: bytes) -> bytes:
        """Consume the untyped startup packet; return the bytes after it."""
        self._startup += data
        if len(self._startup) < 4:
            return b""
        length = struct.unpack("!i", self._startup[:4])[0]
        if not 8 <= length <= _MAX_STARTUP_LEN:  # e.g. direct TLS (0x16...)
            self.phase = "opaque"
            return b""
        if len(self._startup) < length:
            return b""
        code = struct.unpack("!i", self._startup[4:8])[0]
        rest = bytes(self._startup[length:])
        self._startup.clear()
        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
            self.phase = "opaque" if rest else "negotiating"
            return b""
        if code == _CANCEL_REQUEST:
            self.phase = "opaque"
            return b""
        self.phase = "messages"
        self.syncs = 1  # the server ends the startup phase with ReadyForQuery
        return rest


class _DropRule:
    """One armed ``drop_after`` rule."""

    def __init__(self, text: str, times: int, reply_timeout: float) -> None:
        self.text = text
        self.remaining = times
        self.reply_timeout = reply_timeout


class _Side:
    """One socket of a proxied connection plus the bytes waiting to be sent to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out: Deque[Tuple[float, bytes]] = deque()  # (due time, data)
        self.out_bytes = 0
        self.eof = False  # read EOF from this socket
        self.shut_wr = False  # we sent FIN to this socket
        self.events = 0  # currently registered selector events


class _Conn:
    """A proxied client <-> server connection."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = _Side(client)
        self.server = _Side(server)
        self.connecting = True
        self.protocol = _Protocol()
        self.drop_at_ready: Optional[int] = None  # armed: drop at this many 'Z'
        self.drop_deadline = math.inf
        self.closed = False

    def peer(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client


class _Loop:
    """The selector loop that owns every socket of one started FaultProxy."""

    def __init__(self, proxy: FaultProxy, listener: socket.socket) -> None:
        self.proxy = proxy
        self.listener = listener
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, _READ, self._on_accept)
        self.sel.register(self.wake_r, _READ, self._on_wake)
        self.conns: List[_Conn] = []
        # Guarded by proxy._lock:
        self.commands: Deque[Callable[[], None]] = deque()
        self.running = True
        self.stop_requested = False
        self.thread = threading.Thread(
            target=self._run,
            name=f"faultproxy-{listener.getsockname()[1]}",
            daemon=True,
        )

    # -- control (any thread) -------------------------------------------------

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # buffer full (already woken) or closed
            self.wake_w.send(b"\0")

    def call(self, fn: Callable[[], _T], default: _T) -> _T:
        """Run ``fn`` on the loop thread and return its result (``default`` if
        the loop is no longer running)."""
        fut: Future[_T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        with self.proxy._lock:
            if not self.running:
                return default
            self.commands.append(run)
        self.wake()
        return fut.result(timeout=_JOIN_TIMEOUT)

    # -- loop thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.proxy._lock:
                    commands = list(self.commands)
                    self.commands.clear()
                for command in commands:
                    command()
                with self.proxy._lock:
                    if self.stop_requested:
                        return
                    stalled = self.proxy._stalled
                now = time.monotonic()
                for conn in list(self.conns):
                    if conn.drop_at_ready is not None and now >= conn.drop_deadline:
                        self._drop(conn)
                    elif not stalled:
                        self._flush(conn, now)
                timeout = self._update_interest(stalled, now)
                for key, mask in self.sel.select(timeout):
                    key.data(mask)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        for conn in list(self.conns):
            self._close(conn, rst=False)
        for sock in (self.listener, self.wake_r, self.wake_w):
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            sock.close()
        self.sel.close()
        with self.proxy._lock:
            self.running = False
            commands = list(self.commands)
            self.commands.clear()
        for command in commands:  # callers are waiting; conns are gone now
            command()

    def _on_wake(self, _mask: int) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _on_accept(self, _mask: int) -> None:
        for _ in range(64):
            try:
                client, _addr = self.listener.accept()
            except OSError:  # EAGAIN when drained; EMFILE etc. retried later
                return
            if self.proxy._refusing():
                _rst(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.proxy._lock:
                self.proxy._connections_total += 1
            server = self._open_upstream()
            if server is None:
                _rst(client)  # target down: the client sees a reset
                continue
            conn = _Conn(client, server[0])
            conn.connecting = not server[1]
            self.conns.append(conn)
            with self.proxy._lock:
                self.proxy._active = len(self.conns)

    def _open_upstream(self) -> Optional[Tuple[socket.socket, bool]]:
        """Start a non-blocking connect to the target: (socket, connected) or None."""
        p = self.proxy
        sock: Optional[socket.socket] = None
        try:
            if p._unix_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                rc = sock.connect_ex(p._unix_path)
            else:
                info = socket.getaddrinfo(
                    p._target_host, p._target_port, type=socket.SOCK_STREAM
                )[0]
                sock = socket.socket(info[0], info[1], info[2])
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rc = sock.connect_ex(info[4])
        except OSError:
            if sock is not None:
                sock.close()
            return None
        if rc == 0:
            return sock, True
        if rc == errno.EINPROGRESS:
            return sock, False
        sock.close()
        return None

    def _on_event(self, conn: _Conn, side: _Side, mask: int) -> None:
        if conn.closed:
            return
        if side is conn.server and conn.connecting:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close(conn, rst=True)
            else:
                conn.connecting = False
            return
        if mask & _READ:
            self._read(conn, side)
        # Writes happen in _flush, which runs on every loop iteration.

    def _read(self, conn: _Conn, src: _Side) -> None:
        try:
            data = src.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by that peer: pass the reset on
            if conn.drop_at_ready is not None and src is conn.server:
                self._drop(conn)
            else:
                self._close(conn, rst=True)
            return
        now = time.monotonic()
        if src is conn.client:
            if not data:
                src.eof = True
                return
            for text, ready_index in conn.protocol.from_client(data):
                if conn.drop_at_ready is None:
                    rule = self.proxy._take_rule(text)
                    if rule is not None:
                        conn.drop_at_ready = ready_index
                        wait = self.proxy._get_latency() + rule.reply_timeout
                        conn.drop_deadline = now + wait
            self._enqueue(conn.server, data, now)
            return
        # server -> client
        if conn.drop_at_ready is not None:
            # Armed: withhold everything; drop once the reply is complete.
            if not data:
                self._drop(conn)
                return
            conn.protocol.from_server(data)
            if conn.protocol.ready >= conn.drop_at_ready:
                self._drop(conn)
            return
        if not data:
            src.eof = True
            return
        conn.protocol.from_server(data)
        self._enqueue(conn.client, data, now)

    def _enqueue(self, dst: _Side, data: bytes, now: float) -> None:
        dst.out.append((now + self.proxy._get_latency(), data))
        dst.out_bytes += len(data)

    def _flush(self, conn: _Conn, now: float) -> None:
        """Send every due chunk, propagate half-closes, close finished conns."""
        for side in (conn.client, conn.server):
            if side is conn.server and conn.connecting:
                continue
            try:
                while side.out and side.out[0][0] <= now:
                    due, data = side.out[0]
                    sent = side.sock.send(data)
                    side.out_bytes -= sent
                    if sent < len(data):
                        side.out[0] = (due, data[sent:])
                        break
                    side.out.popleft()
                if not side.out and conn.peer(side).eof and not side.shut_wr:
                    side.sock.shutdown(socket.SHUT_WR)
                    side.shut_wr = True
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self._close(conn, rst=True)
                return
        if conn.client.shut_wr and conn.server.shut_wr:
            self._close(conn, rst=False)

    def _update_interest(self, stalled: bool, now: float) -> float:
        """(Re)register each socket's events; return how long select may wait."""
        timeout = _MAX_SELECT_WAIT
        for conn in self.conns:
            if conn.drop_at_ready is not None:
                timeout = min(timeout, conn.drop_deadline - now)
            for side in (conn.client, conn.server):
                peer = conn.peer(side)
                want = 0
                if side is conn.server and conn.connecting:
                    want = _WRITE
                elif not stalled:
                    if not side.eof and peer.out_bytes < _HIGH_WATER:
                        want |= _READ
                    if side.out:
                        due = side.out[0][0]
                        if due <= now:
                            want |= _WRITE
                        else:
                            timeout = min(timeout, due - now)
                if want != side.events:
                    if side.events == 0:
                        self.sel.register(
                            side.sock, want, partial(self._on_event, conn, side)
                        )
                    elif want == 0:
                        self.sel.unregister(side.sock)
                    else:
                        self.sel.modify(
                            side.sock, want, partial(self._on_event, conn, side)
                        )
                    side.events = want
        return max(timeout, 0.0)

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        with self.proxy._lock:  # count first: the client may look right after RST
            self.proxy._drops += 1
        self._close(conn, rst=True)

    def _close(self, conn: _Conn, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.remove(conn)
        with self.proxy._lock:  # update first: the peers may look right after close
            self.proxy._active = len(self.conns)
        for side in (conn.client, conn.server):
            if side.events:
                self.sel.unregister(side.sock)
                side.events = 0
            if rst:
                _rst(side.sock)
            else:
                side.sock.close()

    def reset_all(self) -> int:
        conns = list(self.conns)
        for conn in conns:
            self._close(conn, rst=True)
        return len(conns)


class FaultProxy:
    """TCP proxy on 127.0.0.1 in front of a PostgreSQL server, for fault injection.

    Use as ``with FaultProxy(host, port) as proxy:`` and connect the client to
    ``proxy.host:proxy.port`` with ``sslmode=disable``. Faults affect only the
    traffic through this proxy; the server itself is never touched.
    """

    host: str = "127.0.0.1"

    def __init__(
        self, target_host: str, target_port: int, *, listen_port: int = 0
    ) -> None:
        """Configure (but do not start) a proxy forwarding to target_host:target_port.

        ``listen_port`` 0 picks a free port at ``start()``; read it from ``port``.
        """
        self._target_host = target_host
        self._target_port = target_port
        self._unix_path: Optional[str] = None
        self._listen_port = listen_port
        self._lock = threading.Lock()
        self._loop: Optional[_Loop] = None
        self._port: Optional[int] = None
        self._started = False
        self._stopped = False
        self._latency = 0.0
        self._stalled = False
        self._refuse_until: Optional[float] = None  # monotonic; math.inf = forever
        self._rules: List[_DropRule] = []
        self._connections_total = 0
        self._refused = 0
        self._active = 0
        self._drops = 0

    @classmethod
    def unix(
        cls, path: Union[str, os.PathLike[str]], *, listen_port: int = 0
    ) -> FaultProxy:
        """Create a proxy whose target is a Unix socket file, e.g. ``.s.PGSQL.5432``.

        ``path`` is the socket file itself, not its directory. Clients still
        connect to the proxy over TCP on 127.0.0.1.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"{path!r} is a directory; pass the .s.PGSQL.<port> file")
        proxy = cls("", 0, listen_port=listen_port)
        proxy._unix_path = path
        return proxy

    def __repr__(self) -> str:
        target = self._unix_path or f"{self._target_host}:{self._target_port}"
        return f"<FaultProxy {self.host}:{self._port} -> {target}>"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind 127.0.0.1:listen_port and serve in a background daemon thread.

        Returns self. Raises RuntimeError if called twice or after ``stop()``,
        OSError if the port cannot be bound.
        """
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("FaultProxy can only be started once")
            self._started = True
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._listen_port))
            listener.listen(128)
            listener.setblocking(False)
            loop = _Loop(self, listener)
        except BaseException:
            listener.close()
            raise
        self._port = listener.getsockname()[1]
        self._loop = loop
        loop.thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection (FIN) and join the thread.

        Idempotent and safe before ``start()``. Afterwards the port refuses
        connections and no proxy thread or socket remains.
        """
        with self._lock:
            self._stopped = True
            loop = self._loop
            if loop is not None:
                loop.stop_requested = True
        if loop is None:
            return
        loop.wake()
        if loop.thread is not threading.current_thread():
            loop.thread.join(_JOIN_TIMEOUT)
            if loop.thread.is_alive():
                raise RuntimeError(f"{loop.thread.name} did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port the proxy listens on; RuntimeError before ``start()``."""
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    # -- faults --------------------------------------------------------------------

    def reset_all(self) -> int:
        """RST both sides of every open connection now; return how many there were.

        Returns once the sockets are closed. New connections are still accepted.
        """
        loop = self._loop
        if loop is None:
            return 0
        return loop.call(loop.reset_all, 0)

    def refuse(self, seconds: Optional[float]) -> None:
        """Refuse new connections for ``seconds`` (None: until ``allow()``).

        The TCP handshake completes (the kernel does it) but each new connection
        is then reset at once, so libpq fails with "connection reset" / "server
        closed the connection unexpectedly". Open connections are unaffected.
        """
        with self._lock:
            if seconds is None:
                self._refuse_until = math.inf
            elif seconds > 0:
                self._refuse_until = time.monotonic() + seconds
            else:
                self._refuse_until = None

    def allow(self) -> None:
        """Accept and forward new connections again (ends ``refuse``)."""
        with self._lock:
            self._refuse_until = None

    def set_latency(self, seconds: float) -> None:
        """Delay every forwarded chunk, in both directions, by ``seconds`` (0: off).

        Chunks are pipelined, not serialized: each is sent no earlier than
        ``seconds`` after it was received, so a request/reply round trip gains
        at least 2 * seconds. Applies to chunks received after the call.
        """
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._latency = float(seconds)
        self._wake()

    def stall(self) -> None:
        """Blackhole every connection until ``unstall()``: forward nothing, no RST/FIN.

        Sockets stay open and unread, so clients block until their own
        timeouts. New connections are accepted but stalled too. Held data is
        delivered after ``unstall()``. ``reset_all``/``stop`` still work.
        """
        with self._lock:
            self._stalled = True
        self._wake()

    def unstall(self) -> None:
        """Resume forwarding after ``stall()``, delivering any held data."""
        with self._lock:
            self._stalled = False
        self._wake()

    def drop_after(
        self, statement_contains: str, *, times: int = 1, reply_timeout: float = 2.0
    ) -> None:
        """Arm an ambiguous-outcome fault: let a statement run, then lose the reply.

        When the client sends a simple-query ('Q') or Parse ('P') message whose
        SQL contains ``statement_contains``, it is forwarded; from then on no
        server byte reaches the client, and once the server has answered it
        (its ReadyForQuery: statement finished, and committed if autocommit) or
        ``reply_timeout`` seconds have passed, both sides of that connection
        are reset. The server has executed the statement; the client gets an
        OperationalError. For 'P' the answer awaited is the one at the next
        Sync, so a Parse+Sync-only prepare is dropped without executing.
        ``times`` = how many connections to drop before the rule disarms; each
        call adds a rule. Needs ``sslmode=disable`` (TLS hides statements).
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        if not statement_contains:
            raise ValueError("statement_contains must not be empty")
        with self._lock:
            self._rules.append(_DropRule(statement_contains, times, reply_timeout))

    # -- counters --------------------------------------------------------------------

    @property
    def drops(self) -> int:
        """How many connections ``drop_after`` has reset so far."""
        with self._lock:
            return self._drops

    @property
    def connections_total(self) -> int:
        """Connections accepted and proxied so far (refused ones not included)."""
        with self._lock:
            return self._connections_total

    @property
    def connections_refused(self) -> int:
        """Connections reset at once because of ``refuse()``."""
        with self._lock:
            return self._refused

    @property
    def active_connections(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return self._active

    # -- internals (called by _Loop) -------------------------------------------

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.wake()

    def _get_latency(self) -> float:
        with self._lock:  # read per chunk: a snapshot could predate set_latency()
            return self._latency

    def _refusing(self) -> bool:
        with self._lock:
            until = self._refuse_until
            if until is None:
                return False
            if time.monotonic() >= until:
                self._refuse_until = None
                return False
            self._refused += 1
            return True

    def _take_rule(self, text: str) -> Optional[_DropRule]:
        with self._lock:
            for rule in self._rules:
                if rule.text in text:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._rules.remove(rule)
                    return rule
        return None
