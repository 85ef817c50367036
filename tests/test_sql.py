"""Identifiers are validated and quoted, values are always bound: hostile input.

Every hostile name must raise ``InvalidQuery`` (a ``ValueError`` too) before any SQL
is sent, through every facade method and in every position a name can take, and the
database must be exactly as it was. Hostile values must round-trip exactly.
"""

from __future__ import annotations

import contextlib
import re
from decimal import Decimal
from typing import Any, Callable, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from support.raw import Raw
from support.sites import (
    COLUMN_SITES,
    ORDER_SITES,
    SAVEPOINT_SITES,
    TABLE_SITES,
    WHOLE_ARGUMENT_SITES,
)

from pgaccess import Database, InvalidQuery, UnknownColumn, UnknownTable

# The documented rule for a name (sql.py): ASCII letter or _, then letters, digits, _;
# at most 63 bytes. A table may be schema.name.
VALID_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@pytest.fixture
def seeded(db: Database, raw: Raw) -> Database:
    """One row in each pipeline table, so that a destructive statement would show."""
    job = raw.one(
        "INSERT INTO video_job (src_hash, input_path) "
        "VALUES ('seed', '/seed') RETURNING id"
    )
    raw.rows(
        "INSERT INTO highlight (job_id, start_time, end_time, score) "
        "VALUES (%s, 0, 1, 1)",
        (job,),
    )
    raw.rows(
        "INSERT INTO processing_metrics (job_id, stage, duration_ms) "
        "VALUES (%s, 's', 1)",
        (job,),
    )
    return db


# ------------------------------------------------------------------ hostile names
HOSTILE_COLUMNS: List[Any] = [
    'status"',
    '"status"',
    "sta'tus",
    'x"; DROP TABLE video_job; --',
    "status; DROP TABLE video_job",
    "status) ; DELETE FROM video_job; --",
    "status -- comment",
    "status/*c*/",
    "/*c*/status",
    "sta tus",
    "sta\ttus",
    "sta\ntus",
    "sta\x01tus",
    "status\x7f",
    "status\x00",
    "status\x00evil",
    "\x00",
    "sta%tus",
    "status%s",
    "%s",
    "%(x)s",
    "status%%",
    "video_job.status",
    "public.video_job.status",
    ".status",
    "status.",
    "a" * 64,
    "b" * 200,
    "é",
    "statüs",
    "ſtatus",  # noqa: RUF001 (a long s, on purpose)
    "status\u200b",
    "日本",
    "",
    "1status",
    "9",
    "$1",
    "status::text",
    "lower(status)",
    "status,id",
    "*",
    5,
    None,
    b"status",
    1.5,
    True,
    ("status",),
    ("status", "null"),
    ("status", "="),
]
# Valid order_by terms (its grammar trims whitespace and takes a direction and a
# minus), but hostile as names everywhere else.
PADDED = [" status", "status ", "status\t", "\nstatus", "status desc", "- status"]

HOSTILE_TABLES: List[Any] = [
    'video_job"',
    'video_job"; DROP TABLE highlight; --',
    "video_job; DROP TABLE highlight",
    "video_job --",
    "video_job/**/",
    " video_job",
    "video_job ",
    "video\tjob",
    "video_job\n",
    "video_job\x00",
    "video_job\x00; DROP TABLE highlight",
    "video%job",
    "video_job%s",
    "%(t)s",
    "public.video_job.id",
    "public..video_job",
    ".video_job",
    "video_job.",
    "public.",
    ".",
    "public.video_job; DROP TABLE highlight",
    '"public"."video_job"',
    "a" * 64,
    "public." + "a" * 64,
    "vidéo_job",
    "video_job\u200b",
    "",
    "1video_job",
    "video_job(id)",
    5,
    None,
    b"video_job",
    1.5,
    ("video_job",),
]


def _names_for(site: str) -> List[Any]:
    names = list(HOSTILE_COLUMNS)
    if site not in ORDER_SITES:
        names += PADDED
    if site in WHOLE_ARGUMENT_SITES:
        names = [n for n in names if n is not None and not isinstance(n, tuple)]
        if "returning" in site:
            names.remove("*")
    return names


def _attempt_each(raw: Raw, call: Callable[[Any], Any], names: List[Any]) -> List[str]:
    """Try every name; list what did not raise InvalidQuery or changed the database."""
    problems = []
    before = raw.snapshot()
    for name in names:
        try:
            result = call(name)
        except InvalidQuery as exc:
            assert isinstance(exc, ValueError)
            outcome = None
        except Exception as exc:
            outcome = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        else:
            outcome = f"accepted, returned {result!r:.60}"
        after = raw.snapshot()
        if after != before:
            outcome = (outcome or "raised InvalidQuery") + ", and CHANGED THE DATABASE"
            before = after
        if outcome is not None:
            problems.append(f"{name!r}: {outcome}")
    return problems


@pytest.mark.parametrize("site", sorted(COLUMN_SITES))
def test_hostile_column_names(seeded: Database, raw: Raw, site: str) -> None:
    problems = _attempt_each(
        raw, lambda n: COLUMN_SITES[site](seeded, n), _names_for(site)
    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("site", sorted(TABLE_SITES))
def test_hostile_table_names(seeded: Database, raw: Raw, site: str) -> None:
    problems = _attempt_each(
        raw, lambda t: TABLE_SITES[site](seeded, t), HOSTILE_TABLES
    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "site", ["insert-data", "update-data", "find_many-where", "find_one-order_by"]
)
def test_hostile_names_inside_a_transaction_send_nothing(
    seeded: Database, raw: Raw, site: str
) -> None:
    before = raw.snapshot()
    with seeded.transaction() as tx:
        tx.insert("video_job", {"src_hash": "in-tx"})
        problems = _attempt_each(
            raw, lambda n: COLUMN_SITES[site](tx, n), _names_for(site)
        )
        assert not problems, "\n".join(problems)
        # Nothing reached the server: the transaction is not aborted.
        assert tx.count("video_job") == 2
    assert raw.one("SELECT count(*) FROM video_job WHERE src_hash = 'in-tx'") == 1
    assert raw.snapshot()[0] == before[0]


@pytest.mark.parametrize("site", sorted(SAVEPOINT_SITES))
def test_hostile_savepoint_names(seeded: Database, raw: Raw, site: str) -> None:
    names = [
        n for n in HOSTILE_COLUMNS + PADDED if n is not None or site != "savepoint"
    ]
    with seeded.transaction() as tx:
        tx.savepoint("good")
        tx.insert("video_job", {"src_hash": "in-tx"})
        problems = _attempt_each(raw, lambda n: SAVEPOINT_SITES[site](tx, n), names)
        tx.rollback_to_savepoint("good")  # the transaction and savepoint are intact
        tx.insert("video_job", {"src_hash": "after"})
    assert not problems, "\n".join(problems)
    assert raw.rows("SELECT src_hash FROM video_job ORDER BY id") == [
        ("seed",),
        ("after",),
    ]


def test_valid_names_pass_the_same_sites(seeded: Database, raw: Raw) -> None:
    # The control: the sites above work with a real name, so their rejections are
    # the names' doing.
    for site, call in sorted(COLUMN_SITES.items()):
        try:
            call(seeded, "input_path")
        except InvalidQuery as exc:  # pragma: no cover
            pytest.fail(f"{site} rejected a valid name: {exc}")
        except Exception:  # constraint errors are fine: the statement was sent
            pass
    assert seeded.find_one("public.video_job", {"src_hash": "seed"}) is not None


# ----------------------------------------------------------------- hostile values
HOSTILE_VALUES = [
    'x"; DROP TABLE video_job; --',
    "'; DROP TABLE video_job; --",
    "' OR '1'='1",
    "%s",
    "%(x)s",
    "%",
    "%%",
    "\\",
    "\\N",
    "\\.",
    "$$",
    "$tag$ DROP $tag$",
    "--",
    "/*",
    "\t\n\r",
    "\x01\x1f\x7f",
    "é日本🎬\u202e\ufeff",
    " ",
    "",
    "NULL",
    "null",
    "E'\\x00'",
    "\\x00",
    "a" * 10_000,
]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=lambda v: repr(v)[:30])
def test_hostile_values_round_trip(seeded: Database, raw: Raw, value: str) -> None:
    db = seeded
    jid = db.insert("video_job", {"src_hash": "v", "input_path": value})
    assert raw.one("SELECT input_path FROM video_job WHERE id = %s", (jid,)) == value
    assert db.find_one("video_job", {"input_path": value})["id"] == jid
    assert db.count("video_job", {"input_path": value}) == 1
    assert db.exists("video_job", {"input_path": [value, "other"]})
    assert (
        db.update("video_job", {"error": value}, {"id": jid, "input_path": value}) == 1
    )
    assert raw.one("SELECT error FROM video_job WHERE id = %s", (jid,)) == value
    assert db.execute("SELECT %s AS v", (value,)) == [{"v": value}]
    assert db.execute("SELECT %(x)s AS v", {"x": value}) == [{"v": value}]
    row = db.upsert("video_job", {"src_hash": "v", "locked_by": value})
    assert row["id"] == jid and row["locked_by"] == value
    # insert_many: COPY text format, and multi-row VALUES.
    assert db.insert_many("video_job", [{"src_hash": "c1", "input_path": value}]) == 1
    ids = db.insert_many(
        "video_job", [{"src_hash": "c2", "input_path": value}], returning="id"
    )
    assert raw.rows(
        "SELECT src_hash FROM video_job WHERE input_path = %s ORDER BY id", (value,)
    ) == [("v",), ("c1",), ("c2",)]
    assert raw.one("SELECT src_hash FROM video_job WHERE id = %s", (ids[0],)) == "c2"
    assert db.delete("video_job", {"input_path": value}) == 3
    assert raw.rows("SELECT src_hash FROM video_job") == [("seed",)]


def test_hostile_value_as_src_hash_key(seeded: Database, raw: Raw) -> None:
    for i, value in enumerate(HOSTILE_VALUES):
        seeded.insert("video_job", {"src_hash": value or f"empty{i}"})
    stored = set(raw.rows("SELECT src_hash FROM video_job"))
    assert stored == {(v or f"empty{i}",) for i, v in enumerate(HOSTILE_VALUES)} | {
        ("seed",)
    }


# ---------------------------------------------------------------------- order_by
INVALID_ORDER_BY: List[Any] = [
    "status; drop",
    "status; DROP TABLE video_job",
    "status desc desc",
    "status asc desc",
    "-status asc",
    "-status desc",
    "--status",
    "-",
    "",
    "   ",
    "1",
    "status collate x",
    'status collate "C"',
    "status nulls",
    "status nulls middle",
    "status desc nulls",
    "status nulls last first",
    "status, id",
    "status,id",
    "(status)",
    "status::text",
    "lower(status)",
    "status + 1",
    "status using <",
    "status -- x",
    "status /* x */",
    "status\x00",
    "status\x00 desc",
    "sta%s",
    "random()",
    "*",
    [],
    (),
    ["status", ""],
    ["status", 5],
    [None],
    ["status; drop"],
    5,
    b"status",
    {"status": "asc"},
]


@pytest.mark.parametrize("order_by", INVALID_ORDER_BY, ids=repr)
def test_invalid_order_by_is_rejected(
    seeded: Database, raw: Raw, order_by: Any
) -> None:
    before = raw.snapshot()
    with pytest.raises(InvalidQuery):
        seeded.find_many("video_job", order_by=order_by)
    with pytest.raises(InvalidQuery):
        seeded.find_one("video_job", {"src_hash": "seed"}, order_by=order_by)
    assert raw.snapshot() == before


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -(2**40),
        True,
        False,
        "5",
        "1; DROP TABLE video_job",
        1.5,
        2.0,
        Decimal(2),
        2**63,
    ],
)
@pytest.mark.parametrize("what", ["limit", "offset"])
def test_invalid_limit_offset_rejected(
    seeded: Database, raw: Raw, what: str, value: Any
) -> None:
    before = raw.snapshot()
    with pytest.raises(InvalidQuery):
        seeded.find_many("video_job", order_by="id", **{what: value})
    assert raw.snapshot() == before


# -------------------------------------------------------------- property tests
def _is_valid_name(name: str) -> bool:
    return VALID_NAME.fullmatch(name) is not None


NAMES = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="ascii"), max_size=70),
    st.from_regex(VALID_NAME, fullmatch=True),
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=NAMES)
def test_any_text_is_a_valid_column_or_rejected(
    db: Database, raw: Raw, name: str
) -> None:
    if not _is_valid_name(name):
        calls = [
            lambda: db.insert("hyp_scratch", {name: "v"}, returning=None),
            lambda: db.insert_many("hyp_scratch", [{name: "v"}]),
            lambda: db.update("hyp_scratch", {name: "v"}, {name: "w"}),
            lambda: db.find_one("hyp_scratch", {name: "v"}),
            lambda: db.find_many("hyp_scratch", columns=[name]),
            lambda: db.count("hyp_scratch", {name: ("!=", "v")}),
        ]
        if not re.search(r"\s", name) and not name.startswith("-"):
            # Otherwise it may be a valid order_by term ("- x", "x desc").
            calls.append(lambda: db.find_many("hyp_scratch", order_by=[name]))
        for call in calls:
            with pytest.raises(InvalidQuery):
                call()
        return
    # A valid name works as a column name, with any case and reserved words.
    ident = sql.Identifier(name)
    raw.rows("DROP TABLE IF EXISTS hyp_scratch")
    raw.rows(sql.SQL("CREATE TABLE hyp_scratch ({} text)").format(ident))
    try:
        db.insert("hyp_scratch", {name: "v1"}, returning=None)
        assert db.insert_many("hyp_scratch", [{name: "v2"}, {name: None}]) == 2
        assert db.find_one("hyp_scratch", {name: "v1"}, columns=[name]) == {name: "v1"}
        assert db.find_many(
            "hyp_scratch", {name: ("!=", "v9")}, order_by="-" + name
        ) == [
            {name: "v2"},
            {name: "v1"},
        ]
        assert db.count("hyp_scratch", {name: None}) == 1
        assert db.update("hyp_scratch", {name: "v3"}, {name: "v2"}) == 1
        stored = raw.rows(
            sql.SQL("SELECT {0} FROM hyp_scratch ORDER BY {0} NULLS LAST").format(ident)
        )
        assert stored == [("v1",), ("v3",), (None,)]
    finally:
        raw.rows("DROP TABLE IF EXISTS hyp_scratch")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    table=st.one_of(
        NAMES,
        st.builds(lambda a, b: f"{a}.{b}", NAMES, NAMES),
    )
)
def test_any_text_is_a_valid_table_name_or_rejected(
    db: Database, raw: Raw, table: str
) -> None:
    parts = table.split(".")
    valid = len(parts) <= 2 and all(_is_valid_name(p) for p in parts)
    if valid:
        quoted = sql.Identifier(*parts).as_string(raw.conn)
        if raw.one("SELECT to_regclass(%s)", (quoted,)) is not None:
            return  # a real table (pg_class, ...): not what this property is about
    expected = UnknownTable if valid else InvalidQuery
    with pytest.raises(expected):
        db.count(table)
    with pytest.raises(expected):
        db.insert(table, {"x": 1})


ORDER_COLUMNS = ["id", "src_hash", "status", "priority", "input_path", "created_at"]


@st.composite
def order_terms(draw: Any) -> Tuple[str, str]:
    """A valid order_by term in a random spelling, and the SQL it must mean."""
    ws = st.text(alphabet=" \t\n", min_size=1, max_size=3)
    opt_ws = st.text(alphabet=" \t\n", max_size=2)
    col = draw(st.sampled_from(ORDER_COLUMNS))
    minus = draw(st.booleans())
    direction = None if minus else draw(st.sampled_from([None, "asc", "desc"]))
    nulls = draw(st.sampled_from([None, "first", "last"]))

    def spell(word: str) -> str:
        return "".join(c.upper() if draw(st.booleans()) else c for c in word)

    term = draw(opt_ws) + ("-" + draw(opt_ws) if minus else "") + col
    meaning = col + (" DESC" if minus else "")
    if direction:
        term += draw(ws) + spell(direction)
        meaning += f" {direction.upper()}"
    if nulls:
        term += draw(ws) + spell("nulls") + draw(ws) + spell(nulls)
        meaning += f" NULLS {nulls.upper()}"
    term += draw(opt_ws)
    return term, meaning


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(terms=st.lists(order_terms(), min_size=1, max_size=3))
def test_order_by_spellings_mean_what_they_say(
    seeded: Database, raw: Raw, terms: List[Tuple[str, str]]
) -> None:
    if raw.one("SELECT count(*) FROM video_job") == 1:
        for i, (s, p, ip) in enumerate(
            [("b", "failed", 2), ("c", "queued", 1), ("d", "queued", None)]
        ):
            raw.rows(
                "INSERT INTO video_job (src_hash, status, priority, input_path, "
                "created_at) VALUES (%s, %s, %s, %s, now() - %s * interval '1 min')",
                (s, p, 1 if ip is None else ip, None if ip is None else f"/{ip}", i),
            )
    order_by = [t for t, _ in terms] + ["id"]
    clause = ", ".join(m for _, m in terms) + ", id"
    expected = [r[0] for r in raw.rows(f"SELECT id FROM video_job ORDER BY {clause}")]
    got = [r["id"] for r in seeded.find_many("video_job", order_by=order_by)]
    assert got == expected


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(order_by=st.one_of(st.text(), st.lists(st.text(), max_size=3)))
def test_order_by_fuzz_is_valid_or_rejected(seeded: Database, order_by: Any) -> None:
    # Rejected before sending, or a well-formed name of no column; nothing else.
    with contextlib.suppress(InvalidQuery, UnknownColumn):
        seeded.find_many("video_job", order_by=order_by, limit=1)
