"""What the command line draws: tables and the demo's progress, with rich or plain.

With the ``cli`` extra (``pip install 'pgaccess[cli]'``, which brings ``rich``) and a
terminal for output, tables are rich tables fitted to the terminal's width (long
statements are cut with an ellipsis, not wrapped into the next row) and the demo's
progress is a live view (bar, counts, rate, time remaining). Without
rich, or when the output is a pipe or a file, or with ``PGACCESS_PLAIN=1``, the same
things are plain text: columns as wide as their widest cell, and progress lines every
few seconds (redrawn in place on a terminal). Logs and tests read the plain form.
"""

from __future__ import annotations

import os
from time import perf_counter
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple, Type

__all__ = ["Column", "Progress", "console", "progress", "table"]

#: A column: its heading, and "left" or "right".
Column = Tuple[str, str]


def console(out: TextIO) -> Any:
    """A ``rich.console.Console`` writing to ``out`` when rich is installed and
    ``out`` is a terminal (and ``PGACCESS_PLAIN`` is not set); None otherwise."""
    if os.environ.get("PGACCESS_PLAIN") or not _isatty(out):
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=out, highlight=False)


def _isatty(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


# ------------------------------------------------------------------ tables
def table(
    out: TextIO,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Print ``rows`` under ``columns``: a rich table, or aligned plain text."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    header = any(name for name, _ in columns)  # a key-value table has none
    widths = [
        max([len(name)] + [len(row[i]) for row in cells])
        for i, (name, _) in enumerate(columns)
    ]
    rich = console(out)
    if rich is not None:
        from rich.table import Table

        grid = Table(title=title, title_justify="left", show_header=header)
        # Borders and padding take 3 characters per column, plus one.
        room = rich.width - sum(widths[:-1]) - 3 * len(columns) - 1
        for i, (name, justify) in enumerate(columns):
            last = i == len(columns) - 1
            # Every column keeps its width but the last (statements, error texts),
            # which gets what is left of the terminal and is cut with an ellipsis.
            grid.add_column(
                name,
                justify="right" if justify == "right" else "left",
                overflow="ellipsis",
                no_wrap=True,
                min_width=None if last else widths[i],
                max_width=max(room, 8) if last else None,
            )
        for row in cells:
            grid.add_row(*row)
        rich.print(grid)
        return
    print(title, file=out)
    for row in [[name for name, _ in columns]] * header + cells:
        parts = [
            cell.rjust(w) if justify == "right" else cell.ljust(w)
            for cell, w, (_, justify) in zip(row, widths, columns)
        ]
        print(("  " + "  ".join(parts)).rstrip(), file=out)


# ---------------------------------------------------------------- progress
class Progress:
    """The demo's progress: plain text, redrawn in place on a terminal, lines else.

    ``with progress(out, total) as bar: bar.show(row)``; ``row`` holds the counts
    ``completed``, ``failed`` and ``retried``. ``show(row, final=True)`` draws the
    last state.
    """

    WIDTH = 30
    TTY_EVERY = 0.1
    LINE_EVERY = 2.0

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.tty = _isatty(out)
        self.started = perf_counter()
        # A terminal shows the bar at once; a log gets its first line after a while.
        self.last = 0.0 if self.tty else self.started
        self.drawn = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop drawing (a live view gives the terminal back)."""

    def show(self, row: Dict[str, Any], final: bool = False) -> None:
        now = perf_counter()
        if not final and now - self.last < (
            self.TTY_EVERY if self.tty else self.LINE_EVERY
        ):
            return
        self.last = now
        done = int(row["completed"]) + int(row["failed"])
        frac = done / self.total if self.total else 1.0
        filled = int(frac * self.WIDTH)
        rate = done / max(now - self.started, 1e-9)
        text = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac:4.0%} "
            f"{done}/{self.total} done, {row['failed']} failed, "
            f"{row['retried']} retried, {rate:.0f} jobs/s"
        )
        if self.tty:
            # Pad to the longest line drawn, so a shorter one leaves nothing behind.
            self.drawn = max(self.drawn, len(text))
            self.out.write("\r" + text.ljust(self.drawn) + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()


class _RichProgress(Progress):
    """The same as a rich live view: bar, counts, rate and time remaining."""

    def __init__(self, out: TextIO, total: int, rich: Any) -> None:
        super().__init__(out, total)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Live

        self._live = Live(
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed, {task.fields[retried]} retried"),
            TextColumn("{task.fields[rate]:.0f} jobs/s"),
            TimeRemainingColumn(),
            console=rich,
        )
        self._task = self._live.add_task(
            "demo", total=total, failed=0, retried=0, rate=0
        )
        self._live.start()

    def close(self) -> None:
        self._live.stop()

    def show(self, row: Dict[str, Any], final: bool = False) -> None:
        done = int(row["completed"]) + int(row["failed"])
        rate = done / max(perf_counter() - self.started, 1e-9)
        self._live.update(
            self._task,
            completed=done,
            failed=int(row["failed"]),
            retried=int(row["retried"]),
            rate=rate,
            refresh=final,
        )
        if final:
            self.close()


def progress(out: TextIO, total: int) -> Progress:
    """The demo's progress on ``out``: a rich live view where :func:`console` gives
    one, plain text otherwise."""
    rich = console(out)
    return Progress(out, total) if rich is None else _RichProgress(out, total, rich)


def columns_of(*spec: str) -> List[Column]:
    """``columns_of("stage", ">count")``: a leading ``>`` right-aligns."""
    return [(s[1:], "right") if s.startswith(">") else (s, "left") for s in spec]
