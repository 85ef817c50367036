"""The pipeline's schema (``schema.sql``, shipped in the package), and applying it."""

from __future__ import annotations

from importlib import resources
from typing import Union

import psycopg2

from .pool import ConnectionPool

__all__ = ["apply", "schema_sql"]

# Concurrent appliers (xdist workers, several worker processes starting at once) queue
# on this transaction-scoped lock instead of racing on CREATE ... IF NOT EXISTS.
_LOCK_KEY = 0x70676163  # "pgac"


def schema_sql() -> str:
    """The text of schema.sql as installed with the package."""
    return (
        resources.files("pgaccess").joinpath("schema.sql").read_text(encoding="utf-8")
    )


def apply(target: Union[ConnectionPool, str]) -> None:
    """Apply the schema to a pool's or a DSN's database; twice is a no-op."""
    text = schema_sql()
    if isinstance(target, ConnectionPool):
        with target.connection() as conn:
            _apply(conn, text)
        return
    raw = psycopg2.connect(target)
    try:
        _apply(raw, text)
    finally:
        raw.close()


def _apply(conn: psycopg2.extensions.connection, text: str) -> None:
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            cur.execute(text)
            cur.execute("COMMIT")
        except BaseException:
            if not conn.closed:
                cur.execute("ROLLBACK")
            raise
