"""The bot with its real ledger, end to end against the sandbox gateway over real HTTP.

Covers what the ledger promises the admins: every settled charge is recorded once and
equals what the gateway settled, budgets hold under concurrency (also across two
processes sharing one database), and a crash mid-payment leaves an ``unknown`` row.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from imagebot_cli import cli_env, imagebot
from local import serving
from pictures import png
from PIL import Image

from adapters.console import run_console
from bot.arrival import READYING_AT_ONCE
from bot.buttons import Button
from bot.config import load_settings
from bot.images import Picture
from bot.ledger import PostgresLedger, Report, SqliteLedger
from bot.requests import ImageInput
from bot.service import ImageBot, InputSource, Outcome, Sender, no_inputs
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

NANO_BANANA_MICRO = 52_500
ALICE = Sender("telegram", "111", "@alice", ("111",), private=True, username="alice")
BOB = Sender("discord", "222", "bob", ("900", "901"), private=False)
ADMIN = Sender("telegram", "999", "@boss", ("999",), private=True)


def given(*pictures: bytes) -> InputSource:
    """The pictures a platform hands over for an /img2img."""

    async def inputs() -> tuple[ImageInput, ...]:
        return tuple(ImageInput(data) for data in pictures)

    return inputs


class RecordingChat:
    """An in-memory Chat: the core is exercised without any platform."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.progress: list[str] = []
        self.pictures: list[tuple[Sequence[Picture], str]] = []
        self.buttons: list[Sequence[Button]] = []  # under each status and result, in order

    def reply_address(self) -> str:
        return '{"chat": "recorded"}'

    async def send_text(self, text: str) -> None:
        self.texts.append(text)

    async def show_progress(self, status: str, buttons: Sequence[Button] = ()) -> None:
        self.progress.append(status)
        self.buttons.append(buttons)

    async def send_pictures(
        self, pictures: Sequence[Picture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        self.pictures.append((pictures, caption))
        self.buttons.append(buttons)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    gateway = Sandbox(job_seconds=0.3)
    await gateway.start()
    yield gateway
    await gateway.close()


@asynccontextmanager
async def running_bot(sandbox: Sandbox, database: Path, **settings: Any) -> AsyncIterator[ImageBot]:
    loaded = load_settings(
        _env_file=None,
        image_api_url=sandbox.url,
        database_path=database,
        admin_ids="telegram:999",
        **settings,
    )
    async with open_bot(loaded, Wallet.create(), poll_interval=0.05, job_deadline=10) as bot:
        yield bot


async def test_bot_answers_with_price_in_progress_and_caption(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with running_bot(sandbox, tmp_path / "l.sqlite3") as bot:
        chat = RecordingChat()
        assert await bot.handle(ALICE, chat, "/imagegen -m flux a fox") is Outcome.DONE
    assert chat.progress == ["Drawing with flux · 1024x1024 · $0.042…"]
    ((pictures, caption),) = chat.pictures
    assert caption == "flux · 1024x1024 · $0.042" and len(pictures) == 1


async def test_a_name_with_control_characters_is_stored_without_them_on_postgresql(
    sandbox: Sandbox, tmp_path: Path, postgres_url: str
) -> None:
    sender = Sender("telegram", "4", "Eve\x00\x1b[31m", ("4",), True)
    async with running_bot(sandbox, tmp_path / "l.sqlite3", database_url=postgres_url) as bot:
        chat = RecordingChat()
        assert await bot.handle(sender, chat, "/imagegen a fox") is Outcome.DONE
        report = await bot_report(postgres_url)
    assert [(line.user, line.display_name) for line in report.users] == [("telegram:4", "Eve[31m")]


async def test_a_ledger_that_cannot_be_reached_gets_one_line_and_nothing_is_paid(
    sandbox: Sandbox, tmp_path: Path, postgres_url: str
) -> None:
    async with running_bot(sandbox, tmp_path / "l.sqlite3", database_url=postgres_url) as bot:
        name = postgres_url.rpartition("/")[2]
        admin = await asyncpg.connect(postgres_url.rpartition("/")[0] + "/postgres")
        try:  # as when the database server goes away
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
        finally:
            await admin.close()
        chat = RecordingChat()
        assert await bot.handle(ALICE, chat, "/imagegen a fox") is Outcome.REFUSED
        assert await bot.handle(ALICE, chat, "/spend") is Outcome.REFUSED
    assert chat.texts == [
        "The spending ledger can't be reached right now; try again in a minute. "
        "Nothing was charged.",
        "The spending ledger can't be reached right now; try again in a minute.",
    ]
    assert sandbox.payments_received == 0


async def bot_report(url: str) -> Report:
    async with await PostgresLedger.open(url) as ledger:
        return await ledger.report()


class FailingUploadChat(RecordingChat):
    async def send_pictures(
        self, pictures: Sequence[Picture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        raise ConnectionResetError("the platform dropped the upload")


async def test_an_upload_that_fails_after_settling_leaves_the_charge_settled(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    database = tmp_path / "l.sqlite3"
    chat = FailingUploadChat()
    async with running_bot(sandbox, database) as bot:
        assert await bot.handle(ALICE, chat, "/imagegen a fox") is Outcome.REFUSED
    assert chat.texts == [
        "Your picture was paid for but I couldn't send it. An admin can check /spend."
    ]
    async with await SqliteLedger.open(database) as ledger:
        report = await ledger.report()
    assert (report.total_micro, report.pending_micro) == (NANO_BANANA_MICRO, 0)
    assert len(sandbox.settlements) == 1


async def test_bot_refuses_bad_input_before_any_payment(sandbox: Sandbox, tmp_path: Path) -> None:
    async with running_bot(sandbox, tmp_path / "l.sqlite3") as bot:
        chat = RecordingChat()
        for text in ("/imagegen -m nope x", "/img2img x", "/imagegen -s 1x1 x", "/imagegen"):
            assert await bot.handle(ALICE, chat, text) is Outcome.REFUSED
        assert len(chat.texts) == 4 and chat.pictures == [] and chat.progress == []
        spend = RecordingChat()
        await bot.handle(ALICE, spend, "/spend")
    assert sandbox.settlements == []
    assert spend.texts[0].startswith("You have spent $0.00 today")


async def test_users_outside_the_allowlist_are_refused_in_private_and_ignored_in_groups(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with running_bot(sandbox, tmp_path / "l.sqlite3", allowed_users="telegram:222") as bot:
        private, group = RecordingChat(), RecordingChat()
        assert await bot.handle(ALICE, private, "/imagegen a fox") is Outcome.REFUSED
        in_group = Sender("telegram", "111", "alice", ("-100",), private=False)
        assert await bot.handle(in_group, group, "/imagegen a fox") is Outcome.IGNORED
    assert len(private.texts) == 1 and group.texts == []
    assert sandbox.settlements == []


async def test_console_once_saves_the_picture_and_exits_0(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jpg"
    Image.new("RGB", (80, 60), "blue").save(source, "JPEG")
    async with running_bot(sandbox, tmp_path / "l.sqlite3") as bot:
        out = tmp_path / "out"
        assert await run_console(bot, out, f"/img2img --image {source} make it snow") == 0
        (saved,) = os.listdir(out)
        assert Image.open(out / saved).size == (1024, 1024)
        assert str(out / saved) in capsys.readouterr().out
        assert await run_console(bot, out, "/imagegen #policy x") == 1
        assert await run_console(bot, out, "/img2img --image /nonexistent x") == 1


async def test_spend_report_equals_what_the_gateway_settled(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Mixed successes, 202 jobs, gateway failures and refusals; only settled charges count."""
    database = tmp_path / "ledger.sqlite3"
    script = [
        (ALICE, "/imagegen a fox", True),
        (ALICE, "/imagegen -m nano-banana-pro a slow fox", True),  # 202 + polling
        (ALICE, "/imagegen #policy a fox", False),  # 403 before payment
        (ALICE, "/imagegen #servererror a fox", False),  # 500 after the paid request
        (ALICE, "/imagegen #fail a fox", False),  # 202 job that fails, never charged
        (BOB, "/img2img make it winter", True),
        (BOB, "/imagegen -m flux -n 2 two foxes", True),
        (BOB, "/imagegen #nofunds a fox", False),  # payment refused by the gateway
        (BOB, "/imagegen #timeout a fox", False),  # 504
        (BOB, "/imagegen -m nano-banana -n 4 four foxes", False),  # quote above the cap
        (BOB, "/imagegen -m nope a fox", False),  # refused by the parser
    ]
    async with running_bot(sandbox, database, max_micro_per_request="0.20") as bot:
        for sender, text, succeeds in script:
            chat = RecordingChat()
            inputs = given(png()) if text.startswith("/img2img") else no_inputs
            outcome = Outcome.DONE if succeeds else Outcome.REFUSED
            assert await bot.handle(sender, chat, text, inputs) is outcome, (text, chat.texts)
        admin = RecordingChat()
        await bot.handle(ADMIN, admin, "/spend all")
    settled = sum(settlement.amount_micro for settlement in sandbox.settlements)
    assert len(sandbox.settlements) == 4 and settled > 0

    code, out = await imagebot("spend", "--json", env=cli_env(sandbox.url, database), cwd=tmp_path)

    assert code == 0
    report = json.loads(out)
    assert report["total_usd"] == f"{settled // 1_000_000}.{settled % 1_000_000:06d}"
    assert "pending_usd" not in report
    by_user = {row["user"]: row for row in report["users"]}
    assert set(by_user) == {"telegram:111", "discord:222"}
    assert (by_user["telegram:111"]["requests"], by_user["telegram:111"]["images"]) == (2, 2)
    assert (by_user["discord:222"]["requests"], by_user["discord:222"]["images"]) == (2, 3)
    _, table = await imagebot("spend", env=cli_env(sandbox.url, database), cwd=tmp_path)
    assert f"total settled: {report['total_usd']} USD" in table
    assert any(line.startswith("telegram:111  @alice") for line in table.splitlines())
    assert admin.texts[0].startswith("All users: ")
    assert "@alice (telegram:111)" in admin.texts[0] and "bob (discord:222)" in admin.texts[0]


async def test_spend_tells_users_their_own_figures_and_only_admins_see_others(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with running_bot(sandbox, tmp_path / "l.sqlite3") as bot:
        assert await bot.handle(ALICE, RecordingChat(), "/imagegen a fox") is Outcome.DONE
        own, other, everyone = RecordingChat(), RecordingChat(), RecordingChat()
        await bot.handle(ALICE, own, "/spend")
        await bot.handle(BOB, other, "/spend telegram:111")
        await bot.handle(BOB, everyone, "/spend all")
        by_name, by_id, unknown = RecordingChat(), RecordingChat(), RecordingChat()
        await bot.handle(ADMIN, by_name, "/spend @alice")
        await bot.handle(ADMIN, by_id, "/spend telegram:111")
        await bot.handle(ADMIN, unknown, "/spend @nobody")
        admin_own = RecordingChat()
        await bot.handle(ADMIN, admin_own, "/spend")
    assert own.texts == [
        "You have spent $0.0525 today, $0.0525 this month and $0.0525 in all (1 image).\n"
        "Left today: $0.9475 of your $1.00 daily limit; it resets at 00:00 UTC."
    ]
    for refused in (other, everyone):
        assert refused.texts == ["Only the bot's admins can see other people's spending."]
    assert by_name.texts == by_id.texts
    assert by_name.texts[0].startswith("@alice (telegram:111) has spent $0.0525 today")
    assert unknown.texts == ["I have no spending recorded for @nobody."]
    assert "No personal daily limit (admin)." in admin_own.texts[0]


async def test_100_concurrent_requests_against_a_cap_that_fits_3_pay_for_exactly_3(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """100 users at once against the global cap (the per-user cap: tests/test_ledger.py)."""
    cap = f"0.{3 * NANO_BANANA_MICRO:06d}"
    senders = [Sender("telegram", str(1000 + i), "", (str(1000 + i),), True) for i in range(100)]
    chats = [RecordingChat() for _ in senders]
    async with running_bot(sandbox, tmp_path / "l.sqlite3", global_daily_micro=cap) as bot:
        outcomes = await asyncio.gather(
            *(
                bot.handle(sender, chat, "/imagegen a fox")
                for sender, chat in zip(senders, chats, strict=True)
            )
        )
    assert outcomes.count(Outcome.DONE) == 3 and outcomes.count(Outcome.REFUSED) == 97
    assert len(sandbox.settlements) == 3
    refusals = [chat.texts for chat in chats if chat.texts]
    assert len(refusals) == 97
    assert all("daily spending limit" in texts[0] and "00:00 UTC" in texts[0] for texts in refusals)


async def test_a_third_job_of_one_user_waits_for_the_first_two(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    chats = [RecordingChat() for _ in range(3)]
    async with running_bot(sandbox, tmp_path / "l.sqlite3") as bot:
        outcomes = await asyncio.gather(
            *(bot.handle(ALICE, chat, "/imagegen a fox") for chat in chats)
        )
        later = await bot.handle(ALICE, RecordingChat(), "/imagegen a fox")
    assert sorted(outcomes, key=str) == [Outcome.DONE, Outcome.DONE, Outcome.REFUSED]
    assert [chat.texts for chat in chats if chat.texts] == [
        ["Wait for your previous image to finish first."]
    ]
    assert later is Outcome.DONE and len(sandbox.settlements) == 3


FLEET_SCRIPT = """
import asyncio, sys
from bot.config import load_settings
from imagebot.wiring import open_bot
from bot.service import Outcome, Sender

class Quiet:
    def reply_address(self): return "{}"
    async def send_text(self, text): pass
    async def show_progress(self, status, buttons=()): pass
    async def send_pictures(self, pictures, caption, buttons=()): pass

async def main():
    users = [Sender("telegram", str(i), "", (str(i),), True) for i in range(50)]
    async with open_bot(load_settings(_env_file=None)) as bot:
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        sys.stdin.readline()
        outcomes = await asyncio.gather(
            *(bot.handle(user, Quiet(), "/imagegen a fox") for user in users)
        )
    print(sum(outcome is Outcome.DONE for outcome in outcomes))

asyncio.run(main())
"""


async def test_two_bot_processes_sharing_one_ledger_pay_for_exactly_3(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    database = tmp_path / "shared.sqlite3"
    cap = f"0.{3 * NANO_BANANA_MICRO:06d}"
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLEET_SCRIPT,
            env=cli_env(sandbox.url, database, GLOBAL_DAILY_LIMIT_USD=cap),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for process in processes:  # both ledgers are open before either fires
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
    outputs = [await asyncio.wait_for(process.communicate(), 60) for process in processes]

    paid = [int(out.decode().strip()) for out, _ in outputs]
    assert sum(paid) == 3
    assert len(sandbox.settlements) == 3


async def test_crash_after_the_payment_was_sent_leaves_an_unknown_row(tmp_path: Path) -> None:
    """SIGKILL while the paid request is at the gateway; the restarted bot shows it as unknown."""
    sandbox = Sandbox(latency=30.0)
    await sandbox.start()
    database = tmp_path / "ledger.sqlite3"
    env = cli_env(sandbox.url, database)
    try:
        victim = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "imagebot.cli",
            "console",
            "--once",
            "/imagegen a fox",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
        )
        for _ in range(600):
            if sandbox.payments_received:
                break
            await asyncio.sleep(0.05)
        assert sandbox.payments_received == 1, "the paid request never reached the gateway"
        os.kill(victim.pid, signal.SIGKILL)
        assert await victim.wait() == -signal.SIGKILL

        code, spend_all = await imagebot("console", "--once", "/spend all", env=env, cwd=tmp_path)
        _, report = await imagebot("spend", "--json", env=env, cwd=tmp_path)
    finally:
        await sandbox.close()

    assert code == 0
    assert "Outcome unknown, not counted above: $0.0525." in spend_all
    assert json.loads(report)["pending_usd"] == "0.052500"
    assert json.loads(report)["total_usd"] == "0.000000"
    rows = await ledger_statuses(database)
    assert rows == ["unknown"]


async def ledger_statuses(database: Path) -> list[str]:
    import aiosqlite

    async with aiosqlite.connect(database) as db:
        cursor = await db.execute("SELECT status FROM attempts ORDER BY id")
        return [row[0] for row in await cursor.fetchall()]


async def test_quote_above_the_estimate_is_checked_against_the_budget_before_signing(
    tmp_path: Path,
) -> None:
    """The catalog says $0.0525, the gateway asks $0.20; a $0.10 daily cap refuses it unsigned."""
    from aiohttp import web

    from bot.chains import BASE_SEPOLIA

    requirement = {
        "scheme": "exact",
        "network": BASE_SEPOLIA.caip2,
        "asset": BASE_SEPOLIA.usdc,
        "amount": "200000",
        "payTo": "0x1f9994449098867e0A14f77DcAD0fD3beBe3ae15",
        "maxTimeoutSeconds": 300,
        "extra": {},
    }
    paid_requests: list[str] = []

    async def generations(request: web.Request) -> web.Response:
        if "PAYMENT-SIGNATURE" in request.headers:
            paid_requests.append(request.headers["PAYMENT-SIGNATURE"])
        return web.json_response({"x402Version": 2, "accepts": [requirement]}, status=402)

    async with serving(("POST", "/v1/images/generations", generations)) as url:
        settings = load_settings(
            _env_file=None,
            image_api_url=url,
            database_path=tmp_path / "l.sqlite3",
            user_daily_micro="0.10",
        )
        async with open_bot(settings, Wallet.create()) as bot:
            chat = RecordingChat()
            assert await bot.handle(ALICE, chat, "/imagegen a fox") is Outcome.REFUSED
            spend = RecordingChat()
            await bot.handle(ALICE, spend, "/spend")
    assert paid_requests == []
    assert chat.texts == [
        "Daily limit reached: you have $0.10 left of your $0.10 per day; it resets at "
        "00:00 UTC. Nothing was charged."
    ]
    assert "Left today: $0.10" in spend.texts[0]  # the refused reservation was released


async def test_a_crowd_pays_first_come_first_served_not_all_at_the_end(tmp_path: Path) -> None:
    """60 users at once: a few commands get ready to pay at a time, in the order they came, so
    the first payment leaves before most quotes are asked for (with every command stepping
    forward together, all 60 quotes came first and every picture came back in one late rush)."""
    arrivals: list[str] = []

    @web.middleware
    async def note(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST":
            arrivals.append("paid" if "PAYMENT-SIGNATURE" in request.headers else "quote")
        return await handler(request)

    gateway = Sandbox()
    gateway.app.middlewares.append(note)
    await gateway.start()
    senders = [Sender("telegram", str(2000 + i), "", (str(2000 + i),), True) for i in range(60)]
    try:
        async with running_bot(gateway, tmp_path / "l.sqlite3", global_daily_micro="100") as bot:
            outcomes = await asyncio.gather(
                *(bot.handle(sender, RecordingChat(), "/imagegen a fox") for sender in senders)
            )
    finally:
        await gateway.close()
    assert outcomes == [Outcome.DONE] * 60
    # about READYING_AT_ONCE; twice that if a slow machine let every place's hold time pass
    assert arrivals.index("paid") < 2 * READYING_AT_ONCE < len(senders)
