"""Double-buffered staging: a batch cut into several buckets packs the next bucket while the current one runs,
and the inputs each step loads, the tokens and the cache are those of one buffer packed step after step."""

from __future__ import annotations

import pytest
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.engine.buckets import BucketSet
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.packing import SlotRow, StepStaging
from audio_interaction_server.engine.sampling import DECISION_TOKENS
from audio_interaction_server.engine.static_path import StaticPath
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.static_step import Bucket, StaticStep

NUM_SLOTS = 10
MAX_POSITIONS = 256


def rows_of_a_batch(vocab_size: int) -> list[SlotRow]:
    """5 listening and 3 reply rows in distinct slots at mixed positions: 3 steps at buckets of (2, 1)."""
    generator = torch.Generator().manual_seed(3)
    rows = []
    for slot in range(5):
        lead = [int(torch.randint(0, vocab_size, (1,), generator=generator))]
        tokens = lead + T.listening_block()
        span = (2, 2 + T.AUDIO_FRAMES_PER_CHUNK)
        mel = torch.randn(128, 40, generator=generator)
        rows.append(SlotRow(slot, RowPlan(tokens, 17 * slot + 40, (span,), (mel,))))
    for k in range(3):
        token = int(torch.randint(0, vocab_size, (1,), generator=generator))
        rows.append(SlotRow(5 + k, RowPlan([token], 30 * k + 100, (), ())))
    return rows


def what_a_step_reads(inputs, bucket: Bucket) -> dict[str, bytes]:
    """Each input field's part that a step at ``bucket`` reads (the rest of the buffer is stale, by design)."""
    sizes = {"token": bucket.num_tokens, "position": bucket.num_tokens, "write_slot": bucket.num_tokens,
             "audio_source": bucket.num_tokens, "mel": bucket.listening}
    return {name: getattr(inputs, name)[: sizes.get(name, bucket.num_rows)].numpy().tobytes()
            for name in ("token", "position", "write_slot", "audio_source", "row_slot", "row_q_start",
                         "row_q_len", "row_key_len", "row_last", "mel")}


def run_recorded(tiny_model, rows, num_staging: int):
    """Run ``rows`` through a fresh path; what it did, in order, and what each load carried."""
    cache = tiny_model.lm.new_cache(NUM_SLOTS, MAX_POSITIONS, scratch_slot=True)
    generator = torch.Generator().manual_seed(5)
    cache.k.copy_(torch.randn(cache.k.shape, generator=generator))
    cache.v.copy_(torch.randn(cache.v.shape, generator=generator))
    encoder = AudioEncoder(tiny_model.encoder_tower)
    step = StaticStep(tiny_model.lm, encoder, cache, Bucket(2, 1), DECISION_TOKENS)
    path = StaticPath(step, BucketSet(listening=(0, 1, 2), reply=(0, 1)), graphs=False, num_staging=num_staging)
    order: list[str] = []
    loaded: list[tuple[Bucket, dict[str, bytes]]] = []
    real_load, real_read = step.load, path._read

    def load(staging: torch.Tensor, bucket: Bucket) -> None:
        order.append("load")
        loaded.append((bucket, what_a_step_reads(step.layout.views(staging), bucket)))
        real_load(staging, bucket)

    def read(num_rows: int):
        order.append("read")
        return real_read(num_rows)

    for staging in path.stagings:
        real_pack = staging.pack

        def pack(bucket, listening, reply, real_pack=real_pack):
            order.append("pack")
            real_pack(bucket, listening, reply)

        staging.pack = pack  # type: ignore[method-assign]
    step.load, path._read = load, read  # type: ignore[method-assign]
    chosen = path.run(rows, [False] * len(rows))
    return order, loaded, [(token, finite) for token, finite, _ in chosen], cache, step.layout


@pytest.fixture(scope="module")
def one_and_two_buffers(tiny_model):
    rows = rows_of_a_batch(tiny_model.lm.cfg.vocab_size)
    return rows, run_recorded(tiny_model, rows, 1), run_recorded(tiny_model, rows, 2)


def test_the_next_bucket_is_packed_before_this_one_is_read(one_and_two_buffers):
    _, (one_order, *_), (two_order, *_) = one_and_two_buffers
    assert one_order == ["pack", "load", "read"] * 3
    assert two_order == ["pack", "load", "pack", "read", "load", "pack", "read", "load", "read"]


def test_two_buffers_load_the_same_inputs_and_give_the_same_tokens_and_cache(one_and_two_buffers):
    rows, (_, one_loaded, one_tokens, one_cache, layout), (_, two_loaded, two_tokens, two_cache, _) = \
        one_and_two_buffers
    assert [bucket for bucket, _ in two_loaded] == [Bucket(2, 1), Bucket(2, 1), Bucket(1, 1)]
    assert two_loaded == one_loaded
    assert two_tokens == one_tokens and all(finite for _, finite in two_tokens)
    assert torch.equal(two_cache.k, one_cache.k) and torch.equal(two_cache.v, one_cache.v)
    # Each load is what one staging buffer packed afresh for that step holds (the inputs of earlier versions).
    fresh = StepStaging(layout, one_cache.scratch_slot, MAX_POSITIONS, pin_memory=False)
    listening, reply = rows[:5], rows[5:]
    for k, (bucket, got) in enumerate(two_loaded):
        fresh.pack(bucket, listening[2 * k: 2 * k + 2], reply[k: k + 1])
        assert got == what_a_step_reads(fresh.tensors, bucket), f"step {k} loaded other inputs"
