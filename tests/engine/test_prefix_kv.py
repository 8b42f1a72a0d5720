"""Kept prefixes (``engine/prefix_kv.py``): a new session copies its prompt's keys and values instead of feeding it,
with the same tokens and hidden states as feeding it, and its first row becomes a static-step row."""

from __future__ import annotations

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.events import Decision, SessionStarted, TurnBegin
from audio_interaction_server.engine.packing import fits_static_step
from audio_interaction_server.engine.prefix_kv import PrefixKVStore
from audio_interaction_server.engine.runner import PlannedRow, Runner
from audio_interaction_server.engine.worker import Worker
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.options import SessionOptions

OPTIONS = SessionOptions(max_turn_tokens=6)
CUSTOM = SessionOptions(max_turn_tokens=6, system_prompt="Answer in one short sentence.")


def filled_cache(tiny_model, num_slots: int = 4, max_positions: int = 256):
    """A cache whose every position holds distinct values, so a copy to the wrong place shows."""
    cache = tiny_model.lm.new_cache(num_slots, max_positions)
    cache.k.copy_(torch.randn(cache.k.shape, generator=torch.Generator().manual_seed(1)))
    cache.v.copy_(torch.randn(cache.v.shape, generator=torch.Generator().manual_seed(2)))
    return cache


def test_a_kept_prefix_is_copied_exactly_into_its_positions_and_nowhere_else(tiny_model):
    cache = filled_cache(tiny_model)
    store = PrefixKVStore(cache, max_positions=100)
    prefix = tuple(range(40))
    assert not store.load(1, prefix), "nothing is kept yet"
    store.keep(0, prefix)
    before = cache.k.clone(), cache.v.clone()
    assert store.load(2, prefix)
    for after, was in zip((cache.k, cache.v), before):
        assert torch.equal(after[:, :, 2, :40], was[:, :, 0, :40])
        assert torch.equal(after[:, :, 2, 40:], was[:, :, 2, 40:]), "positions past the prefix are untouched"
        for slot in (0, 1, 3):
            assert torch.equal(after[:, :, slot], was[:, :, slot]), f"slot {slot} changed"
    cache.k[:, :, 0].zero_()  # the kept copy is the store's own: the source slot may be reused
    assert store.load(3, prefix) and torch.equal(cache.k[:, :, 3, :40], before[0][:, :, 0, :40])


def test_the_store_is_bounded_in_positions_least_recently_used_dropped_first(tiny_model):
    cache = filled_cache(tiny_model)
    store = PrefixKVStore(cache, max_positions=100)
    a, b, c = tuple(range(40)), tuple(range(1, 41)), tuple(range(2, 42))
    store.keep(0, a)
    store.keep(1, b)
    assert store.load(3, a)  # a is now the most recently used
    store.keep(2, c)  # 120 positions would not fit: b goes
    assert a in store and c in store and b not in store and store.positions == 80
    store.keep(0, tuple(range(101)))  # longer than the whole store: not kept, nothing dropped for it
    assert store.positions == 80 and a in store


def test_a_prompt_longer_than_the_store_is_not_fed_at_start_up(tiny_model):
    """``keep_prefix`` with a store too small for the prompt does nothing: no forward into the slot (which it
    would then clear) for keys and values the store would refuse."""
    prefix = T.prompt_prefix(tiny_model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    cache = filled_cache(tiny_model, max_positions=128)
    before = cache.k.clone()
    runner = Runner(tiny_model, cache, AudioEncoder(tiny_model.encoder_tower), prefix_kv_positions=len(prefix) - 1)
    runner.keep_prefix(0, prefix)
    assert torch.equal(cache.k, before) and runner.prefixes.positions == 0


def test_a_session_with_a_kept_prefix_feeds_its_first_block_alone_with_the_same_hidden_state(tiny_model,
                                                                                            stream_chunks):
    """The first row from a copied prefix: 12 tokens from position P, a row a static step takes; its last hidden
    state equals the one of ``prefix + block`` fed whole, to fp32 rounding."""
    prefix = T.prompt_prefix(tiny_model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    encoder = AudioEncoder(tiny_model.encoder_tower)
    runner = Runner(tiny_model, tiny_model.lm.new_cache(3, 256), encoder, prefix_kv_positions=4096)
    runner.keep_prefix(0, prefix)
    assert not runner.cache.k[:, :, 0].any(), "the slot used to compute the prefix is cleared after"
    chunk = stream_chunks[0][0]
    whole = RowPlan(prefix + T.listening_block(), 0, ((len(prefix) + 1, len(prefix) + 11),), (chunk,))
    assert not runner.prepare_slot(1, [5, 6, 7]), "another prompt is not kept"
    assert runner.prepare_slot(2, prefix)
    after = RowPlan(T.listening_block(), len(prefix), ((1, 11),), (chunk,))
    assert fits_static_step(after) and not fits_static_step(whole)
    rows = [PlannedRow("fed", 1, whole), PlannedRow("copied", 2, after)]
    hidden = runner.last_hidden(rows, runner.encode(rows))
    torch.testing.assert_close(hidden[1], hidden[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(runner.cache.k[:, :, 2, :len(prefix) + 12], runner.cache.k[:, :, 1, :len(prefix) + 12],
                               rtol=0, atol=1e-5)


def run_sessions(tiny_model, stream_chunks, prefix_kv_positions: int, **engine):
    """Four sessions, two with a prompt of their own, joining at different steps; their events by session."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=4, prefix_kv_positions=prefix_kv_positions, **engine))
    options = [OPTIONS, CUSTOM, OPTIONS, CUSTOM]
    join_after_steps = [0, 0, 3, 7]
    events: dict[int, list] = {}
    stats = []
    while True:
        for i in range(4):
            if i not in events and len(stats) >= join_after_steps[i]:
                events[i] = []
                worker.open_session(f"s{i}", options[i], events[i].extend)
                worker.push_audio(f"s{i}", stream_chunks[i])
        stats.append(worker.step())
        if stats[-1] is None and len(events) == 4:
            return worker, events, [s for s in stats if s is not None]


def test_sessions_with_kept_prefixes_give_the_events_of_sessions_that_feed_them(tiny_model, stream_chunks):
    fed_worker, fed, _ = run_sessions(tiny_model, stream_chunks, 0)
    kept_worker, kept, kept_stats = run_sessions(tiny_model, stream_chunks, 4096)
    for i in range(4):
        assert [e for e in kept[i] if not isinstance(e, SessionStarted)] == \
            [e for e in fed[i] if not isinstance(e, SessionStarted)], f"session {i} differs"
        assert len([e for e in kept[i] if isinstance(e, Decision)]) == len(stream_chunks[i])
    assert any(isinstance(e, TurnBegin) for i in range(4) for e in kept[i]), "no replies: speaking went untested"
    # The trained prompt was kept at start-up; the custom one after its first session's first row ran.
    assert kept_worker.scheduler.num_prefixes_reused == 3
    assert kept_stats[-1].prefixes_reused_total == 3
    assert fed_worker.scheduler.num_prefixes_reused == 0


def test_with_kept_prefixes_new_sessions_first_rows_take_the_static_step(tiny_model, stream_chunks):
    """A burst of new sessions runs no eager batch at all: every first row fits a static step."""
    for positions, eager_batches in ((4096, 0), (0, 1)):
        worker = Worker(tiny_model, EngineConfig(max_sessions=4, step="static", prefix_kv_positions=positions))
        for i in range(4):
            worker.open_session(f"s{i}", OPTIONS, lambda events: None)
            worker.push_audio(f"s{i}", stream_chunks[i][:1])
        stats = worker.step()
        assert stats is not None and stats.num_decisions == 4
        assert stats.num_tokens_fed == 4 * 12 + (0 if positions else 4 * worker.prompt_length(OPTIONS))
        assert worker.runner.static is not None and worker.runner.static.counts.eager_batches == eager_batches
