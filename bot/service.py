"""The platform-neutral bot: authorize a chat command, run its request, answer through a Chat.

Adapters build a ``Sender`` and a ``Chat`` for each message and call ``ImageBot.handle`` (chat
text) or ``ImageBot.run`` (a typed command, as slash commands give it); every business rule
(who may spend, what to say) lives here, not in an adapter.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Protocol

from bot.commands import Command, Help, Models, SpendQuery, parse
from bot.config import Settings
from bot.errors import ImagebotError
from bot.images import ImageResult, ImageService, Picture
from bot.ledger import Attempt, Budget, BudgetExceeded, Ledger
from bot.principals import principal
from bot.replies import help_text, models_text, report_text, spend_text
from bot.requests import EditRequest, GenerateRequest, ImageInput
from bot.x402 import PaymentIntent

log = logging.getLogger(__name__)

MAX_JOBS_PER_USER = 2  # one user's burst cannot crowd out everyone else


class Outcome(Enum):
    """How the bot dealt with one message."""

    DONE = "done"  # answered as asked (pictures delivered, text sent)
    REFUSED = "refused"  # answered with why not: bad input, a budget, a failed payment
    IGNORED = "ignored"  # not for this bot here: said nothing


InputSource = Callable[[], Awaitable[Sequence[ImageInput]]]
"""Downloads the pictures of an ``/img2img`` in order; raises ``InputUnavailable`` if it can't."""


async def no_inputs() -> Sequence[ImageInput]:
    return ()


@dataclass(frozen=True)
class Sender:
    """Who wrote a message, and where."""

    platform: str
    user_id: str
    display_name: str
    chat_ids: tuple[str, ...]  # the chat, and on Discord also the guild
    private: bool

    @property
    def principal(self) -> str:
        return principal(self.platform, self.user_id)


class Chat(Protocol):
    """What the core needs from a platform to answer one message."""

    async def send_text(self, text: str) -> None: ...

    async def send_pictures(self, pictures: Sequence[Picture], caption: str) -> None: ...

    async def show_progress(self, status: str) -> None:
        """Show what the bot is doing; called again with a newer status while a job runs."""


class LedgerPayment:
    """The payer's hook for one request: records the real quote on its ledger row before signing."""

    def __init__(self, ledger: Ledger, row_id: int, budget: Budget) -> None:
        self._ledger = ledger
        self._row_id = row_id
        self._budget = budget
        self.signed_micro: int | None = None  # set once a payment may leave the process

    async def __call__(self, intent: PaymentIntent) -> None:
        quote = intent.quote
        await self._ledger.price(
            self._row_id,
            quote.amount_micro,
            self._budget,
            network=quote.chain.caip2,
            payer=intent.payer,
            nonce=intent.nonce,
            valid_before=intent.valid_before,
        )
        self.signed_micro = quote.amount_micro


class ImageBot:
    """Runs chat commands against one image service and one ledger."""

    def __init__(self, settings: Settings, images: ImageService, ledger: Ledger) -> None:
        self._settings = settings
        self._images = images
        self._ledger = ledger
        self._jobs: Counter[str] = Counter()  # image jobs in flight per user

    async def handle(
        self,
        sender: Sender,
        chat: Chat,
        text: str,
        inputs: InputSource = no_inputs,
        *,
        bot_username: str | None = None,
    ) -> Outcome:
        """Answer one chat message; ``inputs`` fetches its pictures if it turns out to need them."""
        return await self.run(sender, chat, partial(parse, text, bot_username=bot_username), inputs)

    async def run(
        self,
        sender: Sender,
        chat: Chat,
        command: Callable[[], Command | None],
        inputs: InputSource = no_inputs,
    ) -> Outcome:
        """Answer one command, made by ``command`` (a parser, or a slash command's options).

        ``command`` may raise ``UsageError``, which is answered; it returns None for a message
        that is not a command for this bot.
        """
        if not self._chat_allowed(sender):
            return Outcome.IGNORED
        try:
            made = command()
        except ImagebotError as error:
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        if made is None:
            return Outcome.IGNORED
        return await self._answer(made, sender, chat, inputs)

    async def _answer(
        self, command: Command, sender: Sender, chat: Chat, inputs: InputSource
    ) -> Outcome:
        if isinstance(command, Help):
            await chat.send_text(help_text())
            return Outcome.DONE
        if isinstance(command, Models):
            await chat.send_text(models_text())
            return Outcome.DONE
        if isinstance(command, SpendQuery):
            return await self._spend(command, sender, chat)
        try:
            command.check()  # refuse what can be refused before anything is downloaded
            if not self._user_allowed(sender):
                if not sender.private:
                    return Outcome.IGNORED
                await chat.send_text("Sorry, this bot makes pictures only for its members.")
                return Outcome.REFUSED
            request = command.build(await inputs() if command.kind == "img2img" else ())
        except ImagebotError as error:
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        if self._jobs[sender.principal] >= MAX_JOBS_PER_USER:
            await chat.send_text("Wait for your previous image to finish first.")
            return Outcome.REFUSED
        self._jobs[sender.principal] += 1
        try:
            return await self._draw(request, sender, chat)
        finally:
            self._jobs[sender.principal] -= 1
            if not self._jobs[sender.principal]:
                del self._jobs[sender.principal]

    async def _draw(
        self, request: GenerateRequest | EditRequest, sender: Sender, chat: Chat
    ) -> Outcome:
        attempt = Attempt(
            platform=sender.platform,
            user_id=sender.user_id,
            display_name=sender.display_name,
            chat_id=sender.chat_ids[0] if sender.chat_ids else "",
            command=request.kind,
            model=request.model.id,
            size=request.size,
            n=request.n,
        )
        budget = self._budget(sender.principal)
        try:
            row_id = await self._ledger.reserve(attempt, request.estimate_micro, budget)
        except BudgetExceeded as error:
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        payment = LedgerPayment(self._ledger, row_id, budget)
        verb = "Drawing" if isinstance(request, GenerateRequest) else "Editing"
        status = f"{verb} with {request.price_line(request.estimate_micro)}…"
        await chat.show_progress(status)

        async def still_working(seconds: float) -> None:
            try:
                await chat.show_progress(f"{status} {seconds:.0f} s")
            except Exception:  # a status line must never cost a paid job
                log.debug("progress update failed", exc_info=True)

        settled = False

        async def deliver(result: ImageResult) -> None:
            nonlocal settled
            await self._ledger.settle(row_id, result.charged_micro, result.tx_hash)
            settled = True
            await chat.send_pictures(result.pictures, _caption(request, result))

        try:
            if isinstance(request, GenerateRequest):
                await self._images.generate(request, payment, still_working, deliver)
            else:
                await self._images.edit(request, payment, still_working, deliver)
        except ImagebotError as error:
            log.info("request failed: %s", error.user_message)
            await self._close_failed(row_id, payment, error, request.estimate_micro)
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        except BaseException as error:  # cancelled at shutdown, or a bug: keep the row honest
            if not settled:  # an upload that failed after settling leaves the row as it is
                await self._close_interrupted(row_id, payment, error)
            raise
        return Outcome.DONE

    async def _close_failed(
        self, row_id: int, payment: LedgerPayment, error: ImagebotError, estimate_micro: int
    ) -> None:
        if error.charged is None:
            await self._ledger.mark_unknown(row_id, error.user_message)
        elif error.charged:
            charged = payment.signed_micro if payment.signed_micro is not None else estimate_micro
            await self._ledger.settle(row_id, charged, None)
        else:
            await self._ledger.fail(row_id, error.user_message)

    async def _close_interrupted(
        self, row_id: int, payment: LedgerPayment, error: BaseException
    ) -> None:
        reason = f"interrupted: {type(error).__name__}"
        if payment.signed_micro is None:
            await self._ledger.fail(row_id, reason)
        else:
            await self._ledger.mark_unknown(row_id, reason)

    async def _spend(self, query: SpendQuery, sender: Sender, chat: Chat) -> Outcome:
        if query.who is None:
            spend = await self._ledger.user_spend(sender.principal, self._budget(sender.principal))
            await chat.send_text(spend_text(spend, own=True))
            return Outcome.DONE
        if not self._settings.is_admin(sender.principal):
            await chat.send_text("Only the bot's admins can see other people's spending.")
            return Outcome.REFUSED
        if query.who == "all":
            await chat.send_text(report_text(await self._ledger.report()))
            return Outcome.DONE
        user = await self._ledger.find_user(query.who) if query.who.startswith("@") else query.who
        if user is None:
            await chat.send_text(f"I have no spending recorded for {query.who}.")
            return Outcome.REFUSED
        spend = await self._ledger.user_spend(user, self._budget(user))
        await chat.send_text(spend_text(spend, own=False))
        return Outcome.DONE

    def _budget(self, principal: str) -> Budget:
        return Budget(
            user_daily_micro=self._settings.user_daily_micro,
            global_daily_micro=self._settings.global_daily_micro,
            exempt=self._settings.is_admin(principal),
        )

    def _chat_allowed(self, sender: Sender) -> bool:
        allowed = self._settings.allowed_chats
        if not allowed or sender.private:
            return True
        return any(f"{sender.platform}:{chat_id}" in allowed for chat_id in sender.chat_ids)

    def _user_allowed(self, sender: Sender) -> bool:
        allowed = self._settings.allowed_users
        return (
            not allowed or sender.principal in allowed or self._settings.is_admin(sender.principal)
        )


def _caption(request: GenerateRequest | EditRequest, result: ImageResult) -> str:
    caption = request.price_line(result.charged_micro)
    if result.revised_prompt:
        caption += f"\n{result.revised_prompt}"
    return caption
