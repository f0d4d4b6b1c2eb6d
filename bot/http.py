"""The HTTP client every gateway call goes through, and the pool settings adapters share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx._utils import URLPattern, get_environment_proxies
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient
from httpx_aiohttp.transport import AiohttpResponseStream

from bot.errors import ConfigError
from bot.images import MAX_RESULTS_IN_HAND
from bot.requests import MAX_N
from bot.x402 import MAX_EXCHANGES_IN_FLIGHT

# A connection for every exchange in flight and every picture link the results in hand fetch.
# An exchange whose answer waits for an in-hand slot keeps its connection, so with fewer the
# results in hand could wait on the pool for the links they must download to give a slot back.
GATEWAY_CONNECTIONS = MAX_EXCHANGES_IN_FLIGHT + MAX_RESULTS_IN_HAND * MAX_N
# How far aiohttp reads a body ahead of its reader; it pauses the socket at twice this. A paid
# answer waiting for its in-hand slot keeps what was read ahead: at aiohttp's default (256 KiB)
# about 50 MB more at the peak of a 200-user burst of large pictures (bench/README.md).
READ_AHEAD_BYTES = 16 * 1024
# An answer sent as it is (no Content-Encoding) is read in pieces of what aiohttp already holds,
# up to this (uvloop reads up to 256 KiB at once), not httpx-aiohttp's 16 KiB: a 1.9 MB answer
# took 2.41 ms of CPU to read, now 1.64 (bench/gateway_read.py). A compressed one keeps 16 KiB
# pieces, so one piece cannot inflate past ~16 MB before the size caps see it.
PLAIN_PIECE_BYTES = 256 * 1024


def gateway_client(
    max_connections: int = GATEWAY_CONNECTIONS, *, env_proxies: bool = True
) -> httpx.AsyncClient:
    """The httpx client every gateway call goes through; through the environment's proxies
    unless ``env_proxies`` is False (the demo's gateway is its own, on loopback).

    httpx's API with aiohttp's connection pool underneath: httpcore's pool costs ~10 ms of CPU
    per paid request at 50 concurrent requests and ~25 ms at 500; aiohttp's ~1 ms (bench/README).
    It keeps no cookies: the gateway needs none, and a jar would grow with every cookie a
    hostile gateway or picture host sets.
    """
    limits = pool_limits(max_connections)
    return _CookielessClient(
        transport=_Transport(limits=limits),
        mounts=_proxy_mounts(limits) if env_proxies else None,
        timeout=httpx.Timeout(120.0, connect=10.0),
        event_hooks=FREE_WHEN_CLOSED,
    )


class _NoCookies(httpx.Cookies):
    """A jar that takes no cookie."""

    def extract_cookies(self, response: httpx.Response) -> None:
        """Take none (a standard-library jar refusing them all cost ~0.03 ms a request more,
        bench/gateway_cookies.py)."""


class _CookielessClient(HttpxAiohttpClient):
    """httpx's client with a jar that stays empty: httpx offers it every answer."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies


def _proxy_mounts(limits: httpx.Limits) -> dict[str, httpx.AsyncBaseTransport | None]:
    """``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` read as httpx reads them, once: httpx
    skips them for a client given its own transport (aiohttp's ``trust_env`` would read them,
    and ``~/.netrc``, in a thread on every request)."""
    calls = "the image gateway and picture downloads"
    return {
        pattern: None
        if url is None
        else _Transport(limits=limits, proxy=httpx.Proxy(_usable(url, calls)))
        for pattern, url in get_environment_proxies().items()
    }


def env_proxy(url: str, calls: str) -> str | None:
    """The proxy ``HTTP(S)_PROXY`` or ``ALL_PROXY`` names for ``url``, None when none does or
    ``NO_PROXY`` names its host: the rule ``gateway_client`` follows, for a client that takes
    one proxy for all its ``calls`` (the platforms' aiohttp sessions)."""
    mounts = sorted(
        ((URLPattern(pattern), proxy) for pattern, proxy in get_environment_proxies().items()),
        key=lambda mount: mount[0],
    )
    target = httpx.URL(url)
    proxy = next((proxy for pattern, proxy in mounts if pattern.matches(target)), None)
    return None if proxy is None else _usable(proxy, calls)


def _usable(proxy: str, calls: str) -> str:
    """``proxy`` when aiohttp can go through it (an http:// or https:// URL), else ConfigError,
    which names the variables but not the URL: it may hold a password."""
    try:
        scheme = httpx.URL(proxy).scheme
    except httpx.InvalidURL:
        scheme = ""
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"HTTP_PROXY, HTTPS_PROXY or ALL_PROXY names a proxy for {calls} that is not "
            "http:// or https://; name an HTTP proxy, or exempt the host in NO_PROXY"
        )
    return proxy


class _Transport(AiohttpTransport):
    """httpx-aiohttp's transport, raising an answer aiohttp refuses to parse as httpx's
    protocol error rather than a raw aiohttp one: aiohttp bounds what it accepts (8,190 bytes
    a header line or field, 128 headers); and a connection never made as httpx's ConnectError
    (a payment it would have carried never left). Uncompressed answers are read in bigger
    pieces (``PLAIN_PIECE_BYTES``)."""

    def get_client(self) -> aiohttp.ClientSession:
        """httpx-aiohttp's session and pool, reading ahead ``READ_AHEAD_BYTES``, without cookies
        (as the httpx client above it)."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or GATEWAY_CONNECTIONS,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(
            connector=connector, read_bufsize=READ_AHEAD_BYTES, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except aiohttp.ClientResponseError as error:
            raise httpx.RemoteProtocolError(error.message, request=request) from None
        except httpx.ConnectTimeout as error:  # httpx-aiohttp's name for any connection error
            cause = error.__cause__
            if isinstance(cause, aiohttp.ClientConnectorError):  # no connection: nothing sent
                raise httpx.ConnectError(str(error), request=request) from cause
            raise
        stream = response.stream
        if isinstance(stream, AiohttpResponseStream) and "content-encoding" not in response.headers:
            stream.CHUNK_SIZE = PLAIN_PIECE_BYTES
        return response


def pool_limits(connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections)


class _Unbinding(httpx.AsyncByteStream):
    """Wraps a response's stream and lets go of it (and so of the response) once closed."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream: httpx.AsyncByteStream | None = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        assert self._stream is not None
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()


async def _free_when_closed(response: httpx.Response) -> None:
    """httpx binds each response's stream back to the response: a reference cycle that keeps the
    body (multi-MB data URIs) and the request (uploaded photos) alive until the next garbage
    collection. Dropping the stream once it is closed lets them go as soon as they are unused."""
    assert isinstance(response.stream, httpx.AsyncByteStream)
    response.stream = _Unbinding(response.stream)


FREE_WHEN_CLOSED = {"response": [_free_when_closed]}
