"""The package passes the type checker configured in pyproject.toml ([tool.mypy]; mypy comes with the [test] extra).

The check is at a basic level (no strict flags; unannotated functions' bodies are checked, their arguments as Any).
mypy keeps its cache in ``.mypy_cache`` at the repository root (it writes a ``.gitignore`` of its own there), so a
run after the first only re-checks what changed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "server" / "audio_interaction_server"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (pip install -e '.[test]')")

ERROR_LINE = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<message>.*)$", re.MULTILINE)
CHECKED = re.compile(r"(?:checked|found in) (?P<count>\d+) source files?")


@dataclass(frozen=True)
class MypyRun:
    returncode: int
    output: str

    @property
    def errors(self) -> list[tuple[str, int, str]]:
        return [(m["path"], int(m["line"]), m["message"]) for m in ERROR_LINE.finditer(self.output)]

    @property
    def files_checked(self) -> int:
        match = CHECKED.search(self.output)
        assert match, f"no summary line in mypy's output:\n{self.output}"
        return int(match["count"])


def run_mypy(*paths: str) -> MypyRun:
    """mypy with the project's configuration, from the repository root; no paths: the configured ones."""
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-color-output", "--no-pretty", *paths],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    # 0: clean, 1: type errors; anything else (2) is a crash or a bad configuration, never a pass.
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return MypyRun(result.returncode, result.stdout)


def test_the_package_has_no_type_errors():
    run = run_mypy()
    # Every module of the package is checked: a configuration that checked fewer would pass too easily.
    assert run.files_checked == len(list(PACKAGE_DIR.rglob("*.py")))
    assert not run.errors, "\n".join(f"{path}:{line}: {message}" for path, line, message in run.errors)


def test_the_check_sees_torch_and_the_models_own_types(tmp_path):
    """With missing imports ignored, a dependency that lost its types would make everything Any and pass silently.

    The probe is wrong in two ways that only real types reveal: torch's Tensor, and the decoder's layers
    iterating as Blocks (nn.ModuleList alone would yield Modules).
    """
    probe = tmp_path / "probe_types.py"
    probe.write_text(
        "from audio_interaction_server.model.lm import AudioInteractionLM\n"
        "\n"
        "\n"
        "def embedding_weight(lm: AudioInteractionLM) -> str:\n"
        "    return lm.transformer.wte.weight\n"
        "\n"
        "\n"
        "def first_block(lm: AudioInteractionLM) -> int:\n"
        "    return next(iter(lm.transformer.h))\n"
    )
    run = run_mypy(str(probe))
    found = {line: message for _, line, message in run.errors}
    assert set(found) == {5, 9}, run.output
    assert '"Tensor"' in found[5], run.output
    assert '"Block"' in found[9], run.output
