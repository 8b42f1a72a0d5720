"""Fitting the engine to its device: KV-cache sizing and the choice of attention path.

Both are decided once, at worker start-up, from what the device really has and
really does: the KV cache is sized against the memory left after the weights
are loaded, and in-place (FlexAttention) attention is only used after it has
been compiled and checked against the gather path on this device.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from audio_interaction_server.model.lm import (
    FLEX_BLOCK, AttentionBackend, AudioInteractionLM, SlotKVCache, StepBatch, flex_batch_bucket,
)

log = logging.getLogger(__name__)


# PyPI's torch 2.13.0 for Linux x86_64 is built for CUDA 13, whose kernels start at Turing (sm_75):
# V100 (7.0), P100 (6.0) and GTX 10xx (6.1) load the weights, then fail at the first kernel.
CUDA13_MIN_CAPABILITY = (7, 5)


class UnsupportedGPU(RuntimeError):
    """The GPU is older than anything this torch build has kernels for."""


def min_supported_capability() -> tuple[int, int]:
    """The oldest compute capability this torch build ships kernels for (``sm_XY`` in its arch list)."""
    built_for = [arch.removeprefix("sm_") for arch in torch.cuda.get_arch_list() if arch.startswith("sm_")]
    capabilities = [(int(a[:-1]), int(a[-1])) for a in built_for if a.isdigit() and len(a) >= 2]
    return min(capabilities) if capabilities else CUDA13_MIN_CAPABILITY


def check_gpu_supported(device: torch.device) -> None:
    """Refuse, before anything loads, a GPU that this torch build cannot run kernels on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(index))
    needed = min_supported_capability()
    if capability < needed:
        raise UnsupportedGPU(
            f"GPU {index} ({torch.cuda.get_device_name(index)}) has compute capability "
            f"{capability[0]}.{capability[1]}; this torch build ({torch.__version__}) needs {needed[0]}.{needed[1]} "
            "or newer (the CUDA 13 builds: Turing/T4 and later, no V100, P100 or GTX 10xx). Run on the CPU "
            "with device cpu (engine.device / AIS_ENGINE__DEVICE / --device), or use a GPU of compute "
            f"capability {needed[0]}.{needed[1]} or newer"
        )


class KVCacheTooLarge(RuntimeError):
    """The configured sessions x positions do not fit the accelerator's free memory."""


def kv_bytes_per_slot(lm: AudioInteractionLM, max_positions: int) -> int:
    """K and V for one session of ``max_positions`` tokens, every layer, in the model's dtype."""
    return SlotKVCache.bytes_per_slot(lm.cfg, max_positions, lm.lm_head.weight.dtype)


def sessions_that_fit(lm: AudioInteractionLM, max_positions: int, memory_fraction: float) -> int | None:
    """Slots the accelerator's free memory holds (None on CPU, where the host's memory is not probed)."""
    device = lm.lm_head.weight.device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * memory_fraction) // kv_bytes_per_slot(lm, max_positions)


def check_kv_fits(lm: AudioInteractionLM, num_slots: int, max_positions: int, memory_fraction: float) -> None:
    fit = sessions_that_fit(lm, max_positions, memory_fraction)
    if fit is None:
        return
    per_slot = kv_bytes_per_slot(lm, max_positions)
    log.info("KV cache: %d slots x %.1f MiB = %.2f GiB (room for %d slots in %.0f%% of free memory)",
             num_slots, per_slot / 2**20, num_slots * per_slot / 2**30, fit, 100 * memory_fraction)
    if num_slots > fit:
        raise KVCacheTooLarge(
            f"engine.max_sessions {num_slots} needs {num_slots * per_slot / 2**30:.1f} GiB of KV cache at "
            f"{max_positions} positions, but {100 * memory_fraction:.0f}% of the free accelerator memory holds "
            f"{fit} sessions; set engine.max_sessions <= {fit} (or lower engine.max_positions)"
        )


@dataclass(frozen=True)
class AttentionChoice:
    backend: AttentionBackend
    compiled: bool
    reason: str


def choose_attention(requested: str, lm: AudioInteractionLM, cache: SlotKVCache, max_rows: int,
                     long_rows_only: bool = False) -> AttentionChoice:
    """Apply the configured attention path to ``lm``; ``auto`` tries flex on CUDA and keeps it only if it checks out.

    ``long_rows_only``: another path (the static step) serves every short row, so this one runs only rows longer
    than flex's query bound (``FLEX_QUERY_ROWS``), which take gather anyway: ``auto`` is then gather at once,
    without compiling and timing flex for every batch bucket.
    """
    on_cuda = cache.k.device.type == "cuda"
    if requested == "auto" and long_rows_only:
        choice = AttentionChoice("gather", False, "the static step serves every short row; long rows use gather")
    elif requested == "gather" or (requested == "auto" and not on_cuda):
        choice = AttentionChoice("gather", False, "configured" if requested == "gather" else "CPU device")
    elif cache.max_positions % FLEX_BLOCK:
        if requested == "flex":
            raise ValueError(f"attention 'flex' needs max_positions divisible by {FLEX_BLOCK}")
        choice = AttentionChoice("gather", False, f"max_positions is not a multiple of {FLEX_BLOCK}")
    else:
        # Compiled on every device: eager FlexAttention materialises scores over the whole cache.
        try:
            worst = self_check_flex(lm, cache, max_rows)
            checked = f"self-check passed (max |diff| {worst:.2e} against gather)"
            choice = AttentionChoice("flex", True, checked)
            if requested == "auto":
                choice = _faster_of_flex_and_gather(lm, cache, max_rows, checked)
        except Exception as exc:
            if requested == "flex":
                raise
            log.warning("in-place attention unavailable on this device (%r); using gather", exc)
            choice = AttentionChoice("gather", False, f"flex self-check failed: {exc!r}")
    lm.attention_backend, lm.compile_attention = choice.backend, choice.compiled
    log.info("attention: %s (compiled=%s): %s", choice.backend, choice.compiled, choice.reason)
    return choice


def self_check_flex(lm: AudioInteractionLM, cache: SlotKVCache, max_rows: int) -> float:
    """Compile flex for every batch bucket up to ``max_rows`` and check it against gather; return the worst diff.

    Uses the real cache's slots as scratch (they are cleared afterwards, and
    every session clears its slot when it opens anyway).
    """
    device = cache.k.device
    generator = torch.Generator().manual_seed(0)
    history = 150  # crosses a 128-position block, so full and partial blocks are both exercised
    slots = list(range(min(cache.num_slots, 2)))
    worst = 0.0
    started = time.perf_counter()
    try:
        for slot in slots:
            tokens = torch.randint(0, lm.cfg.vocab_size, (history,), generator=generator).tolist()
            lm.attention_backend = "gather"
            lm.last_hidden(StepBatch.build([tokens], [0], [slot], [[]], None, device), cache)
        step = [torch.randint(0, lm.cfg.vocab_size, (13,), generator=generator).tolist() for _ in slots]
        batch = StepBatch.build(step, [history] * len(slots), slots, [[] for _ in slots], None, device)
        lm.attention_backend = "gather"
        expected = lm.last_hidden(batch, cache).float()
        lm.attention_backend, lm.compile_attention = "flex", True
        got = lm.last_hidden(batch, cache).float()
        worst = float((got - expected).abs().max())
        scale = float(expected.abs().max()) + 1e-6
        if not torch.isfinite(got).all() or worst > 0.05 * scale:
            raise RuntimeError(f"flex attention differs from gather by {worst:.3g} (scale {scale:.3g})")
        # Compile every padded batch size the worker can produce now, not in the middle of serving.
        rows, bucket = max(1, max_rows), 8
        while True:
            count = min(bucket, rows)
            warm_slots = [i % cache.num_slots for i in range(count)]
            warm = StepBatch.build([[0]] * count, [0] * count, warm_slots, [[] for _ in range(count)], None, device)
            lm.last_hidden(warm, cache)
            if flex_batch_bucket(count) >= flex_batch_bucket(rows):
                break
            bucket *= 2
    finally:
        for slot in range(min(cache.num_slots, max(max_rows, len(slots)))):
            cache.clear_slot(slot)
    log.info("flex attention compiled and checked in %.1f s", time.perf_counter() - started)
    return worst


# A listening block: the shape most steps are made of.
TIMED_ROW_TOKENS = 13


def median_wall_ms(fn: Callable[[], object], device: torch.device | None = None, repeats: int = 3,
                   warmups: int = 1) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmups`` untimed ones; on CUDA the device
    is synchronised before and after each call, so the time is the work's, not its launch's. The one step timer
    of the package, the start-up attention choice and the benchmarks alike."""

    def synchronise() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmups):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        synchronise()
        started = time.perf_counter()
        fn()
        synchronise()
        samples.append(1e3 * (time.perf_counter() - started))
    return statistics.median(samples)


def step_ms(lm: AudioInteractionLM, cache: SlotKVCache, num_rows: int, backend: AttentionBackend, compiled: bool,
            repeats: int = 3) -> float:
    """Median wall time of one forward of ``num_rows`` listening rows halfway into the cache, device synchronised.

    Uses the cache's first slots as scratch (their keys are whatever is there:
    timing does not depend on the values) and clears them afterwards.
    """
    device = cache.k.device
    num_rows = max(1, min(num_rows, cache.num_slots))
    start = max(0, cache.max_positions // 2 - TIMED_ROW_TOKENS)
    rows = [[(7 * i + j) % lm.cfg.vocab_size for j in range(TIMED_ROW_TOKENS)] for i in range(num_rows)]
    batch = StepBatch.build(rows, [start] * num_rows, list(range(num_rows)), [[] for _ in rows], None, device)
    saved = lm.attention_backend, lm.compile_attention
    lm.attention_backend, lm.compile_attention = backend, compiled
    try:
        return median_wall_ms(lambda: lm.last_hidden(batch, cache), device, repeats)
    finally:
        lm.attention_backend, lm.compile_attention = saved
        for slot in range(num_rows):
            cache.clear_slot(slot)


def _faster_of_flex_and_gather(lm: AudioInteractionLM, cache: SlotKVCache, max_rows: int,
                               checked: str) -> AttentionChoice:
    """``auto`` keeps in-place attention only where it is measured faster than gather on this device.

    On an H200 with torch 2.11, the compiled FlexAttention kernel took 2.5 ms per layer
    for 128 listening rows and a whole step was slower than gather's (122 ms against
    48 ms, benchmarks/step_profile.py), so a correct kernel is not enough: it has to win.
    """
    flex_ms = step_ms(lm, cache, max_rows, "flex", True)
    gather_ms = step_ms(lm, cache, max_rows, "gather", False)
    timing = f"{max_rows} listening rows at position {cache.max_positions // 2}: flex {flex_ms:.1f} ms, " \
             f"gather {gather_ms:.1f} ms"
    if flex_ms <= gather_ms:
        return AttentionChoice("flex", True, f"{checked}; faster ({timing})")
    return AttentionChoice("gather", False, f"{checked}, but slower ({timing})")
