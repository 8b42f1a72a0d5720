"""The GPU check's stages for the static step (issue 23): attention candidates, and graphs per bucket.

``attention_candidates``: one layer's attention at the issue's (rows, position) points, every
candidate timed on the same queries and cache: gather to the longest row (what the eager path does),
gather at the fixed slot length (graph-safe, the static step's CPU path) and our Triton kernel at a
few launch configurations; microseconds per layer, the GB/s of keys and values it had to read, and
its largest difference from gather.

``graph_buckets``: a static step on the served model, a few (listening, reply) buckets captured as
CUDA graphs into one pool: capture seconds, pool memory, and per bucket the eager static step against
its replay (ms, ratio measured side by side, tokens equal).

``fused_buckets``: the same buckets with the torch layers and with the fused Triton kernels
(``model/fused_kernels.py``): per bucket the launches of one step (CUDA kernels, memsets and copies
counted by torch.profiler on the step run eagerly, which is what its graph holds), ms per replay of
each variant's graph, and whether the two give the same tokens.

All run on the CPU in a dry run (tiny shapes, no Triton, no graphs) so the code path is proven; there
the fused variant is not run and the launch column counts the step's top-level torch operations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.gpu_report import Stage
from audio_interaction_server.engine.buckets import BucketSet
from audio_interaction_server.engine.packing import StepStaging
from audio_interaction_server.engine.sampling import DECISION_TOKENS
from audio_interaction_server.engine.static_path import StaticPath
from audio_interaction_server.engine.step_graphs import StepGraphs, StepSnapshot, compare_steps, synthetic_rows
from audio_interaction_server.model.checkpoint import LoadedModel
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.fused_kernels import fused_kernels_runnable
from audio_interaction_server.model.slot_attention import (
    KernelConfig, RowSpans, gather_attention, triton_attention, triton_available,
)
from audio_interaction_server.model.static_step import ROW_TOKENS, Bucket, StaticAttention, StaticStep

LISTENING_TOKENS = 13  # a listening block's real tokens in its 16-token row
TRITON_CONFIGS = (KernelConfig(64, 4), KernelConfig(64, 8), KernelConfig(128, 8), KernelConfig(32, 4))


def _median_us(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: compiles the kernel, sets up the library handles
        run()
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        samples.append(time.perf_counter() - started)
    return 1e6 * sorted(samples)[len(samples) // 2]


def attention_candidates(model: LoadedModel, dry_run: bool, stage: Stage) -> None:
    cfg = model.lm.cfg
    device, dtype = model.device, model.lm.lm_head.weight.dtype
    G, H, D = cfg.n_query_groups, cfg.n_head, cfg.head_size
    # (rows, position of the first new token, query tokens per row)
    cases = ([(4, 100, ROW_TOKENS), (4, 200, 1)] if dry_run else
             [(16, 500, ROW_TOKENS), (64, 2000, ROW_TOKENS), (128, 2000, ROW_TOKENS), (256, 3500, ROW_TOKENS),
              (64, 2000, 1)])
    max_positions = 256 if dry_run else 4096
    num_slots = max(rows for rows, _, _ in cases) + 1
    generator = torch.Generator(device=device).manual_seed(0)
    cache_k = torch.randn(G, num_slots, max_positions, D, generator=generator, device=device).to(dtype)
    cache_v = torch.randn(G, num_slots, max_positions, D, generator=generator, device=device).to(dtype)
    use_triton = device.type == "cuda" and triton_available()
    scale = D ** -0.5
    records = []
    stage.data["cases"] = records
    for rows, position, width in cases:
        real = LISTENING_TOKENS if width == ROW_TOKENS else 1
        q = torch.randn(rows * width, H, D, generator=generator, device=device).to(dtype)
        slots = torch.arange(rows, device=device)
        cols = torch.arange(width, device=device)
        positions = torch.where(cols < real, position + cols, 0).expand(rows, width).contiguous()
        spans = RowSpans(slots * width, torch.full((rows,), real, device=device), slots,
                         torch.full((rows,), position + real, device=device))
        grid = q.view(rows, width, H, D).transpose(1, 2)
        longest = position + real

        def gather_to_longest():
            return gather_attention(grid, cache_k[:, :, :longest], cache_v[:, :, :longest], slots, positions,
                                    scale, G != H)

        def gather_fixed():
            return gather_attention(grid, cache_k, cache_v, slots, positions, scale, G != H)

        candidates: dict[str, Callable[[], torch.Tensor]] = {
            "gather to the longest row (eager)": lambda: gather_to_longest().transpose(1, 2).reshape(-1, H, D),
            "gather at the slot length (static)": lambda: gather_fixed().transpose(1, 2).reshape(-1, H, D),
        }
        if use_triton:
            for config in TRITON_CONFIGS:
                name = f"triton block_n={config.block_n} warps={config.num_warps}"
                candidates[name] = (lambda c=config: triton_attention(q, cache_k, cache_v, torch.zeros_like(q), spans,
                                                                      width, scale, c))
        real_tokens = (cols < real).repeat(rows)
        reference = candidates["gather to the longest row (eager)"]().float()[real_tokens]
        key_bytes = 2 * rows * G * (position + real) * D * cache_k.element_size()  # K and V each row must read
        for name, run in candidates.items():
            record = {"rows": rows, "position": position, "query_tokens": real, "candidate": name}
            try:
                diff = float((run().float()[real_tokens] - reference).abs().max())
                us = _median_us(run, device, repeats=3 if dry_run else 20)
                record.update(us_per_layer=round(us, 1), gb_per_s=round(key_bytes / us / 1e3, 1),
                              max_abs_diff_vs_gather=diff)
            except Exception as exc:  # one candidate failing (no kernel for this GPU, out of memory) is a result
                record["error"] = repr(exc)
            records.append(record)
    stage.lines = ["One layer's attention, median of repeated calls; GB/s = the keys and values the rows must read "
                   "(K and V up to each row's position) per second.", "",
                   "| rows x tokens | position | candidate | us per layer | GB/s | max abs diff vs gather |",
                   "|---|---|---|---|---|---|"]
    for r in records:
        cells = (f"{r['us_per_layer']} | {r['gb_per_s']} | {r['max_abs_diff_vs_gather']:.2e}" if "error" not in r
                 else f"failed: {r['error'][:120]} | - | -")
        stage.lines.append(f"| {r['rows']} x {r['query_tokens']} | {r['position']} | {r['candidate']} | {cells} |")
    if not use_triton:
        stage.note = "Triton kernel not timed: " + ("no CUDA device" if device.type != "cuda" else "triton missing")


@dataclass
class StaticSetup:
    """A static step on the served model with its staging, for the stages that replay buckets of it."""

    buckets: list[Bucket]
    step: StaticStep
    staging: StepStaging
    num_slots: int
    max_positions: int
    attention: StaticAttention

    def clear(self) -> None:
        """Zero the session slots the synthetic rows wrote (the cache is freed with the step anyway)."""
        for slot in range(self.num_slots):
            self.step.cache.clear_slot(slot)


def static_setup(model: LoadedModel, dry_run: bool, buckets: list[Bucket] | None = None) -> StaticSetup:
    """The issue's buckets (two small ones in a dry run), a cache with one slot per row of the largest."""
    on_cuda = model.device.type == "cuda"
    if buckets is None:
        buckets = [Bucket(8, 0), Bucket(8, 8)] if dry_run else [Bucket(16, 0), Bucket(64, 8), Bucket(128, 16),
                                                                Bucket(256, 32)]
    largest = Bucket(max(b.listening for b in buckets), max(b.reply for b in buckets))
    num_slots = largest.num_rows
    max_positions = 256 if dry_run else 4096
    attention: StaticAttention = "triton" if on_cuda and triton_available() else "gather"
    cache = model.lm.new_cache(num_slots, max_positions, scratch_slot=True)
    step = StaticStep(model.lm, AudioEncoder(model.encoder_tower), cache, largest, DECISION_TOKENS, attention)
    path = StaticPath(step, BucketSet(tuple(sorted({0, *(b.listening for b in buckets)})),
                                      tuple(sorted({0, *(b.reply for b in buckets)}))), graphs=False)
    return StaticSetup(buckets, step, path.staging, num_slots, max_positions, attention)


def load_synthetic_rows(setup: StaticSetup, bucket: Bucket, vocab_size: int, generator: torch.Generator) -> list[int]:
    """Pack and load synthetic rows for ``bucket``; returns the indices of its real rows in the outputs."""
    listening, reply = synthetic_rows(bucket, setup.num_slots, setup.max_positions, vocab_size, generator)
    setup.staging.pack(bucket, listening, reply)
    setup.step.load(setup.staging.bytes, bucket)
    return list(range(len(listening))) + [bucket.listening + k for k in range(len(reply))]


def graph_buckets(model: LoadedModel, dry_run: bool, stage: Stage) -> None:
    on_cuda = model.device.type == "cuda"
    setup = static_setup(model, dry_run)
    buckets, step, attention = setup.buckets, setup.step, setup.attention
    graphs = StepGraphs(step, setup.staging, buckets) if on_cuda else None
    if graphs is not None:
        stats = graphs.capture()
        stage.data.update(capture_s=round(stats.capture_s, 2), pool_mib=round(stats.pool_bytes / 2**20, 1),
                          graphs=stats.num_graphs)
    generator = torch.Generator().manual_seed(1)
    records = []
    stage.data.update(attention=attention, buckets=records)
    for bucket in buckets:
        real_rows = load_synthetic_rows(setup, bucket, model.lm.cfg.vocab_size, generator)
        eager_ms = _median_us(lambda: step.run(bucket), model.device, 3 if dry_run else 10) / 1e3
        eager = StepSnapshot.of(step, real_rows)
        record = {"bucket": str(bucket), "real_rows": len(real_rows), "eager_static_ms": round(eager_ms, 2)}
        if graphs is not None:
            step.poison_outputs()  # the replays must write every output themselves, not inherit the eager run's
            replay_ms = _median_us(lambda: graphs.replay(bucket), model.device, 10) / 1e3
            disagreement = compare_steps(eager, StepSnapshot.of(step, real_rows))
            record.update(replay_ms=round(replay_ms, 2), eager_over_replay=round(eager_ms / replay_ms, 2),
                          tokens_equal=disagreement is None, disagreement=disagreement)
        records.append(record)
    setup.clear()
    head = (f"Static step, attention {attention}: "
            + (f"{stage.data['graphs']} graphs captured in {stage.data['capture_s']} s into one pool of "
               f"{stage.data['pool_mib']} MiB." if graphs is not None else "no CUDA device: graphs not captured."))
    stage.lines = [head, "", "| bucket | real rows | eager static ms | replay ms | eager / replay | tokens equal |",
                   "|---|---|---|---|---|---|"]
    stage.lines += [f"| {r['bucket']} | {r['real_rows']} | {r['eager_static_ms']} | {r.get('replay_ms', '-')} | "
                    f"{r.get('eager_over_replay', '-')} | {r.get('tokens_equal', '-')} |" for r in records]
    if graphs is None:
        stage.note = "no CUDA device: the static step ran eagerly (the dry run proves the code path)"
    elif all(r["tokens_equal"] for r in records):
        stage.note = "every replay gave the eager static step's tokens"
    else:
        stage.note = "REPLAYS DISAGREE: " + "; ".join(r["disagreement"] for r in records if r["disagreement"])


def launches_per_step(run: Callable[[], object], device: torch.device) -> int:
    """What one call of ``run`` launches: GPU operations (kernels, memsets, copies) on CUDA, traced by the
    profiler; on the CPU (no kernels) its top-level torch operations, so the dry run proves the counting."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as profiler:
        run()
        if on_cuda:
            torch.cuda.synchronize(device)
    events = profiler.events()
    if on_cuda:
        count = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        if count == 0:
            raise RuntimeError("the profiler recorded no GPU operation (CUPTI unavailable?)")
        return count
    return sum(1 for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None)


FUSED_COLUMNS = ("| bucket | real rows | launches per step, torch / fused | ms per replay, torch / fused | "
                 "torch / fused | tokens equal | max hidden diff (share of largest) |")


def fused_buckets(model: LoadedModel, dry_run: bool, stage: Stage, buckets: list[Bucket] | None = None) -> None:
    """Per bucket: the static step with the torch layers against the fused kernels (launches, ms, tokens).

    ``buckets``: other than the stage's own (a test under Triton's interpreter runs the fused side on one tiny one).
    """
    device = model.device
    on_cuda = device.type == "cuda"
    fused_ok = fused_kernels_runnable(device)
    setup = static_setup(model, dry_run, buckets)
    repeats = 10 if on_cuda else 1 if fused_ok else 3  # interpreted kernels are slow: one timed call proves the path
    step = setup.step
    variants = {"torch": False, **({"fused": True} if fused_ok else {})}
    graphs: dict[str, StepGraphs] = {}
    if on_cuda:
        capture_s = {}
        for name, fused in variants.items():
            step.fused = fused  # a graph records the way the step ran when it was captured
            graphs[name] = StepGraphs(step, setup.staging, setup.buckets)
            capture_s[name] = round(graphs[name].capture().capture_s, 2)
        stage.data["capture_s"] = capture_s
    generator = torch.Generator().manual_seed(2)
    records = []
    stage.data.update(attention=setup.attention, fused_run=fused_ok, buckets=records,
                      launch_unit="GPU operations (kernels, memsets, copies)" if on_cuda
                      else "top-level torch operations (CPU: no kernels)")
    for bucket in setup.buckets:
        real_rows = load_synthetic_rows(setup, bucket, model.lm.cfg.vocab_size, generator)
        record: dict = {"bucket": str(bucket), "real_rows": len(real_rows), "launches": {}, "ms": {}}
        snapshots = {}
        for name, fused in variants.items():
            step.fused = fused
            record["launches"][name] = launches_per_step(lambda: step.run(bucket), device)
            if name in graphs:
                step.poison_outputs()  # what is compared below must come from the replays
                record["ms"][name] = round(_median_us(lambda: graphs[name].replay(bucket), device, repeats) / 1e3, 3)
            else:
                record["ms"][name] = round(_median_us(lambda: step.run(bucket), device, repeats) / 1e3, 3)
            snapshots[name] = StepSnapshot.of(step, real_rows)
        record["timed"] = "graph replay" if graphs else "eager static step"
        if "fused" in snapshots:
            torch_step, fused_step = snapshots["torch"], snapshots["fused"]
            differing = sum(a != b for a, b in zip(torch_step.tokens, fused_step.tokens))
            scale = float(torch_step.hidden.abs().max()) + 1e-6
            record.update(tokens_equal=differing == 0 and torch_step.finite == fused_step.finite,
                          rows_with_other_tokens=differing,
                          max_hidden_diff_share=float((fused_step.hidden - torch_step.hidden).abs().max()) / scale,
                          torch_over_fused=round(record["ms"]["torch"] / record["ms"]["fused"], 2))
        records.append(record)
    step.fused = False
    setup.clear()

    def pair(values: dict) -> str:
        return " / ".join(str(values.get(name, "-")) for name in ("torch", "fused"))

    head = (f"Static step, attention {setup.attention}, timed as "
            + ("each variant's CUDA graph replayed" if graphs else "the step run eagerly (no CUDA device)")
            + f"; launches: {stage.data['launch_unit']} of one step, traced by torch.profiler.")
    stage.lines = [head, "", FUSED_COLUMNS, "|" + "---|" * (FUSED_COLUMNS.count("|") - 1)]
    for r in records:
        diff = f"{r['max_hidden_diff_share']:.1e}" if "max_hidden_diff_share" in r else "-"
        stage.lines.append(f"| {r['bucket']} | {r['real_rows']} | {pair(r['launches'])} | {pair(r['ms'])} | "
                           f"{r.get('torch_over_fused', '-')} | {r.get('tokens_equal', '-')} | {diff} |")
    if not fused_ok:
        stage.note = ("fused kernels not run: " + ("triton does not import" if on_cuda else "no CUDA device")
                      + "; the torch step was timed and its launches counted (the dry run proves the code path)")
    else:
        equal = all(r["tokens_equal"] for r in records)
        launches = " / ".join(f"{r['launches']['torch']} -> {r['launches']['fused']}" for r in records)
        stage.note = (f"fused kernels: launches per step (torch -> fused, per bucket) {launches}; "
                      + ("tokens equal in every bucket" if equal else
                         "TOKENS DIFFER in " + ", ".join(r["bucket"] for r in records if not r["tokens_equal"])))
