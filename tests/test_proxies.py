"""Telegram's and Discord's calls go through the proxy ``HTTP(S)_PROXY`` names, as the gateway's
do, credentials included; hosts in ``NO_PROXY`` are reached directly. The bot is told each
platform is at 127.0.0.2, where nothing listens: only the proxy (its route) reaches the fake.
``https://`` addresses are reached through the proxy's tunnels (``CONNECT``)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_discord import FakeDiscord, File
from fake_proxy import FakeProxy, tls_front
from fake_telegram import FakeTelegram
from imagebot_cli import cli_env, imagebot_run
from pictures import png
from test_discord import replies_to, serving, started_stack, with_files
from test_telegram import edited_photo, running, sent_to

from bot.errors import ConfigError
from bot.http import env_proxy, gateway_client
from sandbox import Sandbox

ELSEWHERE = "127.0.0.2"
CREDENTIALS = "imagebot:pr0xy-s3cret"
BASIC = "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()  # as the proxy must get it


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    proxy = FakeProxy(routes={ELSEWHERE: "127.0.0.1"})
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_telegram_calls_and_file_downloads_go_through_the_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy: FakeProxy
) -> None:
    monkeypatch.setenv("HTTP_PROXY", _with_credentials(proxy))
    async with running(tmp_path, api_host=ELSEWHERE) as stack:
        photo = await edited_photo(stack.telegram)

    assert photo.params["caption"].startswith("gpt-image · 1024x1024")
    assert proxy.targets(f"http://{ELSEWHERE}:")  # long polling, replies, the photo's download
    assert proxy.targets(stack.gateway.url)  # as before: the gateway's calls too
    assert {passage.authorization for passage in proxy.passages} == {BASIC}


async def test_discord_rest_gateway_and_attachments_go_through_the_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy: FakeProxy
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://unused.invalid:1")  # http:// URLs take HTTP_PROXY
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with (
        started_stack(tmp_path) as stack,
        serving(stack, monkeypatch, api_host=ELSEWHERE),
    ):
        fake = stack.discord
        channel = fake.guild("Artists").channel("general")
        alice = fake.user("alice")
        command = fake.send_message(
            channel, alice, "/img2img snow", files=[File("cat.png", png(300, 200, "blue"))]
        )
        reply = await fake.wait_for(with_files(replies_to(command)))
        fake.slash_command(channel, alice, "imagegen", {"prompt": "a fox", "model": "flux"})
        edit = await fake.wait_for(
            lambda call: call.name == "edit_original_response" and bool(call.files)
        )

    assert reply.payload["content"].startswith("gpt-image · 1024x1024")
    assert edit.payload["content"] == "flux · 1024x1024 · $0.042"  # interaction webhooks too
    assert proxy.targets(f"http://{ELSEWHERE}:")  # REST
    assert proxy.targets(fake.gateway_url)  # the gateway's websocket
    assert proxy.targets(fake.cdn_url)  # the attachment's download


async def test_hosts_in_no_proxy_are_reached_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy: FakeProxy
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with running(tmp_path) as stack:
        chat = stack.telegram.private_chat(111, "Alice", "alice")
        stack.telegram.send_text(chat, chat.user, "/imagegen a fox")
        await stack.telegram.wait_for(sent_to(111, "sendPhoto"))

    assert proxy.passages == []


async def test_https_telegram_and_gateway_go_through_the_proxys_tunnels(
    tmp_path: Path, proxy: FakeProxy
) -> None:
    """``imagebot run`` with Telegram at https://api.telegram.test and the gateway at
    https://gateway.test, names only the proxy resolves; the bot trusts the test's certificate
    through ``SSL_CERT_FILE``, as OpenSSL reads it."""
    certificate, key = await _certificate(tmp_path, "api.telegram.test", "gateway.test")
    proxy.routes |= {"api.telegram.test": "127.0.0.1", "gateway.test": "127.0.0.1"}
    telegram, gateway = FakeTelegram(), Sandbox()
    await telegram.start()
    await gateway.start()
    try:
        async with (
            tls_front(_port(telegram.url), str(certificate), str(key)) as telegram_port,
            tls_front(_port(gateway.url), str(certificate), str(key)) as gateway_port,
        ):
            env = cli_env(
                f"https://gateway.test:{gateway_port}",
                tmp_path / "ledger.sqlite3",
                TELEGRAM_BOT_TOKEN=telegram.token,
                TELEGRAM_API_URL=f"https://api.telegram.test:{telegram_port}",
                PAYMENT_NETWORK="base-sepolia",
                HTTPS_PROXY=_with_credentials(proxy),
                SSL_CERT_FILE=str(certificate),
            )
            async with imagebot_run(env, tmp_path / "run.log"):
                await telegram.wait_for("setMyCommands", timeout=30)
                alice = telegram.private_chat(111, "Alice")
                telegram.send_text(alice, alice.user, "/imagegen -m gpt-image a fox")
                photo = await telegram.wait_for("sendPhoto", timeout=30)
    finally:
        await gateway.close()
        await telegram.close()

    assert photo.params["caption"].startswith("gpt-image · 1024x1024")
    assert len(gateway.settlements) == 1
    assert {(p.method, p.target, p.authorization) for p in proxy.passages} == {
        ("CONNECT", f"api.telegram.test:{telegram_port}", BASIC),
        ("CONNECT", f"gateway.test:{gateway_port}", BASIC),
    }


async def test_https_discord_rest_gateway_and_attachments_go_through_a_tunnel(
    tmp_path: Path, proxy: FakeProxy
) -> None:
    """``imagebot run`` with Discord at https://discord.test (REST, the gateway's wss:// and
    the attachments' CDN), a name only the proxy resolves, trusted through ``SSL_CERT_FILE``."""
    certificate, key = await _certificate(tmp_path, "discord.test")
    proxy.routes |= {"discord.test": "127.0.0.1"}
    fake, gateway = FakeDiscord(), Sandbox()
    await fake.start()
    await gateway.start()
    try:
        async with tls_front(_port(fake.url), str(certificate), str(key)) as port:
            fake.serve_as(f"https://discord.test:{port}")
            env = cli_env(
                gateway.url,  # http:// on loopback: reached directly, HTTPS_PROXY is not its
                tmp_path / "ledger.sqlite3",
                DISCORD_BOT_TOKEN=fake.token,
                DISCORD_API_URL=fake.api_url,
                HTTPS_PROXY=_with_credentials(proxy),
                SSL_CERT_FILE=str(certificate),
            )
            async with imagebot_run(env, tmp_path / "run.log"):
                await fake.wait_ready(timeout=30)
                channel = fake.guild("Artists").channel("general")
                alice = fake.user("alice")
                command = fake.send_message(
                    channel, alice, "/img2img snow", files=[File("cat.png", png(300, 200))]
                )
                reply = await fake.wait_for(with_files(replies_to(command)), timeout=30)
    finally:
        await gateway.close()
        await fake.close()

    assert reply.payload["content"].startswith("gpt-image · 1024x1024")
    assert len(gateway.settlements) == 1
    assert {(p.method, p.target, p.authorization) for p in proxy.passages} == {
        ("CONNECT", f"discord.test:{port}", BASIC)
    }
    assert any(frame.op == 2 for frame in fake.received)  # IDENTIFY came through the tunnel


async def _certificate(tmp_path: Path, *names: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` and its key, made by openssl."""
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=imagebot test", "-keyout", str(key), "-out", str(certificate)),
        *("-addext", "subjectAltName=" + ",".join(f"DNS:{name}" for name in names)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await openssl.wait() == 0
    return certificate, key


def _with_credentials(proxy: FakeProxy) -> str:
    """The proxy's URL with ``CREDENTIALS`` in it, as ``HTTP(S)_PROXY`` carries them."""
    return proxy.url.replace("://", f"://{CREDENTIALS}@")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize(
    ("variables", "url", "expected"),
    [
        ({"HTTPS_PROXY": "http://p:3128"}, "https://api.telegram.org", "http://p:3128"),
        ({"HTTPS_PROXY": "p:3128"}, "https://discord.com/api/v10", "http://p:3128"),
        ({"HTTP_PROXY": "http://p:3128"}, "https://api.telegram.org", None),
        ({"ALL_PROXY": "http://p:3128"}, "https://api.telegram.org", "http://p:3128"),
        ({"https_proxy": "http://p:3128"}, "https://api.telegram.org", "http://p:3128"),
        (
            {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "telegram.org"},
            "https://api.telegram.org",
            None,
        ),
        ({"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, "https://api.telegram.org", None),
        ({}, "https://api.telegram.org", None),
    ],
)
def test_the_proxy_for_a_platform_is_read_as_the_gateways(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], url: str, expected: str | None
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    assert env_proxy(url, "Telegram's Bot API") == expected


@pytest.mark.parametrize(
    ("proxy", "client"),
    [
        ("socks5://imagebot:pr0xy-s3cret@127.0.0.1:1080", "Discord"),
        ("ftp://imagebot:pr0xy-s3cret@127.0.0.1:21", "Discord"),
        ("socks5://imagebot:pr0xy-s3cret@127.0.0.1:1080", "gateway"),
    ],
)
def test_a_proxy_aiohttp_cannot_use_is_refused_without_its_password(
    monkeypatch: pytest.MonkeyPatch, proxy: str, client: str
) -> None:
    monkeypatch.setenv("ALL_PROXY", proxy)

    with pytest.raises(ConfigError) as refused:
        if client == "gateway":
            gateway_client()
        else:
            env_proxy("https://discord.com/api/v10", "Discord")

    message = refused.value.user_message
    assert ("Discord" if client == "Discord" else "the image gateway") in message
    assert "s3cret" not in message and "127.0.0.1" not in message
