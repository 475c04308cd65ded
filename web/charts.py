"""Small line charts drawn as SVG on the server, for the dashboard.

No JavaScript and no chart library: the page stays one request, works without a network
(no CDN), and a test can read the drawn numbers straight from the HTML.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

WIDTH, HEIGHT = 360, 150
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 22


@dataclass(frozen=True)
class Series:
    """One line: a label for the legend, one value per time (None where there is nothing to show)."""

    label: str
    values: Sequence[float | None]
    css_class: str = "s1"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10^n at or above `value`, so the top of the axis is a round number."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10 * power


def _label(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:g}%"
    if value >= 1000:
        return f"{value / 1000:g}k{(' ' + unit) if unit else ''}"
    return f"{value:g}{(' ' + unit) if unit else ''}"


def _segments(points: list[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive points; a None (no data in that bucket) breaks the line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for point in points:
        if point is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(point)
    return [run for run in runs if run]


def line_chart(
    times: Sequence[datetime],
    series: Sequence[Series],
    *,
    title: str,
    unit: str = "",
    y_max: float | None = None,
    empty_text: str = "nothing yet",
    chart_id: str | None = None,
) -> Markup:
    """An SVG line chart of `series` over `times` (bucket starts, oldest first), with its title and legend.

    Each drawn point carries a <title> (time and value) so hovering shows the figure.
    """
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [v for s in series for v in s.values if v is not None]
    top = y_max if y_max is not None else nice_ceiling(max(values, default=0.0))
    count = len(times)

    def x(index: int) -> float:
        return LEFT + (plot_w * index / (count - 1) if count > 1 else plot_w / 2)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - min(value, top) / top)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        level = TOP + plot_h * (1 - fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{level:.1f}" y2="{level:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 4}" y="{level + 3:.1f}" text-anchor="end">'
            f"{escape(_label(top * fraction, unit))}</text>"
        )
    if count:
        ends = ((0, "start"), (count - 1, "end")) if count > 1 else ((0, "middle"),)
        for index, anchor in ends:
            parts.append(
                f'<text class="axis" x="{x(index):.1f}" y="{HEIGHT - 6}" text-anchor="{anchor}">'
                f'{times[index]:%H:%M}</text>'
            )
    if not values:
        parts.append(
            f'<text class="empty" x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h / 2:.1f}" text-anchor="middle">'
            f"{escape(empty_text)}</text>"
        )
    for line in series:
        points = [
            (x(i), y(v)) if v is not None else None for i, v in enumerate(line.values[:count])
        ]
        for run in _segments(points):
            if len(run) > 1:
                coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in run)
                parts.append(f'<polyline class="{line.css_class}" points="{coords}"/>')
        for index, value in enumerate(line.values[:count]):
            if value is not None:
                shown = f"{value:.0f}%" if unit == "%" else f"{value:,.1f}{' ' + unit if unit else ''}"
                parts.append(
                    f'<circle class="{line.css_class}" cx="{x(index):.1f}" cy="{y(value):.1f}" r="2">'
                    f"<title>{times[index]:%H:%M} {escape(line.label)}: {shown}</title></circle>"
                )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key {s.css_class}"></span>{escape(s.label)} ' for s in series
    ) if len(series) > 1 else ""
    identity = f' id="{escape(chart_id)}"' if chart_id else ""
    return Markup(
        f'<figure class="chart"{identity}><figcaption>{escape(title)}'
        f'{" · " + legend.strip() if legend else ""}</figcaption>{"".join(parts)}</figure>'
    )
