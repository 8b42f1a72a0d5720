"""`python -m server` as a subprocess on a free loopback port, for the benchmarks that go over sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env_overrides: dict[str, str], timeout_s: float = 120.0) -> tuple[subprocess.Popen, int]:
    """Start the server with ``AIS_*`` overrides; return (process, port) once ``/ready`` answers 200.

    The server's log goes to a temporary file (``server_log(process)`` reads it), not to
    a pipe nobody drains during the run, which could fill and stall the server.
    """
    port = free_port()
    env = dict(os.environ, AIS_PORT=str(port), AIS_LOG_LEVEL="warning", **env_overrides)
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1"], env=env,
                               stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log_file = log
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                if response.status == 200:
                    return process, port
        except OSError:  # not listening yet, or 503 while the model loads
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not become ready in {timeout_s:g} s")


def server_log(process: subprocess.Popen) -> str:
    process.log_file.seek(0)
    return process.log_file.read()
