"""Shared fixtures."""

from __future__ import annotations

import os

# One intra-op thread for torch in every test process and every server, engine and CLI they start (inherited
# through the environment; set before anything imports torch): the suite runs three workers on CI's two cores, on
# a tiny model whose tensors gain nothing from a second thread, and two threads each made them wait on one
# another. The full suite: 717 s with torch's default against 628 s with one thread, the 2-core VM, one run
# each, nothing else running.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest
from hypothesis import settings

from audio_interaction_server.demo.qwen_vocab import VocabUnavailable, write_tokenizer_files
# spawn_server is re-exported: live tests import it from here or from benchmarks.harness, one definition.
from benchmarks.harness import shared_audio_dir, spawn_server  # noqa: F401

# The property tests draw the same examples on every run: a fresh clone's CI must not fail on an example no
# earlier run drew (a static step that differed from the eager one by 1.2e-5 against 1e-5 allowed, drawn once
# in a few hundred runs). Searching wider is a deliberate run: pytest --hypothesis-profile=explore.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")


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


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    audio_dir = shared_audio_dir()
    if not audio_dir.is_dir():
        pytest.skip(f"real test audio not found at {audio_dir}")
    return audio_dir


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

    from audio_interaction_server.audio.files import load_audio_file
    from audio_interaction_server.audio.mel import StreamingLogMel

    names = ["01_count_bark/sample01_01.mp3", "02_translate/sample02_02.wav", "03_cough_music/sample03_01.wav",
             "02_translate/sample02_01.mp3", "03_cough_music/sample03_03.wav", "01_count_bark/sample01_02.wav"]
    streams = []
    for name in names:
        front_end = StreamingLogMel()
        chunks = front_end.push(load_audio_file(shared_audio / name)) + front_end.flush()
        streams.append(torch.stack(chunks[:12]))  # bounded so the suite stays fast
    return streams
