"""Events the server sends, one pydantic model per event type with a ``type`` discriminator.

The offline CLI prints these same models (one JSON object per line), so a file
run and a live stream can be compared event for event.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from audio_interaction_server.options import ReplyMode, SamplingOptions  # a leaf: clients import the protocol

EMOTIONS = Literal["happy", "sad", "angry", "surprise", "normal", "urgent"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(None, description="the session the event belongs to")
    seq: int | None = Field(None, description="1, 2, 3, ... per session, on every event a live session sends: a "
                            "resuming client names the last one it saw (docs/protocol.md, resume)")


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
    requested: bool = Field(False, description="the reply answers the session's `response.create`; false: the "
                                               "model chose to reply")


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


class ContextRolloverEvent(_Event):
    """The session's context was rebuilt from the prompt and its most recent history (long sessions)."""

    type: Literal["context_rollover"] = "context_rollover"
    from_positions: int = Field(description="context positions in use before")
    to_positions: int = Field(description="context positions in use after (prompt + kept history + new chunk)")
    kept_chunks: int = Field(description="earlier chunks whose audio stayed in the context")


TurnEvent = Annotated[
    Union[DecisionEvent, TurnBeginEvent, EmotionEvent, TextDeltaEvent, TurnEndEvent, ContextRolloverEvent],
    Field(discriminator="type"),
]


# ---- The WebSocket protocol (docs/protocol.md) --------------------------------------
# Everything below is what ``/v1/stream`` speaks: binary frames carry PCM audio, text
# frames carry one JSON event each. Client events are parsed once through
# ``CLIENT_EVENT_ADAPTER``; every server event carries ``server_time_ms``.

PROTOCOL_VERSION = "1"
# The Realtime API (docs/realtime.md) shows a session id as sess_<id>; the subscriber endpoint takes either form.
REALTIME_SESSION_ID_PREFIX = "sess_"

SampleFormatName = Literal["pcm_s16le", "pcm_f32le"]


class AudioFormat(BaseModel):
    """The layout of the client's binary frames: interleaved little-endian PCM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_format: SampleFormatName = "pcm_s16le"
    sample_rate_hz: int = Field(16_000, ge=1_000, le=384_000, description="resampled to 16 kHz by the server")
    num_channels: int = Field(1, ge=1, le=8, description="channels are averaged to mono")


class SessionSettings(BaseModel):
    """The session's effective options, as reported in ``session.created``/``session.updated``."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = Field(None, description="absent = the model's trained system prompt")
    max_turn_tokens: int
    sampling: SamplingOptions
    decision_events: bool = Field(description="whether a `decision` event is sent for every 0.4 s chunk")
    reply_mode: ReplyMode = Field("model", description="model = the model decides when to reply; on_request = "
                                  "it replies only after `response.create`")


class SessionLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_frame_bytes: int = Field(description="larger frames are refused with an `error` event")
    max_buffered_audio_s: float = Field(description="audio accepted but not yet heard by the model")
    idle_timeout_s: float = Field(description="the session closes after this long without a client frame")
    max_session_s: float = Field(description="the session closes after this long")
    chunk_s: float = Field(description="the model hears audio in chunks of this length")


class CloseCode(IntEnum):
    """WebSocket close codes of ``/v1/stream`` and the subscriber endpoint (docs/protocol.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown
    POLICY = 1008  # authentication or origin refused, options the engine cannot run
    INTERNAL = 1011  # the model failed
    SERVICE_RESTART = 1012  # the replica drains (an update, a scale-down): reconnect, another replica answers
    TRY_AGAIN = 1013  # at capacity or not loaded yet
    RESUME_FAILED = 4009  # the session to resume is gone (expired, unknown, restarted server) or the token is wrong
    RESUMED_ELSEWHERE = 4010  # another connection resumed this session
    IDLE = 4000
    SESSION_LIMIT = 4001  # max_session_s or the model's context budget
    NOT_FOUND = 4004  # subscriber: no such session
    TOO_SLOW = 4008  # the client does not read its events


# ---- client -> server ---------------------------------------------------------------------


MAX_EVENT_ID_CHARS = 64
# An event id as a client event may carry one: a refused event's is echoed only if it is one.
_EVENT_ID_ADAPTER: TypeAdapter[str] = TypeAdapter(Annotated[str, Field(max_length=MAX_EVENT_ID_CHARS)])


class _ClientEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: str | None = Field(None, max_length=MAX_EVENT_ID_CHARS, description="echoed by an `error` this event "
                                 "causes")


class SessionConfigureEvent(_ClientEvent):
    """Set session options; fields left out keep their value, an explicit null resets to the default.

    ``audio`` and ``decision_events`` may change at any time; the model options
    (``system_prompt``, ``sampling``, ``max_turn_tokens``) only before the first audio frame.
    """

    type: Literal["session.configure"]
    audio: AudioFormat | None = None
    system_prompt: str | None = Field(None, max_length=8_000)
    sampling: SamplingOptions | None = None
    max_turn_tokens: int | None = Field(None, ge=1, le=4096)
    reply_mode: ReplyMode | None = None
    decision_events: bool | None = None


class InputFlushEvent(_ClientEvent):
    """End of input: add trailing silence, then pad the last chunk to 0.4 s, so the model can answer."""

    type: Literal["input.flush"]
    trailing_silence_s: float | None = Field(None, ge=0.0, le=10.0, description="absent = server default")


class ResponseCancelEvent(_ClientEvent):
    """Stop the reply in progress (a no-op while the model listens)."""

    type: Literal["response.cancel"]


class InputClearEvent(_ClientEvent):
    """Drop the audio the model has not heard yet; `input.cleared` says how much."""

    type: Literal["input.clear"]


class ResponseCreateEvent(_ClientEvent):
    """Reply at the next chunk, whatever the model would decide (a chunk of silence is added when no audio
    waits); refused (`reply_in_progress`) while a reply is running. With `reply_mode: "on_request"` it is the only
    way to a reply."""

    type: Literal["response.create"]


class SessionCloseEvent(_ClientEvent):
    """End the session now; audio not yet heard is reported in `session.closed`."""

    type: Literal["session.close"]


ClientEvent = Annotated[
    Union[SessionConfigureEvent, InputFlushEvent, InputClearEvent, ResponseCreateEvent, ResponseCancelEvent,
          SessionCloseEvent],
    Field(discriminator="type"),
]
CLIENT_EVENT_ADAPTER: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)


class ClientEventError(ValueError):
    """A text frame that is not a valid client event; ``code`` is the `error` event's code, ``event_id`` the one
    the frame gave (echoed by the error) where it is one an event may carry."""

    def __init__(self, code: str, message: str, event_type: str | None = None, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.event_type, self.event_id = code, message, event_type, event_id


MAX_SHOWN_CHARS = 64  # of a client's value quoted in an error: an error never echoes a frame back


def cut_short(text: str) -> str:
    """``text``, or its first ``MAX_SHOWN_CHARS`` characters ending in "...": a client's value as an error quotes it."""
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS - 3]}..."


def shown(value: object) -> str:
    """``value`` as an error message quotes it: its repr, cut short."""
    return cut_short(repr(value))


def parse_client_event(text: str | bytes) -> ClientEvent:
    """Parse one text frame through the discriminated union; raises ``ClientEventError``.

    A key given twice in one object is refused: JSON parsers disagree on which value wins
    (ours would silently take the last), so such an event has no one meaning to act on.
    """
    try:
        event = CLIENT_EVENT_ADAPTER.validate_json(text, strict=True)  # "7" or true is no number (the schema)
    except ValidationError as error:
        first = error.errors()[0]
        context = first.get("ctx", {})
        if first["type"] == "json_invalid":
            raise ClientEventError("invalid_json", f"text frames must hold one JSON object: {first['msg']}") from None
        if first["type"] == "union_tag_invalid" and not _type_is_a_string(text):
            # pydantic names a tag of any JSON type by its str() ("None", "5"): that is no event name.
            raise ClientEventError("invalid_event", "type must be a string naming a client event", None,
                                   _echoable_event_id(text)) from None
        if first["type"] == "union_tag_not_found":  # pydantic: "Unable to extract tag using discriminator 'type'"
            raise ClientEventError("invalid_event", "every event needs a \"type\" naming a client event (for "
                                   "example \"session.configure\" or \"input.flush\")", None,
                                   _echoable_event_id(text)) from None
        if first["type"] == "union_tag_invalid":
            tag = context.get("tag")
            raise ClientEventError("unknown_event", f"unknown event type {shown(tag)}; expected one of "
                                   f"{context.get('expected_tags')}", cut_short(str(tag)),
                                   _echoable_event_id(text)) from None
        has_type = first["loc"] and first["type"] != "union_tag_not_found"
        raise ClientEventError("invalid_event", summarize(error), str(first["loc"][0]) if has_type else None,
                               _echoable_event_id(text)) from None
    duplicate = _first_duplicate_key(text)
    if duplicate is not None:
        raise ClientEventError("invalid_event", f"duplicate key {shown(duplicate)}: each key may appear once per "
                               "object; event ignored", event.type, event.event_id)
    return event


def _type_is_a_string(text: str | bytes) -> bool:
    """Whether the ``type`` of a frame refused as an event (valid JSON, an object) is a string."""
    data = json.loads(text)
    return isinstance(data, dict) and isinstance(data.get("type"), str)


def _echoable_event_id(text: str | bytes) -> str | None:
    """The ``event_id`` of a frame refused as an event (valid JSON), if it is one a valid event could carry."""
    data = json.loads(text)
    event_id = data.get("event_id") if isinstance(data, dict) else None
    try:
        return _EVENT_ID_ADAPTER.validate_python(event_id, strict=True)
    except ValidationError:
        return None


def _first_duplicate_key(text: str | bytes) -> str | None:
    """The first key that appears twice in one object of ``text`` (valid JSON), or None."""
    found: list[str] = []

    def check(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys) and not found:
            found.append(next(key for index, key in enumerate(keys) if key in keys[:index]))
        return dict(pairs)

    json.loads(text, object_pairs_hook=check)
    return found[0] if found else None


def summarize(error: ValidationError, max_errors: int = 5) -> str:
    """A validation error in one line: ``where: what; ...``."""
    return "; ".join(f"{'.'.join(cut_short(str(p)) for p in item['loc']) or 'event'}: {item['msg']}"
                     for item in error.errors()[:max_errors])


# ---- server -> client ---------------------------------------------------------------------


class _Stamped(BaseModel):
    server_time_ms: int = Field(description="server wall clock (ms since the Unix epoch) at the event")


class SessionCreatedEvent(_Event, _Stamped):
    type: Literal["session.created"] = "session.created"
    protocol_version: str = PROTOCOL_VERSION
    model: str = Field(description="name of the loaded model")
    is_demo: bool = Field(description="true for the tiny random demo model: its replies are noise")
    audio: AudioFormat
    options: SessionSettings
    limits: SessionLimits
    resume_token: str | None = Field(None, description="secret that resumes this session after a dropped "
                                     "connection (absent when the server keeps no detached sessions)")
    resume_grace_s: float | None = Field(None, description="how long a dropped session waits to be resumed")


class SessionUpdatedEvent(_Event, _Stamped):
    """The answer to `session.configure`: the session's options now."""

    type: Literal["session.updated"] = "session.updated"
    audio: AudioFormat
    options: SessionSettings


class ErrorEvent(_Event, _Stamped):
    type: Literal["error"] = "error"
    code: str = Field(description="machine-readable reason, see docs/protocol.md")
    message: str
    is_fatal: bool = Field(False, description="true when the session closes because of it")
    event_type: str | None = Field(None, description="type of the client event that caused it")
    event_id: str | None = Field(None, description="event_id of the client event that caused it")


class SessionClosedEvent(_Event, _Stamped):
    """Always the last event of a session."""

    type: Literal["session.closed"] = "session.closed"
    reason: str
    num_chunks_received: int = Field(description="0.4 s chunks of audio accepted from the client")
    num_chunks_decided: int = Field(description="chunks the model heard; the rest were cut by the close")
    audio_received_s: float = Field(description="seconds of audio accepted, at the client's rate")


class SegmentEvent(_Event, _Stamped):
    """A sentence-sized piece of a reply's text, for text-to-speech."""

    type: Literal["segment"] = "segment"
    turn: int
    index: int = Field(description="0-based segment index within the turn")
    text: str


class InputFlushedEvent(_Event, _Stamped):
    """Everything before an `input.flush` was heard, and any reply it started has ended."""

    type: Literal["input.flushed"] = "input.flushed"
    num_chunks: int = Field(description="chunks heard so far in the session")
    audio_time_s: float = Field(description="stream time the model has heard up to")


class InputClearedEvent(_Event, _Stamped):
    """The answer to `input.clear`: audio accepted but not yet heard was dropped."""

    type: Literal["input.cleared"] = "input.cleared"
    num_chunks_dropped: int = Field(description="whole 0.4 s chunks dropped before the model heard them")
    audio_dropped_s: float = Field(description="stream time dropped, the partial chunk included")


class SessionGoingAwayEvent(_Event, _Stamped):
    """The server is draining: the reply in progress finishes, then the session closes with 1012 at its next
    listening point, at the latest after ``deadline_s``. Reconnect then; another replica will answer."""

    type: Literal["session.going_away"] = "session.going_away"
    deadline_s: float = Field(description="seconds from this event until the session is closed at the latest")
    reason: str = "server_draining"


class SessionResumedEvent(_Event, _Stamped):
    """The first event on a resumed connection; the events the client missed follow, then the live stream."""

    type: Literal["session.resumed"] = "session.resumed"
    last_seq: int = Field(description="the last event the client saw, as it said; replay starts after it")
    num_replayed: int = Field(description="events that follow this one from before the resume")
    audio_received_s: float = Field(description="seconds of audio accepted (at the client's rate): send the "
                                    "audio from this point on")
    num_chunks_decided: int = Field(description="chunks the model has heard so far")


class LiveDecisionEvent(DecisionEvent, _Stamped):
    pass


class LiveTurnBeginEvent(TurnBeginEvent, _Stamped):
    onset_latency_ms: float | None = Field(
        None, description="from receiving the audio that completed the triggering chunk to this event"
    )


class LiveEmotionEvent(EmotionEvent, _Stamped):
    pass


class LiveTextDeltaEvent(TextDeltaEvent, _Stamped):
    pass


class LiveTurnEndEvent(TurnEndEvent, _Stamped):
    pass


class LiveContextRolloverEvent(ContextRolloverEvent, _Stamped):
    pass


ServerEvent = Annotated[
    Union[
        SessionCreatedEvent, SessionUpdatedEvent, ErrorEvent, SessionClosedEvent, SegmentEvent, InputFlushedEvent,
        InputClearedEvent, SessionGoingAwayEvent, SessionResumedEvent,
        LiveDecisionEvent, LiveTurnBeginEvent, LiveEmotionEvent, LiveTextDeltaEvent, LiveTurnEndEvent,
        LiveContextRolloverEvent,
    ],
    Field(discriminator="type"),
]
SERVER_EVENT_ADAPTER: TypeAdapter[ServerEvent] = TypeAdapter(ServerEvent)

# Renderer events (audio_interaction_server.render.replies) -> their stamped wire form.
LIVE_FORMS: dict[type, type] = {
    DecisionEvent: LiveDecisionEvent,
    TurnBeginEvent: LiveTurnBeginEvent,
    EmotionEvent: LiveEmotionEvent,
    TextDeltaEvent: LiveTextDeltaEvent,
    TurnEndEvent: LiveTurnEndEvent,
    ContextRolloverEvent: LiveContextRolloverEvent,
}


def json_schema() -> dict:
    """One JSON Schema (draft 2020-12) document for both directions of ``/v1/stream``.

    Both unions' definitions share one root ``$defs`` because pydantic's ``$ref``s are
    root-relative; ``#/$defs/ClientEvent`` and ``#/$defs/ServerEvent`` are the entry points.
    """
    definitions: dict = {}
    for name, adapter in (("ClientEvent", CLIENT_EVENT_ADAPTER), ("ServerEvent", SERVER_EVENT_ADAPTER)):
        schema = adapter.json_schema()
        definitions.update(schema.pop("$defs", {}))
        definitions[name] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Audio-Interaction streaming protocol v{PROTOCOL_VERSION}",
        "anyOf": [{"$ref": "#/$defs/ClientEvent"}, {"$ref": "#/$defs/ServerEvent"}],
        "$defs": definitions,
    }


def event_schema(direction: Literal["client", "server"]) -> dict:
    """A standalone schema that accepts exactly one direction's events."""
    root = json_schema()
    entry = "ClientEvent" if direction == "client" else "ServerEvent"
    return {"$schema": root["$schema"], "$ref": f"#/$defs/{entry}", "$defs": root["$defs"]}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m audio_interaction_server.protocol",
                                     description="wire protocol tools")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of every event")
    args = parser.parse_args(argv)
    if not args.schema:
        parser.error("nothing to do: pass --schema")
    print(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
