"""The capacity agent: a TCP port that tells a load balancer (HAProxy's ``agent-check``) this replica's state.

HAProxy connects every ``agent-inter``, reads one line and closes; the words on it set the server's state
(HAProxy's configuration manual, "agent-check"). This agent answers:

- ``up ready maxconn:<N>`` while it serves. ``ready`` undoes a ``drain`` that an earlier process at the
  same address reported (HAProxy keeps an agent's ``drain`` until the agent says otherwise). ``N`` is the
  most WebSockets the replica ever holds, every session with all its subscribers
  (``max_sessions * (1 + max_subscribers_per_session)``): HAProxy counts subscribers as connections too,
  and a subscriber must still reach a full replica. It is a constant, so the line tells whoever can reach
  the port nothing about the load; a new session sent to a full replica is refused with HTTP 503
  (``busy_refusal: http_503``) and retried on another one (``retry-on 503``).
- One of several fronts of one engine (``serve --fronts N``), the engine's slots are shared, so the line
  also carries a weight from the engine's free slots: ``up ready 100% maxconn:<N>`` while the engine has a
  free slot, ``up ready 0% maxconn:<N>`` while it has none (HAProxy then sends no new session to any front of
  that engine, as for a drain, and ``use-server`` still reaches their sessions). Full or not is all it tells,
  as ``/ready`` does to anyone; HAProxy keeps a weight until told another, so every line carries one.
- ``up drain`` while draining: no new sessions from the balancing algorithm, while ``use-server`` still
  routes subscribers of the sessions finishing here. A drain is per front. Also while the engine process has not
  answered for a while (``Runtime.engine_quiet_reason``): a stalled engine may answer again.
- ``down#<reason>`` while the model loads, after it failed, or while the process stops.

What a probe may cost is bounded, since anyone who reaches the port can probe it: connections are taken
one at a time, at most ``agent_probes_per_s`` a second (the rest wait in the kernel's accept queue), each
answered and closed at once, and one client address gets at most ``agent_probes_per_s_per_ip`` lines a
second (beyond, its connection is closed unanswered). HAProxy needs one line per ``agent-inter``; a probe
it misses during a flood leaves the server's state as it was. Event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from audio_interaction_server.api.addresses import AddressRateLimiter

if TYPE_CHECKING:
    from audio_interaction_server.api.runtime import Runtime

log = logging.getLogger(__name__)

# Connections waiting to be taken; beyond, the kernel refuses new ones (a prober retries at its next interval).
ACCEPT_BACKLOG = 64

# How long the agent waits after an accept failed (out of descriptors, mostly) before it tries again: what asyncio's
# own servers wait, so that a full descriptor table is not polled in a busy loop.
ACCEPT_RETRY_S = 1.0

# What the agent reads of a probe before it closes (HAProxy's optional agent-send string): reading it lets the
# close be a FIN, not a reset that could overtake the line.
MAX_PROBE_BYTES = 1024


def agent_line(runtime: Runtime) -> str:
    """What the agent answers now (without the line end)."""
    report = runtime.load_report()
    if not report.ready:
        return f"down#{runtime.not_ready_reason()}"
    if report.draining or runtime.engine_quiet_reason() is not None:
        # A stalled engine may answer again: no new sessions meanwhile, its sessions still reached (``ready``,
        # in the next line once it answers, undoes the drain).
        return "up drain"
    config = runtime.config
    maxconn = f"maxconn:{config.session_capacity * (1 + config.max_subscribers_per_session)}"
    if report.engine_free is None:
        return f"up ready {maxconn}"
    # Weighed as /ready admits: a front holding a detached session gives its slot to a new one (Runtime.is_full).
    return f"up ready {0 if runtime.is_full else 100}% {maxconn}"


class CapacityAgent:
    """Serves ``agent_line`` on ``host:port`` (port 0 = any free port; ``port`` says which after ``start``)."""

    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.requested_port = port
        config = runtime.config
        self._accepts = AddressRateLimiter(config.agent_probes_per_s, max(1, round(config.agent_probes_per_s)))
        self._lines = AddressRateLimiter(config.agent_probes_per_s_per_ip,
                                         max(1, round(config.agent_probes_per_s_per_ip)))
        self._socket: socket.socket | None = None
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int | None:
        return None if self._socket is None else self._socket.getsockname()[1]

    def bind(self) -> None:
        """Take the port (``OSError`` if it cannot): the server calls it with its own bind, before the model loads,
        so a busy port fails in a second with one line; ``start`` binds if nobody did."""
        if self._socket is None:
            self._socket = socket.create_server((self.host, self.requested_port), backlog=ACCEPT_BACKLOG)
            self._socket.setblocking(False)

    def adopt(self, listener: socket.socket) -> None:
        """Serve on ``listener``, bound and listening already (``serving.Listeners``), instead of binding."""
        listener.listen(ACCEPT_BACKLOG)  # its own queue's length, as bind() gives it
        listener.setblocking(False)
        self._socket = listener

    async def start(self) -> None:
        self.bind()
        assert self._socket is not None
        self._task = asyncio.get_running_loop().create_task(self._serve(self._socket))
        log.info("capacity agent (HAProxy agent-check) of replica %s on %s:%d", self.runtime.replica_id, self.host,
                 self.port)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait_s = self._accepts.retry_after_s("all", time.monotonic())
            if wait_s is not None:
                await asyncio.sleep(wait_s)
                continue
            try:
                connection, address = await loop.sock_accept(listener)
            except OSError as error:
                # Out of descriptors (EMFILE, ENFILE: a flood of connections elsewhere in the process), out of
                # memory, a connection aborted before it was taken: the agent goes on, or the balancer would keep
                # its last word (a drain, a weight, down) for the process's life.
                log.warning("capacity agent: could not accept a probe (%s); trying again in %g s", error,
                            ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            with connection:
                self._answer(connection, str(address[0]))

    def _answer(self, connection: socket.socket, host: str) -> None:
        """One line, written at once (a fresh socket's buffer takes it), and the close; nothing waits."""
        connection.setblocking(False)
        try:
            if self._lines.retry_after_s(host, time.monotonic()) is None:
                connection.send(f"{agent_line(self.runtime)}\n".encode())
            connection.recv(MAX_PROBE_BYTES)
        except OSError:
            pass  # nothing sent yet (BlockingIOError), or the prober already left: it probes again
