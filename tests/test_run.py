"""``imagebot run`` as a process: Telegram and Discord served together on one bot and one ledger."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from fake_discord import FakeDiscord
from fake_telegram import FakeTelegram
from imagebot_cli import ROOT, cli_env, imagebot_run

from sandbox import Sandbox

ADMIN_ID = 999


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
        async with imagebot_run(env, tmp_path / "run.log") as process:
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
    assert "event loop: uvloop.Loop" in (tmp_path / "run.log").read_text()  # the faster loop


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
        async with imagebot_run(env, tmp_path / "run.log") as process:
            await asyncio.wait_for(process.wait(), 30)
        err = (tmp_path / "run.log").read_bytes()
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


async def start_up_failure(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of an ``imagebot`` start that should fail at once."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebot.cli",
        *args,
        cwd=tmp_path,
        env=cli_env("http://127.0.0.1:9", tmp_path / "ledger.sqlite3", **env),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode().splitlines()


async def test_start_up_problems_are_one_line_and_exit_2(tmp_path: Path) -> None:
    telegram = FakeTelegram()
    await telegram.start()
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        cases = {
            "unwritable ledger": (
                ("run",),
                {
                    "TELEGRAM_BOT_TOKEN": telegram.token,
                    "TELEGRAM_API_URL": telegram.url,
                    "DATABASE_PATH": "/proc/no-such-dir/ledger.sqlite3",
                },
                "imagebot: DATABASE_PATH: cannot open a ledger at /proc/no-such-dir/",
            ),
            "refused token": (
                ("run",),
                {"TELEGRAM_BOT_TOKEN": "999:not-the-token", "TELEGRAM_API_URL": telegram.url},
                "imagebot: Telegram refused TELEGRAM_BOT_TOKEN; copy the token from @BotFather",
            ),
            "unreachable Telegram": (
                ("run",),
                {"TELEGRAM_BOT_TOKEN": telegram.token, "TELEGRAM_API_URL": "http://127.0.0.1:9"},
                "imagebot: could not reach Telegram's Bot API at TELEGRAM_API_URL",
            ),
            "unreachable Discord": (
                ("run",),
                {"DISCORD_BOT_TOKEN": "x", "DISCORD_API_URL": "http://127.0.0.1:9/api/v10"},
                "imagebot: could not reach Discord at DISCORD_API_URL",
            ),
            "sandbox port in use": (
                ("sandbox", "--port", str(port)),
                {},
                f"imagebot: --port: cannot listen on 127.0.0.1:{port} (Address already in use)",
            ),
        }
        for name, (args, env, first_words) in cases.items():
            code, lines = await start_up_failure(tmp_path, *args, **env)
            problems = [line for line in lines if " INFO " not in line]
            assert (code, len(problems)) == (2, 1), (name, lines)
            assert problems[0].startswith(first_words), (name, problems)
            assert "Traceback" not in "\n".join(lines), name
    finally:
        blocker.close()
        await telegram.close()


async def test_spend_on_a_missing_ledger_says_so_and_creates_nothing(tmp_path: Path) -> None:
    code, lines = await start_up_failure(tmp_path, "spend")
    assert code == 1
    assert lines == [f"imagebot: no ledger at {tmp_path / 'ledger.sqlite3'} (DATABASE_PATH)"]
    assert await asyncio.to_thread(os.listdir, tmp_path) == []
