"""A fake Ethereum JSON-RPC endpoint on loopback for USDC's reads.

It decodes each ``eth_call`` it gets: ``authorizationState`` is answered from the (authorizer,
nonce) pairs it was told are used, ``balanceOf`` from the balances it was given; it can also
answer garbage, a JSON-RPC error, an oversized answer, or hang.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

SELECTOR = "e94a0102"  # authorizationState(address,bytes32) in USDC's (FiatTokenV2) ABI
BALANCE_OF = "70a08231"  # balanceOf(address)
SECRET = "secret-api-key"  # a path part of the RPC URL, as providers put API keys


class FakeRpc:
    """An Ethereum JSON-RPC endpoint answering ``eth_chainId``, ``eth_getBlockByNumber`` and
    USDC's ``authorizationState`` and ``balanceOf`` calls; ``mode`` other than "ok" makes every
    answer broken."""

    def __init__(self, chain_id: int = 8453) -> None:
        self.chain_id = chain_id
        self.used: set[tuple[str, str]] = set()  # (authorizer, nonce), lower-case hex
        self.balances: dict[str, int] = {}  # address (lower-case hex) -> micro-USDC
        self.block_number = 31_000_000
        self.block_timestamp = int(time.time())
        self.mode = "ok"
        self.asked: list[tuple[str, str, str]] = []  # (contract, authorizer, nonce)
        self.asked_balances = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    def use(self, authorizer: str, nonce: str) -> None:
        self.used.add((authorizer.lower(), nonce.lower()))

    def hold(self, address: str, micro: int) -> None:
        """Give ``address`` a USDC balance of ``micro``."""
        self.balances[address.lower()] = micro

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.post("/{path:.*}", self._answer)])
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v2/{SECRET}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "garbage":
            return web.Response(text="<html>502 Bad Gateway</html>")
        if self.mode == "http500":
            return web.json_response(
                {"jsonrpc": "2.0", "id": body["id"], "result": "0x"}, status=500
            )
        if self.mode == "error":
            error = {"code": -32000, "message": "header not found"}
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": error})
        if self.mode == "huge":
            return web.json_response(
                {"jsonrpc": "2.0", "id": body["id"], "result": "0x" + "0" * 2**17}
            )
        try:
            result = self._result(body["method"], body["params"])
        except (KeyError, ValueError, TypeError) as problem:
            return web.json_response({"jsonrpc": "2.0", "id": 1, "error": str(problem)}, status=400)
        if self.mode == "nonsense" and body["method"] == "eth_call":
            result = "0x2"
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})

    def _result(self, method: str, params: list[Any]) -> Any:
        if method == "eth_chainId" and params == []:
            return hex(self.chain_id)
        if method == "eth_getBlockByNumber" and params == ["latest", False]:
            return {"number": hex(self.block_number), "timestamp": hex(self.block_timestamp)}
        if method != "eth_call":
            raise ValueError(f"unexpected {method} {params}")
        data = bytes.fromhex(params[0]["data"].removeprefix("0x"))
        if data[:4].hex() == BALANCE_OF and params[1] == "latest" and len(data) == 4 + 32:
            self.asked_balances += 1
            return f"0x{self.balances.get('0x' + data[16:36].hex(), 0):064x}"
        if params[1] != hex(self.block_number):
            raise ValueError(f"unexpected block in {params}")
        if data[:4].hex() != SELECTOR or len(data) != 4 + 32 + 32 or any(data[4:16]):
            raise ValueError("not authorizationState(address,bytes32)")
        authorizer, asked_nonce = "0x" + data[16:36].hex(), "0x" + data[36:68].hex()
        self.asked.append((params[0]["to"], authorizer, asked_nonce))
        return f"0x{int((authorizer, asked_nonce) in self.used):064x}"
