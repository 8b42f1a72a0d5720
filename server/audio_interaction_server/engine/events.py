"""Token-level events the worker reports per session (the GPU side speaks token ids).

``audio_interaction_server.render.replies`` turns them into the wire events users see.
"""

from __future__ import annotations

from dataclasses import dataclass
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
class SessionStarted:
    slot: int
    prefix_tokens: int


@dataclass(frozen=True)
class SessionEnded:
    """Final event of a session: ``error`` is None for a normal close."""

    error_code: str | None = None
    message: str = ""


EngineEvent = Union[Decision, TurnBegin, TurnToken, TurnEnd, ContextRollover, SessionStarted, SessionEnded]
