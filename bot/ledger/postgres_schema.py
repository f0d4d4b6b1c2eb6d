"""The PostgreSQL ledger's tables, functions, triggers and migrations, versioned in
``schema_version``.

As in SQLite (``schema``), triggers keep per-user and per-day totals exact within each row change,
so budget checks and the full report never scan history. They leave a totals row alone when its
figures do not change: a settle at the quoted amount never touches the day's row, which every
reservation of the day locks. ``reserve_attempt`` and ``price_attempt`` check a budget and write
in one call under that lock. Money is ``bigint`` micro-USDC; times are ``bigint`` unix seconds.
"""

from __future__ import annotations

import asyncpg

from bot.errors import ConfigError
from bot.ledger.common import DAY_SECONDS, PAUSED

# pg_advisory_xact_lock(space, key) spaces, so the locks of this schema never meet another's.
LOCK_MIGRATIONS = 402_001  # key 0: one process migrates at a time
LOCK_USER = 402_002  # key hashtext(person): one reservation of a person at a time
LOCK_ALBUM = 402_003  # key hashtext(album): one part added to an album at a time
LOCK_LINKS = 402_004  # key 0: one /link redemption or unlink at a time, in every run
# A person is the name of the link joining identities, else the identity's 'platform:id'.


# What one row adds to the totals, as SQL over the row variable ``r`` (``new`` or ``old``).
def _requests(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN 1 ELSE 0 END)"


def _images(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN {r}.n ELSE 0 END)"


def _settled(r: str) -> str:
    return f"(CASE WHEN {r}.status = 'settled' THEN {r}.charged_micro ELSE 0 END)"


def _pending(r: str) -> str:
    return f"(CASE WHEN {r}.status IN ('pending', 'unknown') THEN {r}.quoted_micro ELSE 0 END)"


def report_sums(r: str) -> str:
    """A report line's columns summed over the rows ``r``, as the totals tables count them."""
    return (
        f"sum({_requests(r)})::bigint AS requests, sum({_images(r)})::bigint AS images,"
        f" sum({_settled(r)})::bigint AS micro, sum({_pending(r)})::bigint AS pending_micro"
    )


def members(platform: str, user_id: str) -> str:
    """The identities that are one person with the user of the SQL values ``platform`` and
    ``user_id``: the user, and every identity linked to it; (platform, user_id) rows.

    The v4 step's functions are built from it: change it only with a new step that replaces them.
    """
    return f"""SELECT {platform}, {user_id} UNION SELECT m.platform, m.user_id
        FROM links AS l JOIN links AS m ON m.person = l.person
        WHERE l.platform = {platform} AND l.user_id = {user_id}"""


# The totals tables made again from the rows, for rows written with the triggers off (the copy
# ``imagebot migrate`` makes).
REBUILD_TOTALS = (
    f"""INSERT INTO user_totals
        SELECT g.platform, g.user_id, coalesce(named.display_name, ''), g.requests, g.images,
            g.micro, g.pending_micro, g.last_at
        FROM (
            SELECT platform, user_id, {report_sums("a")},
                max(created_at) FILTER (WHERE status <> 'failed') AS last_at,
                max(id) FILTER (WHERE display_name <> '') AS name_id
            FROM attempts AS a GROUP BY platform, user_id
        ) AS g LEFT JOIN attempts AS named ON named.id = g.name_id""",
    f"""INSERT INTO user_days
        SELECT platform, user_id, created_at / {DAY_SECONDS},
            sum({_settled("a")} + {_pending("a")}), sum({_settled("a")})
        FROM attempts AS a GROUP BY platform, user_id, created_at / {DAY_SECONDS}""",
    f"""INSERT INTO day_totals
        SELECT created_at / {DAY_SECONDS}, sum({_settled("a")} + {_pending("a")})
        FROM attempts AS a GROUP BY created_at / {DAY_SECONDS}""",
)


# asyncpg silently truncates a float sent as a bigint; sent as ``whole``, a fraction is refused
# by the database (a check violation) as SQLite's STRICT tables refuse it.
_WHOLE = "CREATE DOMAIN whole AS numeric CHECK (VALUE = trunc(VALUE))"

_TABLES = (
    """CREATE TABLE attempts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id text NOT NULL,
        platform text NOT NULL,
        user_id text NOT NULL,
        display_name text NOT NULL,
        chat_id text NOT NULL,
        command text NOT NULL,
        model text NOT NULL,
        size text NOT NULL,
        n integer NOT NULL CHECK (n > 0),
        quoted_micro bigint NOT NULL CHECK (quoted_micro >= 0),
        charged_micro bigint CHECK (charged_micro >= 0),
        status text NOT NULL CHECK (status IN ('pending', 'settled', 'failed', 'unknown')),
        tx_hash text,
        network text,
        payer text,
        nonce text UNIQUE,
        error text,
        created_at bigint NOT NULL,
        updated_at bigint NOT NULL,
        valid_before bigint,
        job text,
        reply_to text,
        username text,
        CHECK ((status = 'settled') = (charged_micro IS NOT NULL))
    )""",
    "CREATE INDEX attempts_by_user ON attempts (platform, user_id, created_at)",
    "CREATE INDEX attempts_by_time ON attempts (created_at)",
    "CREATE INDEX attempts_by_status ON attempts (status, id)",
    'CREATE INDEX attempts_by_username ON attempts (lower(username COLLATE "C"))',
    "CREATE INDEX attempts_pending_by_run ON attempts (run_id) WHERE status = 'pending'",
    "CREATE INDEX attempts_pending_by_user ON attempts (platform, user_id)"
    " WHERE status = 'pending'",
    """CREATE TABLE user_totals (
        platform text NOT NULL,
        user_id text NOT NULL,
        display_name text NOT NULL,
        requests bigint NOT NULL,
        images bigint NOT NULL,
        settled_micro bigint NOT NULL,
        pending_micro bigint NOT NULL,
        last_at bigint,
        PRIMARY KEY (platform, user_id)
    )""",
    """CREATE TABLE user_days (
        platform text NOT NULL,
        user_id text NOT NULL,
        day bigint NOT NULL,
        counted_micro bigint NOT NULL,
        settled_micro bigint NOT NULL,
        PRIMARY KEY (platform, user_id, day)
    )""",
    """CREATE TABLE day_totals (
        day bigint PRIMARY KEY,
        counted_micro bigint NOT NULL
    )""",
    # A run is alive while its row is here and unexpired by the database's clock.
    """CREATE TABLE runs (
        run_id text PRIMARY KEY,
        expires_at timestamptz NOT NULL
    )""",
    """CREATE TABLE album_parts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        album text NOT NULL,
        part text NOT NULL,
        added_at double precision NOT NULL
    )""",
    "CREATE INDEX album_parts_by_album ON album_parts (album, added_at)",
    "CREATE INDEX album_parts_by_time ON album_parts (added_at)",
)

# Totals rows are locked in one order everywhere (day, user's day, user), so writers never
# deadlock; a reservation holds the day's row from its check to its commit.
_TRIGGERS = (
    f"""CREATE FUNCTION attempts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        new_settled bigint := {_settled("new")};
        new_counted bigint := {_settled("new")} + {_pending("new")};
    BEGIN
        INSERT INTO day_totals AS t VALUES (new.created_at / {DAY_SECONDS}, new_counted)
            ON CONFLICT (day) DO UPDATE SET counted_micro = t.counted_micro + new_counted;
        INSERT INTO user_days AS t VALUES (
            new.platform, new.user_id, new.created_at / {DAY_SECONDS}, new_counted, new_settled
        ) ON CONFLICT (platform, user_id, day) DO UPDATE SET
            counted_micro = t.counted_micro + new_counted,
            settled_micro = t.settled_micro + new_settled;
        INSERT INTO user_totals AS t VALUES (
            new.platform, new.user_id, new.display_name, {_requests("new")}, {_images("new")},
            new_settled, {_pending("new")},
            CASE WHEN new.status <> 'failed' THEN new.created_at END
        ) ON CONFLICT (platform, user_id) DO UPDATE SET
            display_name = CASE WHEN excluded.display_name <> '' THEN excluded.display_name
                ELSE t.display_name END,
            requests = t.requests + excluded.requests,
            images = t.images + excluded.images,
            settled_micro = t.settled_micro + excluded.settled_micro,
            pending_micro = t.pending_micro + excluded.pending_micro,
            last_at = greatest(t.last_at, excluded.last_at);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER attempts_insert AFTER INSERT ON attempts
        FOR EACH ROW EXECUTE FUNCTION attempts_inserted()""",
    f"""CREATE FUNCTION attempts_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        d_requests bigint := {_requests("new")} - {_requests("old")};
        d_images bigint := {_images("new")} - {_images("old")};
        d_settled bigint := {_settled("new")} - {_settled("old")};
        d_pending bigint := {_pending("new")} - {_pending("old")};
    BEGIN
        IF d_settled + d_pending <> 0 THEN
            UPDATE day_totals SET counted_micro = counted_micro + d_settled + d_pending
            WHERE day = new.created_at / {DAY_SECONDS};
        END IF;
        IF d_settled <> 0 OR d_pending <> 0 THEN
            UPDATE user_days SET
                counted_micro = counted_micro + d_settled + d_pending,
                settled_micro = settled_micro + d_settled
            WHERE platform = new.platform AND user_id = new.user_id
                AND day = new.created_at / {DAY_SECONDS};
        END IF;
        IF d_requests <> 0 OR d_images <> 0 OR d_settled <> 0 OR d_pending <> 0
            OR (old.status = 'failed') <> (new.status = 'failed') THEN
            UPDATE user_totals SET
                requests = requests + d_requests,
                images = images + d_images,
                settled_micro = settled_micro + d_settled,
                pending_micro = pending_micro + d_pending,
                last_at = CASE WHEN new.status <> 'failed'
                    THEN greatest(last_at, new.created_at)
                    ELSE (SELECT a.created_at FROM attempts AS a
                        WHERE a.platform = new.platform AND a.user_id = new.user_id
                            AND a.status <> 'failed'
                        ORDER BY a.created_at DESC LIMIT 1) END
            WHERE platform = new.platform AND user_id = new.user_id;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER attempts_update AFTER UPDATE OF status, quoted_micro, charged_micro
        ON attempts FOR EACH ROW
        WHEN (old.status <> new.status OR old.quoted_micro <> new.quoted_micro
            OR old.charged_micro IS DISTINCT FROM new.charged_micro)
        EXECUTE FUNCTION attempts_updated()""",
)

# Each function is one transaction, and each statement in it reads what was committed before it
# ran (READ COMMITTED), so the reads after the lock see every reservation made before it.
#
# A reservation commits without waiting for the disk (synchronous_commit off, this transaction
# only), so the day's row is not held locked through a flush. Nothing is lost by it: the
# reservation reaches the disk with the next durable commit, and ``price_attempt``, which commits
# durably before any payment is signed, comes after it. A database crash can lose only
# reservations whose payment was never signed.
_FUNCTIONS = (
    f"""CREATE FUNCTION reserve_attempt(
        p_run_id text, p_platform text, p_user_id text, p_display_name text, p_username text,
        p_chat_id text, p_command text, p_model text, p_size text, p_n whole, p_amount whole,
        p_now bigint, p_exempt boolean, p_user_cap bigint, p_global_cap bigint,
        p_max_pending bigint,
        OUT row_id bigint, OUT user_counted bigint, OUT user_pending bigint
    ) LANGUAGE plpgsql AS $$
    DECLARE
        today bigint := p_now / {DAY_SECONDS};
        global_counted bigint;
    BEGIN
        PERFORM set_config('synchronous_commit', 'off', true);
        SELECT counted_micro INTO global_counted FROM day_totals WHERE day = today FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO day_totals VALUES (today, 0) ON CONFLICT DO NOTHING;
            SELECT counted_micro INTO global_counted FROM day_totals WHERE day = today
                FOR UPDATE;
        END IF;
        user_pending := 0;
        IF p_max_pending IS NOT NULL THEN
            -- Pending rows of every day count: a reservation dated another day takes this too.
            PERFORM pg_advisory_xact_lock({LOCK_USER}, hashtext(p_platform || ':' || p_user_id));
            SELECT count(*) INTO user_pending FROM attempts
            WHERE platform = p_platform AND user_id = p_user_id AND status = 'pending';
        END IF;
        user_counted := coalesce((SELECT counted_micro FROM user_days
            WHERE platform = p_platform AND user_id = p_user_id AND day = today), 0);
        IF (p_max_pending IS NOT NULL AND user_pending >= p_max_pending)
            OR (NOT p_exempt AND user_counted + p_amount > p_user_cap)
            OR global_counted + p_amount > p_global_cap THEN
            RETURN;
        END IF;
        INSERT INTO attempts (run_id, platform, user_id, display_name, username, chat_id,
            command, model, size, n, quoted_micro, status, created_at, updated_at)
        VALUES (p_run_id, p_platform, p_user_id, p_display_name, p_username, p_chat_id,
            p_command, p_model, p_size, p_n, p_amount, 'pending', p_now, p_now)
        RETURNING id INTO row_id;
    END $$""",
    # A price at or under the reservation only shrinks the spend, so only a higher one is
    # re-checked, against what the other rows of its day count.
    f"""CREATE FUNCTION price_attempt(
        p_id bigint, p_amount whole, p_network text, p_payer text, p_nonce text,
        p_valid_before whole, p_reply_to text, p_now bigint, p_exempt boolean,
        p_user_cap bigint, p_global_cap bigint,
        OUT outcome text, OUT user_counted bigint
    ) LANGUAGE plpgsql AS $$
    DECLARE
        a attempts;
        global_counted bigint;
    BEGIN
        SELECT * INTO a FROM attempts WHERE id = p_id AND status = 'pending' AND nonce IS NULL;
        IF FOUND AND p_amount > a.quoted_micro THEN
            SELECT counted_micro - a.quoted_micro INTO global_counted FROM day_totals
            WHERE day = a.created_at / {DAY_SECONDS} FOR UPDATE;
            SELECT counted_micro - a.quoted_micro INTO user_counted FROM user_days
            WHERE platform = a.platform AND user_id = a.user_id
                AND day = a.created_at / {DAY_SECONDS};
            IF (NOT p_exempt AND user_counted + p_amount > p_user_cap)
                OR global_counted + p_amount > p_global_cap THEN
                outcome := 'refused';
                RETURN;
            END IF;
        END IF;
        UPDATE attempts SET quoted_micro = p_amount, network = p_network, payer = p_payer,
            nonce = p_nonce, valid_before = p_valid_before, reply_to = p_reply_to,
            updated_at = p_now
        WHERE id = p_id AND status = 'pending' AND nonce IS NULL;
        outcome := CASE WHEN FOUND THEN 'priced' ELSE 'not pending' END;
    END $$""",
    f"""CREATE FUNCTION add_album_part(
        p_album text, p_part text, p_now double precision, p_keep_seconds double precision,
        p_max_parts bigint
    ) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({LOCK_ALBUM}, hashtext(p_album));
        DELETE FROM album_parts WHERE added_at < p_now - p_keep_seconds;
        INSERT INTO album_parts (album, part, added_at)
        SELECT p_album, p_part, p_now
        WHERE (SELECT count(*) FROM album_parts WHERE album = p_album) < p_max_parts;
    END $$""",
)

_V1 = (_WHOLE, *_TABLES, *_TRIGGERS, *_FUNCTIONS)

# Delivered results' requests under unguessable tokens, for their buttons; deleted by age.
_V2_RESULTS = (
    """CREATE TABLE results (
        token text PRIMARY KEY,
        platform text NOT NULL,
        user_id text NOT NULL,
        command text NOT NULL,
        prompt text NOT NULL,
        model text NOT NULL,
        size text NOT NULL,
        n integer NOT NULL CHECK (n > 0),
        quality text,
        inputs text NOT NULL,
        outputs text NOT NULL,
        created_at bigint NOT NULL
    )""",
    "CREATE INDEX results_by_time ON results (created_at)",
)

# Cancels asked for requests in flight, read by whichever run holds them.
_V3_CANCELS = ("CREATE TABLE cancels (row_id bigint PRIMARY KEY, asked_at bigint NOT NULL)",)

_MEMBERS = members("p_platform", "p_user_id")


def _price_attempt(guard: str = "") -> str:
    """``price_attempt``: record a payment's quote and nonce, re-checking a higher quote against
    the budgets; ``guard`` runs first and may end it with an outcome of its own."""
    return f"""CREATE OR REPLACE FUNCTION price_attempt(
        p_id bigint, p_amount whole, p_network text, p_payer text, p_nonce text,
        p_valid_before whole, p_reply_to text, p_now bigint, p_exempt boolean,
        p_user_cap bigint, p_global_cap bigint,
        OUT outcome text, OUT user_counted bigint
    ) LANGUAGE plpgsql AS $$
    DECLARE
        a attempts;
        global_counted bigint;
    BEGIN
        {guard}SELECT * INTO a FROM attempts
            WHERE id = p_id AND status = 'pending' AND nonce IS NULL;
        IF FOUND AND p_amount > a.quoted_micro THEN
            SELECT counted_micro - a.quoted_micro INTO global_counted FROM day_totals
            WHERE day = a.created_at / {DAY_SECONDS} FOR UPDATE;
            SELECT sum(counted_micro) - a.quoted_micro INTO user_counted FROM user_days
            WHERE day = a.created_at / {DAY_SECONDS}
                AND (platform, user_id) IN ({members("a.platform", "a.user_id")});
            IF (NOT p_exempt AND user_counted + p_amount > p_user_cap)
                OR global_counted + p_amount > p_global_cap THEN
                outcome := 'refused';
                RETURN;
            END IF;
        END IF;
        UPDATE attempts SET quoted_micro = p_amount, network = p_network, payer = p_payer,
            nonce = p_nonce, valid_before = p_valid_before, reply_to = p_reply_to,
            updated_at = p_now
        WHERE id = p_id AND status = 'pending' AND nonce IS NULL;
        outcome := CASE WHEN FOUND THEN 'priced' ELSE 'not pending' END;
    END $$"""


# What admins set from the chat (the pause switch, daily limits, each change recorded) and the
# links joining one person's identities on several platforms, with their one-time codes. A
# person's identities share one budget: the budget functions are replaced to sum over them, and
# to lock the person (the link's name, else ``platform:id``) for the pending check.
_V4_ADMIN = (
    "CREATE TABLE switches (name text PRIMARY KEY, micro bigint)",
    """CREATE TABLE limits (
        person text PRIMARY KEY,
        daily_micro bigint NOT NULL CHECK (daily_micro >= 0)
    )""",
    """CREATE TABLE changes (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at bigint NOT NULL,
        admin text NOT NULL,
        action text NOT NULL,
        target text,
        micro bigint
    )""",
    """CREATE TABLE links (
        platform text NOT NULL,
        user_id text NOT NULL,
        person text NOT NULL,
        linked_at bigint NOT NULL,
        PRIMARY KEY (platform, user_id)
    )""",
    "CREATE INDEX links_by_person ON links (person)",
    """CREATE TABLE link_codes (
        code text PRIMARY KEY,
        platform text NOT NULL,
        user_id text NOT NULL,
        expires_at bigint NOT NULL
    )""",
    """CREATE TABLE link_tries (
        platform text NOT NULL,
        user_id text NOT NULL,
        at bigint NOT NULL
    )""",
    "CREATE INDEX link_tries_by_user ON link_tries (platform, user_id, at)",
    f"""CREATE OR REPLACE FUNCTION reserve_attempt(
        p_run_id text, p_platform text, p_user_id text, p_display_name text, p_username text,
        p_chat_id text, p_command text, p_model text, p_size text, p_n whole, p_amount whole,
        p_now bigint, p_exempt boolean, p_user_cap bigint, p_global_cap bigint,
        p_max_pending bigint,
        OUT row_id bigint, OUT user_counted bigint, OUT user_pending bigint
    ) LANGUAGE plpgsql AS $$
    DECLARE
        today bigint := p_now / {DAY_SECONDS};
        global_counted bigint;
    BEGIN
        PERFORM set_config('synchronous_commit', 'off', true);
        SELECT counted_micro INTO global_counted FROM day_totals WHERE day = today FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO day_totals VALUES (today, 0) ON CONFLICT DO NOTHING;
            SELECT counted_micro INTO global_counted FROM day_totals WHERE day = today
                FOR UPDATE;
        END IF;
        user_pending := 0;
        IF p_max_pending IS NOT NULL THEN
            -- Pending rows of every day count: a reservation dated another day takes this too.
            PERFORM pg_advisory_xact_lock({LOCK_USER}, hashtext(coalesce(
                (SELECT person FROM links WHERE platform = p_platform AND user_id = p_user_id),
                p_platform || ':' || p_user_id)));
            SELECT count(*) INTO user_pending FROM attempts
            WHERE (platform, user_id) IN ({_MEMBERS}) AND status = 'pending';
        END IF;
        user_counted := coalesce((SELECT sum(counted_micro) FROM user_days
            WHERE day = today AND (platform, user_id) IN ({_MEMBERS})), 0);
        IF (p_max_pending IS NOT NULL AND user_pending >= p_max_pending)
            OR (NOT p_exempt AND user_counted + p_amount > p_user_cap)
            OR global_counted + p_amount > p_global_cap THEN
            RETURN;
        END IF;
        INSERT INTO attempts (run_id, platform, user_id, display_name, username, chat_id,
            command, model, size, n, quoted_micro, status, created_at, updated_at)
        VALUES (p_run_id, p_platform, p_user_id, p_display_name, p_username, p_chat_id,
            p_command, p_model, p_size, p_n, p_amount, 'pending', p_now, p_now)
        RETURNING id INTO row_id;
    END $$""",
    _price_attempt(),
)

# No payment is priced (so none signed) while spending is paused, whenever its command came.
_V5_PAUSED_PRICE = (
    _price_attempt(
        f"""IF coalesce((SELECT micro FROM switches WHERE name = '{PAUSED}'), 0) <> 0 THEN
            outcome := 'paused';
            RETURN;
        END IF;
        """
    ),
)

# Applied in order from the version in schema_version; never edit a released step, add one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _V1,
    _V2_RESULTS,
    _V3_CANCELS,
    _V4_ADMIN,
    _V5_PAUSED_PRICE,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: asyncpg.Connection) -> None:
    """Apply the missing migration steps in one transaction, one process at a time."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1, 0)", LOCK_MIGRATIONS)
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        version = await db.fetchval("SELECT max(version) FROM schema_version") or 0
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"DATABASE_URL: the ledger has schema version {version}, newer than this "
                f"imagebot's {SCHEMA_VERSION}; upgrade imagebot."
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                await db.execute(statement)
        if version < SCHEMA_VERSION:
            await db.execute("DELETE FROM schema_version")
            await db.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)
