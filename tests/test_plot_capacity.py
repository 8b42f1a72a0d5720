"""benchmarks/plot_capacity.py draws the committed ramps; the committed numbers are the docs' tables."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

from benchmarks.harness import REPO_ROOT

RESULTS = REPO_ROOT / "docs" / "results"
PERFORMANCE = REPO_ROOT / "docs" / "performance.md"


def markdown_row(row: dict) -> list[str]:
    """A results row as capacity.py prints it in the docs' tables ("-" for what the mode does not measure)."""
    cells = [row["mode"], str(row["streams"])]
    for name in ("decision_p50_ms", "decision_p95_ms", "decision_p99_ms", "first_token_p50_ms", "first_token_p95_ms"):
        cells.append(f"{row[name]:.1f}")
    cells.append(str(row["reply_tokens_per_s"]))
    if "step_ms" in row:
        step = [row["step_ms"], row["encoder_pct"], row["lm_pct"], row["host_pct"], row["rows_per_step"]]
        cells += ["-"] * 5 if row["step_ms"] is None else \
            [f"{step[0]:.1f}", f"{step[1]}%", f"{step[2]}%", f"{step[3]}%", f"{step[4]:.1f}"]
        cells.append(str(row["peak_mib"]))
    arrived, expected = row["decisions"]
    return cells + [f"{arrived}/{expected}", row["verdict"]]


def ramp_files() -> list[Path]:
    """The results files that hold capacity ramps (``runs``); docs/results also keeps whole GPU-check reports."""
    return [path for path in sorted(RESULTS.glob("*.json")) if "runs" in json.loads(path.read_text(encoding="utf-8"))]


def test_the_committed_results_are_the_rows_of_the_docs_tables():
    table_rows = {tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
                  for line in PERFORMANCE.read_text(encoding="utf-8").splitlines() if line.startswith("| ")}
    files = ramp_files()
    assert files
    for path in files:
        for run in json.loads(path.read_text(encoding="utf-8"))["runs"]:
            assert f"```bash\n{run['command']}\n```" in PERFORMANCE.read_text(encoding="utf-8"), run["command"]
            for row in run["rows"]:
                assert tuple(markdown_row(row)) in table_rows, (path.name, row)


def test_the_script_draws_one_png_per_results_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.plot_capacity", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    drawn = sorted(p.name for p in tmp_path.iterdir())
    assert drawn == sorted(f"{p.stem}.png" for p in ramp_files())
    for name in drawn:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 10_000 < len(data) < 200_000
        assert (REPO_ROOT / "docs" / "figures" / name).is_file()  # the committed picture exists
