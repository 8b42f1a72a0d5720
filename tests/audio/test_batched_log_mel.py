"""The engine's batched log-mel equals the per-session streaming front-end bit for bit.

Live sessions send padded 16 kHz blocks (``AudioInput`` -> ``PaddedBlocks``); before each step the worker
computes the features of the chunk at the head of every session's queue in one ``log_mel_blocks`` call and clamps
each against its session's own running maximum (``engine/features.py``). These tests drive the real chain
(``AudioInput`` on the session side, the worker's inbox on the engine side, a tiny real model) and compare with
``StreamingLogMel`` fed the same 16 kHz stream, which ``test_audio.py`` pins to whole-file features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.audio.files import load_audio_file
from audio_interaction_server.audio.mel import StreamingLogMel, _log_mel_block, log_mel_blocks
from audio_interaction_server.audio.stream import AudioInput
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine import wire
from audio_interaction_server.engine.commands import PushAudio
from audio_interaction_server.engine.features import QueuedBlock
from audio_interaction_server.engine.worker import Worker
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.protocol import AudioFormat
from audio_interaction_server.spec import CHUNK_SAMPLES, SAMPLE_RATE_HZ

BLOCK_SAMPLES = 6640


@pytest.fixture(scope="module")
def speech(shared_audio: Path) -> np.ndarray:
    return load_audio_file(shared_audio / "02_translate" / "sample02_02.wav")


@pytest.mark.parametrize("num_blocks", [1, 3, 17])
def test_log_mel_blocks_equals_each_block_alone(speech: np.ndarray, num_blocks: int) -> None:
    rng = np.random.default_rng(num_blocks)
    starts = rng.integers(0, speech.shape[0] - BLOCK_SAMPLES, size=num_blocks)
    blocks = torch.from_numpy(np.stack([speech[s : s + BLOCK_SAMPLES] for s in starts]))
    blocks[num_blocks // 2] = 0.0  # a silent row takes the cached block
    batched = log_mel_blocks(blocks)
    alone = torch.stack([_log_mel_block(block) for block in blocks])
    assert batched.shape == (num_blocks, 128, 40)
    assert torch.equal(batched, alone)


def test_padded_blocks_cross_the_wire_out_of_band() -> None:
    blocks = PaddedBlocks(np.arange(2 * BLOCK_SAMPLES, dtype=np.float32).reshape(2, BLOCK_SAMPLES), 5)
    frames = wire.encode(PushAudio("s", blocks))
    # The samples go as the last frame, their own buffer (not copied into a message); engine/wire.py.
    assert np.shares_memory(np.frombuffer(frames[-1], dtype=np.float32), blocks.samples)
    received = wire.decode([zmq.Frame(frame) for frame in frames])
    assert received.mel_chunks.first_chunk_index == 5
    assert np.array_equal(received.mel_chunks.samples, blocks.samples)


class _Script:
    """One session's traffic: the same actions go to ``AudioInput`` (engine side) and ``StreamingLogMel``."""

    def __init__(self, session_id: str, samples: np.ndarray, seed: int) -> None:
        self.session_id = session_id
        self.reference: list[torch.Tensor] = []
        self._front_end = StreamingLogMel()
        rng = np.random.default_rng(seed)
        cuts = np.cumsum(rng.integers(100, 9000, size=samples.shape[0] // 100))
        self.pieces = np.split(samples, cuts[cuts < samples.shape[0]])

    def push(self, audio: AudioInput, piece: np.ndarray) -> None:
        audio.accept(piece)
        self.reference += self._front_end.push(piece)

    def flush(self, audio: AudioInput, trailing_silence_s: float) -> None:
        audio.flush(trailing_silence_s)
        silence = np.zeros(int(round(trailing_silence_s * SAMPLE_RATE_HZ)), np.float32)
        self.reference += self._front_end.push(silence) + self._front_end.flush(pad_to_chunk=True)
        self._front_end = StreamingLogMel()

    def clear(self, audio: AudioInput) -> None:
        audio.clear()  # the partial chunk is dropped; the next audio starts a fresh front-end
        self._front_end = StreamingLogMel()


def test_worker_features_equal_streaming_front_end_per_session(tiny_model, speech: np.ndarray) -> None:
    """Four sessions with different chunk phases, interleaved in the worker's batches, with flush (trailing
    silence, padding), clear_audio and audio after both (a fresh stream: the running maximum restarts). What the
    model hears: each chunk's features as the worker computes them, when the chunk is next in its queue."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=4))
    heard: dict[str, list[torch.Tensor]] = {}
    compute = worker.features.compute

    def recording_compute():  # the real call, then the features it put at the head of each queue
        due = [session for session in worker.scheduler.sessions.values() if session.conversation.audio_queue
               and isinstance(session.conversation.audio_queue[0], QueuedBlock)]
        failures = compute()
        for session in due:
            heard.setdefault(session.session_id, []).append(session.conversation.audio_queue[0])
        return failures

    worker.features.compute = recording_compute  # type: ignore[method-assign]
    scripts, inputs = [], []
    for i in range(4):
        offset = 1_337 * i + 701 * (i % 2)  # different phases against the 6400-sample chunk grid
        samples = np.concatenate([speech[offset:], speech[: 3 * CHUNK_SAMPLES + 123 * i]]) * (0.3 + 0.5 * i)
        script = _Script(f"s{i}", samples.astype(np.float32), seed=i)
        scripts.append(script)
        inputs.append(AudioInput(lambda blocks, sid=script.session_id: worker.push_audio(sid, blocks)))
        worker.open_session(script.session_id, SessionOptions(max_turn_tokens=4), lambda events: None)
    for audio in inputs:
        audio.set_format(AudioFormat(sample_rate_hz=SAMPLE_RATE_HZ))
    rng = np.random.default_rng(7)
    num_rounds = max(len(script.pieces) for script in scripts)
    for round_index in range(num_rounds):
        for script, audio in zip(scripts, inputs):
            if round_index < len(script.pieces):
                script.push(audio, script.pieces[round_index])
            if round_index == num_rounds // 3 and script.session_id in ("s0", "s2"):
                script.flush(audio, trailing_silence_s=0.3 + 0.5 * (script.session_id == "s2"))
            if round_index == num_rounds // 2 and script.session_id in ("s1", "s2"):
                script.clear(audio)
        if rng.random() < 0.4:  # a step: several pushes of several sessions applied before it
            worker.step()
    for script, audio in zip(scripts, inputs):
        script.flush(audio, trailing_silence_s=0.2)
    worker.run_until_idle()
    for script, audio in zip(scripts, inputs):
        got = heard[script.session_id]
        assert len(got) == len(script.reference) == audio.num_chunks_pushed
        assert all(torch.equal(a, b) for a, b in zip(got, script.reference)), script.session_id
