"""The bot's CPU to send one photo over the Bot API: a form from one buffer against part by part.

Run: ``.venv/bin/python bench/bot_api_upload.py [--sizes 26000,200000,1500000] [--rounds 12]``.
``BotApiRequest`` sends ``sendPhoto`` (chat, caption, reply, two buttons, the photo) to a Bot API
stand-in in another process that reads every part, 20 at a time; rounds alternate between the
form encoded into one buffer and aiohttp writing each part, so a machine that slows down slows
both. Prints this process's CPU per photo, median and range, and which way the bot takes (one
buffer up to ``ONE_BUFFER_BYTES``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from alternating import alternate, print_figures, server_process
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, InputFile, ReplyParameters
from telegram.request import RequestData
from telegram.request._requestparameter import RequestParameter

from adapters import bot_api_http
from adapters.bot_api_http import BotApiRequest

AT_ONCE = 20
BATCHES = 10  # per round
_SENT = {"ok": True, "result": {"message_id": 1, "date": 0, "chat": {"id": 7, "type": "private"}}}


def bot_api() -> web.Application:
    """A Bot API stand-in that reads every part of a form and answers with a message."""

    async def call(request: web.Request) -> web.Response:
        async for part in await request.multipart():
            await part.read()
        return web.json_response(_SENT)

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/bot{token}/{method}", call)
    return app


def photo_form(photo: bytes) -> RequestData:
    """The parameters of a delivered picture, as PTB passes them to ``BotApiRequest``."""
    buttons = [InlineKeyboardButton("Again", callback_data="a" * 40)]
    buttons.append(InlineKeyboardButton("Vary", callback_data="v" * 40))
    parameters = {
        "chat_id": 7,
        "caption": "a fox · gpt-image-1 · 1024x1024 · $0.021",
        "reply_parameters": ReplyParameters(message_id=5),
        "reply_markup": InlineKeyboardMarkup([buttons]),
        "photo": InputFile(photo, filename="picture.png"),
    }
    return RequestData([RequestParameter.from_input(k, v) for k, v in parameters.items()])


async def cpu_per_photo(request: BotApiRequest, url: str, photo: bytes) -> float:
    """Milliseconds of this process's CPU per photo over one round."""
    started = time.process_time()
    for _ in range(BATCHES):
        calls = (request.post(url, photo_form(photo)) for _ in range(AT_ONCE))
        await asyncio.gather(*calls)
    return (time.process_time() - started) / (BATCHES * AT_ONCE) * 1e3


async def compare(url: str, size: int, rounds: int) -> dict[str, list[float]]:
    photo = os.urandom(size)
    request = BotApiRequest(AT_ONCE)
    shipped = bot_api_http.ONE_BUFFER_BYTES

    def way(one_buffer_bytes: int) -> Callable[[], Awaitable[float]]:
        def run() -> Awaitable[float]:
            bot_api_http.ONE_BUFFER_BYTES = one_buffer_bytes
            return cpu_per_photo(request, url, photo)

        return run

    try:
        await cpu_per_photo(request, url, photo)  # warm the pool
        return await alternate({"one buffer": way(2**62), "part by part": way(-1)}, rounds)
    finally:
        bot_api_http.ONE_BUFFER_BYTES = shipped
        await request.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="26000,200000,1500000", help="photo sizes, bytes")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    with server_process(bot_api) as root:
        print(f"load average before: {os.getloadavg()}")
        for size in (int(size) for size in args.sizes.split(",")):
            url = f"{root}/bot1:T/sendPhoto"
            figures = asyncio.run(compare(url, size, args.rounds))
            shipped = "one buffer" if size <= bot_api_http.ONE_BUFFER_BYTES else "part by part"
            print(f"  {size} B: the bot sends it {shipped}")
            print_figures(figures, "photo", indent="    ")


if __name__ == "__main__":
    main()
