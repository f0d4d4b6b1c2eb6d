"""The image service: turn a request into pictures, paying for them through the x402 payer.

Handles the gateway's 200 answer and its 202 + ``poll_url`` job flow, fetches the pictures
(data URI or URL) and maps every failure to one error with one sentence for the user. The gateway
is not trusted: every exchange, poll and download has a deadline, bodies are capped, links go
only to public addresses (or the gateway's own origin), and its words reach the chat as plain
text.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pybase64
from PIL import Image

from bot.answer_json import loads
from bot.chains import Chain, gateway_chain
from bot.errors import GatewayError
from bot.fetching import (
    MAX_PICTURE_BYTES,
    decoded_answer,
    is_public,
    plain_reason,
    too_large,
)
from bot.money import MICRO_PER_USD, format_usd
from bot.requests import (
    MAX_N,
    MAX_PROMPT_CHARS,
    EditRequest,
    GenerateRequest,
    ImageInput,
    detect_mime,
)
from bot.x402 import (
    AnswerHook,
    PaidResponse,
    PaymentHeader,
    PaymentHook,
    PaymentIntent,
    PaymentOutcomeUnknown,
    Receipt,
    SignedPayment,
    X402Payer,
    read_receipt,
    refusal_reason,
    tx_hash_in,
)

log = logging.getLogger(__name__)

MAX_PICTURE_PIXELS = 64_000_000  # checked from the header, before anything decodes a picture
EXCHANGE_DEADLINE = 180.0  # seconds for one paid request and its whole answer
POLL_DEADLINE = 60.0  # seconds for one poll of a 202 job and its whole answer
_RESOLVE_DEADLINE = 10.0  # seconds to learn whether a picture link's host is public
DOWNLOAD_DEADLINE = 60.0  # seconds for one picture's download
REVISED_PROMPT_CHARS = MAX_PROMPT_CHARS  # the revised prompt shown: as long as a prompt may be
# Calls holding pictures at once: bounds the bot's memory when many multi-MB results land
# together or the chat platform uploads slowly. A call takes its slot when its answer's headers
# are in (an edit, when it builds its request), so waiting for the gateway holds none, and gives
# it back once the pictures are handed over. Every slot in use holds bytes, several MB for a
# 1.4 MB picture at its peak: 48 keeps 200 such results at once under 400 MB (bench/README).
MAX_RESULTS_IN_HAND = 48
WaitHook = Callable[[float], Awaitable[None]]  # told the seconds a slow job has run, per poll
ExchangeHook = Callable[[float], None]  # told the seconds each gateway exchange took
# JSON bigger than this is parsed (and pictures coded) in a thread: below it a parse holds the
# loop for about 2 ms at most. The thread shortens the hold but does not remove it, as json's
# parser keeps the GIL (9 MiB: 56 ms on the loop, 41 in a thread). A paid answer's JSON is small
# once its pictures are decoded.
_THREAD_THRESHOLD = 1024 * 1024


@dataclass(frozen=True)
class Picture:
    """One finished image, its format read from its bytes."""

    data: bytes
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class LinkedPicture:
    """A finished image the gateway left at a public link, not downloaded: a platform that
    fetches links itself is given ``url``; ``load`` downloads and checks it for one that can't.
    Call ``load`` only while the result is in hand (in a ``ResultHook``): that bounds memory."""

    url: str
    load: Callable[[], Awaitable[Picture]]


ResultPicture = Picture | LinkedPicture


@dataclass(frozen=True)
class ImageResult:
    """What a paid call produced."""

    pictures: tuple[ResultPicture, ...]
    charged_micro: int
    tx_hash: str | None
    revised_prompt: str | None


ResultHook = Callable[[ImageResult], Awaitable[None]]  # delivers a result while it is in hand
JobHook = Callable[["SlowJob"], Awaitable[None]]  # told of a 202 job before it is polled


class GatewayRefused(GatewayError):
    """The gateway answered with an error; nothing or something was charged as it says."""


class ContentRefused(GatewayRefused):
    """HTTP 403: the prompt broke the provider's content policy."""


class RateLimited(GatewayRefused):
    """HTTP 429: retry after ``retry_after`` seconds."""

    def __init__(self, user_message: str, retry_after: int) -> None:
        super().__init__(user_message)
        self.retry_after = retry_after


class InsufficientFunds(GatewayRefused):
    """The gateway refused the signed payment: usually an empty wallet."""


class JobAbandoned(GatewayError):
    """A slow job did not finish in time or failed: charged only if the gateway settled early."""


class JobCancelled(GatewayError):
    """A slow job's polling was stopped as asked, between polls, before it was charged."""


class BadReply(GatewayError):
    """The gateway's answer could not be used."""


class AnswerTimedOut(GatewayError):
    """The paid request was sent but its answer did not complete in time: outcome unknown."""

    charged = None

    def __init__(self) -> None:
        super().__init__(
            "The image service did not finish answering in time after the payment was sent; "
            "the charge may or may not have gone through. An admin can check /spend."
        )


_NOTHING = "Nothing was charged."
# A paid request that failed on the gateway's side with no receipt: usually nothing moved, but
# BlockRun can settle after the error (blockrun-llm's paid_request_error_prefix), so the bot
# says only what it was told.
_NO_CHARGE_REPORTED = "It reported no charge."
_CHARGED_ANYWAY = "It was charged anyway; an admin can check /spend."
_STILL_RUNNING: dict[str, Any] = {"status": "in_progress"}
_STILL_RUNNING_CODES = frozenset({202, 429, 500, 502, 503, 504})


class ImageService:
    """Generate and edit pictures on ``{api_url}/v1/images/...``, paying with ``payer``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        payer: X402Payer,
        api_url: str,
        *,
        poll_interval: float = 2.0,
        job_deadline: float = 300.0,
        exchange_deadline: float = EXCHANGE_DEADLINE,
        poll_deadline: float = POLL_DEADLINE,
        download_deadline: float = DOWNLOAD_DEADLINE,
        max_results_in_hand: int = MAX_RESULTS_IN_HAND,
        network: Chain | None = None,
        on_exchange: ExchangeHook | None = None,
    ) -> None:
        """``network`` is the one the bot pays on; by default the one ``api_url`` implies.

        ``on_exchange`` is told how long each gateway exchange took (the quote, the paid
        request, each poll), whether it ended in an answer, an error or a timeout.
        """
        self._http = http
        self._payer = payer
        self._api_url = api_url.rstrip("/")
        # Parsed once: httpx parses a URL given as a string on every request (~17 µs).
        self._generations = httpx.URL(f"{self._api_url}/v1/images/generations")
        self._image2image = httpx.URL(f"{self._api_url}/v1/images/image2image")
        self._network = network or gateway_chain(self._api_url)
        self._poll_interval = poll_interval
        self._job_deadline = job_deadline
        self._exchange_deadline = exchange_deadline
        self._poll_deadline = poll_deadline
        self._download_deadline = download_deadline
        self._in_hand = asyncio.Semaphore(max_results_in_hand)
        self._on_exchange = on_exchange

    async def generate(
        self,
        request: GenerateRequest,
        on_payment: PaymentHook | None = None,
        on_wait: WaitHook | None = None,
        on_result: ResultHook | None = None,
        on_job: JobHook | None = None,
        stop: asyncio.Event | None = None,
    ) -> ImageResult:
        """Generate; ``on_result`` gets the pictures while they hold one of the in-hand slots.

        ``on_job`` is told of a 202 job before it is polled, so it can be resumed after a restart;
        ``stop`` cancels such a job as ``finish_job`` says.
        """
        return await self._call(request, _Hooks(on_payment, on_wait, on_result, on_job, stop))

    async def edit(
        self,
        request: EditRequest,
        on_payment: PaymentHook | None = None,
        on_wait: WaitHook | None = None,
        on_result: ResultHook | None = None,
        on_job: JobHook | None = None,
        stop: asyncio.Event | None = None,
    ) -> ImageResult:
        """Edit or fuse ``request.images``; the hooks are as for ``generate``.

        The input pictures are pictures in memory too: an edit holds its in-hand slot from
        building its request (data URIs) until its result is handed over, or its job is polled.
        """
        return await self._call(request, _Hooks(on_payment, on_wait, on_result, on_job, stop))

    async def _call(self, request: GenerateRequest | EditRequest, hooks: _Hooks) -> ImageResult:
        hand = _Hand(self._in_hand)
        try:
            if isinstance(request, EditRequest):
                await hand.take()
                url, body = self._image2image, await _edit_body(request)
            else:
                url, body = self._generations, _generation_body(request)
            paid = await self._post(url, body, hooks.on_payment, hand)
            del body  # an edit's pictures: not kept while its job is polled
            reply = await self._answer(paid)
            payment, receipt, status = paid.payment, paid.receipt, paid.response.status_code
            del paid  # its body (MBs of base64) is parsed: not kept through the hand-over
            charged = _charged_micro(payment, reply, request.estimate_micro)
            if status != 202:
                await hand.take()  # already held: the answer was a 200
                return await self._finish(charged, receipt, reply, request.n, hooks.on_result)
        finally:
            hand.give_back()
        job = SlowJob(
            poll_url=self._poll_url(reply, charged if receipt else 0),
            header=payment.header if payment else None,
            charged_micro=charged,
            receipt_tx=receipt.tx_hash if receipt else None,
            n=request.n,
        )
        if hooks.on_job is not None:
            await hooks.on_job(job)
        return await self.finish_job(job, hooks.on_wait, hooks.on_result, hooks.stop)

    async def finish_job(
        self,
        job: SlowJob,
        on_wait: WaitHook | None = None,
        on_result: ResultHook | None = None,
        stop: asyncio.Event | None = None,
    ) -> ImageResult:
        """Poll a 202 job to its end and hand over its pictures; also resumes one after a restart.

        Polling holds no in-hand slot until an answer with pictures arrives; nothing is signed.
        Once ``stop`` is set, polling ends before the next poll with JobCancelled (BlockRun
        charges on the first poll that sees the job completed: one in flight is let finish, and
        a completed one is delivered); a job already charged (a receipt seen) is polled on, to
        deliver what was paid for.
        """
        polling = _Polling(job, _Hand(self._in_hand))
        try:
            reply = await self._wait_for_job(polling, on_wait, stop)
            await polling.hand.take()  # already held: a completed answer is a 200
            return await self._finish(job.charged_micro, polling.receipt, reply, job.n, on_result)
        finally:
            polling.hand.give_back()

    async def _post(
        self, url: httpx.URL, body: dict[str, Any], on_payment: PaymentHook | None, hand: _Hand
    ) -> PaidResponse:
        """The paid exchange, whole answer included, within ``exchange_deadline``; a 200's body
        is read holding ``hand``'s slot, and the time spent waiting for it is not counted."""
        signed = False
        exchange = _Stopwatch(self._on_exchange)  # the quote, then the paid request

        async def record(intent: PaymentIntent) -> None:
            nonlocal signed
            exchange.stop()
            if on_payment is not None:
                await on_payment(intent)
            signed = True  # the header is signed and sent next
            exchange.start()

        try:
            async with asyncio.timeout(self._exchange_deadline) as deadline:
                return await self._payer.post(
                    url,
                    json=body,
                    on_payment=record,
                    network=self._network,
                    on_answer=hand.taker(deadline, exchange),
                )
        except TimeoutError:
            if signed:
                raise AnswerTimedOut() from None
            raise GatewayError(f"The image service did not answer in time. {_NOTHING}") from None
        except httpx.TransportError as error:
            log.warning("image gateway unreachable: %s", type(error).__name__)
            raise GatewayError(f"I couldn't reach the image service. {_NOTHING}") from None
        finally:
            exchange.stop()

    async def _finish(
        self,
        charged: int,
        receipt: Receipt | None,
        reply: dict[str, Any],
        n: int,
        on_result: ResultHook | None,
    ) -> ImageResult:
        """Fetch or decode the first ``n`` pictures of a completed reply; hand them over.

        The pictures as the reply carried them (data URIs: MBs each) are taken out of it and let
        go once decoded, so the hand-over holds only the decoded ones."""
        items = reply.pop("data", None)
        pictures = await self._fetch_all(items, charged, n)
        stated = reply.get("payment")
        tx_hash = tx_hash_in(stated.get("tx_hash")) if isinstance(stated, dict) else None
        tx_hash = tx_hash or (tx_hash_in(receipt.tx_hash) if receipt else None)
        revised = next((_text(item.get("revised_prompt")) for item in items), None)
        revised = (plain_reason(revised, REVISED_PROMPT_CHARS) or None) if revised else None
        del items
        result = ImageResult(pictures, charged, tx_hash, revised)
        if on_result is not None:
            await on_result(result)
        return result

    async def _answer(self, paid: PaidResponse) -> dict[str, Any]:
        """The body of the paid POST: 200 is settled, 202 a job; a receipt means charged."""
        response = paid.response
        if response.status_code == 200:
            return await _json_body(response, charged=True)
        if response.status_code == 202:  # BlockRun charges a job on its completed poll
            return await _json_body(response, charged=paid.receipt is not None)
        raise _error_for(
            response, paid.payment, paid.receipt is not None, sent_before=paid.sent_before
        )

    def _poll_url(self, envelope: dict[str, Any], charged_micro: int) -> str:
        """The job's absolute poll address; only the gateway's own origin gets the payment."""
        poll_url = envelope.get("poll_url")
        resolved = urljoin(self._api_url + "/", poll_url) if isinstance(poll_url, str) else ""
        if _origin(resolved) != _origin(self._api_url):
            log.warning("a job's poll address is not on the gateway; not polling it")
            raise _bad_reply(charged_micro, "started a job without a usable poll address")
        return resolved

    async def _wait_for_job(
        self, job: _Polling, on_wait: WaitHook | None, stop: asyncio.Event | None
    ) -> dict[str, Any]:
        """Poll every ``poll_interval`` until the job completes, fails, runs out of time or is
        stopped (between polls, and only while nothing was charged)."""
        started = time.monotonic()
        deadline = started + self._job_deadline
        try:
            while time.monotonic() < deadline:
                stoppable = stop if job.receipt is None else None
                await _pause(self._poll_interval, stoppable)
                if stoppable is not None and stoppable.is_set():
                    raise JobCancelled(f"Stopped waiting for the picture as asked. {_NOTHING}")
                reply = await self._poll_once(job)
                status = reply.get("status")
                if status == "completed":
                    return reply
                job.hand.give_back()  # nothing to hand over: the slot waits for no poll
                if status == "failed":
                    reason = _error_message(reply) or "the job failed"
                    raise job.abandoned(f"The image service could not make it ({reason}).")
                if on_wait is not None:
                    await on_wait(time.monotonic() - started)
        except asyncio.CancelledError:
            log.info("stopped polling %s before it completed", job.job.poll_url)
            raise
        minutes = round(self._job_deadline / 60)
        raise job.abandoned(f"The image was not ready after {minutes} min, so I stopped waiting.")

    async def _poll_once(self, job: _Polling) -> dict[str, Any]:
        """One poll's body; anything that means "not yet" reads as ``in_progress``.

        BlockRun answers an unfinished job 202; 429, 5xx and a lost connection are asked again
        with the same payment header; 402 means the settlement failed. Any answer with a
        settlement receipt marks the job charged, whatever its status.
        """
        exchange = _Stopwatch(self._on_exchange)
        try:
            async with asyncio.timeout(self._poll_deadline) as deadline:
                taker = job.hand.taker(deadline, exchange)
                response = await self._payer.get(job.job.poll_url, job.job.header, taker)
        except (httpx.TransportError, PaymentOutcomeUnknown, TimeoutError):
            return _STILL_RUNNING
        finally:
            exchange.stop()
        job.receipt = read_receipt(response) or job.receipt
        if response.status_code == 200:  # unreadable: it may have said "completed"
            return await _json_body(response, charged=True if job.receipt else None)
        if response.status_code in _STILL_RUNNING_CODES:
            return _STILL_RUNNING
        if response.status_code == 402 and job.receipt is None:
            reason = _refusal(response) or "refused"
            raise InsufficientFunds(
                f"The image service could not collect the payment ({reason}). {_NOTHING} "
                "An admin should check that the bot's wallet has USDC."
            )
        raise _error_for(response, job.job.header, job.receipt is not None)

    async def _fetch_all(self, items: Any, charged_micro: int, n: int) -> tuple[ResultPicture, ...]:
        if not isinstance(items, list) or not items:
            raise _bad_reply(charged_micro, "sent no image")
        if len(items) > n:
            log.warning("the gateway sent %d pictures for n=%d; taking %d", len(items), n, n)
        fetches = [self._fetch(item, charged_micro) for item in items[:n]]
        return tuple(await asyncio.gather(*fetches))

    async def _fetch(self, item: Any, charged_micro: int) -> ResultPicture:
        url = item.get("url") or item.get("b64_json") if isinstance(item, dict) else None
        if isinstance(url, bytes):  # a data URI, decoded with the answer
            return _picture(url, charged_micro)
        if not isinstance(url, str):
            raise _bad_reply(charged_micro, "sent an image without an address")
        if url.startswith("data:") or not url.startswith(("http://", "https://")):
            data = await _to_thread_if_big(len(url), _decode_data_uri, url)
        elif await _publicly_linked(url):
            return LinkedPicture(url, functools.partial(self._load, url, charged_micro))
        else:
            data = await self._download(url, charged_micro)
        if data is None:
            raise _bad_reply(charged_micro, "sent an image I can't decode")
        return _picture(data, charged_micro)

    async def _load(self, url: str, charged_micro: int) -> Picture:
        return _picture(await self._download(url, charged_micro), charged_micro)

    async def _download(self, url: str, charged_micro: int) -> bytes:
        """A picture's bytes, within ``download_deadline``, from a public address or the
        gateway's own origin; redirects are not followed."""
        try:
            async with asyncio.timeout(self._download_deadline):
                if _origin(url) != _origin(self._api_url) and not await is_public(url):
                    log.warning("a picture link is not on a public address; not fetching it")
                    raise _bad_reply(charged_micro, "gave an image link to a private address")
                return await self._read_picture(url, charged_micro)
        except TimeoutError:
            what = "sent an image that did not finish downloading in time"
            raise _bad_reply(charged_micro, what) from None
        except (httpx.HTTPError, OSError, ValueError):
            raise _bad_reply(charged_micro, "gave an image link I couldn't fetch") from None

    async def _read_picture(self, url: str, charged_micro: int) -> bytes:
        async with self._http.stream("GET", url) as response:
            if response.status_code != 200:
                raise _bad_reply(charged_micro, "gave an image link that does not work")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_PICTURE_BYTES:
                    raise _bad_reply(charged_micro, "sent an image that is too big")
                chunks.append(chunk)
            return b"".join(chunks)


@dataclass(frozen=True)
class SlowJob:
    """A job the gateway answered 202: everything needed to poll it on, in this run or the next.

    The payment header holds no key, and its nonce makes it single-use: presenting it again can
    settle this job only.
    """

    poll_url: str  # absolute, on the gateway's origin
    header: PaymentHeader | None  # None when a proxy such as ClawRouter paid
    charged_micro: int  # what the job costs once completed
    receipt_tx: str | None = None  # a settlement receipt already seen (on the 202 itself)
    n: int = MAX_N  # the most pictures taken from its answer
    context: str | None = None  # the caller's own note, kept with the job (the request)

    def to_json(self) -> str:
        header = self.header
        return json.dumps(
            {
                "poll_url": self.poll_url,
                "header": None if header is None else [header.name, header.value],
                "charged_micro": self.charged_micro,
                "receipt_tx": self.receipt_tx,
                "n": self.n,
                "context": self.context,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SlowJob:
        """ValueError (or KeyError/TypeError) when ``text`` is not what ``to_json`` wrote."""
        fields = json.loads(text)
        header = fields["header"]
        return cls(
            poll_url=str(fields["poll_url"]),
            header=None if header is None else PaymentHeader(str(header[0]), str(header[1])),
            charged_micro=int(fields["charged_micro"]),
            receipt_tx=fields.get("receipt_tx"),
            n=int(fields.get("n", MAX_N)),
            context=fields.get("context"),
        )


class _Hand:
    """One call's in-hand slot: taken once an answer with pictures starts to arrive, given back
    after they are handed over (or the call failed)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def take(self) -> None:
        """Hold a slot; at once if this call holds one already."""
        if not self._held:
            await self._slots.acquire()
            self._held = True

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()

    def taker(self, deadline: asyncio.Timeout, exchange: _Stopwatch) -> AnswerHook:
        """The payer's ``on_answer``: a 200 (pictures) waits for a slot before its body is read;
        the wait is ours, not the gateway's, so ``deadline`` and ``exchange`` leave it out."""

        async def on_answer(response: httpx.Response) -> None:
            if response.status_code != 200 or self._held or deadline.expired():
                return
            when, started = deadline.when(), time.monotonic()  # the loop's clock
            deadline.reschedule(None)
            try:
                await self.take()
            finally:
                waited = time.monotonic() - started
                exchange.skip(waited)
                if when is not None:
                    deadline.reschedule(when + waited)

        return on_answer


@dataclass
class _Polling:
    """A 202 job being polled, any settlement receipt seen for it so far, and its slot."""

    job: SlowJob
    hand: _Hand
    receipt: Receipt | None = None

    def __post_init__(self) -> None:
        if self.job.receipt_tx is not None:
            self.receipt = Receipt(self.job.receipt_tx)

    def abandoned(self, what: str) -> JobAbandoned:
        """A job given up on: charged only if some answer carried a receipt."""
        if self.receipt is None:
            return JobAbandoned(f"{what} {_NOTHING}")
        error = JobAbandoned(f"{what} {_CHARGED_ANYWAY}")
        error.charged = True
        return error


class _Stopwatch:
    """Times one exchange at a time from ``start`` (or creation) to ``stop`` for ``on_exchange``;
    a stop without a start in between tells nothing."""

    def __init__(self, on_exchange: ExchangeHook | None) -> None:
        self._on_exchange = on_exchange
        self._started: float | None = time.monotonic()

    def start(self) -> None:
        self._started = time.monotonic()

    def skip(self, seconds: float) -> None:
        """Leave ``seconds`` that were not the gateway's out of the exchange being timed."""
        if self._started is not None:
            self._started += seconds

    def stop(self) -> None:
        started, self._started = self._started, None
        if started is not None and self._on_exchange is not None:
            self._on_exchange(time.monotonic() - started)


@dataclass(frozen=True)
class _Hooks:
    on_payment: PaymentHook | None
    on_wait: WaitHook | None
    on_result: ResultHook | None
    on_job: JobHook | None
    stop: asyncio.Event | None


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep ``seconds``, or less once ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def _picture(data: bytes, charged_micro: int) -> Picture:
    mime = detect_mime(data)
    if mime is None or len(data) > MAX_PICTURE_BYTES:
        raise _bad_reply(charged_micro, "sent a file that is not a PNG, JPEG or WebP")
    too_big = _bad_reply(charged_micro, "sent an image too large to open")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_big from None
    except (OSError, ValueError):
        raise _bad_reply(charged_micro, "sent an image I can't read") from None
    if width * height > MAX_PICTURE_PIXELS:
        raise too_big
    return Picture(data, mime, width, height)


async def in_memory(pictures: Sequence[ResultPicture]) -> list[Picture]:
    """The pictures as bytes, linked ones downloaded (with every check), in order."""
    return list(await asyncio.gather(*(_in_memory(picture) for picture in pictures)))


async def _in_memory(picture: ResultPicture) -> Picture:
    return await picture.load() if isinstance(picture, LinkedPicture) else picture


async def _publicly_linked(url: str) -> bool:
    """Whether a picture link is on a public address, so a chat platform may fetch it itself:
    never the gateway's own loopback or private origin, nor a host that does not resolve."""
    try:
        async with asyncio.timeout(_RESOLVE_DEADLINE):
            return await is_public(url)
    except (OSError, TimeoutError, ValueError):
        return False


def _bad_reply(charged_micro: int, what: str) -> BadReply:
    """An unusable answer to a call that cost ``charged_micro`` (0: nothing was charged)."""
    if not charged_micro:
        return BadReply(f"The image service {what}. {_NOTHING}")
    error = BadReply(f"The image service {what}; {format_usd(charged_micro)} was charged for it.")
    error.charged = True
    return error


def _charged_micro(
    payment: SignedPayment | None, reply: dict[str, Any], estimate_micro: int
) -> int:
    """What this call costs: the signed amount, else the catalog's estimate, or the gateway's
    stated price when that is lower.

    Without a signed payment (a proxy such as ClawRouter paid, or a gateway that skipped the
    402), a gateway-stated amount is never trusted above the estimate.
    """
    if payment is not None:
        return payment.intent.quote.amount_micro
    price = reply.get("price")
    stated = price.get("amount") if isinstance(price, dict) else None
    try:
        micro = Decimal(str(stated)) * MICRO_PER_USD
    except (InvalidOperation, ValueError):
        return estimate_micro
    if not micro.is_finite() or micro < 0 or micro != micro.to_integral_value():
        return estimate_micro
    return min(int(micro), estimate_micro)


def _error_for(
    response: httpx.Response,
    payment: SignedPayment | PaymentHeader | None,
    charged: bool | None,
    *,
    sent_before: bool = False,
) -> GatewayError:
    """The error a failed answer means; ``sent_before`` when it answers a payment sent again
    after an earlier send was lost on its way."""
    status = response.status_code
    detail = _refusal(response) if status == 402 else _error_message(_safe_json(response))
    charge_note = _CHARGED_ANYWAY if charged else _NOTHING
    if payment is not None and not charged and status >= 500:
        charge_note = _NO_CHARGE_REPORTED
    error: GatewayError
    used = status == 402 and "nonce" in (detail or "").lower()
    if payment is not None and not charged and (sent_before or used):
        # The first send may have been charged with its answer lost (a nonce already used is
        # that, whoever sent it again): nothing in this answer proves otherwise.
        reason = f": {detail}" if detail else ""
        error = GatewayRefused(
            f"The connection dropped after the payment was sent, and the image service refused "
            f"it when it came again (HTTP {status}{reason}); it may have been charged. An admin "
            "can check /spend."
        )
        charged = None
    elif status == 403:
        error = ContentRefused(
            f"The image service refused this prompt under its content policy. {charge_note}"
        )
    elif status == 429:
        retry_after = _retry_after(response)
        error = RateLimited(
            f"The image service is busy; try again in {retry_after} s. {charge_note}", retry_after
        )
    elif status == 402:
        reason = f" ({detail})" if detail else ""
        error = InsufficientFunds(
            f"The image service did not accept the bot's payment{reason}. {charge_note} "
            "An admin should check that the bot's wallet has USDC."
        )
    elif status == 400:
        reason = detail or "invalid request"
        error = GatewayRefused(f"The image service rejected the request: {reason}. {charge_note}")
    elif status == 504:
        error = GatewayRefused(f"The image service timed out. {charge_note} Try again.")
    else:
        error = GatewayRefused(f"The image service failed (HTTP {status}). {charge_note}")
    error.charged = charged
    return error


def _refusal(response: httpx.Response) -> str | None:
    """Why a 402 refused the payment: the facilitator's reason BlockRun gives as ``details``,
    else the body's error, else its payment requirements' (the x402 SDK's servers say it only
    in PAYMENT-REQUIRED)."""
    body = _safe_json(response)
    details = body.get("details") if isinstance(body, dict) else None
    if details:
        return plain_reason(str(details)) or None
    return _error_message(body) or _error_message({"error": refusal_reason(response)})


def _retry_after(response: httpx.Response) -> int:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isdigit() else 30


def _error_message(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return (plain_reason(str(message)) or None) if message else None


def _safe_json(response: httpx.Response) -> Any:
    try:
        return loads(response.content)
    except ValueError:
        return None


async def _json_body(response: httpx.Response, charged: bool | None) -> dict[str, Any]:
    try:
        answer = decoded_answer(response)
        body = await _to_thread_if_big(len(answer.text), answer.parse)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        note = {
            True: "It was charged; an admin can check /spend.",
            None: "It may have been charged; an admin can check /spend.",
            False: _NOTHING,
        }[charged]
        what = "a reply too large to read" if too_large(response) else "a reply I can't read"
        error = BadReply(f"The image service sent {what}. {note}")
        error.charged = charged
        raise error
    return body


def _text(value: Any) -> str | None:
    """A gateway field that should be text, or None when it is anything else."""
    return value if isinstance(value, str) and value else None


def _generation_body(request: GenerateRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model.id,
        "prompt": request.prompt,
        "size": request.size,
        "n": request.n,
    }
    if request.quality:
        body["quality"] = request.quality
    return body


async def _edit_body(request: EditRequest) -> dict[str, Any]:
    images = await _to_thread_if_big(
        sum(len(image.data) for image in request.images), _data_uris, request.images
    )
    body: dict[str, Any] = {
        "model": request.model.id,
        "prompt": request.prompt,
        "image": images[0] if len(images) == 1 else images,
        "size": request.size,
        "n": request.n,
    }
    if request.mask is not None:
        body["mask"] = _data_uris((request.mask,))[0]
    if request.quality:
        body["quality"] = request.quality
    return body


def _data_uris(images: tuple[ImageInput, ...]) -> list[str]:
    return [
        f"data:{image.mime};base64,{pybase64.b64encode_as_string(image.data)}" for image in images
    ]


def _decode_data_uri(uri: str) -> bytes | None:
    _, _, payload = uri.partition(",") if uri.startswith("data:") else ("", "", uri)
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


async def _to_thread_if_big(size: int, function: Any, *args: Any) -> Any:
    if size > _THREAD_THRESHOLD:
        return await asyncio.to_thread(function, *args)
    return function(*args)
