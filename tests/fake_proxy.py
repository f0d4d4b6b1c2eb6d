"""A forwarding HTTP proxy on loopback, of the kind ``HTTP_PROXY`` names: it records the first
request of every connection made through it and passes the bytes on both ways (a websocket's
upgrade and frames too); an ``https://`` address comes as ``CONNECT``, a tunnel the proxy cannot
read. ``routes`` sends a host it names to another address, so a test can give the bot an address
it can reach only through the proxy. ``tls_front`` serves TLS in front of a plain local server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from local import serving_streams

MAX_HEAD_BYTES = 64 * 1024
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Passage:
    """A connection's first request as the proxy got it."""

    method: str
    target: str  # the absolute URL, or host:port for CONNECT
    authorization: str | None  # its Proxy-Authorization header


@dataclass
class FakeProxy:
    routes: dict[str, str] = field(default_factory=dict)  # host -> host to connect to instead
    passages: list[Passage] = field(default_factory=list)
    url: str = ""  # http://127.0.0.1:port, once started
    _running: contextlib.AsyncExitStack = field(
        default_factory=contextlib.AsyncExitStack, repr=False
    )

    async def start(self) -> str:
        serving = serving_streams(self._serve, limit=MAX_HEAD_BYTES)
        self.url = f"http://127.0.0.1:{await self._running.enter_async_context(serving)}"
        return self.url

    async def close(self) -> None:
        await self._running.aclose()

    def targets(self, prefix: str) -> list[str]:
        """The recorded targets that start with ``prefix``."""
        return [p.target for p in self.passages if p.target.startswith(prefix)]

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        # A client gone, or a request this fake cannot forward: the connection ends.
        with contextlib.suppress(
            OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError
        ):
            await self._forward(client, to_client)

    async def _forward(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        head = await client.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines if line)
        }
        self.passages.append(Passage(method, target, headers.get("proxy-authorization")))
        address = urlsplit(f"//{target}" if method == "CONNECT" else target)
        if address.hostname is None:
            raise ValueError("not an absolute URL")
        host = self.routes.get(address.hostname, address.hostname)
        upstream, to_upstream = await asyncio.open_connection(host, address.port or 80)
        try:
            if method == "CONNECT":
                to_client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                to_upstream.write(head)  # absolute-form, which servers take as it is
            await asyncio.gather(_pipe(client, to_upstream), _pipe(upstream, to_client))
        finally:
            to_upstream.close()


@contextlib.asynccontextmanager
async def tls_front(upstream_port: int, certfile: str, keyfile: str) -> AsyncIterator[int]:
    """TLS on a loopback port, with this certificate, for the plain server at ``upstream_port``:
    an HTTPS address for a test server; yields the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)

    async def serve(client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        try:
            upstream, to_upstream = await asyncio.open_connection("127.0.0.1", upstream_port)
            try:
                await asyncio.gather(_pipe(client, to_upstream), _pipe(upstream, to_client))
            finally:
                to_upstream.close()
        except OSError:  # ssl.SSLError included
            pass  # a client gone: the connection ends

    async with serving_streams(serve, ssl=context) as port:
        yield port


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while chunk := await source.read(_CHUNK_BYTES):
        sink.write(chunk)
        await sink.drain()
    if sink.can_write_eof():  # not TLS's
        with contextlib.suppress(OSError):
            sink.write_eof()
