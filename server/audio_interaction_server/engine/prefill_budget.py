"""What one client address may have the engine prefill: a token bucket of system-prompt tokens per address.

A session whose system prompt is not kept (``prefix_kv.py``) starts with a long row that feeds the whole prompt.
Every other budget is a connection's, so an address that opens session after session, each with a new prompt,
made the engine feed prompt after prompt, and every stream's decisions waited behind those rows
(docs/reliability.md, prompt churn). ``PrefillBudget`` charges an address the prompt tokens its new session
makes the engine feed, and nothing for a prompt whose keys and values are kept. Past its budget the open is
refused (``EndCode.RATE_LIMITED``, close 1013) with the seconds to wait; a refused open costs nothing.

Why here, in the engine: it is the one place that sees the sessions of every front (``serve --fronts N``
gives each front its own sockets, limits and buckets), and the one that knows whether a prompt is kept now.
The fronts pass each session's client address with its open (``OpenSession``, ``wire.OpenRemote``); an IPv6
client's is its /64 network (``api/addresses.py``), so it cannot take a fresh budget at each of its addresses.

A prompt longer than the burst runs from a full bucket and leaves the bucket in debt, so it costs its whole
length in waiting: the sustained rate holds whatever the prompts' sizes. At most ``max_tracked`` addresses are
remembered, the least recently charged forgotten first (forgetting one only gives it a full bucket sooner).

Sans-I/O: time is an argument (``now_s``, monotonic). Not thread-safe (the worker thread's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from audio_interaction_server.recent import RecentTable

LOG_EVERY_S = 10.0  # an address refused again and again is logged once per this many seconds, with a count
_SLACK = 1e-9


@dataclass
class _Bucket:
    tokens: float  # below 0: a prompt longer than the burst is still being paid for
    at_s: float
    num_refused_unlogged: int = 0
    logged_at_s: float | None = None


@dataclass(frozen=True)
class PrefillRefusal:
    """An open the budget refused: when the address may try again, and what to log (None: nothing this time)."""

    retry_after_s: float
    num_refused_to_log: int | None  # refusals of the address since its last line, this one included

    @property
    def told_wait_s(self) -> float:
        """The wait a client is told, in tenths of a second, rounded up: a retry exactly then is admitted (rounded
        to the nearest tenth, it could come up to 0.05 s early and be refused again)."""
        return max(0.1, math.ceil(round(self.retry_after_s * 10, 6)) / 10)


class PrefillBudget:
    def __init__(self, tokens_per_s: float, burst_tokens: int, max_tracked: int = 65_536) -> None:
        self.tokens_per_s = tokens_per_s
        self.burst_tokens = burst_tokens
        self._buckets: RecentTable[_Bucket] = RecentTable(max_tracked)

    def charge(self, address: str, num_tokens: int, now_s: float) -> PrefillRefusal | None:
        """Spend ``num_tokens`` of ``address``'s budget (None), or refuse and spend nothing."""
        bucket = self._buckets.use(address, lambda: _Bucket(float(self.burst_tokens), now_s))
        if now_s > bucket.at_s:
            bucket.tokens = min(float(self.burst_tokens), bucket.tokens + (now_s - bucket.at_s) * self.tokens_per_s)
            bucket.at_s = now_s
        needed = min(num_tokens, self.burst_tokens)  # a prompt longer than the burst needs a full bucket
        if bucket.tokens + _SLACK >= needed:
            bucket.tokens -= num_tokens
            return None
        bucket.num_refused_unlogged += 1
        to_log = None
        if bucket.logged_at_s is None or now_s - bucket.logged_at_s >= LOG_EVERY_S:
            to_log, bucket.num_refused_unlogged, bucket.logged_at_s = bucket.num_refused_unlogged, 0, now_s
        return PrefillRefusal((needed - bucket.tokens) / self.tokens_per_s, to_log)

    def describe(self) -> str:
        """The budget in words, for a refused client and the log."""
        return f"{self.burst_tokens} tokens at once, then {self.tokens_per_s:g} a second"

    def __len__(self) -> int:
        return len(self._buckets)
