"""The one live-server harness of the tests and the benchmarks.

* ``LiveServer``: the server in this process (uvicorn in a thread), built exactly as
  ``python -m audio_interaction_server`` builds it, so a test can also look at its runtime;
* ``spawn_server``: ``python -m audio_interaction_server`` as a real subprocess;
* ``free_port``, ``shared_audio_dir()`` (the shared recordings in ``../shared/audio``) and
  ``CHROMIUM_FLAGS`` (how a headless Chromium is launched here).

Importing this module imports nothing beyond the standard library: the GPU check imports the
benchmarks that use it on a machine without the web stack (fastapi, uvicorn, websockets), so those
are imported where a live server is really built.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import re
import socket
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from audio_interaction_server.config import ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a headless Chromium needs here: no sandbox (it runs as root), no GPU, no background connections
# (the closed network refuses them, many at a time, and the errors drown the page's own), media
# playback without a click, and the fake capture device granted without a permission prompt (a test
# chooses what it plays with --use-file-for-fake-audio-capture).
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
)


def shared_audio_dir() -> Path:
    """The shared real recordings: ``../shared/audio`` next to the repository (it may be absent; callers
    that need it check, the tests by skipping)."""
    return REPO_ROOT.parent / "shared" / "audio"


# Ports handed to servers started later lie below the kernel's ephemeral range, which every ``bind`` to port 0
# and every outgoing connection draws from: a port chosen inside it can be given by the kernel to another
# process (another test worker's server on port 0) between the choice and the bind. Chosen at random from
# below it, a port can only meet another pick of this function.
_PORT_PICKER = random.SystemRandom()  # not the global generator: tests seed that, alike on every worker
_LOWEST_PICKED_PORT = 10000


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range's start
        return 49152


def _free_on_every_address(ports: range) -> bool:
    """Whether each of ``ports`` can be bound on 0.0.0.0 now (so on every address: a server bound to 127.0.0.2
    or to 0.0.0.0 on that port would fail it)."""
    sockets = []
    try:
        for port in ports:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (a count of streams, frames, rounds or chunks). Zero ran and
    ended in a ZeroDivisionError, an empty min() or a KeyError traceback instead of a usage line."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def seconds_above(least_s: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds above ``least_s`` (a run's warm-up, or 0)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds (got {text!r})") from None
        if not least_s < value < float("inf"):  # NaN fails it too
            raise argparse.ArgumentTypeError(f"must be more than {least_s:g} s (got {text})")
        return value

    return parse


def free_port_run(count: int = 1) -> int:
    """The first of ``count`` consecutive ports free now on every address (``serve --fronts N`` binds port + i),
    chosen at random below the ephemeral range (another process may still take them before they are bound: use
    port 0 where the server can report what it bound)."""
    highest_first = _ephemeral_ports_start() - count
    for _ in range(200):
        if highest_first <= _LOWEST_PICKED_PORT:
            break  # an unusual ephemeral range: fall back to the kernel's choice
        first = _PORT_PICKER.randrange(_LOWEST_PICKED_PORT, highest_first)
        if _free_on_every_address(range(first, first + count)):
            return first
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = sock.getsockname()[1]
        if _free_on_every_address(range(first, first + count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def free_port() -> int:
    """A port free now on every address, for a server started later (see ``free_port_run``)."""
    return free_port_run(1)


def server_package_dir(text: str) -> Path:
    """An argparse type for another checkout's server to run: the checkout or its ``server/`` folder, given as
    the folder holding the ``audio_interaction_server`` package (what goes on ``PYTHONPATH``). Anything else is
    refused: with ``PYTHONPATH`` naming no package, the installed one would run instead, and a comparison would
    time the same code twice without a word."""
    path = Path(text).resolve()
    for candidate in (path, path / "server"):
        if (candidate / "audio_interaction_server" / "__init__.py").is_file():
            return candidate
    raise argparse.ArgumentTypeError(f"{text}: neither a checkout of this project nor its server/ folder (no "
                                     "audio_interaction_server package there or in its server/)")


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    """Until something accepts TCP connections on loopback ``port``; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {port}") from None
            time.sleep(0.05)


class _ConfiguredKey:
    """The default of ``LiveServer.connect``: whatever API key the server was configured with."""


CONFIGURED_KEY = _ConfiguredKey()


def _forget_fastapi_endpoints() -> None:
    """Empty FastAPI's module-level caches of endpoint callables (``lru_cache``s in ``fastapi.dependencies.models``,
    up to 4,096 entries each). Our endpoints are closures over their app's runtime, and so over its model: every
    server a test process built stayed in memory, about 200 MB each, and an xdist worker of the suite grew past
    9 GB and was killed for memory (flake hunt, 2026-12-07). A server process builds one app, and is not affected."""
    import fastapi.dependencies.models as models

    for value in vars(models).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


class LiveServer:
    """uvicorn in a background thread, built exactly as ``python -m audio_interaction_server`` builds it.

    ``fatal`` collects what the server would exit 1 for (a model that cannot load, a dead worker).
    """

    def __init__(self, config: ServerConfig, thread_name: str = "live-server-uvicorn") -> None:
        from audio_interaction_server.api.app import build_server, create_app

        self.config = config
        self.fatal: list[str] = []
        self.app = create_app(config, on_fatal=self.fatal.append)
        self.server = build_server(self.app, config)
        self.thread = threading.Thread(target=self.server.run, name=thread_name, daemon=True)
        self.port = 0

    @property
    def runtime(self):
        return self.app.state.runtime

    @property
    def url(self) -> str:
        """The page's address (``http://127.0.0.1:PORT/``)."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        """The WebSocket base a client is given (``ws://127.0.0.1:PORT``; the client adds the path)."""
        return f"ws://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> LiveServer:
        """Serve; return once listening and, with ``wait_ready``, once the model is loaded and the worker runs."""
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started or (wait_ready and not self.runtime.is_ready):
            assert time.monotonic() < deadline, "server did not become ready"
            assert self.thread.is_alive(), "server thread died"
            assert not (wait_ready and self.fatal), f"model failed to load: {self.fatal}"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        _forget_fastapi_endpoints()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of a GET; an HTTP error status is returned, not raised."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def connect(self, path: str = "/v1/stream", key: str | None | _ConfiguredKey = CONFIGURED_KEY,
                how: str = "bearer", origin: str | None = None) -> ClientConnection:
        """A ``websockets`` client on ``path``, the key sent as a bearer token, an ``X-API-Key`` header or
        ``?api_key=`` (``how``); ``key=None`` sends none."""
        from websockets.sync.client import connect

        if isinstance(key, _ConfiguredKey):
            secret = self.config.api_key
            key = secret.get_secret_value() if secret is not None else None
        headers = {}
        if key is not None and how == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif key is not None and how == "header":
            headers["X-API-Key"] = key
        elif key is not None and how == "query":
            path += f"?api_key={key}"
        # No bound on the events kept unread: past websockets' default (16) the client stops reading, and a close
        # after events nobody read waited out the 10 s close timeout for a close frame it could not see.
        return connect(f"ws://127.0.0.1:{self.port}{path}", additional_headers=headers, origin=origin,
                       compression=None, open_timeout=10, max_size=None, max_queue=None)

    def session_audio(self, session_id: str):
        """The server side of a session's audio: its AudioInput (format, audio_received_s)."""
        return self.runtime.streams[session_id].session.audio


def spawn_server(checkpoint: Path | None, extra_env: dict[str, str] | None = None, *, log_to_file: bool = False,
                 timeout_s: float | None = None, cwd: Path | None = None,
                 preexec_fn: Callable[[], None] | None = None, free_ports: int = 1) -> tuple[subprocess.Popen, int]:
    """``python -m audio_interaction_server`` as a real subprocess on 127.0.0.1; returns (process, port) once
    ``/ready`` is 200. With ``checkpoint`` None the server picks its model as it would for a user
    (``AIS_ENGINE__CHECKPOINT`` in ``extra_env``, else the tiny demo model).

    Two ways to keep its log, for two kinds of callers:

    * a pipe (the default, for tests): log level info, port 0; the port and the model load are read
      from the log as they happen, and ``process.stderr`` stays open for the test to read the rest
      (the test drains it or ends the process: a pipe nobody reads can fill and stall the server);
    * ``log_to_file`` (for benchmarks, which run long and read the log at the end): log level
      warning unless ``extra_env`` says otherwise, a free port chosen here, the log in a temporary
      file that ``server_log(process)`` reads back. ``timeout_s`` (default 120 s) bounds the start:
      the process is killed and RuntimeError raised past it. ``free_ports``: how many consecutive ports from
      the one chosen must be free (``AIS_FRONTS`` in ``extra_env``: front i binds port + i).
    """
    if log_to_file:
        return _spawn_logging_to_file(checkpoint, extra_env or {}, timeout_s or 120.0, cwd, preexec_fn, free_ports)
    env = {**os.environ, "AIS_LOG_LEVEL": "info", "AIS_ENGINE__DEVICE": "cpu", **(extra_env or {})}
    command = [sys.executable, "-m", "audio_interaction_server", "--port", "0"]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, cwd=cwd, preexec_fn=preexec_fn)
    port = None
    for line in process.stderr:  # uvicorn logs the port it bound, the model load follows
        found = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else port
        if port and "loaded audio-interaction-" in line:
            break
    assert port, "the server never reported its port"
    deadline = time.monotonic() + (timeout_s or 30.0)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                return process, port
        except urllib.error.HTTPError:  # 503 for the moment between load and worker start
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _spawn_logging_to_file(checkpoint: Path | None, extra_env: dict[str, str], timeout_s: float, cwd: Path | None,
                           preexec_fn: Callable[[], None] | None, free_ports: int = 1) -> tuple[subprocess.Popen, int]:
    port = free_port_run(free_ports)  # the warning-level log does not say which port was bound
    env = {**os.environ, "AIS_LOG_LEVEL": "warning", **extra_env, "AIS_PORT": str(port)}
    command = [sys.executable, "-m", "audio_interaction_server", "--host", "127.0.0.1"]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    log = server_log_file()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                               preexec_fn=preexec_fn)
    process.log_file = log
    if wait_until_ready(port, timeout_s, process):
        return process, port
    if process.poll() is not None:  # it said why in its log: that, not a wait's timeout
        lines = server_log(process).strip().splitlines()
        # Its error and the lines that go with it (a refused configuration names each setting on a line).
        first = next((i for i, line in enumerate(lines) if line.startswith("error")), max(0, len(lines) - 1))
        said = " / ".join(line.strip() for line in lines[first:]) or "(nothing logged)"
        raise RuntimeError(f"the server exited with status {process.returncode} before it was ready: {said}")
    process.kill()
    raise RuntimeError(f"the server did not become ready in {timeout_s:g} s")


def server_log_file() -> IO[str]:
    """A temporary file for a server's log, not a pipe: nobody drains it during a run, and it must not stall the
    server. Opened for appending: the server writes through the same open file as ``server_log`` reads, one offset
    for both, so without it a line written while a reader had sought to the start landed over the start."""
    log = tempfile.TemporaryFile(mode="w+")
    fcntl.fcntl(log.fileno(), fcntl.F_SETFL, fcntl.fcntl(log.fileno(), fcntl.F_GETFL) | os.O_APPEND)
    return log


def wait_until_ready(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> bool:
    """Whether a server on loopback ``port`` answered ``/ready`` with 200 within ``timeout_s`` (False at once if
    ``process``, the server, has exited: a bad setting ends it in a second, and waiting on would hide why)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:  # not listening yet, or 503 while the model loads
            pass
        time.sleep(0.2)
    return False


def scrape(base: str, timeout_s: float = 5.0) -> dict[str, float]:
    """A server's /metrics samples, keyed by name with labels (``ais_malloc_heap_bytes{state="free"}``)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# How much of a server's log one read takes (``server_log`` reads until a read comes back empty).
LOG_READ_BYTES = 1 << 20


def server_log(process: subprocess.Popen) -> str:
    """Everything a ``spawn_server(..., log_to_file=True)`` server has logged so far. Read at explicit offsets
    (``os.pread``), not from the file's position: the server appends through the same open file, and each of its
    writes moves that one position to the end, so a write between a seek to the start and the read made the read
    come back empty (or with the newest lines only) while the server was logging."""
    descriptor = process.log_file.fileno()
    chunks: list[bytes] = []
    offset = 0
    while chunk := os.pread(descriptor, LOG_READ_BYTES, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")  # a line the server is writing may end mid-character


def stop_server(process: subprocess.Popen, timeout_s: float = 30.0) -> int | None:
    """SIGINT (the server's clean stop), then kill if it has not exited within ``timeout_s``; its exit code."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)
        return None
    finally:
        if process.stderr is not None:
            process.stderr.close()
