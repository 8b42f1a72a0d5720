"""Do reduced-precision (or GPU) decisions agree with fp32 CPU decisions? Teacher-forced, row by row.

    python -m benchmarks.precision [--checkpoint DIR] [--device cuda] [--dtype bfloat16] [--audio DIR]

Each shared recording (``../shared/audio``, offline features as the reference
computes them) is streamed through one session twice in lockstep: the fp32 CPU
model chooses every token (the trajectory), and the candidate (device, dtype)
is fed exactly the same rows, so one early flip cannot make the rest of the
run diverge. For every decision row it compares TEXT_BEGIN-vs-KEEP_SILENCE; for
every reply row the greedy token. A disagreement is only meaningful when the
fp32 margin is larger than the candidate's numerical noise, so the report gives
the noise (|margin_fp32 - margin_candidate|) next to the margins of the rows
that flipped.

``teacher_forced`` is the importable core: ``benchmarks.gpu_check`` also uses
it to compare in-place (FlexAttention) against gather attention on one device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.audio.files import load_audio_file, load_audio_sequence
from audio_interaction_server.audio.mel import offline_chunks
from audio_interaction_server.model.checkpoint import MODEL_DTYPES, LoadedModel, load_model
from audio_interaction_server.engine.conversation import Conversation
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.engine.runner import PlannedRow, Runner
from audio_interaction_server.engine.sampling import DECISION_TOKENS

from benchmarks.harness import shared_audio_dir


class Side:
    """One model (reference or candidate) with its own cache, fed the rows the reference chose.

    ``attention`` is set on the model before every row, so two sides may share one
    model object and differ only in how attention reads the cache.
    """

    def __init__(self, model: LoadedModel, attention: str = "gather", compiled: bool = False) -> None:
        self.model = model
        self.attention, self.compiled = attention, compiled
        # The engine's runner feeds the rows (encoder call, batch, forward), exactly as serving does;
        # this side only reads the logits the runner would choose from.
        self.runner = Runner(model, model.lm.new_cache(1, 4096), AudioEncoder(model.encoder_tower))
        self.decision_ids = torch.tensor(DECISION_TOKENS, device=model.device)

    @property
    def label(self) -> str:
        how = f", {self.attention}{' compiled' if self.compiled else ''} attention" if self.attention != "gather" \
            else ""
        return f"{str(self.model.dtype).removeprefix('torch.')} on {self.model.device}{how}"

    def row_logits(self, plan) -> torch.Tensor:
        lm = self.model.lm
        lm.attention_backend, lm.compile_attention = self.attention, self.compiled
        rows = [PlannedRow("teacher-forced", 0, plan)]
        hidden = self.runner.last_hidden(rows, self.runner.encode(rows))
        ids = self.decision_ids if plan.is_decision else None
        return lm.logits(hidden, ids)[0].float().cpu()


def margin(logits: torch.Tensor) -> float:
    """Decision: TEXT_BEGIN minus KEEP_SILENCE. Reply: best minus second best."""
    if logits.numel() == 2:
        return float(logits[0] - logits[1])
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


@dataclass(frozen=True)
class RowComparison:
    agree: bool
    reference_margin: float
    noise: float  # decisions: |margin difference|; reply rows: largest |logit difference|


@dataclass
class Agreement:
    """Every compared row of one teacher-forced run, split into decision rows and reply rows."""

    reference: str
    candidate: str
    decisions: list[RowComparison] = field(default_factory=list)
    replies: list[RowComparison] = field(default_factory=list)
    is_partial: bool = False

    def summary(self, rows: list[RowComparison]) -> dict:
        if not rows:
            return {"count": 0}
        noise = sorted(r.noise for r in rows)
        agreeing = [abs(r.reference_margin) for r in rows if r.agree]
        return {
            "count": len(rows),
            "agree": sum(r.agree for r in rows),
            "agreement": sum(r.agree for r in rows) / len(rows),
            "noise_p50": statistics.median(noise),
            "noise_p95": noise[int(0.95 * (len(noise) - 1))],
            "noise_max": noise[-1],
            "smallest_agreeing_margin": min(agreeing) if agreeing else None,
            "flipped_margins": sorted(abs(r.reference_margin) for r in rows if not r.agree),
        }

    @property
    def decisive(self) -> list[RowComparison]:
        """Decisions whose reference margin exceeds the largest noise seen: these must agree."""
        if not self.decisions:
            return []
        worst = max(r.noise for r in self.decisions)
        return [r for r in self.decisions if abs(r.reference_margin) > worst]

    def as_dict(self) -> dict:
        decisive = self.decisive
        return {"reference": self.reference, "candidate": self.candidate,
                "decisions": self.summary(self.decisions), "reply_tokens": self.summary(self.replies),
                "decisive_decisions": len(decisive), "decisive_agreeing": sum(r.agree for r in decisive),
                "is_partial": self.is_partial}

    def markdown(self) -> list[str]:
        lines = ["| rows | count | agree | agreement | noise p50 | noise p95 | noise max | "
                 "smallest fp32 margin among agreeing | margins of flipped rows |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for rows, label in ((self.decisions, "decisions"), (self.replies, "reply tokens")):
            if not rows:
                continue
            s = self.summary(rows)
            flipped = s["flipped_margins"]
            agreeing = s["smallest_agreeing_margin"]
            lines.append(
                f"| {label} | {s['count']} | {s['agree']} | {100 * s['agreement']:.1f}% | {s['noise_p50']:.3f} | "
                f"{s['noise_p95']:.3f} | {s['noise_max']:.3f} | "
                f"{'nan' if agreeing is None else f'{agreeing:.3f}'} | "
                f"{', '.join(f'{m:.3f}' for m in flipped[:10]) or '-'}{' ...' if len(flipped) > 10 else ''} |")
        decisive = self.decisive
        if decisive:
            lines += ["", f"Decisions whose reference margin exceeds the largest noise seen: {len(decisive)}, "
                          f"agreeing {sum(r.agree for r in decisive)}."]
        return lines


def teacher_forced(reference: Side, candidate: Side, audio_dir: Path | None = None, max_turn_tokens: int = 16,
                   max_rows_per_recording: int | None = None, deadline: float | None = None) -> Agreement:
    """Stream every recording folder of ``audio_dir`` (the shared ones by default) through both sides on the
    reference's trajectory.

    ``max_rows_per_recording`` and ``deadline`` (a ``time.perf_counter`` value) bound the run;
    ``Agreement.is_partial`` says when the deadline cut it short.
    """
    result = Agreement(reference.label, candidate.label)
    prefix = T.prompt_prefix(reference.model.tokenizer.encode(T.SYSTEM_PROMPT).ids)
    for folder in sorted(p for p in Path(audio_dir or shared_audio_dir()).iterdir() if p.is_dir()):
        for side in (reference, candidate):
            side.runner.clear_slot(0)
        conversation = Conversation(prefix, max_turn_tokens, 4096, None)
        for path in load_audio_sequence(folder):
            for chunk in offline_chunks(load_audio_file(path)):
                conversation.add_audio(chunk)
        num_rows = 0
        while conversation.is_ready and (max_rows_per_recording is None or num_rows < max_rows_per_recording):
            if deadline is not None and time.perf_counter() > deadline:
                result.is_partial = True
                return result
            plan = conversation.plan()
            ref, cand = reference.row_logits(plan), candidate.row_logits(plan)
            if plan.is_decision:
                ref_token = DECISION_TOKENS[0] if ref[0] > ref[1] else DECISION_TOKENS[1]
                cand_token = DECISION_TOKENS[0] if cand[0] > cand[1] else DECISION_TOKENS[1]
                noise = abs(margin(ref) - margin(cand))
                result.decisions.append(RowComparison(ref_token == cand_token, margin(ref), noise))
            else:
                ref_token, cand_token = int(ref.argmax()), int(cand.argmax())
                noise = float((ref - cand).abs().max())
                if not plan.discards_prediction:  # a capped reply's last row: TEXT_END follows whatever it predicts
                    result.replies.append(RowComparison(ref_token == cand_token, margin(ref), noise))
            conversation.commit(plan, ref_token)
            num_rows += 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="bfloat16")
    parser.add_argument("--max-turn-tokens", type=int, default=16)
    parser.add_argument("--audio", type=Path, default=shared_audio_dir(), help="folder of recording folders")
    args = parser.parse_args()
    if args.checkpoint is None:
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        args.checkpoint = ensure_demo_checkpoint()
    reference = Side(load_model(args.checkpoint, "cpu", "float32"))
    candidate = Side(load_model(args.checkpoint, args.device, args.dtype))
    result = teacher_forced(reference, candidate, args.audio, args.max_turn_tokens)
    print(f"# {args.checkpoint.name}: fp32 CPU (reference) vs {candidate.model.dtype} on {candidate.model.device}, "
          "teacher-forced on the fp32 trajectory\n")
    print("\n".join(result.markdown()))
    sys.exit(0)


if __name__ == "__main__":
    main()
