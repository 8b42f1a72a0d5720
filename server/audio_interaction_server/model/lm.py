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
from collections.abc import Iterable, Iterator, Sequence
import functools
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """``nn.Embedding``, except that on the meta device (where loaders build modules before the weights are read
    in) its weight is not drawn at random: ``normal_`` on a meta tensor runs torch's Python reference kernels,
    whose first use imports ``torch._dynamo``, about a second of every server start. The other layers' init has
    native meta kernels."""
    if torch.empty(0).is_meta:
        return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
    return nn.Embedding(num_embeddings, embedding_dim)


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
        x: torch.Tensor,  # (N, E): the batch's real tokens, packed row-major
        cos: torch.Tensor,  # (N, rope_n_elem) fp32
        sin: torch.Tensor,
        cache_k: torch.Tensor,  # (G, S, L, D) this layer's cache
        cache_v: torch.Tensor,
        plan: "AttentionPlan",
    ) -> torch.Tensor:
        cfg = self.cfg
        N = x.shape[0]
        D = cfg.head_size
        q, k, v = self.qkv(x).split(
            [cfg.n_head * D, cfg.n_query_groups * D, cfg.n_query_groups * D], dim=-1
        )  # contiguous [Q heads | K groups | V groups], the release layout
        q = apply_rope(q.view(N, cfg.n_head, D), cos, sin, cfg.rope_n_elem)
        k = apply_rope(k.view(N, cfg.n_query_groups, D), cos, sin, cfg.rope_n_elem)
        v = v.view(N, cfg.n_query_groups, D)

        write = plan.write  # packed token i goes to (slot_index[i], position[i])
        cache_k[:, write.slot_index, write.position] = k.transpose(0, 1).to(cache_k.dtype)
        cache_v[:, write.slot_index, write.position] = v.transpose(0, 1).to(cache_v.dtype)

        # Attention works on rows, so queries are scattered into a zero-padded (B, T) grid and back.
        B, T = plan.positions.shape
        grid = q.new_zeros(B, T, cfg.n_head, D)
        grid[write.row, write.col] = q
        y = plan.attend(grid.transpose(1, 2), cache_k, cache_v)  # (B, H, T, D)
        y = y.transpose(1, 2)[write.row, write.col]  # (N, H, D)
        return self.proj(y.reshape(N, cfg.n_head * D))


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


class Blocks(nn.ModuleList):
    """The decoder's layers: an nn.ModuleList (state dict keys ``h.{i}.``) that iterates as ``Block``s.

    nn.ModuleList yields plain Modules, so every ``block.attn`` would type as ``Tensor | Module``.
    """

    def __init__(self, blocks: Iterable[Block]) -> None:
        super().__init__(blocks)

    def __iter__(self) -> Iterator[Block]:
        # Only Blocks are put in (the constructor takes nothing else), so the cast states what the list holds.
        return cast(Iterator[Block], super().__iter__())


class Transformer(nn.Module):
    """The checkpoint's ``transformer`` submodule, with its children named as in the state dict (wte, h, ln_f)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.wte = embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.h = Blocks(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm_unit_offset)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_elem: int) -> torch.Tensor:
    """Half-split rotation on the first ``n_elem`` dims; x (..., heads, D), cos/sin (..., n_elem)."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
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


AttentionBackend = Literal["gather", "flex"]

# FlexAttention's KV block: a slot's keys are whole blocks, so max_positions must be a multiple of it.
FLEX_BLOCK = 128


class AttentionPlan:
    """How every layer of one step reads the cache: built once per step, shared by the layers.

    ``gather`` copies each row's slot (up to the longest position in the batch)
    into a dense (B, G, K, D) tensor and runs SDPA with a mask: simple and fast
    for a tiny model on CPU, but at 3B scale on a GPU it copies the whole
    live cache every layer. ``flex`` reads the cache in place: the cache is
    viewed as one long sequence per KV head and a FlexAttention block mask
    lists, for each row, only the blocks of its own slot up to its last
    position, so nothing is copied and no other slot is even visited.
    """

    def __init__(self, write: CacheWrite, slots: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                 num_keys: int, scale: float, enable_gqa: bool) -> None:
        self.write = write
        self.slots = slots  # (B,)
        self.positions = positions  # (B, T); padding queries at position 0
        self.lengths = lengths  # (B,) real tokens per row
        self.num_keys = num_keys
        self.scale = scale
        self.enable_gqa = enable_gqa

    def attend(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GatherAttention(AttentionPlan):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        B, T = self.positions.shape
        key_positions = torch.arange(self.num_keys, device=self.positions.device)
        # Causal within the slot's own history; padding queries see position 0 only.
        self.mask = key_positions.view(1, 1, 1, -1) <= self.positions.view(B, 1, T, 1)  # (B, 1, T, K)

    def attend(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        keys = cache_k[:, self.slots, : self.num_keys].transpose(0, 1).to(q.dtype)  # (B, G, K, D)
        values = cache_v[:, self.slots, : self.num_keys].transpose(0, 1).to(q.dtype)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self.mask, scale=self.scale, enable_gqa=self.enable_gqa
        )


class FlexAttention(AttentionPlan):
    """In-place attention for short rows (listening blocks, reply tokens), padded to a few fixed shapes.

    Compiled FlexAttention specialises on shapes, so the batch is padded to a
    power of two and rows to ``FLEX_QUERY_ROWS`` tokens: at most
    log2(max rows) kernels are ever compiled. Padding rows visit no block.
    """

    def __init__(self, *args, max_positions: int, num_slots: int, compiled: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from torch.nn.attention.flex_attention import BlockMask

        B, T = self.positions.shape
        if max_positions % FLEX_BLOCK:
            raise ValueError(f"flex attention needs max_positions divisible by {FLEX_BLOCK}, got {max_positions}")
        if T > FLEX_QUERY_ROWS:
            raise ValueError(f"flex attention serves rows of at most {FLEX_QUERY_ROWS} tokens, got {T}")
        self._flex = _compiled_flex_attention() if compiled else _eager_flex_attention()
        self.rows = B
        padded_rows = flex_batch_bucket(B)
        device = self.positions.device
        blocks_per_slot = max_positions // FLEX_BLOCK
        total_blocks = num_slots * blocks_per_slot
        slots = F.pad(self.slots, (0, padded_rows - B))
        positions = F.pad(self.positions, (0, FLEX_QUERY_ROWS - T, 0, padded_rows - B))
        lengths = F.pad(self.lengths, (0, padded_rows - B))  # padding rows: 0
        L = max_positions
        # Keys before a row's first position are visible to all its queries (full blocks, no
        # mask_mod); the blocks from there to its last position are partial (causal inside).
        start = positions[:, 0]
        has_queries = lengths > 0
        full = torch.where(has_queries, start // FLEX_BLOCK, 0).to(torch.int32)  # (B',)
        reach = torch.where(has_queries, (start + lengths - 1) // FLEX_BLOCK + 1, 0).to(torch.int32)
        base = (slots * blocks_per_slot).to(torch.int32).view(-1, 1)
        ladder = torch.arange(total_blocks, device=device, dtype=torch.int32).view(1, -1)
        # Entries past a row's count are never read; they only have to be valid block indices.
        full_indices = (base + ladder).clamp(max=total_blocks - 1)
        partial_indices = (base + full.view(-1, 1) + ladder).clamp(max=total_blocks - 1)

        def causal_in_own_slot(b, h, q_idx, kv_idx):
            return (kv_idx // L == slots[b]) & (kv_idx % L <= positions[b, q_idx])

        def per_row(counts: torch.Tensor) -> torch.Tensor:
            return counts.view(padded_rows, 1, 1).contiguous()  # (B', 1 head, 1 query block)

        def per_row_indices(indices: torch.Tensor) -> torch.Tensor:
            return indices.view(padded_rows, 1, 1, total_blocks).contiguous()

        self.block_mask = BlockMask.from_kv_blocks(
            per_row(reach - full),
            per_row_indices(partial_indices),
            per_row(full),
            per_row_indices(full_indices),
            BLOCK_SIZE=FLEX_BLOCK,
            mask_mod=causal_in_own_slot,
            seq_lengths=(FLEX_QUERY_ROWS, total_blocks * FLEX_BLOCK),
        )

    def attend(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        G, S, L, D = cache_k.shape
        B, H, T, _ = q.shape
        padded = F.pad(q, (0, 0, 0, FLEX_QUERY_ROWS - T, 0, 0, 0, flex_batch_bucket(B) - B))
        # (G, S, L, D) -> (1, G, S*L, D) is a view: the cache is read where it lies.
        keys = cache_k.view(1, G, S * L, D)
        values = cache_v.view(1, G, S * L, D)
        y = self._flex(padded, keys, values, block_mask=self.block_mask, scale=self.scale,
                       enable_gqa=self.enable_gqa)
        return y[:B, :, :T]


# Rows up to this many tokens (a listening block is 13, a reply step 1) use in-place attention;
# longer ones (a session's first row, a context rollover) are rare and gather their one slot.
# The engine's scheduler batches long rows apart by this same bound (engine/scheduler.LONG_ROW_TOKENS
# imports it), so a short batch is always one the in-place path serves.
FLEX_QUERY_ROWS = 16


def flex_batch_bucket(rows: int) -> int:
    """The padded batch size for ``rows`` rows: the next power of two, at least 8."""
    return max(8, 1 << (rows - 1).bit_length())


def _eager_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex_attention():
    # One compiled function for the process, specialised per padded shape (see FlexAttention).
    # Static shapes: dynamic-shape flex kernels failed to build with the CPU backend of torch 2.13.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(_eager_flex_attention(), dynamic=False)


@dataclass
class StepBatch:
    """One forward over several slots. Rows are right-padded to a common length.

    ``audio_index`` lists the packed (row-major, real tokens only) indices whose
    embeddings are replaced, in order, by the rows of ``audio_embeds``. Everything the step needs
    to know about shapes and positions is computed here on the host, so the
    forward never waits on the device to learn them.
    """

    tokens: torch.Tensor  # (B, T) long
    positions: torch.Tensor  # (B, T) long; padding entries are 0
    lengths: torch.Tensor  # (B,) long, >= 1
    slots: torch.Tensor  # (B,) long, distinct
    audio_embeds: torch.Tensor | None  # (len(audio_index), E)
    write: CacheWrite  # where the real tokens go in the cache, in packed (row-major) order
    num_keys: int  # 1 + the largest position in the batch
    audio_index: torch.Tensor  # (A,) packed indices of the audio tokens, row-major
    last_index: torch.Tensor  # (B,) packed index of each row's last token

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
        write_row: list[int] = []
        write_col: list[int] = []
        write_slot: list[int] = []
        write_position: list[int] = []
        audio_index: list[int] = []
        last_index: list[int] = []
        for i, (row, start) in enumerate(zip(rows, start_positions)):
            n = len(row)
            tokens[i, :n] = torch.tensor(row, dtype=torch.long)
            positions[i, :n] = torch.arange(start, start + n)
            for lo, hi in audio_spans[i]:
                audio_index += range(len(write_row) + lo, len(write_row) + hi)
            last_index.append(len(write_row) + n - 1)
            write_row += [i] * n
            write_col += range(n)
            write_slot += [slots[i]] * n
            write_position += range(start, start + n)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)

        def put(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return StepBatch(
            tokens=tokens.to(device, non_blocking=True),
            positions=positions.to(device, non_blocking=True),
            lengths=lengths.to(device, non_blocking=True),
            slots=put(slots),
            audio_embeds=audio_embeds,
            write=CacheWrite(put(write_row), put(write_col), put(write_slot), put(write_position)),
            num_keys=max(start + len(row) for row, start in zip(rows, start_positions)),
            audio_index=put(audio_index),
            last_index=put(last_index),
        )


class SlotKVCache:
    """Per-layer K/V for ``num_slots`` independent sequences of up to ``max_positions`` tokens.

    A cache index is the token's exact position in its slot; joining or leaving
    a slot touches only that slot's rows, so other sessions stay bit-identical.
    With ``scratch_slot``, one more slot (index ``num_slots``) is allocated and never
    given to a session: the padding rows of a static step write their keys there.
    """

    def __init__(
        self, cfg: LMConfig, num_slots: int, max_positions: int, device: torch.device, dtype: torch.dtype,
        scratch_slot: bool = False,
    ) -> None:
        self.total_slots = num_slots + int(scratch_slot)
        shape = self.shape(cfg, self.total_slots, max_positions)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots  # the slots sessions may own
        self.scratch_slot: int | None = num_slots if scratch_slot else None
        self.max_positions = max_positions

    @staticmethod
    def shape(cfg: LMConfig, num_slots: int, max_positions: int) -> tuple[int, ...]:
        # Heads before slots: one layer's (G, S, L, D) views as (1, G, S*L, D) for in-place attention.
        return (cfg.n_layer, cfg.n_query_groups, num_slots, max_positions, cfg.head_size)

    @staticmethod
    def bytes_per_slot(cfg: LMConfig, max_positions: int, dtype: torch.dtype) -> int:
        """K and V of one slot, every layer: what a cache of this layout costs per session, before allocating it."""
        return 2 * math.prod(SlotKVCache.shape(cfg, 1, max_positions)) * dtype.itemsize

    def clear_slot(self, slot: int) -> None:
        # Stale values at masked positions are harmless unless they are NaN/inf
        # (0 * NaN poisons attention), so a reused slot starts from zeros.
        self.k[:, :, slot].zero_()
        self.v[:, :, slot].zero_()

    def read_positions(self, slot: int, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``slot``'s keys and values at positions 0..num_positions-1: (layers, groups, P, head_size)."""
        return self.k[:, :, slot, :num_positions].clone(), self.v[:, :, slot, :num_positions].clone()

    def write_positions(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put ``read_positions``' copies (of any slot) at positions 0..P-1 of ``slot``."""
        num_positions = keys.shape[2]
        self.k[:, :, slot, :num_positions].copy_(keys)
        self.v[:, :, slot, :num_positions].copy_(values)


class AudioInteractionLM(nn.Module):
    """Qwen2 decoder in the release's LitGPT layout, stepping many slots per forward."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=cfg.lm_head_bias)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        # How attention reads the cache (see AttentionPlan); the worker picks these per device.
        self.attention_backend: AttentionBackend = "gather"
        self.compile_attention = False

    def new_cache(self, num_slots: int, max_positions: int, scratch_slot: bool = False) -> SlotKVCache:
        param = self.lm_head.weight
        if max_positions > 65504:
            raise ValueError("max_positions above 65504 overflows the model's float16 RoPE positions")
        self._rope = rope_table(self.cfg, max_positions, param.device)
        return SlotKVCache(self.cfg, num_slots, max_positions, param.device, param.dtype, scratch_slot)

    def rope(self, cache: SlotKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (max_positions, rope_n_elem) for ``cache``, built once and then kept (graphs bake it in)."""
        if self._rope is None or self._rope[0].shape[0] != cache.max_positions:
            self._rope = rope_table(self.cfg, cache.max_positions, cache.k.device)
        return self._rope

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
        rope = self.rope(cache)
        if batch.num_keys > cache.max_positions:
            raise ValueError(f"position {batch.num_keys - 1} is beyond the cache ({cache.max_positions} positions)")
        # Linear layers and norms see only real tokens (a 1-token reply row is not padded to 13).
        write = batch.write
        x = self.transformer.wte(batch.tokens[write.row, write.col])  # (N, E)
        if batch.audio_embeds is not None and batch.audio_embeds.shape[0] > 0:
            x[batch.audio_index] = batch.audio_embeds.to(x.dtype)
        cos, sin = rope[0][write.position], rope[1][write.position]  # (N, n_elem)
        plan = self._attention_plan(batch, cache)
        for layer, block in enumerate(self.transformer.h):
            x = x + block.attn(block.norm_1(x), cos, sin, cache.k[layer], cache.v[layer], plan)
            x = x + block.mlp(block.norm_2(x))
        return self.transformer.ln_f(x[batch.last_index])  # (B, E)

    def _attention_plan(self, batch: StepBatch, cache: SlotKVCache) -> AttentionPlan:
        common = dict(
            write=batch.write, slots=batch.slots, positions=batch.positions, lengths=batch.lengths,
            num_keys=batch.num_keys, scale=1.0 / math.sqrt(self.cfg.head_size),
            enable_gqa=self.cfg.n_query_groups != self.cfg.n_head,
        )
        if self.attention_backend == "flex" and batch.tokens.shape[1] <= FLEX_QUERY_ROWS:
            return FlexAttention(**common, max_positions=cache.max_positions, num_slots=cache.total_slots,
                                 compiled=self.compile_attention)
        return GatherAttention(**common)
