"""Connection-attempt rate limit per client IP: the token bucket, and HTTP 429 from a live server."""

from __future__ import annotations

import contextlib
import socket

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from audio_interaction_server.api.addresses import AddressRateLimiter
from benchmarks.harness import LiveServer
from tests.api.test_app import metric_samples, recv_event, server_config
from tests.api.test_transport import wait_until
from tests.test_startup import events_to_close


def test_burst_then_the_sustained_rate():
    limiter = AddressRateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.retry_after_s("a", 0.0) for _ in range(3)] == [None, None, None]
    assert limiter.retry_after_s("a", 0.0) == pytest.approx(0.5)  # empty: the next token in 1 / 2 s
    assert limiter.retry_after_s("b", 0.0) is None  # another address has its own bucket
    assert limiter.retry_after_s("a", 0.25) == pytest.approx(0.25)  # a refused attempt takes no token
    assert limiter.retry_after_s("a", 0.5) is None
    assert limiter.retry_after_s("a", 0.5) is not None
    # A long pause refills the bucket to the burst, never beyond it.
    assert [limiter.retry_after_s("a", 100.0) for _ in range(4)][-1] is not None


def test_remembers_a_bounded_number_of_addresses():
    limiter = AddressRateLimiter(rate_per_s=1.0, burst=1, max_tracked=100)
    for i in range(1000):
        limiter.retry_after_s(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    assert limiter.retry_after_s("10.0.3.231", 0.0) is not None  # the most recent ones are still limited


def test_addresses_of_one_ipv6_64_share_one_bucket_and_one_cooldown():
    """An IPv6 client holds a /64: keyed per address, it met neither the connection rate nor a flood cut's cooldown
    by connecting from the next address each time."""
    from audio_interaction_server.api.flood import CutCooldown

    limiter = AddressRateLimiter(rate_per_s=1.0, burst=2)
    assert limiter.retry_after_s("2001:db8:0:1::1", 0.0) is None
    assert limiter.retry_after_s("2001:db8:0:1::2", 0.0) is None
    assert limiter.retry_after_s("2001:db8:0:1::3", 0.0) is not None
    assert limiter.retry_after_s("2001:db8:0:2::1", 0.0) is None  # the next /64 is someone else
    cooldown = CutCooldown(cooldown_s=10.0, max_cooldown_s=40.0)
    cooldown.cut("2001:db8:0:1::1", 0.0)
    assert cooldown.retry_after_s("2001:db8:0:1:aaaa::7", 1.0) == pytest.approx(9.0)
    cooldown.impose("2001:db8:0:3::1", 20.0, 10.0)  # another front's cut, by address
    assert cooldown.retry_after_s("2001:db8:0:3::2", 1.0) == pytest.approx(19.0)
    assert cooldown.retry_after_s("2001:db8:0:2::1", 1.0) is None


def test_a_flood_cut_cools_an_address_down_doubling_while_it_keeps_flooding():
    from audio_interaction_server.api.flood import CutCooldown

    cooldown = CutCooldown(cooldown_s=10.0, max_cooldown_s=35.0, max_tracked=2)
    assert cooldown.cut("a", 0.0) == 10.0
    assert cooldown.retry_after_s("a", 4.0) == pytest.approx(6.0) and cooldown.retry_after_s("b", 4.0) is None
    assert cooldown.retry_after_s("a", 10.0) is None
    assert [cooldown.cut("a", t) for t in (12.0, 35.0, 80.0, 140.0)] == [20.0, 35.0, 35.0, 35.0]  # soon again: x2
    assert cooldown.cut("a", 1000.0) == 10.0  # long after the last cooldown ended: back to the first
    cooldown.cut("b", 1000.0), cooldown.cut("c", 1000.0)
    assert len(cooldown) == 2 and cooldown.retry_after_s("a", 1001.0) is None  # the least recent forgotten


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
        # The two sessions end once the server has read their clients' close frames.
        assert wait_until(lambda: metric_samples(server)["ais_sessions_active"] == 0, 5.0)
    finally:
        server.stop()


def test_an_address_cut_for_a_flood_waits_before_it_connects_again(tiny_checkpoint):
    """A flooder cut with 1008 that reconnects at once would get a fresh budget with each session (in
    benchmarks.hostile --reconnect its neighbour's p95 went to 3-6x): its address is refused with HTTP 429
    for flood.cut_cooldown_s, doubling while it keeps being cut; other addresses are not affected."""
    import json

    server = LiveServer(server_config(tiny_checkpoint, flood={"event_burst": 3, "events_per_s": 0.1,
                                                               "cut_cooldown_s": 30.0})).start()
    try:
        with server.connect() as flooder:
            recv_event(flooder)
            with contextlib.suppress(ConnectionClosed):  # the cut may close it before the fifth is sent
                for _ in range(5):
                    flooder.send(json.dumps({"type": "input.clear"}))
            events = []
            while not events or events[-1]["type"] != "session.closed":
                events.append(recv_event(flooder))
            assert any(e.get("code") == "event_flood" for e in events), events
        with pytest.raises(InvalidStatus) as refused:
            server.connect()
        response = refused.value.response
        assert response.status_code == 429 and 20 <= int(response.headers["Retry-After"]) <= 30
        with pytest.raises(InvalidStatus):
            server.connect("/v1/realtime")  # every endpoint: the Realtime dialect too
        assert metric_samples(server)['ais_connections_refused_total{reason="flood_cooldown"}'] == 2
        # Another address (127.0.0.2 is loopback too) connects as before.
        from websockets.sync.client import connect

        sock = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0))
        key = server.config.api_key.get_secret_value()
        with connect(f"ws://127.0.0.1:{server.port}/v1/stream", sock=sock,
                     additional_headers={"Authorization": f"Bearer {key}"}) as other:
            first = recv_event(other)
            assert first["type"] == "session.created", first
    finally:
        server.stop()


def test_a_flood_cut_puts_the_address_on_cooldown_before_the_client_reads_session_closed(tiny_checkpoint):
    """The cooldown starts with the cut, not when the socket has closed: a flooder that reconnects the moment it
    reads session.closed, and never answers the server's close frame (its socket then lingers for
    transport.close_timeout_s), is refused at once."""
    import json

    from tests.api.test_transport import TEXT, client_frame, open_websocket

    server = LiveServer(server_config(tiny_checkpoint, flood={"event_burst": 3, "events_per_s": 0.1,
                                                               "cut_cooldown_s": 30.0})).start()
    flooder = None
    try:
        flooder, received = open_websocket(server.port, key=server.config.api_key.get_secret_value())
        for _ in range(5):
            flooder.sendall(client_frame(TEXT, json.dumps({"type": "input.clear"}).encode()))
        flooder.settimeout(5.0)
        while b'"session.closed"' not in received:
            chunk = flooder.recv(65536)
            assert chunk, received
            received += chunk
        assert b'"event_flood"' in received, received
        with pytest.raises(InvalidStatus) as refused:
            server.connect()
        assert refused.value.response.status_code == 429
    finally:
        if flooder is not None:
            flooder.close()
        server.stop()


def churned_prompt(index: int, num_chars: int = 2_300) -> str:
    """A system prompt no other session used (so no kept prompt serves it): about 1,300 tokens (with the test
    server's reply cap, about the longest that leaves MIN_CHUNKS_BETWEEN_ROLLOVERS chunks between rollovers)."""
    words = " ".join(f"rule{index}x{n}" for n in range(num_chars // 10))
    return f"Session {index}. {words}"[:num_chars]


def churn_one_session(server: LiveServer, prompt: str, sock=None) -> tuple[list[dict], int | None]:
    """A session with a new prompt, 0.8 s of audio, closed after its first decision (or what ended it)."""
    import json

    import numpy as np
    from websockets.sync.client import connect

    from tests.api.test_app import recv_to_close, recv_until, send_configure

    key = server.config.api_key.get_secret_value()
    with connect(f"ws://127.0.0.1:{server.port}/v1/stream", sock=sock, max_size=None,
                 additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        assert recv_event(ws)["type"] == "session.created"
        answer = send_configure(ws, system_prompt=prompt, decision_events=True)  # None: the default prompt
        assert answer["type"] == "session.updated", (answer.get("code"), answer.get("message"))
        ws.send(np.zeros(12_800, "<i2").tobytes())
        events = recv_until(ws, lambda e: e["type"] in ("decision", "session.closed"))
        if events[-1]["type"] == "decision":
            ws.send(json.dumps({"type": "session.close"}))
        rest, code = recv_to_close(ws)
        return events + rest, code


def test_one_address_churning_new_prompts_is_refused_past_its_prefill_budget(tiny_checkpoint):
    """docs/reliability.md, prompt churn: within connect_rate_per_ip one address opened session after session,
    each with a new long system prompt fed in full (a long first row no per-session budget saw), and a victim's
    latency went from 0.1 s to 3.7 s. With the defaults, an address now gets about its burst of new-prompt
    prefill (engine.prefill_token_burst_per_ip) and then only the sustained rate: the next such session is
    refused with a fatal rate_limited error and 1013, its accepted audio counted in session.closed. (The address's
    budget of prompt checks, flood.prompt_char_burst, is raised out of the way: it would refuse the configures
    first.)"""
    server = LiveServer(server_config(tiny_checkpoint, flood={"prompt_char_burst": 200_000})).start()
    try:
        outcomes = []
        for index in range(40):
            events, code = churn_one_session(server, churned_prompt(index))
            outcomes.append((events, code))
            if code != 1000:
                break
        events, code = outcomes[-1]
        assert code == 1013, f"{len(outcomes)} sessions with new prompts all ran: {[c for _, c in outcomes]}"
        error = next(e for e in events if e["type"] == "error")
        assert error["code"] == "rate_limited" and error["is_fatal"], error
        closed = events[-1]
        assert closed["type"] == "session.closed" and closed["reason"] == "rate_limited", closed
        # Its audio is accounted for, as for any refusal at the open: accepted, and heard by no model.
        assert closed["audio_received_s"] == 0.8 and closed["num_chunks_decided"] == 0, closed
        assert 10 <= len(outcomes) <= 30  # the default burst took about 32,768 tokens of these prompts
    finally:
        server.stop()


def test_past_its_prefill_budget_an_address_is_refused_on_both_dialects_and_others_are_not(tiny_checkpoint, caplog):
    """One new ~1,300-token prompt fits the budget, a second does not: on /v1/stream and on /v1/realtime (a
    session.update with instructions is the same prefill) the session is refused at its first audio with a fatal
    rate_limited error saying when to try again, and close 1013. The same address with the default prompt (kept),
    and another address with a new prompt, run as before; the refusals are counted and the address is logged."""
    import base64
    import json
    import logging

    import numpy as np

    server = LiveServer(server_config(tiny_checkpoint, engine={
        "checkpoint": tiny_checkpoint, "max_sessions": 2, "device": "cpu", "prefill_tokens_per_s_per_ip": 10.0,
        "prefill_token_burst_per_ip": 2_000})).start()
    try:
        assert churn_one_session(server, churned_prompt(0))[1] == 1000
        with caplog.at_level(logging.WARNING, logger="audio_interaction_server.engine.scheduler"):
            events, code = churn_one_session(server, churned_prompt(1))
        assert code == 1013, events
        error = next(e for e in events if e["type"] == "error")
        assert error["code"] == "rate_limited" and error["is_fatal"] and " s or later" in error["message"], error
        assert "127.0.0.1" in caplog.text and "prefill budget" in caplog.text
        with server.connect("/v1/realtime") as ws:
            assert json.loads(ws.recv(timeout=20))["type"] == "session.created"
            ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime",
                                                                      "instructions": churned_prompt(2)}}))
            while json.loads(ws.recv(timeout=20))["type"] != "session.updated":
                pass
            audio = base64.b64encode(np.zeros(19_200, "<i2").tobytes()).decode()  # 0.8 s at 24 kHz
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            frames, code = events_to_close(ws)
        refused = next(f for f in frames if f["type"] == "error")["error"]
        assert code == 1013 and refused["code"] == "rate_limited", (code, frames)
        assert refused["type"] == "invalid_request_error"  # the client's doing, not the server's fault
        assert churn_one_session(server, None)[1] == 1000  # the default prompt is kept: it costs nothing
        other = socket.create_connection(("127.0.0.1", server.port), source_address=("127.0.0.2", 0))
        assert churn_one_session(server, churned_prompt(3), sock=other)[1] == 1000  # another address
        metrics = metric_samples(server)
        assert metrics["ais_prefill_budget_refusals_total"] == 2
        assert metrics['ais_sessions_total{reason="rate_limited"}'] == 2
    finally:
        server.stop()


def test_options_that_would_roll_the_context_over_every_few_chunks_are_refused(tiny_checkpoint):
    """A prompt and reply cap that leave a rebuilt context a few chunks short of its rollover point passed: the
    session then rolled over every couple of chunks, each time re-feeding the prompt and the window (about 4,000
    tokens) as one long row that no prefill budget paid for, and other streams waited. Such options are refused at
    configure, naming the limit; the same prompt with room for MIN_CHUNKS_BETWEEN_ROLLOVERS chunks runs."""
    from audio_interaction_server import spec
    from audio_interaction_server.options import SessionOptions
    from tests.api.test_app import send_configure

    server = LiveServer(server_config(tiny_checkpoint)).start()
    try:
        engine = server.runtime.config.engine
        prompt = churned_prompt(0, num_chars=1_500)
        prefix = server.runtime.worker.prompt_length(SessionOptions(system_prompt=prompt))

        def reply_cap_leaving(num_chunks: int) -> int:  # the rebuilt context's slack: num_chunks blocks and a bit
            return (engine.max_positions - 4 * spec.BLOCK_TOKENS - prefix - engine.rollover_window_positions
                    - num_chunks * spec.BLOCK_TOKENS - 1)

        assert spec.chunks_after_rollover(prefix, reply_cap_leaving(2), engine.max_positions,
                                          engine.rollover_window_positions) == 2
        with server.connect() as ws:
            assert recv_event(ws)["type"] == "session.created"
            answer = send_configure(ws, system_prompt=prompt, max_turn_tokens=reply_cap_leaving(2))
            assert answer["type"] == "error" and "2 chunks of audio between context rollovers" in answer["message"]
            assert "at least 30 are needed" in answer["message"], answer
            answer = send_configure(ws, system_prompt=prompt, max_turn_tokens=reply_cap_leaving(30))
            assert answer["type"] == "session.updated", answer
    finally:
        server.stop()


def test_prompt_checks_are_budgeted_per_address_over_its_connections_and_a_known_prompt_is_free(tiny_checkpoint):
    """flood.prompt_char_burst was a connection's: an address that reconnected had a full budget each time and,
    well inside every other limit, kept the event loop tokenising new prompts (each checked and never fed, so no
    prefill budget saw them), its neighbours' decisions 3 to 6 times later (probe, round seven). The budget is now
    the client address's, over all its connections; another address has its own, and a prompt the server has
    encoded already (a backend that opens every session with the same prompt) costs nothing to check."""
    from websockets.sync.client import connect

    from tests.api.test_app import send_configure

    server = LiveServer(server_config(tiny_checkpoint, flood={"prompt_char_burst": 8_000,
                                                              "prompt_chars_per_s": 10.0})).start()
    key = server.config.api_key.get_secret_value()

    def configure(prompt: str, source: str = "127.0.0.1") -> str:
        """A new connection's answer to a configure with ``prompt``: its type, or its error's code."""
        sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
        with connect(f"ws://127.0.0.1:{server.port}/v1/stream", sock=sock, max_size=None,
                     additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert recv_event(ws)["type"] == "session.created"
            answer = send_configure(ws, system_prompt=prompt)
        return answer["type"] if answer["type"] != "error" else answer["code"]

    try:
        known = churned_prompt(9)  # 2,300 characters of the 8,000
        assert configure(known) == "session.updated"
        assert configure(churned_prompt(0)) == "session.updated"
        assert configure(churned_prompt(1)) == "session.updated"  # 1,100 characters left
        assert configure(churned_prompt(2)) == "rate_limited"  # a new connection: the address's budget is spent
        assert configure(churned_prompt(3), source="127.0.0.3") == "session.updated"  # another address
        assert [configure(known) for _ in range(3)] == ["session.updated"] * 3  # encoded already: no tokenising
    finally:
        server.stop()


def test_frames_heavy_in_json_items_are_budgeted_per_address_over_its_connections(tiny_checkpoint):
    """A heavy frame spends the session's event budget by its JSON items, but each connection had a full one: an
    address opening 9 connections a second, each sending one /v1/realtime frame of 49,000 wrong list items (~0.4 s
    of the event loop to refuse) and leaving, within every limit, made a neighbour's decisions 3-5 s late (hostile
    probe, round ten). The items are now also the client address's, over all its connections: beyond them such a
    frame is refused unparsed with rate_limited; another address has its own."""
    from websockets.sync.client import connect

    # 20 events of 256 items at once: 5,120 items an address, 256 a second after that.
    server = LiveServer(server_config(tiny_checkpoint, flood={"event_burst": 20, "events_per_s": 1.0})).start()
    key = server.config.api_key.get_secret_value()
    heavy = '{"type": "session.configure", ' + ", ".join(f'"k{i}": 0' for i in range(1_500)) + "}"  # 3,000 items

    def answer(source: str = "127.0.0.1") -> str:
        """A new connection's answer to the heavy frame: its error's code."""
        sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
        with connect(f"ws://127.0.0.1:{server.port}/v1/stream", sock=sock, max_size=None,
                     additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            assert recv_event(ws)["type"] == "session.created"
            ws.send(heavy)
            event = recv_event(ws)
        assert event["type"] == "error", event
        return event["code"]

    try:
        assert answer() == "invalid_event"  # parsed: unknown keys
        assert answer() == "rate_limited"  # a new connection, the same address: its items are spent
        assert answer(source="127.0.0.3") == "invalid_event"  # another address
    finally:
        server.stop()
