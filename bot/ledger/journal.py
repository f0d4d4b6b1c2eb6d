"""Settlements the ledger could not take yet, kept beside it and retried until they land.

A paid picture is delivered even when the ledger cannot be written (another process holds
SQLite's write lock, the disk is full, the PostgreSQL server is unreachable, slow or refusing):
the charge goes to memory and to a JSON-lines file next to ``DATABASE_PATH`` (one per machine,
whichever backend), and is written to the ledger as soon as it accepts it, in this run or at the
next start. Settling is idempotent here: a row already settled is not settled twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from bot.ledger.api import Ledger, Status

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0


class SettlementJournal:
    """``settle`` that never loses a settlement, whatever the ledger does meanwhile."""

    def __init__(self, ledger: Ledger, path: Path, retry_seconds: float = RETRY_SECONDS) -> None:
        self._ledger = ledger
        self._path = path
        self._retry_seconds = retry_seconds
        self._owed: dict[int, tuple[int, str | None]] = {}  # row -> (micro-USDC, tx hash)
        self._retrying: asyncio.Task[None] | None = None

    @staticmethod
    def beside(database: Path) -> Path:
        """The journal file of the ledger at ``database``."""
        return database.with_name(database.name + ".journal")

    @property
    def owed(self) -> int:
        """Settlements not in the ledger yet."""
        return len(self._owed)

    async def settle(self, row_id: int, charged_micro: int, tx_hash: str | None) -> bool:
        """Settle the row; False when the ledger refused for now and the journal holds it."""
        try:
            await self._ledger.settle(row_id, charged_micro, tx_hash)
            return True
        except ValueError:
            raise  # the row is not pending or unknown: a bug, not a storage problem
        except Exception as error:
            log.warning("the ledger refused settlement of row %d: %s", row_id, error)
        self._owed[row_id] = (charged_micro, tx_hash)
        try:
            await asyncio.to_thread(self._write)
        except OSError as error:
            log.error("could not write the settlement journal %s: %s", self._path, error)
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry_until_written())
        return False

    async def replay(self) -> int:
        """Write what a previous run journaled; what still fails is retried in the background.

        Returns how many settlements it wrote now.
        """
        try:
            lines = await asyncio.to_thread(self._path.read_text)
        except FileNotFoundError:
            return 0
        for line in lines.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                self._owed[int(entry["row"])] = (int(entry["micro"]), entry.get("tx"))
        found = len(self._owed)
        await self._write_owed()
        if self._owed:
            self._retrying = asyncio.create_task(self._retry_until_written())
        return found - len(self._owed)

    async def close(self) -> None:
        """One last try; what is still owed stays in the file for the next start."""
        if self._retrying is not None:
            self._retrying.cancel()
        if self._owed:
            await self._write_owed()

    async def _retry_until_written(self) -> None:
        while self._owed:
            await asyncio.sleep(self._retry_seconds)
            await self._write_owed()

    async def _write_owed(self) -> None:
        """Move what the ledger now accepts out of memory and the file."""
        for row_id, (micro, tx_hash) in list(self._owed.items()):
            try:
                if (await self._ledger.payment(row_id)).status != Status.SETTLED:
                    await self._ledger.settle(row_id, micro, tx_hash)
                log.info("journaled settlement of row %d is in the ledger now", row_id)
            except Exception as error:
                log.warning("the ledger still refuses row %d: %s", row_id, error)
                continue
            del self._owed[row_id]
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._write)

    def _write(self) -> None:
        """The file mirrors what is owed: replaced atomically, removed when nothing is."""
        if not self._owed:
            self._path.unlink(missing_ok=True)
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)  # a PostgreSQL ledger makes none
        fresh = self._path.with_name(self._path.name + ".new")
        lines = "".join(
            json.dumps({"row": row, "micro": micro, "tx": tx}) + "\n"
            for row, (micro, tx) in self._owed.items()
        )
        with open(fresh, "w", encoding="utf-8") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())
        fresh.replace(self._path)
