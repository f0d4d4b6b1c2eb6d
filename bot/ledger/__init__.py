"""The money ledger: one row per paid attempt, atomic daily budgets and spend reports.

``api`` is the interface every backend implements: ``sqlite`` (one file, the default) and
``postgres`` (a server that replicas share). The backends (and their drivers) are imported when
first used, so a command that only reads the interface starts fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import ConfigError
from bot.ledger.api import (
    PAUSED_TEXT,
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
    ReportStream,
    SpendingPaused,
    Status,
    UserSpend,
    UserTotal,
)
from bot.ledger.common import DAY_SECONDS, RESULT_KEEP_DAYS

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.ledger.postgres import DATABASE_ERRORS, PostgresLedger
    from bot.ledger.sqlite import SqliteLedger

_BACKENDS = {  # name -> module, imported on first use
    "DATABASE_ERRORS": "bot.ledger.postgres",
    "PostgresLedger": "bot.ledger.postgres",
    "SqliteLedger": "bot.ledger.sqlite",
}

__all__ = [
    "DATABASE_ERRORS",
    "DAY_SECONDS",
    "PAUSED_TEXT",
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
    "ReportStream",
    "SpendingPaused",
    "SqliteLedger",
    "Status",
    "UserSpend",
    "UserTotal",
    "open_ledger",
]


def __getattr__(name: str) -> Any:
    """A backend's name, imported from its module the first time it is asked for."""
    if name not in _BACKENDS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_BACKENDS[name]), name)


async def open_ledger(settings: Settings) -> Ledger:
    """The ledger the settings name, its schema brought up to date; close it when done.

    PostgreSQL at ``DATABASE_URL`` when it is set, else the SQLite file at ``DATABASE_PATH``.
    ``ConfigError`` naming the variable when it cannot be opened, created or
    written; never with the URL's password.
    """
    if settings.database_url is None:
        return await _open_sqlite(settings.database_path)
    from bot.ledger.postgres import DATABASE_ERRORS, PostgresLedger

    url = settings.database_url.get_secret_value()
    try:
        return await PostgresLedger.open(url)
    except (*DATABASE_ERRORS, ValueError) as error:
        reason = _without_password(f"{type(error).__name__}: {error}", url)
        raise ConfigError(f"DATABASE_URL: cannot open the PostgreSQL ledger ({reason})") from None


async def _open_sqlite(path: Path) -> Ledger:
    import sqlite3

    from bot.ledger.sqlite import SqliteLedger

    try:
        return await SqliteLedger.open(path)
    except (OSError, sqlite3.Error) as error:
        raise ConfigError(f"DATABASE_PATH: cannot open a ledger at {path} ({error})") from None


def _without_password(text: str, url: str) -> str:
    """``text`` with the URL's password, as written and decoded, blotted out."""
    from bot.config import url_passwords

    for secret in url_passwords(url):
        text = text.replace(secret, "***")
    return text
