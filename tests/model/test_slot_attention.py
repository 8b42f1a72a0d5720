"""Our Triton slot-attention kernel, run by Triton's interpreter on CPU tensors, against the gather path.

Tiny shapes (2 KV groups x 2 query heads each, head size 16): rows of 1-16 query tokens at positions
on both sides of the kernel's key tiles (64 and 32 keys) and at the end of the slot, padding rows and
padding columns. Skipped, with the reason, where triton does not import (it is the optional ``gpu`` extra).

The interpreted cases of this file and of test_fused_kernels.py run in one child pytest started with
``TRITON_INTERPRET=1`` (``test_the_interpreted_cases``, tests/model/triton_interpreter.py); in this
process they skip.
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
