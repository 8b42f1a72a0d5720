"""Turning a step's logits into tokens: the constrained decision and reply sampling."""

from __future__ import annotations

import torch

from server import tokens as T
from server.config import SamplingOptions


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
    """One row (V,) -> token id under the session's options."""
    if options.is_greedy:
        return int(logits.argmax())
    scores = logits.float() / options.temperature
    if options.top_k > 0:
        kth = torch.topk(scores, min(options.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= options.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
