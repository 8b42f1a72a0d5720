"""What two per-stream paths of a front cost its event loop's thread: posting a chunk, and writing an event.

    python -m benchmarks.front_paths [--count 4000] [--rounds 5] [--against OTHER_CHECKOUT/server]

* **push**: one 0.4 s chunk's ``PaddedBlocks`` through ``EngineProcessClient.push_audio``, as a front posts it
  to its engine process (from a thread with no loop turns, so it is sent at once), to a ROUTER socket standing
  in for the engine; the posting thread's CPU time per push (``time.thread_time``), paced by a short sleep
  between pushes so the receiver keeps up, as at real time.
* **event**: the engine's ``Decision`` for a chunk rendered by the session's ``ReplyPresenter`` (decision
  events on) and the ``decision`` event through ``Outbox.put`` with nothing queued before it, as a
  ``/v1/stream`` session sends it (the resume log keeps it), written at once on the server's own WebSocket
  protocol after a real handshake (``benchmarks.frame_parsing.open_protocol``); wall time per event, a hot loop.

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
from audio_interaction_server.api.connection import Outbox, ReplayLog
from audio_interaction_server.audio.frontend import LogMelChunker, PaddedBlocks
from audio_interaction_server.engine.events import Decision
from audio_interaction_server.engine.process_client import EngineProcessClient
from audio_interaction_server.engine.wire import EngineEndpoints
from audio_interaction_server.render.presenter import ReplyPresenter
from benchmarks import side_by_side

PUSH_PAUSE_S = 0.0002  # between pushes: the receiver keeps up, so no send meets a backlog


def push_seconds(count: int) -> float:
    """The posting thread's CPU seconds per chunk pushed through ``EngineProcessClient.push_audio``."""
    with tempfile.TemporaryDirectory() as directory:
        endpoints = EngineEndpoints.in_directory(Path(directory))
        context = zmq.Context()
        engine = context.socket(zmq.ROUTER)
        engine.bind(endpoints.commands)
        client = EngineProcessClient(endpoints)  # connects; no engine process, no reader: only what a push does
        received = 0

        def receive() -> None:
            nonlocal received
            while received < count:
                engine.recv_multipart(copy=False)
                received += 1

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        # A chunk's padded block as a stream's chunker cuts it (of silence: what it holds costs nothing here).
        blocks = LogMelChunker().push_block_array(np.zeros(2 * T.CHUNK_SAMPLES, dtype=np.float32))[:1]
        cpu_s = 0.0
        for index in range(count):
            chunk = PaddedBlocks(blocks, index)
            started = time.thread_time()
            client.push_audio(f"s{index % 240}", chunk)
            cpu_s += time.thread_time() - started
            time.sleep(PUSH_PAUSE_S)
        receiver.join(30.0)
        assert received == count, f"the stand-in engine received {received} of {count} pushes"
        client.stop()  # leaves the stand-in engine a goodbye, and closes the client's sockets
        engine.close(linger=0)
        context.term()
    return cpu_s / count


def outbox_with_log(websocket: WebSocket) -> Outbox:
    """An outbox as ``/v1/stream`` builds it with resume on: its log numbers and keeps what it sends."""
    log = ReplayLog(2_000, 4 * 2**20)
    if "keeps_sent" in inspect.signature(Outbox).parameters:
        return Outbox(websocket, 10_000, 2**24, log=log, keeps_sent=True)
    import functools  # trees up to bb4427a took a stamp callable instead

    return Outbox(websocket, 10_000, 2**24, stamp=functools.partial(log.stamp, keep=True))


async def event_seconds(count: int) -> float:
    """Seconds per decision event put into an outbox with nothing queued, and so written at once."""
    from benchmarks.frame_parsing import open_protocol

    protocol, transport = await open_protocol(fast_path=True)
    websocket = WebSocket(protocol.scope, protocol.receive, protocol.send)
    websocket.client_state = websocket.application_state = WebSocketState.CONNECTED
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
    for task in list(protocol.tasks):
        task.cancel()
    await asyncio.gather(*protocol.tasks, return_exceptions=True)
    return elapsed / count


def best_seconds(count: int, rounds: int) -> dict[str, float]:
    best = {"push": float("inf"), "event": float("inf")}
    for _ in range(rounds):
        best["push"] = min(best["push"], push_seconds(count))
        best["event"] = min(best["event"], asyncio.run(event_seconds(count)))
    return best


LABELS = {"push": "a chunk's push to the engine process (CPU of the posting thread)",
          "event": "a decision from the engine, presented and written at once, resume log on"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="pushes and events per round")
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
