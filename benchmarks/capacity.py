"""Capacity: how many real-time streams one device serves, against the reference's way of serving.

    python -m benchmarks.capacity [--mode direct websocket baseline] [--streams 1 8 32 64]
                                  [--seconds 20] [--model tiny|real|CHECKPOINT_DIR] [--device auto]
                                  [--dtype auto] [--schedule 25:20 | --schedule model] [--audio DIR]

For every N in ``--streams`` and every mode, N simulated clients stream real
audio (``../shared/audio`` looped, a different place per stream) at real-time
pace, staggered over one 0.4 s chunk, and the run reports:

* decision latency p50/p95/p99: chunk complete -> its decision;
* time to first reply token after TEXT_BEGIN (p50/p95) and reply tokens/s per reply;
* step time split into encoder, LM (forward + logits + the step's one device read)
  and host (planning, batch building, commits, event fan-out);
* peak accelerator memory of the run (or the process's peak RSS so far on CPU);
* PASS when p95 decision latency <= --target-ms, p95 time to first token <=
  --ttft-target-ms and every decision arrived; the largest passing N is the capacity. A target with nothing to
  judge (no reply timed in a short run) does not fail a run; its PASS names it ("PASS; not judged: first token").
  (``Targets`` can also hold reply speed and host share; ``benchmarks.gpu_check`` checks all four.)

Modes:

direct     the engine's worker thread, fed in this process (audio already turned
           into mel chunks: the per-connection front-end runs on the event loop in
           the server and is measured by ``websocket``). Clock: chunk pushed -> decision emitted.
direct-exact  ``direct`` with every encoder call at its own batch size instead of
           padded to a bucket (``engine.encoder_batch_buckets: false``): what the
           padding costs.
websocket  ``python -m audio_interaction_server`` in a subprocess, one WebSocket client per stream sending
           100 ms PCM frames. Clock: frame completing the chunk sent -> ``decision`` received.
           Needs a checkpoint directory (the tiny demo by default), not ``--model real`` (write a real-size
           one with ``python -m audio_interaction_server.demo.make_tiny_checkpoint DIR --preset real``).
           ``--fronts N`` serves with N front processes on one engine (``serve --fronts N``, stream i on
           front i mod N); ``--client-processes K`` runs the clients in K processes of their own, as many
           streams need (a process's event loop is one core). Run alone, this mode loads no model itself.
baseline   the reference's way of serving, as a mode of our engine (same model code):
           one stream at a time, batch size 1, log-mel + audio encoder over the
           whole audio history for every chunk, reply tokens generated inline, and
           the context (and audio history) reset after each reply. Clock: chunk due -> decision.

``--schedule K:L`` (default 25:20 for random weights) replaces the model's decisions
with a reply every K chunks per stream (staggered) of exactly L tokens
(``engine.scripted_turns``), so the speaking load is known: 25:20 puts about
10% of streams mid-reply at 20 tokens/s. ``--schedule model`` lets the model decide.
Runs with a schedule say so in their header.

The first 3 chunks of each stream (its 58-token first row) are left out of the
latency percentiles as warm-up; everything else is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.audio.mel import StreamingLogMel, log_mel_whole
from audio_interaction_server.model.checkpoint import MODEL_DTYPES, CheckpointError, LoadedModel, load_model
from audio_interaction_server.config import EngineConfig, ScriptedTurns
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.conversation import Conversation
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.engine.events import Decision, SessionEnded, TurnBegin, TurnEnd, TurnToken
from audio_interaction_server.engine.runner import PlannedRow, Runner
from audio_interaction_server.engine.scripted import scripted_token
from audio_interaction_server.spec import CHUNK_S, CHUNK_SAMPLES, SAMPLE_RATE_HZ
from audio_interaction_server.engine.events import StepStats
from audio_interaction_server.engine.worker import Worker

from benchmarks.harness import scrape, server_log, shared_audio_dir, spawn_server, wait_until_ready
from benchmarks.served import (
    FRAME_SAMPLES, audio_loop, chunks_decided, completing_frame, configure_s16_stream, send_in_real_time, stream_audio,
)

WARMUP_CHUNKS = 3
MAX_TURN_TOKENS = 64  # the cap for model-decided replies; scripted replies are shorter


# ---------------------------------------------------------------------------------------------
# Audio


def stream_seconds(loop: np.ndarray, stream: int, seconds: float) -> np.ndarray:
    """``seconds`` of a stream's audio plus one chunk, so its last full-duration chunk completes."""
    return stream_audio(loop, stream, int(seconds * SAMPLE_RATE_HZ) + CHUNK_SAMPLES)


def mel_chunks(loop: np.ndarray) -> list[torch.Tensor]:
    """The whole loop as mel chunks, computed once and shared by every direct-mode stream."""
    return StreamingLogMel().push(loop)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Run:
    mode: str
    streams: int
    seconds: float
    expected_decisions: int = 0
    decision_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    reply_rates: list[float] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)
    memory_mib: float = 0.0
    errors: int = 0
    max_sessions: int = 0  # KV-cache slots of the worker (direct modes); may exceed ``streams``
    setup_s: float = 0.0  # worker start-up: KV cache, attention self-check and compilation
    started_worker: bool = True  # the run started its worker (False: a ramp's shared one served it)
    attention: str = ""  # the attention path the worker chose, and why
    sessions_per_front: list[int] = field(default_factory=list)  # websocket: sessions each front served
    step_path: dict = field(default_factory=dict)  # direct: how short batches ran (static_step_path)

    @property
    def is_complete(self) -> bool:
        return bool(self.decision_s) and len(self.decision_s) >= self.expected_decisions and self.errors == 0


@dataclass(frozen=True)
class StepSplit:
    """Where a run's step time went, per step with rows (means), and how many rows a step carried."""

    num_steps: int
    step_ms: float
    encoder_ms: float
    lm_ms: float  # batch to the device, forward, logits and the step's one device->host read
    host_ms: float  # the rest: commands, planning, commits, event fan-out
    rows_mean: float
    rows_max: int

    def share(self, part_ms: float) -> float:
        return part_ms / self.step_ms if self.step_ms else 0.0


def step_split(run: Run) -> StepSplit | None:
    steps = [s for s in run.steps if s.num_rows]
    if not steps:
        return None
    n = len(steps)
    total, encode, forward = (sum(getattr(s, f) for s in steps) for f in ("total_s", "encode_s", "forward_s"))
    return StepSplit(n, 1e3 * total / n, 1e3 * encode / n, 1e3 * forward / n, 1e3 * (total - encode - forward) / n,
                     statistics.mean(s.num_rows for s in steps), max(s.num_rows for s in steps))


@dataclass(frozen=True)
class Targets:
    """What a run must hold to count towards capacity; a target left None is not checked."""

    decision_p95_ms: float = 100.0
    first_token_p95_ms: float = 50.0
    reply_tokens_per_s: float | None = None  # the slowest 5% of replies must still reach this
    host_share: float | None = None  # host share of step time must stay below this

    def checks(self, run: Run) -> dict[str, bool | None]:
        """Each target's verdict (None: nothing to judge, e.g. no reply in the run)."""
        split = step_split(run)
        checks: dict[str, bool | None] = {
            "complete": run.is_complete,
            "decision_p95": bool(run.decision_s) and pct(run.decision_s, 95) * 1e3 <= self.decision_p95_ms,
            "first_token_p95": (pct(run.first_token_s, 95) * 1e3 <= self.first_token_p95_ms
                                if run.first_token_s else None),
        }
        if self.reply_tokens_per_s is not None:
            checks["reply_rate_p5"] = (pct(run.reply_rates, 5) >= self.reply_tokens_per_s
                                       if run.reply_rates else None)
        if self.host_share is not None:
            checks["host_share"] = split.share(split.host_ms) < self.host_share if split else None
        return checks

    def passes(self, run: Run) -> bool:
        return all(verdict is not False for verdict in self.checks(run).values())

    def verdict(self, run: Run) -> str:
        """PASS or fail, and which targets a pass did not judge (a run too short to time a reply passed without a
        word about its first-token target)."""
        if not self.passes(run):
            return "fail"
        unjudged = [UNJUDGED_NAMES[name] for name, verdict in self.checks(run).items() if verdict is None]
        return f"PASS; not judged: {', '.join(unjudged)}" if unjudged else "PASS"


# A target with nothing to judge in a run, as its verdict says it.
UNJUDGED_NAMES = {"first_token_p95": "first token (no reply timed)", "reply_rate_p5": "reply speed (no reply timed)",
                  "host_share": "host share (no step timed)"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def fmt_ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1e3:.1f}" if values else "-"


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's accelerator peak from what is allocated now (process RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class TurnClock:
    """Time to first reply token and tokens/s, from engine events or wire events of one stream."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.began: float | None = None
        self.first: float | None = None

    def begin(self, now: float) -> None:
        self.began, self.first = now, None

    def token(self, now: float) -> None:
        if self.began is not None and self.first is None:
            self.first = now
            self.run.first_token_s.append(now - self.began)

    def end(self, now: float, num_tokens: int) -> None:
        if self.began is not None and num_tokens > 0 and now > self.began:
            self.run.reply_rates.append(num_tokens / (now - self.began))
        self.began = None


# ---------------------------------------------------------------------------------------------
# direct: the worker thread, fed in this process


def start_worker(model: LoadedModel, engine: dict, max_sessions: int) -> tuple[Worker, float]:
    """A started worker, and its start-up seconds (cache, graphs, checks)."""
    started = time.perf_counter()
    worker = Worker(model, EngineConfig(max_sessions=max_sessions, **engine))
    worker.start()
    return worker, time.perf_counter() - started


class SharedWorker:
    """One worker serving a ramp of ``run_direct`` calls in turn, its slots at the ramp's largest N, as a deployed
    server serves every load: one start-up (on CUDA, every bucket's graph captured: 23-29 s on the H200) instead
    of one per N, and one cache shape, so compiled kernels are reused. The first run that needs it starts it; a
    run that left it dead (a failing N) makes the next start another."""

    def __init__(self, model: LoadedModel, engine: dict, max_sessions: int) -> None:
        self.model, self.engine, self.max_sessions = model, engine, max_sessions
        self.worker: Worker | None = None

    def take(self) -> tuple[Worker, float | None]:
        """The worker, and its start-up seconds if this call started it (None: it was serving already)."""
        if self.worker is not None and self.worker.is_alive:
            return self.worker, None
        self.stop()
        self.worker, setup_s = start_worker(self.model, self.engine, self.max_sessions)
        return self.worker, setup_s

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


def run_direct(model: LoadedModel, chunks: list[torch.Tensor], streams: int, seconds: float,
               engine: dict, name: str = "direct", max_sessions: int | None = None, drain_s: float = 30.0,
               on_serving: Callable[[], None] | None = None, shared: SharedWorker | None = None) -> Run:
    """``max_sessions`` (default ``streams``): the worker's slots. A ramp that keeps it at its largest N
    serves every N with one cache shape, as a deployed server does, so compiled kernels are reused.
    ``drain_s``: how long decisions may still arrive after the last chunk (later ones count as missing).
    ``on_serving``: called once the worker is up, before the first chunk (e.g. to start a profiler then).
    ``shared``: the ramp's worker serves the run (``engine`` and ``max_sessions`` then being its own), started
    now if it is not serving; the run's sessions are closed at its end and the worker goes on. Without, the run
    starts its own worker and stops it."""
    if shared is None:
        worker, setup_s = start_worker(model, engine, max_sessions or streams)
    else:
        worker, setup_s = shared.take()
    run = Run(name, streams, seconds, max_sessions=worker.config.max_sessions)
    run.setup_s, run.started_worker = setup_s or 0.0, setup_s is not None
    try:
        return _run_direct(run, model, worker, chunks, drain_s, on_serving)
    finally:
        if shared is None:
            worker.stop()
        else:
            _close_sessions(worker, streams)


def session_name(stream: int) -> str:
    """A direct run's session id for stream ``stream`` (the same in every run: a shared worker closes them)."""
    return f"s{stream}"


def _close_sessions(worker: Worker, streams: int, timeout_s: float = 30.0) -> None:
    """Close a run's sessions on a shared worker and wait until it holds none (their slots are free again)."""
    worker.on_step = None
    for i in range(streams):
        worker.close_session(session_name(i))
    deadline = time.monotonic() + timeout_s
    while worker.num_sessions and worker.is_alive:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker.num_sessions} sessions still open {timeout_s:g} s after the run's close")
        time.sleep(0.01)


def static_step_path(worker: Worker, counts_before=None) -> dict:
    """Whether the worker serves short batches by graph replays, the static step run eagerly or the eager path,
    and how many of this run's batches took each (the counts since ``counts_before``, a copy taken at its start).

    A worker whose start-up self-check refused its CUDA graphs serves on without them (a log line says so): the
    figures of such a run are the eager static step's, and the report has to say it."""
    static = worker.runner.static
    path = worker.step_path
    if static is None or not path.static:
        return {"path": "eager", "graphs": "none: no static step"}
    graphs = {"failed": f"capture FAILED ({path.capture_error})", "refused": "REFUSED by the self-check"}.get(
        path.graphs, path.graphs)
    counts = {name: value - (getattr(counts_before, name) if counts_before is not None else 0)
              for name, value in vars(static.counts).items()}
    return {"path": "static", "graphs": graphs, "captured": path.num_graphs,
            "capture_s": round(path.capture_s, 2), "pool_mib": round(path.pool_bytes / 2**20, 1), **counts}


def _run_direct(run: Run, model: LoadedModel, worker: Worker, chunks: list[torch.Tensor], drain_s: float,
                on_serving: Callable[[], None] | None) -> Run:
    streams, seconds = run.streams, run.seconds
    reset_peak_memory(model.device)
    run.attention = f"{worker.attention.backend} ({worker.attention.reason})"
    counts_before = replace(worker.runner.static.counts) if worker.runner.static is not None else None
    worker.on_step = run.steps.append
    chunks_per_stream = int(seconds / CHUNK_S)
    pushed_at: dict[tuple[int, int], float] = {}
    lock = threading.Lock()
    stopping = threading.Event()  # sessions the final stop() ends are not errors

    def emit_for(stream: int):
        clock = TurnClock(run)

        def emit(events) -> None:
            if stopping.is_set():
                return  # the run's end: a reply cut by its close is not a reply timed
            now = time.perf_counter()
            for event in events:
                if isinstance(event, Decision):
                    with lock:
                        pushed = pushed_at.pop((stream, event.chunk_index), None)
                    if pushed is not None and event.chunk_index >= WARMUP_CHUNKS:
                        run.decision_s.append(now - pushed)
                elif isinstance(event, TurnBegin):
                    clock.begin(now)
                elif isinstance(event, TurnToken):
                    clock.token(now)
                elif isinstance(event, TurnEnd):
                    clock.end(now, len(event.token_ids))
                elif isinstance(event, SessionEnded) and event.error_code and not stopping.is_set():
                    run.errors += 1
        return emit

    options = SessionOptions(max_turn_tokens=MAX_TURN_TOKENS)
    for i in range(streams):
        worker.open_session(session_name(i), options, emit_for(i))
    if on_serving is not None:
        on_serving()
    offsets = [(i * 7) % len(chunks) for i in range(streams)]
    schedule = sorted((i * CHUNK_S / streams + k * CHUNK_S, i, k) for i in range(streams)
                      for k in range(chunks_per_stream))
    run.expected_decisions = streams * (chunks_per_stream - WARMUP_CHUNKS)
    start = time.perf_counter() + 0.2
    for due, stream, k in schedule:
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with lock:
            pushed_at[(stream, k)] = time.perf_counter()
        worker.push_audio(session_name(stream), chunks[(offsets[stream] + k) % len(chunks)].unsqueeze(0))
    deadline = time.perf_counter() + drain_s
    while pushed_at and time.perf_counter() < deadline:
        time.sleep(0.02)
    stopping.set()
    run.memory_mib = memory_mib(model.device)
    run.step_path = static_step_path(worker, counts_before)
    return run


# ---------------------------------------------------------------------------------------------
# websocket: the real server in a subprocess


async def websocket_client(url: str, stream: int, audio: np.ndarray, offset_s: float, start: float,
                           run: Run, num_frames: int) -> None:
    import websockets

    sent_at: dict[int, float] = {}
    clock = TurnClock(run)
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        await configure_s16_stream(ws, MAX_TURN_TOKENS)
        expected_chunks = chunks_decided(num_frames)

        async def receive() -> None:
            received = 0
            while received < expected_chunks:
                event = json.loads(await ws.recv())
                now = time.perf_counter()
                kind = event["type"]
                if kind == "decision":
                    received += 1
                    if event["chunk"] >= WARMUP_CHUNKS:
                        run.decision_s.append(now - sent_at[completing_frame(event["chunk"])])
                elif kind == "turn_begin":
                    clock.begin(now)
                elif kind in ("emotion", "text_delta"):
                    clock.token(now)
                elif kind == "turn_end":
                    clock.end(now, event["num_tokens"])
                elif kind in ("error", "session.closed"):
                    run.errors += 1
                    return

        receiver = asyncio.create_task(receive())
        await send_in_real_time(ws, audio, num_frames, start + offset_s, sent_at)
        await asyncio.wait_for(receiver, timeout=60)
        await ws.send(json.dumps({"type": "session.close"}))


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM) on Linux; 0 where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass(frozen=True)
class ClientShare:
    """What one client process streams in a ``websocket`` run: its streams, the fronts they go to, when they start.
    Crosses to the process as JSON; ``start_wall_s`` is wall-clock time (every process on the host shares it)."""

    urls: list[str]  # one per front: stream i goes to urls[i % len(urls)]
    stream_ids: list[int]
    total_streams: int  # the run's streams: they are staggered over one chunk together
    seconds: float
    start_wall_s: float
    audio_dir: str | None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


async def run_client_share(share: ClientShare, loop: np.ndarray, run: Run) -> None:
    """Stream ``share``'s streams into ``run`` (decision and first-token latencies, reply rates, errors)."""
    num_frames = int(share.seconds * SAMPLE_RATE_HZ) // FRAME_SAMPLES + 1
    start = time.perf_counter() + (share.start_wall_s - time.time())
    await asyncio.gather(*(websocket_client(share.urls[i % len(share.urls)], i, stream_seconds(loop, i, share.seconds),
                                            i * CHUNK_S / share.total_streams, start, run, num_frames)
                           for i in share.stream_ids))


def client_process_main(spec: str) -> None:
    """``--websocket-clients SPEC``: a client process of a ``websocket`` run; its results as one JSON line."""
    share = ClientShare(**json.loads(spec))
    run = Run("websocket", len(share.stream_ids), share.seconds)
    asyncio.run(run_client_share(share, audio_loop(Path(share.audio_dir) if share.audio_dir else None), run))
    print(json.dumps({"decision_s": run.decision_s, "first_token_s": run.first_token_s,
                      "reply_rates": run.reply_rates, "errors": run.errors}), flush=True)


def run_websocket(checkpoint: Path, loop: np.ndarray, streams: int, seconds: float, engine: dict,
                  fronts: int = 1, client_processes: int = 1, device: str = "cpu",
                  audio_dir: Path | None = None) -> Run:
    """The server with ``fronts`` front processes on one engine (``--fronts``; stream i to front i mod N), its
    clients in this process or, with ``client_processes`` > 1, in that many processes of their own (each
    process's event loop is one core)."""
    run = Run("websocket", streams, seconds)
    env = {"AIS_ENGINE__MAX_SESSIONS": str(streams), "AIS_ENGINE__CHECKPOINT": str(checkpoint),
           "AIS_MAX_SESSIONS": str(streams), "AIS_ENGINE__DEVICE": device, "AIS_FRONTS": str(fronts)}
    for key, value in engine.items():
        if isinstance(value, dict):
            env.update({f"AIS_ENGINE__{key.upper()}__{k.upper()}": str(v) for k, v in value.items()})
        else:
            env[f"AIS_ENGINE__{key.upper()}"] = str(value)
    process, port = spawn_server(None, env, log_to_file=True, timeout_s=600, free_ports=fronts)
    urls = [f"ws://127.0.0.1:{port + i}/v1/stream" for i in range(fronts)]
    num_frames = int(seconds * SAMPLE_RATE_HZ) // FRAME_SAMPLES + 1
    run.expected_decisions = streams * (chunks_decided(num_frames) - WARMUP_CHUNKS)
    try:
        for front_port in range(port + 1, port + fronts):  # the first front answered in spawn_server
            if not wait_until_ready(front_port, 120.0):
                raise RuntimeError(f"the front on port {front_port} did not become ready in 120 s")
        # Every client connects and loads its audio before the first frame: 2 s, and 1 s per 100 streams.
        start_wall_s = time.time() + 2.0 + streams / 100
        shares = [ClientShare(urls, list(range(k, streams, client_processes)), streams, seconds, start_wall_s,
                              None if audio_dir is None else str(audio_dir)) for k in range(client_processes)]
        if client_processes == 1:
            asyncio.run(run_client_share(shares[0], loop, run))
        else:
            clients = [subprocess.Popen([sys.executable, "-m", "benchmarks.capacity", "--websocket-clients",
                                         share.to_json()], stdout=subprocess.PIPE, text=True) for share in shares]
            for client, share in zip(clients, shares):
                out, _ = client.communicate(timeout=seconds + 300)
                if client.returncode != 0:
                    run.errors += len(share.stream_ids)
                    continue
                result = json.loads(out.strip().splitlines()[-1])
                run.decision_s += result["decision_s"]
                run.first_token_s += result["first_token_s"]
                run.reply_rates += result["reply_rates"]
                run.errors += result["errors"]
        run.memory_mib = peak_rss_mib(process.pid) if fronts == 1 else 0.0  # the server's, not the clients'
        run.sessions_per_front = sessions_ended_per_front(port, fronts, streams)
    finally:
        process.terminate()
        process.wait(timeout=60)
    if run.errors:
        print(server_log(process)[-2000:], file=sys.stderr)
    return run


def sessions_ended_per_front(first_port: int, count: int, streams: int, timeout_s: float = 10.0) -> list[int]:
    """Sessions each front has ended (``ais_sessions_total``), once they add up to ``streams`` or after
    ``timeout_s``: where the streams went."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [round(sum(value for name, value in scrape(f"http://127.0.0.1:{port}").items()
                            if name.startswith("ais_sessions_total{")))
                  for port in range(first_port, first_port + count)]
        if sum(counts) >= streams or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# baseline: the reference's way of serving, on our model code


class ReferenceStyleStream:
    """One stream served the reference's way: whole-history features, batch 1, reset after each reply."""

    def __init__(self, model: LoadedModel, runner: Runner, slot: int, prefix: list[int],
                 script: ScriptedTurns | None, run: Run) -> None:
        self.model, self.runner, self.encoder, self.slot = model, runner, runner.encoder, slot
        self.prefix, self.script, self.run = prefix, script, run
        self.clock = TurnClock(run)
        self.reset()

    def reset(self) -> None:
        self.history = np.zeros(0, dtype=np.float32)
        self.conversation = Conversation(self.prefix, MAX_TURN_TOKENS, 4096, None)
        self.runner.clear_slot(self.slot)

    def step(self, row_tokens_audio) -> int:
        """One row through the engine's runner (batch of 1, greedy), its audio already encoded the reference's way."""
        plan = self.conversation.plan()
        (result,) = self.runner.run([PlannedRow(f"baseline-{self.slot}", self.slot, plan)],
                                    audio_embeds=row_tokens_audio).rows
        if result.error is not None:
            raise result.error
        token = result.token
        if self.script is not None:
            token = scripted_token(self.script, self.conversation, self.slot, token)
        events = self.conversation.commit(plan, token)
        return token, events

    def on_chunk(self, pcm: np.ndarray, due: float, chunk_index: int) -> None:
        self.history = np.concatenate([self.history, pcm])
        # The reference web demo: log-mel and the encoder over the whole history, keep the last chunk.
        mel = log_mel_whole(self.history)  # (128, frames)
        usable = mel.shape[1] // T.MEL_FRAMES_PER_CHUNK * T.MEL_FRAMES_PER_CHUNK
        chunks = mel[:, :usable].reshape(128, -1, T.MEL_FRAMES_PER_CHUNK).permute(1, 0, 2)
        embeds = self.encoder.encode(chunks)[-1]  # (10, E)
        self.conversation.add_audio(None)
        _, events = self.step(embeds)
        now = time.perf_counter()
        for event in events:
            # The stream's own chunk count: the conversation's restarts at 0 after every reset.
            if isinstance(event, Decision) and chunk_index >= WARMUP_CHUNKS:
                self.run.decision_s.append(now - due)
        if any(isinstance(e, TurnBegin) for e in events):
            self.clock.begin(now)
            tokens = 0
            while True:  # the reference generates the whole reply before it looks at audio again
                _, events = self.step(None)
                now = time.perf_counter()
                if any(isinstance(e, TurnToken) for e in events):
                    tokens += 1
                    self.clock.token(now)
                if any(isinstance(e, TurnEnd) for e in events):
                    self.clock.end(now, tokens)
                    break
            self.reset()


def run_baseline(model: LoadedModel, loop: np.ndarray, streams: int, seconds: float, script,
                 overrun_s: float = 60.0) -> Run:
    """``overrun_s``: how long past the audio's end an overloaded baseline may still run (it can fall
    behind without bound); chunks it did not reach by then count as missing decisions."""
    run = Run("baseline", streams, seconds)
    reset_peak_memory(model.device)
    runner = Runner(model, model.lm.new_cache(streams, 4096), AudioEncoder(model.encoder_tower))
    model.lm.attention_backend = "gather"  # batch 1 reads one slot: nothing to save
    prefix = T.prompt_prefix(model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    served = [ReferenceStyleStream(model, runner, i, prefix, script, run) for i in range(streams)]
    audios = [stream_seconds(loop, i, seconds) for i in range(streams)]
    chunks_per_stream = int(seconds / CHUNK_S)
    run.expected_decisions = streams * (chunks_per_stream - WARMUP_CHUNKS)
    schedule = sorted((i * CHUNK_S / streams + (k + 1) * CHUNK_S, i, k) for i in range(streams)
                      for k in range(chunks_per_stream))
    start = time.perf_counter() + 0.2
    give_up = start + seconds + overrun_s
    for due, stream, k in schedule:
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if time.perf_counter() > give_up:
            break
        served[stream].on_chunk(audios[stream][k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES], start + due, k)
    run.memory_mib = memory_mib(model.device)
    return run


# ---------------------------------------------------------------------------------------------


def step_breakdown(run: Run) -> str:
    split = step_split(run)
    if split is None:
        return "- | - | - | - | -"
    return (f"{split.step_ms:.1f} | {100 * split.share(split.encoder_ms):.0f}% | "
            f"{100 * split.share(split.lm_ms):.0f}% | {100 * split.share(split.host_ms):.0f}% | {split.rows_mean:.1f}")


def print_row(run: Run, targets: Targets) -> None:
    rate = f"{statistics.median(run.reply_rates):.0f}" if run.reply_rates else "-"
    memory = f"{run.memory_mib:.0f}" if run.memory_mib else "-"
    verdict = targets.verdict(run)
    print(f"| {run.mode} | {run.streams} | {fmt_ms(run.decision_s, 50)} | {fmt_ms(run.decision_s, 95)} | "
          f"{fmt_ms(run.decision_s, 99)} | {fmt_ms(run.first_token_s, 50)} | {fmt_ms(run.first_token_s, 95)} | "
          f"{rate} | {step_breakdown(run)} | {memory} | "
          f"{len(run.decision_s)}/{run.expected_decisions} | {verdict} |", flush=True)


def load(model_arg: str, device: str, dtype: str) -> tuple[LoadedModel, Path | None]:
    if model_arg in ("tiny", "real") and not Path(model_arg).is_dir():
        if model_arg == "tiny":
            from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

            checkpoint = ensure_demo_checkpoint()
            return load_model(checkpoint, device, dtype), checkpoint
        from audio_interaction_server.demo.random_model import random_model

        return random_model("real", device, dtype), None
    return load_model(Path(model_arg), device, dtype), Path(model_arg)


def checkpoint_for_server(model_arg: str) -> Path | None:
    """The checkpoint directory a server loads for ``--model``: the tiny demo's, or the one named; None for
    ``real`` (write one first: ``python -m audio_interaction_server.demo.make_tiny_checkpoint DIR --preset real``)."""
    if Path(model_arg).is_dir():
        return Path(model_arg)
    if model_arg == "tiny":
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        return ensure_demo_checkpoint()
    return None


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ScriptedTurns | None:
    """What the command line asks for, checked before anything loads: one usage line, not a traceback (a bad
    --schedule, --device or --audio raised one) nor a row of a run that counts nothing (--seconds 0 printed
    'decisions 0/-3'). Returns the --schedule's scripted turns (None for 'model')."""
    if min(args.streams) < 1:
        parser.error(f"--streams: every N must be 1 or more (got {min(args.streams)})")
    if args.fronts < 1 or args.client_processes < 1:
        parser.error("--fronts and --client-processes must be 1 or more")
    least_s = (WARMUP_CHUNKS + 2) * CHUNK_S  # the websocket mode decides one chunk fewer (no flush)
    if not args.seconds >= least_s:
        parser.error(f"--seconds {args.seconds:g}: the first {WARMUP_CHUNKS} chunks of each stream are warm-up, "
                     f"not counted; give at least {least_s:g} s")
    try:
        torch.device("cpu" if args.device == "auto" else args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (auto, cpu, cuda, cuda:N)")
    if not args.audio.is_dir():
        parser.error(f"--audio {args.audio}: not a folder (of recording folders with sequence.json)")
    if args.schedule == "model":
        return None
    every, _, length = args.schedule.partition(":")
    try:
        return ScriptedTurns(every_chunks=int(every), reply_tokens=int(length))
    except ValueError:  # not K:L integers, or pydantic's ValidationError (a ValueError) for their ranges
        parser.error(f"--schedule {args.schedule!r}: give K:L (a reply every K >= 2 chunks of L >= 1 tokens) or "
                     "'model'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", nargs="+", choices=["direct", "direct-exact", "websocket", "baseline"],
                        default=["direct", "baseline"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per stream, streamed in real time")
    parser.add_argument("--model", default="tiny", help="tiny (demo checkpoint), real (random 3B shapes "
                        "built on the device), or a checkpoint directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="auto")
    parser.add_argument("--attention", choices=["auto", "gather", "flex"], default="auto")
    parser.add_argument("--schedule", default="25:20", help="K:L scripted replies, or 'model'")
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("--ttft-target-ms", type=float, default=50.0)
    parser.add_argument("--stop-after-fail", action="store_true", help="stop a mode's ramp at its first failure")
    parser.add_argument("--audio", type=Path, default=shared_audio_dir(), help="folder of recording folders to loop")
    parser.add_argument("--fronts", type=int, default=1, help="websocket: the server's front processes "
                        "(serve --fronts N), stream i on front i mod N")
    parser.add_argument("--client-processes", type=int, default=1, help="websocket: the clients' processes")
    parser.add_argument("--websocket-clients", metavar="SPEC", help=argparse.SUPPRESS)  # one of those processes
    args = parser.parse_args()
    if args.websocket_clients:
        client_process_main(args.websocket_clients)
        return
    engine_script = check_arguments(parser, args)
    targets = Targets(args.target_ms, args.ttft_target_ms)

    if set(args.mode) == {"websocket"}:  # the server loads the model: not this process too
        model, checkpoint = None, checkpoint_for_server(args.model)
        if checkpoint is None:
            parser.error(f"--model {args.model}: the websocket mode serves a checkpoint directory; write a real-size "
                         "one first: python -m audio_interaction_server.demo.make_tiny_checkpoint DIR --preset real "
                         "--dtype bfloat16")
    else:
        try:
            model, checkpoint = load(args.model, args.device, args.dtype)
        except CheckpointError as error:
            parser.error(f"--model {args.model}: {error}")
    script = engine_script
    engine: dict = {"attention": args.attention}
    if script is not None:
        engine["scripted_turns"] = {"every_chunks": script.every_chunks, "reply_tokens": script.reply_tokens}
    if model is None:
        where = (f"{checkpoint} served by {args.fronts} front(s), {args.client_processes} client process(es), "
                 f"device {args.device} ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}")
    else:
        device_name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else (
            platform.processor() or platform.machine())  # processor() is "" on most Linux: "cpu (; 2 CPUs)"
        where = f"{model.name} on {model.device} ({device_name}"
    print(f"# {where}; {os.cpu_count()} CPUs), {model.dtype if model else args.dtype}, torch "
          f"{torch.__version__}; {args.seconds:g} s of real audio per stream in real time; replies: "
          + (f"SCRIPTED every {script.every_chunks} chunks x {script.reply_tokens} tokens" if script
             else "decided by the model") + f"; targets p95 decision <= {args.target_ms:g} ms, "
          f"p95 first token <= {args.ttft_target_ms:g} ms\n")
    print("| mode | streams | decision p50 ms | p95 | p99 | first token p50 ms | p95 | reply tok/s | "
          "step ms | encoder | LM | host | rows/step | peak MiB | decisions | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    loop = audio_loop(args.audio)
    chunks = mel_chunks(loop) if model is not None else []
    capacity: dict[str, int] = {}
    spread: dict[int, list[int]] = {}  # websocket with fronts: sessions each front served, per N
    for mode in args.mode:
        for streams in args.streams:
            if mode == "websocket":
                if checkpoint is None:
                    print("| websocket | - | needs a checkpoint directory (the server loads one) |")
                    break
                run = run_websocket(checkpoint, loop, streams, args.seconds, engine, args.fronts,
                                    args.client_processes, args.device if model is None else model.device.type,
                                    args.audio)
            elif model is None:
                raise AssertionError("only the websocket mode runs without a model here")
            elif mode == "direct":
                run = run_direct(model, chunks, streams, args.seconds, engine)
            elif mode == "direct-exact":
                run = run_direct(model, chunks, streams, args.seconds, {**engine, "encoder_batch_buckets": False},
                                 name=mode)
            else:
                run = run_baseline(model, loop, streams, args.seconds, script)
            print_row(run, targets)
            if run.sessions_per_front and args.fronts > 1:
                spread[streams] = run.sessions_per_front
            if targets.passes(run):
                capacity[mode] = max(capacity.get(mode, 0), streams)
            elif args.stop_after_fail:
                break
    print()
    for mode in args.mode:
        print(f"- largest N that held the targets, {mode}: {capacity.get(mode, 0)} (of {args.streams})")
    for streams, counts in spread.items():
        print(f"- sessions per front at {streams} streams: {counts}")
    ratio = capacity_ratio(capacity, args.streams)
    if ratio is not None:
        print(f"- capacity ratio direct / baseline: {ratio}")


def capacity_ratio(capacity: dict[str, int], streams: list[int]) -> str | None:
    """The direct / baseline ratio of the largest N each held, said as a bound where the ramp stopped short of a
    mode's capacity: a mode that held the largest N tried may hold more, so its figure is a lower bound."""
    if not capacity.get("baseline") or "direct" not in capacity:
        return None
    ours, theirs, largest = capacity["direct"], capacity["baseline"], max(streams)
    if ours == largest and theirs == largest:
        return (f"not measured: both held the targets at the largest N tried ({largest}); "
                "ramp further (--streams) to find a ratio")
    if ours == largest:
        return f"at least {ours / theirs:.1f}x (direct held the largest N tried, {largest})"
    return f"{ours / theirs:.1f}x"


if __name__ == "__main__":
    main()
