"""Which runs are dead, so that ``recover()`` may resolve their pending rows.

Each open SQLite ledger writes its random run id on its rows and holds an exclusive ``flock`` on
``<db>.runs/<run_id>.lock``. A run whose lock file is missing or can be locked, i.e. whose process
is gone or whose ledger was closed, is dead; a live run is never taken for a dead one.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLock:
    """This run's lock file, flocked for the ledger's lifetime; its release marks the run dead."""

    folder: Path
    run_id: str
    fd: int

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        folder.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(8)
        # Locked before it gets its .lock name, so recover() never sees it unlocked.
        fresh = folder / f"{run_id}.new"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fresh.rename(folder / f"{run_id}.lock")
        return cls(folder, run_id, fd)

    def release(self) -> None:
        (self.folder / f"{self.run_id}.lock").unlink(missing_ok=True)
        os.close(self.fd)

    def dead_runs(self, run_ids: Iterable[str]) -> list[str]:
        """Of those runs and all runs with a lock file, the dead ones; their files are removed."""
        candidates = set(run_ids) | {path.stem for path in self.folder.glob("*.lock")}
        candidates.discard(self.run_id)
        return sorted(run for run in candidates if _claim_if_dead(self.folder / f"{run}.lock"))


def runs_folder(database: Path) -> Path:
    """Where the runs of the ledger file ``database`` keep their lock files."""
    return database.with_name(database.name + ".runs")


def _claim_if_dead(lock_file: Path) -> bool:
    """True, removing the file, if no process holds its flock (LOCK_NB: this never blocks)."""
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    lock_file.unlink(missing_ok=True)
    os.close(fd)
    return True
