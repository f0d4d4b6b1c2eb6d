"""In-hand slots bound the pictures in memory, not the crowd waiting for the gateway."""

from __future__ import annotations

import asyncio
import base64
import gc
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
from local import serving
from pictures import png

from bot.commands import parse
from bot.http import gateway_client
from bot.images import ImageResult, ImageService
from bot.requests import MAX_N, EditRequest, GenerateRequest, ImageCommand, ImageInput
from bot.x402 import Wallet, X402Payer
from sandbox import Sandbox

CAP = 500_000
SLOTS = 2
CROWD = 10
LATENCY = 0.5


class Gauge:
    """How many of something are under way at once, and the most seen."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def up(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def down(self) -> None:
        self.now -= 1


class _Watched(httpx.AsyncByteStream):
    """A paid answer's body: held from its first byte read, until its pictures are handed over."""

    def __init__(self, stream: httpx.AsyncByteStream, held: Gauge) -> None:
        self._stream = stream
        self._held = held

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._held.up()
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def watch_paid_answers(http: httpx.AsyncClient, held: Gauge) -> None:
    async def watch(response: httpx.Response) -> None:
        if response.status_code == 200 and "/v1/images/" in response.request.url.path:
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _Watched(response.stream, held)

    http.event_hooks["response"].append(watch)


def request(text: str) -> GenerateRequest:
    command = parse(text)
    assert isinstance(command, ImageCommand)
    built = command.build(())
    assert isinstance(built, GenerateRequest)
    return built


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[Sandbox, str]]:
    gateway = Sandbox(latency=LATENCY)
    yield gateway, await gateway.start()
    await gateway.close()


async def test_a_burst_larger_than_the_slots_never_holds_more_pictures_than_the_bound() -> None:
    """A gateway (paid through a proxy) that answers slowly and streams its bodies in pieces:
    all ten requests wait on it together, but at most two bodies are read or handed over."""
    at_gateway = Gauge()
    uri = "data:image/png;base64," + base64.b64encode(png(640, 480)).decode()
    pieces = [b'{"data":[{"url":"'] + [uri[i : i + 4096].encode() for i in range(0, len(uri), 4096)]

    async def generations(request: web.Request) -> web.StreamResponse:
        await request.read()
        at_gateway.up()
        await asyncio.sleep(0.3)  # the gateway draws
        at_gateway.down()
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        for piece in pieces:
            await answer.write(piece)
            await asyncio.sleep(0.01)
        await answer.write(b'"}]}')
        await answer.write_eof()
        return answer

    held = Gauge()

    async def deliver(result: ImageResult) -> None:
        await asyncio.sleep(0.05)  # a slow upload
        held.down()

    gateway = serving(("POST", "/v1/images/generations", generations))
    async with gateway as url, gateway_client() as http:
        watch_paid_answers(http, held)
        payer = X402Payer(http, None, max_micro=CAP)
        service = ImageService(http, payer, url, max_results_in_hand=SLOTS)
        calls = [
            service.generate(request(f"/imagegen -m gpt-image fox {i}"), on_result=deliver)
            for i in range(CROWD)
        ]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=20)

    assert all(result.pictures[0].width == 640 for result in results)
    assert at_gateway.most == CROWD  # waiting for the gateway held no slot
    assert held.most == SLOTS


async def test_a_slow_gateway_no_longer_makes_later_users_wait_for_earlier_users_gateway_time(
    sandbox: tuple[Sandbox, str],
) -> None:
    """Ten paid requests, two slots, 0.5 s of gateway latency: one round, not five."""
    gateway, url = sandbox
    held = Gauge()

    async def deliver(result: ImageResult) -> None:
        await asyncio.sleep(0.02)  # a quick upload
        held.down()

    async with gateway_client() as http:
        watch_paid_answers(http, held)
        payer = X402Payer(http, Wallet.create(), max_micro=CAP)
        service = ImageService(http, payer, url, max_results_in_hand=SLOTS)
        started = time.monotonic()
        calls = [
            service.generate(request(f"/imagegen -m gpt-image a fox {i}"), on_result=deliver)
            for i in range(CROWD)
        ]
        results = await asyncio.gather(*calls)
        wall = time.monotonic() - started

    assert len(results) == len(gateway.settlements) == CROWD
    assert held.most <= SLOTS
    assert wall < 3 * LATENCY  # the old slots made it CROWD / SLOTS = 5 rounds


async def test_results_in_hand_never_wait_on_the_pool_for_their_picture_links() -> None:
    """An answer too big to sit in the socket's buffers keeps its connection while it waits for
    a slot, so the pool has room beyond the exchanges in flight for every link the results in
    hand download (bot/http.py); with only one connection per exchange, a result's downloads
    wait on answers that wait on its slot, until the download deadline fails them."""
    in_flight, slots = 3, 1
    picture = png(64, 48)

    async def generations(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.2)  # the gateway draws
        links = [f'{{"url":"http://{request.host}/pictures/{i}.png"}}' for i in range(MAX_N)]
        padding = " " * 4_000_000  # a big answer with links, as a hostile gateway may send
        return web.json_response(text='{"data":[' + ",".join(links) + "]" + padding + "}")

    async def pictures(request: web.Request) -> web.Response:
        return web.Response(body=picture, content_type="image/png")

    gateway = serving(
        ("POST", "/v1/images/generations", generations), ("GET", "/pictures/{name}", pictures)
    )
    async with gateway as url, gateway_client(in_flight + slots * MAX_N) as http:
        payer = X402Payer(http, None, max_micro=CAP, max_in_flight=in_flight)
        service = ImageService(http, payer, url, max_results_in_hand=slots, download_deadline=2.0)
        calls = [
            service.generate(request(f"/imagegen -m nano-banana --n {MAX_N} a fox {i}"))
            for i in range(CROWD)
        ]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    assert [len(result.pictures) for result in results] == [MAX_N] * CROWD


async def test_waiting_for_a_slot_is_not_counted_as_the_gateways_time() -> None:
    """The paid answer is in and settled while it waits for a slot behind slow uploads: that
    wait is not the gateway's, so it neither runs out the exchange deadline (which would
    report a settled payment as of unknown outcome) nor shows in the exchange times."""
    gateway = Sandbox(latency=0.1)
    url = await gateway.start()
    exchanges: list[float] = []

    async def deliver(result: ImageResult) -> None:
        await asyncio.sleep(0.4)  # a slow upload

    try:
        async with gateway_client() as http:
            payer = X402Payer(http, Wallet.create(), max_micro=CAP)
            service = ImageService(
                http,
                payer,
                url,
                max_results_in_hand=1,
                exchange_deadline=0.6,
                on_exchange=exchanges.append,
            )
            calls = [
                service.generate(request(f"/imagegen -m gpt-image a fox {i}"), on_result=deliver)
                for i in range(3)
            ]
            results = await asyncio.gather(*calls)  # the last waits ~0.8 s for its slot
    finally:
        await gateway.close()
    assert len(results) == len(gateway.settlements) == 3
    assert len(exchanges) == 6  # a quote and a paid request each
    assert max(exchanges) < 0.4


async def test_edits_hold_a_slot_for_their_pictures_while_generations_wait_without_one() -> None:
    """An edit's input pictures go out as data URIs: pictures in memory, so an edit holds its
    slot from building its request on; a generation's request holds none."""
    at_gateway = {"generations": Gauge(), "image2image": Gauge()}
    answer = {"data": [{"url": "data:image/png;base64," + base64.b64encode(png()).decode()}]}

    async def draw(request: web.Request) -> web.Response:
        await request.read()
        gauge = at_gateway[request.match_info["kind"]]
        gauge.up()
        await asyncio.sleep(0.2)  # the gateway draws
        gauge.down()
        return web.json_response(answer)

    async with serving(("POST", "/v1/images/{kind}", draw)) as url, gateway_client() as http:
        payer = X402Payer(http, None, max_micro=CAP)
        service = ImageService(http, payer, url, max_results_in_hand=SLOTS)
        command = parse("/img2img -m nano-banana make it blue")
        assert isinstance(command, ImageCommand)
        edit = command.build((ImageInput(png(320, 240)),))
        assert isinstance(edit, EditRequest)
        edits = [service.edit(edit) for _ in range(CROWD)]
        draws = [service.generate(request(f"/imagegen a fox {i}")) for i in range(CROWD)]
        await asyncio.wait_for(asyncio.gather(*edits, *draws), timeout=20)
    assert at_gateway["image2image"].most == SLOTS
    assert at_gateway["generations"].most == CROWD


async def test_the_hand_over_holds_the_decoded_pictures_not_the_answer_they_came_in(
    sandbox: tuple[Sandbox, str],
) -> None:
    """A slot's memory during the (slow) upload: the ~1.4 MB picture, not also the ~1.9 MB
    answer body and its ~1.9 MB data URI, which are let go once decoded."""
    gateway, url = sandbox
    gateway.latency = 0.0
    kept: list[int] = []

    async def deliver(result: ImageResult) -> None:
        gc.collect()
        for thing in gc.get_objects():
            if isinstance(thing, httpx.Response) and thing.is_closed:
                kept.append(len(thing.content))
            elif isinstance(thing, dict) and isinstance(thing.get("data"), list):
                kept.extend(len(str(item)) for item in thing["data"])
        kept[:] = [size for size in kept if size > 1_000_000]

    async with gateway_client() as http:
        payer = X402Payer(http, Wallet.create(), max_micro=CAP)
        service = ImageService(http, payer, url)
        result = await service.generate(
            request("/imagegen -m gpt-image a fox #big"), on_result=deliver
        )
    assert len(result.pictures[0].data) > 1_000_000
    assert kept == []
