"""The dashboard's HTTP server: the standard library's ThreadingHTTPServer, a route
table, strict headers on every answer.

GET ``/`` (the page; ``/?token=T`` logs in and comes back), ``/page.css``,
``/login``; POST ``/login``, ``/logout``, ``/jobs/<id>/retry``,
``/jobs/<id>/cancel``. Actions answer ``303`` back to the page, or ``403`` when
the request is not allowed (see ``auth``).
"""

from __future__ import annotations

import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional
from urllib.parse import parse_qs, urlsplit

import psycopg2
import psycopg2.extensions

from ..config import redact_dsn
from ..database import Database
from ..errors import DatabaseError
from ..jobs import VideoJobs
from .auth import Guard
from .views import read_snapshot, render_message, render_page, stylesheet

__all__ = ["DashboardServer"]

logger = logging.getLogger("pgaccess.dashboard")

#: No script, no inline style, nothing from elsewhere; forms post only here.
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
MAX_BODY = 4096
_ACTION = re.compile(r"^/jobs/([0-9]{1,18})/(retry|cancel)$")

# Notices the page may show after an action: fixed texts, chosen by key.
NOTICES = {
    "retried": "Job {} is queued again, with fresh attempts.",
    "cancelled": "Job {} is cancelled.",
    "unchanged": "Job {} was not changed: it is no longer in a state for that.",
}

LOGIN_FORM = (
    '<form method="post" action="/login"><label>Token<input type="password" '
    'name="token" autocomplete="current-password" autofocus></label>'
    '<button class="primary" type="submit">Log in</button></form>'
)


class DashboardServer(ThreadingHTTPServer):
    """``pgaccess dashboard``: the queue's page over HTTP, reading ``db``.

    ``token`` enables the retry and cancel buttons (and is required by them);
    without it the dashboard is read-only. ``refresh``: seconds between the page's
    own reloads. Port 0 picks a free port (see ``url``). ``serve_forever()`` or
    ``run(stop_event)`` serve; ``close()`` stops. Raises ``OSError`` when the
    address cannot be had.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        db: Database,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        token: Optional[str] = None,
        refresh: float = 5.0,
    ) -> None:
        self.db = db
        self.jobs = VideoJobs(db)
        self.refresh = refresh
        super().__init__((host, port), _Handler)
        bound = int(self.server_address[1])
        try:
            self.guard = Guard(token, host, bound)
        except ValueError:
            self.server_close()
            raise
        self.database = _where(db.pool.settings.dsn)
        shown = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound}/"
        self._closed = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (checked twice a second), then close."""
        thread = threading.Thread(
            target=self.serve_forever, name="pgaccess-dashboard", daemon=True
        )
        thread.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.close()
            thread.join(10)

    def close(self) -> None:
        """Stop serving (idempotent; from another thread than serve_forever's)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.shutdown()
        self.server_close()


def _where(dsn: str) -> str:
    """``dbname on host:port`` (a socket directory is "local"); never a password."""
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return redact_dsn(dsn)
    host = parts.get("host") or "local"
    host = "local" if host.startswith("/") else host
    port = f":{parts['port']}" if parts.get("port") else ""
    name = parts.get("dbname") or "the default database"
    return f"{name} on {host}{port}"


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "pgaccess-dashboard"
    sys_version = ""

    # ------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/html; charset=utf-8",
        extra: Optional[Dict[str, str]] = None,
    ) -> None:
        self.send_response(status)
        for name, value in {**HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _message(self, status: int, title: str, text: str, form: str = "") -> None:
        self._send(status, render_message(title, text, form=form).encode())

    def _forbidden(self, why: str) -> None:
        logger.info("refused %s %s: %s", self.command, self.path, why)
        self._message(403, "Forbidden", why)

    def _redirect(self, location: str, cookie: Optional[str] = None) -> None:
        extra = {"Location": location}
        if cookie is not None:
            extra["Set-Cookie"] = cookie
        self._send(303, b"", extra=extra)

    def _headers(self) -> Dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _form(self) -> Optional[Dict[str, str]]:
        """The url-encoded body's fields (first value each); None if too large."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return None
        body = self.rfile.read(length).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body).items()}

    # ------------------------------------------------------------ GET
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        guard = self.server.guard
        if not guard.host_ok(self._headers()):
            self._forbidden("this server does not answer to that host name")
            return
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/page.css":
            self._send(200, stylesheet(), "text/css; charset=utf-8")
        elif url.path == "/login":
            if not guard.actions:
                self._message(404, "No login", "This dashboard is read-only.")
            else:
                self._message(200, "Log in", "Paste the dashboard's token.", LOGIN_FORM)
        elif url.path == "/" and "token" in query:
            self._login(query["token"])
        elif url.path == "/":
            self._page(query)
        else:
            self._message(404, "Not found", "There is no such page.")

    def _page(self, query: Dict[str, str]) -> None:
        guard = self.server.guard
        sid = guard.session(self._headers())
        try:
            snapshot = read_snapshot(self.server.db)
        except DatabaseError as exc:
            logger.warning("dashboard: could not read the queue: %s", exc)
            self._message(503, "Database unavailable", str(exc))
            return
        notice = None
        job = query.get("job", "")
        if query.get("done") in NOTICES and job.isdigit():
            notice = NOTICES[query["done"]].format(int(job))
        page = render_page(
            snapshot,
            database=self.server.database,
            refresh=self.server.refresh,
            actions=guard.actions,
            csrf=None if sid is None else guard.csrf(sid),
            notice=notice,
        )
        self._send(200, page.encode())

    def _login(self, token: str) -> None:
        guard = self.server.guard
        if not guard.token_ok(token):
            self._forbidden("wrong token")
            return
        self._redirect("/", guard.cookie(guard.new_session()))

    # ------------------------------------------------------------ POST
    def do_POST(self) -> None:
        guard = self.server.guard
        url = urlsplit(self.path)
        action = _ACTION.match(url.path)
        if url.path not in ("/login", "/logout") and action is None:
            self._message(404, "Not found", "There is no such action.")
            return
        form = self._form()
        if form is None:
            self._message(413, "Too large", "The request body is too large.")
            return
        if not guard.actions:
            self._forbidden("this dashboard is read-only (start it with a token)")
            return
        if not guard.host_ok(self._headers()):
            self._forbidden("this server does not answer to that host name")
            return
        bearer = guard.bearer_ok(self._headers())
        if not bearer and not guard.same_origin(self._headers()):
            self._forbidden("a request from another site")
            return
        if url.path == "/login":
            self._login(form.get("token", ""))
            return
        sid = guard.session(self._headers())
        if not bearer:
            if sid is None:
                self._forbidden("log in first")
                return
            if not guard.csrf_ok(sid, form.get("csrf")):
                self._forbidden("the page's form token is missing or stale")
                return
        if url.path == "/logout":
            if sid is not None:
                guard.end_session(sid)
            self._redirect("/", guard.cookie("", clear=True))
            return
        assert action is not None
        self._act(int(action.group(1)), action.group(2))

    def _act(self, job_id: int, action: str) -> None:
        jobs = self.server.jobs
        try:
            if action == "retry":
                changed = jobs.retry_failed(job_id)
            else:
                changed = jobs.cancel(job_id, failed=True)
        except DatabaseError as exc:
            self._message(503, "Database unavailable", str(exc))
            return
        done = (
            ("retried" if action == "retry" else "cancelled")
            if changed
            else "unchanged"
        )
        logger.info("dashboard: %s job %d: %s", action, job_id, done)
        self._redirect(f"/?done={done}&job={job_id}#failures")
