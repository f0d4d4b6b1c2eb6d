"""BlockRun's own Python SDK (blockrun-llm's ``ImageClient``) buys from the sandbox.

The sandbox is our model of BlockRun: what the real SDK does against it is what it would do
against the real gateway. These tests keep that model honest, including the 202 polls of slow
jobs (blockrun-llm polls again only on 202 or 504) and each failure the sandbox can provoke.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from blockrun_llm import ImageClient
from blockrun_llm.types import APIError, PaymentError
from eth_account import Account
from pictures import png

from sandbox import Sandbox

WALLET = Account.create()
JOB_SECONDS = 0.8
POLL_SECONDS = 0.05


@dataclass
class Blockrun:
    """The sandbox, blockrun-llm's client for it, and the statuses of every poll it answered."""

    sandbox: Sandbox
    client: ImageClient
    polls: list[tuple[int, str]] = field(default_factory=list)

    async def generate(self, prompt: str, **options: Any) -> Any:
        return await asyncio.to_thread(self.client.generate, prompt, **options)

    async def edit(self, prompt: str, image: str, **options: Any) -> Any:
        return await asyncio.to_thread(self.client.edit, prompt, image, **options)


def _poll_recorder(polls: list[tuple[int, str]]) -> Any:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "GET" and "/v1/images/generations/" in request.path:
            body = response.body if isinstance(response, web.Response) else b""
            status = "completed" if b'"completed"' in (body or b"") else ""
            for word in ("queued", "in_progress", "failed"):
                if f'"{word}"'.encode() in (body or b""):
                    status = word
            polls.append((response.status, status))
        return response

    return record


@pytest.fixture
async def blockrun() -> AsyncIterator[Blockrun]:
    sandbox = Sandbox(job_seconds=JOB_SECONDS)
    polls: list[tuple[int, str]] = []
    sandbox.app.middlewares.append(_poll_recorder(polls))
    root = await sandbox.start()
    client = ImageClient(private_key="0x" + bytes(WALLET.key).hex(), api_url=f"{root}/api")
    client.IMAGE_POLL_INTERVAL_SECONDS = POLL_SECONDS
    client.IMAGE_POLL_BUDGET_SECONDS = 10.0
    try:
        yield Blockrun(sandbox, client, polls)
    finally:
        client._client.close()
        await sandbox.close()


def _data_uri(picture: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(picture).decode()


def _settled(blockrun: Blockrun) -> list[tuple[str, int]]:
    return [(s.payer, s.amount_micro) for s in blockrun.sandbox.settlements]


async def test_a_fast_model_is_bought_in_one_paid_post(blockrun: Blockrun) -> None:
    result = await blockrun.generate("a fox", model="google/nano-banana")

    assert len(result.data) == 1 and result.data[0].url
    assert _settled(blockrun) == [(WALLET.address, 52_500)]
    assert blockrun.polls == []


async def test_a_slow_model_is_polled_through_202s_and_settled_once(blockrun: Blockrun) -> None:
    result = await blockrun.generate("a fox", model="openai/gpt-image-2")

    assert result.data[0].url.startswith("data:image/png;base64,")
    waiting = [poll for poll in blockrun.polls if poll[0] == 202]
    assert len(waiting) >= 3
    assert {status for _, status in waiting} == {"queued", "in_progress"}
    assert blockrun.polls[-1] == (200, "completed")
    assert len(blockrun.sandbox.settlements) == 1


async def test_an_edit_with_a_picture_is_bought(blockrun: Blockrun) -> None:
    picture = png(64, 64)
    uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    result = await blockrun.edit("add a hat", uri, model="openai/gpt-image-1")

    assert result.data[0].url
    assert len(blockrun.sandbox.settlements) == 1


async def test_a_slow_edit_is_polled_and_settled_once(blockrun: Blockrun) -> None:
    uri = _data_uri(png(64, 64))
    result = await blockrun.edit("add a hat #slow", uri, model="openai/gpt-image-1")

    assert result.data[0].url
    assert sum(1 for code, _ in blockrun.polls if code == 202) >= 3
    assert len(blockrun.sandbox.settlements) == 1


@pytest.mark.parametrize(
    ("tag", "error", "status", "words"),
    [
        ("policy", APIError, 403, "content_policy"),
        ("ratelimit", APIError, 429, "Rate limit"),
        ("servererror", APIError, 500, "provider failed"),
        ("timeout", APIError, 504, "timed out"),
        ("nofunds", PaymentError, 402, "insufficient_funds"),
        ("fail", APIError, 200, "failed upstream"),
        ("settlefail", PaymentError, 402, "insufficient_funds"),
    ],
)
async def test_each_failure_reaches_the_sdk_as_blockrun_would_send_it(
    blockrun: Blockrun, tag: str, error: type[Exception], status: int, words: str
) -> None:
    with pytest.raises(error) as raised:
        await blockrun.generate(f"a fox #{tag}", model="google/nano-banana")

    assert getattr(raised.value, "status_code", None) == status
    assert words in f"{raised.value} {getattr(raised.value, 'response', '')}"
    assert blockrun.sandbox.settlements == []


async def test_a_job_that_never_completes_costs_nothing_when_the_sdk_gives_up(
    blockrun: Blockrun,
) -> None:
    blockrun.client.IMAGE_POLL_BUDGET_SECONDS = 0.5

    with pytest.raises(APIError, match="did not complete"):
        await blockrun.generate("a fox #never", model="google/nano-banana")

    assert blockrun.polls and all(code == 202 for code, _ in blockrun.polls)
    assert blockrun.sandbox.settlements == []
