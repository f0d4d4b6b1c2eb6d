"""The sandbox's x402 facilitator: quotes, payment checks and in-memory settlement.

Signatures are checked for real (EIP-712 recovery of the EIP-3009 authorization's signer).
An authorization's (from, nonce) pair is accepted once, even when the request then fails:
every request, retries included, needs a freshly signed payment.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_utils import keccak, to_checksum_address

from bot.chains import Chain

# keccak("imagebot sandbox")[-20:]: an address nobody holds a key for.
SANDBOX_PAY_TO = "0x1f9994449098867e0A14f77DcAD0fD3beBe3ae15"
MAX_TIMEOUT_SECONDS = 300

_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_HEX_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
_DIGITS = re.compile(r"[0-9]{1,78}")
_AUTHORIZATION_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}


@dataclass(frozen=True)
class Settlement:
    """One charge the sandbox settled."""

    tx_hash: str
    payer: str
    amount_micro: int
    nonce: str
    model: str
    settled_at: float


@dataclass(frozen=True)
class Payment:
    """A decoded x402 payment: one EIP-3009 authorization and its signature."""

    payer: str
    pay_to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str


class Refused(Exception):
    """A payment the sandbox will not accept; the message is the x402 error reason."""


class Facilitator:
    """Quotes in x402 ``version`` on ``chain``, checks payments to ``pay_to``, settles in memory.

    Quotes, receipts and payment headers are a few hundred bytes of JSON, handled on the loop;
    only signature recovery goes to a thread.
    """

    def __init__(self, *, pay_to: str, chain: Chain, version: int) -> None:
        if version not in (1, 2):
            raise ValueError("x402_version must be 1 or 2")
        self.pay_to = pay_to
        self.chain = chain
        self.version = version
        self.settlements: list[Settlement] = []
        self._used_nonces: set[tuple[str, str]] = set()

    @property
    def network(self) -> str:
        """The chain's name in this x402 version."""
        return self.chain.caip2 if self.version == 2 else self.chain.v1_name

    @property
    def payments_received(self) -> int:
        """Payments spent so far, settled or not."""
        return len(self._used_nonces)

    def quote(
        self, resource_url: str, description: str, amount_micro: int, error: str
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The 402 answer's body and headers asking for ``amount_micro``; ``error`` says why."""
        extra = {"name": self.chain.token_name, "version": self.chain.token_version}
        amount = str(amount_micro)
        if self.version == 1:
            requirement = {
                "scheme": "exact",
                "network": self.chain.v1_name,
                "maxAmountRequired": amount,
                "resource": resource_url,
                "description": description,
                "mimeType": "application/json",
                "payTo": self.pay_to,
                "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
                "asset": self.chain.usdc,
                "extra": extra,
            }
            return {"x402Version": 1, "error": error, "accepts": [requirement]}, {}
        body = {
            "x402Version": 2,
            "error": error,
            "resource": {
                "url": resource_url,
                "description": description,
                "mimeType": "application/json",
            },
            "accepts": [
                {
                    "scheme": "exact",
                    "network": self.chain.caip2,
                    "asset": self.chain.usdc,
                    "amount": amount,
                    "payTo": self.pay_to,
                    "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
                    "extra": extra,
                }
            ],
        }
        return body, {"PAYMENT-REQUIRED": _b64json(body)}

    def decode(self, header: str) -> Payment:
        """Decode a payment header (base64 JSON) without judging it, or raise Refused."""
        try:
            message = json.loads(base64.b64decode(header, validate=True))
            if message["x402Version"] != self.version:
                raise Refused("invalid_x402_version")
            scheme_of = message["accepted"] if self.version == 2 else message
            if scheme_of["scheme"] != "exact":
                raise Refused("unsupported_scheme")
            if scheme_of["network"] != self.network:
                raise Refused("invalid_network")
            auth = message["payload"]["authorization"]
            return Payment(
                payer=_matching(auth["from"], _HEX_ADDRESS),
                pay_to=_matching(auth["to"], _HEX_ADDRESS),
                value=_uint256(auth["value"]),
                valid_after=_uint256(auth["validAfter"]),
                valid_before=_uint256(auth["validBefore"]),
                nonce=_matching(auth["nonce"], _HEX_NONCE),
                signature=_matching(message["payload"]["signature"], _HEX_SIGNATURE),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused("invalid_payload") from exc

    async def verify(self, header: str, amount_micro: int) -> Payment:
        """The payment in ``header`` if it pays ``amount_micro`` now, or raise Refused.

        The replay check runs after the last await: a caller that spends the payment before
        its own next await spends each authorization once, whatever runs concurrently.
        """
        payment = self.decode(header)
        signer = await asyncio.to_thread(_signer, payment, self.chain)
        if signer != payment.payer.lower():
            raise Refused("invalid_signature")
        if payment.pay_to.lower() != self.pay_to.lower():
            raise Refused("recipient_mismatch")
        if payment.value != amount_micro:
            raise Refused("amount_mismatch")
        now = time.time()
        if now < payment.valid_after:
            raise Refused("not_yet_valid")
        if now >= payment.valid_before:
            raise Refused("expired")
        if _nonce_key(payment) in self._used_nonces:
            raise Refused("nonce_already_used")
        return payment

    def spend(self, payment: Payment) -> None:
        """Use up the payment's authorization: it is never accepted again."""
        self._used_nonces.add(_nonce_key(payment))

    def settle(self, payment: Payment, amount_micro: int, model: str) -> Settlement:
        """Record the charge (in memory only) and return it."""
        settlement = Settlement(
            tx_hash="0x" + keccak(hexstr=payment.signature).hex(),
            payer=to_checksum_address(payment.payer),
            amount_micro=amount_micro,
            nonce=payment.nonce,
            model=model,
            settled_at=time.time(),
        )
        self.settlements.append(settlement)
        return settlement

    def receipt(self, settlement: Settlement) -> dict[str, str]:
        """The receipt headers of a settled answer: x402's, and the hash blockrun-llm reads."""
        name = "PAYMENT-RESPONSE" if self.version == 2 else "X-PAYMENT-RESPONSE"
        receipt = {
            "success": True,
            "transaction": settlement.tx_hash,
            "network": self.network,
            "payer": settlement.payer,
        }
        return {name: _b64json(receipt), "X-Payment-Receipt": settlement.tx_hash}


def _nonce_key(payment: Payment) -> tuple[str, str]:
    return payment.payer.lower(), payment.nonce.lower()


def _matching(value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"malformed payment field: {value!r}")
    return value


def _uint256(value: object) -> int:
    number = int(_matching(value, _DIGITS))
    if number >= 2**256:
        raise ValueError(f"out of range for uint256: {number}")
    return number


def _signer(payment: Payment, chain: Chain) -> str | None:
    """The lower-case address that signed the authorization, or None for a broken signature."""
    signable = encode_typed_data(
        domain_data={
            "name": chain.token_name,
            "version": chain.token_version,
            "chainId": chain.chain_id,
            "verifyingContract": chain.usdc,
        },
        message_types=_AUTHORIZATION_TYPES,
        message_data={
            "from": payment.payer.lower(),
            "to": payment.pay_to.lower(),
            "value": payment.value,
            "validAfter": payment.valid_after,
            "validBefore": payment.valid_before,
            "nonce": payment.nonce,
        },
    )
    try:
        return Account.recover_message(signable, signature=payment.signature).lower()
    except (ValueError, BadSignature):
        return None


def _b64json(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()
