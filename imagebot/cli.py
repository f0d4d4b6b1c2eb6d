"""The ``imagebot`` command line (README, "CLI").

Only the parser lives here, so ``imagebot --help`` starts at once; each command's module (with
the chat libraries, the payer, the ledger drivers it needs) is imported when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from datetime import date

from bot.errors import ConfigError
from bot.principals import parse_principal

EXIT_CONFIG = 2
STATUSES = ("pending", "settled", "failed", "unknown")  # bot.ledger.Status, without its import


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    module, _, name = args.handler.partition(":")
    handler = getattr(importlib.import_module(f"imagebot.{module}"), name)
    try:
        return int(handler(args))
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
    run.set_defaults(handler="running:run")

    for name, handler, text in (
        ("console", "running:console", "chat on the terminal against the configured gateway"),
        ("demo", "running:demo", "offline: the built-in sandbox gateway and a throwaway wallet"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--once", metavar="COMMAND", help='run one command, e.g. "/imagegen a fox"'
        )
        sub.set_defaults(handler=handler)

    sandbox = commands.add_parser("sandbox", help="run the sandbox x402 image gateway alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8402)
    sandbox.set_defaults(handler="running:sandbox")

    spend = commands.add_parser("spend", help="the ledger report")
    output = spend.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object, amounts as strings")
    output.add_argument("--csv", action="store_true", help="one line per settled payment")
    spend.add_argument("--since", metavar="YYYY-MM-DD", type=_day, help="only from this UTC day on")
    spend.add_argument("--user", metavar="platform:id", type=_principal, help="only this user")
    spend.set_defaults(handler="ledger_commands:spend")

    payments = commands.add_parser("payments", help="every payment, newest first")
    payments.add_argument("--status", choices=STATUSES)
    payments.add_argument(
        "--resolve",
        action="store_true",
        help="first settle or fail unknown payments from the chain",
    )
    payments.add_argument("--json", action="store_true", help="one JSON object, amounts as strings")
    payments.set_defaults(handler="ledger_commands:payments")

    changes = commands.add_parser(
        "changes", help="what admins changed from the chat (pause, limits), newest first"
    )
    changes.add_argument("--json", action="store_true", help="one JSON object")
    changes.set_defaults(handler="ledger_commands:changes")

    migrate = commands.add_parser(
        "migrate", help="copy the SQLite ledger into an empty PostgreSQL database"
    )
    migrate.add_argument(
        "--to", metavar="postgresql://…", required=True, type=_postgres_url, help="the target"
    )
    migrate.set_defaults(handler="ledger_commands:migrate")
    return parser


def _postgres_url(text: str) -> str:
    from bot.config import POSTGRES_URL  # only for migrate: pydantic is slow to import

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


if __name__ == "__main__":
    sys.exit(main())
