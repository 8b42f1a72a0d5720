"""A session's audio input chain: PCM frames -> mono float32 -> 16 kHz -> padded chunk blocks -> the engine.

The front's share of the log-mel front-end is the cheap one: decoding, resampling, and cutting the 16 kHz
stream into each 0.4 s chunk's centre-padded sample block (``blocks.BlockCutter``: copies and
reflections, no arithmetic). The engine computes the features from the blocks, batched over every session's
chunks of a step (``mel.log_mel_blocks``), bit-identical to ``StreamingLogMel`` on the same stream.

Deferred work: clients send a frame every 20-100 ms but a chunk completes every 0.4 s, and on the event loop
the numpy calls per frame cost more than the samples they move. So a frame is only checked when it arrives
(``check_frame``: the same errors as decoding it) and its bytes are kept; they are decoded, resampled and cut
only once they could complete a chunk, or when something needs the stream (a flush, a format change). Every
chunk still leaves at the frame that completes it, bit-identical: decoding and soxr's streaming output do
not depend on how the input is split (``tests/audio/test_deferred_audio_input.py`` checks both).

Few passes per chunk, for the same reason: at 16 kHz decoding's last pass (the s16 scaling) writes straight
into the chunker's buffer (``checked_pcm_values``), and the chunker cuts the completed chunks' blocks straight
into the one (N, 6640) array that leaves. The samples skip the NaN/Inf check of the public entries: decoded
from frames ``check_pcm`` passed, they are finite (``accept`` checks what it is given).

Sans-I/O: ``push_chunks`` is how chunks leave, as ``PaddedBlocks`` (the session passes ``engine.push_audio``).
It also keeps the stream-time books the session's limits and counters need.
Not thread-safe: one instance per session, used from one task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from audio_interaction_server import spec as T
from audio_interaction_server.audio.blocks import LOOKAHEAD_SAMPLES, BlockCutter, PaddedBlocks
from audio_interaction_server.audio.pcm import bytes_per_sample_frame, check_mono_samples, check_pcm, checked_pcm_values
from audio_interaction_server.audio.resampler import StreamingResampler
from audio_interaction_server.protocol import AudioFormat

CHUNK_S = T.CHUNK_S  # re-exported: the session and the app take it from here
# soxr's streaming output lags the input by its filter delay (>= 50 samples at 16 kHz for every rate tried);
# the margin only covers rounding, so the bound below holds with room to spare.
_RESAMPLER_MARGIN_SAMPLES = 2


def max_resampled_samples(num_input_frames: int, input_rate_hz: int) -> int:
    """An upper bound on the 16 kHz samples a ``StreamingResampler`` has returned after ``num_input_frames``
    (exact at 16 kHz, which passes through). Deferred frames are processed once this reaches a chunk's end, so
    a chunk is never pushed at a later frame than processing every frame at once would push it."""
    if input_rate_hz == T.SAMPLE_RATE_HZ:
        return num_input_frames
    return -(-num_input_frames * T.SAMPLE_RATE_HZ // input_rate_hz) + _RESAMPLER_MARGIN_SAMPLES


def min_input_frames(num_resampled_samples: int, input_rate_hz: int) -> int:
    """The fewest input frames for which ``max_resampled_samples`` reaches ``num_resampled_samples`` (>= 0)."""
    if input_rate_hz == T.SAMPLE_RATE_HZ:
        return max(0, num_resampled_samples)
    # ceil(n * 16000 / rate) >= k  <=>  n * 16000 > (k - 1) * rate, with k = num_resampled_samples - margin
    return max(0, (num_resampled_samples - _RESAMPLER_MARGIN_SAMPLES - 1) * input_rate_hz // T.SAMPLE_RATE_HZ + 1)


class CheckedFrame(NamedTuple):
    """A client frame that passed ``AudioInput.check_frame`` for ``audio_format``.

    A named tuple rather than a frozen dataclass: as immutable, and made in half the time (one per client frame).
    """

    data: bytes
    num_frames: int  # sample frames (one sample per channel)
    audio_format: AudioFormat


class AudioInput:
    def __init__(self, push_chunks: Callable[[PaddedBlocks], None]) -> None:
        self._push_chunks = push_chunks
        self._set_layout(AudioFormat())
        self._resampler: StreamingResampler | None = None
        self._num_resampler_input_frames = 0  # given to the current resampler
        self._num_resampler_output_samples = 0  # 16 kHz samples it returned
        # A new chunker is a new feature stream: the engine restarts its running maximum at chunk index 0.
        self._front_end: BlockCutter | None = None
        self._pending_frames: list[bytes] = []  # checked frames of self.format not yet decoded, in order
        self._num_pending_frames = 0
        # Decoding waits until this many frames are pending: then they might complete the next chunk.
        self._num_pending_frames_to_decode = 0
        self.num_chunks_pushed = 0
        self.audio_received_s = 0.0  # accepted client audio
        self.stream_s = 0.0  # stream time given to the front-end: audio, flush silence and padding

    def check_frame(self, data: bytes) -> CheckedFrame:
        """A client frame checked as decoding it would (raises ``AudioFormatError``); changes nothing."""
        audio_format = self.format
        if not self._checks_samples and not len(data) % self.bytes_per_frame:
            return CheckedFrame(data, len(data) // self.bytes_per_frame, audio_format)  # what check_pcm returns
        return CheckedFrame(data, check_pcm(data, audio_format.sample_format, audio_format.num_channels), audio_format)

    def accept_frame(self, frame: CheckedFrame) -> int:
        """A checked frame into the stream; returns how many chunks that completed (and pushed)."""
        if frame.audio_format is not self.format:
            raise ValueError("the frame was checked against another audio format; check it again")
        self._receive(frame.num_frames)
        self._pending_frames.append(frame.data)
        self._num_pending_frames += frame.num_frames
        return self._decode_pending() if self._num_pending_frames >= self._num_pending_frames_to_decode else 0

    def accept(self, samples: np.ndarray) -> int:
        """Decoded samples (mono float32 at the format's rate) into the stream; returns chunks pushed.
        Samples that are not 1-D or hold NaN or Inf raise ``ValueError`` and change nothing."""
        samples = check_mono_samples(samples)
        self._receive(samples.shape[0])
        return self._decode_pending() + self._resample_and_cut(samples, None)

    def set_format(self, audio_format: AudioFormat) -> int:
        """Switch the input format; the 16 kHz stream goes on unbroken. Returns chunks pushed."""
        num_pushed = 0
        if audio_format != self.format:
            num_pushed = self._end_resampler()
        self._set_layout(audio_format)
        return num_pushed

    def _set_layout(self, audio_format: AudioFormat) -> None:
        """``format``, and what every frame needs of it, worked out once (a frame's books are per-frame work)."""
        self.format = audio_format
        self.bytes_per_frame = bytes_per_sample_frame(audio_format.sample_format, audio_format.num_channels)
        # s16 frames need no look at their samples: any whole number of sample frames is audio.
        self._checks_samples = audio_format.sample_format != "pcm_s16le"

    def seconds_in(self, data: bytes) -> float:
        """The audio a frame of ``data`` would hold in the current format (its whole sample frames)."""
        return len(data) // self.bytes_per_frame / self.format.sample_rate_hz

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
        front_end = self._front_end or BlockCutter()
        silence = np.zeros(int(round(trailing_silence_s * T.SAMPLE_RATE_HZ)), dtype=np.float32)
        blocks = front_end.push(silence)
        num_pushed += self._push(front_end, np.concatenate([blocks, front_end.flush(pad_to_chunk=True)]))
        self._front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return num_pushed

    def clear(self) -> float:
        """Drop the partial chunk (the resampler's held-back samples and the frames not yet decoded with it): the
        client asked to forget audio the model has not heard. Returns the stream seconds dropped; the next audio
        starts a fresh front-end."""
        dropped_s = max(0.0, self.stream_s - self.num_chunks_pushed * CHUNK_S)
        self._drop_resampler()
        self._front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return dropped_s

    def _receive(self, num_frames: int) -> None:
        """The books of accepted audio; the first audio after a flush, clear or format change starts its stages."""
        duration_s = num_frames / self.format.sample_rate_hz
        self.audio_received_s += duration_s
        self.stream_s += duration_s
        if self._resampler is None or self._front_end is None:
            self._resampler = self._resampler or StreamingResampler(self.format.sample_rate_hz)
            self._front_end = self._front_end or BlockCutter()
            self._count_frames_to_decode()

    def _count_frames_to_decode(self) -> None:
        """The fewest pending frames that might complete the front-end's next chunk (never too many: a chunk
        must leave at the frame that completes it)."""
        assert self._front_end is not None
        next_chunk_needs = T.CHUNK_SAMPLES * (self._front_end.num_chunks_emitted + 1) + LOOKAHEAD_SAMPLES
        # The chunker's count when the current resampler started: the resampler's output so far went in since.
        num_pushed_before_resampler = self._front_end.num_samples_pushed - self._num_resampler_output_samples
        self._num_pending_frames_to_decode = min_input_frames(
            next_chunk_needs - num_pushed_before_resampler, self.format.sample_rate_hz
        ) - self._num_resampler_input_frames

    def _decode_pending(self) -> int:
        if not self._pending_frames:
            return 0
        data = self._pending_frames[0] if len(self._pending_frames) == 1 else b"".join(self._pending_frames)
        self._pending_frames.clear()
        self._num_pending_frames = 0
        values, scale = checked_pcm_values(data, self.format.sample_format, self.format.num_channels)
        return self._resample_and_cut(values, scale)

    def _resample_and_cut(self, values: np.ndarray, scale: np.float32 | None) -> int:
        """Finite mono samples at the format's rate, ``values * scale`` (``checked_pcm_values``), into the stream."""
        assert self._resampler is not None and self._front_end is not None
        front_end = self._front_end
        if self._resampler.passes_through:
            # 16 kHz: decoding's last pass (the s16 scaling) writes straight into the chunker's buffer.
            num_resampled = values.shape[0]
            blocks = front_end.push(values, scale)
        else:
            samples = values if scale is None else np.multiply(values, scale, dtype=np.float32)
            resampled = self._resampler.process(samples)
            num_resampled = resampled.shape[0]
            # Resampling finite samples (of bounded magnitude) gives finite samples.
            blocks = front_end.push(resampled)
        self._num_resampler_input_frames += values.shape[0]
        self._num_resampler_output_samples += num_resampled
        num_pushed = self._push(front_end, blocks)
        self._count_frames_to_decode()
        return num_pushed

    def _end_resampler(self) -> int:
        """Decode the pending frames and drain the resampler's filter delay into the feature stream (soxr holds
        some samples back)."""
        num_pushed = 0
        if self._resampler is not None and self._front_end is not None:
            num_pushed = self._decode_pending()
            num_pushed += self._push(self._front_end, self._front_end.push(self._resampler.flush()))
        self._drop_resampler()
        return num_pushed

    def _drop_resampler(self) -> None:
        self._resampler = None
        self._num_resampler_input_frames = self._num_resampler_output_samples = 0
        self._pending_frames.clear()
        self._num_pending_frames = 0

    def _push(self, front_end: BlockCutter, blocks: np.ndarray) -> int:
        """The chunks just cut, (N, 6640) and of their own (the chunker never reuses them), to the engine."""
        num_blocks = blocks.shape[0]
        if num_blocks:
            self._push_chunks(PaddedBlocks(blocks, front_end.num_chunks_emitted - num_blocks))
            self.num_chunks_pushed += num_blocks
        return num_blocks
