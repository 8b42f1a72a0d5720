"""FloodGuard's JSON-items budgets at their edge (review of 1c03676)."""

from __future__ import annotations

from audio_interaction_server.api.flood import JSON_ITEMS_PER_EVENT, FloodGuard
from audio_interaction_server.config import FloodLimits


def test_a_frame_with_more_items_than_any_budget_holds_is_cut_not_told_to_wait():
    """docs/protocol.md: a frame of more than event_burst * 256 items (51,200) is cut unread. One of 51,200 to
    51,455 items cost 200 events (items // 256) and passed the session's full budget; the address's items budget
    (51,200 at most) then refused it with rate_limited, "send it again in 0.0 s", forever: it could never fit."""
    limits = FloodLimits()
    most = limits.event_burst * JSON_ITEMS_PER_EVENT
    guard = FloodGuard(limits, 0.0)
    assert not guard.allows_json_items(most + 100, 0.0)
    fresh = FloodGuard(limits, 0.0)
    assert fresh.allows_json_items(most, 0.0) and fresh.json_items_wait_s(most, 0.0) == 0.0
