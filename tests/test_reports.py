"""The ``imagebot spend`` report's JSON (README, "The ledger and budgets")."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from bot.ledger import Report, UserTotal
from imagebot.reports import to_json


def test_to_json_has_the_shape_the_readme_shows() -> None:
    at = datetime(2026, 11, 21, 4, 38, 35, tzinfo=UTC)
    settled_only = Report(157_500, 0, [UserTotal("telegram:111", "@a", 3, 3, 157_500, 0, at)])
    assert json.dumps(to_json(settled_only)) == json.dumps(
        {
            "total_usd": "0.157500",
            "users": [
                {
                    "user": "telegram:111",
                    "requests": 3,
                    "images": 3,
                    "usd": "0.157500",
                    "last_at": "2026-11-21T04:38:35Z",
                }
            ],
        }
    )
    with_unknown = Report(
        1_000_000,
        21_000,
        [
            UserTotal("discord:5", "", 1, 4, 1_000_000, 0, at),
            UserTotal("telegram:111", "@a", 0, 0, 0, 21_000, at),
        ],
    )
    assert json.dumps(to_json(with_unknown)) == json.dumps(
        {
            "total_usd": "1.000000",
            "pending_usd": "0.021000",
            "users": [
                {
                    "user": "discord:5",
                    "requests": 1,
                    "images": 4,
                    "usd": "1.000000",
                    "last_at": "2026-11-21T04:38:35Z",
                },
                {
                    "user": "telegram:111",
                    "requests": 0,
                    "images": 0,
                    "usd": "0.000000",
                    "pending_usd": "0.021000",
                    "last_at": "2026-11-21T04:38:35Z",
                },
            ],
        }
    )
    assert to_json(Report(0, 0, [])) == {"total_usd": "0.000000", "users": []}
