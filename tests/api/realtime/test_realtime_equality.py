"""One session, two protocols: the same 16 kHz samples give the same replies through /v1/realtime as through
/v1/stream.

Both sessions hear three recordings, each followed by a flush (``input.flush`` / ``input_audio_buffer.commit``),
with greedy sampling. The tiny random model rarely replies by itself, so the server runs ``engine.scripted_turns``:
a reply starts at every ``EVERY_CHUNKS``-th chunk and lasts ``REPLY_TOKENS`` tokens, while the tokens themselves
are the model's own greedy choices (control tokens aside), so they depend on everything the session heard. The
Realtime side sends ``audio/pcm`` at 16000 Hz (this server's rate extension): both sessions get byte-identical
samples. What must match, reply by reply: the text, the token count (the emotion tag included), the emotion.
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from tests.api.realtime.test_realtime_codec import check_frame

FILES = ["02_translate/sample02_04.wav", "03_cough_music/sample03_01.wav", "01_count_bark/sample01_02.wav"]
FRAME_BYTES = 3200  # 0.1 s at 16 kHz s16
EVERY_CHUNKS = 4
REPLY_TOKENS = 16


@pytest.fixture(scope="module")
def engine_transport() -> str:
    """Where the server's engine runs; test_realtime_over_process.py runs these tests again with "process"."""
    return "thread"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, engine_transport):
    """The live server in this process (both endpoints are served the same way either way; a spawn would pay the
    imports and the model load again)."""
    from audio_interaction_server.config import ServerConfig
    from benchmarks.harness import LiveServer

    config = ServerConfig.model_validate(dict(port=0, log_level="warning", engine={
        "checkpoint": tiny_checkpoint, "device": "cpu", "transport": engine_transport,
        "scripted_turns": {"every_chunks": EVERY_CHUNKS, "reply_tokens": REPLY_TOKENS}}))
    live = LiveServer(config).start()
    yield live.port
    live.stop()


@pytest.fixture(scope="module")
def speech(shared_audio) -> list[bytes]:
    from audio_interaction_server.audio.files import load_audio_file

    return [(np.clip(load_audio_file(shared_audio / name), -1, 1) * 32767).astype("<i2").tobytes() for name in FILES]


async def next_of(socket, kinds: set[str]) -> dict:
    while True:
        event = json.loads(await socket.recv())
        assert event["type"] != "error", event
        if event["type"] in kinds:
            return event


async def native_replies(port: int, speech: list[bytes]) -> list[tuple[str, int, str | None]]:
    import websockets

    replies, emotion = [], None
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream") as socket:
        await next_of(socket, {"session.created"})
        for audio in speech:
            for start in range(0, len(audio), FRAME_BYTES):
                await socket.send(audio[start:start + FRAME_BYTES])
            await socket.send(json.dumps({"type": "input.flush"}))
        num_flushed = 0
        while num_flushed < len(speech):  # every flush answered: all audio heard, every reply ended
            event = await next_of(socket, {"emotion", "turn_end", "input.flushed"})
            if event["type"] == "emotion":
                emotion = event["emotion"]
            elif event["type"] == "turn_end":
                replies.append((event["text"], event["num_tokens"], emotion))
                emotion = None
            else:
                num_flushed += 1
    return replies


async def realtime_replies(port: int, speech: list[bytes], num_replies: int) -> list[tuple[str, int, str | None]]:
    import websockets

    replies = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime") as socket:
        await next_of(socket, {"session.created"})
        await socket.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000}}}}}))
        await next_of(socket, {"session.updated"})
        for audio in speech:
            for start in range(0, len(audio), FRAME_BYTES):
                chunk = base64.b64encode(audio[start:start + FRAME_BYTES]).decode()
                await socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            await socket.send(json.dumps({"type": "input_audio_buffer.commit"}))
        while len(replies) < num_replies:
            raw = await socket.recv()
            assert isinstance(raw, str), "a binary frame: the Realtime API is JSON text frames only"
            event = json.loads(raw)
            assert event["type"] != "error", event
            if event["type"] != "session.updated":  # rate 16000 is outside the SDK's Literal[24000]
                check_frame(raw)
            if event["type"] == "response.done":
                response = event["response"]
                replies.append((response["output"][0]["content"][0]["text"], response["usage"]["output_tokens"],
                                (response["metadata"] or {}).get("emotion")))
    return replies


def test_the_same_samples_give_the_same_replies_on_both_endpoints(server, speech):
    native = asyncio.run(asyncio.wait_for(native_replies(server, speech), 120))
    assert len(native) >= 4 and all(num_tokens == REPLY_TOKENS for _, num_tokens, _ in native)
    assert len({text for text, _, _ in native}) == len(native)  # the model's own tokens: each reply its own
    realtime = asyncio.run(asyncio.wait_for(realtime_replies(server, speech, len(native)), 120))
    assert realtime == native


async def forced_replies(port: int, speech: list[bytes], realtime: bool) -> list[str]:
    """Manual turns: each recording, a flush, and once it is all heard, ``response.create``."""
    import websockets

    texts = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/{'realtime' if realtime else 'stream'}") as socket:
        await next_of(socket, {"session.created"})
        configure = {"type": "session.update", "session": {"audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None}}}} if realtime else \
            {"type": "session.configure", "reply_mode": "on_request"}
        await socket.send(json.dumps(configure))
        await next_of(socket, {"session.updated"})
        for audio in speech:
            for start in range(0, len(audio), FRAME_BYTES):
                data = audio[start:start + FRAME_BYTES]
                await socket.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(data).decode()}) if realtime else data)
            await socket.send(json.dumps({"type": "input_audio_buffer.commit" if realtime else "input.flush"}))
            await next_of(socket, {"input_audio_buffer.committed" if realtime else "input.flushed"})
            await socket.send(json.dumps({"type": "response.create"}))
            done = await asyncio.wait_for(next_of(socket, {"response.done" if realtime else "turn_end"}), 20)
            texts.append(done["response"]["output"][0]["content"][0]["text"] if realtime else done["text"])
    return texts


def test_manual_turns_reply_at_the_chunk_after_a_request_on_both_endpoints(server, speech):
    native = asyncio.run(asyncio.wait_for(forced_replies(server, speech, realtime=False), 90))
    realtime = asyncio.run(asyncio.wait_for(forced_replies(server, speech, realtime=True), 90))
    assert len(native) == len(FILES) and realtime == native
