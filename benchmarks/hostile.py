"""A victim's decision latency alone and next to one hostile neighbour, same server, same run.

    python -m benchmarks.hostile [--seconds 15] [--cases alone ping_flood fast_sender flush_flood ...]
                                 [--server-root DIR] [--checkpoint DIR]

`python -m audio_interaction_server` runs in a subprocess on 127.0.0.1 (the tiny demo model unless
`--checkpoint`). The victim streams the shared recordings in real time (16 kHz
mono s16, 100 ms frames, `max_turn_tokens` 4, decision events on); its decision
latency is from sending the frame that completes a chunk to receiving that
chunk's `decision`. Each case runs the victim for `--seconds` with at most one
attacker, started a second before it in a process of its own (so the attacker's
client work does not slow the victim's client):

alone           no attacker
ping_flood      WebSocket pings as fast as the socket takes them, never waiting for a pong
fast_sender     100 ms s16 frames at 100x real time (one per ms), events read and dropped
flush_flood     a 10-sample frame and an `input.flush` of 10 s of silence, repeated every ms
audio_flood     100 ms s16 frames on /v1/stream as fast as the socket takes them (once the buffer is
                full, refused as audio_buffer_full)
bad_audio_flood 1-byte frames on /v1/stream (not whole s16 samples: each refused as invalid_audio) as
                fast as the socket takes them
realtime_flood  the same on /v1/realtime: 100 ms of 24 kHz PCM per input_audio_buffer.append
prompt_flood    session.configure with a new 8,000-digit system prompt (too long for the context; the
                slowest kind to tokenise), 300 a second
item_flood      20,000 conversation.item.create on /v1/realtime in under a second, then more
agent_flood     TCP connections to the capacity agent's port (the server's HAProxy agent-check, `agent_port`,
                set to a free port for this case), back to back, 8 at a time, each
                reading its line (or the close) and opening the next

Each attacker is one connection; with `--reconnect` it opens a new one whenever the server
closes it (the per-address connection rate limit applies) and goes on until the case ends.

`--refused-frame-cost` only times what one refused frame costs a session (no server, no sockets).

`--server-root` starts the server from another checkout (e.g. a `git worktree`
of an older commit), to compare before and after a change with the same client.
A decision that waits behind one of the victim's own replies counts too (its
audio queues while it speaks), as in server_latency.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from audio_interaction_server.spec import SAMPLE_RATE_HZ
from benchmarks.harness import REPO_ROOT, free_port, scrape, server_package_dir, spawn_server
from benchmarks.served import (
    FRAME_SAMPLES, audio_loop, configure_s16_stream, stream_audio, stream_timing_decisions,
)

REALTIME_FRAME_SAMPLES = 2_400  # 100 ms at the Realtime API's 24 kHz

MAX_TURN_TOKENS = 4
ATTACK_LEAD_S = 1.0  # the attacker is at full speed before the victim's first frame
PROMPT_CHARS = 8_000  # the longest system prompt either protocol accepts
PROMPTS_PER_S = 300
ITEMS_AT_ONCE = 20_000
AGENT_PROBES_IN_FLIGHT = 8  # enough to keep the agent's accept queue busy, too few to fill it (64)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---- the attackers (each in a process of its own) -------------------------------------------
async def _read_all(ws, stats: Counter) -> None:
    """Read every event, so the server never closes the attacker as a slow reader."""
    async for message in ws:
        event = json.loads(message)
        if event["type"] == "error":
            code = event["code"] if "code" in event else event["error"]["code"]
            stats[f"error:{code}"] += 1
        else:
            stats[f"event:{event['type']}"] += 1


async def _stream_attack(ws, kind: str, stats: Counter, end_s: float) -> None:
    """One /v1/stream connection's attack (configured already), until ``end_s`` or the server closes it."""
    frame = (np.random.default_rng(0).standard_normal(FRAME_SAMPLES) * 3000).astype("<i2").tobytes()
    flush = json.dumps({"type": "input.flush", "trailing_silence_s": 10.0})
    while time.perf_counter() < end_s:
        if kind == "ping_flood":
            for _ in range(100):  # pings are tiny: send a burst, then let the reader run
                await ws.ping(stats["sent"].to_bytes(8, "big"))
                stats["sent"] += 1
            await asyncio.sleep(0)
        elif kind == "fast_sender":
            await ws.send(frame)
            stats["sent"] += 1
            await asyncio.sleep(0.001)
        elif kind == "flush_flood":
            await ws.send(frame[:20])
            await ws.send(flush)
            stats["sent"] += 1
            await asyncio.sleep(0.001)
        elif kind == "audio_flood":
            for _ in range(20):  # as fast as the socket takes them (send waits while its buffer is full)
                await ws.send(frame)
                stats["sent"] += 1
            await asyncio.sleep(0)
        elif kind == "bad_audio_flood":
            for _ in range(200):  # tiny frames: a burst, then let the reader drop the answers
                await ws.send(b"\x01")
                stats["sent"] += 1
            await asyncio.sleep(0)
        elif kind == "prompt_flood":
            started = time.perf_counter()
            for _ in range(PROMPTS_PER_S):
                digits = (np.random.default_rng(stats["sent"]).integers(0, 10, PROMPT_CHARS, dtype=np.uint8)
                          + ord("0")).tobytes().decode()
                await ws.send(json.dumps({"type": "session.configure", "system_prompt": digits}))
                stats["sent"] += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))
        else:
            raise ValueError(f"unknown /v1/stream attack {kind!r}")


async def _realtime_attack(ws, kind: str, stats: Counter, end_s: float) -> None:
    """One /v1/realtime connection's attack, until ``end_s`` or the server closes it."""
    frame = (np.random.default_rng(0).standard_normal(REALTIME_FRAME_SAMPLES) * 3000).astype("<i2").tobytes()
    append = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(frame).decode()})
    while time.perf_counter() < end_s:
        if kind == "realtime_flood":
            for _ in range(20):
                await ws.send(append)
                stats["sent"] += 1
            await asyncio.sleep(0)
        elif kind == "item_flood":
            for _ in range(ITEMS_AT_ONCE):
                await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
                stats["sent"] += 1
            await asyncio.sleep(0)
        else:
            raise ValueError(f"unknown /v1/realtime attack {kind!r}")


async def _agent_attack(host: str, port: int, stats: Counter, end_s: float) -> None:
    """Probes of the capacity agent's port, back to back, AGENT_PROBES_IN_FLIGHT at a time, until ``end_s``."""

    async def one_probe_after_another() -> None:
        while (left_s := end_s - time.perf_counter()) > 0:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(ATTACKER_ADDRESS, 0)), left_s)
            except (OSError, asyncio.TimeoutError) as refused:
                stats[f"refused:{type(refused).__name__}"] += 1
                await asyncio.sleep(0.001)
                continue
            stats["connections"] += 1
            try:  # the agent answers at most a line and closes; a probe beyond its limits gets the close alone
                line = await asyncio.wait_for(reader.read(256), max(0.0, end_s - time.perf_counter()))
                stats["lines" if line.endswith(b"\n") else "closed unanswered"] += 1
            except (OSError, asyncio.TimeoutError):
                stats["waiting at the end" if time.perf_counter() >= end_s else "reset"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(one_probe_after_another() for _ in range(AGENT_PROBES_IN_FLIGHT)))


# The capacity agent's port: a plain TCP line, not a WebSocket path (the attacker is given the port).
AGENT_PORT = "agent port"
# attack -> (path, one connection's attack). Another attack is one entry here and one line in the docstring.
ATTACKERS = {
    "ping_flood": ("/v1/stream", _stream_attack), "fast_sender": ("/v1/stream", _stream_attack),
    "flush_flood": ("/v1/stream", _stream_attack), "audio_flood": ("/v1/stream", _stream_attack),
    "bad_audio_flood": ("/v1/stream", _stream_attack),
    "realtime_flood": ("/v1/realtime", _realtime_attack), "prompt_flood": ("/v1/stream", _stream_attack),
    "item_flood": ("/v1/realtime", _realtime_attack), "agent_flood": (AGENT_PORT, _agent_attack),
}
ATTACKS = tuple(ATTACKERS)


# The attacker's own client address (loopback too): the server's per-address limits (connection rate, the cooldown
# after a flood cut) then fall on it, not on the victim, as they would for two clients on two machines.
ATTACKER_ADDRESS = "127.0.0.2"


async def attack(base_url: str, kind: str, seconds: float, reconnect: bool, agent_port: int | None = None) -> dict:
    """Attack until ``seconds`` have passed or the server closes the connection (then, with ``reconnect``,
    open another)."""
    import websockets

    path, one_connection = ATTACKERS[kind]
    stats: Counter = Counter()
    close_codes: Counter = Counter()
    started_s = time.perf_counter()
    end_s = started_s + seconds
    if path == AGENT_PORT:
        assert agent_port is not None, "the agent_flood attacker needs the server's agent port"
        await _agent_attack(base_url.split("//", 1)[1].rsplit(":", 1)[0], agent_port, stats, end_s)
        return {"kind": kind, "lines a second": round(stats["lines"] / seconds), **stats}
    first_close_s = None
    while time.perf_counter() < end_s:
        try:
            async with websockets.connect(base_url + path, compression=None, max_size=None, ping_interval=None,
                                          max_queue=None, local_addr=(ATTACKER_ADDRESS, 0)) as ws:
                stats["connections"] += 1
                if path == "/v1/stream":
                    await configure_s16_stream(ws, MAX_TURN_TOKENS)
                reader = asyncio.create_task(_read_all(ws, stats))
                try:
                    await one_connection(ws, kind, stats, end_s)
                except websockets.ConnectionClosed:
                    pass
                finally:
                    reader.cancel()
                if ws.close_code is not None:
                    close_codes[ws.close_code] += 1
                    first_close_s = first_close_s or time.perf_counter() - started_s
        except websockets.ConnectionClosed as closed:
            close_codes[closed.rcvd.code if closed.rcvd else 1006] += 1
        except (websockets.InvalidStatus, OSError) as refused:  # e.g. 429: the connection rate limit
            stats[f"refused:{getattr(getattr(refused, 'response', None), 'status_code', type(refused).__name__)}"] += 1
            await asyncio.sleep(0.05)
        if not reconnect:
            break
    closes = " ".join(f"{code}x{count}" for code, count in sorted(close_codes.items()))
    # When the server closed it, counted from its first connection (the victim starts ATTACK_LEAD_S later).
    closed_after = "never" if first_close_s is None else f"{first_close_s:.1f} s"
    return {"kind": kind, "closes": closes or "none", "first closed after": closed_after, **stats}


def refused_frame_cost(num_frames: int = 20_000) -> None:
    """Microseconds a session spends on one 100 ms frame refused as audio_buffer_full, and on its parts."""
    from audio_interaction_server.api.commands import AppendAudio
    from audio_interaction_server.api.native import NativeCodec
    from audio_interaction_server.api.session import ModelInfo, Session
    from audio_interaction_server.audio.pcm import decode_pcm
    from audio_interaction_server.config import EngineConfig, ServerConfig
    from audio_interaction_server.demo.source import resolve_model_source
    from audio_interaction_server.engine.worker import Worker
    from audio_interaction_server.model.checkpoint import load_model

    model = load_model(resolve_model_source(None, demo=True), "cpu", "float32")
    config = ServerConfig(engine={"max_sessions": 1}, max_buffered_audio_s=1.0,
                          flood={"refused_audio_burst_s": 1e9})  # refused, never cut: the cost of a refusal
    session = Session("s", config, ModelInfo(model.name, True, model.tokenizer),
                      Worker(model, EngineConfig(max_sessions=1)), lambda events: None, 0.0)
    frame = np.zeros(FRAME_SAMPLES, "<i2").tobytes()
    while not session.handle(AppendAudio(frame), 0.0):
        pass  # until the buffer is full
    refusal = session.handle(AppendAudio(frame), 0.0)[0]

    def per_call_us(call) -> float:
        started = time.perf_counter()
        for _ in range(num_frames):
            call()
        return (time.perf_counter() - started) / num_frames * 1e6

    print(f"refused frame, Session.handle: {per_call_us(lambda: session.handle(AppendAudio(frame), 0.0)):.1f} us")
    print(f"decoding the frame (not done for a refused one): "
          f"{per_call_us(lambda: decode_pcm(frame, 'pcm_s16le', 1)):.1f} us")
    print(f"its error event as JSON: {per_call_us(lambda: NativeCodec.encode(refusal)):.1f} us")


# ---- the victim and the cases ---------------------------------------------------------------
async def victim(url: str, audio: np.ndarray, latencies: list[float]) -> None:
    await stream_timing_decisions(url, audio, time.perf_counter() + 0.2, latencies, MAX_TURN_TOKENS, timeout_s=120)


def worker_busy(port: int) -> tuple[float, float]:
    """(seconds in model steps, steps) so far, from the server's /metrics."""
    values = scrape(f"http://127.0.0.1:{port}", timeout_s=10)
    return values.get("ais_worker_step_seconds_sum", 0.0), values.get("ais_worker_step_seconds_count", 0.0)


def run_case(url: str, kind: str, audio: np.ndarray, seconds: float, reconnect: bool,
             agent_port: int | None = None) -> tuple[list[float], dict]:
    attacker = None
    if kind != "alone":
        attacker = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.hostile", "--attacker", kind, "--url", url.rsplit("/v1/", 1)[0],
             "--seconds", str(seconds + ATTACK_LEAD_S + 1), *(["--reconnect"] if reconnect else []),
             *(["--agent-port", str(agent_port)] if agent_port is not None else [])],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)  # from the root: where the benchmarks package is
        time.sleep(ATTACK_LEAD_S)
    latencies: list[float] = []
    report: dict = {}
    try:
        asyncio.run(victim(url, audio, latencies))
    except Exception as error:  # e.g. the server stopped answering the victim's keepalive pings
        report["victim_failed"] = f"{type(error).__name__}: {error}"
    finally:
        if attacker is not None:
            out, _ = attacker.communicate(timeout=120)
            report.update(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"attacker_failed": True})
    time.sleep(2.0)  # the attacker's session is gone and its queue dropped before the next case
    return latencies, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="victim audio per case (real time)")
    parser.add_argument("--cases", nargs="+", default=["alone", *ATTACKS], choices=["alone", *ATTACKS])
    parser.add_argument("--server-root", type=server_package_dir,
                        help="start `python -m audio_interaction_server` from this checkout (or its server/ folder)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--server-env", nargs="*", default=[], metavar="AIS_X=VALUE",
                        help="extra server settings, e.g. AIS_ENGINE__CPU_THREADS=1")
    parser.add_argument("--reconnect", action="store_true",
                        help="an attacker the server closes connects again and goes on")
    parser.add_argument("--refused-frame-cost", action="store_true", help="only time one refused frame")
    parser.add_argument("--attacker", choices=ATTACKS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--agent-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.refused_frame_cost:
        refused_frame_cost()
        return
    if args.attacker:
        print(json.dumps(asyncio.run(attack(args.url, args.attacker, args.seconds, args.reconnect, args.agent_port))),
              flush=True)
        return

    env = {"AIS_ENGINE__DEVICE": "cpu"}
    if args.checkpoint is not None:
        env["AIS_ENGINE__CHECKPOINT"] = str(args.checkpoint)
    env.update(item.split("=", 1) for item in args.server_env)
    agent_port = None
    if "agent_flood" in args.cases:  # the agent listens only where a port is configured
        env.setdefault("AIS_AGENT_PORT", str(free_port()))
        agent_port = int(env["AIS_AGENT_PORT"])
    root = args.server_root or REPO_ROOT / "server"
    env["PYTHONPATH"] = str(root)  # that checkout's package comes before any installed one
    process, port = spawn_server(None, env, log_to_file=True)
    revision = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    url = f"ws://127.0.0.1:{port}/v1/stream"
    audio = stream_audio(audio_loop(), 0, int(args.seconds * SAMPLE_RATE_HZ))
    attackers = "reconnecting" if args.reconnect else "on one connection each"
    print(f"# server from {root} (HEAD {revision or '?'}) {' '.join(args.server_env)}, {os.cpu_count()} CPUs, "
          f"victim {args.seconds:g} s real time, 100 ms frames, attackers {attackers}\n")
    print("| attack | victim p50 ms | victim p95 ms | victim max ms | decisions | p95 / alone p95 "
          "| worker busy | mean step ms | attacker |")
    print("|---|---|---|---|---|---|---|---|---|")
    alone_p95 = None
    try:
        for kind in args.cases:
            busy_s, steps = worker_busy(port)
            started = time.perf_counter()
            latencies, report = run_case(url, kind, audio, args.seconds, args.reconnect, agent_port)
            busy_s, steps = (a - b for a, b in zip(worker_busy(port), (busy_s, steps)))
            busy = f"{busy_s / (time.perf_counter() - started):.0%} | {busy_s / max(steps, 1) * 1e3:.1f}"
            attacker = ", ".join(f"{key} {value}" for key, value in report.items()
                                 if key != "kind" and not key.startswith("event:"))
            if not latencies:
                print(f"| {kind} | - | - | - | 0 | - | {busy} | {attacker} |", flush=True)
                continue
            p50, p95 = statistics.median(latencies) * 1e3, percentile(latencies, 0.95) * 1e3
            if kind == "alone" and alone_p95 is None:
                alone_p95 = p95
            ratio = f"{p95 / alone_p95:.1f}x" if alone_p95 else "-"
            print(f"| {kind} | {p50:.0f} | {p95:.0f} | {max(latencies) * 1e3:.0f} | {len(latencies)} | {ratio} | "
                  f"{busy} | {attacker} |", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
