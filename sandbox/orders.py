"""Image requests: a JSON body validated as the real gateway does, into an ``Order``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from PIL import Image

from bot.catalog import DEFAULT_EDIT_MODEL, DEFAULT_SIZE, Model, find_model

_TAG = re.compile(r"#(\w+)")


class BadRequest(Exception):
    """A request the real gateway would answer 400; ``code`` goes in the error body."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Order:
    """A validated image request."""

    model: Model
    prompt: str
    size: str
    n: int
    quality: str | None
    source: bytes | None  # the first input image of an edit
    source_digest: str
    tags: frozenset[str]  # the prompt's #words, lower-case, without the #

    @property
    def price_micro(self) -> int:
        return self.model.price_micro(self.size, self.quality) * self.n


def parse_order(raw: bytes, *, edit: bool) -> Order:
    """Validate a JSON request body, or raise BadRequest.

    CPU-heavy for edits (megabytes of base64 to decode and check): call it in a thread.
    """
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object", "invalid_body")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt is required", "invalid_prompt")
    name = body.get("model", DEFAULT_EDIT_MODEL if edit else None)
    if not isinstance(name, str):
        raise BadRequest("model is required", "unknown_model")
    model = find_model(name)
    if model is None:
        raise BadRequest(f"Unknown model: {name}", "unknown_model")
    if not (model.edits if edit else model.generates):
        action = "edit" if edit else "generate"
        raise BadRequest(f"{model.id} cannot {action} images", "unsupported_model")
    size = body.get("size", DEFAULT_SIZE)
    if size not in model.sizes:
        supported = ", ".join(model.sizes)
        raise BadRequest(f"Invalid size {size} for {model.id}; use {supported}", "invalid_size")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= model.max_n:
        raise BadRequest(f"n must be between 1 and {model.max_n} for {model.id}", "invalid_n")
    quality = body.get("quality")
    if quality is not None and quality not in model.qualities:
        raise BadRequest(f"Invalid quality {quality} for {model.id}", "invalid_quality")
    source = _edit_source(body, model) if edit else None
    return Order(
        model=model,
        prompt=prompt,
        size=size,
        n=n,
        quality=quality,
        source=source,
        source_digest=hashlib.sha256(source).hexdigest() if source else "",
        tags=frozenset(tag.lower() for tag in _TAG.findall(prompt)),
    )


def _edit_source(body: dict[str, Any], model: Model) -> bytes:
    """Check an edit's images and mask; return the first image's bytes."""
    images = body.get("image")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images:
        raise BadRequest("image is required: a data URI or a list of them", "missing_image")
    if len(images) > model.max_inputs:
        message = f"Too many images: {model.id} takes at most {model.max_inputs}"
        raise BadRequest(message, "too_many_images")
    mask = body.get("mask")
    if mask is not None:
        if not model.mask:
            raise BadRequest(f"{model.id} does not support masks", "mask_not_supported")
        if len(images) > 1:
            message = "A mask can only be used with a single image"
            raise BadRequest(message, "mask_with_multiple_images")
        _decode_image(mask)
    decoded = [_decode_image(uri) for uri in images]  # every input must be a picture
    return decoded[0]


def _decode_image(uri: object) -> bytes:
    """The bytes of a PNG, JPEG or WebP data URI, or a BadRequest."""
    if isinstance(uri, str) and uri.startswith("data:image/"):
        header, _, payload = uri.partition(",")
        if header.endswith(";base64"):
            try:
                raw = base64.b64decode(payload, validate=True)
                with Image.open(BytesIO(raw), formats=("PNG", "JPEG", "WEBP")):
                    return raw
            except (ValueError, OSError, Image.DecompressionBombError):
                pass
    message = "image must be a base64 data URI of a PNG, JPEG or WebP image"
    raise BadRequest(message, "invalid_image")
