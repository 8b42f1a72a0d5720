"""The report of ``benchmarks.gpu_check``: a time budget, stages that cannot take the run down,
and report.md / report.json rewritten after every stage (and every ramp point), so a run that is
killed at its time limit still leaves everything it measured."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


class Budget:
    """Wall-clock seconds left for the whole run, counted from the script's start."""

    def __init__(self, total_s: float, started: float | None = None) -> None:
        self.total_s = total_s
        self.started = time.perf_counter() if started is None else started

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def remaining_s(self) -> float:
        return self.total_s - self.elapsed_s

    def allows(self, needed_s: float) -> bool:
        return self.remaining_s >= needed_s


@dataclass
class Stage:
    """One stage's outcome: ``status`` is running, done, skipped or failed; ``data`` goes to the JSON as is."""

    key: str
    title: str
    status: str = "running"
    seconds: float = 0.0
    note: str = ""
    lines: list[str] = field(default_factory=list)  # markdown body
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # the traceback of a failed stage


class Report:
    def __init__(self, out_dir: Path, header: dict[str, Any], budget: Budget) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.header = header
        self.budget = budget
        self.stages: list[Stage] = []
        self.summary: dict[str, Any] = {}

    def run_stage(self, key: str, title: str, needed_s: float, body: Callable[[Stage], None],
                  skip_reason: str | None = None) -> Stage:
        """Run ``body(stage)`` unless the budget or ``skip_reason`` says no; an exception fails this stage only."""
        stage = Stage(key, title)
        self.stages.append(stage)
        if skip_reason is None and not self.budget.allows(needed_s):
            skip_reason = f"needs about {needed_s:.0f} s, {self.budget.remaining_s:.0f} s of the budget left"
        if skip_reason is not None:
            stage.status, stage.note = "skipped", skip_reason
            progress(f"[{key}] skipped: {skip_reason}")
            self.write()
            return stage
        progress(f"[{key}] {title} (budget left {self.budget.remaining_s:.0f} s)")
        started = time.perf_counter()
        try:
            body(stage)
            stage.status = "done"
        except Exception:
            stage.status, stage.error = "failed", traceback.format_exc()
            progress(f"[{key}] FAILED:\n{stage.error}")
        stage.seconds = time.perf_counter() - started
        progress(f"[{key}] {stage.status} in {stage.seconds:.1f} s")
        self.write()
        return stage

    def stage(self, key: str) -> Stage | None:
        return next((s for s in self.stages if s.key == key), None)

    def write(self) -> None:
        """Rewrite both files (each atomically: a reader never sees half a report)."""
        document = {"header": self.header, "elapsed_s": round(self.budget.elapsed_s, 1),
                    "budget_s": self.budget.total_s, "summary": self.summary,
                    "stages": [asdict(s) for s in self.stages]}
        try:
            _write_atomic(self.out_dir / "report.json", json.dumps(document, indent=2, default=str))
            _write_atomic(self.out_dir / "report.md", self.markdown())
        except Exception:  # a report that cannot be written must not end the run: the next write may succeed
            progress(f"writing the report failed:\n{traceback.format_exc()}")

    def markdown(self) -> str:
        h = self.header
        lines = [f"# GPU check: {h.get('title', '')}", ""]
        lines += [f"- {name}: {value}" for name, value in h.items() if name != "title"]
        lines += [f"- elapsed: {self.budget.elapsed_s:.0f} s of a {self.budget.total_s:.0f} s budget", ""]
        if self.summary:
            lines += ["## Summary", ""] + [f"- {name}: {value}" for name, value in self.summary.items()] + [""]
        for stage in self.stages:
            lines += [f"## {stage.title}", "", f"Status: **{stage.status}** ({stage.seconds:.1f} s)"
                      + (f"; {stage.note}" if stage.note else ""), ""]
            lines += stage.lines + ([""] if stage.lines else [])
            if stage.error:
                lines += ["```", stage.error.rstrip(), "```", ""]
        return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    staging.replace(path)


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: accelerator, driver, software versions, host (never raises)."""
    try:
        return _machine(device)
    except Exception as exc:  # the header must not cost the run
        return {"machine": f"not probed: {exc!r}", "torch": torch.__version__}


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        # How torch's CPU threads wait (the server sets PASSIVE; unset is OpenMP's spinning default).
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }
    for module in ("transformers", "triton"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # triton is absent on CPU-only hosts
            info[module] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = (f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                       f"compute capability {props.major}.{props.minor}")
        info["cuda (torch build)"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = _nvidia_smi("driver_version") or "unknown (nvidia-smi not available)"
        # Triton builds its kernel launcher with the host's C compiler; without one, compiling flex fails.
        info["c compiler"] = shutil.which("cc") or shutil.which("gcc") or "none found"
    else:
        info["gpu"] = "none (CPU run)"
    info["commit"] = _git_commit()
    info["command"] = " ".join([Path(sys.executable).name] + sys.argv)
    return info


def _nvidia_smi(field_name: str) -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def _git_commit() -> str:
    """HEAD of the checkout this script belongs to, marked ``-dirty`` when its files differ from HEAD.

    A copy of the code inside some other checkout (or a copied tree with stale git metadata, as a
    device host may get) must not report that checkout's HEAD as the code that ran.
    """
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return "unknown (not a git checkout of its own)"
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
