"""Write policies as data: which writes re-run safely after a failure, by which key.

The generic facade never decides by a table's name. A :class:`WritePolicy` declares
what a table's schema guarantees, and ``Database(write_policies=...)`` hands the set
to the facade:

- ``keys``: the table's unique keys. The first is its *idempotency key*: an insert
  whose outcome is unknown (the connection died while it was in flight) is re-run as
  ``INSERT ... ON CONFLICT (key) DO NOTHING``, and the row found under the key tells
  whether the first attempt landed. ``upsert`` uses it when no ``conflict=`` is
  given. An update or delete is re-run only when its WHERE pins one row by equality
  on one of the keys, so a re-run cannot reach rows that came to match meanwhile.
- ``generated``: a key column the client fills in before the first attempt, for
  tables with no natural key (the metric's ``op_id``).
- ``retry``: how those re-runs are spaced and how many there are.

``PIPELINE`` is the video pipeline's set (its tables are in ``sql/schema.sql``, whose
unique constraints these keys mirror; the jobs package reads its conflict targets
from here too). A table without a policy is written once: a failure is raised to the
caller as it is.

Declaring a policy for a table of your own::

    from pgaccess import Database, WritePolicies, WritePolicy
    policies = WritePolicies(
        *PIPELINE.values(),
        WritePolicy("orders", keys=[("id",), ("order_ref",)]),
    )
    db = Database(write_policies=policies)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from .errors import InvalidQuery
from .retry import WRITE, RetryPolicy

__all__ = ["PIPELINE", "WritePolicies", "WritePolicy"]

Key = Tuple[str, ...]


def _default_retry() -> RetryPolicy:
    return RetryPolicy(max_attempts=5, delay=0.05, max_delay=1.0, retry_on=WRITE)


@dataclass(frozen=True)
class WritePolicy:
    """How writes to one table re-run without ever writing twice (see the module)."""

    table: str
    keys: Sequence[Sequence[str]]
    generated: Optional[Tuple[str, Callable[[], Any]]] = None
    retry: RetryPolicy = field(default_factory=_default_retry)

    def __post_init__(self) -> None:
        keys = tuple(tuple(k) for k in self.keys)
        if not keys or not all(keys):
            raise InvalidQuery(f"the write policy of {self.table} needs a unique key")
        object.__setattr__(self, "keys", keys)

    @property
    def key(self) -> Key:
        """The idempotency key: the first of ``keys``."""
        return tuple(self.keys[0])

    def pins_one_row(self, equal_columns: Iterable[str]) -> bool:
        """Whether equality on ``equal_columns`` covers one of the unique keys."""
        cols = set(equal_columns)
        return any(cols.issuperset(k) for k in self.keys)


class WritePolicies(Mapping[str, WritePolicy]):
    """Write policies by table name; ``schema.table`` finds the policy of ``table``."""

    def __init__(self, *policies: WritePolicy) -> None:
        self._by_table: Dict[str, WritePolicy] = {p.table: p for p in policies}

    def __getitem__(self, table: str) -> WritePolicy:
        return self._by_table[table]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_table)

    def __len__(self) -> int:
        return len(self._by_table)

    def __repr__(self) -> str:
        return f"WritePolicies({', '.join(self._by_table)})"

    def of(self, table: Any) -> Optional[WritePolicy]:
        """The policy of ``table`` (``schema.table`` by its name), or None."""
        if not isinstance(table, str):
            return None  # not a table name at all: the statement builder rejects it
        policy = self._by_table.get(table)
        if policy is None and "." in table:
            policy = self._by_table.get(table.rpartition(".")[2])
        return policy


def _new_op_id() -> str:
    return str(uuid.uuid4())


#: The video pipeline's tables. The keys mirror sql/schema.sql's unique constraints.
VIDEO_JOB = WritePolicy("video_job", keys=[("src_hash",), ("id",)])
HIGHLIGHT = WritePolicy(
    "highlight", keys=[("job_id", "start_time", "end_time"), ("id",)]
)
PROCESSING_METRICS = WritePolicy(
    "processing_metrics", keys=[("op_id",), ("id",)], generated=("op_id", _new_op_id)
)
PIPELINE = WritePolicies(VIDEO_JOB, HIGHLIGHT, PROCESSING_METRICS)


def conflict_target(policy: WritePolicy) -> str:
    """The idempotency key as the column list of an ``ON CONFLICT (...)`` clause."""
    return ", ".join(policy.key)
