"""A 16 kHz stream cut into each 0.4 s chunk's centre-padded sample block: what a chunk's log-mel is computed from.

The cheap, numpy part of the front-end, which the connection runs (copies only); the mel itself is computed
from the blocks by the engine (``audio/mel.py``), batched over a step's chunks. Sans-I/O and numpy only: a front
process imports this and never torch.

Threading contract: a ``BlockCutter`` holds one stream's state; one owner at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from audio_interaction_server.spec import CHUNK_SAMPLES, MEL_FRAMES_PER_CHUNK

N_FFT: Final = 400
HOP_SAMPLES: Final = 160
# torch.stft(center=True) pads n_fft // 2 on each side: frame i is centred on sample 160 * i.
HALF_WINDOW_SAMPLES: Final = N_FFT // 2
# Frames 40k..40k+39 span original samples [6400k - 200, 6400k + 6440): 40 samples past
# the chunk end are needed by its last frame, everything else is in the past.
LOOKAHEAD_SAMPLES: Final = HOP_SAMPLES * (MEL_FRAMES_PER_CHUNK - 1) + HALF_WINDOW_SAMPLES - CHUNK_SAMPLES
BLOCK_INPUT_SAMPLES: Final = HOP_SAMPLES * (MEL_FRAMES_PER_CHUNK - 1) + N_FFT  # 6640


@dataclass(frozen=True)
class PaddedBlocks:
    """Consecutive chunks of one 16 kHz stream, as the padded sample blocks their log-mel is computed from.

    What a session sends the engine instead of features: the engine turns them into normalized chunks
    (``log_mel_blocks``, then ``normalize_stream``), batched over every session's blocks due in a step.
    ``first_chunk_index`` is the index of ``samples[0]`` in its front-end stream; 0 starts a new stream, whose
    running maximum starts afresh (after a flush or clear_audio, as ``StreamingLogMel`` is replaced then).
    """

    samples: np.ndarray  # (N, 6640) float32: chunk k's block = stream samples [6400k - 200, 6400k + 6440)
    first_chunk_index: int

    def __len__(self) -> int:
        return int(self.samples.shape[0])


# What a push that completes no chunk returns: shared, which is safe as it has no elements to write.
_NO_BLOCKS: Final = np.empty((0, BLOCK_INPUT_SAMPLES), dtype=np.float32)


class BlockCutter:
    """One 16 kHz stream in, each completed chunk's centre-padded block out, as rows of one (N, 6640) float32 array:
    chunk k's block is stream samples [6400k - 200, 6400k + 6440), reflected at the stream's start and at a flush's
    end, so that its log-mel (``audio/mel.py``) is bit-identical to the same frames of whole-file STFT.

    Keeps 200 samples of left context plus the not-yet-cut samples in a fixed buffer, so memory and cost per chunk
    do not grow with the stream.
    """

    # After cutting, fewer than 200 + 6440 samples remain; room for one more chunk on top
    # means every copy into the buffer advances by at least 6400 samples.
    _CAPACITY_SAMPLES: Final = BLOCK_INPUT_SAMPLES + CHUNK_SAMPLES

    def __init__(self) -> None:
        self._buffer = np.zeros(self._CAPACITY_SAMPLES, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        self._buffer_start = 0  # stream index of _buffer[0]
        self._num_buffered = 0
        self.num_chunks_emitted = 0
        self._is_flushed = False

    @property
    def num_buffered_samples(self) -> int:
        """Retained history: 200 samples of left context + the not-yet-cut samples (< 6640)."""
        return self._num_buffered

    @property
    def num_samples_pushed(self) -> int:
        return self._buffer_start + self._num_buffered

    def push(self, values: np.ndarray, scale: np.float32 | None = None) -> np.ndarray:
        """The blocks of the chunks these samples complete, as one (N, 6640) float32 array; the samples given as
        ``pcm.checked_pcm_values`` gives them: ``values * scale`` in float32 is computed straight into the buffer.

        Not checked (a stream's hot path): ``values`` must be 1-D and finite, as samples decoded from frames
        ``pcm.check_pcm`` passed are and as resampling keeps them (``pcm.check_mono_samples`` checks others).
        """
        if self._is_flushed:
            raise RuntimeError("stream was flushed; call reset() to start a new one")
        pieces = []
        # Large pushes go in pieces so the buffer never grows: each piece but the last fills it, completing a chunk.
        while (room := self._CAPACITY_SAMPLES - self._num_buffered) < values.shape[0]:
            pieces.append(self._append_and_cut(values[:room], scale))
            values = values[room:]
        blocks = self._append_and_cut(values, scale)
        return np.concatenate([*pieces, blocks]) if pieces else blocks

    def flush(self, pad_to_chunk: bool = True) -> np.ndarray:
        """End the stream: the blocks of its last chunks, as ``push`` gives them. ``pad_to_chunk`` zero-pads a partial
        last chunk (as the reference pads files); otherwise it is dropped. The final chunk is reflected at the
        stream's end, like whole-file STFT on the padded signal."""
        if self._is_flushed:
            return _NO_BLOCKS
        self._is_flushed = True
        round_chunks = math.ceil if pad_to_chunk else math.floor
        stream_end = round_chunks(self.num_samples_pushed / CHUNK_SAMPLES) * CHUNK_SAMPLES
        num_zeros = stream_end - self.num_samples_pushed
        if num_zeros > 0:  # < 6400, fits: the buffer holds < 6640 samples after push
            self._buffer[self._num_buffered : self._num_buffered + num_zeros] = 0.0
            self._num_buffered += num_zeros
        return self._cut_blocks(stream_end)

    def _append_and_cut(self, values: np.ndarray, scale: np.float32 | None) -> np.ndarray:
        """``values * scale`` after the buffered samples (there is room), then the blocks of the chunks completed."""
        start = self._num_buffered
        self._num_buffered += values.shape[0]
        destination = self._buffer[start : self._num_buffered]
        # int16 values become float32 exactly here; the product in place then costs less than numpy's casting loop
        # of a mixed-type multiply, for the same bits.
        destination[:] = values
        if scale is not None:
            destination *= scale
        return self._cut_blocks(stream_end=None)

    def _cut_blocks(self, stream_end: int | None) -> np.ndarray:
        """Every chunk the buffer completes (all of them up to ``stream_end`` if given, else the ones whose
        look-ahead has arrived) as centre-padded blocks (N, 6640), copied out; then drop what no chunk needs."""
        first_chunk_index = self.num_chunks_emitted
        if stream_end is None:
            num_blocks = (self.num_samples_pushed - LOOKAHEAD_SAMPLES) // CHUNK_SAMPLES - first_chunk_index
        else:
            num_blocks = stream_end // CHUNK_SAMPLES - first_chunk_index
        if num_blocks <= 0:
            return _NO_BLOCKS
        blocks = np.empty((num_blocks, BLOCK_INPUT_SAMPLES), dtype=np.float32)
        for row in range(num_blocks):  # rows by index: iterating over a 2-D array costs as much as the copies
            # Chunk k's block is samples [6400k - 200, 6400k + 6440) of the stream, reflected where they fall outside
            # [0, stream_end): only the first chunk's start and a flush's last chunk's end.
            first = CHUNK_SAMPLES * (first_chunk_index + row) - HALF_WINDOW_SAMPLES
            last = first + BLOCK_INPUT_SAMPLES
            if first < 0 or (stream_end is not None and last > stream_end):
                self._cut_reflected_block(blocks[row], first, last, stream_end)
            else:
                blocks[row] = self._buffer[first - self._buffer_start : last - self._buffer_start]
        self.num_chunks_emitted += num_blocks
        self._drop_consumed()
        return blocks

    def _cut_reflected_block(self, block: np.ndarray, first: int, last: int, stream_end: int | None) -> None:
        """The block of stream samples [first, last) with the parts outside [0, stream_end) reflected, as
        F.pad(mode="reflect") pads the whole file: copies of samples, so the same bits."""
        left_pad = max(0, -first)
        right_pad = 0 if stream_end is None else max(0, last - stream_end)
        window = self._buffer[first + left_pad - self._buffer_start : last - right_pad - self._buffer_start]
        block[left_pad : BLOCK_INPUT_SAMPLES - right_pad] = window
        if left_pad:  # window[left_pad], ..., window[1]: the edge sample is not repeated
            block[:left_pad] = window[left_pad:0:-1]
        if right_pad:  # window[-2], ..., window[-1 - right_pad]
            block[BLOCK_INPUT_SAMPLES - right_pad :] = window[-2 : -2 - right_pad : -1]

    def _drop_consumed(self) -> None:
        keep_from = max(0, CHUNK_SAMPLES * self.num_chunks_emitted - HALF_WINDOW_SAMPLES)
        num_dropped = min(keep_from - self._buffer_start, self._num_buffered)
        if num_dropped <= 0:
            return
        remaining = self._num_buffered - num_dropped
        self._buffer[:remaining] = self._buffer[num_dropped : self._num_buffered]  # numpy handles overlap
        self._buffer_start += num_dropped
        self._num_buffered = remaining

