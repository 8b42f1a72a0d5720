"""/v1/realtime driven by the three real clients from PyPI, unmodified, against a live server on loopback.

- the openai SDK (``AsyncOpenAI(base_url=...).realtime.connect()``): replies the model decides on while real
  speech streams at 24 kHz, manual turns, a cancel, a refused ``output_modalities: ["audio"]``, telephony
  audio (G.711 mu-law and A-law), an ephemeral client secret (also as the browser subprotocol), and the
  server full (close 1013);
- LiveKit Agents (``livekit-plugins-openai``'s ``RealtimeModel(base_url=..., modalities=["text"])``, its
  session object without a room): three manual turns through ``generate_reply`` and an ``interrupt``;
- pipecat (``OpenAIRealtimeLLMService``) in a pipeline: the first reply it asks for, then replies the model
  decides on while speech streams.

Every frame each client receives is held to ``check_frame`` (the SDK's own types, strictly, and pipecat's
parser); no client may log a warning or error we did not provoke, and no receive loop may end.

The tiny random model rarely replies by itself, so the server runs with ``engine.scripted_turns``: a reply
every few chunks, each exactly ``REPLY_TOKENS`` long (a request by ``response.create`` still forces one at
the next chunk, and manual turns still wait for it). test_realtime_equality.py runs the model unscripted.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from tests.api.realtime.test_realtime_codec import check_frame, sdk_adapter

KEY = "realtime-test-key"
EVERY_CHUNKS = 6  # a reply the model "decides on" every 2.4 s of audio
REPLY_TOKENS = 40  # long enough that a cancel sent at response.created lands mid-reply
DOCS = Path(__file__).resolve().parents[3] / "docs" / "realtime.md"
FILES = ["02_translate/sample02_04.wav", "03_cough_music/sample03_01.wav", "02_translate/sample02_01.mp3"]
RATE_HZ = 24_000


def run_framework(coroutine, timeout_s: float):
    """``asyncio.run(asyncio.wait_for(coroutine, timeout_s))``, for a framework's client (LiveKit, pipecat), with
    a bounded end: asyncio.run cancels every task left and waits for each, and a framework task that outlives its
    cancel (one pipecat run that failed did) held the test, and the suite, for good. Tasks still running 10 s
    after their cancel are left to the closed loop."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coroutine, timeout_s))
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=10))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def speech_24k(shared_audio: Path, name: str) -> bytes:
    """A recording as the clients send it: 24 kHz mono s16le, resampled from the file's own rate."""
    samples, rate_hz = soundfile.read(shared_audio / name, dtype="float32", always_2d=True)
    mono = soxr.resample(samples.mean(axis=1), rate_hz, RATE_HZ, quality="HQ")
    return (np.clip(mono, -1, 1) * 32767).astype("<i2").tobytes()


class ServerLog(logging.Handler):
    """The server's own errors (its loggers and uvicorn's), kept while the module's server runs; the clients' records
    are client_logs' matter."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("audio_interaction_server", "uvicorn")):
            self.lines.append(f"{record.levelname} {record.name}: {self.format(record)}")

    def problems(self) -> list[str]:
        return self.lines


@pytest.fixture(scope="module")
def engine_transport() -> str:
    """Where the server's engine runs; test_realtime_clients_over_process.py runs tests again with "process"."""
    return "thread"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, engine_transport):
    """The live server in this process (a spawn would pay the imports and the model load again, ~7 s)."""
    yield from live_server(tiny_checkpoint, engine_transport)


@pytest.fixture(scope="module")
def small_buffer_server(tiny_checkpoint, engine_transport):
    """A live server that buffers at most 2 s of audio for the model: one append of 3 s is refused, whatever the
    model has heard, and a commit's 1 s of silence still fits."""
    yield from live_server(tiny_checkpoint, engine_transport, max_buffered_audio_s=2.0)


def live_server(tiny_checkpoint, engine_transport, **settings):
    from audio_interaction_server.config import ServerConfig
    from benchmarks.harness import LiveServer

    config = ServerConfig.model_validate(dict(port=0, api_key=KEY, max_sessions=2, log_level="warning", engine={
        "checkpoint": tiny_checkpoint, "device": "cpu", "transport": engine_transport,
        "scripted_turns": {"every_chunks": EVERY_CHUNKS, "reply_tokens": REPLY_TOKENS}}, **settings))
    log = ServerLog()
    live = LiveServer(config).start()
    # uvicorn's loggers stop at "uvicorn" (configured as the server is built, so the handler is added after).
    watched = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in watched:
        logger.addHandler(log)
    try:
        yield live.port, log
    finally:
        live.stop()
        for logger in watched:
            logger.removeHandler(log)
    assert not log.problems(), log.problems()


def idle(server) -> int:
    """The server's port once no session is open: the previous test's sessions close a moment after their
    sockets, and this server holds two at most."""
    port, _ = server
    deadline = time.monotonic() + 20
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/load", headers={"Authorization": f"Bearer {KEY}"})
    while True:
        with urllib.request.urlopen(request, timeout=5) as response:
            if json.loads(response.read())["active"] == 0:
                return port
        assert time.monotonic() < deadline, "sessions of an earlier test are still open"
        time.sleep(0.05)


class Watch(logging.Handler):
    """Warnings and errors the clients log (the openai SDK and LiveKit use logging; pipecat uses loguru)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
def client_logs():
    watch = Watch()
    root = logging.getLogger()
    root.addHandler(watch)
    try:
        yield watch.records
    finally:
        root.removeHandler(watch)


# ---- the openai SDK -----------------------------------------------------------------------------------------


class SdkRun:
    """One SDK connection: sends, and receives raw frames (each checked, then parsed by the SDK itself)."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.adapter = sdk_adapter()
        self.frames: list[dict] = []

    async def next(self, timeout_s: float = 30.0) -> dict:
        raw = await asyncio.wait_for(self.connection.recv_bytes(), timeout_s)
        frame = check_frame(raw.decode(), self.adapter)
        event = self.connection.parse_event(raw)  # what an application gets: a typed event, never a dict
        assert type(event).__name__ != "dict" and event.type == frame["type"]
        self.frames.append(frame)
        return frame

    async def until(self, kind: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                frame = await self.next(max(0.1, deadline - time.monotonic()))
            except (TimeoutError, asyncio.TimeoutError):
                seen = [(f["type"], f.get("response", {}).get("status")) for f in self.frames[-40:]]
                raise AssertionError(f"no {kind} within {timeout_s:g} s; the last frames: {seen}") from None
            if frame["type"] == kind:
                return frame

    async def stream(self, audio: bytes, speed: float = 4.0) -> None:
        """100 ms appends at ``speed`` x real time."""
        step = RATE_HZ // 10 * 2
        for start in range(0, len(audio), step):
            await self.connection.input_audio_buffer.append(audio=base64.b64encode(audio[start:start + step]).decode())
            await asyncio.sleep(0.1 / speed)

    def of(self, kind: str) -> list[dict]:
        return [frame for frame in self.frames if frame["type"] == kind]

    async def manual_turns(self) -> dict:
        """Turn detection off (the client commits and asks for replies itself); the session as updated."""
        await self.connection.session.update(session={"type": "realtime",
                                                      "audio": {"input": {"turn_detection": None}}})
        return (await self.until("session.updated"))["session"]


@contextlib.asynccontextmanager
async def sdk_session(port: int, **connect_options) -> AsyncIterator[SdkRun]:
    """A Realtime session of the openai SDK on our server, with the API key (``connect_options``: the SDK's
    ``realtime.connect`` arguments beside the model)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1")
    async with client.realtime.connect(model="gpt-realtime", **connect_options) as connection:
        yield SdkRun(connection)


# What may arrive while no response is open: the model listening sends nothing of its own; the user's audio
# becomes an item when a reply starts or a commit is heard.
BETWEEN_RESPONSES = {"session.created", "session.updated", "error", "input_audio_buffer.committed",
                     "input_audio_buffer.cleared", "conversation.item.added", "conversation.item.done"}


def responses_in_order(frames: list[dict]) -> list[dict]:
    """Each response's events must nest: created, its deltas and dones, then done, before the next begins."""
    done, open_id = [], None
    for frame in frames:
        response_id = frame.get("response_id") or (frame.get("response") or {}).get("id")
        if open_id is None and frame["type"] != "response.created":
            assert frame["type"] in BETWEEN_RESPONSES, f"{frame['type']} while the model listens"
        if frame["type"] == "response.created":
            assert open_id is None, "a response began inside another"
            open_id = response_id
        elif frame["type"] == "response.done":
            assert response_id == open_id
            done.append(frame["response"])
            open_id = None
        elif response_id is not None:
            assert response_id == open_id, f"{frame['type']} outside its response"
    return done


def test_openai_sdk_replies_manual_turn_cancel_and_refusal(server, shared_audio, client_logs):
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(server)

    async def run() -> SdkRun:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            created = await sdk.next()
            assert created["type"] == "session.created"
            assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE_HZ}

            await connection.session.update(session={"type": "realtime", "output_modalities": ["audio"]},
                                             event_id="want_audio")
            refused = await sdk.until("error")
            assert refused["error"]["code"] == "invalid_value" and refused["error"]["event_id"] == "want_audio"
            assert refused["error"]["param"] == "session.output_modalities"

            # The model decides: real speech streams in, replies come on their own.
            await connection.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                                     "audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
            await sdk.until("session.updated")
            for name in FILES:
                await sdk.stream(speech_24k(shared_audio, name))
            while len(sdk.of("response.done")) < 3:
                await sdk.until("response.done")

            # A forced reply, cancelled as soon as it exists.
            await connection.response.create(response={"metadata": {"asked": "yes"}}, event_id="ask")
            created = await sdk.until("response.created")
            await connection.response.cancel(event_id="stop")
            cancelled = (await sdk.until("response.done"))["response"]
            assert cancelled["id"] == created["response"]["id"] and cancelled["status"] == "cancelled"
            assert cancelled["status_details"]["reason"] == "client_cancelled"
            assert cancelled["metadata"]["asked"] == "yes"
            await connection.response.cancel(event_id="again")
            assert (await sdk.until("error"))["error"]["code"] == "response_cancel_not_active"

            # A forced reply cancelled at once, before it began (pipecat's interruption right after asking): it was
            # refused, "not started yet", and the reply came all the same. Now the request is withdrawn (or, had the
            # reply begun, cut) and its response closed as cancelled, without an error.
            num_errors = len(sdk.of("error"))
            asked = {"asked": "and withdrawn"}
            await connection.response.create(response={"metadata": asked}, event_id="ask2")
            await connection.response.cancel(event_id="stop2")
            while (withdrawn := (await sdk.until("response.done"))["response"])["metadata"] != asked:
                pass  # a reply the model began of its own, before
            assert withdrawn["status"] == "cancelled", withdrawn
            assert sdk.of("error")[num_errors:] == []
            return sdk

    sdk = asyncio.run(asyncio.wait_for(run(), 180))
    assert len({frame["event_id"] for frame in sdk.frames}) == len(sdk.frames), "an event_id came twice"
    responses = responses_in_order(sdk.frames)
    completed = [response for response in responses if response["status"] == "completed"]
    assert len(completed) >= 3
    for response in completed:
        text = response["output"][0]["content"][0]["text"]
        assert text and response["usage"]["output_tokens"] == REPLY_TOKENS
        deltas = [f["delta"] for f in sdk.frames if f["type"] == "response.output_text.delta"
                  and f["response_id"] == response["id"]]
        assert "".join(deltas) == text
    assert not [record for record in client_logs if record.startswith("openai")], client_logs


def test_openai_sdk_manual_turns(server, shared_audio):
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(server)

    async def run() -> SdkRun:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            await connection.session.update(session={"type": "realtime", "instructions": "Answer briefly.",
                                                     "audio": {"input": {"turn_detection": None}}})
            updated = await sdk.until("session.updated")
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            assert updated["session"]["instructions"] == "Answer briefly."
            for name in FILES[:2]:
                await sdk.stream(speech_24k(shared_audio, name), speed=8.0)
                await connection.input_audio_buffer.commit()
                committed = await sdk.until("input_audio_buffer.committed")
                assert not sdk.of("response.created")[len(sdk.of("response.done")):], "replied unasked"
                await connection.response.create()
                done = await sdk.until("response.done")
                assert done["response"]["status"] == "completed"
                user = [f for f in sdk.of("conversation.item.added") if f["item"]["id"] == committed["item_id"]]
                assert user and user[0]["item"]["role"] == "user"
            return sdk

    sdk = asyncio.run(asyncio.wait_for(run(), 120))
    assert len(responses_in_order(sdk.frames)) == 2


def test_openai_sdk_telephony_audio_g711(server, shared_audio):
    """audio/pcmu and audio/pcma: 8 kHz G.711 bytes, decoded by the server, heard and answered."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop", reason="the G.711 encoder used here (audioop) left Python 3.13")

    port = idle(server)
    samples, rate_hz = soundfile.read(shared_audio / FILES[0], dtype="float32", always_2d=True)
    pcm_8k = (np.clip(soxr.resample(samples.mean(axis=1), rate_hz, 8_000), -1, 1) * 32767).astype("<i2").tobytes()

    async def run(format_type: str, encode) -> dict:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            await connection.session.update(session={"type": "realtime", "audio": {"input": {
                "format": {"type": format_type}, "turn_detection": None}}})
            updated = await sdk.until("session.updated")
            assert updated["session"]["audio"]["input"]["format"] == {"type": format_type}
            coded = encode(pcm_8k, 2)
            for start in range(0, len(coded), 800):  # 100 ms of 8 kHz G.711
                await connection.input_audio_buffer.append(audio=base64.b64encode(coded[start:start + 800]).decode())
            await connection.input_audio_buffer.commit()
            await sdk.until("input_audio_buffer.committed")
            await connection.response.create()
            return (await sdk.until("response.done"))["response"]

    for format_type, encode in (("audio/pcmu", audioop.lin2ulaw), ("audio/pcma", audioop.lin2alaw)):
        response = asyncio.run(asyncio.wait_for(run(format_type, encode), 60))
        assert response["status"] == "completed" and response["usage"]["output_tokens"] == REPLY_TOKENS


def test_openai_sdk_response_max_output_tokens_caps_that_response_only(server, shared_audio):
    """response.max_output_tokens below the session's cap was refused (invalid_value). The Realtime API honours it:
    that response stops after that many output tokens, incomplete for max_output_tokens, and a later response
    without one (or with "inf", or one above the session's cap) has the session's cap again."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(server)
    caps = [5, None, 1, "inf", 4096]

    async def run() -> tuple[SdkRun, dict, list[dict]]:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            session = await sdk.manual_turns()
            await sdk.stream(speech_24k(shared_audio, FILES[0]), speed=8.0)
            await connection.input_audio_buffer.commit()
            await sdk.until("input_audio_buffer.committed")
            responses = []
            for cap in caps:
                asked = {} if cap is None else {"response": {"max_output_tokens": cap}}
                await connection.response.create(**asked, event_id=f"cap_{cap}")
                responses.append((await sdk.until("response.done"))["response"])
            return sdk, session, responses

    sdk, session, responses = asyncio.run(asyncio.wait_for(run(), 120))
    assert not sdk.of("error"), sdk.of("error")
    session_cap = session["max_output_tokens"]
    assert isinstance(session_cap, int) and session_cap > REPLY_TOKENS
    for cap, response in zip(caps, responses):
        deltas = [f["delta"] for f in sdk.frames if f["type"] == "response.output_text.delta"
                  and f["response_id"] == response["id"]]
        text = response["output"][0]["content"][0]["text"]
        assert "".join(deltas) == text, (cap, response)
        created = next(f for f in sdk.of("response.created") if f["response"]["id"] == response["id"])
        if isinstance(cap, int) and cap < session_cap:
            assert response["status"] == "incomplete", (cap, response)
            assert response["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
            assert response["output"][0]["status"] == "incomplete"
            assert response["usage"]["output_tokens"] == response["usage"]["total_tokens"] == cap
            assert response["max_output_tokens"] == created["response"]["max_output_tokens"] == cap
        else:
            assert response["status"] == "completed" and response["status_details"] is None, (cap, response)
            assert response["usage"]["output_tokens"] == REPLY_TOKENS
            assert response["max_output_tokens"] == created["response"]["max_output_tokens"] == session_cap


def test_openai_sdk_a_clear_after_a_commit_keeps_the_committed_audio(server, shared_audio):
    """The Realtime API's clear empties the input buffer; audio committed before it is the conversation's. The server
    dropped every chunk the model had not heard yet, committed ones too, and answered the commit with an error
    (commit_empty). The commit is answered committed, its user item made, and only the audio after it dropped."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(server)
    speech = speech_24k(shared_audio, FILES[0])
    committed, after = speech[:RATE_HZ * 2 * 6 // 5], speech[RATE_HZ * 2 * 6 // 5:RATE_HZ * 2 * 2]  # 1.2 s, 0.8 s

    async def run() -> SdkRun:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            await sdk.manual_turns()
            await connection.input_audio_buffer.append(audio=base64.b64encode(committed).decode())
            await connection.input_audio_buffer.commit(event_id="commit_1")
            await connection.input_audio_buffer.append(audio=base64.b64encode(after).decode())
            await connection.input_audio_buffer.clear(event_id="clear_1")
            while not (sdk.of("input_audio_buffer.committed") and sdk.of("input_audio_buffer.cleared")):
                assert (await sdk.next())["type"] != "error", sdk.frames[-1]
            await sdk.until("conversation.item.done")
            await connection.input_audio_buffer.commit(event_id="commit_2")  # nothing since the clear
            assert (await sdk.until("error"))["error"]["event_id"] == "commit_2"
        return sdk

    sdk = asyncio.run(run())
    assert [frame["error"]["code"] for frame in sdk.of("error")] == ["input_audio_buffer_commit_empty"]
    [item] = [frame["item"] for frame in sdk.of("conversation.item.done")]
    assert item["role"] == "user" and item["id"] == sdk.of("input_audio_buffer.committed")[0]["item_id"]


def chunks_decided(port: int) -> float:
    """The 0.4 s chunks every session of the server heard so far (``ais_chunks_decided_total``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("ais_chunks_decided_total ")))


def test_openai_sdk_a_clear_after_response_create_keeps_the_audio_that_response_answers(server, shared_audio):
    """docs/realtime.md: a response.create commits the audio taken before it, and a clear keeps committed audio. A
    clear sent just after the request (a user talking again at once) dropped every chunk the model had not heard:
    the response answered the first two of 20 chunks, and no user item came before it (first-hour review, round
    sixteen). The model hears all of that audio, a user item holds it, then the response."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(server)
    speech = b"".join(speech_24k(shared_audio, name) for name in FILES)  # about 8 s: 20 chunks
    num_whole_chunks = len(speech) // (RATE_HZ * 2 * 2 // 5)
    heard_before = chunks_decided(port)

    async def run() -> SdkRun:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            await sdk.manual_turns()
            step = RATE_HZ // 10 * 2
            for start in range(0, len(speech), step):  # 100 ms appends at once, far ahead of the model
                await connection.input_audio_buffer.append(audio=base64.b64encode(speech[start:start + step]).decode())
            await connection.response.create(event_id="ask")
            await connection.input_audio_buffer.clear(event_id="clear_1")
            done = await sdk.until("response.done")
            assert done["response"]["status"] in ("completed", "incomplete"), done["response"]
        return sdk

    sdk = asyncio.run(asyncio.wait_for(run(), 120))
    assert not sdk.of("error"), sdk.of("error")
    # The last whole chunk may wait for the resampler's few milliseconds of look-ahead: the reply answers the one
    # before.
    assert chunks_decided(port) - heard_before >= num_whole_chunks - 1
    types = [frame["type"] for frame in sdk.frames]
    assert "input_audio_buffer.committed" in types
    assert types.index("input_audio_buffer.committed") < types.index("response.created")
    [user] = [frame["item"] for frame in sdk.of("conversation.item.done") if frame["item"]["role"] == "user"]
    assert user["id"] == sdk.of("input_audio_buffer.committed")[0]["item_id"]


def test_openai_sdk_an_append_of_no_whole_sample_is_refused_in_the_realtime_dialects_words(server):
    """An odd number of bytes in audio/pcm was refused as "not a whole number of pcm_s16le frames", /v1/stream's
    format name and word (first-hour review, round sixteen). It names the format the client declared."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(server)

    async def run() -> SdkRun:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            await sdk.manual_turns()
            await connection.input_audio_buffer.append(audio=base64.b64encode(b"\x01\x02\x03").decode(),
                                                       event_id="odd")
            await sdk.until("error")
        return sdk

    [error] = [frame["error"] for frame in asyncio.run(asyncio.wait_for(run(), 60)).of("error")]
    assert error["event_id"] == "odd" and error["code"] == "invalid_audio", error
    message = error["message"]
    assert "pcm_s16le" not in message and " frames" not in message, message
    assert "3 bytes" in message and "audio/pcm" in message and "16-bit" in message, message


def test_openai_sdk_refused_append_is_no_audio_to_commit(small_buffer_server):
    """An append refused for a full buffer (audio_buffer_full) still counted as audio to commit: the commit after it
    was answered input_audio_buffer.committed, a user item of audio the server had refused, instead of
    input_audio_buffer_commit_empty; and the next reply, too, committed it first."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")

    port = idle(small_buffer_server)
    too_long = base64.b64encode(bytes(3 * RATE_HZ * 2)).decode()  # 3 s of silence: over the 2 s buffer
    short = base64.b64encode(bytes(RATE_HZ // 5 * 2)).decode()  # 0.2 s

    async def answer(sdk: SdkRun) -> dict:
        """The answer to a commit: committed, or an error."""
        while (frame := await sdk.next())["type"] not in ("error", "input_audio_buffer.committed"):
            pass
        return frame

    async def run() -> SdkRun:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            await sdk.manual_turns()
            await connection.input_audio_buffer.append(audio=too_long, event_id="refused_1")
            assert (await sdk.until("error"))["error"]["code"] == "audio_buffer_full"
            await connection.input_audio_buffer.commit(event_id="commit_1")
            empty = (await answer(sdk)).get("error")
            assert empty and (empty["code"], empty["event_id"]) == ("input_audio_buffer_commit_empty", "commit_1")
            # Audio taken, then audio refused: the commit holds the audio taken, and the next commit has none.
            await connection.input_audio_buffer.append(audio=short)
            await connection.input_audio_buffer.commit(event_id="commit_2")
            assert (await answer(sdk))["type"] == "input_audio_buffer.committed"
            await connection.input_audio_buffer.append(audio=too_long, event_id="refused_2")
            assert (await sdk.until("error"))["error"]["code"] == "audio_buffer_full"
            await connection.input_audio_buffer.commit(event_id="commit_3")
            empty = (await answer(sdk)).get("error")
            assert empty and (empty["code"], empty["event_id"]) == ("input_audio_buffer_commit_empty", "commit_3")
            # A reply commits the audio not yet committed first: the refused audio is none.
            await connection.input_audio_buffer.append(audio=too_long, event_id="refused_3")
            assert (await sdk.until("error"))["error"]["code"] == "audio_buffer_full"
            await connection.response.create()
            await sdk.until("response.done")
            return sdk

    sdk = asyncio.run(asyncio.wait_for(run(), 60))
    assert len(sdk.of("input_audio_buffer.committed")) == 1, sdk.of("input_audio_buffer.committed")
    full, empty = "audio_buffer_full", "input_audio_buffer_commit_empty"
    assert [f["error"]["code"] for f in sdk.of("error")] == [full, empty, full, empty, full]


def test_client_secret_minted_by_a_backend_opens_the_socket_also_as_a_subprotocol(server):
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")
    import websockets
    from openai import AsyncOpenAI, AuthenticationError, BadRequestError

    port = idle(server)
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"

    async def run() -> None:
        backend = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1")
        secret = await backend.realtime.client_secrets.create(expires_after={"anchor": "created_at", "seconds": 60})
        assert secret.value.startswith("ek_") and secret.expires_at > time.time() + 50
        assert secret.session.type == "realtime"
        with pytest.raises(BadRequestError) as refused:  # OpenAI's bounds: 10 to 7200 s
            await backend.realtime.client_secrets.create(expires_after={"anchor": "created_at", "seconds": 5})
        assert refused.value.code == "invalid_value" and refused.value.param == "expires_after.seconds"
        browser = AsyncOpenAI(api_key=secret.value, base_url=f"http://127.0.0.1:{port}/v1")
        with pytest.raises(AuthenticationError):  # a secret cannot mint more secrets
            await browser.realtime.client_secrets.create()
        async with browser.realtime.connect(model="gpt-realtime") as connection:  # as a bearer key
            assert (await SdkRun(connection).next())["type"] == "session.created"
        # As a browser offers it: no headers, the key in a subprotocol; the server echoes only "realtime".
        async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{secret.value}"]) \
                as socket:
            assert socket.subprotocol == "realtime"
            assert json.loads(await socket.recv())["type"] == "session.created"
        # Behind a proxy with HTTP basic auth the browser adds that Authorization header by itself: the secret in
        # the subprotocol still counts (any Authorization header used to switch the subprotocol off).
        async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{secret.value}"],
                                      additional_headers={"Authorization": "Basic dXNlcjpwYXNz"}) as socket:
            assert json.loads(await socket.recv())["type"] == "session.created"
        async with websockets.connect(url, subprotocols=["realtime", "openai-insecure-api-key.ek_1_x_0"]) as socket:
            refused = check_frame(await socket.recv())
            assert refused["error"]["code"] == "invalid_api_key"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
            assert closed.value.rcvd.code == 1008

    asyncio.run(asyncio.wait_for(run(), 60))


def mint(port: int, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """``POST /v1/realtime/client_secrets`` as raw HTTP: the status and the JSON answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/realtime/client_secrets", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json",
                                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_mint_checks_its_session_as_session_update_would_and_takes_the_key_as_every_endpoint_does(server):
    """docs/realtime.md: the mint request's ``session`` is validated (not stored). It used to be taken as any
    object; settings that ``session.update`` refuses now get the same refusal as a 400. The key is read as
    everywhere else (``X-API-Key`` too, not only a bearer header), and an expiry must be a number, not ``true``."""
    port, _ = server
    as_bearer = {"Authorization": f"Bearer {KEY}"}
    status, answer = mint(port, {"session": {"type": "realtime", "instructions": "Be brief.",
                                             "output_modalities": ["text"], "max_output_tokens": 64,
                                             "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                                 "turn_detection": None}}}}, as_bearer)
    assert status == 200 and answer["value"].startswith("ek_")
    refused = [
        ({"type": "transcription"}, "session.type"),
        ({"output_modalities": ["audio"]}, "session.output_modalities"),
        ({"tools": [{"type": "function", "name": "f"}]}, "session.tools"),
        ({"max_output_tokens": 0}, "session.max_output_tokens"),
        ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format"),
        ({"audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}}, "session.audio.input.turn_detection.type"),
        ({"instructions": 7}, "session.instructions"),
    ]
    for session, param in refused:
        status, answer = mint(port, {"session": session}, as_bearer)
        assert status == 400 and answer["error"]["param"] == param, (session, answer)
    status, answer = mint(port, {"expires_after": {"anchor": "created_at", "seconds": True}}, as_bearer)
    assert status == 400 and answer["error"]["param"] == "expires_after.seconds", answer
    assert "integer" in answer["error"]["message"]
    status, answer = mint(port, {}, {"X-API-Key": KEY})
    assert status == 200 and answer["value"].startswith("ek_")
    assert mint(port, {}, {"X-API-Key": "wrong"})[0] == 401


def test_a_transcription_intent_is_refused_as_the_clients_error(server):
    """The SDK's connect(extra_query={"intent": "transcription"}) was refused with an error of type server_error, as if
    the server had failed: what is refused is the client's request, an invalid_request_error as the same refusal of
    a session.update's session.type is."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")
    import websockets

    port = idle(server)

    async def run() -> dict:
        async with sdk_session(port, extra_query={"intent": "transcription"}) as sdk:
            refused = await sdk.next()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await sdk.next()
            assert closed.value.rcvd.code == 1008
            return refused

    refused = asyncio.run(asyncio.wait_for(run(), 30))
    assert refused["type"] == "error" and refused["error"]["code"] == "invalid_value", refused
    assert refused["error"]["type"] == "invalid_request_error", refused


def test_a_client_quiet_between_turns_keeps_its_session_with_an_empty_session_update(tiny_checkpoint, engine_transport):
    """docs/realtime.md, idle sessions: the server closes a session after idle_timeout_s without a client event, which
    a push-to-talk client (nothing sent between turns) meets while its user thinks; the SDK's pings do not count. A
    session.update of {"type": "realtime"} alone keeps the session and changes nothing."""
    pytest.importorskip("openai", reason="the openai SDK is not installed (pip install -e .[test])")
    import websockets

    live = live_server(tiny_checkpoint, engine_transport, idle_timeout_s=1.0)
    port, _ = next(live)

    async def run() -> tuple[SdkRun, dict]:
        async with sdk_session(port) as sdk:
            connection = sdk.connection
            session = (await sdk.manual_turns())
            for _ in range(6):  # 3 s, three idle timeouts: kept
                await asyncio.sleep(0.5)
                await connection.session.update(session={"type": "realtime"})
                assert (await sdk.until("session.updated", 5))["session"] == session
            refused = await sdk.until("error", 5)  # then quiet
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await sdk.next(5)
            assert closed.value.rcvd.code == 4000
            return sdk, refused

    try:
        sdk, refused = asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        next(live, None)
    assert refused["error"]["code"] == "idle_timeout", refused
    assert [frame["type"] for frame in sdk.frames[:-1]] == ["session.created"] + ["session.updated"] * 7


def test_a_full_server_refuses_with_an_error_and_close_1013(server):
    import websockets

    port = idle(server)
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    headers = {"Authorization": f"Bearer {KEY}"}

    async def run() -> None:
        async with websockets.connect(url, additional_headers=headers) as first, \
                websockets.connect(url, additional_headers=headers) as second:
            for socket in (first, second):
                assert json.loads(await socket.recv())["type"] == "session.created"
            async with websockets.connect(url, additional_headers=headers) as third:
                refused = check_frame(await third.recv())
                assert refused["error"]["code"] == "capacity"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await third.recv()
                assert closed.value.rcvd.code == 1013  # the SDK reconnects on it when asked to

    asyncio.run(asyncio.wait_for(run(), 60))


# ---- LiveKit Agents -----------------------------------------------------------------------------------------


def test_livekit_realtime_model_manual_turns_and_interrupt(server, shared_audio, client_logs):
    pytest.importorskip("livekit.plugins.openai", reason="livekit-plugins-openai is not installed")
    from livekit import rtc
    from livekit.plugins.openai.realtime import RealtimeModel

    port = idle(server)
    adapter = sdk_adapter()

    async def run() -> tuple[list[str], list[dict], object]:
        model = RealtimeModel(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, modalities=["text"],
                              turn_detection=None)
        session = model.session()
        received: list[dict] = []
        session.on("openai_server_event_received", lambda event: received.append(
            check_frame(json.dumps(event), adapter)))
        errors: list = []
        session.on("error", errors.append)
        texts: list[str] = []
        try:
            for name in FILES:
                audio = np.frombuffer(speech_24k(shared_audio, name), dtype="<i2")
                for start in range(0, len(audio), RATE_HZ // 10):
                    frame = audio[start:start + RATE_HZ // 10]
                    session.push_audio(rtc.AudioFrame(frame.tobytes(), RATE_HZ, 1, len(frame)))
                    await asyncio.sleep(0.02)
                session.commit_audio()
                generation = await session.generate_reply()  # waits for response.created with its event id
                assert generation.user_initiated
                text = ""
                async for message in generation.message_stream:
                    async for piece in message.text_stream:
                        text += piece
                texts.append(text)
            generation = await session.generate_reply()
            session.interrupt()  # response.cancel while the reply runs
            async for message in generation.message_stream:
                async for _ in message.text_stream:
                    pass
            deadline = time.monotonic() + 30
            while not any(e["type"] == "response.done" and e["response"]["status"] == "cancelled" for e in received):
                assert time.monotonic() < deadline, "no cancelled response.done"
                await asyncio.sleep(0.05)
            main_task = session._main_atask
            assert not main_task.done(), "LiveKit's session loop ended"
        finally:
            await session.aclose()
            await model.aclose()
        return texts, received, errors

    texts, received, errors = run_framework(run(), 180)
    assert len(texts) == 3 and all(texts), texts
    responses = responses_in_order(received)
    assert [r["status"] for r in responses] == ["completed"] * 3 + ["cancelled"]
    assert [r["output"][0]["content"][0]["text"] for r in responses[:3]] == texts
    assert not errors, errors
    unexpected = [r for r in client_logs if r.startswith("livekit") and "discarded due to session closed" not in r]
    assert not unexpected, unexpected


def docs_livekit_model_kwargs() -> dict:
    """The keyword arguments docs/realtime.md's "LiveKit Agents" snippet gives LiveKit's ``RealtimeModel``."""
    section = DOCS.read_text().split("### LiveKit Agents", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("RealtimeModel"):
            return {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
    raise AssertionError("no RealtimeModel(...) in the docs' LiveKit snippet")


def test_livekit_model_as_the_docs_build_it_keeps_the_sessions_stt_transcripts(server, shared_audio):
    """LiveKit's RealtimeModel defaults input_audio_transcription to gpt-4o-mini-transcribe, and then takes the model
    for the transcriber of the user's speech (capabilities.user_transcription): its AgentSession drops its own STT's
    transcripts and waits for conversation.item.input_audio_transcription.* events. The server never sends them
    (speech streamed and answered below), so with the docs' model as it was no user transcript ever appeared."""
    pytest.importorskip("livekit.plugins.openai", reason="livekit-plugins-openai is not installed")
    from livekit import rtc
    from livekit.plugins.openai.realtime import RealtimeModel

    port = idle(server)
    adapter = sdk_adapter()

    async def run() -> tuple[list[dict], bool]:
        model = RealtimeModel(**{**docs_livekit_model_kwargs(), "base_url": f"http://127.0.0.1:{port}/v1",
                                 "api_key": KEY})
        session = model.session()
        received: list[dict] = []
        session.on("openai_server_event_received", lambda event: received.append(
            check_frame(json.dumps(event), adapter)))
        try:
            audio = np.frombuffer(speech_24k(shared_audio, FILES[0]), dtype="<i2")
            for start in range(0, len(audio), RATE_HZ // 10):
                frame = audio[start:start + RATE_HZ // 10]
                session.push_audio(rtc.AudioFrame(frame.tobytes(), RATE_HZ, 1, len(frame)))
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 30
            while not any(event["type"] == "response.done" for event in received):  # the model replied by itself
                assert time.monotonic() < deadline, "no response.done"
                await asyncio.sleep(0.05)
        finally:
            await session.aclose()
            await model.aclose()
        return received, model.capabilities.user_transcription

    received, takes_model_transcripts = run_framework(run(), 60)
    assert [event for event in received if event["type"] == "input_audio_buffer.committed"]
    transcripts = [event for event in received if event["type"].startswith("conversation.item.input_audio_transcr")]
    assert not transcripts
    assert takes_model_transcripts is False, "LiveKit would drop the STT's transcripts and wait for the server's"


def test_livekit_model_as_the_docs_build_it_never_replaces_its_session():
    """LiveKit replaces its connection every max_session_duration (20 minutes by default). Here that is a new session
    whose model heard nothing, and LiveKit sends its whole chat history at once into it, one conversation.item.create
    per message: past the event burst (200) the server cuts it (event_flood, 1008) and refuses the agent's address
    for a while. The docs' model keeps its one session (the server's max_session_s bounds it)."""
    pytest.importorskip("livekit.plugins.openai", reason="livekit-plugins-openai is not installed")
    from livekit.plugins.openai.realtime import RealtimeModel

    from audio_interaction_server.config import FloodLimits, ServerConfig

    model = RealtimeModel(**{**docs_livekit_model_kwargs(), "api_key": KEY})
    assert model._opts.max_session_duration is None, "LiveKit would open a new session every 20 minutes"
    assert FloodLimits().event_burst == 200 and ServerConfig.model_fields["max_session_s"].default >= 3600


# ---- pipecat ------------------------------------------------------------------------------------------------



async def run_pipecat_pipeline(llm, sink) -> tuple:
    """pipecat's pipeline of ``llm`` then ``sink``, running once its realtime session is ready: the worker to queue
    frames into, and the runner's task."""
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    worker = PipelineWorker(Pipeline([llm, sink]))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    while not llm._api_session_ready:
        await asyncio.sleep(0.05)
    return worker, running


def test_pipecat_openai_realtime_service_in_a_pipeline(server, shared_audio):
    pytest.importorskip("pipecat.services.openai.realtime.llm", reason="pipecat-ai is not installed")
    from loguru import logger
    from pipecat.frames.frames import (
        EndFrame, ErrorFrame, InputAudioRawFrame, LLMContextFrame, LLMFullResponseEndFrame, LLMTextFrame,
    )
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

    port = idle(server)
    problems: list[str] = []
    sink_id = logger.add(lambda message: problems.append(str(message)), level="WARNING",
                         filter=lambda record: "is not emitting turn frames" not in record["message"])

    class Collect(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.texts: list[str] = []
            self.current = ""
            self.errors: list = []

        async def process_frame(self, frame, direction) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMTextFrame):
                self.current += frame.text
            elif isinstance(frame, LLMFullResponseEndFrame):
                self.texts.append(self.current)
                self.current = ""
            elif isinstance(frame, ErrorFrame):
                self.errors.append(frame)
            await self.push_frame(frame, direction)

    async def run() -> tuple[Collect, bool]:
        llm = OpenAIRealtimeLLMService(
            api_key=KEY, base_url=f"ws://127.0.0.1:{port}/v1/realtime",
            settings=OpenAIRealtimeLLMService.Settings(session_properties=events.SessionProperties(
                output_modalities=["text"], instructions="Answer briefly.")))
        collect = Collect()
        task, running = await run_pipecat_pipeline(llm, collect)
        # The context's first response: pipecat asks for it with response.create.
        await task.queue_frame(LLMContextFrame(context=LLMContext(messages=[{"role": "user", "content": "Hi"}])))
        for name in FILES:
            audio = speech_24k(shared_audio, name)
            for start in range(0, len(audio), RATE_HZ // 10 * 2):
                await task.queue_frame(InputAudioRawFrame(audio=audio[start:start + RATE_HZ // 10 * 2],
                                                          sample_rate=RATE_HZ, num_channels=1))
                await asyncio.sleep(0.025)
        deadline = time.monotonic() + 60
        while len(collect.texts) < 4:
            assert time.monotonic() < deadline, f"{len(collect.texts)} replies"
            await asyncio.sleep(0.1)
        alive = llm._receive_task is not None and not llm._receive_task.done()
        await task.queue_frame(EndFrame())
        await asyncio.wait_for(running, 30)
        return collect, alive

    try:
        collect, alive = run_framework(run(), 180)
    finally:
        logger.remove(sink_id)
    assert alive, "pipecat's receive loop ended"
    assert len(collect.texts) >= 4 and all(collect.texts), collect.texts
    assert not collect.errors and not problems, (collect.errors, problems)


def audio_taken_s(port: int) -> float:
    """The audio every session of the server took so far (``ais_audio_received_seconds_total``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("ais_audio_received_seconds_total ")))


@pytest.mark.parametrize("updates", [["audio/pcmu"], ["audio/pcmu", "audio/pcm"]])
def test_appends_after_a_format_update_are_read_in_that_format_while_its_answer_waits_unsent(server, updates):
    """A session.update of the input format, and appends right after it, while the client has not read the echoes
    before them: the appends were decoded in the format of the last session.updated *sent*, so 2 s of G.711 went
    in as 1 s of PCM16; and pcmu then pcm (24 kHz) compared the second update with that stale format, sent no
    change, and left the session reading the 24 kHz appends as 8 kHz, three times too long, for good."""
    import socket

    import websockets

    port = idle(server)
    if updates[-1] == "audio/pcmu":
        second = np.random.default_rng(0).integers(0, 256, 8_000, dtype=np.uint8).tobytes()  # 1 s at 8 kHz
    else:
        second = (np.random.default_rng(0).standard_normal(24_000) * 1000).astype("<i2").tobytes()  # 1 s at 24 kHz

    async def main() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", sock=sock, max_size=None, max_queue=1,
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            ws.transport.pause_reading()
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 200_000}]}
            for _ in range(12):  # echoes the client does not read: what the server sends next waits behind them
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await asyncio.sleep(0.5)
            before_s = audio_taken_s(port)
            for kind in updates:
                await ws.send(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"input": {"format": {"type": kind}}}}}))
            for _ in range(2):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(second).decode()}))
            deadline = time.monotonic() + 5  # polled gently: a /metrics request spends 20 of the address's budget
            while audio_taken_s(port) - before_s < 2.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
            await asyncio.sleep(0.3)  # nothing more comes in
            assert audio_taken_s(port) - before_s == pytest.approx(2.0), "the appends were read in another format"
            ws.transport.resume_reading()
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            formats = []
            while len(formats) < len(updates):
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if event["type"] == "session.updated":
                    formats.append(event["session"]["audio"]["input"]["format"]["type"])
            assert formats == updates

    asyncio.run(asyncio.wait_for(main(), 60))


def test_pipecat_retrieves_conversation_items(server):
    """pipecat's retrieve_conversation_item sends conversation.item.retrieve. The server answered unknown_event, which
    pipecat takes as fatal: its receive loop ended, and the retrieval waited for an answer that could never come."""
    pytest.importorskip("pipecat.services.openai.realtime.llm", reason="pipecat-ai is not installed")
    from pipecat.frames.frames import EndFrame, LLMContextFrame, LLMFullResponseEndFrame, LLMTextFrame
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

    port = idle(server)

    class Collect(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.text = ""
            self.is_done = False

        async def process_frame(self, frame, direction) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMTextFrame):
                self.text += frame.text
            elif isinstance(frame, LLMFullResponseEndFrame) and self.text:
                self.is_done = True
            await self.push_frame(frame, direction)

    async def run() -> None:
        llm = OpenAIRealtimeLLMService(
            api_key=KEY, base_url=f"ws://127.0.0.1:{port}/v1/realtime",
            settings=OpenAIRealtimeLLMService.Settings(session_properties=events.SessionProperties(
                output_modalities=["text"], instructions="Answer briefly.")))
        created: dict[str, str] = {}

        @llm.event_handler("on_conversation_item_created")
        async def on_created(service, item_id, item) -> None:
            created[item.role] = item_id

        collect = Collect()
        task, running = await run_pipecat_pipeline(llm, collect)
        await task.queue_frame(LLMContextFrame(context=LLMContext(messages=[{"role": "user", "content": "Hi"}])))
        deadline = time.monotonic() + 30
        while not collect.is_done:
            assert time.monotonic() < deadline, "no reply"
            await asyncio.sleep(0.05)
        try:
            reply = await asyncio.wait_for(llm.retrieve_conversation_item(created["assistant"]), 10)
            assert reply.role == "assistant" and reply.status == "completed"
            assert reply.content[0].text == collect.text
            asked = await asyncio.wait_for(llm.retrieve_conversation_item(created["user"]), 10)
            assert asked.role == "user" and asked.content[0].text == "Hi"
            with pytest.raises(Exception, match="no item with id 'nope'"):
                await asyncio.wait_for(llm.retrieve_conversation_item("nope"), 10)
            assert llm._receive_task is not None and not llm._receive_task.done(), "pipecat's receive loop ended"
        finally:
            await task.queue_frame(EndFrame())
            await asyncio.wait_for(running, 30)

    run_framework(run(), 90)
