"""The fake Telegram Bot API, driven by the real python-telegram-bot over loopback HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from fake_telegram import BY_URL_MAX_BYTES, SECRET_HEADER, FakeTelegram
from fake_telegram import User as FakeUser
from local import serving
from pictures import png
from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeAllGroupChats,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    Update,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, Conflict, InvalidToken, RetryAfter
from telegram.ext import Application, CommandHandler, ContextTypes


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    async with Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url) as bot:
        yield bot


async def test_get_me_describes_the_bot(fake: FakeTelegram, bot: Bot) -> None:
    me = await bot.get_me()

    assert (me.id, me.username, me.is_bot) == (fake.bot_id, "ImageTestBot", True)
    assert me.can_join_groups is True
    assert fake.calls("getMe")


async def test_errors_have_telegrams_wire_format(fake: FakeTelegram) -> None:
    fake.flood("getMe")
    async with httpx.AsyncClient() as client:
        wrong_token = await client.post(f"{fake.base_url}123:wrong/getMe")
        unknown = await client.post(f"{fake.base_url}{fake.token}/sendHologram")
        flooded = await client.post(f"{fake.base_url}{fake.token}/getMe")

    assert (wrong_token.status_code, wrong_token.json()) == (
        401,
        {"ok": False, "error_code": 401, "description": "Unauthorized"},
    )
    assert (unknown.status_code, unknown.json()) == (
        404,
        {"ok": False, "error_code": 404, "description": "Not Found"},
    )
    assert (flooded.status_code, flooded.json()) == (
        429,
        {
            "ok": False,
            "error_code": 429,
            "description": "Too Many Requests: retry after 1",
            "parameters": {"retry_after": 1},
        },
    )


async def test_ptb_reads_a_wrong_token_as_invalid(fake: FakeTelegram) -> None:
    with pytest.raises(InvalidToken):
        async with Bot("1:wrong", base_url=fake.base_url, base_file_url=fake.base_file_url):
            pass


async def test_a_command_reaches_the_bot_with_its_entity_and_offsets_confirm(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice", "alice")
    assert alice.user is not None
    fake.send_text(alice, alice.user, "/imagine a red fox")

    [update] = await bot.get_updates(timeout=5)

    assert update.message is not None
    assert update.message.text == "/imagine a red fox"
    assert update.message.from_user is not None and update.message.from_user.id == 1001
    assert update.message.chat.type == "private"
    [entity] = update.message.entities
    assert (entity.type, entity.offset, entity.length) == ("bot_command", 0, 8)
    assert await bot.get_updates(offset=update.update_id + 1, timeout=0) == ()
    assert fake.pending_updates == []


async def test_a_long_poll_waits_for_an_update_or_its_timeout(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    started = time.monotonic()
    assert await bot.get_updates(timeout=dt.timedelta(seconds=0.3)) == ()
    assert time.monotonic() - started >= 0.3

    poll = asyncio.create_task(bot.get_updates(timeout=10))
    await asyncio.sleep(0.1)
    assert not poll.done()
    fake.send_text(alice, alice.user, "hello")
    updates = await asyncio.wait_for(poll, 2)

    assert [update.message.text for update in updates if update.message] == ["hello"]


async def test_a_second_poller_ends_the_first_with_conflict(fake: FakeTelegram, bot: Bot) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=10))
    await asyncio.sleep(0.1)
    async with Bot(fake.token, base_url=fake.base_url) as second:
        await second.get_updates(timeout=0)

    with pytest.raises(Conflict, match="terminated by other getUpdates request"):
        await asyncio.wait_for(first, 2)


async def test_send_photo_records_the_upload_and_its_real_size(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice")
    image = png(640, 480)

    await bot.send_chat_action(alice.id, ChatAction.UPLOAD_PHOTO)
    message = await bot.send_photo(alice.id, image, caption="a red fox")

    assert (message.photo[-1].width, message.photo[-1].height) == (640, 480)
    assert [size.width for size in message.photo] == [90, 320, 640]
    assert message.caption == "a red fox"
    assert message.from_user is not None and message.from_user.id == fake.bot_id
    call = fake.calls("sendPhoto")[0]
    assert call.chat_id == alice.id
    assert call.files["photo"].data == image
    assert call.result["photo"][-1]["file_size"] == len(image)
    assert fake.chat_actions == [(alice.id, "upload_photo")]
    assert fake.messages_in(alice)[-1]["message_id"] == message.message_id


async def test_a_photo_by_url_is_fetched_through_its_route_up_to_5_mib(
    fake: FakeTelegram, bot: Bot
) -> None:
    files = {"fox.png": png(320, 200), "big.png": bytes(BY_URL_MAX_BYTES + 1)}

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=files[request.match_info["name"]])

    alice = fake.private_chat(1001, "Alice")
    async with serving(("GET", "/{name}", serve)) as url:
        fake.internet["https://cdn.example"] = url
        message = await bot.send_photo(alice.id, "https://cdn.example/fox.png")
        for refused in ("https://cdn.example/big.png", "https://elsewhere.example/fox.png"):
            with pytest.raises(BadRequest, match=r"(?i)failed to get http url content"):
                await bot.send_photo(alice.id, refused)

    assert (message.photo[-1].width, message.photo[-1].height) == (320, 200)
    assert fake.fetched == ["https://cdn.example/fox.png"]


async def test_send_media_group_sends_an_album(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")
    images = [png(100 + index, 100) for index in range(3)]

    messages = await bot.send_media_group(
        alice.id, [InputMediaPhoto(image) for image in images], caption="three foxes"
    )

    assert len(messages) == 3
    assert len({message.media_group_id for message in messages}) == 1
    assert [message.caption for message in messages] == ["three foxes", None, None]
    assert [message.photo[-1].width for message in messages] == [100, 101, 102]
    assert [message.message_id for message in messages] == [1, 2, 3]
    call = fake.calls("sendMediaGroup")[0]
    attached = [item["media"].removeprefix("attach://") for item in call.params["media"]]
    assert [call.files[name].data for name in attached] == images


@pytest.mark.parametrize("count", [1, 11])
async def test_an_album_needs_two_to_ten_items(fake: FakeTelegram, bot: Bot, count: int) -> None:
    alice = fake.private_chat(1001, "Alice")

    with pytest.raises(BadRequest):
        await bot.send_media_group(alice.id, [InputMediaPhoto(png()) for _ in range(count)])
    assert fake.messages_in(alice) == []


async def test_a_users_album_arrives_as_updates_sharing_a_group(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    fake.send_album(alice, alice.user, [png(), png()], caption="/edit make it blue")

    updates = await bot.get_updates(timeout=5)

    messages = [update.message for update in updates if update.message]
    assert len(messages) == 2
    assert messages[0].media_group_id is not None
    assert messages[0].media_group_id == messages[1].media_group_id
    assert [message.caption for message in messages] == ["/edit make it blue", None]
    assert messages[0].caption_entities[0].type == "bot_command"


async def test_the_bot_downloads_the_largest_size_of_a_users_photo(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    image = png(1600, 900)
    sent = fake.send_photo(alice, alice.user, image, caption="make it blue")
    largest = sent["photo"][-1]

    file = await bot.get_file(largest["file_id"])
    data = await file.download_as_bytearray()

    assert (largest["width"], largest["height"]) == (1600, 900)
    assert [size["width"] for size in sent["photo"]] == [90, 320, 800, 1600]
    assert file.file_size == len(image)
    assert bytes(data) == image


async def test_get_file_refuses_files_over_20_mb(fake: FakeTelegram, bot: Bot) -> None:
    file_id = fake.register_file(b"not really 25 MB", size_override=25 * 2**20)

    with pytest.raises(BadRequest, match="File is too big"):
        await bot.get_file(file_id)


async def test_flood_control_raises_retry_after(
    fake: FakeTelegram, bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")  # PTB's future, warning-free retry_after
    alice = fake.private_chat(1001, "Alice")
    fake.flood("sendMessage", retry_after=1)

    with pytest.raises(RetryAfter) as refused:
        await bot.send_message(alice.id, "hello")
    await bot.send_message(alice.id, "hello")

    assert refused.value.retry_after == dt.timedelta(seconds=1)
    assert [call.error_code for call in fake.calls("sendMessage")] == [429, None]


async def test_fail_injects_any_error(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")
    fake.fail("sendPhoto", 400, "Bad Request: IMAGE_PROCESS_FAILED", times=2)

    for _ in range(2):
        with pytest.raises(BadRequest, match="Image_process_failed"):
            await bot.send_photo(alice.id, png())
    assert (await bot.send_photo(alice.id, png())).photo


async def test_an_edit_that_changes_nothing_is_refused(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")
    message = await bot.send_message(alice.id, "Drawing…")

    with pytest.raises(BadRequest) as refused:
        await bot.edit_message_text("Drawing…", alice.id, message.message_id)
    edited = await bot.edit_message_text("Done", alice.id, message.message_id)

    assert "message is not modified" in refused.value.message.lower()
    assert edited is not True and edited.text == "Done"
    assert [sent["text"] for sent in fake.messages_in(alice)] == ["Done"]


@pytest.mark.parametrize(
    ("caption", "error"),
    [
        ("x" * 1025, "Message caption is too long"),
        ("<b>" + "x" * 1024 + "</b>", None),  # the limit counts what the reader sees
    ],
)
async def test_captions_over_1024_characters_are_refused(
    fake: FakeTelegram, bot: Bot, caption: str, error: str | None
) -> None:
    alice = fake.private_chat(1001, "Alice")

    if error is None:
        sent = await bot.send_photo(alice.id, png(), caption=caption, parse_mode="HTML")
        assert sent.caption == "x" * 1024
    else:
        with pytest.raises(BadRequest, match=error):
            await bot.send_photo(alice.id, png(), caption=caption)


async def test_texts_over_4096_characters_are_refused(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")

    with pytest.raises(BadRequest, match="Message is too long"):
        await bot.send_message(alice.id, "x" * 4097)
    assert (await bot.send_message(alice.id, "x" * 4096)).text == "x" * 4096


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (png(2100, 100), "Photo_invalid_dimensions"),  # PTB capitalizes Telegram's text
        (png(5001, 5000), "Photo_invalid_dimensions"),
        (b"\xff" * (10 * 2**20 + 1), "is too big for a photo"),
        (b"not a picture", "Image_process_failed"),
    ],
    ids=["ratio", "sides", "bytes", "garbage"],
)
async def test_photos_telegram_would_refuse_are_refused(
    fake: FakeTelegram, bot: Bot, image: bytes, error: str
) -> None:
    alice = fake.private_chat(1001, "Alice")

    with pytest.raises(BadRequest, match=error):
        await bot.send_photo(alice.id, image)


async def test_set_my_commands_is_stored_per_scope(fake: FakeTelegram, bot: Bot) -> None:
    await bot.set_my_commands([BotCommand("imagine", "Draw a picture"), BotCommand("help", "Help")])
    await bot.set_my_commands(
        [BotCommand("imagine", "Draw for the group")], scope=BotCommandScopeAllGroupChats()
    )

    assert fake.commands == [
        {"command": "imagine", "description": "Draw a picture"},
        {"command": "help", "description": "Help"},
    ]
    assert fake.commands_for({"type": "all_group_chats"})[0]["description"] == "Draw for the group"
    assert [command.command for command in await bot.get_my_commands()] == ["imagine", "help"]
    with pytest.raises(BadRequest, match="Bot_command_invalid"):
        await bot.set_my_commands([BotCommand("Imagine", "Capitals are refused")])


async def test_a_forum_topic_is_echoed_and_replies_nest(fake: FakeTelegram, bot: Bot) -> None:
    group = fake.group_chat(-1001234, "Artists", forum=True)
    bob = fake.private_chat(2002, "Bob").user
    assert bob is not None
    asked = fake.send_text(group, bob, "/imagine@ImageTestBot a cat", thread_id=7)

    [update] = await bot.get_updates(timeout=5)
    reply = await bot.send_message(
        group.id, "Here it is", message_thread_id=7, reply_to_message_id=asked["message_id"]
    )

    assert update.message is not None and update.message.message_thread_id == 7
    assert update.message.is_topic_message is True
    assert update.message.entities[0].length == len("/imagine@ImageTestBot")
    assert reply.message_thread_id == 7
    assert reply.reply_to_message is not None
    assert reply.reply_to_message.message_id == asked["message_id"]
    with pytest.raises(BadRequest, match="Message to be replied not found"):
        await bot.send_message(group.id, "Lost", reply_to_message_id=999)


async def test_an_application_answers_commands_over_long_polling(fake: FakeTelegram) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    seen: list[int] = []

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(update.update_id)
        assert update.message is not None
        await update.message.reply_text(f"Hello {update.message.text}")

    application = (
        Application.builder()
        .token(fake.token)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .build()
    )
    application.add_handler(CommandHandler("start", start))
    fake.send_text(alice, alice.user, "/start 1")  # waiting before the bot starts
    async with application:
        await application.start()
        await application.updater.start_polling()  # type: ignore[union-attr]
        await fake.wait_for(lambda call: call.params.get("text") == "Hello /start 1")
        fake.send_text(alice, alice.user, "/start@ImageTestBot 2")
        fake.send_text(alice, alice.user, "/start 3")
        await fake.wait_for(lambda call: call.params.get("text") == "Hello /start 3")
        await application.updater.stop()  # type: ignore[union-attr]
        await application.stop()

    assert [call.params["text"] for call in fake.calls("sendMessage")] == [
        "Hello /start 1",
        "Hello /start@ImageTestBot 2",
        "Hello /start 3",
    ]
    assert seen == [1, 2, 3]
    assert fake.pending_updates == []  # the last poll confirmed every update
    assert [call.method for call in fake.sent[:2]] == ["getMe", "deleteWebhook"]


class Receiver:
    """A webhook endpoint on loopback that answers each POST with the next of ``statuses``."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        # (secret header, message text or the data of a pressed button)
        self.received: list[tuple[str | None, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.add_routes([web.post("/hook", self._take)])
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self.url

    async def close(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _take(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        update = await request.json()
        message = update.get("message")
        what = update["callback_query"]["data"] if message is None else message["text"]
        self.received.append((request.headers.get(SECRET_HEADER), what))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.close()


async def test_a_webhook_gets_updates_with_the_secret_and_getupdates_conflicts(
    fake: FakeTelegram, bot: Bot, receiver: Receiver
) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    waiting = fake.send_text(alice, alice.user, "/start before the webhook")

    assert await bot.set_webhook(receiver.url, secret_token="s3cret-token", max_connections=5)
    fresh = fake.send_text(alice, alice.user, "/start after")
    await fake.wait_delivered([waiting, fresh])

    assert sorted(text for _, text in receiver.received) == [
        "/start after",
        "/start before the webhook",
    ]
    assert {header for header, _ in receiver.received} == {"s3cret-token"}
    assert [d.status for d in fake.deliveries_of(fresh)] == [200]
    assert fake.handed_at(fresh) is not None
    info = await bot.get_webhook_info()
    assert (info.url, info.pending_update_count, info.max_connections) == (receiver.url, 0, 5)
    with pytest.raises(Conflict, match="webhook is active"):
        await bot.get_updates(timeout=0)

    assert await bot.delete_webhook()
    fake.send_text(alice, alice.user, "/start polled")
    [update] = await bot.get_updates(timeout=5)
    assert update.message is not None and update.message.text == "/start polled"
    assert (await bot.get_webhook_info()).url == ""
    assert [call.method for call in fake.sent[-4:]] == [
        "setWebhook",
        "getWebhookInfo",
        "deleteWebhook",
        "getWebhookInfo",
    ]


async def test_a_refused_update_is_sent_again(fake: FakeTelegram, bot: Bot) -> None:
    receiver = Receiver(500, 403)
    await receiver.start()
    fake.retry_seconds = 0.05
    try:
        await bot.set_webhook(receiver.url, secret_token="token")
        [message] = fake.send_from_users(1, "/start")
        await fake.wait_delivered([message])
        info = await bot.get_webhook_info()
    finally:
        await receiver.close()

    assert [d.status for d in fake.deliveries_of(message)] == [500, 403, 200]
    assert len(receiver.received) == 3
    assert info.last_error_message == "Wrong response from the webhook: 403 Forbidden"


async def test_setwebhook_wants_https_and_a_plain_secret(fake: FakeTelegram, bot: Bot) -> None:
    with pytest.raises(BadRequest, match="an https url must be provided"):
        await bot.set_webhook("http://bot.example.org/hook")
    with pytest.raises(BadRequest, match="unallowed characters"):
        await bot.set_webhook("https://bot.example.org/hook", secret_token="no spaces")
    assert fake.webhook is None


async def test_post_to_webhook_forges_an_update_with_any_header(
    fake: FakeTelegram, bot: Bot, receiver: Receiver
) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    await bot.set_webhook(receiver.url, secret_token="right")

    forged = await fake.post_to_webhook(alice, alice.user, "/start", secret_token=None)
    wrong = await fake.post_to_webhook(alice, alice.user, "/start", secret_token="wrong")

    assert [header for header, _ in receiver.received] == [None, "wrong"]
    assert (forged.status, wrong.status) == (200, 200)  # this receiver checks nothing
    assert fake.pending_updates == []  # forged updates are never queued


AGAIN_VARY = InlineKeyboardMarkup(
    [
        [
            InlineKeyboardButton("🔁 Again", callback_data="again:7"),
            InlineKeyboardButton("🎨 Vary", callback_data="vary:7"),
        ]
    ]
)
CANCEL = InlineKeyboardMarkup([[InlineKeyboardButton("✖ Cancel", callback_data="cancel:7")]])


async def test_an_inline_keyboard_is_kept_on_the_message_and_returned(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice")

    status = await bot.send_message(alice.id, "Drawing…", reply_markup=CANCEL)
    photo = await bot.send_photo(alice.id, png(), caption="a fox", reply_markup=AGAIN_VARY)
    document = await bot.send_document(alice.id, png(), filename="fox.png", reply_markup=CANCEL)

    assert (status.reply_markup, photo.reply_markup, document.reply_markup) == (
        CANCEL,
        AGAIN_VARY,
        CANCEL,
    )
    assert [message["reply_markup"] for message in fake.messages_in(alice)] == [
        CANCEL.to_dict(),
        AGAIN_VARY.to_dict(),
        CANCEL.to_dict(),
    ]


async def test_buttons_keep_what_telegram_keeps(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")
    keyboard = {
        "inline_keyboard": [
            [{"text": "", "callback_data": "dropped"}],
            [
                {"text": "Both", "url": "https://example.org/fox", "callback_data": "lost"},
                {"text": "64 bytes", "callback_data": "é" * 32},
            ],
        ]
    }

    await bot.send_message(alice.id, "Pick one", reply_markup=keyboard)  # type: ignore[arg-type]

    assert fake.messages_in(alice)[0]["reply_markup"] == {
        "inline_keyboard": [
            [
                {"text": "Both", "url": "https://example.org/fox"},
                {"text": "64 bytes", "callback_data": "é" * 32},
            ]
        ]
    }


def _buttons(count: int) -> list[dict[str, str]]:
    return [{"text": str(index), "callback_data": str(index)} for index in range(count)]


@pytest.mark.parametrize(
    ("rows", "description"),
    [
        (
            [[{"text": "Again", "callback_data": "é" * 33}]],  # 33 characters, 66 bytes
            "Bad Request: BUTTON_DATA_INVALID",
        ),
        (
            [[{"text": "Again"}]],
            "Bad Request: can't parse inline keyboard button: "
            "Text buttons are unallowed in the inline keyboard",
        ),
        (
            [[{"text": "Again", "callback_data": ""}]],
            "Bad Request: can't parse inline keyboard button: "
            "Text buttons are unallowed in the inline keyboard",
        ),
        (
            [[{"callback_data": "again"}]],
            "Bad Request: can't parse inline keyboard button: Can't find field \"text\"",
        ),
        (
            [[{"text": "Docs", "url": "http://localhost/docs"}]],
            "Bad Request: inline keyboard button URL 'http://localhost/docs' is invalid: "
            "Wrong HTTP URL",
        ),
        (
            [[{"text": "Docs", "url": "ftp://example.org/docs"}]],
            "Bad Request: inline keyboard button URL 'ftp://example.org/docs' is invalid: "
            "Unsupported URL protocol",
        ),
        ([_buttons(9)], "Bad Request: more than 8 buttons in a row (fake's rule)"),
        (
            [_buttons(8)] * 12 + [_buttons(5)],
            "Bad Request: more than 100 buttons in a keyboard (fake's rule)",
        ),
    ],
    ids=["data-bytes", "no-action", "empty-data", "no-text", "localhost", "ftp", "row", "total"],
)
async def test_keyboards_telegram_would_refuse_are_refused(
    fake: FakeTelegram, bot: Bot, rows: list[list[dict[str, str]]], description: str
) -> None:
    alice = fake.private_chat(1001, "Alice")

    keyboard = {"inline_keyboard": rows}

    with pytest.raises(BadRequest):
        await bot.send_message(alice.id, "Pick", reply_markup=keyboard)  # type: ignore[arg-type]

    assert fake.calls("sendMessage")[0].description == description
    assert fake.messages_in(alice) == []


async def test_an_album_carries_no_keyboard(fake: FakeTelegram, bot: Bot) -> None:
    alice = fake.private_chat(1001, "Alice")

    messages = await bot.send_media_group(
        alice.id,
        [InputMediaPhoto(png()), InputMediaPhoto(png())],
        api_kwargs={"reply_markup": AGAIN_VARY.to_json()},  # PTB has no parameter for it
    )

    assert fake.calls("sendMediaGroup")[0].params["reply_markup"] == AGAIN_VARY.to_dict()
    assert [message.reply_markup for message in messages] == [None, None]
    assert ["reply_markup" in message for message in fake.messages_in(alice)] == [False, False]


async def test_edit_message_reply_markup_swaps_the_keyboard_but_not_for_the_same_one(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    status = await bot.send_message(alice.id, "In line: 2 ahead", reply_markup=CANCEL)
    asked = fake.send_text(alice, alice.user, "/imagine a fox")

    swapped = await bot.edit_message_reply_markup(
        alice.id, status.message_id, reply_markup=AGAIN_VARY
    )
    with pytest.raises(BadRequest, match="Message is not modified"):
        await bot.edit_message_reply_markup(alice.id, status.message_id, reply_markup=AGAIN_VARY)
    removed = await bot.edit_message_reply_markup(alice.id, status.message_id)
    with pytest.raises(BadRequest, match="Message is not modified"):
        await bot.edit_message_reply_markup(alice.id, status.message_id)
    with pytest.raises(BadRequest, match="Message can't be edited"):
        await bot.edit_message_reply_markup(alice.id, asked["message_id"], reply_markup=CANCEL)
    with pytest.raises(BadRequest, match="Message to edit not found"):
        await bot.edit_message_reply_markup(alice.id, 999, reply_markup=CANCEL)

    assert swapped is not True and swapped.reply_markup == AGAIN_VARY
    assert swapped.text == "In line: 2 ahead" and swapped.edit_date is not None
    assert removed is not True and removed.reply_markup is None
    assert "reply_markup" not in fake.messages_in(alice)[0]


async def test_an_edit_of_the_text_without_a_keyboard_removes_it(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice")
    status = await bot.send_message(alice.id, "Drawing…", reply_markup=CANCEL)

    kept = await bot.edit_message_text(
        "Drawing… 10 s", alice.id, status.message_id, reply_markup=CANCEL
    )
    dropped = await bot.edit_message_text("Drawing… 10 s", alice.id, status.message_id)

    assert kept is not True and kept.reply_markup == CANCEL
    assert dropped is not True and dropped.reply_markup is None  # the same text, but modified


async def test_a_press_reaches_a_polling_bot_and_is_answered_once(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice = fake.private_chat(1001, "Alice", "alice")
    assert alice.user is not None
    result = await bot.send_photo(alice.id, png(), caption="a fox", reply_markup=AGAIN_VARY)
    [shown] = fake.messages_in(alice)

    query = fake.press(shown, alice.user, "vary:7")
    [update] = await bot.get_updates(timeout=5)
    pressed = update.callback_query
    assert pressed is not None and fake.answered(query) is None
    assert await pressed.answer("Drawing a variation…")

    assert (pressed.id, pressed.data, pressed.chat_instance) == (
        query["id"],
        "vary:7",
        query["chat_instance"],
    )
    assert pressed.from_user.id == alice.user.id
    assert isinstance(pressed.message, Message)  # not an InaccessibleMessage
    assert pressed.message.message_id == result.message_id
    assert pressed.message.reply_markup == AGAIN_VARY
    answer = fake.answered(query)
    assert answer is not None
    assert (answer.text, answer.show_alert, answer.cache_time) == ("Drawing a variation…", False, 0)
    assert 0 <= answer.seconds < 1
    assert fake.handed_at(query) is not None
    with pytest.raises(BadRequest, match="Query is too old and response timeout expired"):
        await bot.answer_callback_query(query["id"])
    with pytest.raises(BadRequest, match="Query is too old and response timeout expired"):
        await bot.answer_callback_query("4000000000000000000")
    assert fake.answered(query) == answer
    assert fake.press(shown, alice.user, "again:7")["chat_instance"] == query["chat_instance"]


async def shown_to_alice(
    fake: FakeTelegram, bot: Bot, text: str, markup: InlineKeyboardMarkup
) -> tuple[FakeUser, dict[str, Any]]:
    """Alice, and the bot's message in her private chat, carrying ``markup``."""
    chat = fake.private_chat(1001, "Alice")
    assert chat.user is not None
    await bot.send_message(chat.id, text, reply_markup=markup)
    [shown] = fake.messages_in(chat)
    return chat.user, shown


async def test_an_answer_records_its_delay_and_is_held_to_200_characters(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice, shown = await shown_to_alice(fake, bot, "Done", AGAIN_VARY)
    query = fake.press(shown, alice, "again:7")

    await asyncio.sleep(0.2)
    with pytest.raises(BadRequest, match="Message_too_long"):
        await bot.answer_callback_query(query["id"], text="x" * 201)
    await bot.answer_callback_query(query["id"], text="x" * 200, show_alert=True, cache_time=5)

    answer = fake.answered(query)
    assert answer is not None
    assert (answer.text, answer.show_alert, answer.cache_time) == ("x" * 200, True, 5)
    assert answer.seconds >= 0.2


async def test_an_answer_after_the_window_is_too_old(fake: FakeTelegram, bot: Bot) -> None:
    alice, shown = await shown_to_alice(fake, bot, "In line", CANCEL)
    fake.answer_window = 0.1
    query = fake.press(shown, alice, "cancel:7")

    await asyncio.sleep(0.2)
    with pytest.raises(BadRequest, match="Query is too old"):
        await bot.answer_callback_query(query["id"])

    assert fake.answered(query) is None


async def test_data_not_on_the_keyboard_is_pressed_only_when_forged(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice, shown = await shown_to_alice(fake, bot, "In line", CANCEL)

    with pytest.raises(ValueError, match="forged=True"):
        fake.press(shown, alice, "cancel:8")
    fake.press(shown, alice, "cancel:8", forged=True)
    [update] = await bot.get_updates(timeout=5)

    assert update.callback_query is not None and update.callback_query.data == "cancel:8"


async def test_presses_are_left_out_while_allowed_updates_wants_messages_only(
    fake: FakeTelegram, bot: Bot
) -> None:
    alice, shown = await shown_to_alice(fake, bot, "In line", CANCEL)
    assert await bot.get_updates(timeout=0, allowed_updates=[Update.MESSAGE]) == ()

    fake.press(shown, alice, "cancel:7")
    fake.send_text(alice, alice, "/imagine a fox")
    [message] = await bot.get_updates(timeout=5, allowed_updates=Update.ALL_TYPES)
    fake.press(shown, alice, "cancel:7")
    [press] = await bot.get_updates(
        offset=message.update_id + 1, timeout=5, allowed_updates=Update.ALL_TYPES
    )

    assert message.message is not None  # the first press was never queued
    assert press.callback_query is not None and press.callback_query.data == "cancel:7"


async def test_a_press_reaches_the_webhook_when_allowed_updates_asks_for_it(
    fake: FakeTelegram, bot: Bot, receiver: Receiver
) -> None:
    alice = fake.private_chat(1001, "Alice")
    assert alice.user is not None
    status = await bot.send_message(alice.id, "Done", reply_markup=AGAIN_VARY)
    [shown] = fake.messages_in(alice)
    await bot.set_webhook(receiver.url, secret_token="s3cret", allowed_updates=[Update.MESSAGE])
    fake.press(shown, alice.user, "again:7")
    assert fake.pending_updates == []

    both = [Update.MESSAGE, Update.CALLBACK_QUERY]
    await bot.set_webhook(receiver.url, secret_token="s3cret", allowed_updates=both)
    query = fake.press(shown, alice.user, "again:7")
    await fake.wait_delivered([query])

    assert receiver.received == [("s3cret", "again:7")]
    [delivery] = fake.deliveries_of(query)
    assert (delivery.status, delivery.message_id) == (200, status.message_id)
    assert delivery.callback_query_id == query["id"]
    assert fake.deliveries_of(shown) == []  # a press is not the update of the message itself
    assert fake.handed_at(query) == delivery.at
    assert (await bot.get_webhook_info()).allowed_updates == ("callback_query", "message")
