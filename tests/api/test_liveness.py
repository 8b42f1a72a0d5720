"""A front's heartbeat (api/liveness.py), as its server writes it: while serving, and while shutting down."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import types

import pytest
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


def test_a_watchdog_judges_its_loop_hung_past_the_timeout_but_not_after_its_own_pause():
    """A server of one process watches its own loop (LoopWatchdog): past the timeout it is hung; a look that came
    late (the whole process stood still: a paused container) judges nothing, and stillness counts from there."""
    from audio_interaction_server.api.liveness import WATCH_S, LoopWatchdog

    heartbeat = LoopHeartbeat()
    watchdog = LoopWatchdog(heartbeat, timeout_s=2.0, exit_status=1)
    now_s = time.monotonic()
    heartbeat.beat()
    looks = []
    for _ in range(6):  # 3 s of looks, the loop silent
        now_s += WATCH_S
        looks.append(watchdog.hung_for_s(now_s))
    assert looks[:3] == [None] * 3 and looks[-1] is not None and looks[-1] > 2.0, looks
    heartbeat.beat()
    now_s += 60.0  # the process itself stood still: its loop had no turn either
    assert watchdog.hung_for_s(now_s) is None
    assert [watchdog.hung_for_s(now_s := now_s + WATCH_S) for _ in range(4)] == [None] * 4
    assert all(watchdog.hung_for_s(now_s := now_s + WATCH_S) is not None for _ in range(2))


BLOCKING_SIGNAL_HANDLER = """
# Loaded by every Python process started with this folder first on PYTHONPATH: a SIGUSR1 makes the main thread (the
# server's event loop) block for ever, as a deadlock or a call that never returns would; its other threads live on.
import signal
import threading


def _block_for_ever(signum, frame):
    threading.Event().wait()


signal.signal(signal.SIGUSR1, _block_for_ever)
"""


@pytest.mark.parametrize("transport", ["thread", "process"])
def test_a_server_of_one_process_whose_event_loop_hangs_exits_1_with_the_loops_stack(tiny_checkpoint, tmp_path,
                                                                                      transport):
    """Without a supervisor of fronts nothing watched the loop: a server whose loop hung kept its port and its
    sessions and answered nothing, for ever under Docker's restart policy (which ignores a failing health check).
    It now exits 1 after front_hang_timeout_s, the loop's stack in the log, its engine process with it."""
    from websockets.sync.client import connect

    from audio_interaction_server.engine.process import process_has_ended
    from benchmarks.harness import spawn_server
    from tests.api.test_app import recv_event
    from tests.engine.test_fronts_faults import descendants

    (tmp_path / "sitecustomize.py").write_text(BLOCKING_SIGNAL_HANDLER)
    python_path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    process, port = spawn_server(tiny_checkpoint, {"PYTHONPATH": python_path, "AIS_FRONT_HANG_TIMEOUT_S": "2",
                                                   "AIS_ENGINE__TRANSPORT": transport})
    children = descendants(process.pid)
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
            assert recv_event(ws)["type"] == "session.created"
            os.kill(process.pid, signal.SIGUSR1)
            hung_s = time.monotonic()
            assert process.wait(30) == 1
        assert time.monotonic() - hung_s < 15
        for pid in children:  # the engine process, with the process transport
            deadline = time.monotonic() + 10
            while not process_has_ended(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert process_has_ended(pid), descendants(pid)
    finally:
        if process.poll() is None:
            process.kill()
        for pid in children:
            if not process_has_ended(pid):
                os.kill(pid, signal.SIGKILL)
    log = process.stderr.read()
    assert re.search(r"the event loop has not turned for [\d.]+ s \(front_hang_timeout_s 2\)", log), log
    assert "_block_for_ever" in log, log  # where it stands
    assert (transport == "process") == bool(children), children
