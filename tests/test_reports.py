"""The ``imagebot spend`` report: its JSON (README, "The ledger and budgets") and its CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagebot_cli import cli_env, imagebot

from bot.ledger import Attempt, Budget, Report, ReportStream, SqliteLedger, UserTotal
from bot.replies import REPORT_LINES, report_text
from imagebot.reports import write_json


def written(report: Report) -> str:
    """What ``imagebot spend --json`` writes for ``report``, read as a stream."""

    async def users() -> AsyncIterator[UserTotal]:
        for line in report.users:
            yield line

    out = io.StringIO()
    stream = ReportStream(report.total_micro, report.pending_micro, users())
    asyncio.run(write_json(stream, out))
    return out.getvalue()


def to_json(report: Report) -> Any:
    return json.loads(written(report))


def test_the_json_has_the_shape_the_readme_shows_byte_for_byte() -> None:
    at = datetime(2026, 11, 21, 4, 38, 35, tzinfo=UTC)
    settled_only = Report(157_500, 0, [UserTotal("telegram:111", "@a", 3, 3, 157_500, 0, at)])
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"\n{written(settled_only)}```" in readme  # the README's example, as printed
    assert (
        written(settled_only)
        == json.dumps(
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
        + "\n"
    )
    with_unknown = Report(
        1_000_000,
        21_000,
        [
            UserTotal("discord:5", "", 1, 4, 1_000_000, 0, at),
            UserTotal("telegram:111", "@a", 0, 0, 0, 21_000, at),
        ],
    )
    assert (
        written(with_unknown)
        == json.dumps(
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
        + "\n"
    )
    assert to_json(Report(0, 0, [])) == {"total_usd": "0.000000", "users": []}


def test_a_linked_user_names_their_person() -> None:
    at = datetime(2026, 11, 21, 4, 38, 35, tzinfo=UTC)
    linked = UserTotal("discord:5", "@b", 1, 1, 21_000, 0, at, person="telegram:111")
    (entry,) = to_json(Report(21_000, 0, [linked]))["users"]
    assert entry == {
        "user": "discord:5",
        "requests": 1,
        "images": 1,
        "usd": "0.021000",
        "last_at": "2026-11-21T04:38:35Z",
        "person": "telegram:111",
    }


async def test_spend_csv_lists_each_settled_payment_and_json_names_persons(
    tmp_path: Path,
) -> None:
    database = tmp_path / "ledger.sqlite3"
    clock = lambda: datetime(2026, 11, 21, 4, 38, 35, tzinfo=UTC)  # noqa: E731
    budget = Budget(user_daily_micro=10_000_000, global_daily_micro=10_000_000, exempt=False)
    async with await SqliteLedger.open(database, clock=clock) as ledger:
        for user_id, platform, settle in (("111", "telegram", True), ("5", "discord", True)):
            attempt = Attempt(platform, user_id, "@x", "c", "imagegen", "m/one", "1024x1024", 2)
            row = await ledger.reserve(attempt, 42_000, budget)
            if settle:
                await ledger.settle(row, 42_000, f"0x{row:064x}")
        failed = await ledger.reserve(attempt, 42_000, budget)
        await ledger.fail(failed, "declined")
        code = await ledger.new_link_code("telegram:111")
        await ledger.redeem_link_code("discord:5", code)
    env = cli_env("http://127.0.0.1:9", database)

    code, out = await imagebot("spend", "--csv", env=env, cwd=tmp_path)
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["time", "user", "command", "model", "size", "n", "usd", "tx_hash"],
        ["2026-11-21T04:38:35Z", "telegram:111", "imagegen", "m/one", "1024x1024", "2",
         "0.042000", f"0x{1:064x}"],
        ["2026-11-21T04:38:35Z", "discord:5", "imagegen", "m/one", "1024x1024", "2",
         "0.042000", f"0x{2:064x}"],
    ]  # fmt: skip
    code, out = await imagebot("spend", "--csv", "--user", "discord:5", env=env, cwd=tmp_path)
    assert [row[1] for row in csv.reader(io.StringIO(out))] == ["user", "discord:5"]

    code, out = await imagebot("spend", "--json", env=env, cwd=tmp_path)
    persons = {entry["user"]: entry.get("person") for entry in json.loads(out)["users"]}
    assert persons == {"telegram:111": "telegram:111", "discord:5": "telegram:111"}


def test_spend_all_lists_every_user_up_to_its_bound_and_counts_the_rest() -> None:
    at = datetime(2026, 11, 21, 4, 38, 35, tzinfo=UTC)

    def report(users: int) -> Report:
        lines = [
            UserTotal(f"telegram:{i}", "", 1, 1, 1_000 * (users - i), 0, at) for i in range(users)
        ]
        return Report(sum(line.micro for line in lines), 0, lines)

    some = report_text(report(25)).splitlines()
    many = report_text(report(REPORT_LINES + 7)).splitlines()

    assert [line.split(":")[1] for line in some[1:]] == [str(i) for i in range(25)]
    assert len(many) == 1 + REPORT_LINES + 1
    assert many[-1] == "…and 7 more; `imagebot spend` on the server lists everyone."
