"""Audio tower: 40-frame log-mel chunks in, 10 LM-sized embeddings per chunk out.

Each 0.4 s chunk is encoded independently (the encoder's attention is limited
to a chunk by ``feature_lens``), so chunks of many sessions go through one
call and the result is the same as encoding them one at a time.

Threading: not thread-safe; only the worker thread calls it.
"""

from __future__ import annotations

import torch

from server.tokens import AUDIO_FRAMES_PER_CHUNK, MEL_FRAMES_PER_CHUNK

NUM_MEL_BINS = 128


class AudioEncoder:
    def __init__(self, tower: torch.nn.Module) -> None:
        self.tower = tower
        self.param = next(tower.parameters())

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
        features = mel_chunks.to(device).permute(1, 0, 2).reshape(NUM_MEL_BINS, -1)  # (128, N*40)
        frames_per_chunk_after_conv = (MEL_FRAMES_PER_CHUNK - 1) // 2 + 1
        out = self.tower(
            input_features=features,
            feature_lens=torch.full((num_chunks,), MEL_FRAMES_PER_CHUNK, dtype=torch.long, device=device),
            # Per-chunk lengths pool each chunk separately in every transformers version
            # (4.57 splits by these; 5.x pools per feature_lens entry).
            aftercnn_lens=torch.full((num_chunks,), frames_per_chunk_after_conv, dtype=torch.long, device=device),
        ).last_hidden_state  # (N*10, output_dim)
        return out.view(num_chunks, AUDIO_FRAMES_PER_CHUNK, -1)
