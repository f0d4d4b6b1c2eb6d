"""JSON from a gateway: bounded in nesting, and a paid answer's data-URI pictures decoded from
its bytes as they arrive.

BlockRun sends a picture as ``"data:image/png;base64,…"``: megabytes of text. Read whole,
parsed into a str and then decoded, it is held three times over and costs most of a large
result's CPU. ``AnswerDecoder`` instead decodes each payload chunk by chunk as the body streams
in (pybase64, SIMD) and keeps only the JSON around it, with a short marker in its place.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import pybase64

_OPENING = b'"data:image/'
_BASE64 = b";base64,"
_MAX_PREFIX = 64  # '"data:image/<type>;base64,' is shorter than this
_PREFIX = re.compile(rb'"data:image/[A-Za-z0-9.+-]{1,40};base64,')
# Far more than any answer nests. json's C parser recurses once per level, and eth-account's
# py_ecc raises Python's recursion limit to 100,000: 64 KiB of '[' would overflow the C stack.
MAX_OPENINGS = 10_000


def loads(text: bytes) -> Any:
    """``json.loads`` for what a gateway sends: ValueError, never a crash, when ``text`` is not
    JSON or opens more than ``MAX_OPENINGS`` arrays and objects (nested or not)."""
    if text.count(b"[") + text.count(b"{") > MAX_OPENINGS:
        raise ValueError("JSON with too many arrays and objects")
    try:
        return json.loads(text)
    except RecursionError:  # under Python's own recursion limit
        raise ValueError("JSON nested too deeply") from None


@dataclass
class DecodedAnswer:
    """A body as ``AnswerDecoder`` left it: the JSON text, with a marker string where each
    picture was, and the pictures."""

    text: bytes
    marker: str = ""
    pictures: list[bytes] = field(default_factory=list)

    def parse(self) -> Any:
        """The JSON, where each field of an item of ``data`` that was a data-URI picture is its
        bytes; a marker anywhere else stays a string, which nothing reads as a picture.
        ValueError when the body was not JSON."""
        answer = loads(self.text)
        items = answer.get("data") if isinstance(answer, dict) else None
        for item in items if isinstance(items, list) and self.pictures else ():
            for key, value in item.items() if isinstance(item, dict) else ():
                if isinstance(value, str) and value.startswith(self.marker):
                    index = value[len(self.marker) :]
                    if index.isdigit() and int(index) < len(self.pictures):
                        item[key] = self.pictures[int(index)]
        return answer


class AnswerDecoder:
    """Takes a body chunk by chunk; pictures are decoded as their base64 arrives.

    A payload that is not strict base64 (say, with JSON escapes such as ``\\/`` in it) turns the
    decoder into a plain reader of the whole body: the pictures so far are encoded back into
    the text, and what follows is kept as it comes.
    """

    def __init__(self) -> None:
        self._marker = f"imagebot-picture-{secrets.token_hex(8)}-"
        self._text: list[bytes] = []  # the JSON outside the pictures, in pieces (no regrowing)
        self._pending = b""  # the end of the last chunk: maybe the start of a picture
        self._pictures: list[bytes] = []
        self._prefixes: list[bytes] = []  # each picture's '"data:image/…;base64,'
        self._pieces: list[bytes] | None = None  # the picture being decoded
        self._quartet = b""  # its last base64 characters, fewer than 4, not decoded yet
        self._padding = b""  # its last quartet, when it has '=': only a closing quote may follow
        self._plain: list[bytes] | None = None  # the body as it came, once given up on pictures

    def feed(self, chunk: bytes) -> None:
        if self._plain is not None:
            self._plain.append(chunk)
            return
        data = self._pending + chunk if self._pending else chunk
        self._pending = b""
        position = 0
        while position < len(data) and self._plain is None:
            if self._pieces is None:
                position = self._outside(data, position)
            else:
                position = self._inside(data, position)
        if self._plain is not None:
            self._plain.append(data[position:])

    def finish(self) -> DecodedAnswer:
        """The body read so far, once it has all arrived."""
        if self._pieces is not None:  # the body ended inside a picture: let json say so
            self._give_up()
        if self._plain is not None:
            return DecodedAnswer(b"".join(self._plain))
        self._text.append(self._pending)
        return DecodedAnswer(b"".join(self._text), self._marker, self._pictures)

    def _outside(self, data: bytes, position: int) -> int:
        """Copy JSON text up to the next picture and step into it; where the data ends."""
        opening = data.find(_OPENING, position)
        if opening == -1:
            last_quote = data.rfind(b'"', max(position, len(data) - len(_OPENING) + 1))
            keep = (
                last_quote
                if last_quote != -1 and _OPENING.startswith(data[last_quote:])
                else len(data)
            )
            self._text.append(data[position:keep])
            self._pending = data[keep:]
            return len(data)
        comma = data.find(_BASE64, opening, opening + _MAX_PREFIX)
        if comma == -1 and len(data) - opening < _MAX_PREFIX:  # the prefix may go on
            self._text.append(data[position:opening])
            self._pending = data[opening:]
            return len(data)
        before = data[opening - 1 : opening] if opening else self._last_text_byte()
        prefix = comma != -1 and _PREFIX.fullmatch(data, opening, comma + len(_BASE64))
        if not prefix or before == b"\\":  # not a picture, or a quote inside a string
            self._text.append(data[position : opening + 1])
            return opening + 1
        self._text.append(data[position:opening])
        start = comma + len(_BASE64)
        self._prefixes.append(data[opening:start])
        self._pieces, self._quartet, self._padding = [], b"", b""
        return start

    def _last_text_byte(self) -> bytes:
        return next((piece[-1:] for piece in reversed(self._text) if piece), b"")

    def _inside(self, data: bytes, position: int) -> int:
        """Decode the picture's base64 up to its closing quote or the data's end; where the
        data not yet taken in starts."""
        assert self._pieces is not None
        closing = data.find(b'"', position)
        end = len(data) if closing == -1 else closing
        if self._quartet:  # complete the quartet the last chunk began
            taken = min(4 - len(self._quartet), end - position)
            head = self._quartet + data[position : position + taken]
            if len(head) < 4 and closing == -1:
                self._quartet = head
                return len(data)
            if len(head) < 4 or not self._decode(head):
                self._give_up()
                return position
            self._quartet, position = b"", position + taken
        whole = (end - position) // 4 * 4
        if whole and not self._decode(memoryview(data)[position : position + whole]):
            self._give_up()
            return position
        position += whole
        if closing == -1:
            self._quartet = data[position:end]
            return len(data)
        if position != end:  # base64 that does not end on a whole quartet
            self._give_up()
            return position
        if self._padding:
            self._pieces.append(pybase64.b64decode(self._padding))
        self._pictures.append(b"".join(self._pieces))
        self._text.append(f'"{self._marker}{len(self._pictures) - 1}"'.encode())
        self._pieces = None
        return closing + 1

    def _decode(self, base64: bytes | memoryview) -> bool:
        """Decode whole quartets into the picture; False when they are not strict base64 or
        follow padding. A padded last quartet is kept as it came (its spare bits may be set),
        and decoded once the closing quote shows it was the last."""
        assert self._pieces is not None
        if self._padding:
            return False
        padded = bytes(base64[-1:]) == b"="
        whole = base64[:-4] if padded else base64
        try:
            piece = pybase64.b64decode(whole, validate=True)
            if padded:
                pybase64.b64decode(base64[-4:], validate=True)
        except ValueError:
            return False
        self._pieces.append(piece)
        self._padding = bytes(base64[-4:]) if padded else b""
        return True

    def _give_up(self) -> None:
        """Become a plain reader: the pictures so far go back into the text as base64. The
        caller adds the data it had not consumed yet."""
        plain = bytearray()
        text = b"".join(self._text)
        for index, (prefix, picture) in enumerate(
            zip(self._prefixes, self._pictures, strict=False)
        ):
            marker = f'"{self._marker}{index}"'.encode()
            before, _, text = text.partition(marker)
            plain += before + prefix + pybase64.b64encode(picture) + b'"'
        plain += text
        if self._pieces is not None:  # the picture being read, as far as it went
            decoded = pybase64.b64encode(b"".join(self._pieces))
            plain += self._prefixes[-1] + decoded + self._padding + self._quartet
        self._plain = [bytes(plain)]
        self._pieces = None


def parse_answer(body: bytes) -> Any:
    """``body`` parsed as ``AnswerDecoder`` would: pictures of ``data`` items as bytes."""
    decoder = AnswerDecoder()
    decoder.feed(body)
    return decoder.finish().parse()
