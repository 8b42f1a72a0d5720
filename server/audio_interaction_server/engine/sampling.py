"""Turning a step's logits into tokens: the constrained decision and reply sampling."""

from __future__ import annotations

import torch

from audio_interaction_server import spec as T
from audio_interaction_server.options import SamplingOptions


# The only two tokens a listening block may continue with, in the column order ``decide`` expects.
DECISION_TOKENS = (T.TEXT_BEGIN, T.KEEP_SILENCE)


def decide(decision_logits: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits of ``DECISION_TOKENS`` -> (B,) token ids: TEXT_BEGIN iff strictly above KEEP_SILENCE.

    The model only ever continues a listening block with one of the two; any
    other argmax would crash the reference, so the choice is constrained.
    """
    speak = decision_logits[:, 0] > decision_logits[:, 1]
    return torch.where(speak, T.TEXT_BEGIN, T.KEEP_SILENCE)


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> int:
    """One row (V,) of finite logits -> token id under the session's options.

    Never NaN, whatever the options: the best token's score is 0 before the temperature
    divides (so no inf - inf), and top-p always keeps it. Raises ``FloatingPointError``
    if the logits themselves are not finite.
    """
    if options.is_greedy:
        return int(logits.argmax())
    scores = logits.float()
    scores = (scores - scores.max()) / options.temperature  # in [-inf, 0], the best token exactly 0
    if options.top_k > 0:
        kth = torch.topk(scores, min(options.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p; the first token is kept explicitly, because a
        # top_p that rounds to 0 in float32 would otherwise drop every token.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= options.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1).cpu()
    if not bool(torch.isfinite(probs).all()):
        raise FloatingPointError("non-finite sampling probabilities")
    return int(torch.multinomial(probs, 1, generator=generator))
