"""The pipeline's writers: ``Highlights`` and ``Metrics``, idempotent by their keys."""

from __future__ import annotations

import contextlib
import datetime
import logging
import uuid
from time import perf_counter
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from ..database import Database
from ..errors import DatabaseError, InvalidQuery
from ..retry import RetryPolicy
from . import queries as Q
from .queue import VideoJobs, check_id, highlight_columns

__all__ = ["Highlights", "Metrics"]

logger = logging.getLogger("pgaccess.jobs.writers")

Row = Dict[str, Any]


# ------------------------------------------------------------- highlights
class Highlights:
    """The ``highlight`` table: idempotent writes, reads by job and by score.

    Thread-safe. A highlight is identified by its job and span (start, end): adding
    one that exists adds nothing.
    """

    RETRY: RetryPolicy = VideoJobs.RETRY

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, job_id: int, highlights: Iterable[Mapping[str, Any]]) -> int:
        """Add a job's highlights in one statement; return how many were new.

        Each is a dict with ``start``, ``end`` (seconds; ``start_time``/``end_time``
        also accepted), ``score`` and optional ``label``. Re-adding the same spans
        adds nothing, so it is retried on transient errors and unknown outcomes.
        Raises ``InvalidQuery`` for a malformed dict, ``CheckViolation`` for a span
        the schema rejects, ``ForeignKeyViolation`` for an unknown job.
        """
        starts, ends, scores, labels = highlight_columns(highlights)
        if not starts:
            return 0
        params = {
            "job_id": check_id(job_id),
            "starts": starts,
            "ends": ends,
            "scores": scores,
            "labels": labels,
        }

        return len(self.db.execute(Q.ADD_HIGHLIGHTS, params, retry=self.RETRY))

    def for_job(self, job_id: int, min_score: Optional[float] = None) -> List[Row]:
        """A job's highlights in time order, those scoring at least ``min_score``."""
        return self.db.execute(
            Q.HIGHLIGHTS_FOR_JOB,
            {"job_id": check_id(job_id), "min": min_score},
        )

    def top(self, n: int = 10) -> List[Row]:
        """The ``n`` best-scoring highlights of all jobs."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidQuery(f"top: n must be an int >= 0, got {n!r}")
        return self.db.execute(Q.TOP_HIGHLIGHTS, {"n": n})


# ---------------------------------------------------------------- metrics
class Metrics:
    """The ``processing_metrics`` table: stage timings and their summary.

    Thread-safe. Each record carries a UUID made before the first attempt, so a
    retry after an unknown outcome cannot record it twice.
    """

    RETRY: RetryPolicy = VideoJobs.RETRY

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self,
        job_id: Optional[int],
        stage: str,
        duration_ms: float,
        *,
        op_id: Optional[str] = None,
    ) -> None:
        """Record that ``stage`` of ``job_id`` took ``duration_ms`` milliseconds.

        ``op_id`` (a UUID string) identifies the record; one is made if not given.
        Retried on transient errors and unknown outcomes.
        """
        params = {
            "op_id": op_id or str(uuid.uuid4()),
            "job_id": None if job_id is None else check_id(job_id),
            "stage": str(stage),
            "duration_ms": float(duration_ms),
        }

        self.db.execute(Q.RECORD_METRIC, params, retry=self.RETRY)

    @contextlib.contextmanager
    def timer(self, job_id: Optional[int], stage: str) -> Iterator[None]:
        """Time the block and record it as ``stage`` of ``job_id``.

        Recorded whether or not the block raises; if the block raised, a failure to
        record is logged rather than raised over the block's exception.
        """
        t0 = perf_counter()
        try:
            yield
        except BaseException:
            try:
                self.record(job_id, stage, (perf_counter() - t0) * 1000.0)
            except DatabaseError:
                logger.warning("could not record %s of job %s", stage, job_id)
            raise
        self.record(job_id, stage, (perf_counter() - t0) * 1000.0)

    def summary(
        self,
        *,
        job_ids: Optional[Sequence[int]] = None,
        since: Optional[datetime.datetime] = None,
    ) -> Dict[str, Dict[str, float]]:
        """Per stage: count, mean_ms, p50_ms, p95_ms, max_ms, computed by the server.

        ``job_ids`` and ``since`` (recorded at or after) restrict what is counted.
        """
        ids = None if job_ids is None else [int(i) for i in job_ids]
        rows = self.db.execute(Q.METRICS_SUMMARY, {"ids": ids, "since": since})
        return {
            r["stage"]: {
                k: r[k] for k in ("count", "mean_ms", "p50_ms", "p95_ms", "max_ms")
            }
            for r in rows
        }
