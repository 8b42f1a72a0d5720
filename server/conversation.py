"""The listen/speak state machine of one session, in token ids (pure Python, no torch).

Listening: each audio chunk feeds ``[last token?, AUDIO_BEGIN, PAD x10, ASSISTANT]``
and the model's next token is the decision. Speaking: one token per step until
TEXT_END or the turn cap. The token sampled last is fed at the start of the
next row, exactly as the reference does, so the first row of a session is
``prefix + block`` and TEXT_END leads the first block after a reply.

The worker asks ``plan()`` what to feed, runs the model, then calls
``commit(token)``; ``plan()`` never changes state, so a failed step can be
retried. Audio that arrives while speaking waits in ``audio_queue`` in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from server import tokens as T
from server.engine_events import Decision, EndReason, EngineEvent, TurnBegin, TurnEnd, TurnToken


class Phase(Enum):
    LISTENING = "listening"
    SPEAKING = "speaking"


class ContextFull(RuntimeError):
    """The next row would run past the session's position budget."""


@dataclass(frozen=True)
class RowPlan:
    tokens: list[int]
    start_position: int
    audio_span: tuple[int, int] | None  # columns of the PAD slots that audio overwrites
    audio: Any  # the chunk consumed by this row (opaque here), None while speaking

    @property
    def is_decision(self) -> bool:
        return self.audio is not None


@dataclass
class Conversation:
    prefix_ids: list[int]
    max_turn_tokens: int
    max_positions: int
    phase: Phase = Phase.LISTENING
    next_position: int = 0
    num_chunks_consumed: int = 0
    num_turns: int = 0
    audio_queue: deque = field(default_factory=deque)
    _unfed: list[int] = field(default_factory=list)
    _turn_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._unfed = list(self.prefix_ids)

    def add_audio(self, chunk: Any) -> None:
        self.audio_queue.append(chunk)

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.SPEAKING or bool(self.audio_queue)

    def plan(self) -> RowPlan:
        if self.phase is Phase.SPEAKING:
            row = RowPlan(list(self._unfed), self.next_position, None, None)
        else:
            if not self.audio_queue:
                raise RuntimeError("plan() called while listening with no audio queued")
            start = len(self._unfed) + 1  # after the unfed tokens and AUDIO_BEGIN
            span = (start, start + T.AUDIO_FRAMES_PER_CHUNK)
            row = RowPlan(self._unfed + T.listening_block(), self.next_position, span, self.audio_queue[0])
        if row.start_position + len(row.tokens) > self.max_positions:
            raise ContextFull(
                f"the session reached its context budget of {self.max_positions} positions"
            )
        return row

    def commit(self, row: RowPlan, token_id: int) -> list[EngineEvent]:
        """Apply the model's next token after ``row`` was fed."""
        self.next_position += len(row.tokens)
        if self.phase is Phase.LISTENING:
            return self._decide(token_id)
        return self._speak(token_id)

    def cancel(self, reason: EndReason = "cancelled") -> list[EngineEvent]:
        """End the current reply as if TEXT_END had been generated (between steps only)."""
        if self.phase is not Phase.SPEAKING:
            return []
        return self._end_turn(reason)

    def _decide(self, token_id: int) -> list[EngineEvent]:
        self.audio_queue.popleft()
        chunk_index = self.num_chunks_consumed
        self.num_chunks_consumed += 1
        if token_id not in (T.TEXT_BEGIN, T.KEEP_SILENCE):
            raise ValueError(f"decision token {token_id} is neither TEXT_BEGIN nor KEEP_SILENCE")
        events: list[EngineEvent] = [Decision(chunk_index, token_id)]
        self._unfed = [token_id]
        if token_id == T.TEXT_BEGIN:
            self.phase = Phase.SPEAKING
            self._turn_tokens = []
            events.append(TurnBegin(self.num_turns, chunk_index))
        return events

    def _speak(self, token_id: int) -> list[EngineEvent]:
        if token_id == T.TEXT_END:
            return self._end_turn("text_end")
        self._turn_tokens.append(token_id)
        self._unfed = [token_id]
        events: list[EngineEvent] = [TurnToken(self.num_turns, token_id)]
        if len(self._turn_tokens) >= self.max_turn_tokens:
            events += self._end_turn("max_tokens")
        return events

    def _end_turn(self, reason: EndReason) -> list[EngineEvent]:
        # TEXT_END is fed as the first token of the next listening block, sampled or not.
        event = TurnEnd(self.num_turns, tuple(self._turn_tokens), reason)
        self.phase = Phase.LISTENING
        self._unfed = [T.TEXT_END]
        self._turn_tokens = []
        self.num_turns += 1
        return [event]
