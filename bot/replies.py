"""The texts the bot sends that do not depend on a request: help and the model list."""

from __future__ import annotations

from collections.abc import Mapping

from bot.catalog import DEFAULT_EDIT_MODEL, DEFAULT_GENERATE_MODEL, MODELS, get_model
from bot.commands import MAX_N
from bot.money import format_usd


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
