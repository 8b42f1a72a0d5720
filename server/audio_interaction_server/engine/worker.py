"""The one worker that owns the model: the thread that steps every ready session in one batched step.

Threading contract: exactly one thread (the worker thread started by
``start()``, or the caller of ``step()``/``run_until_idle()`` when no thread is
started) touches the model, the KV cache and the conversations. Other threads
only call ``open_session``, ``push_audio``, ``cancel``, ``request_reply``,
``clear_audio``, ``close_session``; these post frozen commands
(``engine/commands.py``) that are applied between steps, never mid-step. Events
go out through each session's ``emit`` callback, called on the worker thread
with a list of events; the callback must be quick and must not call back into
blocking worker APIs.

A step is three calls: ``scheduler.schedule()`` (which sessions, which rows),
``runner.run(batch)`` (encode, forward, choose tokens), ``scheduler.update(batch,
result)`` (each session's events). This module adds what makes it a thread:
the inbox, failure isolation (a failing batch is retried row by row; a failure
in one session's own path ends that session alone), delivery and stop.

Live sessions push ``PaddedBlocks`` (16 kHz samples cut into chunk blocks), not
features: the chunks wait as blocks, and before each step the worker computes
the features of the chunk at the head of every queue in one batched call
(``engine/features.py``: on the CPU, bit-identical to the streaming front-end),
so audio that is never heard (a clear drops it, its session ends first) costs no
STFT. Commands are applied in their order, so a clear_audio posted after a push
drops that push's chunks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import torch

from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.spec import MIN_CHUNKS_BETWEEN_ROLLOVERS, chunks_between_rollovers
from audio_interaction_server.engine.client import ENGINE_QUIET_S
from audio_interaction_server.engine.commands import (
    CancelReply, ClearAudio, CloseSession, Command, EmitFn, OpenSession, PushAudio, RequestReply, Wake,
)
from audio_interaction_server.engine.conversation import ContextFull
from audio_interaction_server.engine.features import HeadFeatures, queued_blocks
from audio_interaction_server.engine.events import (
    SHUTDOWN_MESSAGE, WORKER_FAILED_MESSAGE, EndCode, EngineEvent, SessionEnded, SessionStarted, SessionStateSize,
    StepPath, StepStats,
)
from audio_interaction_server.engine.prompt import PromptEncoder, SessionFit
from audio_interaction_server.engine.runner import BatchResult, PlannedRow, RowResult, Runner
from audio_interaction_server.engine.static_path import StaticPath, choose_eager_attention, choose_step
from audio_interaction_server.engine.thread_name import name_native_thread
from audio_interaction_server.engine.scheduler import Failure, OpenRefused, Scheduler, SessionState, StepUpdate
from audio_interaction_server.model.checkpoint import LoadedModel
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.fit import check_kv_fits

log = logging.getLogger(__name__)

__all__ = ["EmitFn", "SessionStateSize", "StepStats", "WORKER_FAILED_MESSAGE", "Worker"]


def _failure(exc: BaseException, what: str) -> SessionEnded:
    """The end event of a session whose own path raised: a plain reason for the client, details in the log."""
    if isinstance(exc, FloatingPointError):
        return SessionEnded(EndCode.NUMERICAL_ERROR, f"{what}: the model produced non-finite values")
    return SessionEnded(EndCode.INTERNAL_ERROR, f"{what} (the server log says why)")


class Worker:
    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        check_kv_fits(model.lm, config.max_sessions, config.max_positions, config.kv_memory_fraction)
        self.step_choice = choose_step(config, model.device)
        cache = model.lm.new_cache(config.max_sessions, config.max_positions, scratch_slot=self.step_choice.static)
        self.max_batch_rows = config.max_batch_rows or config.max_sessions
        self.attention = choose_eager_attention(config.attention, self.step_choice, model, cache, self.max_batch_rows)
        if config.scripted_turns is not None:
            log.warning("scripted turns (%s): decisions and replies follow a benchmark schedule, not the model",
                        config.scripted_turns)
        between = chunks_between_rollovers(config.max_positions, SessionOptions().max_turn_tokens,
                                           config.rollover_window_positions)
        if between is not None and between < MIN_CHUNKS_BETWEEN_ROLLOVERS:
            log.warning("rollover_window_positions %d leaves room for about %d chunks between context rollovers at "
                        "max_positions %d (each re-feeds the window as a long row); a window of about half the "
                        "budget keeps them rare", config.rollover_window_positions, between, config.max_positions)
        encoder = AudioEncoder(model.encoder_tower, pad_to_buckets=config.encoder_batch_buckets)
        self.runner = Runner(model, cache, encoder,
                             StaticPath.build(self.step_choice, model, cache, encoder, self.max_batch_rows),
                             config.prefix_kv_positions)
        self.step_path = self.runner.static.describe() if self.runner.static is not None else StepPath(False)
        self.prompts = PromptEncoder.for_engine(model.tokenizer, config)
        self._fit = SessionFit(self.prompts, config)
        # The trained prompt's keys and values, before any session: the sessions starting at once after start-up
        # (a burst of clients at a replica's first /ready) all take the short first row.
        self.runner.keep_prefix(0, self.prompts.prefix(None))
        self.scheduler = Scheduler(config, self.max_batch_rows, self.prompts, self.runner.prepare_slot, time.monotonic)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        # Held while posting and while the dying worker sets ``failure`` and drains the inbox,
        # so every command is either drained (opens answered) or sees the failure.
        self._inbox_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_failure: Callable[[BaseException], None] | None = None  # called on the dying worker thread
        # When the step loop last turned (at least every 50 ms while it lives): a thread that hangs in a step (a
        # kernel that never returns, a deadlock in a library) stops here, while the threads around it go on.
        self.last_turn_s = time.monotonic()
        # The features of each queue's next chunk, and each live session's log-mel running maximum.
        self.features = HeadFeatures()

    engine_pid = None  # the engine runs in its caller's process (EngineClient.engine_pid)

    # ---- thread-safe API -------------------------------------------------
    def open_session(self, session_id: str, options: SessionOptions, emit: EmitFn,
                     client_address: str | None = None) -> None:
        """``client_address``: whose budget pays for the prompt's prefill (engine/prefill_budget.py); None: none."""
        self._post(OpenSession(session_id, options, emit, client_address))

    def push_audio(self, session_id: str, mel_chunks: torch.Tensor | PaddedBlocks) -> None:
        """Queue (N, 128, 40) mel chunks for the session, or the ``PaddedBlocks`` they are computed from; in order."""
        self._post(PushAudio(session_id, mel_chunks))

    def cancel(self, session_id: str) -> None:
        self._post(CancelReply(session_id))

    def request_reply(self, session_id: str, max_turn_tokens: int | None = None) -> None:
        """A reply (TEXT_BEGIN, whatever the model's logits say) at the last chunk the session has queued when the
        request is applied, or at its next chunk when none is (``Scheduler.request_reply``).

        Dropped (``ReplyRequestDropped``) while the session is replying; consumed by the reply it begins, capped at
        ``max_turn_tokens`` when that is below the session's cap. A reply the model begins of its own before that
        chunk does not consume it. With ``reply_mode="on_request"`` this is the only way the session ever replies.
        """
        self._post(RequestReply(session_id, max_turn_tokens))

    def clear_audio(self, session_id: str, keep_before: int = 0) -> None:
        """Drop the session's queued, not yet decided chunks but those it pushed before its ``keep_before``-th
        (``ClearAudio``); it gets ``AudioCleared(num_chunks, num_kept)``.

        Applied between steps: a chunk in the step running now is decided as usual.
        """
        self._post(ClearAudio(session_id, keep_before))

    def close_session(self, session_id: str) -> None:
        self._post(CloseSession(session_id))

    def end_session(self, session_id: str, error_code: EndCode, message: str) -> None:
        """End the session for a reason of the host's, which its ``SessionEnded`` gives (the engine process ends
        the sessions of a front gone silent)."""
        self._post(CloseSession(session_id, error_code, message))

    def send_in_loop_turns(self) -> None:
        """Nothing to batch: a command is a put on the worker's inbox (the engine process's client batches its
        sends per loop turn)."""

    def _post(self, command: Command) -> None:
        with self._inbox_lock:
            if self.failure is None and not self._stop.is_set():
                self._inbox.put(command)
                return
        self._refuse(command)

    def _refuse(self, command: Command) -> None:
        """After the worker died or stopped: an open is answered at once (``worker_failed``, ``server_shutdown``),
        so no client waits for a session that never starts; other commands have no session left to act on."""
        if isinstance(command, OpenSession):
            ended = (SessionEnded(EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE) if self.failure is not None
                     else SessionEnded(EndCode.SERVER_SHUTDOWN, SHUTDOWN_MESSAGE))
            self._refuse_open(command, ended)

    def check_options(self, options: SessionOptions) -> None:
        """Raise ValueError if a session with these options could not run here (callable from any thread)."""
        self._fit.check(options)

    def checks_without_tokenising(self, system_prompt: str | None) -> bool:
        """Whether ``check_options`` with this system prompt finds its encoding kept (callable from any thread)."""
        return self.prompts.is_cached(system_prompt)

    def largest_turn_tokens(self, options: SessionOptions) -> int:
        """The largest ``max_turn_tokens`` ``check_options`` allows with these options' prompt (any thread)."""
        return self._fit.largest_turn_tokens(options)

    def prompt_length(self, options: SessionOptions) -> int:
        """Tokens of the prefix a session with these options starts with (callable from any thread)."""
        return self._fit.prompt_length(options)

    def state_size(self, session_id: str) -> "SessionStateSize | None":
        """What one session holds right now (a racy read from other threads: for monitoring only)."""
        session = self.scheduler.sessions.get(session_id)
        if session is None:
            return None
        conv = session.conversation
        return SessionStateSize(conv.next_position, conv.history_tokens, conv.num_history_chunks,
                                len(conv.audio_queue), conv.num_rollovers)

    @property
    def num_sessions(self) -> int:
        return len(self.scheduler.sessions)

    @property
    def is_alive(self) -> bool:
        return self.failure is None and (self._thread is None or self._thread.is_alive())

    @property
    def quiet_s(self) -> float | None:
        """How long the step loop has not turned, once over ``ENGINE_QUIET_S`` (``EngineClient.quiet_s``): a worker
        thread that hangs in a step, or one step that long. Read from the event loop at admissions and readiness
        checks; the process transport judges it in the engine process (``engine/process.py``, ``WorkerStall``)."""
        if self._thread is None or not self._thread.is_alive():
            return None
        stalled_s = time.monotonic() - self.last_turn_s
        return stalled_s if stalled_s > ENGINE_QUIET_S else None

    @property
    def clock(self) -> Callable[[], float]:
        """Catch-up pacing's clock (monotonic seconds); tests set their own."""
        return self.scheduler.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.scheduler.clock = clock

    @property
    def cache(self):
        return self.runner.cache

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop stepping; sessions still open get a final ``SessionEnded(EndCode.SERVER_SHUTDOWN)``, and so do
        opens not applied yet and any posted from now on."""
        with self._inbox_lock:  # a command posted from now on is refused, not left in the inbox
            self._stop.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("model worker did not stop within %.1f s", timeout_s)
                return  # it still owns the sessions; touching them here would race
        for session in list(self.scheduler.sessions.values()):
            self._end(session, EndCode.SERVER_SHUTDOWN, SHUTDOWN_MESSAGE)
        while True:  # what the step loop left in the inbox
            try:
                self._refuse(self._inbox.get_nowait())
            except queue.Empty:
                break

    # ---- worker thread ---------------------------------------------------
    def _run(self) -> None:
        name_native_thread("model-worker")  # its own row in top -H, py-spy and benchmarks.host_cost
        try:
            while not self._stop.is_set():
                self.last_turn_s = time.monotonic()  # read on other threads: a worker that hangs stops here
                if self.step() is None:
                    self._apply_commands(block_s=0.05)
        except BaseException as exc:  # the worker must never die silently
            with self._inbox_lock:
                self.failure = exc
            log.exception("model worker died; every session is ended")
            for session in list(self.scheduler.sessions.values()):
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
        self.scheduler.is_paced = False
        try:
            while self.step() is not None:
                pass
        finally:
            self.scheduler.is_paced = True

    def step(self) -> StepStats | None:
        started = time.perf_counter()
        self._apply_commands()
        for session, events in self.scheduler.replies_waiting_for_audio():
            self._emit(session, events)
        self._end_failed(tuple(self.features.compute()))
        plan = self.scheduler.schedule()
        self._end_failed(plan.failures)
        if not plan.batches:
            return None
        results = []
        # Each batch is committed and emitted before the next runs: a neighbour's long row (a first row
        # with the whole system prompt, a rollover re-encoding its audio history) never holds back the
        # decisions of the short batch, so one session's backlog costs the others at most its own batch.
        for batch in plan.batches:
            result = self._run_isolated(batch)
            self._deliver(self.scheduler.update(batch, result))
            sessions = self.scheduler.sessions
            for row in batch:  # a chunk each of these heard left its queue: the next one's features are due
                if (ran := sessions.get(row.session_id)) is not None:
                    self.features.watch(ran)
            results.append(result)
        return self._stats(plan.rows, results, started)

    def _stats(self, rows: list[PlannedRow], results: list[BatchResult], started: float) -> StepStats:
        ran = [row for row, outcome in zip(rows, (r for result in results for r in result.rows))
               if outcome.error is None]
        stats = StepStats(
            num_rows=len(rows),
            num_decisions=sum(row.is_decision for row in ran),
            num_reply_tokens=sum(not row.is_decision for row in ran),
            num_tokens_fed=sum(row.num_tokens for row in rows),
            encode_s=sum(result.encode_s for result in results),
            forward_s=sum(result.forward_s for result in results),
            total_s=time.perf_counter() - started,
            prefixes_reused_total=self.scheduler.num_prefixes_reused,
            graph_steps_total=self.runner.counts.graph_steps,
            static_eager_steps_total=self.runner.counts.static_eager_steps,
            eager_batches_total=self.runner.counts.eager_batches,
        )
        if self.on_step is not None:
            self.on_step(stats)
        return stats

    def _run_isolated(self, batch: tuple[PlannedRow, ...]) -> BatchResult:
        """Run the rows in one batch; if that fails, run them one by one to isolate the culprit."""
        try:
            return self.runner.run(batch)
        except Exception as exc:
            if len(batch) == 1:
                return BatchResult((RowResult.failed(exc),), 0.0, 0.0)
            log.warning("batched step of %d rows failed (%r); retrying rows one by one", len(batch), exc)
        rows: list[RowResult] = []
        encode_s = forward_s = 0.0
        for row in batch:
            try:
                alone = self.runner.run((row,))
            except Exception as exc:
                rows.append(RowResult.failed(exc))
                continue
            rows += alone.rows
            encode_s, forward_s = encode_s + alone.encode_s, forward_s + alone.forward_s
        return BatchResult(tuple(rows), encode_s, forward_s)

    def _deliver(self, update: StepUpdate) -> None:
        self._end_failed(update.failures)
        for session, events in update.events:
            self._emit(session, events)

    def _apply_commands(self, block_s: float = 0.0) -> None:
        try:
            command = self._inbox.get(timeout=block_s) if block_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        commands = [command]
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for command in commands:
            self._apply(command)

    def _apply(self, command: Command) -> None:
        match command:
            case Wake():
                return
            case OpenSession():
                self._open(command)
                return
        session = self.scheduler.sessions.get(command.session_id)
        if session is None:
            return  # the session already ended; late commands are harmless
        try:
            match command:
                case PushAudio(mel_chunks=PaddedBlocks() as blocks):
                    self.scheduler.add_audio(session, queued_blocks(blocks))  # features once it is heard
                    self.features.watch(session)
                case PushAudio(mel_chunks=chunks):
                    self.scheduler.add_audio(session, chunks)
                case CancelReply():
                    self._emit(session, self.scheduler.cancel(session))
                case RequestReply(max_turn_tokens=max_turn_tokens):
                    self._emit(session, self.scheduler.request_reply(session, max_turn_tokens))
                case ClearAudio(keep_before=keep_before):
                    self._emit(session, self.scheduler.clear_audio(session, keep_before))
                case CloseSession(error_code=error_code, message=message):
                    self._end(session, error_code, message)
                case _:
                    raise TypeError(f"unknown command {command!r}")
        except Exception as exc:  # one session's bad state ends that session, never the worker
            self._fail(session, exc, f"{command.action} failed")

    def _open(self, command: OpenSession) -> None:
        try:
            session = self.scheduler.open(command.session_id, command.options, command.emit, command.client_address)
        except OpenRefused as refused:
            self._refuse_open(command, SessionEnded(refused.code, str(refused)))
            return
        except Exception as exc:  # e.g. options that skipped validation: this open fails, the worker goes on
            log.error("session %s failed to open", command.session_id, exc_info=exc)
            self._refuse_open(command, _failure(exc, "the session could not open"))
            return
        self._emit(session, [SessionStarted(session.slot, len(session.conversation.prefix_ids))])

    def _refuse_open(self, command: OpenSession, ended: SessionEnded) -> None:
        if command.session_id not in self.scheduler.sessions:  # not a refused duplicate of a live session
            self.features.forget(command.session_id)  # its first audio may have come with it
        try:
            command.emit([ended])
        except Exception:  # a callback that cannot deliver must not take the worker down with it
            log.exception("emit callback of session %s failed at open", command.session_id)

    def _end_failed(self, failures: tuple[Failure, ...]) -> None:
        for failure in failures:
            if isinstance(failure.error, ContextFull):  # an ordinary end of a session that used its budget
                self._end(failure.session, EndCode.CONTEXT_FULL, str(failure.error))
            else:
                self._fail(failure.session, failure.error, failure.what)

    def _fail(self, session: SessionState, exc: BaseException, what: str) -> None:
        """End one session after an exception in its own path; every other session goes on."""
        log.error("session %s: %s", session.session_id, what, exc_info=exc)
        ended = _failure(exc, what)
        self._end(session, ended.error_code, ended.message)

    def _emit(self, session: SessionState, events: list[EngineEvent]) -> None:
        if not events:
            return
        try:
            session.emit(events)
        except Exception:
            log.exception("emit callback of session %s failed; ending it", session.session_id)
            self._end(session, EndCode.INTERNAL_ERROR, "event delivery failed", notify=False)

    def _end(self, session: SessionState, error_code: EndCode | None, message: str, notify: bool = True) -> None:
        self.features.forget(session.session_id)
        events = self.scheduler.end(session, error_code, message)
        if events is None or not notify:
            return
        try:
            session.emit(events)
        except Exception:
            log.exception("emit callback of session %s failed at close", session.session_id)
