"""What importing a module of the package drags in: the wire schema and the settings stay light.

Clients, schema validators and config tools import ``protocol``/``config``/``settings``; they must not
pay for torch (seconds, gigabytes of CUDA libraries) nor load the engine's state machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ENGINE_MODULES = ("conversation", "scripted", "engine_events", "worker", "sampling", "lm", "encoder", "checkpoint")


def modules_loaded_by(module: str) -> set[str]:
    """The modules a clean interpreter holds after importing ``module`` (nothing imported before it)."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", ["protocol", "config", "settings"])
def test_the_wire_schema_and_settings_load_neither_torch_nor_the_engine(module):
    loaded = modules_loaded_by(f"audio_interaction_server.{module}")
    assert "torch" not in loaded
    engine = sorted(name for name in ENGINE_MODULES if f"audio_interaction_server.{name}" in loaded)
    assert not engine, f"importing {module} loads the engine's {engine}"
