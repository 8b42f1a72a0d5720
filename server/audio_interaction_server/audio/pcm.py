"""PCM as clients send it: checked on arrival, decoded to float32 mono at its own rate.

Sans-I/O and numpy only (a front process imports this and never torch). Pure functions, re-entrant.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import numpy as np

# Largest |sample| accepted in pcm_f32le frames: 100x full scale (+40 dBFS). Float audio a little over
# 1.0 is normal (inter-sample overs, gain staging); nothing a microphone chain produces comes near 100,
# while values like 1e20 overflow the float32 power spectrum (|X|^2) and would end the session with a
# numerical error in the model. Such frames are refused as invalid audio instead.
MAX_ABS_F32_SAMPLE: Final = 100.0

SampleFormat = Literal["pcm_s16le", "pcm_f32le"]
_SAMPLE_DTYPES: Final[dict[str, np.dtype]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
_S16_SCALE: Final = np.float32(2.0**-15)  # 1 / 32768
_MAX_EXACT_S16_CHANNELS: Final = 2**24 // 32768  # float32 adds up this many scaled s16 samples exactly


class AudioFormatError(ValueError):
    """Audio bytes or files that cannot be turned into samples."""


def bytes_per_sample_frame(sample_format: SampleFormat, num_channels: int) -> int:
    """Bytes of one sample frame (one sample per channel) of a known format."""
    return _SAMPLE_DTYPES[sample_format].itemsize * num_channels


def check_pcm(data: bytes, sample_format: SampleFormat, num_channels: int) -> int:
    """The checks of ``decode_pcm`` without the decoding, with the same errors: lets a stream refuse a bad frame
    when it arrives and decode the good ones later, many at once. Returns the number of sample frames."""
    if sample_format not in _SAMPLE_DTYPES:
        raise AudioFormatError(f"unknown sample format {sample_format!r}; expected {list(_SAMPLE_DTYPES)}")
    if num_channels < 1:
        raise AudioFormatError(f"num_channels must be >= 1, got {num_channels}")
    dtype = _SAMPLE_DTYPES[sample_format]
    frame_bytes = bytes_per_sample_frame(sample_format, num_channels)
    if len(data) % frame_bytes:
        raise AudioFormatError(
            f"{len(data)} bytes is not a whole number of {sample_format} frames "
            f"({dtype.itemsize} bytes x {num_channels} channels = {frame_bytes} bytes per frame)"
        )
    if sample_format == "pcm_f32le" and data:
        samples = np.frombuffer(data, dtype=dtype)
        # max and min propagate NaN and reach +-Inf, so two reductions (no temporaries) cover every check.
        largest, smallest = float(samples.max()), float(samples.min())
        if not (math.isfinite(largest) and math.isfinite(smallest)):
            # NaN/Inf would poison the STFT and the running max of the whole stream.
            raise AudioFormatError("pcm_f32le data contains NaN or Inf samples")
        magnitude = max(largest, -smallest)
        if magnitude > MAX_ABS_F32_SAMPLE:
            raise AudioFormatError(
                f"pcm_f32le sample of magnitude {magnitude:.3g} is more than "
                f"{MAX_ABS_F32_SAMPLE:g}x full scale (1.0); no microphone produces that")
    return len(data) // frame_bytes


def decode_pcm(data: bytes, sample_format: SampleFormat, num_channels: int) -> np.ndarray:
    """Interleaved little-endian PCM → float32 mono (channels averaged); raises ``AudioFormatError`` (``check_pcm``)."""
    check_pcm(data, sample_format, num_channels)
    return decode_checked_pcm(data, sample_format, num_channels)


def decode_checked_pcm(data: bytes, sample_format: SampleFormat, num_channels: int) -> np.ndarray:
    """``decode_pcm`` of bytes ``check_pcm`` has passed already (a stream's kept frames): the checks not again."""
    values, scale = checked_pcm_values(data, sample_format, num_channels)
    if scale is not None:
        values = np.multiply(values, scale, dtype=np.float32)
    return np.ascontiguousarray(values, dtype=np.float32)


def checked_pcm_values(
    data: bytes, sample_format: SampleFormat, num_channels: int
) -> tuple[np.ndarray, np.float32 | None]:
    """``decode_checked_pcm`` but for its last pass: mono ``values`` (1-D, one per sample frame) and the ``scale``
    that makes them the decoded float32 samples (``values * scale`` in float32; ``None``: they are the samples).

    Lets a caller with a buffer of its own do that pass straight into it (``blocks.BlockCutter.push``)
    instead of through an intermediate array. The samples are bit for bit numpy's: s16 is whisper.load_audio's
    ``x / 32768``, channels are averaged as ``mean(axis=1, dtype=float32)`` (tests/audio/test_audio.py checks
    every s16 value, and each channel count against numpy's mean).
    """
    values = np.frombuffer(data, dtype=_SAMPLE_DTYPES[sample_format])
    if sample_format == "pcm_s16le":
        # int16 -> float32 is exact and so is a product by a power of two, so x * 2**-15 is x / 32768's bits.
        if num_channels == 1:
            return values, _S16_SCALE
        if num_channels <= _MAX_EXACT_S16_CHANNELS:
            return _s16_channel_mean(values, num_channels)
        values = np.multiply(values, _S16_SCALE, dtype=np.float32)
    if num_channels > 1:
        values = values.reshape(-1, num_channels).mean(axis=1, dtype=np.float32)
    return values, None


def _s16_channel_mean(values: np.ndarray, num_channels: int) -> tuple[np.ndarray, np.float32 | None]:
    """numpy's ``mean(axis=1, dtype=float32)`` of the scaled channels, as ``checked_pcm_values`` returns it, without
    numpy's reduction over rows of a few values (about 15 ns a sample frame, 20x the sums below).

    Each scaled sample is an integer times 2**-15, so any float32 sum of up to 512 of them is exact (at most 2**24
    units): numpy's sum, in whatever order it adds, equals the sum of the integers scaled afterwards.
    """
    channels = values.reshape(-1, num_channels).astype(np.float32)  # (frames, channels), exact
    channel_sum = channels[:, 0] + channels[:, 1]
    for channel in range(2, num_channels):
        channel_sum += channels[:, channel]
    if num_channels & (num_channels - 1) == 0:  # dividing by a power of two is exact too: one product
        return channel_sum, np.float32(_S16_SCALE / num_channels)
    channel_sum *= _S16_SCALE
    # The very division numpy's mean does, by its count (an intp: computed in float64, rounded to float32).
    return np.true_divide(channel_sum, np.intp(num_channels), out=channel_sum, casting="unsafe"), None


def check_mono_samples(samples: np.ndarray) -> np.ndarray:
    """Decoded samples as float32, or ``ValueError`` if they are not 1-D or hold NaN or Inf (one NaN would poison
    every later running maximum of the stream's features)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples (1-D), got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise ValueError("samples contain NaN or Inf")
    return samples

