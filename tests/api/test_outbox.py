"""What a client that does not read may cost: the per-connection outbox is bounded in events and in bytes,
and a closed connection's memory is freed by reference counting alone (no wait for the cyclic GC)."""

from __future__ import annotations

import gc
import json
import struct
import weakref

import pytest

from audio_interaction_server.api.outbox import Outbox, queued_bytes
from audio_interaction_server.api.replay_log import ReplayLog
from audio_interaction_server.protocol import DecisionEvent, LiveTextDeltaEvent, LiveTurnEndEvent
from benchmarks.harness import LiveServer
from tests.api.test_app import metric_samples, server_config
from tests.api.test_transport import (
    CLOSE, TEXT, close_code, open_socket, read_response_head, read_until_closed, server_frames, upgrade_request,
    wait_until,
)

MAX_QUEUED_BYTES = 1024 * 1024  # the smallest bound the test server's 64 KiB frames allow


def delta(turn: int, text: str) -> LiveTextDeltaEvent:
    return LiveTextDeltaEvent(session_id="s", server_time_ms=0, turn=turn, text=text)


def end(turn: int, text: str = "") -> LiveTurnEndEvent:
    return LiveTurnEndEvent(session_id="s", server_time_ms=0, turn=turn, text=text, token_ids=[], num_tokens=0,
                            end_reason="text_end")


def test_deltas_of_one_reply_coalesce_while_unsent():
    outbox = Outbox(websocket=None, max_events=3, max_bytes=MAX_QUEUED_BYTES)
    for i in range(1000):  # a reader that is far behind: memory per reply, not per token
        assert outbox.put([delta(0, f"{i} ")])
    assert len(outbox) == 1 and outbox.queued_events()[0].text == "".join(f"{i} " for i in range(1000))
    assert outbox.num_coalesced == 999
    assert outbox.put([end(0), delta(1, "a"), delta(1, "b")])  # a new reply starts a new delta
    assert [e.type for e in outbox.queued_events()] == ["text_delta", "turn_end", "text_delta"]
    assert outbox.queued_events()[-1].text == "ab"


def test_the_resume_log_counts_each_event_as_the_outbox_sized_it():
    """The outbox hands the log each event's size, so the log need not serialise the numbered copy to count it
    (the number's own few bytes aside, the same count)."""
    events = [DecisionEvent(session_id="s", chunk=i, token_id=5, decision="keep_silence",
                            audio_time_s=0.4 * (i + 1)) for i in range(12)]
    events += [delta(0, "héllo"), end(0, "héllo")]
    given, serialised = ReplayLog(100, 10**6), ReplayLog(100, 10**6)
    for event in events:
        given.stamp(event, queued_bytes(event), keep=True)
        serialised.stamp(event, keep=True)
    assert given.num_bytes == sum(map(queued_bytes, events))
    assert 0 <= serialised.num_bytes - given.num_bytes <= len(',"seq":14') * len(events)


def test_a_reader_that_stays_behind_hits_the_bound():
    outbox = Outbox(websocket=None, max_events=3, max_bytes=MAX_QUEUED_BYTES)
    assert outbox.put([end(0), end(1), end(2)])
    assert not outbox.put([end(3)])


def test_the_bound_in_bytes_counts_what_the_events_carry_and_frees_what_is_taken():
    outbox = Outbox(websocket=None, max_events=10_000, max_bytes=MAX_QUEUED_BYTES)
    text = "x" * (200 * 1024)
    assert outbox.put([end(0, text) for _ in range(4)])  # 800 KiB of text in four events
    assert 4 * len(text) <= outbox.num_bytes < 4 * len(text) + 4096
    assert outbox.take_unsent() and outbox.num_bytes == 0  # what leaves the queue leaves the count
    for i in range(2000):  # coalesced deltas are counted by their text too
        assert outbox.put([delta(0, "y" * 500)])
    assert not outbox.put([end(0, text)]), "1 MiB of deltas and one more event of 200 KiB is over the bound"


def test_bytes_a_codec_holds_for_the_answers_still_queued_count_against_the_bound():
    held = [0]
    outbox = Outbox(websocket=None, max_events=10_000, max_bytes=MAX_QUEUED_BYTES, held_bytes=lambda: held[0])
    assert outbox.put([end(0)])
    held[0] = MAX_QUEUED_BYTES  # e.g. the realtime codec keeping items until their echo is sent
    assert not outbox.put([end(1)])


# ---- end to end: a /v1/realtime client that sends large items and never reads


def frame(opcode: int, payload: bytes) -> bytes:
    """A client frame of any length, masked with a zero key (legal, and the payload needs no XOR)."""
    length = len(payload)
    if length < 126:
        head = bytes([0x80 | opcode, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0" + payload


def item_create(number: int, text_bytes: int) -> bytes:
    event = {"type": "conversation.item.create", "event_id": f"e{number}",
             "item": {"id": f"item_{number}", "type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": "z" * text_bytes}]}}
    return frame(TEXT, json.dumps(event).encode())


def connection_objects(server: LiveServer) -> list[weakref.ref]:
    """Weak references to the one open connection and what it owns (session, codec, outbox)."""
    [connection] = server.runtime.streams.values()
    return [weakref.ref(item) for item in (connection, connection.session, connection.codec, connection.outbox)]


@pytest.fixture
def no_cyclic_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def test_a_realtime_client_that_does_not_read_is_closed_at_the_byte_bound_and_freed(tiny_checkpoint, no_cyclic_gc):
    server = LiveServer(server_config(tiny_checkpoint, max_queued_bytes=MAX_QUEUED_BYTES)).start()
    try:
        sock = open_socket(server.port, receive_buffer_bytes=4096)  # reads nothing: the server's sends stall
        with sock:
            sock.sendall(upgrade_request("/v1/realtime"))
            assert read_response_head(sock)[0].startswith(b"HTTP/1.1 101")
            assert wait_until(lambda: len(server.runtime.streams) == 1)
            objects = connection_objects(server)
            # 150 items of 60 KB: 18 MB once echoed (added and done); far fewer than max_queued_events events.
            # Sent until the server stops taking them (a closing connection is no longer read).
            sock.settimeout(2)
            for number in range(150):
                try:
                    sock.sendall(item_create(number, 60_000))
                except TimeoutError:
                    break
            data, closed = read_until_closed(sock, timeout_s=20)
        frames = server_frames(data)
        errors = [json.loads(payload)["error"] for opcode, payload in frames
                  if opcode == TEXT and json.loads(payload)["type"] == "error"]
        assert closed and close_code(frames) == 4008, (close_code(frames), len(frames))
        assert [error["code"] for error in errors] == ["client_too_slow"]
        num_echoed = sum(1 for opcode, payload in frames if opcode == TEXT and b"conversation.item.done" in payload)
        assert num_echoed < 150 and CLOSE in [opcode for opcode, _ in frames]
        assert wait_until(lambda: not server.runtime.streams), "the session was not released"
        # Counted as what it was: the cut was ais_sessions_total{reason="disconnected"}, and its error uncounted.
        metrics = metric_samples(server)
        assert metrics.get('ais_sessions_total{reason="client_too_slow"}') == 1, metrics
        assert metrics.get('ais_error_events_total{code="client_too_slow"}') == 1
        assert 'ais_sessions_total{reason="disconnected"}' not in metrics
        # Freed by reference counting: no cycle keeps the closed connection's outbox and items in memory.
        assert wait_until(lambda: all(ref() is None for ref in objects)), [type(r()).__name__ for r in objects if r()]
        with server.connect("/v1/realtime") as ws:  # the server serves the next client
            assert recv_event_type(ws) == "session.created"
    finally:
        server.stop()


def recv_event_type(ws) -> str:
    return json.loads(ws.recv(timeout=10))["type"]


@pytest.mark.parametrize("path", ["/v1/stream", "/v1/realtime"])
def test_a_connection_closed_by_its_client_is_freed_without_the_cyclic_gc(tiny_checkpoint, no_cyclic_gc, path):
    server = LiveServer(server_config(tiny_checkpoint)).start()
    try:
        with server.connect(path) as ws:
            first = json.loads(ws.recv(timeout=10))
            assert first["type"] == "session.created"
            objects = connection_objects(server)
        assert wait_until(lambda: not server.runtime.streams), "the session was not released"
        assert wait_until(lambda: all(ref() is None for ref in objects)), [type(r()).__name__ for r in objects if r()]
    finally:
        server.stop()



def test_a_replay_is_queued_whole_whatever_the_bound():
    """A resume's replay is held in the session's log already; queued past the outbox's bound in events, the rest of
    it was dropped without a word (the client saw a gap in seq and no error)."""
    outbox = Outbox(websocket=None, max_events=3, max_bytes=MAX_QUEUED_BYTES)
    replay = [end(turn).model_copy(update={"seq": turn + 1}) for turn in range(5)]
    assert outbox.put(replay, bounded=False)
    assert [event.seq for event in outbox.queued_events()] == [1, 2, 3, 4, 5]
    assert not outbox.put([end(5)]), "live events behind it are held to the bound again"


def test_a_whole_replay_fits_the_queue_bounds():
    """A resume replays up to resume_max_events / resume_max_bytes; a queue bound below them (max_queued_events
    100, the lowest allowed, against 2,000 kept events) cut every long replay short."""
    from audio_interaction_server.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="resume_max_events"):
        load_config(None, {"AIS_MAX_QUEUED_EVENTS": "100"})
    with pytest.raises(ConfigError, match="resume_max_bytes"):
        load_config(None, {"AIS_MAX_QUEUED_BYTES": str(1024 * 1024)})
    assert load_config(None, {"AIS_MAX_QUEUED_EVENTS": "100", "AIS_RESUME_MAX_EVENTS": "100"}).max_queued_events == 100
    assert load_config(None, {"AIS_MAX_QUEUED_EVENTS": "100", "AIS_RESUME_GRACE_S": "0"}).max_queued_events == 100
