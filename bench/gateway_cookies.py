"""The bot's CPU per gateway request: its client (a jar that takes no cookie) against the same
client with a standard-library jar that refuses every cookie (the bot's client before).

Run: ``.venv/bin/python bench/gateway_cookies.py [--rounds 20]``. Each round sends 200 quote
requests (a 402 with a small JSON body), 20 at a time, to a stand-in in another process; rounds
alternate between the two clients, so a machine that slows down slows both. Prints this
process's CPU per request, median and range.
"""

from __future__ import annotations

import asyncio
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from aiohttp import web
from alternating import alternate, run_bench
from httpx_aiohttp import HttpxAiohttpClient

from bot import http

AT_ONCE = 20
BATCHES = 10  # per round


def gateway() -> web.Application:
    """A stand-in that answers every request with a quote-sized 402."""

    async def quote(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"x402Version": 2, "accepts": [{"amount": "40000"}]}, status=402)

    app = web.Application()
    app.router.add_post("/v1/images/generations", quote)
    return app


async def cpu_per_request(client: httpx.AsyncClient, url: str) -> float:
    """Milliseconds of this process's CPU per request over one round."""

    async def one() -> None:
        async with client.stream("POST", url, json={"prompt": "a fox"}) as response:
            await response.aread()

    started = time.process_time()
    for _ in range(BATCHES):
        await asyncio.gather(*(one() for _ in range(AT_ONCE)))
    return (time.process_time() - started) / (BATCHES * AT_ONCE) * 1e3


async def compare(root: str, rounds: int) -> dict[str, list[float]]:
    url = f"{root}/v1/images/generations"
    refusing = HttpxAiohttpClient(
        transport=http._Transport(limits=http.pool_limits(AT_ONCE)),
        timeout=httpx.Timeout(120.0, connect=10.0),
        event_hooks=http.FREE_WHEN_CLOSED,
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
    )
    async with http.gateway_client(AT_ONCE) as shipped, refusing:
        for client in (shipped, refusing):
            await cpu_per_request(client, url)  # warm the pools
        ways = {
            "no jar (now)": lambda: cpu_per_request(shipped, url),
            "refusing jar": lambda: cpu_per_request(refusing, url),
        }
        return await alternate(ways, rounds)


if __name__ == "__main__":
    run_bench(__doc__, gateway, compare, "request", rounds=20)
