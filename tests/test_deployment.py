"""Dockerfile, .dockerignore and docker-compose.yml: the structure we rely on, and the container's
command run on this host (no Docker engine is needed: the image's ENTRYPOINT, the cpu-demo
service's command and environment, and the HEALTHCHECK command are read from the files and run).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from audio_interaction_server.__main__ import add_serve_arguments, overrides_from
from audio_interaction_server.config import load_config
from benchmarks.harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        steps.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return steps


def instruction(name: str) -> str:
    found = [rest for keyword, rest in dockerfile() if keyword == name]
    assert found, f"no {name} in the Dockerfile"
    return found[-1]  # Docker uses the last ENTRYPOINT/CMD/HEALTHCHECK/USER


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def dockerfile_arg_default(name: str) -> str:
    for keyword, rest in dockerfile():
        if keyword == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"no ARG {name}= in the Dockerfile")


def healthcheck_argv() -> list[str]:
    options, _, command = instruction("HEALTHCHECK").partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    return json.loads(command)  # exec form: no shell needed in the image


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: object, environ: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` substitution (the forms this file uses)."""
    def replace(match: re.Match) -> str:
        name, default = match["name"], match["default"]
        return environ.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}", replace, str(value))


def service_env(service: str, environ: dict[str, str]) -> dict[str, str]:
    return {key: interpolate(value, environ) for key, value in compose()["services"][service]["environment"].items()}


def readme_torch_pin() -> str:
    return re.search(r'"torch==([\w.+]+)"', (ROOT / "README.md").read_text())[1]


def test_dockerfile_serves_as_a_non_root_user_with_health_check_and_a_models_mount():
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "audio_interaction_server", "--host", "0.0.0.0"]
    assert json.loads(instruction("CMD")) == []  # compose's `command` appends flags such as --demo
    user = instruction("USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit()  # numeric: Kubernetes' runAsNonRoot can check it
    assert instruction("EXPOSE") == "8000"
    assert healthcheck_argv()[:2] == ["python", "-c"] and "/health" in healthcheck_argv()[2]
    env = dockerfile_env()
    assert env["AIS_ENGINE__CHECKPOINT"] == "/models" and env["HF_HOME"].startswith("/cache/")
    assert env["NVIDIA_REQUIRE_CUDA"] == "cuda>=13.0"  # torch 2.13's PyPI wheel is the CUDA 13.0 build
    assert dockerfile_arg_default("PYTHON_IMAGE").startswith("python:3.11-")
    assert dockerfile_arg_default("TORCH_VERSION") == readme_torch_pin()


def test_dockerfile_installs_torch_and_dependencies_before_copying_the_code():
    steps = dockerfile()
    position = {step: i for i, step in enumerate(steps)}
    torch_install = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "torch==${TORCH_VERSION}" in rest
                         and "--index-url" in rest)
    copies = [(i, rest.split()) for i, (k, rest) in enumerate(steps) if k == "COPY"]
    # Only the pinned versions before the torch layer, only the dependency list before the dependency layer.
    assert copies[0][1] == ["constraints.txt", "./"] and copies[0][0] < torch_install
    assert all(i > torch_install for i, _ in copies[1:])
    assert copies[1][1] == ["pyproject.toml", "./"]
    deps_install = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "tomllib" in rest)
    assert copies[1][0] < deps_install < copies[2][0]
    assert all(args[0] not in (".", "./") for _, args in copies)  # no `COPY . .`: edits stay in the last layers
    assert position[("USER", instruction("USER"))] > max(i for i, _ in copies)


def test_dockerfile_has_no_syntax_directive():
    """``# syntax=`` makes BuildKit pull its frontend image from a registry: an air-gapped build fails."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.IGNORECASE | re.MULTILINE)


def pinned_constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line must be an exact ``name==version`` pin."""
    from audio_interaction_server.tools.freeze_constraints import canonical_name

    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!]+)", line.strip())
        assert match, f"not an exact pin: {line!r}"
        pins[canonical_name(match[1])] = match[2]
    return pins


def readme_install_command(then: str = "python -m audio_interaction_server") -> str:
    """The install of the README's command that goes on with ``then``: the first command (the server's start) or
    the test command (``python -m pytest``)."""
    return re.search(rf"^(pip install .*?) && {re.escape(then)}$", (ROOT / "README.md").read_text(),
                     flags=re.MULTILINE)[1]


def test_readme_and_ci_install_from_the_lock():
    """A fresh install resolves from constraints.txt: an upstream release cannot turn a green clone red (on
    2026-12-04 transformers 5.25 began to require kernels and tomlkit, and an unlocked install then differed).
    The server's install takes no test extra (1.7 GB of the clients and tools the suite drives); CI runs the
    README's test command, its install included."""
    serve, test = readme_install_command().split(), readme_install_command("python -m pytest").split()
    for install in (serve, test):
        assert install[install.index("-c") + 1] == "constraints.txt", install
    assert "-e" in serve and serve[serve.index("-e") + 1] == ".", serve
    ci = [line.split() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python -m pip install")]
    assert len(ci) == 1 and [word for word in ci[0][2:] if word != "--quiet"] == test, ci
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == "python -m pytest"


def test_constraints_pin_every_dependency_of_the_server_and_its_tests_but_torch():
    from packaging.version import Version

    from audio_interaction_server.tools.freeze_constraints import (
        CUDA_BUILD_PINS, locked_requirements, project_dependencies, runtime_closure,
    )

    pins = pinned_constraints()
    assert "torch" not in pins  # pinned by TORCH_VERSION; a +cpu/CUDA build is the index's choice
    for requirement in project_dependencies():
        name = requirement.name.lower().replace("_", "-")
        if name != "torch":
            assert requirement.specifier.contains(Version(pins[name])), (requirement, pins[name])
    # Everything the server imports at run time, down to the last transitive requirement, as installed here:
    # a dependency added to pyproject.toml without regenerating the file would install unpinned.
    installed = runtime_closure(locked_requirements())
    unpinned = sorted(installed.keys() - pins.keys() - {"torch"})
    assert not unpinned, ("not in constraints.txt (run python -m audio_interaction_server.tools.freeze_constraints): "
                          f"{unpinned}")
    # ... and the suite runs on what the lock says (an install without `-c constraints.txt` would not).
    drifted = {name: (version, pins[name]) for name, version in installed.items() if name in pins
               and Version(version) != Version(pins[name])}
    assert not drifted, f"installed versions differ from constraints.txt (installed, locked): {drifted}"
    # ... and what only the CUDA build of torch installs, where torch's metadata leaves a range.
    assert {name: pins.get(name) for name in CUDA_BUILD_PINS} == CUDA_BUILD_PINS


def test_every_pip_install_in_the_dockerfile_uses_the_constraints():
    installs = [part for keyword, rest in dockerfile() if keyword == "RUN"
                for part in re.split(r"&&|;|\bthen\b", rest) if "pip install" in part]
    assert len(installs) >= 2
    for install in installs:
        # The one exception takes torch alone from TORCH_INDEX_URL; its dependencies follow with the pins.
        assert "-c constraints.txt" in install or ("--no-deps" in install and "torch==" in install), install
    steps = dockerfile()
    first_install = next(i for i, (keyword, rest) in enumerate(steps) if keyword == "RUN" and "pip install" in rest)
    assert ("COPY", "constraints.txt ./") in steps[:first_install]
    workdir = [rest for keyword, rest in steps[:first_install] if keyword == "WORKDIR"]
    assert workdir, "the relative constraints.txt needs the WORKDIR it was copied to"


def test_only_the_gpu_service_sees_gpus():
    """The image must not set NVIDIA_VISIBLE_DEVICES: where the NVIDIA runtime is the host default, every
    container of the image, the CPU demo too, would get every GPU."""
    assert "NVIDIA_VISIBLE_DEVICES" not in dockerfile_env()
    services = compose()["services"]
    assert services["server"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "${NVIDIA_VISIBLE_DEVICES:-all}"
    assert "NVIDIA_VISIBLE_DEVICES" not in services["cpu-demo"].get("environment", {})


def test_dockerignore_keeps_checkpoints_out_but_not_what_the_image_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must in ("checkpoints", "*.safetensors", "*.pth", ".git"):
        assert must in patterns
    copied = [rest.split()[0] for keyword, rest in dockerfile() if keyword == "COPY"]
    for source in copied:
        assert (ROOT / source).exists()
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source


def test_compose_server_reserves_a_gpu_mounts_checkpoints_and_checks_health():
    spec = compose()
    server = spec["services"]["server"]
    assert "profiles" not in server  # `docker compose up` starts it
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "./checkpoints:/models:ro" in server["volumes"]
    named = [v.split(":")[0] for v in server["volumes"] if v.split(":")[1] == "/cache"]
    assert named and named[0] in spec["volumes"]  # the HF cache outlives the container
    assert any(str(port).endswith(":8000") for port in server["ports"])
    assert server["healthcheck"]["test"] == ["CMD", *healthcheck_argv()]  # the same check as the image's
    assert server["environment"]["AIS_API_KEY"] == "${AIS_API_KEY:-}"
    assert server["environment"]["AIS_ENGINE__DEVICE"] == "cuda"


def test_compose_cpu_demo_is_a_profile_without_a_gpu():
    demo = compose()["services"]["cpu-demo"]
    assert demo["profiles"] == ["cpu-demo"] and "deploy" not in demo
    assert demo["command"] == ["--demo", "--device", "cpu"]
    assert "TORCH_INDEX_URL" in demo["build"]["args"]
    assert demo["healthcheck"]["test"] == ["CMD", *healthcheck_argv()]


def parse_serve_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_compose_environment_defaults_and_overrides_make_valid_configs(tmp_path):
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("AIS_")}
    server_args = parse_serve_args(json.loads(instruction("ENTRYPOINT"))[3:])
    server_env = {**image_env, **service_env("server", {})}
    # /models does not exist on this host: stand a directory in for the bind mount.
    config = load_config(None, {**server_env, "AIS_ENGINE__CHECKPOINT": str(tmp_path)}, overrides_from(server_args))
    assert config.host == "0.0.0.0" and config.port == 8000 and config.engine.device == "cuda"
    assert config.api_key is None and config.allowed_origins == [] and not config.is_demo
    chosen = service_env("server", {"AIS_API_KEY": "s3cret", "AIS_ENGINE__CHECKPOINT": "zhifeixie/AudioInteraction",
                                    "AIS_ALLOWED_ORIGINS": "https://a.example"})
    config = load_config(None, {**image_env, **chosen}, overrides_from(server_args))
    assert config.api_key.get_secret_value() == "s3cret" and config.allowed_origins == ["https://a.example"]
    assert str(config.engine.checkpoint) == "zhifeixie/AudioInteraction"

    demo_command = compose()["services"]["cpu-demo"]["command"]
    demo_args = parse_serve_args(json.loads(instruction("ENTRYPOINT"))[3:] + demo_command)
    config = load_config(None, {**image_env, **service_env("cpu-demo", {})}, overrides_from(demo_args))
    assert config.is_demo and config.engine.device == "cpu" and config.host == "0.0.0.0"


def on_host(argv: list[str]) -> list[str]:
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def test_the_cpu_demo_container_command_serves_health_on_this_host(qwen_tokenizer_dir, tmp_path):
    """ENTRYPOINT + the cpu-demo command with the image's and the service's AIS_* environment; the
    HEALTHCHECK command fails before the server listens and passes once it does; SIGTERM stops it cleanly."""
    argv = on_host(json.loads(instruction("ENTRYPOINT")) + compose()["services"]["cpu-demo"]["command"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIS_", "HF_"))}
    env.update({k: v for k, v in dockerfile_env().items() if k.startswith("AIS_")})
    env.update(service_env("cpu-demo", {}))
    env.update({"AIS_PORT": str(port), "AIS_LOG_LEVEL": "info"})
    # The image imports the package through its PYTHONPATH under WORKDIR /app: the same path in this checkout.
    image_path = dockerfile_env()["PYTHONPATH"]
    assert instruction("WORKDIR") == "/app" and image_path.startswith("/app/"), image_path
    env["PYTHONPATH"] = str(ROOT / image_path.removeprefix("/app/"))
    health = on_host(healthcheck_argv())
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0  # nothing listens yet

    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while True:  # polled in-process: a probe interpreter per try would slow the start-up it waits for
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
                    assert response.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):  # not listening yet, or 503 while the demo loads
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        probe = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert f"running on http://0.0.0.0:{port}" in text and "DEMO MODE" in text and "Traceback" not in text


def is_setting(variable: str) -> bool:
    """Whether ``AIS_...`` names a field of ServerConfig (what load_config accepts from the environment)."""
    from pydantic import BaseModel

    from audio_interaction_server.config import ENV_NESTING, ENV_PREFIX, ServerConfig

    model: type[BaseModel] | None = ServerConfig
    for key in variable.removeprefix(ENV_PREFIX).lower().split(ENV_NESTING):
        field = model.model_fields.get(key) if model is not None else None
        if field is None:
            return False
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return True


def test_compose_only_variables_do_not_use_the_settings_prefix():
    """A variable the user exports for Compose (host ports, ...) must not also reach
    ``python -m audio_interaction_server`` as an unknown ``AIS_*`` setting, which stops it with exit status 2."""
    compose_text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text))
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", (ROOT / "docs" / "deployment.md").read_text(), re.M))
    assert interpolated and documented
    assert is_setting("AIS_ENGINE__CHECKPOINT") and not is_setting("AIS_ENGINE__NOPE")
    misnamed = sorted(name for name in interpolated | documented if name.startswith("AIS_") and not is_setting(name))
    assert misnamed == []


def test_freezing_the_lock_without_the_test_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    """In an environment without the test extra, the tool ended with a LookupError traceback (first-hour review,
    round five): one line now, saying what to install, and nothing written."""
    from packaging.requirements import Requirement

    from audio_interaction_server.tools import freeze_constraints

    monkeypatch.setattr(freeze_constraints, "locked_requirements",
                        lambda: [Requirement("surely-not-installed-here==1.0")])
    with pytest.raises(SystemExit) as ended:
        freeze_constraints.main([str(tmp_path / "constraints.txt")])
    assert str(ended.value.code).startswith("error: surely-not-installed-here==1.0 is required but not installed "
                                            "here: install the project with its test extra first")
    assert not (tmp_path / "constraints.txt").exists()


def test_the_lock_follows_the_extras_of_a_project_reached_again_with_them():
    """The closure skipped a project it had seen, whatever extras the new edge asked for: reached first as
    `livekit-agents` and then as `livekit-agents[codecs,images]` (livekit-plugins-openai's edge), the images extra's
    pillow was left out of the lock, depending only on the order the edges were walked (first-hour round 10)."""
    from packaging.requirements import Requirement

    from audio_interaction_server.tools.freeze_constraints import runtime_closure

    with_extras = Requirement("livekit-agents[codecs,images]")
    alone = runtime_closure([with_extras])
    assert "pillow" in alone
    for roots in ([with_extras, Requirement("livekit-agents")], [Requirement("livekit-agents"), with_extras]):
        assert runtime_closure(roots) == alone


def test_freezing_the_lock_into_a_folder_or_a_missing_one_is_one_line(tmp_path):
    """A folder, or a path in a folder that does not exist, ended in an IsADirectoryError / FileNotFoundError
    traceback (first-hour round 10)."""
    from audio_interaction_server.tools import freeze_constraints

    for output, why in ((tmp_path, "Is a directory"), (tmp_path / "nope" / "constraints.txt", "No such file")):
        with pytest.raises(SystemExit) as ended:
            freeze_constraints.main([str(output)])
        assert str(ended.value.code).startswith(f"error: cannot write {output}: {why}"), ended.value.code
