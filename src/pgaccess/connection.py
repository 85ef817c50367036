"""PooledConnection: a psycopg2 connection that knows its age, its lease and its state.

Besides age, last use and expiry, each connection carries its current lease, written
under its pool's lock whenever it is lent or taken back: the thread it is lent to and
the lease's number. The pool checks both when a connection comes back, and the monitor
checks the number before it cuts a stalled connection, so neither can act on a lease
that has ended.
"""

from __future__ import annotations

import math
import os
import select
import time
from typing import Any, Optional, Tuple

import psycopg2
import psycopg2.extensions as ext

__all__ = ["STATUS_ACTIVE", "STATUS_IDLE", "PooledConnection"]

STATUS_IDLE = ext.TRANSACTION_STATUS_IDLE
STATUS_ACTIVE = ext.TRANSACTION_STATUS_ACTIVE
_BASE_CURSOR_FACTORY: Any = vars(ext.connection)["cursor_factory"]


def _marking(name: str) -> Any:
    """psycopg2's ``connection.<name>``, as a property whose setter marks the change."""
    base = vars(ext.connection)[name]

    def set_value(self: PooledConnection, value: Any) -> None:
        base.__set__(self, value)
        self.mark_session_changed()

    return property(base.__get__, set_value)


class PooledConnection(ext.connection):
    """A psycopg2 connection that remembers its age, last use, lease and cursor."""

    # Slots: the pool reads and writes these on every checkout, and an attribute in
    # the instance dict of a C type's subclass costs three times as much to read.
    # ``__dict__`` stays, for attributes an application sets of its own.
    __slots__ = (
        "__dict__",
        "borrower_stack",
        "created_at",
        "cursor_cache",
        "expires_at",
        "initial_encoding",
        "last_used",
        "leak_reported",
        "lease",
        "lent_at",
        "lent_to",
        "lifetime_ends",
        "opened_by_pid",
        "poller",
        "session_changed",
        "tcp_ident",
    )

    created_at: float
    #: When the pool replaces it (``created_at + max_lifetime``).
    lifetime_ends: float
    #: ``lifetime_ends``, or 0 to mean "changed: send its return down the slow path".
    expires_at: float
    last_used: float
    cursor_cache: Optional[ext.cursor]
    #: Session attributes were changed through psycopg2 (see ``mark_session_changed``).
    session_changed: bool
    #: (fd, local address, peer address) of a TCP connection watched for stalls.
    tcp_ident: Optional[Tuple[int, Any, Any]]
    #: The process that opened it: in a forked child, a connection of the parent.
    opened_by_pid: int
    #: The lease, written under the pool's lock: the borrowing thread's ident (0 while
    #: idle) and the lease's number (psycopg2's key for it, unique within the pool).
    lent_to: int
    lease: int
    #: A watched lease (``leak_threshold``): since when, the borrower's stack (None
    #: while not watched) and whether it was reported.
    lent_at: float
    borrower_stack: Optional[str]
    leak_reported: bool

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.created_at = self.last_used = time.monotonic()
        self.lifetime_ends = self.expires_at = math.inf
        self.session_changed = False
        self.tcp_ident = None
        self.cursor_cache = None
        self.opened_by_pid = os.getpid()
        self.lent_to = self.lease = 0
        self.lent_at = 0.0
        self.borrower_stack = None
        self.leak_reported = False
        self.initial_encoding = self.encoding
        # Registered once: polling a ready-made poll object costs a third of select().
        self.poller = select.poll()
        self.poller.register(self.fileno(), select.POLLIN)

    def has_unread_data(self) -> bool:
        """Whether the server sent something unasked (when idle: bad news)."""
        return bool(self.poller.poll(0))

    # In autocommit, psycopg2 applies session attributes with SET (default_transaction_
    # read_only, ...): server state that the next borrower would inherit. Every way to
    # change them marks the connection, and ``expires_at = 0`` sends its return down the
    # slow path (which resets them) through a test release() makes anyway: a clean
    # connection's return costs nothing more.
    def mark_session_changed(self) -> None:
        """Note that session attributes changed: the pool resets them on return."""
        self.session_changed = True
        self.expires_at = 0.0

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        super().set_session(*args, **kwargs)
        self.mark_session_changed()

    def set_isolation_level(self, level: Optional[int]) -> None:
        super().set_isolation_level(level)
        self.mark_session_changed()

    def set_client_encoding(self, encoding: str) -> None:
        super().set_client_encoding(encoding)
        self.mark_session_changed()

    readonly = _marking("readonly")
    isolation_level = _marking("isolation_level")
    deferrable = _marking("deferrable")
    cursor_factory = _marking("cursor_factory")

    def clean(self) -> bool:
        """Roll back and restore the session defaults and autocommit; False if that
        failed (the connection must then be discarded). Sends I/O: never call it under
        the pool's lock."""
        try:
            if self.get_transaction_status() != STATUS_IDLE:
                if self.autocommit:
                    # A transaction begun with an explicit BEGIN: psycopg2's rollback()
                    # is a no-op in autocommit, so the ROLLBACK must be sent as SQL.
                    with self.cursor() as cur:
                        cur.execute("ROLLBACK")
                else:
                    self.rollback()
            # The base class's methods: this class's own would mark it again.
            ext.connection.set_session(
                self, isolation_level="DEFAULT", readonly="default",
                deferrable="default", autocommit=True,
            )  # fmt: skip
            if self.session_changed:
                if self.encoding != self.initial_encoding:
                    ext.connection.set_client_encoding(self, self.initial_encoding)
                _BASE_CURSOR_FACTORY.__set__(self, None)
                self.session_changed = False
                self.expires_at = self.lifetime_ends
        except psycopg2.Error:
            return False
        return self.get_transaction_status() == STATUS_IDLE

    def execute_quietly(self, statement: str) -> bool:
        """Run one statement with no parameters; False if it failed (psycopg2.Error).

        For the pool's checks and resets (``SELECT 1``, ``DISCARD ALL``), whose
        failure means "discard this connection", never an error for the caller.
        """
        try:
            with self.cursor() as cur:
                cur.execute(statement)
        except psycopg2.Error:
            return False
        return True
