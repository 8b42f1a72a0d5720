"""When the server's WebSocket protocol stops reading a client (api/websocket_guard.py, ``GuardedWebSocketProtocol``).

uvicorn's protocol pauses the socket for every message it hands the app and resumes it when the app takes the
message: two epoll changes per audio frame, about a tenth of the event loop's time at 48 real-time streams
(docs/performance.md, "Host cost per stream"). Reading should pause only for a backlog, the flow control a
client that sends faster than the app reads needs. These tests run the guarded protocol class on a real
loopback socket under a small ASGI app and a real ``websockets`` client, and count the pauses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import uvicorn
from uvicorn.server import ServerState
from websockets.sync.client import connect

from audio_interaction_server.api.transport import uvicorn_options
from audio_interaction_server.api.transport_guard import TransportGuard
from audio_interaction_server.api.websocket_guard import PAUSE_READING_QUEUED_BYTES
from audio_interaction_server.config import TransportSettings


class CountingTransport:
    """The protocol's transport, with its read pauses counted."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.num_pauses = 0
        self.num_resumes = 0

    def pause_reading(self) -> None:
        self.num_pauses += 1
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self.num_resumes += 1
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EchoLengths:
    """ASGI app: accepts, then for each message answers its length as text, once ``reading`` is set."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.reading.set()

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            while not self.reading.is_set():
                await asyncio.sleep(0.005)
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": str(len(message["bytes"]))})


class GuardedServer:
    """The guarded WebSocket protocol listening on loopback, on an event loop of its own thread."""

    def __init__(self) -> None:
        self.app = EchoLengths()
        guard = TransportGuard(TransportSettings())
        base = uvicorn_options(guard)["ws"]
        self.protocols: list[Any] = []
        server = self

        class Counted(base):  # type: ignore[misc, valid-type]
            num_reads_while_paused = 0

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(CountingTransport(transport))
                server.protocols.append(self)

            def data_received(self, data: bytes) -> None:
                self.num_reads_while_paused += self.read_paused
                super().data_received(data)

        config = uvicorn.Config(self.app, ws=Counted, log_level="warning")
        config.load()
        self.state = state = ServerState()
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        thread.start()
        listening = asyncio.run_coroutine_threadsafe(self.loop.create_server(
            lambda: Counted(config, state, {}, _loop=self.loop), "127.0.0.1", 0), self.loop).result(5)
        self.port = listening.sockets[0].getsockname()[1]
        self._listening = listening

    def counts(self) -> tuple[int, int]:
        """(pauses, resumes) of the one connection."""
        transport = self.protocols[0].transport._transport  # under the guard's close-deadline wrapper
        return transport.num_pauses, transport.num_resumes

    def close(self) -> None:
        self.app.reading.set()
        deadline = time.monotonic() + 5  # the app tasks of closed connections end before the loop stops
        while self.state.tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        self.loop.call_soon_threadsafe(self._listening.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_a_client_at_real_time_pace_is_never_paused():
    server = GuardedServer()
    try:
        with connect(f"ws://127.0.0.1:{server.port}/") as client:
            for index in range(20):  # one frame in flight at a time, as a real-time microphone sends
                client.send(bytes(3200 + index))
                assert client.recv(timeout=5) == str(3200 + index)
        assert server.counts() == (0, 0)
    finally:
        server.close()


def test_a_backlog_pauses_reading_until_the_app_takes_it_and_no_frame_is_lost():
    server = GuardedServer()
    try:
        with connect(f"ws://127.0.0.1:{server.port}/", max_queue=None) as client:
            server.app.reading.clear()  # the app stops taking messages; the client goes on sending
            num_frames = 8 * PAUSE_READING_QUEUED_BYTES // 1000
            # Sent from a thread: once reading pauses, the sends block when the kernel's buffers are full.
            sender = threading.Thread(target=lambda: [client.send(bytes(1000 + index % 7))
                                                      for index in range(num_frames)])
            sender.start()
            protocol = server.protocols[0]
            deadline = time.monotonic() + 5
            while not protocol.read_paused and time.monotonic() < deadline:
                time.sleep(0.01)
            assert protocol.read_paused, "a backlog the app does not take must pause reading"
            time.sleep(0.2)  # the sender goes on meanwhile
            assert protocol.read_paused and protocol.num_reads_while_paused == 0
            server.app.reading.set()
            answers = [client.recv(timeout=5) for _ in range(num_frames)]
            assert answers == [str(1000 + index % 7) for index in range(num_frames)]
            sender.join(timeout=5)
        pauses, resumes = server.counts()
        assert pauses >= 1 and resumes >= 1
    finally:
        server.close()
