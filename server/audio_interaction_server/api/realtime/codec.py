"""The ``/v1/realtime`` codec: OpenAI Realtime frames <-> the session's commands and events.

``decode`` turns one client frame into session commands (api/commands.py); ``encode`` turns one
session event (protocol.py) into zero or more Realtime events, at send time and in order. The
session and the engine are the ones ``/v1/stream`` uses; this file only translates, keeping the
little state the Realtime API needs and the session does not: the response in progress, item
ids, the audio format on the wire (G.711 is decoded here), the turn-detection name the client chose.

Answers that are the codec's own (a ``response.cancel`` with nothing to cancel, an unsupported
``output_modalities``) still go through the session as ``Malformed`` commands, so they are
counted and ordered like every other error. Conversation items (``conversation.item.create``/
``delete``/``retrieve``) change nothing the session holds: they go to it as ``AcknowledgeItem``, which it
answers with ``ItemAcknowledged`` in its place in the event order (and counts as a text event),
and the codec words that answer as the Realtime acknowledgement. The ``_answers`` queue says what
each ``Configure`` the codec sent stands for, the ``_acks`` queue what each ``AcknowledgeItem`` does.
The session answers each of those with exactly one event, in order: its acknowledgement, or an error naming
the command's event type and id, whatever the error's code (``invalid_state``, ``invalid_event``,
``rate_limited``, ...). An error the codec's own ``Malformed`` asked for names its event the same way, so those
are counted (``_own_refusals``) and told apart by their code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from audio_interaction_server.api.commands import (
    AcknowledgeItem, AppendAudio, CancelReply, ClearAudio, Command, Configure, Flush, Malformed, RequestReply,
)
from audio_interaction_server.api.realtime.events import (
    BETA_SESSION_FIELDS, AudioInputObject, AudioObject, AudioPcm, AudioPcma, AudioPcmu, ConversationItemAdded,
    ConversationItemCreate, ConversationItemDelete, ConversationItemDeleted, ConversationItemDone,
    ConversationItemRetrieve, ConversationItemRetrieved, DuplicateKey,
    Error, ErrorDetail, FunctionCallOutputItem, ImageContent, InputAudioBufferAppend, InputAudioBufferClear,
    InputAudioBufferCleared, InputAudioBufferCommit, InputAudioContent, Item, MessageItem, ResponseCancel,
    ResponseCreate, SessionCreated, SessionIn, SessionObject, SessionUpdate, SessionUpdated, TextContent,
    TurnDetectionObject, echoable_event_id, parse_client_event,
)
from audio_interaction_server.api.realtime.replies import Conversation, Ids, ReplyBuilder
from audio_interaction_server.audio.g711 import alaw_to_s16le, mulaw_to_s16le
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.protocol import (
    REALTIME_SESSION_ID_PREFIX, AudioFormat, SessionSettings, cut_short, shown,
)

REALTIME_RATE_HZ = 24_000  # the Realtime API's PCM rate (what LiveKit and pipecat send)
G711_RATE_HZ = 8_000
MAX_TURN_TOKENS = 4096  # SessionOptions.max_turn_tokens' bound, checked here to name the Realtime field
# The session's model settings a session.update may change, with the Realtime fields they come from.
_MODEL_SETTING_PARAMS = (("system_prompt", "session.instructions"), ("max_turn_tokens", "session.max_output_tokens"),
                         ("reply_mode", "session.audio.input.turn_detection"))

# Session error codes -> the Realtime API's, where it has its own name for the same thing.
_CODES = {"unauthorized": "invalid_api_key", "invalid_event": "invalid_value",
          "reply_in_progress": "conversation_already_has_active_response"}
# The session's refusal of a frame of no whole sample names /v1/stream's format and its sample frames; of the
# Realtime formats only audio/pcm has samples of more than one byte (pcmu and pcma: one each).
_NOT_WHOLE_SAMPLES = re.compile(r"^(?P<bytes>\d+) bytes is not a whole number of pcm_s16le frames")
# Fatal errors that are the client's doing; other fatal ones are the server's (type server_error).
_CLIENT_FATAL = {"idle_timeout", "session_too_long", "client_too_slow", "unauthorized", "origin_not_allowed",
                 "audio_flood", "event_flood", "rate_limited", "invalid_value"}
# The turn of a response closed without a reply (a request withdrawn before it began): no session turn has it.
WITHDRAWN_TURN = -1
_NOT_SENT = {"session.closed", "segment", "decision", "context_rollover", "session.going_away"}
_TYPE_TAGS = {"int", "str", "bool", "float", "list", "dict", "none"}


_Unchanged = Literal["unchanged"]


@dataclass(frozen=True)
class _Answer:
    """What the session's answer to one codec-issued ``Configure`` stands for."""

    kind: Literal["internal", "session.update"]  # internal: the codec's own, nothing is sent
    event_type: str
    event_id: str | None
    audio_format: AudioPcm | AudioPcmu | AudioPcma | None = None
    # The very AudioFormat its Configure carried, when it changes the format: the session keeps that object while it
    # reads that format (``AudioInput.set_format``), so the codec can tell whether it was applied before it is answered.
    session_format: AudioFormat | None = None
    turn_detection: TurnDetectionObject | None | _Unchanged = "unchanged"
    # The Realtime fields of the model settings it changes (refused after the first audio: invalid_state).
    model_params: tuple[str, ...] = ()
    # The fields it changes that may change at any time: not applied either when the update is refused.
    other_params: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Ack:
    """The conversation change one ``AcknowledgeItem`` stands for: an item added, or one deleted."""

    event_type: str
    event_id: str | None
    item: Item | None = None
    previous_item_id: str | None = None  # where the item goes: after this one (None: first of all) ...
    is_at_tail: bool = False  # ... or after the newest item when it is acknowledged
    deleted_item_id: str | None = None
    retrieved_item_id: str | None = None  # a conversation.item.retrieve: the item as it stands when it is answered
    num_bytes: int = 0  # the item's JSON: held until its echo is sent, counted by the connection's outbox


@dataclass(frozen=True)
class SessionNow:
    """What the session reads now, in the order of the client's frames: the connection has the session handle each
    command as soon as it is decoded, while the session's answers may still wait in the outbox behind events the
    client has not read (and the codec sees an answer only as it is sent)."""

    options: SessionOptions
    audio_format: AudioFormat  # the object the session reads frames with (``AudioInput.format``)


@dataclass(frozen=True)
class _Commit:
    """An ``input_audio_buffer.commit`` whose flush the session has not answered yet."""

    event_id: str | None
    taken_s: float  # the session's clock of audio taken when it was read: what it commits


@dataclass
class _Request:
    """A ``response.create`` whose reply has not begun yet."""

    event_id: str | None
    metadata: dict[str, str] | None
    max_output_tokens: int | None  # its reply's own cap (the session's bounds it); None: the session's
    taken_s: float = 0.0  # the session's clock of audio taken when it was read: what it commits, as a commit would


class RealtimeCodec:
    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.ids = Ids()
        self.conversation = Conversation()
        self.replies = ReplyBuilder(self.ids, self.conversation)
        self._format: AudioPcm | AudioPcmu | AudioPcma = AudioPcm()
        self._turn_detection: TurnDetectionObject | None = TurnDetectionObject()
        self._answers: deque[_Answer] = deque()
        self._acks: deque[_Ack] = deque()
        # (event type, event id, code) of each Malformed sent whose error has not come back yet
        self._own_refusals: Counter[tuple[str | None, str | None, str]] = Counter()
        self.held_bytes = 0  # the items in _acks (connection.py bounds them with the events still unsent)
        self._params: dict[tuple[str | None, str], str] = {}  # (event_id, code) -> the field a codec error names
        self._is_started = False
        self._session_id = "sess_unbound"
        self._model = "audio-interaction"
        self._settings = None  # the session's SessionSettings, from its last session.created/updated
        self._default_max_turn_tokens = 512
        self._request: _Request | None = None
        # What a commit commits is the audio the session took, read off its clock (``follow``); until then, none.
        self._taken_audio: Callable[[], float] = lambda: 0.0
        # What the session reads now (``follow``); until then, what its answers sent so far said.
        self._session_now: Callable[[], SessionNow] | None = None
        # Audio in the client's order (decoding): the clock at the last commit or clear, for commit_empty.
        self._taken_at_commit = 0.0
        # Audio in the session's order (encoding): the clock when the last user item was made, or a clear answered
        # (``_taken_done``). A clear drops the audio taken before it once the session answers it, not the audio the
        # client sent after it, which may be taken before that answer comes, nor audio a commit waits for (the
        # session keeps the chunks of its flush: a clear empties only the buffer not committed).
        self._taken_before_clear: deque[float] = deque()  # the clock at each clear not yet answered
        self._taken_cleared = 0.0  # the clock at the last clear the session answered: unheard audio before it dropped
        self._taken_committed = 0.0  # the clock when the last user item was made (a clear does not move it)
        self._commits_waiting: deque[_Commit] = deque()
        self._cancelled_response_id: str | None = None  # the response a cancel was sent for
        self._withdrawing = False  # a cancel was sent for the requested response before it began

    def follow(self, taken_audio_s: Callable[[], float], session_now: Callable[[], SessionNow] | None = None) -> None:
        """Read what audio the session took off ``taken_audio_s`` (its ``audio.audio_received_s``, which grows with
        each frame it accepts): a frame it refused (a full buffer, no whole sample, a closing session) is answered
        with an error, and is no audio to commit. The connection has the session handle each command as soon as it
        is decoded, so when the next frame is decoded the clock has every earlier append's verdict.

        ``session_now``: the session's options and audio format as they stand, read the same way, for what decoding
        depends on (how an append's bytes are read, what a session.update changes). Not the answers sent so far: a
        session.updated goes out after the events the client has not read yet, and an append decoded meanwhile by
        the format of the last update *sent* was read as the wrong encoding (3 s of G.711 taken as 1.5 s of PCM16),
        or a second update that undid the first compared with stale settings and left the session reading 24 kHz
        PCM as 8 kHz for good (hostile probe, round fourteen)."""
        self._taken_audio = taken_audio_s
        self._session_now = session_now

    # ---- client frames -> commands ----------------------------------------------------------
    def decode(self, message: str | bytes) -> list[Command]:
        first: list[Command] = []
        if not self._is_started:
            # The session starts at /v1/stream's 16 kHz; the Realtime API's default is 24 kHz PCM.
            self._is_started = True
            session_format = self._session_format(self._format)
            first.append(Configure(audio=session_format, event_type="session.update"))
            self._answers.append(_Answer("internal", "session.update", None, audio_format=self._format,
                                         session_format=session_format))
        commands = self._decode(message)
        for command in commands:
            if isinstance(command, Malformed):
                self._own_refusals[(command.event_type, command.event_id, command.code)] += 1
        return first + commands

    def _decode(self, message: str | bytes) -> list[Command]:
        if isinstance(message, bytes):
            return [Malformed("invalid_frame", "binary frames are not part of the Realtime API: send audio as "
                              "base64 in input_audio_buffer.append; frame ignored")]
        if len(message.encode()) > self.max_frame_bytes:
            return [Malformed("frame_too_large", f"text frame over {self.max_frame_bytes} bytes; ignored (send "
                              "audio in smaller appends)")]
        try:
            event = parse_client_event(message)
        except DuplicateKey as error:
            return [self._refuse("invalid_value", f"duplicate key {shown(error.key)}: each key may appear once per "
                                 "object; event ignored", None, echoable_event_id(message))]
        except ValidationError as error:
            return [self._invalid(error, echoable_event_id(message))]
        except (ValueError, RecursionError) as error:  # no JSON, or JSON this server cannot take (see the parser)
            reason = (error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
                      if isinstance(error, RecursionError) else str(error))
            return [Malformed("invalid_json", f"text frames must hold one JSON object: {reason}")]
        match event:
            case InputAudioBufferAppend():
                return self._append(event)
            case SessionUpdate():
                return self._session_update(event)
            case InputAudioBufferCommit():
                return self._commit(event)
            case InputAudioBufferClear():
                return self._clear(event)
            case ResponseCreate():
                return self._response_create(event)
            case ResponseCancel():
                return self._response_cancel(event)
            case ConversationItemCreate():
                return self._item_create(event)
            case ConversationItemDelete():
                return self._item_delete(event)
            case ConversationItemRetrieve():
                return self._item_retrieve(event)
        raise TypeError(f"no command for {event!r}")

    def _invalid(self, error: ValidationError, event_id: str | None) -> Malformed:
        first = error.errors()[0]
        context = first.get("ctx", {})
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = context.get("tag")
            return Malformed("unknown_event", f"event type {shown(tag)} is not supported by this server (see "
                             "docs/realtime.md for the supported events)",
                             event_type=None if tag is None else cut_short(str(tag)), event_id=event_id)
        if first["type"] == "model_type" and not first["loc"]:
            return Malformed("invalid_json", "text frames must hold one JSON object")
        event_type = str(first["loc"][0]) if first["loc"] else None
        loc = first["loc"][1:]
        if loc and loc[-1] == "[key]":  # a dict's key refused: the dict is the field (the key may be long)
            loc = loc[:-2]
        # pydantic names the union member it tried ("int", "literal['inf']"): not a field the client knows.
        where = ".".join(cut_short(str(part)) for part in loc
                         if not (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)))
        return self._refuse("invalid_value", f"{where or 'event'}: {first['msg']}", event_type, event_id, where or None)

    def _refuse(self, code: str, message: str, event_type: str | None, event_id: str | None,
                param: str | None = None) -> Malformed:
        if param is not None:
            if len(self._params) > 64:  # an answer the session never gave (it closed): forget the oldest
                del self._params[next(iter(self._params))]
            self._params[(event_id, code)] = param
        return Malformed(code, message, event_type=event_type, event_id=event_id)

    def _append(self, event: InputAudioBufferAppend) -> list[Command]:
        try:
            data = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            return [self._refuse("invalid_value", "audio is not valid base64; ignored", event.type, event.event_id,
                                 "audio")]
        reading = self._format_read_now()
        if isinstance(reading, AudioPcmu):
            data = mulaw_to_s16le(data)
        elif isinstance(reading, AudioPcma):
            data = alaw_to_s16le(data)
        return [AppendAudio(data, event_id=event.event_id)]

    def _format_read_now(self) -> AudioPcm | AudioPcmu | AudioPcma:
        """The wire format of the audio the session reads now: that of the newest update it applied, answered or
        not. Told by the AudioFormat object the update's Configure carried, not by its value: G.711 and 8 kHz PCM
        both reach the session as 8 kHz PCM16."""
        # Looked up only while an update of the format waits for its answer: an append's usual path asks nothing.
        if self._session_now is not None and any(answer.session_format is not None for answer in self._answers):
            reading = self._session_now().audio_format
            for answer in reversed(self._answers):
                if answer.session_format is reading:
                    assert answer.audio_format is not None  # set with every session_format
                    return answer.audio_format
        return self._format  # the last update answered (a refused one changed nothing)

    def _clear(self, event: InputAudioBufferClear) -> list[Command]:
        self._taken_at_commit = self._taken_audio()
        self._taken_before_clear.append(self._taken_at_commit)
        # The Realtime API's clear empties the input buffer: audio committed before it is the conversation's already.
        return [ClearAudio(event_id=event.event_id, event_type=event.type, keep_committed=True)]

    def _commit(self, event: InputAudioBufferCommit) -> list[Command]:
        taken = self._taken_audio()
        if taken <= self._taken_at_commit:
            return [self._refuse("input_audio_buffer_commit_empty", "Error committing input audio buffer: no audio "
                                 "was taken since the last commit (an append answered with an error is none)",
                                 event.type, event.event_id)]
        self._taken_at_commit = taken
        self._commits_waiting.append(_Commit(event.event_id, taken))
        # Adds trailing silence and pads the last chunk, so the model hears all of it; committed follows.
        return [Flush(event_id=event.event_id, event_type=event.type)]

    def _response_create(self, event: ResponseCreate) -> list[Command]:
        response = event.response
        modalities = response.output_modalities if response is not None else None
        if modalities is not None and set(modalities) != {"text"}:
            return [self._refuse("invalid_value", f"output_modalities {shown(modalities)} is not supported: the model "
                                 "produces text (pair it with a text-to-speech)", event.type, event.event_id,
                                 "response.output_modalities")]
        cap = None if response is None else response.max_output_tokens
        if isinstance(cap, int) and not 1 <= cap <= MAX_TURN_TOKENS:
            return [self._refuse("invalid_value", f"max_output_tokens must be 1 to {MAX_TURN_TOKENS} or 'inf', not "
                                 f"{cap}", event.type, event.event_id, "response.max_output_tokens")]
        if self.replies.reply is not None or self._request is not None:
            active = self.replies.response_id or "(requested)"
            return [self._refuse("conversation_already_has_active_response", f"Conversation already has an active "
                                 f"response in progress: {active}. Wait until the response is finished before "
                                 "creating a new one.", event.type, event.event_id)]
        # The engine caps the reply it starts for this request (the codec could not: the text deltas it sees are
        # not tokens, and a cancel would land tokens later). The session's cap bounds it: the context is sized for
        # that, so a larger one (or "inf") gives the session's.
        reply_cap = cap if isinstance(cap, int) else None
        self._request = _Request(event.event_id, None if response is None else response.metadata, reply_cap,
                                 taken_s=self._taken_audio())
        return [RequestReply(event_id=event.event_id, event_type=event.type, max_turn_tokens=reply_cap)]

    def _response_cancel(self, event: ResponseCancel) -> list[Command]:
        active = self.replies.response_id
        if active is None and self._request is not None and event.response_id is None:
            # The response asked for has not begun (the Realtime API creates it at once; the model begins it at its
            # next chunk): the cancel withdraws the request, and the session's ReplyRequestWithdrawn closes it as a
            # cancelled response; had the reply begun meanwhile, the cancel ends it. Refused, a cancel sent at once
            # after response.create let the reply come all the same (pipecat's interruption).
            if self._withdrawing:
                return [self._refuse_cancel("the response is being cancelled already", event)]
            self._withdrawing = True
            return [CancelReply(event_id=event.event_id, event_type=event.type, withdraws_request=True)]
        if active is None or (event.response_id is not None and event.response_id != active):
            return [self._refuse_cancel("no active response found", event)]
        if active == self._cancelled_response_id:  # its response.done is on its way; the session would say nothing
            return [self._refuse_cancel("the response is being cancelled already", event)]
        self._cancelled_response_id = active
        return [CancelReply(event_id=event.event_id, event_type=event.type)]

    def _refuse_cancel(self, reason: str, event: ResponseCancel) -> Malformed:
        # "Cancellation failed" is the Realtime API's own wording, which LiveKit recognises and skips.
        return self._refuse("response_cancel_not_active", f"Cancellation failed: {reason}", event.type, event.event_id)

    def _item_create(self, event: ConversationItemCreate) -> list[Command]:
        given = event.item
        item_id = given.id or self.ids.new("item")
        if self._will_hold(item_id):
            return [self._refuse("item_create_duplicate_item_id", f"an item with id {shown(item_id)} already exists",
                                 event.type, event.event_id, "item.id")]
        item: Item
        if given.type == "message" and given.role in ("user", "assistant", "system"):
            content: list[InputAudioContent | TextContent | ImageContent] = []
            for part in given.content or []:
                if part.type in ("input_text", "output_text", "text"):
                    kind = "output_text" if given.role == "assistant" else "input_text"
                    content.append(TextContent(type=kind, text=part.text or part.transcript or ""))
                elif part.type == "input_image":
                    content.append(ImageContent())
                elif part.type == "input_audio" and given.role == "user":
                    content.append(InputAudioContent(transcript=part.transcript))  # as an image: never its data
            item = MessageItem(id=item_id, role=given.role, content=content)
        elif given.type == "function_call_output" and given.call_id is not None:
            item = FunctionCallOutputItem(id=item_id, call_id=given.call_id, output=given.output or "")
        else:
            kind = shown(given.type) + (f" (role {shown(given.role)})" if given.type == "message" else "")
            return [self._refuse("invalid_value", f"items of type {kind} are not supported: the model neither calls "
                                 "tools nor takes them", event.type, event.event_id, "item.type")]
        previous = event.previous_item_id
        if previous is not None and previous != "root" and not self._will_hold(previous):
            # The SDK: "If the ID cannot be found, an error will be returned and the item will not be added."
            return [self._refuse("item_create_invalid_previous_item_id", f"no item with id {shown(previous)} to "
                                 "place the item after; item not added", event.type, event.event_id,
                                 "previous_item_id")]
        return self._acknowledge(_Ack(event.type, event.event_id, item=item,
                                      previous_item_id=None if previous == "root" else previous,
                                      is_at_tail=previous is None, num_bytes=len(item.model_dump_json())))

    def _will_hold(self, item_id: str) -> bool:
        """Whether the conversation holds ``item_id`` once the acknowledgements on their way are sent: a client may
        name an item it created (or deleted) in the same burst, before its echo (LiveKit syncs its history so)."""
        is_held = item_id in self.conversation.item_ids
        for ack in self._acks:
            if ack.item is not None and ack.item.id == item_id:
                is_held = True
            elif ack.deleted_item_id == item_id:
                is_held = False
        return is_held

    def _item_delete(self, event: ConversationItemDelete) -> list[Command]:
        reply = self.replies.reply
        if reply is not None and reply.is_open and event.item_id == reply.item_id:
            # Its deltas, output_item.done and conversation.item.done would still come, for an item the client was
            # told is gone. Refusing is simpler than cancelling first, and the client can do both in order.
            return [self._refuse("invalid_state", f"item {shown(event.item_id)} is the output of the response in "
                                 f"progress ({reply.response_id}): send response.cancel, then delete it after its "
                                 "response.done", event.type, event.event_id, "item_id")]
        if not self._will_hold(event.item_id):
            return [self._refuse("item_delete_invalid_item_id", f"no item with id {shown(event.item_id)}", event.type,
                                 event.event_id, "item_id")]
        return self._acknowledge(_Ack(event.type, event.event_id, deleted_item_id=event.item_id))

    def _item_retrieve(self, event: ConversationItemRetrieve) -> list[Command]:
        if not self._will_hold(event.item_id):
            return [self._refuse("item_retrieve_invalid_item_id", f"no item with id {shown(event.item_id)}",
                                 event.type, event.event_id, "item_id")]
        # Answered in its place in the event order, as the item stands then (a reply's item with its text so far).
        return self._acknowledge(_Ack(event.type, event.event_id, retrieved_item_id=event.item_id))

    def _acknowledge(self, ack: _Ack) -> list[Command]:
        self._acks.append(ack)
        self.held_bytes += ack.num_bytes
        return [AcknowledgeItem(event_type=ack.event_type, event_id=ack.event_id)]

    def _session_update(self, event: SessionUpdate) -> list[Command]:
        session = event.session
        refusal = session_refusal(session)
        if refusal is not None:
            message, param = refusal
            return [self._refuse("invalid_value", message, event.type, event.event_id, param)]
        given = session.model_fields_set
        fields: dict = {}
        # Compared with the session as it stands: an earlier update may be applied and not answered yet.
        settings: SessionOptions | SessionSettings | None = \
            self._session_now().options if self._session_now is not None else self._settings
        if "instructions" in given:
            prompt = session.instructions or None  # empty = the model's trained system prompt
            if settings is None or prompt != settings.system_prompt:
                fields["system_prompt"] = prompt
        if "max_output_tokens" in given:
            cap = session.max_output_tokens
            cap = self._default_max_turn_tokens if cap in (None, "inf") else cap
            if settings is None or cap != settings.max_turn_tokens:
                fields["max_turn_tokens"] = cap
        audio_input = session.audio.input if session.audio is not None else None
        new_format = None
        turn_detection: TurnDetectionObject | None | _Unchanged = "unchanged"
        if audio_input is not None and audio_input.format is not None:
            new_format = _format_object(audio_input.format.type, audio_input.format.rate)
            assert new_format is not None  # session_refusal refused the formats this server does not take
            if new_format != self._format_read_now():
                fields["audio"] = self._session_format(new_format)
        if audio_input is not None and "turn_detection" in audio_input.model_fields_set:
            requested = audio_input.turn_detection
            turn_detection = None if requested is None else TurnDetectionObject(
                type=requested.type, create_response=requested.create_response is not False)
            # A detection that creates no responses leaves each reply to response.create: manual turns.
            reply_mode = "model" if turn_detection is not None and turn_detection.create_response else "on_request"
            if settings is None or reply_mode != settings.reply_mode:
                fields["reply_mode"] = reply_mode
        model_params = tuple(param for field, param in _MODEL_SETTING_PARAMS if field in fields)
        other_params = ("session.audio.input.format",) if "audio" in fields else ()
        self._answers.append(_Answer("session.update", event.type, event.event_id, audio_format=new_format,
                                     session_format=fields.get("audio"), turn_detection=turn_detection,
                                     model_params=model_params, other_params=other_params))
        return [Configure(**fields, event_id=event.event_id, event_type=event.type)]

    @staticmethod
    def _session_format(format_object) -> AudioFormat:
        rate = format_object.rate if isinstance(format_object, AudioPcm) else G711_RATE_HZ
        return AudioFormat(sample_format="pcm_s16le", sample_rate_hz=rate, num_channels=1)

    # ---- session events -> Realtime frames ----------------------------------------------------
    def encode(self, event) -> list[str]:
        return [out.model_dump_json() for out in self.translate(event)]

    def translate(self, event) -> list:
        """One session event -> the Realtime events it becomes (models, for tests; ``encode`` dumps them)."""
        kind = event.type
        if kind in _NOT_SENT:
            return []  # no Realtime counterpart; nothing is sent while the model listens
        if kind == "session.created":
            self._session_id, self._model = f"{REALTIME_SESSION_ID_PREFIX}{event.session_id}", event.model
            self._settings, self._default_max_turn_tokens = event.options, event.options.max_turn_tokens
            return [SessionCreated(event_id=self.ids.new("event"), session=self.session_object())]
        if kind == "session.updated":
            return self._answered(event)
        if kind == "item.acknowledged":
            return self._acknowledged()
        if kind == "reply_request.withdrawn":
            return self._withdrawn()
        if kind == "error":
            return self._error(event)
        if kind == "input.flushed":
            if not self._commits_waiting:
                return []
            commit = self._commits_waiting.popleft()
            if commit.taken_s <= self._taken_committed:
                return []  # its audio became a user item already (a reply began on it): committed was sent
            return self._commit_audio(commit.taken_s)
        if kind == "input.cleared":
            cleared = self._taken_before_clear.popleft() if self._taken_before_clear else self._taken_audio()
            self._taken_cleared = max(self._taken_cleared, cleared)
            return [InputAudioBufferCleared(event_id=self.ids.new("event"))]
        if kind == "turn_begin":
            # A reply the model chose leaves a request pending: one that reached the engine after the model began
            # is answered by the session's reply_in_progress (the Realtime API's refusal of a second response); one
            # that waits for the chunk it answers (audio queued before it) gets its own response after this one.
            request = None
            if event.requested:
                request, self._request = self._request, None
            self._begin_response(event.turn, request)
            if self._withdrawing:  # the reply began before the cancel reached the engine: the cancel ends it
                self._withdrawing = False
                self._cancelled_response_id = self.replies.response_id
            # The audio the decision was made on is committed now; the response itself opens at its first
            # token (replies.py says why), so these frames are out before the engine has produced it. A request
            # committed the audio taken before it: a clear since then kept that audio, and it is the user's item.
            return self._commit_audio(request.taken_s if request is not None else 0.0)
        if self.replies.reply is None or getattr(event, "turn", None) != self.replies.reply.turn:
            return []  # a reply's tail after the codec closed it (cannot happen in order; never sent twice)
        if kind == "emotion":
            return self._commit_audio() + self.replies.emotion(event.emotion)
        if kind == "text_delta":
            return self._commit_audio() + self.replies.delta(event.text)
        if kind == "turn_end":
            return self._commit_audio() + self.replies.end(event.end_reason, event.text, event.num_tokens)
        return []

    def session_object(self) -> SessionObject:
        settings = self._settings
        return SessionObject(
            id=self._session_id, model=self._model,
            instructions=None if settings is None else settings.system_prompt,
            max_output_tokens=self._default_max_turn_tokens if settings is None else settings.max_turn_tokens,
            audio=AudioObject(input=AudioInputObject(format=self._format, turn_detection=self._turn_detection)),
        )

    @property
    def _taken_done(self) -> float:
        """The clock up to which the session's audio is dealt with: made a user item, or dropped by a clear."""
        return max(self._taken_committed, self._taken_cleared)

    def _commit_audio(self, answering_s: float = 0.0) -> list:
        """Before a reply opens (and at a commit): the audio not yet committed becomes a user item. Never while a
        reply streams: the model hears audio sent meanwhile only once the reply ends (the session answers a
        commit's flush then), and committing at each delta would make a user item of every 20 ms append.
        ``answering_s``: the clock of the commit whose flush is answered now."""
        taken = self._taken_audio()
        if self.replies.reply is not None and self.replies.reply.is_open:
            return []
        # A commit's audio is kept by a clear after it (only the audio after it went): still to become an item.
        committing_s = max([answering_s, *(commit.taken_s for commit in self._commits_waiting)])
        if taken <= self._taken_done and committing_s <= self._taken_committed:
            return []
        self._taken_committed = taken
        self._taken_at_commit = taken  # every append taken so far is in this item: a commit now is empty
        return self.replies.commit_user_audio()

    def _acknowledged(self) -> list:
        if not self._acks:
            return []  # the session answers each AcknowledgeItem once, so only a scripted test can get here
        ack = self._acks.popleft()
        self.held_bytes -= ack.num_bytes
        if ack.item is not None:
            if ack.is_at_tail:  # the tail now: items the server made since the create was read come before it
                previous = self.conversation.add(ack.item.id, ack.item)
            else:
                previous = ack.previous_item_id
                self.conversation.insert(ack.item.id, after=previous, item=ack.item)
            return [ConversationItemAdded(event_id=self.ids.new("event"), previous_item_id=previous, item=ack.item),
                    ConversationItemDone(event_id=self.ids.new("event"), previous_item_id=previous, item=ack.item)]
        if ack.deleted_item_id is not None:
            self.conversation.remove(ack.deleted_item_id)
            return [ConversationItemDeleted(event_id=self.ids.new("event"), item_id=ack.deleted_item_id)]
        if ack.retrieved_item_id is not None:
            item = self.replies.item(ack.retrieved_item_id)
            if item is not None:
                return [ConversationItemRetrieved(event_id=self.ids.new("event"), item=item)]
            detail = ErrorDetail(type="invalid_request_error", code="item_retrieve_invalid_item_id",
                                 message=f"item {shown(ack.retrieved_item_id)} is no longer kept: this server keeps "
                                 f"the most recent {self.conversation.max_item_bytes // 1024} KiB of items",
                                 param="item_id", event_id=ack.event_id)
            return [Error(event_id=self.ids.new("event"), error=detail)]
        return []

    def _withdrawn(self) -> list:
        """The requested response, withdrawn before it began: created and done at once, cancelled, with nothing in
        it (a client that asked for it waits for its response.done)."""
        request, self._request = self._request, None
        self._withdrawing = False
        if request is None:
            return []
        self._begin_response(WITHDRAWN_TURN, request)
        return self.replies.end("cancelled", "", 0)

    def _begin_response(self, turn: int, request: _Request | None) -> None:
        """The next response, for ``request`` (None: a reply the model chose), capped as the engine caps its reply:
        the session's cap, or the request's below it."""
        cap = self._settings.max_turn_tokens if self._settings else 0
        if request is not None and request.max_output_tokens is not None:
            cap = min(cap, request.max_output_tokens)
        self.replies.begin(turn, cap, None if request is None else request.metadata)

    def _answered(self, event) -> list:
        self._settings = event.options
        answer = self._answers.popleft() if self._answers else _Answer("session.update", "session.update", None)
        if answer.audio_format is not None:
            self._format = answer.audio_format
        if not isinstance(answer.turn_detection, str):  # "unchanged" is the one string
            self._turn_detection = answer.turn_detection
        if answer.kind == "internal":
            return []
        return [SessionUpdated(event_id=self.ids.new("event"), session=self.session_object())]

    def _error(self, event) -> list:
        named = (event.event_type, event.event_id)
        own = (*named, event.code)
        is_own_refusal = bool(self._own_refusals[own])
        if is_own_refusal:  # the answer to one of the codec's own Malformed commands
            self._own_refusals[own] -= 1
            if not self._own_refusals[own]:
                del self._own_refusals[own]
        elif self._acks and (self._acks[0].event_type, self._acks[0].event_id) == named:
            # The session refused an AcknowledgeItem or a Configure: nothing of it applies.
            self.held_bytes -= self._acks.popleft().num_bytes
        elif self._answers and (self._answers[0].event_type, self._answers[0].event_id) == named:
            answer = self._answers.popleft()
            if event.code == "invalid_state" and answer.model_params:  # named as the client named them
                message = (f"{', '.join(answer.model_params)} can only change before the first audio; open a new "
                           "session to change it")
                if answer.other_params:
                    # The session applies an update whole or not at all: a change allowed now, lost without a
                    # word, would leave the client streaming a format the server does not read.
                    message += (f". This session.update was not applied at all, {', '.join(answer.other_params)} "
                                "included: send that again on its own")
                event = event.model_copy(update={"message": message})
            if answer.model_params:  # refused for one of them (a prompt too long for the context, ...): named so
                self._params[(event.event_id, event.code)] = answer.model_params[0]
        if event.event_type == "response.create" and not is_own_refusal:
            # The session's answer to the one request it has: that request ends. A refusal of the codec's own (a
            # second request while one is pending, a bad value) leaves the pending one as it is.
            self._request = None
            self._withdrawing = False
        elif event.event_type == "input_audio_buffer.commit" and event.code != "input_audio_buffer_commit_empty":
            # The session refused a commit's flush: that commit waits no more (the oldest, if none has its id).
            waiting = [commit for commit in self._commits_waiting if commit.event_id == event.event_id]
            if waiting or self._commits_waiting:
                self._commits_waiting.remove(waiting[0] if waiting else self._commits_waiting[0])
        if event.code == "reply_in_progress":  # the session's words name /v1/stream's turn_end, never sent here
            active = self.replies.response_id or "(the model's own)"
            event = event.model_copy(update={"message": (
                f"Conversation already has an active response in progress: {active} (the model may have begun its "
                "own reply as this request arrived); this request was not applied: send it again after that "
                "response's response.done")})
        if event.code == "invalid_audio" and (odd := _NOT_WHOLE_SAMPLES.match(event.message)):
            event = event.model_copy(update={"message": (
                f"{odd['bytes']} bytes of audio/pcm are not a whole number of 16-bit samples (2 bytes each); this "
                "append was ignored")})
        param = self._params.pop((event.event_id, event.code), None)
        is_server_fault = event.is_fatal and event.code not in _CLIENT_FATAL
        detail = ErrorDetail(type="server_error" if is_server_fault else "invalid_request_error",
                             code=_CODES.get(event.code, event.code), message=event.message, param=param,
                             event_id=event.event_id)
        return [Error(event_id=self.ids.new("event"), error=detail)]


def session_refusal(session: SessionIn) -> tuple[str, str] | None:
    """Why this server cannot run a session with these settings, as (message, param), or None: what a
    ``session.update`` is refused for, and a client secret's mint request (``routes.py``) for its ``session``."""
    if session.beta_fields:
        # Refused on the fields, not on the OpenAI-Beta header: GA clients may send that header too.
        field = session.beta_fields[0]
        ga_field = BETA_SESSION_FIELDS[field]
        instead = f"use {ga_field}" if ga_field is not None else f"the GA interface has no {field} setting"
        return (f"session.{field} is a field of the Realtime beta interface; this server speaks the GA interface "
                f"(client.realtime, not client.beta.realtime): {instead}; nothing of this update was applied",
                f"session.{field}")
    if "type" in session.model_fields_set and session.type != "realtime":
        return (f"session type {shown(session.type)} is not supported: the model does not transcribe; use type "
                "'realtime'", "session.type")
    if session.output_modalities is not None and set(session.output_modalities) != {"text"}:
        return (f"output_modalities {shown(session.output_modalities)} is not supported: the model produces text "
                "(pair it with a text-to-speech)", "session.output_modalities")
    if session.tools:
        return "tools are not supported: the model does not call functions", "session.tools"
    cap = session.max_output_tokens
    if isinstance(cap, int) and not 1 <= cap <= MAX_TURN_TOKENS:
        return f"max_output_tokens must be 1 to {MAX_TURN_TOKENS} or 'inf', not {cap}", "session.max_output_tokens"
    audio_input = session.audio.input if session.audio is not None else None
    if audio_input is None:
        return None
    if audio_input.format is not None and _format_object(audio_input.format.type, audio_input.format.rate) is None:
        return (f"audio format {shown(audio_input.format.type)} (rate {audio_input.format.rate}) is not supported: "
                "use audio/pcm (24000 Hz, or another rate from 8000 to 48000), audio/pcmu or audio/pcma",
                "session.audio.input.format")
    requested = audio_input.turn_detection
    if requested is not None and requested.type not in ("server_vad", "semantic_vad"):
        return (f"turn_detection type {shown(requested.type)} is not supported: server_vad or semantic_vad (the "
                "model decides when to reply) or null (manual turns)", "session.audio.input.turn_detection.type")
    return None


def _format_object(type_name: str, rate: int | None) -> AudioPcm | AudioPcmu | AudioPcma | None:
    if type_name == "audio/pcm":
        rate = REALTIME_RATE_HZ if rate is None else rate
        return AudioPcm(rate=rate) if 8_000 <= rate <= 48_000 else None
    if type_name == "audio/pcmu":
        return AudioPcmu()
    if type_name == "audio/pcma":
        return AudioPcma()
    return None
