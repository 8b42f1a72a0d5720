"""What the guarded WebSocket protocol costs per client frame, with and without the frame fast path.

    python -m benchmarks.frame_parsing [--frames 5000] [--bytes 3200] [--rounds 3]

Feeds ``--frames`` masked binary frames of ``--bytes`` each (100 ms of 16 kHz s16 by default), one read per
frame, to ``GuardedWebSocketProtocol.data_received`` after a real handshake, and takes each message from the
app's queue: once as the server runs it (``_split_frames``: whole audio frames skip the websockets parser) and
once parsing every byte with websockets (``ParserOnly``, the protocol before the fast path), alternated per
round; prints the best time per frame of each and their ratio. A hot loop on one core: it shows the parser's
own cost, not what a frame costs a busy server (``benchmarks.host_cost`` measures that).

The harness (``open_protocol``) is shared with tests/api/test_frame_fast_path.py.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import uvicorn
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from audio_interaction_server.api.transport import uvicorn_options
from audio_interaction_server.api.transport_guard import TransportGuard
from audio_interaction_server.api.websocket_guard import GuardedWebSocketProtocol
from audio_interaction_server.config import TransportSettings
from benchmarks.harness import positive_int

HANDSHAKE = (b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class RecordingTransport:
    """What the protocol writes, and whether it closed; reading can always pause."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.num_pauses = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.num_pauses += 1

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:  # so a protocol closing the connection closes it at once
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


async def accept_and_wait(scope, receive, send) -> None:
    """ASGI app: accepts, then leaves every message in the protocol's queue for the caller to read."""
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await asyncio.Event().wait()


def protocol_class(fast_path: bool) -> type[GuardedWebSocketProtocol]:
    """The guarded protocol as the server runs it, or (``fast_path=False``) parsing every byte with websockets."""
    # The frame budget lifted: the benchmark sends thousands of frames at once, which the server would cut as a flood.
    unlimited = TransportSettings(data_frames_per_s=1e9, data_frame_burst=10**9)
    guarded = uvicorn_options(TransportGuard(unlimited))["ws"]
    if fast_path:
        return guarded

    class ParserOnly(guarded):  # type: ignore[misc, valid-type]
        def data_received(self, data: bytes) -> None:
            self._parse(data)

    return ParserOnly


async def open_protocol(fast_path: bool, max_size: int = 16 * 1024 * 1024) -> tuple[Any, RecordingTransport]:
    """A protocol after a real handshake that its app accepted; the caller cancels ``protocol.tasks``."""
    config = uvicorn.Config(accept_and_wait, ws=protocol_class(fast_path), ws_max_size=max_size,
                            ws_per_message_deflate=False, ws_ping_interval=None, log_level="critical")
    config.load()
    protocol = config.ws_protocol_class(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(HANDSHAKE)
    for _ in range(100):  # the app's task accepts
        if protocol.handshake_complete:
            break
        await asyncio.sleep(0)
    assert protocol.handshake_complete, "the app did not accept"
    return protocol, transport


async def seconds_per_frame(fast_path: bool, frames: list[bytes]) -> float:
    protocol, _ = await open_protocol(fast_path)
    start = time.perf_counter()
    for frame in frames:
        protocol.data_received(frame)
        protocol.queue.get_nowait()
    elapsed = time.perf_counter() - start
    for task in list(protocol.tasks):
        task.cancel()
    await asyncio.gather(*protocol.tasks, return_exceptions=True)
    return elapsed / len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=positive_int, default=5000)
    parser.add_argument("--bytes", type=positive_int, default=3200, help="payload bytes per frame")
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    frames = [Frame(Opcode.BINARY, rng.randbytes(args.bytes)).serialize(mask=True) for _ in range(args.frames)]
    parsed, fast = [], []
    for _ in range(args.rounds):
        parsed.append(asyncio.run(seconds_per_frame(False, frames)))
        fast.append(asyncio.run(seconds_per_frame(True, frames)))
    print(f"# {args.frames} masked binary frames of {args.bytes} bytes, one read each, best of {args.rounds} rounds")
    print("| path | us per frame |\n|---|---|")
    print(f"| websockets parser | {min(parsed) * 1e6:.2f} |\n| fast path | {min(fast) * 1e6:.2f} |")
    print(f"\nparser / fast path: {min(parsed) / min(fast):.2f}")


if __name__ == "__main__":
    main()
