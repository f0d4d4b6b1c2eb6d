"""What is owed is delivered or resolved, through ``open_bot``: jobs resumed by one process of
several, a ledger locked by another process during a slow job, and the chain's word on
payments the gateway left unknown."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite
import local
import pytest
from aiohttp import web
from fake_rpc import FakeRpc
from imagebot_cli import ROOT, cli_env, imagebot
from local import until
from test_service import RecordingChat

import bot.ledger.sqlite
import bot.service
from bot.buttons import Button
from bot.config import load_settings
from bot.images import Picture
from bot.ledger import Attempt, Budget, SqliteLedger, Status, open_ledger
from bot.ledger.journal import SettlementJournal
from bot.service import Outcome, Sender
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

ALICE = Sender("telegram", "111", "@alice", ("111",), private=True)


@pytest.fixture
async def gateway() -> AsyncIterator[Sandbox]:
    sandbox = Sandbox(job_seconds=1.0)
    await sandbox.start()
    yield sandbox
    await sandbox.close()


async def statuses(database: Path) -> list[str]:
    async with aiosqlite.connect(database) as db:
        found = await db.execute_fetchall("SELECT status FROM attempts ORDER BY id")
    return [status for (status,) in found]


async def settled_micro(database: Path) -> int:
    """What ``imagebot spend --json`` says was charged in all, in micro-USDC."""
    code, out = await imagebot(
        "spend", "--json", env=cli_env("http://127.0.0.1:9", database), cwd=database.parent
    )
    assert code == 0
    return int(Decimal(json.loads(out)["total_usd"]) * 1_000_000)


# A slow job, polled as BlockRun answers.


async def test_a_slow_job_is_polled_through_202s_then_delivered_and_settled_once(
    tmp_path: Path,
) -> None:
    gateway = Sandbox(job_seconds=1.0)
    answers: list[tuple[int, str]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "GET" and "/v1/images/generations/" in request.path:
            assert isinstance(response, web.Response) and response.body is not None
            answers.append((response.status, json.loads(bytes(response.body))["status"]))
        return response

    gateway.app.middlewares.append(record)
    await gateway.start()
    database = tmp_path / "ledger.sqlite3"
    settings = load_settings(_env_file=None, image_api_url=gateway.url, database_path=database)
    chat = RecordingChat()
    try:
        async with open_bot(settings, Wallet.create(), poll_interval=0.1) as bot:
            outcome = await bot.handle(ALICE, chat, "/imagegen -m banana-pro a harbour")
    finally:
        await gateway.close()

    assert outcome is Outcome.DONE
    assert answers.count((202, "in_progress")) >= 3
    assert answers[-1] == (200, "completed")
    assert len(chat.pictures) == 1
    assert chat.progress[-1].startswith("Drawing with banana-pro · 1024x1024 · $0.105… ")
    assert len(gateway.settlements) == 1
    assert await statuses(database) == ["settled"]
    assert await settled_micro(database) == gateway.settlements[0].amount_micro


# Two processes restarting on one ledger resume each job once.

START_JOBS = """
import asyncio, json, sys
from bot.config import load_settings
from bot.service import Sender
from imagebot.wiring import open_bot

class Chat:
    def __init__(self, n): self.n = n
    def reply_address(self): return json.dumps({"n": self.n})
    async def send_text(self, text): pass
    async def show_progress(self, status, buttons=()): pass
    async def send_pictures(self, pictures, caption, buttons=()): pass

async def main():
    async with open_bot(load_settings(_env_file=None), poll_interval=0.2) as bot:
        users = [Sender("telegram", str(n), "", (str(n),), True) for n in range(6)]
        await asyncio.gather(*(
            bot.handle(user, Chat(n), "/imagegen a fox #slow") for n, user in enumerate(users)
        ))

asyncio.run(main())
"""

RESUME_JOBS = """
import asyncio, json, sqlite3, sys
from bot.config import load_settings
from imagebot.wiring import open_bot

class Chat:
    def __init__(self, n): self.n = n
    async def send_text(self, text): print("text", self.n, text, flush=True)
    async def show_progress(self, status, buttons=()): pass
    async def send_pictures(self, pictures, caption, buttons=()):
        print("delivered", self.n, flush=True)

async def chat_for(platform, address):
    return Chat(json.loads(address)["n"])

def pending(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM attempts WHERE status = 'pending'").fetchone()[0]

async def main():
    settings = load_settings(_env_file=None)
    async with open_bot(settings, poll_interval=0.2) as bot:
        sys.stdin.readline()  # both processes are up: resume together
        await bot.resume_jobs(chat_for, ["telegram"])
        while await asyncio.to_thread(pending, settings.database_path):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the last delivery follows its settlement

asyncio.run(main())
"""


async def script(source: str, env: dict[str, str], **pipes: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", source, env=env, cwd=str(ROOT), **pipes
    )


async def test_two_processes_restarting_on_one_ledger_resume_each_job_once(
    gateway: Sandbox, tmp_path: Path
) -> None:
    gateway.job_seconds = 4.0
    database = tmp_path / "ledger.sqlite3"
    env = cli_env(gateway.url, database)
    starting = await script(START_JOBS, env | {"MAX_CONCURRENT_JOBS": "6"})  # all at once

    async def all_kept() -> bool:
        if not await asyncio.to_thread(database.exists):
            return False
        try:
            async with aiosqlite.connect(database) as db:
                ((kept,),) = await db.execute_fetchall(
                    "SELECT count(*) FROM attempts WHERE job IS NOT NULL"
                )
        except sqlite3.OperationalError:  # the file exists, its tables not yet
            return False
        return bool(kept == 6)

    try:
        await until(all_kept)
    finally:
        starting.send_signal(signal.SIGKILL)
        await starting.wait()

    pipes = {"stdin": asyncio.subprocess.PIPE, "stdout": asyncio.subprocess.PIPE}
    resumers = [await script(RESUME_JOBS, env, **pipes) for _ in range(2)]
    await asyncio.sleep(2.0)  # both have opened the ledger
    outputs = await asyncio.gather(
        *(asyncio.wait_for(process.communicate(b"go\n"), 60) for process in resumers)
    )

    delivered = [
        line.split()[1]
        for out, _ in outputs
        for line in out.decode().splitlines()
        if line.startswith("delivered")
    ]
    assert sorted(delivered) == [str(n) for n in range(6)]  # each once, in one process or other
    assert all(process.returncode == 0 for process in resumers)
    assert gateway.payments_received == 6  # nothing new signed
    assert len(gateway.settlements) == 6
    assert await statuses(database) == ["settled"] * 6
    assert await settled_micro(database) == sum(s.amount_micro for s in gateway.settlements)


# A ledger another process holds locked during a slow job.

HOLD_WRITE_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


class Pictures(RecordingChat):
    """Notes when pictures arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    async def send_pictures(
        self, pictures: Sequence[Picture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        await super().send_pictures(pictures, caption, buttons)
        self.arrived.set()


async def test_a_ledger_locked_for_20_s_during_a_slow_job_still_delivers_and_settles_later(
    gateway: Sandbox, tmp_path: Path
) -> None:
    database = tmp_path / "ledger.sqlite3"
    settings = load_settings(_env_file=None, image_api_url=gateway.url, database_path=database)
    chat = Pictures()
    async with open_bot(settings, Wallet.create(), poll_interval=0.1, job_deadline=60) as bot:
        drawing = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a harbour #slow"))

        async def kept() -> bool:
            return await asyncio.to_thread(database.exists) and any(
                status == "pending" for status in await statuses(database)
            )

        await until(kept)
        await asyncio.sleep(0.3)  # the 202 job is in the ledger
        locker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HOLD_WRITE_LOCK,
            str(database),
            "20",
            stdout=asyncio.subprocess.PIPE,
        )
        assert locker.stdout is not None
        assert await locker.stdout.readline() == b"locked\n"
        locked_at = time.monotonic()

        await asyncio.wait_for(chat.arrived.wait(), 30)
        assert time.monotonic() - locked_at < 20  # delivered while the lock was held
        ((_, caption),) = chat.pictures
        assert "ledger is busy; this charge is kept and recorded shortly" in caption
        journal = SettlementJournal.beside(database)
        assert await asyncio.to_thread(journal.exists)
        assert await drawing is Outcome.DONE

        await locker.wait()

        async def settled() -> bool:
            return await statuses(database) == ["settled"]

        await until(settled, 30)
        assert not await asyncio.to_thread(journal.exists)
    assert await settled_micro(database) == sum(s.amount_micro for s in gateway.settlements)
    assert len(gateway.settlements) == 1


async def test_a_failed_request_the_ledger_would_not_close_is_closed_once_it_can_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway fails a request while another process holds the ledger's write lock: the
    user is told at once, and the row is failed as soon as the lock is gone, in the same run
    (left pending, it would count against the user's budget and jobs until a restart)."""
    monkeypatch.setattr(bot.ledger.sqlite, "BUSY_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(bot.service, "CLOSE_RETRY_SECONDS", 0.1)
    database = tmp_path / "ledger.sqlite3"
    asked, answer = asyncio.Event(), asyncio.Event()

    async def generations(request: web.Request) -> web.StreamResponse:
        asked.set()
        await answer.wait()
        return web.json_response({"error": "upstream is down"}, status=503)

    async with local.serving(("POST", "/v1/images/generations", generations)) as url:
        settings = load_settings(_env_file=None, image_api_url=url, database_path=database)
        async with open_bot(settings, Wallet.create()) as running:
            chat = RecordingChat()
            drawing = asyncio.create_task(running.handle(ALICE, chat, "/imagegen a fox"))
            await asyncio.wait_for(asked.wait(), 10)  # reserved: the row is pending
            locker = await asyncio.create_subprocess_exec(
                sys.executable, "-c", HOLD_WRITE_LOCK, str(database), "1.5",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert locker.stdout is not None
            assert await locker.stdout.readline() == b"locked\n"
            answer.set()
            assert await drawing is Outcome.REFUSED
            assert chat.texts and "Nothing was charged" in chat.texts[-1]
            assert await statuses(database) == ["pending"]  # refused while locked
            await locker.wait()

            async def failed() -> bool:
                return await statuses(database) == ["failed"]

            await until(failed, 10)


async def signed_by_a_stopped_run(database: Path, job: str | None = None) -> int:
    """A row whose $0.042 payment a run signed (and, with ``job``, whose slow job it kept)
    before it stopped; its id."""
    budget = Budget(10**9, 10**9, exempt=False)
    async with await SqliteLedger.open(database) as stopped:  # closed: its run counts as dead
        attempt = Attempt("telegram", "111", "@alice", "111", "imagegen", "flux", "1024x1024", 1)
        row = await stopped.reserve(attempt, 42_000, budget)
        await stopped.price(
            row, 42_000, budget, network="eip155:84532", payer="0xPAYER", nonce="0x" + "1" * 64,
            valid_before=2**31,
        )  # fmt: skip
        if job is not None:
            await stopped.start_job(row, job, "{}")
    return row


async def test_a_resumed_job_that_breaks_before_its_picture_is_unknown_and_its_user_told(
    tmp_path: Path,
) -> None:
    """A stopped run's slow job the next run cannot poll (its stored poll address is broken): it
    was paid for, so its row becomes unknown (the chain may tell), and its user hears of it."""
    database = tmp_path / "ledger.sqlite3"
    broken = json.dumps({"poll_url": "http://[::1", "header": None, "charged_micro": 42_000})
    await signed_by_a_stopped_run(database, job=broken)
    settings = load_settings(
        _env_file=None, image_api_url="http://127.0.0.1:9", database_path=database
    )
    chat = RecordingChat()

    async def chat_for(platform: str, address: str) -> RecordingChat:
        return chat

    async with open_bot(settings, Wallet.create()) as running:
        await running.resume_jobs(chat_for, ["telegram"])

        async def unknown() -> bool:
            return await statuses(database) == ["unknown"]

        await until(unknown, 10)
        await until(lambda: bool(chat.texts), 10)
    assert chat.texts == ["Something went wrong on my side. It may have been charged. "
                          "An admin can check /spend."]  # fmt: skip


async def test_a_settlement_journaled_before_a_crash_is_written_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A run paid, was charged, journaled the charge (its ledger was busy) and died: the next
    start writes the charge before it recovers the dead run's rows, so the row is settled, not
    taken for an unknown outcome."""
    database = tmp_path / "ledger.sqlite3"
    row = await signed_by_a_stopped_run(database)
    journal = SettlementJournal.beside(database)
    journal.write_text(json.dumps({"row": row, "micro": 42_000, "tx": "0x" + "ab" * 32}) + "\n")
    settings = load_settings(
        _env_file=None, image_api_url="http://127.0.0.1:9", database_path=database
    )

    async with open_bot(settings, Wallet.create()):
        pass

    async with aiosqlite.connect(database) as db:
        rows = await db.execute_fetchall("SELECT status, charged_micro, tx_hash FROM attempts")
    assert rows == [("settled", 42_000, "0x" + "ab" * 32)]
    assert not journal.exists()
    assert await settled_micro(database) == 42_000


# The chain's word on payments the gateway left unknown.


async def test_the_chain_settles_or_fails_what_the_gateway_left_open(
    gateway: Sandbox, tmp_path: Path
) -> None:
    rpc = FakeRpc()
    await rpc.start()
    database = tmp_path / "ledger.sqlite3"
    settings = load_settings(
        _env_file=None,
        image_api_url=gateway.url,
        database_path=database,
        base_sepolia_rpc_url=rpc.url,
    )
    try:
        rpc.block_timestamp = int(time.time())
        chat = RecordingChat()
        async with open_bot(settings, Wallet.create(), poll_interval=0.1) as bot:
            for word in ("#servererror", "#timeout"):
                assert await bot.handle(ALICE, chat, f"/imagegen a fox {word}") is Outcome.REFUSED
        # The gateway reported no charge, but the signed authorizations stay valid: with an RPC
        # URL the rows keep counting until the chain decides; the users were promised nothing.
        assert await statuses(database) == ["unknown", "unknown"]
        assert all("It reported no charge." in text for text in chat.texts)
        assert not any("Nothing was charged" in text for text in chat.texts)
        async with await open_ledger(settings) as ledger:
            first, second = sorted(await ledger.payments(Status.UNKNOWN), key=lambda p: p.row_id)
        assert first.payer is not None and first.nonce is not None
        assert second.valid_before is not None
        rpc.use(first.payer, first.nonce)  # settled on chain after all
        rpc.block_timestamp = second.valid_before + 1  # the other can never be used now

        told = RecordingChat()
        asked_for: list[tuple[str, str]] = []

        async def chat_for(platform: str, address: str) -> RecordingChat:
            asked_for.append((platform, address))
            return told

        async with open_bot(settings, Wallet.create()) as bot:  # a restart: resolved at start-up
            await bot.resume_jobs(chat_for, ["telegram"])  # as `imagebot run` does, adapters up

            async def resolved() -> bool:
                return await statuses(database) == ["settled", "failed"] and bool(told.texts)

            await until(resolved, 15)
    finally:
        await rpc.close()
    assert await settled_micro(database) == first.quoted_micro
    assert gateway.settlements == []  # the sandbox never settled: only the chain knew
    # Alice is told, where she asked, of the one the chain shows charged; not of the other.
    assert asked_for == [("telegram", chat.reply_address())]
    assert told.texts == [
        "Your earlier imagegen with google/nano-banana was charged $0.0525 after all, but no "
        "picture came back. An admin can check /spend."
    ]


async def test_a_paid_request_cut_off_by_the_stop_deadline_is_told_and_left_unknown(
    tmp_path: Path,
) -> None:
    """A paid answer that has not come when the stop's drain runs out: the user hears that it
    may have been charged, and the row counts as unknown until the chain decides."""
    gateway = Sandbox(latency=30.0)
    await gateway.start()
    database = tmp_path / "ledger.sqlite3"
    settings = load_settings(_env_file=None, image_api_url=gateway.url, database_path=database)
    chat = RecordingChat()
    try:
        async with open_bot(settings, Wallet.create()) as bot:
            drawing = asyncio.create_task(bot.handle(ALICE, chat, "/imagegen a fox"))
            await until(lambda: gateway.payments_received == 1)
            await bot.drain(seconds=0.2)
            assert drawing.done()
    finally:
        await gateway.close()
    assert chat.texts == [
        "The bot stopped before your picture arrived. It may have been charged. An admin can "
        "check /spend."
    ]
    assert await statuses(database) == ["unknown"]
    assert gateway.settlements == []
