"""The Audio-Interaction language model: a Qwen2 decoder with a per-slot KV cache.

Parameter names follow the LitGPT layout of the release checkpoint
(``transformer.h.{i}.attn.qkv`` etc.), so a release state dict loads strictly.
The numerics follow the reference where the weights depend on them:

* RoPE positions are rounded to float16 before the multiply (the model was
  trained that way; positions >= 2048 are quantised).
* RMSNorm normalises in float32 and multiplies by the float32 weight.
* Audio features overwrite (not add to) the embeddings of the PAD slots.

One forward serves many sessions at different positions: every row of a
``StepBatch`` names the cache slot it belongs to and the positions of its
tokens, so a 13-token listening block and a 1-token speaking step go through
the same call. Rows never read or write another slot's cache.

Threading: not thread-safe; the worker thread owns the model and its cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    """The subset of LitGPT's ``Config`` that the Qwen2 decoder needs (derived fields resolved)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_query_groups: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    padded_vocab_size: int
    block_size: int
    norm_eps: float
    rope_base: float
    rope_n_elem: int
    rope_condense_ratio: float
    attn_bias: bool
    bias: bool
    lm_head_bias: bool
    norm_unit_offset: bool

    @property
    def qkv_size(self) -> int:
        return (self.n_head + 2 * self.n_query_groups) * self.head_size


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise and scale in fp32 and round once, as the checkpoint was trained
        # (HF Qwen2 rounds before the weight multiply; that differs in bf16).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        weight = self.weight.float()
        if self.unit_offset:
            weight = weight + 1
        return (x * weight).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, cfg.qkv_size, bias=cfg.attn_bias or cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, E)
        cos: torch.Tensor,  # (B, T, rope_n_elem) fp32
        sin: torch.Tensor,
        cache_k: torch.Tensor,  # (S, G, L, D) this layer's cache
        cache_v: torch.Tensor,
        write: "CacheWrite",
        slots: torch.Tensor,  # (B,)
        num_keys: int,
        mask: torch.Tensor,  # (B, 1, T, num_keys) bool, True = may attend
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        D = cfg.head_size
        q, k, v = self.qkv(x).split(
            [cfg.n_head * D, cfg.n_query_groups * D, cfg.n_query_groups * D], dim=-1
        )  # contiguous [Q heads | K groups | V groups], the release layout
        q = apply_rope(q.view(B, T, cfg.n_head, D), cos, sin, cfg.rope_n_elem)
        k = apply_rope(k.view(B, T, cfg.n_query_groups, D), cos, sin, cfg.rope_n_elem)
        v = v.view(B, T, cfg.n_query_groups, D)

        # Only real tokens are written: padding rows must not touch any slot.
        cache_k[write.slot_index, :, write.position] = k[write.row, write.col].to(cache_k.dtype)
        cache_v[write.slot_index, :, write.position] = v[write.row, write.col].to(cache_v.dtype)

        keys = cache_k[slots, :, :num_keys].to(q.dtype)  # (B, G, K, D)
        values = cache_v[slots, :, :num_keys].to(q.dtype)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, H, T, D)
            keys,
            values,
            attn_mask=mask,
            scale=1.0 / math.sqrt(D),
            enable_gqa=cfg.n_query_groups != cfg.n_head,
        )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * D))


class LLaMAMLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.fc_2 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm_unit_offset)
        self.attn = Attention(cfg)
        self.norm_2 = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm_unit_offset)
        self.mlp = LLaMAMLP(cfg)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_elem: int) -> torch.Tensor:
    """Half-split rotation on the first ``n_elem`` dims; x (B, T, heads, D), cos/sin (B, T, n_elem)."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    rotated, passthrough = x[..., :n_elem], x[..., n_elem:]
    half = n_elem // 2
    x1, x2 = rotated[..., :half], rotated[..., half:]
    rotate_half = torch.cat((-x2, x1), dim=-1)
    # cos/sin stay fp32, so the product is fp32 and is rounded once (training kept them fp32).
    out = (rotated * cos + rotate_half * sin).to(x.dtype)
    if passthrough.shape[-1] == 0:
        return out
    return torch.cat((out, passthrough), dim=-1)


def rope_table(cfg: LMConfig, num_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (num_positions, rope_n_elem) in fp32, with positions rounded to float16 first.

    The release weights were trained with ``arange(..., dtype=float16)`` positions
    ("fix bug 1" in the reference), so position 2049 really is rotated as 2048.
    Positions above 65504 become inf in fp16; callers must stay far below that.
    """
    n_elem = cfg.rope_n_elem
    theta = 1.0 / (cfg.rope_base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    positions = torch.arange(num_positions, device=device).to(torch.float16).float() / cfg.rope_condense_ratio
    angles = torch.outer(positions, theta).repeat(1, 2)  # (P, n_elem)
    return torch.cos(angles), torch.sin(angles)


@dataclass(frozen=True)
class CacheWrite:
    """Where the real (non-padding) tokens of a batch go in the cache; all 1-D, same length."""

    row: torch.Tensor
    col: torch.Tensor
    slot_index: torch.Tensor
    position: torch.Tensor


@dataclass
class StepBatch:
    """One forward over several slots. Rows are right-padded to a common length.

    ``audio_mask`` marks the token positions whose embeddings are replaced, in
    row-major order, by the rows of ``audio_embeds``.
    """

    tokens: torch.Tensor  # (B, T) long
    positions: torch.Tensor  # (B, T) long; positions of padding entries are ignored
    lengths: torch.Tensor  # (B,) long, >= 1
    slots: torch.Tensor  # (B,) long, distinct
    audio_mask: torch.Tensor  # (B, T) bool
    audio_embeds: torch.Tensor | None  # (audio_mask.sum(), E)

    @staticmethod
    def build(
        rows: list[list[int]],
        start_positions: list[int],
        slots: list[int],
        audio_spans: list[Sequence[tuple[int, int]]],
        audio_embeds: torch.Tensor | None,
        device: torch.device,
    ) -> "StepBatch":
        """Rows of token ids starting at the given positions; ``audio_spans[i]``: (start, end) column spans."""
        B, T = len(rows), max(len(r) for r in rows)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        audio_mask = torch.zeros(B, T, dtype=torch.bool)
        for i, (row, start) in enumerate(zip(rows, start_positions)):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            positions[i, : len(row)] = torch.arange(start, start + len(row))
            for lo, hi in audio_spans[i]:
                audio_mask[i, lo:hi] = True
        return StepBatch(
            tokens=tokens.to(device),
            positions=positions.to(device),
            lengths=torch.tensor([len(r) for r in rows], dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            audio_mask=audio_mask.to(device),
            audio_embeds=audio_embeds,
        )


class SlotKVCache:
    """Per-layer K/V for ``num_slots`` independent sequences of up to ``max_positions`` tokens.

    A cache index is the token's exact position in its slot; joining or leaving
    a slot touches only that slot's rows, so other sessions stay bit-identical.
    """

    def __init__(
        self, cfg: LMConfig, num_slots: int, max_positions: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (cfg.n_layer, num_slots, cfg.n_query_groups, max_positions, cfg.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.max_positions = max_positions

    def clear_slot(self, slot: int) -> None:
        # Stale values at masked positions are harmless unless they are NaN/inf
        # (0 * NaN poisons attention), so a reused slot starts from zeros.
        self.k[:, slot].zero_()
        self.v[:, slot].zero_()

    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()


class AudioInteractionLM(nn.Module):
    """Qwen2 decoder in the release's LitGPT layout, stepping many slots per forward."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm_unit_offset),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=cfg.lm_head_bias)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_cache(self, num_slots: int, max_positions: int) -> SlotKVCache:
        param = self.lm_head.weight
        if max_positions > 65504:
            raise ValueError("max_positions above 65504 overflows the model's float16 RoPE positions")
        self._rope = rope_table(self.cfg, max_positions, param.device)
        return SlotKVCache(self.cfg, num_slots, max_positions, param.device, param.dtype)

    def forward(self, batch: StepBatch, cache: SlotKVCache) -> torch.Tensor:
        """Feed every row's tokens into its slot; return fp32 logits at each row's last token, (B, V)."""
        return self.logits(self.last_hidden(batch, cache))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (B, V) from ``last_hidden``; with ``token_ids`` (K,) only those columns, (B, K).

        A listening row needs just two logits (TEXT_BEGIN vs KEEP_SILENCE): projecting
        onto two rows of the 151,936-row head instead of all of them.
        """
        weight = self.lm_head.weight if token_ids is None else self.lm_head.weight[token_ids]
        bias = self.lm_head.bias if token_ids is None or self.lm_head.bias is None else self.lm_head.bias[token_ids]
        return F.linear(hidden, weight, bias).float()

    @torch.inference_mode()
    def last_hidden(self, batch: StepBatch, cache: SlotKVCache) -> torch.Tensor:
        """Feed every row's tokens into its slot; return the final-norm hidden state at each row's last token."""
        if self._rope is None or self._rope[0].shape[0] != cache.max_positions:
            self._rope = rope_table(self.cfg, cache.max_positions, cache.k.device)
        B, T = batch.tokens.shape
        valid = torch.arange(T, device=batch.tokens.device).unsqueeze(0) < batch.lengths.unsqueeze(1)  # (B, T)
        row, col = valid.nonzero(as_tuple=True)
        write = CacheWrite(row, col, batch.slots[row], batch.positions[row, col])
        num_keys = int(write.position.max()) + 1
        if num_keys > cache.max_positions:
            raise ValueError(f"position {num_keys - 1} is beyond the cache ({cache.max_positions} positions)")

        x = self.transformer.wte(batch.tokens)  # (B, T, E)
        if batch.audio_embeds is not None and batch.audio_embeds.shape[0] > 0:
            x[batch.audio_mask] = batch.audio_embeds.to(x.dtype)
        positions = batch.positions.masked_fill(~valid, 0)
        cos, sin = self._rope[0][positions], self._rope[1][positions]  # (B, T, n_elem)
        key_positions = torch.arange(num_keys, device=x.device)
        # Causal within the slot's own history; padding queries see position 0 only.
        mask = (key_positions.view(1, 1, 1, -1) <= positions.view(B, 1, T, 1))  # (B, 1, T, K)

        for layer, block in enumerate(self.transformer.h):
            x = x + block.attn(
                block.norm_1(x), cos, sin, cache.k[layer], cache.v[layer], write, batch.slots, num_keys, mask
            )
            x = x + block.mlp(block.norm_2(x))
        last = x[torch.arange(B, device=x.device), batch.lengths - 1]  # (B, E)
        return self.transformer.ln_f(last)
