"""The bot pays a gateway built with the official ``x402`` SDK's own FastAPI middleware.

The SDK decides what the 402 says, how the payment header is read and when it settles (on any
answer below 400, a 202 included, with ``PAYMENT-RESPONSE`` on that answer). Its facilitator is
a stub on loopback that checks the EIP-712 signature for real and records each settlement. The
gateway runs under uvicorn in a thread of its own: the SDK asks the facilitator for its
capabilities with a blocking call, which must not stop the loop that serves that answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from aiohttp import web
from eth_account import Account
from eth_account.messages import encode_typed_data
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from imagebot_cli import cli_env, imagebot
from local import serving_streams
from pictures import png
from test_sandbox import TRANSFER_TYPES
from test_service import RecordingChat
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.server import x402ResourceServer

from bot.chains import BASE_SEPOLIA
from bot.config import load_settings
from bot.service import Outcome, Sender
from bot.x402 import Wallet
from imagebot.wiring import open_bot

PAY_TO = "0x1f9994449098867e0A14f77DcAD0fD3beBe3ae15"
PRICE_MICRO = 50_000
ALICE = Sender("telegram", "111", "@alice", ("111",), private=True)
PICTURE = "data:image/png;base64," + base64.b64encode(png(32, 32)).decode()


@dataclass
class StubFacilitator:
    """x402's facilitator API (/supported, /verify, /settle) with real signature checks."""

    settled: list[tuple[str, int]] = field(default_factory=list)  # (payer, micro-USDC)
    used_nonces: set[str] = field(default_factory=set)
    refusal: str = ""  # an invalid reason given for every payment, as for an empty wallet

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/supported", self._supported)
        app.router.add_post("/verify", self._verify)
        app.router.add_post("/settle", self._settle)
        return app

    async def _supported(self, _: web.Request) -> web.Response:
        kind = {"x402Version": 2, "scheme": "exact", "network": BASE_SEPOLIA.caip2}
        return web.json_response({"kinds": [kind], "extensions": [], "signers": {}})

    async def _verify(self, request: web.Request) -> web.Response:
        payer, problem = self._check(await request.json())
        if problem:
            return web.json_response({"isValid": False, "invalidReason": problem, "payer": payer})
        return web.json_response({"isValid": True, "payer": payer})

    async def _settle(self, request: web.Request) -> web.Response:
        body = await request.json()
        payer, problem = self._check(body)
        network = BASE_SEPOLIA.caip2
        if problem:
            answer = {
                "success": False,
                "errorReason": problem,
                "transaction": "",
                "network": network,
            }
            return web.json_response(answer)
        authorization = body["paymentPayload"]["payload"]["authorization"]
        self.used_nonces.add(authorization["nonce"].lower())
        self.settled.append((payer, int(authorization["value"])))
        transaction = "0x" + uuid.uuid4().hex * 2
        return web.json_response(
            {"success": True, "transaction": transaction, "network": network, "payer": payer}
        )

    def _check(self, body: dict[str, Any]) -> tuple[str, str]:
        """(payer, "") when the payment pays these requirements, else (payer, reason)."""
        requirements = body["paymentRequirements"]
        payload = body["paymentPayload"]["payload"]
        authorization = payload["authorization"]
        extra = requirements.get("extra") or {}
        domain = {
            "name": extra["name"],
            "version": extra["version"],
            "chainId": int(requirements["network"].split(":")[1]),
            "verifyingContract": requirements["asset"],
        }
        message = {
            **authorization,
            **{key: int(authorization[key]) for key in ("value", "validAfter", "validBefore")},
        }
        signed = encode_typed_data(domain, TRANSFER_TYPES, message)
        signer = Account.recover_message(signed, signature=payload["signature"])
        payer = authorization["from"]
        now = time.time()
        if signer.lower() != payer.lower():
            return payer, "invalid_exact_evm_payload_signature"
        if authorization["to"].lower() != requirements["payTo"].lower():
            return payer, "invalid_exact_evm_payload_recipient_mismatch"
        if int(authorization["value"]) != int(requirements["amount"]):
            return payer, "invalid_exact_evm_payload_authorization_value"
        if not int(authorization["validAfter"]) <= now < int(authorization["validBefore"]):
            return payer, "invalid_exact_evm_payload_authorization_valid_before"
        if authorization["nonce"].lower() in self.used_nonces:
            return payer, "invalid_exact_evm_payload_authorization_nonce_used"
        return payer, self.refusal


def sdk_gateway(facilitator_url: str, polls_before_done: int) -> FastAPI:
    """BlockRun's two routes behind the SDK's middleware; ``#slow`` prompts become 202 jobs."""
    server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url)))
    server.register(BASE_SEPOLIA.caip2, ExactEvmServerScheme())
    price = {"scheme": "exact", "payTo": PAY_TO, "price": "$0.05", "network": BASE_SEPOLIA.caip2}
    routes = {
        "POST /v1/images/generations": {"accepts": price},
        "POST /v1/images/image2image": {"accepts": price},
    }
    app = FastAPI()
    polls: dict[str, int] = {}
    pay = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402(request: Request, call_next: Any) -> Any:
        return await pay(request, call_next)

    @app.post("/v1/images/generations")
    @app.post("/v1/images/image2image")
    async def create(request: Request) -> Any:
        body = await request.json()
        if "#slow" not in body["prompt"]:
            return {"created": int(time.time()), "data": [{"url": PICTURE}]}
        job = uuid.uuid4().hex
        polls[job] = 0
        envelope = {"id": job, "status": "queued", "poll_url": f"/v1/images/generations/{job}"}
        return JSONResponse(envelope, status_code=202)

    @app.get("/v1/images/generations/{job}")
    async def poll(job: str) -> Any:
        polls[job] += 1
        if polls[job] <= polls_before_done:
            return JSONResponse({"id": job, "status": "in_progress"}, status_code=202)
        return {"id": job, "status": "completed", "data": [{"url": PICTURE}]}

    return app


@contextmanager
def serving_in_a_thread(app: FastAPI) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@asynccontextmanager
async def sdk_stack(polls_before_done: int = 3) -> AsyncIterator[tuple[str, StubFacilitator]]:
    facilitator = StubFacilitator()
    runner = web.AppRunner(facilitator.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    facilitator_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    # The SDK fetches /supported with a blocking call as it builds the middleware: build it in
    # a thread, so this loop stays free to answer.
    app = await asyncio.to_thread(sdk_gateway, facilitator_url, polls_before_done)
    with serving_in_a_thread(app) as url:
        try:
            yield url, facilitator
        finally:
            await runner.cleanup()


@asynccontextmanager
async def answer_lost(gateway: str) -> AsyncIterator[str]:
    """A relay in front of ``gateway``: the first paid request gets through and is answered
    (the SDK has settled it by then), but that answer never comes back; the connection drops."""
    host, port = gateway.removeprefix("http://").rsplit(":", 1)
    lost = asyncio.Event()

    async def relay(bot: asyncio.StreamReader, to_bot: asyncio.StreamWriter) -> None:
        upstream, to_gateway = await asyncio.open_connection(host, int(port))
        paid = False

        async def requests() -> None:
            nonlocal paid
            while data := await bot.read(65536):
                paid = paid or (not lost.is_set() and b"payment-signature:" in data.lower())
                to_gateway.write(data)
                await to_gateway.drain()

        async def answers() -> None:
            while data := await upstream.read(65536):
                if paid and not lost.is_set():
                    lost.set()
                    to_bot.transport.abort()
                    return
                to_bot.write(data)
                await to_bot.drain()

        try:
            await asyncio.gather(requests(), answers())
        except OSError:
            pass  # the bot's side dropped
        finally:
            to_gateway.close()

    async with serving_streams(relay) as relay_port:
        yield f"http://127.0.0.1:{relay_port}"
    assert lost.is_set()


async def run_bot(
    url: str, database: Path, text: str, outcome: Outcome = Outcome.DONE
) -> RecordingChat:
    settings = load_settings(_env_file=None, image_api_url=url, database_path=database)
    chat = RecordingChat()
    async with open_bot(settings, Wallet.create(), poll_interval=0.05, job_deadline=10) as bot:
        assert await bot.handle(ALICE, chat, text) is outcome, chat.texts
    return chat


async def ledger_total(database: Path) -> tuple[int, int]:
    """(micro-USDC settled, micro-USDC unresolved) as ``imagebot spend --json`` reports them."""
    env = cli_env("http://127.0.0.1:9", database)
    code, out = await imagebot("spend", "--json", env=env, cwd=database.parent)
    assert code == 0
    report = json.loads(out)
    micro = [Decimal(report.get(key, "0")) * 1_000_000 for key in ("total_usd", "pending_usd")]
    return int(micro[0]), int(micro[1])


@pytest.mark.parametrize("text", ["/imagegen a fox", "/imagegen a fox #slow"])
async def test_the_bot_pays_an_x402_sdk_gateway_and_its_ledger_matches(
    tmp_path: Path, text: str
) -> None:
    async with sdk_stack() as (url, facilitator):
        chat = await run_bot(url, tmp_path / "l.sqlite3", text)

    ((pictures, caption),) = chat.pictures
    assert len(pictures) == 1 and "$0.05" in caption
    assert [amount for _, amount in facilitator.settled] == [PRICE_MICRO]
    assert await ledger_total(tmp_path / "l.sqlite3") == (PRICE_MICRO, 0)


async def test_a_receipt_on_the_sdks_202_is_charged_when_the_job_never_finishes(
    tmp_path: Path,
) -> None:
    """The SDK settles the 202 at once; a job that then never completes was still paid for."""
    database = tmp_path / "l.sqlite3"
    async with sdk_stack(polls_before_done=10_000) as (url, facilitator):
        settings = load_settings(_env_file=None, image_api_url=url, database_path=database)
        chat = RecordingChat()
        async with open_bot(settings, Wallet.create(), poll_interval=0.05, job_deadline=0.5) as bot:
            assert await bot.handle(ALICE, chat, "/imagegen a fox #slow") is Outcome.REFUSED

    assert "charged anyway" in chat.texts[-1]
    assert [amount for _, amount in facilitator.settled] == [PRICE_MICRO]
    assert await ledger_total(database) == (PRICE_MICRO, 0)


async def test_a_paid_answer_lost_then_refused_when_resent_stays_unknown_in_the_ledger(
    tmp_path: Path,
) -> None:
    """The SDK settles the payment, its answer is lost, and the bot's resend of the same header
    is refused (the nonce is used, said only in PAYMENT-REQUIRED): the row stays unknown,
    counted for admins, and the user hears it may have been charged."""
    database = tmp_path / "l.sqlite3"
    async with sdk_stack() as (url, facilitator), answer_lost(url) as relay:
        chat = await run_bot(relay, database, "/imagegen a fox", Outcome.REFUSED)

    assert not chat.pictures and "may have been charged" in chat.texts[-1]
    assert [amount for _, amount in facilitator.settled] == [PRICE_MICRO]
    assert await ledger_total(database) == (0, PRICE_MICRO)


async def test_a_payment_the_sdk_refuses_is_said_with_its_reason_and_costs_nothing(
    tmp_path: Path,
) -> None:
    """The SDK gives its facilitator's reason only in PAYMENT-REQUIRED; the user and the admin
    read it, and nothing is charged or counted."""
    database = tmp_path / "l.sqlite3"
    async with sdk_stack() as (url, facilitator):
        facilitator.refusal = "invalid_exact_evm_insufficient_balance"
        chat = await run_bot(url, database, "/imagegen a fox", Outcome.REFUSED)

    assert not chat.pictures and "(invalid_exact_evm_insufficient_balance)" in chat.texts[-1]
    assert "Nothing was charged" in chat.texts[-1] and "wallet has USDC" in chat.texts[-1]
    assert facilitator.settled == []
    assert await ledger_total(database) == (0, 0)
