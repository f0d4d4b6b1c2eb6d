"""Lifecycle in one place: build the HTTP client, payer, image service and bot; close them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from httpx_aiohttp import HttpxAiohttpClient

from bot.config import Settings
from bot.images import ImageService
from bot.ledger import Ledger
from bot.service import ImageBot
from bot.x402 import Wallet, X402Payer

log = logging.getLogger(__name__)

# Keeps secrets out of logs: httpx logs each request URL at INFO, and Telegram's carries the token.
_QUIET_LOGGERS = ("httpx", "httpcore", "aiohttp.access")
GATEWAY_CONNECTIONS = 100


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def gateway_client(max_connections: int = GATEWAY_CONNECTIONS) -> httpx.AsyncClient:
    """The httpx client every gateway call goes through.

    httpx's API with aiohttp's connection pool underneath: httpcore's pool costs ~10 ms of CPU
    per paid request at 50 concurrent requests and ~25 ms at 500; aiohttp's ~1 ms (bench/README).
    """
    return HttpxAiohttpClient(
        limits=pool_limits(max_connections),
        timeout=httpx.Timeout(120.0, connect=10.0),
        event_hooks=FREE_WHEN_CLOSED,
    )


def pool_limits(connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections)


class _Unbinding(httpx.AsyncByteStream):
    """Wraps a response's stream and lets go of it (and so of the response) once closed."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream: httpx.AsyncByteStream | None = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert self._stream is not None
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()


async def _free_when_closed(response: httpx.Response) -> None:
    """httpx binds each response's stream back to the response: a reference cycle that keeps the
    body (multi-MB data URIs) and the request (uploaded photos) alive until the next garbage
    collection. Dropping the stream once it is closed lets them go as soon as they are unused."""
    assert isinstance(response.stream, httpx.AsyncByteStream)
    response.stream = _Unbinding(response.stream)


FREE_WHEN_CLOSED = {"response": [_free_when_closed]}


@asynccontextmanager
async def open_bot(
    settings: Settings, wallet: Wallet | None = None, **service_options: float
) -> AsyncIterator[ImageBot]:
    """One image service, one ledger and one bot for every adapter in the process.

    The wallet comes from ``WALLET_PRIVATE_KEY`` unless one is given (the demo's throwaway).
    Payments left pending by a crashed run are settled as ``unknown`` (or ``failed`` when
    nothing was signed) before the bot takes its first command.
    """
    key = settings.wallet_private_key
    if wallet is None and key is not None:
        wallet = Wallet(key.get_secret_value())
    ledger = await Ledger.open(settings.database_path)
    try:
        unknown, failed = await ledger.recover()
        if unknown or failed:
            log.warning(
                "a previous run stopped mid-payment: %d payment(s) marked unknown, %d failed",
                unknown,
                failed,
            )
        async with gateway_client() as http:
            payer = X402Payer(http, wallet, max_micro=settings.max_micro_per_request)
            images = ImageService(http, payer, settings.image_api_url, **service_options)
            yield ImageBot(settings, images, ledger)
    finally:
        await ledger.close()
