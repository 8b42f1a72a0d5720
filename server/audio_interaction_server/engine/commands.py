"""What other threads ask of the worker: one frozen dataclass per request, applied between steps.

The public ``Worker`` methods (``open_session``, ``push_audio``, ...) build these and post them to
the worker's inbox; the worker thread dispatches them with ``match``. Frozen, because a command
crosses threads: nobody may change it after posting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Union

from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.events import EndCode, EngineEvent

EmitFn = Callable[[list[EngineEvent]], None]


@dataclass(frozen=True)
class OpenSession:
    """Open a session: it gets a slot and ``SessionStarted``, or a ``SessionEnded`` saying why not."""

    session_id: str
    options: SessionOptions
    emit: EmitFn  # called on the worker thread with each batch of the session's events
    # Whose prompt prefill it is (engine/prefill_budget.py): the client's address; None = nobody's (not budgeted).
    client_address: str | None = None
    action: ClassVar[str] = "open"


@dataclass(frozen=True)
class PushAudio:
    """Queue chunks for the session, consumed in order, one decision each.

    Either features (a torch.Tensor (N, 128, 40), or a sequence of (128, 40) chunks), or a live stream's
    ``PaddedBlocks``, whose features the worker computes, batched with every other push it applies at once.
    """

    session_id: str
    mel_chunks: Any  # torch.Tensor (N, 128, 40) | sequence of (128, 40) | audio.blocks.PaddedBlocks (N, 6640)
    action: ClassVar[str] = "audio"


@dataclass(frozen=True)
class CancelReply:
    """End the session's running reply now (``TurnEnd`` with ``cancelled``); nothing when it is listening."""

    session_id: str
    action: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class RequestReply:
    """The next chunk decided for the session starts a reply, whatever the model's logits say.

    Dropped while a reply runs (``ReplyRequestDropped`` says so); one request is consumed by one reply.
    ``max_turn_tokens`` caps that reply below the session's cap (None: the session's; a larger one changes nothing:
    the context budget is sized for that).
    """

    session_id: str
    max_turn_tokens: int | None = None
    action: ClassVar[str] = "reply request"


@dataclass(frozen=True)
class ClearAudio:
    """Drop the session's queued, not yet decided chunks; answered with ``AudioCleared(num_chunks, num_kept)``.

    ``keep_before``: chunks the session pushed before its ``keep_before``-th (counting every chunk it ever pushed,
    dropped ones too) stay queued: a Realtime commit's audio, which a clear does not take back. 0: none stay."""

    session_id: str
    keep_before: int = 0
    action: ClassVar[str] = "clear"


@dataclass(frozen=True)
class CloseSession:
    """Close the session: at the client's request (no ``error_code``), or for a reason of the host's, said in its
    ``SessionEnded`` (the engine process ends the sessions of a front gone silent). A running reply ends with
    ``session_closed``."""

    session_id: str
    error_code: EndCode | None = None
    message: str = "closed by the client"
    action: ClassVar[str] = "close"


@dataclass(frozen=True)
class Wake:
    """Wakes a worker blocked on its empty inbox (``stop``); carries no request."""

    action: ClassVar[str] = "wake"


SessionCommand = Union[PushAudio, CancelReply, RequestReply, ClearAudio, CloseSession]
Command = Union[OpenSession, SessionCommand, Wake]
