"""What admins run from the chat: the wallet, daily limits, the pause switch; and the links that
make one person of a user's accounts on two platforms.

Every answer is one short text. The switches and limits live in the ledger, so every process
sharing it obeys them at once: a command already taken is refused when its payment is priced,
before signing, if spending was paused meanwhile. Each change is recorded with who made it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from bot.balance import WalletWatch
from bot.commands import BudgetChange, LinkAccounts, PauseSpending
from bot.config import Settings
from bot.ledger import Budget, Controls, Ledger, Linked, Status
from bot.ledger.common import LINK_CODE_SECONDS, LINK_TRY_SECONDS, link_code_typed
from bot.money import format_usd

_LINKED = {
    Linked.LINKED: (
        "Linked: this account and your other one are now one person, with one daily budget "
        "and one /spend. /unlink separates them."
    ),
    Linked.WRONG: "That code is wrong or has expired; ask for a new one with /link.",
    Linked.TOO_MANY: (
        f"Too many wrong codes; try again in {LINK_TRY_SECONDS // 60} minutes. Ask for a new "
        "code with /link on your other account."
    ),
    Linked.SAME_PLATFORM: "Send the code from your account on the other platform.",
    Linked.ALREADY: "One of the two accounts is already linked to another; /unlink it first.",
}


def daily_limit(settings: Settings, controls: Controls) -> int:
    """The user's daily limit: their own, else the default admins set, else the setting."""
    if controls.own_daily_micro is not None:
        return controls.own_daily_micro
    if controls.default_daily_micro is not None:
        return controls.default_daily_micro
    return settings.user_daily_micro


def budget_for(settings: Settings, principal: str, controls: Controls, max_pending: int) -> Budget:
    return Budget(
        user_daily_micro=daily_limit(settings, controls),
        global_daily_micro=settings.global_daily_micro,
        exempt=settings.is_admin(principal),
        max_pending=max_pending,
    )


class AdminDesk:
    """Answers ``/wallet``, ``/budget``, ``/pause``, ``/resume``, ``/link`` and ``/unlink``."""

    def __init__(self, settings: Settings, ledger: Ledger, wallet: WalletWatch) -> None:
        self._settings = settings
        self._ledger = ledger
        self._wallet = wallet

    async def wallet(self, admin: str) -> str:
        """The wallet, its balance, today's spend against the global cap, the pause switch."""
        wallet, chain = self._wallet, self._wallet.chain
        where = f"{chain.v1_name} ({chain.caip2})"
        if wallet.address is None:
            return f"No wallet: the gateway pays (ClawRouter). Network: {where}."
        lines = [f"Wallet {wallet.address} on {where}."]
        if not wallet.readable:
            variable = "BASE_RPC_URL" if chain.chain_id == 8453 else "BASE_SEPOLIA_RPC_URL"
            lines.append(f"Balance: unknown, no RPC URL set ({variable}).")
        elif (micro := await wallet.balance()) is None:
            lines.append("Balance: the RPC URL did not answer; try again later.")
        else:
            lines.append(f"Balance: {format_usd(micro)} USDC.")
        today = datetime.now(UTC).date()
        report = await self._ledger.report(since=today)
        lines.append(
            f"Today: {format_usd(report.total_micro)} spent of the "
            f"{format_usd(self._settings.global_daily_micro)} daily cap (UTC)."
        )
        open_rows = [
            payment
            for status in (Status.PENDING, Status.UNKNOWN)
            for payment in await self._ledger.payments(status)
        ]
        if open_rows:
            held = sum(payment.quoted_micro for payment in open_rows)
            lines.append(f"Payments pending or unknown: {len(open_rows)} ({format_usd(held)}).")
        controls = await self._ledger.controls(admin)
        lines.append("Spending: paused (/resume)." if controls.paused else "Spending: on.")
        return "\n".join(lines)

    async def pause(self, admin: str, command: PauseSpending) -> str:
        await self._ledger.set_paused(admin, command.paused)
        if command.paused:
            return (
                "Spending is paused in every process: paid commands are refused until /resume. "
                "Pictures already paid for still arrive."
            )
        return "Spending is on again."

    async def budget(self, admin: str, command: BudgetChange) -> str:
        """Show or change one user's daily limit, or the default."""
        if command.who is None:
            return await self._default(admin, command.micro)
        user = command.who
        if user.startswith("@"):
            found = await self._ledger.find_user(user)
            if found is None:
                return f"I don't know {user[:40]} yet; use platform:id (e.g. telegram:12345)."
            user = found
        if command.micro is not None or command.reset:
            await self._ledger.set_daily_limit(admin, user, command.micro)
        controls = await self._ledger.controls(user)
        limit = format_usd(daily_limit(self._settings, controls))
        shared = f", shared with its linked account ({controls.person})" if controls.person else ""
        if self._settings.is_admin(user):
            return f"{user} is an admin: no daily limit applies."
        if command.reset:
            return f"{user} is back on the default daily limit, {limit}{shared}."
        if command.micro is not None:
            return f"{user}'s daily limit is now {limit}{shared}, in every process."
        own = "its own" if controls.own_daily_micro is not None else "the default"
        return f"{user}'s daily limit: {limit} ({own}){shared}."

    async def _default(self, admin: str, micro: int | None) -> str:
        if micro is not None:
            await self._ledger.set_daily_limit(admin, None, micro)
            return f"The default daily limit is now {format_usd(micro)}, in every process."
        controls = await self._ledger.controls(admin)
        default = controls.default_daily_micro
        current = format_usd(self._settings.user_daily_micro if default is None else default)
        return f"The default daily limit is {current}."

    async def link(self, user: str, command: LinkAccounts, private: bool) -> str:
        """A new code (asked in private only: whoever holds it joins your budget), or the
        outcome of redeeming one."""
        if command.code is None:
            if not private:
                return "Ask me for a /link code in a private chat: whoever has it can join you."
            code = await self._ledger.new_link_code(user)
            return (
                f"Your link code: {code}\nWithin {LINK_CODE_SECONDS // 60} minutes, send "
                f"/link {code} to me from your account on the other platform. Both accounts "
                "then share one daily budget. Don't give the code to anyone else."
            )
        code = link_code_typed(command.code) or command.code[:20]
        return _LINKED[await self._ledger.redeem_link_code(user, code)]

    async def unlink(self, user: str) -> str:
        if await self._ledger.unlink(user):
            return "Unlinked: your accounts have separate budgets again."
        return "This account is not linked to another one."
