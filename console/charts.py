"""Server-rendered SVG charts: no JavaScript, readable by tests and screen readers.

Every chart is an ``<svg role="img">`` with a ``<title>`` (the chart's title) and a
``<desc>`` (what it shows, in words, with the latest values), axes with their units,
and, where a limit applies, a dashed threshold line labelled with its value. Series
are drawn from rollup rows the caller has already read: these functions do no I/O.

- ``line_chart``: one or more series over time, with an optional threshold.
- ``bar_chart``: stacked bars per time bucket (admitted vs refused by reason, ...).
- ``sparkline``: a tiny line without axes, for a table cell.

Colours come from CSS classes (``series-0`` ... ``series-7``, ``threshold``) in the
console's stylesheet, so the charts follow its palette and need no inline style.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.utils.safestring import SafeData, SafeString, mark_safe

WIDTH, HEIGHT = 640, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 40


def _svg(template: str, *args) -> SafeString:
    """``format_html`` that keeps numbers as numbers, so ``{:.1f}`` works: Django's
    escapes every argument to a string first, which a float format spec refuses.
    Numbers need no escaping; everything else is escaped."""
    # html.escape is what django.utils.html.escape does, without its lazy-string wrapper:
    # a chart of a week in hours formats over a thousand parts.
    safe = [
        arg if isinstance(arg, int | float | SafeData) else html.escape(str(arg)) for arg in args
    ]
    return mark_safe(template.format(*safe))  # noqa: S308 - every other argument is escaped


@dataclass(frozen=True)
class Series:
    """One named line (or one stack of bars): ``points`` are (time, value) pairs."""

    name: str
    points: Sequence[tuple[datetime, float]]
    css: str = ""  # extra CSS class; series-<n> is added by position


@dataclass(frozen=True)
class Threshold:
    value: float
    label: str


@dataclass
class _Frame:
    """Maps data to pixels inside the plot area."""

    start: float
    end: float
    top: float
    width: int = WIDTH
    height: int = HEIGHT
    plot_w: float = field(init=False)
    plot_h: float = field(init=False)

    def __post_init__(self) -> None:
        self.plot_w = self.width - MARGIN_LEFT - MARGIN_RIGHT
        self.plot_h = self.height - MARGIN_TOP - MARGIN_BOTTOM
        if self.end <= self.start:
            self.end = self.start + 1
        if self.top <= 0:
            self.top = 1

    def x(self, moment: float) -> float:
        return MARGIN_LEFT + (moment - self.start) / (self.end - self.start) * self.plot_w

    def y(self, value: float) -> float:
        return MARGIN_TOP + self.plot_h - (min(value, self.top) / self.top) * self.plot_h


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value`` (an axis top)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * 10**exponent
        if top >= value * (1 - 1e-9):
            return float(top)
    return float(10 ** (exponent + 1))


def format_value(value: float, unit: str = "") -> str:
    """A short label: 1.2k, 3.4M, 2.5%, 0.25."""
    if unit == "%":
        return f"{value * 100:.3g}%"
    magnitude = abs(value)
    if magnitude >= 1e6:
        text = f"{value / 1e6:.3g}M"
    elif magnitude >= 1e4:
        text = f"{value / 1e3:.3g}k"
    elif magnitude == int(magnitude):
        text = f"{int(value)}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip() if unit else text


def _time_label(moment: datetime, span_seconds: float) -> str:
    if span_seconds > 2 * 86_400:
        return moment.strftime("%b %d")
    return moment.strftime("%H:%M")


def _open(title: str, desc: str, width: int, height: int, css: str) -> list[str]:
    return [
        _svg(
            '<svg class="chart {}" role="img" viewBox="0 0 {} {}" width="{}" height="{}"'
            ' xmlns="http://www.w3.org/2000/svg"><title>{}</title><desc>{}</desc>',
            css,
            width,
            height,
            width,
            height,
            title,
            desc,
        )
    ]


def _axes(frame: _Frame, start: datetime, end: datetime, y_unit: str, x_label: str) -> list[str]:
    parts = []
    bottom = MARGIN_TOP + frame.plot_h
    parts.append(
        _svg(
            '<g class="axis"><line x1="{}" y1="{}" x2="{}" y2="{}"/>'
            '<line x1="{}" y1="{}" x2="{}" y2="{}"/>',
            MARGIN_LEFT,
            MARGIN_TOP,
            MARGIN_LEFT,
            bottom,
            MARGIN_LEFT,
            bottom,
            MARGIN_LEFT + frame.plot_w,
            bottom,
        )
    )
    for fraction in (0, 0.5, 1):  # y ticks: 0, half, top
        value = frame.top * fraction
        y = frame.y(value)
        parts.append(
            _svg(
                '<line class="grid" x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}"/>'
                '<text class="tick" x="{}" y="{:.1f}" text-anchor="end">{}</text>',
                MARGIN_LEFT,
                y,
                MARGIN_LEFT + frame.plot_w,
                y,
                MARGIN_LEFT - 6,
                y + 4,
                format_value(value, y_unit),
            )
        )
    span = (end - start).total_seconds()
    for fraction in (0, 0.5, 1):  # x ticks: start, middle, end
        moment = datetime.fromtimestamp(
            frame.start + (frame.end - frame.start) * fraction, tz=start.tzinfo
        )
        anchor = ("start", "middle", "end")[int(fraction * 2)]
        parts.append(
            _svg(
                '<text class="tick" x="{:.1f}" y="{}" text-anchor="{}">{}</text>',
                frame.x(moment.timestamp()),
                bottom + 16,
                anchor,
                _time_label(moment, span),
            )
        )
    parts.append(
        _svg(
            '<text class="axis-label" x="{:.1f}" y="{}" text-anchor="middle">{}</text></g>',
            MARGIN_LEFT + frame.plot_w / 2,
            bottom + 34,
            x_label,
        )
    )
    return parts


def _threshold(frame: _Frame, threshold: Threshold | None, unit: str) -> list[str]:
    if threshold is None:
        return []
    y = frame.y(threshold.value)
    return [
        _svg(
            '<g class="threshold"><line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}"/>'
            '<text x="{}" y="{:.1f}" text-anchor="end">{} {}</text></g>',
            MARGIN_LEFT,
            y,
            MARGIN_LEFT + frame.plot_w,
            y,
            MARGIN_LEFT + frame.plot_w,
            y - 4,
            threshold.label,
            format_value(threshold.value, unit),
        )
    ]


LEGEND_ROW = 16


def _legend_rows(names: Sequence[str], width: int) -> list[list[tuple[int, str]]]:
    """The legend's (series index, name) items in rows that fit ``width``."""
    rows: list[list[tuple[int, str]]] = [[]]
    x = MARGIN_LEFT
    for index, name in enumerate(names):
        item = 24 + 7 * len(name)  # swatch, gap and an estimate of the text's width
        if rows[-1] and x + item > width:
            rows.append([])
            x = MARGIN_LEFT
        rows[-1].append((index, name))
        x += item
    return rows


def _legend(names: Sequence[str], width: int, height: int) -> tuple[list[str], int]:
    """The legend's first row above the plot, any further rows (a chart of many
    series) below the x axis; returns its parts and the height the rows below add."""
    rows = _legend_rows(names, width)
    parts = ['<g class="legend">']
    for number, row in enumerate(rows):
        y = 8 if number == 0 else height + (number - 1) * LEGEND_ROW
        x = MARGIN_LEFT
        for index, name in row:
            parts.append(
                _svg(
                    '<rect class="series-{}" x="{}" y="{}" width="10" height="10"/>'
                    '<text x="{}" y="{}">{}</text>',
                    index % 8,
                    x,
                    y,
                    x + 14,
                    y + 9,
                    name,
                )
            )
            x += 24 + 7 * len(name)
    parts.append("</g>")
    return parts, (len(rows) - 1) * LEGEND_ROW


def _bounds(series: Sequence[Series]) -> tuple[datetime, datetime] | None:
    moments = [moment for one in series for moment, _ in one.points]
    if not moments:
        return None
    return min(moments), max(moments)


def _empty(title: str, message: str, width: int, height: int) -> SafeString:
    parts = _open(title, message, width, height, "chart-empty")
    parts.append(
        _svg(
            '<text class="empty" x="{}" y="{}" text-anchor="middle">{}</text></svg>',
            width / 2,
            height / 2,
            message,
        )
    )
    return mark_safe("".join(parts))  # noqa: S308 - every part is escaped by _svg


def _describe(series: Sequence[Series], unit: str, threshold: Threshold | None) -> str:
    latest = "; ".join(
        f"{one.name} latest {format_value(one.points[-1][1], unit)}" for one in series if one.points
    )
    limit = f"; {threshold.label} {format_value(threshold.value, unit)}" if threshold else ""
    return f"{latest}{limit}."


def line_chart(
    *,
    title: str,
    series: Sequence[Series],
    y_unit: str = "",
    x_label: str = "time (UTC)",
    threshold: Threshold | None = None,
    y_max: float | None = None,
    empty_message: str = "No data in this range yet.",
    width: int = WIDTH,
    height: int = HEIGHT,
) -> SafeString:
    """Lines over time; ``y_unit="%"`` shows fractions (0.02) as percentages."""
    bounds = _bounds(series)
    if bounds is None:
        return _empty(title, empty_message, width, height)
    start, end = bounds
    peak = max([value for one in series for _, value in one.points] + [0.0])
    if threshold is not None:
        peak = max(peak, threshold.value)
    frame = _Frame(
        start.timestamp(), end.timestamp(), y_max or nice_ceiling(peak * 1.1), width, height
    )
    legend, extra = _legend([one.name for one in series], width, height)
    parts = _open(title, _describe(series, y_unit, threshold), width, height + extra, "line-chart")
    parts += _axes(frame, start, end, y_unit, x_label)
    for index, one in enumerate(series):
        points = " ".join(
            f"{frame.x(moment.timestamp()):.1f},{frame.y(value):.1f}"
            for moment, value in one.points
        )
        parts.append(
            _svg(
                '<polyline class="series series-{} {}" points="{}"><title>{}</title></polyline>',
                index % 8,
                one.css,
                points,
                one.name,
            )
        )
    parts += _threshold(frame, threshold, y_unit)
    parts += legend
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every part is escaped by _svg


def bar_chart(
    *,
    title: str,
    series: Sequence[Series],
    bucket_seconds: int,
    y_unit: str = "",
    x_label: str = "time (UTC)",
    empty_message: str = "No data in this range yet.",
    width: int = WIDTH,
    height: int = HEIGHT,
) -> SafeString:
    """Bars stacked per time bucket, one stack segment per series (same buckets)."""
    bounds = _bounds(series)
    if bounds is None:
        return _empty(title, empty_message, width, height)
    start, end = bounds
    totals: dict[float, float] = {}
    for one in series:
        for moment, value in one.points:
            totals[moment.timestamp()] = totals.get(moment.timestamp(), 0.0) + value
    frame = _Frame(
        start.timestamp(),
        end.timestamp() + bucket_seconds,
        nice_ceiling(max(totals.values(), default=0) * 1.1),
        width,
        height,
    )
    bar_w = max(1.0, frame.plot_w * bucket_seconds / (frame.end - frame.start) - 1)
    legend, extra = _legend([one.name for one in series], width, height)
    parts = _open(title, _describe(series, y_unit, None), width, height + extra, "bar-chart")
    parts += _axes(frame, start, end, y_unit, x_label)
    base: dict[float, float] = {}
    for index, one in enumerate(series):
        for moment, value in one.points:
            if value <= 0:
                continue
            key = moment.timestamp()
            below = base.get(key, 0.0)
            top_y, bottom_y = frame.y(below + value), frame.y(below)
            base[key] = below + value
            parts.append(
                _svg(
                    '<rect class="series-{} {}" x="{:.1f}" y="{:.1f}" width="{:.1f}"'
                    ' height="{:.1f}"><title>{} {}: {}</title></rect>',
                    index % 8,
                    one.css,
                    frame.x(key),
                    top_y,
                    bar_w,
                    max(0.5, bottom_y - top_y),
                    one.name,
                    moment.strftime("%Y-%m-%d %H:%M"),
                    format_value(value, y_unit),
                )
            )
    parts += legend
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every part is escaped by _svg


def sparkline(values: Sequence[float], *, title: str, width: int = 120, height: int = 24) -> str:
    """A small line for a table cell; its title says the total and the peak."""
    if not values or not any(values):
        return _svg(
            '<svg class="sparkline" role="img" viewBox="0 0 {} {}" width="{}" height="{}"'
            ' xmlns="http://www.w3.org/2000/svg"><title>{}: no traffic</title>'
            '<line class="flat" x1="0" y1="{}" x2="{}" y2="{}"/></svg>',
            width,
            height,
            width,
            height,
            title,
            height - 1,
            width,
            height - 1,
        )
    top = max(values)
    step = width / max(1, len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(values)
    )
    return _svg(
        '<svg class="sparkline" role="img" viewBox="0 0 {} {}" width="{}" height="{}"'
        ' xmlns="http://www.w3.org/2000/svg"><title>{}: {} in all, peak {}</title>'
        '<polyline points="{}"/></svg>',
        width,
        height,
        width,
        height,
        title,
        format_value(sum(values)),
        format_value(top),
        points,
    )


__all__ = ["Series", "Threshold", "bar_chart", "line_chart", "sparkline"]
