"""The paying wallet's USDC balance, read from the chain, and the low-balance warning.

Read at start-up and after payments (at most once a minute), and whenever an admin asks
``/wallet``. Below ``LOW_BALANCE_USD`` the admins are warned once; the next warning comes only
after a reading at or above it again (a top-up). Whether it was seen low is kept in the
ledger, so of several runs sharing it one warns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bot.chain import ChainUnreadable, Rpc
from bot.chains import Chain
from bot.ledger import Ledger

log = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 60.0  # after payments, the balance is read at most this often

Warn = Callable[[int], Awaitable[None]]
"""Tells the admins the balance (micro-USDC) is low."""
Seen = Callable[[int], None]
"""Told every reading (micro-USDC)."""


class WalletWatch:
    """The wallet the bot pays from: where, on which network, and what it holds."""

    def __init__(
        self,
        address: str | None,
        chain: Chain,
        rpc: Rpc | None,
        ledger: Ledger,
        low_micro: int = 0,
    ) -> None:
        self.address = address  # None when the gateway pays (ClawRouter)
        self.chain = chain
        self.last_micro: int | None = None  # the latest reading
        self._rpc = rpc
        self._ledger = ledger
        self._low_micro = low_micro
        self._checked_at = -CHECK_EVERY_SECONDS
        self._checking: asyncio.Task[None] | None = None
        self._warn: Warn | None = None
        self._seen: Seen | None = None

    @property
    def readable(self) -> bool:
        """Whether there is a wallet and an RPC URL to read its balance from."""
        return self.address is not None and self._rpc is not None

    async def balance(self) -> int | None:
        """The balance now, in micro-USDC; None when it cannot be read (no RPC URL, no answer)."""
        if self.address is None or self._rpc is None:
            return None
        try:
            micro = await self._rpc.usdc_balance(self.chain, self.address)
        except ChainUnreadable as error:
            log.warning("could not read the wallet's balance: %s", error)
            return None
        self.last_micro = micro
        if self._seen is not None:
            self._seen(micro)
        await self._judge(micro)
        return micro

    def report_to(self, warn: Warn, seen: Seen) -> None:
        """From now on, warn the admins through ``warn`` and tell ``seen`` every reading."""
        self._warn, self._seen = warn, seen

    def paid(self) -> None:
        """A payment left: read the balance again unless that was done in the last minute."""
        if not self.readable or not self._low_micro:
            return
        if time.monotonic() - self._checked_at < CHECK_EVERY_SECONDS:
            return
        if self._checking is None or self._checking.done():
            self._checked_at = time.monotonic()
            self._checking = asyncio.create_task(self.check())

    async def check(self) -> None:
        """Read the balance (warning the admins if it turned low); a failure is logged."""
        try:
            await self.balance()
        except Exception:  # the ledger failed us: the next payment reads again
            log.exception("the low-balance check failed")

    async def _judge(self, micro: int) -> None:
        """Warn when the balance turned below the line; re-arm only once it is above it (at
        the line it is neither, and nothing changes)."""
        if not self._low_micro or self._warn is None or micro == self._low_micro:
            return
        if await self._ledger.note_low_balance(micro < self._low_micro):
            await self._warn(micro)
