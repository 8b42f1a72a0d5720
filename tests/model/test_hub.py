"""Checkpoint sources: a directory passes through, a Hub repo id is fetched or found in the HF cache.

No test reaches the internet. The offline cases run in a subprocess started with
``HF_HUB_OFFLINE=1`` and ``HF_HOME`` in tmp (huggingface_hub reads both at import) and
with every non-loopback socket refused; the "hub answers 404" and "hub unreachable"
cases point huggingface_hub at a server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from audio_interaction_server.model.checkpoint import CheckpointError, load_model
from audio_interaction_server.model.hub import parse_repo_id, resolve_checkpoint_source
from audio_interaction_server.config import ConfigError, load_config

REPO_ID = "zhifeixie/AudioInteraction"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", None}

# Prepended to every subprocess: any connection or name lookup beyond loopback fails loudly.
NO_NETWORK = """
import socket
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in {LOOPBACK_HOSTS!r}:
        raise RuntimeError(f"test forbids network access: lookup of {{host!r}}")
    return _getaddrinfo(host, *args, **kwargs)
def _guarded_connect(self, address):
    if isinstance(address, tuple) and address[0] not in {LOOPBACK_HOSTS!r}:
        raise RuntimeError(f"test forbids network access: connect to {{address!r}}")
    return _connect(self, address)
socket.getaddrinfo = _guarded_getaddrinfo
socket.socket.connect = _guarded_connect
""".format(LOOPBACK_HOSTS=LOOPBACK_HOSTS)


def offline_env(hf_home: Path) -> dict[str, str]:
    """This process's environment without any HF_* setting, plus an offline hub and its own HF_HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE", "AIS_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def run_python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_NETWORK + code, *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])


RESOLVE = """
import sys
from audio_interaction_server.model.checkpoint import CheckpointError
from audio_interaction_server.model.hub import resolve_checkpoint_source
for value in sys.argv[1:]:
    try:
        print("OK", resolve_checkpoint_source(value))
    except CheckpointError as error:
        print("ERROR", error)
"""


def fill_hf_cache(hub_cache: Path, repo_id: str, commit: str, files: Path) -> Path:
    """``files`` laid out as huggingface_hub's cache keeps a downloaded repo: content-addressed blobs,
    a snapshot folder of relative symlinks per commit, and refs/main naming the commit."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True)
    for source in sorted(p for p in files.rglob("*") if p.is_file()):
        relative = source.relative_to(files)
        blob = repo_dir / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        if not blob.exists():
            try:
                os.link(source, blob)  # same file system: no 40 MB copy
            except OSError:
                shutil.copyfile(source, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize("value, expected", [
    ("zhifeixie/AudioInteraction", (REPO_ID, None)),
    ("zhifeixie/AudioInteraction-2M@main", ("zhifeixie/AudioInteraction-2M", "main")),
    (f"owner/name.v1@{COMMIT}", ("owner/name.v1", COMMIT)),
    ("owner/name@refs/pr/3", ("owner/name", "refs/pr/3")),
    ("checkpoints", None),        # a bare name is a (missing) directory, never looked up online
    ("./owner/name", None),
    ("/models", None),
    ("a/b/c", None),
    ("owner/na--me", None),       # the Hub's own rules
    ("owner/name.git", None),
    ("owner/name@", None),
    ("owner/name@a@b", None),
    ("owner/my model", None),
])
def test_repo_id_shapes(value, expected):
    source = parse_repo_id(value)
    assert (None if source is None else (source.repo_id, source.revision)) == expected


def test_a_directory_passes_through_without_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a directory must not be looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    assert resolve_checkpoint_source(tmp_path) == tmp_path
    assert resolve_checkpoint_source(str(tmp_path)) == tmp_path
    nested = tmp_path / "owner" / "name"  # shaped like a repo id, but it exists: the directory wins
    nested.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint_source("owner/name") == Path("owner/name")


@pytest.mark.parametrize("value", ["checkpoints", "no such dir", "/no/such/checkpoint", "a/b/c", "owner/na--me"])
def test_neither_a_directory_nor_a_repo_id_is_named_in_the_error(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint_source(value)
    message = str(error.value)
    assert repr(value) in message and "not an existing directory" in message and "owner/name" in message
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint_source(file)
    message = str(error.value)
    assert "is a file, not a checkpoint directory, and not a Hugging Face repo id" in message
    assert "nor a Hugging Face" not in message


def test_config_accepts_a_repo_id_and_names_a_bad_value(tmp_path):
    config = load_config(None, {"AIS_ENGINE__CHECKPOINT": f"{REPO_ID}@main"})
    assert str(config.engine.checkpoint) == f"{REPO_ID}@main" and not config.is_demo
    with pytest.raises(ConfigError) as error:
        load_config(None, {"AIS_ENGINE__CHECKPOINT": "not a checkpoint"})
    assert "'not a checkpoint' is not a directory, nor a Hugging Face repo id" in str(error.value)


def test_cli_run_reports_a_bad_checkpoint_and_exits_2(capsys, tmp_path, monkeypatch):
    from audio_interaction_server import cli

    import numpy as np
    import soundfile

    monkeypatch.chdir(tmp_path)
    soundfile.write("a.wav", np.zeros(1600, dtype=np.int16), 16000)  # a valid input: the checkpoint is at fault
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--checkpoint", "checkpoints", "a.wav"])
    assert exit_info.value.code == 2
    assert "'checkpoints' is not an existing directory" in capsys.readouterr().err


PARTIAL_REPO_ID = "someone/AudioInteraction-partial"
MISSING_REPO_ID = "someone/not-in-the-cache"


@pytest.fixture(scope="module")
def offline_hub(tiny_checkpoint, tmp_path_factory) -> dict:
    """One subprocess, started with HF_HUB_OFFLINE=1 and HF_HOME in tmp, resolves every value below
    (one interpreter start is the slow part): a cached repo by its default branch, branch name and
    commit, a revision not in the cache, a cached snapshot lacking the encoder, an uncached repo."""
    root = tmp_path_factory.mktemp("offline_hub")
    hf_home = root / "hf_home"
    snapshot = fill_hf_cache(hf_home / "hub", REPO_ID, COMMIT, tiny_checkpoint)
    partial = root / "partial"
    shutil.copytree(tiny_checkpoint, partial, ignore=shutil.ignore_patterns("*.pth"))
    fill_hf_cache(hf_home / "hub", PARTIAL_REPO_ID, COMMIT, partial)
    values = [REPO_ID, f"{REPO_ID}@main", f"{REPO_ID}@{COMMIT}", f"{REPO_ID}@v2", PARTIAL_REPO_ID, MISSING_REPO_ID]
    started = time.monotonic()
    result = run_python(RESOLVE, offline_env(hf_home), *values)
    elapsed_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(values), result.stdout
    return {"hf_home": hf_home, "snapshot": snapshot, "elapsed_s": elapsed_s, **dict(zip(values, lines))}


def test_repo_id_offline_with_an_empty_cache_fails_fast_and_says_how_to_fix(offline_hub):
    message = offline_hub[MISSING_REPO_ID]
    assert message.startswith("ERROR ") and MISSING_REPO_ID in message and "HF_HUB_OFFLINE is set" in message
    assert str(offline_hub["hf_home"] / "hub") in message  # where it looked
    assert f"hf download {MISSING_REPO_ID} --local-dir DIR" in message and "HF_HOME" in message
    assert offline_hub["elapsed_s"] < 60  # six look-ups and an interpreter start; no network wait


def test_repo_id_resolves_from_a_prefilled_offline_cache_and_loads(offline_hub):
    from huggingface_hub import scan_cache_dir

    snapshot = offline_hub["snapshot"]
    # huggingface_hub itself recognises the cache we built (it only reads the folders).
    repos = {repo.repo_id: repo for repo in scan_cache_dir(offline_hub["hf_home"] / "hub").repos}
    assert {r.commit_hash for r in repos[REPO_ID].revisions} == {COMMIT} and set(repos[REPO_ID].refs) == {"main"}

    for value in (REPO_ID, f"{REPO_ID}@main", f"{REPO_ID}@{COMMIT}"):
        assert offline_hub[value] == f"OK {snapshot}"
    missing_revision = offline_hub[f"{REPO_ID}@v2"]
    assert missing_revision.startswith("ERROR ") and f"{REPO_ID}@v2" in missing_revision
    assert "--revision v2" in missing_revision

    model = load_model(snapshot, "cpu", "float32")
    assert model.lm.cfg.name == "audio-interaction-tiny" and model.files.root == snapshot


def test_partial_cached_snapshot_is_reported_as_not_in_the_release_layout(offline_hub):
    message = offline_hub[PARTIAL_REPO_ID]
    assert message.startswith("ERROR ") and "not in the release layout" in message
    assert "audiointeraction_ChunkwisedEncoder.pth" in message and "HF_HUB_OFFLINE" in message


def test_server_loader_resolves_the_repo_id_and_reports_the_offline_error(tmp_path, monkeypatch):
    """What ``python -m audio_interaction_server --checkpoint owner/name`` does after start-up, without a subprocess:
    the loader thread's error becomes the fatal reason (printed, exit status 1) and /ready's reason."""
    import asyncio

    from huggingface_hub import constants

    from audio_interaction_server.api.app import create_app

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fatal: list[str] = []
    config = load_config(None, {"AIS_ENGINE__CHECKPOINT": REPO_ID, "AIS_ENGINE__DEVICE": "cpu"})
    runtime = create_app(config, on_fatal=fatal.append).state.runtime
    asyncio.run(runtime.load())
    assert len(fatal) == 1 and fatal[0].startswith("CheckpointError: HF_HUB_OFFLINE is set") and REPO_ID in fatal[0]
    assert str(tmp_path / "hub") in fatal[0] and runtime.not_ready_reason().startswith("model failed to load")


class _FakeHub(http.server.BaseHTTPRequestHandler):
    error_code = "RepoNotFound"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.dumps({"error": "not here"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def loopback_only(monkeypatch):
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in LOOPBACK_HOSTS:
            raise RuntimeError(f"test forbids network access: lookup of {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("answer, expected", [
    ("RepoNotFound", "has no repo 'zhifeixie/AudioInteraction' that this token can read"),
    ("RevisionNotFound", "has no revision 'v9'"),
    (None, "could not be reached"),
])
def test_hub_errors_name_the_repo_and_the_cause(answer, expected, tmp_path, monkeypatch, loopback_only):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if answer is None:  # a port nobody listens on: connection refused
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = None
    else:
        handler = type("Hub", (_FakeHub,), {"error_code": answer})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        port = server.server_address[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        started = time.monotonic()
        with pytest.raises(CheckpointError) as error:
            resolve_checkpoint_source(f"{REPO_ID}@v9", cache_dir=tmp_path / "cache")
        assert time.monotonic() - started < 30
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    message = str(error.value)
    assert expected in message and f"{REPO_ID}" in message
    if answer is None:
        assert str(tmp_path / "cache") in message and "--revision v9" in message
