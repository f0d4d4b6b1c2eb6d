"""Commands get ready to pay in the order they came, a few at a time, so a crowd is served first
come, first served instead of every command crawling forward together.

Getting ready (the ledger's checks, the status, the quote, recording the payment) is a few
milliseconds of work on the event loop and a few network round trips. Let 200 commands do it at
once and the loop takes them a step each in turn: every payment leaves only once every command
is ready, so every picture comes back in the same late rush. A few at a time, in order, the first
payments leave at once, their pictures come back while the last are still getting ready, and
the loop's work on them overlaps. A command that waits on the network longer than
``hold_seconds`` gives its place up, so a slow chat platform or gateway never holds the line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

READYING_AT_ONCE = 24  # commands getting ready to pay together
HOLD_SECONDS = 0.25  # a command still getting ready after this long lets the next one start


class ArrivalOrder:
    """At most ``at_once`` commands getting ready at a time, taken in the order they came."""

    def __init__(self, at_once: int = READYING_AT_ONCE, hold_seconds: float = HOLD_SECONDS) -> None:
        self._places = asyncio.Semaphore(at_once)
        self._hold_seconds = hold_seconds

    @asynccontextmanager
    async def place(self) -> AsyncIterator[Callable[[], None]]:
        """Wait for a place; yields ``leave``, to give it up early (the payment is leaving, the
        command waits elsewhere); it is given up anyway at the end or after ``hold_seconds``."""
        await self._places.acquire()
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                timer.cancel()
                self._places.release()

        timer = asyncio.get_running_loop().call_later(self._hold_seconds, leave)
        try:
            yield leave
        finally:
            leave()
