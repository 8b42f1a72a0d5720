"""The listen/speak state machine in token ids (no model)."""

from __future__ import annotations

import pytest

from server import tokens as T
from server.conversation import ContextFull, Conversation, Phase
from server.engine_events import ContextRollover, Decision, TurnBegin, TurnEnd, TurnToken

PREFIX = T.prompt_prefix([1000 + i for i in range(41)])  # 46 tokens, as with the real prompt


def listen(conv: Conversation, decision: int):
    row = conv.plan()
    return row, conv.commit(row, decision)


def test_first_row_is_prefix_plus_block_with_audio_span():
    conv = Conversation(PREFIX, max_turn_tokens=8, max_positions=4096)
    conv.add_audio("chunk0")
    row = conv.plan()
    assert len(PREFIX) == 46 and len(row.tokens) == 58 and row.start_position == 0
    assert row.tokens[:46] == PREFIX and row.tokens[46] == T.AUDIO_BEGIN and row.tokens[-1] == T.ASSISTANT
    ((lo, hi),) = row.audio_spans
    assert row.tokens[lo:hi] == [T.PAD] * 10 and row.audio == ("chunk0",)


def test_plan_does_not_change_state():
    conv = Conversation(PREFIX, 8, 4096)
    conv.add_audio("a")
    assert conv.plan() == conv.plan()
    assert conv.next_position == 0 and len(conv.audio_queue) == 1


def test_keep_silence_leads_the_next_13_token_block():
    conv = Conversation(PREFIX, 8, 4096)
    conv.add_audio("a")
    conv.add_audio("b")
    _, events = listen(conv, T.KEEP_SILENCE)
    assert events == [Decision(0, T.KEEP_SILENCE)]
    row = conv.plan()
    assert row.start_position == 58 and len(row.tokens) == 13
    assert row.tokens[0] == T.KEEP_SILENCE and row.audio == ("b",) and row.audio_spans == ((2, 12),)


def test_reply_then_back_to_listening_with_text_end_first():
    conv = Conversation(PREFIX, 8, 4096)
    for name in "abc":
        conv.add_audio(name)
    _, events = listen(conv, T.TEXT_BEGIN)
    assert events == [Decision(0, T.TEXT_BEGIN), TurnBegin(0, 0)]
    assert conv.phase is Phase.SPEAKING and conv.is_ready
    generated = [151617, 40, 41]
    for token in generated:
        row = conv.plan()
        assert row.audio == () and len(row.tokens) == 1
        assert conv.commit(row, token) == [TurnToken(0, token)]
    row = conv.plan()
    assert row.tokens == [41]
    assert conv.commit(row, T.TEXT_END) == [TurnEnd(0, tuple(generated), "text_end")]
    row = conv.plan()
    # Audio that arrived during the reply is consumed in order, right after the trigger chunk.
    assert row.tokens[0] == T.TEXT_END and row.audio == ("b",)
    assert row.start_position == 58 + 1 + 3


def test_turn_cap_forces_text_end():
    conv = Conversation(PREFIX, max_turn_tokens=2, max_positions=4096)
    conv.add_audio("a")
    conv.add_audio("b")
    listen(conv, T.TEXT_BEGIN)
    conv.commit(conv.plan(), 151618)
    events = conv.commit(conv.plan(), 55)
    assert events == [TurnToken(0, 55), TurnEnd(0, (151618, 55), "max_tokens")]
    assert conv.phase is Phase.LISTENING and conv.plan().tokens[0] == T.TEXT_END


def test_cancel_ends_the_reply_and_is_a_noop_while_listening():
    conv = Conversation(PREFIX, 8, 4096)
    assert conv.cancel() == []
    conv.add_audio("a")
    listen(conv, T.TEXT_BEGIN)
    conv.commit(conv.plan(), 151614)
    assert conv.cancel() == [TurnEnd(0, (151614,), "cancelled")]
    assert conv.phase is Phase.LISTENING and not conv.is_ready
    assert conv.num_turns == 1


def test_listening_without_audio_is_not_ready():
    conv = Conversation(PREFIX, 8, 4096)
    assert not conv.is_ready
    with pytest.raises(RuntimeError):
        conv.plan()


def test_non_protocol_decision_is_rejected():
    conv = Conversation(PREFIX, 8, 4096)
    conv.add_audio("a")
    with pytest.raises(ValueError):
        listen(conv, 42)


def test_context_budget_is_enforced_before_feeding():
    conv = Conversation(PREFIX, 1, max_positions=58 + 13 + 13)
    for name in "abcd":
        conv.add_audio(name)
    for _ in range(3):
        listen(conv, T.KEEP_SILENCE)
    with pytest.raises(ContextFull):
        conv.plan()


def test_rollover_rebuilds_prefix_plus_recent_blocks_at_a_safe_point():
    conv = Conversation(PREFIX, max_turn_tokens=4, max_positions=200, rollover_window=60)
    assert conv.rollover_at == 200 - 4 - 26
    script = iter([T.KEEP_SILENCE, T.TEXT_BEGIN, 151618, 77, T.TEXT_END] + [T.KEEP_SILENCE] * 40)
    rolled = None
    for chunk in range(12):
        conv.add_audio(f"c{chunk}")
    while conv.is_ready:
        row = conv.plan()
        assert row.start_position + len(row.tokens) <= 200
        if row.rolls_over:
            assert conv.phase is Phase.LISTENING
            rolled = row
        events = conv.commit(row, next(script))
        if row.rolls_over:
            assert isinstance(events[0], ContextRollover) and events[0].to_positions == len(row.tokens)
            break
    assert rolled is not None and rolled.start_position == 0 and conv.next_position == len(rolled.tokens)
    tokens = rolled.tokens
    assert tokens[:46] == PREFIX and tokens[46] == T.AUDIO_BEGIN  # oldest kept block lost its lead token
    for (lo, hi), chunk in zip(rolled.audio_spans, rolled.audio):
        assert tokens[lo - 1] == T.AUDIO_BEGIN and tokens[lo:hi] == [T.PAD] * 10 and tokens[hi] == T.ASSISTANT
    kept = [int(c[1:]) for c in rolled.audio]
    assert kept == list(range(kept[0], kept[-1] + 1)) and kept[-1] == conv.num_chunks_consumed - 1
    assert len(tokens) - 46 - 13 <= 60  # the kept history fits the window
    assert conv.history_tokens <= 60 + 13


def test_rollover_window_that_cannot_fit_is_rejected():
    with pytest.raises(ValueError, match="too large for context rollover.* largest possible here is 425"):
        Conversation(PREFIX, max_turn_tokens=512, max_positions=1024, rollover_window=500)
    with pytest.raises(ValueError, match="does not fit the 300-position context budget"):
        Conversation(PREFIX, max_turn_tokens=400, max_positions=300, rollover_window=None)
