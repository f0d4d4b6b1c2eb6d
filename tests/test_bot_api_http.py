"""PTB's Bot API calls over aiohttp: capped answers, deadlines, and no token in any error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from local import serving
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.error import NetworkError, TimedOut

from adapters.bot_api_http import MAX_ANSWER_BYTES, ONE_BUFFER_BYTES, BotApiRequest

TOKEN = "123456:SECRET-token-never-shown"
FORM = web.RequestKey("form", dict)
BODY = web.RequestKey("body", dict)
CHAT = {"id": 7, "type": "private", "first_name": "Ann"}
ANN = {"id": 7, "is_bot": False, "first_name": "Ann"}
COMMAND = {"message_id": 4, "date": 0, "chat": CHAT, "from": ANN, "text": "/imagegen a fox"}
# A sent message as Telegram answers it: the whole message, the one it replies to included.
SENT = {
    "message_id": 5,
    "date": 0,
    "chat": CHAT,
    "from": {"id": 1, "is_bot": True, "first_name": "B"},
    "text": "Drawing…",
    "reply_markup": {"inline_keyboard": [[{"text": "✖ Cancel", "callback_data": "c"}]]},
    "reply_to_message": COMMAND,
}


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A Bot API stand-in: getMe answers, getChat answers too much, close never answers,
    sendPhoto keeps the form it was sent (on the request, at ``FORM``)."""
    seen: list[web.Request] = []

    async def call(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        method = request.match_info["method"]
        if method == "sendPhoto":
            request[FORM] = {
                part.name: await part.read() async for part in await request.multipart()
            }
            chat = {"id": 7, "type": "private"}
            return web.json_response(
                {"ok": True, "result": {"message_id": 1, "date": 0, "chat": chat}}
            )
        if method == "sendMessage":
            request[BODY] = await request.json()
            return web.json_response({"ok": True, "result": SENT})
        if method == "getUpdates":
            update = {"update_id": 1, "message": {**SENT, "from": ANN, "message_id": 6}}
            return web.json_response({"ok": True, "result": [update]})
        if method == "getChat":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(MAX_ANSWER_BYTES // 2**20 + 2):
                await response.write(b" " * 2**20)
            return response
        if method == "close":
            await asyncio.sleep(30)
        return web.json_response(
            {"ok": True, "result": {"id": 1, "is_bot": True, "first_name": "B", "username": "b"}}
        )

    async with serving(("POST", "/bot{token}/{method}", call)) as url:
        yield f"{url}/bot", seen


async def test_calls_go_through_with_their_parameters(api: tuple[str, list]) -> None:
    url, seen = api
    async with Bot(TOKEN, base_url=url, request=BotApiRequest(2)) as bot:
        me = await bot.get_me()
    assert me.username == "b"
    assert seen[-1].headers["User-Agent"].startswith("python-telegram-bot")


async def test_a_call_without_files_goes_as_json(api: tuple[str, list]) -> None:
    url, seen = api
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("✖ Cancel", callback_data="c")]])
    async with Bot(TOKEN, base_url=url, request=BotApiRequest(2)) as bot:
        await bot.send_message(7, "Drawing…", reply_to_message_id=4, reply_markup=keyboard)
    assert seen[-1].content_type == "application/json"
    assert seen[-1][BODY] == {
        "chat_id": 7,
        "text": "Drawing…",
        "reply_parameters": {"message_id": 4},
        "reply_markup": {"inline_keyboard": [[{"text": "✖ Cancel", "callback_data": "c"}]]},
    }


async def test_a_sent_message_is_read_for_its_ids_updates_whole(api: tuple[str, list]) -> None:
    """What the bot sends comes back as enough to edit or delete it; what it is sent is whole."""
    url, _ = api
    async with Bot(TOKEN, base_url=url, request=BotApiRequest(2)) as bot:
        sent = await bot.send_message(7, "Drawing…")
        [update] = await bot.get_updates()
    assert (sent.message_id, sent.chat_id, sent.chat.type) == (5, 7, "private")
    assert sent.text is None and sent.reply_to_message is None and sent.reply_markup is None
    received = update.message
    assert received is not None and received.text == "Drawing…"
    assert received.reply_to_message is not None
    assert received.reply_to_message.text == "/imagegen a fox"


@pytest.mark.parametrize("size", [1000, ONE_BUFFER_BYTES + 1])
async def test_a_photo_arrives_whole_with_its_fields(api: tuple[str, list], size: int) -> None:
    """Small forms go from one buffer, bigger ones part by part: the same form either way."""
    url, seen = api
    photo = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with Bot(TOKEN, base_url=url, request=BotApiRequest(2)) as bot:
        await bot.send_photo(7, photo, caption="a fox \N{FOX FACE}")
    form = seen[-1][FORM]
    assert form["photo"] == photo and len(photo) == size
    assert form["chat_id"] == b"7" and form["caption"].decode() == "a fox \N{FOX FACE}"


async def test_an_answer_over_the_cap_is_a_network_error_without_the_token(
    api: tuple[str, list],
) -> None:
    url, _ = api
    async with Bot(TOKEN, base_url=url, request=BotApiRequest(2)) as bot:
        with pytest.raises(NetworkError) as raised:
            await bot.get_chat(1)
    assert "cap" in str(raised.value) and "SECRET" not in str(raised.value)


async def test_a_call_that_never_answers_times_out_by_its_read_timeout(
    api: tuple[str, list],
) -> None:
    url, _ = api
    async with Bot(TOKEN, base_url=url, request=BotApiRequest(2)) as bot:
        started = time.monotonic()
        with pytest.raises(TimedOut):
            await bot.close(read_timeout=0.5)
    assert time.monotonic() - started < 5


async def test_an_unreachable_server_is_a_network_error_without_the_token(
    unused_tcp_port: int,
) -> None:
    request = BotApiRequest(1)
    await request.initialize()
    try:
        with pytest.raises(NetworkError) as raised:
            await request.post(f"http://127.0.0.1:{unused_tcp_port}/bot{TOKEN}/getMe")
    finally:
        await request.shutdown()
    assert "SECRET" not in str(raised.value)
