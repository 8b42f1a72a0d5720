"""Token-level engine events -> wire events: emotion names, UTF-8-safe deltas, control ids filtered."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from audio_interaction_server import spec as T
from audio_interaction_server.engine.events import (
    ContextRollover, Decision, SessionStarted, TurnBegin, TurnEnd, TurnToken,
)
from audio_interaction_server.render.replies import ReplyRenderer


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


def render_turn(renderer: ReplyRenderer, token_ids: list[int], reason="text_end"):
    events = renderer.render(TurnBegin(0, 3))
    for token in token_ids:
        events += renderer.render(TurnToken(0, token))
    return events + renderer.render(TurnEnd(0, tuple(token_ids), reason))


def test_decision_event_carries_chunk_time(tokenizer):
    (event,) = ReplyRenderer(tokenizer, "abc").render(Decision(4, T.TEXT_BEGIN))
    assert (event.type, event.chunk, event.decision, event.audio_time_s, event.session_id) == \
        ("decision", 4, "text_begin", 2.0, "abc")
    assert ReplyRenderer(tokenizer).render(SessionStarted(0, 46)) == []


def test_emotion_then_chinese_and_emoji_text(tokenizer):
    text = "你好，世界！👋🏽 今天天气怎么样？🎉"
    ids = tokenizer.encode(text).ids
    events = render_turn(ReplyRenderer(tokenizer), [151614] + ids)
    assert events[0].type == "turn_begin" and events[0].audio_time_s == 1.6
    assert events[1].type == "emotion" and events[1].emotion == "happy"
    deltas = [e.text for e in events if e.type == "text_delta"]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    end = events[-1]
    assert end.type == "turn_end" and end.text == text and end.token_ids == [151614] + ids
    assert end.num_tokens == len(ids) + 1


def test_control_ids_never_reach_text(tokenizer):
    ids = tokenizer.encode("hello there").ids
    generated = [ids[0], T.KEEP_SILENCE, 151617, T.USER, ids[1], T.AUDIO_BEGIN]
    events = render_turn(ReplyRenderer(tokenizer), generated, reason="max_tokens")
    assert not [e for e in events if e.type == "emotion"]  # an emotion id mid-reply is not a tag
    assert events[-1].text == "hello there" and events[-1].end_reason == "max_tokens"
    for forbidden in ("㉫", "ㄍ", "㈼"):
        assert all(forbidden not in getattr(e, "text", "") for e in events)


def test_context_rollover_has_a_wire_form(tiny_model):
    (event,) = ReplyRenderer(tiny_model.tokenizer, "s").render(ContextRollover(3990, 2101, 117))
    assert event.model_dump(exclude_none=True) == {
        "session_id": "s", "type": "context_rollover", "from_positions": 3990, "to_positions": 2101,
        "kept_chunks": 117}
