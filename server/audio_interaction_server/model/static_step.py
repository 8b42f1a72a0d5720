"""A whole engine step at a fixed shape, from device buffers: what a CUDA graph captures and replays.

``StaticStep.run(bucket)`` runs encoder -> audio overwrite -> every LM layer -> the decision logits
of the listening rows, the argmax of the reply rows and every row's finiteness, reading only the
step's input buffers and writing only its output buffers. Nothing in it depends on the data's
values for a shape, a Python branch or a host read: no ``.item()``, no boolean indexing, no list
turned into a tensor. Which rows exist, where their tokens go and which embeddings are audio
are all values in the input buffers (filled by ``engine/packing.py``, copied in one transfer).

Layout of a step at ``Bucket(listening=L, reply=R)``: ``L x ROW_TOKENS`` listening query tokens
(row r at tokens ``r*ROW_TOKENS ...``, right-padded), then ``R`` reply tokens; rows are numbered the
same way (listening rows, then reply rows). Padding tokens and padding rows write their keys
into the cache's scratch slot and sit at position 0, so a padded step changes no session's slot
beyond its real tokens, and nothing a padding row computes reaches a real row.

The numerics are the eager path's (``lm.py``): RoPE from the same float16-rounded table, fp32
RMSNorm, audio that overwrites the PAD embeddings; on CPU in fp32 the two agree to float
rounding (tests/model/test_static_step.py). With ``fused=True`` (CUDA, ``engine.fused_kernels``)
the layers' RMSNorm + residual add, RoPE + cache write and SiLU x up run as the Triton kernels of
``fused_kernels.py`` (the same math; tests/model/test_fused_kernels.py); the default is the torch code.

Threading: not thread-safe; the worker thread owns it (with the model and the cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from audio_interaction_server.model import fused_kernels
from audio_interaction_server.model.encoder import NUM_MEL_BINS, AudioEncoder
from audio_interaction_server.model.lm import FLEX_QUERY_ROWS, AudioInteractionLM, Block, SlotKVCache, apply_rope
from audio_interaction_server.model.slot_attention import KernelConfig, RowSpans, gather_attention, triton_attention
from audio_interaction_server.spec import MEL_FRAMES_PER_CHUNK

# Query tokens per listening row: the bound of the eager path's short rows, so every short row fits.
ROW_TOKENS = FLEX_QUERY_ROWS

StaticAttention = Literal["gather", "triton"]


@dataclass(frozen=True, order=True)
class Bucket:
    """One static shape: ``listening`` rows of ``ROW_TOKENS`` tokens, then ``reply`` rows of one token."""

    listening: int
    reply: int

    @property
    def num_rows(self) -> int:
        return self.listening + self.reply

    @property
    def num_tokens(self) -> int:
        return self.listening * ROW_TOKENS + self.reply

    def fits(self, listening: int, reply: int) -> bool:
        return listening <= self.listening and reply <= self.reply

    def __str__(self) -> str:
        return f"{self.listening}x{ROW_TOKENS}+{self.reply}"


@dataclass(frozen=True)
class StepInputs:
    """Typed views of one input byte buffer (host staging or device): int64 per token and per row, then mel."""

    token: torch.Tensor  # (max tokens,) token ids
    position: torch.Tensor  # (max tokens,) position in the slot (RoPE and cache index); padding 0
    write_slot: torch.Tensor  # (max tokens,) slot the token's keys go to; padding: the scratch slot
    audio_source: torch.Tensor  # (max tokens,) row-major index into the step's audio embeddings, -1 = text
    row_slot: torch.Tensor  # (max rows,) slot each row reads; padding: scratch
    row_q_start: torch.Tensor  # (max rows,) first token of the row
    row_q_len: torch.Tensor  # (max rows,) real tokens of the row; padding: 0
    row_key_len: torch.Tensor  # (max rows,) last position + 1; padding: 0
    row_last: torch.Tensor  # (max rows,) token index of the row's last real token (padding: its first token)
    mel: torch.Tensor  # (max listening rows, 128, 40) float32: each listening row's chunk; padding rows zero


_TOKEN_FIELDS = ("token", "position", "write_slot", "audio_source")
_ROW_FIELDS = ("row_slot", "row_q_start", "row_q_len", "row_key_len", "row_last")
MEL_CHUNK_BYTES = NUM_MEL_BINS * MEL_FRAMES_PER_CHUNK * 4


@dataclass(frozen=True)
class StepLayout:
    """Where each input lives in one byte buffer sized for ``largest``; host and device share it."""

    largest: Bucket

    @property
    def int_bytes(self) -> int:
        return 8 * (len(_TOKEN_FIELDS) * self.largest.num_tokens + len(_ROW_FIELDS) * self.largest.num_rows)

    @property
    def num_bytes(self) -> int:
        return self.int_bytes + self.largest.listening * MEL_CHUNK_BYTES

    def bytes_used(self, bucket: Bucket) -> int:
        """The prefix of the buffer a step at ``bucket`` reads: every int field, then its rows' mel chunks."""
        return self.int_bytes + bucket.listening * MEL_CHUNK_BYTES

    def views(self, buffer: torch.Tensor) -> StepInputs:
        if buffer.dtype != torch.uint8 or buffer.numel() != self.num_bytes:
            raise ValueError(f"expected a uint8 buffer of {self.num_bytes} bytes, got {buffer.dtype} "
                             f"x {buffer.numel()}")
        ints = buffer[: self.int_bytes].view(torch.int64)
        views: dict[str, torch.Tensor] = {}
        offset = 0
        for names, size in ((_TOKEN_FIELDS, self.largest.num_tokens), (_ROW_FIELDS, self.largest.num_rows)):
            for name in names:
                views[name] = ints[offset: offset + size]
                offset += size
        mel = buffer[self.int_bytes:].view(torch.float32).view(self.largest.listening, NUM_MEL_BINS,
                                                                MEL_FRAMES_PER_CHUNK)
        return StepInputs(**views, mel=mel)


class StaticStep:
    """Device buffers for the largest bucket, and ``run(bucket)``: the graph-safe step over views of them.

    ``outputs[:rows]`` (int64, (rows, 2)): per row its token (the decision for listening rows, the
    argmax for reply rows) and 1 if its logits are finite. ``hidden`` holds each row's final-norm
    hidden state, ``reply_logits`` the reply rows' fp32 logits (rows that sample read them after
    the step, like the eager path).
    """

    def __init__(self, lm: AudioInteractionLM, encoder: AudioEncoder, cache: SlotKVCache, largest: Bucket,
                 decision_tokens: tuple[int, int], attention: StaticAttention = "gather",
                 kernel: KernelConfig = KernelConfig(), fused: bool = False) -> None:
        if cache.scratch_slot is None:
            raise ValueError("a static step needs a cache with a scratch slot (new_cache(..., scratch_slot=True))")
        if largest.listening < 0 or largest.reply < 0 or largest.num_rows == 0:
            raise ValueError(f"the largest bucket must hold at least one row, got {largest}")
        if fused and not fused_kernels.fused_kernels_runnable(cache.k.device):
            raise ValueError("the fused kernels need triton and a CUDA device (or Triton's interpreter)")
        self.lm = lm
        self.encoder = encoder
        self.cache = cache
        self.layout = StepLayout(largest)
        self.attention = attention
        self.kernel = kernel
        # Read by run(): a CUDA graph records whichever way it ran when captured.
        self.fused = fused
        cfg = lm.cfg
        device = cache.k.device
        self.device = device
        self._input_bytes = torch.zeros(self.layout.num_bytes, dtype=torch.uint8, device=device)
        self.inputs = self.layout.views(self._input_bytes)
        self.outputs = torch.zeros(largest.num_rows, 2, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(largest.num_rows, cfg.n_embd, dtype=lm.lm_head.weight.dtype, device=device)
        self.reply_logits = torch.zeros(largest.reply, cfg.padded_vocab_size, dtype=torch.float32, device=device)
        ids = torch.tensor(decision_tokens, dtype=torch.int64, device=device)
        self._decision_ids = ids
        self._decision_weight = lm.lm_head.weight[ids].detach().clone()  # (2, E): two rows of the head
        bias = lm.lm_head.bias
        self._decision_bias = None if bias is None else bias[ids].detach().clone()
        self._rope = lm.rope(cache)
        self._scale = 1.0 / math.sqrt(cfg.head_size)

    @property
    def largest(self) -> Bucket:
        return self.layout.largest

    def poison_outputs(self) -> None:
        """Overwrite every output buffer with values no step gives (token -1, NaN hidden states and logits) and a
        finite flag of 0 (-1 would read as True: finite).

        A check that runs the step eagerly and then replays its graph on the same buffers poisons them in
        between: a replay that writes nothing (or not every row) then shows, instead of passing on the eager
        run's leftovers."""
        self.outputs[:, 0].fill_(-1)
        self.outputs[:, 1].fill_(0)
        self.hidden.fill_(float("nan"))
        self.reply_logits.fill_(float("nan"))

    def load(self, staging: torch.Tensor, bucket: Bucket) -> None:
        """The step's one host->device copy: the prefix of ``staging`` (same layout) that ``bucket`` reads."""
        used = self.layout.bytes_used(bucket)
        self._input_bytes[:used].copy_(staging[:used], non_blocking=True)

    @torch.inference_mode()
    def run(self, bucket: Bucket) -> None:
        """One step at ``bucket`` from ``inputs`` into ``outputs``/``hidden``/``reply_logits``: graph-safe."""
        if not self.largest.fits(bucket.listening, bucket.reply):
            raise ValueError(f"bucket {bucket} exceeds the buffers' {self.largest}")
        lm, inputs = self.lm, self.inputs
        num_tokens, num_rows, L = bucket.num_tokens, bucket.num_rows, bucket.listening
        tokens, positions = inputs.token[:num_tokens], inputs.position[:num_tokens]
        x = lm.transformer.wte(tokens)  # (C, E)
        if L:
            audio = self.encoder.encode(inputs.mel[:L]).flatten(0, 1)  # (L*10, E): row r's chunk at r*10
            source = inputs.audio_source[:num_tokens]
            # Overwrite, never add: the PAD embeddings are replaced by the row's audio (a gather, no mask indexing).
            x = torch.where((source >= 0).unsqueeze(-1), audio[source.clamp(min=0)].to(x.dtype), x)
        write_slot = inputs.write_slot[:num_tokens]
        if self.fused:
            hidden = self._fused_layers(x, bucket, positions, write_slot, inputs.row_last[:num_rows])
        else:
            cos, sin = self._rope[0][positions], self._rope[1][positions]  # (C, n_elem) fp32
            for layer, block in enumerate(lm.transformer.h):
                x = x + self._attention(block, block.norm_1(x), cos, sin, layer, bucket, positions, write_slot)
                x = x + block.mlp(block.norm_2(x))
            hidden = lm.transformer.ln_f(x[inputs.row_last[:num_rows]])  # (B, E)
        self.hidden[:num_rows].copy_(hidden)
        if L:
            decision_logits = F.linear(hidden[:L], self._decision_weight, self._decision_bias).float()  # (L, 2)
            speak = decision_logits[:, 0] > decision_logits[:, 1]  # strictly greater, as engine.sampling.decide
            self.outputs[:L, 0].copy_(torch.where(speak, self._decision_ids[0], self._decision_ids[1]))
            self.outputs[:L, 1].copy_(torch.isfinite(decision_logits).all(dim=-1))
        if bucket.reply:
            logits = lm.logits(hidden[L:])  # (R, V) fp32
            self.reply_logits[: bucket.reply].copy_(logits)
            self.outputs[L:num_rows, 0].copy_(logits.argmax(dim=-1))
            self.outputs[L:num_rows, 1].copy_(torch.isfinite(logits).all(dim=-1))

    def _fused_layers(self, x: torch.Tensor, bucket: Bucket, positions: torch.Tensor, write_slot: torch.Tensor,
                      row_last: torch.Tensor) -> torch.Tensor:
        """The layers with the fused kernels: (C, E) embeddings in, the rows' final-norm hidden states (B, E) out.

        Each residual add rides on the next RMSNorm's kernel (``x`` is updated in place), so a layer is
        norm+add, qkv, RoPE+cache write, attention, proj, norm+add, fc_1, fc_2, SiLU x up, proj.
        """
        cfg = self.lm.cfg
        H, D = cfg.n_head, cfg.head_size
        shape = fused_kernels.RopeShape(H, cfg.n_query_groups, D, cfg.rope_n_elem)
        cos_table, sin_table = self._rope
        blocks = list(self.lm.transformer.h)
        x = x.contiguous()  # a fresh tensor of this step: the residual adds write into it
        h = fused_kernels.add_rms_norm(x, blocks[0].norm_1.weight, blocks[0].norm_1.eps, blocks[0].norm_1.unit_offset)
        for layer, block in enumerate(blocks):
            cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]  # (G, S, P, D)
            q = fused_kernels.rope_and_write_cache(block.attn.qkv(h), cos_table, sin_table, positions, write_slot,
                                                   cache_k, cache_v, shape)  # (C, H, D)
            y = self._attend(q, cache_k, cache_v, bucket, positions)
            attended = block.attn.proj(y.reshape(-1, H * D))
            h = fused_kernels.add_rms_norm(x, block.norm_2.weight, block.norm_2.eps, block.norm_2.unit_offset,
                                           residual=attended)  # x += attended
            mlp = block.mlp
            out = mlp.proj(fused_kernels.silu_mul(mlp.fc_1(h), mlp.fc_2(h)))
            if layer + 1 < len(blocks):
                norm = blocks[layer + 1].norm_1
                h = fused_kernels.add_rms_norm(x, norm.weight, norm.eps, norm.unit_offset, residual=out)
            else:
                x.add_(out)
        ln_f = self.lm.transformer.ln_f
        return fused_kernels.add_rms_norm(x[row_last], ln_f.weight, ln_f.eps, ln_f.unit_offset)  # (B, E)

    def _attend(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, bucket: Bucket,
                positions: torch.Tensor) -> torch.Tensor:
        """Attention of the step's queries (C, H, D), their keys already in the cache: (C, H, D)."""
        if self.attention == "triton":
            return self._triton(q, cache_k, cache_v, bucket)
        return self._gather(q, cache_k, cache_v, bucket, positions)

    def _attention(self, block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                   bucket: Bucket, positions: torch.Tensor, write_slot: torch.Tensor) -> torch.Tensor:
        cfg = self.lm.cfg
        C, D, H, G = x.shape[0], cfg.head_size, cfg.n_head, cfg.n_query_groups
        q, k, v = block.attn.qkv(x).split([H * D, G * D, G * D], dim=-1)  # [Q heads | K groups | V groups]
        q = apply_rope(q.view(C, H, D), cos, sin, cfg.rope_n_elem)
        k = apply_rope(k.view(C, G, D), cos, sin, cfg.rope_n_elem)
        v = v.view(C, G, D)
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]  # (G, S, P, D)
        cache_k[:, write_slot, positions] = k.transpose(0, 1).to(cache_k.dtype)
        cache_v[:, write_slot, positions] = v.transpose(0, 1).to(cache_v.dtype)
        y = self._attend(q, cache_k, cache_v, bucket, positions)
        return block.attn.proj(y.reshape(C, H * D))

    def _gather(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, bucket: Bucket,
                positions: torch.Tensor) -> torch.Tensor:
        """Listening rows as (L, H, ROW_TOKENS, D) and reply rows as (R, H, 1, D): two masked SDPA calls."""
        cfg = self.lm.cfg
        H, D = cfg.n_head, cfg.head_size
        L, R = bucket.listening, bucket.reply
        parts = []
        for rows, width, first_token, first_row in ((L, ROW_TOKENS, 0, 0), (R, 1, L * ROW_TOKENS, L)):
            if rows == 0:
                continue
            tokens = slice(first_token, first_token + rows * width)
            grid = q[tokens].view(rows, width, H, D).transpose(1, 2)  # (rows, H, width, D)
            y = gather_attention(grid, cache_k, cache_v, self.inputs.row_slot[first_row: first_row + rows],
                                 positions[tokens].view(rows, width), self._scale,
                                 cfg.n_query_groups != cfg.n_head)
            parts.append(y.transpose(1, 2).reshape(rows * width, H, D))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _triton(self, q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                bucket: Bucket) -> torch.Tensor:
        """One launch for the listening rows (16-token tiles), one for the reply rows (1-token tiles)."""
        out = torch.zeros_like(q)  # padding rows and columns are never stored: they stay zero
        L, R = bucket.listening, bucket.reply
        inputs = self.inputs
        for rows, first_row, max_q_len in ((L, 0, ROW_TOKENS), (R, L, 1)):
            if rows == 0:
                continue
            span = slice(first_row, first_row + rows)
            spans = RowSpans(inputs.row_q_start[span], inputs.row_q_len[span], inputs.row_slot[span],
                             inputs.row_key_len[span])
            triton_attention(q, cache_k, cache_v, out, spans, max_q_len, self._scale, self.kernel)
        return out

