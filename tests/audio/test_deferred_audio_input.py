"""``AudioInput`` pushes what the straightforward chain pushes, at the same frame, bit for bit.

``AudioInput`` defers decoding and resampling to the frame that can complete a chunk, decodes 16 kHz frames
straight into its chunker's buffer and cuts blocks straight into the array it pushes. The reference below does
none of that: every frame when it arrives, decoded as whisper does (``astype(float32) / 32768``, channels
averaged by numpy's ``mean``), through ``StreamingResampler`` (pinned to one-shot soxr in test_audio.py), into
a whole 16 kHz stream from which each chunk's block is sliced after padding the whole stream as ``log_mel_raw``
pads a file (``F.pad(mode="reflect")``). Both get the same seeded traffic: frames of 1 sample to 0.5 s in
every format the tests name, bad frames, decoded samples, flushes, clears and format switches; after every call
each must have pushed the same chunks (same frame, same bits, same first chunk index) and keep the same books.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_interaction_server.audio import stream
from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.audio.pcm import AudioFormatError, check_pcm, checked_pcm_values
from audio_interaction_server.audio.resampler import StreamingResampler
from audio_interaction_server.audio.stream import CHUNK_S, AudioInput, max_resampled_samples, min_input_frames
from audio_interaction_server.protocol import AudioFormat
from audio_interaction_server.spec import CHUNK_SAMPLES, SAMPLE_RATE_HZ

RATES_HZ = (8000, 16000, 22050, 24000, 44100, 48000)
SAMPLE_FORMATS = ("pcm_s16le", "pcm_f32le")
NUM_CHANNELS = (1, 2, 3, 6, 8)  # mono; a power of two; the others (s16 decodes them three ways)
_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4}
_BLOCK_SAMPLES = 6640  # chunk k's block: stream samples [6400k - 200, 6400k + 6440)
_LEFT_CONTEXT_SAMPLES = 200
_LOOKAHEAD_SAMPLES = 40


def decode(data: bytes, audio_format: AudioFormat) -> np.ndarray:
    """Whisper's decoding, written out: int16 / 32768 in float32, channels averaged by numpy (float32)."""
    check_pcm(data, audio_format.sample_format, audio_format.num_channels)  # the errors the chain must give
    if audio_format.sample_format == "pcm_s16le":
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if audio_format.num_channels > 1:
        samples = samples.reshape(-1, audio_format.num_channels).mean(axis=1, dtype=np.float32)
    return samples


class WholeStream:
    """A 16 kHz feature stream kept whole; each chunk's block is sliced from it padded as ``log_mel_raw`` pads."""

    def __init__(self) -> None:
        self.samples = np.zeros(0, dtype=np.float32)
        self.num_chunks_emitted = 0

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        self.samples = np.concatenate([self.samples, samples])
        num_complete = (self.samples.shape[0] - _LOOKAHEAD_SAMPLES) // CHUNK_SAMPLES  # look-ahead arrived
        return self._blocks(num_complete, right_pad=0)

    def flush(self) -> list[np.ndarray]:
        """The rest, zero-padded to a whole chunk; the stream end reflected, as at the end of a file."""
        self.samples = np.pad(self.samples, (0, -self.samples.shape[0] % CHUNK_SAMPLES))
        return self._blocks(self.samples.shape[0] // CHUNK_SAMPLES, right_pad=_LEFT_CONTEXT_SAMPLES)

    def _blocks(self, num_chunks: int, right_pad: int) -> list[np.ndarray]:
        if num_chunks <= self.num_chunks_emitted:
            return []
        padded = F.pad(torch.from_numpy(self.samples)[None, None], (_LEFT_CONTEXT_SAMPLES, right_pad),
                       mode="reflect")[0, 0].numpy()
        blocks = [padded[CHUNK_SAMPLES * k : CHUNK_SAMPLES * k + _BLOCK_SAMPLES]
                  for k in range(self.num_chunks_emitted, num_chunks)]
        self.num_chunks_emitted = num_chunks
        return blocks


class EagerInput:
    """The audio chain processing every frame when it arrives: decode, resample, cut, push."""

    def __init__(self) -> None:
        self.pushed: list[PaddedBlocks] = []
        self.format = AudioFormat()
        self.resampler: StreamingResampler | None = None
        self.front_end: WholeStream | None = None
        self.num_chunks_pushed = 0
        self.audio_received_s = 0.0
        self.stream_s = 0.0

    def accept_frame(self, data: bytes) -> int:
        return self._accept_samples(decode(data, self.format))

    def accept(self, samples: np.ndarray) -> int:
        if not np.isfinite(samples).all():
            raise ValueError("samples contain NaN or Inf")
        return self._accept_samples(samples)

    def set_format(self, audio_format: AudioFormat) -> int:
        num_pushed = self._end_resampler() if audio_format != self.format else 0
        self.format = audio_format
        return num_pushed

    def flush(self, trailing_silence_s: float) -> int:
        num_pushed = self._end_resampler()
        self.front_end = self.front_end or WholeStream()
        silence = np.zeros(int(round(trailing_silence_s * SAMPLE_RATE_HZ)), dtype=np.float32)
        num_pushed += self._push(self.front_end.push(silence) + self.front_end.flush())
        self.front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return num_pushed

    def clear(self) -> float:
        dropped_s = max(0.0, self.stream_s - self.num_chunks_pushed * CHUNK_S)
        self.resampler = self.front_end = None
        self.stream_s = self.num_chunks_pushed * CHUNK_S
        return dropped_s

    def _accept_samples(self, samples: np.ndarray) -> int:
        self.audio_received_s += samples.shape[0] / self.format.sample_rate_hz
        self.stream_s += samples.shape[0] / self.format.sample_rate_hz
        self.resampler = self.resampler or StreamingResampler(self.format.sample_rate_hz)
        self.front_end = self.front_end or WholeStream()
        return self._push(self.front_end.push(self.resampler.process(samples)))

    def _end_resampler(self) -> int:
        num_pushed = 0
        if self.resampler is not None and self.front_end is not None:
            num_pushed = self._push(self.front_end.push(self.resampler.flush()))
        self.resampler = None
        return num_pushed

    def _push(self, blocks: list[np.ndarray]) -> int:
        if blocks:
            assert self.front_end is not None
            first_chunk_index = self.front_end.num_chunks_emitted - len(blocks)
            self.pushed.append(PaddedBlocks(np.stack(blocks), first_chunk_index))
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
    """(result, error message) of one call, so refused audio is compared like accepted audio."""
    try:
        return action(*args), None
    except ValueError as error:  # AudioFormatError for a frame; ValueError for samples ``accept`` refuses
        return None, str(error)


def _steady_frame(rng: np.random.Generator, audio_format: AudioFormat, frame_ms: int) -> bytes:
    """A client's usual frame: ``frame_ms`` of full-scale noise (s16) or of noise at -10 dBFS (f32)."""
    num_values = audio_format.sample_rate_hz * frame_ms // 1000 * audio_format.num_channels
    if audio_format.sample_format == "pcm_s16le":
        return rng.integers(-32768, 32768, num_values).astype("<i2").tobytes()
    return (rng.standard_normal(num_values) * 0.3).astype("<f4").tobytes()


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
        if draw < 0.88:
            data = _frame(rng, deferred.format)
            got, expected = _call(_accept_frame, deferred, data), _call(eager.accept_frame, data)
            num_frames_accepted += expected[1] is None
        elif draw < 0.9:  # decoded samples, the offline CLI's way in; now and then one NaN, refused
            samples = (rng.standard_normal(int(rng.integers(1, 10_000))) * 0.3).astype(np.float32)
            if rng.random() < 0.2:
                samples[rng.integers(samples.shape[0])] = np.nan
            got, expected = _call(deferred.accept, samples), _call(eager.accept, samples)
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


@pytest.mark.parametrize(("audio_format", "frame_ms"), [
    (AudioFormat(), 100),  # 16 kHz s16 mono: decoded straight into the chunker's buffer
    (AudioFormat(), 20),
    (AudioFormat(num_channels=2), 20),  # 16 kHz s16, channels summed and scaled into the buffer
    (AudioFormat(num_channels=6), 20),  # ... and divided as numpy's mean divides
    (AudioFormat(sample_format="pcm_f32le"), 20),
    (AudioFormat(sample_rate_hz=48_000, num_channels=2), 20),  # resampled
    (AudioFormat(sample_rate_hz=24_000), 20),  # the OpenAI Realtime dialect's format
    (AudioFormat(sample_format="pcm_f32le", sample_rate_hz=44_100, num_channels=2), 20),
])
def test_steady_frames_of_each_format_push_what_the_eager_chain_pushes(audio_format: AudioFormat,
                                                                      frame_ms: int) -> None:
    """A session's usual traffic, format by format: steady frames from the first chunk (its block reflected at
    the stream start) on, a flush (the last block reflected at the stream end), more audio, a clear, a switch to
    another format and back mid-stream, and a last flush."""
    rng = np.random.default_rng(frame_ms)
    pushed: list[PaddedBlocks] = []
    deferred, eager = AudioInput(pushed.append), EagerInput()

    def both(action: str, *args) -> None:
        assert getattr(deferred, action)(*args) == getattr(eager, action)(*args)
        _assert_same_state(deferred, pushed, eager)

    def frames(seconds: float) -> None:
        for _ in range(round(seconds * 1000 / frame_ms)):
            data = _steady_frame(rng, deferred.format, frame_ms)
            assert _accept_frame(deferred, data) == eager.accept_frame(data)
            _assert_same_state(deferred, pushed, eager)

    both("set_format", audio_format)
    frames(3.0)
    both("flush", 0.3)
    frames(1.3)
    both("clear")
    frames(1.0)
    both("set_format", AudioFormat(sample_rate_hz=22_050) if audio_format == AudioFormat() else AudioFormat())
    frames(0.7)
    both("set_format", audio_format)
    frames(1.1)
    both("flush", 0.0)
    assert eager.num_chunks_pushed >= 15 and deferred.stream_s == eager.num_chunks_pushed * CHUNK_S


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
        return checked_pcm_values(*args)

    monkeypatch.setattr(stream, "checked_pcm_values", counting_decode)
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
