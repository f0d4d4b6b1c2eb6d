"""The SQLite ledger alone: its file, WAL, lock files and migrations from released schemas."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from test_ledger import (
    NOW,
    PRICE,
    ROOMY,
    Clock,
    attempt,
    expected_report,
    kept,
    price,
    rows_of,
)

from bot.errors import ConfigError
from bot.ledger import Budget, BudgetExceeded, SqliteLedger, UserTotal
from bot.ledger.schema import MIGRATIONS, SCHEMA_VERSION

# Files and lock files


def _open_at_once(path: Path, start: Any, failures: Any) -> None:
    async def run() -> None:
        await asyncio.to_thread(start.wait)
        try:
            await (await SqliteLedger.open(path)).close()
        except Exception as error:
            failures.put(repr(error))

    asyncio.run(run())


async def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Switching a new file to WAL answers "database is locked" at once to the others."""
    context = multiprocessing.get_context("spawn")
    failures = context.Queue()
    for round_ in range(4):
        start = context.Barrier(8)
        openers = [
            context.Process(
                target=_open_at_once, args=(tmp_path / f"{round_}.sqlite3", start, failures)
            )
            for _ in range(8)
        ]
        for opener in openers:
            opener.start()
        for opener in openers:
            await asyncio.to_thread(opener.join, 60)
    assert failures.empty(), failures.get()


async def test_open_creates_the_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "ledger.sqlite3"
    async with await SqliteLedger.open(path):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def _reserve_and_hang(path: str, ready: Any) -> None:
    async def run() -> None:
        ledger = await SqliteLedger.open(path)
        await ledger.reserve(attempt("dead"), PRICE, ROOMY)
        ready.put("ready")
        await asyncio.sleep(600)

    asyncio.run(run())


async def test_recover_removes_only_the_lock_files_of_dead_runs(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    doomed = context.Process(target=_reserve_and_hang, args=(str(path), ready))
    async with await SqliteLedger.open(path), await SqliteLedger.open(path) as recovering:
        doomed.start()
        assert await asyncio.to_thread(ready.get, timeout=60) == "ready"
        doomed.kill()
        await asyncio.to_thread(doomed.join, 10)
        assert len(list(path.with_name("ledger.sqlite3.runs").glob("*.lock"))) == 3

        assert await recovering.recover() == (0, 1)
        assert len(list(path.with_name("ledger.sqlite3.runs").glob("*.lock"))) == 2
    assert list(path.with_name("ledger.sqlite3.runs").glob("*.lock")) == []


# Migrations

V1_SCHEMA = """
CREATE TABLE attempts (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, platform TEXT NOT NULL,
    user_id TEXT NOT NULL, display_name TEXT NOT NULL, chat_id TEXT NOT NULL,
    command TEXT NOT NULL, model TEXT NOT NULL, size TEXT NOT NULL,
    n INTEGER NOT NULL CHECK (n > 0), quoted_micro INTEGER NOT NULL CHECK (quoted_micro >= 0),
    charged_micro INTEGER CHECK (charged_micro >= 0),
    status TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'failed', 'unknown')),
    tx_hash TEXT, network TEXT, payer TEXT, nonce TEXT UNIQUE, error TEXT,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    CHECK ((status = 'settled') = (charged_micro IS NOT NULL))
) STRICT;
CREATE INDEX attempts_by_user ON attempts (platform, user_id, created_at, status);
CREATE INDEX attempts_by_time ON attempts (created_at);
CREATE INDEX attempts_by_name ON attempts (lower(ltrim(display_name, '@')));
CREATE INDEX attempts_pending_by_run ON attempts (run_id) WHERE status = 'pending';
PRAGMA user_version = 1;
"""


def write_v1_ledger(path: Path, at: datetime) -> None:
    """A schema-v1 file as released: the rows only, no totals tables."""
    created = int(at.timestamp())
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.executemany(
            "INSERT INTO attempts (run_id, platform, user_id, display_name, chat_id, command,"
            " model, size, n, quoted_micro, charged_micro, status, nonce, created_at, updated_at)"
            " VALUES ('gone', ?, ?, ?, 'c', 'imagegen', 'm', '1024x1024', ?, ?, ?, ?, ?, ?, ?)",
            [
                ("telegram", "1", "@ann", 2, 21_000, 20_000, "settled", "0x1", created, created),
                ("telegram", "1", "", 1, 39_000, None, "unknown", "0x2", created + 5, created),
                ("telegram", "2", "bob", 1, 52_500, None, "failed", None, created + 9, created),
                ("discord", "7", "eve", 1, 21_000, None, "pending", None, created + 20, created),
            ],
        )


async def test_a_v1_ledger_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    clock = Clock(NOW)
    await asyncio.to_thread(write_v1_ledger, path, clock.at)
    before = await rows_of(path)
    async with await SqliteLedger.open(path, clock=clock) as ledger:
        new_columns = {"valid_before": None, "job": None, "reply_to": None, "username": None}
        assert await rows_of(path) == [{**row, **new_columns} for row in before]
        assert await ledger.report() == expected_report(before)
        assert (await ledger.report()).users[0] == UserTotal(
            "telegram:1", "@ann", 1, 2, 20_000, 39_000, clock.at + timedelta(seconds=5)
        )
        budget = Budget(60_000, 10**9, exempt=False)
        with pytest.raises(BudgetExceeded):  # 20,000 settled + 39,000 unknown already today
            await ledger.reserve(attempt("1"), 1_001, budget)
        await ledger.reserve(attempt("1"), 1_000, budget)
        assert await ledger.recover() == (0, 1)
        assert await ledger.report() == expected_report(await rows_of(path))
    async with aiosqlite.connect(path) as db:
        assert await db.execute_fetchall("PRAGMA user_version") == [(SCHEMA_VERSION,)]


def write_v5_ledger(path: Path, at: datetime) -> None:
    """A schema-v5 file: the released v1 file and its rows, brought to v5 by the steps after it."""
    write_v1_ledger(path, at)
    with sqlite3.connect(path) as db:
        for step in MIGRATIONS[1:5]:
            for statement in step:
                db.execute(statement)
        db.execute("PRAGMA user_version = 5")


async def test_a_v5_ledger_gains_kept_results_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    clock = Clock(NOW)
    await asyncio.to_thread(write_v5_ledger, path, clock.at)
    before = await rows_of(path)
    async with await SqliteLedger.open(path, clock=clock) as ledger:
        assert await rows_of(path) == before
        assert await ledger.report() == expected_report(before)
        token = await ledger.keep_result(kept())
        assert await ledger.kept_result(token) == kept()
    async with aiosqlite.connect(path) as db:
        assert await db.execute_fetchall("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert await db.execute_fetchall(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'results'"
        ) == [("sqlite_autoindex_results_1",), ("results_by_time",)]


async def test_a_ledger_from_a_newer_imagebot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with await SqliteLedger.open(path):
        pass
    async with aiosqlite.connect(path) as db:
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        await db.commit()
    with pytest.raises(ConfigError, match="DATABASE_PATH"):
        await SqliteLedger.open(path)
    assert list(path.with_name("ledger.sqlite3.runs").glob("*.lock")) == []


async def test_budget_checks_read_the_users_own_rows_not_every_users(tmp_path: Path) -> None:
    """A reservation, a price above it and ``/spend`` look the user's days and totals up by key:
    20,000 other users add no work (a row-value IN once made SQLite scan both tables, 37 ms a
    reservation at 1,000,000 attempts of 10,000 users). Counted in SQLite VM steps."""
    path = tmp_path / "ledger.sqlite3"
    await (await SqliteLedger.open(path)).close()
    day = int(NOW.timestamp()) // 86_400
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        others = [("telegram", str(user)) for user in range(1_000, 21_000)]
        db.executemany("INSERT INTO user_days VALUES (?, ?, ?, 1, 1)", [(*o, day) for o in others])
        db.executemany("INSERT INTO user_totals VALUES (?, ?, '', 1, 1, 1, 0, 0)", others)
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    async with await SqliteLedger.open(path, clock=Clock(NOW)) as ledger:
        await ledger._db.set_progress_handler(step, 1)
        row = await ledger.reserve(attempt(), PRICE, ROOMY)
        reserving, steps = steps, 0
        await price(ledger, row, 2 * PRICE, ROOMY, 1)
        pricing, steps = steps, 0
        await ledger.user_spend("telegram:111", ROOMY)
    assert max(reserving, pricing, steps) < 5_000, (reserving, pricing, steps)
