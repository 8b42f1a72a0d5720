"""Command line ``audio-interaction``: serve, offline runs over audio files, the wire schema, test checkpoints.

    audio-interaction serve [--config PATH] [--host H] [--port P] [--checkpoint DIR | --demo] ...
    audio-interaction run [--checkpoint DIR | --demo] [--features offline|streaming] FILE_OR_FOLDER...
    audio-interaction schema
    audio-interaction make-checkpoint OUT [--preset tiny|real] [--seed N] [--dtype float32|bfloat16]

``run`` prints one JSON event per line; all its files form one continuous session.
``--features offline`` lays the stream out like the reference's offline runner: every
file zero-padded to whole 0.4 s chunks and featurised as one clip, then
``--trailing-silence`` seconds of zeros as a clip of its own. ``--features streaming``
feeds the files back to back through the live server's streaming front-end and ends
with the same trailing silence, as a client's ``flush`` would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from audio_interaction_server.__main__ import EXIT_STATUSES, VERSION_TEXT, add_serve_arguments, no_cuda_reason, serve
from audio_interaction_server.logs import configure_logging

# Everything heavier (numpy, torch, the engine, pydantic models) is imported by the command that uses it:
# torch alone takes seconds, and --help, --version and a mistyped flag should answer at once.
if TYPE_CHECKING:
    import numpy as np
    import torch
    from pydantic import ValidationError

    from audio_interaction_server.audio.frontend import PaddedBlocks

log = logging.getLogger("audio_interaction_server.cli")


class InputError(ValueError):
    """A command-line input that cannot be used; the message is the one line the user sees."""


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; a folder stands for the files its ``sequence.json`` lists, in order."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(_sequence_files(path))
        elif path.exists():
            paths.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return paths


def _sequence_files(folder: Path) -> list[Path]:
    from audio_interaction_server.audio.frontend import load_audio_sequence

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
    except FileNotFoundError as error:  # names files that are not there: the message lists them
        raise InputError(str(error)) from None


def read_audio(path: Path) -> np.ndarray:
    from audio_interaction_server.audio.frontend import AudioFormatError, load_audio_file

    try:
        return load_audio_file(path)
    except AudioFormatError as error:
        reason = str(error.__cause__ or error).strip()
        raise InputError(f"{path}: not an audio file this server can decode (wav, flac, mp3): {reason}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder inside sequence.json; list audio files") from None


def trailing_silence(seconds: float) -> np.ndarray:
    import numpy as np

    from audio_interaction_server import spec as T

    return np.zeros(int(round(seconds * T.SAMPLE_RATE_HZ)), dtype=np.float32)


def offline_clips(files: list[Path], silence_s: float) -> list[torch.Tensor]:
    """Per file: its chunks, then a silence clip; each clip featurised as a whole."""
    from audio_interaction_server.audio.frontend import offline_chunks

    clips = []
    for path in files:
        clips.append(offline_chunks(read_audio(path)))
        if silence_s > 0:
            clips.append(offline_chunks(trailing_silence(silence_s)))
    return clips


def streaming_clips(files: list[Path], silence_s: float) -> list[PaddedBlocks]:
    """The live server's audio path: files back to back, then a client's ``input.flush``; the blocks the worker
    computes each chunk's log-mel from, as a live session's."""
    from audio_interaction_server.audio.stream import AudioInput

    clips: list[PaddedBlocks] = []
    audio = AudioInput(clips.append)  # 16 kHz mono s16 by default; files are already 16 kHz mono
    for path in files:
        audio.accept(read_audio(path))
    audio.flush(silence_s)
    return clips


def resolve_checkpoint(checkpoint: str | Path | None) -> Path:
    from audio_interaction_server.demo.source import resolve_model_source

    return resolve_model_source(checkpoint)


# Which command-line flag sets each validated field, so an error names what the user typed.
_FLAGS = {"max_turn_tokens": "--max-turn-tokens", "max_positions": "--max-positions", "temperature": "--temperature",
          "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}


def _one_line(error: ValidationError) -> str:
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][-1]) if problem["loc"] else ""
        problems.append(f"{_FLAGS.get(field, field)}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(problems)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.engine.events import EngineEvent, SessionEnded
    from audio_interaction_server.engine.worker import Worker
    from audio_interaction_server.model.checkpoint import CheckpointError, load_model
    from audio_interaction_server.options import SamplingOptions, SessionOptions
    from audio_interaction_server.render.replies import ReplyRenderer

    # Everything the user typed is checked, and every file decoded, before the model loads:
    # a typo should cost a second, not a multi-gigabyte load.
    try:
        sampling = SamplingOptions(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        options = SessionOptions(max_turn_tokens=args.max_turn_tokens, sampling=sampling)
        # The server's rollover window (2,048) from its budget (4,096) up, as the server runs; below, where it does
        # not fit, half of what a full reply leaves.
        window = 2048 if args.max_positions >= 4096 else max(0, (args.max_positions - args.max_turn_tokens) // 2)
        engine_config = EngineConfig(max_sessions=1, max_positions=args.max_positions,
                                     rollover_window_positions=window)
    except ValidationError as error:
        raise InputError(_one_line(error)) from None
    if not 0 <= args.trailing_silence <= 10:  # the server's input.flush range; NaN fails it too
        raise InputError(f"--trailing-silence: must be 0 to 10 seconds, as the server takes "
                         f"(got {args.trailing_silence})")
    files = expand_inputs(args.files)
    make_clips = offline_clips if args.features == "offline" else streaming_clips
    clips = make_clips(files, args.trailing_silence)
    no_cuda = no_cuda_reason(args.device)
    if no_cuda is not None:
        raise InputError(no_cuda)

    try:
        model = load_model(resolve_checkpoint(args.checkpoint), args.device, args.dtype)
    except CheckpointError as error:  # unreadable, incomplete, or not there: one line, like serve's
        raise InputError(str(error)) from None
    worker = Worker(model, engine_config)
    session_id = uuid.uuid4().hex[:12]
    renderer = ReplyRenderer(model.tokenizer)
    ended: list[SessionEnded] = []

    def emit(events: list[EngineEvent]) -> None:
        for event in events:
            if isinstance(event, SessionEnded):
                ended.append(event)
            for wire_event in renderer.render(event):
                print(wire_event.model_dump_json(exclude_none=True), flush=True)

    worker.open_session(session_id, options, emit)
    for clip in clips:
        worker.push_audio(session_id, clip)
    worker.run_until_idle()
    worker.close_session(session_id)
    worker.step()
    failures = [e for e in ended if e.error_code is not None]
    for failure in failures:
        print(f"error: {failure.error_code}: {failure.message}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-interaction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=VERSION_TEXT)
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run audio files through the model, print JSON events")
    source = run_cmd.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="release checkpoint directory or Hugging Face repo id (owner/name[@rev])")
    source.add_argument("--demo", action="store_true", help="tiny random model (the default without --checkpoint)")
    run_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run_cmd.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    run_cmd.add_argument("--features", choices=["offline", "streaming"], default="offline")
    run_cmd.add_argument("--max-turn-tokens", type=int, default=512)
    run_cmd.add_argument("--max-positions", type=int, default=4096, help="context budget of the session")
    run_cmd.add_argument("--trailing-silence", type=float, default=1.0, help="seconds of zeros after audio (0 to 10)")
    run_cmd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy replies")
    run_cmd.add_argument("--top-p", type=float, default=1.0)
    run_cmd.add_argument("--top-k", type=int, default=0)
    run_cmd.add_argument("--seed", type=int, default=None)
    run_cmd.add_argument("--log-format", choices=["text", "json"], default=None,
                         help="json: one JSON object a line on stderr (default: AIS_LOG_FORMAT, else text)")
    run_cmd.add_argument("files", nargs="+", help="audio files (wav/flac/mp3) or folders with sequence.json")
    run_cmd.set_defaults(handler=run)
    serve_cmd = commands.add_parser("serve", epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    help="run the WebSocket server (same as python -m audio_interaction_server)")
    add_serve_arguments(serve_cmd)
    serve_cmd.set_defaults(handler=serve)
    schema_cmd = commands.add_parser("schema", help="print the JSON Schema of every wire event")
    schema_cmd.set_defaults(handler=print_schema)
    from audio_interaction_server.demo import make_tiny_checkpoint

    checkpoint_cmd = commands.add_parser("make-checkpoint", help="write a seeded random checkpoint in the release "
                                         "layout (tests, demo, throughput runs; its replies are noise)")
    make_tiny_checkpoint.add_arguments(checkpoint_cmd)
    checkpoint_cmd.set_defaults(handler=make_checkpoint)
    return parser


def print_schema(args: argparse.Namespace) -> int:
    from audio_interaction_server.protocol import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def make_checkpoint(args: argparse.Namespace) -> int:
    from audio_interaction_server.demo.make_tiny_checkpoint import make_checkpoint as write_checkpoint

    write_checkpoint(args.out, args.preset, args.seed, args.dtype)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # serve sets its own up from its configuration (log_level, log_format) once that is read.
    configure_logging("info", getattr(args, "log_format", None) or os.environ.get("AIS_LOG_FORMAT") or "text")
    try:
        sys.exit(args.handler(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:  # a path given
        print(f"error: {exc.strerror}: {exc.filename}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, whatever was running: one line, the shell's status for SIGINT
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
