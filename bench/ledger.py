"""How fast the ledger records payments and answers ``/spend all``, on WAL files in /tmp.

Run: ``.venv/bin/python bench/ledger.py [--pairs N] [--writers W] [--rows R] [--users U]``.
Targets: >= 2,000 reserve+settle pairs/s with 50 writers on 2 cores; ``report()`` over
1,000,000 rows and 10,000 users < 200 ms. The big file is built once and cached in /tmp.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.ledger import Attempt, Budget, SqliteLedger
from bot.ledger.schema import DAY_SECONDS, MIGRATIONS, SCHEMA_VERSION
from bot.replies import report_text

PAIRS_TARGET = 2_000
REPORT_TARGET_MS = 200.0
ROUNDS = 5
OPEN_BUDGET = Budget(user_daily_micro=10**12, global_daily_micro=10**15, exempt=False)
_COLUMNS = (
    "run_id, platform, user_id, display_name, chat_id, command, model, size, n, quoted_micro,"
    " charged_micro, status, tx_hash, network, payer, nonce, error, created_at, updated_at"
)


def attempt(user: int) -> Attempt:
    return Attempt(
        platform="telegram",
        user_id=str(user),
        display_name=f"@user{user}",
        chat_id=str(user),
        command="imagegen",
        model="google/nano-banana",
        size="1024x1024",
        n=1,
    )


async def pairs_per_second(path: Path, pairs: int, writers: int) -> float:
    """reserve+settle pairs per second, ``writers`` coroutines sharing one SqliteLedger."""
    async with await SqliteLedger.open(path) as ledger:
        remaining = iter(range(pairs))

        async def writer() -> None:
            for number in remaining:
                row = await ledger.reserve(attempt(number % 500), 21_000, OPEN_BUDGET)
                await ledger.settle(row, 21_000, f"0x{number:064x}")

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        return pairs / (time.perf_counter() - started)


def write_v1_rows(path: Path, rows: int, users: int) -> None:
    """A schema-v1 file (rows only) with ``rows`` attempts of ``users`` users over a year."""
    rng = random.Random(402)
    now = int(time.time())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("BEGIN")
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")

    def generate() -> object:
        for number in range(rows):
            user = rng.randrange(users)
            created = now - rng.randrange(365 * DAY_SECONDS)
            quoted = rng.choice((21_000, 39_000, 52_500, 120_000))
            roll = rng.random()
            status = "settled" if roll < 0.94 else "failed" if roll < 0.99 else "unknown"
            yield (
                "bench",
                "telegram" if user % 2 else "discord",
                str(100_000 + user),
                f"@user{user}",
                str(user),
                "imagegen",
                "google/nano-banana",
                "1024x1024",
                rng.randint(1, 4),
                quoted,
                quoted if status == "settled" else None,
                status,
                f"0x{number:064x}" if status == "settled" else None,
                "eip155:8453",
                "0x" + "ab" * 20,
                f"0x{number:064x}",
                None if status == "settled" else "bench",
                created,
                created,
            )

    db.executemany(f"INSERT INTO attempts ({_COLUMNS}) VALUES ({', '.join('?' * 19)})", generate())
    db.execute("COMMIT")
    db.close()


async def big_ledger(rows: int, users: int) -> Path:
    """The cached big file at the current schema, built (and migrated on open) if missing."""
    cached = (
        Path(tempfile.gettempdir()) / f"imagebot-ledger-v{SCHEMA_VERSION}-{rows}x{users}.sqlite3"
    )
    if cached.exists():
        print(f"using cached {cached}")
        return cached
    building = cached.with_suffix(".building")
    for leftover in (building, Path(f"{building}-wal"), Path(f"{building}-shm")):
        leftover.unlink(missing_ok=True)
    started = time.perf_counter()
    write_v1_rows(building, rows, users)
    written = time.perf_counter()
    ledger = await SqliteLedger.open(building)
    await ledger.close()
    migrated = time.perf_counter() - written
    print(
        f"built {cached}: {rows:,} rows in {written - started:.1f} s; SqliteLedger.open migrated "
        f"it to schema v{SCHEMA_VERSION} (totals backfilled) in {migrated:.1f} s"
    )
    building.rename(cached)  # closing the last connection checkpointed and removed the WAL
    shutil.rmtree(f"{building}.runs", ignore_errors=True)
    return cached


async def timings(call: Callable[[], Awaitable[object]], rounds: int) -> list[float]:
    """Milliseconds of each of ``rounds`` calls."""
    results = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        results.append((time.perf_counter() - started) * 1000)
    return results


def summary(label: str, ms: list[float]) -> str:
    return f"{label}: best {min(ms):.2f} ms, median {statistics.median(ms):.2f} ms ({len(ms)} runs)"


async def at_size(path: Path, rows: int, users: int) -> None:
    async with await SqliteLedger.open(path) as ledger:

        async def spend_all() -> str:
            return report_text(await ledger.report())

        report_ms = await timings(spend_all, ROUNDS)
        report = await ledger.report()
        label = (
            f"/spend all (report() + its chat text) over {rows:,} rows, {len(report.users):,} users"
        )
        print(summary(label, report_ms))
        verdict = "ok" if statistics.median(report_ms) < REPORT_TARGET_MS else "MISSED"
        print(f"target /spend all < {REPORT_TARGET_MS:.0f} ms (median): {verdict}")
        heaviest = report.users[0].user
        spend_ms = await timings(lambda: ledger.user_spend(heaviest, OPEN_BUDGET), 200)
        print(summary("user_spend()", spend_ms))
        today = datetime.now(UTC).date()
        for days in (0, 30):
            since = today - timedelta(days=days)
            since_ms = await timings(lambda since=since: ledger.report(since=since), ROUNDS)
            print(summary(f"report(since=today - {days} days)", since_ms))
        user_ms = await timings(lambda: ledger.report(since=today, user=heaviest), 50)
        print(summary(f"report(since=today, user={heaviest})", user_ms))
        reserve_ms = await timings(lambda: ledger.reserve(attempt(7), 21_000, OPEN_BUDGET), 200)
        print(summary("reserve() alone, one at a time", reserve_ms))


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        empty = await pairs_per_second(Path(folder) / "empty.sqlite3", args.pairs, args.writers)
    verdict = "ok" if empty >= PAIRS_TARGET else "MISSED"
    print(
        f"reserve+settle: {empty:,.0f} pairs/s on an empty ledger "
        f"({args.pairs:,} pairs, {args.writers} writer coroutines, one Ledger)"
    )
    print(f"target >= {PAIRS_TARGET:,} pairs/s on 2 cores: {verdict}")

    cached = await big_ledger(args.rows, args.users)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "big.sqlite3"
        shutil.copyfile(cached, copy)
        await at_size(copy, args.rows, args.users)
        full = await pairs_per_second(copy, args.pairs, args.writers)
        print(f"reserve+settle: {full:,.0f} pairs/s on the {args.rows:,}-row ledger")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=10_000, help="reserve+settle pairs")
    parser.add_argument("--writers", type=int, default=50, help="concurrent writer coroutines")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the big ledger")
    parser.add_argument("--users", type=int, default=10_000, help="users in the big ledger")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
