"""The ``/v1/stream`` codec: our own protocol's frames <-> session commands and events.

Binary frames are PCM in the session's audio format; text frames are one JSON client event
each (protocol.py); every session event goes out as one JSON text frame. The session never
sees JSON: a second protocol (``api/realtime/``) feeds it the same commands.
"""

from __future__ import annotations

from audio_interaction_server.api.commands import (
    AppendAudio, CancelReply, ClearAudio, CloseSession, Command, Configure, Flush, Malformed, RequestReply,
)
from audio_interaction_server.protocol import (
    ClientEventError, InputClearEvent, InputFlushEvent, ResponseCancelEvent, ResponseCreateEvent, SessionCloseEvent,
    SessionConfigureEvent, parse_client_event,
)

_CONFIGURABLE = ("system_prompt", "sampling", "max_turn_tokens", "reply_mode", "audio", "decision_events")


class NativeCodec:
    held_bytes = 0  # nothing is kept between a frame and the events that answer it

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes

    def decode(self, message: str | bytes) -> list[Command]:
        """One WebSocket message (text: ``str``, binary: ``bytes``) -> the commands it carries."""
        if isinstance(message, bytes):
            if len(message) > self.max_frame_bytes:
                return [Malformed("frame_too_large",
                                  f"audio frame of {len(message)} bytes is over {self.max_frame_bytes}; ignored")]
            return [AppendAudio(message)]
        if len(message.encode()) > self.max_frame_bytes:
            return [Malformed("frame_too_large", f"text frame over {self.max_frame_bytes} bytes; ignored")]
        try:
            event = parse_client_event(message)
        except ClientEventError as error:
            return [Malformed(error.code, error.message, event_type=error.event_type, event_id=error.event_id)]
        return [command_of(event)]

    @staticmethod
    def encode(event) -> list[str]:
        return [event.model_dump_json(exclude_none=True)]


def command_of(event) -> Command:
    """A parsed ``/v1/stream`` client event as the session command it asks for."""
    event_id = event.event_id
    match event:
        case SessionConfigureEvent():
            # Fields the client left out stay as they are; an explicit null resets one to the default.
            given = {name: getattr(event, name) for name in _CONFIGURABLE if name in event.model_fields_set}
            return Configure(**given, event_id=event_id)
        case InputFlushEvent():
            return Flush(event.trailing_silence_s, event_id=event_id)
        case InputClearEvent():
            return ClearAudio(event_id=event_id)
        case ResponseCreateEvent():
            return RequestReply(event_id=event_id)
        case ResponseCancelEvent():
            return CancelReply(event_id=event_id)
        case SessionCloseEvent():
            return CloseSession(event_id=event_id)
    raise TypeError(f"no command for {event!r}")
