"""Telegram by webhook: the real python-telegram-bot serving the updates the fake Bot API POSTs,
paying the sandbox gateway; several replicas share one ledger behind a round-robin balancer."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_telegram import Call, FakeTelegram, Webhook
from imagebot_cli import cli_env
from local import free_port
from pictures import png
from round_robin import RoundRobin
from test_telegram import sent_to

import adapters.telegram
from adapters.base import StartupError
from adapters.telegram import build_application, serve
from bot.config import load_settings
from bot.service import ALBUM_QUIET_SECONDS, ImageBot, Sender
from bot.x402 import Wallet
from imagebot.wiring import open_bot
from sandbox import Sandbox

PATH = "/telegram/updates"
SECRET = "webhook-secret_0123456789"


@dataclass
class Stack:
    telegram: FakeTelegram
    gateway: Sandbox
    url: str  # TELEGRAM_WEBHOOK_URL
    balancer: RoundRobin | None


@asynccontextmanager
async def running(tmp_path: Path, replicas: int = 1) -> AsyncIterator[Stack]:
    """``imagebot run``'s Telegram side by webhook, ``replicas`` times over one ledger file; with
    more than one, Telegram reaches them through a round-robin balancer."""
    telegram, gateway = FakeTelegram(), Sandbox(job_seconds=0.2)
    await telegram.start()
    await gateway.start()
    ports = [free_port() for _ in range(replicas)]
    balancer = None
    root = f"http://127.0.0.1:{ports[0]}"
    if replicas > 1:
        balancer = RoundRobin([f"http://127.0.0.1:{port}" for port in ports])
        await balancer.start()
        root = balancer.url
    wallet, stop = Wallet.create(), asyncio.Event()
    try:
        async with AsyncExitStack() as bots:
            serving = []
            for port in ports:
                loaded = load_settings(
                    _env_file=None,
                    telegram_bot_token=telegram.token,
                    telegram_api_url=telegram.url,
                    image_api_url=gateway.url,
                    database_path=tmp_path / "ledger.sqlite3",
                    telegram_webhook_url=root + PATH,
                    telegram_webhook_listen=f"127.0.0.1:{port}",
                    telegram_webhook_secret=SECRET,
                )
                bot = await bots.enter_async_context(open_bot(loaded, wallet, poll_interval=0.05))
                ready = asyncio.Event()
                serving.append(
                    asyncio.create_task(serve(build_application(loaded, bot), stop, ready))
                )
                await asyncio.wait_for(ready.wait(), 10)
            try:
                yield Stack(telegram, gateway, root + PATH, balancer)
            finally:
                stop.set()
                await asyncio.gather(*serving)
    finally:
        if balancer is not None:
            await balancer.close()
        await gateway.close()
        await telegram.close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running(tmp_path) as started:
        yield started


def replied_to(call: Call) -> int | None:
    return call.params.get("reply_parameters", {}).get("message_id")


async def test_imagegen_by_webhook_is_answered_with_the_photo(stack: Stack) -> None:
    telegram = stack.telegram
    stack.gateway.latency = 1.0  # every paid request takes a second
    chat = telegram.private_chat(111, "Alice", "alice")
    command = telegram.send_text(chat, chat.user, "/imagegen -m flux a fox in the snow")

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert photo.params["caption"] == "flux · 1024x1024 · $0.042"
    assert replied_to(photo) == command["message_id"]
    [delivery] = telegram.deliveries_of(command)
    assert delivery.status == 200
    assert delivery.seconds < 0.5  # answered at once; the work went on in the background
    assert photo.at - delivery.at >= 1.0
    assert len(stack.gateway.settlements) == 1


async def test_setwebhook_gets_the_url_and_secret_and_stopping_keeps_it(tmp_path: Path) -> None:
    async with running(tmp_path) as stack:
        telegram = stack.telegram
        [registered] = telegram.calls("setWebhook")

    assert registered.params["url"] == stack.url
    assert registered.params["secret_token"] == SECRET
    assert registered.params["allowed_updates"] == ["message", "callback_query"]
    assert registered.params["max_connections"] == 40
    assert registered.params["drop_pending_updates"] is False
    assert telegram.calls("deleteWebhook") == []  # neither at start nor at stop
    assert telegram.webhook == Webhook(stack.url, SECRET, 40)  # still there for other replicas


@pytest.mark.parametrize("secret", [None, "not-the-secret"], ids=["no header", "wrong"])
async def test_an_update_without_the_right_secret_gets_403_and_is_not_processed(
    stack: Stack, secret: str | None
) -> None:
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    assert chat.user is not None

    forged = await telegram.post_to_webhook(chat, chat.user, "/imagegen a fox", secret_token=secret)
    genuine = telegram.send_text(chat, chat.user, "/imagegen a cat")
    await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert forged.status == 403
    assert [delivery.status for delivery in telegram.deliveries_of(genuine)] == [200]
    in_chat = [call for call in telegram.sent if call.chat_id == 111]
    assert {replied_to(call) for call in in_chat} - {None} == {genuine["message_id"]}
    assert len(stack.gateway.settlements) == 1


async def test_a_burst_from_many_users_is_answered_before_any_work_is_done(stack: Stack) -> None:
    telegram = stack.telegram
    stack.gateway.latency = 1.0
    commands = telegram.send_from_users(20, "/imagegen a fox")

    await telegram.wait_delivered(commands)
    await telegram.wait_for(lambda _: len(telegram.calls("sendPhoto")) == 20, timeout=15)

    deliveries = telegram.deliveries
    assert [delivery.status for delivery in deliveries] == [200] * 20
    first_photo = telegram.calls("sendPhoto")[0]
    assert max(delivery.at + delivery.seconds for delivery in deliveries) < first_photo.at - 0.5
    assert len(stack.gateway.settlements) == 20


async def test_updates_over_the_bound_are_refused_at_once_and_taken_when_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.telegram, "MAX_HELD_UPDATES", 2)
    async with running(tmp_path) as stack:
        telegram = stack.telegram
        stack.gateway.latency = 1.0
        commands = telegram.send_from_users(4, "/imagegen a fox")

        await telegram.wait_for(lambda _: len(telegram.calls("sendPhoto")) == 4, timeout=15)

    first_answers = sorted(telegram.deliveries_of(command)[0].status or 0 for command in commands)
    assert first_answers == [200, 200, 500, 500]
    refused = [delivery for delivery in telegram.deliveries if delivery.status == 500]
    assert max(delivery.seconds for delivery in refused) < 0.5
    assert all(telegram.deliveries_of(command)[-1].ok for command in commands)
    assert len(stack.gateway.settlements) == 4


async def test_an_album_split_over_two_replicas_is_one_img2img(tmp_path: Path) -> None:
    async with running(tmp_path, replicas=2) as stack:
        telegram = stack.telegram
        assert stack.balancer is not None
        chat = telegram.private_chat(111, "Alice", "alice")
        images = [png(120, 90, colour) for colour in ("red", "green", "blue")]
        album = telegram.send_album(
            chat, chat.user, images, caption="/img2img -m nano-banana fuse these"
        )

        photo = await telegram.wait_for(sent_to(111, "sendPhoto"))
        await asyncio.sleep(2 * ALBUM_QUIET_SECONDS)  # time for a second answer, if one came

        assert len(stack.balancer.forwarded) == 2  # both replicas had parts
        assert replied_to(photo) == album[0]["message_id"]
        assert len(telegram.calls("sendPhoto")) == 1
        fetched = [call.params["file_id"] for call in telegram.calls("getFile")]
        assert fetched == [message["photo"][-1]["file_id"] for message in album]
        (settlement,) = stack.gateway.settlements
        assert settlement.model == "google/nano-banana"
        registered = [call.params for call in telegram.calls("setWebhook")]
        assert len(registered) == 2 and registered[0] == registered[1]


async def test_an_album_is_its_captioned_message_alone_when_the_ledger_fails(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ledger_down(self: ImageBot, sender: Sender, album: str, part: str) -> list[str]:
        raise ConnectionError("the ledger is unreachable")

    monkeypatch.setattr(ImageBot, "gather_album", ledger_down)
    telegram = stack.telegram
    chat = telegram.private_chat(111, "Alice", "alice")
    album = telegram.send_album(chat, chat.user, [png(), png()], caption="/img2img make it blue")

    photo = await telegram.wait_for(sent_to(111, "sendPhoto"))

    assert replied_to(photo) == album[0]["message_id"]
    fetched = [call.params["file_id"] for call in telegram.calls("getFile")]
    assert fetched == [album[0]["photo"][-1]["file_id"]]


async def test_a_busy_listen_port_is_a_startup_error(tmp_path: Path) -> None:
    telegram = FakeTelegram()
    await telegram.start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        loaded = load_settings(
            _env_file=None,
            telegram_bot_token=telegram.token,
            telegram_api_url=telegram.url,
            database_path=tmp_path / "ledger.sqlite3",
            telegram_webhook_url=f"http://127.0.0.1:{port}{PATH}",
            telegram_webhook_listen=f"127.0.0.1:{port}",
            telegram_webhook_secret=SECRET,
        )
        try:
            async with open_bot(loaded, Wallet.create()) as bot:
                with pytest.raises(StartupError, match="TELEGRAM_WEBHOOK_LISTEN"):
                    await serve(build_application(loaded, bot), asyncio.Event())
        finally:
            await telegram.close()


async def test_debug_logs_by_webhook_carry_no_secret(tmp_path: Path) -> None:
    telegram, gateway = FakeTelegram(), Sandbox()
    await telegram.start()
    await gateway.start()
    port = free_port()
    env = cli_env(
        gateway.url,
        tmp_path / "ledger.sqlite3",
        LOG_LEVEL="DEBUG",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_URL=telegram.url,
        TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{port}{PATH}",
        TELEGRAM_WEBHOOK_LISTEN=f"127.0.0.1:{port}",
        TELEGRAM_WEBHOOK_SECRET=SECRET,
    )
    alice = telegram.private_chat(111, "Alice", "alice")
    assert alice.user is not None
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagebot.cli", "run", cwd=tmp_path, env=env, stderr=PIPE
    )
    try:
        telegram.send_text(alice, alice.user, "/imagegen a fox")  # sent once the webhook is set
        await telegram.wait_for("sendPhoto", timeout=30)
        forged = await telegram.post_to_webhook(alice, alice.user, "/spend", secret_token="guess")
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await gateway.close()
        await telegram.close()

    log = err.decode()
    assert process.returncode == 0, log[-2000:]
    assert forged.status == 403
    set_webhook = [line for line in log.splitlines() if "endpoint `setWebhook` with" in line]
    assert set_webhook and "'secret_token': '[secret]'" in set_webhook[0]  # PTB logged it, masked
    assert SECRET not in log
    assert telegram.token.partition(":")[2] not in log
