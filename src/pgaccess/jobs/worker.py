"""``Worker``: threads that claim jobs in batches, run a handler on each, record the
outcomes in batches, and wake on NOTIFY when the queue was empty."""

from __future__ import annotations

import logging
import os
import socket
import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from .. import schema
from ..config import TRANSACTION_POOLER
from ..database import Database
from ..errors import DatabaseError, InvalidQuery
from ..stats import Histograms
from . import queries as Q
from .listener import Listener, Wakeup
from .queue import Duration, JobHandle, VideoJobs, error_text, seconds

if TYPE_CHECKING:
    from ..metrics import MetricsServer

__all__ = ["Handler", "Worker"]

logger = logging.getLogger("pgaccess.jobs.worker")

#: What ``Worker`` runs per job: ``handler(job_row) -> result``. The result is None
#: or a mapping with optional ``highlights`` (a list of dicts with start, end, score
#: and label), ``output_path``, ``metrics`` (stage name -> milliseconds) and
#: ``spawn`` (a list of dicts of ``JobHandle.spawn``'s arguments: the job's children).
Handler = Callable[[Dict[str, Any]], Any]

_COUNTS = (
    "claimed",
    "completed",
    "failed",
    "lost",
    "released",
    "errors",
    "empty_claims",
)


# ----------------------------------------------------------------- worker
class Worker:
    """Threads that claim jobs, run ``handler`` on each, and record the outcome.

    ``handler(job_row) -> result``: ``job_row`` is the claimed row (the columns of
    ``queries.CLAIMED_COLUMNS``, and ``children_done``); the result (None, or a
    mapping with ``highlights``, ``output_path``, ``metrics`` and ``spawn``) is
    written with the job's completion, with the worker's ``handler`` stage timing;
    an exception fails that job alone (retried later with backoff). A job that
    spawned children ends ``waiting`` for them, and comes back with
    ``children_done`` once they all finished (see ``JobHandle.spawn``).

    Batches: a thread claims up to N due jobs in one statement and runs them one by
    one. N starts at 1, doubles after a full batch up to ``CLAIM_BATCH_MAX``, falls
    to what came after a short one, and stays below ``BATCH_SECONDS`` of handler
    time: a deep queue is drained in batches, a short one (or slow handlers) one job
    at a time, spread over threads and hosts. Jobs claimed and not yet started are
    held (heartbeated). Completions are written in one statement per batch (or
    sooner, when waiting for the next handler would keep one pending longer than
    ``FLUSH_AFTER``), and counted only once that statement returned: a job is
    durable before it counts as done. A crash before that re-runs those jobs after
    ``reclaim_stale`` (at least once, as for a crash mid-job); a completion never
    lands twice.

    Idle threads wait for a notification (the schema's insert trigger NOTIFYs, and
    a listener on a dedicated connection, from the pool's DSN or ``listen_dsn=``,
    wakes as many threads as there are new jobs), and poll meanwhile: ``idle_min``
    doubling up to ``idle_max`` (at most 1 s by default), which bounds how late a
    job starts when the listener is down, and finds jobs due later.
    ``listen=False``: polling only.

    ``run()`` blocks until ``stop()`` (or the given event); ``start()``/``stop()``/
    ``join()`` run it in the background. On stop, each thread finishes the job in
    hand, writes the completions pending, and gives the jobs it claimed but did not
    start back to the queue (their attempt not counted). Thread ids are
    ``"{worker_id}-{n}"``. The threads are daemons: a process that exits without
    stopping them leaves their jobs ``processing`` until ``reclaim_stale`` (run every
    ``RECLAIM_INTERVAL`` when ``reclaim_after`` is given) returns them.
    ``purge_after``: delete jobs finished that long ago, every ``PURGE_INTERVAL``.

    ``metrics_port``: serve Prometheus metrics at ``/metrics`` on that port (0: any
    free one, see ``metrics_address``) of ``metrics_addr`` while the worker runs:
    this worker's counts and stage timings (``stage_seconds``), its pool, the
    statements, the retries and the queue (see ``pgaccess.metrics``; needs the
    ``metrics`` extra, else ``ImportError`` here).
    """

    IDLE_MIN: float = 0.05
    IDLE_MAX: float = 1.0
    RECLAIM_INTERVAL: float = 30.0
    PURGE_INTERVAL: float = 300.0
    #: The most jobs a thread claims in one statement.
    CLAIM_BATCH_MAX: int = 64
    #: A batch is kept below this many seconds of handler time (by its running mean).
    BATCH_SECONDS: float = 0.5
    #: The longest a finished job's completion waits for others to share a statement.
    FLUSH_AFTER: float = 0.005

    def __init__(
        self,
        db: Database,
        handler: Handler,
        *,
        threads: int = 1,
        worker_id: Optional[str] = None,
        jobs: Optional[VideoJobs] = None,
        record_metrics: bool = True,
        idle_min: Optional[float] = None,
        idle_max: Optional[float] = None,
        reclaim_after: Optional[Duration] = None,
        purge_after: Optional[Duration] = None,
        listen: bool = True,
        listen_dsn: Optional[str] = None,
        metrics_port: Optional[int] = None,
        metrics_addr: str = "0.0.0.0",
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.db = db
        self.handler = handler
        self.threads = threads
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.jobs = jobs if jobs is not None else VideoJobs(db)
        self.record_metrics = record_metrics
        self.idle_max = self.IDLE_MAX if idle_max is None else idle_max
        self.idle_min = min(
            self.IDLE_MIN if idle_min is None else idle_min, self.idle_max
        )
        self.reclaim_after = (
            None if reclaim_after is None else seconds(reclaim_after, "reclaim_after")
        )
        self.purge_after = (
            None if purge_after is None else seconds(purge_after, "purge_after")
        )
        self.listen = listen
        self.listen_dsn = listen_dsn
        self.listener: Optional[Listener] = None
        self._wakeup = Wakeup()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = dict.fromkeys(_COUNTS, 0)
        #: Stage timings (seconds) of the jobs this worker completed.
        self.stage_seconds = Histograms()
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self._metrics: Optional[MetricsServer] = None
        if metrics_port is not None:
            from .. import metrics  # noqa: F401 (fails here if the extra is missing)

    def __repr__(self) -> str:
        return f"<Worker {self.worker_id!r} threads={self.threads}>"

    # ----------------------------------------------------------- control
    def start(self) -> None:
        """Start the threads and return. Raises RuntimeError if already started, and
        ``SchemaVersionError`` if the database's schema is older than this pgaccess
        needs (run ``pgaccess migrate``)."""
        if self._threads:
            raise RuntimeError(f"{self!r} was already started")
        # SchemaVersionError before any thread runs statements the schema lacks.
        schema.check_version(self.db.pool)
        dsn = None
        if self.listen:
            dsn = self.listen_dsn or self.db.session_dsn
            if dsn is None:
                settings = self.db.pool.settings
                if settings.pooler == TRANSACTION_POOLER:
                    raise InvalidQuery(
                        "LISTEN needs a session, which the pool's transaction-mode "
                        "pooler does not keep: pass Worker(listen_dsn=...) or "
                        "Database(session_dsn=...) (the server, or a session-mode "
                        "pooler), or listen=False to poll"
                    )
                dsn = settings.dsn
        # After the checks, before any thread: a port in use starts nothing.
        if self.metrics_port is not None:
            from ..metrics import serve

            self._metrics = serve(
                self.metrics_port, self.metrics_addr, db=self.db, worker=self
            )
        if dsn is not None:
            self.listener = Listener(
                dsn,
                Q.CHANNEL,
                self._wakeup.wake,
                name="pgaccess-worker-listener",
            )
            self.listener.start()
        for n in range(1, self.threads + 1):
            thread = threading.Thread(
                target=self._loop,
                args=(f"{self.worker_id}-{n}",),
                name=f"pgaccess-worker-{n}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        if self.reclaim_after is not None or self.purge_after is not None:
            thread = threading.Thread(
                target=self._maintain, name="pgaccess-worker-maintenance", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        logger.info("worker %s started with %d threads", self.worker_id, self.threads)

    def stop(self) -> None:
        """Ask the threads to stop after the job in hand; does not wait (see join)."""
        self._stop.set()
        self._wakeup.close()
        if self.listener is not None:
            self.listener.stop()
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()

    @property
    def metrics_address(self) -> Optional[Tuple[str, int]]:
        """(host, port) the metrics are served on while the worker runs, else None."""
        return None if self._metrics is None else self._metrics.address

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the threads to end; True if they all did within ``timeout``."""
        deadline = None if timeout is None else perf_counter() + timeout
        for thread in self._threads:
            left = None if deadline is None else max(deadline - perf_counter(), 0.0)
            thread.join(left)
        if self.listener is not None and self._stop.is_set():
            left = None if deadline is None else max(deadline - perf_counter(), 0.0)
            self.listener.join(left)
        return not self.alive

    @property
    def alive(self) -> bool:
        """Whether any thread is still running."""
        listening = self.listener is not None and self.listener.alive
        return listening or any(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stop.is_set()

    def run(self, stop_event: Optional[threading.Event] = None) -> None:
        """Start, block until ``stop_event`` is set (or ``stop()``), then stop and join.

        Wakes twice a second, so signal handlers of the main thread run promptly.
        """
        self.start()
        try:
            while not self._stop.is_set() and not (
                stop_event is not None and stop_event.is_set()
            ):
                (stop_event or self._stop).wait(0.5)
        except BaseException:
            # KeyboardInterrupt (a second Ctrl-C): leave without waiting. The threads
            # are daemons; the jobs they hold go back to the queue by reclaim_stale.
            self.stop()
            raise
        self.stop()
        self.join()
        logger.info("worker %s stopped: %s", self.worker_id, self.stats())

    def stats(self) -> Dict[str, int]:
        """This worker's counts: claimed, completed, failed, lost, released (given
        back on stop), errors, and empty_claims (claims that found nothing)."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------ threads
    def _add(self, **counts: int) -> None:
        with self._lock:
            for what, n in counts.items():
                self._counts[what] += n

    def _maintain(self) -> None:
        next_reclaim = next_purge = perf_counter()
        while not self._stop.is_set():
            now = perf_counter()
            if self.reclaim_after is not None and now >= next_reclaim:
                next_reclaim = now + self.RECLAIM_INTERVAL
                try:
                    self.jobs.reclaim_stale(self.reclaim_after)
                except DatabaseError as exc:
                    logger.warning("reclaim_stale failed: %s", exc)
            if self.purge_after is not None and now >= next_purge:
                next_purge = now + self.PURGE_INTERVAL
                try:
                    purged = self.jobs.purge(self.purge_after)
                    if purged:
                        logger.info("purged %d finished jobs", purged)
                except DatabaseError as exc:
                    logger.warning("purge failed: %s", exc)
            self._stop.wait(0.5)

    def _loop(self, worker_id: str) -> None:
        limit = 1
        delay = self.idle_min
        mean = 0.0  # running mean of a handler's seconds
        while not self._stop.is_set():
            seen = self._wakeup.generation
            try:
                rows = self.jobs.claim(worker_id, limit=limit)
            except Exception as exc:
                self._add(errors=1)
                logger.warning("%s could not claim a job: %s", worker_id, exc)
                rows = []
            if not rows:
                # Nothing due, or the database is unwell: wait for a notification,
                # polling ever less often.
                limit = 1
                self._add(empty_claims=1)
                if self._wakeup.wait(delay, seen):
                    delay = self.idle_min
                else:
                    delay = min(delay * 2, self.idle_max)
                continue
            delay = self.idle_min
            got = len(rows)
            handles = [JobHandle(row, worker_id, self.jobs) for row in rows]
            self.jobs.hold(handles)
            self._add(claimed=got)
            try:
                mean = self._batch(worker_id, handles, mean)
            except Exception:  # a bug, not a job's failure: keep the thread alive
                self._add(errors=1)
                logger.exception("%s: a batch of %d jobs broke off", worker_id, got)
            # The next batch: twice as many after a full one, what came after a short
            # one, and no more than BATCH_SECONDS of handler time.
            limit = min(limit * 2, self.CLAIM_BATCH_MAX) if got >= limit else got
            if mean > 0:
                limit = max(1, min(limit, int(self.BATCH_SECONDS / mean)))

    def _batch(self, worker_id: str, handles: List[JobHandle], mean: float) -> float:
        """Run the handler on each claimed job, write the completions; the new
        running mean of handler seconds."""
        pending: List[JobHandle] = []
        oldest = 0.0
        i = 0
        blocks = self.jobs.open_blocks()
        try:
            for i, job in enumerate(handles):  # noqa: B007 (read in finally)
                if self._stop.is_set():
                    break
                if pending and perf_counter() + mean - oldest > self.FLUSH_AFTER:
                    self._flush(pending)
                if job.lost.is_set():  # the heartbeat found it gone before it started
                    self.jobs.unhold((job,))
                    self._add(lost=1)
                    continue
                t0 = perf_counter()
                # The job is the thread's open block while its handler runs: a
                # jobs.track() in the handler makes a child of it.
                blocks.append(job)
                try:
                    result = self.handler(dict(job.row))
                    _apply_result(job, result)
                except Exception as exc:
                    mean = _update_mean(mean, perf_counter() - t0)
                    self.jobs.unhold((job,))
                    self._add(failed=1)
                    logger.warning(
                        "%s: job %d failed: %s", worker_id, job.id, error_text(exc)
                    )
                    self.jobs.fail_quietly(job, exc)
                    continue
                finally:
                    blocks.pop()
                t1 = perf_counter()
                mean = _update_mean(mean, t1 - t0)
                if self.record_metrics:
                    job.record("handler", (t1 - t0) * 1000.0)
                if not pending:
                    oldest = t1
                pending.append(job)
            else:
                i = len(handles)
        finally:
            # Also on a KeyboardInterrupt in a handler: what finished is written,
            # what did not start (and the job in hand) goes back to the queue.
            self._flush(pending)
            self._release(handles[i:])
        return mean

    def _flush(self, pending: List[JobHandle]) -> None:
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        try:
            outcome = self.jobs.complete_many(batch)
        except DatabaseError as exc:
            self._add(errors=len(batch))
            logger.warning(
                "could not record the completion of %d jobs; reclaim_stale will "
                "return them: %s",
                len(batch),
                exc,
            )
            return
        for lost in outcome.lost:
            logger.warning("%s", lost)
        for job_id, refusal in outcome.refused:
            logger.warning(
                "job %d could not be completed: %s", job_id, error_text(refusal)
            )
        self._add(
            completed=len(outcome.completed),
            lost=len(outcome.lost),
            failed=len(outcome.refused),
        )
        done = set(outcome.completed)
        self.stage_seconds.observe_many(
            [
                (stage, ms / 1000.0)
                for h in batch
                if h.id in done
                for _, stage, ms in h.timings
            ]
        )

    def _release(self, handles: List[JobHandle]) -> None:
        if not handles:
            return
        try:
            released = self.jobs.release_many(handles)
        except DatabaseError as exc:
            logger.warning(
                "could not give %d unstarted jobs back; reclaim_stale will: %s",
                len(handles),
                exc,
            )
            return
        self._add(released=len(released))


def _update_mean(mean: float, value: float) -> float:
    return value if mean == 0.0 else 0.8 * mean + 0.2 * value


def _apply_result(job: JobHandle, result: Any) -> None:
    """Put a handler's result on the handle, to be written with the completion."""
    if result is None:
        return
    if not isinstance(result, Mapping):
        raise TypeError(
            "a handler returns None or a dict with highlights, output_path and "
            f"metrics, not {type(result).__name__}"
        )
    unknown = set(result) - {"highlights", "output_path", "metrics", "spawn"}
    if unknown:
        raise TypeError(f"a handler's result has unknown keys: {sorted(unknown)}")
    job.add_highlights(result.get("highlights") or ())
    if result.get("output_path") is not None:
        job.output_path = str(result["output_path"])
    for stage, ms in (result.get("metrics") or {}).items():
        job.record(str(stage), float(ms))
    for child in result.get("spawn") or ():
        if not isinstance(child, Mapping):
            raise TypeError(f"a child to spawn is a dict, not {type(child).__name__}")
        job.spawn(**child)
