"""Discord in shards: ``DISCORD_SHARD_COUNT`` and ``DISCORD_SHARD_IDS`` split one bot's guilds
over processes; each answers its own shards' guilds, and only shard 0's publishes the commands."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import discord
import pytest
from fake_discord import Call, FakeDiscord
from imagebot_cli import cli_env, imagebot_run

from adapters.discord import ImagebotClient, build_client, serve
from bot.config import load_settings
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox


@asynccontextmanager
async def serving(fake: FakeDiscord, tmp_path: Path, **settings: str) -> AsyncIterator[None]:
    """The adapter in this process with these settings, against ``fake``, until the block ends."""
    loaded = load_settings(
        _env_file=None,
        discord_bot_token=fake.token,
        discord_api_url=fake.api_url,
        image_api_url="http://127.0.0.1:9",  # no pictures here
        database_path=tmp_path / "ledger.sqlite3",
        **settings,
    )
    stop = asyncio.Event()
    async with open_bot(loaded, Wallet.create()) as bot:
        running = asyncio.create_task(serve(build_client(loaded, bot), fake.token, stop))
        try:
            yield
        finally:
            stop.set()
            await running


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # restored after

    async def at_once(self: ImagebotClient, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py waits 5 s before each IDENTIFY after a process's first."""

    monkeypatch.setattr(ImagebotClient, "before_identify_hook", at_once)
    yield fake
    await fake.close()


def picture_reply_to(command: dict[str, Any]) -> Callable[[Call], bool]:
    """The bot's reply with a picture to the user's ``command``."""

    def matches(call: Call) -> bool:
        if call.name != "create_message" or not call.files or not isinstance(call.payload, dict):
            return False
        reference = call.payload.get("message_reference") or {}
        return reference.get("message_id") == int(command["id"])

    return matches


def shards_given(fake: FakeDiscord, event: str, event_id: int | str) -> list[list[int] | None]:
    return [shard for shard, data in fake.delivered(event) if data["id"] == str(event_id)]


async def test_two_processes_answer_each_their_own_shard_and_one_syncs_the_commands(
    tmp_path: Path, fake: FakeDiscord
) -> None:
    gateway = Sandbox(job_seconds=0.2)
    await gateway.start()
    left = fake.guild("Left", shard=(0, 2)).channel("general")
    right = fake.guild("Right", shard=(1, 2)).channel("general")
    bob = fake.user("bob")

    def env(shard_ids: str) -> dict[str, str]:
        return cli_env(
            gateway.url,
            tmp_path / "ledger.sqlite3",
            DISCORD_BOT_TOKEN=fake.token,
            DISCORD_API_URL=fake.api_url,
            DISCORD_SHARD_COUNT="2",
            DISCORD_SHARD_IDS=shard_ids,
        )

    try:
        async with imagebot_run(env("1"), tmp_path / "shard-1.log") as shard_1:
            await fake.wait_ready(30, shard=[1, 2])
            synced_by_shard_1 = fake.command_syncs
            async with imagebot_run(env("0"), tmp_path / "shard-0.log") as shard_0:
                await fake.wait_ready(30, shard=[0, 2])
                synced = fake.command_syncs
                on_right = fake.send_message(right, bob, "/imagegen a cat")
                on_left = fake.send_message(left, bob, "/imagegen a dog")
                asked = fake.slash_command(right, bob, "models")
                await fake.wait_for(picture_reply_to(on_right))
                await fake.wait_for(picture_reply_to(on_left))
                await fake.wait_for(
                    lambda call: (
                        call.name == "edit_original_response" and call.interaction_id == asked.id
                    )
                )
    finally:
        await gateway.close()

    assert (shard_1.returncode, shard_0.returncode) == (0, 0)  # both stopped cleanly
    assert (synced_by_shard_1, synced, fake.command_syncs) == (0, 1, 1)
    assert shards_given(fake, "MESSAGE_CREATE", on_right["id"]) == [[1, 2]]
    assert shards_given(fake, "MESSAGE_CREATE", on_left["id"]) == [[0, 2]]
    assert shards_given(fake, "INTERACTION_CREATE", asked.id) == [[1, 2]]
    for command in (on_right, on_left):
        assert len([call for call in fake.sent if picture_reply_to(command)(call)]) == 1
    assert len(gateway.settlements) == 2  # each picture paid once
    assert "Models" in str(asked.original and asked.original["content"])


async def test_a_process_runs_exactly_its_shard_ids(tmp_path: Path, fake: FakeDiscord) -> None:
    async with serving(fake, tmp_path, discord_shard_count="4", discord_shard_ids="3,1"):
        await fake.wait_ready(shard=[1, 4])
        await fake.wait_ready(shard=[3, 4])

    assert [frame.data["shard"] for frame in fake.received if frame.op == 2] == [[1, 4], [3, 4]]
    assert len(fake.connections) == 2
    assert fake.command_syncs == 0  # shard 0 runs elsewhere


async def test_without_settings_the_recommended_shards_run_in_one_process(
    tmp_path: Path, fake: FakeDiscord
) -> None:
    fake.recommended_shards = 2
    async with serving(fake, tmp_path):
        await fake.wait_ready(shard=[0, 2])
        await fake.wait_ready(shard=[1, 2])

    assert [frame.data["shard"] for frame in fake.received if frame.op == 2] == [[0, 2], [1, 2]]
    assert fake.command_syncs == 1


async def test_a_shard_whose_session_is_invalidated_identifies_anew_at_the_fake(
    tmp_path: Path, fake: FakeDiscord
) -> None:
    async with serving(fake, tmp_path, discord_shard_count="2", discord_shard_ids="1"):
        first = await fake.wait_ready(shard=[1, 2])
        fake.invalidate_session()
        second = await fake.wait_ready(shard=[1, 2])

    assert second is not first and first.ended
    # discord.py goes back to DEFAULT_GATEWAY, which follow_gateway sends to the fake.
    assert [connection.path for connection in fake.connections] == ["/gateway", "/gateway"]
