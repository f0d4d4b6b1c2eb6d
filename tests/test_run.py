"""``imagebot run`` as a process: Telegram and Discord served together on one bot and one ledger."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fake_discord import FakeDiscord
from fake_telegram import FakeTelegram
from imagebot_cli import ROOT, cli_env

from sandbox import Sandbox

ADMIN_ID = 999


@asynccontextmanager
async def imagebot_run(env: dict[str, str], cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``imagebot run`` in its own process; stopped with SIGTERM, as a service manager does."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebot.cli",
        "run",
        cwd=cwd,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


async def test_one_process_serves_both_platforms_on_one_ledger(tmp_path: Path) -> None:
    telegram, discord, gateway = FakeTelegram(), FakeDiscord(), Sandbox()
    await telegram.start()
    await discord.start()
    await gateway.start()
    env = cli_env(
        gateway.url,
        tmp_path / "ledger.sqlite3",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_URL=telegram.url,
        DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_URL=discord.api_url,
        ADMIN_IDS=f"telegram:{ADMIN_ID}",
    )
    try:
        async with imagebot_run(env, tmp_path) as process:
            await telegram.wait_for("setMyCommands", timeout=30)
            await discord.wait_for("bulk_overwrite_global_commands", timeout=30)
            await discord.wait_ready(timeout=30)
            alice = telegram.private_chat(111, "Alice", "alice")
            telegram.send_text(alice, alice.user, "/imagegen a fox")
            channel = discord.guild("Artists").channel("general")
            bob = discord.user("bob")
            discord.send_message(channel, bob, "/imagegen -m flux a cat")
            await telegram.wait_for("sendPhoto", timeout=30)
            await discord.wait_for(lambda call: call.name == "create_message" and bool(call.files))

            admin = telegram.private_chat(ADMIN_ID, "Boss", "boss")
            telegram.send_text(admin, admin.user, "/spend all")
            report = await telegram.wait_for(
                lambda call: call.method == "sendMessage" and call.chat_id == ADMIN_ID
            )
        assert process.returncode == 0
    finally:
        await gateway.close()
        await discord.close()
        await telegram.close()

    text = report.params["text"]
    assert "@alice (telegram:111): $0.0525" in text, text
    assert f"@bob (discord:{bob.id}): $0.042" in text, text
    assert "$0.0945" in text, text  # the total of both
    assert len(gateway.settlements) == 2


async def test_a_refused_discord_intent_stops_start_up_with_exit_2(tmp_path: Path) -> None:
    """Telegram, configured too, is shut down cleanly rather than left half running."""
    telegram, discord = FakeTelegram(), FakeDiscord(privileged_intents=0)  # portal switch off
    await telegram.start()
    await discord.start()
    env = cli_env(
        "http://127.0.0.1:9",
        tmp_path / "ledger.sqlite3",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_URL=telegram.url,
        DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_URL=discord.api_url,
    )
    try:
        async with imagebot_run(env, tmp_path) as process:
            _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await discord.close()
        await telegram.close()

    assert process.returncode == 2
    assert err.decode().splitlines()[-1] == (
        "imagebot: Discord refused the message content intent: turn on 'Message Content Intent' "
        "for this bot (Developer Portal > Bot > Privileged Gateway Intents)."
    )
    assert str(ROOT) not in err.decode()  # no traceback
    assert telegram.calls("setMyCommands")  # it had started, and stopped with the process
