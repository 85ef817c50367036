"""Reads on standbys: the read executor, and read-your-writes by LSN.

``Database(dsn=..., read_dsn=...)`` has two pools: writes, transactions and the queue
on the primary; reads outside a transaction (``find_one``, ``find_many``, ``count``,
``exists``, a SELECT through ``execute``) on the read pool, through
:class:`ReadRouter`.

Read-your-writes: a standby replays the primary's WAL a little later, so a thread
that has just written could read the row as it was before. ``WriteMarks`` notes,
per thread, that it wrote through the primary's pool (every write statement and
every transaction does, before it runs); the thread's next standby read first asks
the primary how far its WAL goes (``pg_current_wal_insert_lsn()``, one round trip,
only after a write) and reads from the standby once that has replayed so far
(``pg_last_wal_replay_lsn()``), waiting up to ``read_wait`` seconds, else from the
primary. A connection remembers what its standby was seen to have replayed, so
later reads on it cost no check. ``token()`` and ``after(token)`` carry the same
promise to another thread or process.

A read that turns out to write (``SELECT nextval(...)``: SQLSTATE 25006 on a
standby) is run again on the primary; nothing was done on the standby.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import psycopg2

from . import sql as q
from .errors import ReadOnlyNode, translate
from .executor import Autocommit, Params, Retrying, TransactionExecutor, joined
from .pool import ConnectionPool, PooledConnection
from .retry import RetryPolicy
from .stats import Recorder

__all__ = ["Lagging", "ReadRouter", "StandbyReads", "WriteMarks", "lsn_int"]


def lsn_int(lsn: str) -> int:
    """A WAL position ``'16/B374D848'`` as an integer, to compare."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


class WriteMarks:
    """Per thread: whether it wrote since its LSN was last taken, and that LSN."""

    def __init__(self) -> None:
        self._local = threading.local()

    def wrote(self) -> None:
        """This thread is about to write through the primary's pool (the hot path:
        one attribute set)."""
        self._local.dirty = True

    def required(self, primary: ConnectionPool) -> int:
        """The WAL position this thread's reads must see (0: none)."""
        local = self._local
        if local.__dict__.get("dirty"):
            query = "SELECT pg_current_wal_insert_lsn()::text"
            with primary.connection() as conn, conn.cursor() as cur:
                try:
                    cur.execute(query)
                    row = cur.fetchone()
                except psycopg2.Error as exc:  # still dirty: the next read asks again
                    raise translate(exc, query, connection=conn) from exc
            # Cleared after the answer, which covers every write made before it.
            local.dirty = False
            current = lsn_int(row[0]) if row else 0
            local.lsn = max(current, local.__dict__.get("lsn", 0))
        return int(local.__dict__.get("lsn", 0))

    def require(self, lsn: int) -> None:
        """Make this thread's reads see at least ``lsn``."""
        self._local.lsn = max(lsn, self._local.__dict__.get("lsn", 0))


class Lagging(Exception):
    """The standby has not replayed this thread's writes within ``read_wait``."""


class StandbyReads(Autocommit):
    """Autocommit on the read pool, on a connection whose standby has replayed what
    the thread must see (else ``Lagging``): the check and the read on one connection,
    so a read DSN listing several standbys cannot check one and read another."""

    __slots__ = ("marks", "primary", "read_wait")

    #: Between two looks at a standby's replay position while waiting for it.
    POLL_START = 0.0001
    POLL_MAX = 0.02

    def __init__(
        self,
        pool: ConnectionPool,
        record: Recorder,
        primary: ConnectionPool,
        marks: Optional[WriteMarks],
        read_wait: float,
    ) -> None:
        super().__init__(pool, record, lambda: pool)
        self.primary = primary
        self.marks = marks
        self.read_wait = read_wait

    def transaction(self) -> Optional[TransactionExecutor]:
        return joined(self.primary)

    def run(self, st: q.Statement, params: Params, mode: int, write: bool) -> Any:
        lsn = self.marks.required(self.primary) if self.marks is not None else 0
        pool = self.pool
        conn = pool.acquire()
        try:
            if lsn > _replayed(conn) and not self._wait_for(conn, lsn):
                raise Lagging
            return self.run_on(pool, conn, st, params, mode, write)
        finally:
            pool.release(conn)

    def _wait_for(self, conn: PooledConnection, lsn: int) -> bool:
        """Whether the standby of ``conn`` replays ``lsn`` within ``read_wait``."""
        deadline = time.monotonic() + self.read_wait
        pause = self.POLL_START
        with conn.cursor() as cur:
            while True:
                try:
                    cur.execute("SELECT pg_last_wal_replay_lsn()::text")
                    row = cur.fetchone()
                except psycopg2.Error as exc:
                    err = translate(exc, "pg_last_wal_replay_lsn", connection=conn)
                    raise err from exc
                if row is None or row[0] is None:  # a primary: always current
                    conn.__dict__["replayed"] = _CURRENT
                    return True
                conn.__dict__["replayed"] = seen = lsn_int(row[0])
                if seen >= lsn:
                    return True
                if time.monotonic() + pause > deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, self.POLL_MAX)


class ReadRouter:
    """The read executor of a Database with a read pool.

    Inside a transaction on the primary's pool, reads join it. Otherwise they go to
    the read pool once its standby has replayed this thread's writes, else (after
    ``read_wait``) to the primary; a read that writes goes to the primary.
    """

    def __init__(self, primary: Retrying, replica: Retrying) -> None:
        self.primary = primary
        self.replica = replica
        #: Reads the primary served because the standby lagged or the read wrote.
        self.lagging = 0
        self.refused = 0

    def run(
        self,
        st: q.Statement,
        params: Params,
        mode: int,
        write: bool,
        retry: Optional[RetryPolicy] = None,
        again: Optional[Callable[[BaseException], Any]] = None,
    ) -> Any:
        if self.primary.transaction() is not None:
            return self.primary.run(st, params, mode, write, retry, again)
        try:
            return self.replica.run(st, params, mode, write, retry, again)
        except Lagging:
            self.lagging += 1
        except ReadOnlyNode:
            # It writes (nextval(), a function): nothing ran; the primary does it.
            self.refused += 1
            write = True
        return self.primary.run(st, params, mode, write, retry, again)


_CURRENT = 1 << 64  # a primary's replay position: past any LSN


def _replayed(conn: PooledConnection) -> int:
    return int(conn.__dict__.get("replayed", 0))
