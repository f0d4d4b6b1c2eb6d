"""The money ledger: one row per paid attempt, atomic daily budgets and spend reports.

``api`` is the interface every backend implements: ``sqlite`` (one file, the default) and
``postgres`` (a server that replicas share).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bot.config import Settings, url_passwords
from bot.errors import ConfigError
from bot.ledger.api import (
    Attempt,
    Budget,
    BudgetExceeded,
    Change,
    Charge,
    Controls,
    DayTotal,
    KeptResult,
    Ledger,
    Linked,
    OpenJob,
    Payment,
    Report,
    Status,
    UserSpend,
    UserTotal,
)
from bot.ledger.common import DAY_SECONDS, RESULT_KEEP_DAYS
from bot.ledger.postgres import DATABASE_ERRORS, PostgresLedger
from bot.ledger.sqlite import SqliteLedger

__all__ = [
    "DAY_SECONDS",
    "RESULT_KEEP_DAYS",
    "Attempt",
    "Budget",
    "BudgetExceeded",
    "Change",
    "Charge",
    "Controls",
    "DayTotal",
    "KeptResult",
    "Ledger",
    "Linked",
    "OpenJob",
    "Payment",
    "PostgresLedger",
    "Report",
    "SqliteLedger",
    "Status",
    "UserSpend",
    "UserTotal",
    "open_ledger",
]


async def open_ledger(settings: Settings) -> Ledger:
    """The ledger the settings name, its schema brought up to date; close it when done.

    PostgreSQL at ``DATABASE_URL`` when it is set, else the SQLite file at ``DATABASE_PATH``.
    ``ConfigError`` naming the variable when it cannot be opened, created or
    written; never with the URL's password.
    """
    if settings.database_url is None:
        return await _open_sqlite(settings.database_path)
    url = settings.database_url.get_secret_value()
    try:
        return await PostgresLedger.open(url)
    except (*DATABASE_ERRORS, ValueError) as error:
        reason = _without_password(f"{type(error).__name__}: {error}", url)
        raise ConfigError(f"DATABASE_URL: cannot open the PostgreSQL ledger ({reason})") from None


async def _open_sqlite(path: Path) -> Ledger:
    try:
        return await SqliteLedger.open(path)
    except (OSError, sqlite3.Error) as error:
        raise ConfigError(f"DATABASE_PATH: cannot open a ledger at {path} ({error})") from None


def _without_password(text: str, url: str) -> str:
    """``text`` with the URL's password, as written and decoded, blotted out."""
    for secret in url_passwords(url):
        text = text.replace(secret, "***")
    return text
