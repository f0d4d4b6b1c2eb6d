"""Helpers for tests that run local servers and processes: a free port, a throwaway HTTP server,
waiting for a state, reading a request's body types cheaply."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    """A loopback port free right now, for a server the test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def serving(*routes: tuple[str, str, Handler], port: int = 0) -> AsyncIterator[str]:
    """A throwaway HTTP server on loopback with these (method, path, handler) routes, for the
    block; yields its root URL. Handlers still running at the end get 1 s, not aiohttp's 60."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def until(check: Callable[[], Any], seconds: float = 30.0, every: float = 0.05) -> None:
    """Wait until ``check()`` (a value or an awaitable) is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await _value(check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(every)


async def _value(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def media_type(request: web.Request) -> str:
    """The body's media type, lower case, from the header as it is. Not ``request.content_type``:
    aiohttp parses that with the email package, a seventh of a fake's CPU in the load benches."""
    return request.headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower()


def part_names(part: BodyPartReader) -> tuple[str | None, str | None]:
    """A form part's name and filename, its header parsed once: each of aiohttp's properties
    parses it again, and that was half the fake Telegram's CPU in bench/telegram_load.py."""
    _, fields = parse_content_disposition(part.headers.get(hdrs.CONTENT_DISPOSITION))
    name = content_disposition_filename(fields, "name")
    return name, content_disposition_filename(fields, "filename")
