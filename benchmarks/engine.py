"""Engine benchmarks, each printed as ratios measured side by side in one run.

    python -m benchmarks.engine [--checkpoint DIR] [--device cpu] [frontend|batching|attention|all]

frontend  Per-chunk cost of front-end (mel) + audio encoder at 10 s vs 10 min
          into a stream: our streaming path (constant work per chunk) against
          the reference web demo's way (mel + encoder over the whole history
          every chunk, keep the last 10 frames).
batching  The same workload (16 sessions x N chunks, replies included) stepped
          as one batch of 16 rows per step vs one session per step.
attention One LM step of listening rows deep into their context: the gather path
          (copy each row's slot, SDPA) vs in-place compiled FlexAttention.

Without --checkpoint the tiny random demo model is used (CPU numbers only
say something about host overhead and scaling, not about the 3B model).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from audio_interaction_server.audio.files import load_audio_file, load_audio_sequence
from audio_interaction_server.audio.mel import StreamingLogMel, log_mel_whole
from audio_interaction_server.model.checkpoint import load_model
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.fit import median_wall_ms
from audio_interaction_server.spec import CHUNK_SAMPLES
from audio_interaction_server.engine.worker import Worker
from benchmarks.harness import positive_int, shared_audio_dir



def real_audio(seconds: float) -> np.ndarray:
    """The shared recordings back to back, repeated to the requested length (16 kHz mono)."""
    pieces = [load_audio_file(p) for folder in sorted(shared_audio_dir().iterdir()) if folder.is_dir()
              for p in load_audio_sequence(folder)]
    one_pass = np.concatenate(pieces)
    repeats = int(np.ceil(seconds * 16000 / len(one_pass)))
    return np.tile(one_pass, repeats)[: int(seconds * 16000)]


def time_ms(fn, repeats: int) -> float:
    return median_wall_ms(fn, repeats=repeats, warmups=0)


def bench_frontend(encoder: AudioEncoder, repeats: int) -> None:
    print("\n## Front-end + encoder cost per 0.4 s chunk (median ms)\n")
    print("| stream position | streaming (ours) | whole history (reference web demo) |")
    print("|---|---|---|")
    audio = real_audio(600.0 + 0.4 * (repeats + 1))
    # Warm-up: the first calls pay one-off allocation and dispatch costs.
    for _ in range(3):
        log_mel_whole(audio[: CHUNK_SAMPLES * 4])
        encoder.encode(torch.zeros(4, 128, 40))
    results = {}
    for label, seconds in (("10 s", 10.0), ("10 min", 600.0)):
        cut = int(seconds * 16000) // CHUNK_SAMPLES * CHUNK_SAMPLES
        # Stream up to the position once, then time the following chunks one by one.
        front_end = StreamingLogMel()
        front_end.push(audio[:cut])
        ours_ms = []
        for i in range(repeats):
            start_sample = cut + i * CHUNK_SAMPLES
            start = time.perf_counter()
            chunks = front_end.push(audio[start_sample:start_sample + CHUNK_SAMPLES])
            encoder.encode(torch.stack(chunks))
            ours_ms.append((time.perf_counter() - start) * 1000)

        history = audio[: cut + CHUNK_SAMPLES]

        def reference():
            mel = log_mel_whole(history)  # (128, T) over the whole history
            num = mel.shape[1] // 40
            embeds = encoder.encode(mel[:, : num * 40].reshape(128, num, 40).permute(1, 0, 2))
            return embeds[-1]

        results[label] = (statistics.median(ours_ms), time_ms(reference, max(1, repeats // 4)))
        print(f"| {label} | {results[label][0]:.2f} | {results[label][1]:.2f} |")
    ours_ratio = results["10 min"][0] / results["10 s"][0]
    ref_ratio = results["10 min"][1] / results["10 s"][1]
    print(f"\nratio 10 min / 10 s: streaming {ours_ratio:.2f}x, whole-history {ref_ratio:.1f}x; "
          f"at 10 min the streaming path is {results['10 min'][1] / results['10 min'][0]:.0f}x cheaper")


def bench_batching(model, num_sessions: int, num_chunks: int, num_rounds: int) -> None:
    """The same sessions and audio stepped batched and one session per step, alternated round by round (the order
    swapped each round) so that a neighbour's load on a shared machine falls on both; the speed-up is each round's
    ratio, median (lowest-highest) over the rounds, beside the load average each round ran under."""
    print(f"\n## {num_sessions} sessions x {num_chunks} chunks: batched vs one session per step, "
          f"{num_rounds} rounds\n")
    audio = real_audio(num_chunks * 0.4 * num_sessions + 1)
    streams = []
    for i in range(num_sessions):
        fe = StreamingLogMel()
        start = i * num_chunks * CHUNK_SAMPLES
        streams.append(torch.stack(fe.push(audio[start:start + num_chunks * CHUNK_SAMPLES]) + fe.flush()))
    options = SessionOptions(max_turn_tokens=8)
    modes = (("batched (16 rows/step)", num_sessions), ("one session per step", 1))

    def run_mode(rows_per_step: int) -> tuple[float, dict[str, int]]:
        worker = Worker(model, EngineConfig(max_sessions=num_sessions, max_batch_rows=rows_per_step))
        counts = {"steps": 0, "rows": 0, "decisions": 0, "reply_tokens": 0}

        def on_step(stats):
            counts["steps"] += 1
            counts["rows"] += stats.num_rows
            counts["decisions"] += stats.num_decisions
            counts["reply_tokens"] += stats.num_reply_tokens

        worker.on_step = on_step
        for i, chunks in enumerate(streams):
            worker.open_session(f"s{i}", options, lambda events: None)
            worker.push_audio(f"s{i}", chunks)
        start = time.perf_counter()
        worker.run_until_idle()
        return time.perf_counter() - start, counts

    for _, rows_per_step in modes:  # warm-up, not counted: the first steps of a process pay for lazy set-up
        run_mode(rows_per_step)
    elapsed: dict[str, list[float]] = {label: [] for label, _ in modes}
    counts_of: dict[str, dict[str, int]] = {}
    speed_ups = []
    for round_index in range(num_rounds):
        order = modes if round_index % 2 == 0 else modes[::-1]
        for label, rows_per_step in order:
            seconds, counts_of[label] = run_mode(rows_per_step)
            elapsed[label].append(seconds)
        speed_ups.append(elapsed[modes[1][0]][-1] / elapsed[modes[0][0]][-1])
        print(f"# round {round_index + 1}: batched {elapsed[modes[0][0]][-1]:.2f} s, one per step "
              f"{elapsed[modes[1][0]][-1]:.2f} s, speed-up {speed_ups[-1]:.1f}x, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    print("\n| mode | wall s, median (lowest-highest) | steps | decisions | reply tokens | ms per row |")
    print("|---|---|---|---|---|---|")
    for label, _ in modes:
        c, seconds = counts_of[label], elapsed[label]
        print(f"| {label} | {statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | {c['steps']} | "
              f"{c['decisions']} | {c['reply_tokens']} | {statistics.median(seconds) * 1000 / c['rows']:.2f} |")
    rows = [counts_of[label]["rows"] for label, _ in modes]
    print(f"\nspeed-up of batching: {statistics.median(speed_ups):.1f}x ({min(speed_ups):.1f}-"
          f"{max(speed_ups):.1f}x over {num_rounds} rounds; same work: {rows[0]} vs {rows[1]} rows)")


def bench_attention(model, num_slots: int, history: int, repeats: int) -> None:
    """One LM step of ``num_slots`` listening rows (13 tokens) at position ``history``: gather vs in place.

    The step is the engine runner's forward (batch built on the host, then the LM), as serving runs it.
    """
    from audio_interaction_server.engine.conversation import RowPlan
    from audio_interaction_server.engine.runner import PlannedRow, Runner

    print(f"\n## Attention over the cache: {num_slots} rows of 13 tokens at position {history} "
          f"(median ms per LM step)\n")
    lm = model.lm
    runner = Runner(model, lm.new_cache(num_slots, 4096), AudioEncoder(model.encoder_tower))
    rows = [PlannedRow(f"s{i}", i, RowPlan([7] * 13, history, (), ())) for i in range(num_slots)]
    print("| attention | ms per step |")
    print("|---|---|")
    timings = {}
    for backend, compiled in (("gather", False), ("flex", True)):
        lm.attention_backend, lm.compile_attention = backend, compiled
        for _ in range(3):  # warm-up (and compile)
            runner.last_hidden(rows, None)
        timings[backend] = time_ms(lambda: runner.last_hidden(rows, None), repeats)
        print(f"| {backend}{' (compiled FlexAttention)' if compiled else ' (copy each slot, SDPA)'} | "
              f"{timings[backend]:.2f} |")
    lm.attention_backend, lm.compile_attention = "gather", False
    print(f"\nin place / gather: {timings['flex'] / timings['gather']:.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=["frontend", "batching", "attention", "all"], default="all")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--chunks", type=positive_int, default=25, help="chunks per session in the batching run")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="batching: rounds of both modes, alternated (the speed-up is their median)")
    args = parser.parse_args()
    if args.checkpoint is None:
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    torch.manual_seed(0)
    model = load_model(args.checkpoint, args.device)
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {model.device}, model {model.name}")
    if args.which in ("frontend", "all"):
        bench_frontend(AudioEncoder(model.encoder_tower), args.repeats)
    if args.which in ("batching", "all"):
        bench_batching(model, 16, args.chunks, args.rounds)
    if args.which in ("attention", "all"):
        for slots, history in ((16, 256), (16, 3000), (64, 3000)):
            bench_attention(model, slots, history, args.repeats)


if __name__ == "__main__":
    main()
