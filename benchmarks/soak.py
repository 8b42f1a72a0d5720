"""Long-session soak: a simulated hour of real audio through one session, faster than real time.

    python benchmarks/soak.py [--minutes 60] [--max-positions 4096] [--window 2048]

Streams the shared recordings (looped, with 2 s of silence between files) into
the worker as fast as it steps, once with context rollover and once without,
and prints per simulated 5 minutes: positions in use, rollover history kept,
rollovers so far, process RSS. Without rollover the session must end cleanly
with `context_full` and the worker must go on serving a new session.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch

from server.audio import StreamingLogMel, load_audio_file, load_audio_sequence
from server.checkpoint import load_model
from server.config import EngineConfig, SessionOptions
from server.engine_events import ContextRollover, Decision, SessionEnded
from server.tokens import CHUNK_SAMPLES
from server.worker import Worker

SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
CHUNKS_PER_MINUTE = 150


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def audio_loop() -> np.ndarray:
    silence = np.zeros(32000, dtype=np.float32)
    pieces = []
    for folder in sorted(p for p in SHARED_AUDIO.iterdir() if p.is_dir()):
        for path in load_audio_sequence(folder):
            pieces += [load_audio_file(path), silence]
    return np.concatenate(pieces)


def soak(model, minutes: float, max_positions: int, window: int | None, report_every_min: float) -> dict:
    worker = Worker(model, EngineConfig(max_sessions=2, max_positions=max_positions,
                                        rollover_window_positions=window))
    events = []
    worker.open_session("soak", SessionOptions(max_turn_tokens=32), events.extend)
    loop = audio_loop()
    front_end = StreamingLogMel()
    total_chunks = int(minutes * CHUNKS_PER_MINUTE)
    fed = 0
    next_report = 0.0
    max_positions_seen = 0
    started = time.perf_counter()
    print(f"\n### rollover window: {window}  (budget {max_positions} positions)\n")
    print("| simulated min | decisions | positions | history tokens | history chunks | rollovers | RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    while fed < total_chunks:
        start = (fed * CHUNK_SAMPLES) % (len(loop) - CHUNK_SAMPLES)
        chunks = front_end.push(loop[start:start + CHUNK_SAMPLES])
        fed += 1
        if chunks:
            worker.push_audio("soak", torch.stack(chunks))
        while worker.step() is not None:
            size = worker.state_size("soak")
            if size is not None:
                max_positions_seen = max(max_positions_seen, size.positions)
        size = worker.state_size("soak")
        minute = fed / CHUNKS_PER_MINUTE
        if minute >= next_report or size is None:
            decisions = sum(isinstance(e, Decision) for e in events)
            if size is None:
                print(f"| {minute:.1f} | {decisions} | session ended | | | | {rss_mib():.0f} |")
                break
            print(f"| {minute:.1f} | {decisions} | {size.positions} | {size.history_tokens} | "
                  f"{size.history_chunks} | {size.num_rollovers} | {rss_mib():.0f} |")
            next_report += report_every_min
    ended = [e for e in events if isinstance(e, SessionEnded)]
    # The worker must still serve a new session whatever happened to this one.
    probe = []
    worker.open_session("probe", SessionOptions(), probe.extend)
    worker.push_audio("probe", torch.zeros(2, 128, 40) - 1.5)
    worker.run_until_idle()
    return {
        "wall_s": time.perf_counter() - started,
        "decisions": sum(isinstance(e, Decision) for e in events),
        "rollovers": sum(isinstance(e, ContextRollover) for e in events),
        "max_positions_seen": max_positions_seen,
        "ended": ended[0].error_code if ended else None,
        "worker_still_serves": sum(isinstance(e, Decision) for e in probe) == 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--max-positions", type=int, default=4096)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--report-every", type=float, default=5.0, help="simulated minutes between rows")
    args = parser.parse_args()
    if args.checkpoint is None:
        from server.tools.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    model = load_model(args.checkpoint, "cpu")
    for window in (args.window, None):
        result = soak(model, args.minutes, args.max_positions, window, args.report_every)
        print(f"\nresult: {result}")


if __name__ == "__main__":
    main()
