"""The GPU check's CPU dry run: every stage runs on the tiny model and writes a report that a GPU run would
fill the same way, so the script cannot rot before a device is lent. Figures are not asserted (they are
timings on a shared CPU), only that they exist, are consistent and are in sane ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


STAGES = ["precision", "flex", "model", "attention", "graphs", "fused", "warm-up", "ramp", "baseline", "gpu-busy",
          "model-ramp"]


@pytest.fixture(scope="module")
def dry_run(shared_audio, qwen_tokenizer_dir, tmp_path_factory):
    """One dry run for every test of this module: (report.json as a dict, report.md)."""
    out = tmp_path_factory.mktemp("gpu_check") / "report"
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_CHECK_IMPORTS, "--dry-run", "--out", str(out), "--audio", str(shared_audio),
         "--budget-s", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.fixture(scope="module")
def stages(dry_run):
    return {stage["key"]: stage for stage in dry_run[0]["stages"]}


def test_the_dry_run_runs_every_stage_without_the_web_stack(dry_run, stages):
    report, markdown = dry_run
    assert list(stages) == STAGES
    for key, stage in stages.items():
        assert stage["status"] == "done", (key, stage["note"], stage["error"])
    assert report["header"]["torch"] and report["header"]["gpu"] == "none (CPU run)"
    # torch's CPU threads wait as the server's do, and the report says how.
    assert report["header"]["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    for heading in ("# GPU check: DRY RUN", "## Summary", "## Correctness: bf16",
                    "## Correctness: in-place FlexAttention", "## Static step: attention candidates",
                    "## Static step: CUDA graphs per bucket", "## Static step: fused kernels vs the torch layers",
                    "## Compile and warm-up", "## Capacity ramp, direct mode, SCRIPTED replies 4:3",
                    "## Reference-style baseline", "Largest N that held every target"):
        assert heading in markdown, heading
    assert "ratio ours / baseline" in report["summary"] and "static step fused kernels" in report["summary"]


def test_the_correctness_stages_agree(stages):
    for key in ("precision", "flex"):
        data = stages[key]["data"]
        assert data["decisions"]["count"] > 0 and data["reply_tokens"]["count"] > 0
        assert data["passes"], data  # decisions with a margin above the noise agree
    # Eager flex computes exactly what gather computes on the same fp32 model.
    assert stages["flex"]["data"]["decisions"]["noise_max"] < 1e-3


def test_the_static_step_stages_ran_their_cpu_side(stages):
    """Every attention candidate that runs on the CPU agrees with gather; the buckets ran eagerly; the fused
    stage counted and timed the torch side (its fused side runs in tests/model/test_fused_kernels.py)."""
    cases = stages["attention"]["data"]["cases"]
    assert {c["candidate"] for c in cases} == {"gather to the longest row (eager)",
                                               "gather at the slot length (static)"}
    assert all(c["us_per_layer"] > 0 and c["max_abs_diff_vs_gather"] < 1e-4 for c in cases)
    assert "no CUDA device" in stages["attention"]["note"]
    graphs = stages["graphs"]["data"]
    assert [b["bucket"] for b in graphs["buckets"]] == ["8x16+0", "8x16+8"] and graphs["attention"] == "gather"
    assert all(b["eager_static_ms"] > 0 and b["real_rows"] > 0 for b in graphs["buckets"])
    fused = stages["fused"]
    assert [b["bucket"] for b in fused["data"]["buckets"]] == ["8x16+0", "8x16+8"] and not fused["data"]["fused_run"]
    # More rows, more operations: the count follows the step.
    torch_launches = [b["launches"]["torch"] for b in fused["data"]["buckets"]]
    assert 0 < torch_launches[0] < torch_launches[1]
    assert all(b["ms"]["torch"] > 0 for b in fused["data"]["buckets"]) and "no CUDA device" in fused["note"]


def test_the_ramps_and_the_baseline_measured_every_point(stages):
    ramp = stages["ramp"]["data"]["runs"]
    assert [run["streams"] for run in ramp] == [1, 2]
    # One worker serves every N in turn: one start-up (on CUDA the graph capture) for the whole ramp.
    assert [run["started_worker"] for run in ramp] == [True, False] and ramp[1]["setup_s"] == 0
    assert "1 start(s)" in "\n".join(stages["ramp"]["lines"])
    for run in ramp:
        assert run["decisions"] == run["expected_decisions"] == run["streams"] * 2  # 5 chunks - 3 warm-up
        decision = run["decision_ms"]
        assert 0 < decision["50"] <= decision["95"] <= decision["99"] < 10_000
        step = run["step"]
        assert step["num_steps"] > 0 and 1 <= step["rows_mean"] <= step["rows_max"] <= run["streams"]
        parts = step["encoder_ms"] + step["lm_ms"] + step["host_ms"]
        assert abs(parts - step["step_ms"]) < 0.01 * step["step_ms"] + 0.01
        assert run["peak_memory_mib"] > 0 and set(run["checks"]) == {
            "complete", "decision_p95", "first_token_p95", "reply_rate_p5", "host_share"}
    # The 4:3 dry-run script makes replies inside 2 s: the speaking path is timed, not skipped.
    assert any(run["replies"] and run["first_token_ms"]["95"] for run in ramp)
    assert stages["ramp"]["data"]["capacity"] in (0, 1, 2)
    assert stages["baseline"]["data"]["runs"][0]["streams"] == 1
    busy = stages["gpu-busy"]["data"]
    assert busy["steps"] > 0 and busy["step_ms_total"] > 0 and "no CUDA device" in stages["gpu-busy"]["note"]
    assert [run["streams"] for run in stages["model-ramp"]["data"]["runs"]] == [1]


def test_the_device_ramp_covers_the_issues_points():
    from benchmarks import gpu_check

    args = gpu_check.parse_args(["--out", "unused", "--audio", str(ROOT)])
    assert args.streams == [256, 512, 600, 768, 800, 1024] and args.stop_after_failures == 0


def test_targets_judge_every_figure_separately():
    from audio_interaction_server.engine.events import StepStats

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


def test_the_ramp_budgets_the_worker_start_once(monkeypatch, tmp_path):
    """The shared worker starts (captures its graphs) at the first point only: the first point's wall time,
    start-up included, must not become every later point's estimate, or the ramp stops N points early (the
    H200 run of 2026-12-04 stopped before N=600 with 93 s left after a 72 s start; a second run was needed)."""
    from types import SimpleNamespace

    from benchmarks import capacity, gpu_check, gpu_report

    clock = {"now": 0.0}

    class Budget(gpu_report.Budget):
        @property
        def elapsed_s(self) -> float:
            return clock["now"]

    class Shared:
        def __init__(self, *args) -> None:
            self.worker = None

        def stop(self) -> None:
            pass

    shared: list[Shared] = []
    monkeypatch.setattr(capacity, "SharedWorker", lambda *a: shared.append(Shared()) or shared[-1])

    def measure(streams, run_at):
        started = shared[-1].worker is None
        shared[-1].worker = SimpleNamespace(is_alive=True)
        wall, setup = (70.0, 50.0) if started else (22.0, 0.0)  # a 50 s graph capture, then 20 s per point
        clock["now"] += wall
        record = gpu_check.run_record(capacity.Run("direct", streams, 10.0, expected_decisions=1, decision_s=[0.01],
                                                   max_sessions=1024, attention="triton"))
        record.update(setup_s=setup, started_worker=started, wall_s=wall)
        return record

    monkeypatch.setattr(gpu_check, "measure", measure)
    report = gpu_report.Report(tmp_path, {"title": "unit"}, Budget(200.0))
    stage = gpu_report.Stage("ramp", "ramp")
    args = SimpleNamespace(seconds=10.0, stop_after_failures=0)
    served = gpu_check.Served()
    served.worker_start_s = 50.0  # the device's guess before any worker started
    gpu_check.ramp(args, served, report, stage, None, 20.0, [256, 512, 600, 768, 800, 1024])
    # Each later point needs 10 + 15 s and 20 s stay for the baseline: 200 s hold 256 (70 s) and four more (22 s each).
    assert [r["streams"] for r in stage.data["runs"]] == [256, 512, 600, 768, 800], stage.note
    assert served.worker_start_s == 50.0  # measured, for the stages that start their own worker


def test_a_ramp_point_says_whether_its_graphs_served(tiny_model, stream_chunks):
    """A worker whose self-check refused its CUDA graphs serves on with the static step run eagerly: the ramp's
    record (and report) must say which path served each point, with this run's step counts."""
    from types import SimpleNamespace

    from audio_interaction_server.engine.events import StepPath
    from audio_interaction_server.engine.static_path import StepCounts
    from benchmarks import capacity, gpu_check

    refused = SimpleNamespace(step_path=StepPath(True, "refused", 119, 25.0, 2**30),
                              runner=SimpleNamespace(static=SimpleNamespace(counts=StepCounts(0, 7, 2))))
    path = capacity.static_step_path(refused, StepCounts(0, 3, 1))
    assert path["graphs"] == "REFUSED by the self-check"
    assert (path["static_eager_steps"], path["eager_batches"]) == (4, 1)  # this run's, not the worker's lifetime
    assert "graphs REFUSED" in gpu_check.describe_step_path(path)

    chunks = [chunk for stream in stream_chunks[:1] for chunk in stream]
    run = capacity.run_direct(tiny_model, chunks, 1, 2.0, {"step": "static"}, drain_s=5.0)
    assert run.step_path["path"] == "static" and run.step_path["graphs"] == "off"  # no CUDA: no graphs
    assert run.step_path["static_eager_steps"] > 0 and run.step_path["graph_steps"] == 0
    assert gpu_check.run_record(run)["step_path"] == run.step_path
