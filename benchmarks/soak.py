"""Long-session soak: a simulated hour of real audio through one session, faster than real time.

    python -m benchmarks.soak [--minutes 60] [--report-every 5] [--max-positions 4096] [--window 2048]

Streams the shared recordings (looped, with 2 s of silence between files) into
the worker as fast as it steps, once with context rollover and once without,
and prints per simulated `--report-every` minutes: positions in use, rollover
history kept, queued chunks, rollovers so far, and the process's memory: RSS
and glibc's heap split into live bytes (in use + mmapped) and free bytes it
holds. At the end, the slopes of RSS and of the live heap after `--warmup`
simulated minutes, in MiB per simulated hour (least squares over the rows).
Without rollover the session must end cleanly with `context_full` and the
worker must go on serving a new session.

Events are counted, not kept, so the benchmark's own memory does not grow with
the stream. `--encoder-batches exact` turns off the server's padding of encoder
calls to a few batch sizes (engine.encoder_batch_buckets), to measure what it
is for.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from audio_interaction_server.audio.files import load_audio_file, load_audio_sequence
from audio_interaction_server.audio.mel import StreamingLogMel
from audio_interaction_server.model.checkpoint import load_model
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.events import SessionEnded
from audio_interaction_server.api.metrics import heap_stats, resident_bytes
from audio_interaction_server.spec import CHUNK_SAMPLES
from audio_interaction_server.engine.worker import Worker

from benchmarks.harness import shared_audio_dir
from benchmarks.served import slope_per_hour

CHUNKS_PER_MINUTE = 150
MIB = 1 << 20


def rss_mib() -> float:
    rss = resident_bytes()
    return float("nan") if rss is None else rss / MIB


def heap_mib() -> tuple[float, float]:
    """(live, free) MiB of glibc's heap; nan off glibc."""
    heap = heap_stats()
    if heap is None:
        return float("nan"), float("nan")
    return (heap.in_use + heap.mmapped) / MIB, heap.free / MIB


def audio_loop() -> np.ndarray:
    silence = np.zeros(32000, dtype=np.float32)
    pieces = []
    for folder in sorted(p for p in shared_audio_dir().iterdir() if p.is_dir()):
        for path in load_audio_sequence(folder):
            pieces += [load_audio_file(path), silence]
    return np.concatenate(pieces)


COLUMNS = ("simulated min", "decisions", "positions", "history tokens", "history chunks", "queued chunks",
           "rollovers", "RSS MiB", "heap live MiB", "heap free MiB")


def soak(model, minutes: float, max_positions: int, window: int | None, report_every_min: float,
         warmup_min: float, encoder_buckets: bool) -> dict:
    worker = Worker(model, EngineConfig(max_sessions=2, max_positions=max_positions,
                                        rollover_window_positions=window, encoder_batch_buckets=encoder_buckets))
    counts: Counter[str] = Counter()
    ended: list[SessionEnded] = []

    def count(events: list) -> None:  # kept: only the final event, if any
        counts.update(type(event).__name__ for event in events)
        ended.extend(event for event in events if isinstance(event, SessionEnded))

    worker.open_session("soak", SessionOptions(max_turn_tokens=32), count)
    loop = audio_loop()
    front_end = StreamingLogMel()
    total_chunks = int(minutes * CHUNKS_PER_MINUTE)
    fed = 0
    next_report = 0.0
    max_positions_seen = 0
    memory: list[tuple[float, float, float]] = []  # (simulated minute, RSS, live heap)
    started = time.perf_counter()
    print(f"\n### rollover window: {window}  (budget {max_positions} positions)\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
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
        if minute >= next_report or size is None or fed == total_chunks:
            rss = rss_mib()
            live, free = heap_mib()
            if size is None:
                print(f"| {minute:.1f} | {counts['Decision']} | session ended | | | | | {rss:.0f} | {live:.0f} | "
                      f"{free:.0f} |")
                break
            memory.append((minute, rss, live))
            print(f"| {minute:.1f} | {counts['Decision']} | {size.positions} | {size.history_tokens} | "
                  f"{size.history_chunks} | {size.queued_chunks} | {size.num_rollovers} | {rss:.0f} | {live:.1f} | "
                  f"{free:.0f} |", flush=True)
            next_report += report_every_min
    after = [row for row in memory if row[0] >= warmup_min]
    minutes_after = [row[0] for row in after]
    # The worker must still serve a new session whatever happened to this one.
    probe: Counter[str] = Counter()
    worker.open_session("probe", SessionOptions(), lambda events: probe.update(type(e).__name__ for e in events))
    worker.push_audio("probe", torch.zeros(2, 128, 40) - 1.5)
    worker.run_until_idle()
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "decisions": counts["Decision"],
        "replies": counts["TurnEnd"],
        "rollovers": counts["ContextRollover"],
        "max_positions_seen": max_positions_seen,
        "ended": ended[0].error_code if ended else None,
        "worker_still_serves": probe["Decision"] == 2,
        f"rss_mib_per_hour_after_min_{warmup_min:g}": round(slope_per_hour(minutes_after, [r[1] for r in after]), 1),
        f"live_heap_mib_per_hour_after_min_{warmup_min:g}":
            round(slope_per_hour(minutes_after, [r[2] for r in after]), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--max-positions", type=int, default=4096)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--report-every", type=float, default=5.0, help="simulated minutes between rows")
    parser.add_argument("--warmup", type=float, default=5.0, help="simulated minutes left out of the slopes")
    parser.add_argument("--encoder-batches", choices=["buckets", "exact"], default="buckets",
                        help="exact: encode every call at its own batch size (engine.encoder_batch_buckets off)")
    parser.add_argument("--skip-no-rollover", action="store_true", help="only the run with rollover")
    args = parser.parse_args()
    if args.checkpoint is None:
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    model = load_model(args.checkpoint, "cpu")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, encoder batches {args.encoder_batches}, "
          f"python {sys.version.split()[0]}")
    for window in (args.window,) if args.skip_no_rollover else (args.window, None):
        result = soak(model, args.minutes, args.max_positions, window, args.report_every, args.warmup,
                      encoder_buckets=args.encoder_batches == "buckets")
        print(f"\nresult: {result}")


if __name__ == "__main__":
    main()
