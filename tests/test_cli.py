"""The ``pgaccess`` command against a real PostgreSQL (PGACCESS_DSN is the test DB)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from pgaccess import Database
from pgaccess.cli import main, parse_duration
from pgaccess.jobs import VideoJobs
from pgaccess.testing import TestServer

TESTS_DIR = Path(__file__).resolve().parent


def status_counts(db: Database, where: str = "true") -> Dict[str, int]:
    rows = db.execute(
        f"SELECT status, count(*) AS n FROM video_job WHERE {where} GROUP BY status"
    )
    return {r["status"]: r["n"] for r in rows}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("250ms", 0.25),
     ("90", 90), ("1.5m", 90), (" 10 S ", 10), ("1h30m", 5400), ("1m 5s", 65)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 minutes", "-5m", "m", "5w", "5m!", "s5"])
def test_parse_duration_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_init_db_applies_the_schema_and_is_idempotent(
    pgaccess_server: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"pgaccess_cli_init_{os.getpid()}"
    dsn = pgaccess_server.create_database(name)
    try:
        assert main(["--dsn", dsn, "init-db"]) == 0
        assert main(["--dsn", dsn, "init-db"]) == 0
        assert f"dbname={name}" in capsys.readouterr().out
        with Database(dsn=dsn, maxconn=1) as fresh:
            tables = fresh.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "ORDER BY tablename"
            )
            indexes = fresh.execute(
                "SELECT indexname FROM pg_indexes WHERE indexname = %s",
                ("video_job_queued_idx",),
            )
        # The pipeline's tables (later migrations may add more) and the version table.
        assert {
            "highlight",
            "pgaccess_schema_version",
            "processing_metrics",
            "video_job",
        } <= {t["tablename"] for t in tables}
        assert len(indexes) == 1
    finally:
        pgaccess_server.drop_database(name)


def test_stats_reports_what_the_table_holds(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = VideoJobs(db)
    ids = jobs.enqueue_many(
        [{"src_hash": f"s{i}", "input_path": "/in"} for i in range(5)]
    )
    for job_id in ids[:2]:
        jobs.claim("w")
        jobs.complete(job_id, "w", metrics={"encode": 4.0})
    jobs.claim("w")
    capsys.readouterr()

    assert main(["stats", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {s: report["queue"][s] for s in ("queued", "processing", "completed")} == (
        {s: status_counts(db).get(s, 0) for s in ("queued", "processing", "completed")}
    )
    assert report["stages"]["encode"]["count"] == db.count(
        "processing_metrics", {"stage": "encode"}
    )
    assert any("video_job" in q["statement"] for q in report["queries"])

    assert main(["stats"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\s+queued\s+2$", text, re.MULTILINE)
    assert re.search(r"^\s+completed\s+2$", text, re.MULTILINE)
    assert re.search(r"^\s+encode\s+2\s", text, re.MULTILINE)


def test_reclaim_requeues_silent_jobs(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = VideoJobs(db)
    stale, fresh = jobs.enqueue("stale", "/in/1"), jobs.enqueue("fresh", "/in/2")
    jobs.claim("w", limit=2)
    db.execute(
        "UPDATE video_job SET heartbeat_at = now() - interval '6 minutes' "
        "WHERE id = %s",
        (stale,),
    )
    assert main(["reclaim", "--older-than", "5m"]) == 0
    assert "reclaimed 1 jobs" in capsys.readouterr().out
    assert db.find_one("video_job", {"id": stale})["status"] == "queued"  # type: ignore[index]
    assert db.find_one("video_job", {"id": fresh})["status"] == "processing"  # type: ignore[index]


def test_a_bad_dsn_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dsn", "host=/nonexistent-dir dbname=x", "reclaim"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pgaccess reclaim: error: could not connect")


def run_cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pgaccess", *args],
        cwd=TESTS_DIR,  # so that --handler support.jobworker:... is found
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_worker_finishes_the_jobs_in_hand_on_sigterm(db: Database) -> None:
    jobs = VideoJobs(db)
    ids = jobs.enqueue_many(
        [{"src_hash": f"w{i}", "input_path": "/in"} for i in range(6)]
    )
    env = {**os.environ, "SLOW_SECONDS": "0.5"}
    proc = run_cli(
        "worker", "--threads", "2", "--handler", "support.jobworker:slow", env=env
    )
    try:
        deadline = time.monotonic() + 30
        while status_counts(db).get("processing", 0) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        in_hand = {r["id"] for r in db.find_many("video_job", {"status": "processing"})}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "worker stopped" in out and "SIGTERM" in err
    rows = {r["id"]: r for r in db.find_many("video_job")}
    assert not any(r["status"] == "processing" for r in rows.values())
    # In hand: the jobs running when the signal came, completed; and the jobs a
    # batch claimed ahead and had not started, given back (their attempt not counted).
    for i in in_hand:
        row = rows[i]
        assert row["status"] == "completed" or (
            row["status"] == "queued" and row["attempts"] == 0
        ), row
    assert any(rows[i]["status"] == "completed" for i in in_hand)
    # It claimed nothing after the signal: the others were left queued.
    assert {r["status"] for r in rows.values()} <= {"completed", "queued"}
    assert status_counts(db).get("queued", 0) >= 1
    runs = db.execute(
        "SELECT job_id, count(*) AS n FROM processing_metrics "
        "WHERE stage = 'handler_run' GROUP BY job_id"
    )
    completed = {i for i in ids if rows[i]["status"] == "completed"}
    assert {r["job_id"]: r["n"] for r in runs} == dict.fromkeys(completed, 1)
    assert db.count("highlight") == len(completed)


def test_worker_rejects_a_handler_it_cannot_load() -> None:
    proc = run_cli("worker", "--handler", "support.jobworker:no_such_function")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "support.jobworker has no no_such_function" in err


def test_python_m_pgaccess_shows_the_commands() -> None:
    proc = run_cli("--help")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    for command in ("init-db", "migrate", "stats", "reclaim", "worker", "demo"):
        assert command in out
