"""Settings: every variable validated; a bad one stops start-up naming it, never its value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.errors import ConfigError

KEY = "0x" + "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
VARIABLES = [
    "TELEGRAM_BOT_TOKEN",
    "TELEGRAM_API_URL",
    "DISCORD_BOT_TOKEN",
    "DISCORD_API_URL",
    "IMAGE_API_URL",
    "WALLET_PRIVATE_KEY",
    "BLOCKRUN_WALLET_KEY",
    "MAX_USD_PER_REQUEST",
    "USER_DAILY_LIMIT_USD",
    "GLOBAL_DAILY_LIMIT_USD",
    "MAX_CONCURRENT_JOBS",
    "ADMIN_IDS",
    "BASE_RPC_URL",
    "BASE_SEPOLIA_RPC_URL",
    "ALLOWED_USERS",
    "ALLOWED_CHATS",
    "DATABASE_PATH",
    "LOG_LEVEL",
    "PAYMENT_NETWORK",
    "DATABASE_URL",
    "TELEGRAM_WEBHOOK_URL",
    "TELEGRAM_WEBHOOK_LISTEN",
    "TELEGRAM_WEBHOOK_SECRET",
    "DISCORD_SHARD_COUNT",
    "DISCORD_SHARD_IDS",
]
ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings()
    assert settings.telegram_bot_token is None and settings.discord_bot_token is None
    assert settings.telegram_api_url == "https://api.telegram.org"
    assert settings.discord_api_url == "https://discord.com/api/v10"
    assert settings.image_api_url == "https://blockrun.ai/api"
    assert settings.wallet_private_key is None
    assert settings.max_micro_per_request == 500_000
    assert settings.user_daily_micro == 1_000_000
    assert settings.global_daily_micro == 20_000_000
    assert settings.max_concurrent_jobs == 256
    assert settings.admin_ids == settings.allowed_users == settings.allowed_chats == frozenset()
    assert settings.database_path == Path("data/imagebot.sqlite3")
    assert settings.log_level == "INFO"


def test_every_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "TELEGRAM_BOT_TOKEN": "123:abc",
        "TELEGRAM_API_URL": "http://127.0.0.1:8081/",
        "DISCORD_BOT_TOKEN": "discord-token",
        "DISCORD_API_URL": "http://127.0.0.1:9000/api/v10",
        "IMAGE_API_URL": "http://localhost:8402",
        "WALLET_PRIVATE_KEY": KEY,
        "MAX_USD_PER_REQUEST": "0.25",
        "USER_DAILY_LIMIT_USD": "0",
        "GLOBAL_DAILY_LIMIT_USD": "5.123456",
        "MAX_CONCURRENT_JOBS": "9",
        "ADMIN_IDS": "telegram:12345, discord:67890",
        "ALLOWED_USERS": "telegram:1",
        "ALLOWED_CHATS": "telegram:-1001234,discord:42",
        "DATABASE_PATH": "/tmp/ledger.sqlite3",
        "LOG_LEVEL": "debug",
        "DATABASE_URL": "postgresql://bot:pw@db:5432/imagebot",
        "TELEGRAM_WEBHOOK_URL": "https://bot.example.org/telegram",
        "TELEGRAM_WEBHOOK_LISTEN": "127.0.0.1:8443",
        "TELEGRAM_WEBHOOK_SECRET": "s3cret_-token-0123456",
        "DISCORD_SHARD_COUNT": "4",
        "DISCORD_SHARD_IDS": "3, 1",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.telegram_bot_token is not None
    assert settings.telegram_bot_token.get_secret_value() == "123:abc"
    assert settings.telegram_api_url == "http://127.0.0.1:8081"
    assert settings.wallet_private_key is not None
    assert settings.wallet_private_key.get_secret_value() == KEY
    assert settings.max_micro_per_request == 250_000
    assert settings.user_daily_micro == 0
    assert settings.global_daily_micro == 5_123_456
    assert settings.max_concurrent_jobs == 9
    assert settings.admin_ids == {"telegram:12345", "discord:67890"}
    assert settings.allowed_chats == {"telegram:-1001234", "discord:42"}
    assert settings.database_path == Path("/tmp/ledger.sqlite3")
    assert settings.log_level == "DEBUG"
    assert settings.is_admin("discord:67890") and not settings.is_admin("telegram:1")
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == values["DATABASE_URL"]
    assert settings.telegram_webhook_url == values["TELEGRAM_WEBHOOK_URL"]
    assert settings.telegram_webhook_listen == "127.0.0.1:8443"
    assert settings.telegram_webhook_secret is not None
    assert (settings.discord_shard_count, settings.discord_shard_ids) == (4, (1, 3))


def test_every_variable_is_in_env_example_and_the_readme() -> None:
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in set(VARIABLES) - {"BLOCKRUN_WALLET_KEY"}:  # an alias, named in the comments
        assert f"{name}=" in example, name
        assert f"`{name}`" in readme, name


def test_blockrun_wallet_key_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKRUN_WALLET_KEY", KEY.removeprefix("0x"))
    settings = load_settings()
    assert settings.wallet_private_key is not None


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAX_USD_PER_REQUEST=0.10\nADMIN_IDS=telegram:7\n")
    settings = load_settings()
    assert settings.max_micro_per_request == 100_000
    assert settings.admin_ids == {"telegram:7"}


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("WALLET_PRIVATE_KEY", "not-a-key", "64 hex digits"),
        ("WALLET_PRIVATE_KEY", "0x1234", "64 hex digits"),
        ("BLOCKRUN_WALLET_KEY", "zz" * 32, "64 hex digits"),
        ("MAX_USD_PER_REQUEST", "-1", "negative"),
        ("MAX_USD_PER_REQUEST", "lots", "dollar amount"),
        ("USER_DAILY_LIMIT_USD", "0.0000001", "6 decimal"),
        ("GLOBAL_DAILY_LIMIT_USD", "nan", "dollar amount"),
        ("GLOBAL_DAILY_LIMIT_USD", "inf", "dollar amount"),
        ("MAX_CONCURRENT_JOBS", "0", "1 or more"),
        ("MAX_CONCURRENT_JOBS", "many", "valid integer"),
        ("ADMIN_IDS", "slack:1", "unknown platform"),
        ("ADMIN_IDS", "telegram:abc", "platform:id"),
        ("ALLOWED_USERS", "12345", "unknown platform"),
        ("ALLOWED_CHATS", "discord:-5", "platform:id"),
        ("IMAGE_API_URL", "ftp://example.org", "http"),
        ("TELEGRAM_API_URL", "api.telegram.org", "http"),
        ("LOG_LEVEL", "loud", "DEBUG"),
        ("DATABASE_URL", "mysql://root:pw@db/imagebot", "postgresql://"),
        ("TELEGRAM_WEBHOOK_URL", "http://bot.example.org/hook", "https://"),
        ("TELEGRAM_WEBHOOK_LISTEN", "8080", "host:port"),
        ("TELEGRAM_WEBHOOK_SECRET", "has spaces", "A-Z"),
        ("DISCORD_SHARD_COUNT", "0", "1 or more"),
        ("DISCORD_SHARD_IDS", "one", "shard numbers"),
        ("DISCORD_SHARD_IDS", ",", "shard numbers"),
    ],
)
def test_bad_value_names_the_variable_and_the_problem(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = caught.value.user_message
    shown = "WALLET_PRIVATE_KEY" if variable == "BLOCKRUN_WALLET_KEY" else variable
    assert message.startswith(f"{shown}: ")
    assert problem in message
    assert len(message.splitlines()) == 1
    if "KEY" in variable or variable == "DATABASE_URL":
        assert value not in message and "pw" not in message


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"TELEGRAM_WEBHOOK_URL": "https://bot.example.org/hook"},
            "TELEGRAM_WEBHOOK_SECRET: required with TELEGRAM_WEBHOOK_URL",
        ),
        ({"DISCORD_SHARD_IDS": "0"}, "DISCORD_SHARD_IDS: needs DISCORD_SHARD_COUNT"),
        (
            {"DISCORD_SHARD_COUNT": "2", "DISCORD_SHARD_IDS": "0,2"},
            "DISCORD_SHARD_IDS: shard ids run from 0 to 1",
        ),
    ],
)
def test_settings_that_go_together_are_checked_together(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], message: str
) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.user_message == message


def test_the_key_never_shows_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALLET_PRIVATE_KEY", KEY)
    settings = load_settings()
    secret = KEY.removeprefix("0x")
    assert secret not in repr(settings) and secret not in str(settings)
    assert secret not in settings.model_dump_json()


def _imagebot(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in VARIABLES} | env
    return subprocess.run(
        [sys.executable, "-m", "imagebot.cli", *args],
        env=environment | {"PYTHONPATH": str(Path(__file__).parents[1])},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_with_a_bad_key_exits_2_naming_the_variable_not_the_value(tmp_path: Path) -> None:
    bad = "not-a-key-" + "deadbeef" * 6
    result = _imagebot("run", env={"WALLET_PRIVATE_KEY": bad}, cwd=tmp_path)
    assert result.returncode == 2
    assert "WALLET_PRIVATE_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert bad not in result.stdout + result.stderr
    assert "deadbeef" not in result.stdout + result.stderr


def test_run_without_a_token_exits_2_and_points_to_the_demo(tmp_path: Path) -> None:
    result = _imagebot("run", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert "TELEGRAM_BOT_TOKEN" in result.stderr and "imagebot demo" in result.stderr
