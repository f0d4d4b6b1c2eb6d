"""A status message kept at the newest text without flooding the platform with edits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

STATUS_EDIT_SECONDS = 3.0  # at most one status edit this often; newer text replaces older

Shown = TypeVar("Shown")  # what the message shows: its text, and its buttons


class ThrottledStatus(Generic[Shown]):
    """Edits a status message to the newest content asked for, once per ``STATUS_EDIT_SECONDS``.

    ``edit`` changes the message on the platform and handles the platform's own errors; it may
    return seconds to hold off before the next edit (a flood-control answer).
    """

    def __init__(self, edit: Callable[[Shown], Awaitable[float | None]], shown: Shown) -> None:
        self._edit = edit
        self._interval = STATUS_EDIT_SECONDS
        self._shown = shown
        self._wanted = shown
        self._next_at = time.monotonic() + self._interval
        self._task: asyncio.Task[None] | None = None

    def update(self, wanted: Shown) -> None:
        """Ask for ``wanted``; returns at once, the edit happens when the throttle allows."""
        self._wanted = wanted
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._catch_up())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _catch_up(self) -> None:
        while self._wanted != self._shown:
            await asyncio.sleep(self._next_at - time.monotonic())
            wanted = self._wanted
            hold_off = await self._edit(wanted)
            if hold_off is not None:
                self._next_at = time.monotonic() + hold_off
                continue
            self._shown, self._next_at = wanted, time.monotonic() + self._interval
