"""``imagebot spend``, ``payments``, ``changes`` and ``migrate``: the ledger on the shell.

Imported only when one of them runs; they read a ledger and never create one.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from bot.chains import CHAINS
from bot.config import Settings, load_settings, url_passwords
from bot.ledger import DATABASE_ERRORS, Change, Payment, Report, Status, open_ledger
from bot.money import usd_string
from imagebot.logs import configure_logging, secrets_of
from imagebot.reports import (
    CSV_HEADER,
    change_json,
    changes_table,
    csv_row,
    iso_utc,
    report_table,
    write_json,
)

if TYPE_CHECKING:
    from bot.chain import Resolved


def _ledger_exists(settings: Settings) -> bool:
    """Report commands read a ledger; they never create one."""
    if settings.database_path.is_file():
        return True
    print(f"imagebot: no ledger at {settings.database_path} (DATABASE_PATH)", file=sys.stderr)
    return False


def spend(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.database_url is None and not _ledger_exists(settings):
        return 1
    if args.csv:
        asyncio.run(_write_csv(settings, args.since, args.user))
    elif args.json:
        asyncio.run(_write_json(settings, args.since, args.user))
    else:
        print(report_table(asyncio.run(_report(settings, args.since, args.user))))
    return 0


async def _write_csv(settings: Settings, since: date | None, user: str | None) -> None:
    """One line per settled payment, written as the rows are read."""
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(CSV_HEADER)
    async with await open_ledger(settings) as ledger:
        async for charge in ledger.charges(since=since, user=user):
            out.writerow(csv_row(charge))


async def _write_json(settings: Settings, since: date | None, user: str | None) -> None:
    """The report as JSON, written as the ledger's cursor reads it."""
    async with (
        await open_ledger(settings) as ledger,
        ledger.report_stream(since=since, user=user) as stream,
    ):
        await write_json(stream, sys.stdout)


async def _report(settings: Settings, since: date | None, user: str | None) -> Report:
    async with await open_ledger(settings) as ledger:
        return await ledger.report(since=since, user=user)


def payments(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.database_url is None and not _ledger_exists(settings):
        return 1
    status = Status(args.status) if args.status else None
    resolved, payments = asyncio.run(_list_payments(settings, status, args.resolve))
    notes = sys.stderr if args.json else sys.stdout
    if args.resolve and not any(settings.rpc_url_for(chain.caip2) for chain in CHAINS):
        print(
            "No RPC URL is set (BASE_RPC_URL, BASE_SEPOLIA_RPC_URL): "
            "unknown payments cannot be checked on chain.",
            file=notes,
        )
    if args.json:
        result: dict[str, Any] = {"resolved": asdict(resolved)} if resolved is not None else {}
        result["payments"] = [_payment_json(payment) for payment in payments]
        print(json.dumps(result))
        return 0
    if resolved is not None:
        print(
            f"Resolved from the chain: {resolved.settled} settled, {resolved.failed} failed, "
            f"{resolved.left} still unknown, {resolved.skipped} not checked (no RPC URL).",
        )
    print(_payments_table(payments))
    return 0


def changes(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.database_url is None and not _ledger_exists(settings):
        return 1
    changes = asyncio.run(_read_changes(settings))
    if args.json:
        print(json.dumps({"changes": [change_json(change) for change in changes]}))
    else:
        print(changes_table(changes))
    return 0


async def _read_changes(settings: Settings) -> list[Change]:
    async with await open_ledger(settings) as ledger:
        return await ledger.changes()


async def _list_payments(
    settings: Settings, status: Status | None, resolve: bool
) -> tuple[Resolved | None, list[Payment]]:
    """The payments newest first, after a pass of the chain resolver if asked."""
    async with await open_ledger(settings) as ledger:
        resolved = None
        if resolve:  # the chain's reader (and eth-utils) only when asked
            from bot.chain import ChainResolver
            from bot.http import gateway_client

            async with gateway_client() as http:
                resolved = await ChainResolver(ledger, http, settings.rpc_url_for).resolve()
        return resolved, await ledger.payments(status)


def _payment_json(payment: Payment) -> dict[str, Any]:
    """One payment of ``imagebot payments --json``; amounts as 6-place decimal strings."""
    charged = payment.charged_micro
    valid_before = payment.valid_before
    return {
        "id": payment.row_id,
        "created_at": iso_utc(payment.created_at),
        "user": payment.user,
        "command": payment.command,
        "model": payment.model,
        "status": payment.status.value,
        "quoted_usd": usd_string(payment.quoted_micro),
        "charged_usd": usd_string(charged) if charged is not None else None,
        "network": payment.network,
        "payer": payment.payer,
        "nonce": payment.nonce,
        "valid_before": (
            iso_utc(datetime.fromtimestamp(valid_before, UTC)) if valid_before is not None else None
        ),
        "tx_hash": payment.tx_hash,
        "error": payment.error,
    }


def _payments_table(payments: list[Payment]) -> str:
    """The shell listing: one row per payment, newest first."""
    rows = [
        (
            "id",
            "time (UTC)",
            "user",
            "command",
            "model",
            "status",
            "quoted usd",
            "charged usd",
            "tx",
        )
    ]
    for payment in payments:
        charged = payment.charged_micro
        rows.append(
            (
                str(payment.row_id),
                iso_utc(payment.created_at),
                payment.user,
                payment.command,
                payment.model,
                payment.status.value,
                usd_string(payment.quoted_micro),
                usd_string(charged) if charged is not None else "-",
                payment.tx_hash or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if not payments:
        lines.append("no payments")
    return "\n".join(lines)


def migrate(args: argparse.Namespace) -> int:
    from bot.ledger.copying import TargetNotEmpty, TotalsDiffer, copy_ledger

    settings = load_settings()
    if not _ledger_exists(settings):
        return 1
    configure_logging(settings.log_level, [*secrets_of(settings), args.to, *url_passwords(args.to)])
    try:
        copied = asyncio.run(copy_ledger(settings.database_path, args.to))
    except (TargetNotEmpty, TotalsDiffer) as refused:
        why = (
            f"the PostgreSQL database {refused}; migrate only into an empty one"
            if isinstance(refused, TargetNotEmpty)
            else f"the copy does not match the SQLite ledger ({refused})"
        )
        print(f"imagebot: {why}. Nothing was changed in PostgreSQL.", file=sys.stderr)
        return 1
    except DATABASE_ERRORS as error:
        print(
            f"imagebot: cannot migrate into PostgreSQL ({type(error).__name__}); "
            "check the address, the password and that the database exists. Nothing was changed.",
            file=sys.stderr,
        )
        return 1
    print(
        f"Copied {copied.payments} payments of {copied.users} users over {copied.days} days "
        f"and {copied.results} kept results from {settings.database_path} "
        "into PostgreSQL. Every total matches: settled "
        f"{usd_string(copied.settled_micro)}, pending {usd_string(copied.pending_micro)}, "
        f"unknown {usd_string(copied.unknown_micro)} USD, per user, per day and per status.\n"
        "Set DATABASE_URL to that address and start the bot."
    )
    return 0
