"""Kept prefixes against fed prefixes: the same streams through the real scheduler and worker, both ways.

    python -m benchmarks.prefix_kv [--streams 96] [--seconds 6] [--model tiny|real] [--device auto|cpu|cuda]
                                   [--step auto|eager|static] [--repeats 2] [--max-positions 4096]

First the burst itself: N sessions open and push their first chunk at once, and the worker steps (unpaced)
until every one is decided: the wall time, the steps and the tokens fed. Then each run is
``benchmarks.capacity``'s direct mode (N streams of real audio at real-time pace, staggered over one
chunk, so every first row falls within the first 0.4 s; scripted replies 25:20): once with the engine's default
``engine.prefix_kv_positions`` (a new session copies the trained prompt's keys and values, kept at start-up, and
its first row is its first 12-token block) and once with 0 (every first row feeds the 46-token prompt with its
block: a long row, eager). The columns are ``benchmarks.step_policy``'s: steps, rows per step, rows and tokens
run, decision latency, first reply token, slowest replies, mean step (the first ``WARMUP_CHUNKS`` chunks of each
stream are not counted there: only a backlog the burst leaves behind shows). ``--repeats R`` alternates the two R
times.
On a GPU: ``--model real --device cuda --streams 600 --seconds 15 --max-positions 3072``.
"""

from __future__ import annotations

import time

import torch

from benchmarks.capacity import run_direct, session_name
from benchmarks.step_policy import HEADER, alternated, comparison_parser, comparison_setup, describe
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.events import StepStats
from audio_interaction_server.engine.worker import Worker
from audio_interaction_server.options import SessionOptions


def first_rows_burst(model, chunks: list[torch.Tensor], streams: int, engine: dict) -> str:
    """N sessions open and push one chunk each at once; step until every first chunk is decided."""
    worker = Worker(model, EngineConfig(max_sessions=streams, **engine))
    steps: list[StepStats] = []
    for i in range(streams):
        worker.open_session(session_name(i), SessionOptions(reply_mode="on_request"), lambda events: None)  # no replies
        worker.push_audio(session_name(i), chunks[i % len(chunks)].unsqueeze(0))
    worker.scheduler.is_paced = False
    started = time.perf_counter()
    while (stats := worker.step()) is not None:
        steps.append(stats)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1e3
    decided = sum(stats.num_decisions for stats in steps)
    eager = worker.runner.static.counts.eager_batches if worker.runner.static is not None else "-"
    return (f"{decided}/{streams} | {wall_ms:.1f} | {len(steps)} | {sum(s.num_tokens_fed for s in steps)} | "
            f"{eager} | {worker.scheduler.num_prefixes_reused}")


def main(argv: list[str] | None = None) -> None:
    args = comparison_parser(__doc__, seconds=6.0).parse_args(argv)
    model, chunks, engine = comparison_setup(args)
    kept = EngineConfig.model_fields["prefix_kv_positions"].default
    print(f"# {model.name} on {model.device}, {args.streams} streams x {args.seconds:g} s, step {args.step}\n")
    runs = [("prompt fed", 0), (f"prompt kept ({kept} positions)", kept)]
    print("| burst | first decisions | wall ms | steps | tokens fed | eager batches (static step) | prompts copied |")
    print("|---|---|---|---|---|---|---|")
    for name, positions in alternated(runs, args.repeats):
        burst = first_rows_burst(model, chunks, args.streams, {**engine, "prefix_kv_positions": positions})
        print(f"| {name} | {burst} |", flush=True)
    print()
    print(HEADER)
    for name, positions in alternated(runs, args.repeats):
        run = run_direct(model, chunks, args.streams, args.seconds, {**engine, "prefix_kv_positions": positions},
                         drain_s=20.0)
        print(describe(name, run), flush=True)


if __name__ == "__main__":
    main()
