"""The step policy against unbounded steps: the same streams through the real scheduler and worker, twice.

    python -m benchmarks.step_policy [--streams 96] [--seconds 8] [--model tiny|real] [--step eager|static]
                                     [--listening-rows 16] [--reply-rows 8] [--long-tokens 600]
                                     [--repeats 2] [--max-positions 3072]

Each run is ``benchmarks.capacity``'s direct mode (N streams of real audio at real-time pace,
staggered over one chunk, scripted replies 25:20): once with the given ``engine.step_max_*``
bounds (omitted = the engine's auto values) and once unbounded (every ready row in one step).
Per run: rows per step (mean / max), steps, the rows and tokens run in all (the total work, equal
when both runs decided the same chunks and replies), decision latency p50/p95/p99, first reply
token p95 and the slowest 5% of replies in tokens/s. The auto bounds (256 listening rows) are
sized for a GPU; on a CPU with the tiny model pass smaller ones, at a stream count that keeps
this machine's worker busy. ``--repeats R`` alternates the two R times (unbounded first, then
bounded first, ...), so a neighbour's load on a shared machine shows as spread, not as a verdict.
On a GPU: ``--model real --device cuda --streams 600 --seconds 15 --max-positions 3072`` (auto bounds).
"""

from __future__ import annotations

import argparse
from typing import Any, Iterator, TypeVar

from benchmarks.capacity import audio_loop, load, mel_chunks, pct, run_direct, shared_audio_dir, step_split

T = TypeVar("T")


HEADER = ("| run | steps | rows/step mean / max | rows run | tokens fed | decisions | decision p50 / p95 / p99 ms | "
          "first token p95 ms | slowest 5% reply tok/s | step ms |\n|---|---|---|---|---|---|---|---|---|---|")


def describe(name: str, run) -> str:
    split = step_split(run)
    rows = sum(s.num_rows for s in run.steps)
    tokens = sum(s.num_tokens_fed for s in run.steps)
    replies = pct(run.reply_rates, 5) if run.reply_rates else float("nan")
    first = pct(run.first_token_s, 95) * 1e3 if run.first_token_s else float("nan")
    assert split is not None
    return (f"| {name} | {split.num_steps} | {split.rows_mean:.1f} / {split.rows_max} | {rows} | {tokens} | "
            f"{len(run.decision_s)}/{run.expected_decisions} | {pct(run.decision_s, 50) * 1e3:.1f} / "
            f"{pct(run.decision_s, 95) * 1e3:.1f} / {pct(run.decision_s, 99) * 1e3:.1f} | {first:.1f} | "
            f"{replies:.1f} | {split.step_ms:.1f} |")


def comparison_parser(doc: str, seconds: float) -> argparse.ArgumentParser:
    """The arguments of a side-by-side run of the real scheduler and worker (here and ``benchmarks.prefix_kv``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--step", choices=["auto", "eager", "static"], default="auto")
    parser.add_argument("--cpu-threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-positions", type=int, default=4096)
    parser.add_argument("--audio", default=shared_audio_dir())
    return parser


def comparison_setup(args: argparse.Namespace) -> tuple[Any, list, dict]:
    """The model, the audio's mel chunks and the engine settings both sides share (scripted replies 25:20)."""
    model, _ = load(args.model, args.device, "auto")
    engine = {"step": args.step, "scripted_turns": {"every_chunks": 25, "reply_tokens": 20},
              "cpu_threads": args.cpu_threads, "max_positions": args.max_positions}
    return model, mel_chunks(audio_loop(args.audio)), engine


def alternated(runs: list[T], repeats: int) -> Iterator[T]:
    """``runs`` ``repeats`` times, every other time in reverse: a shared machine's drift shows as spread."""
    for repeat in range(repeats):
        yield from runs if repeat % 2 == 0 else runs[::-1]


def main(argv: list[str] | None = None) -> None:
    parser = comparison_parser(__doc__, seconds=8.0)
    parser.add_argument("--listening-rows", type=int, default=None)
    parser.add_argument("--reply-rows", type=int, default=None)
    parser.add_argument("--long-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    model, chunks, engine = comparison_setup(args)
    bounded = {"step_max_listening_rows": args.listening_rows, "step_max_reply_rows": args.reply_rows,
               "step_max_long_tokens": args.long_tokens}
    unbounded = {"step_max_listening_rows": args.streams, "step_max_reply_rows": args.streams,
                 "step_max_long_tokens": 10**9}
    print(f"# {model.name} on {model.device}, {args.streams} streams x {args.seconds:g} s, step {args.step}, "
          f"bounds {bounded} (None = auto)\n")
    print(HEADER)
    for name, limits in alternated([("unbounded", unbounded), ("bounded", bounded)], args.repeats):
        run = run_direct(model, chunks, args.streams, args.seconds, {**engine, **limits}, drain_s=20.0)
        print(describe(name, run), flush=True)


if __name__ == "__main__":
    main()
