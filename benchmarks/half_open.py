"""Half-open connections: many clients that send part of a request and never the rest.

    python -m benchmarks.half_open [--connections 1500] [--fd-limit 1024] [--server-root DIR]

`python -m audio_interaction_server` (the tiny demo model unless `--checkpoint`) runs in a subprocess whose soft
open-file limit is `--fd-limit`, as on a host with the common default of 1024. Once it is ready,
`--connections` sockets from 127.0.0.1 each send `GET /health HTTP/1.1` and nothing more; `/health`
is then asked from another address (127.0.0.2) 2, 5 and 12 s after the flood began, and the
script reports how many of the half-open connections the server had answered or closed by then
and what the flood wrote to the server's log. `--server-root` starts the server from another
checkout (e.g. a `git worktree` of an older commit) to compare before and after a change.
"""

from __future__ import annotations

import argparse
import http.client
import resource
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.harness import REPO_ROOT, server_log, server_package_dir, spawn_server

PROBE_AT_S = (2.0, 5.0, 12.0)


def start_server(root: Path, fd_limit: int, checkpoint: Path | None) -> tuple[subprocess.Popen, int]:
    """The server whose package is in ``root`` (a checkout's server/ folder, first on the path), logging at info
    level (the flood's log volume is one of the figures) to ``server_log(process)``, with a low soft fd limit."""

    def lower_fd_limit() -> None:  # in the child only: the client side here needs more descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    env = {"AIS_LOG_LEVEL": "info", "AIS_ENGINE__DEVICE": "cpu", "PYTHONPATH": str(root)}
    if checkpoint is not None:  # by environment, which an older checkout understands too
        env["AIS_ENGINE__CHECKPOINT"] = str(checkpoint)
    return spawn_server(None, env, log_to_file=True, cwd=root, preexec_fn=lower_fd_limit)


def health_from_elsewhere(port: int) -> str:
    started = time.monotonic()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0))
        connection.request("GET", "/health")
        outcome = str(connection.getresponse().status)
        connection.close()
    except OSError as error:
        outcome = type(error).__name__
    return f"{outcome} in {time.monotonic() - started:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--fd-limit", type=int, default=1024)
    parser.add_argument("--server-root", type=server_package_dir, default=REPO_ROOT / "server",
                        help="start the server from this checkout (or its server/ folder)")
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    root = args.server_root
    process, port = start_server(root, args.fd_limit, args.checkpoint)
    log_start = len(server_log(process))  # what the start-up logged: the flood's lines come after it
    revision = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    print(f"# server from {root} (HEAD {revision or '?'}), soft fd limit {args.fd_limit}, "
          f"{args.connections} half-open connections\n")
    sockets = []
    try:
        started = time.monotonic()
        for _ in range(args.connections):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sockets.append(sock)
        time.sleep(0.5)
        for sock in sockets:
            try:
                sock.send(b"GET /health HTTP/1.1\r\n")  # and never the rest
            except OSError:
                pass  # not accepted (yet)
        for at_s in PROBE_AT_S:
            time.sleep(max(0.0, at_s - (time.monotonic() - started)))
            asked_at_s = time.monotonic() - started  # later than at_s when an earlier probe waited
            print(f"/health from 127.0.0.2 at {asked_at_s:.0f} s: {health_from_elsewhere(port)}", flush=True)
        num_ended = 0
        for sock in sockets:
            try:
                sock.recv(64)  # an answer (408/429/503), or b"" for the close: either way it ended
                num_ended += 1
            except BlockingIOError:
                pass  # still held open by the server, silent
            except OSError:
                num_ended += 1  # reset
        print(f"half-open connections answered or closed by the server by {time.monotonic() - started:.0f} s: "
              f"{num_ended} of {len(sockets)}")
    finally:
        for sock in sockets:
            sock.close()
        process.terminate()
        process.wait(timeout=30)
    flood_log = server_log(process)[log_start:]
    print(f"server log during the run: {flood_log.count(chr(10))} lines, {len(flood_log.encode()):,} bytes, "
          f"{flood_log.count('Traceback')} tracebacks")


if __name__ == "__main__":
    main()
