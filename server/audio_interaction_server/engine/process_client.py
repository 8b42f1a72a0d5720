"""A server front's client of the engine process: the same calls as ``Worker`` (``engine.client.EngineClient``).

Threading contract: the session calls and ``check_options`` may come from any thread (a lock guards the
command socket); events are delivered on the client's reader thread, which owns the event socket, sends
the heartbeats and watches the engine's (``EngineStatus``), to each session's ``emit`` exactly as the worker
thread delivers them in the thread transport. After ``send_in_loop_turns`` the session calls made on that event
loop's thread leave at the end of the loop's turn, together (``_send_turn``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import zmq

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.client import CannotServe, ModelSummary
from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.engine.commands import (
    CancelReply, ClearAudio, CloseSession, EmitFn, PushAudio, RequestReply, SessionCommand,
)
from audio_interaction_server.engine.events import (
    SHUTDOWN_MESSAGE, WORKER_FAILED_MESSAGE, EndCode, EngineEvent, SessionEnded, SessionStateSize, StepPath, StepStats,
)
from audio_interaction_server.engine.process import STOP_FLUSH_S, EngineProcess, process_has_ended
from audio_interaction_server.engine.prompt import PromptEncoder, SessionFit
from audio_interaction_server.engine.thread_name import name_native_thread
from audio_interaction_server.engine.wire import (
    ENGINE_QUIET_S, HEARTBEAT_S, KEEPALIVE_S, AddressCut, DetachEnded, EngineEndpoints, EngineFailedToLoad,
    EngineReady, EngineStatus, EvictDetached, Goodbye, Heartbeat, Hello, OpenRemote, SessionDetached, SessionEvents,
    Shutdown, decode, encode_batch, recv_frames, send_frames, stood_still_s,
)
# For the supervisor of several fronts (api/fronts.py), which reaches the engine's modules through this one.
from audio_interaction_server.engine.wire import make_socket_directory  # noqa: F401
from audio_interaction_server.options import SessionOptions

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# What a front sends the engine.
FrontMessage = (Hello | Heartbeat | Goodbye | Shutdown | OpenRemote | SessionCommand | SessionDetached
                | DetachEnded | AddressCut)


def engine_ended(status: int | None, log_hint: str | None = "its log says why") -> str:
    """How the engine process ended, for the operator's last line: ``exited with status 1 (its log says why)``, or
    the signal that killed it. A SIGKILL (status -9) is most often the kernel's out-of-memory killer, and a killed
    process logs nothing: "its log says why" sent the operator to a log without a word of it."""
    if status is None or status >= 0:
        return f"the engine process exited with status {status}" + (f" ({log_hint})" if log_hint else "")
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    if -status == signal.SIGKILL:
        return (f"the engine process was killed by {name} (status {status}; most often the kernel's out-of-memory "
                "killer, which `dmesg` or `journalctl -k` shows; it could log nothing)")
    return f"the engine process was killed by {name} (status {status})"


class EngineProcessClient:
    """The engine in another process, behind the same calls as ``Worker`` (``engine.client.EngineClient``).

    With ``process`` (the engine this front started), ``start`` starts it and ``stop`` stops it, and its end
    is watched; without, the client attaches to a running engine at ``endpoints`` (one of several fronts), and
    whoever started it says when it ends (``engine_ended``). Either way an engine silent for ``hang_timeout_s`` hangs,
    and is dead to this front; one silent for ``ENGINE_QUIET_S`` is not answering (``quiet_s``).
    """

    def __init__(self, endpoints: EngineEndpoints, process: EngineProcess | None = None,
                 hang_timeout_s: float = EngineConfig.model_fields["hang_timeout_s"].default) -> None:
        self.endpoints = endpoints
        self.process = process
        self.hang_timeout_s = hang_timeout_s
        # When the engine was last heard (the reader thread's, less any time this process itself stood still).
        self._heard_s = time.monotonic()
        self._is_quiet = False  # silent past ENGINE_QUIET_S, and said so in the log
        self._engine_pid: int | None = None  # from its EngineReady
        self.front_id = uuid.uuid4().bytes
        self.model: ModelSummary | None = None
        self.step_path: StepPath | None = None  # from its EngineReady
        self.config: EngineConfig | None = None
        self.failure: BaseException | None = None
        self.engine_status: EngineStatus | None = None  # the engine's latest heartbeat: its free slots
        self.num_admitted = 0  # sessions the front holds, opened here or not yet (set_num_admitted; in heartbeats)
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        # The engine gave a detached session's slot to a new session (reader thread): the front ends it.
        self.on_evicted: Callable[[str], None] | None = None
        # A front of the engine (this one too) cut a session for a flood (reader thread): refuse its address.
        self.on_address_cut: Callable[[str, float, float], None] | None = None  # address, until_s, cooldown_s
        self._context = zmq.Context()
        self._commands = self._socket(endpoints.commands)
        self._events = self._socket(endpoints.events)
        self._send_lock = threading.Lock()  # the command socket: session calls (any thread), heartbeats (reader)
        self._turn_loop: asyncio.AbstractEventLoop | None = None  # set by send_in_loop_turns
        self._turn_thread: int | None = None  # that loop's thread
        self._turn_commands: list[FrontMessage] = []  # session commands made on it this turn, leaving at its end
        self.num_messages_sent = 0  # to the engine, and the ZeroMQ sends that carried them (fewer: loop turns)
        self.num_sends = 0
        self._emits: dict[str, EmitFn] = {}  # open sessions of this front: where their events go
        self._states: dict[str, SessionStateSize] = {}  # what each holds, as of its latest events
        self._emits_lock = threading.Lock()  # held while registering an open and while failing every session
        self._fit: SessionFit | None = None  # once the engine has said what it serves
        self._reader: threading.Thread | None = None
        self._leaving = threading.Event()  # stop() began: the engine's end from now on is no failure
        self._stopping = threading.Event()  # the reader thread ends
        self._wake_read_end, self._wake_write_end = os.pipe()  # stop() wakes the reader's poll with a byte

    @classmethod
    def spawn(cls, checkpoint: Path, config: EngineConfig,
              setup_logging: Callable[[], None] | None = None,
              memory_trim_interval_s: float | None = None) -> EngineProcessClient:
        """A client of a new engine process (started by ``start``) that loads ``checkpoint`` with ``config``."""
        process = EngineProcess(checkpoint, config, setup_logging, memory_trim_interval_s=memory_trim_interval_s)
        return cls(process.endpoints, process, config.hang_timeout_s)

    def _socket(self, endpoint: str) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.front_id)
        sock.setsockopt(zmq.SNDHWM, 0)  # a command is never dropped nor blocks the event loop
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process (if this front owns one) and wait until it serves (the model load)."""
        if self.process is not None:
            self.process.start()
        try:
            ready = self._wait_ready()
            self._heard_s = time.monotonic()  # it just answered; not the construction's time, before its load
        except BaseException:
            if self.process is not None:  # it exits by itself once its answer is out
                self.process.join(STOP_FLUSH_S + 5.0)
            self._close_sockets()
            raise
        from audio_interaction_server.model.layout import load_tokenizer, resolve_files

        tokenizer = load_tokenizer(resolve_files(ready.checkpoint))
        self.model = ModelSummary(ready.name, ready.device, ready.dtype, tokenizer)
        self._engine_pid = ready.pid
        self.step_path = ready.step_path
        self.config = ready.config
        self._fit = SessionFit(PromptEncoder.for_engine(tokenizer, ready.config), ready.config)
        self._reader = threading.Thread(target=self._read_events, name="engine-client-reader", daemon=True)
        self._reader.start()

    @property
    def engine_pid(self) -> int | None:
        return self._engine_pid

    def _wait_ready(self) -> EngineReady:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        if self.process is not None:
            poller.register(self.process.sentinel, zmq.POLLIN)
        answer: EngineReady | None = None
        while True:
            if answer is None:
                self._send(Hello(os.getpid()))
            ready = dict(poller.poll(int(HEARTBEAT_S * 1000 * 5)))
            if self._events in ready:  # first: an engine that failed to load says why, then ends
                for message in decode(recv_frames(self._events)):
                    if isinstance(message, EngineReady):
                        answer = message
                    elif isinstance(message, EngineStatus):
                        self.engine_status = message
                    elif isinstance(message, EngineFailedToLoad):
                        raise message.error
                    elif isinstance(message, AddressCut):
                        # The cuts in force come with the answer to a hello: a front (re)started within one refuses
                        # the address from its first session on.
                        self._heard_address_cut(message)
            # Ready once the engine's free slots are known too (its status follows within HEARTBEAT_S): a front
            # of several weighs its agent and /ready by them from its first answer.
            if answer is not None and self.engine_status is not None:
                return answer
            if self.process is not None and self.process.sentinel in ready:
                status = self.process.ended_status()
                raise CannotServe(self.process.failure_reason()
                                  or f"{engine_ended(status, 'the server log says why')} before it served")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Leave the engine (stop it, if this front started it); sessions still open end with server_shutdown."""
        if self._leaving.is_set():
            return
        self._leaving.set()
        self._send(Shutdown() if self.process is not None else Goodbye())
        log.info("sent the engine %d messages in %d sends", self.num_messages_sent, self.num_sends)
        if self.process is not None:
            self.process.join(timeout_s)  # its last events (each open session's end) are sent before it exits
        self._stopping.set()
        if self._reader is not None:
            os.write(self._wake_write_end, b"\0")
            self._reader.join(timeout_s)
        with self._emits_lock:
            left = list(self._emits.items())
            self._emits.clear()
        for session_id, emit in left:
            self._deliver(session_id, emit, [SessionEnded(EndCode.SERVER_SHUTDOWN, SHUTDOWN_MESSAGE)])
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._send_lock:
            self._commands.close()
        self._events.close()
        self._context.term()
        if self._reader is None or not self._reader.is_alive():  # else it is left to the process's end
            os.close(self._wake_read_end)
            os.close(self._wake_write_end)

    @property
    def is_alive(self) -> bool:
        return (self.failure is None and self.model is not None and not self._leaving.is_set()
                and (self.process is None or self.process.exitcode is None))

    # ---- the session calls --------------------------------------------------------------------------------
    def open_session(self, session_id: str, options: SessionOptions, emit: EmitFn,
                     client_address: str | None = None) -> None:
        with self._emits_lock:
            if self.failure is None and not self._leaving.is_set():
                self._emits[session_id] = emit
                self._send(OpenRemote(session_id, options, client_address))
                return
        # As the Worker does after its death or its stop: the open is answered at once, so no client waits for
        # nothing.
        ended = SessionEnded(EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE) if self.failure is not None \
            else SessionEnded(EndCode.SERVER_SHUTDOWN, SHUTDOWN_MESSAGE)
        self._deliver(session_id, emit, [ended])

    def push_audio(self, session_id: str, mel_chunks: torch.Tensor | PaddedBlocks) -> None:
        """Queue (N, 128, 40) mel chunks or PaddedBlocks: one raw frame (a numpy array's buffer, out of band)."""
        self._send(PushAudio(session_id, mel_chunks if isinstance(mel_chunks, PaddedBlocks) else mel_chunks.numpy()))

    def cancel(self, session_id: str) -> None:
        self._send(CancelReply(session_id))

    def request_reply(self, session_id: str, max_turn_tokens: int | None = None) -> None:
        self._send(RequestReply(session_id, max_turn_tokens))

    def clear_audio(self, session_id: str, keep_before: int = 0) -> None:
        self._send(ClearAudio(session_id, keep_before))

    def close_session(self, session_id: str) -> None:
        self._send(CloseSession(session_id))

    def session_detached(self, session_id: str, since_s: float) -> None:
        """The session lost its client at ``since_s`` (``time.monotonic()``) and waits for a resume: the engine may
        give its slot to a new session of any front (``EvictDetached`` tells this front when it does)."""
        self._send(SessionDetached(session_id, since_s))

    def detach_ended(self, session_id: str) -> None:
        """The detached session was resumed, or it ended: its slot is no longer one to give away."""
        self._send(DetachEnded(session_id))

    def address_cut(self, address: str, until_s: float, cooldown_s: float) -> None:
        """This front cut a session of ``address`` for a flood, refusing it until ``until_s`` (``time.monotonic()``):
        every front of the engine is told (``AddressCut``)."""
        self._send(AddressCut(address, until_s, cooldown_s))

    def check_options(self, options: SessionOptions) -> None:
        """Raise ValueError if a session with these options could not run there (the engine's own check)."""
        assert self._fit is not None, "options checked before the engine served"
        self._fit.check(options)

    def checks_without_tokenising(self, system_prompt: str | None) -> bool:
        """Whether ``check_options`` with this system prompt finds its encoding kept (this front checked it)."""
        return self._fit is not None and self._fit.prompts.is_cached(system_prompt)

    def largest_turn_tokens(self, options: SessionOptions) -> int:
        """The largest ``max_turn_tokens`` ``check_options`` allows with these options' prompt."""
        assert self._fit is not None, "asked before the engine served"
        return self._fit.largest_turn_tokens(options)

    def state_size(self, session_id: str) -> SessionStateSize | None:
        """What the session held when its latest events left the engine (for monitoring)."""
        return self._states.get(session_id)

    def send_in_loop_turns(self) -> None:
        """Called on the running event loop that makes the session calls: from now on the session commands made on
        its thread wait for the end of the loop's turn (``call_soon``: after the rest of this turn's callbacks,
        before the loop polls again) and leave in one message. A ZeroMQ send costs the loop tens of microseconds
        whatever it carries, and a loaded loop reads many streams' audio in one turn, so the busier the front, the
        more chunks each send carries. Commands keep their order: the session commands of this front are made on
        the loop's thread; a control message sent there, and a goodbye or shutdown from any thread (the server
        stops its engine from a worker thread), first sends what the turn holds; heartbeats depend on nothing."""
        self._turn_loop = asyncio.get_running_loop()
        self._turn_thread = threading.get_ident()

    def _send(self, message: FrontMessage) -> None:
        on_turn_thread = threading.get_ident() == self._turn_thread
        if on_turn_thread and not isinstance(message, (Hello, Heartbeat, Goodbye, Shutdown)):
            self._hold_for_turn(message)
        elif on_turn_thread or isinstance(message, (Goodbye, Shutdown)):
            self._send_turn(then=message)
        else:
            with self._send_lock:
                self._write([message])

    def _hold_for_turn(self, message: FrontMessage) -> None:
        with self._send_lock:  # a goodbye from another thread may be taking the turn's commands
            self._turn_commands.append(message)
            is_first = len(self._turn_commands) == 1
        if is_first:
            assert self._turn_loop is not None
            try:
                self._turn_loop.call_soon(self._send_turn)
            except RuntimeError:  # the loop is closed: no turn will end, so the command goes now
                self._send_turn()

    def _send_turn(self, then: FrontMessage | None = None) -> None:
        """Send the session commands held for the loop's turn, and ``then`` after them, in one message."""
        with self._send_lock:
            messages, self._turn_commands = self._turn_commands, []
            if then is not None:
                messages.append(then)
            if messages:
                self._write(messages)

    def _write(self, messages: list[FrontMessage]) -> None:
        """One ZeroMQ message of ``messages``; the send lock is held."""
        if not self._commands.closed:
            send_frames(self._commands, encode_batch(messages))
            self.num_messages_sent += len(messages)
            self.num_sends += 1

    # ---- the reader thread --------------------------------------------------------------------------------
    def _read_events(self) -> None:
        name_native_thread("engine-events")  # its own row in top -H, py-spy and benchmarks.host_cost
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._wake_read_end, zmq.POLLIN)
        if self.process is not None:
            poller.register(self.process.sentinel, zmq.POLLIN)
        next_beat_s = 0.0
        while True:
            now_s = time.monotonic()
            if now_s >= next_beat_s:  # that it lives; a change of its sessions is told as it happens
                self._send_heartbeat()
                next_beat_s = now_s + KEEPALIVE_S
            asked_s = next_beat_s - now_s
            ready = dict(poller.poll(max(1, round(asked_s * 1000))))
            # At most HEARTBEAT_S of reading before the heartbeat is looked at again: a front that reads slower
            # than the engine sends (a busy process) would otherwise never get back to it, and the engine takes a
            # front that says nothing for FRONT_TIMEOUT_S for one that hangs.
            if self._events in ready and self._receive_waiting(budget_s=HEARTBEAT_S):
                self._heard_again()
            if self.process is not None and self.process.sentinel in ready:
                self._receive_waiting()  # what it sent before it ended comes first
                if not self._leaving.is_set():
                    self._engine_died(engine_ended(self.process.ended_status(), log_hint=None))
                return
            if self._stopping.is_set():
                self._receive_waiting()
                return
            if self.failure is not None:  # engine_ended: told by whoever watches its process
                return
            # A front that stood still (stopped, starved of CPU) wakes before it has read what the engine sent
            # meanwhile: that time is not the engine's silence, or a front stopped past its bound ends every session.
            awake_s = time.monotonic()
            self._heard_s = min(awake_s, self._heard_s + stood_still_s(awake_s - now_s, asked_s))
            silent_s = awake_s - self._heard_s
            if self._leaving.is_set() or silent_s <= ENGINE_QUIET_S:
                continue
            if self._engine_pid is not None and process_has_ended(self._engine_pid):
                # An engine this front did not start, and that nobody said had ended: its process is gone.
                self._engine_died(f"the engine process is gone: nothing heard from it for {silent_s:.1f} s, and "
                                  f"its process {self._engine_pid} has ended")
                return
            if silent_s > self.hang_timeout_s:
                # Its process lives (its end is seen at once), yet it has said nothing: it hangs.
                self._engine_died(f"the engine process hangs: nothing heard from it for {silent_s:.1f} s "
                                  f"(engine.hang_timeout_s {self.hang_timeout_s:g})")
                return
            if not self._is_quiet:
                self._is_quiet = True
                log.warning("the engine process has sent nothing for %.1f s: new sessions are refused until it "
                            "answers; its sessions end if it stays silent for %g s (engine.hang_timeout_s)",
                            silent_s, self.hang_timeout_s)

    def _heard_again(self) -> None:
        self._heard_s = time.monotonic()
        if self._is_quiet:
            self._is_quiet = False
            log.warning("the engine process answers again: new sessions are admitted")

    @property
    def quiet_s(self) -> float | None:
        """How long the engine has been silent, once the reader has found that past ``ENGINE_QUIET_S`` (None while
        it answers). The reader judges it, having taken out any time this process itself stood still: the loop's
        own look, right after such a pause, would take that time for the engine's silence."""
        return max(ENGINE_QUIET_S, time.monotonic() - self._heard_s) if self._is_quiet else None

    def set_num_admitted(self, num_sessions: int) -> None:
        """The front now holds ``num_sessions`` (admitted, opened here or not yet): told to the engine at once, which
        counts them against the slots every front shares (any thread)."""
        if num_sessions != self.num_admitted:
            self.num_admitted = num_sessions
            if self._reader is not None:
                self._send_heartbeat()

    def _send_heartbeat(self) -> None:
        """A heartbeat, unless the front is leaving: one sent after its goodbye (``stop`` runs on another thread)
        would make the engine count the front again, and the sessions it held, until FRONT_TIMEOUT_S."""
        with self._send_lock:  # stop() sets _leaving before it takes the lock to send its goodbye
            if not self._leaving.is_set():
                self._write([Heartbeat(self.num_admitted, os.getpid())])

    def _receive_waiting(self, budget_s: float | None = None) -> bool:
        """Deliver what has arrived, or what arrives within ``budget_s`` of reading (the rest stays queued); True if
        any of it says the engine works: its events, its steps, its status (which it sends only while its worker
        turns). A flood cut passed on, or an answer to a hello, comes from its command thread alone."""
        progressed = False
        until_s = None if budget_s is None else time.monotonic() + budget_s
        while until_s is None or time.monotonic() < until_s:
            try:
                frames = recv_frames(self._events, zmq.NOBLOCK)
            except zmq.Again:
                return progressed
            for message in decode(frames):
                progressed = progressed or isinstance(message, (SessionEvents, EngineStatus, StepStats))
                match message:
                    case SessionEvents(session_id=session_id, events=events, state=state):
                        if state is None:
                            self._states.pop(session_id, None)
                        else:
                            self._states[session_id] = state
                        self._dispatch(session_id, events)
                    case EngineStatus():
                        self.engine_status = message
                    case EvictDetached(session_id=session_id):
                        if self.on_evicted is not None:
                            self.on_evicted(session_id)
                    case AddressCut():
                        self._heard_address_cut(message)
                    case StepStats():
                        if self.on_step is not None:
                            self.on_step(message)
                    case EngineReady():
                        pass  # an answer to one of the hellos sent while the engine loaded
        return progressed

    def _heard_address_cut(self, cut: AddressCut) -> None:
        if self.on_address_cut is not None:
            self.on_address_cut(cut.address, cut.until_s, cut.cooldown_s)

    def _dispatch(self, session_id: str, events: list[EngineEvent]) -> None:
        if isinstance(events[-1], SessionEnded):
            self._states.pop(session_id, None)
        with self._emits_lock:
            emit = self._emits.get(session_id)
            if emit is not None and isinstance(events[-1], SessionEnded):
                del self._emits[session_id]
        if emit is not None:
            if not self._deliver(session_id, emit, events) and not isinstance(events[-1], SessionEnded):
                with self._emits_lock:  # as the Worker does: a session whose events cannot be delivered ends
                    self._emits.pop(session_id, None)
                self.close_session(session_id)

    def _deliver(self, session_id: str, emit: EmitFn, events: list[EngineEvent]) -> bool:
        try:
            emit(events)
            return True
        except Exception:
            log.exception("emit callback of session %s failed", session_id)
            return False

    def engine_ended(self, why: str) -> None:
        """Whoever watches the engine's process (the supervisor of several fronts) saw it end: fail now, rather than
        on its silence ``hang_timeout_s`` later (any thread). Nothing more it sent is read: it ended."""
        if not self._leaving.is_set():
            self._engine_died(why)

    def _engine_died(self, why: str) -> None:
        """The engine process ended unasked: end every session of this front as the dying worker thread does (once,
        whoever sees it first: the reader, or ``engine_ended``)."""
        error = RuntimeError(why)
        with self._emits_lock:
            if self.failure is not None:
                return
            self.failure = error
            left = list(self._emits.items())
            self._emits.clear()
        log.error("%s; every session is ended", error)
        for session_id, emit in left:
            self._deliver(session_id, emit, [SessionEnded(EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE)])
        if self.on_failure is not None:
            try:
                self.on_failure(error)
            except Exception:
                log.exception("the engine client's failure callback failed")
