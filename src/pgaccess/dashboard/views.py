"""What the dashboard shows: one consistent read of the queue, rendered as HTML.

``read_snapshot(db)`` reads everything in one read-only repeatable-read transaction
(so the numbers agree with each other); ``render_page`` and ``render_message`` turn
it into a page. Every value from the database goes through ``escape``: error texts,
paths and worker ids are user data.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from string import Template
from typing import Any, Dict, List, Optional

from ..database import Database
from ..jobs import Metrics
from ..jobs import queries as Q
from .chart import Point, throughput_svg

__all__ = ["Snapshot", "read_snapshot", "render_message", "render_page", "stylesheet"]

Row = Dict[str, Any]

STATUSES = Q.STATUSES
#: Minutes of the throughput chart; rows of the running and failure tables.
MINUTES = 60
ROWS = 20
FAILURE_ROWS = 10
#: A running job whose heartbeat is older than this is shown as late.
LATE_HEARTBEAT_S = 30.0
#: Characters of an error shown before "more".
ERROR_PREVIEW = 300

SERVER_CONNECTIONS = """
SELECT coalesce(state, 'unknown') AS state, count(*) AS n
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
GROUP BY 1 ORDER BY 1
"""


@dataclass
class Snapshot:
    """Everything one page shows, read at ``taken_at``."""

    taken_at: datetime.datetime
    counts: Dict[str, int]
    oldest_queued_s: Optional[float]
    throughput: List[Point]
    stages: Dict[str, Dict[str, float]]
    oldest: Optional[Row]
    running: List[Row]
    failures: List[Row]
    pool: Dict[str, Any]
    connections: Dict[str, int] = field(default_factory=dict)


def read_snapshot(db: Database) -> Snapshot:
    """Read the page's numbers in one read-only transaction (8 statements).

    Raises ``DatabaseError`` when the database cannot be read.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    with db.transaction(isolation="repeatable read", read_only=True) as tx:
        counts = dict.fromkeys(STATUSES, 0)
        oldest_s: Optional[float] = None
        for r in tx.execute(Q.QUEUE_GAUGES):
            counts[r["status"]] = int(r["n"])
            if r["status"] == "queued":
                oldest_s = r["oldest_s"]
        throughput = [
            (r["minute"].astimezone(), int(r["completed"]), int(r["failed"]))
            for r in tx.execute(Q.THROUGHPUT, {"minutes": MINUTES})
        ]
        # Through ``db`` on this thread: joins the transaction.
        stages = Metrics(db).summary(since=now - datetime.timedelta(minutes=MINUTES))
        oldest = tx.execute(Q.OLDEST_QUEUED)
        running = tx.execute(Q.RUNNING, {"n": ROWS})
        failures = tx.execute(Q.LATEST_FAILURES, {"n": FAILURE_ROWS})
        connections = {r["state"]: int(r["n"]) for r in tx.execute(SERVER_CONNECTIONS)}
    return Snapshot(
        taken_at=now,
        counts=counts,
        oldest_queued_s=oldest_s,
        throughput=throughput,
        stages=stages,
        oldest=oldest[0] if oldest else None,
        running=running,
        failures=failures,
        pool=db.pool.stats(),
        connections=connections,
    )


# ------------------------------------------------------------------ formatting
def duration(seconds: Optional[float]) -> str:
    """Compact: 0.4 ms, 850 ms, 12.5 s, 4 min 3 s, 2 h 5 min, 3 d 4 h; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return "{} min {} s".format(*divmod(whole, 60))
    if whole < 86400:
        return "{} h {} min".format(*divmod(whole // 60, 60))
    return "{} d {} h".format(*divmod(whole // 3600, 24))


def millis(ms: Optional[float]) -> str:
    return "-" if ms is None else duration(ms / 1000.0)


def number(n: Any) -> str:
    return f"{int(n):,}".replace(",", "\u2009")


def _when(value: Optional[datetime.datetime]) -> str:
    return "-" if value is None else f"{value.astimezone():%Y-%m-%d %H:%M:%S}"


def _ago(now: datetime.datetime, then: Optional[datetime.datetime]) -> str:
    if then is None:
        return "-"
    seconds = (now - then).total_seconds()
    return "just now" if seconds < 1 else duration(seconds) + " ago"


# ------------------------------------------------------------------ sections
def _tiles(s: Snapshot) -> str:
    tiles = [
        f'<div class="tile {status}"><span class="label">{status}</span>'
        f'<span class="value">{number(s.counts[status])}</span></div>'
        for status in STATUSES
    ]
    last5 = sum(c + f for _, c, f in s.throughput[-5:]) / 5.0
    finished = s.counts["completed"] + s.counts["failed"]
    rate = "-" if not finished else f"{s.counts['completed'] / finished:.1%}"
    tiles.append(
        '<div class="tile metric"><span class="label">oldest queued</span>'
        f'<span class="value">{escape(duration(s.oldest_queued_s))}</span></div>'
    )
    tiles.append(
        '<div class="tile metric"><span class="label">finished/min</span>'
        f'<span class="value">{last5:.1f}<small>/min</small></span></div>'
    )
    tiles.append(
        '<div class="tile metric"><span class="label">success rate</span>'
        f'<span class="value">{rate}</span></div>'
    )
    return "".join(tiles)


def _stages(s: Snapshot) -> str:
    if not s.stages:
        return f'<p class="empty">No stage timings in the last {MINUTES} minutes.</p>'
    longest = max(float(v["p95_ms"] or 0.0) for v in s.stages.values()) or 1.0
    rows = []
    for stage, v in sorted(s.stages.items()):
        p50, p95 = float(v["p50_ms"] or 0.0), float(v["p95_ms"] or 0.0)
        rows.append(
            f"<tr><td>{escape(stage)}</td><td class=num>{number(v['count'])}</td>"
            f"<td class=num>{escape(millis(p50))}</td>"
            f"<td class=num>{escape(millis(p95))}</td>"
            f'<td class="bar"><svg viewBox="0 0 100 10" preserveAspectRatio="none" '
            f'width="100%" height="10" xmlns="http://www.w3.org/2000/svg">'
            f'<rect class="p95" x="0" y="0" width="{100 * p95 / longest:.1f}" '
            f'height="10"/><rect class="p50" x="0" y="0" '
            f'width="{100 * p50 / longest:.1f}" height="10"/></svg></td></tr>'
        )
    return (
        "<table><thead><tr><th>stage</th><th class=num>runs</th><th class=num>p50</th>"
        '<th class=num>p95</th><th class="bar">p50 / p95</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )


def _oldest(s: Snapshot) -> str:
    job = s.oldest
    if job is None:
        return '<p class="empty">Nothing is queued.</p>'
    due = job["run_after"]
    return (
        '<dl class="facts">'
        f"<dt>job</dt><dd>#{int(job['id'])} <code>{escape(str(job['src_hash']))}"
        "</code></dd>"
        f"<dt>input</dt><dd><code>{escape(str(job['input_path'] or '-'))}</code></dd>"
        f"<dt>waiting</dt><dd>{escape(duration(job['age_s']))}</dd>"
        f"<dt>priority</dt><dd>{int(job['priority'])}</dd>"
        f"<dt>attempts</dt><dd>{int(job['attempts'])} of {int(job['max_attempts'])}"
        "</dd>"
        f"<dt>due</dt><dd>{escape(_when(due))}</dd>"
        "</dl>"
    )


def _running(s: Snapshot) -> str:
    if not s.running:
        return '<p class="empty">No job is running.</p>'
    rows = []
    for r in s.running:
        beat = r["heartbeat_age_s"]
        late = beat is not None and beat > LATE_HEARTBEAT_S
        rows.append(
            f"<tr><td class=num>#{int(r['id'])}</td>"
            f"<td><code>{escape(str(r['src_hash']))}</code></td>"
            f"<td><code>{escape(str(r['locked_by']))}</code></td>"
            f"<td class=num>{escape(duration(r['running_s']))}</td>"
            f'<td class="num{" late" if late else ""}">{escape(duration(beat))}</td>'
            f"<td class=num>{int(r['attempts'])}/{int(r['max_attempts'])}</td></tr>"
        )
    more = ""
    if s.counts["processing"] > len(s.running):
        more = f'<p class="more">and {s.counts["processing"] - len(s.running)} more</p>'
    return (
        "<table><thead><tr><th class=num>job</th><th>video</th><th>worker</th>"
        "<th class=num>running</th><th class=num>heartbeat</th>"
        "<th class=num>attempt</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + more
    )


def _actions(job: Row, csrf: Optional[str]) -> str:
    if csrf is None:
        return ""
    job_id = int(job["id"])
    token = escape(csrf)
    buttons = []
    if job["status"] == "failed":
        buttons.append(("retry", "Retry", "primary"))
    buttons.append(("cancel", "Cancel", "danger"))
    return "".join(
        f'<form method="post" action="/jobs/{job_id}/{action}">'
        f'<input type="hidden" name="csrf" value="{token}">'
        f'<button class="{kind}" type="submit">{label}</button></form>'
        for action, label, kind in buttons
    )


def _failures(s: Snapshot, csrf: Optional[str]) -> str:
    if not s.failures:
        return '<p class="empty">No failures.</p>'
    rows = []
    for r in s.failures:
        error = str(r["error"] or "")
        preview = (
            error if len(error) <= ERROR_PREVIEW else error[:ERROR_PREVIEW] + " ..."
        )
        text = f"<pre>{escape(preview)}</pre>"
        if len(error) > ERROR_PREVIEW:
            text = (
                f"<details><summary><pre>{escape(preview)}</pre></summary>"
                f"<pre>{escape(error)}</pre></details>"
            )
        status = "failed" if r["status"] == "failed" else "will retry"
        rows.append(
            f'<tr id="job-{int(r["id"])}"><td class=num>#{int(r["id"])}</td>'
            f"<td><code>{escape(str(r['src_hash']))}</code></td>"
            f'<td><span class="badge {escape(str(r["status"]))}">{status}</span></td>'
            f"<td class=num>{int(r['attempts'])}/{int(r['max_attempts'])}</td>"
            f'<td class=num title="{escape(_when(r["updated_at"]))}">'
            f"{escape(_ago(s.taken_at, r['updated_at']))}</td>"
            f'<td class="error">{text}</td>'
            + (f'<td class="actions">{_actions(r, csrf)}</td>' if csrf else "")
            + "</tr>"
        )
    return (
        "<table><thead><tr><th class=num>job</th><th>video</th><th>status</th>"
        "<th class=num>attempt</th><th class=num>when</th><th>error</th>"
        + ("<th>actions</th>" if csrf else "")
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _pool(s: Snapshot) -> str:
    p = s.pool
    facts = [
        ("pool", escape(str(p.get("name")))),
        ("open / max", f"{number(p.get('size', 0))} / {number(p.get('maxconn', 0))}"),
        ("in use", number(p.get("in_use", 0))),
        ("idle", number(p.get("idle", 0))),
        ("waiting now", number(p.get("waiting", 0))),
        ("requests", number(p.get("requests", 0))),
        ("had to wait", number(p.get("requests_waiting", 0))),
        ("timeouts", number(p.get("timeouts", 0))),
        (
            "opened / lost",
            f"{number(p.get('connections_opened', 0))} / "
            f"{number(p.get('connections_lost', 0))}",
        ),
    ]
    server = ", ".join(
        f"{escape(state)} {number(n)}" for state, n in sorted(s.connections.items())
    )
    facts.append(("server sessions", server or "-"))
    return (
        '<dl class="facts wide">'
        + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
        + "</dl>"
    )


# ------------------------------------------------------------------ pages
def _template(name: str) -> Template:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return Template(text)


def stylesheet() -> bytes:
    """The page's CSS, shipped in the package."""
    return resources.files(__package__).joinpath("page.css").read_bytes()


def render_page(
    s: Snapshot,
    *,
    database: str,
    refresh: float,
    actions: bool,
    csrf: Optional[str],
    notice: Optional[str] = None,
) -> str:
    """The dashboard. ``actions``: started with a token; ``csrf``: the visitor's
    per-page token when logged in (None: no buttons)."""
    if csrf is not None:
        account = (
            '<form method="post" action="/logout" class="inline">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            '<button type="submit">Log out</button></form>'
        )
    elif actions:
        account = '<a class="button" href="/login">Log in to retry or cancel</a>'
    else:
        account = '<span class="muted">read-only</span>'
    done = sum(c for _, c, _ in s.throughput)
    failed = sum(f for _, _, f in s.throughput)
    return _template("page.html").substitute(
        refresh=f"{max(refresh, 1.0):g}",
        database=escape(database),
        taken_at=escape(f"{s.taken_at.astimezone():%Y-%m-%d %H:%M:%S %Z}"),
        account=account,
        notice=f'<p class="notice">{escape(notice)}</p>' if notice else "",
        tiles=_tiles(s),
        chart=throughput_svg(s.throughput),
        chart_total=escape(f"{number(done)} completed, {number(failed)} failed"),
        minutes=MINUTES,
        stages=_stages(s),
        oldest=_oldest(s),
        running=_running(s),
        failures=_failures(s, csrf),
        pool=_pool(s),
    )


def render_message(title: str, message: str, *, form: str = "") -> str:
    """A small page: an error, the login form."""
    return _template("message.html").substitute(
        title=escape(title), message=escape(message), form=form
    )
