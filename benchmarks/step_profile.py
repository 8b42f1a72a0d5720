"""Where a real-size step's time goes on a GPU: the encoder and the LM forward, piece by piece.

    python -m benchmarks.step_profile --out DIR [--device cuda] [--preset real]

(from the repository root; ``PYTHONPATH=server`` in front where the package is not installed)

Builds the random real-size model on the device (``audio_interaction_server.demo.random_model``) and
times, each as the median of several warm calls with the device synchronised:

* the audio tower: transformers' own forward (packed chunks, attention looped chunk by
  chunk) against ``AudioEncoder`` (one batched attention call per layer), N chunks;
* one LM forward (``last_hidden``) over B listening rows of 13 tokens and over B reply rows
  of 1 token, with in-place FlexAttention (compiled) and with gather attention;
* the per-step FlexAttention plan (block mask) alone;
* a whole serving step through the engine's runner (``engine/runner.py``: encoder call, batch,
  forward, token choice with its one device read) over B listening rows with audio, flex and gather;
* a torch.profiler table of one FlexAttention listening step (top operators by device
  time and by host time).

Writes ``DIR/profile.md``. ``--preset tiny --device cpu`` runs the same code in seconds
(tests/test_gpu_check.py does not call it; it is a diagnosis tool, not a benchmark of record).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.engine.conversation import RowPlan
from audio_interaction_server.engine.runner import PlannedRow, Runner
from audio_interaction_server.model.encoder import AudioEncoder, AudioTower
from audio_interaction_server.model.fit import median_wall_ms
from audio_interaction_server.model.lm import StepBatch
from audio_interaction_server.demo.random_model import random_model

LISTEN_ROW_TOKENS = 13


def transformers_tower(tower: AudioTower) -> torch.nn.Module:
    """transformers' ``Qwen2_5OmniAudioEncoder`` (the reference's module) with ``tower``'s weights, on its device
    and in its dtype."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    c = tower.config
    config = Qwen2_5OmniAudioEncoderConfig(
        num_mel_bins=c.num_mel_bins, d_model=c.d_model, encoder_layers=c.encoder_layers,
        encoder_attention_heads=c.encoder_attention_heads, encoder_ffn_dim=c.encoder_ffn_dim,
        max_source_positions=c.max_source_positions, n_window=c.n_window, output_dim=c.output_dim)
    config._attn_implementation = "sdpa"
    weight = tower.conv1.weight
    with torch.device(weight.device):
        theirs = Qwen2_5OmniAudioEncoder._from_config(config)
    theirs = theirs.to(weight.dtype)
    theirs.load_state_dict(tower.state_dict(), strict=True)
    return theirs.eval()
START_POSITION = 500  # about 15 s into a session


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    return median_wall_ms(fn, device, repeats)


def rows_batch(num_rows: int, row_tokens: int, device: torch.device) -> StepBatch:
    rows = [[(17 * i + j) % 150000 for j in range(row_tokens)] for i in range(num_rows)]
    return StepBatch.build(rows, [START_POSITION] * num_rows, list(range(num_rows)), [[] for _ in rows], None,
                           device)


def listening_rows(num_rows: int) -> list[PlannedRow]:
    """B sessions' listening rows as the scheduler plans them mid-session: lead token, block, one chunk of audio."""
    mel = torch.randn(num_rows, 128, 40, generator=torch.Generator().manual_seed(0))
    tokens = [T.KEEP_SILENCE] + T.listening_block()
    pads = (2, 2 + T.AUDIO_FRAMES_PER_CHUNK)  # AUDIO_BEGIN sits in column 1, after the lead token
    return [PlannedRow(f"s{i}", i, RowPlan(tokens, START_POSITION, (pads,), (mel[i],))) for i in range(num_rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="real")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 64, 256, 768])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = [f"# Step profile: {args.preset} model on {args.device}", ""]

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)
        (args.out / "profile.md").write_text("\n".join(lines) + "\n")

    model = random_model(args.preset, args.device, "auto")
    device = model.device
    if device.type == "cuda":
        emit(f"- gpu: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; dtype {model.dtype}")

    emit("## Audio tower, ms per call (median)")
    emit("")
    emit("| chunks | transformers forward | AudioEncoder (batched) | ratio |")
    emit("|---|---|---|---|")
    batched = AudioEncoder(model.encoder_tower, pad_to_buckets=False)
    theirs = transformers_tower(model.encoder_tower)
    for n in args.chunks:
        mel = torch.randn(n, 128, 40, device=device)

        def tower_forward(mel=mel, n=n):
            with torch.inference_mode():
                return theirs(
                    input_features=mel.permute(1, 0, 2).reshape(128, -1),
                    feature_lens=torch.full((n,), 40, device=device),
                    aftercnn_lens=torch.full((n,), 20, device=device),
                ).last_hidden_state

        old = timed_ms(tower_forward, device, max(1, args.repeats // 2))
        new = timed_ms(lambda mel=mel: batched.encode(mel), device, args.repeats)
        emit(f"| {n} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")

    max_rows = max(args.rows)
    cache = model.lm.new_cache(max_rows, 4096)
    lm = model.lm
    emit("")
    emit("## LM forward (last_hidden), ms per step (median)")
    emit("")
    emit("| rows x tokens | flex (compiled) | gather | flex plan (block mask) alone |")
    emit("|---|---|---|---|")
    shapes = [(b, LISTEN_ROW_TOKENS) for b in args.rows] + [(min(args.rows), 1)]
    for num_rows, row_tokens in shapes:
        batch = rows_batch(num_rows, row_tokens, device)
        results = {}
        for backend in ("flex", "gather"):
            lm.attention_backend, lm.compile_attention = backend, backend == "flex"
            started = time.perf_counter()
            lm.last_hidden(batch, cache)  # compiles flex for this bucket on first use
            compile_s = time.perf_counter() - started
            results[backend] = timed_ms(lambda: lm.last_hidden(batch, cache), device, args.repeats)
            print(f"  {backend} {num_rows}x{row_tokens}: first call {compile_s:.1f} s", flush=True)
        lm.attention_backend, lm.compile_attention = "flex", True
        plan_ms = timed_ms(lambda: lm._attention_plan(batch, cache), device, args.repeats)
        emit(f"| {num_rows} x {row_tokens} | {results['flex']:.2f} | {results['gather']:.2f} | {plan_ms:.2f} |")

    emit("")
    emit("## A whole step through the engine's runner (encode + forward + choose), ms per step (median)")
    emit("")
    emit("| listening rows with audio | flex (compiled) | gather |")
    emit("|---|---|---|")
    runner = Runner(model, cache, AudioEncoder(model.encoder_tower))
    for num_rows in args.rows:
        rows = listening_rows(num_rows)
        results = {}
        for backend in ("flex", "gather"):
            lm.attention_backend, lm.compile_attention = backend, backend == "flex"
            results[backend] = timed_ms(lambda: runner.run(rows), device, args.repeats)
        emit(f"| {num_rows} | {results['flex']:.2f} | {results['gather']:.2f} |")

    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        num_rows = args.rows[min(1, len(args.rows) - 1)]
        batch = rows_batch(num_rows, LISTEN_ROW_TOKENS, device)
        lm.attention_backend, lm.compile_attention = "flex", True
        lm.last_hidden(batch, cache)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            lm.last_hidden(batch, cache)
            torch.cuda.synchronize(device)
        table = prof.key_averages()
        emit("")
        emit(f"## One flex listening step of {num_rows} rows: top operators by device time")
        emit("")
        emit("```")
        emit(table.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        emit("```")
        emit("")
        emit("## The same step: top operators by host time")
        emit("")
        emit("```")
        emit(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        emit("```")


if __name__ == "__main__":
    main()
