"""Audio tower: 40-frame log-mel chunks in, 10 LM-sized embeddings per chunk out.

Each 0.4 s chunk is encoded independently (the encoder's attention is limited
to a chunk by ``feature_lens``), so chunks of many sessions go through one
call and the result is the same as encoding them one at a time. That also
lets a call be padded with all-zero chunks whose outputs are dropped: every call
is rounded up to one of a few batch sizes (``batch_bucket``), because oneDNN
(the CPU backend) builds and caches a convolution primitive per input shape
(about 0.2 MiB of heap per new batch size in benchmarks/encoder_shapes.py, in a
1,024-entry cache), and a server that sees every size from 1 to a few hundred
chunks (sessions deciding in one step, rollovers re-encoding 90-170 kept
chunks) would keep growing that cache, and fragmenting the heap around it, for
hours. See docs/reliability.md.

Threading: not thread-safe; only the worker thread calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from audio_interaction_server.spec import AUDIO_FRAMES_PER_CHUNK, MEL_FRAMES_PER_CHUNK

NUM_MEL_BINS = 128

_Part = TypeVar("_Part")


def _part(owner: nn.Module, name: str, kind: type[_Part]) -> _Part:
    """``owner.<name>``, checked to be a ``kind``.

    nn.Module types its children as ``Tensor | Module``; reading each part once
    here gives the forward its real types, and a tower of another layout fails
    at load time naming the part, instead of somewhere inside the first forward.
    """
    where = f"audio tower: {type(owner).__name__}.{name}"
    if not hasattr(owner, name):
        raise TypeError(f"{where} is missing (not a Qwen2.5-Omni audio tower?)")
    value = getattr(owner, name)
    if not isinstance(value, kind):
        raise TypeError(f"{where} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


@dataclass(frozen=True)
class _Attention:
    """One layer's self-attention projections (the modules themselves: their weights follow ``.to()``)."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    num_heads: int
    scaling: float

    @staticmethod
    def of(attn: nn.Module) -> _Attention:
        return _Attention(_part(attn, "q_proj", nn.Linear), _part(attn, "k_proj", nn.Linear),
                          _part(attn, "v_proj", nn.Linear), _part(attn, "out_proj", nn.Linear),
                          _part(attn, "num_heads", int), _part(attn, "scaling", float))


@dataclass(frozen=True)
class _Layer:
    self_attn_layer_norm: nn.LayerNorm
    self_attn: _Attention
    final_layer_norm: nn.LayerNorm
    fc1: nn.Linear
    activation_fn: nn.Module  # transformers' ACT2FN entry (GELUActivation for this tower)
    fc2: nn.Linear

    @staticmethod
    def of(layer: nn.Module) -> _Layer:
        return _Layer(_part(layer, "self_attn_layer_norm", nn.LayerNorm),
                      _Attention.of(_part(layer, "self_attn", nn.Module)),
                      _part(layer, "final_layer_norm", nn.LayerNorm), _part(layer, "fc1", nn.Linear),
                      _part(layer, "activation_fn", nn.Module), _part(layer, "fc2", nn.Linear))


@dataclass(frozen=True)
class _Tower:
    """The parts of transformers' Qwen2_5OmniAudioEncoder that the batched forward runs."""

    conv1: nn.Conv1d
    conv2: nn.Conv1d
    # The module, not its table: the table is a buffer, and ``.to()`` replaces buffers with new tensors.
    positions: nn.Module
    layers: tuple[_Layer, ...]
    ln_post: nn.LayerNorm
    proj: nn.Linear

    @staticmethod
    def of(tower: nn.Module) -> _Tower:
        layers = _part(tower, "layers", nn.ModuleList)
        return _Tower(_part(tower, "conv1", nn.Conv1d), _part(tower, "conv2", nn.Conv1d),
                      _part(tower, "positional_embedding", nn.Module), tuple(_Layer.of(layer) for layer in layers),
                      _part(tower, "ln_post", nn.LayerNorm), _part(tower, "proj", nn.Linear))

    def position_table(self) -> torch.Tensor:
        return self.positions.get_buffer("positional_embedding")


def batch_bucket(num_chunks: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3*2^k) that holds ``num_chunks``.

    Two sizes per doubling: at most 2*log2(N) shapes ever, and at most a third of
    a call is padding (a pure power of two would waste up to half).
    """
    if num_chunks <= 2:
        return max(num_chunks, 1)
    power = 1 << (num_chunks - 1).bit_length()  # smallest 2^k >= n
    three_quarters = power // 4 * 3
    return three_quarters if three_quarters >= num_chunks else power


class AudioEncoder:
    def __init__(self, tower: torch.nn.Module, pad_to_buckets: bool = True) -> None:
        self.tower = tower
        self.parts = _Tower.of(tower)
        self.param = next(tower.parameters())
        self.pad_to_buckets = pad_to_buckets

    @property
    def output_dim(self) -> int:
        return self.parts.proj.out_features

    @torch.inference_mode()
    def encode(self, mel_chunks: torch.Tensor) -> torch.Tensor:
        """(N, 128, 40) mel chunks -> (N, 10, output_dim) embeddings, in the tower's dtype."""
        if mel_chunks.dim() != 3 or mel_chunks.shape[1:] != (NUM_MEL_BINS, MEL_FRAMES_PER_CHUNK):
            raise ValueError(f"expected mel chunks (N, 128, 40), got {tuple(mel_chunks.shape)}")
        num_chunks = mel_chunks.shape[0]
        if num_chunks == 0:
            return torch.empty(0, AUDIO_FRAMES_PER_CHUNK, self.output_dim, device=self.param.device)
        device = self.param.device
        mel_chunks = mel_chunks.to(device)
        if self.pad_to_buckets and (bucket := batch_bucket(num_chunks)) > num_chunks:
            silence = mel_chunks.new_zeros(bucket - num_chunks, *mel_chunks.shape[1:])
            return self._encode(torch.cat([mel_chunks, silence]))[:num_chunks]
        return self._encode(mel_chunks)

    def _encode(self, mel_chunks: torch.Tensor) -> torch.Tensor:
        """The tower's forward, with the chunks as a batch instead of one packed sequence.

        transformers' audio tower packs every chunk into one sequence and, unless
        flash-attention is installed, runs attention chunk by chunk in a Python
        loop (after a ``tolist()`` device sync in every layer): 768 chunks on an
        H200 took 605 ms, 24,576 tiny attention calls per encoder call. Every
        chunk here has the same 40 mel frames and attends only to itself, so the
        same modules and weights run as one (N, 20, D) batch with one attention
        call per layer. ``test_encoder.py`` checks this against the tower's own
        forward.
        """
        tower = self.parts
        num_chunks = mel_chunks.shape[0]
        x = mel_chunks.to(tower.conv1.weight.dtype)  # (N, 128, 40)
        x = F.gelu(tower.conv1(x))  # (N, D, 40): every frame is real, so the tower's padding mask is all ones
        x = F.gelu(tower.conv2(x)).transpose(1, 2)  # (N, 20, D): stride 2
        frames = x.shape[1]
        x = x + tower.position_table()[:frames].unsqueeze(0).to(x.dtype)
        for layer in tower.layers:
            x = x + self._attention(layer.self_attn, layer.self_attn_layer_norm(x))
            x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
            if x.dtype == torch.float16:  # the tower's own overflow guard
                limit = torch.finfo(x.dtype).max - 1000
                x = x.clamp(min=-limit, max=limit)
        x = (x[:, 0::2] + x[:, 1::2]) / 2  # (N, 10, D): stride-2 average pooling, as the tower writes it
        x = tower.proj(tower.ln_post(x))  # (N, 10, output_dim)
        return x.view(num_chunks, AUDIO_FRAMES_PER_CHUNK, -1)

    @staticmethod
    def _attention(attn: _Attention, x: torch.Tensor) -> torch.Tensor:
        """Bidirectional self-attention inside each chunk: (N, T, D) -> (N, T, D)."""
        N, T, D = x.shape
        heads = attn.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, T, heads, D // heads).transpose(1, 2)  # (N, H, T, D/H)

        y = F.scaled_dot_product_attention(
            split_heads(attn.q_proj(x)), split_heads(attn.k_proj(x)), split_heads(attn.v_proj(x)), scale=attn.scaling
        )  # (N, H, T, D/H)
        return attn.out_proj(y.transpose(1, 2).reshape(N, T, D))
