"""Who may press the dashboard's buttons: the token, sessions, CSRF and origin checks.

- The token (``--token`` or generated) is the only credential. A browser trades it
  once (``/?token=...`` or the login form) for a session: a random id in an
  ``HttpOnly; SameSite=Strict`` cookie, known to this process only.
- Each page carries a CSRF token bound to that session: ``time.HMAC(key, session
  id, time)`` with a key made at start, valid ``CSRF_MAX_AGE`` seconds.
- A POST made by a browser must come from the dashboard's own origin: ``Origin``
  (else ``Referer``) equal to ``http://`` + ``Host``, and ``Sec-Fetch-Site``, when
  sent, ``same-origin``. ``Host`` must name this server (a DNS-rebinding page is
  refused even for reading) unless it listens on every interface.
- A script may send ``Authorization: Bearer <token>`` instead of a session and a
  CSRF token: browsers never attach that header by themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from http.cookies import CookieError, SimpleCookie
from typing import Mapping, Optional
from urllib.parse import urlsplit

__all__ = ["Guard"]

COOKIE = "pgaccess_dashboard"


class Guard:
    """The dashboard's token, its sessions, and the checks of each request.

    ``token`` None: a read-only dashboard, every action refused. ``host`` and
    ``port``: where the server listens, for the ``Host`` check. ``headers`` are
    a request's, keyed by lower-case names. Thread-safe.
    """

    #: Seconds a page's CSRF token stays valid (a page left open refreshes itself).
    CSRF_MAX_AGE = 12 * 3600
    #: Sessions kept at most; the oldest goes first.
    MAX_SESSIONS = 256

    def __init__(self, token: Optional[str], host: str, port: int) -> None:
        if token is not None and len(token) < 8:
            raise ValueError("a dashboard token must have at least 8 characters")
        self.token = token
        self._key = secrets.token_bytes(32)
        self._sessions: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.any_host = host in ("", "0.0.0.0", "::")
        names = {"127.0.0.1", "localhost", "[::1]"}
        if not self.any_host:
            names.add(f"[{host}]" if ":" in host else host)
        self._hosts = {f"{name}:{port}" for name in names}
        if port == 80:
            self._hosts |= names

    @property
    def actions(self) -> bool:
        """Whether there is a token, so buttons may exist at all."""
        return self.token is not None

    # ---------------------------------------------------------------- token
    def token_ok(self, given: Optional[str]) -> bool:
        """Whether ``given`` is the token (in constant time)."""
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def bearer_ok(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries ``Authorization: Bearer <token>``."""
        scheme, _, given = (headers.get("authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(given.strip())

    # ---------------------------------------------------------------- sessions
    def new_session(self) -> str:
        """A session id for a browser that showed the token."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = time.time()
            while len(self._sessions) > self.MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid

    def end_session(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def session(self, headers: Mapping[str, str]) -> Optional[str]:
        """The request's valid session id, from its cookie, or None."""
        if self.token is None:
            return None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie") or "")
        except CookieError:
            return None
        morsel = cookie.get(COOKIE)
        if morsel is None:
            return None
        with self._lock:
            return morsel.value if morsel.value in self._sessions else None

    @staticmethod
    def cookie(sid: str, *, clear: bool = False) -> str:
        """The Set-Cookie value for ``sid`` (or one that removes it)."""
        value = "" if clear else sid
        age = "; Max-Age=0" if clear else ""
        return f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{age}"

    # ---------------------------------------------------------------- csrf
    def _sign(self, sid: str, stamp: str) -> str:
        mac = hmac.new(self._key, f"{sid}:{stamp}".encode(), hashlib.sha256)
        return mac.hexdigest()

    def csrf(self, sid: str) -> str:
        """A CSRF token for a page shown to session ``sid``."""
        stamp = str(int(time.time()))
        return f"{stamp}.{self._sign(sid, stamp)}"

    def csrf_ok(self, sid: str, given: Optional[str]) -> bool:
        """Whether ``given`` was made by ``csrf(sid)`` less than CSRF_MAX_AGE ago."""
        stamp, _, sig = (given or "").partition(".")
        if not stamp.isdigit() or not sig:
            return False
        if not 0 <= time.time() - int(stamp) <= self.CSRF_MAX_AGE:
            return False
        return hmac.compare_digest(sig, self._sign(sid, stamp))

    # ---------------------------------------------------------------- origin
    def host_ok(self, headers: Mapping[str, str]) -> bool:
        """Whether ``Host`` names this server (any, when it listens everywhere)."""
        host = (headers.get("host") or "").strip().lower()
        if not host:
            return False
        return self.any_host or host in self._hosts

    def same_origin(self, headers: Mapping[str, str]) -> bool:
        """Whether a browser's request comes from a page of this dashboard."""
        host = (headers.get("host") or "").strip().lower()
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = headers.get("origin")
        if origin is None:
            referer = headers.get("referer")
            if not referer:
                return False
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        return bool(host) and origin.strip().lower() == f"http://{host}"
