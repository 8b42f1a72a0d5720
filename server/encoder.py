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

import torch

from server.tokens import AUDIO_FRAMES_PER_CHUNK, MEL_FRAMES_PER_CHUNK

NUM_MEL_BINS = 128


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
            return self._encode(torch.cat([mel_chunks, silence]))[:num_chunks]
        return self._encode(mel_chunks)

    def _encode(self, mel_chunks: torch.Tensor) -> torch.Tensor:
        num_chunks, device = mel_chunks.shape[0], mel_chunks.device
        features = mel_chunks.permute(1, 0, 2).reshape(NUM_MEL_BINS, -1)  # (128, N*40)
        frames_per_chunk_after_conv = (MEL_FRAMES_PER_CHUNK - 1) // 2 + 1
        out = self.tower(
            input_features=features,
            feature_lens=torch.full((num_chunks,), MEL_FRAMES_PER_CHUNK, dtype=torch.long, device=device),
            # Per-chunk lengths pool each chunk separately in every transformers version
            # (4.57 splits by these; 5.x pools per feature_lens entry).
            aftercnn_lens=torch.full((num_chunks,), frames_per_chunk_after_conv, dtype=torch.long, device=device),
        ).last_hidden_state  # (N*10, output_dim)
        return out.view(num_chunks, AUDIO_FRAMES_PER_CHUNK, -1)
