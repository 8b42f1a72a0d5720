"""``AudioInput`` defers decoding and resampling to the frame that can complete a chunk, and changes nothing else.

The reference is the eager chain (every frame through ``decode_pcm`` -> ``StreamingResampler`` ->
``LogMelChunker.push_blocks`` at once, as ``AudioInput`` did before it deferred the work), written out below.
Both get the same seeded random traffic: frames of 1 sample to 0.5 s in every format the tests name, bad
frames, flushes, clears and format switches; after every call each must have pushed the same chunks (same
frame, same bits, same first chunk index) and keep the same books.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from audio_interaction_server.audio import stream
from audio_interaction_server.audio.frontend import (
    AudioFormatError, LogMelChunker, PaddedBlocks, StreamingResampler, decode_checked_pcm, decode_pcm,
)
from audio_interaction_server.audio.stream import CHUNK_S, AudioInput, max_resampled_samples, min_input_frames
from audio_interaction_server.protocol import AudioFormat
from audio_interaction_server.spec import SAMPLE_RATE_HZ

RATES_HZ = (8000, 16000, 22050, 24000, 44100, 48000)
SAMPLE_FORMATS = ("pcm_s16le", "pcm_f32le")
NUM_CHANNELS = (1, 2, 8)
_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4}


class EagerInput:
    """The audio chain processing every frame when it arrives: decode, resample, cut, push."""

    def __init__(self) -> None:
        self.pushed: list[PaddedBlocks] = []
        self.format = AudioFormat()
        self.resampler: StreamingResampler | None = None
        self.front_end: LogMelChunker | None = None
        self.num_chunks_pushed = 0
        self.audio_received_s = 0.0
        self.stream_s = 0.0

    def accept_frame(self, data: bytes) -> int:
        samples = decode_pcm(data, self.format.sample_format, self.format.num_channels)
        self.audio_received_s += samples.shape[0] / self.format.sample_rate_hz
        self.stream_s += samples.shape[0] / self.format.sample_rate_hz
        self.resampler = self.resampler or StreamingResampler(self.format.sample_rate_hz)
        self.front_end = self.front_end or LogMelChunker()
        return self._push(self.front_end.push_blocks(self.resampler.process(samples)))

    def set_format(self, audio_format: AudioFormat) -> int:
        num_pushed = self._end_resampler() if audio_format != self.format else 0
        self.format = audio_format
        return num_pushed

    def flush(self, trailing_silence_s: float) -> int:
        num_pushed = self._end_resampler()
        self.front_end = self.front_end or LogMelChunker()
        silence = np.zeros(int(round(trailing_silence_s * SAMPLE_RATE_HZ)), dtype=np.float32)
        num_pushed += self._push(self.front_end.push_blocks(silence) + self.front_end.flush_blocks(pad_to_chunk=True))
        self.front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return num_pushed

    def clear(self) -> float:
        dropped_s = max(0.0, self.stream_s - self.num_chunks_pushed * CHUNK_S)
        self.resampler = self.front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return dropped_s

    def _end_resampler(self) -> int:
        num_pushed = 0
        if self.resampler is not None and self.front_end is not None:
            num_pushed = self._push(self.front_end.push_blocks(self.resampler.flush()))
        self.resampler = None
        return num_pushed

    def _push(self, blocks: list) -> int:
        if blocks:
            assert self.front_end is not None
            first_chunk_index = self.front_end.num_chunks_emitted - len(blocks)
            self.pushed.append(PaddedBlocks(np.stack([block.numpy() for block in blocks]), first_chunk_index))
            self.num_chunks_pushed += len(blocks)
        return len(blocks)


def _frame(rng: np.random.Generator, audio_format: AudioFormat) -> bytes:
    """A frame of 1 sample to 0.5 s (log-uniform, so short frames are common), sometimes one that is refused."""
    num_frames = max(1, int(math.exp(rng.uniform(0.0, math.log(audio_format.sample_rate_hz / 2)))))
    num_values = num_frames * audio_format.num_channels
    if audio_format.sample_format == "pcm_s16le":
        data = rng.integers(-32768, 32768, num_values).astype("<i2").tobytes()
    else:
        values = (rng.standard_normal(num_values) * 0.3).astype("<f4")
        if rng.random() < 0.03:
            values[rng.integers(num_values)] = rng.choice([np.nan, np.inf, 1e3])
        data = values.tobytes()
    if rng.random() < 0.03:
        data = data[:-1]  # not a whole number of sample frames
    return data


def _random_format(rng: np.random.Generator) -> AudioFormat:
    return AudioFormat(sample_format=rng.choice(SAMPLE_FORMATS), sample_rate_hz=int(rng.choice(RATES_HZ)),
                       num_channels=int(rng.choice(NUM_CHANNELS)))


def _call(action, *args):
    """(result, error message) of one call, so a refused frame is compared like an accepted one."""
    try:
        return action(*args), None
    except AudioFormatError as error:
        return None, str(error)


def _accept_frame(audio: AudioInput, data: bytes) -> int:
    return audio.accept_frame(audio.check_frame(data))


def _assert_same_state(deferred: AudioInput, pushed: list[PaddedBlocks], eager: EagerInput) -> None:
    assert len(pushed) == len(eager.pushed)
    for got, expected in zip(pushed, eager.pushed, strict=True):
        assert got.first_chunk_index == expected.first_chunk_index
        assert got.samples.dtype == expected.samples.dtype and np.array_equal(got.samples, expected.samples)
    assert deferred.num_chunks_pushed == eager.num_chunks_pushed
    assert deferred.stream_s == eager.stream_s
    assert deferred.audio_received_s == eager.audio_received_s
    assert deferred.format == eager.format


@pytest.mark.parametrize("seed", range(6))
def test_deferred_input_pushes_what_the_eager_chain_pushes_at_the_same_frame(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pushed: list[PaddedBlocks] = []
    deferred, eager = AudioInput(pushed.append), EagerInput()
    audio_format = _random_format(rng)
    deferred.set_format(audio_format)
    eager.set_format(audio_format)
    num_frames_accepted = 0
    for _ in range(400):
        draw = rng.random()
        if draw < 0.9:
            data = _frame(rng, deferred.format)
            got, expected = _call(_accept_frame, deferred, data), _call(eager.accept_frame, data)
            num_frames_accepted += expected[1] is None
        elif draw < 0.94:
            silence_s = float(rng.choice([0.0, rng.uniform(0.0, 1.0)]))
            assert deferred.stream_s_after_flush(silence_s) == pytest.approx(
                math.ceil((eager.stream_s + round(silence_s * 16000) / 16000) / CHUNK_S - 1e-6) * CHUNK_S)
            got, expected = deferred.flush(silence_s), eager.flush(silence_s)
        elif draw < 0.96:
            got, expected = deferred.clear(), eager.clear()
        else:  # a new format, or (one time in four) the same one again
            new_format = deferred.format if rng.random() < 0.25 else _random_format(rng)
            got, expected = deferred.set_format(new_format), eager.set_format(new_format)
        assert got == expected
        _assert_same_state(deferred, pushed, eager)
    assert num_frames_accepted > 300 and eager.num_chunks_pushed > 20  # the traffic did exercise the chain


@pytest.mark.parametrize("input_rate_hz", RATES_HZ + (1000, 11025, 384000))
def test_the_trigger_bound_is_never_below_what_soxr_has_returned(input_rate_hz: int) -> None:
    """The deferral's premise: after any split of the input, soxr has output no more than ``max_resampled_samples``
    (else a chunk the eager chain completes would wait for a later frame)."""
    rng = np.random.default_rng(input_rate_hz)
    resampler = StreamingResampler(input_rate_hz)
    num_in = num_out = 0
    while num_in < 3 * input_rate_hz:
        size = int(rng.choice([1, 2, 7, rng.integers(1, input_rate_hz // 2)]))
        num_out += resampler.process(rng.standard_normal(size).astype(np.float32)).shape[0]
        num_in += size
        assert num_out <= max_resampled_samples(num_in, input_rate_hz)
    assert num_out + resampler.flush().shape[0] <= max_resampled_samples(num_in, input_rate_hz)


@pytest.mark.parametrize("input_rate_hz", RATES_HZ + (1000, 11025, 384000))
def test_min_input_frames_is_the_first_frame_count_reaching_the_bound(input_rate_hz: int) -> None:
    num_input_frames = np.arange(0, 3 * input_rate_hz // 100)
    bounds = np.array([max_resampled_samples(int(n), input_rate_hz) for n in num_input_frames])
    for num_resampled in range(-3, int(bounds[-1]) + 1):
        first_reaching = int(num_input_frames[np.argmax(bounds >= num_resampled)])
        assert min_input_frames(num_resampled, input_rate_hz) == first_reaching


@pytest.mark.parametrize("sample_format", SAMPLE_FORMATS)
def test_at_16_khz_a_chunk_leaves_with_the_very_sample_that_completes_it(sample_format: str) -> None:
    """At 16 kHz the trigger is exact: chunk k needs 6400 (k + 1) + 40 samples, and the frame bringing the last
    of them pushes it, even when that frame is a single sample."""
    pushed: list[PaddedBlocks] = []
    audio = AudioInput(pushed.append)
    audio.set_format(AudioFormat(sample_format=sample_format, num_channels=2))
    rng = np.random.default_rng(2)
    dtype = "<i2" if sample_format == "pcm_s16le" else "<f4"
    for num_frames, num_expected in [(6439, 0), (1, 1), (6399, 0), (1, 1), (6400 + 6399, 1), (1, 1)]:
        data = (rng.uniform(-0.5, 0.5, 2 * num_frames) * (32767 if dtype == "<i2" else 1)).astype(dtype).tobytes()
        assert _accept_frame(audio, data) == num_expected
    assert [blocks.first_chunk_index for blocks in pushed] == [0, 1, 2, 3]


def test_frames_are_decoded_once_per_chunk_not_once_per_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_decode(*args):
        calls.append(args)
        return decode_checked_pcm(*args)

    monkeypatch.setattr(stream, "decode_checked_pcm", counting_decode)
    pushed: list[PaddedBlocks] = []
    audio = AudioInput(pushed.append)  # 16 kHz mono s16
    rng = np.random.default_rng(0)
    num_frames_completing_chunks = 0
    for _ in range(40):  # 4 s in 100 ms frames: 10 chunks, the last still waiting for its look-ahead
        num_pushed = _accept_frame(audio, rng.integers(-32768, 32768, 1600).astype("<i2").tobytes())
        num_frames_completing_chunks += num_pushed > 0
    assert audio.num_chunks_pushed == 9 and num_frames_completing_chunks == 9
    assert len(calls) == 9  # one decode per chunk, at the frame completing it
    audio.flush(0.0)
    assert len(calls) == 10 and audio.num_chunks_pushed == 10  # the rest, decoded when the flush needs it


def test_a_refused_frame_changes_nothing_and_the_stream_goes_on() -> None:
    pushed: list[PaddedBlocks] = []
    audio = AudioInput(pushed.append)
    eager = EagerInput()
    f32 = AudioFormat(sample_format="pcm_f32le", sample_rate_hz=24000, num_channels=2)
    audio.set_format(f32)
    eager.set_format(f32)
    rng = np.random.default_rng(1)
    for index in range(60):
        values = (rng.standard_normal(2 * 480) * 0.3).astype("<f4")  # 20 ms
        if index % 7 == 3:
            values[5] = np.nan
            with pytest.raises(AudioFormatError, match="NaN or Inf"):
                audio.check_frame(values.tobytes())
            with pytest.raises(AudioFormatError, match="NaN or Inf"):
                eager.accept_frame(values.tobytes())
        else:
            assert _accept_frame(audio, values.tobytes()) == eager.accept_frame(values.tobytes())
        _assert_same_state(audio, pushed, eager)
    assert audio.num_chunks_pushed == 2


def test_a_frame_checked_before_a_format_change_is_refused() -> None:
    audio = AudioInput(lambda blocks: None)
    frame = audio.check_frame(bytes(640))
    audio.set_format(AudioFormat(sample_rate_hz=8000))
    with pytest.raises(ValueError, match="another audio format"):
        audio.accept_frame(frame)
