"""How much one step runs: a bound on its rows of each kind, and which ready rows go first.

Without a bound a step takes every ready session's row. When many streams have a chunk due at once
(a burst of new sessions, or every chunk that arrived while one long step ran), that step carries
every row, takes far longer than the usual step, and every decision and reply token behind it
waits; the chunks arriving meanwhile make the next step large again. ``StepLimits`` bounds each
kind of row per step (listening blocks, reply tokens, and the long rows: first rows with their
prompt, rollovers), so such a burst is spread over a few steps of bounded length; what does not
fit runs in the next step. Nothing is dropped: every row runs exactly as it would have, only
possibly one step later, so each session's tokens are the same.

Which rows go first (``choose_rows``): each candidate carries a ticket, a number that grows with
every chunk that arrives and every row that runs. A session's ticket is the later of its oldest
queued chunk's arrival and its own last row: the moment it started waiting. Smaller tickets go
first, within each kind, so a row that waits is overtaken by nothing that became ready after it,
and is run within (sessions ahead of it / that kind's bound) steps: nothing starves, and a session
with a backlog goes to the back after each of its rows instead of running ahead of the others.

Pure Python: the scheduler (``scheduler.py``) gathers the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.buckets import max_reply_rows
from audio_interaction_server.model.lm import FLEX_QUERY_ROWS

# Rows longer than a listening block (a session's first row, a context rollover) run in a batch of their own.
# The bound is the in-place attention's query length: a batch whose rows all fit it can take that path, so a
# short batch holding one row longer than it would silently fall back to gather attention for every row.
LONG_ROW_TOKENS = FLEX_QUERY_ROWS

# Listening rows per step by default: a listening bucket of the static step (buckets.listening_sizes), small
# enough that a step stays short against the 0.4 s chunk, large enough that a step's fixed cost is shared.
DEFAULT_LISTENING_ROWS = 256
# Tokens of long rows per step by default: about 70 first rows of a short system prompt.
DEFAULT_LONG_TOKENS = 4096

Row = TypeVar("Row")


@dataclass(frozen=True)
class StepLimits:
    """The most rows of each kind one step runs (``total_rows``: of all kinds together, ``max_batch_rows``)."""

    listening_rows: int
    reply_rows: int
    long_tokens: int
    total_rows: int

    @staticmethod
    def from_config(config: EngineConfig, max_batch_rows: int) -> StepLimits:
        """``engine.step_max_*``, with None derived from the bucket set of ``max_batch_rows`` rows per step."""
        listening = config.step_max_listening_rows or min(DEFAULT_LISTENING_ROWS, max_batch_rows)
        reply = config.step_max_reply_rows or max_reply_rows(max_batch_rows)
        long_tokens = config.step_max_long_tokens or DEFAULT_LONG_TOKENS
        return StepLimits(listening, reply, long_tokens, max_batch_rows)

    @staticmethod
    def unbounded(max_batch_rows: int) -> StepLimits:
        """Every ready row up to ``max_batch_rows``: a step without the policy's bounds (for comparisons)."""
        return StepLimits(max_batch_rows, max_batch_rows, 2**62, max_batch_rows)


@dataclass(frozen=True)
class Candidate(Generic[Row]):
    """A ready row and its kind; ``choose_rows`` takes candidates in ticket order (longest waiting first)."""

    row: Row
    num_tokens: int
    is_decision: bool

    @property
    def is_long(self) -> bool:
        return self.num_tokens > LONG_ROW_TOKENS


def choose_rows(candidates: Iterable[Candidate[Row]], limits: StepLimits) -> tuple[list[Row], list[Row]]:
    """(short rows, long rows) of the step, from ``candidates`` in ticket order, within each kind's bound.

    Long rows stop at the first one that would pass ``long_tokens`` (the oldest one always runs), so a
    long row is never overtaken by shorter ones forever. Reads ``candidates`` lazily and stops once every
    kind is full, so the caller may plan rows as they are asked for.
    """
    short: list[Row] = []
    long: list[Row] = []
    num_listening = num_reply = long_tokens = 0
    is_long_full = False
    for candidate in candidates:
        if len(short) + len(long) >= limits.total_rows:
            break
        if is_long_full and num_listening >= limits.listening_rows and num_reply >= limits.reply_rows:
            break
        if candidate.is_long:
            if is_long_full:
                continue
            if long and long_tokens + candidate.num_tokens > limits.long_tokens:
                is_long_full = True  # head of the line: younger long rows wait behind this one
                continue
            long.append(candidate.row)
            long_tokens += candidate.num_tokens
        elif candidate.is_decision:
            if num_listening < limits.listening_rows:
                short.append(candidate.row)
                num_listening += 1
        elif num_reply < limits.reply_rows:
            short.append(candidate.row)
            num_reply += 1
    return short, long
