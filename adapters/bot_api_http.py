"""python-telegram-bot's HTTP client on aiohttp alone, with a deadline and a size cap per call.

PTB's own ``HTTPXRequest`` builds an httpx request for every Bot API call (URL parsing, header
models, a multipart stream), which our aiohttp transport then builds again for aiohttp: most of
the cost of a Bot API call in the bot's process (bench/README.md, issue 19).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData

# The biggest answer is a file download, at most 20 MB (getFile's limit); the rest are JSON.
MAX_ANSWER_BYTES = 21 * 1024 * 1024
_CHUNK_BYTES = 256 * 1024
# Forms with files up to this size are sent from one buffer (``_body``).
ONE_BUFFER_BYTES = 256 * 1024
# PTB's own defaults (HTTPXRequest's): to read, write or connect, and to get a pooled connection.
_STEP_SECONDS = 5.0
_POOL_SECONDS = 1.0
# What the bot reads of a message it sent (a status to edit or delete later): Telegram's answer
# repeats the whole message, the quoted command, the photo sizes and the keyboard included, and
# PTB building all of that into objects took ~0.1 ms more per status and photo (bench/README.md).
SENT_MESSAGE_FIELDS = frozenset(
    [
        "message_id",
        "date",
        "chat",
        "message_thread_id",
        "is_topic_message",
        "business_connection_id",
    ]
)


class BotApiRequest(BaseRequest):
    """Bot API calls over one aiohttp pool of ``connections``.

    PTB's four timeouts apply per call (its defaults: 5 s each, 1 s to get a pooled connection,
    ``media_write_timeout`` to send files); their sum is the call's total deadline, since aiohttp
    has no write timeout of its own. Telegram sets no cookies, so the pool keeps none. Every
    call goes through ``proxy`` when given (an HTTP proxy's URL, credentials included).
    """

    __slots__ = ("_connections", "_media_write", "_proxy", "_session")

    def __init__(
        self, connections: int, *, media_write_timeout: float = 20.0, proxy: str | None = None
    ) -> None:
        self._connections = connections
        self._media_write = media_write_timeout
        self._proxy = proxy
        self._session: aiohttp.ClientSession | None = None

    @property
    def read_timeout(self) -> float:
        return _STEP_SECONDS

    async def initialize(self) -> None:
        """Nothing yet: the pool opens with the first call (a request PTB never uses, such as
        getUpdates' under a webhook or after a refused token, leaves nothing to close)."""

    async def shutdown(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._connections)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: object = BaseRequest.DEFAULT_NONE,
        write_timeout: object = BaseRequest.DEFAULT_NONE,
        connect_timeout: object = BaseRequest.DEFAULT_NONE,
        pool_timeout: object = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        files = request_data is not None and request_data.contains_files
        read = _seconds(read_timeout, self.read_timeout)
        write = _seconds(write_timeout, self._media_write if files else _STEP_SECONDS)
        connect = _seconds(connect_timeout, _STEP_SECONDS)
        pool = _seconds(pool_timeout, _POOL_SECONDS)
        parts = (read, write, connect, pool)
        total = None if None in parts else sum(part for part in parts if part is not None)
        timeout = aiohttp.ClientTimeout(
            total=total,
            connect=None if pool is None or connect is None else pool + connect,
            sock_connect=connect,
            sock_read=read,
        )
        data, headers = await _body(request_data)
        try:
            async with self._pool().request(
                method,
                url,
                data=data,
                headers={"User-Agent": self.USER_AGENT, **headers},
                timeout=timeout,
                proxy=self._proxy,
            ) as response:
                return response.status, await _read_capped(response)
        except TimeoutError as error:
            raise TimedOut() from error
        except aiohttp.ClientError as error:  # its text may carry the URL, and so the token
            raise NetworkError(f"aiohttp.{type(error).__name__}") from None

    @staticmethod
    def parse_json_payload(payload: bytes) -> dict[str, Any]:
        """PTB's parse, keeping of a sent message (one answer's ``result``) only its
        ``SENT_MESSAGE_FIELDS``; updates come as a list and are kept whole."""
        answer = BaseRequest.parse_json_payload(payload)
        result = answer.get("result") if isinstance(answer, dict) else None
        if isinstance(result, dict) and "message_id" in result:
            answer["result"] = {key: result[key] for key in SENT_MESSAGE_FIELDS & result.keys()}
        return answer


def _seconds(given: object, default: float) -> float | None:
    """A PTB timeout argument: its default when not given, None for no limit."""
    if given is BaseRequest.DEFAULT_NONE:
        return default
    return None if given is None else float(given)  # type: ignore[arg-type]


async def _body(
    request_data: RequestData | None,
) -> tuple[aiohttp.payload.Payload | bytes | None, dict[str, str]]:
    """The parameters and the headers that go with them: JSON without files (as the Bot API
    takes it; PTB's form of JSON-encoded strings cost 0.07 ms more per call, bench/README.md).

    With files it is a multipart form, as PTB sends it. aiohttp writes one part at a time, four
    socket writes per field, so a form with small files is encoded into one buffer first (a fifth
    less CPU per photo of 26 KB, bench/README.md); bigger files are not copied for it.
    """
    if request_data is None:
        return None, {}
    if not request_data.contains_files:
        return json.dumps(request_data.parameters).encode(), {"Content-Type": "application/json"}
    form = aiohttp.FormData(request_data.json_parameters)
    files = request_data.multipart_data.items()
    for name, (filename, content, mime) in files:
        form.add_field(name, content, filename=filename, content_type=mime)
    multipart = form()
    if sum(len(content) for _, (_, content, _) in files) > ONE_BUFFER_BYTES:
        return multipart, {}
    return await multipart.as_bytes(), {"Content-Type": multipart.content_type}


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    if (response.content_length or 0) > MAX_ANSWER_BYTES:
        raise NetworkError("Bot API answer over the size cap")
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise NetworkError("Bot API answer over the size cap")
        chunks.append(chunk)
    return b"".join(chunks)
