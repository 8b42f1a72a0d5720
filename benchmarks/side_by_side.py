"""Two checkouts' server code timed side by side: each round in a fresh interpreter, the two trees alternating.

A benchmark with ``--against OTHER_CHECKOUT/server`` runs itself once per round and tree as
``python -m <module> ... --rounds 1 --json`` with that tree's ``server`` folder first on ``PYTHONPATH`` (the
benchmark's own code stays this checkout's), and keeps the best time of each case per tree. Alternating rounds
lets drift in the machine's speed fall on both trees alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import positive_int, server_package_dir

ROOT = Path(__file__).resolve().parents[1]


def add_options(parser: argparse.ArgumentParser, rounds: int = 5) -> None:
    """``--rounds``, ``--against`` and the hidden ``--json`` (one tree's round, run by ``round_in_tree``)."""
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    parser.add_argument("--against", metavar="SERVER_DIR", type=server_package_dir,
                        help="another checkout (or its server/ folder) to compare with")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)


def round_in_tree(module: str, args: list[str], server_dir: str | Path) -> dict[str, float]:
    """One round's ``{case: seconds}``, printed as JSON by ``python -m module *args --rounds 1 --json``, with
    the server imported from ``server_dir``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(server_dir), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", module, *args, "--rounds", "1", "--json"]
    return json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout)


def best_of_alternating(module: str, args: list[str], other_server_dir: str | Path,
                        rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """The best seconds of each case over ``rounds`` alternated rounds: (this checkout's, the other's)."""
    best_this: dict[str, float] = {}
    best_other: dict[str, float] = {}
    for _ in range(rounds):
        for best, server_dir in ((best_this, ROOT / "server"), (best_other, other_server_dir)):
            for case, seconds in round_in_tree(module, args, server_dir).items():
                best[case] = min(best.get(case, float("inf")), seconds)
    return best_this, best_other
