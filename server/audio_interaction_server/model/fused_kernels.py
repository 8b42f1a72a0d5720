"""Fused kernels of the static step: fewer GPU kernels per layer, the numbers of the torch code.

In torch, one layer of the static step launches about 9 kernels per RMSNorm (fp32 cast, square,
mean, add, rsqrt, two multiplies, weight cast, cast back), about 10 for the RoPE of q and k and the
two cache writes, 2 for the residual adds and 2 for SiLU x up. A CUDA graph removes the CPU's cost
of launching them, not each kernel's own cost on the GPU (``../shared/docs/gpu-step.md``, item 8).
Three Triton kernels replace them:

* ``add_rms_norm``: optionally ``x += residual`` (in place, rounded to x's dtype as torch's add
  rounds), then RMSNorm as ``lm.RMSNorm`` computes it: normalise in fp32, multiply by the fp32
  weight, round once to the model's dtype. One program per token.
* ``rope_and_write_cache``: from the fused qkv projection, q and k rotated with the model's cos/sin
  table (read at each token's integer position: the table's rows already hold the float16-rounded
  positions the model was trained with, so position 2049 is rotated as 2048 here too), k and v
  written into each token's (slot, position) of this layer's cache; returns q. One program per token.
* ``silu_mul``: SiLU(gate) x up, the SiLU rounded to the model's dtype before the product as
  ``F.silu(gate) * up`` rounds it.

Numerics against the torch code (tests/model/test_fused_kernels.py, fp32 on CPU under Triton's
interpreter): RoPE, the cache writes and the residual add are the same operations in the same
order, so they are bit-identical; RMSNorm sums the squares in another order and SiLU's exp is
another implementation, so those agree within float rounding (1e-6), not bit for bit. On a GPU the
RoPE and RMSNorm kernels are compiled without fused multiply-adds, as torch runs them; there the
RMSNorm reduction order and SiLU's exp still differ by rounding.

Only the static step on CUDA uses them (``engine.fused_kernels``); the CPU path and the eager
reference stay the torch code. Triton is optional: nothing here imports it until a kernel is called.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from audio_interaction_server.model.slot_attention import triton_available


def fused_kernels_runnable(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: triton imports and it is CUDA (or Triton's CPU interpreter)."""
    if not triton_available():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def add_rms_norm(
    x: torch.Tensor,  # (N, E); with ``residual``, updated in place to x + residual
    weight: torch.Tensor,  # (E,)
    eps: float,
    unit_offset: bool,
    residual: torch.Tensor | None = None,  # (N, E), x's dtype
) -> torch.Tensor:
    """RMSNorm of ``x`` (after ``x += residual`` when given): a new (N, E) tensor in x's dtype."""
    N, E = x.shape
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or weight.shape != (E,):
        raise ValueError(f"add_rms_norm needs rows of {E} contiguous values and a weight of ({E},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError("the residual must have x's shape and dtype, rows contiguous")
    out = torch.empty_like(x)
    if N == 0:
        return out
    kernels = _kernels()
    kernels.add_rms_norm[(N,)](
        x, x if residual is None else residual, out, weight,
        x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
        E, eps,
        BLOCK=_next_power_of_two(E), HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset,
        **_launch_options(x.device),
    )
    return out


@dataclass(frozen=True)
class RopeShape:
    """Heads of the fused qkv projection ``[Q heads | K groups | V groups]`` and how many dims RoPE rotates."""

    n_head: int
    n_query_groups: int
    head_size: int
    rope_n_elem: int


def rope_and_write_cache(
    qkv: torch.Tensor,  # (N, (H + 2G) * D): the qkv projection of N packed tokens
    cos: torch.Tensor,  # (P, n_elem) fp32: the model's table, rows at float16-rounded positions
    sin: torch.Tensor,
    positions: torch.Tensor,  # (N,) int64: each token's position (the table row and the cache index)
    write_slot: torch.Tensor,  # (N,) int64: the cache slot each token's k/v go to
    cache_k: torch.Tensor,  # (G, S, P, D): one layer's cache, written in place
    cache_v: torch.Tensor,
    shape: RopeShape,
) -> torch.Tensor:
    """q rotated, (N, H, D) in qkv's dtype; rotated k and plain v written to ``cache[:, slot, position]``."""
    N = qkv.shape[0]
    H, G, D, n_elem = shape.n_head, shape.n_query_groups, shape.head_size, shape.rope_n_elem
    if qkv.shape[1] != (H + 2 * G) * D or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be (N, {(H + 2 * G) * D}) with contiguous rows, got {tuple(qkv.shape)}")
    if cache_k.shape[0] != G or cache_k.shape[3] != D or cache_k.stride(-1) != 1 or cache_v.stride(-1) != 1:
        raise ValueError(f"the cache must be (G={G}, S, P, D={D}) with contiguous head dims")
    if cos.shape[1] != n_elem or cos.stride(-1) != 1 or sin.stride() != cos.stride() or n_elem % 2 or n_elem > D:
        raise ValueError(f"cos/sin must be (P, {n_elem}) rows, n_elem even and at most {D}")
    q = torch.empty(N, H, D, dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return q
    kernels = _kernels()
    kernels.rope_and_write_cache[(N,)](
        qkv, q, cache_k, cache_v, cos, sin, positions, write_slot,
        qkv.stride(0), q.stride(0), q.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        cos.stride(0),
        N_HEAD=H, N_GROUP=G, HEAD_DIM=D, ROPE_DIM=n_elem,
        BLOCK_H=_next_power_of_two(H), BLOCK_G=_next_power_of_two(G), BLOCK_D=_next_power_of_two(D),
        **_launch_options(qkv.device),
    )
    return q


# Elements of (gate, up) per program of silu_mul.
SILU_BLOCK = 1024


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one kernel; both (N, I), same dtype, contiguous."""
    if gate.shape != up.shape or gate.dtype != up.dtype or not gate.is_contiguous() or not up.is_contiguous():
        raise ValueError("silu_mul needs two contiguous tensors of one shape and dtype")
    out = torch.empty_like(gate)
    count = gate.numel()
    if count == 0:
        return out
    kernels = _kernels()
    kernels.silu_mul[(triton_cdiv(count, SILU_BLOCK),)](gate, up, out, count, BLOCK=SILU_BLOCK,
                                                        **_launch_options(gate.device))
    return out


def triton_cdiv(n: int, block: int) -> int:
    return -(-n // block)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_options(device: torch.device) -> dict[str, Any]:
    # No fused multiply-adds: torch runs x*cos + r*sin (and x*inv*w) as separate roundings, and so must we.
    # The interpreter takes no compiler options (it rounds every operation anyway).
    return {"enable_fp_fusion": False} if device.type == "cuda" else {}


# Bound by _kernels() on first use (module globals, where Triton's interpreter looks for them).
tl: Any = None


@dataclass(frozen=True)
class _Kernels:
    add_rms_norm: Any
    rope_and_write_cache: Any
    silu_mul: Any


@functools.cache
def _kernels() -> _Kernels:
    """The jitted kernels, defined on first use: importing this module must not need triton.

    As in ``slot_attention._kernel``: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, and
    ``tl`` is a module global because the interpreter swaps in its own version of what a kernel's globals hold.
    """
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_kernel(X, Residual, Out, W, stride_x, stride_r, stride_o, n_cols, eps,
                            BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(Residual + row * stride_r + cols, mask=ok, other=0.0)
            # torch adds in fp32 and rounds to the operands' dtype: the sum the next layer sees.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(X + row * stride_x + cols, x, mask=ok)
        xf = x.to(tl.float32)
        # Correctly rounded divisions and sqrt (Triton's defaults on a GPU are approximations).
        mean_square = tl.math.div_rn(tl.sum(xf * xf, axis=0), n_cols * 1.0)
        inverse_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_square + eps))
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            w = w + 1.0
        y = (xf * inverse_rms) * w  # the order of lm.RMSNorm: normalise, then scale
        tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def rope_and_write_cache_kernel(
        QKV, Q, K, V, Cos, Sin, Positions, Slots,
        stride_qkv, stride_qt, stride_qh,
        stride_kg, stride_ks, stride_kp,
        stride_vg, stride_vs, stride_vp,
        stride_cos,
        N_HEAD: tl.constexpr, N_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0)
        position = tl.load(Positions + t)
        slot = tl.load(Slots + t)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        HALF: tl.constexpr = ROPE_DIM // 2
        rotated = d < ROPE_DIM
        # rotate_half = cat(-x2, x1): dim d < HALF takes -x[d + HALF], dim HALF <= d < ROPE_DIM takes x[d - HALF].
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        partner = tl.where(rotated, partner, d)
        cos = tl.load(Cos + position * stride_cos + d, mask=rotated, other=0.0)[None, :]
        sin = tl.load(Sin + position * stride_cos + d, mask=rotated, other=0.0)[None, :]
        negate = (d < HALF)[None, :]
        row = QKV + t * stride_qkv

        # q: (BLOCK_H, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        q_ok = (h < N_HEAD)[:, None] & d_ok[None, :]
        x = tl.load(row + h[:, None] * HEAD_DIM + d[None, :], mask=q_ok, other=0.0)
        x_partner = tl.load(row + h[:, None] * HEAD_DIM + partner[None, :], mask=q_ok, other=0.0).to(tl.float32)
        x_partner = tl.where(negate, -x_partner, x_partner)
        # As lm.apply_rope: fp32 products (cos/sin are fp32), one sum, one rounding to the activations' dtype.
        q = tl.where(rotated[None, :], x.to(tl.float32) * cos + x_partner * sin, x.to(tl.float32))
        tl.store(Q + t * stride_qt + h[:, None] * stride_qh + d[None, :], q.to(Q.dtype.element_ty), mask=q_ok)

        # k and v of every KV group: (BLOCK_G, BLOCK_D), written at (group, slot, position).
        g = tl.arange(0, BLOCK_G)
        kv_ok = (g < N_GROUP)[:, None] & d_ok[None, :]
        k_cols = N_HEAD * HEAD_DIM + g[:, None] * HEAD_DIM
        x = tl.load(row + k_cols + d[None, :], mask=kv_ok, other=0.0)
        x_partner = tl.load(row + k_cols + partner[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        x_partner = tl.where(negate, -x_partner, x_partner)
        k = tl.where(rotated[None, :], x.to(tl.float32) * cos + x_partner * sin, x.to(tl.float32))
        k = k.to(QKV.dtype.element_ty)  # rounded like apply_rope's output, then to the cache's dtype
        k_at = K + g[:, None] * stride_kg + slot * stride_ks + position * stride_kp + d[None, :]
        tl.store(k_at, k.to(K.dtype.element_ty), mask=kv_ok)
        v = tl.load(row + (N_HEAD + N_GROUP) * HEAD_DIM + g[:, None] * HEAD_DIM + d[None, :], mask=kv_ok, other=0.0)
        v_at = V + g[:, None] * stride_vg + slot * stride_vs + position * stride_vp + d[None, :]
        tl.store(v_at, v.to(V.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def silu_mul_kernel(Gate, Up, Out, count, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < count
        gate = tl.load(Gate + i, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(Up + i, mask=ok, other=0.0)
        silu = tl.math.div_rn(gate, 1.0 + tl.exp(-gate)).to(Up.dtype.element_ty)  # rounded, as F.silu's output
        tl.store(Out + i, (silu.to(tl.float32) * up.to(tl.float32)).to(Out.dtype.element_ty), mask=ok)

    return _Kernels(add_rms_norm_kernel, rope_and_write_cache_kernel, silu_mul_kernel)
