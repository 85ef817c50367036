"""Per-statement statistics across every thread, and the slow-query log.

The executor reports each statement it runs to a :class:`Recorder`: the statement's
text (its shape: values travel separately, so one shape is one entry), how long it
took, and whether it failed. ``Database(query_stats=False)`` records nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional

from .default import reinit_after_fork

__all__ = ["Recorder", "query_stats", "record"]

logger = logging.getLogger("pgaccess.stats")

#: Shapes kept at most; a program that makes shapes from data starts over when full.
MAX_SHAPES = 4096


class QueryStats:
    """Per statement shape: calls, total and max milliseconds, errors (all threads)."""

    __slots__ = ("calls", "errors", "max_ms", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0


_stats: Dict[str, QueryStats] = {}
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such
    # thread, so the copied lock would stay held for ever.
    global _lock
    _lock = threading.Lock()


reinit_after_fork(_new_lock_in_child)


def record(text: str, elapsed: float, failed: bool) -> None:
    """Count one execution of ``text`` that took ``elapsed`` seconds."""
    ms = elapsed * 1000.0
    with _lock:
        st = _stats.get(text)
        if st is None:
            if len(_stats) >= MAX_SHAPES:
                _stats.clear()
            st = _stats[text] = QueryStats()
        st.calls += 1
        st.total_ms += ms
        if ms > st.max_ms:
            st.max_ms = ms
        if failed:
            st.errors += 1


class Recorder:
    """What a facade does with each statement: count it, and log it when slow.

    ``counting=False`` skips the counts (a lock and a dict update per statement);
    ``slow_query_ms`` logs statements at least that slow at WARNING, counted or not.
    """

    __slots__ = ("counting", "slow_query_ms")

    def __init__(self, *, counting: bool, slow_query_ms: Optional[float]) -> None:
        self.counting = counting
        self.slow_query_ms = slow_query_ms

    def __call__(self, text: str, elapsed: float, failed: bool) -> None:
        if self.counting:
            record(text, elapsed, failed)
        slow = self.slow_query_ms
        if slow is not None and not failed and elapsed * 1000.0 >= slow:
            logger.warning(
                "slow query: %.1f ms: %s",
                elapsed * 1000.0,
                " ".join(text.split())[:500],
            )


def query_stats(top: Optional[int] = 20) -> List[Dict[str, Any]]:
    """The ``top`` statements by total time (all of them for None), with counts."""
    with _lock:
        items = [
            {
                "statement": " ".join(text.split()),
                "calls": st.calls,
                "total_ms": round(st.total_ms, 3),
                "mean_ms": round(st.total_ms / st.calls, 3) if st.calls else 0.0,
                "max_ms": round(st.max_ms, 3),
                "errors": st.errors,
            }
            for text, st in _stats.items()
        ]
    items.sort(key=lambda s: s["total_ms"], reverse=True)  # type: ignore[arg-type,return-value]
    return items if top is None else items[:top]
