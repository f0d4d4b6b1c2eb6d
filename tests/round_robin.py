"""A round-robin HTTP load balancer on 127.0.0.1, as nginx or Caddy would be in front of replicas.

Each request goes, path, body and headers unchanged, to the next backend in turn; an
unreachable backend answers 502, so the sender (Telegram) sends the update again later.
"""

from __future__ import annotations

import itertools
from collections import Counter

from aiohttp import ClientError, ClientSession, ClientTimeout, hdrs, web

_HOP_BY_HOP = frozenset({hdrs.HOST, hdrs.CONNECTION, hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING})


class RoundRobin:
    """``url`` forwards to ``backends`` (``http://host:port`` roots) one request each in turn."""

    def __init__(self, backends: list[str]) -> None:
        self._turns = itertools.cycle(backends)
        self.forwarded: Counter[str] = Counter()  # backend -> requests it answered
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._client: ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._client = ClientSession(timeout=ClientTimeout(total=30))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._client is not None
        backend = next(self._turns)
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_BY_HOP}
        body = await request.read()
        try:
            async with self._client.request(
                request.method, backend + request.path_qs, headers=headers, data=body
            ) as answer:
                answered = await answer.read()
        except (ClientError, TimeoutError):
            return web.Response(status=502)
        self.forwarded[backend] += 1
        return web.Response(status=answer.status, body=answered, content_type=answer.content_type)
