"""Waking idle workers: a LISTEN connection of their own, and the wake-up they wait on.

- :class:`Wakeup`: idle worker threads wait on it (with a timeout: the polling
  fallback); ``wake(n)`` lets at most ``n`` of them go, never more than are waiting.
- :class:`Listener`: one dedicated connection (not a pooled one: LISTEN needs a
  session, and a pooled connection is lent to other callers or sits behind a
  transaction-mode PgBouncer) that LISTENs on the queue's channel, in a daemon
  thread. Each notification carries how many jobs became due; the listener sums
  what arrived and calls ``on_jobs(total)``. A lost connection is logged once at
  WARNING, reconnected with a backoff (``INITIAL_DELAY`` doubling to ``MAX_DELAY``),
  and its return logged at INFO; meanwhile the workers' polling finds the jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from time import monotonic
from typing import Any, Callable, Dict, Optional

import psycopg2
import psycopg2.extensions as ext

from ..config import redact_dsn
from ..pool import CONNECT_DEFAULTS

__all__ = ["Listener", "Wakeup"]

logger = logging.getLogger("pgaccess.jobs.listener")


class Wakeup:
    """Where idle worker threads wait for new jobs; thread-safe.

    ``wake(n)`` hands out at most ``n`` permits, and never more than there are
    threads waiting without one, so a storm of notifications wakes no more threads
    than there are jobs, and permits do not pile up for threads that are busy.

    A notification that comes while a thread's claim runs may announce a job that
    claim did not see, with nobody waiting to take it: ``generation`` counts the
    wakes; a thread reads it before it claims and passes it to ``wait``, which
    returns at once if a wake came in between (one more claim, rather than a job
    left for the next poll).
    """

    __slots__ = ("_closed", "_cond", "_idle", "_permits", "generation")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._idle = 0
        self._permits = 0
        self._closed = False
        #: How many times ``wake`` announced jobs.
        self.generation = 0

    def wait(self, timeout: float, seen: Optional[int] = None) -> bool:
        """Wait up to ``timeout`` seconds; True when woken by ``wake``, or at once
        when a wake came since ``generation`` was ``seen``."""
        deadline = monotonic() + timeout
        with self._cond:
            if seen is not None and seen != self.generation:
                return True
            self._idle += 1
            try:
                while self._permits == 0:
                    left = deadline - monotonic()
                    if left <= 0 or self._closed:
                        return False
                    self._cond.wait(left)
                self._permits -= 1
                return True
            finally:
                self._idle -= 1

    def wake(self, n: int) -> int:
        """Let up to ``n`` waiting threads go; return how many were let go."""
        with self._cond:
            if n > 0:
                self.generation += 1
            n = min(n, self._idle - self._permits)
            if n > 0:
                self._permits += n
                self._cond.notify(n)
            return max(n, 0)

    def close(self) -> None:
        """Wake every waiting thread, now and later (for stop)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def idle(self) -> int:
        """How many threads wait now."""
        with self._cond:
            return self._idle


def _payload_count(payload: str) -> int:
    try:
        return max(int(payload.split(None, 1)[0]), 0)
    except (ValueError, IndexError):
        return 1  # someone else's NOTIFY on our channel: one look costs little


class Listener:
    """A dedicated connection LISTENing on ``channel``, in a daemon thread.

    ``on_jobs(n)`` is called from the listener's thread with the number of jobs the
    notifications that arrived together announce (and with 1 after each connect:
    jobs may have come while it was away). ``start()`` returns at once; ``stop()``
    ends the thread and closes the connection. The DSN's own settings are kept;
    pgaccess's keepalive defaults fill in what it does not set, so a dead path is
    noticed. While quiet, it checks its connection every ``CHECK_INTERVAL`` s.
    """

    INITIAL_DELAY: float = 0.1
    MAX_DELAY: float = 10.0
    CHECK_INTERVAL: float = 30.0
    CONNECT_TIMEOUT: int = 10

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_jobs: Callable[[int], Any],
        *,
        name: str = "pgaccess-listener",
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_jobs = on_jobs
        self.name = name
        self.connected = threading.Event()
        #: Connections made (the first, then each reconnect), and notifications read.
        self.connects = 0
        self.notifications = 0
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = os.pipe()
        self._conn: Optional[Any] = None
        self.backend_pid: Optional[int] = None

    def __repr__(self) -> str:
        state = "connected" if self.connected.is_set() else "not connected"
        return f"<Listener {self.name!r} {state} dsn={redact_dsn(self.dsn)!r}>"

    def start(self) -> None:
        """Start the thread; it connects, and reconnects, by itself."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (does not wait; see ``join``)."""
        if not self._stopping.is_set():
            self._stopping.set()
            with contextlib.suppress(OSError):  # closed already
                os.write(self._wake_w, b"x")

    @property
    def alive(self) -> bool:
        """Whether its thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread to end (after ``stop``); True if it did."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        return True

    # ------------------------------------------------------------- thread
    def _connect(self) -> Any:
        given: Dict[str, str] = {}
        with contextlib.suppress(psycopg2.ProgrammingError):  # libpq will say why
            given = dict(ext.parse_dsn(self.dsn)) if self.dsn else {}
        kwargs: Dict[str, Any] = {
            k: v for k, v in CONNECT_DEFAULTS.items() if k not in given
        }
        if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ:
            kwargs["connect_timeout"] = self.CONNECT_TIMEOUT
        conn = psycopg2.connect(self.dsn, **kwargs)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'LISTEN "{self.channel}"')  # a constant, not input
            self.backend_pid = conn.get_backend_pid()
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        delay = self.INITIAL_DELAY
        down = False  # an outage was logged and not yet its end
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                if not down:
                    logger.warning(
                        "%s: cannot LISTEN (%s); workers poll until it is back",
                        self.name,
                        str(exc).strip(),
                    )
                    down = True
                else:
                    logger.debug("%s: reconnect failed: %s", self.name, exc)
                self._sleep(delay)
                delay = min(delay * 2, self.MAX_DELAY)
                continue
            if down:
                logger.info("%s: listening again", self.name)
                down = False
            delay = self.INITIAL_DELAY
            self.connects += 1
            self._conn = conn
            self.connected.set()
            try:
                self.on_jobs(1)
                self._listen(conn)
            except Exception as exc:
                if not self._stopping.is_set():
                    logger.warning(
                        "%s: the LISTEN connection was lost (%s); reconnecting, "
                        "workers poll meanwhile",
                        self.name,
                        str(exc).strip() or type(exc).__name__,
                    )
                    down = True
            finally:
                self.connected.clear()
                self._conn = None
                conn.close()
            if down:
                self._sleep(delay)
                delay = min(delay * 2, self.MAX_DELAY)

    def _sleep(self, seconds: float) -> None:
        if not self._stopping.is_set():
            select.select([self._wake_r], [], [], seconds)

    def _listen(self, conn: Any) -> None:
        """Read notifications until stopped; raises when the connection fails."""
        wake_r = self._wake_r
        quiet_since = monotonic()
        while not self._stopping.is_set():
            ready, _, _ = select.select([conn, wake_r], [], [], self.CHECK_INTERVAL)
            if wake_r in ready:
                return
            if not ready and monotonic() - quiet_since >= self.CHECK_INTERVAL:
                with conn.cursor() as cur:  # raises on a dead connection
                    cur.execute("SELECT 1")
                quiet_since = monotonic()
            conn.poll()
            notifies = conn.notifies
            if notifies:
                quiet_since = monotonic()
                total = 0
                count = 0
                while notifies:
                    total += _payload_count(notifies.pop().payload)
                    count += 1
                self.notifications += count
                if total:
                    self.on_jobs(total)
