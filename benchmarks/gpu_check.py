"""GPU proof in one command: correctness on the device, then the real-size model's capacity.

    python -m benchmarks.gpu_check --out gpu-check [--audio DIR] [--budget-s 420]
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu-check     # CPU, tiny model, seconds

Run from the repository root. Where the package is not installed (a tree copied to a GPU host), put
its folder on the path: ``PYTHONPATH=server python -m benchmarks.gpu_check ...``.

Stages, most important first; each one rewrites ``OUT/report.md`` and ``OUT/report.json``
as soon as it finishes (the ramp after every N), a stage that raises is recorded with its
traceback and the next one runs, and a stage that does not fit the rest of ``--budget-s``
is skipped and says so:

1. machine: GPU, driver, torch, CUDA, the commit;
2. correctness on the tiny checkpoint, teacher-forced (``precision.teacher_forced``):
   bf16 on the device against fp32 on the CPU, and in-place (FlexAttention, compiled)
   against gather attention on the device;
3. the real-size random model (``--model real``: 3B shapes built on the device), its
   warm-up (every encoder batch bucket, every FlexAttention batch bucket compiled and
   self-checked, timed separately), then a ramp of N real-time streams in direct mode
   (``capacity.run_direct``) with SCRIPTED replies (25:20: about 10% of streams mid-reply
   at any time), N = 256, 512, 600, 768, 800, 1024 by default, every N the budget allows
   (``--stop-after-failures K`` stops after K failing N in a row instead);
   (with the static step and its CUDA graphs on CUDA, the engine's default there);
3a. the static step (issue 23): one layer's attention candidates (gather to the longest row,
   gather at the slot length, our Triton kernel at a few launch configurations) in us per layer
   and GB/s at (rows, position) = (16, 500), (64, 2000), (128, 2000), (256, 3500) and 64 reply
   rows; then a few (listening, reply) buckets captured as CUDA graphs (capture seconds, pool
   memory) and each replayed against the same static step run eagerly (ms, tokens equal); then the
   same buckets with the torch layers against the fused Triton kernels (RMSNorm + residual add, RoPE
   + KV-cache write, SiLU x up): launches per step (torch.profiler), ms per replay, tokens equal;
4. the reference-style baseline (``capacity.run_baseline``) at small N on the same model,
   and the capacity ratio;
5. the GPU's busy share of the step at the capacity N (kernel traces; ``gpu_busy``);
6. if time is left, the same ramp with replies decided by the (random) model.

Per N: decision latency p50/p95/p99, first-token p50/p95, reply tokens/s, the step split
(encoder / LM / host), rows per step, peak accelerator memory, and a verdict per target:
p95 decision <= 100 ms, p95 first token <= 50 ms, the slowest 5% of replies >= 20 tokens/s,
host < 20% of step time (host = step time outside the encoder and LM calls; the CPU time of
launching kernels inside those calls is counted as encoder/LM).

Nothing here needs the network or the web server: the tiny checkpoint and the tokenizer are
built from the local vocabulary cache (``AUDIO_INTERACTION_CACHE``), audio comes from
``--audio`` (default ``../shared/audio``).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

from audio_interaction_server.__main__ import prefer_passive_omp_wait  # noqa: E402

prefer_passive_omp_wait()  # torch's CPU threads wait as the server's do: set before torch loads

import torch  # noqa: E402

from benchmarks import capacity, precision  # noqa: E402
from benchmarks.gpu_report import Budget, Report, Stage, machine, progress  # noqa: E402
from benchmarks.gpu_step_stages import attention_candidates, fused_buckets, graph_buckets  # noqa: E402
from benchmarks.harness import shared_audio_dir  # noqa: E402
from benchmarks.served import audio_loop  # noqa: E402
from audio_interaction_server.model.fit import kv_bytes_per_slot, self_check_flex, sessions_that_fit  # noqa: E402
from audio_interaction_server.model.checkpoint import LoadedModel, load_model  # noqa: E402
from audio_interaction_server.model.encoder import AudioEncoder, batch_bucket  # noqa: E402
from audio_interaction_server.model.lm import FLEX_BLOCK, flex_batch_bucket  # noqa: E402
from audio_interaction_server.config import EngineConfig, ScriptedTurns  # noqa: E402
from audio_interaction_server.options import SessionOptions  # noqa: E402
from audio_interaction_server.spec import fitting_rollover_window  # noqa: E402
from audio_interaction_server.engine.static_path import choose_step  # noqa: E402
from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint  # noqa: E402

TARGETS = capacity.Targets(decision_p95_ms=100.0, first_token_p95_ms=50.0, reply_tokens_per_s=20.0,
                           host_share=0.20)
CAPACITY_TARGET_STREAMS = 512  # the goal for one H100/H200
KV_MEMORY_FRACTION = 0.9  # the engine's default share of free accelerator memory for the KV cache
MIN_RAMP_POSITIONS = 1024  # a ramp run of ~15 s uses about 500 positions per session
# A worker's start before its first measured run: on CUDA every bucket's graph is captured (119 buckets in
# 22.6-28.6 s on the H200 of 2026-12-04, before the fused kernels), on the CPU the tiny model's cache alone.
WORKER_START_S = {"cuda": 45.0, "cpu": 5.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.json")
    parser.add_argument("--audio", type=Path, default=shared_audio_dir(), help="folder of recording folders")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for the whole run")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, fp32 on the CPU, tiny ramp: proves the script in seconds")
    parser.add_argument("--device", help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--model", help="real (random 3B shapes, the default), tiny, or a checkpoint directory")
    parser.add_argument("--streams", type=int, nargs="+", help="ramp (default 256 512 600 768 800 1024)")
    parser.add_argument("--stop-after-failures", type=int, default=0,
                        help="stop the ramp after this many failing N in a row (default 0: never; the budget "
                        "still stops it)")
    parser.add_argument("--seconds", type=float, help="audio per stream per ramp point (default 10)")
    parser.add_argument("--baseline-streams", type=int, nargs="+", help="default 1 2 4")
    parser.add_argument("--baseline-seconds", type=float, help="default 10")
    parser.add_argument("--schedule", help="scripted replies K:L, a reply every K chunks of L tokens (default 25:20; "
                        "4:3 with --dry-run, so its few seconds still hold replies)")
    parser.add_argument("--max-positions", type=int, default=4096,
                        help="KV positions per slot (lowered, and reported, when the ramp's largest N does not fit)")
    parser.add_argument("--precision-rows", type=int,
                        help="rows per recording in the correctness checks (default: all; 6 with --dry-run)")
    parser.add_argument("--no-model-ramp", action="store_true", help="skip the last stage (model-decided replies)")
    parser.add_argument("--no-flex", action="store_true",
                        help="skip the FlexAttention check (about 25 s on an H200): the static step serves the "
                        "Triton slot attention, and long rows take gather unless flex was chosen")
    args = parser.parse_args(argv)
    if not args.audio.is_dir():
        parser.error(f"--audio {args.audio} is not a folder (it should hold the recording folders of ../shared/audio)")
    dry = args.dry_run
    args.device = args.device or ("cpu" if dry else "cuda")
    args.model = args.model or ("tiny" if dry else "real")
    args.streams = sorted(args.streams or ([1, 2] if dry else [256, 512, 600, 768, 800, 1024]))
    # A dry run's 2 s are 5 chunks: 3 of warm-up, 2 timed, a scripted reply at the 4th.
    args.seconds = args.seconds or (2.0 if dry else 10.0)
    args.schedule = args.schedule or ("4:3" if dry else "25:20")
    args.baseline_streams = sorted(args.baseline_streams or ([1] if dry else [1, 2, 4]))
    args.baseline_seconds = args.baseline_seconds or (2.0 if dry else 10.0)
    if args.precision_rows is None and dry:
        args.precision_rows = 6  # enough for decisions above the noise on the tiny model
    every, length = (int(x) for x in args.schedule.split(":"))
    args.script = ScriptedTurns(every_chunks=every, reply_tokens=length)
    return args


@functools.cache
def tiny_model(device: str, dtype: str) -> LoadedModel:
    """The seeded tiny checkpoint, loaded once per (device, dtype) for every stage that needs it."""
    return load_model(ensure_demo_checkpoint(), device, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Free the last run's KV cache before the next worker sizes its own against free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 2. correctness on the tiny checkpoint


def check_precision(args, report: Report, stage: Stage) -> None:
    """bf16 on the device (fp32 CPU and bf16 CPU in a dry run) against fp32 on the CPU."""
    reference = precision.Side(tiny_model("cpu", "float32"))
    candidate = precision.Side(tiny_model(args.device, "bfloat16"))
    deadline = time.perf_counter() + max(10.0, min(45.0, report.budget.remaining_s / 6))
    result = precision.teacher_forced(reference, candidate, args.audio, max_rows_per_recording=args.precision_rows,
                                      deadline=deadline)
    record_agreement(stage, result)


def check_flex(args, report: Report, stage: Stage) -> None:
    """In-place attention against gather, same device, same dtype, same model object."""
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    model = tiny_model(args.device, dtype)
    # Compiled is the serving path on CUDA; on CPU eager flex is the same math without minutes of compiling.
    compiled = args.device != "cpu"
    reference, candidate = precision.Side(model, "gather"), precision.Side(model, "flex", compiled)
    deadline = time.perf_counter() + max(10.0, min(60.0, report.budget.remaining_s / 6))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # eager on purpose
        result = precision.teacher_forced(reference, candidate, args.audio,
                                          max_rows_per_recording=args.precision_rows, deadline=deadline)
    stage.data["seconds_including_compile"] = round(time.perf_counter() - started, 1)
    record_agreement(stage, result)


def record_agreement(stage: Stage, result: precision.Agreement) -> None:
    data = result.as_dict()
    stage.data.update(data)
    ok = data["decisive_decisions"] > 0 and data["decisive_agreeing"] == data["decisive_decisions"]
    stage.data["passes"] = ok
    stage.note = (f"{'PASS' if ok else 'FAIL'}: {data['decisive_agreeing']}/{data['decisive_decisions']} decisions "
                  "whose reference margin exceeds the largest noise agree"
                  + ("; cut short by its time limit" if result.is_partial else ""))
    stage.lines = [f"Reference: {result.reference}; candidate: {result.candidate}; teacher-forced on the "
                   "reference's trajectory.", ""] + result.markdown()


# ---------------------------------------------------------------------------------------------
# 3. the real-size model: build, warm up, ramp


@dataclass
class Served:
    """What the capacity stages share: the model, the audio (PCM loop and its mel chunks), the ramp's KV layout."""

    model: LoadedModel | None = None
    loop: np.ndarray | None = None
    chunks: list[torch.Tensor] | None = None
    max_sessions: int = 0
    max_positions: int = 0
    rollover_window: int | None = None  # one that fits max_positions (lowered to fit the slots, it may not be 4,096)
    attention: str = "auto"  # "gather" once flex failed to compile here, so no worker retries it per N
    max_batch_rows: int | None = None  # the largest compiled flex bucket, when compiling ran out of time
    fused_kernels: str = "auto"  # "off" once the fused stage failed, so the ramp still measures the torch layers
    worker_start_s: float = WORKER_START_S["cuda"]  # a worker start-up: the device's guess, then the ramp's measure


def build_model(args, served: Served, stage: Stage) -> None:
    started = time.perf_counter()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.model == "tiny":
        served.model = tiny_model(args.device, dtype)
    else:
        served.model, _ = capacity.load(args.model, args.device, dtype)
    model = served.model
    stage.data["build_s"] = round(time.perf_counter() - started, 1)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    stage.data.update(name=model.name, device=str(model.device), dtype=str(model.dtype),
                      lm_parameters=count(model.lm), encoder_parameters=count(model.encoder_tower))
    if model.device.type == "cuda":
        stage.data["allocated_after_build_mib"] = round(torch.cuda.memory_allocated(model.device) / 2**20)
    served.loop = audio_loop(args.audio)
    served.chunks = capacity.mel_chunks(served.loop)
    stage.note = (f"{model.name}: LM {stage.data['lm_parameters'] / 1e9:.2f}B, audio tower "
                  f"{stage.data['encoder_parameters'] / 1e9:.2f}B parameters, {model.dtype} on {model.device}, "
                  f"built in {stage.data['build_s']} s")


def ramp_kv_layout(args, served: Served, stage: Stage) -> None:
    """Slots for the ramp's largest N at ``--max-positions``, or fewer positions if that does not fit."""
    lm = served.model.lm
    served.max_sessions = max(args.streams)
    positions = args.max_positions
    fit = sessions_that_fit(lm, positions, KV_MEMORY_FRACTION)
    # 5% spare: every worker re-checks the fit against what is free then (kernels, workspaces) and refuses to start.
    if fit is not None and fit < 1.05 * served.max_sessions:
        per_position = kv_bytes_per_slot(lm, FLEX_BLOCK) / FLEX_BLOCK
        free, _ = torch.cuda.mem_get_info(served.model.device)
        positions = (int(0.95 * free * KV_MEMORY_FRACTION / served.max_sessions / per_position)
                     // FLEX_BLOCK * FLEX_BLOCK)
        stage.data["positions_lowered_from"] = args.max_positions
        if positions < MIN_RAMP_POSITIONS:
            raise RuntimeError(f"{served.max_sessions} slots do not fit even at {MIN_RAMP_POSITIONS} positions")
    served.max_positions = positions
    served.rollover_window = fitting_rollover_window(positions, SessionOptions().max_turn_tokens)
    kv_gib = served.max_sessions * kv_bytes_per_slot(lm, positions) / 2**30
    stage.data.update(max_sessions=served.max_sessions, max_positions=positions, kv_cache_gib=round(kv_gib, 2))


def warm_up(args, served: Served, report: Report, stage: Stage) -> None:
    """Every encoder batch bucket and every FlexAttention batch bucket, each timed, before anything is timed."""
    ramp_kv_layout(args, served, stage)
    model = served.model
    encoder = AudioEncoder(model.encoder_tower)
    sizes = sorted({batch_bucket(n) for n in range(1, served.max_sessions + 1)})
    started = time.perf_counter()
    call_ms = {}
    for size in sizes:
        mel = torch.zeros(size, 128, 40)
        encoder.encode(mel)  # the first call of a shape pays for its kernels' set-up
        synchronize(model.device)
        timed = time.perf_counter()
        encoder.encode(mel)
        synchronize(model.device)
        call_ms[size] = round(1e3 * (time.perf_counter() - timed), 2)
    stage.data["encoder_buckets"] = sizes
    stage.data["encoder_call_ms"] = call_ms  # one warm call per batch size: what a step's encoder part costs
    stage.data["encoder_warm_up_s"] = round(time.perf_counter() - started, 2)
    lines = [f"KV cache for the ramp: {served.max_sessions} slots x {served.max_positions} positions = "
             f"{stage.data['kv_cache_gib']} GiB"
             + (f" (lowered from {args.max_positions} positions to fit)" if "positions_lowered_from" in stage.data
                else ""),
             f"Encoder: {len(sizes)} batch buckets (1 .. {sizes[-1]}) warmed up in "
             f"{stage.data['encoder_warm_up_s']} s; "
             "one warm call per size, ms (ms per chunk): "
             + ", ".join(f"{n}: {ms} ({ms / n:.2f})" for n, ms in call_ms.items())]
    if model.device.type != "cuda":
        stage.lines = lines + ["FlexAttention: not compiled (the engine serves gather on the CPU)"]
        return
    if served.attention == "auto" and choose_step(EngineConfig(), model.device).static:
        stage.lines = lines + ["FlexAttention: not compiled (the static step serves every short row; the workers "
                               "give the eager path's long rows gather, static_path.choose_eager_attention)"]
        return
    stage.lines = lines
    compile_flex_buckets(args, served, report, stage)


def compile_flex_buckets(args, served: Served, report: Report, stage: Stage) -> None:
    model = served.model
    # The engine compiles and self-checks flex for every batch bucket at start-up; done here bucket by
    # bucket on a cache of the ramp's shape, so each compile is timed and later workers find them compiled.
    cache = model.lm.new_cache(served.max_sessions, served.max_positions)
    compiles = []
    try:
        rows = 8
        # Compiling must leave time for at least two ramp points and the baseline; the next bucket is
        # assumed to cost twice the last one (or 30 s). Buckets not compiled cap the ramp's rows per step.
        keep_s = 2 * (args.seconds + 15) + args.baseline_seconds + 10
        while True:
            next_s = max(30.0, 2 * compiles[-1]["seconds"]) if compiles else 30.0
            if not report.budget.allows(keep_s + next_s):
                stop_at = flex_batch_bucket(min(rows, served.max_sessions))
                if compiles:
                    served.max_batch_rows = compiles[-1]["rows"]
                    stage.note = (f"compiling stopped before the {stop_at}-row bucket (budget): the ramp runs N <= "
                                  f"{served.max_batch_rows} only")
                else:
                    served.attention = "gather"
                    stage.note = "no time to compile FlexAttention: the ramp serves gather attention"
                break
            started = time.perf_counter()
            try:
                worst = self_check_flex(model.lm, cache, min(rows, served.max_sessions))
            except Exception as exc:
                served.attention = "gather"
                stage.note = (f"FlexAttention FAILED at the {flex_batch_bucket(min(rows, served.max_sessions))}-row "
                              f"bucket, the ramp serves gather attention: {exc!r}")
                raise
            compiles.append({"rows": flex_batch_bucket(min(rows, served.max_sessions)),
                             "seconds": round(time.perf_counter() - started, 2), "max_abs_diff": worst})
            progress(f"  flex bucket {compiles[-1]['rows']} rows: {compiles[-1]['seconds']} s, "
                     f"max |flex - gather| {worst:.2e}")
            if rows >= served.max_sessions:
                break
            rows *= 2
    finally:
        model.lm.attention_backend, model.lm.compile_attention = "gather", False
        del cache
        release_memory()
    stage.data["flex_buckets"] = compiles
    stage.data["flex_compile_s"] = round(sum(c["seconds"] for c in compiles), 1)
    lines = stage.lines
    lines.append(f"FlexAttention compiled and checked against gather for {len(compiles)} batch buckets in "
                 f"{stage.data['flex_compile_s']} s:")
    lines += ["", "| rows (padded) | compile + check s | max abs diff vs gather |", "|---|---|---|"]
    lines += [f"| {c['rows']} | {c['seconds']} | {c['max_abs_diff']:.2e} |" for c in compiles]
    stage.lines = lines


RAMP_COLUMNS = ("| N | decisions | p50 ms | p95 ms | p99 ms | first token p50 ms | p95 ms | reply tok/s p50 | "
                "p5 | step ms | encoder ms (%) | LM ms (%) | host ms (%) | rows/step mean / max | peak MiB | "
                "p95 <= 100 | TTFT <= 50 | reply >= 20 | host < 20% | verdict |")
RAMP_SEPARATOR = "|" + "---|" * (RAMP_COLUMNS.count("|") - 1)


def run_record(run: capacity.Run) -> dict:
    """One ramp point as JSON: every figure of the table row, unrounded where it matters."""
    def ms(values, q):
        return round(capacity.pct(values, q) * 1e3, 2) if values else None

    split = capacity.step_split(run)
    checks = TARGETS.checks(run)
    return {
        "mode": run.mode, "streams": run.streams, "seconds": run.seconds, "max_sessions": run.max_sessions,
        "decisions": len(run.decision_s), "expected_decisions": run.expected_decisions, "errors": run.errors,
        "decision_ms": {q: ms(run.decision_s, q) for q in (50, 95, 99)},
        "first_token_ms": {q: ms(run.first_token_s, q) for q in (50, 95)},
        "replies": len(run.reply_rates),
        "reply_tokens_per_s": {q: round(capacity.pct(run.reply_rates, q), 1) if run.reply_rates else None
                               for q in (50, 5)},
        "step": None if split is None else {k: round(v, 3) for k, v in vars(split).items()},
        "peak_memory_mib": round(run.memory_mib), "setup_s": round(run.setup_s, 2),
        "started_worker": run.started_worker, "attention": run.attention, "step_path": run.step_path,
        "checks": checks, "passes": TARGETS.passes(run),
    }


def describe_step_path(path: dict) -> str:
    """One ramp point's step path in words: a point served without its graphs must say so in the report."""
    if path.get("path") != "static":
        return path.get("graphs", "unknown")
    return (f"graphs {path['graphs']} ({path['captured']} captured in {path['capture_s']} s, "
            f"{path['pool_mib']} MiB pool): {path['graph_steps']} replayed, {path['static_eager_steps']} static "
            f"steps run eagerly, {path['eager_batches']} batches on the eager path")


def ramp_row(record: dict) -> str:
    if "error" in record:
        return f"| {record['streams']} | failed: {record['error'][:300]} |"

    def cell(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    def verdict(value):
        return {True: "yes", False: "**no**", None: "-"}[value]

    step = record["step"]
    if step:
        share = lambda part: f"{step[part]:.1f} ({100 * step[part] / step['step_ms']:.0f}%)"  # noqa: E731
        split = (f"{step['step_ms']:.1f} | {share('encoder_ms')} | {share('lm_ms')} | {share('host_ms')} | "
                 f"{step['rows_mean']:.1f} / {step['rows_max']}")
    else:
        split = "- | - | - | - | -"
    d, f, r, c = record["decision_ms"], record["first_token_ms"], record["reply_tokens_per_s"], record["checks"]
    return (f"| {record['streams']} | {record['decisions']}/{record['expected_decisions']} | {cell(d[50])} | "
            f"{cell(d[95])} | {cell(d[99])} | {cell(f[50])} | {cell(f[95])} | {cell(r[50], '{:.0f}')} | "
            f"{cell(r[5], '{:.0f}')} | {split} | {record['peak_memory_mib']} | {verdict(c['decision_p95'])} | "
            f"{verdict(c['first_token_p95'])} | {verdict(c.get('reply_rate_p5'))} | {verdict(c.get('host_share'))} | "
            f"{'PASS' if record['passes'] else 'fail'}{'' if c['complete'] else ' (decisions missing)'} |")


def measure(streams: int, run_at: Callable[[], capacity.Run]) -> dict:
    """One ramp point as a record; an exception (out of memory at one N, say) is a failing point, not the end."""
    started = time.perf_counter()
    try:
        record = run_record(run_at())
    except Exception as exc:
        record = {"streams": streams, "passes": False, "error": repr(exc), "traceback": traceback.format_exc()}
        progress(f"  N={streams} failed:\n{record['traceback']}")
    release_memory()
    record["wall_s"] = round(time.perf_counter() - started, 1)
    progress(f"  {record.get('mode', '')} N={streams}: {ramp_row(record)}")
    return record


def ramp(args, served: Served, report: Report, stage: Stage, script: ScriptedTurns | None,
         reserve_s: float, ramp_streams: list[int]) -> None:
    """N streams for ``--seconds`` each, in ascending N, while the budget allows (and, with
    ``--stop-after-failures K``, until K failing N in a row).

    ``reserve_s`` is kept back for the stages after this one (the baseline must still run)."""
    engine: dict = {"attention": served.attention, "max_positions": served.max_positions,
                    "rollover_window_positions": served.rollover_window,
                    "max_batch_rows": served.max_batch_rows, "fused_kernels": served.fused_kernels}
    if script is not None:
        engine["scripted_turns"] = {"every_chunks": script.every_chunks, "reply_tokens": script.reply_tokens}
    records: list[dict] = []
    stage.data["runs"] = records
    # engine.fused_kernels as configured: auto fuses where the static step runs on CUDA with triton.
    stage.data["fused_kernels"] = served.fused_kernels
    estimate_s = args.seconds + 15  # one point on a running worker: the 0.2 s lead, draining, closing
    # One start-up for every N (its slots at the layout's largest N, the ramp's if the layout stage did not run).
    shared = capacity.SharedWorker(served.model, engine, served.max_sessions or max(ramp_streams, default=1))

    def run_at(streams: int) -> capacity.Run:
        return capacity.run_direct(served.model, served.chunks, streams, args.seconds, engine,
                                   name="direct" if script else "direct (model-decided)", drain_s=10.0,
                                   shared=shared)

    def point(streams: int) -> dict | None:
        """Measure N streams, or None (and say why) when the compiled buckets or the budget rule it out."""
        nonlocal estimate_s
        # The shared worker starts (graph capture) only at the first point, or after a point left it dead.
        starting = shared.worker is None or not shared.worker.is_alive
        if served.max_batch_rows is not None and streams > served.max_batch_rows:
            stage.note = (f"N={streams} and above not run: FlexAttention compiled only up to "
                          f"{served.max_batch_rows} rows")
            return None
        if not report.budget.allows(estimate_s + (served.worker_start_s if starting else 0.0) + reserve_s):
            stage.note = f"ramp stopped before N={streams}: {report.budget.remaining_s:.0f} s of the budget left"
            return None
        record = measure(streams, lambda: run_at(streams))
        records.append(record)
        # A point's own time, without the worker start it paid for: the next points run on the same worker.
        start_s = record.get("setup_s", 0.0) if record.get("started_worker") else 0.0
        if start_s:
            served.worker_start_s = start_s
        estimate_s = max(estimate_s, record["wall_s"] - start_s + 2)
        ramp_lines(stage, records)
        report.write()
        return record

    try:
        ramp_points(stage, ramp_streams, point, args.stop_after_failures)
    finally:
        shared.stop()
        release_memory()


def ramp_points(stage: Stage, ramp_streams: list[int], point: Callable[[int], dict | None],
                stop_after_failures: int | None) -> None:
    """The ramp's N in order, stopping where ``point`` cannot run one or after ``stop_after_failures`` in a row."""
    records: list[dict] = stage.data["runs"]
    failures_in_a_row = 0
    for streams in ramp_streams:
        record = point(streams)
        if record is None:
            return
        failures_in_a_row = 0 if record["passes"] else failures_in_a_row + 1
        if stop_after_failures and failures_in_a_row >= stop_after_failures:
            stage.note = f"ramp stopped after {failures_in_a_row} failing N in a row (N={streams})"
            break
    # Nothing held: halve N below the ramp (up to 3 points) so the report still says where the capacity lies.
    streams = min(ramp_streams) // 2
    for _ in range(3):
        if any(r["passes"] for r in records) or streams < 1:
            break
        if point(streams) is None:
            return
        stage.note = f"no N of the ramp held the targets; halved down to N={streams}"
        streams //= 2


def ramp_lines(stage: Stage, records: list[dict]) -> None:
    passing = [r["streams"] for r in records if r["passes"]]
    stage.data["capacity"] = max(passing, default=0)
    measured = [r for r in records if "error" not in r]
    worker = "every N failed before it was measured"
    if measured:
        starts = [r["setup_s"] for r in measured if r["started_worker"]]
        worker = (f"Worker: {measured[0]['max_sessions']} slots for every N, one worker serving every N in turn; "
                  f"attention {measured[0]['attention']}; worker start-up {' + '.join(map(str, starts)) or '0'} s "
                  f"({len(starts)} start(s), not part of the figures); engine.fused_kernels "
                  f"{stage.data.get('fused_kernels', 'auto')}; short batches: "
                  + "; ".join(f"N={r['streams']} {describe_step_path(r.get('step_path') or {})}" for r in measured))
    in_order = sorted(records, key=lambda r: r["streams"])
    stage.lines = [worker, "", RAMP_COLUMNS, RAMP_SEPARATOR, *map(ramp_row, in_order), "",
                   f"Largest N that held every target: **{stage.data['capacity']}** "
                   f"(of {[r['streams'] for r in in_order]})"]


def baseline(args, served: Served, report: Report, stage: Stage) -> None:
    records: list[dict] = []
    stage.data["runs"] = records
    for streams in args.baseline_streams:
        if not report.budget.allows(args.baseline_seconds + 10):
            stage.note = f"stopped before N={streams}: budget"
            break
        overrun_s = max(2.0, min(20.0, report.budget.remaining_s - args.baseline_seconds - 10))
        records.append(measure(streams, lambda: capacity.run_baseline(
            served.model, served.loop, streams, args.baseline_seconds, args.script, overrun_s=overrun_s)))
        passing = [r["streams"] for r in records if r["passes"]]
        stage.data["capacity"] = max(passing, default=0)
        stage.lines = ["The reference's way on the same model: one stream at a time at batch 1, the encoder over "
                       "the whole audio history for every chunk, replies generated inline (SCRIPTED "
                       f"{args.schedule}). No step split (there is no batched step).", "", RAMP_COLUMNS,
                       RAMP_SEPARATOR, *map(ramp_row, records), "",
                       f"Largest N that held every target: **{stage.data['capacity']}** (of {args.baseline_streams})"]
        report.write()
        if not records[-1]["passes"]:
            break  # more streams served one at a time only fall further behind


def gpu_busy(args, served: Served, report: Report, stage: Stage) -> None:
    """How much of the step time the GPU spends in kernels, at the capacity N (kernel traces via the profiler).

    Well below 100% means the step waits on the CPU (Python, kernel launches, the encoder's per-chunk
    loop): what "host" in the step split cannot show, since launches happen inside the encoder/LM calls.
    Tracing slows launches a little, so this run's latencies are not reported.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    ramp_stage = report.stage("ramp")
    held = ramp_stage.data.get("capacity", 0) if ramp_stage else 0
    streams = min(held or min(args.streams), 256)  # bounded: every kernel is one trace event
    seconds = min(args.seconds, 3.0)  # the encoder launches kernels per chunk and layer: traces grow fast
    on_cuda = served.model.device.type == "cuda"
    profiler = profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU])
    engine = {"attention": served.attention, "max_positions": served.max_positions,
              "rollover_window_positions": served.rollover_window,
              "max_batch_rows": served.max_batch_rows, "fused_kernels": served.fused_kernels,
              "scripted_turns": {"every_chunks": args.script.every_chunks, "reply_tokens": args.script.reply_tokens}}
    try:
        run = capacity.run_direct(served.model, served.chunks, streams, seconds, engine,
                                  max_sessions=served.max_sessions, drain_s=5.0, on_serving=profiler.start)
    finally:
        profiler.stop()
        release_memory()
    started = time.perf_counter()
    kernels = [e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    step_ms = 1e3 * sum(s.total_s for s in run.steps)
    steps = sum(1 for s in run.steps if s.num_rows)
    stage.data.update(streams=streams, seconds=seconds, steps=steps, step_ms_total=round(step_ms, 1),
                      kernel_ms_total=round(kernel_ms, 1), kernel_launches=sum(e.count for e in kernels),
                      trace_processing_s=round(time.perf_counter() - started, 1))
    if not on_cuda:
        stage.note = "no CUDA device: kernel time not measured (the dry run only proves the code path)"
        return
    if not kernels:
        raise RuntimeError("the profiler recorded no GPU kernel (CUPTI unavailable?): GPU busy time not measured")
    busy = kernel_ms / step_ms if step_ms else 0.0
    stage.data["gpu_busy_share_of_step"] = round(busy, 3)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    stage.note = f"GPU busy {100 * busy:.0f}% of step time at N={streams}"
    stage.lines = [f"N={streams} for {seconds:g} s (SCRIPTED {args.schedule}): {steps} steps, {step_ms:.0f} ms of step "
                   f"time, {kernel_ms:.0f} ms of GPU kernels ({stage.data['kernel_launches']} launches, "
                   f"{stage.data['kernel_launches'] / max(steps, 1):.0f} per step): the GPU is busy "
                   f"**{100 * busy:.0f}%** of the step time.", "", "| kernel | launches | GPU ms | share |",
                   "|---|---|---|---|"]
    stage.lines += [f"| {e.key[:80]} | {e.count} | {e.self_device_time_total / 1e3:.1f} | "
                    f"{100 * e.self_device_time_total / 1e3 / max(kernel_ms, 1e-9):.0f}% |" for e in top]


# ---------------------------------------------------------------------------------------------


def summarize(args, report: Report) -> None:
    scripted, base = report.stage("ramp"), report.stage("baseline")
    ours = scripted.data.get("capacity") if scripted else None
    theirs = base.data.get("capacity") if base else None
    summary = report.summary
    summary["correctness bf16 vs fp32"] = _verdict(report.stage("precision"))
    summary["correctness flex vs gather"] = _verdict(report.stage("flex"))
    summary["static step graphs"] = _verdict(report.stage("graphs"))
    summary["static step fused kernels"] = _verdict(report.stage("fused"))
    if ours is not None:
        summary["capacity (scripted replies, direct mode)"] = f"{ours} streams (ramp {args.streams})"
        summary[f"target >= {CAPACITY_TARGET_STREAMS} streams per GPU"] = (
            "MET" if ours >= CAPACITY_TARGET_STREAMS else "NOT MET"
        ) + (" (dry run: meaningless)" if args.dry_run else "")
        runs = scripted.data.get("runs", [])
        held = next((r for r in runs if r["streams"] == ours and "error" not in r), None)
        if held is not None:
            summary[f"at N={ours}"] = describe(held)
        beyond = min((r for r in runs if r["streams"] > ours and not r["passes"]), key=lambda r: r["streams"],
                     default=None)
        if beyond is not None:
            summary[f"first failing N={beyond['streams']}"] = (
                beyond["error"] if "error" in beyond else
                "missed " + ", ".join(name for name, ok in beyond["checks"].items() if ok is False)
                + f"; {describe(beyond)}")
    if theirs is not None:
        summary["baseline capacity"] = f"{theirs} streams (of {args.baseline_streams})"
    if ours and theirs:
        summary["ratio ours / baseline"] = f"{ours / theirs:.1f}x"
    elif ours and theirs == 0:
        summary["ratio ours / baseline"] = f"baseline held none of {args.baseline_streams}; ratio > {ours}x"
    elif ours == 0 and theirs is not None:
        summary["ratio ours / baseline"] = "none: the ramp held no N"
    busy = report.stage("gpu-busy")
    if busy and "gpu_busy_share_of_step" in busy.data:
        summary["GPU busy share of step time"] = busy.note
    model_ramp = report.stage("model-ramp")
    if model_ramp and "capacity" in model_ramp.data:
        summary["capacity (model-decided replies)"] = f"{model_ramp.data['capacity']} streams"


def describe(record: dict) -> str:
    """The headline figures of one ramp point, for the summary."""
    step = record["step"] or {}
    split = ""
    if step:
        split = ", step {:.1f} ms = encoder {:.0f}% / LM {:.0f}% / host {:.0f}%, {:.1f} rows/step".format(
            step["step_ms"], *(100 * step[k] / step["step_ms"] for k in ("encoder_ms", "lm_ms", "host_ms")),
            step["rows_mean"])
    path = record.get("step_path") or {}
    graphs = f", CUDA graphs {path['graphs']}" if path.get("path") == "static" else ""
    return (f"p95 decision {record['decision_ms'][95]} ms, p95 first token {record['first_token_ms'][95]} ms, "
            f"slowest-5% reply {record['reply_tokens_per_s'][5]} tok/s{split}, peak {record['peak_memory_mib']} MiB"
            f"{graphs}")


def _verdict(stage: Stage | None) -> str:
    if stage is None:
        return "not run"
    if stage.status != "done":
        return stage.status + (f" ({stage.note})" if stage.note else "")
    return stage.note


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s, STARTED)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU host")
    device = torch.device(args.device)
    header = {"title": "DRY RUN (CPU, tiny model: proves the script, measures nothing)" if args.dry_run
              else f"{args.model} model on {device}", **machine(device),
              "replies": f"SCRIPTED {args.schedule} in the main ramp (a reply every {args.script.every_chunks} chunks "
                         f"of {args.script.reply_tokens} tokens per stream); the model still computes every row",
              "targets": "p95 decision <= 100 ms, p95 first token <= 50 ms, slowest 5% of replies >= 20 tok/s, "
                         "host < 20% of step time, every decision arrived",
              "audio": str(args.audio)}
    report = Report(args.out, header, budget)
    report.write()
    progress(f"gpu_check: report in {args.out}; budget {args.budget_s:.0f} s")
    report.run_stage("precision", "Correctness: bf16 on the device vs fp32 on the CPU (tiny checkpoint)", 20,
                     lambda stage: check_precision(args, report, stage))
    report.run_stage("flex", "Correctness: in-place FlexAttention vs gather on the device (tiny checkpoint)", 30,
                     lambda stage: check_flex(args, report, stage), skip_reason="--no-flex" if args.no_flex else None)
    served = Served(worker_start_s=WORKER_START_S["cuda" if device.type == "cuda" else "cpu"])
    built = report.run_stage("model", "Real-size model" if args.model == "real" else f"Model: {args.model}", 30,
                             lambda stage: build_model(args, served, stage))
    no_model = None if built.status == "done" else "no model (see the model stage)"
    report.run_stage("attention", "Static step: attention candidates, one layer", 40,
                     lambda stage: attention_candidates(served.model, args.dry_run, stage), skip_reason=no_model)
    release_memory()
    report.run_stage("graphs", "Static step: CUDA graphs per bucket, replay vs eager", 60,
                     lambda stage: graph_buckets(served.model, args.dry_run, stage), skip_reason=no_model)
    release_memory()
    fused = report.run_stage("fused", "Static step: fused kernels vs the torch layers, per bucket", 45,
                             lambda stage: fused_buckets(served.model, args.dry_run, stage), skip_reason=no_model)
    if fused.status == "failed":
        served.fused_kernels = "off"  # the engine would fail at start-up the same way at every N
    release_memory()
    baseline_reserve_s = args.baseline_seconds + 10
    warm = report.run_stage("warm-up", "Compile and warm-up (not part of any timed figure)", 60 + baseline_reserve_s,
                            lambda stage: warm_up(args, served, report, stage), skip_reason=no_model)
    no_layout = no_model or (None if served.max_positions else "no KV layout (see the warm-up stage)")
    if warm.status == "skipped" and no_model is None:
        no_layout = "warm-up skipped: no time for compiling"
    report.run_stage("ramp", f"Capacity ramp, direct mode, SCRIPTED replies {args.schedule}",
                     args.seconds + 15 + served.worker_start_s + baseline_reserve_s,  # its first point starts one
                     lambda stage: ramp(args, served, report, stage, args.script, baseline_reserve_s, args.streams),
                     skip_reason=no_layout)
    summarize(args, report)
    report.run_stage("baseline", "Reference-style baseline, same model", args.baseline_seconds + 10,
                     lambda stage: baseline(args, served, report, stage), skip_reason=no_model)
    summarize(args, report)
    report.run_stage("gpu-busy", "GPU busy share of the step (kernel traces)", 45 + served.worker_start_s,
                     lambda stage: gpu_busy(args, served, report, stage), skip_reason=no_layout)
    summarize(args, report)
    report.run_stage("model-ramp", "Capacity ramp, direct mode, replies decided by the random model "
                     "(decisions are noise)", args.seconds + 15 + served.worker_start_s,
                     # A dry run only proves the code path: one point is enough.
                     lambda stage: ramp(args, served, report, stage, None, 0.0,
                                        args.streams[:1] if args.dry_run else args.streams),
                     skip_reason=no_layout or ("--no-model-ramp" if args.no_model_ramp else None))
    summarize(args, report)
    report.write()
    progress(f"gpu_check: done in {budget.elapsed_s:.0f} s; {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
