"""The command parser: chat text plus attached images in, a typed request out.

Pure: no I/O. Every rejection happens here, before any payment, as a ``UsageError``
whose message tells the user exactly what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.catalog import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_GENERATE_MODEL,
    DEFAULT_SIZE,
    MODELS,
    Model,
    find_model,
    get_model,
)
from bot.errors import UsageError
from bot.money import format_usd

MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_PROMPT_CHARS = 4000
MAX_N = 4
PLATFORMS = ("telegram", "discord", "console")

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201e": "\u201c", "\u2018": "\u2019"}
_COMMAND = re.compile(r"/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?=\s|$)")
_SIZE = re.compile(r"^(\d{1,5})\s*[xX\u00d7*]\s*(\d{1,5})$")
_USER = re.compile(r"^(?:(telegram|discord|console):(-?\w+)|@(\w{1,64}))$", re.IGNORECASE)
_LONG_FLAG = re.compile(r"^--[A-Za-z][A-Za-z0-9-]*(=.*)?$", re.DOTALL)


@dataclass(frozen=True)
class ImageInput:
    """One image the user attached, with its format detected from the bytes."""

    data: bytes
    mime: str


@dataclass(frozen=True)
class GenerateRequest:
    """``/imagegen``: draw ``n`` images from text."""

    prompt: str
    model: Model
    size: str
    n: int
    quality: str | None

    @property
    def estimate_micro(self) -> int:
        return self.model.price_micro(self.size, self.quality) * self.n


@dataclass(frozen=True)
class EditRequest:
    """``/img2img``: edit or fuse ``images``, optionally inside ``mask``."""

    prompt: str
    model: Model
    size: str
    n: int
    quality: str | None
    images: tuple[ImageInput, ...]
    mask: ImageInput | None

    @property
    def estimate_micro(self) -> int:
        return self.model.price_micro(self.size, self.quality) * self.n


@dataclass(frozen=True)
class SpendQuery:
    """``/spend``: ``who`` is ``None`` (the caller), ``"all"``, or ``platform:id`` / ``@name``."""

    who: str | None


@dataclass(frozen=True)
class Help:
    """``/help`` and ``/start``."""


@dataclass(frozen=True)
class Models:
    """``/models``."""


Request = GenerateRequest | EditRequest | SpendQuery | Help | Models

USAGE = {
    "imagegen": "/imagegen [--model NAME] [--size WxH] [--n N] PROMPT",
    "img2img": "/img2img [--model NAME] [--size WxH] [--mask] PROMPT (attach or reply to images)",
}


def detect_mime(data: bytes) -> str | None:
    """``image/png``, ``image/jpeg`` or ``image/webp`` from the file's first bytes, else None."""
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def parse(
    text: str, attachments: tuple[bytes, ...] = (), *, bot_username: str | None = None
) -> Request | None:
    """Parse one chat message. ``None`` means it is not a command for this bot.

    ``attachments`` are the raw image files in order (replied-to images first).
    Raises ``UsageError`` when the command is ours but cannot run as written.
    """
    command = _command(text, bot_username)
    if command is None:
        return None
    name, rest = command
    if name in ("help", "start"):
        return Help()
    if name == "models":
        return Models()
    if name == "spend":
        return _parse_spend(rest)
    if name in ("imagegen", "img2img"):
        return _parse_image_command(name, rest, attachments)
    return None


def wants_images(text: str, *, bot_username: str | None = None) -> bool:
    """Whether ``text`` is an /img2img for this bot, so its images are worth downloading."""
    command = _command(text, bot_username)
    return command is not None and command[0] == "img2img"


def _command(text: str, bot_username: str | None) -> tuple[str, str] | None:
    """The command's lowercase name and the text after it, unless it is for another bot."""
    stripped = text.strip()
    match = _COMMAND.match(stripped)
    if match is None:
        return None
    addressee = match.group(2)
    if addressee and bot_username and addressee.lower() != bot_username.lower().lstrip("@"):
        return None
    return match.group(1).lower(), stripped[match.end() :]


def take_image_paths(text: str) -> tuple[str, list[str]]:
    """Split console-only ``--image PATH`` flags out of a command line.

    Returns the text without them (everything else untouched) and the paths in order.
    Only the console adapter, whose user is the local operator, may read named files.
    """
    tokens = _tokens(text)
    cuts: list[tuple[int, int]] = []
    paths: list[str] = []
    index = 0
    while index < len(tokens):
        token, start, end = tokens[index]
        if token == "--":
            break
        if token.startswith("--image="):
            paths.append(token.removeprefix("--image="))
            cuts.append((start, end))
        elif token == "--image":
            if index + 1 >= len(tokens):
                raise UsageError("--image needs a file path, e.g. --image ~/photo.png")
            paths.append(tokens[index + 1][0])
            cuts.append((start, tokens[index + 1][2]))
            index += 1
        index += 1
    for start, end in reversed(cuts):
        text = text[:start] + text[end:]
    return text, paths


def _parse_spend(rest: str) -> SpendQuery:
    words = rest.split()
    if not words:
        return SpendQuery(None)
    if len(words) > 1:
        raise UsageError("Use /spend, /spend all, or /spend USER (platform:id or @name).")
    who = words[0]
    if who.lower() == "all":
        return SpendQuery("all")
    if _USER.match(who) is None:
        raise UsageError(
            f"I don't know the user {who[:40]!r}. Write it as platform:id "
            "(e.g. telegram:12345) or @name."
        )
    return SpendQuery(who.lower() if ":" in who else who)


@dataclass
class _Flags:
    model: str | None = None
    size: str | None = None
    n: str | None = None
    quality: str | None = None
    mask: bool = False


_VALUE_FLAGS = {
    "--model": "model",
    "-m": "model",
    "--size": "size",
    "-s": "size",
    "--n": "n",
    "-n": "n",
    "--quality": "quality",
    "-q": "quality",
}


def _parse_image_command(
    name: str, rest: str, attachments: tuple[bytes, ...]
) -> GenerateRequest | EditRequest:
    flags, prompt = _split_flags(name, rest)
    editing = name == "img2img"
    model = _resolve_model(flags.model, editing)
    size = _resolve_size(flags.size, model)
    n = _resolve_n(flags.n, model)
    quality = _resolve_quality(flags.quality, model)
    if not prompt:
        example = "make it a watercolor" if editing else "a fox in the snow"
        raise UsageError(f"Say what to draw, e.g. /{name} {example}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UsageError(
            f"The prompt is {len(prompt):,} characters; keep it under {MAX_PROMPT_CHARS:,}."
        )
    if not editing:
        if flags.mask:
            raise UsageError("--mask works only with /img2img.")
        return GenerateRequest(prompt, model, size, n, quality)
    images = tuple(_check_image(data, index) for index, data in enumerate(attachments, 1))
    return _edit_request(prompt, model, size, n, quality, images, flags.mask)


def _split_flags(name: str, rest: str) -> tuple[_Flags, str]:
    """Take the flags out of ``rest``; the prompt is what remains, as the user wrote it."""
    spans = _tokens(rest)
    flags = _Flags()
    kept: list[int] = []  # indexes of prompt tokens
    index = 0
    while index < len(spans):
        token = spans[index][0]
        index += 1
        if token == "--":
            kept.extend(range(index, len(spans)))
            break
        if token == "--mask":
            flags.mask = True
            continue
        flag, has_inline, inline = token.partition("=")
        if flag in _VALUE_FLAGS and (has_inline or flag == token):
            if has_inline:
                value = inline
            elif index < len(spans):
                value = spans[index][0]
                index += 1
            else:
                value = ""
            if not value.strip():
                raise UsageError(f"{flag} needs a value. Usage: {USAGE[name]}")
            setattr(flags, _VALUE_FLAGS[flag], value.strip())
            continue
        if token == "--image":
            raise UsageError(
                "Attach the picture to your message or reply to it; "
                "I don't read files or links named in a command."
            )
        if _LONG_FLAG.match(token) or re.fullmatch(r"-[A-Za-z]", token):
            raise UsageError(
                f"Unknown flag {token.split('=')[0][:30]}. Usage: {USAGE[name]} "
                "(put -- before a prompt that starts with a dash)"
            )
        kept.append(index - 1)
    return flags, _prompt(rest, spans, kept)


def _prompt(rest: str, spans: list[tuple[str, int, int]], kept: list[int]) -> str:
    """Rejoin the prompt tokens, keeping the user's own spacing between neighbours."""
    if len(kept) == 1:  # a prompt given as one quoted string loses its quotes
        return spans[kept[0]][0].strip()
    parts: list[str] = []
    for position, index in enumerate(kept):
        _, start, end = spans[index]
        if position:
            previous = kept[position - 1]
            parts.append(rest[spans[previous][2] : start] if previous == index - 1 else " ")
        parts.append(rest[start:end])
    return "".join(parts).strip()


def _resolve_model(name: str | None, editing: bool) -> Model:
    if name is None:
        return get_model(DEFAULT_EDIT_MODEL if editing else DEFAULT_GENERATE_MODEL)
    model = find_model(name)
    if model is None:
        raise UsageError(f"Unknown model {name[:40]!r}. See /models for the list.")
    if editing and not model.edits:
        editors = ", ".join(m.name for m in (m for m in MODELS if m.edits))
        raise UsageError(f"{model.name} can't edit images. For /img2img use one of: {editors}.")
    if not editing and not model.generates:
        raise UsageError(f"{model.name} only edits images; use it with /img2img.")
    return model


def _resolve_size(text: str | None, model: Model) -> str:
    if text is None:
        return DEFAULT_SIZE if DEFAULT_SIZE in model.sizes else model.sizes[0]
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"Size {text[:20]!r} should look like 1024x1024.")
    size = f"{int(match.group(1))}x{int(match.group(2))}"
    if size not in model.sizes:
        raise UsageError(f"{model.name} can't make {size}. Pick one of: {', '.join(model.sizes)}.")
    return size


def _resolve_n(text: str | None, model: Model) -> int:
    if text is None:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= MAX_N:
        raise UsageError(f"--n must be a whole number from 1 to {MAX_N}.")
    n = int(text)
    if n > model.max_n:
        raise UsageError(f"{model.name} makes {model.max_n} image per request; drop --n.")
    return n


def _resolve_quality(text: str | None, model: Model) -> str | None:
    if text is None:
        return model.qualities[0] if model.qualities else None
    if not model.qualities:
        having = [m.name for m in MODELS if m.qualities]
        raise UsageError(f"{model.name} has no --quality setting (only {', '.join(having)} has).")
    quality = text.lower()
    if quality not in model.qualities:
        raise UsageError(f"--quality must be one of: {', '.join(model.qualities)}.")
    return quality


def _check_image(data: bytes, index: int) -> ImageInput:
    mime = detect_mime(data)
    if mime is None:
        raise UsageError(f"Image {index} is not a PNG, JPEG or WebP file; send one of those.")
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(
            f"Image {index} is {len(data) / 1_048_576:.1f} MB; the limit is "
            f"{MAX_INPUT_BYTES // 1_048_576} MB per image."
        )
    return ImageInput(data, mime)


def _edit_request(
    prompt: str,
    model: Model,
    size: str,
    n: int,
    quality: str | None,
    images: tuple[ImageInput, ...],
    mask_flag: bool,
) -> EditRequest:
    if not images:
        raise UsageError(
            "Attach the image to edit, or reply to a message that has one, "
            "then write /img2img and what to change."
        )
    mask = None
    if mask_flag:
        if not model.mask:
            maskers = ", ".join(m.name for m in MODELS if m.mask)
            raise UsageError(f"{model.name} can't use a mask. Masks work with: {maskers}.")
        if len(images) != 2:
            raise UsageError(
                "With --mask send exactly two images: the picture, then the mask "
                "(white = area to edit)."
            )
        images, mask = images[:1], images[1]
    if len(images) > model.max_inputs:
        raise UsageError(
            f"{model.name} takes at most {model.max_inputs} images; you sent {len(images)}."
        )
    return EditRequest(prompt, model, size, n, quality, images, mask)


def describe_price(request: GenerateRequest | EditRequest) -> str:
    """``nano-banana · 1024x1024 · $0.0525`` for status messages and captions."""
    count = f" · {request.n} images" if request.n > 1 else ""
    return f"{request.model.name} · {request.size}{count} · {format_usd(request.estimate_micro)}"


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """Split on whitespace into (token, start, end); a quote opening a word runs to its close.

    Apostrophes inside words (``fox's``) and unmatched quotes stay literal, so ordinary
    prose never fails to parse.
    """
    tokens: list[tuple[str, int, int]] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char.isspace():
            index += 1
            continue
        closing = _QUOTES.get(char)
        if closing is not None:
            end = _closing_quote(text, index + 1, closing)
            if end != -1:
                tokens.append((text[index + 1 : end], index, end + 1))
                index = end + 1
                continue
        word: list[str] = []
        end = index
        while end < length and not text[end].isspace():
            closing = _QUOTES.get(text[end + 1]) if end + 1 < length else None
            if text[end] == "=" and closing is not None:  # --flag="a value"
                close = _closing_quote(text, end + 2, closing)
                if close != -1:
                    word.append(text[end : end + 1] + text[end + 2 : close])
                    end = close + 1
                    break
            word.append(text[end])
            end += 1
        tokens.append(("".join(word), index, end))
        index = end
    return tokens


def _closing_quote(text: str, start: int, closing: str) -> int:
    """Index of a closing quote that ends a word (followed by space or the end), or -1."""
    position = text.find(closing, start)
    while position != -1:
        after = position + 1
        if after == len(text) or text[after].isspace():
            return position
        position = text.find(closing, after)
    return -1
