"""One child pytest under Triton's CPU interpreter for every Triton test file, so the suite starts it once.

Triton decides at its own import whether its language functions are interpreted, and torch may have
imported it earlier in this process, so the kernels' cases cannot run in the parent: they are marked
``interpreted_only`` (skipped in the parent) and ``run_interpreted_files`` runs them all in one child
started with ``TRITON_INTERPRET=1`` (tests/model/test_slot_attention.py::test_the_interpreted_cases).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[2]

# Every file whose interpreted cases the child runs; the parent's copies skip.
INTERPRETED_FILES = ("tests/model/test_slot_attention.py", "tests/model/test_fused_kernels.py")
# Tests of those files that run in the parent only (the launcher, the real compiler's check): the child leaves them out.
PARENT_ONLY = ("test_the_interpreted_cases", "test_the_kernels_compile_for_an_h200")

# The tiny checkpoint the parent has already written (session fixture), so the child does not build its own.
CHECKPOINT_ENV = "AIS_TEST_TINY_CHECKPOINT"

# Marks are read before any fixture is set up: the parent process does not build the tiny model for nothing.
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the child process of test_the_interpreted_cases (TRITON_INTERPRET=1)")


def run_interpreted_files(tmp_path: Path, tiny_checkpoint: Path) -> str:
    """Run every interpreted case in one child; returns its output. Fails on any failure or skip in it."""
    child = subprocess.run(
        [sys.executable, "-m", "pytest", *INTERPRETED_FILES, "-x", "-p", "no:cacheprovider", "-n", "0",
         "-k", " and ".join(f"not {name}" for name in PARENT_ONLY), "--basetemp", str(tmp_path / "child")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", CHECKPOINT_ENV: str(tiny_checkpoint)},
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert re.search(r"\b\d+ passed", child.stdout) and "skipped" not in child.stdout, child.stdout[-2000:]
    return child.stdout


def tiny_model_of_the_run(request: pytest.FixtureRequest):
    """The seeded tiny model (fp32, CPU): from the parent's checkpoint in the child, else the session's own."""
    from audio_interaction_server.model.checkpoint import load_model

    given = os.environ.get(CHECKPOINT_ENV)
    return load_model(Path(given) if given else request.getfixturevalue("tiny_checkpoint"), "cpu", "float32")
