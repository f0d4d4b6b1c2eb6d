"""``imagebot migrate``: copy a SQLite ledger into an empty PostgreSQL database, and prove it.

Everything happens in one PostgreSQL transaction: the schema, the rows (ids kept), the kept
results and what admins set (the switches, limits, changes and links), the totals tables rebuilt
from the rows, then every total compared with the SQLite ledger's own (per user, per user and day,
per day, per status: overall, pending, unknown, the kept results, and the admins' tables row for
row). Any difference, or a target that already holds payments, rolls it all back. Link codes and
wrong tries (minutes long) and cancels asked (for requests of this run) are not copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg

from bot.ledger.common import RESULT_COLUMNS
from bot.ledger.postgres_schema import REBUILD_TOTALS, migrate
from bot.ledger.sqlite import SqliteLedger

BATCH_ROWS = 10_000  # rows read from SQLite and copied at a time: memory stays flat
CONNECT_SECONDS = 10.0

COLUMNS = (
    "id", "run_id", "platform", "user_id", "display_name", "chat_id", "command", "model", "size",
    "n", "quoted_micro", "charged_micro", "status", "tx_hash", "network", "payer", "nonce", "error",
    "created_at", "updated_at", "valid_before", "job", "reply_to", "username",
)  # fmt: skip
RESULT_ROW_COLUMNS = ("token", *RESULT_COLUMNS.split(", "))
# What admins set from the chat, copied as it is: each table with its columns.
ADMIN_TABLES = {
    "switches": ("name", "micro"),
    "limits": ("person", "daily_micro"),
    "changes": ("id", "at", "admin", "action", "target", "micro"),
    "links": ("platform", "user_id", "person", "linked_at"),
}

_BY_STATUS = "per status (overall, pending, unknown)"

# The same SQL reads both stores: each totals table without its all-zero rows, the rows by status,
# and the admins' tables whole. Sorted (by ``_compare``, not by the stores' collations), so two
# stores with the same totals give equal lists.
_TOTALS = {
    "per user": "SELECT platform, user_id, requests, images, settled_micro, pending_micro"
    " FROM user_totals WHERE requests <> 0 OR pending_micro <> 0 ORDER BY 1, 2",
    "per user and day": "SELECT platform, user_id, day, counted_micro, settled_micro"
    " FROM user_days WHERE counted_micro <> 0 OR settled_micro <> 0 ORDER BY 1, 2, 3",
    "per day": "SELECT day, counted_micro FROM day_totals WHERE counted_micro <> 0 ORDER BY 1",
    _BY_STATUS: "SELECT status, count(*),"
    " sum(quoted_micro), sum(coalesce(charged_micro, 0)) FROM attempts GROUP BY 1 ORDER BY 1",
    "kept results": "SELECT count(*) FROM results",
    **{
        table: f"SELECT {', '.join(columns)} FROM {table}"
        for table, columns in ADMIN_TABLES.items()
    },
}

# The id sequences go on after the copied ids.
_FOLLOW_IDS = tuple(
    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 0) + 1, false)"
    f" FROM {table}"
    for table in ("attempts", "changes")
)


class TargetNotEmpty(Exception):
    """The PostgreSQL database already holds payments; nothing was changed."""

    def __init__(self, payments: int) -> None:
        super().__init__(f"it already holds a ledger ({payments} payments)")
        self.payments = payments


class TotalsDiffer(Exception):
    """The copy's totals are not the SQLite ledger's; nothing was changed."""

    def __init__(self, differing: Sequence[str]) -> None:
        super().__init__(", ".join(differing))
        self.differing = list(differing)


@dataclass(frozen=True)
class Copied:
    """What was copied, as the comparison found it on both sides."""

    payments: int
    users: int
    days: int
    settled_micro: int
    pending_micro: int  # pending rows at their quote
    unknown_micro: int  # unknown rows at their quote
    results: int  # kept for their buttons
    changes: int  # the admins' changes recorded
    links: int  # identities linked to a person


class _Reader(Protocol):
    async def __call__(self, sql: str) -> list[tuple[Any, ...]]: ...


async def copy_ledger(source: Path, target_url: str) -> Copied:
    """Copy the SQLite ledger at ``source`` into the empty database at ``target_url``.

    Raises TargetNotEmpty or TotalsDiffer (the target unchanged), or asyncpg's and OSError's
    errors when the database cannot be reached or written.
    """
    await (await SqliteLedger.open(source)).close()  # its schema brought up to date
    target = await asyncpg.connect(target_url, timeout=CONNECT_SECONDS)
    try:
        async with (
            aiosqlite.connect(f"file:{source}?mode=ro", uri=True) as sqlite,
            target.transaction(),
        ):
            await migrate(target)
            if present := await target.fetchval("SELECT count(*) FROM attempts"):
                raise TargetNotEmpty(present)
            await _copy_rows(sqlite, target)
            return await _compare(sqlite.execute_fetchall, _reader(target))
    finally:
        await target.close()


async def _copy_rows(sqlite: aiosqlite.Connection, target: asyncpg.Connection) -> None:
    """Every row, ids kept, with the totals triggers off and the totals rebuilt after; then the
    kept results and the admins' tables."""
    await target.execute("ALTER TABLE attempts DISABLE TRIGGER USER")
    await _copy_table(sqlite, target, "attempts", COLUMNS)
    await target.execute("ALTER TABLE attempts ENABLE TRIGGER USER")
    await _copy_table(sqlite, target, "results", RESULT_ROW_COLUMNS)
    for table, columns in ADMIN_TABLES.items():
        await _add_rows(sqlite, target, table, columns)
    for statement in (*REBUILD_TOTALS, *_FOLLOW_IDS):
        await target.execute(statement)


async def _copy_table(
    sqlite: aiosqlite.Connection, target: asyncpg.Connection, table: str, columns: Sequence[str]
) -> None:
    async with sqlite.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid") as rows:
        while batch := await rows.fetchmany(BATCH_ROWS):
            await target.copy_records_to_table(table, records=batch, columns=columns)


async def _add_rows(
    sqlite: aiosqlite.Connection, target: asyncpg.Connection, table: str, columns: Sequence[str]
) -> None:
    """Rows added one by one; a row the target holds already (an admin set it there) is kept,
    so the comparison names the table instead of the copy failing on a key."""
    values = ", ".join(f"${number}" for number in range(1, len(columns) + 1))
    insert = (
        f"INSERT INTO {table} ({', '.join(columns)}) OVERRIDING SYSTEM VALUE"
        f" VALUES ({values}) ON CONFLICT DO NOTHING"
    )
    async with sqlite.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid") as rows:
        while batch := await rows.fetchmany(BATCH_ROWS):
            await target.executemany(insert, batch)


async def _compare(source: _Reader, target: _Reader) -> Copied:
    differing = []
    found: dict[str, list[tuple[Any, ...]]] = {}
    for name, sql in _TOTALS.items():
        found[name] = _sorted(await source(sql))
        if found[name] != _sorted(await target(sql)):
            differing.append(name)
    if differing:
        raise TotalsDiffer(differing)
    by_status = {row[0]: row[1:] for row in found[_BY_STATUS]}  # rows, quoted, charged
    nothing = (0, 0, 0)
    return Copied(
        payments=sum(rows for rows, _, _ in by_status.values()),
        users=len({(platform, user) for platform, user, *_ in found["per user"]}),
        days=len(found["per day"]),
        settled_micro=by_status.get("settled", nothing)[2],
        pending_micro=by_status.get("pending", nothing)[1],
        unknown_micro=by_status.get("unknown", nothing)[1],
        results=found["kept results"][0][0],
        changes=len(found["changes"]),
        links=len(found["links"]),
    )


def _sorted(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The rows in one order whatever the store's collation; NULLs first in their column."""
    return sorted(
        (tuple(row) for row in rows),
        key=lambda row: [(value is not None, value) for value in row],
    )


def _reader(connection: asyncpg.Connection) -> _Reader:
    async def read(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(record) for record in await connection.fetch(sql)]

    return read
