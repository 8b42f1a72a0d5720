"""The static path's host side, without a model: bucket choice and splitting, packing, the graph self-check's judgement,
and which configuration picks which step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.buckets import BucketSet, listening_sizes, reply_sizes
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.packing import SlotRow, StepStaging, fits_static_step
from audio_interaction_server.engine.static_path import StepChoice, choose_eager_attention, choose_step
from audio_interaction_server.engine.step_graphs import StepSnapshot, compare_steps
from audio_interaction_server.model.static_step import ROW_TOKENS, Bucket, StepLayout

SCRATCH = 9


def listening_row(slot: int, start: int, lead: list[int], mel_value: float = 1.0) -> SlotRow:
    tokens = lead + T.listening_block()
    span = (len(lead) + 1, len(lead) + 1 + T.AUDIO_FRAMES_PER_CHUNK)
    return SlotRow(slot, RowPlan(tokens, start, (span,), (torch.full((128, 40), mel_value),)))


def reply_row(slot: int, start: int, token: int) -> SlotRow:
    return SlotRow(slot, RowPlan([token], start, (), ()))


def test_bucket_sizes():
    assert listening_sizes(1) == (0, 8)
    assert listening_sizes(256) == (0, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert listening_sizes(600) == (0, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
    assert reply_sizes(0) == (0,) and reply_sizes(5) == (0, 8)
    assert reply_sizes(96) == (0, 8, 16, 32, 64, 96) and reply_sizes(150) == (0, 8, 16, 32, 64, 96, 192)


def test_the_smallest_bucket_that_fits_is_chosen():
    buckets = BucketSet.for_rows(256, 96)
    assert buckets.smallest_fit(13, 0) == Bucket(16, 0)
    assert buckets.smallest_fit(0, 1) == Bucket(0, 8)
    assert buckets.smallest_fit(200, 9) == Bucket(256, 16)
    assert buckets.smallest_fit(0, 0) is None and buckets.smallest_fit(257, 0) is None
    everything = buckets.all()
    assert Bucket(0, 0) not in everything and len(everything) == 11 * 6 - 1
    assert everything[0] == buckets.largest  # captured first, so the others reuse its pool
    assert [b.num_tokens for b in everything] == sorted((b.num_tokens for b in everything), reverse=True)


def test_a_batch_larger_than_the_largest_bucket_is_split_in_row_order():
    buckets = BucketSet(listening=(0, 8, 16), reply=(0, 8))
    steps = buckets.split(20, 11)
    assert steps == [(Bucket(16, 8), 16, 8), (Bucket(8, 8), 4, 3)]
    assert buckets.split(0, 0) == [] and buckets.split(3, 0) == [(Bucket(8, 0), 3, 0)]
    with pytest.raises(ValueError, match="no bucket holds"):
        BucketSet(listening=(0, 8), reply=(0,)).split(0, 2)


def test_which_rows_fit_a_static_step():
    assert fits_static_step(listening_row(0, 0, [5]).plan)
    assert fits_static_step(listening_row(0, 0, [5, 6, 7]).plan)  # 15 tokens: carried reply tokens
    assert not fits_static_step(listening_row(0, 0, [5] * 5).plan)  # 17 tokens: eager
    assert fits_static_step(reply_row(0, 3, 9).plan)
    assert not fits_static_step(RowPlan([1, 2], 3, (), ()))  # a text row of two tokens
    two_chunks = RowPlan([1] * 14, 0, ((1, 11), (2, 12)), (torch.zeros(128, 40),) * 2)
    assert not fits_static_step(two_chunks)


def test_packing_lays_out_rows_padding_and_audio():
    layout = StepLayout(Bucket(8, 8))
    staging = StepStaging(layout, SCRATCH, max_positions=512, pin_memory=False)
    staging.token[:] = 99  # stale values from an earlier step must all be overwritten
    bucket = Bucket(8, 8)
    rows = [listening_row(3, 100, [7], 1.0), listening_row(5, 0, [7, 8], 2.0)]
    staging.pack(bucket, rows, [reply_row(1, 40, 77)])
    W = ROW_TOKENS
    tokens = staging.token[: bucket.num_tokens]
    assert list(tokens[:13]) == [7] + T.listening_block() and not tokens[13:W].any()
    assert list(tokens[W: W + 14]) == [7, 8] + T.listening_block() and not tokens[2 * W: 8 * W].any()
    assert tokens[8 * W] == 77 and not tokens[8 * W + 1:].any()
    assert list(staging.position[:13]) == list(range(100, 113)) and not staging.position[13:W].any()
    assert list(staging.write_slot[:W]) == [3] * 13 + [SCRATCH] * 3
    assert (staging.write_slot[2 * W: 8 * W] == SCRATCH).all() and staging.write_slot[8 * W] == 1
    assert (staging.write_slot[8 * W + 1: bucket.num_tokens] == SCRATCH).all()
    audio = staging.audio_source[: bucket.num_tokens]
    assert list(audio[:W]) == [-1, -1] + list(range(10)) + [-1] * 4
    assert list(audio[W: 2 * W]) == [-1, -1, -1] + list(range(10, 20)) + [-1] * 3
    assert (audio[2 * W:] == -1).all()
    rows_used = slice(0, bucket.num_rows)
    assert list(staging.row_slot[rows_used]) == [3, 5] + [SCRATCH] * 6 + [1] + [SCRATCH] * 7
    assert list(staging.row_q_len[rows_used]) == [13, 14] + [0] * 6 + [1] + [0] * 7
    assert list(staging.row_key_len[rows_used]) == [113, 14] + [0] * 6 + [41] + [0] * 7
    assert list(staging.row_q_start[rows_used]) == [r * W for r in range(8)] + list(range(8 * W, 8 * W + 8))
    assert list(staging.row_last[:3]) == [12, W + 13, 2 * W] and staging.row_last[8] == 8 * W
    mel = staging.tensors.mel
    assert (mel[0] == 1).all() and (mel[1] == 2).all() and not mel[2:8].any()


def test_packing_refuses_what_the_step_cannot_run():
    staging = StepStaging(StepLayout(Bucket(8, 8)), SCRATCH, max_positions=512, pin_memory=False)
    with pytest.raises(ValueError, match="beyond the cache"):
        staging.pack(Bucket(8, 8), [], [reply_row(0, 512, 3)])
    with pytest.raises(ValueError, match="not a session slot"):
        staging.pack(Bucket(8, 8), [], [reply_row(SCRATCH, 0, 3)])
    with pytest.raises(ValueError, match="do not fit bucket"):
        staging.pack(Bucket(8, 0), [], [reply_row(0, 0, 3)])
    with pytest.raises(ValueError, match="does not fit a static step"):
        staging.pack(Bucket(8, 8), [listening_row(0, 0, [1] * 5)], [])


def test_a_small_bucket_copies_only_what_it_reads():
    layout = StepLayout(Bucket(16, 8))
    assert layout.bytes_used(Bucket(16, 8)) == layout.num_bytes
    assert layout.bytes_used(Bucket(8, 0)) == layout.int_bytes + 8 * 128 * 40 * 4
    views = layout.views(torch.zeros(layout.num_bytes, dtype=torch.uint8))
    assert views.token.shape == (16 * ROW_TOKENS + 8,) and views.row_slot.shape == (24,)
    assert views.mel.shape == (16, 128, 40) and views.mel.dtype == torch.float32
    assert np.shares_memory(views.token.numpy(), views.row_last.numpy()) is False


def snapshot(tokens, finite, hidden) -> StepSnapshot:
    return StepSnapshot(tuple(tokens), tuple(finite), torch.tensor(hidden, dtype=torch.float32))


def test_the_graph_self_check_refuses_what_disagrees():
    eager = snapshot([5, 7], [True, True], [[1.0, -2.0], [0.5, 0.25]])
    assert compare_steps(eager, snapshot([5, 7], [True, True], [[1.0, -2.0], [0.5, 0.25]])) is None
    assert compare_steps(eager, snapshot([5, 7], [True, True], [[1.0005, -2.0], [0.5, 0.25]])) is None
    assert "token" in compare_steps(eager, snapshot([5, 8], [True, True], [[1.0, -2.0], [0.5, 0.25]]))
    assert "finite" in compare_steps(eager, snapshot([5, 7], [True, False], [[1.0, -2.0], [0.5, 0.25]]))
    assert "hidden states differ" in compare_steps(eager, snapshot([5, 7], [True, True], [[1.1, -2.0], [0.5, 0.25]]))
    assert "non-finite" in compare_steps(eager, snapshot([5, 7], [True, True], [[float("nan"), -2.0], [0.5, 0.25]]))
    assert "row counts" in compare_steps(eager, snapshot([5], [True], [[1.0, -2.0]]))


def test_the_step_configuration():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = EngineConfig()
    assert not choose_step(default, cpu).static  # the CPU keeps the eager path
    on_cpu = choose_step(EngineConfig(step="static"), cpu)
    assert on_cpu.static and not on_cpu.graphs and on_cpu.attention == "gather"
    assert not choose_step(EngineConfig(step="eager"), cuda).static
    assert choose_step(EngineConfig(static_attention="gather"), cuda).graphs
    assert not choose_step(EngineConfig(cuda_graphs="off", static_attention="gather"), cuda).graphs
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_step(EngineConfig(step="static", static_attention="triton"), cpu)


def test_with_the_static_step_the_eager_path_takes_gather_without_compiling_flex(tiny_model):
    """The eager path then runs only long rows, which flex cannot serve (more than FLEX_QUERY_ROWS tokens)."""
    cache = tiny_model.lm.new_cache(2, 256, scratch_slot=True)
    static = StepChoice(True, False, "gather", "configured")
    chosen = choose_eager_attention("auto", static, tiny_model, cache, 2)
    assert (chosen.backend, chosen.compiled) == ("gather", False) and "static step" in chosen.reason
    assert (tiny_model.lm.attention_backend, tiny_model.lm.compile_attention) == ("gather", False)
    eager = StepChoice(False, False, "gather", "CPU device")
    assert "static step" not in choose_eager_attention("auto", eager, tiny_model, cache, 2).reason
