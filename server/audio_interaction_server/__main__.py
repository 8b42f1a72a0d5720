"""Run the WebSocket server; ``audio-interaction serve`` and ``python -m audio_interaction_server`` are the same
command, with the same flags::

    audio-interaction serve [--config PATH] [--host H] [--port P] [--checkpoint DIR] [--demo] [--fronts N]

Settings come from the package's default.yaml (or ``--config``), then ``AIS_*`` environment
variables (every setting is documented in the package's config.py), then these flags. The port is bound before the model
loads, so a busy port fails at once; /health answers while the model loads, /ready once it
is loaded, and a "ready: serving ws://..." log line says so. With --fronts N (N > 1) this process
supervises one engine process and N front processes, front i on port P + i (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from audio_interaction_server import __version__
from audio_interaction_server.api.serving import (  # noqa: F401  (the statuses are named from here too)
    EXIT_BAD_CONFIG, EXIT_CANNOT_LISTEN, EXIT_CANNOT_SERVE, EXIT_STOPPED, StopRequested, stop_requested,
)

VERSION_TEXT = f"audio-interaction {__version__}"


def given_path(text: str) -> Path:
    """An argparse type: a path, not empty (``Path("")`` is the current directory, which nobody means by it)."""
    if not text:
        raise argparse.ArgumentTypeError("empty: give a path, or leave the option out")
    return Path(text)


def plain(docstring: str | None) -> str:
    """A module docstring as --help shows it: without its reStructuredText markup (````x```` is x; a paragraph's
    closing ``::`` is a colon)."""
    text = (docstring or "").replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=VERSION_TEXT)
    parser.add_argument("--config", type=given_path, help="YAML settings file (default: the package's default.yaml)")
    parser.add_argument("--host", help="interface to listen on (default from the config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default from the config: 8000)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=given_path,
                        help="release checkpoint directory, or a Hugging Face repo id owner/name[@revision]")
    source.add_argument("--demo", action="store_true", help="serve the tiny random demo model (replies are noise)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="where the model runs (engine.device; default from the config: auto, cuda when one is "
                        "visible)")
    parser.add_argument("--engine-process", action="store_true",
                        help="run the engine in a process of its own (engine.transport: process; the default on CUDA)")
    parser.add_argument("--fronts", type=int, metavar="N",
                        help="N front processes (sockets, sessions, audio front-end) on one engine process, front i "
                        "on port PORT + i with replica id REPLICA_ID-f<i> and agent port AGENT_PORT + i (default 1: "
                        "one process)")
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="json: one JSON object a line, session_id and replica_id as fields (default: text)")
    parser.add_argument("--ssl-certfile", type=given_path,
                        help="PEM certificate: serve https:// and wss:// (browsers on other hosts need it for the "
                        "microphone); with --ssl-keyfile")
    parser.add_argument("--ssl-keyfile", type=given_path, help="PEM private key of --ssl-certfile")
    replicas = parser.add_argument_group("one of several replicas behind a load balancer (docs/scaling.md)")
    replicas.add_argument("--replica-id", help="begins every session id, so a balancer can route subscribers to "
                          "this replica (default: the host name)")
    replicas.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                          help="SIGTERM drains: no new sessions, open ones told to go and closed with 1012 within "
                          "SECONDS, then exit 0 (default: SIGTERM stops at once)")
    replicas.add_argument("--agent-port", type=int, help="TCP port answering HAProxy's agent-check (up/drain/down)")
    replicas.add_argument("--busy-refusal", choices=["error_event", "http_503"],
                          help="when full, draining or not ready: an error event + close 1013 (default), or HTTP 503 "
                          "at the handshake so a balancer retries another replica")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.demo:
        overrides["demo"] = True
    if args.checkpoint is not None:
        engine["checkpoint"] = args.checkpoint
        overrides["demo"] = False
    if args.device is not None:
        engine["device"] = args.device
    if args.engine_process:
        engine["transport"] = "process"
    for name in ("ssl_certfile", "ssl_keyfile", "replica_id", "agent_port", "busy_refusal", "log_format"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.drain_timeout is not None:
        overrides["drain_timeout_s"] = args.drain_timeout
    if args.fronts is not None:
        overrides["fronts"] = args.fronts
    if engine:
        overrides["engine"] = engine
    return overrides


EXIT_STATUSES = f"""exit status:
  {EXIT_STOPPED}  stopped by SIGINT (Ctrl-C) or SIGTERM (docker stop), also while the model was loading;
     a drain (SIGTERM with --drain-timeout, or POST /v1/admin/drain) that finished
  {EXIT_CANNOT_SERVE}  the model could not be loaded, the model worker died, or the event loop hung for
     front_hang_timeout_s (an error: line says why); with --fronts: also the engine process died, or a
     front kept dying
  {EXIT_BAD_CONFIG}  invalid configuration or command line (the message names the field and its source), also a
     --checkpoint that is neither a directory nor a Hugging Face repo id, or a websockets older than 16
  {EXIT_CANNOT_LISTEN}  cannot listen on the host and port (in use, not permitted, no such address)
"""


log = logging.getLogger("audio_interaction_server")


def no_cuda_reason(device: str | None, named_as: str = "--device cuda") -> str | None:
    """For ``device`` "cuda" on a machine where torch sees no CUDA device: the one line that says so, before
    anything listens or loads (the loader would only fail later, in the background). Imports torch."""
    if device != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    why = "a CPU-only build" if torch.version.cuda is None else \
        f"built for CUDA {torch.version.cuda}; no GPU is visible, or its driver did not load"
    return f"{named_as}: torch {torch.__version__} sees no CUDA device ({why}); use --device cpu or auto"


def checkpoint_flag_error(checkpoint: Path | None) -> str | None:
    """For a ``--checkpoint`` that is neither a directory nor a Hub repo id: the one line ``run`` prints for it,
    said before the configuration is read (whose check of the same value words it as a validation error)."""
    if checkpoint is None or checkpoint.is_dir():
        return None
    from audio_interaction_server.model.hub import checkpoint_source_problem  # imports torch: only for a non-directory

    return checkpoint_source_problem(checkpoint)


# pyproject.toml's floor, for the reason given there: api/websocket_guard.py drives the state of websockets' sans-I/O
# ServerProtocol that releases before 16 do not have, so with one the server says ready and every handshake dies.
WEBSOCKETS_FLOOR = 16


def websockets_problem(version: str | None = None) -> str | None:
    """Why the installed websockets cannot serve, or None. pip installs the floor, but another package installed
    later into the same environment can take it below: ``pip install "openai[realtime]"`` (what OpenAI's own
    documentation says for the Realtime API) pins websockets<16 and gets 15.0.1, with only a resolver warning."""
    if version is None:
        try:
            version = importlib.metadata.version("websockets")
        except importlib.metadata.PackageNotFoundError:
            return f'websockets is not installed: pip install "websockets>={WEBSOCKETS_FLOOR}"'
    major = re.match(r"\d+", version)
    if major is not None and int(major.group()) >= WEBSOCKETS_FLOOR:
        return None
    return (f"websockets {version} is installed, and the server needs {WEBSOCKETS_FLOOR} or newer (with it every "
            f'WebSocket handshake would fail): pip install "websockets>={WEBSOCKETS_FLOOR}" (pip check names the '
            "package that took it lower; openai[realtime] does: the openai SDK works without that extra)")


def prefer_passive_omp_wait() -> None:
    """Have torch's CPU threads sleep, not spin, when they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the
    environment says otherwise. Set before torch is imported (OpenMP reads it as it loads), here and in every
    process the server starts (they inherit it). By default a thread that finishes its part of an operation
    spins for its partners; on a CPU host shared with busy processes (a browser, clients, another server) a
    partner descheduled mid-step leaves it spinning on the core the partner needs, and one encoder call took
    30-200 ms instead of 3: victims of a flooding neighbour saw decisions 50-190 ms late in every run, none
    with passive waiting (docs/reliability.md). On a quiet machine the step took as long either way."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def serve(args: argparse.Namespace) -> int:
    # SIGTERM (docker stop, k8s) and SIGINT (Ctrl-C) are a normal stop at any point: also during the
    # seconds of imports before uvicorn runs, and after uvicorn's graceful shutdown, which re-raises
    # the signal with the handler installed before it ran. SIGINT gets our handler too, not Python's:
    # a background job (`cmd &` in a script) inherits SIGINT ignored, and Python then leaves it ignored.
    previous_handlers = {signum: signal.signal(signum, stop_requested) for signum in (signal.SIGINT, signal.SIGTERM)}
    prefer_passive_omp_wait()
    try:
        return _serve(args)
    except (KeyboardInterrupt, StopRequested):
        return EXIT_STOPPED
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _serve(args: argparse.Namespace) -> int:
    from audio_interaction_server.config import ConfigError, load_config

    from audio_interaction_server.logs import configure_logging, log_format_before_config, report_error

    checkpoint_error = checkpoint_flag_error(args.checkpoint)
    if checkpoint_error is not None:
        report_error(checkpoint_error, log_format_before_config(args.log_format))
        return EXIT_BAD_CONFIG
    sources: dict[tuple[str, ...], str] = {}
    try:
        config = load_config(args.config, os.environ, overrides_from(args), sources=sources)
    except ConfigError as error:
        report_error(str(error), log_format_before_config(args.log_format))
        return EXIT_BAD_CONFIG

    # With several fronts, each process of the tree names itself on every line of the log they share.
    configure_logging(config.log_level, config.log_format, process="supervisor" if config.fronts > 1 else None)
    if (flush_problem := config.flush_headroom_problem()) is not None:
        log.warning("%s", flush_problem)
    device_source = sources.get(("engine", "device"), "the default")
    no_cuda = no_cuda_reason(config.engine.device, "--device cuda" if args.device == "cuda" else
                             f"engine.device cuda (from {device_source})")
    if no_cuda is not None:
        report_error(no_cuda, config.log_format)
        return EXIT_BAD_CONFIG
    if (too_old := websockets_problem()) is not None:
        report_error(too_old, config.log_format)
        return EXIT_BAD_CONFIG

    if config.fronts > 1:  # one engine process, N fronts, supervised by this process (api/fronts.py)
        from audio_interaction_server.api.fronts import supervise

        return supervise(config)
    from audio_interaction_server.api.serving import CannotListen, bind_listeners, serve_config

    try:  # the ports first: a busy one fails in a moment, not after seconds of imports and a model load
        listeners = bind_listeners(config)
    except CannotListen as error:
        report_error(str(error), config.log_format)
        return EXIT_CANNOT_LISTEN
    log.info("starting the server: listening on %s:%d, importing the engine (torch)", config.host, config.port)
    return serve_config(config, listeners=listeners)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m audio_interaction_server", description=plain(__doc__),
                                     epilog=EXIT_STATUSES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    given = sys.argv[1:] if argv is None else argv
    if given and given[0] in _CLI_COMMANDS:  # `python -m audio_interaction_server run x.wav`: the README's commands
        # are audio-interaction's; argparse said "unrecognized arguments: run x.wav" and nothing about where it is.
        parser.error(f"{given[0]!r} is a command of audio-interaction, not of the server: use audio-interaction "
                     f"{given[0]} ... (or python -m audio_interaction_server.cli {given[0]} ...)"
                     + ("; the server takes its flags directly" if given[0] == "serve" else ""))
    sys.exit(serve(parser.parse_args(argv)))


_CLI_COMMANDS = ("run", "serve", "schema", "make-checkpoint")


if __name__ == "__main__":
    main()
