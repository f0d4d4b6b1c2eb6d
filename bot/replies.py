"""The texts the bot sends that are not about one request: help, models and spend reports."""

from __future__ import annotations

from collections.abc import Mapping

from bot.catalog import DEFAULT_EDIT_MODEL, DEFAULT_GENERATE_MODEL, MODELS, get_model
from bot.ledger import Budget, Report, UserSpend
from bot.money import format_usd
from bot.requests import MAX_N

# Users ``/spend all`` lists, over as many messages as that takes (about 2 on Telegram, 4 on
# Discord); a bigger crowd's rest is counted, and `imagebot spend` lists everyone.
REPORT_LINES = 100


def help_text() -> str:
    """Usage with examples, the same on every platform."""
    generate, edit = get_model(DEFAULT_GENERATE_MODEL), get_model(DEFAULT_EDIT_MODEL)
    return "\n".join(
        [
            "I draw and edit pictures; each one is paid from the bot's wallet.",
            "",
            "/imagegen PROMPT: make a picture from text",
            "  /imagegen a fox in the snow",
            "  /imagegen --model dall-e-3 --size 1792x1024 a city at dusk",
            '  /imagegen -m flux --n 2 "a watercolor lighthouse"',
            "/img2img PROMPT: attach images (or reply to one) and say what to change",
            "  /img2img make it winter",
            "  /img2img --mask replace the sky (picture, then mask: white = edit)",
            "/cancel: stop your pictures still waiting in line or being drawn; nothing is charged",
            "/models: models, prices and sizes",
            "/spend: what you have spent and what is left today",
            "",
            f"Flags: --model/-m NAME, --size/-s WxH, --n 1-{MAX_N}, --quality standard|hd, "
            "--mask; -- ends flags.",
            f"Defaults: /imagegen uses {generate.name}, /img2img uses {edit.name}, 1024x1024.",
        ]
    )


def models_text() -> str:
    """The catalog: shorthand, full id, price per size, edit and mask support."""
    lines = ["Models, price per image (the gateway's quote is final):"]
    for model in MODELS:
        abilities = [] if model.generates else ["edit only"]
        if model.edits:
            abilities.append(f"edits up to {model.max_inputs} images")
        if model.mask:
            abilities.append("mask")
        if model.qualities:
            abilities.append(f"--quality hd {_prices(model.hd_prices)}")
        extra = f" ({'; '.join(abilities)})" if abilities else ""
        lines.append(f"• {model.name}: {model.id}, {_prices(model.prices)}{extra}")
    return "\n".join(lines)


def _prices(table: Mapping[str, int]) -> str:
    """``$0.0525 1024x1024, 1216x832; $0.105 2048x2048``: sizes grouped by price."""
    by_price: dict[int, list[str]] = {}
    for size, micro in table.items():
        by_price.setdefault(micro, []).append(size)
    return "; ".join(f"{format_usd(micro)} {', '.join(sizes)}" for micro, sizes in by_price.items())


def spend_text(spend: UserSpend, budget: Budget, *, own: bool) -> str:
    """``/spend`` for the caller (``own``) or, for an admin, one other user, with the daily
    limit of ``budget``."""
    who = "You have" if own else f"{_name(spend.user, spend.display_name)} has"
    lines = [
        f"{who} spent {format_usd(spend.today_micro)} today, "
        f"{format_usd(spend.month_micro)} this month and {format_usd(spend.total_micro)} "
        f"in all ({_images(spend.images)})."
    ]
    if spend.unknown_micro:
        lines.append(
            f"{format_usd(spend.unknown_micro)} more may have been charged (outcome unknown); "
            "it counts against the daily limit."
        )
    if spend.left_today_micro is None:
        lines.append("No personal daily limit (admin).")
    else:
        whose = "your" if own else "their"
        lines.append(
            f"Left today: {format_usd(spend.left_today_micro)} of {whose} "
            f"{format_usd(budget.user_daily_micro)} daily limit; it resets at 00:00 UTC."
        )
    return "\n".join(lines)


def report_text(report: Report) -> str:
    """``/spend all``: the total, then every user (up to ``REPORT_LINES``), biggest spender
    first, one line each."""
    requests = sum(user.requests for user in report.users)
    images = sum(user.images for user in report.users)
    lines = [
        f"All users: {format_usd(report.total_micro)} in {requests} requests ({_images(images)})."
    ]
    if report.pending_micro:
        lines.append(f"Outcome unknown, not counted above: {format_usd(report.pending_micro)}.")
    for user in report.users[:REPORT_LINES]:
        last = user.last_at.strftime("%Y-%m-%d %H:%M UTC")
        unknown = f", {format_usd(user.pending_micro)} unknown" if user.pending_micro else ""
        lines.append(
            f"• {_name(user.user, user.display_name)}: {format_usd(user.micro)}{unknown}, "
            f"{_images(user.images)}, last {last}"
        )
    hidden = len(report.users) - REPORT_LINES
    if hidden > 0:
        lines.append(f"…and {hidden} more; `imagebot spend` on the server lists everyone.")
    return "\n".join(lines)


def _name(user: str, display_name: str) -> str:
    return f"{display_name} ({user})" if display_name else user


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"
