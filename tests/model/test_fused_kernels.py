"""The static step's fused Triton kernels (model/fused_kernels.py), run by Triton's interpreter on CPU tensors,
against the torch code they replace (lm.RMSNorm, lm.apply_rope + the cache's index writes, F.silu x up).

fp32 throughout. Exact (``torch.equal``) where the kernel does the same operations in the same order: the
residual add, RoPE and the K/V cache writes. Within 1e-6 where it cannot: RMSNorm's sum of squares (another
summation order) and SiLU's exp (numpy's against torch's). Positions straddle the float16 rounding boundaries
of ../shared/docs/model-notes.md (2048: odd positions round to even; 4095 -> 4096), padding tokens write only
the scratch slot, and every other cache entry stays bit-identical. The whole static step with the kernels
(and with the Triton attention kernel) gives the torch static step's tokens.

Every case but the compile check runs in the interpreter child of
tests/model/test_slot_attention.py::test_the_interpreted_cases. The compile check runs Triton's real compiler
for an H200 (sm_90, PTX and cubin; no GPU needed), so a kernel the interpreter accepts but the compiler refuses
fails here and not on the device.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from audio_interaction_server.model import fused_kernels
from audio_interaction_server.model.lm import LMConfig, RMSNorm, apply_rope, rope_table
from tests.model.triton_interpreter import INTERPRETED, interpreted_only, tiny_model_of_the_run

pytestmark = pytest.mark.skipif(not fused_kernels.triton_available(),
                                reason="triton is not installed (optional: the gpu/test extra)")


@pytest.fixture(scope="module")
def tiny_model(request):
    """Overrides conftest's: in the interpreter child, the checkpoint the parent wrote is loaded, not rebuilt."""
    return tiny_model_of_the_run(request)


H, G, D = 4, 2, 16
SLOTS, P = 4, 4096  # the last slot is the scratch slot; 4096 positions reach the [2048, 4096) rounding range
SCRATCH = SLOTS - 1


def rope_config(rope_n_elem: int) -> LMConfig:
    return LMConfig(name="rope", n_layer=1, n_embd=H * D, n_head=H, n_query_groups=G, head_size=D,
                    intermediate_size=8, vocab_size=8, padded_vocab_size=8, block_size=P, norm_eps=1e-6,
                    rope_base=1_000_000.0, rope_n_elem=rope_n_elem, rope_condense_ratio=1.0, attn_bias=True,
                    bias=False, lm_head_bias=False, norm_unit_offset=False)


@interpreted_only
@pytest.mark.parametrize("unit_offset", [False, True])
def test_add_rms_norm_is_the_models_rms_norm(unit_offset):
    generator = torch.Generator().manual_seed(int(unit_offset))
    norm = RMSNorm(64, 1e-6, unit_offset)
    norm.weight.data = torch.randn(64, generator=generator)
    x = 3 * torch.randn(9, 64, generator=generator)
    residual = torch.randn(9, 64, generator=generator)

    alone = fused_kernels.add_rms_norm(x.clone(), norm.weight, norm.eps, unit_offset)
    torch.testing.assert_close(alone, norm(x), atol=1e-6, rtol=1e-6)
    summed = x.clone()
    after_add = fused_kernels.add_rms_norm(summed, norm.weight, norm.eps, unit_offset, residual=residual)
    assert torch.equal(summed, x + residual)  # the residual add is in place and exact
    torch.testing.assert_close(after_add, norm(x + residual), atol=1e-6, rtol=1e-6)


@interpreted_only
def test_silu_mul_is_silu_times_up():
    generator = torch.Generator().manual_seed(2)
    gate = 4 * torch.randn(7, 160, generator=generator)
    up = torch.randn(7, 160, generator=generator)
    torch.testing.assert_close(fused_kernels.silu_mul(gate, up), F.silu(gate) * up, atol=1e-6, rtol=1e-6)


# Positions around the float16 rounding of model-notes: exact below 2048, odd ones round to even in
# [2048, 4096) (2049 -> 2048, 2051 -> 2052), 4095 -> 4096 (a row the table has, at the rounded angle).
BOUNDARY_POSITIONS = [0, 1, 2046, 2047, 2048, 2049, 2050, 2051, 3001, 4094, 4095]


@interpreted_only
@pytest.mark.parametrize("rope_n_elem", [D, D // 2])  # the model's full-width RoPE, and a partial one (passthrough)
def test_rope_and_cache_write_are_the_models_bit_for_bit(rope_n_elem):
    cfg = rope_config(rope_n_elem)
    cos, sin = rope_table(cfg, P, torch.device("cpu"))
    generator = torch.Generator().manual_seed(rope_n_elem)
    real = len(BOUNDARY_POSITIONS)
    num_padding = 3
    N = real + num_padding
    qkv = torch.randn(N, (H + 2 * G) * D, generator=generator)
    qkv[5] = qkv[4]  # the same vectors at 2048 and 2049: rotated alike, since 2049 rounds to 2048
    positions = torch.tensor(BOUNDARY_POSITIONS + [0] * num_padding)
    write_slot = torch.tensor([k % SCRATCH for k in range(real)] + [SCRATCH] * num_padding)
    cache_k = torch.randn(G, SLOTS, P, D, generator=generator)
    cache_v = torch.randn(G, SLOTS, P, D, generator=generator)

    # The torch code of the static step (model/static_step.py, StaticStep._attention).
    q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
    want_q = apply_rope(q.view(N, H, D), cos[positions], sin[positions], rope_n_elem)
    want_k = apply_rope(k.reshape(N, G, D), cos[positions], sin[positions], rope_n_elem)
    want_cache_k, want_cache_v = cache_k.clone(), cache_v.clone()
    want_cache_k[:, write_slot, positions] = want_k.transpose(0, 1)
    want_cache_v[:, write_slot, positions] = v.reshape(N, G, D).transpose(0, 1)

    got_q = fused_kernels.rope_and_write_cache(qkv, cos, sin, positions, write_slot, cache_k, cache_v,
                                               fused_kernels.RopeShape(H, G, D, rope_n_elem))
    assert torch.equal(got_q, want_q)
    # Padding tokens write the scratch slot's position 0 in an unspecified order (both sides): compare the rest.
    sessions = slice(0, SCRATCH)
    assert torch.equal(cache_k[:, sessions], want_cache_k[:, sessions])
    assert torch.equal(cache_v[:, sessions], want_cache_v[:, sessions])
    assert torch.equal(cache_k[:, SCRATCH, 1:], want_cache_k[:, SCRATCH, 1:])  # padding: position 0 only
    assert torch.equal(cache_v[:, SCRATCH, 1:], want_cache_v[:, SCRATCH, 1:])
    # The float16 rounding survived: 2049 is rotated as 2048, 2050 is not.
    at = {p: i for i, p in enumerate(BOUNDARY_POSITIONS)}
    assert torch.equal(got_q[at[2049]], got_q[at[2048]])
    assert torch.equal(cos[2051], cos[2052]) and not torch.equal(cos[2050], cos[2048])


@interpreted_only
def test_the_static_step_with_the_fused_kernels_gives_the_torch_steps_tokens(tiny_model):
    """The whole static step: the torch code vs the fused kernels with the Triton attention kernel, on the same
    history, at positions across the float16 boundary at 2048 and up to the cache's end, in a bucket with a
    padding row of each kind."""
    from audio_interaction_server import spec as T
    from audio_interaction_server.engine.buckets import BucketSet
    from audio_interaction_server.engine.conversation import RowPlan
    from audio_interaction_server.engine.packing import SlotRow
    from audio_interaction_server.engine.sampling import DECISION_TOKENS
    from audio_interaction_server.engine.static_path import StaticPath
    from audio_interaction_server.engine.step_graphs import StepSnapshot, compare_steps
    from audio_interaction_server.model.encoder import AudioEncoder
    from audio_interaction_server.model.slot_attention import KernelConfig
    from audio_interaction_server.model.static_step import Bucket, StaticStep

    num_slots, max_positions, bucket = 6, 2304, Bucket(4, 4)
    generator = torch.Generator().manual_seed(7)
    block = T.listening_block()
    listening = [SlotRow(slot, RowPlan([11 + slot, *block], start, ((2, 2 + T.AUDIO_FRAMES_PER_CHUNK),),
                                       (torch.randn(128, 40, generator=generator),)))
                 for slot, start in ((0, 2040), (1, 2049), (2, max_positions - 1 - len(block)))]
    reply = [SlotRow(slot, RowPlan([100 + slot], start, (), ()))
             for slot, start in ((3, 2049), (4, 2051), (5, max_positions - 1))]
    real_rows = [0, 1, 2, 4, 5, 6]  # bucket 4+4: one listening row and one reply row are padding

    def run(attention: str, fused: bool):
        cache = tiny_model.lm.new_cache(num_slots, max_positions, scratch_slot=True)
        history = torch.Generator().manual_seed(5)
        sessions = (slice(None), slice(None), slice(0, num_slots))
        cache.k[sessions] = torch.randn(cache.k[sessions].shape, generator=history)
        cache.v[sessions] = torch.randn(cache.v[sessions].shape, generator=history)
        step = StaticStep(tiny_model.lm, AudioEncoder(tiny_model.encoder_tower), cache, bucket, DECISION_TOKENS,
                          attention, KernelConfig(block_n=512), fused=fused)  # wide tiles: fewer interpreted loops
        path = StaticPath(step, BucketSet.for_rows(bucket.listening, bucket.reply), graphs=False)
        path.staging.pack(bucket, listening, reply)
        step.load(path.staging.bytes, bucket)
        step.run(bucket)
        return StepSnapshot.of(step, real_rows), cache

    # The torch step with gather is the reference; the candidate is the fused kernels with the Triton attention
    # kernel, as on CUDA (the fused kernels with gather: test_the_gpu_checks_fused_stage_compares_both_sides).
    (torch_step, torch_cache), *others = [run(a, f) for a, f in (("gather", False), ("triton", True))]
    written = torch.zeros(num_slots, max_positions, dtype=torch.bool)
    for row in listening + reply:
        written[row.slot, row.plan.start_position: row.plan.start_position + len(row.plan.tokens)] = True
    for snapshot, cache in others:
        assert compare_steps(torch_step, snapshot, tolerance=1e-5) is None
        for got, want in ((cache.k, torch_cache.k), (cache.v, torch_cache.v)):
            sessions, want_sessions = got[:, :, :num_slots], want[:, :, :num_slots]
            torch.testing.assert_close(sessions[:, :, written], want_sessions[:, :, written], atol=1e-5, rtol=0)
            assert torch.equal(sessions[:, :, ~written], want_sessions[:, :, ~written])  # untouched: bit-identical


@interpreted_only
def test_the_gpu_checks_fused_stage_compares_both_sides(tiny_model):
    """benchmarks.gpu_check's fused stage with the fused side really run (here interpreted, on one tiny bucket):
    its comparison of tokens, hidden states and launches cannot first meet Python on the device."""
    from audio_interaction_server.model.static_step import Bucket
    from benchmarks.gpu_report import Stage
    from benchmarks.gpu_step_stages import fused_buckets

    stage = Stage("fused", "fused kernels")
    fused_buckets(tiny_model, True, stage, buckets=[Bucket(1, 1)])
    (record,) = stage.data["buckets"]
    assert stage.data["fused_run"] and set(record["launches"]) == set(record["ms"]) == {"torch", "fused"}
    assert record["tokens_equal"] and record["max_hidden_diff_share"] < 1e-5, record
    assert "tokens equal in every bucket" in stage.note and "| 1x16+1 | 2 |" in stage.lines[-1]


# The 3B model's shapes (n_head 16, 2 KV groups, head size 128, n_embd 2048): what the device compiles.
H200 = ("cuda", 90, 32)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels are not compiled; this runs in the parent")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_kernels_compile_for_an_h200_without_fused_multiply_adds(dtype):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = fused_kernels._kernels()
    activations = {name: f"*{dtype}" for name in ("X", "Residual", "Out", "W")}
    cases = [
        (kernels.add_rms_norm, {**activations, **dict.fromkeys(("stride_x", "stride_r", "stride_o", "n_cols"), "i32"),
                                "eps": "fp32"},
         {"BLOCK": 2048, "HAS_RESIDUAL": True, "UNIT_OFFSET": False}),
        (kernels.rope_and_write_cache,
         {**{name: f"*{dtype}" for name in ("QKV", "Q", "K", "V")}, "Cos": "*fp32", "Sin": "*fp32", "Positions": "*i64",
          "Slots": "*i64", **dict.fromkeys(("stride_qkv", "stride_qt", "stride_qh", "stride_ks", "stride_kp",
                                            "stride_vs", "stride_vp", "stride_cos"), "i32"),
          "stride_kg": "i64", "stride_vg": "i64"},
         {"N_HEAD": 16, "N_GROUP": 2, "HEAD_DIM": 128, "ROPE_DIM": 128, "BLOCK_H": 16, "BLOCK_G": 2, "BLOCK_D": 128}),
        (kernels.silu_mul, {"Gate": f"*{dtype}", "Up": f"*{dtype}", "Out": f"*{dtype}", "count": "i32"},
         {"BLOCK": 1024}),
    ]
    for kernel, signature, constexprs in cases:
        source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                           constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
        try:
            compiled = triton.compile(source, target=GPUTarget(*H200), options=fused_kernels._launch_options(
                torch.device("cuda")))
        except RuntimeError as error:
            if "ptxas" in str(error).lower():
                pytest.skip(f"Triton's ptxas cannot run here: {error}")
            raise
        assert compiled.asm["cubin"] and "fma.rn.f32" not in compiled.asm["ptx"], kernel
