"""``python -m audio_interaction_server`` starting and stopping: a busy port, a signal while the model loads, exit
statuses, what the start-up log says. Each test runs the real entry point as a subprocess."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.harness import spawn_server


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIS_", "HF_"))}
    return {**env, "AIS_LOG_LEVEL": "info", "AIS_ENGINE__DEVICE": "cpu", **extra}



def end_process(process: subprocess.Popen) -> None:
    """A test's cleanup of the server it spawned: killed if it is still running (a test that failed before its
    own stop), waited for, its log pipe closed."""
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stderr is not None:
        process.stderr.close()

def test_a_busy_port_fails_before_the_model_loads(tiny_checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "audio_interaction_server", "--port", str(port),
             "--checkpoint", str(tiny_checkpoint)],
            env=server_env(), capture_output=True, text=True, timeout=120)
        elapsed_s = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert "loaded audio-interaction-tiny" not in result.stderr  # never loaded: the bind came first
    assert elapsed_s < 60
    # One line, before torch is imported (it said uvicorn's "ERROR: [Errno 98] ..." too, after seconds of imports).
    assert [line for line in result.stderr.splitlines() if "Errno 98" in line] == [
        f"error: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use; another program uses the "
        "port: choose another with --port or AIS_PORT"], result.stderr
    assert "importing the engine" not in result.stderr, result.stderr


def test_a_host_address_this_machine_does_not_have_is_said_so_with_what_to_give(tiny_checkpoint):
    """``--host 10.255.255.1`` said only "[Errno 99] Cannot assign requested address" (first-hour review, round
    six)."""
    result = subprocess.run([sys.executable, "-m", "audio_interaction_server", "--host", "192.0.2.1", "--port", "0",
                             "--checkpoint", str(tiny_checkpoint)], env=server_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: cannot listen on 192.0.2.1:0: [Errno 99] Cannot assign requested address; not an address of this "
        "machine: give one it has (127.0.0.1 for this machine only, 0.0.0.0 for every interface)"), result.stderr


def test_help_documents_the_exit_statuses():
    result = subprocess.run([sys.executable, "-m", "audio_interaction_server", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for status, meaning in (("0", "stopped"), ("1", "model"), ("2", "configuration"), ("3", "listen")):
        assert re.search(rf"^\s+{status}\s.*{meaning}", result.stdout, re.M | re.I), (status, result.stdout)


class StallingHub:
    """An HTTP endpoint that accepts connections and never answers: a Hub download that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.contacted = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(connection)
            self.contacted.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_model_loads_stops_the_server_at_once(tmp_path, signum):
    """A checkpoint download that hangs (the 3B model's load takes minutes): Ctrl-C or `docker stop`
    must not wait for it."""
    hub = StallingHub()
    env = server_env(HF_ENDPOINT=f"http://127.0.0.1:{hub.port}", HF_HOME=str(tmp_path / "hf"),
                     HF_HUB_ETAG_TIMEOUT="120", HF_HUB_DOWNLOAD_TIMEOUT="120", HF_HUB_DISABLE_TELEMETRY="1")
    process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--port", "0",
                                "--checkpoint", "owner/model"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.contacted.wait(90), "the loader never reached the Hub"
        time.sleep(0.5)  # well inside the download
        signalled = time.monotonic()
        process.send_signal(signum)
        status = process.wait(timeout=60)
        elapsed_s = time.monotonic() - signalled
        log = process.stderr.read()
    finally:
        end_process(process)
        hub.close()
    assert status == 0 and "Traceback" not in log, log
    assert elapsed_s < 10, f"took {elapsed_s:.1f} s to stop"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_imports_is_a_clean_stop(tiny_checkpoint, signum):
    """Before uvicorn runs (importing torch and the engine takes seconds): still status 0, no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--port", "0",
                                "--checkpoint", str(tiny_checkpoint)],
                               env=server_env(), stderr=subprocess.PIPE, text=True)
    try:
        log = LogReader(process)
        log.wait_for(r"starting the server", timeout_s=60)  # logged before the engine's imports
        process.send_signal(signum)
        status = process.wait(timeout=60)
        log.read_to_end()
    finally:
        end_process(process)
    assert status == 0 and "Traceback" not in log.text, log.text


def ignore_sigint() -> None:
    """What a shell does to a background job (`cmd &` without job control): SIGINT inherited as ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("phase", ["imports", "model_load"])
def test_sigint_stops_the_server_even_when_inherited_as_ignored(tiny_checkpoint, tmp_path, phase):
    """The server sets its own SIGINT handler from its first moment: a Ctrl-C (or `kill -INT`) during the
    start-up imports or a model load that hangs is a prompt, clean stop, whatever handler it inherited."""
    hub = StallingHub()
    env = server_env()
    source = ["--checkpoint", str(tiny_checkpoint)]
    if phase == "model_load":
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{hub.port}", HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_ETAG_TIMEOUT="120", HF_HUB_DOWNLOAD_TIMEOUT="120", HF_HUB_DISABLE_TELEMETRY="1")
        source = ["--checkpoint", "owner/model"]
    process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--port", "0", *source],
                               env=env, stderr=subprocess.PIPE, text=True, preexec_fn=ignore_sigint)
    try:
        log = LogReader(process)
        if phase == "imports":
            log.wait_for(r"starting the server", timeout_s=60)  # logged before the engine's imports
        else:
            assert hub.contacted.wait(90), "the loader never reached the Hub"
            time.sleep(0.5)  # well inside the download
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIGINT ignored: still running 30 s later ({phase})") from None
        elapsed_s = time.monotonic() - signalled
        log.read_to_end()
    finally:
        end_process(process)
        hub.close()
    assert status == 0 and "Traceback" not in log.text, log.text
    assert elapsed_s < 10, f"took {elapsed_s:.1f} s to stop"


class LogReader:
    """A subprocess's stderr lines, read on a thread so that waiting for a line can time out."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.text = ""
        threading.Thread(target=self._read, args=(process.stderr,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"the server exited before logging {pattern!r}:\n{self.text}"
            self.text += line
            found = re.search(pattern, line)
            if found:
                return found

    def read_to_end(self) -> None:
        """The rest of the log, once the process has exited (its stream then ends)."""
        while (line := self.lines.get(timeout=10)) is not None:
            self.text += line


def test_start_up_log_announces_readiness_and_the_version_and_sigint_stops_it_cleanly(tiny_checkpoint):
    import json
    import urllib.request

    from audio_interaction_server import __version__

    process, port = spawn_server(tiny_checkpoint)
    try:
        log = LogReader(process)
        # The line comes once the worker runs; /ready may answer just before it.
        announced = log.wait_for(r"ready.*serving (ws://\S+) \(audio-interaction (\S+);", timeout_s=30)
        assert announced.group(1) == f"ws://127.0.0.1:{port}/v1/stream"
        assert announced.group(2) == __version__
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=10) as response:
            assert json.load(response)["server_version"] == __version__
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        log.read_to_end()
    finally:
        end_process(process)
    assert "Application shutdown complete" in log.text and "Traceback" not in log.text


def test_first_demo_start_says_what_it_builds_without_transformers_noise(tmp_path):
    """A fresh cache: the demo model is generated and the vocabulary fetched; the log says so, and the
    transformers config warnings about the talker's token ids (never used here) stay out of it. A first start
    stopped while it generated left its staging folder (78 MB) for good: the next start removes it."""
    from audio_interaction_server.demo.make_tiny_checkpoint import GENERATOR_VERSION
    from audio_interaction_server.demo.qwen_vocab import VocabUnavailable, qwen_tiktoken_path

    try:
        ranks = qwen_tiktoken_path()
    except VocabUnavailable as error:
        pytest.skip(f"Qwen vocabulary unavailable: {error}")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(ranks, cache / ranks.name)  # the ranks only: the tokenizer and the demo model are built
    ended = subprocess.Popen(["true"])
    ended.wait()  # its process id is no one's now: the staging folder of a start stopped mid-way
    stale = cache / f"demo-tiny-v{GENERATOR_VERSION}-seed0.tmp-{ended.pid}"
    (stale / "weights").mkdir(parents=True)
    # make-checkpoint's own staging of that start's (hidden, beside it): left for good before (review, round eight)
    stale_inner = cache / f".{stale.name}.partial-{ended.pid}"
    (stale_inner / "weights").mkdir(parents=True)
    process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--port", "0", "--demo"],
                               env=server_env(AUDIO_INTERACTION_CACHE=str(cache)), stderr=subprocess.PIPE, text=True)
    log = LogReader(process)
    try:
        log.wait_for(r"attention:", timeout_s=120)  # the worker started: the load is over
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        log.read_to_end()
    finally:
        end_process(process)
    assert "generating the tiny demo model" in log.text
    assert "[transformers]" not in log.text and "Traceback" not in log.text
    assert not stale.exists(), "the interrupted start's staging folder is still there"
    assert not stale_inner.exists(), "the interrupted start's hidden staging folder is still there"


# ---- drain (docs/scaling.md): SIGTERM with a drain time -----------------------------------------------------


def connect_stream(port: int):
    from websockets.sync.client import connect

    return connect(f"ws://127.0.0.1:{port}/v1/stream", compression=None, open_timeout=10)


def start_long_reply(ws, max_turn_tokens: int = 512) -> None:
    """A reply in progress: at temperature 2 with seed 0 the tiny random model runs to ``max_turn_tokens`` (512: a
    reply of seconds, longer than any drain deadline here)."""
    import json

    import numpy as np

    ws.recv(timeout=10)  # session.created
    ws.send(json.dumps({"type": "session.configure", "reply_mode": "on_request", "max_turn_tokens": max_turn_tokens,
                        "sampling": {"temperature": 2.0, "seed": 0}}))
    ws.send(json.dumps({"type": "response.create"}))
    ws.send(np.zeros(8000, dtype=np.int16).tobytes())
    while json.loads(ws.recv(timeout=30))["type"] != "turn_begin":
        pass


def events_to_close(ws) -> tuple[list[dict], int | None]:
    import json

    from websockets.exceptions import ConnectionClosed

    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=30)))
    except ConnectionClosed as closed:
        return events, None if closed.rcvd is None else closed.rcvd.code


def test_sigterm_with_a_drain_time_lets_the_reply_finish_closes_1012_and_exits_0(tiny_checkpoint):
    drain_s = 6.0
    process, port = spawn_server(tiny_checkpoint, {"AIS_DRAIN_TIMEOUT_S": str(drain_s)})
    log = LogReader(process)
    try:
        with connect_stream(port) as ws:
            # 128 tokens: about 1.3 s here, so the reply can finish inside the drain's 4 s session deadline (the
            # deadline's cut is the drain call's test below); a 512-token reply made every run wait out the deadline.
            start_long_reply(ws, max_turn_tokens=128)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            events, code = events_to_close(ws)
            closed_s = time.monotonic() - signalled
        status = process.wait(timeout=drain_s + 30)
        exited_s = time.monotonic() - signalled
        log.read_to_end()
    finally:
        end_process(process)
    kinds = [e["type"] for e in events]
    going_away = events[kinds.index("session.going_away")]
    assert 0 < going_away["deadline_s"] < drain_s
    # The reply in progress ends (it finished, or the deadline cut it) before the session closes.
    assert "turn_end" in kinds[kinds.index("session.going_away"):]
    assert kinds[-1] == "session.closed" and events[-1]["reason"] == "server_draining"
    assert code == 1012 and closed_s < drain_s
    assert status == 0 and "drained" in log.text and "Traceback" not in log.text
    assert exited_s < drain_s + 10, f"exited {exited_s:.1f} s after SIGTERM"


def test_a_second_sigterm_during_a_drain_stops_at_once(tiny_checkpoint):
    process, port = spawn_server(tiny_checkpoint, {"AIS_DRAIN_TIMEOUT_S": "60"})
    log = LogReader(process)
    try:
        with connect_stream(port) as ws:
            start_long_reply(ws)
            process.send_signal(signal.SIGTERM)
            log.wait_for("draining: admitting no new sessions", timeout_s=10)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            events, code = events_to_close(ws)
        status = process.wait(timeout=30)
        stopped_s = time.monotonic() - signalled
        log.read_to_end()
    finally:
        end_process(process)
    assert "session.going_away" in [e["type"] for e in events]
    assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "server_shutdown" and code == 1001
    assert status == 0 and stopped_s < 20 and "Traceback" not in log.text  # not the drain's 60 s


def test_serve_flags_for_replicas():
    from audio_interaction_server.__main__ import overrides_from
    from audio_interaction_server.cli import build_parser
    from audio_interaction_server.config import load_config

    args = build_parser().parse_args(["serve", "--replica-id", "ais2", "--drain-timeout", "45", "--agent-port",
                                      "8001", "--busy-refusal", "http_503"])
    overrides = overrides_from(args)
    assert overrides == {"replica_id": "ais2", "drain_timeout_s": 45.0, "agent_port": 8001,
                         "busy_refusal": "http_503"}
    config = load_config(None, {}, overrides)
    assert (config.replica_id, config.drain_timeout_s, config.agent_port, config.busy_refusal) == \
        ("ais2", 45.0, 8001, "http_503")


def test_sigterm_after_the_drain_call_joins_the_drain(tiny_checkpoint):
    """Kubernetes' preStop hook calls the drain, then the kubelet sends SIGTERM: that SIGTERM must not cut the
    drain short (the session still ends with 1012 after its reply, not with the immediate stop's 1001)."""
    import urllib.request

    # 4 s: the sessions' deadline 2 s, past which the long reply is cut (an immediate stop would close it at once).
    process, port = spawn_server(tiny_checkpoint, {"AIS_DRAIN_TIMEOUT_S": "4", "AIS_API_KEY": ""})
    log = LogReader(process)
    try:
        with connect_stream(port) as ws:
            start_long_reply(ws)
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/admin/drain", method="POST")
            with urllib.request.urlopen(request, timeout=10) as answer:  # no key set: a local client may
                assert answer.status == 202
            process.send_signal(signal.SIGTERM)
            events, code = events_to_close(ws)
        status = process.wait(timeout=40)
        log.read_to_end()
    finally:
        end_process(process)
    assert events[-1]["reason"] == "server_draining" and code == 1012
    assert status == 0 and log.text.count("draining: admitting no new sessions") == 1


def test_a_busy_agent_port_fails_before_the_model_loads_in_one_line(tiny_checkpoint):
    """The capacity agent bound its port in the app's start-up: after "Uvicorn running on ...", a traceback and
    "Application startup failed". It now binds with the server's port, before anything loads."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        agent_port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "audio_interaction_server", "--port", "0", "--agent-port", str(agent_port),
             "--checkpoint", str(tiny_checkpoint)],
            env=server_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{agent_port} (agent_port): [Errno 98] Address already in use" \
        in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "loaded audio-interaction-tiny" not in result.stderr


@pytest.mark.parametrize("transport", ["thread", "process"])
def test_default_session_options_that_the_loaded_prompt_does_not_fit_stop_the_server(tiny_checkpoint, transport):
    """A rollover window that fits the budget without the system prompt but not with it (the configuration
    cannot count the prompt's tokens): the server said "ready" and refused every session with invalid_options.
    Start-up now checks the default options once the prompt is known, and stops (exit 1) saying why."""
    # Positions left for a rebuilt context at 2,048 with the default 512-token cap: rollover_point - 1 - 2 blocks.
    from audio_interaction_server.spec import BLOCK_TOKENS, rollover_point

    window = rollover_point(2048, 512) - 2 * BLOCK_TOKENS - 10  # fits without a prompt, not with one of 10 tokens
    result = subprocess.run(
        [sys.executable, "-m", "audio_interaction_server", "--port", "0", "--checkpoint", str(tiny_checkpoint)],
        env=server_env(AIS_ENGINE__MAX_POSITIONS="2048", AIS_ENGINE__ROLLOVER_WINDOW_POSITIONS=str(window),
                       AIS_ENGINE__TRANSPORT=transport),
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the default session options do not fit the context budget") and \
        "session.max_turn_tokens" in last and "engine.rollover_window_positions" in last, result.stderr
    assert "ready: serving" not in result.stderr
