"""The video pipeline's tables: the ``video_job`` queue, highlights and metrics.

- ``queue.py``: :class:`VideoJobs` (enqueue, claim, heartbeat, complete, fail,
  reclaim, retry, cancel, purge, statistics, concurrency limits) and
  ``processing()``/``track()``, the lifecycle of one job in one block, nested jobs
  and ``JobHandle.spawn`` (fan-out/fan-in).
- ``writers.py``: :class:`Highlights` and :class:`Metrics`, idempotent writers and
  server-side summaries.
- ``worker.py``: :class:`Worker`, the long-running loop of ``pgaccess worker``:
  batch claims, batched completions, woken by NOTIFY.
- ``listener.py``: the Worker's LISTEN connection and the wake-up its idle threads
  wait on.
- ``queries.py``: the SQL of all of them.
"""

from .queue import Completions, Duration, JobBusy, JobHandle, JobLost, VideoJobs
from .worker import Handler, Worker
from .writers import Highlights, Metrics

__all__ = [
    "Completions",
    "Duration",
    "Handler",
    "Highlights",
    "JobBusy",
    "JobHandle",
    "JobLost",
    "Metrics",
    "VideoJobs",
    "Worker",
]
