"""The platform-neutral bot: authorize a chat command, run its request, answer through a Chat.

Adapters build a ``Sender`` and a ``Chat`` for each message and call ``ImageBot.handle`` (chat
text) or ``ImageBot.run`` (a typed command, as slash commands give it); every business rule
(who may spend, what to say) lives here, not in an adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import partial
from typing import Any, Protocol

from bot.admin import AdminDesk, budget_for
from bot.arrival import ArrivalOrder
from bot.balance import WalletWatch
from bot.buttons import (
    Button,
    again_command,
    cancel_button,
    input_refs,
    kept_json,
    kept_of_json,
    kept_result,
    read_press,
    result_buttons,
    vary_command,
)
from bot.catalog import find_model
from bot.chart import CHART_HEIGHT, CHART_WIDTH, DaySpend, spend_chart
from bot.commands import (
    ADMIN_COMMANDS,
    BudgetChange,
    CancelJobs,
    Command,
    Help,
    LinkAccounts,
    Models,
    PauseSpending,
    SpendQuery,
    Unlink,
    WalletQuery,
    parse,
)
from bot.config import Settings
from bot.errors import ImagebotError
from bot.images import (
    ImageResult,
    ImageService,
    JobCancelled,
    Picture,
    ResultPicture,
    SlowJob,
)
from bot.ledger import (
    PAUSED_TEXT,
    Attempt,
    Budget,
    BudgetExceeded,
    Controls,
    KeptResult,
    Ledger,
    OpenJob,
    Payment,
)
from bot.ledger.journal import SettlementJournal
from bot.line import Line, Ticket, Withdrawn
from bot.metrics import CommandKind, Metrics
from bot.money import format_usd
from bot.principals import principal
from bot.replies import help_text, models_text, report_text, spend_text
from bot.requests import (
    EditRequest,
    GenerateRequest,
    ImageCommand,
    ImageInput,
    decode_inputs,
    price_line,
)
from bot.x402 import PaymentIntent

log = logging.getLogger(__name__)

MAX_JOBS_PER_USER = 2  # one user's burst cannot crowd out everyone else
CHART_DAYS = 30  # /spend all's chart
MAX_DECODING = 2  # input pictures decoded at once, whatever the number of commands
DRAIN_SECONDS = 60.0  # how long a stopping bot lets paid requests in flight finish
RECOVER_SECONDS = 15.0  # how often a run looks for the rows and slow jobs of runs that died
CANCELS_SECONDS = 1.0  # how often a run with stoppable jobs looks for cancels asked elsewhere
ALBUM_QUIET_SECONDS = 0.8  # an album's messages arrive together; gather once none came this long
ALBUM_WAIT_SECONDS = 30.0  # an album still growing after this long is taken as it is
KEEP_RESULT_SECONDS = 2.0  # a paid picture waits no longer than this for its buttons
CLOSE_RETRY_SECONDS = 5.0  # how often a row the ledger would not close is written again
_RESTARTING = "The bot is restarting; send that again in a minute. Nothing was charged."
_CANCELLED = "Cancelled as you asked. Nothing was charged."
_BY_REQUESTER = "cancelled by the requester"
_ADMIN = "An admin can check /spend."
_MAYBE_CHARGED = f"It may have been charged. {_ADMIN}"
_CHAIN_DECIDES = "the gateway said nothing was charged; waiting for the chain"
_LEDGER_LATE = "(The spending ledger is busy; this charge is kept and recorded shortly.)"
_STOPPED_SENDING = f"Your picture was paid for, but the bot stopped while sending it. {_ADMIN}"
_UNSENT = f"Your picture was paid for but I couldn't send it. {_ADMIN}"
_BROKE_MAYBE_CHARGED = f"Something went wrong on my side. {_MAYBE_CHARGED}"
_LEDGER_DOWN = "The spending ledger can't be reached right now; try again in a minute."
_EXPIRED = (
    "That button has expired (the bot keeps results for 30 days); send the command again. "
    "Nothing was charged."
)
_PICTURE_GONE = "That picture is gone, so I can't vary it. Nothing was charged."


class Outcome(Enum):
    """How the bot dealt with one message."""

    DONE = "done"  # answered as asked (pictures delivered, text sent)
    REFUSED = "refused"  # answered with why not: bad input, a budget, a failed payment
    IGNORED = "ignored"  # not for this bot here: said nothing


class Cancellation(Enum):
    """What became of one job its requester asked to stop."""

    CANCELLED = "cancelled"  # withdrawn from the line or stopped polling: nothing was charged
    TOO_LATE = "too late"  # its payment has left: the picture comes and is charged
    NOT_YOURS = "not yours"  # only the job's requester may stop it
    GONE = "gone"  # no such job in flight: it ended (and said how), or never was
    ASKED = "asked"  # another run holds it and was asked to stop it: it tells the chat


InputSource = Callable[[], Awaitable[Sequence[ImageInput]]]
"""Downloads the pictures of an ``/img2img`` in order; raises ``InputUnavailable`` if it can't."""

Refetch = Callable[[Sequence[str]], Awaitable[Sequence[ImageInput]]]
"""Downloads pictures again by their references (``ImageInput.ref``), in order; raises
``InputUnavailable`` saying so when one can no longer be fetched."""


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
    username: str | None = None  # the platform's unique @name, never a display name

    @property
    def principal(self) -> str:
        return principal(self.platform, self.user_id)


class Chat(Protocol):
    """What the core needs from a platform to answer one message."""

    async def send_text(self, text: str) -> None: ...

    async def send_pictures(
        self, pictures: Sequence[ResultPicture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        """Deliver the pictures with the caption, and ``buttons`` under them; linked pictures
        are downloaded (``in_memory``) unless the platform fetches links itself."""

    async def show_progress(self, status: str, buttons: Sequence[Button] = ()) -> None:
        """Show what the bot is doing, with ``buttons`` under it (replacing earlier ones);
        called again with a newer status while a job runs."""

    def reply_address(self) -> str:
        """Where a later run can answer this command (JSON the adapter reads back)."""


class LedgerPayment:
    """The payer's hook for one request: records the real quote on its ledger row before signing;
    ``on_recorded`` is told once it is recorded, as the payment is about to leave. Once ``stop``
    is set (a cancel) it records nothing and raises ``Withdrawn``: nothing is signed."""

    def __init__(
        self,
        ledger: Ledger,
        row_id: int,
        budget: Budget,
        reply_to: str,
        *,
        stop: asyncio.Event | None = None,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._ledger = ledger
        self._row_id = row_id
        self._budget = budget
        self._reply_to = reply_to
        self._stop = stop
        self._on_recorded = on_recorded
        self.pricing = False  # set as the quote is recorded: from then on it may be signed
        self.signed_micro: int | None = None  # set once a payment may leave the process
        self.network: str | None = None  # the signed payment's network (CAIP-2)

    async def __call__(self, intent: PaymentIntent) -> None:
        if self._stop is not None and self._stop.is_set():
            raise Withdrawn()
        self.pricing = True
        quote = intent.quote
        await self._ledger.price(
            self._row_id,
            quote.amount_micro,
            self._budget,
            network=quote.chain.caip2,
            payer=intent.payer,
            nonce=intent.nonce,
            valid_before=intent.valid_before,
            reply_to=self._reply_to,
        )
        self.signed_micro, self.network = quote.amount_micro, quote.chain.caip2
        self._on_recorded()


class ImageBot:
    """Runs chat commands against one image service and one ledger."""

    def __init__(
        self,
        settings: Settings,
        images: ImageService,
        ledger: Ledger,
        journal: SettlementJournal,
        wallet: WalletWatch,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._images = images
        self._ledger = ledger
        self._journal = journal
        self.wallet = wallet
        self.metrics = metrics
        self._desk = AdminDesk(settings, ledger, wallet)
        self._admin_chats: dict[str, AdminChat] = {}  # by platform, once its adapter runs
        wallet.report_to(self._warn_low_balance, metrics.set_balance)
        metrics.count_jobs(self._drawing, self._waiting)
        self._jobs: Counter[str] = Counter()  # image jobs in flight per user
        self._line = Line(settings.max_concurrent_jobs)
        self._draws: dict[asyncio.Task[Any], _Draw] = {}
        self._cancelling: set[asyncio.Task[Cancellation]] = set()  # asked by other runs
        self._closing: set[asyncio.Task[None]] = set()  # rows the ledger would not close yet
        self._draining = False
        self._decoding = asyncio.Semaphore(MAX_DECODING)
        self._arrival = ArrivalOrder()
        self._chat_for: ChatFinder = _no_chat  # set by resume_jobs once adapters run

    async def drain(self, seconds: float = DRAIN_SECONDS) -> None:
        """Stop taking image commands; let paid requests in flight finish, up to ``seconds``.

        Jobs waiting in line are withdrawn (nothing was signed; their users are told); slow jobs
        kept in the ledger are stopped at once and left to the next start (their users are
        told); what is still running at the deadline is stopped as interrupted.
        """
        self._draining = True
        self._line.close()
        deadline = time.monotonic() + seconds
        # A slow job kept in the ledger stops at once, unless it is delivering a picture it
        # was charged for: that one finishes too (the next start would not send it again).
        while busy := [t for t, draw in self._draws.items() if not draw.resumable or draw.settled]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(busy, timeout=min(left, 0.25))  # a busy one may turn into a job
        tasks = list(self._draws)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in self._closing:  # the next start recovers what is still open
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def gather_album(self, sender: Sender, album: str, part: str) -> list[str]:
        """All the messages (adapter JSON) of a chat album, to the one caller that gathers them.

        Each message of the album, whichever replica received it, comes here; once no part has
        arrived for ``ALBUM_QUIET_SECONDS``, exactly one caller gets every part (in the order
        they came) and the others get ``[]``. Kept in the ledger, so replicas share albums; an
        album in a chat the bot does not serve is kept nowhere (``[]`` at once).
        """
        if not self._chat_allowed(sender):
            return []
        await self._ledger.add_album_part(album, part)
        deadline = time.monotonic() + ALBUM_WAIT_SECONDS
        quiet = ALBUM_QUIET_SECONDS
        await asyncio.sleep(quiet)
        while (parts := await self._ledger.take_album(album, quiet)) is None:
            await asyncio.sleep(ALBUM_QUIET_SECONDS / 4)
            if time.monotonic() > deadline:
                quiet = 0.0  # still growing: take what is there
        return parts

    async def resume_jobs(self, chat_for: ChatFinder, platforms: Collection[str]) -> None:
        """Finish the slow jobs of stopped runs asked on ``platforms``: poll on, deliver once to
        where they were asked, sign nothing new.

        ``chat_for`` also answers later notices (a payment the chain shows went through).
        """
        self._chat_for = chat_for
        jobs = await self._ledger.claim_jobs(platforms)
        if jobs:
            log.info("resuming %d slow job(s) of a stopped run", len(jobs))
        for open_job in jobs:  # already paid for: they take no place in the line
            try:
                job = SlowJob.from_json(open_job.job)
            except (ValueError, KeyError, TypeError):
                log.error("slow job %d is unreadable; it stays pending", open_job.row_id)
                continue
            chat = await chat_for(open_job.platform, open_job.reply_to)
            user = principal(open_job.platform, open_job.user_id)
            draw = _Draw(open_job.row_id, user, job=job, resumable=True)
            task = asyncio.create_task(self._resume(open_job, job, chat, draw))
            self._draws[task] = draw
            task.add_done_callback(self._forget)

    async def keep_resuming(
        self, chat_for: ChatFinder, platforms: Collection[str], every: float = RECOVER_SECONDS
    ) -> None:
        """``resume_jobs`` now and every ``every`` seconds, each time after resolving the pending
        rows of runs that died meanwhile (a replica whose lease expired), until cancelled."""
        while True:
            try:
                unknown, failed = await self._ledger.recover()
                if unknown or failed:
                    log.warning(
                        "a stopped run left %d payment(s) unknown and %d failed", unknown, failed
                    )
                await self.resume_jobs(chat_for, platforms)
            except Exception as error:  # the ledger is unreachable for now: try again later
                log.warning("could not look for the work of stopped runs: %s", error)
            await asyncio.sleep(every)

    async def _resume(
        self, open_job: OpenJob, job: SlowJob, chat: Chat | None, draw: _Draw
    ) -> None:
        model = find_model(open_job.model)
        name = model.name if model else open_job.model

        async def deliver(result: ImageResult) -> None:
            draw.settled = True
            caption = price_line(name, open_job.size, result.charged_micro)
            await self._hand_over(open_job.row_id, result, caption, chat, _kept_of(job))

        try:
            await self._images.finish_job(job, on_result=deliver, stop=draw.stop)
        except JobCancelled:
            await self._cancelled(draw, chat, open_job.network)
        except ImagebotError as error:
            log.info("resumed job %d failed: %s", open_job.row_id, error.user_message)
            if chat is not None:
                await _said(chat, error.user_message)
            await self._closed(
                partial(
                    self._close_failed,
                    open_job.row_id,
                    error,
                    open_job.quoted_micro,
                    open_job.network,
                )
            )
        except asyncio.CancelledError:
            if not draw.settled:
                log.info("resumed job %d left to the next start", open_job.row_id)
            elif chat is not None:  # charged, its picture cut short by the stop
                await _said(chat, _STOPPED_SENDING)
            raise
        except Exception:
            log.exception("resumed job %d failed unexpectedly", open_job.row_id)
            if draw.settled:
                if chat is not None:
                    await _said(chat, _UNSENT)
                return
            # Paid when it started: not pending any more, and not known either (the chain may say).
            unexpected = "failed unexpectedly"
            await self._closed(partial(self._mark_unknown, open_job.row_id, unexpected))
            if chat is not None:
                await _said(chat, _BROKE_MAYBE_CHARGED)

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
        *,
        answers_private: bool = False,
    ) -> Outcome:
        """Answer one command, made by ``command`` (a parser, or a slash command's options).

        ``command`` may raise ``UsageError``, which is answered; it returns None for a message
        that is not a command for this bot. ``answers_private``: what ``chat`` says reaches the
        sender alone (a press's alert), so a refusal is said even in a group.
        """
        if not self._chat_allowed(sender):
            return Outcome.IGNORED
        try:
            made = command()
        except ImagebotError as error:
            if not (self._user_allowed(sender) or sender.private or answers_private):
                return Outcome.IGNORED  # an outsider's mistake is not for a group to read
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        if made is None:
            return Outcome.IGNORED
        outcome = await self._answer(made, sender, chat, inputs, answers_private)
        self.metrics.command_done(_kind(made), outcome.value)
        return outcome

    async def press(
        self, sender: Sender, chat: Chat, data: str, fetch: Refetch, pressed: Sequence[str] = ()
    ) -> Outcome:
        """Answer a press of one of the bot's buttons, carrying ``data``.

        Again and Vary are new commands of whoever pressed, with every check a typed command
        has; ``pressed`` are the references of the pictures on the pressed message (what Vary
        varies), ``fetch`` downloads pictures by reference. Cancel stops the presser's own job.
        """
        press = read_press(data)
        if press is None:
            await chat.send_text(_EXPIRED)
            self.metrics.command_done("press", "refused")
            return Outcome.REFUSED
        if press.action == "cancel":
            outcome = await self.cancel_job(sender.principal, int(press.key))
            await chat.send_text(cancel_text([outcome]))
            return Outcome.DONE
        try:
            kept = await self._ledger.kept_result(press.key)
        except Exception as error:
            log.error("could not read a kept result: %r", error)
            await chat.send_text(f"{_LEDGER_DOWN} Nothing was charged.")
            return Outcome.REFUSED
        if kept is None or kept.platform != sender.platform:
            await chat.send_text(_EXPIRED)
            self.metrics.command_done("press", "refused")
            return Outcome.REFUSED
        if press.action == "again":
            command, refs = again_command(kept), input_refs(kept)
        elif pressed:
            command, refs = vary_command(kept), [pressed[0]]
        else:
            await chat.send_text(_PICTURE_GONE)
            return Outcome.REFUSED
        inputs = partial(fetch, refs)
        return await self.run(sender, chat, lambda: command, inputs, answers_private=True)

    async def _answer(
        self,
        command: Command,
        sender: Sender,
        chat: Chat,
        inputs: InputSource,
        answers_private: bool = False,
    ) -> Outcome:
        if isinstance(command, Help):
            await chat.send_text(help_text())
            return Outcome.DONE
        if isinstance(command, Models):
            await chat.send_text(models_text())
            return Outcome.DONE
        if isinstance(command, SpendQuery):
            try:
                return await self._spend(command, sender, chat)
            except Exception as error:  # the ledger is unreachable: one line, not silence
                log.error("could not read the ledger for /spend: %r", error)
                await chat.send_text(_LEDGER_DOWN)
                return Outcome.REFUSED
        if isinstance(command, CancelJobs):
            await chat.send_text(cancel_text(await self.cancel_jobs(sender.principal)))
            return Outcome.DONE
        if not isinstance(command, ImageCommand):
            return await self._administer(command, sender, chat, answers_private)
        if not self._user_allowed(sender):
            if not (sender.private or answers_private):  # no refusals for a group to read
                return Outcome.IGNORED
            await chat.send_text("Sorry, this bot makes pictures only for its members.")
            return Outcome.REFUSED
        try:
            command.check()  # refuse what can be refused before anything is downloaded
        except ImagebotError as error:
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        async with self._arrival.place() as ready:
            return await self._prepare(command, sender, chat, inputs, ready)

    async def _prepare(
        self,
        command: ImageCommand,
        sender: Sender,
        chat: Chat,
        inputs: InputSource,
        ready: Callable[[], None],
    ) -> Outcome:
        """The checks and downloads of an allowed image command, then its draw; ``ready`` is
        called once it stops getting ready to pay (``ArrivalOrder``)."""
        try:  # before any download: a pause or an unreachable ledger is said at once
            controls = await self._ledger.controls(sender.principal)
        except Exception as error:  # no controls, so no budget: say so rather than nothing
            log.error("could not read the ledger's controls: %r", error)
            await chat.send_text(f"{_LEDGER_DOWN} Nothing was charged.")
            return Outcome.REFUSED
        if controls.paused:
            await chat.send_text(PAUSED_TEXT)
            return Outcome.REFUSED
        try:
            request = command.build(await inputs() if command.kind == "img2img" else ())
            if isinstance(request, EditRequest):
                async with self._decoding:  # a decode may hold ~160 MB: bound how many at once
                    await decode_inputs(request)
        except ImagebotError as error:
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        if self._draining:
            await chat.send_text(_RESTARTING)
            return Outcome.REFUSED
        if self._jobs[sender.principal] >= MAX_JOBS_PER_USER:
            await chat.send_text("Wait for your previous image to finish first.")
            return Outcome.REFUSED
        self._jobs[sender.principal] += 1
        try:
            return await self._draw(request, sender, chat, controls, ready)
        finally:
            self._jobs[sender.principal] -= 1
            if not self._jobs[sender.principal]:
                del self._jobs[sender.principal]

    async def _draw(
        self,
        request: GenerateRequest | EditRequest,
        sender: Sender,
        chat: Chat,
        controls: Controls,
        ready: Callable[[], None],
    ) -> Outcome:
        attempt = Attempt(
            platform=sender.platform,
            user_id=sender.user_id,
            display_name=_printable(sender.display_name),
            username=sender.username,
            chat_id=sender.chat_ids[0] if sender.chat_ids else "",
            command=request.kind,
            model=request.model.id,
            size=request.size,
            n=request.n,
        )
        budget = self._budget(sender.principal, controls)
        try:
            row_id = await self._ledger.reserve(attempt, request.estimate_micro, budget)
        except BudgetExceeded as error:
            await chat.send_text(error.user_message)
            return Outcome.REFUSED
        except Exception as error:  # no row, so nothing may be paid: say so rather than nothing
            log.error("could not reserve a request in the ledger: %r", error)
            await chat.send_text(f"{_LEDGER_DOWN} Nothing was charged.")
            return Outcome.REFUSED
        reply_to = chat.reply_address()
        price = request.price_line(request.estimate_micro)
        verb = "Drawing" if isinstance(request, GenerateRequest) else "Editing"
        status = f"{verb} with {price}…"
        ticket = self._line.join(sender.principal)  # after the reservation: budgets come first
        draw = _Draw(row_id, sender.principal, ticket=ticket)
        payment = LedgerPayment(
            self._ledger, row_id, budget, reply_to, stop=draw.stop, on_recorded=ready
        )
        if self.wallet.address is not None:  # a proxy that pays (ClawRouter) is never stopped
            draw.payment = payment  # stoppable until its quote is priced
        task = asyncio.current_task()
        assert task is not None
        self._draws[task] = draw

        cancel = (cancel_button(row_id),)

        async def in_line(ahead: int) -> None:
            ready()  # waiting for a slot is not getting ready: let the next command on
            await _progress(chat, _waiting(ahead, price), cancel)

        async def still_working(seconds: float) -> None:
            await _progress(chat, f"{status} {seconds:.0f} s", cancel)

        kept = kept_result(request, sender.platform, sender.user_id)

        async def remember_job(job: SlowJob) -> None:
            draw.job = job
            waiting = replace(job, context=kept_json(kept))  # a later run gives it its buttons
            try:
                await self._ledger.start_job(row_id, waiting.to_json(), reply_to)
            except Exception as error:  # polling goes on; only a restart could lose it
                log.warning("could not keep slow job %d in the ledger: %s", row_id, error)
            else:
                draw.resumable = True
            await _progress(chat, status, cancel)  # polling can be stopped: nothing is charged

        async def deliver(result: ImageResult) -> None:
            draw.settled = True
            await self._hand_over(row_id, result, _caption(request, result), chat, kept)

        try:
            await ticket.turn(in_line)
            await chat.show_progress(status)
            hooks = {"on_wait": still_working, "on_result": deliver, "on_job": remember_job}
            if isinstance(request, GenerateRequest):
                await self._images.generate(request, payment, stop=draw.stop, **hooks)
            else:
                await self._images.edit(request, payment, stop=draw.stop, **hooks)
        except (Withdrawn, JobCancelled):
            await self._cancelled(draw, chat, payment.network)
            return Outcome.REFUSED
        except ImagebotError as error:
            log.info("request failed: %s", error.user_message)
            await _said(chat, error.user_message)  # whatever the platform does, the row closes
            charged = payment.signed_micro or request.estimate_micro
            await self._closed(partial(self._close_failed, row_id, error, charged, payment.network))
            return Outcome.REFUSED
        except asyncio.CancelledError:
            await self._stopped(draw, payment, chat)
            raise
        except Exception:
            log.exception("request %d failed unexpectedly", row_id)
            await self._broke(draw, payment, chat)
            return Outcome.REFUSED
        finally:
            ticket.leave()
            self._forget(task)
        return Outcome.DONE

    async def cancel_job(self, principal: str, row_id: int) -> Cancellation:
        """Stop the job of ledger row ``row_id`` if ``principal`` asked for it and it can still
        be stopped for free; a job another run holds is asked to stop through the ledger."""
        draw = next((draw for draw in self._draws.values() if draw.row_id == row_id), None)
        if draw is not None:
            if draw.principal != principal:
                return Cancellation.NOT_YOURS
            return await self._cancel(draw)
        try:
            if await self._ledger.ask_cancel(principal, row_id):
                return Cancellation.ASKED
            owner = (await self._ledger.payment(row_id)).user
        except KeyError:
            return Cancellation.GONE
        except Exception as error:  # the ledger is unreachable: no other run can be told
            log.warning("could not ask other runs to cancel a job: %r", error)
            return Cancellation.GONE
        return Cancellation.NOT_YOURS if owner != principal else Cancellation.GONE

    async def cancel_jobs(self, principal: str) -> list[Cancellation]:
        """Stop every job of ``principal``'s that can still be stopped, here and (through the
        ledger) in other runs; one outcome per job."""
        own = [draw for draw in self._draws.values() if draw.principal == principal]
        here = {draw.row_id for draw in self._draws.values()}
        try:
            elsewhere = [row for row in await self._ledger.ask_cancel(principal) if row not in here]
        except Exception as error:
            log.warning("could not ask other runs to cancel jobs: %r", error)
            elsewhere = []
        outcomes = await asyncio.gather(*(self._cancel(draw) for draw in own))
        return [*outcomes, *(Cancellation.ASKED for _ in elsewhere)]

    async def watch_cancels(self, every: float = CANCELS_SECONDS) -> None:
        """Stop the jobs here that another run was asked to cancel (``cancel_job`` checked who
        asked), every ``every`` seconds while any job here could be stopped; until cancelled."""
        while True:
            await asyncio.sleep(every)
            stoppable = {draw.row_id: draw for draw in self._draws.values() if draw.stoppable}
            if not stoppable:
                continue
            try:
                asked = await self._ledger.cancels_asked(stoppable)
            except Exception as error:  # the ledger is unreachable for now: try again later
                log.debug("could not look for cancels asked: %r", error)
                continue
            for row_id in asked:
                task = asyncio.create_task(self._cancel(stoppable[row_id]))
                self._cancelling.add(task)
                task.add_done_callback(self._cancelling.discard)

    async def _cancel(self, draw: _Draw) -> Cancellation:
        """Withdraw a waiting job, or stop a 202 job between polls; returns once it ended.

        A job whose payment has left on the 200 path (or is being sent) cannot be stopped; nor
        can a 202 job the gateway already charged, nor one whose poll in flight finds it done.
        """
        if not (draw.stoppable or draw.stop.is_set()):  # set: a cancel is under way
            return Cancellation.TOO_LATE
        draw.stop.set()  # first: the job reads it to tell a cancel from a shutdown
        if draw.ticket is not None:
            draw.ticket.withdraw()
        await draw.ended.wait()
        if draw.cancelled:
            return Cancellation.CANCELLED
        return Cancellation.TOO_LATE if draw.settled else Cancellation.GONE

    async def _cancelled(self, draw: _Draw, chat: Chat | None, network: str | None) -> None:
        """Withdrawn from the line or stopped polling: nothing was charged; the row says why."""
        if not draw.stop.is_set():  # withdrawn because the bot is stopping
            if chat is not None:
                await _said(chat, _RESTARTING)
            await self._closed(partial(self._fail, draw.row_id, "the bot stopped before signing"))
            return
        draw.cancelled = True
        log.info("request %d cancelled by its requester", draw.row_id)
        if chat is not None:
            await _said(chat, _CANCELLED)
        await self._closed(partial(self._close_uncharged, draw.row_id, _BY_REQUESTER, network))

    async def _closed(self, write: Callable[[], Awaitable[None]]) -> None:
        """A ledger write closing a row after its user was answered. One the ledger refuses is
        written again every ``CLOSE_RETRY_SECONDS`` in the background until it lands: a row left
        pending would count against its user's budget and jobs until the next start."""
        if not await _written(write):
            task = asyncio.create_task(_until_written(write))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        """A draw is over: out of the registry, and whoever waits for its end is told."""
        self._draws.pop(task).ended.set()

    async def _hand_over(
        self,
        row_id: int,
        result: ImageResult,
        caption: str,
        chat: Chat | None,
        kept: KeptResult | None = None,
    ) -> None:
        """Settle the row (kept in the journal while the ledger is busy), then send the pictures,
        with Again and Vary when their request (``kept``) could be kept."""
        recorded = await self._settle(row_id, result.charged_micro, result.tx_hash)
        if not recorded:  # the ledger is busy: no buttons either, rather than a late picture
            caption += f"\n{_LEDGER_LATE}"
        self.wallet.paid()
        if chat is None:
            log.warning("row %d is settled but its chat is not served here", row_id)
            return
        buttons = []
        if kept is not None and recorded:
            buttons = await self._result_buttons(kept, len(result.pictures))
        await chat.send_pictures(result.pictures, caption, buttons)

    async def _result_buttons(self, kept: KeptResult, pictures: int) -> list[Button]:
        """Again and Vary for a result kept in the ledger; none when it cannot be kept."""
        try:
            async with asyncio.timeout(KEEP_RESULT_SECONDS):
                token = await self._ledger.keep_result(kept)
        except Exception as error:  # the pictures matter more than their buttons
            log.warning("could not keep a result for its buttons: %r", error)
            return []
        return result_buttons(token, kept, pictures)

    async def _close_failed(
        self, row_id: int, error: ImagebotError, charged_micro: int, network: str | None
    ) -> None:
        """Record how a request ended in error: charged, not, or not known yet."""
        if error.charged is None:
            await self._mark_unknown(row_id, error.user_message)
        elif error.charged:
            await self._settle(row_id, charged_micro, None)
        else:
            await self._close_uncharged(row_id, error.user_message, network)

    async def _close_uncharged(self, row_id: int, reason: str, network: str | None) -> None:
        """The gateway charged nothing; a payment signed on a network the bot can read is left
        to the chain (the authorization stays valid until its validBefore)."""
        if network is not None and self._settings.rpc_url_for(network):
            await self._mark_unknown(row_id, f"{_CHAIN_DECIDES}: {reason}")
        else:
            await self._fail(row_id, reason)

    async def tell_settled(self, payment: Payment) -> None:
        """The chain shows a payment went through that its user was not sent pictures for.

        Told where the command was asked, when that platform runs in this process.
        """
        platform, _, _ = payment.user.partition(":")
        chat = await self._chat_for(platform, payment.reply_to) if payment.reply_to else None
        if chat is not None:
            await _said(
                chat,
                f"Your earlier {payment.command} with {payment.model} was charged "
                f"{format_usd(payment.charged_micro or payment.quoted_micro)} after all, but no "
                f"picture came back. {_ADMIN}",
            )

    async def _stopped(self, draw: _Draw, payment: LedgerPayment, chat: Chat) -> None:
        """Cancelled (a shutdown): a kept slow job is left to the next start, told to its user."""
        if draw.settled:  # an upload cut short after settling: the row stays as it is
            await _said(chat, _STOPPED_SENDING)
            return
        if draw.resumable:  # kept in the ledger: the next start polls on
            if self._draining:
                await _said(chat, "The bot is restarting; your picture will come once it is back.")
            return
        interrupted = "interrupted: shutdown"
        await self._closed(partial(self._close_interrupted, draw.row_id, payment, interrupted))
        if payment.signed_micro is not None:
            await _said(chat, f"The bot stopped before your picture arrived. {_MAYBE_CHARGED}")

    async def _broke(self, draw: _Draw, payment: LedgerPayment, chat: Chat) -> None:
        """A bug or a failing part after the request began: keep the row honest, say so once."""
        if draw.settled:
            await _said(chat, _UNSENT)
            return
        broke = "failed unexpectedly"
        await self._closed(partial(self._close_interrupted, draw.row_id, payment, broke))
        if payment.signed_micro is None:
            await _said(chat, "Something went wrong on my side. Nothing was charged; try again.")
        else:
            await _said(chat, _BROKE_MAYBE_CHARGED)

    async def _close_interrupted(self, row_id: int, payment: LedgerPayment, reason: str) -> None:
        if payment.signed_micro is None:
            await self._fail(row_id, reason)
        else:
            await self._mark_unknown(row_id, reason)

    async def _settle(self, row_id: int, charged_micro: int, tx_hash: str | None) -> bool:
        """Settle the row (kept in the journal while the ledger is busy); False if journaled."""
        self.metrics.payment_closed("settled", charged_micro)
        return await self._journal.settle(row_id, charged_micro, tx_hash)

    async def _fail(self, row_id: int, reason: str) -> None:
        await self._ledger.fail(row_id, reason)
        self.metrics.payment_closed("failed", 0)

    async def _mark_unknown(self, row_id: int, reason: str) -> None:
        await self._ledger.mark_unknown(row_id, reason)
        self.metrics.payment_closed("unknown", 0)

    def _drawing(self) -> int:
        """Jobs holding a slot now (resumed slow jobs too)."""
        return sum(1 for draw in self._draws.values() if not (draw.ticket and draw.ticket.waiting))

    def _waiting(self) -> int:
        return sum(1 for draw in self._draws.values() if draw.ticket and draw.ticket.waiting)

    async def _spend(self, query: SpendQuery, sender: Sender, chat: Chat) -> Outcome:
        if query.who is None:
            await chat.send_text(await self._spend_text(sender.principal, own=True))
            return Outcome.DONE
        if not self._settings.is_admin(sender.principal):
            await chat.send_text("Only the bot's admins can see other people's spending.")
            return Outcome.REFUSED
        if query.who == "all":
            await chat.send_text(report_text(await self._ledger.report()))
            await self._send_chart(chat, query.by_model)
            return Outcome.DONE
        user = await self._ledger.find_user(query.who) if query.who.startswith("@") else query.who
        if user is None:
            await chat.send_text(f"I have no spending recorded for {query.who}.")
            return Outcome.REFUSED
        await chat.send_text(await self._spend_text(user, own=False))
        return Outcome.DONE

    async def _spend_text(self, user: str, *, own: bool) -> str:
        budget = self._budget(user, await self._ledger.controls(user))
        return spend_text(await self._ledger.user_spend(user, budget), budget, own=own)

    async def _send_chart(self, chat: Chat, by_model: bool) -> None:
        """The last 30 days' spend per day as a picture, stacked by the top users or models."""
        today = datetime.now(UTC).date()
        first = today - timedelta(days=CHART_DAYS - 1)
        totals = await self._ledger.daily_spend(first, by_model=by_model)
        rows = [DaySpend(total.day, total.key, total.micro) for total in totals]
        title = f"Spend by {'model' if by_model else 'user'}, last {CHART_DAYS} days"
        png = await asyncio.to_thread(
            spend_chart, rows, last_day=today, days=CHART_DAYS, title=title
        )
        picture = Picture(png, "image/png", CHART_WIDTH, CHART_HEIGHT)
        await chat.send_pictures([picture], f"{title} (UTC days)")

    async def _administer(
        self, command: Command, sender: Sender, chat: Chat, answers_private: bool
    ) -> Outcome:
        """The admin commands (admins only: others learn nothing), ``/link`` and ``/unlink``."""
        user = sender.principal
        if isinstance(command, ADMIN_COMMANDS) and not self._settings.is_admin(user):
            await chat.send_text("Only the bot's admins can use that command.")
            return Outcome.REFUSED
        try:
            if isinstance(command, WalletQuery):
                text = await self._desk.wallet(user)
            elif isinstance(command, PauseSpending):
                text = await self._desk.pause(user, command)
            elif isinstance(command, BudgetChange):
                text = await self._desk.budget(user, command)
            elif isinstance(command, LinkAccounts):
                text = await self._desk.link(user, command, sender.private or answers_private)
            else:
                assert isinstance(command, Unlink)
                text = await self._desk.unlink(user)
        except Exception as error:  # the ledger is unreachable: one line, not silence
            log.error("could not answer an admin or link command: %r", error)
            text = _LEDGER_DOWN
        await chat.send_text(text)
        return Outcome.DONE

    async def ledger_answers(self) -> bool:
        """Whether the ledger answers a read (the health check)."""
        await self._ledger.controls("console:local")
        return True

    def reach_admins(self, platform: str, chat: AdminChat) -> None:
        """Send ``platform``'s admins private messages through ``chat`` (its adapter runs)."""
        self._admin_chats[platform] = chat

    async def _warn_low_balance(self, micro: int) -> None:
        """Tell every admin, privately, that the wallet is running dry."""
        wallet = self.wallet
        text = (
            f"⚠️ The bot's wallet holds {format_usd(micro)} USDC, below the "
            f"{format_usd(self._settings.low_balance_micro)} set in LOW_BALANCE_USD. Fund "
            f"{wallet.address} on {wallet.chain.v1_name} so pictures can still be paid for."
        )
        for admin in sorted(self._settings.admin_ids):
            platform, _, user_id = admin.partition(":")
            send = self._admin_chats.get(platform)
            if send is None:
                continue
            try:
                await send(user_id, text)
            except Exception as error:
                log.warning("could not warn admin %s of the low balance: %r", admin, error)

    def _budget(self, principal: str, controls: Controls) -> Budget:
        return budget_for(self._settings, principal, controls, MAX_JOBS_PER_USER)

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


@dataclass
class _Draw:
    """A paid request in flight: its row, whose it is, and how far it got."""

    row_id: int
    principal: str  # its requester, the only one who may cancel it
    ticket: Ticket | None = None  # its place in the line, then its slot (none when resumed)
    payment: LedgerPayment | None = None  # its payment, before it is signed (none when resumed)
    job: SlowJob | None = None  # the 202 job being polled
    resumable: bool = False  # a 202 job kept in the ledger: the next start can finish it
    settled: bool = False  # the gateway took the payment and the pictures are in hand
    cancelled: bool = False  # stopped at its requester's word; nothing was charged

    @property
    def stoppable(self) -> bool:
        """Waiting in line, getting its quote (nothing priced or signed yet), or a 202 job
        polled that nothing was charged for yet."""
        waiting = self.ticket is not None and self.ticket.waiting
        unpriced = self.payment is not None and not self.payment.pricing
        polling = self.job is not None and self.job.receipt_tx is None and not self.settled
        return waiting or unpriced or polling

    stop: asyncio.Event = field(default_factory=asyncio.Event)  # its requester asked to stop it
    ended: asyncio.Event = field(default_factory=asyncio.Event)


AdminChat = Callable[[str, str], Awaitable[None]]
"""(user id, text) -> a private message to that user on one platform."""

ChatFinder = Callable[[str, str], Awaitable["Chat | None"]]
"""(platform, reply address) -> a Chat answering there, or None if that platform is not running."""


async def _no_chat(platform: str, address: str) -> Chat | None:
    return None


def cancel_text(outcomes: Sequence[Cancellation]) -> str:
    """The one-line answer to ``/cancel`` (or a Cancel button): what was stopped, what was not."""
    if Cancellation.NOT_YOURS in outcomes:
        return "Only the person who asked for that picture can cancel it."
    cancelled = outcomes.count(Cancellation.CANCELLED)
    late = outcomes.count(Cancellation.TOO_LATE)
    asked = outcomes.count(Cancellation.ASKED)
    parts = []
    if cancelled:
        parts.append(f"Cancelled {_jobs(cancelled)}; nothing was charged.")
    if asked:
        parts.append(f"Stopping {_jobs(asked)}; the chat says when it has stopped.")
    if late:
        other = "other " if cancelled else ""
        parts.append(
            f"Your {other}picture is already paid for and on its way; it can't be cancelled."
            if late == 1
            else f"Your {other}pictures are already paid for and on their way; they can't be "
            "cancelled."
        )
    return " ".join(parts) or "Nothing to cancel: you have no picture waiting or being drawn."


def _waiting(ahead: int, price: str) -> str:
    """A job's status while it waits in line."""
    place = f"{_jobs(ahead)} ahead of yours" if ahead else "yours is next"
    return f"Waiting in line for {price}: {place}… (/cancel to stop it)"


def _jobs(count: int) -> str:
    return "1 job" if count == 1 else f"{count} jobs"


def _printable(name: str) -> str:
    """A platform name without control characters (PostgreSQL text cannot even hold a NUL)."""
    return "".join(ch for ch in name if ch.isprintable())


async def _progress(chat: Chat, status: str, buttons: Sequence[Button] = ()) -> None:
    try:
        await chat.show_progress(status, buttons)
    except Exception:  # a status line must never cost a paid job
        log.debug("progress update failed", exc_info=True)


async def _said(chat: Chat, text: str) -> None:
    """Tell the user; a platform failure here is logged, never raised over the real error."""
    try:
        await chat.send_text(text)
    except Exception as error:
        log.warning("could not tell the user: %s", type(error).__name__)


async def _written(write: Callable[[], Awaitable[None]]) -> bool:
    """One try of a ledger write closing a row: False when the ledger refused it."""
    try:
        await write()
    except ValueError as error:  # the row is closed already (by another run, or the chain)
        log.warning("a row to close was closed meanwhile: %s", error)
    except Exception as error:
        log.error("ledger write failed (tried again in %g s): %s", CLOSE_RETRY_SECONDS, error)
        return False
    return True


async def _until_written(write: Callable[[], Awaitable[None]]) -> None:
    """``write`` again every ``CLOSE_RETRY_SECONDS`` until it lands or finds the row closed."""
    while True:
        await asyncio.sleep(CLOSE_RETRY_SECONDS)
        if await _written(write):
            return


_KINDS: dict[type, CommandKind] = {
    SpendQuery: "spend",
    Help: "help",
    Models: "models",
    CancelJobs: "cancel",
    LinkAccounts: "link",
    Unlink: "unlink",
    WalletQuery: "wallet",
    BudgetChange: "budget",
    PauseSpending: "pause",
}


def _kind(command: Command) -> CommandKind:
    """The metrics' name for a command's kind."""
    return command.kind if isinstance(command, ImageCommand) else _KINDS[type(command)]


def _kept_of(job: SlowJob) -> KeptResult | None:
    """The request a job waited with (for its result's buttons); None for a job kept by an
    older version, or a note that is not one."""
    try:
        return kept_of_json(job.context) if job.context else None
    except (ValueError, KeyError, TypeError):
        log.warning("a slow job's request is unreadable; its result comes without buttons")
        return None


def _caption(request: GenerateRequest | EditRequest, result: ImageResult) -> str:
    caption = request.price_line(result.charged_micro)
    if result.revised_prompt:
        caption += f"\n{result.revised_prompt}"
    return caption
