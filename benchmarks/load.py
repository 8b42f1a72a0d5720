"""Load test: N concurrent real-time sessions with random disconnects against `python -m audio_interaction_server`.

    python -m benchmarks.load [--streams 64] [--minutes 5] [--checkpoint DIR]

Each client streams real audio (16 kHz s16, 100 ms frames, real time) and,
at random (mean session length 40 s), either closes politely or drops the TCP
connection mid-stream, then reconnects as a new session. Every received event
is validated against the published schema. Every `--report-every` seconds the
server's own memory figures are scraped from `/metrics`: RSS, glibc heap (live
bytes and free bytes held), open file descriptors, and what the open sessions
hold (history chunks, queued audio chunks, unsent events). At the end all
clients stop; the server must report 0 active sessions (no leaked slots) and
zero session state, and the RSS and live-heap slopes after `--warmup` minutes
are printed in MiB per hour (least squares over the rows).

    python -m benchmarks.load --streams 64 --minutes 15 --server-env MALLOC_ARENA_MAX=2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import urllib.request
from pathlib import Path

import numpy as np
import websockets

from audio_interaction_server.protocol import SERVER_EVENT_ADAPTER

from benchmarks.harness import scrape, server_log, spawn_server
from benchmarks.served import audio_loop, slope_per_hour

FRAME_SAMPLES = 1600


MIB = 1 << 20


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


class MemoryLog:
    """One row per report: the server's memory and session-state figures from /metrics."""

    COLUMNS = ("minute", "RSS MiB", "heap in use MiB", "heap free MiB", "mmapped MiB", "open fds", "active",
               "history chunks", "queued chunks", "queued events")

    def __init__(self) -> None:
        self.rows: list[tuple[float, ...]] = []

    def record(self, minute: float, base: str) -> tuple[float, ...]:
        m = scrape(base)
        row = (minute, m["ais_process_resident_memory_bytes"] / MIB, m['ais_malloc_heap_bytes{state="in_use"}'] / MIB,
               m['ais_malloc_heap_bytes{state="free"}'] / MIB, m['ais_malloc_heap_bytes{state="mmapped"}'] / MIB,
               m["ais_process_open_fds"], m["ais_sessions_active"], m["ais_session_history_chunks"],
               m["ais_session_queued_chunks"], m["ais_session_queued_events"])
        self.rows.append(row)
        return row

    def slopes(self, warmup_min: float) -> str:
        after = [row for row in self.rows if row[0] >= warmup_min]
        minutes = [row[0] for row in after]
        rss = slope_per_hour(minutes, [row[1] for row in after])
        live = slope_per_hour(minutes, [row[2] + row[4] for row in after])
        return (f"after minute {warmup_min:g} ({len(after)} rows): RSS {rss:+.1f} MiB/h, "
                f"live heap (in use + mmapped) {live:+.1f} MiB/h")


def after_next_trim(base: str, memory: MemoryLog, minute: float, timeout_s: float = 90.0) -> tuple | None:
    """The memory row once the server has trimmed its heap again (None when it does not trim):
    what the idle server really keeps, without the free pages glibc had not yet returned."""
    count = scrape(base).get("ais_malloc_trim_seconds_count", 0)
    if count == 0:
        return None
    deadline = time.monotonic() + timeout_s
    while scrape(base)["ais_malloc_trim_seconds_count"] == count and time.monotonic() < deadline:
        time.sleep(1.0)
    return memory.record(minute, base)


async def run(url: str, base: str, streams: int, minutes: float, report_every_s: float,
              memory: MemoryLog) -> Tally:
    tally = Tally()
    pcm = (np.clip(audio_loop(), -1, 1) * 32767).astype("<i2")
    stop_at = time.monotonic() + minutes * 60
    clients = [asyncio.create_task(client(url, pcm, stop_at, random.Random(i), tally)) for i in range(streams)]
    columns = MemoryLog.COLUMNS + ("sessions so far", "events", "decisions", "replies")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    started = time.monotonic()
    while time.monotonic() < stop_at:
        row = await asyncio.to_thread(memory.record, (time.monotonic() - started) / 60, base)
        cells = [f"{row[0]:.1f}"] + [f"{value:.0f}" for value in row[1:]]
        cells += [str(tally.sessions), str(tally.events), str(tally.decisions), str(tally.turns)]
        print("| " + " | ".join(cells) + " |", flush=True)
        await asyncio.sleep(min(report_every_s, max(0.0, stop_at - time.monotonic())))
    await asyncio.gather(*clients)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--report-every", type=float, default=60.0, help="seconds between memory rows")
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes left out of the slopes")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the server only (e.g. MALLOC_ARENA_MAX=2); repeatable")
    args = parser.parse_args()
    env = {"AIS_ENGINE__MAX_SESSIONS": str(args.streams), "AIS_ENGINE__DEVICE": "cpu"}
    env.update(item.split("=", 1) for item in args.server_env)
    if args.checkpoint is not None:
        env["AIS_ENGINE__CHECKPOINT"] = str(args.checkpoint)
    server, port = spawn_server(None, env, log_to_file=True)
    base = f"http://127.0.0.1:{port}"
    try:
        print(f"# {args.streams} streams, {args.minutes:g} min, {os.cpu_count()} CPUs, server pid {server.pid}, "
              f"server env {args.server_env}\n")
        memory = MemoryLog()
        tally = asyncio.run(run(f"ws://127.0.0.1:{port}/v1/stream", base, args.streams, args.minutes,
                                args.report_every, memory))
        time.sleep(2.0)  # let the server notice the last dropped connections
        # Dropped sessions wait resume_grace_s (30 s by default) for a resume that never comes here: a slot is
        # leaked only if it is still held once that has passed.
        detached = scrape(base).get("ais_sessions_detached", 0)
        deadline = time.monotonic() + 40.0
        while info(base)["sessions"]["active"] and time.monotonic() < deadline:
            time.sleep(1.0)
        active = info(base)["sessions"]["active"]
        print(f"\ndetached (dropped, waiting for a resume) right after the clients left: {detached:.0f}")
        print(f"\nslopes {memory.slopes(args.warmup)}")  # before the idle row below joins the log
        for label, row in (("after all clients left", memory.record(args.minutes, base)),
                           ("after the next periodic trim", after_next_trim(base, memory, args.minutes))):
            if row is not None:
                print(f"{label}: RSS {row[1]:.0f} MiB, heap in use {row[2]:.0f} MiB, free {row[3]:.0f} MiB, "
                      f"mmapped {row[4]:.0f} MiB, open fds {row[5]:.0f}; session state left: history chunks "
                      f"{row[7]:.0f}, queued chunks {row[8]:.0f}, queued events {row[9]:.0f}")
        trims = scrape(base)
        count, total_s = trims.get("ais_malloc_trim_seconds_count", 0), trims.get("ais_malloc_trim_seconds_sum", 0)
        print(f"periodic malloc_trim: {count:.0f} calls, mean {1000 * total_s / max(count, 1):.1f} ms")
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
