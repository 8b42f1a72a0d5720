"""The one worker that owns the model: every ready session advances in one batched step.

Threading contract: exactly one thread (the worker thread started by
``start()``, or the caller of ``step()``/``run_until_idle()`` when no thread is
started) touches the model, the KV cache and the conversations. Other threads
only call ``open_session``, ``push_audio``, ``cancel``, ``close_session``; these
enqueue commands that are applied between steps, never mid-step. Events go
out through each session's ``emit`` callback, called on the worker thread with
a list of events; the callback must be quick and must not call back into
blocking worker APIs.

A step: apply commands -> schedule ready sessions -> encode their audio chunks
in one encoder call -> one LM forward over all rows -> decide/sample ->
commit to each conversation -> emit.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from audio_interaction_server.model.fit import check_kv_fits, choose_attention
from audio_interaction_server.model.checkpoint import LoadedModel
from audio_interaction_server.config import EngineConfig, SessionOptions
from audio_interaction_server.engine.conversation import ContextFull, Conversation, Phase, RowPlan, check_room
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.lm import StepBatch
from audio_interaction_server.engine.events import EndCode, EngineEvent, SessionEnded, SessionStarted
from audio_interaction_server.tokens import CHUNK_S
from audio_interaction_server.engine.prompt import PromptEncoder
from audio_interaction_server.engine.sampling import DECISION_TOKENS, decide, sample
from audio_interaction_server.engine.scripted import scripted_token

log = logging.getLogger(__name__)
# What clients hear when the worker dies; the exception and its traceback go to the log only.
WORKER_FAILED_MESSAGE = "the model worker failed (the server log says why)"

EmitFn = Callable[[list[EngineEvent]], None]

# Rows longer than a listening block (a session's first row, a context rollover) run in a batch of their own.
LONG_ROW_TOKENS = 16


class _OptionsDoNotFit(Exception):
    """A session's options cannot run here (checked again at open: a client may skip ``check_options``)."""


def _failure(exc: BaseException, what: str) -> SessionEnded:
    """The end event of a session whose own path raised: a plain reason for the client, details in the log."""
    if isinstance(exc, FloatingPointError):
        return SessionEnded(EndCode.NUMERICAL_ERROR, f"{what}: the model produced non-finite values")
    return SessionEnded(EndCode.INTERNAL_ERROR, f"{what} (the server log says why)")


@dataclass
class _Session:
    session_id: str
    slot: int
    options: SessionOptions
    conversation: Conversation
    emit: EmitFn
    generator: torch.Generator | None
    listen_credits: float | None = None  # catch-up pacing: listening rows it may run now; None = a full burst
    credits_at_s: float = 0.0


@dataclass(frozen=True)
class StepStats:
    num_rows: int
    num_decisions: int
    num_reply_tokens: int
    num_tokens_fed: int
    encode_s: float
    forward_s: float
    total_s: float


@dataclass(frozen=True)
class SessionStateSize:
    positions: int  # KV-cache positions in use
    history_tokens: int  # tokens kept for a context rollover
    history_chunks: int  # audio chunks kept for a context rollover
    queued_chunks: int  # audio received but not yet consumed
    num_rollovers: int


@dataclass
class _Command:
    kind: str
    session_id: str
    payload: Any = None
    emit: EmitFn | None = None


@dataclass
class _Row:
    session: _Session
    plan: RowPlan
    token: int | None = None  # chosen on the device (decisions, greedy replies)
    logits: torch.Tensor | None = None  # kept only for rows sampled on the host
    is_finite: bool = False
    error: BaseException | None = None


class Worker:
    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.encoder = AudioEncoder(model.encoder_tower, pad_to_buckets=config.encoder_batch_buckets)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        check_kv_fits(model.lm, config.max_sessions, config.max_positions, config.kv_memory_fraction)
        self.cache = model.lm.new_cache(config.max_sessions, config.max_positions)
        self._decision_ids = torch.tensor(DECISION_TOKENS, device=model.device)
        self.max_batch_rows = config.max_batch_rows or config.max_sessions
        self.attention = choose_attention(config.attention, model.lm, self.cache, self.max_batch_rows)
        if config.scripted_turns is not None:
            log.warning("scripted turns (%s): decisions and replies follow a benchmark schedule, not the model",
                        config.scripted_turns)
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # Held while posting and while the dying worker sets ``failure`` and drains the inbox,
        # so every command is either drained (opens answered) or sees the failure.
        self._inbox_lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._free_slots = list(range(config.max_sessions - 1, -1, -1))  # pop() gives the lowest
        self._round_robin = 0
        self.clock: Callable[[], float] = time.monotonic  # catch-up pacing's clock (tests set their own)
        self._is_paced = True  # catch-up pacing applies (off inside run_until_idle)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_failure: Callable[[BaseException], None] | None = None  # called on the dying worker thread
        # Bounded: every distinct system prompt a client sends would otherwise stay in memory for good.
        self.prompts = PromptEncoder(model.tokenizer, config.prompt_cache_size, max_cached_tokens=config.max_positions)

    # ---- thread-safe API -------------------------------------------------
    def open_session(self, session_id: str, options: SessionOptions, emit: EmitFn) -> None:
        self._post(_Command("open", session_id, options, emit))

    def push_audio(self, session_id: str, mel_chunks: torch.Tensor) -> None:
        """Queue (N, 128, 40) mel chunks for the session, consumed in order."""
        self._post(_Command("audio", session_id, mel_chunks))

    def cancel(self, session_id: str) -> None:
        self._post(_Command("cancel", session_id))

    def close_session(self, session_id: str) -> None:
        self._post(_Command("close", session_id))

    def _post(self, command: _Command) -> None:
        with self._inbox_lock:
            if self.failure is None:
                self._inbox.put(command)
                return
        self._refuse(command)

    def _refuse(self, command: _Command) -> None:
        """After the worker died: an open is answered with ``worker_failed`` at once, so no client
        waits for a session that never starts; other commands have no session left to act on."""
        if command.kind == "open" and command.emit is not None:
            self._refuse_open(command, SessionEnded(EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE))

    def check_options(self, options: SessionOptions) -> None:
        """Raise ValueError if a session with these options could not run here (callable from any thread)."""
        check_room(self.prompt_length(options), options.max_turn_tokens, self.config.max_positions,
                   self.config.rollover_window_positions)

    def prompt_length(self, options: SessionOptions) -> int:
        """Tokens of the prefix a session with these options starts with (callable from any thread)."""
        return len(self.prompts.prefix(options.system_prompt))

    def state_size(self, session_id: str) -> "SessionStateSize | None":
        """What one session holds right now (a racy read from other threads: for monitoring only)."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        conv = session.conversation
        return SessionStateSize(conv.next_position, conv.history_tokens, conv.num_history_chunks,
                                len(conv.audio_queue), conv.num_rollovers)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def is_alive(self) -> bool:
        return self.failure is None and (self._thread is None or self._thread.is_alive())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop stepping; sessions still open get a final ``SessionEnded("server_shutdown")``."""
        self._stop.set()
        self._inbox.put(_Command("wake", ""))
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("model worker did not stop within %.1f s", timeout_s)
                return  # it still owns the sessions; touching them here would race
        for session in list(self._sessions.values()):
            self._end(session, EndCode.SERVER_SHUTDOWN, "the server is shutting down")

    # ---- worker thread ---------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.step() is None:
                    self._apply_commands(block_s=0.05)
        except BaseException as exc:  # the worker must never die silently
            with self._inbox_lock:
                self.failure = exc
            log.exception("model worker died; every session is ended")
            for session in list(self._sessions.values()):
                self._end(session, EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE)
            self._refuse_pending_opens()
            if self.on_failure is not None:
                try:
                    self.on_failure(exc)
                except Exception:
                    log.exception("the worker's failure callback failed")

    def _refuse_pending_opens(self) -> None:
        while True:
            try:
                self._refuse(self._inbox.get_nowait())
            except queue.Empty:
                return

    def run_until_idle(self) -> None:
        """Step until no session has work (synchronous mode, e.g. the offline CLI).

        Not paced (``max_catch_up_speed``): there is no real time to keep up with here, only the audio queued.
        """
        self._is_paced = False
        try:
            while self.step() is not None:
                pass
        finally:
            self._is_paced = True

    def step(self) -> StepStats | None:
        started = time.perf_counter()
        self._apply_commands()
        rows = self._plan_rows(self._schedule())
        if not rows:
            return None
        encode_s = forward_s = 0.0
        num_decisions = num_reply = 0
        # Each batch is committed and emitted before the next runs: a neighbour's long row (a first row
        # with the whole system prompt, a rollover re-encoding its audio history) never holds back the
        # decisions of the short batch, so one session's backlog costs the others at most its own batch.
        for batch in self._batches(rows):
            e, f = self._execute_isolated(batch)
            encode_s, forward_s = encode_s + e, forward_s + f
            for row in batch:
                if row.error is None and not row.is_finite:
                    row.error = FloatingPointError("non-finite logits")
                if row.error is not None:
                    self._fail(row.session, row.error, "the model step failed for this session")
                    continue
                num_decisions += row.plan.is_decision
                num_reply += not row.plan.is_decision
            self._commit(batch)
        stats = StepStats(
            num_rows=len(rows),
            num_decisions=num_decisions,
            num_reply_tokens=num_reply,
            num_tokens_fed=sum(len(r.plan.tokens) for r in rows),
            encode_s=encode_s,
            forward_s=forward_s,
            total_s=time.perf_counter() - started,
        )
        if self.on_step is not None:
            self.on_step(stats)
        return stats

    def _apply_commands(self, block_s: float = 0.0) -> None:
        try:
            command = self._inbox.get(timeout=block_s) if block_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: _Command) -> None:
        if command.kind == "wake":
            return
        if command.kind == "open":
            self._open(command)
            return
        session = self._sessions.get(command.session_id)
        if session is None:
            return  # the session already ended; late commands are harmless
        try:
            if command.kind == "audio":
                for chunk in command.payload:
                    session.conversation.add_audio(chunk)
            elif command.kind == "cancel":
                self._emit(session, session.conversation.cancel())
            elif command.kind == "close":
                self._end(session, None, "closed by the client")
        except Exception as exc:  # one session's bad state ends that session, never the worker
            self._fail(session, exc, f"{command.kind} failed")

    def _open(self, command: _Command) -> None:
        assert command.emit is not None
        options: SessionOptions = command.payload
        if command.session_id in self._sessions:
            self._refuse_open(command, SessionEnded(EndCode.DUPLICATE_SESSION,
                                                    f"session {command.session_id} is already open"))
            return
        if not self._free_slots:
            self._refuse_open(command, SessionEnded(EndCode.CAPACITY,
                                                    f"all {self.config.max_sessions} session slots are in use"))
            return
        slot = self._free_slots.pop()
        try:
            session = self._new_session(command, options, slot)
        except Exception as exc:  # e.g. options that skipped validation: this open fails, the worker goes on
            self._release_slot(slot)
            if isinstance(exc, _OptionsDoNotFit):
                ended = SessionEnded(EndCode.INVALID_OPTIONS, str(exc))  # our own words: which option, which limit
            else:
                log.error("session %s failed to open", command.session_id, exc_info=exc)
                ended = _failure(exc, "the session could not open")
            self._refuse_open(command, ended)
            return
        self._sessions[command.session_id] = session
        self._emit(session, [SessionStarted(slot, len(session.conversation.prefix_ids))])

    def _refuse_open(self, command: _Command, ended: SessionEnded) -> None:
        assert command.emit is not None
        try:
            command.emit([ended])
        except Exception:  # a callback that cannot deliver must not take the worker down with it
            log.exception("emit callback of session %s failed at open", command.session_id)

    def _new_session(self, command: _Command, options: SessionOptions, slot: int) -> _Session:
        self.cache.clear_slot(slot)
        try:  # the contract of both calls: ValueError = this prompt or turn cap cannot run in this budget
            prefix = self.prompts.prefix(options.system_prompt)
            conversation = Conversation(prefix, options.max_turn_tokens, self.config.max_positions,
                                        self.config.rollover_window_positions)
        except ValueError as exc:
            raise _OptionsDoNotFit(str(exc)) from exc
        generator = None
        if not options.sampling.is_greedy:
            generator = torch.Generator()
            seed = options.sampling.seed if options.sampling.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed)
        assert command.emit is not None
        return _Session(command.session_id, slot, options, conversation, command.emit, generator)

    def _release_slot(self, slot: int) -> None:
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)  # pop() gives the lowest

    def _schedule(self) -> list[_Session]:
        now_s = self.clock()
        ready = [s for s in self._sessions.values() if s.conversation.is_ready and self._may_listen(s, now_s)]
        if len(ready) > self.max_batch_rows:
            # More ready sessions than rows: rotate the start so nobody starves.
            start = self._round_robin % len(ready)
            self._round_robin += self.max_batch_rows
            ready = (ready[start:] + ready[:start])[: self.max_batch_rows]
        if self.config.max_catch_up_speed is not None and self._is_paced:
            for session in ready:
                if session.conversation.phase is Phase.LISTENING:
                    session.listen_credits -= 1.0
        return ready

    def _may_listen(self, session: _Session, now_s: float) -> bool:
        """Catch-up pacing: a token bucket of listening rows per session (replies are never paced).

        A session's audio backlog (queued while it spoke, or sent faster than real time) is heard at
        full speed up to ``catch_up_burst_s``; beyond that at ``max_catch_up_speed`` x real time. A
        client flooding audio would otherwise keep the worker, and with it the CPU, busy for every
        other session all the time: that is what made a real-time neighbour's decisions late.
        """
        speed = self.config.max_catch_up_speed
        if speed is None or not self._is_paced or session.conversation.phase is not Phase.LISTENING:
            return True
        burst = self.config.catch_up_burst_s / CHUNK_S
        if session.listen_credits is None:
            session.listen_credits = burst
        else:
            earned = (now_s - session.credits_at_s) * speed / CHUNK_S
            session.listen_credits = min(burst, session.listen_credits + earned)
        session.credits_at_s = now_s
        return session.listen_credits >= 1.0 - 1e-9

    def _plan_rows(self, sessions: list[_Session]) -> list[_Row]:
        rows = []
        for session in sessions:
            try:
                rows.append(_Row(session, session.conversation.plan()))
            except ContextFull as exc:
                self._end(session, EndCode.CONTEXT_FULL, str(exc))
            except Exception as exc:
                self._fail(session, exc, "planning its step failed")
        return rows

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Short rows (blocks, reply tokens) and long rows (first blocks, rollovers), as two batches.

        Rows are padded to the longest in their batch, so one 2,000-token rollover
        would otherwise make every 1-token reply row cost 2,000 tokens.
        """
        short = [r for r in rows if len(r.plan.tokens) <= LONG_ROW_TOKENS]
        long = [r for r in rows if len(r.plan.tokens) > LONG_ROW_TOKENS]
        return [batch for batch in (short, long) if batch]

    def _execute_isolated(self, rows: list[_Row]) -> tuple[float, float]:
        """Run the rows in one batch; if that fails, run them one by one to isolate the culprit."""
        try:
            return self._forward(rows)
        except Exception as exc:
            if len(rows) == 1:
                rows[0].error = exc
                return 0.0, 0.0
            log.warning("batched step of %d rows failed (%r); retrying rows one by one", len(rows), exc)
        encode_s = forward_s = 0.0
        for row in rows:
            try:
                e, f = self._forward([row])
                encode_s, forward_s = encode_s + e, forward_s + f
            except Exception as exc:
                row.error = exc
        return encode_s, forward_s

    def _forward(self, rows: list[_Row]) -> tuple[float, float]:
        device = self.model.device
        t0 = time.perf_counter()
        chunks = [chunk for r in rows for chunk in r.plan.audio]
        audio_embeds = None
        if chunks:
            # (N, 10, E) -> rows in the row-major order of the batch's audio mask.
            audio_embeds = self.encoder.encode(torch.stack(chunks)).flatten(0, 1)
        t1 = time.perf_counter()
        batch = StepBatch.build(
            rows=[r.plan.tokens for r in rows],
            start_positions=[r.plan.start_position for r in rows],
            slots=[r.session.slot for r in rows],
            audio_spans=[r.plan.audio_spans for r in rows],
            audio_embeds=audio_embeds,
            device=device,
        )
        lm = self.model.lm
        hidden = lm.last_hidden(batch, self.cache)  # (B, E)
        self._choose_tokens(rows, hidden)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1

    def _choose_tokens(self, rows: list[_Row], hidden: torch.Tensor) -> None:
        """Decisions, greedy reply tokens and finiteness for the whole batch, read back in one transfer.

        Listening rows need only the two decision logits; reply rows need the whole
        vocabulary. Only rows that sample with a temperature keep their logits.
        """
        lm = self.model.lm
        decision_index = [i for i, r in enumerate(rows) if r.plan.is_decision]
        reply_index = [i for i, r in enumerate(rows) if not r.plan.is_decision]
        on_device: list[torch.Tensor] = []
        if decision_index:
            logits = lm.logits(hidden[decision_index], self._decision_ids)  # (n, 2) fp32
            on_device += [decide(logits), torch.isfinite(logits).all(dim=-1)]
        if reply_index:
            logits = lm.logits(hidden[reply_index])  # (m, V) fp32
            on_device += [logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1)]
            for j, i in enumerate(reply_index):
                if not rows[i].session.options.sampling.is_greedy:
                    rows[i].logits = logits[j]
        values = torch.cat([t.to(torch.long) for t in on_device]).tolist()  # the step's one device->host sync
        offset = 0
        for index in (decision_index, reply_index):
            if not index:
                continue
            n = len(index)
            tokens, finite = values[offset:offset + n], values[offset + n:offset + 2 * n]
            offset += 2 * n
            for i, token, is_finite in zip(index, tokens, finite):
                rows[i].token, rows[i].is_finite = token, bool(is_finite)

    def _commit(self, rows: list[_Row]) -> None:
        live = [r for r in rows if r.error is None and r.session.session_id in self._sessions]
        # Decisions first, then reply tokens (each session has one row per step, so this is only tidiness).
        for row in sorted(live, key=lambda r: not r.plan.is_decision):
            try:
                token = self._chosen_token(row)
            except Exception as exc:  # this row's sampling failed: its session ends, the others commit
                self._fail(row.session, exc, "sampling failed")
                continue
            self._commit_one(row, token)

    def _chosen_token(self, row: _Row) -> int:
        token = row.token
        if row.logits is not None:
            token = sample(row.logits, row.session.options.sampling, row.session.generator)
        if token is None:
            raise RuntimeError("no token was chosen for this row")
        if self.config.scripted_turns is not None:
            token = scripted_token(self.config.scripted_turns, row.session.conversation, row.session.slot, token)
        return token

    def _commit_one(self, row: _Row, token_id: int) -> None:
        try:
            events = row.session.conversation.commit(row.plan, token_id)
        except Exception as exc:
            self._fail(row.session, exc, "session state error")
            return
        self._emit(row.session, events)

    def _fail(self, session: _Session, exc: BaseException, what: str) -> None:
        """End one session after an exception in its own path; every other session goes on."""
        log.error("session %s: %s", session.session_id, what, exc_info=exc)
        ended = _failure(exc, what)
        self._end(session, ended.error_code, ended.message)

    def _emit(self, session: _Session, events: list[EngineEvent]) -> None:
        if not events:
            return
        try:
            session.emit(events)
        except Exception:
            log.exception("emit callback of session %s failed; ending it", session.session_id)
            self._end(session, EndCode.INTERNAL_ERROR, "event delivery failed", notify=False)

    def _end(self, session: _Session, error_code: EndCode | None, message: str, notify: bool = True) -> None:
        if self._sessions.pop(session.session_id, None) is None:
            return
        # A reply cut by a normal close still gets its end event; after an error it does not.
        events: list[EngineEvent] = []
        if error_code is None:
            try:
                events = session.conversation.cancel("session_closed")
            except Exception:  # the close itself must not fail: the slot is freed, the client told
                log.exception("session %s: cancelling its reply at close failed", session.session_id)
        events.append(SessionEnded(error_code, message))
        self._release_slot(session.slot)
        if notify:
            try:
                session.emit(events)
            except Exception:
                log.exception("emit callback of session %s failed at close", session.session_id)
