"""Our Triton slot-attention kernel, run by Triton's interpreter on CPU tensors, against the gather path.

Tiny shapes (2 KV groups x 2 query heads each, head size 16): rows of 1-16 query tokens at positions
on both sides of the kernel's 64-key tiles and at the end of the slot, padding rows and padding
columns. Skipped, with the reason, where triton does not import (it is the optional ``gpu`` extra).

Triton decides at its own import whether its language functions are interpreted, and torch may have
imported it earlier in this process, so the interpreted cases run in a child pytest started with
``TRITON_INTERPRET=1`` (``test_the_interpreted_cases``); in this process they skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from audio_interaction_server.model import slot_attention
from audio_interaction_server.model.slot_attention import KernelConfig, RowSpans, gather_attention, triton_attention

pytestmark = pytest.mark.skipif(not slot_attention.triton_available(),
                                reason="triton is not installed (optional: the gpu/test extra)")

G, HEADS_PER_GROUP, D, SLOTS, P = 2, 2, 16, 5, 256
H = G * HEADS_PER_GROUP
SCRATCH = SLOTS - 1


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[2]


# Marks are read before any fixture is set up: the parent process does not build the tiny model for nothing.
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the child process of test_the_interpreted_cases (TRITON_INTERPRET=1)")


def test_the_interpreted_cases(tmp_path):
    if INTERPRETED:
        pytest.skip("this is the child process")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-x", "-p", "no:cacheprovider", "-k", "not interpreted_cases",
         "--basetemp", str(tmp_path / "child")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1"),
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert "4 passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]


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
@pytest.mark.parametrize("width, block_n", [(16, 64), (1, 64), (16, 32)])
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


@interpreted_only
def test_the_static_step_with_the_kernel_gives_the_gather_tokens(tiny_model):
    """The whole static step, attention by the interpreted kernel vs gather, on the same rows and history."""
    from audio_interaction_server import spec as T
    from audio_interaction_server.engine.buckets import BucketSet
    from audio_interaction_server.engine.sampling import DECISION_TOKENS
    from audio_interaction_server.engine.static_path import StaticPath
    from audio_interaction_server.engine.step_graphs import StepSnapshot, compare_steps, synthetic_rows
    from audio_interaction_server.model.encoder import AudioEncoder
    from audio_interaction_server.model.static_step import Bucket, StaticStep

    snapshots = []
    for attention in ("gather", "triton"):
        cache = tiny_model.lm.new_cache(12, P, scratch_slot=True)
        cache.k[:, :, :12] = torch.randn(cache.k[:, :, :12].shape, generator=torch.Generator().manual_seed(5))
        cache.v[:, :, :12] = torch.randn(cache.v[:, :, :12].shape, generator=torch.Generator().manual_seed(6))
        step = StaticStep(tiny_model.lm, AudioEncoder(tiny_model.encoder_tower), cache, Bucket(8, 8),
                          DECISION_TOKENS, attention)
        path = StaticPath(step, BucketSet.for_rows(8, 8), graphs=False)
        listening, reply = synthetic_rows(Bucket(8, 8), 12, P, tiny_model.lm.cfg.vocab_size,
                                          torch.Generator().manual_seed(7))
        path.staging.pack(Bucket(8, 8), listening, reply)
        step.load(path.staging.bytes, Bucket(8, 8))
        step.run(Bucket(8, 8))
        snapshots.append(StepSnapshot.of(step, list(range(len(listening))) + [8 + k for k in range(len(reply))]))
    assert len(snapshots[0].tokens) == 5 + 6 and T.TEXT_BEGIN in DECISION_TOKENS
    assert compare_steps(*snapshots, tolerance=1e-5) is None
