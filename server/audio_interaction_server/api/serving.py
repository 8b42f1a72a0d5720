"""One server process's life: build the app, bind, serve until stopped, and the exit status it ends with.

``python -m audio_interaction_server`` runs it once (the server owns its engine thread or engine process);
``serve --fronts N`` runs it in each front process, attached to the one engine process (``api/fronts.py``).
Only the standard library at import: ``__main__`` imports this for ``--help``, which must answer at once.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    from audio_interaction_server.config import ServerConfig
    from audio_interaction_server.api.liveness import LoopHeartbeat
    from audio_interaction_server.engine.process_client import EngineEndpoints

# Exit statuses (documented in --help and docs/deployment.md; supervisors act on them).
EXIT_STOPPED = 0  # SIGINT or SIGTERM, also while the model was loading
EXIT_CANNOT_SERVE = 1  # the model could not be loaded, or its worker died
EXIT_BAD_CONFIG = 2  # as argparse's usage errors
EXIT_CANNOT_LISTEN = 3  # uvicorn's own start-up failure status, kept for a bind error

log = logging.getLogger("audio_interaction_server")

LISTEN_BACKLOG = 2048  # uvicorn's own default (the capacity agent sets its own when it adopts its socket)


class CannotListen(Exception):
    """A port could not be bound: the message is the one error line (host, port, the OS's reason)."""


@dataclass(frozen=True)
class Listeners:
    """A server's sockets, bound and listening before it starts: its port, and its capacity agent's if it has one.

    The supervisor of several fronts binds each front's and hands them to it, again to a front it restarts, and
    keeps them: a front's port stays taken while the front restarts (no other process can take it, which ended
    the tree), and connections that arrive meanwhile wait in the kernel's queue for the new front instead of
    being refused."""

    server: socket.socket
    agent: socket.socket | None = None

    def close(self) -> None:
        self.server.close()
        if self.agent is not None:
            self.agent.close()


def stream_url_for_log(is_ssl: bool, host: str, address: str) -> str:
    """The stream endpoint as the ready line shows it; bound to every interface, ``ws://0.0.0.0:...`` is a URL no
    client can use (a phone on the network was told to open it, configs/cpu-demo.yaml), so the line says so."""
    url = f"{'wss' if is_ssl else 'ws'}://{address}/v1/stream"
    if host in ("0.0.0.0", "::", ""):
        url += " on every interface (clients use this machine's address)"
    return url


PORT_IN_USE = "another program uses the port: choose another with --port or AIS_PORT"


def bind_listener(host: str, port: int, backlog: int, what: str = "",
                  in_use: str | None = PORT_IN_USE) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: any free one), bound as uvicorn binds (``SO_REUSEADDR``;
    IPv6 for a host with a colon); ``CannotListen`` if it cannot be. ``what`` names the port's role; ``in_use`` is
    what to do about a port in use (None: nothing to add)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as error:
        listener.close()
        # A port in use is the common case on a development machine: say how to choose another.
        other = f"; {in_use}" if error.errno == errno.EADDRINUSE and in_use else ""
        if error.errno == errno.EADDRNOTAVAIL:
            other = ("; not an address of this machine: give one it has (127.0.0.1 for this machine only, 0.0.0.0 "
                     "for every interface)")
        raise CannotListen(f"cannot listen on {host}:{port}{what}: [Errno {error.errno}] {error.strerror}{other}") \
            from error
    return listener


def bind_listeners(config: ServerConfig, front: tuple[int, int] | None = None) -> Listeners:
    """``config``'s port, and its ``agent_port`` when it has one, bound (``CannotListen``: neither is kept).
    ``front``: (index, count) of the front whose settings ``config`` is (``api/fronts.front_config``), named in the
    error: with ``--fronts`` the port in use may be another than the one given."""
    if front is None:
        server = bind_listener(config.host, config.port, LISTEN_BACKLOG)
    else:
        index, count = front
        first = config.port - index
        server = bind_listener(config.host, config.port, LISTEN_BACKLOG, f" (front {index}'s: --port + {index})",
                               f"another program uses the port: the {count} fronts listen on ports {first} to "
                               f"{first + count - 1}; choose a --port (AIS_PORT) with the {count} ports from it free")
    if config.agent_port is None:
        return Listeners(server)
    try:
        agent = bind_listener(config.host, config.agent_port, LISTEN_BACKLOG, " (agent_port)", in_use=None)
        return Listeners(server, agent)
    except CannotListen:
        server.close()
        raise


class StopRequested(BaseException):
    """Raised by the SIGINT/SIGTERM handler installed before uvicorn takes the signals over (imports, load). A
    BaseException, as KeyboardInterrupt is: an ``except Exception`` in code it interrupts must not swallow it."""


def exit_at_once(status: int) -> NoReturn:
    """End the process now, logs and output flushed, without interpreter shutdown: for a process whose other
    threads may hold import locks or sit in a torch call, and that has nothing left to save."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# True until uvicorn is about to run: the process is still importing and setting up, and holds nothing to save.
_in_start_up = True


def stop_requested(signum: int, frame: Any) -> None:
    if _in_start_up:
        # A stop in the start-up imports ends the process here rather than unwinding them: an exception raised
        # inside a half-done import (torch's C++ initialisation) can leave interpreter shutdown waiting on an
        # import lock, or aborting in a half-built extension; both were seen under load (a hang, a SIGABRT).
        exit_at_once(EXIT_STOPPED)
    raise StopRequested()


def serve_config(config: ServerConfig, listeners: Listeners, attach_to: EngineEndpoints | None = None,
                 engine_ended: threading.Event | None = None, cannot_serve_status: int = EXIT_CANNOT_SERVE,
                 heartbeat: LoopHeartbeat | None = None) -> int:
    """Serve ``config`` until stopped; the exit status. ``listeners``: its ports, bound before anything loads (by
    ``__main__``, or by the supervisor of several fronts), so that a busy port fails in a moment, not after a
    model load of minutes; ``attach_to``: one of several fronts, the engine process to attach to (started by the
    supervisor) instead of loading the model here; ``engine_ended``: set by the supervisor once that engine
    process has ended; ``cannot_serve_status``: the status when the model or its engine cannot serve (a front's
    own, which its supervisor tells apart from a crash); ``heartbeat``: a front's, beaten by its event loop's ticks
    for the supervisor to see it hang."""
    from audio_interaction_server.api.app import build_server, create_app
    from audio_interaction_server.logs import process_name, quiet_probe_requests, report_error, route_uvicorn_logs

    fatal: list[str] = []
    server = None

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_fatal=on_fatal)
    runtime = app.state.runtime
    runtime.attach_to = attach_to
    watches_itself = heartbeat is None
    if heartbeat is None:  # one process, no supervisor: it watches its own loop (a front's supervisor does that)
        from audio_interaction_server.api.liveness import FRONT_START_ALLOWANCE_S, LoopHeartbeat, LoopWatchdog

        heartbeat = LoopHeartbeat()
        heartbeat.allow(FRONT_START_ALLOWANCE_S)  # uvicorn's start-up, before the loop's first tick
        LoopWatchdog(heartbeat, config.front_hang_timeout_s, cannot_serve_status, exit_at_once).start()
    server = build_server(app, config, heartbeat)
    if engine_ended is not None:
        threading.Thread(target=_fail_if_engine_ends_first, args=(engine_ended, runtime, on_fatal),
                         name="engine-ended", daemon=True).start()
    if config.log_format == "json" or process_name() is not None:
        # uvicorn set up its own text handlers while its config was built: they write neither JSON nor which
        # front (of several) a line is from
        route_uvicorn_logs()
    if not config.log_probe_requests:
        quiet_probe_requests(debug=config.log_level == "debug")
    listener = listeners.server
    agent = app.state.agent
    if agent is not None and listeners.agent is not None:
        agent.adopt(listeners.agent)
    address = _address(server.config, listener)
    runtime.stream_url = stream_url_for_log(server.config.is_ssl, server.config.host, address)
    # uvicorn names the address it serves only when it binds the socket itself: the same line for the one bound
    # here (operators, the test harness and log pipelines read it).
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s://%s (Press CTRL+C to quit)",
                                            "https" if server.config.is_ssl else "http", address)
    global _in_start_up
    _in_start_up = False  # from here a stop unwinds: uvicorn's graceful shutdown, then the status below
    try:
        server.run(sockets=[listener])
    except (KeyboardInterrupt, StopRequested):
        pass  # re-raised by uvicorn after its graceful shutdown: a normal stop
    finally:
        if watches_itself:
            heartbeat.stop()  # the loop is done: the process's own exit (atexit work, a device's teardown) is not it
        elif heartbeat is not None:
            heartbeat.beat()  # the loop is done: what is left of the process must end within the same bound
    status = EXIT_STOPPED
    if fatal:
        if attach_to is None:  # a front's supervisor says the tree's last word (api/fronts.py); its log has this
            report_error(fatal[0], config.log_format)
        status = cannot_serve_status
    if runtime.is_loading:
        # Stopped mid-load: the loader thread may sit in a download or a torch call for minutes and
        # holds import locks that interpreter shutdown could wait on; nothing of it needs saving.
        exit_at_once(status)
    return status


def _fail_if_engine_ends_first(engine_ended: threading.Event, runtime: Any, on_fatal: Callable[[str], None]) -> None:
    """A front still waiting for its engine to serve hears nothing from one that ended first (only a serving engine
    sends heartbeats) and would wait for ever: told that it ended, such a front fails. One that attached ends its
    sessions with ``worker_failed`` now, not on the heartbeat's silence ``engine.hang_timeout_s`` later, meanwhile
    admitting sessions bound to fail. (Reads the runtime's fields from this thread: a stale read errs only towards
    the heartbeat's verdict, seconds later.)"""
    engine_ended.wait()
    worker = runtime.worker
    if worker is not None:
        worker.engine_ended("the engine process ended (the supervisor saw it)")
    elif runtime.load_error is None and not runtime.is_shutting_down:
        log.error("cannot serve: the engine process ended before it served (the engine's log says why)")
        on_fatal("the engine process ended before it served")


def _address(uv_config: Any, listener: Any) -> str:
    """``host:port`` of the server's socket as a URL writes it (``[host]:port`` for IPv6)."""
    host = uv_config.host or "0.0.0.0"
    return f"{f'[{host}]' if ':' in host else host}:{listener.getsockname()[1]}"
