"""What a stream's paths through a front cost its event loop's thread: posting a chunk, writing an event, and
a chunk's whole cycle through its session.

    python -m benchmarks.front_paths [--count 4000] [--rounds 5] [--against OTHER_CHECKOUT/server]

* **push**: one 0.4 s chunk's ``PaddedBlocks`` through ``EngineProcessClient.push_audio``, as a front posts it
  to its engine process (from a thread with no loop turns, so it is sent at once), to a ROUTER socket standing
  in for the engine; the posting thread's CPU time per push (``time.thread_time``), paced by a short sleep
  between pushes so the receiver keeps up, as at real time.
* **event**: the engine's ``Decision`` for a chunk rendered by the session's ``ReplyPresenter`` (decision
  events on) and the ``decision`` event through ``Outbox.put`` with nothing queued before it, as a
  ``/v1/stream`` session sends it (the resume log keeps it), written at once on the server's own WebSocket
  protocol after a real handshake (``benchmarks.frame_parsing.open_protocol``); wall time per event, a hot loop.
* **chunk**: a 0.4 s chunk's whole cycle through a ``/v1/stream`` session as the front runs it, sockets aside:
  four 100 ms 16 kHz s16 frames decoded by the native codec and handled by the ``Session`` (the audio chain
  cuts the chunk and posts it through ``EngineProcessClient`` to the stand-in engine), then the engine's
  ``Decision`` for it through the session (decision events on) into the outbox as in **event**; the thread's
  CPU time per chunk, paced as **push**.

Prints the best of ``--rounds`` rounds of ``--count`` each. Hot loops on one core: a path's own cost, not what
it costs a busy server (``benchmarks.host_cost`` measures that).

Side by side: ``--against`` names another checkout's ``server`` folder (``git worktree add /tmp/base <commit>``
then ``--against /tmp/base/server``); rounds then alternate between the trees in fresh interpreters
(``benchmarks.side_by_side``), and the table gains the other tree's column and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from starlette.websockets import WebSocket, WebSocketState

from audio_interaction_server import spec as T
from audio_interaction_server.api.outbox import Outbox
from audio_interaction_server.api.replay_log import ReplayLog
from audio_interaction_server.api.native import NativeCodec
from audio_interaction_server.api.session import ModelInfo, Session
from audio_interaction_server.config import ServerConfig
from audio_interaction_server.engine.events import Decision
from audio_interaction_server.engine.process_client import EngineProcessClient
from audio_interaction_server.engine.wire import EngineEndpoints
from audio_interaction_server.render.presenter import ReplyPresenter
from benchmarks import side_by_side

try:
    from audio_interaction_server.audio.blocks import PaddedBlocks
except ImportError:  # --against a tree from before audio/frontend.py was split into pcm, blocks, mel...
    from audio_interaction_server.audio.frontend import PaddedBlocks  # type: ignore[no-redef]

PUSH_PAUSE_S = 0.0002  # between pushes: the receiver keeps up, so no send meets a backlog


def push_seconds(count: int) -> float:
    """The posting thread's CPU seconds per chunk pushed through ``EngineProcessClient.push_audio``."""
    with tempfile.TemporaryDirectory() as directory:
        engine = StandInEngine(directory, count)
        client = EngineProcessClient(engine.endpoints)  # connects; no engine process, no reader: only what a push does
        # A chunk's padded block, as a stream's block cutter makes it (of silence: what it holds costs nothing here).
        blocks = np.zeros((1, T.CHUNK_SAMPLES + 240), dtype=np.float32)  # (1, 6640)
        cpu_s = 0.0
        for index in range(count):
            chunk = PaddedBlocks(blocks, index)
            started = time.thread_time()
            client.push_audio(f"s{index % 240}", chunk)
            cpu_s += time.thread_time() - started
            time.sleep(PUSH_PAUSE_S)
        engine.close(client)
    return cpu_s / count


class StandInEngine:
    """A ROUTER socket where the engine process's would be, and a thread that receives ``count`` messages."""

    def __init__(self, directory: str, count: int) -> None:
        self.endpoints = EngineEndpoints.in_directory(Path(directory))
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.bind(self.endpoints.commands)
        self.count, self.received = count, 0
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        while self.received < self.count:
            self._socket.recv_multipart(copy=False)
            self.received += 1

    def close(self, client: EngineProcessClient) -> None:
        self._receiver.join(30.0)
        assert self.received == self.count, f"the stand-in engine received {self.received} of {self.count}"
        client.stop()  # leaves the stand-in engine a goodbye, and closes the client's sockets
        self._socket.close(linger=0)
        self._context.term()


async def chunk_seconds(count: int) -> float:
    """The thread's CPU seconds per chunk cycle: four frames in through the session, a push, a decision out."""
    with tempfile.TemporaryDirectory() as directory:
        engine = StandInEngine(directory, count + 1)  # the session's open, then a push per chunk
        client = EngineProcessClient(engine.endpoints)
        websocket, protocol = await accepted_websocket()
        outbox = outbox_with_log(websocket)
        config = ServerConfig(decision_events=True)
        session = Session("s", config, ModelInfo("demo", True, None), client, lambda events: None,
                          time.monotonic())
        codec = NativeCodec(config.max_frame_bytes)
        frame = np.zeros(T.CHUNK_SAMPLES // 4, dtype=np.int16).tobytes()  # 100 ms; what it holds costs nothing
        # One frame ahead: then each cycle's fourth frame brings the look-ahead that completes its chunk.
        outbox.put(session.handle(codec.decode(frame)[0], time.monotonic()))
        cpu_s = 0.0
        for index in range(count):
            started = time.thread_time()
            for _ in range(4):
                now_s = time.monotonic()
                for command in codec.decode(frame):
                    outbox.put(session.handle(command, now_s))
            outbox.put(session.on_engine_events([Decision(index, T.KEEP_SILENCE)], time.monotonic()))
            cpu_s += time.thread_time() - started
            time.sleep(PUSH_PAUSE_S)
        assert session.num_chunks_pending == 0 and len(outbox) == 0, "every chunk pushed, decided and sent"
        await close_protocol(protocol)
        engine.close(client)
    return cpu_s / count


async def accepted_websocket() -> tuple[WebSocket, object]:
    """The app's WebSocket over the server's own protocol after a real handshake."""
    from benchmarks.frame_parsing import open_protocol

    protocol, transport = await open_protocol(fast_path=True)
    websocket = WebSocket(protocol.scope, protocol.receive, protocol.send)
    websocket.client_state = websocket.application_state = WebSocketState.CONNECTED
    return websocket, protocol


async def close_protocol(protocol) -> None:
    for task in list(protocol.tasks):
        task.cancel()
    await asyncio.gather(*protocol.tasks, return_exceptions=True)


def outbox_with_log(websocket: WebSocket) -> Outbox:
    """An outbox as ``/v1/stream`` builds it with resume on: its log numbers and keeps what it sends."""
    log = ReplayLog(2_000, 4 * 2**20)
    if "keeps_sent" in inspect.signature(Outbox).parameters:
        return Outbox(websocket, 10_000, 2**24, log=log, keeps_sent=True)
    import functools  # trees up to bb4427a took a stamp callable instead

    return Outbox(websocket, 10_000, 2**24, stamp=functools.partial(log.stamp, keep=True))


async def event_seconds(count: int) -> float:
    """Seconds per decision event put into an outbox with nothing queued, and so written at once."""
    websocket, protocol = await accepted_websocket()
    transport = protocol.transport
    outbox = outbox_with_log(websocket)
    presenter = ReplyPresenter(tokenizer=None, session_id="s", decision_events=True)  # a decision needs no tokens
    decisions = [Decision(index, T.KEEP_SILENCE) for index in range(count)]
    stamp_ms = int(time.time() * 1000)
    transport.written.clear()
    started = time.perf_counter()
    for decision in decisions:
        outbox.put(presenter.present(decision, stamp_ms))
    elapsed = time.perf_counter() - started
    assert len(outbox) == 0 and transport.written, "every event should have been written at once"
    await close_protocol(protocol)
    return elapsed / count


def best_seconds(count: int, rounds: int) -> dict[str, float]:
    best = {"push": float("inf"), "event": float("inf"), "chunk": float("inf")}
    for _ in range(rounds):
        best["push"] = min(best["push"], push_seconds(count))
        best["event"] = min(best["event"], asyncio.run(event_seconds(count)))
        best["chunk"] = min(best["chunk"], asyncio.run(chunk_seconds(count)))
    return best


LABELS = {"push": "a chunk's push to the engine process (CPU of the posting thread)",
          "event": "a decision from the engine, presented and written at once, resume log on",
          "chunk": "a chunk's cycle: four frames through the session, its push, its decision written"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="pushes, events and chunk cycles per round")
    side_by_side.add_options(parser)
    args = parser.parse_args()
    if args.json:
        best_seconds(min(args.count, 200), 1)  # a fresh interpreter's first calls are not the paths'
        print(json.dumps(best_seconds(args.count, args.rounds)))
        return
    if not args.against:
        best = best_seconds(args.count, args.rounds)
        print(f"# best of {args.rounds} rounds of {args.count}")
        print("| path | us each |\n|---|---|")
        for name, label in LABELS.items():
            print(f"| {label} | {best[name] * 1e6:.2f} |")
        return
    best_this, best_other = side_by_side.best_of_alternating(
        "benchmarks.front_paths", ["--count", str(args.count)], args.against, args.rounds)
    print(f"# best of {args.rounds} alternated rounds of {args.count}; other tree: {args.against}")
    print("| path | this tree, us each | other tree, us each | other / this |\n|---|---|---|---|")
    for name, label in LABELS.items():
        this, other = best_this[name], best_other[name]
        print(f"| {label} | {this * 1e6:.2f} | {other * 1e6:.2f} | {other / this:.2f} |")


if __name__ == "__main__":
    main()
