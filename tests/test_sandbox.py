"""The sandbox gateway, driven over real HTTP with real EIP-3009 signatures."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import random
import resource
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from unittest.mock import patch

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from PIL import Image
from x402.client import x402ClientSync
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner

from bot.chains import BASE_SEPOLIA
from sandbox import SANDBOX_PAY_TO, Sandbox, serve_forever

JOB_SECONDS = 0.2
GENERATE = "/v1/images/generations"
EDIT = "/v1/images/image2image"
WALLET: LocalAccount = Account.create()
STRANGER: LocalAccount = Account.create()
TRANSFER_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}


def pay_header(
    quote: dict[str, Any],
    *,
    wallet: LocalAccount = WALLET,
    signer: LocalAccount | None = None,
    value: str | None = None,
    to: str | None = None,
    valid_after: int | None = None,
    valid_before: int | None = None,
) -> str:
    """A base64 x402 payment for a 402 body, signed like a wallet would (tweaks make it bad)."""
    requirement = quote["accepts"][0]
    now = int(time.time())
    authorization = {
        "from": wallet.address,
        "to": to or requirement["payTo"],
        "value": value or requirement.get("amount") or requirement["maxAmountRequired"],
        "validAfter": str(now - 600 if valid_after is None else valid_after),
        "validBefore": str(now + 300 if valid_before is None else valid_before),
        "nonce": "0x" + os.urandom(32).hex(),
    }
    domain = {
        "name": BASE_SEPOLIA.token_name,
        "version": BASE_SEPOLIA.token_version,
        "chainId": BASE_SEPOLIA.chain_id,
        "verifyingContract": BASE_SEPOLIA.usdc,
    }
    message = {
        **authorization,
        **{k: int(authorization[k]) for k in ("value", "validAfter", "validBefore")},
    }
    signed = Account.sign_typed_data((signer or wallet).key, domain, TRANSFER_TYPES, message)
    payload = {"signature": "0x" + signed.signature.hex(), "authorization": authorization}
    if quote["x402Version"] == 1:
        body = {"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": payload}
    else:
        body = {
            "x402Version": 2,
            "accepted": requirement,
            "resource": quote["resource"],
            "payload": payload,
        }
    return base64.b64encode(json.dumps(body).encode()).decode()


def decode_header(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def png_data_uri(size: tuple[int, int], colour: str = "red", fmt: str = "PNG") -> str:
    out = BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(out.getvalue()).decode()


def open_data_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(BytesIO(base64.b64decode(uri.partition(",")[2])))


TINY_PNG = png_data_uri((8, 8))


@dataclass
class Gateway:
    sandbox: Sandbox
    http: httpx.AsyncClient
    root: str

    async def quote(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(path, json=body)
        assert response.status_code == 402, response.text
        return response.json()

    async def pay(self, path: str, body: dict[str, Any], header: str) -> httpx.Response:
        name = "PAYMENT-SIGNATURE" if self.sandbox.x402_version == 2 else "X-PAYMENT"
        return await self.http.post(path, json=body, headers={name: header})

    async def buy(self, path: str, body: dict[str, Any], **tweaks: Any) -> httpx.Response:
        return await self.pay(path, body, pay_header(await self.quote(path, body), **tweaks))


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[Gateway]:
    sandbox = Sandbox(job_seconds=JOB_SECONDS, **options)
    root = await sandbox.start()
    try:
        async with httpx.AsyncClient(base_url=root, timeout=10) as http:
            yield Gateway(sandbox, http, root)
    finally:
        await sandbox.close()


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with running() as gateway:
        yield gateway


async def test_unpaid_request_is_quoted_in_the_v2_header_and_body(gateway: Gateway) -> None:
    body = {"model": "google/nano-banana", "prompt": "a red fox", "n": 2}
    response = await gateway.http.post(GENERATE, json=body)

    assert response.status_code == 402
    quote = response.json()
    assert decode_header(response.headers["PAYMENT-REQUIRED"]) == quote
    assert quote["x402Version"] == 2
    assert quote["error"] == "Payment required"
    assert quote["resource"]["url"] == gateway.root + GENERATE
    assert quote["resource"]["mimeType"] == "application/json"
    assert quote["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:84532",
            "asset": BASE_SEPOLIA.usdc,
            "amount": "105000",
            "payTo": SANDBOX_PAY_TO,
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2"},
        }
    ]
    assert gateway.sandbox.settlements == []


@pytest.mark.parametrize(
    ("body", "amount"),
    [
        (
            {"model": "openai/dall-e-3", "prompt": "p", "size": "1792x1024", "quality": "hd"},
            "126000",
        ),
        ({"model": "openai/dall-e-3", "prompt": "p", "quality": "standard"}, "42000"),
        ({"model": "gpt-image", "prompt": "p", "size": "1536x1024", "n": 3}, "126000"),
        ({"model": "zai/cogview-4", "prompt": "p", "size": "1440x1440"}, "20000"),
        ({"model": "google/nano-banana-pro", "prompt": "p", "size": "4096x4096"}, "157500"),
    ],
)
async def test_quote_is_the_catalog_price_times_n(
    gateway: Gateway, body: dict[str, Any], amount: str
) -> None:
    quote = await gateway.quote(GENERATE, body)
    assert quote["accepts"][0]["amount"] == amount


async def test_v1_quote_is_in_the_body_only() -> None:
    async with running(x402_version=1) as gateway:
        response = await gateway.http.post(GENERATE, json={"model": "flux", "prompt": "a fox"})

    assert response.status_code == 402
    assert "PAYMENT-REQUIRED" not in response.headers
    quote = response.json()
    assert quote["x402Version"] == 1
    assert quote["accepts"] == [
        {
            "scheme": "exact",
            "network": "base-sepolia",
            "maxAmountRequired": "42000",
            "resource": gateway.root + GENERATE,
            "description": quote["accepts"][0]["description"],
            "mimeType": "application/json",
            "payTo": SANDBOX_PAY_TO,
            "maxTimeoutSeconds": 300,
            "asset": BASE_SEPOLIA.usdc,
            "extra": {"name": "USDC", "version": "2"},
        }
    ]


async def test_paid_request_settles_with_a_receipt_and_a_served_image(gateway: Gateway) -> None:
    body = {"model": "black-forest/flux-1.1-pro", "prompt": "a red fox", "size": "832x1216"}
    response = await gateway.buy(GENERATE, body)

    assert response.status_code == 200, response.text
    result = response.json()
    (settlement,) = gateway.sandbox.settlements
    assert settlement.payer == WALLET.address
    assert settlement.amount_micro == 42_000
    assert settlement.model == "black-forest/flux-1.1-pro"
    assert result["price"] == {"amount": "0.042000", "currency": "USD"}
    assert result["payment"] == {
        "status": "settled",
        "tx_hash": settlement.tx_hash,
        "network": "eip155:84532",
    }
    assert len(settlement.tx_hash) == 66
    assert decode_header(response.headers["PAYMENT-RESPONSE"]) == {
        "success": True,
        "transaction": settlement.tx_hash,
        "network": "eip155:84532",
        "payer": WALLET.address,
    }
    (item,) = result["data"]
    assert item["url"].startswith(gateway.root + "/images/")
    assert "revised_prompt" not in item
    image = await gateway.http.get(item["url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert Image.open(BytesIO(image.content)).size == (832, 1216)


async def test_gpt_image_models_answer_with_distinct_data_uris(gateway: Gateway) -> None:
    response = await gateway.buy(
        GENERATE, {"model": "openai/gpt-image-1", "prompt": "a fox", "n": 2}
    )

    assert response.status_code == 200
    urls = [item["url"] for item in response.json()["data"]]
    assert len(urls) == 2
    assert urls[0] != urls[1]
    assert all(open_data_uri(url).size == (1024, 1024) for url in urls)
    assert gateway.sandbox.settlements[0].amount_micro == 42_000


async def test_dall_e_3_has_a_revised_prompt(gateway: Gateway) -> None:
    response = await gateway.buy(GENERATE, {"model": "dall-e-3", "prompt": "a fox"})

    (item,) = response.json()["data"]
    assert "a fox" in item["revised_prompt"]


async def test_v1_payment_goes_in_x_payment_and_the_receipt_in_x_payment_response() -> None:
    async with running(x402_version=1) as gateway:
        response = await gateway.buy(GENERATE, {"model": "flux", "prompt": "a fox"})

        assert response.status_code == 200, response.text
        receipt = decode_header(response.headers["X-PAYMENT-RESPONSE"])
        assert receipt["network"] == "base-sepolia"
        assert receipt["transaction"] == response.json()["payment"]["tx_hash"]
        assert len(gateway.sandbox.settlements) == 1


@pytest.mark.parametrize("version", [1, 2])
async def test_the_reference_x402_client_can_pay(version: int) -> None:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(WALLET))
    payer = x402HTTPClientSync(client)
    body = {"model": "flux", "prompt": "a fox"}
    async with running(x402_version=version) as gateway:
        quote = await gateway.http.post(GENERATE, json=body)
        headers, _ = payer.handle_402_response(
            dict(quote.headers), quote.content, gateway.root + GENERATE
        )
        response = await gateway.http.post(GENERATE, json=body, headers=headers)

        assert response.status_code == 200, response.text
        receipt = payer.get_payment_settle_response(response.headers.get)
        assert receipt.success
        assert receipt.transaction == gateway.sandbox.settlements[0].tx_hash


async def test_v2_also_accepts_the_x_payment_header(gateway: Gateway) -> None:
    body = {"model": "flux", "prompt": "a fox"}
    header = pay_header(await gateway.quote(GENERATE, body))
    response = await gateway.http.post(GENERATE, json=body, headers={"X-PAYMENT": header})

    assert response.status_code == 200
    assert len(gateway.sandbox.settlements) == 1


async def poll_until_done(gateway: Gateway, poll_url: str, header: str) -> httpx.Response:
    """Poll as BlockRun's SDK does: 202 means not yet; the first other answer is the end."""
    for _ in range(50):
        response = await gateway.http.get(poll_url, headers={"PAYMENT-SIGNATURE": header})
        if response.status_code != 202:
            return response
        assert response.json()["status"] in ("queued", "in_progress")
        await asyncio.sleep(JOB_SECONDS / 4)
    raise AssertionError("the job never finished")


async def submit(gateway: Gateway, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    header = pay_header(await gateway.quote(path, body))
    response = await gateway.pay(path, body, header)
    assert response.status_code == 202, response.text
    return response.json(), header


async def test_slow_model_is_queued_then_settles_exactly_once(gateway: Gateway) -> None:
    job, header = await submit(gateway, GENERATE, {"model": "banana-pro", "prompt": "a fox"})

    assert job["status"] == "queued"
    assert job["payment_status"] == "verified"
    assert job["price"] == {"amount": "0.105000", "currency": "USD"}
    assert job["poll_url"] == f"{GENERATE}/{job['id']}"  # relative, as BlockRun's
    first = await gateway.http.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == 202
    assert first.json() == {"id": job["id"], "status": "queued"}
    assert gateway.sandbox.settlements == []

    done = await poll_until_done(gateway, job["poll_url"], header)
    result = done.json()
    assert done.status_code == 200
    assert result["status"] == "completed"
    assert result["payment"]["status"] == "settled"
    (settlement,) = gateway.sandbox.settlements
    assert result["payment"]["tx_hash"] == settlement.tx_hash
    assert decode_header(done.headers["PAYMENT-RESPONSE"])["transaction"] == settlement.tx_hash
    assert done.headers["X-Payment-Receipt"] == settlement.tx_hash  # what blockrun-llm reads
    assert (await gateway.http.get(result["data"][0]["url"])).status_code == 200

    again = await gateway.http.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert again.json()["payment"] == {**result["payment"], "status": "already_settled"}
    assert again.json()["data"] == result["data"]
    assert "PAYMENT-RESPONSE" not in again.headers
    assert len(gateway.sandbox.settlements) == 1


async def test_concurrent_polls_settle_once(gateway: Gateway) -> None:
    job, header = await submit(gateway, GENERATE, {"model": "flux", "prompt": "a fox #slow"})
    await asyncio.sleep(JOB_SECONDS)

    polls = [
        gateway.http.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header}) for _ in range(5)
    ]
    statuses = sorted(r.json()["payment"]["status"] for r in await asyncio.gather(*polls))

    assert statuses == ["already_settled"] * 4 + ["settled"]
    assert len(gateway.sandbox.settlements) == 1


async def test_edit_job_is_polled_under_generations(gateway: Gateway) -> None:
    body = {"model": "openai/gpt-image-2", "prompt": "add a hat", "image": png_data_uri((32, 32))}
    job, header = await submit(gateway, EDIT, body)

    assert f"{GENERATE}/" in job["poll_url"]
    done = await poll_until_done(gateway, job["poll_url"], header)
    assert done.json()["data"][0]["url"].startswith("data:image/png;base64,")
    assert gateway.sandbox.settlements[0].amount_micro == 63_000


async def test_poll_needs_the_payment_of_the_submit(gateway: Gateway) -> None:
    body = {"model": "banana-pro", "prompt": "a fox"}
    job, _ = await submit(gateway, GENERATE, body)
    await asyncio.sleep(JOB_SECONDS)

    unpaid = await gateway.http.get(job["poll_url"])
    assert unpaid.status_code == 402
    assert decode_header(unpaid.headers["PAYMENT-REQUIRED"])["accepts"][0]["amount"] == "105000"
    other = pay_header(await gateway.quote(GENERATE, body))
    stranger = await gateway.http.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": other})
    assert stranger.status_code == 402
    assert stranger.json()["error"] == "payment_mismatch"
    missing = await gateway.http.get(f"{GENERATE}/nope", headers={"PAYMENT-SIGNATURE": other})
    assert missing.status_code == 404
    assert gateway.sandbox.settlements == []


async def test_failed_job_is_never_charged(gateway: Gateway) -> None:
    job, header = await submit(gateway, GENERATE, {"model": "flux", "prompt": "a fox #fail"})

    done = await poll_until_done(gateway, job["poll_url"], header)
    assert done.json()["status"] == "failed"
    assert done.json()["error"]["message"]
    assert "PAYMENT-RESPONSE" not in done.headers
    again = await gateway.http.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert again.json()["status"] == "failed"
    assert gateway.sandbox.settlements == []


async def test_never_job_stays_in_progress(gateway: Gateway) -> None:
    job, header = await submit(gateway, GENERATE, {"model": "flux", "prompt": "#never a fox"})
    await asyncio.sleep(JOB_SECONDS * 2)

    response = await gateway.http.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 202
    assert response.json() == {"id": job["id"], "status": "in_progress"}
    assert gateway.sandbox.settlements == []


async def test_a_failed_settlement_answers_the_completed_poll_with_402_and_its_reason(
    gateway: Gateway,
) -> None:
    job, header = await submit(gateway, GENERATE, {"model": "flux", "prompt": "a fox #settlefail"})

    done = await poll_until_done(gateway, job["poll_url"], header)

    assert done.status_code == 402
    assert done.json()["details"] == "insufficient_funds"
    assert gateway.sandbox.settlements == []


async def test_blockruns_api_prefix_serves_the_same_routes_and_relative_poll_urls(
    gateway: Gateway,
) -> None:
    path = "/api" + GENERATE
    job, header = await submit(gateway, path, {"model": "flux", "prompt": "a fox #slow"})

    assert job["poll_url"] == f"{path}/{job['id']}"
    done = await poll_until_done(gateway, job["poll_url"], header)
    assert done.json()["status"] == "completed"
    assert len(gateway.sandbox.settlements) == 1


async def test_slow_tag_sends_a_fast_model_through_the_job_path(gateway: Gateway) -> None:
    job, header = await submit(gateway, GENERATE, {"model": "cogview", "prompt": "a fox #slow"})

    done = await poll_until_done(gateway, job["poll_url"], header)
    assert done.json()["status"] == "completed"
    assert gateway.sandbox.settlements[0].model == "zai/cogview-4"


@pytest.mark.parametrize(
    ("tweaks", "reason"),
    [
        ({"signer": STRANGER}, "invalid_signature"),
        ({"value": "41999"}, "amount_mismatch"),
        ({"value": "42001"}, "amount_mismatch"),
        ({"to": STRANGER.address}, "recipient_mismatch"),
        ({"valid_before": int(time.time()) - 1}, "expired"),
        ({"valid_after": int(time.time()) + 600}, "not_yet_valid"),
    ],
)
async def test_bad_payment_is_refused_and_nothing_settles(
    gateway: Gateway, tweaks: dict[str, Any], reason: str
) -> None:
    response = await gateway.buy(GENERATE, {"model": "flux", "prompt": "a fox"}, **tweaks)

    assert response.status_code == 402
    assert response.json()["error"] == reason
    assert decode_header(response.headers["PAYMENT-REQUIRED"])["error"] == reason
    assert gateway.sandbox.settlements == []


@pytest.mark.parametrize(
    "header",
    [
        "not base64!",
        base64.b64encode(b"[1, 2]").decode(),
        base64.b64encode(json.dumps({"x402Version": 2, "payload": {}}).encode()).decode(),
    ],
)
async def test_malformed_payment_is_refused(gateway: Gateway, header: str) -> None:
    response = await gateway.pay(GENERATE, {"model": "flux", "prompt": "a fox"}, header)

    assert response.status_code == 402
    assert response.json()["error"] == "invalid_payload"


async def test_payment_for_another_network_is_refused(gateway: Gateway) -> None:
    body = {"model": "flux", "prompt": "a fox"}
    quote = await gateway.quote(GENERATE, body)
    quote["accepts"][0]["network"] = "eip155:8453"
    response = await gateway.pay(GENERATE, body, pay_header(quote))

    assert response.json()["error"] == "invalid_network"


async def test_replayed_authorization_is_refused(gateway: Gateway) -> None:
    body = {"model": "flux", "prompt": "a fox"}
    header = pay_header(await gateway.quote(GENERATE, body))

    assert (await gateway.pay(GENERATE, body, header)).status_code == 200
    replay = await gateway.pay(GENERATE, body, header)
    assert replay.status_code == 402
    assert replay.json()["error"] == "nonce_already_used"
    assert len(gateway.sandbox.settlements) == 1


@pytest.mark.parametrize(
    ("prompt", "status", "code"),
    [("a fox #policy", 403, "content_policy_violation"), ("#ratelimit fox", 429, None)],
)
async def test_refusals_come_before_any_quote(
    gateway: Gateway, prompt: str, status: int, code: str | None
) -> None:
    response = await gateway.http.post(GENERATE, json={"model": "flux", "prompt": prompt})

    assert response.status_code == status
    assert "PAYMENT-REQUIRED" not in response.headers
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if code:
        assert error == {
            "message": "Content policy violation detected",
            "type": "invalid_request_error",
            "code": code,
        }
    else:
        assert response.headers["Retry-After"] == "7"


@pytest.mark.parametrize(("tag", "status"), [("#servererror", 500), ("#timeout", 504)])
async def test_upstream_failures_after_payment_charge_nothing(
    gateway: Gateway, tag: str, status: int
) -> None:
    body = {"model": "flux", "prompt": f"a fox {tag}"}
    header = pay_header(await gateway.quote(GENERATE, body))

    response = await gateway.pay(GENERATE, body, header)
    assert response.status_code == status
    assert "error" in response.json()
    assert gateway.sandbox.settlements == []
    # The authorization was used up: a retry must be signed afresh.
    retry = await gateway.pay(GENERATE, body, header)
    assert retry.json()["error"] == "nonce_already_used"


async def test_nofunds_refuses_the_paid_request(gateway: Gateway) -> None:
    response = await gateway.buy(GENERATE, {"model": "flux", "prompt": "a fox #nofunds"})

    assert response.status_code == 402
    assert response.json()["error"] == "insufficient_funds"
    assert "PAYMENT-REQUIRED" in response.headers
    assert gateway.sandbox.settlements == []


async def test_big_makes_a_large_noisy_png(gateway: Gateway) -> None:
    response = await gateway.buy(GENERATE, {"model": "gpt-image", "prompt": "a fox #big"})

    image_uri = response.json()["data"][0]["url"]
    assert len(base64.b64decode(image_uri.partition(",")[2])) > 1_000_000
    assert open_data_uri(image_uri).size == (1024, 1024)


async def test_huge_makes_a_png_over_discords_upload_limit(gateway: Gateway) -> None:
    response = await gateway.buy(GENERATE, {"model": "gpt-image", "prompt": "a fox #huge"})

    image_uri = response.json()["data"][0]["url"]
    assert 10 * 2**20 < len(base64.b64decode(image_uri.partition(",")[2])) < 50 * 2**20
    assert open_data_uri(image_uri).size == (2048, 2048)


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (GENERATE, {"model": "flux", "prompt": "  "}, "invalid_prompt"),
        (GENERATE, {"model": "flux"}, "invalid_prompt"),
        (GENERATE, {"prompt": "a fox"}, "unknown_model"),
        (GENERATE, {"model": "acme/painter", "prompt": "a fox"}, "unknown_model"),
        (GENERATE, {"model": "flux", "prompt": "a fox", "size": "999x999"}, "invalid_size"),
        (GENERATE, {"model": "flux", "prompt": "a fox", "n": 0}, "invalid_n"),
        (GENERATE, {"model": "flux", "prompt": "a fox", "n": 5}, "invalid_n"),
        (GENERATE, {"model": "flux", "prompt": "a fox", "n": "2"}, "invalid_n"),
        (GENERATE, {"model": "dall-e-3", "prompt": "a fox", "n": 2}, "invalid_n"),
        (GENERATE, {"model": "flux", "prompt": "a fox", "quality": "hd"}, "invalid_quality"),
        (GENERATE, ["not", "an", "object"], "invalid_body"),
        (
            EDIT,
            {"model": "flux", "prompt": "a hat", "image": TINY_PNG},
            "unsupported_model",
        ),
        (EDIT, {"prompt": "a hat"}, "missing_image"),
        (EDIT, {"prompt": "a hat", "image": []}, "missing_image"),
        (EDIT, {"prompt": "a hat", "image": "https://example.com/a.png"}, "invalid_image"),
        (EDIT, {"prompt": "a hat", "image": "data:image/png;base64,AAAA"}, "invalid_image"),
        (
            EDIT,
            {"prompt": "a hat", "image": "data:image/gif;base64,R0lGODlhAQABAAAAACw="},
            "invalid_image",
        ),
        (EDIT, {"prompt": "a hat", "image": [TINY_PNG] * 5}, "too_many_images"),
        (
            EDIT,
            {"model": "nano-banana", "prompt": "a hat", "image": [TINY_PNG] * 4},
            "too_many_images",
        ),
        (
            EDIT,
            {"model": "nano-banana", "prompt": "a", "image": TINY_PNG, "mask": "x"},
            "mask_not_supported",
        ),
        (
            EDIT,
            {"prompt": "a", "image": [TINY_PNG] * 2, "mask": TINY_PNG},
            "mask_with_multiple_images",
        ),
        (
            EDIT,
            {"prompt": "a", "image": TINY_PNG, "mask": "data:image/png;base64,AA=="},
            "invalid_image",
        ),
    ],
)
async def test_invalid_request_is_400_before_any_quote(
    gateway: Gateway, path: str, body: Any, code: str
) -> None:
    response = await gateway.http.post(path, json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["code"] == code
    assert "PAYMENT-REQUIRED" not in response.headers


async def test_broken_json_is_400(gateway: Gateway) -> None:
    response = await gateway.http.post(GENERATE, content=b"{nope")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_edit_is_drawn_from_the_first_input_at_the_requested_size(
    gateway: Gateway, fmt: str
) -> None:
    body = {
        "prompt": "add a hat",
        "image": [png_data_uri((64, 48), "red", fmt), png_data_uri((8, 8), "blue")],
        "size": "1536x1024",
    }
    response = await gateway.buy(EDIT, body)

    assert response.status_code == 200, response.text
    image = open_data_uri(response.json()["data"][0]["url"]).convert("RGB")
    assert image.size == (1536, 1024)
    red, green, blue = image.getpixel((5, 5))
    assert red > 200 and green < 50 and blue < 50
    assert gateway.sandbox.settlements[0].model == "openai/gpt-image-1"
    assert gateway.sandbox.settlements[0].amount_micro == 42_000


async def test_mask_with_one_image_is_quoted(gateway: Gateway) -> None:
    body = {"prompt": "a hat", "image": TINY_PNG, "mask": png_data_uri((8, 8), "white")}

    quote = await gateway.quote(EDIT, body)
    assert quote["accepts"][0]["amount"] == "21000"


async def test_settlements_endpoint_lists_every_charge_and_the_total(gateway: Gateway) -> None:
    await gateway.buy(GENERATE, {"model": "flux", "prompt": "one"})
    await gateway.buy(GENERATE, {"model": "cogview", "prompt": "two", "n": 2})
    await gateway.buy(GENERATE, {"model": "flux", "prompt": "three #nofunds"})

    report = (await gateway.http.get("/sandbox/settlements")).json()
    assert report["total_micro"] == 42_000 + 30_000
    assert [row["model"] for row in report["settlements"]] == [
        "black-forest/flux-1.1-pro",
        "zai/cogview-4",
    ]
    first = gateway.sandbox.settlements[0]
    assert report["settlements"][0] == {
        "tx_hash": first.tx_hash,
        "payer": first.payer,
        "amount_micro": first.amount_micro,
        "nonce": first.nonce,
        "model": first.model,
        "settled_at": first.settled_at,
    }


async def test_unknown_image_is_404(gateway: Gateway) -> None:
    response = await gateway.http.get("/images/0123abcd.png")
    assert response.status_code == 404


async def test_latency_delays_the_paid_answer() -> None:
    async with running(latency=0.3) as gateway:
        body = {"model": "flux", "prompt": "a fox"}
        header = pay_header(await gateway.quote(GENERATE, body))
        started = time.monotonic()
        response = await gateway.pay(GENERATE, body, header)

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


@contextmanager
def callbacks_over(cpu_seconds: float) -> Iterator[list[str]]:
    """The event loop's callbacks that use more than ``cpu_seconds`` of its thread's user CPU.

    Thread CPU time, unlike the wall time asyncio's debug mode reports, leaves out the loop's
    waits for the GIL while a worker thread is inside one long C call (a json.dumps of 16 MB
    holds it ~50 ms), so it counts only work done on the loop itself and the same budget holds
    on a slow machine under load. User time only: the kernel's copy of a 12 MB answer into the
    socket is system time that no thread can take off the loop, and it grows with the load of
    the machine (seen: 44 ms). The cyclic garbage collector is paused meanwhile: a collection
    of the whole suite's heap can land in any callback and is not the callback's work.
    """
    slow: list[str] = []
    run = asyncio.events.Handle._run  # the loop runs every callback, task steps too, through it

    def user_cpu() -> float:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_utime

    def timed(handle: asyncio.Handle) -> None:
        started = user_cpu()
        try:
            run(handle)
        finally:
            spent = user_cpu() - started
            if spent > cpu_seconds:
                slow.append(f"{handle!r} used {spent:.3f} s of CPU")

    gc.collect()
    gc.disable()
    try:
        with patch.object(asyncio.events.Handle, "_run", timed):
            yield slow
    finally:
        gc.enable()


def buy_from_another_thread(root: str, orders: list[tuple[str, bytes]]) -> list[httpx.Response]:
    """Quote and pay each (path, JSON body) with a blocking client, so none of it is the loop's."""
    answers = []
    with httpx.Client(base_url=root, timeout=60) as http:
        for path, body in orders:
            headers = {"Content-Type": "application/json"}
            quote = http.post(path, content=body, headers=headers)
            headers["PAYMENT-SIGNATURE"] = pay_header(quote.json())
            answers.append(http.post(path, content=body, headers=headers))
    return answers


async def test_big_bodies_and_pictures_are_handled_off_the_event_loop(gateway: Gateway) -> None:
    # On a 2-core CI-class VM, parsing this edit on the loop took 70-80 ms of its CPU and answering
    # #huge 70-200 ms; in threads no callback took over 11 ms (copying bodies in and out).
    noise = random.Random(0).randbytes(2000 * 2000 * 3)
    out = BytesIO()
    Image.frombytes("RGB", (2000, 2000), noise).save(out, "PNG", compress_level=1)
    picture = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()  # ~16 MB
    orders = [
        (EDIT, json.dumps({"prompt": "add a hat", "image": picture}).encode()),
        (GENERATE, json.dumps({"model": "gpt-image", "prompt": "a fox #huge"}).encode()),
    ]

    with callbacks_over(0.04) as slow:
        edited, generated = await asyncio.to_thread(buy_from_another_thread, gateway.root, orders)

    assert edited.status_code == generated.status_code == 200
    assert open_data_uri(edited.json()["data"][0]["url"]).size == (1024, 1024)
    assert len(generated.content) > 10 * 2**20
    assert len(gateway.sandbox.settlements) == 2
    assert slow == []


async def test_serve_forever_prints_the_url_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(serve_forever("127.0.0.1", 0))
    for _ in range(100):
        await asyncio.sleep(0.02)
        out = capsys.readouterr().out
        if out:
            break
    url = out.split()[3]
    async with httpx.AsyncClient() as http:
        response = await http.post(url + GENERATE, json={"model": "flux", "prompt": "a fox"})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert f"IMAGE_API_URL={url}" in out
    assert response.status_code == 402
