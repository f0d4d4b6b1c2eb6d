"""Arrival order alone: a few commands get ready at once, the rest in the order they came."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bot.arrival import ArrivalOrder


class Command:
    """One command taking its place; it leaves when told to, or when its work ends."""

    def __init__(self, order: ArrivalOrder, name: str, entered: list[str]) -> None:
        self.name = name
        self.leave: Callable[[], None] | None = None
        self.finish = asyncio.Event()
        self.inside = asyncio.Event()
        self.task = asyncio.create_task(self._run(order, entered))

    async def _run(self, order: ArrivalOrder, entered: list[str]) -> None:
        async with order.place() as leave:
            self.leave = leave
            entered.append(self.name)
            self.inside.set()
            await self.finish.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_at_most_at_once_get_ready_and_the_rest_enter_in_the_order_they_came() -> None:
    order, entered = ArrivalOrder(at_once=2, hold_seconds=60), []
    commands = [Command(order, name, entered) for name in "abcde"]
    await settle()
    assert entered == ["a", "b"]
    commands[1].finish.set()  # ends while getting ready: its place goes to the oldest waiting
    await settle()
    assert entered == ["a", "b", "c"]
    commands[0].finish.set()
    commands[2].finish.set()
    await settle()
    assert entered == ["a", "b", "c", "d", "e"]
    for command in commands:
        command.finish.set()
    await asyncio.gather(*(command.task for command in commands))


async def test_leaving_early_lets_the_next_in_once_however_often_it_is_called() -> None:
    order, entered = ArrivalOrder(at_once=1, hold_seconds=60), []
    first, second, third = (Command(order, name, entered) for name in "abc")
    await settle()
    assert entered == ["a"] and first.leave is not None
    first.leave()  # its payment is leaving: it keeps running, no longer getting ready
    first.leave()
    await settle()
    assert entered == ["a", "b"]  # one place freed, not two
    first.finish.set()  # its end gives back nothing more
    await settle()
    assert entered == ["a", "b"]
    second.finish.set()
    await settle()
    assert entered == ["a", "b", "c"]
    third.finish.set()
    await asyncio.gather(first.task, second.task, third.task)


async def test_a_command_held_up_past_the_hold_time_gives_its_place_up() -> None:
    order, entered = ArrivalOrder(at_once=1, hold_seconds=0.05), []
    stuck = Command(order, "stuck", entered)  # e.g. waits on a slow platform
    waiting = Command(order, "next", entered)
    await settle()
    assert entered == ["stuck"]
    await asyncio.wait_for(waiting.inside.wait(), 5)
    assert not stuck.task.done()
    stuck.finish.set()
    waiting.finish.set()
    await asyncio.gather(stuck.task, waiting.task)


async def test_a_cancelled_command_gives_its_place_back() -> None:
    order, entered = ArrivalOrder(at_once=1, hold_seconds=60), []
    first, second = Command(order, "a", entered), Command(order, "b", entered)
    await settle()
    first.task.cancel()
    await settle()
    assert entered == ["a", "b"]
    second.finish.set()
    await second.task
