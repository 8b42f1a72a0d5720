"""Which sessions run in a step, with which rows, and what their tokens mean: the worker's bookkeeping.

``Scheduler`` holds the session registry and the free KV-cache slots. ``schedule()`` picks the
ready sessions (catch-up pacing for audio backlogs), asks each conversation for its row, longest
waiting first, until the step's bounds are reached (``step_policy.py``: the rest run next step),
and splits the rows into batches: a ``StepPlan``.
``update(batch, result)`` turns the runner's tokens into each session's engine events: the
session's turn policy applies first (scripted turns, a requested reply, ``reply_mode``), then
the conversation commits the token. No tensors here (``runner.py``), no threads and no
delivery of events (``worker.py``).

Threading: the worker thread only.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.catch_up import CatchUpPacing, ListenCredits
from audio_interaction_server.engine.commands import EmitFn
from audio_interaction_server.engine.conversation import Conversation, Phase, ReplyRequest, RowPlan
from audio_interaction_server.engine.events import (
    AudioCleared, EndCode, EngineEvent, ReplyRequestDropped, ReplyWaitsForAudio, SessionEnded,
)
from audio_interaction_server.engine.prefill_budget import PrefillBudget
from audio_interaction_server.engine.prompt import PromptEncoder
from audio_interaction_server.engine.runner import BatchResult, PlannedRow
from audio_interaction_server.engine.scripted import scripted_token
from audio_interaction_server.engine.step_policy import LONG_ROW_TOKENS, Candidate, StepLimits, choose_rows

log = logging.getLogger(__name__)

__all__ = ["LONG_ROW_TOKENS", "Scheduler", "SessionState", "StepLimits", "StepPlan", "StepUpdate"]

COMMIT_FAILED = "session state error"
PLAN_FAILED = "planning its step failed"


class QueuedChunk(NamedTuple):
    ticket: int  # the step policy's (step_policy.py): a session waits from its oldest queued chunk's
    # Its number among every chunk the session pushed (``ClearAudio.keep_before`` counts so). Not derived from
    # counts: a clear that keeps a commit's chunks drops the ones after them, so dropped chunks lie between queued
    # ones.
    number: int


@dataclass
class SessionState:
    """One open session as the worker thread sees it."""

    session_id: str
    slot: int
    options: SessionOptions
    conversation: Conversation
    emit: EmitFn
    generator: torch.Generator | None
    requested_reply: ReplyRequest | None = None  # a reply asked for, begun by the decision of reply_due_chunk
    reply_due_chunk: int = 0  # that decision's chunk index: the last chunk queued when the request came
    told_reply_waits: bool = False  # ReplyWaitsForAudio went out for the request now pending
    client_address: str | None = None  # pays for its prompt's prefill and its opening catch-up (None: nobody)
    listen_credits: ListenCredits | None = None  # catch-up pacing's own bucket (catch_up.py); None: not paced
    # One per queued chunk, in the queue's order, after those of decided chunks not yet let go (chunks leave the
    # queue at the front, decided, or at the back, cleared): its step-policy ticket and its number.
    queued_chunks: deque[QueuedChunk] = field(default_factory=deque)
    last_row_ticket: int = -1  # the step policy's ticket of the session's last row
    num_chunks_pushed: int = 0

    @property
    def is_reply_due(self) -> bool:
        """A requested reply begins at the decision planned now: the model has heard the audio sent before it."""
        return self.requested_reply is not None and self.conversation.num_chunks_consumed >= self.reply_due_chunk

    def waiting_since(self) -> int:
        """The ticket of the moment this session started waiting: its oldest queued chunk, or its last row."""
        queued = self.let_go_of_decided()
        oldest = queued[0].ticket if queued and len(queued) == len(self.conversation.audio_queue) else -1
        return max(oldest, self.last_row_ticket)  # -1 above: queued without a ticket (not by ``Scheduler.add_audio``)

    def let_go_of_decided(self) -> deque[QueuedChunk]:
        """``queued_chunks``, with those of the chunks decided since (they left the queue at the front) let go."""
        queued, queue = self.queued_chunks, self.conversation.audio_queue
        while len(queued) > len(queue):
            queued.popleft()
        return queued


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
                 prepare_slot: Callable[[int, list[int]], bool], clock: Callable[[], float]) -> None:
        """``prepare_slot(slot, prefix)``: resets a slot's KV cache for a new session that starts with ``prefix``,
        True if the prefix's keys and values are in it then (the runner's); ``clock``: pacing's clock."""
        self.config = config
        self.max_batch_rows = max_batch_rows
        self.limits = StepLimits.from_config(config, max_batch_rows)
        self._next_ticket = 0
        self.prompts = prompts
        self.prepare_slot = prepare_slot
        self.num_prefixes_reused = 0  # sessions opened with their prefix already in their slot, since start
        self.clock = clock  # pacing's and the prefill budget's
        self.prefill_budget = None if config.prefill_tokens_per_s_per_ip is None else \
            PrefillBudget(config.prefill_tokens_per_s_per_ip, config.prefill_token_burst_per_ip)
        self.is_paced = True  # catch-up pacing applies (the worker turns it off inside run_until_idle)
        self.catch_up = None if config.max_catch_up_speed is None else \
            CatchUpPacing(config.max_catch_up_speed, config.catch_up_burst_s)
        self.sessions: dict[str, SessionState] = {}
        self._free_slots = list(range(config.max_sessions - 1, -1, -1))  # pop() gives the lowest

    # ---- the registry ------------------------------------------------------------------------------
    def open(self, session_id: str, options: SessionOptions, emit: EmitFn,
             client_address: str | None = None) -> SessionState:
        """Register a session in the lowest free slot; raises ``OpenRefused``, or what building it raised.
        ``client_address`` pays for its prompt's prefill (None: nobody does)."""
        if session_id in self.sessions:
            raise OpenRefused(EndCode.DUPLICATE_SESSION, f"session {session_id} is already open")
        if not self._free_slots:
            raise OpenRefused(EndCode.CAPACITY, f"all {self.config.max_sessions} session slots are in use")
        slot = self._free_slots.pop()
        try:
            session = self._new_session(session_id, options, emit, slot, client_address)
        except BaseException:
            self._release_slot(slot)
            raise
        self.sessions[session_id] = session
        return session

    def _new_session(self, session_id: str, options: SessionOptions, emit: EmitFn, slot: int,
                     client_address: str | None) -> SessionState:
        try:  # the contract of both calls: ValueError = this prompt or turn cap cannot run in this budget
            prefix = self.prompts.prefix(options.system_prompt)
            prefix_in_slot = self.prepare_slot(slot, prefix)
            conversation = Conversation(prefix, options.max_turn_tokens, self.config.max_positions,
                                        self.config.rollover_window_positions, prefix_in_slot=prefix_in_slot)
        except ValueError as exc:  # our own words: which option, which limit
            raise OpenRefused(EndCode.INVALID_OPTIONS, str(exc)) from exc
        if not prefix_in_slot and client_address is not None:
            self._charge_prefill(session_id, client_address, len(prefix))
        self.num_prefixes_reused += prefix_in_slot
        generator = None
        if not options.sampling.is_greedy:
            generator = torch.Generator()
            seed = options.sampling.seed if options.sampling.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed)
        # Its own catch-up credits count from its open: a real-time stream has earned its first row by its first chunk.
        credits = None if self.catch_up is None else self.catch_up.credits_for(client_address, self.clock())
        return SessionState(session_id, slot, options, conversation, emit, generator,
                            client_address=client_address, listen_credits=credits)

    def _charge_prefill(self, session_id: str, address: str, num_tokens: int) -> None:
        """The session's prompt is not kept: its first row would feed ``num_tokens``, which ``address`` pays for;
        raises ``OpenRefused`` (before anything is fed) when its budget cannot."""
        budget = self.prefill_budget
        if budget is None:
            return
        refused = budget.charge(address, num_tokens, self.clock())
        if refused is None:
            return
        wait_s = refused.told_wait_s
        if refused.num_refused_to_log is not None:
            log.warning("session %s refused: client address %s is past its prefill budget (%s of new system "
                        "prompts' tokens; this prompt has %d); %d refused since the last line, the next in %.1f s "
                        "at the earliest", session_id, address, budget.describe(), num_tokens,
                        refused.num_refused_to_log, wait_s)
        raise OpenRefused(EndCode.RATE_LIMITED, (
            f"this client address has started too many sessions with new system prompts: the server feeds one "
            f"address {budget.describe()} of prompts it does not keep, and this prompt ({num_tokens} tokens) was not "
            f"fed. Start a new session in {wait_s:.1f} s or later; the default prompt, or one the server still keeps "
            "from a recent session, costs nothing"))

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
    def add_audio(self, session: SessionState, mel_chunks) -> None:
        queued = session.let_go_of_decided()  # else those of decided chunks pile up until the session steps
        for chunk in mel_chunks:
            session.conversation.add_audio(chunk)
            queued.append(QueuedChunk(self._ticket(), session.num_chunks_pushed))
            session.num_chunks_pushed += 1

    def _ticket(self) -> int:
        self._next_ticket += 1
        return self._next_ticket

    @staticmethod
    def cancel(session: SessionState) -> list[EngineEvent]:
        """Cut the reply in progress; while the model listens, withdraw a requested one that has not begun (a client
        that asks for a reply and cancels before it begins wants none). A request waiting for its chunk while a reply
        the model began of its own runs stays: the cancel was that reply's."""
        if session.conversation.phase is not Phase.LISTENING:
            return session.conversation.cancel()
        withdrawn: list[EngineEvent] = [ReplyRequestDropped("cancelled")] if session.requested_reply else []
        session.requested_reply = None
        return session.conversation.cancel() + withdrawn

    @staticmethod
    def request_reply(session: SessionState, max_turn_tokens: int | None = None) -> list[EngineEvent]:
        """A reply, capped at ``max_turn_tokens`` (None: the session's cap), answering the audio sent before the
        request: its decision is TEXT_BEGIN at the last chunk queued now (at the next chunk when none is), so a
        client that sent an utterance faster than real time, flushed it and asked for a reply is answered once
        the model has heard all of it. Dropped, and said so, while a reply runs: it would start another, and the
        session may have sent it before it heard of this reply (the model began it as the request was on its way).
        """
        conversation = session.conversation
        if conversation.phase is not Phase.LISTENING:
            return [ReplyRequestDropped("reply_in_progress")]
        session.requested_reply = ReplyRequest(max_turn_tokens)
        session.reply_due_chunk = conversation.num_chunks_consumed + max(0, len(conversation.audio_queue) - 1)
        session.told_reply_waits = False
        return []

    def replies_waiting_for_audio(self) -> list[tuple[SessionState, list[EngineEvent]]]:
        """Sessions whose requested reply has no queued chunk to begin at, each told once per request.

        Read after the inbox is applied: a chunk the session pushed with its request is queued by then, so
        only a session that counted chunks the engine had already decided (their decisions still on the way
        to it) is told.
        """
        waiting: list[tuple[SessionState, list[EngineEvent]]] = []
        for session in self.sessions.values():
            if session.requested_reply and not session.told_reply_waits and not session.conversation.audio_queue \
                    and session.conversation.phase is Phase.LISTENING:
                session.told_reply_waits = True
                waiting.append((session, [ReplyWaitsForAudio()]))
        return waiting

    @staticmethod
    def clear_audio(session: SessionState, keep_before: int = 0) -> list[EngineEvent]:
        """Drop the queued chunks but those the session pushed before its ``keep_before``-th (``ClearAudio``): the
        oldest ones, so the newest go. Between steps no chunk is in flight: a row's chunk leaves the queue at
        commit."""
        conversation = session.conversation
        queue = conversation.audio_queue
        queued = session.let_go_of_decided()
        kept = 0
        for chunk in queued:
            if chunk.number >= keep_before:
                break
            kept += 1
        dropped = len(queue) - kept
        for _ in range(dropped):
            queue.pop()
            if queued:
                queued.pop()
        # A pending request's audio was dropped with the rest: it answers the audio that comes next (the last kept
        # chunk when some are kept: the audio the client had committed).
        session.reply_due_chunk = min(session.reply_due_chunk, conversation.num_chunks_consumed + max(0, kept - 1))
        return [AudioCleared(dropped, kept)]

    # ---- the step ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The rows of the ready sessions that waited longest, within the step's bounds (``self.limits``)."""
        failures: list[Failure] = []
        now_s = self.clock()
        ready = [s for s in self.sessions.values() if s.conversation.is_ready and self._may_listen(s, now_s)]
        ready.sort(key=SessionState.waiting_since)  # stable: equal tickets keep the registry's order
        short, long = choose_rows(self._candidates(ready, failures), self.limits)
        chosen = {row.session_id: row for row in (*short, *long)}
        for session in ready:  # in the order they waited, so they keep it among themselves next time
            row = chosen.get(session.session_id)
            if row is None:
                continue
            session.last_row_ticket = self._ticket()  # it waits again from now, behind everyone waiting already
            if self.catch_up is not None and self.is_paced and row.is_decision:
                # _may_listen let it in, and a paced listening session leaves it with its credits counted.
                assert session.listen_credits is not None
                self.catch_up.spend(session.listen_credits, session.client_address, now_s)
        return StepPlan(tuple(tuple(batch) for batch in (short, long) if batch), tuple(failures))

    def _candidates(self, ready: list[SessionState], failures: list[Failure]) -> Iterator[Candidate[PlannedRow]]:
        """Each ready session's row, planned only when the policy asks for it; failed plans go to ``failures``."""
        for session in ready:
            try:
                plan = session.conversation.plan()
            except Exception as exc:  # ContextFull, or this session's state is broken: it alone ends
                failures.append(Failure(session, exc, PLAN_FAILED))
                continue
            row = PlannedRow(session.session_id, session.slot, plan, session.options.sampling, session.generator)
            yield Candidate(row, row.num_tokens, row.is_decision)

    def _may_listen(self, session: SessionState, now_s: float) -> bool:
        """Catch-up pacing (``catch_up.py``): a listening row waits while the session's backlog is heard faster
        than its burst and ``max_catch_up_speed`` allow. Replies are never paced."""
        pacing, credits = self.catch_up, session.listen_credits
        if pacing is None or credits is None or not self.is_paced or session.conversation.phase is not Phase.LISTENING:
            return True
        return pacing.may_listen(credits, session.client_address, now_s)

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
                # A request, and its cap, is consumed by the reply that starts here (before its first token); a reply
                # the model begins before the request is due is its own, and the request waits for its chunk.
                request = session.requested_reply if row.is_decision and token == T.TEXT_BEGIN and \
                    session.is_reply_due else None
                events.append((session, session.conversation.commit(row.plan, token, request)))
            except Exception as exc:
                failures.append(Failure(session, exc, COMMIT_FAILED))
                continue
            if request is not None:
                session.requested_reply = None
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
            if session.is_reply_due:
                token = T.TEXT_BEGIN
            elif session.options.reply_mode == "on_request":
                token = T.KEEP_SILENCE
        return token
