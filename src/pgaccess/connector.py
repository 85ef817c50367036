"""Opening the pool's connections, and the outage backoff as one small object.

``Connector`` merges the libpq parameters once (the DSN's own, then pgaccess's
``CONNECT_DEFAULTS`` for what it leaves unset, then the pool's keyword arguments) and
opens connections in autocommit with ``connect_timeout`` cut to the caller's time left.
``Backoff`` is the state of an outage (a failed connect not yet followed by a good one):
when the next attempt is due, the doubling delay, whether one attempt is under way. The
pool drives both; neither takes a lock of its own.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Optional

import psycopg2
import psycopg2.extensions as ext

from .config import Settings
from .connection import PooledConnection
from .watch import tcp_ident

__all__ = ["CONNECT_DEFAULTS", "Backoff", "Connector", "dsn_parameters"]

#: libpq parameters every pool connection gets unless its DSN (or, for
#: ``application_name``, PGAPPNAME) sets them. A dead peer or a network path that
#: drops every packet must not hang a call (with psycopg2's defaults a statement sent
#: into such a path waits for TCP to give up, about 15 minutes on Linux): data left
#: unacknowledged for 8 s, or an idle wait whose keepalive probes (from 4 s, every
#: 2 s) go unanswered until then, fails the call with ``ConnectionLost``. Either way
#: under 10 s. Ignored on Unix sockets.
CONNECT_DEFAULTS: Dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 4,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 8_000,
    "application_name": "pgaccess",
}


def dsn_parameters(dsn: str) -> Dict[str, str]:
    """The parameters ``dsn`` sets; none when libpq cannot parse it (connecting will
    then say why)."""
    if not dsn:
        return {}
    try:
        return dict(ext.parse_dsn(dsn))
    except psycopg2.ProgrammingError:
        return {}


def _int_or_none(raw: Optional[str]) -> Optional[int]:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


class Connector:
    """Opens connections for one pool; thread-safe (it holds no changing state)."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_lifetime: float,
        connect_timeout: Optional[int],
        watch_tcp: bool,
        connect_kwargs: Dict[str, Any],
    ) -> None:
        self.dsn = settings.dsn
        self.max_lifetime = max_lifetime
        self.watch_tcp = watch_tcp
        given = dsn_parameters(settings.dsn)
        if "PGAPPNAME" in os.environ:  # libpq's own source for application_name
            given.setdefault("application_name", os.environ["PGAPPNAME"])
        if connect_timeout is None:
            connect_timeout = _int_or_none(
                given.get("connect_timeout", os.environ.get("PGCONNECT_TIMEOUT"))
            )
        #: Seconds; 0 or less means libpq's "wait forever", cut to the caller's time.
        self.connect_timeout = 10 if connect_timeout is None else connect_timeout
        # pgaccess's defaults fill in what the user set nowhere: connect() arguments
        # would otherwise override the DSN's own keepalive or application settings.
        kwargs: Dict[str, Any] = {
            key: value for key, value in CONNECT_DEFAULTS.items() if key not in given
        }
        if settings.statement_timeout_ms:
            kwargs["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
        kwargs.update(connect_kwargs)
        self.kwargs = kwargs

    def open(self, deadline: float) -> PooledConnection:
        """A new connection in autocommit, its connect cut to the time left.

        Blocks for the connect (libpq waits 2 s at least); raises psycopg2's error.
        """
        limit = max(2, math.ceil(deadline - time.monotonic()))
        if self.connect_timeout > 0:
            limit = min(limit, self.connect_timeout)
        conn: PooledConnection = psycopg2.connect(
            self.dsn,
            connection_factory=PooledConnection,
            connect_timeout=limit,
            **self.kwargs,
        )
        try:
            conn.autocommit = True
            conn.lifetime_ends = conn.expires_at = conn.created_at + self.max_lifetime
            if self.watch_tcp:
                conn.tcp_ident = tcp_ident(conn.fileno())
        except BaseException:
            conn.close()
            raise
        return conn


class Backoff:
    """A pool's outage: when the next connect may start, and how far apart attempts are.

    Not thread-safe by itself: the pool reads and changes it under its lock. After a
    failed connect (once the pool has connected before) the pool is in an outage until
    a connect succeeds; callers then take turns, one attempt (``probing``) at a time,
    spaced by a delay doubling from ``INITIAL_DELAY`` to ``MAX_DELAY`` however many
    callers wait. Lower the constants in tests instead of sleeping.
    """

    INITIAL_DELAY = 0.05
    MAX_DELAY = 0.5

    __slots__ = (
        "connecting",
        "delay",
        "ever_connected",
        "failures",
        "last_error",
        "next_at",
        "probing",
    )

    def __init__(self) -> None:
        self.next_at = 0.0  # when the next attempt may start; 0: not in an outage
        self.delay = self.INITIAL_DELAY  # the pause after the next failure
        self.failures = 0  # failed attempts in this outage
        self.last_error = ""
        self.probing = False  # an outage's one attempt is under way
        self.connecting = 0  # connects under way, in or out of an outage
        self.ever_connected = False  # before the first success, a failure is final

    @property
    def in_outage(self) -> bool:
        """A connect failed and none has succeeded since."""
        return self.next_at != 0.0

    def due(self, now: float) -> bool:
        """Whether an outage's next attempt may start at ``now``."""
        return now >= self.next_at

    def update_delay(self, now: float) -> None:
        """Schedule the next attempt after a failed one, and double the delay."""
        self.next_at = now + self.delay
        self.delay = min(self.delay * 2, self.MAX_DELAY)

    def reset(self) -> None:
        """A connect succeeded: the outage is over, everyone may connect."""
        self.next_at = 0.0
        self.delay = self.INITIAL_DELAY
        self.failures = 0
