"""The runner's static path: rows -> buckets -> packed inputs -> one static step (a graph replay on CUDA) each.

``choose_step`` turns the configuration into a ``StepChoice`` (static or eager, graphs or not,
which attention); ``StaticPath.build`` makes the path for a choice. ``StaticPath.run(rows)``
takes a batch whose rows all fit a static step (``fits_static_step``: listening blocks of at most
``ROW_TOKENS`` tokens with their chunk, one-token reply rows), cuts it into buckets
(``BucketSet.split``), and for each: packs a staging buffer, copies it to the device in one
transfer, runs the step (its graph if one was captured, else the same step eagerly) and reads
the outputs back in one transfer. Two staging buffers take turns: while one step runs on the
device, the next bucket's inputs are packed into the other, so the host's packing overlaps the
device's work (on the CPU everything is synchronous and the order alone differs). Rows that
sample with a temperature read their logits after that, like the eager path. Everything else
(first rows, rollovers) stays on the eager path.

Threading: the worker thread only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.buckets import BucketSet, max_reply_rows
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.events import GraphsState, StepPath
from audio_interaction_server.engine.packing import SlotRow, StepStaging, fits_static_step
from audio_interaction_server.engine.sampling import DECISION_TOKENS
from audio_interaction_server.engine.step_graphs import CaptureStats, GraphCaptureError, StepGraphs
from audio_interaction_server.model.checkpoint import LoadedModel
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.fit import AttentionChoice, choose_attention
from audio_interaction_server.model.lm import SlotKVCache
from audio_interaction_server.model.slot_attention import triton_available
from audio_interaction_server.model.static_step import Bucket, StaticAttention, StaticStep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepChoice:
    """How the runner steps short rows, decided once at start-up from the config and the device."""

    static: bool
    graphs: bool
    attention: StaticAttention
    reason: str
    fused: bool = False  # the fused Triton kernels of model/fused_kernels.py (engine.fused_kernels)


def choose_step(config: EngineConfig, device: torch.device) -> StepChoice:
    """``engine.step`` / ``cuda_graphs`` / ``static_attention`` applied to ``device``."""
    on_cuda = device.type == "cuda"
    static = config.step == "static" or (config.step == "auto" and on_cuda)
    if not static:
        return StepChoice(False, False, "gather", "configured" if config.step == "eager" else "CPU device")
    graphs = on_cuda and config.cuda_graphs == "auto"
    attention: StaticAttention
    if config.static_attention == "auto":
        attention = "triton" if on_cuda and triton_available() else "gather"
    else:
        attention = config.static_attention
    if attention == "triton" and not on_cuda:
        raise ValueError("engine.static_attention triton needs a CUDA device (gather is the CPU path)")
    if attention == "triton" and not triton_available():
        raise ValueError("engine.static_attention triton: triton does not import here (install the gpu extra)")
    where = "CUDA" if on_cuda else "configured"
    fused = on_cuda and config.fused_kernels == "auto" and triton_available()
    return StepChoice(True, graphs, attention, f"static step ({where}), attention {attention}, "
                      f"CUDA graphs {'on' if graphs else 'off'}, fused kernels {'on' if fused else 'off'}", fused)


def choose_eager_attention(requested: str, choice: StepChoice, model: LoadedModel, cache: SlotKVCache,
                           max_rows: int) -> AttentionChoice:
    """The eager path's attention (``engine.attention``), given how short rows are stepped.

    With the static step, the eager path runs only long rows (first rows, rollovers), so ``auto`` takes gather
    at once instead of compiling and timing FlexAttention at start-up (about 39 s per worker start on the H200
    of 2026-12-04, whose ramp then chose gather as the faster one). ``flex`` still compiles.
    """
    return choose_attention(requested, model.lm, cache, max_rows, long_rows_only=choice.static)


class HasSlotAndPlan(Protocol):
    @property
    def slot(self) -> int: ...

    @property
    def plan(self) -> RowPlan: ...


@dataclass
class StepCounts:
    """How short batches ran: steps replayed from a graph, static steps run eagerly, batches left to eager."""

    graph_steps: int = 0
    static_eager_steps: int = 0
    eager_batches: int = 0


class StaticPath:
    def __init__(self, step: StaticStep, buckets: BucketSet, graphs: bool, num_staging: int = 2) -> None:
        """``num_staging``: 2 packs the next bucket while a step runs; 1 packs each after the previous one's read."""
        if num_staging not in (1, 2):
            raise ValueError(f"num_staging must be 1 or 2, got {num_staging}")
        self.step = step
        self.buckets = buckets
        cache = step.cache
        on_cuda = step.device.type == "cuda"
        assert cache.scratch_slot is not None  # StaticStep checked it
        self.stagings = [StepStaging(step.layout, cache.scratch_slot, cache.max_positions, pin_memory=on_cuda)
                         for _ in range(num_staging)]
        self.staging = self.stagings[0]  # what graph capture and the self-check pack into
        self._host_outputs = torch.zeros(step.outputs.shape, dtype=torch.int64, pin_memory=on_cuda)
        self._read_done = torch.cuda.Event() if on_cuda else None
        self.counts = StepCounts()
        self.graphs: StepGraphs | None = None
        self.capture = CaptureStats()
        self.capture_error: str | None = None  # why capturing failed (the static step then runs eagerly)
        if graphs:
            self._capture_and_check()

    @staticmethod
    def build(choice: StepChoice, model: LoadedModel, cache: SlotKVCache, encoder: AudioEncoder,
              max_rows: int) -> StaticPath | None:
        if not choice.static:
            return None
        buckets = BucketSet.for_rows(max_rows, max_reply_rows(max_rows))
        step = StaticStep(model.lm, encoder, cache, buckets.largest, DECISION_TOKENS, choice.attention,
                          fused=choice.fused)
        log.info("%s; buckets: listening %s x reply %s", choice.reason, buckets.listening, buckets.reply)
        return StaticPath(step, buckets, choice.graphs)

    def _capture_and_check(self) -> None:
        step = self.step
        try:
            graphs = StepGraphs(step, self.staging, self.buckets.all())
            self.capture = graphs.capture()
            cfg = step.lm.cfg
            problems = graphs.self_check(step.cache.num_slots, step.cache.max_positions, cfg.vocab_size)
        except GraphCaptureError as exc:  # a step that cannot be captured still runs eagerly: the eager fallback.
            # Anything else (the eager step's own warm-up or check run failing) would fail serving as well: it
            # stops the start-up, as before the fallback existed.
            self.capture_error = repr(exc)
            log.exception("CUDA graph capture FAILED; serving the static step without graphs")
            return
        finally:
            for slot in range(step.cache.num_slots):
                step.cache.clear_slot(slot)
        if problems:
            log.error("CUDA graphs REFUSED: replays disagree with the eager static step (%s); serving the static "
                      "step without graphs", "; ".join(problems))
            return
        self.graphs = graphs

    def describe(self) -> StepPath:
        """Whether graphs serve this path, and what capturing them cost."""
        capture = self.capture
        graphs: GraphsState = ("on" if self.graphs is not None else "failed" if self.capture_error is not None
                               else "refused" if capture.num_graphs else "off")
        return StepPath(True, graphs, capture.num_graphs, capture.capture_s, capture.pool_bytes, self.capture_error)

    def accepts(self, rows: Sequence[HasSlotAndPlan]) -> bool:
        ok = bool(rows) and all(fits_static_step(row.plan) for row in rows)
        if not ok:
            self.counts.eager_batches += 1
        return ok

    def run(self, rows: Sequence[HasSlotAndPlan], logits_for: Sequence[bool]) -> list[tuple[int, bool,
                                                                                         torch.Tensor | None]]:
        """Per row: its token, whether its logits were finite, and (where ``logits_for``) its reply logits."""
        listening = [i for i, row in enumerate(rows) if row.plan.is_decision]
        reply = [i for i, row in enumerate(rows) if not row.plan.is_decision]
        chosen: list[tuple[int, bool, torch.Tensor | None]] = [(0, False, None)] * len(rows)
        steps: list[tuple[Bucket, list[int], list[int]]] = []
        taken_listening = taken_reply = 0
        for bucket, num_listening, num_reply in self.buckets.split(len(listening), len(reply)):
            steps.append((bucket, listening[taken_listening: taken_listening + num_listening],
                          reply[taken_reply: taken_reply + num_reply]))
            taken_listening, taken_reply = taken_listening + num_listening, taken_reply + num_reply

        def pack(k: int) -> StepStaging:
            bucket, step_listening, step_reply = steps[k]
            staging = self.stagings[k % len(self.stagings)]
            staging.pack(bucket, [SlotRow(rows[i].slot, rows[i].plan) for i in step_listening],
                         [SlotRow(rows[i].slot, rows[i].plan) for i in step_reply])
            return staging

        staging = pack(0) if steps else None
        for k, (bucket, step_listening, step_reply) in enumerate(steps):
            assert staging is not None
            self.step.load(staging.bytes, bucket)
            if self.graphs is not None and self.graphs.replay(bucket):
                self.counts.graph_steps += 1
            else:
                self.step.run(bucket)
                self.counts.static_eager_steps += 1
            is_last = k + 1 == len(steps)
            # The other buffer's copy finished before the previous step's read, so it can be packed while this
            # step runs; with one buffer the copy may still be reading it until this step's read.
            if not is_last and len(self.stagings) > 1:
                staging = pack(k + 1)
            values = self._read(bucket.num_rows)
            if not is_last and len(self.stagings) == 1:
                staging = pack(k + 1)
            for j, i in enumerate(step_listening):
                chosen[i] = (values[j][0], bool(values[j][1]), None)
            for j, i in enumerate(step_reply):
                row_values = values[bucket.listening + j]
                logits = self.step.reply_logits[j].clone() if logits_for[i] else None
                chosen[i] = (row_values[0], bool(row_values[1]), logits)
        return chosen

    def _read(self, num_rows: int) -> list[list[int]]:
        """The step's one device->host transfer: tokens and finiteness of every row of the bucket."""
        host = self._host_outputs[:num_rows]
        host.copy_(self.step.outputs[:num_rows], non_blocking=self._read_done is not None)
        if self._read_done is not None:
            self._read_done.record()
            self._read_done.synchronize()
        return host.tolist()
