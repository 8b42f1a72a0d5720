"""What a live stream's audio chain costs the event loop per client frame, for the formats clients send.

    python -m benchmarks.audio_chain [--seconds 60] [--rounds 5] [--against OTHER_CHECKOUT/server]

For each case (16 kHz s16 mono in 100 ms and 20 ms frames, 48 kHz s16 stereo and 24 kHz s16 mono in 20 ms
frames: the last is the OpenAI Realtime dialect's format) feeds ``--seconds`` of seeded random audio, frame by
frame, to a fresh ``AudioInput`` as a session does (``accept_frame(check_frame(frame))``): checking, keeping,
then once per 0.4 s chunk decoding, resampling and cutting the padded blocks that leave through
``push_chunks``. The callback only counts the chunks: keeping them would make the loop page-fault-bound rather
than measure the chain. Prints the best time per frame of each case over ``--rounds`` rounds, the cases
interleaved within a round. A hot loop on one core: the chain's own cost, not what a frame costs a busy server
(``benchmarks.host_cost`` measures that).

Side by side: ``--against`` names another checkout's ``server`` folder (``git worktree add /tmp/base <commit>``
then ``--against /tmp/base/server``). Each round then runs once per chain, in its own process with that chain
first on ``PYTHONPATH``, the two alternating, and the table gains the other chain's column and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from audio_interaction_server.audio.stream import AudioInput
from audio_interaction_server.protocol import AudioFormat
from benchmarks import side_by_side
from benchmarks.harness import seconds_above

if TYPE_CHECKING:  # not imported: --against may name a tree from before audio/blocks.py
    from audio_interaction_server.audio.blocks import PaddedBlocks


@dataclass(frozen=True)
class Case:
    name: str
    audio_format: AudioFormat
    frame_ms: int

    def frame_bytes(self) -> int:
        num_frames = self.audio_format.sample_rate_hz * self.frame_ms // 1000
        return num_frames * self.audio_format.num_channels * 2  # s16: 2 bytes per sample


CASES = (
    Case("16 kHz s16 mono, 100 ms", AudioFormat(), 100),
    Case("16 kHz s16 mono, 20 ms", AudioFormat(), 20),
    Case("48 kHz s16 stereo, 20 ms", AudioFormat(sample_rate_hz=48_000, num_channels=2), 20),
    Case("24 kHz s16 mono, 20 ms", AudioFormat(sample_rate_hz=24_000), 20),
)


def client_frames(case: Case, seconds: float, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    num_frames = round(seconds * 1000 / case.frame_ms)
    num_values = case.frame_bytes() // 2
    return [rng.integers(-32768, 32768, num_values).astype("<i2").tobytes() for _ in range(num_frames)]


def seconds_per_frame(case: Case, frames: list[bytes]) -> tuple[float, int]:
    """Seconds per frame through a fresh ``AudioInput``, and the chunks it pushed."""
    num_chunks = 0

    def count_chunks(blocks: PaddedBlocks) -> None:
        nonlocal num_chunks
        num_chunks += len(blocks)

    audio = AudioInput(count_chunks)
    audio.set_format(case.audio_format)
    accept_frame, check_frame = audio.accept_frame, audio.check_frame
    start = time.perf_counter()
    for frame in frames:
        accept_frame(check_frame(frame))
    elapsed = time.perf_counter() - start
    return elapsed / len(frames), num_chunks


def best_seconds_per_frame(seconds: float, rounds: int) -> tuple[dict[str, float], dict[str, int]]:
    """Per case, the best seconds per frame over ``rounds`` (the cases interleaved within a round), and chunks."""
    frames = {case: client_frames(case, seconds) for case in CASES}
    best = {case.name: float("inf") for case in CASES}
    num_chunks = {}
    for _ in range(rounds):
        for case in CASES:
            elapsed, num_chunks[case.name] = seconds_per_frame(case, frames[case])
            best[case.name] = min(best[case.name], elapsed)
    return best, num_chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=seconds_above(0), default=60.0, help="audio per case and round")
    side_by_side.add_options(parser)
    args = parser.parse_args()
    if args.json:
        best_seconds_per_frame(min(args.seconds, 2.0), 1)  # a fresh interpreter's first calls are not the chain's
        print(json.dumps(best_seconds_per_frame(args.seconds, args.rounds)[0]))
        return
    if not args.against:
        best, num_chunks = best_seconds_per_frame(args.seconds, args.rounds)
        print(f"# AudioInput.accept_frame(check_frame(frame)), {args.seconds:g} s of audio per case, "
              f"best of {args.rounds} rounds")
        print("| case | bytes per frame | chunks | us per frame |\n|---|---|---|---|")
        for case in CASES:
            print(f"| {case.name} | {case.frame_bytes()} | {num_chunks[case.name]} | {best[case.name] * 1e6:.2f} |")
        return
    best_this, best_other = side_by_side.best_of_alternating(
        "benchmarks.audio_chain", ["--seconds", str(args.seconds)], args.against, args.rounds)
    print(f"# AudioInput.accept_frame(check_frame(frame)), {args.seconds:g} s of audio per case, "
          f"best of {args.rounds} alternated rounds; other chain: {args.against}")
    print("| case | this chain, us per frame | other chain, us per frame | other / this |\n|---|---|---|---|")
    for case in CASES:
        this, other = best_this[case.name], best_other[case.name]
        print(f"| {case.name} | {this * 1e6:.2f} | {other * 1e6:.2f} | {other / this:.2f} |")


if __name__ == "__main__":
    main()
