"""Any client rate to the model's 16 kHz, as a stream (soxr).

Threading contract: a ``StreamingResampler`` holds one stream's state; one owner at a time.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import soxr

from audio_interaction_server.spec import SAMPLE_RATE_HZ

MIN_INPUT_RATE_HZ: Final = 1_000
MAX_INPUT_RATE_HZ: Final = 384_000


class StreamingResampler:
    """Any input rate → 16 kHz, chunk by chunk; the output equals one-shot ``soxr.resample``."""

    def __init__(self, input_rate_hz: int) -> None:
        if not MIN_INPUT_RATE_HZ <= input_rate_hz <= MAX_INPUT_RATE_HZ:
            limits = f"{MIN_INPUT_RATE_HZ}..{MAX_INPUT_RATE_HZ} Hz"
            raise ValueError(f"input rate {input_rate_hz} Hz outside the supported {limits}")
        self.input_rate_hz = input_rate_hz
        self._stream: soxr.ResampleStream | None = None  # 16 kHz input passes through untouched
        if input_rate_hz != SAMPLE_RATE_HZ:
            self._stream = soxr.ResampleStream(input_rate_hz, SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ")
        self._is_flushed = False

    @property
    def passes_through(self) -> bool:
        """16 kHz input: ``process`` returns a copy of its input (a caller with samples of its own may skip it)."""
        return self._stream is None and not self._is_flushed

    def process(self, samples: np.ndarray) -> np.ndarray:
        if self._is_flushed:
            raise RuntimeError("StreamingResampler was flushed; call reset() to start a new stream")
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples (1-D), got shape {samples.shape}")
        if self._stream is None:
            return samples.copy()  # never alias the caller's buffer, which it may reuse
        return self._stream.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """End the stream: returns the samples soxr still holds back for its filter delay."""
        was_flushed, self._is_flushed = self._is_flushed, True
        if was_flushed or self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)

    def reset(self) -> None:
        if self._stream is not None:
            self._stream.clear()
        self._is_flushed = False

