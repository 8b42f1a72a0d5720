"""Logging that a hostile client cannot amplify: a burst of one warning becomes two lines.

A flood of bad connections makes uvicorn and asyncio log the same warning (often with a
traceback) once per connection; at the descriptor limit that was 176k tracebacks, 74 MB, in
40 s, which costs more than the connections themselves. ``BurstLimiter`` is a logging filter:
the first record of a kind in each window passes (traceback included); the rest are counted,
and the count is written as one line when the window closes. Thread-safe (the filter runs on
whichever thread logs).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

# INFO lines uvicorn writes once per refused WebSocket handshake (its access line for it, and websockets' "connection
# rejected"): folded as warnings are. A flood of refused connections (429 past connect_rate_per_ip, 404 on a path no
# WebSocket route serves) wrote two lines a connection, ~100 KB of log a second from one address (hostile probe,
# round ten). An accepted handshake's lines ("[accepted]", "connection open") are another template: never held back.
FOLDED_INFO_MESSAGES = frozenset({'%s - "WebSocket %s" %d', "connection rejected (%d %s)"})

# Records are grouped by logger, level, the message's first line and the exception type;
# beyond this many kinds, the rest share one (a message with a varying first line cannot
# grow the table without bound).
MAX_KINDS = 256


@dataclass
class _Burst:
    started_s: float
    record: logging.LogRecord  # the first of the burst: what the summary line speaks of
    num_suppressed: int = 0


class BurstLimiter(logging.Filter):
    """Passes the first WARNING-or-above record of a kind per ``window_s`` (and of the INFO lines of refused
    handshakes, ``FOLDED_INFO_MESSAGES``); counts the others."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._bursts: dict[tuple, _Burst] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "is_burst_summary", False):
            return True
        folded = isinstance(record.msg, str) and record.msg in FOLDED_INFO_MESSAGES
        if record.levelno < logging.WARNING and not folded:
            return True
        now_s = time.monotonic()
        with self._lock:
            key = _kind(record) if len(self._bursts) < MAX_KINDS else ("other kinds",)
            burst = self._bursts.get(key)
            if burst is not None and now_s - burst.started_s < self.window_s:
                burst.num_suppressed += 1
                return False
            self._bursts[key] = _Burst(now_s, record)
        if burst is not None:
            _write_summary(burst, now_s)
        return True

    def flush(self, now_s: float | None = None, everything: bool = False) -> None:
        """Write the count of every burst whose window has closed (call periodically); ``everything``: of every
        burst, closed or not (at shutdown)."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            ended = [(key, burst) for key, burst in self._bursts.items()
                     if everything or now_s - burst.started_s >= self.window_s]
            for key, _ in ended:
                del self._bursts[key]
        for _, burst in ended:
            _write_summary(burst, now_s)


class SharedBurstLimiter:
    """The one ``BurstLimiter`` of the process on the named loggers, installed while any server runs.

    Loggers are process-wide, so two servers in one process (tests, an embedder) must share one
    filter: with one each, the first would count a burst the second never sees.
    """

    def __init__(self, logger_names: tuple[str, ...], window_s: float = 10.0) -> None:
        self.logger_names = logger_names
        self.limiter = BurstLimiter(window_s)
        self._num_users = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._num_users += 1
            if self._num_users == 1:
                for name in self.logger_names:
                    logging.getLogger(name).addFilter(self.limiter)

    def release(self) -> None:
        """Write every pending count; the last user also takes the filter off."""
        self.limiter.flush(everything=True)
        with self._lock:
            self._num_users -= 1
            if self._num_users == 0:
                for name in self.logger_names:
                    logging.getLogger(name).removeFilter(self.limiter)


def _kind(record: logging.LogRecord) -> tuple:
    first_line = str(record.msg).split("\n", 1)[0]
    error_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
    return record.name, record.levelno, first_line, error_type


def _write_summary(burst: _Burst, now_s: float) -> None:
    if burst.num_suppressed == 0:
        return
    first = burst.record
    message = first.getMessage().split("\n", 1)[0]
    logging.getLogger(first.name).log(
        first.levelno, "%d more like this in %.0f s (not logged one by one): %s", burst.num_suppressed,
        now_s - burst.started_s, message, extra={"is_burst_summary": True})
