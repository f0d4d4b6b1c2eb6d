"""The x402 payer: reads a 402 quote, checks it against the cap, signs one USDC payment, resends.

Money leaves the wallet here, so the rules are strict: only the cheapest acceptable quote on the
pinned network at or under the cap is signed, the caller's hook records the payment before the
header is sent, one request is signed at most once, and the wallet key never appears in logs,
errors or reprs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json as jsonlib
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import coincurve
import httpx
from eth_account import Account
from eth_utils import keccak, to_checksum_address

from bot.answer_json import loads
from bot.chains import Chain, chain_for
from bot.errors import GatewayError, PaymentRefused
from bot.fetching import (
    MAX_ANSWER_BYTES,
    MAX_SMALL_BODY_BYTES,
    plain_reason,
    read_capped,
    too_large,
)
from bot.money import format_usd

logger = logging.getLogger(__name__)

MAX_VALIDITY_SECONDS = 3600
CLOCK_SKEW_SECONDS = 600
FIRST_RESEND_DELAY_SECONDS = 0.5
# Paid exchanges and polls at once. Each costs a connection, not memory: a paid answer's body
# is read only once the caller's ``on_answer`` lets it (bot/images.py's in-hand slots). Sized so
# a crowd of 200 waits for one gateway round; bot/http.py sizes the gateway pool from it.
MAX_EXCHANGES_IN_FLIGHT = 256
# Exchanges started, and quotes worked (read, signed, resent), per event-loop pass: hundreds of
# answers landing together are worked through over several passes, so the loop stays responsive
# (bench/README: worst loop lag < 50 ms) without making anyone wait another gateway round.
EXCHANGES_PER_PASS = 16

_TRANSFER_TYPEHASH = keccak(
    text="TransferWithAuthorization(address from,address to,uint256 value,"
    "uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_UINT256_DIGITS = 78


class QuoteAboveCap(PaymentRefused):
    """The quote is above the bot's per-request limit."""

    def __init__(self, amount_micro: int, max_micro: int) -> None:
        super().__init__(
            f"The gateway asked {format_usd(amount_micro)} for this, above this bot's limit of "
            f"{format_usd(max_micro)} per request. Nothing was charged."
        )


class NoAcceptablePayment(PaymentRefused):
    """No offered payment is exact-scheme USDC on a network the bot knows."""

    def __init__(self, offered: list[str]) -> None:
        super().__init__(
            f"The gateway asked for a payment this bot cannot make ({', '.join(offered)}). "
            "Nothing was charged."
        )


class WrongNetwork(PaymentRefused):
    """Every acceptable offer is on another network than the one the bot pays on."""

    def __init__(self, offered: list[str], network: Chain) -> None:
        super().__init__(
            f"The image service asked for payment on {', '.join(offered)}, but this bot pays "
            f"only on {network.caip2} ({network.v1_name}) here. Nothing was charged."
        )


class WalletMissing(PaymentRefused):
    """The gateway wants payment but the bot has no wallet key."""

    def __init__(self) -> None:
        super().__init__(
            "The image service asks for payment but this bot has no wallet; an admin must set "
            "WALLET_PRIVATE_KEY or point IMAGE_API_URL at ClawRouter. Nothing was charged."
        )


class BadPaymentRequest(GatewayError):
    """The 402 answer could not be read."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"The image service sent a payment request this bot cannot read ({reason}). "
            "Nothing was charged."
        )


class PaymentOutcomeUnknown(GatewayError):
    """The signed request was sent but no answer came back, even after resending it."""

    charged = None

    def __init__(self) -> None:
        super().__init__(
            "The connection to the image service was lost after payment was sent; the charge "
            "may or may not have gone through. An admin can check /spend."
        )


@dataclass(frozen=True)
class Quote:
    """One acceptable payment requirement the server offered."""

    version: int
    chain: Chain
    amount_micro: int
    pay_to: str
    asset: str
    max_timeout_seconds: int
    requirement: dict[str, Any]
    resource: dict[str, Any] | None


@dataclass(frozen=True)
class PaymentIntent:
    """What is about to be signed; the hook sees it before signing."""

    quote: Quote
    payer: str
    nonce: str
    valid_after: int
    valid_before: int


@dataclass(frozen=True)
class PaymentHeader:
    """The header that carries a signed payment: all a poll of its 202 job sends again."""

    name: str
    value: str = field(repr=False)


@dataclass(frozen=True)
class SignedPayment:
    """A signed payment and the exact header that carries it."""

    intent: PaymentIntent
    header_name: str
    header_value: str = field(repr=False)
    signature: str

    @property
    def header(self) -> PaymentHeader:
        return PaymentHeader(self.header_name, self.header_value)


@dataclass(frozen=True)
class Receipt:
    """The settlement the gateway reported: the transfer's transaction."""

    tx_hash: str


PaymentHook = Callable[[PaymentIntent], Awaitable[None]]
AnswerHook = Callable[[httpx.Response], Awaitable[None]]
"""Awaited once an answer's status and headers are in, before its body is read."""


@dataclass(frozen=True)
class PaidResponse:
    """The final answer and the payment made for it, if any; ``sent_before`` when an earlier
    send of that payment was lost on its way and may have been charged, whatever this says."""

    response: httpx.Response
    payment: SignedPayment | None
    receipt: Receipt | None
    sent_before: bool = False


class Wallet:
    """The bot's paying key; its repr shows only the address."""

    __slots__ = ("_key", "address")

    def __init__(self, private_key: str) -> None:
        text = private_key.strip()
        if not _PRIVATE_KEY.fullmatch(text):
            raise ValueError("wallet key must be 64 hex characters, optionally prefixed with 0x")
        secret = bytes.fromhex(text.removeprefix("0x"))
        try:
            self._key = coincurve.PrivateKey(secret)
        except ValueError:
            raise ValueError("wallet key is not a valid secp256k1 private key") from None
        self.address: str = Account.from_key(secret).address

    @classmethod
    def create(cls) -> Wallet:
        """A throwaway wallet, e.g. for the offline demo."""
        return cls(secrets.token_hex(32))

    def sign(self, intent: PaymentIntent) -> str:
        """EIP-3009 TransferWithAuthorization signature over the intent, as 0x hex."""
        if intent.payer != self.address:
            raise ValueError("the intent names another payer")
        signature = self._key.sign_recoverable(_authorization_digest(intent), hasher=None)
        return "0x" + signature[:64].hex() + f"{signature[64] + 27:02x}"

    def __repr__(self) -> str:
        return f"Wallet(address={self.address})"


def _authorization_digest(intent: PaymentIntent) -> bytes:
    """The EIP-712 digest of the intent, with the domain from the bot's own chain table."""
    quote = intent.quote
    struct_hash = keccak(
        _TRANSFER_TYPEHASH
        + _address_word(intent.payer)
        + _address_word(quote.pay_to)
        + quote.amount_micro.to_bytes(32, "big")
        + intent.valid_after.to_bytes(32, "big")
        + intent.valid_before.to_bytes(32, "big")
        + bytes.fromhex(intent.nonce.removeprefix("0x"))
    )
    return keccak(b"\x19\x01" + _domain_separator(quote.chain) + struct_hash)


@functools.cache
def _domain_separator(chain: Chain) -> bytes:
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(text=chain.token_name)
        + keccak(text=chain.token_version)
        + chain.chain_id.to_bytes(32, "big")
        + _address_word(chain.usdc)
    )


def _address_word(address: str) -> bytes:
    return bytes.fromhex(address.removeprefix("0x")).rjust(32, b"\0")


class _Pacer:
    """Lets callers on in the order they came, at most ``per_pass`` per event-loop pass, so
    timers and I/O run between them."""

    def __init__(self, per_pass: int) -> None:
        self._per_pass = per_pass
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._due = False

    async def turn(self) -> None:
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._let_on_soon()
        await turn

    def _let_on_soon(self) -> None:
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._let_on)  # in the next pass

    def _let_on(self) -> None:
        """Wake the next few; they run in the next pass, as does this for the rest."""
        self._due = False
        woken = 0
        while self._waiting and woken < self._per_pass:
            turn = self._waiting.popleft()
            if not turn.done():  # not cancelled while waiting
                turn.set_result(None)
                woken += 1
        if self._waiting:
            self._let_on_soon()


class X402Payer:
    """Sends requests to the gateway and pays a 402 at most once per request."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        wallet: Wallet | None,
        *,
        max_micro: int,
        clock: Callable[[], float] = time.time,
        resend_attempts: int = 2,
        max_in_flight: int = MAX_EXCHANGES_IN_FLIGHT,
        per_pass: int = EXCHANGES_PER_PASS,
    ) -> None:
        self._http = http
        self._wallet = wallet
        self._max_micro = max_micro
        self._clock = clock
        self._resend_attempts = resend_attempts
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._pace = _Pacer(per_pass)

    async def post(
        self,
        url: httpx.URL | str,
        *,
        json: dict[str, Any],
        on_payment: PaymentHook | None = None,
        network: Chain | None = None,
        on_answer: AnswerHook | None = None,
    ) -> PaidResponse:
        """POST json; on a 402 check the quote, let the hook record it, sign once and retry.

        With ``network``, quotes on any other network are refused before signing. ``on_answer``
        sees every answer (the quote's too) before its body is read, e.g. to wait for room.
        """
        async with self._in_flight:
            return await self._pay(url, json, on_payment, network, on_answer)

    async def get(
        self, url: str, header: PaymentHeader | None, on_answer: AnswerHook | None = None
    ) -> httpx.Response:
        """GET, e.g. to poll a 202 job, with the same payment header; resends like post."""
        async with self._in_flight:
            response, _ = await self._send("GET", url, header, None, on_answer)
            return response

    async def _pay(
        self,
        url: httpx.URL | str,
        json: dict[str, Any],
        on_payment: PaymentHook | None,
        network: Chain | None,
        on_answer: AnswerHook | None,
    ) -> PaidResponse:
        response = await self._exchange("POST", url, {}, json, on_answer)
        if response.status_code != 402:
            return PaidResponse(response, None, read_receipt(response))
        await self._pace.turn()
        quotes = parse_requirements(response)
        if network is not None:
            offered = list(dict.fromkeys(q.chain.caip2 for q in quotes))
            quotes = [q for q in quotes if q.chain == network]
            if not quotes:
                raise WrongNetwork(offered, network)
        quote = min(quotes, key=lambda q: q.amount_micro)
        if self._wallet is None:
            raise WalletMissing()
        if quote.amount_micro > self._max_micro:
            logger.info("refusing quote of %d micro-USDC above cap", quote.amount_micro)
            raise QuoteAboveCap(quote.amount_micro, self._max_micro)
        intent = self._intent(quote, self._wallet.address)
        if on_payment is not None:
            await on_payment(intent)
        payment = _signed(intent, self._wallet.sign(intent))
        response, sent_before = await self._send("POST", url, payment.header, json, on_answer)
        return PaidResponse(response, payment, read_receipt(response), sent_before)

    def _intent(self, quote: Quote, payer: str) -> PaymentIntent:
        now = int(self._clock())
        intent = PaymentIntent(
            quote=quote,
            payer=payer,
            nonce="0x" + secrets.token_bytes(32).hex(),
            valid_after=max(0, now - CLOCK_SKEW_SECONDS),
            valid_before=now + min(quote.max_timeout_seconds, MAX_VALIDITY_SECONDS),
        )
        logger.info(
            "paying %d micro-USDC on %s to %s from %s, nonce %s",
            quote.amount_micro,
            quote.chain.caip2,
            quote.pay_to,
            payer,
            intent.nonce,
        )
        return intent

    async def _send(
        self,
        method: str,
        url: httpx.URL | str,
        payment: PaymentHeader | None,
        json: dict[str, Any] | None,
        on_answer: AnswerHook | None,
    ) -> tuple[httpx.Response, bool]:
        """Send, resending the identical request on transport errors; never re-signs. The
        answer, and whether an earlier send may have reached the gateway.

        A payment whose every send met a connection never made never left: its last error is
        raised as is, not ``PaymentOutcomeUnknown``.
        """
        headers = {payment.name: payment.value} if payment else {}
        sent_before = False
        for attempt in range(self._resend_attempts + 1):
            if attempt:
                await asyncio.sleep(FIRST_RESEND_DELAY_SECONDS * 2 ** (attempt - 1))
            try:
                return await self._exchange(method, url, headers, json, on_answer), sent_before
            except httpx.TransportError as exc:
                lost = exc
                sent_before = sent_before or not isinstance(exc, httpx.ConnectError)
                logger.warning(
                    "%s %s lost (%s), attempt %d of %d",
                    method,
                    url,
                    type(exc.__cause__ or exc).__name__,
                    attempt + 1,
                    self._resend_attempts + 1,
                )
            except httpx.HTTPError as exc:
                if payment is None:
                    raise
                raise PaymentOutcomeUnknown() from exc
        if payment is None or not sent_before:
            raise lost
        logger.warning("no answer after sending a payment to %s", url)
        raise PaymentOutcomeUnknown() from lost

    async def _exchange(
        self,
        method: str,
        url: httpx.URL | str,
        headers: dict[str, str],
        json: dict[str, Any] | None,
        on_answer: AnswerHook | None,
    ) -> httpx.Response:
        """One request and its whole answer: a 200 up to the paid cap, anything else far less."""
        await self._pace.turn()
        async with self._http.stream(method, url, json=json, headers=headers) as response:
            if on_answer is not None:
                await on_answer(response)
            if response.status_code == 200:  # pictures, decoded as they arrive
                return await read_capped(response, MAX_ANSWER_BYTES, pictures=True)
            return await read_capped(response, MAX_SMALL_BODY_BYTES)


def _signed(intent: PaymentIntent, signature: str) -> SignedPayment:
    quote = intent.quote
    payload = {
        "signature": signature,
        "authorization": {
            "from": intent.payer,
            "to": quote.pay_to,
            "value": str(quote.amount_micro),
            "validAfter": str(intent.valid_after),
            "validBefore": str(intent.valid_before),
            "nonce": intent.nonce,
        },
    }
    if quote.version == 1:
        name = "X-PAYMENT"
        body: dict[str, Any] = {
            "x402Version": 1,
            "scheme": "exact",
            "network": quote.chain.v1_name,
            "payload": payload,
        }
    else:
        name = "PAYMENT-SIGNATURE"
        body = {"x402Version": 2, "accepted": quote.requirement, "payload": payload}
        if quote.resource is not None:
            body["resource"] = quote.resource
    encoded = jsonlib.dumps(body, separators=(",", ":")).encode()
    return SignedPayment(intent, name, base64.b64encode(encoded).decode(), signature)


def parse_requirements(response: httpx.Response) -> list[Quote]:
    """The payments this bot can make for a 402 answer (never empty).

    Raises BadPaymentRequest when the answer cannot be read, NoAcceptablePayment when nothing
    offered is exact-scheme EIP-3009 USDC on a known network.
    """
    offer = _payment_required(response)
    version = offer.get("x402Version")
    if type(version) is not int or version not in (1, 2):
        raise BadPaymentRequest("unknown x402 version")
    accepts = offer.get("accepts")
    if not isinstance(accepts, list) or not accepts:
        raise BadPaymentRequest("no payment options")
    resource = offer.get("resource") if version == 2 else None
    if resource is not None and not isinstance(resource, dict):
        raise BadPaymentRequest("bad resource")
    quotes: list[Quote] = []
    refusals: list[str] = []
    for requirement in accepts:
        if not isinstance(requirement, dict):
            raise BadPaymentRequest("bad payment option")
        chain, refusal = _check_offer(requirement)
        if chain is None:
            refusals.append(refusal)
        else:
            quotes.append(_quote(version, chain, requirement, resource))
    if not quotes:
        raise NoAcceptablePayment(list(dict.fromkeys(refusals))[:3])
    logger.debug("402 offers %s", [(q.chain.caip2, q.amount_micro) for q in quotes])
    return quotes


def _payment_required(response: httpx.Response) -> dict[str, Any]:
    header = response.headers.get("PAYMENT-REQUIRED")
    if header is None and too_large(response):
        raise BadPaymentRequest("too large")
    if header is None:
        try:
            body = loads(response.content)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "accepts" not in body:
            raise BadPaymentRequest("no payment requirements")
        return body
    try:
        raw = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        raise BadPaymentRequest("bad base64") from None
    try:
        offer = loads(raw)
    except ValueError:
        raise BadPaymentRequest("bad JSON") from None
    if not isinstance(offer, dict):
        raise BadPaymentRequest("bad JSON")
    return offer


def refusal_reason(response: httpx.Response) -> Any:
    """The ``error`` of a 402's payment requirements: why a payment was refused (the x402 SDK's
    servers say it only there, in the PAYMENT-REQUIRED header); None without one."""
    try:
        return _payment_required(response).get("error")
    except BadPaymentRequest:
        return None


def _check_offer(requirement: dict[str, Any]) -> tuple[Chain | None, str]:
    """The chain if the bot can pay this offer, else why not."""
    scheme = requirement.get("scheme")
    network = requirement.get("network")
    if not isinstance(scheme, str) or not isinstance(network, str):
        raise BadPaymentRequest("missing scheme or network")
    if scheme != "exact":
        return None, f"scheme {_short(scheme)}"
    chain = chain_for(network)
    if chain is None:
        return None, f"network {_short(network)}"
    asset = requirement.get("asset")
    if not isinstance(asset, str) or asset.lower() != chain.usdc.lower():
        return None, f"token {_short(str(asset))} on {chain.v1_name}"
    extra = requirement.get("extra")
    method = extra.get("assetTransferMethod", "eip3009") if isinstance(extra, dict) else "eip3009"
    if method != "eip3009":
        return None, f"transfer method {_short(str(method))}"
    return chain, ""


def _quote(
    version: int, chain: Chain, requirement: dict[str, Any], resource: dict[str, Any] | None
) -> Quote:
    amount = requirement.get("amount" if version == 2 else "maxAmountRequired")
    if not isinstance(amount, str) or not (amount.isascii() and amount.isdigit()):
        raise BadPaymentRequest("amount is not a whole number of micro-USDC")
    if len(amount) > _UINT256_DIGITS or int(amount) >= 2**256:
        raise BadPaymentRequest("amount too large")
    pay_to = requirement.get("payTo")
    if not isinstance(pay_to, str) or not _ADDRESS.fullmatch(pay_to):
        raise BadPaymentRequest("bad payTo address")
    timeout = requirement.get("maxTimeoutSeconds")
    if type(timeout) is not int or timeout <= 0:
        raise BadPaymentRequest("bad maxTimeoutSeconds")
    return Quote(
        version=version,
        chain=chain,
        amount_micro=int(amount),
        pay_to=to_checksum_address(pay_to),
        asset=chain.usdc,
        max_timeout_seconds=timeout,
        requirement=requirement,
        resource=resource,
    )


def _short(text: str) -> str:
    """A server-chosen value made safe to show in one chat line."""
    return plain_reason(text, 42)


def tx_hash_in(value: Any) -> str | None:
    """``value`` when it is a transaction hash (0x and 64 hex digits), else None: whatever else
    a gateway puts there never reaches the ledger (or a spreadsheet, through its CSV)."""
    return value if isinstance(value, str) and _TX_HASH.fullmatch(value) else None


def read_receipt(response: httpx.Response) -> Receipt | None:
    """The settlement receipt from PAYMENT-RESPONSE / X-PAYMENT-RESPONSE, else the JSON body,
    else BlockRun's X-Payment-Receipt (a bare transaction hash, as blockrun-llm reads it)."""
    for name in ("PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"):
        header = response.headers.get(name)
        if header is None:
            continue
        try:
            settled = loads(base64.b64decode(header, validate=True))
        except (binascii.Error, ValueError):
            continue
        if isinstance(settled, dict):
            receipt = _receipt(settled, "transaction")
            if receipt is not None:
                return receipt
    try:
        body = loads(response.content)
    except ValueError:
        body = None
    payment = body.get("payment") if isinstance(body, dict) else None
    if isinstance(payment, dict) and (receipt := _receipt(payment, "tx_hash")):
        return receipt
    tx_hash = tx_hash_in(response.headers.get("X-Payment-Receipt"))
    return Receipt(tx_hash) if tx_hash else None


def _receipt(report: dict[str, Any], tx_hash_key: str) -> Receipt | None:
    """The report's transaction hash, if it names one and does not say it failed."""
    if report.get("success") is False:  # x402's answer to a settlement that failed
        return None
    tx_hash = report.get(tx_hash_key)
    return Receipt(tx_hash) if isinstance(tx_hash, str) and tx_hash else None
