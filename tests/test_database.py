"""The facade, method by method, against the real server.

Expected results come from the seed data or from hand-written SQL on an independent
psycopg2 connection, never from pgaccess itself.
"""

from __future__ import annotations

import collections
import datetime
import threading
import types
import uuid
from decimal import Decimal
from typing import Any, Callable, Dict, Iterator, List, Optional

import psycopg2
import psycopg2.extras
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from support.raw import Raw

import pgaccess
from pgaccess import Database, DataError, InvalidQuery

UTC = datetime.timezone.utc
BASE = datetime.datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

# src_hash, status, priority, input_path, minutes after BASE (created_at)
JOBS = [
    ("a", "queued", 5, "/v/a.mp4", 3),
    ("b", "queued", 1, None, 1),
    ("c", "processing", 3, "/v/c.mp4", 2),
    ("d", "completed", 0, "/v/D.MP4", 5),
    ("e", "failed", 2, None, 4),
    ("f", "queued", 3, "/v/f.mkv", 0),
    ("g", "cancelled", -1, "/w/g.mp4", 6),
]


@pytest.fixture
def jobs(db: Database, raw: Raw) -> List[Dict[str, Any]]:
    """The seed jobs, written with plain SQL; returned as dicts with their ids."""
    seeded = []
    for src_hash, status, priority, input_path, minutes in JOBS:
        created = BASE + datetime.timedelta(minutes=minutes)
        job_id = raw.one(
            "INSERT INTO video_job (src_hash, status, priority, input_path, created_at)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (src_hash, status, priority, input_path, created),
        )
        seeded.append(
            {
                "id": job_id,
                "src_hash": src_hash,
                "status": status,
                "priority": priority,
                "input_path": input_path,
                "created_at": created,
            }
        )
    return seeded


SCRATCH_DDL = """
CREATE TABLE scratch_values (
    id    bigserial PRIMARY KEY,
    k     integer UNIQUE,
    t     text,
    i     bigint,
    f     double precision,
    n     numeric,
    ts    timestamp,
    tstz  timestamptz,
    b     boolean,
    u     uuid,
    d     date,
    j     jsonb,
    ai    integer[],
    at    text[],
    req   text NOT NULL DEFAULT 'x'
)
"""


@pytest.fixture
def scratch(db: Database, raw: Raw) -> Iterator[str]:
    """A table with a column of each interesting type; dropped afterwards."""
    raw.rows("DROP TABLE IF EXISTS scratch_values")
    raw.rows(SCRATCH_DDL)
    yield "scratch_values"
    raw.rows("DROP TABLE IF EXISTS scratch_values")


def _hashes(rows: List[Dict[str, Any]]) -> List[str]:
    return [r["src_hash"] for r in rows]


# ------------------------------------------------------------------ where forms
def _like(pattern: str, value: Optional[str], fold: bool = False) -> bool:
    # The patterns below are prefix%suffix only.
    if value is None:
        return False
    prefix, suffix = pattern.split("%")
    if fold:
        value, prefix, suffix = value.lower(), prefix.lower(), suffix.lower()
    return value.startswith(prefix) and value.endswith(suffix)


def _ne(col: str, x: Any) -> Callable[[Dict[str, Any]], bool]:
    # SQL: NULL <> x is unknown, so a NULL never matches.
    return lambda r: r[col] is not None and r[col] != x


WHERE_FORMS = {
    "equality": ({"status": "queued"}, lambda r: r["status"] == "queued"),
    "equality-int": ({"priority": 3}, lambda r: r["priority"] == 3),
    "equality-nomatch": ({"status": "nope"}, lambda r: False),
    "none-is-null": ({"input_path": None}, lambda r: r["input_path"] is None),
    "list": (
        {"status": ["queued", "failed"]},
        lambda r: r["status"] in ("queued", "failed"),
    ),
    "tuple": (
        {"status": ("queued", "failed")},
        lambda r: r["status"] in ("queued", "failed"),
    ),
    "set": ({"priority": {0, 3, 99}}, lambda r: r["priority"] in (0, 3)),
    "frozenset": ({"src_hash": frozenset({"a", "g"})}, lambda r: r["src_hash"] in "ag"),
    "empty-list": ({"status": []}, lambda r: False),
    "empty-tuple": ({"status": ()}, lambda r: False),
    "op-eq": ({"status": ("=", "queued")}, lambda r: r["status"] == "queued"),
    "op-eq-none": ({"input_path": ("=", None)}, lambda r: r["input_path"] is None),
    "op-ne": ({"status": ("!=", "queued")}, lambda r: r["status"] != "queued"),
    "op-ne-null-column": (
        {"input_path": ("!=", "/v/a.mp4")},
        _ne("input_path", "/v/a.mp4"),
    ),
    "op-ne-none": ({"input_path": ("!=", None)}, lambda r: r["input_path"] is not None),
    "op-lt": ({"priority": ("<", 3)}, lambda r: r["priority"] < 3),
    "op-le": ({"priority": ("<=", 3)}, lambda r: r["priority"] <= 3),
    "op-gt": ({"priority": (">", 3)}, lambda r: r["priority"] > 3),
    "op-ge": ({"priority": (">=", 3)}, lambda r: r["priority"] >= 3),
    "op-lt-timestamp": (
        {"created_at": ("<", BASE + datetime.timedelta(minutes=3))},
        lambda r: r["created_at"] < BASE + datetime.timedelta(minutes=3),
    ),
    "op-like": (
        {"input_path": ("like", "/v/%.mp4")},
        lambda r: _like("/v/%.mp4", r["input_path"]),
    ),
    "op-ilike": (
        {"input_path": ("ilike", "/v/%.mp4")},
        lambda r: _like("/v/%.mp4", r["input_path"], fold=True),
    ),
    "op-in": ({"priority": ("in", [1, 3])}, lambda r: r["priority"] in (1, 3)),
    "op-in-empty": ({"priority": ("in", [])}, lambda r: False),
    "op-not-in": (
        {"priority": ("not in", [1, 3])},
        lambda r: r["priority"] not in (1, 3),
    ),
    "op-not-in-empty": ({"priority": ("not in", [])}, lambda r: True),
    "and-two-keys": (
        {"status": "queued", "priority": (">", 1)},
        lambda r: r["status"] == "queued" and r["priority"] > 1,
    ),
    "and-three-keys": (
        {
            "status": ["queued", "processing"],
            "input_path": ("like", "/v/%"),
            "id": ("!=", 0),
        },
        lambda r: (
            r["status"] in ("queued", "processing") and _like("/v/%", r["input_path"])
        ),
    ),
    "and-null-and-eq": (
        {"input_path": None, "status": "queued"},
        lambda r: r["input_path"] is None and r["status"] == "queued",
    ),
}
METHODS = ["find_many", "find_one", "count", "exists", "update", "delete"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", sorted(WHERE_FORMS))
def test_where_forms(db: Database, raw: Raw, jobs: Any, form: str, method: str) -> None:
    where, predicate = WHERE_FORMS[form]
    expected = {j["src_hash"] for j in jobs if predicate(j)}
    everything = {j["src_hash"] for j in jobs}
    if method == "find_many":
        assert set(_hashes(db.find_many("video_job", where))) == expected
        assert len(db.find_many("video_job", where)) == len(expected)
    elif method == "find_one":
        row = db.find_one("video_job", where)
        if expected:
            assert row is not None and row["src_hash"] in expected
        else:
            assert row is None
    elif method == "count":
        assert db.count("video_job", where) == len(expected)
    elif method == "exists":
        assert db.exists("video_job", where) is bool(expected)
    elif method == "update":
        assert db.update("video_job", {"error": "touched"}, where) == len(expected)
        touched = raw.column("SELECT src_hash FROM video_job WHERE error = 'touched'")
        assert set(touched) == expected
    else:
        assert db.delete("video_job", where) == len(expected)
        assert (
            set(raw.column("SELECT src_hash FROM video_job")) == everything - expected
        )


def test_where_none_and_empty_dict_match_everything(db: Database, jobs: Any) -> None:
    assert db.count("video_job") == len(JOBS)
    assert db.count("video_job", {}) == len(JOBS)
    assert len(db.find_many("video_job", None)) == len(JOBS)
    assert db.exists("video_job")


def test_where_none_inside_membership_is_rejected(db: Database, jobs: Any) -> None:
    with pytest.raises(InvalidQuery):
        db.find_many("video_job", {"input_path": ["/v/a.mp4", None]})
    with pytest.raises(InvalidQuery):
        db.find_many("video_job", {"priority": (">", None)})
    with pytest.raises(InvalidQuery):
        db.find_many("video_job", {"priority": ("in", 3)})


def test_where_same_shape_different_values(db: Database, jobs: Any) -> None:
    # The statement is cached by shape; the values must still be each call's own.
    for j in jobs:
        assert _hashes(db.find_many("video_job", {"id": j["id"]})) == [j["src_hash"]]
        assert (
            db.find_one("video_job", {"priority": ("=", j["priority"])})["priority"]
            == (j["priority"])
        )


# --------------------------------------------------------------------- columns=
def test_columns_selects_only_those(db: Database, jobs: Any) -> None:
    rows = db.find_many(
        "video_job", columns=["src_hash", "priority"], order_by="src_hash"
    )
    assert rows == [
        {"src_hash": j["src_hash"], "priority": j["priority"]}
        for j in sorted(jobs, key=lambda j: j["src_hash"])
    ]
    one = db.find_one("video_job", {"src_hash": "c"}, columns=("status",))
    assert one == {"status": "processing"}
    single = db.find_one("video_job", {"src_hash": "d"}, columns="input_path")
    assert single == {"input_path": "/v/D.MP4"}
    with pytest.raises(InvalidQuery):
        db.find_many("video_job", columns=[])


def test_find_one_returns_full_row(db: Database, raw: Raw, jobs: Any) -> None:
    row = db.find_one("video_job", {"src_hash": "a"})
    assert row is not None
    names = raw.column(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'video_job' ORDER BY ordinal_position"
    )
    assert list(row) == names
    assert row["id"] == jobs[0]["id"]
    assert row["created_at"] == jobs[0]["created_at"]


# --------------------------------------------------------------------- order_by
ORDER_FORMS = [
    ("created_at", "created_at"),
    ("-created_at", "created_at DESC"),
    ("created_at desc", "created_at DESC"),
    ("created_at DESC", "created_at DESC"),
    ("  created_at   asc  ", "created_at ASC"),
    ("- created_at", "created_at DESC"),
    (["priority desc", "src_hash"], "priority DESC, src_hash"),
    (["-priority", "-src_hash"], "priority DESC, src_hash DESC"),
    (("status", "-priority", "src_hash"), "status, priority DESC, src_hash"),
    (["input_path asc nulls last", "src_hash"], "input_path ASC NULLS LAST, src_hash"),
    (
        ["input_path asc nulls first", "src_hash"],
        "input_path ASC NULLS FIRST, src_hash",
    ),
    (
        ["input_path desc nulls last", "src_hash"],
        "input_path DESC NULLS LAST, src_hash",
    ),
    (["input_path NULLS FIRST", "-src_hash"], "input_path NULLS FIRST, src_hash DESC"),
    (["-input_path nulls last", "src_hash"], "input_path DESC NULLS LAST, src_hash"),
    (["input_path", "src_hash"], "input_path, src_hash"),
]


@pytest.mark.parametrize(("order_by", "clause"), ORDER_FORMS)
def test_order_by_forms(
    db: Database, raw: Raw, jobs: Any, order_by: Any, clause: str
) -> None:
    expected = raw.column(f"SELECT src_hash FROM video_job ORDER BY {clause}")
    assert _hashes(db.find_many("video_job", order_by=order_by)) == expected
    first = db.find_one("video_job", order_by=order_by)
    assert first is not None and first["src_hash"] == expected[0]
    queued = raw.column(
        f"SELECT src_hash FROM video_job WHERE status = 'queued' ORDER BY {clause}"
    )
    assert _hashes(
        db.find_many("video_job", {"status": "queued"}, order_by=order_by)
    ) == (queued)


@pytest.mark.parametrize(
    ("limit", "offset"),
    [(2, None), (2, 0), (2, 1), (3, 5), (0, None), (None, 3), (None, 0), (10, 100)],
)
def test_limit_offset(
    db: Database, raw: Raw, jobs: Any, limit: Optional[int], offset: Optional[int]
) -> None:
    expected = raw.column(
        "SELECT src_hash FROM video_job ORDER BY created_at LIMIT %s OFFSET %s",
        (limit, offset or 0),
    )
    rows = db.find_many("video_job", order_by="created_at", limit=limit, offset=offset)
    assert _hashes(rows) == expected


def test_limit_with_where_and_order(db: Database, raw: Raw, jobs: Any) -> None:
    expected = raw.column(
        "SELECT src_hash FROM video_job WHERE priority >= 1 "
        "ORDER BY priority DESC, src_hash LIMIT 3 OFFSET 1"
    )
    rows = db.find_many(
        "video_job",
        {"priority": (">=", 1)},
        order_by=["-priority", "src_hash"],
        limit=3,
        offset=1,
    )
    assert _hashes(rows) == expected


# ------------------------------------------------------------- schema-qualified
def test_schema_qualified_table(db: Database, raw: Raw, jobs: Any) -> None:
    t = "public.video_job"
    assert db.count(t) == len(JOBS)
    assert db.count(t, {"status": "queued"}) == 3
    assert db.exists(t, {"src_hash": "a"})
    assert db.find_one(t, {"src_hash": "b"})["priority"] == 1
    assert set(_hashes(db.find_many(t, {"priority": (">", 2)}))) == {"a", "c", "f"}
    new_id = db.insert(t, {"src_hash": "q1"})
    assert raw.one("SELECT src_hash FROM video_job WHERE id = %s", (new_id,)) == "q1"
    assert db.insert_many(t, [{"src_hash": "q2"}, {"src_hash": "q3"}]) == 2
    assert db.update(t, {"status": "failed"}, {"src_hash": ["q2", "q3"]}) == 2
    assert raw.one("SELECT count(*) FROM video_job WHERE status = 'failed'") == 3
    row = db.upsert(t, {"src_hash": "q1", "priority": 9})
    assert row["id"] == new_id and row["priority"] == 9
    assert db.delete(t, {"src_hash": ("like", "q%")}) == 3
    assert raw.one("SELECT count(*) FROM video_job") == len(JOBS)


# ----------------------------------------------------------------------- insert
def test_insert_returns_id(db: Database, raw: Raw) -> None:
    ids = [db.insert("video_job", {"src_hash": f"h{i}"}) for i in range(3)]
    assert ids == raw.column("SELECT id FROM video_job ORDER BY src_hash")
    assert len(set(ids)) == 3


def test_insert_returning_star(db: Database, raw: Raw) -> None:
    row = db.insert(
        "video_job", {"src_hash": "s", "input_path": "/x", "priority": 4}, returning="*"
    )
    assert isinstance(row, dict)
    stored = raw.rows(
        "SELECT id, src_hash, input_path, priority, status, created_at FROM video_job"
    )
    assert stored == [
        (
            row["id"],
            row["src_hash"],
            row["input_path"],
            row["priority"],
            row["status"],
            row["created_at"],
        )
    ]
    assert row["status"] == "queued"  # the column default, read back


def test_insert_returning_none(db: Database, raw: Raw) -> None:
    assert db.insert("video_job", {"src_hash": "n"}, returning=None) is None
    assert raw.column("SELECT src_hash FROM video_job") == ["n"]


def test_insert_returning_list_and_other_column(db: Database, raw: Raw) -> None:
    row = db.insert(
        "video_job", {"src_hash": "l", "priority": 2}, returning=["id", "status"]
    )
    assert row == {
        "id": raw.one("SELECT id FROM video_job WHERE src_hash = 'l'"),
        "status": "queued",
    }
    assert db.insert("video_job", {"src_hash": "m"}, returning="src_hash") == "m"


def test_insert_into_processing_metrics_and_highlight(db: Database, raw: Raw) -> None:
    job = db.insert("video_job", {"src_hash": "j"})
    hid = db.insert(
        "highlight", {"job_id": job, "start_time": 1.0, "end_time": 2.5, "score": 0.9}
    )
    mid = db.insert(
        "processing_metrics", {"job_id": job, "stage": "s", "duration_ms": 12.5}
    )
    assert raw.rows("SELECT id, job_id, end_time FROM highlight") == [(hid, job, 2.5)]
    assert raw.rows(
        "SELECT id, job_id, stage, duration_ms FROM processing_metrics"
    ) == [(mid, job, "s", 12.5)]


def test_plain_insert_of_existing_src_hash_raises(db: Database, raw: Raw) -> None:
    db.insert("video_job", {"src_hash": "dup", "input_path": "/one"})
    with pytest.raises(pgaccess.UniqueViolation):
        db.insert("video_job", {"src_hash": "dup", "input_path": "/two"})
    assert raw.rows("SELECT src_hash, input_path FROM video_job") == [("dup", "/one")]


# ------------------------------------------------------------------ insert_many
NAIVE = datetime.datetime(2023, 3, 4, 5, 6, 7, 891011)
AWARE = datetime.datetime(
    2023,
    3,
    4,
    5,
    6,
    7,
    123456,
    tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
)
COPY_ROWS = [
    {
        "k": 0,
        "t": "plain",
        "i": 1,
        "f": 1.5,
        "n": 10**30,
        "ts": NAIVE,
        "tstz": AWARE,
        "b": True,
        "d": datetime.date(2020, 2, 29),
        "u": uuid.UUID("6f1e1c9e-0c3e-4a7c-9a53-34fbd3cc0d86"),
    },
    {
        "k": 1,
        "t": "tab\there\nnewline\\back\rslash \\N \\. end",
        "i": -(2**63),
        "f": float("nan"),
        "n": Decimal("1.10"),
        "ts": NAIVE.replace(microsecond=0),
        "tstz": AWARE.astimezone(UTC),
        "b": False,
        "d": datetime.date(1, 1, 1),
        "u": uuid.UUID(int=28),
    },
    {
        "k": 2,
        "t": None,
        "i": None,
        "f": float("inf"),
        "n": None,
        "ts": None,
        "tstz": None,
        "b": None,
        "d": None,
        "u": None,
    },
    {
        "k": 3,
        "t": "ünïcödé ✓ 𝄞 日本語",
        "i": 2**63 - 1,
        "f": float("-inf"),
        "n": Decimal("-0.000000000000000000001"),
        "ts": datetime.datetime(1999, 12, 31, 23, 59, 59, 999999),
        "tstz": datetime.datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
        "b": True,
        "d": datetime.date(9999, 12, 31),
        "u": uuid.UUID(int=33),
    },
    {
        "k": 4,
        "t": "",
        "i": 0,
        "f": 0.1,
        "n": 0,
        "ts": NAIVE,
        "tstz": AWARE,
        "b": False,
        "d": datetime.date(2024, 1, 1),
        "u": uuid.UUID(int=31),
    },
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, uuid.UUID):  # psycopg2 reads uuid columns back as str
        return str(a) == b
    if isinstance(a, (float, Decimal)) and a != a:  # NaN
        return isinstance(b, type(a)) and b != b
    return bool(a == b)


def _stored(raw: Raw, cols: List[str]) -> List[Dict[str, Any]]:
    query = sql.SQL("SELECT {} FROM scratch_values ORDER BY k").format(
        sql.SQL(", ").join(map(sql.Identifier, cols))
    )
    return [dict(zip(cols, r)) for r in raw.rows(query)]


def test_insert_many_copy_path_values(db: Database, raw: Raw, scratch: str) -> None:
    assert db.insert_many(scratch, COPY_ROWS) == len(COPY_ROWS)
    stored = _stored(raw, list(COPY_ROWS[0]))
    assert len(stored) == len(COPY_ROWS)
    for want, got in zip(COPY_ROWS, stored):
        for col in want:
            assert _same(want[col], got[col]), (col, want[col], got[col])


def _maybe(values: st.SearchStrategy[Any], nulls: bool) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), values) if nulls else values


@st.composite
def copy_tables(draw: Any) -> List[Dict[str, Any]]:
    """Rows whose columns take each shape the COPY encoder handles: one type, one
    type with NULLs, all NULL, mixed types; text with and without characters to
    escape; floats finite or not."""
    text = st.one_of(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00")),
        st.sampled_from(["\\N", "\\.", "a\tb", "a\nb", "\r", "\\"]),
    )
    plain_text = st.from_regex(r"[a-z/ .0-9]{0,12}", fullmatch=True)
    columns = {
        "t": draw(st.sampled_from([text, plain_text, st.none()])),
        "i": draw(st.sampled_from([st.integers(-(2**63), 2**63 - 1), st.none()])),
        "f": draw(
            st.sampled_from(
                [st.floats(), st.floats(allow_nan=False, allow_infinity=False)]
            )
        ),
        "n": st.one_of(
            st.integers(-(10**20), 10**20),
            st.decimals(allow_nan=False, allow_infinity=False, places=3),
        ),
        "b": st.booleans(),
        "ts": st.datetimes(),
    }
    nulls = {c: draw(st.booleans()) for c in columns}
    n = draw(st.integers(1, 40))
    return [
        {"k": k, **{c: draw(_maybe(v, nulls[c])) for c, v in columns.items()}}
        for k in range(n)
    ]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(rows=copy_tables())
def test_insert_many_copy_round_trips_every_column_shape(
    db: Database, raw: Raw, rows: List[Dict[str, Any]]
) -> None:
    raw.rows("DROP TABLE IF EXISTS scratch_values")
    raw.rows(SCRATCH_DDL)
    assert db.insert_many("scratch_values", rows) == len(rows)
    stored = _stored(raw, list(rows[0]))
    for want, got in zip(rows, stored):
        for col in want:
            assert _same(want[col], got[col]), (col, want[col], got[col])


def test_insert_many_copy_into_video_job(db: Database, raw: Raw) -> None:
    rows = [
        {"src_hash": f"c{i}", "input_path": f"/v/{i}", "priority": i} for i in range(50)
    ]
    assert db.insert_many("video_job", rows) == 50
    assert raw.rows(
        "SELECT src_hash, input_path, priority FROM video_job ORDER BY priority"
    ) == [(r["src_hash"], r["input_path"], r["priority"]) for r in rows]


def test_insert_many_execute_values_path(db: Database, raw: Raw, scratch: str) -> None:
    rows = [
        {"k": 7, "j": psycopg2.extras.Json({"a": [1, 2], "ü": None}), "ai": [1, 2, 3]},
        {"k": 3, "j": psycopg2.extras.Json([1, "two", {"x": 3.5}]), "ai": []},
        {"k": 9, "j": psycopg2.extras.Json("just a string"), "ai": [-(2**31)]},
        {"k": 1, "j": None, "ai": None},
    ]
    assert db.insert_many(scratch, rows) == len(rows)
    stored = {
        r[0]: (r[1], r[2]) for r in raw.rows("SELECT k, j, ai FROM scratch_values")
    }
    assert stored == {
        7: ({"a": [1, 2], "ü": None}, [1, 2, 3]),
        3: ([1, "two", {"x": 3.5}], []),
        9: ("just a string", [-(2**31)]),
        1: (None, None),
    }


def test_insert_many_returning_ids_in_input_order(
    db: Database, raw: Raw, scratch: str
) -> None:
    keys = [5, 3, 9, 1, 7, 2]
    ids = db.insert_many(
        scratch, [{"k": k, "t": f"row{k}"} for k in keys], returning="id"
    )
    assert len(ids) == len(keys) and len(set(ids)) == len(keys)
    by_id = dict(raw.rows("SELECT id, k FROM scratch_values"))
    assert [by_id[i] for i in ids] == keys


def test_insert_many_returning_over_several_pages(
    db: Database, raw: Raw, scratch: str
) -> None:
    keys = [11, 4, 8, 15, 16, 23, 42]
    rows = [{"k": k, "j": psycopg2.extras.Json({"k": k})} for k in keys]
    ids = db.insert_many(scratch, rows, returning="id", page_size=2)
    by_id = {
        r[0]: (r[1], r[2]) for r in raw.rows("SELECT id, k, j FROM scratch_values")
    }
    assert [by_id[i] for i in ids] == [(k, {"k": k}) for k in keys]


def test_insert_many_returning_other_column(db: Database, raw: Raw) -> None:
    hashes = db.insert_many(
        "video_job", [{"src_hash": h} for h in ("z", "x", "y")], returning="src_hash"
    )
    assert hashes == ["z", "x", "y"]
    assert raw.one("SELECT count(*) FROM video_job") == 3


def test_insert_many_copy_all_or_none(db: Database, raw: Raw, scratch: str) -> None:
    rows = [{"k": i, "req": "ok"} for i in range(10)]
    rows[5]["req"] = None  # NOT NULL
    with pytest.raises(pgaccess.NotNullViolation):
        db.insert_many(scratch, rows)
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_insert_many_copy_all_or_none_video_job(db: Database, raw: Raw) -> None:
    rows = [{"src_hash": f"h{i}", "input_path": "/p"} for i in range(10)]
    rows[6]["src_hash"] = "h2"
    with pytest.raises(pgaccess.UniqueViolation):
        db.insert_many("video_job", rows)
    assert raw.one("SELECT count(*) FROM video_job") == 0


def test_insert_many_execute_values_all_or_none(
    db: Database, raw: Raw, scratch: str
) -> None:
    rows = [{"k": i, "j": psycopg2.extras.Json([i]), "req": "ok"} for i in range(9)]
    rows[4]["req"] = None
    with pytest.raises(pgaccess.NotNullViolation):
        db.insert_many(scratch, rows)
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


@pytest.mark.parametrize("returning", [None, "id"])
def test_insert_many_execute_values_all_or_none_across_pages(
    db: Database, raw: Raw, scratch: str, returning: Optional[str]
) -> None:
    rows = [{"k": i, "j": psycopg2.extras.Json([i]), "req": "ok"} for i in range(9)]
    rows[7]["k"] = 0  # a unique violation in the fourth page of two rows
    with pytest.raises(pgaccess.UniqueViolation):
        db.insert_many(scratch, rows, page_size=2, returning=returning)
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_insert_many_rows_must_share_columns(db: Database, raw: Raw) -> None:
    with pytest.raises(InvalidQuery):
        db.insert_many(
            "video_job", [{"src_hash": "a"}, {"src_hash": "b", "priority": 1}]
        )
    with pytest.raises(InvalidQuery):
        db.insert_many("video_job", [{"src_hash": "a"}, {"input_path": "b"}])
    with pytest.raises(InvalidQuery):
        db.insert_many("video_job", [{"src_hash": "a"}, ["b"]])
    with pytest.raises(InvalidQuery, match="row 1 has columns"):  # keys, not just count
        db.insert_many("video_job", [{"src_hash": "a"}, {"src_hash2": "b"}])
    with pytest.raises(InvalidQuery, match="no columns"):
        db.insert_many("video_job", [{}, {}])
    with pytest.raises(InvalidQuery, match="no columns"):
        db.insert_many("video_job", [{}], returning="id")
    assert raw.one("SELECT count(*) FROM video_job") == 0


def test_insert_many_takes_any_mapping_in_any_key_order(db: Database, raw: Raw) -> None:
    rows: List[Any] = [
        {"src_hash": "a", "priority": 1},
        {"priority": 2, "src_hash": "b"},
        types.MappingProxyType({"priority": 3, "src_hash": "c"}),
        collections.OrderedDict([("src_hash", "d"), ("priority", 4)]),
    ]
    for returning in (None, "id"):
        raw.rows("TRUNCATE video_job CASCADE")
        db.insert_many("video_job", rows, returning=returning)
        assert raw.rows(
            "SELECT src_hash, priority FROM video_job ORDER BY priority"
        ) == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]


def test_insert_many_empty(db: Database) -> None:
    assert db.insert_many("video_job", []) == 0
    assert db.insert_many("video_job", [], returning="id") == []
    assert db.insert_many("video_job", iter(())) == 0


def test_insert_many_accepts_a_generator(db: Database, raw: Raw) -> None:
    assert db.insert_many("video_job", ({"src_hash": f"g{i}"} for i in range(4))) == 4
    assert raw.one("SELECT count(*) FROM video_job") == 4


# ------------------------------------------------------- update / delete guards
@pytest.mark.parametrize("where", [None, {}])
def test_update_without_where_is_refused(
    db: Database, raw: Raw, jobs: Any, where: Any
) -> None:
    before = raw.fingerprint()
    with pytest.raises(InvalidQuery):
        db.update("video_job", {"status": "failed"}, where)
    with pytest.raises(InvalidQuery):
        db.update("video_job", {"status": "failed"})
    assert raw.fingerprint() == before


@pytest.mark.parametrize("where", [None, {}])
def test_delete_without_where_is_refused(
    db: Database, raw: Raw, jobs: Any, where: Any
) -> None:
    before = raw.fingerprint()
    with pytest.raises(InvalidQuery):
        db.delete("video_job", where)
    with pytest.raises(InvalidQuery):
        db.delete("video_job")
    assert raw.fingerprint() == before


def test_update_all_rows(db: Database, raw: Raw, jobs: Any) -> None:
    assert db.update("video_job", {"error": "all"}, all_rows=True) == len(JOBS)
    assert raw.column("SELECT DISTINCT error FROM video_job") == ["all"]


def test_delete_all_rows(db: Database, raw: Raw, jobs: Any) -> None:
    assert db.delete("video_job", all_rows=True) == len(JOBS)
    assert raw.one("SELECT count(*) FROM video_job") == 0


def test_update_needs_data(db: Database, raw: Raw, jobs: Any) -> None:
    before = raw.fingerprint()
    with pytest.raises(InvalidQuery):
        db.update("video_job", {}, {"src_hash": "a"})
    assert raw.fingerprint() == before


def test_update_sets_several_columns_and_returns_count(
    db: Database, raw: Raw, jobs: Any
) -> None:
    n = db.update(
        "video_job",
        {"status": "failed", "error": "boom", "priority": 0},
        {"src_hash": "a"},
    )
    assert n == 1
    assert raw.rows(
        "SELECT status, error, priority FROM video_job WHERE src_hash = 'a'"
    ) == [("failed", "boom", 0)]
    assert db.update("video_job", {"status": "failed"}, {"src_hash": "nope"}) == 0


def test_update_to_null(db: Database, raw: Raw, jobs: Any) -> None:
    assert db.update("video_job", {"input_path": None}, {"src_hash": "a"}) == 1
    assert raw.one("SELECT input_path FROM video_job WHERE src_hash = 'a'") is None


# ----------------------------------------------------------------------- upsert
def test_upsert_inserts_new_row(db: Database, raw: Raw) -> None:
    row = db.upsert("video_job", {"src_hash": "u", "input_path": "/u", "priority": 2})
    assert row["src_hash"] == "u" and row["priority"] == 2
    assert raw.rows("SELECT id, input_path FROM video_job") == [(row["id"], "/u")]


def test_upsert_updates_every_other_column_by_default(
    db: Database, raw: Raw, jobs: Any
) -> None:
    a = jobs[0]
    row = db.upsert(
        "video_job", {"src_hash": "a", "input_path": "/new", "priority": 42}
    )
    assert row["id"] == a["id"]
    assert (row["input_path"], row["priority"]) == ("/new", 42)
    assert raw.rows(
        "SELECT id, input_path, priority FROM video_job WHERE src_hash = 'a'"
    ) == [(a["id"], "/new", 42)]
    assert raw.one("SELECT count(*) FROM video_job") == len(JOBS)


def test_upsert_updates_only_listed_columns(db: Database, raw: Raw, jobs: Any) -> None:
    row = db.upsert(
        "video_job",
        {"src_hash": "a", "input_path": "/ignored", "priority": 42},
        update=["priority"],
    )
    assert (row["input_path"], row["priority"]) == ("/v/a.mp4", 42)
    assert raw.rows(
        "SELECT input_path, priority FROM video_job WHERE src_hash = 'a'"
    ) == [("/v/a.mp4", 42)]


def test_upsert_update_nothing_returns_existing_row(
    db: Database, raw: Raw, jobs: Any
) -> None:
    before = raw.fingerprint()
    row = db.upsert(
        "video_job", {"src_hash": "b", "input_path": "/other", "priority": 7}, update=()
    )
    assert row["id"] == jobs[1]["id"]
    assert (row["input_path"], row["priority"]) == (None, 1)
    assert raw.fingerprint() == before
    fresh = db.upsert("video_job", {"src_hash": "new", "priority": 7}, update=())
    assert fresh["priority"] == 7
    assert raw.one("SELECT priority FROM video_job WHERE src_hash = 'new'") == 7


def test_upsert_other_conflict_key(db: Database, raw: Raw) -> None:
    job = db.insert("video_job", {"src_hash": "j"})
    h = {"job_id": job, "start_time": 1.0, "end_time": 2.0, "score": 0.5}
    first = db.upsert("highlight", h, conflict=("job_id", "start_time", "end_time"))
    second = db.upsert(
        "highlight", {**h, "score": 0.75}, conflict=["job_id", "start_time", "end_time"]
    )
    assert second["id"] == first["id"] and second["score"] == 0.75
    assert raw.rows("SELECT id, score FROM highlight") == [(first["id"], 0.75)]


def test_upsert_validates_conflict_and_update(
    db: Database, raw: Raw, jobs: Any
) -> None:
    before = raw.fingerprint()
    with pytest.raises(InvalidQuery):
        db.upsert("video_job", {"input_path": "/x"})  # the conflict key is not in data
    with pytest.raises(InvalidQuery):
        db.upsert("video_job", {"src_hash": "a"}, update=["priority"])
    assert raw.fingerprint() == before


# ---------------------------------------------------------------- exists, count
def test_exists_and_count(db: Database, raw: Raw, jobs: Any) -> None:
    assert db.count("video_job") == raw.one("SELECT count(*) FROM video_job")
    assert isinstance(db.count("video_job"), int)
    assert db.exists("video_job", {"src_hash": "a"}) is True
    assert db.exists("video_job", {"src_hash": "zz"}) is False
    assert db.count("highlight") == 0
    assert db.exists("highlight") is False


# ---------------------------------------------------------------------- execute
def test_execute_returns_rows_as_dicts(db: Database, raw: Raw, jobs: Any) -> None:
    rows = db.execute(
        "SELECT src_hash, priority FROM video_job WHERE status = %s ORDER BY src_hash",
        ("queued",),
    )
    assert rows == [
        {"src_hash": h, "priority": p}
        for h, p in raw.rows(
            "SELECT src_hash, priority FROM video_job WHERE status = 'queued' "
            "ORDER BY src_hash"
        )
    ]
    assert all(type(r) is dict for r in rows)


def test_execute_named_params_and_composed(db: Database, jobs: Any) -> None:
    rows = db.execute(
        "SELECT src_hash FROM video_job WHERE priority > %(p)s ORDER BY src_hash",
        {"p": 2},
    )
    assert _hashes(rows) == ["a", "c", "f"]
    query = sql.SQL("SELECT {} FROM {} WHERE {} = %s").format(
        sql.Identifier("status"),
        sql.Identifier("video_job"),
        sql.Identifier("src_hash"),
    )
    assert db.execute(query, ("d",)) == [{"status": "completed"}]
    assert db.execute("WITH x AS (SELECT 1 AS one) SELECT one FROM x") == [{"one": 1}]


def test_execute_statements_without_rows(db: Database, raw: Raw, jobs: Any) -> None:
    assert (
        db.execute("UPDATE video_job SET error = %s WHERE src_hash = %s", ("e1", "a"))
        == []
    )
    assert raw.one("SELECT error FROM video_job WHERE src_hash = 'a'") == "e1"
    assert db.execute("DELETE FROM video_job WHERE src_hash = %s", ("g",)) == []
    assert raw.one("SELECT count(*) FROM video_job") == len(JOBS) - 1
    assert db.execute("DROP TABLE IF EXISTS no_such_table_here") == []


def test_execute_insert_returning(db: Database, raw: Raw) -> None:
    rows = db.execute(
        "INSERT INTO video_job (src_hash) VALUES (%s), (%s) RETURNING id, src_hash",
        ("p", "q"),
    )
    assert rows == [
        {"id": i, "src_hash": h}
        for i, h in raw.rows("SELECT id, src_hash FROM video_job ORDER BY id")
    ]


# ----------------------------------------------------------------- execute_many
def test_execute_many_inserts(db: Database, raw: Raw) -> None:
    n = db.execute_many(
        "INSERT INTO video_job (src_hash, priority) VALUES (%s, %s)",
        [(f"m{i}", i) for i in range(6)],
    )
    assert n == 6
    assert raw.rows("SELECT src_hash, priority FROM video_job ORDER BY priority") == [
        (f"m{i}", i) for i in range(6)
    ]


def test_execute_many_counts_rows_affected(db: Database, raw: Raw, jobs: Any) -> None:
    # queued: a, b, f; failed: e; completed: d -> 3 + 1 + 0 rows
    n = db.execute_many(
        "UPDATE video_job SET error = %s WHERE status = %s",
        [("x", "queued"), ("y", "failed"), ("z", "nope")],
    )
    assert n == raw.one("SELECT count(*) FROM video_job WHERE error IS NOT NULL") == 4


def test_execute_many_all_or_none(db: Database, raw: Raw, jobs: Any) -> None:
    with pytest.raises(pgaccess.UniqueViolation):
        db.execute_many(
            "INSERT INTO video_job (src_hash) VALUES (%s)",
            [("n1",), ("n2",), ("a",), ("n3",)],
        )
    assert raw.one("SELECT count(*) FROM video_job") == len(JOBS)


def test_execute_many_empty(db: Database) -> None:
    assert db.execute_many("INSERT INTO video_job (src_hash) VALUES (%s)", []) == 0


# -------------------------------------------------------------------- round trip
JSON_DOC = {"ü": ["ß", 1, 2.5, None, True, {"nested": "日本"}], "q": "'\"\\%s"}
MEGABYTE = "".join(chr(32 + i % 95) for i in range(2**20 - 8)) + "ü✓𝄞\n\t\\"
ROUND_TRIP = [
    ("t", "héllo wörld ✓ 𝄞 日本語 \u200b 🎬 \u202e rtl", None),
    ("t", MEGABYTE, None),
    ("t", "'; DROP TABLE video_job; -- %s %(x)s $$ \\x00", None),
    ("t", "", None),
    ("f", float("nan"), None),
    ("f", float("inf"), None),
    ("f", float("-inf"), None),
    ("f", 5e-324, None),
    ("f", 1.7976931348623157e308, None),
    ("f", 0.1 + 0.2, None),
    ("i", 2**63 - 1, None),
    ("i", -(2**63), None),
    ("n", 10**40, None),
    ("n", -(10**100) + 1, None),
    ("n", Decimal("3.14159265358979323846264338327950288419716939937510"), None),
    ("n", Decimal("NaN"), None),
    ("ts", NAIVE, None),
    ("ts", datetime.datetime(1, 1, 1), None),
    ("tstz", AWARE, None),
    ("tstz", datetime.datetime(2024, 7, 1, tzinfo=UTC), None),
    ("d", datetime.date(2000, 2, 29), None),
    ("b", False, None),
    ("u", "6f1e1c9e-0c3e-4a7c-9a53-34fbd3cc0d86", None),
    ("j", psycopg2.extras.Json(JSON_DOC), JSON_DOC),
    ("j", psycopg2.extras.Json([]), []),
    ("ai", [1, 2, 3], None),
    ("ai", [], None),
    ("at", ["a", None, "c", "q\"uo'te", "", "{}"], None),
]


@pytest.mark.parametrize(
    ("col", "value", "expected"),
    ROUND_TRIP,
    ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(ROUND_TRIP)],
)
def test_round_trip(
    db: Database, raw: Raw, scratch: str, col: str, value: Any, expected: Any
) -> None:
    want = value if expected is None else expected
    row = db.insert(scratch, {"k": 1, col: value}, returning="*")
    assert _same(want, row[col])
    stored = raw.one(
        sql.SQL("SELECT {} FROM scratch_values WHERE k = 1").format(sql.Identifier(col))
    )
    assert _same(want, stored)
    found = db.find_one(scratch, {"k": 1}, columns=[col])
    assert found is not None and _same(want, found[col])
    if col == "t":
        assert raw.one("SELECT length(t) FROM scratch_values") == len(value)
        assert db.count(scratch, {"t": value}) == 1
    if col in ("tstz", "ts"):
        assert db.count(scratch, {col: value}) == 1


def test_round_trip_aware_datetime_keeps_the_instant(
    db: Database, raw: Raw, scratch: str
) -> None:
    db.insert(scratch, {"k": 1, "tstz": AWARE})
    stored = raw.one("SELECT extract(epoch FROM tstz) FROM scratch_values")
    assert float(stored) == pytest.approx(AWARE.timestamp(), abs=1e-6)


NUL_TEXT = "abc\x00def"


def test_nul_in_insert_is_a_clear_data_error(
    db: Database, raw: Raw, scratch: str
) -> None:
    with pytest.raises(DataError) as err:
        db.insert(scratch, {"k": 1, "t": NUL_TEXT})
    assert "NUL" in str(err.value)
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_nul_in_insert_many_copy_path(db: Database, raw: Raw, scratch: str) -> None:
    with pytest.raises(DataError):
        db.insert_many(scratch, [{"k": 1, "t": "ok"}, {"k": 2, "t": NUL_TEXT}])
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_nul_in_insert_many_copy_path_beside_nulls(
    db: Database, raw: Raw, scratch: str
) -> None:
    rows = [{"k": 1, "t": None}, {"k": 2, "t": "ok"}, {"k": 3, "t": NUL_TEXT}]
    with pytest.raises(DataError, match="NUL"):
        db.insert_many(scratch, rows)
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_nul_in_insert_many_execute_values_path(
    db: Database, raw: Raw, scratch: str
) -> None:
    rows = [{"k": 1, "t": "ok", "ai": [1]}, {"k": 2, "t": NUL_TEXT, "ai": [2]}]
    with pytest.raises(DataError):
        db.insert_many(scratch, rows)
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_nul_in_update_and_where(db: Database, raw: Raw, scratch: str) -> None:
    raw.rows("INSERT INTO scratch_values (k, t) VALUES (1, 'abc')")
    with pytest.raises(DataError):
        db.update(scratch, {"t": NUL_TEXT}, {"k": 1})
    assert raw.one("SELECT t FROM scratch_values") == "abc"
    with pytest.raises(DataError):
        db.find_one(scratch, {"t": NUL_TEXT})
    with pytest.raises(DataError):
        db.execute("SELECT %s::text", (NUL_TEXT,))


def test_nul_in_json_is_a_data_error(db: Database, raw: Raw, scratch: str) -> None:
    with pytest.raises(DataError):
        db.insert(scratch, {"k": 1, "j": psycopg2.extras.Json({"a": NUL_TEXT})})
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_nul_in_an_array_element_and_in_upsert(
    db: Database, raw: Raw, scratch: str
) -> None:
    with pytest.raises(DataError, match="NUL"):
        db.insert(scratch, {"k": 1, "at": ["ok", NUL_TEXT]})
    with pytest.raises(DataError, match="NUL"):
        db.insert_many(scratch, [{"k": 1, "at": ["ok"]}, {"k": 2, "at": [NUL_TEXT]}])
    with pytest.raises(DataError, match="NUL"):
        db.upsert(scratch, {"k": 1, "t": NUL_TEXT}, conflict=("k",))
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def _write_paths(
    db: Database, table: str
) -> Dict[str, Callable[[Dict[str, Any]], Any]]:
    """Each way a row reaches the server: one INSERT, COPY, a multi-row INSERT."""
    return {
        "insert": lambda row: db.insert(table, row),
        "copy": lambda row: db.insert_many(table, [row]),
        # An array value takes insert_many off COPY, onto multi-row INSERTs.
        "values": lambda row: db.insert_many(table, [{**row, "ai": [1]}]),
    }


@pytest.mark.parametrize(
    "row",
    [
        {"k": 1, "i": 2**63},
        {"k": 1, "i": -(2**63) - 1},
        {"k": 2**31},
        {"k": 1, "i": 10**30},
    ],
    ids=["bigint+1", "bigint-1", "integer+1", "10**30"],
)
def test_integers_beyond_their_column_are_a_data_error(
    db: Database, raw: Raw, scratch: str, row: Dict[str, Any]
) -> None:
    for path, write in _write_paths(db, scratch).items():
        with pytest.raises(DataError) as err:
            write(row)
        assert err.value.sqlstate == "22003", path  # numeric_value_out_of_range
    raw.rows("INSERT INTO scratch_values (k, i) VALUES (1, 7)")
    with pytest.raises(DataError):
        db.update(scratch, {"i": 2**63}, {"k": 1})
    assert raw.rows("SELECT k, i FROM scratch_values") == [(1, 7)]


def test_infinite_decimals_round_trip_on_every_write_path(
    db: Database, raw: Raw, scratch: str
) -> None:
    # psycopg2's own adapter writes Decimal("Infinity") as 'NaN'::numeric.
    values = [Decimal("Infinity"), Decimal("-Infinity"), Decimal("NaN")]
    for k, write in enumerate(_write_paths(db, scratch).values()):
        for j, value in enumerate(values):
            write({"k": 10 * k + j, "n": value})
    db.update(scratch, {"n": Decimal("-Infinity")}, {"k": 0})
    stored = raw.rows("SELECT k, n::text FROM scratch_values ORDER BY k")
    expected = [(10 * k + j, str(v)) for k in range(3) for j, v in enumerate(values)]
    expected[0] = (0, "-Infinity")
    assert stored == expected
    found = db.find_many(scratch, order_by="k", columns=["n"])
    assert [str(r["n"]) for r in found] == [text for _, text in expected]
    assert db.count(scratch, {"n": Decimal("Infinity")}) == 2


def test_nan_inside_json_is_a_data_error(db: Database, raw: Raw, scratch: str) -> None:
    with pytest.raises(DataError) as err:
        db.insert(scratch, {"k": 1, "j": psycopg2.extras.Json({"a": float("nan")})})
    assert err.value.sqlstate == "22P02"
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_a_dict_for_jsonb_must_be_wrapped_and_the_error_says_how(
    db: Database, raw: Raw, scratch: str
) -> None:
    for write in (
        lambda: db.insert(scratch, {"k": 1, "j": {"a": 1}}),
        lambda: db.insert_many(scratch, [{"k": 1, "j": {"a": 1}}]),
    ):
        with pytest.raises(pgaccess.ProgrammingError, match=r"psycopg2\.extras\.Json"):
            write()
    assert raw.one("SELECT count(*) FROM scratch_values") == 0
    row = db.insert(
        scratch, {"k": 1, "j": psycopg2.extras.Json({"a": 1})}, returning="*"
    )
    assert row["j"] == {"a": 1}


def test_a_value_psycopg2_cannot_adapt_is_a_programming_error(
    db: Database, raw: Raw, scratch: str
) -> None:
    with pytest.raises(pgaccess.ProgrammingError, match="can't adapt type") as err:
        db.insert(scratch, {"k": 1, "t": object()})
    assert "Json" not in str(err.value)  # that hint is for dicts only
    assert raw.one("SELECT count(*) FROM scratch_values") == 0


def test_uuid_objects_on_every_write_path_and_in_where(
    db: Database, raw: Raw, scratch: str
) -> None:
    # psycopg2 alone cannot adapt uuid.UUID (until register_uuid()).
    for k, write in enumerate(_write_paths(db, scratch).values()):
        write({"k": k, "u": uuid.UUID(int=k + 1)})
    assert raw.rows("SELECT k, u::text FROM scratch_values ORDER BY k") == [
        (k, str(uuid.UUID(int=k + 1))) for k in range(3)
    ]
    wanted = [uuid.UUID(int=1), uuid.UUID(int=3), uuid.UUID(int=99)]
    assert db.count(scratch, {"u": wanted}) == 2  # uuid = ANY(uuid[])
    found = db.find_one(scratch, {"u": uuid.UUID(int=2)})
    assert found is not None and found["k"] == 1
    assert db.update(scratch, {"u": uuid.UUID(int=7)}, {"k": 2}) == 1


def test_megabyte_text_through_copy(db: Database, raw: Raw, scratch: str) -> None:
    reverse = MEGABYTE[::-1]  # starts with the escapes COPY must get right
    assert (
        db.insert_many(scratch, [{"k": 1, "t": MEGABYTE}, {"k": 2, "t": reverse}]) == 2
    )
    assert raw.rows("SELECT k, t FROM scratch_values ORDER BY k") == [
        (1, MEGABYTE),
        (2, reverse),
    ]


def test_datetimes_meet_the_session_time_zone_where_the_column_has_none(
    db: Database, scratch: str
) -> None:
    # PostgreSQL's rule, which pgaccess passes through unchanged: an aware datetime
    # written to a `timestamp` column is converted to the session's TimeZone and its
    # offset dropped; a naive one written to `timestamptz` is taken as that TimeZone.
    zone = datetime.timezone(datetime.timedelta(hours=3))
    with db.transaction() as tx:
        tx.execute("SET LOCAL TIME ZONE INTERVAL '+03:00' HOUR TO MINUTE")
        tx.insert(scratch, {"k": 1, "ts": AWARE, "tstz": NAIVE})
        row = tx.find_one(scratch, {"k": 1})
    assert row is not None
    assert row["ts"] == AWARE.astimezone(zone).replace(tzinfo=None)
    assert row["tstz"] == NAIVE.replace(tzinfo=zone)  # the same instant


# -------------------------------------------------------------------- threads
def test_one_database_shared_by_16_threads(db: Database, raw: Raw) -> None:
    threads_n, per_thread = 16, 25
    barrier = threading.Barrier(threads_n)
    errors: List[BaseException] = []
    seen: Dict[int, List[str]] = {}

    def work(t: int) -> None:
        try:
            barrier.wait(timeout=10)
            job_ids = []
            for k in range(per_thread):
                job_ids.append(
                    db.insert("video_job", {"src_hash": f"t{t}-{k}", "priority": t})
                )
                db.insert(
                    "processing_metrics",
                    {"job_id": job_ids[-1], "stage": f"s{t}", "duration_ms": k},
                )
            # Every even job of this thread completed, the odd ones failed.
            assert db.update(
                "video_job", {"status": "completed"}, {"id": job_ids[::2]}
            ) == len(job_ids[::2])
            for jid in job_ids[1::2]:
                assert db.update("video_job", {"status": "failed"}, {"id": jid}) == 1
            mine = db.find_many("video_job", {"priority": t}, order_by="id")
            seen[t] = _hashes(mine)
            assert db.count("processing_metrics", {"stage": f"s{t}"}) == per_thread
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    total = threads_n * per_thread
    assert raw.one("SELECT count(*) FROM video_job") == total
    assert raw.one("SELECT count(DISTINCT src_hash) FROM video_job") == total
    assert raw.one("SELECT count(*) FROM processing_metrics") == total
    completed = threads_n * len(range(0, per_thread, 2))
    assert (
        raw.one("SELECT count(*) FROM video_job WHERE status = 'completed'")
        == completed
    )
    assert (
        raw.one("SELECT count(*) FROM video_job WHERE status = 'failed'")
        == total - completed
    )
    assert raw.one("SELECT count(*) FROM video_job WHERE status = 'queued'") == 0
    per_stage = raw.rows(
        "SELECT stage, count(*), sum(duration_ms) "
        "FROM processing_metrics GROUP BY stage"
    )
    assert sorted(per_stage) == sorted(
        (f"s{t}", per_thread, float(sum(range(per_thread)))) for t in range(threads_n)
    )
    for t in range(threads_n):
        assert seen[t] == [f"t{t}-{k}" for k in range(per_thread)]
    assert db.pool.stats()["in_use"] == 0


# ------------------------------------------------- nothing doubled by a retry
def test_execute_write_whose_reply_is_lost_is_not_retried(
    proxy_db: Database, fault_proxy: Any, raw: Raw, db: Database
) -> None:
    # The control: an INSERT whose reply is lost ran once; pgaccess says the outcome
    # is unknown and does not run it again.
    fault_proxy.drop_after("lost-reply-insert")
    with pytest.raises(pgaccess.CommitOutcomeUnknown):
        proxy_db.execute(
            "INSERT INTO video_job (src_hash) "
            "SELECT 'ins-' || gen_random_uuid() /* lost-reply-insert */"
        )
    assert raw.one("SELECT count(*) FROM video_job WHERE src_hash LIKE 'ins-%%'") == 1


def test_execute_data_modifying_with_is_not_retried_as_a_read(
    proxy_db: Database, fault_proxy: Any, raw: Raw, db: Database
) -> None:
    # WITH ... INSERT ... SELECT starts like a read but writes: after a lost reply it
    # must not be re-run (a second row), whatever its first word.
    fault_proxy.drop_after("lost-reply-cte")
    with pytest.raises(pgaccess.OperationalError):
        proxy_db.execute(
            "WITH ins AS (INSERT INTO video_job (src_hash) "
            "SELECT 'cte-' || gen_random_uuid() RETURNING id) "
            "SELECT id FROM ins /* lost-reply-cte */"
        )
    assert raw.one("SELECT count(*) FROM video_job WHERE src_hash LIKE 'cte-%%'") == 1


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("input_path", "/plain/text"),
        ("run_after", datetime.datetime(2024, 5, 1, 12, 0)),  # naive, as now() gives
        ("run_after", datetime.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
    ],
    ids=["text", "naive-datetime", "aware-datetime"],
)
def test_insert_whose_reply_is_lost_returns_its_own_row(
    proxy_db: Database,
    fault_proxy: Any,
    raw: Raw,
    db: Database,
    column: str,
    value: Any,
) -> None:
    # The first attempt landed; the retry must recognise the row as its own (the
    # values it holds are the ones sent), not report a conflict, and not write twice.
    fault_proxy.drop_after('INSERT INTO "video_job"')
    jid = proxy_db.insert("video_job", {"src_hash": "lost", column: value})
    assert fault_proxy.drops == 1
    assert raw.rows("SELECT id FROM video_job") == [(jid,)]
