"""Counting helpers of the retry tests: a thread-safe call counter, and what the
process-wide retry statistics counted since a snapshot."""

from __future__ import annotations

import threading
from typing import Any, Dict

from pgaccess.retry import global_stats


class Counter:
    """A thread-safe count of calls, per key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Dict[Any, int] = {}

    def bump(self, key: Any = None) -> int:
        with self._lock:
            n = self.counts[key] = self.counts.get(key, 0) + 1
            return n

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def stats_delta(before: Dict[str, Any]) -> Dict[str, Any]:
    """What ``global_stats`` (``db.stats()["retries"]``) counted since ``before``."""
    after = global_stats.snapshot()
    by_code = {
        code: n - before["retries_by_sqlstate"].get(code, 0)
        for code, n in after["retries_by_sqlstate"].items()
        if n != before["retries_by_sqlstate"].get(code, 0)
    }
    return {
        "attempts": after["attempts"] - before["attempts"],
        "retries": after["retries"] - before["retries"],
        "give_ups": after["give_ups"] - before["give_ups"],
        "time_waited": after["time_waited"] - before["time_waited"],
        "retries_by_sqlstate": by_code,
    }
