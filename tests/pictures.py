"""Small real pictures for tests to send as inputs."""

from __future__ import annotations

from io import BytesIO

from PIL import Image


def png(width: int = 64, height: int = 48, colour: str = "red") -> bytes:
    """A plain PNG of one colour."""
    out = BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()
