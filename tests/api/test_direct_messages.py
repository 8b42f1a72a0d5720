"""Messages taken in the transport's callback (api/websocket_guard.py, ``take_messages_with``; api/connection.py), and
events written in the caller's turn (``send_text_now``; ``Outbox.put``).

While a session's receive loop waits, a whole data message is handed to it as it is read, without the queue and
the task wake-up. What must hold: the app sees every message once and in order, whatever mix of direct and
queued; a flood read at once still goes one message per loop turn; control frames and fragments never reach
the handler; a handler's failure closes only its own connection (1011) and tells the app. On the way out, an
event goes at once only with nothing queued or in flight before it, numbered as the send loop would number it,
and never on a connection that cannot take it (closing, or its peer not reading). The protocol cases
run the server's own protocol after a real handshake (``benchmarks.frame_parsing.open_protocol``); the last
case runs a real server and session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np
import pytest
from websockets.frames import Frame, Opcode
from starlette.websockets import WebSocket, WebSocketState
from websockets.sync.client import connect

from audio_interaction_server.api.outbox import Outbox
from audio_interaction_server.api.replay_log import ReplayLog
from audio_interaction_server.api.websocket_guard import direct_messages
from audio_interaction_server.protocol import DecisionEvent, TextDeltaEvent
from benchmarks.frame_parsing import open_protocol
from benchmarks.harness import LiveServer
from tests.api.test_app import API_KEY, recv_event, send_configure, server_config
from tests.api.test_transport import TEXT, close_code, open_websocket, read_until_closed, server_frames
from tests.api.test_transport import client_frame as tcp_client_frame


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def audio(index: int) -> bytes:
    return client_frame(Opcode.BINARY, bytes([index]) * 3200)


class Handler:
    """The app's side: records what it took; ``refuse`` makes it hand messages back to the queue."""

    def __init__(self, refuse: bool = False) -> None:
        self.taken: list[bytes] = []
        self.refuse = refuse

    def __call__(self, message: dict) -> bool:
        if self.refuse:
            return False
        self.taken.append(message["bytes"])
        return True


def queued(protocol) -> list[bytes | str]:
    messages = []
    while not protocol.queue.empty():
        message = protocol.queue.get_nowait()
        messages.append(message.get("bytes", message.get("text")))
    return messages


async def with_protocol(body) -> None:
    """``body(protocol, transport, take_with)`` on the server's protocol after a handshake the app accepted."""
    protocol, transport = await open_protocol(fast_path=True)
    try:
        await body(protocol, transport, direct_messages(protocol).take_with)
    finally:
        for task in list(protocol.tasks):
            task.cancel()
        await asyncio.gather(*protocol.tasks, return_exceptions=True)


def test_a_message_read_alone_goes_to_the_handler_and_none_is_queued():
    async def body(protocol, transport, take_with) -> None:
        handler = Handler()
        take_with(handler)
        for index in range(5):
            protocol.data_received(audio(index))
        assert handler.taken == [bytes([index]) * 3200 for index in range(5)]
        assert queued(protocol) == [] and protocol.num_direct_messages == 5

    asyncio.run(with_protocol(body))


def test_of_messages_read_together_one_goes_to_the_handler_and_the_rest_queue_in_order():
    """Fairness and order: one message per read is taken in the callback; once any wait in the queue, later
    ones queue behind them (the app's receive takes them one per loop turn) until the queue is empty again."""
    async def body(protocol, transport, take_with) -> None:
        handler = Handler()
        take_with(handler)
        protocol.data_received(audio(0) + audio(1) + audio(2))
        protocol.data_received(audio(3))  # the queue is not empty: behind 1 and 2, not before them
        assert handler.taken == [bytes([0]) * 3200]
        assert queued(protocol) == [bytes([index]) * 3200 for index in (1, 2, 3)]
        protocol.data_received(audio(4))  # the queue is empty again
        assert handler.taken[-1] == bytes([4]) * 3200 and queued(protocol) == []

    asyncio.run(with_protocol(body))


def test_control_frames_and_fragments_never_reach_the_handler():
    async def body(protocol, transport, take_with) -> None:
        handler = Handler()
        take_with(handler)
        transport.written.clear()
        protocol.data_received(client_frame(Opcode.PING, b"p"))
        assert transport.written, "the ping was answered"
        protocol.data_received(client_frame(Opcode.BINARY, b"ab", fin=False))
        protocol.data_received(client_frame(Opcode.CONT, b"cd"))
        protocol.data_received(audio(7))  # behind the reassembled message in the queue
        assert handler.taken == [] and queued(protocol) == [b"abcd", bytes([7]) * 3200]

    asyncio.run(with_protocol(body))


def test_a_message_the_handler_refuses_and_any_after_it_unregisters_are_queued():
    async def body(protocol, transport, take_with) -> None:
        take_with(Handler(refuse=True))  # a socket that is closing takes nothing more (StreamConnection)
        protocol.data_received(audio(0))
        assert queued(protocol) == [bytes([0]) * 3200] and protocol.num_direct_messages == 0
        handler = Handler()
        take_with(handler)
        take_with(None)  # the receive loop ended
        protocol.data_received(audio(1))
        assert handler.taken == [] and queued(protocol) == [bytes([1]) * 3200]

    asyncio.run(with_protocol(body))


def test_a_failing_handler_closes_its_connection_with_1011_and_the_app_sees_the_disconnect():
    async def body(protocol, transport, take_with) -> None:
        taken = []

        def failing(message: dict) -> bool:
            taken.append(message)
            raise RuntimeError("a bug in the session")

        take_with(failing)
        transport.written.clear()
        logged: list[logging.LogRecord] = []
        recorder = logging.Handler()
        recorder.emit = logged.append
        protocol.logger.addHandler(recorder)  # uvicorn's own logger: it does not propagate to pytest's
        protocol.logger.setLevel(logging.ERROR)
        protocol.data_received(audio(0))
        protocol.data_received(audio(1))  # after the close: neither the handler nor the queue
        protocol.logger.removeHandler(recorder)
        assert len(taken) == 1 and transport.closed
        assert close_code(server_frames(bytes(transport.written))) == 1011
        assert protocol.queue.get_nowait() == {"type": "websocket.disconnect", "code": 1011,
                                               "reason": "internal error"}
        assert protocol.queue.empty()
        assert [str(record.exc_info[1]) for record in logged] == ["a bug in the session"]

    asyncio.run(with_protocol(body))


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint)).start()
    yield server
    server.stop()


def test_a_live_session_takes_its_audio_in_the_transports_callback(live):
    """A real session over the real server: every chunk is decided, and the frames were taken directly."""
    protocols = live.server.config.ws_protocol_class.transport_guard.open_connections
    with connect(f"{live.ws_url}/v1/stream", additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        assert recv_event(ws)["type"] == "session.created"
        assert send_configure(ws, decision_events=True)["type"] == "session.updated"
        frame = (np.sin(np.arange(1600) / 7.0) * 3000).astype("<i2").tobytes()  # 100 ms of 16 kHz s16
        for _ in range(12):  # 1.2 s: 3 chunks
            ws.send(frame)
            time.sleep(0.02)  # a frame per read, as from a real-time client
        ws.send('{"type": "input.flush", "trailing_silence_s": 0}')
        decided = 0
        while decided < 3:
            event = recv_event(ws)
            decided += event["type"] == "decision"
        assert sum(protocol.num_direct_messages for protocol in protocols) >= 12
        assert sum(protocol.num_texts_sent_now for protocol in protocols) >= 3  # the decisions at least


@pytest.mark.parametrize("queued", [False, True], ids=["taken_directly", "queued"])
def test_a_message_the_session_fails_on_ends_that_session_with_an_error_and_1011_and_no_other(live, monkeypatch,
                                                                                              queued):
    """An exception where a client's message is decoded or handled (a bug, as the Realtime codec's crashes on a
    4,301-digit number or a lone surrogate were) ends that session: an ``internal_error`` event, its
    ``session.closed``, close 1011, one traceback in the log. Taken in the transport's callback or from the queue
    (a frame read together with another), the same: before, the queued one tore the connection down without a close
    frame, and the direct one closed without a word."""
    from audio_interaction_server.api.native import NativeCodec

    decode = NativeCodec.decode

    def failing_decode(self, message):
        if message == "boom":
            raise RuntimeError("a bug in a codec")
        return decode(self, message)

    monkeypatch.setattr(NativeCodec, "decode", failing_decode)
    with connect(f"{live.ws_url}/v1/stream", additional_headers={"Authorization": f"Bearer {API_KEY}"}) as bystander:
        assert recv_event(bystander)["type"] == "session.created"
        sock, rest = open_websocket(live.port)
        try:
            configure = tcp_client_frame(TEXT, json.dumps({"type": "session.configure"}).encode())
            boom = tcp_client_frame(TEXT, b"boom")
            # Two frames in one write are read together: the first is taken directly, the second queued.
            sock.sendall(configure + boom if queued else boom)
            data, closed = read_until_closed(sock, 10.0)
        finally:
            sock.close()
        frames = server_frames(rest + data)
        events = [json.loads(payload) for opcode, payload in frames if opcode == TEXT]
        assert closed and close_code(frames) == 1011, events
        errors = [event for event in events if event["type"] == "error"]
        assert [(error["code"], error["is_fatal"]) for error in errors] == [("internal_error", True)], events
        assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "internal_error"
        assert send_configure(bystander)["type"] == "session.updated"  # the other session goes on


# ---- the send side: events written in the caller's turn when nothing waits before them ----------------------

def decision(chunk: int) -> DecisionEvent:
    return DecisionEvent(session_id="s", chunk=chunk, token_id=1, decision="keep_silence",
                         audio_time_s=0.4 * (chunk + 1))


def sent_texts(transport) -> list[dict]:
    return [json.loads(payload) for opcode, payload in server_frames(bytes(transport.written)) if opcode == 1]


def accepted_websocket(protocol) -> WebSocket:
    """The app's starlette WebSocket over the protocol, in the state the accepting app left it."""
    websocket = WebSocket(protocol.scope, protocol.receive, protocol.send)
    websocket.client_state = websocket.application_state = WebSocketState.CONNECTED
    return websocket


def test_events_with_nothing_queued_before_them_are_written_at_once_numbered_in_order():
    """Written in the caller's turn while the peer reads; once it does not (the transport paused writing), they
    queue and the send loop writes them when it may, in order, and later events wait behind them."""
    async def body(protocol, transport, take_with) -> None:
        log = ReplayLog(100, 10**6)
        outbox = Outbox(accepted_websocket(protocol), 100, 10**6, log=log, keeps_sent=True)
        sending = asyncio.create_task(outbox.send_loop())
        transport.written.clear()
        outbox.put([decision(0), decision(1)])
        assert [event["seq"] for event in sent_texts(transport)] == [1, 2] and len(outbox) == 0
        protocol.pause_writing()  # the peer stopped reading
        outbox.put([decision(2)])
        assert len(outbox) == 1 and len(sent_texts(transport)) == 2, "queued, not numbered, not written"
        for _ in range(5):
            await asyncio.sleep(0)  # the send loop takes it and waits for the transport
        assert len(outbox) == 0 and len(sent_texts(transport)) == 2
        protocol.resume_writing()
        outbox.put([decision(3)])  # the send loop still holds chunk 2: behind it, not at once
        assert len(outbox) == 1
        for _ in range(20):
            await asyncio.sleep(0)
        events = sent_texts(transport)
        assert [(event["chunk"], event["seq"]) for event in events] == [(0, 1), (1, 2), (2, 3), (3, 4)]
        assert outbox.num_sent_now == 2 and protocol.num_texts_sent_now == 2
        outbox.put([decision(4)])  # the queue is empty again
        assert outbox.num_sent_now == 3 and sent_texts(transport)[-1]["seq"] == 5
        sending.cancel()

    asyncio.run(with_protocol(body))


def test_the_resume_log_counts_an_event_written_at_once_as_the_text_written():
    """An event written at once is serialised once: the resume log keeps it counted as the text that went out
    (a text delta included, which the outbox's own estimate would count otherwise), not serialised again."""
    async def body(protocol, transport, take_with) -> None:
        log = ReplayLog(100, 10**6)
        outbox = Outbox(accepted_websocket(protocol), 100, 10**6, log=log, keeps_sent=True)
        transport.written.clear()
        outbox.put([decision(0), TextDeltaEvent(session_id="s", turn=0, text="héllo, wörld"), decision(1)])
        texts = [payload for opcode, payload in server_frames(bytes(transport.written)) if opcode == 1]
        assert outbox.num_sent_now == 3 and len(texts) == 3
        assert log.num_bytes == sum(len(text.decode()) for text in texts)

    asyncio.run(with_protocol(body))


def test_nothing_is_written_at_once_on_a_closing_connection():
    async def body(protocol, transport, take_with) -> None:
        made = []
        protocol.conn.send_close(1000)  # the app's close went out
        protocol.close_sent = True
        assert not protocol.send_text_now(lambda: made.append(1) or ["x"]) and made == []

    asyncio.run(with_protocol(body))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70_000])
def test_a_text_written_at_once_is_framed_as_websockets_frames_it(size):
    """``send_text_now`` frames text itself (one FIN text frame, unmasked, as a server sends): the bytes are
    websockets' own serialisation of the same message, at every length-field boundary, multi-byte text too."""
    text = ("é" * size)[: max(0, size // 2)] + "x" * (size - max(0, size // 2) * 2)  # ``size`` bytes of UTF-8

    async def body(protocol, transport, take_with) -> None:
        transport.written.clear()
        assert protocol.send_text_now(lambda: [text, "{}"])
        expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False) + Frame(Opcode.TEXT, b"{}").serialize(
            mask=False)
        assert len(text.encode()) == size and bytes(transport.written) == expected

    asyncio.run(with_protocol(body))


def test_a_text_written_at_once_goes_after_what_the_protocol_already_holds():
    """A pong websockets queued (answering a ping read in the same turn) is written before the text."""
    async def body(protocol, transport, take_with) -> None:
        protocol.conn.send_pong(b"beat")  # held by the protocol, not yet written
        transport.written.clear()
        assert protocol.send_text_now(lambda: ["{}"])
        assert bytes(transport.written) == (Frame(Opcode.PONG, b"beat").serialize(mask=False)
                                            + Frame(Opcode.TEXT, b"{}").serialize(mask=False))

    asyncio.run(with_protocol(body))
