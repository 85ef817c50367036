"""The command line's tables and the demo's progress: rich on a terminal, plain else."""

from __future__ import annotations

import io
import re
import sys
from typing import Any, Dict, List

import pytest

from pgaccess import terminal

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LONG = (
    "SELECT * FROM video_job WHERE status = %s AND run_after <= now() "
    "ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
COLUMNS = terminal.columns_of(">calls", ">total ms", "statement")
ROWS: List[List[Any]] = [[3, "1.2", LONG], [10000, "20000.5", "SELECT 1"]]


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGACCESS_PLAIN", raising=False)
    monkeypatch.setenv("COLUMNS", "60")


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGACCESS_PLAIN", raising=False)
    monkeypatch.setenv("COLUMNS", "100")


def lines(out: io.StringIO) -> List[str]:
    return ANSI.sub("", out.getvalue()).splitlines()


def test_plain_columns_are_as_wide_as_their_widest_cell() -> None:
    out = io.StringIO()  # not a terminal: plain, whatever is installed
    stages = terminal.columns_of("stage", ">count")
    terminal.table(out, "stages", stages, [["a_very_long_stage", 5], ["x", 12345]])
    got = lines(out)
    assert got[0] == "stages"
    # Numbers right-aligned on one edge, names left-aligned, nothing cut.
    assert [len(line) for line in got[1:]] == [len(got[1])] * 3
    assert got[2].startswith("  a_very_long_stage") and got[2].endswith("    5")
    assert got[3].endswith("12345")
    out = io.StringIO()
    terminal.table(out, "statements", COLUMNS, ROWS)
    assert LONG in out.getvalue()  # a log keeps the whole statement


def test_rich_tables_fit_the_terminal_and_cut_the_last_column(narrow: None) -> None:
    pytest.importorskip("rich")
    out = Terminal()
    terminal.table(out, "statements", COLUMNS, ROWS)
    got = lines(out)
    assert "┏" in got[1]  # drawn by rich
    assert max(len(line) for line in got) <= 60
    first = next(line for line in got if "SELECT * FROM" in line)
    assert "…" in first and first.split("│")[1].strip() == "3"
    assert any("10000" in line and "20000.5" in line for line in got)


@pytest.mark.parametrize("why", ["no rich", "PGACCESS_PLAIN"])
def test_a_terminal_without_rich_or_with_plain_set_gets_plain_text(
    narrow: None, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    if why == "no rich":
        monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails
    else:
        monkeypatch.setenv("PGACCESS_PLAIN", "1")
    out = Terminal()
    terminal.table(out, "statements", COLUMNS, ROWS)
    assert "┏" not in out.getvalue() and LONG in out.getvalue()


def row(done: int, failed: int = 0) -> Dict[str, int]:
    return {"completed": done - failed, "failed": failed, "retried": 1}


def test_plain_progress_writes_lines_to_a_log() -> None:
    out = io.StringIO()
    with terminal.progress(out, 10) as bar:
        assert type(bar) is terminal.Progress
        bar.show(row(3))  # too soon after the start for a log line
        bar.show(row(10, failed=2), final=True)
    # One line, the final one: a log gets a line every LINE_EVERY seconds.
    assert len(out.getvalue().splitlines()) == 1
    assert "10/10 done, 2 failed, 1 retried" in out.getvalue()


def test_rich_progress_is_a_live_view_on_a_terminal(wide: None) -> None:
    pytest.importorskip("rich")
    out = Terminal()
    with terminal.progress(out, 10) as bar:
        assert type(bar) is not terminal.Progress
        bar.show(row(4))
        bar.show(row(10, failed=2), final=True)
    text = ANSI.sub("", out.getvalue())
    assert "10/10" in text and "2 failed, 1 retried" in text and "jobs/s" in text
    bar.close()  # closing twice is harmless
