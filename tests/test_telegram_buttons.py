"""Buttons on Telegram end to end: Again, Vary and Cancel as inline keyboards and callback queries,
through the real python-telegram-bot, the fake Bot API, the sandbox gateway and the real ledger."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
from fake_telegram import Chat, FakeTelegram, User
from gateway_orders import Order, paid, record_orders
from imagebot_cli import cli_env, imagebot
from local import until
from pictures import png

from adapters.telegram import build_application, serve
from bot.config import load_settings
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

EDIT_PATH = "/v1/images/image2image"
EXPIRED = (
    "That button has expired (the bot keeps results for 30 days); send the command again. "
    "Nothing was charged."
)
ONLY_REQUESTER = "Only the person who asked for that picture can cancel it."


@dataclass
class Stack:
    telegram: FakeTelegram
    gateway: Sandbox
    orders: list[Order]
    database: Path

    def settled_micro(self) -> int:
        return sum(settlement.amount_micro for settlement in self.gateway.settlements)


@asynccontextmanager
async def platform(tmp_path: Path) -> AsyncIterator[Stack]:
    """The fake Bot API and the sandbox, which outlive the bot runs of a test."""
    telegram, gateway = FakeTelegram(), Sandbox(job_seconds=0.3)
    orders = record_orders(gateway)
    await telegram.start()
    await gateway.start()
    try:
        yield Stack(telegram, gateway, orders, tmp_path / "ledger.sqlite3")
    finally:
        await gateway.close()
        await telegram.close()


@asynccontextmanager
async def bot_run(stack: Stack, **settings: Any) -> AsyncIterator[None]:
    """One ``imagebot run``'s Telegram side on the stack's ledger, polling the fake."""
    loaded = load_settings(
        _env_file=None,
        telegram_bot_token=stack.telegram.token,
        telegram_api_url=stack.telegram.url,
        image_api_url=stack.gateway.url,
        database_path=stack.database,
        **settings,
    )
    stop = asyncio.Event()
    commands_set = len(stack.telegram.calls("setMyCommands"))
    async with open_bot(loaded, Wallet.create(), poll_interval=0.05, job_deadline=30) as bot:
        polling = asyncio.create_task(serve(build_application(loaded, bot), stop))
        await until(lambda: len(stack.telegram.calls("setMyCommands")) > commands_set)
        try:
            yield
        finally:
            stop.set()
            await polling


@asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[Stack]:
    async with platform(tmp_path) as stack, bot_run(stack, **settings):
        yield stack


def keyboard(message: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, callback data) of every button under ``message``."""
    rows = message.get("reply_markup", {}).get("inline_keyboard", [])
    return [(button["text"], button["callback_data"]) for row in rows for button in row]


def data_of(message: dict[str, Any], label: str) -> str:
    return next(data for text, data in keyboard(message) if text.startswith(label))


def results(telegram: FakeTelegram, chat: Chat) -> list[dict[str, Any]]:
    """The bot's messages that carry Again, oldest first."""
    return [
        message
        for message in telegram.messages_in(chat)
        if any(text.startswith("🔁 Again") for text, _ in keyboard(message))
    ]


async def result_count(telegram: FakeTelegram, chat: Chat, count: int) -> dict[str, Any]:
    """The newest result once there are ``count``."""
    await until(lambda: len(results(telegram, chat)) >= count)
    return results(telegram, chat)[-1]


async def alert(telegram: FakeTelegram, query: dict[str, Any]) -> str:
    """The alert the bot answered ``query`` with, answered at once."""
    await until(lambda: telegram.answered(query) is not None)
    answer = telegram.answered(query)
    assert answer is not None and answer.seconds < 1.5
    assert answer.show_alert and answer.text is not None
    return answer.text


async def rows(database: Path) -> list[tuple[str, str]]:
    """(user, status) of every ledger row, oldest first."""
    async with aiosqlite.connect(database) as db:
        found = await db.execute_fetchall(
            "SELECT platform || ':' || user_id, status FROM attempts ORDER BY id"
        )
    return [(user, status) for user, status in found]


async def spend_matches_gateway(stack: Stack, tmp_path: Path) -> bool:
    """``imagebot spend --json`` totals exactly what the sandbox settled."""
    code, out = await imagebot(
        "spend", "--json", env=cli_env(stack.gateway.url, stack.database), cwd=tmp_path
    )
    assert code == 0
    return int(Decimal(json.loads(out)["total_usd"]) * 1_000_000) == stack.settled_micro()


async def test_again_draws_the_same_request_anew_and_whoever_presses_pays(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as stack:
        telegram = stack.telegram
        group = telegram.group_chat(-100123, "Artists")
        alice, bob = User(111, "Alice", "alice"), User(222, "Bob", "bob")
        telegram.send_text(group, alice, "/imagegen -m flux --size 1024x1024 a fox in the snow")
        first = await result_count(telegram, group, 1)
        (again_label, again_data), (vary_label, vary_data) = keyboard(first)
        assert (again_label, vary_label) == ("🔁 Again · $0.042", "🎨 Vary · $0.021")
        assert again_data.startswith("again:") and vary_data.startswith("vary:")

        query = telegram.press(first, alice, data_of(first, "🔁 Again"))
        again = await result_count(telegram, group, 2)
        answer = telegram.answered(query)
        assert answer is not None and answer.seconds < 1.5 and not answer.show_alert
        assert again["caption"] == first["caption"] == "flux · 1024x1024 · $0.042"
        assert again["reply_to_message"]["message_id"] == first["message_id"]

        telegram.press(first, bob, data_of(first, "🔁 Again"))
        await result_count(telegram, group, 3)

        assert [order.body["prompt"] for order in paid(stack.orders)] == ["a fox in the snow"] * 3
        assert {order.model for order in paid(stack.orders)} == {"black-forest/flux-1.1-pro"}
        assert await rows(stack.database) == [
            ("telegram:111", "settled"),
            ("telegram:111", "settled"),
            ("telegram:222", "settled"),
        ]
        assert await spend_matches_gateway(stack, tmp_path)


async def test_again_sends_the_same_three_pictures_and_vary_edits_the_result(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        pictures = [png(120, 90, colour) for colour in ("red", "green", "blue")]
        telegram.send_album(chat, chat.user, pictures, caption="/img2img -m nano-banana fuse these")
        first = await result_count(telegram, chat, 1)

        telegram.press(first, chat.user, data_of(first, "🔁 Again"))
        await result_count(telegram, chat, 2)
        telegram.press(first, chat.user, data_of(first, "🎨 Vary"))
        await result_count(telegram, chat, 3)

        edits = [order for order in paid(stack.orders) if order.path == EDIT_PATH]
        assert len(edits) == 3
        assert edits[0].inputs == edits[1].inputs == tuple(pictures)
        (uploaded,) = telegram.calls("sendPhoto")[0].files.values()
        assert edits[2].inputs == (uploaded.data,)  # the result itself, as the chat has it
        assert {edit.body["prompt"] for edit in edits} == {"fuse these"}
        assert {edit.model for edit in edits} == {"google/nano-banana"}
        assert await spend_matches_gateway(stack, tmp_path)


async def test_again_and_vary_of_pictures_telegram_no_longer_has_say_so_and_pay_nothing(
    tmp_path: Path,
) -> None:
    gone = "That picture is no longer on Telegram, so I can't use it again. Nothing was charged."
    async with running(tmp_path) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        telegram.send_album(chat, chat.user, [png(120, 90, "red")], caption="/img2img a fox")
        first = await result_count(telegram, chat, 1)
        paid_before = len(paid(stack.orders))

        for label in ("🔁 Again", "🎨 Vary"):  # the command's picture, and the result itself
            unavailable = "Bad Request: wrong file_id or the file is temporarily unavailable"
            telegram.fail("getFile", 400, unavailable)
            assert (
                await alert(telegram, telegram.press(first, chat.user, data_of(first, label)))
                == gone
            )

        assert len(paid(stack.orders)) == paid_before == 1
        assert await rows(stack.database) == [("telegram:111", "settled")]  # nothing reserved


async def test_several_pictures_get_again_on_a_message_of_their_own(tmp_path: Path) -> None:
    async with running(tmp_path) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        telegram.send_text(chat, chat.user, "/imagegen -m flux --n 2 two foxes")
        buttons = await result_count(telegram, chat, 1)
        assert buttons["text"] == "More like these?"
        assert [label for label, _ in keyboard(buttons)] == ["🔁 Again · $0.084"]
        assert len(telegram.calls("sendMediaGroup")) == 1

        telegram.press(buttons, chat.user, data_of(buttons, "🔁 Again"))
        await result_count(telegram, chat, 2)
        assert len(telegram.calls("sendMediaGroup")) == 2
        assert [order.body["n"] for order in paid(stack.orders)] == [2, 2]


async def test_outsiders_over_budget_and_forged_presses_are_refused_and_nothing_is_paid(
    tmp_path: Path,
) -> None:
    limits = {"allowed_users": "telegram:111,telegram:222", "user_daily_limit_usd": "0.05"}
    async with running(tmp_path, **limits) as stack:
        telegram = stack.telegram
        group = telegram.group_chat(-100123, "Artists")
        alice, bob, eve = User(111, "Alice", "alice"), User(222, "Bob"), User(666, "Eve")
        telegram.send_text(group, alice, "/imagegen -m flux a fox")
        first = await result_count(telegram, group, 1)
        again = data_of(first, "🔁 Again")
        paid_before = len(paid(stack.orders))

        outsider = await alert(telegram, telegram.press(first, eve, again))
        assert outsider == "Sorry, this bot makes pictures only for its members."
        over_budget = await alert(telegram, telegram.press(first, alice, again))
        assert "limit" in over_budget and "$0.05" in over_budget
        forged = f"again:{secrets.token_urlsafe(16)}"
        assert await alert(telegram, telegram.press(first, bob, forged, forged=True)) == EXPIRED
        assert await alert(telegram, telegram.press(first, bob, "again:x", forged=True)) == EXPIRED
        stale = "cancel:999999"
        refused = await alert(telegram, telegram.press(first, bob, stale, forged=True))
        assert refused == "Nothing to cancel: you have no picture waiting or being drawn."

        assert len(paid(stack.orders)) == paid_before == 1
        assert len(results(telegram, group)) == 1
        assert await rows(stack.database) == [("telegram:111", "settled")]
        assert await spend_matches_gateway(stack, tmp_path)


async def test_a_button_works_after_the_bot_restarts(tmp_path: Path) -> None:
    async with platform(tmp_path) as stack:
        telegram = stack.telegram
        chat = telegram.private_chat(111, "Alice", "alice")
        async with bot_run(stack):
            telegram.send_text(chat, chat.user, "/imagegen -m flux a lighthouse")
            first = await result_count(telegram, chat, 1)
        async with bot_run(stack):
            telegram.press(first, chat.user, data_of(first, "🔁 Again"))
            await result_count(telegram, chat, 2)
        assert [order.body["prompt"] for order in paid(stack.orders)] == ["a lighthouse"] * 2
        assert await spend_matches_gateway(stack, tmp_path)


def statuses(telegram: FakeTelegram, chat: Chat) -> list[dict[str, Any]]:
    """The bot's messages that carry Cancel, oldest first."""
    return [
        message
        for message in telegram.messages_in(chat)
        if any(text == "✖ Cancel" for text, _ in keyboard(message))
    ]


async def status_with(telegram: FakeTelegram, chat: Chat, start: str) -> dict[str, Any]:
    """The newest status with Cancel whose text starts with ``start``."""

    def found() -> dict[str, Any] | None:
        matching = [m for m in statuses(telegram, chat) if m["text"].startswith(start)]
        return matching[-1] if matching else None

    await until(lambda: found() is not None)
    message = found()
    assert message is not None
    return message


async def one_slot_taken(
    telegram: FakeTelegram,
) -> tuple[Chat, User, User, dict[str, Any]]:
    """A group where Alice's slow job that never finishes takes the one slot: the group, Alice,
    Bob, and the job's status (with its Cancel)."""
    group = telegram.group_chat(-100123, "Artists")
    alice, bob = User(111, "Alice", "alice"), User(222, "Bob", "bob")
    telegram.send_text(group, alice, "/imagegen -m flux a slow fox #never")
    return group, alice, bob, await status_with(telegram, group, "Drawing with")


async def test_cancel_stops_a_waiting_job_and_a_polled_one_for_free_and_only_for_its_owner(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, max_concurrent_jobs=1) as stack:
        telegram = stack.telegram
        group, alice, bob, polling = await one_slot_taken(telegram)
        telegram.send_text(group, bob, "/imagegen -m flux a cat")
        waiting = await status_with(telegram, group, "Waiting in line")
        assert "yours is next" in waiting["text"]

        refused = await alert(telegram, telegram.press(waiting, alice, data_of(waiting, "✖")))
        assert refused == ONLY_REQUESTER
        told = await alert(telegram, telegram.press(waiting, bob, data_of(waiting, "✖ Cancel")))
        assert told == "Cancelled 1 job; nothing was charged."
        await until(lambda: not statuses(telegram, group) or len(statuses(telegram, group)) == 1)

        told = await alert(telegram, telegram.press(polling, alice, data_of(polling, "✖ Cancel")))
        assert told == "Cancelled 1 job; nothing was charged."
        await until(lambda: not statuses(telegram, group))
        texts = [message.get("text") for message in telegram.messages_in(group)]
        assert texts.count("Cancelled as you asked. Nothing was charged.") == 2
        assert stack.gateway.settlements == []
        assert [order.body["prompt"] for order in paid(stack.orders)] == ["a slow fox #never"]
        assert [status for _, status in await rows(stack.database)] == ["failed", "failed"]
        assert await spend_matches_gateway(stack, tmp_path)


async def test_cancel_command_stops_both_of_a_users_waiting_jobs(tmp_path: Path) -> None:
    async with running(tmp_path, max_concurrent_jobs=1) as stack:
        telegram = stack.telegram
        group, alice, bob, polling = await one_slot_taken(telegram)
        telegram.send_text(group, bob, "/imagegen -m flux a cat")
        telegram.send_text(group, bob, "/imagegen -m flux a dog")
        await until(lambda: len(statuses(telegram, group)) == 3)

        telegram.send_text(group, bob, "/cancel")
        await until(
            lambda: (
                "Cancelled 2 jobs; nothing was charged."
                in [message.get("text") for message in telegram.messages_in(group)]
            )
        )
        telegram.press(polling, alice, data_of(polling, "✖ Cancel"))
        await until(lambda: not statuses(telegram, group))
        assert stack.gateway.settlements == []
        assert len(paid(stack.orders)) == 1
        assert await spend_matches_gateway(stack, tmp_path)
