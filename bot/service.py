"""The platform-neutral bot: authorize a chat message, run its request, answer through a Chat.

Adapters build a ``Sender`` and a ``Chat`` for each message and call ``ImageBot.handle``;
every business rule (who may spend, what to say) lives here, not in an adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.commands import EditRequest, GenerateRequest, Help, Models, Request, SpendQuery, parse
from bot.config import Settings
from bot.errors import ImagebotError
from bot.images import ImageResult, ImageService, Picture
from bot.money import format_usd
from bot.replies import help_text, models_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sender:
    """Who wrote a message, and where."""

    platform: str
    user_id: str
    display_name: str
    chat_ids: tuple[str, ...]  # the chat, and on Discord also the guild
    private: bool

    @property
    def principal(self) -> str:
        return f"{self.platform}:{self.user_id}"


class Chat(Protocol):
    """What the core needs from a platform to answer one message."""

    async def send_text(self, text: str) -> None: ...

    async def send_pictures(self, pictures: Sequence[Picture], caption: str) -> None: ...

    async def show_progress(self, status: str) -> None: ...


class ImageBot:
    """Runs chat commands against one image service."""

    def __init__(self, settings: Settings, images: ImageService) -> None:
        self._settings = settings
        self._images = images

    async def handle(
        self,
        sender: Sender,
        chat: Chat,
        text: str,
        attachments: tuple[bytes, ...] = (),
        *,
        bot_username: str | None = None,
    ) -> bool | None:
        """Answer one message. True: done; False: refused or failed; None: not for this bot."""
        if not self._chat_allowed(sender):
            return None
        try:
            request = parse(text, attachments, bot_username=bot_username)
        except ImagebotError as error:
            await chat.send_text(error.user_message)
            return False
        if request is None:
            return None
        return await self._run(request, sender, chat)

    async def _run(self, request: Request, sender: Sender, chat: Chat) -> bool | None:
        if isinstance(request, Help):
            await chat.send_text(help_text())
            return True
        if isinstance(request, Models):
            await chat.send_text(models_text())
            return True
        if isinstance(request, SpendQuery):
            await chat.send_text("Spend reports are not available yet.")
            return False
        if not self._user_allowed(sender):
            if not sender.private:
                return None
            await chat.send_text("Sorry, this bot makes pictures only for its members.")
            return False
        return await self._draw(request, chat)

    async def _draw(self, request: GenerateRequest | EditRequest, chat: Chat) -> bool:
        verb = "Drawing" if isinstance(request, GenerateRequest) else "Editing"
        await chat.show_progress(
            f"{verb} with {request.model.name} · {request.size} · "
            f"{format_usd(request.estimate_micro)}…"
        )
        try:
            if isinstance(request, GenerateRequest):
                result = await self._images.generate(request)
            else:
                result = await self._images.edit(request)
        except ImagebotError as error:
            log.info("request failed: %s", error.user_message)
            await chat.send_text(error.user_message)
            return False
        await chat.send_pictures(result.pictures, _caption(request, result))
        return True

    def _chat_allowed(self, sender: Sender) -> bool:
        allowed = self._settings.allowed_chats
        if not allowed or sender.private:
            return True
        return any(f"{sender.platform}:{chat_id}" in allowed for chat_id in sender.chat_ids)

    def _user_allowed(self, sender: Sender) -> bool:
        allowed = self._settings.allowed_users
        return (
            not allowed or sender.principal in allowed or self._settings.is_admin(sender.principal)
        )


def _caption(request: GenerateRequest | EditRequest, result: ImageResult) -> str:
    caption = f"{request.model.name} · {request.size} · {format_usd(result.charged_micro)}"
    if result.revised_prompt:
        caption += f"\n{result.revised_prompt}"
    return caption
