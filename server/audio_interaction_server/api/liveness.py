"""A front's event loop, watched from its supervisor: the shared time of the loop's latest turn (api/fronts.py)."""

from __future__ import annotations

import multiprocessing
import time


# How long a front may take to start (imports, the app) before its loop's first tick; past it, and then
# front_hang_timeout_s more, it is killed as one that hangs.
FRONT_START_ALLOWANCE_S = 60.0


class LoopHeartbeat:
    """When a front's event loop last turned, in memory shared with its supervisor, which kills a front whose loop
    stands still. Written at each of uvicorn's ticks (10 a second), by a task of its own while the server shuts
    down, and once more when its loop has ended (the process must then end within the same bound); a front starting
    is allowed ``FRONT_START_ALLOWANCE_S`` for its imports first. CLOCK_MONOTONIC is one clock for every process of
    a host. 0 means not watched (a front that is not running, or already killed)."""

    def __init__(self) -> None:
        # Shared memory handed to the front process as it is started (pickled with its FrontSpec then, only).
        self._last_s = multiprocessing.get_context("spawn").RawValue("d", 0.0)

    def beat(self) -> None:
        self._last_s.value = time.monotonic()

    def stop(self) -> None:
        self._last_s.value = 0.0

    def allow(self, seconds: float) -> None:
        """The loop need not turn for ``seconds`` from now (a front's start: its imports, before any loop runs);
        past that, it is judged as one that stopped turning."""
        self._last_s.value = time.monotonic() + seconds

    def stood_still_s(self, now_s: float) -> float:
        """Seconds since the loop last turned (or since its allowance ran out); 0 while not watched."""
        last_s = self._last_s.value
        return 0.0 if last_s == 0.0 else max(0.0, now_s - last_s)
