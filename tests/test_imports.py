"""What importing a module of the package drags in: the wire schema and the settings stay light.

Clients, schema validators and config tools import ``protocol``/``options``/``config``; they must not
pay for torch (seconds, gigabytes of CUDA libraries) nor load the engine's state machine.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def modules_loaded_by(module: str) -> set[str]:
    """The modules a clean interpreter holds after importing ``module`` (nothing imported before it)."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", ["protocol", "options", "config", "spec"])
def test_the_wire_schema_and_settings_load_neither_torch_nor_the_engine(module):
    loaded = modules_loaded_by(f"audio_interaction_server.{module}")
    assert "torch" not in loaded
    # The engine's and the model's folders, including their (docstring-only) package modules.
    heavy = sorted(name for name in loaded if name.split(".")[:2] in (["audio_interaction_server", "engine"],
                                                                      ["audio_interaction_server", "model"]))
    assert not heavy, f"importing {module} loads {heavy}"


def test_a_server_and_its_model_load_neither_transformers_nor_torch_dynamo(tiny_checkpoint):
    """What a server start pays for: transformers' Omni modelling module pulls in torch._dynamo, and the two took
    about three of a demo start's seconds; the server writes its audio tower and mel table itself. (Tests,
    benchmarks and the demo checkpoint's writer use transformers.)"""
    code = ("import json, sys; import audio_interaction_server.__main__, audio_interaction_server.api.serving, "
            "audio_interaction_server.engine.process; "
            "from audio_interaction_server.model.checkpoint import load_model; "
            f"load_model({str(tiny_checkpoint)!r}, 'cpu', 'float32'); print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout)
    assert not [name for name in loaded if name.split(".")[0] == "transformers" or name == "torch._dynamo"]


# ---- import directions, read from the source: the ones that hold today, so that none is lost -------------

PACKAGE = "audio_interaction_server"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "server" / PACKAGE

# The folders are the threads (docs/architecture.md); a module's group is its folder, or its own name at the top.
FOLDERS = {"model", "engine", "audio", "render", "api", "demo", "tools"}
# Leaves import nothing of the package: the helpers several folders share (recent, process_memory, yaml_errors) too.
LEAVES = {"options", "spec", "engine.events", "logs", "recent", "process_memory", "yaml_errors", "api.request_heads"}
TOP_LEVEL = {"__init__", "__main__", "cli", "config", "protocol"} | {leaf for leaf in LEAVES if "." not in leaf}
LIGHT = {"protocol", "options", "config", "spec", "engine.events"}  # what clients and config tools import


def group(module: str) -> str:
    """``engine.worker`` -> ``engine``; ``engine`` (its __init__) -> ``engine``; ``cli`` -> ``cli``."""
    return module.split(".")[0]


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str  # a module of the package, dotted below it: "demo.qwen_vocab"
    at_import_time: bool  # False inside a function body (imported when called)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def package_module(dotted: str) -> str | None:
    """``audio_interaction_server.x.y`` -> the longest prefix below the package that is a module."""
    if dotted != PACKAGE and not dotted.startswith(PACKAGE + "."):
        return None
    parts = dotted.split(".")[1:]
    while parts:
        candidate = PACKAGE_DIR.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, importer: str) -> None:
        self.importer = importer
        self.function_depth = 0
        self.edges: list[Edge] = []
        self.torch_at_import_time = False

    def _function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, dotted: str) -> None:
        if dotted.split(".")[0] == "torch" and self.function_depth == 0:
            self.torch_at_import_time = True
        imported = package_module(dotted)
        if imported is not None:
            self.edges.append(Edge(self.importer, imported, self.function_depth == 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        assert node.level == 0, f"{self.importer}: relative import (the package uses absolute ones)"
        module = node.module or ""
        for alias in node.names:
            # `from audio_interaction_server import spec` imports the module spec;
            # `from audio_interaction_server.spec import X` imports spec too.
            submodule = f"{module}.{alias.name}"
            names_a_module = package_module(submodule) not in (None, package_module(module))
            self._add(submodule if names_a_module else module)


def read_package() -> tuple[list[Edge], set[str], set[str]]:
    """(every import between modules, all modules, modules importing torch at import time)."""
    edges: list[Edge] = []
    modules: set[str] = set()
    torch_modules: set[str] = set()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        collector = _ImportCollector(module_name(path))
        collector.visit(ast.parse(path.read_text(encoding="utf-8")))
        modules.add(collector.importer)
        edges += collector.edges
        if collector.torch_at_import_time:
            torch_modules.add(collector.importer)
    return edges, modules, torch_modules


def test_every_module_lives_in_a_folder_or_is_a_known_top_level_module():
    _, modules, _ = read_package()
    homeless = sorted(module for module in modules if group(module) not in FOLDERS | TOP_LEVEL)
    assert not homeless, f"modules outside the folders of docs/architecture.md: {homeless}"
    assert LEAVES | LIGHT <= modules, (LEAVES | LIGHT) - modules


def direction_problems(source: str, target: str) -> list[str]:
    """What is wrong with ``source`` importing ``target`` (both dotted below the package), by the directions
    of docs/architecture.md that hold today."""
    source_group, target_group = group(source), group(target)
    problems = []
    if target == "cli" and source != "__main__":
        problems.append(f"{source} imports cli (only __main__ may)")
    if source in LEAVES and target != source:
        problems.append(f"{source} is a leaf but imports {target}")
    # config checks at start-up that a checkpoint that is no directory names a Hub repo: the Hub's own parser; and
    # that the default session fits the context budget: the token layout's arithmetic (spec, a leaf); a YAML error in
    # one line, as a checkpoint's is said (yaml_errors, a leaf).
    if source in ("protocol", "config") and target != "options" and \
            (source, target) not in {("config", "model.hub"), ("config", "spec"), ("config", "yaml_errors")}:
        problems.append(f"{source} imports {target} (the wire schema and the config depend on the options only)")
    if source_group == "model" and target_group not in {"model", "spec", "yaml_errors"}:
        problems.append(f"model module {source} imports {target} (models take plain arguments)")
    # The worker batches a step's log-mel (host-path.md): of the front-end, the engine takes only that kernel and
    # its padded blocks (audio.mel, audio.blocks: sans-I/O), never the streams, formats or resampling around it.
    engine_may_import = {"engine", "model", "spec", "options", "config", "recent", "process_memory"}
    if source_group == "engine" and target_group not in engine_may_import \
            and target not in ("audio.mel", "audio.blocks"):
        problems.append(f"engine module {source} imports {target} (the engine speaks token ids and log-mel blocks)")
    if source_group == "render" and (target_group in {"model", "api", "audio", "demo", "cli"}
                                     or (target_group == "engine" and target != "engine.events")):
        problems.append(f"render module {source} imports {target} (of the engine, only its events)")
    if source_group == "api" and target_group == "engine" and target not in {"engine.worker", "engine.events",
                                                                              "engine.client", "engine.process_client"}:
        problems.append(f"api module {source} imports {target} (of the engine, only its clients and events)")
    # The per-stream chain still takes the wire's AudioFormat (protocol); the front-end itself needs spec only.
    if source_group == "audio" and target_group not in {"audio", "spec", "protocol"}:
        problems.append(f"audio module {source} imports {target} (the front-end is sans-I/O)")
    # qwen_vocab writes the vocabulary with the detokenizer's byte alphabet, so both agree by construction.
    if source_group == "demo" and target_group not in {"demo", "model", "spec"} and target != "render.detokenizer":
        problems.append(f"demo module {source} imports {target} (the demo is a model, built from the model's parts)")
    return problems


def test_import_directions_hold():
    edges, _, torch_modules = read_package()
    problems = []
    for edge in edges:
        problems += direction_problems(edge.importer, edge.imported)
    # What the light modules load when imported: no module that imports torch, however indirectly.
    loaded_at_import = {edge.importer: set() for edge in edges}
    for edge in edges:
        if edge.at_import_time:
            loaded_at_import[edge.importer].add(edge.imported)
    for light in sorted(LIGHT):
        seen, pending = set(), [light]
        while pending:
            module = pending.pop()
            if module not in seen:
                seen.add(module)
                pending.extend(loaded_at_import.get(module, ()))
        if seen & torch_modules:
            problems.append(f"importing {light} loads {sorted(seen & torch_modules)}, which import torch")
    assert not problems, "\n".join(problems)


def import_cycles(edges: list[Edge]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.importer != edge.imported:
            graph.setdefault(edge.importer, set()).add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group_ = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group_.append(member)
                if member == module:
                    break
            if len(group_) > 1:
                groups.append(sorted(group_))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def test_no_two_modules_import_each_other_even_for_type_checking():
    """Data flows one way; a circle (api/admission and api/runtime had one: the runtime held admission's log
    throttle while admission read the runtime) means two modules are one job split in two."""
    edges, _, _ = read_package()
    assert not import_cycles(edges), import_cycles(edges)
