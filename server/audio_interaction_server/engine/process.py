"""The engine in a process of its own: it loads the model as the server would and serves the same ``Worker``.

The process that starts it holds an ``EngineProcess``: a server's one front, or the supervisor of
``serve --fronts N`` (``api/fronts.py``). Every front reaches it through ``process_client.EngineProcessClient``
(what crosses: ``engine/wire.py``), with its own front id. Liveness:

* the engine sends every front an ``EngineStatus`` (its free slots) as it changes and every ``KEEPALIVE_S``; a
  front that sees its process end (it started the engine, or the supervisor says so), or hears nothing for
  ``engine.hang_timeout_s`` (it hangs), ends every session with ``worker_failed`` (as when the worker thread dies)
  and ``on_failure`` fires; a silence of ``ENGINE_QUIET_S`` only pauses its new sessions. The status goes out only
  while the worker's step loop turns (``WorkerStall``): a worker thread that hangs silences the engine as a hung
  process would, and past ``engine.hang_timeout_s`` the engine process exits;
* the engine watches each front's process (its pid comes with its ``Hello``): a front whose process ended has
  its sessions closed at the next poll, so their slots are free within a second; a front that says nothing for
  ``FRONT_TIMEOUT_S`` (stopped, its client dropped) has them closed too;
* the engine leaves when the process that started it is gone, so an engine never outlives its server.

Threading contract: the main thread reads commands and posts them to the worker (whose API is thread-safe);
the worker thread's ``emit`` only queues; one sender thread owns the event socket.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zmq

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.engine.client import dtype_name
from audio_interaction_server.engine.commands import CancelReply, ClearAudio, CloseSession, PushAudio, RequestReply
from audio_interaction_server.engine.events import EndCode, EngineEvent, SessionEnded
from audio_interaction_server.engine.thread_name import name_native_thread
from audio_interaction_server.engine.wire import (
    ENGINE_QUIET_S, FRONT_TIMEOUT_S, HEARTBEAT_S, KEEPALIVE_S, AddressCut, DetachEnded, EngineEndpoints,
    EngineFailedToLoad, EngineReady, EngineStatus, EvictDetached, Goodbye, Heartbeat, Hello, OpenRemote,
    STOOD_STILL_S, SessionDetached, SessionEvents, Shutdown, decode_batch, encode, make_socket_directory,
    recv_frames, send_frames, stood_still_s,
)

# The front side of this module (EngineProcess, which a front imports to start or watch the engine) needs neither
# torch nor the worker: the engine's side imports them where it runs (run_engine, EngineHost).
if TYPE_CHECKING:
    from audio_interaction_server.engine.worker import Worker

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the engine looks at its parent and its fronts (their processes, their heartbeats)
STOP_FLUSH_S = 2.0  # how long a stopping engine waits for its last events to reach the fronts
MAX_CUTS_KEPT = 65_536  # flood cuts remembered for fronts that start later, the oldest forgotten first (as a front's)


@dataclass(frozen=True)
class EngineSpec:
    """Everything the spawned engine process is started with (pickled to it)."""

    checkpoint: Path
    config: EngineConfig
    endpoints: EngineEndpoints
    parent_pid: int
    setup_logging: Callable[[], None] | None = None  # the server's log set-up, run first in the new process
    # The write end of a pipe to the process that started it: why the model could not be loaded, in one line, for
    # its starter to say last (a supervisor of several fronts ends the tree with it).
    failure_report: Connection | None = None
    # The server's memory_trim_interval_s: the engine process trims its own heap this often (None: never). The
    # front's trim (api/runtime.py) reaches only the front's process, and the mel chunks, histories and queued
    # audio the trim is for live here when the engine has a process of its own (the default on CUDA).
    memory_trim_interval_s: float | None = None


class EngineProcess:
    """The engine's process, as the front that starts it holds it."""

    def __init__(self, checkpoint: Path, config: EngineConfig, setup_logging: Callable[[], None] | None = None,
                 directory: Path | None = None, memory_trim_interval_s: float | None = None) -> None:
        self.directory = directory or make_socket_directory()
        self.endpoints = EngineEndpoints.in_directory(self.directory)
        self._owns_directory = directory is None
        self._failure_report, failure_report = multiprocessing.get_context("spawn").Pipe(duplex=False)
        self._failure_report_sender: Connection | None = failure_report
        self._failure_reason: str | None = None
        spec = EngineSpec(Path(checkpoint), config, self.endpoints, os.getpid(), setup_logging, failure_report,
                          memory_trim_interval_s)
        # spawn, not fork: the front has threads (uvicorn, the loader) and maybe CUDA, which a fork cannot copy.
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine, args=(spec,), name="ais-engine", daemon=True)

    def start(self) -> None:
        self.process.start()
        if self._failure_report_sender is not None:
            self._failure_report_sender.close()  # the engine holds the write end now
            self._failure_report_sender = None
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

    def failure_reason(self) -> str | None:
        """Why the engine could not load the model, once it said so (as it exits 1); else None. Kept once read."""
        if self._failure_reason is None and not self._failure_report.closed:
            try:
                if self._failure_report.poll():
                    self._failure_reason = str(self._failure_report.recv())
            except (EOFError, OSError):
                pass  # it ended without a word
        return self._failure_reason

    def ended_status(self) -> int | None:
        """The exit status once the sentinel said it ended (reaping it may take a moment after that)."""
        self.process.join(1.0)
        return self.process.exitcode

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the engine to stop (open sessions end with ``server_shutdown``) and wait for it, as ``join``; for
        a starter that is no front (the supervisor of several fronts)."""
        if self.process.is_alive():
            context = zmq.Context()
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, int(STOP_FLUSH_S * 1000))
            sock.connect(self.endpoints.commands)
            send_frames(sock, encode(Shutdown()))
            sock.close()
            context.term()
        self.join(timeout_s)

    def join(self, timeout_s: float) -> None:
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.error("engine process %d did not stop within %.1f s; killing it", self.process.pid, timeout_s)
            self.process.kill()
            self.process.join(5.0)
        atexit.unregister(self._kill_at_exit)
        self.failure_reason()  # read before the pipe is closed: a supervisor may ask for it after the join
        self._failure_report.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


# A pipe's write blocks past its buffer (64 KiB on Linux) until the reader reads, and the starter reads the reason
# only once the engine has exited: one bounded line, however long the exception's text.
MAX_REPORTED_REASON_CHARS = 2000


def one_line(reason: str) -> str:
    """``reason``'s first line, at most ``MAX_REPORTED_REASON_CHARS`` long, saying where the rest is."""
    first, _, rest = reason.strip().partition("\n")
    if rest or len(first) > MAX_REPORTED_REASON_CHARS:
        return first[:MAX_REPORTED_REASON_CHARS] + " ... (the engine's log has it whole)"
    return first


def run_engine(spec: EngineSpec) -> None:
    """The engine process's main: load, serve until told to stop or orphaned, exit 0 (stopped) or 1 (failed)."""
    if spec.setup_logging is not None:
        spec.setup_logging()
    # Ctrl-C in a terminal, ``kill -TERM -PGID``, systemd's stop (KillMode=control-group) and a closing terminal's
    # SIGHUP signal every process of the server's group: the engine must outlive the server's drain, and is stopped
    # by it (``Shutdown``), by its parent's end, or by the parent's exit handler (``EngineProcess.start``).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    from audio_interaction_server.engine.worker import Worker
    from audio_interaction_server.model.checkpoint import CheckpointError, load_model

    context = zmq.Context()
    host = EngineHost(context, spec)
    try:
        model = load_model(spec.checkpoint, spec.config.device, spec.config.dtype)
        worker = Worker(model, spec.config)
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        # An expected failure (a checkpoint not in the release layout, a vocabulary it cannot fetch, a file it
        # cannot read) is said in one line, as a single server says it (api/runtime.py); anything else may be a
        # bug, and keeps its traceback.
        log.error("cannot serve: %s", reason, exc_info=not isinstance(error, (CheckpointError, OSError)))
        host.answer_hellos(EngineFailedToLoad(error))
        host.close()
        if spec.failure_report is not None:  # last: nothing the fronts must hear waits on it
            with contextlib.suppress(OSError):
                spec.failure_report.send(one_line(reason))
        sys.exit(1)
    ready = EngineReady(model.files.root, model.name, str(model.device), dtype_name(model), spec.config,
                        os.getpid(), worker.step_path)
    if spec.memory_trim_interval_s is not None:
        threading.Thread(target=trim_memory_periodically, args=(spec.memory_trim_interval_s,),
                         name=MEMORY_TRIM_THREAD, daemon=True).start()
    status = host.serve(worker, ready)
    host.close()
    if host.is_orphaned:
        remove_endpoints(spec.endpoints)
    if host.worker_hung:
        os._exit(status)  # not the interpreter's exit, which may wait on a lock the hung thread holds
    sys.exit(status)


MEMORY_TRIM_THREAD = "ais-malloc-trim"  # also its name in /proc/<pid>/task/*/comm


def trim_memory_periodically(interval_s: float, trim: Callable[[], bool] | None = None,
                             stop: threading.Event | None = None) -> None:
    """The engine process's own periodic ``malloc_trim`` (a daemon thread; ``memory_trim_interval_s``): glibc keeps
    freed pages of this process's arenas too, and the front's trim cannot return them."""
    from audio_interaction_server.process_memory import malloc_trim

    name_native_thread(MEMORY_TRIM_THREAD)
    trim = trim or malloc_trim
    stop = stop or threading.Event()
    while not stop.wait(interval_s):
        if not trim():
            return  # not glibc: nothing to trim


class WorkerStall:
    """Whether the worker's step loop still turns, judged on the engine's command thread.

    A thread that hangs in a step (a CUDA kernel that never returns, a deadlock in a torch op) leaves the rest of
    the process alive: the command thread would go on telling every front that the engine works. Past
    ``ENGINE_QUIET_S`` without a turn the engine's status stops (the fronts refuse new sessions, as for any
    silence, and admit again once it turns), and past ``hang_timeout_s`` the engine process exits, so that its
    fronts end its sessions at once and it can be restarted. A step that legitimately takes seconds (a first
    step's kernel compiles) is the same silence while it lasts."""

    def __init__(self, worker: Worker, hang_timeout_s: float) -> None:
        self.worker = worker
        self.hang_timeout_s = hang_timeout_s
        self._counted_from_s = time.monotonic()  # a stall counts from here at the earliest (a late look resets it)
        self._looked_s = self._counted_from_s
        self.is_stalled = False

    def has_hung(self, now_s: float) -> bool:
        # The command loop looks every HEARTBEAT_S or so: a look that comes much later means this process itself
        # stood still meanwhile (frozen, starved of CPU), whatever the loop was doing then, and the worker, frozen
        # with it, has not had its turn since.
        if now_s - self._looked_s > STOOD_STILL_S:
            self._counted_from_s = now_s
        self._looked_s = now_s
        stalled_s = now_s - max(self.worker.last_turn_s, self._counted_from_s)
        if stalled_s <= ENGINE_QUIET_S:
            if self.is_stalled:
                self.is_stalled = False
                log.warning("the model worker turns again: the engine answers its fronts again")
            return False
        if stalled_s > self.hang_timeout_s:
            log.error("the model worker has not turned for %.1f s (engine.hang_timeout_s %g): it hangs; the engine "
                      "process exits, its sessions end", stalled_s, self.hang_timeout_s)
            return True
        if not self.is_stalled:
            self.is_stalled = True
            log.warning("the model worker has not turned for %.1f s (one step that long, or a hang): the engine "
                        "stops answering its fronts, which refuse new sessions until it turns; past %g s "
                        "(engine.hang_timeout_s) the engine process exits", stalled_s, self.hang_timeout_s)
        return False


def remove_endpoints(endpoints: EngineEndpoints) -> None:
    """The socket files of ``endpoints``, and their directory once empty: for an engine whose server was killed
    outright (SIGKILL, the OOM killer), which could not remove them itself. Nothing else is ever removed."""
    directories = set()
    for endpoint in (endpoints.commands, endpoints.events):
        path = Path(endpoint.removeprefix("ipc://"))
        directories.add(path.parent)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for directory in directories:
        with contextlib.suppress(OSError):  # not empty, or gone: left as it is
            directory.rmdir()


def process_has_ended(pid: int) -> bool:
    """Whether process ``pid`` of this host is gone: no such process, or a zombie its parent has not reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]  # after the command name, which may hold spaces
        return state in (b"Z", b"X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): whether the process exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


@dataclass
class _Front:
    last_seen_s: float
    pid: int | None = None  # its process, from its Hello: watched, so its death is seen at the next poll
    sessions: set[str] = field(default_factory=set)  # opened here and not ended
    num_admitted: int = 0  # what its heartbeat says it holds, sessions not yet opened here included
    detached: dict[str, float] = field(default_factory=dict)  # its sessions waiting for a resume: since when

    @property
    def num_slots_held(self) -> int:
        return max(self.num_admitted, len(self.sessions))


class EngineHost:
    """The engine process's side of the sockets: commands in, the worker's events out, fronts watched."""

    def __init__(self, context: zmq.Context, spec: EngineSpec) -> None:
        import torch

        self.spec = spec
        self._tensor_of = torch.from_numpy  # for mel features pushed as arrays
        self.commands = context.socket(zmq.ROUTER)
        self.commands.setsockopt(zmq.RCVHWM, 0)  # never drop a command: audio a session accepted must arrive
        self.commands.bind(spec.endpoints.commands)
        self.events = context.socket(zmq.ROUTER)
        self.events.setsockopt(zmq.SNDHWM, 0)  # never drop an event: a silent front is cut by its heartbeat
        self.events.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a front not (yet) connected raises, not drops silently
        self.events.setsockopt(zmq.LINGER, int(STOP_FLUSH_S * 1000))
        self.events.bind(spec.endpoints.events)
        self.fronts: dict[bytes, _Front] = {}
        self._cuts: OrderedDict[str, AddressCut] = OrderedDict()  # flood cuts by address, oldest first
        self._fronts_lock = threading.Lock()  # the worker thread's emits end sessions; the main thread opens them
        self._outbox: queue.SimpleQueue[tuple[bytes | None, Any] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-sender", daemon=True)
        self._worker_failed = threading.Event()
        self._worker: Worker | None = None
        self.is_orphaned = False  # it stopped because the server that started it is gone
        self.worker_hung = False  # it stopped because the worker thread hangs (WorkerStall)

    def answer_hellos(self, answer: EngineFailedToLoad) -> None:
        """Answer every front that has said hello by now (the one that started the engine said it first)."""
        self._sender.start()
        try:
            pickle.dumps(answer)
        except Exception:  # an exception that does not pickle still tells its type and text
            answer = EngineFailedToLoad(RuntimeError(f"{type(answer.error).__name__}: {answer.error}"))
        while True:
            try:
                frames = recv_frames(self.commands, zmq.NOBLOCK)
            except zmq.Again:
                return
            if any(isinstance(message, Hello) for message in decode_batch(frames[1:])):
                self._outbox.put((frames[0].bytes, answer))

    def serve(self, worker: Worker, ready: EngineReady) -> int:
        self._worker = worker
        worker.on_step = lambda stats: self._outbox.put((None, stats))
        worker.on_failure = lambda error: self._worker_failed.set()
        self._sender.start()
        worker.start()
        log.info("engine process %d serving %s on %s", os.getpid(), ready.name, ready.device)
        status = self._serve_commands(worker, ready)
        if not self.worker_hung:  # a hung worker would not stop: its sessions end with this process
            worker.stop()  # sessions still open end with server_shutdown; their events are queued before this returns
        return status

    def _serve_commands(self, worker: Worker, ready: EngineReady) -> int:
        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        next_status_s = next_look_s = keepalive_s = 0.0
        last_status: EngineStatus | None = None
        stall = WorkerStall(worker, self.spec.config.hang_timeout_s)
        while True:
            now_s = time.monotonic()
            if stall.has_hung(now_s):
                self.worker_hung = True
                return 1  # its fronts see this process end and end its sessions (worker_failed) at once
            # The status says the engine works: on this thread, and only while the worker's loop turns, so that a
            # hung command loop or a hung worker both go silent and the fronts stop admitting sessions.
            if now_s >= next_status_s and not stall.is_stalled:
                status = self._status()
                if status != last_status or now_s >= keepalive_s:  # a change at once; else only that it lives
                    self._outbox.put((None, status))
                    last_status, keepalive_s = status, now_s + KEEPALIVE_S
                next_status_s = now_s + HEARTBEAT_S
            if self._worker_failed.is_set():
                return 1  # the worker ended every session with worker_failed; the fronts see this process end
            # The parent and the fronts are looked at every POLL_S, not at every wake-up: under load commands
            # arrive hundreds of times a second, and each look reads /proc once per front.
            if now_s >= next_look_s:
                if os.getppid() != self.spec.parent_pid:
                    log.error("the server process that started the engine is gone; the engine stops")
                    self.is_orphaned = True
                    return 1
                self._expire_fronts(worker)
                next_look_s = now_s + POLL_S
            asked_s = min(POLL_S, HEARTBEAT_S)
            polled_at_s = time.monotonic()
            is_ready = poller.poll(int(asked_s * 1000))
            stood_s = stood_still_s(time.monotonic() - polled_at_s, asked_s)
            if stood_s:
                # This process stood still (the whole tree paused, the host stalled): the fronts' heartbeats of
                # that time are queued unread, so their silence is not theirs to answer for. (The worker's stall
                # sees the same: its next look is late.)
                with self._fronts_lock:
                    for front in self.fronts.values():
                        front.last_seen_s += stood_s
            if is_ready:
                # At most HEARTBEAT_S of commands before the top of the loop again: under a stream of commands the
                # status, the watch on the fronts and the worker's stall are still looked at.
                until_s = time.monotonic() + HEARTBEAT_S
                while time.monotonic() < until_s:
                    try:
                        frames = recv_frames(self.commands, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for message in decode_batch(frames[1:]):  # a front's commands of one loop turn, in order
                        if self._apply(worker, ready, frames[0].bytes, message):
                            return 0

    def _apply(self, worker: Worker, ready: EngineReady, front_id: bytes, message: Any) -> bool:
        """Apply one front's message; True when the engine is told to stop."""
        with self._fronts_lock:
            front = self.fronts.get(front_id)
            if front is None:
                front = self.fronts[front_id] = _Front(time.monotonic())
            front.last_seen_s = time.monotonic()
        match message:
            case Heartbeat(num_sessions=num_sessions, pid=pid):
                front.num_admitted = num_sessions
                front.pid = front.pid or pid
            case Hello(pid=pid):
                front.pid = pid
                for cut in self._cuts_in_force():  # before its answer: a front serves once it has the answer
                    self._outbox.put((front_id, cut))
                self._outbox.put((front_id, ready))
            case OpenRemote(session_id=session_id, options=options, client_address=client_address):
                self._make_room(worker, front)
                with self._fronts_lock:
                    front.sessions.add(session_id)
                # The one worker charges the address's prefill budget, whichever front the session came from.
                worker.open_session(session_id, options, functools.partial(self._emit, front_id, session_id),
                                    client_address)
            case SessionDetached(session_id=session_id, since_s=since_s):
                with self._fronts_lock:  # opened here or not yet: either way its front counts it as holding a slot
                    front.detached[session_id] = since_s
            case DetachEnded(session_id=session_id):
                with self._fronts_lock:
                    front.detached.pop(session_id, None)
            case AddressCut(address=address):
                self._outbox.put((None, message))  # every front refuses the address (the cutting one already does)
                self._cuts.pop(address, None)
                self._cuts[address] = message
                while len(self._cuts) > MAX_CUTS_KEPT:
                    self._cuts.popitem(last=False)
            case PushAudio(session_id=session_id, mel_chunks=chunks):
                # Features: a copy the worker may own; PaddedBlocks: the worker copies them as it batches.
                worker.push_audio(session_id, chunks if isinstance(chunks, PaddedBlocks)
                                  else self._tensor_of(np.array(chunks)))
            case CancelReply(session_id=session_id):
                worker.cancel(session_id)
            case RequestReply(session_id=session_id, max_turn_tokens=max_turn_tokens):
                worker.request_reply(session_id, max_turn_tokens)
            case ClearAudio(session_id=session_id, keep_before=keep_before):
                worker.clear_audio(session_id, keep_before)
            case CloseSession(session_id=session_id):
                with self._fronts_lock:  # its slot is free for the next open: the worker takes commands in order
                    front.sessions.discard(session_id)
                    front.detached.pop(session_id, None)
                worker.close_session(session_id)
            case Goodbye():
                self._drop_front(worker, front_id, "it left")
            case Shutdown():
                return True
            case _:
                log.error("front %s sent an unknown message %r", front_id.hex(), type(message).__name__)
        return False

    def _cuts_in_force(self) -> list[AddressCut]:
        """The flood cuts whose cooldown still runs, for a front that says hello (one restarted after a crash)."""
        now_s = time.monotonic()
        for address in [address for address, cut in self._cuts.items() if cut.until_s <= now_s]:
            del self._cuts[address]
        return list(self._cuts.values())

    def _make_room(self, worker: Worker, opener: _Front) -> None:
        """Before ``opener``'s open: with every slot taken, by open sessions or by sessions the fronts admitted
        (this one counted), and one of them detached (on any front), the session detached longest gives its slot
        up, as a single server does (docs/protocol.md). Ended here, it frees the slot before the open (the worker
        takes commands in order); its front is told first, so that it ends the session as evicted (one that never
        opened here is ended by its front alone)."""
        max_sessions = self.spec.config.max_sessions
        with self._fronts_lock:
            num_open = sum(len(front.sessions) for front in self.fronts.values())
            num_held = sum(max(front.num_admitted, len(front.sessions) + (front is opener))
                           for front in self.fronts.values())
            if num_open < max_sessions and num_held <= max_sessions:
                return
            detached = [(since_s, front_id, session_id) for front_id, front in self.fronts.items()
                        for session_id, since_s in front.detached.items()]
            if not detached:
                return  # every slot held by a live client: the worker refuses the open (capacity)
            _, owner_id, session_id = min(detached)
            owner = self.fronts[owner_id]
            del owner.detached[session_id]
            owner.sessions.discard(session_id)
        log.info("session %s (front %s) gives its slot up to a new session: every slot was taken and it was the "
                 "session detached longest", session_id, owner_id.hex())
        self._outbox.put((owner_id, EvictDetached(session_id)))
        # Ended with a reason, not closed as if asked: a client whose resume its front accepted just before it read
        # the notice above is told to start over (error detached_evicted, 4009), not closed with 1000.
        worker.end_session(session_id, EndCode.DETACHED_EVICTED, "this session's slot went to a new session while "
                           "its connection was away (every slot was taken); start a new session")

    def _status(self) -> EngineStatus:
        """Free slots: those no front's session holds, has asked for, or has been admitted for (a front counts a
        session from its handshake; it opens here at its first audio)."""
        with self._fronts_lock:
            held_by_front = {front_id: front.num_slots_held for front_id, front in self.fronts.items()}
            detached_by_front = {front_id: len(front.detached) for front_id, front in self.fronts.items()
                                 if front.detached}
        return EngineStatus(max(0, self.spec.config.max_sessions - sum(held_by_front.values())),
                            self.spec.config.max_sessions, held_by_front, detached_by_front)

    def _expire_fronts(self, worker: Worker) -> None:
        now_s = time.monotonic()
        with self._fronts_lock:
            ended = [front_id for front_id, front in self.fronts.items()
                     if front.pid is not None and process_has_ended(front.pid)]
            silent = [front_id for front_id, front in self.fronts.items()
                      if now_s - front.last_seen_s > FRONT_TIMEOUT_S and front_id not in ended]
        for front_id in ended:
            self._drop_front(worker, front_id, "its process ended")
        for front_id in silent:
            # It may come back (a front stopped, or starved of CPU, for longer): its clients are then told why.
            self._drop_front(worker, front_id, f"no heartbeat for {FRONT_TIMEOUT_S:g} s", EndCode.FRONT_UNRESPONSIVE)

    def _drop_front(self, worker: Worker, front_id: bytes, why: str, end: EndCode | None = None) -> None:
        """Forget a front and close its sessions: as closed by their clients (a front that left or ended hears
        nothing more), or ended with ``end``."""
        with self._fronts_lock:
            front = self.fronts.pop(front_id, None)
        if front is None:
            return
        if front.sessions:
            log.warning("front %s is gone (%s): closing its %d session(s)", front_id.hex(), why, len(front.sessions))
        message = f"the server's front did not answer the engine for {FRONT_TIMEOUT_S:g} s; the session was ended " \
                  "(start a new one)"
        for session_id in front.sessions:
            if end is None:
                worker.close_session(session_id)
            else:
                worker.end_session(session_id, end, message)

    def _emit(self, front_id: bytes, session_id: str, events: list[EngineEvent]) -> None:
        """The worker thread's ``emit`` of one session: queued for the sender, never blocking the step."""
        # Read here, on the worker thread between steps, the session's figures are exact, not a racy read.
        state = self._worker.state_size(session_id) if self._worker is not None else None
        if isinstance(events[-1], SessionEnded):
            with self._fronts_lock:
                front = self.fronts.get(front_id)
                if front is not None:
                    front.sessions.discard(session_id)
                    front.detached.pop(session_id, None)
        self._outbox.put((front_id, SessionEvents(session_id, events, state)))

    def _send_loop(self) -> None:
        """Send what the worker queued, one message per front for all that waits (a step's events together)."""
        name_native_thread("engine-sender")
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
            for target in everyone if front_id is None else [front_id]:  # step figures, status: every front
                per_front.setdefault(target, []).append(message)
        for front_id, messages in per_front.items():
            try:
                send_frames(self.events, [front_id, *encode(messages)])
            except zmq.ZMQError as error:  # not connected (yet, or any more): its heartbeat decides its fate
                log.debug("events for front %s not sent: %s", front_id.hex(), error)

    def close(self) -> None:
        if self._sender.is_alive():
            self._outbox.put(None)
            self._sender.join(STOP_FLUSH_S)
        self.commands.close(linger=0)
        self.events.close()  # lingers up to STOP_FLUSH_S for the last events
        self.events.context.term()
