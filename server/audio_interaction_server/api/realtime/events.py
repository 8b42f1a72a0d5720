"""The OpenAI Realtime (GA) events ``/v1/realtime`` speaks, one pydantic model per event type.

Only the subset this server sends or accepts is modelled (docs/realtime.md). Field names and
shapes follow the ``openai`` SDK's own types (``openai.types.realtime``); tests/test_realtime_events.py
validates every server event we can produce against them.

Client events are parsed leniently where the Realtime API is broad: fields this server does not
act on (voice, tools choice, tracing, noise reduction, ...) are accepted and ignored, since
clients send them by default and refusing them would refuse every client. What the server
cannot honour when asked (audio output, transcription sessions, tools) is refused in the codec
with an ``invalid_value`` error that names the field. What it does read is read strictly, as
``/v1/stream`` reads its events (``parse_client_event``): a key given twice is refused, types are
not coerced ("100" and true are no numbers), ids and metadata have the Realtime API's bounds.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

import pydantic_core
from pydantic import (
    BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, PrivateAttr, StringConstraints, TypeAdapter,
    model_validator,
)

# ---- shared pieces ------------------------------------------------------------------------


class _Wire(BaseModel):
    """A server-side model: every declared field is sent (a null is meaningful, e.g. turn_detection)."""

    model_config = ConfigDict(extra="forbid")


class AudioPcm(_Wire):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: int = Field(24_000, description="24000 in the Realtime API; other rates are this server's extension")


class AudioPcmu(_Wire):
    type: Literal["audio/pcmu"] = "audio/pcmu"


class AudioPcma(_Wire):
    type: Literal["audio/pcma"] = "audio/pcma"


AudioFormatObject = Annotated[Union[AudioPcm, AudioPcmu, AudioPcma], Field(discriminator="type")]


class TurnDetectionObject(_Wire):
    """The effective turn detection: either type means the model itself decides when to reply."""

    type: Literal["server_vad", "semantic_vad"] = "semantic_vad"
    create_response: bool = True


class AudioInputObject(_Wire):
    format: AudioFormatObject = AudioPcm()
    turn_detection: TurnDetectionObject | None = TurnDetectionObject()
    transcription: None = None  # the model does not transcribe
    noise_reduction: None = None


class AudioObject(_Wire):
    input: AudioInputObject = AudioInputObject()


class SessionObject(_Wire):
    id: str
    object: Literal["realtime.session"] = "realtime.session"
    type: Literal["realtime"] = "realtime"
    model: str
    instructions: str | None = Field(None, description="null = the model's trained system prompt")
    output_modalities: list[Literal["text"]] = ["text"]
    max_output_tokens: int | Literal["inf"]
    audio: AudioObject = AudioObject()


def default_session_object(model_name: str | None, max_turn_tokens: int, session_id: str = "sess_unbound") -> \
        SessionObject:
    """The session a connection starts with (also what a minted client secret reports)."""
    return SessionObject(id=session_id, model=model_name or "audio-interaction", max_output_tokens=max_turn_tokens)


# ---- conversation items -------------------------------------------------------------------


class InputAudioContent(_Wire):
    type: Literal["input_audio"] = "input_audio"
    # The model does not transcribe what it hears: only a client's own item carries one (its audio is not echoed).
    transcript: str | None = None


class TextContent(_Wire):
    type: Literal["input_text", "output_text"]
    text: str


class ImageContent(_Wire):
    type: Literal["input_image"] = "input_image"  # acknowledged, never echoed back (it can be megabytes)


class MessageItem(_Wire):
    id: str
    object: Literal["realtime.item"] = "realtime.item"
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"]
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    content: list[Union[InputAudioContent, TextContent, ImageContent]]


class FunctionCallOutputItem(_Wire):
    id: str
    object: Literal["realtime.item"] = "realtime.item"
    type: Literal["function_call_output"] = "function_call_output"
    status: Literal["completed"] = "completed"
    call_id: str
    output: str


Item = Union[MessageItem, FunctionCallOutputItem]


# ---- responses ----------------------------------------------------------------------------


class StatusDetails(_Wire):
    type: Literal["completed", "cancelled", "incomplete", "failed"]
    reason: Literal["client_cancelled", "max_output_tokens"] | None = None


class OutputTokenDetails(_Wire):
    text_tokens: int
    audio_tokens: int = 0


class Usage(_Wire):
    """Counts of the model's own tokens; input tokens are not counted (the model hears audio chunks), so they are 0
    and the total is the output (LiveKit's metrics read ``total_tokens``)."""

    total_tokens: int
    input_tokens: int = 0
    output_tokens: int
    output_token_details: OutputTokenDetails


class ResponseObject(_Wire):
    id: str
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
    status_details: StatusDetails | None = None
    output: list[MessageItem] = []
    output_modalities: list[Literal["text"]] = ["text"]
    max_output_tokens: int | Literal["inf"]
    metadata: dict[str, str] | None = None
    usage: Usage | None = None


class TextPart(_Wire):
    type: Literal["text"] = "text"
    text: str


# ---- server -> client ---------------------------------------------------------------------


class _ServerEvent(_Wire):
    event_id: str


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionObject


class SessionUpdated(_ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionObject


class ErrorDetail(_Wire):
    type: Literal["invalid_request_error", "server_error"]
    code: str | None
    message: str
    param: str | None = None
    event_id: str | None = Field(None, description="the client event that caused it")


class Error(_ServerEvent):
    type: Literal["error"] = "error"
    error: ErrorDetail


class InputAudioBufferCommitted(_ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    previous_item_id: str | None
    item_id: str


class InputAudioBufferCleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ConversationItemAdded(_ServerEvent):
    type: Literal["conversation.item.added"] = "conversation.item.added"
    previous_item_id: str | None
    item: Item


class ConversationItemDone(_ServerEvent):
    type: Literal["conversation.item.done"] = "conversation.item.done"
    previous_item_id: str | None
    item: Item


class ConversationItemDeleted(_ServerEvent):
    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class ConversationItemRetrieved(_ServerEvent):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: Item


class ResponseCreated(_ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: ResponseObject


class ResponseDone(_ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: ResponseObject


class ResponseOutputItemAdded(_ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int
    item: MessageItem


class ResponseOutputItemDone(_ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int
    item: MessageItem


class _PartEvent(_ServerEvent):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


class ResponseContentPartAdded(_PartEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: TextPart


class ResponseContentPartDone(_PartEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: TextPart


class ResponseOutputTextDelta(_PartEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class ResponseOutputTextDone(_PartEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


ServerEvent = Annotated[
    Union[SessionCreated, SessionUpdated, Error, InputAudioBufferCommitted, InputAudioBufferCleared,
          ConversationItemAdded, ConversationItemDone, ConversationItemDeleted, ConversationItemRetrieved,
          ResponseCreated, ResponseDone,
          ResponseOutputItemAdded, ResponseOutputItemDone, ResponseContentPartAdded, ResponseContentPartDone,
          ResponseOutputTextDelta, ResponseOutputTextDone],
    Field(discriminator="type"),
]
SERVER_EVENT_ADAPTER: TypeAdapter[ServerEvent] = TypeAdapter(ServerEvent)


# ---- client -> server ---------------------------------------------------------------------


class _Lenient(BaseModel):
    # Clients send more than this server acts on (see the module docstring): extra fields are ignored.
    # What is read is not coerced: "100" is not a number, nor is true.
    model_config = ConfigDict(extra="ignore", strict=True)


MAX_ID_CHARS = 64  # item, call and response ids: a client's own are echoed back, so they are bounded
ClientId = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
# The Realtime API's metadata: at most 16 pairs, keys up to 64 characters, values up to 512.
MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


MAX_EVENT_ID_CHARS = 128


class _ClientEvent(_Lenient):
    event_id: str | None = Field(None, max_length=MAX_EVENT_ID_CHARS)


class FormatIn(_Lenient):
    type: str = "audio/pcm"
    rate: int | None = None


class TurnDetectionIn(_Lenient):
    type: str = "server_vad"
    create_response: bool | None = None  # False: the app asks for each reply (manual turns here)


class AudioInputIn(_Lenient):
    format: FormatIn | None = None
    turn_detection: TurnDetectionIn | None = None
    transcription: Any = None
    noise_reduction: Any = None


class AudioOutputIn(_Lenient):
    format: Any = None
    voice: Any = None
    speed: Any = None


class AudioIn(_Lenient):
    input: AudioInputIn | None = None
    output: AudioOutputIn | None = None


# The session fields of the Realtime *beta* interface (the SDK's ``client.beta.realtime.connect``) that the GA
# interface moved or dropped, with where GA has them (None: nowhere). Ignored like other unknown fields, they
# silently changed the session a beta client gets (its G.711 read as PCM16, its manual turns and cap dropped).
BETA_SESSION_FIELDS: dict[str, str | None] = {
    "modalities": "session.output_modalities",
    "input_audio_format": "session.audio.input.format",
    "output_audio_format": "session.audio.output.format",
    "input_audio_transcription": "session.audio.input.transcription",
    "input_audio_noise_reduction": "session.audio.input.noise_reduction",
    "turn_detection": "session.audio.input.turn_detection",
    "max_response_output_tokens": "session.max_output_tokens",
    "voice": "session.audio.output.voice",
    "speed": "session.audio.output.speed",
    "temperature": None,
    "client_secret": "POST /v1/realtime/client_secrets",
}


# Bounds on the lists a client sends, far above what one uses (OpenAI's API takes at most 128 tools): an over-long
# list is refused with one error, where validating it item by item built an error per wrong item (49,000 of them
# took about 0.1 s of the event loop).
MAX_MODALITIES = 16
MAX_TOOLS = 128
MAX_CONTENT_PARTS = 64


class SessionIn(_Lenient):
    """A ``session.update``'s session; which fields were given matters (``model_fields_set``)."""

    type: str | None = None
    instructions: str | None = Field(None, max_length=8_000)
    max_output_tokens: int | Literal["inf"] | None = None
    output_modalities: list[str] | None = Field(None, max_length=MAX_MODALITIES)
    audio: AudioIn | None = None
    tools: list[Any] | None = Field(None, max_length=MAX_TOOLS)
    # The beta-interface fields given (BETA_SESSION_FIELDS), in the client's order: the codec refuses them.
    _beta_fields: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _note_beta_fields(cls, data: Any, handler: ModelWrapValidatorHandler[SessionIn]) -> SessionIn:
        session = handler(data)
        if isinstance(data, dict):
            session._beta_fields = tuple(key for key in data if key in BETA_SESSION_FIELDS)
        return session

    @property
    def beta_fields(self) -> tuple[str, ...]:
        return self._beta_fields


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: SessionIn


class InputAudioBufferAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ResponseIn(_Lenient):
    output_modalities: list[str] | None = Field(None, max_length=MAX_MODALITIES)
    max_output_tokens: int | Literal["inf"] | None = None  # this response's cap; the session's bounds it
    metadata: Metadata | None = None
    conversation: str | None = None  # "none" = out of band: this server has one conversation, the audio's


class ResponseCreate(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseIn | None = None


class ResponseCancel(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: ClientId | None = None


class ContentIn(_Lenient):
    type: str
    text: str | None = None
    transcript: str | None = None


class ItemIn(_Lenient):
    id: ClientId | None = None
    type: str
    role: str | None = None
    content: list[ContentIn] | None = Field(None, max_length=MAX_CONTENT_PARTS)
    call_id: ClientId | None = None
    output: str | None = None


class ConversationItemCreate(_ClientEvent):
    type: Literal["conversation.item.create"]
    previous_item_id: ClientId | None = None
    item: ItemIn


class ConversationItemDelete(_ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: ClientId


class ConversationItemRetrieve(_ClientEvent):
    type: Literal["conversation.item.retrieve"]
    item_id: ClientId


ClientEvent = Annotated[
    Union[SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear, ResponseCreate,
          ResponseCancel, ConversationItemCreate, ConversationItemDelete, ConversationItemRetrieve],
    Field(discriminator="type"),
]
CLIENT_EVENT_ADAPTER: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers disagree on which of two values for one key wins: such an event has no one meaning.
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(key)
        found[key] = value
    return found


# A \\u escape of a UTF-16 surrogate (D800-DFFF): only then can a string hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_client_event(text: str) -> ClientEvent:
    """One text frame -> its event. Raises ``DuplicateKey``, pydantic's ``ValidationError``, ``RecursionError``
    (nested deeper than Python's stack), and ``ValueError`` (``json.JSONDecodeError`` among them) for text that is
    no JSON or JSON no event can hold: an integer longer than Python converts (4,300 digits), and a lone
    surrogate escape, valid JSON grammar but no text: the codec could not write it back out."""
    data = json.loads(text, object_pairs_hook=_unique_keys)
    if _SURROGATE_ESCAPE.search(text):
        pydantic_core.from_json(text)  # its parser refuses a lone surrogate (ValueError) and takes a pair
    return CLIENT_EVENT_ADAPTER.validate_python(data, strict=True)


class _KeyValuePairs(list):
    """A JSON object as its (key, value) pairs, every key kept (a JSON array stays a plain list)."""


def echoable_event_id(text: str) -> str | None:
    """The ``event_id`` of a frame ``parse_client_event`` refused (valid JSON, an object) for its error to name:
    only one a valid event could carry, given once at the top level (of two, neither is the event's)."""
    top = json.loads(text, object_pairs_hook=_KeyValuePairs)
    given = [value for key, value in top if key == "event_id"] if isinstance(top, _KeyValuePairs) else []
    if len(given) == 1 and isinstance(given[0], str) and len(given[0]) <= MAX_EVENT_ID_CHARS:
        return given[0]
    return None
