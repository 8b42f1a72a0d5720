"""The capacity benchmark runs end to end on the tiny model (its numbers are not asserted, only its shape)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_capacity_benchmark_runs_direct_and_baseline_modes(shared_audio, tiny_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.capacity", "--streams", "2", "--seconds", "4", "--schedule", "4:3",
         "--mode", "direct", "baseline", "--model", str(tiny_checkpoint), "--target-ms", "10000",
         "--ttft-target-ms", "10000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| direct") or line.startswith("| baseline")}
    assert set(rows) == {"direct", "baseline"}
    for line in rows.values():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[-1] == "PASS", line  # generous targets: every decision arrived
        decided, expected = cells[-2].split("/")
        assert decided == expected == "14"  # 2 streams x (10 chunks - 3 warm-up)
        assert cells[5] != "-", f"no scripted reply was timed: {line}"
    assert "SCRIPTED every 4 chunks x 3 tokens" in result.stdout
