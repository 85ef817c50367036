"""The ``video_job`` queue: ``VideoJobs``, a claimed job's handle, its heartbeat.

- :class:`VideoJobs`: enqueue, claim (``FOR NO KEY UPDATE SKIP LOCKED``), heartbeat,
  complete, fail with exponential backoff, reclaim stale jobs, retry, cancel, purge,
  and queue statistics. ``with jobs.processing(worker_id) as job:`` is the lifecycle
  in one block: claimed, kept alive, completed or failed, never forgotten; on a deep
  queue its claims are batched per worker id (see ``processing``).
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
    failed --cancel(failed=True)--> cancelled
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import socket
import threading
import weakref
from time import perf_counter
from typing import (
    Any,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from ..database import Database
from ..default import reinit_after_fork
from ..errors import DatabaseError, DataError, IntegrityError, InvalidQuery
from ..retry import WRITE, RetryPolicy
from . import queries as Q

__all__ = ["Completions", "Duration", "JobBusy", "JobHandle", "JobLost", "VideoJobs"]

logger = logging.getLogger("pgaccess.jobs.queue")

Row = Dict[str, Any]
#: A length of time: seconds (int or float) or a ``datetime.timedelta``.
Duration = Union[float, int, datetime.timedelta]

_MAX_ERROR_CHARS = 4000


def seconds(value: Duration, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidQuery(f"{what} must be seconds or a timedelta, got {value!r}")
    if not seconds >= 0:  # also rejects NaN
        raise InvalidQuery(f"{what} must be >= 0 seconds, got {value!r}")
    return float(seconds)


def error_text(error: object) -> str:
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


class JobBusy(DatabaseError):
    """``track()`` found the job of its ``src_hash`` processing or waiting elsewhere.

    A tracked block takes over a queued or finished job of the same ``src_hash`` (a
    re-run), never one that runs now. ``status`` and ``holder`` say what it is.
    """

    def __init__(self, src_hash: str, status: Optional[str], holder: Optional[str]):
        super().__init__(
            f"the job of src_hash {src_hash!r} is {status} (held by {holder!r}): "
            "track() takes over only a queued or finished job"
        )
        self.src_hash = src_hash
        self.status = status
        self.holder = holder


class Completions(NamedTuple):
    """What ``VideoJobs.complete_many`` did: the ids completed, the ``JobLost`` of the
    jobs no longer held, and (id, error) of the jobs whose completion was refused
    (they were failed instead)."""

    completed: List[int]
    lost: List[JobLost]
    refused: List[Tuple[int, DatabaseError]]


# ------------------------------------------------------------------ helpers
HighlightColumns = Tuple[List[float], List[float], List[float], List[Optional[str]]]


def highlight_columns(highlights: Iterable[Mapping[str, Any]]) -> HighlightColumns:
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


class EnqueueItem(NamedTuple):
    """One job to enqueue or spawn, checked: ``run_after`` split into a time (``at``)
    or a delay in seconds."""

    src_hash: str
    input_path: Optional[str]
    priority: int
    max_attempts: int
    concurrency_key: Optional[str]
    at: Optional[datetime.datetime]
    delay: Optional[float]


def enqueue_item(item: Any, what: str) -> EnqueueItem:
    """Check a job to enqueue (a dict with src_hash, input_path and the options of
    ``enqueue``); raises ``InvalidQuery`` naming ``what``."""
    if not isinstance(item, Mapping):
        raise InvalidQuery(f"{what} is not a dict")
    src_hash = item.get("src_hash")
    if not isinstance(src_hash, str) or not src_hash:
        raise InvalidQuery(f"{what} needs a src_hash string")
    path = item.get("input_path")
    priority = item.get("priority")
    attempts = item.get("max_attempts")
    attempts = 3 if attempts is None else int(attempts)
    if attempts < 1:
        raise InvalidQuery(f"{what}: max_attempts must be >= 1")
    key = item.get("concurrency_key")
    if key is not None and (not isinstance(key, str) or not key):
        raise InvalidQuery(
            f"{what}: concurrency_key must be a non-empty string or None, got {key!r}"
        )
    when = item.get("run_after")
    at = when if when is None or isinstance(when, datetime.datetime) else None
    delay = None
    if when is not None and at is None:
        delay = seconds(when, f"{what}: run_after")
    return EnqueueItem(
        src_hash,
        None if path is None else str(path),
        0 if priority is None else int(priority),
        attempts,
        key,
        at,
        delay,
    )


def default_worker_id() -> str:
    """``host:pid/thread``: the worker id of a ``track()`` block not given one."""
    return f"{socket.gethostname()}:{os.getpid()}/{threading.get_ident()}"


def check_id(job_id: Any) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise InvalidQuery(f"a job id is an int, got {job_id!r}")
    return job_id


# ------------------------------------------------------------------ the handle
class JobHandle:
    """A job claimed by ``VideoJobs.processing()``, for the block that processes it.

    ``job["input_path"]`` reads the claimed row: the columns of
    ``queries.CLAIMED_COLUMNS`` (id, src_hash, input_path, priority, attempts,
    max_attempts, created_at, and error: the last attempt's, if any). What the
    block adds is written in the same statement as the completion, so a job is never
    completed without it nor gets it twice:

    - ``add_highlight(start, end, score, label)`` / ``add_highlights(dicts)``;
    - ``output_path = "..."``;
    - ``record(stage, ms)`` or ``with job.timer(stage):`` for stage timings.

    ``lost`` is set (a ``threading.Event``) when the heartbeat finds the job no longer
    held: a long block may check it and give up early; its completion would raise
    ``JobLost`` anyway. Not thread-safe (but ``lost`` and ``spawn`` are): use it from
    the block's thread.

    Jobs in jobs: ``parent_id``, ``job_number`` (``"17.2"``), ``spawn(...)`` (a child
    in the queue, released with the block's end) and ``children_done``.
    """

    __slots__ = (
        "_jobs",
        "_lock",
        "_open",
        "highlights",
        "lost",
        "output_path",
        "row",
        "spawned",
        "then_complete",
        "timings",
        "worker_id",
    )

    def __init__(
        self, row: Row, worker_id: str, jobs: Optional[VideoJobs] = None
    ) -> None:
        self.row = row
        self.worker_id = worker_id
        self._jobs = jobs
        # The children this block spawned (ids, in order), released with its end;
        # the tracked children open under it; both None until the first (most jobs
        # have none). The lock guards them: other threads spawn and open children.
        self.spawned: Optional[List[int]] = None
        self.then_complete = False
        self._open: Optional[Dict[JobHandle, None]] = None
        self._lock = threading.Lock()
        self.highlights: List[Dict[str, Any]] = []
        self.output_path: Optional[str] = None
        # (op_id, stage, milliseconds); op_id None: the server makes one. A retried
        # completion cannot write them twice: they go in only with the job's change
        # to completed.
        self.timings: List[Tuple[Optional[str], str, float]] = []
        self.lost = threading.Event()

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} held by {self.worker_id!r}>"

    def __getitem__(self, column: str) -> Any:
        return self.row[column]

    @property
    def id(self) -> int:
        """The job's id."""
        return int(self.row["id"])

    @property
    def parent_id(self) -> Optional[int]:
        """The id of the job this one is a child of, or None for a root job."""
        parent = self.row.get("parent_id")
        return None if parent is None else int(parent)

    @property
    def job_number(self) -> str:
        """``"17"`` for a root job (its id), ``"17.2.1"`` for a child's child."""
        number = self.row.get("job_number")
        return str(self.id) if number is None else str(number)

    @property
    def children_done(self) -> bool:
        """True when the job was queued again because its spawned children all
        finished (see ``VideoJobs.children`` for how each ended)."""
        return bool(self.row.get("children_done"))

    def spawn(
        self,
        src_hash: str,
        input_path: Optional[str],
        *,
        priority: int = 0,
        run_after: Union[datetime.datetime, Duration, None] = None,
        max_attempts: int = 3,
        concurrency_key: Optional[str] = None,
        then: Optional[str] = None,
    ) -> int:
        """Create a child job in the queue; return its id. One statement.

        The child is numbered under this job (``"17.3"``) and stays invisible to
        workers until this block ends cleanly: then, atomically with the block's end,
        the children are queued and this job becomes ``waiting`` (not completed);
        when the last child finishes (completed, failed for good or cancelled) this
        job is queued again, and its handler sees ``children_done``. A block that
        fails spawns nothing (its children are queued by the run that succeeds, or
        cancelled when it fails for good). Idempotent on ``src_hash``: a re-run
        spawning the same children gets their ids and creates none. The options are
        ``enqueue``'s. ``then="complete"``: when every child completed, the last
        child's completion completes this job too, in the same statement (a job
        that is itself a child, or whose children did not all complete, is queued
        again instead). Thread-safe. Raises ``JobLost`` when the job is no longer
        held, ``InvalidQuery`` for bad options.
        """
        if then not in (None, "complete"):
            raise InvalidQuery(f'spawn: then must be None or "complete", not {then!r}')
        if self._jobs is None:
            raise InvalidQuery("spawn: this handle does not belong to a VideoJobs")
        child = self._jobs._spawn(
            self,
            {
                "src_hash": src_hash,
                "input_path": input_path,
                "priority": priority,
                "run_after": run_after,
                "max_attempts": max_attempts,
                "concurrency_key": concurrency_key,
            },
        )
        with self._lock:
            if self.spawned is None:
                self.spawned = []
            if child not in self.spawned:
                self.spawned.append(child)
            if then == "complete":
                self.then_complete = True
        return child

    def _adopt(self, child: JobHandle) -> None:
        with self._lock:
            if self._open is None:
                self._open = {}
            self._open[child] = None

    def _disown(self, child: JobHandle) -> None:
        with self._lock:
            if self._open is not None:
                self._open.pop(child, None)

    def _orphans(self) -> List[JobHandle]:
        """The tracked children still open, taken off the handle."""
        if self._open is None:
            return []
        with self._lock:
            open_ = list(self._open or ())
            self._open = None
        return open_

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
        self.timings.append((None, stage, float(duration_ms)))

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
        self._forget()
        _heartbeaters.add(self)

    def _forget(self) -> None:
        """Start afresh: at creation, and in a forked child, where the parent's
        thread does not run and its lock may have been copied held."""
        self._cond = threading.Condition(threading.Lock())
        self._held: Dict[JobHandle, None] = {}
        self._thread: Optional[threading.Thread] = None

    def add(self, handle: JobHandle) -> None:
        self.add_many((handle,))

    def add_many(self, handles: Iterable[JobHandle]) -> None:
        with self._cond:
            for handle in handles:
                self._held[handle] = None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pgaccess-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, handle: JobHandle) -> None:
        with self._cond:
            self._held.pop(handle, None)

    def discard_many(self, handles: Iterable[JobHandle]) -> None:
        with self._cond:
            for handle in handles:
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
                Q.HEARTBEAT_MANY,
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


_heartbeaters: weakref.WeakSet[_Heartbeater] = weakref.WeakSet()


class _Buffer:
    """The jobs one worker id claimed ahead for its next ``processing()`` calls.

    ``lock`` is held by whoever takes from, fills or empties ``handles``: a
    ``processing()`` call (for its take, and for the claim when the buffer is
    empty), the expiry timer and ``release_prefetched``; never across a block.
    """

    __slots__ = ("dead", "deadline", "handles", "last", "limit", "lock", "mean")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handles: Deque[JobHandle] = collections.deque()
        self.deadline = 0.0  # perf_counter time by which the buffered jobs go back
        self.limit = 1  # the next claim's size
        self.mean = 0.0  # running mean of seconds from one take to the next
        self.last: Optional[float] = None  # when the last take yielded a job
        # Set (under lock) when the buffer left the registry: a caller that fetched
        # it just before must fetch again, or its jobs would be out of the timer's
        # sight.
        self.dead = False


class _Prefetcher:
    """The per-worker-id buffers of ``VideoJobs.processing()``, and their timer.

    A deep queue is claimed in batches, one job per ``processing()`` call taken from
    the buffer; a job left in a buffer longer than ``PREFETCH_HOLD`` is given back by
    a daemon thread, which starts with the first buffered job and ends when none is
    left (an idle ``VideoJobs`` runs no thread for it).
    """

    #: Above this many worker ids, the empty buffers are dropped (worker ids made
    #: per call would otherwise keep one each for ever).
    KEEP = 64

    def __init__(self, jobs: VideoJobs) -> None:
        self._jobs = jobs
        self._forget()
        _prefetchers.add(self)

    def _forget(self) -> None:
        """Start afresh: at creation, and in a forked child, whose parent holds the
        buffered jobs (the child must not yield them) and whose locks may have been
        copied held."""
        self._cond = threading.Condition(threading.Lock())
        self._buffers: Dict[str, _Buffer] = {}
        self._thread: Optional[threading.Thread] = None

    def _locked(self, worker_id: str) -> _Buffer:
        """The buffer of ``worker_id``, its lock held by the caller."""
        while True:
            with self._cond:
                buf = self._buffers.get(worker_id)
                if buf is None:
                    if len(self._buffers) >= self.KEEP:
                        self._drop_empty()
                    buf = self._buffers[worker_id] = _Buffer()
            # Not under the registry's lock: a claim of one worker id must not hold
            # up the others.
            buf.lock.acquire()
            if not buf.dead:
                return buf
            buf.lock.release()

    def _drop_empty(self) -> None:
        """Drop the empty buffers no one is using (under the registry's lock)."""
        for worker_id, buf in list(self._buffers.items()):
            if buf.lock.acquire(blocking=False):
                try:
                    if not buf.handles:
                        buf.dead = True
                        del self._buffers[worker_id]
                finally:
                    buf.lock.release()

    def take(self, worker_id: str) -> Optional[JobHandle]:
        """The next job for a ``processing()`` block of ``worker_id``, held and
        heartbeated; None when none is due. Claims a batch when the buffer is empty.
        """
        jobs = self._jobs
        buf = self._locked(worker_id)
        try:
            now = perf_counter()
            if buf.last is not None:
                # From one take to the next: the block and whatever the caller does
                # between blocks, so the buffer is sized by how fast it is emptied.
                cycle = now - buf.last
                buf.mean = cycle if buf.mean == 0.0 else 0.8 * buf.mean + 0.2 * cycle
            while buf.handles:
                handle = buf.handles.popleft()
                if handle.lost.is_set():  # reclaimed or cancelled while it waited
                    continue
                buf.last = now
                return handle
            # The Worker's rule: twice as many after a full batch, what came after a
            # short one; and no more than this worker id starts within half of
            # PREFETCH_HOLD, so a job waits in the buffer well under that.
            limit = max(1, min(buf.limit, jobs.PREFETCH_MAX))
            if buf.mean > 0.0:
                fits = int(jobs.PREFETCH_HOLD / 2 / buf.mean)
                limit = max(1, min(limit, fits))
            rows = jobs.claim(worker_id, limit=limit)
            if not rows:
                buf.limit, buf.last = 1, None
                return None
            got = len(rows)
            buf.limit = min(limit * 2, jobs.PREFETCH_MAX) if got >= limit else got
            handles = [JobHandle(row, worker_id, jobs) for row in rows]
            # All of them, the block's job too: the block's exit stops its heartbeat.
            jobs.hold(handles)
            buf.last = now
            if got > 1:
                buf.handles.extend(handles[1:])
                buf.deadline = perf_counter() + jobs.PREFETCH_HOLD
                self._wake()
            return handles[0]
        finally:
            buf.lock.release()

    def release(self, worker_id: Optional[str] = None) -> int:
        """Give the buffered jobs of ``worker_id`` (or of every worker id) back to
        the queue now; return how many went back."""
        with self._cond:
            if worker_id is None:
                buffers = list(self._buffers.values())
            else:
                found = self._buffers.get(worker_id)
                buffers = [] if found is None else [found]
        released = 0
        for buf in buffers:
            with buf.lock:
                released += self._give_back(buf)
        return released

    def _give_back(self, buf: _Buffer) -> int:
        """Release the jobs of ``buf`` (its lock held); how many went back. Under
        the lock, so a ``processing()`` call of the same worker id that claims next
        can find them queued again."""
        handles = list(buf.handles)
        buf.handles.clear()
        # They were not needed in time: claim ahead again only once a full batch
        # shows a deep queue again.
        buf.limit = 1
        if not handles:
            return 0
        try:
            return len(self._jobs.release_many(handles))
        except DatabaseError as exc:
            logger.warning(
                "could not give %d prefetched jobs back; reclaim_stale will: %s",
                len(handles),
                exc,
            )
            return 0

    def _wake(self) -> None:
        """A buffer was filled: have the timer thread see its deadline."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pgaccess-prefetch", daemon=True
                )
                self._thread.start()
            else:
                self._cond.notify()

    def _run(self) -> None:
        try:
            while self._expire():
                pass
        except Exception:  # a bug: let the next filled buffer start a new thread
            logger.exception("the prefetch timer broke off")
            with self._cond:
                self._thread = None

    def _expire(self) -> bool:
        """Wait for the first deadline and give back the jobs past theirs; False
        (and the thread forgotten) when no buffer holds a job."""
        with self._cond:
            # Read without the buffers' locks: a buffer filled after this look
            # wakes the thread (_wake), or starts a new one once it is forgotten.
            waiting = [b for b in self._buffers.values() if b.handles]
            if not waiting:
                self._thread = None  # under the lock: _wake starts a new one
                return False
            now = perf_counter()
            due = [b for b in waiting if b.deadline <= now]
            if not due:
                self._cond.wait(timeout=min(b.deadline for b in waiting) - now)
                return True
        busy = False
        for buf in due:
            # A processing() call holding the lock is taking from this buffer (its
            # jobs are in sight) or claiming into an empty one: look again shortly
            # rather than wait for its statement.
            if not buf.lock.acquire(blocking=False):
                busy = True
                continue
            try:
                if buf.handles and buf.deadline <= perf_counter():
                    n = self._give_back(buf)
                    logger.debug("gave %d unused prefetched jobs back", n)
            finally:
                buf.lock.release()
        if busy:
            with self._cond:
                self._cond.wait(timeout=0.01)
        return True


_prefetchers: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()


def _forget_in_child() -> None:
    for heartbeater in list(_heartbeaters):
        heartbeater._forget()
    for prefetcher in list(_prefetchers):
        prefetcher._forget()


reinit_after_fork(_forget_in_child)


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
        max_attempts=5, delay=0.05, max_delay=1.0, retry_on=WRITE
    )
    #: The most jobs ``processing()`` claims in one statement for a worker id; 1
    #: claims one job per block.
    PREFETCH_MAX: int = 16
    #: The longest a job claimed ahead by ``processing()`` waits for a block, in
    #: seconds; then it goes back to the queue, its attempt not counted.
    PREFETCH_HOLD: float = 1.0
    #: How often ``claim`` looks again whether any concurrency limit is set (seconds).
    #: Until it has seen one, it claims with the plain statement, which leaves the
    #: jobs of limited keys alone: a limit set elsewhere holds at once, and their jobs
    #: wait at most this long.
    LIMITS_RECHECK: float = 1.0

    def __init__(self, db: Database) -> None:
        self.db = db
        self._heartbeats = _Heartbeater(self)
        self._prefetch = _Prefetcher(self)
        # The blocks open on each thread (processing() and track()), innermost last:
        # a track() opened inside one is its child.
        self._local = threading.local()
        self._limited = False
        self._limited_until = 0.0  # perf_counter time of the next look

    def __repr__(self) -> str:
        return f"<VideoJobs on {self.db!r}>"

    def _write(self, query: str, params: Row) -> List[Row]:
        """Run one of the queue's idempotent writes, retried by ``RETRY``."""
        return self.db.execute(query, params, retry=self.RETRY)

    # ------------------------------------------------------------- enqueue
    def enqueue(
        self,
        src_hash: str,
        input_path: Optional[str],
        *,
        priority: int = 0,
        run_after: Union[datetime.datetime, Duration, None] = None,
        max_attempts: int = 3,
        concurrency_key: Optional[str] = None,
    ) -> int:
        """Queue a video; return its job id. Idempotent on ``src_hash``.

        Enqueueing a ``src_hash`` that already has a job returns that job's id and
        changes nothing. ``run_after``: a datetime (use an aware one), or a delay
        from now (seconds or timedelta); None means now. ``concurrency_key``: at
        most ``set_concurrency(key, n)`` jobs with that key are processing at once
        (no limit set: unlimited). One statement.
        """
        return self.enqueue_many(
            [
                {
                    "src_hash": src_hash,
                    "input_path": input_path,
                    "priority": priority,
                    "run_after": run_after,
                    "max_attempts": max_attempts,
                    "concurrency_key": concurrency_key,
                }
            ]
        )[0]

    def enqueue_many(self, items: Iterable[Mapping[str, Any]]) -> List[int]:
        """Queue many videos in one statement; return their ids in input order.

        Each item is a dict with ``src_hash`` and ``input_path`` and optionally
        ``priority``, ``run_after``, ``max_attempts`` and ``concurrency_key`` (as
        ``enqueue``). Items
        whose ``src_hash`` already has a job (or repeats one earlier in the batch)
        get the existing id. Raises ``InvalidQuery`` for a malformed item.
        """
        hashes: List[str] = []
        paths: List[Optional[str]] = []
        priorities: List[int] = []
        at: List[Optional[datetime.datetime]] = []
        delays: List[Optional[float]] = []
        max_attempts: List[int] = []
        keys: List[Optional[str]] = []
        for i, item in enumerate(items):
            job = enqueue_item(item, f"enqueue_many: item {i}")
            hashes.append(job.src_hash)
            paths.append(job.input_path)
            priorities.append(job.priority)
            max_attempts.append(job.max_attempts)
            keys.append(job.concurrency_key)
            at.append(job.at)
            delays.append(job.delay)
        if not hashes:
            return []
        params = {
            "hashes": hashes,
            "paths": paths,
            "priorities": priorities,
            "at": at,
            "delays": delays,
            "max_attempts": max_attempts,
            "keys": keys,
        }
        rows = self._write(Q.ENQUEUE, params)
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
        is ever held by two workers, nor more jobs of a concurrency key processing
        than its limit (a full key's jobs are skipped, others taken). Returns ``[]``
        when nothing is due. A row has the columns of ``queries.CLAIMED_COLUMNS``
        (and ``children_done``), not every column of the table.
        Not retried: if the connection dies while it runs (``CommitOutcomeUnknown``),
        jobs it may have claimed stay ``processing`` until ``reclaim_stale`` returns
        them.
        """
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidQuery("claim: worker_id must be a non-empty string")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidQuery(f"claim: limit must be a positive int, got {limit!r}")
        query = Q.CLAIM_LIMITED if self._limits_set() else Q.CLAIM
        return self.db.execute(query, {"limit": limit, "worker": worker_id})

    def _limits_set(self) -> bool:
        """Whether any concurrency limit is set, looked up at most every
        ``LIMITS_RECHECK`` seconds (a race between threads costs one extra look)."""
        now = perf_counter()
        if now >= self._limited_until:
            rows = self.db.execute(Q.LIMITS_EXIST)
            self._limited = bool(rows[0]["limited"])
            self._limited_until = now + self.LIMITS_RECHECK
        return self._limited

    # -------------------------------------------------- a held job's updates
    def _held_update(
        self,
        action: str,
        job_id: int,
        worker_id: str,
        query: str,
        params: Row,
        child_query: Optional[str] = None,
    ) -> Optional[Row]:
        """Run a conditional update of a held job; None when a retry finds it done.

        ``query`` returns the updated rows (for the completion, a row with
        ``completed`` = 1). No row: ``child_query`` (the statement for a child job,
        which ``query`` leaves alone) if given; then, if the job is in the state this
        action leaves it in and still names this worker (a retried call whose first
        attempt landed, or a repeated call), it is done; otherwise ``JobLost``.
        """
        check_id(job_id)
        rows = self._write(query, params)
        if not (rows and rows[0].get("completed", 1)) and child_query is not None:
            rows = self._write(child_query, params)
        if rows and rows[0].get("completed", 1):
            return rows[0]
        state = self.db.execute(Q.JOB_STATE, {"id": job_id})
        status = state[0]["status"] if state else None
        holder = state[0]["locked_by"] if state else None
        done_states = {
            "complete": ("completed", "waiting"),
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
            Q.HEARTBEAT,
            {"id": job_id, "worker": worker_id},
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
        timings = [(None, s, float(ms)) for s, ms in (metrics or {}).items()]
        self._complete(job_id, worker_id, output_path, highlights or (), timings)

    def _complete(
        self,
        job_id: int,
        worker_id: str,
        output_path: Optional[str],
        highlights: Iterable[Mapping[str, Any]],
        timings: Sequence[Tuple[Optional[str], str, float]],
        spawned: Optional[Sequence[int]] = None,
        then_complete: bool = False,
        child: Optional[bool] = None,
    ) -> None:
        """``child``: whether the job has a parent (None: not known)."""
        starts, ends, scores, labels = highlight_columns(highlights)
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
        if spawned:
            params["children"] = list(spawned)
            params["then_complete"] = then_complete
            self._held_update("complete", job_id, worker_id, Q.COMPLETE_PARENT, params)
        elif child:
            self._held_update("complete", job_id, worker_id, Q.COMPLETE_CHILD, params)
        else:
            self._held_update(
                "complete", job_id, worker_id, Q.COMPLETE, params, Q.COMPLETE_CHILD
            )

    def _finish(self, handle: JobHandle) -> None:
        """A block's clean end: its open tracked children failed, then the job
        completed (or, having spawned children, released them and waiting)."""
        self._fail_orphans(handle, "parent ended first")
        self._heartbeats.discard(handle)
        with handle._lock:
            spawned = list(handle.spawned or ())
        self._complete(
            handle.id,
            handle.worker_id,
            handle.output_path,
            handle.highlights,
            handle.timings,
            spawned,
            handle.then_complete,
            handle.parent_id is not None,
        )

    def _fail_orphans(self, handle: JobHandle, error: str) -> None:
        """Fail the tracked children still open under ``handle`` with ``error``;
        their blocks get ``JobLost`` at their end. Logged, never raised: the
        parent's own end must go on."""
        orphans = handle._orphans()
        if not orphans:
            return
        for child in orphans:
            self._heartbeats.discard(child)
        try:
            failed = self._write(
                Q.FAIL_ORPHANS,
                {"ids": [c.id for c in orphans], "parent": handle.id, "error": error},
            )
        except DatabaseError:
            logger.warning(
                "could not fail the open children of job %d", handle.id, exc_info=True
            )
            return
        gone = {r["id"] for r in failed}
        for child in orphans:
            if child.id in gone:
                child.lost.set()
                logger.warning("job %d failed: %s (job %d)", child.id, error, handle.id)

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
            "error": error_text(error),
            "base": float(self.BACKOFF_BASE),
            "max": float(self.BACKOFF_MAX),
        }
        row = self._held_update("fail", job_id, worker_id, Q.FAIL, params, Q.FAIL_CHILD)
        if row is None:  # a retry found it done: read what it became
            state = self.db.execute(Q.JOB_STATE, {"id": job_id})
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
            Q.RELEASE,
            {"id": job_id, "worker": worker_id},
        )

    @contextlib.contextmanager
    def processing(self, worker_id: str) -> Iterator[Optional[JobHandle]]:
        """``with jobs.processing(worker_id) as job:`` takes one job, sees it through.

        Yields a :class:`JobHandle`, or None when no job is due (check for it).
        While the block runs, a background thread keeps the job's heartbeat fresh
        (every ``HEARTBEAT_INTERVAL`` seconds). A clean exit completes the job with
        the highlights, output path and timings added to the handle (atomically, and
        durably before the block's exit returns); an exception fails it with the
        exception's text and is re-raised; ``KeyboardInterrupt``/``SystemExit``
        release it back to the queue, with the jobs claimed ahead for this worker
        id. If the completion itself is refused (say a highlight violates a
        constraint), the job is failed with that error and the error is raised.
        ``JobLost`` propagates when the job was taken away meanwhile.

        Claims ahead: on a deep queue, the job comes from a batch claimed in one
        statement for this worker id (1 job, then twice as many after each full
        batch, up to ``PREFETCH_MAX``; what came after a short batch; no more than
        this worker id's blocks start within half of ``PREFETCH_HOLD``). The rest
        wait for the next calls, held (heartbeated) by ``worker_id``; one that waits
        longer than ``PREFETCH_HOLD`` seconds goes back to the queue, its attempt
        not counted, from a background thread; one reclaimed or cancelled meanwhile
        is skipped. A short queue is claimed one job at a time, so no job waits here
        while another worker idles. ``release_prefetched()`` gives them back at
        once: call it before closing the ``Database`` (or they wait for
        ``reclaim_stale``).

        Thread-safe: threads with different worker ids (the usual way) claim
        independently; threads sharing a worker id share its batch, each job
        yielded once.

        A ``track()`` opened inside the block makes a child of this job; a job
        that called ``job.spawn(...)`` ends ``waiting`` for its children instead of
        completed (see ``JobHandle.spawn``).
        """
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidQuery("processing: worker_id must be a non-empty string")
        handle = self._prefetch.take(worker_id)
        if handle is None:
            yield None
            return
        stack = self.open_blocks()
        stack.append(handle)
        try:
            yield handle
        except Exception as exc:
            self._heartbeats.discard(handle)
            self.fail_quietly(handle, exc)
            raise
        except BaseException:
            # The process is going away: nothing of this worker id's should wait
            # for reclaim_stale. The jobs claimed ahead go first, under their lock.
            self._heartbeats.discard(handle)
            with contextlib.suppress(DatabaseError):  # reclaim_stale is the fallback
                self._fail_orphans(handle, "parent interrupted")
                self._prefetch.release(worker_id)
                self.release_many([handle])
            raise
        finally:
            stack.remove(handle)
        try:
            self._finish(handle)
        except JobLost:
            raise
        except Exception as exc:
            self.fail_quietly(handle, exc, "could not complete: ")
            raise

    # ------------------------------------------------------ jobs in jobs
    def open_blocks(self) -> List[JobHandle]:
        """The jobs whose blocks are open on this thread, innermost last: a
        ``track()`` opened now is a child of the last. ``processing()`` and
        ``track()`` push and pop their own; ``Worker`` pushes a job while its
        handler runs. For the package: not a public API."""
        stack: Optional[List[JobHandle]] = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextlib.contextmanager
    def track(
        self,
        src_hash: str,
        input_path: Optional[str] = None,
        *,
        worker_id: Optional[str] = None,
        parent: Optional[JobHandle] = None,
    ) -> Iterator[JobHandle]:
        """``with jobs.track(src_hash) as job:`` records work not taken from the queue.

        Creates the job row already ``processing``, held by ``worker_id`` (default
        ``host:pid/thread``; a child: its parent's), and keeps its heartbeat fresh;
        a clean exit completes it with what the handle holds (as ``processing()``
        does), an exception fails it with the error text (no retry: a tracked job
        has one attempt) and is re-raised. Yields a :class:`JobHandle`.

        Nesting: opened inside another ``track()`` or ``processing()`` block of the
        same thread, or given ``parent=`` (a handle from another thread), the job is
        that job's child: ``parent_id`` set, ``job_number`` the parent's plus
        ``".n"``, children numbered in creation order without gaps (the index comes
        from the parent's row, under its lock). A parent whose block ends while a
        tracked child is still open fails that child (``"parent ended first"``;
        the child's block then raises ``JobLost``).

        Re-running a ``src_hash`` takes its job over (queued or finished: one attempt
        more, same id and number); a job processing or waiting elsewhere raises
        :class:`JobBusy`. ``KeyboardInterrupt`` fails the job too (a tracked job is
        not the queue's to give back).
        """
        if not isinstance(src_hash, str) or not src_hash:
            raise InvalidQuery("track: src_hash must be a non-empty string")
        if worker_id is not None and (not isinstance(worker_id, str) or not worker_id):
            raise InvalidQuery("track: worker_id must be a non-empty string or None")
        stack = self.open_blocks()
        if parent is None and stack:
            parent = stack[-1]
        worker = worker_id or (
            parent.worker_id if parent is not None else default_worker_id()
        )
        params = {
            "src_hash": src_hash,
            "input_path": None if input_path is None else str(input_path),
            "parent": None if parent is None else parent.id,
            "worker": worker,
        }
        rows = self._write(Q.TRACK, params)
        if not rows:
            found = self.db.execute(
                "SELECT status, locked_by FROM video_job WHERE src_hash = %s",
                (src_hash,),
            )
            state = found[0] if found else {}
            raise JobBusy(src_hash, state.get("status"), state.get("locked_by"))
        handle = JobHandle(rows[0], worker, self)
        if parent is not None:
            parent._adopt(handle)
        self._heartbeats.add(handle)
        stack.append(handle)
        try:
            yield handle
        except BaseException as exc:
            self._heartbeats.discard(handle)
            self.fail_quietly(handle, exc)
            raise
        finally:
            stack.remove(handle)
            if parent is not None:
                parent._disown(handle)
        try:
            self._finish(handle)
        except JobLost:
            raise
        except Exception as exc:
            self.fail_quietly(handle, exc, "could not complete: ")
            raise

    def _spawn(self, parent: JobHandle, item: Mapping[str, Any]) -> int:
        """``JobHandle.spawn``: the child row, waiting for the parent's end."""
        job = enqueue_item(item, "spawn")
        src_hash = job.src_hash
        params = {
            "parent": parent.id,
            "worker": parent.worker_id,
            "src_hash": src_hash,
            "input_path": job.input_path,
            "priority": job.priority,
            "at": job.at,
            "delay": job.delay,
            "max_attempts": job.max_attempts,
            "key": job.concurrency_key,
        }
        row = self._write(Q.SPAWN, params)[0]
        if not row["held"]:
            state = self.db.execute(Q.JOB_STATE, {"id": parent.id})
            raise JobLost(
                parent.id,
                parent.worker_id,
                "spawn",
                state[0]["status"] if state else None,
                state[0]["locked_by"] if state else None,
            )
        if row["id"] is None:  # a concurrent spawn of the same src_hash won
            found = self.db.execute(
                "SELECT id FROM video_job WHERE src_hash = %s", (src_hash,)
            )
            return int(found[0]["id"])
        return int(row["id"])

    def children(self, job_id: int) -> List[Row]:
        """The children of a job, in number order: id, src_hash, job_number, status,
        error, output_path, attempts, created_at, finished_at. One query."""
        job_id = check_id(job_id)
        return self.db.execute(Q.CHILDREN, {"id": job_id})

    def set_concurrency(self, key: str, limit: Optional[int]) -> None:
        """At most ``limit`` jobs with ``concurrency_key=key`` processing at once.

        Stored in the database, so every worker, on every host, obeys it from its
        next claim; 0 pauses the key, None removes the limit. Jobs already
        processing are not stopped: a lowered limit holds once enough of them end.
        """
        if not isinstance(key, str) or not key:
            raise InvalidQuery("set_concurrency: key must be a non-empty string")
        if limit is None:
            self._write(Q.DROP_CONCURRENCY, {"key": key})
            return
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidQuery(
                f"set_concurrency: limit must be an int >= 0 or None, got {limit!r}"
            )
        self._write(Q.SET_CONCURRENCY, {"key": key, "max": limit})
        self._limited, self._limited_until = True, perf_counter() + self.LIMITS_RECHECK

    def concurrency_limits(self) -> Dict[str, Dict[str, int]]:
        """Each limited key: ``{"max_running": n, "processing": m}``."""
        return {
            r["concurrency_key"]: {
                "max_running": int(r["max_running"]),
                "processing": int(r["processing"]),
            }
            for r in self.db.execute(Q.CONCURRENCY_LIMITS)
        }

    def release_prefetched(self, worker_id: Optional[str] = None) -> int:
        """Give the jobs ``processing()`` claimed ahead for ``worker_id`` (None: for
        every worker id) back to the queue now, attempts not counted; return how
        many went back. Blocks while a ``processing()`` call of that worker id
        claims. Raises nothing for the database: a job that could not be given back
        is logged and left to ``reclaim_stale``."""
        return self._prefetch.release(worker_id)

    def fail_quietly(
        self, handle: JobHandle, exc: BaseException, prefix: str = ""
    ) -> None:
        """Fail the job after ``exc``; never hide ``exc`` behind a new error. Its
        tracked children still open fail first; a job failed for good cancels the
        children it spawned (never released)."""
        self._fail_orphans(handle, f"parent failed: {error_text(exc)}")
        try:
            status = self.fail(handle.id, handle.worker_id, prefix + error_text(exc))
            with handle._lock:
                spawned = list(handle.spawned or ())
            if spawned and status == "failed":
                self._write(Q.CANCEL_UNRELEASED, {"ids": spawned, "parent": handle.id})
        except JobLost as lost:
            logger.warning("%s", lost)
        except DatabaseError:
            logger.warning(
                "could not record the failure of job %d; reclaim_stale will return it",
                handle.id,
                exc_info=True,
            )

    # ----------------------------------------------- batches (for Worker)
    def hold(self, handles: Iterable[JobHandle]) -> None:
        """Keep the heartbeat of claimed jobs fresh until they are completed, failed,
        released or ``unhold``: a job claimed in a batch is held before it starts."""
        self._heartbeats.add_many(handles)

    def unhold(self, handles: Iterable[JobHandle]) -> None:
        """Stop the heartbeat of these jobs (``reclaim_stale`` will return them)."""
        self._heartbeats.discard_many(handles)

    def complete_many(self, handles: Sequence[JobHandle]) -> Completions:
        """Complete held jobs of one worker, each with what its handle holds; one
        statement for all of them.

        Each job is completed with its highlights, output path and timings or not at
        all, as ``complete`` does it; the statement is retried by ``RETRY`` (a retry
        whose first attempt landed finds the jobs completed by this worker: done).
        A job no longer held comes back in ``lost`` (its ``JobLost``); the others are
        unaffected. When the server refuses the statement for what a job carries
        (a highlight violating a constraint: ``IntegrityError``/``DataError``), each
        job is completed on its own, so only the bad one fails: it is failed with
        ``"could not complete: ..."`` and comes back in ``refused``. Their heartbeat
        stops either way. Raises ``DatabaseError`` when the statement could not be
        run (the database unreachable after the retries): the jobs stay
        ``processing`` until ``reclaim_stale`` returns them.
        """
        if not handles:
            return Completions([], [], [])
        worker_id = handles[0].worker_id
        if any(h.worker_id != worker_id for h in handles):
            raise InvalidQuery("complete_many: the jobs of one worker at a time")
        for h in handles:
            if h._open:  # a Worker's handler left a tracked child open
                self._fail_orphans(h, "parent ended first")
        if any(h.spawned for h in handles):
            # A job that spawned children ends with their release, in a statement of
            # its own (COMPLETE_PARENT); the others share one.
            parents = [h for h in handles if h.spawned]
            rest = self.complete_many([h for h in handles if not h.spawned])
            try:
                each = self._complete_each(parents, list(rest.refused))
            finally:
                self._heartbeats.discard_many(parents)
            return Completions(
                rest.completed + each.completed, rest.lost + each.lost, each.refused
            )
        refused: List[Tuple[int, DatabaseError]] = []
        ids: List[int] = []
        paths: List[Optional[str]] = []
        hl_jobs: List[int] = []
        starts: List[float] = []
        ends: List[float] = []
        scores: List[float] = []
        labels: List[Optional[str]] = []
        m_jobs: List[int] = []
        stages: List[str] = []
        durations: List[float] = []
        ready: List[JobHandle] = []
        try:
            for h in handles:
                job_id = h.id
                if h.highlights:
                    try:
                        cols = highlight_columns(h.highlights)
                    except InvalidQuery as exc:
                        self.fail_quietly(h, exc, "could not complete: ")
                        refused.append((job_id, exc))
                        continue
                    hl_jobs.extend([job_id] * len(cols[0]))
                    starts.extend(cols[0])
                    ends.extend(cols[1])
                    scores.extend(cols[2])
                    labels.extend(cols[3])
                for _, stage, ms in h.timings:
                    m_jobs.append(job_id)
                    stages.append(stage)
                    durations.append(ms)
                ids.append(job_id)
                paths.append(h.output_path)
                ready.append(h)
            if not ready:
                return Completions([], [], refused)
            params = {
                "worker": worker_id,
                "ids": ids,
                "output_paths": paths,
                "hl_jobs": hl_jobs,
                "starts": starts,
                "ends": ends,
                "scores": scores,
                "labels": labels,
                "m_jobs": m_jobs,
                "stages": stages,
                "durations": durations,
            }
            # The plain statement when no job has a parent (it leaves a child alone);
            # a batch with children also does their parents' fan-in.
            children = any(h.row.get("parent_id") is not None for h in ready)
            query = Q.COMPLETE_MANY_CHILD if children else Q.COMPLETE_MANY
            try:
                rows = self._write(query, params)
                if len(rows) < len(ready) and not children:
                    # A child the rows did not tell of (a handle made by hand), or a
                    # job no longer held: the children's statement completes the one.
                    rows += self._write(Q.COMPLETE_MANY_CHILD, params)
            except (IntegrityError, DataError):
                # A constraint refused what some job carries: single it out.
                if len(ready) > 1:
                    logger.info(
                        "a batch of %d completions was refused; completing them "
                        "one by one",
                        len(ready),
                    )
                return self._complete_each(ready, refused)
            done = [r["id"] for r in rows]
            lost: List[JobLost] = []
            if len(done) < len(ready):
                done_set = set(done)
                missing = [h.id for h in ready if h.id not in done_set]
                states = self.db.execute(Q.JOB_STATES, {"ids": missing})
                by_id = {r["id"]: r for r in states}
                for job_id in missing:
                    state = by_id.get(job_id)
                    status = state["status"] if state else None
                    holder = state["locked_by"] if state else None
                    if status == "completed" and holder == worker_id:
                        logger.debug("complete of job %d was already applied", job_id)
                        done.append(job_id)
                    else:
                        lost.append(
                            JobLost(job_id, worker_id, "complete", status, holder)
                        )
            return Completions(done, lost, refused)
        finally:
            self._heartbeats.discard_many(handles)

    def _complete_each(
        self, handles: Sequence[JobHandle], refused: List[Tuple[int, DatabaseError]]
    ) -> Completions:
        done: List[int] = []
        lost: List[JobLost] = []
        for h in handles:
            try:
                self._complete(
                    h.id,
                    h.worker_id,
                    h.output_path,
                    h.highlights,
                    h.timings,
                    h.spawned,
                    h.then_complete,
                    h.parent_id is not None,
                )
            except JobLost as exc:
                lost.append(exc)
            except (IntegrityError, DataError) as exc:
                self.fail_quietly(h, exc, "could not complete: ")
                refused.append((h.id, exc))
            else:
                done.append(h.id)
        return Completions(done, lost, refused)

    def release_many(self, handles: Sequence[JobHandle]) -> List[int]:
        """Give held jobs of one worker back to the queue, attempts not counted; one
        statement. Returns the ids released: a job no longer held is left alone."""
        if not handles:
            return []
        self._heartbeats.discard_many(handles)
        worker_id = handles[0].worker_id
        rows = self._write(
            Q.RELEASE_MANY, {"ids": [h.id for h in handles], "worker": worker_id}
        )
        return [r["id"] for r in rows]

    # -------------------------------------------------------- maintenance
    def reclaim_stale(self, older_than: Duration) -> int:
        """Requeue processing jobs silent for ``older_than``; return how many.

        Their worker is presumed dead: each goes back to ``queued`` (due now), or to
        ``failed`` when it has no attempts left; a late ``complete`` from the old
        worker then raises ``JobLost``. Choose ``older_than`` well above
        ``HEARTBEAT_INTERVAL``.
        """
        older = seconds(older_than, "older_than")
        rows = self._write(Q.RECLAIM, {"older": older})
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
        job_id = check_id(job_id)
        return bool(self._write(Q.RETRY_FAILED, {"id": job_id}))

    def cancel(self, job_id: int, *, failed: bool = False) -> bool:
        """Cancel a queued, processing or waiting job; False if it had already
        finished.

        A worker holding it gets ``JobLost`` at its next heartbeat or completion.
        ``failed=True`` also cancels a ``failed`` job: given up, not to be retried.
        Its queued and waiting descendants are cancelled with it (processing ones
        run to their end); a waiting parent counts it as a finished child (one that
        failed for good was counted already).
        """
        job_id = check_id(job_id)
        return bool(self._write(Q.CANCEL, {"id": job_id, "failed": bool(failed)}))

    def purge(self, older_than: Duration) -> int:
        """Delete jobs finished more than ``older_than`` ago; return how many.

        Their highlights and metrics go with them (the foreign keys cascade).
        """
        older = seconds(older_than, "older_than")
        rows = self._write(Q.PURGE, {"older": older})
        return int(rows[0]["purged"])

    def stats(self, *, job_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """The queue's numbers, computed by the server in one query.

        Counts by status (``waiting``: parents waiting for their children, and
        spawned children waiting for their parent's block to end; and ``total``,
        ``retried``: jobs that took more than one attempt), ``oldest_queued_s`` (age
        of the oldest queued job, None if none), ``finished_per_minute`` (over the
        last 5 minutes), ``success_rate`` (completed / (completed + failed), None
        before any), ``mean_processing_s`` and ``p95_processing_s`` (finished_at -
        locked_at of completed jobs). ``job_ids`` restricts it to those jobs. Scans
        the table.
        """
        ids = None if job_ids is None else [int(i) for i in job_ids]
        return dict(self.db.execute(Q.STATS, {"ids": ids})[0])
