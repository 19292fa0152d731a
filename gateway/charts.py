"""Charts for the operator's page, drawn on the server as inline SVG: no script, no library, nothing fetched.

:func:`reward_chart` draws each version's mean reward over time (from :func:`nextturn.progress.reward_history`)
on the reward scale [-1, 1], with the deployment's changes as vertical marks (promotions green, rollbacks
red, canaries blue, operators' pauses grey). Every text is escaped; every point and mark has a tooltip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

from nextturn.progress import Point

# Colour-blind-safe (Okabe–Ito), for the lines of the versions in the order given.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
MARK_COLOURS = {"promote": "#009e73", "rollback": "#d55e00", "canary": "#0072b2"}
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 240, 40, 10, 10, 28


@dataclass(frozen=True)
class Mark:
    at: datetime
    action: str
    label: str


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def reward_chart(series: dict[str, list[Point]], marks: Sequence[Mark], start: datetime, end: datetime) -> Markup:
    """An SVG of the series (one line per version, in the order given) between ``start`` and ``end``."""
    span = max((end - start).total_seconds(), 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        return LEFT + plot_w * min(1.0, max(0.0, (at - start).total_seconds() / span))

    def y(reward: float) -> float:
        return TOP + plot_h * (1.0 - (max(-1.0, min(1.0, reward)) + 1.0) / 2.0)

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" xmlns="http://www.w3.org/2000/svg">',
             "<title>mean reward of each version over time</title>"]
    for value in (-1.0, -0.5, 0.0, 0.5, 1.0):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="{"#999" if value == 0 else "#ddd"}" stroke-width="1"/>'
                     f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="#555">{value:+.1f}</text>')
    for at, anchor in ((start, "start"), (end, "end")):
        parts.append(f'<text x="{x(at):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" font-size="11" '
                     f'fill="#555">{at:%Y-%m-%d %H:%M} UTC</text>')
    for mark in marks:
        if not start <= mark.at <= end:
            continue
        shade = MARK_COLOURS.get(mark.action, "#888")
        parts.append(f'<line class="mark" x1="{x(mark.at):.1f}" x2="{x(mark.at):.1f}" y1="{TOP}" '
                     f'y2="{TOP + plot_h}" stroke="{shade}" stroke-width="2" stroke-dasharray="4 3">'
                     f"<title>{escape(mark.label)}</title></line>")
    for index, (version, points) in enumerate(series.items()):
        shade = colour(index)
        if len(points) > 1:
            line = " ".join(f"{x(p.start):.1f},{y(p.mean_reward):.1f}" for p in points)
            parts.append(f'<polyline fill="none" stroke="{shade}" stroke-width="2" points="{line}"/>')
        for point in points:
            tip = escape(f"{version}: {point.mean_reward:+.2f} over {point.turns} turn(s) from {point.start:%H:%M}")
            parts.append(f'<circle cx="{x(point.start):.1f}" cy="{y(point.mean_reward):.1f}" r="3" fill="{shade}">'
                         f"<title>{tip}</title></circle>")
    parts.append("</svg>")
    return Markup("".join(parts))


# The sources of rewards, in the order they take precedence, then the turns whose reward the judge alone decided
# and those that got none.
SOURCES = ("explicit", "tool", "judge", "rules", "judge-only", "abstained")
SOURCE_COLOURS = dict(zip(SOURCES, ("#009e73", "#0072b2", "#e69f00", "#56b4e9", "#d55e00", "#bbbbbb"), strict=True))


def mix_bar(counts: dict[str, int]) -> Markup:
    """One bar split by where the rewards came from (``rewards_by_source`` of :func:`nextturn.progress.signals`)."""
    total = sum(counts.get(source, 0) for source in SOURCES)
    parts = ['<svg class="mix" viewBox="0 0 400 16" preserveAspectRatio="none" role="img" '
             'xmlns="http://www.w3.org/2000/svg"><title>where the rewards came from</title>']
    left = 0.0
    for source in SOURCES:
        count = counts.get(source, 0)
        if not count or not total:
            continue
        width = 400 * count / total
        parts.append(f'<rect x="{left:.2f}" y="0" width="{width:.2f}" height="16" fill="{SOURCE_COLOURS[source]}">'
                     f"<title>{source}: {count} ({100 * count / total:.0f}%)</title></rect>")
        left += width
    if not total:
        parts.append('<rect x="0" y="0" width="400" height="16" fill="#eeeeee"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
