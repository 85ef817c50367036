"""Settings: argument, then the environment, then a default.

What the pool reads (``Settings.resolve``; a pool never reads the facade's variables, so
a malformed one cannot stop a pool from being made):

- DSN: ``dsn=``, then ``PGACCESS_DSN``, then ``DATABASE_URL``, then libpq's own
  defaults (PGHOST, PGDATABASE, ... or the local socket), as psql.
- pool size: ``maxconn=``, then ``PGACCESS_POOL_SIZE``, then 2 x CPU cores.
- wait for a connection: ``timeout=``, then ``PGACCESS_POOL_TIMEOUT``, then 30 s.
- statement timeout: ``statement_timeout=``, then ``PGACCESS_STATEMENT_TIMEOUT`` (ms).
- pooler: ``pooler=``, then ``PGACCESS_POOLER``: ``"transaction"`` when the DSN is a
  transaction-mode pooler (PgBouncer), which refuses what needs a session.

What the facade reads (``slow_query_ms_from_env``):

- slow-query log: ``slow_query_ms=``, then ``PGACCESS_SLOW_QUERY_MS``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, TypeVar

__all__ = [
    "POOLERS",
    "TRANSACTION_POOLER",
    "Settings",
    "default_pool_size",
    "redact_dsn",
    "slow_query_ms_from_env",
]

#: A pooler that lends a server connection per transaction (PgBouncer's
#: ``pool_mode = transaction``): nothing may rely on session state.
TRANSACTION_POOLER = "transaction"
POOLERS = (None, TRANSACTION_POOLER, "session")

T = TypeVar("T")


def default_pool_size() -> int:
    """Two connections per CPU core this process may use (its affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 * max(cores, 1)


def _env(
    env: Mapping[str, str], name: str, parse: Callable[[str], T], what: str
) -> Optional[T]:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {what}") from None


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:  # also rejects NaN
        raise ValueError
    return value


def slow_query_ms_from_env(
    environ: Optional[Mapping[str, str]] = None,
) -> Optional[float]:
    """``PGACCESS_SLOW_QUERY_MS``, or None when unset; ``ValueError`` when malformed."""
    env = os.environ if environ is None else environ
    return _env(env, "PGACCESS_SLOW_QUERY_MS", _non_negative_float, "milliseconds")


_PASSWORD_IN_URL = re.compile(r"(://[^:/?#@]*:)[^@/?#]*@")
_PASSWORD_IN_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, for logs, reprs and messages."""
    dsn = _PASSWORD_IN_URL.sub(r"\1***@", dsn)
    return _PASSWORD_IN_KV.sub(r"\1***", dsn)


@dataclass(frozen=True)
class Settings:
    """The pool's settings, resolved; build one with ``Settings.resolve``."""

    dsn: str = ""
    maxconn: int = field(default_factory=default_pool_size)
    timeout: float = 30.0
    statement_timeout_ms: Optional[int] = None
    pooler: Optional[str] = None

    @classmethod
    def resolve(
        cls,
        dsn: Optional[str] = None,
        *,
        maxconn: Optional[int] = None,
        timeout: Optional[float] = None,
        statement_timeout: Optional[int] = None,
        pooler: Optional[str] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> Settings:
        """Arguments first, then the environment, then defaults.

        Raises ``ValueError`` naming the variable when an environment value is bad.
        """
        env = os.environ if environ is None else environ
        if dsn is None:
            dsn = env.get("PGACCESS_DSN") or env.get("DATABASE_URL") or ""
        if maxconn is None:
            maxconn = _env(
                env, "PGACCESS_POOL_SIZE", _positive_int, "a positive integer"
            )
        if timeout is None:
            timeout = _env(
                env, "PGACCESS_POOL_TIMEOUT", _non_negative_float, "a number of seconds"
            )
        if statement_timeout is None:
            statement_timeout = _env(
                env, "PGACCESS_STATEMENT_TIMEOUT", _positive_int, "milliseconds (> 0)"
            )
        if pooler is None:
            pooler = env.get("PGACCESS_POOLER", "").strip() or None
        if pooler not in POOLERS:
            raise ValueError(
                f"pooler must be one of {', '.join(map(repr, POOLERS[1:]))} or None, "
                f"got {pooler!r} (from the argument or PGACCESS_POOLER)"
            )
        if maxconn is not None and maxconn < 1:
            raise ValueError(f"maxconn must be at least 1, got {maxconn}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        return cls(
            dsn=dsn,
            maxconn=maxconn if maxconn is not None else default_pool_size(),
            timeout=timeout if timeout is not None else 30.0,
            statement_timeout_ms=statement_timeout,
            pooler=pooler,
        )
