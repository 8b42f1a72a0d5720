"""Catch-up pacing: how fast a session's audio backlog is heard.

Audio that waits (queued while the session spoke, sent faster than real time, re-sent after a resume) is heard at
full speed up to a burst (``engine.catch_up_burst_s``), beyond that at ``engine.max_catch_up_speed`` x real time: a
client sending audio far faster than real time would otherwise keep the worker, and with it the CPU, busy for every
other session (docs/reliability.md, hostile clients). Replies are never paced.

Two token buckets of listening rows, each holding at most the burst:

- a session's own, refilled at the catch-up speed, which starts empty when the session has a client address: what
  it earns while connected is its own, so a real-time stream (one row per 0.4 s, earning several) never waits;
- its client address's, shared by the address's sessions (over every front of this engine), refilled at real
  time: the opening backlog of a new session, and any backlog a session's own bucket cannot cover, is paid from
  it, up to one burst in a session's life (it pays an opening backlog, not a second catch-up speed beside the
  session's own). Before, every session started with a full burst of its own, so connection churn (each
  connection sending 10 s of audio at once, then leaving) was heard at full speed again and again: about 120 s of
  audio a second from one address. Now an address's sessions together catch up by what staying connected earns
  them, plus one burst, plus real time (a client replacing its session every 2.5 s: about 5x real time, against
  4x for one that stays).

A session without a client address (a Unix socket, the offline runner) starts with a full burst of its own.
At most ``max_tracked`` addresses are remembered, the least recently used forgotten first (forgetting one only
gives it a full burst sooner).

Sans-I/O: time is an argument (``now_s``, monotonic). Not thread-safe (the worker thread's).
"""

from __future__ import annotations

from dataclasses import dataclass

from audio_interaction_server.recent import RecentTable
from audio_interaction_server.spec import CHUNK_S

_SLACK = 1e-9  # float sums of exact rates must not refuse the row they earned


@dataclass
class ListenCredits:
    """A token bucket of listening rows (one row hears one 0.4 s chunk)."""

    rows: float
    at_s: float
    from_address: float = 0.0  # rows its address's bucket paid for it: at most one burst in its life

    def refill(self, now_s: float, rows_per_s: float, burst_rows: float) -> None:
        if now_s > self.at_s:
            self.rows = min(burst_rows, self.rows + (now_s - self.at_s) * rows_per_s)
            self.at_s = now_s

    @property
    def has_a_row(self) -> bool:
        return self.rows >= 1.0 - _SLACK


class CatchUpPacing:
    def __init__(self, speed: float, burst_s: float, max_tracked: int = 65_536) -> None:
        """``speed``: x real time beyond the burst; ``burst_s``: seconds of backlog heard at full speed."""
        self.rows_per_s = speed / CHUNK_S
        self.address_rows_per_s = 1.0 / CHUNK_S  # real time: at the catch-up speed, churn doubled it (review)
        self.burst_rows = burst_s / CHUNK_S
        self._addresses: RecentTable[ListenCredits] = RecentTable(max_tracked)

    def credits_for(self, client_address: str | None, now_s: float) -> ListenCredits:
        """A new session's own bucket: empty if an address pays for its opening backlog, else a full burst."""
        return ListenCredits(0.0 if client_address is not None else self.burst_rows, now_s)

    def may_listen(self, own: ListenCredits, client_address: str | None, now_s: float) -> bool:
        """Whether a listening row may run now (nothing is spent: ``spend`` does, once it is chosen)."""
        own.refill(now_s, self.rows_per_s, self.burst_rows)
        if own.has_a_row:
            return True
        shared = self._shared_for(own, client_address, now_s)
        return shared is not None and shared.has_a_row

    def spend(self, own: ListenCredits, client_address: str | None, now_s: float) -> None:
        """A row ``may_listen`` let in runs: paid from the session's own bucket, else from its address's. Two
        sessions of one address let in by its last row both pay: the bucket goes below empty, and the next row
        waits until it has refilled."""
        shared = None if own.has_a_row else self._shared_for(own, client_address, now_s)
        payer = own if shared is None else shared
        payer.rows -= 1.0
        if shared is not None:
            own.from_address += 1.0

    def _shared_for(self, own: ListenCredits, client_address: str | None, now_s: float) -> ListenCredits | None:
        """The address's bucket, while the session has drawn less than one burst from it: the address pays an
        opening backlog, not a second catch-up speed beside the session's own (a lone flooding session was heard
        at twice ``max_catch_up_speed``)."""
        if own.from_address >= self.burst_rows - _SLACK:
            return None
        return self._shared(client_address, now_s)

    def _shared(self, client_address: str | None, now_s: float) -> ListenCredits | None:
        if client_address is None:
            return None
        credits = self._addresses.use(client_address, lambda: ListenCredits(self.burst_rows, now_s))
        credits.refill(now_s, self.address_rows_per_s, self.burst_rows)
        return credits

    def __len__(self) -> int:
        """Addresses remembered."""
        return len(self._addresses)
