"""Fixtures every test module may take: a fresh PostgreSQL database per test; and no proxy."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

SERVER_VARIABLE = "IMAGEBOT_TEST_DATABASE_URL"

# The bot goes through HTTP(S)_PROXY when set; tests talk to loopback servers only, directly
# (a test that routes a public link through a proxy sets its own).
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_proxy, None)


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """The URL of an empty database of this test's own on the server ``.ci/run`` starts.

    Without a server the test is skipped with one line, except under ``CI=true``: there a missing
    server fails the run.
    """
    server = os.environ.get(SERVER_VARIABLE)
    if not server:
        reason = f"PostgreSQL tests need {SERVER_VARIABLE} (.ci/run starts a throwaway server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        await admin.close()
    yield server.rpartition("/")[0] + "/" + name
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()
