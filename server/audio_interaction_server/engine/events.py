"""Token-level events the worker reports per session (the GPU side speaks token ids).

``audio_interaction_server.render.replies`` turns them into the wire events users see.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Union

EndReason = Literal["text_end", "max_tokens", "cancelled", "session_closed"]


@dataclass(frozen=True)
class Decision:
    chunk_index: int  # 0-based index of the consumed 0.4 s chunk in the session's audio
    token_id: int  # KEEP_SILENCE or TEXT_BEGIN


@dataclass(frozen=True)
class TurnBegin:
    turn_index: int
    chunk_index: int  # the chunk whose decision was TEXT_BEGIN
    requested: bool = False  # the reply answers the session's reply request; False: the model chose to reply


@dataclass(frozen=True)
class TurnToken:
    turn_index: int
    token_id: int  # generated reply token (the emotion tag is the first); never TEXT_END


@dataclass(frozen=True)
class TurnEnd:
    turn_index: int
    token_ids: tuple[int, ...]  # emotion first; TEXT_BEGIN / TEXT_END excluded
    end_reason: EndReason


@dataclass(frozen=True)
class ContextRollover:
    """The session's context was rebuilt from position 0 with its most recent history."""

    from_positions: int  # positions in use before
    to_positions: int  # positions in use after (prefix + kept history + the new block)
    kept_chunks: int  # earlier chunks whose audio was re-fed


@dataclass(frozen=True)
class ReplyWaitsForAudio:
    """A requested reply has no chunk to begin at: the session's queue is empty. The session, which may
    still count chunks whose decisions are on their way to it, answers with a chunk of silence."""


@dataclass(frozen=True)
class ReplyRequestDropped:
    """The session's reply request will begin no reply: it came while a reply ran (one at a time), or a cancel
    withdrew it before its reply began. Every request is answered once: by the ``TurnBegin`` that says it was
    requested, or by this."""

    reason: Literal["reply_in_progress", "cancelled"]


@dataclass(frozen=True)
class AudioCleared:
    """The session's queued, not yet decided chunks were dropped at the client's request (``clear_audio``).

    The dropped chunks never get a Decision: the session counts them here so its chunk accounting
    (received = decided + cleared + still queued) stays whole. ``num_kept``: the oldest queued chunks the clear
    left queued (``ClearAudio.keep_before``); the dropped ones came after them.
    """

    num_chunks: int
    num_kept: int = 0


@dataclass(frozen=True)
class SessionStarted:
    slot: int
    prefix_tokens: int


class EndCode(StrEnum):
    """Why a session ended other than by its own client's close (``SessionEnded.error_code``).

    The values are the strings clients see as error codes; ``api/session.py`` maps each to a close code.
    """

    CAPACITY = "capacity"
    """Every session slot was in use when the session tried to open: try again later."""
    DUPLICATE_SESSION = "duplicate_session"
    """A session with this id is already open in the worker (the caller reused an id)."""
    INVALID_OPTIONS = "invalid_options"
    """The session's options cannot run here (a prompt or turn cap that does not fit the context budget)."""
    CONTEXT_FULL = "context_full"
    """The session used its whole context budget (no rollover configured, or none could make room)."""
    SERVER_SHUTDOWN = "server_shutdown"
    """The worker was stopped while the session was open."""
    NUMERICAL_ERROR = "numerical_error"
    """The model produced non-finite values for this session (its own audio or state); others go on."""
    INTERNAL_ERROR = "internal_error"
    """Something in this session's own path raised (the server log says what); others go on."""
    FRONT_UNRESPONSIVE = "front_unresponsive"
    """The server front that holds the session went silent past the engine process's bound (FRONT_TIMEOUT_S):
    the engine ended its sessions; a front that comes back tells its clients so."""
    DETACHED_EVICTED = "detached_evicted"
    """Every slot was taken and this session, waiting for its client to resume it, gave its slot to a new session
    (the one detached longest, over all fronts of the engine): its client starts a new session."""
    RATE_LIMITED = "rate_limited"
    """The session's client address had the engine feed more new system prompts than its budget allows
    (``engine.prefill_tokens_per_s_per_ip``, over every front): refused at its open, before its prompt was fed;
    the message says when to try again."""
    WORKER_FAILED = "worker_failed"
    """The model worker itself died: every session ends with this, and later opens are refused with it."""


# What clients hear when the worker (or the engine process) is lost; the exception and its traceback go to the log.
WORKER_FAILED_MESSAGE = "the model worker failed (the server log says why)"
SHUTDOWN_MESSAGE = "the server is shutting down"


# What a step and a session hold, for the fronts' metrics: here, with the events, and not with the worker, so that
# a front of an engine process (engine/process_client.py) reads them without importing torch.
@dataclass(frozen=True)
class StepStats:
    num_rows: int
    num_decisions: int
    num_reply_tokens: int
    num_tokens_fed: int
    encode_s: float
    forward_s: float
    total_s: float
    prefixes_reused_total: int = 0  # sessions opened since start with their prompt's keys and values copied
    # How the model's steps ran since start: CUDA graph replays, static steps run eagerly, eager batches.
    graph_steps_total: int = 0
    static_eager_steps_total: int = 0
    eager_batches_total: int = 0


GraphsState = Literal["on", "off", "refused", "failed"]


@dataclass(frozen=True)
class StepPath:
    """How the engine steps short rows, fixed at its start-up (``/metrics``, the benchmarks' reports).

    ``graphs``: ``on`` (CUDA graphs replay the static step), ``off`` (not asked for, or no CUDA device), ``refused``
    (captured, but the start-up self-check found replays that disagree with the eager static step), ``failed`` (the
    capture raised; ``capture_error`` says what). Refused or failed, the static step serves eagerly."""

    static: bool  # short rows take the static step (else every batch runs the eager path)
    graphs: GraphsState = "off"
    num_graphs: int = 0  # buckets captured (refused graphs included)
    capture_s: float = 0.0  # warm-ups and captures of every bucket
    pool_bytes: int = 0  # device memory the graphs' shared pool reserved
    capture_error: str | None = None


@dataclass(frozen=True)
class SessionStateSize:
    positions: int  # KV-cache positions in use
    history_tokens: int  # tokens kept for a context rollover
    history_chunks: int  # audio chunks kept for a context rollover
    queued_chunks: int  # audio received but not yet consumed
    num_rollovers: int


@dataclass(frozen=True)
class SessionEnded:
    """Final event of a session: ``error_code`` is None for a normal close (the client asked for it)."""

    error_code: EndCode | None = None
    message: str = ""


EngineEvent = Union[Decision, TurnBegin, TurnToken, TurnEnd, ContextRollover, AudioCleared, ReplyWaitsForAudio,
                    ReplyRequestDropped, SessionStarted, SessionEnded]
