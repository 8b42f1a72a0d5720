"""Heap growth from the encoder seeing many batch sizes (docs/reliability.md, "What grows").

    python -m benchmarks.encoder_shapes [--low 90] [--high 160] [--calls 1200] [--exact] [--no-mkldnn]

Encodes random mel chunks in batches of a random size between `--low` and `--high`
(what context rollovers do: each re-encodes the session's kept history, 90-160
chunks) and prints glibc's heap (live bytes, free bytes held) and RSS every 100
calls. oneDNN builds and caches a convolution primitive per new input shape;
by default each call is padded to the server's batch buckets (a handful of
shapes, server/audio_interaction_server/model/encoder.py); `--exact` encodes every batch at its own size,
`--no-mkldnn` turns oneDNN off (slow: for the comparison only).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from audio_interaction_server.model.checkpoint import load_model
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.api.metrics import heap_stats, resident_bytes

MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--low", type=int, default=90)
    parser.add_argument("--high", type=int, default=160)
    parser.add_argument("--calls", type=int, default=1200)
    parser.add_argument("--exact", action="store_true", help="no padding to batch buckets")
    parser.add_argument("--no-mkldnn", action="store_true")
    args = parser.parse_args()
    if args.checkpoint is None:
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    encoder = AudioEncoder(load_model(args.checkpoint, "cpu").encoder_tower, pad_to_buckets=not args.exact)
    rng = random.Random(0)
    sizes_seen: set[int] = set()
    print(f"# batch sizes {args.low}..{args.high}, {'exact sizes' if args.exact else 'padded to buckets'}, "
          f"oneDNN {'off' if args.no_mkldnn else 'on'}")
    print("| calls | distinct sizes | heap live MiB | heap free MiB | RSS MiB |")
    print("|---|---|---|---|---|")
    for call in range(1, args.calls + 1):
        n = rng.randint(args.low, args.high)
        sizes_seen.add(n)
        encoder.encode(torch.randn(n, 128, 40))
        if call % 100 == 0:
            heap = heap_stats()
            live = float("nan") if heap is None else (heap.in_use + heap.mmapped) / MIB
            free = float("nan") if heap is None else heap.free / MIB
            print(f"| {call} | {len(sizes_seen)} | {live:.2f} | {free:.1f} | {(resident_bytes() or 0) / MIB:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
