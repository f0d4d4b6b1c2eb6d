"""A fake Discord (REST, gateway and CDN) on loopback, so the real discord.py runs in tests offline.

Point discord.py at it with ``discord.http.Route.BASE = fake.api_url`` (interaction webhooks use
the same class) and send its gateway connections to ``fake.gateway_url``, the address
``GET /gateway/bot`` answers (discord.py's ``Client`` does not ask it: see
``tests/test_fake_discord.py``, ``follow_gateway``).

REST answers in Discord's JSON shape (``{"message", "code"}``, form errors with ``errors``), with
``X-RateLimit-*`` headers and ``Via`` on every answer (discord.py retries a 429 only with ``Via``).
Requests are JSON or multipart (``payload_json`` + ``files[n]``). Routes: gateway/bot, users/@me,
oauth2/applications/@me, command bulk overwrite (global and guild), channel messages (create, get,
edit, delete, typing, reactions), DMs, interaction callbacks and the interaction webhooks
(``@original`` and followups). Messages carry components as Discord has them without the
IS_COMPONENTS_V2 flag: action rows of buttons, each numbered with an ``id``. A button press is an
interaction of type 3; its callback may also be 6 (DEFERRED_UPDATE_MESSAGE) or 7 (UPDATE_MESSAGE),
which make the pressed message the interaction's ``@original``. The gateway speaks JSON,
zlib-stream (or zstd-stream when a zstd module is importable): HELLO, IDENTIFY, READY,
GUILD_CREATE, heartbeats, RESUME, RECONNECT and INVALID_SESSION, with sequence numbers and events
buffered for a session while it is away.
Sessions may be shards (IDENTIFY's ``shard``, ``[id, count]``): a guild's events go only to the
shard ``(guild_id >> 22) % count``, DMs' to shard 0; ``GET /gateway/bot`` recommends
``recommended_shards``. Attachments live on a CDN route with signed, expiring URLs.

=========================================  ========================================================
limit                                      answer
=========================================  ========================================================
content over 2000 characters               400 50035 ``BASE_TYPE_MAX_LENGTH`` on ``content``
no content, file, embed, sticker or poll   400 50006 ``Cannot send an empty message``
more than 10 files                         400 50035 ``BASE_TYPE_MAX_LENGTH`` on ``attachments``
a file over 10 MiB, or a body over 25 MiB  413 40005 ``Request entity too large``
more than 25 autocomplete choices          400 50035 ``BASE_TYPE_MAX_LENGTH`` on ``data.choices``
more than 5 action rows                    400 50035 ``BASE_TYPE_MAX_LENGTH`` on ``components``
an action row without 1 to 5 buttons       400 50035 ``BASE_TYPE_BAD_LENGTH`` on ``….components``
a button label over 80 characters          400 50035 ``BASE_TYPE_MAX_LENGTH`` on ``….label``
a button with no label and no emoji        400 50035 ``BASE_TYPE_REQUIRED`` on ``….label``
a button without custom_id (not a link)    400 50035 ``BUTTON_COMPONENT_CUSTOM_ID_REQUIRED``
a custom_id not 1 to 100 characters long   400 50035 ``BASE_TYPE_BAD_LENGTH`` on ``….custom_id``
a custom_id twice in one message           400 50035 ``COMPONENT_CUSTOM_ID_DUPLICATED``
a link button (style 5) with a custom_id   400 50035 ``…_CUSTOM_ID_URL_MUTUALLY_EXCLUSIVE``
select menus, premium buttons              400 0, the fake does not model them
callback later than 3 s after creation     404 10062 ``Unknown interaction`` (``ack_window``)
callback on an acknowledged interaction    400 40060 ``Interaction has already been acknowledged.``
webhook token older than 15 minutes        401 50027 ``Invalid Webhook Token`` (``token_ttl``)
webhook of an unacknowledged interaction   404 10015 ``Unknown Webhook``
privileged intent not enabled              gateway close 4014 ``Disallowed intent(s).``
=========================================  ========================================================

Without the MESSAGE_CONTENT intent a session gets guild messages with empty ``content``,
``attachments``, ``embeds`` and ``components`` unless they mention the bot or are its own.
Tests play the users (``user``, ``guild``, ``dm``, ``send_message``, ``delete_message``,
``slash_command``, ``autocomplete``, ``press``, ``dispatch``), watch the bot (``sent``,
``wait_for``, ``calls``, ``command_syncs``, ``messages_in``, ``interactions``, ``received``,
``wait_ready``, ``delivered``) and inject faults (``flood``, ``fail``, ``request_reconnect``,
``invalidate_session``). Time is read from ``clock`` (a ``time.monotonic`` stand-in a test may
replace to expire interactions without sleeping).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import itertools
import json
import math
import mimetypes
import re
import secrets
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, NamedTuple, TypeVar

from aiohttp import WSMsgType, hdrs, web
from local import form_parts, media_type
from PIL import Image

try:  # discord.py asks for zstd-stream whenever one of these imports
    import zstandard as _zstandard  # type: ignore[import-not-found]
except ImportError:
    _zstandard = None
try:
    from compression import zstd as _stdlib_zstd  # type: ignore[import-not-found]
except ImportError:
    _stdlib_zstd = None

DISCORD_EPOCH_MS = 1_420_070_400_000
API_VERSION = 10
DEFAULT_APPLICATION_ID = 1_234_567_890_123_456_789
DEFAULT_BOT_NAME = "ImageTestBot"

INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT
VALID_INTENTS = 0b11_0011_0001_1111_1111_1111_1111  # every documented intent bit
# Application flags for an unverified bot whose privileged intents are switched on.
_LIMITED_INTENT_FLAGS = {
    INTENT_GUILD_PRESENCES: 1 << 13,
    INTENT_GUILD_MEMBERS: 1 << 15,
    INTENT_MESSAGE_CONTENT: 1 << 19,
}

MESSAGE_MAX_CHARS = 2000
ATTACHMENTS_MAX = 10
UPLOAD_MAX_BYTES = 10 * 2**20  # per file, for bots in unboosted guilds and DMs
REQUEST_MAX_BYTES = 25 * 2**20
AUTOCOMPLETE_MAX_CHOICES = 25
ACK_WINDOW = 3.0
TOKEN_TTL = 15 * 60.0
ATTACHMENT_URL_TTL = 24 * 3600.0
HEARTBEAT_INTERVAL_MS = 41_250

FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
CALLBACK_MESSAGE = 4
CALLBACK_DEFERRED = 5
CALLBACK_DEFERRED_UPDATE = 6
CALLBACK_UPDATE = 7
CALLBACK_AUTOCOMPLETE = 8
CALLBACK_MODAL = 9
INTERACTION_COMMAND = 2
INTERACTION_COMPONENT = 3
INTERACTION_AUTOCOMPLETE = 4
# The callback types Discord takes for each interaction type (6 and 7 only for components).
CALLBACKS_FOR = {
    INTERACTION_COMMAND: (CALLBACK_MESSAGE, CALLBACK_DEFERRED, CALLBACK_MODAL),
    INTERACTION_COMPONENT: (
        CALLBACK_MESSAGE,
        CALLBACK_DEFERRED,
        CALLBACK_DEFERRED_UPDATE,
        CALLBACK_UPDATE,
        CALLBACK_MODAL,
    ),
    INTERACTION_AUTOCOMPLETE: (CALLBACK_AUTOCOMPLETE,),
}

COMPONENT_ACTION_ROW = 1
COMPONENT_BUTTON = 2
BUTTON_STYLES = (1, 2, 3, 4, 5)  # primary, secondary, success, danger, link
BUTTON_LINK = 5
ACTION_ROWS_MAX = 5  # in a message without the IS_COMPONENTS_V2 flag
ROW_BUTTONS_MAX = 5
BUTTON_LABEL_MAX = 80
CUSTOM_ID_MAX = 100

# ADD_REACTIONS, VIEW_CHANNEL, SEND_MESSAGES, EMBED_LINKS, ATTACH_FILES, READ_MESSAGE_HISTORY,
# USE_EXTERNAL_EMOJIS, USE_APPLICATION_COMMANDS, SEND_MESSAGES_IN_THREADS
DEFAULT_PERMISSIONS = sum(1 << bit for bit in (6, 10, 11, 14, 15, 16, 18, 31, 38))
OPTION_USER = 6
OPTION_ATTACHMENT = 11

_COMMAND_NAME = re.compile(r"[-_'\w]{1,32}")
_MENTION = re.compile(r"<@!?(\d+)>")
_FILE_FIELD = re.compile(r"files?\[(\d+)\]|file(\d*)")
_SNOWFLAKE = re.compile(r"\d{1,20}")
_NO_LONGER_AVAILABLE = "This content is no longer available."
_RATE_LIMITED = "You are being rate limited."
_T = TypeVar("_T")


@dataclass(frozen=True)
class User:
    """A Discord user; the bot itself is one with ``bot=True``."""

    id: int
    username: str
    global_name: str | None = None
    bot: bool = False

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_json(self) -> dict[str, Any]:
        user: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "avatar": None,
            "discriminator": "0",
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "global_name": self.global_name,
            "avatar_decoration_data": None,
            "collectibles": None,
            "banner_color": None,
            "clan": None,
            "primary_guild": None,
        }
        if self.bot:
            user["bot"] = True
        return user


@dataclass(frozen=True)
class Channel:
    """A guild text channel, or the DM channel between the bot and ``recipient``."""

    id: int
    name: str | None
    guild_id: int | None = None
    recipient: User | None = None
    position: int = 0

    @property
    def is_dm(self) -> bool:
        return self.recipient is not None

    def to_json(self, *, with_guild: bool = True) -> dict[str, Any]:
        if self.recipient is not None:
            return {
                "id": str(self.id),
                "type": 1,
                "last_message_id": None,
                "flags": 0,
                "recipients": [self.recipient.to_json()],
            }
        channel: dict[str, Any] = {
            "id": str(self.id),
            "type": 0,
            "name": self.name,
            "position": self.position,
            "parent_id": None,
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }
        if with_guild:
            channel["guild_id"] = str(self.guild_id)
        return channel


@dataclass
class Guild:
    """A guild the bot is in, with its text channels and known members (the bot first)."""

    id: int
    name: str
    owner_id: int
    channels: list[Channel]
    members: dict[int, User]
    joined_at: str

    def channel(self, name: str) -> Channel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(f"guild {self.name!r} has no channel {name!r}")


@dataclass(frozen=True)
class File:
    """A file a user sends: a message attachment or a command's attachment option.

    ``size_override`` is the size Discord reports, to fake a big file cheaply.
    """

    filename: str
    data: bytes
    content_type: str | None = None
    size_override: int | None = None


@dataclass(frozen=True)
class Upload:
    """One file part of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Call:
    """One REST request of the bot and how the fake answered it."""

    name: str  # the route's name, e.g. "create_message"
    method: str
    path: str  # after the API base, e.g. "/channels/1/messages"
    params: dict[str, Any]  # path parameters (snowflakes as int) and the query
    payload: Any  # the JSON body or payload_json
    files: list[Upload]
    at: float  # fake.clock() when the request arrived
    status: int
    result: Any = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def code(self) -> int | None:
        return None if self.error is None else self.error.get("code")

    @property
    def channel_id(self) -> int | None:
        return self.params.get("channel_id")

    @property
    def interaction_id(self) -> int | None:
        return self.params.get("interaction_id")


@dataclass
class Interaction:
    """An INTERACTION_CREATE the fake sent (a command, autocomplete or button press), and how the
    bot answered it: when (``acked_at``) and with which callback type (``response_type``)."""

    id: int
    token: str
    type: int
    payload: dict[str, Any]
    channel: Channel
    created_at: float  # fake.clock()
    acked_at: float | None = None
    response_type: int | None = None
    response: dict[str, Any] | None = None  # the callback's "data"
    # The @original message as it stands; after a callback 6 or 7, the pressed message.
    original: dict[str, Any] | None = None
    followups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ack_delay(self) -> float | None:
        """Seconds from creation to the accepted callback; None until acknowledged."""
        return None if self.acked_at is None else self.acked_at - self.created_at

    @property
    def choices(self) -> list[dict[str, Any]] | None:
        """The autocomplete choices the bot answered, if it answered with choices."""
        if self.response_type != CALLBACK_AUTOCOMPLETE or self.response is None:
            return None
        return self.response.get("choices", [])


@dataclass
class GatewaySession:
    """A gateway session: its intents and every event dispatched to it."""

    id: str
    intents: int
    shard: list[int] | None
    connection: GatewayConnection | None
    events: list[dict[str, Any]] = field(default_factory=list)
    resumes: int = 0
    ended: bool = False  # closed by the client with 1000/1001, or invalidated

    @property
    def seq(self) -> int:
        return len(self.events)


@dataclass
class GatewayConnection:
    """One websocket connection to the gateway."""

    path: str
    query: dict[str, str]
    compression: str | None
    session: GatewaySession | None = None
    close_code: int | None = None  # how it closed, by either side
    closed_by_server: bool = False
    _socket: web.WebSocketResponse | None = field(default=None, repr=False)
    _outbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue, repr=False)

    def send(self, frame: dict[str, Any]) -> None:
        self._outbox.put_nowait(("frame", frame))

    def close(self, code: int, reason: str) -> None:
        self._outbox.put_nowait(("close", (code, reason)))


@dataclass(frozen=True)
class GatewayFrame:
    """A payload the bot sent over the gateway."""

    op: int
    data: Any
    at: float
    connection: GatewayConnection


class _DiscordError(Exception):
    """An error answer in Discord's JSON shape."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        errors: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body: dict[str, Any] = body or {"message": message, "code": code}
        if errors:
            self.body["errors"] = errors


class _Request(NamedTuple):
    params: dict[str, Any]
    query: Mapping[str, str]
    payload: Any
    files: list[Upload]


class _StoredFile(NamedTuple):
    data: bytes
    content_type: str


_Handler = Callable[[_Request], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    name: str
    handler: _Handler
    auth: bool
    pattern: re.Pattern[str]
    bucket: str


def _form_error(path: str, code: str, message: str) -> _DiscordError:
    """400 50035 Invalid Form Body with the error nested under a dotted ``path`` ("" = body)."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for key in reversed(path.split(".") if path else []):
        errors = {key: errors}
    return _DiscordError(400, 50035, "Invalid Form Body", errors)


def _unknown(what: str, code: int) -> _DiscordError:
    return _DiscordError(404, code, f"Unknown {what}")


_TOO_LARGE = (413, 40005, "Request entity too large")
_MALFORMED = (400, 50035, "Invalid Form Body")


class FakeDiscord:
    """Discord's REST API, gateway and CDN on loopback; records every call and plays the users."""

    def __init__(
        self,
        *,
        application_id: int = DEFAULT_APPLICATION_ID,
        bot_name: str = DEFAULT_BOT_NAME,
        token: str | None = None,
        privileged_intents: int = INTENT_MESSAGE_CONTENT,
        ack_window: float = ACK_WINDOW,
        token_ttl: float = TOKEN_TTL,
        heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
        rate_limit: tuple[int, float] = (50, 1.0),
        upload_max_bytes: int = UPLOAD_MAX_BYTES,
        recommended_shards: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.application_id = application_id
        self._serial = itertools.count()
        self.bot = User(application_id, bot_name, bot=True)
        encoded_id = base64.b64encode(str(application_id).encode()).decode().rstrip("=")
        self.token = token or f"{encoded_id}.GfAkEd.{secrets.token_urlsafe(28)}"
        self.privileged_intents = privileged_intents  # switched on in the developer portal
        self.ack_window = ack_window
        self.token_ttl = token_ttl
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.rate_limit = rate_limit  # (requests, seconds) per bucket; Discord's messages: (5, 5)
        self.upload_max_bytes = upload_max_bytes
        self.recommended_shards = recommended_shards  # GET /gateway/bot's "shards"
        self.clock = clock
        self.url = ""  # the server root, once started
        self.api_url = ""  # for discord.http.Route.BASE
        self.gateway_url = ""  # what GET /gateway/bot answers
        self.resume_gateway_url = ""  # what READY gives for resuming
        self.cdn_url = ""
        self.media_url = ""
        self.sent: list[Call] = []
        self.received: list[GatewayFrame] = []
        self.connections: list[GatewayConnection] = []
        self.sessions: list[GatewaySession] = []
        self.interactions: list[Interaction] = []
        self.guilds: list[Guild] = []
        self._users: dict[int, User] = {self.bot.id: self.bot}
        self._owner = self.user("app_owner")
        self._dms: dict[int, Channel] = {}  # user id -> DM channel
        self._channels: dict[int, Channel] = {}
        self._messages: dict[int, dict[int, dict[str, Any]]] = {}  # channel -> id -> message
        self._files: dict[str, _StoredFile] = {}  # CDN path -> file
        self._global_commands: list[dict[str, Any]] = []
        self._guild_commands: dict[int, list[dict[str, Any]]] = {}
        self._faults: dict[str, deque[Callable[[], _DiscordError]]] = {}
        self._buckets: dict[tuple[str, str], list[float]] = {}  # -> [window start, count]
        self._cdn_secret = secrets.token_bytes(16)
        self._session_starts = 1000
        self._changed = asyncio.Event()
        self._writers: set[asyncio.Task[None]] = set()
        self._routes = self._route_table()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=REQUEST_MAX_BYTES + 2**20)
        self.app.add_routes(
            [
                web.route("*", "/api/v{version}/{path:.*}", self._api),
                web.get("/gateway", self._gateway),
                web.get("/gateway-resume", self._gateway),
                web.get("/cdn/{path:.+}", self._cdn),
                web.get("/media/{path:.+}", self._cdn),
            ]
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 = any free port) and set the URLs to give discord.py."""
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.serve_as(f"http://{host}:{self._runner.addresses[0][1]}")

    def serve_as(self, root: str) -> None:
        """Give discord.py addresses under ``root`` (``http://`` or ``https://`` host and port):
        the server's own at start, or a TLS front's that only a proxy can reach."""
        self.url = root
        self.api_url = f"{root}/api/v{API_VERSION}"
        self.gateway_url = f"{root.replace('http', 'ws', 1)}/gateway"
        self.resume_gateway_url = self.gateway_url + "-resume"
        self.cdn_url = f"{root}/cdn"
        self.media_url = f"{root}/media"

    async def close(self) -> None:
        for connection in self.connections:
            if connection.close_code is None:
                connection.close(1001, "Discord is restarting.")
        if self._writers:
            await asyncio.wait(self._writers, timeout=1.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Users, guilds and channels

    def user(self, username: str, global_name: str | None = None) -> User:
        """A new user, who may write in any guild of the fake or to the bot directly."""
        user = User(self._snowflake(), username, global_name)
        self._users[user.id] = user
        return user

    def guild(
        self,
        name: str,
        channels: Sequence[str] = ("general",),
        *,
        shard: tuple[int, int] | None = None,
    ) -> Guild:
        """A guild with these text channels, which the bot has joined (GUILD_CREATE if live).

        ``shard`` (id, count) picks an id whose events go to that shard.
        """
        guild_id = self._snowflake()
        if shard is not None:  # a few milliseconds later, so (guild_id >> 22) % count == id
            shard_id, count = shard
            guild_id += ((shard_id - (guild_id >> 22)) % count) << 22
        owner = self.user(f"{name.lower().replace(' ', '')}_owner")
        guild = Guild(
            guild_id,
            name,
            owner.id,
            [
                Channel(self._snowflake(), channel, guild_id, position=index)
                for index, channel in enumerate(channels)
            ],
            {self.bot.id: self.bot, owner.id: owner},
            _timestamp(),
        )
        self.guilds.append(guild)
        for channel in guild.channels:
            self._channels[channel.id] = channel
            self._messages[channel.id] = {}
        for session in self._sessions_for(guild.id):
            self._send_event(session, "GUILD_CREATE", self._guild_create(guild))
        return guild

    def dm(self, user: User) -> Channel:
        """The DM channel between ``user`` and the bot."""
        channel = self._dms.get(user.id)
        if channel is None:
            channel = Channel(self._snowflake(), None, recipient=user)
            self._dms[user.id] = channel
            self._channels[channel.id] = channel
            self._messages[channel.id] = {}
        return channel

    def guild_of(self, channel: Channel) -> Guild | None:
        return next((guild for guild in self.guilds if guild.id == channel.guild_id), None)

    # Playing the users

    def send_message(
        self,
        channel: Channel,
        author: User,
        content: str = "",
        *,
        files: Sequence[File] = (),
        reply_to: int | None = None,
        include_referenced: bool = True,
        mention_author: bool = True,
    ) -> dict[str, Any]:
        """Post ``author``'s message and dispatch MESSAGE_CREATE; returns the full message.

        ``reply_to`` is a message id in the channel; the event carries the replied-to message
        as ``referenced_message`` unless ``include_referenced`` is False, as when Discord left
        it out. A reply pings its target's author unless ``mention_author`` is False. With no
        live session the message only joins the channel's history, as on Discord.
        """
        self._check_channel(channel)
        guild = self.guild_of(channel)
        if guild is not None:
            guild.members.setdefault(author.id, author)
        attachments = [self._user_attachment(channel.id, file) for file in files]
        target = None
        if reply_to is not None:
            target = self._messages[channel.id].get(reply_to)
            if target is None:
                raise ValueError(f"no message {reply_to} in channel {channel.id} to reply to")
        message = self._new_message(channel, author, content, attachments, target)
        if target is not None:
            if mention_author and target["author"]["id"] not in _ids(message["mentions"]):
                message["mentions"].append(target["author"])
            if not include_referenced:
                del message["referenced_message"]
        self._messages[channel.id][int(message["id"])] = message
        self._dispatch_message("MESSAGE_CREATE", channel, message)
        return message

    def delete_message(self, message: dict[str, Any]) -> None:
        """Its author (or a moderator) deletes ``message``: it leaves the channel, fetching it
        answers 404 10008, and MESSAGE_DELETE is dispatched."""
        channel = self._channels[int(message["channel_id"])]
        if self._messages[channel.id].pop(int(message["id"]), None) is None:
            raise ValueError(f"no message {message['id']} in channel {channel.id} to delete")
        self._dispatch_delete(channel, message)

    def slash_command(
        self,
        channel: Channel,
        user: User,
        name: str,
        options: Mapping[str, Any] | Sequence[dict[str, Any]] | None = None,
        *,
        locale: str = "en-US",
    ) -> Interaction:
        """``user`` runs the synced chat command ``name``: dispatch INTERACTION_CREATE type 2.

        ``options`` maps option names to values (str, int, float, bool, ``File`` for an
        attachment option, ``User`` for a user option), typed as the synced command declares;
        a list is sent as the raw ``data.options``.
        """
        return self._command_interaction(
            INTERACTION_COMMAND, channel, user, name, options or {}, None, locale
        )

    def autocomplete(
        self,
        channel: Channel,
        user: User,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        locale: str = "en-US",
    ) -> Interaction:
        """``user`` types into option ``focused`` of command ``name``: INTERACTION_CREATE type 4."""
        return self._command_interaction(
            INTERACTION_AUTOCOMPLETE, channel, user, name, options, focused, locale
        )

    def press(
        self, message: dict[str, Any], user: User, custom_id: str, *, locale: str = "en-US"
    ) -> Interaction:
        """``user`` presses button ``custom_id`` on ``message``: INTERACTION_CREATE type 3.

        The event carries the message as it stands now and goes to the shard of its guild (DMs:
        shard 0). Any ``custom_id`` goes, even one the message does not show, as from a forged
        client.
        """
        channel = self._channels.get(int(message["channel_id"]))
        current = None if channel is None else self._message_at(channel, int(message["id"]))
        if channel is None or current is None:
            raise ValueError(f"no message {message['id']} to press a button on (deleted?)")
        self._require_sessions("INTERACTION_CREATE", self.guild_of(channel))
        data = {"custom_id": custom_id, "component_type": COMPONENT_BUTTON}
        return self._interact(
            self._snowflake(), INTERACTION_COMPONENT, channel, user, data, locale, message=current
        )

    def dispatch(self, event: str, data: dict[str, Any]) -> int:
        """Send any event to every live session on the shard of its ``guild_id`` (or shard 0
        without one); returns how many got it."""
        sessions = self._sessions_for(_snowflake_or_none(data.get("guild_id")))
        for session in sessions:
            self._send_event(session, event, data)
        return len(sessions)

    # Watching the bot

    async def wait_for(
        self,
        predicate: str | Callable[[Call], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 (a deadline for the call to arrive, as tests read it)
        *,
        since: int = 0,
    ) -> Call:
        """The first call from ``sent[since:]`` that matches (a route name or a predicate).

        Waits for it to arrive; raises TimeoutError after ``timeout`` seconds.
        """
        matches = _name_is(predicate) if isinstance(predicate, str) else predicate

        def found() -> Call | None:
            return next((call for call in self.sent[since:] if matches(call)), None)

        def describe() -> str:
            return f"no matching call; the last ones: {[c.name for c in self.sent[-10:]]}"

        return await self._wait_until(found, timeout, describe)

    async def wait_received(
        self,
        op: int,
        timeout: float = 10.0,  # noqa: ASYNC109
        *,
        since: int = 0,
    ) -> GatewayFrame:
        """The first gateway payload with opcode ``op`` from ``received[since:]``."""

        def found() -> GatewayFrame | None:
            return next((frame for frame in self.received[since:] if frame.op == op), None)

        return await self._wait_until(found, timeout, lambda: f"no gateway op {op} received")

    async def wait_ready(
        self,
        timeout: float = 10.0,  # noqa: ASYNC109
        *,
        shard: Sequence[int] | None = None,
    ) -> GatewaySession:
        """The newest session that has been sent READY and is connected (as ``shard`` [id, count],
        if given)."""

        def found() -> GatewaySession | None:
            return next(
                (
                    s
                    for s in reversed(self.sessions)
                    if s.connection and not s.ended and (shard is None or s.shard == list(shard))
                ),
                None,
            )

        return await self._wait_until(found, timeout, lambda: "no gateway session became ready")

    async def wait_closed(
        self,
        connection: GatewayConnection,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> int:
        """The close code of ``connection`` once it has closed."""
        return await self._wait_until(
            lambda: connection.close_code, timeout, lambda: "the connection stayed open"
        )

    def calls(self, name: str) -> list[Call]:
        """The bot's calls of route ``name``, in order."""
        return [call for call in self.sent if call.name == name]

    @property
    def command_syncs(self) -> int:
        """How many times the bot overwrote its application commands (global or a guild's)."""
        overwrites = ("bulk_overwrite_global_commands", "bulk_overwrite_guild_commands")
        return sum(1 for call in self.sent if call.name in overwrites and call.ok)

    def delivered(self, event: str) -> list[tuple[list[int] | None, dict[str, Any]]]:
        """``(shard, data)`` for every ``event`` sent to a session: which shard got what."""
        return [
            (session.shard, frame["d"])
            for session in self.sessions
            for frame in session.events
            if frame["t"] == event
        ]

    def messages_in(self, channel: Channel | int) -> list[dict[str, Any]]:
        """The channel's messages as they stand (edits applied, deletions gone), oldest first."""
        return list(self._messages[channel if isinstance(channel, int) else channel.id].values())

    def interaction(self, interaction_id: int) -> Interaction:
        return next(i for i in self.interactions if i.id == interaction_id)

    @property
    def typing(self) -> list[int]:
        """Channel ids of every accepted typing request, in order."""
        return [call.params["channel_id"] for call in self.calls("trigger_typing") if call.ok]

    @property
    def commands(self) -> list[dict[str, Any]]:
        """The global application commands as last overwritten."""
        return list(self._global_commands)

    def commands_for(self, guild: Guild) -> list[dict[str, Any]]:
        return list(self._guild_commands.get(guild.id, []))

    def file_at(self, url: str) -> bytes:
        """The bytes behind an attachment URL of the fake (signature not checked)."""
        path = url.split("?", 1)[0]
        for base in (self.cdn_url, self.media_url):
            if path.startswith(base + "/"):
                return self._files[path.removeprefix(base + "/")].data
        raise KeyError(url)

    # Faults

    def flood(
        self, name: str, times: int = 1, retry_after: float = 1.0, *, is_global: bool = False
    ) -> None:
        """Answer the next ``times`` calls of route ``name`` 429 with ``retry_after`` seconds."""
        bucket = self._route_named(name).bucket

        def rate_limited() -> _DiscordError:
            headers = {
                "Retry-After": str(math.ceil(retry_after)),
                "X-RateLimit-Scope": "global" if is_global else "user",
            }
            if is_global:
                headers["X-RateLimit-Global"] = "true"
            else:
                headers |= {
                    "X-RateLimit-Limit": str(self.rate_limit[0]),
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                    "X-RateLimit-Bucket": bucket,
                }
            body = {"message": _RATE_LIMITED, "retry_after": retry_after, "global": is_global}
            return _DiscordError(429, 0, _RATE_LIMITED, headers=headers, body=body)

        self._faults.setdefault(name, deque()).extend([rate_limited] * times)

    def fail(self, name: str, status: int, code: int, message: str, times: int = 1) -> None:
        """Answer the next ``times`` calls of route ``name`` with this error."""
        self._route_named(name)
        self._faults.setdefault(name, deque()).extend(
            [lambda: _DiscordError(status, code, message)] * times
        )

    def request_reconnect(self) -> None:
        """Send op 7 RECONNECT on every open connection: the client should RESUME."""
        for session in self._live_sessions():
            if session.connection is not None:
                session.connection.send({"op": 7, "d": None, "s": None, "t": None})

    def invalidate_session(self, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION on every open connection."""
        for session in self._live_sessions():
            if not resumable:
                session.ended = True
            if session.connection is not None:
                session.connection.send({"op": 9, "d": resumable, "s": None, "t": None})

    # Waiting

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(
        self,
        found: Callable[[], _T | None],
        timeout: float,  # noqa: ASYNC109
        describe: Callable[[], str],
    ) -> _T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = found()
            if result is not None:
                return result
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), deadline - loop.time())
            except TimeoutError:
                raise TimeoutError(f"{describe()} in {timeout}s") from None

    # REST

    def _route_table(self) -> list[_Route]:
        table: list[tuple[str, str, str, _Handler, bool]] = [
            ("GET", "/gateway", "get_gateway", self._get_gateway, False),
            ("GET", "/gateway/bot", "get_gateway_bot", self._get_gateway_bot, True),
            ("GET", "/users/@me", "get_current_user", self._get_current_user, True),
            ("POST", "/users/@me/channels", "create_dm", self._create_dm, True),
            ("GET", "/oauth2/applications/@me", "get_current_application", self._get_app, True),
            ("GET", "/applications/@me", "get_current_application", self._get_app, True),
            ("GET", "/applications/{application_id}/commands", "get_global_commands",
             self._get_commands, True),
            ("PUT", "/applications/{application_id}/commands", "bulk_overwrite_global_commands",
             self._put_commands, True),
            ("GET", "/applications/{application_id}/guilds/{guild_id}/commands",
             "get_guild_commands", self._get_commands, True),
            ("PUT", "/applications/{application_id}/guilds/{guild_id}/commands",
             "bulk_overwrite_guild_commands", self._put_commands, True),
            ("GET", "/channels/{channel_id}", "get_channel", self._get_channel, True),
            ("POST", "/channels/{channel_id}/messages", "create_message",
             self._create_message, True),
            ("GET", "/channels/{channel_id}/messages/{message_id}", "get_message",
             self._get_message, True),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", "edit_message",
             self._edit_message, True),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", "delete_message",
             self._delete_message, True),
            ("POST", "/channels/{channel_id}/typing", "trigger_typing", self._typing, True),
            ("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
             "add_reaction", self._add_reaction, True),
            ("POST", "/interactions/{interaction_id}/{token}/callback",
             "create_interaction_response", self._callback, False),
            ("GET", "/webhooks/{application_id}/{token}/messages/@original",
             "get_original_response", self._get_original, False),
            ("PATCH", "/webhooks/{application_id}/{token}/messages/@original",
             "edit_original_response", self._edit_original, False),
            ("DELETE", "/webhooks/{application_id}/{token}/messages/@original",
             "delete_original_response", self._delete_original, False),
            ("POST", "/webhooks/{application_id}/{token}", "create_followup",
             self._create_followup, False),
            ("GET", "/webhooks/{application_id}/{token}/messages/{message_id}", "get_followup",
             self._get_followup, False),
            ("PATCH", "/webhooks/{application_id}/{token}/messages/{message_id}",
             "edit_followup", self._edit_followup, False),
            ("DELETE", "/webhooks/{application_id}/{token}/messages/{message_id}",
             "delete_followup", self._delete_followup, False),
        ]  # fmt: skip
        routes = []
        for method, template, name, handler, auth in table:
            regex = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
            bucket = hashlib.md5(f"{method} {template}".encode()).hexdigest()
            routes.append(
                _Route(method, template, name, handler, auth, re.compile(regex + "/?"), bucket)
            )
        return routes

    def _route_named(self, name: str) -> _Route:
        for route in self._routes:
            if route.name == name:
                return route
        raise ValueError(f"the fake has no route {name!r}")

    async def _api(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["version"] not in ("9", "10"):
            return _error_response(_DiscordError(400, 50041, "Invalid API version"))
        path = "/" + request.match_info["path"]
        matches = [(route, route.pattern.fullmatch(path)) for route in self._routes]
        found = [(route, match) for route, match in matches if match]
        if not found:
            return _error_response(_DiscordError(404, 0, "404: Not Found"))
        chosen = next(((r, m) for r, m in found if r.method == request.method), None)
        if chosen is None:
            return _error_response(_DiscordError(405, 0, "405: Method Not Allowed"))
        route, match = chosen
        if route.auth and request.headers.get(hdrs.AUTHORIZATION) != f"Bot {self.token}":
            await _drain(request)
            return _error_response(_DiscordError(401, 0, "401: Unauthorized"))
        arrived = self.clock()
        params: dict[str, Any] = dict(request.query)
        payload: Any = None
        files: list[Upload] = []
        headers: dict[str, str] = {}
        error: dict[str, Any] | None = None
        try:
            params |= _path_params(match.groupdict())
            if "token" in params and route.template.startswith("/webhooks/"):
                found_interaction = self._by_token(params["token"])
                if found_interaction is not None:
                    params["interaction_id"] = found_interaction.id
            payload, files = await _read_body(request)
            faults = self._faults.get(route.name)
            if faults:
                raise faults.popleft()()
            headers = self._count_request(route, params)
            for upload in files:
                if len(upload.data) > self.upload_max_bytes:
                    raise _DiscordError(*_TOO_LARGE)
            status, result = await route.handler(_Request(params, request.query, payload, files))
        except _DiscordError as exc:
            status, result, error = exc.status, None, exc.body
            headers |= exc.headers
        self._record(
            Call(
                route.name, request.method, path, params, payload, files, arrived, status,
                result=result, error=error,
            )
        )  # fmt: skip
        if error is not None:
            return _json_response(error, status, headers)
        if status == 204:
            return web.Response(status=204, headers=headers | {"Via": "1.1 google"})
        return _json_response(result, status, headers)

    def _count_request(self, route: _Route, params: dict[str, Any]) -> dict[str, str]:
        """Count the request in its bucket: the X-RateLimit headers, or 429 over the limit."""
        limit, window = self.rate_limit
        major = "+".join(
            str(params[key])
            for key in ("channel_id", "guild_id", "interaction_id", "token")
            if key in params
        )
        now = time.monotonic()
        state = self._buckets.setdefault((route.bucket, major), [now, 0])
        if now - state[0] >= window:
            state[:] = [now, 0]
        state[1] += 1
        reset_after = max(window - (now - state[0]), 0.001)
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(limit - int(state[1]), 0)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": route.bucket,
        }
        if state[1] > limit:
            body = {"message": _RATE_LIMITED, "retry_after": round(reset_after, 3), "global": False}
            extra = {"Retry-After": str(math.ceil(reset_after)), "X-RateLimit-Scope": "user"}
            raise _DiscordError(429, 0, body["message"], headers=headers | extra, body=body)
        return headers

    def _record(self, call: Call) -> None:
        self.sent.append(call)
        self._notify()

    # REST: gateway, users, application

    async def _get_gateway(self, request: _Request) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    async def _get_gateway_bot(self, request: _Request) -> tuple[int, Any]:
        return 200, {
            "url": self.gateway_url,
            "shards": self.recommended_shards,
            "session_start_limit": {
                "total": 1000,
                "remaining": self._session_starts,
                "reset_after": 86_400_000,
                "max_concurrency": 1,
            },
        }

    async def _get_current_user(self, request: _Request) -> tuple[int, Any]:
        return 200, self.bot.to_json() | {
            "mfa_enabled": False,
            "locale": "en-US",
            "premium_type": 0,
            "email": None,
            "verified": True,
            "bio": "",
        }

    async def _get_app(self, request: _Request) -> tuple[int, Any]:
        return 200, self._application()

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot.username,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "hook": True,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": hashlib.sha256(self.token.encode()).hexdigest(),
            "flags": self.application_flags,
            "owner": self._owner.to_json(),
            "team": None,
            "bot": self.bot.to_json(),
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "integration_types_config": {"0": {}},
            "approximate_guild_count": len(self.guilds),
        }

    @property
    def application_flags(self) -> int:
        flags = 0
        for intent, flag in _LIMITED_INTENT_FLAGS.items():
            if self.privileged_intents & intent:
                flags |= flag
        if self._global_commands or any(self._guild_commands.values()):
            flags |= 1 << 23  # APPLICATION_COMMAND_BADGE
        return flags

    async def _create_dm(self, request: _Request) -> tuple[int, Any]:
        payload = request.payload if isinstance(request.payload, dict) else {}
        recipient = _snowflake_or_none(payload.get("recipient_id"))
        user = self._users.get(recipient) if recipient is not None else None
        if user is None:
            raise _form_error("recipient_id", "NUMBER_TYPE_COERCE", "Unknown user")
        return 200, self.dm(user).to_json()

    # REST: application commands

    def _check_application(self, request: _Request) -> None:
        if request.params["application_id"] != self.application_id:
            raise _DiscordError(403, 50001, "Missing Access")

    async def _get_commands(self, request: _Request) -> tuple[int, Any]:
        self._check_application(request)
        guild_id = request.params.get("guild_id")
        if guild_id is None:
            return 200, self._global_commands
        self._guild_or_error(guild_id)
        return 200, self._guild_commands.get(guild_id, [])

    async def _put_commands(self, request: _Request) -> tuple[int, Any]:
        self._check_application(request)
        guild_id = request.params.get("guild_id")
        if guild_id is not None:
            self._guild_or_error(guild_id)
        payload = request.payload
        if not isinstance(payload, list):
            raise _form_error("", "BASE_TYPE_ARRAY", "Must be an array.")
        old = self._global_commands if guild_id is None else self._guild_commands.get(guild_id, [])
        known = {(command["name"], command["type"]): command["id"] for command in old}
        seen: set[tuple[str, int]] = set()
        commands = []
        for index, command in enumerate(payload):
            if not isinstance(command, dict):
                raise _form_error(str(index), "DICT_TYPE_CONVERT", "Only dictionaries may be used.")
            kind = command.get("type", 1)
            name = command.get("name")
            if (
                not isinstance(name, str)
                or not _COMMAND_NAME.fullmatch(name)
                or (kind == 1 and name != name.lower())
            ):
                raise _form_error(
                    f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            description = command.get("description", "")
            if kind == 1 and not (isinstance(description, str) and 1 <= len(description) <= 100):
                raise _form_error(
                    f"{index}.description",
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 100 in length.",
                )
            if (name, kind) in seen:
                raise _form_error(
                    "", "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    "Application command names must be unique",
                )  # fmt: skip
            seen.add((name, kind))
            stored = {
                "id": known.get((name, kind)) or str(self._snowflake()),
                "application_id": str(self.application_id),
                "version": str(self._snowflake()),
                "default_member_permissions": command.get("default_member_permissions"),
                "type": kind,
                "name": name,
                "name_localizations": command.get("name_localizations"),
                "description": description,
                "description_localizations": command.get("description_localizations"),
                "options": command.get("options", []),
                "contexts": command.get("contexts"),
                "integration_types": command.get("integration_types", [0]),
                "nsfw": command.get("nsfw", False),
            }
            if guild_id is not None:
                stored["guild_id"] = str(guild_id)
            else:
                stored["dm_permission"] = command.get("dm_permission", True)
            commands.append(stored)
        if guild_id is None:
            self._global_commands = commands
        else:
            self._guild_commands[guild_id] = commands
        return 200, commands

    # REST: channels and messages

    async def _get_channel(self, request: _Request) -> tuple[int, Any]:
        return 200, self._channel_or_error(request.params["channel_id"]).to_json()

    async def _create_message(self, request: _Request) -> tuple[int, Any]:
        channel = self._channel_or_error(request.params["channel_id"])
        payload = _object(request.payload)
        message = self._bot_message(channel, payload, request.files)
        self._messages[channel.id][int(message["id"])] = message
        self._dispatch_message("MESSAGE_CREATE", channel, message)
        return 200, message

    async def _get_message(self, request: _Request) -> tuple[int, Any]:
        channel = self._channel_or_error(request.params["channel_id"])
        message = self._message_or_error(channel, request.params["message_id"])
        if not self.privileged_intents & INTENT_MESSAGE_CONTENT:
            message = self._without_content(channel, message)
        return 200, message

    async def _edit_message(self, request: _Request) -> tuple[int, Any]:
        channel = self._channel_or_error(request.params["channel_id"])
        old = self._message_or_error(channel, request.params["message_id"])
        if int(old["author"]["id"]) != self.bot.id:
            raise _DiscordError(403, 50005, "Cannot edit a message authored by another user")
        edited = self._edited(channel, old, _object(request.payload), request.files)
        self._messages[channel.id][int(old["id"])] = edited
        self._reflect_edit(edited)
        self._dispatch_message("MESSAGE_UPDATE", channel, edited)
        return 200, edited

    async def _delete_message(self, request: _Request) -> tuple[int, Any]:
        channel = self._channel_or_error(request.params["channel_id"])
        message = self._message_or_error(channel, request.params["message_id"])
        del self._messages[channel.id][int(message["id"])]
        self._dispatch_delete(channel, message)
        return 204, None

    async def _typing(self, request: _Request) -> tuple[int, Any]:
        self._channel_or_error(request.params["channel_id"])
        return 204, None

    async def _add_reaction(self, request: _Request) -> tuple[int, Any]:
        channel = self._channel_or_error(request.params["channel_id"])
        self._message_or_error(channel, request.params["message_id"])
        return 204, None

    # REST: interactions

    async def _callback(self, request: _Request) -> tuple[int, Any]:
        """The one initial response, within ``ack_window`` of the interaction's creation.

        A component's interaction may also answer 6 (acknowledge now, edit the message later)
        or 7 (edit the message now); either makes that message the interaction's ``@original``.
        """
        interaction = next(
            (i for i in self.interactions if i.id == request.params["interaction_id"]), None
        )
        if interaction is None or interaction.token != request.params["token"]:
            raise _unknown("interaction", 10062)
        if interaction.acked_at is not None:
            raise _DiscordError(400, 40060, "Interaction has already been acknowledged.")
        now = self.clock()
        if now - interaction.created_at > self.ack_window:
            raise _unknown("interaction", 10062)
        payload = _object(request.payload)
        kind = payload.get("type")
        allowed = CALLBACKS_FOR[interaction.type]
        if kind not in allowed:
            raise _form_error("type", "BASE_TYPE_CHOICES", f"Value must be one of {allowed}.")
        data = payload.get("data") or {}
        if not isinstance(data, dict):
            raise _form_error("data", "DICT_TYPE_CONVERT", "Only dictionaries may be used.")
        resource: dict[str, Any] = {"type": kind}
        if kind == CALLBACK_AUTOCOMPLETE:
            choices = data.get("choices")
            if not isinstance(choices, list):
                raise _form_error("data.choices", "BASE_TYPE_REQUIRED", "This field is required")
            if len(choices) > AUTOCOMPLETE_MAX_CHOICES:
                raise _form_error(
                    "data.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
                )
        elif kind == CALLBACK_MESSAGE:
            interaction.original = self._bot_message(
                interaction.channel, data, request.files, interaction=interaction, errors_at="data."
            )
            resource["message"] = interaction.original
        elif kind == CALLBACK_DEFERRED:
            flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            interaction.original = self._bot_message(
                interaction.channel, {"flags": flags}, [], interaction=interaction, loading=True
            )
            resource["message"] = interaction.original
        elif kind in (CALLBACK_DEFERRED_UPDATE, CALLBACK_UPDATE):
            channel = interaction.channel
            pressed = self._message_at(channel, int(interaction.payload["message"]["id"]))
            if pressed is None:
                raise _unknown("Message", 10008)
            if kind == CALLBACK_UPDATE:
                pressed = self._edited(channel, pressed, data, request.files, errors_at="data.")
                resource["message"] = pressed
            interaction.original = pressed
        interaction.acked_at = now
        interaction.response_type = kind
        interaction.response = data
        message = resource.get("message")
        if message is not None:
            self._post_interaction_message(interaction, message, update=kind == CALLBACK_UPDATE)
        if request.query.get("with_response", "").lower() not in ("1", "true"):
            return 204, None
        answer: dict[str, Any] = {"id": str(interaction.id), "type": interaction.type}
        if message is not None:
            answer |= {
                "response_message_id": message["id"],
                "response_message_loading": bool(message["flags"] & FLAG_LOADING),
                "response_message_ephemeral": bool(message["flags"] & FLAG_EPHEMERAL),
            }
        return 200, {"interaction": answer, "resource": resource}

    def _webhook_interaction(self, request: _Request) -> Interaction:
        """The interaction whose webhook a request uses, or Discord's error for it."""
        if request.params["application_id"] != self.application_id:
            raise _unknown("Webhook", 10015)
        interaction = self._by_token(request.params["token"])
        if interaction is None or self.clock() - interaction.created_at > self.token_ttl:
            raise _DiscordError(401, 50027, "Invalid Webhook Token")
        if interaction.acked_at is None:
            raise _unknown("Webhook", 10015)
        return interaction

    def _original_or_error(self, interaction: Interaction) -> dict[str, Any]:
        if interaction.original is None:
            raise _unknown("Message", 10008)
        return interaction.original

    async def _get_original(self, request: _Request) -> tuple[int, Any]:
        return 200, self._original_or_error(self._webhook_interaction(request))

    async def _edit_original(self, request: _Request) -> tuple[int, Any]:
        interaction = self._webhook_interaction(request)
        original = self._original_or_error(interaction)
        edited = self._edited(
            interaction.channel, original, _object(request.payload), request.files
        )
        self._post_interaction_message(interaction, edited, update=True)
        return 200, edited

    async def _delete_original(self, request: _Request) -> tuple[int, Any]:
        interaction = self._webhook_interaction(request)
        original = self._original_or_error(interaction)
        interaction.original = None
        if not original["flags"] & FLAG_EPHEMERAL:
            self._messages[interaction.channel.id].pop(int(original["id"]), None)
            self._dispatch_delete(interaction.channel, original)
        return 204, None

    async def _create_followup(self, request: _Request) -> tuple[int, Any]:
        interaction = self._webhook_interaction(request)
        payload = _object(request.payload)
        original = interaction.original
        if original is not None and original["flags"] & FLAG_LOADING:
            # Discord: the first followup after a deferral edits the loading message instead,
            # keeping the deferral's ephemeral flag.
            payload = {**payload, "flags": original["flags"] & FLAG_EPHEMERAL}
            edited = self._edited(interaction.channel, original, payload, request.files)
            self._post_interaction_message(interaction, edited, update=True)
            return 200, edited
        message = self._bot_message(
            interaction.channel, payload, request.files, interaction=interaction
        )
        interaction.followups.append(message)
        self._post_interaction_message(interaction, message)
        return 200, message

    def _followup_or_error(self, interaction: Interaction, message_id: int) -> dict[str, Any]:
        for message in [interaction.original, *interaction.followups]:
            if message is not None and int(message["id"]) == message_id:
                return message
        raise _unknown("Message", 10008)

    async def _get_followup(self, request: _Request) -> tuple[int, Any]:
        interaction = self._webhook_interaction(request)
        return 200, self._followup_or_error(interaction, request.params["message_id"])

    async def _edit_followup(self, request: _Request) -> tuple[int, Any]:
        interaction = self._webhook_interaction(request)
        old = self._followup_or_error(interaction, request.params["message_id"])
        edited = self._edited(interaction.channel, old, _object(request.payload), request.files)
        self._post_interaction_message(interaction, edited, update=True)
        return 200, edited

    async def _delete_followup(self, request: _Request) -> tuple[int, Any]:
        interaction = self._webhook_interaction(request)
        old = self._followup_or_error(interaction, request.params["message_id"])
        if interaction.original is old:
            interaction.original = None
        interaction.followups = [m for m in interaction.followups if m is not old]
        if not old["flags"] & FLAG_EPHEMERAL:
            self._messages[interaction.channel.id].pop(int(old["id"]), None)
            self._dispatch_delete(interaction.channel, old)
        return 204, None

    def _by_token(self, token: str) -> Interaction | None:
        return next((i for i in self.interactions if i.token == token), None)

    def _post_interaction_message(
        self, interaction: Interaction, message: dict[str, Any], *, update: bool = False
    ) -> None:
        """Keep a non-ephemeral interaction message in its channel and tell the gateway."""
        if update:
            self._reflect_edit(message)
        if message["flags"] & FLAG_EPHEMERAL:
            return
        self._messages[interaction.channel.id][int(message["id"])] = message
        event = "MESSAGE_UPDATE" if update else "MESSAGE_CREATE"
        self._dispatch_message(event, interaction.channel, message)

    def _reflect_edit(self, message: dict[str, Any]) -> None:
        """Every interaction holding ``message`` (as its response, a followup or the message its
        button is on) now holds it as edited."""
        for holder in self.interactions:
            if holder.original is not None and holder.original["id"] == message["id"]:
                holder.original = message
            holder.followups = [
                message if m["id"] == message["id"] else m for m in holder.followups
            ]

    def _message_at(self, channel: Channel, message_id: int) -> dict[str, Any] | None:
        """A message as it stands: in the channel, or an ephemeral one an interaction holds."""
        message = self._messages[channel.id].get(message_id)
        if message is not None:
            return message
        held = (m for i in self.interactions for m in [i.original, *i.followups] if m is not None)
        ephemeral = (m for m in held if m["flags"] & FLAG_EPHEMERAL)
        return next((m for m in ephemeral if int(m["id"]) == message_id), None)

    # Messages

    def _channel_or_error(self, channel_id: int) -> Channel:
        channel = self._channels.get(channel_id)
        if channel is None:
            raise _unknown("Channel", 10003)
        return channel

    def _message_or_error(self, channel: Channel, message_id: int) -> dict[str, Any]:
        message = self._messages[channel.id].get(message_id)
        if message is None:
            raise _unknown("Message", 10008)
        return message

    def _guild_or_error(self, guild_id: int) -> Guild:
        guild = next((guild for guild in self.guilds if guild.id == guild_id), None)
        if guild is None:
            raise _unknown("Guild", 10004)
        return guild

    def _check_channel(self, channel: Channel) -> None:
        if self._channels.get(channel.id) != channel:
            raise ValueError(f"unknown channel {channel.id}: make it with guild() or dm()")

    def _new_message(
        self,
        channel: Channel,
        author: User,
        content: str,
        attachments: list[dict[str, Any]],
        reference: dict[str, Any] | None,
        *,
        flags: int = 0,
    ) -> dict[str, Any]:
        mentioned = [int(user_id) for user_id in _MENTION.findall(content)]
        message: dict[str, Any] = {
            "type": 0 if reference is None else 19,
            "content": content,
            "mentions": [self._users[i].to_json() for i in mentioned if i in self._users],
            "mention_roles": [],
            "attachments": attachments,
            "embeds": [],
            "timestamp": _timestamp(),
            "edited_timestamp": None,
            "flags": flags,
            "components": [],
            "id": str(self._snowflake()),
            "channel_id": str(channel.id),
            "author": author.to_json(),
            "pinned": False,
            "mention_everyone": False,
            "tts": False,
        }
        if reference is not None:
            message["message_reference"] = {
                "type": 0,
                "channel_id": str(channel.id),
                "message_id": reference["id"],
            }
            if channel.guild_id is not None:
                message["message_reference"]["guild_id"] = str(channel.guild_id)
            message["referenced_message"] = {
                key: value for key, value in reference.items() if key != "referenced_message"
            }
        return message

    def _bot_message(
        self,
        channel: Channel,
        payload: dict[str, Any],
        files: list[Upload],
        *,
        interaction: Interaction | None = None,
        loading: bool = False,
        errors_at: str = "",
    ) -> dict[str, Any]:
        """A message the bot sends, checked as Discord checks it (form errors under ``errors_at``,
        "data." for an interaction callback)."""
        content = _content(payload, errors_at)
        attachments = self._uploaded(channel, payload, files, [])
        embeds = payload.get("embeds") or []
        components = _components(payload, f"{errors_at}components")
        given = (content, attachments, embeds, components, payload.get("sticker_ids"))
        if not loading and not (any(given) or payload.get("poll")):
            raise _DiscordError(400, 50006, "Cannot send an empty message")
        reference = None
        reference_request = payload.get("message_reference")
        if interaction is not None and interaction.type == INTERACTION_COMPONENT:
            # Discord: an answer to a component refers to the message the component is on.
            reference = interaction.payload["message"]
        elif isinstance(reference_request, dict) and interaction is None:
            reference = self._reference_target(channel, reference_request)
        flags = int(payload.get("flags") or 0)
        if interaction is None:
            flags &= 1 << 2 | 1 << 12  # SUPPRESS_EMBEDS, SUPPRESS_NOTIFICATIONS
        else:
            flags &= FLAG_EPHEMERAL | FLAG_LOADING | 1 << 2 | 1 << 12
        message = self._new_message(channel, self.bot, content, attachments, reference, flags=flags)
        message["embeds"] = embeds
        message["components"] = components
        message["tts"] = bool(payload.get("tts", False))
        if "nonce" in payload:
            message["nonce"] = payload["nonce"]
        if reference is not None and interaction is None:
            allowed = payload.get("allowed_mentions")
            pings = not isinstance(allowed, dict) or allowed.get("replied_user", False)
            if pings and reference["author"]["id"] not in _ids(message["mentions"]):
                message["mentions"].append(reference["author"])
        if interaction is not None:
            message["application_id"] = str(self.application_id)
            message["webhook_id"] = str(self.application_id)
            user = interaction.payload.get("user") or interaction.payload["member"]["user"]
            metadata = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": user,
                "authorizing_integration_owners": interaction.payload[
                    "authorizing_integration_owners"
                ],
            }
            if interaction.type == INTERACTION_COMPONENT:
                pressed_id = interaction.payload["message"]["id"]
                message["interaction_metadata"] = metadata | {"interacted_message_id": pressed_id}
            else:
                name = interaction.payload["data"]["name"]
                message["type"] = 20
                message["interaction_metadata"] = metadata | {"name": name, "command_type": 1}
                message["interaction"] = {
                    "id": str(interaction.id),
                    "type": interaction.type,
                    "name": name,
                    "user": user,
                }
        return message

    def _reference_target(
        self, channel: Channel, reference: dict[str, Any]
    ) -> dict[str, Any] | None:
        target_channel = _snowflake_or_none(reference.get("channel_id")) or channel.id
        target_id = _snowflake_or_none(reference.get("message_id"))
        if target_channel != channel.id:
            raise _form_error(
                "message_reference",
                "MESSAGE_REFERENCE_CANNOT_REFERENCE_OTHER_CHANNEL",
                "Cannot reply to a message in a different channel",
            )
        target = self._messages[channel.id].get(target_id) if target_id is not None else None
        if target is None and reference.get("fail_if_not_exists", True):
            raise _form_error(
                "message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
            )
        return target

    def _edited(
        self,
        channel: Channel,
        old: dict[str, Any],
        payload: dict[str, Any],
        files: list[Upload],
        *,
        errors_at: str = "",
    ) -> dict[str, Any]:
        """``old`` with the edit applied, as Edit Message, the webhook edits and UPDATE_MESSAGE
        do it."""
        edited = dict(old)
        if "content" in payload:
            edited["content"] = _content(payload, errors_at)
        if "embeds" in payload:
            edited["embeds"] = payload["embeds"] or []
        if "components" in payload:
            edited["components"] = _components(payload, f"{errors_at}components")
        if "attachments" in payload or files:
            edited["attachments"] = self._uploaded(channel, payload, files, old["attachments"])
        if "flags" in payload:
            keep = old["flags"] & FLAG_EPHEMERAL
            edited["flags"] = keep | (int(payload["flags"] or 0) & (1 << 2))
        edited["flags"] &= ~FLAG_LOADING
        if not any(edited[key] for key in ("content", "attachments", "embeds", "components")):
            raise _DiscordError(400, 50006, "Cannot send an empty message")
        if not old["flags"] & FLAG_LOADING:
            edited["edited_timestamp"] = _timestamp()
        return edited

    def _uploaded(
        self,
        channel: Channel,
        payload: dict[str, Any],
        files: list[Upload],
        existing: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """The attachments after a request: the kept existing ones, then the new files.

        Without an ``attachments`` list the new files join the existing ones; with it, existing
        attachments it leaves out are removed, and its entries name the files by index.
        """
        if len(files) > ATTACHMENTS_MAX:
            raise _form_error(
                "attachments", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length."
            )
        by_id = {attachment["id"]: attachment for attachment in existing}
        listed = payload.get("attachments")
        if not isinstance(listed, list):
            kept = list(existing)
            described: dict[int, dict[str, Any]] = {}
        else:
            kept = [by_id[str(a.get("id"))] for a in listed if str(a.get("id")) in by_id]
            described = {
                int(a["id"]): a
                for a in listed
                if str(a.get("id")) not in by_id and _snowflake_or_none(a.get("id")) is not None
            }
        new = []
        for position, upload in enumerate(files):
            match = _FILE_FIELD.fullmatch(upload.field)
            index = int(match.group(1) or match.group(2) or position) if match else position
            meta = described.get(index, {})
            name = meta.get("filename") or upload.filename
            attachment = self._store_attachment(
                f"attachments/{channel.id}", upload.data, name, None
            )
            if meta.get("description"):
                attachment["description"] = meta["description"]
            new.append(attachment)
        if len(kept) + len(new) > ATTACHMENTS_MAX:
            raise _form_error(
                "attachments", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length."
            )
        return kept + new

    def _user_attachment(self, channel_id: int, file: File) -> dict[str, Any]:
        return self._store_attachment(
            f"attachments/{channel_id}", file.data, file.filename, file.content_type,
            size=file.size_override,
        )  # fmt: skip

    def _store_attachment(
        self,
        folder: str,
        data: bytes,
        filename: str,
        content_type: str | None,
        *,
        size: int | None = None,
    ) -> dict[str, Any]:
        """Keep ``data`` on the CDN and return its attachment object with signed URLs."""
        attachment_id = self._snowflake()
        filename = re.sub(r"[^A-Za-z0-9_.\-]", "_", filename) or "unknown"
        image = _image_info(data)
        if content_type is None:
            content_type = image[2] if image else mimetypes.guess_type(filename)[0]
        path = f"{folder}/{attachment_id}/{filename}"
        query = self._sign(path)
        self._files[path] = _StoredFile(data, content_type or "application/octet-stream")
        attachment: dict[str, Any] = {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": f"{self.cdn_url}/{path}?{query}",
            "proxy_url": f"{self.media_url}/{path}?{query}",
        }
        if content_type:
            attachment["content_type"] = content_type
        if image:
            attachment |= {
                "width": image[0],
                "height": image[1],
                # Discord's is a thumbhash of the picture; this one is per attachment (a hash of
                # the whole file was 0.7 ms of a load bench's photo of 1.4 MB).
                "placeholder": base64.b64encode(hashlib.sha1(path.encode()).digest()[:18]).decode(),
                "placeholder_version": 1,
            }
        attachment["content_scan_version"] = 2
        return attachment

    def _sign(self, path: str) -> str:
        expires = f"{int(time.time() + ATTACHMENT_URL_TTL):x}"
        issued = f"{int(time.time()):x}"
        mac = hmac.new(self._cdn_secret, f"{path}{expires}{issued}".encode(), "sha256")
        return f"ex={expires}&is={issued}&hm={mac.hexdigest()}&"

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        stored = self._files.get(path)
        query = request.query
        expected = hmac.new(
            self._cdn_secret,
            f"{path}{query.get('ex', '')}{query.get('is', '')}".encode(),
            "sha256",
        ).hexdigest()
        try:
            expired = int(query.get("ex", "0"), 16) < time.time()
        except ValueError:
            expired = True
        if stored is None:
            return web.Response(status=404, text="404: Not Found")
        if expired or not hmac.compare_digest(query.get("hm", ""), expected):
            return web.Response(status=404, text=_NO_LONGER_AVAILABLE)
        return web.Response(body=stored.data, content_type=stored.content_type)

    # Interactions

    def _command_interaction(
        self,
        kind: int,
        channel: Channel,
        user: User,
        name: str,
        options: Mapping[str, Any] | Sequence[dict[str, Any]],
        focused: str | None,
        locale: str,
    ) -> Interaction:
        self._check_channel(channel)
        guild = self.guild_of(channel)
        self._require_sessions("INTERACTION_CREATE", guild)
        command = self._synced_command(name, guild)
        interaction_id = self._snowflake()
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1}
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        if isinstance(options, Mapping):
            built, resolved = self._options(command, options, interaction_id, guild, focused)
        else:
            built, resolved = list(options), {}
        if built:
            data["options"] = built
        if resolved:
            data["resolved"] = resolved
        return self._interact(interaction_id, kind, channel, user, data, locale)

    def _interact(
        self,
        interaction_id: int,
        kind: int,
        channel: Channel,
        user: User,
        data: dict[str, Any],
        locale: str,
        *,
        message: dict[str, Any] | None = None,
    ) -> Interaction:
        """Dispatch INTERACTION_CREATE for ``user`` in ``channel`` (``message``: a component's)."""
        guild = self.guild_of(channel)
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(120)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "app_permissions": str(DEFAULT_PERMISSIONS),
            "entitlements": [],
            "attachment_size_limit": self.upload_max_bytes,
            "channel": channel.to_json(),
            "channel_id": str(channel.id),
        }
        if message is not None:
            payload["message"] = message
        if guild is not None:
            guild.members.setdefault(user.id, user)
            payload |= {
                "guild_id": str(guild.id),
                "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": self._member(guild, user)
                | {"user": user.to_json(), "permissions": str(DEFAULT_PERMISSIONS)},
                "authorizing_integration_owners": {"0": str(guild.id)},
                "context": 0,
            }
        else:
            payload |= {
                "user": user.to_json(),
                "authorizing_integration_owners": {"0": "0"},
                "context": 1,
            }
        interaction = Interaction(interaction_id, token, kind, payload, channel, self.clock())
        self.interactions.append(interaction)
        self.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _synced_command(self, name: str, guild: Guild | None) -> dict[str, Any]:
        candidates = list(self._guild_commands.get(guild.id, [])) if guild else []
        candidates += self._global_commands
        for command in candidates:
            if command["name"] == name and command["type"] == 1:
                return command
        raise ValueError(f"no chat command {name!r} synced: Discord offers only synced commands")

    def _options(
        self,
        command: dict[str, Any],
        values: Mapping[str, Any],
        interaction_id: int,
        guild: Guild | None,
        focused: str | None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        declared = {option["name"]: option for option in command.get("options", [])}
        unknown = [name for name in values if name not in declared]
        if unknown:
            raise ValueError(f"command {command['name']!r} has no option {unknown[0]!r}")
        missing = [
            name
            for name, option in declared.items()
            if option.get("required") and name not in values and focused is None
        ]
        if missing:
            raise ValueError(f"command {command['name']!r} requires options {missing}")
        if focused is not None and not declared.get(focused, {}).get("autocomplete"):
            raise ValueError(f"option {focused!r} of {command['name']!r} has no autocomplete")
        options: list[dict[str, Any]] = []
        resolved: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            kind = declared[name]["type"]
            if kind == OPTION_ATTACHMENT:
                if not isinstance(value, File):
                    raise TypeError(f"option {name!r} takes a File")
                attachment = self._store_attachment(
                    f"ephemeral-attachments/{self.application_id}/{interaction_id}",
                    value.data, value.filename, value.content_type, size=value.size_override,
                )  # fmt: skip
                attachment["ephemeral"] = True
                resolved.setdefault("attachments", {})[attachment["id"]] = attachment
                value = attachment["id"]
            elif kind == OPTION_USER:
                if not isinstance(value, User):
                    raise TypeError(f"option {name!r} takes a User")
                resolved.setdefault("users", {})[str(value.id)] = value.to_json()
                if guild is not None:
                    guild.members.setdefault(value.id, value)
                    member = self._member(guild, value) | {"permissions": "0"}
                    resolved.setdefault("members", {})[str(value.id)] = member
                value = str(value.id)
            entry: dict[str, Any] = {"type": kind, "name": name, "value": value}
            if name == focused:
                entry["focused"] = True
            options.append(entry)
        return options, resolved

    # Gateway

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        compression = query.get("compress") or None
        connection = GatewayConnection(request.path, query, compression)
        socket = web.WebSocketResponse(max_msg_size=2**20)
        connection._socket = socket
        await socket.prepare(request)
        self.connections.append(connection)
        writer = asyncio.create_task(self._write(connection))
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)
        problem = _gateway_query_problem(query)
        if problem is not None:
            connection.close(*problem)
        else:
            hello = {"heartbeat_interval": self.heartbeat_interval_ms}
            connection.send({"op": 10, "d": hello, "s": None, "t": None})
        try:
            async for message in socket:
                if message.type is WSMsgType.TEXT:
                    self._receive(connection, message.data)
                elif message.type is WSMsgType.BINARY:
                    connection.close(4002, "Error while decoding payload.")
        finally:
            if connection.close_code is None:
                connection.close_code = socket.close_code or 1006
            session = connection.session
            if session is not None and session.connection is connection:
                session.connection = None
                if connection.close_code in (1000, 1001) and not connection.closed_by_server:
                    session.ended = True
            connection._outbox.put_nowait(("stop", None))
            self._notify()
        return socket

    async def _write(self, connection: GatewayConnection) -> None:
        """Send a connection's frames in order, compressed as it asked."""
        socket = connection._socket
        assert socket is not None
        compressor = _compressor(connection.compression)
        while True:
            kind, item = await connection._outbox.get()
            if kind == "stop" or socket.closed:
                return
            if kind == "close":
                code, reason = item
                connection.closed_by_server = True
                connection.close_code = code
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await socket.close(code=code, message=reason.encode())
                self._notify()
                return
            text = json.dumps(item, separators=(",", ":"))
            try:
                if compressor is None:
                    await socket.send_str(text)
                else:
                    await socket.send_bytes(compressor(text.encode()))
            except (ConnectionError, RuntimeError):
                return

    def _receive(self, connection: GatewayConnection, text: str) -> None:
        try:
            frame = json.loads(text)
            op = frame["op"]
        except (ValueError, TypeError, KeyError):
            connection.close(4002, "Error while decoding payload.")
            return
        data = frame.get("d")
        self.received.append(GatewayFrame(op, data, self.clock(), connection))
        self._notify()
        if op == 1:
            connection.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            self._identify(connection, data)
        elif op == 6:
            self._resume(connection, data)
        elif connection.session is None:
            connection.close(4003, "Not authenticated.")
        elif op == 8:
            self._request_members(connection.session, data)
        elif op not in (3, 4):
            connection.close(4001, "Unknown opcode.")

    def _identify(self, connection: GatewayConnection, data: Any) -> None:
        if connection.session is not None:
            connection.close(4005, "Already authenticated.")
            return
        if not isinstance(data, dict) or data.get("token") != self.token:
            connection.close(4004, "Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents & ~VALID_INTENTS:
            connection.close(4013, "Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
            connection.close(4014, "Disallowed intent(s).")
            return
        shard = data.get("shard")
        if shard is not None and not (
            isinstance(shard, list) and len(shard) == 2 and 0 <= shard[0] < shard[1]
        ):
            connection.close(4010, "Invalid shard.")
            return
        self._session_starts -= 1
        session = GatewaySession(secrets.token_hex(16), intents, shard, connection)
        connection.session = session
        self.sessions.append(session)
        ready: dict[str, Any] = {
            "v": API_VERSION,
            "user_settings": {},
            "user": self.bot.to_json() | {"verified": True, "mfa_enabled": False, "email": None},
            "session_type": "normal",
            "session_id": session.id,
            "resume_gateway_url": self.resume_gateway_url,
            "relationships": [],
            "private_channels": [],
            "presences": [],
            "guilds": [{"id": str(g.id), "unavailable": True} for g in self._guilds_of(session)],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake"],
            "application": {"id": str(self.application_id), "flags": self.application_flags},
            "auth": {},
        }
        if shard is not None:
            ready["shard"] = shard
        self._send_event(session, "READY", ready)
        for guild in self._guilds_of(session):
            self._send_event(session, "GUILD_CREATE", self._guild_create(guild))
        self._notify()

    def _resume(self, connection: GatewayConnection, data: Any) -> None:
        if connection.session is not None:
            connection.close(4005, "Already authenticated.")
            return
        if not isinstance(data, dict) or data.get("token") != self.token:
            connection.close(4004, "Authentication failed.")
            return
        session = next((s for s in self.sessions if s.id == data.get("session_id")), None)
        seq = data.get("seq")
        if session is None or session.ended or not isinstance(seq, int) or seq > session.seq:
            connection.send({"op": 9, "d": False, "s": None, "t": None})
            return
        if session.connection is not None:
            session.connection.close(4000, "Session resumed elsewhere.")
        session.connection = connection
        session.resumes += 1
        connection.session = session
        for frame in session.events[seq:]:
            connection.send(frame)
        self._send_event(session, "RESUMED", {})
        self._notify()

    def _request_members(self, session: GatewaySession, data: Any) -> None:
        if not isinstance(data, dict):
            return
        guild_id = _snowflake_or_none(data.get("guild_id"))
        guild = next((g for g in self.guilds if g.id == guild_id), None)
        if guild is None:
            return
        members = [
            self._member(guild, user) | {"user": user.to_json()} for user in guild.members.values()
        ]
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        self._send_event(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _live_sessions(self) -> list[GatewaySession]:
        return [session for session in self.sessions if not session.ended]

    def _require_sessions(self, event: str, guild: Guild | None) -> None:
        if not self._sessions_for(None if guild is None else guild.id):
            raise RuntimeError(
                f"no gateway session to get {event}: start the client, then await wait_ready()"
            )

    def _sessions_for(self, guild_id: int | None) -> list[GatewaySession]:
        """The live sessions that get a guild's events (or, without a guild, DMs' events)."""
        return [s for s in self._live_sessions() if _on_shard(s.shard, guild_id)]

    def _guilds_of(self, session: GatewaySession) -> list[Guild]:
        return [guild for guild in self.guilds if _on_shard(session.shard, guild.id)]

    def _send_event(self, session: GatewaySession, event: str, data: dict[str, Any]) -> None:
        frame = {"op": 0, "t": event, "s": session.seq + 1, "d": data}
        session.events.append(frame)
        if session.connection is not None:
            session.connection.send(frame)

    def _dispatch_message(self, event: str, channel: Channel, message: dict[str, Any]) -> None:
        """MESSAGE_CREATE/UPDATE to the sessions whose intents cover the channel."""
        intent = INTENT_DIRECT_MESSAGES if channel.is_dm else INTENT_GUILD_MESSAGES
        data = dict(message)
        guild = self.guild_of(channel)
        if guild is not None:
            author = self._users.get(int(message["author"]["id"]))
            data["guild_id"] = str(guild.id)
            if author is not None and author.id in guild.members:
                data["member"] = self._member(guild, author)
        for session in self._sessions_for(channel.guild_id):
            if session.intents & intent:
                shaped = data
                if not session.intents & INTENT_MESSAGE_CONTENT:
                    shaped = self._without_content(channel, data)
                self._send_event(session, event, shaped)

    def _dispatch_delete(self, channel: Channel, message: dict[str, Any]) -> None:
        data = {"id": message["id"], "channel_id": str(channel.id)}
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
        intent = INTENT_DIRECT_MESSAGES if channel.is_dm else INTENT_GUILD_MESSAGES
        for session in self._sessions_for(channel.guild_id):
            if session.intents & intent:
                self._send_event(session, "MESSAGE_DELETE", data)

    def _without_content(self, channel: Channel, message: dict[str, Any]) -> dict[str, Any]:
        """The message as an app without the MESSAGE_CONTENT intent sees it."""
        if channel.is_dm or int(message["author"]["id"]) == self.bot.id:
            return message
        if str(self.bot.id) in _ids(message.get("mentions", [])):
            return message
        blank = dict(message, content="", embeds=[], attachments=[], components=[])
        blank.pop("poll", None)
        return blank

    def _guild_create(self, guild: Guild) -> dict[str, Any]:
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [
                {
                    "id": str(guild.id),
                    "name": "@everyone",
                    "permissions": str(DEFAULT_PERMISSIONS),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "icon": None,
                    "unicode_emoji": None,
                    "flags": 0,
                }
            ],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "system_channel_id": str(guild.channels[0].id) if guild.channels else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "joined_at": guild.joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(guild.members),
            "voice_states": [],
            "members": [self._member(guild, self.bot) | {"user": self.bot.to_json()}],
            "channels": [channel.to_json(with_guild=False) for channel in guild.channels],
            "threads": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _member(self, guild: Guild, user: User) -> dict[str, Any]:
        return {
            "roles": [],
            "nick": None,
            "avatar": None,
            "banner": None,
            "premium_since": None,
            "joined_at": guild.joined_at,
            "pending": False,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "communication_disabled_until": None,
        }

    def _snowflake(self) -> int:
        milliseconds = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (milliseconds << 22) | (1 << 17) | (next(self._serial) & 0x1FFFF)


async def _read_body(request: web.Request) -> tuple[Any, list[Upload]]:
    """The JSON payload (or payload_json) and the file parts of a request."""
    if (request.content_length or 0) > REQUEST_MAX_BYTES:
        await _drain(request)
        raise _DiscordError(*_TOO_LARGE)
    if media_type(request) == "multipart/form-data":
        payload: dict[str, Any] = {}
        files: list[Upload] = []
        size = 0
        try:
            parts = await form_parts(request)
        except ValueError:
            raise _DiscordError(*_MALFORMED) from None
        for part in parts:
            size += len(part.data)
            if part.filename is not None:
                content_type = part.content_type or "application/octet-stream"
                files.append(Upload(part.name, part.filename, content_type, part.data))
            elif part.name == "payload_json":
                loaded = _json(part.data)
                if isinstance(loaded, dict):
                    payload |= loaded
            else:
                payload[part.name] = part.data.decode()
        if size > REQUEST_MAX_BYTES:
            raise _DiscordError(*_TOO_LARGE)
        return payload, files
    body = await request.read()
    if not body:
        return None, []
    return _json(body), []


async def _drain(request: web.Request) -> None:
    while await request.content.read(2**20):
        pass


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise _DiscordError(400, 50109, "The request body contains invalid JSON.") from None


def _object(payload: Any) -> dict[str, Any]:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise _form_error("", "DICT_TYPE_CONVERT", "Only dictionaries may be used.")
    return payload


def _content(payload: dict[str, Any], errors_at: str = "") -> str:
    content = payload.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        content = str(content)
    if len(content) > MESSAGE_MAX_CHARS:
        raise _form_error(
            f"{errors_at}content",
            "BASE_TYPE_MAX_LENGTH",
            f"Must be {MESSAGE_MAX_CHARS} or fewer in length.",
        )
    return content


def _components(payload: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The message's components, checked as Discord checks a message without IS_COMPONENTS_V2
    (at most 5 action rows of 1 to 5 buttons), each numbered with an ``id`` if it has none."""
    rows = payload.get("components") or []
    if not isinstance(rows, list):
        raise _form_error(path, "LIST_TYPE_CONVERT", "Only iterables may be used.")
    if len(rows) > ACTION_ROWS_MAX:
        raise _form_error(path, "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    custom_ids: set[str] = set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise _form_error(
                f"{path}.{index}", "DICT_TYPE_CONVERT", "Only dictionaries may be used."
            )
        if row.get("type") != COMPONENT_ACTION_ROW:
            raise _form_error(
                f"{path}.{index}",
                "UNION_TYPE_CHOICES",
                'Value of field "type" must be one of (1,).',
            )
        buttons = row.get("components")
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= ROW_BUTTONS_MAX:
            raise _form_error(
                f"{path}.{index}.components",
                "BASE_TYPE_BAD_LENGTH",
                f"Must be between 1 and {ROW_BUTTONS_MAX} in length.",
            )
        for position, button in enumerate(buttons):
            _check_button(button, f"{path}.{index}.components.{position}", custom_ids)
    return _numbered(rows)


def _check_button(button: Any, path: str, custom_ids: set[str]) -> None:
    """One button of an action row; its custom id joins ``custom_ids`` (unique in a message)."""

    def refuse(field: str, code: str, message: str) -> _DiscordError:
        return _form_error(f"{path}.{field}".rstrip("."), code, message)

    if not isinstance(button, dict):
        raise refuse("", "DICT_TYPE_CONVERT", "Only dictionaries may be used.")
    kind, style = button.get("type"), button.get("style")
    if kind in (3, 5, 6, 7, 8) or style == 6:  # select menus and premium buttons
        raise _DiscordError(400, 0, "The fake models buttons of styles 1 to 5 only")
    if kind != COMPONENT_BUTTON:
        choices = 'Value of field "type" must be one of (2, 3, 5, 6, 7, 8).'
        raise refuse("", "UNION_TYPE_CHOICES", choices)
    if style not in BUTTON_STYLES:
        raise refuse("style", "BASE_TYPE_CHOICES", "Value must be one of (1, 2, 3, 4, 5, 6).")
    label, emoji = button.get("label"), button.get("emoji")
    if label is not None and len(str(label)) > BUTTON_LABEL_MAX:
        too_long = f"Must be {BUTTON_LABEL_MAX} or fewer in length."
        raise refuse("label", "BASE_TYPE_MAX_LENGTH", too_long)
    if emoji is not None and not (
        isinstance(emoji, dict) and (emoji.get("name") or emoji.get("id"))
    ):
        raise refuse("emoji.name", "BUTTON_COMPONENT_INVALID_EMOJI", "Invalid emoji")
    if not label and emoji is None:
        raise refuse("label", "BASE_TYPE_REQUIRED", "This field is required")
    custom_id = button.get("custom_id")
    if style == BUTTON_LINK:
        if not button.get("url"):
            raise refuse("url", "BUTTON_COMPONENT_URL_REQUIRED", "A url is required")
        if custom_id is not None:
            both = "A custom id and url cannot both be specified"
            raise refuse("custom_id", "BUTTON_COMPONENT_CUSTOM_ID_URL_MUTUALLY_EXCLUSIVE", both)
        return
    if custom_id is None:
        raise refuse("custom_id", "BUTTON_COMPONENT_CUSTOM_ID_REQUIRED", "A custom id is required")
    if not 1 <= len(str(custom_id)) <= CUSTOM_ID_MAX:
        bad_length = f"Must be between 1 and {CUSTOM_ID_MAX} in length."
        raise refuse("custom_id", "BASE_TYPE_BAD_LENGTH", bad_length)
    if str(custom_id) in custom_ids:
        again = "Component custom id was already specified"
        raise refuse("custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED", again)
    custom_ids.add(str(custom_id))


def _numbered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with an ``id`` on every component that has none (or 0), counting from 1 in order
    and skipping the ids already taken, as Discord numbers them."""
    taken = {c.get("id") for row in rows for c in [row, *row["components"]]}
    fresh = (n for n in itertools.count(1) if n not in taken)
    numbered = []
    for row in rows:
        row_id = row.get("id") or next(fresh)
        buttons = [dict(button, id=button.get("id") or next(fresh)) for button in row["components"]]
        numbered.append(dict(row, id=row_id, components=buttons))
    return numbered


def _path_params(raw: dict[str, str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if key.endswith("_id"):
            if not _SNOWFLAKE.fullmatch(value):
                raise _form_error(key, "NUMBER_TYPE_COERCE", f'Value "{value}" is not snowflake.')
            params[key] = int(value)
        else:
            params[key] = value
    return params


def _snowflake_or_none(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _SNOWFLAKE.fullmatch(value):
        return int(value)
    return None


def _on_shard(shard: list[int] | None, guild_id: int | None) -> bool:
    """Whether a session on ``shard`` gets a guild's events (DMs' without a guild: shard 0)."""
    if shard is None:
        return True
    shard_id, count = shard
    return shard_id == (0 if guild_id is None else (guild_id >> 22) % count)


def _ids(users: Iterable[dict[str, Any]]) -> set[str]:
    return {str(user.get("id")) for user in users}


def _name_is(name: str) -> Callable[[Call], bool]:
    return lambda call: call.name == name


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _image_info(data: bytes) -> tuple[int, int, str] | None:
    """Width, height and MIME type of an image, or None for other bytes."""
    try:
        with Image.open(BytesIO(data)) as image:
            mime = Image.MIME.get(image.format or "", None)
            return image.width, image.height, mime or "application/octet-stream"
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _json_response(body: Any, status: int, headers: dict[str, str]) -> web.Response:
    # Exactly "application/json": discord.py parses no JSON under "...; charset=utf-8".
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers=headers | {"Content-Type": "application/json", "Via": "1.1 google"},
    )


def _error_response(error: _DiscordError, headers: dict[str, str] | None = None) -> web.Response:
    return _json_response(error.body, error.status, (headers or {}) | error.headers)


def _gateway_query_problem(query: dict[str, str]) -> tuple[int, str] | None:
    """The close code for a connection URL the gateway refuses, if it does."""
    if query.get("v", str(API_VERSION)) not in ("9", "10"):
        return 4012, "Invalid API version."
    if query.get("encoding", "json") != "json":
        return 4002, "Error while decoding payload."  # the fake speaks no ETF
    compression = query.get("compress")
    if compression not in (None, "zlib-stream", "zstd-stream"):
        return 4002, "Error while decoding payload."
    if compression == "zstd-stream" and _zstandard is None and _stdlib_zstd is None:
        return 4000, "The fake has no zstd module for zstd-stream."
    return None


def _compressor(compression: str | None) -> Callable[[bytes], bytes] | None:
    """One connection's stream compressor: each call returns one complete websocket message."""
    if compression == "zlib-stream":
        deflate = zlib.compressobj()
        return lambda data: deflate.compress(data) + deflate.flush(zlib.Z_SYNC_FLUSH)
    if compression == "zstd-stream":
        if _zstandard is not None:
            stream = _zstandard.ZstdCompressor().compressobj()
            flush = _zstandard.COMPRESSOBJ_FLUSH_BLOCK
            return lambda data: stream.compress(data) + stream.flush(flush)
        if _stdlib_zstd is not None:
            compressor = _stdlib_zstd.ZstdCompressor()
            mode = _stdlib_zstd.ZstdCompressor.FLUSH_BLOCK
            return lambda data: compressor.compress(data, mode)
    return None
