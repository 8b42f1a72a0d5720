"""A front's event loop, watched from its supervisor: the shared time of the loop's latest turn (api/fronts.py)."""

from __future__ import annotations

import multiprocessing
import time


class LoopHeartbeat:
    """When a front's event loop last turned, in memory shared with its supervisor, which kills a front whose loop
    stands still. Written at each of uvicorn's ticks (10 a second), and by a task of its own while the server shuts
    down; CLOCK_MONOTONIC is one clock for every process of a host. 0 means not watched: a front still starting
    (imports, no loop yet), or one whose loop has ended (what is left of the process has bounded waits)."""

    def __init__(self) -> None:
        # Shared memory handed to the front process as it is started (pickled with its FrontSpec then, only).
        self._last_s = multiprocessing.get_context("spawn").RawValue("d", 0.0)

    def beat(self) -> None:
        self._last_s.value = time.monotonic()

    def stop(self) -> None:
        self._last_s.value = 0.0

    def stood_still_s(self, now_s: float) -> float:
        """Seconds since the loop last turned; 0 while not watched."""
        last_s = self._last_s.value
        return 0.0 if last_s == 0.0 else now_s - last_s
