"""Wiring in one place: build the HTTP client, payer, image service, ledger and bot; close them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.balance import WalletWatch
from bot.chain import ChainResolver, Rpc
from bot.config import Settings
from bot.http import gateway_client
from bot.images import ImageService
from bot.ledger import open_ledger
from bot.ledger.journal import SettlementJournal
from bot.metrics import Metrics
from bot.service import ImageBot
from bot.x402 import Wallet, X402Payer

log = logging.getLogger(__name__)


@asynccontextmanager
async def open_bot(
    settings: Settings,
    wallet: Wallet | None = None,
    *,
    env_proxies: bool = True,
    **service_options: float,
) -> AsyncIterator[ImageBot]:
    """One image service, one ledger and one bot for every adapter in the process.

    The wallet comes from ``WALLET_PRIVATE_KEY`` unless one is given (the demo's throwaway);
    gateway calls go through ``HTTP(S)_PROXY`` unless ``env_proxies`` is False (the demo's).
    Settlements a previous run journaled (its ledger was busy) are written, and payments left
    pending by a crashed run are settled as ``unknown`` (or ``failed`` when nothing was signed)
    before the bot takes its first command; their slow jobs stay open for ``resume_jobs``.
    With an RPC URL set, unknown payments are checked against the chain now and every 10 min.
    """
    key = settings.wallet_private_key
    if wallet is None and key is not None:
        wallet = Wallet(key.get_secret_value())
    ledger = await open_ledger(settings)
    journal = SettlementJournal(ledger, SettlementJournal.beside(settings.database_path))
    try:
        if written := await journal.replay():
            log.warning("wrote %d settlement(s) a previous run had to journal", written)
        unknown, failed = await ledger.recover()
        if unknown or failed:
            log.warning(
                "a previous run stopped mid-payment: %d payment(s) marked unknown, %d failed",
                unknown,
                failed,
            )
        async with gateway_client(env_proxies=env_proxies) as http:
            payer = X402Payer(http, wallet, max_micro=settings.max_micro_per_request)
            metrics = Metrics()
            images = ImageService(
                http,
                payer,
                settings.image_api_url,
                network=settings.payment_chain,
                on_exchange=metrics.observe_gateway,
                **service_options,
            )
            chain = settings.payment_chain
            rpc_url = settings.rpc_url_for(chain.caip2)
            watch = WalletWatch(
                wallet.address if wallet is not None else None,
                chain,
                Rpc(http, rpc_url) if rpc_url else None,
                ledger,
                settings.low_balance_micro,
            )
            bot = ImageBot(settings, images, ledger, journal, watch, metrics)
            checking = None
            if settings.base_rpc_url or settings.base_sepolia_rpc_url:
                resolver = ChainResolver(
                    ledger, http, settings.rpc_url_for, on_settled=bot.tell_settled
                )
                checking = asyncio.create_task(resolver.resolve_every())
            try:
                yield bot
            finally:
                if checking is not None:
                    checking.cancel()
                    await asyncio.gather(checking, return_exceptions=True)
    finally:
        await journal.close()
        await ledger.close()
