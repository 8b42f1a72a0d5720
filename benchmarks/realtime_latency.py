"""/v1/realtime against /v1/stream, same server, same run: reply latency and server CPU per stream.

    python -m benchmarks.realtime_latency [--streams 1 32] [--seconds 20] [--device cpu] [--checkpoint DIR]

One ``python -m audio_interaction_server`` subprocess serves every phase. In each phase N clients of one
protocol stream the shared recordings in real time (100 ms frames) with manual turns, and every
``REQUEST_EVERY_S`` each client that is not being answered asks for a reply:

stream    16 kHz s16 binary frames, ``reply_mode: on_request``, ``response.create``; the first
          ``text_delta`` of the reply stops the clock.
realtime  what LiveKit and pipecat send: ``input_audio_buffer.append`` with base64 24 kHz PCM,
          ``turn_detection: null``, ``response.create``; the first ``response.output_text.delta`` stops it.

Latency = request sent -> first text delta received. A requested reply is decided at the next chunk (the
session adds one of silence when none waits), so this is the decision plus the reply's first tokens plus
everything each protocol does around them: the Realtime codec's translation, the six events it sends
before the first delta, the JSON and base64 both ways. Replies are ``engine.scripted_turns`` long
(``REPLY_TOKENS``) so both protocols do the same engine work. Server CPU = the server process's user+system
CPU time over the phase's measured window, divided by streams and window: the share of one core a stream
costs, engine included.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from audio_interaction_server.spec import SAMPLE_RATE_HZ
from benchmarks.harness import positive_int, seconds_above, server_log, spawn_server
from benchmarks.served import FRAME_SAMPLES, audio_loop, stream_audio

REALTIME_RATE_HZ = 24_000
REQUEST_EVERY_S = 2.0
REPLY_TOKENS = 12
WARMUP_S = 2.0  # connections and first steps: not measured


def wait_until_idle(port: int, timeout_s: float = 30.0) -> None:
    """Until the server holds no session: the previous phase's sessions close a moment after their sockets."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/load", timeout=5) as response:
            if json.loads(response.read())["active"] == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("sessions of the previous phase are still open")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


@dataclass
class Phase:
    protocol: str
    num_streams: int
    latencies_s: list[float] = field(default_factory=list)
    num_requests: int = 0
    cpu_s: float = 0.0
    window_s: float = 0.0
    client_cpu_s: float = 0.0  # this process (every client of the phase), same window

    @property
    def cpu_per_stream(self) -> float:
        return self.cpu_s / self.window_s / self.num_streams

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000 if self.latencies_s else float("nan")


class Client:
    """One real-time stream with manual turns; the protocol's framing in ``open``/``frame``/``is_*``."""

    def __init__(self, protocol: str, audio_16k: np.ndarray) -> None:
        self.protocol = protocol
        self.frames = self._frames(audio_16k)
        self.requested_at: float | None = None
        self.latencies_s: list[float] = []
        self.num_requests = 0

    def _frames(self, audio: np.ndarray) -> list:
        if self.protocol == "stream":
            pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
            return [pcm[i:i + FRAME_SAMPLES].tobytes() for i in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
        audio = soxr.resample(audio, SAMPLE_RATE_HZ, REALTIME_RATE_HZ, quality="HQ")
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
        step = REALTIME_RATE_HZ // 10
        return [json.dumps({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(pcm[i:i + step].tobytes()).decode()})
                for i in range(0, len(pcm) - step + 1, step)]

    async def open(self, ws) -> None:
        await ws.recv()  # session.created
        if self.protocol == "stream":
            await ws.send(json.dumps({"type": "session.configure", "reply_mode": "on_request"}))
        else:
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": REALTIME_RATE_HZ},
                                                        "turn_detection": None}}}}))
        while json.loads(await ws.recv())["type"] != "session.updated":
            pass

    def is_first_delta(self, event: dict) -> bool:
        return event["type"] == ("text_delta" if self.protocol == "stream" else "response.output_text.delta")

    def is_reply_end(self, event: dict) -> bool:
        return event["type"] == ("turn_end" if self.protocol == "stream" else "response.done")

    async def run(self, url: str, start_at: float, seconds: float, measure_from: float) -> None:
        import websockets

        async with websockets.connect(url, compression=None, max_size=None) as ws:
            await self.open(ws)
            answered = asyncio.Event()
            answered.set()

            async def receive() -> None:
                while True:
                    event = json.loads(await ws.recv())
                    if self.requested_at is not None and self.is_first_delta(event):
                        if self.requested_at >= measure_from:
                            self.latencies_s.append(time.perf_counter() - self.requested_at)
                        self.requested_at = None
                    elif self.is_reply_end(event):
                        answered.set()

            receiver = asyncio.create_task(receive())
            next_request = start_at + REQUEST_EVERY_S
            for index in range(int(seconds * 10)):
                due = start_at + index * 0.1
                if (delay := due - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                await ws.send(self.frames[index % len(self.frames)])
                if time.perf_counter() >= next_request and answered.is_set():
                    answered.clear()
                    self.requested_at = time.perf_counter()
                    if self.requested_at >= measure_from:
                        self.num_requests += 1
                    await ws.send(json.dumps({"type": "response.create"}))
                    next_request = self.requested_at + REQUEST_EVERY_S
            receiver.cancel()


async def run_phase(port: int, protocol: str, num_streams: int, seconds: float, loop: np.ndarray,
                    server_pid: int) -> Phase:
    url = f"ws://127.0.0.1:{port}/v1/{protocol}"
    clients = [Client(protocol, stream_audio(loop, i, int(seconds + 1) * SAMPLE_RATE_HZ)) for i in range(num_streams)]
    start_at = time.perf_counter() + 1.0
    measure_from = start_at + WARMUP_S
    # Streams staggered over one frame, as real clients are not in lockstep.
    tasks = [asyncio.create_task(client.run(url, start_at + i * 0.1 / num_streams, seconds, measure_from))
             for i, client in enumerate(clients)]
    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
    cpu_before, client_before, window_start = cpu_seconds(server_pid), cpu_seconds(os.getpid()), time.perf_counter()
    await asyncio.sleep(max(0.0, start_at + seconds - time.perf_counter()))
    phase = Phase(protocol, num_streams, cpu_s=cpu_seconds(server_pid) - cpu_before,
                  window_s=time.perf_counter() - window_start,
                  client_cpu_s=cpu_seconds(os.getpid()) - client_before)
    await asyncio.gather(*tasks)
    for client in clients:
        phase.latencies_s += client.latencies_s
        phase.num_requests += client.num_requests
    return phase


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realtime_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=positive_int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=seconds_above(WARMUP_S), default=20.0,
                        help="per phase, warm-up included")
    parser.add_argument("--repeat", type=positive_int, default=2, help="rounds per stream count, the protocol order "
                        "alternating, so a drift in the machine's load does not favour one protocol")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the tiny demo model")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    env = {"AIS_ENGINE__DEVICE": args.device, "AIS_MAX_SESSIONS": str(max(args.streams)),
           "AIS_ENGINE__MAX_SESSIONS": str(max(args.streams)), "AIS_CONNECT_BURST_PER_IP": "1000",
           "AIS_ENGINE__SCRIPTED_TURNS__EVERY_CHUNKS": "100000",  # manual turns decide; scripted = reply length
           "AIS_ENGINE__SCRIPTED_TURNS__REPLY_TOKENS": str(REPLY_TOKENS)}
    process, port = spawn_server(args.checkpoint, env, log_to_file=True)
    phases: list[Phase] = []
    try:
        loop = audio_loop()
        print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
        for num_streams in args.streams:
            for round_index in range(args.repeat):
                order = ("stream", "realtime") if round_index % 2 == 0 else ("realtime", "stream")
                for protocol in order:
                    wait_until_idle(port)
                    phase = asyncio.run(run_phase(port, protocol, num_streams, args.seconds, loop, process.pid))
                    phases.append(phase)
                    print(f"{protocol:8s} {num_streams:3d} streams: {len(phase.latencies_s)}/{phase.num_requests} "
                          f"replies timed, p50 {phase.percentile(50):.1f} ms, p95 {phase.percentile(95):.1f} ms, "
                          f"server CPU {phase.cpu_per_stream * 100:.2f} % of a core per stream, "
                          f"client CPU {phase.client_cpu_s / phase.window_s * 100:.0f} % of a core, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
        problems = [line for line in server_log(process).splitlines() if line.startswith(("ERROR", "CRITICAL"))]
        if problems:
            print("server errors:", *problems[:10], sep="\n  ")
    print("\n| streams | protocol | replies timed | p50 ms | p95 ms | server CPU per stream | clients' CPU |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    merged: dict[tuple[int, str], Phase] = {}
    for phase in phases:  # the rounds of one stream count and protocol, pooled
        into = merged.setdefault((phase.num_streams, phase.protocol), Phase(phase.protocol, phase.num_streams))
        into.latencies_s += phase.latencies_s
        into.num_requests += phase.num_requests
        into.cpu_s += phase.cpu_s
        into.window_s += phase.window_s
        into.client_cpu_s += phase.client_cpu_s
    for phase in merged.values():
        print(f"| {phase.num_streams} | {phase.protocol} | {len(phase.latencies_s)}/{phase.num_requests} | "
              f"{phase.percentile(50):.1f} | {phase.percentile(95):.1f} | {phase.cpu_per_stream * 100:.2f} % | "
              f"{phase.client_cpu_s / phase.window_s * 100:.0f} % |")
    for num_streams in args.streams:
        stream, realtime = merged[(num_streams, "stream")], merged[(num_streams, "realtime")]
        print(f"{num_streams} streams, realtime / stream: p50 x{realtime.percentile(50) / stream.percentile(50):.2f}, "
              f"server CPU x{realtime.cpu_per_stream / stream.cpu_per_stream:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps([dict(protocol=p.protocol, streams=p.num_streams, p50_ms=p.percentile(50),
                                              p95_ms=p.percentile(95), replies_timed=len(p.latencies_s),
                                              requests=p.num_requests, cpu_per_stream=p.cpu_per_stream)
                                         for p in phases], indent=2))


if __name__ == "__main__":
    main()
