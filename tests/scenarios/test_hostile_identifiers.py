"""Hostile identifiers never reach the server (issue 7, item 13).

Hypothesis draws names built from what breaks SQL: quotes, semicolons, comments,
whitespace, control characters, NUL, ``%``, ``.``, over-long and non-ASCII names.
Each name carries a marker of its own. Every facade method, in every place a name can
take (``support.sites``), must raise ``InvalidQuery``; ``order_by``, ``limit`` and
``offset`` are fuzzed the same way. The server is one of this module's own, with
``log_statement = 'all'``: at the end no line of its log may contain a marker, while
a marker sent on purpose, as a value, is found there.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dedicated import Dedicated, dedicated_server
from support.sites import COLUMN_SITES, ORDER_SITES, SAVEPOINT_SITES, TABLE_SITES

from pgaccess import Database, InvalidQuery

# One xdist worker runs the module (setup.cfg: --dist loadgroup), so one server.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("logged_server")]

EXAMPLES = 1000

# The documented rules, written out here independently of sql.py: a name is an ASCII
# letter or _, then letters, digits and _, at most 63 bytes; a table may be
# schema.name; an order_by term is a name with an optional '-' before it, or a
# direction and NULLS FIRST/LAST after it, and whitespace around.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
ORDER_TERM = re.compile(
    r"\s*(?:-\s*)?[A-Za-z_][A-Za-z0-9_]{0,62}(?:\s+(?:asc|desc))?"
    r"(?:\s+nulls\s+(?:first|last))?\s*",
    re.IGNORECASE,
)

FRAGMENTS = [
    "'",
    '"',
    "''",
    '""',
    ";",
    "; DROP TABLE video_job; --",
    "--",
    "/*",
    "*/",
    " ",
    "\t",
    "\n",
    "\r",
    "\x0b",
    "\x0c",
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "%",
    "%s",
    "%(x)s",
    "%%",
    ".",
    "..",
    "(",
    ")",
    ",",
    "*",
    "::text",
    "$1",
    "\\",
    "`",
    "é",
    "ß",
    "ſ",  # noqa: RUF001 (a long s: upper-cases to S)
    "日本",
    "\u200b",
    "\u202e",
    "\U0001f3ac",
]

_markers = iter(range(1, 10**9))


def _marker(_: Any) -> str:
    return f"hxq{next(_markers):06d}"


MARKERS = st.builds(_marker, st.none())
VALID_PIECES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@st.composite
def hostile_names(draw: Any) -> str:
    """A name with a marker in it that no rule above accepts as a column name."""
    marker = draw(MARKERS)
    if draw(st.integers(0, 9)) == 0:  # over-long: valid characters, too many
        filler = draw(st.integers(64 - len(marker), 300 - len(marker)))
        return "a" * filler + marker
    pieces = draw(
        st.lists(st.one_of(st.sampled_from(FRAGMENTS), VALID_PIECES), max_size=4)
    )
    hostile = draw(st.sampled_from(FRAGMENTS))
    pieces.insert(draw(st.integers(0, len(pieces))), hostile)
    pieces.insert(draw(st.integers(0, len(pieces))), marker)
    name = "".join(pieces)
    if NAME.fullmatch(name):  # pragma: no cover (every FRAGMENT is a foreign char)
        name += "\x00"
    return name


def is_valid_table(name: str) -> bool:
    parts = name.split(".")
    return len(parts) <= 2 and all(NAME.fullmatch(p) for p in parts)


@pytest.fixture(scope="module")
def logged() -> Iterator[Dedicated]:
    with dedicated_server({"log_statement": "all"}) as server:
        yield server


@pytest.fixture(scope="module")
def logged_db(logged: Dedicated) -> Iterator[Database]:
    name = logged.new_database("hostile")
    with Database(dsn=logged.dsn(name), maxconn=2, timeout=10) as db:
        db.insert("video_job", {"src_hash": "seed", "input_path": "/seed"})
        yield db


def server_log(server: Dedicated) -> str:
    return (Path(server.server.datadir) / "server.log").read_text(errors="replace")


def markers_in(text: str) -> List[str]:
    return re.findall(r"hxq\d{6}", text)


def assert_never_logged(
    server: Dedicated,
    db: Database,
    examples: int,
    drawn: List[str],
    at_least: int = EXAMPLES // 2,
) -> None:
    """No statement in the server's log holds a drawn marker; one sent is found."""
    # Hypothesis ran every example (it stops early when a strategy has no more to
    # give), and they carried markers.
    assert examples >= EXAMPLES
    assert len(set(drawn)) >= at_least
    canary = _marker(None)
    assert db.find_one("video_job", {"src_hash": canary}) is None
    log = server_log(server)
    assert canary in markers_in(log)  # the log records what is sent, values too
    leaked = sorted(set(markers_in(log)) & set(drawn))
    assert leaked == [], f"hostile input reached the server: {leaked[:10]}"
    assert db.count("video_job") == 1  # the seed row, alone, as it was


def expect_rejected(where: str, call: Callable[..., Any], *args: Any) -> None:
    try:
        result = call(*args)
    except InvalidQuery:
        return
    pytest.fail(f"{where}: accepted, returned {result!r:.80}")


SETTINGS = settings(max_examples=EXAMPLES, deadline=None)


def test_hostile_names_are_rejected_everywhere(
    logged: Dedicated, logged_db: Database
) -> None:
    drawn: List[str] = []
    examples: List[Any] = []

    @SETTINGS
    @given(name=hostile_names())
    def rejected_everywhere(name: str) -> None:
        examples.append(name)
        drawn.extend(markers_in(name))
        for site, call in COLUMN_SITES.items():
            if site in ORDER_SITES and ORDER_TERM.fullmatch(name):
                continue  # " name " is a valid order_by term, tested elsewhere
            expect_rejected(f"{site}({name!r})", call, logged_db, name)
        if not is_valid_table(name):
            for site, call in TABLE_SITES.items():
                expect_rejected(f"{site}({name!r})", call, logged_db, name)
        with logged_db.transaction() as tx:
            for site, call in SAVEPOINT_SITES.items():
                expect_rejected(f"{site}({name!r})", call, tx, name)
            expect_rejected("tx.insert", tx.insert, "video_job", {name: "x"})
            # Nothing reached the server: the transaction is not aborted.
            assert tx.count("video_job") == 1

    rejected_everywhere()
    assert_never_logged(logged, logged_db, len(examples), drawn)


@st.composite
def hostile_order_by(draw: Any) -> Any:
    """An order_by, a string or a list, with at least one term no rule accepts."""
    bad = draw(
        st.one_of(
            hostile_names(),
            # A valid term with hostile text after it, or a valid name with a hostile
            # direction: "id desc; DROP ...", "id nulls first --".
            st.builds(
                lambda term, frag, marker: f"{term}{frag}{marker}",
                st.sampled_from(["id", "-id", "id desc", "id nulls first", " id "]),
                st.sampled_from(FRAGMENTS),
                MARKERS,
            ),
            st.builds(
                lambda marker, word: f"id {word} {marker}",
                MARKERS,
                st.sampled_from(["asc", "desc", "nulls", "collate", "using"]),
            ),
        ).filter(lambda t: not ORDER_TERM.fullmatch(t))
    )
    if draw(st.booleans()):
        return bad
    good = draw(st.lists(st.sampled_from(["id", "-status", "created_at desc"])))
    good.insert(draw(st.integers(0, len(good))), bad)
    return good


def test_hostile_order_by_is_rejected(logged: Dedicated, logged_db: Database) -> None:
    drawn: List[str] = []
    examples: List[Any] = []

    @SETTINGS
    @given(order_by=hostile_order_by())
    def rejected(order_by: Any) -> None:
        examples.append(order_by)
        drawn.extend(markers_in(repr(order_by)))
        where = f"order_by={order_by!r}"
        find_many, find_one = logged_db.find_many, logged_db.find_one
        expect_rejected(where, lambda: find_many("video_job", order_by=order_by))
        expect_rejected(
            where, lambda: find_one("video_job", {"id": 1}, order_by=order_by)
        )

    rejected()
    assert_never_logged(logged, logged_db, len(examples), drawn)


LIMITS = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=2**63),  # beyond bigint: the server would refuse it
    st.booleans(),
    st.floats(),
    st.decimals(),
    st.builds(str, st.integers(0, 100)),
    st.binary(max_size=8),
    st.lists(st.integers(0, 5), max_size=2),
)
# Text that starts like a number: each example draws one beside a value above.
MARKED_LIMITS = st.builds(lambda m, f: f"1{f}{m}", MARKERS, st.sampled_from(FRAGMENTS))


def test_hostile_limit_and_offset_are_rejected(
    logged: Dedicated, logged_db: Database
) -> None:
    drawn: List[str] = []
    examples: List[Any] = []

    @SETTINGS
    @given(value=LIMITS, text=MARKED_LIMITS)
    def rejected(value: Any, text: str) -> None:
        examples.append(value)
        drawn.extend(markers_in(text))
        for candidate in (value, text):
            for what in ("limit", "offset"):  # each both ways: 1,000 examples each
                expect_rejected(
                    f"{what}={candidate!r}",
                    partial(
                        logged_db.find_many,
                        "video_job",
                        order_by="id",
                        **{what: candidate},
                    ),
                )

    rejected()
    assert_never_logged(logged, logged_db, len(examples), drawn)


def test_valid_limits_still_work(logged_db: Database) -> None:
    # The control for the test above: the same call takes what is valid.
    assert logged_db.find_many("video_job", order_by="id", limit=0) == []
    assert len(logged_db.find_many("video_job", order_by="id", limit=2**63 - 1)) == 1
    assert logged_db.find_many("video_job", order_by="id", offset=1) == []
