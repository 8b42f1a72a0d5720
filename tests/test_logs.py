"""``log_format: json``: every line the process writes to stderr is one JSON object, and a line about a
session carries its ``session_id`` and ``replica_id`` (logs.py)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from audio_interaction_server.logs import JsonFormatter, SessionFields
from benchmarks.harness import REPO_ROOT, server_log, spawn_server, stop_server

REPLICA_ID = "replica-7"


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as JSON; a line that is not JSON fails the test, naming it."""
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert {"time", "level", "logger", "message"} <= set(lines[-1]), line
    return lines


def wait_for_log(process, text: str, timeout_s: float = 30) -> None:
    """Until the server's log holds ``text`` (it logs on its own threads, after the client has its answer)."""
    deadline = time.monotonic() + timeout_s
    while text not in server_log(process):
        assert time.monotonic() < deadline and process.poll() is None, server_log(process)
        time.sleep(0.05)


def test_a_served_session_logs_json_lines_that_name_it(tiny_checkpoint):
    """Its own lines, and its subscribers': a subscriber's connection left no line naming the session it followed
    (uvicorn's lines had only its path, and nothing said when it came or went; first-hour round 13, left open)."""
    process, port = spawn_server(tiny_checkpoint, {"AIS_LOG_FORMAT": "json", "AIS_LOG_LEVEL": "info",
                                                   "AIS_REPLICA_ID": REPLICA_ID, "AIS_ENGINE__DEVICE": "cpu"},
                                 log_to_file=True)
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/stream", compression=None, open_timeout=10) as ws:
            session_id = json.loads(ws.recv(timeout=10))["session_id"]
            with connect(f"ws://127.0.0.1:{port}/v1/sessions/{session_id}/events", compression=None,
                         open_timeout=10):
                wait_for_log(process, f"session {session_id}: a subscriber from 127.0.0.1 follows it")
            wait_for_log(process, f"session {session_id}: a subscriber from 127.0.0.1 left")
            ws.send(b"\x00\x00" * 1600)  # 0.1 s of silence
            ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the session is detached, and says so
        wait_for_log(process, f"session {session_id} detached")
    finally:
        assert stop_server(process) == 0
    lines = json_lines(server_log(process))
    detached = [line for line in lines if line["message"].startswith(f"session {session_id} detached")]
    assert len(detached) == 1 and detached[0]["session_id"] == session_id
    assert detached[0]["replica_id"] == REPLICA_ID
    assert detached[0]["logger"] == "audio_interaction_server.api.connection"
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "audio_interaction_server.api.runtime"} <= loggers, loggers  # uvicorn's own too
    assert any(line["message"].startswith("Uvicorn running on") for line in lines)
    # uvloop is a dependency off Windows (pyproject.toml): the server runs on it, not merely where it happens to be.
    loop = f"uvloop {importlib.metadata.version('uvloop')}" if sys.platform != "win32" else "asyncio"
    assert any(line["message"].startswith(f"event loop: {loop}") for line in lines), [line["message"] for line in lines]
    assert all("session_id" not in line for line in lines if line["message"].startswith("ready: serving"))
    about = [line for line in lines if "subscriber" in line["message"]]
    assert len(about) == 2 and all(line["session_id"] == session_id for line in about), about
    accepted = [line for line in lines if f"/v1/sessions/{session_id}/events" in line["message"]]
    assert accepted and all(line.get("session_id") == session_id for line in accepted), accepted


def test_run_log_format_json_keeps_stdout_for_events(tiny_checkpoint, tmp_path):
    import numpy as np
    import soundfile

    soundfile.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.int16), 16000)
    result = subprocess.run([sys.executable, "-m", "audio_interaction_server.cli", "run", "--log-format", "json",
                             "--checkpoint", str(tiny_checkpoint), "--device", "cpu", str(tmp_path / "a.wav")],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stderr)
    assert any(line["message"].startswith("loaded audio-interaction-tiny") for line in lines)
    assert all("type" in json.loads(event) for event in result.stdout.splitlines())  # the events, as before


def record(message: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("audio_interaction_server.engine.worker", logging.ERROR, __file__, 1, message, args,
                             exc_info)


def test_a_record_naming_a_session_carries_it_and_a_traceback_stays_on_its_line():
    session_id = f"{REPLICA_ID}_{'0123456789abcdef' * 2}"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("session %s: %s", session_id, "step failed", exc_info=sys.exc_info())
    plain = record("model worker did not stop within %.1f s", 2.0)
    not_an_id = record("session %s", "no_such-id")
    for each in (failed, plain, not_an_id):
        SessionFields().filter(each)
    line = json.loads(JsonFormatter().format(failed))
    assert line["session_id"] == session_id and line["replica_id"] == REPLICA_ID and line["level"] == "error"
    assert line["message"] == f"session {session_id}: step failed" and "ValueError: boom" in line["exception"]
    assert "\n" not in JsonFormatter().format(failed)
    for other in (plain, not_an_id):
        assert not {"session_id", "replica_id"} & set(json.loads(JsonFormatter().format(other)))


def test_a_process_of_several_names_itself_on_every_line_in_both_formats():
    from audio_interaction_server.logs import TEXT_FORMAT, text_format

    line = record("model worker did not stop within %.1f s", 2.0)
    assert json.loads(JsonFormatter("f1").format(line))["process"] == "f1"
    assert "process" not in json.loads(JsonFormatter().format(line))
    assert logging.Formatter(text_format("engine")).format(line) == (
        "ERROR [engine] audio_interaction_server.engine.worker: model worker did not stop within 2.0 s")
    assert text_format(None) == TEXT_FORMAT


def test_the_flag_and_the_setting_reach_the_config():
    from audio_interaction_server.__main__ import add_serve_arguments, overrides_from
    from audio_interaction_server.config import ConfigError, load_config

    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert load_config(None, {}, overrides_from(parser.parse_args(["--log-format", "json"]))).log_format == "json"
    assert load_config(None, {"AIS_LOG_FORMAT": "json"}).log_format == "json"
    assert load_config(None, {}).log_format == "text"
    with pytest.raises(ConfigError) as error:
        load_config(None, {"AIS_LOG_FORMAT": "xml"})
    assert "log_format" in str(error.value)
    assert Path(REPO_ROOT, "server/audio_interaction_server/default.yaml").read_text().count("log_format:") == 1


@pytest.mark.parametrize("how", ["missing checkpoint", "bad setting", "checkpoint not in the layout",
                                 "busy port"])
def test_serve_ends_with_a_json_record_not_a_text_line_when_logs_are_json(how, tmp_path):
    """`--log-format json` / AIS_LOG_FORMAT=json: serve's last word (the error that stopped it) came as a plain
    `error:` line, or as nothing but that line, for a log pipeline that parses every line as JSON."""
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("AIS_")}
    env.update(AIS_LOG_FORMAT="json", AIS_ENGINE__DEVICE="cpu")
    args = ["--port", "0"]
    busy = None
    if how == "missing checkpoint":
        args += ["--checkpoint", str(tmp_path / "nope")]
    elif how == "bad setting":
        env["AIS_PORT"] = "abc"
        args = []
    elif how == "checkpoint not in the layout":
        (tmp_path / "empty").mkdir()
        args += ["--checkpoint", str(tmp_path / "empty")]
    else:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = ["--port", str(busy.getsockname()[1]), "--demo"]
    try:
        result = subprocess.run([sys.executable, "-m", "audio_interaction_server", *args], env=env,
                                capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    finally:
        if busy is not None:
            busy.close()
    assert result.returncode in (1, 2, 3), result.stderr
    lines = json_lines(result.stderr)
    assert lines and lines[-1]["level"] == "error", lines
    expected = {"missing checkpoint": "not an existing directory", "bad setting": "AIS_PORT",
                "checkpoint not in the layout": "release layout", "busy port": "cannot listen on"}[how]
    assert expected in lines[-1]["message"], lines[-1]


def test_a_spawned_server_that_cannot_start_is_reported_with_its_reason_at_once(tiny_checkpoint):
    """A server refusing an unknown AIS_ setting exits in a second; the harness polled /ready for its whole 120 s
    and reported only that it never became ready (first-hour review, round five: AIS_TEST_CHROMIUM, exported for
    the browser tests, reached every spawned server)."""
    started_s = time.monotonic()
    with pytest.raises(RuntimeError) as refused:
        spawn_server(tiny_checkpoint, {"AIS_NOT_A_SETTING": "1", "AIS_NOR_THIS": "2"}, log_to_file=True)
    assert time.monotonic() - started_s < 60
    message = str(refused.value)
    assert message.startswith("the server exited with status 2 before it was ready: error: ")
    assert "not_a_setting" in message and "nor_this" in message, message


def test_torchs_own_info_records_are_not_written_at_info_level(capsys):
    """torch logs its FakeTensor cache statistics at INFO as the interpreter exits: a Ctrl-C'd `run` printed them
    after its last line, `interrupted` (first-hour review, round seven). Our loggers and uvicorn's keep the level."""
    import logging

    from audio_interaction_server.logs import configure_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("torch").level)
    try:
        configure_logging("info", "text")
        logging.getLogger("torch._subclasses.fake_tensor").info("FakeTensor cache stats:")
        logging.getLogger("audio_interaction_server.cli").info("ours")
        err = capsys.readouterr().err
        assert "FakeTensor" not in err and "ours" in err, err
        # (Where torch's records go once torch has set up its own logging is torch's business: the level decides.)
        fake_tensor = logging.getLogger("torch._subclasses.fake_tensor")
        assert fake_tensor.isEnabledFor(logging.WARNING) and not fake_tensor.isEnabledFor(logging.INFO)
        configure_logging("debug", "text")
        assert fake_tensor.isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("torch").setLevel(saved[2])


@pytest.mark.parametrize("path, status, written", [
    ("/health", 200, False), ("/ready", 200, False), ("/metrics", 200, False), ("/ready?capacity=ignore", 200, False),
    ("/ready", 503, True),  # a replica that stopped being ready: worth its line
    ("/v1/info", 200, True), ("/healthz", 200, True),
])
def test_successful_probe_requests_are_not_written_at_info_level(path, status, written):
    """Behind the shipped HAProxy configuration four lines in five of a front's log were a balancer's /health
    probes, burying the session lines (first-hour review, round eight). ``log_probe_requests: false`` (the default)
    leaves out the access line of a successful /health, /ready or /metrics request; debug level writes them."""
    from audio_interaction_server.logs import ProbeRequestFilter

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", path, "1.1", status), None)
    assert ProbeRequestFilter(debug=False).filter(record) is written
    assert ProbeRequestFilter(debug=True).filter(record)


def test_a_served_sessions_end_line_says_what_it_heard_and_probes_are_not_logged(tiny_checkpoint):
    import urllib.request

    # JSON: text-format access lines go to stdout (uvicorn's own handler), which the harness does not keep.
    process, port = spawn_server(tiny_checkpoint, {"AIS_LOG_LEVEL": "info", "AIS_ENGINE__DEVICE": "cpu",
                                                   "AIS_LOG_FORMAT": "json"}, log_to_file=True)
    try:
        for path in ("/health", "/ready", "/health", "/v1/info"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
        with connect(f"ws://127.0.0.1:{port}/v1/stream", compression=None, open_timeout=10) as ws:
            session_id = json.loads(ws.recv(timeout=10))["session_id"]
            ws.send(b"\x00\x00" * 16_000)  # 1 s of silence: two whole chunks and a part
            ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0}))
            while json.loads(ws.recv(timeout=30))["type"] != "input.flushed":
                pass
            ws.send(json.dumps({"type": "session.close"}))
            while json.loads(ws.recv(timeout=30))["type"] != "session.closed":
                pass
        wait_for_log(process, f"session {session_id} ended")
    finally:
        assert stop_server(process) == 0
    messages = [line["message"] for line in json_lines(server_log(process))]
    assert any('"GET /v1/info HTTP/1.1" 200' in message for message in messages), messages
    probes = [message for message in messages if "GET /health" in message or "GET /ready" in message]
    assert probes and all(message.endswith('HTTP/1.1" 503') for message in probes), probes  # the start's are kept
    ended = next(message for message in messages if message.startswith(f"session {session_id} ended"))
    assert ended.endswith(": 1.0 s of audio received, 3 chunks heard"), ended


def test_with_several_processes_a_python_warning_and_the_last_word_name_their_process(capsys):
    """``--fronts``: every line names its process (af6056a); a warnings.warn line in text went out unnamed, and the
    supervisor's JSON last word (``report_error``) had no process field."""
    import logging
    import warnings

    from audio_interaction_server import logs
    from audio_interaction_server.logs import configure_logging, report_error

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("torch").level)
    try:
        configure_logging("info", "text", process="f1")
        warnings.warn("something is deprecated", UserWarning)
        err = capsys.readouterr().err
        assert "WARNING [f1] py.warnings:" in err, err
        configure_logging("info", "json", process="supervisor")
        report_error("the engine process could not load the model", "json")
        assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["process"] == "supervisor"
    finally:
        logging.captureWarnings(False)
        logs._process = None
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("torch").setLevel(saved[2])
