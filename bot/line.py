"""The line image jobs wait in for one of a fixed number of slots, served round-robin by user.

When a slot frees, it goes to the first job of the user whose turn it is; that user, if they
have more jobs waiting, goes to the back. So a user's burst never pushes others back and every
job gets its turn. The line needs no bound of its own: a job joins only after the ledger
reserved it within the user's limit of pending jobs, so it holds at most that many per user.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from enum import Enum

PlaceHook = Callable[[int], Awaitable[None]]
"""Told how many jobs are ahead of a waiting one, at first and whenever that changes."""


class Withdrawn(Exception):
    """The job left the line before its turn: cancelled, or the line closed."""


class _State(Enum):
    WAITING = "waiting"
    RUNNING = "running"  # holds a slot
    WITHDRAWN = "withdrawn"
    DONE = "done"  # left the line, its slot (if any) given back


class Ticket:
    """One job's place in the line, then its slot."""

    def __init__(self, line: Line, user: str) -> None:
        self.user = user
        self.ahead = 0  # jobs that get a slot before this one, while it waits
        self._line = line
        self._state = _State.WAITING
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> bool:
        return self._state is _State.WAITING

    async def turn(self, on_place: PlaceHook | None = None) -> None:
        """Wait for a slot; ``on_place`` hears the jobs ahead. Raises Withdrawn if withdrawn."""
        told: int | None = None
        while True:
            self._changed.clear()  # before reading: a change while on_place runs is not lost
            if self._state is not _State.WAITING:
                break
            if on_place is not None and self.ahead != told:
                told = self.ahead
                await on_place(told)
                continue
            await self._changed.wait()
        if self._state is not _State.RUNNING:
            raise Withdrawn()

    def withdraw(self) -> bool:
        """Take the job out of the line if it is still waiting; False if it already has a slot."""
        if self._state is not _State.WAITING:
            return False
        self._line._remove(self)
        self._set(_State.WITHDRAWN)
        return True

    def leave(self) -> None:
        """The job is over, however it ended: give its slot back, or its place. Idempotent."""
        if self._state is _State.WAITING:
            self._line._remove(self)
        elif self._state is _State.RUNNING:
            self._line._release()
        self._state = _State.DONE

    def _set(self, state: _State) -> None:
        self._state = state
        self._changed.set()

    def _move(self, ahead: int) -> None:
        if ahead != self.ahead:
            self.ahead = ahead
            self._changed.set()


class Line:
    """At most ``slots`` jobs run at once; the others wait their turn, round-robin by user."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        # Users with jobs waiting, in turn order; each user's jobs in the order they came.
        self._waiting: OrderedDict[str, deque[Ticket]] = OrderedDict()
        self._closed = False

    def join(self, user: str) -> Ticket:
        """A ticket for one of ``user``'s jobs: it runs at once if a slot is free, else waits."""
        ticket = Ticket(self, user)
        if self._closed:
            ticket._set(_State.WITHDRAWN)
            return ticket
        self._waiting.setdefault(user, deque()).append(ticket)
        self._serve()
        return ticket

    def close(self) -> None:
        """Give no more slots: every waiting job is withdrawn, and every job that joins later."""
        self._closed = True
        for tickets in list(self._waiting.values()):
            for ticket in list(tickets):
                ticket.withdraw()

    def _remove(self, ticket: Ticket) -> None:
        tickets = self._waiting[ticket.user]
        tickets.remove(ticket)
        if not tickets:
            del self._waiting[ticket.user]
        self._renumber()

    def _release(self) -> None:
        self._free += 1
        self._serve()

    def _serve(self) -> None:
        """Hand the free slots out, one job per user per turn, then renumber who is left."""
        while self._free and self._waiting:
            user, tickets = next(iter(self._waiting.items()))
            ticket = tickets.popleft()
            if tickets:
                self._waiting.move_to_end(user)
            else:
                del self._waiting[user]
            self._free -= 1
            ticket._set(_State.RUNNING)
        self._renumber()

    def _renumber(self) -> None:
        """Every waiting job's place: the users' first jobs in turn order, then their second..."""
        queues = list(self._waiting.values())
        ahead = 0
        for round_ in range(max(map(len, queues), default=0)):
            for tickets in queues:
                if round_ < len(tickets):
                    tickets[round_]._move(ahead)
                    ahead += 1
