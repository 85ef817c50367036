"""The dashboard against a real server with real jobs: every view and action over
HTTP (without a token, with it, with a wrong one, from another site), hostile texts
escaped, and the page in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import urlencode, urlsplit

import pytest
from support.tools import skip_unless_available
from support.workers import wait_until

from pgaccess import Database
from pgaccess.dashboard import DashboardServer
from pgaccess.dashboard.server import CSP
from pgaccess.jobs import VideoJobs, Worker

TOKEN = "s3cret-dashboard-token"
HOSTILE_ERROR = '<script>alert("pwned")</script> & <img src=x onerror=alert(1)>'
HOSTILE_WORKER = "w<b onmouseover=alert(2)>1"
HOSTILE_HASH = "</td><script>alert(3)</script>"


# ------------------------------------------------------------------ helpers
@dataclass
class Reply:
    status: int
    headers: Dict[str, str]
    body: str
    cookies: List[str]


def request(
    server: Union[DashboardServer, int],
    method: str,
    path: str,
    *,
    headers: Optional[Dict[str, str]] = None,
    form: Optional[Dict[str, str]] = None,
    body: Optional[str] = None,
) -> Reply:
    port = server if isinstance(server, int) else server.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    if form is not None:
        body = urlencode(form)
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=sent)
        r = conn.getresponse()
        text = r.read().decode()
        return Reply(
            r.status,
            {k.lower(): v for k, v in r.getheaders()},
            text,
            r.headers.get_all("Set-Cookie") or [],
        )
    finally:
        conn.close()


class Visitor:
    """A browser's view of the dashboard: its session cookie, its own origin."""

    def __init__(self, server: Union[DashboardServer, int]) -> None:
        self.server = server
        port = server if isinstance(server, int) else server.server_address[1]
        self.origin = f"http://127.0.0.1:{port}"
        self.cookie: Optional[str] = None

    def get(self, path: str = "/") -> Reply:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        return request(self.server, "GET", path, headers=headers)

    def login(self, token: str = TOKEN) -> Reply:
        reply = self.get(f"/?token={token}")
        if reply.cookies:
            self.cookie = reply.cookies[0].split(";")[0]
        return reply

    def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', self.get().body)
        assert found, "no form token on the page"
        return found.group(1)

    def post(
        self,
        path: str,
        form: Optional[Dict[str, str]] = None,
        *,
        origin: Optional[str] = "",
        extra: Optional[Dict[str, str]] = None,
    ) -> Reply:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        if origin is not None:
            headers["Origin"] = origin or self.origin
        headers.update(extra or {})
        return request(self.server, "POST", path, headers=headers, form=form or {})


@pytest.fixture
def serve(db: Database) -> Iterator[Callable[..., DashboardServer]]:
    servers: List[DashboardServer] = []

    def start(token: Optional[str] = None, host: str = "127.0.0.1") -> DashboardServer:
        server = DashboardServer(db, host, 0, token=token, refresh=30)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def job_status(db: Database, job_id: int) -> str:
    return str(db.find_one("video_job", {"id": job_id})["status"])  # type: ignore[index]


@dataclass
class Seeded:
    failed: int
    retrying: int
    running: int
    oldest: int


def seed(db: Database) -> Seeded:
    """Jobs in every state: completed with stage timings, failed for good with a
    hostile error, failed once and queued again, running with a late heartbeat, and
    queued."""
    jobs = VideoJobs(db)
    jobs.BACKOFF_BASE = 3600.0  # the retried one stays queued with its error
    done = [jobs.enqueue(f"done{i}", f"/in/{i}.mp4") for i in range(5)]
    jobs.claim("w", limit=5)
    for i, job_id in enumerate(done):
        jobs.complete(job_id, "w", metrics={"decode": 10.0 * (i + 1), "detect": 900.0})
    failed = jobs.enqueue("broken", "/in/broken.mp4", max_attempts=1)
    retrying = jobs.enqueue("flaky", "/in/flaky.mp4", max_attempts=3)
    jobs.claim("w", limit=2)
    assert jobs.fail(failed, "w", HOSTILE_ERROR) == "failed"
    assert jobs.fail(retrying, "w", "TimeoutError: decoder stalled") == "queued"
    running = jobs.enqueue("running", "/in/running.mp4")
    jobs.claim(HOSTILE_WORKER)
    db.execute(
        "UPDATE video_job SET heartbeat_at = now() - interval '2 minutes' "
        "WHERE id = %s",
        (running,),
    )
    oldest = jobs.enqueue(HOSTILE_HASH, "/in/<oldest>.mp4", priority=-1)
    jobs.enqueue("newer", "/in/newer.mp4", priority=-1)
    db.execute(
        "UPDATE video_job SET created_at = now() - interval '3 hours' WHERE id = %s",
        (oldest,),
    )
    return Seeded(failed, retrying, running, oldest)


def tile(body: str, status: str) -> int:
    found = re.search(
        rf'<div class="tile {status}"><span class="label">{status}</span>'
        r'<span class="value">([0-9\u2009]+)</span>',
        body,
    )
    assert found, f"no {status} tile"
    return int(found.group(1).replace("\u2009", ""))


# ------------------------------------------------------------------ the page
def test_the_page_shows_the_queue_as_the_database_has_it(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seeded = seed(db)
    server = serve()
    reply = request(server, "GET", "/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.headers["content-security-policy"] == CSP
    assert "script-src" not in CSP and "'none'" in CSP  # default-src 'none'
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["cache-control"] == "no-store"
    body = reply.body

    rows = db.execute("SELECT status, count(*) AS n FROM video_job GROUP BY status")
    counts = {r["status"]: r["n"] for r in rows}
    for status in ("queued", "processing", "completed", "failed", "cancelled"):
        assert tile(body, status) == counts.get(status, 0)
    assert counts == {"completed": 5, "failed": 1, "queued": 3, "processing": 1}

    # The chart: one bar per minute; their tooltips add up to the last hour's jobs.
    titles = re.findall(
        r"<title>\d\d:\d\d: (\d+) completed, (\d+) failed</title>", body
    )
    assert len(titles) == 60
    assert sum(int(c) for c, _ in titles) == 5
    assert sum(int(f) for _, f in titles) == 1
    assert '<svg class="chart"' in body

    # Stages: decode took 10..50 ms: p50 30 ms, p95 48 ms (percentile_cont).
    decode = re.search(r"<tr><td>decode</td>(.*?)</tr>", body)
    assert decode and re.findall(r"<td class=num>([^<]+)</td>", decode.group(1)) == [
        "5",
        "30 ms",
        "48 ms",
    ]
    assert re.search(r"<tr><td>detect</td><td class=num>5</td>", body)

    # The oldest queued job, waiting for 3 hours.
    oldest = body[body.index('id="oldest"') : body.index('id="running"')]
    assert f"#{seeded.oldest} " in oldest and "3 h 0 min" in oldest

    # Running: the worker, and a late heartbeat (2 min) marked as such.
    running = body[body.index('id="running"') : body.index('id="failures"')]
    assert f"#{seeded.running}" in running
    assert re.search(r'<td class="num late">2 min [0-9]+ s</td>', running)

    # Latest failures: both, newest first, with their errors; no buttons.
    failures = body[body.index('id="failures"') : body.index('id="pool"')]
    assert failures.index(f"#{seeded.retrying}") < failures.index(f"#{seeded.failed}")
    assert "TimeoutError: decoder stalled" in failures and "will retry" in failures
    assert "<form" not in body and "<button" not in body
    assert "read-only" in body

    # The pool: this dashboard's, as it counts itself.
    pool = body[body.index('id="pool"') :]
    assert f"<dd>{db.pool.name}</dd>" in pool
    assert f"/ {db.pool.maxconn}</dd>" in pool
    assert '<meta http-equiv="refresh" content="30">' in body


def test_hostile_texts_are_escaped(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seed(db)
    server = serve(TOKEN)
    visitor = Visitor(server)
    visitor.login()
    body = visitor.get().body
    assert "<script" not in body.lower()
    assert "<img" not in body.lower() and "<b " not in body
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;img" in body
    assert "w&lt;b onmouseover=alert(2)&gt;1" in body
    assert "&lt;/td&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in body
    assert "/in/&lt;oldest&gt;.mp4" in body


def test_a_long_error_is_cut_with_the_rest_behind_more(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    jobs = VideoJobs(db)
    job_id = jobs.enqueue("long", "/in", max_attempts=1)
    jobs.claim("w")
    jobs.fail(job_id, "w", "x" * 290 + "<tail-of-the-error>")
    body = request(serve(), "GET", "/").body
    assert "<details>" in body and "&lt;tail-of-the-error&gt;" in body


def test_an_empty_queue_and_the_stylesheet(
    serve: Callable[..., DashboardServer],
) -> None:
    server = serve()
    body = request(server, "GET", "/").body
    assert "Nothing is queued." in body and "No job is running." in body
    assert "No failures." in body and "No stage timings" in body
    css = request(server, "GET", "/page.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")
    assert ".tile" in css.body
    assert request(server, "HEAD", "/").status == 200
    assert request(server, "GET", "/nothing-here").status == 404
    assert request(server, "POST", "/nothing-here", form={}).status == 404
    assert request(server, "GET", "/login").status == 404  # read-only: no login


def test_an_unreachable_database_is_a_page_not_a_crash(
    pgaccess_dsn: str, serve: Callable[..., DashboardServer]
) -> None:
    gone = Database(dsn=pgaccess_dsn, maxconn=1)
    server = DashboardServer(gone, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gone.close()
        reply = request(server, "GET", "/")
        assert reply.status == 503 and "Database unavailable" in reply.body
    finally:
        server.close()


def test_another_host_name_is_refused(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    server = serve(TOKEN)
    # A DNS-rebinding page reaches 127.0.0.1 under its own name.
    reply = request(server, "GET", "/", headers={"Host": "evil.example:80"})
    assert reply.status == 403
    port = server.server_address[1]
    assert (
        request(server, "GET", "/", headers={"Host": f"localhost:{port}"}).status == 200
    )


# ------------------------------------------------------------------ actions
def test_without_a_token_every_action_is_refused(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seeded = seed(db)
    server = serve()
    visitor = Visitor(server)
    assert visitor.login("anything").status == 403
    for path in (f"/jobs/{seeded.failed}/retry", f"/jobs/{seeded.failed}/cancel"):
        assert visitor.post(path).status == 403
        reply = visitor.post(path, extra={"Authorization": "Bearer anything"})
        assert reply.status == 403
    assert job_status(db, seeded.failed) == "failed"


def test_with_the_token_retry_and_cancel_work(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seeded = seed(db)
    server = serve(TOKEN)
    visitor = Visitor(server)
    before = visitor.get().body
    assert "Log in to retry or cancel" in before and "<button" not in before

    reply = visitor.login()
    assert reply.status == 303 and reply.headers["location"] == "/"
    cookie = reply.cookies[0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    page = visitor.get().body
    assert f'action="/jobs/{seeded.failed}/retry"' in page
    assert f'action="/jobs/{seeded.failed}/cancel"' in page
    assert f'action="/jobs/{seeded.retrying}/cancel"' in page
    assert f'action="/jobs/{seeded.retrying}/retry"' not in page  # not failed

    reply = visitor.post(f"/jobs/{seeded.failed}/retry", {"csrf": visitor.csrf()})
    assert reply.status == 303
    assert reply.headers["location"] == f"/?done=retried&job={seeded.failed}#failures"
    row = db.find_one("video_job", {"id": seeded.failed})
    assert row is not None and (row["status"], row["attempts"]) == ("queued", 0)
    shown = visitor.get(reply.headers["location"].split("#")[0]).body
    assert f"Job {seeded.failed} is queued again" in shown

    # A second retry changes nothing and says so.
    reply = visitor.post(f"/jobs/{seeded.failed}/retry", {"csrf": visitor.csrf()})
    assert "done=unchanged" in reply.headers["location"]

    # Cancel: a job that will retry, and one failed for good.
    failed = VideoJobs(db).enqueue("failed-again", "/in", max_attempts=1)
    VideoJobs(db).claim("w2", limit=10)
    VideoJobs(db).fail(failed, "w2", "boom")
    assert not VideoJobs(db).cancel(failed)  # only with failed=True, as here:
    for job_id in (seeded.retrying, failed):
        reply = visitor.post(f"/jobs/{job_id}/cancel", {"csrf": visitor.csrf()})
        assert reply.status == 303 and "done=cancelled" in reply.headers["location"]
        assert job_status(db, job_id) == "cancelled"
    reply = visitor.post(
        f"/jobs/{seeded.oldest + 1000}/cancel", {"csrf": visitor.csrf()}
    )
    assert "done=unchanged" in reply.headers["location"]

    # Logging out ends the session: its cookie opens nothing any more.
    csrf = visitor.csrf()
    assert visitor.post("/logout", {"csrf": csrf}).status == 303
    assert "<button" not in visitor.get().body
    reply = visitor.post(f"/jobs/{seeded.failed}/cancel", {"csrf": csrf})
    assert reply.status == 403


def test_a_wrong_token_gets_nothing(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seeded = seed(db)
    server = serve(TOKEN)
    visitor = Visitor(server)
    reply = visitor.login(TOKEN + "x")
    assert reply.status == 403 and not reply.cookies
    assert visitor.post("/login", {"token": "nope-nope"}).status == 403
    reply = visitor.post(
        f"/jobs/{seeded.failed}/retry",
        extra={"Authorization": f"Bearer {TOKEN[:-1]}"},
    )
    assert reply.status == 403
    # A forged session cookie is no session.
    visitor.cookie = "pgaccess_dashboard=made-up"
    assert visitor.post(f"/jobs/{seeded.failed}/retry", {"csrf": "1.abc"}).status == 403
    assert job_status(db, seeded.failed) == "failed"


def test_the_login_form(db: Database, serve: Callable[..., DashboardServer]) -> None:
    server = serve(TOKEN)
    visitor = Visitor(server)
    form = visitor.get("/login")
    assert form.status == 200 and 'name="token"' in form.body
    reply = visitor.post("/login", {"token": TOKEN})
    assert reply.status == 303 and reply.cookies
    visitor.cookie = reply.cookies[0].split(";")[0]
    assert "Log out" in visitor.get().body
    # The login form too only takes posts from this dashboard's own pages.
    assert (
        visitor.post("/login", {"token": TOKEN}, origin="http://evil.example").status
        == 403
    )


@pytest.mark.parametrize(
    "attack",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": None},  # no Origin and no Referer
        {"origin": None, "extra": {"Referer": "http://evil.example/page"}},
        {"extra": {"Sec-Fetch-Site": "cross-site"}},
        {"csrf": ""},
        {"csrf": "tampered"},
        {"csrf": "other-session"},
        {"csrf": "expired"},
    ],
    ids=[
        "other-origin",
        "null-origin",
        "no-origin",
        "other-referer",
        "sec-fetch-cross-site",
        "no-csrf",
        "tampered-csrf",
        "csrf-of-another-session",
        "expired-csrf",
    ],
)
def test_cross_site_posts_are_refused(
    db: Database, serve: Callable[..., DashboardServer], attack: Dict[str, Any]
) -> None:
    seeded = seed(db)
    server = serve(TOKEN)
    visitor = Visitor(server)
    visitor.login()
    csrf = visitor.csrf()
    kind = attack.get("csrf", "good")
    if kind == "":
        csrf = ""
    elif kind == "tampered":
        csrf = csrf[:-1] + ("0" if csrf[-1] != "0" else "1")
    elif kind == "other-session":
        other = Visitor(server)
        other.login()
        csrf = other.csrf()
    elif kind == "expired":
        stamp = int(csrf.split(".")[0]) - server.guard.CSRF_MAX_AGE - 10
        sid = visitor.cookie.split("=", 1)[1]  # type: ignore[union-attr]
        csrf = f"{stamp}.{server.guard._sign(sid, str(stamp))}"
    reply = visitor.post(
        f"/jobs/{seeded.failed}/retry",
        {"csrf": csrf},
        origin=attack.get("origin", ""),
        extra=attack.get("extra"),
    )
    assert reply.status == 403
    assert job_status(db, seeded.failed) == "failed"
    # The same request from the page itself goes through.
    reply = visitor.post(f"/jobs/{seeded.failed}/retry", {"csrf": visitor.csrf()})
    assert reply.status == 303 and job_status(db, seeded.failed) == "queued"


def bearer_post(
    server: DashboardServer, path: str, host: Optional[str] = None, body: str = ""
) -> Reply:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if host is not None:
        headers["Host"] = host
    return request(server, "POST", path, headers=headers, body=body)


def test_a_script_acts_with_the_bearer_token(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seeded = seed(db)
    server = serve(TOKEN)
    reply = bearer_post(server, f"/jobs/{seeded.failed}/cancel")
    assert reply.status == 303 and job_status(db, seeded.failed) == "cancelled"
    # Bearer does not excuse a foreign Host (DNS rebinding).
    reply = bearer_post(server, f"/jobs/{seeded.retrying}/cancel", "evil.example")
    assert reply.status == 403 and job_status(db, seeded.retrying) == "queued"


def test_a_large_body_is_refused(
    db: Database, serve: Callable[..., DashboardServer]
) -> None:
    seeded = seed(db)
    server = serve(TOKEN)
    reply = bearer_post(server, f"/jobs/{seeded.failed}/retry", body="x" * 10000)
    assert reply.status == 413 and job_status(db, seeded.failed) == "failed"


def test_a_short_token_is_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="at least 8"):
        DashboardServer(db, "127.0.0.1", 0, token="short")


# ------------------------------------------------------------------ the command
def test_cli_dashboard_generates_a_token_and_listens_on_localhost(db: Database) -> None:
    seeded = seed(db)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgaccess",
            "dashboard",
            "--port",
            "0",
            "--token-generate",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert first.startswith("pgaccess dashboard: http://127.0.0.1:"), (
            first + proc.stderr.read() if proc.poll() is not None else first
        )
        login = re.search(r"log in with (http://\S+\?token=(\S+))", second)
        assert login, second
        url = urlsplit(login.group(1))
        port = url.port
        assert url.hostname == "127.0.0.1" and port
        visitor = Visitor(port)
        assert visitor.login("wrong-token-here").status == 403
        assert visitor.login(login.group(2)).status == 303
        reply = visitor.post(f"/jobs/{seeded.failed}/retry", {"csrf": visitor.csrf()})
        assert reply.status == 303 and job_status(db, seeded.failed) == "queued"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


# ------------------------------------------------------------------ a real browser
def chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    proc = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where the sandbox cannot start
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


STAGES = (("decode", 180.0), ("detect", 1400.0), ("score", 90.0), ("encode", 650.0))
ERRORS = (
    "ffmpeg exited with status 1: moov atom not found",
    "detector did not answer within 30 s",
    "unsupported codec 'hevc' in stream 0",
)


def demo_data(db: Database) -> None:
    """A busy hour of the pipeline: a real Worker runs 400 jobs with stage timings
    and injected failures; their finish times are then spread over the last hour
    (a test cannot wait an hour); a few stay queued and running."""
    rng = random.Random(7)
    jobs = VideoJobs(db)
    jobs.BACKOFF_BASE = 0.0

    def handler(job: Dict[str, Any]) -> Dict[str, Any]:
        if job["src_hash"] == "cam2-00121":
            raise RuntimeError(HOSTILE_ERROR)
        if rng.random() < 0.08:
            raise RuntimeError(rng.choice(ERRORS))
        return {
            "metrics": {s: rng.lognormvariate(0, 0.35) * ms for s, ms in STAGES},
            "highlights": [{"start": 1.0, "end": 4.5, "score": rng.random()}],
        }

    jobs.enqueue_many(
        {
            "src_hash": f"cam{i % 7}-{i:05d}",
            "input_path": f"/videos/cam{i % 7}/{i:05d}.mp4",
            "max_attempts": 1 if i % 5 == 0 else 2,
        }
        for i in range(400)
    )
    worker = Worker(
        db,
        handler,
        threads=4,
        jobs=jobs,
        worker_id="edge-01",
        idle_min=0.01,
        idle_max=0.05,
    )
    worker.start()
    try:
        wait_until(
            lambda: (
                db.count("video_job", {"status": "queued"}) == 0
                and db.count("video_job", {"status": "processing"}) == 0
            ),
            timeout=120,
            what="the demo jobs",
        )
    finally:
        worker.stop()
        worker.join(30)
    # A load that rises and falls over the hour.
    db.execute(
        """
        WITH spread AS (
            SELECT id, (row_number() OVER (ORDER BY id) * 7919 % 3600) / 3600.0 * 57
                       * (0.55 + 0.45 * sin(id / 23.0)) AS minutes
            FROM video_job WHERE finished_at IS NOT NULL
        )
        UPDATE video_job v
        SET finished_at = now() - make_interval(secs => s.minutes * 60),
            updated_at = now() - make_interval(secs => s.minutes * 60),
            locked_at = now() - make_interval(secs => s.minutes * 60 + 4),
            created_at = now() - make_interval(secs => s.minutes * 60 + 30)
        FROM spread s WHERE v.id = s.id
        """
    )
    jobs.enqueue_many(
        {"src_hash": f"cam9-{i:05d}", "input_path": f"/videos/cam9/{i:05d}.mp4"}
        for i in range(40)
    )
    for n in range(3):
        jobs.claim(f"edge-0{n + 2}:{4100 + n}-1")
    db.execute(
        "UPDATE video_job SET heartbeat_at = now() - interval '47 seconds', "
        "locked_at = now() - interval '2 minutes' "
        "WHERE locked_by = 'edge-04:4102-1' AND status = 'processing'"
    )
    db.execute(
        "UPDATE video_job SET created_at = now() - interval '4 minutes 12 seconds' "
        "WHERE id = (SELECT min(id) FROM video_job WHERE status = 'queued')"
    )


def test_the_page_in_a_headless_browser(
    db: Database, pgaccess_dsn: str, tmp_path: Path
) -> None:
    binary = chromium()
    skip_unless_available(None if binary else "chromium is not installed")
    assert binary is not None
    demo_data(db)
    with Database(dsn=pgaccess_dsn, maxconn=2, name="dashboard") as viewer:
        server = DashboardServer(viewer, "127.0.0.1", 0, token=TOKEN, refresh=30)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            browse(binary, server, db, tmp_path)
        finally:
            server.close()


def browse(binary: str, server: DashboardServer, db: Database, tmp_path: Path) -> None:
    login = f"{server.url}?token={TOKEN}"  # 303 + cookie + back to the page

    dom = run_chromium(binary, tmp_path / "profile", "--dump-dom", login)
    counts = {
        r["status"]: r["n"]
        for r in db.execute(
            "SELECT status, count(*) AS n FROM video_job GROUP BY status"
        )
    }
    for status in ("queued", "processing", "completed", "failed"):
        assert tile(dom, status) == counts[status]
    assert '<svg class="chart"' in dom and "<rect" in dom
    # The browser followed the login, kept the SameSite cookie: buttons are there.
    assert "Log out" in dom and ">Retry</button>" in dom
    # The hostile error is text in the DOM, not an element.
    assert "<script" not in dom.lower()
    assert '&lt;script&gt;alert("pwned")&lt;/script&gt;' in dom

    shot = tmp_path / "dashboard.png"
    run_chromium(
        binary,
        tmp_path / "profile",
        "--hide-scrollbars",
        "--window-size=1280,1740",
        f"--screenshot={shot}",
        login,
    )
    assert png_size(shot) == (1280, 1740)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    keep = os.environ.get("PGACCESS_DASHBOARD_SCREENSHOT")
    if keep:  # docs/dashboard.png is made this way
        shutil.copyfile(shot, keep)
