"""Placeholder pictures: what the sandbox draws instead of calling an image model.

Every function here is CPU-bound (Pillow, base64): the gateway calls them in threads.
"""

from __future__ import annotations

import base64
import hashlib
import random
import textwrap
from io import BytesIO

from PIL import Image, ImageDraw, ImageFont, ImageOps

from sandbox.orders import Order


def draw_placeholder(order: Order, index: int) -> bytes:
    """A PNG of the ordered size showing the prompt: the sandbox's stand-in for a picture."""
    if "wide" in order.tags:
        width, height = 4200, 200
    elif "huge" in order.tags:
        width, height = 2048, 2048
    else:
        width, height = map(int, order.size.split("x"))
    seed = hashlib.sha256(f"{order.prompt}\n{index}".encode()).digest()
    noisy = order.tags & {"big", "huge"}
    if noisy:
        # Random noise: PNG cannot shrink it much, and it saves fast. #big keeps 3 bits per
        # channel (~1.5 MB at 1024x1024); #huge keeps all 8 (~12 MB at 2048x2048).
        noise = random.Random(seed).randbytes(width * height * 3)
        canvas = Image.frombytes("RGB", (width, height), noise)
        if "huge" not in order.tags:
            canvas = canvas.point(lambda v: v & 0xE0)
    elif order.source is not None:
        with Image.open(BytesIO(order.source)) as source:
            canvas = ImageOps.fit(source.convert("RGB"), (width, height))
    else:
        canvas = Image.new("RGB", (width, height), (seed[0], seed[1], seed[2]))
    draw = ImageDraw.Draw(canvas)
    short = min(width, height)
    font_size = max(14, short // 16)
    font = ImageFont.load_default(size=font_size)
    char_width = font.getlength("abcdefghijklmnopqrstuvwxyz") / 26
    line_height = font_size * 1.25
    text = textwrap.fill(
        order.prompt,
        width=max(1, int(width * 0.85 / char_width)),
        max_lines=max(1, int(height * 0.6 / line_height)),
        placeholder=" …",
    )
    outline = {"stroke_width": max(1, font_size // 14), "stroke_fill": "black"}
    draw.multiline_text(
        (width / 2, height / 2),
        text,
        font=font,
        anchor="mm",
        align="center",
        fill="white",
        **outline,
    )
    label = f"SANDBOX · {order.model.id} · {order.size}"
    if order.n > 1:
        label += f" · {index + 1}/{order.n}"
    margin = short // 40
    label_font = ImageFont.load_default(size=max(10, short // 40))
    draw.text(
        (margin, height - margin), label, font=label_font, anchor="ld", fill="white", **outline
    )
    out = BytesIO()
    canvas.save(out, "PNG", compress_level=1 if noisy else 6)  # noise: save fast
    return out.getvalue()


def png_data_uri(png: bytes) -> bytes:
    """``png`` as a base64 data URI, the way gpt-image models hand pictures out; as bytes, for
    the gateway to splice into its JSON answers."""
    return b"data:image/png;base64," + base64.b64encode(png)
