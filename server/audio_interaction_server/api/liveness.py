"""A server's event loop, watched from outside it: the time of the loop's latest turn (``LoopHeartbeat``), judged
by the supervisor of several fronts (api/fronts.py), or, in a server of one process, by a thread of its own
(``LoopWatchdog``)."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

# How long a front may take to start (imports, the app) before its loop's first tick; past it, and then
# front_hang_timeout_s more, it is killed as one that hangs.
FRONT_START_ALLOWANCE_S = 60.0
# How often a judge looks at heartbeats; a look this much later than the last means the judge's own process stood
# still (the container paused, the host stalled), and the loops it watches, frozen with it, had no turn either.
WATCH_S = 0.5
WATCH_LATE_S = 2.0
# A hung server's exit waits this long at most for its last log line: the loop may hang holding what the line needs
# (a logging lock, a full stderr pipe).
HUNG_EXIT_BACKSTOP_S = 5.0


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


class HangJudge:
    """How long watched loops have stood still, as seen by a thread that looks every ``WATCH_S``. Stillness counts
    only from the end of the judge's own last pause: after a pause of the whole process tree, every heartbeat is
    old before the loops have had their turn, and all would be judged hung at once."""

    def __init__(self) -> None:
        self._looked_s: float | None = None
        self._judged_from_s = -math.inf

    def look(self, now_s: float) -> bool:
        """A look at ``now_s``; False when the judge itself stood still since the last (nothing is judged now)."""
        looked_s, self._looked_s = self._looked_s, now_s
        if looked_s is not None and now_s - looked_s > WATCH_LATE_S:
            self._judged_from_s = now_s
            return False
        return True

    def stood_still_s(self, heartbeat: LoopHeartbeat, now_s: float) -> float:
        return min(heartbeat.stood_still_s(now_s), now_s - self._judged_from_s)


class LoopWatchdog:
    """A server of one process (no supervisor of fronts) watches its own event loop from a thread: a loop that has
    not turned for ``timeout_s`` (a deadlock, a blocking call that never returns) is logged with the stack it stands
    in, and ``exit_process(exit_status)`` ends the process at once.

    Why: such a server still holds its port and its sessions, hears nothing and answers nothing, and nothing inside
    the loop can see it; Kubernetes' liveness probe restarts it, but Docker's restart policy ignores a failing health
    check, so under Compose it would hang until someone noticed. Exiting non-zero hands it to the restart policy."""

    def __init__(self, heartbeat: LoopHeartbeat, timeout_s: float, exit_status: int,
                 exit_process: Callable[[int], object] = os._exit) -> None:
        self.heartbeat = heartbeat
        self.timeout_s = timeout_s
        self.exit_status = exit_status
        self.exit_process = exit_process
        self.judge = HangJudge()
        self._loop_thread_id = threading.get_ident()  # built on the thread that runs the loop

    def start(self) -> None:
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def hung_for_s(self, now_s: float) -> float | None:
        """How long the loop has stood still, once that is over ``timeout_s``; else None."""
        if not self.judge.look(now_s):
            return None
        stood_still_s = self.judge.stood_still_s(self.heartbeat, now_s)
        return stood_still_s if stood_still_s > self.timeout_s else None

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_S)
            hung_for_s = self.hung_for_s(time.monotonic())
            if hung_for_s is not None:
                break
        backstop = threading.Timer(HUNG_EXIT_BACKSTOP_S, os._exit, (self.exit_status,))
        backstop.daemon = True
        backstop.start()
        frame = sys._current_frames().get(self._loop_thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(its thread has ended)\n"
        log.error("the event loop has not turned for %.1f s (front_hang_timeout_s %g): the server hangs, and exits "
                  "with status %d so that it is restarted; the loop's thread stands in:\n%s", hung_for_s,
                  self.timeout_s, self.exit_status, stack.rstrip("\n"))
        self.exit_process(self.exit_status)
