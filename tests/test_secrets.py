"""Secrets never reach the log, at any level: ``imagebot run`` at DEBUG, read line by line,
every call through a proxy that takes a password."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from fake_discord import FakeDiscord
from fake_proxy import FakeProxy
from fake_telegram import FakeTelegram
from imagebot_cli import cli_env

from sandbox import Sandbox

RPC_KEY = "rpc-api-key-4f1c9a"
PROXY_PASSWORD = "proxy-password-9d2e"


async def test_debug_logs_of_a_paid_command_carry_no_secret(tmp_path: Path) -> None:
    telegram, discord, gateway, proxy = FakeTelegram(), FakeDiscord(), Sandbox(), FakeProxy()
    await telegram.start()
    await discord.start()
    await gateway.start()
    await proxy.start()
    env = cli_env(
        gateway.url,
        tmp_path / "ledger.sqlite3",
        LOG_LEVEL="DEBUG",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_URL=telegram.url,
        DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_URL=discord.api_url,
        BASE_SEPOLIA_RPC_URL=f"http://127.0.0.1:9/v2/{RPC_KEY}",
        HTTP_PROXY=proxy.url.replace("://", f"://imagebot:{PROXY_PASSWORD}@"),
    )
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "imagebot.cli",
            "run",
            cwd=tmp_path,
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        await telegram.wait_for("setMyCommands", timeout=30)
        await discord.wait_ready(timeout=30)
        alice = telegram.private_chat(111, "Alice", "alice")
        telegram.send_text(alice, alice.user, "/imagegen a fox")
        await telegram.wait_for("sendPhoto", timeout=30)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await proxy.close()
        await gateway.close()
        await discord.close()
        await telegram.close()

    log = err.decode()
    assert process.returncode == 0, log[-2000:]
    assert "DEBUG telegram" in log and "DEBUG discord" in log  # the libraries did log
    key = env["WALLET_PRIVATE_KEY"]
    secrets = {
        "Telegram token": telegram.token,
        "Telegram token's secret half": telegram.token.partition(":")[2],
        "Discord token": discord.token,
        "wallet key": key.removeprefix("0x"),
        "RPC URL key": RPC_KEY,
        "proxy password": PROXY_PASSWORD,
    }
    leaked = [name for name, secret in secrets.items() if secret in log]
    assert leaked == []
    assert "[secret]" in log  # e.g. python-telegram-bot's "Set Bot API URL" line
    assert proxy.targets(telegram.url) and proxy.targets(discord.api_url)
