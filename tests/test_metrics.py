"""The operators' endpoint over real HTTP: Prometheus' /metrics, /healthz, and the gateway's
latency as the image service measures it against the sandbox."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from fake_telegram import FakeTelegram
from imagebot_cli import cli_env, imagebot_run
from local import free_port, until
from prometheus_client.parser import text_string_to_metric_families

from bot.commands import parse
from bot.errors import ConfigError, PaymentRefused
from bot.http import gateway_client
from bot.images import ImageService
from bot.metrics import Metrics
from bot.requests import GenerateRequest, ImageCommand
from bot.x402 import PaymentHook, PaymentIntent, Wallet, X402Payer
from imagebot.health import serving_health
from sandbox import Sandbox

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def always(answer: bool) -> bool:
    return answer


async def scrape(metrics: Metrics, path: str = "/metrics") -> httpx.Response:
    """One GET on a health server serving ``metrics`` that is always healthy."""
    port = free_port()
    async with (
        serving_health(f"127.0.0.1:{port}", metrics, lambda: always(True)),
        httpx.AsyncClient() as client,
    ):
        return await client.get(f"http://127.0.0.1:{port}{path}")


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def test_metrics_are_served_with_their_names_labels_and_values() -> None:
    metrics = Metrics()
    metrics.command_done("imagegen", "done")
    metrics.command_done("imagegen", "done")
    metrics.command_done("spend", "refused")
    metrics.payment_closed("settled", 52_500)
    metrics.payment_closed("settled", 42_000)
    metrics.payment_closed("unknown", 126_000)
    metrics.observe_gateway(0.03)
    metrics.observe_gateway(7.0)
    metrics.count_jobs(lambda: 3, lambda: 5)

    response = await scrape(metrics)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    seen = samples(response.text)
    assert seen[("imagebot_commands_total", labels(kind="imagegen", outcome="done"))] == 2
    assert seen[("imagebot_commands_total", labels(kind="spend", outcome="refused"))] == 1
    assert seen[("imagebot_commands_total", labels(kind="press", outcome="ignored"))] == 0
    assert seen[("imagebot_payments_total", labels(status="settled"))] == 2
    assert seen[("imagebot_payments_total", labels(status="unknown"))] == 1
    assert seen[("imagebot_payments_total", labels(status="failed"))] == 0
    assert seen[("imagebot_settled_micro_usdc_total", labels())] == 94_500
    assert seen[("imagebot_gateway_seconds_count", labels())] == 2
    assert seen[("imagebot_gateway_seconds_sum", labels())] == pytest.approx(7.03)
    assert seen[("imagebot_gateway_seconds_bucket", labels(le="0.05"))] == 1
    assert seen[("imagebot_gateway_seconds_bucket", labels(le="5.0"))] == 1
    assert seen[("imagebot_gateway_seconds_bucket", labels(le="10.0"))] == 2
    assert seen[("imagebot_gateway_seconds_bucket", labels(le="60.0"))] == 2
    assert seen[("imagebot_jobs_in_flight", labels())] == 3
    assert seen[("imagebot_jobs_waiting", labels())] == 5
    assert all(name.startswith("imagebot_") for name, _ in seen)


async def test_the_wallet_balance_is_served_only_once_known() -> None:
    metrics = Metrics()
    before = samples((await scrape(metrics)).text)
    metrics.set_balance(1_250_000)
    metrics.set_balance(1_197_500)
    after = samples((await scrape(metrics)).text)

    assert not any(name == "imagebot_wallet_balance_micro_usdc" for name, _ in before)
    assert after[("imagebot_wallet_balance_micro_usdc", labels())] == 1_197_500


def test_each_metrics_has_its_own_series() -> None:
    first, second = Metrics(), Metrics()
    first.command_done("help", "done")
    assert (
        first.registry.get_sample_value(
            "imagebot_commands_total", {"kind": "help", "outcome": "done"}
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "imagebot_commands_total", {"kind": "help", "outcome": "done"}
        )
        == 0
    )


async def never() -> bool:
    await asyncio.Event().wait()
    return True


async def broken() -> bool:
    raise ConnectionResetError("the ledger went away")


@pytest.mark.parametrize(
    ("check", "status", "body"),
    [
        (lambda: always(True), 200, "ok\n"),
        (lambda: always(False), 503, "unhealthy\n"),
        (never, 503, "unhealthy\n"),
        (broken, 503, "unhealthy\n"),
    ],
    ids=["healthy", "unhealthy", "hanging", "raising"],
)
async def test_healthz_is_200_only_when_the_check_says_healthy_in_time(
    check: Callable[[], Awaitable[bool]], status: int, body: str
) -> None:
    port = free_port()
    async with (
        serving_health(f"127.0.0.1:{port}", Metrics(), check, deadline=0.2),
        httpx.AsyncClient() as client,
    ):
        response = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=5.0)
    assert (response.status_code, response.text) == (status, body)


@pytest.mark.parametrize("path", ["/", "/metrics/", "/healthz/x", "/debug"])
async def test_any_other_path_is_404(path: str) -> None:
    assert (await scrape(Metrics(), path)).status_code == 404


async def test_a_port_in_use_is_a_config_error_naming_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            async with serving_health(f"127.0.0.1:{port}", Metrics(), lambda: always(True)):
                pass
    assert "METRICS_LISTEN" in caught.value.user_message


async def generate(
    text: str, on_exchange: Callable[[float], None], on_payment: PaymentHook | None = None
) -> list[str]:
    """Run ``text`` against a sandbox gateway; the methods of the API requests it got, in order."""
    gateway = Sandbox(job_seconds=0.3)
    asked: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/v1/"):  # not the picture's download
            asked.append(request.method)
        return await handler(request)

    gateway.app.middlewares.append(count)
    command = parse(text)
    assert isinstance(command, ImageCommand)
    request = command.build(())
    assert isinstance(request, GenerateRequest)
    async with gateway_client() as http:
        payer = X402Payer(http, Wallet.create(), max_micro=500_000)
        url = await gateway.start()
        service = ImageService(http, payer, url, poll_interval=0.05, on_exchange=on_exchange)
        try:
            await service.generate(request, on_payment=on_payment)
        finally:
            await gateway.close()
    return asked


async def test_the_image_service_times_the_quote_and_the_paid_request() -> None:
    metrics = Metrics()
    asked = await generate("/imagegen a fox", metrics.observe_gateway)
    assert asked == ["POST", "POST"]
    assert metrics.registry.get_sample_value("imagebot_gateway_seconds_count") == 2


async def test_the_image_service_times_each_poll_of_a_slow_job() -> None:
    metrics = Metrics()
    asked = await generate("/imagegen -m gpt-image-2 a harbour", metrics.observe_gateway)
    assert asked[:2] == ["POST", "POST"] and asked.count("GET") >= 1
    assert metrics.registry.get_sample_value("imagebot_gateway_seconds_count") == len(asked)


async def test_a_payment_refused_after_the_quote_times_the_quote_only() -> None:
    async def refuse(_: PaymentIntent) -> None:
        await asyncio.sleep(0.2)  # the ledger's answer is not the gateway's time
        raise PaymentRefused("over budget")

    metrics = Metrics()
    with pytest.raises(PaymentRefused):
        await generate("/imagegen a fox", metrics.observe_gateway, refuse)
    assert metrics.registry.get_sample_value("imagebot_gateway_seconds_count") == 1
    assert metrics.registry.get_sample_value("imagebot_gateway_seconds_sum") < 0.2


async def test_imagebot_run_serves_metrics_and_is_unhealthy_once_its_ledger_is_gone(
    tmp_path: Path, postgres_url: str
) -> None:
    """``imagebot run`` with METRICS_LISTEN: a command shows in /metrics (read by Prometheus'
    own parser), /healthz is 200, then 503 once the PostgreSQL ledger stops answering."""
    telegram, gateway = FakeTelegram(), Sandbox()
    await telegram.start()
    await gateway.start()
    port = free_port()
    env = cli_env(
        gateway.url,
        tmp_path / "journal.sqlite3",
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_URL=telegram.url,
        DATABASE_URL=postgres_url,
        METRICS_LISTEN=f"127.0.0.1:{port}",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with imagebot_run(env, tmp_path / "run.log"), httpx.AsyncClient() as client:
            await until(lambda: len(telegram.calls("setMyCommands")) == 1, seconds=30)
            alice = telegram.private_chat(111, "Alice")
            telegram.send_text(alice, alice.user, "/imagegen -m flux a fox")
            await telegram.wait_for("sendPhoto", timeout=30)
            done = ("imagebot_commands_total", labels(kind="imagegen", outcome="done"))
            scraped: Samples = {}

            async def counted() -> bool:  # the command ends just after its picture is sent
                scraped.update(samples((await client.get(f"{base}/metrics")).text))
                return scraped[done] == 1

            await until(counted)
            healthy = (await client.get(f"{base}/healthz")).status_code
            await _cut_off(postgres_url)
            unhealthy = (await client.get(f"{base}/healthz", timeout=10)).status_code
    finally:
        await gateway.close()
        await telegram.close()
    assert scraped[("imagebot_payments_total", labels(status="settled"))] == 1
    assert scraped[("imagebot_settled_micro_usdc_total", labels())] == 42_000
    assert scraped[("imagebot_gateway_seconds_count", labels())] == 2  # the quote, the payment
    assert scraped[("imagebot_jobs_in_flight", labels())] == 0
    assert (healthy, unhealthy) == (200, 503)


async def _cut_off(url: str) -> None:
    """The database refuses new connections and drops those it has, as if its server died."""
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
    finally:
        await admin.close()
