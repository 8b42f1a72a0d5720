"""Write constraints.txt, the lock: the exact versions of every package the server and its tests install.

    python -m audio_interaction_server.tools.freeze_constraints [OUT]        (default: constraints.txt at the repo root)

Every install the project documents goes through it: the README's and ``.ci/run``'s
``pip install "torch==2.13.0" -c constraints.txt -e ".[test]"`` and the Dockerfile's ``-c constraints.txt``.
So a fresh clone installs what the suite last passed with, not whatever PyPI's newest releases are that day:
a new upstream release cannot turn a green clone red until someone regenerates the lock and the suite passes.

The set is the closure of pyproject.toml's ``[project] dependencies`` and of its ``[test]`` extra (their
requirements, recursively, with the markers of this interpreter and platform: Linux x86_64, CPython 3.11 like
the image and CI), and the versions are the installed ones. Regenerate it in a fresh virtual environment:
``pip install "torch==2.13.0" -e ".[test]"`` (no ``-c``: that resolves today's releases), run the suite,
then this module. torch itself is left out: its version is the install command's (the Dockerfile's
TORCH_VERSION) and its build (CUDA from PyPI, ``+cpu`` from another index) depends on the index. The CUDA
build's own wheels are not installed on a CPU host, so they cannot be read here: torch's metadata pins most
of them exactly, and CUDA_BUILD_PINS holds the few it leaves open, at the versions the image got.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from datetime import date
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUTPUT = ROOT / "constraints.txt"
# Pinned by the Dockerfile's own build argument, not here (see the module docstring).
EXCLUDED = frozenset({"torch"})
# Requirements of PyPI's Linux (CUDA) torch==2.13.0 that its metadata leaves as ranges (cuda-bindings<14,
# nvidia-nvjitlink<14 via cuda-toolkit's cufft/cusolver/cusparse, cuda-pathfinder via cuda-bindings), at
# the versions `pip freeze` showed in the image built from this Dockerfile. Revisit with TORCH_VERSION.
CUDA_BUILD_PINS = {"cuda-bindings": "13.5.0", "cuda-pathfinder": "1.9.1", "nvidia-nvjitlink": "13.5.37"}


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: ``Typing_Extensions`` and ``typing-extensions`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


# The extras a documented install asks for: the README's and .ci/run's `-e ".[test]"`.
LOCKED_EXTRAS = ("test",)


def project_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The server's run-time requirements (what the Docker image installs)."""
    with open(pyproject, "rb") as file:
        return [Requirement(text) for text in tomllib.load(file)["project"]["dependencies"]]


def locked_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The run-time requirements and those of LOCKED_EXTRAS: everything a documented install resolves."""
    with open(pyproject, "rb") as file:
        extras = tomllib.load(file)["project"].get("optional-dependencies", {})
    return project_dependencies(pyproject) + [Requirement(text) for extra in LOCKED_EXTRAS for text in extras[extra]]


def runtime_closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of ``roots`` and everything they require, recursively.

    Raises LookupError naming a requirement that is not installed: a constraints file written from an
    environment that cannot run the server would pin the wrong thing.
    """
    versions: dict[str, str] = {}
    expanded: dict[str, set[str]] = {}  # the extras (and "", the base) whose requirements were followed, by project
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        name = canonical_name(requirement.name)
        # A project reached again with extras not followed before (`pkg` first, then `pkg[extra]`) adds their
        # requirements: checking the name alone dropped them, depending on the order the edges were walked.
        extras = {canonical_name(extra) for extra in requirement.extras} | {""}
        new_extras = extras - expanded.get(name, set())
        if not new_extras:
            continue
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise LookupError(f"{requirement} is required but not installed here") from None
        versions[name] = distribution.version
        expanded.setdefault(name, set()).update(new_extras)
        # Only the extras this edge asked for switch on "extra == ..." requirements.
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in new_extras):
                pending.append(child)
    return versions


def constraints_text(versions: dict[str, str]) -> str:
    lines = [
        "# The lock: exact versions of the server's dependencies and its [test] extra, for Linux x86_64,",
        "# CPython 3.11 (torch excluded: its pin is the install command's, the Dockerfile's TORCH_VERSION).",
        '# Every documented install uses it: pip install "torch==2.13.0" -c constraints.txt -e ".[test]"',
        f"# Generated on {date.today().isoformat()} from a fresh environment the suite passed in: "
        "python -m audio_interaction_server.tools.freeze_constraints",
    ]
    lines += [f"{name}=={version}" for name, version in sorted(versions.items()) if name not in EXCLUDED]
    lines += ["# Only in the image's CUDA build of torch: left open by torch's metadata, pinned as last built."]
    lines += [f"{name}=={version}" for name, version in sorted(CUDA_BUILD_PINS.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m audio_interaction_server.tools.freeze_constraints",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    try:
        versions = runtime_closure(locked_requirements())
    except LookupError as missing:  # the lock is written from what is installed: all of it must be
        sys.exit(f"error: {missing}: install the project with its test extra first "
                 "(pip install \"torch==2.13.0\" -e \".[test]\"), then run this again")
    try:
        args.output.write_text(constraints_text(versions))
    except OSError as error:  # a folder, a folder that does not exist, no permission: one line, not a traceback
        sys.exit(f"error: cannot write {args.output}: {error.strerror or error}")
    num_pinned = len(versions.keys() - EXCLUDED) + len(CUDA_BUILD_PINS)
    print(f"{args.output}: {num_pinned} pinned packages")


if __name__ == "__main__":
    main()
