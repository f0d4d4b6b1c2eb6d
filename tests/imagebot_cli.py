"""Run the ``imagebot`` command line in its own process, as an admin on a shell would."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from eth_account import Account

ROOT = Path(__file__).parents[1]


async def imagebot(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``imagebot ARGS``; return its exit code and stdout (stderr only on failure)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagebot.cli",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    assert not err or process.returncode, err.decode()
    return process.returncode, out.decode()


def cli_env(image_api_url: str, database: Path, **extra: str) -> dict[str, str]:
    """A clean environment for the command line: this gateway, this ledger, a throwaway wallet."""
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "IMAGE_API_URL": image_api_url,
        "DATABASE_PATH": str(database),
        "WALLET_PRIVATE_KEY": Account.create().key.hex(),
        **extra,
    }


@asynccontextmanager
async def imagebot_run(env: dict[str, str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``imagebot run`` in its own process, working in the log file's folder, its stderr in that
    file; SIGTERM at the end if it is still alive, as a service manager does."""
    stderr = await asyncio.to_thread(os.open, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imagebot.cli", "run", cwd=log.parent, env=env, stderr=stderr
        )
    finally:
        os.close(stderr)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 90)
