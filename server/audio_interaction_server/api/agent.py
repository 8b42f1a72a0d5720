"""The capacity agent: a TCP port that tells a load balancer (HAProxy's ``agent-check``) this replica's state.

HAProxy connects every ``agent-inter``, reads one line and closes; the words on it set the server's state
(HAProxy's configuration manual, "agent-check"). This agent answers:

- ``up ready maxconn:<N>`` while it serves. ``ready`` undoes a ``drain`` that an earlier process at the
  same address reported (HAProxy keeps an agent's ``drain`` until the agent says otherwise). ``N`` bounds
  the WebSockets HAProxy forwards here at once: the session capacity, plus the subscribers open now, plus
  room for ``max_subscribers_per_session`` more, because HAProxy counts subscribers as connections too
  and a subscriber must still reach a full replica. A session HAProxy sends into that room is refused
  with HTTP 503 (``busy_refusal: http_503``) and retried on another replica (``retry-on 503``).
- ``up drain`` while draining: no new sessions from the balancing algorithm, while ``use-server`` still
  routes subscribers of the sessions finishing here.
- ``down#<reason>`` while the model loads, after it failed, or while the process stops.

The answer is computed when HAProxy connects, so it is as fresh as the probe. Event loop only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audio_interaction_server.api.runtime import Runtime

log = logging.getLogger(__name__)

# A peer that connects and never reads must not hold a task forever.
_WRITE_TIMEOUT_S = 2.0


def agent_line(runtime: Runtime) -> str:
    """What the agent answers now (without the line end)."""
    report = runtime.load_report()
    if not report.ready:
        return f"down#{runtime.not_ready_reason()}"
    if report.draining:
        return "up drain"
    maxconn = report.max + report.subscribers + runtime.config.max_subscribers_per_session
    return f"up ready maxconn:{maxconn}"


class CapacityAgent:
    """Serves ``agent_line`` on ``host:port`` (port 0 = any free port; ``port`` says which after ``start``)."""

    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, self.host, self.requested_port)
        log.info("capacity agent (HAProxy agent-check) on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # HAProxy may send an agent-send string first; the answer does not depend on it, so it is not read.
        try:
            writer.write(f"{agent_line(self.runtime)}\n".encode())
            await asyncio.wait_for(writer.drain(), _WRITE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass  # the prober left; it will probe again
        finally:
            writer.close()
