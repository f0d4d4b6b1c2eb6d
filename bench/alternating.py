"""What the one-process benches share: a server in a process of its own, and rounds that
alternate between two ways of doing one thing, so a machine that slows down slows both."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

START_SECONDS = 1.5  # for the server to listen


@contextmanager
def server_process(serve: Callable[..., None], *args: Any) -> Iterator[None]:
    """``serve(*args)`` in a spawned process for the block, so its CPU is not this process's."""
    server = multiprocessing.get_context("spawn").Process(target=serve, args=args)
    server.start()
    time.sleep(START_SECONDS)
    try:
        yield
    finally:
        server.terminate()


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
