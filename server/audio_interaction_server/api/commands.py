"""What a client asks of its session, whatever protocol it speaks.

A codec (``api/native.py`` for ``/v1/stream``, ``api/realtime/`` for ``/v1/realtime``) turns
frames into these commands and hands them to ``Session.handle``; the session answers with
the wire events of ``audio_interaction_server.protocol``, which the codec encodes (or, for a
second protocol, translates). So one session class and one engine path serve every protocol.

Every command carries the client's ``event_id`` (None when the protocol has none) so an
error can name the event that caused it.

Two answers are not ``/v1/stream`` wire events: ``ItemAcknowledged``, the session's answer to
``AcknowledgeItem``, and ``ReplyRequestWithdrawn``, its answer to a ``CancelReply`` that
``withdraws_request``; only the Realtime codec sends those commands, and words the answers in its own terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

from audio_interaction_server.options import SamplingOptions
from audio_interaction_server.protocol import AudioFormat


class Unset:
    """A field the command leaves as it is (None is a value: it resets the field to the server default)."""

    _instance: Unset | None = None

    def __new__(cls) -> Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET = Unset()


@dataclass(frozen=True)
class Configure:
    """Change session options; fields left UNSET keep their value, None resets to the server default.

    Model options (system prompt, sampling, reply cap, reply mode) can only change before the
    first audio: the engine session opens with them.
    """

    system_prompt: str | None | Unset = UNSET
    sampling: SamplingOptions | None | Unset = UNSET
    max_turn_tokens: int | None | Unset = UNSET
    reply_mode: str | None | Unset = UNSET
    audio: AudioFormat | None | Unset = UNSET
    decision_events: bool | None | Unset = UNSET
    event_id: str | None = None
    event_type: str = "session.configure"  # the wire event that asked, for error events

    def given(self) -> set[str]:
        return {name for name in ("system_prompt", "sampling", "max_turn_tokens", "reply_mode", "audio",
                                  "decision_events") if getattr(self, name) is not UNSET}


@dataclass(frozen=True)
class AcknowledgeItem:
    """Acknowledge a change to the client's conversation that the session does not hold (a Realtime
    ``conversation.item.create`` or ``delete``: the model takes no text input). Nothing in the session
    changes; it answers with ``ItemAcknowledged`` in the command's place in the event order, and the
    command counts against the client's event budget like any text event."""

    event_type: str  # the wire event acknowledged: its answer, or an error, names it
    event_id: str | None = None


class ItemAcknowledged(BaseModel):
    """The session's answer to ``AcknowledgeItem``. It goes out through the connection's outbox like the
    session's other events (numbered, counted in its bounds), so it has their ``session_id`` and ``seq``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["item.acknowledged"] = "item.acknowledged"
    session_id: str | None = None
    seq: int | None = None
    event_type: str
    event_id: str | None = None


class ReplyRequestWithdrawn(BaseModel):
    """The session's answer to a ``CancelReply`` that ``withdraws_request``, once the engine has dropped the
    request before its reply began. Numbered and counted like the session's other events."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["reply_request.withdrawn"] = "reply_request.withdrawn"
    session_id: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class AppendAudio:
    """PCM in the session's current audio format (``Configure.audio``)."""

    data: bytes
    event_id: str | None = None


@dataclass(frozen=True)
class Flush:
    """End of the client's input for now: ``trailing_silence_s`` of silence (None = the server default), then the
    last chunk zero-padded to 0.4 s (audio/stream.py flush); ``input.flushed`` follows once the model has heard it
    all."""

    trailing_silence_s: float | None = None
    event_id: str | None = None
    event_type: str = "input.flush"


@dataclass(frozen=True)
class ClearAudio:
    """Drop the audio the model has not heard yet (queued chunks and the partial chunk). ``keep_committed``: but
    not the audio a Realtime client committed, which a clear leaves alone: that of a flush the session has not
    answered yet (a commit's), or the chunks a reply request waits for (a response.create commits the audio before
    it)."""

    event_id: str | None = None
    event_type: str = "input.clear"
    keep_committed: bool = False


@dataclass(frozen=True)
class RequestReply:
    """Reply at the next chunk, whatever the model would decide (a chunk of silence is added when no
    audio waits); refused while a reply is running. ``max_turn_tokens`` caps that reply below the session's
    cap (None: the session's)."""

    event_id: str | None = None
    event_type: str = "response.create"
    max_turn_tokens: int | None = None


@dataclass(frozen=True)
class CancelReply:
    event_id: str | None = None
    event_type: str = "response.cancel"
    # The client cancels a reply it asked for that has not begun (as far as it knows): when the engine withdraws
    # that request, the session answers ``ReplyRequestWithdrawn``; when the reply had begun, it is cancelled as
    # any reply is (its turn_end, end_reason "cancelled").
    withdraws_request: bool = False


@dataclass(frozen=True)
class CloseSession:
    event_id: str | None = None
    event_type: str = "session.close"


@dataclass(frozen=True)
class Malformed:
    """A frame the codec could not turn into a command: the session answers with an ``error`` event."""

    code: str
    message: str
    event_type: str | None = None
    event_id: str | None = None


Command = Union[Configure, AcknowledgeItem, AppendAudio, Flush, ClearAudio, RequestReply, CancelReply, CloseSession,
                Malformed]
