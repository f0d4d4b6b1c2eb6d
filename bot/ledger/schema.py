"""The SQLite ledger's tables, triggers and migrations, versioned by ``PRAGMA user_version``.

Triggers keep per-user and per-day totals exact within each row change, so budget checks and the
full report never scan history.
"""

from __future__ import annotations

import aiosqlite

from bot.errors import ConfigError
from bot.ledger.common import DAY_SECONDS


# What one row adds to the totals, as SQL over the row alias ``r``.
def _requests(r: str) -> str:
    return f"({r}.status = 'settled')"


def _images(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN {r}.n ELSE 0 END)"


def _settled(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN {r}.charged_micro ELSE 0 END)"


def _pending(r: str) -> str:
    return f"(CASE WHEN {r}.status IN ('pending', 'unknown') THEN {r}.quoted_micro ELSE 0 END)"


def _counted(r: str) -> str:
    return f"({_settled(r)} + {_pending(r)})"


def report_sums(r: str) -> str:
    """A report line's columns summed over the rows ``r``, as the totals tables count them."""
    return (
        f"sum({_requests(r)}) AS requests, sum({_images(r)}) AS images,"
        f" sum({_settled(r)}) AS micro, sum({_pending(r)}) AS pending_micro"
    )


_V1_ATTEMPTS = (
    """CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        command TEXT NOT NULL,
        model TEXT NOT NULL,
        size TEXT NOT NULL,
        n INTEGER NOT NULL CHECK (n > 0),
        quoted_micro INTEGER NOT NULL CHECK (quoted_micro >= 0),
        charged_micro INTEGER CHECK (charged_micro >= 0),
        status TEXT NOT NULL CHECK (status IN ('pending', 'settled', 'failed', 'unknown')),
        tx_hash TEXT,
        network TEXT,
        payer TEXT,
        nonce TEXT UNIQUE,
        error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        CHECK ((status = 'settled') = (charged_micro IS NOT NULL))
    ) STRICT""",
    "CREATE INDEX attempts_by_user ON attempts (platform, user_id, created_at, status)",
    "CREATE INDEX attempts_by_time ON attempts (created_at)",
    "CREATE INDEX attempts_by_name ON attempts (lower(ltrim(display_name, '@')))",
    "CREATE INDEX attempts_pending_by_run ON attempts (run_id) WHERE status = 'pending'",
)

# Totals per user, per user and day, and per day. A row's platform, user_id and created_at
# never change, so the update trigger moves its contribution within the same summary rows.
_V2_TOTALS = (
    """CREATE TABLE user_totals (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        requests INTEGER NOT NULL,
        images INTEGER NOT NULL,
        settled_micro INTEGER NOT NULL,
        pending_micro INTEGER NOT NULL,
        last_at INTEGER,
        PRIMARY KEY (platform, user_id)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE user_days (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        counted_micro INTEGER NOT NULL,
        settled_micro INTEGER NOT NULL,
        PRIMARY KEY (platform, user_id, day)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE day_totals (
        day INTEGER PRIMARY KEY,
        counted_micro INTEGER NOT NULL
    ) STRICT""",
    f"""INSERT INTO user_totals
        SELECT g.platform, g.user_id, coalesce(named.display_name, ''), g.requests, g.images,
            g.settled_micro, g.pending_micro, g.last_at
        FROM (
            SELECT platform, user_id, sum({_requests("a")}) AS requests,
                sum({_images("a")}) AS images, sum({_settled("a")}) AS settled_micro,
                sum({_pending("a")}) AS pending_micro,
                max(CASE WHEN status != 'failed' THEN created_at END) AS last_at,
                max(CASE WHEN display_name != '' THEN id END) AS name_id
            FROM attempts AS a GROUP BY platform, user_id
        ) AS g
        LEFT JOIN attempts AS named ON named.id = g.name_id""",
    f"""INSERT INTO user_days
        SELECT platform, user_id, created_at / {DAY_SECONDS}, sum({_counted("a")}),
            sum({_settled("a")})
        FROM attempts AS a GROUP BY platform, user_id, created_at / {DAY_SECONDS}""",
    f"""INSERT INTO day_totals
        SELECT created_at / {DAY_SECONDS}, sum({_counted("a")})
        FROM attempts AS a GROUP BY created_at / {DAY_SECONDS}""",
    f"""CREATE TRIGGER attempts_insert AFTER INSERT ON attempts BEGIN
        INSERT INTO user_totals VALUES (
            new.platform, new.user_id, new.display_name, {_requests("new")}, {_images("new")},
            {_settled("new")}, {_pending("new")},
            CASE WHEN new.status != 'failed' THEN new.created_at END
        ) ON CONFLICT (platform, user_id) DO UPDATE SET
            display_name = CASE WHEN excluded.display_name != '' THEN excluded.display_name
                ELSE display_name END,
            requests = requests + excluded.requests,
            images = images + excluded.images,
            settled_micro = settled_micro + excluded.settled_micro,
            pending_micro = pending_micro + excluded.pending_micro,
            last_at = coalesce(max(last_at, excluded.last_at), last_at, excluded.last_at);
        INSERT INTO user_days VALUES (
            new.platform, new.user_id, new.created_at / {DAY_SECONDS}, {_counted("new")},
            {_settled("new")}
        ) ON CONFLICT (platform, user_id, day) DO UPDATE SET
            counted_micro = counted_micro + excluded.counted_micro,
            settled_micro = settled_micro + excluded.settled_micro;
        INSERT INTO day_totals VALUES (new.created_at / {DAY_SECONDS}, {_counted("new")})
            ON CONFLICT (day) DO UPDATE SET counted_micro = counted_micro + excluded.counted_micro;
    END""",
    f"""CREATE TRIGGER attempts_update AFTER UPDATE OF status, quoted_micro, charged_micro
    ON attempts BEGIN
        UPDATE user_totals SET
            requests = requests - {_requests("old")} + {_requests("new")},
            images = images - {_images("old")} + {_images("new")},
            settled_micro = settled_micro - {_settled("old")} + {_settled("new")},
            pending_micro = pending_micro - {_pending("old")} + {_pending("new")},
            last_at = CASE WHEN new.status != 'failed'
                THEN coalesce(max(last_at, new.created_at), new.created_at)
                ELSE (SELECT created_at FROM attempts
                    WHERE platform = new.platform AND user_id = new.user_id AND status != 'failed'
                    ORDER BY created_at DESC LIMIT 1) END
        WHERE platform = new.platform AND user_id = new.user_id;
        UPDATE user_days SET
            counted_micro = counted_micro - {_counted("old")} + {_counted("new")},
            settled_micro = settled_micro - {_settled("old")} + {_settled("new")}
        WHERE platform = new.platform AND user_id = new.user_id
            AND day = new.created_at / {DAY_SECONDS};
        UPDATE day_totals SET counted_micro = counted_micro - {_counted("old")} + {_counted("new")}
        WHERE day = new.created_at / {DAY_SECONDS};
    END""",
)

# What a paid request needs to be finished or judged after the process that made it is gone:
# the signed authorization's expiry (the chain can tell if it was used), the 202 job the gateway
# started (its poll address and the payment header presented, JSON from the image service) and
# where to answer (JSON from the adapter).
_V3_JOBS = (
    "ALTER TABLE attempts ADD COLUMN valid_before INTEGER",
    "ALTER TABLE attempts ADD COLUMN job TEXT",
    "ALTER TABLE attempts ADD COLUMN reply_to TEXT",
    "CREATE INDEX attempts_open_jobs ON attempts (run_id)"
    " WHERE status = 'pending' AND job IS NOT NULL",
    "CREATE INDEX attempts_by_status ON attempts (status, id)",
)

# ``/spend @name`` matches the platform's username only, never a display name anyone can choose.
# Discord rows were always named "@" + the username; a Telegram name may be a full name, so
# older Telegram rows stay without one.
_V4_USERNAMES = (
    "ALTER TABLE attempts ADD COLUMN username TEXT",
    "UPDATE attempts SET username = substr(display_name, 2)"
    " WHERE platform = 'discord' AND display_name LIKE '@_%'",
    "DROP INDEX attempts_by_name",
    "CREATE INDEX attempts_by_username ON attempts (lower(username))",
)

# Chat albums gathered across every run sharing the file, and a user's requests in flight
# counted from an index (``Budget.max_pending``).
_V5_ALBUMS = (
    """CREATE TABLE album_parts (
        id INTEGER PRIMARY KEY,
        album TEXT NOT NULL,
        part TEXT NOT NULL,
        added_at REAL NOT NULL
    ) STRICT""",
    "CREATE INDEX album_parts_by_album ON album_parts (album, added_at)",
    "CREATE INDEX album_parts_by_time ON album_parts (added_at)",
    "CREATE INDEX attempts_pending_by_user ON attempts (platform, user_id)"
    " WHERE status = 'pending'",
)

# Delivered results' requests under unguessable tokens, for their buttons; deleted by age.
_V6_RESULTS = (
    """CREATE TABLE results (
        token TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        command TEXT NOT NULL,
        prompt TEXT NOT NULL,
        model TEXT NOT NULL,
        size TEXT NOT NULL,
        n INTEGER NOT NULL CHECK (n > 0),
        quality TEXT,
        inputs TEXT NOT NULL,
        outputs TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX results_by_time ON results (created_at)",
)

# Cancels asked for requests in flight, read by whichever run holds them.
_V7_CANCELS = (
    """CREATE TABLE cancels (
        row_id INTEGER PRIMARY KEY,
        asked_at INTEGER NOT NULL
    ) STRICT""",
)

# What admins set from the chat (the pause switch, daily limits, each change recorded) and the
# links joining one person's identities on several platforms, with their one-time codes.
_V8_ADMIN = (
    "CREATE TABLE switches (name TEXT PRIMARY KEY, micro INTEGER) STRICT",
    """CREATE TABLE limits (
        person TEXT PRIMARY KEY,
        daily_micro INTEGER NOT NULL CHECK (daily_micro >= 0)
    ) STRICT""",
    """CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        admin TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        micro INTEGER
    ) STRICT""",
    """CREATE TABLE links (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        person TEXT NOT NULL,
        linked_at INTEGER NOT NULL,
        PRIMARY KEY (platform, user_id)
    ) STRICT""",
    "CREATE INDEX links_by_person ON links (person)",
    """CREATE TABLE link_codes (
        code TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE link_tries (
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        at INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX link_tries_by_user ON link_tries (platform, user_id, at)",
)

# Applied in order from the file's PRAGMA user_version; never edit a released step, add one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _V1_ATTEMPTS,
    _V2_TOTALS,
    _V3_JOBS,
    _V4_USERNAMES,
    _V5_ALBUMS,
    _V6_RESULTS,
    _V7_CANCELS,
    _V8_ADMIN,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection) -> None:
    """Apply the missing migration steps in one write transaction (other openers wait)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        ((version,),) = await db.execute_fetchall("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"DATABASE_PATH: the ledger has schema version {version}, newer than this "
                f"imagebot's {SCHEMA_VERSION}; upgrade imagebot."
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                await db.execute(statement)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
