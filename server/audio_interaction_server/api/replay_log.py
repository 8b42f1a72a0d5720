"""What a ``/v1/stream`` session keeps so that a client whose connection dropped can resume it (docs/protocol.md,
resume): its newest events, numbered and bounded (``ReplayLog``), what a resume may do (``ResumePolicy``), and what
an event weighs in bytes for those bounds and the outbox's (``event_bytes``). Event loop only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

# A text delta's JSON beside its text (type, session id, times, turn): its size without serialising it,
# which would double the cost of the most frequent event.
DELTA_ENVELOPE_BYTES = 160


def event_bytes(event) -> int:
    """What one event weighs while it waits or is kept, estimated as its JSON length."""
    if event.type == "text_delta":
        return DELTA_ENVELOPE_BYTES + len(event.text)
    return len(event.model_dump_json(exclude_none=True))


@dataclass(frozen=True)
class ResumePolicy:
    """How a ``/v1/stream`` session outlives a dropped connection (docs/protocol.md, resume)."""

    grace_s: float  # how long a detached session waits for its client
    max_events: int  # events kept for a replay; while detached, one more ends the session
    max_bytes: int  # the same bound in bytes (as the outbox counts them): a few long echoes weigh as much
    # Resumes a session may make (flood.resumes_per_s, flood.resume_burst): each replays up to max_events on the
    # event loop every session shares, and a client that resumes in a loop would replay its log over and over.
    resumes_per_s: float
    resume_burst: int


class ReplayLog:
    """A session's most recent events, numbered, so a resuming client gets exactly what it missed.

    Bounded in events and in bytes (each event counted as the outbox counted it while queued, ``event_bytes``, or
    as the text it went out as when it was written at once): 2,000 events that each echo an 8,000-character system
    prompt would otherwise hold 16 MB of text alone."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._events: deque[tuple[Any, int]] = deque()  # (event, the bytes it counts for)
        self.num_bytes = 0
        self.last_seq = 0

    def stamp(self, event, size: int | None = None, *, keep: bool, trim: bool = True):
        """``event`` numbered (``number``); with ``keep`` also held for a replay (``keep``), counted as ``size`` or,
        without one, as its ``event_bytes``."""
        numbered = self.number(event)
        if keep:
            self.keep(numbered, event_bytes(numbered) if size is None else size, trim)
        return numbered

    def number(self, event):
        """A copy of ``event`` with the session's next number (1, 2, 3, ...)."""
        self.last_seq += 1
        return event.model_copy(update={"seq": self.last_seq})

    def keep(self, numbered, size: int, trim: bool = True) -> None:
        """Hold a numbered event for a replay, counted as ``size`` bytes: as the outbox counted it while queued,
        or as the text it went out as (the log's bound is the same estimate, so the event is not serialised once
        more to be counted). With ``trim`` (the client is connected) the log stays a window of the newest events;
        without it, it grows."""
        self._events.append((numbered, size))
        self.num_bytes += size
        while trim and self.is_over_limit:
            self.num_bytes -= self._events.popleft()[1]

    def __len__(self) -> int:
        return len(self._events)

    @property
    def is_over_limit(self) -> bool:
        return len(self._events) > self.max_events or self.num_bytes > self.max_bytes

    def make_room(self, keep_after_seq: int) -> bool:
        """While over a bound, drop the oldest events numbered up to ``keep_after_seq`` (those a detached session
        sent before its socket ended: a window, as while connected); whether the log is now within its bounds.
        False: the events since then alone are over a bound."""
        while self.is_over_limit and self._events and self._events[0][0].seq <= keep_after_seq:
            self.num_bytes -= self._events.popleft()[1]
        return not self.is_over_limit

    def since(self, last_seq: int) -> list | None:
        """The events after ``last_seq``, or None when some of them are no longer held."""
        first_held = self._events[0][0].seq if self._events else self.last_seq + 1
        if not first_held - 1 <= last_seq <= self.last_seq:
            return None
        return [event for event, _ in self._events if event.seq > last_seq]
