"""``Worker``: threads that claim jobs, run a handler on each, record the outcome."""

from __future__ import annotations

import logging
import os
import socket
import threading
from time import perf_counter
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..database import Database
from ..errors import DatabaseError, OperationalError
from .queue import Duration, JobHandle, JobLost, VideoJobs, error_text, seconds

__all__ = ["Handler", "Worker"]

logger = logging.getLogger("pgaccess.jobs.worker")

#: What ``Worker`` runs per job: ``handler(job_row) -> result``. The result is None
#: or a mapping with optional ``highlights`` (a list of dicts with start, end, score
#: and label), ``output_path`` and ``metrics`` (stage name -> milliseconds).
Handler = Callable[[Dict[str, Any]], Any]


# ----------------------------------------------------------------- worker
class Worker:
    """Threads that claim jobs, run ``handler`` on each, and record the outcome.

    ``handler(job_row) -> result`` runs inside ``VideoJobs.processing()``: its result
    (None, or a mapping with ``highlights``, ``output_path`` and ``metrics``) is
    written with the completion, with the worker's own ``claim`` and ``handler``
    stage timings; an exception fails the job (retried later with backoff). When
    the queue is empty a thread waits, ``idle_min`` doubling up to ``idle_max``.

    ``run()`` blocks until ``stop()`` (or the given event); ``start()``/``stop()``/
    ``join()`` run it in the background. On stop, each thread finishes the job in
    hand and claims no more. Thread ids are ``"{worker_id}-{n}"``. The threads are
    daemons: a process that exits without stopping them leaves their jobs
    ``processing`` until ``reclaim_stale`` (run every ``RECLAIM_INTERVAL`` when
    ``reclaim_after`` is given) returns them.
    """

    IDLE_MIN: float = 0.05
    IDLE_MAX: float = 2.0
    RECLAIM_INTERVAL: float = 30.0

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
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.db = db
        self.handler = handler
        self.threads = threads
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.jobs = jobs if jobs is not None else VideoJobs(db)
        self.record_metrics = record_metrics
        self.idle_min = self.IDLE_MIN if idle_min is None else idle_min
        self.idle_max = self.IDLE_MAX if idle_max is None else idle_max
        self.reclaim_after = (
            None if reclaim_after is None else seconds(reclaim_after, "reclaim_after")
        )
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = dict.fromkeys(
            ("claimed", "completed", "failed", "lost", "errors"), 0
        )

    def __repr__(self) -> str:
        return f"<Worker {self.worker_id!r} threads={self.threads}>"

    # ----------------------------------------------------------- control
    def start(self) -> None:
        """Start the threads and return. Raises RuntimeError if already started."""
        if self._threads:
            raise RuntimeError(f"{self!r} was already started")
        for n in range(1, self.threads + 1):
            thread = threading.Thread(
                target=self._loop,
                args=(f"{self.worker_id}-{n}",),
                name=f"pgaccess-worker-{n}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        logger.info("worker %s started with %d threads", self.worker_id, self.threads)

    def stop(self) -> None:
        """Ask the threads to stop after the job in hand; does not wait (see join)."""
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the threads to end; True if they all did within ``timeout``."""
        deadline = None if timeout is None else perf_counter() + timeout
        for thread in self._threads:
            left = None if deadline is None else max(deadline - perf_counter(), 0.0)
            thread.join(left)
        return not self.alive

    @property
    def alive(self) -> bool:
        """Whether any thread is still running."""
        return any(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stop.is_set()

    def run(self, stop_event: Optional[threading.Event] = None) -> None:
        """Start, block until ``stop_event`` is set (or ``stop()``), then stop and join.

        Wakes twice a second, so signal handlers of the main thread run promptly.
        """
        self.start()
        next_reclaim = perf_counter()
        try:
            while not self._stop.is_set() and not (
                stop_event is not None and stop_event.is_set()
            ):
                if self.reclaim_after is not None and perf_counter() >= next_reclaim:
                    next_reclaim = perf_counter() + self.RECLAIM_INTERVAL
                    try:
                        self.jobs.reclaim_stale(self.reclaim_after)
                    except DatabaseError as exc:
                        logger.warning("reclaim_stale failed: %s", exc)
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
        """This worker's counts: claimed, completed, failed, lost, errors."""
        with self._lock:
            return dict(self._counts)

    # ------------------------------------------------------------ threads
    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def _loop(self, worker_id: str) -> None:
        delay = self.idle_min
        while not self._stop.is_set():
            if self._one(worker_id):
                delay = self.idle_min
                continue
            # Nothing due, or the database is unwell: wait longer each time.
            self._stop.wait(delay)
            delay = min(delay * 2, self.idle_max)

    def _one(self, worker_id: str) -> bool:
        """Process one job; False when there was none or the database failed."""
        phase = "claim"
        t0 = perf_counter()
        try:
            with self.jobs.processing(worker_id) as job:
                if job is None:
                    return False
                self._count("claimed")
                phase = "handler"
                t1 = perf_counter()
                result = self.handler(dict(job.row))
                if self.record_metrics:
                    job.record("claim", (t1 - t0) * 1000.0)
                    job.record("handler", (perf_counter() - t1) * 1000.0)
                _apply_result(job, result)
            self._count("completed")
            return True
        except JobLost as exc:
            self._count("lost")
            logger.warning("%s", exc)
            return True
        except Exception as exc:
            if phase == "claim":
                self._count("errors")
                logger.warning("%s could not claim a job: %s", worker_id, exc)
                return False
            # processing() has failed the job (or left it to reclaim_stale).
            self._count("failed")
            logger.warning("%s: a job failed: %s", worker_id, error_text(exc))
            return not isinstance(exc, OperationalError)


def _apply_result(job: JobHandle, result: Any) -> None:
    """Put a handler's result on the handle, to be written with the completion."""
    if result is None:
        return
    if not isinstance(result, Mapping):
        raise TypeError(
            "a handler returns None or a dict with highlights, output_path and "
            f"metrics, not {type(result).__name__}"
        )
    unknown = set(result) - {"highlights", "output_path", "metrics"}
    if unknown:
        raise TypeError(f"a handler's result has unknown keys: {sorted(unknown)}")
    job.add_highlights(result.get("highlights") or ())
    if result.get("output_path") is not None:
        job.output_path = str(result["output_path"])
    for stage, ms in (result.get("metrics") or {}).items():
        job.record(str(stage), float(ms))
