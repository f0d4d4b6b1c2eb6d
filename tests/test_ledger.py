"""Every ledger backend against the same promises: atomic budgets in one and two processes,
exactly-once resolution, recovery, reports, the totals against the rows, and kept results.

Each test of the money API takes ``ledger_backend`` (or ``ledger``, opened on it), so a backend
added to ``BACKENDS`` runs this whole suite; SQLite-only tests are in test_ledger_sqlite.py,
PostgreSQL-only ones in test_ledger_postgres.py (this suite's PostgreSQL half needs the server
that ``postgres_url`` names, and is skipped without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol

import aiosqlite
import asyncpg
import pytest

from bot.ledger import (
    PAUSED_TEXT,
    RESULT_KEEP_DAYS,
    Attempt,
    Budget,
    BudgetExceeded,
    Change,
    Charge,
    Controls,
    DayTotal,
    KeptResult,
    Ledger,
    Linked,
    PostgresLedger,
    Report,
    SpendingPaused,
    SqliteLedger,
    Status,
    UserSpend,
    UserTotal,
)
from bot.ledger.common import (
    LINK_CODE_SECONDS,
    LINK_TRIES,
    LINK_TRY_SECONDS,
    RESULT_DELETE_BATCH,
    RESULT_SWEEP_SECONDS,
)

NOW = datetime(2026, 11, 21, 4, 38, 35, tzinfo=UTC)
PRICE = 21_000
ROOMY = Budget(user_daily_micro=10_000_000, global_daily_micro=100_000_000, exempt=False)
VALID_BEFORE = int(NOW.timestamp()) + 3600
THREE_FIT = 3 * PRICE + 7_000  # three reservations fit, a fourth does not
USER_REFUSAL = (
    "Daily limit reached: you have $0.007 left of your $0.07 per day; it resets at 00:00 UTC. "
    "Nothing was charged."
)
GLOBAL_REFUSAL = (
    "This bot has reached its daily spending limit; it resets at 00:00 UTC. Nothing was charged."
)
IN_FLIGHT_REFUSAL = "Wait for your previous image to finish first."


@dataclass
class Clock:
    """A settable UTC clock for ``open(clock=...)``."""

    at: datetime

    def __call__(self) -> datetime:
        return self.at


def utc_now() -> datetime:
    return datetime.now(UTC)


def attempt(
    user_id: str = "111",
    name: str = "@alice",
    platform: str = "telegram",
    n: int = 1,
    username: str | None = None,
) -> Attempt:
    return Attempt(
        platform, user_id, name, "chat-1", "imagegen", "openai/gpt-image-1", "1024x1024", n,
        username,
    )  # fmt: skip


def nonce(number: int) -> str:
    return f"0x{number:064x}"


async def price(ledger: Ledger, row: int, amount: int, budget: Budget, number: int) -> None:
    await ledger.price(
        row,
        amount,
        budget,
        network="eip155:8453",
        payer="0xPAYER",
        nonce=nonce(number),
        valid_before=VALID_BEFORE,
    )


async def rows_of(path: Path) -> list[dict[str, Any]]:
    async with aiosqlite.connect(path) as db:
        db.row_factory = aiosqlite.Row
        return [
            dict(row) for row in await db.execute_fetchall("SELECT * FROM attempts ORDER BY id")
        ]


class Backend(Protocol):
    """A fresh, empty store of one backend; picklable, so spawned processes can open it too."""

    integrity_error: type[Exception]  # what the store raises for a row its constraints refuse
    dead_after_seconds: float  # how long a killed process's run still counts as alive

    async def open(self, clock: Callable[[], datetime] = utc_now) -> Ledger:
        """A new ``Ledger`` (a new run) on this store."""

    async def rows(self) -> list[dict[str, Any]]:
        """The attempts table's rows by id, read past the ledger."""

    async def kept_tokens(self) -> set[str]:
        """The results table's tokens, read past the ledger."""


@dataclass(frozen=True)
class SqliteBackend:
    """A ledger file in a folder the ledger has to create."""

    path: Path
    integrity_error: ClassVar[type[Exception]] = sqlite3.IntegrityError
    dead_after_seconds: ClassVar[float] = 0.0  # its lock file's flock goes with the process

    async def open(self, clock: Callable[[], datetime] = utc_now) -> Ledger:
        return await SqliteLedger.open(self.path, clock=clock)

    async def rows(self) -> list[dict[str, Any]]:
        return await rows_of(self.path)

    async def kept_tokens(self) -> set[str]:
        async with aiosqlite.connect(self.path) as db:
            return {token for (token,) in await db.execute_fetchall("SELECT token FROM results")}


@dataclass(frozen=True)
class PostgresBackend:
    """A database of the test's own on the test server, with short leases."""

    url: str
    # A duplicate nonce is a UniqueViolationError, a fractional amount a CheckViolationError.
    integrity_error: ClassVar[type[Exception]] = asyncpg.IntegrityConstraintViolationError
    dead_after_seconds: ClassVar[float] = 2.0  # the lease

    async def open(self, clock: Callable[[], datetime] = utc_now) -> Ledger:
        return await PostgresLedger.open(
            self.url, clock=clock, lease_seconds=self.dead_after_seconds
        )

    async def rows(self) -> list[dict[str, Any]]:
        db = await asyncpg.connect(self.url)
        try:
            return [dict(row) for row in await db.fetch("SELECT * FROM attempts ORDER BY id")]
        finally:
            await db.close()

    async def kept_tokens(self) -> set[str]:
        db = await asyncpg.connect(self.url)
        try:
            return {token for (token,) in await db.fetch("SELECT token FROM results")}
        finally:
            await db.close()


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "postgresql": lambda request, _: PostgresBackend(request.getfixturevalue("postgres_url")),
    "sqlite": lambda _, folder: SqliteBackend(folder / "data" / "ledger.sqlite3"),
}


@pytest.fixture(params=sorted(BACKENDS))
def ledger_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn, on an empty store of this test's own."""
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
async def ledger(ledger_backend: Backend, clock: Clock) -> AsyncIterator[Ledger]:
    async with await ledger_backend.open(clock=clock) as opened:
        yield opened


def split(outcomes: list[Any]) -> tuple[list[int], list[BudgetExceeded]]:
    rows = [o for o in outcomes if isinstance(o, int)]
    refusals = [o for o in outcomes if isinstance(o, BudgetExceeded)]
    assert len(rows) + len(refusals) == len(outcomes), outcomes
    return rows, refusals


# Budgets


async def test_100_concurrent_reserves_fill_the_user_cap_exactly(
    ledger: Ledger, ledger_backend: Backend
) -> None:
    budget = Budget(user_daily_micro=THREE_FIT, global_daily_micro=10**9, exempt=False)
    outcomes = await asyncio.gather(
        *(ledger.reserve(attempt(), PRICE, budget) for _ in range(100)), return_exceptions=True
    )
    rows, refusals = split(outcomes)
    assert len(rows) == 3
    assert len(refusals) == 97
    assert {(r.scope, r.user_message, r.charged) for r in refusals} == {
        ("user", USER_REFUSAL, False)
    }
    stored = await ledger_backend.rows()
    assert [(r["status"], r["quoted_micro"], r["nonce"]) for r in stored] == [
        ("pending", PRICE, None)
    ] * 3


async def test_100_concurrent_reserves_fill_the_global_cap_exactly(ledger: Ledger) -> None:
    budget = Budget(user_daily_micro=10**9, global_daily_micro=THREE_FIT, exempt=False)
    outcomes = await asyncio.gather(
        *(ledger.reserve(attempt(str(i)), PRICE, budget) for i in range(100)),
        return_exceptions=True,
    )
    rows, refusals = split(outcomes)
    assert len(rows) == 3
    assert {(r.scope, r.user_message) for r in refusals} == {("global", GLOBAL_REFUSAL)}
    assert len(refusals) == 97
    assert (await ledger.report()).pending_micro == 3 * PRICE


def _reserve_from_another_process(backend: Backend, start: Any, results: Any) -> None:
    async def run() -> list[Any]:
        budget = Budget(user_daily_micro=THREE_FIT, global_daily_micro=10**9, exempt=False)
        async with await backend.open() as ledger:
            await asyncio.to_thread(start.wait)
            return await asyncio.gather(
                *(ledger.reserve(attempt(), PRICE, budget) for _ in range(50)),
                return_exceptions=True,
            )

    outcomes = asyncio.run(run())
    results.put(
        (
            sum(isinstance(o, int) for o in outcomes),
            sum(isinstance(o, BudgetExceeded) and o.user_message == USER_REFUSAL for o in outcomes),
        )
    )


async def test_two_processes_sharing_the_ledger_cannot_overspend(ledger_backend: Backend):
    async with await ledger_backend.open() as ledger:
        context = multiprocessing.get_context("spawn")
        start, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(
                target=_reserve_from_another_process, args=(ledger_backend, start, results)
            )
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        counts = [await asyncio.to_thread(results.get, timeout=60) for _ in workers]
        for worker in workers:
            await asyncio.to_thread(worker.join, 10)
        assert sum(reserved for reserved, _ in counts) == 3
        assert sum(refused for _, refused in counts) == 97
        assert all(reserved < 50 for reserved, _ in counts)
        assert (await ledger.report()).pending_micro == 3 * PRICE


async def test_admin_is_exempt_from_the_user_cap_but_not_the_global_cap(ledger: Ledger) -> None:
    admin = Budget(user_daily_micro=0, global_daily_micro=THREE_FIT, exempt=True)
    rows = [await ledger.reserve(attempt("1"), PRICE, admin) for _ in range(3)]
    assert len(rows) == 3
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt("1"), PRICE, admin)
    assert refused.value.scope == "global"


async def test_user_cap_zero_means_the_user_cannot_spend(ledger: Ledger) -> None:
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), PRICE, Budget(0, 10**9, exempt=False))
    assert refused.value.scope == "user"
    assert "you have $0.00 left of your $0.00 per day" in refused.value.user_message
    assert (await ledger.report()).users == []


async def test_user_cap_is_checked_before_the_global_cap(ledger: Ledger) -> None:
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), PRICE, Budget(PRICE - 1, PRICE - 1, exempt=False))
    assert refused.value.scope == "user"


async def test_failed_rows_free_their_budget(ledger: Ledger) -> None:
    budget = Budget(2 * PRICE, 10**9, exempt=False)
    first = await ledger.reserve(attempt(), PRICE, budget)
    await ledger.reserve(attempt(), PRICE, budget)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(attempt(), PRICE, budget)
    await ledger.fail(first, "gateway said 500")
    await ledger.reserve(attempt(), PRICE, budget)


async def test_unknown_rows_keep_counting_against_the_budget(ledger: Ledger) -> None:
    budget = Budget(2 * PRICE, 10**9, exempt=False)
    first = await ledger.reserve(attempt(), PRICE, budget)
    await price(ledger, first, PRICE, budget, 1)
    await ledger.mark_unknown(first, "connection lost after paying")
    await ledger.reserve(attempt(), PRICE, budget)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(attempt(), PRICE, budget)
    spend = await ledger.user_spend("telegram:111", budget)
    assert (spend.total_micro, spend.unknown_micro, spend.left_today_micro) == (0, 2 * PRICE, 0)


async def test_settled_rows_count_at_the_charged_amount(ledger: Ledger) -> None:
    budget = Budget(100_000, 10**9, exempt=False)
    cheaper = await ledger.reserve(attempt(), 60_000, budget)
    await ledger.settle(cheaper, 30_000, "0xtx1")
    dearer = await ledger.reserve(attempt(), 70_000, budget)  # 30,000 + 70,000 fits exactly
    await ledger.settle(dearer, 70_001, "0xtx2")
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), 1, budget)
    assert "you have $0.00 left" in refused.value.user_message
    assert (await ledger.report()).total_micro == 100_001


async def test_amounts_must_be_integers(ledger: Ledger, ledger_backend: Backend) -> None:
    with pytest.raises(ledger_backend.integrity_error):
        await ledger.reserve(attempt(), 0.5, ROOMY)  # type: ignore[arg-type]


async def test_resolving_a_row_twice_is_an_error(ledger: Ledger) -> None:
    row = await ledger.reserve(attempt(), PRICE, ROOMY)
    await ledger.settle(row, PRICE, "0xtx")
    with pytest.raises(ValueError, match="is not pending or unknown"):
        await ledger.fail(row, "late")
    with pytest.raises(ValueError, match="is not pending"):
        await ledger.mark_unknown(row, "late")
    with pytest.raises(ValueError):
        await ledger.settle(12345, PRICE, None)


async def test_a_late_receipt_settles_an_unknown_row(ledger: Ledger) -> None:
    row = await ledger.reserve(attempt(), PRICE, ROOMY)
    await ledger.mark_unknown(row, "timeout")
    await ledger.settle(row, PRICE, "0xlate")
    report = await ledger.report()
    assert (report.total_micro, report.pending_micro) == (PRICE, 0)


# Requests in flight (Budget.max_pending)


async def test_a_user_with_max_pending_requests_in_flight_is_refused(ledger: Ledger) -> None:
    budget = Budget(10**9, 10**9, exempt=False, max_pending=2)
    first = await ledger.reserve(attempt(), PRICE, budget)
    second = await ledger.reserve(attempt(), PRICE, budget)
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), PRICE, budget)
    assert (refused.value.scope, refused.value.user_message) == ("pending", IN_FLIGHT_REFUSAL)
    admin = Budget(0, 10**9, exempt=True, max_pending=2)
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), PRICE, admin)
    assert refused.value.scope == "pending"
    await ledger.reserve(attempt("222"), PRICE, budget)  # another user's requests are their own

    await ledger.settle(first, PRICE, "0xtx")
    third = await ledger.reserve(attempt(), PRICE, budget)
    await ledger.mark_unknown(second, "lost")  # an unknown row is no longer in flight
    await ledger.reserve(attempt(), PRICE, budget)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(attempt(), PRICE, budget)
    await ledger.fail(third, "refused")
    await ledger.reserve(attempt(), PRICE, budget)
    uncapped = Budget(10**9, 10**9, exempt=False)
    await ledger.reserve(attempt(), PRICE, uncapped)


async def test_100_concurrent_reserves_stop_at_max_pending(ledger: Ledger) -> None:
    budget = Budget(10**9, 10**9, exempt=False, max_pending=3)
    outcomes = await asyncio.gather(
        *(ledger.reserve(attempt(), PRICE, budget) for _ in range(100)), return_exceptions=True
    )
    rows, refusals = split(outcomes)
    assert len(rows) == 3
    assert {(r.scope, r.user_message) for r in refusals} == {("pending", IN_FLIGHT_REFUSAL)}


async def test_a_user_over_the_cap_and_in_flight_is_told_to_wait(ledger: Ledger) -> None:
    budget = Budget(PRICE, 10**9, exempt=False, max_pending=1)
    row = await ledger.reserve(attempt(), PRICE, budget)
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), PRICE, budget)
    assert refused.value.scope == "pending"
    await ledger.settle(row, PRICE, "0xtx")
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt(), PRICE, budget)
    assert refused.value.scope == "user"


# price()


async def test_price_with_the_reserved_amount_is_not_rechecked(
    ledger: Ledger, ledger_backend: Backend
) -> None:
    row = await ledger.reserve(attempt(), PRICE, ROOMY)
    nothing_left = Budget(0, 0, exempt=False)
    await price(ledger, row, PRICE, nothing_left, 1)
    (stored,) = await ledger_backend.rows()
    assert (stored["network"], stored["payer"], stored["nonce"]) == (
        "eip155:8453",
        "0xPAYER",
        nonce(1),
    )


async def test_a_higher_price_that_no_longer_fits_leaves_the_row_unchanged(
    ledger: Ledger, ledger_backend: Backend
) -> None:
    budget = Budget(50_000, 10**9, exempt=False)
    row = await ledger.reserve(attempt(), 40_000, budget)
    before = await ledger_backend.rows()
    with pytest.raises(BudgetExceeded) as refused:
        await price(ledger, row, 50_001, budget, 1)
    assert refused.value.scope == "user"
    assert "you have $0.05 left of your $0.05 per day" in refused.value.user_message
    assert await ledger_backend.rows() == before
    with pytest.raises(BudgetExceeded) as refused:
        await price(ledger, row, 50_000, Budget(10**9, 45_000, exempt=False), 1)
    assert refused.value.scope == "global"
    # The row's own reservation is not counted twice: 50,000 replaces 40,000.
    await price(ledger, row, 50_000, budget, 1)
    (stored,) = await ledger_backend.rows()
    assert (stored["quoted_micro"], stored["nonce"]) == (50_000, nonce(1))
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(attempt(), 1, budget)


async def test_nothing_is_priced_while_spending_is_paused_whenever_its_command_came(
    ledger: Ledger, ledger_backend: Backend
) -> None:
    """A command taken before the pause (waiting in line, downloading) is refused at its price,
    the last step before signing: its row stays unsigned, to be failed."""
    row = await ledger.reserve(attempt(), PRICE, ROOMY)
    await ledger.set_paused("telegram:999", True)
    before = await ledger_backend.rows()

    with pytest.raises(SpendingPaused) as refused:
        await price(ledger, row, PRICE, ROOMY, 1)

    assert refused.value.user_message == PAUSED_TEXT
    assert await ledger_backend.rows() == before
    await ledger.set_paused("telegram:999", False)
    await price(ledger, row, PRICE, ROOMY, 1)
    (stored,) = await ledger_backend.rows()
    assert stored["nonce"] == nonce(1)


async def test_a_nonce_is_recorded_once(ledger: Ledger, ledger_backend: Backend) -> None:
    first = await ledger.reserve(attempt(), PRICE, ROOMY)
    second = await ledger.reserve(attempt(), PRICE, ROOMY)
    await price(ledger, first, PRICE, ROOMY, 7)
    with pytest.raises(ledger_backend.integrity_error):
        await price(ledger, second, PRICE, ROOMY, 7)
    with pytest.raises(ValueError, match="not pending and unpriced"):
        await price(ledger, first, PRICE, ROOMY, 8)
    stored = await ledger_backend.rows()
    assert [row["nonce"] for row in stored] == [nonce(7), None]


# recover()


def _reserve_and_hang(backend: Backend, ready: Any) -> None:
    async def run() -> None:
        ledger = await backend.open()
        signed = await ledger.reserve(attempt("dead"), PRICE, ROOMY)
        await price(ledger, signed, PRICE, ROOMY, 666)
        await ledger.reserve(attempt("dead"), PRICE, ROOMY)
        ready.put("ready")
        await asyncio.sleep(600)

    asyncio.run(run())


async def test_recover_resolves_only_the_rows_of_dead_processes(ledger_backend: Backend) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    doomed = context.Process(target=_reserve_and_hang, args=(ledger_backend, ready))
    async with await ledger_backend.open() as live, await ledger_backend.open() as recovering:
        live_signed = await live.reserve(attempt("live"), PRICE, ROOMY)
        await price(live, live_signed, PRICE, ROOMY, 1)
        await live.reserve(attempt("live"), PRICE, ROOMY)
        own = await recovering.reserve(attempt("own"), PRICE, ROOMY)
        doomed.start()
        assert await asyncio.to_thread(ready.get, timeout=60) == "ready"
        doomed.kill()
        await asyncio.to_thread(doomed.join, 10)
        await asyncio.sleep(ledger_backend.dead_after_seconds)

        assert await recovering.recover() == (1, 1)
        assert await recovering.recover() == (0, 0)
        statuses = {
            (row["user_id"], row["nonce"] is not None): (row["status"], row["error"])
            for row in await ledger_backend.rows()
        }
        assert statuses == {
            ("live", True): ("pending", None),
            ("live", False): ("pending", None),
            ("own", False): ("pending", None),
            ("dead", True): ("unknown", "the bot stopped before learning the outcome"),
            ("dead", False): ("failed", "the bot stopped before signing"),
        }
        await recovering.fail(own, "done")
        await live.settle(live_signed, PRICE, "0xtx")


async def test_recover_resolves_the_rows_of_a_closed_ledger(ledger_backend: Backend) -> None:
    async with await ledger_backend.open() as closed:
        signed = await closed.reserve(attempt(), PRICE, ROOMY)
        await price(closed, signed, PRICE, ROOMY, 1)
        await closed.reserve(attempt(), PRICE, ROOMY)
    async with await ledger_backend.open() as ledger:
        assert await ledger.recover() == (1, 1)
        report = await ledger.report()
    assert (report.total_micro, report.pending_micro) == (0, PRICE)


# Open jobs: a 202 job outlives the run that started it


async def _open_job(ledger: Ledger, number: int) -> int:
    row = await ledger.reserve(attempt(f"user{number}"), PRICE, ROOMY)
    await price(ledger, row, PRICE, ROOMY, number)
    await ledger.start_job(row, f'{{"poll_url": "/jobs/{number}"}}', f'{{"chat": {number}}}')
    return row


async def test_open_jobs_survive_recovery_and_are_claimed_once(ledger_backend: Backend) -> None:
    async with await ledger_backend.open() as stopped:
        rows = [await _open_job(stopped, number) for number in (1, 2, 3)]
        plain = await stopped.reserve(attempt(), PRICE, ROOMY)
        await price(stopped, plain, PRICE, ROOMY, 9)
        with pytest.raises(ValueError):
            await stopped.start_job(plain + 99, "{}", "{}")
    async with await ledger_backend.open() as first, await ledger_backend.open() as second:
        assert await first.recover() == (1, 0)  # the plain signed row; the jobs stay open
        everywhere = ("telegram", "discord")
        claims = await asyncio.gather(
            first.claim_jobs(everywhere),
            second.claim_jobs(everywhere),
            first.claim_jobs(everywhere),
        )
        claimed = [job.row_id for jobs in claims for job in jobs]
        assert sorted(claimed) == rows  # every job once, by one of the two runs
        job = next(job for jobs in claims for job in jobs if job.row_id == rows[0])
        assert (job.user_id, job.quoted_micro, job.job, job.reply_to) == (
            "user1",
            PRICE,
            '{"poll_url": "/jobs/1"}',
            '{"chat": 1}',
        )
        assert await second.claim_jobs(everywhere) == []  # the claimers are alive
        owner = first if any(job.row_id == rows[0] for job in claims[0] + claims[2]) else second
        await owner.settle(rows[0], PRICE, "0xtx")
    async with await ledger_backend.open() as later:
        assert await later.claim_jobs(["discord"]) == []  # asked on Telegram
        claimed_later = await later.claim_jobs(["telegram"])
        assert sorted(job.row_id for job in claimed_later) == rows[1:]


async def test_payments_lists_rows_newest_first_with_what_the_chain_needs(ledger: Ledger) -> None:
    settled = await ledger.reserve(attempt(), PRICE, ROOMY)
    await price(ledger, settled, PRICE, ROOMY, 1)
    await ledger.settle(settled, PRICE, "0xtx")
    unknown = await ledger.reserve(attempt("222", "bob"), PRICE, ROOMY)
    await price(ledger, unknown, PRICE, ROOMY, 2)
    await ledger.mark_unknown(unknown, "lost answer")

    listed = await ledger.payments()
    assert [payment.row_id for payment in listed] == [unknown, settled]
    only = await ledger.payments(Status.UNKNOWN)
    assert [(p.user, p.status, p.nonce, p.valid_before, p.error) for p in only] == [
        ("telegram:222", Status.UNKNOWN, nonce(2), VALID_BEFORE, "lost answer")
    ]
    assert (await ledger.payment(settled)).tx_hash == "0xtx"
    with pytest.raises(KeyError):
        await ledger.payment(999)


# Albums: gathered across every run sharing the ledger

ALBUM = "telegram:chat-1:album-7"


async def test_an_album_split_across_replicas_is_taken_whole_by_exactly_one(
    ledger_backend: Backend, clock: Clock
) -> None:
    async with (
        await ledger_backend.open(clock=clock) as one,
        await ledger_backend.open(clock=clock) as two,
    ):
        await one.add_album_part(ALBUM, '{"part": 1}')
        clock.at += timedelta(seconds=0.5)
        await two.add_album_part(ALBUM, '{"part": 2}')
        await two.add_album_part("telegram:chat-1:album-8", "other")
        clock.at += timedelta(seconds=0.5)
        assert await one.take_album(ALBUM, 0.8) is None  # the newest part came 0.5 s ago
        clock.at += timedelta(seconds=0.5)
        taken = await asyncio.gather(*(ledger.take_album(ALBUM, 0.8) for ledger in [one, two] * 3))
        assert sorted(taken, key=len) == [[]] * 5 + [['{"part": 1}', '{"part": 2}']]
        assert await two.take_album(ALBUM, 0.8) == []
        assert await one.take_album("telegram:chat-1:album-8", 0.8) == ["other"]


async def test_an_album_keeps_ten_parts_for_an_hour(ledger: Ledger, clock: Clock) -> None:
    for number in range(12):
        await ledger.add_album_part(ALBUM, str(number))
    clock.at += timedelta(seconds=1)
    assert await ledger.take_album(ALBUM, 0.8) == [str(number) for number in range(10)]
    await ledger.add_album_part(ALBUM, "kept")
    clock.at += timedelta(minutes=59)
    await ledger.add_album_part("telegram:chat-1:album-8", "forgotten")  # adding prunes
    assert await ledger.take_album(ALBUM, 0.8) == ["kept"]
    clock.at += timedelta(minutes=61)
    await ledger.add_album_part("telegram:chat-1:album-9", "new")
    assert await ledger.take_album("telegram:chat-1:album-8", 0.8) == []


# Kept results: the requests behind a result's buttons, under unguessable tokens

# Long, astral, joined, combining, right-to-left, multi-line: what a prompt may hold.
PROMPT = "a 🦊 fox, 👩‍🚀 astronaut, 雪の中の狐, e\u0301te\u0301, «שלום»\n\tnext line " + "ж" * 3_000
TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")


def kept(prompt: str = PROMPT, quality: str | None = None, user_id: str = "111") -> KeptResult:
    return KeptResult(
        "telegram", user_id, "img2img", prompt, "openai/gpt-image-1", "1024x1024", 2, quality,
        '[{"file_id": "AgAC-in"}]', '[{"file_id": "AgAC-out-1"}, {"file_id": "AgAC-out-2"}]', NOW,
    )  # fmt: skip


async def test_a_kept_result_comes_back_exactly_dated_by_the_ledger_clock(
    ledger: Ledger, clock: Clock
) -> None:
    clock.at += timedelta(seconds=5)
    token = await ledger.keep_result(kept())
    hd = await ledger.keep_result(replace(kept("plain"), command="imagegen", quality="hd"))
    assert await ledger.kept_result(token) == replace(kept(), created_at=clock.at)
    assert await ledger.kept_result(hd) == replace(
        kept("plain"), command="imagegen", quality="hd", created_at=clock.at
    )
    with pytest.raises(ValueError, match="U\\+0000"):  # PostgreSQL's text cannot hold it
        await ledger.keep_result(kept("a\x00b"))


async def test_tokens_are_22_url_safe_characters_and_never_collide(ledger: Ledger) -> None:
    results = [kept(f"prompt {number}") for number in range(50)]
    tokens = await asyncio.gather(*(ledger.keep_result(result) for result in results))
    assert all(TOKEN.fullmatch(token) for token in tokens)
    assert len(set(tokens)) == len(tokens)
    assert await asyncio.gather(*(ledger.kept_result(token) for token in tokens)) == results


async def test_replicas_see_each_others_results(ledger_backend: Backend, clock: Clock) -> None:
    async with (
        await ledger_backend.open(clock=clock) as one,
        await ledger_backend.open(clock=clock) as two,
    ):
        from_one = await one.keep_result(kept("one"))
        from_two = await two.keep_result(kept("two", user_id="222"))
        assert await two.kept_result(from_one) == kept("one")
        assert await one.kept_result(from_two) == kept("two", user_id="222")


async def test_unknown_forged_and_malformed_tokens_find_nothing(ledger_backend: Backend) -> None:
    async with await ledger_backend.open() as ledger:
        token = await ledger.keep_result(kept())
        forged = [token.swapcase(), token[:-1] + ("B" if token[-1] == "A" else "A"), "A" * 22]
        malformed = [
            "", token[:-1], token + "A", token + "=", token + "\n", " " + token[1:], "é" * 22,
            token[:-1] + "+", token[:-1] + "/", token[:11] + "\x00" + token[12:],
        ]  # fmt: skip
        for other in forged + malformed:
            assert await ledger.kept_result(other) is None, other
    for other in malformed:  # refused without a query: the store is closed
        assert await ledger.kept_result(other) is None, other
    with pytest.raises((ValueError, asyncpg.InterfaceError)):  # what a closed store raises
        await ledger.kept_result(token)


async def test_a_result_expires_after_keep_days_and_a_later_keep_deletes_it(
    ledger: Ledger, ledger_backend: Backend, clock: Clock
) -> None:
    old = await ledger.keep_result(kept("old"))
    clock.at += timedelta(days=RESULT_KEEP_DAYS)
    assert await ledger.kept_result(old) == kept("old")
    clock.at += timedelta(seconds=1)
    assert await ledger.kept_result(old) is None
    assert await ledger_backend.kept_tokens() == {old}  # until a keep deletes it
    new = await ledger.keep_result(kept("new"))
    assert await ledger_backend.kept_tokens() == {new}


async def test_a_keep_deletes_a_bounded_batch_of_expired_results(
    ledger: Ledger, ledger_backend: Backend, clock: Clock
) -> None:
    for number in range(RESULT_DELETE_BATCH + 3):
        await ledger.keep_result(kept(f"old {number}"))
    clock.at += timedelta(days=RESULT_KEEP_DAYS, seconds=1)
    first = await ledger.keep_result(kept("new 1"))
    assert len(await ledger_backend.kept_tokens() - {first}) == 3
    second = await ledger.keep_result(kept("new 2"))  # within the minute: no sweep
    assert len(await ledger_backend.kept_tokens() - {first, second}) == 3
    clock.at += timedelta(seconds=RESULT_SWEEP_SECONDS)
    third = await ledger.keep_result(kept("new 3"))
    assert await ledger_backend.kept_tokens() == {first, second, third}


async def test_a_result_kept_before_a_restart_is_found_after_it(
    ledger_backend: Backend, clock: Clock
) -> None:
    async with await ledger_backend.open(clock=clock) as before:
        token = await before.keep_result(kept())
    clock.at += timedelta(days=1)
    async with await ledger_backend.open(clock=clock) as after:
        assert await after.kept_result(token) == kept()


# Cancels asked across runs


async def test_a_cancel_asked_in_one_run_is_told_once_to_the_run_holding_the_row(
    ledger_backend: Backend, clock: Clock
) -> None:
    async with (
        await ledger_backend.open(clock=clock) as holder,
        await ledger_backend.open(clock=clock) as other,
    ):
        first = await holder.reserve(attempt(), PRICE, ROOMY)
        second = await holder.reserve(attempt(), PRICE, ROOMY)
        bobs = await holder.reserve(attempt("222", "@bob"), PRICE, ROOMY)
        done = await holder.reserve(attempt(), PRICE, ROOMY)
        await holder.fail(done, "declined")

        assert await other.ask_cancel("telegram:222", first) == []  # not bob's
        assert await other.ask_cancel("telegram:111", done) == []  # no longer pending
        assert await other.ask_cancel("telegram:111", first) == [first]
        assert await holder.cancels_asked([bobs]) == []
        assert await holder.cancels_asked([first, second, bobs]) == [first]
        assert await holder.cancels_asked([first, second, bobs]) == []  # told once

        assert await other.ask_cancel("telegram:111") == [first, second]  # all of alice's
        assert await other.ask_cancel("telegram:111") == [first, second]  # asked again: no harm
        assert await holder.cancels_asked([first, second, bobs]) == [first, second]


async def test_a_cancel_nobody_took_is_deleted_after_an_hour(ledger: Ledger, clock: Clock) -> None:
    row = await ledger.reserve(attempt(), PRICE, ROOMY)
    assert await ledger.ask_cancel("telegram:111", row) == [row]
    clock.at += timedelta(hours=1, seconds=1)
    await ledger.ask_cancel("telegram:999")  # asks nothing, deletes what is old
    assert await ledger.cancels_asked([row]) == []


# What admins set from the chat, and people linked across platforms

TIGHT = Budget(user_daily_micro=THREE_FIT, global_daily_micro=100_000_000, exempt=False)


async def test_pause_limits_and_the_default_are_shared_and_every_change_is_recorded(
    ledger_backend: Backend, clock: Clock
) -> None:
    async with (
        await ledger_backend.open(clock=clock) as one,
        await ledger_backend.open(clock=clock) as two,
    ):
        assert await two.controls("telegram:111") == Controls(False, None, None, None)
        await one.set_paused("telegram:999", True)
        await one.set_daily_limit("telegram:999", "telegram:111", 250_000)
        clock.at += timedelta(minutes=1)
        await one.set_daily_limit("telegram:999", None, 2_000_000)
        assert await two.controls("telegram:111") == Controls(True, 2_000_000, 250_000, None)
        assert await two.controls("telegram:222") == Controls(True, 2_000_000, None, None)

        await two.set_paused("discord:5", False)
        await two.set_daily_limit("discord:5", "telegram:111", None)
        assert await one.controls("telegram:111") == Controls(False, 2_000_000, None, None)
        later = NOW + timedelta(minutes=1)
        assert await one.changes() == [
            Change(later, "discord:5", "budget reset", "telegram:111", None),
            Change(later, "discord:5", "resume", None, None),
            Change(later, "telegram:999", "budget default", None, 2_000_000),
            Change(NOW, "telegram:999", "budget", "telegram:111", 250_000),
            Change(NOW, "telegram:999", "pause", None, None),
        ]
        assert len(await one.changes(limit=2)) == 2


async def test_of_all_runs_one_is_told_the_balance_turned_low_until_it_is_seen_above(
    ledger_backend: Backend,
) -> None:
    async with await ledger_backend.open() as one, await ledger_backend.open() as two:
        assert not await one.note_low_balance(False)
        turned = await asyncio.gather(one.note_low_balance(True), two.note_low_balance(True))
        assert sorted(turned) == [False, True]
        assert not await two.note_low_balance(True)  # still low: no second warning
        assert not await one.note_low_balance(False)  # a top-up
        assert await two.note_low_balance(True)


async def test_a_code_links_two_platforms_once_and_they_share_one_budget(
    ledger: Ledger, clock: Clock
) -> None:
    code = await ledger.new_link_code("telegram:111")
    assert re.fullmatch(r"[A-Z2-9]{8}", code)
    assert await ledger.redeem_link_code("telegram:222", code) is Linked.SAME_PLATFORM
    assert await ledger.redeem_link_code("discord:5", code) is Linked.LINKED
    assert await ledger.redeem_link_code("discord:6", code) is Linked.WRONG  # used
    person = (await ledger.controls("discord:5")).person
    assert person == (await ledger.controls("telegram:111")).person == "telegram:111"

    await ledger.reserve(attempt("111"), PRICE, TIGHT)
    await ledger.reserve(attempt("5", platform="discord"), PRICE, TIGHT)
    await ledger.reserve(attempt("111"), PRICE, TIGHT)
    with pytest.raises(BudgetExceeded) as refused:  # the fourth, on either platform
        await ledger.reserve(attempt("5", platform="discord"), PRICE, TIGHT)
    assert refused.value.scope == "user"
    await ledger.reserve(attempt("222"), PRICE, TIGHT)  # someone else

    spend = await ledger.user_spend("discord:5", TIGHT)
    assert spend.left_today_micro == THREE_FIT - 3 * PRICE

    await ledger.set_daily_limit("telegram:999", "discord:5", 100_000)  # set on the person
    assert (await ledger.controls("telegram:111")).own_daily_micro == 100_000
    assert await ledger.unlink("discord:5")
    assert not await ledger.unlink("discord:5")
    assert await ledger.controls("telegram:111") == Controls(False, None, 100_000, None)
    assert (await ledger.controls("discord:5")).own_daily_micro is None
    await ledger.reserve(attempt("5", platform="discord"), PRICE, TIGHT)  # its own budget again


async def test_pending_requests_count_for_the_person(ledger: Ledger) -> None:
    code = await ledger.new_link_code("discord:5")
    assert await ledger.redeem_link_code("telegram:111", code) is Linked.LINKED
    capped = replace(ROOMY, max_pending=2)
    await ledger.reserve(attempt("111"), PRICE, capped)
    await ledger.reserve(attempt("5", platform="discord"), PRICE, capped)
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(attempt("111"), PRICE, capped)
    assert refused.value.scope == "pending"


async def test_a_person_has_one_identity_per_platform(ledger: Ledger) -> None:
    first = await ledger.new_link_code("telegram:111")
    assert await ledger.redeem_link_code("discord:5", first) is Linked.LINKED
    second = await ledger.new_link_code("telegram:111")
    assert await ledger.redeem_link_code("discord:6", second) is Linked.ALREADY
    third = await ledger.new_link_code("telegram:222")
    assert await ledger.redeem_link_code("discord:5", third) is Linked.ALREADY


async def test_codes_expire_and_wrong_ones_are_limited_per_identity(
    ledger: Ledger, clock: Clock
) -> None:
    code = await ledger.new_link_code("telegram:111")
    clock.at += timedelta(seconds=LINK_CODE_SECONDS + 1)
    assert await ledger.redeem_link_code("discord:5", code) is Linked.WRONG
    fresh = await ledger.new_link_code("telegram:111")
    for _ in range(LINK_TRIES - 1):
        assert await ledger.redeem_link_code("discord:5", "WRONGONE") is Linked.WRONG
    assert await ledger.redeem_link_code("discord:5", fresh) is Linked.TOO_MANY
    assert await ledger.redeem_link_code("discord:6", fresh) is Linked.LINKED  # another one
    clock.at += timedelta(seconds=LINK_TRY_SECONDS + 1)
    again = await ledger.new_link_code("telegram:222")
    assert await ledger.redeem_link_code("discord:5", again) is Linked.LINKED


async def test_the_report_names_each_linked_users_person(ledger: Ledger) -> None:
    code = await ledger.new_link_code("telegram:111")
    await ledger.redeem_link_code("discord:5", code)
    for user_id, platform in (("111", "telegram"), ("5", "discord"), ("222", "telegram")):
        row = await ledger.reserve(attempt(user_id, platform=platform), PRICE, ROOMY)
        await ledger.settle(row, PRICE, None)
    persons = {line.user: line.person for line in (await ledger.report()).users}
    assert persons == {
        "telegram:111": "telegram:111",
        "discord:5": "telegram:111",
        "telegram:222": None,
    }
    assert {line.user: line.person for line in (await ledger.report(since=NOW.date())).users} == (
        persons
    )


async def test_charges_list_each_settled_payment_in_order_filtered(
    ledger: Ledger, clock: Clock
) -> None:
    first = await ledger.reserve(attempt("111"), PRICE, ROOMY)
    await ledger.settle(first, PRICE, "0xaa")
    clock.at += timedelta(days=1)
    second = await ledger.reserve(attempt("5", platform="discord", n=2), PRICE, ROOMY)
    await ledger.settle(second, 2 * PRICE, None)
    failed = await ledger.reserve(attempt("111"), PRICE, ROOMY)
    await ledger.fail(failed, "declined")
    await ledger.reserve(attempt("111"), PRICE, ROOMY)  # pending

    every = [charge async for charge in ledger.charges()]
    model = "openai/gpt-image-1"
    assert every == [
        Charge(NOW, "telegram:111", "imagegen", model, "1024x1024", 1, PRICE, "0xaa"),
        Charge(clock.at, "discord:5", "imagegen", model, "1024x1024", 2, 2 * PRICE, None),
    ]
    later = [charge.user async for charge in ledger.charges(since=clock.at.date())]
    assert later == ["discord:5"]
    assert [c.user async for c in ledger.charges(user="telegram:111")] == ["telegram:111"]


async def test_daily_spend_per_user_and_per_model(ledger: Ledger, clock: Clock) -> None:
    for user_id, model in (("111", "a/one"), ("111", "a/two"), ("222", "a/one")):
        row = await ledger.reserve(replace(attempt(user_id, f"@u{user_id}"), model=model), PRICE,
                                   ROOMY)  # fmt: skip
        await ledger.settle(row, PRICE, None)
    clock.at += timedelta(days=1)
    row = await ledger.reserve(attempt("111", "@u111"), PRICE, ROOMY)
    await ledger.settle(row, PRICE, None)
    today, yesterday = clock.at.date(), NOW.date()
    by_user = sorted(await ledger.daily_spend(yesterday), key=lambda t: (t.day, t.key))
    assert by_user == [
        DayTotal(yesterday, "@u111", 2 * PRICE),
        DayTotal(yesterday, "@u222", PRICE),
        DayTotal(today, "@u111", PRICE),
    ]
    assert await ledger.daily_spend(today) == [DayTotal(today, "@u111", PRICE)]
    by_model = sorted(
        await ledger.daily_spend(yesterday, by_model=True), key=lambda t: (t.day, t.key)
    )
    assert by_model == [
        DayTotal(yesterday, "a/one", 2 * PRICE),
        DayTotal(yesterday, "a/two", PRICE),
        DayTotal(today, "openai/gpt-image-1", PRICE),
    ]


# Reports


async def test_user_spend_across_a_utc_day_and_month_boundary(ledger: Ledger, clock: Clock):
    budget = Budget(100_000, 150_000, exempt=False)

    async def spend(amount: int, user: str = "111") -> None:
        await ledger.settle(await ledger.reserve(attempt(user), amount, budget), amount, None)

    clock.at = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)
    await spend(10_000)
    await spend(90_000)
    with pytest.raises(BudgetExceeded):
        await spend(1)
    clock.at = datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC)  # a new day: the caps start again
    await spend(20_000)
    await spend(100_000, "222")
    feb_1 = await ledger.user_spend("telegram:111", budget)
    assert (feb_1.today_micro, feb_1.month_micro, feb_1.total_micro) == (20_000, 20_000, 120_000)
    assert feb_1.left_today_micro == 30_000  # the global cap has 30,000 left that day
    clock.at = datetime(2026, 2, 2, 10, 0, tzinfo=UTC)
    await spend(40_000)
    row = await ledger.reserve(attempt(), 5_000, budget)
    await ledger.mark_unknown(row, "lost")

    assert await ledger.user_spend("telegram:111", budget) == UserSpend(
        user="telegram:111",
        display_name="@alice",
        today_micro=40_000,
        month_micro=60_000,
        total_micro=160_000,
        images=4,
        requests=4,
        unknown_micro=5_000,
        left_today_micro=55_000,
        last_at=datetime(2026, 2, 2, 10, 0, tzinfo=UTC),
    )
    admin = Budget(100_000, 150_000, exempt=True)
    assert (await ledger.user_spend("telegram:111", admin)).left_today_micro is None


async def test_user_spend_of_an_unknown_user_is_zero(ledger: Ledger) -> None:
    assert await ledger.user_spend("discord:9", ROOMY) == UserSpend(
        "discord:9", "", 0, 0, 0, 0, 0, 0, ROOMY.user_daily_micro, None
    )


async def test_report_filters_by_day_and_user(ledger: Ledger, clock: Clock) -> None:
    async def spend(user: str, amount: int, at: datetime, n: int = 1) -> int:
        clock.at = at
        row = await ledger.reserve(attempt(user, name=f"@u{user}", n=n), amount, ROOMY)
        await ledger.settle(row, amount, None)
        return row

    before = datetime(2026, 3, 9, 23, 59, 59, tzinfo=UTC)
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    later = datetime(2026, 3, 11, 8, 0, tzinfo=UTC)
    await spend("1", 10_000, before)
    await spend("1", 20_000, midnight, n=2)
    await spend("2", 30_000, later)
    await spend("3", 20_000, later)
    unknown = await ledger.reserve(attempt("3", name="@u3"), 5_000, ROOMY)
    await ledger.mark_unknown(unknown, "lost")
    for user in ("4", "2"):  # a user with only failed rows, and a failure after a success
        clock.at = later + timedelta(hours=1)
        await ledger.fail(await ledger.reserve(attempt(user, name=f"@u{user}"), PRICE, ROOMY), "no")

    everything = await ledger.report()
    assert [(u.user, u.last_at) for u in everything.users] == [
        ("telegram:1", midnight),
        ("telegram:2", later),
        ("telegram:3", later),
    ]
    assert (everything.total_micro, everything.pending_micro) == (80_000, 5_000)

    since = await ledger.report(since=date(2026, 3, 10))
    assert since == Report(
        total_micro=70_000,
        pending_micro=5_000,
        users=[
            UserTotal("telegram:2", "@u2", 1, 1, 30_000, 0, later),
            UserTotal("telegram:1", "@u1", 1, 2, 20_000, 0, midnight),
            UserTotal("telegram:3", "@u3", 1, 1, 20_000, 5_000, later),
        ],
    )
    assert await ledger.report(user="telegram:1") == Report(
        30_000, 0, [UserTotal("telegram:1", "@u1", 2, 3, 30_000, 0, midnight)]
    )
    assert await ledger.report(since=date(2026, 3, 11), user="telegram:1") == Report(0, 0, [])
    assert await ledger.report(user="telegram:4") == Report(0, 0, [])
    with pytest.raises(ValueError, match="platform:id"):
        await ledger.report(user="alice")


async def test_find_user_matches_the_latest_username_never_a_display_name(
    ledger: Ledger,
) -> None:
    await ledger.reserve(attempt("1", name="@Alice", username="Alice"), PRICE, ROOMY)
    await ledger.reserve(attempt("2", name="bob", platform="discord", username="bob"), PRICE, ROOMY)
    assert await ledger.find_user("alice") == "telegram:1"
    assert await ledger.find_user("@ALICE") == "telegram:1"
    assert await ledger.find_user("@bob") == "discord:2"
    await ledger.reserve(
        attempt("3", name="al", platform="discord", username="alice"), PRICE, ROOMY
    )
    assert await ledger.find_user("@alice") == "discord:3"
    await ledger.reserve(attempt("4", name="@alice"), PRICE, ROOMY)  # a chosen name, no username
    assert await ledger.find_user("@alice") == "discord:3"
    for unknown in ("carol", "", "@", "   "):
        assert await ledger.find_user(unknown) is None


async def test_an_empty_display_name_keeps_the_last_known_one(ledger: Ledger) -> None:
    await ledger.reserve(attempt(name="@alice"), PRICE, ROOMY)
    await ledger.reserve(attempt(name=""), PRICE, ROOMY)
    assert (await ledger.user_spend("telegram:111", ROOMY)).display_name == "@alice"
    assert (await ledger.report()).users[0].display_name == "@alice"


# The totals tables against the rows


def expected_report(rows: list[dict[str, Any]], since: date | None = None) -> Report:
    start = 0 if since is None else int(datetime(*since.timetuple()[:3], tzinfo=UTC).timestamp())
    lines: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] == "failed" or row["created_at"] < start:
            continue
        user = f"{row['platform']}:{row['user_id']}"
        line = lines.setdefault(user, {"requests": 0, "images": 0, "micro": 0, "pending": 0})
        if row["status"] == "settled":
            line["requests"] += 1
            line["images"] += row["n"]
            line["micro"] += row["charged_micro"]
        else:
            line["pending"] += row["quoted_micro"]
        line["last_at"] = max(line.get("last_at", 0), row["created_at"])
    users = [
        UserTotal(
            user,
            latest_name(rows, user),
            line["requests"],
            line["images"],
            line["micro"],
            line["pending"],
            datetime.fromtimestamp(line["last_at"], UTC),
        )
        for user, line in lines.items()
    ]
    users.sort(key=lambda line: (-line.micro, line.user))
    return Report(sum(u.micro for u in users), sum(u.pending_micro for u in users), users)


def latest_name(rows: list[dict[str, Any]], user: str) -> str:
    names = [r["display_name"] for r in rows if f"{r['platform']}:{r['user_id']}" == user]
    return next((name for name in reversed(names) if name), "")


def expected_spend(
    rows: list[dict[str, Any]], user: str, budget: Budget, now: datetime
) -> UserSpend:
    def counted(row: dict[str, Any]) -> int:
        return {"settled": row["charged_micro"], "failed": 0}.get(
            row["status"], row["quoted_micro"]
        )

    def day(row: dict[str, Any]) -> date:
        return datetime.fromtimestamp(row["created_at"], UTC).date()

    mine = [r for r in rows if f"{r['platform']}:{r['user_id']}" == user]
    settled = [r for r in mine if r["status"] == "settled"]
    today = now.date()
    counted_rows = [r for r in mine if r["status"] != "failed"]
    left = min(
        budget.user_daily_micro - sum(counted(r) for r in mine if day(r) == today),
        budget.global_daily_micro - sum(counted(r) for r in rows if day(r) == today),
    )
    return UserSpend(
        user=user,
        display_name=latest_name(rows, user),
        today_micro=sum(r["charged_micro"] for r in settled if day(r) == today),
        month_micro=sum(
            r["charged_micro"] for r in settled if day(r).replace(day=1) == today.replace(day=1)
        ),
        total_micro=sum(r["charged_micro"] for r in settled),
        images=sum(r["n"] for r in settled),
        requests=len(settled),
        unknown_micro=sum(r["quoted_micro"] for r in mine if r["status"] in ("pending", "unknown")),
        left_today_micro=None if budget.exempt else max(0, left),
        last_at=datetime.fromtimestamp(max(r["created_at"] for r in counted_rows), UTC)
        if counted_rows
        else None,
    )


USERS = [
    ("telegram", "1", "@ann"),
    ("telegram", "1", "@Annie"),
    ("telegram", "1", ""),
    ("telegram", "2", "@bob"),
    ("discord", "1", "carol"),
    ("discord", "9", ""),
    ("console", "local", "operator"),
]


async def random_step(ledger: Ledger, backend: Backend, rng: random.Random, step: int) -> None:
    """One reserve, or one price/settle/fail/mark_unknown of a row that is still open.

    The last steps only reserve, and unknown rows are seldom resolved, so some stay open.
    """
    budget = Budget(
        rng.choice([0, 300_000, 1_000_000]), rng.choice([1_500_000, 5_000_000]), rng.random() < 0.2
    )
    open_rows = [
        (row["id"], row["status"], row["nonce"])
        for row in await backend.rows()
        if row["status"] in ("pending", "unknown")
    ]
    if rng.random() < 0.4 or not open_rows or step >= 740:
        platform, user_id, name = rng.choice(USERS)
        with contextlib.suppress(BudgetExceeded):
            await ledger.reserve(
                attempt(user_id, name, platform, rng.randint(1, 4)),
                rng.choice([0, 21_000, 52_500, 120_000]),
                budget,
            )
        return
    row, status, signed = rng.choice(open_rows)
    if status == "unknown" and rng.random() < 0.8:
        return
    if status == "pending" and signed is None and rng.random() < 0.7:
        try:
            await price(ledger, row, rng.choice([21_000, 39_000, 120_000]), budget, step)
        except BudgetExceeded:
            await ledger.fail(row, "over budget at the real price")
    elif rng.random() < 0.5:
        await ledger.settle(row, rng.choice([0, 21_000, 39_000, 150_000]), f"0xtx{step}")
    elif status == "pending" and rng.random() < 0.5:
        await ledger.mark_unknown(row, "lost")
    else:
        await ledger.fail(row, "refused")


async def test_totals_equal_the_rows_after_random_operations(ledger_backend: Backend) -> None:
    rng = random.Random(402)
    clock = Clock(datetime(2026, 1, 30, 20, 0, tzinfo=UTC))
    async with await ledger_backend.open(clock=clock) as first:
        second = await ledger_backend.open(clock=clock)
        for step in range(800):
            clock.at += timedelta(minutes=rng.randint(0, 30))
            await random_step(rng.choice([first, second]), ledger_backend, rng, step)
            if step == 500:  # the second bot stops with a signed and an unsigned row open
                signed = await second.reserve(attempt("2", "@bob"), PRICE, ROOMY)
                await price(second, signed, PRICE, ROOMY, 10_000)
                await second.reserve(attempt("2", "@bob"), PRICE, ROOMY)
                await second.close()
                unknown, failed = await first.recover()
                assert unknown >= 1 and failed >= 1
                second = first
        rows = await ledger_backend.rows()
        assert {row["status"] for row in rows} == {"pending", "settled", "failed", "unknown"}
        assert len({row["created_at"] // 86_400 for row in rows}) >= 5

        assert await first.report() == expected_report(rows)
        for user in {f"{p}:{u}" for p, u, _ in USERS}:
            mine = [r for r in rows if f"{r['platform']}:{r['user_id']}" == user]
            assert await first.report(user=user) == expected_report(mine)
            for budget in (ROOMY, Budget(50_000, 600_000, exempt=False), Budget(0, 0, exempt=True)):
                assert await first.user_spend(user, budget) == expected_spend(
                    rows, user, budget, clock.at
                )
        for since in (date(2026, 1, 31), date(2026, 2, 1), date(2026, 2, 2)):
            assert await first.report(since=since) == expected_report(rows, since)
