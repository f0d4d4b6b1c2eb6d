"""The buttons under the bot's messages: what each says, what its data holds, what a press asks.

``🔁 Again`` and ``🎨 Vary`` sit under a delivered result; their data names the result kept in
the ledger (an unguessable token), so a press works after a restart and on any replica, and
forged data asks for nothing. ``✖ Cancel`` sits under the status of a job that can still be
stopped for free; its data names the job's ledger row (only its requester may use it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from bot.catalog import find_model
from bot.ledger import KeptResult
from bot.money import format_usd
from bot.requests import EditRequest, GenerateRequest, ImageCommand

Action = Literal["again", "vary", "cancel"]

AGAIN = "🔁 Again"
VARY = "🎨 Vary"
CANCEL = "✖ Cancel"
DATA_PATTERN = r"(?:again|vary):[A-Za-z0-9_-]{22}|cancel:[0-9]{1,18}"
"""Every button's data (at most 29 characters: Telegram allows 64 bytes, Discord 100)."""

_DATA = re.compile(DATA_PATTERN)


@dataclass(frozen=True)
class Button:
    """One button: its caption, and the data a press hands back to ``ImageBot.press``."""

    label: str
    data: str


@dataclass(frozen=True)
class Press:
    """A press's data, read: what to do, and to which kept result (a token) or job (a row id)."""

    action: Action
    key: str


def read_press(data: str) -> Press | None:
    """The press ``data`` asks for; None for data no button of this bot carries."""
    if _DATA.fullmatch(data) is None:
        return None
    action, _, key = data.partition(":")
    return Press(action, key)  # type: ignore[arg-type]  # the pattern admits the three only


def cancel_button(row_id: int) -> Button:
    return Button(CANCEL, f"cancel:{row_id}")


def result_buttons(token: str, kept: KeptResult, pictures: int) -> list[Button]:
    """Again (and Vary, under one picture) for the result kept under ``token``, with their
    prices, so whoever presses knows the cost before anything is paid."""
    again = again_command(kept)
    buttons = [Button(f"{AGAIN} · {format_usd(again.estimate_micro())}", f"again:{token}")]
    if pictures == 1:
        vary = vary_command(kept)
        buttons.append(Button(f"{VARY} · {format_usd(vary.estimate_micro())}", f"vary:{token}"))
    return buttons


# What a kept request is made of, but its date (the ledger dates it by its own clock).
_KEPT_FIELDS = (
    "platform", "user_id", "command", "prompt", "model", "size", "n", "quality", "inputs", "outputs"
)  # fmt: skip


def kept_result(request: GenerateRequest | EditRequest, platform: str, user_id: str) -> KeptResult:
    """What the ledger keeps of a delivered ``request`` to ask for it again: its options, and
    its pictures as the platform's references (a file id, a message), never their bytes."""
    refs: list[str] = []
    if isinstance(request, EditRequest):
        refs = [image.ref for image in request.images]
        if request.mask is not None:
            refs.append(request.mask.ref)
    inputs = {"refs": refs, "mask": isinstance(request, EditRequest) and request.mask is not None}
    return KeptResult(
        platform=platform,
        user_id=user_id,
        command=request.kind,
        prompt=request.prompt,
        model=request.model.id,
        size=request.size,
        n=request.n,
        quality=request.quality,
        inputs=json.dumps(inputs),
        outputs="[]",
        created_at=datetime.now(UTC),  # the ledger dates it by its own clock
    )


def kept_json(kept: KeptResult) -> str:
    """``kept`` as JSON, to wait with a slow job for its result."""
    fields = {name: getattr(kept, name) for name in _KEPT_FIELDS}
    return json.dumps(fields)


def kept_of_json(text: str) -> KeptResult:
    """What ``kept_json`` wrote; ValueError, KeyError or TypeError for anything else."""
    fields = json.loads(text)
    return KeptResult(**{name: fields[name] for name in _KEPT_FIELDS}, created_at=datetime.now(UTC))


def input_refs(kept: KeptResult) -> list[str]:
    """The references of the kept request's pictures, in order (the mask last)."""
    return [str(ref) for ref in json.loads(kept.inputs)["refs"]]


def again_command(kept: KeptResult) -> ImageCommand:
    """The kept request as a command: same kind, prompt, model, size, n, quality and mask."""
    mask = bool(json.loads(kept.inputs)["mask"])
    return ImageCommand(
        kept.command,  # type: ignore[arg-type]  # the ledger keeps only the two kinds
        kept.prompt,
        model=kept.model,
        size=kept.size,
        n=kept.n,
        quality=kept.quality,
        mask=mask,
    )


def vary_command(kept: KeptResult) -> ImageCommand:
    """An ``/img2img`` of one kept picture with the same prompt: the same model and size when
    that model edits (the default edit model and size otherwise)."""
    model = find_model(kept.model)
    if model is None or not model.edits:
        return ImageCommand("img2img", kept.prompt)
    quality = kept.quality if kept.quality in model.qualities else None
    size = kept.size if kept.size in model.sizes else None
    return ImageCommand("img2img", kept.prompt, model=model.id, size=size, quality=quality)
