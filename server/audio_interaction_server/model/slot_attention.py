"""Attention of a static step: every row reads its own KV slot, with shapes that never depend on the data.

A static step (``static_step.py``) packs listening rows as a (rows, ``ROW_TOKENS``) grid of query
tokens followed by one token per reply row, and describes each row by device tensors: its first
query token (``q_start``), its real query count (``q_len``, 0 for a padding row), its slot and
its key length (position of its last token + 1). Two implementations read that description:

* ``gather_attention``: each row's whole slot (all ``max_positions`` keys) copied into a dense
  batch and masked, one SDPA call per row kind. Fixed shapes, so graph-safe, and the same math as
  the eager path's gather: the CPU path and the reference everything else is tested against. On a
  large cache it copies every row's whole slot in every layer.
* ``triton_attention``: our own kernel, one program per (row, KV head). The row's query tokens x
  the group's query heads form one tile; the slot's keys are read in place up to the row's key
  length, which the kernel loads from device memory, so a padding row (key length 0) exits at
  once and no shape depends on the data. Softmax is online, in fp32; the causal mask is applied
  only on the tiles that hold the row's own new tokens. Triton is an optional dependency (the
  ``gpu`` extra): ``triton_available()`` says whether it imports. On a CPU it runs only under
  Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use at tiny shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RowSpans:
    """Per-row device tensors (rows,) of one row kind, int64: where its queries are and what it reads."""

    q_start: torch.Tensor  # first query token of the row in the packed token order
    q_len: torch.Tensor  # real query tokens (0 = padding row)
    slot: torch.Tensor  # KV slot the row reads (padding rows: the scratch slot)
    key_len: torch.Tensor  # keys the row's last query sees: its last position + 1 (0 for padding rows)


def gather_attention(
    q: torch.Tensor,  # (rows, H, T, D): the row kind's query grid, T tokens per row
    cache_k: torch.Tensor,  # (G, S, P, D): one layer's cache, every slot
    cache_v: torch.Tensor,
    slots: torch.Tensor,  # (rows,)
    positions: torch.Tensor,  # (rows, T): position of each query; padding queries at 0
    scale: float,
    enable_gqa: bool,
) -> torch.Tensor:
    """Each row's whole slot, gathered and masked causally by position: (rows, H, T, D)."""
    rows, _, T, _ = q.shape
    P = cache_k.shape[2]
    keys = cache_k[:, slots].transpose(0, 1).to(q.dtype)  # (rows, G, P, D)
    values = cache_v[:, slots].transpose(0, 1).to(q.dtype)
    key_positions = torch.arange(P, device=q.device).view(1, 1, 1, P)
    # A padding query sits at position 0 and so sees key 0 only: never an empty row (NaN) in the softmax.
    mask = key_positions <= positions.view(rows, 1, T, 1)  # (rows, 1, T, P)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def triton_available() -> bool:
    """Whether the Triton kernel can be built here (triton imports; it still needs CUDA or the interpreter)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the kernel; the device script times a few of them."""

    block_n: int = 64  # keys per tile
    # 8 warps: at the 3B shapes (8 query heads per KV group, head size 128) the 128-row listening tile's fp32
    # accumulator does not fit 4 warps' registers (ptxas for sm_90: 255 registers and 1.3 KB spilled with 4
    # warps, 12 bytes with 8), and on the H200 of 2026-12-04 (64, 8) beat (64, 4) at every measured shape:
    # 120 vs 203 us per layer at 64 rows x 13 tokens, 610 vs 743 at 256 x 13, 103 vs 117 at 64 reply rows.
    num_warps: int = 8
    num_stages: int = 2


def triton_attention(
    q: torch.Tensor,  # (N, H, D) packed query tokens
    cache_k: torch.Tensor,  # (G, S, P, D)
    cache_v: torch.Tensor,
    out: torch.Tensor,  # (N, H, D), zeroed: tokens of padding rows and columns are left as they are
    spans: RowSpans,
    max_q_len: int,  # the most query tokens any row of this launch has (a tile holds them all)
    scale: float,
    config: KernelConfig = KernelConfig(),
) -> torch.Tensor:
    """Attention of every row in ``spans`` over its own slot, in place in the cache; writes and returns ``out``."""
    N, H, D = q.shape
    G, _, _, Dk = cache_k.shape
    if Dk != D or H % G:
        raise ValueError(f"query heads {H} x {D} do not match the cache's {G} groups x {Dk}")
    heads_per_group = H // G
    if q.stride(-1) != 1 or cache_k.stride(-1) != 1 or cache_v.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the head dimension of q, the cache and out must be contiguous")
    # tl.dot needs at least 16 rows in a tile: short rows (replies) take a few more (masked) query slots.
    block_q = max(_next_power_of_two(max_q_len), _next_power_of_two(max(1, 16 // heads_per_group)))
    block_d = max(16, _next_power_of_two(D))
    rows = spans.q_start.shape[0]
    if rows == 0:
        return out
    kernel = _kernel()
    kernel[(rows, G)](
        q, cache_k, cache_v, out,
        spans.q_start, spans.q_len, spans.slot, spans.key_len,
        q.stride(0), q.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        out.stride(0), out.stride(1),
        scale,
        HEADS_PER_GROUP=heads_per_group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_N=config.block_n,
        EXACT_FP32=q.dtype == torch.float32, WHILE_LOOPS=q.device.type != "cuda",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Bound by _kernel() on first use (module globals, where Triton's interpreter looks for them).
tl: Any = None
_attend_tile: Any = None


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, defined on first use: importing this module must not need triton.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so a process that wants the
    interpreter sets it before the first call. ``tl`` and the tile function are bound as module
    globals because the interpreter swaps in its own versions of what it finds in a kernel's globals.
    """
    global tl, _attend_tile
    import triton
    import triton.language as tl

    @triton.jit
    def _attend_tile(q, k_base, v_base, start, key_len, position, m_i, l_i, acc, stride_kp, stride_vp, scale,
                     d, d_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EXACT_FP32: tl.constexpr):
        """One tile of BLOCK_N keys into the online softmax; MASKED: causal by position and bounded by key_len."""
        n = start + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = (n < key_len)[:, None] & d_ok[None, :]
        else:
            kv_ok = (n >= 0)[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_kp + d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vp + d[None, :], mask=kv_ok, other=0.0)
        if EXACT_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if MASKED:
            visible = (n[None, :] <= position[:, None]) & (n < key_len)[None, :]
            s = tl.where(visible, s, float("-inf"))
        # Key 0 is in the first tile and visible to every real query, so m_new is finite for them.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EXACT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def slot_attention_kernel(
        Q, K, V, Out,
        row_q_start, row_q_len, row_slot, row_key_len,
        stride_qt, stride_qh,
        stride_kg, stride_ks, stride_kp,
        stride_vg, stride_vs, stride_vp,
        stride_ot, stride_oh,
        scale,
        HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, EXACT_FP32: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    ):
        row = tl.program_id(0)
        group = tl.program_id(1)
        q_start = tl.load(row_q_start + row)
        q_len = tl.load(row_q_len + row)
        slot = tl.load(row_slot + row)
        key_len = tl.load(row_key_len + row)  # 0 for a padding row: both key loops are empty
        first_position = key_len - q_len

        # Tile rows: query token t of the row x query head h of this KV group.
        BLOCK_M: tl.constexpr = BLOCK_Q * HEADS_PER_GROUP
        m = tl.arange(0, BLOCK_M)
        token = m // HEADS_PER_GROUP
        head = group * HEADS_PER_GROUP + m % HEADS_PER_GROUP
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_ok = (token < q_len)[:, None] & d_ok[None, :]
        q = tl.load(Q + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=q_ok, other=0.0)
        position = first_position + token  # (BLOCK_M,)

        k_base = K + group * stride_kg + slot * stride_ks
        v_base = V + group * stride_vg + slot * stride_vs
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

        # Keys before the row's first new token are visible to all its queries: whole tiles, no mask.
        # Then the tiles holding the row's new tokens: causal by position, bounded by the key length.
        full_end = (first_position // BLOCK_N) * BLOCK_N
        if WHILE_LOOPS:  # Triton's interpreter cannot take a loaded value as a for-range bound (numpy 2)
            start = full_end * 0
            while start < full_end:
                m_i, l_i, acc = _attend_tile(q, k_base, v_base, start, key_len, position, m_i, l_i, acc,
                                             stride_kp, stride_vp, scale, d, d_ok, BLOCK_N, False, EXACT_FP32)
                start += BLOCK_N
            while start < key_len:
                m_i, l_i, acc = _attend_tile(q, k_base, v_base, start, key_len, position, m_i, l_i, acc,
                                             stride_kp, stride_vp, scale, d, d_ok, BLOCK_N, True, EXACT_FP32)
                start += BLOCK_N
        else:  # for-range loops: what the compiler pipelines on a GPU
            for start in range(0, full_end, BLOCK_N):
                m_i, l_i, acc = _attend_tile(q, k_base, v_base, start, key_len, position, m_i, l_i, acc,
                                             stride_kp, stride_vp, scale, d, d_ok, BLOCK_N, False, EXACT_FP32)
            for start in range(full_end, key_len, BLOCK_N):
                m_i, l_i, acc = _attend_tile(q, k_base, v_base, start, key_len, position, m_i, l_i, acc,
                                             stride_kp, stride_vp, scale, d, d_ok, BLOCK_N, True, EXACT_FP32)
        # Padding queries (token >= q_len) are not stored; dividing them by 1 keeps their 0/0 out of the math.
        y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 y.to(Out.dtype.element_ty), mask=q_ok)

    return slot_attention_kernel
