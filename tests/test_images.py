"""The image service and the bot, end to end against the sandbox gateway over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import struct
import subprocess
import sys
import weakref
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from local import Handler, serving, until
from pictures import png

from adapters.console import ConsoleChat
from bot.buttons import kept_json, kept_of_json, kept_result
from bot.chains import BASE_SEPOLIA
from bot.commands import parse
from bot.errors import ImagebotError, PaymentRefused
from bot.http import gateway_client
from bot.images import (
    BadReply,
    ContentRefused,
    ImageResult,
    ImageService,
    InsufficientFunds,
    JobAbandoned,
    LinkedPicture,
    Picture,
    RateLimited,
    SlowJob,
    in_memory,
)
from bot.requests import EditRequest, GenerateRequest, ImageCommand, ImageInput
from bot.x402 import PaymentIntent, Wallet, X402Payer
from sandbox import Sandbox, Settlement

CAP = 500_000


@dataclass(frozen=True)
class RunningSandbox:
    gateway: Sandbox
    url: str

    @property
    def settlements(self) -> list[Settlement]:
        return self.gateway.settlements


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    gateway = Sandbox(job_seconds=0.3)
    yield RunningSandbox(gateway, await gateway.start())
    await gateway.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client() as client:
        yield client


def service_for(
    http: httpx.AsyncClient, url: str, *, cap: int = CAP, deadline: float = 10.0
) -> ImageService:
    payer = X402Payer(http, Wallet.create(), max_micro=cap)
    return ImageService(http, payer, url, poll_interval=0.05, job_deadline=deadline)


def request(text: str, *files: bytes) -> GenerateRequest | EditRequest:
    command = parse(text)
    assert isinstance(command, ImageCommand)
    return command.build(tuple(ImageInput(data) for data in files))


async def run(service: ImageService, text: str, *files: bytes):  # type: ignore[no-untyped-def]
    parsed = request(text, *files)
    if isinstance(parsed, GenerateRequest):
        return await service.generate(parsed)
    return await service.edit(parsed)


async def test_generate_pays_the_quote_once_and_returns_the_picture(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    service = service_for(http, sandbox.url)
    result = await run(service, "/imagegen -s 1216x832 a red fox")
    (picture,) = result.pictures
    assert (picture.mime, picture.width, picture.height) == ("image/png", 1216, 832)
    assert result.charged_micro == 52_500
    assert [s.amount_micro for s in sandbox.settlements] == [52_500]
    assert result.tx_hash == sandbox.settlements[0].tx_hash


async def test_data_uri_pictures_are_decoded(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    service = service_for(http, sandbox.url)
    result = await run(service, "/imagegen -m gpt-image --n 2 two cats")
    assert len(result.pictures) == 2
    assert all(picture.width == 1024 for picture in result.pictures)
    assert result.charged_micro == 42_000 == sum(s.amount_micro for s in sandbox.settlements)


async def test_revised_prompt_is_returned(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    result = await run(service_for(http, sandbox.url), "/imagegen -m dall-e-3 a city")
    assert result.revised_prompt


async def test_slow_job_is_polled_and_settles_once(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    service = service_for(http, sandbox.url)
    result = await run(service, "/imagegen -m gpt-image-2 -s 1536x1024 a harbour")
    assert result.pictures[0].width == 1536
    assert result.charged_micro == 126_000
    assert [s.amount_micro for s in sandbox.settlements] == [126_000]
    assert result.tx_hash == sandbox.settlements[0].tx_hash


async def test_a_slow_job_is_polled_through_202_answers_until_it_completes(
    http: httpx.AsyncClient,
) -> None:
    gateway = Sandbox(job_seconds=0.5)
    polls: list[int] = []

    @web.middleware
    async def count_polls(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if request.path.startswith("/v1/images/generations/"):
            polls.append(response.status)
        return response

    gateway.app.middlewares.append(count_polls)
    service = service_for(http, await gateway.start())
    try:
        result = await run(service, "/imagegen -m banana-pro a harbour")
    finally:
        await gateway.close()
    assert polls[:-1] == [202] * (len(polls) - 1) and len(polls) >= 4
    assert polls[-1] == 200
    assert [s.amount_micro for s in gateway.settlements] == [result.charged_micro]


async def test_busy_and_lost_polls_are_asked_again_with_the_same_payment(
    http: httpx.AsyncClient,
) -> None:
    answers = [503, 429, "drop", 504, 200]
    seen: list[str] = []

    def answer() -> web.Response:
        return web.json_response({"id": "j", "status": "queued", "poll_url": "/jobs/j"}, status=202)

    async def job(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers["PAYMENT-SIGNATURE"])
        reply = answers.pop(0)
        if reply == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if reply != 200:
            return web.json_response({"status": "in_progress"}, status=reply)
        picture = "data:image/png;base64," + base64.b64encode(png()).decode()
        body = {"status": "completed", "data": [{"url": picture}]}
        return web.json_response(body, headers={"X-Payment-Receipt": "0xabc"})

    async with serving(
        ("POST", "/v1/images/generations", quoting(answer)),
        ("GET", "/jobs/j", job),
    ) as url:
        result = await run(service_for(http, url), "/imagegen a fox")

    assert len(seen) == 5 and len(set(seen)) == 1
    assert result.charged_micro == 52_500 and result.pictures


async def test_a_receipt_on_a_202_is_charged_even_when_the_job_then_fails(
    http: httpx.AsyncClient,
) -> None:
    receipt = base64.b64encode(
        json.dumps({"success": True, "transaction": "0xabc", "network": "eip155:84532"}).encode()
    ).decode()

    def answer() -> web.Response:
        body = {"id": "j", "status": "queued", "poll_url": "/jobs/j"}
        return web.json_response(body, status=202, headers={"PAYMENT-RESPONSE": receipt})

    async def job(_: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "failed", "error": "upstream broke"})

    async with serving(
        ("POST", "/v1/images/generations", quoting(answer)),
        ("GET", "/jobs/j", job),
    ) as url:
        with pytest.raises(JobAbandoned) as caught:
            await run(service_for(http, url), "/imagegen a fox")

    assert caught.value.charged is True
    assert "charged anyway" in caught.value.user_message


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid PNG header claiming 1.6 gigapixels, with one tiny compressed row after it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (1 + 3 * width))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


async def test_a_decompression_bomb_after_payment_says_it_was_charged(
    http: httpx.AsyncClient,
) -> None:
    def answer() -> web.Response:
        picture = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
        return web.json_response({"created": 1, "data": [{"url": picture}]})

    async with serving(("POST", "/v1/images/generations", quoting(answer))) as url:
        with pytest.raises(BadReply) as caught:
            await run(service_for(http, url), "/imagegen a fox")

    assert caught.value.charged is True
    assert caught.value.user_message == (
        "The image service sent an image too large to open; $0.0525 was charged for it."
    )


async def test_a_poll_address_off_the_gateway_is_never_sent_the_payment(
    http: httpx.AsyncClient,
) -> None:
    def answer() -> web.Response:
        body = {"id": "j", "status": "queued", "poll_url": "http://127.0.0.2:9/steal"}
        return web.json_response(body, status=202)

    async with serving(("POST", "/v1/images/generations", quoting(answer))) as url:
        with pytest.raises(BadReply) as caught:
            await run(service_for(http, url), "/imagegen a fox")

    assert caught.value.charged is False
    assert "Nothing was charged." in caught.value.user_message


async def test_edit_with_mask_is_drawn_from_the_input(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    service = service_for(http, sandbox.url)
    result = await run(
        service, "/img2img --mask -s 1024x1536 add a hat", png(), png(colour="white")
    )
    assert (result.pictures[0].width, result.pictures[0].height) == (1024, 1536)
    assert result.charged_micro == 42_000


async def test_multi_image_fusion(sandbox: RunningSandbox, http: httpx.AsyncClient) -> None:
    service = service_for(http, sandbox.url)
    result = await run(service, "/img2img -m nano-banana fuse them", png(), png(), png())
    assert result.charged_micro == 52_500


NOTHING, NO_CHARGE_REPORTED = "Nothing was charged.", "It reported no charge."


@pytest.mark.parametrize(
    ("word", "error", "fragment", "charge"),
    [
        ("#policy", ContentRefused, "content policy", NOTHING),
        ("#ratelimit", RateLimited, "try again in 7 s", NOTHING),
        ("#servererror", ImagebotError, "failed (HTTP 500)", NO_CHARGE_REPORTED),
        ("#timeout", ImagebotError, "timed out", NO_CHARGE_REPORTED),
        ("#nofunds", InsufficientFunds, "wallet", NOTHING),
        ("#fail", JobAbandoned, "could not make it", NOTHING),
        (
            "#settlefail",
            InsufficientFunds,
            "could not collect the payment (insufficient_funds)",
            NOTHING,
        ),
    ],
)
async def test_each_failure_has_its_message_and_charges_nothing(
    sandbox: RunningSandbox,
    http: httpx.AsyncClient,
    word: str,
    error: type,
    fragment: str,
    charge: str,
) -> None:
    """A refusal charges nothing. A paid request the gateway failed (5xx) without a receipt
    usually charged nothing either, but BlockRun can settle after an error: the user is told
    only that it reported no charge."""
    service = service_for(http, sandbox.url)
    with pytest.raises(error) as caught:
        await run(service, f"/imagegen a fox {word}")
    assert fragment in caught.value.user_message
    assert charge in caught.value.user_message
    assert (NOTHING in caught.value.user_message) == (charge == NOTHING)
    assert caught.value.charged is False
    assert sandbox.settlements == []


async def test_job_that_never_completes_is_abandoned_at_the_deadline(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    service = service_for(http, sandbox.url, deadline=0.5)
    with pytest.raises(JobAbandoned) as caught:
        await run(service, "/imagegen a fox #never")
    assert "stopped waiting" in caught.value.user_message
    assert "Nothing was charged." in caught.value.user_message
    assert sandbox.settlements == []


async def test_quote_above_the_cap_is_refused_and_nothing_is_settled(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    service = service_for(http, sandbox.url, cap=50_000)
    with pytest.raises(PaymentRefused) as caught:
        await run(service, "/imagegen a fox")  # nano-banana quotes 52,500
    assert "$0.0525" in caught.value.user_message and "$0.05" in caught.value.user_message
    assert sandbox.settlements == []


async def test_payment_hook_sees_the_intent_before_the_header_is_sent(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    seen: list[tuple[PaymentIntent, int]] = []

    async def record(intent: PaymentIntent) -> None:
        seen.append((intent, len(sandbox.settlements)))

    service = service_for(http, sandbox.url)
    parsed = request("/imagegen a fox")
    assert isinstance(parsed, GenerateRequest)
    await service.generate(parsed, on_payment=record)
    ((intent, settled_before),) = seen
    assert settled_before == 0
    assert intent.quote.amount_micro == 52_500
    assert sandbox.settlements[0].nonce.lower() == intent.nonce.lower()


REQUIREMENT = {
    "scheme": "exact",
    "network": BASE_SEPOLIA.caip2,
    "asset": BASE_SEPOLIA.usdc,
    "amount": "52500",
    "payTo": "0x1f9994449098867e0A14f77DcAD0fD3beBe3ae15",
    "maxTimeoutSeconds": 300,
    "extra": {},
}


def quoting(answer: Callable[[], web.Response]) -> Handler:
    """A paid route: REQUIREMENT's 402 quote when unpaid, then ``answer()``."""

    async def route(request: web.Request) -> web.StreamResponse:
        if "PAYMENT-SIGNATURE" not in request.headers:
            return web.json_response({"x402Version": 2, "accepts": [REQUIREMENT]}, status=402)
        return answer()

    return route


async def test_unreachable_gateway_says_nothing_was_charged(http: httpx.AsyncClient) -> None:
    service = service_for(http, "http://127.0.0.1:9")
    with pytest.raises(ImagebotError) as caught:
        await run(service, "/imagegen a fox")
    assert "couldn't reach" in caught.value.user_message
    assert caught.value.charged is False


async def test_gateway_that_returns_no_image_reports_the_charge(
    http: httpx.AsyncClient,
) -> None:
    async def empty(_: web.Request) -> web.Response:
        return web.json_response({"created": 1, "data": [{"url": "data:image/png;base64,AAAA"}]})

    async with serving(("POST", "/v1/images/generations", empty)) as url:
        service = service_for(http, url)
        with pytest.raises(BadReply) as caught:
            await run(service, "/imagegen a fox")
        assert "not a PNG, JPEG or WebP" in caught.value.user_message
        assert caught.value.charged is True


async def test_console_chat_writes_each_format_with_its_extension(tmp_path: Path) -> None:
    chat = ConsoleChat(tmp_path)
    await chat.send_pictures([Picture(png(), "image/png", 64, 48)], "caption")
    (saved,) = os.listdir(tmp_path)
    assert saved.endswith(".png")


@pytest.mark.parametrize("deployed", [False, True])
def test_demo_once_runs_offline_from_the_command_line(tmp_path: Path, deployed: bool) -> None:
    """Also beside a deployment's settings, in the environment and ``.env``: none reaches the
    demo (this ledger URL, network, cap and proxy would each make it fail). The demo's gateway
    is its own, on loopback: no proxy could reach it."""
    deployment = {
        "DATABASE_URL": "postgresql://imagebot:pw@127.0.0.1:9/imagebot",
        "PAYMENT_NETWORK": "base",
        "MAX_USD_PER_REQUEST": "0.000001",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "socks5://127.0.0.1:9",
    }
    if deployed:
        (tmp_path / ".env").write_text("USER_DAILY_LIMIT_USD=0\nDATABASE_PATH=/nonexistent/x\n")
    result = subprocess.run(
        [sys.executable, "-m", "imagebot.cli", "demo", "--once", "/imagegen a red fox"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(Path(__file__).parents[1]),
            **(deployment if deployed else {}),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "saved out/" in result.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def sdk_refusal(reason: str) -> web.Response:
    """A 402 as the x402 SDK's servers send it for a refused payment: the reason only in the
    PAYMENT-REQUIRED header, the body ``{}``."""
    offer = {"x402Version": 2, "error": reason, "accepts": [REQUIREMENT]}
    header = base64.b64encode(json.dumps(offer).encode()).decode()
    return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})


@pytest.mark.parametrize(
    "refusal",
    [
        lambda: web.json_response({"error": "nonce_already_used"}, status=402),
        lambda: sdk_refusal("invalid_exact_evm_insufficient_balance"),  # no nonce named
    ],
    ids=["nonce-used", "any-refusal"],
)
async def test_a_refusal_of_a_payment_resent_after_a_lost_answer_is_an_unknown_outcome(
    http: httpx.AsyncClient, refusal: Callable[[], web.Response]
) -> None:
    """The gateway got the paid request (and may have settled it), the answer was lost, and
    the resend of the same header is refused, whatever its words."""
    headers_seen: list[str] = []

    async def generations(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("PAYMENT-SIGNATURE")
        if header is None:
            return web.json_response({"x402Version": 2, "accepts": [REQUIREMENT]}, status=402)
        headers_seen.append(header)
        if len(headers_seen) == 1:
            assert request.transport is not None
            request.transport.close()  # the answer to the paid request is lost
            return web.Response()
        return refusal()

    async with serving(("POST", "/v1/images/generations", generations)) as url:
        service = service_for(http, url)
        with pytest.raises(ImagebotError) as caught:
            await run(service, "/imagegen a fox")
    assert len(headers_seen) == 2 and headers_seen[0] == headers_seen[1]
    assert caught.value.charged is None
    assert "may have been charged" in caught.value.user_message


async def gone_after_quote(http: httpx.AsyncClient, port: int) -> asyncio.Task[ImageResult]:
    """A draw whose gateway, on ``port``, quotes and goes away: the draw's payment is signed and
    about to go to nothing listening."""
    signed, gone = asyncio.Event(), asyncio.Event()

    async def quote(request: web.Request) -> web.Response:
        assert "PAYMENT-SIGNATURE" not in request.headers
        answer = {"x402Version": 2, "accepts": [REQUIREMENT]}
        return web.json_response(answer, status=402, headers={"Connection": "close"})

    async def recorded(_: PaymentIntent) -> None:
        signed.set()
        await gone.wait()

    service = service_for(http, f"http://127.0.0.1:{port}")
    async with serving(("POST", "/v1/images/generations", quote), port=port):
        drawing = asyncio.create_task(service.generate(request("/imagegen a fox"), recorded))
        await signed.wait()
    gone.set()
    return drawing


async def test_a_payment_no_connection_ever_carried_charged_nothing(
    http: httpx.AsyncClient, unused_tcp_port: int
) -> None:
    """The gateway quotes and goes away before the paid request: every send of the signed
    payment meets a refused connection, so it never left the bot."""
    drawing = await gone_after_quote(http, unused_tcp_port)
    with pytest.raises(ImagebotError) as caught:
        await drawing
    assert caught.value.charged is False
    assert "couldn't reach" in caught.value.user_message
    assert "Nothing was charged" in caught.value.user_message


async def test_a_refusal_after_a_refused_connection_is_a_refusal(
    http: httpx.AsyncClient, unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The paid request's first send meets a refused connection (it carried nothing); the
    resend reaches the gateway back on its port, which refuses the payment: nothing charged."""
    drawing = await gone_after_quote(http, unused_tcp_port)
    await until(lambda: "lost (ClientConnectorError)" in caplog.text)
    refused = quoting(lambda: sdk_refusal("invalid_exact_evm_insufficient_balance"))
    async with serving(("POST", "/v1/images/generations", refused), port=unused_tcp_port):
        with pytest.raises(ImagebotError) as caught:
            await drawing
    assert caught.value.charged is False
    assert "(invalid_exact_evm_insufficient_balance)" in caught.value.user_message


def blockrun_refusal(details: str) -> web.Response:
    """A 402 to a paid request as blockrun-llm reads it: the facilitator's reason in ``details``."""
    body = {"error": "Payment verification failed", "details": details}
    return web.json_response(body, status=402)


@pytest.mark.parametrize("refusal", [sdk_refusal, blockrun_refusal])
async def test_the_gateways_reason_for_refusing_a_payment_is_said(
    http: httpx.AsyncClient, refusal: Callable[[str], web.Response]
) -> None:
    route = quoting(lambda: refusal("invalid_exact_evm_insufficient_balance"))
    async with serving(("POST", "/v1/images/generations", route)) as url:
        service = service_for(http, url)
        with pytest.raises(ImagebotError) as caught:
            await run(service, "/imagegen a fox")
    assert "(invalid_exact_evm_insufficient_balance)" in caught.value.user_message
    assert "Nothing was charged" in caught.value.user_message
    assert caught.value.charged is False


@pytest.mark.parametrize("refusal", [sdk_refusal, blockrun_refusal])
async def test_a_payment_the_gateway_calls_used_may_have_been_charged(
    http: httpx.AsyncClient, refusal: Callable[[str], web.Response]
) -> None:
    """Sent once by the bot, yet refused as already used: something between (a proxy that
    retried the POST) delivered it twice, and the first may have been charged."""
    route = quoting(lambda: refusal("invalid_exact_evm_payload_authorization_nonce_used"))
    async with serving(("POST", "/v1/images/generations", route)) as url:
        service = service_for(http, url)
        with pytest.raises(ImagebotError) as caught:
            await run(service, "/imagegen a fox")
    assert caught.value.charged is None
    assert "may have been charged" in caught.value.user_message


async def test_results_in_hand_are_bounded_and_slow_jobs_wait_without_a_slot(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    """Two slots: six results are delivered at most two at a time, and a 202 job being polled
    does not keep a fast one out."""
    payer = X402Payer(http, Wallet.create(), max_micro=CAP)
    service = ImageService(http, payer, sandbox.url, poll_interval=0.05, max_results_in_hand=2)
    sandbox.gateway.job_seconds = 1.0
    in_hand, most, finished = 0, 0, []

    async def deliver(result: ImageResult) -> None:
        nonlocal in_hand, most
        in_hand += 1
        most = max(most, in_hand)
        await asyncio.sleep(0.1)  # a slow upload
        in_hand -= 1
        finished.append(result.pictures[0].data)

    slow = [
        service.generate(request(f"/imagegen a fox {i} #slow"), on_result=deliver) for i in (1, 2)
    ]
    jobs = [asyncio.create_task(job) for job in slow]
    await asyncio.sleep(0.3)  # both slow jobs are polling now
    fast = [service.generate(request(f"/imagegen a cat {i}"), on_result=deliver) for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*fast), timeout=0.9)  # before the slow jobs complete
    await asyncio.gather(*jobs)

    assert most == 2
    assert len(finished) == 8
    assert len(sandbox.settlements) == 8


async def test_a_gateway_answer_is_freed_without_the_garbage_collector(
    sandbox: RunningSandbox, http: httpx.AsyncClient
) -> None:
    """httpx's response <-> stream cycle would keep multi-MB bodies until a GC pass."""
    gc.disable()
    try:
        response = await http.get(f"{sandbox.url}/sandbox/settlements")
        assert response.status_code == 200
        answer = weakref.ref(response)
        del response
        assert answer() is None
    finally:
        gc.enable()


async def test_a_picture_at_a_public_link_is_downloaded_and_checked_only_when_loaded(
    sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A platform that fetches links is given the link; one that can't loads it, while the
    result is in hand, with the download checks (here through the sandbox as the proxy the
    link's public host is reached by: nothing connects to 1.2.3.4)."""
    monkeypatch.setenv("HTTP_PROXY", sandbox.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    sandbox.gateway.picture_origin = "http://1.2.3.4"
    loaded: list[Picture] = []

    async def deliver(result: ImageResult) -> None:
        (linked,) = result.pictures
        assert isinstance(linked, LinkedPicture)
        assert linked.url.startswith("http://1.2.3.4/images/")
        assert sandbox.gateway.images_served == 0
        loaded.extend(await in_memory(result.pictures))

    async with gateway_client() as http:  # after the proxy is set: read once, as the bot does
        service = service_for(http, sandbox.url)
        await service.generate(request("/imagegen -m flux a fox"), on_result=deliver)
        assert [(picture.mime, picture.width) for picture in loaded] == [("image/png", 1024)]
        assert sandbox.gateway.images_served == 1

        gone = await service.generate(request("/imagegen -m flux a fox"))
        sandbox.gateway._images.clear()  # the link stops working: loading says so, charged
        with pytest.raises(BadReply, match=r"link that does not work; \$0.042 was charged"):
            await in_memory(gone.pictures)


def test_a_slow_job_keeps_its_callers_note_and_reads_one_kept_without_it() -> None:
    """The service keeps the request with the job (``kept_json``) so a later run can give the
    result its buttons; a job kept by an older version has no note and still reads."""
    kept = kept_result(request("/imagegen -m banana-pro -s 2048x2048 a harbour"), "telegram", "7")
    job = SlowJob("http://127.0.0.1:1/v1/images/generations/j1", None, 105_000, context=None)
    job = replace(job, context=kept_json(kept))
    again = SlowJob.from_json(job.to_json())
    assert again == job
    assert again.context is not None
    assert replace(kept_of_json(again.context), created_at=kept.created_at) == kept
    older = json.loads(job.to_json())
    del older["context"]
    assert SlowJob.from_json(json.dumps(older)).context is None
