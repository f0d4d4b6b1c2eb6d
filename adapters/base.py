"""What every chat adapter does alike: one status message, kept fresh, cleared by the answer.

A platform's ``Chat`` subclasses ``StatusChat`` and supplies the primitives (post a reply, edit
or delete the status, keep a "typing…" indicator alive); the flow lives here once. The same
goes for fetching a command's pictures (``download``) and for long texts (``split_text``).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from adapters.status import ThrottledStatus
from bot.buttons import Button
from bot.errors import ConfigError, InputUnavailable
from bot.images import ResultPicture, in_memory
from bot.requests import ImageInput, check_declared

log = logging.getLogger(__name__)

# A command answered sooner shows no "typing…"-style indicator: its status message says what is
# going on, and in a crowd the indicators do not hold up other people's payments.
INDICATOR_AFTER_SECONDS = 1.0

Handle = TypeVar("Handle")  # the platform's status message
Progress = tuple[str, tuple[Button, ...]]  # a status's text and the buttons under it


class StartupError(ConfigError):
    """A platform refused the bot or could not be reached at start-up; says what to change."""


class StatusChat(ABC, Generic[Handle]):
    """The core's ``Chat`` for one command, answering with replies on one platform.

    The first progress report posts a status reply and, a second later, starts the platform's
    keep-alive indicator; later ones edit it (its buttons too), throttled; any answer (text or
    pictures) clears both.
    """

    max_text_chars: int
    takes_links = False  # whether ``_post_pictures`` may be given ``LinkedPicture``s

    def __init__(self) -> None:
        self._status: Handle | None = None
        self._edits: ThrottledStatus[Progress] | None = None
        self._keeping_alive: asyncio.Task[None] | None = None

    async def send_text(self, text: str) -> None:
        await self.clear_status()
        for piece in split_text(text, self.max_text_chars):
            await self._post_text(piece)

    async def show_progress(self, status: str, buttons: Sequence[Button] = ()) -> None:
        """The first status is a reply; later ones edit it, throttled, without waiting."""
        progress = (status, tuple(buttons))
        if self._edits is not None:
            self._edits.update(progress)
            return
        self._status = await self._post_status(*progress)
        self._edits = ThrottledStatus(self._edit, progress)
        self._keeping_alive = asyncio.create_task(self._indicate())

    async def send_pictures(
        self, pictures: Sequence[ResultPicture], caption: str, buttons: Sequence[Button] = ()
    ) -> None:
        if not self.takes_links:
            pictures = await in_memory(pictures)
        await self._post_pictures(pictures, caption, tuple(buttons))
        await self.clear_status()

    async def close(self) -> None:
        """Clear what is left of the status once the command is over, however it ended."""
        await self.clear_status()

    async def clear_status(self) -> None:
        if self._keeping_alive is not None:
            self._keeping_alive.cancel()
            self._keeping_alive = None
        if self._edits is None:
            return
        self._edits.stop()
        self._edits = None
        try:
            await self._delete_status(cast(Handle, self._status))
        except Exception as error:  # a status left behind is untidy; the answer matters more
            log.warning("could not clear a status: %s", type(error).__name__)

    async def _edit(self, progress: Progress) -> float | None:
        if self._edits is None:  # cleared while this edit waited its turn
            return None
        return await self._edit_status(cast(Handle, self._status), *progress)

    @abstractmethod
    async def _post_text(self, text: str) -> None:
        """Reply with one piece of text (at most ``max_text_chars``)."""

    @abstractmethod
    async def _post_pictures(
        self, pictures: Sequence[ResultPicture], caption: str, buttons: tuple[Button, ...]
    ) -> None:
        """Reply with the pictures, the caption shown with the first, the buttons under them;
        they are all ``Picture``s unless ``takes_links``."""

    @abstractmethod
    async def _post_status(self, text: str, buttons: tuple[Button, ...]) -> Handle:
        """Reply with a status and its buttons; return it for later edits."""

    @abstractmethod
    async def _edit_status(
        self, status: Handle, text: str, buttons: tuple[Button, ...]
    ) -> float | None:
        """Change the status and its buttons; swallow the platform's errors; may return seconds
        to hold off."""

    @abstractmethod
    async def _delete_status(self, status: Handle) -> None:
        """Remove the status; one already gone is fine."""

    async def _indicate(self) -> None:
        await asyncio.sleep(INDICATOR_AFTER_SECONDS)
        await self._keep_alive()

    async def _keep_alive(self) -> None:
        """Keep the platform's "typing…"-style indicator on until cancelled (none by default)."""


@dataclass(frozen=True)
class RemoteFile:
    """One picture a platform holds for a command: where, how big it says, how to read it."""

    ref: str  # enough to find it again (a file id, channel/message/index)
    size: int | None
    read: Callable[[], Awaitable[bytes]]


async def download(
    files: Sequence[RemoteFile],
    *,
    platform: str,
    max_bytes: int,
    too_big: str,
    errors: tuple[type[Exception], ...],
) -> tuple[ImageInput, ...]:
    """Every file's bytes, in order; ``InputUnavailable`` with the user's sentence if any fails.

    Too many files, files the platform says are over ``max_bytes`` and too many bytes in all
    are refused before anything is downloaded;
    ``errors`` are the platform library's failures, logged by type only (their text may carry
    file URLs or tokens).
    """
    check_declared([file.size for file in files])
    if any((file.size or 0) > max_bytes for file in files):
        raise InputUnavailable(too_big)
    try:
        data = await asyncio.gather(*(file.read() for file in files))
    except errors as error:
        log.warning("downloading an input image failed: %s", type(error).__name__)
        raise InputUnavailable(
            f"I couldn't download that image from {platform}; nothing was charged. Try again."
        ) from None
    return tuple(ImageInput(bytes(blob), file.ref) for blob, file in zip(data, files, strict=True))


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in messages of at most ``limit`` characters, split between lines where it can."""
    pieces = [""]
    for line in text.splitlines():
        while len(line) > limit:
            pieces.append(line[:limit])
            line = line[limit:]
        if len(pieces[-1]) + len(line) + 1 > limit:
            pieces.append("")
        pieces[-1] = f"{pieces[-1]}\n{line}" if pieces[-1] else line
    return [piece for piece in pieces if piece] or [""]
