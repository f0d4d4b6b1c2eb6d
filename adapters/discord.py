"""Discord adapter on discord.py: message commands, native slash commands and buttons,
translation only.

A message (``/imagegen a fox``) becomes text for ``ImageBot.handle``, a slash command its typed
command for ``ImageBot.run``, a button press its data for ``ImageBot.press``, each with a way to
fetch its pictures; the core's answers become replies with attachments and buttons. Discord's
own rules (the 3-second interaction window, 15-minute interaction tokens, 10 MiB uploads,
2,000-character messages) are handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Self

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from PIL import Image

from adapters.base import RemoteFile, StartupError, StatusChat, download, split_text
from bot.buttons import DATA_PATTERN, Button
from bot.catalog import choices, sizes_of
from bot.commands import (
    ADMIN_MENU,
    MENU,
    CancelJobs,
    Command,
    Help,
    LinkAccounts,
    Models,
    PauseSpending,
    Unlink,
    WalletQuery,
    budget_change,
    spend_query,
)
from bot.config import Settings
from bot.errors import InputUnavailable
from bot.http import env_proxy
from bot.images import Picture
from bot.money import format_usd
from bot.requests import MAX_INPUT_BYTES, MAX_N, ImageCommand, ImageInput
from bot.service import ImageBot, Outcome, Sender

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # per message, for bots
MAX_FILES_PER_MESSAGE = 10
MAX_CONTENT_CHARS = 2000
MAX_CHOICES = 25  # autocomplete answers
TOKEN_SECONDS = 15 * 60 - 30  # an interaction's webhook token lives 15 min; keep a margin
RATE_LIMIT_SWEEP_EVERY = 256  # new rate-limit buckets (``sweep_rate_limits_in_turn``)
MAX_FIT_PIXELS = 24_000_000  # a picture re-encoded to fit is decoded whole: ~100 MB at most
WEBP_MAX_SIDE = 16_383
_SHRINK_QUALITIES = (90, 80, 70, 55, 40)
_GONE = "That picture is no longer in this chat, so I can't use it again; nothing was charged."
_STYLES = {  # by the action a button's data names
    "again": discord.ButtonStyle.primary,
    "vary": discord.ButtonStyle.secondary,
    "cancel": discord.ButtonStyle.danger,
}


def build_client(settings: Settings, bot: ImageBot) -> ImagebotClient:
    """A discord.py client for ``bot`` that talks to ``DISCORD_API_URL`` and runs the shards of
    ``DISCORD_SHARD_COUNT``/``DISCORD_SHARD_IDS``; run it with ``serve``."""
    # discord.py keeps the REST base in one class attribute, read for every request.
    discord.http.Route.BASE = settings.discord_api_url.rstrip("/")
    client = ImagebotClient(
        bot,
        shard_count=settings.discord_shard_count,
        shard_ids=settings.discord_shard_ids,
        proxy=env_proxy(settings.discord_api_url, "Discord"),
    )
    bot.reach_admins("discord", partial(send_private, client))
    return client


async def serve(client: ImagebotClient, token: str, stop: asyncio.Event) -> None:
    """Connect and answer until ``stop`` is set; ``StartupError`` if Discord refuses the bot."""
    running = asyncio.create_task(client.start(token))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await client.close()
    try:
        await running
    except discord.PrivilegedIntentsRequired:
        raise StartupError(
            "Discord refused the message content intent: turn on 'Message Content Intent' "
            "for this bot (Developer Portal > Bot > Privileged Gateway Intents)."
        ) from None
    except discord.LoginFailure:
        raise StartupError(
            "Discord refused DISCORD_BOT_TOKEN; copy the bot's token again."
        ) from None
    except (aiohttp.ClientError, OSError) as error:
        raise StartupError(
            f"could not reach Discord at DISCORD_API_URL ({type(error).__name__}); "
            "check the address, the network and any HTTP(S)_PROXY"
        ) from None


class ImagebotClient(discord.AutoShardedClient):
    """Message commands through ``on_message``, slash commands through its command tree, button
    presses through ``PressedButton``.

    Runs ``shard_ids`` of ``shard_count`` shards; every shard of ``shard_count`` without ids;
    without a count, as many as ``GET /gateway/bot`` recommends. REST calls, the gateway's
    websockets and attachment downloads go through ``proxy`` when given.
    """

    def __init__(
        self,
        bot: ImageBot,
        *,
        shard_count: int | None = None,
        shard_ids: Sequence[int] | None = None,
        proxy: str | None = None,
    ) -> None:
        # The bot has no voice; discord.py would warn at every start that voice libraries are
        # missing.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        intents.message_content = True  # message commands read the text
        # Names and prompts are the users' own text: nothing the bot sends pings anyone unless
        # a message names the one user it means.
        # No message cache: the bot reads none from it (a reply brings the replied-to message,
        # others are fetched), and discord.py scans all 1,000 it keeps by default on every edit
        # and delete event, the bot's own status edits and deletions included.
        super().__init__(
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            max_messages=None,
            shard_count=shard_count,
            shard_ids=None if shard_ids is None else list(shard_ids),
            proxy=proxy,
        )
        sweep_rate_limits_in_turn(self.http)
        self.bot = bot
        self.tree = app_commands.CommandTree(self)
        _add_slash_commands(self.tree, bot)

    async def setup_hook(self) -> None:
        """Answer the bot's buttons on any message, sent before a restart too; connect to the
        gateway ``GET /gateway/bot`` names; publish the slash commands if this process runs
        shard 0.

        Slash commands are global, so one process publishes them: the one with shard 0, which
        every sharded deployment has exactly once (and which gets the DMs), or the only one.
        """
        self.add_dynamic_items(PressedButton)
        _, url, _ = await self.http.get_bot_gateway()
        follow_gateway(self, url)
        if self.shard_ids is None or 0 in self.shard_ids:
            await self.tree.sync()

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or not message.content.startswith("/"):
            return
        chat = MessageChat(message)
        sender = _sender(message.author, message.channel, message.guild)
        try:
            await self.bot.handle(sender, chat, message.content, partial(_inputs_of, message))
        finally:
            await chat.close()

    async def answer_press(self, interaction: discord.Interaction[Any], data: str) -> None:
        """A press of one of the bot's buttons, carrying ``data``: deferred at once, then the
        core answers. Again and Vary draw in public, like a slash command; Cancel answers the
        presser alone."""
        message = interaction.message
        pressed = [] if message is None else [file.ref for file in _files_of(message)]

        def press(sender: Sender, chat: InteractionChat) -> Awaitable[Outcome]:
            return self.bot.press(sender, chat, data, partial(_refetch, self), pressed)

        await _deferred(interaction, press, private=data.startswith("cancel:"))


class PressedButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=f"(?P<data>{DATA_PATTERN})"
):
    """One of the bot's buttons, found by its data on any message, so presses need no view in
    memory and work after a restart."""

    @classmethod
    def of(cls, button: Button) -> Self:
        style = _STYLES[button.data.partition(":")[0]]
        return cls(discord.ui.Button(label=button.label, custom_id=button.data, style=style))

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Self:
        assert isinstance(item, discord.ui.Button)  # the template matches buttons' data only
        return cls(item)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        assert isinstance(client, ImagebotClient)
        await client.answer_press(interaction, self.custom_id)


def _view(buttons: Sequence[Button]) -> discord.ui.View | None:
    """The buttons as a message's components; None without buttons (an edit then removes any)."""
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(PressedButton.of(button))
    return view


async def send_private(client: discord.Client, user_id: str, text: str) -> None:
    """A direct message to the user ``user_id`` (an admin's warning)."""
    await client.wait_until_ready()
    channel = await client.create_dm(discord.Object(int(user_id)))
    await channel.send(text[:MAX_CONTENT_CHARS])


def sweep_rate_limits_in_turn(http: discord.http.HTTPClient) -> None:
    """Look for expired rate-limit buckets on every 256th new bucket, not on every one.

    discord.py 2.7 keeps a bucket per route and channel or interaction and, once it has 256,
    scans all of them for ones idle for 5 minutes each time it makes a new one: in a crowd of
    DMs that is a scan of thousands per request (0.24 s of the bot's 6.2 s of CPU in a
    1,000-user burst). Swept in turn, the cost per new bucket stays small and idle buckets still
    go.
    """
    sweep = http._try_clear_expired_ratelimits
    made = itertools.count(1)

    def in_turn() -> None:
        if next(made) % RATE_LIMIT_SWEEP_EVERY == 0:
            sweep()

    http._try_clear_expired_ratelimits = in_turn  # type: ignore[method-assign]


def follow_gateway(client: discord.Client, url: str) -> None:
    """Send the client's gateway connections to ``url`` instead of discord.py's built-in address.

    discord.py 2.7 connects to ``DiscordWebSocket.DEFAULT_GATEWAY`` whenever it has no other
    address: ``Client`` always, ``AutoShardedClient`` when given a shard count, a shard's new
    connection after a failed one, a new IDENTIFY after an invalidated session. Every connection
    goes through ``client.http.ws_connect``, so the default address is rewritten there (keeping
    discord.py's query). ``AutoShardedClient`` without a count already connects where
    ``GET /gateway/bot`` says, and resumes use READY's ``resume_gateway_url``.
    """
    target = yarl.URL(url)
    default_host = DiscordWebSocket.DEFAULT_GATEWAY.host
    connect = client.http.ws_connect

    async def ws_connect(address: str, *, compress: int = 0) -> aiohttp.ClientWebSocketResponse:
        parsed = yarl.URL(address)
        if parsed.host == default_host:
            parsed = target.with_query(parsed.query)
        return await connect(str(parsed), compress=compress)

    client.http.ws_connect = ws_connect  # type: ignore[method-assign]


async def _inputs_of(message: discord.Message) -> tuple[ImageInput, ...]:
    """The replied-to message's attachments first, then the command's own."""
    files = _files_of(message)
    reference = message.reference
    if reference is not None and reference.message_id is not None:
        replied = reference.resolved
        if not isinstance(replied, discord.Message):
            replied = await _fetch(message.channel, reference.message_id)
        if isinstance(replied, discord.Message):
            files = [*_files_of(replied), *files]
    return await _download(files)


def _files_of(message: discord.Message) -> list[RemoteFile]:
    where = f"{message.channel.id}/{message.id}"
    return [
        RemoteFile(f"{where}/{attachment.id}", attachment.size, attachment.read)
        for attachment in message.attachments
    ]


async def _refetch(client: discord.Client, refs: Sequence[str]) -> tuple[ImageInput, ...]:
    """The pictures of an earlier command again: a message's attachment by
    ``channel/message/attachment``, a slash command's by its URL."""
    messages: dict[str, discord.Message] = {}
    files = []
    for ref in refs:
        if ref.startswith(("https://", "http://")):
            files.append(RemoteFile(ref, None, partial(_from_cdn, client, ref)))
            continue
        where = ref.rpartition("/")[0]
        if where not in messages:
            messages[where] = await _message_at(client, where)
        kept = [file for file in _files_of(messages[where]) if file.ref == ref]
        if not kept:  # the message was edited without it
            raise InputUnavailable(_GONE)
        files.extend(kept)
    return await _download(files)


async def _message_at(client: discord.Client, where: str) -> discord.Message:
    """The message at ``channel/message``; ``InputUnavailable`` if it is gone or unreadable."""
    channel_id, message_id = where.split("/")
    channel = client.get_partial_messageable(int(channel_id))
    try:
        return await channel.fetch_message(int(message_id))
    except (discord.NotFound, discord.Forbidden):
        raise InputUnavailable(_GONE) from None
    except discord.HTTPException as error:
        log.warning("fetching a kept picture's message failed: HTTP %s", error.status)
        raise InputUnavailable(
            "I couldn't read that picture's message; nothing was charged. Try again."
        ) from None


async def _from_cdn(client: discord.Client, url: str) -> bytes:
    """A slash command's attachment; one Discord no longer serves (its link expired) is gone."""
    try:
        return await client.http.get_from_cdn(url)
    except (discord.NotFound, discord.Forbidden):
        raise InputUnavailable(_GONE) from None


async def _fetch(channel: Any, message_id: int) -> discord.Message | None:
    """The replied-to message, or None when it is gone or hidden from the bot."""
    try:
        return await channel.fetch_message(message_id)
    except (discord.NotFound, discord.Forbidden):
        return None
    except discord.HTTPException as error:
        log.warning("fetching a replied-to message failed: HTTP %s", error.status)
        raise InputUnavailable(
            "I couldn't read the message you replied to; nothing was charged. Try again."
        ) from None


async def _download(files: Sequence[RemoteFile]) -> tuple[ImageInput, ...]:
    return await download(
        files,
        platform="Discord",
        max_bytes=MAX_INPUT_BYTES,
        too_big=f"That image is over {MAX_INPUT_BYTES // 1_048_576} MB; send a smaller one.",
        errors=(discord.HTTPException,),
    )


def _sender(
    user: discord.User | discord.Member,
    channel: Any,
    guild: discord.Guild | None,
) -> Sender:
    chat_ids = (str(channel.id),) if guild is None else (str(channel.id), str(guild.id))
    return Sender(
        platform="discord",
        user_id=str(user.id),
        display_name=f"@{user.name}",
        chat_ids=chat_ids,
        private=guild is None,
        username=user.name,
    )


async def chat_for(client: discord.Client, address: str) -> StatusChat[Any]:
    """A chat that answers where ``reply_address`` said: a reply, or a mention in the channel.

    Waits until the client is connected. ValueError (or KeyError/TypeError) when ``address``
    is not such a description.
    """
    where = json.loads(address)
    await client.wait_until_ready()
    channel = client.get_partial_messageable(int(where["channel"]))
    if where.get("message") is not None:
        return MessageChat(channel.get_partial_message(int(where["message"])))
    return ChannelChat(channel, int(where["user"]))


class MessageChat(StatusChat[discord.Message]):
    """The core's ``Chat`` for a message command: replies in its channel, with typing shown."""

    max_text_chars = MAX_CONTENT_CHARS

    def __init__(self, command: discord.Message | discord.PartialMessage) -> None:
        super().__init__()
        self._command = command

    def reply_address(self) -> str:
        return json.dumps({"channel": self._command.channel.id, "message": self._command.id})

    async def _post_text(self, text: str) -> None:
        await self._reply(text)

    async def _post_status(self, text: str, buttons: tuple[Button, ...]) -> discord.Message:
        return await self._reply(text, view=_view(buttons))

    async def _post_pictures(
        self, pictures: Sequence[Picture], caption: str, buttons: tuple[Button, ...]
    ) -> None:
        batches, caption = await _batches(pictures, caption)
        for index, files in enumerate(batches):
            first = index == 0
            await self._reply(
                caption[:MAX_CONTENT_CHARS] if first else None,
                files=files,
                view=_view(buttons) if first else None,
            )

    async def _reply(self, content: str | None, **options: Any) -> discord.Message:
        """A reply to the command; a plain message in its channel once the command is deleted
        (a paid picture still arrives)."""
        reference = self._command.to_reference(fail_if_not_exists=False)
        return await self._command.channel.send(
            content, reference=reference, mention_author=False, **options
        )

    async def _keep_alive(self) -> None:
        async with self._command.channel.typing():  # discord.py renews it every 5 s
            await asyncio.Event().wait()

    async def _edit_status(
        self, status: discord.Message, text: str, buttons: tuple[Button, ...]
    ) -> float | None:
        with contextlib.suppress(discord.HTTPException):  # a lost status edit is harmless
            await status.edit(content=text, view=_view(buttons))
        return None

    async def _delete_status(self, status: discord.Message) -> None:
        with contextlib.suppress(discord.NotFound):
            await status.delete()


class InteractionChat(StatusChat[None]):
    """The core's ``Chat`` for a slash command, deferred at once.

    The status is the deferred response itself; answers edit it; errors are ephemeral; once
    the interaction's token is about to expire (a job over ~15 min), the answer goes to the
    channel instead.
    """

    max_text_chars = MAX_CONTENT_CHARS

    def __init__(self, interaction: discord.Interaction[Any], *, private: bool) -> None:
        super().__init__()
        self._interaction = interaction
        self._private = private  # deferred ephemerally: every answer is for the caller alone
        self._started = time.monotonic()

    async def send_text(self, text: str) -> None:
        await self.clear_status()
        first, *more = split_text(text, MAX_CONTENT_CHARS)
        if self._expired():
            for piece in (first, *more):
                await self._to_channel(piece)
            return
        if self._private:  # the status's buttons go with it
            await self._interaction.edit_original_response(content=first, view=None)
        else:  # the public "thinking…" goes; the answer is for the caller only
            with contextlib.suppress(discord.NotFound):
                await self._interaction.delete_original_response()
            more.insert(0, first)
        for piece in more:
            await self._post_text(piece)

    def reply_address(self) -> str:
        interaction = self._interaction
        return json.dumps({"channel": interaction.channel_id, "user": interaction.user.id})

    async def _post_text(self, text: str) -> None:
        await self._interaction.followup.send(text, ephemeral=True)

    async def _post_status(self, text: str, buttons: tuple[Button, ...]) -> None:
        await self._edit_status(None, text, buttons)

    async def _post_pictures(
        self, pictures: Sequence[Picture], caption: str, buttons: tuple[Button, ...]
    ) -> None:
        await self.clear_status()
        batches, caption = await _batches(pictures, caption)
        for index, files in enumerate(batches):
            first = index == 0
            content, view = (caption[:MAX_CONTENT_CHARS], _view(buttons)) if first else (None, None)
            if self._expired():
                await self._to_channel(content, files, view)
            elif first:
                await self._interaction.edit_original_response(
                    content=content, attachments=files, view=view
                )
            else:
                await self._interaction.followup.send(files=files)

    async def _edit_status(
        self, status: None, text: str, buttons: tuple[Button, ...]
    ) -> float | None:
        if not self._expired():
            with contextlib.suppress(discord.HTTPException):  # a lost status edit is harmless
                await self._interaction.edit_original_response(content=text, view=_view(buttons))
        return None

    async def _delete_status(self, status: None) -> None:
        """The status is the response itself: the answer replaces it."""

    def _expired(self) -> bool:
        return time.monotonic() - self._started > TOKEN_SECONDS

    async def _to_channel(
        self,
        content: str | None,
        files: Sequence[discord.File] = (),
        view: discord.ui.View | None = None,
    ) -> None:
        channel = self._interaction.channel
        assert isinstance(channel, discord.abc.Messageable)
        await _naming(channel, self._interaction.user.id, content, files, view)


class ChannelChat(StatusChat[discord.Message]):
    """Answers in a channel, mentioning the user: a slash command's answer after a restart."""

    max_text_chars = MAX_CONTENT_CHARS - 40  # room for the mention

    def __init__(self, channel: discord.PartialMessageable, user_id: int) -> None:
        super().__init__()
        self._channel = channel
        self._user_id = user_id

    def reply_address(self) -> str:
        return json.dumps({"channel": self._channel.id, "user": self._user_id})

    async def _post_text(self, text: str) -> None:
        await _naming(self._channel, self._user_id, text)

    async def _post_status(self, text: str, buttons: tuple[Button, ...]) -> discord.Message:
        return await _naming(self._channel, self._user_id, text, view=_view(buttons))

    async def _post_pictures(
        self, pictures: Sequence[Picture], caption: str, buttons: tuple[Button, ...]
    ) -> None:
        batches, caption = await _batches(pictures, caption)
        await _naming(self._channel, self._user_id, caption, batches[0], _view(buttons))
        for files in batches[1:]:
            await self._channel.send(files=files, allowed_mentions=discord.AllowedMentions.none())

    async def _edit_status(
        self, status: discord.Message, text: str, buttons: tuple[Button, ...]
    ) -> float | None:
        with contextlib.suppress(discord.HTTPException):
            await status.edit(
                content=f"<@{self._user_id}> {text}",
                allowed_mentions=_only(self._user_id),
                view=_view(buttons),
            )
        return None

    async def _delete_status(self, status: discord.Message) -> None:
        with contextlib.suppress(discord.NotFound):
            await status.delete()


def _only(user_id: int) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(user_id)])


async def _naming(
    channel: discord.abc.Messageable,
    user_id: int,
    content: str | None,
    files: Sequence[discord.File] = (),
    view: discord.ui.View | None = None,
) -> discord.Message:
    """Post in ``channel`` addressed to ``user_id``: the one mention the message may ping."""
    text = f"<@{user_id}> {content or ''}".strip()
    return await channel.send(
        text[:MAX_CONTENT_CHARS], files=list(files), view=view, allowed_mentions=_only(user_id)
    )


async def _batches(
    pictures: Sequence[Picture], caption: str
) -> tuple[list[list[discord.File]], str]:
    """The pictures as files in messages of at most 10 MiB and 10 files each (at least one
    message), and the caption, first saying which pictures were too large to send."""
    fitted = await asyncio.gather(*(_fitted(picture) for picture in pictures))
    batches: list[list[discord.File]] = [[]]
    size, notes = 0, []
    for index, (picture, fit) in enumerate(zip(pictures, fitted, strict=True), 1):
        if fit is None:
            notes.append(
                f"Picture {index} ({picture.width}x{picture.height}) is too large to send here."
            )
            continue
        data, extension = fit
        if size + len(data) > MAX_UPLOAD_BYTES or len(batches[-1]) >= MAX_FILES_PER_MESSAGE:
            batches.append([])
            size = 0
        batches[-1].append(discord.File(_Upload(data), f"image-{index}.{extension}"))
        size += len(data)
    return batches, "\n".join([*notes, caption])


class _Upload(io.BytesIO):
    """A picture for ``discord.File``, sent as the bytes it holds.

    aiohttp sends a plain ``BytesIO`` by asking for its buffer, which makes the BytesIO copy
    the picture first; this type is registered to go out as the bytes themselves. discord.py
    swaps a file's ``close`` while sending it and puts the bound method back on the file after:
    a reference cycle that kept every picture sent until the garbage collector's next full pass
    (135 of them at once in a 200-user burst), so the swap is ignored.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.data = data

    @property
    def close(self) -> Callable[[], None]:
        return super().close

    @close.setter
    def close(self, _swapped: Callable[[], None]) -> None:
        pass


aiohttp.payload.register_payload(
    lambda upload, *args, **kwargs: aiohttp.payload.BytesPayload(upload.data, *args, **kwargs),
    _Upload,
    order=aiohttp.payload.Order.try_first,
)


async def _fitted(picture: Picture) -> tuple[bytes, str] | None:
    """The picture as it is when it fits one message, else ``_shrunk`` in a thread."""
    if len(picture.data) <= MAX_UPLOAD_BYTES:
        return picture.data, picture.mime.removeprefix("image/").replace("jpeg", "jpg")
    return await asyncio.to_thread(_shrunk, picture)


def _shrunk(picture: Picture) -> tuple[bytes, str] | None:
    """The picture re-encoded as WebP (then smaller) until it fits one message; None when
    decoding it would take more than ``MAX_FIT_PIXELS`` (a JPEG decodes scaled down)."""
    with Image.open(io.BytesIO(picture.data)) as image:
        pixels = image.width * image.height
        scale = next((s for s in (2, 4) if pixels <= MAX_FIT_PIXELS * s * s), 8)
        if pixels > MAX_FIT_PIXELS:  # JPEG decodes at 1/2, 1/4 or 1/8 of the size; others don't
            image.draft("RGB", (image.width // scale, image.height // scale))
        if image.width * image.height > MAX_FIT_PIXELS:
            return None
        image = image.convert("RGB")
        image.thumbnail((WEBP_MAX_SIDE, WEBP_MAX_SIDE))
        while True:
            for quality in _SHRINK_QUALITIES:
                out = io.BytesIO()
                image.save(out, "WEBP", quality=quality, method=4)
                if out.tell() <= MAX_UPLOAD_BYTES:
                    return out.getvalue(), "webp"
            image = image.resize((image.width // 2, image.height // 2))


def _add_slash_commands(tree: app_commands.CommandTree[Any], bot: ImageBot) -> None:
    """The bot's commands as native slash commands, each building its typed command directly."""
    describe = {entry.name: entry.description for entry in (*MENU, *ADMIN_MENU)}

    @tree.command(name="imagegen", description=describe["imagegen"])
    @app_commands.describe(
        prompt="what to draw", model="model (see /models)", size="WxH", n="how many (1-4)"
    )
    async def imagegen(
        interaction: discord.Interaction[Any],
        prompt: str,
        model: str | None = None,
        size: str | None = None,
        n: app_commands.Range[int, 1, MAX_N] | None = None,
    ) -> None:
        command = ImageCommand("imagegen", prompt, model=model, size=size, n=n)
        await _slash(bot, interaction, lambda: command, (), drawing=True)

    @tree.command(name="img2img", description=describe["img2img"])
    @app_commands.describe(
        prompt="what to change",
        image="the picture to edit",
        mask="white = area to edit (OpenAI models, one image)",
        model="model (see /models)",
        size="WxH",
        n="how many (1-4)",
    )
    async def img2img(
        interaction: discord.Interaction[Any],
        prompt: str,
        image: discord.Attachment,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
        mask: discord.Attachment | None = None,
        model: str | None = None,
        size: str | None = None,
        n: app_commands.Range[int, 1, MAX_N] | None = None,
    ) -> None:
        given = [file for file in (image, image2, image3, image4, mask) if file is not None]
        files = [RemoteFile(file.url, file.size, file.read) for file in given]
        command = ImageCommand(
            "img2img", prompt, model=model, size=size, n=n, mask=mask is not None
        )
        await _slash(bot, interaction, lambda: command, files, drawing=True)

    @tree.command(name="models", description=describe["models"])
    async def models(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, Models, ())

    @tree.command(name="spend", description=describe["spend"])
    @app_commands.describe(who="admins: all, discord:ID or @name")
    async def spend(interaction: discord.Interaction[Any], who: str | None = None) -> None:
        await _slash(bot, interaction, partial(spend_query, who or ""), ())

    @tree.command(name="cancel", description=describe["cancel"])
    async def cancel(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, CancelJobs, ())

    @tree.command(name="link", description=describe["link"])
    @app_commands.describe(code="the code /link gave you on the other platform")
    async def link(interaction: discord.Interaction[Any], code: str | None = None) -> None:
        await _slash(bot, interaction, partial(LinkAccounts, code), ())

    @tree.command(name="unlink", description=describe["unlink"])
    async def unlink(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, Unlink, ())

    @tree.command(name="wallet", description=describe["wallet"])
    async def wallet(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, WalletQuery, ())

    @tree.command(name="budget", description=describe["budget"])
    @app_commands.describe(
        who="default, discord:ID, telegram:ID or @name",
        amount="the daily limit in USD, or reset; leave out to see it",
    )
    async def budget(
        interaction: discord.Interaction[Any], who: str, amount: str | None = None
    ) -> None:
        await _slash(bot, interaction, partial(budget_change, f"{who} {amount or ''}"), ())

    @tree.command(name="pause", description=describe["pause"])
    async def pause(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, partial(PauseSpending, True), ())

    @tree.command(name="resume", description=describe["resume"])
    async def resume(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, partial(PauseSpending, False), ())

    @tree.command(name="help", description=describe["help"])
    async def help_(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, Help, ())

    @tree.command(name="start", description=describe["help"])  # as Telegram's /start
    async def start(interaction: discord.Interaction[Any]) -> None:
        await _slash(bot, interaction, Help, ())

    for command in (imagegen, img2img):
        command.autocomplete("model")(_complete_model)
        command.autocomplete("size")(_complete_size)


async def _slash(
    bot: ImageBot,
    interaction: discord.Interaction[Any],
    command: Callable[[], Command],
    files: Sequence[RemoteFile],
    *,
    drawing: bool = False,
) -> None:
    """Let the core answer a slash command, fetching the files if it asks."""

    def run(sender: Sender, chat: InteractionChat) -> Awaitable[Outcome]:
        return bot.run(
            sender, chat, command, partial(_download, files), answers_private=not drawing
        )

    await _deferred(interaction, run, private=not drawing)


async def _deferred(
    interaction: discord.Interaction[Any],
    answer: Callable[[Sender, InteractionChat], Awaitable[Outcome]],
    *,
    private: bool,
) -> None:
    """Defer within Discord's 3 s (``private``: for the caller alone), then ``answer`` through
    the deferred response; it goes when the core ignores the interaction."""
    await interaction.response.defer(ephemeral=private, thinking=True)
    chat = InteractionChat(interaction, private=private)
    sender = _sender(interaction.user, interaction.channel, interaction.guild)
    if await answer(sender, chat) is Outcome.IGNORED:  # not for this bot here
        with contextlib.suppress(discord.HTTPException):
            await interaction.delete_original_response()


def _editing(interaction: discord.Interaction[Any]) -> bool:
    return interaction.command is not None and interaction.command.name == "img2img"


async def _complete_model(
    interaction: discord.Interaction[Any], current: str
) -> list[app_commands.Choice[str]]:
    typed = current.strip().lower()
    found = []
    for model in choices(editing=_editing(interaction)):
        if typed and not any(typed in name for name in (model.id, *model.shorthands)):
            continue
        label = f"{model.name} ({model.id}) from {format_usd(model.cheapest_micro)}"
        found.append(app_commands.Choice(name=label[:100], value=model.name))
    return found[:MAX_CHOICES]


async def _complete_size(
    interaction: discord.Interaction[Any], current: str
) -> list[app_commands.Choice[str]]:
    chosen = getattr(interaction.namespace, "model", None)
    sizes = [s for s in sizes_of(chosen, editing=_editing(interaction)) if current.strip() in s]
    return [app_commands.Choice(name=size, value=size) for size in sizes[:MAX_CHOICES]]
