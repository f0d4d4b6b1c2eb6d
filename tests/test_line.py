"""The line alone: slots, round-robin turns by user, places told as they change, withdrawal."""

from __future__ import annotations

import asyncio

import pytest

from bot.line import Line, Withdrawn


class Job:
    """One job in the line: the places it was told, and when it got its slot."""

    def __init__(self, line: Line, name: str, started: list[str], *, quick: bool = False) -> None:
        self.name = name
        self.ticket = line.join(name[0])  # the user is the name's first letter
        self.places: list[int] = []
        self.task = asyncio.create_task(self._run(started, quick))

    async def _run(self, started: list[str], quick: bool) -> None:
        async def told(ahead: int) -> None:
            self.places.append(ahead)

        await self.ticket.turn(told)
        started.append(self.name)
        if quick:  # done as soon as it starts: its slot goes to the next
            self.ticket.leave()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_at_most_slots_jobs_run_and_a_freed_slot_goes_to_the_next() -> None:
    line = Line(2)
    tickets = [line.join(user) for user in "abc"]
    assert [ticket.waiting for ticket in tickets] == [False, False, True]
    tickets[0].leave()
    assert not tickets[2].waiting
    tickets[0].leave()  # leaving twice gives nothing back twice
    assert line.join("d").waiting


async def test_turns_go_round_robin_by_user_so_a_burst_cannot_push_others_back() -> None:
    line = Line(1)
    busy = line.join("z")
    started: list[str] = []
    names = ["a1", "a2", "b1", "b2", "c1"]  # a's and b's second jobs came before c's first
    jobs = [Job(line, name, started, quick=True) for name in names]
    await settle()
    assert [job.ticket.ahead for job in jobs] == [0, 3, 1, 4, 2]
    busy.leave()
    await asyncio.gather(*(job.task for job in jobs))
    assert started == ["a1", "b1", "c1", "a2", "b2"]


async def test_each_waiting_job_is_told_its_place_as_it_counts_down() -> None:
    line = Line(1)
    busy = line.join("z")
    started: list[str] = []
    jobs = [Job(line, f"{user}1", started) for user in "abcd"]
    await settle()
    running = busy
    for job in jobs:
        running.leave()
        await settle()
        assert started[-1] == job.name
        running = job.ticket
    assert [job.places for job in jobs] == [[0], [1, 0], [2, 1, 0], [3, 2, 1, 0]]


async def test_a_new_user_goes_ahead_of_second_jobs_which_are_told_they_moved_back() -> None:
    line = Line(1)
    line.join("z")
    started: list[str] = []
    first, second = Job(line, "a1", started), Job(line, "a2", started)
    await settle()
    newcomer = Job(line, "b1", started)
    await settle()
    assert (first.places, second.places, newcomer.places) == ([0], [1, 2], [1])


async def test_a_withdrawn_job_raises_and_the_jobs_behind_move_up() -> None:
    line = Line(1)
    line.join("z")
    started: list[str] = []
    jobs = [Job(line, f"{user}1", started) for user in "abc"]
    await settle()
    assert jobs[0].ticket.withdraw()
    assert not jobs[0].ticket.withdraw()
    await settle()
    with pytest.raises(Withdrawn):
        await jobs[0].task
    assert [jobs[1].places, jobs[2].places] == [[1, 0], [2, 1]]


async def test_a_job_with_a_slot_cannot_be_withdrawn() -> None:
    ticket = Line(1).join("a")
    assert not ticket.waiting and not ticket.withdraw()
    await ticket.turn()  # returns at once


async def test_a_cancelled_job_gives_back_its_place_or_the_slot_it_was_just_given() -> None:
    line = Line(1)
    holder = line.join("z")
    started: list[str] = []
    gone, behind = Job(line, "a1", started), Job(line, "b1", started)
    await settle()
    gone.task.cancel()
    gone.ticket.leave()  # what the job's own clean-up does, however it ended
    await settle()
    assert behind.places == [1, 0]
    holder.leave()  # the slot is b's now, but b's task is cancelled before it runs again
    behind.task.cancel()
    behind.ticket.leave()
    assert not line.join("c").waiting
    assert started == []


async def test_closing_the_line_withdraws_everyone_waiting_and_everyone_later() -> None:
    line = Line(1)
    running = line.join("z")
    started: list[str] = []
    jobs = [Job(line, f"{user}1", started) for user in "ab"]
    await settle()
    line.close()
    results = await asyncio.gather(*(job.task for job in jobs), return_exceptions=True)
    assert all(isinstance(result, Withdrawn) for result in results)
    running.leave()  # a free slot, yet the closed line gives it to no one
    late = line.join("c")
    with pytest.raises(Withdrawn):
        await late.turn()
    assert started == []


async def test_with_many_users_every_first_job_comes_before_any_second_one() -> None:
    line = Line(2)
    busy = [line.join("z"), line.join("z")]
    started: list[str] = []
    users = [chr(0x4E00 + n) for n in range(500)]  # 500 one-letter user names
    jobs = [Job(line, f"{user}{n}", started, quick=True) for user in users for n in (1, 2)]
    for ticket in busy:
        ticket.leave()
    await asyncio.gather(*(job.task for job in jobs))
    assert started == [f"{user}1" for user in users] + [f"{user}2" for user in users]
