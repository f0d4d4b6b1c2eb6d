"""The SQLite ledger: the ``Ledger`` interface over one aiosqlite connection to one WAL file.

Every write is one statement, hence atomic among coroutines and, under SQLite's write lock,
among processes sharing the file (WAL, 10 s busy timeout). Budget checks and the full report read
the totals tables that ``schema``'s triggers keep; ``recovery`` tells live runs from dead ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Collection
from datetime import date
from pathlib import Path
from typing import Any, Self

import aiosqlite

from bot.ledger.api import (
    Attempt,
    Budget,
    BudgetExceeded,
    Change,
    Charge,
    Clock,
    Controls,
    DayTotal,
    KeptResult,
    Linked,
    OpenJob,
    Payment,
    Report,
    ReportStream,
    SpendingPaused,
    Status,
    UserSpend,
)
from bot.ledger.common import (
    ALBUM_KEEP_SECONDS,
    ALBUM_MAX_PARTS,
    CANCEL_KEEP_SECONDS,
    DAY_SECONDS,
    DEFAULT_DAILY,
    LINK_CODE_SECONDS,
    LINK_TRIES,
    LINK_TRY_SECONDS,
    LOW_BALANCE,
    PAUSED,
    PAYMENT_COLUMNS,
    RESULT_COLUMNS,
    RESULT_DELETE_BATCH,
    RESULT_KEEP_SECONDS,
    ResultSweep,
    collected,
    day_number,
    day_of,
    is_result_token,
    kept_result_of,
    month_days,
    new_link_code,
    new_result_token,
    payment_of,
    report_with_totals,
    result_row,
    split_user,
    stream_of,
    user_spend_of,
    utc_datetime,
    utc_now,
)
from bot.ledger.recovery import RunLock, runs_folder
from bot.ledger.schema import migrate, report_sums

BUSY_TIMEOUT_SECONDS = 10.0

# The identities that are one person with the user: the user, and every identity linked to it.
_MEMBERS = """SELECT :platform AS platform, :user_id AS user_id UNION SELECT m.platform, m.user_id
    FROM links AS l JOIN links AS m ON m.person = l.person
    WHERE l.platform = :platform AND l.user_id = :user_id"""
# A per-user table's rows of the members, each found by its primary key: CROSS JOIN keeps that
# order (with ``(platform, user_id) IN (members)`` SQLite scanned the whole table, 37 ms per
# reservation at 1,000,000 attempts of 10,000 users; now 0.01 ms).
_MEMBER_DAYS = f"""({_MEMBERS}) AS who CROSS JOIN user_days AS d
    ON d.platform = who.platform AND d.user_id = who.user_id"""
_USER_TODAY = f"SELECT sum(d.counted_micro) FROM {_MEMBER_DAYS} AND d.day = :day"
_GLOBAL_TODAY = "SELECT counted_micro FROM day_totals WHERE day = :day"
# Without statistics SQLite would rather count the user's rows of all time in attempts_by_user.
_USER_PENDING = (
    "SELECT count(*) FROM attempts INDEXED BY attempts_pending_by_user"
    f" WHERE (platform, user_id) IN ({_MEMBERS}) AND status = 'pending'"
)
_ROW_MEMBERS = """SELECT attempts.platform AS platform, attempts.user_id AS user_id
    UNION SELECT m.platform, m.user_id FROM links AS l JOIN links AS m ON m.person = l.person
    WHERE l.platform = attempts.platform AND l.user_id = attempts.user_id"""

_RESERVE = f"""INSERT INTO attempts (run_id, platform, user_id, display_name, username, chat_id,
        command, model, size, n, quoted_micro, status, created_at, updated_at)
    SELECT :run_id, :platform, :user_id, :display_name, :username, :chat_id, :command, :model,
        :size, :n, :amount, 'pending', :now, :now
    WHERE (:max_pending IS NULL OR ({_USER_PENDING}) < :max_pending)
        AND (:exempt OR coalesce(({_USER_TODAY}), 0) + :amount <= :user_cap)
        AND coalesce(({_GLOBAL_TODAY}), 0) + :amount <= :global_cap
    RETURNING id"""

# A price at or under the reservation only shrinks the spend, so only a higher one is re-checked;
# none is set while spending is paused.
_PAUSED = f"SELECT coalesce((SELECT micro FROM switches WHERE name = '{PAUSED}'), 0)"
_PRICE = f"""UPDATE attempts SET quoted_micro = :amount, network = :network, payer = :payer,
        nonce = :nonce, valid_before = :valid_before, reply_to = :reply_to, updated_at = :now
    WHERE id = :id AND status = 'pending' AND nonce IS NULL AND NOT ({_PAUSED})
        AND (:amount <= quoted_micro OR (
        (:exempt OR (SELECT sum(d.counted_micro) FROM ({_ROW_MEMBERS}) AS who
            CROSS JOIN user_days AS d ON d.platform = who.platform AND d.user_id = who.user_id
                AND d.day = attempts.created_at / {DAY_SECONDS})
            - quoted_micro + :amount <= :user_cap)
        AND (SELECT counted_micro FROM day_totals AS t
            WHERE t.day = attempts.created_at / {DAY_SECONDS})
            - quoted_micro + :amount <= :global_cap
    ))
    RETURNING id"""

_REPORT_ORDER = "ORDER BY micro DESC, platform || ':' || user_id"

# One statement, so concurrent adders never keep more than ALBUM_MAX_PARTS.
_ADD_ALBUM_PART = """INSERT INTO album_parts (album, part, added_at)
    SELECT :album, :part, :now
    WHERE (SELECT count(*) FROM album_parts WHERE album = :album) < :max_parts"""

# One statement, so exactly one caller gets the parts.
_TAKE_ALBUM = """DELETE FROM album_parts WHERE album = :album
        AND (SELECT max(added_at) FROM album_parts WHERE album = :album) <= :quiet_since
    RETURNING id, part"""

_CONTROLS = f"""SELECT (SELECT micro FROM switches WHERE name = '{PAUSED}'),
        (SELECT micro FROM switches WHERE name = '{DEFAULT_DAILY}'),
        (SELECT daily_micro FROM limits WHERE person = coalesce(who.person, ?3)),
        who.person
    FROM (SELECT 1) LEFT JOIN links AS who ON who.platform = ?1 AND who.user_id = ?2"""

# DELETE ... LIMIT needs a compile-time option of SQLite's, hence the subquery.
_DELETE_EXPIRED_RESULTS = """DELETE FROM results WHERE rowid IN (
    SELECT rowid FROM results WHERE created_at < :expired_before LIMIT :batch)"""
_ASK_CANCEL = """INSERT INTO cancels (row_id, asked_at)
    SELECT id, :now FROM attempts WHERE status = 'pending' AND platform = :platform
        AND user_id = :user_id AND (:row_id IS NULL OR id = :row_id)
    ON CONFLICT (row_id) DO UPDATE SET asked_at = excluded.asked_at
    RETURNING row_id"""
_KEEP_RESULT = (
    f"INSERT INTO results (token, {RESULT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteLedger:
    """Every paid attempt, with budgets reserved atomically; one aiosqlite connection."""

    def __init__(self, db: aiosqlite.Connection, lock: RunLock, clock: Clock) -> None:
        self._db = db
        self._lock = lock
        self._clock = clock
        self._sweep = ResultSweep()

    @classmethod
    async def open(cls, path: str | Path, *, clock: Clock = utc_now) -> SqliteLedger:
        """Open or create the file (and its folder) and bring its schema up to date."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = await asyncio.to_thread(RunLock.acquire, runs_folder(path))
        try:
            db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
            try:
                await _enter_wal(db)
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
        """Record a pending attempt if it fits today's budgets and the user's ``max_pending``,
        else raise BudgetExceeded."""
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
        user_counted, user_pending = await self._user_today(
            attempt.platform, attempt.user_id, now // DAY_SECONDS
        )
        raise BudgetExceeded.refusing(amount_micro, budget, user_counted, user_pending)

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
        if (await self._db.execute_fetchall(_PAUSED))[0][0]:
            raise SpendingPaused()
        rows = await self._db.execute_fetchall(
            "SELECT platform, user_id, created_at, quoted_micro FROM attempts"
            " WHERE id = ? AND status = 'pending' AND nonce IS NULL",
            (row_id,),
        )
        if not rows:
            raise ValueError(f"attempt {row_id} is not pending and unpriced")
        platform, user_id, created_at, quoted = rows[0]
        user_counted, _ = await self._user_today(platform, user_id, created_at // DAY_SECONDS)
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
            f"SELECT {PAYMENT_COLUMNS} FROM attempts {where} ORDER BY id DESC LIMIT ?",
            (status, limit) if status else (limit,),
        )
        return [payment_of(row) for row in rows]

    async def payment(self, row_id: int) -> Payment:
        """As ``Ledger.payment``."""
        rows = await self._db.execute_fetchall(
            f"SELECT {PAYMENT_COLUMNS} FROM attempts WHERE id = ?", (row_id,)
        )
        if not rows:
            raise KeyError(row_id)
        return payment_of(rows[0])

    async def user_spend(self, user: str, budget: Budget) -> UserSpend:
        """One user's settled spend today, this UTC month and in all, and today's headroom."""
        platform, user_id = split_user(user)
        today = self._now() // DAY_SECONDS
        month, next_month = month_days(today)
        rows = await self._db.execute_fetchall(
            f"""SELECT coalesce((SELECT display_name FROM user_totals
                    WHERE platform = :platform AND user_id = :user_id), ''),
                coalesce(sum(t.requests), 0), coalesce(sum(t.images), 0),
                coalesce(sum(t.settled_micro), 0), coalesce(sum(t.pending_micro), 0),
                max(t.last_at), coalesce(({_USER_TODAY}), 0), coalesce(({_GLOBAL_TODAY}), 0),
                coalesce((SELECT sum(d.settled_micro) FROM {_MEMBER_DAYS} AND d.day = :day), 0),
                coalesce((SELECT sum(d.settled_micro) FROM {_MEMBER_DAYS}
                    AND d.day >= :month AND d.day < :next_month), 0)
            FROM (SELECT 1) LEFT JOIN (SELECT t.* FROM ({_MEMBERS}) AS who CROSS JOIN user_totals
                AS t ON t.platform = who.platform AND t.user_id = who.user_id) AS t ON 1""",
            {
                "platform": platform,
                "user_id": user_id,
                "day": today,
                "month": month,
                "next_month": next_month,
            },
        )
        return user_spend_of(f"{platform}:{user_id}", budget, rows[0])

    async def report(self, *, since: date | None = None, user: str | None = None) -> Report:
        """As ``Ledger.report``."""
        return await collected(self.report_stream(since=since, user=user))

    @contextlib.asynccontextmanager
    async def report_stream(
        self, *, since: date | None = None, user: str | None = None
    ) -> AsyncIterator[ReportStream]:
        """Per-user totals from the totals table, or from the rows created on or after ``since``;
        read through a cursor."""
        where, params, index = "", [], "attempts_by_time"
        if user is not None:
            where, index = "AND platform = ? AND user_id = ?", "attempts_by_user"
            params.extend(split_user(user))
        if since is None:
            sql = f"""SELECT platform, user_id, display_name, requests, images,
                    settled_micro AS micro, pending_micro, last_at
                FROM user_totals WHERE last_at IS NOT NULL {where}"""
        else:
            # Without statistics SQLite would walk the whole user index to save the GROUP BY sort.
            sql = f"""SELECT platform, user_id, (SELECT display_name FROM user_totals AS t
                        WHERE t.platform = a.platform AND t.user_id = a.user_id)
                    AS display_name, {report_sums("a")}, max(created_at) AS last_at
                FROM attempts AS a INDEXED BY {index}
                WHERE status != 'failed' AND created_at >= ? {where}
                GROUP BY platform, user_id"""
            params.insert(0, day_number(since) * DAY_SECONDS)
        links = await self._db.execute_fetchall("SELECT platform, user_id, person FROM links")
        persons = {f"{p}:{u}": person for p, u, person in links}
        async with self._db.execute(report_with_totals(sql, _REPORT_ORDER), params) as cursor:
            yield await stream_of(aiter(cursor), persons)

    async def charges(
        self, *, since: date | None = None, user: str | None = None
    ) -> AsyncIterator[Charge]:
        """As ``Ledger.charges``: a cursor, so a million rows never sit in memory at once."""
        where, params = ["status = 'settled'"], []
        if since is not None:
            where.append("created_at >= ?")
            params.append(day_number(since) * DAY_SECONDS)
        if user is not None:
            where.append("platform = ? AND user_id = ?")
            params.extend(split_user(user))
        sql = f"""SELECT created_at, platform || ':' || user_id, command, model, size, n,
                charged_micro, tx_hash
            FROM attempts WHERE {" AND ".join(where)} ORDER BY id"""
        async with self._db.execute(sql, params) as cursor:
            async for at, *rest in cursor:
                yield Charge(utc_datetime(at), *rest)

    async def daily_spend(self, since: date, *, by_model: bool = False) -> list[DayTotal]:
        """As ``Ledger.daily_spend``: users from the per-day totals, models from the rows."""
        first = day_number(since)
        if by_model:
            sql = f"""SELECT created_at / {DAY_SECONDS}, model, sum(charged_micro)
                FROM attempts INDEXED BY attempts_by_time
                WHERE created_at >= ? AND status = 'settled' GROUP BY 1, 2"""
            params = (first * DAY_SECONDS,)
        else:
            sql = """SELECT d.day, coalesce(nullif(t.display_name, ''),
                    d.platform || ':' || d.user_id), d.settled_micro
                FROM user_days AS d LEFT JOIN user_totals AS t
                    ON t.platform = d.platform AND t.user_id = d.user_id
                WHERE d.day >= ? AND d.settled_micro > 0"""
            params = (first,)
        rows = await self._db.execute_fetchall(sql, params)
        return [DayTotal(day_of(day), key, micro) for day, key, micro in rows]

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

    async def add_album_part(self, album: str, part: str) -> None:
        """As ``Ledger.add_album_part``; the ledger's clock dates parts."""
        now = self._clock().timestamp()
        await self._db.execute(
            "DELETE FROM album_parts WHERE added_at < ?", (now - ALBUM_KEEP_SECONDS,)
        )
        await self._db.execute(
            _ADD_ALBUM_PART,
            {"album": album, "part": part, "now": now, "max_parts": ALBUM_MAX_PARTS},
        )

    async def take_album(self, album: str, quiet_seconds: float) -> list[str] | None:
        """As ``Ledger.take_album``: one DELETE ... RETURNING takes every part or none."""
        quiet_since = self._clock().timestamp() - quiet_seconds
        taken = await self._db.execute_fetchall(
            _TAKE_ALBUM, {"album": album, "quiet_since": quiet_since}
        )
        if taken:
            return [part for _, part in sorted(taken)]
        left = await self._db.execute_fetchall(
            "SELECT 1 FROM album_parts WHERE album = ? LIMIT 1", (album,)
        )
        return None if left else []

    async def keep_result(self, result: KeptResult) -> str:
        """As ``Ledger.keep_result``."""
        now = self._now()
        row = result_row(new_result_token(), result, now)
        if self._sweep.due(now):
            await self._db.execute(
                _DELETE_EXPIRED_RESULTS,
                {"expired_before": now - RESULT_KEEP_SECONDS, "batch": RESULT_DELETE_BATCH},
            )
        await self._db.execute(_KEEP_RESULT, row)
        return row[0]

    async def kept_result(self, token: str) -> KeptResult | None:
        """As ``Ledger.kept_result``."""
        if not is_result_token(token):
            return None
        rows = await self._db.execute_fetchall(
            f"SELECT {RESULT_COLUMNS} FROM results WHERE token = ? AND created_at >= ?",
            (token, self._now() - RESULT_KEEP_SECONDS),
        )
        return kept_result_of(rows[0]) if rows else None

    async def ask_cancel(self, user: str, row_id: int | None = None) -> list[int]:
        """As ``Ledger.ask_cancel``."""
        platform, user_id = split_user(user)
        now = self._now()
        await self._db.execute(
            "DELETE FROM cancels WHERE asked_at < ?", (now - CANCEL_KEEP_SECONDS,)
        )
        asked = await self._db.execute_fetchall(
            _ASK_CANCEL, {"now": now, "platform": platform, "user_id": user_id, "row_id": row_id}
        )
        return sorted(row for (row,) in asked)

    async def cancels_asked(self, row_ids: Collection[int]) -> list[int]:
        """As ``Ledger.cancels_asked``: one DELETE ... RETURNING tells each ask once."""
        if not row_ids:
            return []
        told = await self._db.execute_fetchall(
            "DELETE FROM cancels WHERE row_id IN (SELECT value FROM json_each(?)) RETURNING row_id",
            (json.dumps(list(row_ids)),),
        )
        return sorted(row for (row,) in told)

    async def controls(self, user: str) -> Controls:
        """As ``Ledger.controls``: one statement, so one snapshot."""
        platform, user_id = split_user(user)
        rows = await self._db.execute_fetchall(_CONTROLS, (platform, user_id, user))
        paused, default, own, person = rows[0]
        return Controls(bool(paused), default, own, person)

    async def set_paused(self, admin: str, paused: bool) -> None:
        """As ``Ledger.set_paused``."""
        await self._switch(PAUSED, int(paused))
        await self._record(admin, "pause" if paused else "resume", None, None)

    async def set_daily_limit(self, admin: str, user: str | None, micro: int | None) -> None:
        """As ``Ledger.set_daily_limit``."""
        if user is None:
            await self._switch(DEFAULT_DAILY, micro)
            await self._record(admin, "budget default", None, micro)
            return
        person = await self._person_of(user)
        if micro is None:
            await self._db.execute("DELETE FROM limits WHERE person = ?", (person,))
        else:
            await self._db.execute(
                "INSERT INTO limits VALUES (?, ?) ON CONFLICT (person)"
                " DO UPDATE SET daily_micro = excluded.daily_micro",
                (person, micro),
            )
        await self._record(admin, "budget" if micro is not None else "budget reset", person, micro)

    async def note_low_balance(self, low: bool) -> bool:
        """As ``Ledger.note_low_balance``: one upsert that answers only when it changed."""
        changed = await self._db.execute_fetchall(
            "INSERT INTO switches VALUES (?, ?) ON CONFLICT (name) DO UPDATE"
            " SET micro = excluded.micro WHERE switches.micro IS NOT excluded.micro"
            " RETURNING micro",
            (LOW_BALANCE, int(low)),
        )
        return low and bool(changed)

    async def changes(self, limit: int = 1000) -> list[Change]:
        """As ``Ledger.changes``."""
        rows = await self._db.execute_fetchall(
            "SELECT at, admin, action, target, micro FROM changes ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [Change(utc_datetime(at), *rest) for at, *rest in rows]

    async def new_link_code(self, user: str) -> str:
        """As ``Ledger.new_link_code``; expired codes are deleted on the way."""
        platform, user_id = split_user(user)
        now, code = self._now(), new_link_code()
        await self._db.execute("DELETE FROM link_codes WHERE expires_at < ?", (now,))
        await self._db.execute(
            "INSERT INTO link_codes VALUES (?, ?, ?, ?)",
            (code, platform, user_id, now + LINK_CODE_SECONDS),
        )
        return code

    async def redeem_link_code(self, user: str, code: str) -> Linked:
        """As ``Ledger.redeem_link_code``: each step one statement, so runs sharing the file
        never use a code twice."""
        platform, user_id = split_user(user)
        now = self._now()
        ((tries,),) = await self._db.execute_fetchall(
            "SELECT count(*) FROM link_tries WHERE platform = ? AND user_id = ? AND at >= ?",
            (platform, user_id, now - LINK_TRY_SECONDS),
        )
        if tries >= LINK_TRIES:
            return Linked.TOO_MANY
        maker = await self._db.execute_fetchall(
            "SELECT platform, user_id FROM link_codes WHERE code = ? AND expires_at >= ?",
            (code, now),
        )
        if not maker:
            await self._db.execute("DELETE FROM link_tries WHERE at < ?", (now - LINK_TRY_SECONDS,))
            await self._db.execute(
                "INSERT INTO link_tries VALUES (?, ?, ?)", (platform, user_id, now)
            )
            return Linked.WRONG
        maker_platform, maker_id = maker[0]
        if maker_platform == platform:
            return Linked.SAME_PLATFORM
        person = await self._person_of(f"{maker_platform}:{maker_id}")
        if await self._db.execute_fetchall(
            "SELECT 1 FROM links WHERE person = ? AND platform = ?", (person, platform)
        ):
            return Linked.ALREADY  # the person has an identity on this platform already
        if not await self._db.execute_fetchall(
            "DELETE FROM link_codes WHERE code = ? RETURNING code", (code,)
        ):
            return Linked.WRONG  # used by a run sharing the file a moment ago
        try:
            await self._db.execute(
                "INSERT INTO links VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (maker_platform, maker_id, person, now),
            )
            await self._db.execute(
                "INSERT INTO links VALUES (?, ?, ?, ?)", (platform, user_id, person, now)
            )
        except sqlite3.IntegrityError:
            return Linked.ALREADY
        return Linked.LINKED

    async def unlink(self, user: str) -> bool:
        """As ``Ledger.unlink``."""
        platform, user_id = split_user(user)
        gone = await self._db.execute_fetchall(
            "DELETE FROM links WHERE platform = ? AND user_id = ? RETURNING person",
            (platform, user_id),
        )
        if not gone:
            return False
        await self._db.execute(
            "DELETE FROM links WHERE person = ?1"
            " AND (SELECT count(*) FROM links WHERE person = ?1) = 1",
            (gone[0][0],),
        )
        return True

    async def _person_of(self, user: str) -> str:
        """The link ``user`` belongs to, else ``user`` itself: what a daily limit is set on."""
        rows = await self._db.execute_fetchall(
            "SELECT person FROM links WHERE platform = ? AND user_id = ?", split_user(user)
        )
        return str(rows[0][0]) if rows else user

    async def _switch(self, name: str, micro: int | None) -> None:
        await self._db.execute(
            "INSERT INTO switches VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET micro = excluded.micro",
            (name, micro),
        )

    async def _record(self, admin: str, action: str, target: str | None, micro: int | None) -> None:
        await self._db.execute(
            "INSERT INTO changes (at, admin, action, target, micro) VALUES (?, ?, ?, ?, ?)",
            (self._now(), admin, action, target, micro),
        )

    async def _dead_runs(self, rows: str) -> list[str]:
        """The dead runs among those that wrote the rows matching the SQL condition ``rows``."""
        found = await self._db.execute_fetchall(
            f"SELECT DISTINCT run_id FROM attempts WHERE {rows}"
        )
        return await asyncio.to_thread(self._lock.dead_runs, [run for (run,) in found])

    def _now(self) -> int:
        return int(self._clock().timestamp())

    async def _user_today(self, platform: str, user_id: str, day: int) -> tuple[int, int]:
        """What the user's rows of ``day`` count against the cap, and their pending rows."""
        rows = await self._db.execute_fetchall(
            f"SELECT coalesce(({_USER_TODAY}), 0), ({_USER_PENDING})",
            {"platform": platform, "user_id": user_id, "day": day},
        )
        return rows[0][0], rows[0][1]

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


def _caps(budget: Budget) -> dict[str, int | None]:
    return {
        "exempt": int(budget.exempt),
        "user_cap": budget.user_daily_micro,
        "global_cap": budget.global_daily_micro,
        "max_pending": budget.max_pending,
    }


async def _enter_wal(db: aiosqlite.Connection) -> None:
    """Switch the file to WAL. Another process switching a new file at the same moment makes
    SQLite answer "database is locked" at once, without its busy timeout: wait and try again."""
    deadline = asyncio.get_running_loop().time() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
