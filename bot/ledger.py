"""The SQLite ledger: one row per paid attempt, atomic daily budgets and spend reports.

Use it as ``async with await Ledger.open(path) as ledger:`` (or call ``close()`` yourself).
Money is integer micro-USDC, times UTC unix seconds. A row counts against its UTC creation day:
settled at ``charged_micro``, pending and unknown at ``quoted_micro``, failed not at all.
Triggers keep per-user and per-day totals exact within each row change, so budget checks and the
full report never scan history. Every write is one statement, hence atomic among coroutines and,
under SQLite's write lock, among processes sharing the file (WAL, 10 s busy timeout).

Recovery: each open ``Ledger`` writes its random run id on its rows and holds an exclusive
``flock`` on ``<db>.runs/<run_id>.lock``; ``recover()`` resolves the pending rows of runs whose
lock file is missing or can be locked, i.e. whose process is gone, and never a live run's rows.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiosqlite

from bot.errors import ConfigError, PaymentRefused
from bot.money import format_usd, usd_string

Clock = Callable[[], datetime]

DAY_SECONDS = 86_400
BUSY_TIMEOUT_SECONDS = 10.0
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class Status(StrEnum):
    """A row is pending until it is settled, failed (nothing charged) or unknown."""

    PENDING = "pending"
    SETTLED = "settled"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Attempt:
    """What is known about a paid request before any payment."""

    platform: str
    user_id: str
    display_name: str
    chat_id: str
    command: str
    model: str
    size: str
    n: int

    @property
    def user(self) -> str:
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True)
class Budget:
    """Daily caps; ``exempt`` (admins) lifts the per-user cap only, never the global one."""

    user_daily_micro: int
    global_daily_micro: int
    exempt: bool


@dataclass(frozen=True, slots=True)
class UserSpend:
    """One user's settled spend, what is unresolved, and what is left of today's budget."""

    user: str
    display_name: str
    today_micro: int
    month_micro: int
    total_micro: int
    images: int
    requests: int
    unknown_micro: int  # pending and unknown rows at their quoted amount
    left_today_micro: int | None  # None when exempt from the per-user cap
    last_at: datetime | None


@dataclass(frozen=True, slots=True)
class UserTotal:
    """One line of a report: settled requests, images and spend, and unresolved spend."""

    user: str
    display_name: str
    requests: int
    images: int
    micro: int
    pending_micro: int
    last_at: datetime


@dataclass(frozen=True, slots=True)
class Report:
    """Settled spend per user, largest first; ``pending_micro`` is unresolved payments."""

    total_micro: int
    pending_micro: int
    users: list[UserTotal]


class BudgetExceeded(PaymentRefused):
    """A daily cap would be passed; ``scope`` is ``"user"`` or ``"global"``."""

    def __init__(self, scope: str, user_message: str) -> None:
        super().__init__(user_message)
        self.scope = scope

    @classmethod
    def over_user_cap(cls, left_micro: int, cap_micro: int) -> BudgetExceeded:
        return cls(
            "user",
            f"Daily limit reached: you have {format_usd(left_micro)} left of your "
            f"{format_usd(cap_micro)} per day; it resets at 00:00 UTC. Nothing was charged.",
        )

    @classmethod
    def over_global_cap(cls) -> BudgetExceeded:
        return cls(
            "global",
            "This bot has reached its daily spending limit; it resets at 00:00 UTC. "
            "Nothing was charged.",
        )


# What one row adds to the totals, as SQL over the row alias ``r``.
def _requests(r: str) -> str:
    return f"({r}.status = 'settled')"


def _images(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN {r}.n ELSE 0 END)"


def _settled(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN {r}.charged_micro ELSE 0 END)"


def _pending(r: str) -> str:
    return f"(CASE WHEN {r}.status IN ('pending', 'unknown') THEN {r}.quoted_micro ELSE 0 END)"


def _counted(r: str) -> str:
    return f"({_settled(r)} + {_pending(r)})"


_V1_ATTEMPTS = (
    """CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        command TEXT NOT NULL,
        model TEXT NOT NULL,
        size TEXT NOT NULL,
        n INTEGER NOT NULL CHECK (n > 0),
        quoted_micro INTEGER NOT NULL CHECK (quoted_micro >= 0),
        charged_micro INTEGER CHECK (charged_micro >= 0),
        status TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'failed', 'unknown')),
        tx_hash TEXT,
        network TEXT,
        payer TEXT,
        nonce TEXT UNIQUE,
        error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        CHECK ((status = 'settled') = (charged_micro IS NOT NULL))
    ) STRICT""",
    "CREATE INDEX attempts_by_user ON attempts (platform, user_id, created_at, status)",
    "CREATE INDEX attempts_by_time ON attempts (created_at)",
    "CREATE INDEX attempts_by_name ON attempts (lower(ltrim(display_name, '@')))",
    "CREATE INDEX attempts_pending_by_run ON attempts (run_id) WHERE status = 'pending'",
)

# Totals per user, per user and day, and per day. A row's platform, user_id and created_at
# never change, so the update trigger moves its contribution within the same summary rows.
_V2_TOTALS = (
    """CREATE TABLE user_totals (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        requests INTEGER NOT NULL,
        images INTEGER NOT NULL,
        settled_micro INTEGER NOT NULL,
        pending_micro INTEGER NOT NULL,
        last_at INTEGER,
        PRIMARY KEY (platform, user_id)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE user_days (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        counted_micro INTEGER NOT NULL,
        settled_micro INTEGER NOT NULL,
        PRIMARY KEY (platform, user_id, day)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE day_totals (
        day INTEGER PRIMARY KEY,
        counted_micro INTEGER NOT NULL
    ) STRICT""",
    f"""INSERT INTO user_totals
        SELECT g.platform, g.user_id, coalesce(named.display_name, ''), g.requests, g.images,
            g.settled_micro, g.pending_micro, g.last_at
        FROM (
            SELECT platform, user_id, sum({_requests("a")}) AS requests,
                sum({_images("a")}) AS images, sum({_settled("a")}) AS settled_micro,
                sum({_pending("a")}) AS pending_micro,
                max(CASE WHEN status != 'failed' THEN created_at END) AS last_at,
                max(CASE WHEN display_name != '' THEN id END) AS name_id
            FROM attempts AS a GROUP BY platform, user_id
        ) AS g
        LEFT JOIN attempts AS named ON named.id = g.name_id""",
    f"""INSERT INTO user_days
        SELECT platform, user_id, created_at / {DAY_SECONDS}, sum({_counted("a")}),
            sum({_settled("a")})
        FROM attempts AS a GROUP BY platform, user_id, created_at / {DAY_SECONDS}""",
    f"""INSERT INTO day_totals
        SELECT created_at / {DAY_SECONDS}, sum({_counted("a")})
        FROM attempts AS a GROUP BY created_at / {DAY_SECONDS}""",
    f"""CREATE TRIGGER attempts_insert AFTER INSERT ON attempts BEGIN
        INSERT INTO user_totals VALUES (
            new.platform, new.user_id, new.display_name, {_requests("new")}, {_images("new")},
            {_settled("new")}, {_pending("new")},
            CASE WHEN new.status != 'failed' THEN new.created_at END
        ) ON CONFLICT (platform, user_id) DO UPDATE SET
            display_name = CASE WHEN excluded.display_name != '' THEN excluded.display_name
                ELSE display_name END,
            requests = requests + excluded.requests,
            images = images + excluded.images,
            settled_micro = settled_micro + excluded.settled_micro,
            pending_micro = pending_micro + excluded.pending_micro,
            last_at = coalesce(max(last_at, excluded.last_at), last_at, excluded.last_at);
        INSERT INTO user_days VALUES (
            new.platform, new.user_id, new.created_at / {DAY_SECONDS}, {_counted("new")},
            {_settled("new")}
        ) ON CONFLICT (platform, user_id, day) DO UPDATE SET
            counted_micro = counted_micro + excluded.counted_micro,
            settled_micro = settled_micro + excluded.settled_micro;
        INSERT INTO day_totals VALUES (new.created_at / {DAY_SECONDS}, {_counted("new")})
            ON CONFLICT (day) DO UPDATE SET counted_micro = counted_micro + excluded.counted_micro;
    END""",
    f"""CREATE TRIGGER attempts_update AFTER UPDATE OF status, quoted_micro, charged_micro
    ON attempts BEGIN
        UPDATE user_totals SET
            requests = requests - {_requests("old")} + {_requests("new")},
            images = images - {_images("old")} + {_images("new")},
            settled_micro = settled_micro - {_settled("old")} + {_settled("new")},
            pending_micro = pending_micro - {_pending("old")} + {_pending("new")},
            last_at = CASE WHEN new.status != 'failed'
                THEN coalesce(max(last_at, new.created_at), new.created_at)
                ELSE (SELECT created_at FROM attempts
                    WHERE platform = new.platform AND user_id = new.user_id AND status != 'failed'
                    ORDER BY created_at DESC LIMIT 1) END
        WHERE platform = new.platform AND user_id = new.user_id;
        UPDATE user_days SET
            counted_micro = counted_micro - {_counted("old")} + {_counted("new")},
            settled_micro = settled_micro - {_settled("old")} + {_settled("new")}
        WHERE platform = new.platform AND user_id = new.user_id
            AND day = new.created_at / {DAY_SECONDS};
        UPDATE day_totals SET counted_micro = counted_micro - {_counted("old")} + {_counted("new")}
        WHERE day = new.created_at / {DAY_SECONDS};
    END""",
)

# Applied in order from the file's PRAGMA user_version; never edit a released step, add one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1_ATTEMPTS, _V2_TOTALS)
SCHEMA_VERSION = len(_MIGRATIONS)

_USER_TODAY = (
    "SELECT counted_micro FROM user_days"
    " WHERE platform = :platform AND user_id = :user_id AND day = :day"
)
_GLOBAL_TODAY = "SELECT counted_micro FROM day_totals WHERE day = :day"

_RESERVE = f"""INSERT INTO attempts (run_id, platform, user_id, display_name, chat_id, command,
        model, size, n, quoted_micro, status, created_at, updated_at)
    SELECT :run_id, :platform, :user_id, :display_name, :chat_id, :command, :model, :size, :n,
        :amount, 'pending', :now, :now
    WHERE (:exempt OR coalesce(({_USER_TODAY}), 0) + :amount <= :user_cap)
        AND coalesce(({_GLOBAL_TODAY}), 0) + :amount <= :global_cap
    RETURNING id"""

# A price at or under the reservation only shrinks the spend, so only a higher one is re-checked.
_PRICE = f"""UPDATE attempts SET quoted_micro = :amount, network = :network, payer = :payer,
        nonce = :nonce, updated_at = :now
    WHERE id = :id AND status = 'pending' AND nonce IS NULL AND (:amount <= quoted_micro OR (
        (:exempt OR (SELECT counted_micro FROM user_days AS d WHERE d.platform = attempts.platform
            AND d.user_id = attempts.user_id AND d.day = attempts.created_at / {DAY_SECONDS})
            - quoted_micro + :amount <= :user_cap)
        AND (SELECT counted_micro FROM day_totals AS t
            WHERE t.day = attempts.created_at / {DAY_SECONDS})
            - quoted_micro + :amount <= :global_cap
    ))
    RETURNING id"""

_REPORT_ORDER = "ORDER BY micro DESC, platform || ':' || user_id"


@dataclass(frozen=True)
class _RunLock:
    """This run's lock file, flocked for the ledger's lifetime; its release marks the run dead."""

    folder: Path
    run_id: str
    fd: int

    @classmethod
    def acquire(cls, folder: Path) -> _RunLock:
        folder.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(8)
        # Locked before it gets its .lock name, so recover() never sees it unlocked.
        fresh = folder / f"{run_id}.new"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fresh.rename(folder / f"{run_id}.lock")
        return cls(folder, run_id, fd)

    def release(self) -> None:
        (self.folder / f"{self.run_id}.lock").unlink(missing_ok=True)
        os.close(self.fd)

    def dead_runs(self, run_ids: Iterable[str]) -> list[str]:
        """Of those runs and all runs with a lock file, the dead ones; their files are removed."""
        candidates = set(run_ids) | {path.stem for path in self.folder.glob("*.lock")}
        candidates.discard(self.run_id)
        return sorted(run for run in candidates if _claim_if_dead(self.folder / f"{run}.lock"))


def _claim_if_dead(lock_file: Path) -> bool:
    """True, removing the file, if no process holds its flock (LOCK_NB: this never blocks)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    lock_file.unlink(missing_ok=True)
    os.close(fd)
    return True


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """Every paid attempt, with budgets reserved atomically; one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection, lock: _RunLock, clock: Clock) -> None:
        self._db = db
        self._lock = lock
        self._clock = clock

    @classmethod
    async def open(cls, path: str | Path, *, clock: Clock = _utc_now) -> Ledger:
        """Open or create the file (and its folder) and bring its schema up to date."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = await asyncio.to_thread(_RunLock.acquire, path.with_name(path.name + ".runs"))
        try:
            db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await _migrate(db)
            except BaseException:
                await db.close()
                raise
        except BaseException:
            lock.release()
            raise
        return cls(db, lock, clock)

    async def close(self) -> None:
        await self._db.close()
        await asyncio.to_thread(self._lock.release)

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def reserve(self, attempt: Attempt, amount_micro: int, budget: Budget) -> int:
        """Record a pending attempt if it fits today's budgets, else raise BudgetExceeded."""
        now = self._now()
        params = {
            "run_id": self._lock.run_id,
            "platform": attempt.platform,
            "user_id": attempt.user_id,
            "display_name": attempt.display_name,
            "chat_id": attempt.chat_id,
            "command": attempt.command,
            "model": attempt.model,
            "size": attempt.size,
            "n": attempt.n,
            "amount": amount_micro,
            "now": now,
            "day": now // DAY_SECONDS,
            **_caps(budget),
        }
        rows = await self._db.execute_fetchall(_RESERVE, params)
        if rows:
            return rows[0][0]
        user_counted = await self._user_counted(
            attempt.platform, attempt.user_id, now // DAY_SECONDS
        )
        raise _refusal(amount_micro, budget, user_counted)

    async def price(
        self,
        row_id: int,
        amount_micro: int,
        budget: Budget,
        *,
        network: str,
        payer: str,
        nonce: str,
    ) -> None:
        """Set the real quote and the payment's nonce before signing; a higher quote is re-checked.

        Raises BudgetExceeded (row unchanged) if it no longer fits, ValueError if the row is not
        pending or already priced, sqlite3.IntegrityError if the nonce was recorded before.
        """
        params = {
            "id": row_id,
            "amount": amount_micro,
            "network": network,
            "payer": payer,
            "nonce": nonce,
            "now": self._now(),
            **_caps(budget),
        }
        if await self._db.execute_fetchall(_PRICE, params):
            return
        rows = await self._db.execute_fetchall(
            "SELECT platform, user_id, created_at, quoted_micro FROM attempts"
            " WHERE id = ? AND status = 'pending' AND nonce IS NULL",
            (row_id,),
        )
        if not rows:
            raise ValueError(f"attempt {row_id} is not pending and unpriced")
        platform, user_id, created_at, quoted = rows[0]
        user_counted = await self._user_counted(platform, user_id, created_at // DAY_SECONDS)
        raise _refusal(amount_micro, budget, user_counted - quoted)

    async def settle(self, row_id: int, charged_micro: int, tx_hash: str | None) -> None:
        """The gateway took the payment; a late receipt may settle an unknown row too."""
        await self._resolve(
            row_id,
            "status = 'settled', charged_micro = ?, tx_hash = ?",
            (charged_micro, tx_hash),
            ("pending", "unknown"),
        )

    async def fail(self, row_id: int, error: str) -> None:
        """Nothing was charged; the row stops counting against budgets."""
        await self._resolve(
            row_id, "status = 'failed', error = ?", (error,), ("pending", "unknown")
        )

    async def mark_unknown(self, row_id: int, error: str) -> None:
        """The outcome could not be learned; the row keeps counting at its quoted amount."""
        await self._resolve(row_id, "status = 'unknown', error = ?", (error,), ("pending",))

    async def recover(self) -> tuple[int, int]:
        """Resolve pending rows of dead runs: unknown if priced (maybe paid), else failed."""
        rows = await self._db.execute_fetchall(
            "SELECT DISTINCT run_id FROM attempts WHERE status = 'pending'"
        )
        dead = await asyncio.to_thread(self._lock.dead_runs, [run for (run,) in rows])
        if not dead:
            return 0, 0
        changed = await self._db.execute_fetchall(
            "UPDATE attempts SET"
            " status = CASE WHEN nonce IS NULL THEN 'failed' ELSE 'unknown' END,"
            " error = CASE WHEN nonce IS NULL THEN 'the bot stopped before signing'"
            " ELSE 'the bot stopped before learning the outcome' END,"
            f" updated_at = ? WHERE status = 'pending' AND run_id IN ({','.join('?' * len(dead))})"
            " RETURNING status",
            (self._now(), *dead),
        )
        unknown = sum(1 for (status,) in changed if status == Status.UNKNOWN)
        return unknown, len(changed) - unknown

    async def user_spend(self, user: str, budget: Budget) -> UserSpend:
        """One user's settled spend today, this UTC month and in all, and today's headroom."""
        platform, user_id = _split_user(user)
        now = self._now()
        today = now // DAY_SECONDS
        month = date.fromordinal(_EPOCH_ORDINAL + today).replace(day=1)
        next_month = (month + timedelta(days=31)).replace(day=1)
        rows = await self._db.execute_fetchall(
            f"""SELECT coalesce(t.display_name, ''), coalesce(t.requests, 0),
                coalesce(t.images, 0), coalesce(t.settled_micro, 0), coalesce(t.pending_micro, 0),
                t.last_at, coalesce(({_USER_TODAY}), 0), coalesce(({_GLOBAL_TODAY}), 0),
                coalesce((SELECT settled_micro FROM user_days
                    WHERE platform = :platform AND user_id = :user_id AND day = :day), 0),
                coalesce((SELECT sum(settled_micro) FROM user_days WHERE platform = :platform
                    AND user_id = :user_id AND day >= :month AND day < :next_month), 0)
            FROM (SELECT 1) LEFT JOIN user_totals AS t
                ON t.platform = :platform AND t.user_id = :user_id""",
            {
                "platform": platform,
                "user_id": user_id,
                "day": today,
                "month": month.toordinal() - _EPOCH_ORDINAL,
                "next_month": next_month.toordinal() - _EPOCH_ORDINAL,
            },
        )
        (
            name,
            requests,
            images,
            total,
            unknown,
            last_at,
            user_counted,
            global_counted,
            today_micro,
            month_micro,
        ) = rows[0]
        left = None
        if not budget.exempt:
            left = max(
                0,
                min(
                    budget.user_daily_micro - user_counted,
                    budget.global_daily_micro - global_counted,
                ),
            )
        return UserSpend(
            user=f"{platform}:{user_id}",
            display_name=name,
            today_micro=today_micro,
            month_micro=month_micro,
            total_micro=total,
            images=images,
            requests=requests,
            unknown_micro=unknown,
            left_today_micro=left,
            last_at=None if last_at is None else _datetime(last_at),
        )

    async def report(self, *, since: date | None = None, user: str | None = None) -> Report:
        """Per-user totals from the totals table, or from the rows created on or after ``since``."""
        where, params, index = "", [], "attempts_by_time"
        if user is not None:
            where, index = "AND platform = ? AND user_id = ?", "attempts_by_user"
            params.extend(_split_user(user))
        if since is None:
            sql = f"""SELECT platform, user_id, display_name, requests, images,
                    settled_micro AS micro, pending_micro, last_at
                FROM user_totals WHERE last_at IS NOT NULL {where} {_REPORT_ORDER}"""
        else:
            # Without statistics SQLite would walk the whole user index to save the GROUP BY sort.
            sql = f"""SELECT * FROM (
                    SELECT platform, user_id, (SELECT display_name FROM user_totals AS t
                            WHERE t.platform = a.platform AND t.user_id = a.user_id)
                        AS display_name, sum({_requests("a")}) AS requests,
                        sum({_images("a")}) AS images, sum({_settled("a")}) AS micro,
                        sum({_pending("a")}) AS pending_micro, max(created_at) AS last_at
                    FROM attempts AS a INDEXED BY {index}
                    WHERE status != 'failed' AND created_at >= ? {where}
                    GROUP BY platform, user_id
                ) {_REPORT_ORDER}"""
            params.insert(0, (since.toordinal() - _EPOCH_ORDINAL) * DAY_SECONDS)
        rows = await self._db.execute_fetchall(sql, params)
        users = [
            UserTotal(f"{p}:{u}", name, requests, images, micro, pending, _datetime(last_at))
            for p, u, name, requests, images, micro, pending, last_at in rows
        ]
        return Report(
            total_micro=sum(line.micro for line in users),
            pending_micro=sum(line.pending_micro for line in users),
            users=users,
        )

    async def find_user(self, name: str) -> str | None:
        """``platform:id`` last seen as ``@name`` or ``name`` (ASCII case-insensitive), or None."""
        key = name.strip().lstrip("@")
        if not key:
            return None
        rows = await self._db.execute_fetchall(
            "SELECT platform, user_id FROM attempts"
            " WHERE lower(ltrim(display_name, '@')) = lower(?) ORDER BY id DESC LIMIT 1",
            (key,),
        )
        return f"{rows[0][0]}:{rows[0][1]}" if rows else None

    def _now(self) -> int:
        return int(self._clock().timestamp())

    async def _user_counted(self, platform: str, user_id: str, day: int) -> int:
        rows = await self._db.execute_fetchall(
            _USER_TODAY, {"platform": platform, "user_id": user_id, "day": day}
        )
        return rows[0][0] if rows else 0

    async def _resolve(
        self, row_id: int, assignments: str, values: tuple[Any, ...], from_states: tuple[str, ...]
    ) -> None:
        rows = await self._db.execute_fetchall(
            f"UPDATE attempts SET {assignments}, updated_at = ?"
            f" WHERE id = ? AND status IN ({','.join('?' * len(from_states))}) RETURNING id",
            (*values, self._now(), row_id, *from_states),
        )
        if not rows:
            raise ValueError(f"attempt {row_id} is not {' or '.join(from_states)}")


def iso_utc(moment: datetime) -> str:
    """``2026-11-21T04:38:35Z``, as reports print times."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def to_json(report: Report) -> dict[str, Any]:
    """The ``imagebot spend --json`` object; ``pending_usd`` only where something is unresolved."""
    users = []
    for line in report.users:
        entry: dict[str, Any] = {
            "user": line.user,
            "requests": line.requests,
            "images": line.images,
            "usd": usd_string(line.micro),
        }
        if line.pending_micro:
            entry["pending_usd"] = usd_string(line.pending_micro)
        entry["last_at"] = iso_utc(line.last_at)
        users.append(entry)
    result: dict[str, Any] = {"total_usd": usd_string(report.total_micro)}
    if report.pending_micro:
        result["pending_usd"] = usd_string(report.pending_micro)
    result["users"] = users
    return result


async def _migrate(db: aiosqlite.Connection) -> None:
    """Apply the missing migration steps in one write transaction (other openers wait)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        ((version,),) = await db.execute_fetchall("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"DATABASE_PATH: the ledger has schema version {version}, newer than this "
                f"imagebot's {SCHEMA_VERSION}; upgrade imagebot."
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                await db.execute(statement)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


def _caps(budget: Budget) -> dict[str, int]:
    return {
        "exempt": int(budget.exempt),
        "user_cap": budget.user_daily_micro,
        "global_cap": budget.global_daily_micro,
    }


def _refusal(amount_micro: int, budget: Budget, user_counted: int) -> BudgetExceeded:
    """Why the ledger just refused an amount: the user's cap if it explains it, else the global.

    Read after the refusing statement; a race with a freed reservation can only relabel it.
    """
    if not budget.exempt and user_counted + amount_micro > budget.user_daily_micro:
        return BudgetExceeded.over_user_cap(
            max(0, budget.user_daily_micro - user_counted), budget.user_daily_micro
        )
    return BudgetExceeded.over_global_cap()


def _split_user(user: str) -> tuple[str, str]:
    platform, colon, user_id = user.partition(":")
    if not colon:
        raise ValueError(f"{user!r} is not platform:id")
    return platform, user_id


def _datetime(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
