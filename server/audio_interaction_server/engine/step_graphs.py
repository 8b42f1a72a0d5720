"""CUDA graphs of the static step, one per bucket, and the start-up self-check that decides whether to serve them.

``StepGraphs.capture()`` records ``StaticStep.run(bucket)`` for every bucket, largest first, into
one shared memory pool, after two warm-up runs each (so Triton kernels are compiled and cuBLAS has
its handles) and with every row padding, so capturing touches only the cache's scratch slot. It
must run after the weights, the cache and the RoPE table are final: a graph replays fixed
addresses. ``replay(bucket)`` then runs a whole step as one launch.

``self_check`` replays a few buckets on synthetic rows against the same static step run eagerly
and returns what disagreed; ``compare_steps`` (pure, unit-tested on CPU) is the judgement. On a
machine without CUDA nothing here is constructed: the static step runs eagerly.

Threading: the worker thread only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.packing import SlotRow, StepStaging
from audio_interaction_server.model.static_step import ROW_TOKENS, Bucket, StaticStep
from audio_interaction_server.model.encoder import NUM_MEL_BINS
from audio_interaction_server.spec import MEL_FRAMES_PER_CHUNK

log = logging.getLogger(__name__)

# A replay's hidden states may differ from the eager static step's by this share of their largest value
# (the same kernels should give the same bits; this only absorbs a library that picks another algorithm).
HIDDEN_TOLERANCE = 1e-3


@dataclass(frozen=True)
class StepSnapshot:
    """What a step gave its real rows: host copies, so a later step cannot change them."""

    tokens: tuple[int, ...]
    finite: tuple[bool, ...]
    hidden: torch.Tensor  # (rows, E) fp32 on the CPU

    @staticmethod
    def of(step: StaticStep, rows: list[int]) -> StepSnapshot:
        """The outputs of the step's rows ``rows`` (indices into its outputs)."""
        index = torch.tensor(rows, dtype=torch.long, device=step.outputs.device)
        outputs = step.outputs[index].cpu()
        return StepSnapshot(tuple(int(t) for t in outputs[:, 0]), tuple(bool(f) for f in outputs[:, 1]),
                            step.hidden[index].float().cpu())


def compare_steps(expected: StepSnapshot, got: StepSnapshot, tolerance: float = HIDDEN_TOLERANCE) -> str | None:
    """Why ``got`` (a graph replay) disagrees with ``expected`` (the eager static step), or None if it agrees.

    Every row must have the same finiteness and the same token, and the hidden states must agree within
    ``tolerance`` x the largest expected value; non-finite hidden states where the eager step had finite
    ones disagree too.
    """
    if len(expected.tokens) != len(got.tokens) or expected.hidden.shape != got.hidden.shape:
        return f"row counts differ: {len(expected.tokens)} expected, {len(got.tokens)} replayed"
    for row, (want, have) in enumerate(zip(expected.finite, got.finite)):
        if want != have:
            return f"row {row}: finite {want} expected, {have} replayed"
    for row, (want_token, got_token) in enumerate(zip(expected.tokens, got.tokens)):
        if want_token != got_token:
            return f"row {row}: token {want_token} expected, {got_token} replayed"
    finite_rows = torch.isfinite(expected.hidden).all(dim=-1)
    if not bool(torch.isfinite(got.hidden[finite_rows]).all()):
        return "non-finite hidden states where the eager step's are finite"
    if not bool(finite_rows.any()):
        return None
    scale = float(expected.hidden[finite_rows].abs().max()) + 1e-6
    worst = float((got.hidden[finite_rows] - expected.hidden[finite_rows]).abs().max())
    if worst > tolerance * scale:
        return f"hidden states differ by {worst:.3g} (tolerance {tolerance * scale:.3g})"
    return None


def synthetic_rows(bucket: Bucket, num_slots: int, max_positions: int, vocab_size: int,
                   generator: torch.Generator) -> tuple[list[SlotRow], list[SlotRow]]:
    """Rows that fill part of ``bucket`` (so padding is exercised) in distinct slots, at random positions.

    Listening rows are real listening blocks ([lead, AUDIO_BEGIN, PAD x10, ASSISTANT]) with random mel;
    reply rows are one random token.
    """
    num_listening = min(bucket.listening, max(1, bucket.listening - 3)) if bucket.listening else 0
    num_reply = min(bucket.reply, max(1, bucket.reply - 2)) if bucket.reply else 0
    if num_listening + num_reply > num_slots:
        num_listening = min(num_listening, num_slots)
        num_reply = min(num_reply, num_slots - num_listening)

    def start(length: int) -> int:
        return int(torch.randint(0, max_positions - length + 1, (1,), generator=generator))

    listening, reply = [], []
    for slot in range(num_listening):
        lead = int(torch.randint(0, vocab_size, (1,), generator=generator))
        tokens = [lead, *T.listening_block()]
        mel = torch.randn(NUM_MEL_BINS, MEL_FRAMES_PER_CHUNK, generator=generator)
        plan = RowPlan(tokens, start(len(tokens)), ((2, 2 + T.AUDIO_FRAMES_PER_CHUNK),), (mel,))
        listening.append(SlotRow(slot, plan))
    for k in range(num_reply):
        token = int(torch.randint(0, vocab_size, (1,), generator=generator))
        reply.append(SlotRow(num_listening + k, RowPlan([token], start(1), (), ())))
    assert all(len(row.plan.tokens) <= ROW_TOKENS for row in listening)
    return listening, reply


def load_padding_step(step: StaticStep, staging: StepStaging, bucket: Bucket) -> None:
    """Load inputs for a step at ``bucket`` whose every row is padding: what capture warms up and records on.
    Packed for this bucket, never reused from another: a row's fields index this bucket's tokens (inputs packed
    for a larger bucket point a smaller one's reply rows past its last token)."""
    staging.pack(bucket, [], [])
    step.load(staging.bytes, bucket)


class GraphCaptureError(RuntimeError):
    """A bucket's graph could not be recorded or replayed, though the same step had just run eagerly: the static
    step can still serve without graphs. (An error of the eager step itself is not one: it would fail serving too.)"""


@dataclass
class CaptureStats:
    num_graphs: int = 0
    capture_s: float = 0.0
    pool_bytes: int = 0


class StepGraphs:
    """One CUDA graph of ``step.run(bucket)`` per bucket, sharing one memory pool."""

    def __init__(self, step: StaticStep, staging: StepStaging, buckets: list[Bucket]) -> None:
        if step.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.step = step
        self.staging = staging
        self.buckets = sorted(buckets, key=lambda b: (b.num_tokens, b.num_rows), reverse=True)
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self.stats = CaptureStats()

    def capture(self) -> CaptureStats:
        step = self.step
        started = time.perf_counter()
        torch.cuda.synchronize(step.device)
        reserved_before = torch.cuda.memory_reserved(step.device)
        pool = None
        side = torch.cuda.Stream(step.device)
        for bucket in self.buckets:
            # Every row padding: warm-ups and capture write only to the scratch slot.
            load_padding_step(step, self.staging, bucket)
            side.wait_stream(torch.cuda.current_stream(step.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step.run(bucket)
            torch.cuda.current_stream(step.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.current_stream(step.device)
            try:
                with torch.cuda.graph(graph, pool=pool):
                    step.run(bucket)
            except Exception as exc:
                # The warm-ups above ran this step eagerly: what failed is the capture. torch.cuda.graph's __exit__
                # does not restore the current stream when capture_end raises (an invalidated capture), so the
                # eager fallback would otherwise run on the capture stream.
                torch.cuda.set_stream(stream)
                first = exc.__context__  # what invalidated the capture, when capture_end's error replaced it
                raise GraphCaptureError(f"bucket {bucket}: {exc!r}" + (f", after {first!r}" if first else "")) from exc
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        torch.cuda.synchronize(step.device)
        self.stats = CaptureStats(len(self.graphs), time.perf_counter() - started,
                                  torch.cuda.memory_reserved(step.device) - reserved_before)
        log.info("CUDA graphs: %d buckets captured in %.1f s, %.1f MiB of pool", self.stats.num_graphs,
                 self.stats.capture_s, self.stats.pool_bytes / 2**20)
        return self.stats

    def replay(self, bucket: Bucket) -> bool:
        """Replay the bucket's graph on the inputs already loaded; False if it has none."""
        graph = self.graphs.get(bucket)
        if graph is None:
            return False
        graph.replay()
        return True

    def buckets_to_check(self, max_buckets: int = 4) -> list[Bucket]:
        """At most ``max_buckets``: the largest bucket, the largest of listening rows alone and of reply rows alone
        (their captures take branches of their own: no reply part, no listening part), the smallest, then some
        between. Largest first."""
        ordered = self.buckets  # largest first
        alone = [next((b for b in ordered if b.reply == 0), None), next((b for b in ordered if b.listening == 0), None)]
        between = ordered[:: max(1, len(ordered) // max(1, max_buckets - 2))]
        wanted = [ordered[0], *(b for b in alone if b is not None), ordered[-1], *between]
        return sorted(list(dict.fromkeys(wanted))[:max_buckets], key=ordered.index)

    def self_check(self, num_slots: int, max_positions: int, vocab_size: int,
                   max_buckets: int = 4) -> list[str]:
        """Replay a few buckets (``buckets_to_check``) against the eager static step.

        Uses session slots 0 .. as scratch; the caller clears them (no session is open at start-up).
        Returns one line per bucket that disagreed; empty when every checked one agreed.
        """
        generator = torch.Generator().manual_seed(0)
        problems = []
        for bucket in self.buckets_to_check(max_buckets):
            listening, reply = synthetic_rows(bucket, num_slots, max_positions, vocab_size, generator)
            real_rows = list(range(len(listening))) + [bucket.listening + k for k in range(len(reply))]
            self.staging.pack(bucket, listening, reply)
            self.step.load(self.staging.bytes, bucket)
            self.step.run(bucket)
            expected = StepSnapshot.of(self.step, real_rows)
            self.step.poison_outputs()  # else a replay that writes nothing would pass on the eager run's outputs
            try:
                self.replay(bucket)
            except Exception as exc:
                raise GraphCaptureError(f"bucket {bucket}: replay failed: {exc!r}") from exc
            got = StepSnapshot.of(self.step, real_rows)
            reason = compare_steps(expected, got)
            if reason is not None:
                problems.append(f"bucket {bucket}: {reason}")
        return problems
