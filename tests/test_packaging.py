"""The distribution: what a wheel of this repository installs, and under which import name."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from audio_interaction_server import config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "server" / "audio_interaction_server"


def test_the_default_settings_are_the_packages_own_file():
    """An installed package finds its defaults without a checkout: the YAML sits inside it."""
    assert config.DEFAULT_CONFIG_PATH == PACKAGE / "default.yaml"
    assert config.DEFAULT_CONFIG_PATH.is_file()
    assert config._read_yaml(config.DEFAULT_CONFIG_PATH), "the default YAML sets nothing"


def test_a_wheel_holds_one_package_with_its_web_page_and_default_settings(tmp_path):
    """Built from a copy of the sources the wheel needs, so the checkout gets no build/ or egg-info."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "server" / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path / "dist"), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"audio_interaction_server"}, top_level  # no top-level `server` package
    assert "audio_interaction_server/default.yaml" in names
    web_files = {path.name for path in (PACKAGE / "api" / "web").iterdir() if path.is_file()}
    packaged_web = {name.rsplit("/", 1)[1] for name in names if name.startswith("audio_interaction_server/api/web/")}
    assert packaged_web == web_files
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "audio-interaction = audio_interaction_server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_no_top_level_server_package_is_importable(tmp_path):
    """Outside the checkout, `import server` finds nothing of ours (it would shadow a user's server.py)."""
    result = subprocess.run([sys.executable, "-c", "import server"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "No module named 'server'" in result.stderr


def test_the_source_parses_under_the_oldest_python_it_declares():
    """pyproject's requires-python is a promise to pip: an interpreter it admits must be able to import us."""
    import ast
    import re
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = map(int, re.fullmatch(r">=\s*(\d+)\.(\d+)", requires).groups())
    too_new = []
    for path in sorted(PACKAGE.rglob("*.py")):
        try:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(major, minor))
        except SyntaxError as error:
            too_new.append(f"{path.relative_to(ROOT)}:{error.lineno}: {error.msg}")
    assert not too_new, f"not Python {major}.{minor} syntax:\n" + "\n".join(too_new)


def test_the_websockets_floor_has_the_protocol_state_the_transport_uses():
    """pyproject said websockets>=12; with 15 (or 12) installed beside the project, without the lock, the server
    loaded, said ready, then closed every WebSocket handshake on an AttributeError of ServerProtocol's
    max_message_size / current_size, which websockets has since 16 (first-hour round 9)."""
    import websockets
    from websockets.server import ServerProtocol

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if re.match(r"websockets\b", d)]
    floor = re.fullmatch(r"websockets\s*>=\s*(\d+)(?:\.\d+)*", spec)
    assert floor is not None, spec
    assert int(floor.group(1)) >= 16, spec
    protocol = ServerProtocol()
    for name in ("max_message_size", "max_fragment_size", "current_size"):  # what api/websocket_guard.py reads
        assert hasattr(protocol, name), (name, websockets.__version__)


def test_a_websockets_below_the_floor_stops_the_server_with_one_line(capsys, monkeypatch):
    """`pip install "openai[realtime]"` (OpenAI's documented install for the Realtime API) into the server's
    environment takes websockets to 15.0.1 (that extra pins <16) with only a resolver warning; the server then said
    ready and dropped every handshake. It refuses to start instead, naming the version and the fix (first-hour 10)."""
    from audio_interaction_server import __main__ as server_main

    assert server_main.websockets_problem() is None  # the installed one (the lock's) serves
    assert server_main.websockets_problem("16.0") is None
    problem = server_main.websockets_problem("15.0.1")
    assert "websockets 15.0.1" in problem and 'pip install "websockets>=16"' in problem
    assert "openai[realtime]" in problem
    assert server_main.WEBSOCKETS_FLOOR == 16

    installed_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "15.0.1" if name == "websockets" else installed_version(name))
    parser = argparse.ArgumentParser()
    server_main.add_serve_arguments(parser)
    status = server_main.serve(parser.parse_args(["--demo", "--port", "1"]))  # refused before any port is bound
    assert status == server_main.EXIT_BAD_CONFIG
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: websockets 15.0.1 is installed")
