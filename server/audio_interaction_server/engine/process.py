"""The engine in a process of its own, and a front's client of it, over ZeroMQ.

The engine process loads the model as the server would (``load_model``), runs the same ``Worker`` on its own
thread, and serves it over two ``ipc://`` sockets in a temporary directory:

* commands: each front's DEALER -> the engine's ROUTER. The typed commands (``engine/commands.py``, an open
  without its callback), pickled with protocol 5; a push's mel chunks travel out of band as a raw frame;
* events: the engine's ROUTER -> each front's DEALER, in batches: ``(session_id, events)`` pairs, exactly the
  lists the worker hands a session's ``emit``, and each step's ``StepStats``.

Both DEALERs of a front carry its front id as routing id, so the engine knows whose sessions are whose. Pickle,
not a schema'd format: both ends are our own code of one version, the messages are our frozen dataclasses, and
the bulk (mel chunks) goes as raw bytes either way.

Liveness, in both directions:

* the front watches the engine process's sentinel: when it ends unasked, every session of the front ends with
  ``worker_failed`` (as when the worker thread dies) and ``on_failure`` fires;
* the engine expects each front's heartbeat every ``HEARTBEAT_S``; a front silent for ``FRONT_TIMEOUT_S``
  (its process died, its client was dropped) has its sessions closed, so their slots are free within a second;
* the engine leaves when the process that started it is gone, so an engine never outlives its server.

Threading contract (front side): the session calls and ``check_options`` may come from any thread (a lock
guards the command socket); events are delivered on the client's reader thread, which owns the event socket
and sends the heartbeats. Engine side: the main thread reads commands and posts them to the worker; the worker
thread's ``emit`` only queues; one sender thread owns the event socket.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zmq

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.client import ModelSummary
from audio_interaction_server.engine.commands import (
    CancelReply, ClearAudio, CloseSession, EmitFn, PushAudio, RequestReply, SessionCommand,
)
from audio_interaction_server.engine.conversation import check_room
from audio_interaction_server.engine.events import EndCode, EngineEvent, SessionEnded
from audio_interaction_server.engine.prompt import PromptEncoder
from audio_interaction_server.engine.worker import WORKER_FAILED_MESSAGE, SessionStateSize, StepStats, Worker
from audio_interaction_server.options import SessionOptions

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1  # how often a front says it is alive
# A front silent this long is gone: its sessions are closed. Five missed beats, so a front briefly starved of
# CPU is not cut, and its slots are still free within a second of its end (the engine polls every POLL_S).
FRONT_TIMEOUT_S = 0.5
POLL_S = 0.1
STOP_FLUSH_S = 2.0  # how long a stopping engine waits for its last events to reach the fronts


# ---- what crosses the boundary ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineEndpoints:
    """Where an engine process listens; a front connects to both."""

    commands: str
    events: str

    @classmethod
    def in_directory(cls, directory: Path) -> EngineEndpoints:
        return cls(f"ipc://{directory}/commands", f"ipc://{directory}/events")


@dataclass(frozen=True)
class Hello:
    """A front asks to be served; answered with ``EngineReady`` (sent until one arrives: the event socket may
    still be connecting)."""


@dataclass(frozen=True)
class Heartbeat:
    """The front is alive (every ``HEARTBEAT_S``)."""


@dataclass(frozen=True)
class Goodbye:
    """The front leaves: its sessions are closed at once."""


@dataclass(frozen=True)
class Shutdown:
    """The front that started the engine stops it: open sessions end with ``server_shutdown``, then it exits."""


@dataclass(frozen=True)
class OpenRemote:
    """``OpenSession`` without its callback (a function cannot cross processes): the engine's ``emit`` for the
    session sends its events to the front the open came from."""

    session_id: str
    options: SessionOptions


@dataclass(frozen=True)
class EngineReady:
    """The engine's answer to ``Hello``: what the front needs to describe the model and check options."""

    checkpoint: Path  # the loaded directory: the front loads the same tokenizer from it
    name: str
    device: str
    dtype: str
    config: EngineConfig


@dataclass(frozen=True)
class EngineFailedToLoad:
    """The engine's answer to ``Hello`` when the model did not load: the loader's own exception, so the server
    says why exactly as it does with the engine on a thread."""

    error: BaseException


@dataclass(frozen=True)
class SessionEvents:
    session_id: str
    events: list[EngineEvent]
    state: SessionStateSize | None  # what the session holds as these events leave (the front's gauges)


def encode(message: Any) -> list[Any]:
    """``message`` as frames: a pickle, then its out-of-band buffers (numpy arrays' memory, not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    return [header, *buffers]


def decode(frames: list[zmq.Frame]) -> Any:
    """What ``encode`` made, from frames received with ``copy=False``; arrays read the frames' memory."""
    return pickle.loads(frames[0].buffer, buffers=[frame.buffer for frame in frames[1:]])


# ---- the engine process ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSpec:
    """Everything the spawned engine process is started with (pickled to it)."""

    checkpoint: Path
    config: EngineConfig
    endpoints: EngineEndpoints
    parent_pid: int
    setup_logging: Callable[[], None] | None = None  # the server's log set-up, run first in the new process


class EngineProcess:
    """The engine's process, as the front that starts it holds it."""

    def __init__(self, checkpoint: Path, config: EngineConfig, setup_logging: Callable[[], None] | None = None,
                 directory: Path | None = None) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="ais-engine-"))
        self.endpoints = EngineEndpoints.in_directory(self.directory)
        self._owns_directory = directory is None
        spec = EngineSpec(Path(checkpoint), config, self.endpoints, os.getpid(), setup_logging)
        # spawn, not fork: the front has threads (uvicorn, the loader) and maybe CUDA, which a fork cannot copy.
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine, args=(spec,), name="ais-engine", daemon=True)

    def start(self) -> None:
        self.process.start()
        # Before multiprocessing's own exit handler, which would wait for ever on an engine that ignores SIGTERM:
        # a server leaving without stopping its engine (an error on the way out) kills it.
        atexit.register(self._kill_at_exit)
        log.info("engine process %d started (%s)", self.process.pid, self.endpoints.commands)

    def _kill_at_exit(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process has ended."""
        return self.process.sentinel

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def ended_status(self) -> int | None:
        """The exit status once the sentinel said it ended (reaping it may take a moment after that)."""
        self.process.join(1.0)
        return self.process.exitcode

    def join(self, timeout_s: float) -> None:
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.error("engine process %d did not stop within %.1f s; killing it", self.process.pid, timeout_s)
            self.process.kill()
            self.process.join(5.0)
        atexit.unregister(self._kill_at_exit)
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def run_engine(spec: EngineSpec) -> None:
    """The engine process's main: load, serve until told to stop or orphaned, exit 0 (stopped) or 1 (failed)."""
    if spec.setup_logging is not None:
        spec.setup_logging()
    # Ctrl-C in a terminal, ``kill -TERM -PGID`` and systemd's stop (KillMode=control-group) signal every process
    # of the server: the engine must outlive the server's drain, and is stopped by it (``Shutdown``), by its
    # parent's end, or by the parent's exit handler (``EngineProcess.start``).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from audio_interaction_server.model.checkpoint import load_model

    context = zmq.Context()
    host = EngineHost(context, spec)
    try:
        model = load_model(spec.checkpoint, spec.config.device, spec.config.dtype)
        worker = Worker(model, spec.config)
    except Exception as error:
        log.exception("the engine process could not load the model")
        host.answer_hellos(EngineFailedToLoad(error))
        host.close()
        sys.exit(1)
    ready = EngineReady(model.files.root, model.name, str(model.device), str(model.dtype).removeprefix("torch."),
                        spec.config)
    status = host.serve(worker, ready)
    host.close()
    sys.exit(status)


@dataclass
class _Front:
    last_seen_s: float
    sessions: set[str] = field(default_factory=set)


class EngineHost:
    """The engine process's side of the sockets: commands in, the worker's events out, fronts watched."""

    def __init__(self, context: zmq.Context, spec: EngineSpec) -> None:
        self.spec = spec
        self.commands = context.socket(zmq.ROUTER)
        self.commands.setsockopt(zmq.RCVHWM, 0)  # never drop a command: audio a session accepted must arrive
        self.commands.bind(spec.endpoints.commands)
        self.events = context.socket(zmq.ROUTER)
        self.events.setsockopt(zmq.SNDHWM, 0)  # never drop an event: a silent front is cut by its heartbeat
        self.events.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a front not (yet) connected raises, not drops silently
        self.events.setsockopt(zmq.LINGER, int(STOP_FLUSH_S * 1000))
        self.events.bind(spec.endpoints.events)
        self.fronts: dict[bytes, _Front] = {}
        self._fronts_lock = threading.Lock()  # the worker thread's emits end sessions; the main thread opens them
        self._outbox: queue.SimpleQueue[tuple[bytes | None, Any] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-sender", daemon=True)
        self._worker_failed = threading.Event()
        self._worker: Worker | None = None

    def answer_hellos(self, answer: EngineFailedToLoad) -> None:
        """Answer every front that has said hello by now (the one that started the engine said it first)."""
        self._sender.start()
        try:
            pickle.dumps(answer)
        except Exception:  # an exception that does not pickle still tells its type and text
            answer = EngineFailedToLoad(RuntimeError(f"{type(answer.error).__name__}: {answer.error}"))
        while True:
            try:
                frames = self.commands.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if isinstance(decode(frames[1:]), Hello):
                self._outbox.put((frames[0].bytes, answer))

    def serve(self, worker: Worker, ready: EngineReady) -> int:
        self._worker = worker
        worker.on_step = lambda stats: self._outbox.put((None, stats))
        worker.on_failure = lambda error: self._worker_failed.set()
        self._sender.start()
        worker.start()
        log.info("engine process %d serving %s on %s", os.getpid(), ready.name, ready.device)
        status = self._serve_commands(worker, ready)
        worker.stop()  # sessions still open end with server_shutdown; their events are queued before this returns
        return status

    def _serve_commands(self, worker: Worker, ready: EngineReady) -> int:
        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        while True:
            if self._worker_failed.is_set():
                return 1  # the worker ended every session with worker_failed; the fronts see this process end
            if os.getppid() != self.spec.parent_pid:
                log.error("the server process that started the engine is gone; the engine stops")
                return 1
            if poller.poll(int(POLL_S * 1000)):
                while True:
                    try:
                        frames = self.commands.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if self._apply(worker, ready, frames[0].bytes, decode(frames[1:])):
                        return 0
            self._expire_fronts(worker)

    def _apply(self, worker: Worker, ready: EngineReady, front_id: bytes, message: Any) -> bool:
        """Apply one front's message; True when the engine is told to stop."""
        with self._fronts_lock:
            front = self.fronts.get(front_id)
            if front is None:
                front = self.fronts[front_id] = _Front(time.monotonic())
            front.last_seen_s = time.monotonic()
        match message:
            case Heartbeat():
                pass
            case Hello():
                self._outbox.put((front_id, ready))
            case OpenRemote(session_id=session_id, options=options):
                with self._fronts_lock:
                    front.sessions.add(session_id)
                worker.open_session(session_id, options, functools.partial(self._emit, front_id, session_id))
            case PushAudio(session_id=session_id, mel_chunks=chunks):
                worker.push_audio(session_id, torch.from_numpy(np.array(chunks)))  # a copy the worker may own
            case CancelReply(session_id=session_id):
                worker.cancel(session_id)
            case RequestReply(session_id=session_id):
                worker.request_reply(session_id)
            case ClearAudio(session_id=session_id):
                worker.clear_audio(session_id)
            case CloseSession(session_id=session_id):
                worker.close_session(session_id)
            case Goodbye():
                self._drop_front(worker, front_id, "it left")
            case Shutdown():
                return True
            case _:
                log.error("front %s sent an unknown message %r", front_id.hex(), type(message).__name__)
        return False

    def _expire_fronts(self, worker: Worker) -> None:
        now_s = time.monotonic()
        with self._fronts_lock:
            silent = [front_id for front_id, front in self.fronts.items()
                      if now_s - front.last_seen_s > FRONT_TIMEOUT_S]
        for front_id in silent:
            self._drop_front(worker, front_id, f"no heartbeat for {FRONT_TIMEOUT_S:g} s")

    def _drop_front(self, worker: Worker, front_id: bytes, why: str) -> None:
        with self._fronts_lock:
            front = self.fronts.pop(front_id, None)
        if front is None:
            return
        if front.sessions:
            log.warning("front %s is gone (%s): closing its %d session(s)", front_id.hex(), why, len(front.sessions))
        for session_id in front.sessions:
            worker.close_session(session_id)

    def _emit(self, front_id: bytes, session_id: str, events: list[EngineEvent]) -> None:
        """The worker thread's ``emit`` of one session: queued for the sender, never blocking the step."""
        # Read here, on the worker thread between steps, the session's figures are exact, not a racy read.
        state = self._worker.state_size(session_id) if self._worker is not None else None
        if isinstance(events[-1], SessionEnded):
            with self._fronts_lock:
                front = self.fronts.get(front_id)
                if front is not None:
                    front.sessions.discard(session_id)
        self._outbox.put((front_id, SessionEvents(session_id, events, state)))

    def _send_loop(self) -> None:
        """Send what the worker queued, one message per front for all that waits (a step's events together)."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            waiting = [item]
            while True:
                try:
                    more = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._send(waiting)
                    return
                waiting.append(more)
            self._send(waiting)

    def _send(self, waiting: list[tuple[bytes | None, Any]]) -> None:
        with self._fronts_lock:
            everyone = list(self.fronts)
        per_front: dict[bytes, list[Any]] = {}
        for front_id, message in waiting:
            for target in everyone if front_id is None else [front_id]:  # step figures go to every front
                per_front.setdefault(target, []).append(message)
        for front_id, messages in per_front.items():
            try:
                self.events.send_multipart([front_id, *encode(messages)], copy=False)
            except zmq.ZMQError as error:  # not connected (yet, or any more): its heartbeat decides its fate
                log.debug("events for front %s not sent: %s", front_id.hex(), error)

    def close(self) -> None:
        if self._sender.is_alive():
            self._outbox.put(None)
            self._sender.join(STOP_FLUSH_S)
        self.commands.close(linger=0)
        self.events.close()  # lingers up to STOP_FLUSH_S for the last events
        self.events.context.term()


# ---- a front's client ---------------------------------------------------------------------------------------

class EngineProcessClient:
    """The engine in another process, behind the same calls as ``Worker`` (``engine.client.EngineClient``).

    With ``process`` (the engine this front started), ``start`` starts it and ``stop`` stops it, and its end
    is watched; without, the client attaches to a running engine at ``endpoints``.
    """

    def __init__(self, endpoints: EngineEndpoints, process: EngineProcess | None = None) -> None:
        self.endpoints = endpoints
        self.process = process
        self.front_id = uuid.uuid4().bytes
        self.model: ModelSummary | None = None
        self.config: EngineConfig | None = None
        self.failure: BaseException | None = None
        self.on_step: Callable[[StepStats], None] | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._context = zmq.Context()
        self._commands = self._socket(endpoints.commands)
        self._events = self._socket(endpoints.events)
        self._send_lock = threading.Lock()  # the command socket: session calls (any thread), heartbeats (reader)
        self._emits: dict[str, EmitFn] = {}  # open sessions of this front: where their events go
        self._states: dict[str, SessionStateSize] = {}  # what each holds, as of its latest events
        self._emits_lock = threading.Lock()  # held while registering an open and while failing every session
        self._prompts: PromptEncoder | None = None
        self._reader: threading.Thread | None = None
        self._leaving = threading.Event()  # stop() began: the engine's end from now on is no failure
        self._stopping = threading.Event()  # the reader thread ends

    @classmethod
    def spawn(cls, checkpoint: Path, config: EngineConfig,
              setup_logging: Callable[[], None] | None = None) -> EngineProcessClient:
        """A client of a new engine process (started by ``start``) that loads ``checkpoint`` with ``config``."""
        process = EngineProcess(checkpoint, config, setup_logging)
        return cls(process.endpoints, process)

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
        except BaseException:
            if self.process is not None:  # it exits by itself once its answer is out
                self.process.join(STOP_FLUSH_S + 5.0)
            self._close_sockets()
            raise
        from audio_interaction_server.model.checkpoint import load_tokenizer, resolve_files

        tokenizer = load_tokenizer(resolve_files(ready.checkpoint))
        self.model = ModelSummary(ready.name, torch.device(ready.device), getattr(torch, ready.dtype), tokenizer)
        self.config = ready.config
        self._prompts = PromptEncoder(tokenizer, ready.config.prompt_cache_size,
                                      max_cached_tokens=ready.config.max_positions)
        self._reader = threading.Thread(target=self._read_events, name="engine-client-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> EngineReady:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        if self.process is not None:
            poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            self._send(Hello())
            ready = dict(poller.poll(int(HEARTBEAT_S * 1000 * 5)))
            if self.process is not None and self.process.sentinel in ready:
                raise RuntimeError(f"the engine process exited with status {self.process.ended_status()} before it "
                                   "served (the server log says why)")
            if self._events in ready:
                for message in decode(self._events.recv_multipart(copy=False)):
                    if isinstance(message, EngineReady):
                        return message
                    if isinstance(message, EngineFailedToLoad):
                        raise message.error

    def stop(self, timeout_s: float = 10.0) -> None:
        """Leave the engine (stop it, if this front started it); sessions still open end with server_shutdown."""
        if self._leaving.is_set():
            return
        self._leaving.set()
        self._send(Shutdown() if self.process is not None else Goodbye())
        if self.process is not None:
            self.process.join(timeout_s)  # its last events (each open session's end) are sent before it exits
        self._stopping.set()
        if self._reader is not None:
            self._reader.join(timeout_s)
        with self._emits_lock:
            left = list(self._emits.items())
            self._emits.clear()
        for session_id, emit in left:
            self._deliver(session_id, emit, [SessionEnded(EndCode.SERVER_SHUTDOWN, "the server is shutting down")])
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._send_lock:
            self._commands.close()
        self._events.close()
        self._context.term()

    @property
    def is_alive(self) -> bool:
        return (self.failure is None and self.model is not None and not self._leaving.is_set()
                and (self.process is None or self.process.exitcode is None))

    # ---- the session calls --------------------------------------------------------------------------------
    def open_session(self, session_id: str, options: SessionOptions, emit: EmitFn) -> None:
        with self._emits_lock:
            if self.failure is None:
                self._emits[session_id] = emit
                self._send(OpenRemote(session_id, options))
                return
        # As the Worker does after its death: the open is answered at once, so no client waits for nothing.
        self._deliver(session_id, emit, [SessionEnded(EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE)])

    def push_audio(self, session_id: str, mel_chunks: torch.Tensor) -> None:
        """Queue (N, 128, 40) mel chunks; they cross as one raw frame (a numpy array's buffer, out of band)."""
        self._send(PushAudio(session_id, mel_chunks.numpy()))

    def cancel(self, session_id: str) -> None:
        self._send(CancelReply(session_id))

    def request_reply(self, session_id: str) -> None:
        self._send(RequestReply(session_id))

    def clear_audio(self, session_id: str) -> None:
        self._send(ClearAudio(session_id))

    def close_session(self, session_id: str) -> None:
        self._send(CloseSession(session_id))

    def check_options(self, options: SessionOptions) -> None:
        """Raise ValueError if a session with these options could not run there (the engine's own check)."""
        assert self._prompts is not None and self.config is not None, "options checked before the engine served"
        check_room(len(self._prompts.prefix(options.system_prompt)), options.max_turn_tokens,
                   self.config.max_positions, self.config.rollover_window_positions)

    def state_size(self, session_id: str) -> SessionStateSize | None:
        """What the session held when its latest events left the engine (for monitoring)."""
        return self._states.get(session_id)

    def _send(self, message: Hello | Heartbeat | Goodbye | Shutdown | OpenRemote | SessionCommand) -> None:
        with self._send_lock:
            if not self._commands.closed:
                self._commands.send_multipart(encode(message), copy=False)

    # ---- the reader thread --------------------------------------------------------------------------------
    def _read_events(self) -> None:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        if self.process is not None:
            poller.register(self.process.sentinel, zmq.POLLIN)
        next_beat_s = 0.0
        while True:
            now_s = time.monotonic()
            if now_s >= next_beat_s:
                self._send(Heartbeat())
                next_beat_s = now_s + HEARTBEAT_S
            ready = dict(poller.poll(int(HEARTBEAT_S * 1000)))
            if self._events in ready:
                self._receive_waiting()
            if self.process is not None and self.process.sentinel in ready:
                self._receive_waiting()  # what it sent before it ended comes first
                if not self._leaving.is_set():
                    self._engine_died()
                return
            if self._stopping.is_set():
                self._receive_waiting()
                return

    def _receive_waiting(self) -> None:
        while True:
            try:
                frames = self._events.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            for message in decode(frames):
                match message:
                    case SessionEvents(session_id=session_id, events=events, state=state):
                        if state is None:
                            self._states.pop(session_id, None)
                        else:
                            self._states[session_id] = state
                        self._dispatch(session_id, events)
                    case StepStats():
                        if self.on_step is not None:
                            self.on_step(message)
                    case EngineReady():
                        pass  # an answer to one of the hellos sent while the engine loaded

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

    def _engine_died(self) -> None:
        """The engine process ended unasked: end every session of this front as the dying worker thread does."""
        assert self.process is not None
        error = RuntimeError(f"the engine process exited with status {self.process.ended_status()}")
        with self._emits_lock:
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
