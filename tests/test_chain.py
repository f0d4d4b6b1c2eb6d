"""The chain as the last word: unknown payments settled or failed from USDC's authorizationState,
against the fake JSON-RPC endpoint of tests/fake_rpc.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from fake_rpc import SECRET, SELECTOR, FakeRpc
from imagebot_cli import cli_env, imagebot

from bot.chain import AUTHORIZATION_STATE, NEVER_USED, ChainResolver, Resolved
from bot.chains import BASE, BASE_SEPOLIA
from bot.config import load_settings
from bot.errors import ConfigError
from bot.http import gateway_client
from bot.ledger import Attempt, Budget, Ledger, Payment, SqliteLedger, Status
from imagebot.cli import main

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
NOW_TS = int(NOW.timestamp())
PRICE = 52_500
BUDGET = Budget(user_daily_micro=1_000_000, global_daily_micro=20_000_000, exempt=False)
ALICE = Attempt(
    "telegram", "111", "@alice", "chat-1", "imagegen", "google/nano-banana", "1024x1024", 1
)
PAYER = Account.create().address


def nonce(number: int) -> str:
    return f"0x{number:064x}"


@pytest.fixture
async def rpc() -> AsyncIterator[FakeRpc]:
    server = FakeRpc()
    server.block_timestamp = NOW_TS
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    async with await SqliteLedger.open(tmp_path / "ledger.sqlite3", clock=lambda: NOW) as opened:
        yield opened


async def unknown_row(
    ledger: Ledger, number: int, valid_before: int, network: str = BASE.caip2
) -> int:
    """A signed payment whose answer never came: priced with a nonce, then marked unknown."""
    row = await ledger.reserve(ALICE, PRICE, BUDGET)
    await ledger.price(
        row,
        PRICE,
        BUDGET,
        network=network,
        payer=PAYER,
        nonce=nonce(number),
        valid_before=valid_before,
    )
    await ledger.mark_unknown(row, "no answer after paying")
    return row


async def resolve(ledger: Ledger, urls: dict[str, str], **options: Any) -> Resolved:
    async with gateway_client() as http:
        return await ChainResolver(ledger, http, urls.get, **options).resolve()


def test_the_selector_is_usdc_authorization_state() -> None:
    assert AUTHORIZATION_STATE.hex() == SELECTOR


async def test_a_used_authorization_settles_the_row_at_its_quote(
    ledger: Ledger, rpc: FakeRpc
) -> None:
    row = await unknown_row(ledger, 1, NOW_TS + 600)
    rpc.use(PAYER, nonce(1))
    told: list[Payment] = []

    async def tell(payment: Payment) -> None:
        told.append(payment)

    resolved = await resolve(ledger, {BASE.caip2: rpc.url}, on_settled=tell)

    assert resolved == Resolved(settled=1)
    assert rpc.asked == [(BASE.usdc, PAYER.lower(), nonce(1))]
    payment = await ledger.payment(row)
    assert (payment.status, payment.charged_micro, payment.tx_hash) == (Status.SETTLED, PRICE, None)
    assert told == [payment]
    assert (await ledger.report()).total_micro == PRICE


@pytest.mark.parametrize("valid_before", [NOW_TS - 60, NOW_TS])  # usable only while ts < it
async def test_an_unused_expired_authorization_fails_the_row_and_frees_the_budget(
    ledger: Ledger, rpc: FakeRpc, valid_before: int
) -> None:
    row = await unknown_row(ledger, 2, valid_before)
    before = await ledger.user_spend("telegram:111", BUDGET)
    assert (before.unknown_micro, (await ledger.report()).pending_micro) == (PRICE, PRICE)

    assert await resolve(ledger, {BASE.caip2: rpc.url}) == Resolved(failed=1)

    payment = await ledger.payment(row)
    assert (payment.status, payment.error) == (Status.FAILED, NEVER_USED)
    after = await ledger.user_spend("telegram:111", BUDGET)
    assert (after.unknown_micro, after.left_today_micro) == (0, BUDGET.user_daily_micro)
    assert (await ledger.report()).pending_micro == 0


async def test_an_unused_authorization_still_valid_stays_unknown(
    ledger: Ledger, rpc: FakeRpc
) -> None:
    row = await unknown_row(ledger, 3, NOW_TS + 1)

    assert await resolve(ledger, {BASE.caip2: rpc.url}) == Resolved(left=1)

    assert (await ledger.payment(row)).status is Status.UNKNOWN
    assert rpc.asked == [(BASE.usdc, PAYER.lower(), nonce(3))]


async def test_rows_of_a_network_without_an_rpc_url_are_skipped(
    ledger: Ledger, rpc: FakeRpc
) -> None:
    sepolia = await unknown_row(ledger, 4, NOW_TS - 60, network=BASE_SEPOLIA.caip2)
    base = await unknown_row(ledger, 5, NOW_TS + 600)
    rpc.use(PAYER, nonce(4))

    assert await resolve(ledger, {BASE.caip2: rpc.url}) == Resolved(left=1, skipped=1)

    assert (await ledger.payment(sepolia)).status is Status.UNKNOWN
    assert (await ledger.payment(base)).status is Status.UNKNOWN
    assert [asked[2] for asked in rpc.asked] == [nonce(5)]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("garbage", "answer is not JSON"),
        ("error", "JSON-RPC error"),
        ("http500", "HTTP status 500"),
        ("huge", "answer over the size cap"),
        ("nonsense", "malformed authorizationState"),
        ("hang", "TimeoutError"),
    ],
)
async def test_a_broken_rpc_leaves_the_rows_unknown(
    ledger: Ledger, rpc: FakeRpc, mode: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    used = await unknown_row(ledger, 6, NOW_TS + 600)
    expired = await unknown_row(ledger, 7, NOW_TS - 60)
    rpc.use(PAYER, nonce(6))
    rpc.mode = mode
    started = time.monotonic()

    resolved = await resolve(ledger, {BASE.caip2: rpc.url}, timeout=0.5)

    assert time.monotonic() - started < 5
    assert resolved == Resolved(left=2)
    assert {(await ledger.payment(row)).status for row in (used, expired)} == {Status.UNKNOWN}
    assert f"could not read USDC on eip155:8453: {reason}" in caplog.text
    assert SECRET not in caplog.text and "127.0.0.1" not in caplog.text


async def test_resolve_every_runs_at_once_and_survives_errors(
    ledger: Ledger, rpc: FakeRpc, caplog: pytest.LogCaptureFixture
) -> None:
    row = await unknown_row(ledger, 8, NOW_TS + 600)
    rpc.use(PAYER, nonce(8))
    calls = 0

    def rpc_url_for(network: str) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a passing failure")
        return rpc.url

    settled = asyncio.Event()

    async def tell(payment: Payment) -> None:
        settled.set()

    async with gateway_client() as http:
        resolver = ChainResolver(ledger, http, rpc_url_for, on_settled=tell)
        task = asyncio.create_task(resolver.resolve_every(interval_seconds=0.05))
        await asyncio.wait_for(settled.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert (await ledger.payment(row)).status is Status.SETTLED
    assert "resolving unknown payments from the chain failed" in caplog.text


def test_rpc_urls_are_secret_settings_per_network(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BASE_RPC_URL", "BASE_SEPOLIA_RPC_URL"):
        monkeypatch.delenv(name, raising=False)
    url = f"https://base.example/v2/{SECRET}"

    settings = load_settings(_env_file=None, base_rpc_url=f" {url} ", base_sepolia_rpc_url="")

    assert settings.rpc_url_for(BASE.caip2) == settings.rpc_url_for("base") == url
    assert settings.rpc_url_for(BASE_SEPOLIA.caip2) is None
    assert settings.rpc_url_for("eip155:1") is None
    assert SECRET not in repr(settings)
    assert load_settings(_env_file=None).rpc_url_for(BASE.caip2) is None
    with pytest.raises(ConfigError) as raised:
        load_settings(_env_file=None, base_sepolia_rpc_url=f"base.example/{SECRET}")
    assert raised.value.user_message == "BASE_SEPOLIA_RPC_URL: not an http:// or https:// URL"


# The command line


async def ledger_for_the_cli(path: Path) -> dict[str, int]:
    """A settled, a failed and three unknown rows: used, unused and expired, unused and valid."""
    async with await SqliteLedger.open(path, clock=lambda: NOW) as ledger:
        settled = await ledger.reserve(ALICE, PRICE, BUDGET)
        await ledger.settle(settled, 42_000, "0x" + "ab" * 32)
        failed = await ledger.reserve(ALICE, PRICE, BUDGET)
        await ledger.fail(failed, "gateway error")
        return {
            "settled": settled,
            "failed": failed,
            "used": await unknown_row(ledger, 11, NOW_TS + 600),
            "expired": await unknown_row(ledger, 12, NOW_TS - 600),
            "valid": await unknown_row(ledger, 13, NOW_TS + 600),
        }


async def test_payments_lists_every_payment_newest_first(tmp_path: Path) -> None:
    database = tmp_path / "ledger.sqlite3"
    rows = await ledger_for_the_cli(database)
    env = cli_env("http://127.0.0.1:9", database)

    code, table = await imagebot("payments", env=env, cwd=tmp_path)
    _, listed = await imagebot("payments", "--json", env=env, cwd=tmp_path)
    _, unknown = await imagebot("payments", "--json", "--status", "unknown", env=env, cwd=tmp_path)

    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == [
        *("id", "time", "(UTC)", "user", "command", "model", "status"),
        *("quoted", "usd", "charged", "usd", "tx"),
    ]
    assert [line.split()[0] for line in lines[1:]] == [str(row) for row in range(5, 0, -1)]
    assert lines[-1].split() == [
        str(rows["settled"]),
        "2026-11-21T12:00:00Z",
        "telegram:111",
        "imagegen",
        "google/nano-banana",
        "settled",
        "0.052500",
        "0.042000",
        "0x" + "ab" * 32,
    ]
    payments = json.loads(listed)["payments"]
    assert [payment["id"] for payment in payments] == list(range(5, 0, -1))
    assert payments[-1]["quoted_usd"] == "0.052500" and payments[-1]["charged_usd"] == "0.042000"
    assert payments[0] == {
        "id": rows["valid"],
        "created_at": "2026-11-21T12:00:00Z",
        "user": "telegram:111",
        "command": "imagegen",
        "model": "google/nano-banana",
        "status": "unknown",
        "quoted_usd": "0.052500",
        "charged_usd": None,
        "network": "eip155:8453",
        "payer": PAYER,
        "nonce": nonce(13),
        "valid_before": "2026-11-21T12:10:00Z",
        "tx_hash": None,
        "error": "no answer after paying",
    }
    assert [payment["id"] for payment in json.loads(unknown)["payments"]] == [
        rows["valid"],
        rows["expired"],
        rows["used"],
    ]


async def test_payments_resolve_settles_and_fails_from_the_chain(
    tmp_path: Path, rpc: FakeRpc
) -> None:
    database = tmp_path / "ledger.sqlite3"
    rows = await ledger_for_the_cli(database)
    rpc.use(PAYER, nonce(11))
    env = cli_env("http://127.0.0.1:9", database, BASE_RPC_URL=rpc.url)

    code, out = await imagebot("payments", "--resolve", env=env, cwd=tmp_path)
    _, again = await imagebot("payments", "--resolve", "--json", env=env, cwd=tmp_path)

    assert code == 0
    assert out.splitlines()[0] == (
        "Resolved from the chain: 1 settled, 1 failed, 1 still unknown, 0 not checked (no RPC URL)."
    )
    assert SECRET not in out and SECRET not in again
    report = json.loads(again)
    assert report["resolved"] == {"settled": 0, "failed": 0, "left": 1, "skipped": 0}
    status = {payment["id"]: payment["status"] for payment in report["payments"]}
    assert status[rows["used"]] == "settled" and status[rows["expired"]] == "failed"
    assert status[rows["valid"]] == "unknown"
    charged = {payment["id"]: payment["charged_usd"] for payment in report["payments"]}
    assert charged[rows["used"]] == "0.052500"


async def test_payments_resolve_says_when_no_rpc_url_is_set(tmp_path: Path) -> None:
    database = tmp_path / "ledger.sqlite3"
    await ledger_for_the_cli(database)

    code, out = await imagebot(
        "payments", "--resolve", env=cli_env("http://127.0.0.1:9", database), cwd=tmp_path
    )

    assert code == 0
    assert out.splitlines()[:2] == [
        "No RPC URL is set (BASE_RPC_URL, BASE_SEPOLIA_RPC_URL): "
        "unknown payments cannot be checked on chain.",
        "Resolved from the chain: 0 settled, 0 failed, 0 still unknown, "
        "3 not checked (no RPC URL).",
    ]


def test_payments_without_a_ledger_says_so_and_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "data" / "imagebot.sqlite3"
    monkeypatch.setenv("DATABASE_PATH", str(database))

    assert main(["payments", "--resolve"]) == 1

    assert capsys.readouterr().err == f"imagebot: no ledger at {database} (DATABASE_PATH)\n"
    assert not (tmp_path / "data").exists()


def test_payments_refuses_an_unknown_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["payments", "--status", "lost"])
    assert raised.value.code == 2
    assert "invalid choice: 'lost'" in capsys.readouterr().err
