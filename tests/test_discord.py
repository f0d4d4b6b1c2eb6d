"""The Discord adapter end to end: the real discord.py client of ``imagebot run`` against the fake
Discord (REST, interactions, gateway websocket), the sandbox gateway and the real ledger."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import discord
import pytest
from fake_discord import (
    FLAG_EPHEMERAL,
    INTENT_MESSAGE_CONTENT,
    UPLOAD_MAX_BYTES,
    Call,
    FakeDiscord,
    File,
    Interaction,
)
from gateway_orders import Order, paid, record_orders
from imagebot_cli import cli_env, imagebot
from pictures import png
from PIL import Image

import adapters.discord
import adapters.status
from adapters.discord import (
    RATE_LIMIT_SWEEP_EVERY,
    StartupError,
    build_client,
    serve,
    sweep_rate_limits_in_turn,
)
from bot.catalog import MODELS
from bot.config import load_settings
from bot.ledger import Attempt, Budget, SqliteLedger
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

BLUE, GREEN, RED = (0, 0, 255), (0, 128, 0), (255, 0, 0)
EDIT_PATH = "/v1/images/image2image"
REFUSAL = "Sorry, this bot makes pictures only for its members."
GIF = b"GIF89a" + bytes(64)


@dataclass
class Stack:
    discord: FakeDiscord
    gateway: Sandbox
    database: Path
    orders: list[Order] = field(default_factory=list)

    def paid_orders(self) -> list[Order]:
        return paid(self.orders)


@asynccontextmanager
async def running(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake: FakeDiscord | None = None,
    **settings: str,
) -> AsyncIterator[Stack]:
    """``imagebot run``'s Discord side: the client connected to the fake, paying the sandbox.

    Pass a ``fake`` made beforehand when the settings need its users' or guilds' ids.
    """
    async with started_stack(tmp_path, fake) as stack, serving(stack, monkeypatch, **settings):
        yield stack


@asynccontextmanager
async def started_stack(tmp_path: Path, fake: FakeDiscord | None = None) -> AsyncIterator[Stack]:
    """The fake Discord and the sandbox (its orders recorded), for bots to serve one by one."""
    fake, gateway = fake or FakeDiscord(), Sandbox(job_seconds=0.2)
    orders = record_orders(gateway)
    await fake.start()
    await gateway.start()
    try:
        yield Stack(fake, gateway, tmp_path / "ledger.sqlite3", orders)
    finally:
        await gateway.close()
        await fake.close()


@asynccontextmanager
async def serving(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, api_host: str = "127.0.0.1", **settings: str
) -> AsyncIterator[None]:
    """The bot of ``imagebot run`` connected to the stack's Discord, paying its gateway, with its
    ledger; stopped at the end (the stack stays up for a bot started after it). The bot is told
    the fake's REST API is at ``api_host`` (as ``running`` in test_telegram)."""
    fake = stack.discord
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # restored after
    loaded = load_settings(
        _env_file=None,
        discord_bot_token=fake.token,
        discord_api_url=fake.api_url.replace("127.0.0.1", api_host),
        image_api_url=stack.gateway.url,
        database_path=stack.database,
        **settings,
    )
    stop, since = asyncio.Event(), len(fake.sent)
    async with open_bot(loaded, Wallet.create(), poll_interval=0.05) as bot:
        client = build_client(loaded, bot)
        served = asyncio.create_task(serve(client, fake.token, stop))
        await fake.wait_ready()
        await fake.wait_for("bulk_overwrite_global_commands", since=since)
        try:
            yield
        finally:
            await bot.drain(5)  # as imagebot run stops: the bot first, then the adapters
            stop.set()
            await served


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    async with running(tmp_path, monkeypatch) as started:
        yield started


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(BytesIO(data)).size


def corner(data: bytes) -> tuple[int, int, int]:
    """The top-left pixel: the sandbox draws an edit over its first input, text in the middle."""
    with Image.open(BytesIO(data)) as image:
        return image.convert("RGB").getpixel((2, 2))  # type: ignore[return-value]


def created_in(channel_id: int) -> Callable[[Call], bool]:
    return lambda call: call.name == "create_message" and call.channel_id == channel_id


def replies_to(command: dict[str, Any]) -> Callable[[Call], bool]:
    """A message the bot posted as a reply to the user's ``command``."""

    def matches(call: Call) -> bool:
        if call.name != "create_message" or not isinstance(call.payload, dict):
            return False
        reference = call.payload.get("message_reference") or {}
        return reference.get("message_id") == int(command["id"])

    return matches


def with_files(predicate: Callable[[Call], bool]) -> Callable[[Call], bool]:
    return lambda call: predicate(call) and bool(call.files)


def of(interaction: Interaction, name: str) -> Callable[[Call], bool]:
    return lambda call: call.name == name and call.interaction_id == interaction.id


async def reply_text(fake: FakeDiscord, command: dict[str, Any]) -> str:
    """The text the bot answered ``command`` with (not its "Drawing…" status)."""
    answered = replies_to(command)
    call = await fake.wait_for(
        lambda call: (
            answered(call)
            and not call.files
            and not str(call.payload.get("content")).startswith(("Drawing", "Editing"))
        )
    )
    assert call.ok, call.error
    return str(call.payload["content"])


async def ephemeral_text(fake: FakeDiscord, interaction: Interaction) -> str:
    """The followup only the caller sees, once the public "thinking…" is gone."""
    call = await fake.wait_for(of(interaction, "create_followup"))
    assert call.ok, call.error
    assert call.payload["flags"] == FLAG_EPHEMERAL
    assert interaction.original is None  # the public "thinking…" was deleted
    return str(call.payload["content"])


async def private_answer(fake: FakeDiscord, interaction: Interaction) -> str:
    """The answer to an ephemerally deferred command (/spend, /models, /help)."""
    call = await fake.wait_for(of(interaction, "edit_original_response"))
    assert call.ok, call.error
    assert interaction.original is not None
    assert interaction.original["flags"] & FLAG_EPHEMERAL
    return str(call.payload["content"])


# Generating and editing


async def test_message_imagegen_replies_with_the_picture(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice", "Alice")
    command = fake.send_message(channel, alice, "/imagegen -m flux a fox in the snow")

    reply: Call = await fake.wait_for(
        lambda call: created_in(channel.id)(call) and bool(call.files)
    )

    (upload,) = reply.files
    assert image_size(upload.data) == (1024, 1024)
    assert reply.payload["content"] == "flux · 1024x1024 · $0.042"
    assert reply.payload["message_reference"]["message_id"] == int(command["id"])
    assert len(stack.gateway.settlements) == 1


async def test_a_command_deleted_before_its_picture_still_gets_the_picture(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice", "Alice")
    command = fake.send_message(channel, alice, "/imagegen -m flux a fox")
    await fake.wait_for(replies_to(command))  # the status: the job is under way
    fake.delete_message(command)

    picture = await fake.wait_for(lambda call: created_in(channel.id)(call) and bool(call.files))

    assert picture.ok
    assert fake.messages_in(channel)[-1]["attachments"]  # in the channel, replying to nothing
    assert len(stack.gateway.settlements) == 1


async def test_a_picture_at_a_public_link_is_downloaded_checked_and_attached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discord takes pictures as attachments only: the bot downloads the link (through the
    sandbox as its proxy: nothing connects to 1.2.3.4) with the usual checks, then uploads."""
    async with started_stack(tmp_path) as stack:
        monkeypatch.setenv("HTTP_PROXY", stack.gateway.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        stack.gateway.picture_origin = "http://1.2.3.4"
        async with serving(stack, monkeypatch):
            fake = stack.discord
            channel = fake.guild("Artists").channel("general")
            fake.send_message(channel, fake.user("alice", "Alice"), "/imagegen -m flux a fox")

            reply: Call = await fake.wait_for(
                lambda call: created_in(channel.id)(call) and bool(call.files)
            )

    (upload,) = reply.files
    assert image_size(upload.data) == (1024, 1024)
    assert stack.gateway.images_served == 1
    assert len(stack.gateway.settlements) == 1


async def test_a_replied_to_message_discord_will_not_hand_over_is_answered(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    picture = fake.send_message(channel, alice, "cat", files=[File("cat.png", png())])
    fake.fail("get_message", 400, 50035, "Invalid Form Body")
    command = fake.send_message(
        channel, alice, "/img2img x", reply_to=int(picture["id"]), include_referenced=False
    )

    answer = await reply_text(fake, command)

    assert answer == "I couldn't read the message you replied to; nothing was charged. Try again."
    assert stack.gateway.settlements == []


@pytest.mark.parametrize("in_the_event", [True, False], ids=["sent-along", "fetched"])
async def test_replying_to_a_picture_with_img2img_edits_it(
    stack: Stack, in_the_event: bool
) -> None:
    """Discord may leave the replied-to message out of the event: the adapter then fetches it."""
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    picture = fake.send_message(
        channel, alice, "my cat", files=[File("cat.png", png(300, 200, "blue"))]
    )
    command = fake.send_message(
        channel,
        alice,
        "/img2img make it snowy",
        reply_to=int(picture["id"]),
        include_referenced=in_the_event,
    )

    reply = await fake.wait_for(with_files(replies_to(command)))

    (upload,) = reply.files
    assert reply.payload["content"] == "gpt-image · 1024x1024 · $0.021"
    assert corner(upload.data) == BLUE  # drawn over the replied-to picture
    [order] = stack.paid_orders()
    assert (order.path, order.model, len(order.inputs)) == (EDIT_PATH, "openai/gpt-image-1", 1)
    [settlement] = stack.gateway.settlements
    assert settlement.model == "openai/gpt-image-1"
    fetched = [call.params["message_id"] for call in fake.calls("get_message")]
    assert fetched == ([] if in_the_event else [int(picture["id"])])


async def test_two_pictures_in_one_message_are_fused(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    files = [File("a.png", png(120, 90, "red")), File("b.jpg", png(90, 120, "green"))]
    command = fake.send_message(channel, alice, "/img2img -m nano-banana fuse these", files=files)

    reply = await fake.wait_for(with_files(replies_to(command)))

    assert reply.payload["content"] == "nano-banana · 1024x1024 · $0.0525"
    assert corner(reply.files[0].data) == RED
    [order] = stack.paid_orders()
    assert order.inputs == (files[0].data, files[1].data)
    assert stack.gateway.settlements[0].model == "google/nano-banana"


async def test_replied_to_pictures_come_first_and_count_with_the_commands_own(
    stack: Stack,
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    replied = fake.send_message(channel, alice, "", files=[File("g.png", png(80, 80, "green"))])
    three = [File(f"{index}.png", png(80, 80, "red")) for index in range(3)]
    too_many = fake.send_message(
        channel, alice, "/img2img -m nano-banana fuse", files=three, reply_to=int(replied["id"])
    )
    assert "you sent 4" in await reply_text(fake, too_many)

    command = fake.send_message(
        channel, alice, "/img2img -m nano-banana fuse", files=three[:1], reply_to=int(replied["id"])
    )
    reply = await fake.wait_for(with_files(replies_to(command)))

    assert corner(reply.files[0].data) == GREEN
    [order] = stack.paid_orders()
    assert [corner(data) for data in order.inputs] == [GREEN, RED]


async def test_slash_imagegen_is_deferred_then_edited_with_the_picture(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice", "Alice")
    interaction = fake.slash_command(
        channel, alice, "imagegen", {"prompt": "a fox", "model": "flux"}
    )

    edit = await fake.wait_for(
        lambda call: call.name == "edit_original_response" and bool(call.files)
    )

    assert interaction.ack_delay is not None and interaction.ack_delay < 3
    assert edit.payload["content"] == "flux · 1024x1024 · $0.042"
    assert len(stack.gateway.settlements) == 1


async def test_slash_img2img_edits_the_image_option_inside_the_mask(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    source, mask = png(200, 200, "blue"), png(200, 200, "white")
    interaction = fake.slash_command(
        channel,
        alice,
        "img2img",
        {
            "prompt": "add snow",
            "image": File("in.png", source),
            "mask": File("mask.png", mask),
            "model": "gpt-image",
        },
    )

    edit = await fake.wait_for(with_files(of(interaction, "edit_original_response")))

    assert interaction.ack_delay is not None and interaction.ack_delay < 3
    assert edit.payload["content"] == "gpt-image · 1024x1024 · $0.021"
    assert corner(edit.files[0].data) == BLUE
    [order] = stack.paid_orders()
    assert (order.path, order.inputs, order.mask) == (EDIT_PATH, (source,), mask)
    assert stack.gateway.settlements[0].model == "openai/gpt-image-1"
    assert interaction.original is not None and interaction.original["flags"] == 0  # public


async def test_slash_img2img_pays_for_the_same_body_as_the_message_command(stack: Stack) -> None:
    """Typed options go straight into a request: no command text is built and parsed again."""
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    source, mask = png(200, 100, "blue"), png(200, 100, "white")
    interaction = fake.slash_command(
        channel,
        alice,
        "img2img",
        {
            "prompt": "add --snow and 'ice'",
            "image": File("in.png", source),
            "mask": File("mask.png", mask),
            "model": "gpt-image-2",
            "size": "1536x1024",
            "n": 2,
        },
    )
    await fake.wait_for(with_files(of(interaction, "edit_original_response")))
    command = fake.send_message(
        channel,
        alice,
        "/img2img --model gpt-image-2 --size 1536x1024 --n 2 --mask -- add --snow and 'ice'",
        files=[File("in.png", source), File("mask.png", mask)],
    )
    await fake.wait_for(with_files(replies_to(command)))

    slash, message = stack.paid_orders()
    assert slash.body == message.body
    assert (slash.model, slash.inputs, slash.mask) == ("openai/gpt-image-2", (source,), mask)
    assert (slash.body["prompt"], slash.body["size"], slash.body["n"]) == (
        "add --snow and 'ice'",
        "1536x1024",
        2,
    )
    assert [s.amount_micro for s in stack.gateway.settlements] == [252_000, 252_000]


async def test_autocomplete_offers_the_models_for_the_command_and_their_sizes(
    stack: Stack,
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")

    labels: dict[str, str] = {}

    async def choices(command: str, options: dict[str, str], focused: str) -> list[str]:
        interaction = fake.autocomplete(channel, alice, command, options, focused)
        call = await fake.wait_for(of(interaction, "create_interaction_response"))
        assert call.ok, call.error
        assert interaction.choices is not None
        labels.update((choice["value"], choice["name"]) for choice in interaction.choices)
        return [choice["value"] for choice in interaction.choices]

    assert await choices("imagegen", {"model": ""}, "model") == [model.name for model in MODELS]
    assert await choices("imagegen", {"model": "gpt"}, "model") == ["gpt-image", "gpt-image-2"]
    assert await choices("imagegen", {"model": "Google/"}, "model") == [
        "nano-banana",
        "banana-pro",
    ]
    assert await choices("img2img", {"model": ""}, "model") == [
        "nano-banana",
        "banana-pro",
        "gpt-image",
        "gpt-image-2",
    ]
    assert await choices("img2img", {"model": "flux"}, "model") == []  # cannot edit
    assert labels["gpt-image"] == "gpt-image (openai/gpt-image-1) from $0.021"

    assert await choices("imagegen", {"size": ""}, "size") == [
        "1024x1024",
        "1216x832",
        "832x1216",
        "1024x1792",
    ]
    assert await choices("imagegen", {"model": "dall-e-3", "size": ""}, "size") == [
        "1024x1024",
        "1792x1024",
        "1024x1792",
    ]
    assert await choices("img2img", {"size": ""}, "size") == ["1024x1024", "1536x1024", "1024x1536"]
    assert await choices("imagegen", {"model": "cogview", "size": "1440"}, "size") == [
        "720x1440",
        "1440x720",
        "1440x1440",
    ]
    assert stack.gateway.payments_received == 0


# Slow jobs and Discord's interaction clock


async def test_a_slow_slash_job_is_deferred_at_once_and_edited_with_the_picture(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.status, "STATUS_EDIT_SECONDS", 1.0)
    stack.gateway.job_seconds = 3.5  # longer than Discord's 3-second window to answer
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    interaction = fake.slash_command(channel, alice, "imagegen", {"prompt": "a fox #slow"})

    final = await fake.wait_for(with_files(of(interaction, "edit_original_response")), 15)

    assert interaction.ack_delay is not None and interaction.ack_delay < 3
    assert final.at - interaction.created_at > 3.5
    assert final.payload["content"] == "nano-banana · 1024x1024 · $0.0525"
    edits = [call for call in fake.sent if of(interaction, "edit_original_response")(call)]
    assert all(edit.ok for edit in edits)
    status = "Drawing with nano-banana · 1024x1024 · $0.0525…"
    assert edits[0].payload["content"] == status
    progress = [edit.payload["content"] for edit in edits[1:-1]]
    assert progress and all(text.startswith(f"{status} ") for text in progress), progress
    assert interaction.original is not None and interaction.original["attachments"]
    assert fake.calls("create_message") == [] and fake.calls("create_followup") == []
    assert len(stack.gateway.settlements) == 1


async def test_a_slow_message_job_edits_its_status_then_deletes_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.status, "STATUS_EDIT_SECONDS", 0.3)
    stack.gateway.job_seconds = 1.0
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    command = fake.send_message(channel, alice, "/imagegen a fox #slow")

    reply = await fake.wait_for(with_files(replies_to(command)), 10)
    await fake.wait_for("delete_message")

    status = "Drawing with nano-banana · 1024x1024 · $0.0525…"
    [shown] = [call for call in fake.calls("create_message") if not call.files]
    assert shown.payload["content"] == status
    edits = fake.calls("edit_message")
    assert edits and all(edit.ok for edit in edits)
    assert all(edit.payload["content"].startswith(f"{status} ") for edit in edits)
    assert all(edit.params["message_id"] == int(shown.result["id"]) for edit in edits)
    assert fake.calls("delete_message")[0].params["message_id"] == int(shown.result["id"])
    assert [message["id"] for message in fake.messages_in(channel)] == [
        command["id"],
        reply.result["id"],
    ]
    assert channel.id in fake.typing


async def test_a_job_that_outlives_the_interaction_token_is_posted_in_the_channel(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discord's webhook tokens die after 15 minutes; here after 1.5 s, the adapter's margin 1 s.

    DALL-E 3's rewritten prompt makes a caption over Discord's 2,000 characters: cut to fit with
    the mention in front.
    """
    monkeypatch.setattr(adapters.discord, "TOKEN_SECONDS", 1.0)
    fake = stack.discord
    fake.token_ttl = 1.5
    stack.gateway.job_seconds = 2.0
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    prompt = "a fox in the snow, " * 110 + "#slow"
    interaction = fake.slash_command(
        channel, alice, "imagegen", {"prompt": prompt, "model": "dall-e-3"}
    )

    posted = await fake.wait_for(with_files(created_in(channel.id)), 10)

    assert posted.ok, posted.error
    caption = "dall-e-3 · 1024x1024 · $0.042\nA sandbox placeholder showing: a fox in the snow"
    assert posted.payload["content"].startswith(f"{alice.mention} {caption}")
    assert len(posted.payload["content"]) == 2000
    assert posted.at - interaction.created_at > fake.token_ttl
    webhook_calls = [call for call in fake.sent if call.interaction_id == interaction.id]
    assert all(call.ok for call in webhook_calls)  # the dead token was never used
    assert not any(call.files for call in webhook_calls)
    assert len(stack.gateway.settlements) == 1


# Mistakes and refusals: answered, nothing paid


async def test_message_command_mistakes_are_answered_and_nothing_is_paid(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    picture = File("a.png", png())
    mistakes: list[tuple[str, list[File], str]] = [
        ("/imagegen -m nope a fox", [], "unknown model 'nope'"),
        ("/imagegen -s 3x3 a fox", [], "can't make 3x3"),
        ("/imagegen -m flux", [], "say what to draw"),
        ("/img2img make it snowy", [], "attach the image"),
        ("/imagegen --n 9 a fox", [], "--n must be a whole number from 1 to 4"),
        ("/imagegen -m dall-e-3 -n 2 a fox", [], "drop --n"),
        ("/img2img -m flux add a hat", [picture], "can't edit"),
        ("/img2img -m nano-banana --mask add a hat", [picture, picture], "can't use a mask"),
        ("/img2img -m nano-banana fuse", [picture] * 4, "takes at most 3 images; you sent 4"),
        ("/img2img add a hat", [File("a.png", GIF, "image/png")], "not a png, jpeg or webp"),
        (
            "/img2img add a hat",
            [File("a.png", png(), size_override=25 << 20)],  # as Discord reports it
            "over 20 mb",
        ),
    ]
    commands = [(fake.send_message(channel, alice, text, files=files), text, fragment)
                for text, files, fragment in mistakes]  # fmt: skip

    for command, text, fragment in commands:
        answer = await reply_text(fake, command)
        assert fragment in answer.lower(), (text, answer)

    assert len(fake.calls("create_message")) == len(mistakes)  # one answer each, no status
    assert stack.gateway.payments_received == 0 and stack.orders == []


async def test_slash_command_mistakes_are_answered_ephemerally_and_nothing_is_paid(
    stack: Stack,
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    picture = File("a.png", png())
    mistakes: list[tuple[str, dict[str, Any], str]] = [
        ("imagegen", {"prompt": "a fox", "model": "nope"}, "unknown model 'nope'"),
        ("imagegen", {"prompt": "a fox", "size": "3x3"}, "can't make 3x3"),
        ("imagegen", {"prompt": "   "}, "say what to draw"),
        ("imagegen", {"prompt": "a fox", "model": "dall-e-3", "n": 2}, "drop --n"),
        ("img2img", {"prompt": "add a hat", "image": picture, "model": "flux"}, "can't edit"),
        (
            "img2img",
            {"prompt": "add a hat", "image": picture, "mask": picture, "model": "nano-banana"},
            "can't use a mask",
        ),
        (
            "img2img",
            {"prompt": "fuse", "model": "nano-banana"}
            | {name: picture for name in ("image", "image2", "image3", "image4")},
            "takes at most 3 images; you sent 4",
        ),
        (
            "img2img",
            {"prompt": "add a hat", "image": File("a.png", GIF, "image/png")},
            "not a png, jpeg or webp",
        ),
        (
            "img2img",
            {"prompt": "add a hat", "image": File("a.png", png(), size_override=25 << 20)},
            "over 20 mb",
        ),
    ]
    interactions = [(fake.slash_command(channel, alice, name, options), fragment)
                    for name, options, fragment in mistakes]  # fmt: skip

    for interaction, fragment in interactions:
        answer = await ephemeral_text(fake, interaction)
        assert fragment in answer.lower(), (interaction.payload["data"], answer)
        assert interaction.ack_delay is not None and interaction.ack_delay < 3

    assert fake.messages_in(channel) == []  # nothing left for anyone else to see
    assert stack.gateway.payments_received == 0 and stack.orders == []
    # What Discord itself enforces before the bot hears of it: an image, and n from 1 to 4.
    options = {
        command["name"]: {option["name"]: option for option in command["options"]}
        for command in fake.commands
    }
    assert options["img2img"]["image"]["required"] is True
    assert (options["imagegen"]["n"]["min_value"], options["imagegen"]["n"]["max_value"]) == (1, 4)


async def test_a_refusal_after_the_status_is_shown_replaces_it_and_nothing_is_charged(
    stack: Stack,
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    command = fake.send_message(channel, alice, "/imagegen a fox #policy")
    interaction = fake.slash_command(channel, alice, "imagegen", {"prompt": "a fox #policy"})

    answer = await reply_text(fake, command)
    private = await ephemeral_text(fake, interaction)
    await fake.wait_for("delete_message")  # the message command's status

    assert "content policy" in answer.lower() and answer == private
    shown = fake.calls("edit_original_response")[0].payload["content"]
    assert shown.startswith("Drawing with nano-banana")  # the status came, then went
    assert [message["id"] for message in fake.messages_in(channel)] == [
        command["id"],
        fake.calls("create_message")[-1].result["id"],
    ]
    assert stack.gateway.settlements == []


async def test_models_and_help_answer_only_the_caller(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    models = fake.slash_command(channel, alice, "models")
    usage = fake.slash_command(channel, alice, "help")
    start = fake.slash_command(channel, alice, "start")

    assert "google/nano-banana" in await private_answer(fake, models)
    assert "/img2img" in await private_answer(fake, usage)
    assert await private_answer(fake, start) == await private_answer(fake, usage)
    assert models.ack_delay is not None and models.ack_delay < 3
    assert fake.messages_in(channel) == []


async def test_the_daily_limit_is_answered_and_nothing_more_is_paid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch, user_daily_limit_usd="0.06") as stack:  # one image
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice = fake.user("alice")
        first = fake.send_message(channel, alice, "/imagegen a fox")
        await fake.wait_for(with_files(replies_to(first)))

        second = fake.send_message(channel, alice, "/imagegen a fox")
        interaction = fake.slash_command(channel, alice, "imagegen", {"prompt": "a fox"})

        assert (await reply_text(fake, second)).startswith("Daily limit reached")
        assert (await ephemeral_text(fake, interaction)).startswith("Daily limit reached")
        assert stack.gateway.payments_received == 1
        assert len(stack.gateway.settlements) == 1


async def test_outsiders_get_one_refusal_in_a_dm_and_silence_in_guilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDiscord()
    alice, bob = fake.user("alice"), fake.user("bob")
    club, other = fake.guild("Club"), fake.guild("Other")
    members = {"allowed_users": f"discord:{alice.id}", "allowed_chats": f"discord:{club.id}"}
    async with running(tmp_path, monkeypatch, fake, **members) as stack:
        in_club, elsewhere, bobs_dm = (
            club.channel("general"),
            other.channel("general"),
            fake.dm(bob),
        )
        silent_messages = [
            fake.send_message(elsewhere, alice, "/imagegen a fox"),  # a guild not on the list
            fake.send_message(elsewhere, alice, "/spend"),
            fake.send_message(in_club, bob, "/imagegen a fox"),  # a user not on the list
        ]
        silent_interactions = [
            fake.slash_command(elsewhere, alice, "imagegen", {"prompt": "a fox"}),
            fake.slash_command(elsewhere, alice, "spend"),
            fake.slash_command(in_club, bob, "imagegen", {"prompt": "a fox"}),
        ]
        in_dm = fake.send_message(bobs_dm, bob, "/imagegen a fox")
        slash_in_dm = fake.slash_command(bobs_dm, bob, "imagegen", {"prompt": "a fox"})
        served = fake.send_message(in_club, alice, "/imagegen a fox")

        assert await reply_text(fake, in_dm) == REFUSAL
        assert await ephemeral_text(fake, slash_in_dm) == REFUSAL
        await fake.wait_for(with_files(replies_to(served)))
        for interaction in silent_interactions:
            await fake.wait_for(of(interaction, "delete_original_response"))

        for interaction in silent_interactions:  # the "thinking…" went, nothing came instead
            assert interaction.original is None and interaction.followups == []
        answered = [call for call in fake.calls("create_message") if call.channel_id != in_club.id]
        assert [call.channel_id for call in answered] == [bobs_dm.id]
        for message in silent_messages:
            assert not any(replies_to(message)(call) for call in fake.sent)
        assert elsewhere.id not in fake.typing
        assert fake.messages_in(elsewhere) == silent_messages[:2]
        assert len(stack.gateway.settlements) == 1


# Delivery


def webp_of_2048(data: bytes) -> bool:
    with Image.open(BytesIO(data)) as image:
        return (image.format, image.size) == ("WEBP", (2048, 2048))


async def test_a_picture_over_10_mib_is_re_encoded_to_fit_not_dropped(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    command = fake.send_message(channel, alice, "/imagegen a storm #huge")  # a ~12 MB PNG

    reply = await fake.wait_for(with_files(replies_to(command)), 20)

    assert reply.ok, reply.error
    (upload,) = reply.files
    assert upload.filename == "image-1.webp"
    assert len(upload.data) <= UPLOAD_MAX_BYTES
    assert webp_of_2048(upload.data)
    assert reply.payload["content"] == "nano-banana · 1024x1024 · $0.0525"
    assert [call.status for call in fake.sent if call.files] == [200]  # no 413 on the way
    assert len(stack.gateway.settlements) == 1


async def test_four_oversized_pictures_are_split_over_the_response_and_a_followup(
    stack: Stack,
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    interaction = fake.slash_command(channel, alice, "imagegen", {"prompt": "storms #huge", "n": 4})

    def uploads() -> list[Call]:
        return [call for call in fake.sent if call.interaction_id == interaction.id and call.files]

    await fake.wait_for(lambda _: sum(len(call.files) for call in uploads()) >= 4, 30)

    first, *more = uploads()
    assert first.name == "edit_original_response"
    assert first.payload["content"] == "nano-banana · 1024x1024 · $0.21"
    assert more and {call.name for call in more} == {"create_followup"}
    assert all(not call.payload.get("flags") for call in more)  # public, like the picture
    assert all(call.ok for call in uploads())
    assert all(
        sum(len(upload.data) for upload in call.files) <= UPLOAD_MAX_BYTES for call in uploads()
    )
    names = [upload.filename for call in uploads() for upload in call.files]
    assert names == [f"image-{index}.webp" for index in range(1, 5)]
    assert all(webp_of_2048(upload.data) for call in uploads() for upload in call.files)
    assert len(interaction.followups) == len(more)
    assert len(stack.gateway.settlements) == 1


async def test_a_caption_is_cut_to_discords_2000_characters(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    prompt = "a fox in the snow, " * 110  # DALL-E 3 answers with it rewritten: a long caption
    command = fake.send_message(channel, alice, f"/imagegen -m dall-e-3 {prompt}")

    reply = await fake.wait_for(with_files(replies_to(command)))

    assert reply.ok, reply.error
    assert len(reply.payload["content"]) == 2000
    assert reply.payload["content"].startswith("dall-e-3 · 1024x1024 · $0.042\nA sandbox")


@pytest.mark.parametrize("how", ["message", "slash"])
async def test_a_rate_limited_picture_upload_is_retried_and_delivered(
    stack: Stack, how: str
) -> None:
    stack.gateway.job_seconds = 0.5  # time to flood the upload route after the status is shown
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    route: str
    shown: Callable[[Call], bool]
    if how == "message":
        command = fake.send_message(channel, alice, "/imagegen a fox #slow")
        route, shown = "create_message", replies_to(command)
    else:
        interaction = fake.slash_command(channel, alice, "imagegen", {"prompt": "a fox #slow"})
        route, shown = "edit_original_response", of(interaction, "edit_original_response")
    status = await fake.wait_for(shown)
    assert status.payload["content"].startswith("Drawing with") and not status.files
    fake.flood(route, retry_after=0.5)

    delivered = await fake.wait_for(lambda call: with_files(shown)(call) and call.ok)

    uploads = [call for call in fake.sent if with_files(shown)(call)]
    assert [call.status for call in uploads] == [429, 200]
    assert delivered.at - uploads[0].at >= 0.5
    assert delivered.payload["content"] == "nano-banana · 1024x1024 · $0.0525"
    assert len(stack.gateway.settlements) == 1


# /spend


async def test_spend_for_users_and_admins_matches_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDiscord()
    alice, boss = fake.user("alice"), fake.user("boss")
    async with running(tmp_path, monkeypatch, fake, admin_ids=f"discord:{boss.id}") as stack:
        channel = fake.guild("Artists").channel("general")
        drawn = fake.send_message(channel, alice, "/imagegen a fox")
        await fake.wait_for(with_files(replies_to(drawn)))
        alice_line = f"@alice (discord:{alice.id}): $0.0525"

        asked_all = fake.send_message(channel, alice, "/spend all")
        assert "only the bot's admins" in (await reply_text(fake, asked_all)).lower()
        refused = fake.slash_command(channel, alice, "spend", {"who": f"discord:{boss.id}"})
        assert "only the bot's admins" in (await private_answer(fake, refused)).lower()
        own = fake.send_message(channel, alice, "/spend")
        assert "You have spent $0.0525 today" in await reply_text(fake, own)
        own_slash = fake.slash_command(channel, alice, "spend")
        assert "You have spent $0.0525 today" in await private_answer(fake, own_slash)
        report = fake.send_message(fake.dm(boss), boss, "/spend all")
        assert alice_line in await reply_text(fake, report)
        report_slash = fake.slash_command(channel, boss, "spend", {"who": "all"})
        assert alice_line in await private_answer(fake, report_slash)
        one = fake.slash_command(channel, boss, "spend", {"who": "@alice"})
        assert f"@alice (discord:{alice.id}) has spent $0.0525" in await private_answer(fake, one)

        code, out = await imagebot(
            "spend", "--json", env=cli_env(stack.gateway.url, stack.database), cwd=tmp_path
        )

    report_json = json.loads(out)
    settled = sum(settlement.amount_micro for settlement in stack.gateway.settlements)
    assert code == 0
    assert report_json["total_usd"] == f"0.{settled:06d}" == "0.052500"
    assert [(user["user"], user["images"]) for user in report_json["users"]] == [
        (f"discord:{alice.id}", 1)
    ]
    assert "pending_usd" not in report_json


async def test_a_report_over_discords_2000_characters_comes_in_several_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty spenders with long names: /spend all is split between lines, never cut."""
    fake = FakeDiscord()
    boss = fake.user("boss")
    database = tmp_path / "ledger.sqlite3"
    names = [f"user_{index:02d}_{'x' * 24}" for index in range(20)]
    async with await SqliteLedger.open(database) as ledger:
        for index, name in enumerate(names):
            attempt = Attempt("discord", str(10**17 + index), f"@{name}", "1", "imagegen",
                              "google/nano-banana", "1024x1024", 1)  # fmt: skip
            row = await ledger.reserve(attempt, 52_500, Budget(10**6, 10**8, exempt=False))
            await ledger.settle(row, 52_500, None)
    async with running(tmp_path, monkeypatch, fake, admin_ids=f"discord:{boss.id}") as stack:
        channel = fake.guild("Artists").channel("general")
        asked = fake.slash_command(channel, boss, "spend", {"who": "all"})
        first = await private_answer(fake, asked)
        more = await stack.discord.wait_for(of(asked, "create_followup"))

    pieces = [first, str(more.payload["content"])]
    assert all(len(piece) <= 2000 for piece in pieces)
    assert "\n".join(pieces).count("\n") == 20  # the total line and 20 users, none lost
    assert all(f"@{name} (discord:" in "\n".join(pieces) for name in names)
    assert more.payload["flags"] & FLAG_EPHEMERAL


# Start-up


@pytest.mark.parametrize(
    ("intent_on", "token_ok", "says"),
    [(False, True, "'Message Content Intent'"), (True, False, "DISCORD_BOT_TOKEN")],
    ids=["intent-off", "bad-token"],
)
async def test_serve_stops_with_a_startup_error_saying_what_to_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, intent_on: bool, token_ok: bool, says: str
) -> None:
    fake = FakeDiscord(privileged_intents=INTENT_MESSAGE_CONTENT if intent_on else 0)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # restored after
    token = fake.token if token_ok else fake.token[:-4] + "nope"
    loaded = load_settings(
        _env_file=None,
        discord_bot_token=token,
        discord_api_url=fake.api_url,
        image_api_url="http://127.0.0.1:9",
        database_path=tmp_path / "ledger.sqlite3",
    )
    try:
        async with open_bot(loaded, Wallet.create()) as bot:
            client = build_client(loaded, bot)
            with pytest.raises(StartupError, match=says):
                await asyncio.wait_for(serve(client, token, asyncio.Event()), 10)
    finally:
        await fake.close()

    assert fake.sessions == []
    if token_ok:
        assert [connection.close_code for connection in fake.connections] == [4014]


def test_a_sent_picture_is_freed_at_once_not_by_the_garbage_collector() -> None:
    """discord.py swaps a file's close while sending and puts it back after; on a plain
    BytesIO that made a cycle holding the picture until the collector's next full pass."""
    upload = adapters.discord._Upload(png())
    file = discord.File(upload, "image-1.png")
    file.close()  # what discord.py does once the message is sent
    gone = weakref.ref(upload)
    gc.disable()
    try:
        del upload, file
        assert gone() is None
    finally:
        gc.enable()


# discord.py's own bookkeeping


async def test_rate_limit_buckets_are_swept_in_turn_not_on_every_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crowd makes a bucket per DM channel and interaction; idle ones still go."""
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    sweep_rate_limits_in_turn(http)
    checked = itertools.count()
    is_inactive = discord.http.Ratelimit.is_inactive
    monkeypatch.setattr(
        discord.http.Ratelimit,
        "is_inactive",
        lambda bucket: next(checked) >= 0 and is_inactive(bucket),
    )
    for number in range(3000):
        http.get_ratelimit(f"POST /channels/{number}/messages")
    assert next(checked) < 30_000  # discord.py alone: about 4,400,000

    for bucket in http._buckets.values():
        bucket._last_request -= 301  # idle for over 5 minutes
    for number in range(3000, 3000 + RATE_LIMIT_SWEEP_EVERY):
        http.get_ratelimit(f"POST /channels/{number}/messages")
    new = {
        f"POST /channels/{number}/messages" for number in range(3000, 3000 + RATE_LIMIT_SWEEP_EVERY)
    }
    assert set(http._buckets) == new  # every idle one swept
