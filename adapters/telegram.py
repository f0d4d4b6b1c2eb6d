"""Telegram adapter on python-telegram-bot's ``Application``: updates by long polling or by
webhook (several replicas behind one load balancer), and translation only.

A message (or an album, gathered first across replicas) becomes text + a way to fetch its
pictures for ``ImageBot.handle``, a button press (a callback query) ``ImageBot.press``; the
core's answers become replies in the same chat and forum topic, its buttons inline keyboards.
Telegram's own limits (20 MB bot downloads, photo size and shape, 1,024-character captions,
albums without keyboards, flood control) are handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeChat,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    Update,
    User,
)
from telegram import Chat as TelegramChatInfo
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, InvalidToken, RetryAfter, TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    ContextTypes,
    Defaults,
    MessageHandler,
    Updater,
    filters,
)
from telegram.warnings import PTBDeprecationWarning

from adapters.base import RemoteFile, StartupError, StatusChat, download
from adapters.bot_api_http import BotApiRequest
from bot.buttons import Button
from bot.commands import ADMIN_MENU, MENU
from bot.config import Settings
from bot.errors import InputUnavailable
from bot.http import env_proxy
from bot.images import LinkedPicture, Picture, ResultPicture, in_memory
from bot.requests import ImageInput
from bot.service import ImageBot, Sender

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # the Bot API refuses getFile above this
MAX_PHOTO_BYTES = 10 * 1024 * 1024
MAX_PHOTO_SIDES = 10_000  # width + height
MAX_PHOTO_RATIO = 20
MAX_CAPTION_CHARS = 1024
MAX_TEXT_CHARS = 4096
MAX_ALERT_CHARS = 200  # an answerCallbackQuery text
ANSWER_SECONDS = 1.0  # a press is answered by then at the latest (the button stops spinning)
CHAT_ACTION_SECONDS = 4.5  # Telegram shows an action for 5 s
FLOOD_RETRIES = 5
CONCURRENT_UPDATES = 256
MAX_HELD_UPDATES = 1024  # updates waiting or being handled; more wait (polling) or are refused
CONNECTION_POOL = 64
WEBHOOK_CONNECTIONS = 40  # Telegram's default; each replica answers in milliseconds
WEBHOOK_RETRIES = 5  # setWebhook tried again for about 20 s (flood control as replicas start)
_WEBHOOK = "imagebot.webhook"  # the application's bot_data key for its ``Webhook``
_ADMINS = "imagebot.admins"  # the application's bot_data key for its admins' Telegram ids

COMMANDS = tuple(BotCommand(entry.name, entry.description) for entry in MENU)
ADMIN_COMMANDS = COMMANDS + tuple(BotCommand(e.name, e.description) for e in ADMIN_MENU)
UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]  # commands, and presses of the bot's buttons
MORE_LIKE_THESE = "More like these?"  # the keyboard's own message under an album
_MIME_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}

T = TypeVar("T")


def build_application(
    settings: Settings, bot: ImageBot
) -> Application[Any, Any, Any, Any, Any, Any]:
    """A PTB Application that feeds every message to ``bot``; run it with ``serve``."""
    assert settings.telegram_bot_token is not None
    api = settings.telegram_api_url.rstrip("/")
    webhook = _webhook_of(settings)
    proxy = env_proxy(api, "Telegram's Bot API")
    application = (
        Application.builder()
        .token(settings.telegram_bot_token.get_secret_value())
        .base_url(f"{api}/bot")
        .base_file_url(f"{api}/file/bot")
        .update_queue(HeldUpdates(MAX_HELD_UPDATES, refuse_when_full=webhook is not None))
        .concurrent_updates(CONCURRENT_UPDATES)
        # A reply to a command deleted meanwhile goes as a plain message: a paid picture arrives.
        .defaults(Defaults(allow_sending_without_reply=True))
        .request(BotApiRequest(CONNECTION_POOL, media_write_timeout=60, proxy=proxy))
        .get_updates_request(BotApiRequest(1, proxy=proxy))
        .build()
    )
    application.bot_data[_WEBHOOK] = webhook
    application.bot_data[_ADMINS] = sorted(
        int(user_id)
        for platform, _, user_id in (admin.partition(":") for admin in settings.admin_ids)
        if platform == "telegram" and user_id.lstrip("-").isdigit()
    )
    adapter = TelegramAdapter(bot)
    wanted = filters.UpdateType.MESSAGE & (
        filters.TEXT | filters.CAPTION | filters.PHOTO | filters.Document.IMAGE
    )
    application.add_handler(MessageHandler(wanted, adapter.on_message))
    application.add_handler(CallbackQueryHandler(adapter.on_press))
    bot.reach_admins("telegram", partial(send_private, application))
    return application


@dataclass(frozen=True)
class Webhook:
    """Where Telegram pushes updates (``TELEGRAM_WEBHOOK_URL``) and where this replica listens."""

    url: str
    host: str
    port: int
    secret: str = field(repr=False)

    @property
    def path(self) -> str:
        """The URL's path, which the load balancer forwards unchanged."""
        return urlsplit(self.url).path or "/"


def _webhook_of(settings: Settings) -> Webhook | None:
    if settings.telegram_webhook_url is None:
        return None
    assert settings.telegram_webhook_secret is not None  # the settings require it with the URL
    host, _, port = settings.telegram_webhook_listen.rpartition(":")
    return Webhook(
        settings.telegram_webhook_url,
        host.strip("[]"),  # an IPv6 address is written [::]:8080
        int(port),
        settings.telegram_webhook_secret.get_secret_value(),
    )


class HeldUpdates(asyncio.Queue[object]):
    """PTB's update queue, bounded by the updates it holds: queued or still being handled.

    PTB moves every update off its queue into a task of its own at once, so a ``maxsize`` would
    bound nothing; here room is freed by ``task_done``, which PTB calls once an update is
    handled. When full, long polling waits for room; a webhook update is refused at once
    (``QueueFull``: PTB answers 500 and Telegram sends it again later, maybe to another replica).
    """

    def __init__(self, limit: int, *, refuse_when_full: bool) -> None:
        super().__init__()
        self._limit = limit
        self._room = asyncio.Semaphore(limit)
        self._refuse_when_full = refuse_when_full

    async def put(self, item: object) -> None:
        if self._refuse_when_full and isinstance(item, Update) and self._room.locked():
            log.warning("%d Telegram updates in hand: refusing one for now", self._limit)
            raise asyncio.QueueFull
        await self._room.acquire()
        await super().put(item)

    def task_done(self) -> None:
        super().task_done()
        self._room.release()


async def serve(
    application: Application[Any, Any, Any, Any, Any, Any],
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Take updates (by webhook when one is set, else by long polling) until ``stop`` is set,
    then finish the jobs in hand and shut down.

    ``ready`` is set once the bot can send (for answers owed from before a restart). Stopping
    leaves the webhook set: the other replicas still take updates through it.
    """
    await _initialize(application)
    async with application:
        await _flood_safe(lambda: application.bot.set_my_commands(COMMANDS))
        for admin in application.bot_data[_ADMINS]:  # admins see their commands in the menu
            await _admin_menu(application.bot, admin)
        assert application.updater is not None
        await _receive(application.updater, application.bot_data[_WEBHOOK])
        await application.start()
        if ready is not None:
            ready.set()
        await stop.wait()
        await application.updater.stop()  # PTB's stop deletes no webhook
        await application.stop()


async def _admin_menu(bot: Bot, admin: int) -> None:
    """The menu with the admin commands, in the admin's private chat with the bot; Telegram
    refuses it until the admin has started that chat, which is fine."""
    try:
        await _flood_safe(
            lambda: bot.set_my_commands(ADMIN_COMMANDS, scope=BotCommandScopeChat(admin))
        )
    except TelegramError as error:
        log.info("no admin menu for a Telegram admin yet: %s", error)


async def _receive(updater: Updater, webhook: Webhook | None) -> None:
    """Start long polling, or ``setWebhook`` and the webhook server.

    Every replica sets the same URL and secret, so setting it again changes nothing; pending
    updates are never dropped, whichever replica they were meant for.
    """
    if webhook is None:
        await updater.start_polling(allowed_updates=UPDATES)
        return
    try:
        await updater.start_webhook(
            listen=webhook.host,
            port=webhook.port,
            url_path=re.escape(webhook.path),  # PTB routes by a regular expression of it
            webhook_url=webhook.url,
            secret_token=webhook.secret,
            allowed_updates=UPDATES,
            max_connections=WEBHOOK_CONNECTIONS,
            bootstrap_retries=WEBHOOK_RETRIES,
            drop_pending_updates=False,
        )
    except BadRequest as error:
        raise StartupError(f"Telegram refused TELEGRAM_WEBHOOK_URL: {error.message}") from None
    except TelegramError as error:
        raise StartupError(
            f"could not set the webhook at Telegram's Bot API ({type(error).__name__}); "
            "check TELEGRAM_API_URL, the network and any HTTP(S)_PROXY"
        ) from None
    except OSError as error:
        raise StartupError(
            f"could not listen on TELEGRAM_WEBHOOK_LISTEN ({webhook.host}:{webhook.port}): "
            f"{error.strerror or error}"
        ) from None


async def _initialize(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """Meet the Bot API (getMe); a refusal or no answer is one ``StartupError`` line."""
    try:
        await application.initialize()
    except InvalidToken:
        problem = "Telegram refused TELEGRAM_BOT_TOKEN; copy the token from @BotFather again."
    except TelegramError as error:
        problem = (
            f"could not reach Telegram's Bot API at TELEGRAM_API_URL ({type(error).__name__}); "
            "check the address, the network and any HTTP(S)_PROXY"
        )
    else:
        return
    await application.bot.request.shutdown()  # getMe's connection pool, left open by the failure
    raise StartupError(problem)


class TelegramAdapter:
    """Turns messages into ``ImageBot.handle`` calls; gathers albums first."""

    def __init__(self, bot: ImageBot) -> None:
        self._bot = bot

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None:
            return
        if message.media_group_id is None:
            await self._handle([message], context.bot.username)
            return
        album = await self._gather(message, context.bot)
        if album:
            await self._handle(album, context.bot.username)

    async def on_press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A press of a button under one of the bot's messages: the core decides what it asks."""
        query = update.callback_query
        if query is None:
            return
        message = query.message
        if not isinstance(message, Message) or query.data is None:  # too old to be read
            await _answer(query, "That message is too old for its buttons; send the command again.")
            return
        chat = PressChat(query, message)
        answering = asyncio.create_task(chat.answer_soon())
        try:
            await self._bot.press(
                _presser(query, message),
                chat,
                query.data,
                partial(_fetch, context.bot),
                [file.file_id for file in _image_files(message)],
            )
        finally:
            answering.cancel()
            await chat.close()

    async def _gather(self, message: Message, bot: Bot) -> list[Message]:
        """Every message of ``message``'s album, sorted, to the one handler (on any replica)
        that gathers them; [] to the others. Just ``message`` when the ledger fails."""
        key = f"telegram:{message.chat_id}:{message.media_group_id}"
        try:
            parts = await self._bot.gather_album(_sender(message), key, message.to_json())
        except Exception as error:  # the ledger is unreachable: better one picture than none
            log.warning("could not gather an album (%r); handling its message alone", error)
            return [message]
        album = [Message.de_json(json.loads(part), bot) for part in parts]
        return sorted(album, key=lambda item: item.message_id)

    async def _handle(self, messages: list[Message], bot_username: str) -> None:
        command = next((m for m in messages if (m.text or m.caption or "").startswith("/")), None)
        if command is None:
            return  # the bot reacts to commands only, never to bare text or photos
        chat = TelegramChat(command)
        text = command.text or command.caption or ""
        inputs = partial(_images_of, messages, command)
        try:
            await self._bot.handle(_sender(command), chat, text, inputs, bot_username=bot_username)
        finally:
            await chat.close()


def _sender(message: Message) -> Sender:
    """Who wrote ``message``: its user, or the chat it was sent as.

    An anonymous group admin writes as the group and a channel as itself (``sender_chat``);
    ``from`` is then a placeholder bot every such message shares.
    """
    who: User | TelegramChatInfo | None = message.sender_chat or message.from_user
    assert who is not None
    name = who.full_name if isinstance(who, User) else who.title
    return Sender(
        platform="telegram",
        user_id=str(who.id),
        display_name=f"@{who.username}" if who.username else name or "",
        chat_ids=(str(message.chat_id),),
        private=message.chat.type == ChatType.PRIVATE,
        username=who.username,
    )


def _presser(query: CallbackQuery, message: Message) -> Sender:
    """Who pressed a button, in the chat of the message it is under."""
    user = query.from_user
    return Sender(
        platform="telegram",
        user_id=str(user.id),
        display_name=f"@{user.username}" if user.username else user.full_name,
        chat_ids=(str(message.chat_id),),
        private=message.chat.type == ChatType.PRIVATE,
        username=user.username,
    )


_TOO_BIG = "That image is over Telegram's 20 MB limit for bots; send a smaller one."
_GONE = "That picture is no longer on Telegram, so I can't use it again. Nothing was charged."


async def _images_of(messages: list[Message], command: Message) -> tuple[ImageInput, ...]:
    """The command's own images (album order), else the replied-to message's."""
    files = [file for message in messages for file in _image_files(message)]
    if not files and command.reply_to_message is not None:
        files = _image_files(command.reply_to_message)
    remote = [RemoteFile(file.file_id, file.file_size, partial(_read, file)) for file in files]
    return await _download(remote)


async def _download(remote: Sequence[RemoteFile]) -> tuple[ImageInput, ...]:
    return await download(
        remote,
        platform="Telegram",
        max_bytes=MAX_DOWNLOAD_BYTES,
        too_big=_TOO_BIG,
        errors=(TelegramError,),
    )


async def _fetch(bot: Bot, file_ids: Sequence[str]) -> tuple[ImageInput, ...]:
    """Pictures again by their file ids (a button's replay)."""
    remote = [RemoteFile(file_id, None, partial(_read_again, bot, file_id)) for file_id in file_ids]
    return await _download(remote)


async def _read_again(bot: Bot, file_id: str) -> bytes:
    try:
        file = await bot.get_file(file_id)
    except BadRequest as error:
        too_big = "too big" in error.message.lower()
        raise InputUnavailable(_TOO_BIG if too_big else _GONE) from None
    return bytes(await file.download_as_bytearray())


def _image_files(message: Message) -> list[Any]:
    if message.photo:
        return [message.photo[-1]]  # the largest size
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        return [document]
    return []


async def _read(media: Any) -> bytes:
    try:
        file = await media.get_file()
    except BadRequest as error:
        if "too big" in error.message.lower():
            raise InputUnavailable(_TOO_BIG) from None
        raise
    return bytes(await file.download_as_bytearray())


async def send_private(
    application: Application[Any, Any, Any, Any, Any, Any], user_id: str, text: str
) -> None:
    """A message in the private chat with the user ``user_id`` (an admin's warning); Telegram
    refuses it unless the user has started a chat with the bot."""
    await application.bot.initialize()  # done already once the application runs
    await _flood_safe(lambda: application.bot.send_message(int(user_id), text[:MAX_TEXT_CHARS]))


def chat_for(application: Application[Any, Any, Any, Any, Any, Any], address: str) -> TelegramChat:
    """A chat that replies to the command ``TelegramChat.reply_address`` described.

    ValueError (or KeyError/TypeError) when ``address`` is not such a description.
    """
    where = json.loads(address)
    command = Message(
        message_id=int(where["message"]),
        date=datetime.now(UTC),
        chat=TelegramChatInfo(id=int(where["chat"]), type=str(where["type"])),
        message_thread_id=where.get("thread"),
        is_topic_message=bool(where.get("topic")),
    )
    command.set_bot(application.bot)
    return TelegramChat(command)


class TelegramChat(StatusChat[Message]):
    """The core's ``Chat`` for one command: replies in its chat and topic, "sending photo…"."""

    max_text_chars = MAX_TEXT_CHARS
    takes_links = True

    def __init__(self, command: Message) -> None:
        super().__init__()
        self._command = command

    def reply_address(self) -> str:
        command = self._command
        return json.dumps(
            {
                "chat": command.chat_id,
                "type": command.chat.type,
                "message": command.message_id,
                "thread": command.message_thread_id,
                "topic": bool(command.is_topic_message),
            }
        )

    async def _post_text(self, text: str) -> None:
        await _flood_safe(lambda: self._command.reply_text(text, do_quote=True))

    async def _post_status(self, text: str, buttons: tuple[Button, ...]) -> Message:
        keyboard = _keyboard(buttons)
        return await _flood_safe(
            lambda: self._command.reply_text(text, do_quote=True, reply_markup=keyboard)
        )

    async def _post_pictures(
        self, pictures: Sequence[ResultPicture], caption: str, buttons: tuple[Button, ...]
    ) -> None:
        """Pictures at public links go by link, for Telegram to fetch; otherwise (or if it
        can't) they are uploaded: photos (an album for several), documents for what photos
        can't be. The keyboard goes on the one message, or on a message of its own (an album
        carries none)."""
        caption = caption[:MAX_CAPTION_CHARS]
        keyboard = _keyboard(buttons) if len(pictures) == 1 else None
        if not await self._posted_links(pictures, caption, keyboard):
            await self._post_uploads(await in_memory(pictures), caption, keyboard)
        if buttons and len(pictures) > 1:
            more = _keyboard(buttons)
            await _flood_safe(
                lambda: self._command.reply_text(MORE_LIKE_THESE, do_quote=True, reply_markup=more)
            )

    async def _posted_links(
        self,
        pictures: Sequence[ResultPicture],
        caption: str,
        keyboard: InlineKeyboardMarkup | None,
    ) -> bool:
        """Post pictures that are all at public links as photos by link; False if some are not,
        or Telegram could not take them (over 5 MB, unreachable, not a photo it accepts)."""
        links = [picture.url for picture in pictures if isinstance(picture, LinkedPicture)]
        if len(links) < len(pictures):
            return False
        try:
            await self._post_photos(links, caption, keyboard)
        except BadRequest as error:
            log.info("Telegram did not take a picture by its link (%s); uploading", error.message)
            return False
        return True

    async def _post_uploads(
        self, pictures: list[Picture], caption: str, keyboard: InlineKeyboardMarkup | None
    ) -> None:
        photos = [picture.data for picture in pictures if _fits_as_photo(picture)]
        documents = [picture for picture in pictures if not _fits_as_photo(picture)]
        if photos:
            await self._post_photos(photos, caption, keyboard)
        for index, picture in enumerate(documents):
            name = f"image-{index + 1}.{_MIME_EXTENSIONS.get(picture.mime, 'png')}"
            await _flood_safe(
                lambda picture=picture, name=name: self._command.reply_document(
                    picture.data,
                    filename=name,
                    caption=None if photos else caption,
                    do_quote=True,
                    reply_markup=keyboard,
                )
            )

    async def _post_photos(
        self,
        photos: Sequence[str | bytes],
        caption: str,
        keyboard: InlineKeyboardMarkup | None,
    ) -> None:
        """One photo (by link or bytes) with the caption and keyboard, or an album of them."""
        if len(photos) == 1:
            await _flood_safe(
                lambda: self._command.reply_photo(
                    photos[0], caption=caption, do_quote=True, reply_markup=keyboard
                )
            )
            return
        media = [
            InputMediaPhoto(photo, caption=caption if index == 0 else None)
            for index, photo in enumerate(photos)
        ]
        await _flood_safe(lambda: self._command.reply_media_group(media, do_quote=True))

    async def _keep_alive(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a lost chat action is harmless
                await self._command.chat.send_action(
                    ChatAction.UPLOAD_PHOTO, message_thread_id=_topic(self._command)
                )
            await asyncio.sleep(CHAT_ACTION_SECONDS)

    async def _edit_status(
        self, status: Message, text: str, buttons: tuple[Button, ...]
    ) -> float | None:
        try:
            await status.edit_text(text, reply_markup=_keyboard(buttons))
        except RetryAfter as error:
            return _seconds(error)
        except BadRequest as error:
            if "not modified" not in error.message.lower():
                log.debug("status edit refused: %s", error.message)
        except TelegramError as error:
            log.debug("status edit failed: %s", error)
        return None

    async def _delete_status(self, status: Message) -> None:
        with contextlib.suppress(BadRequest):  # already gone
            await _flood_safe(status.delete)


class PressChat(TelegramChat):
    """The core's ``Chat`` for a button press: answers in the pressed message's chat, quoting it.

    Telegram wants every press answered (the button spins until then): the core's first words
    answer it, a text as an alert only the presser sees (a refusal, a cancel's outcome); if the
    core says nothing within ``ANSWER_SECONDS`` it is answered blank and later texts are replies.
    """

    def __init__(self, query: CallbackQuery, pressed: Message) -> None:
        super().__init__(pressed)
        self._query = query
        self._answered = False

    async def answer_soon(self) -> None:
        await asyncio.sleep(ANSWER_SECONDS)
        await self._answer()

    async def send_text(self, text: str) -> None:
        if self._answered or len(text) > MAX_ALERT_CHARS:
            await self._answer()
            await super().send_text(text)
            return
        await self.clear_status()
        await self._answer(text)

    async def show_progress(self, status: str, buttons: Sequence[Button] = ()) -> None:
        await self._answer()
        await super().show_progress(status, buttons)

    async def send_pictures(
        self, pictures: Sequence[ResultPicture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        await self._answer()
        await super().send_pictures(pictures, caption, buttons)

    async def close(self) -> None:
        await self._answer()
        await super().close()

    async def _answer(self, alert: str | None = None) -> None:
        if not self._answered:
            self._answered = True
            await _answer(self._query, alert)


async def _answer(query: CallbackQuery, alert: str | None = None) -> None:
    """Answer a press (with an alert only the presser sees); a late or lost answer is harmless."""
    try:
        await query.answer(alert, show_alert=alert is not None)
    except TelegramError as error:
        log.debug("answering a button press failed: %s", error)


def _keyboard(buttons: Sequence[Button]) -> InlineKeyboardMarkup | None:
    """The buttons side by side in one row; None (no keyboard) for none."""
    if not buttons:
        return None
    row = [InlineKeyboardButton(button.label, callback_data=button.data) for button in buttons]
    return InlineKeyboardMarkup([row])


def _topic(message: Message) -> int | None:
    return message.message_thread_id if message.is_topic_message else None


def _fits_as_photo(picture: Picture) -> bool:
    """Telegram's sendPhoto limits; anything else goes as a document."""
    long_side, short_side = sorted((picture.width, picture.height), reverse=True)
    return (
        len(picture.data) <= MAX_PHOTO_BYTES
        and picture.width + picture.height <= MAX_PHOTO_SIDES
        and long_side <= MAX_PHOTO_RATIO * max(short_side, 1)
    )


async def _flood_safe(call: Callable[[], Awaitable[T]]) -> T:
    """Run a Bot API call, waiting out flood control (HTTP 429) instead of dropping it."""
    for _ in range(FLOOD_RETRIES):
        try:
            return await call()
        except RetryAfter as error:
            delay = _seconds(error)
            log.warning("Telegram flood control: waiting %.0f s", delay)
            await asyncio.sleep(delay)
    return await call()


def _seconds(error: RetryAfter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        delay = error.retry_after
    return delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
