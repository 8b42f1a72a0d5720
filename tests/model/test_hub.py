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
import logging
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
    assert "is a file, not a checkpoint directory: pass the directory that holds it" in message
    assert "nor a Hugging Face" not in message


def test_an_existing_file_shaped_like_a_repo_id_is_never_fetched(tmp_path, monkeypatch):
    """`--checkpoint ck1/model_config.yaml` (a checkpoint's own file, named instead of its folder) is shaped like a
    repo id: it went to the Hub, and after a network timeout the error said no such directory exists and proposed
    `hf download ck1/model_config.yaml` (first-hour review, round seven). An existing file is said to be one,
    naming its folder when that is a checkpoint, with no network, in `run`, in `serve` and in the configuration."""
    from audio_interaction_server.__main__ import checkpoint_flag_error

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck1").mkdir()
    (tmp_path / "ck1" / "model_config.yaml").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("audio_interaction_server.model.hub._fetch", lambda *args: pytest.fail("fetched"))
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint_source("ck1/model_config.yaml")
    assert str(error.value).startswith("checkpoint 'ck1/model_config.yaml' is a file, not a checkpoint directory: "
                                       "pass the directory that holds it ('ck1')"), error.value
    assert "is a file" in checkpoint_flag_error(Path("ck1/model_config.yaml"))
    with pytest.raises(ValueError, match="engine.checkpoint 'ck1/model_config.yaml' is a file"):
        load_config(None, {"AIS_ENGINE__CHECKPOINT": "ck1/model_config.yaml"})


def test_config_accepts_a_repo_id_and_names_a_bad_value(tmp_path):
    config = load_config(None, {"AIS_ENGINE__CHECKPOINT": f"{REPO_ID}@main"})
    assert str(config.engine.checkpoint) == f"{REPO_ID}@main" and not config.is_demo
    with pytest.raises(ConfigError) as error:
        load_config(None, {"AIS_ENGINE__CHECKPOINT": "not a checkpoint"})
    assert "'not a checkpoint' is not an existing directory and not a Hugging Face repo id" in str(error.value)


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
        from benchmarks.harness import free_port

        port = free_port()
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


# ---- a download from a local hub: progress in the log and in /ready ---------------------------------------

class _LocalHub(http.server.BaseHTTPRequestHandler):
    """The few routes of the Hub that ``snapshot_download`` calls, serving ``files`` (a checkpoint directory)
    as the repo ``REPO_ID`` at commit ``COMMIT``. ``hold`` (a threading.Event, or None) stops the download of
    each ``*.safetensors`` file half way until it is set, so a test can look at a download under way."""

    files: Path
    hold: threading.Event | None = None
    protocol_version = "HTTP/1.1"

    def _release_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.files)) for p in self.files.rglob("*") if p.is_file())

    def _json(self, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file_headers(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"')
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def _resolve(self) -> Path | None:
        prefix = f"/{REPO_ID}/resolve/"
        if not self.path.startswith(prefix):
            return None
        _, _, relative = self.path[len(prefix):].partition("/")
        path = self.files / relative
        return path if path.is_file() else None

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        path = self._resolve()
        if path is None:
            self.send_error(404)
            return
        self._file_headers(path)

    def do_GET(self) -> None:  # noqa: N802
        route = self.path.split("?")[0]
        if route.startswith(f"/api/models/{REPO_ID}/revision/"):
            self._json({"id": REPO_ID, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self._release_files()]})
        elif route.startswith(f"/api/models/{REPO_ID}/tree/"):
            self._json([{"type": "file", "path": f, "size": (self.files / f).stat().st_size,
                         "oid": hashlib.sha1((self.files / f).read_bytes()).hexdigest()}
                        for f in self._release_files()])
        elif (path := self._resolve()) is not None:
            self._file_headers(path)
            body = path.read_bytes()
            half = len(body) // 2 if self.hold is not None and path.suffix == ".safetensors" else len(body)
            self.wfile.write(body[:half])
            self.wfile.flush()
            if half < len(body):
                assert self.hold is not None
                self.hold.wait(60)
                self.wfile.write(body[half:])
        else:
            self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_hub(tiny_checkpoint, monkeypatch, loopback_only):
    """huggingface_hub pointed at a ``_LocalHub`` serving the tiny checkpoint; yields the handler class
    (set ``hold`` on it to pause downloads half way)."""
    from huggingface_hub import constants

    handler = type("Hub", (_LocalHub,), {"files": tiny_checkpoint, "hold": None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield handler
    if handler.hold is not None:
        handler.hold.set()
    server.shutdown()
    server.server_close()


def test_a_download_reports_its_bytes_rate_and_time_left(local_hub, tiny_checkpoint, tmp_path, caplog):
    from audio_interaction_server.model.progress import LoadProgress

    progress = LoadProgress(log_interval_s=0)  # a line for every update: the throttle is tested on its own
    with caplog.at_level(logging.INFO, logger="audio_interaction_server.model.progress"):
        root = resolve_checkpoint_source(REPO_ID, cache_dir=tmp_path / "cache", progress=progress)
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in tiny_checkpoint.iterdir())
    release_bytes = sum(p.stat().st_size for p in tiny_checkpoint.rglob("*") if p.is_file())
    report = progress.report()
    assert report.is_finished and report.phase == "downloading" and report.unit == "bytes"
    assert report.done == report.total == release_bytes
    lines = [record.getMessage() for record in caplog.records if record.name.endswith(".progress")]
    assert lines[0] == f"downloading {REPO_ID} started" and lines[-1].startswith("downloading: done, ")
    during = [line for line in lines[1:-1] if "/s" in line and "left" in line]
    assert during, lines
    assert all(" of " in line and "%" in line for line in during)


def test_ready_shows_the_download_under_way_then_the_server_serves_it(local_hub, tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    """``/ready`` while the first ``--checkpoint owner/name`` downloads: 503, the reason, and how far it is."""
    from huggingface_hub import constants

    from audio_interaction_server.config import ServerConfig
    from benchmarks.harness import LiveServer

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    local_hub.hold = threading.Event()  # each shard stops half way until the test has looked
    config = ServerConfig.model_validate(dict(port=0, log_level="warning",
                                              engine={"checkpoint": REPO_ID, "device": "cpu", "max_sessions": 1}))
    release_bytes = sum(p.stat().st_size for p in tiny_checkpoint.rglob("*") if p.is_file())
    server = LiveServer(config).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while True:  # until every file's download has begun (the total is known) and the shards are held
            status, body = server.get("/ready")
            answer = json.loads(body)
            if answer.get("progress", {}).get("bytes_total") == release_bytes:
                break
            assert status == 503 and time.monotonic() < deadline, answer
            time.sleep(0.02)
        assert status == 503 and answer["status"] == "not_ready" and answer["reason"] == "downloading the model"
        progress = answer["progress"]
        assert progress["phase"] == "downloading" and 0 < progress["bytes_done"] < progress["bytes_total"]
        assert progress["rate_bytes_per_s"] > 0 and progress["eta_s"] >= 0
        local_hub.hold.set()
        while (status := server.get("/ready")[0]) != 200:
            assert time.monotonic() < deadline and not server.fatal, server.fatal
            time.sleep(0.05)
        assert "progress" not in json.loads(server.get("/ready")[1])
        assert server.runtime.model.files.root.parent.parent.name == "models--zhifeixie--AudioInteraction"
    finally:
        server.stop()


def test_the_load_counts_its_weight_files(tiny_checkpoint, caplog):
    from audio_interaction_server.model.progress import LoadProgress

    progress = LoadProgress(log_interval_s=0)
    with caplog.at_level(logging.INFO, logger="audio_interaction_server.model.progress"):
        load_model(tiny_checkpoint, "cpu", "float32", progress)
    shards = len(set(json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"].values()))
    report = progress.report()
    assert report.phase == "loading" and report.is_finished and report.done == report.total == shards + 1
    assert report.as_json() == {"phase": "loading", "shards_done": shards + 1, "shards_total": shards + 1,
                                "rate_shards_per_s": round(report.rate_per_s, 1), "eta_s": None}
    lines = [r.getMessage() for r in caplog.records if r.name.endswith(".progress")]
    files = shards + 1
    assert lines[0].startswith("loading the weights from") and lines[1].startswith(f"loading: 1 of {files} shards")
    assert "shards/s" in lines[1] and lines[-1].startswith(f"loading: done, {files} of {files} shards (100%) in ")


def test_progress_logs_at_most_a_line_per_interval():
    from audio_interaction_server.model.progress import LoadProgress

    now = [0.0]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test_progress_throttle")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    progress = LoadProgress(log_interval_s=5.0, clock=lambda: now[0], logger=logger)
    progress.begin("downloading", "bytes", total=15e9, what="owner/name")
    for _ in range(375):  # 40 MB every 0.125 s (exact in binary: the clock does not drift) for 46.875 s
        now[0] += 0.125
        progress.advance(40e6)
    progress.finish()
    assert records[0] == "downloading owner/name started (15.00 GB)"
    assert len(records) == 1 + 9 + 1  # begin, one line per 5 s, end
    assert records[1] == "downloading: 1.60 GB of 15.00 GB (11%), 320.00 MB/s, about 42 s left"
    assert records[9] == "downloading: 14.40 GB of 15.00 GB (96%), 320.00 MB/s, about 2 s left"
    assert records[-1] == "downloading: done, 15.00 GB of 15.00 GB (100%) in 47 s"
    report = progress.report()
    assert report.as_json()["bytes_done"] == 15_000_000_000
