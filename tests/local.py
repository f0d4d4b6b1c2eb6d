"""Helpers for tests that run local servers and processes: a free port, waiting for a state."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A loopback port free right now, for a server the test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until(check: Callable[[], Any], seconds: float = 30.0, every: float = 0.05) -> None:
    """Wait until ``check()`` (a value or an awaitable) is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await _value(check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(every)


async def _value(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
