"""Audio files (wav, flac, mp3) read whole, for offline runs, tests and benchmarks: float32 mono at 16 kHz."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import soundfile
import soxr

from audio_interaction_server.audio.pcm import AudioFormatError
from audio_interaction_server.spec import SAMPLE_RATE_HZ


def headerless_pcm_error(path: Path) -> str:
    """What is wrong with a file soundfile takes for headerless PCM (by its name, ``.raw``): it raises a TypeError
    for the sample rate it cannot read, before it looks at the file."""
    wav = path.with_suffix(".wav")
    return (f"{path}: raw PCM without a header: its sample rate, channels and sample format are unknown; add a WAV "
            f"header first, e.g. sox -t raw -r 16000 -e signed -b 16 -c 1 {shlex.quote(str(path))} "
            f"{shlex.quote(str(wav))} (with the rate, sample format and channels it was recorded with)")


def load_audio_file(path: str | Path) -> np.ndarray:
    """Decode wav/flac/mp3 (libsndfile >= 1.1) → float32 mono at 16 kHz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        samples, rate_hz = soundfile.read(path, dtype="float32", always_2d=True)  # (T, C)
    except soundfile.LibsndfileError as error:
        raise AudioFormatError(f"cannot decode {path}: {error}") from error
    except TypeError:  # soundfile's "samplerate must be specified", for a headerless format
        raise AudioFormatError(headerless_pcm_error(path)) from None
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

