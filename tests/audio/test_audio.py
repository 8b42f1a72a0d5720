"""Audio front-end: decoding, resampling, and streaming features equal to whole-file features."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import torch

from audio_interaction_server.audio.files import load_audio_file, load_audio_sequence
from audio_interaction_server.audio.mel import (
    LogMelChunker, StreamingLogMel, log_mel_raw, log_mel_whole, mel_filters, normalize_log_mel, offline_chunks,
)
from audio_interaction_server.audio.pcm import AudioFormatError, checked_pcm_values, decode_checked_pcm, decode_pcm
from audio_interaction_server.audio.resampler import StreamingResampler
from audio_interaction_server.spec import CHUNK_SAMPLES, MEL_FRAMES_PER_CHUNK, SAMPLE_RATE_HZ


@pytest.fixture(scope="module")
def audio_dir(shared_audio: Path) -> Path:
    return shared_audio


@pytest.fixture(scope="module")
def speech(audio_dir: Path) -> np.ndarray:
    """~10.8 s of 16 kHz speech; its length is not a multiple of 6400 samples."""
    samples = load_audio_file(audio_dir / "02_translate" / "sample02_02.wav")
    assert samples.shape[0] % CHUNK_SAMPLES != 0
    return samples


def _pad_to_chunk(samples: np.ndarray) -> np.ndarray:
    return np.pad(samples, (0, -samples.shape[0] % CHUNK_SAMPLES))


def _pieces(samples: np.ndarray, piece_samples: int | str, seed: int = 0) -> list[np.ndarray]:
    if piece_samples == "whole":
        return [samples]
    if piece_samples == "random":
        rng = np.random.default_rng(seed)
        cuts = np.cumsum(rng.integers(1, 9000, size=samples.shape[0]))
        cuts = cuts[cuts < samples.shape[0]]
        return np.split(samples, cuts)
    return [samples[i : i + piece_samples] for i in range(0, samples.shape[0], piece_samples)]


def _stream(chunker: LogMelChunker | StreamingLogMel, samples: np.ndarray, piece_samples: int | str) -> torch.Tensor:
    chunks = [chunk for piece in _pieces(samples, piece_samples) for chunk in chunker.push(piece)]
    chunks += chunker.flush()
    assert all(chunk.shape == (128, MEL_FRAMES_PER_CHUNK) and chunk.dtype == torch.float32 for chunk in chunks)
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(128, 0)


# --- PCM decoding ---------------------------------------------------------------------------


def test_decode_pcm_s16_scales_by_32768() -> None:
    data = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    out = decode_pcm(data, "pcm_s16le", 1)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.0, 0.5, -1.0, 32767 / 32768], dtype=np.float32))


def test_decode_pcm_f32_roundtrip_and_stereo_downmix() -> None:
    mono = np.array([0.25, -0.5, 1.0], dtype="<f4")
    np.testing.assert_array_equal(decode_pcm(mono.tobytes(), "pcm_f32le", 1), mono)
    stereo = np.array([[0.5, 0.25], [-1.0, 1.0], [0.0, 0.5]], dtype="<f4")  # (frames, channels), interleaved
    np.testing.assert_array_equal(decode_pcm(stereo.tobytes(), "pcm_f32le", 2), [0.375, 0.0, 0.25])
    s16_stereo = np.array([[16384, 0], [-32768, -32768]], dtype="<i2")
    np.testing.assert_array_equal(decode_pcm(s16_stereo.tobytes(), "pcm_s16le", 2), [0.25, -1.0])
    assert decode_pcm(b"", "pcm_s16le", 2).shape == (0,)


@pytest.mark.parametrize(
    ("num_bytes", "sample_format", "num_channels"),
    [(3, "pcm_s16le", 1), (6, "pcm_s16le", 2), (6, "pcm_f32le", 1), (12, "pcm_f32le", 2)],
)
def test_decode_pcm_rejects_partial_frames(num_bytes: int, sample_format: str, num_channels: int) -> None:
    with pytest.raises(AudioFormatError, match="not a whole number"):
        decode_pcm(bytes(num_bytes), sample_format, num_channels)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_decode_pcm_rejects_non_finite_floats(bad_value: float) -> None:
    data = np.array([0.1, bad_value, 0.2, 0.3], dtype="<f4").tobytes()
    with pytest.raises(AudioFormatError, match="NaN or Inf"):
        decode_pcm(data, "pcm_f32le", 2)


@pytest.mark.parametrize("absurd_value", [1e20, -3.4e38, 101.0])
def test_decode_pcm_rejects_floats_no_microphone_produces(absurd_value: float) -> None:
    """Finite but absurd samples would overflow the power spectrum (|x|^2 past float32) and
    end the session with a numerical error downstream; they are refused here instead."""
    data = np.array([0.1, absurd_value, 0.2, 0.3], dtype="<f4").tobytes()
    with pytest.raises(AudioFormatError, match="full scale"):
        decode_pcm(data, "pcm_f32le", 1)


def test_decode_pcm_accepts_floats_up_to_the_bound() -> None:
    """Hot but plausible float audio (inter-sample overs, gain staging) is not refused."""
    loud = np.array([1.5, -4.0, 100.0, -100.0], dtype="<f4")  # the bound, 100x full scale, is allowed
    np.testing.assert_array_equal(decode_pcm(loud.tobytes(), "pcm_f32le", 1), loud)


def test_decode_pcm_rejects_bad_arguments() -> None:
    with pytest.raises(AudioFormatError, match="num_channels"):
        decode_pcm(bytes(4), "pcm_s16le", 0)
    with pytest.raises(AudioFormatError, match="unknown sample format"):
        decode_pcm(bytes(4), "pcm_u8", 1)  # type: ignore[arg-type]


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative_path", "source_rate_hz", "source_channels"),
    [
        ("01_count_bark/sample01_02.wav", 48_000, 2),
        ("01_count_bark/sample01_01.mp3", 44_100, 1),
        ("02_translate/sample02_04.wav", 16_000, 1),
    ],
)
def test_load_audio_file_gives_16k_mono(
    audio_dir: Path, relative_path: str, source_rate_hz: int, source_channels: int
) -> None:
    path = audio_dir / relative_path
    # Decode to count frames: soundfile.info's mp3 frame count is an estimate from the file size,
    # which these files' 35 KB ID3 tag inflates by ~2 s.
    source, rate_hz = soundfile.read(path, always_2d=True)
    assert (rate_hz, source.shape[1]) == (source_rate_hz, source_channels)
    samples = load_audio_file(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    expected_samples = source.shape[0] * SAMPLE_RATE_HZ / source_rate_hz
    assert abs(samples.shape[0] - expected_samples) <= 1
    assert 0.5 < samples.shape[0] / SAMPLE_RATE_HZ < 11.0
    assert np.isfinite(samples).all() and 1e-3 < np.abs(samples).max() <= 1.5


def test_load_audio_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_audio_file(tmp_path / "missing.wav")
    (tmp_path / "noise.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioFormatError, match="cannot decode"):
        load_audio_file(tmp_path / "noise.wav")


def test_load_audio_sequence_keeps_order_and_repeats(audio_dir: Path, tmp_path: Path) -> None:
    paths = load_audio_sequence(audio_dir / "01_count_bark")
    assert [p.name for p in paths] == ["sample01_01.mp3"] + ["sample01_02.wav"] * 5
    (tmp_path / "sequence.json").write_text('["a.wav"]')
    with pytest.raises(FileNotFoundError, match="a.wav"):
        load_audio_sequence(tmp_path)
    (tmp_path / "sequence.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of file names"):
        load_audio_sequence(tmp_path)


# --- resampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("input_rate_hz", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_streaming_resampler_equals_whole_signal(input_rate_hz: int) -> None:
    rng = np.random.default_rng(input_rate_hz)
    t = np.arange(int(1.3 * input_rate_hz)) / input_rate_hz
    signal = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(t.shape[0])).astype(np.float32)
    resampler = StreamingResampler(input_rate_hz)
    cuts = np.cumsum(rng.integers(1, 3000, size=signal.shape[0]))
    pieces = np.split(signal, cuts[cuts < signal.shape[0]])
    pieces[1:1] = [np.zeros(0, np.float32)]  # an empty piece is harmless
    streamed = np.concatenate([resampler.process(piece) for piece in pieces] + [resampler.flush()])
    whole = (
        signal if input_rate_hz == SAMPLE_RATE_HZ else soxr.resample(signal, input_rate_hz, SAMPLE_RATE_HZ, "HQ")
    )
    # soxr documents no chunking invariance, but libsoxr runs the one-shot call through the same
    # streaming engine, and with soxr 1.1 the result is bit-exact for any split; assert that so a
    # change in soxr is noticed rather than absorbed by a tolerance.
    assert streamed.dtype == np.float32
    np.testing.assert_array_equal(streamed, whole)
    # reset() starts a fresh stream with identical output
    resampler.reset()
    again = np.concatenate([resampler.process(signal), resampler.flush()])
    np.testing.assert_array_equal(again, whole)


def test_streaming_resampler_validates() -> None:
    for bad_rate in (0, 999, 384_001):
        with pytest.raises(ValueError, match="outside the supported"):
            StreamingResampler(bad_rate)
    resampler = StreamingResampler(48_000)
    with pytest.raises(ValueError, match="mono"):
        resampler.process(np.zeros((10, 2), np.float32))
    resampler.flush()
    with pytest.raises(RuntimeError, match="reset"):
        resampler.process(np.zeros(10, np.float32))


# --- mel filterbank and whole-file features -------------------------------------------------


@pytest.fixture(scope="module")
def whisper_extractor():  # type: ignore[no-untyped-def]
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128)


def test_mel_filters_match_whisper_feature_extractor(whisper_extractor) -> None:  # type: ignore[no-untyped-def]
    filters = mel_filters()
    assert filters.shape == (128, 201) and filters.dtype == torch.float32
    assert mel_filters() is filters  # cached
    np.testing.assert_array_equal(filters.numpy(), whisper_extractor.mel_filters.T.astype(np.float32))
    assert (filters >= 0).all() and (filters.sum(dim=1) > 0).all()  # every mel band sees some bins


def test_mel_filters_are_transformers_table_bit_for_bit_before_rounding_too() -> None:
    from transformers.audio_utils import mel_filter_bank

    from audio_interaction_server.audio.mel import mel_filters_float64

    reference = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                                sampling_rate=16000, norm="slaney", mel_scale="slaney")
    assert mel_filters_float64().dtype == np.float64
    np.testing.assert_array_equal(mel_filters_float64(), reference)


def test_log_mel_whole_matches_whisper_feature_extractor(speech: np.ndarray, whisper_extractor) -> None:  # type: ignore[no-untyped-def]
    ours = log_mel_whole(speech)
    assert ours.shape == (128, speech.shape[0] // 160) and ours.dtype == torch.float32
    # The independent check: transformers' numpy STFT (float64 spectra), so not bit-equal;
    # observed max |diff| 2.6e-5 (scaled log units), in 3 of 138k values above 2e-5.
    numpy_path = whisper_extractor._np_extract_fbank_features(speech[None].astype(np.float64), "cpu")[0]
    np.testing.assert_allclose(ours.numpy(), numpy_path, rtol=0, atol=1e-4)
    # transformers' public call (its torch path: torch.stft over the whole file in one go).
    public = whisper_extractor(speech, sampling_rate=SAMPLE_RATE_HZ, padding="longest", return_tensors="np")
    np.testing.assert_allclose(ours.numpy(), public["input_features"][0], rtol=0, atol=1e-6)


def test_log_mel_raw_matches_one_shot_center_stft(speech: np.ndarray) -> None:
    """Blockwise framing equals whisper's literal one-call torch.stft(center=True) formulation."""
    x = torch.from_numpy(speech)
    spectrum = torch.stft(x, 400, 160, window=torch.hann_window(400), center=True, pad_mode="reflect",
                          return_complex=True)
    literal = torch.log10(torch.clamp(mel_filters() @ spectrum[..., :-1].abs() ** 2, min=1e-10))
    # Observed bit-equal with MKL on x86; a different FFT/BLAS may round differently for other batch sizes.
    torch.testing.assert_close(log_mel_raw(speech), literal, rtol=0, atol=1e-6)


def test_log_mel_short_inputs() -> None:
    assert log_mel_whole(np.zeros(159, np.float32)).shape == (128, 0)
    with pytest.raises(ValueError, match="more than 200"):
        log_mel_raw(np.zeros(200, np.float32))
    assert log_mel_whole(np.zeros(201, np.float32)).shape == (128, 1)
    assert offline_chunks(np.zeros(0, np.float32)).shape == (0, 128, 40)


def test_offline_chunks_split_whole_file_mel(speech: np.ndarray) -> None:
    chunks = offline_chunks(speech)
    assert chunks.shape == (math.ceil(speech.shape[0] / CHUNK_SAMPLES), 128, 40)
    assert torch.equal(torch.cat(list(chunks), dim=1), log_mel_whole(_pad_to_chunk(speech)))


# --- streaming features ---------------------------------------------------------------------


@pytest.mark.parametrize("piece_samples", [1, 159, 160, 6400, 6440, 7000, "random", "whole"])
def test_streaming_raw_mel_is_bit_identical_to_whole_file(speech: np.ndarray, piece_samples: int | str) -> None:
    # 1-sample pushes are Python-bound: use 2.2 s (5.5 chunks) for them, the whole file otherwise.
    signal = speech[:35_300] if piece_samples == 1 else speech
    streamed = _stream(LogMelChunker(), signal, piece_samples)
    whole = log_mel_raw(_pad_to_chunk(signal))
    assert streamed.shape == whole.shape
    assert torch.equal(streamed, whole), f"{(streamed != whole).any(dim=0).sum()} frames differ"


def test_streaming_equals_offline_when_loudest_frame_comes_first(speech: np.ndarray) -> None:
    t = np.arange(3200) / SAMPLE_RATE_HZ
    burst = (0.9 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)  # louder than any speech frame
    signal = np.concatenate([burst, 0.5 * speech[:80_000]]).astype(np.float32)
    streaming = StreamingLogMel()
    streamed = _stream(streaming, signal, "random")
    raw = log_mel_raw(_pad_to_chunk(signal))
    assert int(raw.argmax()) % raw.shape[1] < MEL_FRAMES_PER_CHUNK  # the premise: max in chunk 0
    assert streaming.running_max == float(raw.max())
    assert torch.equal(streamed, torch.cat(list(offline_chunks(signal)), dim=1))


def test_streaming_differs_from_offline_only_by_the_running_max(speech: np.ndarray) -> None:
    signal = np.concatenate([0.01 * speech[:40_000], speech[40_000:]]).astype(np.float32)  # gets louder
    streaming = StreamingLogMel()
    streamed = [chunk for piece in _pieces(signal, 3000) for chunk in streaming.push(piece)] + streaming.flush()
    raw = log_mel_raw(_pad_to_chunk(signal))
    running_max = -math.inf
    for k, chunk in enumerate(streamed):
        raw_chunk = raw[:, MEL_FRAMES_PER_CHUNK * k : MEL_FRAMES_PER_CHUNK * (k + 1)]
        running_max = max(running_max, float(raw_chunk.max()))
        assert torch.equal(chunk, normalize_log_mel(raw_chunk, running_max))
    assert not torch.equal(torch.cat(streamed, dim=1), log_mel_whole(_pad_to_chunk(signal)))
    assert streaming.num_chunks_emitted == len(streamed) == raw.shape[1] // MEL_FRAMES_PER_CHUNK


def test_history_stays_bounded_over_a_minute() -> None:
    rng = np.random.default_rng(7)
    minute = (0.1 * rng.standard_normal(60 * SAMPLE_RATE_HZ)).astype(np.float32)
    for piece_samples in (3_000, 60 * SAMPLE_RATE_HZ):
        chunker = LogMelChunker()
        num_chunks = 0
        for piece in _pieces(minute, piece_samples):
            num_chunks += len(chunker.push(piece))
            # 200 samples of left context + less than one chunk and its 40-sample look-ahead
            assert chunker.num_buffered_samples < 200 + CHUNK_SAMPLES + 40
        assert chunker._cutter._buffer.shape[0] == 200 + 2 * CHUNK_SAMPLES + 40  # never grew
        assert num_chunks == 60 * SAMPLE_RATE_HZ // CHUNK_SAMPLES - 1  # the last waits for look-ahead
        assert len(chunker.flush()) == 1


@pytest.mark.parametrize("num_samples", [0, 1, 6_399, 6_400, 6_401, 6_439, 6_440, 6_441, 12_839, 12_840, 19_000])
def test_flush_pads_the_partial_chunk(speech: np.ndarray, num_samples: int) -> None:
    signal = speech[:num_samples]
    chunker = LogMelChunker()
    streamed = _stream(chunker, signal, 2_000)
    assert chunker.num_chunks_emitted == math.ceil(num_samples / CHUNK_SAMPLES)
    assert streamed.shape[1] == MEL_FRAMES_PER_CHUNK * chunker.num_chunks_emitted
    if num_samples:
        assert torch.equal(streamed, log_mel_raw(_pad_to_chunk(signal)))


def test_flush_without_padding_drops_the_partial_chunk(speech: np.ndarray) -> None:
    # Last full chunk still waiting for look-ahead: the stream is treated as truncated there.
    chunker = LogMelChunker()
    emitted = chunker.push(speech[:19_220]) + chunker.flush(pad_to_chunk=False)
    assert torch.equal(torch.cat(emitted, dim=1), log_mel_raw(speech[:19_200]))
    # Look-ahead already arrived: that chunk went out with the true samples; nothing is left.
    chunker = LogMelChunker()
    emitted = chunker.push(speech[:19_300])
    assert chunker.flush(pad_to_chunk=False) == []
    assert torch.equal(torch.cat(emitted, dim=1), log_mel_raw(_pad_to_chunk(speech[:19_300]))[:, :120])


def test_reset_starts_a_fresh_stream(speech: np.ndarray) -> None:
    streaming = StreamingLogMel()
    first = _stream(streaming, speech[:30_000], 4_000)
    with pytest.raises(RuntimeError, match="reset"):
        streaming.push(speech[:10])
    assert streaming.flush() == []
    streaming.reset()
    assert streaming.num_chunks_emitted == 0 and streaming.running_max == -math.inf
    assert streaming.num_buffered_samples == 0
    assert torch.equal(_stream(streaming, speech[:30_000], 777), first)
    with pytest.raises(ValueError, match="mono"):
        StreamingLogMel().push(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        StreamingLogMel().push(np.array([0.0, np.nan], np.float32))


@pytest.mark.parametrize("piece_samples", [3000, "whole"])
def test_streaming_raw_mel_stays_bit_identical_across_digital_silence(speech: np.ndarray,
                                                                      piece_samples: int | str) -> None:
    """Chunks of pure zeros (flushed silence) take a precomputed value; it must equal the computed one."""
    signal = np.concatenate([speech[:20_000], np.zeros(64_123, np.float32), speech[20_000:40_000]])
    streamed = _stream(LogMelChunker(), signal, piece_samples)
    assert torch.equal(streamed, log_mel_raw(_pad_to_chunk(signal)))


def test_flushed_silence_does_not_cost_one_stft_per_chunk(speech: np.ndarray, monkeypatch) -> None:
    """input.flush appends up to 10 s of zeros (25 chunks) on the event loop: chunks whose whole
    window is zeros reuse one precomputed block instead of an STFT each."""
    import audio_interaction_server.audio.mel

    calls = []
    computed = audio_interaction_server.audio.mel._log_mel_block
    monkeypatch.setattr(audio_interaction_server.audio.mel, "_log_mel_block",
                        lambda block: calls.append(1) or computed(block))
    front_end = StreamingLogMel()
    before = front_end.push(speech[:8000])  # 0.5 s of speech: chunk 0 is out
    chunks = front_end.push(np.zeros(160_000, np.float32)) + front_end.flush()
    assert len(before) == 1 and len(chunks) == 26
    assert len(calls) <= 3, f"{len(calls)} STFT blocks for 10 s of silence"


def test_s16_decoding_is_whispers_scaling_for_every_sample_value():
    """``decode_checked_pcm`` scales s16 in one pass (a product by 2**-15): bit for bit ``astype(float32) / 32768``,
    whisper.load_audio's scaling, for all 65,536 values; stereo is their mean in float32."""
    values = np.arange(-32768, 32768, dtype="<i2")
    expected = values.astype(np.float32) / 32768.0
    decoded = decode_checked_pcm(values.tobytes(), "pcm_s16le", 1)
    assert decoded.dtype == np.float32 and decoded.flags.c_contiguous
    assert np.array_equal(decoded.view(np.int32), expected.view(np.int32))
    stereo = decode_checked_pcm(values.tobytes(), "pcm_s16le", 2)
    assert np.array_equal(stereo, expected.reshape(-1, 2).mean(axis=1, dtype=np.float32))


@pytest.mark.parametrize("num_channels", [1, 2, 3, 4, 5, 6, 7, 8, 16, 600])
@pytest.mark.parametrize("sample_format", ["pcm_s16le", "pcm_f32le"])
def test_decoding_averages_channels_as_numpys_mean_bit_for_bit(sample_format: str, num_channels: int) -> None:
    """Channels are averaged as ``mean(axis=1, dtype=float32)`` of the scaled samples, whatever way the decoder
    takes (s16 sums the integers when that is exact: up to 512 channels). Extremes, zeros of both signs and
    subnormals included; ``values * scale`` (what a stream writes into its chunker) is the same bits."""
    rng = np.random.default_rng(num_channels)
    num_frames = 20_000
    if sample_format == "pcm_s16le":
        values = rng.integers(-32768, 32768, (num_frames, num_channels)).astype("<i2")
        values[:3] = [[-32768], [32767], [0]]  # the extremes in every channel, and silence
        expected = values.astype(np.float32) / 32768.0
    else:
        values = (rng.standard_normal((num_frames, num_channels)) * np.logspace(-3, 1, num_channels)).astype("<f4")
        values[:4] = [[-0.0], [1e-40], [-100.0], [100.0]]  # negative zero, a subnormal, the bounds
        values[4:, 0][rng.random(num_frames - 4) < 0.05] = -0.0
        expected = values.astype(np.float32)
    expected = expected.mean(axis=1, dtype=np.float32) if num_channels > 1 else expected[:, 0]
    decoded = decode_pcm(values.tobytes(), sample_format, num_channels)  # type: ignore[arg-type]
    assert decoded.dtype == np.float32 and decoded.flags.c_contiguous
    assert np.array_equal(decoded.view(np.int32), expected.view(np.int32))
    mono_values, scale = checked_pcm_values(values.tobytes(), sample_format, num_channels)  # type: ignore[arg-type]
    written = np.empty(num_frames, dtype=np.float32)
    written[:] = mono_values
    if scale is not None:
        written *= scale
    assert np.array_equal(written.view(np.int32), expected.view(np.int32))
