"""The SQLite ledger: the ``Ledger`` interface over one aiosqlite connection to one WAL file.

Every write is one statement, hence atomic among coroutines and, under SQLite's write lock,
among processes sharing the file (WAL, 10 s busy timeout). Budget checks and the full report read
the totals tables that ``schema``'s triggers keep; ``recovery`` tells live runs from dead ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import aiosqlite

from bot.ledger.api import (
    Attempt,
    Budget,
    BudgetExceeded,
    Clock,
    OpenJob,
    Payment,
    Report,
    Status,
    UserSpend,
    UserTotal,
)
from bot.ledger.recovery import RunLock, runs_folder
from bot.ledger.schema import DAY_SECONDS, migrate, report_sums

BUSY_TIMEOUT_SECONDS = 10.0
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

_USER_TODAY = (
    "SELECT counted_micro FROM user_days"
    " WHERE platform = :platform AND user_id = :user_id AND day = :day"
)
_GLOBAL_TODAY = "SELECT counted_micro FROM day_totals WHERE day = :day"

_RESERVE = f"""INSERT INTO attempts (run_id, platform, user_id, display_name, username, chat_id,
        command, model, size, n, quoted_micro, status, created_at, updated_at)
    SELECT :run_id, :platform, :user_id, :display_name, :username, :chat_id, :command, :model,
        :size, :n, :amount, 'pending', :now, :now
    WHERE (:exempt OR coalesce(({_USER_TODAY}), 0) + :amount <= :user_cap)
        AND coalesce(({_GLOBAL_TODAY}), 0) + :amount <= :global_cap
    RETURNING id"""

# A price at or under the reservation only shrinks the spend, so only a higher one is re-checked.
_PRICE = f"""UPDATE attempts SET quoted_micro = :amount, network = :network, payer = :payer,
        nonce = :nonce, valid_before = :valid_before, reply_to = :reply_to, updated_at = :now
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


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SqliteLedger:
    """Every paid attempt, with budgets reserved atomically; one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection, lock: RunLock, clock: Clock) -> None:
        self._db = db
        self._lock = lock
        self._clock = clock

    @classmethod
    async def open(cls, path: str | Path, *, clock: Clock = _utc_now) -> SqliteLedger:
        """Open or create the file (and its folder) and bring its schema up to date."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = await asyncio.to_thread(RunLock.acquire, runs_folder(path))
        try:
            db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await migrate(db)
            except BaseException:
                await db.close()
                raise
        except BaseException:
            lock.release()
            raise
        return cls(db, lock, clock)

    async def close(self) -> None:
        """Close the connection and release this run's lock file, so its run counts as dead."""
        await self._db.close()
        await asyncio.to_thread(self._lock.release)

    async def __aenter__(self) -> Self:
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
            "username": attempt.username,
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
        raise BudgetExceeded.refusing(amount_micro, budget, user_counted)

    async def price(
        self,
        row_id: int,
        amount_micro: int,
        budget: Budget,
        *,
        network: str,
        payer: str,
        nonce: str,
        valid_before: int,
        reply_to: str | None = None,
    ) -> None:
        """As ``Ledger.price``; a nonce recorded before raises sqlite3.IntegrityError."""
        params = {
            "id": row_id,
            "amount": amount_micro,
            "network": network,
            "payer": payer,
            "nonce": nonce,
            "valid_before": valid_before,
            "reply_to": reply_to,
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
        raise BudgetExceeded.refusing(amount_micro, budget, user_counted - quoted)

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
        dead = await self._dead_runs("status = 'pending'")
        if not dead:
            return 0, 0
        changed = await self._db.execute_fetchall(
            "UPDATE attempts SET"
            " status = CASE WHEN nonce IS NULL THEN 'failed' ELSE 'unknown' END,"
            " error = CASE WHEN nonce IS NULL THEN 'the bot stopped before signing'"
            " ELSE 'the bot stopped before learning the outcome' END,"
            f" updated_at = ? WHERE status = 'pending' AND job IS NULL"
            f" AND run_id IN ({','.join('?' * len(dead))}) RETURNING status",
            (self._now(), *dead),
        )
        unknown = sum(1 for (status,) in changed if status == Status.UNKNOWN)
        return unknown, len(changed) - unknown

    async def start_job(self, row_id: int, job: str, reply_to: str) -> None:
        """As ``Ledger.start_job``."""
        await self._resolve(row_id, "job = ?, reply_to = ?", (job, reply_to), ("pending",))

    async def claim_jobs(self, platforms: Collection[str]) -> list[OpenJob]:
        """As ``Ledger.claim_jobs``: one compare-and-set of ``run_id`` per job."""
        dead = await self._dead_runs("status = 'pending' AND job IS NOT NULL")
        if not dead or not platforms:
            return []
        claimed = await self._db.execute_fetchall(
            f"UPDATE attempts SET run_id = ?, updated_at = ? WHERE status = 'pending'"
            f" AND job IS NOT NULL AND run_id IN ({','.join('?' * len(dead))})"
            f" AND platform IN ({','.join('?' * len(platforms))})"
            " RETURNING id, platform, user_id, command, model, size, n, quoted_micro, network, job,"
            " coalesce(reply_to, '')",
            (self._lock.run_id, self._now(), *dead, *platforms),
        )
        return sorted((OpenJob(*row) for row in claimed), key=lambda job: job.row_id)

    async def payments(self, status: Status | None = None, limit: int = 1000) -> list[Payment]:
        """As ``Ledger.payments``."""
        where = "WHERE status = ?" if status else ""
        rows = await self._db.execute_fetchall(
            f"SELECT {_PAYMENT_COLUMNS} FROM attempts {where} ORDER BY id DESC LIMIT ?",
            (status, limit) if status else (limit,),
        )
        return [_payment(row) for row in rows]

    async def payment(self, row_id: int) -> Payment:
        """As ``Ledger.payment``."""
        rows = await self._db.execute_fetchall(
            f"SELECT {_PAYMENT_COLUMNS} FROM attempts WHERE id = ?", (row_id,)
        )
        if not rows:
            raise KeyError(row_id)
        return _payment(rows[0])

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
                        AS display_name, {report_sums("a")}, max(created_at) AS last_at
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
        """As ``Ledger.find_user``: the username column only (SQLite's lower() is ASCII-only)."""
        key = name.strip().lstrip("@")
        if not key:
            return None
        rows = await self._db.execute_fetchall(
            "SELECT platform, user_id FROM attempts"
            " WHERE lower(username) = lower(?) ORDER BY id DESC LIMIT 1",
            (key,),
        )
        return f"{rows[0][0]}:{rows[0][1]}" if rows else None

    async def _dead_runs(self, rows: str) -> list[str]:
        """The dead runs among those that wrote the rows matching the SQL condition ``rows``."""
        found = await self._db.execute_fetchall(
            f"SELECT DISTINCT run_id FROM attempts WHERE {rows}"
        )
        return await asyncio.to_thread(self._lock.dead_runs, [run for (run,) in found])

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


_PAYMENT_COLUMNS = (
    "id, created_at, platform || ':' || user_id, command, model, status, quoted_micro,"
    " charged_micro, network, payer, nonce, valid_before, tx_hash, error, reply_to"
)


def _payment(row: Any) -> Payment:
    row_id, created_at, user, command, model, status, *rest = row
    return Payment(row_id, _datetime(created_at), user, command, model, Status(status), *rest)


def _caps(budget: Budget) -> dict[str, int]:
    return {
        "exempt": int(budget.exempt),
        "user_cap": budget.user_daily_micro,
        "global_cap": budget.global_daily_micro,
    }


def _split_user(user: str) -> tuple[str, str]:
    platform, colon, user_id = user.partition(":")
    if not colon:
        raise ValueError(f"{user!r} is not platform:id")
    return platform, user_id


def _datetime(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
