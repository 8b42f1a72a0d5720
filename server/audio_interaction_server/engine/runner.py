"""The one place where a step's tensor work happens: rows in, one token per row out.

``Runner.run(rows)``: encode the rows' audio chunks in one encoder call -> build one
``StepBatch`` -> one LM forward over every row -> choose each row's token. With a static path
(``static_path.py``; the default on CUDA), a batch of short rows instead runs as static steps at fixed
bucket shapes, replayed from CUDA graphs where they were captured, with the same results. Decisions and
greedy reply tokens are chosen on the device and read back, with each row's finiteness, in
the step's one device->host transfer; only rows that sample with a temperature bring their
logits to the host. The runner knows rows, slots and the model; it knows nothing of sessions,
commands or events (``scheduler.py`` does), so benchmarks and the GPU self-check run exactly
the serving step by calling it.

Threading: the worker thread (or one benchmark thread) owns the runner, its model and its cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from audio_interaction_server.options import SamplingOptions
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.prefix_kv import PrefixKVStore
from audio_interaction_server.engine.sampling import DECISION_TOKENS, decide, sample
from audio_interaction_server.engine.static_path import StaticPath, StepCounts
from audio_interaction_server.model.checkpoint import LoadedModel
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.lm import SlotKVCache, StepBatch

# What a client is told when its row's forward failed or gave non-finite values (details: the log).
STEP_FAILED = "the model step failed for this session"
SAMPLING_FAILED = "sampling failed"

GREEDY = SamplingOptions()


@dataclass(frozen=True)
class PlannedRow:
    """One session's row of a step: what to feed (``plan``), where (``slot``) and how to choose its token."""

    session_id: str
    slot: int
    plan: RowPlan
    sampling: SamplingOptions = GREEDY
    generator: torch.Generator | None = None  # the session's own, for reproducible sampling with a seed

    @property
    def is_decision(self) -> bool:
        return self.plan.is_decision

    @property
    def num_tokens(self) -> int:
        return len(self.plan.tokens)


@dataclass(frozen=True)
class RowResult:
    """The model's token for one row, or why this row (and only this row) failed."""

    token: int | None = None
    error: BaseException | None = None
    failed_at: str = ""  # in words for the client, e.g. STEP_FAILED

    @staticmethod
    def failed(error: BaseException, failed_at: str = STEP_FAILED) -> "RowResult":
        return RowResult(None, error, failed_at)


@dataclass(frozen=True)
class BatchResult:
    rows: tuple[RowResult, ...]  # in the order of the rows run
    encode_s: float  # the encoder call
    forward_s: float  # batch to the device, forward, logits and the one device read (synchronised)


class Runner:
    def __init__(self, model: LoadedModel, cache: SlotKVCache, encoder: AudioEncoder,
                 static: StaticPath | None = None, prefix_kv_positions: int = 0) -> None:
        """``static``: the static path short batches take (``StaticPath.build``); None = every batch eager.
        ``prefix_kv_positions``: the prefixes' keys and values kept for new sessions (``prefix_kv.py``); 0 = none."""
        self.model = model
        self.cache = cache
        self.encoder = encoder
        self.static = static
        # How batches ran (graph replays, static steps run eagerly, eager batches): the static path's own count, or
        # this runner's eager batches where there is none.
        self.counts = static.counts if static is not None else StepCounts()
        self.prefixes = PrefixKVStore(cache, prefix_kv_positions) if prefix_kv_positions else None
        self._decision_ids = torch.tensor(DECISION_TOKENS, device=model.device)

    def clear_slot(self, slot: int) -> None:
        """A reused slot starts from zeros (stale NaN at masked positions would still poison attention)."""
        self.cache.clear_slot(slot)

    def prepare_slot(self, slot: int, prefix: Sequence[int]) -> bool:
        """Clear ``slot`` for a new session whose context starts with ``prefix``; True if the prefix's keys and
        values are in it now (kept from an earlier session), so its first row starts after them."""
        self.clear_slot(slot)
        return self.prefixes is not None and self.prefixes.load(slot, tuple(prefix))

    def keep_prefix(self, slot: int, prefix: Sequence[int]) -> None:
        """Feed ``prefix`` alone into ``slot`` and keep its keys and values for the sessions that start with it
        (the worker's start-up, for the trained prompt); the slot is cleared after."""
        prefix = tuple(prefix)
        if self.prefixes is None or prefix in self.prefixes or not self.prefixes.can_keep(prefix):
            return  # no store, kept already, or too long to keep: feeding it would be wasted
        self.last_hidden([PlannedRow("prefix", slot, RowPlan(list(prefix), 0, (), ()))], None)
        self.prefixes.keep(slot, prefix)
        self.clear_slot(slot)

    def _keep_prefixes(self, rows: Sequence[PlannedRow], results: Sequence[RowResult]) -> None:
        """Keep the prefix of every row that fed one from position 0 and ran without error."""
        if self.prefixes is None:
            return
        for row, result in zip(rows, results):
            if row.plan.prefix_tokens and result.error is None:
                self.prefixes.keep(row.slot, tuple(row.plan.tokens[:row.plan.prefix_tokens]))

    def run(self, rows: Sequence[PlannedRow], audio_embeds: torch.Tensor | None = None) -> BatchResult:
        """Run ``rows`` as one batch. Raises if the batch as a whole failed (the caller may retry rows alone);
        a row whose logits are not finite, or whose sampling raised, fails alone in its ``RowResult``.

        ``audio_embeds``: the rows' audio already encoded, (chunks x 10, E) in row order; by default the
        rows' mel chunks are encoded here (the reference-style baseline encodes whole histories itself).
        """
        started = time.perf_counter()
        if audio_embeds is None and self.static is not None and self.static.accepts(rows):
            # Encoder, LM and heads in one static step per bucket (a graph replay on CUDA): no separate encode time.
            static_chosen = self.static.run(rows, [not row.sampling.is_greedy for row in rows])
            forwarded = time.perf_counter()
            # No prefix to keep: a row that feeds one (prefix + block, a rollover) is too long for a static step.
            results = tuple(self._host_choice(row, *choice) for row, choice in zip(rows, static_chosen))
            return BatchResult(results, 0.0, forwarded - started)
        if audio_embeds is None:
            if self.static is None:  # (the static path counted the batches it left to the eager path)
                self.counts.eager_batches += 1
            audio_embeds = self.encode(rows)
        encoded = time.perf_counter()
        hidden = self.last_hidden(rows, audio_embeds)
        chosen = self._choose_on_device(rows, hidden)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        forwarded = time.perf_counter()
        results = tuple(self._host_choice(row, *choice) for row, choice in zip(rows, chosen))
        self._keep_prefixes(rows, results)
        return BatchResult(results, encoded - started, forwarded - encoded)

    def encode(self, rows: Sequence[PlannedRow]) -> torch.Tensor | None:
        """Every chunk of every row in one encoder call: (N x 10, E), rows in the order of the batch's audio mask."""
        chunks = [chunk for row in rows for chunk in row.plan.audio]
        if not chunks:
            return None
        return self.encoder.encode(torch.stack(chunks)).flatten(0, 1)

    def last_hidden(self, rows: Sequence[PlannedRow], audio_embeds: torch.Tensor | None) -> torch.Tensor:
        """Feed every row into its slot in one forward; the final hidden state at each row's last token, (B, E)."""
        batch = StepBatch.build(
            rows=[row.plan.tokens for row in rows],
            start_positions=[row.plan.start_position for row in rows],
            slots=[row.slot for row in rows],
            audio_spans=[row.plan.audio_spans for row in rows],
            audio_embeds=audio_embeds,
            device=self.model.device,
        )
        return self.model.lm.last_hidden(batch, self.cache)

    def _choose_on_device(self, rows: Sequence[PlannedRow],
                          hidden: torch.Tensor) -> list[tuple[int, bool, torch.Tensor | None]]:
        """Per row: the device's token, whether its logits are finite, and its logits if it samples on the host.

        Listening rows need only the two decision logits; reply rows need the whole vocabulary.
        Everything the host needs comes back in one transfer: the step's one device->host sync.
        """
        lm = self.model.lm
        decision_index = [i for i, row in enumerate(rows) if row.is_decision]
        reply_index = [i for i, row in enumerate(rows) if not row.is_decision]
        host_logits: list[torch.Tensor | None] = [None] * len(rows)
        on_device: list[torch.Tensor] = []
        if decision_index:
            logits = lm.logits(hidden[decision_index], self._decision_ids)  # (n, 2) fp32
            on_device += [decide(logits), torch.isfinite(logits).all(dim=-1)]
        if reply_index:
            logits = lm.logits(hidden[reply_index])  # (m, V) fp32
            on_device += [logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1)]
            for j, i in enumerate(reply_index):
                if not rows[i].sampling.is_greedy:
                    host_logits[i] = logits[j]
        values = torch.cat([t.to(torch.long) for t in on_device]).tolist()  # the one device->host sync
        chosen: list[tuple[int, bool, torch.Tensor | None]] = [(0, False, None)] * len(rows)
        offset = 0
        for index in (decision_index, reply_index):
            n = len(index)
            tokens, finite = values[offset:offset + n], values[offset + n:offset + 2 * n]
            offset += 2 * n
            for i, token, is_finite in zip(index, tokens, finite):
                chosen[i] = (token, bool(is_finite), host_logits[i])
        return chosen

    @staticmethod
    def _host_choice(row: PlannedRow, token: int, is_finite: bool, logits: torch.Tensor | None) -> RowResult:
        if not is_finite:
            return RowResult.failed(FloatingPointError("non-finite logits"))
        if logits is None:
            return RowResult(token)
        try:  # this row's sampling failing (hostile options that slipped through) ends this row only
            return RowResult(sample(logits, row.sampling, row.generator))
        except Exception as exc:
            return RowResult.failed(exc, SAMPLING_FAILED)
