"""Retry on transient failures, built from tenacity's strategies.

What is transient (and why):

- ``40001`` serialization_failure, ``40P01`` deadlock_detected: the server aborted the
  transaction so that another could finish; running it again is what the PostgreSQL
  manual prescribes (chapter "Transaction Isolation", "Serialization Failure Handling").
- class ``08`` connection_exception: the connection failed; a new one may not.
- ``57P01`` admin_shutdown, ``57P02`` crash_shutdown, ``57P03`` cannot_connect_now:
  the server is restarting (fast or after a crash) or still starting up.
- ``53300`` too_many_connections: the server is full for now.
- ``25006`` read_only_sql_transaction (``ReadOnlyNode``) once the pool has reconnected
  (``ConnectionPool.drain``): the connection had reached a standby after a failover;
  the write was refused, so nothing was done. ``REFUSED`` retries it for every write,
  idempotent or not.
- ``ConnectionLost`` (a connection that died with no SQLSTATE, as psycopg2 reports it),
  ``ConnectionFailed`` and ``PoolTimeout``: nothing was done, trying again is safe.
- a bare ``psycopg2.OperationalError`` raised by user code (the usage guide raises one
  to say "service not ready").

Never transient: constraint violations, syntax and undefined-object errors, data errors,
and ``CommitOutcomeUnknown``: a connection lost while a COMMIT or an autocommit write
was in flight may have applied the write, so it is only re-run where it is idempotent.

Each situation has one composed tenacity strategy: ``TRANSIENT`` (``with_retry``,
``run_in_transaction``), ``READ`` (the facade's reads) and ``WRITE`` (the idempotent
writes of ``policies``). Every wait comes from one formula, ``RetryPolicy.retrying``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, TypeVar, Union

import psycopg2
from tenacity import (
    RetryCallState,
    Retrying,
    retry_base,
    retry_if_exception,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .default import reinit_after_fork
from .errors import (
    CommitOutcomeUnknown,
    ConnectionFailed,
    ConnectionLost,
    DatabaseError,
    PoolTimeout,
    ReadOnlyNode,
)

__all__ = [
    "READ",
    "REFUSED",
    "TRANSIENT",
    "WRITE",
    "RetryPolicy",
    "RetryStats",
    "is_transient",
    "retrying",
    "with_retry",
]

logger = logging.getLogger("pgaccess.retry")

T = TypeVar("T")

TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
    }
)


def sqlstate_of(exc: BaseException) -> Optional[str]:
    """The SQLSTATE of a pgaccess or psycopg2 error, if it has one."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether running the same work again may succeed and cannot do harm twice."""
    if isinstance(exc, CommitOutcomeUnknown):
        return False
    if isinstance(exc, (PoolTimeout, ConnectionLost, ConnectionFailed)):
        return True
    if isinstance(exc, ReadOnlyNode):  # 25006: transient once the pool reconnected
        return exc.reconnected
    code = sqlstate_of(exc)
    if code is not None:
        return code in TRANSIENT_SQLSTATES or code.startswith("08")
    # psycopg2 reports connection-level failures as OperationalError without a code.
    return isinstance(exc, psycopg2.OperationalError) and not isinstance(
        exc, DatabaseError
    )


#: Work that may be run again as it is: transient failures (``with_retry``,
#: ``run_in_transaction``, whose caller chose to wait longer).
TRANSIENT: retry_base = retry_if_exception(is_transient)

#: pgaccess's own re-runs inside one call (reads): transient, but not a failure that
#: already used up the call's time. ``PoolTimeout`` and ``ConnectionFailed`` come
#: after the pool has waited (or kept reconnecting) for the caller's whole timeout;
#: retrying them inside the same call would multiply that wait (DESIGN principle 4).
READ: retry_base = TRANSIENT & retry_if_not_exception_type(
    (PoolTimeout, ConnectionFailed)
)

#: Idempotent writes inside one call: what ``READ`` retries, and outcomes that may
#: have landed (running an idempotent write again leaves the same state).
WRITE: retry_base = READ | retry_if_exception_type(CommitOutcomeUnknown)

#: Any write, idempotent or not: a failure that says the statement was refused before
#: it ran (a standby after a failover), so running it again cannot do it twice.
REFUSED: retry_base = retry_if_exception(
    lambda exc: isinstance(exc, ReadOnlyNode) and exc.reconnected
)

#: What decides a retry: a tenacity strategy, or a predicate on the exception.
RetryOn = Union[retry_base, Callable[[BaseException], bool]]


def retries(retry_on: RetryOn, exc: BaseException) -> bool:
    """Whether ``retry_on`` would retry after ``exc`` (outside a tenacity loop)."""
    if not isinstance(retry_on, retry_base):
        return bool(retry_on(exc))
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.set_exception((type(exc), exc, exc.__traceback__))
    return bool(retry_on(state))


class RetryStats:
    """Retry counts and waits, across every thread (tenacity's own are per thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _live_stats.add(self)
        self.attempts = 0
        self.retries = 0
        self.give_ups = 0
        self.time_waited = 0.0
        self.retries_by_sqlstate: Dict[str, int] = {}

    def record_attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def record_retry(self, exc: BaseException, wait: float) -> None:
        code = sqlstate_of(exc) or type(exc).__name__
        with self._lock:
            self.retries += 1
            self.time_waited += wait
            self.retries_by_sqlstate[code] = self.retries_by_sqlstate.get(code, 0) + 1

    def record_give_up(self) -> None:
        with self._lock:
            self.give_ups += 1

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "attempts": self.attempts,
                "retries": self.retries,
                "give_ups": self.give_ups,
                "time_waited": self.time_waited,
                "retries_by_sqlstate": dict(self.retries_by_sqlstate),
            }

    def _new_lock_in_child(self) -> None:
        self._lock = threading.Lock()


# Every RetryStats gets a new lock in a forked child: a thread of the parent may have
# held one at fork(), and the child has no such thread to release it.
_live_stats: weakref.WeakSet[RetryStats] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for stats in _live_stats:
        stats._new_lock_in_child()


reinit_after_fork(_new_locks_in_child)

#: Counts of every policy that is not given a RetryStats of its own.
global_stats = RetryStats()


@dataclass(frozen=True)
class RetryPolicy:
    """How to retry: attempts, exponential backoff with jitter, and what is transient.

    ``delay`` is the first wait; each next wait is ``backoff`` times longer, capped at
    ``max_delay``; ``jitter`` adds up to ``delay`` at random so that threads that
    failed together do not retry together. ``max_time`` (seconds) stops retrying
    after that long in all. ``retry_on`` decides what is retried: a predicate on the
    exception, or a tenacity strategy such as ``READ``. ``sleep`` is injectable for
    tests.
    """

    max_attempts: int = 3
    delay: float = 0.05
    backoff: float = 2.0
    max_delay: float = 2.0
    jitter: bool = True
    max_time: Optional[float] = None
    retry_on: RetryOn = is_transient
    sleep: Callable[[float], None] = time.sleep
    stats: RetryStats = field(default_factory=lambda: global_stats)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.delay < 0 or self.max_delay < 0 or self.backoff < 1:
            raise ValueError("delay and max_delay must be >= 0 and backoff >= 1")

    def retries(self, exc: BaseException) -> bool:
        """Whether this policy would retry after ``exc``."""
        return retries(self.retry_on, exc)

    def retrying(self, *, first: Optional[BaseException] = None) -> Retrying:
        """A tenacity ``Retrying`` for this policy (the one backoff formula).

        ``first``: an error already judged worth a retry; it is not judged again.
        """
        stop: Any = stop_after_attempt(self.max_attempts)
        if self.max_time is not None:
            stop = stop | stop_after_delay(self.max_time)
        wait: Any = wait_exponential(
            multiplier=self.delay, exp_base=self.backoff, min=0, max=self.max_delay
        )
        if self.jitter and self.delay > 0:
            wait = wait + wait_random(0, self.delay)
        retry_on = self.retry_on
        retry = (
            retry_on
            if isinstance(retry_on, retry_base)
            else retry_if_exception(retry_on)
        )
        if first is not None:
            retry = retry_if_exception(lambda exc: exc is first) | retry
        return Retrying(
            stop=stop,
            wait=wait,
            retry=retry,
            reraise=True,  # the caller sees the original pgaccess error, not RetryError
            sleep=self.sleep,
            before=self._before,
            before_sleep=self._before_sleep,
        )

    def _before(self, state: RetryCallState) -> None:
        self.stats.record_attempt()

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        if exc is None:
            return
        self.stats.record_retry(exc, wait)
        lines = str(exc).splitlines()
        logger.warning(
            "retrying %s in %.3f s (attempt %d of %d failed: %s: %s)",
            getattr(state.fn, "__qualname__", "the operation"), wait,
            state.attempt_number, self.max_attempts, type(exc).__name__,
            lines[0] if lines else "",
        )  # fmt: skip

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` with retries; the last error is raised."""
        try:
            return self.retrying()(fn, *args, **kwargs)
        except BaseException as exc:
            if self.retries(exc):
                self.stats.record_give_up()
            raise

    def call_after_failure(self, first_error: BaseException, fn: Callable[[], T]) -> T:
        """Retry ``fn`` whose first attempt (made outside) failed with ``first_error``.

        Keeps tenacity out of the success path of the facade: it is entered only once
        an attempt has failed. The caller has decided that ``first_error`` is worth
        a retry; tenacity sees it as its own first attempt, so the waits, the log
        and the counts are those of :meth:`call`.
        """
        pending = [first_error]

        @functools.wraps(fn)
        def attempt() -> T:
            if pending:
                raise pending.pop()
            return fn()

        try:
            return self.retrying(first=first_error)(attempt)
        except BaseException as exc:
            if exc is first_error or self.retries(exc):
                self.stats.record_give_up()
            raise


def with_retry(
    fn: Callable[..., T],
    /,
    *args: Any,
    max_attempts: int = 3,
    delay: float = 1.0,
    max_delay: float = 30.0,
    retry_on: RetryOn = is_transient,
    **kwargs: Any,
) -> T:
    """Run ``fn(*args, **kwargs)``, retrying transient failures (the usage guide's API).

    ``delay`` is the first wait in seconds, doubling after each failure (with jitter)
    up to ``max_delay``. The final failure is raised as it was, not wrapped.
    """
    policy = RetryPolicy(
        max_attempts=max_attempts, delay=delay, max_delay=max_delay, retry_on=retry_on
    )
    return policy.call(fn, *args, **kwargs)


def retrying(
    max_attempts: int = 3,
    delay: float = 0.1,
    max_delay: float = 5.0,
    *,
    policy: Optional[RetryPolicy] = None,
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form: ``@retrying(max_attempts=5, delay=0.1, max_delay=5.0)``."""
    chosen = policy or RetryPolicy(
        max_attempts=max_attempts, delay=delay, max_delay=max_delay
    )

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return chosen.call(fn, *args, **kwargs)

        return wrapper

    return decorate
