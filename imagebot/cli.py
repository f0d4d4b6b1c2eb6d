"""The ``imagebot`` command line (README, "CLI")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bot.chain import ChainResolver, Resolved
from bot.chains import CHAINS
from bot.config import POSTGRES_URL, Settings, load_settings, url_passwords
from bot.errors import ConfigError
from bot.http import gateway_client
from bot.ledger import Change, Payment, Report, Status, open_ledger
from bot.ledger.postgres import DATABASE_ERRORS
from bot.money import usd_string
from bot.principals import parse_principal
from bot.service import Chat, ImageBot
from bot.x402 import Wallet
from imagebot.health import serving_health
from imagebot.logs import configure_logging, secrets_of
from imagebot.reports import (
    CSV_HEADER,
    change_json,
    changes_table,
    csv_row,
    iso_utc,
    report_table,
    to_json,
)
from imagebot.wiring import open_bot

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
OUT_DIR = Path("out")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        for line in error.user_message.splitlines():
            print(f"imagebot: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagebot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run every adapter whose token is set")
    run.set_defaults(handler=_run)

    for name, handler, text in (
        ("console", _console, "chat on the terminal against the configured gateway"),
        ("demo", _demo, "offline: the built-in sandbox gateway and a throwaway wallet"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--once", metavar="COMMAND", help='run one command, e.g. "/imagegen a fox"'
        )
        sub.set_defaults(handler=handler)

    sandbox = commands.add_parser("sandbox", help="run the sandbox x402 image gateway alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8402)
    sandbox.set_defaults(handler=_sandbox)

    spend = commands.add_parser("spend", help="the ledger report")
    output = spend.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object, amounts as strings")
    output.add_argument("--csv", action="store_true", help="one line per settled payment")
    spend.add_argument("--since", metavar="YYYY-MM-DD", type=_day, help="only from this UTC day on")
    spend.add_argument("--user", metavar="platform:id", type=_principal, help="only this user")
    spend.set_defaults(handler=_spend)

    payments = commands.add_parser("payments", help="every payment, newest first")
    payments.add_argument("--status", choices=[status.value for status in Status])
    payments.add_argument(
        "--resolve",
        action="store_true",
        help="first settle or fail unknown payments from the chain",
    )
    payments.add_argument("--json", action="store_true", help="one JSON object, amounts as strings")
    payments.set_defaults(handler=_payments)

    changes = commands.add_parser(
        "changes", help="what admins changed from the chat (pause, limits), newest first"
    )
    changes.add_argument("--json", action="store_true", help="one JSON object")
    changes.set_defaults(handler=_changes)

    migrate = commands.add_parser(
        "migrate", help="copy the SQLite ledger into an empty PostgreSQL database"
    )
    migrate.add_argument(
        "--to", metavar="postgresql://…", required=True, type=_postgres_url, help="the target"
    )
    migrate.set_defaults(handler=_migrate)
    return parser


def _run(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings.telegram_bot_token is None and settings.discord_bot_token is None:
        print(
            "imagebot: no chat platform configured. Set TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN "
            "(see .env.example), or try it offline with: imagebot demo",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    """Every configured adapter on one bot (one image service, one ledger) until a signal.

    On SIGTERM or SIGINT the bot drains first (a late command is told it is restarting, paid
    requests in flight finish for up to 60 s, slow jobs are left to the next start), then the
    adapters stop.
    """
    from adapters import discord, telegram

    configure_logging(settings.log_level, secrets_of(settings))
    stop = asyncio.Event()  # a signal, or an adapter that ended
    halt = asyncio.Event()  # the adapters stop once the bot has drained
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with open_bot(settings) as bot, contextlib.AsyncExitStack() as health:
        adapters: list[Awaitable[None]] = []
        finders: dict[str, Callable[[str], Awaitable[Chat]]] = {}
        connected: list[Callable[[], bool]] = [lambda: not stop.is_set()]
        if settings.telegram_bot_token is not None:
            application = telegram.build_application(settings, bot)
            ready = asyncio.Event()
            adapters.append(telegram.serve(application, halt, ready))
            finders["telegram"] = partial(_when_ready, ready, telegram.chat_for, application)
            connected.append(ready.is_set)
        if settings.discord_bot_token is not None:
            client = discord.build_client(settings, bot)
            token = settings.discord_bot_token.get_secret_value()
            adapters.append(discord.serve(client, token, halt))
            finders["discord"] = partial(discord.chat_for, client)
            connected.append(lambda: client.is_ready() and not client.is_closed())
        if settings.metrics_listen is not None:
            healthy = partial(_healthy, bot, connected)
            await health.enter_async_context(
                serving_health(settings.metrics_listen, bot.metrics, healthy)
            )
        running = [asyncio.create_task(_stopping_all(a, stop)) for a in adapters]
        shared = [  # work other runs on the ledger leave to this one
            asyncio.create_task(bot.keep_resuming(partial(_find_chat, finders), finders)),
            asyncio.create_task(bot.watch_cancels()),
            asyncio.create_task(bot.wallet.balance()),  # a low balance is told at start-up
        ]
        await stop.wait()
        for task in shared:
            task.cancel()
        await bot.drain()
        halt.set()
        ended = await asyncio.gather(*running, return_exceptions=True)
    for outcome in ended:
        if isinstance(outcome, BaseException):
            raise outcome
    return 0


async def _healthy(bot: ImageBot, connected: list[Callable[[], bool]]) -> bool:
    """Every adapter connected (and the bot not stopping), and the ledger answering."""
    return all(check() for check in connected) and await bot.ledger_answers()


async def _when_ready(
    ready: asyncio.Event, make: Callable[[Any, str], Chat], platform: Any, address: str
) -> Chat:
    await ready.wait()
    return make(platform, address)


async def _find_chat(
    finders: dict[str, Callable[[str], Awaitable[Chat]]], platform: str, address: str
) -> Chat | None:
    """The chat an owed answer goes to, or None when its platform is not running here."""
    find = finders.get(platform)
    if find is None:
        return None
    try:
        return await find(address)
    except (ValueError, KeyError, TypeError):
        log.error("an owed answer has an unreadable %s address", platform)
        return None


async def _stopping_all(adapter: Awaitable[None], stop: asyncio.Event) -> None:
    """Run one adapter; when it ends (a refused start-up, say) the others shut down cleanly."""
    try:
        await adapter
    finally:
        stop.set()


def _console(args: argparse.Namespace) -> int:
    return asyncio.run(_chat(_settings(), args.once))


def _demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo_async(args.once))


async def _demo_async(once: str | None) -> int:
    from sandbox import Sandbox

    sandbox = Sandbox()
    url = await sandbox.start()
    wallet = Wallet.create()
    print(
        f"demo: sandbox gateway on {url}, throwaway wallet {wallet.address}; nothing real is paid."
    )
    try:
        with tempfile.TemporaryDirectory(prefix="imagebot-demo-") as data_dir:
            settings = load_settings(
                _env_file=None,
                image_api_url=url,
                database_path=Path(data_dir) / "demo.sqlite3",
            )
            return await _chat(settings, once, wallet)
    finally:
        await sandbox.close()


async def _chat(settings: Settings, once: str | None, wallet: Wallet | None = None) -> int:
    from adapters.console import run_console

    # The console is the chat: logs stay out of it unless LOG_LEVEL asks for them.
    level = settings.log_level if "log_level" in settings.model_fields_set else "ERROR"
    configure_logging(level, secrets_of(settings))
    async with open_bot(settings, wallet) as bot:
        return await run_console(bot, OUT_DIR, once)


def _sandbox(args: argparse.Namespace) -> int:
    from sandbox import serve_forever

    configure_logging("INFO")
    try:
        asyncio.run(serve_forever(args.host, args.port))
    except OSError as error:
        raise ConfigError(
            f"--port: cannot listen on {args.host}:{args.port} "
            f"({os.strerror(error.errno) if error.errno else error}); "
            "pick another port with --port"
        ) from None
    return 0


def _ledger_exists(settings: Settings) -> bool:
    """Report commands read a ledger; they never create one."""
    if settings.database_path.is_file():
        return True
    print(f"imagebot: no ledger at {settings.database_path} (DATABASE_PATH)", file=sys.stderr)
    return False


def _spend(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings.database_url is None and not _ledger_exists(settings):
        return 1
    if args.csv:
        asyncio.run(_write_csv(settings, args.since, args.user))
        return 0
    report = asyncio.run(_report(settings, args.since, args.user))
    print(json.dumps(to_json(report)) if args.json else report_table(report))
    return 0


async def _write_csv(settings: Settings, since: date | None, user: str | None) -> None:
    """One line per settled payment, written as the rows are read."""
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(CSV_HEADER)
    async with await open_ledger(settings) as ledger:
        async for charge in ledger.charges(since=since, user=user):
            out.writerow(csv_row(charge))


async def _report(settings: Settings, since: date | None, user: str | None) -> Report:
    async with await open_ledger(settings) as ledger:
        return await ledger.report(since=since, user=user)


def _payments(args: argparse.Namespace) -> int:
    settings = _settings()
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


def _changes(args: argparse.Namespace) -> int:
    settings = _settings()
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
        if resolve:
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


def _migrate(args: argparse.Namespace) -> int:
    from bot.ledger.copying import TargetNotEmpty, TotalsDiffer, copy_ledger

    settings = _settings()
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


def _postgres_url(text: str) -> str:
    if not POSTGRES_URL.match(text.strip()):
        raise argparse.ArgumentTypeError("expected postgresql://user:password@host:port/dbname")
    return text.strip()


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("use a UTC day such as 2026-11-21") from None


def _principal(text: str) -> str:
    try:
        return parse_principal(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _settings() -> Settings:
    return load_settings()


if __name__ == "__main__":
    sys.exit(main())
