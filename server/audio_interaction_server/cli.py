"""Command line ``audio-interaction``: serve, offline runs over audio files, the wire schema, test checkpoints.

    audio-interaction serve [--config PATH] [--host H] [--port P] [--checkpoint DIR | --demo] ...
    audio-interaction run [--checkpoint DIR | --demo] [--features offline|streaming] FILE_OR_FOLDER...
    audio-interaction schema
    audio-interaction make-checkpoint OUT [--preset tiny|real] [--seed N] [--dtype float32|bfloat16]

``run`` prints one JSON event per line, and a ``file_begin`` line before each file's audio (where it starts in
the stream); all its files form one continuous session.
``--features offline`` lays the stream out like the reference's offline runner: every
file zero-padded to whole 0.4 s chunks and featurised as one clip, each followed by
``--trailing-silence`` seconds of zeros as a clip of its own (after every file, as that
runner does). ``--features streaming`` feeds the files back to back through the live
server's streaming front-end and ends with the trailing silence once, as a client's
``flush`` would (``client_examples/stream_file.py`` sends the same).

Every file's header (readable, decodable, a sample rate and channel count the server takes) is checked before
the model loads; the samples are decoded one file at a time as the session reaches it, so memory does not grow
with the number of files. A command that cannot go on ends with one ``error:`` line on stderr (a JSON log record
with ``--log-format json`` / ``AIS_LOG_FORMAT=json``) and the exit statuses each command's ``--help`` lists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from audio_interaction_server import __main__ as server_main
from audio_interaction_server.__main__ import (
    EXIT_STATUSES, VERSION_TEXT, add_serve_arguments, no_cuda_reason, plain, serve,
)
from audio_interaction_server.logs import LOG_FORMATS, configure_logging, requested_log_format
from audio_interaction_server.logs import report_error as write_error

# Everything heavier (numpy, torch, the engine, pydantic models) is imported by the command that uses it:
# torch alone takes seconds, and --help, --version and a mistyped flag should answer at once.
if TYPE_CHECKING:
    import numpy as np
    import torch
    from pydantic import ValidationError

    from audio_interaction_server.audio.blocks import PaddedBlocks

log = logging.getLogger("audio_interaction_server.cli")

EXIT_OK = 0
EXIT_SESSION_FAILED = 1
EXIT_BAD_INPUT = 2  # serve's EXIT_BAD_CONFIG: what the user gave cannot work, said in one line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
# 128 + SIGPIPE: what a shell reports for `yes | head -1`'s yes. Python ignores SIGPIPE and raises
# BrokenPipeError instead; ending with the signal's status keeps `set -o pipefail` scripts seeing what they
# would see for any other tool.
EXIT_STDOUT_CLOSED = 141

RUN_EXIT_STATUSES = f"""exit status:
  {EXIT_OK}    finished: every file ran through the model and the session ended normally
  {EXIT_SESSION_FAILED}    the session ended with an error (an error: line says why)
  {EXIT_BAD_INPUT}    invalid command line, input file, checkpoint or device, or the demo model's Qwen vocabulary
       cannot be fetched (one error: line says why)
  {EXIT_INTERRUPTED}  stopped by Ctrl-C (SIGINT)
  {EXIT_STDOUT_CLOSED}  stdout was closed early (`| head`): it stops at once and quietly, as a tool ended by SIGPIPE
"""
MAKE_CHECKPOINT_EXIT_STATUSES = f"""exit status:
  {EXIT_OK}    written
  {EXIT_BAD_INPUT}    invalid command line, OUT is not a folder that can be written, or the Qwen vocabulary cannot
       be fetched (one error: line says why; nothing is written)
  {EXIT_INTERRUPTED}  stopped by Ctrl-C (SIGINT)
"""
SCHEMA_EXIT_STATUSES = f"""exit status:
  {EXIT_OK}    printed
  {EXIT_STDOUT_CLOSED}  stdout was closed early (`| head`): it stops quietly, as a tool ended by SIGPIPE
"""


class InputError(ValueError):
    """A command-line input that cannot be used; the message is the one line the user sees."""


# What libsndfile (through soundfile) decodes, as a user reads it.
DECODED_FORMATS = ("wav, flac, mp3, ogg/opus, aiff and other formats libsndfile knows; convert others, m4a/AAC for "
                   "one, to wav or flac")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; a folder stands for the files its ``sequence.json`` lists, in order."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(_sequence_files(path))
        elif path.exists():
            paths.append(path)
        elif item == "-":
            raise InputError("-: audio from stdin is not read (the whole file is decoded from its header on): save "
                             "it to a file and name that")
        else:
            raise InputError(f"{path}: no such file or folder")
    return paths


def _sequence_files(folder: Path) -> list[Path]:
    from audio_interaction_server.audio.files import load_audio_sequence

    sequence = folder / "sequence.json"
    if not sequence.is_file():
        raise InputError(f"{folder} is a folder without sequence.json (a JSON list of its audio files in playing "
                         "order); pass the files themselves or add one")
    try:
        return load_audio_sequence(folder)
    except json.JSONDecodeError as error:
        raise InputError(f"{sequence} is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise InputError(f"{sequence} is not UTF-8 text") from None
    except FileNotFoundError as error:  # names entries that are not files: the message lists them
        # The loader counts a folder among the missing files; it is there, so say what it is.
        named = [folder / name for name in json.loads(sequence.read_text(encoding="utf-8"))]
        folders = sorted({str(path) for path in named if path.is_dir()})
        if folders:
            raise InputError(f"{sequence} names folders, not audio files: {folders}") from None
        raise InputError(str(error)) from None


def _field_range(field: str) -> tuple[int, int]:
    """The inclusive bounds of an ``AudioFormat`` field: the server's limits, stated once, in the protocol."""
    from audio_interaction_server.protocol import AudioFormat

    constraints = AudioFormat.model_fields[field].metadata
    lowest = next(constraint.ge for constraint in constraints if hasattr(constraint, "ge"))
    highest = next(constraint.le for constraint in constraints if hasattr(constraint, "le"))
    return lowest, highest


def check_audio_file(path: Path) -> None:
    """Refuses, from the header alone, a file that cannot be read or decoded, or whose sample rate or channel
    count the server refuses on a live stream: said before the model loads, without holding the samples."""
    import soundfile

    from audio_interaction_server.audio.files import headerless_pcm_error

    try:
        with path.open("rb"):  # libsndfile reports a file it may not read as a "System error."
            pass
        info = soundfile.info(str(path))
    except PermissionError:
        raise InputError(f"{path}: permission denied (the file cannot be read)") from None
    except soundfile.LibsndfileError as error:
        raise InputError(f"{path}: not an audio file this server can decode ({DECODED_FORMATS}): {error}") from None
    except TypeError:  # soundfile's "samplerate must be specified", for a headerless format
        raise InputError(headerless_pcm_error(path)) from None
    shortfall = wav_shortfall(path) if info.format == "WAV" else None
    if shortfall is not None:
        declared, held = shortfall
        raise InputError(f"{path}: cut short: its header declares {declared:,} bytes of audio and the file holds "
                         f"{held:,} ({info.duration:.2f} s); an interrupted copy?")
    lowest_rate_hz, highest_rate_hz = _field_range("sample_rate_hz")
    fewest_channels, most_channels = _field_range("num_channels")
    problems = []
    if not lowest_rate_hz <= info.samplerate <= highest_rate_hz:
        problems.append(f"sample rate {info.samplerate} Hz")
    if not fewest_channels <= info.channels <= most_channels:
        problems.append(f"{info.channels} channels")
    if problems:
        raise InputError(f"{path}: {' and '.join(problems)}; the server takes {lowest_rate_hz} to "
                         f"{highest_rate_hz} Hz, {fewest_channels} to {most_channels} channels (resample or "
                         "down-mix it first)")


def is_unknown_wav_size(declared: int) -> bool:
    """Whether a WAV header's data size is a writer's "not known" (it streamed the file, not knowing its length):
    0, 0xFFFFFFFF, or the near-2-GiB sizes such writers put there (arecord to a pipe writes 0x7FFFFF00)."""
    return declared == 0 or declared >= 0x7FFF0000


def wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(bytes of audio the ``data`` chunk's header declares, bytes the file holds) when it holds fewer; else None.

    libsndfile reads a cut WAV as the samples that are there, without a word: a file cut by an interrupted copy
    would run as a fraction of itself."""
    size = path.stat().st_size
    with path.open("rb") as wav:
        head = wav.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None  # RF64, Wave64: other layouts, not checked here
        offset = 12
        while offset + 8 <= size:
            wav.seek(offset)
            chunk = wav.read(8)
            chunk_bytes = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                held = size - offset - 8
                return None if is_unknown_wav_size(chunk_bytes) or held >= chunk_bytes else (chunk_bytes, held)
            offset += 8 + chunk_bytes + (chunk_bytes & 1)  # chunks are padded to an even length
    return None


def read_audio(path: Path) -> np.ndarray:
    from audio_interaction_server.audio.files import load_audio_file
    from audio_interaction_server.audio.pcm import AudioFormatError

    import numpy as np

    try:
        samples = load_audio_file(path)
    except AudioFormatError as error:  # a header that reads but a body that does not
        reason = str(error.__cause__ or error).strip()
        raise InputError(f"{path}: not an audio file this server can decode ({DECODED_FORMATS}): {reason}") from None
    if not np.isfinite(samples).all():
        # A float WAV/FLAC may hold NaN or Inf: the live server refuses such pcm_f32le frames; here they would
        # reach the model and end the session as a numerical_error (status 1), or, streaming, as an error that
        # names no file.
        raise InputError(f"{path}: holds NaN or Inf samples (a float recording with invalid values); the server "
                         "takes finite samples only: fix or re-export the file")
    return samples


def trailing_silence(seconds: float) -> np.ndarray:
    import numpy as np

    from audio_interaction_server import spec as T

    return np.zeros(int(round(seconds * T.SAMPLE_RATE_HZ)), dtype=np.float32)


@dataclass(frozen=True)
class FileAudio:
    """One input's part of the session's stream, decoded when the session reaches it."""

    path: Path | None  # None: the streaming layout's closing silence, after the last file
    num_samples: int  # the file's own 16 kHz samples, before any padding or silence
    stream_samples: int  # how far it moves the stream: with the offline layout, padding and silence included
    clips: list[torch.Tensor] | list[PaddedBlocks]  # offline: featurised clips; streaming: sample blocks


@dataclass(frozen=True)
class FileBegin:
    """``run``'s line before a file's audio: where the file starts in the session's stream. Decisions number
    chunks and give ``audio_time_s`` over the whole stream (offline: each file's padding and the silence after it
    included); a decision whose chunk is at or after this ``chunk`` and before the next file's heard this file, or,
    offline, the padding and silence after it."""

    file: str
    index: int  # the file's place among the inputs (a folder's files in its sequence.json order), from 0
    chunk: int  # the chunk that holds the file's first sample
    audio_time_s: float  # the stream time of the file's first sample
    duration_s: float  # the file's length, before padding or silence
    type: str = "file_begin"

    def to_json(self) -> str:
        return json.dumps({"type": self.type, "file": self.file, "index": self.index, "chunk": self.chunk,
                           "audio_time_s": self.audio_time_s, "duration_s": self.duration_s},
                          separators=(",", ":"))


def offline_clips(files: list[Path], silence_s: float) -> Iterator[FileAudio]:
    """Per file, decoded when asked for: its chunks, then a silence clip; each clip featurised as a whole."""
    from audio_interaction_server import spec as T
    from audio_interaction_server.audio.mel import offline_chunks

    for path in files:
        samples = read_audio(path)
        clips = [offline_chunks(samples)]
        if silence_s > 0:
            clips.append(offline_chunks(trailing_silence(silence_s)))
        num_chunks = sum(clip.shape[0] for clip in clips)  # every clip padded to whole chunks
        yield FileAudio(path, len(samples), num_chunks * T.CHUNK_SAMPLES, clips)


def streaming_clips(files: list[Path], silence_s: float) -> Iterator[FileAudio]:
    """The live server's audio path: files back to back, then a client's ``input.flush``; the blocks the worker
    computes each chunk's log-mel from, as a live session's. One list per file, decoded when asked for, then
    the flush's."""
    from audio_interaction_server.audio.stream import AudioInput

    blocks: list[PaddedBlocks] = []
    audio = AudioInput(blocks.append)  # 16 kHz mono s16 by default; files are already 16 kHz mono
    for path in files:
        samples = read_audio(path)
        audio.accept(samples)
        yield FileAudio(path, len(samples), len(samples), list(blocks))
        blocks.clear()
    audio.flush(silence_s)
    yield FileAudio(None, 0, 0, blocks)


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    from audio_interaction_server.demo.source import resolve_model_source

    return resolve_model_source(checkpoint, given_by="--checkpoint")


def warn_of_the_servers_checkpoint(args: argparse.Namespace) -> None:
    """run reads no AIS_* setting of the server's: with the server's checkpoint exported and no --checkpoint it ran
    the demo, whose warning told the user to set the AIS_ENGINE__CHECKPOINT they had set (first-hour round 10)."""
    if args.checkpoint is None and not args.demo and (exported := os.environ.get("AIS_ENGINE__CHECKPOINT")):
        log.warning("AIS_ENGINE__CHECKPOINT (%s) is the server's setting, which run does not read: it takes the "
                    "checkpoint as --checkpoint (--checkpoint %s)", exported, exported)


def warn_of_sampling_flags_without_temperature(args: argparse.Namespace) -> None:
    """--seed, --top-p and --top-k shape sampling, which --temperature 0 (the default: greedy) never does: the run
    would be the greedy one with nothing said, and a researcher comparing seeds would see the same output."""
    if args.temperature != 0:
        return
    given = [flag for flag, unset in (("--seed", args.seed is None), ("--top-p", args.top_p == 1.0),
                                      ("--top-k", args.top_k == 0)) if not unset]
    if given:
        log.warning("%s %s no effect at --temperature 0 (greedy, the default): add --temperature (e.g. 1.0) to "
                    "sample", ", ".join(given), "has" if len(given) == 1 else "have")


# Which command-line flag sets each validated field, so an error names what the user typed.
_FLAGS = {"max_turn_tokens": "--max-turn-tokens", "max_positions": "--max-positions", "temperature": "--temperature",
          "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}


def _one_line(error: ValidationError) -> str:
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][-1]) if problem["loc"] else ""
        problems.append(f"{_FLAGS.get(field, field)}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(problems)


def context_budget_error(prefix_tokens: int, max_positions: int, max_turn_tokens: int) -> str | None:
    """None when a session of the trained prompt (``prefix_tokens``) with ``--max-turn-tokens`` fits
    ``--max-positions`` (with its rollover window, ``fitting_rollover_window``); else what to change, in flags."""
    from audio_interaction_server.spec import check_room, fitting_rollover_window

    def fits(positions: int, turn_tokens: int) -> bool:
        try:
            check_room(prefix_tokens, turn_tokens, positions,
                       fitting_rollover_window(positions, turn_tokens, prefix_tokens))
        except ValueError:
            return False
        return True

    if fits(max_positions, max_turn_tokens):
        return None
    fewer = next((tokens for tokens in range(max_turn_tokens - 1, 0, -1) if fits(max_positions, tokens)), None)
    more = next(positions for positions in range(max_positions + 1, 1 << 20) if fits(positions, max_turn_tokens))
    use = (f"use --max-turn-tokens {fewer} or less, or --max-positions {more} or more" if fewer is not None
           else f"use --max-positions {more} or more")
    return (f"--max-positions {max_positions} leaves no room for a reply of --max-turn-tokens {max_turn_tokens} "
            f"after the model's {prefix_tokens}-token prompt (and a context rollover's window): {use}")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.demo.qwen_vocab import VocabUnavailable
    from audio_interaction_server.engine.events import EngineEvent, SessionEnded
    from audio_interaction_server.engine.worker import Worker
    from audio_interaction_server.model.checkpoint import CheckpointError, load_model
    from audio_interaction_server.options import SamplingOptions, SessionOptions
    from audio_interaction_server.render.replies import ReplyRenderer
    from audio_interaction_server.engine.prompt import PromptEncoder
    from audio_interaction_server.model.layout import load_tokenizer, resolve_files
    from audio_interaction_server.spec import CHUNK_SAMPLES, SAMPLE_RATE_HZ, fitting_rollover_window

    # Everything the user typed is checked, and every file's header read, before the model loads:
    # a typo should cost a second, not a multi-gigabyte load.
    try:
        sampling = SamplingOptions(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        options = SessionOptions(max_turn_tokens=args.max_turn_tokens, sampling=sampling)
        EngineConfig(max_sessions=1, max_positions=args.max_positions)  # the flag's own range
    except ValidationError as error:
        raise InputError(_one_line(error)) from None
    warn_of_sampling_flags_without_temperature(args)
    if not 0 <= args.trailing_silence <= 10:  # the server's input.flush range; NaN fails it too
        raise InputError(f"--trailing-silence: must be 0 to 10 seconds, as the server takes "
                         f"(got {args.trailing_silence})")
    files = expand_inputs(args.files)
    for path in files:
        check_audio_file(path)
    no_cuda = no_cuda_reason(args.device)
    if no_cuda is not None:
        raise InputError(no_cuda)

    try:
        warn_of_the_servers_checkpoint(args)
        checkpoint = resolve_checkpoint(args.checkpoint)
        # The context budget against the trained prompt's length, from the tokenizer alone: before the weights.
        tokenizer = load_tokenizer(resolve_files(checkpoint))
        prefix_tokens = len(PromptEncoder(tokenizer, 0).prefix(None))
        budget_error = context_budget_error(prefix_tokens, args.max_positions, args.max_turn_tokens)
        if budget_error is not None:
            raise InputError(budget_error)
        # The server's rollover window from its budget (4,096) up, as the server runs; below, one that fits.
        window = fitting_rollover_window(args.max_positions, args.max_turn_tokens, prefix_tokens)
        engine_config = EngineConfig(max_sessions=1, max_positions=args.max_positions,
                                     rollover_window_positions=window)
        model = load_model(checkpoint, args.device, args.dtype, tokenizer=tokenizer)
    except (CheckpointError, VocabUnavailable) as error:  # unreadable, incomplete, not there: one line, like serve's
        raise InputError(str(error)) from None
    worker = Worker(model, engine_config)
    session_id = uuid.uuid4().hex[:12]
    renderer = ReplyRenderer(model.tokenizer)
    ended: list[SessionEnded] = []
    stdout_closed: list[BrokenPipeError] = []

    def emit(events: list[EngineEvent]) -> None:
        for event in events:
            if isinstance(event, SessionEnded):
                ended.append(event)
            if stdout_closed:
                continue  # the reader has gone; the session is closing
            try:
                for wire_event in renderer.render(event):
                    print(wire_event.model_dump_json(exclude_none=True), flush=True)
            except BrokenPipeError as error:
                # Raised here, the worker would log it as a failed callback with a traceback; instead the session
                # closes at the next step and the run stops after it, quietly.
                stdout_closed.append(error)
                worker.close_session(session_id)

    worker.open_session(session_id, options, emit)
    clips_per_file = offline_clips if args.features == "offline" else streaming_clips
    # Each file's clips run to idle before the next file is decoded: one file's samples in memory at a time.
    # A session decides its queued chunks in order whether they arrived at once or file by file, so the
    # events are those of pushing every file first.
    stream_samples = 0
    for index, file_audio in enumerate(clips_per_file(files, args.trailing_silence)):
        if file_audio.path is not None and file_audio.num_samples == 0:
            # Said as stream_file.py says it: the events after this file's file_begin answer the silence (and the
            # files) after it, not a recording, and an evaluation would count them as this file's.
            log.warning("%s holds no audio (a failed recording?): the decisions after its file_begin hear what "
                        "follows it, not this file", file_audio.path)
        if file_audio.path is not None:
            print(FileBegin(str(file_audio.path), index, stream_samples // CHUNK_SAMPLES,
                            stream_samples / SAMPLE_RATE_HZ, file_audio.num_samples / SAMPLE_RATE_HZ).to_json(),
                  flush=True)
        stream_samples += file_audio.stream_samples
        for clip in file_audio.clips:
            worker.push_audio(session_id, clip)
        worker.run_until_idle()
        if stdout_closed:
            raise stdout_closed[0]
    worker.close_session(session_id)
    worker.step()
    if stdout_closed:
        raise stdout_closed[0]
    failures = [e for e in ended if e.error_code is not None]
    for failure in failures:
        report_error(f"{failure.error_code}: {failure.message}", log_format_of(args))
    return EXIT_SESSION_FAILED if failures else EXIT_OK


class DescriptionAndDefaults(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written, and each option's default after its help (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = action.help
        default = action.default  # by identity: 0 and 0.0 are defaults worth showing, None and False are not
        if shown and "%(default)" not in shown and action.option_strings and not any(
                default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            shown += " (default: %(default)s)"
        return shown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-interaction", description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=VERSION_TEXT)
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run audio files through the model, print JSON events",
                                  epilog=RUN_EXIT_STATUSES, formatter_class=DescriptionAndDefaults)
    source = run_cmd.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="release checkpoint directory or Hugging Face repo id (owner/name[@rev])")
    source.add_argument("--demo", action="store_true", help="tiny random model (the default without --checkpoint)")
    run_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                         help="auto: a GPU when there is one")
    run_cmd.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                         help="auto: bfloat16 on a GPU, float32 on CPU")
    run_cmd.add_argument("--features", choices=["offline", "streaming"], default="offline",
                         help="offline: the reference's offline layout (each file a clip, silence after each); "
                         "streaming: the live server's front-end (files back to back, silence once at the end)")
    run_cmd.add_argument("--max-turn-tokens", type=int, default=512, help="tokens a reply may have")
    run_cmd.add_argument("--max-positions", type=int, default=4096, help="context budget of the session")
    run_cmd.add_argument("--trailing-silence", type=float, default=1.0,
                         help="seconds of zeros (0 to 10) after each file (offline) or after the last (streaming)")
    run_cmd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy replies")
    run_cmd.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass (1 = off)")
    run_cmd.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = no limit)")
    run_cmd.add_argument("--seed", type=int, default=None, help="the sampling's seed (none: random)")
    run_cmd.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                         help="json: one JSON object a line on stderr, the final error line too (default: "
                         "AIS_LOG_FORMAT, else text)")
    run_cmd.add_argument("files", nargs="+", help="audio files (wav/flac/mp3) or folders with sequence.json")
    run_cmd.set_defaults(handler=run)
    serve_cmd = commands.add_parser("serve", epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    help="run the WebSocket server (same as python -m audio_interaction_server)",
                                    description=plain(server_main.__doc__))
    add_serve_arguments(serve_cmd)
    serve_cmd.set_defaults(handler=serve)
    schema_cmd = commands.add_parser("schema", help="print the JSON Schema of every wire event",
                                     epilog=SCHEMA_EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    schema_cmd.set_defaults(handler=print_schema)
    from audio_interaction_server.demo import make_tiny_checkpoint

    checkpoint_cmd = commands.add_parser("make-checkpoint", help="write a seeded random checkpoint in the release "
                                         "layout (tests, demo, throughput runs; its replies are noise)",
                                         epilog=MAKE_CHECKPOINT_EXIT_STATUSES,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    make_tiny_checkpoint.add_arguments(checkpoint_cmd)
    checkpoint_cmd.set_defaults(handler=make_checkpoint)
    return parser


def print_schema(args: argparse.Namespace) -> int:
    from audio_interaction_server.protocol import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def make_checkpoint(args: argparse.Namespace) -> int:
    from audio_interaction_server.demo.make_tiny_checkpoint import CheckpointWriteError
    from audio_interaction_server.demo.make_tiny_checkpoint import make_checkpoint as write_checkpoint
    from audio_interaction_server.demo.qwen_vocab import VocabUnavailable

    try:
        write_checkpoint(args.out, args.preset, args.seed, args.dtype)
    except (VocabUnavailable, CheckpointWriteError) as error:  # no package index, a full disk: one line says it
        raise InputError(str(error)) from None
    return EXIT_OK


def log_format_of(args: argparse.Namespace) -> str:
    """The format of stderr's lines: the command's --log-format, else AIS_LOG_FORMAT, else text."""
    return requested_log_format(getattr(args, "log_format", None))


def report_error(message: str, log_format: str) -> None:
    """A command's ``error:`` line (a JSON record with JSON logs: ``logs.report_error``)."""
    write_error(message, log_format, log.name)


def _send_stdout_to_devnull() -> None:
    """stdout's reader has gone: output still buffered would raise again when the interpreter flushes it at exit
    (an "Exception ignored" message and status 120), so stdout now writes nowhere (Python's documented way)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    log_format = log_format_of(args)
    if log_format not in LOG_FORMATS:  # only AIS_LOG_FORMAT can get here: the flag's choices are checked
        print(f"error: AIS_LOG_FORMAT={log_format!r} is not a log format; use one of {', '.join(LOG_FORMATS)}",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    # serve sets its own up from its configuration (log_level, log_format) once that is read.
    configure_logging("info", log_format)
    sys.exit(_run_command(args, log_format))


def _run_command(args: argparse.Namespace, log_format: str) -> int:
    """The command's exit status; what ends it early becomes one line, never a traceback."""
    try:
        status = args.handler(args)
        sys.stdout.flush()  # a closed pipe meets output still buffered here, not at the interpreter's exit
        return status
    except BrokenPipeError:  # `| head` took what it wanted: stop quietly, as a tool ended by SIGPIPE
        _send_stdout_to_devnull()
        return EXIT_STDOUT_CLOSED
    except (FileNotFoundError, ValueError) as exc:
        report_error(str(exc), log_format)
        return EXIT_BAD_INPUT
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:  # a path given
        report_error(f"{exc.strerror}: {exc.filename}", log_format)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C, whatever was running: one line, the shell's status for SIGINT
        if log_format == "json":
            log.warning("interrupted")
        else:
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    main()
