"""Resume after a dropped connection, against a live server: TCP cut (no close frame), reconnect, nothing lost.

The proof is a comparison: the same audio streamed once without a break and once with the connection
cut mid-listening and mid-reply gives the same decisions and reply tokens (greedy, tiny checkpoint), with
event numbers that never skip or repeat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest

from audio_interaction_server.audio.files import load_audio_file
from tests.api.test_transport import wait_until

websockets = pytest.importorskip("websockets")

FRAME_SAMPLES = 1600  # 0.1 s at 16 kHz
SPEED = 4.0  # times real time: within the server's catch-up pace and buffered-audio limit


@pytest.fixture(scope="module")
def speech(shared_audio) -> np.ndarray:
    """About 8 s of real speech at 16 kHz, s16, on which the tiny model replies more than once."""
    parts = [load_audio_file(shared_audio / name) for name in
             ("01_count_bark/sample01_01.mp3", "02_translate/sample02_01.mp3", "01_count_bark/sample01_01.mp3")]
    audio = np.concatenate(parts)[:8 * 16000]
    return (np.clip(audio, -1, 1) * 32767).astype("<i2")


@contextmanager
def live_port(checkpoint, **settings) -> Iterator[int]:
    """A live server (uvicorn in this process, built as ``python -m audio_interaction_server`` builds it) with
    ``settings``; its port. In this process, not spawned: resuming is the same either way, and a spawn pays the
    imports and the model load again (about 7 s of this file's run each)."""
    from audio_interaction_server.config import ServerConfig
    from benchmarks.harness import LiveServer

    config = ServerConfig.model_validate(dict(port=0, log_level="warning", **settings,
                                              engine={"checkpoint": checkpoint, "device": "cpu"}))
    server = LiveServer(config).start()
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with live_port(tiny_checkpoint, resume_grace_s=20) as port:
        yield port


@dataclass
class Run:
    """What one client saw, across its connections."""

    events: list[dict] = field(default_factory=list)
    num_connections: int = 0

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def last_seq(self) -> int:
        return max((e["seq"] for e in self.events if "seq" in e), default=0)

    def speaking(self) -> bool:
        return len(self.of("turn_begin")) > len(self.of("turn_end"))

    def outcome(self) -> tuple[list, list]:
        decisions = [(e["chunk"], e["token_id"]) for e in self.of("decision")]
        replies = [(e["turn"], e["token_ids"], e["end_reason"]) for e in self.of("turn_end")]
        return decisions, replies


async def stream(port: int, audio: np.ndarray, cuts: list[str]) -> Run:
    """Stream ``audio`` then flush; at each cut ("listening": after a few decisions while the model listens,
    "reply": at a turn_begin) drop the TCP connection without a close frame, resume, re-send what the server
    did not accept, and go on."""
    run = Run()
    url = f"ws://127.0.0.1:{port}/v1/stream"
    created = None
    sent = 0  # samples the client has sent on the current connection (the server may not have them all)
    cuts = list(cuts)

    def should_cut() -> bool:
        if not cuts:
            return False
        if cuts[0] == "listening":
            return len(run.of("decision")) >= 3 + 6 * run.num_connections and not run.speaking()
        # Mid-reply on this connection's live stream (not in a replay): a reply begun, tokens still to come.
        return run.speaking() and len(run.events) - events_before_connection > 30

    events_before_connection = 0
    while True:
        events_before_connection = len(run.events)
        if created is None:
            ws = await websockets.connect(url, max_size=None)
        else:
            ws = await websockets.connect(f"{url}?resume={created['session_id']}&token={created['resume_token']}"
                                          f"&last_seq={run.last_seq}", max_size=None)
        run.num_connections += 1
        first = json.loads(await ws.recv())
        if created is None:
            assert first["type"] == "session.created" and first["resume_token"], first
            created = first
            run.events.append(first)
            await ws.send(json.dumps({"type": "session.configure", "decision_events": True, "max_turn_tokens": 24}))
        else:
            assert first["type"] == "session.resumed" and first["last_seq"] == run.last_seq, first
            run.events.append(first)
            sent = int(round(first["audio_received_s"] * 16000))  # re-send what the server did not accept

        cut = asyncio.Event()

        async def send_audio() -> None:
            nonlocal sent
            while sent < len(audio) and not cut.is_set():
                await ws.send(audio[sent:sent + FRAME_SAMPLES].tobytes())
                sent += min(FRAME_SAMPLES, len(audio) - sent)
                await asyncio.sleep(FRAME_SAMPLES / 16000 / SPEED)
            if not cut.is_set():
                await ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.4}))

        sender = asyncio.create_task(send_audio())
        try:
            async with asyncio.timeout(60):
                async for text in ws:
                    event = json.loads(text)
                    run.events.append(event)
                    if event["type"] == "error":
                        raise AssertionError(f"error event: {event}")
                    if should_cut():
                        cuts.pop(0)
                        cut.set()
                        ws.transport.abort()  # no close frame: what a dropped network looks like
                        break
                    if event["type"] == "input.flushed":
                        await ws.send(json.dumps({"type": "session.close"}))
                    if event["type"] == "session.closed":
                        await sender
                        return run
        finally:
            cut.set()
            sender.cancel()
        await asyncio.sleep(0.3)  # the server notices the drop (and keeps working) before the client is back


def test_cut_mid_listening_and_mid_reply_resumes_with_nothing_lost(server, speech):
    reference = asyncio.run(stream(server, speech, cuts=[]))
    cut = asyncio.run(stream(server, speech, cuts=["listening", "reply"]))
    assert cut.num_connections == 3
    seqs = [e["seq"] for e in cut.events if "seq" in e]
    assert seqs == list(range(1, len(seqs) + 1)), "event numbers skip or repeat across the resumes"
    resumed = cut.of("session.resumed")
    assert len(resumed) == 2 and all("seq" not in e for e in resumed)
    decisions, replies = cut.outcome()
    assert len(replies) >= 1 and replies[0][2] in ("text_end", "max_tokens")
    assert (decisions, replies) == reference.outcome(), "the cut run heard or said something else"
    assert [d[0] for d in decisions] == list(range(len(decisions))), "every chunk decided once, in order"
    assert cut.of("session.closed")[0]["num_chunks_decided"] == cut.of("session.closed")[0]["num_chunks_received"]


async def connect_and_drop(port: int, address: str | None = None) -> dict:
    """A session whose connection drops without a close frame: it is detached. ``address``: the client
    address a trusted proxy (the server must trust 127.0.0.1) says it forwards for."""
    headers = {} if address is None else {"X-Forwarded-For": address}
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", additional_headers=headers)
    created = json.loads(await ws.recv())
    await ws.send(np.zeros(8000, "<i2").tobytes())
    await asyncio.sleep(0.2)
    ws.transport.abort()
    await asyncio.sleep(0.3)
    return created


async def resume(port: int, created: dict, token: str | None = None, last_seq: int | str = 1):
    query = urllib.parse.urlencode({"resume": created["session_id"], "token": token or created["resume_token"],
                                    "last_seq": last_seq})
    # No bound on the events the client keeps unread: a replay longer than websockets' default (16) stopped it
    # reading, so a test's ``close()`` never saw the server's close frame and waited out its 10 s close timeout.
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream?{query}", max_size=None, max_queue=None)
    return ws, json.loads(await ws.recv())


async def resume_and_close(port: int, created: dict) -> None:
    """Take a detached session back and end it, so that it holds no slot after the test."""
    ws, first = await resume(port, created)
    assert first["type"] == "session.resumed", first
    await ws.send(json.dumps({"type": "session.close"}))
    await read_until_closed(ws)


async def read_until_closed(ws) -> list[dict]:
    events = []
    try:
        async for text in ws:
            events.append(json.loads(text))
    except websockets.ConnectionClosed:
        pass  # a close code other than 1000/1001
    return events


def test_a_wrong_token_is_refused_and_the_session_stays_resumable(server):
    async def main():
        created = await connect_and_drop(server)
        ws, first = await resume(server, created, token="not-the-token")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (first["type"], first["code"], ws.close_code) == ("error", "resume_refused", 4009)
        ws, first = await resume(server, created)
        assert first["type"] == "session.resumed"
        await ws.close()

    asyncio.run(main())


def test_a_last_seq_beyond_what_the_session_sent_is_named_as_such_and_the_session_stays_resumable(server):
    """A last_seq above every seq the session sent (a client's bug, or a number from another session) was answered
    resume_expired, "start a new one", while the session lived on, holding its slot till its grace ended (probe,
    round six): the resume is refused as invalid_event naming the highest seq sent, and a right one works."""
    async def main():
        created = await connect_and_drop(server)
        ws, first = await resume(server, created, last_seq=999_999_999)
        await read_until_closed(ws)
        assert (first["type"], first["code"], ws.close_code) == ("error", "invalid_event", 4009), first
        assert "beyond the last event this session sent" in first["message"], first["message"]
        ws, first = await resume(server, created)
        assert first["type"] == "session.resumed"
        await ws.close()

    asyncio.run(main())


def test_a_session_resumed_over_and_over_is_refused_for_a_while_and_stays_resumable(server):
    """A client that resumes its own session in a loop has its whole log replayed each time, on the event loop
    every session shares: past ``flood.resume_burst`` (5) resumes at once, one more is refused with rate_limited
    and 1013 (the shipped client's resume loop tries again), its message saying when; the session stays detached,
    and resumes once that time has passed."""
    async def main():
        created = await connect_and_drop(server)
        for _ in range(5):
            ws, first = await resume(server, created)
            assert first["type"] == "session.resumed", first
            ws.transport.abort()
        ws, first = await resume(server, created)
        await read_until_closed(ws)
        assert (first["type"], first["code"], first["is_fatal"], ws.close_code) == \
            ("error", "rate_limited", True, 1013), first
        wait_s = float(re.search(r"again in ([0-9.]+) s", first["message"]).group(1))
        assert 0 < wait_s <= 2.0
        await asyncio.sleep(wait_s + 0.1)
        await resume_and_close(server, created)

    asyncio.run(main())


def test_of_two_racing_resumes_the_newest_wins(server):
    async def main():
        created = await connect_and_drop(server)
        older, first_older = await resume(server, created)
        newer, first_newer = await resume(server, created)
        assert first_older["type"] == first_newer["type"] == "session.resumed"
        leftover = await read_until_closed(older)
        assert older.close_code == 4010 and leftover[-1]["code"] == "session_resumed_elsewhere"
        await newer.send(json.dumps({"type": "session.close"}))
        closing = await read_until_closed(newer)
        assert closing[-1]["type"] == "session.closed" and newer.close_code == 1000

    asyncio.run(main())


def test_an_unknown_session_is_resume_expired(server):
    async def main():
        ws, first = await resume(server, {"session_id": "no-such-session", "resume_token": "x"})
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (first["code"], first["is_fatal"], ws.close_code) == ("resume_expired", True, 4009)

    asyncio.run(main())


def test_expiry_and_a_restarted_server_fail_cleanly(tiny_checkpoint):
    with live_port(tiny_checkpoint, resume_grace_s=0.5) as port:
        created = asyncio.run(connect_and_drop(port))

        async def expired():
            await asyncio.sleep(0.6)
            ws, first = await resume(port, created)
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert (first["code"], ws.close_code) == ("resume_expired", 4009)

        asyncio.run(expired())
        created = asyncio.run(connect_and_drop(port))
    with live_port(tiny_checkpoint, resume_grace_s=30) as port_after:  # a restarted server
        ws, first = asyncio.run(resume(port_after, created))
        assert first["code"] == "resume_expired"


def metric(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def load(port: int) -> dict:
    """``GET /v1/load`` (this fixture's server has no API key)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/load", timeout=10) as response:
        return json.loads(response.read())


def test_a_detached_session_shows_in_metrics_and_load_and_keeps_its_subscribers(server):
    async def main():
        ws = await websockets.connect(f"ws://127.0.0.1:{server}/v1/stream")
        created = json.loads(await ws.recv())
        subscriber = await websockets.connect(f"ws://127.0.0.1:{server}/v1/sessions/{created['session_id']}/events")
        await ws.send(np.zeros(8000, "<i2").tobytes())
        await asyncio.sleep(0.2)
        ws.transport.abort()
        await asyncio.sleep(0.3)
        assert metric(server, "ais_sessions_detached") == 1 and metric(server, "ais_sessions_active") >= 1
        assert metric(server, "ais_session_replay_events") >= 1
        assert {key: load(server)[key] for key in ("active", "detached")} == {"active": 1, "detached": 1}
        resumed, first = await resume(server, created)
        assert first["type"] == "session.resumed" and metric(server, "ais_sessions_detached") == 0
        assert {key: load(server)[key] for key in ("active", "detached")} == {"active": 1, "detached": 0}
        await resumed.send(json.dumps({"type": "session.close"}))
        await read_until_closed(resumed)
        seen = await read_until_closed(subscriber)
        assert seen[-1]["type"] == "session.closed" and seen[-1]["reason"] == "client_closed", seen
        assert subscriber.close_code == 1000, "the subscriber stayed through the gap and saw the session end"

    asyncio.run(main())


def refused_count(port: int, reason: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    prefix = f'ais_connections_refused_total{{reason="{reason}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def test_every_refused_resume_is_counted_as_a_refused_connection_by_its_reason(server):
    """A resume refused (wrong token, a last_seq that is no seq, no such session) is a refused connection like
    any other: ais_connections_refused{reason} counts it, as it counts capacity and rate refusals."""
    async def main():
        created = await connect_and_drop(server)
        before = {reason: refused_count(server, reason) for reason in ("resume_refused", "invalid_event",
                                                                       "resume_expired")}
        for kwargs, code in (({"token": "not-the-token"}, "resume_refused"), ({"last_seq": "x"}, "invalid_event")):
            ws, first = await resume(server, created, **kwargs)
            await read_until_closed(ws)
            assert (first["code"], ws.close_code) == (code, 4009)
        ws, first = await resume(server, {"session_id": "no-such-session", "resume_token": "x"})
        await read_until_closed(ws)
        assert (first["code"], ws.close_code) == ("resume_expired", 4009)
        after = {reason: refused_count(server, reason) for reason in before}
        assert {reason: after[reason] - before[reason] for reason in before} == \
            {"resume_refused": 1, "invalid_event": 1, "resume_expired": 1}
        await resume_and_close(server, created)

    asyncio.run(main())


@pytest.mark.parametrize("code", [1000, 1001])
def test_a_client_that_closes_saying_it_is_done_is_not_kept_for_a_resume(server, code):
    """1000 (done) and 1001 (going away: a browser leaving the page) end the session at once; only a
    connection that drops without a close frame is kept. Such an end is the client's close, and counted so: every
    /v1/realtime session, which has no session.close, was counted as disconnected, like a dropped network (first-
    hour review, round 4)."""
    async def main():
        closed_before = sessions_ended(server, "client_closed")
        dropped_before = sessions_ended(server, "disconnected")
        ws = await websockets.connect(f"ws://127.0.0.1:{server}/v1/stream")
        created = json.loads(await ws.recv())
        await ws.send(np.zeros(8000, "<i2").tobytes())
        await ws.close(code=code)
        await asyncio.sleep(0.3)
        assert metric(server, "ais_sessions_detached") == 0
        # At least one more: the module's server is shared, and an earlier test's session may end meanwhile (a CI
        # run counted 8 against 7); none more as a dropped connection.
        assert sessions_ended(server, "client_closed") >= closed_before + 1
        assert sessions_ended(server, "disconnected") == dropped_before
        again, first = await resume(server, created)
        assert (first["code"], first["is_fatal"]) == ("resume_expired", True)
        await read_until_closed(again)
        assert again.close_code == 4009

    asyncio.run(main())


def sessions_ended(port: int, reason: str) -> float:
    """``ais_sessions_total{reason=...}``: 0 until a session has ended that way."""
    try:
        return metric(port, f'ais_sessions_total{{reason="{reason}"}}')
    except StopIteration:
        return 0.0


async def refusal(ws, first: dict) -> tuple[str, int]:
    """(error code, close code) of a connection whose first event was ``first``, once the server closed it: a
    refusal is one fatal error, then the close."""
    assert first["type"] == "error" and first["is_fatal"], first
    assert await read_until_closed(ws) == [], "more than the error before the close"
    return first["code"], ws.close_code


# ---- what a resume is told: the token first, then a well-formed last_seq, then the session's state -----------


@pytest.mark.parametrize("last_seq", ["²", "9" * 5000, "0" * 20, "-1", "1.0", ""],
                         ids=["unicode_digit", "5000_digits", "20_digits", "negative", "decimal", "empty"])
def test_a_last_seq_that_is_not_a_short_ascii_number_is_invalid(server, last_seq):
    async def main():
        created = await connect_and_drop(server)
        ws, first = await resume(server, created, last_seq=last_seq)
        assert await refusal(ws, first) == ("invalid_event", 4009)
        await resume_and_close(server, created)  # the session was not harmed

    asyncio.run(main())


def test_a_wrong_token_gets_the_same_answer_whatever_the_sessions_state(server):
    """A stranger with a session id learns nothing from a resume: resume_refused whether last_seq is in the
    replay window, past it, or malformed, and whether the session is detached or connected."""
    async def main():
        created = await connect_and_drop(server)
        answers = []
        for last_seq in (1, 10**9, "²"):
            answers.append(await refusal(*await resume(server, created, token="not-the-token", last_seq=last_seq)))
        owner, first = await resume(server, created)  # connected again: a wrong token must not displace it
        assert first["type"] == "session.resumed"
        for last_seq in (1, 10**9):
            answers.append(await refusal(*await resume(server, created, token="not-the-token", last_seq=last_seq)))
        assert answers == [("resume_refused", 4009)] * 5, answers
        await owner.send(json.dumps({"type": "session.close"}))
        closing = await read_until_closed(owner)
        assert closing[-1]["type"] == "session.closed" and owner.close_code == 1000

    asyncio.run(main())


# ---- detached sessions never lock a live client out -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint):
    """4 slots, at most 2 detached sessions per client address; 127.0.0.1 is a trusted proxy, so a test picks
    each client's address with X-Forwarded-For."""
    with live_port(tiny_checkpoint, resume_grace_s=30, max_sessions=4, max_detached_per_ip=2,
                   transport={"trusted_proxies": "127.0.0.1"}) as port:
        yield port


async def open_session(port: int, address: str = "10.9.9.9"):
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", additional_headers={"X-Forwarded-For": address})
    return ws, json.loads(await ws.recv())


async def close_session(ws) -> None:
    await ws.send(json.dumps({"type": "session.close"}))
    await read_until_closed(ws)


def test_a_new_client_takes_the_slot_of_the_oldest_detached_session(small_server):
    port = small_server

    async def main():
        oldest = await connect_and_drop(port, address="10.0.0.1")
        younger = await connect_and_drop(port, address="10.0.0.2")
        live = [await open_session(port) for _ in range(2)]
        assert [first["type"] for _, first in live] == ["session.created"] * 2
        assert metric(port, "ais_sessions_active") == 4 and metric(port, "ais_sessions_detached") == 2
        evicted_before = sessions_ended(port, "detached_evicted")

        newcomer, first = await open_session(port)
        assert first["type"] == "session.created", "a detached session locked a live client out"
        assert sessions_ended(port, "detached_evicted") == evicted_before + 1
        assert metric(port, "ais_sessions_active") == 4 and metric(port, "ais_sessions_detached") == 1
        assert await refusal(*await resume(port, oldest)) == ("resume_expired", 4009)
        younger_again, first = await resume(port, younger)
        assert first["type"] == "session.resumed", "the younger detached session kept its slot"

        # Every slot is held by a connected client now: one more is refused, nobody connected is evicted.
        assert await refusal(*await open_session(port)) == ("capacity", 1013)
        for ws in [newcomer, younger_again, *(ws for ws, _ in live)]:
            await close_session(ws)

    asyncio.run(main())


@pytest.mark.parametrize("addresses, other", [
    (["10.0.0.3"] * 3, "10.0.0.4"),
    # One IPv6 client holds a /64: a new address per connection held a detached session from each.
    (["2001:db8:0:7::1", "2001:db8:0:7::2", "2001:db8:0:7:ffff::3"], "2001:db8:0:8::1"),
])
def test_one_address_holds_at_most_max_detached_per_ip_detached_sessions(small_server, addresses, other):
    port = small_server

    async def main():
        ended_before = sessions_ended(port, "detached_per_ip_limit")
        dropped = [await connect_and_drop(port, address=address) for address in addresses]
        assert metric(port, "ais_sessions_detached") == 2
        assert sessions_ended(port, "detached_per_ip_limit") == ended_before + 1
        assert await refusal(*await resume(port, dropped[0])) == ("resume_expired", 4009), "the oldest ended"
        someone_else = await connect_and_drop(port, address=other)  # another client is not counted with it
        assert metric(port, "ais_sessions_detached") == 3
        for created in [*dropped[1:], someone_else]:
            await resume_and_close(port, created)
        # The client reads its close before the server's session task has ended and unregistered the session.
        assert wait_until(lambda: metric(port, "ais_sessions_active") == 0)

    asyncio.run(main())


# ---- the log: what a detached session's end says, and no secret in it --------------------------------------


class LogCapture(logging.Handler):
    """Every line the server's loggers write, as written (after the loggers' own filters)."""

    LOGGERS = ("uvicorn.access", "uvicorn.error", "audio_interaction_server")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")

    def __enter__(self) -> LogCapture:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.INFO)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


API_KEY = "the-api-key-0123"


@pytest.fixture(scope="module")
def logged_server(tiny_checkpoint):
    """A live server (in this process, its log captured) with an API key and a 1 s resume grace."""
    from audio_interaction_server.config import ServerConfig
    from benchmarks.harness import LiveServer

    config = ServerConfig.model_validate(dict(port=0, api_key=API_KEY, log_level="info", resume_grace_s=1,
                                              engine={"checkpoint": tiny_checkpoint, "max_sessions": 2,
                                                      "device": "cpu"}))
    server = LiveServer(config).start()
    try:
        with LogCapture() as capture:
            yield server.port, capture
    finally:
        server.stop()


async def connect_with_key_and_drop(port: int, key: str) -> dict:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream?api_key={key}")
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created", created
    ws.transport.abort()
    await asyncio.sleep(0.3)
    return created


def test_neither_the_resume_token_nor_the_api_key_reaches_the_log(logged_server):
    import urllib.request

    port, capture = logged_server
    key = API_KEY

    async def main() -> dict:
        created = await connect_with_key_and_drop(port, key)
        query = urllib.parse.urlencode({"resume": created["session_id"], "token": created["resume_token"],
                                        "last_seq": 1, "api_key": key})
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream?{query}")
        assert json.loads(await ws.recv())["type"] == "session.resumed"
        await close_session(ws)
        return created

    created = asyncio.run(main())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info?api_key={key}", timeout=10) as response:
        assert response.status == 200
    time.sleep(0.2)
    text = capture.text
    logged_requests = [line for line in text.splitlines() if "/v1/" in line and "api_key=" in line]
    assert any("GET /v1/info" in line for line in logged_requests) and \
        any("resume=" in line for line in logged_requests), f"the requests were not logged:\n{text}"
    assert created["resume_token"] not in text and key not in text, f"a secret in the log:\n{text}"


def test_a_detached_session_whose_grace_runs_out_is_logged_once(logged_server):
    port, capture = logged_server
    created = asyncio.run(connect_with_key_and_drop(port, API_KEY))
    session_id = created["session_id"]
    time.sleep(1.5)  # past the 1 s grace
    lines = [line for line in capture.lines if session_id in line and "expired" in line]
    assert len(lines) == 1, lines
    detached_s = float(re.search(r"after ([0-9.]+) s", lines[0]).group(1))
    assert 0.9 <= detached_s <= 1.5 and created["resume_token"] not in lines[0], lines[0]


def test_a_session_longer_than_its_replay_window_still_resumes(tiny_checkpoint):
    """The replay log is a window of the newest events while connected; once full (a session of a few minutes at
    the default 2,000 events), the first event after a drop must push out the oldest events the client was sent
    before it, not end the session as resume_buffer_full."""
    with live_port(tiny_checkpoint, resume_grace_s=20, resume_max_events=10) as port:
        async def main():
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream")
            created = json.loads(await ws.recv())
            # Decisions only (replies on request, none asked): 15 chunks, 15 decisions; the window is 10 events.
            await ws.send(json.dumps({"type": "session.configure", "decision_events": True,
                                      "reply_mode": "on_request"}))
            seen = []
            await ws.send(np.zeros(16000 * 6, "<i2").tobytes())
            while len([e for e in seen if e["type"] == "decision"]) < 12:
                seen.append(json.loads(await ws.recv()))
            assert len(seen) > 10, "the window was full before the drop"
            last_seq = max(e["seq"] for e in seen if "seq" in e)
            ws.transport.abort()  # dropped with the window full; the last decisions arrive while detached
            await asyncio.sleep(1.0)
            resumed, first = await resume(port, created, last_seq=last_seq)
            assert first["type"] == "session.resumed", first
            await resumed.send(json.dumps({"type": "session.close"}))
            replayed = await read_until_closed(resumed)
            assert [e["seq"] for e in replayed if "seq" in e][:1] == [last_seq + 1], "nothing missed"

        asyncio.run(main())


# ---- the replay log's bounds (no server: ReplayLog alone)


def test_the_replay_log_is_bounded_in_bytes_as_well_as_in_events():
    from audio_interaction_server.api.outbox import queued_bytes
    from audio_interaction_server.api.replay_log import ReplayLog
    from audio_interaction_server.protocol import LiveTurnEndEvent

    def reply(turn: int, text: str) -> LiveTurnEndEvent:
        return LiveTurnEndEvent(session_id="s", server_time_ms=0, turn=turn, text=text, token_ids=[],
                                num_tokens=0, end_reason="text_end")

    max_bytes = 1024 * 1024
    replay = ReplayLog(max_events=2_000, max_bytes=max_bytes)
    text = "x" * (200 * 1024)  # e.g. long prompts echoed: few events, many bytes
    for turn in range(10):
        replay.stamp(reply(turn, text), keep=True)
    kept = replay.since(replay.last_seq - len(replay))
    assert kept is not None and 1 <= len(kept) <= 5, "1 MiB holds at most five 200 KiB events of the ten"
    assert [event.seq for event in kept] == list(range(11 - len(kept), 11)), "the newest are kept, in order"
    assert sum(queued_bytes(event) for event in kept) == replay.num_bytes <= max_bytes
    assert replay.since(0) is None, "a resume from before the kept range cannot be served (resume_expired)"

    # Detached (no trim): the log grows until it is over a bound, in bytes as in events; the caller ends it.
    detached = ReplayLog(max_events=2_000, max_bytes=max_bytes)
    for turn in range(5):
        detached.stamp(reply(turn, text), keep=True, trim=False)
    assert not detached.is_over_limit
    detached.stamp(reply(5, text), keep=True, trim=False)
    assert detached.is_over_limit


# ---- a replay that did not go out before its connection went ---------------------------------------------------


@pytest.fixture(scope="module")
def echo_server(tiny_checkpoint):
    """Resumable sessions, and room for a burst of session.configure (each answered with an 8 KB echo) and for a
    replay of them."""
    with live_port(tiny_checkpoint, resume_grace_s=30, resume_max_bytes=32 * 1024 * 1024, flood={"event_burst": 4000},
                   max_queued_bytes=64 * 1024 * 1024) as port:
        yield port


# Every session.updated carries it: about 8 KB each, in about 130 tokens (a prompt of ~1,900 tokens left too few
# chunks between context rollovers, which the server refuses).
ECHOED_PROMPT = "-" * 7_990


async def session_with_a_long_past(port: int, speech: np.ndarray) -> tuple[dict, list[dict]]:
    """A session whose client read 1,000 events of 8 KB, then decisions and a flush; then its network drops."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None)
    events = [json.loads(await ws.recv())]
    await ws.send(json.dumps({"type": "session.configure", "system_prompt": ECHOED_PROMPT, "max_turn_tokens": 16}))
    for _ in range(1000):  # 8 MB: more than loopback's socket buffers take (a few MB), less than the log holds
        await ws.send(json.dumps({"type": "session.configure", "decision_events": True}))
    await ws.send(speech[:3 * 16000].tobytes())
    await ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.4}))
    while events[-1]["type"] != "input.flushed":
        events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    assert not [event for event in events if event["type"] == "error"], "the setup was refused"
    ws.transport.abort()
    await asyncio.sleep(0.3)
    return events[0], events


async def resume_without_reading(port: int, created: dict) -> websockets.ClientConnection:
    """A resume whose client does not read (a network that stalls again): its replay stays queued in the server."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    query = urllib.parse.urlencode({"resume": created["session_id"], "token": created["resume_token"], "last_seq": 2})
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream?{query}", sock=sock, max_size=None, max_queue=1)
    ws.transport.pause_reading()
    await asyncio.sleep(0.5)
    return ws


async def replay_after(port: int, created: dict) -> list[dict]:
    ws, first = await resume(port, created, last_seq=2)
    assert first["type"] == "session.resumed", first
    replayed = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(first["num_replayed"])]
    await ws.send(json.dumps({"type": "session.close"}))
    await read_until_closed(ws)
    return replayed


@pytest.mark.parametrize("then", ["displaced", "dropped"])
def test_a_replay_still_queued_when_its_connection_goes_is_replayed_once(echo_server, speech, then):
    """A resume whose replay was still queued when another resume displaced it, or when its network dropped
    again: the next resume replayed those events twice, the copies numbered anew (seq went on without a gap, so a
    client could not tell them apart): every decision and the flush came twice. Replayed events are in the log
    already; only events never numbered are numbered when a socket's unsent events are kept."""
    async def main():
        created, seen = await session_with_a_long_past(echo_server, speech)
        stalled = await resume_without_reading(echo_server, created)
        assert metric(echo_server, "ais_session_queued_events") > 0, "the stalled resume's replay all went out"
        if then == "dropped":
            stalled.transport.abort()
            await asyncio.sleep(0.3)
        replayed = await replay_after(echo_server, created)
        stalled.transport.abort()
        missed = [event for event in seen if event.get("seq", 0) > 2]
        assert [e["seq"] for e in replayed] == [e["seq"] for e in missed]
        assert [e["type"] for e in replayed] == [e["type"] for e in missed]

    asyncio.run(main())


def test_a_subscriber_to_a_session_that_has_closed_is_refused_while_its_last_events_wait(echo_server):
    """A session closes while its client does not read: it stays registered until its last events are out or the
    write stall ends the socket. A subscriber that joined then was accepted and waited for ever, no event, no
    close, counted in ais_subscribers_active. It is now refused as for a session that is gone (4004)."""
    async def main():
        ws = await websockets.connect(f"ws://127.0.0.1:{echo_server}/v1/stream", max_size=None, max_queue=1)
        created = json.loads(await ws.recv())
        ws.transport.pause_reading()
        await ws.send(json.dumps({"type": "session.configure", "system_prompt": ECHOED_PROMPT, "max_turn_tokens": 16}))
        for _ in range(1000):  # 8 MB of answers: more than the sockets take
            await ws.send(json.dumps({"type": "session.configure", "decision_events": True}))
        await ws.send(json.dumps({"type": "session.close"}))
        await asyncio.sleep(0.5)
        assert metric(echo_server, "ais_session_queued_events") > 0, "everything went out"
        # A subscriber that came before the server had taken the close (on a loaded machine, 0.5 s was not always
        # enough) is served, and hears session.closed: it tries again. Each must hear something within 5 s.
        deadline = time.monotonic() + 20
        while True:
            subscriber = await websockets.connect(
                f"ws://127.0.0.1:{echo_server}/v1/sessions/{created['session_id']}/events")
            first = json.loads(await asyncio.wait_for(subscriber.recv(), 5))
            if first["type"] != "session.closed" or time.monotonic() > deadline:
                break
            await subscriber.close()
            await asyncio.sleep(0.1)
        assert await refusal(subscriber, first) == ("unknown_session", 4004)
        ws.transport.abort()

    asyncio.run(main())
