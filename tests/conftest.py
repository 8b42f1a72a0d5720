"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.tools.qwen_vocab import VocabUnavailable, write_tokenizer_files


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
