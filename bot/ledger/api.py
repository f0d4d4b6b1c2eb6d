"""What every ledger backend stores and promises (README, "The ledger and budgets").

Money is integer micro-USDC, times UTC unix seconds. A row counts against its UTC creation day:
settled at ``charged_micro``, pending and unknown at ``quoted_micro``, failed not at all.
Users are written ``platform:id``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol, Self

from bot.errors import PaymentRefused
from bot.money import format_usd

Clock = Callable[[], datetime]


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
    username: str | None = None  # the platform's unique @name; ``find_user`` matches only this


@dataclass(frozen=True)
class Budget:
    """Daily caps; ``exempt`` (admins) lifts the per-user cap only, never the global one.

    ``max_pending`` caps the user's pending rows (requests in flight, in every run sharing the
    ledger) a reservation may find; None means no cap. It holds for admins too.
    """

    user_daily_micro: int
    global_daily_micro: int
    exempt: bool
    max_pending: int | None = None


@dataclass(frozen=True, slots=True)
class Controls:
    """What admins set in the chat that every run obeys: the pause switch and daily limits."""

    paused: bool
    default_daily_micro: int | None  # ``/budget default``; None: the USER_DAILY_LIMIT_USD setting
    own_daily_micro: int | None  # the person's own limit (``/budget USER AMOUNT``), if set
    person: str | None  # the link joining this identity to others, if any


@dataclass(frozen=True, slots=True)
class Change:
    """One admin change, as the audit lists it."""

    at: datetime
    admin: str
    action: str  # "pause", "resume", "budget", "budget reset", "budget default"
    target: str | None  # the user (or person) a budget change is for
    micro: int | None  # the limit set


class Linked(StrEnum):
    """What ``/link CODE`` did."""

    LINKED = "linked"
    WRONG = "wrong"  # no such code (or expired, or used): one more try counted
    TOO_MANY = "too many"  # too many wrong codes lately: not even looked up
    SAME_PLATFORM = "same platform"  # a code is redeemed from the other platform
    ALREADY = "already"  # one of the two is linked to someone else: unlink first


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
    person: str | None = None  # the link joining this identity to others, if any


@dataclass(frozen=True, slots=True)
class Charge:
    """One settled payment, as ``imagebot spend --csv`` lists it."""

    at: datetime
    user: str
    command: str
    model: str
    size: str
    n: int
    micro: int
    tx_hash: str | None


@dataclass(frozen=True, slots=True)
class DayTotal:
    """What one user (or model) was charged on one UTC day."""

    day: date
    key: str  # the user's display name (else platform:id), or the model id
    micro: int


@dataclass(frozen=True, slots=True)
class Report:
    """Settled spend per user, largest first; ``pending_micro`` is unresolved payments."""

    total_micro: int
    pending_micro: int
    users: list[UserTotal]


@dataclass(frozen=True)
class ReportStream:
    """A report read as it is iterated: the totals first, then ``users``, largest first."""

    total_micro: int
    pending_micro: int
    users: AsyncIterator[UserTotal]


PAUSED_TEXT = "Spending is paused by the bot's admins; try again later. Nothing was charged."


class SpendingPaused(PaymentRefused):
    """The admins paused spending after the command was taken, before its payment was priced."""

    def __init__(self) -> None:
        super().__init__(PAUSED_TEXT)


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

    @classmethod
    def too_many_pending(cls) -> BudgetExceeded:
        return cls("pending", "Wait for your previous image to finish first.")

    @classmethod
    def refusing(
        cls, amount_micro: int, budget: Budget, user_counted_micro: int, user_pending: int = 0
    ) -> BudgetExceeded:
        """Why a ledger just refused an amount: the user's requests in flight if they explain it,
        else the user's cap if it does, else the global cap.

        Read after the refusing statement; a race with a freed reservation can only relabel it.
        """
        if budget.max_pending is not None and user_pending >= budget.max_pending:
            return cls.too_many_pending()
        cap = budget.user_daily_micro
        if not budget.exempt and user_counted_micro + amount_micro > cap:
            return cls.over_user_cap(max(0, cap - user_counted_micro), cap)
        return cls.over_global_cap()


@dataclass(frozen=True, slots=True)
class OpenJob:
    """A slow job whose picture is still owed: enough to poll on and answer after a restart."""

    row_id: int
    platform: str
    user_id: str
    command: str
    model: str
    size: str
    n: int
    quoted_micro: int
    network: str | None  # of the signed payment; None when a proxy paid
    job: str  # the image service's JSON: poll address and the payment header presented
    reply_to: str  # the adapter's JSON: where to answer


@dataclass(frozen=True, slots=True)
class KeptResult:
    """A delivered result's request, kept so its buttons can ask for it again after a restart."""

    platform: str
    user_id: str  # who asked for it
    command: str  # "imagegen" or "img2img"
    prompt: str
    model: str
    size: str
    n: int
    quality: str | None
    inputs: str  # the adapter's JSON: the input pictures
    outputs: str  # the adapter's JSON: the delivered pictures
    created_at: datetime  # when it was kept, by the ledger's clock


@dataclass(frozen=True, slots=True)
class Payment:
    """One ledger row, as ``imagebot payments`` lists it and the chain check reads it."""

    row_id: int
    created_at: datetime
    user: str
    command: str
    model: str
    status: Status
    quoted_micro: int
    charged_micro: int | None
    network: str | None
    payer: str | None
    nonce: str | None
    valid_before: int | None
    tx_hash: str | None
    error: str | None
    reply_to: str | None


class Ledger(Protocol):
    """Every paid attempt, one row each, with daily budgets reserved atomically.

    Use it as ``async with await open_ledger(settings) as ledger:`` (or call ``close()`` yourself).
    Every write is atomic among coroutines and among processes sharing the ledger, so concurrent
    requests never spend past a cap.
    """

    async def reserve(self, attempt: Attempt, amount_micro: int, budget: Budget) -> int:
        """Record a pending attempt if it fits today's budgets and the user's ``max_pending``,
        else raise BudgetExceeded.

        The check and the insert are one atomic step, among processes and machines too.
        Returns the new row's id.
        """

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
        """Set the real quote and the payment's nonce before signing; a higher quote is re-checked.

        ``reply_to`` (the adapter's JSON) lets a later run tell the user what became of it.

        Raises SpendingPaused (row unchanged) while spending is paused, BudgetExceeded (row
        unchanged) if it no longer fits, ValueError if the row is not pending or already priced,
        the store's integrity error if the nonce was recorded before.
        """

    async def settle(self, row_id: int, charged_micro: int, tx_hash: str | None) -> None:
        """The gateway took the payment; a late receipt may settle an unknown row too.

        A row is settled at most once: ValueError if it is not pending or unknown.
        """

    async def fail(self, row_id: int, error: str) -> None:
        """Nothing was charged; the row stops counting against budgets.

        ValueError if the row is not pending or unknown.
        """

    async def mark_unknown(self, row_id: int, error: str) -> None:
        """The outcome could not be learned; the row keeps counting at its quoted amount.

        ValueError if the row is not pending.
        """

    async def recover(self) -> tuple[int, int]:
        """Resolve pending rows of dead runs: unknown if priced (maybe paid), else failed.

        Rows with an open job are left pending for ``claim_jobs``. A run is dead once its
        process is gone or its ledger closed; a live run's rows are never touched. Returns how
        many rows became (unknown, failed).
        """

    async def start_job(self, row_id: int, job: str, reply_to: str) -> None:
        """The gateway answered 202: keep the job and where to answer, so any run can finish it.

        ValueError if the row is not pending.
        """

    async def claim_jobs(self, platforms: Collection[str]) -> list[OpenJob]:
        """Take over the open jobs of dead runs asked on these platforms (the ones this run can
        answer on); each job is claimed by exactly one live run."""

    async def payments(self, status: Status | None = None, limit: int = 1000) -> list[Payment]:
        """The newest rows first, all or of one status."""

    async def payment(self, row_id: int) -> Payment:
        """One row; KeyError if there is none."""

    async def user_spend(self, user: str, budget: Budget) -> UserSpend:
        """One user's settled spend today, this UTC month and in all, and today's headroom."""

    async def report(self, *, since: date | None = None, user: str | None = None) -> Report:
        """Per-user totals of all time, or of the rows created on or after the UTC day ``since``.

        ``user`` narrows it to one ``platform:id`` (ValueError if it is not one).
        """

    def report_stream(
        self, *, since: date | None = None, user: str | None = None
    ) -> AbstractAsyncContextManager[ReportStream]:
        """``report``, its users read from the store as they are iterated (one query, one
        snapshot: the totals are those of the lines)."""

    def charges(
        self, *, since: date | None = None, user: str | None = None
    ) -> AsyncIterator[Charge]:
        """Every settled payment (from the UTC day ``since``, of ``user``), oldest first, read
        from the store as it is iterated."""

    async def daily_spend(self, since: date, *, by_model: bool = False) -> list[DayTotal]:
        """Settled spend per UTC day from ``since`` on, per user or (``by_model``) per model;
        days and keys without spend are left out."""

    async def find_user(self, name: str) -> str | None:
        """``platform:id`` last seen with the username ``name`` (a leading ``@`` is ignored; ASCII
        case-insensitive), or None. Display names never match: anyone can choose theirs."""

    async def add_album_part(self, album: str, part: str) -> None:
        """Keep one message of a chat album (the adapter's JSON) for ``take_album``.

        Every run sharing the ledger sees it, so an album whose messages reached different
        replicas is still gathered into one. At most 10 parts an album are kept (more are
        dropped); parts never taken are deleted after an hour.
        """

    async def take_album(self, album: str, quiet_seconds: float) -> list[str] | None:
        """None while the album's newest part was added less than ``quiet_seconds`` ago; then
        its parts in the order they were added, removed in one atomic step, so exactly one
        caller gets them and every other caller gets ``[]``."""

    async def keep_result(self, result: KeptResult) -> str:
        """Keep a delivered result's request; returns the new token it is kept under, 22
        url-safe characters (128 random bits) that every run sharing the ledger can look up.

        The ledger's clock dates it (``result.created_at`` is not read). Results older than
        ``RESULT_KEEP_DAYS`` are deleted on the way, at most ``RESULT_DELETE_BATCH`` a call and
        at most once every ``RESULT_SWEEP_SECONDS`` in a run.
        ValueError if a text holds U+0000, which PostgreSQL cannot store.
        """

    async def kept_result(self, token: str) -> KeptResult | None:
        """The result kept under exactly ``token``, or None when there is none or it is older
        than ``RESULT_KEEP_DAYS``; a token ``keep_result`` could not have made is not looked up.
        """

    async def ask_cancel(self, user: str, row_id: int | None = None) -> list[int]:
        """Ask whichever run holds them to stop ``user``'s pending requests: the one of
        ``row_id``, or all of them; returns the rows asked (only ``user``'s, only pending).

        Asks older than an hour are deleted on the way.
        """

    async def cancels_asked(self, row_ids: Collection[int]) -> list[int]:
        """Which of ``row_ids`` were asked to stop since the last call; each is told once."""

    async def controls(self, user: str) -> Controls:
        """The pause switch, the default daily limit and ``user``'s person's own limit, as the
        admins set them last (in any run)."""

    async def set_paused(self, admin: str, paused: bool) -> None:
        """Pause or resume spending for every run; recorded with ``admin`` and the time."""

    async def set_daily_limit(self, admin: str, user: str | None, micro: int | None) -> None:
        """Set (or with None remove) ``user``'s person's own daily limit, or with ``user`` None
        the default for everyone; recorded with ``admin`` and the time."""

    async def note_low_balance(self, low: bool) -> bool:
        """Record whether the wallet's balance is low, for every run; True only for the one call
        (of all runs) that turns it low, so the admins are warned once."""

    async def changes(self, limit: int = 1000) -> list[Change]:
        """The admins' changes, newest first."""

    async def new_link_code(self, user: str) -> str:
        """A one-time code (``LINK_CODE_SECONDS``) that joins its redeemer to ``user``."""

    async def redeem_link_code(self, user: str, code: str) -> Linked:
        """Join ``user`` to the person of the code's maker, if the code is right, unused,
        unexpired and ``user`` has not tried ``LINK_TRIES`` wrong codes lately."""

    async def unlink(self, user: str) -> bool:
        """Take ``user`` out of its person (the other identity too, when only it is left);
        False when it was not linked."""

    async def close(self) -> None:
        """Close the store; from then on ``recover()`` elsewhere treats this run as dead."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the ledger, as ``close()`` does."""
