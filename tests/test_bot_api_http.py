"""PTB's Bot API calls over aiohttp: capped answers, deadlines, and no token in any error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from local import serving
from telegram import Bot
from telegram.error import NetworkError, TimedOut

from adapters.bot_api_http import MAX_ANSWER_BYTES, ONE_BUFFER_BYTES, BotApiRequest

TOKEN = "123456:SECRET-token-never-shown"
FORM = web.RequestKey("form", dict)


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
