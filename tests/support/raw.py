"""An independent psycopg2 connection for checking what pgaccess did, and its fixture.

Tests count facts through it, never through the code under test.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

import psycopg2
import pytest
from psycopg2 import sql

PIPELINE_TABLES = ("video_job", "highlight", "processing_metrics")


class Raw:
    """A plain psycopg2 connection in autocommit: what other sessions can see."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True

    def rows(self, query: Any, params: Any = None) -> List[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def one(self, query: Any, params: Any = None) -> Any:
        rows = self.rows(query, params)
        assert len(rows) == 1, rows
        return rows[0][0]

    def column(self, query: Any, params: Any = None) -> List[Any]:
        return [r[0] for r in self.rows(query, params)]

    def hashes(self) -> List[str]:
        """The src_hash of every video_job row, in id order."""
        return self.column("SELECT src_hash FROM video_job ORDER BY id")

    def fingerprint(self, table: str = "video_job") -> Any:
        """Every row of ``table``, as text, in id order (catches any change)."""
        return self.one(
            sql.SQL(
                "SELECT coalesce(string_agg(t::text, '|' ORDER BY t.id), '') FROM {} t"
            ).format(sql.Identifier(table))
        )

    def snapshot(self) -> Tuple[Any, ...]:
        """The table list, and every row of the pipeline's tables."""
        tables = self.rows(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
            "ORDER BY 1, 2"
        )
        contents = tuple(
            self.one(
                sql.SQL(
                    "SELECT count(*)::text || ':' || "
                    "coalesce(string_agg(t::text, '|' ORDER BY t.id), '') FROM {} t"
                ).format(sql.Identifier(t))
            )
            for t in PIPELINE_TABLES
        )
        return (tuple(tables), contents)


@pytest.fixture(scope="module")
def raw(pgaccess_dsn: str) -> Iterator[Raw]:
    """A ``Raw`` connection to this worker's database."""
    r = Raw(pgaccess_dsn)
    yield r
    r.conn.close()
