"""Retry on transient failures, built from tenacity's strategies.

What is transient (and why):

- ``40001`` serialization_failure, ``40P01`` deadlock_detected: the server aborted the
  transaction so that another could finish; running it again is what the PostgreSQL
  manual prescribes (chapter "Transaction Isolation", "Serialization Failure Handling").
- class ``08`` connection_exception: the connection failed; a new one may not.
- ``57P01`` admin_shutdown, ``57P02`` crash_shutdown, ``57P03`` cannot_connect_now:
  the server is restarting (fast or after a crash) or still starting up.
- ``53300`` too_many_connections: the server is full for now.
- ``ConnectionLost`` (a connection that died with no SQLSTATE, as psycopg2 reports it),
  ``ConnectionFailed`` and ``PoolTimeout``: nothing was done, trying again is safe.
- a bare ``psycopg2.OperationalError`` raised by user code (the usage guide raises one
  to say "service not ready").

Never transient: constraint violations, syntax and undefined-object errors, data errors,
and ``CommitOutcomeUnknown``: a connection lost while a COMMIT or an autocommit write
was in flight may have applied the write, so it is only re-run where it is idempotent.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

import psycopg2
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .errors import (
    CommitOutcomeUnknown,
    ConnectionFailed,
    ConnectionLost,
    DatabaseError,
    PoolTimeout,
)

__all__ = [
    "TABLE_POLICIES",
    "RetryPolicy",
    "RetryStats",
    "TablePolicy",
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
    code = sqlstate_of(exc)
    if code is not None:
        return code in TRANSIENT_SQLSTATES or code.startswith("08")
    # psycopg2 reports connection-level failures as OperationalError without a code.
    return isinstance(exc, psycopg2.OperationalError) and not isinstance(
        exc, DatabaseError
    )


class RetryStats:
    """Retry counts and waits, across every thread (tenacity's own are per thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
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


#: Counts of every policy that is not given a RetryStats of its own.
global_stats = RetryStats()


@dataclass(frozen=True)
class RetryPolicy:
    """How to retry: attempts, exponential backoff with jitter, and what is transient.

    ``delay`` is the first wait; each next wait is ``backoff`` times longer, capped at
    ``max_delay``; ``jitter`` adds up to ``delay`` at random so that threads that
    failed together do not retry together. ``max_time`` (seconds) stops retrying
    after that long in all. ``sleep`` is injectable for tests.
    """

    max_attempts: int = 3
    delay: float = 0.05
    backoff: float = 2.0
    max_delay: float = 2.0
    jitter: bool = True
    max_time: Optional[float] = None
    retry_on: Callable[[BaseException], bool] = is_transient
    sleep: Callable[[float], None] = time.sleep
    stats: RetryStats = field(default_factory=lambda: global_stats)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.delay < 0 or self.max_delay < 0 or self.backoff < 1:
            raise ValueError("delay and max_delay must be >= 0 and backoff >= 1")

    def _wait(self, done: int = 0) -> Any:
        """Waits after each failure; ``done`` attempts were made before tenacity's 1st.

        tenacity numbers the attempts it makes from 1, so a loop entered after
        ``done`` failures starts its backoff ``backoff ** done`` further on (as a
        larger multiplier) to keep the sequence delay, delay*backoff, ... unbroken.
        """
        wait: Any = wait_exponential(
            multiplier=self.delay * self.backoff**done,
            exp_base=self.backoff,
            min=0,
            max=self.max_delay,
        )
        if self.jitter and self.delay > 0:
            wait = wait + wait_random(0, self.delay)
        return wait

    def first_wait(self) -> float:
        """The wait after a first failed attempt (``delay``, plus jitter)."""
        wait = min(self.delay, self.max_delay)
        if self.jitter and self.delay > 0:
            wait += random.uniform(0, self.delay)
        return wait

    def retrying(self, *, attempts: Optional[int] = None, done: int = 0) -> Retrying:
        """A tenacity ``Retrying`` for this policy.

        ``attempts`` overrides the number of attempts it makes; ``done`` says how many
        were made (and failed) before it, for the waits and the log's numbering.
        """
        stop: Any = stop_after_attempt(attempts or self.max_attempts)
        if self.max_time is not None:
            stop = stop | stop_after_delay(self.max_time)
        return Retrying(
            stop=stop,
            wait=self._wait(done),
            retry=retry_if_exception(self.retry_on),
            reraise=True,  # the caller sees the original pgaccess error, not RetryError
            sleep=self.sleep,
            before=self._before,
            before_sleep=functools.partial(self._before_sleep, done),
            retry_error_callback=None,
        )

    def _before(self, state: RetryCallState) -> None:
        self.stats.record_attempt()

    def _before_sleep(self, done: int, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        if exc is not None:
            self._retry(state.fn, exc, done + state.attempt_number, wait)

    def _retry(self, fn: Any, exc: BaseException, attempt: int, wait: float) -> None:
        """Count and log a retry: ``attempt`` failed with ``exc``; next in ``wait``."""
        self.stats.record_retry(exc, wait)
        lines = str(exc).splitlines()
        logger.warning(
            "retrying %s in %.3f s (attempt %d of %d failed: %s: %s)",
            getattr(fn, "__qualname__", "the operation"), wait, attempt,
            self.max_attempts, type(exc).__name__, lines[0] if lines else "",
        )  # fmt: skip

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` with retries; the last error is raised."""
        try:
            return self.retrying()(fn, *args, **kwargs)
        except BaseException as exc:
            if self.retry_on(exc):
                self.stats.record_give_up()
            raise

    def call_after_failure(self, first_error: BaseException, fn: Callable[[], T]) -> T:
        """Retry ``fn`` whose first attempt (made outside) failed with ``first_error``.

        Keeps tenacity out of the success path of the facade: it is entered only once
        an attempt has failed. The caller has decided that ``first_error`` is worth
        a retry; the waits and the log are those of :meth:`call` from its 2nd attempt.
        """
        self.stats.record_attempt()
        if self.max_attempts <= 1:
            self.stats.record_give_up()
            raise first_error
        wait = self.first_wait()
        self._retry(fn, first_error, 1, wait)
        if wait > 0:
            self.sleep(wait)
        try:
            return self.retrying(attempts=self.max_attempts - 1, done=1)(fn)
        except BaseException as exc:
            if self.retry_on(exc):
                self.stats.record_give_up()
            raise


def with_retry(
    fn: Callable[..., T],
    /,
    *args: Any,
    max_attempts: int = 3,
    delay: float = 1.0,
    max_delay: float = 30.0,
    retry_on: Callable[[BaseException], bool] = is_transient,
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


def retry_within_call(exc: BaseException) -> bool:
    """For pgaccess's own retries inside one call: transient, and not a failure that
    already used up the call's time.

    ``PoolTimeout`` and ``ConnectionFailed`` come after the pool has waited (or kept
    reconnecting) for the caller's whole timeout; retrying them inside the same call
    would multiply that wait (DESIGN principle 4). They stay transient for
    ``with_retry`` and ``run_in_transaction``, whose caller chose to wait longer.
    """
    return is_transient(exc) and not isinstance(exc, (PoolTimeout, ConnectionFailed))


def is_transient_or_unknown(exc: BaseException) -> bool:
    """For idempotent work inside one call: ``retry_within_call`` errors, and outcomes
    that may have landed."""
    return isinstance(exc, CommitOutcomeUnknown) or retry_within_call(exc)


# ------------------------------------------------- the pipeline's tables
def _new_op_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class TablePolicy:
    """How writes to one table are retried without ever writing twice.

    ``key`` is a unique key of the table. An insert whose outcome is unknown (the
    connection died while it was in flight) is re-run as ``INSERT ... ON CONFLICT
    (key) DO NOTHING`` that returns the existing row: if that row holds the values
    that were being written, the first attempt landed and its row is returned; if
    it holds other values, the key was taken by someone else and ``UniqueViolation``
    is raised, as the first attempt would have. ``generated`` names a key column
    filled in by the client before the first attempt (tables with no natural key).
    Updates and deletes from the facade set absolute values, so re-running one after
    an unknown outcome leaves the same state.
    """

    key: Tuple[str, ...]
    generated: Optional[Tuple[str, Callable[[], Any]]] = None
    policy: RetryPolicy = RetryPolicy(
        max_attempts=5, delay=0.05, max_delay=1.0, retry_on=retry_within_call
    )


#: The pipeline's write policies, by table name (with or without a schema).
TABLE_POLICIES: Dict[str, TablePolicy] = {
    # src_hash identifies the video: one job per video.
    "video_job": TablePolicy(key=("src_hash",)),
    # A highlight is its job and its span; the schema makes that the unique key.
    "highlight": TablePolicy(key=("job_id", "start_time", "end_time")),
    # A metric has no natural key: the client gives each one a UUID before sending.
    "processing_metrics": TablePolicy(key=("op_id",), generated=("op_id", _new_op_id)),
}


def table_policy(table: str) -> Optional[TablePolicy]:
    """The write policy of ``table`` (``schema.table`` is looked up by its name)."""
    if not isinstance(table, str):
        return None  # not a table name at all: the statement builder rejects it
    policy = TABLE_POLICIES.get(table)
    if policy is None and "." in table:
        policy = TABLE_POLICIES.get(table.rpartition(".")[2])
    return policy
