"""The runner alone on the tiny real model: rows in, one token per row out, failures confined to their row."""

from __future__ import annotations

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.options import SamplingOptions
from audio_interaction_server.engine.conversation import Conversation
from audio_interaction_server.engine.runner import SAMPLING_FAILED, STEP_FAILED, PlannedRow, Runner
from audio_interaction_server.engine.sampling import DECISION_TOKENS
from audio_interaction_server.model.encoder import AudioEncoder


def new_runner(tiny_model, slots=3) -> Runner:
    return Runner(tiny_model, tiny_model.lm.new_cache(slots, 512), AudioEncoder(tiny_model.encoder_tower))


def first_rows(tiny_model, streams, sampling=None):
    """Each stream's first listening row (prefix + block + its first chunk), one slot each."""
    prefix = T.prompt_prefix(tiny_model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    rows = []
    for slot, chunks in enumerate(streams):
        conversation = Conversation(prefix, 6, 512)
        conversation.add_audio(chunks[0])
        rows.append(PlannedRow(f"s{slot}", slot, conversation.plan(), **({"sampling": sampling} if sampling else {})))
    return rows


def test_a_batch_gives_each_row_the_token_it_gets_alone(tiny_model, stream_chunks):
    rows = first_rows(tiny_model, stream_chunks[:3])
    batched = new_runner(tiny_model).run(rows)
    alone = [new_runner(tiny_model).run([row]).rows[0] for row in rows]
    assert batched.rows == tuple(alone)
    assert all(r.error is None and r.token in DECISION_TOKENS for r in batched.rows)


def test_the_decision_is_the_larger_of_the_two_decision_logits(tiny_model, stream_chunks):
    rows = first_rows(tiny_model, stream_chunks[:3])
    runner = new_runner(tiny_model)
    result = runner.run(rows)
    hidden = new_runner(tiny_model).last_hidden(rows, runner.encode(rows))
    logits = tiny_model.lm.logits(hidden, torch.tensor(DECISION_TOKENS))
    expected = [T.TEXT_BEGIN if float(a) > float(b) else T.KEEP_SILENCE for a, b in logits]
    assert [r.token for r in result.rows] == expected


def test_audio_encoded_elsewhere_gives_the_same_tokens(tiny_model, stream_chunks):
    rows = first_rows(tiny_model, stream_chunks[:2])
    runner = new_runner(tiny_model)
    embeds = runner.encode(rows)
    assert embeds.shape[0] == 2 * T.AUDIO_FRAMES_PER_CHUNK
    assert new_runner(tiny_model).run(rows, audio_embeds=embeds).rows == runner.run(rows).rows


def test_non_finite_audio_fails_its_row_only(tiny_model, stream_chunks):
    poisoned = stream_chunks[1].clone()
    poisoned[0] = float("nan")
    rows = first_rows(tiny_model, [stream_chunks[0], poisoned, stream_chunks[2]])
    result = new_runner(tiny_model).run(rows)
    assert isinstance(result.rows[1].error, FloatingPointError) and result.rows[1].failed_at == STEP_FAILED
    clean = new_runner(tiny_model).run([rows[0], rows[2]])
    assert (result.rows[0], result.rows[2]) == clean.rows


def test_a_row_whose_sampling_raises_fails_alone(tiny_model, stream_chunks):
    """Reply rows: one samples with options that slipped validation (a NaN temperature), one samples, one is greedy."""
    prefix = T.prompt_prefix(tiny_model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    runner = new_runner(tiny_model)
    speaking = []
    for slot, chunks in enumerate(stream_chunks[:3]):
        conversation = Conversation(prefix, 6, 512)
        conversation.add_audio(chunks[0])
        first = conversation.plan()
        runner.run([PlannedRow(f"s{slot}", slot, first)])  # the prefix and block the reply row follows
        conversation.commit(first, T.TEXT_BEGIN)  # as if the model had decided to reply
        speaking.append(conversation.plan())
    broken = SamplingOptions.model_construct(temperature=float("nan"), top_k=0, top_p=1.0, seed=None)
    rows = [PlannedRow("s0", 0, speaking[0], broken),
            PlannedRow("s1", 1, speaking[1], SamplingOptions(temperature=1.0), torch.Generator().manual_seed(3)),
            PlannedRow("s2", 2, speaking[2])]
    result = runner.run(rows)
    assert result.rows[0].failed_at == SAMPLING_FAILED and result.rows[0].token is None
    assert result.rows[1].error is None and result.rows[2].error is None
    assert all(0 <= r.token < tiny_model.lm.cfg.padded_vocab_size for r in result.rows[1:])
