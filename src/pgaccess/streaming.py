"""Streaming reads: rows from a server-side cursor, a batch per round trip.

``db.iter_many(...)`` and ``db.stream(sql)`` return a :class:`RowStream`. It declares
a cursor (``DECLARE ... NO SCROLL CURSOR``) inside a transaction on one connection and
fetches ``batch_size`` rows per round trip, so memory stays flat however many rows
the query returns. The transaction keeps it safe behind PgBouncer in transaction mode
(no ``WITH HOLD`` cursor, no session state).

Outside a transaction the stream borrows a connection of its own: ``BEGIN``, the
``DECLARE`` and the first ``FETCH`` travel in one round trip. The connection goes back
as soon as the last batch has arrived (COMMIT), or when the stream is closed, left by
``break`` (with ``with``, or when the iterator is dropped), or garbage-collected
(ROLLBACK); an error rolls back and returns it. Inside ``db.transaction()`` on the
same thread, the stream runs in that transaction instead (no BEGIN of its own), and
ending it closes its cursor only.
"""

from __future__ import annotations

import itertools
import logging
import threading
from types import TracebackType
from typing import Any, Callable, Dict, Iterator, List, Optional, Type

import psycopg2

from . import sql as q
from .errors import DatabaseError, InvalidQuery, TransactionError, translate
from .executor import Params, TransactionExecutor, execute, fetch_rows
from .pool import ConnectionPool, PooledConnection
from .stats import Recorder

__all__ = ["RowStream", "check_batch_size"]

logger = logging.getLogger("pgaccess.streaming")

Row = Dict[str, Any]

_names = itertools.count(1)
_names_lock = threading.Lock()


def check_batch_size(value: Any) -> int:
    """``batch_size``: an int of at least 1, else ``InvalidQuery``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidQuery(f"batch_size must be a positive integer, got {value!r}")
    return value


def _cursor_name() -> str:
    with _names_lock:
        return f"pgaccess_stream_{next(_names)}"


class RowStream:
    """An iterator over the rows (dicts) of one query, fetched in batches.

    Made by ``Database.iter_many`` / ``Database.stream`` (and the same methods of a
    ``Transaction``), which open it: errors in the statement raise there. Use it in
    a ``for`` loop, or ``with db.stream(...) as rows:`` to end it at the block's end.
    ``close()`` is idempotent. Not for concurrent use by several threads at once;
    handing it to another thread to consume is fine.
    """

    def __init__(
        self,
        statement: q.Statement,
        params: Params,
        batch_size: int,
        record: Recorder,
        *,
        pool: ConnectionPool,
        transaction: Optional[TransactionExecutor],
    ) -> None:
        self._batch = batch_size
        self._record = record
        self._pool = pool
        self._tx = transaction
        self._name = _cursor_name()
        self._rows: Iterator[Row] = iter(())
        self._done = False
        self._conn: Optional[PooledConnection] = None
        self._lease = 0
        if transaction is not None:
            transaction.check()
            transaction.begin_now()
            self._conn = transaction.conn
            self._cur = self._conn.cursor()
            self._first(statement, params, "")
            return
        conn = pool.acquire()
        self._conn, self._lease = conn, conn.lease
        try:
            self._cur = conn.cursor()
        except BaseException:
            self._give_back()
            raise
        # The pool's statement timeout, if any, as the executors send it: local to
        # this transaction, so it bounds each FETCH and leaves nothing in the session.
        set_local = f"{pool.set_local}; " if pool.set_local else ""
        self._first(statement, params, f"BEGIN; {set_local}")

    def _fetch_sql(self) -> str:
        return f'FETCH FORWARD {self._batch} FROM "{self._name}"'

    def _first(self, statement: q.Statement, params: Params, begin: str) -> None:
        """DECLARE and the first FETCH (after ``begin``) in one round trip."""
        try:
            text = statement.text or statement.render(self._cur)
        except BaseException:
            self._end(failed=True)
            raise
        self._label = text
        self._fetch_label = f"FETCH FORWARD FROM ({text})"
        sent = (
            f'{begin}DECLARE "{self._name}" NO SCROLL CURSOR FOR {text}; '
            f"{self._fetch_sql()}"
        )

        def work(cur: Any) -> List[Row]:
            cur.execute(sent, params)
            return fetch_rows(cur)

        self._take(self._run(text, work, params))

    def _run(self, label: str, work: Callable[[Any], List[Row]], params: Params) -> Any:
        """One round trip through the executor's ``execute`` (timed, recorded,
        translated); on any error the stream ends (its transaction rolled back)."""
        assert self._conn is not None
        try:
            return execute(
                self._conn, self._cur, label, work, self._record, write=False,
                params=params,
            )  # fmt: skip
        except BaseException:
            self._end(failed=True)
            raise

    def _take(self, rows: List[Row]) -> None:
        self._rows = iter(rows)
        if len(rows) < self._batch:
            # The last batch is in memory: end now, so the connection goes back while
            # the caller works through it, not after.
            self._end(failed=False)

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> RowStream:
        return self

    def __next__(self) -> Row:
        for row in self._rows:
            return row
        if self._done:
            raise StopIteration
        if self._tx is not None and self._tx.status is not TransactionExecutor.ACTIVE:
            self._done = True
            raise TransactionError(
                f"the transaction this stream ran in is {self._tx.status}: a stream "
                "inside a transaction must be read before the transaction ends"
            )
        fetch = self._fetch_sql()
        self._take(self._run(self._fetch_label, _fetching(fetch), None))
        for row in self._rows:
            return row
        raise StopIteration

    # -------------------------------------------------------------- the end
    def close(self) -> None:
        """End the stream: its cursor closed, its own connection given back."""
        if not self._done:
            self._end(failed=False, early=True)

    def __enter__(self) -> RowStream:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Garbage-collected with rows unread: give the connection back. Never raise
        # from here (and the interpreter may be shutting down).
        try:
            if not self._done:
                self._end(failed=False, early=True)
        except Exception:  # pragma: no cover - nothing to report to
            logger.debug("closing a dropped stream failed", exc_info=True)

    def _end(self, *, failed: bool, early: bool = False) -> None:
        """COMMIT (read to the end) or ROLLBACK (early, failed) and give back the
        connection; in a caller's transaction, CLOSE the cursor (unless the error
        aborted the transaction, whose block rolls it back)."""
        if self._done:
            return
        self._done = True
        if early:
            self._rows = iter(())
        conn = self._conn
        if conn is None:
            return
        tx = self._tx
        if tx is not None:
            if not failed and tx.status is TransactionExecutor.ACTIVE:
                self._quietly(f'CLOSE "{self._name}"', raise_errors=not early)
            return
        try:
            if failed or early:
                self._quietly("ROLLBACK", raise_errors=False)
            else:
                self._quietly("COMMIT", raise_errors=True)
        finally:
            self._give_back()

    def _quietly(self, text: str, *, raise_errors: bool) -> None:
        assert self._conn is not None
        if self._conn.closed:
            return
        try:
            with self._conn.cursor() as cur:
                cur.execute(text)
        except psycopg2.Error as exc:
            if raise_errors:
                raise translate(exc, text, connection=self._conn) from exc
            # The pool rolls back or discards the connection when it comes back.
            logger.warning("%s after a stream failed", text, exc_info=True)

    def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        pool = self._pool
        # A stream may be read to its end, closed or collected by a thread other than
        # the one that opened it; the pool takes a connection back only from the
        # thread it is lent to, so the lease moves to this thread first (under the
        # pool's lock, and only if it is still this stream's lease).
        me = threading.get_ident()
        if conn.lent_to != me:
            with pool.lock:
                if pool.still_lent(conn, self._lease):
                    conn.lent_to = me
        try:
            pool.release(conn)
        except DatabaseError:
            logger.warning("could not give a stream's connection back", exc_info=True)


def _fetching(fetch: str) -> Callable[[Any], List[Row]]:
    def work(cur: Any) -> List[Row]:
        cur.execute(fetch)
        return fetch_rows(cur)

    return work
