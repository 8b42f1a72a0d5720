"""A session's audio input chain: PCM frames -> mono float32 -> 16 kHz -> padded chunk blocks -> the engine.

The front's share of the log-mel front-end is the cheap one: decoding, resampling, and cutting the 16 kHz
stream into each 0.4 s chunk's centre-padded sample block (``LogMelChunker.push_blocks``: copies and
reflections, no arithmetic). The engine computes the features from the blocks, batched over every session's
chunks of a step (``frontend.log_mel_blocks``), bit-identical to ``StreamingLogMel`` on the same stream.

Sans-I/O: ``push_chunks`` is how chunks leave, as ``PaddedBlocks`` (the session passes ``engine.push_audio``).
It also keeps the stream-time books the session's limits and counters need.
Not thread-safe: one instance per session, used from one task.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.audio.frontend import LogMelChunker, PaddedBlocks, StreamingResampler, decode_pcm
from audio_interaction_server.protocol import AudioFormat

CHUNK_S = T.CHUNK_S  # re-exported: the session and the app take it from here


class AudioInput:
    def __init__(self, push_chunks: Callable[[PaddedBlocks], None]) -> None:
        self._push_chunks = push_chunks
        self.format = AudioFormat()
        self._resampler: StreamingResampler | None = None
        # A new chunker is a new feature stream: the engine restarts its running maximum at chunk index 0.
        self._front_end: LogMelChunker | None = None
        self.num_chunks_pushed = 0
        self.audio_received_s = 0.0  # accepted client audio
        self.stream_s = 0.0  # stream time given to the front-end: audio, flush silence and padding

    def decode(self, data: bytes) -> np.ndarray:
        """Frame bytes -> mono float32 at the client's rate; raises ``AudioFormatError``."""
        return decode_pcm(data, self.format.sample_format, self.format.num_channels)

    def duration_s(self, samples: np.ndarray) -> float:
        return samples.shape[0] / self.format.sample_rate_hz

    def set_format(self, audio_format: AudioFormat) -> int:
        """Switch the input format; the 16 kHz stream goes on unbroken. Returns chunks pushed."""
        num_pushed = 0
        if audio_format != self.format:
            num_pushed = self._end_resampler()
        self.format = audio_format
        return num_pushed

    def accept(self, samples: np.ndarray) -> int:
        """Decoded samples into the stream; returns how many chunks that completed (and pushed)."""
        self.audio_received_s += self.duration_s(samples)
        self.stream_s += self.duration_s(samples)
        if self._resampler is None:
            self._resampler = StreamingResampler(self.format.sample_rate_hz)
        if self._front_end is None:
            self._front_end = LogMelChunker()
        return self._push(self._front_end, self._front_end.push_blocks(self._resampler.process(samples)))

    def stream_s_after_flush(self, trailing_silence_s: float) -> float:
        """Stream time once ``flush(trailing_silence_s)`` has run: the silence, then the last chunk padded.

        Lets the session check a flush against its buffer limit before it queues anything.
        """
        silence_s = int(round(trailing_silence_s * T.SAMPLE_RATE_HZ)) / T.SAMPLE_RATE_HZ
        # The tolerance keeps an exact chunk boundary from rounding up through float error.
        return math.ceil((self.stream_s + silence_s) / CHUNK_S - 1e-6) * CHUNK_S

    def flush(self, trailing_silence_s: float) -> int:
        """End an utterance: resampler tail, trailing silence, zero-padded last chunk. Returns chunks pushed.

        The next audio starts a fresh front-end (new left context and running maximum), as
        after a pause between utterances; the engine's conversation itself goes on.
        """
        num_pushed = self._end_resampler()
        front_end = self._front_end or LogMelChunker()
        blocks = front_end.push_blocks(np.zeros(int(round(trailing_silence_s * T.SAMPLE_RATE_HZ)), dtype=np.float32))
        num_pushed += self._push(front_end, blocks + front_end.flush_blocks(pad_to_chunk=True))
        self._front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return num_pushed

    def clear(self) -> float:
        """Drop the partial chunk (and the resampler's held-back samples): the client asked to forget audio
        the model has not heard. Returns the stream seconds dropped; the next audio starts a fresh front-end."""
        dropped_s = max(0.0, self.stream_s - self.num_chunks_pushed * CHUNK_S)
        self._resampler = None
        self._front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return dropped_s

    def _end_resampler(self) -> int:
        """Drain the resampler's filter delay into the feature stream (soxr holds some samples back)."""
        num_pushed = 0
        if self._resampler is not None and self._front_end is not None:
            num_pushed = self._push(self._front_end, self._front_end.push_blocks(self._resampler.flush()))
        self._resampler = None
        return num_pushed

    def _push(self, front_end: LogMelChunker, blocks: list[torch.Tensor]) -> int:
        if blocks:
            first_chunk_index = front_end.num_chunks_emitted - len(blocks)
            self._push_chunks(PaddedBlocks(torch.stack(blocks).numpy(), first_chunk_index))  # (N, 6640)
            self.num_chunks_pushed += len(blocks)
        return len(blocks)
