"""Hostile chat input, end to end: the real adapters against the fake Telegram and Discord, the
sandbox gateway and the real ledger. Memory is checked as a bound (traced allocations, or a
subprocess's peak RSS), never as a time.

Run as a script (``python tests/test_hostile_chat.py huge-picture``) it delivers one huge
picture through Discord and prints how much its peak RSS grew, for the test that reads it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import struct
import sys
import tempfile
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import aiosqlite
import discord
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from fake_discord import Call as DiscordCall
from fake_discord import FakeDiscord, File
from fake_telegram import CHANNEL_BOT, GROUP_ANONYMOUS_BOT, FakeTelegram
from pictures import png
from PIL import Image
from test_discord import replies_to
from test_telegram import reply_text

import adapters.discord
from adapters import telegram as telegram_adapter
from adapters.discord import build_client
from adapters.discord import serve as serve_discord
from bot.config import load_settings
from bot.images import Picture
from bot.ledger import SqliteLedger
from bot.ledger.schema import MIGRATIONS
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent
ADMIN_ID = 999
MIB = 1024 * 1024


@dataclass
class Stack:
    gateway: Sandbox
    database: Path
    downloads: list[str] = field(default_factory=list)  # input files the bot fetched


def _counting(prefixes: tuple[str, ...], into: list[str]) -> Middleware:
    """An aiohttp middleware that notes every GET under ``prefixes`` (it changes nothing)."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET" and request.path.startswith(prefixes):
            into.append(request.path)
        return await handler(request)

    return count


@dataclass
class TelegramStack(Stack):
    telegram: FakeTelegram = field(default_factory=FakeTelegram)


@dataclass
class DiscordStack(Stack):
    discord: FakeDiscord = field(default_factory=FakeDiscord)


@asynccontextmanager
async def telegram_running(tmp_path: Path, **settings: str) -> AsyncIterator[TelegramStack]:
    """``imagebot run``'s Telegram side against the fake, paying the sandbox."""
    stack = TelegramStack(Sandbox(job_seconds=0.2), tmp_path / "ledger.sqlite3")
    stack.telegram.app.middlewares.append(_counting(("/file/",), stack.downloads))
    await stack.telegram.start()
    await stack.gateway.start()
    loaded = load_settings(
        _env_file=None,
        telegram_bot_token=stack.telegram.token,
        telegram_api_url=stack.telegram.url,
        image_api_url=stack.gateway.url,
        database_path=stack.database,
        admin_ids=f"telegram:{ADMIN_ID}",
        **settings,
    )
    stop = asyncio.Event()
    async with open_bot(loaded, Wallet.create(), poll_interval=0.05) as bot:
        application = telegram_adapter.build_application(loaded, bot)
        polling = asyncio.create_task(telegram_adapter.serve(application, stop))
        await stack.telegram.wait_for("setMyCommands")
        try:
            yield stack
        finally:
            stop.set()
            await polling
    await stack.gateway.close()
    await stack.telegram.close()


@asynccontextmanager
async def discord_running(
    tmp_path: Path,
    fake: FakeDiscord | None = None,
    gateway_middleware: Middleware | None = None,
    **settings: str,
) -> AsyncIterator[DiscordStack]:
    """``imagebot run``'s Discord side against the fake, paying the sandbox."""
    stack = DiscordStack(Sandbox(job_seconds=0.2), tmp_path / "ledger.sqlite3")
    stack.discord = fake or stack.discord
    stack.discord.app.middlewares.append(_counting(("/cdn/", "/media/"), stack.downloads))
    if gateway_middleware is not None:
        stack.gateway.app.middlewares.append(gateway_middleware)
    await stack.discord.start()
    await stack.gateway.start()
    base = discord.http.Route.BASE
    loaded = load_settings(
        _env_file=None,
        discord_bot_token=stack.discord.token,
        discord_api_url=stack.discord.api_url,
        image_api_url=stack.gateway.url,
        database_path=stack.database,
        **settings,
    )
    stop = asyncio.Event()
    try:
        async with open_bot(loaded, Wallet.create(), poll_interval=0.05) as bot:
            serving = asyncio.create_task(
                serve_discord(build_client(loaded, bot), stack.discord.token, stop)
            )
            await stack.discord.wait_ready()
            await stack.discord.wait_for("bulk_overwrite_global_commands")
            try:
                yield stack
            finally:
                stop.set()
                await serving
    finally:
        discord.http.Route.BASE = base
        await stack.gateway.close()
        await stack.discord.close()


def noisy_png(side: int, seed: int) -> bytes:
    """A PNG of random pixels: about 3 bytes per pixel, PNG cannot shrink it."""
    out = BytesIO()
    noise = random.Random(seed).randbytes(side * side * 3)
    Image.frombytes("RGB", (side, side), noise).save(out, "PNG", compress_level=0)
    return out.getvalue()


def blank_png(width: int, height: int, padded_to: int = 0) -> bytes:
    """A valid black PNG written row by row (never held decoded), padded with a private chunk
    to ``padded_to`` bytes: a tiny file that decodes to ``width * height * 3`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = bytes(1 + width * 3)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    head = b"\x89PNG\r\n\x1a\n" + chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    )
    tail = chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    padding = max(0, padded_to - len(head) - len(tail) - 12)
    return head + (chunk(b"prVt", bytes(padding)) if padding else b"") + tail


def answers(telegram: FakeTelegram, chat_id: int) -> list[str]:
    """The bot's texts in a chat, without its "Drawing…"/"Editing…" status lines."""
    return [
        str(call.params["text"])
        for call in telegram.calls("sendMessage")
        if call.chat_id == chat_id and not call.params["text"].startswith(("Drawing", "Editing"))
    ]


async def discord_answer(fake: FakeDiscord, command: dict[str, Any]) -> str:
    """The text the bot answered a message command with (not its status)."""
    answered = replies_to(command)
    call = await fake.wait_for(
        lambda call: (
            answered(call)
            and not str(call.payload.get("content")).startswith(("Drawing", "Editing"))
        ),
        60,
    )
    assert call.ok, call.error
    return str(call.payload["content"])


# 1. A huge picture re-encoded for Discord


async def _deliver_a_huge_picture() -> dict[str, Any]:
    """An 8000x8000 PNG (64 MP, the most the image service accepts) padded to 11.5 MiB from
    the gateway, delivered on Discord; how much the process's peak RSS grew while the bot
    handled it."""
    huge = blank_png(8_000, 8_000, padded_to=int(11.5 * MIB))

    @web.middleware
    async def huge_pictures(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET" and request.path.startswith("/images/"):
            return web.Response(body=huge, content_type="image/png")
        return await handler(request)

    with tempfile.TemporaryDirectory() as folder:
        async with discord_running(Path(folder), gateway_middleware=huge_pictures) as stack:
            fake = stack.discord
            channel = fake.guild("Artists").channel("general")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            command = fake.send_message(channel, fake.user("alice"), "/imagegen -m flux a storm")
            reply = await fake.wait_for(
                lambda call: (
                    replies_to(command)(call)
                    and not str(call.payload["content"]).startswith("Drawing")
                ),
                120,
            )
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            settled = len(stack.gateway.settlements)
    return {
        "grown_mib": (peak - before) / 1024,
        "ok": reply.ok,
        "content": reply.payload["content"],
        "files": len(reply.files),
        "settled": settled,
    }


async def test_a_huge_picture_for_discord_stays_within_a_memory_budget() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "huge-picture",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(child.communicate(), 300)
    assert child.returncode == 0
    result = json.loads(out.decode().strip().splitlines()[-1])

    # Over the re-encode budget, so refused from its header; decoding the report's 13000x13000
    # whole took 1.7 GB (pictures over 64 MP now stop even earlier, in the image service).
    assert result["grown_mib"] < 250, result
    assert result["ok"] and result["files"] == 0 and result["settled"] == 1
    assert result["content"].startswith("Picture 1 (8000x8000) is too large to send here.\n")
    assert "flux · 1024x1024 · $0.042" in result["content"]


def test_a_big_jpeg_is_decoded_scaled_down_to_fit() -> None:
    """A JPEG over the pixel budget is drafted at a fraction of its size, not refused."""
    out = BytesIO()
    noise = random.Random(1).randbytes(6000 * 5000 * 3)
    Image.frombytes("RGB", (6000, 5000), noise).save(out, "JPEG", quality=98)
    picture = Picture(out.getvalue(), "image/jpeg", 6000, 5000)
    assert len(picture.data) > adapters.discord.MAX_UPLOAD_BYTES

    fitted = adapters.discord._shrunk(picture)

    assert fitted is not None and fitted[1] == "webp"
    assert len(fitted[0]) <= adapters.discord.MAX_UPLOAD_BYTES


# 2. Inputs that only look like pictures


def _truncated() -> bytes:
    return noisy_png(300, 1)[:-5000]


def _polyglot() -> bytes:
    zip_file = b"PK\x03\x04" + bytes(26) + b"payload.txt" + b"PK\x05\x06" + bytes(18)
    return png(300, 200, "blue") + zip_file


def _bomb() -> bytes:
    return blank_png(8_000, 8_000)  # 64 megapixels in about 200 KB


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_truncated, "is not a whole PNG, JPEG or WebP file"),
        (_polyglot, "is not a whole PNG, JPEG or WebP file"),
        (_bomb, "has too many pixels; the limit is 40 megapixels"),
    ],
    ids=["truncated", "polyglot", "bomb"],
)
async def test_a_broken_input_is_refused_before_anything_is_paid(
    tmp_path: Path, make: Callable[[], bytes], says: str
) -> None:
    async with telegram_running(tmp_path) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        telegram.send_document(
            chat, chat.user, make(), "in.png", "image/png", caption="/img2img add a hat"
        )

        answer = await reply_text(telegram, 111)

    assert answer.startswith("Image 1 ") and says in answer, answer
    assert stack.gateway.payments_received == 0
    assert telegram.calls("sendPhoto") == []


async def test_a_polyglot_slash_command_input_is_refused_on_discord(tmp_path: Path) -> None:
    async with discord_running(tmp_path) as stack:
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice = fake.user("alice")
        good = File("a.png", png(120, 90, "red"))
        command = fake.send_message(
            channel, alice, "/img2img -m nano-banana fuse", files=[good, File("b.png", _polyglot())]
        )

        answer = await discord_answer(fake, command)

    assert answer.startswith("Image 2 is not a whole PNG, JPEG or WebP file"), answer
    assert stack.gateway.payments_received == 0


# 3. Outsiders, and more pictures than any request takes


async def test_outsiders_albums_are_never_fetched(tmp_path: Path) -> None:
    """Albums of ten from a chat outside ALLOWED_CHATS and from a user outside ALLOWED_USERS:
    no getFile, no download, and no memory spent on them."""
    members = {"allowed_chats": "telegram:-100111", "allowed_users": "telegram:111"}
    images = [noisy_png(700, seed) for seed in range(10)]  # ~1.4 MiB each
    async with telegram_running(tmp_path, **members) as stack:
        telegram = stack.telegram
        club, elsewhere = telegram.group_chat(-100111, "Club"), telegram.group_chat(-100999, "X")
        alice = telegram.private_chat(111, "Alice", "alice").user
        mallory = telegram.private_chat(222, "Mallory", "mallory").user
        assert alice is not None and mallory is not None
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            baseline = tracemalloc.get_traced_memory()[0]
            for group in (elsewhere, club, elsewhere):
                telegram.send_album(group, mallory, images, caption="/img2img -m gpt-image fuse")
            telegram.send_photo(club, alice, png(), caption="/img2img make it winter")
            await telegram.wait_for(lambda call: call.method == "sendPhoto", 30)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()

    assert len(telegram.calls("getFile")) == len(stack.downloads) == 1  # alice's one picture
    assert peak < 8 * MIB, peak  # the outsiders' pictures are 42 MiB
    assert answers(telegram, -100999) == [] and answers(telegram, -100111) == []


async def test_outsiders_attachments_are_never_fetched_on_discord(tmp_path: Path) -> None:
    fake = FakeDiscord()
    alice, mallory = fake.user("alice"), fake.user("mallory")
    club, other = fake.guild("Club"), fake.guild("Other")
    members = {"allowed_users": f"discord:{alice.id}", "allowed_chats": f"discord:{club.id}"}
    files = [File(f"{index}.png", png(60, 60)) for index in range(10)]
    async with discord_running(tmp_path, fake, **members) as stack:
        elsewhere, in_club = other.channel("general"), club.channel("general")
        picture = fake.send_message(in_club, mallory, "look", files=files)
        fake.send_message(elsewhere, alice, "/img2img -m gpt-image fuse", files=files)
        fake.send_message(in_club, mallory, "/img2img -m gpt-image fuse", files=files)
        fake.send_message(in_club, mallory, "/img2img -m gpt-image x", reply_to=int(picture["id"]))
        slash = fake.slash_command(
            in_club, mallory, "img2img", {"prompt": "x", "image": File("a.png", png())}
        )
        await fake.wait_for(lambda call: call.name == "delete_original_response", 30)
        served = fake.send_message(in_club, alice, "/img2img snow", files=[File("a.png", png())])
        await fake.wait_for(lambda call: replies_to(served)(call) and bool(call.files), 30)

    assert len(stack.downloads) == 1  # alice's own picture only
    assert slash.original is None and fake.calls("get_message") == []
    assert len(stack.gateway.settlements) == 1


async def test_more_pictures_than_a_request_takes_are_refused_before_fetching(
    tmp_path: Path,
) -> None:
    async with telegram_running(tmp_path) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        telegram.send_album(chat, chat.user, [png() for _ in range(10)], caption="/img2img fuse")

        answer = await reply_text(telegram, 111)

    assert answer == "That's 10 images; /img2img takes at most 5 (pictures and a mask). Send fewer."
    assert telegram.calls("getFile") == [] and stack.downloads == []


async def test_too_many_pictures_or_bytes_are_refused_before_downloading_on_discord(
    tmp_path: Path,
) -> None:
    async with discord_running(tmp_path) as stack:
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice = fake.user("alice")
        ten = [File(f"{index}.png", png()) for index in range(10)]
        heavy = [File(f"{i}.png", png(), size_override=19 * MIB) for i in range(3)]
        many = fake.send_message(channel, alice, "/img2img fuse", files=ten)
        large = fake.send_message(channel, alice, "/img2img fuse", files=heavy)

        assert "That's 10 images" in await discord_answer(fake, many)
        assert "over 50 MB together" in await discord_answer(fake, large)

    assert stack.downloads == []
    assert stack.gateway.payments_received == 0


# 4. Mentions on Discord


def pinged(call: DiscordCall) -> set[str]:
    """Whom Discord notifies for a message the bot sent, by its content and allowed_mentions
    (no allowed_mentions: everything in the content pings)."""
    payload = call.payload if isinstance(call.payload, dict) else {}
    payload = (
        payload.get("data", payload) if call.name == "create_interaction_response" else payload
    )
    content = str(payload.get("content") or "")
    allowed = payload.get("allowed_mentions")
    parse = set(allowed.get("parse", [])) if allowed is not None else {"everyone", "roles", "users"}
    users = {str(user) for user in (allowed or {}).get("users", [])}
    roles = {str(role) for role in (allowed or {}).get("roles", [])}
    found = set()
    if "everyone" in parse and re.search(r"@(everyone|here)\b", content):
        found.add("everyone")
    found |= {
        f"role:{r}" for r in re.findall(r"<@&(\d+)>", content) if "roles" in parse or r in roles
    }
    found |= {
        f"user:{u}" for u in re.findall(r"<@!?(\d+)>", content) if "users" in parse or u in users
    }
    return found


async def test_nothing_the_bot_sends_on_discord_pings_anyone_but_the_requester(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.discord, "TOKEN_SECONDS", 1.0)
    fake = FakeDiscord()
    fake.token_ttl = 1.5
    alice, bob = fake.user("alice", "@everyone"), fake.user("bob")
    prompt = f"@everyone @here <@&4242> <@{bob.id}> a fox"
    async with discord_running(tmp_path, fake) as stack:
        channel = fake.guild("Artists").channel("general")
        drawn = fake.send_message(channel, alice, f"/imagegen -m dall-e-3 {prompt}")
        refused = fake.send_message(channel, alice, "/imagegen -m @everyone a fox")
        slash = fake.slash_command(
            channel, alice, "imagegen", {"prompt": prompt, "model": "dall-e-3"}
        )
        await fake.wait_for(lambda call: replies_to(drawn)(call) and bool(call.files))
        assert "Unknown model '@everyone'" in await discord_answer(fake, refused)
        await fake.wait_for(lambda call: call.interaction_id == slash.id and bool(call.files))
        stack.gateway.job_seconds = 2.0  # outlives the interaction token: posted with a mention
        fake.slash_command(channel, alice, "imagegen", {"prompt": f"{prompt} #slow"})
        posted = await fake.wait_for(
            lambda call: (
                call.name == "create_message"
                and bool(call.files)
                and "message_reference" not in call.payload
            ),
            15,
        )

    assert posted.payload["content"].startswith(f"{alice.mention} ")
    assert pinged(posted) == {f"user:{alice.id}"}
    sent = [call for call in fake.sent if call.name in _POSTING]
    assert sent and all(pinged(call) <= {f"user:{alice.id}"} for call in sent), [
        (call.name, call.payload) for call in sent if pinged(call) - {f"user:{alice.id}"}
    ]
    [reply] = [call for call in sent if replies_to(drawn)(call) and call.files]
    content = reply.payload["content"]  # the prompt echoed in the revised one, made plain
    assert "a fox" in content and "@everyone" not in content and "<@&4242>" not in content


_POSTING = {
    "create_message",
    "edit_message",
    "edit_original_response",
    "create_followup",
    "edit_followup",
    "create_interaction_response",
}


# 5. Anonymous admins and channels on Telegram


async def test_anonymous_admins_of_two_groups_and_a_channel_are_three_principals(
    tmp_path: Path,
) -> None:
    """Each writes as its own chat; they share no budget with each other (one image a day)."""
    async with telegram_running(tmp_path, user_daily_limit_usd="0.06") as stack:
        telegram = stack.telegram
        first, second = telegram.group_chat(-100111, "First"), telegram.group_chat(-100222, "Two")
        news = telegram.channel_chat(-100333, "News", "newsroom")
        boss = telegram.private_chat(ADMIN_ID, "Boss", "boss")
        telegram.send_text(first, GROUP_ANONYMOUS_BOT, "/imagegen a fox", sender_chat=first)
        await telegram.wait_for(lambda call: call.method == "sendPhoto" and call.chat_id == -100111)
        telegram.send_text(second, GROUP_ANONYMOUS_BOT, "/imagegen a fox", sender_chat=second)
        await telegram.wait_for(lambda call: call.method == "sendPhoto" and call.chat_id == -100222)
        since = len(telegram.sent)
        telegram.send_text(first, CHANNEL_BOT, "/imagegen an owl", sender_chat=news)
        await telegram.wait_for(
            lambda call: call.method == "sendPhoto" and call.chat_id == -100111, since=since
        )
        assert boss.user is not None
        telegram.send_text(boss, boss.user, "/spend @newsroom")
        report = await reply_text(telegram, ADMIN_ID)

    assert report.startswith("@newsroom (telegram:-100333) has spent $0.0525 today"), report
    async with await SqliteLedger.open(stack.database) as ledger:
        users = sorted(payment.user for payment in await ledger.payments())
    assert users == ["telegram:-100111", "telegram:-100222", "telegram:-100333"]
    assert len(stack.gateway.settlements) == 3


# 6. /spend @name matches usernames only


async def test_spend_at_name_finds_the_username_not_a_display_name_impostor(
    tmp_path: Path,
) -> None:
    async with telegram_running(tmp_path) as stack:
        telegram = stack.telegram
        alice = telegram.private_chat(111, "Alice", "alice")
        impostor = telegram.private_chat(666, "@alice")  # no username, a name that looks like one
        boss = telegram.private_chat(ADMIN_ID, "Boss", "boss")
        for chat in (alice, impostor):
            assert chat.user is not None
            telegram.send_text(chat, chat.user, "/imagegen a fox")
            await telegram.wait_for(
                lambda call, at=chat.id: call.method == "sendPhoto" and call.chat_id == at
            )
        assert boss.user is not None
        telegram.send_text(boss, boss.user, "/spend @Alice")
        found = await reply_text(telegram, ADMIN_ID)
        since = len(telegram.sent)
        telegram.send_text(boss, boss.user, f"/spend telegram:{impostor.id}")
        by_id = await reply_text(telegram, ADMIN_ID, since)

    assert found.startswith("@alice (telegram:111) has spent $0.0525"), found
    assert by_id.startswith("@alice (telegram:666) has spent $0.0525"), by_id


async def test_an_upgraded_ledger_knows_discord_usernames_but_not_telegram_names(
    tmp_path: Path,
) -> None:
    """Discord rows were always named "@" + the username; a Telegram name may be a full name."""
    path = tmp_path / "ledger.sqlite3"
    async with aiosqlite.connect(path) as db:
        for statement in (statement for step in MIGRATIONS[:3] for statement in step):
            await db.execute(statement)
        await db.executemany(
            "INSERT INTO attempts (run_id, platform, user_id, display_name, chat_id, command,"
            " model, size, n, quoted_micro, status, created_at, updated_at)"
            " VALUES ('gone', ?, ?, ?, 'c', 'imagegen', 'm', '1024x1024', 1, 1, 'failed', 1, 1)",
            [("discord", "7", "@mallory"), ("telegram", "8", "@alice")],
        )
        await db.execute("PRAGMA user_version = 3")
        await db.commit()

    async with await SqliteLedger.open(path) as ledger:
        assert await ledger.find_user("@Mallory") == "discord:7"
        assert await ledger.find_user("@alice") is None


if __name__ == "__main__" and sys.argv[1:] == ["huge-picture"]:
    print(json.dumps(asyncio.run(_deliver_a_huge_picture())))
