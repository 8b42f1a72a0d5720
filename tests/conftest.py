"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from audio_interaction_server.demo.qwen_vocab import VocabUnavailable, write_tokenizer_files


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the real Qwen tokenizer.json and tokenizer_config.json.

    Built from dashscope's qwen.tiktoken on first use and cached across runs;
    tests that need it skip when the ranks cannot be fetched (e.g. offline).
    """
    out_dir = tmp_path_factory.mktemp("qwen_tokenizer")
    try:
        write_tokenizer_files(out_dir)
    except VocabUnavailable as error:
        pytest.skip(f"Qwen vocabulary unavailable (no cache, no network?): {error}")
    return out_dir


SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    if not SHARED_AUDIO.is_dir():
        pytest.skip(f"real test audio not found at {SHARED_AUDIO}")
    return SHARED_AUDIO


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:
    """A seeded tiny random checkpoint in the exact release layout (written once per test run)."""
    from audio_interaction_server.demo.make_tiny_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    from audio_interaction_server.model.checkpoint import load_model

    return load_model(tiny_checkpoint, "cpu", "float32")


@pytest.fixture(scope="session")
def stream_chunks(shared_audio: Path) -> list:
    """Streaming mel chunks (N, 128, 40) of six real recordings, one tensor per recording."""
    import torch

    from audio_interaction_server.audio.frontend import StreamingLogMel, load_audio_file

    names = ["01_count_bark/sample01_01.mp3", "02_translate/sample02_02.wav", "03_cough_music/sample03_01.wav",
             "02_translate/sample02_01.mp3", "03_cough_music/sample03_03.wav", "01_count_bark/sample01_02.wav"]
    streams = []
    for name in names:
        front_end = StreamingLogMel()
        chunks = front_end.push(load_audio_file(shared_audio / name)) + front_end.flush()
        streams.append(torch.stack(chunks[:12]))  # bounded so the suite stays fast
    return streams


def spawn_server(checkpoint: Path, extra_env: dict[str, str] | None = None):
    """``python -m audio_interaction_server`` as a real subprocess on a free port; returns (process, port) once
    /ready is 200."""
    import os
    import re
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    env = {**os.environ, "AIS_LOG_LEVEL": "info", "AIS_ENGINE__DEVICE": "cpu", **(extra_env or {})}
    process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--port", "0",
                                "--checkpoint", str(checkpoint)],
                               env=env, stderr=subprocess.PIPE, text=True)
    port = None
    for line in process.stderr:  # uvicorn logs the port it bound, the model load follows
        found = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else port
        if port and "loaded audio-interaction-tiny" in line:
            break
    assert port, "the server never reported its port"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                return process, port
        except urllib.error.HTTPError:  # 503 for the moment between load and worker start
            assert time.monotonic() < deadline
            time.sleep(0.05)
