"""A fake Telegram Bot API on loopback, so the real python-telegram-bot runs in tests offline.

Point PTB at it with ``base_url(fake.base_url)`` and ``base_file_url(fake.base_file_url)``.
It speaks the wire format of ``api.telegram.org`` (form or multipart requests, ``{"ok": ...}``
answers with Telegram's error texts and HTTP statuses) for the methods the bot uses: long-polled
``getUpdates`` or a webhook, text, photos, documents, albums, edits, chat actions, commands and
file downloads, inline keyboards and the callback queries of their buttons, and it enforces
Telegram's limits:

==============================  =================================================================
limit                           answer
==============================  =================================================================
text over 4096 characters       400 ``message is too long`` (``MESSAGE_TOO_LONG`` for edits)
caption over 1024 characters    400 ``message caption is too long``
photo upload over 10 MiB        400 ``file of size N bytes is too big for a photo; ...``
file by URL over 5 MiB          400 ``failed to get HTTP URL content`` (so is one unreachable)
width + height > 10000          400 ``PHOTO_INVALID_DIMENSIONS`` (so is a side ratio over 20)
bytes that are not an image     400 ``IMAGE_PROCESS_FAILED``
album of 0, 1 or 11+ items      400 (Telegram's texts for 0 and 11+; 1 is the fake's own rule)
request body over 50 MiB        413 ``Request Entity Too Large``
``getFile`` over 20 MiB         400 ``file is too big`` (the bot download limit)
button without text or action   400 ``can't parse inline keyboard button: ...`` (Telegram's texts)
callback_data over 64 bytes     400 ``BUTTON_DATA_INVALID``
button URL not http(s)/tg/ton   400 ``inline keyboard button URL '...' is invalid: ...``
row over 8, keyboard over 100   400 (undocumented limits: the fake's own texts)
answer over 200 characters      400 ``MESSAGE_TOO_LONG``
answer twice, late or unknown   400 ``query is too old and response timeout expired or ...``
==============================  =================================================================

Characters are counted in UTF-16 code units after HTML tags are removed (``parse_mode=HTML``);
Markdown is counted as sent. Tests play the users (``send_text``, ``send_photo``, ``send_album``,
``send_document``, ``send_from_users``, ``press``), watch the bot (``sent``, ``wait_for``,
``messages_in``, ``chat_actions``, ``commands``, ``deliveries``, ``answered``) and inject faults
(``flood``, ``fail``) or forged webhook posts (``post_to_webhook``, ``press(forged=True)``).

Inline keyboards are kept on the messages as Telegram keeps them: a button keeps its text and its
first action only, a button with empty text and a row left empty are dropped, and
``editMessageText`` without ``reply_markup`` removes the keyboard. Albums carry none (Telegram
ignores ``reply_markup`` on ``sendMediaGroup``). Updates of kinds ``allowed_updates`` (of
``getUpdates`` or ``setWebhook``) leaves out are never queued, as on Telegram.

Once ``setWebhook`` stored a URL, updates are POSTed there as Telegram does: JSON, with the
secret in ``X-Telegram-Bot-Api-Secret-Token``, at most ``max_connections`` at once, and an update
answered other than 2xx is sent again after ``retry_seconds``; ``getUpdates`` then answers 409
until ``deleteWebhook``.

Photos keep the uploaded bytes: every size of a photo downloads the original, and the smaller
sizes report a file size in proportion to their area.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import json
import mimetypes
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from local import form_parts, media_type
from PIL import Image

DEFAULT_TOKEN = "123456789:AAFakeTelegramTokenForImagebotTests"
DEFAULT_BOT_USERNAME = "ImageTestBot"

TEXT_MAX_CHARS = 4096
CAPTION_MAX_CHARS = 1024
ALBUM_MAX_ITEMS = 10
PHOTO_MAX_BYTES = 10 * 2**20
BY_URL_MAX_BYTES = 5 * 2**20  # a photo sent by URL, fetched by Telegram
PHOTO_MAX_SIDES = 10_000  # width + height
PHOTO_MAX_RATIO = 20
UPLOAD_MAX_BYTES = 50 * 2**20
DOWNLOAD_MAX_BYTES = 20 * 2**20
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
WEBHOOK_TIMEOUT_SECONDS = 10.0
# core.telegram.org/bots/api#inlinekeyboardbutton: "callback_data ... 1-64 bytes".
CALLBACK_DATA_MAX_BYTES = 64
# Undocumented (PTB's telegram.constants.InlineKeyboardMarkupLimit says so too; tginfo's
# Telegram-Limits lists the same): at most 8 buttons in a row and 100 in a keyboard.
INLINE_ROW_MAX_BUTTONS = 8
INLINE_MAX_BUTTONS = 100
# core.telegram.org/bots/api#answercallbackquery: "text ... 0-200 characters".
ANSWER_TEXT_MAX_CHARS = 200
# Undocumented too: a query not answered within about 15 s expires (QUERY_ID_INVALID).
CALLBACK_ANSWER_SECONDS = 15.0

_THUMBNAIL_SIDES = (90, 320, 800)
_CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)
# Update kinds Telegram leaves out unless allowed_updates asks for them.
_OPT_IN_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
# PTB sends these as JSON text inside the form.
_JSON_PARAMS = frozenset(
    {
        "allowed_updates",
        "caption_entities",
        "commands",
        "entities",
        "link_preview_options",
        "media",
        "reaction",
        "reply_markup",
        "reply_parameters",
        "scope",
    }
)
_INT_PARAMS = frozenset(
    {
        "cache_time",
        "chat_id",
        "limit",
        "max_connections",
        "message_id",
        "message_thread_id",
        "offset",
        "reply_to_message_id",
    }
)
_COMMAND = re.compile(r"/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
_HTML_TAG = re.compile(r"<[^>]*>")
_CONFLICT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
_WEBHOOK_ACTIVE = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_HTTPS_WANTED = "An HTTPS URL must be provided for webhook"
_MEDIA_NOT_FOUND = "can't parse InputMedia: media not found"
_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
_QUERY_INVALID = "Bad Request: query is too old and response timeout expired or query ID is invalid"
_BUTTON_REFUSED = "Bad Request: can't parse inline keyboard button: "
# A button's actions, in the order the Bot API server tries them (tdlib/telegram-bot-api,
# Client::get_inline_keyboard_button): the first one set wins, so a button given two keeps the
# first although the Bot API documentation asks for exactly one. url and callback_data count as
# set only when not empty, the others whenever present.
_BUTTON_ACTIONS = (
    "url",
    "callback_data",
    "callback_game",
    "pay",
    "switch_inline_query",
    "switch_inline_query_chosen_chat",
    "switch_inline_query_current_chat",
    "login_url",
    "web_app",
    "copy_text",
)
_STRING_ACTIONS = frozenset({"url", "callback_data"})


@dataclass(frozen=True)
class User:
    """A person who writes to the bot."""

    id: int
    first_name: str
    username: str | None = None
    is_bot: bool = False

    def to_json(self) -> dict[str, Any]:
        user: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username:
            user["username"] = self.username
        return user


# The placeholder senders Telegram puts in ``from`` of messages sent on behalf of a chat.
GROUP_ANONYMOUS_BOT = User(1087968824, "Group", "GroupAnonymousBot", is_bot=True)
CHANNEL_BOT = User(136817688, "Channel", "Channel_Bot", is_bot=True)


@dataclass(frozen=True)
class Chat:
    """A chat the fake knows: private with ``user``, a supergroup (a forum if ``is_forum``) or,
    with ``channel``, a channel (public with a ``username``)."""

    id: int
    title: str | None = None
    user: User | None = None
    is_forum: bool = False
    channel: bool = False
    username: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.user is not None:
            chat = {"id": self.id, "type": "private", "first_name": self.user.first_name}
            if self.user.username:
                chat["username"] = self.user.username
            return chat
        chat = {
            "id": self.id,
            "type": "channel" if self.channel else "supergroup",
            "title": self.title,
        }
        if self.is_forum:
            chat["is_forum"] = True
        if self.username:
            chat["username"] = self.username
        return chat


@dataclass(frozen=True)
class Upload:
    """One file part of a multipart request."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Call:
    """One Bot API request of the bot (``getUpdates`` aside) and how the fake answered it."""

    method: str
    params: dict[str, Any]
    files: dict[str, Upload]
    at: float  # time.monotonic() when the request arrived
    result: Any = None
    error_code: int | None = None
    description: str | None = None

    @property
    def chat_id(self) -> int | str | None:
        return self.params.get("chat_id")

    @property
    def ok(self) -> bool:
        return self.error_code is None


class _ApiError(Exception):
    """An answer ``{"ok": false, ...}`` with Telegram's ``error_code`` and ``description``."""

    def __init__(
        self, code: int, description: str, parameters: dict[str, Any] | None = None
    ) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.code,
            "description": self.description,
        }
        if self.parameters:
            body["parameters"] = self.parameters
        return body


@dataclass(frozen=True)
class Webhook:
    """What ``setWebhook`` stored."""

    url: str
    secret_token: str | None
    max_connections: int


@dataclass(frozen=True)
class Delivery:
    """One POST of an update to the webhook and the bot's answer."""

    update_id: int
    chat_id: int
    message_id: int  # the message sent, or the one whose button was pressed
    secret_token: str | None  # the header sent; None when there was none
    status: int | None  # None: no HTTP answer (connection refused, timeout)
    at: float  # time.monotonic() when the POST began
    seconds: float  # until the answer
    callback_query_id: str | None = None  # set when the update is a button press

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class CallbackAnswer:
    """What answerCallbackQuery said to a button press, and how long after the press."""

    text: str | None
    show_alert: bool
    url: str | None
    cache_time: int
    seconds: float  # from press() to the answer


@dataclass(frozen=True)
class _StoredFile:
    data: bytes
    size: int  # what Telegram reports, which may differ from len(data)
    unique_id: str
    path: str
    file_name: str
    mime_type: str


class _Input(NamedTuple):
    """A file a request sends: a fresh upload or one already stored, named by its file_id."""

    data: bytes
    file_name: str
    mime_type: str


class _Photo(NamedTuple):
    data: bytes
    width: int
    height: int
    extension: str


@dataclass
class _ChatState:
    chat: Chat
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_message_id: int = 0
    # What each bot text message was sent as, to tell an edit that changes nothing.
    sources: dict[int, str] = field(default_factory=dict)
    # The chat's identifier in callback queries: a signed 64-bit number, as a string.
    chat_instance: str = field(default_factory=lambda: str(-secrets.randbits(63)))


_Handler = Callable[[dict[str, Any], dict[str, Upload]], Awaitable[Any]]


class FakeTelegram:
    """A Telegram Bot API server on loopback that records every call and plays the users."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_username: str = DEFAULT_BOT_USERNAME,
        bot_name: str = "Image Test Bot",
    ) -> None:
        self.token = token
        self.bot_username = bot_username
        self.bot_id = int(token.partition(":")[0])
        self.sent: list[Call] = []
        self.url = ""  # the server root, once started
        self.base_url = ""  # for Bot(base_url=...): ends in /bot, PTB appends the token
        self.base_file_url = ""  # for Bot(base_file_url=...): ends in /file/bot
        self._bot_user = {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": bot_name,
            "username": bot_username,
        }
        self._chats: dict[int, _ChatState] = {}
        self._files: dict[str, _StoredFile] = {}
        self._paths: dict[str, _StoredFile] = {}  # file_path -> file, once getFile gave it out
        self._serial = itertools.count(1)
        self._updates: deque[dict[str, Any]] = deque()
        self._last_update_id = 0
        self._allowed_updates: frozenset[str] = frozenset()
        self._poll_generation = 0
        self._closing = False
        self._update_arrived = asyncio.Event()
        self._call_arrived = asyncio.Event()
        # (chat id, message id) -> time.monotonic() of the first getUpdates answer holding it
        self._handed_out: dict[tuple[int, int], float] = {}
        self.polls_waiting = 0  # getUpdates calls held open right now (long polls)
        self._faults: dict[str, deque[_ApiError]] = {}
        self._commands: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.webhook: Webhook | None = None
        self.deliveries: list[Delivery] = []
        self.retry_seconds = 0.2  # Telegram waits longer before sending a refused update again
        self._last_webhook_error: tuple[int, str] | None = None
        self._connections = asyncio.Semaphore(1)
        self._delivering: set[int] = set()  # update ids on their way to the webhook
        self._deliveries: set[asyncio.Task[None]] = set()
        self._delivered = asyncio.Event()
        self.answer_window = CALLBACK_ANSWER_SECONDS  # a test may shorten it
        self._pressed: dict[str, float] = {}  # callback query id -> time.monotonic() of press()
        self._answers: dict[str, CallbackAnswer] = {}
        self._client: ClientSession | None = None
        # The web as Telegram's servers see it: a public origin -> the loopback server playing
        # it. Files sent by URL are fetched from there; ``fetched`` lists the URLs fetched.
        self.internet: dict[str, str] = {}
        self.fetched: list[str] = []
        self._user_ids = itertools.count(700_001)
        self._methods: dict[str, tuple[str, _Handler]] = {
            name.lower(): (name, handler)
            for name, handler in {
                "getMe": self._get_me,
                "getUpdates": self._get_updates,
                "setWebhook": self._set_webhook,
                "deleteWebhook": self._delete_webhook,
                "getWebhookInfo": self._get_webhook_info,
                "setMyCommands": self._set_my_commands,
                "getMyCommands": self._get_my_commands,
                "sendMessage": self._send_message,
                "editMessageText": self._edit_message_text,
                "editMessageReplyMarkup": self._edit_message_reply_markup,
                "answerCallbackQuery": self._answer_callback_query,
                "deleteMessage": self._delete_message,
                "sendChatAction": self._send_chat_action,
                "sendPhoto": self._send_photo,
                "sendDocument": self._send_document,
                "sendMediaGroup": self._send_media_group,
                "getFile": self._get_file,
                "setMessageReaction": self._set_message_reaction,
            }.items()
        }
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=UPLOAD_MAX_BYTES + 2**20)
        self.app.add_routes(
            [
                web.post("/bot{token}/{method}", self._api),
                web.get("/bot{token}/{method}", self._api),
                web.get("/file/bot{token}/{path:.+}", self._download),
            ]
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 = any free port) and set the URLs to give PTB."""
        # Cancelling a handler when its client hangs up ends an abandoned long poll at once.
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        self.base_url = f"{self.url}/bot"
        self.base_file_url = f"{self.url}/file/bot"
        self._client = ClientSession(timeout=ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS))

    async def close(self) -> None:
        self._closing = True
        self._wake_polls()
        for task in self._deliveries:
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Users and chats

    def private_chat(self, user_id: int, first_name: str, username: str | None = None) -> Chat:
        """A private chat with a new user (``chat.user``); its id is the user's."""
        return self._add_chat(Chat(user_id, user=User(user_id, first_name, username)))

    def group_chat(self, chat_id: int, title: str, forum: bool = False) -> Chat:
        """A supergroup (a forum with topics if ``forum``) the bot is a member of."""
        return self._add_chat(Chat(chat_id, title=title, is_forum=forum))

    def channel_chat(self, chat_id: int, title: str, username: str | None = None) -> Chat:
        """A channel the bot is in; it may also write in groups (``send_text(sender_chat=...)``)."""
        return self._add_chat(Chat(chat_id, title=title, channel=True, username=username))

    def send_text(
        self,
        chat: Chat,
        user: User,
        text: str,
        *,
        reply_to: int | None = None,
        thread_id: int | None = None,
        sender_chat: Chat | None = None,
    ) -> dict[str, Any]:
        """Deliver ``user``'s text message as an update; a leading /command gets its entity.

        With ``sender_chat`` it is sent on behalf of a chat, as Telegram shows it: an anonymous
        group admin is the group itself from ``GROUP_ANONYMOUS_BOT``, a channel is itself from
        ``CHANNEL_BOT``.
        """
        content: dict[str, Any] = {"text": text, **_command_entity("entities", text)}
        if sender_chat is not None:
            content["sender_chat"] = sender_chat.to_json()
        return self._incoming(chat, user, content, reply_to=reply_to, thread_id=thread_id)

    def send_photo(
        self,
        chat: Chat,
        user: User,
        image: bytes,
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | None = None,
        thread_id: int | None = None,
    ) -> dict[str, Any]:
        """Deliver a photo as Telegram does: sizes smallest first, the original last."""
        content: dict[str, Any] = {"photo": self._photo_sizes(_read_photo(image))}
        if caption is not None:
            content |= {"caption": caption, **_command_entity("caption_entities", caption)}
        if media_group_id is not None:
            content["media_group_id"] = media_group_id
        return self._incoming(chat, user, content, reply_to=reply_to, thread_id=thread_id)

    def send_album(
        self, chat: Chat, user: User, images: list[bytes], caption: str | None = None
    ) -> list[dict[str, Any]]:
        """Deliver photos as one album: an update each, one media_group_id, caption on the first."""
        album_id = self._album_id()
        return [
            self.send_photo(
                chat, user, image, caption=caption if index == 0 else None, media_group_id=album_id
            )
            for index, image in enumerate(images)
        ]

    def send_document(
        self,
        chat: Chat,
        user: User,
        data: bytes,
        file_name: str,
        mime_type: str,
        caption: str | None = None,
        *,
        reply_to: int | None = None,
        thread_id: int | None = None,
        size_override: int | None = None,
    ) -> dict[str, Any]:
        """Deliver a file sent as a document; ``size_override`` fakes a big one cheaply."""
        document = self._store(
            data, "documents", file_name=file_name, mime_type=mime_type, size=size_override
        )
        content: dict[str, Any] = {
            "document": {"file_name": file_name, "mime_type": mime_type, **document}
        }
        if caption is not None:
            content |= {"caption": caption, **_command_entity("caption_entities", caption)}
        return self._incoming(chat, user, content, reply_to=reply_to, thread_id=thread_id)

    def send_from_users(self, count: int, text: str) -> list[dict[str, Any]]:
        """``count`` new users each send ``text`` in their private chat: one update each."""
        messages = []
        for _ in range(count):
            user_id = next(self._user_ids)
            chat = self.private_chat(user_id, f"User {user_id}", f"user{user_id}")
            assert chat.user is not None
            messages.append(self.send_text(chat, chat.user, text))
        return messages

    async def post_to_webhook(
        self, chat: Chat, user: User, text: str, *, secret_token: str | None
    ) -> Delivery:
        """POST a text message to the webhook as anyone who learnt its URL could, with this
        ``secret_token`` header (None: no header). It is never queued nor sent again."""
        if self.webhook is None:
            raise ValueError("no webhook is set")
        content = {"text": text, **_command_entity("entities", text)}
        message = self._message(self._chats[chat.id], user.to_json(), content, None, None)
        self._last_update_id += 1
        update = {"update_id": self._last_update_id, "message": message}
        return await self._post(self.webhook.url, update, secret_token)

    def press(
        self, message: dict[str, Any], user: User, callback_data: str, *, forged: bool = False
    ) -> dict[str, Any]:
        """``user`` presses the button with ``callback_data`` under ``message``: deliver the
        callback query (the message as it stands now) and return it.

        The data must be on the message's keyboard unless ``forged``: then anything is sent, as a
        modified client could, for tests that show the bot refuses it.
        """
        state = self._chats[message["chat"]["id"]]
        current = state.messages.get(message["message_id"])
        if current is None:
            raise ValueError(f"no message {message['message_id']} to press a button of")
        offered = [
            button.get("callback_data")
            for row in current.get("reply_markup", {}).get("inline_keyboard", [])
            for button in row
        ]
        if not forged and callback_data not in offered:
            raise ValueError(f"no button {callback_data!r} on that message (forged=True sends it)")
        query = {
            "id": str(4 * 10**18 + next(self._serial)),
            "from": user.to_json(),
            "message": current,
            "chat_instance": state.chat_instance,
            "data": callback_data,
        }
        self._pressed[query["id"]] = time.monotonic()
        self._push_update("callback_query", query)
        return query

    def register_file(self, data: bytes, size_override: int | None = None) -> str:
        """Store a file and return its file_id; ``size_override`` is the size Telegram reports."""
        return self._store(data, "documents", size=size_override)["file_id"]

    # Watching the bot

    async def wait_for(
        self,
        predicate: str | Callable[[Call], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 (a deadline for the call to arrive, as tests read it)
        *,
        since: int = 0,
    ) -> Call:
        """The first call from ``sent[since:]`` that matches (a method name or a predicate).

        Waits for it to arrive; raises TimeoutError after ``timeout`` seconds.
        """
        matches = _method_is(predicate) if isinstance(predicate, str) else predicate
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = since
        while True:
            while index < len(self.sent):
                call = self.sent[index]
                index += 1
                if matches(call):
                    return call
            arrived = self._call_arrived
            try:
                await asyncio.wait_for(arrived.wait(), deadline - loop.time())
            except TimeoutError:
                recent = [call.method for call in self.sent[-10:]]
                message = f"no matching Bot API call in {timeout}s; the last ones: {recent}"
                raise TimeoutError(message) from None

    def calls(self, method: str) -> list[Call]:
        """The bot's calls of ``method``, in order."""
        return [call for call in self.sent if call.method == method]

    def delete_message(self, message: dict[str, Any]) -> None:
        """Its sender deletes ``message``: it leaves the chat, and replies to it are refused
        (unless sent with allow_sending_without_reply). Telegram tells bots nothing of it."""
        del self._chats[message["chat"]["id"]].messages[message["message_id"]]

    def messages_in(self, chat: Chat | int) -> list[dict[str, Any]]:
        """The chat's messages as they stand (edits applied, deletions gone), oldest first."""
        return list(self._chats[chat if isinstance(chat, int) else chat.id].messages.values())

    @property
    def chat_actions(self) -> list[tuple[int | str | None, str]]:
        """(chat_id, action) of every accepted sendChatAction, in order."""
        return [
            (call.chat_id, call.params["action"])
            for call in self.sent
            if call.method == "sendChatAction" and call.ok
        ]

    @property
    def commands(self) -> list[dict[str, str]]:
        """The commands setMyCommands stored for the default scope and no language_code."""
        return self.commands_for()

    def commands_for(
        self, scope: dict[str, Any] | None = None, language_code: str = ""
    ) -> list[dict[str, str]]:
        return self._commands.get((_scope_key(scope), language_code), [])

    def answered(self, callback_query: dict[str, Any]) -> CallbackAnswer | None:
        """How the bot answered ``callback_query`` (as ``press`` returns it); None until it did."""
        return self._answers.get(callback_query["id"])

    def handed_at(self, message: dict[str, Any]) -> float | None:
        """When the update carrying ``message`` (as ``send_text`` returns it, or a callback query
        as ``press`` does) first went to the bot in a getUpdates answer or a webhook POST it
        accepted, in ``time.monotonic()``; None until it has."""
        return self._handed_out.get(_subject(message))

    def deliveries_of(self, message: dict[str, Any]) -> list[Delivery]:
        """Every webhook POST of the update carrying ``message`` (or callback query), in order."""
        key = _subject(message)
        return [d for d in self.deliveries if (d.chat_id, d.message_id, d.callback_query_id) == key]

    async def wait_delivered(
        self,
        messages: list[dict[str, Any]],
        timeout: float = 10.0,  # noqa: ASYNC109 (a deadline, as tests read it)
    ) -> None:
        """Wait until the webhook accepted (2xx) the update of each of ``messages`` (or callback
        queries)."""

        def accepted(message: dict[str, Any]) -> bool:
            return any(delivery.ok for delivery in self.deliveries_of(message))

        async with asyncio.timeout(timeout):
            while not all(accepted(message) for message in messages):
                await self._delivered.wait()

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        """Updates waiting for the bot: not yet confirmed by a getUpdates offset nor accepted by
        the webhook."""
        return list(self._updates)

    # Faults

    def flood(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` 429 with ``retry_after``."""
        error = _ApiError(
            429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}
        )
        self._faults.setdefault(method.lower(), deque()).extend([error] * times)

    def fail(self, method: str, error_code: int, description: str, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with this error."""
        error = _ApiError(error_code, description)
        self._faults.setdefault(method.lower(), deque()).extend([error] * times)

    # HTTP

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _failure(_ApiError(401, "Unauthorized"))
        arrived = time.monotonic()
        name = request.match_info["method"]
        method, handler = self._methods.get(name.lower(), (name, None))
        try:
            params, files = await _read_params(request)
        except _ApiError as exc:
            return _failure(exc)
        try:
            if handler is None:
                raise _ApiError(404, "Not Found")
            faults = self._faults.get(method.lower())
            if faults:
                raise faults.popleft()
            result = await handler(params, files)
        except _ApiError as exc:
            self._record(
                Call(
                    method, params, files, arrived, error_code=exc.code, description=exc.description
                )
            )
            return _failure(exc)
        self._record(Call(method, params, files, arrived, result=result))
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _failure(_ApiError(401, "Unauthorized"))
        stored = self._paths.get(request.match_info["path"])
        if stored is None:
            return _failure(_ApiError(404, "Not Found"))
        return web.Response(body=stored.data, content_type="application/octet-stream")

    def _record(self, call: Call) -> None:
        if call.method == "getUpdates":
            return  # polls would drown out what the bot did
        self.sent.append(call)
        self._call_arrived.set()
        self._call_arrived = asyncio.Event()

    # Bot API methods

    async def _get_me(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        return {
            **self._bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _get_updates(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        if self.webhook is not None:
            raise _ApiError(409, _WEBHOOK_ACTIVE)
        offset = _int_param(params, "offset", 0)
        limit = min(max(_int_param(params, "limit", 100), 1), 100)
        timeout = float(params.get("timeout") or 0)
        allowed = params.get("allowed_updates")
        if isinstance(allowed, list):
            self._allowed_updates = frozenset(map(str, allowed))
        if offset < 0:
            while len(self._updates) > -offset:
                self._updates.popleft()
        else:
            while self._updates and self._updates[0]["update_id"] < offset:
                self._updates.popleft()
        # As on Telegram, a new poll ends the one still waiting, which answers 409.
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake_polls()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.polls_waiting += 1
        try:
            while not self._updates and not self._closing and loop.time() < deadline:
                arrived = self._update_arrived
                try:
                    await asyncio.wait_for(arrived.wait(), deadline - loop.time())
                except TimeoutError:
                    break
                if generation != self._poll_generation:
                    raise _ApiError(409, _CONFLICT)
        finally:
            self.polls_waiting -= 1
        updates = list(itertools.islice(self._updates, limit))
        now = time.monotonic()
        for update in updates:
            self._handed_out.setdefault(_update_subject(update), now)
        return updates

    async def _set_webhook(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        url = str(params.get("url") or "")
        if not url:
            return await self._delete_webhook(params, files)  # as Telegram: "" removes it
        where = urlsplit(url)
        if where.scheme != "https" and not (where.scheme == "http" and where.hostname in _LOOPBACK):
            # Telegram wants HTTPS; the fake also takes plain http to loopback, where tests listen.
            raise _ApiError(400, f"Bad Request: bad webhook: {_HTTPS_WANTED}")
        secret = params.get("secret_token")
        if secret is not None and not _SECRET_TOKEN.fullmatch(str(secret)):
            raise _ApiError(400, "Bad Request: secret token contains unallowed characters")
        allowed = params.get("allowed_updates")
        if isinstance(allowed, list):
            self._allowed_updates = frozenset(map(str, allowed))
        if _is_true(params.get("drop_pending_updates")):
            self._updates.clear()
        connections = min(max(_int_param(params, "max_connections", 40), 1), 100)
        self.webhook = Webhook(url, None if secret is None else str(secret), connections)
        self._connections = asyncio.Semaphore(connections)
        self._deliver_pending()
        return True

    async def _delete_webhook(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        self.webhook = None
        if _is_true(params.get("drop_pending_updates")):
            self._updates.clear()
        return True

    async def _get_webhook_info(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        info: dict[str, Any] = {
            "url": self.webhook.url if self.webhook else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }
        if self.webhook is not None:
            info["max_connections"] = self.webhook.max_connections
            if self._allowed_updates:
                info["allowed_updates"] = sorted(self._allowed_updates)
        if self._last_webhook_error is not None:
            info["last_error_date"], info["last_error_message"] = self._last_webhook_error
        return info

    async def _set_my_commands(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _ApiError(400, 'Bad Request: parameter "commands" is required')
        for command in commands:
            name = command.get("command") if isinstance(command, dict) else None
            if not isinstance(name, str) or not _COMMAND_NAME.fullmatch(name):
                raise _ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
        key = (_scope_key(params.get("scope")), str(params.get("language_code") or ""))
        self._commands[key] = [
            {"command": command["command"], "description": command.get("description", "")}
            for command in commands
        ]
        return True

    async def _get_my_commands(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        return self.commands_for(params.get("scope"), str(params.get("language_code") or ""))

    async def _send_message(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        state = self._chat_state(params)
        content = _text_content(params, "Bad Request: message is too long")
        message = self._outgoing(state, params, content | _inline_markup(params))
        state.sources[message["message_id"]] = _source(params)
        return message

    async def _edit_message_text(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        """Replace the text, and the keyboard with ``reply_markup``: without one (as on
        Telegram) the message is left with none."""
        state = self._chat_state(params)
        markup = _inline_markup(params)
        old = self._editable(state, params)
        if "text" not in old:
            raise _ApiError(400, "Bad Request: there is no text in the message to edit")
        content = _text_content(params, "Bad Request: MESSAGE_TOO_LONG")
        source = _source(params)
        if state.sources.get(old["message_id"]) == source and _same_markup(old, markup):
            raise _ApiError(400, _NOT_MODIFIED)
        edited = {
            key: value
            for key, value in old.items()
            if key not in ("text", "entities", "reply_markup")
        }
        edited |= content | {"edit_date": int(time.time())} | markup
        state.messages[old["message_id"]] = edited
        state.sources[old["message_id"]] = source
        return edited

    async def _edit_message_reply_markup(
        self, params: dict[str, Any], files: dict[str, Upload]
    ) -> Any:
        """Replace the keyboard of any bot message; without ``reply_markup``, remove it."""
        state = self._chat_state(params)
        markup = _inline_markup(params)
        old = self._editable(state, params)
        if _same_markup(old, markup):
            raise _ApiError(400, _NOT_MODIFIED)
        edited = {key: value for key, value in old.items() if key != "reply_markup"}
        edited |= {"edit_date": int(time.time())} | markup
        state.messages[old["message_id"]] = edited
        return edited

    async def _answer_callback_query(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        """Record the answer; a query answered already, unknown or older than
        ``answer_window`` is refused, as Telegram refuses it."""
        text = params.get("text")
        if isinstance(text, str) and _utf16_length(text) > ANSWER_TEXT_MAX_CHARS:
            raise _ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        query_id = str(params.get("callback_query_id") or "")
        pressed = self._pressed.get(query_id)
        now = time.monotonic()
        if pressed is None or query_id in self._answers or now - pressed > self.answer_window:
            raise _ApiError(400, _QUERY_INVALID)
        url = params.get("url")
        self._answers[query_id] = CallbackAnswer(
            text if isinstance(text, str) and text else None,
            _is_true(params.get("show_alert")),
            url if isinstance(url, str) and url else None,
            _int_param(params, "cache_time", 0),
            now - pressed,
        )
        return True

    async def _delete_message(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        state = self._chat_state(params)
        if params.get("message_id") not in state.messages:
            raise _ApiError(400, "Bad Request: message to delete not found")
        del state.messages[params["message_id"]]
        return True

    async def _send_chat_action(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        self._chat_state(params)
        if params.get("action") not in _CHAT_ACTIONS:
            raise _ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    async def _send_photo(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        state = self._chat_state(params)
        markup = _inline_markup(params)
        source = await self._input_file(params, files, "photo", "there is no photo in the request")
        caption = _caption_content(params.get("caption"), params.get("parse_mode"))
        photo = _check_photo(source.data)
        content = {"photo": self._photo_sizes(photo), **caption, **markup}
        return self._outgoing(state, params, content)

    async def _send_document(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        state = self._chat_state(params)
        markup = _inline_markup(params)
        missing = "there is no document in the request"
        source = await self._input_file(params, files, "document", missing)
        caption = _caption_content(params.get("caption"), params.get("parse_mode"))
        content = {"document": self._document(source), **caption, **markup}
        return self._outgoing(state, params, content)

    async def _send_media_group(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        """Send an album; Telegram's sendMediaGroup has no reply_markup and ignores one."""
        state = self._chat_state(params)
        media = params.get("media")
        if not media:
            raise _ApiError(400, "Bad Request: there are no messages to send")
        if not isinstance(media, list) or not all(isinstance(item, dict) for item in media):
            raise _ApiError(400, "Bad Request: can't parse media JSON object")
        if len(media) > ALBUM_MAX_ITEMS:
            raise _ApiError(400, "Bad Request: too many messages to send as an album")
        if len(media) < 2:
            # Telegram sends a lone item outside any album; its documentation asks for 2-10.
            raise _ApiError(400, "Bad Request: an album needs 2-10 items (fake's rule)")
        kinds = {item.get("type") for item in media}
        unsupported = kinds - {"photo", "document"}
        if unsupported:
            kind = unsupported.pop()
            raise _ApiError(
                400, f"Bad Request: the fake has no {kind!r} albums, only photos or documents"
            )
        if "document" in kinds and len(kinds) > 1:
            raise _ApiError(400, "Bad Request: document can't be mixed with other media types")
        # Check every item before sending any: a refused album sends nothing.
        checked: list[tuple[dict[str, Any], _Input, _Photo | None]] = []
        for item in media:
            source = await self._input_file(item, files, "media", _MEDIA_NOT_FOUND)
            caption = _caption_content(item.get("caption"), item.get("parse_mode"))
            photo = _check_photo(source.data) if item["type"] == "photo" else None
            checked.append((caption, source, photo))
        album_id = self._album_id()
        messages = []
        for caption, source, photo in checked:
            if photo is not None:
                content = {"photo": self._photo_sizes(photo)}
            else:
                content = {"document": self._document(source)}
            content |= caption | {"media_group_id": album_id}
            messages.append(self._outgoing(state, params, content))
        return messages

    async def _get_file(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        file_id = params.get("file_id")
        stored = self._files.get(file_id) if isinstance(file_id, str) else None
        if stored is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        if stored.size > DOWNLOAD_MAX_BYTES:
            raise _ApiError(400, "Bad Request: file is too big")
        self._paths[stored.path] = stored
        return {
            "file_id": file_id,
            "file_unique_id": stored.unique_id,
            "file_size": stored.size,
            "file_path": stored.path,
        }

    async def _set_message_reaction(self, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        state = self._chat_state(params)
        if params.get("message_id") not in state.messages:
            raise _ApiError(400, "Bad Request: message to react not found")
        return True

    # Messages, updates and files

    def _add_chat(self, chat: Chat) -> Chat:
        self._chats[chat.id] = _ChatState(chat)
        return chat

    def _editable(self, state: _ChatState, params: dict[str, Any]) -> dict[str, Any]:
        """The bot message ``message_id`` names, which the bot may edit."""
        message_id = params.get("message_id")
        message = state.messages.get(message_id) if isinstance(message_id, int) else None
        if message is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if message["from"]["id"] != self.bot_id:
            raise _ApiError(400, "Bad Request: message can't be edited")
        return message

    def _chat_state(self, params: dict[str, Any]) -> _ChatState:
        chat_id = params.get("chat_id")
        if chat_id is None or chat_id == "":
            raise _ApiError(400, "Bad Request: chat_id is empty")
        state = self._chats.get(chat_id) if isinstance(chat_id, int) else None
        if state is None:
            raise _ApiError(400, "Bad Request: chat not found")
        return state

    def _incoming(
        self,
        chat: Chat,
        user: User,
        content: dict[str, Any],
        *,
        reply_to: int | None,
        thread_id: int | None,
    ) -> dict[str, Any]:
        state = self._chats.get(chat.id)
        if state is None:
            raise ValueError(f"unknown chat {chat.id}: make it with private_chat or group_chat")
        reply = None
        if reply_to is not None:
            if reply_to not in state.messages:
                raise ValueError(f"no message {reply_to} in chat {chat.id} to reply to")
            reply = _without_reply(state.messages[reply_to])
        message = self._message(state, user.to_json(), content, thread_id, reply)
        self._push_update("message", message)
        return message

    def _outgoing(
        self, state: _ChatState, params: dict[str, Any], content: dict[str, Any]
    ) -> dict[str, Any]:
        thread_id = params.get("message_thread_id")
        reply = self._reply_target(state, params)
        return self._message(
            state,
            self._bot_user,
            content,
            thread_id if isinstance(thread_id, int) else None,
            reply,
        )

    def _message(
        self,
        state: _ChatState,
        sender: dict[str, Any],
        content: dict[str, Any],
        thread_id: int | None,
        reply: dict[str, Any] | None,
    ) -> dict[str, Any]:
        state.last_message_id += 1
        message: dict[str, Any] = {
            "message_id": state.last_message_id,
            "from": sender,
            "chat": state.chat.to_json(),
            "date": int(time.time()),
        }
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            if state.chat.is_forum:
                message["is_topic_message"] = True
        if reply is not None:
            message["reply_to_message"] = reply
        message |= content
        state.messages[message["message_id"]] = message
        return message

    def _reply_target(self, state: _ChatState, params: dict[str, Any]) -> dict[str, Any] | None:
        """The message the bot replies to, from reply_parameters or reply_to_message_id."""
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            message_id = reply.get("message_id")
            lenient = reply.get("allow_sending_without_reply") is True
        elif "reply_to_message_id" in params:
            message_id = params["reply_to_message_id"]
            lenient = _is_true(params.get("allow_sending_without_reply"))
        else:
            return None
        target = state.messages.get(message_id) if isinstance(message_id, int) else None
        if target is None:
            if lenient:
                return None
            raise _ApiError(400, "Bad Request: message to be replied not found")
        return _without_reply(target)

    def _push_update(self, kind: str, payload: dict[str, Any]) -> None:
        wanted = (
            kind in self._allowed_updates if self._allowed_updates else kind not in _OPT_IN_UPDATES
        )
        if not wanted:
            return
        self._last_update_id += 1
        self._updates.append({"update_id": self._last_update_id, kind: payload})
        self._wake_polls()
        self._deliver_pending()

    def _deliver_pending(self) -> None:
        """POST every pending update not yet on its way, if a webhook is set."""
        if self.webhook is None or self._closing:
            return
        for update in self._updates:
            if update["update_id"] not in self._delivering:
                self._delivering.add(update["update_id"])
                task = asyncio.create_task(self._deliver(update))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, update: dict[str, Any]) -> None:
        """POST ``update`` until the webhook accepts it (or is deleted), as Telegram does."""
        try:
            while (webhook := self.webhook) is not None:
                async with self._connections:
                    delivery = await self._post(webhook.url, update, webhook.secret_token)
                if delivery.ok:
                    with contextlib.suppress(ValueError):  # dropped meanwhile
                        self._updates.remove(update)
                    self._handed_out.setdefault(_update_subject(update), delivery.at)
                    return
                await asyncio.sleep(self.retry_seconds)
        finally:
            self._delivering.discard(update["update_id"])

    async def _post(self, url: str, update: dict[str, Any], secret_token: str | None) -> Delivery:
        assert self._client is not None, "start() the fake first"
        headers = {} if secret_token is None else {SECRET_HEADER: secret_token}
        started = time.monotonic()
        try:
            async with self._client.post(url, json=update, headers=headers) as answer:
                status: int | None = answer.status
                error = f"Wrong response from the webhook: {answer.status} {answer.reason}"
        except (ClientError, TimeoutError) as exc:
            status, error = None, f"Connection failed: {type(exc).__name__}"
        chat_id, message_id, callback_query_id = _update_subject(update)
        delivery = Delivery(
            update["update_id"],
            chat_id,
            message_id,
            secret_token,
            status,
            started,
            time.monotonic() - started,
            callback_query_id,
        )
        self.deliveries.append(delivery)
        if not delivery.ok:
            self._last_webhook_error = (int(time.time()), error)
        self._delivered.set()
        self._delivered = asyncio.Event()
        return delivery

    def _wake_polls(self) -> None:
        self._update_arrived.set()
        self._update_arrived = asyncio.Event()

    def _album_id(self) -> str:
        return str(10**17 + next(self._serial))

    async def _input_file(
        self, params: dict[str, Any], files: dict[str, Upload], name: str, missing: str
    ) -> _Input:
        """The file a parameter names: its own part, ``attach://<part>``, a file_id or a URL
        (fetched as Telegram does, from the web ``internet`` routes)."""
        value = params.get(name)
        if value is None or (isinstance(value, str) and value.startswith("attach://")):
            upload = files.get(name if value is None else value.removeprefix("attach://"))
            if upload is None:
                raise _ApiError(400, f"Bad Request: {missing}")
            return _Input(upload.data, upload.filename, upload.content_type)
        stored = self._files.get(value) if isinstance(value, str) else None
        if stored is not None:
            return _Input(stored.data, stored.file_name, stored.mime_type)
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            return await self._fetch(value)
        raise _ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")

    async def _fetch(self, url: str) -> _Input:
        """Fetch a file by URL as Telegram's servers do (at most ``BY_URL_MAX_BYTES``), from
        the loopback server ``internet`` routes its origin to; any other origin is unreachable."""
        parts = urlsplit(url)
        local = self.internet.get(f"{parts.scheme}://{parts.netloc}")
        failed = _ApiError(400, "Bad Request: failed to get HTTP URL content")
        if local is None:
            raise failed
        assert self._client is not None
        chunks, size = [], 0
        try:
            async with self._client.get(local + parts.path) as answer:
                if answer.status != 200:
                    raise failed
                async for chunk in answer.content.iter_any():
                    size += len(chunk)
                    if size > BY_URL_MAX_BYTES:
                        raise failed
                    chunks.append(chunk)
        except (ClientError, TimeoutError):
            raise failed from None
        self.fetched.append(url)
        return _Input(b"".join(chunks), parts.path.rpartition("/")[2], answer.content_type)

    def _photo_sizes(self, photo: _Photo) -> list[dict[str, Any]]:
        """PhotoSize objects for ``photo``: thumbnails by longest side, then the original."""
        width, height, data = photo.width, photo.height, photo.data
        longest = max(width, height)
        sizes = []
        for side in _THUMBNAIL_SIDES:
            if side < longest:
                thumb_width = max(1, width * side // longest)
                thumb_height = max(1, height * side // longest)
                share = max(1, len(data) * thumb_width * thumb_height // (width * height))
                stored = self._store(data, "photos", extension=photo.extension, size=share)
                sizes.append({**stored, "width": thumb_width, "height": thumb_height})
        stored = self._store(data, "photos", extension=photo.extension)
        sizes.append({**stored, "width": width, "height": height})
        return sizes

    def _document(self, source: _Input) -> dict[str, Any]:
        stored = self._store(
            source.data, "documents", file_name=source.file_name, mime_type=source.mime_type
        )
        return {"file_name": source.file_name, "mime_type": source.mime_type, **stored}

    def _store(
        self,
        data: bytes,
        folder: str,
        *,
        extension: str | None = None,
        file_name: str | None = None,
        mime_type: str | None = None,
        size: int | None = None,
    ) -> dict[str, Any]:
        """Keep ``data`` under a new file_id and return the file's JSON fields."""
        serial = next(self._serial)
        if extension is None:
            extension = PurePosixPath(file_name or "").suffix
        file_name = file_name or f"file_{serial}{extension}"
        mime_type = mime_type or mimetypes.guess_type(file_name)[0] or "application/octet-stream"
        file_id = f"fake{serial}-{secrets.token_urlsafe(12)}"
        stored = _StoredFile(
            data=data,
            size=len(data) if size is None else size,
            unique_id=f"unique{serial}",
            path=f"{folder}/file_{serial}{extension}",
            file_name=file_name,
            mime_type=mime_type,
        )
        self._files[file_id] = stored
        return {"file_id": file_id, "file_unique_id": stored.unique_id, "file_size": stored.size}


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, Upload]]:
    """The request's parameters (JSON ones decoded, ids as ints) and its uploaded files."""
    raw: dict[str, Any] = dict(request.query)
    files: dict[str, Upload] = {}
    body_type = media_type(request)
    if body_type == "multipart/form-data":
        if (request.content_length or 0) > UPLOAD_MAX_BYTES:
            raise _ApiError(413, "Request Entity Too Large")
        try:
            parts = await form_parts(request)
        except ValueError:
            raise _ApiError(400, "Bad Request: can't parse multipart/form-data") from None
        for part in parts:
            if part.filename is None:
                # PTB sends its fields as UTF-8 without a charset
                raw[part.name] = part.data.decode()
            else:
                content_type = part.content_type or "application/octet-stream"
                files[part.name] = Upload(part.filename, content_type, part.data)
    elif body_type == "application/json":
        body = await request.json()
        if isinstance(body, dict):
            raw.update(body)
    elif request.body_exists:
        raw.update(await request.post())
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and key in _JSON_PARAMS:
            try:
                value = json.loads(value)
            except ValueError:
                raise _ApiError(400, f"Bad Request: can't parse {key} JSON object") from None
        elif isinstance(value, str) and key in _INT_PARAMS:
            with contextlib.suppress(ValueError):  # e.g. chat_id "@channel" stays a string
                value = int(value)
        params[key] = value
    return params, files


def _method_is(method: str) -> Callable[[Call], bool]:
    return lambda call: call.method == method


def _failure(error: _ApiError) -> web.Response:
    return web.json_response(error.to_json(), status=error.code)


def _read_photo(data: bytes) -> _Photo:
    """The image's size and file extension, from its header alone."""
    try:
        with Image.open(BytesIO(data)) as image:
            extension = "." + (image.format or "jpeg").lower().replace("jpeg", "jpg")
            return _Photo(data, image.width, image.height, extension)
    except (OSError, ValueError, Image.DecompressionBombError):
        raise _ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from None


def _check_photo(data: bytes) -> _Photo:
    """Read an uploaded photo, or refuse it as Telegram does."""
    if len(data) > PHOTO_MAX_BYTES:
        raise _ApiError(
            400,
            f"Bad Request: file of size {len(data)} bytes is too big for a photo; "
            f"the maximum size is {PHOTO_MAX_BYTES} bytes",
        )
    photo = _read_photo(data)
    short, long = sorted((photo.width, photo.height))
    if photo.width + photo.height > PHOTO_MAX_SIDES or long > PHOTO_MAX_RATIO * short:
        raise _ApiError(400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
    return photo


def _text_content(params: dict[str, Any], too_long: str) -> dict[str, Any]:
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _ApiError(400, "Bad Request: message text is empty")
    visible = _visible(text, params.get("parse_mode"))
    if _utf16_length(visible) > TEXT_MAX_CHARS:
        raise _ApiError(400, too_long)
    content: dict[str, Any] = {"text": visible}
    if params.get("entities"):
        content["entities"] = params["entities"]
    return content


def _caption_content(caption: object, parse_mode: object) -> dict[str, Any]:
    if not isinstance(caption, str) or not caption:
        return {}
    visible = _visible(caption, parse_mode)
    if _utf16_length(visible) > CAPTION_MAX_CHARS:
        raise _ApiError(400, "Bad Request: message caption is too long")
    return {"caption": visible}


def _visible(text: str, parse_mode: object) -> str:
    """The text a reader sees: HTML markup removed; Markdown is left as sent."""
    if isinstance(parse_mode, str) and parse_mode.lower() == "html":
        return html.unescape(_HTML_TAG.sub("", text))
    return text


def _utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _command_entity(key: str, text: str) -> dict[str, Any]:
    """``{key: [bot_command entity]}`` when ``text`` starts with a /command, else nothing."""
    match = _COMMAND.match(text)
    if match is None:
        return {}
    return {key: [{"type": "bot_command", "offset": 0, "length": _utf16_length(match[0])}]}


def _inline_markup(params: dict[str, Any]) -> dict[str, Any]:
    """``{"reply_markup": ...}`` as the message keeps it, or nothing: messages keep only inline
    keyboards, and one whose rows all end up empty is none."""
    markup = params.get("reply_markup")
    if markup is None:
        return {}
    if not isinstance(markup, dict):
        raise _ApiError(400, "Bad Request: object expected as reply markup")
    rows = markup.get("inline_keyboard")
    if rows is None:
        return {}
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise _ApiError(
            400,
            'Bad Request: field "inline_keyboard" of the InlineKeyboardMarkup must be an Array '
            "of Arrays",
        )
    parsed = [[_inline_button(button) for button in row] for row in rows]
    # tdlib (td/telegram/ReplyMarkup.cpp) drops buttons with empty text, then empty rows.
    kept = [row for row in ([b for b in row if b["text"]] for row in parsed) if row]
    for row in kept:
        for button in row:
            if "url" in button:
                _check_button_url(button["url"])
            data = button.get("callback_data")
            if isinstance(data, str) and len(data.encode()) > CALLBACK_DATA_MAX_BYTES:
                raise _ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        if len(row) > INLINE_ROW_MAX_BUTTONS:
            raise _ApiError(400, "Bad Request: more than 8 buttons in a row (fake's rule)")
    if sum(map(len, kept)) > INLINE_MAX_BUTTONS:
        raise _ApiError(400, "Bad Request: more than 100 buttons in a keyboard (fake's rule)")
    return {"reply_markup": {"inline_keyboard": kept}} if kept else {}


def _inline_button(button: object) -> dict[str, Any]:
    """A button as the Bot API server reads it: its text and the first action it has."""
    if not isinstance(button, dict):
        raise _ApiError(400, _BUTTON_REFUSED + "InlineKeyboardButton must be an Object")
    if "text" not in button:
        raise _ApiError(400, _BUTTON_REFUSED + 'Can\'t find field "text"')
    if not isinstance(button["text"], str):
        raise _ApiError(400, _BUTTON_REFUSED + 'Field "text" must be of type String')
    for action in _BUTTON_ACTIONS:
        value = button.get(action)
        if action in _STRING_ACTIONS and value is not None and not isinstance(value, str):
            raise _ApiError(400, _BUTTON_REFUSED + f'Field "{action}" must be of type String')
        is_set = bool(value) if action in _STRING_ACTIONS else action in button
        if is_set:
            return {"text": button["text"], action: value}
    raise _ApiError(400, _BUTTON_REFUSED + "Text buttons are unallowed in the inline keyboard")


def _check_button_url(url: str) -> None:
    """Refuse a button URL as tdlib's check_link does: http(s) (the default), tg or ton, and an
    http(s) host with a dot, so ``localhost`` is refused."""
    where = urlsplit(url if "://" in url else f"http://{url}")
    scheme = where.scheme.lower()
    if scheme in ("tg", "ton") or (scheme in ("http", "https") and "." in (where.hostname or "")):
        return
    reason = "Wrong HTTP URL" if scheme in ("http", "https") else "Unsupported URL protocol"
    raise _ApiError(400, f"Bad Request: inline keyboard button URL '{url}' is invalid: {reason}")


def _same_markup(message: dict[str, Any], markup: dict[str, Any]) -> bool:
    return message.get("reply_markup") == markup.get("reply_markup")


def _source(params: dict[str, Any]) -> str:
    fields = ("text", "parse_mode", "entities")
    return json.dumps([params.get(name) for name in fields], sort_keys=True)


def _subject(item: dict[str, Any]) -> tuple[int, int, str | None]:
    """(chat id, message id, callback query id or None) of a message, or of a callback query
    and the message of its button."""
    if "chat_instance" in item:
        return item["message"]["chat"]["id"], item["message"]["message_id"], item["id"]
    return item["chat"]["id"], item["message_id"], None


def _update_subject(update: dict[str, Any]) -> tuple[int, int, str | None]:
    return _subject(update.get("callback_query") or update["message"])


def _without_reply(message: dict[str, Any]) -> dict[str, Any]:
    """A replied-to message as Telegram nests it: without its own reply_to_message."""
    return {key: value for key, value in message.items() if key != "reply_to_message"}


def _scope_key(scope: object) -> str:
    return json.dumps(scope or {"type": "default"}, sort_keys=True)


def _int_param(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name)
    return value if isinstance(value, int) else default


def _is_true(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))
