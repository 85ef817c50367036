"""Per-statement statistics across every thread, and the slow-query log.

The executor reports each statement it runs to a :class:`Recorder`: the statement's
text (its shape: values travel separately, so one shape is one entry), how long it
took, and whether it failed. ``Database(query_stats=False)`` records nothing.

Each shape also counts its durations in ``DURATION_BUCKETS`` and each failure its
SQLSTATE, under the same lock and dict update: what ``pgaccess.metrics`` exports as
histograms and error counters costs the statement one bisect more.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .default import reinit_after_fork

__all__ = [
    "DURATION_BUCKETS",
    "STAGE_BUCKETS",
    "Histograms",
    "Recorder",
    "errors_by_sqlstate",
    "histograms",
    "query_stats",
    "record",
]

logger = logging.getLogger("pgaccess.stats")

#: Shapes kept at most; a program that makes shapes from data starts over when full.
MAX_SHAPES = 4096

#: Upper bounds (seconds) of the statement duration histogram; one more bucket above.
DURATION_BUCKETS: Tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Upper bounds (seconds) of a job stage's duration histogram (``Histograms``).
STAGE_BUCKETS: Tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
)

#: The label of a failure that carries no SQLSTATE (a lost connection, a bad parameter).
NO_SQLSTATE = "none"


class QueryStats:
    """Per statement shape: calls, total and max milliseconds, errors, and the calls
    per duration bucket (all threads)."""

    __slots__ = ("buckets", "calls", "errors", "max_ms", "total_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)


_stats: Dict[str, QueryStats] = {}
_errors: Dict[str, int] = {}  # SQLSTATE -> failed statements
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
    bucket = bisect.bisect_left(DURATION_BUCKETS, elapsed)
    code = _failure_sqlstate() if failed else None
    with _lock:
        st = _stats.get(text)
        if st is None:
            if len(_stats) >= MAX_SHAPES:
                _stats.clear()
            st = _stats[text] = QueryStats()
        st.calls += 1
        st.total_ms += ms
        st.buckets[bucket] += 1
        if ms > st.max_ms:
            st.max_ms = ms
        if code is not None:
            st.errors += 1
            _errors[code] = _errors.get(code, 0) + 1


def _failure_sqlstate() -> str:
    # The executor reports a failure from inside its ``except`` block, before it
    # translates the driver's error: the exception being handled is that error.
    exc = sys.exc_info()[1]
    code = getattr(exc, "pgcode", None)
    return code if isinstance(code, str) and code else NO_SQLSTATE


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


def histograms() -> List[Tuple[str, Sequence[int], float]]:
    """Per statement shape: its text, its calls per ``DURATION_BUCKETS`` bucket (the
    last one above them all, not cumulative) and its total seconds."""
    with _lock:
        return [
            (text, list(st.buckets), st.total_ms / 1000.0)
            for text, st in _stats.items()
        ]


def errors_by_sqlstate() -> Dict[str, int]:
    """Failed statements by SQLSTATE since the process started (``"none"``: a
    failure without one, such as a lost connection)."""
    with _lock:
        return dict(_errors)


class Histograms:
    """Durations (seconds) by name, counted in buckets: a Worker's stage timings.

    Thread-safe; ``observe_many`` takes the lock once for a whole batch.
    """

    def __init__(self, bounds: Sequence[float] = STAGE_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._counts: Dict[str, List[int]] = {}
        self._sums: Dict[str, float] = {}

    def observe_many(self, items: Sequence[Tuple[str, float]]) -> None:
        """Count each (name, seconds)."""
        if not items:
            return
        placed = [(n, s, bisect.bisect_left(self.bounds, s)) for n, s in items]
        with self._lock:
            for name, secs, bucket in placed:
                counts = self._counts.get(name)
                if counts is None:
                    counts = self._counts[name] = [0] * (len(self.bounds) + 1)
                    self._sums[name] = 0.0
                counts[bucket] += 1
                self._sums[name] += secs

    def snapshot(self) -> List[Tuple[str, Sequence[int], float]]:
        """Per name: its counts per bucket (not cumulative) and its total seconds."""
        with self._lock:
            return [(n, list(c), self._sums[n]) for n, c in self._counts.items()]
