"""Prometheus metrics of pgaccess: the pool, statements, retries, the queue, a Worker.

Needs the ``metrics`` extra (``pip install 'pgaccess[metrics]'``, on
``prometheus_client``); importing this module without it raises ``ImportError``
saying so. ``import pgaccess`` never imports it.

Every number is read at scrape time from what pgaccess already counts (custom
collectors, nothing is counted twice), except the queue's: ``pgaccess_jobs{status}``
and ``pgaccess_jobs_oldest_queued_seconds`` come from one statement that a single
thread per process and pool runs every ``QueueSampler.INTERVAL`` seconds, whatever
the number of scrapes and registries.

- ``Worker(..., metrics_port=9100)`` and ``pgaccess worker --metrics-port 9100`` serve
  ``/metrics`` with :func:`serve`.
- In an application's own registry::

      from prometheus_client import REGISTRY
      collector = pgaccess.metrics.register(REGISTRY, db=db)
      ...
      collector.close()  # stops its share of the queue sampling

Families (``_total`` for counters):

- pool, per ``pool`` name: ``pgaccess_pool_size``, ``_max_size``, ``_in_use``,
  ``_idle``, ``_waiting`` and ``_max_wait_seconds`` (gauges), ``_requests``,
  ``_waits``, ``_timeouts``, ``_connections_opened``, ``_connections_lost``,
  ``_connections_discarded``, ``_connect_errors``, ``_wait_seconds`` ... (counters);
- statements (per process): ``pgaccess_statement_duration_seconds`` (a histogram per
  statement shape: labels ``shape``, a hash, and ``statement``, its text cut to
  ``STATEMENT_LABEL_CHARS``), ``pgaccess_statement_errors_total{sqlstate}``;
- retries: ``pgaccess_retry_attempts_total``, ``pgaccess_retries_total{sqlstate}``,
  ``pgaccess_retry_give_ups_total``, ``pgaccess_retry_wait_seconds_total``;
- the queue: ``pgaccess_jobs{status}``, ``pgaccess_jobs_oldest_queued_seconds``,
  ``pgaccess_jobs_sample_age_seconds``;
- a Worker, per ``worker`` id: ``pgaccess_jobs_claimed_total``, ``_completed_total``,
  ``_failed_total``, ``_lost_total``, ``_released_total``,
  ``pgaccess_worker_errors_total``, ``pgaccess_worker_empty_claims_total`` and
  ``pgaccess_stage_duration_seconds{stage}`` (a histogram of the stage timings of the
  jobs it completed).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from http.server import ThreadingHTTPServer
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)
from urllib.parse import urlsplit

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import MetricsHandler
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover (the test extra installs it)
    raise ImportError(
        "pgaccess metrics need prometheus_client: pip install 'pgaccess[metrics]'"
    ) from exc

from . import stats as _stats
from .database import Database
from .default import reinit_after_fork
from .errors import DatabaseError
from .jobs import queries as Q
from .pool import ConnectionPool, live_pools
from .retry import global_stats

if TYPE_CHECKING:
    from .jobs import Worker

__all__ = ["MetricsServer", "PgaccessCollector", "QueueSampler", "register", "serve"]

logger = logging.getLogger("pgaccess.metrics")

#: Statement text kept in the ``statement`` label (the ``shape`` label tells apart
#: shapes that share their start).
STATEMENT_LABEL_CHARS = 160

STATUSES = Q.STATUSES

# pool.stats() name -> (metric name, help); counters, then gauges.
_POOL_COUNTERS = {
    "requests": ("pgaccess_pool_requests", "Connections requested from the pool."),
    "requests_waiting": ("pgaccess_pool_waits", "Requests that had to wait."),
    "timeouts": ("pgaccess_pool_timeouts", "Requests that timed out waiting."),
    "connections_opened": ("pgaccess_pool_connections_opened", "Connections opened."),
    "connections_lost": ("pgaccess_pool_connections_lost", "Connections found dead."),
    "connections_discarded": (
        "pgaccess_pool_connections_discarded",
        "Connections closed instead of returned (dead, expired, broken).",
    ),
    "connect_errors": ("pgaccess_pool_connect_errors", "Failed connection attempts."),
    "returned_in_transaction": (
        "pgaccess_pool_returned_in_transaction",
        "Connections returned with a transaction open.",
    ),
    "leaks_reported": ("pgaccess_pool_leaks_reported", "Connections held too long."),
    "stalls_detected": ("pgaccess_pool_stalls_detected", "Stalled statements cut."),
    "wait_time": ("pgaccess_pool_wait_seconds", "Seconds callers spent waiting."),
}
_POOL_GAUGES = {
    "size": ("pgaccess_pool_size", "Connections open (idle and in use)."),
    "maxconn": ("pgaccess_pool_max_size", "The most connections the pool opens."),
    "in_use": ("pgaccess_pool_in_use", "Connections lent out."),
    "idle": ("pgaccess_pool_idle", "Connections idle in the pool."),
    "waiting": ("pgaccess_pool_waiting", "Callers waiting for a connection now."),
    "max_wait": ("pgaccess_pool_max_wait_seconds", "The longest wait so far."),
}
# Worker.stats() name -> (metric name, help).
_WORKER_COUNTERS = {
    "claimed": ("pgaccess_jobs_claimed", "Jobs this worker claimed."),
    "completed": ("pgaccess_jobs_completed", "Jobs this worker completed (durably)."),
    "failed": ("pgaccess_jobs_failed", "Jobs whose attempt failed in this worker."),
    "lost": ("pgaccess_jobs_lost", "Jobs taken away from this worker."),
    "released": ("pgaccess_jobs_released", "Unstarted jobs given back on stop."),
    "errors": ("pgaccess_worker_errors", "Claims and completions that failed."),
    "empty_claims": ("pgaccess_worker_empty_claims", "Claims that found no job."),
}


# ------------------------------------------------------------- the queue
class QueueSampler:
    """The queue's counts by status, read by one thread every ``INTERVAL`` seconds.

    Shared: ``QueueSampler.acquire(db)`` gives the sampler of ``db``'s pool (started
    on first use) and ``release()`` stops it when its last user is gone, so a
    process runs one statement per interval however many collectors and scrapes.
    A failed sample is logged and keeps the last values (see ``sample_age``).
    """

    INTERVAL: float = 5.0

    _shared: Dict[int, QueueSampler] = {}
    _shared_lock = threading.Lock()

    def __init__(self, db: Database, interval: Optional[float] = None) -> None:
        self.db = db
        self.interval = self.INTERVAL if interval is None else interval
        self._lock = threading.Lock()
        self._counts: Optional[Dict[str, int]] = None
        self._oldest: float = 0.0
        self._sampled_at: Optional[float] = None
        self._users = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def acquire(cls, db: Database) -> QueueSampler:
        """The running sampler of ``db``'s pool, started if it was not."""
        with cls._shared_lock:
            sampler = cls._shared.get(id(db.pool))
            if sampler is None:
                sampler = cls._shared[id(db.pool)] = cls(db)
                sampler.start()
            sampler._users += 1
            return sampler

    def release(self) -> None:
        """One user fewer; the last one stops the thread."""
        with self._shared_lock:
            self._users -= 1
            if self._users > 0:
                return
            if self._shared.get(id(self.db.pool)) is self:
                del self._shared[id(self.db.pool)]
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="pgaccess-metrics-queue", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        """Run the statement once and keep what it says."""
        rows = self.db.execute(Q.QUEUE_GAUGES)
        counts = dict.fromkeys(STATUSES, 0)
        oldest = 0.0
        for r in rows:
            counts[r["status"]] = int(r["n"])
            if r["status"] == "queued":
                oldest = float(r["oldest_s"] or 0.0)
        with self._lock:
            self._counts = counts
            self._oldest = oldest
            self._sampled_at = time.monotonic()

    def values(self) -> Optional[Tuple[Dict[str, int], float, float]]:
        """(counts by status, oldest queued age, seconds since the sample), or None
        before the first sample."""
        with self._lock:
            if self._counts is None or self._sampled_at is None:
                return None
            return dict(self._counts), self._oldest, time.monotonic() - self._sampled_at

    def _run(self) -> None:
        while True:
            try:
                self.sample()
            except DatabaseError as exc:
                logger.warning("could not sample the queue for metrics: %s", exc)
            if self._stop.wait(self.interval):
                return


def _forget_samplers() -> None:
    # A forked child runs none of its parent's threads (and may have copied the lock
    # held): its collectors start samplers of their own.
    QueueSampler._shared = {}
    QueueSampler._shared_lock = threading.Lock()


reinit_after_fork(_forget_samplers)


# ------------------------------------------------------------- collector
class PgaccessCollector(Collector):
    """A ``prometheus_client`` collector of pgaccess's numbers (see the module).

    ``db``: its pool (else every pool of the process) and, with ``queue=True``, the
    queue gauges (sampled in the background). ``worker``: a Worker's counts and
    stage timings (its ``db`` is used when ``db`` is None). ``close()`` stops the
    queue sampling when no other collector shares it.
    """

    def __init__(
        self,
        *,
        db: Optional[Database] = None,
        worker: Optional[Worker] = None,
        queue: bool = True,
    ) -> None:
        if db is None and worker is not None:
            db = worker.db
        self.db = db
        self.worker = worker
        self._sampler = QueueSampler.acquire(db) if queue and db is not None else None
        self._shapes: Dict[str, str] = {}

    def close(self) -> None:
        """Stop this collector's share of the queue sampling (idempotent)."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.release()

    def collect(self) -> Iterator[Metric]:
        pools = [self.db.pool] if self.db is not None else live_pools()
        yield from _pool_families(pools)
        yield from self._statement_families()
        yield from _retry_families()
        if self._sampler is not None:
            yield from _queue_families(self._sampler)
        if self.worker is not None:
            yield from _worker_families(self.worker)

    def _statement_families(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "pgaccess_statement_duration_seconds",
            "Statement durations by statement shape (values travel separately).",
            labels=["shape", "statement"],
        )
        for text, counts, total in _stats.histograms():
            shape = self._shapes.get(text)
            if shape is None:
                if len(self._shapes) >= _stats.MAX_SHAPES:
                    self._shapes.clear()
                shape = self._shapes[text] = hashlib.sha1(
                    text.encode("utf-8", "replace")
                ).hexdigest()[:12]
            label = " ".join(text.split())[:STATEMENT_LABEL_CHARS]
            hist.add_metric(
                [shape, label], _cumulative(_stats.DURATION_BUCKETS, counts), total
            )
        yield hist
        errors = CounterMetricFamily(
            "pgaccess_statement_errors",
            "Failed statements by SQLSTATE ('none': none, e.g. a lost connection).",
            labels=["sqlstate"],
        )
        for code, n in sorted(_stats.errors_by_sqlstate().items()):
            errors.add_metric([code], n)
        yield errors


def _cumulative(
    bounds: Sequence[float], counts: Sequence[int]
) -> List[Tuple[str, float]]:
    buckets: List[Tuple[str, float]] = []
    running = 0
    for bound, n in zip(bounds, counts):
        running += n
        buckets.append((repr(float(bound)), float(running)))
    buckets.append(("+Inf", float(running + counts[-1])))
    return buckets


def _pool_families(pools: Iterable[ConnectionPool]) -> Iterator[Metric]:
    snapshots = [p.stats() for p in pools]
    for table, family in (
        (_POOL_GAUGES, GaugeMetricFamily),
        (_POOL_COUNTERS, CounterMetricFamily),
    ):
        for key, (name, doc) in table.items():
            metric = family(name, doc, labels=["pool"])
            for snap in snapshots:
                if key in snap:
                    metric.add_metric([str(snap["name"])], float(snap[key]))
            yield metric


def _retry_families() -> Iterator[Metric]:
    snap = global_stats.snapshot()
    yield CounterMetricFamily(
        "pgaccess_retry_attempts",
        "Attempts made under a retry policy.",
        value=snap["attempts"],
    )
    retries = CounterMetricFamily(
        "pgaccess_retries",
        "Retries by the SQLSTATE (or error) retried.",
        labels=["sqlstate"],
    )
    for code, n in sorted(snap["retries_by_sqlstate"].items()):
        retries.add_metric([code], n)
    yield retries
    yield CounterMetricFamily(
        "pgaccess_retry_give_ups", "Retried calls that gave up.", value=snap["give_ups"]
    )
    yield CounterMetricFamily(
        "pgaccess_retry_wait_seconds",
        "Seconds slept between attempts.",
        value=snap["time_waited"],
    )


def _queue_families(sampler: QueueSampler) -> Iterator[Metric]:
    values = sampler.values()
    if values is None:
        return
    counts, oldest, age = values
    jobs = GaugeMetricFamily(
        "pgaccess_jobs", "Jobs in the queue by status (sampled).", labels=["status"]
    )
    for status in STATUSES:
        jobs.add_metric([status], counts.get(status, 0))
    yield jobs
    yield GaugeMetricFamily(
        "pgaccess_jobs_oldest_queued_seconds",
        "Age of the oldest queued job (0: none queued; sampled).",
        value=oldest,
    )
    yield GaugeMetricFamily(
        "pgaccess_jobs_sample_age_seconds",
        "Seconds since the queue gauges were sampled.",
        value=age,
    )


def _worker_families(worker: Worker) -> Iterator[Metric]:
    counts = worker.stats()
    for key, (name, doc) in _WORKER_COUNTERS.items():
        metric = CounterMetricFamily(name, doc, labels=["worker"])
        metric.add_metric([worker.worker_id], counts.get(key, 0))
        yield metric
    hist = HistogramMetricFamily(
        "pgaccess_stage_duration_seconds",
        "Stage timings of the jobs this worker completed.",
        labels=["worker", "stage"],
    )
    bounds = worker.stage_seconds.bounds
    for stage, stage_counts, total in sorted(worker.stage_seconds.snapshot()):
        hist.add_metric(
            [worker.worker_id, stage], _cumulative(bounds, stage_counts), total
        )
    yield hist


# ------------------------------------------------------------- entry points
def register(
    registry: CollectorRegistry,
    *,
    db: Optional[Database] = None,
    worker: Optional[Worker] = None,
    queue: bool = True,
) -> PgaccessCollector:
    """Register pgaccess's collector in ``registry`` and return it.

    See :class:`PgaccessCollector` for ``db``, ``worker`` and ``queue``. To take it
    out: ``registry.unregister(collector)`` and ``collector.close()``.
    """
    collector = PgaccessCollector(db=db, worker=worker, queue=queue)
    try:
        registry.register(collector)
    except Exception:
        collector.close()
        raise
    return collector


class _Handler(MetricsHandler):
    def do_GET(self) -> None:
        if urlsplit(self.path).path not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        super().do_GET()


class MetricsServer:
    """``/metrics`` over HTTP, served by a daemon thread until ``close()``."""

    def __init__(self, port: int, addr: str, collector: PgaccessCollector) -> None:
        self.registry = CollectorRegistry()
        self.collector = collector
        self.registry.register(collector)
        handler: Any = type("MetricsHandler", (_Handler,), {"registry": self.registry})
        try:
            self._server = ThreadingHTTPServer((addr, port), handler)
        except OSError:
            collector.close()
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name="pgaccess-metrics-http",
            daemon=True,
        )
        self._thread.start()
        host, bound = self._server.server_address[:2]
        self.address: Tuple[str, int] = (str(host), int(bound))
        logger.info("serving metrics on http://%s:%d/metrics", host, bound)

    def close(self) -> None:
        """Stop serving and sampling (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self.collector.close()


def serve(
    port: int,
    addr: str = "0.0.0.0",
    *,
    db: Optional[Database] = None,
    worker: Optional[Worker] = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` (port 0: a free one, see ``address``).

    Raises ``OSError`` when the port cannot be had.
    """
    return MetricsServer(port, addr, PgaccessCollector(db=db, worker=worker))
