"""An httpx transport that sends through aiohttp, for ``paid_requests.py --transport aiohttp``.

Bench-only: it shows what the bot's CPU per request would be if its one ``httpx.AsyncClient``
kept its API but left connection pooling to aiohttp (already a dependency) instead of httpcore.
Bodies are read whole; transport errors become ``httpx.TransportError`` as the payer expects.
"""

from __future__ import annotations

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session with a pool of ``limit`` connections behind an httpx client."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        timeout = request.extensions.get("timeout", {})
        try:
            async with self._session.request(
                request.method,
                str(request.url),
                headers=[(key, value) for key, value in request.headers.multi_items()],
                data=await request.aread(),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
                ),
            ) as response:
                content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            raise httpx.TransportError(str(error)) from error
        return httpx.Response(
            response.status, headers=list(response.raw_headers), content=content, request=request
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
