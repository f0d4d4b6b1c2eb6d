"""The ``imagebot spend`` report: a table, or JSON (README, "The ledger and budgets")."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TextIO

from bot.ledger import Change, Charge, Report, ReportStream, UserTotal
from bot.money import usd_string


def iso_utc(moment: datetime) -> str:
    """``2026-11-21T04:38:35Z``, as reports print times."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def write_json(stream: ReportStream, out: TextIO) -> None:
    """The ``imagebot spend --json`` object, written line by line as the report is read:
    ``pending_usd`` only where something is unresolved."""
    head: dict[str, Any] = {"total_usd": usd_string(stream.total_micro)}
    if stream.pending_micro:
        head["pending_usd"] = usd_string(stream.pending_micro)
    out.write(json.dumps(head)[:-1] + ', "users": [')
    separator = ""
    async for line in stream.users:
        out.write(separator + json.dumps(_user_json(line)))
        separator = ", "
    out.write("]}\n")


def _user_json(line: UserTotal) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "user": line.user,
        "requests": line.requests,
        "images": line.images,
        "usd": usd_string(line.micro),
    }
    if line.pending_micro:
        entry["pending_usd"] = usd_string(line.pending_micro)
    entry["last_at"] = iso_utc(line.last_at)
    if line.person is not None:
        entry["person"] = line.person
    return entry


def change_json(change: Change) -> dict[str, Any]:
    """One admin change for ``imagebot changes --json``; a limit in USD as a string."""
    return {
        "at": iso_utc(change.at),
        "admin": change.admin,
        "action": change.action,
        "target": change.target,
        "usd": None if change.micro is None else usd_string(change.micro),
    }


def changes_table(changes: list[Change]) -> str:
    """``imagebot changes``: one line per change, newest first."""
    if not changes:
        return "No changes made from the chat."
    return "\n".join(
        "  ".join(
            (iso_utc(c.at), c.admin, c.action, c.target or "-", _usd_or_dash(c.micro))
        ).rstrip()
        for c in changes
    )


def _usd_or_dash(micro: int | None) -> str:
    return "-" if micro is None else usd_string(micro)


CSV_HEADER = ("time", "user", "command", "model", "size", "n", "usd", "tx_hash")


def csv_row(charge: Charge) -> tuple[str, ...]:
    """One ``imagebot spend --csv`` line's cells."""
    return (
        iso_utc(charge.at),
        charge.user,
        charge.command,
        charge.model,
        charge.size,
        str(charge.n),
        usd_string(charge.micro),
        charge.tx_hash or "",
    )


def report_table(report: Report) -> str:
    """The shell report: one row per user, then the totals."""
    rows = [("user", "name", "requests", "images", "usd", "unknown", "last use")]
    for user in report.users:
        rows.append(
            (
                user.user,
                user.display_name or "-",
                str(user.requests),
                str(user.images),
                usd_string(user.micro),
                usd_string(user.pending_micro) if user.pending_micro else "-",
                iso_utc(user.last_at),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(f"total settled: {usd_string(report.total_micro)} USD")
    if report.pending_micro:
        lines.append(f"outcome unknown (not in the total): {usd_string(report.pending_micro)} USD")
    return "\n".join(lines)
