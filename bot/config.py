"""Settings from the environment and ``./.env``, validated once at start-up and passed down."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bot.chains import BASE, BASE_SEPOLIA, Chain, chain_for, gateway_chain
from bot.errors import ConfigError
from bot.money import parse_usd
from bot.principals import CONSOLE_OPERATOR, parse_principal

_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")

Principals = Annotated[frozenset[str], NoDecode]
ShardIds = Annotated[tuple[int, ...] | None, NoDecode]
POSTGRES_URL = re.compile(r"^postgres(ql)?://[^\s/]*/[^\s/?]+")  # postgresql://…/dbname
# Telegram's secret_token allows 1 to 256 of these; fewer than 16 would be guessable.
_WEBHOOK_SECRET = re.compile(r"^[A-Za-z0-9_-]{16,256}$")


class Settings(BaseSettings):
    """Every variable of the README's "Settings" table; field names match the variables."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
        populate_by_name=True,
    )

    telegram_bot_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org"
    discord_bot_token: SecretStr | None = None
    discord_api_url: str = "https://discord.com/api/v10"
    image_api_url: str = "https://blockrun.ai/api"
    payment_network: str | None = None
    wallet_private_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("WALLET_PRIVATE_KEY", "BLOCKRUN_WALLET_KEY")
    )
    max_micro_per_request: int = Field(500_000, validation_alias="MAX_USD_PER_REQUEST")
    user_daily_micro: int = Field(1_000_000, validation_alias="USER_DAILY_LIMIT_USD")
    global_daily_micro: int = Field(20_000_000, validation_alias="GLOBAL_DAILY_LIMIT_USD")
    max_concurrent_jobs: int = 256  # each costs a socket; bot/images.py bounds the memory
    admin_ids: Principals = frozenset()
    allowed_users: Principals = frozenset()
    allowed_chats: Principals = frozenset()
    base_rpc_url: SecretStr | None = None
    base_sepolia_rpc_url: SecretStr | None = None
    database_path: Path = Path("./data/imagebot.sqlite3")
    database_url: SecretStr | None = None
    log_level: str = "INFO"
    telegram_webhook_url: str | None = None
    telegram_webhook_listen: str = "0.0.0.0:8080"
    telegram_webhook_secret: SecretStr | None = None
    discord_shard_count: int | None = None
    discord_shard_ids: ShardIds = None
    low_balance_micro: int = Field(0, validation_alias="LOW_BALANCE_USD")  # 0: no warnings
    metrics_listen: str | None = None

    @field_validator(
        "telegram_bot_token",
        "discord_bot_token",
        "wallet_private_key",
        "base_rpc_url",
        "base_sepolia_rpc_url",
        "payment_network",
        "database_url",
        "telegram_webhook_url",
        "telegram_webhook_secret",
        "discord_shard_count",
        "discord_shard_ids",
        "metrics_listen",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("wallet_private_key")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _KEY.match(value.get_secret_value().strip()):
            raise ValueError("not a private key: expected 64 hex digits, optionally after 0x")
        return value

    @field_validator("payment_network")
    @classmethod
    def _check_network(cls, value: str | None) -> str | None:
        if value is None:
            return None
        chain = chain_for(value.strip().lower())
        if chain is None:
            raise ValueError("use base, base-sepolia, eip155:8453 or eip155:84532")
        return chain.caip2

    @field_validator("telegram_api_url", "discord_api_url", "image_api_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("not an http:// or https:// URL")
        return value

    @field_validator("base_rpc_url", "base_sepolia_rpc_url")
    @classmethod
    def _check_rpc_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value().strip()
        if not re.match(r"^https?://[^\s/]+", url):
            raise ValueError("not an http:// or https:// URL")
        return SecretStr(url)

    @field_validator(
        "max_micro_per_request",
        "user_daily_micro",
        "global_daily_micro",
        "low_balance_micro",
        mode="before",
    )
    @classmethod
    def _parse_usd(cls, value: Any) -> int:
        if isinstance(value, int):
            return value
        return parse_usd(str(value))

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value().strip()
        if not POSTGRES_URL.match(url):
            raise ValueError("expected postgresql://user:password@host:port/dbname")
        return SecretStr(url)

    @field_validator("telegram_webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = urlsplit(value.strip())
        loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
        if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and loopback)):
            raise ValueError("not an https:// URL (http:// only for a loopback address)")
        return value.strip()

    @field_validator("telegram_webhook_listen", "metrics_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, colon, port = value.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port, e.g. 0.0.0.0:8080")
        return value.strip()

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _WEBHOOK_SECRET.match(value.get_secret_value()):
            raise ValueError("use 16 to 256 characters of A-Z, a-z, 0-9, _ and -")
        return value

    @field_validator("discord_shard_count", "max_concurrent_jobs")
    @classmethod
    def _check_at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be 1 or more")
        return value

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _parse_shard_ids(cls, value: Any) -> tuple[int, ...] | None:
        if value is None or isinstance(value, tuple | list):
            return None if value is None else tuple(int(item) for item in value)
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not items or not all(item.isdigit() for item in items):
            raise ValueError("expected comma-separated shard numbers, e.g. 0,1")
        return tuple(sorted({int(item) for item in items}))

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        if self.telegram_webhook_url and self.telegram_webhook_secret is None:
            raise ValueError("TELEGRAM_WEBHOOK_SECRET: required with TELEGRAM_WEBHOOK_URL")
        if self.discord_shard_ids is not None:
            count = self.discord_shard_count
            if count is None:
                raise ValueError("DISCORD_SHARD_IDS: needs DISCORD_SHARD_COUNT")
            if any(shard >= count for shard in self.discord_shard_ids):
                raise ValueError(f"DISCORD_SHARD_IDS: shard ids run from 0 to {count - 1}")
        return self

    @field_validator("admin_ids", "allowed_users", "allowed_chats", mode="before")
    @classmethod
    def _parse_principals(cls, value: Any) -> frozenset[str]:
        if isinstance(value, frozenset | set | list | tuple):
            items = [str(item) for item in value]
        else:
            items = [item for item in str(value).split(",")]
        return frozenset(parse_principal(item) for item in items if item.strip())

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError("use DEBUG, INFO, WARNING or ERROR")
        return level

    def is_admin(self, principal: str) -> bool:
        """Admins are ``ADMIN_IDS`` plus the console's local operator."""
        return principal == CONSOLE_OPERATOR or principal in self.admin_ids

    @property
    def payment_chain(self) -> Chain:
        """The one network the bot signs on: ``PAYMENT_NETWORK``, else what the gateway implies."""
        chain = chain_for(self.payment_network) if self.payment_network else None
        return chain or gateway_chain(self.image_api_url)

    def rpc_url_for(self, network: str) -> str | None:
        """The JSON-RPC endpoint set for a network (CAIP-2 id or v1 name), or None."""
        urls = {BASE: self.base_rpc_url, BASE_SEPOLIA: self.base_sepolia_rpc_url}
        chain = chain_for(network)
        url = urls.get(chain) if chain is not None else None
        return url.get_secret_value() if url is not None else None


def url_passwords(url: str) -> set[str]:
    """The password in ``url`` as written and percent-decoded (none if it has none), so both
    forms can be kept out of output."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return set()
    return {password, unquote(password)} if password else set()


class _BuiltIn(Settings):
    """The built-in defaults and the values given; nothing from the environment or ``.env``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; a bad value raises ``ConfigError`` naming the variable."""
    return _validated(Settings, overrides)


def built_in_settings(**overrides: Any) -> Settings:
    """The built-in defaults with ``overrides`` only, as ``imagebot demo`` runs: no deployment's
    ledger, network, wallet or limits in the environment or ``.env`` reach it."""
    return _validated(_BuiltIn, overrides)


def _validated(kind: type[Settings], overrides: dict[str, Any]) -> Settings:
    try:
        return kind(**overrides)
    except ValidationError as error:
        lines = [_describe(problem) for problem in error.errors(include_input=False)]
        raise ConfigError("\n".join(lines)) from None


def _describe(problem: Any) -> str:
    if not problem["loc"]:  # a check across settings names its variable itself
        return str(problem["msg"]).removeprefix("Value error, ")
    field = str(problem["loc"][0])
    variable = _variable_name(field)
    message = str(problem["msg"]).removeprefix("Value error, ")
    return f"{variable}: {message}"


def _variable_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field.upper()
