"""The server end to end: real uvicorn on 127.0.0.1, the tiny real model, a ``websockets`` client."""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.parse
import urllib.request
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from audio_interaction_server.audio.files import load_audio_file, load_audio_sequence
from audio_interaction_server.api.metrics import SESSION_STATE, heap_stats
from audio_interaction_server.protocol import SERVER_EVENT_ADAPTER
from audio_interaction_server.config import ConfigError, ServerConfig, load_config
from audio_interaction_server.api.runtime import SESSION_ID_SEPARATOR
from benchmarks.harness import LiveServer

API_KEY = "test-key"
GOOD_ORIGIN = "http://allowed.example"
MAX_TURN_TOKENS = 40  # bounds every reply of the tiny random model
AUTHORIZED = {"Authorization": f"Bearer {API_KEY}"}


def server_config(checkpoint: Path, **overrides) -> ServerConfig:
    settings = dict(port=0, api_key=API_KEY, allowed_origins=[GOOD_ORIGIN], log_level="warning",
                    max_frame_bytes=64 * 1024, engine={"checkpoint": checkpoint, "max_sessions": 2, "device": "cpu"},
                    session={"max_turn_tokens": MAX_TURN_TOKENS},
                    resume_grace_s=0)  # a vanished client ends its session here; tests/api/test_resume.py covers resume
    settings.update(overrides)
    return ServerConfig.model_validate(settings)


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint)).start()
    yield server
    server.stop()


def recv_event(ws: ClientConnection, timeout: float = 20) -> dict:
    event = json.loads(ws.recv(timeout=timeout))
    SERVER_EVENT_ADAPTER.validate_python(event)  # every event the server sends is a valid protocol event
    return event


def recv_until(ws: ClientConnection, stop, timeout: float = 30) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    while True:
        events.append(recv_event(ws, max(0.1, deadline - time.monotonic())))
        if stop(events[-1]):
            return events


def recv_to_close(ws: ClientConnection, timeout: float = 30) -> tuple[list[dict], int]:
    events = []
    try:
        while True:
            events.append(recv_event(ws, timeout))
    except ConnectionClosed as closed:
        return events, closed.rcvd.code if closed.rcvd is not None else None


def send_configure(ws: ClientConnection, received: list | None = None, **fields) -> dict:
    """Configure and return the answer; events that arrive before it go to ``received``."""
    ws.send(json.dumps({"type": "session.configure", **fields}))
    events = recv_until(ws, lambda e: e["type"] in ("session.updated", "error"))
    if received is not None:
        received += events[:-1]
    return events[-1]


def send_pcm(ws: ClientConnection, frames: np.ndarray, rate_hz: int, frame_s: float = 0.1) -> None:
    """Interleaved (T, C) or (T,) samples in ``frame_s`` pieces, as fast as the socket takes them."""
    step = int(rate_hz * frame_s)
    for start in range(0, len(frames), step):
        ws.send(frames[start:start + step].tobytes())


def assert_well_formed(events: list[dict]) -> None:
    """Turns nest properly, text deltas add up to each turn's text, timestamps never go back."""
    stamps = [e["server_time_ms"] for e in events]
    assert stamps == sorted(stamps)
    turn, text = None, ""
    for event in events:
        kind = event["type"]
        if kind == "turn_begin":
            assert turn is None, "turn_begin inside a turn"
            turn, text = event["turn"], ""
            assert event["onset_latency_ms"] >= 0
        elif kind in ("emotion", "text_delta", "segment"):
            assert event["turn"] == turn, f"{kind} outside its turn"
            text += event["text"] if kind == "text_delta" else ""
        elif kind == "turn_end":
            assert event["turn"] == turn and event["text"] == text
            assert event["num_tokens"] == len(event["token_ids"]) <= MAX_TURN_TOKENS
            turn = None


def test_stream_at_original_rates_gives_well_formed_events_and_subscriber_gets_same_text(live, shared_audio):
    files = load_audio_sequence(shared_audio / "01_count_bark")  # mp3 44.1 kHz mono, then 48 kHz stereo wavs
    with live.connect() as ws:
        created = recv_event(ws)
        assert created["type"] == "session.created" and created["model"] == "audio-interaction-tiny"
        assert created["is_demo"] is False and created["limits"]["chunk_s"] == 0.4
        with live.connect(f"/v1/sessions/{created['session_id']}/events") as subscriber:
            assert send_configure(ws, decision_events=True)["options"]["decision_events"] is True
            audio_s, events = 0.0, []
            for path in files:
                samples, rate_hz = soundfile.read(path, dtype="int16")  # the file's own rate and channels
                channels = 1 if samples.ndim == 1 else samples.shape[1]
                updated = send_configure(ws, events, audio={"sample_rate_hz": rate_hz, "num_channels": channels})
                assert updated["type"] == "session.updated", updated
                send_pcm(ws, samples, rate_hz)
                audio_s += len(samples) / rate_hz
            ws.send(json.dumps({"type": "input.flush"}))
            events += recv_until(ws, lambda e: e["type"] == "input.flushed")
            ws.send(json.dumps({"type": "session.close"}))
            closing, code = recv_to_close(ws)
            subscribed, subscriber_code = recv_to_close(subscriber)

    assert code == 1000 and subscriber_code == 1000
    assert [e["type"] for e in closing] == ["session.closed"]
    closed = closing[0]
    assert closed["reason"] == "client_closed" and closed["audio_received_s"] == pytest.approx(audio_s, abs=1e-3)
    assert closed["num_chunks_received"] == closed["num_chunks_decided"] == events[-1]["num_chunks"]
    # ~6.3 s of audio + 1 s of flush silence, in 0.4 s chunks, each decided once, in order.
    decisions = [e for e in events if e["type"] == "decision"]
    assert [d["chunk"] for d in decisions] == list(range(closed["num_chunks_received"]))
    assert 17 <= len(decisions) <= 20
    turns = [e for e in events if e["type"] == "turn_end"]
    assert turns, "the tiny model never replied: the reply path went untested"
    assert_well_formed(events)
    # The subscriber saw the same replies, and nothing it did not ask for.
    assert {e["type"] for e in subscribed} <= {"turn_begin", "emotion", "text_delta", "segment", "turn_end",
                                               "session.closed"}
    assert [e["text"] for e in subscribed if e["type"] == "turn_end"] == [t["text"] for t in turns]
    assert [e["text"] for e in subscribed if e["type"] == "segment"] == \
        [e["text"] for e in events if e["type"] == "segment"]
    assert subscribed[-1]["type"] == "session.closed"


def test_bad_input_gets_error_events_and_session_survives(live):
    with live.connect() as ws:
        recv_event(ws)
        bad_frames = [
            ("{not json", "invalid_json"),
            (json.dumps({"type": "input.shout"}), "unknown_event"),
            (json.dumps({"no_type": 1}), "invalid_event"),
            (json.dumps({"type": "session.configure", "max_turn_tokens": "many"}), "invalid_event"),
            (json.dumps({"type": "session.configure", "audio": {"sample_rate_hz": 5}}), "invalid_event"),
            (b"\x01\x02\x03", "invalid_audio"),  # 3 bytes: not whole s16 samples
            (b"\x00" * (64 * 1024 + 2), "frame_too_large"),
            ("x" * (64 * 1024 + 1), "frame_too_large"),
        ]
        for frame, code in bad_frames:
            ws.send(frame)
            error = recv_event(ws)
            assert (error["type"], error["code"], error["is_fatal"]) == ("error", code, False), (frame[:20], error)
        # Still alive: it takes configuration and audio, and closes normally.
        assert send_configure(ws, decision_events=True)["type"] == "session.updated"
        ws.send(np.zeros(8000, dtype=np.int16).tobytes())  # 0.5 s: a chunk plus its 40-sample look-ahead
        assert recv_until(ws, lambda e: e["type"] == "decision")[-1]["chunk"] == 0
        ws.send(json.dumps({"type": "session.close"}))
        events, code = recv_to_close(ws)
        assert code == 1000 and events[-1]["type"] == "session.closed"


def test_flush_pads_the_partial_chunk_and_adds_trailing_silence(live):
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, decision_events=True)
        ws.send(np.zeros(4800, dtype=np.int16).tobytes())  # 0.3 s: less than one chunk, so no decision yet
        ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.5}))
        events = recv_until(ws, lambda e: e["type"] == "input.flushed", timeout=20)
        # 0.3 s + 0.5 s = 0.8 s = exactly 2 chunks; the flush waits for any reply they start.
        assert [e["chunk"] for e in events if e["type"] == "decision"] == [0, 1]
        assert events[-1]["num_chunks"] == 2 and events[-1]["audio_time_s"] == 0.8
        assert_well_formed(events)
        # After a flush the stream goes on with a fresh front-end; chunks keep counting.
        ws.send(np.zeros(8000, dtype=np.int16).tobytes())  # 0.5 s: a chunk plus its 40-sample look-ahead
        assert recv_until(ws, lambda e: e["type"] == "decision")[-1]["chunk"] == 2


LONG_REPLY_TOKENS = 512  # the engine's default cap: far longer than a cancel takes to arrive


def send_count_bark(ws: ClientConnection, shared_audio: Path) -> None:
    """8.6 s of audio on which the tiny model starts several replies."""
    for path in load_audio_sequence(shared_audio / "01_count_bark"):
        send_pcm(ws, (load_audio_file(path) * 32767).astype(np.int16), 16_000)


def stream_until_turn_begin(ws: ClientConnection, shared_audio: Path) -> list[dict]:
    send_count_bark(ws, shared_audio)
    return recv_until(ws, lambda e: e["type"] == "turn_begin")


def test_cancel_mid_reply(live, shared_audio):
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, max_turn_tokens=LONG_REPLY_TOKENS)
        send_count_bark(ws, shared_audio)
        ws.send(json.dumps({"type": "input.flush"}))
        # The tiny model's replies also end on their own (1-90 tokens), so a cancel can lose the
        # race to TEXT_END; cancel every reply as it begins until one is cut.
        ends = []
        while not ends or ends[-1]["end_reason"] != "cancelled":
            events = recv_until(ws, lambda e: e["type"] in ("turn_begin", "input.flushed"))
            assert events[-1]["type"] == "turn_begin", f"no reply was cancelled mid-way: {ends}"
            ws.send(json.dumps({"type": "response.cancel"}))
            ends.append(recv_until(ws, lambda e: e["type"] == "turn_end")[-1])
        assert ends[-1]["num_tokens"] < LONG_REPLY_TOKENS
        assert all(end["end_reason"] in ("text_end", "cancelled") for end in ends)
        ws.send(json.dumps({"type": "session.close"}))
        events, code = recv_to_close(ws)
        assert code == 1000 and events[-1]["type"] == "session.closed"


def test_refused_past_max_sessions_and_disconnect_mid_reply_frees_the_slot(live, shared_audio):
    with live.connect() as first, live.connect() as second:
        recv_event(first), recv_event(second)
        first.send(np.zeros(6400, dtype=np.int16).tobytes())  # holds an engine slot, not just a connection
        with live.connect() as third:
            error = recv_event(third)
            assert (error["type"], error["code"], error["is_fatal"]) == ("error", "capacity", True)
            assert recv_to_close(third)[1] == 1013
        send_configure(second, max_turn_tokens=LONG_REPLY_TOKENS)
        stream_until_turn_begin(second, shared_audio)
        second.socket.close()  # vanish mid-reply, without a close frame
        deadline = time.monotonic() + 10
        while json.loads(live.get("/v1/info", AUTHORIZED)[1])["sessions"]["active"] != 1:
            assert time.monotonic() < deadline, "the disconnected session was never released"
            time.sleep(0.02)
        # The engine slot is free too: a new session gets a reply, not a capacity refusal.
        with live.connect() as fourth:
            assert recv_event(fourth)["type"] == "session.created"
            assert stream_until_turn_begin(fourth, shared_audio)[-1]["type"] == "turn_begin"
    metrics = live.get("/metrics")[1].decode()
    assert 'ais_connections_refused_total{reason="capacity"} 1.0' in metrics
    assert 'ais_sessions_total{reason="disconnected"}' in metrics


@pytest.mark.parametrize("how", ["bearer", "header", "query"])
def test_api_key_accepted_by_header_or_query(live, how):
    with live.connect(how=how, origin=GOOD_ORIGIN) as ws:
        assert recv_event(ws)["type"] == "session.created"


@pytest.mark.parametrize(("key", "origin", "code"), [
    (None, None, "unauthorized"),
    ("wrong-key", None, "unauthorized"),
    (API_KEY, "http://evil.example", "origin_not_allowed"),
])
def test_rejected_without_key_or_from_a_foreign_origin(live, key, origin, code):
    with live.connect(key=key, origin=origin) as ws:
        events, close_code = recv_to_close(ws)
    assert [(e["type"], e["code"]) for e in events] == [("error", code)] and close_code == 1008


def test_subscriber_needs_key_and_a_live_session(live):
    with live.connect("/v1/sessions/nope/events") as ws:
        events, code = recv_to_close(ws)
    assert events[0]["code"] == "unknown_session" and code == 4004
    with live.connect() as stream:
        session_id = recv_event(stream)["session_id"]
        with live.connect(f"/v1/sessions/{session_id}/events", key=None) as ws:
            events, code = recv_to_close(ws)
        assert events[0]["code"] == "unauthorized" and code == 1008


def test_a_subscriber_that_floods_is_cut_as_a_streaming_client_would_be(live):
    """A subscriber only listens; what it sent was read and dropped without a bound (gigabytes in seconds, taking
    the event loop from every session). Its messages now spend the same event budget as a streaming client's
    text events (flood.event_burst at once, flood.events_per_s after): past it, event_flood and close 1008."""
    burst = live.runtime.config.flood.event_burst
    with live.connect() as stream:
        session_id = recv_event(stream)["session_id"]
        with live.connect(f"/v1/sessions/{session_id}/events") as ws:
            for _ in range(burst):  # within the budget: ignored, as before
                ws.send("hello")
            stream.send(json.dumps({"type": "session.configure", "decision_events": True}))
            assert recv_event(stream)["type"] == "session.updated"  # the session is untouched
            try:
                for _ in range(burst):
                    ws.send(b"\0" * 1024)
            except ConnectionClosed:
                pass  # cut as it sent
            events, code = recv_to_close(ws)
        assert [e["code"] for e in events if e["type"] == "error"] == ["event_flood"] and code == 1008
        stream.send(json.dumps({"type": "session.configure", "decision_events": False}))
        assert recv_event(stream)["type"] == "session.updated"


def test_a_session_of_another_replica_is_named_so_when_resumed_or_followed_here(live):
    """A resume or a subscriber sent to the wrong replica (another front of the host, another pod: an L4 balancer,
    DNS) was told that the session ended or expired, while it went on where it was opened. The session id names
    its replica: the answer now says where to go."""
    elsewhere = f"other-box{SESSION_ID_SEPARATOR}{'0' * 32}"
    query = urllib.parse.urlencode({"resume": elsewhere, "token": "t", "last_seq": 1})
    for path in (f"/v1/stream?{query}", f"/v1/sessions/{elsewhere}/events"):
        with live.connect(path) as ws:
            events, code = recv_to_close(ws)
        assert events[0]["code"] in ("resume_expired", "unknown_session") and code in (4009, 4004)
        assert "replica other-box" in events[0]["message"] and live.runtime.replica_id in events[0]["message"]


def test_health_ready_info_metrics(live):
    assert live.get("/health") == (200, b'{"status":"ok"}')
    assert live.get("/ready")[0] == 200
    info = json.loads(live.get("/v1/info", AUTHORIZED)[1])
    assert info["model"] == "audio-interaction-tiny" and info["is_demo"] is False and info["auth"] == "api_key"
    assert info["sessions"] == {"active": 0, "max": 2} and info["device"] == "cpu"
    status, body = live.get("/metrics")
    assert status == 200 and b"ais_model_ready 1.0" in body and b"ais_worker_step_seconds_bucket" in body
    assert b"ais_decision_latency_seconds_bucket" in body and b"ais_turn_onset_latency_seconds_bucket" in body


def test_info_says_the_largest_max_turn_tokens_a_session_may_ask_for(live):
    """A client learned the largest reply cap only by being refused (first-hour review): /v1/info says it (with the
    default system prompt), a session may ask for exactly that, and one more is refused naming it."""
    largest = json.loads(live.get("/v1/info")[1])["limits"]["max_turn_tokens"]
    assert 1 <= largest < 4096
    with live.connect("/v1/stream") as ws:
        recv_event(ws)
        ws.send(json.dumps({"type": "session.configure", "max_turn_tokens": largest}))
        assert recv_event(ws)["options"]["max_turn_tokens"] == largest
        ws.send(json.dumps({"type": "session.configure", "max_turn_tokens": largest + 1}))
        refusal = recv_event(ws)
        assert refusal["type"] == "error" and f"the largest possible here is {largest}" in refusal["message"], refusal
        ws.send(json.dumps({"type": "session.close"}))
        recv_to_close(ws)


def test_operations_endpoints_answer_head_as_get_without_a_body(live):
    """Uptime checkers and some balancers probe with HEAD: it got 405 on every operations endpoint."""
    for path, headers in (("/health", {}), ("/ready", {}), ("/v1/info", {}), ("/metrics", {}),
                          ("/v1/load", AUTHORIZED)):
        request = urllib.request.Request(f"http://127.0.0.1:{live.port}{path}", headers=headers, method="HEAD")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert (response.status, response.read()) == (live.get(path, headers)[0], b""), path


def metric_samples(live: LiveServer) -> dict[str, float]:
    status, body = live.get("/metrics")
    assert status == 200
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in body.decode().splitlines() if line and not line.startswith("#"))}


def test_metrics_show_what_a_session_holds_and_nothing_after_it_closes(live):
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, decision_events=True)
        ws.send(np.zeros(16000, dtype=np.int16).tobytes())  # 1.0 s
        ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.2}))  # 1.2 s = exactly 3 chunks
        events = recv_until(ws, lambda e: e["type"] == "input.flushed")
        held = metric_samples(live)
        # Each decided chunk is kept for a context rollover; nothing waits for the model or the client.
        assert held["ais_session_history_chunks"] == 3 and held["ais_session_queued_chunks"] == 0
        num_reply_tokens = sum(e["num_tokens"] for e in events if e["type"] == "turn_end")
        # 13 tokens per listening block (the first has no lead token), plus the reply tokens fed.
        assert held["ais_session_history_tokens"] >= 3 * 13 - 1 + num_reply_tokens
        assert held["ais_session_kv_positions"] > held["ais_session_history_tokens"]  # plus the system prompt
        assert held["ais_sessions_active"] == 1 and held["ais_session_queued_events"] == 0
        assert held["ais_audio_received_seconds_total"] >= 1.0  # this session's second (the server is shared)
        # Its open copied the trained prompt's keys and values, kept at start-up, instead of feeding the prompt.
        assert held["ais_prefix_kv_reused_total"] >= 1
        # How the engine steps, from its start-up (over the process transport, from its answer to the front's hello).
        assert held['ais_step_path_info{graphs="off",step="eager"}'] == 1  # the CPU: no static step, no graphs
        assert held["ais_cuda_graphs_captured"] == held["ais_cuda_graph_pool_bytes"] == 0
        # The engine's own process, where it has one, holds the model: its memory is shown (it was not: an operator's
        # first hour, 2026-12-07); on a thread, the process's own figure covers it.
        if type(live.runtime.worker).__name__ == "EngineProcessClient":
            assert held["ais_engine_process_resident_memory_bytes"] > 100 * (1 << 20)
        else:
            assert "ais_engine_process_resident_memory_bytes" not in held
        ws.send(json.dumps({"type": "session.close"}))
        recv_to_close(ws)
    deadline = time.monotonic() + 10
    while (released := metric_samples(live))["ais_sessions_active"] != 0:
        assert time.monotonic() < deadline, "the closed session was never released"
        time.sleep(0.02)
    assert all(released[name] == 0 for name in SESSION_STATE), released
    assert released["ais_process_resident_memory_bytes"] > 100 * (1 << 20)  # the server holds the model
    assert released['ais_malloc_heap_bytes{state="in_use"}'] > 0 and released["ais_process_open_fds"] > 3


def test_periodic_malloc_trim_runs_and_is_timed(tiny_checkpoint):
    if heap_stats() is None:
        pytest.skip("malloc_trim is glibc's")
    server = LiveServer(server_config(tiny_checkpoint, memory_trim_interval_s=0.05)).start()
    try:
        deadline = time.monotonic() + 10
        while metric_samples(server)["ais_malloc_trim_seconds_count"] < 3:
            assert time.monotonic() < deadline, "no periodic trim was recorded"
            time.sleep(0.05)
        assert server.get("/health")[0] == 200  # the loop stays responsive between trims
    finally:
        server.stop()


def test_unloadable_checkpoint_is_not_ready_and_refuses_streams(tmp_path):
    server = LiveServer(server_config(tmp_path)).start(wait_ready=False)  # an empty directory
    try:
        deadline = time.monotonic() + 10
        while not server.fatal:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "CheckpointError" in server.fatal[0]
        status, body = server.get("/ready")
        assert status == 503 and "model failed to load" in json.loads(body)["reason"]
        # The details (the checkpoint's path, the exception) are for the operator's log, not for clients.
        assert str(tmp_path) not in body.decode() and "CheckpointError" not in body.decode()
        assert server.get("/health")[0] == 200
        with server.connect() as ws:
            events, code = recv_to_close(ws)
        assert events[0]["code"] == "not_ready" and code == 1013
        assert str(tmp_path) not in events[0]["message"] and "CheckpointError" not in events[0]["message"]
    finally:
        server.stop()


def test_a_dead_worker_closes_sessions_and_takes_the_server_to_not_ready(tiny_checkpoint, shared_audio, caplog):
    """The worker's step loop itself raising (not one row): every stream gets an error close, none hangs."""
    server = LiveServer(server_config(tiny_checkpoint)).start()
    try:
        with server.connect() as ws:
            recv_event(ws)
            send_configure(ws, decision_events=True)
            send_count_bark(ws, shared_audio)
            recv_until(ws, lambda e: e["type"] == "decision")

            def crash():
                raise RuntimeError("simulated worker crash")

            server.runtime.worker.step = crash  # the loop calls self.step(): the instance attribute wins
            events, code = recv_to_close(ws)
        assert code == 1011
        assert [e["code"] for e in events if e["type"] == "error"] == ["worker_failed"]
        assert not any("simulated worker crash" in e.get("message", "") for e in events)  # the log has it
        assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "worker_failed"
        assert "model worker died" in caplog.text and "simulated worker crash" in caplog.text
        deadline = time.monotonic() + 10
        # on_fatal: `python -m audio_interaction_server` then exits 1
        # (test_python_dash_m_server_exits_1_when_it_cannot_serve).
        while not server.fatal:
            assert time.monotonic() < deadline, "the worker's death did not reach on_fatal"
            time.sleep(0.02)
        assert "model worker died" in server.fatal[0]

        status, body = server.get("/ready")
        assert status == 503 and "worker died" in json.loads(body)["reason"]
        assert "simulated worker crash" not in body.decode()
        assert b"ais_model_ready 0.0" in server.get("/metrics")[1]
        with server.connect() as ws:  # a new stream is refused at once, not left waiting for the worker
            events, code = recv_to_close(ws, timeout=10)
        assert events[0]["code"] == "not_ready" and code == 1013
    finally:
        server.stop()


def test_shutdown_closes_open_sessions_with_a_final_event(tiny_checkpoint, shared_audio):
    server = LiveServer(server_config(tiny_checkpoint)).start()
    try:
        with server.connect() as ws:
            recv_event(ws)
            send_configure(ws, max_turn_tokens=LONG_REPLY_TOKENS)
            stream_until_turn_begin(ws, shared_audio)  # usually mid-reply, with audio still queued
            server.server.should_exit = True
            events, code = recv_to_close(ws)
    finally:
        server.stop()
    assert code == 1001
    assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "server_shutdown"
    # A reply the shutdown cut still gets its turn_end.
    begins = [e for e in events if e["type"] == "turn_begin"]
    ends = [e for e in events if e["type"] == "turn_end"]
    assert len(ends) == len(begins) + 1 and ends[-1]["end_reason"] in ("session_closed", "text_end")
    assert not server.runtime.worker.is_alive or server.runtime.worker.num_sessions == 0


def test_offline_cli_and_websocket_give_the_same_tokens(live, tiny_checkpoint, shared_audio, capsys):
    from audio_interaction_server.cli import build_parser, expand_inputs

    folder = shared_audio / "01_count_bark"
    args = build_parser().parse_args(["run", "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                                      "--features", "streaming", "--max-turn-tokens", str(MAX_TURN_TOKENS),
                                      "--trailing-silence", "1.0", str(folder)])
    assert args.handler(args) == 0
    offline = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The same 16 kHz mono samples the CLI decodes, sent as float32 so nothing is re-quantised.
    samples = np.concatenate([load_audio_file(path) for path in expand_inputs([str(folder)])])
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, audio={"sample_format": "pcm_f32le", "sample_rate_hz": 16_000}, decision_events=True)
        send_pcm(ws, samples, 16_000, frame_s=0.25)
        ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 1.0}))
        live_events = recv_until(ws, lambda e: e["type"] == "input.flushed")

    def tokens(events):
        return ([(e["chunk"], e["token_id"]) for e in events if e["type"] == "decision"],
                [e["token_ids"] for e in events if e["type"] == "turn_end"])

    assert tokens(live_events) == tokens(offline)
    assert len(tokens(offline)[1]) > 0


def test_config_yaml_env_and_errors(tmp_path):
    assert load_config() == ServerConfig(), "the package's default.yaml drifted from the documented defaults"
    custom = tmp_path / "server.yaml"
    custom.write_text("port: 9001\nengine:\n  max_sessions: 4\n")
    config = load_config(custom, {"AIS_API_KEY": "k", "AIS_ALLOWED_ORIGINS": "https://a.example/,https://b.example",
                                  "AIS_SESSION__MAX_TURN_TOKENS": "64", "HOME": "/ignored"}, {"port": 9002})
    assert config.port == 9002 and config.engine.max_sessions == 4 and config.session_capacity == 4
    assert config.api_key.get_secret_value() == "k" and config.session.max_turn_tokens == 64
    assert config.allowed_origins == ["https://a.example", "https://b.example"]
    with pytest.raises(ConfigError) as error:
        load_config(custom, {"AIS_PORTT": "1", "AIS_ENGINE__MAX_SESSIONS": "lots"})
    assert "portt" in str(error.value) and "AIS_PORTT" in str(error.value)
    assert "engine.max_sessions" in str(error.value) and "AIS_ENGINE__MAX_SESSIONS" in str(error.value)
    with pytest.raises(ConfigError, match="exceeds engine.max_sessions"):
        load_config(custom, {"AIS_MAX_SESSIONS": "5"})
    # AIS_LB_* belong to the HAProxy configuration (deploy/haproxy): one shell may export them and run a replica.
    assert load_config(custom, {"AIS_LB_RETRIES": "5", "AIS_LB_BIND": ":9000"}).port == 9001
    with pytest.raises(ConfigError, match="not an existing directory"):
        load_config(None, {"AIS_ENGINE__CHECKPOINT": str(tmp_path / "missing")})


def test_a_config_file_that_cannot_be_read_is_one_clear_error(tmp_path):
    """A folder, a file that is not UTF-8 text: a traceback and exit 1, where a missing or non-YAML file was
    already one line."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("port: 9001  # caf\xe9\n".encode("latin-1"))
    for path, reason in ((tmp_path, "is a folder"), (latin1, "not UTF-8")):
        with pytest.raises(ConfigError, match=reason):
            load_config(path, {})


@pytest.mark.parametrize("origin", ["localhost:8790", "example.com", "https://", "*.example.com", "*",
                                    "https://a.example/app"])
def test_an_allowed_origin_that_no_browser_can_send_is_a_configuration_error(origin):
    """A browser's Origin is scheme://host[:port]: an entry without a scheme matched nothing, and every page was
    refused with nothing said at start-up."""
    with pytest.raises(ConfigError, match="allowed_origins"):
        load_config(None, {"AIS_ALLOWED_ORIGINS": origin})
    assert load_config(None, {"AIS_ALLOWED_ORIGINS": "http://localhost:8790,https://a.example/,null"}) \
        .allowed_origins == ["http://localhost:8790", "https://a.example", "null"]


def test_serve_command_line_builds_overrides():
    from audio_interaction_server.__main__ import overrides_from
    from audio_interaction_server.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "0", "--demo"])
    assert overrides_from(args) == {"port": 0, "demo": True}
    assert load_config(None, {}, overrides_from(args)).is_demo



def test_python_dash_m_server_exits_1_when_it_cannot_serve(tmp_path):
    """on_fatal (a model that cannot load, a dead worker) stops the process with status 1 and says why."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AIS_ENGINE__CHECKPOINT": str(tmp_path), "AIS_PORT": "0"}  # an empty directory
    result = subprocess.run([sys.executable, "-m", "audio_interaction_server"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "error: CheckpointError" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_dash_m_server_exits_2_on_a_bad_config():
    """The real entry point: a bad config exits 2 with a readable message. (That a good one serves until SIGINT and
    exits 0 is tests/test_startup.py's start-up log test, which spawns the same server.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AIS_PORTT": "1"}
    bad = subprocess.run([sys.executable, "-m", "audio_interaction_server"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "portt" in bad.stderr and "AIS_PORTT" in bad.stderr


@pytest.mark.parametrize(("yaml_text", "environ"), [
    ('api_key: ""\n', {}),
    ("api_key: '   '\n", {}),
    ("port: 8000\n", {"AIS_API_KEY": "   "}),
    ("port: 8000\n", {"AIS_API_KEY": " secret"}),  # a Bearer header's key is stripped: it could never match
])
def test_an_empty_or_blank_api_key_is_a_configuration_error(tmp_path, yaml_text, environ):
    """Auth must never be silently off (a blank env value) nor 'on' with an empty key that ?api_key= matches."""
    custom = tmp_path / "server.yaml"
    custom.write_text(yaml_text)
    with pytest.raises(ConfigError, match="api_key"):
        load_config(custom, environ)


def test_an_unset_api_key_means_no_authentication_and_info_says_so(tmp_path):
    custom = tmp_path / "server.yaml"
    custom.write_text("api_key: null\n")
    assert load_config(custom, {}).api_key is None
    assert load_config(custom, {"AIS_API_KEY": ""}).api_key is None  # Compose's ${AIS_API_KEY:-} when unset


def test_python_dash_m_server_exits_2_naming_api_key_when_it_is_blank():
    import os
    import subprocess
    import sys

    env = {**os.environ, "AIS_API_KEY": "   ", "AIS_PORT": "0"}
    result = subprocess.run([sys.executable, "-m", "audio_interaction_server"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "api_key" in result.stderr and "AIS_API_KEY" in result.stderr


def test_unauthenticated_clients_learn_only_what_they_need(live):
    """Without the key: no API docs, no device or load figures, and the same refusal whatever the Origin
    (a different code for a foreign Origin would let anyone probe the allowed list)."""
    for path in ("/docs", "/redoc", "/openapi.json"):
        status, body = live.get(path)[:2]
        # A bare {"detail": "Not Found"} left the user to find api_docs in docs/deployment.md (first-hour round 10).
        assert status == 404 and b"AIS_API_DOCS=true" in body, (path, body)
    public = json.loads(live.get("/v1/info")[1])
    assert public["auth"] == "api_key" and public["protocol_version"] and public["audio"] and public["limits"]
    assert not {"model", "device", "dtype", "sessions"} & set(public), public
    assert json.loads(live.get("/v1/info", {"Authorization": "Bearer wrong"})[1]) == public
    for origin in (GOOD_ORIGIN, "http://evil.example", None):
        with live.connect(key=None, origin=origin) as ws:
            events, close_code = recv_to_close(ws)
        assert [(e["type"], e["code"]) for e in events] == [("error", "unauthorized")] and close_code == 1008


def test_api_docs_are_served_when_enabled(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint, api_docs=True)).start(wait_ready=False)
    try:
        assert server.get("/docs")[0] == 200
        assert "/v1/info" in json.loads(server.get("/openapi.json")[1])["paths"]
    finally:
        server.stop()


class RecordedLog(logging.Handler):
    """Records of one logger (uvicorn's do not reach pytest's caplog: they do not propagate to the root)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> RecordedLog:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def test_refused_connection_attempts_log_one_warning_not_an_error_each(tiny_checkpoint, caplog):
    from websockets.exceptions import InvalidStatus

    server = LiveServer(server_config(tiny_checkpoint, connect_rate_per_ip=0.01, connect_burst_per_ip=1)).start()
    try:
        with RecordedLog("uvicorn.error") as uvicorn_log, \
                caplog.at_level(logging.WARNING, logger="audio_interaction_server"):
            with server.connect() as ws:  # the burst of one
                recv_event(ws)
            for _ in range(5):
                with pytest.raises(InvalidStatus) as refused:
                    server.connect()
                assert refused.value.response.status_code == 429
            time.sleep(0.2)  # uvicorn logs after the app returns
    finally:
        server.stop()
    records = uvicorn_log.records + caplog.records
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    # The first refusal's line, then (at the latest when the server stops) one line counting the rest.
    assert len(warnings) == 2 and "429" in warnings[0] and "127.0.0.1" in warnings[0], warnings
    assert warnings[1].startswith("4 more like this in ") and "429" in warnings[1], warnings


def test_a_text_frame_that_is_not_utf8_closes_with_1007_and_logs_one_line(live):
    with RecordedLog("uvicorn.error") as uvicorn_log:
        for _ in range(3):
            with live.connect() as ws:
                recv_event(ws)
                ws.send(b"\xff\xfe{}", text=True)  # websockets sends these bytes as a text frame unchecked
                events, code = recv_to_close(ws)
            assert code == 1007  # "invalid frame payload data"
        time.sleep(0.2)
    noted = [r for r in uvicorn_log.records if r.levelno >= logging.WARNING]
    assert len(noted) == 1 and noted[0].levelno == logging.WARNING and noted[0].exc_info is None, \
        [(r.levelname, r.getMessage(), r.exc_info) for r in noted]
    assert "UTF-8" in noted[0].getMessage()


@pytest.mark.parametrize("frame", [
    '{"type": "session.configure", "max_turn_tokens": 5, "max_turn_tokens": 7}',
    '{"type": "session.configure", "sampling": {"temperature": 0.5, "temperature": 1.0}}',
    '{"type": "input.flush", "type": "session.close"}',  # which event was meant?
])
def test_an_event_with_a_duplicate_key_is_refused_not_read_as_its_last_value(live, frame):
    with live.connect() as ws:
        created = recv_event(ws)
        ws.send(frame)
        error = recv_event(ws)
        assert (error["type"], error["code"], error["is_fatal"]) == ("error", "invalid_event", False)
        assert "duplicate key" in error["message"]
        # Nothing of the event was applied: the session is as it was, and still open.
        assert send_configure(ws)["options"] == created["options"]


def test_a_client_killed_mid_reply_still_ends_the_turn_for_its_subscribers(live, shared_audio):
    """Subscribers (a TTS reader) must see every reply end, also when the streaming client vanishes."""
    with live.connect() as stream:
        session_id = recv_event(stream)["session_id"]
        send_configure(stream, max_turn_tokens=LONG_REPLY_TOKENS)
        with live.connect(f"/v1/sessions/{session_id}/events") as subscriber:
            send_count_bark(stream, shared_audio)
            seen = recv_until(subscriber, lambda e: e["type"] in ("text_delta", "emotion"))
            stream.socket.close()  # killed mid-reply: no close frame, no session.close
            events, code = recv_to_close(subscriber)
    events = seen + events
    assert code == 1000 and events[-1]["type"] == "session.closed" and events[-1]["reason"] == "disconnected"
    begins = [e["turn"] for e in events if e["type"] == "turn_begin"]
    ends = [e for e in events if e["type"] == "turn_end"]
    assert begins and [e["turn"] for e in ends] == begins, [e["type"] for e in events]
    cut = ends[-1]
    assert cut["end_reason"] in ("session_closed", "text_end", "max_tokens")
    streamed = "".join(e["text"] for e in events if e["type"] == "text_delta" and e["turn"] == cut["turn"])
    assert cut["text"] == streamed and cut["num_tokens"] == len(cut["token_ids"]) >= 1


def test_a_websocket_to_an_unknown_path_is_404_and_a_plain_get_on_an_endpoint_is_426(live):
    """A handshake on a path no route serves got HTTP 403, which reads as a refused key, and `curl /v1/stream` got
    404, which reads as "no such endpoint" (first-hour review, 2026-12-06)."""
    with pytest.raises(InvalidStatus) as refused:
        live.connect("/v1/strem")
    assert refused.value.response.status_code == 404
    assert b"no WebSocket endpoint at /v1/strem" in refused.value.response.body
    for path in ("/v1/stream", "/v1/realtime", "/v1/sessions/vm_0123/events"):
        status, body = live.get(path)
        assert status == 426 and b"WebSocket" in body, (path, status, body)
        # The page that documents it: the Realtime dialect has its own (first-hour review, round six).
        assert (b"docs/realtime.md" if path == "/v1/realtime" else b"docs/protocol.md") in body, (path, body)
    assert live.get("/v1/nothing")[0] == 404


def test_a_trailing_slash_is_redirected_to_the_path_without_it_never_to_the_requests_host(live):
    """``GET /v1/info/`` was redirected (307) to ``http://<the request's Host>/v1/info``: a client naming another
    host got a redirect there, which a cache in front that keys without the Host would store for everyone
    (hostile probe, round twelve). The Location is the path alone, with the query; an unknown path stays 404."""
    head = _raw_request(live.port, "/v1/info/?x=1", host="evil.example")
    assert head.startswith(b"HTTP/1.1 307"), head
    assert b"\r\nlocation: /v1/info?x=1\r\n" in head.lower(), head
    assert b"evil.example" not in head, head
    assert _raw_request(live.port, "/v1/nothing/", host="evil.example").startswith(b"HTTP/1.1 404")
    assert live.get("/v1/info")[0] == 200


@pytest.mark.parametrize("target, location", [
    ("/static/a%20b/", "/static/a%20b"),  # Starlette quotes the space it writes
    ("/static/%C3%A9/", "/static/%C3%A9"),  # and a letter outside ASCII
    ("/static/a%3Fb/?x=1", "/static/a%3Fb?x=1"),  # and a "?" of the path
    ("/static/a%2541/", "/static/a%41"),  # a "%" of the path it writes as it is (its own bug: another path)
    ("/v1/sessions/a%20b/events/", "/v1/sessions/a%20b/events"),  # a WebSocket endpoint's plain GET (426)
])
def test_a_trailing_slash_redirect_of_an_encoded_path_never_names_the_requests_host(live, target, location):
    """The path-only Location was written only where Starlette's Location, parsed, named the request's path as the
    app reads it (percent-decoded): any path Starlette quotes when it writes the redirect (a space, a letter outside
    ASCII, an encoded "?") kept ``http://<the request's Host>/...``, the redirect the fix was for."""
    head = _raw_request(live.port, target, host="evil.example")
    assert head.startswith(b"HTTP/1.1 307"), head
    assert f"\r\nlocation: {location}\r\n".lower().encode() in head.lower(), head
    assert b"evil.example" not in head, head


def test_only_a_redirect_to_the_requests_own_host_is_made_path_only():
    """Another host's redirect is left as it is; so is a path a browser reads as a host (``//x``, ``/\\x``), which
    path-only would turn into an open redirect (no route answers one today)."""
    from audio_interaction_server.api.slash_redirects import path_only

    assert path_only(b"http://evil.example/v1/info?x=%41", b"evil.example") == b"/v1/info?x=%41"
    assert path_only(b"http://[::1]:8000/v1/info", b"[::1]:8000") == b"/v1/info"
    assert path_only(b"https://elsewhere.example/v1/info", b"evil.example") == b"https://elsewhere.example/v1/info"
    assert path_only(b"/v1/info", b"evil.example") == b"/v1/info"
    for scheme_relative in (b"http://evil.example//other.example", b"http://evil.example/\\other.example"):
        assert path_only(scheme_relative, b"evil.example") == scheme_relative


def _raw_request(port: int, target: str, headers: str = "", host: str | None = None) -> bytes:
    """One request with ``target`` exactly as written (clients libraries send only the origin form, ``/path``),
    naming ``host`` (else the server's own address); what came back within a second, or up to the first event of
    an accepted WebSocket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        host = host or f"127.0.0.1:{port}"
        connection.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        answer = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in answer or (b" 101 " in answer and b"session.created" not in answer):
            if time.monotonic() > deadline:
                break
            piece = connection.recv(4096)
            if not piece:
                break
            answer += piece
        return answer


AUTH_LINE = f"Authorization: Bearer {API_KEY}\r\n"


def test_a_request_naming_the_whole_url_is_served_as_its_path(live):
    """RFC 9112 3.2.2: a server must accept a request target in absolute form (``GET http://host/health``, what a
    client talking through a forward proxy sends). uvicorn passed the whole URL on as the path: 404 for /health and
    403 for /v1/stream (probe, round five)."""
    port = live.port
    answer = _raw_request(port, f"http://127.0.0.1:{port}/health")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}'), answer
    upgrade = (f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{AUTH_LINE}"
               f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n")
    for scheme in ("ws", "WS", "http"):
        deadline = time.monotonic() + 10
        # The fixture's server has two sessions: the one before may take a moment to end once its socket is gone.
        while b'"code":"capacity"' in (answer := _raw_request(port, f"{scheme}://127.0.0.1:{port}/v1/stream",
                                                               upgrade)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 101 ") and b'"session.created"' in answer, (scheme, answer)
    answer = _raw_request(port, f"ws://127.0.0.1:{port}/v1/strem", upgrade)
    assert answer.startswith(b"HTTP/1.1 404 ") and b"no WebSocket endpoint at /v1/strem" in answer, answer
    # Only a scheme makes it a URL: a target that is neither form is still no path of ours.
    assert _raw_request(port, "health").startswith(b"HTTP/1.1 404 ")


def test_a_worker_thread_that_hangs_makes_the_server_refuse_new_sessions_until_it_turns(tiny_checkpoint,
                                                                                         shared_audio):
    """The engine on a thread of the server: a step that hangs (a kernel that never returns, a deadlock) left the
    server saying it was ready and admitting sessions that would never hear a decision (review, 2026-12-07). Past
    ENGINE_QUIET_S without a turn of the step loop, new sessions are refused ``not_ready`` and /ready is 503; once
    it turns again both are as before, and the open session goes on."""
    server = LiveServer(server_config(tiny_checkpoint)).start()
    worker = server.runtime.worker
    release = threading.Event()
    step = worker.step

    def hanging_step():
        release.wait()
        return step()

    try:
        with server.connect() as ws:
            recv_event(ws)
            send_configure(ws, decision_events=True)
            worker.step = hanging_step  # the step loop's next turn hangs
            send_count_bark(ws, shared_audio)
            time.sleep(2.6)
            status, body = server.get("/ready")
            assert status == 503 and "has not answered" in json.loads(body)["reason"], body
            with server.connect() as refused:
                events, code = recv_to_close(refused, timeout=10)
            assert events[0]["code"] == "not_ready" and code == 1013, events
            release.set()
            assert recv_until(ws, lambda e: e["type"] == "decision")[-1]["type"] == "decision"
            assert server.get("/ready")[0] == 200
    finally:
        release.set()
        server.stop()


def test_a_front_waiting_for_its_engine_says_so_rather_than_loading_the_model():
    """A front of several (``serve --fronts N``), started again beside an engine that serves, answered /ready and its
    refusals "loading the model" while it attached: during an incident, a model load that was not happening
    (first-hour round 14)."""
    from audio_interaction_server.api.app import create_app
    from audio_interaction_server.engine.wire import EngineEndpoints

    runtime = create_app(load_config(None, {"AIS_ENGINE__DEVICE": "cpu"})).state.runtime
    assert runtime.not_ready_reason() == "loading the model"  # one process: it loads the model itself
    runtime.attach_to = EngineEndpoints.in_directory(Path("/nonexistent"))
    assert runtime.not_ready_reason() == "waiting for the engine process (it loads the model when it starts)"
