"""``serve --fronts N``: one engine process and N front processes on one host, and the process that supervises them.

A front is a whole server but for the model: sockets, sessions, audio front-end, rendering, subscribers, resume
logs, ``/ready``, metrics, its capacity agent. Each is a replica to a load balancer: front i listens on
``port + i`` (its agent on ``agent_port + i``; a port of 0 gives each its own free one) and its replica id is
``<replica_id>-f<i>``, so a session id routes a subscriber or a resume to the front that holds the session.
All attach to the one engine process over its ZeroMQ endpoints, which keeps every front's sessions apart.

What the supervisor (this process: ``python -m audio_interaction_server --fronts N``) does:

* binds every front's port (and agent port) and keeps them: a busy one stops the tree at once (status 3), before
  anything starts; a front is handed its sockets, again when it is restarted, so its port stays taken meanwhile
  and connections wait in the kernel's queue for the new front (``serving.Listeners``);
* starts the fronts first (they answer ``/health`` at once and wait for the engine), then resolves the
  checkpoint (a Hub download happens here) and starts the engine process;
* SIGINT or SIGTERM: passed on once to every front (a SIGTERM drains each, with ``drain_timeout_s``); once every
  front has exited, the engine is stopped. A second signal is passed on too (a front then stops at once);
* the engine process ends unasked: the supervisor tells every front (``EngineEnded``, by its orders pipe); each
  ends its sessions with ``worker_failed`` (close 1011), answers ``/ready`` 503 and exits 1; so does the tree. An
  engine that hangs (alive, silent for ``engine.hang_timeout_s``) is lost the same way, each front on its own
  silence; a shorter silence (``ENGINE_QUIET_S``) only pauses new sessions: a stopped or starved engine may answer
  again. The engine is not restarted here: every
  session died with its KV cache anyway, reloading takes minutes either way, and a GPU in a bad state wants a
  fresh container; the orchestrator (Docker's ``restart``, Kubernetes) restarts the tree with its back-off and
  counts the restarts where operators look;
* a front hangs (its event loop has not turned for ``front_hang_timeout_s``: deadlocked, stopped, stuck in a
  call; each front writes the time of its loop's every tick, ``LoopHeartbeat``): it is killed, and so ends
  unasked. Its clients' connections drop (a hung loop can send no close frame); left alone, it would hold its port
  and its clients, who hear nothing, for as long as it hangs;
* a front ends unasked (killed, crashed, or drained on its own and exited 0): the engine frees its slots within
  a second (it watches each front's pid), the other fronts' sessions go on, and the front is started again on the same
  port with the same replica id. Taking the tree down instead would cut every other front's sessions for the
  loss of one. More than ``MAX_FRONT_RESTARTS`` crashes (a status other than 0) within ``FRONT_RESTART_WINDOW_S``
  is no accident: the tree exits 1; a front that exits 0 stopped as asked and does not count. A front that cannot
  listen (3: not on the sockets it is handed, unless something is badly wrong), has a bad configuration (2) or
  cannot serve (``EXIT_FRONT_CANNOT_SERVE``: it lost its engine, or the
  engine cannot serve its settings) ends the tree, since a restart would meet the same: with status 3, 2 and 1.
  A front's own 1 is a crash (an exception out of its main), restarted like any other. The other fronts are then
  stopped at once, but after a lost engine, which they lose too: they are given the time to tell their clients
  first, and an engine that is still running then (one that hangs) is killed without the wait a stop gives it.

Signals: each front leaves the supervisor's process group, so a terminal's Ctrl-C reaches the supervisor (and the
engine, which ignores it), which passes it on exactly once; under systemd use ``KillMode=mixed``, so that only
the supervisor is sent the SIGTERM (``control-group`` would signal every front twice: the second stops a drain).
A SIGHUP (the terminal that started the tree closed) stops the tree as a SIGTERM does (once: a terminal hangs up
more than once, and a second SIGTERM would cut the drains short; the engine ignores it). A front whose supervisor is
gone (killed outright) stops as on a SIGINT, so that its clients are told and closed, not cut.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audio_interaction_server.api.liveness import FRONT_START_ALLOWANCE_S, WATCH_S, HangJudge, LoopHeartbeat
from audio_interaction_server.api.serving import (
    EXIT_BAD_CONFIG, EXIT_CANNOT_LISTEN, EXIT_CANNOT_SERVE, EXIT_STOPPED, CannotListen, Listeners, StopRequested,
    bind_listeners, exit_at_once, serve_config, stop_requested,
)
from audio_interaction_server.config import ServerConfig
from audio_interaction_server.logs import configure_logging, report_error

# Nothing that imports torch at import time: a front process imports this module first (its main is here), and a
# stop passed on while it starts is obeyed only once the front reads its orders, before the torch import.
if TYPE_CHECKING:
    from audio_interaction_server.engine.process_client import EngineProcess

log = logging.getLogger(__name__)

MAX_FRONT_RESTARTS = 5  # front restarts within FRONT_RESTART_WINDOW_S before the tree gives up (exit 1)
FRONT_RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 15.0  # after the drain's time, how long a stopping front has to exit before it is killed
HUNG_ENGINE_STOP_S = 1.0  # how long an engine its fronts have lost, but still running, gets to end before it is killed
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# A front's status for serve_config's EXIT_CANNOT_SERVE (its engine is lost, or cannot serve its settings): told
# apart from the 1 with which Python ends a process whose main raised, a crash that a restart may cure.
EXIT_FRONT_CANNOT_SERVE = 4
# What each exit status a front is not restarted after says of it, and the tree's status: a restart would meet the
# same.
_FINAL_FRONT_STATUSES = {
    EXIT_CANNOT_LISTEN: ("cannot listen on {address}", EXIT_CANNOT_LISTEN),
    EXIT_BAD_CONFIG: ("has a bad configuration", EXIT_BAD_CONFIG),
    EXIT_FRONT_CANNOT_SERVE: ("cannot serve (its engine is lost, or cannot serve its settings)", EXIT_CANNOT_SERVE),
}


def _engine_ended(status: int | None) -> str:
    """The tree's last word on its engine's end (a killing signal named); imported late: no torch at import."""
    from audio_interaction_server.engine.process_client import engine_ended

    return engine_ended(status)


@dataclass(frozen=True)
class EngineEnded:
    """The supervisor's word to a front, by its orders pipe, that the engine process has ended."""

    exitcode: int | None


@dataclass(frozen=True)
class FrontSpec:
    """What a front process is started with (pickled to it)."""

    index: int
    config: ServerConfig  # this front's: its port, agent port and replica id
    listeners: Listeners  # its ports, bound by the supervisor (which keeps them while the front restarts)
    engine_commands: str  # the engine's endpoints (engine.wire.EngineEndpoints), as text: see the imports
    engine_events: str
    # The read end of a pipe from the supervisor: the stop signals it passes on (and ``EngineEnded``) come this
    # way, not by kill(), so that one sent while the front still starts waits in the pipe instead of being lost;
    # its end (the supervisor is gone) stops the front.
    orders: Connection
    heartbeat: LoopHeartbeat  # its event loop's, watched by the supervisor


def front_config(config: ServerConfig, index: int) -> ServerConfig:
    """Front ``index``'s settings: port + i, agent_port + i (0 stays 0: any free port), replica id + ``-f<i>``."""
    suffix = f"-f{index}"
    from audio_interaction_server.api.runtime import default_replica_id

    base_id = config.replica_id or default_replica_id()[:64 - len(suffix)]
    return config.model_copy(update={
        "port": config.port + index if config.port else 0,
        "agent_port": None if config.agent_port is None else (config.agent_port + index if config.agent_port else 0),
        "replica_id": base_id + suffix,
        "fronts": 1,
    })


def run_front(spec: FrontSpec) -> None:
    """A front process's main: leave the supervisor's process group, then serve as one server does."""
    os.setpgrp()  # a terminal's Ctrl-C now reaches the supervisor, which passes it on once
    config = spec.config
    try:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, stop_requested)
        configure_logging(config.log_level, config.log_format, process=f"f{spec.index}")
        engine_ended = threading.Event()
        threading.Thread(target=_obey_supervisor, args=(spec.orders, engine_ended), name="supervisor-orders",
                         daemon=True).start()
        from audio_interaction_server.engine.process_client import EngineEndpoints

        status = serve_config(config, attach_to=EngineEndpoints(spec.engine_commands, spec.engine_events),
                              engine_ended=engine_ended, cannot_serve_status=EXIT_FRONT_CANNOT_SERVE,
                              listeners=spec.listeners, heartbeat=spec.heartbeat)
    except (KeyboardInterrupt, StopRequested):  # a stop before uvicorn took the signals over: a normal stop
        status = EXIT_STOPPED
    sys.exit(status)


def _obey_supervisor(orders: Connection, engine_ended: threading.Event) -> None:
    """Each signal number the supervisor sends is raised in this process (the handlers are in place by now), its
    ``EngineEnded`` sets ``engine_ended``; the pipe's end means the supervisor is gone, and a front outlives
    neither it nor the engine it started: it stops as on a SIGINT (its clients told and closed, not cut), and ends
    at once if that takes longer than ``STOP_GRACE_S``."""
    while True:
        try:
            order = orders.recv()
        except (EOFError, OSError):
            log.error("the supervising process is gone; this front stops")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(STOP_GRACE_S)
            exit_at_once(EXIT_CANNOT_SERVE)
        if isinstance(order, EngineEnded):
            engine_ended.set()
        else:
            os.kill(os.getpid(), order)


class Supervisor:
    """The engine process and the front processes of one host; main thread only (signals land there)."""

    def __init__(self, config: ServerConfig, directory: Path) -> None:
        self.config = config
        self.setup_logging = functools.partial(configure_logging, config.log_level, config.log_format,
                                               process="engine")
        self.engine: EngineProcess | None = None
        self.directory = directory  # the engine's sockets: known before it starts, so the fronts can start first
        self.fronts: dict[int, BaseProcess] = {}
        self.listeners: dict[int, Listeners] = {}  # each front's ports, bound here before any front starts
        self._orders: dict[int, Connection] = {}  # the write end of each front's pipe
        self.heartbeats: dict[int, LoopHeartbeat] = {}  # each front's event loop's, as it last started
        self._passed_on: list[int] = []  # the stop signals passed on so far: a front started since gets them too
        self.restarts_s: list[float] = []
        self.stopping = False
        self.status = EXIT_STOPPED
        self.last_word: str | None = None  # why the tree stopped, when it failed: its last line (``supervise``)
        self._hang_judge = HangJudge()  # of the fronts' heartbeats
        self._context = multiprocessing.get_context("spawn")
        self.stopped_mid_download = False  # a stop came while the model was found or fetched: that thread runs on

    # ---- signals ------------------------------------------------------------------------------------------
    def on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP and self.stopping:
            return  # a closing terminal hangs up more than once: only a second SIGINT/SIGTERM cuts a drain short
        if not self.stopping:
            log.warning("%s: stopping every front, then the engine", signal.Signals(signum).name)
        self.stopping = True
        # A front's own SIGHUP would end it at once (no handler): the hang-up asks what a SIGTERM asks.
        self._signal_fronts(signal.SIGTERM if signum == signal.SIGHUP else signum)

    def _signal_fronts(self, signum: int) -> None:
        self._passed_on.append(signum)
        for index, front in self.fronts.items():
            if front.exitcode is None:
                self._order(index, signum)

    def _order(self, index: int, order: int | EngineEnded) -> None:
        try:
            self._orders[index].send(order)
        except OSError:
            pass  # it has just ended

    # ---- the tree -----------------------------------------------------------------------------------------
    def start_front(self, index: int) -> None:
        orders, self_orders = self._context.Pipe(duplex=False)
        from audio_interaction_server.engine.process_client import EngineEndpoints

        endpoints = EngineEndpoints.in_directory(self.directory)
        heartbeat = LoopHeartbeat()
        heartbeat.allow(FRONT_START_ALLOWANCE_S)  # watched from its start: one that hangs in its imports is killed too
        spec = FrontSpec(index, front_config(self.config, index), self.listeners[index], endpoints.commands,
                         endpoints.events, orders, heartbeat)
        front = self._context.Process(target=run_front, args=(spec,), name=f"ais-front-{index}", daemon=True)
        front.start()
        orders.close()  # the front holds the read end; when this process ends, the front reads the pipe's end
        if index in self._orders:
            self._orders[index].close()
        self.fronts[index], self._orders[index], self.heartbeats[index] = front, self_orders, heartbeat
        for signum in self._passed_on:  # a stop that came while it was started (a signal handled mid-start)
            self._order(index, signum)
        log.info("front %d (replica %s) started as process %d", index, spec.config.replica_id, front.pid)

    def run(self) -> int:
        from audio_interaction_server.demo.source import resolve_model_source
        from audio_interaction_server.engine.process_client import EngineProcess

        config = self.config
        try:  # every port first: a busy one stops the tree before anything starts
            for index in range(config.fronts):
                self.listeners[index] = bind_listeners(front_config(config, index), (index, config.fronts))
        except CannotListen as error:
            report_error(str(error), config.log_format)
            return EXIT_CANNOT_LISTEN
        log.info("serving with %d fronts on one engine process: ports %s, replica ids %s", config.fronts,
                 ", ".join(str(self.listeners[i].server.getsockname()[1]) for i in range(config.fronts)),
                 ", ".join(str(front_config(config, i).replica_id) for i in range(config.fronts)))
        for index in range(config.fronts):
            self.start_front(index)
        # On a thread of its own: a download of many GB takes minutes, and a stop must not wait for it (the
        # download's library holds a signal's exception until its files in flight are done).
        found: dict[str, Any] = {}
        resolver = threading.Thread(target=_resolve_into, args=(found, resolve_model_source, config),
                                    name="model-download", daemon=True)
        resolver.start()
        while resolver.is_alive() and not self.stopping:
            resolver.join(0.1)
        if self.stopping and resolver.is_alive():
            self.stopped_mid_download = True
            return self._stop()
        failure = found.get("error")
        if failure is not None:
            log.error("cannot serve: %s: %s", type(failure).__name__, failure)
            self.last_word = f"{type(failure).__name__}: {failure}"
            return self._take_down(EXIT_CANNOT_SERVE, signal.SIGINT)
        checkpoint = found["checkpoint"]
        if self.stopping:
            return self._stop()
        self.engine = EngineProcess(checkpoint, config.engine, self.setup_logging, directory=self.directory,
                                    memory_trim_interval_s=config.memory_trim_interval_s)
        self.engine.start()
        return self._watch()

    def _watch(self) -> int:
        assert self.engine is not None
        while True:
            waiting = [self.engine.sentinel, *(front.sentinel for front in self.fronts.values())]
            multiprocessing.connection.wait(waiting, timeout=WATCH_S)
            if self.stopping:
                return self._stop()
            if self.engine.exitcode is not None:
                # It may never have served (a model that failed to load says why in its own log): the fronts
                # end whatever sessions they hold.
                log.error("the engine process exited with status %s: the fronts end any sessions they hold "
                          "(worker_failed); stopping", self.engine.exitcode)
                # (Its own reason, if it said one, is preferred as the tree's last line: ``supervise``.)
                self.last_word = _engine_ended(self.engine.exitcode)
                return self._take_down(EXIT_CANNOT_SERVE, signal.SIGINT, wait_s=_lost_engine_wait_s())
            for index, front in list(self.fronts.items()):
                if front.exitcode is not None:
                    status = self._front_ended(index, front.exitcode)
                    if status is not None:
                        return status
            self._kill_hung_fronts()

    def _kill_hung_fronts(self) -> None:
        """Kill each front whose event loop has stood still for ``front_hang_timeout_s``: it then ends unasked,
        and is started again as a crashed front is (and counted as one)."""
        now_s = time.monotonic()
        if not self._hang_judge.look(now_s):  # this process stood still too: the fronts' loops had no turn either
            return
        for index, front in self.fronts.items():
            stood_still_s = self._hang_judge.stood_still_s(self.heartbeats[index], now_s)
            if front.exitcode is None and stood_still_s > self.config.front_hang_timeout_s:
                log.error("front %d (process %s) hangs: its event loop has not turned for %.1f s "
                          "(front_hang_timeout_s %g); killing it", index, front.pid, stood_still_s,
                          self.config.front_hang_timeout_s)
                self.heartbeats[index].stop()  # killed once
                front.kill()

    def _front_ended(self, index: int, exitcode: int) -> int | None:
        """A front ended unasked: restart it, or the tree's exit status."""
        if exitcode in _FINAL_FRONT_STATUSES:
            config = front_config(self.config, index)
            what, status = _FINAL_FRONT_STATUSES[exitcode]
            what = what.format(address=f"{config.host}:{config.port}")
            log.error("front %d %s (exit status %d); a restart would meet the same: stopping every front, then the "
                      "engine", index, what, exitcode)
            self.last_word = f"front {index} {what} (its log says why)"
            if exitcode != EXIT_FRONT_CANNOT_SERVE:
                return self._take_down(status, signal.SIGINT)
            # A lost engine is lost by the other fronts too: they leave by themselves, having told their clients.
            # One still running by then does not answer (it hangs): killed soon, not after a stop's wait.
            return self._take_down(status, signal.SIGINT, wait_s=_lost_engine_wait_s(), engine_hangs=True)
        # Status 0: it stopped as asked (its own drain, a signal sent to it alone); anything else is a crash, and
        # only crashes count towards the limit: an operator may drain fronts one after another.
        if exitcode != 0:
            now_s = time.monotonic()
            self.restarts_s = [at for at in self.restarts_s if now_s - at < FRONT_RESTART_WINDOW_S] + [now_s]
        if exitcode != 0 and len(self.restarts_s) > MAX_FRONT_RESTARTS:
            log.error("front %d exited with status %d: %d fronts crashed within %.0f s, more than %d; something a "
                      "restart does not cure: stopping every front, then the engine", index, exitcode,
                      len(self.restarts_s), FRONT_RESTART_WINDOW_S, MAX_FRONT_RESTARTS)
            self.last_word = (f"fronts crashed {len(self.restarts_s)} times within {FRONT_RESTART_WINDOW_S:.0f} s "
                              "(their log says why)")
            return self._take_down(EXIT_CANNOT_SERVE, signal.SIGINT)
        log.log(logging.WARNING if exitcode == 0 else logging.ERROR, "front %d exited with status %d; the engine "
                "frees its slots, the other fronts' sessions go on; starting it again", index, exitcode)
        self.start_front(index)
        return None

    def _stop(self) -> int:
        """After SIGINT/SIGTERM: every front has been signalled; wait for them, then stop the engine."""
        self._wait_fronts((self.config.drain_timeout_s or 0.0) + STOP_GRACE_S)
        self._close_listeners()
        if self.engine is not None:
            if self.engine.exitcode not in (None, 0):  # it died while the fronts stopped: not a clean stop
                log.error("the engine process exited with status %s while the fronts stopped", self.engine.exitcode)
                self.last_word = _engine_ended(self.engine.exitcode)
                self.status = EXIT_CANNOT_SERVE
            self.engine.stop()
        return self.status

    def _take_down(self, status: int, signum: int, wait_s: float = 0.0, engine_hangs: bool = False) -> int:
        """Stop the tree for good: wait ``wait_s`` for the fronts to leave by themselves (after the engine's end
        they do, having told their clients), then signal what is left, then stop the engine (one that
        ``engine_hangs`` reads no stop: it is killed after ``HUNG_ENGINE_STOP_S``)."""
        self.status = status
        self.stopping = True
        if self.engine is not None and self.engine.exitcode is not None:
            # A front still waiting for the engine to serve would wait for ever: an engine that never served
            # sends no heartbeat whose silence it could notice. One that attached notices the silence anyway.
            for index, front in self.fronts.items():
                if front.exitcode is None:
                    self._order(index, EngineEnded(self.engine.exitcode))
        self._wait_fronts(wait_s, kill_late=False)
        self._signal_fronts(signum)
        self._wait_fronts(STOP_GRACE_S)
        self._close_listeners()
        if self.engine is not None and engine_hangs:
            self.engine.join(HUNG_ENGINE_STOP_S)
        elif self.engine is not None:
            self.engine.stop()
        return status

    def _close_listeners(self) -> None:
        """The fronts are gone for good: their ports refuse connections now rather than queue them for nobody."""
        for listeners in self.listeners.values():
            listeners.close()

    def _wait_fronts(self, timeout_s: float, kill_late: bool = True) -> None:
        deadline_s = time.monotonic() + timeout_s
        for index, front in self.fronts.items():
            front.join(max(0.0, deadline_s - time.monotonic()))
            if front.exitcode is None and kill_late:
                log.error("front %d did not stop within %.0f s; killing it", index, timeout_s)
                front.kill()
                front.join(5.0)


def _lost_engine_wait_s() -> float:
    """How long fronts that lost the engine have to notice, tell their clients and exit: told that it ended, at
    once; one that hangs, each on its own silence, which began for all at once (a margin for a late reader)."""
    from audio_interaction_server.engine.process_client import ENGINE_QUIET_S

    return ENGINE_QUIET_S + STOP_GRACE_S


def _resolve_into(found: dict[str, Any], resolve: Callable[..., Path], config: ServerConfig) -> None:
    """The model's local directory (found, generated or downloaded) into ``found["checkpoint"]``, or what went
    wrong into ``found["error"]``: the supervisor's download thread."""
    try:
        found["checkpoint"] = resolve(config.engine.checkpoint, config.is_demo)
    except BaseException as error:  # SystemExit, KeyboardInterrupt too: the supervisor says why and stops
        found["error"] = error


def supervise(config: ServerConfig) -> int:
    """Run the engine and ``config.fronts`` fronts until stopped; the tree's exit status (``api/serving.py``)."""
    from audio_interaction_server.engine.process_client import make_socket_directory

    directory = make_socket_directory()  # removed below, whatever the supervisor did with it
    supervisor = Supervisor(config, directory)
    previous = {signum: signal.signal(signum, supervisor.on_signal) for signum in _STOP_SIGNALS | {signal.SIGHUP}}
    try:
        status = supervisor.run()
        if supervisor.fronts or supervisor.engine is not None:  # else it stopped before it started any (a busy port)
            log.info("stopped: every front and the engine have exited (exit status %d)", status)
        # An engine that could not load says why: that is the tree's cause whichever process's end was seen first
        # (a front told of the failure may exit before the engine does).
        engine_reason = supervisor.engine.failure_reason() if supervisor.engine is not None else None
        last_word = engine_reason or supervisor.last_word
        if status != EXIT_STOPPED and last_word is not None:
            report_error(last_word, config.log_format)  # the tree's last line, as a single server's
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for listeners in supervisor.listeners.values():
            listeners.close()
        shutil.rmtree(directory, ignore_errors=True)
    if supervisor.stopped_mid_download:  # the download's threads would hold the interpreter's exit until done
        exit_at_once(status)
    return status
