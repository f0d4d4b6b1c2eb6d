"""Admins run the bot from the chat, and one person uses it from two platforms: end to end.

Two bot processes share one SQLite ledger as ``imagebot run`` would run them: one serves the fake
Telegram (real python-telegram-bot), the other the fake Discord (real discord.py); both pay the
sandbox gateway and read the wallet's balance from a fake JSON-RPC endpoint on loopback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from io import BytesIO
from pathlib import Path
from typing import Any

import aiosqlite
import discord
import pytest
from fake_discord import FakeDiscord, Interaction
from fake_discord import User as DiscordUser
from fake_rpc import FakeRpc
from fake_telegram import Chat, FakeTelegram
from imagebot_cli import cli_env, imagebot
from local import until
from PIL import Image
from test_discord import ephemeral_text, of, private_answer

import bot.balance
from adapters.discord import build_client
from adapters.discord import serve as serve_discord
from adapters.telegram import build_application
from adapters.telegram import serve as serve_telegram
from bot.chart import CHART_HEIGHT, CHART_WIDTH
from bot.config import load_settings
from bot.service import ImageBot
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

ADMIN = 999  # the Telegram admin
ADMINS_ONLY = "Only the bot's admins can use that command."
PAUSED = "Spending is paused by the bot's admins; try again later. Nothing was charged."


@dataclass
class Stack:
    telegram: FakeTelegram
    discord: FakeDiscord
    gateway: Sandbox
    rpc: FakeRpc
    database: Path
    discord_admin: DiscordUser
    wallet: Wallet

    def settings(self, **more: Any) -> dict[str, Any]:
        return {
            "image_api_url": self.gateway.url,
            "database_path": self.database,
            "admin_ids": f"telegram:{ADMIN},discord:{self.discord_admin.id}",
            **more,
        }

    def settled_micro(self) -> int:
        return sum(settlement.amount_micro for settlement in self.gateway.settlements)


@asynccontextmanager
async def platforms(tmp_path: Path) -> AsyncIterator[Stack]:
    telegram, fake_discord, gateway, rpc = FakeTelegram(), FakeDiscord(), Sandbox(), FakeRpc(84532)
    for server in (telegram, fake_discord, gateway, rpc):
        await server.start()
    admin = fake_discord.user("boss")
    try:
        yield Stack(
            telegram,
            fake_discord,
            gateway,
            rpc,
            tmp_path / "ledger.sqlite3",
            admin,
            Wallet.create(),
        )
    finally:
        for server in (rpc, gateway, fake_discord, telegram):
            await server.close()


@asynccontextmanager
async def process(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, *platforms: str, **settings: Any
) -> AsyncIterator[ImageBot]:
    """One ``imagebot run`` on the stack's ledger serving ``platforms`` with one bot."""
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)  # restored after
    telegram, fake = stack.telegram, stack.discord
    tokens: dict[str, Any] = {}
    if "telegram" in platforms:
        tokens |= {"telegram_bot_token": telegram.token, "telegram_api_url": telegram.url}
    if "discord" in platforms:
        tokens |= {"discord_bot_token": fake.token, "discord_api_url": fake.api_url}
    loaded = load_settings(_env_file=None, **tokens, **stack.settings(**settings))
    stop, ready, since = asyncio.Event(), asyncio.Event(), len(fake.sent)
    async with open_bot(loaded, stack.wallet, poll_interval=0.05) as bot:
        adapters = []
        if "telegram" in platforms:
            application = build_application(loaded, bot)
            adapters.append(asyncio.create_task(serve_telegram(application, stop, ready)))
            await ready.wait()
        if "discord" in platforms:
            client = build_client(loaded, bot)
            adapters.append(asyncio.create_task(serve_discord(client, fake.token, stop)))
            await fake.wait_for("bulk_overwrite_global_commands", since=since)
            await fake.wait_ready()
        try:
            yield bot
        finally:
            await bot.drain(5)  # as imagebot run stops: the bot first, then the adapters
            stop.set()
            await asyncio.gather(*adapters)


@asynccontextmanager
async def both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> AsyncIterator[Stack]:
    async with (
        platforms(tmp_path) as stack,
        process(stack, monkeypatch, "telegram", **settings),
        process(stack, monkeypatch, "discord", **settings),
    ):
        yield stack


async def telegram_says(telegram: FakeTelegram, chat: Chat, text: str) -> str:
    """What the bot answers ``text`` with in ``chat`` (not a status)."""
    since = len(telegram.sent)
    telegram.send_text(chat, chat.user, text)
    call = await telegram.wait_for(
        lambda call: (
            call.method == "sendMessage"
            and call.chat_id == chat.id
            and not str(call.params.get("text", "")).startswith(("Drawing", "Waiting"))
        ),
        since=since,
    )
    return str(call.params["text"])


async def slash(fake: FakeDiscord, user: DiscordUser, name: str, **options: Any) -> str:
    """The answer to a slash command only ``user`` sees (or ``ephemeral_text`` for a refusal)."""
    interaction = fake.slash_command(fake.dm(user), user, name, options)
    return await private_answer(fake, interaction)


async def picture_of(telegram: FakeTelegram, chat: Chat, text: str) -> None:
    since = len(telegram.sent)
    telegram.send_text(chat, chat.user, text)
    await telegram.wait_for(
        lambda call: call.method == "sendPhoto" and call.chat_id == chat.id, since=since
    )


async def drawn_on_discord(fake: FakeDiscord, user: DiscordUser, prompt: str) -> Interaction:
    interaction = fake.slash_command(fake.dm(user), user, "imagegen", {"prompt": prompt})
    await fake.wait_for(
        lambda call: of(interaction, "edit_original_response")(call) and bool(call.files)
    )
    return interaction


async def spend_matches(stack: Stack, tmp_path: Path) -> bool:
    code, out = await imagebot(
        "spend", "--json", env=cli_env(stack.gateway.url, stack.database), cwd=tmp_path
    )
    assert code == 0
    return int(Decimal(json.loads(out)["total_usd"]) * 1_000_000) == stack.settled_micro()


# /wallet and the low-balance warning


async def test_wallet_shows_the_balance_with_an_rpc_and_says_when_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with platforms(tmp_path) as stack:
        stack.rpc.hold(stack.wallet.address, 12_500_000)
        admin = stack.telegram.private_chat(ADMIN, "Boss")
        async with (
            process(stack, monkeypatch, "telegram", base_sepolia_rpc_url=stack.rpc.url),
            process(stack, monkeypatch, "discord"),
        ):
            await picture_of(stack.telegram, admin, "/imagegen -m flux a fox")
            with_rpc = await telegram_says(stack.telegram, admin, "/wallet")
            without = await slash(stack.discord, stack.discord_admin, "wallet")
            stack.rpc.mode = "http500"
            unanswered = await telegram_says(stack.telegram, admin, "/wallet")
    address = stack.wallet.address
    assert with_rpc == (
        f"Wallet {address} on base-sepolia (eip155:84532).\n"
        "Balance: $12.50 USDC.\n"
        "Today: $0.042 spent of the $20.00 daily cap (UTC).\n"
        "Spending: on."
    )
    assert without.splitlines()[:2] == [
        f"Wallet {address} on base-sepolia (eip155:84532).",
        "Balance: unknown, no RPC URL set (BASE_SEPOLIA_RPC_URL).",
    ]
    assert stack.rpc.asked_balances >= 1
    assert unanswered.splitlines()[1] == "Balance: the RPC URL did not answer; try again later."


async def test_a_low_balance_warns_each_admin_once_and_again_only_after_a_top_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.balance, "CHECK_EVERY_SECONDS", 0.0)  # read after every payment
    async with platforms(tmp_path) as stack:
        rpc, telegram, fake = stack.rpc, stack.telegram, stack.discord
        rpc.hold(stack.wallet.address, 800_000)  # below $1
        telegram.private_chat(ADMIN, "Boss")  # the admin has started a chat with the bot
        user = telegram.private_chat(111, "Alice")
        settings = {"base_sepolia_rpc_url": rpc.url, "low_balance_usd": "1"}
        admin_dm = fake.dm(stack.discord_admin)

        def warnings() -> tuple[int, int]:
            in_telegram = [
                m for m in telegram.messages_in(ADMIN) if "below the $1.00" in m.get("text", "")
            ]
            in_discord = [m for m in fake.messages_in(admin_dm) if "below" in m["content"]]
            return len(in_telegram), len(in_discord)

        async with process(stack, monkeypatch, "telegram", "discord", **settings) as telegram_bot:
            await telegram_bot.wallet.balance()  # as imagebot run does at start-up
            await until(lambda: warnings() == (1, 1))
            await picture_of(telegram, user, "/imagegen -m flux a fox")
            await until(lambda: rpc.asked_balances >= 2)
            rpc.hold(stack.wallet.address, 1_000_000)  # at the line: not above it
            await picture_of(telegram, user, "/imagegen -m flux a hen")
            await until(lambda: telegram_bot.wallet.last_micro == 1_000_000)
            rpc.hold(stack.wallet.address, 900_000)
            await picture_of(telegram, user, "/imagegen -m flux a pig")
            await until(lambda: telegram_bot.wallet.last_micro == 900_000)
            assert warnings() == (1, 1)
            rpc.hold(stack.wallet.address, 5_000_000)  # a top-up
            await picture_of(telegram, user, "/imagegen -m flux a cat")
            await until(lambda: telegram_bot.wallet.last_micro == 5_000_000)
            assert warnings() == (1, 1)
            rpc.hold(stack.wallet.address, 300_000)  # spent down again
            await picture_of(telegram, user, "/imagegen -m flux an owl")
            await until(lambda: warnings() == (2, 2))
    text = telegram.messages_in(ADMIN)[-1]["text"]
    assert text.startswith("⚠️ The bot's wallet holds $0.30 USDC, below the $1.00")
    assert stack.wallet.address in text


# /budget, /pause and /resume across processes


async def test_budgets_are_set_shown_and_reset_in_one_process_and_obeyed_in_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch) as stack:
        telegram, fake = stack.telegram, stack.discord
        admin = telegram.private_chat(ADMIN, "Boss")
        bob = fake.user("bob")
        bob_id = f"discord:{bob.id}"
        assert await telegram_says(telegram, admin, f"/budget {bob_id}") == (
            f"{bob_id}'s daily limit: $1.00 (the default)."
        )
        assert await telegram_says(telegram, admin, f"/budget {bob_id} 0.06") == (
            f"{bob_id}'s daily limit is now $0.06, in every process."
        )
        await drawn_on_discord(fake, bob, "a fox")  # $0.0525 fits, a second does not
        refused = fake.slash_command(fake.dm(bob), bob, "imagegen", {"prompt": "a cat"})
        assert "Daily limit reached" in await ephemeral_text(fake, refused)
        assert await telegram_says(telegram, admin, f"/budget {bob_id} reset") == (
            f"{bob_id} is back on the default daily limit, $1.00."
        )
        await drawn_on_discord(fake, bob, "a cat")
        assert await telegram_says(telegram, admin, "/budget default 0.10") == (
            "The default daily limit is now $0.10, in every process."
        )
        assert await telegram_says(telegram, admin, "/budget default") == (
            "The default daily limit is $0.10."
        )
        refused = fake.slash_command(fake.dm(bob), bob, "imagegen", {"prompt": "an owl"})
        assert "of your $0.10 per day" in await ephemeral_text(fake, refused)
        assert await telegram_says(telegram, admin, f"/spend {bob_id}") == (
            f"@bob ({bob_id}) has spent $0.105 today, $0.105 this month and $0.105 in all "
            "(2 images).\nLeft today: $0.00 of their $0.10 daily limit; it resets at 00:00 UTC."
        )
        await telegram_says(telegram, admin, "/budget default 0")
        assert await telegram_says(telegram, admin, "/budget default") == (
            "The default daily limit is $0.00."
        )
        assert await spend_matches(stack, tmp_path)
    async with aiosqlite.connect(stack.database) as db:
        changes = await db.execute_fetchall(
            "SELECT admin, action, target, micro FROM changes ORDER BY id"
        )
    assert changes == [
        (f"telegram:{ADMIN}", "budget", bob_id, 60_000),
        (f"telegram:{ADMIN}", "budget reset", bob_id, None),
        (f"telegram:{ADMIN}", "budget default", None, 100_000),
        (f"telegram:{ADMIN}", "budget default", None, 0),
    ]


async def test_pause_in_one_process_stops_paid_commands_in_the_other_until_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch) as stack:
        telegram, fake = stack.telegram, stack.discord
        boss = stack.discord_admin
        user = telegram.private_chat(111, "Alice")
        assert (await slash(fake, boss, "pause")).startswith("Spending is paused in every")
        assert await telegram_says(telegram, user, "/imagegen a fox") == PAUSED
        assert (await telegram_says(telegram, user, "/spend")).startswith("You have spent $0.00")
        assert "Spending: paused (/resume)." in await slash(fake, boss, "wallet")
        assert await slash(fake, boss, "resume") == "Spending is on again."
        await picture_of(telegram, user, "/imagegen a fox")
    assert len(stack.gateway.settlements) == 1


async def test_non_admins_are_refused_every_admin_command_and_learn_no_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch) as stack:
        telegram, fake = stack.telegram, stack.discord
        user = telegram.private_chat(111, "Alice")
        for command in ("/wallet", "/budget telegram:111 5", "/budget default 9", "/pause"):
            assert await telegram_says(telegram, user, command) == ADMINS_ONLY
        bob = fake.user("bob")
        for name, options in (("wallet", {}), ("resume", {}), ("budget", {"who": "default"})):
            interaction = fake.slash_command(fake.dm(bob), bob, name, options)
            assert await private_answer(fake, interaction) == ADMINS_ONLY
        assert await telegram_says(telegram, user, "/spend all") == (
            "Only the bot's admins can see other people's spending."
        )
    async with aiosqlite.connect(stack.database) as db:
        assert await db.execute_fetchall("SELECT * FROM changes") == []
        assert await db.execute_fetchall("SELECT * FROM switches") == []


# One person on two platforms


async def test_linking_shares_one_budget_across_the_platforms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch, user_daily_limit_usd="0.10") as stack:
        telegram, fake = stack.telegram, stack.discord
        alice = telegram.private_chat(111, "Alice")
        alice_on_discord = fake.user("alice")
        group = telegram.group_chat(-100123, "Artists")
        telegram.send_text(group, alice.user, "/link")
        in_group = await telegram.wait_for(
            lambda call: call.method == "sendMessage" and call.chat_id == group.id
        )
        assert in_group.params["text"].startswith("Ask me for a /link code in a private chat")

        offer = await telegram_says(telegram, alice, "/link")
        code = offer.split("\n")[0].removeprefix("Your link code: ")
        assert len(code) == 8 and "Don't give the code to anyone else." in offer
        linked = await slash(fake, alice_on_discord, "link", code=code.lower())
        assert linked.startswith("Linked: this account and your other one are now one person")
        again = await slash(fake, fake.user("mallory"), "link", code=code)
        assert again == "That code is wrong or has expired; ask for a new one with /link."
        offer = await telegram_says(telegram, alice, "/link")  # Alice has a Discord account
        second = offer.split("\n")[0].removeprefix("Your link code: ")
        assert await slash(fake, fake.user("mallory"), "link", code=second) == (
            "One of the two accounts is already linked to another; /unlink it first."
        )

        await picture_of(telegram, alice, "/imagegen a fox")  # $0.0525 of the shared $0.10
        refused = fake.slash_command(
            fake.dm(alice_on_discord), alice_on_discord, "imagegen", {"prompt": "a cat"}
        )
        assert "Daily limit reached: you have $0.0475 left" in await ephemeral_text(fake, refused)
        own = await slash(fake, alice_on_discord, "spend")
        assert own.startswith("You have spent $0.0525 today")

        code, out = await imagebot(
            "spend", "--json", env=cli_env(stack.gateway.url, stack.database), cwd=tmp_path
        )
        (entry,) = json.loads(out)["users"]
        assert entry["user"] == "telegram:111" and entry["person"] == "telegram:111"

        assert await slash(fake, alice_on_discord, "unlink") == (
            "Unlinked: your accounts have separate budgets again."
        )
        assert await slash(fake, alice_on_discord, "unlink") == (
            "This account is not linked to another one."
        )
        await drawn_on_discord(fake, alice_on_discord, "a cat")  # its own budget again
        assert await spend_matches(stack, tmp_path)


async def test_link_codes_expire_are_used_once_and_wrong_guesses_are_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch) as stack:
        telegram, fake = stack.telegram, stack.discord
        alice = telegram.private_chat(111, "Alice")
        guesser = fake.user("guesser")
        offer = await telegram_says(telegram, alice, "/link")
        code = offer.split("\n")[0].removeprefix("Your link code: ")
        async with aiosqlite.connect(stack.database) as db:  # ten minutes pass
            await db.execute("UPDATE link_codes SET expires_at = expires_at - 601")
            await db.commit()
        expired = await slash(fake, guesser, "link", code=code)
        assert expired == "That code is wrong or has expired; ask for a new one with /link."

        offer = await telegram_says(telegram, alice, "/link")
        fresh = offer.split("\n")[0].removeprefix("Your link code: ")
        for guess in ("AAAAAAAA", "BBBBBBBB", "CCCCCCCC", "DDDDDDDD"):
            assert (await slash(fake, guesser, "link", code=guess)).startswith("That code is")
        limited = await slash(fake, guesser, "link", code=fresh)  # the right one, too late
        assert limited.startswith("Too many wrong codes; try again in 10 minutes.")
        bob = fake.user("bob")
        assert (await slash(fake, bob, "link", code=fresh)).startswith("Linked:")
        assert (await slash(fake, fake.user("eve"), "link", code=fresh)).startswith(
            "That code is wrong"
        )
        offer = await telegram_says(telegram, alice, "/link")
        own_platform = offer.split("\n")[0].removeprefix("Your link code: ")
        carol = telegram.private_chat(333, "Carol")
        assert await telegram_says(telegram, carol, f"/link {own_platform}") == (
            "Send the code from your account on the other platform."
        )


# /spend all's chart


async def test_spend_all_answers_with_the_report_and_a_chart_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch) as stack:
        telegram = stack.telegram
        admin = telegram.private_chat(ADMIN, "Boss")
        for user_id, name in ((111, "Alice"), (222, "Bob")):
            chat = telegram.private_chat(user_id, name, name.lower())
            await picture_of(telegram, chat, "/imagegen -m flux a fox")
        since = len(telegram.sent)
        telegram.send_text(admin, admin.user, "/spend all")
        chart = await telegram.wait_for(
            lambda call: call.method == "sendPhoto" and call.chat_id == ADMIN, since=since
        )
        report = next(c for c in telegram.sent[since:] if c.method == "sendMessage")
        assert report.params["text"].startswith("All users: $0.084 in 2 requests (2 images).")
        (upload,) = chart.files.values()
        assert upload.data.startswith(b"\x89PNG")
        picture = Image.open(BytesIO(upload.data))
        assert picture.size == (CHART_WIDTH, CHART_HEIGHT)
        colours = picture.convert("RGB").getcolors(maxcolors=100_000)
        assert colours is not None and len(colours) > 20  # not blank
        assert chart.params["caption"] == "Spend by user, last 30 days (UTC days)"

        since = len(telegram.sent)
        telegram.send_text(admin, admin.user, "/spend all models")
        by_model = await telegram.wait_for(
            lambda call: call.method == "sendPhoto" and call.chat_id == ADMIN, since=since
        )
        assert by_model.params["caption"] == "Spend by model, last 30 days (UTC days)"


async def test_imagebot_changes_lists_who_changed_what_and_when(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with both(tmp_path, monkeypatch) as stack:
        admin = stack.telegram.private_chat(ADMIN, "Boss")
        await telegram_says(stack.telegram, admin, "/budget telegram:111 0.25")
        await telegram_says(stack.telegram, admin, "/pause")
    env = cli_env(stack.gateway.url, stack.database)
    code, out = await imagebot("changes", "--json", env=env, cwd=tmp_path)
    assert code == 0
    changes = json.loads(out)["changes"]
    assert [{k: v for k, v in change.items() if k != "at"} for change in changes] == [
        {"admin": f"telegram:{ADMIN}", "action": "pause", "target": None, "usd": None},
        {"admin": f"telegram:{ADMIN}", "action": "budget", "target": "telegram:111",
         "usd": "0.250000"},
    ]  # fmt: skip
    code, out = await imagebot("changes", env=env, cwd=tmp_path)
    lines = out.splitlines()
    assert lines[0].endswith(f"telegram:{ADMIN}  pause  -  -")
    assert lines[1].endswith(f"telegram:{ADMIN}  budget  telegram:111  0.250000")
