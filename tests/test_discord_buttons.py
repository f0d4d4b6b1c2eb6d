"""Discord's buttons end to end: Again, Vary and Cancel pressed through the real discord.py client
of ``imagebot run`` on the fake Discord, paying the sandbox gateway, with the real ledger."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from fake_discord import FLAG_EPHEMERAL, FakeDiscord, File, Interaction, User
from imagebot_cli import cli_env, imagebot
from local import until
from pictures import png
from test_cancel import rows
from test_discord import (
    EDIT_PATH,
    REFUSAL,
    Stack,
    ephemeral_text,
    of,
    private_answer,
    replies_to,
    running,
    serving,
    started_stack,
    with_files,
)

import adapters.status

AGAIN, VARY, CANCEL = "🔁 Again", "🎨 Vary", "✖ Cancel"
PRIMARY, SECONDARY, DANGER = 1, 2, 4
CALLBACK_DEFERRED = 5
CANCELLED = "Cancelled as you asked. Nothing was charged."
NOT_YOURS = "Only the person who asked for that picture can cancel it."
EXPIRED = (
    "That button has expired (the bot keeps results for 30 days); send the command again. "
    "Nothing was charged."
)
GONE = "That picture is no longer in this chat, so I can't use it again; nothing was charged."
SLOW_FOX = "/imagegen -m gpt-image-2 a slow fox"  # a 202 model: polled until the job is done


def buttons_of(message: dict[str, Any]) -> list[tuple[str, int]]:
    """(label, style) of each button under ``message``."""
    return [(b["label"], b["style"]) for row in message["components"] for b in row["components"]]


def now(fake: FakeDiscord, message: dict[str, Any]) -> dict[str, Any] | None:
    """``message`` as it stands in its channel (edits applied); None once deleted."""
    channel = int(message["channel_id"])
    return next((m for m in fake.messages_in(channel) if m["id"] == message["id"]), None)


def data_of(message: dict[str, Any], label: str) -> str:
    """The custom id of the button of ``message`` whose label starts with ``label``."""
    buttons = [b for row in message["components"] for b in row["components"]]
    return next(b["custom_id"] for b in buttons if b["label"].startswith(label))


async def acked(fake: FakeDiscord, interaction: Interaction) -> Interaction:
    """``interaction``, once the bot acknowledged it (within Discord's 3 s)."""
    call = await fake.wait_for(of(interaction, "create_interaction_response"))
    assert call.ok, call.error
    assert interaction.ack_delay is not None and interaction.ack_delay < 3
    return interaction


async def press(fake: FakeDiscord, message: dict[str, Any], user: User, label: str) -> Interaction:
    """``user`` presses the button ``label`` on ``message`` as it stands; acknowledged."""
    current = now(fake, message)
    assert current is not None, "the message is gone"
    return await acked(fake, fake.press(current, user, data_of(current, label)))


async def picture_reply(fake: FakeDiscord, command: dict[str, Any]) -> dict[str, Any]:
    """The bot's reply with pictures to the message ``command``."""
    call = await fake.wait_for(with_files(replies_to(command)))
    assert call.ok, call.error
    return dict(call.result)


async def public_pictures(fake: FakeDiscord, interaction: Interaction) -> dict[str, Any]:
    """The pictures a press or a slash command answered with, in public, in place of its
    public "thinking…"."""
    call = await fake.wait_for(with_files(of(interaction, "edit_original_response")))
    assert call.ok, call.error
    assert interaction.response_type == CALLBACK_DEFERRED
    assert not call.result["flags"] & FLAG_EPHEMERAL
    return dict(call.result)


async def cancellable(read: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """The status ``read`` gives, once it shows a Cancel button."""

    def shown() -> dict[str, Any] | None:
        status = read()
        return status if status and CANCEL in dict(buttons_of(status)) else None

    await until(shown, 10)
    status = shown()
    assert status is not None
    return status


async def message_status(fake: FakeDiscord, command: dict[str, Any]) -> dict[str, Any]:
    """The status replying to the message ``command``, once it shows a Cancel button."""
    posted = await fake.wait_for(lambda call: replies_to(command)(call) and not call.files)
    return await cancellable(lambda: now(fake, posted.result))


async def told(fake: FakeDiscord, command: dict[str, Any], text: str) -> None:
    """Wait for the bot to reply ``text`` to the message ``command``."""
    replied = replies_to(command)
    await fake.wait_for(lambda call: replied(call) and call.payload.get("content") == text)


async def settled_total(stack: Stack, tmp_path: Path) -> int:
    """What ``imagebot spend --json`` says was spent, checked equal to what the sandbox settled."""
    code, out = await imagebot(
        "spend", "--json", env=cli_env(stack.gateway.url, stack.database), cwd=tmp_path
    )
    assert code == 0
    settled = sum(settlement.amount_micro for settlement in stack.gateway.settlements)
    assert json.loads(out)["total_usd"] == f"{settled // 10**6}.{settled % 10**6:06d}"
    return settled


# Again and Vary


@pytest.fixture
async def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    async with running(tmp_path, monkeypatch) as started:
        yield started


async def test_again_pays_for_a_new_picture_under_buttons_of_its_own(
    stack: Stack, tmp_path: Path
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    first = await picture_reply(fake, fake.send_message(channel, alice, "/imagegen a red fox"))

    again = await press(fake, first, alice, AGAIN)
    second = await public_pictures(fake, again)

    priced = [(f"{AGAIN} · $0.0525", PRIMARY), (f"{VARY} · $0.0525", SECONDARY)]
    assert buttons_of(first) == buttons_of(second) == priced
    assert second["content"] == "nano-banana · 1024x1024 · $0.0525"
    assert second["message_reference"]["message_id"] == first["id"]  # under the pressed one
    assert second["interaction_metadata"]["user"]["id"] == str(alice.id)
    before, after = stack.paid_orders()
    assert before.body == after.body and after.body["prompt"] == "a red fox"
    assert [s.model for s in stack.gateway.settlements] == ["google/nano-banana"] * 2
    assert await settled_total(stack, tmp_path) == 2 * 52_500


@pytest.mark.parametrize("how", ["message", "slash"])
async def test_again_on_a_three_picture_edit_sends_the_same_pictures(
    stack: Stack, how: str
) -> None:
    """A message command's pictures are fetched again from its message, a slash command's from
    their attachment links."""
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    sources = [File(f"{colour}.png", png(90, 60, colour)) for colour in ("red", "green", "blue")]
    if how == "message":
        command = "/img2img -m nano-banana fuse these"
        first = await picture_reply(fake, fake.send_message(channel, alice, command, files=sources))
    else:
        options = {"prompt": "fuse these", "model": "nano-banana"}
        options |= dict(zip(("image", "image2", "image3"), sources, strict=True))
        first = await public_pictures(fake, fake.slash_command(channel, alice, "img2img", options))

    await public_pictures(fake, await press(fake, first, alice, AGAIN))

    before, after = stack.paid_orders()
    assert before.path == after.path == EDIT_PATH
    assert before.inputs == after.inputs == tuple(source.data for source in sources)
    assert before.body == after.body
    assert len(stack.gateway.settlements) == 2


async def test_vary_edits_the_result_picture_with_an_editing_model(stack: Stack) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    first = await picture_reply(fake, fake.send_message(channel, alice, "/imagegen -m flux a fox"))
    drawn = fake.file_at(first["attachments"][0]["url"])

    varied = await public_pictures(fake, await press(fake, first, alice, VARY))

    assert buttons_of(first) == [(f"{AGAIN} · $0.042", PRIMARY), (f"{VARY} · $0.021", SECONDARY)]
    assert varied["content"] == "gpt-image · 1024x1024 · $0.021"
    _, vary = stack.paid_orders()
    assert (vary.path, vary.model, vary.inputs) == (EDIT_PATH, "openai/gpt-image-1", (drawn,))
    assert vary.body["prompt"] == "a fox"
    assert [s.model for s in stack.gateway.settlements] == [
        "black-forest/flux-1.1-pro",
        "openai/gpt-image-1",
    ]


@pytest.mark.parametrize(
    ("lost", "answer"),
    [
        ("deleted", GONE),
        ("unreadable", "I couldn't read that picture's message; nothing was charged. Try again."),
    ],
)
async def test_again_without_its_picture_says_why_and_pays_nothing(
    stack: Stack, lost: str, answer: str
) -> None:
    fake = stack.discord
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    cat = fake.send_message(channel, alice, "my cat", files=[File("cat.png", png())])
    command = fake.send_message(channel, alice, "/img2img add a hat", reply_to=int(cat["id"]))
    result = await picture_reply(fake, command)
    if lost == "deleted":
        fake.delete_message(cat)
    else:  # neither gone nor forbidden, and not retried (discord.py retries a 5xx for 16 s)
        fake.fail("get_message", 400, 50035, "Invalid Form Body")

    assert await ephemeral_text(fake, await press(fake, result, alice, AGAIN)) == answer
    assert stack.gateway.payments_received == 1 and len(stack.paid_orders()) == 1


# Who may press, and what


async def test_a_second_user_pays_for_their_press_and_one_over_budget_pays_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch, user_daily_limit_usd="0.06") as stack:  # one each
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice, bob = fake.user("alice"), fake.user("bob")
        first = await picture_reply(fake, fake.send_message(channel, alice, "/imagegen a fox"))

        refused = await ephemeral_text(fake, await press(fake, first, alice, AGAIN))
        assert refused.startswith("Daily limit reached")
        assert stack.gateway.payments_received == 1
        bobs = await public_pictures(fake, await press(fake, first, bob, AGAIN))

        assert bobs["interaction_metadata"]["user"]["id"] == str(bob.id)
        assert await rows(tmp_path) == [
            (f"discord:{alice.id}", "settled", None),
            (f"discord:{bob.id}", "settled", None),
        ]
        assert await settled_total(stack, tmp_path) == 2 * 52_500


async def test_outsiders_forged_and_expired_buttons_pay_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDiscord()
    alice, mallory = fake.user("alice"), fake.user("mallory")
    async with running(tmp_path, monkeypatch, fake, allowed_users=f"discord:{alice.id}") as stack:
        channel = fake.guild("Artists").channel("general")
        result = await picture_reply(fake, fake.send_message(channel, alice, "/imagegen a fox"))
        again = data_of(result, AGAIN)

        # Someone not allowed to spend: told so privately, even in a guild.
        outsider = await press(fake, result, mallory, AGAIN)
        assert await ephemeral_text(fake, outsider) == REFUSAL
        # Data the message does not carry, or no button of the bot's carries: never answered.
        forged = [
            fake.press(result, alice, custom_id)
            for custom_id in (
                f"again:{secrets.token_urlsafe(16)[:22]}",
                f"cancel:{10**6}",
                f"{again}x",
                "again:short",
                "refund-me",
            )
        ]
        # A result the ledger no longer keeps: answered, privately.
        async with aiosqlite.connect(stack.database) as db:
            await db.execute("UPDATE results SET created_at = created_at - 31 * 86400")
            await db.commit()
        expired = await press(fake, result, alice, AGAIN)
        assert await ephemeral_text(fake, expired) == EXPIRED

    assert all(interaction.acked_at is None for interaction in forged)
    assert stack.gateway.payments_received == 1 and len(stack.paid_orders()) == 1


async def test_buttons_sent_before_a_restart_are_answered_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDiscord()
    alice, bob = fake.user("alice"), fake.user("bob")
    channel = fake.guild("Artists").channel("general")
    async with started_stack(tmp_path, fake) as stack:
        async with serving(stack, monkeypatch):
            command = fake.send_message(channel, alice, "/imagegen a fox")
            in_guild = await picture_reply(fake, command)
            command = fake.send_message(fake.dm(bob), bob, "/imagegen a cat")
            in_dm = await picture_reply(fake, command)
        # A new bot process on the same ledger, now for alice only.
        async with serving(stack, monkeypatch, allowed_users=f"discord:{alice.id}"):
            again = await public_pictures(fake, await press(fake, in_guild, alice, AGAIN))
            refused = await ephemeral_text(fake, await press(fake, in_dm, bob, AGAIN))

        assert again["content"] == "nano-banana · 1024x1024 · $0.0525"
        assert refused == REFUSAL  # in a DM, an outsider is told
        assert len(stack.gateway.settlements) == 3
        assert await settled_total(stack, tmp_path) == 3 * 52_500


# Cancel


@pytest.fixture
def quick_statuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapters.status, "STATUS_EDIT_SECONDS", 0.1)


async def holding_the_slot(stack: Stack, user: User) -> dict[str, Any]:
    """``user``'s job on a 202 model that holds the one slot until cancelled: its status."""
    stack.gateway.job_seconds = 60
    channel = stack.discord.guild("Artists").channel("general")
    command = stack.discord.send_message(channel, user, SLOW_FOX)
    return await message_status(stack.discord, command)


@pytest.mark.usefixtures("quick_statuses")
async def test_cancel_is_for_the_requester_alone_and_stops_a_slow_job_between_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch, max_concurrent_jobs="1") as stack:
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice, bob = fake.user("alice"), fake.user("bob")
        bobs_status = await holding_the_slot(stack, bob)
        waiting = fake.slash_command(channel, alice, "imagegen", {"prompt": "a fox"})
        alices_status = await cancellable(lambda: waiting.original)
        assert alices_status["content"].startswith("Waiting in line for nano-banana")

        not_yours = await press(fake, alices_status, bob, CANCEL)
        assert await private_answer(fake, not_yours) == NOT_YOURS
        stack.gateway.latency = 0.5  # time for alice's status to say she is drawing
        cancel = await press(fake, bobs_status, bob, CANCEL)
        assert await private_answer(fake, cancel) == "Cancelled 1 job; nothing was charged."
        await told(fake, {"id": bobs_status["message_reference"]["message_id"]}, CANCELLED)
        alices = await public_pictures(fake, waiting)  # her job went on, and got the slot

        assert not_yours.response["flags"] == cancel.response["flags"] == FLAG_EPHEMERAL
        assert buttons_of(bobs_status) == buttons_of(alices_status) == [(CANCEL, DANGER)]
        assert now(fake, bobs_status) is None  # the status went; the answer says what happened
        drawing = [call for call in fake.sent if of(waiting, "edit_original_response")(call)]
        started = next(c for c in drawing if c.payload["content"].startswith("Drawing with"))
        assert started.payload["components"] == []  # once drawing, nothing to cancel for free
        assert [label for label, _ in buttons_of(alices)] == [
            f"{AGAIN} · $0.0525",
            f"{VARY} · $0.0525",
        ]
        assert stack.gateway.payments_received == 2  # bob's job was paid for, then not charged
        assert [s.model for s in stack.gateway.settlements] == ["google/nano-banana"]
        assert await rows(tmp_path) == [
            (f"discord:{bob.id}", "failed", "cancelled by the requester"),
            (f"discord:{alice.id}", "settled", None),
        ]
        assert await settled_total(stack, tmp_path) == 52_500


@pytest.mark.usefixtures("quick_statuses")
async def test_slash_cancel_stops_two_waiting_jobs_and_the_button_a_third(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch, max_concurrent_jobs="1") as stack:
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice, bob = fake.user("alice"), fake.user("bob")
        await holding_the_slot(stack, bob)
        commands = [fake.send_message(channel, alice, f"/imagegen fox {n}") for n in (1, 2)]
        for command in commands:
            await message_status(fake, command)

        everything = fake.slash_command(channel, alice, "cancel")
        assert await private_answer(fake, everything) == "Cancelled 2 jobs; nothing was charged."
        for command in commands:
            await told(fake, command, CANCELLED)
        third = fake.send_message(channel, alice, "/imagegen fox 3")
        cancel = await press(fake, await message_status(fake, third), alice, CANCEL)
        assert await private_answer(fake, cancel) == "Cancelled 1 job; nothing was charged."
        await told(fake, third, CANCELLED)
        stop_bob = fake.send_message(channel, bob, "/cancel")
        await told(fake, stop_bob, "Cancelled 1 job; nothing was charged.")

        assert stack.gateway.settlements == [] and stack.gateway.payments_received == 1
        assert [status for _, status, _ in await rows(tmp_path)] == ["failed"] * 4
        assert await settled_total(stack, tmp_path) == 0
