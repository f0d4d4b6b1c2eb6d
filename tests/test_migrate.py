"""``imagebot migrate --to postgresql://…`` copies a SQLite ledger exactly, or changes nothing."""

from __future__ import annotations

import asyncio
import json
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import aiosqlite
import asyncpg
from imagebot_cli import cli_env, imagebot

from bot.ledger import Attempt, Budget, Linked, PostgresLedger, SqliteLedger, Status

ROOMY = Budget(user_daily_micro=10**9, global_daily_micro=10**9, exempt=False)


def attempt(user_id: str, name: str, platform: str = "telegram") -> Attempt:
    return Attempt(
        platform, user_id, name, "chat", "imagegen", "google/nano-banana", "1024x1024", 2
    )


async def a_ledger_of_every_status(path: Path) -> None:
    """Settled, failed, pending (a slow job), unknown and unsigned rows of three users."""
    async with await SqliteLedger.open(path) as ledger:
        for number, (user, outcome) in enumerate(
            [
                ("1", "settled"),
                ("1", "settled"),
                ("2", "failed"),
                ("2", "unknown"),
                ("3", "job"),
                ("3", "settled"),
                ("1", "unsigned"),
            ]
        ):
            row = await ledger.reserve(attempt(user, f"@user{user}"), 21_000 + number, ROOMY)
            if outcome == "unsigned":
                continue
            await ledger.price(
                row, 21_000 + number, ROOMY, network="eip155:84532", payer="0xP",
                nonce=f"0x{number:064x}", valid_before=2_000_000_000,
            )  # fmt: skip
            if outcome == "settled":
                await ledger.settle(row, 20_000 + number, f"0xtx{number}")
            elif outcome == "failed":
                await ledger.fail(row, "refused")
            elif outcome == "unknown":
                await ledger.mark_unknown(row, "lost")
            else:
                await ledger.start_job(row, '{"poll_url": "/jobs/1"}', '{"chat": 1}')


async def tables_in(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
    finally:
        await connection.close()


async def test_migrate_copies_every_row_and_total_then_refuses_a_second_copy(
    tmp_path: Path, postgres_url: str
) -> None:
    source = tmp_path / "ledger.sqlite3"
    await a_ledger_of_every_status(source)
    env = cli_env("http://127.0.0.1:9", source)

    code, out = await imagebot("migrate", "--to", postgres_url, env=env, cwd=tmp_path)
    assert code == 0, out
    assert "Copied 7 payments of 3 users over 1 days and 0 kept results" in out
    assert "Every total matches: settled 0.060006, pending 0.042010, unknown 0.021003" in out

    on_postgres = {**env, "DATABASE_URL": postgres_url}
    for command in (["spend", "--json"], ["payments", "--json"]):
        _, from_sqlite = await imagebot(*command, env=env, cwd=tmp_path)
        _, from_postgres = await imagebot(*command, env=on_postgres, cwd=tmp_path)
        assert json.loads(from_postgres) == json.loads(from_sqlite)
    _, unknown = await imagebot("payments", "--status", "unknown", env=on_postgres, cwd=tmp_path)
    assert "0.021003" in unknown

    code, _ = await imagebot("migrate", "--to", postgres_url, env=env, cwd=tmp_path)
    assert code == 1  # the target holds a ledger now: refused, unchanged
    connection = await asyncpg.connect(postgres_url)
    try:
        statuses = await connection.fetch("SELECT status, count(*) FROM attempts GROUP BY 1")
        next_row = await connection.fetchval(
            "INSERT INTO attempts (run_id, platform, user_id, display_name, chat_id, command,"
            " model, size, n, quoted_micro, status, created_at, updated_at) VALUES"
            " ('r', 'telegram', '9', '', '', 'imagegen', 'm', 's', 1, 1, 'failed', 0, 0)"
            " RETURNING id"
        )
    finally:
        await connection.close()
    assert dict(statuses) == {
        Status.SETTLED: 3, Status.FAILED: 1, Status.UNKNOWN: 1, Status.PENDING: 2
    }  # fmt: skip
    assert next_row == 8  # ids kept, and new rows follow them


async def test_a_row_edited_behind_the_totals_fails_the_check_and_changes_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    source = tmp_path / "ledger.sqlite3"
    await a_ledger_of_every_status(source)
    async with aiosqlite.connect(source) as db:  # as if edited while the totals were read
        await db.execute("DROP TRIGGER attempts_update")
        await db.execute("UPDATE attempts SET charged_micro = charged_micro + 1 WHERE id = 1")
        await db.commit()

    code, out = await imagebot(
        "migrate", "--to", postgres_url, env=cli_env("http://127.0.0.1:9", source), cwd=tmp_path
    )

    assert code == 1
    assert out == ""
    assert await tables_in(postgres_url) == 0  # not even the schema was left behind


async def test_an_unreachable_database_is_one_line_without_the_password(tmp_path: Path) -> None:
    source = tmp_path / "ledger.sqlite3"
    await a_ledger_of_every_status(source)
    env = cli_env("http://127.0.0.1:9", source)
    for target, exit_code in (
        ("postgresql://bot:hunter2secret@127.0.0.1:9/ledger", 1),
        ("mysql://bot:hunter2secret@127.0.0.1/ledger", 2),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imagebot.cli", "migrate", "--to", target,
            cwd=tmp_path, env=env, stdout=PIPE, stderr=PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == exit_code
        assert out == b""
        lines = err.decode().splitlines()
        if exit_code == 1:
            assert len(lines) == 1
            assert lines[0].startswith("imagebot: cannot migrate into PostgreSQL")
        else:
            assert "argument --to: expected postgresql://" in lines[-1]
        assert b"hunter2secret" not in err


async def a_ledger_with_admin_settings(path: Path) -> str:
    """A pause, a default and a person's own limit, a link and payments of both its identities;
    a link code still unused."""
    async with await SqliteLedger.open(path) as ledger:
        await ledger.set_paused("telegram:9", True)
        await ledger.set_daily_limit("telegram:9", None, 2_000_000)
        code = await ledger.new_link_code("telegram:1")
        assert await ledger.redeem_link_code("discord:5", code) is Linked.LINKED
        await ledger.set_daily_limit("telegram:9", "discord:5", 250_000)
        await ledger.set_daily_limit("telegram:9", "telegram:2", 0)
        for user_id, platform in (("1", "telegram"), ("5", "discord"), ("2", "telegram")):
            row = await ledger.reserve(attempt(user_id, "@ann", platform), 21_000, ROOMY)
            await ledger.settle(row, 20_000, None)
        return await ledger.new_link_code("telegram:2")


async def test_migrate_copies_what_admins_set_and_the_links(
    tmp_path: Path, postgres_url: str
) -> None:
    source = tmp_path / "ledger.sqlite3"
    unused_code = await a_ledger_with_admin_settings(source)

    code, out = await imagebot(
        "migrate", "--to", postgres_url, env=cli_env("http://127.0.0.1:9", source), cwd=tmp_path
    )
    assert code == 0, out

    users = ["telegram:1", "discord:5", "telegram:2", "telegram:3"]
    async with (
        await SqliteLedger.open(source) as sqlite,
        await PostgresLedger.open(postgres_url) as postgres,
    ):
        for user in users:
            assert await postgres.controls(user) == await sqlite.controls(user)
            assert await postgres.user_spend(user, ROOMY) == await sqlite.user_spend(user, ROOMY)
        assert (await postgres.controls("discord:5")).own_daily_micro == 250_000
        assert await postgres.changes() == await sqlite.changes()
        assert await postgres.report() == await sqlite.report()
        assert await postgres.redeem_link_code("discord:6", unused_code) is Linked.WRONG
        await postgres.set_paused("discord:5", False)  # recorded after the copied changes
        assert [change.action for change in await postgres.changes(limit=2)] == [
            "resume", "budget"
        ]  # fmt: skip
