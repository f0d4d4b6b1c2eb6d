"""The x402 payer against small loopback gateways, checked with the official x402 SDK as oracle."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web
from eth_account import Account
from local import serving
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
from x402.mechanisms.evm.types import ExactEIP3009Payload
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.mechanisms.evm.verify import verify_eoa_signature
from x402.schemas import PaymentPayload, PaymentRequired, SettleResponse
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1

from bot.chains import BASE
from bot.errors import PaymentRefused
from bot.http import gateway_client
from bot.x402 import (
    BadPaymentRequest,
    NoAcceptablePayment,
    PaidResponse,
    PaymentIntent,
    PaymentOutcomeUnknown,
    QuoteAboveCap,
    Receipt,
    SignedPayment,
    Wallet,
    WalletMissing,
    X402Payer,
    read_receipt,
)

# The well-known example key from the eth-account documentation, and its address.
KEY = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
TX_HASH = "0x" + "ab" * 32
CAP = 500_000
GENERATIONS = "/v1/images/generations"
RESOURCE = {"url": "https://blockrun.ai/api/v1/images/generations", "description": "image"}
SETTLED_BODY = {"created": 1741460000, "data": [{"url": "https://example.invalid/a.png"}]}


def caip2(network: str) -> str:
    """CAIP-2 id of a v2 or v1 network name, by the SDK's own tables."""
    return network if ":" in network else f"eip155:{V1_NETWORK_CHAIN_IDS[network]}"


def token(network: str) -> dict[str, Any]:
    """The SDK's USDC entry (address and EIP-712 domain) for a network."""
    return dict(DEFAULT_ASSETS[caip2(network)][0])


def offer(
    network: str = "eip155:8453",
    amount: Any = "52500",
    *,
    scheme: str = "exact",
    asset: str | None = None,
    extra: dict[str, Any] | None = None,
    timeout: Any = 300,
) -> dict[str, Any]:
    """One payment requirement; v1 when the network is a plain name like "base"."""
    usdc = token(network)
    requirement = {
        "scheme": scheme,
        "network": network,
        "asset": asset or usdc["asset"],
        "payTo": PAY_TO,
        "maxTimeoutSeconds": timeout,
        "extra": extra or {"name": usdc["name"], "version": usdc["version"]},
    }
    if ":" in network:
        return requirement | {"amount": amount}
    return requirement | {
        "maxAmountRequired": amount,
        "resource": RESOURCE["url"],
        "description": "image",
        "mimeType": "application/json",
    }


def b64json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@dataclass
class Seen:
    """One request as the gateway received it."""

    method: str
    path: str
    payment: str | None
    body: bytes


class Gateway:
    """A loopback x402 image gateway; each test sets how it (mis)behaves."""

    def __init__(self) -> None:
        self.url = ""
        self.version = 2
        self.offers: list[dict[str, Any]] = [offer()]
        self.required_header: str | None = None
        self.required_body: Any = None
        self.free = False
        self.async_job = False
        self.refuse_paid = False
        self.drop_paid = 0
        self.drop_polls = 0
        self.seen: list[Seen] = []

    @property
    def paid(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.payment is not None]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        payment = request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT")
        self.seen.append(Seen(request.method, request.path, payment, body))
        if request.method == "GET":
            if self.drop_polls:
                self.drop_polls -= 1
                return self._drop(request)
            return web.json_response({"id": "job1", "status": "completed", **SETTLED_BODY})
        if self.free:
            receipt = {"status": "settled", "tx_hash": TX_HASH, "network": "base"}
            return web.json_response({**SETTLED_BODY, "payment": receipt})
        if payment is None or self.refuse_paid:
            return self._payment_required()
        if self.drop_paid:
            self.drop_paid -= 1
            return self._drop(request)
        if self.async_job:
            job = {"id": "job1", "status": "queued", "poll_url": f"{GENERATIONS}/job1"}
            return web.json_response(job | {"payment_status": "verified"}, status=202)
        return self._settled(payment)

    def _drop(self, request: web.Request) -> web.Response:
        """Close the socket without answering, as if the connection broke."""
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    def _payment_required(self) -> web.Response:
        if self.required_header is not None:
            return web.json_response(
                {}, status=402, headers={"PAYMENT-REQUIRED": self.required_header}
            )
        if self.required_body is not None:
            return web.json_response(self.required_body, status=402)
        if self.version == 1:
            required = PaymentRequiredV1.model_validate({"x402Version": 1, "accepts": self.offers})
            return web.json_response(
                required.model_dump(by_alias=True, exclude_none=True), status=402
            )
        required = PaymentRequired.model_validate(
            {"x402Version": 2, "resource": RESOURCE, "accepts": self.offers}
        )
        header = encode_payment_required_header(required)
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})

    def _settled(self, payment: str) -> web.Response:
        decoded = decode_payment_signature_header(payment)
        settle = SettleResponse(
            success=True,
            transaction=TX_HASH,
            network=decoded.get_network(),
            payer=decoded.payload["authorization"]["from"],
        )
        name = "PAYMENT-RESPONSE" if self.version == 2 else "X-PAYMENT-RESPONSE"
        headers = {name: encode_payment_response_header(settle)}
        return web.json_response(SETTLED_BODY, headers=headers)


class CountingWallet(Wallet):
    """The real wallet, counting its signatures."""

    def __init__(self, private_key: str) -> None:
        super().__init__(private_key)
        self.signatures = 0

    def sign(self, intent: PaymentIntent) -> str:
        self.signatures += 1
        return super().sign(intent)


class Hook:
    """A payment hook that records every intent, like the ledger does."""

    def __init__(self, gateway: Gateway | None = None) -> None:
        self.gateway = gateway
        self.intents: list[PaymentIntent] = []
        self.paid_requests_before: list[int] = []

    async def __call__(self, intent: PaymentIntent) -> None:
        self.intents.append(intent)
        if self.gateway is not None:
            self.paid_requests_before.append(len(self.gateway.paid))


@pytest.fixture
async def gateway():
    gateway = Gateway()
    async with serving(("*", "/{tail:.*}", gateway.handle)) as url:
        gateway.url = url
        yield gateway


@pytest.fixture
async def http():
    async with gateway_client() as client:
        yield client


@pytest.fixture
def wallet() -> CountingWallet:
    return CountingWallet(KEY)


def verify_with_sdk(header: str, network: str, amount: int, now: float) -> ExactEIP3009Payload:
    """Check a payment header the way an x402 facilitator would, using only the SDK."""
    decoded = decode_payment_signature_header(header)
    if ":" in network:
        assert isinstance(decoded, PaymentPayload)
        assert decoded.x402_version == 2
        assert decoded.accepted.scheme == "exact"
        assert decoded.accepted.network == network
        assert decoded.accepted.asset.lower() == token(network)["asset"].lower()
        assert decoded.accepted.amount == str(amount)
    else:
        assert isinstance(decoded, PaymentPayloadV1)
        assert (decoded.scheme, decoded.network) == ("exact", network)
    evm = ExactEIP3009Payload.from_dict(decoded.payload)
    auth = evm.authorization
    usdc = token(network)
    chain_id = int(caip2(network).split(":")[1])
    digest = hash_eip3009_authorization(
        auth, chain_id, usdc["asset"], usdc["name"], usdc["version"]
    )
    assert evm.signature is not None
    assert verify_eoa_signature(digest, bytes.fromhex(evm.signature[2:]), ADDRESS)
    assert auth.from_address == ADDRESS
    assert auth.to.lower() == PAY_TO.lower()
    assert int(auth.value) == amount
    assert int(auth.valid_after) <= now < int(auth.valid_before) <= now + 3600
    assert len(bytes.fromhex(auth.nonce[2:])) == 32
    return evm


@pytest.mark.parametrize("network", ["eip155:8453", "eip155:84532"])
async def test_v2_payment_verifies_with_the_official_sdk(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet, network: str
) -> None:
    gateway.offers = [offer(network, "52500")]
    hook = Hook()
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={"prompt": "fox"}, on_payment=hook)

    assert result.response.status_code == 200
    assert [seen.payment is None for seen in gateway.seen] == [True, False]
    assert result.payment is not None
    assert result.payment.header_name == "PAYMENT-SIGNATURE"
    assert gateway.paid[0].payment == result.payment.header_value
    verify_with_sdk(result.payment.header_value, network, 52_500, time.time())
    sent = json.loads(base64.b64decode(result.payment.header_value))
    assert sent["accepted"] == offer(network, "52500")
    assert sent["resource"] == RESOURCE
    assert result.receipt == Receipt(TX_HASH)
    assert hook.intents == [result.payment.intent]
    assert wallet.signatures == 1


@pytest.mark.parametrize("network", ["base", "base-sepolia"])
async def test_v1_payment_verifies_with_the_official_sdk(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet, network: str
) -> None:
    gateway.version = 1
    gateway.offers = [offer(network, "21000")]
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={"prompt": "fox"})

    assert result.response.status_code == 200
    assert result.payment is not None
    assert result.payment.header_name == "X-PAYMENT"
    assert gateway.paid[0].payment == result.payment.header_value
    verify_with_sdk(result.payment.header_value, network, 21_000, time.time())
    assert result.receipt == Receipt(TX_HASH)
    assert wallet.signatures == 1


async def test_signature_matches_eth_account_typed_data_signing(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    payer = X402Payer(http, wallet, max_micro=CAP)
    result = await payer.post(gateway.url + GENERATIONS, json={})
    assert result.payment is not None
    intent = result.payment.intent

    expected = Account.sign_typed_data(
        KEY,
        domain_data={
            "name": "USD Coin",
            "version": "2",
            "chainId": 8453,
            "verifyingContract": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        },
        message_types={
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        message_data={
            "from": ADDRESS,
            "to": PAY_TO,
            "value": 52_500,
            "validAfter": intent.valid_after,
            "validBefore": intent.valid_before,
            "nonce": bytes.fromhex(intent.nonce[2:]),
        },
    )
    assert result.payment.signature == "0x" + expected.signature.hex().removeprefix("0x")


@pytest.mark.parametrize(("max_timeout", "lifetime"), [(120, 120), (86_400, 3600)])
async def test_validity_window_allows_clock_skew_and_is_capped_at_an_hour(
    gateway: Gateway,
    http: httpx.AsyncClient,
    wallet: CountingWallet,
    max_timeout: int,
    lifetime: int,
) -> None:
    gateway.offers = [offer(timeout=max_timeout)]
    now = 1_800_000_000
    payer = X402Payer(http, wallet, max_micro=CAP, clock=lambda: now + 0.7)

    result = await payer.post(gateway.url + GENERATIONS, json={})

    assert result.payment is not None
    assert result.payment.intent.valid_after == now - 600
    assert result.payment.intent.valid_before == now + lifetime
    verify_with_sdk(result.payment.header_value, "eip155:8453", 52_500, now)


async def test_cheapest_acceptable_offer_is_the_one_paid(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.offers = [
        offer("eip155:8453", "90000"),
        offer("eip155:84532", "30000"),
        offer("eip155:1", "1000"),
        offer("eip155:8453", "500", scheme="upto"),
    ]
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={})

    assert result.payment is not None
    assert result.payment.intent.quote.amount_micro == 30_000
    verify_with_sdk(result.payment.header_value, "eip155:84532", 30_000, time.time())


async def test_each_request_is_signed_with_a_fresh_nonce(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    payer = X402Payer(http, wallet, max_micro=CAP)
    first = await payer.post(gateway.url + GENERATIONS, json={})
    second = await payer.post(gateway.url + GENERATIONS, json={})
    assert first.payment is not None and second.payment is not None
    assert first.payment.intent.nonce != second.payment.intent.nonce


async def test_quote_above_cap_is_refused_before_signing(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.offers = [offer(amount="800000")]
    hook = Hook()
    payer = X402Payer(http, wallet, max_micro=CAP)

    with pytest.raises(QuoteAboveCap) as refused:
        await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    assert refused.value.user_message == (
        "The gateway asked $0.80 for this, above this bot's limit of $0.50 per request. "
        "Nothing was charged."
    )
    assert refused.value.charged is False
    assert hook.intents == []
    assert wallet.signatures == 0
    assert gateway.paid == []


async def test_quote_exactly_at_cap_is_paid(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.offers = [offer(amount=str(CAP))]
    payer = X402Payer(http, wallet, max_micro=CAP)
    result = await payer.post(gateway.url + GENERATIONS, json={})
    assert result.payment is not None
    verify_with_sdk(result.payment.header_value, "eip155:8453", CAP, time.time())


@pytest.mark.parametrize(
    ("offers", "reason"),
    [
        ([offer("eip155:1")], "network eip155:1"),
        ([offer(asset="0xdAC17F958D2ee523a2206206994597C13D831ec7")], "token 0xdAC17F958D2ee"),
        ([offer(scheme="upto")], "scheme upto"),
        ([offer(extra={"assetTransferMethod": "permit2"})], "transfer method permit2"),
        ([offer(scheme="upto"), offer("eip155:1")], "scheme upto, network eip155:1"),
    ],
    ids=["unknown-network", "wrong-asset", "non-exact-scheme", "permit2", "several"],
)
async def test_unpayable_offers_are_refused_before_signing(
    gateway: Gateway,
    http: httpx.AsyncClient,
    wallet: CountingWallet,
    offers: list[dict[str, Any]],
    reason: str,
) -> None:
    gateway.offers = offers
    hook = Hook()
    payer = X402Payer(http, wallet, max_micro=CAP)

    with pytest.raises(NoAcceptablePayment) as refused:
        await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    message = refused.value.user_message
    assert message.startswith("The gateway asked for a payment this bot cannot make (")
    assert reason in message
    assert message.endswith("). Nothing was charged.")
    assert refused.value.charged is False
    assert (hook.intents, wallet.signatures, gateway.paid) == ([], 0, [])


GARBAGE_REQUIREMENTS = {
    "bad-base64": "%%% not base64 %%%",
    "bad-json": base64.b64encode(b"{not json").decode(),
    "json-list": b64json([offer()]),
    "unknown-version": b64json({"x402Version": 3, "accepts": [offer()]}),
    "no-accepts": b64json({"x402Version": 2, "accepts": []}),
    "offer-not-object": b64json({"x402Version": 2, "accepts": ["exact"]}),
    "missing-network": b64json({"x402Version": 2, "accepts": [{"scheme": "exact"}]}),
    "missing-amount": b64json(
        {"x402Version": 2, "accepts": [{k: v for k, v in offer().items() if k != "amount"}]}
    ),
    "float-amount": b64json({"x402Version": 2, "accepts": [offer(amount="0.05")]}),
    "negative-amount": b64json({"x402Version": 2, "accepts": [offer(amount="-50000")]}),
    "exponent-amount": b64json({"x402Version": 2, "accepts": [offer(amount="5e4")]}),
    "number-amount": b64json({"x402Version": 2, "accepts": [offer(amount=50000)]}),
    "unicode-digit-amount": b64json({"x402Version": 2, "accepts": [offer(amount="5²")]}),
    "huge-amount": b64json({"x402Version": 2, "accepts": [offer(amount="9" * 100)]}),
    "bad-pay-to": b64json({"x402Version": 2, "accepts": [offer() | {"payTo": "me"}]}),
    "bad-timeout": b64json({"x402Version": 2, "accepts": [offer(timeout="300")]}),
    "bad-resource": b64json({"x402Version": 2, "resource": "x", "accepts": [offer()]}),
}


@pytest.mark.parametrize("header", GARBAGE_REQUIREMENTS.values(), ids=GARBAGE_REQUIREMENTS.keys())
async def test_unreadable_payment_request_is_refused_before_signing(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet, header: str
) -> None:
    gateway.required_header = header
    hook = Hook()
    payer = X402Payer(http, wallet, max_micro=CAP)

    with pytest.raises(BadPaymentRequest) as refused:
        await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    assert refused.value.user_message.endswith("Nothing was charged.")
    assert refused.value.charged is False
    assert (hook.intents, wallet.signatures, gateway.paid) == ([], 0, [])


async def test_402_without_requirements_is_refused_before_signing(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.required_body = {"error": "payment required"}
    payer = X402Payer(http, wallet, max_micro=CAP)
    with pytest.raises(BadPaymentRequest):
        await payer.post(gateway.url + GENERATIONS, json={})
    assert (wallet.signatures, gateway.paid) == (0, [])


async def test_v2_requirements_in_the_body_are_used_when_the_header_is_absent(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.required_body = {"x402Version": 2, "resource": RESOURCE, "accepts": [offer()]}
    payer = X402Payer(http, wallet, max_micro=CAP)
    result = await payer.post(gateway.url + GENERATIONS, json={})
    assert result.payment is not None
    assert result.payment.header_name == "PAYMENT-SIGNATURE"
    verify_with_sdk(result.payment.header_value, "eip155:8453", 52_500, time.time())


async def test_lying_domain_in_extra_is_ignored(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.offers = [offer(extra={"name": "Tether USD", "version": "1"})]
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={})

    assert result.payment is not None
    evm = verify_with_sdk(result.payment.header_value, "eip155:8453", 52_500, time.time())
    lying = hash_eip3009_authorization(
        evm.authorization,
        8453,
        BASE.usdc,
        "Tether USD",
        "1",
    )
    assert evm.signature is not None
    assert not verify_eoa_signature(lying, bytes.fromhex(evm.signature[2:]), ADDRESS)


async def test_dropped_connection_after_payment_resends_the_identical_request_without_resigning(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.drop_paid = 1
    hook = Hook(gateway)
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={"prompt": "fox"}, on_payment=hook)

    assert result.response.status_code == 200
    assert result.payment is not None
    first, resent = gateway.paid
    assert first.payment == resent.payment == result.payment.header_value
    assert first.body == resent.body
    assert len(hook.intents) == 1
    assert wallet.signatures == 1
    assert result.receipt == Receipt(TX_HASH)


async def test_connection_always_dropped_after_payment_is_outcome_unknown(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.drop_paid = 99
    hook = Hook()
    payer = X402Payer(http, wallet, max_micro=CAP)

    with pytest.raises(PaymentOutcomeUnknown) as unknown:
        await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    assert unknown.value.charged is None
    assert unknown.value.user_message == (
        "The connection to the image service was lost after payment was sent; the charge may "
        "or may not have gone through. An admin can check /spend."
    )
    assert len(gateway.paid) == 3
    assert len({seen.payment for seen in gateway.paid}) == 1
    assert (len(hook.intents), wallet.signatures) == (1, 1)
    sent = decode_payment_signature_header(gateway.paid[0].payment or "")
    assert sent.payload["authorization"]["nonce"] == hook.intents[0].nonce


async def test_second_402_after_paying_is_returned_not_paid_again(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.refuse_paid = True
    hook = Hook()
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    assert result.response.status_code == 402
    assert result.payment is not None
    assert len(gateway.paid) == 1
    assert (len(hook.intents), wallet.signatures) == (1, 1)


async def test_hook_refusal_stops_payment_before_signing(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    over_budget = PaymentRefused("Your daily budget is used up. Nothing was charged.")

    async def refuse(intent: PaymentIntent) -> None:
        raise over_budget

    payer = X402Payer(http, wallet, max_micro=CAP)

    with pytest.raises(PaymentRefused) as refused:
        await payer.post(gateway.url + GENERATIONS, json={}, on_payment=refuse)

    assert refused.value is over_budget
    assert (wallet.signatures, gateway.paid, len(gateway.seen)) == (0, [], 1)


async def test_hook_sees_the_intent_before_the_payment_header_is_sent(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    hook = Hook(gateway)
    payer = X402Payer(http, wallet, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    assert hook.paid_requests_before == [0]
    (intent,) = hook.intents
    assert result.payment is not None and result.payment.intent == intent
    assert (intent.payer, intent.quote.pay_to, intent.quote.amount_micro) == (
        ADDRESS,
        PAY_TO,
        52_500,
    )
    assert intent.quote.chain == BASE
    assert intent.nonce.startswith("0x") and len(intent.nonce) == 66
    sent = ExactEIP3009Payload.from_dict(
        decode_payment_signature_header(result.payment.header_value).payload
    )
    assert sent.authorization.nonce == intent.nonce


async def test_402_without_wallet_raises_wallet_missing(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    payer = X402Payer(http, None, max_micro=CAP)

    with pytest.raises(WalletMissing) as missing:
        await payer.post(gateway.url + GENERATIONS, json={})

    assert "WALLET_PRIVATE_KEY" in missing.value.user_message
    assert "ClawRouter" in missing.value.user_message
    assert missing.value.user_message.endswith("Nothing was charged.")
    assert missing.value.charged is False
    assert gateway.paid == []


@pytest.mark.parametrize("with_wallet", [False, True])
async def test_answer_without_402_is_returned_without_signing(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet, with_wallet: bool
) -> None:
    gateway.free = True
    hook = Hook()
    payer = X402Payer(http, wallet if with_wallet else None, max_micro=CAP)

    result = await payer.post(gateway.url + GENERATIONS, json={}, on_payment=hook)

    assert result == PaidResponse(result.response, None, Receipt(TX_HASH))
    assert result.response.status_code == 200
    assert (hook.intents, wallet.signatures, gateway.paid) == ([], 0, [])


async def test_poll_resends_the_same_payment_header(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.async_job = True
    gateway.drop_polls = 1
    payer = X402Payer(http, wallet, max_micro=CAP)

    submitted = await payer.post(gateway.url + GENERATIONS, json={}, on_payment=Hook())
    assert submitted.response.status_code == 202
    poll_url = gateway.url + submitted.response.json()["poll_url"]
    assert submitted.payment is not None
    polled = await payer.get(poll_url, submitted.payment.header)

    assert polled.status_code == 200
    assert polled.json()["status"] == "completed"
    polls = [seen for seen in gateway.seen if seen.method == "GET"]
    assert len(polls) == 2
    assert {seen.payment for seen in polls} == {submitted.payment.header_value}
    assert wallet.signatures == 1


async def test_poll_that_never_answers_is_outcome_unknown(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    gateway.async_job = True
    gateway.drop_polls = 99
    payer = X402Payer(http, wallet, max_micro=CAP, resend_attempts=1)
    submitted = await payer.post(gateway.url + GENERATIONS, json={})
    assert submitted.payment is not None

    with pytest.raises(PaymentOutcomeUnknown):
        await payer.get(gateway.url + f"{GENERATIONS}/job1", submitted.payment.header)

    polls = [seen for seen in gateway.seen if seen.method == "GET"]
    # Two attempts; aiohttp itself retries a GET once when a kept-alive connection drops.
    assert 2 <= len(polls) <= 4
    assert {seen.payment for seen in polls} == {submitted.payment.header_value}
    assert wallet.signatures == 1


def settle_header(network: str) -> str:
    settle = SettleResponse(success=True, transaction=TX_HASH, network=network, payer=ADDRESS)
    return encode_payment_response_header(settle)


@pytest.mark.parametrize(
    ("response", "receipt"),
    [
        (
            httpx.Response(200, headers={"PAYMENT-RESPONSE": settle_header("eip155:8453")}),
            Receipt(TX_HASH),
        ),
        (
            httpx.Response(200, headers={"X-PAYMENT-RESPONSE": settle_header("base")}),
            Receipt(TX_HASH),
        ),
        (
            httpx.Response(
                200,
                json={
                    "data": [],
                    "payment": {"status": "settled", "tx_hash": TX_HASH, "network": "base"},
                },
            ),
            Receipt(TX_HASH),
        ),
        (
            httpx.Response(
                200,
                headers={"PAYMENT-RESPONSE": "%%%"},
                json={"payment": {"tx_hash": TX_HASH, "network": "base"}},
            ),
            Receipt(TX_HASH),
        ),
        (httpx.Response(200, headers={"PAYMENT-RESPONSE": b64json([1, 2])}), None),
        (
            httpx.Response(
                402,
                headers={"PAYMENT-RESPONSE": b64json({"success": False, "transaction": TX_HASH})},
            ),
            None,
        ),
        (httpx.Response(200, content=b"\x89PNG\r\n\x1a\n"), None),
        (httpx.Response(200, json={"payment": "settled"}), None),
        (httpx.Response(200, json={"payment": {"tx_hash": 7, "network": ""}}), None),
        (httpx.Response(200, json=[1, 2]), None),
        (httpx.Response(200, headers={"X-Payment-Receipt": TX_HASH}), Receipt(TX_HASH)),
        (httpx.Response(200, headers={"X-Payment-Receipt": "=1+1"}), None),
    ],
    ids=[
        "payment-response-header",
        "x-payment-response-header",
        "body",
        "garbage-header-then-body",
        "header-not-object",
        "settlement-failed",
        "binary-body",
        "payment-not-object",
        "wrong-types",
        "body-list",
        "x-payment-receipt",
        "x-payment-receipt-not-a-hash",
    ],
)
def test_receipt_is_read_from_headers_or_body_and_garbage_is_tolerated(
    response: httpx.Response, receipt: Receipt | None
) -> None:
    assert read_receipt(response) == receipt


def test_wallet_accepts_a_key_with_or_without_0x() -> None:
    assert Wallet(KEY).address == ADDRESS
    assert Wallet(KEY.removeprefix("0x")).address == ADDRESS
    assert Wallet(f"  {KEY.upper().replace('0X', '0x')}\n").address == ADDRESS


def test_wallet_repr_and_str_show_only_the_address() -> None:
    wallet = Wallet(KEY)
    for shown in (repr(wallet), str(wallet), f"{wallet}"):
        assert shown == f"Wallet(address={ADDRESS})"


@pytest.mark.parametrize(
    "bad_key",
    [
        KEY[:-1],
        KEY + "00",
        KEY[:-1] + "g",
        "0x" + "00" * 32,
        "0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141",
    ],
    ids=["short", "long", "not-hex", "zero", "curve-order"],
)
def test_invalid_wallet_key_error_does_not_echo_the_key(bad_key: str) -> None:
    with pytest.raises(ValueError) as invalid:
        Wallet(bad_key)
    text = f"{invalid.value} {invalid.value!r}"
    assert bad_key.removeprefix("0x")[:16].lower() not in text.lower()


def test_created_wallets_are_distinct() -> None:
    first, second = Wallet.create(), Wallet.create()
    assert first.address != second.address
    assert first.address.startswith("0x") and len(first.address) == 42


async def test_wallet_refuses_to_sign_for_another_payer(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    result = await X402Payer(http, wallet, max_micro=CAP).post(gateway.url + GENERATIONS, json={})
    assert result.payment is not None
    with pytest.raises(ValueError):
        Wallet.create().sign(result.payment.intent)


async def test_key_never_appears_in_logs_or_errors(
    gateway: Gateway,
    http: httpx.AsyncClient,
    wallet: CountingWallet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    payer = X402Payer(http, wallet, max_micro=CAP, resend_attempts=0)
    url = gateway.url + GENERATIONS
    errors: list[Exception] = []
    payments: list[SignedPayment] = []

    paid = await payer.post(url, json={})
    assert paid.payment is not None
    payments.append(paid.payment)
    gateway.drop_paid = 1
    with pytest.raises(PaymentOutcomeUnknown) as unknown:
        await payer.post(url, json={})
    errors.append(unknown.value)
    gateway.offers = [offer(amount="800000")]
    with pytest.raises(QuoteAboveCap) as above:
        await payer.post(url, json={})
    errors.append(above.value)
    gateway.required_header = "%%%"
    with pytest.raises(BadPaymentRequest) as bad:
        await payer.post(url, json={})
    errors.append(bad.value)
    with pytest.raises(ValueError) as invalid:
        Wallet(KEY[:-1])
    errors.append(invalid.value)

    secret = KEY.removeprefix("0x")
    shown = [caplog.text, repr(wallet), str(wallet), repr(payments), repr(paid)]
    shown += [f"{error} {error!r} {error.__cause__!r}" for error in errors]
    for text in shown:
        assert secret not in text.lower()
        assert secret[:-1] not in text.lower()
    bot_logs = "\n".join(r.getMessage() for r in caplog.records if r.name == "bot.x402")
    assert "paying 52500 micro-USDC" in bot_logs
    assert payments[0].header_value not in caplog.text
    assert payments[0].signature not in bot_logs


async def test_exchanges_in_flight_are_capped(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    inside = peak = 0

    async def hold(_: PaymentIntent) -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.01)
        inside -= 1

    payer = X402Payer(http, wallet, max_micro=CAP, max_in_flight=3)
    await asyncio.gather(
        *(payer.post(gateway.url + GENERATIONS, json={}, on_payment=hold) for _ in range(10))
    )

    assert peak == 3
    assert wallet.signatures == 10


async def test_a_wait_before_reading_an_answer_signs_nothing_more(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    """``on_answer`` (where the image service waits for room to hold pictures) sees the quote
    and the paid answer once each, before their bodies are read; the payment is unchanged."""
    seen: list[tuple[int, bool]] = []

    async def on_answer(response: httpx.Response) -> None:
        seen.append((response.status_code, response.is_stream_consumed))
        await asyncio.sleep(0.05)

    hook = Hook(gateway)
    payer = X402Payer(http, wallet, max_micro=CAP)
    paid = await payer.post(
        gateway.url + GENERATIONS, json={}, on_payment=hook, on_answer=on_answer
    )

    assert seen == [(402, False), (200, False)]
    assert paid.response.json() == SETTLED_BODY
    assert paid.payment is not None and paid.payment.intent == hook.intents[0]
    assert paid.payment.intent.quote.amount_micro == 52_500
    assert (wallet.signatures, len(gateway.paid), hook.paid_requests_before) == (1, 1, [0])


async def test_quotes_landing_together_are_signed_a_few_per_loop_pass(
    gateway: Gateway, http: httpx.AsyncClient, wallet: CountingWallet
) -> None:
    """Hundreds of exchanges in flight must not mean hundreds of quotes parsed and signed in
    one pass of the event loop, with nothing else (heartbeats, the chat) running meanwhile."""
    loop = asyncio.get_running_loop()
    passes = 0
    counting = True

    def count_pass() -> None:  # call_soon from a callback runs in the next pass: one per pass
        nonlocal passes
        passes += 1
        if counting:
            loop.call_soon(count_pass)

    signed_in_pass: dict[int, int] = {}

    async def record(_: PaymentIntent) -> None:
        signed_in_pass[passes] = signed_in_pass.get(passes, 0) + 1

    payer = X402Payer(http, wallet, max_micro=CAP, per_pass=4)
    count_pass()
    try:
        await asyncio.gather(
            *(payer.post(gateway.url + GENERATIONS, json={}, on_payment=record) for _ in range(60))
        )
    finally:
        counting = False

    assert sum(signed_in_pass.values()) == wallet.signatures == 60
    assert max(signed_in_pass.values()) <= 4
