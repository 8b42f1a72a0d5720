"""One session must not slow another down beyond its share: the worker's step order, the
event loop's per-frame work (real tiny model, real sessions, no sockets)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from websockets.frames import Frame, Opcode

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.events import Decision, SessionStarted
from audio_interaction_server.api.connection import StreamConnection
from audio_interaction_server.api.session import ModelInfo, Session
from audio_interaction_server.config import ServerConfig
from audio_interaction_server.engine.worker import Worker
from benchmarks.frame_parsing import open_protocol

OPTIONS = SessionOptions(max_turn_tokens=6)


def test_a_short_row_is_emitted_before_a_neighbours_long_row_runs(tiny_model, stream_chunks, monkeypatch):
    """A newcomer's first row (the whole system prompt, one not kept yet) or a context rollover (a history of
    audio re-encoded) is a long batch of its own; a listening session in the same step gets its decision
    as soon as its short batch is done, not after the long one."""
    log: list[tuple[str, str]] = []
    real_last_hidden = tiny_model.lm.last_hidden

    def recording_last_hidden(batch, cache):
        log.append(("forward", ""))
        return real_last_hidden(batch, cache)

    monkeypatch.setattr(tiny_model.lm, "last_hidden", recording_last_hidden)
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))

    def emit_for(session_id: str):
        return lambda events: log.extend(("decision", session_id) for e in events if isinstance(e, Decision))

    chunks = stream_chunks[0]
    worker.open_session("listener", OPTIONS, emit_for("listener"))
    worker.push_audio("listener", chunks[:1])
    worker.run_until_idle()  # the listener's own long first row is behind it
    log.clear()
    worker.push_audio("listener", chunks[1:2])
    own_prompt = SessionOptions(max_turn_tokens=6, system_prompt="A prompt of its own, fed with its first block.")
    worker.open_session("newcomer", own_prompt, emit_for("newcomer"))
    worker.push_audio("newcomer", chunks[:1])
    stats = worker.step()
    assert stats is not None and stats.num_rows == 2 and stats.num_decisions == 2
    assert log == [("forward", ""), ("decision", "listener"), ("forward", ""), ("decision", "newcomer")], log


class BufferedSocket:
    """The app side of a WebSocket as uvicorn presents it: frames already read from the network wait
    in an asyncio.Queue, so ``receive()`` returns at once, without yielding, while any are left."""

    def __init__(self, name: str, frames: list[bytes], received: list[str]) -> None:
        self.name = name
        self.application_state = None
        self.scope: dict = {}  # no ASGI server's extensions: every message comes through receive()
        self._frames: asyncio.Queue = asyncio.Queue()
        for frame in frames:
            self._frames.put_nowait({"type": "websocket.receive", "bytes": frame})
        self._received = received
        self.sent: list[str] = []

    async def receive(self) -> dict:
        message = await self._frames.get()
        self._received.append(self.name)
        return message

    async def send_text(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, code: int) -> None:
        pass


class TransportSocket(BufferedSocket):
    """The app side of the server's own WebSocket protocol (api/websocket_guard.py, after a real handshake) whose client
    has sent ``frames`` in one read: they all wait in its queue when the connection starts."""

    @classmethod
    async def open(cls, name: str, frames: list[bytes], received: list[str]) -> TransportSocket:
        socket = cls(name, [], received)
        socket.protocol, _ = await open_protocol(fast_path=True)
        socket.scope = socket.protocol.scope  # the transport's extensions, as the app sees them
        socket.protocol.data_received(b"".join(Frame(Opcode.BINARY, frame).serialize(mask=True) for frame in frames))
        return socket

    async def receive(self) -> dict:
        message = await self.protocol.receive()
        self._received.append(self.name)
        return message


def stream_connector(tiny_model):
    """``connect(socket)``: a real ``StreamConnection`` + ``Session`` over a not-started worker (pushes just queue)."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    config = ServerConfig(engine={"max_sessions": 2})
    model = ModelInfo(tiny_model.name, False, tiny_model.tokenizer)

    def connect(socket: BufferedSocket) -> StreamConnection:
        def make_session(emit):
            return Session(socket.name, config, model, worker, emit, time.monotonic())
        return StreamConnection(socket, make_session, 10_000, 1.0, on_closed=lambda reason: None)

    return connect


async def run_beside(flooder: StreamConnection, neighbour: StreamConnection, is_done) -> None:
    """Run the flooder, then (one loop turn later) its neighbour, until ``is_done()``; then stop both."""
    flooding = asyncio.create_task(flooder.run())
    await asyncio.sleep(0)  # the flood is under way
    neighbouring = asyncio.create_task(neighbour.run())
    while not is_done():
        await asyncio.sleep(0.01)
    for task in (flooding, neighbouring):
        task.cancel()
    await asyncio.gather(flooding, neighbouring, return_exceptions=True)


def test_a_flooding_connection_yields_the_event_loop_after_every_frame(tiny_model):
    """Frames a flooding client has already delivered are handled one per loop turn: a neighbour's
    frame that arrives meanwhile waits for one frame of the flood, not for all of it. The turn is the
    transport's (its receive yields while messages wait), under the real receive loop of a session."""
    connect = stream_connector(tiny_model)
    received: list[str] = []
    flood_frames = [np.zeros(1600, "<i2").tobytes()] * 200

    async def main() -> None:
        flooder = connect(await TransportSocket.open("flooder", flood_frames, received))
        neighbour = connect(await TransportSocket.open("neighbour", [np.zeros(1600, "<i2").tobytes()], received))
        await run_beside(flooder, neighbour,
                         lambda: "neighbour" in received and received.count("flooder") >= len(flood_frames))

    asyncio.run(main())
    assert received.index("neighbour") <= 5, f"the neighbour's frame waited for {received.index('neighbour')} frames"


def test_a_session_far_ahead_of_real_time_is_paced_after_its_burst(tiny_model, stream_chunks):
    """A client that sends audio far faster than real time (accepted up to the buffer limit) gets its
    catch-up burst at full speed, then rows at ``max_catch_up_speed`` x real time, so it cannot keep
    the worker (and the CPU) busy for everybody else; a neighbour in real time is never paced."""
    now = [100.0]
    config = EngineConfig(max_sessions=2, max_catch_up_speed=4.0, catch_up_burst_s=2.0)
    worker = Worker(tiny_model, config)
    worker.clock = lambda: now[0]
    decided = {"flooder": 0, "neighbour": 0}
    heard: list = []  # the flooder's events, to compare with an unpaced run

    def count(session_id: str):
        def emit(events):
            decided[session_id] += sum(isinstance(e, Decision) for e in events)
            if session_id == "flooder":
                heard.extend(e for e in events if not isinstance(e, SessionStarted))
        return emit

    flood = torch.cat([chunks for chunks in stream_chunks[:3]])  # over 20 chunks (8 s), sent at once
    assert len(flood) > 20
    def step_until_idle() -> None:  # what the worker thread does; run_until_idle (offline) is never paced
        while worker.step() is not None:
            pass

    worker.open_session("flooder", OPTIONS, count("flooder"))
    worker.push_audio("flooder", flood)
    step_until_idle()
    assert decided["flooder"] == 5, "the burst: 2 s of audio = 5 chunks at full speed"
    worker.open_session("neighbour", OPTIONS, count("neighbour"))
    worker.push_audio("neighbour", stream_chunks[3][:3])
    for _ in range(10):  # 1 s at 4x real time: one 0.4 s chunk every 0.1 s
        now[0] += 0.1
        step_until_idle()
    assert decided == {"flooder": 15, "neighbour": 3}
    now[0] += 10.0
    step_until_idle()
    assert decided["flooder"] == 20, "10 idle seconds refill the bucket to the burst (5 chunks), not more"
    worker.run_until_idle()  # the offline runner hears everything queued at once
    assert decided["flooder"] == len(flood)
    unpaced: list = []  # pacing changes when the backlog is heard, never what the model makes of it
    alone = Worker(tiny_model, EngineConfig(max_sessions=2, max_catch_up_speed=None))
    alone.open_session("flooder", OPTIONS, lambda events: unpaced.extend(
        e for e in events if not isinstance(e, SessionStarted)))
    alone.push_audio("flooder", flood)
    while alone.step() is not None:
        pass
    assert heard == unpaced


def test_a_connection_with_many_queued_events_yields_the_event_loop_after_every_send(tiny_model):
    """Sends that do not block do not yield: a connection with a long outbox (a flood of error events
    it provoked) sends one event per loop turn, so a neighbour's frame is not held behind all of them."""
    connect = stream_connector(tiny_model)
    order: list[str] = []

    class RecordingSocket(BufferedSocket):
        async def send_text(self, text: str) -> None:
            order.append(f"sent:{self.name}")

    async def main() -> None:
        flooder = connect(RecordingSocket("flooder", [], order))
        bad_json = flooder.codec.decode("{")[0]
        flooder.deliver(flooder.session.handle(bad_json, time.monotonic()) * 500)  # 500 queued error events
        neighbour = connect(RecordingSocket("neighbour", [np.zeros(1600, "<i2").tobytes()], order))
        await run_beside(flooder, neighbour, lambda: "neighbour" in order and order.count("sent:flooder") >= 501)

    asyncio.run(main())
    assert order.index("neighbour") <= 10, f"the neighbour's frame waited for {order.index('neighbour')} sends"


def flood_one_connection(tiny_model, frames: list[str], config: ServerConfig) -> tuple[BufferedSocket, list[str],
                                                                                      list[str]]:
    """``frames`` queued on one connection of a real session, run for 50 loop turns: (its socket, the frames the
    connection took from it, the frames its codec decoded)."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    model = ModelInfo(tiny_model.name, False, tiny_model.tokenizer)
    received: list[str] = []
    socket = BufferedSocket("flooder", [], received)
    for frame in frames:
        socket._frames.put_nowait({"type": "websocket.receive", "text": frame})
    decoded: list[str] = []

    async def main() -> None:
        connection = StreamConnection(
            socket, lambda emit: Session("flooder", config, model, worker, emit, time.monotonic()), 10_000, 1.0,
            on_closed=lambda reason: None)
        decode = connection.codec.decode
        connection.codec.decode = lambda payload: decoded.append(payload) or decode(payload)
        task = asyncio.create_task(connection.run())
        for _ in range(50):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    return socket, received, decoded


def test_a_connection_cut_for_a_flood_reads_nothing_more(tiny_model):
    """After the session is cut (here for an event flood), the connection stops taking frames from the socket
    (uvicorn then stops reading it): what the client goes on sending is not parsed, let alone decoded."""
    config = ServerConfig(engine={"max_sessions": 2}, flood={"event_burst": 5, "events_per_s": 1.0})
    socket, received, _ = flood_one_connection(tiny_model, ['{"type": "input.clear"}'] * 100, config)
    assert any('"event_flood"' in text for text in socket.sent)
    assert len(received) <= 8, f"{len(received)} frames taken after the cut at the 6th"


@pytest.mark.parametrize("frame", [
    # a /v1/stream event with thousands of unknown keys (~60 ms of the loop each to parse and validate)
    '{"type": "session.configure", ' + ", ".join(f'"k{i}": 0' for i in range(21_000)) + "}",
    # an event with a huge array in a field the codec ignores
    '{"type": "input.clear", "junk": [' + ",".join("0" for _ in range(80_000)) + "]}",
])
def test_events_heavy_in_json_items_spend_the_event_budget_by_their_size_before_they_are_parsed(tiny_model, frame):
    """The event budget counted events, not their cost, and a frame was parsed whole before it was counted: ~8 such
    frames a second (under half the rate) made a neighbour's decisions 9 s late (hostile probe, 2026-12-06). A frame
    now spends a token per 256 of its JSON items (commas and colons, counted without parsing) first."""
    socket, _, decoded = flood_one_connection(tiny_model, [frame] * 20, ServerConfig(engine={"max_sessions": 2}))
    assert any('"event_flood"' in text for text in socket.sent)
    assert len(decoded) <= 2, f"{len(decoded)} heavy frames parsed"
