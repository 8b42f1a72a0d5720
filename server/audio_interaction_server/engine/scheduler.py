"""Which sessions run in a step, with which rows, and what their tokens mean: the worker's bookkeeping.

``Scheduler`` holds the session registry and the free KV-cache slots. ``schedule()`` picks the
ready sessions (round robin when there are more than a step's rows, catch-up pacing for audio
backlogs), asks each conversation for its row and splits the rows into batches: a ``StepPlan``.
``update(batch, result)`` turns the runner's tokens into each session's engine events: the
session's turn policy applies first (scripted turns, a requested reply, ``reply_mode``), then
the conversation commits the token. No tensors here (``runner.py``), no threads and no
delivery of events (``worker.py``).

Threading: the worker thread only.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Callable

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.commands import EmitFn
from audio_interaction_server.engine.conversation import Conversation, Phase, RowPlan
from audio_interaction_server.engine.events import AudioCleared, EndCode, EngineEvent, ReplyWaitsForAudio, SessionEnded
from audio_interaction_server.engine.prompt import PromptEncoder
from audio_interaction_server.engine.runner import BatchResult, PlannedRow
from audio_interaction_server.engine.scripted import scripted_token
from audio_interaction_server.model.lm import FLEX_QUERY_ROWS
from audio_interaction_server.spec import CHUNK_S

log = logging.getLogger(__name__)

# Rows longer than a listening block (a session's first row, a context rollover) run in a batch of their own.
# The bound is the in-place attention's query length: a batch whose rows all fit it can take that path, so a
# short batch holding one row longer than it would silently fall back to gather attention for every row.
LONG_ROW_TOKENS = FLEX_QUERY_ROWS

COMMIT_FAILED = "session state error"
PLAN_FAILED = "planning its step failed"


@dataclass
class SessionState:
    """One open session as the worker thread sees it."""

    session_id: str
    slot: int
    options: SessionOptions
    conversation: Conversation
    emit: EmitFn
    generator: torch.Generator | None
    reply_requested: bool = False  # the next decision is TEXT_BEGIN (request_reply), consumed by that reply
    told_reply_waits: bool = False  # ReplyWaitsForAudio went out for the request now pending
    listen_credits: float | None = None  # catch-up pacing: listening rows it may run now; None = a full burst
    credits_at_s: float = 0.0


@dataclass(frozen=True)
class Failure:
    """Something in one session's own path raised: that session ends, every other one goes on."""

    session: SessionState
    error: BaseException
    what: str  # what failed, in words for the client


class OpenRefused(Exception):
    """A session cannot open here; ``code`` says why (capacity, a duplicate id, options that do not fit)."""

    def __init__(self, code: EndCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StepPlan:
    """The rows of one step, as batches, and the sessions whose planning failed.

    Short rows (listening blocks, reply tokens) and long rows (first blocks, rollovers) are
    separate batches, short first: rows are padded to the longest in their batch, so one
    2,000-token rollover would otherwise make every 1-token reply row cost 2,000 tokens, and
    committing the short batch before the long one runs keeps a neighbour's long row from
    holding back everyone's decisions.
    """

    batches: tuple[tuple[PlannedRow, ...], ...]
    failures: tuple[Failure, ...] = ()

    @property
    def rows(self) -> list[PlannedRow]:
        return [row for batch in self.batches for row in batch]


@dataclass(frozen=True)
class StepUpdate:
    """What one batch's result did: each session's new events, and the sessions whose commit failed."""

    events: tuple[tuple[SessionState, list[EngineEvent]], ...]
    failures: tuple[Failure, ...]


class Scheduler:
    def __init__(self, config: EngineConfig, max_batch_rows: int, prompts: PromptEncoder,
                 clear_slot: Callable[[int], None], clock: Callable[[], float]) -> None:
        """``clear_slot``: resets a slot's KV cache for a new session (the runner's); ``clock``: pacing's clock."""
        self.config = config
        self.max_batch_rows = max_batch_rows
        self.prompts = prompts
        self.clear_slot = clear_slot
        self.clock = clock
        self.is_paced = True  # catch-up pacing applies (the worker turns it off inside run_until_idle)
        self.sessions: dict[str, SessionState] = {}
        self._free_slots = list(range(config.max_sessions - 1, -1, -1))  # pop() gives the lowest
        self._round_robin = 0

    # ---- the registry ------------------------------------------------------------------------------
    def open(self, session_id: str, options: SessionOptions, emit: EmitFn) -> SessionState:
        """Register a session in the lowest free slot; raises ``OpenRefused``, or what building it raised."""
        if session_id in self.sessions:
            raise OpenRefused(EndCode.DUPLICATE_SESSION, f"session {session_id} is already open")
        if not self._free_slots:
            raise OpenRefused(EndCode.CAPACITY, f"all {self.config.max_sessions} session slots are in use")
        slot = self._free_slots.pop()
        try:
            session = self._new_session(session_id, options, emit, slot)
        except BaseException:
            self._release_slot(slot)
            raise
        self.sessions[session_id] = session
        return session

    def _new_session(self, session_id: str, options: SessionOptions, emit: EmitFn, slot: int) -> SessionState:
        self.clear_slot(slot)
        try:  # the contract of both calls: ValueError = this prompt or turn cap cannot run in this budget
            prefix = self.prompts.prefix(options.system_prompt)
            conversation = Conversation(prefix, options.max_turn_tokens, self.config.max_positions,
                                        self.config.rollover_window_positions)
        except ValueError as exc:  # our own words: which option, which limit
            raise OpenRefused(EndCode.INVALID_OPTIONS, str(exc)) from exc
        generator = None
        if not options.sampling.is_greedy:
            generator = torch.Generator()
            seed = options.sampling.seed if options.sampling.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed)
        return SessionState(session_id, slot, options, conversation, emit, generator)

    def end(self, session: SessionState, code: EndCode | None, message: str) -> list[EngineEvent] | None:
        """Unregister the session and free its slot; its final events, or None if it had already ended.

        A reply cut by a normal close (``code`` None) still gets its end event; after an error it does not.
        """
        if self.sessions.pop(session.session_id, None) is None:
            return None
        events: list[EngineEvent] = []
        if code is None:
            try:
                events = session.conversation.cancel("session_closed")
            except Exception:  # the close itself must not fail: the slot is freed, the client told
                log.exception("session %s: cancelling its reply at close failed", session.session_id)
        events.append(SessionEnded(code, message))
        self._release_slot(session.slot)
        return events

    def _release_slot(self, slot: int) -> None:
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)  # pop() gives the lowest

    # ---- session requests (applied between steps) --------------------------------------------------
    @staticmethod
    def add_audio(session: SessionState, mel_chunks) -> None:
        for chunk in mel_chunks:
            session.conversation.add_audio(chunk)

    @staticmethod
    def cancel(session: SessionState) -> list[EngineEvent]:
        """Cut the reply in progress, and withdraw a requested one that has not started: a client that asks
        for a reply and cancels before it begins wants none."""
        session.reply_requested = False
        return session.conversation.cancel()

    @staticmethod
    def request_reply(session: SessionState) -> None:
        """The next decision of this session is TEXT_BEGIN; ignored while a reply runs (it would start another)."""
        if session.conversation.phase is Phase.LISTENING:
            session.reply_requested = True
            session.told_reply_waits = False

    def replies_waiting_for_audio(self) -> list[tuple[SessionState, list[EngineEvent]]]:
        """Sessions whose requested reply has no queued chunk to begin at, each told once per request.

        Read after the inbox is applied: a chunk the session pushed with its request is queued by then, so
        only a session that counted chunks the engine had already decided (their decisions still on the way
        to it) is told.
        """
        waiting: list[tuple[SessionState, list[EngineEvent]]] = []
        for session in self.sessions.values():
            if session.reply_requested and not session.told_reply_waits and not session.conversation.audio_queue \
                    and session.conversation.phase is Phase.LISTENING:
                session.told_reply_waits = True
                waiting.append((session, [ReplyWaitsForAudio()]))
        return waiting

    @staticmethod
    def clear_audio(session: SessionState) -> list[EngineEvent]:
        """Drop the queued chunks. Between steps no chunk is in flight: a row's chunk leaves the queue at commit."""
        dropped = len(session.conversation.audio_queue)
        session.conversation.audio_queue.clear()
        return [AudioCleared(dropped)]

    # ---- the step ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        rows, failures = [], []
        for session in self._ready_sessions():
            try:
                plan = session.conversation.plan()
            except Exception as exc:  # ContextFull, or this session's state is broken: it alone ends
                failures.append(Failure(session, exc, PLAN_FAILED))
                continue
            rows.append(PlannedRow(session.session_id, session.slot, plan, session.options.sampling,
                                   session.generator))
        short = tuple(row for row in rows if row.num_tokens <= LONG_ROW_TOKENS)
        long = tuple(row for row in rows if row.num_tokens > LONG_ROW_TOKENS)
        return StepPlan(tuple(batch for batch in (short, long) if batch), tuple(failures))

    def _ready_sessions(self) -> list[SessionState]:
        now_s = self.clock()
        ready = [s for s in self.sessions.values() if s.conversation.is_ready and self._may_listen(s, now_s)]
        if len(ready) > self.max_batch_rows:
            # More ready sessions than rows: rotate the start so nobody starves.
            start = self._round_robin % len(ready)
            self._round_robin += self.max_batch_rows
            ready = (ready[start:] + ready[:start])[: self.max_batch_rows]
        if self._pacing:
            for session in ready:
                if session.conversation.phase is Phase.LISTENING:
                    # _may_listen let it in, and a paced listening session leaves it with its credits counted.
                    assert session.listen_credits is not None
                    session.listen_credits -= 1.0
        return ready

    @property
    def _pacing(self) -> bool:
        return self.config.max_catch_up_speed is not None and self.is_paced

    def _may_listen(self, session: SessionState, now_s: float) -> bool:
        """Catch-up pacing: a token bucket of listening rows per session (replies are never paced).

        A session's audio backlog (queued while it spoke, or sent faster than real time) is heard at
        full speed up to ``catch_up_burst_s``; beyond that at ``max_catch_up_speed`` x real time. A
        client flooding audio would otherwise keep the worker, and with it the CPU, busy for every
        other session all the time: that is what made a real-time neighbour's decisions late.
        """
        speed = self.config.max_catch_up_speed
        if speed is None or not self.is_paced or session.conversation.phase is not Phase.LISTENING:
            return True  # not self._pacing, with the speed known to be set below
        burst = self.config.catch_up_burst_s / CHUNK_S
        if session.listen_credits is None:
            session.listen_credits = burst
        else:
            earned = (now_s - session.credits_at_s) * speed / CHUNK_S
            session.listen_credits = min(burst, session.listen_credits + earned)
        session.credits_at_s = now_s
        return session.listen_credits >= 1.0 - 1e-9

    def update(self, batch: tuple[PlannedRow, ...], result: BatchResult) -> StepUpdate:
        """Commit each row's token to its conversation (decisions first, then reply tokens)."""
        events, failures = [], []
        order = sorted(range(len(batch)), key=lambda i: not batch[i].is_decision)  # tidiness: one row a session
        for i in order:
            row, outcome = batch[i], result.rows[i]
            session = self.sessions.get(row.session_id)
            if session is None or session.slot != row.slot:
                continue  # ended while its row ran
            if outcome.error is not None:
                failures.append(Failure(session, outcome.error, outcome.failed_at))
                continue
            try:
                token = self.turn_policy(session, row.plan, outcome.token)
                events.append((session, session.conversation.commit(row.plan, token)))
            except Exception as exc:
                failures.append(Failure(session, exc, COMMIT_FAILED))
                continue
            if row.is_decision and token == T.TEXT_BEGIN:
                session.reply_requested = False  # a request is consumed by the reply that starts here
        return StepUpdate(tuple(events), tuple(failures))

    def turn_policy(self, session: SessionState, plan: RowPlan, model_token: int | None) -> int:
        """The token to commit for ``plan``: the model's, unless the session's turn policy says otherwise.

        Scripted turns (a benchmark schedule) replace it first. Then, for a decision only: a requested
        reply is TEXT_BEGIN, and in ``on_request`` mode every other decision is KEEP_SILENCE. The logits
        are still computed and checked for every row; only the committed token changes, so the forced
        token is fed exactly as if the model had chosen it and a normal reply follows.
        """
        if model_token is None:
            raise RuntimeError("no token was chosen for this row")
        token = model_token
        if self.config.scripted_turns is not None:
            token = scripted_token(self.config.scripted_turns, session.conversation, session.slot, token)
        if plan.is_decision:
            if session.reply_requested:
                token = T.TEXT_BEGIN
            elif session.options.reply_mode == "on_request":
                token = T.KEEP_SILENCE
        return token
