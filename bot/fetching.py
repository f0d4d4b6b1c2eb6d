"""Reading what an untrusted gateway sends: bounded bodies, public addresses, plain words."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from urllib.parse import urlsplit

import httpx

from bot.answer_json import AnswerDecoder, DecodedAnswer
from bot.requests import MAX_N

log = logging.getLogger(__name__)

# A 402 quote, a 202 job, an error: JSON of a few hundred bytes.
MAX_SMALL_BODY_BYTES = 64 * 1024
# One picture's file: a 4096x4096 RGB picture stored uncompressed (48 MiB) fits.
MAX_PICTURE_BYTES = 50 * 1024 * 1024
_DATA_URI_BYTES = len("data:image/webp;base64,") + 4 * -(-MAX_PICTURE_BYTES // 3)
# A paid answer: MAX_N such pictures as base64 data URIs and the JSON around them (~267 MiB).
MAX_ANSWER_BYTES = MAX_N * _DATA_URI_BYTES + MAX_SMALL_BODY_BYTES

_TOO_LARGE = "imagebot_too_large"
_DECODED = "imagebot_decoded"
_ENCODING_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(
    r"(?i)\b(?:[a-z][a-z0-9+.-]*://|www\.)\S*|\b[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}\b(?:/\S*)?"
)
_MENTION = re.compile(r"<[@#][!&]?\d*>|@\S*")
_MARKUP = str.maketrans("", "", "*`~|<>[]#\\")


async def read_capped(
    response: httpx.Response, limit: int, *, pictures: bool = False
) -> httpx.Response:
    """A streamed ``response`` read to its end, at most ``limit`` decompressed bytes.

    Over the limit, the result has no body and ``too_large`` says so. With ``pictures``, data-URI
    pictures are decoded as they arrive: the body keeps the JSON around them, and
    ``decoded_answer`` has them. The caller closes the streamed response.
    """
    chunks: list[bytes] = []
    decoder = AnswerDecoder() if pictures else None
    size = 0
    async for chunk in response.aiter_bytes():  # decoded: a gzip bomb counts as what it inflates to
        size += len(chunk)
        if size > limit:
            log.warning(
                "gateway answer (HTTP %d) over %d bytes; dropped", response.status_code, limit
            )
            chunks, decoder = [], None
            break
        if decoder is not None:
            decoder.feed(chunk)
        else:
            chunks.append(chunk)
    answer = decoder.finish() if decoder is not None else DecodedAnswer(b"".join(chunks))
    del chunks, decoder
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in _ENCODING_HEADERS
    ]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=answer.text,
        request=response.request,
        extensions={**response.extensions, _TOO_LARGE: size > limit, _DECODED: answer},
    )


def decoded_answer(response: httpx.Response) -> DecodedAnswer:
    """The body ``read_capped`` read, with the pictures it decoded on the way."""
    answer: DecodedAnswer = response.extensions[_DECODED]
    return answer


def too_large(response: httpx.Response) -> bool:
    """Whether ``read_capped`` dropped this answer's body for being over its limit."""
    return bool(response.extensions.get(_TOO_LARGE))


async def is_public(url: str) -> bool:
    """Whether every address ``url``'s host resolves to is public: never loopback, private,
    link-local (cloud metadata), multicast or reserved. Resolves without blocking the loop;
    OSError when the host does not resolve."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    return bool(found) and all(_public(str(address[0])) for *_, address in found)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def plain_reason(text: str, limit: int = 120) -> str:
    """Gateway words made safe to show in a chat: no links, mentions, markup or control
    characters, whitespace collapsed, at most ``limit`` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = _LINK.sub(" ", _MARKDOWN_LINK.sub(r"\1", text))
    text = " ".join(_MENTION.sub(" ", text).translate(_MARKUP).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
