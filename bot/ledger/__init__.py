"""The money ledger: one row per paid attempt, atomic daily budgets and spend reports.

``api`` is the interface every backend implements; ``sqlite`` is the backend in use.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from bot.errors import ConfigError
from bot.ledger.api import (
    Attempt,
    Budget,
    BudgetExceeded,
    Ledger,
    OpenJob,
    Payment,
    Report,
    Status,
    UserSpend,
    UserTotal,
)
from bot.ledger.schema import DAY_SECONDS
from bot.ledger.sqlite import SqliteLedger

__all__ = [
    "DAY_SECONDS",
    "Attempt",
    "Budget",
    "BudgetExceeded",
    "Ledger",
    "OpenJob",
    "Payment",
    "Report",
    "SqliteLedger",
    "Status",
    "UserSpend",
    "UserTotal",
    "open_ledger",
]


async def open_ledger(path: Path) -> Ledger:
    """The ledger at ``path``, its schema brought up to date; close it when done.

    ``ConfigError`` naming DATABASE_PATH when it cannot be created, opened or written.
    """
    try:
        return await SqliteLedger.open(path)
    except (OSError, sqlite3.Error) as error:
        raise ConfigError(f"DATABASE_PATH: cannot open a ledger at {path} ({error})") from None
