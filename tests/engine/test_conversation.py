"""The listen/speak state machine in token ids (no model)."""

from __future__ import annotations

import pytest

from audio_interaction_server import spec as T
from audio_interaction_server.engine.conversation import ContextFull, Conversation, Phase
from audio_interaction_server.engine.events import ContextRollover, Decision, TurnBegin, TurnEnd, TurnToken

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


def test_capped_turn_feeds_its_last_token_then_text_end():
    """The reference feeds the cap-th token like any reply token, discards that step's prediction and
    takes TEXT_END: the context holds every token the client was shown, then TEXT_END, then the next block."""
    conv = Conversation(PREFIX, max_turn_tokens=2, max_positions=4096)
    conv.add_audio("a")
    conv.add_audio("b")
    fed = []

    def step(token):
        row = conv.plan()
        fed.extend(row.tokens)
        return row, conv.commit(row, token)

    step(T.TEXT_BEGIN)
    assert step(151618)[1] == [TurnToken(0, 151618)]
    row, events = step(55)
    assert events == [TurnToken(0, 55)], "the turn must not end before the cap-th token is fed"
    assert conv.phase is Phase.SPEAKING and conv.is_ready
    row = conv.plan()
    assert row.tokens == [55] and row.discards_prediction and not row.is_decision
    # Whatever the model predicts after the cap-th token is discarded.
    row, events = step(77)
    assert events == [TurnEnd(0, (151618, 55), "max_tokens")]
    assert conv.phase is Phase.LISTENING
    row = conv.plan()
    fed.extend(row.tokens)
    block = T.listening_block()
    assert fed == PREFIX + block + [T.TEXT_BEGIN, 151618, 55, T.TEXT_END] + block
    assert row.start_position == len(fed) - len(row.tokens)


def test_text_end_predicted_after_the_cap_token_is_a_natural_end():
    conv = Conversation(PREFIX, max_turn_tokens=1, max_positions=4096)
    conv.add_audio("a")
    listen(conv, T.TEXT_BEGIN)
    assert conv.commit(conv.plan(), 151614) == [TurnToken(0, 151614)]
    assert conv.commit(conv.plan(), T.TEXT_END) == [TurnEnd(0, (151614,), "text_end")]


def test_plan_stays_retry_safe_at_the_cap():
    conv = Conversation(PREFIX, max_turn_tokens=1, max_positions=4096)
    conv.add_audio("a")
    listen(conv, T.TEXT_BEGIN)
    conv.commit(conv.plan(), 151614)
    assert conv.plan() == conv.plan() and conv.turn_length == 1


def test_cancel_ends_the_reply_and_is_a_noop_while_listening():
    conv = Conversation(PREFIX, 8, 4096)
    assert conv.cancel() == []
    conv.add_audio("a")
    listen(conv, T.TEXT_BEGIN)
    conv.commit(conv.plan(), 151614)
    assert conv.cancel() == [TurnEnd(0, (151614,), "cancelled")]
    assert conv.phase is Phase.LISTENING and not conv.is_ready
    assert conv.num_turns == 1


def test_a_cancelled_reply_keeps_every_token_shown_in_the_context():
    """The client saw the reply up to its last token: that token is fed, then TEXT_END, with the next block."""
    conv = Conversation(PREFIX, max_turn_tokens=8, max_positions=4096)
    conv.add_audio("a")
    conv.add_audio("b")
    fed = []
    for token in (T.TEXT_BEGIN, 151614, 40):
        row = conv.plan()
        fed.extend(row.tokens)
        conv.commit(row, token)
    assert conv.cancel() == [TurnEnd(0, (151614, 40), "cancelled")]
    row = conv.plan()
    assert row.tokens == [40, T.TEXT_END] + T.listening_block() and row.audio == ("b",)
    ((lo, hi),) = row.audio_spans
    assert row.tokens[lo - 1] == T.AUDIO_BEGIN and row.tokens[lo:hi] == [T.PAD] * 10
    fed.extend(row.tokens)
    assert fed == PREFIX + T.listening_block() + [T.TEXT_BEGIN, 151614, 40, T.TEXT_END] + T.listening_block()
    assert row.start_position == len(fed) - len(row.tokens)


def test_rollovers_around_a_cancelled_reply_keep_its_last_token():
    """The row that carries a cancelled reply's last token is itself a rollover, and the next rollover
    rebuilds that reply from the kept history: both times the token the client saw is there."""
    conv = Conversation(PREFIX, max_turn_tokens=4, max_positions=240, rollover_window=100)
    for chunk in range(40):
        conv.add_audio(f"c{chunk}")
    while conv.next_position + 2 * 13 <= conv.rollover_at:
        conv.commit(conv.plan(), T.KEEP_SILENCE)
    conv.commit(conv.plan(), T.TEXT_BEGIN)
    conv.commit(conv.plan(), 151618)
    conv.cancel()
    for _ in range(2):
        while not (row := conv.plan()).rolls_over:
            conv.commit(row, T.KEEP_SILENCE)
        at = row.tokens.index(151618)
        assert row.tokens[at - 1:at + 3] == [T.TEXT_BEGIN, 151618, T.TEXT_END, T.AUDIO_BEGIN]
        for (lo, hi), chunk in zip(row.audio_spans, row.audio):
            assert row.tokens[lo - 1] == T.AUDIO_BEGIN and row.tokens[lo:hi] == [T.PAD] * 10
        assert isinstance(conv.commit(row, T.KEEP_SILENCE)[0], ContextRollover)


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


def listen_through_rollovers(conv: Conversation, count: int) -> list:
    """Keep listening (KEEP_SILENCE at every chunk) until ``count`` rollover rows have been fed; those rows."""
    rollovers = []
    while len(rollovers) < count:
        row = conv.plan()
        if row.rolls_over:
            rollovers.append(row)
        conv.commit(row, T.KEEP_SILENCE)
    return rollovers


@pytest.mark.parametrize("window, cancels", [(0, False), (5, True)])
def test_a_rollover_that_keeps_no_history_starts_its_block_right_after_the_prefix(window, cancels):
    """A window smaller than the last block and its reply keeps no history: the rebuilt context is the prefix and
    the new block, which follows it as a session's first block does (AUDIO_BEGIN first). Its lead token (and a cut
    reply's last token) went with the forgotten history; they were put right after the prefix, a layout no
    session starts with. The next rollover keeps that block whole: it has no lead to strip."""
    conv = Conversation(PREFIX, max_turn_tokens=4, max_positions=200, rollover_window=window)
    for chunk in range(40):
        conv.add_audio(f"c{chunk}")
    while conv.next_position + 3 * 13 <= conv.rollover_at:
        conv.commit(conv.plan(), T.KEEP_SILENCE)
    if cancels:
        conv.commit(conv.plan(), T.TEXT_BEGIN)
        conv.commit(conv.plan(), 151618)
        conv.cancel()
    for row in listen_through_rollovers(conv, 2):
        assert row.tokens[:len(PREFIX)] == PREFIX and row.tokens[len(PREFIX):] == T.listening_block(), row.tokens
        assert len(row.audio) == 1 and row.new_block_start == len(PREFIX)
        (lo, hi), = row.audio_spans
        assert row.tokens[lo - 1] == T.AUDIO_BEGIN and row.tokens[lo:hi] == [T.PAD] * 10


def test_a_rollover_keeps_a_block_without_lead_whole():
    """With a window that keeps one block, the block a history-less rollover fed (no lead token) is kept whole
    at the next rollover: its AUDIO_BEGIN is not stripped as a lead would be."""
    conv = Conversation(PREFIX, max_turn_tokens=4, max_positions=200, rollover_window=13)
    for chunk in range(60):
        conv.add_audio(f"c{chunk}")
    for row in listen_through_rollovers(conv, 3):
        assert row.tokens[len(PREFIX)] == T.AUDIO_BEGIN, row.tokens
        for (lo, hi) in row.audio_spans:
            assert row.tokens[lo - 1] == T.AUDIO_BEGIN and row.tokens[lo:hi] == [T.PAD] * 10


def test_rollover_window_that_cannot_fit_is_rejected():
    with pytest.raises(ValueError, match="too large for context rollover.* largest possible here is 425"):
        Conversation(PREFIX, max_turn_tokens=512, max_positions=1024, rollover_window=500)
    with pytest.raises(ValueError, match="does not fit the 300-position context budget"):
        Conversation(PREFIX, max_turn_tokens=400, max_positions=300, rollover_window=None)


@pytest.mark.parametrize("max_positions, rollover_window, min_chunks", [
    (4096, 2048, 30), (4096, 2048, 0), (4096, None, 0), (1024, 500, 3), (300, None, 0), (2000, 1900, 30)])
def test_every_refusal_names_the_largest_max_turn_tokens_and_that_one_fits(max_positions, rollover_window,
                                                                          min_chunks):
    """A client refused for max_turn_tokens 4096 was told the budget it did not fit, not what would (first-hour
    review): every refusal names the largest cap the prompt allows, and that cap is accepted, one more is not."""
    from audio_interaction_server.spec import check_room, largest_turn_tokens

    for prefix_tokens in (10, 57, 800):
        largest = largest_turn_tokens(prefix_tokens, max_positions, rollover_window, min_chunks)
        if largest >= 1:
            check_room(prefix_tokens, largest, max_positions, rollover_window, min_chunks)
        for too_many in {max(1, largest + 1), 4096}:
            with pytest.raises(ValueError) as refusal:
                check_room(prefix_tokens, too_many, max_positions, rollover_window, min_chunks)
            named = f"the largest possible here is {largest}" if largest >= 1 else "no reply fits with this prompt"
            assert named in str(refusal.value), str(refusal.value)


# ---- a whole session on the tiny real model, replayed without the KV cache ----------------------------------


def plain_forward(lm, tokens: list[int], audio_columns: list[int], audio_embeds):
    """Logits at every position of one sequence, in one causal forward with no cache: the reference's
    computation written out (fp16-rounded RoPE, audio overwriting PAD embeddings, GQA attention)."""
    import math

    import torch
    import torch.nn.functional as F

    from audio_interaction_server.model.lm import apply_rope, rope_table

    cfg = lm.cfg
    length, heads, groups, width = len(tokens), cfg.n_head, cfg.n_query_groups, cfg.head_size
    with torch.inference_mode():
        x = lm.transformer.wte(torch.tensor(tokens)).clone()
        x[audio_columns] = audio_embeds.to(x.dtype)
        cos, sin = rope_table(cfg, length, x.device)
        for block in lm.transformer.h:
            q, k, v = block.attn.qkv(block.norm_1(x)).split([heads * width, groups * width, groups * width], dim=-1)
            q = apply_rope(q.view(length, heads, width), cos, sin, cfg.rope_n_elem).transpose(0, 1)
            k = apply_rope(k.view(length, groups, width), cos, sin, cfg.rope_n_elem).transpose(0, 1)
            v = v.view(length, groups, width).transpose(0, 1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(width),
                                               enable_gqa=groups != heads)
            x = x + block.attn.proj(y.transpose(0, 1).reshape(length, heads * width))
            x = x + block.mlp(block.norm_2(x))
        return lm.logits(lm.transformer.ln_f(x))


def reference_sequence(prefix: list[int], events) -> tuple[list[int], list[int], list[tuple[int, str, int]]]:
    """The reference's token layout rebuilt from what the client was told: the fed tokens, the PAD
    columns of each chunk in order, and (column, kind, token) for every token the model chose."""
    tokens, pad_columns, choices = list(prefix), [], []
    last_chosen = None  # fed as the first token of the next row
    for event in events:
        if isinstance(event, Decision):
            lead = [] if last_chosen is None else [last_chosen]
            pad_columns += range(len(tokens) + len(lead) + 1, len(tokens) + len(lead) + 11)
            tokens += lead + T.listening_block()
            choices.append((len(tokens) - 1, "decision", event.token_id))
            last_chosen = event.token_id
        elif isinstance(event, TurnToken):
            tokens.append(last_chosen)
            choices.append((len(tokens) - 1, "reply", event.token_id))
            last_chosen = event.token_id
        elif isinstance(event, TurnEnd):
            # The last token shown (or TEXT_BEGIN for an empty reply) is fed; after it comes TEXT_END,
            # predicted by the model ("text_end") or taken in place of its prediction ("max_tokens").
            tokens.append(last_chosen)
            if event.end_reason == "text_end":
                choices.append((len(tokens) - 1, "reply", T.TEXT_END))
            last_chosen = T.TEXT_END
    return tokens, pad_columns, choices


@pytest.mark.parametrize("cancel_turn, prefix_kv_positions", [(None, 4096), (1, 4096), (None, 0)])
def test_a_whole_session_replays_through_one_plain_forward(tiny_model, stream_chunks, cancel_turn,
                                                           prefix_kv_positions):
    """What the worker fed (prefix, blocks with audio, replies capped, or cancelled by the client after
    their first token) is exactly the reference's sequence, and every decision and greedy reply token is
    the argmax at its position without the cache. With the prefix's keys and values kept (the default), the
    prefix is copied into the slot at the open instead of fed with the first block."""
    import torch

    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.options import SessionOptions
    from audio_interaction_server.model.encoder import AudioEncoder
    from audio_interaction_server.engine.sampling import DECISION_TOKENS
    from audio_interaction_server.engine.worker import Worker

    audio = torch.cat(stream_chunks[:4])  # 48 chunks of real speech
    # Unpaced: the whole file is pushed at once and stepped until idle, as the offline runner does.
    worker = Worker(tiny_model, EngineConfig(max_sessions=1, rollover_window_positions=None,
                                             max_catch_up_speed=None, prefix_kv_positions=prefix_kv_positions))
    events, fed = [], []
    worker.open_session("s", SessionOptions(max_turn_tokens=3), events.extend)
    worker.step()
    conversation = worker.scheduler.sessions["s"].conversation
    assert conversation.prefix_in_slot == bool(prefix_kv_positions)
    if conversation.prefix_in_slot:
        fed.extend(conversation.prefix_ids)
    commit = conversation.commit

    def recording_commit(row, token_id, request=None):
        assert row.start_position == len(fed), "rows must be fed at consecutive positions"
        fed.extend(row.tokens)
        return commit(row, token_id, request)

    conversation.commit = recording_commit
    worker.push_audio("s", audio)
    while worker.step() is not None:
        last = events[-1]
        if cancel_turn is not None and isinstance(last, TurnToken) and last.turn_index == cancel_turn:
            worker.cancel("s")  # between steps, right after the reply's first token, as a client would
            cancel_turn = None

    ends = [e for e in events if isinstance(e, TurnEnd)]
    assert sum(e.end_reason == "max_tokens" for e in ends) >= 2, "no capped replies: the cap went untested"
    assert cancel_turn is None, "the reply to cancel never came"
    assert sum(isinstance(e, Decision) for e in events) == len(audio)
    tokens, pad_columns, choices = reference_sequence(conversation.prefix_ids, events)
    assert fed == tokens

    embeds = AudioEncoder(tiny_model.encoder_tower).encode(audio).flatten(0, 1)
    logits = plain_forward(tiny_model.lm, tokens, pad_columns, embeds)
    decision_ids = list(DECISION_TOKENS)
    for column, kind, token in choices:
        if kind == "decision":
            speak_margin = float(logits[column, decision_ids[0]] - logits[column, decision_ids[1]])
            assert abs(speak_margin) < 1e-4 or (speak_margin > 0) == (token == T.TEXT_BEGIN), column
        else:
            assert float(logits[column].max() - logits[column, token]) < 1e-4, (column, token)
