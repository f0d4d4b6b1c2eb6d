"""The /spend all chart: a fixed-size PNG whose bars, colours and legend follow the spend."""

from __future__ import annotations

import io
import statistics
import time
from datetime import date, timedelta

import pytest
from PIL import Image

from bot.chart import (
    CHART_HEIGHT,
    CHART_WIDTH,
    OTHERS_COLOUR,
    PALETTE,
    DaySpend,
    bar_centres,
    plot_bottom,
    spend_chart,
)

LAST = date(2025, 11, 7)
SERIES_COLOURS = {*PALETTE, OTHERS_COLOUR}


def day(back: int) -> date:
    return LAST - timedelta(days=back)


def picture(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == (CHART_WIDTH, CHART_HEIGHT)
    return image.convert("RGB")


def colours(image: Image.Image) -> set[tuple[int, int, int]]:
    return {colour for _, colour in image.getcolors(maxcolors=CHART_WIDTH * CHART_HEIGHT)}


def bar_height(image: Image.Image, back: int, *, days: int = 30, top: int = 5) -> int:
    """Pixels of series colour in the middle column of the bar ``back`` days before LAST."""
    x = bar_centres(days)[days - 1 - back]
    return sum(image.getpixel((x, y)) in SERIES_COLOURS for y in range(plot_bottom(top)))


def five_users() -> list[DaySpend]:
    return [
        DaySpend(day(back), f"@user{rank}", (rank + 1) * 10_000 + back * 1_000)
        for back in range(30)
        for rank in range(5)
    ]


def test_chart_is_a_small_png_of_the_fixed_size() -> None:
    png = spend_chart(five_users(), last_day=LAST, title="Spend by user")
    picture(png)
    assert len(png) < 200_000


def test_chart_is_not_blank_and_shows_each_top_key_in_its_colour() -> None:
    found = colours(picture(spend_chart(five_users(), last_day=LAST, title="Spend by user")))
    assert len(found) > 50  # bars, antialiased text, gridlines
    assert set(PALETTE[:5]) <= found


def test_a_bigger_day_has_a_taller_bar() -> None:
    rows = [
        DaySpend(day(3), "@alice", 200_000),
        DaySpend(day(3), "@bob", 100_000),
        DaySpend(day(10), "@alice", 100_000),
        DaySpend(day(20), "@bob", 1),
    ]
    image = picture(spend_chart(rows, last_day=LAST, title="Spend by user"))
    big, small, tiny, none = (bar_height(image, back) for back in (3, 10, 20, 0))
    assert big > small > tiny > none == 0
    assert abs(big - 3 * small) <= 3  # heights are proportional to the money


def test_keys_beyond_the_top_are_merged_into_others() -> None:
    rows = [
        DaySpend(day(back), f"@user{rank}", (10 - rank) * 10_000)
        for back in range(30)
        for rank in range(8)
    ]
    image = picture(spend_chart(rows, last_day=LAST, top=5, title="Spend by user"))
    found = colours(image) & SERIES_COLOURS
    assert found == {*PALETTE[:5], OTHERS_COLOUR}
    x = bar_centres()[0]
    assert OTHERS_COLOUR in {image.getpixel((x, y)) for y in range(plot_bottom())}


def test_rows_outside_the_window_do_not_change_the_picture() -> None:
    inside = five_users()
    outside = [
        DaySpend(day(30), "@user4", 9_000_000),
        DaySpend(day(-1), "@user0", 9_000_000),
        DaySpend(day(400), "@stranger", 9_000_000),
    ]
    alone = spend_chart(inside, last_day=LAST, title="Spend by user")
    mixed = spend_chart(outside + inside, last_day=LAST, title="Spend by user")
    assert picture(mixed).tobytes() == picture(alone).tobytes()


def test_no_spend_still_draws_a_chart_that_says_so() -> None:
    image = picture(spend_chart([], last_day=LAST, title="Spend by user"))
    assert not colours(image) & SERIES_COLOURS
    message_band = image.crop((CHART_WIDTH // 3, 300, 2 * CHART_WIDTH // 3, 500))
    assert len(colours(message_band)) > 5  # the "No spend in the last 30 days" text
    old_only = [DaySpend(day(45), "@alice", 50_000)]
    assert spend_chart(old_only, last_day=LAST, title="Spend by user") == spend_chart(
        [], last_day=LAST, title="Spend by user"
    )


@pytest.mark.parametrize("peak", [1, 999, 50_000, 300_000, 7_654_321_000])
def test_the_y_axis_has_four_to_six_gridlines(peak: int) -> None:
    image = picture(spend_chart([DaySpend(LAST, "@alice", peak)], last_day=LAST, title="x"))
    first, second = bar_centres()[:2]
    x = (first + second) // 2  # between two bars: only gridlines cross here
    inked = [image.getpixel((x, y)) != (255, 255, 255) for y in range(plot_bottom() + 1)]
    lines = sum(1 for y in range(1, len(inked)) if inked[y] and not inked[y - 1])
    assert 4 <= lines <= 6


def test_two_thousand_keys_over_thirty_days_render_quickly() -> None:
    rows = [
        DaySpend(day(back), f"telegram:{user}", 1_000 + (user * 7919 + back) % 50_000)
        for user in range(2_000)
        for back in range(30)
    ]
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        png = spend_chart(rows, last_day=LAST, title="Spend by user")
        timings.append(time.perf_counter() - started)
    print(f"2,000 keys x 30 days: median {statistics.median(timings) * 1000:.0f} ms")
    assert statistics.median(timings) < 5
    assert len(colours(picture(png)) & SERIES_COLOURS) == 6


def test_names_with_control_characters_and_emoji_do_not_crash() -> None:
    names = [
        "\x00\x1b[31m@evil\r\n\t",
        "@zoë 😀👨\u200d👩\u200d👧",
        "\u202eexe.txt",
        "\ud800lone surrogate",
        "李小龙",
        "",
        "W" * 500,
    ]
    rows = [DaySpend(day(rank), name, 10_000) for rank, name in enumerate(names)]
    image = picture(spend_chart(rows, last_day=LAST, top=7, title="\x07" + "😀" * 300))
    assert set(PALETTE[:7]) <= colours(image)


def test_what_the_font_cannot_draw_is_shown_as_a_question_mark() -> None:
    def chart(name: str) -> bytes:
        return spend_chart([DaySpend(LAST, name, 10_000)], last_day=LAST, title="Spend by user")

    assert chart("@zoë\x1b\u202e😀\n") == chart("@zoe ?")
