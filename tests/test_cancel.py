"""The fair line and cancelling, end to end: the bot with its ledger against the sandbox gateway.

A gate in front of the sandbox holds paid requests (or polls) in flight for as long as a test
needs, so who waits, who runs and what a cancel meets are decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import local
import pytest
from aiohttp import web
from test_service import RecordingChat

from bot.buttons import Button
from bot.config import load_settings
from bot.ledger import PAUSED_TEXT, SqliteLedger
from bot.service import Cancellation, ImageBot, Outcome, Sender, cancel_text
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

ALICE = Sender("telegram", "111", "@alice", ("111",), private=True)
BOB = Sender("discord", "222", "bob", ("900",), private=False)
CAROL = Sender("telegram", "333", "carol", ("333",), private=True)
CANCELLED_ONE = "Cancelled 1 job; nothing was charged."
TOLD_CANCELLED = "Cancelled as you asked. Nothing was charged."
TOO_LATE = "Your picture is already paid for and on its way; it can't be cancelled."
NOTHING = "Nothing to cancel: you have no picture waiting or being drawn."
_PLACE = re.compile(r"^Waiting in line for .+: (?:(\d+) jobs? ahead of yours|yours is next)… ")


class Gate:
    """Holds the sandbox's paid image requests (or, with ``polls``, its polls; with ``quotes``,
    the unpaid requests that ask for a quote) until opened."""

    def __init__(self, *, polls: bool = False, quotes: bool = False) -> None:
        self.opened = asyncio.Event()
        self.held = 0  # requests that reached the gate
        self.inside = self.most_inside = 0  # gated requests being answered at once
        self._polls = polls
        self._quotes = quotes

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        poll = request.method == "GET" and "/v1/images/generations/" in request.path
        post = request.method == "POST"
        paid = "PAYMENT-SIGNATURE" in request.headers
        if not (poll if self._polls else post and paid != self._quotes):
            return await handler(request)
        self.held += 1
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await self.opened.wait()
            return await handler(request)
        finally:
            self.inside -= 1


class Polls:
    """Counts the sandbox's polls."""

    def __init__(self) -> None:
        self.count = 0

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.count += request.method == "GET" and "/v1/images/generations/" in request.path
        return await handler(request)


@asynccontextmanager
async def gateway(*middlewares: Gate | Polls, job_seconds: float = 0.3) -> AsyncIterator[Sandbox]:
    sandbox = Sandbox(job_seconds=job_seconds)
    sandbox.app.middlewares.extend(watcher.middleware for watcher in middlewares)
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


def bot_on(
    sandbox: Sandbox, tmp_path: Path, **settings: Any
) -> AbstractAsyncContextManager[ImageBot]:
    """The bot with its ledger in ``tmp_path``, paying ``sandbox``; polls every 0.05 s."""
    loaded = load_settings(
        _env_file=None,
        image_api_url=sandbox.url,
        database_path=tmp_path / "ledger.sqlite3",
        **settings,
    )
    return open_bot(loaded, Wallet.create(), poll_interval=0.05, job_deadline=10)


@asynccontextmanager
async def running(
    tmp_path: Path, *middlewares: Gate | Polls, job_seconds: float = 0.3, **settings: Any
) -> AsyncIterator[tuple[ImageBot, Sandbox]]:
    async with (
        gateway(*middlewares, job_seconds=job_seconds) as sandbox,
        bot_on(sandbox, tmp_path, **settings) as bot,
    ):
        yield bot, sandbox


class LoggedChat(RecordingChat):
    """A RecordingChat that also writes its statuses, named, to one log shared by all."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self.name = name
        self._log = log

    async def show_progress(self, status: str, buttons: Sequence[Button] = ()) -> None:
        await super().show_progress(status, buttons)
        self._log.append((self.name, status))


def places(statuses: list[str]) -> list[int]:
    """The places in line a job was told, in order."""
    found = [_PLACE.match(status) for status in statuses]
    return [int(match.group(1) or 0) for match in found if match]


def until(check: Callable[[], bool]) -> Awaitable[None]:
    """Quick polls: a test holds each job at the gateway exactly as long as it needs."""
    return local.until(check, seconds=10.0, every=0.01)


async def rows(tmp_path: Path) -> list[tuple[str, str, str | None]]:
    """(user, status, error) of every ledger row, oldest first."""
    async with aiosqlite.connect(tmp_path / "ledger.sqlite3") as db:
        found = await db.execute_fetchall(
            "SELECT platform || ':' || user_id, status, error FROM attempts ORDER BY id"
        )
    return [(user, status, error) for user, status, error in found]


async def report_matches(tmp_path: Path, sandbox: Sandbox) -> bool:
    """The ledger's report (what ``imagebot spend`` prints) equals what the sandbox settled."""
    async with await SqliteLedger.open(tmp_path / "ledger.sqlite3") as ledger:
        report = await ledger.report()
    settled = sum(settlement.amount_micro for settlement in sandbox.settlements)
    return (report.total_micro, report.pending_micro) == (settled, 0)


async def ask(bot: ImageBot, sender: Sender, text: str) -> list[str]:
    chat = RecordingChat()
    assert await bot.handle(sender, chat, text) is Outcome.DONE
    return chat.texts


async def one_behind_another(
    bot: ImageBot,
    gate: Gate,
    holding: tuple[Sender, RecordingChat],
    waiting: tuple[Sender, RecordingChat],
) -> tuple[asyncio.Task[Outcome], asyncio.Task[Outcome]]:
    """A job held at the gateway in the one slot, and a second one waiting in line behind it."""
    first = start(bot, *holding)
    await until(lambda: gate.held == 1)
    second = start(bot, *waiting)
    await until(lambda: bool(waiting[1].progress))
    return first, second


def start(bot: ImageBot, sender: Sender, chat: RecordingChat) -> asyncio.Task[Outcome]:
    return asyncio.create_task(bot.handle(sender, chat, "/imagegen a fox"))


async def test_ten_jobs_in_two_slots_wait_their_turn_round_robin_told_their_place(
    tmp_path: Path,
) -> None:
    gate = Gate()
    log: list[tuple[str, str]] = []
    users = {
        name: Sender("telegram", str(n), name, (str(n),), True) for n, name in enumerate("abcde")
    }
    chats = {f"{user}{n}": LoggedChat(f"{user}{n}", log) for user in users for n in (1, 2)}
    async with running(tmp_path, gate, max_concurrent_jobs=2) as (bot, sandbox):
        tasks = []
        for name, chat in chats.items():  # each user's two jobs together: the worst case
            tasks.append(start(bot, users[name[0]], chat))
            await until(lambda chat=chat: bool(chat.progress))
        await until(lambda: gate.held == 2)
        await asyncio.sleep(0.05)  # every waiting job has shown its place
        joined = {name: len(chat.progress) for name, chat in chats.items()}
        told = {name: places(chat.progress)[-1:] for name, chat in chats.items()}
        gate.opened.set()
        outcomes = await asyncio.gather(*tasks)
    assert outcomes == [Outcome.DONE] * 10
    assert all(len(chat.pictures) == 1 for chat in chats.values())  # nobody starved
    assert gate.most_inside == 2  # never more than two paid requests in flight
    expected = ["a1", "a2", "b1", "c1", "d1", "e1", "b2", "c2", "d2", "e2"]
    assert told == {name: [] if name[0] == "a" else [expected.index(name) - 2] for name in chats}
    started = [name for name, status in log if status.startswith("Drawing with nano-banana")]
    assert started == expected  # a user's second job waits for everyone's first
    for name, chat in chats.items():
        counted = places(chat.progress[joined[name] - 1 :])  # from when the line was full
        assert counted == sorted(set(counted), reverse=True), (name, chat.progress)
        assert chat.progress[-1].startswith("Drawing with nano-banana")
        assert "(/cancel to stop it)" in chat.progress[0] or name[0] == "a"
    assert len(sandbox.settlements) == 10
    assert await report_matches(tmp_path, sandbox)


async def test_a_job_cancelled_while_it_waits_is_never_paid_and_its_row_says_why(
    tmp_path: Path,
) -> None:
    gate = Gate()
    holder, waiting = RecordingChat(), RecordingChat()
    async with running(tmp_path, gate, max_concurrent_jobs=1) as (bot, sandbox):
        first, second = await one_behind_another(bot, gate, (ALICE, holder), (BOB, waiting))
        assert waiting.progress == [
            "Waiting in line for nano-banana · 1024x1024 · $0.0525: yours is next… "
            "(/cancel to stop it)"
        ]
        twice = await asyncio.gather(ask(bot, BOB, "/cancel"), ask(bot, BOB, "/cancel"))
        assert twice == [[CANCELLED_ONE]] * 2  # a double tap gets the same answer
        assert await second is Outcome.REFUSED
        gate.opened.set()
        assert await first is Outcome.DONE
    assert waiting.texts == [TOLD_CANCELLED] and waiting.pictures == []
    assert sandbox.payments_received == 1 and len(sandbox.settlements) == 1
    assert await rows(tmp_path) == [
        ("telegram:111", "settled", None),
        ("discord:222", "failed", "cancelled by the requester"),
    ]
    assert await report_matches(tmp_path, sandbox)


async def test_a_job_waiting_in_line_when_spending_is_paused_is_refused_at_its_turn_unpaid(
    tmp_path: Path,
) -> None:
    gate = Gate()
    holder, waiting = RecordingChat(), RecordingChat()
    boss = Sender("telegram", "999", "boss", ("999",), private=True)
    settings = {"max_concurrent_jobs": 1, "admin_ids": "telegram:999"}
    async with running(tmp_path, gate, **settings) as (bot, sandbox):
        first, second = await one_behind_another(bot, gate, (ALICE, holder), (BOB, waiting))
        (paused,) = await ask(bot, boss, "/pause")
        gate.opened.set()
        assert await first is Outcome.DONE  # already paid for: it still arrives
        assert await second is Outcome.REFUSED
    assert paused.startswith("Spending is paused in every process")
    assert len(holder.pictures) == 1
    assert waiting.texts == [PAUSED_TEXT] and waiting.pictures == []
    assert sandbox.payments_received == 1 and len(sandbox.settlements) == 1
    assert await rows(tmp_path) == [
        ("telegram:111", "settled", None),
        ("discord:222", "failed", PAUSED_TEXT),
    ]
    assert await report_matches(tmp_path, sandbox)


async def test_a_job_cancelled_while_it_gets_its_quote_is_never_signed(tmp_path: Path) -> None:
    """Out of the line, its quote asked for: a cancel still stops it before anything is priced
    or signed."""
    gate = Gate(quotes=True)
    chat = RecordingChat()
    async with running(tmp_path, gate) as (bot, sandbox):
        job = start(bot, ALICE, chat)
        await until(lambda: gate.held == 1)
        cancelling = asyncio.create_task(bot.cancel_job("telegram:111", 1))
        await asyncio.sleep(0)  # the cancel has begun: it waits for the job to end
        gate.opened.set()  # the quote comes back
        assert await cancelling is Cancellation.CANCELLED
        assert await job is Outcome.REFUSED
    assert chat.texts == [TOLD_CANCELLED] and chat.pictures == []
    assert sandbox.payments_received == 0 and sandbox.settlements == []
    assert await rows(tmp_path) == [("telegram:111", "failed", "cancelled by the requester")]


async def test_a_fast_job_whose_payment_left_cannot_be_cancelled(tmp_path: Path) -> None:
    gate = Gate()
    chat = RecordingChat()
    async with running(tmp_path, gate) as (bot, sandbox):
        job = start(bot, ALICE, chat)
        await until(lambda: gate.held == 1)  # the paid request is at the gateway
        answer = asyncio.create_task(ask(bot, ALICE, "/cancel"))
        assert await answer == [TOO_LATE]  # answered at once, while the request is held
        gate.opened.set()
        assert await job is Outcome.DONE
    assert len(chat.pictures) == 1 and chat.texts == []
    assert len(sandbox.settlements) == 1
    assert await report_matches(tmp_path, sandbox)


@pytest.mark.parametrize("chain", [False, True])
async def test_a_slow_job_cancelled_while_polling_stops_between_polls_and_is_never_settled(
    tmp_path: Path, chain: bool
) -> None:
    """With an RPC URL the row waits for the chain instead: the signed authorization could
    still be used until it expires (nothing listens at this one)."""
    polls = Polls()
    chat = RecordingChat()
    rpc = {"base_sepolia_rpc_url": "http://127.0.0.1:9/rpc"} if chain else {}
    async with running(tmp_path, polls, job_seconds=0.6, **rpc) as (bot, sandbox):
        job = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a fox #slow"))
        await until(lambda: any(status.endswith(" s") for status in chat.progress))  # polled
        assert await ask(bot, ALICE, "/cancel") == [CANCELLED_ONE]
        assert await job is Outcome.REFUSED
        polled = polls.count
        await asyncio.sleep(0.8)  # past the moment the job would have completed
    assert polls.count == polled  # no poll after the cancel
    assert chat.texts == [TOLD_CANCELLED] and chat.pictures == []
    assert sandbox.payments_received == 1  # the 202 carried the payment; no poll collected it
    assert sandbox.settlements == []
    if chain:
        assert await rows(tmp_path) == [
            (
                "telegram:111",
                "unknown",
                "the gateway said nothing was charged; waiting for the chain: "
                "cancelled by the requester",
            )
        ]
        return
    assert await rows(tmp_path) == [("telegram:111", "failed", "cancelled by the requester")]
    assert await report_matches(tmp_path, sandbox)


async def test_a_poll_in_flight_that_finds_the_job_done_delivers_it_and_the_cancel_says_so(
    tmp_path: Path,
) -> None:
    gate = Gate(polls=True)
    chat = RecordingChat()
    async with running(tmp_path, gate, job_seconds=0.2) as (bot, sandbox):
        job = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a fox #slow"))
        await until(lambda: gate.held == 1)
        await asyncio.sleep(0.3)  # the job is done at the gateway; the poll that will see it waits
        answer = asyncio.create_task(ask(bot, ALICE, "/cancel"))
        await asyncio.sleep(0.1)
        assert not answer.done()  # a poll in flight is never cut short: its answer decides
        gate.opened.set()
        assert await answer == [TOO_LATE]
        assert await job is Outcome.DONE
    assert len(chat.pictures) == 1 and chat.texts == []
    assert gate.held == 1 and len(sandbox.settlements) == 1
    assert await rows(tmp_path) == [("telegram:111", "settled", None)]
    assert await report_matches(tmp_path, sandbox)


async def test_only_the_requester_can_cancel_a_job(tmp_path: Path) -> None:
    gate = Gate()
    holder, waiting = RecordingChat(), RecordingChat()
    async with running(tmp_path, gate, max_concurrent_jobs=1) as (bot, sandbox):
        first, second = await one_behind_another(bot, gate, (CAROL, holder), (ALICE, waiting))
        (cancel,) = waiting.buttons[-1]
        assert cancel.label == "✖ Cancel" and cancel.data.startswith("cancel:")
        row_id = int(cancel.data.removeprefix("cancel:"))

        refused = await bot.cancel_job(BOB.principal, row_id)
        assert refused is Cancellation.NOT_YOURS
        assert cancel_text([refused]) == "Only the person who asked for that picture can cancel it."
        assert await ask(bot, BOB, "/cancel") == [NOTHING]
        assert await bot.cancel_job(ALICE.principal, row_id + 100) is Cancellation.GONE
        assert not waiting.texts  # still waiting

        assert await bot.cancel_job(ALICE.principal, row_id) is Cancellation.CANCELLED
        assert await second is Outcome.REFUSED
        gate.opened.set()
        assert await first is Outcome.DONE
    assert waiting.texts == [TOLD_CANCELLED]
    assert sandbox.payments_received == 1
    assert await report_matches(tmp_path, sandbox)


async def test_cancel_stops_both_of_a_users_waiting_jobs(tmp_path: Path) -> None:
    gate = Gate()
    holder, waiting = RecordingChat(), [RecordingChat(), RecordingChat()]
    async with running(tmp_path, gate, max_concurrent_jobs=1) as (bot, sandbox):
        first = start(bot, CAROL, holder)
        await until(lambda: gate.held == 1)
        jobs = [start(bot, ALICE, chat) for chat in waiting]
        await until(lambda: all(chat.progress for chat in waiting))
        assert await ask(bot, ALICE, "/cancel") == ["Cancelled 2 jobs; nothing was charged."]
        assert await asyncio.gather(*jobs) == [Outcome.REFUSED] * 2
        assert await ask(bot, ALICE, "/cancel") == [NOTHING]
        gate.opened.set()
        assert await first is Outcome.DONE
    assert [chat.texts for chat in waiting] == [[TOLD_CANCELLED]] * 2
    assert sandbox.payments_received == 1
    assert [status for _, status, _ in await rows(tmp_path)] == ["settled", "failed", "failed"]
    assert await report_matches(tmp_path, sandbox)


async def test_stopping_the_bot_withdraws_waiting_jobs_unpaid_and_tells_their_users(
    tmp_path: Path,
) -> None:
    gate = Gate()
    holder, waiting = RecordingChat(), RecordingChat()
    async with running(tmp_path, gate, max_concurrent_jobs=1) as (bot, sandbox):
        first, second = await one_behind_another(bot, gate, (CAROL, holder), (ALICE, waiting))
        draining = asyncio.create_task(bot.drain(seconds=10))
        assert await second is Outcome.REFUSED
        gate.opened.set()  # the paid request in flight still finishes
        assert await first is Outcome.DONE
        await draining
    assert waiting.texts == [
        "The bot is restarting; send that again in a minute. Nothing was charged."
    ]
    assert len(holder.pictures) == 1
    assert sandbox.payments_received == 1
    assert await rows(tmp_path) == [
        ("telegram:333", "settled", None),
        ("telegram:111", "failed", "the bot stopped before signing"),
    ]
    assert await report_matches(tmp_path, sandbox)


class SlowUpload(RecordingChat):
    """A chat whose upload of the pictures waits until ``upload`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.uploading, self.upload = asyncio.Event(), asyncio.Event()

    async def send_pictures(
        self, pictures: Sequence[Any], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        self.uploading.set()
        await self.upload.wait()
        await super().send_pictures(pictures, caption, buttons)


async def test_a_stop_while_a_slow_job_sends_its_charged_picture_lets_it_finish(
    tmp_path: Path,
) -> None:
    """Slow jobs kept in the ledger stop at once, but not one sending a picture it was charged
    for: settled, the next start would not send it."""
    chat = SlowUpload()
    async with running(tmp_path, job_seconds=0.2) as (bot, sandbox):
        job = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a fox #slow"))
        await asyncio.wait_for(chat.uploading.wait(), 10)
        draining = asyncio.create_task(bot.drain(10))
        await asyncio.sleep(0.3)
        assert not draining.done()  # waits for the upload
        chat.upload.set()
        await draining
        assert await job is Outcome.DONE
    assert len(chat.pictures) == 1 and chat.texts == []
    assert await rows(tmp_path) == [("telegram:111", "settled", None)]
    assert await report_matches(tmp_path, sandbox)


async def test_a_charged_picture_still_sending_at_the_stop_deadline_is_not_left_in_silence(
    tmp_path: Path,
) -> None:
    chat = SlowUpload()
    async with running(tmp_path, job_seconds=0.2) as (bot, _):
        job = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a fox #slow"))
        await asyncio.wait_for(chat.uploading.wait(), 10)
        await bot.drain(0.3)  # the upload never ends
        with contextlib.suppress(asyncio.CancelledError):
            await job
    assert chat.pictures == []
    assert chat.texts == [
        "Your picture was paid for, but the bot stopped while sending it. "
        "An admin can check /spend."
    ]
    assert await rows(tmp_path) == [("telegram:111", "settled", None)]


async def test_a_slow_job_resumed_after_a_restart_can_be_cancelled(tmp_path: Path) -> None:
    chat, resumed = RecordingChat(), RecordingChat()

    async def chat_for(platform: str, address: str) -> RecordingChat:
        return resumed

    async with gateway(job_seconds=3.0) as sandbox:
        async with bot_on(sandbox, tmp_path) as bot:
            job = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a fox #slow"))
            await until(lambda: any(status.endswith(" s") for status in chat.progress))
            await bot.drain(seconds=0)  # the slow job is left to the next start
            await asyncio.gather(job, return_exceptions=True)
        async with bot_on(sandbox, tmp_path) as restarted:
            await restarted.resume_jobs(chat_for, ["telegram"])
            assert await ask(restarted, ALICE, "/cancel") == [CANCELLED_ONE]
    assert chat.texts == ["The bot is restarting; your picture will come once it is back."]
    assert resumed.texts == [TOLD_CANCELLED] and resumed.pictures == []
    assert sandbox.payments_received == 1 and sandbox.settlements == []
    assert await rows(tmp_path) == [("telegram:111", "failed", "cancelled by the requester")]
