"""Lifecycle in one place: build the HTTP client, payer, image service and bot; close them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from bot.config import Settings
from bot.images import ImageService
from bot.service import ImageBot
from bot.x402 import Wallet, X402Payer

# Keeps secrets out of logs: httpx logs each request URL at INFO, and Telegram's carries the token.
_QUIET_LOGGERS = ("httpx", "httpcore", "aiohttp.access")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


@asynccontextmanager
async def open_bot(
    settings: Settings, wallet: Wallet | None = None, **service_options: float
) -> AsyncIterator[ImageBot]:
    """One image service and one bot for every adapter in the process.

    The wallet comes from ``WALLET_PRIVATE_KEY`` unless one is given (the demo's throwaway).
    """
    key = settings.wallet_private_key
    if wallet is None and key is not None:
        wallet = Wallet(key.get_secret_value())
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        payer = X402Payer(http, wallet, max_micro=settings.max_micro_per_request)
        images = ImageService(http, payer, settings.image_api_url, **service_options)
        yield ImageBot(settings, images)
