"""Write constraints.txt: the exact versions of the server's runtime dependencies, as installed here.

    python -m audio_interaction_server.tools.freeze_constraints [OUT]        (default: constraints.txt at the repo root)

The Dockerfile installs every package with ``-c constraints.txt``, so rebuilding the image gives the
same image instead of whatever PyPI's newest releases are that day. The set is the closure of
pyproject.toml's ``[project] dependencies`` (their requirements, recursively, with the markers of
this interpreter and platform: Linux x86_64, CPython 3.11 like the image) and the versions are the
installed ones, so the image runs what the test suite ran. torch itself is left out: its version is
the Dockerfile's TORCH_VERSION build argument and its build (CUDA from PyPI, ``+cpu`` from another
index) depends on TORCH_INDEX_URL. The CUDA build's own wheels are not installed on a CPU host, so
they cannot be read here: torch's metadata pins most of them exactly, and CUDA_BUILD_PINS holds the
few it leaves open, at the versions the image got.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import tomllib
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


def project_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    with open(pyproject, "rb") as file:
        return [Requirement(text) for text in tomllib.load(file)["project"]["dependencies"]]


def runtime_closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of ``roots`` and everything they require, recursively.

    Raises LookupError naming a requirement that is not installed: a constraints file written from an
    environment that cannot run the server would pin the wrong thing.
    """
    versions: dict[str, str] = {}
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        name = canonical_name(requirement.name)
        if name in versions:
            continue
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            raise LookupError(f"{requirement} is required but not installed here") from None
        versions[name] = distribution.version
        # Only the extras this edge asked for switch on "extra == ..." requirements.
        extras = requirement.extras or {""}
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                pending.append(child)
    return versions


def constraints_text(versions: dict[str, str]) -> str:
    lines = [
        "# Exact versions of the server's runtime dependencies (torch excluded: see the Dockerfile's",
        "# TORCH_VERSION), installed by the Dockerfile with `pip install -c constraints.txt`.",
        "# Generated from the environment the tests ran in: "
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
    versions = runtime_closure(project_dependencies())
    args.output.write_text(constraints_text(versions))
    num_pinned = len(versions.keys() - EXCLUDED) + len(CUDA_BUILD_PINS)
    print(f"{args.output}: {num_pinned} pinned packages")


if __name__ == "__main__":
    main()
