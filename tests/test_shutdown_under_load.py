"""SIGTERM with 32 live sessions: each gets a final event and a proper close, the process exits in time, cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import numpy as np
import websockets

from benchmarks.harness import spawn_server

NUM_STREAMS = 32
DRAIN_LIMIT_S = 15.0  # the server's graceful-shutdown budget is CLOSE_GRACE_S + 5 = 10 s


class Deciding:
    """Set once every stream has had a chunk decided: all sessions live, mid-stream (instead of sleeping on it)."""

    def __init__(self) -> None:
        self.streams: set[int] = set()
        self.all = asyncio.Event()

    def heard(self, index: int, event: dict) -> None:
        if event["type"] == "decision":
            self.streams.add(index)
            if len(self.streams) == NUM_STREAMS:
                self.all.set()


async def stream_until_closed(port: int, index: int, ready: asyncio.Barrier, deciding: Deciding,
                              results: list) -> None:
    rng = np.random.default_rng(index)
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", compression=None) as ws:
        events = [json.loads(await ws.recv())]
        await ws.send(json.dumps({"type": "session.configure", "max_turn_tokens": 8, "decision_events": True}))
        await ready.wait()

        async def send_audio() -> None:
            try:
                while True:  # 0.4 s of audio every 0.1 s: faster than real time, until the server closes
                    await ws.send((rng.standard_normal(6400) * 3000).astype("<i2").tobytes())
                    await asyncio.sleep(0.1)
            except websockets.ConnectionClosed:
                pass

        sender = asyncio.create_task(send_audio())
        try:
            async for message in ws:
                events.append(json.loads(message))
                deciding.heard(index, events[-1])
        except websockets.ConnectionClosed:
            pass
        sender.cancel()
        results[index] = (events, ws.close_code)


def test_sigterm_with_32_live_sessions_closes_each_with_a_final_event(tiny_checkpoint):
    process, port = spawn_server(tiny_checkpoint, {"AIS_ENGINE__MAX_SESSIONS": str(NUM_STREAMS)})
    results: list = [None] * NUM_STREAMS
    try:
        async def main() -> float:
            ready, deciding = asyncio.Barrier(NUM_STREAMS + 1), Deciding()
            clients = [asyncio.create_task(stream_until_closed(port, i, ready, deciding, results))
                       for i in range(NUM_STREAMS)]
            await ready.wait()
            await asyncio.wait_for(deciding.all.wait(), timeout=30)  # every session live, mid-stream
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*clients), timeout=DRAIN_LIMIT_S)
            return sent

        sent = asyncio.run(main())
        rest = process.stderr.read()
        assert process.wait(timeout=DRAIN_LIMIT_S) == 0
        assert time.monotonic() - sent < DRAIN_LIMIT_S
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert "Traceback" not in rest and "Application shutdown complete" in rest
    for events, close_code in results:
        types = [e["type"] for e in events]
        assert types[0] == "session.created" and types[-1] == "session.closed", types[-5:]
        assert events[-1]["reason"] == "server_shutdown" and close_code == 1001
        assert events[-1]["num_chunks_received"] >= events[-1]["num_chunks_decided"] > 0
