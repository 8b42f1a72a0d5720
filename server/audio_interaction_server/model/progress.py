"""Progress of the long steps before a server serves: the checkpoint download and the weight load.

The first ``--checkpoint owner/name`` downloads about 15 GB and the load reads several shards of
gigabytes, so an operator (the log) and a probe (``/ready``) need to see that work goes on and
how long it will take. ``LoadProgress`` is that state: the loader thread reports into it
(``begin`` a phase, ``advance`` it, ``finish`` it); it logs a line at the start, at most one every
``log_interval_s`` while the work goes on, and one at the end; ``report()`` is what ``/ready``
shows.

Threading contract: one thread (the model loader) writes, any thread reads ``report()``; a lock
guards the few numbers, so a reader never sees a total from one phase with the bytes of another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_LOG_INTERVAL_S = 5.0  # a line every 5 s: a 15 GB download at 100 MB/s logs ~30 lines


@dataclass(frozen=True)
class ProgressReport:
    """Where a phase stands. ``unit`` names the counted things ("bytes", "shards"); ``total`` is None
    while unknown; ``rate_per_s`` and ``eta_s`` are None until something was counted."""

    phase: str  # "downloading" | "loading"
    unit: str
    done: float
    total: float | None
    rate_per_s: float | None
    eta_s: float | None
    elapsed_s: float
    is_finished: bool

    def as_json(self) -> dict[str, object]:
        """``{"phase", "<unit>_done", "<unit>_total", "rate_<unit>_per_s", "eta_s"}`` (``/ready``'s ``progress``)."""
        integral = self.unit in ("bytes", "shards", "files")
        return {
            "phase": self.phase,
            f"{self.unit}_done": int(self.done) if integral else self.done,
            f"{self.unit}_total": None if self.total is None else (int(self.total) if integral else self.total),
            f"rate_{self.unit}_per_s": None if self.rate_per_s is None else round(self.rate_per_s, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }

    def describe(self) -> str:
        """One log line: ``downloading: 1.20 GB of 15.20 GB (8%), 110.0 MB/s, about 2 min 7 s left``."""
        if self.total and self.unit != "bytes":
            amount = f"{self.done:.0f} of {_amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        elif self.total:
            amount = f"{_amount(self.done, self.unit)} of {_amount(self.total, self.unit)} " \
                     f"({100 * self.done / self.total:.0f}%)"
        else:
            amount = _amount(self.done, self.unit)
        if self.is_finished and not self.done:
            return f"{self.phase}: nothing to do"
        if self.is_finished:
            return f"{self.phase}: done, {amount} in {_duration(self.elapsed_s)}"
        parts = [f"{self.phase}: {amount}"]
        if self.rate_per_s is not None:
            parts.append(f"{_amount(self.rate_per_s, self.unit)}/s")
        if self.eta_s is not None:
            parts.append(f"about {_duration(self.eta_s)} left")
        return ", ".join(parts)


class LoadProgress:
    """The progress of one phase at a time (a later ``begin`` replaces the earlier phase)."""

    def __init__(self, log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None) -> None:
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._log = logger or log
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._unit = ""
        self._what = ""
        self._done = 0.0
        self._total: float | None = None
        self._started_s = 0.0
        self._logged_s = 0.0
        self._finished_s: float | None = None

    def begin(self, phase: str, unit: str, total: float | None = None, what: str = "") -> None:
        """Start counting ``unit`` for ``phase`` (``what`` names the work in the log, e.g. the repo id)."""
        with self._lock:
            self._phase, self._unit, self._what = phase, unit, what
            self._done = 0.0
            self._total = total
            self._started_s = self._logged_s = self._clock()
            self._finished_s = None
        self._log.info("%s%s started%s", phase, f" {what}" if what else "",
                       f" ({_amount(total, unit)})" if total else "")

    def set_total(self, total: float) -> None:
        """The total is known now, or grew (a download learns each file's size as the file starts)."""
        with self._lock:
            self._total = total

    def advance(self, amount: float = 1) -> None:
        with self._lock:
            if self._phase is None or self._finished_s is not None:
                return
            self._done += amount
            now = self._clock()
            is_due = now - self._logged_s >= self.log_interval_s
            if is_due:
                self._logged_s = now
        if is_due:
            report = self.report()
            if report is not None:
                self._log.info("%s", report.describe())

    def finish(self) -> None:
        with self._lock:
            if self._phase is None or self._finished_s is not None:
                return
            self._finished_s = self._clock()
        report = self.report()
        if report is not None:
            self._log.info("%s", report.describe())

    def report(self) -> ProgressReport | None:
        """The current phase's numbers; None before any phase began."""
        with self._lock:
            if self._phase is None:
                return None
            end_s = self._finished_s if self._finished_s is not None else self._clock()
            elapsed_s = max(0.0, end_s - self._started_s)
            rate = self._done / elapsed_s if self._done > 0 and elapsed_s > 0 else None
            eta = None
            if rate is not None and self._total is not None and self._finished_s is None:
                eta = max(0.0, self._total - self._done) / rate
            return ProgressReport(self._phase, self._unit, self._done, self._total, rate, eta, elapsed_s,
                                  is_finished=self._finished_s is not None)


def _amount(value: float, unit: str) -> str:
    if unit != "bytes":
        return f"{value:.0f} {unit}" if float(value).is_integer() else f"{value:.2f} {unit}"
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= scale:
            return f"{value / scale:.2f} {name}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"
