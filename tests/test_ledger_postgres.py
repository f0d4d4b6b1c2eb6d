"""The PostgreSQL ledger alone: its schema versions, leases instead of lock files, races among
processes, links raced by replicas, the journal while the server is away, and kept results and
admin settings copied by ``imagebot migrate``. Every test takes ``postgres_url``."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from local import until
from test_ledger import NOW, PRICE, ROOMY, THREE_FIT, Clock, attempt, kept, price, split

from bot.config import load_settings
from bot.errors import ConfigError
from bot.ledger import (
    Budget,
    BudgetExceeded,
    Linked,
    PostgresLedger,
    SqliteLedger,
    Status,
    open_ledger,
)
from bot.ledger.common import LINK_TRIES
from bot.ledger.copying import TotalsDiffer, copy_ledger
from bot.ledger.journal import SettlementJournal
from bot.ledger.postgres_schema import MIGRATIONS, SCHEMA_VERSION

PASSWORD = "s3cret-Pa55"


async def query(url: str, sql: str, *args: Any) -> Any:
    """One value, read past the ledger."""
    db = await asyncpg.connect(url)
    try:
        return await db.fetchval(sql, *args)
    finally:
        await db.close()


def with_password(url: str) -> str:
    """The URL with a password the server (trust auth) ignores, to be sure it never shows."""
    return url.replace("://imagebot@", f"://imagebot:{PASSWORD}@")


# Opening: open_ledger, the schema version


async def test_open_ledger_picks_postgresql_when_database_url_is_set(
    postgres_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    settings = load_settings(_env_file=None, database_url=postgres_url, database_path=path)
    async with await open_ledger(settings) as ledger:
        assert isinstance(ledger, PostgresLedger)
    assert not path.exists()
    async with await open_ledger(load_settings(_env_file=None, database_path=path)) as ledger:
        assert isinstance(ledger, SqliteLedger)


async def test_processes_opening_at_once_migrate_once(postgres_url: str) -> None:
    ledgers = await asyncio.gather(*(PostgresLedger.open(postgres_url) for _ in range(4)))
    assert await query(postgres_url, "SELECT count(*) FROM runs") == 4
    for ledger in ledgers:
        await ledger.close()
    assert await query(postgres_url, "SELECT count(*) FROM runs") == 0  # closed: leases ended
    assert await query(postgres_url, "SELECT array_agg(version) FROM schema_version") == [
        SCHEMA_VERSION
    ]


async def test_a_database_from_a_newer_imagebot_is_refused(postgres_url: str) -> None:
    async with await PostgresLedger.open(postgres_url):
        pass
    await query(postgres_url, "UPDATE schema_version SET version = $1", SCHEMA_VERSION + 1)
    settings = load_settings(_env_file=None, database_url=with_password(postgres_url))
    with pytest.raises(ConfigError, match="DATABASE_URL: the ledger has schema version") as error:
        await open_ledger(settings)
    assert PASSWORD not in str(error.value)


async def test_a_v1_database_gains_kept_results_in_place(postgres_url: str) -> None:
    db = await asyncpg.connect(postgres_url)
    try:
        async with db.transaction():  # as a v1 imagebot left it, with a settled payment
            await db.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            await db.execute("INSERT INTO schema_version VALUES (1)")
            for statement in MIGRATIONS[0]:
                await db.execute(statement)
            await db.execute(
                "INSERT INTO attempts (run_id, platform, user_id, display_name, chat_id, command,"
                " model, size, n, quoted_micro, charged_micro, status, created_at, updated_at)"
                " VALUES ('gone', 'telegram', '1', '@ann', 'c', 'imagegen', 'm', '1024x1024', 1,"
                " 21000, 20000, 'settled', $1, $1)",
                int(NOW.timestamp()),
            )
    finally:
        await db.close()
    async with await PostgresLedger.open(postgres_url, clock=Clock(NOW)) as ledger:
        assert [(p.user, p.charged_micro) for p in await ledger.payments()] == [
            ("telegram:1", 20_000)
        ]
        assert (await ledger.report()).total_micro == 20_000
        token = await ledger.keep_result(kept())
        assert await ledger.kept_result(token) == kept()
    assert await query(postgres_url, "SELECT array_agg(version) FROM schema_version") == [
        SCHEMA_VERSION
    ]


async def test_a_v3_database_gains_links_and_budgets_of_the_person_in_place(
    postgres_url: str,
) -> None:
    db = await asyncpg.connect(postgres_url)
    try:
        async with db.transaction():  # as a v3 imagebot left it, with a reservation running
            await db.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            await db.execute("INSERT INTO schema_version VALUES (3)")
            for step in MIGRATIONS[:3]:
                for statement in step:
                    await db.execute(statement)
            budget = Budget(THREE_FIT, 10**9, exempt=False)
            await db.execute(
                "SELECT reserve_attempt('gone', 'discord', '5', 'Ann', NULL, 'c', 'imagegen',"
                " 'm', '1024x1024', 1, $1, $2, false, $3, $4, NULL)",
                PRICE,
                int(NOW.timestamp()),
                budget.user_daily_micro,
                budget.global_daily_micro,
            )
    finally:
        await db.close()
    async with await PostgresLedger.open(postgres_url, clock=Clock(NOW)) as ledger:
        code = await ledger.new_link_code("telegram:111")
        assert await ledger.redeem_link_code("discord:5", code) is Linked.LINKED
        capped = Budget(THREE_FIT, 10**9, exempt=False, max_pending=3)
        first = await ledger.reserve(attempt("111"), PRICE, capped)
        with pytest.raises(BudgetExceeded) as refused:  # a higher quote: the person's third
            await price(ledger, first, THREE_FIT - PRICE + 1, capped, 1)
        assert refused.value.scope == "user"
        await ledger.reserve(attempt("111"), PRICE, capped)
        with pytest.raises(BudgetExceeded) as refused:
            await ledger.reserve(attempt("111"), PRICE, capped)
        assert refused.value.scope == "pending"
        spend = await ledger.user_spend("telegram:111", capped)
        assert (spend.unknown_micro, spend.left_today_micro) == (3 * PRICE, THREE_FIT - 3 * PRICE)
        await ledger.set_paused("telegram:999", True)
        assert (await ledger.controls("discord:5")).paused
    assert await query(postgres_url, "SELECT array_agg(version) FROM schema_version") == [
        SCHEMA_VERSION
    ]


@pytest.mark.parametrize(
    "where", ["127.0.0.1:1/imagebot", "127.0.0.1:55432/no_such_database"], ids=["port", "db"]
)
async def test_a_ledger_that_cannot_be_reached_is_a_config_error_without_the_password(
    where: str,
) -> None:
    url = f"postgresql://imagebot:{PASSWORD}@{where}"
    with pytest.raises(ConfigError, match="DATABASE_URL: cannot open") as error:
        await open_ledger(load_settings(_env_file=None, database_url=url))
    assert PASSWORD not in str(error.value)
    assert error.value.__suppress_context__


# Leases: a run is alive while it renews its lease


def _pay_and_hang(url: str, ready: Any) -> None:
    async def run() -> None:
        ledger = await PostgresLedger.open(url, lease_seconds=2.0)
        signed = await ledger.reserve(attempt("dead"), PRICE, ROOMY)
        await price(ledger, signed, PRICE, ROOMY, 1)
        slow = await ledger.reserve(attempt("dead"), PRICE, ROOMY)
        await price(ledger, slow, PRICE, ROOMY, 2)
        await ledger.start_job(slow, '{"poll_url": "/jobs/2"}', '{"chat": 2}')
        ready.put((signed, slow))
        await asyncio.sleep(600)

    asyncio.run(run())


async def test_a_killed_runs_rows_are_left_alone_until_its_lease_expires(postgres_url: str):
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    doomed = context.Process(target=_pay_and_hang, args=(postgres_url, ready))
    async with (
        await PostgresLedger.open(postgres_url, lease_seconds=1.0) as first,
        await PostgresLedger.open(postgres_url, lease_seconds=1.0) as second,
    ):
        doomed.start()
        signed, slow = await asyncio.to_thread(ready.get, timeout=60)
        doomed.kill()
        await asyncio.to_thread(doomed.join, 10)

        assert await first.recover() == (0, 0)  # its lease runs on for up to 2 s
        assert await first.claim_jobs(["telegram"]) == []
        assert (await first.payment(signed)).status == Status.PENDING

        await asyncio.sleep(2.1)  # the killed run's lease is over; the live ones were renewed
        assert await first.recover() == (1, 0)
        assert (await first.payment(signed)).status == Status.UNKNOWN
        assert (await first.payment(slow)).status == Status.PENDING  # a job, for claim_jobs
        assert await query(postgres_url, "SELECT count(*) FROM runs") == 2
        claims = await asyncio.gather(
            first.claim_jobs(["telegram"]), second.claim_jobs(["telegram"])
        )
        assert sorted([job.row_id for job in jobs] for jobs in claims) == [[], [slow]]
        assert await second.recover() == (0, 0)
        assert await second.claim_jobs(["telegram"]) == []


async def test_a_run_whose_lease_lapsed_takes_it_again_and_says_so(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with await PostgresLedger.open(postgres_url, lease_seconds=0.3):
        await query(postgres_url, "DELETE FROM runs")  # as another run's recover() would

        async def leased() -> bool:
            return await query(postgres_url, "SELECT count(*) FROM runs") == 1

        await until(leased, 5)
    assert "lease had lapsed" in caplog.text


# Races among processes: budgets and requests in flight across 3 processes x 40 reserves

RACES = {
    "global cap": (Budget(10**9, THREE_FIT, exempt=False), False, "global"),
    "user cap": (Budget(THREE_FIT, 10**9, exempt=False), True, "user"),
    "requests in flight": (Budget(10**9, 10**9, exempt=False, max_pending=3), True, "pending"),
}


def _race(url: str, budget: Budget, one_user: bool, start: Any, results: Any) -> None:
    async def run() -> list[Any]:
        async with await PostgresLedger.open(url) as ledger:
            await asyncio.to_thread(start.wait)
            return await asyncio.gather(
                *(
                    ledger.reserve(
                        attempt("111" if one_user else f"{os.getpid()}-{i}"), PRICE, budget
                    )
                    for i in range(40)
                ),
                return_exceptions=True,
            )

    results.put([_outcome(result) for result in asyncio.run(run())])


def _outcome(result: Any) -> str:
    """A reserve's result in short: "reserved", the refusal's scope, or the unexpected error."""
    if isinstance(result, int):
        return "reserved"
    return result.scope if isinstance(result, BudgetExceeded) else repr(result)


@pytest.mark.parametrize("race", sorted(RACES))
async def test_three_processes_racing_cannot_pass_a_cap(postgres_url: str, race: str) -> None:
    budget, one_user, scope = RACES[race]
    async with await PostgresLedger.open(postgres_url):  # the schema, before the race
        pass
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(3), context.Queue()
    workers = [
        context.Process(target=_race, args=(postgres_url, budget, one_user, start, results))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    outcomes = [o for _ in workers for o in await asyncio.to_thread(results.get, timeout=60)]
    for worker in workers:
        await asyncio.to_thread(worker.join, 10)
    assert set(outcomes) == {"reserved", scope}
    assert outcomes.count("reserved") == 3
    assert await query(postgres_url, "SELECT count(*) FROM attempts") == 3


# Links raced by two runs: a code is used once, wrong codes stop at the limit, a person gets one
# identity per platform, and a person's requests in flight are counted together


async def test_two_runs_redeeming_one_code_at_once_link_exactly_one_identity(
    postgres_url: str,
) -> None:
    async with (
        await PostgresLedger.open(postgres_url) as one,
        await PostgresLedger.open(postgres_url) as two,
    ):
        for maker in range(20):
            code = await one.new_link_code(f"telegram:{maker}")
            outcomes = await asyncio.gather(
                one.redeem_link_code(f"discord:{maker}-a", code),
                two.redeem_link_code(f"discord:{maker}-b", code),
            )
            assert sorted(outcomes) == [Linked.LINKED, Linked.WRONG]
        linked = await query(postgres_url, "SELECT count(*) FROM links WHERE platform = 'discord'")
        assert linked == 20
        assert await query(postgres_url, "SELECT count(*) FROM link_codes") == 0


async def test_wrong_codes_tried_at_once_from_two_runs_stop_at_the_limit(
    postgres_url: str,
) -> None:
    async with (
        await PostgresLedger.open(postgres_url) as one,
        await PostgresLedger.open(postgres_url) as two,
    ):
        code = await one.new_link_code("telegram:111")
        outcomes = await asyncio.gather(
            *(run.redeem_link_code("discord:5", "WRONGONE") for run in [one, two] * LINK_TRIES)
        )
        assert sorted(outcomes) == sorted([Linked.WRONG, Linked.TOO_MANY] * LINK_TRIES)
        assert await two.redeem_link_code("discord:5", code) is Linked.TOO_MANY
        assert await two.redeem_link_code("discord:6", code) is Linked.LINKED


async def test_two_identities_on_one_platform_redeeming_at_once_join_one(
    postgres_url: str,
) -> None:
    async with (
        await PostgresLedger.open(postgres_url) as one,
        await PostgresLedger.open(postgres_url) as two,
    ):
        for maker in range(10):
            first = await one.new_link_code(f"telegram:{maker}")
            second = await one.new_link_code(f"telegram:{maker}")
            outcomes = await asyncio.gather(
                one.redeem_link_code(f"discord:{maker}-a", first),
                two.redeem_link_code(f"discord:{maker}-b", second),
            )
            assert sorted(outcomes) == [Linked.ALREADY, Linked.LINKED]
        per_person = await query(
            postgres_url,
            "SELECT array_agg(DISTINCT n) FROM (SELECT count(*) AS n FROM links"
            " GROUP BY person, platform) AS counts",
        )
        assert per_person == [1]


async def test_a_persons_identities_racing_from_two_runs_keep_max_pending(
    postgres_url: str,
) -> None:
    capped = Budget(10**9, 10**9, exempt=False, max_pending=3)
    async with (
        await PostgresLedger.open(postgres_url) as one,
        await PostgresLedger.open(postgres_url) as two,
    ):
        code = await one.new_link_code("telegram:111")
        assert await two.redeem_link_code("discord:5", code) is Linked.LINKED
        outcomes = await asyncio.gather(
            *(
                run.reserve(attempt(user_id, platform=platform), PRICE, capped)
                for run, (user_id, platform) in zip(
                    [one, two] * 20, [("111", "telegram"), ("5", "discord")] * 20, strict=True
                )
            ),
            return_exceptions=True,
        )
    rows, refusals = split(outcomes)
    assert len(rows) == 3
    assert {refusal.scope for refusal in refusals} == {"pending"}


# The hot row and the journal


async def test_a_settle_at_the_quote_leaves_the_days_row_alone(postgres_url: str) -> None:
    async with await PostgresLedger.open(postgres_url) as ledger:
        row = await ledger.reserve(attempt(), PRICE, ROOMY)
        day_row = "SELECT xmin::text FROM day_totals"
        before = await query(postgres_url, day_row)
        await ledger.settle(row, PRICE, "0xtx")
        assert await query(postgres_url, day_row) == before
        row = await ledger.reserve(attempt(), PRICE, ROOMY)
        before = await query(postgres_url, day_row)
        await ledger.settle(row, PRICE - 1, "0xtx2")  # cheaper than quoted: the day counts less
        assert await query(postgres_url, day_row) != before


async def test_the_journal_keeps_a_settlement_while_the_server_refuses_the_ledger(
    postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, _, name = postgres_url.rpartition("/")
    path = SettlementJournal.beside(tmp_path / "data" / "imagebot.sqlite3")
    async with await PostgresLedger.open(postgres_url, lease_seconds=0.6) as ledger:
        row = await ledger.reserve(attempt(), PRICE, ROOMY)
        journal = SettlementJournal(ledger, path, retry_seconds=0.1)
        admin = await asyncpg.connect(f"{server}/postgres")
        try:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            assert await journal.settle(row, PRICE, "0xtx") is False
            assert path.is_file()  # its folder made, though the ledger is not a file there
            await asyncio.sleep(0.5)  # the lease cannot be renewed meanwhile
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        finally:
            await admin.close()

        async def written() -> bool:
            return journal.owed == 0

        await until(written, 10)
        assert (await ledger.payment(row)).status == Status.SETTLED
        assert not path.exists()
        await journal.close()
    assert "could not renew this run's ledger lease" in caplog.text
    assert "the ledger refused settlement of row" in caplog.text
    assert server not in caplog.text


# imagebot migrate: the kept results and admin settings go along, compared on both sides


async def a_ledger_keeping(path: Path, *prompts: str) -> list[str]:
    """A SQLite ledger at ``path`` with results kept at NOW; their tokens."""
    async with await SqliteLedger.open(path, clock=Clock(NOW)) as ledger:
        return [await ledger.keep_result(kept(prompt)) for prompt in prompts]


async def test_migrate_copies_the_kept_results(postgres_url: str, tmp_path: Path) -> None:
    tokens = await a_ledger_keeping(tmp_path / "ledger.sqlite3", "one", "two", "three")
    copied = await copy_ledger(tmp_path / "ledger.sqlite3", postgres_url)
    assert (copied.payments, copied.results) == (0, 3)
    async with await PostgresLedger.open(postgres_url, clock=Clock(NOW)) as ledger:
        for token, prompt in zip(tokens, ["one", "two", "three"], strict=True):
            assert await ledger.kept_result(token) == kept(prompt)


async def test_kept_results_that_differ_fail_the_check_and_change_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    async with await PostgresLedger.open(postgres_url) as target:
        already = await target.keep_result(kept("already there"))
    await a_ledger_keeping(tmp_path / "ledger.sqlite3", "one")
    with pytest.raises(TotalsDiffer) as error:
        await copy_ledger(tmp_path / "ledger.sqlite3", postgres_url)
    assert error.value.differing == ["kept results"]
    assert await query(postgres_url, "SELECT array_agg(token) FROM results") == [already]


async def test_admin_settings_already_in_the_target_fail_the_check_and_change_nothing(
    postgres_url: str, tmp_path: Path
) -> None:
    async with await PostgresLedger.open(postgres_url, clock=Clock(NOW)) as target:
        await target.set_paused("telegram:9", True)
    async with await SqliteLedger.open(tmp_path / "ledger.sqlite3", clock=Clock(NOW)) as source:
        await source.set_paused("discord:5", False)
        code = await source.new_link_code("telegram:1")
        assert await source.redeem_link_code("discord:5", code) is Linked.LINKED
    with pytest.raises(TotalsDiffer) as error:
        await copy_ledger(tmp_path / "ledger.sqlite3", postgres_url)
    assert error.value.differing == ["switches", "changes"]
    assert await query(postgres_url, "SELECT array_agg(admin) FROM changes") == ["telegram:9"]
    assert await query(postgres_url, "SELECT count(*) FROM links") == 0
