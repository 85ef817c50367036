"""Helpers of the worker and processing() tests: a VideoJobs that records what it
claims, statement counts from the facade's statistics, and a bounded wait."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Tuple

from pgaccess import Database
from pgaccess.jobs import VideoJobs

COMPLETE_MANY_MARK = "AS c(id, output_path)"  # only COMPLETE_MANY says this
COMPLETE_ONE_MARK = "output_path = %(output_path)s"  # only COMPLETE says this
CLAIM_MARK = "WITH picked AS MATERIALIZED"


def enqueue_n(jobs: VideoJobs, n: int, prefix: str = "v") -> List[int]:
    return jobs.enqueue_many(
        [{"src_hash": f"{prefix}{i}", "input_path": f"/in/{i}.mp4"} for i in range(n)]
    )


class RecordingJobs(VideoJobs):
    """VideoJobs that remembers each claim's limit and how many jobs it returned."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.claims: List[Tuple[int, int]] = []
        self._claims_lock = threading.Lock()

    def claim(self, worker_id: str, *, limit: int = 1) -> List[Dict[str, Any]]:
        rows = super().claim(worker_id, limit=limit)
        with self._claims_lock:
            self.claims.append((limit, len(rows)))
        return rows

    def batch_sizes(self) -> List[int]:
        with self._claims_lock:
            return [got for _, got in self.claims if got]


def statement_calls(db: Database, contains: str) -> int:
    rows = db.stats(top=None)["queries"]
    return sum(r["calls"] for r in rows if contains in r["statement"])


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
