"""The Telegram adapter end to end: real python-telegram-bot against the fake Bot API server,
the sandbox gateway and the real ledger, all on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from itertools import pairwise
from pathlib import Path

import aiosqlite
import pytest
from fake_telegram import Call, FakeTelegram
from imagebot_cli import cli_env, imagebot
from pictures import png
from PIL import Image

import adapters.status
from adapters.base import INDICATOR_AFTER_SECONDS
from adapters.telegram import MORE_LIKE_THESE, build_application, serve
from bot.config import load_settings
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

ADMIN_ID = 999


@dataclass
class Stack:
    telegram: FakeTelegram
    gateway: Sandbox
    database: Path


@asynccontextmanager
async def running(
    tmp_path: Path, gateway: Sandbox | None = None, api_host: str = "127.0.0.1", **settings: str
) -> AsyncIterator[Stack]:
    """``imagebot run``'s Telegram side: the Application polling the fake, paying the sandbox
    (``gateway`` if given: already started). The bot is told the fake is at ``api_host`` (the
    fake listens on 127.0.0.1 only: another address reaches it only through a proxy)."""
    telegram = FakeTelegram()
    await telegram.start()
    if gateway is None:
        gateway = Sandbox(job_seconds=0.2)
        await gateway.start()
    database = tmp_path / "ledger.sqlite3"
    loaded = load_settings(
        _env_file=None,
        telegram_bot_token=telegram.token,
        telegram_api_url=telegram.url.replace("127.0.0.1", api_host),
        image_api_url=gateway.url,
        database_path=database,
        admin_ids=f"telegram:{ADMIN_ID}",
        **settings,
    )
    stop = asyncio.Event()
    async with open_bot(loaded, Wallet.create(), poll_interval=0.05) as bot:
        polling = asyncio.create_task(serve(build_application(loaded, bot), stop))
        await telegram.wait_for("setMyCommands")
        try:
            yield Stack(telegram, gateway, database)
        finally:
            stop.set()
            await polling
    await gateway.close()
    await telegram.close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running(tmp_path) as started:
        yield started


def sent_to(chat_id: int, method: str) -> object:
    return lambda call: call.method == method and call.chat_id == chat_id


async def reply_text(telegram: FakeTelegram, chat_id: int, since: int = 0) -> str:
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
    assert names == [
        "imagegen", "img2img", "cancel", "models", "spend", "link", "unlink", "help"
    ]  # fmt: skip


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
    assert telegram.chat_actions == []  # answered within a second: the status was enough
    assert [message.get("photo") is not None for message in telegram.messages_in(111)][-1]
    assert len(stack.gateway.settlements) == 1


async def test_a_command_deleted_before_its_photo_still_gets_the_photo(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    command = telegram.send_text(chat, chat.user, "/imagegen -m flux a fox")
    await telegram.wait_for(sent_to(111, "sendMessage"))  # the status: the job is under way
    telegram.delete_message(command)

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert photo.ok
    assert telegram.messages_in(111)[-1].get("photo")  # in the chat, replying to nothing
    assert len(stack.gateway.settlements) == 1


async def test_a_status_telegram_will_not_delete_does_not_keep_the_answer_back(
    stack: Stack,
) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.fail("deleteMessage", 500, "Internal Server Error", times=10)
    telegram.send_text(chat, chat.user, "/imagegen -m flux a fox #servererror")

    answer = await reply_text(telegram, 111)

    assert "It reported no charge" in answer
    assert stack.gateway.settlements == []


async def test_a_job_over_a_second_shows_sending_photo_until_the_photo(stack: Stack) -> None:
    telegram = stack.telegram
    stack.gateway.latency = 1.5
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.send_text(chat, chat.user, "/imagegen -m flux a fox in the snow")

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    (status,) = telegram.calls("sendMessage")
    (action,) = telegram.calls("sendChatAction")
    assert action.params["action"] == "upload_photo" and action.chat_id == 111
    assert status.at + INDICATOR_AFTER_SECONDS <= action.at < photo.at


async def edited_photo(telegram: FakeTelegram) -> Call:
    """Alice (user 111) sends a photo and replies to it with /img2img; the photo that answers."""
    chat = telegram.private_chat(111, "Alice", "alice")
    original = telegram.send_photo(chat, chat.user, png(300, 200, "blue"))
    telegram.send_text(chat, chat.user, "/img2img make it winter", reply_to=original["message_id"])
    return await telegram.wait_for(sent_to(111, "sendPhoto"))


async def test_reply_to_a_photo_with_img2img_edits_it(stack: Stack) -> None:
    photo = await edited_photo(stack.telegram)

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
        "/imagegen --n 9 a fox": "--n",
        "/imagegen -m flux --quality hd a fox": "quality",
        "/imagegen -m dall-e-3 -n 2 a fox": "drop --n",
        "/imagegen -m gpt-image --mask a fox": "--mask",
    }
    for text, fragment in rejected.items():
        since = len(telegram.sent)
        telegram.send_text(chat, chat.user, text)
        answer = await reply_text(telegram, 111, since)
        assert fragment in answer.lower(), (text, answer)
    photo = telegram.send_photo(chat, chat.user, png())["message_id"]
    replies = {
        "/img2img -m nano-banana --mask fix it": "can't use a mask",  # a Google model
        "/img2img -m gpt-image --mask fix it": "exactly two images",  # no mask image
        "/img2img -m flux fix it": "can't edit",
    }
    for text, fragment in replies.items():
        since = len(telegram.sent)
        telegram.send_text(chat, chat.user, text, reply_to=photo)
        answer = await reply_text(telegram, 111, since)
        assert fragment in answer.lower(), (text, answer)
    since = len(telegram.sent)
    gif = b"GIF89a" + bytes(64)
    telegram.send_document(chat, chat.user, gif, "a.png", "image/png", caption="/img2img x")
    assert "not a png, jpeg or webp" in (await reply_text(telegram, 111, since)).lower()
    since, fetched = len(telegram.sent), len(telegram.calls("getFile"))
    telegram.send_document(
        chat, chat.user, png(), "a.png", "image/png", caption="/img2img x", size_override=25 << 20
    )
    assert "20 MB" in await reply_text(telegram, 111, since)
    assert len(telegram.calls("getFile")) == fetched  # refused before downloading
    assert stack.gateway.settlements == []


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


async def test_spend_for_users_and_admins(stack: Stack, tmp_path: Path) -> None:
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

    code, out = await imagebot(
        "spend", "--json", env=cli_env(stack.gateway.url, stack.database), cwd=tmp_path
    )
    report = json.loads(out)
    settled = sum(settlement.amount_micro for settlement in stack.gateway.settlements)
    assert code == 0
    assert report["total_usd"] == f"0.{settled:06d}" == "0.052500"
    assert [(user["user"], user["images"]) for user in report["users"]] == [("telegram:111", 1)]
    assert "pending_usd" not in report


async def test_a_picture_over_the_photo_limits_is_sent_as_a_document(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.send_text(chat, chat.user, "/imagegen a long banner #wide")

    document = await telegram.wait_for(sent_to(111, "sendDocument"))

    assert document.ok
    (upload,) = document.files.values()
    assert upload.filename == "image-1.png"
    assert Image.open(BytesIO(upload.data)).size == (4200, 200)  # ratio 21: no sendPhoto
    assert document.params["caption"] == "nano-banana · 1024x1024 · $0.0525"
    assert telegram.calls("sendPhoto") == []
    assert len(stack.gateway.settlements) == 1


async def test_a_caption_is_cut_to_telegrams_1024_characters(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    prompt = "a fox in the snow, " * 80  # DALL-E 3 answers with it rewritten: a long caption
    telegram.send_text(chat, chat.user, f"/imagegen -m dall-e-3 {prompt}")

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert photo.ok
    assert len(photo.params["caption"]) == 1024
    assert photo.params["caption"].startswith("dall-e-3 · 1024x1024 · $0.042\nA sandbox")


async def test_a_slow_job_edits_its_status_at_most_every_few_seconds(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.status, "STATUS_EDIT_SECONDS", 0.5)
    stack.gateway.job_seconds = 2.0  # polled every 0.05 s: about 40 progress reports
    telegram = stack.telegram
    telegram.fail("editMessageText", 400, "Bad Request: message is not modified: same content")
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.send_text(chat, chat.user, "/imagegen a fox #slow")

    await telegram.wait_for(sent_to(111, "sendPhoto"), timeout=10)

    status = telegram.calls("sendMessage")[0]
    edits = telegram.calls("editMessageText")
    assert edits[0].error_code == 400  # "not modified" is ignored: the job went on
    assert all(edit.ok for edit in edits[1:])
    assert 2 <= len(edits) <= 5, [edit.params["text"] for edit in edits]
    times = [status.at] + [edit.at for edit in edits]
    assert min(later - earlier for earlier, later in pairwise(times)) >= 0.45
    assert edits[-1].params["text"].startswith("Drawing with nano-banana · 1024x1024 · $0.0525… ")
    assert edits[-1].params["text"].endswith(" s")
    assert [call.method for call in telegram.sent if call.method == "sendMessage"] == [
        "sendMessage"
    ]
    await telegram.wait_for("deleteMessage")


# A trigger counting the album parts the ledger is given: none for a chat the bot does not serve.
KEPT_PARTS = """CREATE TABLE kept_parts (album TEXT);
    CREATE TRIGGER keep_count AFTER INSERT ON album_parts
    BEGIN INSERT INTO kept_parts VALUES (new.album); END;"""


async def test_outsiders_get_one_refusal_in_private_and_silence_in_groups(tmp_path: Path) -> None:
    members = {"allowed_users": "telegram:111", "allowed_chats": "telegram:-100500"}
    async with running(tmp_path, **members) as stack:
        telegram = stack.telegram
        alice = telegram.private_chat(111, "Alice", "alice")
        bob = telegram.private_chat(222, "Bob", "bob")
        club, elsewhere = (
            telegram.group_chat(-100500, "Club"),
            telegram.group_chat(-100600, "Other"),
        )
        async with aiosqlite.connect(stack.database) as db:  # counts what the ledger is given
            await db.executescript(KEPT_PARTS)
        telegram.send_text(elsewhere, alice.user, "/imagegen a fox")  # a chat not on the list
        telegram.send_text(elsewhere, alice.user, "/spend")
        telegram.send_album(elsewhere, alice.user, [png(), png()], caption="/img2img blue")
        from_bob = [  # not on the list: no answer, not even to a mistake
            telegram.send_text(club, bob.user, command)
            for command in ("/imagegen a fox", "/imagegen -m nope a fox", "/imagegen --bad a fox")
        ]
        telegram.send_text(bob, bob.user, "/imagegen -m nope a fox")
        telegram.send_text(club, alice.user, "/imagegen a fox")

        refusal = await reply_text(telegram, 222, 0)
        await telegram.wait_for(sent_to(-100500, "sendPhoto"))

        assert refusal == "Sorry, this bot makes pictures only for its members."
        assert [call.chat_id for call in telegram.sent if call.chat_id == 222] == [222]
        assert [call for call in telegram.sent if call.chat_id == -100600] == []
        in_club = [call for call in telegram.sent if call.chat_id == -100500]
        answered = [call.params.get("reply_parameters", {}).get("message_id") for call in in_club]
        assert not {message["message_id"] for message in from_bob} & set(answered)
        assert len(stack.gateway.settlements) == 1
        async with aiosqlite.connect(stack.database) as db:
            assert await db.execute_fetchall("SELECT count(*) FROM kept_parts") == [(0,)]


async def test_budgets_and_the_per_user_job_limit_are_answered_in_the_chat(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, user_daily_limit_usd="0.11") as stack:  # two nano-banana images
        telegram = stack.telegram
        stack.gateway.job_seconds = 1.0
        chat = telegram.private_chat(111, "Alice", "alice")
        for _ in range(3):
            telegram.send_text(chat, chat.user, "/imagegen a fox #slow")

        assert await reply_text(telegram, 111, 0) == "Wait for your previous image to finish first."
        await telegram.wait_for(lambda _: len(telegram.calls("sendPhoto")) == 2, timeout=10)
        since = len(telegram.sent)
        telegram.send_text(chat, chat.user, "/imagegen a fox")
        answer = await reply_text(telegram, 111, since)

        assert answer.startswith("Daily limit reached"), answer
        assert len(stack.gateway.settlements) == 2


async def test_a_failed_download_is_answered_and_nothing_is_paid(stack: Stack) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    telegram.fail("getFile", 500, "Internal Server Error")
    telegram.send_photo(chat, chat.user, png(), caption="/img2img make it winter")

    answer = await reply_text(telegram, 111, 0)

    assert answer == "I couldn't download that image from Telegram; nothing was charged. Try again."
    assert stack.gateway.settlements == []


# A public address as the picture links give it: only the fake Telegram (its ``internet``) and,
# where a test sets HTTP_PROXY, the sandbox acting as the bot's proxy answer for it; nothing
# ever connects to it.
CDN = "http://1.2.3.4"


def uploaded(call: Call) -> bool:
    return call.ok and bool(call.files)


def imagegen_at_public_links(stack: Stack, command: str) -> None:
    """Alice sends ``command``; the sandbox's picture links are on ``CDN``, which Telegram
    reaches (the fake routes it to the sandbox)."""
    stack.gateway.picture_origin = CDN
    stack.telegram.internet[CDN] = stack.gateway.url
    chat = stack.telegram.private_chat(111, "Alice", "alice")
    stack.telegram.send_text(chat, chat.user, command)


async def test_a_picture_at_a_public_link_goes_to_telegram_by_its_link(stack: Stack) -> None:
    telegram, gateway = stack.telegram, stack.gateway
    imagegen_at_public_links(stack, "/imagegen -m flux a fox in the snow")

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert photo.ok and photo.files == {}
    assert photo.params["photo"].startswith(f"{CDN}/images/")
    assert telegram.fetched == [photo.params["photo"]]
    assert gateway.images_served == 1  # Telegram's fetch: the bot downloaded nothing
    assert photo.params["caption"] == "flux · 1024x1024 · $0.042"
    assert len(photo.params["reply_markup"]["inline_keyboard"][0]) == 2  # Again and Vary
    assert len(gateway.settlements) == 1


async def test_pictures_at_public_links_go_as_an_album_of_links(stack: Stack) -> None:
    telegram, gateway = stack.telegram, stack.gateway
    imagegen_at_public_links(stack, "/imagegen -m flux -n 2 a fox in the snow")

    album = await telegram.wait_for(sent_to(111, "sendMediaGroup"))
    more = await telegram.wait_for(
        lambda call: call.method == "sendMessage" and call.params["text"] == MORE_LIKE_THESE
    )

    assert album.ok and album.files == {}
    links = [item["media"] for item in album.params["media"]]
    assert all(link.startswith(f"{CDN}/images/") for link in links) and len(set(links)) == 2
    assert telegram.fetched == links and gateway.images_served == 2
    assert more.params["reply_markup"]["inline_keyboard"]
    assert len(gateway.settlements) == 1


async def test_a_link_telegram_cannot_take_is_downloaded_and_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Telegram can't reach the first link and refuses the second's shape (4200x200 is no
    photo): the bot downloads each, checked as always (here through a proxy, the sandbox, as
    the link's host is public), and uploads a photo and a document."""
    gateway = Sandbox(job_seconds=0.2, picture_origin=CDN)
    monkeypatch.setenv("HTTP_PROXY", await gateway.start())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with running(tmp_path, gateway) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        telegram.send_text(chat, chat.user, "/imagegen -m flux a fox in the snow")

        photo = await telegram.wait_for(lambda call: call.method == "sendPhoto" and call.files)
        telegram.internet[CDN] = gateway.url
        telegram.send_text(chat, chat.user, "/imagegen -m nano-banana a long banner #wide")
        document = await telegram.wait_for(sent_to(111, "sendDocument"))

        by_link = [call for call in telegram.calls("sendPhoto") if not call.files]
        assert [call.description for call in by_link] == [
            "Bad Request: failed to get HTTP URL content",
            "Bad Request: PHOTO_INVALID_DIMENSIONS",
        ]
        assert uploaded(photo) and photo_size(photo) == (1024, 1024)
        assert photo.params["caption"] == "flux · 1024x1024 · $0.042"
        assert uploaded(document) and document.params["caption"].startswith("nano-banana")
        assert gateway.images_served == 3  # the bot's two downloads, Telegram's one fetch
        assert len(gateway.settlements) == 2
