"""The video pipeline's tables: the ``video_job`` queue, highlights and metrics.

- ``queue.py``: :class:`VideoJobs` (enqueue, claim, heartbeat, complete, fail,
  reclaim, retry, cancel, purge, statistics) and ``processing()``, the lifecycle of
  one job in one block.
- ``writers.py``: :class:`Highlights` and :class:`Metrics`, idempotent writers and
  server-side summaries.
- ``worker.py``: :class:`Worker`, the long-running loop of ``pgaccess worker``:
  batch claims, batched completions, woken by NOTIFY.
- ``listener.py``: the Worker's LISTEN connection and the wake-up its idle threads
  wait on.
- ``queries.py``: the SQL of all of them.
"""

from .queue import Completions, Duration, JobHandle, JobLost, VideoJobs
from .worker import Handler, Worker
from .writers import Highlights, Metrics

__all__ = [
    "Completions",
    "Duration",
    "Handler",
    "Highlights",
    "JobHandle",
    "JobLost",
    "Metrics",
    "VideoJobs",
    "Worker",
]
