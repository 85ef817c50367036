"""The throughput chart, rendered on the server as inline SVG (no script, no fetch).

Presentation attributes and classes only, never ``style=``: the page's
Content-Security-Policy allows no inline styles.
"""

from __future__ import annotations

import datetime
import math
from html import escape
from typing import List, Sequence, Tuple

__all__ = ["throughput_svg"]

#: (minute, completed, failed) for each minute of the chart, oldest first.
Point = Tuple[datetime.datetime, int, int]

WIDTH = 760
HEIGHT = 180
LEFT = 44  # room for the y labels
BOTTOM = 24  # room for the x labels
TOP = 10


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^k at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power  # pragma: no cover (the loop always returns)


def throughput_svg(points: Sequence[Point]) -> str:
    """A stacked bar per minute (completed, failed), a tooltip per bar, y gridlines."""
    n = max(len(points), 1)
    top = _nice_ceiling(max((c + f for _, c, f in points), default=0))
    plot_w = WIDTH - LEFT - 4
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / n
    bar = max(slot - 2.0, 1.0)
    parts: List[str] = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'role="img" aria-label="jobs finished per minute" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    for i in range(3):  # gridlines at 0, top/2, top
        share = i / 2
        y = TOP + plot_h * (1 - share)
        label = top * share
        text = f"{label:g}" if label != int(label) else str(int(label))
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - 4}" '
            f'y2="{y:.1f}"/><text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{escape(text)}</text>'
        )
    for i, (minute, completed, failed) in enumerate(points):
        x = LEFT + i * slot + 1
        h_done = plot_h * completed / top
        h_fail = plot_h * failed / top
        y_done = TOP + plot_h - h_done
        tip = escape(f"{minute:%H:%M}: {completed} completed, {failed} failed")
        parts.append(f"<g><title>{tip}</title>")
        if completed:
            parts.append(
                f'<rect class="done" x="{x:.1f}" y="{y_done:.1f}" '
                f'width="{bar:.1f}" height="{h_done:.1f}"/>'
            )
        if failed:
            parts.append(
                f'<rect class="fail" x="{x:.1f}" y="{y_done - h_fail:.1f}" '
                f'width="{bar:.1f}" height="{h_fail:.1f}"/>'
            )
        if not completed and not failed:  # a hover target for empty minutes
            parts.append(
                f'<rect class="empty" x="{x:.1f}" y="{TOP}" width="{bar:.1f}" '
                f'height="{plot_h}"/>'
            )
        parts.append("</g>")
        last = i == len(points) - 1
        if i % 15 == 0 or last:
            anchor, at = ("end", x + bar) if last else ("start", x)
            parts.append(
                f'<text class="axis" x="{at:.1f}" y="{HEIGHT - 6}" '
                f'text-anchor="{anchor}">{escape(f"{minute:%H:%M}")}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
