"""How fast the ledger records payments and answers ``/spend all``, on SQLite or PostgreSQL.

Run: ``.venv/bin/python bench/ledger.py [--pairs N] [--writers W] [--rows R] [--users U]``
for SQLite (WAL files in /tmp), or ``--backend postgresql --database-url postgresql://…/postgres``
(a server where it may create databases; ``source .ci/postgres`` starts a throwaway one) to
measure PostgreSQL with ``--processes`` processes of ``--writers`` writers each, beside SQLite's
figure for the same processes and writers from the same run, and to print the query plans.
Targets: >= 2,000 reserve+settle pairs/s; ``report()`` over 1,000,000 rows and 10,000 users
< 200 ms. The big SQLite file is built once and cached in /tmp; PostgreSQL's big database is
copied from it with ``imagebot migrate``'s code and kept for the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bot.ledger import Attempt, Budget, Ledger, PostgresLedger, SqliteLedger, postgres_schema
from bot.ledger.common import DAY_SECONDS
from bot.ledger.copying import copy_ledger
from bot.ledger.schema import MIGRATIONS, SCHEMA_VERSION
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


async def open_store(store: str) -> Ledger:
    """A new run on a SQLite file path or a PostgreSQL URL."""
    if store.startswith("postgresql://"):
        return await PostgresLedger.open(store)
    return await SqliteLedger.open(store)


async def write_pairs(store: str, numbers: range, writers: int) -> None:
    """reserve+settle one pair per number, ``writers`` coroutines sharing one ledger."""
    async with await open_store(store) as ledger:
        remaining = iter(numbers)

        async def writer() -> None:
            for number in remaining:
                row = await ledger.reserve(attempt(number % 500), 21_000, OPEN_BUDGET)
                await ledger.settle(row, 21_000, f"0x{number:064x}")

        await asyncio.gather(*(writer() for _ in range(writers)))


def _writing_process(store: str, numbers: range, writers: int, start: Any) -> None:
    async def run() -> None:
        async with await open_store(store) as ledger:
            await ledger.report()  # connected and migrated before the clock starts
        await asyncio.to_thread(start.wait)
        await write_pairs(store, numbers, writers)

    asyncio.run(run())


def pairs_per_second(store: str, pairs: int, processes: int, writers: int) -> float:
    """reserve+settle pairs per second, from ``processes`` processes of ``writers`` each."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(processes + 1)
    share = pairs // processes
    workers = [
        context.Process(
            target=_writing_process,
            args=(store, range(i * share, (i + 1) * share), writers, start),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0, "a writing process failed"
    return share * processes / (time.perf_counter() - started)


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


async def at_size(store: str, rows: int) -> None:
    async with await open_store(store) as ledger:

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


def print_pairs(label: str, figure: float, args: argparse.Namespace) -> None:
    verdict = "ok" if figure >= PAIRS_TARGET else "MISSED"
    print(
        f"reserve+settle on {label}: {figure:,.0f} pairs/s ({args.pairs:,} pairs, "
        f"{args.processes} process(es) x {args.writers} writers); target >= {PAIRS_TARGET:,}: "
        f"{verdict}"
    )


async def run_sqlite(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        empty = str(Path(folder) / "empty.sqlite3")
        figure = pairs_per_second(empty, args.pairs, args.processes, args.writers)
    print_pairs("SQLite, an empty ledger", figure, args)
    cached = await big_ledger(args.rows, args.users)
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "big.sqlite3"
        shutil.copyfile(cached, copy)
        await at_size(str(copy), args.rows)
        full = pairs_per_second(str(copy), args.pairs, args.processes, args.writers)
        print_pairs(f"SQLite, the {args.rows:,}-row ledger", full, args)


async def run_postgresql(args: argparse.Namespace) -> None:
    server = args.database_url
    empty = await fresh_database(server, "imagebot_bench_empty")
    with tempfile.TemporaryDirectory() as folder:
        beside = pairs_per_second(
            str(Path(folder) / "empty.sqlite3"), args.pairs, args.processes, args.writers
        )
    figure = pairs_per_second(empty, args.pairs, args.processes, args.writers)
    print_pairs("PostgreSQL, an empty ledger", figure, args)
    print_pairs("SQLite, an empty ledger, same run", beside, args)
    big = await big_database(server, args.rows, args.users)
    copy = await fresh_database(server, "imagebot_bench_copy", template=big.rpartition("/")[2])
    await at_size(copy, args.rows)  # it writes rows: a copy keeps the big database as built
    await print_plans(copy)


async def fresh_database(server: str, name: str, template: str = "template1") -> str:
    """A new database ``name`` on the server (dropped first if it exists), empty or a copy of
    ``template``; its URL."""
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    return server.rpartition("/")[0] + "/" + name


async def big_database(server: str, rows: int, users: int) -> str:
    """The big SQLite ledger copied into PostgreSQL by ``imagebot migrate``'s code, kept."""
    name = f"imagebot_bench_{rows}x{users}_v{postgres_schema.SCHEMA_VERSION}"
    url = server.rpartition("/")[0] + "/" + name
    admin = await asyncpg.connect(server)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await admin.close()
    if exists:
        print(f"using database {name}")
        return url
    source = await big_ledger(rows, users)
    await fresh_database(server, name)
    started = time.perf_counter()
    copied = await copy_ledger(source, url)
    print(f"migrated {copied.payments:,} rows into {name} in {time.perf_counter() - started:.1f} s")
    database = await asyncpg.connect(url)
    try:
        await database.execute("VACUUM ANALYZE")
    finally:
        await database.close()
    return url


_PLANS = {
    "budget: the day's totals row (reserve_attempt locks it)": (
        "SELECT counted_micro FROM day_totals WHERE day = $1 FOR UPDATE", "day"),
    "budget: the user's day (reserve_attempt)": (
        "SELECT counted_micro FROM user_days"
        " WHERE platform = 'telegram' AND user_id = $1 AND day = $2", "user_day"),
    "budget: the user's pending rows (reserve_attempt)": (
        "SELECT count(*) FROM attempts"
        " WHERE platform = 'telegram' AND user_id = $1 AND status = 'pending'", "user"),
    "/spend all: report()": (
        "SELECT platform, user_id, display_name, requests, images, settled_micro AS micro,"
        " pending_micro, last_at FROM user_totals WHERE last_at IS NOT NULL"
        " ORDER BY micro DESC, (platform || ':' || user_id) COLLATE \"C\"", None),
    "report(since=30 days ago)": (
        "SELECT platform, user_id, count(*) FILTER (WHERE status = 'settled'),"
        " sum(charged_micro), max(created_at) FROM attempts"
        " WHERE status <> 'failed' AND created_at >= $1 GROUP BY platform, user_id", "since"),
}  # fmt: skip


async def print_plans(url: str) -> None:
    """EXPLAIN ANALYZE of the budget checks and the report queries on the big database."""
    now = int(time.time())
    values = {"day": (now // DAY_SECONDS,), "user_day": ("100001", now // DAY_SECONDS),
              "user": ("100001",), "since": (now - 30 * DAY_SECONDS,), None: ()}  # fmt: skip
    database = await asyncpg.connect(url)
    try:
        for label, (sql, key) in _PLANS.items():
            async with database.transaction():
                plan = await database.fetch(
                    f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {sql}", *values[key]
                )
            print(f"plan, {label}:")
            for (line,) in plan:
                print(f"    {line}")
    finally:
        await database.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("IMAGEBOT_TEST_DATABASE_URL"),
        help="postgresql://…/postgres: a server where the bench may create databases",
    )
    parser.add_argument("--pairs", type=int, default=10_000, help="reserve+settle pairs")
    parser.add_argument("--processes", type=int, help="writing processes (sqlite 1, postgresql 4)")
    parser.add_argument("--writers", type=int, default=50, help="writer coroutines per process")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the big ledger")
    parser.add_argument("--users", type=int, default=10_000, help="users in the big ledger")
    args = parser.parse_args()
    if args.backend == "sqlite":
        args.processes = args.processes or 1
        asyncio.run(run_sqlite(args))
        return
    if not args.database_url:
        parser.error("--backend postgresql needs --database-url (or IMAGEBOT_TEST_DATABASE_URL)")
    args.processes = args.processes or 4
    asyncio.run(run_postgresql(args))


if __name__ == "__main__":
    main()
