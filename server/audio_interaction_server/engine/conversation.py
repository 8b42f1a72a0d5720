"""The listen/speak state machine of one session, in token ids (pure Python, no torch).

Listening: each audio chunk feeds ``[last token?, AUDIO_BEGIN, PAD x10, ASSISTANT]``
and the model's next token is the decision. Speaking: one token per step until
TEXT_END or the turn cap. The token sampled last is fed at the start of the
next row, exactly as the reference does, so the first row of a session is
``prefix + block`` and TEXT_END leads the first block after a reply.

Turn cap, as the reference: the ``max_turn_tokens``-th reply token is fed like
any other, the model's prediction at that step is discarded and TEXT_END taken
instead. A capped reply therefore costs one more forward than its tokens, and
the context holds every token the client was shown before TEXT_END.

The worker asks ``plan()`` what to feed, runs the model, then calls
``commit(token)``; ``plan()`` never changes state, so a failed step can be
retried. Audio that arrives while speaking waits in ``audio_queue`` in order.

Context rollover: the model was trained below 4,096 positions, so a session
that nears its budget rebuilds its context at a safe point (listening, never
mid-reply): the system prefix plus the most recent blocks (audio chunks with
the replies that followed them) that fit ``rollover_window`` positions, fed
again from position 0 in one row. The blocks needed for that are kept in a
bounded history; older ones are forgotten.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from audio_interaction_server import spec as T
from audio_interaction_server.spec import check_room, rollover_point
from audio_interaction_server.engine.events import (
    ContextRollover,
    Decision,
    EndReason,
    EngineEvent,
    TurnBegin,
    TurnEnd,
    TurnToken,
)


class Phase(Enum):
    LISTENING = "listening"
    SPEAKING = "speaking"


class ContextFull(RuntimeError):
    """The next row would run past the session's position budget."""


@dataclass(frozen=True)
class ReplyRequest:
    """A client's request for a reply at the next decision, whatever the model would decide."""

    max_turn_tokens: int | None = None  # that reply's own cap, under the session's (None: the session's)


@dataclass(frozen=True)
class RowPlan:
    tokens: list[int]
    start_position: int
    audio_spans: tuple[tuple[int, int], ...]  # PAD columns that audio overwrites, one per chunk
    audio: tuple[Any, ...]  # chunks for those spans (opaque here); the last is the one decided on
    new_block_start: int = 0  # column where this row's own chunk block starts (listening rows)
    rolls_over: bool = False  # this row rebuilds the whole context from position 0
    # Reply tokens fed just before the block's lead token: a cancelled reply's last token, shown but not
    # yet fed when the reply was cut. They belong to the previous block's history.
    num_carried: int = 0
    discards_prediction: bool = False  # feeds a capped reply's last token; TEXT_END follows whatever is sampled
    # The session's prefix fills this row's first columns from position 0 (a first row, a rollover): once the row
    # has run, its slot holds the prefix's keys and values (engine/prefix_kv.py keeps them for later sessions).
    prefix_tokens: int = 0
    block_has_lead: bool = False  # listening rows: the block starts with the previous token, not AUDIO_BEGIN

    @property
    def is_decision(self) -> bool:
        return bool(self.audio)


@dataclass
class _Block:
    """One chunk's listening block as fed, plus the reply tokens fed after it."""

    tokens: list[int]
    has_lead: bool  # tokens[0] is the previous token (KEEP_SILENCE / TEXT_END), not AUDIO_BEGIN
    audio: Any


@dataclass
class Conversation:
    prefix_ids: list[int]
    max_turn_tokens: int
    max_positions: int
    rollover_window: int | None = None  # positions of history kept at a rollover; None = never roll over
    # The slot already holds the prefix's keys and values (copied from engine/prefix_kv.py): the first row feeds
    # the first block alone, from position len(prefix_ids).
    prefix_in_slot: bool = False
    phase: Phase = Phase.LISTENING
    next_position: int = 0
    num_chunks_consumed: int = 0
    num_turns: int = 0
    num_rollovers: int = 0
    audio_queue: deque = field(default_factory=deque)
    _unfed: list[int] = field(default_factory=list)
    _turn_tokens: list[int] = field(default_factory=list)
    reply_cap_tokens: int | None = None  # the reply in progress's own cap (a requested one's), under max_turn_tokens
    _history: deque = field(default_factory=deque)  # of _Block, oldest first
    _history_tokens: int = 0

    def __post_init__(self) -> None:
        self._unfed = [] if self.prefix_in_slot else list(self.prefix_ids)
        if self.prefix_in_slot:
            self.next_position = len(self.prefix_ids)
        check_room(len(self.prefix_ids), self.max_turn_tokens, self.max_positions, self.rollover_window)

    @property
    def rollover_at(self) -> int:
        """Positions after which a listening row triggers a rollover: room is kept for a full reply."""
        return rollover_point(self.max_positions, self.max_turn_tokens)

    @property
    def history_tokens(self) -> int:
        return self._history_tokens

    @property
    def turn_length(self) -> int:
        """Tokens of the current reply so far (0 while listening)."""
        return len(self._turn_tokens)

    @property
    def num_history_chunks(self) -> int:
        return len(self._history)

    def add_audio(self, chunk: Any) -> None:
        self.audio_queue.append(chunk)

    @property
    def is_ready(self) -> bool:
        return self.phase is Phase.SPEAKING or bool(self.audio_queue)

    def plan(self) -> RowPlan:
        if self.phase is Phase.SPEAKING:
            row = RowPlan(list(self._unfed), self.next_position, (), (), discards_prediction=self._turn_is_capped)
        else:
            if not self.audio_queue:
                raise RuntimeError("plan() called while listening with no audio queued")
            row = self._plan_listening()
        if row.start_position + len(row.tokens) > self.max_positions:
            raise ContextFull(f"the session reached its context budget of {self.max_positions} positions")
        return row

    def _plan_listening(self) -> RowPlan:
        block = self._unfed + T.listening_block()
        is_first = self.num_chunks_consumed == 0
        num_carried = 0 if is_first else len(self._unfed) - 1
        needs_rollover = self.next_position + len(block) > self.rollover_at
        if self.rollover_window is None or not needs_rollover or is_first:
            new_block_start = len(self._unfed) - (0 if is_first else 1)
            return RowPlan(block, self.next_position, (_pad_span(len(self._unfed)),), (self.audio_queue[0],),
                           new_block_start, num_carried=num_carried,
                           prefix_tokens=len(self.prefix_ids) if is_first and not self.prefix_in_slot else 0,
                           block_has_lead=not is_first)
        tokens, spans, audio = list(self.prefix_ids), [], []
        for i, kept in enumerate(self._history):
            # The oldest kept block follows the prefix directly, as the first block of a session does.
            body = kept.tokens[1:] if i == 0 and kept.has_lead else kept.tokens
            spans.append(_pad_span(len(tokens) + body.index(T.AUDIO_BEGIN)))
            audio.append(kept.audio)
            tokens += body
        lead = self._unfed
        if not self._history:
            # Nothing kept (a window smaller than the last block and its reply): the new block follows the prefix
            # directly too. Its lead, and a cut reply's carried token, belonged to the history just forgotten.
            lead, num_carried = [], 0
        new_block_start = len(tokens) + num_carried
        spans.append(_pad_span(len(tokens) + len(lead)))
        audio.append(self.audio_queue[0])
        return RowPlan(tokens + lead + T.listening_block(), 0, tuple(spans), tuple(audio), new_block_start,
                       rolls_over=True, num_carried=num_carried, prefix_tokens=len(self.prefix_ids),
                       block_has_lead=bool(lead))

    def commit(self, row: RowPlan, token_id: int, request: ReplyRequest | None = None) -> list[EngineEvent]:
        """Apply the model's next token after ``row`` was fed; a decision of TEXT_BEGIN with ``request`` begins
        that request's reply."""
        events: list[EngineEvent] = []
        if row.rolls_over:
            events.append(ContextRollover(self.next_position, len(row.tokens), len(row.audio) - 1))
            self.num_rollovers += 1
            self.next_position = 0
        self.next_position += len(row.tokens)
        if self.phase is Phase.LISTENING:
            if row.num_carried and self._history:
                carried = row.tokens[row.new_block_start - row.num_carried:row.new_block_start]
                self._history[-1].tokens.extend(carried)
                self._history_tokens += len(carried)
            # Every block but the session's first (and one a rollover fed with no history) starts with the token
            # sampled before it.
            self._remember(_Block(row.tokens[row.new_block_start:], row.block_has_lead, row.audio[-1]))
            return events + self._decide(token_id, request)
        if self._history:
            self._history[-1].tokens.extend(row.tokens)
            self._history_tokens += len(row.tokens)
        return events + self._speak(token_id)

    def _remember(self, block: _Block) -> None:
        if self.rollover_window is None:
            return  # nothing will ever be re-fed: keep no history
        self._history.append(block)
        self._history_tokens += len(block.tokens)

    def _forget_old_blocks(self) -> None:
        if self.rollover_window is None:
            return
        while self._history and self._history_tokens > self.rollover_window:
            self._history_tokens -= len(self._history.popleft().tokens)

    def cancel(self, reason: EndReason = "cancelled") -> list[EngineEvent]:
        """End the current reply now (between steps only).

        The reply's last token was shown to the client but not fed yet: it is fed, then TEXT_END,
        at the start of the next listening row, so the context holds what the client saw.
        """
        if self.phase is not Phase.SPEAKING:
            return []
        return self._end_turn(reason, unfed_reply_tokens=self._unfed)

    def _decide(self, token_id: int, request: ReplyRequest | None) -> list[EngineEvent]:
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
            self.reply_cap_tokens = None if request is None else request.max_turn_tokens
            events.append(TurnBegin(self.num_turns, chunk_index, requested=request is not None))
        else:
            self._forget_old_blocks()
        return events

    @property
    def _turn_is_capped(self) -> bool:
        """The reply has all its tokens; the next row only feeds the last one."""
        cap = self.max_turn_tokens if self.reply_cap_tokens is None else min(self.max_turn_tokens,
                                                                             self.reply_cap_tokens)
        return self.phase is Phase.SPEAKING and len(self._turn_tokens) >= cap

    def _speak(self, token_id: int) -> list[EngineEvent]:
        if token_id == T.TEXT_END:
            return self._end_turn("text_end")
        if self._turn_is_capped:
            # The cap-th token is now in the context; the model's next token is dropped for TEXT_END.
            return self._end_turn("max_tokens")
        self._turn_tokens.append(token_id)
        self._unfed = [token_id]
        return [TurnToken(self.num_turns, token_id)]

    def _end_turn(self, reason: EndReason, unfed_reply_tokens: list[int] | None = None) -> list[EngineEvent]:
        # TEXT_END is fed as the first token of the next listening block, sampled or not.
        event = TurnEnd(self.num_turns, tuple(self._turn_tokens), reason)
        self.phase = Phase.LISTENING
        self._unfed = list(unfed_reply_tokens or []) + [T.TEXT_END]
        self._turn_tokens = []
        self.reply_cap_tokens = None
        self.num_turns += 1
        self._forget_old_blocks()
        return [event]


def _pad_span(audio_begin_column: int) -> tuple[int, int]:
    """PAD columns of a block whose AUDIO_BEGIN sits at ``audio_begin_column``."""
    start = audio_begin_column + 1
    return (start, start + T.AUDIO_FRAMES_PER_CHUNK)
