"""The video pipeline's tables: the ``video_job`` queue, highlights and metrics.

- :class:`VideoJobs`: enqueue, claim (``FOR NO KEY UPDATE SKIP LOCKED``), heartbeat,
  complete, fail with exponential backoff, reclaim stale jobs, retry, cancel, purge,
  and queue statistics. ``with jobs.processing(worker_id) as job:`` is the lifecycle
  in one block: claimed, kept alive, completed or failed, never forgotten.
- :class:`Highlights` and :class:`Metrics`: idempotent writers and server-side
  summaries of the ``highlight`` and ``processing_metrics`` tables.
- :class:`Worker`: the long-running loop of ``pgaccess worker`` and ``pgaccess demo``:
  N threads claim jobs, run a handler, write its highlights and stage timings with the
  completion, back off when the queue is empty, and stop cleanly.

The lease: a job is held by the worker id in ``locked_by`` while its ``status`` is
``processing``. Every change a worker makes to a job it holds (heartbeat, complete,
fail, release) is a conditional update ``WHERE id = %s AND status = 'processing' AND
locked_by = %s``; when no row matches, the job was reclaimed, cancelled or finished
elsewhere and :class:`JobLost` is raised. After ``complete``, ``fail`` and ``release``
the row keeps ``locked_by`` (the last holder), so a retried call whose first attempt
landed is recognised as done rather than lost. ``reclaim_stale`` and ``retry_failed``
clear it.

Job states::

    queued --claim--> processing --complete--> completed
                      processing --fail, attempts left--> queued (run_after later)
                      processing --fail, none left--> failed --retry_failed--> queued
                      processing --reclaim_stale--> queued, or failed if none left
                      processing --release--> queued (the attempt not counted)
    queued, processing --cancel--> cancelled
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import uuid
from time import perf_counter
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from .database import Database
from .errors import DatabaseError, InvalidQuery, OperationalError
from .retry import RetryPolicy, is_transient_or_unknown

__all__ = [
    "Duration",
    "Handler",
    "Highlights",
    "JobHandle",
    "JobLost",
    "Metrics",
    "VideoJobs",
    "Worker",
]

logger = logging.getLogger("pgaccess.jobs")

T = TypeVar("T")
Row = Dict[str, Any]
#: A length of time: seconds (int or float) or a ``datetime.timedelta``.
Duration = Union[float, int, datetime.timedelta]
#: What ``Worker`` runs per job: ``handler(job_row) -> result``. The result is None
#: or a mapping with optional ``highlights`` (a list of dicts with start, end, score
#: and label), ``output_path`` and ``metrics`` (stage name -> milliseconds).
Handler = Callable[[Dict[str, Any]], Any]

_MAX_ERROR_CHARS = 4000


def _seconds(value: Duration, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidQuery(f"{what} must be seconds or a timedelta, got {value!r}")
    if not seconds >= 0:  # also rejects NaN
        raise InvalidQuery(f"{what} must be >= 0 seconds, got {value!r}")
    return float(seconds)


def _error_text(error: object) -> str:
    """Text for the ``error`` column: no NUL bytes (text cannot hold them), capped."""
    if isinstance(error, BaseException):
        message = str(error).strip()
        text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    else:
        text = str(error)
    text = text.replace("\x00", "\\x00")
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + " ..."
    return text


class JobLost(DatabaseError):
    """The worker no longer holds the job: reclaimed, cancelled or finished elsewhere.

    Raised by ``heartbeat``, ``complete``, ``fail`` and ``release`` when their
    conditional update matches no row. The worker must drop the job: whatever it
    computed was not recorded, and another worker may be processing it now.
    """

    def __init__(
        self,
        job_id: int,
        worker_id: str,
        action: str,
        status: Optional[str] = None,
        holder: Optional[str] = None,
    ) -> None:
        if status is None:
            now = "it no longer exists (purged?)"
        elif status == "processing":
            now = f"it is processing by {holder!r}"
        else:
            now = f"it is {status}"
        super().__init__(
            f"job {job_id} is no longer held by worker {worker_id!r} ({now}): it was "
            f"reclaimed, cancelled or completed elsewhere, so this {action} was not "
            "applied"
        )
        self.job_id = job_id
        self.worker_id = worker_id
        self.action = action
        self.status = status
        self.holder = holder


# ------------------------------------------------------------------ statements
_ENQUEUE = """
WITH input AS (
    SELECT * FROM unnest(
        %(hashes)s::text[], %(paths)s::text[], %(priorities)s::int[],
        %(at)s::timestamptz[], %(delays)s::float8[], %(max_attempts)s::int[]
    ) WITH ORDINALITY AS t(src_hash, input_path, priority, at, delay, max_attempts, ord)
), ins AS (
    INSERT INTO video_job (src_hash, input_path, priority, run_after, max_attempts)
    SELECT src_hash, input_path, priority,
           COALESCE(at, now() + make_interval(secs => delay), now()), max_attempts
    FROM input
    ORDER BY ord
    ON CONFLICT (src_hash) DO NOTHING
    RETURNING id, src_hash
)
SELECT input.ord, COALESCE(ins.id, v.id) AS id
FROM input
LEFT JOIN ins ON ins.src_hash = input.src_hash
LEFT JOIN video_job AS v ON v.src_hash = input.src_hash
ORDER BY input.ord
"""

# MATERIALIZED: the locking SELECT runs once, on its own, and feeds the UPDATE; inlined,
# the planner could evaluate it in a way that locks rows it then does not update.
# SKIP LOCKED: concurrent claimers pass over each other's rows instead of queueing.
# The order is that of video_job_queued_idx (priority DESC, created_at, id).
_CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT id FROM video_job
    WHERE status = 'queued' AND run_after <= now() AND attempts < max_attempts
    ORDER BY priority DESC, created_at, id
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
)
UPDATE video_job AS v
SET status = 'processing', locked_by = %(worker)s, locked_at = now(),
    heartbeat_at = now(), attempts = v.attempts + 1
FROM picked
WHERE v.id = picked.id
RETURNING v.*
"""

_HEARTBEAT = """
UPDATE video_job SET heartbeat_at = now()
WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
RETURNING id
"""

_HEARTBEAT_MANY = """
UPDATE video_job AS v SET heartbeat_at = now()
FROM unnest(%(ids)s::bigint[], %(workers)s::text[]) AS h(id, worker)
WHERE v.id = h.id AND v.status = 'processing' AND v.locked_by = h.worker
RETURNING v.id
"""

# One statement, so one transaction: the job is completed together with its highlights
# and metrics, or not at all. The inserts read ``done``, so they write nothing when the
# job is no longer held (or a retry finds it already completed).
_COMPLETE = """
WITH done AS (
    UPDATE video_job
    SET status = 'completed', output_path = %(output_path)s, error = NULL,
        finished_at = now(), heartbeat_at = now()
    WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
    RETURNING id
), hl AS (
    INSERT INTO highlight (job_id, start_time, end_time, score, label)
    SELECT done.id, h.start_time, h.end_time, h.score, h.label
    FROM done, unnest(
        %(starts)s::float8[], %(ends)s::float8[], %(scores)s::float8[],
        %(labels)s::text[]
    ) AS h(start_time, end_time, score, label)
    ON CONFLICT (job_id, start_time, end_time) DO NOTHING
    RETURNING 1
), m AS (
    INSERT INTO processing_metrics (op_id, job_id, stage, duration_ms)
    SELECT m.op_id, done.id, m.stage, m.duration_ms
    FROM done, unnest(%(op_ids)s::uuid[], %(stages)s::text[], %(durations)s::float8[])
        AS m(op_id, stage, duration_ms)
    ON CONFLICT (op_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM done) AS completed,
       (SELECT count(*) FROM hl) AS highlights,
       (SELECT count(*) FROM m) AS metrics
"""

# attempts was counted at claim time: after the first failure the wait is BACKOFF_BASE,
# then doubles, capped at BACKOFF_MAX.
_FAIL = """
UPDATE video_job
SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    error = %(error)s,
    run_after = CASE WHEN attempts < max_attempts
        THEN now() + make_interval(
            secs => least(%(max)s::float8, %(base)s::float8 * power(2, attempts - 1)))
        ELSE run_after END,
    finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END
WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
RETURNING status
"""

_RELEASE = """
UPDATE video_job
SET status = 'queued', attempts = greatest(attempts - 1, 0), run_after = now()
WHERE id = %(id)s AND status = 'processing' AND locked_by = %(worker)s
RETURNING id
"""

_RECLAIM = """
UPDATE video_job
SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    error = format('reclaimed: no heartbeat from %%s since %%s', locked_by,
                   heartbeat_at),
    locked_by = NULL,
    run_after = now(),
    finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END
WHERE status = 'processing'
  AND heartbeat_at < now() - make_interval(secs => %(older)s::float8)
RETURNING id, status
"""

_RETRY_FAILED = """
UPDATE video_job
SET status = 'queued', attempts = 0, run_after = now(), finished_at = NULL,
    locked_by = NULL
WHERE id = %(id)s AND status = 'failed'
RETURNING id
"""

_CANCEL = """
UPDATE video_job SET status = 'cancelled', finished_at = now()
WHERE id = %(id)s AND status IN ('queued', 'processing')
RETURNING id
"""

_PURGE = """
WITH gone AS (
    DELETE FROM video_job
    WHERE status IN ('completed', 'failed', 'cancelled')
      AND finished_at < now() - make_interval(secs => %(older)s::float8)
    RETURNING 1
)
SELECT count(*) AS purged FROM gone
"""

_JOB_STATE = "SELECT status, locked_by FROM video_job WHERE id = %(id)s"

_STATS = """
SELECT
    count(*) FILTER (WHERE status = 'queued') AS queued,
    count(*) FILTER (WHERE status = 'processing') AS processing,
    count(*) FILTER (WHERE status = 'completed') AS completed,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
    count(*) AS total,
    count(*) FILTER (WHERE attempts > 1) AS retried,
    extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'queued'))::float8
        AS oldest_queued_s,
    (count(*) FILTER (WHERE finished_at > now() - interval '5 minutes'))::float8 / 5
        AS finished_per_minute,
    (count(*) FILTER (WHERE status = 'completed'))::float8
        / NULLIF(count(*) FILTER (WHERE status IN ('completed', 'failed')), 0)
        AS success_rate,
    avg(extract(epoch FROM finished_at - locked_at)::float8)
        FILTER (WHERE status = 'completed') AS mean_processing_s,
    percentile_cont(0.95) WITHIN GROUP (
        ORDER BY extract(epoch FROM finished_at - locked_at)::float8)
        FILTER (WHERE status = 'completed') AS p95_processing_s
FROM video_job
WHERE %(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[])
"""

_ADD_HIGHLIGHTS = """
INSERT INTO highlight (job_id, start_time, end_time, score, label)
SELECT %(job_id)s, h.start_time, h.end_time, h.score, h.label
FROM unnest(
    %(starts)s::float8[], %(ends)s::float8[], %(scores)s::float8[], %(labels)s::text[]
) AS h(start_time, end_time, score, label)
ON CONFLICT (job_id, start_time, end_time) DO NOTHING
RETURNING id
"""

_HIGHLIGHTS_FOR_JOB = """
SELECT id, job_id, start_time, end_time, score, label, created_at
FROM highlight
WHERE job_id = %(job_id)s AND (%(min)s::float8 IS NULL OR score >= %(min)s::float8)
ORDER BY start_time, end_time
"""

_TOP_HIGHLIGHTS = """
SELECT id, job_id, start_time, end_time, score, label, created_at
FROM highlight
ORDER BY score DESC, id
LIMIT %(n)s
"""

_RECORD_METRIC = """
INSERT INTO processing_metrics (op_id, job_id, stage, duration_ms)
VALUES (%(op_id)s::uuid, %(job_id)s, %(stage)s, %(duration_ms)s)
ON CONFLICT (op_id) DO NOTHING
"""

_METRICS_SUMMARY = """
SELECT stage,
       count(*) AS count,
       avg(duration_ms) AS mean_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(duration_ms) AS max_ms
FROM processing_metrics
WHERE (%(ids)s::bigint[] IS NULL OR job_id = ANY(%(ids)s::bigint[]))
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
GROUP BY stage
ORDER BY stage
"""


# ------------------------------------------------------------------ helpers
_HighlightColumns = Tuple[List[float], List[float], List[float], List[Optional[str]]]


def _highlight_columns(highlights: Iterable[Mapping[str, Any]]) -> _HighlightColumns:
    """Split highlight dicts into the column arrays the statements unnest."""
    starts: List[float] = []
    ends: List[float] = []
    scores: List[float] = []
    labels: List[Optional[str]] = []
    for i, h in enumerate(highlights):
        if not isinstance(h, Mapping):
            raise InvalidQuery(f"highlight {i} is not a dict: {h!r}")
        try:
            start = h["start"] if "start" in h else h["start_time"]
            end = h["end"] if "end" in h else h["end_time"]
            starts.append(float(start))
            ends.append(float(end))
            scores.append(float(h["score"]))
        except KeyError as exc:
            raise InvalidQuery(
                f"highlight {i} has no {exc.args[0]!r}; a highlight needs start, end "
                "and score (label is optional)"
            ) from None
        except (TypeError, ValueError) as exc:
            raise InvalidQuery(f"highlight {i}: {exc}") from None
        label = h.get("label")
        labels.append(None if label is None else str(label))
    return starts, ends, scores, labels


def _check_id(job_id: Any) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise InvalidQuery(f"a job id is an int, got {job_id!r}")
    return job_id


# ------------------------------------------------------------------ the handle
class JobHandle:
    """A job claimed by ``VideoJobs.processing()``, for the block that processes it.

    ``job["input_path"]`` (and every other column) reads the claimed row. What the
    block adds is written in the same statement as the completion, so a job is never
    completed without it nor gets it twice:

    - ``add_highlight(start, end, score, label)`` / ``add_highlights(dicts)``;
    - ``output_path = "..."``;
    - ``record(stage, ms)`` or ``with job.timer(stage):`` for stage timings.

    ``lost`` is set (a ``threading.Event``) when the heartbeat finds the job no longer
    held: a long block may check it and give up early; its completion would raise
    ``JobLost`` anyway. Not thread-safe (but ``lost`` is): use it from the block's
    thread.
    """

    __slots__ = ("highlights", "lost", "output_path", "row", "timings", "worker_id")

    def __init__(self, row: Row, worker_id: str) -> None:
        self.row = row
        self.worker_id = worker_id
        self.highlights: List[Dict[str, Any]] = []
        self.output_path: Optional[str] = None
        # (op_id, stage, milliseconds); the op_id is fixed now so a retry reuses it.
        self.timings: List[Tuple[str, str, float]] = []
        self.lost = threading.Event()

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} held by {self.worker_id!r}>"

    def __getitem__(self, column: str) -> Any:
        return self.row[column]

    @property
    def id(self) -> int:
        """The job's id."""
        return int(self.row["id"])

    def add_highlight(
        self, start: float, end: float, score: float, label: Optional[str] = None
    ) -> None:
        """Add a highlight (``start``-``end`` seconds) to write with the completion."""
        self.highlights.append(
            {"start": start, "end": end, "score": score, "label": label}
        )

    def add_highlights(self, highlights: Iterable[Mapping[str, Any]]) -> None:
        """Add highlight dicts (start, end, score, optional label)."""
        self.highlights.extend(dict(h) for h in highlights)

    def record(self, stage: str, duration_ms: float) -> None:
        """Add a stage timing (milliseconds) to write with the completion."""
        self.timings.append((str(uuid.uuid4()), stage, float(duration_ms)))

    @contextlib.contextmanager
    def timer(self, stage: str) -> Iterator[None]:
        """Time the block as ``stage`` (recorded whether or not the block raises)."""
        t0 = perf_counter()
        try:
            yield
        finally:
            self.record(stage, (perf_counter() - t0) * 1000.0)


class _Heartbeater:
    """One daemon thread per ``VideoJobs`` that keeps every held job's heartbeat fresh.

    A single statement per interval refreshes all the jobs the process's blocks hold,
    instead of a thread and a statement per job. The thread starts with the first
    job and ends at a beat that finds none held, so an idle ``VideoJobs`` costs
    nothing after one interval, and short jobs do not start a thread each.
    """

    def __init__(self, jobs: VideoJobs) -> None:
        self._jobs = jobs
        self._cond = threading.Condition(threading.Lock())
        self._held: Dict[JobHandle, None] = {}
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()

    def add(self, handle: JobHandle) -> None:
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's thread is not ours
                self._pid, self._thread, self._held = os.getpid(), None, {}
            self._held[handle] = None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pgaccess-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, handle: JobHandle) -> None:
        with self._cond:
            self._held.pop(handle, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                # Only a beat decides to end the thread: a worker between two short
                # jobs holds none for a moment, and must not cost a thread per job.
                self._cond.wait(timeout=self._jobs.HEARTBEAT_INTERVAL)
                if not self._held:
                    self._thread = None  # under the lock: add() starts a new one
                    return
                batch = sorted(self._held, key=lambda h: h.id)
            self._beat(batch)

    def _beat(self, batch: List[JobHandle]) -> None:
        try:
            rows = self._jobs.db.execute(
                _HEARTBEAT_MANY,
                {"ids": [h.id for h in batch], "workers": [h.worker_id for h in batch]},
            )
        except DatabaseError as exc:
            # The next interval tries again; a job goes stale only after several misses.
            logger.warning("heartbeat of %d jobs failed: %s", len(batch), exc)
            return
        alive = {r["id"] for r in rows}
        with self._cond:
            for handle in batch:
                if handle.id not in alive and handle in self._held:
                    del self._held[handle]
                    handle.lost.set()
                    logger.warning(
                        "job %d is no longer held by %r (reclaimed or cancelled); "
                        "its completion will be refused",
                        handle.id,
                        handle.worker_id,
                    )


# ------------------------------------------------------------------ the queue
class VideoJobs:
    """The ``video_job`` queue: enqueue, claim, heartbeat, complete, fail, and more.

    Thread-safe: share one instance between threads, each with its own worker id.
    Writes that are safe to repeat (enqueue, heartbeat, complete, fail, release,
    reclaim, retry, cancel, purge) are retried on transient errors and on
    ``CommitOutcomeUnknown`` outside a transaction; ``claim`` is not (see there).
    The tunables are class constants; set them on an instance (or a subclass) to
    change them, as the tests and the demo do.
    """

    #: Wait before the first retry of a failed job, in seconds; doubles per attempt.
    BACKOFF_BASE: float = 10.0
    #: The longest wait between retries of a failed job, in seconds.
    BACKOFF_MAX: float = 600.0
    #: Seconds between heartbeats of the jobs held by ``processing()`` blocks. Reclaim
    #: with an ``older_than`` of several intervals, so a slow beat is not a dead worker.
    HEARTBEAT_INTERVAL: float = 10.0
    #: How the idempotent writes are retried.
    RETRY: RetryPolicy = RetryPolicy(
        max_attempts=5, delay=0.05, max_delay=1.0, retry_on=is_transient_or_unknown
    )

    def __init__(self, db: Database) -> None:
        self.db = db
        self._heartbeats = _Heartbeater(self)

    def __repr__(self) -> str:
        return f"<VideoJobs on {self.db!r}>"

    def _idempotent(self, fn: Callable[[], T]) -> T:
        # Inside a transaction the first error aborts it: a retry could only fail.
        if self.db.current_transaction() is not None:
            return fn()
        return self.RETRY.call(fn)

    # ------------------------------------------------------------- enqueue
    def enqueue(
        self,
        src_hash: str,
        input_path: Optional[str],
        *,
        priority: int = 0,
        run_after: Union[datetime.datetime, Duration, None] = None,
        max_attempts: int = 3,
    ) -> int:
        """Queue a video; return its job id. Idempotent on ``src_hash``.

        Enqueueing a ``src_hash`` that already has a job returns that job's id and
        changes nothing. ``run_after``: a datetime (use an aware one), or a delay
        from now (seconds or timedelta); None means now. One statement.
        """
        return self.enqueue_many(
            [
                {
                    "src_hash": src_hash,
                    "input_path": input_path,
                    "priority": priority,
                    "run_after": run_after,
                    "max_attempts": max_attempts,
                }
            ]
        )[0]

    def enqueue_many(self, items: Iterable[Mapping[str, Any]]) -> List[int]:
        """Queue many videos in one statement; return their ids in input order.

        Each item is a dict with ``src_hash`` and ``input_path`` and optionally
        ``priority``, ``run_after`` and ``max_attempts`` (as ``enqueue``). Items
        whose ``src_hash`` already has a job (or repeats one earlier in the batch)
        get the existing id. Raises ``InvalidQuery`` for a malformed item.
        """
        hashes: List[str] = []
        paths: List[Optional[str]] = []
        priorities: List[int] = []
        at: List[Optional[datetime.datetime]] = []
        delays: List[Optional[float]] = []
        max_attempts: List[int] = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise InvalidQuery(f"enqueue_many: item {i} is not a dict")
            src_hash = item.get("src_hash")
            if not isinstance(src_hash, str) or not src_hash:
                raise InvalidQuery(f"enqueue_many: item {i} needs a src_hash string")
            hashes.append(src_hash)
            path = item.get("input_path")
            paths.append(None if path is None else str(path))
            priority = item.get("priority")
            priorities.append(0 if priority is None else int(priority))
            attempts = item.get("max_attempts")
            attempts = 3 if attempts is None else int(attempts)
            if attempts < 1:
                raise InvalidQuery(f"enqueue_many: item {i}: max_attempts must be >= 1")
            max_attempts.append(attempts)
            when = item.get("run_after")
            if when is None or isinstance(when, datetime.datetime):
                at.append(when)
                delays.append(None)
            else:
                at.append(None)
                delays.append(_seconds(when, f"enqueue_many: item {i}: run_after"))
        if not hashes:
            return []
        params = {
            "hashes": hashes,
            "paths": paths,
            "priorities": priorities,
            "at": at,
            "delays": delays,
            "max_attempts": max_attempts,
        }
        rows = self._idempotent(lambda: self.db.execute(_ENQUEUE, params))
        ids: List[Optional[int]] = [r["id"] for r in rows]
        missing = [hashes[i] for i, job_id in enumerate(ids) if job_id is None]
        if missing:
            # A concurrent enqueue of the same video committed after this statement's
            # snapshot: the insert skipped it, the join could not see it. Now we can.
            found = {
                r["src_hash"]: r["id"]
                for r in self.db.execute(
                    "SELECT src_hash, id FROM video_job WHERE src_hash = ANY(%s)",
                    (missing,),
                )
            }
            ids = [found[hashes[i]] if j is None else j for i, j in enumerate(ids)]
        return [int(j) for j in ids if j is not None]

    # --------------------------------------------------------------- claim
    def claim(self, worker_id: str, *, limit: int = 1) -> List[Row]:
        """Claim up to ``limit`` due queued jobs, best first; return their rows.

        Highest priority first, then the oldest. The jobs become ``processing``,
        held by ``worker_id``, with ``attempts`` counted; one statement, and no job
        is ever held by two workers. Returns ``[]`` when nothing is due. Not retried:
        if the connection dies while it runs (``CommitOutcomeUnknown``), jobs it
        may have claimed stay ``processing`` until ``reclaim_stale`` returns them.
        """
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidQuery("claim: worker_id must be a non-empty string")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidQuery(f"claim: limit must be a positive int, got {limit!r}")
        rows = self.db.execute(_CLAIM, {"limit": limit, "worker": worker_id})
        # RETURNING comes in no particular order; give the caller the claim order.
        rows.sort(key=lambda r: (-r["priority"], r["created_at"], r["id"]))
        return rows

    # -------------------------------------------------- a held job's updates
    def _held_update(
        self, action: str, job_id: int, worker_id: str, run: Callable[[], List[Row]]
    ) -> Optional[Row]:
        """Run a conditional update of a held job; None when a retry finds it done.

        ``run`` returns the updated rows. No row: if the job is in the state this
        action leaves it in and still names this worker (a retried call whose first
        attempt landed, or a repeated call), it is done; otherwise ``JobLost``.
        """
        _check_id(job_id)
        rows = self._idempotent(run)
        if rows:
            return rows[0]
        state = self.db.execute(_JOB_STATE, {"id": job_id})
        status = state[0]["status"] if state else None
        holder = state[0]["locked_by"] if state else None
        done_states = {
            "complete": ("completed",),
            "fail": ("queued", "failed"),
            "release": ("queued",),
        }.get(action, ())
        if status in done_states and holder == worker_id:
            logger.debug("%s of job %d was already applied", action, job_id)
            return None
        raise JobLost(job_id, worker_id, action, status, holder)

    def heartbeat(self, job_id: int, worker_id: str) -> None:
        """Tell the queue ``worker_id`` still works on ``job_id`` (sets heartbeat_at).

        Raises ``JobLost`` when the worker no longer holds the job. ``processing()``
        does this by itself in a background thread.
        """
        self._held_update(
            "heartbeat",
            job_id,
            worker_id,
            lambda: self.db.execute(_HEARTBEAT, {"id": job_id, "worker": worker_id}),
        )

    def complete(
        self,
        job_id: int,
        worker_id: str,
        output_path: Optional[str] = None,
        *,
        highlights: Optional[Iterable[Mapping[str, Any]]] = None,
        metrics: Optional[Mapping[str, float]] = None,
    ) -> None:
        """Mark a held job completed, with its highlights and stage timings, atomically.

        ``highlights``: dicts with start, end, score and optional label (seconds);
        ``metrics``: stage name -> milliseconds. One statement: the job is completed
        with all of them or not at all (a rejected highlight leaves it
        ``processing`` and raises, e.g. ``CheckViolation``). Safe to retry: a retry
        whose first attempt landed is a no-op. Raises ``JobLost`` when the worker
        no longer holds the job.
        """
        timings = [
            (str(uuid.uuid4()), s, float(ms)) for s, ms in (metrics or {}).items()
        ]
        self._complete(job_id, worker_id, output_path, highlights or (), timings)

    def _complete(
        self,
        job_id: int,
        worker_id: str,
        output_path: Optional[str],
        highlights: Iterable[Mapping[str, Any]],
        timings: Sequence[Tuple[str, str, float]],
    ) -> None:
        starts, ends, scores, labels = _highlight_columns(highlights)
        params = {
            "id": job_id,
            "worker": worker_id,
            "output_path": output_path,
            "starts": starts,
            "ends": ends,
            "scores": scores,
            "labels": labels,
            "op_ids": [t[0] for t in timings],
            "stages": [t[1] for t in timings],
            "durations": [t[2] for t in timings],
        }

        def run() -> List[Row]:
            rows = self.db.execute(_COMPLETE, params)
            return rows if rows and rows[0]["completed"] else []

        self._held_update("complete", job_id, worker_id, run)

    def fail(self, job_id: int, worker_id: str, error: object) -> str:
        """Record a failed attempt of a held job; return its new status.

        ``"queued"`` while attempts remain, with ``run_after`` pushed out by
        ``BACKOFF_BASE * 2 ** (attempts - 1)`` seconds (at most ``BACKOFF_MAX``);
        ``"failed"`` (and ``finished_at`` set) after the last one. ``error`` (an
        exception or text) is stored in the job's ``error``. Raises ``JobLost``
        when the worker no longer holds the job.
        """
        params = {
            "id": job_id,
            "worker": worker_id,
            "error": _error_text(error),
            "base": float(self.BACKOFF_BASE),
            "max": float(self.BACKOFF_MAX),
        }
        row = self._held_update(
            "fail", job_id, worker_id, lambda: self.db.execute(_FAIL, params)
        )
        if row is None:  # a retry found it done: read what it became
            state = self.db.execute(_JOB_STATE, {"id": job_id})
            return str(state[0]["status"])
        status = str(row["status"])
        if status == "failed":
            logger.warning("job %d failed for good: %s", job_id, params["error"])
        return status

    def release(self, job_id: int, worker_id: str) -> None:
        """Give a held job back to the queue without counting the attempt.

        For a worker that stops before it could process the job (shutdown). Raises
        ``JobLost`` when the worker no longer holds the job.
        """
        self._held_update(
            "release",
            job_id,
            worker_id,
            lambda: self.db.execute(_RELEASE, {"id": job_id, "worker": worker_id}),
        )

    @contextlib.contextmanager
    def processing(self, worker_id: str) -> Iterator[Optional[JobHandle]]:
        """``with jobs.processing(worker_id) as job:`` claims one job, sees it through.

        Yields a :class:`JobHandle`, or None when no job is due (check for it).
        While the block runs, a background thread keeps the job's heartbeat fresh
        (every ``HEARTBEAT_INTERVAL`` seconds). A clean exit completes the job with
        the highlights, output path and timings added to the handle (atomically);
        an exception fails it with the exception's text and is re-raised;
        ``KeyboardInterrupt``/``SystemExit`` release it back to the queue. If the
        completion itself is refused (say a highlight violates a constraint), the
        job is failed with that error and the error is raised. ``JobLost``
        propagates when the job was taken away meanwhile.
        """
        claimed = self.claim(worker_id, limit=1)
        if not claimed:
            yield None
            return
        handle = JobHandle(claimed[0], worker_id)
        self._heartbeats.add(handle)
        try:
            yield handle
        except Exception as exc:
            self._heartbeats.discard(handle)
            self._fail_quietly(handle, exc)
            raise
        except BaseException:
            self._heartbeats.discard(handle)
            with contextlib.suppress(DatabaseError):  # reclaim_stale is the fallback
                self.release(handle.id, worker_id)
            raise
        self._heartbeats.discard(handle)
        try:
            self._complete(
                handle.id,
                worker_id,
                handle.output_path,
                handle.highlights,
                handle.timings,
            )
        except JobLost:
            raise
        except Exception as exc:
            self._fail_quietly(handle, exc, "could not complete: ")
            raise

    def _fail_quietly(
        self, handle: JobHandle, exc: BaseException, prefix: str = ""
    ) -> None:
        """Fail the job after ``exc``; never hide ``exc`` behind a new error."""
        try:
            self.fail(handle.id, handle.worker_id, prefix + _error_text(exc))
        except JobLost as lost:
            logger.warning("%s", lost)
        except DatabaseError:
            logger.warning(
                "could not record the failure of job %d; reclaim_stale will return it",
                handle.id,
                exc_info=True,
            )

    # -------------------------------------------------------- maintenance
    def reclaim_stale(self, older_than: Duration) -> int:
        """Requeue processing jobs silent for ``older_than``; return how many.

        Their worker is presumed dead: each goes back to ``queued`` (due now), or to
        ``failed`` when it has no attempts left; a late ``complete`` from the old
        worker then raises ``JobLost``. Choose ``older_than`` well above
        ``HEARTBEAT_INTERVAL``.
        """
        older = _seconds(older_than, "older_than")
        rows = self._idempotent(lambda: self.db.execute(_RECLAIM, {"older": older}))
        if rows:
            logger.warning(
                "reclaimed %d stale jobs (no heartbeat for %.0f s): %s",
                len(rows),
                older,
                ", ".join(f"{r['id']}->{r['status']}" for r in rows[:20]),
            )
        return len(rows)

    def retry_failed(self, job_id: int) -> bool:
        """Queue a ``failed`` job again with fresh attempts; False if it was not failed.

        ``attempts`` is reset to 0, so it gets ``max_attempts`` tries again; its last
        ``error`` stays until it completes.
        """
        job_id = _check_id(job_id)
        return bool(
            self._idempotent(lambda: self.db.execute(_RETRY_FAILED, {"id": job_id}))
        )

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or processing job; False if it had already finished.

        A worker holding it gets ``JobLost`` at its next heartbeat or completion.
        """
        job_id = _check_id(job_id)
        return bool(self._idempotent(lambda: self.db.execute(_CANCEL, {"id": job_id})))

    def purge(self, older_than: Duration) -> int:
        """Delete jobs finished more than ``older_than`` ago; return how many.

        Their highlights and metrics go with them (the foreign keys cascade).
        """
        older = _seconds(older_than, "older_than")
        rows = self._idempotent(lambda: self.db.execute(_PURGE, {"older": older}))
        return int(rows[0]["purged"])

    def stats(self, *, job_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """The queue's numbers, computed by the server in one query.

        Counts by status (and ``total``, ``retried``: jobs that took more than one
        attempt), ``oldest_queued_s`` (age of the oldest queued job, None if none),
        ``finished_per_minute`` (over the last 5 minutes), ``success_rate``
        (completed / (completed + failed), None before any), ``mean_processing_s``
        and ``p95_processing_s`` (finished_at - locked_at of completed jobs).
        ``job_ids`` restricts it to those jobs. Scans the table.
        """
        ids = None if job_ids is None else [int(i) for i in job_ids]
        return dict(self.db.execute(_STATS, {"ids": ids})[0])


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
        starts, ends, scores, labels = _highlight_columns(highlights)
        if not starts:
            return 0
        params = {
            "job_id": _check_id(job_id),
            "starts": starts,
            "ends": ends,
            "scores": scores,
            "labels": labels,
        }

        def run() -> int:
            return len(self.db.execute(_ADD_HIGHLIGHTS, params))

        if self.db.current_transaction() is not None:
            return run()
        return self.RETRY.call(run)

    def for_job(self, job_id: int, min_score: Optional[float] = None) -> List[Row]:
        """A job's highlights in time order, those scoring at least ``min_score``."""
        return self.db.execute(
            _HIGHLIGHTS_FOR_JOB,
            {"job_id": _check_id(job_id), "min": min_score},
        )

    def top(self, n: int = 10) -> List[Row]:
        """The ``n`` best-scoring highlights of all jobs."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidQuery(f"top: n must be an int >= 0, got {n!r}")
        return self.db.execute(_TOP_HIGHLIGHTS, {"n": n})


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
            "job_id": None if job_id is None else _check_id(job_id),
            "stage": str(stage),
            "duration_ms": float(duration_ms),
        }

        def run() -> None:
            self.db.execute(_RECORD_METRIC, params)

        if self.db.current_transaction() is not None:
            run()
        else:
            self.RETRY.call(run)

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
        rows = self.db.execute(_METRICS_SUMMARY, {"ids": ids, "since": since})
        return {
            r["stage"]: {
                k: r[k] for k in ("count", "mean_ms", "p50_ms", "p95_ms", "max_ms")
            }
            for r in rows
        }


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
            None if reclaim_after is None else _seconds(reclaim_after, "reclaim_after")
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
            logger.warning("%s: a job failed: %s", worker_id, _error_text(exc))
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
