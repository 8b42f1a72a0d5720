"""Events the server sends, one pydantic model per event type with a ``type`` discriminator.

The offline CLI prints these same models (one JSON object per line), so a file
run and a live stream can be compared event for event.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

EMOTIONS = Literal["happy", "sad", "angry", "surprise", "normal", "urgent"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(None, description="the session the event belongs to")


class DecisionEvent(_Event):
    """The model's listen/speak decision for one consumed 0.4 s chunk."""

    type: Literal["decision"] = "decision"
    chunk: int = Field(description="0-based chunk index in the session's audio")
    token_id: int
    decision: Literal["keep_silence", "text_begin"]
    audio_time_s: float = Field(description="stream time at the end of the chunk")


class TurnBeginEvent(_Event):
    type: Literal["turn_begin"] = "turn_begin"
    turn: int
    chunk: int = Field(description="the chunk that triggered the reply")
    audio_time_s: float = Field(description="stream time at the end of the triggering chunk")


class EmotionEvent(_Event):
    type: Literal["emotion"] = "emotion"
    turn: int
    emotion: EMOTIONS
    token_id: int


class TextDeltaEvent(_Event):
    type: Literal["text_delta"] = "text_delta"
    turn: int
    text: str = Field(description="new text, always whole UTF-8 characters")


class TurnEndEvent(_Event):
    type: Literal["turn_end"] = "turn_end"
    turn: int
    text: str
    token_ids: list[int] = Field(description="generated ids, emotion first; TEXT_BEGIN/TEXT_END excluded")
    num_tokens: int
    end_reason: Literal["text_end", "max_tokens", "cancelled", "session_closed"]


TurnEvent = Annotated[
    Union[DecisionEvent, TurnBeginEvent, EmotionEvent, TextDeltaEvent, TurnEndEvent],
    Field(discriminator="type"),
]
