"""Added latency of the server over the engine alone: chunk complete -> decision, p50/p95.

    python -m benchmarks.server_latency [--streams 1 32] [--seconds 20] [--checkpoint DIR]

Both modes stream the same real audio (16 kHz mono, 100 ms frames, real-time
pace, streams staggered over one chunk) with the same options
(`max_turn_tokens` 4, greedy):

engine  the worker thread alone, fed by a real-time pacer in this process; the
        clock starts when the front-end emits a chunk (the frame carrying its
        40 look-ahead samples arrived) and stops when the worker emits its
        decision.
server  `python -m audio_interaction_server` in a subprocess on 127.0.0.1 and one `websockets`
        client per stream in this process; the clock starts when the client
        sends the frame that completes the chunk and stops when the `decision`
        event is received.

A decision that waits behind a reply of the same session counts in both
modes (audio is queued while the model speaks), so p95 includes replies.
"server - engine" is the difference of the two modes' percentiles, not a
percentile of each decision's added time (the two runs hear the same audio,
one after the other, not the same decisions): it can come out below the p50's,
or negative, when the server's run was the luckier one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from audio_interaction_server.audio.mel import StreamingLogMel
from audio_interaction_server.model.checkpoint import load_model
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.events import Decision
from audio_interaction_server.spec import CHUNK_S, SAMPLE_RATE_HZ
from audio_interaction_server.engine.worker import Worker

from benchmarks.harness import positive_int, seconds_above, spawn_server
from benchmarks.served import (
    FRAME_SAMPLES, audio_loop, stream_audio, stream_timing_decisions,
)

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE_HZ
MAX_TURN_TOKENS = 4


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return statistics.median(ordered), p95


def streams_audio(num_streams: int, seconds: float) -> list[np.ndarray]:
    loop = audio_loop()  # read once: every stream is a different place in the same loop
    return [stream_audio(loop, i, int(seconds * SAMPLE_RATE_HZ)) for i in range(num_streams)]


def run_engine(model, num_streams: int, seconds: float) -> list[float]:
    worker = Worker(model, EngineConfig(max_sessions=num_streams))
    pushed_at: dict[tuple[int, int], float] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def emit_for(stream: int):
        def emit(events):
            now = time.perf_counter()
            for event in events:
                if isinstance(event, Decision):
                    with lock:
                        latencies.append(now - pushed_at.pop((stream, event.chunk_index)))
        return emit

    options = SessionOptions(max_turn_tokens=MAX_TURN_TOKENS)
    audios = streams_audio(num_streams, seconds)
    front_ends = [StreamingLogMel() for _ in range(num_streams)]
    emitted = [0] * num_streams
    for i in range(num_streams):
        worker.open_session(f"s{i}", options, emit_for(i))
    worker.start()
    num_frames = int(seconds / FRAME_S)
    offsets = [i * CHUNK_S / num_streams for i in range(num_streams)]
    schedule = sorted((offsets[i] + j * FRAME_S, i, j) for i in range(num_streams) for j in range(num_frames))
    start = time.perf_counter()
    for due, stream, frame in schedule:
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        chunks = front_ends[stream].push(audios[stream][frame * FRAME_SAMPLES:(frame + 1) * FRAME_SAMPLES])
        if chunks:
            now = time.perf_counter()
            with lock:
                for k in range(emitted[stream], emitted[stream] + len(chunks)):
                    pushed_at[(stream, k)] = now
            emitted[stream] += len(chunks)
            worker.push_audio(f"s{stream}", torch.stack(chunks))
    deadline = time.perf_counter() + 30
    while pushed_at and time.perf_counter() < deadline:
        time.sleep(0.05)
    worker.stop()
    return latencies


async def one_client(url: str, stream: int, audio: np.ndarray, offset_s: float, start: float,
                     latencies: list[float]) -> None:
    await stream_timing_decisions(url, audio, start + offset_s, latencies, MAX_TURN_TOKENS, timeout_s=60)


def run_server(checkpoint: Path, num_streams: int, seconds: float) -> list[float]:
    process, port = spawn_server(checkpoint, {"AIS_ENGINE__MAX_SESSIONS": str(num_streams)}, log_to_file=True)
    url = f"ws://127.0.0.1:{port}/v1/stream"
    latencies: list[float] = []
    audios = streams_audio(num_streams, seconds)
    try:
        async def main() -> None:
            start = time.perf_counter() + 1.0
            await asyncio.gather(*(one_client(url, i, audio, i * CHUNK_S / num_streams, start, latencies)
                                   for i, audio in enumerate(audios)))
        asyncio.run(main())
    finally:
        process.terminate()
        process.wait(timeout=30)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--streams", type=positive_int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=seconds_above(0), default=20.0,
                        help="audio per stream (streamed in real time)")
    args = parser.parse_args()
    if args.checkpoint is None:
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    model = load_model(args.checkpoint, "cpu")
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"model {model.name}, {args.seconds:g} s of audio per stream, 100 ms frames, real time\n")
    print("| streams | engine p50 ms | engine p95 ms | server p50 ms | server p95 ms | server - engine p50 ms |"
          " server - engine p95 ms |"
          " decisions |")
    print("|---|---|---|---|---|---|---|---|")
    for num_streams in args.streams:
        engine = percentiles(run_engine(model, num_streams, args.seconds))
        served = run_server(args.checkpoint, num_streams, args.seconds)
        server = percentiles(served)
        print(f"| {num_streams} | {engine[0] * 1e3:.1f} | {engine[1] * 1e3:.1f} | {server[0] * 1e3:.1f} | "
              f"{server[1] * 1e3:.1f} | {(server[0] - engine[0]) * 1e3:.1f} | {(server[1] - engine[1]) * 1e3:.1f} |"
              f" {len(served)} |", flush=True)


if __name__ == "__main__":
    main()
