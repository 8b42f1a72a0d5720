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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audio_interaction_server.model.lm import embedding
from audio_interaction_server.spec import AUDIO_FRAMES_PER_CHUNK, MEL_FRAMES_PER_CHUNK

NUM_MEL_BINS = 128
# The stride-2 convolution halves a chunk's 40 mel frames; the tower's attention runs over these.
FRAMES_AFTER_CONV = (MEL_FRAMES_PER_CHUNK - 1) // 2 + 1

# The dtypes a config may name for the tower (transformers' ``dtype``, or the older ``torch_dtype``).
_TOWER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AudioTowerConfig:
    """What the tower is built from: Qwen2.5-Omni's ``thinker_config.audio_config`` (``qwen25OmniConfig/config.json``).

    A field the file leaves out takes transformers' default for ``Qwen2_5OmniAudioEncoderConfig``, as the
    reference's ``AutoConfig`` gives it. ``dtype`` is the one the tower's parameters are made in before the
    weights are copied in (the reference's ``_from_config`` does the same): weights stored in fp32 under a
    bf16 config are rounded to bf16 even when the server then runs the tower in fp32.
    """

    num_mel_bins: int = NUM_MEL_BINS
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584
    activation_function: str = "gelu"
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_json(cls, raw: object) -> AudioTowerConfig:
        """``thinker_config.audio_config`` as JSON; ``ValueError`` names the field a server cannot build."""
        if not isinstance(raw, dict):
            raise ValueError(f"thinker_config.audio_config is a {type(raw).__name__}, expected an object")
        fields: dict[str, Any] = {}
        for name in (field.name for field in dataclasses.fields(cls) if field.type == "int"):  # the sizes
            if name in raw:
                value = raw[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"audio_config.{name} is {value!r}, expected a positive integer")
                fields[name] = value
        if "activation_function" in raw:
            fields["activation_function"] = raw["activation_function"]
        # transformers 5 writes ``dtype``, 4.x ``torch_dtype``; either may be null (fp32).
        dtype_name = raw.get("dtype") or raw.get("torch_dtype")
        if dtype_name is not None:
            if dtype_name not in _TOWER_DTYPES:
                raise ValueError(f"audio_config.dtype is {dtype_name!r}, expected one of {sorted(_TOWER_DTYPES)}")
            fields["dtype"] = _TOWER_DTYPES[dtype_name]
        return cls(**fields)

    def __post_init__(self) -> None:  # every config is checked, whether read from a file or built in code
        if self.num_mel_bins != NUM_MEL_BINS:
            raise ValueError(f"audio_config.num_mel_bins is {self.num_mel_bins}; the server's log-mel front-end "
                             f"makes {NUM_MEL_BINS}")
        if self.activation_function != "gelu":
            raise ValueError(f"audio_config.activation_function is {self.activation_function!r}; this server "
                             "runs the release tower's 'gelu'")
        if self.d_model % self.encoder_attention_heads or self.d_model % 2:
            raise ValueError(f"audio_config.d_model ({self.d_model}) must be even and a multiple of "
                             f"encoder_attention_heads ({self.encoder_attention_heads})")
        if self.max_source_positions < FRAMES_AFTER_CONV:
            raise ValueError(f"audio_config.max_source_positions ({self.max_source_positions}) is shorter than a "
                             f"chunk ({FRAMES_AFTER_CONV} frames after the convolutions)")
        # The reference's tower cuts its input into windows of 2 * n_window mel frames; a 40-frame chunk is one
        # window only if that is at least 40, and the batched forward below relies on it.
        if 2 * self.n_window < MEL_FRAMES_PER_CHUNK:
            raise ValueError(f"audio_config.n_window ({self.n_window}) would cut a {MEL_FRAMES_PER_CHUNK}-frame "
                             "chunk into windows; the server encodes whole chunks")


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """The tower's fixed position table (length, channels), fp32: sines of ``channels / 2`` geometric
    timescales from 1 to ``max_timescale``, then their cosines. Computed in the same float32 operations as the
    reference's table, so it is bit-equal to it (``test_encoder.py``)."""
    half = channels // 2
    increment = math.log(max_timescale) / (half - 1)
    # On the CPU whatever the default device: on the meta device arange runs torch's Python reference kernels,
    # which import torch._dynamo (see lm.embedding).
    inverse_timescales = torch.exp(-increment * torch.arange(half, dtype=torch.float32, device="cpu"))
    scaled_time = torch.arange(length, device="cpu")[:, None] * inverse_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class _TowerAttention(nn.Module):
    """Bidirectional self-attention inside each chunk (the key projection has no bias, as in the release)."""

    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        width = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.scaling = (width // self.num_heads) ** -0.5
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, D)."""
        N, T, D = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (N, H, T, D/H)

        y = F.scaled_dot_product_attention(
            split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x)), scale=self.scaling
        )  # (N, H, T, D/H)
        return self.out_proj(y.transpose(1, 2).reshape(N, T, D))


class _TowerLayer(nn.Module):
    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        width = config.d_model
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.self_attn = _TowerAttention(config)
        self.final_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # the release tower's overflow guard
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(min=-limit, max=limit)
        return x


class AudioTower(nn.Module):
    """Qwen2.5-Omni's audio encoder, run over whole 40-frame chunks as one batch.

    Its parameters have the names and shapes of the release's ``Qwen2_5OmniAudioEncoder`` state dict (the
    ``.pth`` loads into it strictly), and its forward is the reference's for chunks of 40 frames: transformers'
    tower packs every chunk into one sequence and, unless flash-attention is installed, runs attention chunk by
    chunk in a Python loop (after a ``tolist()`` device sync in every layer): 768 chunks on an H200 took 605 ms,
    24,576 tiny attention calls per encoder call. Every chunk here has the same 40 mel frames and attends only to
    itself, so the same weights run as one (N, 20, D) batch with one attention call per layer. ``test_encoder.py``
    checks it against transformers' module with the same weights. Written here rather than imported: importing
    transformers' modelling code costs a server start about two seconds (it pulls in torch._dynamo).
    """

    position_table: torch.Tensor  # (max_source_positions, d_model), fp32 as built

    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        self.config = config
        width = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList(_TowerLayer(config) for _ in range(config.encoder_layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.output_dim)
        # In the release's state dict, unused by this model (it marks audio spans for the Omni thinker).
        self.audio_bos_eos_token = embedding(2, config.output_dim)
        # Not in the state dict: computed, like the reference's, at construction (again after ``to_empty``).
        self.register_buffer("position_table", self._position_table(), persistent=False)

    @classmethod
    def unfilled(cls, config: AudioTowerConfig, device: torch.device | str, dtype: torch.dtype) -> AudioTower:
        """A tower with storage on ``device`` in ``dtype`` and its weights not yet set (the loader copies a state
        dict in, the benchmarks' random model draws them): built on the meta device, so nothing is spent
        initialising them."""
        with torch.device("meta"):
            tower = cls(config)
        tower = tower.to(dtype).to_empty(device=device)
        # to_empty gave the (non-persistent) table storage but not its values.
        tower.position_table = tower._position_table().to(tower.position_table.device)
        return tower

    def _position_table(self) -> torch.Tensor:
        return sinusoid_positions(self.config.max_source_positions, self.config.d_model)

    def forward(self, mel_chunks: torch.Tensor) -> torch.Tensor:
        """(N, 128, 40) mel chunks -> (N, 10, output_dim), in the tower's dtype."""
        num_chunks = mel_chunks.shape[0]
        x = mel_chunks.to(self.conv1.weight.dtype)  # (N, 128, 40)
        x = F.gelu(self.conv1(x))  # (N, D, 40): every frame is real, so the reference's padding mask is all ones
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, 20, D): stride 2
        x = x + self.position_table[:x.shape[1]].unsqueeze(0).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        x = (x[:, 0::2] + x[:, 1::2]) / 2  # (N, 10, D): stride-2 average pooling, as the reference writes it
        x = self.proj(self.ln_post(x))  # (N, 10, output_dim)
        return x.view(num_chunks, AUDIO_FRAMES_PER_CHUNK, -1)


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
    def __init__(self, tower: AudioTower, pad_to_buckets: bool = True) -> None:
        self.tower = tower
        self.param = next(tower.parameters())
        self.pad_to_buckets = pad_to_buckets

    @property
    def output_dim(self) -> int:
        return self.tower.proj.out_features

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
            return self.tower(torch.cat([mel_chunks, silence]))[:num_chunks]
        return self.tower(mel_chunks)
