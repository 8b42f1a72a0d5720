"""Catch-up pacing's buckets alone (engine/catch_up.py); the scheduler's use of them: tests/engine/test_scheduler.py."""

from __future__ import annotations

from audio_interaction_server.engine.catch_up import CatchUpPacing


def run_rows(pacing: CatchUpPacing, credits, address, now_s: float, wanted: int) -> int:
    ran = 0
    while ran < wanted and pacing.may_listen(credits, address, now_s):
        pacing.spend(credits, address, now_s)
        ran += 1
    return ran


def test_own_credits_first_then_the_addresss_and_a_last_row_shared_is_paid_by_both():
    pacing = CatchUpPacing(speed=2.0, burst_s=0.8)  # 2 rows of burst, 5 rows a second
    a, b = pacing.credits_for("198.51.100.1", 0.0), pacing.credits_for("198.51.100.1", 0.0)
    assert run_rows(pacing, a, "198.51.100.1", 0.4, 10) == 4  # its own 2 rows earned in 0.4 s, then the burst's 2
    assert run_rows(pacing, b, "198.51.100.1", 0.4, 10) == 2  # its own only: the address's burst is spent
    # Two sessions let in by the address's last row both run it: the address owes a row, paid before its next.
    c, d = pacing.credits_for("203.0.113.9", 0.0), pacing.credits_for("203.0.113.9", 0.0)
    assert run_rows(pacing, c, "203.0.113.9", 0.0, 1) == 1
    assert pacing.may_listen(c, "203.0.113.9", 0.0) and pacing.may_listen(d, "203.0.113.9", 0.0)
    pacing.spend(c, "203.0.113.9", 0.0)
    pacing.spend(d, "203.0.113.9", 0.0)
    late = pacing.credits_for("203.0.113.9", 0.2)  # 0.2 s refilled one row of the address's: the one it owed
    assert not pacing.may_listen(late, "203.0.113.9", 0.2)
    assert pacing.may_listen(late, "203.0.113.9", 0.4)


def test_a_session_without_an_address_has_a_full_burst_and_no_address_is_remembered():
    pacing = CatchUpPacing(speed=4.0, burst_s=10.0)
    credits = pacing.credits_for(None, 0.0)
    assert run_rows(pacing, credits, None, 0.0, 100) == 25 and len(pacing) == 0


def test_the_least_recently_used_addresses_are_forgotten_past_the_limit():
    pacing = CatchUpPacing(speed=4.0, burst_s=0.8, max_tracked=2)
    for address in ("a", "b", "c"):
        run_rows(pacing, pacing.credits_for(address, 0.0), address, 0.0, 100)
    assert len(pacing) == 2
    # "a" was forgotten: its next session draws a full burst again (forgetting gives a burst sooner, never less).
    assert run_rows(pacing, pacing.credits_for("a", 0.0), "a", 0.0, 100) == 2


def test_a_lone_session_with_an_address_is_heard_at_its_burst_then_the_catch_up_speed_not_twice_it():
    """The address's burst pays an opening backlog, not a second catch-up speed beside the session's own: a lone
    flooding session drew on both, refilled at 4x each, and was heard at 8x real time (review, round eight)."""
    pacing = CatchUpPacing(speed=2.0, burst_s=0.8)  # 2 rows of burst, 5 rows a second
    credits = pacing.credits_for("198.51.100.7", 0.0)
    heard = sum(run_rows(pacing, credits, "198.51.100.7", step / 10, 1000) for step in range(0, 101))
    assert heard == 2 + 50, heard  # the burst, then 10 s at 2x real time: one 0.4 s chunk every 0.2 s


def test_an_address_whose_client_reconnects_again_and_again_is_heard_at_little_more_than_the_catch_up_speed():
    """A client that replaced its session every 2.5 s drew a fresh burst from its address each time, and the
    address's bucket refilled at the catch-up speed too: 7.8x real time where a session staying connected gets 4x
    (review, round eight). The address's bucket refills at real time: at most 1x beyond what the sessions earn."""
    pacing = CatchUpPacing(speed=4.0, burst_s=10.0)  # 25 rows of burst, 10 rows a second of a session's own
    heard, now_s = 0, 0.0
    while now_s < 60.0:
        credits = pacing.credits_for("203.0.113.50", now_s)  # a new session, with a backlog it sends at once
        session_ends_s = now_s + 2.5
        while now_s < session_ends_s:
            heard += run_rows(pacing, credits, "203.0.113.50", now_s, 1000)
            now_s = round(now_s + 0.1, 6)
    speed = heard * 0.4 / 60.0
    assert 4.0 < speed < 5.5, speed  # its sessions' own 4x, the address's 1x, and one burst over the minute
