"""The chain as the last word: unknown payments are settled or failed from USDC's own record.

An EIP-3009 authorization is used once its transfer is on chain, and can never be used after its
``validBefore``. So a row whose nonce USDC's ``authorizationState`` shows used was charged, and
one still unused in a block at or past ``validBefore`` never will be. Every read has a deadline
and a size cap; an RPC URL may carry an API key, so it is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from eth_utils import keccak

from bot.answer_json import loads
from bot.chains import Chain, chain_for
from bot.ledger import Ledger, Payment, Status

log = logging.getLogger(__name__)

AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]
BALANCE_OF = keccak(text="balanceOf(address)")[:4]
MAX_ANSWER_BYTES = 64 * 1024
RPC_TIMEOUT_SECONDS = 10.0
RESOLVE_INTERVAL_SECONDS = 600.0
NEVER_USED = "the chain shows the payment was never used"

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_WORD = re.compile(r"^0x[0-9a-fA-F]{64}$")

SettledHook = Callable[[Payment], Awaitable[None]]


class ChainUnreadable(Exception):
    """No usable answer from the RPC: the outcome stays unknown for now."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """What one pass did to the unknown rows; ``skipped`` rows had no RPC URL or no nonce."""

    settled: int = 0
    failed: int = 0
    left: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Block:
    """The block every read of one pass is pinned to."""

    number: int
    timestamp: int


class ChainResolver:
    """Settles or fails the ledger's unknown rows from the USDC contract of their network."""

    def __init__(
        self,
        ledger: Ledger,
        http: httpx.AsyncClient,
        rpc_url_for: Callable[[str], str | None],
        *,
        on_settled: SettledHook | None = None,
        timeout: float = RPC_TIMEOUT_SECONDS,
    ) -> None:
        self._ledger = ledger
        self._http = http
        self._rpc_url_for = rpc_url_for
        self._on_settled = on_settled
        self._timeout = timeout

    async def resolve(self) -> Resolved:
        """One pass over every unknown row; an unreadable chain leaves its rows unknown."""
        settled = failed = left = skipped = 0
        blocks: dict[str, Block | None] = {}
        for payment in await self._ledger.payments(Status.UNKNOWN):
            chain = chain_for(payment.network or "")
            url = self._rpc_url_for(chain.caip2) if chain is not None else None
            if chain is None or url is None or payment.nonce is None:
                skipped += 1
                continue
            verdict = await self._verdict(payment, chain, url, blocks)
            if verdict is Status.SETTLED:
                settled += await self._settle(payment)
            elif verdict is Status.FAILED:
                failed += await self._fail(payment)
            else:
                left += 1
        return Resolved(settled, failed, left, skipped)

    async def resolve_every(self, interval_seconds: float = RESOLVE_INTERVAL_SECONDS) -> None:
        """Resolve at once, then every interval, until cancelled; an error is logged, not raised."""
        while True:
            try:
                await self.resolve()
            except Exception:
                log.exception(
                    "resolving unknown payments from the chain failed; trying again later"
                )
            await asyncio.sleep(interval_seconds)

    async def _verdict(
        self, payment: Payment, chain: Chain, url: str, blocks: dict[str, Block | None]
    ) -> Status | None:
        """SETTLED if the authorization was used, FAILED if it expired unused, None if unsure.

        Every read of a pass on one network is pinned to the block read first (None if that
        failed), so "unused" and "expired" are judged at the same block.
        """
        rpc = Rpc(self._http, url, self._timeout)
        try:
            if chain.caip2 not in blocks:
                blocks[chain.caip2] = None
                blocks[chain.caip2] = await rpc.latest_block()
            block = blocks[chain.caip2]
            if block is None:
                return None
            if await rpc.authorization_used(chain, payment.payer or "", payment.nonce or "", block):
                return Status.SETTLED
        except ChainUnreadable as error:
            log.warning("could not read USDC on %s: %s", chain.caip2, error)
            return None
        expired = payment.valid_before is not None and block.timestamp >= payment.valid_before
        return Status.FAILED if expired else None

    async def _settle(self, payment: Payment) -> int:
        try:
            await self._ledger.settle(payment.row_id, payment.quoted_micro, None)
        except ValueError:  # resolved meanwhile, by a late receipt or another run
            return 0
        log.info("payment %d was used on chain: settled", payment.row_id)
        if self._on_settled is not None:
            try:
                await self._on_settled(await self._ledger.payment(payment.row_id))
            except Exception:
                log.exception("telling the user of settled payment %d failed", payment.row_id)
        return 1

    async def _fail(self, payment: Payment) -> int:
        try:
            await self._ledger.fail(payment.row_id, NEVER_USED)
        except ValueError:  # resolved meanwhile
            return 0
        log.info("payment %d expired unused on chain: failed", payment.row_id)
        return 1


@dataclass(frozen=True)
class Rpc:
    """One network's JSON-RPC endpoint; the URL may carry an API key, so it is never shown."""

    http: httpx.AsyncClient
    url: str = field(repr=False)
    deadline: float = RPC_TIMEOUT_SECONDS

    async def call(self, method: str, params: list[Any]) -> Any:
        """One call's ``result``, within the deadline and the size cap; else ChainUnreadable."""
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        data = bytearray()
        try:
            async with asyncio.timeout(self.deadline):
                async with self.http.stream(
                    "POST", self.url, json=body, timeout=self.deadline
                ) as response:
                    if response.status_code != 200:
                        raise ChainUnreadable(f"HTTP status {response.status_code}")
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_ANSWER_BYTES:
                            raise ChainUnreadable("answer over the size cap")
        except ChainUnreadable:
            raise
        except Exception as error:  # any transport failure; its text may hold the URL
            raise ChainUnreadable(type(error).__name__) from None
        try:
            answer = loads(data)
        except ValueError:
            raise ChainUnreadable("answer is not JSON") from None
        if not isinstance(answer, dict) or "result" not in answer:
            raise ChainUnreadable("JSON-RPC error" if isinstance(answer, dict) else "bad answer")
        return answer["result"]

    async def latest_block(self) -> Block:
        """The chain's latest block: its number and timestamp."""
        result = await self.call("eth_getBlockByNumber", ["latest", False])
        try:
            return Block(int(result["number"], 16), int(result["timestamp"], 16))
        except (KeyError, TypeError, ValueError):
            raise ChainUnreadable("malformed block") from None

    async def usdc_balance(self, chain: Chain, address: str) -> int:
        """USDC's ``balanceOf(address)`` now, in micro-USDC, from an RPC serving ``chain``."""
        if not _ADDRESS.match(address):
            raise ChainUnreadable("the wallet address is malformed")
        served = await self.call("eth_chainId", [])
        if served != hex(chain.chain_id):  # JSON-RPC quantities are lowercase, no leading zeros
            raise ChainUnreadable(f"the RPC URL serves another chain than {chain.caip2}")
        data = BALANCE_OF + bytes(12) + bytes.fromhex(address[2:])
        result = await self.call(
            "eth_call", [{"to": chain.usdc, "data": "0x" + data.hex()}, "latest"]
        )
        if not isinstance(result, str) or not _WORD.match(result):
            raise ChainUnreadable("malformed balanceOf")
        return int(result, 16)

    async def authorization_used(self, chain: Chain, payer: str, nonce: str, block: Block) -> bool:
        """USDC's ``authorizationState(payer, nonce)`` as of ``block``."""
        if not _ADDRESS.match(payer) or not _WORD.match(nonce):
            raise ChainUnreadable("the row's payer or nonce is malformed")
        data = AUTHORIZATION_STATE + bytes(12) + bytes.fromhex(payer[2:]) + bytes.fromhex(nonce[2:])
        call = {"to": chain.usdc, "data": "0x" + data.hex()}
        result = await self.call("eth_call", [call, hex(block.number)])
        if not isinstance(result, str) or not _WORD.match(result) or int(result, 16) > 1:
            raise ChainUnreadable("malformed authorizationState")
        return int(result, 16) == 1
