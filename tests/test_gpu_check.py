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
    runpy.run_module("benchmarks.gpu_check", run_name="__main__", alter_sys=True)
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
    assert list(stages) == ["precision", "flex", "model", "attention", "graphs", "warm-up", "ramp", "baseline",
                            "gpu-busy", "model-ramp"]
    for key, stage in stages.items():
        assert stage["status"] == "done", (key, stage["note"], stage["error"])
    assert report["header"]["torch"] and report["header"]["gpu"] == "none (CPU run)"

    for key in ("precision", "flex"):
        data = stages[key]["data"]
        assert data["decisions"]["count"] > 0 and data["reply_tokens"]["count"] > 0
        assert data["passes"], data  # decisions with a margin above the noise agree
    # Eager flex computes exactly what gather computes on the same fp32 model.
    assert stages["flex"]["data"]["decisions"]["noise_max"] < 1e-3

    # The static step's stages: every candidate that runs on the CPU agrees with gather; the buckets ran eagerly.
    cases = stages["attention"]["data"]["cases"]
    assert {c["candidate"] for c in cases} == {"gather to the longest row (eager)",
                                               "gather at the slot length (static)"}
    assert all(c["us_per_layer"] > 0 and c["max_abs_diff_vs_gather"] < 1e-4 for c in cases)
    assert "no CUDA device" in stages["attention"]["note"]
    graphs = stages["graphs"]["data"]
    assert [b["bucket"] for b in graphs["buckets"]] == ["8x16+0", "8x16+8"] and graphs["attention"] == "gather"
    assert all(b["eager_static_ms"] > 0 and b["real_rows"] > 0 for b in graphs["buckets"])

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
    busy = stages["gpu-busy"]["data"]
    assert busy["steps"] > 0 and busy["step_ms_total"] > 0 and "no CUDA device" in stages["gpu-busy"]["note"]

    markdown = (out / "report.md").read_text()
    for heading in ("# GPU check: DRY RUN", "## Summary", "## Correctness: bf16",
                    "## Correctness: in-place FlexAttention", "## Static step: attention candidates",
                    "## Static step: CUDA graphs per bucket",
                    "## Compile and warm-up", "## Capacity ramp, direct mode, SCRIPTED replies 4:3",
                    "## Reference-style baseline", "Largest N that held every target"):
        assert heading in markdown, heading
    assert "ratio ours / baseline" in report["summary"]


def test_targets_judge_every_figure_separately():
    from audio_interaction_server.engine.worker import StepStats

    from benchmarks import capacity
    targets = capacity.Targets(decision_p95_ms=100, first_token_p95_ms=50, reply_tokens_per_s=20, host_share=0.2)
    step = StepStats(num_rows=2, num_decisions=2, num_reply_tokens=0, num_tokens_fed=26, encode_s=0.002,
                     forward_s=0.007, total_s=0.010)  # host: 1 ms of 10
    run = capacity.Run("direct", 2, 1.0, expected_decisions=3, decision_s=[0.01, 0.02, 0.09],
                       first_token_s=[0.04], reply_rates=[25.0, 30.0], steps=[step])
    assert targets.checks(run) == {"complete": True, "decision_p95": True, "first_token_p95": True,
                                   "reply_rate_p5": True, "host_share": True}
    assert targets.passes(run)

    slow_host = StepStats(2, 2, 0, 26, encode_s=0.002, forward_s=0.005, total_s=0.010)  # host: 3 ms of 10
    late = capacity.Run("direct", 2, 1.0, expected_decisions=4, decision_s=[0.01, 0.02, 0.2],
                        first_token_s=[0.06], reply_rates=[5.0, 30.0], steps=[slow_host])
    assert targets.checks(late) == {"complete": False, "decision_p95": False, "first_token_p95": False,
                                    "reply_rate_p5": False, "host_share": False}
    # Nothing to judge is not a failure: a run without replies, a baseline without batched steps.
    quiet = capacity.Run("baseline", 1, 1.0, expected_decisions=1, decision_s=[0.01])
    assert targets.checks(quiet)["first_token_p95"] is None and targets.checks(quiet)["host_share"] is None
    assert targets.passes(quiet)
    # The capacity CLI's targets check latency and completeness only.
    assert set(capacity.Targets(100, 50).checks(late)) == {"complete", "decision_p95", "first_token_p95"}


def test_report_records_a_failing_stage_and_goes_on(tmp_path):
    from benchmarks import gpu_report
    report = gpu_report.Report(tmp_path, {"title": "unit"}, gpu_report.Budget(100))

    def broken(stage):
        stage.data["partial"] = 1
        raise RuntimeError("out of memory at N=768")

    report.run_stage("first", "First", 1, broken)
    report.run_stage("second", "Second", 1, lambda stage: stage.lines.append("measured"))
    report.run_stage("third", "Third", 1000, lambda stage: stage.lines.append("never"))
    written = json.loads((tmp_path / "report.json").read_text())
    first, second, third = written["stages"]
    assert first["status"] == "failed" and "out of memory at N=768" in first["error"] and first["data"]["partial"] == 1
    assert second["status"] == "done"
    assert third["status"] == "skipped" and "needs about 1000 s" in third["note"]
    markdown = (tmp_path / "report.md").read_text()
    assert "RuntimeError: out of memory at N=768" in markdown and "measured" in markdown and "never" not in markdown
