"""The PostgreSQL ledger: the ``Ledger`` interface over an asyncpg pool, for replicas.

Every write is one transaction: one statement, one call of a ``postgres_schema`` function, or a
few statements in an explicit transaction. A reservation and a higher quote lock their day's
totals row, so budgets hold among processes and machines. A run is alive while it renews its
lease, a ``runs`` row expiring by the database's clock; ``recover`` and ``claim_jobs`` take over
the rows of runs whose lease is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Collection
from datetime import date
from typing import Any, Self

import asyncpg

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
from bot.ledger.postgres_schema import LOCK_LINKS, members, migrate, report_sums

log = logging.getLogger(__name__)

_ASK_CANCEL = """INSERT INTO cancels (row_id, asked_at)
    SELECT id, $1 FROM attempts WHERE status = 'pending' AND platform = $2 AND user_id = $3
        AND ($4::bigint IS NULL OR id = $4)
    ON CONFLICT (row_id) DO UPDATE SET asked_at = excluded.asked_at
    RETURNING row_id"""

CURSOR_BATCH = 1000  # rows a cursor fetches at once
POOL_SIZE = 5  # reservations of a day queue on one row: more connections only wait longer
CONNECT_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 10.0
LEASE_SECONDS = 30.0

# What the database raises when it cannot be reached, times out or refuses a statement.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

_TAKE_LEASE = "INSERT INTO runs VALUES ($1, now() + make_interval(secs => $2))"
_RENEW_LEASE = "UPDATE runs SET expires_at = now() + make_interval(secs => $2) WHERE run_id = $1"
_DEAD_RUN = (
    "NOT EXISTS (SELECT 1 FROM runs"
    " WHERE runs.run_id = attempts.run_id AND runs.expires_at > now())"
)

# The pending rows without a job of dead runs other than this one (``$1``).
_ORPHANED = f"status = 'pending' AND job IS NULL AND run_id <> $1 AND {_DEAD_RUN}"
_RECOVER_ROW = f"""UPDATE attempts SET
        status = CASE WHEN nonce IS NULL THEN 'failed' ELSE 'unknown' END,
        error = CASE WHEN nonce IS NULL THEN 'the bot stopped before signing'
            ELSE 'the bot stopped before learning the outcome' END,
        updated_at = $2
    WHERE id = $3 AND {_ORPHANED} RETURNING status"""

_RESERVE = (
    "SELECT row_id, user_counted, user_pending"
    " FROM reserve_attempt($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
)
_PRICE = (
    "SELECT outcome, user_counted FROM price_attempt($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)

# The user ``$1``, ``$2`` and every identity linked to it: one person, one budget.
_MEMBERS = members("$1::text", "$2::text")
_PERSON_DAYS = f"FROM user_days WHERE (platform, user_id) IN ({_MEMBERS})"
_USER_SPEND = f"""SELECT
        coalesce((SELECT display_name FROM user_totals WHERE platform = $1 AND user_id = $2), ''),
        coalesce(sum(t.requests), 0)::bigint, coalesce(sum(t.images), 0)::bigint,
        coalesce(sum(t.settled_micro), 0)::bigint, coalesce(sum(t.pending_micro), 0)::bigint,
        max(t.last_at),
        coalesce((SELECT sum(counted_micro) {_PERSON_DAYS} AND day = $3), 0)::bigint,
        coalesce((SELECT counted_micro FROM day_totals WHERE day = $3), 0),
        coalesce((SELECT sum(settled_micro) {_PERSON_DAYS} AND day = $3), 0)::bigint,
        coalesce((SELECT sum(settled_micro) {_PERSON_DAYS} AND day >= $4 AND day < $5),
            0)::bigint
    FROM user_totals AS t WHERE (t.platform, t.user_id) IN ({_MEMBERS})"""

_CONTROLS = """SELECT (SELECT micro FROM switches WHERE name = $1),
        (SELECT micro FROM switches WHERE name = $2),
        (SELECT daily_micro FROM limits WHERE person = coalesce(who.person, $5)),
        who.person
    FROM (SELECT 1) AS one LEFT JOIN links AS who ON who.platform = $3 AND who.user_id = $4"""
_PERSON_OF = "SELECT coalesce((SELECT person FROM links WHERE platform = $1 AND user_id = $2), $3)"
_NEW_LINK_CODE = """WITH expired AS (DELETE FROM link_codes WHERE expires_at < $4)
    INSERT INTO link_codes VALUES ($1, $2, $3, $5)"""
# Another link of the person on the redeemer's platform ($2), or of the redeemer to anyone.
_LINKED_ALREADY = """SELECT EXISTS (SELECT 1 FROM links
    WHERE platform = $2 AND (person = $1 OR user_id = $3))"""

# The compare-and-set on run_id: a job another claimer took first fails the re-check.
_CLAIM_JOBS = f"""WITH dead AS (
        SELECT id, run_id FROM attempts
        WHERE status = 'pending' AND job IS NOT NULL AND platform = ANY($3::text[])
            AND run_id <> $1 AND {_DEAD_RUN}
    )
    UPDATE attempts SET run_id = $1, updated_at = $2 FROM dead
    WHERE attempts.id = dead.id AND attempts.run_id = dead.run_id
        AND attempts.status = 'pending'
    RETURNING attempts.id, platform, user_id, command, model, size, n, quoted_micro, network,
        job, coalesce(reply_to, '')"""

# "C": the users' keys in byte order, as SQLite orders them whatever the database's collation.
_REPORT_ORDER = "ORDER BY micro DESC, (platform || ':' || user_id) COLLATE \"C\""

# The subquery's snapshot may miss a part being added; that part is then taken on its own.
_TAKE_ALBUM = """DELETE FROM album_parts WHERE album = $1
        AND (SELECT max(added_at) FROM album_parts WHERE album = $1) <= $2
    RETURNING id, part"""

# ARRAY(...) is computed first, so the delete looks its rows up by key: a plan made without
# the LIMIT's value could otherwise join against a scan of the whole table. Rows another run is
# deleting are skipped, not waited for.
_DELETE_EXPIRED_RESULTS = """DELETE FROM results WHERE token = ANY(ARRAY(
    SELECT token FROM results WHERE created_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))"""
_KEEP_RESULT = (
    f"INSERT INTO results (token, {RESULT_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)


class PostgresLedger:
    """Every paid attempt, with budgets reserved atomically; an asyncpg pool and a lease."""

    def __init__(self, pool: asyncpg.Pool, run_id: str, clock: Clock, lease_seconds: float) -> None:
        self._pool = pool
        self._run_id = run_id
        self._clock = clock
        self._lease_seconds = lease_seconds
        self._sweep = ResultSweep()
        self._renewing = asyncio.create_task(self._renew_lease())

    @classmethod
    async def open(
        cls, url: str, *, clock: Clock = utc_now, lease_seconds: float = LEASE_SECONDS
    ) -> PostgresLedger:
        """Connect, bring the schema up to date and take this run's lease."""
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            timeout=CONNECT_TIMEOUT_SECONDS,
            command_timeout=COMMAND_TIMEOUT_SECONDS,
            reset=_keep_session,
            # The functions' reads after their lock rely on READ COMMITTED's fresh snapshots.
            server_settings={
                "application_name": "imagebot",
                "default_transaction_isolation": "read committed",
            },
        )
        try:
            async with pool.acquire() as db:
                await migrate(db)
            run_id = secrets.token_hex(8)
            await pool.execute(_TAKE_LEASE, run_id, lease_seconds)
        except BaseException:
            pool.terminate()
            raise
        return cls(pool, run_id, clock, lease_seconds)

    async def close(self) -> None:
        """Stop renewing and end this run's lease, so its run counts as dead; close the pool."""
        self._renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewing
        try:
            await self._pool.execute("DELETE FROM runs WHERE run_id = $1", self._run_id)
        except DATABASE_ERRORS as error:
            log.warning("could not end this run's ledger lease (it expires by itself): %r", error)
        try:
            await asyncio.wait_for(self._pool.close(), CONNECT_TIMEOUT_SECONDS)
        except TimeoutError:  # a server gone silent must not hold up a shutdown
            self._pool.terminate()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def reserve(self, attempt: Attempt, amount_micro: int, budget: Budget) -> int:
        """Record a pending attempt if it fits today's budgets and the user's ``max_pending``,
        else raise BudgetExceeded."""
        row_id, user_counted, user_pending = await self._pool.fetchrow(
            _RESERVE,
            self._run_id,
            attempt.platform,
            attempt.user_id,
            attempt.display_name,
            attempt.username,
            attempt.chat_id,
            attempt.command,
            attempt.model,
            attempt.size,
            attempt.n,
            amount_micro,
            self._now(),
            *_caps(budget),
            budget.max_pending,
        )
        if row_id is not None:
            return row_id
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
        """As ``Ledger.price``; a nonce recorded before raises asyncpg.UniqueViolationError."""
        outcome, user_counted = await self._pool.fetchrow(
            _PRICE,
            row_id,
            amount_micro,
            network,
            payer,
            nonce,
            valid_before,
            reply_to,
            self._now(),
            *_caps(budget),
        )
        if outcome == "paused":
            raise SpendingPaused()
        if outcome == "refused":
            raise BudgetExceeded.refusing(amount_micro, budget, user_counted)
        if outcome != "priced":
            raise ValueError(f"attempt {row_id} is not pending and unpriced")

    async def settle(self, row_id: int, charged_micro: int, tx_hash: str | None) -> None:
        """The gateway took the payment; a late receipt may settle an unknown row too."""
        await self._resolve(
            row_id,
            "status = 'settled', charged_micro = $1::whole, tx_hash = $2",
            (charged_micro, tx_hash),
            ("pending", "unknown"),
        )

    async def fail(self, row_id: int, error: str) -> None:
        """Nothing was charged; the row stops counting against budgets."""
        await self._resolve(
            row_id, "status = 'failed', error = $1", (error,), ("pending", "unknown")
        )

    async def mark_unknown(self, row_id: int, error: str) -> None:
        """The outcome could not be learned; the row keeps counting at its quoted amount."""
        await self._resolve(row_id, "status = 'unknown', error = $1", (error,), ("pending",))

    async def recover(self) -> tuple[int, int]:
        """Resolve pending rows of dead runs (lease gone or expired): unknown if priced, else
        failed; expired leases are deleted, so a run that comes back is told."""
        await self._pool.execute("DELETE FROM runs WHERE expires_at <= now()")
        dead = await self._pool.fetch(f"SELECT id FROM attempts WHERE {_ORPHANED}", self._run_id)
        # A row a transaction: one statement over many rows would hold several users' totals
        # rows at once, and could deadlock with a reservation.
        changed = [
            await self._pool.fetchval(_RECOVER_ROW, self._run_id, self._now(), row_id)
            for (row_id,) in dead
        ]
        unknown = changed.count(Status.UNKNOWN)
        return unknown, changed.count(Status.FAILED)

    async def start_job(self, row_id: int, job: str, reply_to: str) -> None:
        """As ``Ledger.start_job``."""
        await self._resolve(row_id, "job = $1, reply_to = $2", (job, reply_to), ("pending",))

    async def claim_jobs(self, platforms: Collection[str]) -> list[OpenJob]:
        """As ``Ledger.claim_jobs``: one compare-and-set of ``run_id`` per job."""
        if not platforms:
            return []
        claimed = await self._pool.fetch(_CLAIM_JOBS, self._run_id, self._now(), list(platforms))
        return sorted((OpenJob(*row) for row in claimed), key=lambda job: job.row_id)

    async def payments(self, status: Status | None = None, limit: int = 1000) -> list[Payment]:
        """As ``Ledger.payments``."""
        where = "WHERE status = $2" if status else ""
        rows = await self._pool.fetch(
            f"SELECT {PAYMENT_COLUMNS} FROM attempts {where} ORDER BY id DESC LIMIT $1",
            *((limit, status.value) if status else (limit,)),
        )
        return [payment_of(row) for row in rows]

    async def payment(self, row_id: int) -> Payment:
        """As ``Ledger.payment``."""
        row = await self._pool.fetchrow(
            f"SELECT {PAYMENT_COLUMNS} FROM attempts WHERE id = $1", row_id
        )
        if row is None:
            raise KeyError(row_id)
        return payment_of(row)

    async def user_spend(self, user: str, budget: Budget) -> UserSpend:
        """One user's settled spend today, this UTC month and in all, and today's headroom;
        the sums are over the user's person (every identity linked to it)."""
        platform, user_id = split_user(user)
        today = self._now() // DAY_SECONDS
        row = await self._pool.fetchrow(_USER_SPEND, platform, user_id, today, *month_days(today))
        return user_spend_of(f"{platform}:{user_id}", budget, row)

    async def report(self, *, since: date | None = None, user: str | None = None) -> Report:
        """As ``Ledger.report``."""
        return await collected(self.report_stream(since=since, user=user))

    @contextlib.asynccontextmanager
    async def report_stream(
        self, *, since: date | None = None, user: str | None = None
    ) -> AsyncIterator[ReportStream]:
        """Per-user totals from the totals table, or from the rows created on or after ``since``
        (by attempts_by_time, or attempts_by_user for one user); a server-side cursor."""
        params: list[Any] = [] if since is None else [day_number(since) * DAY_SECONDS]
        where = ""
        if user is not None:
            params.extend(split_user(user))
            where = f"AND platform = ${len(params) - 1} AND user_id = ${len(params)}"
        if since is None:
            sql = f"""SELECT platform, user_id, display_name, requests, images,
                    settled_micro AS micro, pending_micro, last_at
                FROM user_totals WHERE last_at IS NOT NULL {where}"""
        else:
            sql = f"""SELECT platform, user_id, t.display_name, lines.requests, lines.images,
                    lines.micro, lines.pending_micro, lines.last_at
                FROM (
                    SELECT platform, user_id, {report_sums("a")}, max(created_at) AS last_at
                    FROM attempts AS a
                    WHERE status <> 'failed' AND created_at >= $1 {where}
                    GROUP BY platform, user_id
                ) AS lines JOIN user_totals AS t USING (platform, user_id)"""
        async with self._pool.acquire() as db, db.transaction(readonly=True):
            links = await db.fetch("SELECT platform, user_id, person FROM links")
            persons = {f"{p}:{u}": person for p, u, person in links}
            sql = report_with_totals(sql, _REPORT_ORDER)
            rows = db.cursor(sql, *params, prefetch=CURSOR_BATCH)
            yield await stream_of(aiter(rows), persons)

    async def note_low_balance(self, low: bool) -> bool:
        """As ``Ledger.note_low_balance``: one upsert that answers only when it changed."""
        changed = await self._pool.fetch(
            "INSERT INTO switches VALUES ($1, $2) ON CONFLICT (name) DO UPDATE"
            " SET micro = excluded.micro WHERE switches.micro IS DISTINCT FROM excluded.micro"
            " RETURNING micro",
            LOW_BALANCE,
            int(low),
        )
        return low and bool(changed)

    def charges(
        self, *, since: date | None = None, user: str | None = None
    ) -> AsyncIterator[Charge]:
        """As ``Ledger.charges``: a server-side cursor, read in batches."""
        where, params = ["status = 'settled'"], []
        if since is not None:
            params.append(day_number(since) * DAY_SECONDS)
            where.append(f"created_at >= ${len(params)}")
        if user is not None:
            params.extend(split_user(user))
            where.append(f"platform = ${len(params) - 1} AND user_id = ${len(params)}")
        sql = f"""SELECT created_at, platform || ':' || user_id, command, model, size, n,
                charged_micro, tx_hash
            FROM attempts WHERE {" AND ".join(where)} ORDER BY id"""
        return self._cursor(sql, params)

    async def _cursor(self, sql: str, params: list[Any]) -> AsyncIterator[Charge]:
        async with self._pool.acquire() as db, db.transaction(readonly=True):
            async for at, *rest in db.cursor(sql, *params, prefetch=CURSOR_BATCH):
                yield Charge(utc_datetime(at), *rest)

    async def daily_spend(self, since: date, *, by_model: bool = False) -> list[DayTotal]:
        """As ``Ledger.daily_spend``: users from the per-day totals, models from the rows."""
        first = day_number(since)
        if by_model:
            rows = await self._pool.fetch(
                f"""SELECT created_at / {DAY_SECONDS}, model, sum(charged_micro)
                FROM attempts WHERE created_at >= $1 AND status = 'settled' GROUP BY 1, 2""",
                first * DAY_SECONDS,
            )
        else:
            rows = await self._pool.fetch(
                """SELECT d.day, coalesce(nullif(t.display_name, ''),
                    d.platform || ':' || d.user_id), d.settled_micro
                FROM user_days AS d LEFT JOIN user_totals AS t
                    ON t.platform = d.platform AND t.user_id = d.user_id
                WHERE d.day >= $1 AND d.settled_micro > 0""",
                first,
            )
        return [DayTotal(day_of(day), key, micro) for day, key, micro in rows]

    async def find_user(self, name: str) -> str | None:
        """As ``Ledger.find_user``: the username column only; lower() under "C" is ASCII-only."""
        key = name.strip().lstrip("@")
        if not key:
            return None
        row = await self._pool.fetchrow(
            'SELECT platform, user_id FROM attempts WHERE lower(username COLLATE "C")'
            ' = lower($1 COLLATE "C") ORDER BY id DESC LIMIT 1',
            key,
        )
        return f"{row[0]}:{row[1]}" if row else None

    async def add_album_part(self, album: str, part: str) -> None:
        """As ``Ledger.add_album_part``; the ledger's clock dates parts."""
        await self._pool.execute(
            "SELECT add_album_part($1, $2, $3, $4, $5)",
            album,
            part,
            self._clock().timestamp(),
            ALBUM_KEEP_SECONDS,
            ALBUM_MAX_PARTS,
        )

    async def take_album(self, album: str, quiet_seconds: float) -> list[str] | None:
        """As ``Ledger.take_album``: one DELETE ... RETURNING takes every part or none."""
        quiet_since = self._clock().timestamp() - quiet_seconds
        taken = await self._pool.fetch(_TAKE_ALBUM, album, quiet_since)
        if taken:
            return [part for _, part in sorted(taken)]
        left = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM album_parts WHERE album = $1)", album
        )
        return None if left else []

    async def keep_result(self, result: KeptResult) -> str:
        """As ``Ledger.keep_result``."""
        now = self._now()
        row = result_row(new_result_token(), result, now)
        if self._sweep.due(now):
            await self._pool.execute(
                _DELETE_EXPIRED_RESULTS, now - RESULT_KEEP_SECONDS, RESULT_DELETE_BATCH
            )
        await self._pool.execute(_KEEP_RESULT, *row)
        return row[0]

    async def ask_cancel(self, user: str, row_id: int | None = None) -> list[int]:
        """As ``Ledger.ask_cancel``."""
        platform, user_id = split_user(user)
        now = self._now()
        async with self._pool.acquire() as db, db.transaction():
            await db.execute("DELETE FROM cancels WHERE asked_at < $1", now - CANCEL_KEEP_SECONDS)
            asked = await db.fetch(_ASK_CANCEL, now, platform, user_id, row_id)
        return sorted(row["row_id"] for row in asked)

    async def cancels_asked(self, row_ids: Collection[int]) -> list[int]:
        """As ``Ledger.cancels_asked``: one DELETE ... RETURNING tells each ask once."""
        if not row_ids:
            return []
        told = await self._pool.fetch(
            "DELETE FROM cancels WHERE row_id = ANY($1::bigint[]) RETURNING row_id", list(row_ids)
        )
        return sorted(row["row_id"] for row in told)

    async def kept_result(self, token: str) -> KeptResult | None:
        """As ``Ledger.kept_result``."""
        if not is_result_token(token):
            return None
        row = await self._pool.fetchrow(
            f"SELECT {RESULT_COLUMNS} FROM results WHERE token = $1 AND created_at >= $2",
            token,
            self._now() - RESULT_KEEP_SECONDS,
        )
        return None if row is None else kept_result_of(row)

    async def controls(self, user: str) -> Controls:
        """As ``Ledger.controls``: one statement, so one snapshot."""
        platform, user_id = split_user(user)
        paused, default, own, person = await self._pool.fetchrow(
            _CONTROLS, PAUSED, DEFAULT_DAILY, platform, user_id, f"{platform}:{user_id}"
        )
        return Controls(bool(paused), default, own, person)

    async def set_paused(self, admin: str, paused: bool) -> None:
        """As ``Ledger.set_paused``: the switch and its record in one transaction."""
        async with self._pool.acquire() as db, db.transaction():
            await _switch(db, PAUSED, int(paused))
            await self._record(db, admin, "pause" if paused else "resume", None, None)

    async def set_daily_limit(self, admin: str, user: str | None, micro: int | None) -> None:
        """As ``Ledger.set_daily_limit``: the limit and its record in one transaction; a
        fractional ``micro`` is refused (a check violation)."""
        async with self._pool.acquire() as db, db.transaction():
            if user is None:
                await _switch(db, DEFAULT_DAILY, micro)
                await self._record(db, admin, "budget default", None, micro)
                return
            platform, user_id = split_user(user)
            person = await db.fetchval(_PERSON_OF, platform, user_id, f"{platform}:{user_id}")
            if micro is None:
                await db.execute("DELETE FROM limits WHERE person = $1", person)
            else:
                await db.execute(
                    "INSERT INTO limits VALUES ($1, $2::whole) ON CONFLICT (person)"
                    " DO UPDATE SET daily_micro = excluded.daily_micro",
                    person,
                    micro,
                )
            action = "budget" if micro is not None else "budget reset"
            await self._record(db, admin, action, person, micro)

    async def changes(self, limit: int = 1000) -> list[Change]:
        """As ``Ledger.changes``."""
        rows = await self._pool.fetch(
            "SELECT at, admin, action, target, micro FROM changes ORDER BY id DESC LIMIT $1",
            limit,
        )
        return [Change(utc_datetime(at), *rest) for at, *rest in rows]

    async def new_link_code(self, user: str) -> str:
        """As ``Ledger.new_link_code``; expired codes are deleted on the way."""
        platform, user_id = split_user(user)
        now, code = self._now(), new_link_code()
        await self._pool.execute(
            _NEW_LINK_CODE, code, platform, user_id, now, now + LINK_CODE_SECONDS
        )
        return code

    async def redeem_link_code(self, user: str, code: str) -> Linked:
        """As ``Ledger.redeem_link_code``: one transaction, under a lock every run takes to
        change links, so a code is used once, the wrong tries counted hold their limit and a
        person gets one identity per platform; the code is deleted as it is used."""
        platform, user_id = split_user(user)
        now = self._now()
        async with self._pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1, 0)", LOCK_LINKS)
            tries = await db.fetchval(
                "SELECT count(*) FROM link_tries WHERE platform = $1 AND user_id = $2 AND at >= $3",
                platform,
                user_id,
                now - LINK_TRY_SECONDS,
            )
            if tries >= LINK_TRIES:
                return Linked.TOO_MANY
            maker = await db.fetchrow(
                "SELECT platform, user_id FROM link_codes WHERE code = $1 AND expires_at >= $2",
                code,
                now,
            )
            if maker is None:
                await db.execute("DELETE FROM link_tries WHERE at < $1", now - LINK_TRY_SECONDS)
                await db.execute(
                    "INSERT INTO link_tries VALUES ($1, $2, $3)", platform, user_id, now
                )
                return Linked.WRONG
            maker_platform, maker_id = maker
            if maker_platform == platform:
                return Linked.SAME_PLATFORM
            maker_user = f"{maker_platform}:{maker_id}"
            person = await db.fetchval(_PERSON_OF, maker_platform, maker_id, maker_user)
            if await db.fetchval(_LINKED_ALREADY, person, platform, user_id):
                return Linked.ALREADY
            if await db.fetchval("DELETE FROM link_codes WHERE code = $1 RETURNING 1", code):
                await db.executemany(
                    "INSERT INTO links VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    [(maker_platform, maker_id, person, now), (platform, user_id, person, now)],
                )
                return Linked.LINKED
            return Linked.WRONG  # deleted since it was read, as expired by another run's clock

    async def unlink(self, user: str) -> bool:
        """As ``Ledger.unlink``: under the lock ``redeem_link_code`` takes."""
        platform, user_id = split_user(user)
        async with self._pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1, 0)", LOCK_LINKS)
            person = await db.fetchval(
                "DELETE FROM links WHERE platform = $1 AND user_id = $2 RETURNING person",
                platform,
                user_id,
            )
            if person is None:
                return False
            await db.execute(
                "DELETE FROM links WHERE person = $1"
                " AND (SELECT count(*) FROM links WHERE person = $1) = 1",
                person,
            )
            return True

    async def _record(
        self,
        db: asyncpg.Connection,
        admin: str,
        action: str,
        target: str | None,
        micro: int | None,
    ) -> None:
        await db.execute(
            "INSERT INTO changes (at, admin, action, target, micro)"
            " VALUES ($1, $2, $3, $4, $5::whole)",
            self._now(),
            admin,
            action,
            target,
            micro,
        )

    async def _renew_lease(self) -> None:
        """Push this run's lease on every third of it; a failure is logged and tried again."""
        interval = self._lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self._pool.execute(
                    _RENEW_LEASE, self._run_id, self._lease_seconds, timeout=interval
                )
                if renewed == "UPDATE 0":
                    log.warning(
                        "this run's ledger lease had lapsed: other runs may have resolved its"
                        " pending payments"
                    )
                    await self._pool.execute(
                        _TAKE_LEASE, self._run_id, self._lease_seconds, timeout=interval
                    )
            except Exception as error:  # never stop renewing
                log.warning("could not renew this run's ledger lease: %r", error)

    def _now(self) -> int:
        return int(self._clock().timestamp())

    async def _resolve(
        self, row_id: int, assignments: str, values: tuple[Any, ...], from_states: tuple[str, ...]
    ) -> None:
        count = len(values)
        found = await self._pool.fetchval(
            f"UPDATE attempts SET {assignments}, updated_at = ${count + 1}"
            f" WHERE id = ${count + 2} AND status = ANY(${count + 3}::text[]) RETURNING id",
            *values,
            self._now(),
            row_id,
            list(from_states),
        )
        if found is None:
            raise ValueError(f"attempt {row_id} is not {' or '.join(from_states)}")


async def _keep_session(_: asyncpg.Connection) -> None:
    """The ledger leaves no session state (no SET, LISTEN, cursor or session lock), so a
    connection back in the pool needs no RESET ALL round trip."""


async def _switch(db: asyncpg.Connection, name: str, micro: int | None) -> None:
    await db.execute(
        "INSERT INTO switches VALUES ($1, $2::whole)"
        " ON CONFLICT (name) DO UPDATE SET micro = excluded.micro",
        name,
        micro,
    )


def _caps(budget: Budget) -> tuple[bool, int, int]:
    return budget.exempt, budget.user_daily_micro, budget.global_daily_micro
