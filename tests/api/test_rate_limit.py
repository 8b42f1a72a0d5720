"""Connection-attempt rate limit per client IP: the token bucket, and HTTP 429 from a live server."""

from __future__ import annotations

import pytest
from websockets.exceptions import InvalidStatus

from audio_interaction_server.api.connection import ConnectionRateLimiter
from benchmarks.harness import LiveServer
from tests.api.test_app import metric_samples, recv_event, server_config


def test_burst_then_the_sustained_rate():
    limiter = ConnectionRateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.retry_after_s("a", 0.0) for _ in range(3)] == [None, None, None]
    assert limiter.retry_after_s("a", 0.0) == pytest.approx(0.5)  # empty: the next token in 1 / 2 s
    assert limiter.retry_after_s("b", 0.0) is None  # another address has its own bucket
    assert limiter.retry_after_s("a", 0.25) == pytest.approx(0.25)  # a refused attempt takes no token
    assert limiter.retry_after_s("a", 0.5) is None
    assert limiter.retry_after_s("a", 0.5) is not None
    # A long pause refills the bucket to the burst, never beyond it.
    assert [limiter.retry_after_s("a", 100.0) for _ in range(4)][-1] is not None


def test_remembers_a_bounded_number_of_addresses():
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=1, max_tracked=100)
    for i in range(1000):
        limiter.retry_after_s(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    assert limiter.retry_after_s("10.0.3.231", 0.0) is not None  # the most recent ones are still limited


def test_live_server_answers_429_past_the_burst_and_counts_it(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint, connect_rate_per_ip=0.1, connect_burst_per_ip=2)).start()
    try:
        with server.connect() as first, server.connect() as second:
            assert recv_event(first)["type"] == recv_event(second)["type"] == "session.created"
            with pytest.raises(InvalidStatus) as refused:
                server.connect()
            with pytest.raises(InvalidStatus):
                server.connect("/v1/sessions/anything/events")  # subscribers count too
        response = refused.value.response
        assert response.status_code == 429 and 1 <= int(response.headers["Retry-After"]) <= 10
        metrics = metric_samples(server)
        assert metrics['ais_connections_refused_total{reason="rate_limited"}'] == 2
        assert metrics["ais_sessions_active"] == 0
    finally:
        server.stop()
