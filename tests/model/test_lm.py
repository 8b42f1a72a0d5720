"""The decoder against an independent computation (transformers' Qwen2), KV-cache and slot properties."""

from __future__ import annotations

import shutil

import pytest
import torch

from audio_interaction_server.model.lm import AudioInteractionLM, LMConfig, StepBatch, rope_table

CPU = torch.device("cpu")


def small_config(**overrides) -> LMConfig:
    fields = dict(name="test", n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16,
                  intermediate_size=96, vocab_size=500, padded_vocab_size=512, block_size=8192,
                  norm_eps=1e-6, rope_base=1_000_000.0, rope_n_elem=16, rope_condense_ratio=1.0,
                  attn_bias=True, bias=False, lm_head_bias=False, norm_unit_offset=False)
    fields.update(overrides)
    return LMConfig(**fields)


def random_lm(cfg: LMConfig, seed: int = 0, attention: str = "gather") -> AudioInteractionLM:
    torch.manual_seed(seed)
    model = AudioInteractionLM(cfg)
    model.attention_backend = attention
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def hf_qwen2_from(model: AudioInteractionLM):
    """Convert our LitGPT-layout weights to transformers' Qwen2ForCausalLM (the independent computation)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = model.cfg
    hf_cfg = Qwen2Config(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_query_groups,
        head_dim=cfg.head_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        max_position_embeddings=cfg.block_size, tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    sd = model.state_dict()
    q_size, kv_size = cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"], "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, h = f"transformer.h.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias"):
            q, k, v = sd[p + f"attn.qkv.{suffix}"].split([q_size, kv_size, kv_size])
            out[h + f"self_attn.q_proj.{suffix}"], out[h + f"self_attn.k_proj.{suffix}"] = q, k
            out[h + f"self_attn.v_proj.{suffix}"] = v
        out[h + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
        out[h + "input_layernorm.weight"] = sd[p + "norm_1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "norm_2.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[p + "mlp.fc_1.weight"]
        out[h + "mlp.up_proj.weight"] = sd[p + "mlp.fc_2.weight"]
        out[h + "mlp.down_proj.weight"] = sd[p + "mlp.proj.weight"]
    hf.load_state_dict(out, strict=True)
    return hf


# Both ways of reading the cache must give the same numbers (flex runs eagerly here; see the compiled test).
ATTENTION = pytest.mark.parametrize("attention", ["gather", "flex"])


def fp16_positions(n: int) -> torch.Tensor:
    return torch.arange(n).to(torch.float16).long().unsqueeze(0)


def feed(model, cache, tokens, start, slot=0, audio_span=None, audio=None):
    batch = StepBatch.build([tokens], [start], [slot], [[audio_span] if audio_span else []], audio, CPU)
    return model(batch, cache)[0]


def test_rope_positions_are_rounded_to_float16():
    cfg = small_config()
    cos, sin = rope_table(cfg, 4200, CPU)
    assert torch.equal(cos[2049], cos[2048]) and torch.equal(cos[2051], cos[2052])
    assert not torch.equal(cos[2048], cos[2050])
    assert torch.equal(cos[4095], rope_table(cfg, 4097, CPU)[0][4096])


@ATTENTION
def test_logits_match_transformers_qwen2_with_fp16_positions(attention):
    model = random_lm(small_config(), attention=attention)
    hf = hf_qwen2_from(model)
    ids = torch.randint(0, 500, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=fp16_positions(60)).logits[0]  # (T, V)
    cache = model.new_cache(num_slots=2, max_positions=256)
    # Prefill 47 tokens, then a 13-token block: logits at each row's last token.
    got_prefill = feed(model, cache, ids[0, :47].tolist(), 0)
    got_block = feed(model, cache, ids[0, 47:].tolist(), 47)
    torch.testing.assert_close(got_prefill, expected[46], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_block, expected[59], rtol=1e-4, atol=1e-4)


@ATTENTION
def test_logits_match_transformers_above_position_2048(attention):
    model = random_lm(small_config(), attention=attention)
    hf = hf_qwen2_from(model)
    n = 2080
    ids = torch.randint(0, 500, (1, n), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=fp16_positions(n)).logits[0]
        exact = hf(input_ids=ids).logits[0]  # HF's own exact positions
    # Room for n positions, rounded up to whole 128-position flex blocks (eager flex reads every block it has).
    cache = model.new_cache(num_slots=1, max_positions=2176)
    feed(model, cache, ids[0, :2040].tolist(), 0)
    for pos in range(2040, n):  # single-token decode steps across 2048
        got = feed(model, cache, [int(ids[0, pos])], pos)
        torch.testing.assert_close(got, expected[pos], rtol=1e-4, atol=1e-4)
    # The rounding matters: exact positions give different logits past 2048.
    assert (exact[n - 1] - expected[n - 1]).abs().max() > 1e-3


@ATTENTION
def test_audio_overwrites_pad_embeddings(attention):
    model = random_lm(small_config(), attention=attention)
    hf = hf_qwen2_from(model)
    ids = torch.randint(0, 500, (1, 13), generator=torch.Generator().manual_seed(3))
    audio = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    embeds = model.transformer.wte(ids).detach().clone()
    embeds[0, 2:12] = audio
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, position_ids=fp16_positions(13)).logits[0, -1]
    got = feed(model, model.new_cache(1, 128), ids[0].tolist(), 0, audio_span=(2, 12), audio=audio)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@ATTENTION
def test_kv_cached_decode_equals_full_forward(attention):
    model = random_lm(small_config(), attention=attention)
    ids = torch.randint(0, 500, (80,), generator=torch.Generator().manual_seed(5)).tolist()
    full = feed(model, model.new_cache(1, 128), ids, 0)
    cache = model.new_cache(1, 128)
    pos = 0
    for size in (46, 13, 1, 1, 1, 13, 5):
        last = feed(model, cache, ids[pos:pos + size], pos)
        pos += size
    assert pos == 80
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)


@ATTENTION
def test_batched_rows_at_different_positions_equal_single_rows(attention):
    model = random_lm(small_config(), attention=attention)
    gen = torch.Generator().manual_seed(6)
    histories = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (46, 70, 5)]
    steps = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (13, 1, 13)]
    audio = torch.randn(20, 64, generator=gen)
    spans = [(1, 11), None, (1, 11)]
    single = []
    for i in range(3):
        cache = model.new_cache(1, 128)
        feed(model, cache, histories[i], 0)
        a = audio[:10] if i == 0 else (audio[10:] if i == 2 else None)
        single.append(feed(model, cache, steps[i], len(histories[i]), audio_span=spans[i], audio=a))
    cache = model.new_cache(4, 128)
    slots = [3, 0, 1]
    for i in range(3):
        feed(model, cache, histories[i], 0, slot=slots[i])
    batch = StepBatch.build(steps, [len(h) for h in histories], slots, [[s] if s else [] for s in spans], audio, CPU)
    batched = model(batch, cache)
    for i in range(3):
        torch.testing.assert_close(batched[i], single[i], rtol=1e-5, atol=1e-5)
        assert int(batched[i].argmax()) == int(single[i].argmax())


@ATTENTION
def test_slot_join_and_leave_leave_other_slots_bit_identical(attention):
    model = random_lm(small_config(), attention=attention)
    cache = model.new_cache(3, 128)
    feed(model, cache, list(range(20)), 0, slot=0)
    before_k, before_v = cache.k[:, :, 0].clone(), cache.v[:, :, 0].clone()
    feed(model, cache, list(range(30, 60)), 0, slot=1)  # another session joins and runs
    cache.clear_slot(1)  # ...and leaves
    feed(model, cache, [7, 8, 9], 0, slot=2)
    assert torch.equal(cache.k[:, :, 0], before_k) and torch.equal(cache.v[:, :, 0], before_v)
    assert cache.k[:, :, 1].abs().sum() == 0


@ATTENTION
def test_nan_in_a_reused_slot_does_not_poison_the_next_session(attention):
    model = random_lm(small_config(), attention=attention)
    cache = model.new_cache(1, 128)
    cache.k[:, :, 0, 40:].fill_(float("nan"))  # garbage left by a failed session
    cache.clear_slot(0)
    assert torch.isfinite(feed(model, cache, list(range(10)), 0)).all()


def test_position_beyond_cache_is_refused():
    model = random_lm(small_config())
    cache = model.new_cache(1, 16)
    with pytest.raises(ValueError, match="beyond the cache"):
        feed(model, cache, list(range(10)), 10)


def test_decision_logits_equal_the_full_heads_columns():
    model = random_lm(small_config())
    cache = model.new_cache(2, 64)
    batch = StepBatch.build([list(range(13)), [5]], [0, 0], [0, 1], [[(1, 11)], []], torch.randn(10, 64), CPU)
    hidden = model.last_hidden(batch, cache)
    ids = torch.tensor([7, 3])
    torch.testing.assert_close(model.logits(hidden, ids), model.logits(hidden)[:, ids], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_in_place_attention_equals_gather():
    """The compiled FlexAttention kernel honours the block mask (eager flex ignores it), so this is its proof."""
    flex = random_lm(small_config(), attention="flex")
    flex.compile_attention = True
    gather = random_lm(small_config(), attention="gather")
    gen = torch.Generator().manual_seed(8)
    # Histories that end inside, just before and exactly on 128-position block boundaries.
    lengths = [300, 127, 128, 5]
    histories = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lengths]
    slots = [3, 0, 2, 1]
    caches = {}
    for model in (flex, gather):
        # The cache (and attention shape) the worker's in-place test compiles for (tests/engine/test_worker.py:
        # 4 sessions, the engine's 4096 positions, small_config's heads are the tiny model's), so that a suite run
        # compiles the kernel once (about 7 s on a 2-core machine) and this proof holds whichever test runs first.
        cache = caches[model.attention_backend] = model.new_cache(4, 4096)
        for history, slot in zip(histories, slots):
            feed(model, cache, history, 0, slot=slot)
    for step in range(2):
        rows = [torch.randint(0, 500, (13 if (i + step) % 2 else 1,), generator=gen).tolist()
                for i in range(len(slots))]
        starts = list(lengths)
        outputs = []
        for model in (flex, gather):
            batch = StepBatch.build(rows, starts, slots, [[] for _ in rows], None, CPU)
            outputs.append(model(batch, caches[model.attention_backend]))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        lengths = [n + len(r) for n, r in zip(starts, rows)]


def test_attention_step_timing_runs_both_backends_and_leaves_the_cache_clean(tiny_model):
    """``auto`` on a GPU keeps flex only if it is faster; the timing itself must not disturb the model or cache."""
    from audio_interaction_server.model.fit import step_ms

    lm = tiny_model.lm
    cache = lm.new_cache(3, 256)
    before = lm.attention_backend, lm.compile_attention
    gather_ms = step_ms(lm, cache, 3, "gather", False, repeats=1)
    flex_ms = step_ms(lm, cache, 3, "flex", False, repeats=1)  # eager flex: the CPU has no compiled path here
    assert gather_ms > 0 and flex_ms > 0
    assert (lm.attention_backend, lm.compile_attention) == before
    assert not cache.k.any() and not cache.v.any()
