"""Nothing paid is lost when ``imagebot run`` is killed, stopped or restarted.

Each test runs the real ``imagebot run`` as a process against the fake Telegram and Discord
servers and the sandbox gateway, kills or stops it as a crash or a service manager would, and
checks what users got, what was signed and settled, and what ``imagebot spend --json`` says.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import aiosqlite
from fake_discord import FakeDiscord
from fake_telegram import FakeTelegram
from imagebot_cli import cli_env, imagebot, imagebot_run
from local import until

from sandbox import Sandbox

JOB_SECONDS = 6.0  # long enough to kill the bot while the gateway is still drawing


async def rows(database: Path, where: str) -> int:
    """How many ledger rows match; 0 while the bot is still creating its tables."""
    try:
        async with aiosqlite.connect(database) as db:
            ((count,),) = await db.execute_fetchall(f"SELECT count(*) FROM attempts WHERE {where}")
    except sqlite3.OperationalError:
        return 0
    return int(count)


async def spent_micro(env: dict[str, str], cwd: Path) -> int:
    code, out = await imagebot("spend", "--json", env=env, cwd=cwd)
    assert code == 0
    return int(Decimal(json.loads(out)["total_usd"]) * 1_000_000)


@asynccontextmanager
async def platforms() -> AsyncIterator[tuple[FakeTelegram, FakeDiscord]]:
    telegram, discord = FakeTelegram(), FakeDiscord()
    await telegram.start()
    await discord.start()
    try:
        yield telegram, discord
    finally:
        await discord.close()
        await telegram.close()


def env_for(telegram: FakeTelegram, discord: FakeDiscord, gateway: Sandbox, database: Path):  # type: ignore[no-untyped-def]
    return cli_env(
        gateway.url,
        database,
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_URL=telegram.url,
        DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_URL=discord.api_url,
    )


async def kept(database: Path, count: int) -> bool:
    """Whether ``count`` slow jobs are kept in the ledger."""
    exists = await asyncio.to_thread(database.exists)
    return exists and await rows(database, "job IS NOT NULL") == count


async def started(telegram: FakeTelegram, discord: FakeDiscord, commands_before: int) -> None:
    await until(lambda: len(telegram.calls("setMyCommands")) > commands_before)
    await discord.wait_ready(timeout=30)


async def test_a_killed_run_leaves_its_slow_jobs_to_the_next_run_which_delivers_each_once(
    tmp_path: Path,
) -> None:
    gateway = Sandbox(job_seconds=JOB_SECONDS)
    await gateway.start()
    database = tmp_path / "ledger.sqlite3"
    async with platforms() as (telegram, discord):
        env = env_for(telegram, discord, gateway, database)
        alice = telegram.private_chat(111, "Alice", "alice")
        forum = telegram.group_chat(-100777, "Artists", forum=True)
        channel = discord.guild("Artists").channel("general")
        bob, carol = discord.user("bob"), discord.user("carol")

        async with imagebot_run(env, tmp_path / "first.log") as first:
            await started(telegram, discord, 0)
            asked = telegram.send_text(alice, alice.user, "/imagegen -m banana-pro a harbour")
            in_topic = telegram.send_text(forum, alice.user, "/imagegen a fox #slow", thread_id=5)
            message = discord.send_message(channel, bob, "/imagegen a cat #slow")
            discord.slash_command(channel, carol, "imagegen", {"prompt": "an owl #slow"})
            await until(lambda: kept(database, 4))
            first.kill()  # SIGKILL: no clean-up at all
        assert first.returncode == -signal.SIGKILL
        assert gateway.payments_received == 4

        async with imagebot_run(env, tmp_path / "second.log") as second:
            await started(telegram, discord, 1)
            photos = [
                await telegram.wait_for(
                    lambda call, chat=chat, reply=reply: (
                        call.method == "sendPhoto"
                        and call.chat_id == chat
                        and (call.result or {}).get("reply_to_message", {}).get("message_id")
                        == reply
                    ),
                    timeout=60,
                )
                for chat, reply in ((111, asked["message_id"]), (-100777, in_topic["message_id"]))
            ]
            replied = await discord.wait_for(
                lambda call: (
                    call.name == "create_message"
                    and bool(call.files)
                    and (call.payload.get("message_reference") or {}).get("message_id")
                    in (message["id"], int(message["id"]))
                ),
                timeout=60,
            )
            mentioned = await discord.wait_for(
                lambda call: (
                    call.name == "create_message"
                    and bool(call.files)
                    and f"<@{carol.id}>" in (call.payload.get("content") or "")
                ),
                timeout=60,
            )
        assert second.returncode == 0
    await gateway.close()

    assert photos[1].params.get("message_thread_id") in (5, "5")  # the same forum topic
    for photo in photos:  # the buttons came with the job: Again and Vary under one picture
        (row,) = photo.params["reply_markup"]["inline_keyboard"]
        assert [button["text"].split(" · ")[0] for button in row] == ["🔁 Again", "🎨 Vary"]
    for reply in (replied, mentioned):
        (row,) = reply.payload["components"]
        labels = [button["label"].split(" · ")[0] for button in row["components"]]
        assert labels == ["🔁 Again", "🎨 Vary"]
    assert "nano-banana · 1024x1024 · $0.0525" in (replied.payload.get("content") or "")
    assert mentioned.channel_id == channel.id
    assert gateway.payments_received == 4  # nothing new was signed
    assert len(gateway.settlements) == 4  # each job settled once
    settled = sum(settlement.amount_micro for settlement in gateway.settlements)
    assert await spent_micro(env, tmp_path) == settled
    assert await rows(database, "status = 'settled'") == 4


async def test_sigterm_finishes_the_paid_request_in_flight_and_keeps_the_slow_job(
    tmp_path: Path,
) -> None:
    gateway = Sandbox(latency=2.0, job_seconds=JOB_SECONDS)
    await gateway.start()
    database = tmp_path / "ledger.sqlite3"
    async with platforms() as (telegram, discord):
        env = env_for(telegram, discord, gateway, database)
        alice = telegram.private_chat(111, "Alice", "alice")
        bob = telegram.private_chat(222, "Bob", "bob")
        carol = telegram.private_chat(333, "Carol", "carol")

        async with imagebot_run(env, tmp_path / "first.log") as first:
            await started(telegram, discord, 0)
            telegram.send_text(bob, bob.user, "/imagegen a harbour #slow")
            await until(lambda: kept(database, 1))
            telegram.send_text(alice, alice.user, "/imagegen a fox")
            await until(lambda: gateway.payments_received == 2)  # alice's answer is 2 s away
            first.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            telegram.send_text(carol, carol.user, "/imagegen a cat")
            code = await asyncio.wait_for(first.wait(), 90)
        assert code == 0
        assert [call.chat_id for call in telegram.calls("sendPhoto")] == [111]  # delivered
        told = {call.chat_id: call.params["text"] for call in telegram.calls("sendMessage")}
        assert told[222] == "The bot is restarting; your picture will come once it is back."
        assert told[333].startswith("The bot is restarting; send that again in a minute.")
        assert gateway.payments_received == 2  # carol's command was not paid for

        async with imagebot_run(env, tmp_path / "second.log"):
            await started(telegram, discord, 1)
            await telegram.wait_for(
                lambda call: call.method == "sendPhoto" and call.chat_id == 222, timeout=60
            )
    await gateway.close()

    assert gateway.payments_received == 2
    assert len(gateway.settlements) == 2
    settled = sum(settlement.amount_micro for settlement in gateway.settlements)
    assert await spent_micro(env, tmp_path) == settled
