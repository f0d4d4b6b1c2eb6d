"""The ``/spend all`` chart: spend per UTC day as stacked bars, drawn with Pillow alone.

Usage: ``png = await asyncio.to_thread(spend_chart, rows, last_day=today, title="Spend by user")``
with one ``DaySpend`` per (day, user or model); send ``png`` as a photo next to the text report.
"""

from __future__ import annotations

import heapq
import io
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from PIL import Image, ImageDraw, ImageFont

from bot.money import MICRO_PER_USD, format_usd

CHART_WIDTH = 1200
CHART_HEIGHT = 900
MAX_DAYS = 366
# Okabe-Ito, the colour-blind-safe palette, in the order the biggest keys get them.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178),  # blue
    (230, 159, 0),  # orange
    (0, 158, 115),  # bluish green
    (213, 94, 0),  # vermillion
    (204, 121, 167),  # reddish purple
    (86, 180, 233),  # sky blue
    (240, 228, 66),  # yellow
)
# a grey with a faint blue tint, so antialiased (neutral grey) text never has the same colour
OTHERS_COLOUR = (150, 150, 158)
LABEL_CHARS = 24

_WHITE = (255, 255, 255)
_INK = (34, 34, 34)
_SOFT_INK = (90, 90, 90)
_GRID = (225, 225, 225)
_AXIS = (68, 68, 68)
_MARGIN = 24
_PLOT_LEFT = 150
_PLOT_RIGHT = CHART_WIDTH - 36
_PLOT_TOP = 140
_LEGEND_ROW = 44
_MIN_BAR = 3  # px: a day with any spend at all stays visible
_TITLE_SIZE = 40
_TEXT_SIZE = 26
_LEGEND_SIZE = 28
_NOT_IN_ANY_FONT = "\U0010fffd"  # a private-use code point: draws the font's "missing" glyph


@dataclass(frozen=True)
class DaySpend:
    """Settled spend of one user (or on one model) on one UTC day."""

    day: date
    key: str  # a user's display name ("@alice", "telegram:111") or a model name
    micro: int


@dataclass(frozen=True)
class _Series:
    label: str
    colour: tuple[int, int, int]
    total_micro: int


def bar_centres(days: int = 30) -> list[int]:
    """The x pixel at the middle of each day's bar slot, oldest day first."""
    width = _PLOT_RIGHT - _PLOT_LEFT
    return [_PLOT_LEFT + (2 * i + 1) * width // (2 * days) for i in range(days)]


def plot_bottom(top: int = 5) -> int:
    """The y pixel of the $0 line: bars grow up from here; the legend sits below."""
    return CHART_HEIGHT - _MARGIN - _legend_rows(top) * _LEGEND_ROW - 72


def spend_chart(
    rows: Sequence[DaySpend], *, last_day: date, days: int = 30, top: int = 5, title: str
) -> bytes:
    """A PNG: one stacked bar per day from ``last_day - days + 1`` to ``last_day``.

    The ``top`` keys by total over the window get a colour each, the rest are summed as "others";
    rows outside the window or with no positive amount are ignored.
    """
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be 1 to {MAX_DAYS}")
    if not 0 <= top <= len(PALETTE):
        raise ValueError(f"top must be 0 to {len(PALETTE)}")
    first_day = last_day - timedelta(days=days - 1)
    kept = [row for row in rows if row.micro > 0 and first_day <= row.day <= last_day]
    totals: dict[str, int] = {}
    for row in kept:
        totals[row.key] = totals.get(row.key, 0) + row.micro
    leaders = heapq.nsmallest(top, totals, key=lambda key: (-totals[key], key))
    slot = {key: index for index, key in enumerate(leaders)}
    stacks = [[0] * (len(leaders) + 1) for _ in range(days)]
    for row in kept:
        stacks[(row.day - first_day).days][slot.get(row.key, len(leaders))] += row.micro

    fonts = _Fonts()
    series = [
        _Series(fonts.label(key), PALETTE[index], totals[key]) for index, key in enumerate(leaders)
    ]
    if len(totals) > len(leaders):
        hidden = len(totals) - len(leaders)
        label = f"{hidden} other" + ("s" if hidden > 1 else "")
        series.append(_Series(label, OTHERS_COLOUR, sum(stack[-1] for stack in stacks)))

    image = Image.new("RGB", (CHART_WIDTH, CHART_HEIGHT), _WHITE)
    draw = ImageDraw.Draw(image)
    heading = fonts.fit(fonts.clean(title), fonts.title, CHART_WIDTH - 2 * _MARGIN)
    draw.text((_MARGIN, _MARGIN), heading, font=fonts.title, fill=_INK)
    subtitle = (
        f"USD per UTC day, {first_day:%Y-%m-%d} to {last_day:%Y-%m-%d}"
        f" · total {format_usd(sum(totals.values()))}"
    )
    draw.text((_MARGIN, _MARGIN + 54), subtitle, font=fonts.text, fill=_SOFT_INK)
    bottom = plot_bottom(top)
    peak = max((sum(stack) for stack in stacks), default=0)
    if peak:
        _draw_bars(draw, fonts, stacks, series, peak, bottom)
    else:
        _draw_gridline(draw, fonts, 0, bottom)
        middle = ((_PLOT_LEFT + _PLOT_RIGHT) // 2, (_PLOT_TOP + bottom) // 2)
        empty = f"No spend in the last {days} day" + ("s" if days > 1 else "")
        draw.text(middle, empty, font=fonts.legend, fill=_SOFT_INK, anchor="mm")
    _draw_days(draw, fonts, first_day, days, bottom)
    _draw_legend(draw, fonts, series, bottom + 72)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _draw_bars(
    draw: ImageDraw.ImageDraw,
    fonts: _Fonts,
    stacks: list[list[int]],
    series: list[_Series],
    peak: int,
    bottom: int,
) -> None:
    step = _nice_step(peak)
    ceiling = max(3, -(-peak // step)) * step
    height = bottom - _PLOT_TOP
    for tick in range(0, ceiling + 1, step):
        _draw_gridline(draw, fonts, tick, bottom - tick * height // ceiling, step)

    def y_of(micro: int) -> int:
        return bottom - max(_MIN_BAR if micro else 0, micro * height // ceiling)

    half = max(1, (_PLOT_RIGHT - _PLOT_LEFT) * 7 // (20 * len(stacks)))
    for centre, stack in zip(bar_centres(len(stacks)), stacks, strict=True):
        below = 0
        # without "others" the stack's last amount is always 0 and has no series
        for amount, line in zip(stack, series, strict=False):
            top_y, bottom_y = y_of(below + amount), y_of(below)
            if top_y < bottom_y:  # a sliver too thin for one pixel is not drawn
                draw.rectangle((centre - half, top_y, centre + half - 1, bottom_y - 1), line.colour)
            below += amount
    draw.line((_PLOT_LEFT, bottom, _PLOT_RIGHT, bottom), fill=_AXIS, width=2)


def _draw_gridline(
    draw: ImageDraw.ImageDraw, fonts: _Fonts, micro: int, y: int, step: int = MICRO_PER_USD
) -> None:
    draw.line((_PLOT_LEFT, y, _PLOT_RIGHT, y), fill=_AXIS if micro == 0 else _GRID, width=2)
    draw.text(
        (_PLOT_LEFT - 14, y), _axis_label(micro, step), font=fonts.text, fill=_INK, anchor="rm"
    )


def _axis_label(micro: int, step: int) -> str:
    """``micro`` in dollars with as many decimals as ``step`` needs: $5, $0.50, $0.015."""
    if step % MICRO_PER_USD == 0:
        return f"${micro // MICRO_PER_USD:,}"
    places = 6
    while places > 2 and step % 10 ** (7 - places) == 0:
        places -= 1
    whole, frac = divmod(micro, MICRO_PER_USD)
    return f"${whole:,}.{frac // 10 ** (6 - places):0{places}d}"


def _draw_days(
    draw: ImageDraw.ImageDraw, fonts: _Fonts, first_day: date, days: int, bottom: int
) -> None:
    """Date labels under the bars, every few days so they never touch, always on the last day."""
    room = int(fonts.text.getlength("00-00")) + 28
    every = max(1, -(-room * days // (_PLOT_RIGHT - _PLOT_LEFT)))
    for index, centre in enumerate(bar_centres(days)):
        if (days - 1 - index) % every == 0:
            draw.line((centre, bottom, centre, bottom + 8), fill=_AXIS, width=2)
            label = f"{first_day + timedelta(days=index):%m-%d}"
            draw.text((centre, bottom + 14), label, font=fonts.text, fill=_INK, anchor="mt")


def _draw_legend(
    draw: ImageDraw.ImageDraw, fonts: _Fonts, series: list[_Series], top_y: int
) -> None:
    """Two columns: a swatch, the label, and the total over the window at the column's right."""
    column = (CHART_WIDTH - 2 * _MARGIN) // 2
    rows = _legend_rows(len(series) - 1)
    for index, line in enumerate(series):
        x = _MARGIN + (index // rows) * column
        y = top_y + (index % rows) * _LEGEND_ROW
        draw.rectangle((x, y + 4, x + 27, y + 31), fill=line.colour)
        total = format_usd(line.total_micro)
        right = x + column - 24
        draw.text((right, y + 18), total, font=fonts.legend, fill=_INK, anchor="rm")
        room = right - int(fonts.legend.getlength(total)) - 24 - (x + 40)
        label = fonts.fit(line.label, fonts.legend, room)
        draw.text((x + 40, y + 18), label, font=fonts.legend, fill=_INK, anchor="lm")


def _legend_rows(top: int) -> int:
    return max(1, -(-(top + 1) // 2))


def _nice_step(peak: int) -> int:
    """The smallest 1-2-5 step from $0.001 up that covers ``peak`` in at most 5 steps."""
    scale = 1_000
    while True:
        for factor in (1, 2, 5):
            if -(-peak // (factor * scale)) <= 5:
                return factor * scale
        scale *= 10


class _Fonts:
    """Pillow's built-in scalable font (Pillow 10.1+) at the chart's sizes, per render."""

    def __init__(self) -> None:
        self.title = ImageFont.load_default(size=_TITLE_SIZE)
        self.text = ImageFont.load_default(size=_TEXT_SIZE)
        self.legend = ImageFont.load_default(size=_LEGEND_SIZE)
        self._missing = bytes(self.text.getmask(_NOT_IN_ANY_FONT))
        self._known: dict[str, bool] = {}

    def clean(self, text: str) -> str:
        """Text the font can draw: accents dropped, spaces collapsed, the rest shown as "?"."""
        kept: list[str] = []
        for char in unicodedata.normalize("NFKD", text):
            kind = unicodedata.category(char)
            if kind in ("Cc", "Zl", "Zp", "Zs"):
                kept.append(" ")
            elif kind not in ("Mn", "Me", "Cf"):
                kept.append(char if self._drawable(char) else "?")
        return " ".join("".join(kept).split()) or "?"

    def label(self, key: str) -> str:
        """A key for the legend: cleaned and cut to LABEL_CHARS characters."""
        text = self.clean(key)
        return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"

    @staticmethod
    def fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
        """``text`` cut with "…" until it is at most ``width`` pixels wide."""
        while len(text) > 1 and font.getlength(text) > width:
            text = text[:-2] + "…"
        return text

    def _drawable(self, char: str) -> bool:
        if char not in self._known:
            surrogate = unicodedata.category(char) == "Cs"
            self._known[char] = not surrogate and bytes(self.text.getmask(char)) != self._missing
        return self._known[char]
