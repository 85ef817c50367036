"""Prometheus metrics against a real PostgreSQL: a Worker's ``/metrics`` scraped over
HTTP and checked against the database, the collector in an application's registry,
the queue sampled by one thread, and the extra kept out of ``import pgaccess``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.workers import CLAIM_MARK, enqueue_n, statement_calls, wait_until

from pgaccess import Database, InvalidQuery
from pgaccess.embedded import free_port
from pgaccess.jobs import VideoJobs, Worker
from pgaccess.metrics import QueueSampler, register

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def fast_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(QueueSampler, "INTERVAL", 0.05)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape(address: Tuple[str, int]) -> Samples:
    host, port = address
    host = "127.0.0.1" if host == "0.0.0.0" else host
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, tuple(sorted(labels.items()))))


def db_status_counts(db: Database) -> Dict[str, int]:
    rows = db.execute("SELECT status, count(*) AS n FROM video_job GROUP BY status")
    counts = dict.fromkeys(("queued", "processing", "completed", "failed"), 0)
    counts.update({r["status"]: r["n"] for r in rows})
    return counts


def sampler_threads() -> List[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name == "pgaccess-metrics-queue" and t.is_alive()
    ]


def handler(job: Dict[str, Any]) -> Dict[str, Any]:
    if job["src_hash"].startswith("bad"):
        raise RuntimeError("a bad video")
    return {"metrics": {"decode": 12.0, "detect": 1500.0}}


@pytest.fixture
def worker(db: Database) -> Iterator[Worker]:
    jobs = VideoJobs(db)
    jobs.BACKOFF_BASE = 0.0
    w = Worker(
        db,
        handler,
        threads=2,
        worker_id="metrics-test",
        jobs=jobs,
        idle_min=0.01,
        idle_max=0.05,
        metrics_port=0,
        metrics_addr="127.0.0.1",
    )
    yield w
    w.stop()
    assert w.join(15)


# ------------------------------------------------------------ a Worker's /metrics
def test_worker_metrics_match_the_database(db: Database, worker: Worker) -> None:
    jobs = VideoJobs(db)
    enqueue_n(jobs, 30, prefix="good")
    jobs.enqueue_many(
        [
            {"src_hash": f"bad{i}", "input_path": "/in", "max_attempts": 1}
            for i in range(4)
        ]
    )
    jobs.enqueue("later", "/in/later", run_after=3600)  # stays queued
    worker.start()
    assert worker.metrics_address is not None
    wait_until(lambda: db_status_counts(db)["completed"] == 30, what="the jobs")
    wait_until(lambda: db_status_counts(db)["failed"] == 4, what="the failures")

    counts = db_status_counts(db)
    assert counts == {"queued": 1, "processing": 0, "completed": 30, "failed": 4}

    def sampled_now() -> bool:
        s = scrape(worker.metrics_address)  # type: ignore[arg-type]
        return all(value(s, "pgaccess_jobs", status=k) == n for k, n in counts.items())

    wait_until(sampled_now, what="the queue gauges to match the database")
    s = scrape(worker.metrics_address)  # type: ignore[arg-type]
    assert value(s, "pgaccess_jobs", status="cancelled") == 0
    w = {"worker": "metrics-test"}
    completed_in_db = db.count("video_job", {"status": "completed"})
    assert value(s, "pgaccess_jobs_completed_total", **w) == completed_in_db
    assert value(s, "pgaccess_jobs_failed_total", **w) == 4
    assert value(s, "pgaccess_jobs_claimed_total", **w) == 34
    assert worker.stats()["completed"] == completed_in_db

    # Stage histograms: one observation per completed job and stage, bucketed.
    detect = {**w, "stage": "detect"}
    assert value(s, "pgaccess_stage_duration_seconds_count", **detect) == 30
    assert value(s, "pgaccess_stage_duration_seconds_sum", **detect) == pytest.approx(
        45
    )
    assert value(s, "pgaccess_stage_duration_seconds_bucket", le="1.0", **detect) == 0
    assert value(s, "pgaccess_stage_duration_seconds_bucket", le="2.5", **detect) == 30
    handler_stage = {**w, "stage": "handler"}
    assert value(s, "pgaccess_stage_duration_seconds_count", **handler_stage) == 30

    # The oldest queued job is the delayed one: its age is the database's.
    age = db.execute(
        "SELECT extract(epoch FROM now() - created_at)::float8 AS s FROM video_job "
        "WHERE src_hash = 'later'"
    )[0]["s"]
    oldest = value(s, "pgaccess_jobs_oldest_queued_seconds")
    assert oldest is not None and 0 < oldest <= age + 1.0

    # The pool: the worker's own, by name, as pool.stats() reports it (the sampler
    # keeps using it: the scrape lies between a look before and one after).
    before = db.pool.stats()
    s = scrape(worker.metrics_address)  # type: ignore[arg-type]
    after = db.pool.stats()
    p = {"pool": before["name"]}
    assert value(s, "pgaccess_pool_max_size", **p) == before["maxconn"]
    for key, name in (
        ("size", "pgaccess_pool_size"),
        ("requests", "pgaccess_pool_requests_total"),
        ("connections_opened", "pgaccess_pool_connections_opened_total"),
    ):
        low, high = sorted((before[key], after[key]))
        assert low <= value(s, name, **p) <= high, name  # type: ignore[operator]
    assert before["requests"] > 0 and before["size"] > 0

    # Statements: the claim's histogram counts what the statement statistics count.
    claims = [
        (labels, v)
        for (name, labels), v in s.items()
        if name == "pgaccess_statement_duration_seconds_count"
        and CLAIM_MARK in dict(labels)["statement"]
    ]
    assert len(claims) == 1
    assert claims[0][1] <= statement_calls(db, CLAIM_MARK)
    assert claims[0][1] >= worker.stats()["empty_claims"] > 0


def test_errors_are_counted_by_sqlstate(db: Database, worker: Worker) -> None:
    worker.start()
    before = value(
        scrape(worker.metrics_address),  # type: ignore[arg-type]
        "pgaccess_statement_errors_total",
        sqlstate="22012",
    )
    for _ in range(3):
        with pytest.raises(Exception, match="division by zero"):
            db.execute("SELECT 1 / 0")
    with pytest.raises(InvalidQuery):
        db.execute("SELECT %(missing)s", {"other": 1})  # refused before it is sent
    after = value(
        scrape(worker.metrics_address),  # type: ignore[arg-type]
        "pgaccess_statement_errors_total",
        sqlstate="22012",
    )
    assert after == (before or 0) + 3


def test_only_metrics_is_served(worker: Worker) -> None:
    worker.start()
    host, port = worker.metrics_address  # type: ignore[misc]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{host}:{port}/other", timeout=10)
    err.value.close()
    assert err.value.code == 404


def test_a_port_in_use_starts_nothing(db: Database) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = Worker(db, handler, metrics_port=port, metrics_addr="127.0.0.1")
        before = len(sampler_threads())
        with pytest.raises(OSError):
            w.start()
        assert not w.alive
        time.sleep(0.2)
        assert len(sampler_threads()) <= before  # its sampler was let go


def test_the_server_stops_with_the_worker(db: Database, worker: Worker) -> None:
    worker.start()
    address = worker.metrics_address
    scrape(address)  # type: ignore[arg-type]
    worker.stop()
    assert worker.join(15)
    assert worker.metrics_address is None
    with pytest.raises(OSError):
        scrape(address)  # type: ignore[arg-type]


# ------------------------------------------------------------ an application's registry
def test_register_in_an_application_registry(db: Database) -> None:
    jobs = VideoJobs(db)
    enqueue_n(jobs, 5)
    registry = CollectorRegistry()
    threads_before = len(sampler_threads())
    collector = register(registry, db=db)
    second = register(CollectorRegistry(), db=db)
    try:
        # Two collectors of one pool share one sampling thread.
        assert len(sampler_threads()) == threads_before + 1

        def five_queued() -> bool:
            s = parse(generate_latest(registry).decode())
            return value(s, "pgaccess_jobs", status="queued") == 5

        wait_until(five_queued, what="the sampled queue")
        s = parse(generate_latest(registry).decode())
        assert value(s, "pgaccess_pool_max_size", pool=db.pool.name) == db.pool.maxconn
        # No worker registered: no worker families.
        assert not any(name.startswith("pgaccess_jobs_completed") for name, _ in s)
    finally:
        registry.unregister(collector)
        collector.close()
        second.close()
        collector.close()  # idempotent
    wait_until(lambda: len(sampler_threads()) == threads_before, what="the sampler")


def test_the_queue_is_read_on_an_interval_not_per_scrape(db: Database) -> None:
    registry = CollectorRegistry()
    collector = register(registry, db=db)
    try:
        wait_until(
            lambda: (
                value(
                    parse(generate_latest(registry).decode()),
                    "pgaccess_jobs",
                    status="queued",
                )
                is not None
            ),
            what="a first sample",
        )
        mark = "AS oldest_s"  # only the queue gauges' statement says this
        calls0 = statement_calls(db, mark)
        t0 = time.monotonic()
        for _ in range(200):
            generate_latest(registry)
        elapsed = time.monotonic() - t0
        sampled = statement_calls(db, mark) - calls0
        # 200 scrapes cost at most one statement per interval of their duration.
        assert sampled <= elapsed / QueueSampler.INTERVAL + 2
    finally:
        registry.unregister(collector)
        collector.close()


# ------------------------------------------------------------ the extra stays optional
def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_import_pgaccess_does_not_import_prometheus_client() -> None:
    proc = run_python(
        "import sys, pgaccess, pgaccess.jobs, pgaccess.cli\n"
        "w = pgaccess.Worker(pgaccess.Database(dsn='dbname=none'), print)\n"
        "print('prometheus_client' in sys.modules, 'pgaccess.metrics' in sys.modules)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


BLOCK_PROMETHEUS = (
    "import sys\nsys.modules['prometheus_client'] = None  # as if not installed\n"
)


@pytest.mark.parametrize(
    "code",
    [
        "import pgaccess.metrics",
        "import pgaccess\n"
        "pgaccess.Worker(pgaccess.Database(dsn='dbname=none'), print, metrics_port=0)",
    ],
    ids=["import", "worker"],
)
def test_metrics_without_the_extra_say_how_to_get_it(code: str) -> None:
    proc = run_python(BLOCK_PROMETHEUS + code)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pgaccess metrics need prometheus_client")
    assert "pip install 'pgaccess[metrics]'" in last


# ------------------------------------------------------------ worker --metrics-port


def test_cli_worker_serves_metrics(db: Database) -> None:
    jobs = VideoJobs(db)
    enqueue_n(jobs, 6)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgaccess",
            "worker",
            "--threads",
            "2",
            "--handler",
            "support.jobworker:record_run",
            "--metrics-port",
            str(port),
            "--metrics-addr",
            "127.0.0.1",
        ],
        cwd=os.path.dirname(__file__),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def scraped_six() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                s = scrape(("127.0.0.1", port))
            except OSError:
                return False
            done = [
                v for (n, _), v in s.items() if n == "pgaccess_jobs_completed_total"
            ]
            return done == [6] and value(s, "pgaccess_jobs", status="completed") == 6

        wait_until(scraped_six, timeout=60, what="the worker's metrics")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert db.count("video_job", {"status": "completed"}) == 6
    assert f"serving metrics on http://127.0.0.1:{port}/metrics" in err
