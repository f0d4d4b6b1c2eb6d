"""The bot's CPU to read one paid answer: big pieces against httpx-aiohttp's 16 KiB ones.

Run: ``.venv/bin/python bench/gateway_read.py [--pictures 1400000] [--rounds 10]``. The gateway
client reads a paid answer (JSON with one data-URI picture of ``--pictures`` random bytes, no
Content-Encoding, as the sandbox and BlockRun send it) through ``read_capped``, decoding the
picture as it arrives, 10 at a time, from a server in another process. Rounds alternate between
the shipped piece size (``PLAIN_PIECE_BYTES``) and 16 KiB, so a machine that slows down slows
both. Prints this process's CPU per answer, median and range.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from alternating import alternate, print_figures, server_process

from bot import http as gateway_http
from bot.fetching import read_capped

AT_ONCE = 10
BATCHES = 4  # per round
CAP = 300 * 1024 * 1024


def gateway(picture_bytes: int) -> web.Application:
    """One answer, always the same: a picture as a data URI in the gateway's JSON."""
    picture = base64.b64encode(os.urandom(picture_bytes)).decode()
    body = json.dumps({"data": [{"url": f"data:image/png;base64,{picture}"}]}).encode()

    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/answer", answer)
    return app


async def cpu_per_answer(url: str) -> float:
    """Milliseconds of this process's CPU per answer over one round."""
    async with gateway_http.gateway_client() as client:

        async def read_one() -> None:
            async with client.stream("GET", url) as response:
                await read_capped(response, CAP, pictures=True)

        await read_one()  # a connection for the round
        started = time.process_time()
        for _ in range(BATCHES):
            await asyncio.gather(*(read_one() for _ in range(AT_ONCE)))
        return (time.process_time() - started) / (BATCHES * AT_ONCE) * 1e3


async def compare(url: str, rounds: int) -> dict[str, list[float]]:
    shipped = gateway_http.PLAIN_PIECE_BYTES

    def way(piece_bytes: int) -> Callable[[], Awaitable[float]]:
        def run() -> Awaitable[float]:
            gateway_http.PLAIN_PIECE_BYTES = piece_bytes
            return cpu_per_answer(url)

        return run

    ways = {f"{shipped // 1024} KiB pieces": way(shipped), "16 KiB pieces": way(16 * 1024)}
    try:
        return await alternate(ways, rounds)
    finally:
        gateway_http.PLAIN_PIECE_BYTES = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pictures", type=int, default=1_400_000, help="picture size, bytes")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with server_process(gateway, args.pictures) as root:
        print(f"load average before: {os.getloadavg()}")
        figures = asyncio.run(compare(f"{root}/answer", args.rounds))
        print_figures(figures, "answer")


if __name__ == "__main__":
    main()
