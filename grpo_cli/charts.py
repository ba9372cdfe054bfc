"""Line charts as inline SVG markup, for `grpo report`: no JavaScript and no plotting library, so the
page they go into opens anywhere, offline, and needs nothing but a browser.

A chart is a list of `Line`s drawn over shared axes whose ticks fall on round numbers (`nice_ticks`).
Text that reaches the markup (legend names, tooltips) is HTML-escaped here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import NamedTuple

# Tableau's 10 colours: distinct for most kinds of colour blindness, and on white.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
DASHES = ("", "6 3", "2 3", "8 3 2 3")  # SVG stroke-dasharray: solid, dashed, dotted, dash-dot

WIDTH, HEIGHT = 560, 260
# Margins around the plotting area, in pixels. RIGHT holds half the last x tick's label, centred on the
# axis' end: up to 7 digits (1,000,000 steps) at about 7 px each.
LEFT, RIGHT, TOP, BOTTOM = 58, 26, 12, 38
MARKERS_UP_TO = 12  # a line with this few points also gets a dot per point (sparse series such as evals)


class Line(NamedTuple):
    name: str                          # legend text
    points: list[tuple[float, float]]  # (x, y), x ascending
    colour: str                        # any SVG colour
    dash: str = ""                     # SVG stroke-dasharray; "" is solid


def nice_ticks(lo: float, hi: float, count: int = 5, min_step: float = 0.0) -> list[float]:
    """About `count` + 1 evenly spaced round values (steps of 1, 2 or 5 times a power of ten, and at
    least `min_step`) whose first is <= lo and last is >= hi: the axis spans exactly its ticks. A
    flat range is widened."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo == 0:  # e.g. a KL term that is off: 0 at the bottom of a 0..1 axis
        hi = 1.0
    elif hi == lo:
        pad = abs(lo) * 0.1
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9)), min_step)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) + 0.0 for i in range(start, stop + 1)]  # + 0.0: no "-0" label


def tick_label(value: float) -> str:
    return f"{value:.6g}"


def line_chart(lines: Sequence[Line], x_label: str, y_range: tuple[float, float] | None = None,
               integer_x: bool = True) -> str:
    """An <svg> element drawing `lines` over shared axes. `y_range` fixes the y axis (e.g. (0, 1) for
    rates); otherwise it spans the data. `integer_x`: x ticks only at whole numbers (steps)."""
    xs = [x for line in lines for x, _ in line.points]
    ys = [y for line in lines for _, y in line.points]
    x_lo, x_hi = min(xs), max(xs)
    if integer_x and x_lo == x_hi:  # one step: show its neighbours rather than fractions of a step
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_ticks = nice_ticks(x_lo, x_hi, min_step=1.0 if integer_x else 0.0)
    y_ticks = nice_ticks(*(y_range or (min(ys), max(ys))))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * inner_w

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * inner_h

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">']
    for t in y_ticks:  # horizontal grid lines, with the y tick labels left of the axis
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{tick_label(t)}</text>')
    for t in x_ticks:
        parts.append(f'<line class="axis" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{HEIGHT - BOTTOM}" '
                     f'y2="{HEIGHT - BOTTOM + 4}"/><text class="tick" x="{px(t):.1f}" y="{HEIGHT - BOTTOM + 17}" '
                     f'text-anchor="middle">{tick_label(t)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}"/>'
                 f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
                 f'<text class="axis-label" x="{LEFT + inner_w / 2:.1f}" y="{HEIGHT - 4}" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>')
    for line in reversed(lines):  # the first line (e.g. the total) is drawn last, on top
        name = html.escape(line.name)
        dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line.points)
        parts.append(f'<polyline class="series" fill="none" stroke="{line.colour}" stroke-width="1.8"{dash} '
                     f'points="{points}"><title>{name}</title></polyline>')
        if len(line.points) <= MARKERS_UP_TO:
            parts += [f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{line.colour}">'
                      f'<title>{name}: {tick_label(y)} at {tick_label(x)}</title></circle>' for x, y in line.points]
    parts.append("</svg>")
    return "".join(parts)


def legend(lines: Sequence[Line]) -> str:
    """An HTML list naming each line next to a short sample of its stroke."""
    items = []
    for line in lines:
        dash = f' stroke-dasharray="{line.dash}"' if line.dash else ""
        items.append(f'<li><svg width="26" height="10" aria-hidden="true"><line x1="1" x2="25" y1="5" y2="5" '
                     f'stroke="{line.colour}" stroke-width="2.2"{dash}/></svg>{html.escape(line.name)}</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'
