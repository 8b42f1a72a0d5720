"""Stream audio files to an Audio-Interaction server and print its replies as they arrive.

    python client_examples/stream_file.py ws://127.0.0.1:8000 ../shared/audio/01_count_bark

Each file is sent as s16le PCM at its own sample rate and channel count (the server
resamples and down-mixes), in real time by default, then ``input.flush`` so the model can
answer the end, then ``session.close``. A folder stands for the files its
``sequence.json`` lists. A busy server (loading, full or draining) is tried again with a
growing delay for up to ``--busy-retry-s`` seconds (90 by default), saying so on stderr.
Exit status: 0 on a normal session, 1 on a fatal error, an abnormal close or a server that
stayed busy, 2 on bad arguments or unreadable files, 141 when stdout's reader left early (``| head``), 130 on
Ctrl-C and 143 on SIGTERM (both after closing the session and printing the summary of what was heard).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import math
import re
import shlex
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from ais_client import (EXIT_USAGE, ClientError, InputError, ReplyConsole, StreamSession, add_busy_retry_argument,
                        busy_retry_problem, default_api_key, endpoint_url, exit_status_help, run_main, run_stream)


# What session.configure's audio format takes (docs/protocol.md): a file outside it is refused before connecting.
MIN_RATE_HZ, MAX_RATE_HZ, MAX_CHANNELS = 1_000, 384_000, 8


@dataclass(frozen=True)
class AudioFile:
    path: Path
    sample_rate_hz: int
    num_channels: int


def expand_inputs(names: list[str]) -> list[AudioFile]:
    """Files as given; a folder becomes the files its ``sequence.json`` lists, in order (repeats allowed)."""
    paths: list[tuple[Path, str]] = []  # each file, and where it was named (for the error message)
    for name in names:
        path = Path(name)
        if path.is_dir():
            paths += [(entry, f" (listed in {path / 'sequence.json'})") for entry in _sequence(path)]
        elif path.exists():
            paths.append((path, ""))
        elif name == "-":
            raise ClientError("-: audio from stdin is not read here (its rate and channels come from a file's "
                              "header before anything is sent): save it to a file and name that")
        else:
            raise ClientError(f"{path}: no such file or folder")
    files = []
    for path, named_in in paths:
        if path.is_dir():
            raise ClientError(f"{path}{named_in}: a folder, not an audio file")
        if path.exists() and not path.is_file():  # /dev/stdin fed by a pipe, a FIFO, a device
            raise ClientError(f"{path}{named_in}: a pipe or device, not a file (its rate and channels come from a "
                              "file's header before anything is sent): save the audio to a file and name that")
        if not path.is_file():  # libsndfile would only say "System error."
            raise ClientError(f"{path}{named_in}: no such file")
        if path.suffix.lower() == ".raw":
            # soundfile reads this extension as headerless PCM and wants the rate and channels from its caller (a
            # TypeError otherwise): a file does not say them, so the user must, once, in a header.
            raise ClientError(raw_pcm_advice(path, named_in))
        try:
            info = soundfile.info(str(path))
        except RuntimeError as error:  # undecodable (soundfile.LibsndfileError)
            raise ClientError(f"cannot decode {path}{named_in}: {str(error).strip()} (it reads wav, flac, mp3, "
                              "ogg/opus, aiff and other formats libsndfile knows; convert others, m4a/AAC for one, "
                              "to wav or flac)") from None
        except UnicodeEncodeError:  # soundfile encodes the name before libsndfile sees it (a name from Latin-1)
            encoding = codecs.lookup(sys.getfilesystemencoding()).name.upper()
            raise ClientError(f"{path}{named_in}: its name is not {encoding} text, and libsndfile opens a file by a "
                              f"{encoding} name: rename it") from None
        except (TypeError, ValueError) as error:  # soundfile's own checks, before libsndfile: never a traceback
            raise ClientError(f"cannot open {path}{named_in}: {error}") from None
        shortfall = wav_shortfall(info.extra_info)
        if shortfall is not None:
            declared, held = shortfall
            raise ClientError(f"{path}{named_in}: cut short: its header declares {declared:,} bytes of audio and the "
                              f"file holds {held:,}; an interrupted copy?")
        if not (MIN_RATE_HZ <= info.samplerate <= MAX_RATE_HZ and 1 <= info.channels <= MAX_CHANNELS):
            channels = "1 channel" if info.channels == 1 else f"{info.channels} channels"
            raise ClientError(f"{path}{named_in}: {info.samplerate} Hz, {channels}; the server takes "
                              f"{MIN_RATE_HZ} to {MAX_RATE_HZ} Hz, 1 to {MAX_CHANNELS} channels (resample or down-mix "
                              "it first)")
        # Not info.frames: for an mp3 that is an estimate (wrong by seconds when an ID3 tag is large).
        files.append(AudioFile(path, info.samplerate, info.channels))
    return files


def raw_pcm_advice(path: Path, named_in: str = "") -> str:
    """Why a ``.raw`` file cannot be sent, and the commands that give it a header (16 kHz mono s16le as the
    example: the usual raw recording; the user puts in what theirs is)."""
    raw, wav = shlex.quote(str(path)), shlex.quote(str(path.with_suffix(".wav")))
    return (f"{path}{named_in}: raw PCM has no header, so its rate, channels and sample format are unknown: add a "
            f"WAV header that says the ones it was recorded with, e.g. sox -t raw -r 16000 -e signed -b 16 -c 1 {raw} "
            f"{wav} (or ffmpeg -f s16le -ar 16000 -ac 1 -i {raw} {wav})")


# libsndfile reads a WAV whose body was cut as the samples that are there, without a word, but its header log
# (soundfile's ``extra_info``) says ``data : <declared> (should be <held>)``. A writer that streamed the file, not
# knowing its length, leaves 0, 0xFFFFFFFF or a size near 2 GiB there (arecord to a pipe: 0x7FFFFF00): no shortfall.
_CUT_DATA_CHUNK = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_LEAST_UNKNOWN_WAV_SIZE = 0x7FFF0000


def wav_shortfall(header_log: str) -> tuple[int, int] | None:
    """(bytes of audio the header declares, bytes the file holds) of a WAV cut short, from libsndfile's log."""
    found = _CUT_DATA_CHUNK.search(header_log)
    if found is None:
        return None
    declared, held = int(found[1]), int(found[2])
    unknown = declared == 0 or declared >= _LEAST_UNKNOWN_WAV_SIZE
    return None if unknown or held >= declared else (declared, held)


def _sequence(folder: Path) -> list[Path]:
    listing = folder / "sequence.json"
    if not listing.is_file():
        raise ClientError(f"{folder} is a folder without a sequence.json (a JSON list of its audio files in playing "
                          "order): name the files themselves, or add one")
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ClientError(f"{listing} is not a JSON list of file names: {error}") from None
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise ClientError(f"{listing} is not a JSON list of file names")
    if not entries:
        raise ClientError(f"{listing} lists no files: name the audio files to play, in order")
    return [folder / entry for entry in entries]


# Sample formats libsndfile stores as floats: read as int16 it converts them without scaling to full scale.
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


def read_pcm(path: Path) -> np.ndarray:
    """(T, C) little-endian int16: the wire format, interleaved once ``tobytes`` flattens it. Only the header was
    read before connecting: a body damaged after it is found here, and said in one line."""
    try:
        with soundfile.SoundFile(str(path)) as audio:
            if audio.subtype in FLOAT_SUBTYPES:
                # libsndfile reads float samples as int16 unscaled (0.8 -> 1): a float WAV would be sent as
                # near-silence. Scale full scale (1.0) to 32768, as libsndfile reads 16-bit PCM into float.
                floats = audio.read(dtype="float32", always_2d=True)
                samples = np.clip(np.round(floats * 32768.0), -32768, 32767).astype(np.int16)
            else:
                samples = audio.read(dtype="int16", always_2d=True)
    except RuntimeError as error:  # soundfile.LibsndfileError
        if not path.is_file():  # removed or replaced while the files before it streamed
            raise InputError(f"{path}: no longer there (it was when streaming began)") from None
        raise InputError(f"cannot decode {path}: its audio is damaged after its header ({str(error).strip()})") \
            from None
    return samples.astype("<i2", copy=False)


def wait_for_enter(prompt: str) -> asyncio.Future:
    """A future that completes on a line from stdin.

    A daemon thread rather than the loop's executor: if the session ends first, a thread
    blocked on stdin must not keep the process alive.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def read() -> None:
        sys.stdin.readline()
        try:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
        except RuntimeError:  # the loop closed first (a Ctrl-C that also ended a pipe into stdin): nobody waits
            pass

    print(prompt, file=sys.stderr, flush=True)
    threading.Thread(target=read, name="stdin", daemon=True).start()
    return done


CHUNK_S = 0.4  # the model decides once per 0.4 s of the stream (session.created's limits.chunk_s)


def chunk_at(audio_s: float) -> int:
    """The chunk that ``audio_s`` seconds into the stream fall in. ``audio_s`` is a sum of frame lengths, which
    lands a hair below a chunk's boundary (eight 0.1 s frames: 0.7999999999999999 s): a microsecond's tolerance
    keeps it on the boundary, as the server's count of samples is."""
    return int(audio_s / CHUNK_S + 1e-6)

# The frames a second a server takes from one connection by default (transport.data_frames_per_s); past them it cuts
# the connection (1008, "too many WebSocket frames"). At --speed 0 the client sends at most half as many.
MAX_FRAMES_PER_S = 1000


class FileSender:
    """Sends the files frame by frame, re-declaring the format whenever it changes."""

    def __init__(self, files: list[AudioFile], speed: float, frame_ms: float, wait: bool,
                 options: dict | None = None) -> None:
        self.files, self.speed, self.frame_s, self.wait = files, speed, frame_ms / 1000, wait
        self.options = options or {}  # session.configure's model options, sent with the first format
        self._formats_noted: set[tuple[int, int]] = set()  # (rate, channels) whose shorter frames were said

    async def __call__(self, session: StreamSession) -> None:
        if self.wait:
            await self._wait_keeping_alive(session)
        loop = asyncio.get_running_loop()
        start_s, audio_s, current_format, num_frames = loop.time(), 0.0, None, 0
        for index, audio_file in enumerate(self.files):
            if session.console.as_json:
                # Where each file begins in the session's stream, in the decisions' own clock (audio_time_s, 16 kHz
                # chunks of 0.4 s), so that a decision can be traced to the file it heard: the JSON on stdout is the
                # server's alone, and the server does not know the files.
                session.console.note(f"file {index}: {audio_file.path} begins at {audio_s:.3f} s of the stream "
                                     f"(chunk {chunk_at(audio_s)})")
            audio_format = {"sample_format": "pcm_s16le", "sample_rate_hz": audio_file.sample_rate_hz,
                            "num_channels": audio_file.num_channels}
            if audio_format != current_format:
                # A format change continues the same stream (no flush needed); the answer is awaited
                # so that no frame is read in the old format. The model options go with the first one: the server
                # takes them only before the first audio.
                await session.configure(audio=audio_format, **(self.options if current_format is None else {}))
                current_format = audio_format
            samples = await asyncio.to_thread(read_pcm, audio_file.path)
            if not len(samples):  # a failed recording, most likely: the replies that follow are to silence
                print(f"note: {audio_file.path} holds no audio", file=sys.stderr, flush=True)
            frame_samples = self._frame_samples(audio_file, session)
            for begin in range(0, len(samples), frame_samples):
                frame = samples[begin:begin + frame_samples]
                if self.speed > 0:  # real-time pacing against one clock, so waits never accumulate drift
                    await asyncio.sleep(max(0.0, start_s + audio_s / self.speed - loop.time()))
                else:  # as fast as the server takes it, but never past its frame limit (small frames, a fast model)
                    await asyncio.sleep(max(0.0, start_s + num_frames / (MAX_FRAMES_PER_S / 2) - loop.time()))
                num_frames += 1
                duration_s = len(frame) / audio_file.sample_rate_hz
                await session.send_pcm(frame.tobytes(), duration_s)
                audio_s += duration_s

    def _frame_samples(self, audio_file: AudioFile, session: StreamSession) -> int:
        """Samples per frame: --frame-ms of the file, or as many as the server takes in one frame (said once per
        format, on a line of its own)."""
        max_frame_bytes = session.created["limits"]["max_frame_bytes"]
        frame_samples = max(1, round(audio_file.sample_rate_hz * self.frame_s))
        sample_bytes = 2 * audio_file.num_channels
        if frame_samples * sample_bytes <= max_frame_bytes:
            return frame_samples
        fitting = max_frame_bytes // sample_bytes
        audio_format = (audio_file.sample_rate_hz, audio_file.num_channels)
        if audio_format not in self._formats_noted:
            self._formats_noted.add(audio_format)
            session.console.note(f"note: --frame-ms {self.frame_s * 1000:g} makes frames of "
                                 f"{frame_samples * sample_bytes:,} bytes at {audio_file.sample_rate_hz} Hz, "
                                 f"{audio_file.num_channels} ch (from {audio_file.path}), over the server's "
                                 f"max_frame_bytes ({max_frame_bytes:,}): sending frames of "
                                 f"{1000 * fitting / audio_file.sample_rate_hz:.0f} ms")
        return fitting

    @staticmethod
    async def _wait_keeping_alive(session: StreamSession) -> None:
        """Wait for Enter; meanwhile keep the session from timing out idle (a subscriber may take a while)."""
        entered = wait_for_enter("press Enter to start streaming")
        interval_s = session.created["limits"]["idle_timeout_s"] / 3
        while not entered.done():
            await asyncio.wait([entered], timeout=interval_s)
            if not entered.done():
                await session.keep_alive()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Stream audio files to an Audio-Interaction server.",
        epilog=exit_status_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="server URL, e.g. ws://127.0.0.1:8000")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER",
                        help="audio files (anything libsndfile reads: wav, flac, mp3, ogg/opus, aiff, ...), "
                             "or folders with a sequence.json")
    parser.add_argument("--api-key", default=default_api_key(), help="the server's API key (default: $AIS_API_KEY)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="1 = real time, 2 = twice as fast, 0 = as fast as the server takes it (at most 500 "
                        "frames a second)")
    parser.add_argument("--frame-ms", type=float, default=20.0, help="audio per WebSocket frame (default 20)")
    parser.add_argument("--decisions", action="store_true", help="also show the per-chunk listen/speak decisions")
    parser.add_argument("--json", action="store_true", help="print the server's events as raw JSON lines")
    parser.add_argument("--wait", action="store_true",
                        help="wait for Enter before streaming (time to attach tts_subscriber.py to the session)")
    model = parser.add_argument_group("the session's model options (session.configure; the server's defaults "
                                      "where left out)")
    model.add_argument("--max-turn-tokens", type=int, help="tokens a reply may have")
    model.add_argument("--temperature", type=float, help="0 = greedy replies (the server's default)")
    model.add_argument("--top-p", type=float, help="nucleus sampling's mass")
    model.add_argument("--top-k", type=int, help="sample among the k likeliest (0 = no limit)")
    model.add_argument("--seed", type=int, help="the sampling's seed, for replies that come out the same each run")
    model.add_argument("--system-prompt", help="the system prompt the model reads")
    add_busy_retry_argument(parser)
    return parser


def model_options(args: argparse.Namespace) -> dict:
    """The session.configure fields the flags give; the server checks their ranges and refuses with the reason."""
    sampling = {field: value for field, value in (("temperature", args.temperature), ("top_p", args.top_p),
                                                  ("top_k", args.top_k), ("seed", args.seed)) if value is not None}
    options: dict = {"sampling": sampling} if sampling else {}
    if args.max_turn_tokens is not None:
        options["max_turn_tokens"] = args.max_turn_tokens
    if args.system_prompt is not None:
        options["system_prompt"] = args.system_prompt
    return options


def frames_per_s(args: argparse.Namespace) -> float:
    """Frames a second the pacing sends at ``--speed`` (0: as fast as the server takes them, not known here)."""
    return args.speed * 1000 / args.frame_ms if args.frame_ms > 0 else 0.0


MAX_FRAME_MS = 1000


def argument_errors(args: argparse.Namespace) -> list[str]:
    """What is wrong with the options, each said alone."""
    wrong = []
    if not math.isfinite(args.speed):  # NaN passes every comparison: it streamed unpaced, as --speed 0 without saying
        wrong.append(f"--speed {args.speed:g}: must be a finite number: 0 (as fast as the server takes it) or more")
    elif args.speed < 0:
        wrong.append(f"--speed {args.speed:g}: must be 0 (as fast as the server takes it) or more")
    if not 1 <= args.frame_ms <= MAX_FRAME_MS:
        wrong.append(f"--frame-ms {args.frame_ms:g}: must be between 1 and {MAX_FRAME_MS}")
    if (problem := busy_retry_problem(args.busy_retry_s)) is not None:
        wrong.append(problem)
    if math.isfinite(args.speed) and frames_per_s(args) > MAX_FRAMES_PER_S:
        too_many = (f"--frame-ms {args.frame_ms:g} at --speed {args.speed:g} sends {frames_per_s(args):.0f} frames a "
                    f"second; a server takes at most {MAX_FRAMES_PER_S} (transport.data_frames_per_s)")
        # Frames a second are speed * 1000 / frame_ms: --frame-ms equal to the speed sends exactly the most.
        fewest_frame_ms = math.ceil(args.speed * 1000 / MAX_FRAMES_PER_S)
        if fewest_frame_ms <= MAX_FRAME_MS:
            wrong.append(f"{too_many}: use --frame-ms {fewest_frame_ms} or more, or --speed 0 (as fast as the server "
                         "takes it)")
        else:  # no frame is long enough: only the unpaced mode, which keeps under the limit itself, is left
            wrong.append(f"{too_many}, and no --frame-ms ({MAX_FRAME_MS} at most) makes that few: use --speed 0 (as "
                         "fast as the server takes it)")
    return wrong


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wrong = argument_errors(args)
    if wrong:
        print("error: " + "; ".join(wrong), file=sys.stderr)
        return EXIT_USAGE
    try:
        endpoint_url(args.url, "/v1/stream")  # a URL that is none is a bad argument, said before anything is read
        files = expand_inputs(args.inputs)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    console = ReplyConsole(as_json=args.json, show_decisions=args.decisions,
                           faster_than_real_time=args.speed == 0 or args.speed > 1)
    sender = FileSender(files, args.speed, args.frame_ms, args.wait, model_options(args))
    return run_main(run_stream(args.url, args.api_key, console, sender, args.busy_retry_s))


if __name__ == "__main__":
    sys.exit(main())
