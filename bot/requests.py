"""Typed image requests, and the one function that builds and validates them.

The text parser and Discord's slash commands both end in ``build_request``; every rejection
happens there, before any download or payment, as a ``UsageError`` that says what to change.
A built request holds everything needed to run it again later, its pictures included (each
with a reference to where the platform keeps it).
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from PIL import Image

from bot.catalog import DEFAULT_SIZE, MODELS, Model, choices, default_model, find_model
from bot.errors import UsageError
from bot.money import format_usd

Kind = Literal["imagegen", "img2img"]

MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUTS = max(model.max_inputs for model in MODELS) + 1  # the most a request takes, and a mask
MAX_TOTAL_INPUT_BYTES = 50 * 1024 * 1024  # all of one command's pictures, as the platform says
MAX_INPUT_PIXELS = 40_000_000  # decoding one takes up to 4 bytes a pixel
MAX_PROMPT_CHARS = 4000
MAX_N = 4

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
_SIZE = re.compile(r"^(\d{1,5})\s*[xX\u00d7*]\s*(\d{1,5})$")


def detect_mime(data: bytes) -> str | None:
    """``image/png``, ``image/jpeg`` or ``image/webp`` from the file's first bytes, else None."""
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_declared(sizes: Sequence[int | None]) -> None:
    """Refuse, before any download, more pictures than a request can take or too many bytes.

    ``sizes`` are what the platform says of each file (None when it does not say).
    """
    if len(sizes) > MAX_INPUTS:
        raise UsageError(
            f"That's {len(sizes)} images; /img2img takes at most {MAX_INPUTS} "
            "(pictures and a mask). Send fewer."
        )
    if sum(size or 0 for size in sizes) > MAX_TOTAL_INPUT_BYTES:
        raise UsageError(
            f"Those images are over {MAX_TOTAL_INPUT_BYTES // 1_048_576} MB together; "
            "send fewer or smaller ones."
        )


@dataclass(frozen=True)
class ImageInput:
    """One picture the user gave, and where the platform keeps it (a file id, a message)."""

    data: bytes = field(repr=False)
    ref: str = ""

    @property
    def mime(self) -> str | None:
        """The format read from the bytes; None for anything but PNG, JPEG or WebP."""
        return detect_mime(self.data)


@dataclass(frozen=True)
class ImageRequest:
    """What every image request has: a prompt, a model and how to draw."""

    kind: ClassVar[Kind]
    prompt: str
    model: Model
    size: str
    n: int
    quality: str | None

    @property
    def estimate_micro(self) -> int:
        return self.model.price_micro(self.size, self.quality) * self.n

    def price_line(self, micro: int) -> str:
        """``nano-banana · 1024x1024 · $0.0525``, for status lines and captions."""
        return price_line(self.model.name, self.size, micro)


def price_line(model_name: str, size: str, micro: int) -> str:
    """``nano-banana · 1024x1024 · $0.0525``: the model, the size and what it costs."""
    return f"{model_name} · {size} · {format_usd(micro)}"


@dataclass(frozen=True)
class GenerateRequest(ImageRequest):
    """``/imagegen``: draw ``n`` images from text."""

    kind: ClassVar[Kind] = "imagegen"


@dataclass(frozen=True)
class EditRequest(ImageRequest):
    """``/img2img``: edit or fuse ``images``, optionally inside ``mask``."""

    kind: ClassVar[Kind] = "img2img"
    images: tuple[ImageInput, ...] = ()
    mask: ImageInput | None = None


@dataclass(frozen=True)
class ImageCommand:
    """An image command as the user gave it, before validation: the typed values of its options.

    The text parser and the slash commands make one; ``check`` refuses what can be refused
    before its pictures are downloaded, ``build`` makes the request once they are.
    """

    kind: Kind
    prompt: str
    model: str | None = None
    size: str | None = None
    n: int | str | None = None
    quality: str | None = None
    mask: bool = False

    def check(self) -> None:
        """Raise ``UsageError`` for anything wrong that does not need the pictures."""
        _options(self)

    def estimate_micro(self) -> int:
        """What the command costs at catalog prices; ``UsageError`` as ``check`` raises it."""
        model, size, n, quality = _options(self)
        return model.price_micro(size, quality) * n

    def build(self, images: Sequence[ImageInput] = ()) -> GenerateRequest | EditRequest:
        return build_request(
            self.kind,
            self.prompt,
            model=self.model,
            size=self.size,
            n=self.n,
            quality=self.quality,
            images=images,
            mask=self.mask,
        )


def build_request(
    kind: Kind,
    prompt: str,
    *,
    model: str | None = None,
    size: str | None = None,
    n: int | str | None = None,
    quality: str | None = None,
    images: Sequence[ImageInput] = (),
    mask: bool = False,
) -> GenerateRequest | EditRequest:
    """Validate the typed values of one image command and build its request.

    ``images`` are the pictures in order (replied-to first); with ``mask`` the last one is the
    mask. ``/imagegen`` ignores pictures. Raises ``UsageError`` saying what to change.
    """
    command = ImageCommand(kind, prompt, model, size, n, quality, mask)
    chosen, width_height, count, level = _options(command)
    prompt = prompt.strip()
    if kind == "imagegen":
        return GenerateRequest(prompt, chosen, width_height, count, level)
    return _edit_request(
        EditRequest(prompt, chosen, width_height, count, level), tuple(images), mask
    )


def _options(command: ImageCommand) -> tuple[Model, str, int, str | None]:
    editing = command.kind == "img2img"
    model = _resolve_model(command.model, editing)
    size = _resolve_size(command.size, model)
    n = _resolve_n(command.n, model)
    quality = _resolve_quality(command.quality, model)
    prompt = command.prompt.strip()
    if not prompt:
        example = "make it a watercolor" if editing else "a fox in the snow"
        raise UsageError(f"Say what to draw, e.g. /{command.kind} {example}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UsageError(
            f"The prompt is {len(prompt):,} characters; keep it under {MAX_PROMPT_CHARS:,}."
        )
    if command.mask and not editing:
        raise UsageError("--mask works only with /img2img.")
    return model, size, n, quality


def _resolve_model(name: str | None, editing: bool) -> Model:
    if name is None or not name.strip():
        return default_model(editing=editing)
    model = find_model(name)
    if model is None:
        raise UsageError(f"Unknown model {name.strip()[:40]!r}. See /models for the list.")
    if editing and not model.edits:
        editors = ", ".join(m.name for m in choices(editing=True))
        raise UsageError(f"{model.name} can't edit images. For /img2img use one of: {editors}.")
    if not editing and not model.generates:
        raise UsageError(f"{model.name} only edits images; use it with /img2img.")
    return model


def _resolve_size(text: str | None, model: Model) -> str:
    if text is None or not text.strip():
        return DEFAULT_SIZE if DEFAULT_SIZE in model.sizes else model.sizes[0]
    match = _SIZE.match(text.strip())
    if match is None:
        raise UsageError(f"Size {text.strip()[:20]!r} should look like 1024x1024.")
    size = f"{int(match.group(1))}x{int(match.group(2))}"
    if size not in model.sizes:
        raise UsageError(f"{model.name} can't make {size}. Pick one of: {', '.join(model.sizes)}.")
    return size


def _resolve_n(value: int | str | None, model: Model) -> int:
    if value is None:
        return 1
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_N:
        raise UsageError(f"--n must be a whole number from 1 to {MAX_N}.")
    n = int(text)
    if n > model.max_n:
        raise UsageError(f"{model.name} makes {model.max_n} image per request; drop --n.")
    return n


def _resolve_quality(text: str | None, model: Model) -> str | None:
    if text is None or not text.strip():
        return model.qualities[0] if model.qualities else None
    if not model.qualities:
        having = [m.name for m in MODELS if m.qualities]
        raise UsageError(f"{model.name} has no --quality setting (only {', '.join(having)} has).")
    quality = text.strip().lower()
    if quality not in model.qualities:
        raise UsageError(f"--quality must be one of: {', '.join(model.qualities)}.")
    return quality


def _edit_request(
    request: EditRequest, images: tuple[ImageInput, ...], masked: bool
) -> EditRequest:
    for index, image in enumerate(images, 1):
        _check_image(image, index)
    if not images:
        raise UsageError(
            "Attach the image to edit, or reply to a message that has one, "
            "then write /img2img and what to change."
        )
    model = request.model
    mask = None
    if masked:
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
    return EditRequest(
        request.prompt, model, request.size, request.n, request.quality, images, mask
    )


def _check_image(image: ImageInput, index: int) -> None:
    if image.mime is None:
        raise UsageError(f"Image {index} is not a PNG, JPEG or WebP file; send one of those.")
    if len(image.data) > MAX_INPUT_BYTES:
        raise UsageError(
            f"Image {index} is {len(image.data) / 1_048_576:.1f} MB; the limit is "
            f"{MAX_INPUT_BYTES // 1_048_576} MB per image."
        )


async def decode_inputs(request: EditRequest) -> None:
    """Decode every picture of ``request`` once, in a worker thread, before anything is paid.

    Raises ``UsageError`` for a picture over ``MAX_INPUT_PIXELS``, one that is cut short or
    damaged, and one with other data after the picture's end (a polyglot file).
    """
    images = (*request.images, *((request.mask,) if request.mask else ()))
    await asyncio.to_thread(_decode_all, images)


def _decode_all(images: Sequence[ImageInput]) -> None:
    for index, image in enumerate(images, 1):
        _decode(image, index)


def _decode(image: ImageInput, index: int) -> None:
    damaged = UsageError(
        f"Image {index} is not a whole PNG, JPEG or WebP file (it is cut short, damaged or has "
        "other data attached); send the picture itself."
    )
    mime = image.mime
    if mime is None or _image_end(image.data, mime) != len(image.data):
        raise damaged
    try:
        with Image.open(io.BytesIO(image.data), formats=[_FORMATS[mime]]) as picture:
            width, height = picture.size
            if width * height <= MAX_INPUT_PIXELS:
                picture.load()
    except Image.DecompressionBombError:
        width = height = MAX_INPUT_PIXELS
    except (OSError, SyntaxError, ValueError, EOFError):
        raise damaged from None
    if width * height > MAX_INPUT_PIXELS:
        raise UsageError(
            f"Image {index} has too many pixels; the limit is "
            f"{MAX_INPUT_PIXELS // 1_000_000} megapixels per image. Send a smaller one."
        )


def _image_end(data: bytes, mime: str) -> int | None:
    """Where the picture's own bytes end (after PNG's IEND, JPEG's EOI, WebP's RIFF size)."""
    if mime == "image/webp":
        return 8 + int.from_bytes(data[4:8], "little")
    if mime == "image/png":
        return _png_end(data)
    return _jpeg_end(data)


def _png_end(data: bytes) -> int | None:
    pos = 8
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos
    return None


def _jpeg_end(data: bytes) -> int | None:
    pos = 2
    while pos + 2 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            return pos + 2
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # entropy-coded data, up to the next real marker
            while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
                following = data[pos + 1]
                if following != 0 and not 0xD0 <= following <= 0xD7 and following != 0xFF:
                    break
                pos += 1 if following == 0xFF else 2
            else:
                return None
    return None
