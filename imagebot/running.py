"""``imagebot run``, ``console``, ``demo`` and ``sandbox``: the commands that serve chats.

Imported only when one of them runs, with the chat libraries and the payer they need.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from bot.config import Settings, built_in_settings, load_settings
from bot.errors import ConfigError
from bot.service import Chat, ImageBot
from bot.x402 import Wallet
from imagebot.health import serving_health
from imagebot.logs import configure_logging, logging_in_a_thread, secrets_of
from imagebot.wiring import open_bot

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
OUT_DIR = Path("out")


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.telegram_bot_token is None and settings.discord_bot_token is None:
        print(
            "imagebot: no chat platform configured. Set TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN "
            "(see .env.example), or try it offline with: imagebot demo",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    with asyncio.Runner(loop_factory=service_loop()) as runner:
        return runner.run(_serve(settings))


def service_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (not on Windows), else asyncio's: under a
    crowd it spends about a tenth less CPU per command (bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings) -> int:
    """Every configured adapter on one bot (one image service, one ledger) until a signal.

    On SIGTERM or SIGINT the bot drains first (a late command is told it is restarting, paid
    requests in flight finish for up to 60 s, slow jobs are left to the next start), then the
    adapters stop. Log lines are written from a thread: a stalled stderr never stops the loop.
    """
    configure_logging(settings.log_level, secrets_of(settings))
    with logging_in_a_thread():
        return await _serve_adapters(settings)


async def _serve_adapters(settings: Settings) -> int:
    from adapters import discord, telegram

    stop = asyncio.Event()  # a signal, or an adapter that ended
    halt = asyncio.Event()  # the adapters stop once the bot has drained
    loop = asyncio.get_running_loop()
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with open_bot(settings) as bot, contextlib.AsyncExitStack() as health:
        adapters: list[Awaitable[None]] = []
        finders: dict[str, Callable[[str], Awaitable[Chat]]] = {}
        connected: list[Callable[[], bool]] = [lambda: not stop.is_set()]
        if settings.telegram_bot_token is not None:
            application = telegram.build_application(settings, bot)
            ready = asyncio.Event()
            adapters.append(telegram.serve(application, halt, ready))
            finders["telegram"] = partial(_when_ready, ready, telegram.chat_for, application)
            connected.append(ready.is_set)
        if settings.discord_bot_token is not None:
            client = discord.build_client(settings, bot)
            token = settings.discord_bot_token.get_secret_value()
            adapters.append(discord.serve(client, token, halt))
            finders["discord"] = partial(discord.chat_for, client)
            connected.append(lambda: client.is_ready() and not client.is_closed())
        if settings.metrics_listen is not None:
            healthy = partial(_healthy, bot, connected)
            await health.enter_async_context(
                serving_health(settings.metrics_listen, bot.metrics, healthy)
            )
        running = [asyncio.create_task(_stopping_all(a, stop)) for a in adapters]
        # What start-up loaded (about 300,000 objects of modules and adapters) is never garbage:
        # frozen, the collector stops walking it on every full pass.
        gc.freeze()
        shared = [  # work other runs on the ledger leave to this one
            asyncio.create_task(bot.keep_resuming(partial(_find_chat, finders), finders)),
            asyncio.create_task(bot.watch_cancels()),
            asyncio.create_task(bot.wallet.check()),  # a low balance is told at start-up
        ]
        await stop.wait()
        for task in shared:
            task.cancel()
        await bot.drain()
        halt.set()
        ended = await asyncio.gather(*running, return_exceptions=True)
    for outcome in ended:
        if isinstance(outcome, BaseException):
            raise outcome
    return 0


async def _healthy(bot: ImageBot, connected: list[Callable[[], bool]]) -> bool:
    """Every adapter connected (and the bot not stopping), and the ledger answering."""
    return all(check() for check in connected) and await bot.ledger_answers()


async def _when_ready(
    ready: asyncio.Event, make: Callable[[Any, str], Chat], platform: Any, address: str
) -> Chat:
    await ready.wait()
    return make(platform, address)


async def _find_chat(
    finders: dict[str, Callable[[str], Awaitable[Chat]]], platform: str, address: str
) -> Chat | None:
    """The chat an owed answer goes to, or None when its platform is not running here."""
    find = finders.get(platform)
    if find is None:
        return None
    try:
        return await find(address)
    except (ValueError, KeyError, TypeError):
        log.error("an owed answer has an unreadable %s address", platform)
        return None


async def _stopping_all(adapter: Awaitable[None], stop: asyncio.Event) -> None:
    """Run one adapter; when it ends (a refused start-up, say) the others shut down cleanly."""
    try:
        await adapter
    finally:
        stop.set()


def console(args: argparse.Namespace) -> int:
    return asyncio.run(_chat(load_settings(), args.once))


def demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo_async(args.once))


async def _demo_async(once: str | None) -> int:
    from sandbox import Sandbox

    sandbox = Sandbox()
    url = await sandbox.start()
    wallet = Wallet.create()
    print(
        f"demo: sandbox gateway on {url}, throwaway wallet {wallet.address}; nothing real is paid."
    )
    try:
        with tempfile.TemporaryDirectory(prefix="imagebot-demo-") as data_dir:
            chosen = {"log_level": os.environ["LOG_LEVEL"]} if "LOG_LEVEL" in os.environ else {}
            settings = built_in_settings(
                image_api_url=url, database_path=Path(data_dir) / "demo.sqlite3", **chosen
            )
            return await _chat(settings, once, wallet, env_proxies=False)  # a loopback sandbox
    finally:
        await sandbox.close()


async def _chat(
    settings: Settings, once: str | None, wallet: Wallet | None = None, *, env_proxies: bool = True
) -> int:
    from adapters.console import run_console

    # The console is the chat: logs stay out of it unless LOG_LEVEL asks for them.
    level = settings.log_level if "log_level" in settings.model_fields_set else "ERROR"
    configure_logging(level, secrets_of(settings))
    async with open_bot(settings, wallet, env_proxies=env_proxies) as bot:
        return await run_console(bot, OUT_DIR, once)


def sandbox(args: argparse.Namespace) -> int:
    from sandbox import serve_forever

    configure_logging("INFO")
    try:
        asyncio.run(serve_forever(args.host, args.port))
    except OSError as error:
        raise ConfigError(
            f"--port: cannot listen on {args.host}:{args.port} "
            f"({os.strerror(error.errno) if error.errno else error}); "
            "pick another port with --port"
        ) from None
    return 0
