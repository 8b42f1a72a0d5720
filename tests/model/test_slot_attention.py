"""Our Triton slot-attention kernel, run by Triton's interpreter on CPU tensors, against the gather path.

Tiny shapes (2 KV groups x 2 query heads each, head size 16): rows of 1-16 query tokens at positions
on both sides of the kernel's key tiles (64 and 32 keys) and at the end of the slot, padding rows and
padding columns. Skipped, with the reason, where triton does not import (it is the optional ``gpu`` extra).

The interpreted cases of this file and of test_fused_kernels.py run in one child pytest started with
``TRITON_INTERPRET=1`` (``test_the_interpreted_cases``, tests/model/triton_interpreter.py); in this
process they skip.

Only float32 here: Triton's interpreter multiplies bfloat16 operands wrongly (``tl.dot`` of two 16 x 16 bf16 tiles
came out 2.8e10 off with triton 3.6.0, while bf16 loads, casts and stores are exact), so the kernel's bf16 numerics
are checked on a device only (``benchmarks.gpu_check``'s attention stage, against gather).
"""

from __future__ import annotations

import pytest
import torch

from audio_interaction_server.model import slot_attention
from audio_interaction_server.model.slot_attention import KernelConfig, RowSpans, gather_attention, triton_attention
from tests.model.triton_interpreter import INTERPRETED, interpreted_only, run_interpreted_files

pytestmark = pytest.mark.skipif(not slot_attention.triton_available(),
                                reason="triton is not installed (optional: the gpu/test extra)")

G, HEADS_PER_GROUP, D, SLOTS, P = 2, 2, 16, 5, 256
H = G * HEADS_PER_GROUP
SCRATCH = SLOTS - 1


def test_the_interpreted_cases(tmp_path, tiny_checkpoint):
    if INTERPRETED:
        pytest.skip("this is the child process")
    run_interpreted_files(tmp_path, tiny_checkpoint)


def rows_case(generator, rows: list[tuple[int, int, int]], width: int):
    """rows: (slot, first position, query tokens) of real rows; each row gets ``width`` query columns."""
    B = len(rows)
    q = torch.randn(B * width, H, D, generator=generator)
    cache_k = torch.randn(G, SLOTS, P, D, generator=generator)
    cache_v = torch.randn(G, SLOTS, P, D, generator=generator)
    positions = torch.zeros(B, width, dtype=torch.long)
    q_len = torch.tensor([n for _, _, n in rows])
    for r, (_, start, n) in enumerate(rows):
        positions[r, :n] = torch.arange(start, start + n)
    spans = RowSpans(q_start=torch.arange(B) * width, q_len=q_len,
                     slot=torch.tensor([slot for slot, _, _ in rows]),
                     key_len=torch.tensor([start + n if n else 0 for _, start, n in rows]))
    return q, cache_k, cache_v, positions, spans


@interpreted_only
# Listening rows at the default 64-key tiles, reply rows at 32-key tiles: both tile sizes, both row kinds.
@pytest.mark.parametrize("width, block_n", [(16, 64), (1, 32)])
def test_the_kernel_equals_gather(width, block_n):
    generator = torch.Generator().manual_seed(width + block_n)
    if width == 16:  # listening rows: up to 16 new tokens, around tile edges and the end of the slot
        rows = [(0, 0, 13), (1, 51, 13), (2, 64, 16), (3, 115, 14), (0, P - 13, 13), (SCRATCH, 0, 0), (1, 120, 2)]
    else:  # reply rows: one token each
        rows = [(0, 0, 1), (1, 63, 1), (2, 64, 1), (3, P - 1, 1), (SCRATCH, 0, 0)]
    q, cache_k, cache_v, positions, spans = rows_case(generator, rows, width)
    out = torch.zeros_like(q)
    triton_attention(q, cache_k, cache_v, out, spans, width, scale=D ** -0.5, config=KernelConfig(block_n=block_n))

    grid = q.view(len(rows), width, H, D).transpose(1, 2)
    expected = gather_attention(grid, cache_k, cache_v, spans.slot, positions, D ** -0.5, enable_gqa=True)
    expected = expected.transpose(1, 2).reshape(-1, H, D)
    real = (torch.arange(width).view(1, -1) < spans.q_len.view(-1, 1)).flatten()  # (rows x width,)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padding rows and columns are never written


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels are not compiled; this runs in the parent")
@pytest.mark.parametrize("block_q", [16, 2])  # listening rows (16 tokens x 8 heads) and reply rows (2 x 8)
def test_the_kernels_compile_for_an_h200_at_the_3b_shapes_without_spilling(block_q, tmp_path):
    """The served launch configuration (KernelConfig's defaults) compiled by Triton's real compiler for sm_90 at
    the 3B model's shapes (2 KV groups x 8 query heads, head size 128, bf16), then assembled by its ptxas: the
    shared memory fits a Hopper block and the registers do not spill (no GPU needed)."""
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kernel = slot_attention._kernel()
    config = KernelConfig()
    constexprs = dict(HEADS_PER_GROUP=8, HEAD_DIM=128, BLOCK_D=128, BLOCK_Q=block_q, BLOCK_N=config.block_n,
                      EXACT_FP32=False, WHILE_LOOPS=False)
    signature = {**dict.fromkeys(("Q", "K", "V", "Out"), "*bf16"),
                 **dict.fromkeys(("row_q_start", "row_q_len", "row_slot", "row_key_len"), "*i64"),
                 **dict.fromkeys(("stride_qt", "stride_qh", "stride_kg", "stride_ks", "stride_kp", "stride_vg",
                                  "stride_vs", "stride_vp", "stride_ot", "stride_oh"), "i32"),
                 "scale": "fp32", **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except RuntimeError as error:
        if "ptxas" in str(error).lower():
            pytest.skip(f"Triton's ptxas cannot run here: {error}")
        raise
    assert compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared  # a Hopper block's shared memory
    ptx = tmp_path / "slot_attention.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", "/dev/null"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report.stderr))
    assert spilled <= 64, report.stderr[-1000:]
