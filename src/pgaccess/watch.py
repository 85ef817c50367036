"""The monitor thread of a pool: leak reports and the stall cut-off.

One thread per pool, started only when ``leak_threshold`` or ``stall_timeout`` is set;
checkouts and returns never wait for it. It holds its pool weakly and ends when the
pool is closed or freed. Everything it decides about a connection it decides under the
pool's lock, for the lease it saw: a connection returned and lent again meanwhile is a
new lease and is left alone (see ``PooledConnection.lease``).

Also the TCP_INFO helpers the stall cut-off stands on (Linux).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
import weakref
from types import FrameType
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple

from .connection import STATUS_ACTIVE, PooledConnection

__all__ = [
    "LEAKS_REPORTED",
    "STALLS_DETECTED",
    "TCP_INFO_AVAILABLE",
    "Stalled",
    "Watched",
    "borrower_stack",
    "cut_stalled",
    "inspect",
    "report_leaks",
    "shut_down",
    "silent_for",
    "stalled_candidates",
    "start_monitor",
    "tcp_ident",
]

logger = logging.getLogger("pgaccess.watch")

#: The pool's statistics this module counts.
LEAKS_REPORTED = "leaks_reported"
STALLS_DETECTED = "stalls_detected"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB = contextlib.__file__

# struct tcp_info (linux/tcp.h): tcpi_last_data_sent, tcpi_last_ack_sent and
# tcpi_last_data_recv, milliseconds since then, start at byte 44.
_TCP_TIMES = struct.Struct("III")
_TCP_TIMES_AT = 44
_TCP_INFO_LEN = _TCP_TIMES_AT + _TCP_TIMES.size
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only
TCP_INFO_AVAILABLE = _TCP_INFO is not None

TcpIdent = Tuple[int, Any, Any]


class Watched(Protocol):
    """What the monitor needs of a pool (``ConnectionPool`` provides it)."""

    name: str
    lock: threading.Lock
    counters: Dict[str, int]
    leak_threshold: Optional[float]
    stall_timeout: Optional[float]
    monitor: Optional[threading.Thread]

    @property
    def closed(self) -> bool: ...

    def lent_connections(self) -> Iterable[PooledConnection]:
        """The connections out on a lease (caller holds ``lock``)."""

    def still_lent(self, conn: PooledConnection, lease: int) -> bool:
        """Whether ``conn`` is still out on ``lease`` (caller holds ``lock``)."""


def start_monitor(pool: Watched) -> None:
    """Start the pool's monitor thread, once; a closed pool gets none."""
    periods = [
        limit / 4
        for limit in (pool.leak_threshold, pool.stall_timeout)
        if limit is not None
    ]
    period = min(max(min(periods), 0.01), 1.0)
    with pool.lock:
        if pool.monitor is not None or pool.closed:
            return
        thread = threading.Thread(
            target=_run,
            args=(weakref.ref(pool), period),
            name=f"pgaccess-monitor-{pool.name}",
            daemon=True,
        )
        pool.monitor = thread
    thread.start()


def _run(ref: weakref.ReferenceType[Watched], period: float) -> None:
    """The monitor thread: holds its pool weakly, ends when the pool is closed."""
    me = threading.current_thread()
    while True:
        time.sleep(period)
        pool = ref()
        if pool is None or pool.closed or pool.monitor is not me:
            return
        try:
            inspect(pool)
        except Exception:
            logger.exception("the monitor of the pool %r failed", pool.name)
        del pool


def inspect(pool: Watched) -> None:
    """One look by the monitor: report leaks, cut stalled connections."""
    now = time.monotonic()
    if pool.leak_threshold is not None:
        report_leaks(pool, now)
    if pool.stall_timeout is not None:
        cut_stalled(pool, stalled_candidates(pool))


def report_leaks(pool: Watched, now: float) -> int:
    """Log, once per lease, each watched connection held past ``leak_threshold``.

    Decided under the pool's lock, where returns clear a lease's record, so a
    connection given back meanwhile is never reported. Returns how many were reported.
    """
    limit = pool.leak_threshold
    if limit is None:
        return 0
    stacks: List[str] = []
    with pool.lock:
        for conn in pool.lent_connections():
            stack = conn.borrower_stack
            if (
                stack is not None
                and not conn.leak_reported
                and now - conn.lent_at > limit
            ):
                conn.leak_reported = True
                pool.counters[LEAKS_REPORTED] += 1
                stacks.append(stack)
    for stack in stacks:  # logging can block on its handlers: outside the lock
        logger.warning(
            "a connection of the pool %r has been held for more than %.3g s; "
            "borrowed at:\n%s",
            pool.name, limit, stack,
        )  # fmt: skip
    return len(stacks)


class Stalled:
    """A lent TCP connection found silent for ``silent`` seconds, on lease ``lease``."""

    __slots__ = ("conn", "ident", "lease", "silent")

    def __init__(
        self, conn: PooledConnection, lease: int, ident: TcpIdent, silent: float
    ) -> None:
        self.conn = conn
        self.lease = lease
        self.ident = ident
        self.silent = silent


def stalled_candidates(pool: Watched) -> List[Stalled]:
    """Lent TCP connections silent for ``stall_timeout`` or longer, with their lease.

    The silence is measured outside the lock (a getsockopt per connection); whether to
    cut is decided by ``cut_stalled`` under it.
    """
    stall = pool.stall_timeout
    if stall is None:
        return []
    with pool.lock:
        lent = [
            (conn, conn.lease, conn.tcp_ident)
            for conn in pool.lent_connections()
            if conn.tcp_ident is not None
        ]
    found = []
    for conn, lease, ident in lent:
        assert ident is not None
        silent = silent_for(ident)
        if silent is not None and silent >= stall:
            found.append(Stalled(conn, lease, ident, silent))
    return found


def cut_stalled(pool: Watched, candidates: Iterable[Stalled]) -> int:
    """Shut down the socket of each candidate still on the same lease and waiting for
    the reply to a command; its borrower then gets ``ConnectionLost``.

    The lease is checked and the socket shut down under the pool's lock: a connection
    returned and lent again since it was measured is a new lease, whose command may
    have just been sent. ``shutdown()`` does not block, so holding the lock is cheap.
    Returns how many were cut.
    """
    cut: List[Stalled] = []
    with pool.lock:
        for c in candidates:
            conn = c.conn
            if (
                pool.still_lent(conn, c.lease)
                and not conn.closed
                and conn.get_transaction_status() == STATUS_ACTIVE
                and shut_down(c.ident)
            ):
                pool.counters[STALLS_DETECTED] += 1  # before the borrower wakes up
                cut.append(c)
    for c in cut:
        logger.warning(
            "pool %r: a command has waited %.1f s with no byte received or sent "
            "(stall_timeout %.3g s); the network path looks dead, so its socket was "
            "shut down and the call fails with ConnectionLost",
            pool.name, c.silent, pool.stall_timeout,
        )  # fmt: skip
    return len(cut)


def borrower_stack(limit: int = 12) -> str:
    """The caller's stack, from the first frame outside pgaccess and contextlib."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        or frame.f_code.co_filename == _CONTEXTLIB
    ):
        frame = frame.f_back
    return "".join(traceback.format_stack(frame or sys._getframe(1), limit=limit))


def tcp_ident(fd: int) -> Optional[TcpIdent]:
    """(fd, local address, peer address) of a TCP socket; None for a Unix socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return (fd, sock.getsockname(), sock.getpeername())
    except OSError:
        return None
    finally:
        sock.detach()  # libpq owns the descriptor


def _socket_of(ident: TcpIdent) -> Optional[socket.socket]:
    """A socket object on the descriptor, if it is still the same connection.

    The connection may have been closed since, and its number reused by another.
    The caller must ``detach()`` it: libpq owns the descriptor.
    """
    fd, local, peer = ident
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.getsockname() == local and sock.getpeername() == peer:
            return sock
    except OSError:
        pass
    sock.detach()
    return None


def silent_for(ident: TcpIdent) -> Optional[float]:
    """Seconds since data last went either way on a TCP connection, as the kernel
    counts it: ACKs and keepalives do not count, so a path that stopped delivering
    shows here even when TCP's own timers cannot see it (a proxy or a middlebox that
    keeps acknowledging, a peer whose kernel answers while its process is frozen)."""
    sock = _socket_of(ident)
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)  # type: ignore[arg-type]
    except OSError:
        return None
    finally:
        sock.detach()
    sent, _acked, received = _TCP_TIMES.unpack_from(info, _TCP_TIMES_AT)
    return float(min(sent, received)) / 1000


def shut_down(ident: TcpIdent) -> bool:
    """Shut a connection's socket down; the thread blocked in libpq on it wakes up
    and reports the connection lost. Does not block."""
    sock = _socket_of(ident)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        sock.detach()
    return True
