"""How long the command line takes, as whole processes: ``imagebot --help`` and
``imagebot spend --json`` over a big ledger (issue 19's targets: 0.3 s and 0.5 s).

Run: ``.venv/bin/python bench/cli_start.py [--runs 5] [--rows 1000000 --users 1000]``. The ledger
is the cached file ``bench/ledger.py`` builds (about a minute the first time). Each command
runs ``--runs`` times after one untimed run (the file's pages in the OS cache, as an admin
asking twice would find them); prints the median and range, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ledger import big_ledger

TARGETS = {"--help": 0.3, "spend --json": 0.5}


def imagebot() -> str:
    """The installed ``imagebot`` script next to this Python."""
    return str(Path(sys.executable).with_name("imagebot"))


def timed(command: list[str], environment: dict[str, str], runs: int) -> list[float]:
    """Seconds of each of ``runs`` runs of ``command``, after one untimed run."""
    times = []
    for run in range(runs + 1):
        started = time.perf_counter()
        subprocess.run(command, env=environment, stdout=subprocess.DEVNULL, check=True)
        if run:
            times.append(time.perf_counter() - started)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000)
    args = parser.parse_args()
    ledger = asyncio.run(big_ledger(args.rows, args.users))
    environment = {
        name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ
    } | {"DATABASE_PATH": str(ledger)}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    met = True
    for name, target in TARGETS.items():
        times = timed([imagebot(), *name.split()], environment, args.runs)
        median = statistics.median(times)
        met &= median <= target
        verdict = "MET" if median <= target else "MISSED"
        print(
            f"  imagebot {name:<13} median {median:.3f} s (range {min(times):.3f} to "
            f"{max(times):.3f}, {args.runs} runs)  target <= {target:g} s  {verdict}"
        )
    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
