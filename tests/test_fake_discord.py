"""The fake Discord, driven by the real discord.py (client, gateway, app commands) over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from io import BytesIO
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route
from fake_discord import UPLOAD_MAX_BYTES, Call, FakeDiscord, File
from pictures import png

from adapters.discord import follow_gateway


class Bot(discord.Client):
    """A test client that takes its gateway address from ``GET /gateway/bot``."""

    def __init__(
        self, intents: discord.Intents | None = None, shard: tuple[int, int] | None = None
    ) -> None:
        # on_ready waits guild_ready_timeout after the last GUILD_CREATE (2 s by default).
        super().__init__(
            intents=intents or discord.Intents.default(),
            guild_ready_timeout=0.05,
            shard_id=None if shard is None else shard[0],
            shard_count=None if shard is None else shard[1],
        )
        self.tree = app_commands.CommandTree(self)
        self.ready = asyncio.Event()
        self.resumed = asyncio.Event()
        self.inbox: asyncio.Queue[discord.Message] = asyncio.Queue()

    async def setup_hook(self) -> None:
        _, url, _ = await self.http.get_bot_gateway()
        follow_gateway(self, url)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        pass  # discord.py waits 5 s before identifying again

    async def on_ready(self) -> None:
        self.ready.set()

    async def on_resumed(self) -> None:
        self.resumed.set()

    async def on_message(self, message: discord.Message) -> None:
        if message.author != self.user:
            self.inbox.put_nowait(message)


def with_message_content() -> discord.Intents:
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


@contextlib.asynccontextmanager
async def running(client: Bot, fake: FakeDiscord) -> AsyncIterator[Bot]:
    """Run ``client`` against ``fake`` until it is ready; close it afterwards."""
    task = asyncio.create_task(client.start(fake.token))
    ready = asyncio.create_task(client.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        await client.close()
        if task.done():
            task.result()  # raises what stopped the client
        task.cancel()
        raise AssertionError("the client did not get ready in 5 s")
    try:
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)


async def next_message(client: Bot) -> discord.Message:
    return await asyncio.wait_for(client.inbox.get(), 5)


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_url)
    yield fake
    await fake.close()


async def test_the_client_logs_in_and_gets_ready_with_its_guild(fake: FakeDiscord) -> None:
    guild = fake.guild("Artists", channels=["general", "gallery"])

    async with running(Bot(), fake) as client:
        session = await fake.wait_ready()
        heartbeat = await fake.wait_received(1)
        assert client.user is not None and client.user.id == fake.application_id
        assert client.application_id == fake.application_id
        [joined] = client.guilds
        assert (joined.id, joined.name) == (guild.id, "Artists")
        assert [channel.name for channel in joined.text_channels] == ["general", "gallery"]
        assert joined.me is not None and joined.me.id == fake.bot.id

    assert [call.name for call in fake.sent] == [
        "get_current_user",
        "get_current_application",
        "get_gateway_bot",
    ]
    [connection] = fake.connections
    assert connection.query == {"v": "10", "encoding": "json", "compress": "zlib-stream"}
    assert session.intents == discord.Intents.default().value
    assert [event["t"] for event in session.events] == ["READY", "GUILD_CREATE"]
    assert heartbeat.data is None  # sent at once after HELLO, before any sequence number
    # client.close() asks for 1000, but with aiohttp 3.14 its reader task closes first with 4000.
    assert connection.close_code in (1000, 4000) and not connection.closed_by_server


async def test_a_message_gets_a_reply_with_a_file_the_cdn_serves(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice", "Alice")
    sketch, drawn = png(320, 200), png(640, 480)

    async with running(Bot(with_message_content()), fake) as client:
        sent = fake.send_message(
            channel, alice, "draw a fox", files=[File("my sketch.png", sketch)]
        )
        message = await next_message(client)
        [attachment] = message.attachments
        received = await attachment.read()
        await message.channel.typing()
        reply = await message.reply("here it is", file=discord.File(BytesIO(drawn), "fox.png"))
        async with aiohttp.ClientSession() as http:
            served = await (await http.get(reply.attachments[0].url)).read()
            proxied = await (await http.get(reply.attachments[0].proxy_url)).read()
            unsigned = await http.get(reply.attachments[0].url.split("?")[0])
            assert (unsigned.status, await unsigned.text()) == (
                404,
                "This content is no longer available.",
            )

    assert message.content == "draw a fox" and message.author.id == alice.id
    assert (attachment.filename, attachment.width, attachment.height) == ("my_sketch.png", 320, 200)
    assert attachment.content_type == "image/png" and received == sketch
    [call] = fake.calls("create_message")
    assert [(upload.filename, upload.data) for upload in call.files] == [("fox.png", drawn)]
    assert call.payload["message_reference"]["message_id"] == int(sent["id"])
    assert reply.reference is not None and reply.reference.message_id == int(sent["id"])
    assert reply.type is discord.MessageType.reply
    assert (reply.attachments[0].width, reply.attachments[0].size) == (640, len(drawn))
    assert served == proxied == drawn
    assert fake.typing == [channel.id]
    assert [m["content"] for m in fake.messages_in(channel)] == ["draw a fox", "here it is"]


async def test_an_uncached_replied_to_message_is_fetched(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    first = fake.send_message(channel, alice, "a red fox")  # before the bot connects: not cached

    async with running(Bot(with_message_content()), fake) as client:
        fake.send_message(
            channel, alice, "make it blue", reply_to=int(first["id"]), include_referenced=False
        )
        reply = await next_message(client)
        assert reply.reference is not None and reply.reference.resolved is None
        assert reply.reference.message_id is not None
        fetched = await reply.channel.fetch_message(reply.reference.message_id)
        fake.send_message(channel, alice, "and a hat", reply_to=int(first["id"]))
        nested = await next_message(client)
        with pytest.raises(discord.NotFound) as missing:
            await reply.channel.fetch_message(1)

    assert (fetched.id, fetched.content) == (int(first["id"]), "a red fox")
    assert fake.calls("get_message")[0].params["message_id"] == int(first["id"])
    assert nested.reference is not None
    assert isinstance(nested.reference.resolved, discord.Message)
    assert nested.reference.resolved.content == "a red fox"
    assert (missing.value.status, missing.value.code, missing.value.text) == (
        404,
        10008,
        "Unknown Message",
    )


async def test_without_the_message_content_intent_guild_texts_arrive_blank(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")

    async with running(Bot(), fake) as client:
        fake.send_message(channel, alice, "draw a fox", files=[File("a.png", png())])
        fake.send_message(channel, alice, f"{fake.bot.mention} draw a cat")
        fake.send_message(fake.dm(alice), alice, "draw a dog")
        messages = [await next_message(client) for _ in range(3)]

    assert [message.content for message in messages] == [
        "",
        f"<@{fake.bot.id}> draw a cat",
        "draw a dog",
    ]
    assert messages[0].attachments == []
    assert isinstance(messages[2].channel, discord.DMChannel)


async def test_commands_sync_and_a_deferred_command_edits_in_a_file(fake: FakeDiscord) -> None:
    guild = fake.guild("Artists")
    channel = guild.channel("general")
    alice = fake.user("alice")
    source, drawn = png(100, 100), png(512, 512)
    client = Bot()
    seen: list[bytes] = []

    @client.tree.command(description="Draw a picture")
    @app_commands.describe(prompt="What to draw", image="A picture to start from")
    async def imagine(
        interaction: discord.Interaction, prompt: str, image: discord.Attachment | None = None
    ) -> None:
        await interaction.response.defer(thinking=True)
        seen.append(await image.read() if image else b"")
        await interaction.edit_original_response(
            content=f"{prompt}: done", attachments=[discord.File(BytesIO(drawn), "out.png")]
        )

    async with running(client, fake):
        synced = await client.tree.sync()
        assert await client.tree.sync(guild=discord.Object(guild.id)) == []
        with pytest.raises(ValueError, match="has no option"):
            fake.slash_command(channel, alice, "imagine", {"promt": "typo"})
        interaction = fake.slash_command(
            channel, alice, "imagine", {"prompt": "a fox", "image": File("in.png", source)}
        )
        await fake.wait_for("edit_original_response", 5)

    [command] = fake.commands
    assert (command["name"], command["description"]) == ("imagine", "Draw a picture")
    assert [(option["name"], option["type"]) for option in command["options"]] == [
        ("prompt", 3),
        ("image", 11),
    ]
    assert fake.commands_for(guild) == []
    assert [app_command.id for app_command in synced] == [int(command["id"])]
    assert interaction.payload["data"]["id"] == command["id"]
    assert interaction.payload["context"] == 0
    assert interaction.payload["authorizing_integration_owners"] == {"0": str(guild.id)}
    assert interaction.payload["member"]["user"]["id"] == str(alice.id)
    assert seen == [source]
    assert interaction.response_type == 5
    assert interaction.ack_delay is not None and interaction.ack_delay < 3
    original = interaction.original
    assert original is not None and original["content"] == "a fox: done"
    assert original["flags"] == 0  # no longer loading
    assert fake.file_at(original["attachments"][0]["url"]) == drawn
    assert original["interaction_metadata"]["user"]["id"] == str(alice.id)
    assert fake.messages_in(channel) == [original]


async def test_the_first_followup_after_a_deferral_edits_the_loading_message(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    client = Bot()

    @client.tree.command(description="Ask something")
    async def ask(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("first", wait=True)
        await interaction.followup.send("secret", ephemeral=True, wait=True)

    async with running(client, fake):
        await client.tree.sync()
        interaction = fake.slash_command(fake.dm(alice), alice, "ask")
        await fake.wait_for(lambda call: call.name == "create_followup" and call.ok, since=0)
        await fake.wait_for(
            lambda call: call.name == "create_followup" and call.payload["content"] == "secret"
        )

    assert interaction.payload["context"] == 1 and "user" in interaction.payload
    assert interaction.original is not None and interaction.original["content"] == "first"
    assert [m["content"] for m in interaction.followups] == ["secret"]
    assert interaction.followups[0]["flags"] == 64
    assert [m["content"] for m in fake.messages_in(fake.dm(alice))] == ["first"]
    assert fake.messages_in(channel) == []


async def test_autocomplete_choices_are_recorded(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    client = Bot()

    @client.tree.command(description="Draw in a style")
    async def style(interaction: discord.Interaction, name: str) -> None:
        await interaction.response.send_message(name)

    @style.autocomplete("name")
    async def style_names(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = ["fox", "folk", "fauve"]
        return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(current)]

    async with running(client, fake):
        await client.tree.sync()
        interaction = fake.autocomplete(channel, alice, "style", {"name": "fo"}, focused="name")
        call = await fake.wait_for("create_interaction_response", 5)

    assert call.interaction_id == interaction.id and call.ok
    assert interaction.response_type == 8
    assert interaction.choices == [
        {"name": "fox", "value": "fox"},
        {"name": "folk", "value": "folk"},
    ]
    [option] = interaction.payload["data"]["options"]
    assert option == {"type": 3, "name": "name", "value": "fo", "focused": True}


async def test_a_rate_limited_request_is_retried_after_retry_after(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")

    async with running(Bot(), fake) as client:
        text_channel = client.get_channel(channel.id)
        assert isinstance(text_channel, discord.TextChannel)
        fake.flood("create_message", retry_after=0.05)
        message = await text_channel.send("hello")

    assert message.content == "hello"
    calls = fake.calls("create_message")
    assert [call.status for call in calls] == [429, 200]
    assert calls[0].error == {
        "message": "You are being rate limited.",
        "retry_after": 0.05,
        "global": False,
    }
    assert calls[1].at - calls[0].at >= 0.05


async def test_the_bot_edits_and_deletes_its_own_messages_only(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")

    async with running(Bot(with_message_content()), fake) as client:
        fake.send_message(channel, alice, "hi")
        theirs = await next_message(client)
        mine = await theirs.channel.send("Drawing…")
        edited = await mine.edit(content="Done")
        with pytest.raises(discord.Forbidden) as refused:
            await theirs.edit(content="hijacked")
        await theirs.add_reaction("👍")
        await edited.delete()

    assert (edited.content, edited.edited_at is not None) == ("Done", True)
    assert (refused.value.status, refused.value.code) == (403, 50005)
    assert [call.name for call in fake.sent if call.ok][-4:] == [
        "create_message",
        "edit_message",
        "add_reaction",
        "delete_message",
    ]
    assert [m["content"] for m in fake.messages_in(channel)] == ["hi"]


class Deletions(Bot):
    """A client that also notes the ids of messages it hears were deleted."""

    def __init__(self) -> None:
        super().__init__(with_message_content())
        self.deleted: asyncio.Queue[int] = asyncio.Queue()

    async def on_raw_message_delete(self, event: discord.RawMessageDeleteEvent) -> None:
        self.deleted.put_nowait(event.message_id)


async def test_a_message_its_author_deletes_is_gone_for_the_bot(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    picture = fake.send_message(channel, alice, "my cat", files=[File("cat.png", png())])

    async with running(Deletions(), fake) as client:
        fake.delete_message(picture)
        deleted = await asyncio.wait_for(client.deleted.get(), 5)
        partial = client.get_partial_messageable(channel.id)
        with pytest.raises(discord.NotFound) as missing:
            await partial.fetch_message(int(picture["id"]))

    assert deleted == int(picture["id"])
    assert (missing.value.status, missing.value.code) == (404, 10008)
    assert fake.messages_in(channel) == []
    with pytest.raises(ValueError, match="to delete"):
        fake.delete_message(picture)


async def test_uploads_over_10_mib_are_refused_with_413(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")

    async with running(Bot(), fake) as client:
        text_channel = client.get_channel(channel.id)
        assert isinstance(text_channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as refused:
            await text_channel.send(file=discord.File(BytesIO(bytes(UPLOAD_MAX_BYTES + 1)), "a"))
        largest = await text_channel.send(file=discord.File(BytesIO(bytes(UPLOAD_MAX_BYTES)), "b"))

    assert (refused.value.status, refused.value.code, refused.value.text) == (
        413,
        40005,
        "Request entity too large",
    )
    assert largest.attachments[0].size == UPLOAD_MAX_BYTES
    assert [m["attachments"][0]["filename"] for m in fake.messages_in(channel)] == ["b"]


async def test_a_privileged_intent_not_enabled_closes_the_gateway_with_4014(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeDiscord(privileged_intents=0)
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_url)
    client = Bot(with_message_content())
    try:
        with pytest.raises(discord.PrivilegedIntentsRequired):
            await asyncio.wait_for(client.start(fake.token), 5)
    finally:
        await client.close()
        await fake.close()

    [connection] = fake.connections
    assert (connection.close_code, connection.closed_by_server) == (4014, True)
    assert fake.sessions == []


class ManualClock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_late_ack_is_an_unknown_interaction_and_old_tokens_are_invalid(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    clock = ManualClock()
    fake.clock = clock
    client = Bot()
    waiting = asyncio.Event()
    go_on = asyncio.Event()
    outcome: asyncio.Future[discord.HTTPException] = asyncio.get_running_loop().create_future()

    @client.tree.command(description="Slow")
    async def slow(interaction: discord.Interaction, when: str) -> None:
        try:
            if when == "late":
                waiting.set()
                await go_on.wait()
                await interaction.response.defer()
            else:
                await interaction.response.defer()
                waiting.set()
                await go_on.wait()
                await interaction.edit_original_response(content="done")
        except discord.HTTPException as exc:
            outcome.set_result(exc)

    async with running(client, fake):
        await client.tree.sync()
        late = fake.slash_command(channel, alice, "slow", {"when": "late"})
        await asyncio.wait_for(waiting.wait(), 5)
        clock.now += 3.5
        go_on.set()
        too_late = await asyncio.wait_for(outcome, 5)

        waiting.clear()
        go_on.clear()
        outcome = asyncio.get_running_loop().create_future()
        early = fake.slash_command(channel, alice, "slow", {"when": "early"})
        await asyncio.wait_for(waiting.wait(), 5)
        clock.now += 15 * 60 + 1
        go_on.set()
        expired = await asyncio.wait_for(outcome, 5)

    assert (too_late.status, too_late.code, too_late.text) == (404, 10062, "Unknown interaction")
    assert late.acked_at is None and late.ack_delay is None
    assert early.ack_delay == 0.0
    assert (expired.status, expired.code, expired.text) == (401, 50027, "Invalid Webhook Token")


async def test_a_reconnect_request_resumes_the_session_and_replays_missed_events(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")

    async with running(Bot(with_message_content()), fake) as client:
        session = await fake.wait_ready()
        fake.request_reconnect()
        fake.send_message(channel, alice, "while you were away")
        message = await next_message(client)
        await asyncio.wait_for(client.resumed.wait(), 5)

    assert message.content == "while you were away"
    assert session.resumes == 1 and fake.sessions == [session]
    assert [connection.path for connection in fake.connections] == ["/gateway", "/gateway-resume"]
    assert fake.connections[0].close_code == 4000  # discord.py's own code when it reconnects
    assert [frame.op for frame in fake.received if frame.op in (2, 6)] == [2, 6]


async def test_an_invalidated_session_identifies_anew_through_follow_gateway(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")

    async with running(Bot(with_message_content()), fake) as client:
        first = await fake.wait_ready()
        fake.invalidate_session()
        second = await fake.wait_ready()
        fake.send_message(channel, alice, "hello again")
        message = await next_message(client)

    assert second is not first and first.ended
    assert message.content == "hello again"
    # discord.py goes back to DEFAULT_GATEWAY, which follow_gateway sends to the fake.
    assert [connection.path for connection in fake.connections] == ["/gateway", "/gateway"]


async def test_a_plain_client_connects_where_default_gateway_points(
    fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    client = discord.Client(intents=discord.Intents.default())
    task = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_ready(5)
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)

    assert "get_gateway_bot" not in [call.name for call in fake.sent]  # Client never asks


async def test_an_auto_sharded_client_follows_gateway_bot_by_itself(fake: FakeDiscord) -> None:
    fake.guild("Artists")
    client = discord.AutoShardedClient(intents=discord.Intents.default())
    task = asyncio.create_task(client.start(fake.token))
    try:
        session = await fake.wait_ready(5)
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)

    assert "get_gateway_bot" in [call.name for call in fake.sent]
    assert session.shard == [0, 1]


async def test_each_shard_gets_its_own_guilds_and_the_dms_go_to_shard_0(
    fake: FakeDiscord,
) -> None:
    left = fake.guild("Left", shard=(0, 2)).channel("general")
    right = fake.guild("Right", shard=(1, 2)).channel("general")
    alice = fake.user("alice")
    first = Bot(with_message_content(), shard=(0, 2))
    second = Bot(with_message_content(), shard=(1, 2))

    async with running(first, fake), running(second, fake):
        assert [guild.name for guild in first.guilds] == ["Left"]
        assert [guild.name for guild in second.guilds] == ["Right"]
        fake.send_message(right, alice, "to the right")
        fake.send_message(left, alice, "to the left")
        fake.send_message(fake.dm(alice), alice, "in private")
        assert (await next_message(second)).content == "to the right"
        assert (await next_message(first)).content == "to the left"
        assert (await next_message(first)).content == "in private"

    assert [frame.data["shard"] for frame in fake.received if frame.op == 2] == [[0, 2], [1, 2]]
    assert [(shard, data["content"]) for shard, data in fake.delivered("MESSAGE_CREATE")] == [
        ([0, 2], "to the left"),
        ([0, 2], "in private"),
        ([1, 2], "to the right"),
    ]
    assert second.inbox.empty()


async def test_errors_and_headers_have_discords_wire_format(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    auth = {"Authorization": f"Bot {fake.token}"}
    messages = f"{fake.api_url}/channels/{channel.id}/messages"
    fake.flood("get_current_user", retry_after=2.5)

    async def answer(method: str, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
        async with http.request(method, url, **kwargs) as response:
            return response.status, await response.json(), response.headers

    async with aiohttp.ClientSession() as http:
        wrong_token = await answer(
            "GET", f"{fake.api_url}/users/@me", headers={"Authorization": "Bot x"}
        )
        flooded = await answer("GET", f"{fake.api_url}/users/@me", headers=auth)
        unknown_route = await answer("GET", f"{fake.api_url}/holograms", headers=auth)
        wrong_method = await answer("DELETE", f"{fake.api_url}/gateway/bot", headers=auth)
        unknown_channel = await answer(
            "POST", f"{fake.api_url}/channels/1/messages", headers=auth, json={"content": "x"}
        )
        not_snowflake = await answer("GET", f"{fake.api_url}/channels/general", headers=auth)
        too_long = await answer("POST", messages, headers=auth, json={"content": "x" * 2001})
        empty = await answer("POST", messages, headers=auth, json={"content": ""})
        sent = await answer("POST", messages, headers=auth, json={"content": "x" * 2000})
        reply = {"content": "re", "message_reference": {"message_id": "1"}}
        lost_reply = await answer("POST", messages, headers=auth, json=reply)
        described = {"id": 0, "filename": "x.png", "description": "a fox"}
        form = aiohttp.FormData(quote_fields=False)
        form.add_field(
            "payload_json", json.dumps({"content": "a file", "attachments": [described]})
        )
        form.add_field("files[0]", png(), filename="upload.png")
        multipart = await answer("POST", messages, headers=auth, data=form)

    assert wrong_token[:2] == (401, {"message": "401: Unauthorized", "code": 0})
    assert flooded[:2] == (
        429,
        {"message": "You are being rate limited.", "retry_after": 2.5, "global": False},
    )
    assert flooded[2]["Retry-After"] == "3" and flooded[2]["Via"] == "1.1 google"
    assert flooded[2]["X-RateLimit-Remaining"] == "0"
    assert flooded[2]["X-RateLimit-Scope"] == "user"
    assert unknown_route[:2] == (404, {"message": "404: Not Found", "code": 0})
    assert wrong_method[:2] == (405, {"message": "405: Method Not Allowed", "code": 0})
    assert unknown_channel[:2] == (404, {"message": "Unknown Channel", "code": 10003})
    assert not_snowflake[1]["errors"]["channel_id"]["_errors"][0]["code"] == "NUMBER_TYPE_COERCE"
    assert too_long[:2] == (
        400,
        {
            "message": "Invalid Form Body",
            "code": 50035,
            "errors": {
                "content": {
                    "_errors": [
                        {
                            "code": "BASE_TYPE_MAX_LENGTH",
                            "message": "Must be 2000 or fewer in length.",
                        }
                    ]
                }
            },
        },
    )
    assert empty[:2] == (400, {"message": "Cannot send an empty message", "code": 50006})
    assert sent[0] == 200 and sent[1]["author"]["id"] == str(fake.bot.id)
    for header in ("Limit", "Remaining", "Reset", "Reset-After", "Bucket"):
        assert f"X-RateLimit-{header}" in sent[2]
    assert lost_reply[1]["errors"]["message_reference"]["_errors"][0]["code"] == (
        "MESSAGE_REFERENCE_UNKNOWN_MESSAGE"
    )
    [attachment] = multipart[1]["attachments"]
    assert (attachment["filename"], attachment["description"]) == ("x.png", "a fox")
    assert (attachment["width"], attachment["content_type"]) == (64, "image/png")


class ResultButtons(discord.ui.View):
    """A button under a result as the bot puts it there: a fixed custom id and no timeout, so a
    view added with ``add_view`` answers presses on messages sent before a restart."""

    def __init__(self) -> None:
        super().__init__(timeout=None)
        self.presses: list[tuple[int, int | None]] = []  # (user id, message id)

    @discord.ui.button(label="Again", emoji="🔁", custom_id="imagebot:again")
    async def again(
        self, interaction: discord.Interaction, _: discord.ui.Button[ResultButtons]
    ) -> None:
        self.presses.append((interaction.user.id, interaction.message and interaction.message.id))
        await interaction.response.defer()
        await interaction.edit_original_response(view=None)
        await interaction.followup.send("a new fox", wait=True)


async def test_a_persistent_view_answers_a_press_on_a_message_it_never_saw(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")

    async with running(Bot(), fake) as before_restart:
        text_channel = before_restart.get_channel(channel.id)
        assert isinstance(text_channel, discord.TextChannel)
        sent = await text_channel.send("a red fox", view=ResultButtons())
    [stored] = fake.messages_in(channel)

    after_restart = Bot()
    view = ResultButtons()
    after_restart.add_view(view)
    async with running(after_restart, fake):
        interaction = fake.press(stored, alice, "imagebot:again")
        followup = await fake.wait_for("create_followup", 5)

    again = {"type": 2, "id": 2, "style": 2, "disabled": False, "label": "Again",
             "custom_id": "imagebot:again", "emoji": {"id": None, "name": "🔁"}}  # fmt: skip
    assert stored["components"] == [{"type": 1, "id": 1, "components": [again]}]
    [row] = sent.components
    assert isinstance(row, discord.ActionRow)
    assert [(b.id, b.custom_id) for b in row.children] == [(2, "imagebot:again")]
    assert view.presses == [(alice.id, int(stored["id"]))]
    assert interaction.type == 3
    assert interaction.payload["data"] == {"custom_id": "imagebot:again", "component_type": 2}
    assert interaction.payload["message"] == stored
    assert interaction.payload["member"]["user"]["id"] == str(alice.id)
    assert interaction.response_type == 6
    assert interaction.ack_delay is not None and interaction.ack_delay < 3
    # The deferred update made the pressed message @original: editing it took the buttons away.
    assert interaction.original is not None and interaction.original["id"] == stored["id"]
    assert (interaction.original["content"], interaction.original["components"]) == (
        "a red fox",
        [],
    )
    answer = followup.result
    assert answer["type"] == 19 and answer["message_reference"]["message_id"] == stored["id"]
    assert answer["interaction_metadata"]["type"] == 3
    assert answer["interaction_metadata"]["interacted_message_id"] == stored["id"]
    assert "interaction" not in answer  # only command answers carry the deprecated field
    assert interaction.followups == [answer]
    assert fake.messages_in(channel) == [interaction.original, answer]


class Choices(discord.ui.View):
    """A result's buttons answering in the three ways a press can be answered with a message."""

    @discord.ui.button(label="Again", emoji="🔁", custom_id="again")
    async def again(self, interaction: discord.Interaction, _: discord.ui.Button[Choices]) -> None:
        await interaction.response.send_message("only you see this", ephemeral=True)

    @discord.ui.button(label="Vary", emoji="🎨", custom_id="vary")
    async def vary(self, interaction: discord.Interaction, _: discord.ui.Button[Choices]) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("a varied fox")

    @discord.ui.button(
        label="Cancel", emoji="✖", style=discord.ButtonStyle.danger, custom_id="cancel"
    )
    async def cancel(self, interaction: discord.Interaction, _: discord.ui.Button[Choices]) -> None:
        await interaction.response.edit_message(content="Cancelled", view=None)


async def test_presses_answered_privately_deferred_or_by_editing_the_buttons_away(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice, bob = fake.user("alice"), fake.user("bob")
    client = Bot()

    def answered(interaction_id: int, route: str) -> Callable[[Call], bool]:
        return lambda call: call.name == route and call.interaction_id == interaction_id

    async with running(client, fake):
        text_channel = client.get_channel(channel.id)
        assert isinstance(text_channel, discord.TextChannel)
        await text_channel.send("Drawing a fox…", view=Choices())
        [message] = fake.messages_in(channel)
        private = fake.press(message, bob, "again")
        await fake.wait_for(answered(private.id, "create_interaction_response"))
        varied = fake.press(message, alice, "vary")
        await fake.wait_for(answered(varied.id, "create_followup"))
        cancelled = fake.press(message, alice, "cancel")
        update = await fake.wait_for(answered(cancelled.id, "create_interaction_response"))
        forged = fake.press(message, bob, "imagebot:refund-me")

    assert (private.response_type, varied.response_type, cancelled.response_type) == (4, 5, 7)
    assert private.original is not None and private.original["flags"] == 64
    assert private.original["content"] == "only you see this"
    assert private.original["interaction_metadata"]["user"]["id"] == str(bob.id)
    assert varied.original is not None and varied.original["content"] == "a varied fox"
    assert varied.original["flags"] == 0  # the followup filled the loading message
    edited = cancelled.original
    assert edited is not None and edited["id"] == message["id"]
    assert (edited["content"], edited["components"]) == ("Cancelled", [])
    assert update.result["resource"]["message"] == edited
    assert fake.messages_in(channel) == [edited, varied.original]  # nothing of the private one
    assert fake.delivered("MESSAGE_UPDATE")[-1][1]["components"] == []
    # A forged client may press what the message no longer shows; the event says so.
    assert forged.payload["data"]["custom_id"] == "imagebot:refund-me"
    assert forged.payload["message"]["components"] == []


def action_row(*buttons: dict[str, Any]) -> dict[str, Any]:
    return {"type": 1, "components": list(buttons)}


def button(name: str, **fields: Any) -> dict[str, Any]:
    return {"type": 2, "style": 1, "label": name, "custom_id": name} | fields


async def test_components_are_checked_numbered_and_refused_as_discord_does(
    fake: FakeDiscord,
) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    refused = {
        "components: Must be 5 or fewer in length.": [
            action_row(button(f"r{i}")) for i in range(6)
        ],
        "components.0.components: Must be between 1 and 5 in length.": [
            action_row(*(button(f"b{i}") for i in range(6)))
        ],
        "components.1.components: Must be between 1 and 5 in length.": [
            action_row(button("a")),
            action_row(),
        ],
        'components.0: Value of field "type" must be one of (1,).': [button("loose")],
        "components.0.components.0.label: Must be 80 or fewer in length.": [
            action_row(button("a", label="x" * 81))
        ],
        "components.0.components.0.label: This field is required": [
            action_row(button("a", label=""))
        ],
        "components.0.components.0.emoji.name: Invalid emoji": [action_row(button("a", emoji={}))],
        "components.0.components.0.custom_id: A custom id is required": [
            action_row({"type": 2, "style": 1, "label": "no id"})
        ],
        "components.0.components.0.custom_id: Must be between 1 and 100 in length.": [
            action_row(button("a", custom_id="x" * 101))
        ],
        "components.1.components.0.custom_id: Component custom id was already specified": [
            action_row(button("a")),
            action_row(button("b", custom_id="a")),
        ],
        "components.0.components.0.custom_id: A custom id and url cannot both be specified": [
            action_row(button("a", style=5, url="https://example.com"))
        ],
    }
    messages = Route("POST", "/channels/{channel_id}/messages", channel_id=channel.id)
    failures: dict[str, discord.HTTPException] = {}

    async with running(Bot(), fake) as client:
        for where, components in refused.items():
            with pytest.raises(discord.HTTPException) as failure:
                await client.http.request(messages, json={"content": "x", "components": components})
            failures[where] = failure.value
        with pytest.raises(discord.HTTPException) as select_menu:
            select = {"type": 3, "custom_id": "model", "options": [{"label": "a", "value": "a"}]}
            await client.http.request(messages, json={"components": [action_row(select)]})
        emoji_only = {"type": 2, "style": 2, "emoji": {"name": "🎨"}, "custom_id": "vary"}
        link = {"type": 2, "style": 5, "label": "Docs", "url": "https://example.com"}
        only_buttons = [action_row(emoji_only, button("again", id=2), link)]
        accepted = await client.http.request(messages, json={"components": only_buttons})
        edit = Route(
            "PATCH",
            "/channels/{channel_id}/messages/{message_id}",
            channel_id=channel.id,
            message_id=accepted["id"],
        )
        with pytest.raises(discord.HTTPException) as emptied:
            await client.http.request(edit, json={"components": []})
        pressed = fake.press(accepted, alice, "again")
        callback = Route(
            "POST",
            "/interactions/{interaction_id}/{interaction_token}/callback",
            interaction_id=pressed.id,
            interaction_token=pressed.token,
        )
        bad_answer = {"content": "x", "components": [action_row(button("a", label="x" * 81))]}
        with pytest.raises(discord.HTTPException) as in_callback:
            await client.http.request(callback, json={"type": 4, "data": bad_answer})
        await client.http.request(callback, json={"type": 7, "data": {"content": "Done"}})

    for where, failure in failures.items():
        assert (failure.status, failure.code, failure.text) == (
            400,
            50035,
            f"Invalid Form Body\nIn {where}",
        )
    [duplicate] = [call for call in fake.calls("create_message") if "already" in str(call.error)]
    assert duplicate.error == {
        "message": "Invalid Form Body",
        "code": 50035,
        "errors": {
            "components": {
                "1": {
                    "components": {
                        "0": {
                            "custom_id": {
                                "_errors": [
                                    {
                                        "code": "COMPONENT_CUSTOM_ID_DUPLICATED",
                                        "message": "Component custom id was already specified",
                                    }
                                ]
                            }
                        }
                    }
                }
            }
        },
    }
    assert (select_menu.value.status, select_menu.value.code) == (400, 0)
    # Discord numbers components from 1 in order, skipping ids the bot chose itself.
    [row] = accepted["components"]
    assert (row["id"], [b["id"] for b in row["components"]]) == (1, [3, 2, 4])
    assert accepted["content"] == "" and fake.messages_in(channel)[-1]["content"] == "Done"
    assert (emptied.value.code, emptied.value.text) == (50006, "Cannot send an empty message")
    assert in_callback.value.text == (
        "Invalid Form Body\nIn data.components.0.components.0.label: Must be 80 or fewer in length."
    )
    assert (pressed.response_type, fake.messages_in(channel)[-1]["components"]) == (7, [row])


async def test_a_press_answered_late_or_twice_is_refused(fake: FakeDiscord) -> None:
    channel = fake.guild("Artists").channel("general")
    alice = fake.user("alice")
    clock = ManualClock()
    fake.clock = clock
    client = Bot()
    waiting, go_on = asyncio.Event(), asyncio.Event()
    outcomes: asyncio.Queue[discord.HTTPException | None] = asyncio.Queue()

    class Slow(discord.ui.View):
        @discord.ui.button(label="Again", custom_id="again")
        async def again(self, interaction: discord.Interaction, _: discord.ui.Button[Slow]) -> None:
            waiting.set()
            await go_on.wait()
            try:
                await interaction.response.defer()
            except discord.HTTPException as exc:
                outcomes.put_nowait(exc)
            else:
                outcomes.put_nowait(None)

    async with running(client, fake):
        text_channel = client.get_channel(channel.id)
        assert isinstance(text_channel, discord.TextChannel)
        await text_channel.send("a fox", view=Slow())
        [message] = fake.messages_in(channel)
        late = fake.press(message, alice, "again")
        await asyncio.wait_for(waiting.wait(), 5)
        clock.now += 3.5
        go_on.set()
        too_late = await asyncio.wait_for(outcomes.get(), 5)
        in_time = fake.press(message, alice, "again")
        assert await asyncio.wait_for(outcomes.get(), 5) is None
        callback = Route(
            "POST",
            "/interactions/{interaction_id}/{interaction_token}/callback",
            interaction_id=in_time.id,
            interaction_token=in_time.token,
        )
        with pytest.raises(discord.HTTPException) as twice:
            await client.http.request(callback, json={"type": 6})

    assert too_late is not None
    assert (too_late.status, too_late.code, too_late.text) == (404, 10062, "Unknown interaction")
    assert (late.acked_at, late.response_type) == (None, None)
    assert (in_time.ack_delay, in_time.response_type) == (0.0, 6)
    assert (twice.value.status, twice.value.code, twice.value.text) == (
        400,
        40060,
        "Interaction has already been acknowledged.",
    )


async def test_a_press_goes_to_the_shard_of_the_messages_guild(fake: FakeDiscord) -> None:
    left = fake.guild("Left", shard=(0, 2)).channel("general")
    right = fake.guild("Right", shard=(1, 2)).channel("general")
    alice = fake.user("alice")
    private = fake.dm(alice)
    first, second = Bot(shard=(0, 2)), Bot(shard=(1, 2))
    received: asyncio.Queue[tuple[int | None, discord.Interaction]] = asyncio.Queue()

    async def on_interaction(interaction: discord.Interaction) -> None:
        received.put_nowait((interaction.client.shard_id, interaction))

    first.on_interaction = second.on_interaction = on_interaction  # type: ignore[attr-defined]

    async with running(first, fake), running(second, fake):
        for channel in (right, left, private):
            fake.press(fake.send_message(channel, alice, "a fox"), alice, "imagebot:again")
        got = [await asyncio.wait_for(received.get(), 5) for _ in range(3)]

    assert sorted((shard, i.channel_id) for shard, i in got) == sorted(
        [(0, left.id), (0, private.id), (1, right.id)]
    )
    pressed = {"custom_id": "imagebot:again", "component_type": 2}
    assert all(i.user.id == alice.id and i.data == pressed for _, i in got)
    delivered = fake.delivered("INTERACTION_CREATE")
    assert [(shard, data["channel_id"]) for shard, data in delivered] == [
        ([0, 2], str(left.id)),
        ([0, 2], str(private.id)),
        ([1, 2], str(right.id)),
    ]
