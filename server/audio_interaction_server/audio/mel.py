"""Whisper-style 128-bin log-mel features of the padded blocks (``audio/blocks.py``), whole-file and streaming.

The streaming features reproduce whole-file STFT bit for bit with 40 samples of look-ahead; only the clamp
differs, because it uses the running maximum of the stream (model-notes §4.3, decision 5). The engine computes
them, batched over a step's chunks (``log_mel_blocks``); offline runs and tests use the rest.

Threading contract: ``LogMelChunker`` and ``StreamingLogMel`` hold per-stream state; one owner at a time. The
module-level functions are pure and re-entrant.
"""

from __future__ import annotations

import functools
import math
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F

from audio_interaction_server.audio.blocks import (
    BLOCK_INPUT_SAMPLES, HALF_WINDOW_SAMPLES, HOP_SAMPLES, N_FFT, BlockCutter,
)
from audio_interaction_server.audio.pcm import check_mono_samples
from audio_interaction_server.spec import CHUNK_SAMPLES, MEL_FRAMES_PER_CHUNK, SAMPLE_RATE_HZ

NUM_MEL_BINS: Final = 128
_LOG_FLOOR: Final = 1e-10
_DYNAMIC_RANGE: Final = 8.0  # log10 units kept below the maximum (whisper's clamp)


# The Slaney mel scale (Auditory Toolbox; librosa's and whisper's default): linear, 3 mels per 200 Hz, up to
# 1 kHz (15 mels), logarithmic above it, 27 mels per factor of 6.4. The float64 operations are librosa's, in its
# order, so that the table comes out bit-equal to the reference's.
_SLANEY_LOG_START_HZ: Final = 1000.0
_SLANEY_LOG_START_MEL: Final = 15.0


def _hz_to_slaney_mel(hz: float) -> float:
    if hz < _SLANEY_LOG_START_HZ:
        return 3.0 * hz / 200.0
    return _SLANEY_LOG_START_MEL + float(np.log(hz / _SLANEY_LOG_START_HZ)) * (27.0 / float(np.log(6.4)))


def _slaney_mel_to_hz(mels: np.ndarray) -> np.ndarray:
    linear = 200.0 * mels / 3.0
    logarithmic = _SLANEY_LOG_START_HZ * np.exp((float(np.log(6.4)) / 27.0) * (mels - _SLANEY_LOG_START_MEL))
    return np.where(mels < _SLANEY_LOG_START_MEL, linear, logarithmic)


def mel_filters_float64() -> np.ndarray:
    """(201, 128) float64: ``mel_filters`` before its rounding."""
    corners_mel = np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(SAMPLE_RATE_HZ / 2), NUM_MEL_BINS + 2)
    corners_hz = _slaney_mel_to_hz(corners_mel)  # (130,): filter m rises from corner m to m+1, falls to m+2
    bins_hz = np.linspace(0, SAMPLE_RATE_HZ // 2, N_FFT // 2 + 1)  # (201,)
    widths = np.diff(corners_hz)  # (129,)
    to_corner = corners_hz[None, :] - bins_hz[:, None]  # (201, 130)
    rising = -to_corner[:, :-2] / widths[:-1]
    falling = to_corner[:, 2:] / widths[1:]
    filters = np.maximum(np.zeros(1), np.minimum(rising, falling))  # (201, 128)
    filters *= (2.0 / (corners_hz[2:] - corners_hz[:-2]))[None, :]
    return filters


@functools.cache
def mel_filters() -> torch.Tensor:
    """(128, 201) float32 Slaney mel filterbank = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128).

    Triangles on the FFT bins, their corners evenly spaced in mels from 0 Hz to 8 kHz, each scaled to unit area
    per Hz (Slaney's norm). Computed in float64 and rounded once; equal, bit for bit, to transformers'
    ``mel_filter_bank`` with these arguments (``tests/audio/test_audio.py``); whisper's mel_filters.npz
    (librosa applies the norm in float32) may differ by an ulp. Written here rather than imported: importing
    transformers costs a process about 0.7 s, and only this table was used of it. Shared and cached: treat it
    as read-only.
    """
    filters = mel_filters_float64()
    return torch.from_numpy(np.ascontiguousarray(filters.T, dtype=np.float32))


@functools.cache
def _hann_window() -> torch.Tensor:
    return torch.hann_window(N_FFT)


def _log_mel_block(padded_samples: torch.Tensor) -> torch.Tensor:
    """Unclamped log10 mel of one 40-frame block: 6640 centre-padded samples → (128, 40).

    The one place both paths compute features, always on exactly 40 frames: FFT batch size and
    matmul shape then never vary (a 1-frame block takes MKL's gemv path and rounds differently,
    observed), and the clone gives both paths the same allocator-aligned storage, so whole-file
    and streaming frames are bit-identical by construction rather than by luck of the kernels.
    """
    if padded_samples.shape != (BLOCK_INPUT_SAMPLES,):
        raise ValueError(f"expected {BLOCK_INPUT_SAMPLES} samples, got {tuple(padded_samples.shape)}")
    spectrum = torch.stft(
        padded_samples.clone(), N_FFT, HOP_SAMPLES, window=_hann_window(), center=False, return_complex=True
    )  # (201, 40)
    power = spectrum.abs() ** 2
    mel = mel_filters() @ power  # (128, 40)
    return torch.log10(torch.clamp(mel, min=_LOG_FLOOR))


def log_mel_blocks(padded_blocks: torch.Tensor) -> torch.Tensor:
    """``_log_mel_block`` of each row, in one call: (N, 6640) centre-padded blocks → (N, 128, 40), bit-identical.

    The engine's batched front-end (every chunk due in a step at once). The STFT, the power and the log are
    batched: they work frame by frame or element by element, and a block's 40 x 201 values are whole SIMD
    vectors, so a row's result does not depend on its neighbours. The mel matmul is not batched: a GEMM's
    rounding depends on its shape, so each block keeps the (128, 201) @ (201, 40) product of the per-block
    path. All-zero rows (flushed silence) take the cached silent block. ``tests/audio/test_batched_log_mel.py``
    checks the equality bit for bit.
    """
    if padded_blocks.dim() != 2 or padded_blocks.shape[1] != BLOCK_INPUT_SAMPLES:
        raise ValueError(f"expected blocks (N, {BLOCK_INPUT_SAMPLES}), got {tuple(padded_blocks.shape)}")
    num_blocks = padded_blocks.shape[0]
    log_mel = torch.empty(num_blocks, NUM_MEL_BINS, MEL_FRAMES_PER_CHUNK)  # (N, 128, 40)
    is_sounding = padded_blocks.ne(0).any(dim=1)  # (N,)
    if not bool(is_sounding.all()):
        log_mel[~is_sounding] = _silent_block_log_mel()
    sounding = padded_blocks[is_sounding].contiguous()  # (S, 6640), a fresh allocation like the clone above
    if sounding.shape[0] == 0:
        return log_mel
    spectrum = torch.stft(
        sounding, N_FFT, HOP_SAMPLES, window=_hann_window(), center=False, return_complex=True
    )  # (S, 201, 40)
    power = spectrum.abs() ** 2
    filters = mel_filters()
    mel = torch.stack([filters @ block_power for block_power in power])  # (S, 128, 40), one GEMM shape per block
    log_mel[is_sounding] = torch.log10(torch.clamp(mel, min=_LOG_FLOOR))
    return log_mel


@functools.cache
def _silent_block_log_mel() -> torch.Tensor:
    """``_log_mel_block`` of an all-zero block, computed once by the same function (so bit-identical).

    Flushed silence is pure zeros: 10 s of it would otherwise cost 25 STFTs on the event loop
    per ``input.flush``. Shared: callers get a clone.
    """
    return _log_mel_block(torch.zeros(BLOCK_INPUT_SAMPLES))


def normalize_log_mel(log_mel: torch.Tensor, max_value: float) -> torch.Tensor:
    """Whisper's clamp and scaling, given the maximum to clamp against (whole-file or running)."""
    return (torch.clamp(log_mel, min=max_value - _DYNAMIC_RANGE) + 4.0) / 4.0


def normalize_next_chunk(raw_chunk: torch.Tensor, running_max: float) -> tuple[torch.Tensor, float]:
    """The streaming clamp of one chunk (128, 40): against the maximum of every chunk so far, itself included.
    Returns the normalized chunk and the new maximum."""
    running_max = max(running_max, float(raw_chunk.max()))
    return normalize_log_mel(raw_chunk, running_max), running_max


def normalize_stream(raw_chunks: torch.Tensor, running_max: float) -> tuple[torch.Tensor, float]:
    """``normalize_next_chunk`` over consecutive chunks (N, 128, 40) of one stream, as ``StreamingLogMel`` does.
    Returns the normalized chunks and the new maximum."""
    normalized = []
    for raw_chunk in raw_chunks:
        chunk, running_max = normalize_next_chunk(raw_chunk, running_max)
        normalized.append(chunk)
    if not normalized:
        return raw_chunks.new_empty(0, NUM_MEL_BINS, MEL_FRAMES_PER_CHUNK), running_max
    return torch.stack(normalized), running_max



def log_mel_raw(samples_16k: np.ndarray) -> torch.Tensor:
    """Unclamped log10 mel of a whole signal, (128, N // 160), exactly whisper's framing.

    Equal to torch.stft(center=True, pad_mode="reflect") with the last frame dropped, computed
    in 40-frame blocks (see ``_log_mel_block``); the reflect padding is F.pad's, as in torch.stft.
    """
    samples = torch.from_numpy(np.ascontiguousarray(samples_16k, dtype=np.float32))
    num_frames = samples.shape[0] // HOP_SAMPLES
    if num_frames == 0:
        return torch.zeros(NUM_MEL_BINS, 0)
    if samples.shape[0] <= HALF_WINDOW_SAMPLES:
        raise ValueError(f"need more than {HALF_WINDOW_SAMPLES} samples for reflect padding")
    padded = F.pad(samples[None, None], (HALF_WINDOW_SAMPLES, HALF_WINDOW_SAMPLES), mode="reflect")[0, 0]
    num_blocks = math.ceil(num_frames / MEL_FRAMES_PER_CHUNK)
    # Zeros past the end complete the last block; they only feed frames >= num_frames, cut below.
    num_zeros = CHUNK_SAMPLES * (num_blocks - 1) + BLOCK_INPUT_SAMPLES - padded.shape[0]
    padded = F.pad(padded, (0, max(0, num_zeros)))
    blocks = [
        _log_mel_block(padded[CHUNK_SAMPLES * block : CHUNK_SAMPLES * block + BLOCK_INPUT_SAMPLES])
        for block in range(num_blocks)
    ]
    return torch.cat(blocks, dim=1)[:, :num_frames]  # (128, N // 160)


def log_mel_whole(samples_16k: np.ndarray) -> torch.Tensor:
    """Whisper ``log_mel_spectrogram(audio, n_mels=128)``: (128, N // 160) float32, clamped at max - 8."""
    log_mel = log_mel_raw(samples_16k)
    if log_mel.shape[1] == 0:
        return log_mel
    return normalize_log_mel(log_mel, float(log_mel.max()))


def offline_chunks(samples_16k: np.ndarray) -> torch.Tensor:
    """The reference's offline path per file: zero-pad to 0.4 s, whole-file mel, split → (K, 128, 40)."""
    samples = np.asarray(samples_16k, dtype=np.float32)
    padded = np.pad(samples, (0, -samples.shape[0] % CHUNK_SAMPLES))
    log_mel = log_mel_whole(padded)  # (128, 40 K)
    num_chunks = padded.shape[0] // CHUNK_SAMPLES
    return log_mel.reshape(NUM_MEL_BINS, num_chunks, MEL_FRAMES_PER_CHUNK).permute(1, 0, 2).contiguous()


class LogMelChunker:
    """Streaming unclamped log-mel: 16 kHz samples in, (128, 40) chunks out, each bit-identical
    to the same frames of ``log_mel_raw`` on the whole (zero-padded) stream: a ``BlockCutter``'s blocks, each
    through ``_log_mel_block``."""

    def __init__(self) -> None:
        self._cutter = BlockCutter()

    def reset(self) -> None:
        self._cutter.reset()

    @property
    def num_chunks_emitted(self) -> int:
        return self._cutter.num_chunks_emitted

    @property
    def num_buffered_samples(self) -> int:
        """Retained history: 200 samples of left context + the not-yet-emitted samples (< 6640)."""
        return self._cutter.num_buffered_samples

    def push(self, samples_16k: np.ndarray) -> list[torch.Tensor]:
        return self._log_mels(self._cutter.push(check_mono_samples(samples_16k)))

    def flush(self, pad_to_chunk: bool = True) -> list[torch.Tensor]:
        """End the stream (``BlockCutter.flush``: ``pad_to_chunk`` zero-pads a partial last chunk)."""
        return self._log_mels(self._cutter.flush(pad_to_chunk))

    @staticmethod
    def _log_mels(blocks: np.ndarray) -> list[torch.Tensor]:
        """Each (6640,) row's (128, 40) log-mel; digital silence (a flush) has a known one."""
        return [_silent_block_log_mel().clone() if not block.any() else _log_mel_block(block)
                for block in torch.from_numpy(blocks)]


class StreamingLogMel:
    """Streaming whisper features: ``LogMelChunker`` plus the clamp against the running maximum.

    Only the clamp differs from whole-file features: it uses M = max over all frames emitted so
    far (this chunk included), because the whole-stream maximum is unknowable while streaming.
    """

    def __init__(self) -> None:
        self._chunker = LogMelChunker()
        self.running_max = -math.inf

    @property
    def num_chunks_emitted(self) -> int:
        return self._chunker.num_chunks_emitted

    @property
    def num_buffered_samples(self) -> int:
        return self._chunker.num_buffered_samples

    def reset(self) -> None:
        self._chunker.reset()
        self.running_max = -math.inf

    def push(self, samples_16k: np.ndarray) -> list[torch.Tensor]:
        return [self._normalize(chunk) for chunk in self._chunker.push(samples_16k)]

    def flush(self, pad_to_chunk: bool = True) -> list[torch.Tensor]:
        return [self._normalize(chunk) for chunk in self._chunker.flush(pad_to_chunk)]

    def _normalize(self, raw_chunk: torch.Tensor) -> torch.Tensor:
        chunk, self.running_max = normalize_next_chunk(raw_chunk, self.running_max)
        return chunk
