"""Streaming detokenization equals offline decoding, never prints half a character or a control id."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models

from audio_interaction_server.render.detokenizer import StreamingDetokenizer, byte_level_chars, incomplete_tail_start
from audio_interaction_server.spec import TEXT_BEGIN, TEXT_END, is_control_token

CHINESE = "你好，世界！今天天气怎么样？我们去公园散步吧，顺便买一杯咖啡。"
EMOJI = "👋🏽 hi 🎉 🇺🇸👨‍👩‍👧 ok 😀😀"
MULTILINGUAL = [
    CHINESE,
    EMOJI,
    "Hello, world! It's 3.14.",
    "こんにちは、元気ですか？",
    "안녕하세요 Привет, мир! مرحبا",
    "Straße — naïve café…",
]
CONTROL_IDS = [*range(151601, 151620), TEXT_END, TEXT_BEGIN]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """256 single-byte tokens, no merges: any byte string is an id sequence; needs no download."""
    vocab = {char: byte for byte, char in enumerate(byte_level_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str, StreamingDetokenizer]:
    detokenizer = StreamingDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in ids]
    tail = detokenizer.finish()
    return deltas, tail, detokenizer


def offline(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([token_id for token_id in ids if not is_control_token(token_id)])


@pytest.mark.parametrize("text", [CHINESE, EMOJI], ids=["chinese", "emoji"])
def test_streaming_equals_offline_without_replacement_chars(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    deltas, tail, detokenizer = stream(tokenizer, ids)
    assert "".join(deltas) + tail == text == tokenizer.decode(ids)
    assert tail == ""
    assert not any("\ufffd" in delta for delta in deltas)
    assert detokenizer.text == text
    assert list(detokenizer.token_ids) == ids


def test_characters_split_across_tokens_are_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(EMOJI).ids
    partial = [tokenizer.decode([token_id]) for token_id in ids]
    assert any("\ufffd" in piece for piece in partial), "probe text no longer splits a character"
    deltas, _, _ = stream(tokenizer, ids)
    assert "" in deltas


def test_control_ids_are_recorded_but_never_rendered(tokenizer: Tokenizer) -> None:
    text_ids = tokenizer.encode(CHINESE + " " + EMOJI).ids
    ids: list[int] = []
    for i, token_id in enumerate(text_ids):
        ids.append(CONTROL_IDS[i % len(CONTROL_IDS)])
        ids.append(token_id)
    deltas, tail, detokenizer = stream(tokenizer, ids)
    assert "".join(deltas) + tail == CHINESE + " " + EMOJI
    assert "㉫" not in detokenizer.text and "ㄍ" not in detokenizer.text
    assert list(detokenizer.token_ids) == ids


def test_control_id_alone_yields_nothing(tokenizer: Tokenizer) -> None:
    detokenizer = StreamingDetokenizer(tokenizer)
    assert [detokenizer.push(token_id) for token_id in CONTROL_IDS] == [""] * len(CONTROL_IDS)
    assert detokenizer.finish() == "" and detokenizer.text == ""


def test_long_reply_keeps_bounded_state(tokenizer: Tokenizer) -> None:
    text = " ".join(MULTILINGUAL) * 60
    ids = tokenizer.encode(text).ids
    assert len(ids) > 3000
    detokenizer = StreamingDetokenizer(tokenizer)
    deltas = []
    for token_id in ids:
        deltas.append(detokenizer.push(token_id))
        assert len(detokenizer.pending_bytes) <= 3  # per-token work is O(token + 3 bytes)
    assert "".join(deltas) + detokenizer.finish() == text


def test_dangling_incomplete_character_renders_as_one_replacement(tokenizer: Tokenizer) -> None:
    first_byte_of_emoji = tokenizer.token_to_id(byte_level_chars()[0xF0])
    ids = [*tokenizer.encode("ok ").ids, first_byte_of_emoji]
    deltas, tail, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "ok "
    assert tail == "\ufffd"
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_push_after_finish_is_an_error(tokenizer: Tokenizer) -> None:
    detokenizer = StreamingDetokenizer(tokenizer)
    detokenizer.finish()
    with pytest.raises(RuntimeError):
        detokenizer.push(0)


@pytest.fixture(scope="module")
def id_pool(tokenizer: Tokenizer) -> list[int]:
    pool = {token_id for text in MULTILINGUAL for token_id in tokenizer.encode(text).ids}
    return sorted(pool)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_id_sequences_stream_like_offline(
    tokenizer: Tokenizer, id_pool: list[int], data: st.DataObject
) -> None:
    # Random orders of real tokens also produce invalid and truncated UTF-8.
    ids = data.draw(st.lists(st.sampled_from(id_pool + CONTROL_IDS), max_size=60))
    deltas, tail, detokenizer = stream(tokenizer, ids)
    assert "".join(deltas) + tail == offline(tokenizer, ids)
    assert detokenizer.text == offline(tokenizer, ids)


# --- offline: raw byte streams against the Rust decoder ----------------------------------


# Bytes at the edges of the UTF-8 validity table, so that short draws hit the interesting cases.
EDGE_BYTES = st.sampled_from(b"\x41\x80\x8f\x90\x9f\xa0\xbf\xc0\xc2\xdf\xe0\xe4\xed\xef\xf0\xf4\xf5\xff")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=40) | st.lists(EDGE_BYTES, max_size=20).map(bytes))
def test_any_byte_stream_decodes_like_tokenizers(byte_tokenizer: Tokenizer, data: bytes) -> None:
    ids = list(data)
    deltas, tail, _ = stream(byte_tokenizer, ids)
    assert "".join(deltas) + tail == byte_tokenizer.decode(ids) == data.decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"abc", 3),
        (b"a\xe4", 1),  # lead byte of a 3-byte character
        (b"a\xe4\xb8", 1),
        (b"a\xe4\xb8\xad", 4),  # complete
        (b"\xf0\x9f\x98", 0),  # 3 of 4 bytes
        (b"\xe0\x80", 2),  # E0 needs A0-BF next: already invalid
        (b"\xed\xa0", 2),  # would be a surrogate: invalid
        (b"\xf4\x90", 2),  # above U+10FFFF: invalid
        (b"\xc0", 1),  # never valid
        (b"\x80\x80\x80", 3),  # stray continuations
    ],
)
def test_incomplete_tail_start(data: bytes, expected: int) -> None:
    assert incomplete_tail_start(data) == expected


def test_rejects_tokenizers_without_byte_level_decoder() -> None:
    tokenizer = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tokenizer.decoder = decoders.Metaspace()
    with pytest.raises(TypeError):
        StreamingDetokenizer(tokenizer)
