"""Helpers for tests that run local servers and processes: a free port, a throwaway HTTP server,
waiting for a state, reading a request's body types cheaply."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

from aiohttp import hdrs, web
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


Connection = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving_streams(
    handle: Connection, *, ssl: SSLContext | None = None, limit: int = 2**16
) -> AsyncIterator[int]:
    """A raw TCP server on loopback (TLS with ``ssl``) running ``handle`` for each connection,
    whose writer is closed once it returns; yields its port. Connections still open at the end
    are cancelled."""
    connections: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await handle(reader, writer)
        finally:
            writer.close()
            connections.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl, limit=limit)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


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


@dataclass(frozen=True)
class FormPart:
    """One named part of a ``multipart/form-data`` body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


async def form_parts(request: web.Request) -> list[FormPart]:
    """The named parts of a ``multipart/form-data`` body, read whole (within the app's
    ``client_max_size``) and split with bytes searches. aiohttp's part reader searched for the
    boundary in each piece as it arrived, copying it each time: over half the fake Telegram's CPU
    for a photo of 1.4 MB in bench/telegram_load.py. ValueError if the body is malformed."""
    boundary = _boundary(request.headers.get(hdrs.CONTENT_TYPE, ""))
    return list(_split_form(await read_body(request), boundary))


async def read_body(request: web.Request) -> bytes:
    """The whole body, copied once (``request.read()`` copies it twice); within the app's
    ``client_max_size``, else 413 as ``request.read()`` would."""
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > request.client_max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def _boundary(content_type: str) -> bytes:
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    raise ValueError("a multipart body without a boundary")


def _split_form(body: bytes, boundary: bytes) -> Iterator[FormPart]:
    """RFC 7578's parts: ``--boundary`` CRLF, headers, CRLF CRLF, content, CRLF ``--boundary``,
    ..., ``--boundary--``; the preamble and epilogue are ignored, as are parts without a name."""
    delimiter = b"\r\n--" + boundary
    if body.startswith(delimiter[2:]):
        at = len(delimiter) - 2
    else:
        at = body.find(delimiter)
        if at < 0:
            raise ValueError("a multipart body without its boundary")
        at += len(delimiter)
    while not body.startswith(b"--", at):  # the close delimiter ends the body
        line_end = body.find(b"\r\n", at)
        headers_end = body.find(b"\r\n\r\n", line_end)
        end = body.find(delimiter, headers_end + 4)
        if min(line_end, headers_end, end) < 0:
            raise ValueError("a truncated multipart body")
        headers = _part_headers(body[line_end + 2 : headers_end])
        _, fields = parse_content_disposition(headers.get("content-disposition"))
        name = content_disposition_filename(fields, "name")
        if name is not None:
            filename = content_disposition_filename(fields, "filename")
            content_type = headers.get("content-type")
            yield FormPart(name, filename, content_type, body[headers_end + 4 : end])
        at = end + len(delimiter)


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("a malformed part header")
        headers[name.strip().decode("ascii").lower()] = value.strip().decode()
    return headers
