"""What both ledger backends compute alike: UTC day numbers, user keys, result tokens and the rows
they return.

The SQL differs per backend; the columns a payment, a user's spend or a report line is read from,
and what is made of them, do not.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, date, datetime, timedelta
from typing import Any

from bot.ledger.api import (
    Budget,
    KeptResult,
    Payment,
    Report,
    ReportStream,
    Status,
    UserSpend,
    UserTotal,
)

DAY_SECONDS = 86_400  # the tables' day number is ``created_at / DAY_SECONDS``, a UTC day
ALBUM_MAX_PARTS = 10  # Telegram's largest album
ALBUM_KEEP_SECONDS = 3600.0  # parts never taken are deleted after this long
RESULT_KEEP_DAYS = 30  # a result's buttons work this long
RESULT_KEEP_SECONDS = RESULT_KEEP_DAYS * DAY_SECONDS
# Expired results deleted by one keep, at most once every RESULT_SWEEP_SECONDS in a run (not on
# every keep: one statement less per picture): bounded, and enough that a backlog drains.
RESULT_DELETE_BATCH = 1000
RESULT_SWEEP_SECONDS = 60
CANCEL_KEEP_SECONDS = 3600  # a cancel asked for a row no run holds any more is deleted then
LINK_CODE_SECONDS = 600  # a /link code works this long, once
LINK_TRIES = 5  # wrong /link codes one identity may try per LINK_TRY_SECONDS
LINK_TRY_SECONDS = 600
LINK_CODE_LENGTH = 8  # of 32 characters: 1.1e12 codes against 5 tries per 10 minutes
_LINK_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
PAUSED = "paused"  # the switches row of the pause switch (micro 1: paused)
DEFAULT_DAILY = "default daily"  # the switches row of /budget default
LOW_BALANCE = "low balance"  # the switches row saying the wallet was seen low (micro 1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_RESULT_TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16)

PAYMENT_COLUMNS = (
    "id, created_at, platform || ':' || user_id, command, model, status, quoted_micro,"
    " charged_micro, network, payer, nonce, valid_before, tx_hash, error, reply_to"
)
RESULT_COLUMNS = (
    "platform, user_id, command, prompt, model, size, n, quality, inputs, outputs, created_at"
)


def utc_now() -> datetime:
    return datetime.now(UTC)


def day_number(day: date) -> int:
    """The UTC day ``day`` as the tables number it."""
    return day.toordinal() - _EPOCH_ORDINAL


def day_of(number: int) -> date:
    """The UTC day the tables number ``number``."""
    return date.fromordinal(_EPOCH_ORDINAL + number)


def month_days(today: int) -> tuple[int, int]:
    """The first day of ``today``'s UTC month and of the next one, as day numbers."""
    month = date.fromordinal(_EPOCH_ORDINAL + today).replace(day=1)
    next_month = (month + timedelta(days=31)).replace(day=1)
    return day_number(month), day_number(next_month)


def split_user(user: str) -> tuple[str, str]:
    """``platform:id`` as (platform, id); ValueError if it is not one."""
    platform, colon, user_id = user.partition(":")
    if not colon:
        raise ValueError(f"{user!r} is not platform:id")
    return platform, user_id


def utc_datetime(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def payment_of(row: Sequence[Any]) -> Payment:
    """A payment from the ``PAYMENT_COLUMNS`` of a row."""
    row_id, created_at, user, command, model, status, *rest = row
    return Payment(row_id, utc_datetime(created_at), user, command, model, Status(status), *rest)


def user_spend_of(user: str, budget: Budget, row: Sequence[Any]) -> UserSpend:
    """A user's spend from one row of (display name, requests, images, settled, unresolved,
    last_at, user's counted today, everyone's counted today, settled today, settled this month).
    """
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
    ) = row
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
        user=user,
        display_name=name,
        today_micro=today_micro,
        month_micro=month_micro,
        total_micro=total,
        images=images,
        requests=requests,
        unknown_micro=unknown,
        left_today_micro=left,
        last_at=None if last_at is None else utc_datetime(last_at),
    )


def report_with_totals(lines_sql: str, order: str) -> str:
    """A report's lines (``lines_sql``: platform, user id, display name, requests, images,
    settled micro, unresolved micro, last_at), each also carrying the report's two totals, in
    ``order``: one query, so one snapshot, for ``report_stream``."""
    return f"""SELECT *, sum(micro) OVER (), sum(pending_micro) OVER ()
        FROM ({lines_sql}) AS lines {order}"""


async def stream_of(rows: AsyncIterator[Sequence[Any]], persons: Mapping[str, str]) -> ReportStream:
    """A report from the rows of ``report_with_totals``; ``persons`` names the links of linked
    users."""
    first = await anext(rows, None)

    async def users() -> AsyncIterator[UserTotal]:
        row = first
        while row is not None:
            p, u, name, requests, images, micro, pending, last_at = row[:8]
            yield UserTotal(
                f"{p}:{u}", name, requests, images, micro, pending, utc_datetime(last_at),
                persons.get(f"{p}:{u}"),
            )  # fmt: skip
            row = await anext(rows, None)

    total, pending = (int(first[8]), int(first[9])) if first is not None else (0, 0)
    return ReportStream(total, pending, users())


async def collected(streaming: AbstractAsyncContextManager[ReportStream]) -> Report:
    """A report stream (``Ledger.report_stream``), read whole."""
    async with streaming as stream:
        users = [line async for line in stream.users]
        return Report(stream.total_micro, stream.pending_micro, users)


class ResultSweep:
    """When a run's next keep deletes expired results: at most once every
    ``RESULT_SWEEP_SECONDS``, the same rule on every backend."""

    def __init__(self) -> None:
        self._next_at = 0

    def due(self, now: int) -> bool:
        """Whether a keep at ``now`` sweeps; if it does, the next sweep waits its turn."""
        if now < self._next_at:
            return False
        self._next_at = now + RESULT_SWEEP_SECONDS
        return True


def new_result_token() -> str:
    """An unguessable token for a kept result: 128 random bits as 22 url-safe characters."""
    return secrets.token_urlsafe(16)


def new_link_code() -> str:
    """A random one-time /link code, easy to type: 8 letters and digits without 0, O, 1, I."""
    return "".join(secrets.choice(_LINK_ALPHABET) for _ in range(LINK_CODE_LENGTH))


def link_code_typed(text: str) -> str | None:
    """A code as typed (any case, spaces or dashes) in the form ``new_link_code`` makes, or None."""
    code = "".join(text.split()).replace("-", "").upper()
    if len(code) != LINK_CODE_LENGTH or any(ch not in _LINK_ALPHABET for ch in code):
        return None
    return code


def is_result_token(token: str) -> bool:
    """Whether ``token`` has the form of one ``new_result_token`` makes."""
    return _RESULT_TOKEN.fullmatch(token) is not None


def result_row(token: str, result: KeptResult, created_at: int) -> tuple[Any, ...]:
    """A results row: the token, then the ``RESULT_COLUMNS``; ValueError if a text holds U+0000
    (PostgreSQL's text cannot, so neither may SQLite's, or ``imagebot migrate`` could not copy it).
    """
    row = (
        token, result.platform, result.user_id, result.command, result.prompt, result.model,
        result.size, result.n, result.quality, result.inputs, result.outputs, created_at,
    )  # fmt: skip
    if any(isinstance(value, str) and "\x00" in value for value in row):
        raise ValueError("a kept result's text cannot hold U+0000")
    return row


def kept_result_of(row: Sequence[Any]) -> KeptResult:
    """A kept result from the ``RESULT_COLUMNS`` of a row."""
    *values, created_at = row
    return KeptResult(*values, created_at=utc_datetime(created_at))
