"""Host side of a static step: rows -> one staging buffer in the step's layout, copied to the device at once.

``StepStaging.pack(bucket, listening, reply)`` fills the staging buffer (pinned on CUDA, so the
copy is asynchronous) with everything ``model.static_step.StaticStep`` reads: token ids, positions,
cache slots, which embeddings are audio, the rows' spans and the listening rows' mel chunks. The
work is a few numpy operations per field over per-row arrays (one concatenation of the rows'
token lists, broadcasts over a (rows, ROW_TOKENS) grid); nothing loops over tokens in Python.

Which rows a static step can take at all is ``fits_static_step``: a listening row of at most
``ROW_TOKENS`` tokens with exactly one audio chunk of ``AUDIO_FRAMES_PER_CHUNK`` PAD columns, or a
reply row of one token. Anything else (first rows, rollovers) runs on the eager path.

Threading: the worker thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.model.static_step import ROW_TOKENS, Bucket, StepInputs, StepLayout
from audio_interaction_server.spec import AUDIO_FRAMES_PER_CHUNK


def fits_static_step(plan: RowPlan) -> bool:
    """Whether a static step can run this row (else it takes the eager path)."""
    if plan.is_decision:
        if len(plan.tokens) > ROW_TOKENS or len(plan.audio) != 1 or len(plan.audio_spans) != 1:
            return False
        lo, hi = plan.audio_spans[0]
        return hi - lo == AUDIO_FRAMES_PER_CHUNK and 0 <= lo and hi <= len(plan.tokens)
    return len(plan.tokens) == 1 and not plan.audio_spans


@dataclass(frozen=True)
class SlotRow:
    """A row as packing sees it: the slot it runs in and what it feeds."""

    slot: int
    plan: RowPlan


class StepStaging:
    """One host buffer in ``layout``, with numpy views of its fields (the torch views share its memory)."""

    def __init__(self, layout: StepLayout, scratch_slot: int, max_positions: int, pin_memory: bool) -> None:
        self.layout = layout
        self.scratch_slot = scratch_slot
        self.max_positions = max_positions
        self.bytes = torch.zeros(layout.num_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.tensors: StepInputs = layout.views(self.bytes)
        t = self.tensors
        self.token, self.position, self.write_slot = t.token.numpy(), t.position.numpy(), t.write_slot.numpy()
        self.audio_source = t.audio_source.numpy()
        self.row_slot, self.row_q_start, self.row_q_len = t.row_slot.numpy(), t.row_q_start.numpy(), t.row_q_len.numpy()
        self.row_key_len, self.row_last = t.row_key_len.numpy(), t.row_last.numpy()

    def pack(self, bucket: Bucket, listening: Sequence[SlotRow], reply: Sequence[SlotRow]) -> None:
        """Fill the buffer for one step at ``bucket``; raises ValueError for a row the step cannot run."""
        L, R = bucket.listening, bucket.reply
        if len(listening) > L or len(reply) > R:
            raise ValueError(f"{len(listening)} listening and {len(reply)} reply rows do not fit bucket {bucket}")
        for row in (*listening, *reply):
            if not fits_static_step(row.plan):
                raise ValueError(f"row of slot {row.slot} does not fit a static step ({len(row.plan.tokens)} "
                                 f"tokens, {len(row.plan.audio)} chunks)")
            if not 0 <= row.slot < self.scratch_slot:
                raise ValueError(f"slot {row.slot} is not a session slot (0 .. {self.scratch_slot - 1})")
        self._pack_listening(L, listening)
        self._pack_reply(L, R, reply)

    def _pack_listening(self, L: int, rows: Sequence[SlotRow]) -> None:
        n = len(rows)
        W = ROW_TOKENS
        lengths = np.fromiter((len(r.plan.tokens) for r in rows), np.int64, n)
        starts = np.fromiter((r.plan.start_position for r in rows), np.int64, n)
        slots = np.fromiter((r.slot for r in rows), np.int64, n)
        audio_lo = np.fromiter((r.plan.audio_spans[0][0] for r in rows), np.int64, n)
        self._check_positions(starts + lengths)
        cols = np.arange(W)
        real = cols[None, :] < lengths[:, None]  # (n, W)

        token = self.token[: L * W].reshape(L, W)
        token[n:] = 0
        token[:n] = 0
        if n:
            token[:n][real] = np.concatenate([r.plan.tokens for r in rows])
        position = self.position[: L * W].reshape(L, W)
        position[n:] = 0
        position[:n] = np.where(real, starts[:, None] + cols, 0)
        write_slot = self.write_slot[: L * W].reshape(L, W)
        write_slot[n:] = self.scratch_slot
        write_slot[:n] = np.where(real, slots[:, None], self.scratch_slot)
        audio = self.audio_source[: L * W].reshape(L, W)
        audio[n:] = -1
        offset = cols[None, :] - audio_lo[:, None]  # column's place inside the row's PAD span
        is_audio = (offset >= 0) & (offset < AUDIO_FRAMES_PER_CHUNK)
        audio[:n] = np.where(is_audio, np.arange(n)[:, None] * AUDIO_FRAMES_PER_CHUNK + offset, -1)

        first = np.arange(L) * W
        self.row_q_start[:L] = first
        self.row_slot[:L] = self.scratch_slot
        self.row_slot[:n] = slots
        self.row_q_len[:L] = 0
        self.row_q_len[:n] = lengths
        self.row_key_len[:L] = 0
        self.row_key_len[:n] = starts + lengths
        self.row_last[:L] = first
        self.row_last[:n] += lengths - 1

        mel = self.tensors.mel
        if n:
            torch.stack([r.plan.audio[0] for r in rows], out=mel[:n])
        mel[n:L].zero_()

    def _pack_reply(self, L: int, R: int, rows: Sequence[SlotRow]) -> None:
        n = len(rows)
        first_token = L * ROW_TOKENS
        tokens = slice(first_token, first_token + R)
        starts = np.fromiter((r.plan.start_position for r in rows), np.int64, n)
        slots = np.fromiter((r.slot for r in rows), np.int64, n)
        self._check_positions(starts + 1)
        self.token[tokens] = 0
        self.token[first_token: first_token + n] = np.fromiter((r.plan.tokens[0] for r in rows), np.int64, n)
        self.position[tokens] = 0
        self.position[first_token: first_token + n] = starts
        self.write_slot[tokens] = self.scratch_slot
        self.write_slot[first_token: first_token + n] = slots
        self.audio_source[tokens] = -1

        row_span = slice(L, L + R)
        self.row_q_start[row_span] = np.arange(first_token, first_token + R)
        self.row_last[row_span] = self.row_q_start[row_span]
        self.row_slot[row_span] = self.scratch_slot
        self.row_slot[L: L + n] = slots
        self.row_q_len[row_span] = 0
        self.row_q_len[L: L + n] = 1
        self.row_key_len[row_span] = 0
        self.row_key_len[L: L + n] = starts + 1

    def _check_positions(self, key_lengths: np.ndarray) -> None:
        if key_lengths.size and int(key_lengths.max()) > self.max_positions:
            raise ValueError(f"position {int(key_lengths.max()) - 1} is beyond the cache "
                             f"({self.max_positions} positions)")
