"""Audio front-end: PCM decoding, resampling to 16 kHz and whisper-style log-mel features.

Sans-I/O except ``load_audio_file``/``load_audio_sequence`` (offline file mode): arrays in,
arrays/tensors out. The streaming log-mel reproduces whole-file STFT bit-for-bit with 40
samples of look-ahead; only the clamp differs, because it uses the running maximum of the
stream (model-notes §4.3, decision 5).

torch is imported inside the functions that compute mels, not with the module: a front process (api/fronts.py,
the engine in its own process) decodes, resamples and cuts audio into blocks with numpy here, and never computes a
mel; importing torch would cost each front a second and some 200 MB.

Threading contract: nothing here is thread-safe. ``StreamingResampler``, ``LogMelChunker``
and ``StreamingLogMel`` hold per-stream state; use one instance per stream, owned by one
thread (or one asyncio task) at a time. The module-level functions are pure and re-entrant.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import soundfile
import soxr

from audio_interaction_server.spec import CHUNK_SAMPLES, MEL_FRAMES_PER_CHUNK, SAMPLE_RATE_HZ

if TYPE_CHECKING:  # torch is imported where a mel is computed (below: why)
    import torch

N_FFT: Final = 400
HOP_SAMPLES: Final = 160
NUM_MEL_BINS: Final = 128
# torch.stft(center=True) pads n_fft // 2 on each side: frame i is centred on sample 160 * i.
_HALF_WINDOW_SAMPLES: Final = N_FFT // 2
# Frames 40k..40k+39 span original samples [6400k - 200, 6400k + 6440): 40 samples past
# the chunk end are needed by its last frame, everything else is in the past.
LOOKAHEAD_SAMPLES: Final = HOP_SAMPLES * (MEL_FRAMES_PER_CHUNK - 1) + _HALF_WINDOW_SAMPLES - CHUNK_SAMPLES
_BLOCK_INPUT_SAMPLES: Final = HOP_SAMPLES * (MEL_FRAMES_PER_CHUNK - 1) + N_FFT  # 6640
MIN_INPUT_RATE_HZ: Final = 1_000
MAX_INPUT_RATE_HZ: Final = 384_000
_LOG_FLOOR: Final = 1e-10
_DYNAMIC_RANGE: Final = 8.0  # log10 units kept below the maximum (whisper's clamp)
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

    Lets a caller with a buffer of its own do that pass straight into it (``LogMelChunker.push_block_array``)
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


def load_audio_file(path: str | Path) -> np.ndarray:
    """Decode wav/flac/mp3 (libsndfile >= 1.1) → float32 mono at 16 kHz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        samples, rate_hz = soundfile.read(path, dtype="float32", always_2d=True)  # (T, C)
    except soundfile.LibsndfileError as error:
        raise AudioFormatError(f"cannot decode {path}: {error}") from error
    mono = samples.mean(axis=1, dtype=np.float32)  # down-mix first: resampling is linear, 1 channel is cheaper
    if rate_hz != SAMPLE_RATE_HZ:
        mono = soxr.resample(mono, rate_hz, SAMPLE_RATE_HZ, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio_sequence(folder: str | Path) -> list[Path]:
    """The files of ``folder/sequence.json`` (a JSON list of names, repeats allowed), in order."""
    folder = Path(folder)
    names = json.loads((folder / "sequence.json").read_text(encoding="utf-8"))
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{folder / 'sequence.json'} must be a JSON list of file names")
    if not names:
        raise ValueError(f"{folder / 'sequence.json'} lists no files: name the audio files to play, in order")
    paths = [folder / name for name in names]
    missing = sorted({str(p) for p in paths if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"{folder / 'sequence.json'} names missing files: {missing}")
    return paths


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
    import torch

    filters = mel_filters_float64()
    return torch.from_numpy(np.ascontiguousarray(filters.T, dtype=np.float32))


@functools.cache
def _hann_window() -> torch.Tensor:
    import torch

    return torch.hann_window(N_FFT)


def _log_mel_block(padded_samples: torch.Tensor) -> torch.Tensor:
    """Unclamped log10 mel of one 40-frame block: 6640 centre-padded samples → (128, 40).

    The one place both paths compute features, always on exactly 40 frames: FFT batch size and
    matmul shape then never vary (a 1-frame block takes MKL's gemv path and rounds differently,
    observed), and the clone gives both paths the same allocator-aligned storage, so whole-file
    and streaming frames are bit-identical by construction rather than by luck of the kernels.
    """
    import torch

    if padded_samples.shape != (_BLOCK_INPUT_SAMPLES,):
        raise ValueError(f"expected {_BLOCK_INPUT_SAMPLES} samples, got {tuple(padded_samples.shape)}")
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
    import torch

    if padded_blocks.dim() != 2 or padded_blocks.shape[1] != _BLOCK_INPUT_SAMPLES:
        raise ValueError(f"expected blocks (N, {_BLOCK_INPUT_SAMPLES}), got {tuple(padded_blocks.shape)}")
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
    import torch

    return _log_mel_block(torch.zeros(_BLOCK_INPUT_SAMPLES))


def normalize_log_mel(log_mel: torch.Tensor, max_value: float) -> torch.Tensor:
    """Whisper's clamp and scaling, given the maximum to clamp against (whole-file or running)."""
    import torch

    return (torch.clamp(log_mel, min=max_value - _DYNAMIC_RANGE) + 4.0) / 4.0


def normalize_next_chunk(raw_chunk: torch.Tensor, running_max: float) -> tuple[torch.Tensor, float]:
    """The streaming clamp of one chunk (128, 40): against the maximum of every chunk so far, itself included.
    Returns the normalized chunk and the new maximum."""
    running_max = max(running_max, float(raw_chunk.max()))
    return normalize_log_mel(raw_chunk, running_max), running_max


def normalize_stream(raw_chunks: torch.Tensor, running_max: float) -> tuple[torch.Tensor, float]:
    """``normalize_next_chunk`` over consecutive chunks (N, 128, 40) of one stream, as ``StreamingLogMel`` does.
    Returns the normalized chunks and the new maximum."""
    import torch

    normalized = []
    for raw_chunk in raw_chunks:
        chunk, running_max = normalize_next_chunk(raw_chunk, running_max)
        normalized.append(chunk)
    if not normalized:
        return raw_chunks.new_empty(0, NUM_MEL_BINS, MEL_FRAMES_PER_CHUNK), running_max
    return torch.stack(normalized), running_max


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


def log_mel_raw(samples_16k: np.ndarray) -> torch.Tensor:
    """Unclamped log10 mel of a whole signal, (128, N // 160), exactly whisper's framing.

    Equal to torch.stft(center=True, pad_mode="reflect") with the last frame dropped, computed
    in 40-frame blocks (see ``_log_mel_block``); the reflect padding is F.pad's, as in torch.stft.
    """
    import torch
    import torch.nn.functional as F

    samples = torch.from_numpy(np.ascontiguousarray(samples_16k, dtype=np.float32))
    num_frames = samples.shape[0] // HOP_SAMPLES
    if num_frames == 0:
        return torch.zeros(NUM_MEL_BINS, 0)
    if samples.shape[0] <= _HALF_WINDOW_SAMPLES:
        raise ValueError(f"need more than {_HALF_WINDOW_SAMPLES} samples for reflect padding")
    padded = F.pad(samples[None, None], (_HALF_WINDOW_SAMPLES, _HALF_WINDOW_SAMPLES), mode="reflect")[0, 0]
    num_blocks = math.ceil(num_frames / MEL_FRAMES_PER_CHUNK)
    # Zeros past the end complete the last block; they only feed frames >= num_frames, cut below.
    num_zeros = CHUNK_SAMPLES * (num_blocks - 1) + _BLOCK_INPUT_SAMPLES - padded.shape[0]
    padded = F.pad(padded, (0, max(0, num_zeros)))
    blocks = [
        _log_mel_block(padded[CHUNK_SAMPLES * block : CHUNK_SAMPLES * block + _BLOCK_INPUT_SAMPLES])
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


# What a push that completes no chunk returns: shared, which is safe as it has no elements to write.
_NO_BLOCKS: Final = np.empty((0, _BLOCK_INPUT_SAMPLES), dtype=np.float32)


class LogMelChunker:
    """Streaming unclamped log-mel: 16 kHz samples in, (128, 40) chunks out, each bit-identical
    to the same frames of ``log_mel_raw`` on the whole (zero-padded) stream.

    Keeps 200 samples of left context plus the not-yet-emitted samples in a fixed buffer, so
    memory and cost per chunk do not grow with the stream.
    """

    # After emitting, fewer than 200 + 6440 samples remain; room for one more chunk on top
    # means every copy into the buffer advances by at least 6400 samples.
    _CAPACITY_SAMPLES: Final = _BLOCK_INPUT_SAMPLES + CHUNK_SAMPLES

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
        """Retained history: 200 samples of left context + the not-yet-emitted samples (< 6640)."""
        return self._num_buffered

    @property
    def num_samples_pushed(self) -> int:
        return self._buffer_start + self._num_buffered

    def push(self, samples_16k: np.ndarray) -> list[torch.Tensor]:
        return [self._log_mel(block) for block in self.push_blocks(samples_16k)]

    def flush(self, pad_to_chunk: bool = True) -> list[torch.Tensor]:
        """End the stream. ``pad_to_chunk`` zero-pads a partial last chunk (as the reference pads
        files); otherwise it is dropped. The final chunk uses reflect padding at the stream end,
        like whole-file STFT on the padded signal."""
        return [self._log_mel(block) for block in self.flush_blocks(pad_to_chunk)]

    @staticmethod
    def _log_mel(block: torch.Tensor) -> torch.Tensor:
        if not block.any():  # digital silence (a flush): its mel is known
            return _silent_block_log_mel().clone()
        return _log_mel_block(block)  # (128, 40)

    def push_blocks(self, samples_16k: np.ndarray) -> list[torch.Tensor]:
        """As ``push``, but each completed chunk comes as its padded block (6640,) for ``log_mel_blocks``."""
        import torch

        return list(torch.from_numpy(self.push_block_array(check_mono_samples(samples_16k))))

    def flush_blocks(self, pad_to_chunk: bool = True) -> list[torch.Tensor]:
        """As ``flush``, but each chunk comes as its padded block (6640,) for ``log_mel_blocks``."""
        import torch

        return list(torch.from_numpy(self.flush_block_array(pad_to_chunk)))

    def push_block_array(self, values: np.ndarray, scale: np.float32 | None = None) -> np.ndarray:
        """As ``push_blocks``, the blocks of the completed chunks as one (N, 6640) float32 array, for samples given
        as ``checked_pcm_values`` gives them: ``values * scale`` in float32 is computed straight into the buffer.

        Not checked (a stream's hot path): ``values`` must be 1-D and finite, as samples decoded from frames
        ``check_pcm`` passed are and as resampling keeps them; other samples go through ``push_blocks``.
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

    def flush_block_array(self, pad_to_chunk: bool = True) -> np.ndarray:
        """As ``flush_blocks``, the blocks as one (N, 6640) float32 array."""
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
        blocks = np.empty((num_blocks, _BLOCK_INPUT_SAMPLES), dtype=np.float32)
        for row in range(num_blocks):  # rows by index: iterating over a 2-D array costs as much as the copies
            # Chunk k's block is samples [6400k - 200, 6400k + 6440) of the stream, reflected where they fall outside
            # [0, stream_end): only the first chunk's start and a flush's last chunk's end.
            first = CHUNK_SAMPLES * (first_chunk_index + row) - _HALF_WINDOW_SAMPLES
            last = first + _BLOCK_INPUT_SAMPLES
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
        block[left_pad : _BLOCK_INPUT_SAMPLES - right_pad] = window
        if left_pad:  # window[left_pad], ..., window[1]: the edge sample is not repeated
            block[:left_pad] = window[left_pad:0:-1]
        if right_pad:  # window[-2], ..., window[-1 - right_pad]
            block[_BLOCK_INPUT_SAMPLES - right_pad :] = window[-2 : -2 - right_pad : -1]

    def _drop_consumed(self) -> None:
        keep_from = max(0, CHUNK_SAMPLES * self.num_chunks_emitted - _HALF_WINDOW_SAMPLES)
        num_dropped = min(keep_from - self._buffer_start, self._num_buffered)
        if num_dropped <= 0:
            return
        remaining = self._num_buffered - num_dropped
        self._buffer[:remaining] = self._buffer[num_dropped : self._num_buffered]  # numpy handles overlap
        self._buffer_start += num_dropped
        self._num_buffered = remaining


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
