"""Load test: N concurrent real-time sessions with random disconnects against `python -m server`.

    python benchmarks/load.py [--streams 64] [--minutes 5] [--checkpoint DIR]

Each client streams real audio (16 kHz s16, 100 ms frames, real time) and,
at random (mean session length 40 s), either closes politely or drops the TCP
connection mid-stream, then reconnects as a new session. Every received event
is validated against the published schema. Every 30 s the server's RSS and
`/v1/info` active-session count are printed. At the end all clients stop and
the server must report 0 active sessions (no leaked slots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import websockets

from server.audio import load_audio_file, load_audio_sequence
from server.protocol import SERVER_EVENT_ADAPTER

sys.path.insert(0, str(Path(__file__).resolve().parent))
from served import server_log, start_server  # noqa: E402

SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
FRAME_SAMPLES = 1600


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def info(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/v1/info", timeout=5) as response:
        return json.loads(response.read())


class Tally:
    def __init__(self) -> None:
        self.sessions = self.polite = self.dropped = self.refused = 0
        self.events = self.decisions = self.turns = 0
        self.invalid: list[str] = []
        self.errors: dict[str, int] = {}


async def client(url: str, pcm: np.ndarray, stop_at: float, rng: random.Random, tally: Tally) -> None:
    position = rng.randrange(0, len(pcm) // FRAME_SAMPLES) * FRAME_SAMPLES
    while time.monotonic() < stop_at:
        lifetime = min(rng.expovariate(1 / 40.0), stop_at - time.monotonic())
        polite = rng.random() < 0.5
        try:
            async with websockets.connect(url, compression=None) as ws:
                tally.sessions += 1

                async def receive() -> None:
                    try:
                        await consume()
                    except websockets.ConnectionClosed as closed:
                        if closed.rcvd is not None and closed.rcvd.code == 1013:
                            tally.refused += 1  # a full server (a dropped session's slot not yet freed)

                async def consume() -> None:
                    async for message in ws:
                        tally.events += 1
                        try:
                            event = SERVER_EVENT_ADAPTER.validate_json(message)
                        except ValueError as error:
                            tally.invalid.append(str(error)[:200])
                            continue
                        tally.decisions += event.type == "decision"
                        tally.turns += event.type == "turn_end"
                        if event.type == "error":
                            tally.errors[event.code] = tally.errors.get(event.code, 0) + 1

                receiver = asyncio.create_task(receive())
                await ws.send(json.dumps({"type": "session.configure", "decision_events": True,
                                          "max_turn_tokens": 16}))
                started = time.monotonic()
                frame = 0
                while time.monotonic() - started < lifetime and not receiver.done():
                    chunk = pcm[position:position + FRAME_SAMPLES]
                    position = (position + FRAME_SAMPLES) % (len(pcm) - FRAME_SAMPLES)
                    await ws.send(chunk.tobytes())
                    frame += 1
                    delay = started + frame * 0.1 - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if receiver.done():  # refused: back off, then reconnect
                    await asyncio.sleep(1.0)
                    continue
                if polite:
                    await ws.send(json.dumps({"type": "session.close"}))
                    await asyncio.wait_for(receiver, timeout=30)
                    tally.polite += 1
                else:
                    ws.transport.abort()  # the client vanishes mid-stream: no close frame
                    receiver.cancel()
                    tally.dropped += 1
        except (websockets.ConnectionClosed, OSError, asyncio.TimeoutError) as error:
            tally.errors[type(error).__name__] = tally.errors.get(type(error).__name__, 0) + 1


async def run(url: str, base: str, pid: int, streams: int, minutes: float) -> Tally:
    tally = Tally()
    pieces = [load_audio_file(p) for folder in sorted(SHARED_AUDIO.iterdir()) if folder.is_dir()
              for p in load_audio_sequence(folder)]
    pcm = (np.clip(np.concatenate(pieces), -1, 1) * 32767).astype("<i2")
    stop_at = time.monotonic() + minutes * 60
    clients = [asyncio.create_task(client(url, pcm, stop_at, random.Random(i), tally)) for i in range(streams)]
    print("| minute | server RSS MiB | active sessions | sessions so far | events | decisions | turns |")
    print("|---|---|---|---|---|---|---|")
    started = time.monotonic()
    while time.monotonic() < stop_at:
        active = (await asyncio.to_thread(info, base))["sessions"]["active"]
        print(f"| {(time.monotonic() - started) / 60:.1f} | {rss_mib(pid):.0f} | {active} | {tally.sessions} | "
              f"{tally.events} | {tally.decisions} | {tally.turns} |", flush=True)
        await asyncio.sleep(min(30, max(0.0, stop_at - time.monotonic())))
    await asyncio.gather(*clients)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args()
    env = {"AIS_ENGINE__MAX_SESSIONS": str(args.streams), "AIS_ENGINE__DEVICE": "cpu"}
    if args.checkpoint is not None:
        env["AIS_ENGINE__CHECKPOINT"] = str(args.checkpoint)
    server, port = start_server(env)
    base = f"http://127.0.0.1:{port}"
    try:
        print(f"# {args.streams} streams, {args.minutes:g} min, {os.cpu_count()} CPUs, server pid {server.pid}\n")
        tally = asyncio.run(run(f"ws://127.0.0.1:{port}/v1/stream", base, server.pid, args.streams, args.minutes))
        time.sleep(2.0)  # let the server notice the last dropped connections
        active = info(base)["sessions"]["active"]
        print(f"\nsessions: {tally.sessions} ({tally.polite} closed politely, {tally.dropped} dropped, "
              f"{tally.refused} refused while full and retried), "
              f"events: {tally.events}, decisions: {tally.decisions}, replies: {tally.turns}")
        print(f"invalid events: {len(tally.invalid)} {tally.invalid[:3]}; error events/exceptions: {tally.errors}")
        print(f"active sessions after all clients left: {active} (leaked slots: {active})")
    finally:
        server.terminate()
        server.wait(timeout=30)
        print(f"server exit code {server.returncode}; traceback in its log: {'Traceback' in server_log(server)}")


if __name__ == "__main__":
    main()
