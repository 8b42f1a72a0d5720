"""Host CPU per real-time stream, per process and per thread, beside a bare ``websockets`` server in the same run.

    python -m benchmarks.host_cost [--streams 24 48] [--seconds 15] [--checkpoint DIR] [--server-env NAME=VALUE]
                                   [--asgi-floor] [--traffic gentle|browser] [--rounds 1]
                                   [--against OTHER_CHECKOUT/server]

For each stream count N, one client process (``--client``: neither server's process) opens N WebSockets and
sends each 100 ms 16 kHz s16 frames of the shared recordings at real time for ``--seconds``, the streams' frames
spread over the 100 ms; first to ``python -m audio_interaction_server`` (the tiny demo model unless
``--checkpoint``; a decision event per 0.4 s chunk, replies only on request and none requested), then to a bare
server written here (``--bare-server``: plain ``websockets`` on the stock asyncio loop, it receives every frame
and sends one small JSON event, shaped like a decision, per 0.4 s of audio): the same traffic both ways.
``--traffic browser`` sends instead what the browser page sends from a stereo microphone (``api/web``: 48 kHz
s16 stereo in 20 ms frames, five times the frames): the same recordings, resampled and doubled to two channels
by the client. Both
servers run for the whole benchmark, the idle one waits. With ``--asgi-floor`` a third server takes the same
traffic: uvicorn with our transport guard (``api/transport.py``, as ``python -m audio_interaction_server`` runs it)
and a plain ASGI app doing what the bare server does: what the ASGI stack costs before any of our per-stream work.

CPU is read from ``/proc/<pid>/task/*/stat`` (user + system, per thread) just before the first frame and just
after the last: the connection handshakes and the closes are not counted. A thread is labelled by its OS name
(``/proc/<pid>/task/<tid>/comm``: the model worker names itself ``model-worker``); the main thread runs the event
loop; unnamed threads (torch's, executors') are summed. The process row is ``/proc/<pid>/stat``, which also keeps
what threads that ended meanwhile used. Processes the server started (by the parent id in ``/proc/*/stat``: an
engine process, fronts) get rows of their own and a sum over all.

Cost per stream = CPU seconds / (seconds measured x N), in % of one core; flat from the small count to the large
one means it grows with streams only. The ratios divide ours by the bare server's at the same count, measured a
minute apart under the same clients: on a shared machine, compare ratios.

Rounds, and another version of ours, for figures that a shared machine's drift does not decide:

* ``--rounds R`` measures every server R times at each count, the servers' order rotated from round to round (one
  round starts with ours, the next with the bare server, ...). Each round's ratio divides by the bare server's
  figure of the same round, a few seconds away; a summary table gives each server's median and range over the
  rounds, and the median and range of its ratios.
* ``--against SERVER_DIR`` runs a second server of ours, another checkout's ``server`` folder first on its
  ``PYTHONPATH`` (``git worktree add /tmp/base <commit>``, then ``--against /tmp/base/server``), with the same
  environment, in the same rotation: this tree, that one and the bare server measured round by round under the
  same clients, instead of two runs minutes apart.

The per-thread table shows the first round.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.harness import free_port, server_log, server_package_dir, spawn_server, stop_server, wait_for_port

CHUNK_SECONDS = 0.4  # the bare servers send one event per this much audio, as ours sends a decision
AFTER_LAST_FRAME_S = 1.0  # the events of the last frames, before the clients close
EVENT_LOOP = "event loop (main thread)"
UNNAMED = "other threads (unnamed)"
PROCESS = "process (all threads)"
ALL_PROCESSES = "all server processes"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Traffic:
    """What each client stream sends: s16 PCM in this format, one frame every ``frame_s``."""

    sample_rate_hz: int
    num_channels: int
    frame_s: float

    @property
    def frame_bytes(self) -> int:
        return round(self.sample_rate_hz * self.frame_s) * self.num_channels * 2

    @property
    def chunk_bytes(self) -> int:
        """Bytes of 0.4 s of audio: a bare server's event per this many received."""
        return round(self.sample_rate_hz * CHUNK_SECONDS) * self.num_channels * 2

    def describe(self) -> str:
        return (f"{self.sample_rate_hz // 1000} kHz s16 {'mono' if self.num_channels == 1 else 'stereo'}, "
                f"{self.frame_s * 1000:g} ms frames")


TRAFFIC = {
    "gentle": Traffic(16_000, 1, 0.1),  # the model's own format, in large frames: the least work a stream can be
    "browser": Traffic(48_000, 2, 0.02),  # the browser page's frames from a stereo microphone (api/web/app.js)
}


# ---- CPU time from /proc ---------------------------------------------------------------------------------------

def _ticks(stat_line: str) -> int:
    """utime + stime of one ``/proc/.../stat`` line (fields 14 and 15; the name in parentheses may hold spaces)."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started and that still run, and theirs (an engine process of its own, fronts), by
    the parent id in every ``/proc/<pid>/stat`` (``/proc/<pid>/task/*/children`` is not in every kernel)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):  # ended while we looked
            continue
    return [child for direct in sorted(found) for child in [direct, *_children(direct)]]


def _process_cpu(pid: int, prefix: str, seconds: Counter[str]) -> None:
    process_name = Path(f"/proc/{pid}/comm").read_text().strip()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ticks = _ticks((task / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):  # the thread ended between listing and reading
            continue
        main_thread = "main thread" if prefix else EVENT_LOOP  # a child's may run no event loop (an engine)
        label = main_thread if int(task.name) == pid else UNNAMED if name == process_name else name
        seconds[prefix + label] += ticks / CLOCK_TICKS_PER_S
    seconds[prefix + PROCESS] = _ticks(Path(f"/proc/{pid}/stat").read_text()) / CLOCK_TICKS_PER_S


def cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds so far of ``pid`` and of the processes it started: per thread label (see the module docstring)
    and per process; a child's labels start ``child N:`` (N in the order of their process ids)."""
    seconds: Counter[str] = Counter()
    _process_cpu(pid, "", seconds)
    children = _children(pid)
    for number, child in enumerate(children, start=1):
        try:
            _process_cpu(child, f"child {number}: ", seconds)
        except (FileNotFoundError, ProcessLookupError):
            continue
    if children:
        seconds[ALL_PROCESSES] = sum(value for label, value in seconds.items() if label.endswith(PROCESS))
    return dict(seconds)


OURS, OTHER, BARE, ASGI_FLOOR = "ours", "other tree", "bare", "ASGI floor"  # the servers a run can measure
OUR_SERVERS = (OURS, OTHER)  # python -m audio_interaction_server: its /v1/stream, its sessions, its stop


@dataclass
class Measured:
    server: str  # OURS, OTHER, BARE or ASGI_FLOOR
    num_streams: int
    wall_s: float
    cpu_s: dict[str, float]  # per thread label, and PROCESS
    client: dict  # the client process's summary: events received, frames sent

    def percent_per_stream(self, label: str) -> float:
        return 100 * self.cpu_s.get(label, 0.0) / (self.wall_s * self.num_streams)


# ---- the client process ----------------------------------------------------------------------------------------

@dataclass
class Start:
    """When the first frames go out: set once every stream is connected (``perf_counter`` seconds)."""

    event: asyncio.Event
    at: float = 0.0


async def _configure_decisions_only(ws, traffic: Traffic) -> None:
    """The traffic's format, a decision event per chunk and replies only on request (none is asked): the bare
    server's traffic."""
    assert json.loads(await ws.recv())["type"] == "session.created"
    audio = {"sample_format": "pcm_s16le", "sample_rate_hz": traffic.sample_rate_hz,
             "num_channels": traffic.num_channels}
    await ws.send(json.dumps({"type": "session.configure", "decision_events": True, "reply_mode": "on_request",
                              "audio": audio}))
    assert json.loads(await ws.recv())["type"] == "session.updated"


async def _stream(url: str, pcm: bytes, traffic: Traffic, is_ours: bool, offset_s: float, num_frames: int,
                  start: Start, tally: Counter) -> None:
    import websockets

    async with websockets.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        if is_ours:
            await _configure_decisions_only(ws, traffic)
        tally["connected"] += 1
        await start.event.wait()

        async def receive() -> None:
            async for message in ws:
                tally["events"] += 1

        receiver = asyncio.create_task(receive())
        frame_bytes = traffic.frame_bytes
        first_frame_at = start.at + offset_s
        for frame in range(num_frames):
            delay = first_frame_at + frame * traffic.frame_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(pcm[frame * frame_bytes:(frame + 1) * frame_bytes])
            tally["frames"] += 1
        # Every stream's last frame is out at the same moment (the latest offset): its events still arrive.
        last_events_at = start.at + num_frames * traffic.frame_s + AFTER_LAST_FRAME_S
        await asyncio.sleep(max(0.0, last_events_at - time.perf_counter()))
        receiver.cancel()
        if is_ours:
            await ws.send(json.dumps({"type": "session.close"}))


def stream_pcm(loop_audio, stream: int, num_frames: int, traffic: Traffic) -> bytes:
    """``num_frames`` of the shared recordings (``loop_audio``, 16 kHz) for one stream, in the traffic's format."""
    import numpy as np
    import soxr

    from benchmarks.served import stream_audio

    num_samples_16k = math.ceil(num_frames * traffic.frame_s * 16_000) + 64  # soxr's output may come out short
    samples = stream_audio(loop_audio, stream, num_samples_16k)
    if traffic.sample_rate_hz != 16_000:
        samples = soxr.resample(samples, 16_000, traffic.sample_rate_hz)
    samples = samples[:num_frames * traffic.frame_bytes // (2 * traffic.num_channels)]
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    return np.repeat(pcm, traffic.num_channels).tobytes()  # channels interleaved: the same signal in each


async def run_clients(url: str, num_streams: int, seconds: float, is_ours: bool, traffic: Traffic,
                      audio_loop_file: Path | None = None) -> None:
    """N real-time streams; prints ``streaming`` before the first frame, ``sent`` once every stream's last frame
    is out, then a JSON summary (frames sent, events received). ``audio_loop_file``: the shared recordings' loop
    as ``numpy.save`` wrote it (the parent loads them once for every point), else loaded here."""
    import numpy as np

    from benchmarks.served import audio_loop

    loop_audio = audio_loop() if audio_loop_file is None else np.load(audio_loop_file)
    num_frames = round(seconds / traffic.frame_s)
    pcms = [stream_pcm(loop_audio, i, num_frames, traffic) for i in range(num_streams)]
    tally: Counter = Counter()
    start = Start(asyncio.Event())
    streams = [asyncio.create_task(_stream(url, pcms[i], traffic, is_ours, traffic.frame_s * i / num_streams,
                                           num_frames, start, tally)) for i in range(num_streams)]
    while tally["connected"] < num_streams:
        failed = [task for task in streams if task.done()]
        if failed:
            await failed[0]  # raises why the stream could not connect
        await asyncio.sleep(0.05)
    start.at = time.perf_counter() + 0.5  # the parent reads the servers' CPU meanwhile
    print("streaming", flush=True)
    start.event.set()
    await asyncio.sleep(start.at + num_frames * traffic.frame_s - time.perf_counter())
    print("sent", flush=True)
    await asyncio.gather(*streams)
    print(json.dumps({"frames": tally["frames"], "events": tally["events"]}), flush=True)


def measure(server: str, pid: int, url: str, num_streams: int, seconds: float, traffic_name: str,
            audio_loop_file: Path | None = None) -> Measured:
    """One point: the client process against one server, the server's CPU read around the streaming."""
    client = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.host_cost", "--client", url, "--streams", str(num_streams),
         "--seconds", str(seconds), "--traffic", traffic_name] + (["--ours"] if server in OUR_SERVERS else [])
        + ([] if audio_loop_file is None else ["--audio-loop", str(audio_loop_file)]),
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert client.stdout is not None
        if client.stdout.readline().strip() != "streaming":
            raise RuntimeError(f"the client process did not connect its {num_streams} streams (exit {client.wait()})")
        time.sleep(0.4)  # the first frames are due 0.5 s after "streaming"
        before, started = cpu_by_thread(pid), time.perf_counter()
        if client.stdout.readline().strip() != "sent":
            raise RuntimeError(f"the client process stopped streaming (exit {client.wait()})")
        after, wall_s = cpu_by_thread(pid), time.perf_counter() - started
        summary = json.loads(client.stdout.readline())
        if client.wait(timeout=60) != 0:
            raise RuntimeError(f"the client process failed (exit {client.returncode})")
    finally:
        if client.poll() is None:
            client.kill()
    cpu_s = {label: after[label] - before.get(label, 0.0) for label in after}
    return Measured(server, num_streams, wall_s, cpu_s, summary)


# ---- the bare server -------------------------------------------------------------------------------------------

def bare_event(chunk: int) -> str:
    """The decision-sized JSON event the bare servers send per 0.4 s of audio."""
    return json.dumps({"type": "decision", "session_id": "bare", "server_time_ms": int(time.time() * 1000),
                       "chunk": chunk, "token_id": 151667, "decision": "keep_silence",
                       "audio_time_s": 0.4 * (chunk + 1)}, separators=(",", ":"))


async def serve_bare(port: int, traffic: Traffic) -> None:
    """Plain ``websockets``: every frame received, one decision-sized JSON event per 0.4 s of audio."""
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        received_bytes, chunk = 0, 0
        async for frame in ws:
            received_bytes += len(frame)
            while received_bytes >= (chunk + 1) * traffic.chunk_bytes:
                await ws.send(bare_event(chunk))
                chunk += 1

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None):
        print("listening", flush=True)
        await asyncio.Future()


def serve_asgi_floor(port: int, traffic: Traffic) -> None:
    """The bare server's work as a plain ASGI app under uvicorn with our transport guard: the ASGI stack's cost."""
    import uvicorn

    from audio_interaction_server.api.transport import uvicorn_options
    from audio_interaction_server.api.transport_guard import TransportGuard
    from audio_interaction_server.config import TransportSettings

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
                print("listening", flush=True)
            await send({"type": "lifespan.shutdown.complete"})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        received_bytes, chunk = 0, 0
        while (message := await receive())["type"] == "websocket.receive":
            received_bytes += len(message.get("bytes") or b"")
            while received_bytes >= (chunk + 1) * traffic.chunk_bytes:
                await send({"type": "websocket.send", "text": bare_event(chunk)})
                chunk += 1

    guard = TransportGuard(TransportSettings())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(guard))


def spawn_bare_server(kind: str = "--bare-server", traffic_name: str = "gentle") -> tuple[subprocess.Popen, int]:
    """``--bare-server`` (plain websockets) or ``--asgi-floor-server``, in a process of its own, for that traffic."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.host_cost", kind, "--port", str(port),
                                "--traffic", traffic_name],
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert process.stdout is not None
    if process.stdout.readline().strip() != "listening":
        raise RuntimeError(f"the {kind[2:]} did not start (exit {process.wait()})")
    wait_for_port(port)  # uvicorn's lifespan start-up ends before it binds
    return process, port


# ---- the report ------------------------------------------------------------------------------------------------

def event_loop_of(server_env: dict[str, str]) -> str:
    """What uvicorn's ``loop="auto"`` picks in the server's environment: uvloop when importable there."""
    probe = subprocess.run([sys.executable, "-c", "import uvloop; print(uvloop.__version__)"],
                           env={**os.environ, **server_env}, capture_output=True, text=True)
    return f"uvloop {probe.stdout.strip()}" if probe.returncode == 0 else "asyncio"


def table(points: list[tuple[Measured, Measured, Measured | None]]) -> str:
    """Markdown: per stream count, each of our threads and process beside the bare server's (and the ASGI floor's,
    when measured), with the ratios."""
    has_floor = any(floor is not None for _, _, floor in points)
    extra = " ASGI floor | floor / bare |" if has_floor else ""
    lines = [f"| streams | process / thread | ours: % of a core per stream | bare websockets | ours / bare |{extra}",
             "|---|---|---|---|---|" + ("---|---|" if has_floor else "")]
    for ours, bare, asgi_floor in points:
        named = sorted(set(ours.cpu_s) - {EVENT_LOOP, PROCESS, UNNAMED, ALL_PROCESSES})
        labels = [EVENT_LOOP, *named, UNNAMED, PROCESS] + ([ALL_PROCESSES] if ALL_PROCESSES in ours.cpu_s else [])
        for label in labels:
            mine = ours.percent_per_stream(label)
            # The bare server is one process and one thread: the floor of a loop, of a process, of them all.
            compared = label in (EVENT_LOOP, PROCESS, ALL_PROCESSES)
            bare_label = PROCESS if label == ALL_PROCESSES else label
            floor = bare.percent_per_stream(bare_label) if compared else None
            ratio = f"{mine / floor:.2f}" if floor else "-"
            shown = "-" if floor is None else f"{floor:.3f}"
            line = f"| {ours.num_streams} | {label} | {mine:.3f} | {shown} | {ratio} |"
            if has_floor:
                asgi = asgi_floor.percent_per_stream(bare_label) if compared and asgi_floor is not None else None
                line += (" - | - |" if asgi is None else
                         f" {asgi:.3f} | {asgi / floor:.2f} |" if floor else f" {asgi:.3f} | - |")
            lines.append(line)
    return "\n".join(lines)


@dataclass(frozen=True)
class Served:
    """A server the clients stream to: its process, port and WebSocket path."""

    process: subprocess.Popen
    port: int
    path: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"


def print_point(measured: Measured, seconds: float, traffic: Traffic, round_number: int | None) -> None:
    """What the client saw of one point: every frame should have gone out, and events come back."""
    expected = measured.num_streams * round(seconds / traffic.frame_s)
    where = f"round {round_number}, " if round_number is not None else ""
    print(f"# {where}{measured.num_streams} streams, {measured.server}: {measured.wall_s:.1f} s measured, frames sent "
          f"{measured.client['frames']}/{expected}, events received {measured.client['events']} "
          f"({measured.client['events'] / measured.num_streams / seconds:.2f} per stream per s)", flush=True)


def _ratios(mine: list[float], bare: list[float]) -> list[float]:
    """Round by round; a round where the bare server used no clock tick (a very short run) has none."""
    return [value / floor for value, floor in zip(mine, bare) if floor > 0]


def _spread(values: list[float], digits: int) -> str:
    """``median (lowest-highest)``, the one value, or ``-`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summary_table(rounds: list[dict[int, dict[str, Measured]]], stream_counts: list[int]) -> str:
    """Markdown: per stream count and server, the event loop's and the process's % of a core per stream over the
    rounds, and their ratios to the bare server of each round (the bare server's row gives its own figures)."""
    lines = ["| streams | server | event loop | process | loop / bare | process / bare |", "|---|---|---|---|---|---|"]
    for num_streams in stream_counts:
        points = [by_count[num_streams] for by_count in rounds]
        for name in points[0]:
            loops = [point[name].percent_per_stream(EVENT_LOOP) for point in points]
            processes = [point[name].percent_per_stream(PROCESS) for point in points]
            if name == BARE:
                lines.append(f"| {num_streams} | {name} | {_spread(loops, 3)} | {_spread(processes, 3)} | - | - |")
                continue
            ratios = [_spread(_ratios(mine, [point[BARE].percent_per_stream(label) for point in points]), 2)
                      for mine, label in ((loops, EVENT_LOOP), (processes, PROCESS))]
            lines.append(f"| {num_streams} | {name} | {_spread(loops, 3)} | {_spread(processes, 3)} | "
                         f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured streaming time per point")
    parser.add_argument("--checkpoint", type=Path, help="our server's model (default: the tiny demo model)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for our server only; repeatable")
    parser.add_argument("--asgi-floor", action="store_true",
                        help="also measure uvicorn + our transport guard + a plain ASGI app doing the bare "
                        "server's work")
    parser.add_argument("--traffic", choices=sorted(TRAFFIC), default="gentle",
                        help="gentle: 16 kHz s16 mono in 100 ms frames; browser: 48 kHz s16 stereo in 20 ms frames")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every server this many times at each count, the order rotated each round")
    parser.add_argument("--against", metavar="SERVER_DIR", type=server_package_dir,
                        help="also measure our server from another checkout (or its server/ folder), in the same "
                        "rounds")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the client process
    parser.add_argument("--audio-loop", type=Path, help=argparse.SUPPRESS)  # the client's audio, as the parent saved it
    parser.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)  # the bare server process
    parser.add_argument("--asgi-floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    traffic = TRAFFIC[args.traffic]
    if args.client:
        asyncio.run(run_clients(args.client, args.streams[0], args.seconds, args.ours, traffic, args.audio_loop))
        return
    if args.bare_server:
        asyncio.run(serve_bare(args.port, traffic))
        return
    if args.asgi_floor_server:
        serve_asgi_floor(args.port, traffic)
        return

    import numpy as np

    from benchmarks.served import audio_loop

    server_env = {"AIS_ENGINE__MAX_SESSIONS": str(max(args.streams)), "AIS_ENGINE__DEVICE": "cpu"}
    server_env.update(item.split("=", 1) for item in args.server_env)
    if args.checkpoint is not None:
        server_env["AIS_ENGINE__CHECKPOINT"] = str(args.checkpoint)
    print(f"# python -m benchmarks.host_cost {' '.join(sys.argv[1:])}")
    print(f"# {os.cpu_count()} CPUs; our server's event loop: {event_loop_of(server_env)}, server env "
          f"{args.server_env or 'default'}{'; other tree: ' + str(args.against) if args.against else ''}; "
          f"bare server: websockets on asyncio"
          f"{'; ASGI floor: uvicorn on ' + event_loop_of({}) if args.asgi_floor else ''}; "
          f"{args.seconds:g} s per point; traffic: {traffic.describe()}\n")
    audio_directory = tempfile.TemporaryDirectory(prefix="host-cost-")
    audio_loop_file = Path(audio_directory.name) / "loop.npy"
    np.save(audio_loop_file, audio_loop())  # once here, not in every point's client process
    # Every server starts at once (each start is seconds of imports and, for ours, a model load), then waits.
    starts: dict[str, Callable[[], tuple[subprocess.Popen, int]]] = {
        OURS: functools.partial(spawn_server, None, server_env, log_to_file=True)}
    if args.against:
        other_env = {**server_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.against),
                                                                            server_env.get("PYTHONPATH")]))}
        starts[OTHER] = functools.partial(spawn_server, None, other_env, log_to_file=True)
    starts[BARE] = functools.partial(spawn_bare_server, "--bare-server", args.traffic)
    if args.asgi_floor:
        starts[ASGI_FLOOR] = functools.partial(spawn_bare_server, "--asgi-floor-server", args.traffic)
    with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
        started = {name: pool.submit(start) for name, start in starts.items()}
    failed = [future.exception() for future in started.values() if future.exception() is not None]
    if failed:  # none may outlive the benchmark
        for future in started.values():
            if future.exception() is None:
                future.result()[0].kill()
        raise failed[0]
    servers = {name: Served(*future.result(), "/" if name in (BARE, ASGI_FLOOR) else "/v1/stream")
               for name, future in started.items()}
    rounds: list[dict[int, dict[str, Measured]]] = []  # per round, per stream count, per server
    try:
        for round_index in range(args.rounds):
            rounds.append({})
            for num_streams in args.streams:
                names = list(servers)
                names = names[round_index % len(names):] + names[:round_index % len(names)]  # who goes first rotates
                rounds[-1][num_streams] = measured = {}
                for name in names:
                    served = servers[name]
                    measured[name] = measure(name, served.process.pid, served.url, num_streams, args.seconds,
                                             args.traffic, audio_loop_file)
                    if name in OUR_SERVERS:
                        _wait_until_idle(served.port)  # its sessions closed before its next point
                    print_point(measured[name], args.seconds, traffic, round_index + 1 if args.rounds > 1 else None)
    finally:
        audio_directory.cleanup()
        for name, served in servers.items():
            if name not in OUR_SERVERS:  # the bare server, the ASGI floor: plain processes of this benchmark
                served.process.terminate()
                served.process.wait(timeout=30)
                continue
            code = stop_server(served.process)
            if code != 0 or "Traceback" in server_log(served.process):
                print(f"# {name}: the server exited {code}; its log:\n{server_log(served.process)[-3000:]}")
    print()
    if args.rounds > 1:
        print("# round 1:")
    print(table([(points[OURS], points[BARE], points.get(ASGI_FLOOR)) for points in rounds[0].values()]))
    if args.rounds > 1 or args.against:
        print(f"\n# every round ({args.rounds}): median (lowest-highest); a ratio divides by its round's bare server")
        print(summary_table(rounds, args.streams))


def _wait_until_idle(port: int) -> None:
    from benchmarks.realtime_latency import wait_until_idle

    wait_until_idle(port)


if __name__ == "__main__":
    main()
