"""Opening the pool's connections, and the outage backoff as one small object.

``Connector`` merges the libpq parameters once (the DSN's own, then pgaccess's
``CONNECT_DEFAULTS`` for what it leaves unset, then the pool's keyword arguments) and
opens connections in autocommit with ``connect_timeout`` cut to the caller's time left.
Nothing is sent as a startup ``options`` parameter (PgBouncer refuses it): the
statement timeout travels as ``SET LOCAL`` with the statements (``executor``).

A pool may need a given role: ``PRIMARY`` (writes), ``STANDBY`` or ``PREFER_STANDBY``
(reads), or ``ANY``. libpq checks ``target_session_attrs`` at connect time, but a
pooler in front of each node answers logins from cached state and fools it, so the
connector asks the server itself (``pg_is_in_recovery()``) after connecting. With a
host list it tries the hosts one by one (shuffled with ``load_balance_hosts=random``)
until one has the role; a connection in the wrong role is closed.
``Backoff`` is the state of an outage (a failed connect not yet followed by a good one):
when the next attempt is due, the doubling delay, whether one attempt is under way. The
pool drives both; neither takes a lock of its own.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
from typing import Any, Dict, List, Optional

import psycopg2
import psycopg2.extensions as ext

from .config import Settings
from .connection import PooledConnection
from .errors import InvalidQuery
from .watch import tcp_ident

__all__ = [
    "ANY",
    "CONNECT_DEFAULTS",
    "PREFER_STANDBY",
    "PRIMARY",
    "ROLES",
    "STANDBY",
    "Backoff",
    "Connector",
    "WrongRole",
    "check_libpq",
    "dsn_parameters",
]

#: The roles a pool may require of its connections.
ANY, PRIMARY, STANDBY, PREFER_STANDBY = "any", "primary", "standby", "prefer-standby"
ROLES = (ANY, PRIMARY, STANDBY, PREFER_STANDBY)
# libpq's target_session_attrs, as the role the connector then checks itself.
_ROLE_OF_TARGET = {
    "any": ANY,
    "read-write": PRIMARY,
    "primary": PRIMARY,
    "read-only": STANDBY,
    "standby": STANDBY,
    "prefer-standby": PREFER_STANDBY,
}

# The oldest libpq (PQlibVersion) that knows a parameter, or a value of one.
_LIBPQ_NEEDS = {
    "load_balance_hosts": (160000, "16"),
    "target_session_attrs": (100000, "10"),
}
_LIBPQ_NEEDS_VALUE = {
    ("target_session_attrs", value): (140000, "14")
    for value in ("primary", "standby", "prefer-standby", "read-only")
}


class WrongRole(psycopg2.OperationalError):
    """No host in the DSN had the role the pool needs (the pool retries as for any
    failed connect, within the caller's timeout)."""


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
    then say why), except for a parameter the bundled libpq is too old to know:
    ``InvalidQuery``."""
    if not dsn:
        return {}
    try:
        return dict(ext.parse_dsn(dsn))
    except psycopg2.ProgrammingError as exc:
        for name in _LIBPQ_NEEDS:
            if name in str(exc):
                check_libpq({name: ""})
        return {}


def check_libpq(params: Dict[str, Any], version: Optional[int] = None) -> None:
    """Raise ``InvalidQuery`` when the libpq psycopg2 bundles is too old for one of
    ``params`` (a name, or a value such as ``target_session_attrs=prefer-standby``)."""
    have = ext.libpq_version() if version is None else version
    for name, value in params.items():
        for need, shown in (
            (_LIBPQ_NEEDS.get(name), name),
            (_LIBPQ_NEEDS_VALUE.get((name, str(value))), f"{name}={value}"),
        ):
            if need is None or have >= need[0]:
                continue
            raise InvalidQuery(
                f"{shown} needs libpq {need[1]} or newer; this psycopg2 uses libpq "
                f"{have // 10000}.{have % 10000} (psycopg2-binary bundles its own: "
                "upgrade it, or build psycopg2 against a newer libpq)"
            )


def _host_list(given: Dict[str, str]) -> List[Dict[str, str]]:
    """One set of connect parameters per host of a multi-host DSN ([] for one host)."""
    hosts = given.get("host", "").split(",")
    addrs = given.get("hostaddr", "").split(",") if given.get("hostaddr") else []
    count = max(len(hosts), len(addrs))
    if count < 2:
        return []
    ports = given.get("port", "").split(",")
    out = []
    for i in range(count):
        one = {"host": hosts[i] if i < len(hosts) else hosts[-1]}
        if addrs:
            one["hostaddr"] = addrs[i] if i < len(addrs) else addrs[-1]
        port = ports[i] if len(ports) > 1 else ports[0]
        if port:
            one["port"] = port
        out.append(one)
    return out


def _where(params: Dict[str, str]) -> str:
    host = params.get("host") or params.get("hostaddr") or "?"
    return f"{host}:{params['port']}" if params.get("port") else host


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
        role: Optional[str] = None,
    ) -> None:
        self.dsn = settings.dsn
        self.max_lifetime = max_lifetime
        self.watch_tcp = watch_tcp
        given = dsn_parameters(settings.dsn)
        check_libpq({**given, **connect_kwargs})
        target = str(connect_kwargs.get("target_session_attrs") or "") or given.get(
            "target_session_attrs", "any"
        )
        if role is None:
            role = _ROLE_OF_TARGET.get(target, ANY)
        if role not in ROLES:
            raise InvalidQuery(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        #: What every connection must be; checked after connect unless ANY.
        self.role = role
        #: Per-host parameters when the DSN lists several hosts and a role is needed:
        #: the connector then tries them itself, checking each one's role.
        self.hosts = _host_list(given) if role != ANY else []
        self.shuffle = given.get("load_balance_hosts") == "random"
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
        kwargs.update(connect_kwargs)
        self.kwargs = kwargs

    def open(self, deadline: float) -> PooledConnection:
        """A new connection in autocommit, in the pool's role, its connect cut to the
        time left.

        Blocks for the connect (libpq waits 2 s at least); raises psycopg2's error,
        ``WrongRole`` when no host has the role.
        """
        if not self.hosts:
            conn = self._open(deadline, {})
            if self.role in (PRIMARY, STANDBY):
                try:
                    standby = self._in_recovery(conn, deadline)
                except BaseException:
                    conn.close()
                    raise
                if standby != (self.role == STANDBY):
                    conn.close()
                    raise WrongRole(
                        f"the server is a {'standby' if standby else 'primary'}, "
                        f"and this pool needs a {self.role}"
                    )
            return conn
        return self._open_by_role(deadline)

    def _open_by_role(self, deadline: float) -> PooledConnection:
        """Try each host of the list until one has the role (a standby preferred,
        the primary taken, for ``PREFER_STANDBY``)."""
        hosts = list(self.hosts)
        if self.shuffle:
            random.shuffle(hosts)
        tried: List[str] = []
        fallback: Optional[PooledConnection] = None
        for host in hosts:
            if time.monotonic() >= deadline:
                tried.append("(out of time)")
                break
            try:
                conn = self._open(deadline, host)
            except psycopg2.Error as exc:
                tried.append(f"{_where(host)}: {_first_line(exc)}")
                continue
            try:
                standby = self._in_recovery(conn, deadline)
            except psycopg2.Error as exc:
                conn.close()
                tried.append(f"{_where(host)}: {_first_line(exc)}")
                continue
            if standby == (self.role != PRIMARY):
                if fallback is not None:
                    fallback.close()
                return conn
            if self.role == PREFER_STANDBY and fallback is None:
                fallback = conn
                continue
            conn.close()
            tried.append(f"{_where(host)}: a {'standby' if standby else 'primary'}")
        if fallback is not None:
            return fallback
        raise WrongRole(f"no host is a {self.role}: " + "; ".join(tried))

    def _open(self, deadline: float, host: Dict[str, str]) -> PooledConnection:
        limit = max(2, math.ceil(deadline - time.monotonic()))
        if self.connect_timeout > 0:
            limit = min(limit, self.connect_timeout)
        kwargs = self.kwargs
        if host:  # one host of the list, its role checked here, not by libpq
            kwargs = {**kwargs, **host, "target_session_attrs": "any"}
        conn: PooledConnection = psycopg2.connect(
            self.dsn,
            connection_factory=PooledConnection,
            connect_timeout=limit,
            **kwargs,
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

    def _in_recovery(self, conn: PooledConnection, deadline: float) -> bool:
        """Whether the server is a standby. Asked with a bound: a pooler whose node is
        down accepts the login and holds the query (PgBouncer's query_wait_timeout is
        2 minutes), so past the caller's time the socket is shut down."""
        limit = deadline - time.monotonic()
        if self.connect_timeout > 0:
            limit = min(limit, self.connect_timeout)
        guard = threading.Lock()
        answered = False
        fd = conn.fileno()

        def cut() -> None:
            with guard:
                if not answered:
                    _shut_down(fd)

        timer = threading.Timer(max(limit, 0.5), cut)
        timer.daemon = True
        timer.start()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery()")
                row = cur.fetchone()
        finally:
            with guard:
                answered = True
            timer.cancel()
        return bool(row and row[0])


def _shut_down(fd: int) -> None:
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
