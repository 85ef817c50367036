"""``pgaccess demo``: its summary, and the embedded server it starts and stops.

The lifecycle tests run the demo with no DSN set, from a new 0700 project folder (as
``mktemp -d`` makes), so that it uses an embedded server of its own.
"""

from __future__ import annotations

import io
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterator

import psycopg2
import psycopg2.errors
import pytest
from test_cli import status_counts
from test_embedded import IS_ROOT, folder_modes

from pgaccess import Database, DatabaseError
from pgaccess.cli import main
from pgaccess.demo import run_demo
from pgaccess.embedded import EmbeddedServer, project_datadir
from pgaccess.jobs import VideoJobs


def test_demo_runs_end_to_end_and_its_summary_adds_up(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--jobs", "40", "--workers", "4"]) == 0
    out = capsys.readouterr().out

    def number(label: str) -> int:
        match = re.search(rf"^\s+{label}\s+(\d+)", out, re.MULTILINE)
        assert match, f"no {label!r} line in:\n{out}"
        return int(match.group(1))

    run_id = re.search(r"summary: run (\S+)", out).group(1)  # type: ignore[union-attr]
    mine = f"src_hash LIKE 'demo-{run_id}-%'"
    assert sum(status_counts(db, mine).values()) == 40
    assert number("jobs completed") == status_counts(db, mine).get("completed", 0)
    assert number("jobs failed") == status_counts(db, mine).get("failed", 0)
    assert number("jobs completed") + number("jobs failed") == 40
    (facts,) = db.execute(
        "SELECT count(*) FILTER (WHERE attempts > 1) AS retried,"
        " (SELECT count(*) FROM highlight h JOIN video_job j ON j.id = h.job_id"
        f"   WHERE {mine}) AS highlights,"
        " (SELECT count(*) FROM processing_metrics m JOIN video_job j"
        f"   ON j.id = m.job_id WHERE {mine} AND m.stage = 'handler') AS handler_runs"
        f" FROM video_job WHERE {mine}"
    )
    assert number("jobs retried") == facts["retried"]
    assert number("highlights written") == facts["highlights"]
    assert number("handler") == facts["handler_runs"] == number("jobs completed")
    per_job = db.execute(
        "SELECT count(h.id) AS n FROM video_job j LEFT JOIN highlight h"
        f" ON h.job_id = j.id WHERE {mine} AND j.status = 'completed' GROUP BY j.id"
    )
    assert {r["n"] for r in per_job} <= {1, 2, 3, 4}
    assert re.search(r"throughput\s+[\d.]+ jobs/s \(40 jobs", out)
    assert re.search(r"pool\s+maxconn 6, requests \d+, waits \d+, timeouts 0", out)


def test_demo_refuses_a_database_with_other_work(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = VideoJobs(db).enqueue("real-video", "/in/real.mp4")
    assert main(["demo", "--jobs", "5"]) == 1
    assert "not the demo's" in capsys.readouterr().err
    assert db.count("video_job") == 1
    assert db.find_one("video_job", {"id": job_id})["status"] == "queued"  # type: ignore[index]


# ------------------------------------------------ the embedded server's lifecycle
@pytest.fixture
def project(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A new 0700 project folder as the current directory, and no DSN set."""
    path = Path(tempfile.mkdtemp(prefix="pgaccess-demo-"))
    monkeypatch.chdir(path)
    monkeypatch.delenv("PGACCESS_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    yield path
    server = EmbeddedServer(project_datadir(path))
    server.destroy()
    if IS_ROOT:  # its folder under /var/lib/pgaccess/clusters
        shutil.rmtree(server.datadir.parent, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)


def demo_process(project: Path, *args: str) -> subprocess.Popen[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PGACCESS_DSN", "DATABASE_URL")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pgaccess", "demo", *args],
        cwd=project, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for_output(stream: IO[str], pattern: str, timeout: float = 60.0) -> str:
    """Read ``stream`` until a line matches ``pattern``; the lines read so far."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    seen = ""
    while True:
        line = lines.get(timeout=timeout)
        seen += line
        if not line or re.search(pattern, line):
            assert line, f"no line matching {pattern!r} in:\n{seen}"
            return seen


def test_demo_stops_the_server_when_creating_its_database_fails(
    project: Path,
) -> None:
    before = folder_modes(project)
    # A server as a killed demo leaves it, and a session on template1, which
    # CREATE DATABASE needs to itself: the demo's database cannot be made.
    server = EmbeddedServer(project_datadir(project)).start()
    holder = server.connect("template1")
    try:
        with pytest.raises(psycopg2.errors.ObjectInUse):
            run_demo(jobs=5, workers=2, out=io.StringIO())
    finally:
        holder.close()
    assert not server.is_running()
    assert folder_modes(project) == before


def test_demo_stops_the_server_it_started_when_the_run_fails(project: Path) -> None:
    server = EmbeddedServer(project_datadir(project))
    with server.running():
        server.create_database("pgaccess_demo")
        with server.connect() as conn, conn.cursor() as cur:
            cur.execute("ALTER DATABASE pgaccess_demo ALLOW_CONNECTIONS false")
    assert not server.is_running()
    out = io.StringIO()
    with pytest.raises(DatabaseError, match="not currently accepting connections"):
        run_demo(jobs=5, workers=2, out=out)
    assert "(database pgaccess_demo, kept between runs; started" in out.getvalue()
    assert not server.is_running()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_the_server_on_a_signal(project: Path, signum: int) -> None:
    before = folder_modes(project)
    proc = demo_process(project, "--jobs", "20000", "--workers", "2")
    try:
        assert proc.stdout is not None
        wait_for_output(proc.stdout, r"^pgaccess demo: run ")
        server = EmbeddedServer(project_datadir(project))
        assert server.is_running()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert not server.is_running()
    assert folder_modes(project) == before


def test_a_server_left_by_a_killed_demo_is_reused_then_stopped(project: Path) -> None:
    # Few jobs: the next run's workers take what the killed one left queued.
    proc = demo_process(project, "--jobs", "200", "--workers", "1")
    try:
        assert proc.stdout is not None
        wait_for_output(proc.stdout, r"^pgaccess demo: run ")
    finally:
        proc.kill()
        proc.communicate()
    server = EmbeddedServer(project_datadir(project))
    assert server.is_running()
    pid = (server.datadir / "postmaster.pid").read_text().split()[0]

    out = io.StringIO()
    summary = run_demo(jobs=5, workers=2, out=out)
    assert summary["completed"] + summary["failed"] == 5
    assert "kept between runs; already running" in out.getvalue()
    # Reused, not duplicated: the one server that was running, and now stopped.
    assert not server.is_running()
    log = (server.datadir / "server.log").read_text()
    assert log.count("database system is ready to accept connections") == 1, pid
