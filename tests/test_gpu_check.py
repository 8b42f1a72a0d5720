"""The GPU check's CPU dry run: every stage runs on the tiny model and writes a report that a GPU run would
fill the same way, so the script cannot rot before a device is lent. Figures are not asserted (they are
timings on a shared CPU), only that they exist, are consistent and are in sane ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the script in-process, then proves that nothing on its path imported the web stack: the
# device has no fastapi/uvicorn/websockets.
RUN_AND_CHECK_IMPORTS = """
import runpy, sys
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
web = sorted({"fastapi", "uvicorn", "websockets", "starlette"} & set(sys.modules))
assert not web, f"the GPU check imported {web}"
"""


def test_gpu_check_dry_run_writes_every_stage(shared_audio, qwen_tokenizer_dir, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_CHECK_IMPORTS, "--dry-run", "--out", str(out), "--audio", str(shared_audio),
         "--budget-s", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    stages = {stage["key"]: stage for stage in report["stages"]}
    assert list(stages) == ["precision", "flex", "model", "warm-up", "ramp", "baseline", "model-ramp"]
    for key, stage in stages.items():
        assert stage["status"] == "done", (key, stage["note"], stage["error"])
    assert report["header"]["torch"] and report["header"]["gpu"] == "none (CPU run)"

    for key in ("precision", "flex"):
        data = stages[key]["data"]
        assert data["decisions"]["count"] > 0 and data["reply_tokens"]["count"] > 0
        assert data["passes"], data  # decisions with a margin above the noise agree
    # Eager flex computes exactly what gather computes on the same fp32 model.
    assert stages["flex"]["data"]["decisions"]["noise_max"] < 1e-3

    ramp = stages["ramp"]["data"]["runs"]
    assert [run["streams"] for run in ramp] == [1, 2]
    for run in ramp:
        assert run["decisions"] == run["expected_decisions"] == run["streams"] * 4  # 7 chunks - 3 warm-up
        decision = run["decision_ms"]
        assert 0 < decision["50"] <= decision["95"] <= decision["99"] < 10_000
        step = run["step"]
        assert step["num_steps"] > 0 and 1 <= step["rows_mean"] <= step["rows_max"] <= run["streams"]
        parts = step["encoder_ms"] + step["lm_ms"] + step["host_ms"]
        assert abs(parts - step["step_ms"]) < 0.01 * step["step_ms"] + 0.01
        assert run["peak_memory_mib"] > 0 and set(run["checks"]) == {
            "complete", "decision_p95", "first_token_p95", "reply_rate_p5", "host_share"}
    # The 4:3 dry-run script makes replies inside 3 s: the speaking path is timed, not skipped.
    assert any(run["replies"] and run["first_token_ms"]["95"] for run in ramp)
    assert stages["ramp"]["data"]["capacity"] in (0, 1, 2)
    assert stages["baseline"]["data"]["runs"][0]["streams"] == 1

    markdown = (out / "report.md").read_text()
    for heading in ("# GPU check: DRY RUN", "## Summary", "## Correctness: bf16", "## Correctness: in-place FlexAttention",
                    "## Compile and warm-up", "## Capacity ramp, direct mode, SCRIPTED replies 4:3",
                    "## Reference-style baseline", "Largest N that held every target"):
        assert heading in markdown, heading
    assert "ratio ours / baseline" in report["summary"]
