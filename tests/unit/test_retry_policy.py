"""RetryPolicy, with_retry and @retrying without a server: waits, logs, give-ups.

Time is injected (``sleep=waits.append``), so nothing here sleeps."""

from __future__ import annotations

import logging
import time
from typing import Callable, List

import psycopg2
import psycopg2.errors
import pytest
import tenacity
from support.retries import Counter, stats_delta

from pgaccess import (
    CommitOutcomeUnknown,
    ProgrammingError,
    RetryPolicy,
    is_transient,
    retrying,
    with_retry,
)
from pgaccess.retry import global_stats


def test_user_raised_operational_error_is_transient_unknown_outcome_is_not() -> None:
    # The usage guide's way to say "not yet": a bare psycopg2.OperationalError.
    assert is_transient(psycopg2.OperationalError("Service not ready"))
    # An outcome that may have landed is never transient, whatever its SQLSTATE says.
    assert not is_transient(
        CommitOutcomeUnknown("lost during COMMIT", sqlstate="08006")
    )
    assert not is_transient(CommitOutcomeUnknown("lost during COMMIT"))
    # pgaccess's own errors without a code are not psycopg2's bare connection errors.
    assert not is_transient(ProgrammingError("wrong"))
    assert not is_transient(ValueError("not a database error"))


def failing(
    times: int, exc_factory: Callable[[int], BaseException]
) -> Callable[[], str]:
    """A function that raises ``exc_factory(n)`` on its first ``times`` calls."""
    calls = Counter()

    def fn() -> str:
        n = calls.bump()
        if n <= times:
            raise exc_factory(n)
        return f"ok after {n}"

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def not_ready(n: int) -> BaseException:
    return psycopg2.OperationalError(f"Service not ready ({n})")


def test_policy_waits_grow_exponentially() -> None:
    waits: List[float] = []
    policy = RetryPolicy(
        max_attempts=5,
        delay=0.05,
        backoff=2.0,
        max_delay=2.0,
        jitter=False,
        sleep=waits.append,
    )
    assert policy.call(failing(4, not_ready)) == "ok after 5"
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4])


def test_policy_waits_are_capped() -> None:
    waits: List[float] = []
    policy = RetryPolicy(
        max_attempts=9,
        delay=0.05,
        backoff=2.0,
        max_delay=2.0,
        jitter=False,
        sleep=waits.append,
    )
    assert policy.call(failing(8, not_ready)) == "ok after 9"
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])


def test_policy_jitter_stays_within_one_delay() -> None:
    jitters: List[float] = []
    for _ in range(20):
        waits: List[float] = []
        policy = RetryPolicy(
            max_attempts=5, delay=0.05, max_delay=2.0, sleep=waits.append
        )
        policy.call(failing(4, not_ready))
        assert len(waits) == 4
        for wait, base in zip(waits, [0.05, 0.1, 0.2, 0.4]):
            assert base <= wait <= base + 0.05
            jitters.append(wait - base)
    # There is jitter: threads that failed together spread out. 80 draws from
    # [0, 0.05] all within 1 ms of each other would mean there is none.
    assert max(jitters) - min(jitters) > 0.001


def test_retry_after_a_failure_outside_continues_the_backoff() -> None:
    # The facade makes its first attempt outside tenacity (call_after_failure): the
    # waits must go on as if tenacity had made it, not start over.
    waits: List[float] = []
    policy = RetryPolicy(
        max_attempts=4, delay=0.05, max_delay=2.0, jitter=False, sleep=waits.append
    )
    fn = failing(2, not_ready)
    assert policy.call_after_failure(not_ready(0), fn) == "ok after 3"
    assert waits == pytest.approx([0.05, 0.1, 0.2])


def test_each_retry_is_logged_with_attempt_error_and_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    waits: List[float] = []
    policy = RetryPolicy(
        max_attempts=3, delay=0.05, max_delay=2.0, jitter=False, sleep=waits.append
    )
    caplog.set_level(logging.WARNING, logger="pgaccess.retry")
    policy.call(failing(2, not_ready))
    records = [r for r in caplog.records if r.name == "pgaccess.retry"]
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    first, second = (r.getMessage() for r in records)
    assert "attempt 1 of 3" in first and "0.050 s" in first
    assert "OperationalError: Service not ready (1)" in first
    assert "attempt 2 of 3" in second and "0.100 s" in second
    assert "Service not ready (2)" in second


def test_logged_attempts_after_a_failure_outside_count_from_two(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RetryPolicy(
        max_attempts=3, delay=0.05, max_delay=2.0, jitter=False, sleep=lambda s: None
    )
    caplog.set_level(logging.WARNING, logger="pgaccess.retry")
    policy.call_after_failure(not_ready(1), failing(1, lambda n: not_ready(n + 1)))
    messages = [r.getMessage() for r in caplog.records if r.name == "pgaccess.retry"]
    assert len(messages) == 2
    assert "attempt 1 of 3" in messages[0] and "0.050 s" in messages[0]
    assert "attempt 2 of 3" in messages[1] and "0.100 s" in messages[1]


def test_max_time_stops_retrying() -> None:
    waits: List[float] = []
    fn = failing(5, not_ready)
    policy = RetryPolicy(max_attempts=5, delay=0.01, max_time=0.0, sleep=waits.append)
    with pytest.raises(psycopg2.OperationalError):
        policy.call(fn)
    assert fn.calls.total == 1  # type: ignore[attr-defined]
    assert waits == []


def test_with_retry_gives_up_with_the_original_exception() -> None:
    raised: List[BaseException] = []

    def never_ready() -> None:
        exc = psycopg2.OperationalError(f"Service not ready ({len(raised) + 1})")
        raised.append(exc)
        raise exc

    before = global_stats.snapshot()
    with pytest.raises(psycopg2.OperationalError) as info:
        with_retry(never_ready, max_attempts=3, delay=0.001)
    assert not isinstance(info.value, tenacity.RetryError)
    assert info.value is raised[-1]
    assert len(raised) == 3
    delta = stats_delta(before)
    assert (delta["attempts"], delta["retries"], delta["give_ups"]) == (3, 2, 1)


def test_retrying_decorator() -> None:
    calls = Counter()

    @retrying(max_attempts=5, delay=0.1, max_delay=5.0)
    def flaky(x: int) -> int:
        """Doubles, once the service is ready."""
        if calls.bump() == 1:
            raise psycopg2.OperationalError("Service not ready")
        return 2 * x

    started = time.monotonic()
    assert flaky(21) == 42
    assert calls.total == 2
    assert time.monotonic() - started >= 0.1  # it waited ``delay`` before the retry
    assert flaky.__name__ == "flaky" and flaky.__doc__ is not None
