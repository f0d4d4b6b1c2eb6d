"""The operators' endpoint on ``METRICS_LISTEN``: Prometheus' ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.errors import ConfigError
from bot.metrics import Metrics

log = logging.getLogger(__name__)

HEALTH_DEADLINE = 2.0  # seconds: a check that takes longer counts as unhealthy
HealthCheck = Callable[[], Awaitable[bool]]


@asynccontextmanager
async def serving_health(
    listen: str, metrics: Metrics, healthy: HealthCheck, *, deadline: float = HEALTH_DEADLINE
) -> AsyncIterator[None]:
    """Serve ``GET /metrics`` and ``GET /healthz`` on ``listen`` (``host:port``) in the block.

    ``/healthz`` is 200 when ``healthy()`` says so within ``deadline``, else 503. Nothing reads
    a request body; any other path is 404.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")  # an IPv6 address is written [::]:9100
    app = web.Application()
    app.router.add_get("/metrics", _metrics_route(metrics))
    app.router.add_get("/healthz", _health_route(healthy, deadline))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, int(port)).start()
        except OSError as error:
            raise ConfigError(
                f"could not listen on METRICS_LISTEN ({host}:{port}): "
                f"{os.strerror(error.errno) if error.errno else error}"
            ) from None
        yield
    finally:
        await runner.cleanup()


def _metrics_route(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def scrape(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)  # a few dozen series: no need for a thread
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return scrape


def _health_route(
    healthy: HealthCheck, deadline: float
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def check(_: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(deadline):
                ok = await healthy()
        except TimeoutError:
            log.warning("health check: no answer within %.1f s", deadline)
            ok = False
        except Exception as error:  # a failing check is an answer: unhealthy
            log.warning("health check failed: %s", type(error).__name__)
            ok = False
        if ok:
            return web.Response(text="ok\n")
        return web.Response(text="unhealthy\n", status=503)

    return check
