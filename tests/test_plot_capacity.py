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


def test_a_pass_that_names_targets_it_did_not_judge_is_drawn_as_a_pass(tmp_path, monkeypatch):
    """capacity.py prints "PASS; not judged: first token (no reply timed)" for a run too short to time a reply; a
    row transcribed so was drawn with the hollow ring of an N that missed the targets."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from benchmarks.plot_capacity import plot

    rings = []
    original = Axes.plot

    def recording(self, *args, **kwargs):
        if len(args) == 3 and args[2] == "o":  # the hollow rings: x, y, "o"
            rings.append(list(args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    row = dict(mode="direct", decision_p50_ms=10.0, decision_p95_ms=20.0, decisions=[6, 6])
    results = {"title": "t", "machine": "m", "targets": {"decision_p95_ms": 100.0},
               "runs": [{"date": "2026-12-07", "rows": [
                   {**row, "streams": 1, "verdict": "PASS"},
                   {**row, "streams": 2, "verdict": "PASS; not judged: first token (no reply timed)"},
                   {**row, "streams": 4, "verdict": "fail", "decision_p95_ms": 200.0}]}]}
    plot(results, tmp_path / "ramp.png")
    assert rings == [[4]], rings
