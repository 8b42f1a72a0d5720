"""Whole audio frames skip the websockets frame parser (api/websocket_guard.py,
``GuardedWebSocketProtocol._split_frames``).

The fast path must change nothing a client or the app can see. Each case feeds a client byte stream, cut at
different places, to the guarded protocol, and the same frames one read each to the same protocol parsing every
byte with websockets (``benchmarks.frame_parsing.ParserOnly``: the guarded protocol as it was before the fast
path), both after a real handshake and an app that accepted; then compares what the app was given, what went
back to the client (pongs, close frames) and whether the connection was closed. Frames are made by websockets'
own client-side serialiser.

One read each for the reference, because on the parser-only path the frames that came in the same read as a
bad one (unmasked, oversized, reserved bits) never reach the app: uvicorn's ``data_received`` handles the
parser's error and returns before it hands over the events parsed with it. The fast path hands over every
good frame before the bad one, as the parser-only path does when they come in reads of their own.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest
from websockets.frames import Close, Frame, Opcode

from benchmarks.frame_parsing import open_protocol

MAX_SIZE = 100_000  # ws_max_size of the protocols under test


async def run_stream(fast_path: bool, stream: bytes, cuts: list[int]) -> dict[str, Any]:
    """Handshake, the app accepts, then ``stream`` arrives in the pieces ``cuts`` makes of it."""
    protocol, transport = await open_protocol(fast_path, max_size=MAX_SIZE)
    handshake_reply = bytes(transport.written)
    transport.written.clear()
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        if not transport.closed:
            protocol.data_received(stream[start:end])
    messages = []
    while not protocol.queue.empty():
        messages.append(protocol.queue.get_nowait())
    outcome = {"handshake": handshake_reply[:12], "messages": messages, "written": bytes(transport.written),
               "closed": transport.closed, "fast_frames": protocol.num_fast_frames if fast_path else 0}
    for task in list(protocol.tasks):
        task.cancel()
    await asyncio.gather(*protocol.tasks, return_exceptions=True)
    return outcome


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def audio_frames(rng: random.Random, count: int) -> list[bytes]:
    """Binary frames of the sizes around each header form's limits, and 100 ms of 16 kHz s16."""
    sizes = [0, 1, 125, 126, 3200, 65535, 65536, 70_000]
    return [client_frame(Opcode.BINARY, rng.randbytes(rng.choice(sizes))) for _ in range(count)]


def cut_patterns(rng: random.Random, length: int) -> list[list[int]]:
    """Whole, every few bytes, at random places, and a byte at a time for the first 300 bytes."""
    return [[], list(range(7, length, 7)), sorted(rng.sample(range(1, length), min(40, length - 1))),
            list(range(1, min(300, length)))]


def stream_cases() -> dict[str, list[bytes]]:
    rng = random.Random(5)
    text = "héllo wörld, ☃ 🎧".encode()
    fragmented = [client_frame(Opcode.BINARY, b"ab" * 50, fin=False), client_frame(Opcode.PING, b"p"),
                  client_frame(Opcode.CONT, b"cd" * 50, fin=False), client_frame(Opcode.CONT, b"ef", fin=True)]
    unmasked = Frame(Opcode.BINARY, b"x" * 10).serialize(mask=False)
    return {
        "audio": audio_frames(rng, 12),
        "audio, text, pings and pongs": [*audio_frames(rng, 3), client_frame(Opcode.TEXT, text),
                                         client_frame(Opcode.PING, b"ping"), *audio_frames(rng, 2),
                                         client_frame(Opcode.PONG, b""), client_frame(Opcode.TEXT, b'{"type": "x"}')],
        "a fragmented message with a ping inside": [*audio_frames(rng, 2), *fragmented, *audio_frames(rng, 2)],
        "a binary frame inside a fragmented message": [client_frame(Opcode.TEXT, b"a", fin=False),
                                                       client_frame(Opcode.BINARY, b"b"), *audio_frames(rng, 1)],
        "invalid UTF-8": [*audio_frames(rng, 2), client_frame(Opcode.TEXT, b"ok \xff\xfe"), *audio_frames(rng, 2)],
        "an unmasked frame": [*audio_frames(rng, 2), unmasked, *audio_frames(rng, 1)],
        "reserved bits": [*audio_frames(rng, 1), bytes([0xC2]) + client_frame(Opcode.BINARY, b"z")[1:],
                          *audio_frames(rng, 1)],
        "an oversized frame": [*audio_frames(rng, 1), client_frame(Opcode.BINARY, bytes(MAX_SIZE + 1)),
                               *audio_frames(rng, 1)],
        "a close then more audio": [*audio_frames(rng, 2), client_frame(Opcode.CLOSE, Close(1000, "bye").serialize()),
                                    *audio_frames(rng, 2)],
    }


def frame_ends(frames: list[bytes]) -> list[int]:
    return list(itertools.accumulate(map(len, frames)))[:-1]


@pytest.mark.parametrize("case", list(stream_cases()))
def test_the_fast_path_changes_nothing_the_app_or_the_client_sees(case):
    frames = stream_cases()[case]
    stream = b"".join(frames)
    parsed = asyncio.run(run_stream(False, stream, frame_ends(frames)))
    assert parsed["handshake"] == b"HTTP/1.1 101"
    for cuts in [frame_ends(frames), *cut_patterns(random.Random(case), len(stream))]:
        fast = asyncio.run(run_stream(True, stream, cuts))
        assert fast["handshake"] == parsed["handshake"]
        assert fast["messages"] == parsed["messages"], (case, len(cuts))
        assert fast["written"] == parsed["written"] and fast["closed"] == parsed["closed"], (case, len(cuts))


def test_audio_frames_take_the_fast_path_however_they_arrive():
    rng = random.Random(1)
    frames = audio_frames(rng, 20)
    stream = b"".join(frames)
    for cuts in cut_patterns(rng, len(stream)):
        outcome = asyncio.run(run_stream(True, stream, cuts))
        assert outcome["fast_frames"] == len(frames) and len(outcome["messages"]) == len(frames)
        assert not outcome["written"] and not outcome["closed"]


def test_after_a_frame_the_parser_took_in_part_the_fast_path_resumes_between_frames():
    """A ping cut in two goes to websockets half-read; the audio after it takes the fast path again."""
    rng = random.Random(2)
    ping = client_frame(Opcode.PING, b"12345678")
    after = audio_frames(rng, 3)
    stream = b"".join([*audio_frames(rng, 2), ping, *after])
    ping_start = stream.index(ping)
    outcome = asyncio.run(run_stream(True, stream, [ping_start + 3, ping_start + len(ping) + 1]))
    assert len(outcome["messages"]) == 5 and outcome["fast_frames"] == 5
    assert outcome["written"] == Frame(Opcode.PONG, b"12345678").serialize(mask=False)
