"""What one connection may make the event loop do: token buckets a session spends as its client sends.

The event loop is shared by every session, and through the GIL by the worker thread too: a client
that keeps it busy (frames refused as fast as its socket takes them, thousands of text events, a
new long system prompt to tokenise every few milliseconds) makes every neighbour's decisions late.
A ``FloodGuard`` gives each session four budgets (``config.FloodLimits``):

- text events (everything but audio, refused ones included), a frame heavy in JSON items counting more
  (``JSON_ITEMS_PER_EVENT``, before it is parsed): a client past it is cut (1008);
- audio refused, in seconds (a frame counts at least 10 ms): for a full buffer (``audio_buffer_full``), for
  what it holds (``invalid_audio``: not whole samples, not finite), empty, or sent while the session closes. A
  real-time client whose server fell behind, or whose every frame is bad, is refused at most 1x real time and
  never runs out (with frames of 5 ms or more: a frame counts at least 10 ms, refilled at 2x); a client whose
  frames are refused faster than that is cut (1008);
- system prompt characters checked (tokenised) on the event loop: past it, the event is refused
  with ``rate_limited`` and may be sent again later. This one is the client address's, shared by its sessions
  (``AddressBuckets``): refused without a cut, a client could otherwise refill it by reconnecting, at will.
- JSON items of frames heavy in them, over all of a client address's sessions (``AddressBuckets``, as much as
  one session's event budget holds, ``JSON_ITEMS_PER_EVENT`` per event): past it, such a frame is refused unparsed
  with ``rate_limited``. The session's own event budget is a fresh one at every connection, and one frame of
  ~50,000 items within it took ~0.4 s of the loop to refuse (a Realtime list of 49,000 wrong items): an address
  opening 9 connections a second, each sending one such frame, kept the loop busy and made a neighbour's decisions
  seconds late (hostile probe, round ten).

The first two are a session's, so a client cut for a flood that reconnects at once would start with full ones:
``CutCooldown`` refuses its address new connections for a while (admission answers HTTP 429).

Sans-I/O: time is an argument (``now_s``, monotonic). Not thread-safe (the event loop's).
"""

from __future__ import annotations

from audio_interaction_server.api.addresses import client_key
from audio_interaction_server.config import FloodLimits
from audio_interaction_server.recent import RecentTable

# A refused frame costs at least this much audio: a flood of one-sample frames is a flood too.
MIN_REFUSED_FRAME_S = 0.01
# A text frame with this many JSON items (commas and colons, counted before it is parsed) costs one more event: the
# parse and validation of a frame grow with its items (256 KiB of 21,000 unknown keys took ~60 ms), not with
# its bytes (a base64 audio string is one item however long). An 8,000-character system prompt of nothing but
# commas would cost 31; a frame with more items than the whole burst is cut unparsed.
JSON_ITEMS_PER_EVENT = 256

_SLACK = 1e-9  # float sums of exact budgets (0.1 s frames) must not refuse the last one


def json_items_rate_and_burst(limits: FloodLimits) -> tuple[float, float]:
    """A client address's budget of the JSON items of heavy frames: what one session's event budget holds."""
    return limits.events_per_s * JSON_ITEMS_PER_EVENT, float(limits.event_burst * JSON_ITEMS_PER_EVENT)


def json_items_bucket(limits: FloodLimits, now_s: float) -> TokenBucket:
    return TokenBucket(*json_items_rate_and_burst(limits), now_s)


class TokenBucket:
    """``burst`` at once, refilled at ``rate_per_s``; starts full."""

    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._tokens = self.burst
        self._at_s = now_s

    def take(self, amount: float, now_s: float) -> bool:
        """Spend ``amount`` if the bucket holds it (True); otherwise spend nothing (False)."""
        self._refill(now_s)
        if amount > self._tokens + _SLACK:
            return False
        self._tokens = max(0.0, self._tokens - amount)
        return True

    def take_or_wait_s(self, amount: float, now_s: float) -> float:
        """0, and ``amount`` spent, if the bucket holds it; else the seconds until it would (nothing spent)."""
        return 0.0 if self.take(amount, now_s) else self.wait_s(amount, now_s)

    def wait_s(self, amount: float, now_s: float) -> float:
        """Seconds until ``amount`` could be taken (0 = now)."""
        self._refill(now_s)
        return max(0.0, (amount - self._tokens) / self.rate_per_s)

    def _refill(self, now_s: float) -> None:
        if now_s > self._at_s:
            self._tokens = min(self.burst, self._tokens + (now_s - self._at_s) * self.rate_per_s)
            self._at_s = now_s


class AddressBuckets:
    """A ``TokenBucket`` per client address (``addresses.client_key``: an IPv6 client's /64), shared by all of the
    address's sessions. At most ``max_tracked`` addresses are remembered, the least recently seen forgotten first
    (forgetting one only gives its next session a full bucket)."""

    def __init__(self, rate_per_s: float, burst: float, max_tracked: int = 65_536) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: RecentTable[TokenBucket] = RecentTable(max_tracked)

    def bucket(self, address: str, now_s: float) -> TokenBucket:
        return self._buckets.use(client_key(address), lambda: TokenBucket(self.rate_per_s, self.burst, now_s))

    def __len__(self) -> int:
        return len(self._buckets)


class FloodGuard:
    def __init__(self, limits: FloodLimits, now_s: float, prompt_chars: TokenBucket | None = None,
                 json_items: TokenBucket | None = None) -> None:
        """``prompt_chars``, ``json_items``: the client address's budgets of prompt characters and of the JSON items
        of heavy frames (``AddressBuckets``); None: one of the session's own (a session without a client address)."""
        self.limits = limits
        self._events = TokenBucket(limits.events_per_s, limits.event_burst, now_s)
        self._refused_audio_s = TokenBucket(limits.refused_audio_speed, limits.refused_audio_burst_s, now_s)
        self._prompt_chars = prompt_chars or TokenBucket(limits.prompt_chars_per_s, limits.prompt_char_burst, now_s)
        self._json_items = json_items or json_items_bucket(limits, now_s)

    def allows_event(self, now_s: float) -> bool:
        """One text event; False: the client floods (cut it)."""
        return self._events.take(1.0, now_s)

    def allows_json_items(self, num_items: int, now_s: float) -> bool:
        """A text frame's JSON items, before it is parsed (``JSON_ITEMS_PER_EVENT`` per event token); False: the
        client floods (cut it). The frame's own event is counted as any other, once it is decoded."""
        if num_items > self.limits.event_burst * JSON_ITEMS_PER_EVENT:  # more than any budget holds: cut unread
            return False
        cost = num_items // JSON_ITEMS_PER_EVENT
        return cost == 0 or self._events.take(float(cost), now_s)

    def json_items_wait_s(self, num_items: int, now_s: float) -> float:
        """0 and ``num_items`` spent from the client address's budget when a frame that heavy may be parsed now; else
        seconds to wait (nothing spent)."""
        return self._json_items.take_or_wait_s(float(num_items), now_s)

    def allows_refused_audio(self, frame_s: float, now_s: float) -> bool:
        """One audio frame refused (not taken, whatever the reason); False: the client floods (cut it). A frame
        counts at least ``MIN_REFUSED_FRAME_S`` and at most the whole burst, so one long frame alone is answered,
        not cut."""
        return self._refused_audio_s.take(min(max(frame_s, MIN_REFUSED_FRAME_S), self.limits.refused_audio_burst_s),
                                          now_s)

    def prompt_wait_s(self, num_chars: int, now_s: float) -> float:
        """0 and ``num_chars`` spent when a prompt that long may be checked now; else seconds to wait."""
        return self._prompt_chars.take_or_wait_s(num_chars, now_s)

    def event_flood_message(self) -> str:
        return (f"more than {self.limits.event_burst} events at once or {self.limits.events_per_s:g} a second "
                "after that; closing")

    def audio_flood_message(self) -> str:
        return (f"audio keeps being refused faster than real time (into a full buffer, not valid audio, or while the "
                f"session closes; more than {self.limits.refused_audio_burst_s:g} s refused at once, or "
                f"{self.limits.refused_audio_speed:g} s a second after that); closing: send valid audio no faster "
                "than real time")


# The session end reasons that are a flood cut: the session's own (api/session.py _cut_off) and the transport's, whose
# socket was closed for a flood of frames (api/websocket_guard.py, DirectMessages.cut_reason).
FLOOD_CUTS = frozenset({"audio_flood", "event_flood", "data_frame_flood", "control_frame_flood"})


class CutCooldown:
    """Client addresses whose session was cut for a flood, and until when they may not connect again.

    The first cut costs ``cooldown_s``; a cut within one cooldown after the last one ended doubles it (up to
    ``max_cooldown_s``), so a client that floods, reconnects and floods again waits longer each time, while one
    that misbehaved once is back after ``cooldown_s``. At most ``max_tracked`` addresses are remembered, the
    least recently cut forgotten first (forgetting one only lets it in sooner). An IPv6 address counts with its
    /64 (``addresses.client_key``): a cut client may not come back from the next address of its network.
    """

    def __init__(self, cooldown_s: float, max_cooldown_s: float, max_tracked: int = 65_536) -> None:
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        # client key -> (refused until, cooldown)
        self._cuts: RecentTable[tuple[float, float]] = RecentTable(max_tracked)

    def cut(self, address: str, now_s: float) -> float:
        """``address``'s session was cut now; returns how long it is refused."""
        key = client_key(address)
        until_s, last_cooldown_s = self._cuts.get(key) or (-1.0, 0.0)
        again_soon = now_s < until_s + last_cooldown_s
        cooldown_s = min(self.max_cooldown_s, 2 * last_cooldown_s) if again_soon else self.cooldown_s
        self._cuts.put(key, (now_s + cooldown_s, cooldown_s))
        return cooldown_s

    def impose(self, address: str, until_s: float, cooldown_s: float) -> None:
        """Another front of the same engine cut ``address`` (engine/wire.py, ``AddressCut``): refused here until
        ``until_s`` too, and a cut here soon after doubles that cooldown, as if it had been this front's."""
        key = client_key(address)
        current_until_s, _ = self._cuts.get(key) or (-1.0, 0.0)
        if until_s > current_until_s:
            self._cuts.put(key, (until_s, cooldown_s))

    def retry_after_s(self, address: str, now_s: float) -> float | None:
        """None when ``address`` may connect now; else seconds until it may."""
        entry = self._cuts.get(client_key(address))
        if entry is None or now_s >= entry[0]:
            return None
        return entry[0] - now_s

    def __len__(self) -> int:
        return len(self._cuts)
