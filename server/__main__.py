"""``python -m server [--config PATH] [--host H] [--port P] [--checkpoint DIR] [--demo]``: run the server.

Settings come from configs/default.yaml (or ``--config``), then ``AIS_*`` environment
variables (see server/settings.py), then these flags. Exits 2 on a bad configuration
and 1 when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file (default: configs/default.yaml)")
    parser.add_argument("--host", help="interface to listen on (default from the config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default from the config: 8000)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path,
                        help="release checkpoint directory, or a Hugging Face repo id owner/name[@revision]")
    source.add_argument("--demo", action="store_true", help="serve the tiny random demo model (replies are noise)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--ssl-certfile", type=Path,
                        help="PEM certificate: serve https:// and wss:// (browsers on other hosts need it for the "
                        "microphone); with --ssl-keyfile")
    parser.add_argument("--ssl-keyfile", type=Path, help="PEM private key of --ssl-certfile")


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
    for name in ("ssl_certfile", "ssl_keyfile"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if engine:
        overrides["engine"] = engine
    return overrides


class _StopRequested(Exception):
    pass


def _stop_requested(signum: int, frame: Any) -> None:
    raise _StopRequested()


def serve(args: argparse.Namespace) -> int:
    from server.settings import ConfigError, load_config

    try:
        config = load_config(args.config, os.environ, overrides_from(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from server.app import build_server, create_app

    fatal: list[str] = []
    server = None

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    server = build_server(create_app(config, on_fatal=on_fatal), config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal with the handler
    # that was installed before it ran; this one turns SIGTERM (docker stop, k8s) into a normal stop.
    previous_sigterm = signal.signal(signal.SIGTERM, _stop_requested)
    try:
        server.run()
    except (KeyboardInterrupt, _StopRequested):
        pass  # a graceful shutdown has already happened: this is a normal stop
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    if fatal:
        print(f"error: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    sys.exit(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
