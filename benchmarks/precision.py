"""Do reduced-precision (or GPU) decisions agree with fp32 CPU decisions? Teacher-forced, row by row.

    python benchmarks/precision.py [--checkpoint DIR] [--device cuda] [--dtype bfloat16]

Each shared recording (``../shared/audio``, offline features as the reference
computes them) is streamed through one session twice in lockstep: the fp32 CPU
model chooses every token (the trajectory), and the candidate (device, dtype)
is fed exactly the same rows, so one early flip cannot make the rest of the
run diverge. For every decision row it compares TEXT_BEGIN-vs-KEEP_SILENCE; for
every reply row the greedy token. A disagreement is only meaningful when the
fp32 margin is larger than the candidate's numerical noise, so the report gives
the noise (|margin_fp32 - margin_candidate|) next to the margins of the rows
that flipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from server import tokens as T
from server.audio import load_audio_file, load_audio_sequence, offline_chunks
from server.checkpoint import LoadedModel, load_model
from server.conversation import Conversation
from server.encoder import AudioEncoder
from server.lm import StepBatch
from server.sampling import DECISION_TOKENS

SHARED_AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"


class Side:
    """One model (reference or candidate) with its own cache, fed the rows the reference chose."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.encoder = AudioEncoder(model.encoder_tower)
        self.cache = model.lm.new_cache(1, 4096)
        self.decision_ids = torch.tensor(DECISION_TOKENS, device=model.device)

    def row_logits(self, plan) -> torch.Tensor:
        device = self.model.device
        embeds = None
        if plan.audio:
            mel = torch.stack(plan.audio).to(device)
            embeds = self.encoder.encode(mel).flatten(0, 1)
        batch = StepBatch.build([plan.tokens], [plan.start_position], [0], [plan.audio_spans], embeds, device)
        hidden = self.model.lm.last_hidden(batch, self.cache)
        ids = self.decision_ids if plan.is_decision else None
        return self.model.lm.logits(hidden, ids)[0].float().cpu()


def margin(logits: torch.Tensor) -> float:
    """Decision: TEXT_BEGIN minus KEEP_SILENCE. Reply: best minus second best."""
    if logits.numel() == 2:
        return float(logits[0] - logits[1])
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-turn-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.checkpoint is None:
        from server.tools.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    reference = Side(load_model(args.checkpoint, "cpu", "float32"))
    candidate = Side(load_model(args.checkpoint, args.device, args.dtype))
    prefix = T.prompt_prefix(reference.model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    rows = {True: [], False: []}  # is_decision -> [(agree, fp32 margin, noise)]
    for folder in sorted(p for p in SHARED_AUDIO.iterdir() if p.is_dir()):
        for side in (reference, candidate):
            side.cache.clear_slot(0)
        conversation = Conversation(prefix, args.max_turn_tokens, 4096, None)
        for path in load_audio_sequence(folder):
            for chunk in offline_chunks(load_audio_file(path)):
                conversation.add_audio(chunk)
        while conversation.is_ready:
            plan = conversation.plan()
            ref, cand = reference.row_logits(plan), candidate.row_logits(plan)
            if plan.is_decision:
                ref_token = DECISION_TOKENS[0] if ref[0] > ref[1] else DECISION_TOKENS[1]
                cand_token = DECISION_TOKENS[0] if cand[0] > cand[1] else DECISION_TOKENS[1]
            else:
                ref_token, cand_token = int(ref.argmax()), int(cand.argmax())
            noise = abs(margin(ref) - margin(cand)) if plan.is_decision else float((ref - cand).abs().max())
            rows[plan.is_decision].append((ref_token == cand_token, margin(ref), noise))
            conversation.commit(plan, ref_token)

    print(f"# {args.checkpoint.name}: fp32 CPU (reference) vs {candidate.model.dtype} on {candidate.model.device}, "
          "teacher-forced on the fp32 trajectory\n")
    print("| rows | count | agree | agreement | noise p50 | noise p95 | noise max | "
          "smallest fp32 margin among agreeing | margins of flipped rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    for is_decision, label in ((True, "decisions"), (False, "reply tokens")):
        data = rows[is_decision]
        if not data:
            continue
        agree = sum(a for a, _, _ in data)
        noise = sorted(n for _, _, n in data)
        flipped = sorted(abs(m) for a, m, _ in data if not a)
        agreeing = min(abs(m) for a, m, _ in data if a) if agree else float("nan")
        print(f"| {label} | {len(data)} | {agree} | {100 * agree / len(data):.1f}% | "
              f"{statistics.median(noise):.3f} | {noise[int(0.95 * (len(noise) - 1))]:.3f} | {noise[-1]:.3f} | "
              f"{agreeing:.3f} | {', '.join(f'{m:.3f}' for m in flipped[:10]) or '-'}"
              f"{' ...' if len(flipped) > 10 else ''} |")
    decisions = rows[True]
    decisive = [(a, m, n) for a, m, n in decisions if abs(m) > max(n for _, _, n in decisions)]
    if decisive:
        print(f"\nDecisions whose fp32 margin exceeds the largest noise seen: {len(decisive)}, "
              f"agreeing {sum(a for a, _, _ in decisive)}.")
    sys.exit(0)


if __name__ == "__main__":
    main()
