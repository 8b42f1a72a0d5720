"""A front's heartbeat (api/liveness.py), as its server writes it: while serving, and while shutting down."""

from __future__ import annotations

import asyncio
import time
import types

import uvicorn

from audio_interaction_server.api.app import _SessionClosingServer
from audio_interaction_server.api.liveness import LoopHeartbeat


def test_the_heartbeat_goes_on_while_the_server_shuts_down(monkeypatch):
    """The heartbeat came from uvicorn's ticks alone and was set to "not watched" when they ended: a front whose
    loop hung in its shutdown (closing sessions, the engine's goodbye) held its sessions' sockets and was never
    killed. It now beats from a task of its own until the shutdown is done."""
    heartbeat = LoopHeartbeat()
    server = object.__new__(_SessionClosingServer)  # only what shutdown() touches
    server.loop_heartbeat = heartbeat
    server.transport_guard = types.SimpleNamespace(begin_shutdown=lambda: None, stop=lambda: None)
    stood_still: list[float] = []

    async def a_slow_runtime_shutdown() -> None:
        for _ in range(5):
            await asyncio.sleep(0.1)
            stood_still.append(heartbeat.stood_still_s(time.monotonic()))

    async def nothing_more(self, sockets=None) -> None:
        return None

    server.runtime = types.SimpleNamespace(shutdown=a_slow_runtime_shutdown)
    monkeypatch.setattr(uvicorn.Server, "shutdown", nothing_more)
    heartbeat.beat()
    asyncio.run(server.shutdown())
    assert all(0.0 < seconds < 0.3 for seconds in stood_still), stood_still  # watched, and fresh


def test_a_heartbeat_not_yet_beaten_or_stopped_is_not_watched():
    heartbeat = LoopHeartbeat()
    assert heartbeat.stood_still_s(time.monotonic() + 100) == 0.0
    heartbeat.beat()
    assert heartbeat.stood_still_s(time.monotonic() + 100) > 99
    heartbeat.stop()
    assert heartbeat.stood_still_s(time.monotonic() + 100) == 0.0


def test_a_starting_front_is_allowed_its_start_then_judged(monkeypatch):
    """A front that hung before its loop's first tick (in its imports) was never watched: its port stayed taken and
    dead, with no log line. It is allowed FRONT_START_ALLOWANCE_S, then judged as any loop that stopped turning."""
    from audio_interaction_server.api import liveness

    heartbeat = LoopHeartbeat()
    started_s = time.monotonic()
    heartbeat.allow(liveness.FRONT_START_ALLOWANCE_S)
    assert heartbeat.stood_still_s(started_s + liveness.FRONT_START_ALLOWANCE_S - 1) == 0.0
    assert heartbeat.stood_still_s(started_s + liveness.FRONT_START_ALLOWANCE_S + 20) >= 19.0
