"""What the benchmarks that go over sockets share, besides the live-server harness (``benchmarks.harness``:
``spawn_server``, ``server_log``, ``shared_audio_dir``): the shared recordings as one loop, the client side
of a real-time 16 kHz s16 stream (configure, pace 100 ms frames, map a decision back to its frame), and
the memory-trend figure the long runs report."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

from audio_interaction_server.spec import CHUNK_SAMPLES, SAMPLE_RATE_HZ
from benchmarks.harness import shared_audio_dir

FRAME_SAMPLES = 1600  # 100 ms frames
LOOKAHEAD_SAMPLES = 40  # a chunk is complete once 40 samples past its end have arrived


def audio_loop(audio_dir: Path | None = None) -> np.ndarray:
    """Every recording under ``audio_dir`` (the shared ones by default), 16 kHz mono, in folder and sequence order."""
    # Imported here: the audio front-end brings torch and transformers (two seconds), which a client process that
    # is handed the loop (benchmarks.host_cost) does not need.
    from audio_interaction_server.audio.files import load_audio_file, load_audio_sequence

    audio_dir = shared_audio_dir() if audio_dir is None else Path(audio_dir)
    pieces = [load_audio_file(p) for folder in sorted(audio_dir.iterdir()) if folder.is_dir()
              for p in load_audio_sequence(folder)]
    return np.concatenate(pieces)


def stream_audio(loop: np.ndarray, stream: int, num_samples: int) -> np.ndarray:
    """``num_samples`` of the loop, starting at a different place for each stream."""
    start = (stream * 7919 * FRAME_SAMPLES) % len(loop)
    return np.tile(loop, num_samples // len(loop) + 2)[start:start + num_samples]


def completing_frame(chunk: int) -> int:
    """The frame whose arrival completes ``chunk`` (it carries the chunk's look-ahead samples)."""
    return (CHUNK_SAMPLES * (chunk + 1) + LOOKAHEAD_SAMPLES - 1) // FRAME_SAMPLES


def chunks_decided(num_frames: int) -> int:
    """Decisions a stream of ``num_frames`` frames gets without a flush."""
    return (num_frames * FRAME_SAMPLES - LOOKAHEAD_SAMPLES) // CHUNK_SAMPLES


async def configure_s16_stream(ws, max_turn_tokens: int) -> None:
    """Read ``session.created``, ask for decision events and 16 kHz mono s16, wait for ``session.updated``."""
    assert json.loads(await ws.recv())["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.configure", "decision_events": True,
                              "max_turn_tokens": max_turn_tokens,
                              "audio": {"sample_format": "pcm_s16le", "sample_rate_hz": SAMPLE_RATE_HZ,
                                        "num_channels": 1}}))
    assert json.loads(await ws.recv())["type"] == "session.updated"


async def send_in_real_time(ws, audio: np.ndarray, num_frames: int, first_frame_at: float,
                            sent_at: dict[int, float]) -> None:
    """Send ``num_frames`` 100 ms s16 frames of ``audio``, frame i due at ``first_frame_at + i * 0.1 s``
    (``time.perf_counter`` clock); ``sent_at[i]`` records when frame i went out."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    for frame in range(num_frames):
        delay = first_frame_at + frame * FRAME_SAMPLES / SAMPLE_RATE_HZ - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[frame] = time.perf_counter()
        await ws.send(pcm[frame * FRAME_SAMPLES:(frame + 1) * FRAME_SAMPLES].tobytes())


async def stream_timing_decisions(url: str, audio: np.ndarray, first_frame_at: float, latencies: list[float],
                                  max_turn_tokens: int, timeout_s: float) -> None:
    """One real-time client: stream ``audio`` from ``first_frame_at``, append each chunk's decision latency
    (the frame completing the chunk sent -> its ``decision`` received) to ``latencies``, then close."""
    import websockets

    sent_at: dict[int, float] = {}
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        await configure_s16_stream(ws, max_turn_tokens)
        num_frames = len(audio) // FRAME_SAMPLES
        expected = chunks_decided(num_frames)

        async def receive() -> None:
            received = 0
            while received < expected:
                event = json.loads(await ws.recv())
                if event["type"] == "decision":
                    latencies.append(time.perf_counter() - sent_at[completing_frame(event["chunk"])])
                    received += 1

        receiver = asyncio.create_task(receive())
        await send_in_real_time(ws, audio, num_frames, first_frame_at, sent_at)
        await asyncio.wait_for(receiver, timeout=timeout_s)
        await ws.send(json.dumps({"type": "session.close"}))


def slope_per_hour(minutes: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` against time, per hour (nan with fewer than 2 points)."""
    if len(minutes) < 2:
        return float("nan")
    return float(np.polyfit(np.array(minutes) / 60.0, np.array(values), 1)[0])
