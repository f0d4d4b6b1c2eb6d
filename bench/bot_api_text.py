"""The bot's CPU per Bot API call without files (a status message): as the bot sends it now,
against the form PTB's own client sends and the whole answer PTB would build into objects.

Run: ``.venv/bin/python bench/bot_api_text.py [--rounds 16]``. ``BotApiRequest`` sends
``sendMessage`` (chat, text, reply, a Cancel button), 20 at a time, to a Bot API stand-in in
another process that answers as Telegram does: the whole message, the command it replies to
included. Rounds alternate between the ways, so a machine that slows down slows all of them.
Prints this process's CPU per call, median and range.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from alternating import alternate, run_bench
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.request import BaseRequest, RequestData

from adapters import bot_api_http
from adapters.bot_api_http import BotApiRequest

AT_ONCE = 20
BATCHES = 10  # per round
_ANN = {"id": 7, "is_bot": False, "first_name": "Ann", "username": "ann", "language_code": "en"}
_CHAT = {"id": 7, "type": "private", "first_name": "Ann", "username": "ann"}
_COMMAND = {
    "message_id": 4,
    "from": _ANN,
    "chat": _CHAT,
    "date": 1_700_000_000,
    "text": "/imagegen -m gpt-image a fox in the snow",
    "entities": [{"type": "bot_command", "offset": 0, "length": 9}],
}
_SENT = {
    "ok": True,
    "result": {
        "message_id": 5,
        "from": {"id": 1, "is_bot": True, "first_name": "Imagebot", "username": "imagebot"},
        "chat": _CHAT,
        "date": 1_700_000_001,
        "text": "Drawing with gpt-image at $0.04…",
        "reply_markup": {"inline_keyboard": [[{"text": "✖ Cancel", "callback_data": "c:1"}]]},
        "reply_to_message": _COMMAND,
    },
}


def bot_api() -> web.Application:
    """A Bot API stand-in that reads the parameters (JSON or a form) and answers as Telegram."""
    answer = json.dumps(_SENT).encode()

    async def call(request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            await request.json()
        else:
            await request.post()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/bot{token}/{method}", call)
    return app


async def form_body(request_data: RequestData | None) -> tuple[dict[str, str] | None, dict]:
    """The parameters as PTB's own client sends them: a form of JSON-encoded strings."""
    return (None if request_data is None else request_data.json_parameters), {}


async def cpu_per_call(bot: Bot) -> float:
    """Milliseconds of this process's CPU per call over one round."""
    cancel = InlineKeyboardMarkup([[InlineKeyboardButton("✖ Cancel", callback_data="c:1")]])
    started = time.process_time()
    for _ in range(BATCHES):
        text = "Drawing with gpt-image at $0.04…"
        calls = (
            bot.send_message(7, text, reply_to_message_id=4, reply_markup=cancel)
            for _ in range(AT_ONCE)
        )
        await asyncio.gather(*calls)
    return (time.process_time() - started) / (BATCHES * AT_ONCE) * 1e3


async def compare(root: str, rounds: int) -> dict[str, list[float]]:
    request = BotApiRequest(AT_ONCE)
    bot = Bot("1:T", base_url=f"{root}/bot", request=request)
    shipped_body, shipped_parse = bot_api_http._body, BotApiRequest.parse_json_payload

    def way(body: Callable[..., Awaitable[Any]], parse: Any) -> Callable[[], Awaitable[float]]:
        def run() -> Awaitable[float]:
            bot_api_http._body = body
            BotApiRequest.parse_json_payload = staticmethod(parse)  # type: ignore[method-assign]
            return cpu_per_call(bot)

        return run

    ways = {
        "as now": way(shipped_body, shipped_parse),
        "JSON, whole": way(shipped_body, BaseRequest.parse_json_payload),
        "form, whole": way(form_body, BaseRequest.parse_json_payload),
    }
    try:
        await cpu_per_call(bot)  # warm the pool
        return await alternate(ways, rounds)
    finally:
        bot_api_http._body = shipped_body
        BotApiRequest.parse_json_payload = staticmethod(shipped_parse)  # type: ignore[method-assign]
        await request.shutdown()


if __name__ == "__main__":
    run_bench(__doc__, bot_api, compare, "sendMessage", rounds=16)
