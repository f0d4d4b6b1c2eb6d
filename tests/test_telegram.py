"""The Telegram adapter end to end: real python-telegram-bot against the fake Bot API server,
the sandbox gateway and the real ledger, all on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from fake_telegram import Call, FakeTelegram
from PIL import Image

from adapters.telegram import build_application, serve
from bot.config import load_settings
from bot.ledger import Ledger, to_json
from bot.sandbox import Sandbox
from bot.x402 import Wallet

ADMIN_ID = 999


@dataclass
class Stack:
    telegram: FakeTelegram
    gateway: Sandbox
    database: Path


def png(width: int = 64, height: int = 48, colour: str = "red") -> bytes:
    out = BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """``imagebot run``'s Telegram side: the Application polling the fake, paying the sandbox."""
    from bot.runtime import open_bot

    telegram, gateway = FakeTelegram(), Sandbox(job_seconds=0.2)
    await telegram.start()
    await gateway.start()
    database = tmp_path / "ledger.sqlite3"
    settings = load_settings(
        _env_file=None,
        telegram_bot_token=telegram.token,
        telegram_api_url=telegram.url,
        image_api_url=gateway.url,
        database_path=database,
        admin_ids=f"telegram:{ADMIN_ID}",
    )
    stop = asyncio.Event()
    async with open_bot(settings, Wallet.create(), poll_interval=0.05) as bot:
        polling = asyncio.create_task(serve(build_application(settings, bot), stop))
        await telegram.wait_for("setMyCommands")
        yield Stack(telegram, gateway, database)
        stop.set()
        await polling
    await gateway.close()
    await telegram.close()


def sent_to(chat_id: int, method: str) -> object:
    return lambda call: call.method == method and call.chat_id == chat_id


async def reply_text(telegram: FakeTelegram, chat_id: int, since: int) -> str:
    call = await telegram.wait_for(
        lambda call: (
            call.method == "sendMessage"
            and call.chat_id == chat_id
            and not call.params["text"].startswith(("Drawing", "Editing"))
        ),
        since=since,
    )
    return str(call.params["text"])


def photo_size(call: Call) -> tuple[int, int]:
    (upload,) = call.files.values()
    return Image.open(BytesIO(upload.data)).size


async def test_commands_are_registered_in_the_menu(stack: Stack) -> None:
    names = [command["command"] for command in stack.telegram.commands]
    assert names == ["imagegen", "img2img", "models", "spend", "help"]


async def test_imagegen_replies_with_the_photo_and_clears_the_status(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    command = telegram.send_text(chat, chat.user, "/imagegen -m flux a fox in the snow")

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert photo_size(photo) == (1024, 1024)
    assert photo.params["caption"] == "flux · 1024x1024 · $0.042"
    assert photo.params["reply_parameters"]["message_id"] == command["message_id"]
    status = telegram.calls("sendMessage")[0]
    assert status.params["text"] == "Drawing with flux · 1024x1024 · $0.042…"
    await telegram.wait_for("deleteMessage")
    assert "upload_photo" in [action for _, action in telegram.chat_actions]
    assert [message.get("photo") is not None for message in telegram.messages_in(111)][-1]
    assert len(stack.gateway.settlements) == 1


async def test_reply_to_a_photo_with_img2img_edits_it(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    original = telegram.send_photo(chat, chat.user, png(300, 200, "blue"))
    telegram.send_text(chat, chat.user, "/img2img make it winter", reply_to=original["message_id"])

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert photo.params["caption"].startswith("gpt-image · 1024x1024")
    assert len(stack.gateway.settlements) == 1


async def test_album_of_three_with_the_command_as_caption_is_one_edit(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    images = [png(120, 90, colour) for colour in ("red", "green", "blue")]
    telegram.send_album(chat, chat.user, images, caption="/img2img -m nano-banana fuse these")

    await telegram.wait_for(sent_to(111, "sendPhoto"))

    (settlement,) = stack.gateway.settlements
    assert settlement.model == "google/nano-banana"


async def test_every_album_item_is_gathered(stack: Stack) -> None:
    """Four pictures for a model that takes three: the refusal proves all four were seen."""
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    images = [png(60, 60) for _ in range(4)]
    telegram.send_album(chat, chat.user, images, caption="/img2img -m nano-banana fuse these")

    answer = await reply_text(telegram, 111, 0)

    assert "4" in answer and "3" in answer, answer
    assert stack.gateway.settlements == []


async def test_image_document_is_an_input(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.send_document(
        chat, chat.user, png(200, 200), "in.png", "image/png", caption="/img2img add a hat"
    )
    await telegram.wait_for(sent_to(111, "sendPhoto"))
    assert len(stack.gateway.settlements) == 1


async def test_group_command_addressed_to_the_bot_answers_in_its_topic(stack: Stack) -> None:
    telegram = stack.telegram
    group = telegram.group_chat(-100123, "Artists", forum=True)
    alice = telegram.private_chat(111, "Alice", "alice").user
    assert alice is not None
    telegram.send_text(group, alice, "/imagegen@OtherBot not for us")
    telegram.send_text(group, alice, "just chatting")
    telegram.send_photo(group, alice, png())  # a bare photo in a group is never acted on
    telegram.send_text(group, alice, "/imagegen@ImageTestBot a fox", thread_id=7)

    photo = await telegram.wait_for(sent_to(-100123, "sendPhoto"))

    assert photo.params["message_thread_id"] == 7
    assert len(stack.gateway.settlements) == 1
    assert len(telegram.calls("sendPhoto")) == 1


async def test_rejections_are_answered_in_the_chat_and_nothing_is_paid(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    rejected = {
        "/imagegen -m nope a fox": "nope",
        "/imagegen -s 3x3 a fox": "3x3",
        "/imagegen": "say what to draw",
        "/img2img make it winter": "image",
    }
    for text, fragment in rejected.items():
        since = len(telegram.sent)
        telegram.send_text(chat, chat.user, text)
        answer = await reply_text(telegram, 111, since)
        assert fragment in answer.lower(), (text, answer)
    since = len(telegram.sent)
    telegram.send_document(
        chat, chat.user, png(), "a.png", "image/png", caption="/img2img x", size_override=25 << 20
    )
    assert "20 MB" in await reply_text(telegram, 111, since)
    assert stack.gateway.settlements == []
    assert telegram.calls("getFile") == []


async def test_flood_control_is_waited_out_and_the_photo_still_arrives(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.flood("sendPhoto", times=1, retry_after=1)
    telegram.send_text(chat, chat.user, "/imagegen a fox")

    delivered = await telegram.wait_for(lambda call: call.method == "sendPhoto" and call.ok)

    refused = telegram.calls("sendPhoto")[0]
    assert refused.error_code == 429
    assert delivered.at - refused.at >= 1.0
    assert len(stack.gateway.settlements) == 1


async def test_spend_for_users_and_admins(stack: Stack) -> None:
    telegram = stack.telegram
    alice = telegram.private_chat(111, "Alice", "alice")
    admin = telegram.private_chat(ADMIN_ID, "Boss", "boss")
    telegram.send_text(alice, alice.user, "/imagegen a fox")
    await telegram.wait_for(sent_to(111, "sendPhoto"))

    since = len(telegram.sent)
    telegram.send_text(alice, alice.user, "/spend all")
    assert "only the bot's admins" in (await reply_text(telegram, 111, since)).lower()
    since = len(telegram.sent)
    telegram.send_text(alice, alice.user, "/spend")
    assert "You have spent $0.0525 today" in await reply_text(telegram, 111, since)
    since = len(telegram.sent)
    telegram.send_text(admin, admin.user, "/spend all")
    assert "@alice (telegram:111): $0.0525" in await reply_text(telegram, ADMIN_ID, since)

    async with await Ledger.open(stack.database) as ledger:
        report = to_json(await ledger.report())
    settled = sum(settlement.amount_micro for settlement in stack.gateway.settlements)
    assert json.loads(json.dumps(report))["total_usd"] == f"0.{settled:06d}"
