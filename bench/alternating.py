"""What the one-process benches share: a server in a process of its own, and rounds that
alternate between two ways of doing one thing, so a machine that slows down slows both."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as StopEvent
from typing import Any

import uvloop
from aiohttp import web
from paid_requests import child_server


@contextmanager
def server_process(make_app: Callable[..., web.Application], *args: Any) -> Iterator[str]:
    """``make_app(*args)`` served on loopback by a spawned process for the block (so its CPU is
    never this process's); yields its root URL."""
    with child_server(_serve, make_app, args) as (url, _):
        yield url


def _serve(
    make_app: Callable[..., web.Application],
    args: tuple[Any, ...],
    url_out: Connection,
    stop: StopEvent,
) -> None:
    """Child process: serve the app on a free loopback port, say where, until ``stop``."""

    async def serve() -> None:
        runner = web.AppRunner(make_app(*args))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        url_out.send(f"http://{host}:{port}")
        try:
            await asyncio.to_thread(stop.wait)
        finally:
            await runner.cleanup()

    asyncio.run(serve())


async def alternate(
    ways: dict[str, Callable[[], Awaitable[float]]], rounds: int
) -> dict[str, list[float]]:
    """Each way's figure per round, the ways' order reversed every other round."""
    figures: dict[str, list[float]] = {way: [] for way in ways}
    for number in range(rounds):
        order = list(ways) if number % 2 == 0 else list(reversed(ways))
        for way in order:
            figures[way].append(await ways[way]())
    return figures


def print_figures(figures: dict[str, list[float]], per: str, indent: str = "  ") -> None:
    """One line per way: the median of its CPU figures (ms) and their range."""
    for way, values in figures.items():
        spread = f"range {min(values):.2f} to {max(values):.2f}, {len(values)} rounds"
        median = statistics.median(values)
        print(f"{indent}{way:<16} CPU {median:.2f} ms per {per} ({spread})")


def run_bench(
    doc: str,
    make_app: Callable[[], web.Application],
    compare: Callable[[str, int], Awaitable[dict[str, list[float]]]],
    per: str,
    rounds: int,
) -> None:
    """A one-process bench's command line: ``--rounds`` (default ``rounds``), the stand-in
    ``make_app`` in its own process, ``compare(its root, rounds)`` on uvloop as the bot runs,
    and the figures per ``per``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    with server_process(make_app) as root:
        print(f"load average before: {os.getloadavg()}")
        print_figures(uvloop.run(compare(root, args.rounds)), per)
