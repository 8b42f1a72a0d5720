"""The /v1/realtime codec (api/realtime/codec.py), sans I/O: client frames -> session commands, the session's
events -> Realtime frames, each frame held to the openai SDK's own types (strictly) and pipecat's parser.

``check_frame`` is also what the live-client tests (test_realtime_clients.py) hold every received frame to.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import BaseModel, TypeAdapter

from audio_interaction_server.api.commands import (
    AcknowledgeItem, AppendAudio, CancelReply, ClearAudio, Configure, Flush, ItemAcknowledged, Malformed,
    ReplyRequestWithdrawn, RequestReply,
)
from audio_interaction_server.api.realtime.codec import RealtimeCodec
from audio_interaction_server.audio.g711 import MULAW_TO_S16
from audio_interaction_server.options import SamplingOptions, SessionOptions
from audio_interaction_server.protocol import (
    AudioFormat, ErrorEvent, InputClearedEvent, InputFlushedEvent, LiveDecisionEvent, LiveEmotionEvent,
    LiveTextDeltaEvent, LiveTurnBeginEvent, LiveTurnEndEvent, SegmentEvent, SessionClosedEvent, SessionCreatedEvent,
    SessionLimits, SessionSettings, SessionUpdatedEvent,
)

pytest.importorskip("openai", reason="the openai SDK's types are the reference for every server event")



# Fields the SDK's session.created/updated type (a create *request*) does not declare; the session object
# is checked as a whole against the SDK's session *response* type instead, which declares them.
SESSION_EXTRAS = {"id", "object"}


def sdk_adapter() -> TypeAdapter:
    from openai.types.realtime.realtime_server_event import RealtimeServerEvent

    return TypeAdapter(RealtimeServerEvent)


def undeclared_fields(value, path: str = "") -> list[str]:
    """Every field of a parsed SDK model that its type does not declare (the SDK allows extras silently)."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        found += [f"{path}.{key}" for key in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += undeclared_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += undeclared_fields(item, f"{path}[{index}]")
    return found


def check_frame(frame: str, adapter: TypeAdapter | None = None) -> dict:
    """Assert ``frame`` is one standard Realtime server event, valid for the SDK (strict) and pipecat; returns
    the parsed JSON."""
    adapter = adapter or sdk_adapter()
    data = json.loads(frame)
    assert isinstance(data.get("event_id"), str) and data["event_id"], f"no event_id: {frame[:200]}"
    event = adapter.validate_json(frame, strict=True)
    assert event.type == data["type"], f"parsed as {event.type!r}: {frame[:200]}"
    extras = undeclared_fields(event, data["type"])
    if data["type"] in ("session.created", "session.updated"):
        from openai.types.realtime.realtime_session_create_response import RealtimeSessionCreateResponse

        session = RealtimeSessionCreateResponse.model_validate_json(json.dumps(data["session"]), strict=True)
        assert not undeclared_fields(session), undeclared_fields(session)
        extras = [name for name in extras if name.rsplit(".", 1)[-1] not in SESSION_EXTRAS
                  or not name.startswith(f"{data['type']}.session.")]
    assert not extras, f"fields the SDK does not declare: {extras}"
    try:
        from pipecat.services.openai.realtime import events as pipecat_events
    except ImportError:
        return data
    # pipecat drops types it has no model for (None) and ends its receive loop when one fails to parse.
    assert pipecat_events.parse_server_event(frame) is not None, f"pipecat does not know {data['type']!r}"
    return data


# ---- a codec with the session's side scripted -------------------------------------------------------------

SESSION_ID = "vm_0123"
STAMP = dict(session_id=SESSION_ID, server_time_ms=1)


def settings(**changes) -> SessionSettings:
    fields = dict(system_prompt=None, max_turn_tokens=64, sampling=SamplingOptions(), decision_events=False)
    return SessionSettings(**{**fields, **changes})


class Harness:
    """The codec, fed the events a session would send; every frame it makes is checked with ``check_frame``."""

    def __init__(self) -> None:
        self.codec = RealtimeCodec(max_frame_bytes=64 * 1024)
        self.taken_bytes = 0  # the audio the session took, as its clock (audio_received_s) counts it
        self.codec.follow(lambda: self.taken_bytes)
        self.adapter = sdk_adapter()
        self.frames: list[dict] = []
        self.options = settings()
        created = self.session(SessionCreatedEvent(
            **STAMP, model="tiny", is_demo=True, audio=AudioFormat(), options=self.options,
            limits=SessionLimits(max_frame_bytes=1, max_buffered_audio_s=1, idle_timeout_s=1, max_session_s=1,
                                 chunk_s=0.4)))
        assert [frame["type"] for frame in created] == ["session.created"]
        first = self.client({"type": "input_audio_buffer.clear"})  # any first frame switches the format
        assert first[0] == Configure(audio=AudioFormat(sample_rate_hz=24_000), event_type="session.update")
        assert self.session(self.updated()) == []  # the codec's own Configure: its answer is not sent

    def client(self, event: dict | str | bytes, is_refused: bool = False) -> list:
        """The commands of one client frame. The session takes each append at once (as the connection has it), unless
        it is no whole sample or ``is_refused`` (a full buffer): its clock grows with the audio it took."""
        commands = self.codec.decode(json.dumps(event) if isinstance(event, dict) else event)
        for command in commands:
            if isinstance(command, AppendAudio) and not is_refused and not len(command.data) % 2:
                self.taken_bytes += len(command.data)
        return commands

    def session(self, *events) -> list[dict]:
        out = [check_frame(frame, self.adapter) for event in events for frame in self.codec.encode(event)]
        self.frames += out
        return out

    def updated(self, **changes) -> SessionUpdatedEvent:
        self.options = self.options.model_copy(update=changes)
        return SessionUpdatedEvent(**STAMP, audio=AudioFormat(), options=self.options)

    @staticmethod
    def acknowledged(command: AcknowledgeItem) -> ItemAcknowledged:
        """The session's answer to an ``AcknowledgeItem``."""
        return ItemAcknowledged(session_id=SESSION_ID, event_type=command.event_type, event_id=command.event_id)

    def error(self, command, **fields) -> ErrorEvent:
        """The session's answer to a ``Malformed`` (or a refused command)."""
        code = fields.pop("code", getattr(command, "code", "invalid_state"))
        message = fields.pop("message", getattr(command, "message", "refused"))
        return ErrorEvent(**STAMP, code=code, message=message, event_type=command.event_type,
                          event_id=command.event_id, **fields)


def reply(turn: int, texts: list[str], end_reason: str = "text_end", emotion: str | None = "happy",
          requested: bool = False) -> list:
    """A reply's session events; ``requested``: it answers a ``response.create``."""
    events = [LiveTurnBeginEvent(**STAMP, turn=turn, chunk=3, audio_time_s=1.6, requested=requested)]
    if emotion is not None:
        events.append(LiveEmotionEvent(**STAMP, turn=turn, emotion=emotion, token_id=7))
    events += [LiveTextDeltaEvent(**STAMP, turn=turn, text=text) for text in texts]
    events.append(SegmentEvent(**STAMP, turn=turn, index=0, text="".join(texts)))
    events.append(LiveTurnEndEvent(**STAMP, turn=turn, text="".join(texts), token_ids=[7] * (len(texts) + 1),
                                   num_tokens=len(texts) + 1, end_reason=end_reason))
    return events


def append(samples: np.ndarray | bytes) -> dict:
    data = samples if isinstance(samples, bytes) else samples.astype("<i2").tobytes()
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}


REPLY_TYPES = [
    "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
    "response.output_text.delta", "response.output_text.delta",
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "conversation.item.done", "response.done",
]
COMMIT_TYPES = ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]


# ---- session ------------------------------------------------------------------------------------------------


def test_session_update_becomes_one_configure_and_session_updated_reports_the_effect():
    h = Harness()
    commands = h.client({"type": "session.update", "event_id": "u1", "session": {
        "type": "realtime", "instructions": "Be brief.", "max_output_tokens": 100, "output_modalities": ["text"],
        "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None,
                            "transcription": {"model": "whisper-1"}},
                  "output": {"voice": "marin", "format": {"type": "audio/pcm", "rate": 24000}}},
        "tool_choice": "auto", "tracing": None}})
    assert commands == [Configure(system_prompt="Be brief.", max_turn_tokens=100, reply_mode="on_request",
                                  audio=AudioFormat(sample_rate_hz=8_000), event_id="u1",
                                  event_type="session.update")]
    [frame] = h.session(h.updated(system_prompt="Be brief.", max_turn_tokens=100, reply_mode="on_request"))
    session = frame["session"]
    assert frame["type"] == "session.updated"
    assert session["instructions"] == "Be brief." and session["max_output_tokens"] == 100
    assert session["output_modalities"] == ["text"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["input"]["turn_detection"] is None  # manual turns, reported as such
    assert session["audio"]["input"]["transcription"] is None  # asked for, not done: the model does not transcribe


def test_a_session_update_that_changes_nothing_sends_no_option_to_the_session():
    """pipecat sends its whole session again before each response.create, after the audio started: model
    options may only change before the first audio, so only real changes may reach the session."""
    h = Harness()
    h.client({"type": "session.update", "session": {"instructions": "Be brief.", "max_output_tokens": "inf"}})
    h.session(h.updated(system_prompt="Be brief."))
    [again] = h.client({"type": "session.update", "event_id": "u2", "session": {
        "instructions": "Be brief.", "max_output_tokens": "inf", "tools": [],
        "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.5}}}}})
    assert again == Configure(event_id="u2", event_type="session.update")
    [frame] = h.session(h.updated())
    assert frame["session"]["audio"]["input"]["turn_detection"] == {"type": "server_vad", "create_response": True}


@pytest.mark.parametrize("session, param", [
    ({"output_modalities": ["audio"]}, "session.output_modalities"),
    ({"output_modalities": ["text", "audio"]}, "session.output_modalities"),
    ({"type": "transcription"}, "session.type"),
    ({"tools": [{"type": "function", "name": "f"}]}, "session.tools"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 4000}}}}, "session.audio.input.format"),
    ({"audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}}, "session.audio.input.turn_detection.type"),
    ({"max_output_tokens": 100_000}, "session.max_output_tokens"),
])
def test_what_the_model_cannot_do_is_refused_with_invalid_value_naming_the_field(session, param):
    h = Harness()
    [command] = h.client({"type": "session.update", "event_id": "bad", "session": session})
    assert isinstance(command, Malformed) and command.code == "invalid_value"
    [frame] = h.session(h.error(command))
    assert frame["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": command.message,
                              "param": param, "event_id": "bad"}


def test_a_refused_configure_leaves_the_reported_session_unchanged():
    h = Harness()
    [command] = h.client({"type": "session.update", "event_id": "late", "session": {
        "instructions": "Now different", "audio": {"input": {"format": {"type": "audio/pcma"}}}}})
    h.session(h.error(command, code="invalid_state", message="can only change before the first audio"))
    h.client({"type": "session.update", "event_id": "u", "session": {}})
    [frame] = h.session(h.updated())
    assert frame["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}


@pytest.mark.parametrize("code", ["rate_limited", "invalid_state", "invalid_event"])
def test_a_configure_the_session_refuses_with_any_code_applies_nothing_of_its_own_later(code):
    """The session refuses a Configure with an error whatever its code (``rate_limited``: a system prompt over the
    per-session budget): the refused format must not be applied by the next update's answer, or the audio that
    follows is decoded as the refused format (G.711 at 8 kHz read as 24 kHz PCM) while the session says nothing."""
    h = Harness()
    [refused] = h.client({"type": "session.update", "event_id": "u2", "session": {
        "instructions": "x" * 100, "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}}}})
    [error] = h.session(h.error(refused, code=code, message="not applied"))
    assert error["error"]["event_id"] == "u2"
    [plain] = h.client({"type": "session.update", "event_id": "u3", "session": {"type": "realtime"}})
    assert isinstance(plain, Configure)
    [updated] = h.session(h.updated())
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert updated["session"]["audio"]["input"]["turn_detection"] is not None  # the refused null did not apply
    [audio] = h.client(append(np.zeros(2400, dtype=np.int16)))
    assert audio == AppendAudio(np.zeros(2400, dtype="<i2").tobytes())  # PCM, not decoded as mu-law


def test_a_codec_refusal_before_an_accepted_update_with_the_same_id_leaves_that_update_its_answer():
    """The codec's own refusal of an update and an accepted update with the same event id: the refusal's error
    is not taken for the accepted one's answer."""
    h = Harness()
    [accepted] = h.client({"type": "session.update", "event_id": "same", "session": {
        "audio": {"input": {"format": {"type": "audio/pcma"}}}}})
    [refused] = h.client({"type": "session.update", "event_id": "same", "session": {"type": "transcription"}})
    assert isinstance(accepted, Configure) and isinstance(refused, Malformed)
    [updated] = h.session(h.updated())
    [error] = h.session(h.error(refused))
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcma"}
    assert error["error"]["param"] == "session.type"


def test_pcm_at_another_rate_is_an_extension_the_session_resamples():
    h = Harness()
    [command] = h.client({"type": "session.update", "session": {
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}})
    assert command.audio == AudioFormat(sample_rate_hz=16_000)
    [updated] = h.codec.translate(h.updated())
    assert updated.session.audio.input.format.rate == 16_000  # outside the SDK's Literal[24000]: documented


@pytest.mark.parametrize("session, param, ga_field", [
    # What the SDK's client.beta.realtime.connect sends: the first beta field is named.
    ({"modalities": ["text"], "input_audio_format": "g711_ulaw", "turn_detection": None,
      "max_response_output_tokens": 5}, "session.modalities", "session.output_modalities"),
    ({"input_audio_format": "g711_ulaw"}, "session.input_audio_format", "session.audio.input.format"),
    ({"turn_detection": None}, "session.turn_detection", "session.audio.input.turn_detection"),
    ({"max_response_output_tokens": 5}, "session.max_response_output_tokens", "session.max_output_tokens"),
    ({"instructions": "Be brief.", "voice": "alloy"}, "session.voice", "session.audio.output.voice"),
    ({"temperature": 0.8}, "session.temperature", "no temperature"),
])
def test_a_beta_interface_session_is_refused_naming_the_ga_field(session, param, ga_field):
    """A client on the SDK's beta interface puts its settings directly under ``session``: they were dropped
    without a word, so its G.711 audio was read as PCM16 and its manual turns and cap were ignored."""
    h = Harness()
    [command] = h.client({"type": "session.update", "event_id": "beta", "session": session})
    assert isinstance(command, Malformed) and command.code == "invalid_value", command
    [frame] = h.session(h.error(command))
    assert frame["error"]["param"] == param and frame["error"]["event_id"] == "beta"
    assert "GA" in frame["error"]["message"] and ga_field in frame["error"]["message"], frame


# ---- audio and turns ----------------------------------------------------------------------------------------


def test_a_turn_detection_that_does_not_create_responses_is_manual_turns():
    """server_vad with create_response: false (the app decides when to reply) was echoed as true, and the model
    replied by itself. It is manual turns, as turn_detection: null, and is echoed as asked."""
    h = Harness()
    [command] = h.client({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "create_response": False, "interrupt_response": False}}}}})
    assert command == Configure(reply_mode="on_request", event_type="session.update")
    [frame] = h.session(h.updated(reply_mode="on_request"))
    assert frame["session"]["audio"]["input"]["turn_detection"] == {"type": "server_vad", "create_response": False}
    [command] = h.client({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad"}}}}})
    assert command == Configure(reply_mode="model", event_type="session.update")


def test_settings_refused_after_the_first_audio_are_named_as_the_realtime_api_names_them():
    """The session refuses model settings after the first audio (invalid_state); the error said
    "['system_prompt'] can only change ..." with param null. It names the Realtime fields, in param too."""
    h = Harness()
    for session, param in (({"instructions": "B"}, "session.instructions"),
                           ({"max_output_tokens": 7, "instructions": "C"}, "session.instructions"),
                           ({"audio": {"input": {"turn_detection": None}}}, "session.audio.input.turn_detection")):
        [command] = h.client({"type": "session.update", "event_id": "u1", "session": session})
        [frame] = h.session(h.error(command, code="invalid_state", message="['max_turn_tokens', 'system_prompt'] "
                                    "can only change before the first audio frame; open a new session for other "
                                    "model options"))
        assert frame["error"]["param"] == param and frame["error"]["event_id"] == "u1", frame
        assert "system_prompt" not in frame["error"]["message"] and param in frame["error"]["message"]


def test_an_update_refused_after_the_first_audio_says_its_allowed_changes_were_not_applied_either():
    """Instructions (fixed once audio flows) and the audio format (free at any time) in one update: the session
    refuses the update whole, and the error named only session.instructions, so the format change was lost
    without a word (G.711 then read as PCM16)."""
    h = Harness()
    [command] = h.client({"type": "session.update", "event_id": "u1", "session": {
        "instructions": "B", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    [frame] = h.session(h.error(command, code="invalid_state", message="['system_prompt'] can only change before "
                                "the first audio frame; open a new session for other model options"))
    message = frame["error"]["message"]
    assert frame["error"]["param"] == "session.instructions"
    assert "session.audio.input.format" in message and "not applied" in message, message


def test_g711_audio_is_decoded_before_the_session_sees_it():
    h = Harness()
    h.client({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    h.session(h.updated())
    codes = bytes([0x00, 0x7F, 0x80, 0xFF, 0x12])
    [command] = h.client(append(codes))
    assert command == AppendAudio(MULAW_TO_S16[list(codes)].astype("<i2").tobytes())


def test_commit_flushes_and_is_acknowledged_once_the_audio_is_heard():
    h = Harness()
    [empty] = h.client({"type": "input_audio_buffer.commit", "event_id": "c0"})
    assert isinstance(empty, Malformed) and empty.code == "input_audio_buffer_commit_empty"
    h.client(append(np.zeros(2400)))
    [flush] = h.client({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert flush == Flush(event_id="c1", event_type="input_audio_buffer.commit")
    frames = h.session(InputFlushedEvent(**STAMP, num_chunks=3, audio_time_s=1.2))
    assert [frame["type"] for frame in frames] == COMMIT_TYPES
    item = frames[1]["item"]
    assert frames[0]["item_id"] == item["id"] and item["role"] == "user"
    assert item["content"] == [{"type": "input_audio", "transcript": None}]
    assert h.session(InputFlushedEvent(**STAMP, num_chunks=3, audio_time_s=1.2)) == []  # nobody asked


def test_an_append_the_session_refuses_leaves_nothing_to_commit():
    """3 bytes of 16-bit PCM are no whole sample: the session refuses the frame (invalid_audio, "frame ignored"),
    so a commit after it has nothing to commit. It made a user item of nothing (and fed the model 1 s of silence)."""
    h = Harness()
    [odd] = h.client(append(b"\x01\x02\x03"))
    assert odd == AppendAudio(b"\x01\x02\x03")  # the session refuses it, in the client's order
    [commit] = h.client({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert isinstance(commit, Malformed) and commit.code == "input_audio_buffer_commit_empty", commit


def test_an_append_refused_for_a_full_buffer_is_no_audio_to_commit():
    """The session refuses a frame that would overfill its buffer (audio_buffer_full). The codec counted it as audio
    to commit: the commit after it was flushed and answered input_audio_buffer.committed, a user item of refused audio,
    and so was the next reply's begin."""
    h = Harness()
    [refused] = h.client(append(np.zeros(2400)), is_refused=True)
    assert refused == AppendAudio(bytes(4800))
    [commit] = h.client({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert isinstance(commit, Malformed) and commit.code == "input_audio_buffer_commit_empty", commit
    h.client(append(np.zeros(2400)))  # taken, then one refused: the commit holds the one taken
    h.client(append(np.zeros(2400)), is_refused=True)
    assert isinstance(h.client({"type": "input_audio_buffer.commit", "event_id": "c2"})[0], Flush)
    assert [f["type"] for f in h.session(InputFlushedEvent(**STAMP, num_chunks=1, audio_time_s=0.4))] == COMMIT_TYPES
    h.client(append(np.zeros(2400)), is_refused=True)
    [commit] = h.client({"type": "input_audio_buffer.commit", "event_id": "c3"})
    assert isinstance(commit, Malformed) and commit.code == "input_audio_buffer_commit_empty", commit
    frames = h.session(*reply(0, ["a"]))  # a reply commits the audio not committed yet first: none here
    assert [frame["type"] for frame in frames] == REPLY_TYPES[:4] + REPLY_TYPES[5:], frames


def test_clear_drops_unheard_audio_and_says_so():
    h = Harness()
    h.client(append(np.zeros(2400)))
    [clear] = h.client({"type": "input_audio_buffer.clear", "event_id": "x"})
    # The Realtime API's clear empties the buffer not committed: the session keeps a commit's chunks.
    assert clear == ClearAudio(event_id="x", event_type="input_audio_buffer.clear", keep_committed=True)
    [frame] = h.session(InputClearedEvent(**STAMP, num_chunks_dropped=1, audio_dropped_s=0.5))
    assert frame["type"] == "input_audio_buffer.cleared"
    assert isinstance(h.client({"type": "input_audio_buffer.commit"})[0], Malformed)  # nothing left to commit


def test_audio_appended_after_a_clear_is_committed_though_the_clear_is_answered_later():
    """clear, append, commit in one burst: the codec reads all three before the session answers the clear. The
    answer reset "audio to commit", so the commit's flush came back to nothing (no committed event, no error), or,
    read after that answer, the commit was refused as empty. And a commit right after a clear, with no audio since,
    must be refused as empty even before the clear is answered."""
    h = Harness()
    h.client(append(np.zeros(2400)))
    h.client({"type": "input_audio_buffer.clear", "event_id": "x"})
    h.client(append(np.zeros(9600)))
    [flush] = h.client({"type": "input_audio_buffer.commit", "event_id": "c1"})
    assert flush == Flush(event_id="c1", event_type="input_audio_buffer.commit")
    [cleared] = h.session(InputClearedEvent(**STAMP, num_chunks_dropped=0, audio_dropped_s=0.1))
    assert cleared["type"] == "input_audio_buffer.cleared"
    frames = h.session(InputFlushedEvent(**STAMP, num_chunks=2, audio_time_s=0.8))
    assert [frame["type"] for frame in frames] == COMMIT_TYPES
    h.client(append(np.zeros(2400)))
    h.client({"type": "input_audio_buffer.clear", "event_id": "y"})
    [empty] = h.client({"type": "input_audio_buffer.commit", "event_id": "c2"})
    assert isinstance(empty, Malformed) and empty.code == "input_audio_buffer_commit_empty"


def test_a_commit_is_committed_though_a_clear_follows_it_before_the_model_heard_it():
    """commit, then clear before the model had heard the committed audio: the commit was answered with an error
    saying nothing was committed (the clear dropped every chunk not heard). The session keeps a commit's chunks
    through a clear, so its flush is answered once they are heard: committed, whether the clear's answer came first
    or not, and the audio after the commit, which the clear dropped, is in no item."""
    h = Harness()
    h.session(InputClearedEvent(**STAMP, num_chunks_dropped=0, audio_dropped_s=0.0))  # the harness's own clear
    h.client(append(np.zeros(9600)))
    h.client({"type": "input_audio_buffer.commit", "event_id": "c1"})
    h.client(append(np.zeros(4800)))
    h.client({"type": "input_audio_buffer.clear", "event_id": "x"})
    [cleared] = h.session(InputClearedEvent(**STAMP, num_chunks_dropped=1, audio_dropped_s=0.4))
    assert cleared["type"] == "input_audio_buffer.cleared"
    frames = h.session(InputFlushedEvent(**STAMP, num_chunks=3, audio_time_s=1.2))
    assert [frame["type"] for frame in frames] == COMMIT_TYPES
    assert h.session(*reply(0, ["Hi"]))[0]["type"] != "input_audio_buffer.committed"  # nothing new to commit
    # A model's reply on the kept chunks before the flush is answered commits them then, once.
    h.client(append(np.zeros(9600)))
    h.client({"type": "input_audio_buffer.commit", "event_id": "c2"})
    h.client({"type": "input_audio_buffer.clear", "event_id": "y"})
    h.session(InputClearedEvent(**STAMP, num_chunks_dropped=0, audio_dropped_s=0.0))
    begin, *rest = reply(1, ["Yes"])
    assert [frame["type"] for frame in h.session(begin)] == COMMIT_TYPES
    h.session(*rest)
    assert h.session(InputFlushedEvent(**STAMP, num_chunks=7, audio_time_s=2.8)) == []


def test_a_commit_whose_audio_a_reply_committed_first_is_not_answered_again_after_a_clear():
    """commit, the model begins a reply on that audio (committed is sent then), a clear during the reply: after the
    reply the commit's flush came back, and the commit was answered with an error saying nothing was committed,
    though its audio was the reply's user item (review, round eight)."""
    h = Harness()
    h.session(InputClearedEvent(**STAMP, num_chunks_dropped=0, audio_dropped_s=0.0))  # the harness's own clear
    h.client(append(np.zeros(9600)))
    h.client({"type": "input_audio_buffer.commit", "event_id": "c1"})
    begin, *rest = reply(0, ["Hi", "!"])
    assert [frame["type"] for frame in h.session(begin)] == COMMIT_TYPES  # the commit's audio: the user item
    h.client({"type": "input_audio_buffer.clear", "event_id": "x"})
    h.session(*rest)
    [cleared] = h.session(InputClearedEvent(**STAMP, num_chunks_dropped=0, audio_dropped_s=0.0))
    assert cleared["type"] == "input_audio_buffer.cleared"
    assert h.session(InputFlushedEvent(**STAMP, num_chunks=3, audio_time_s=1.2)) == []


def test_nothing_is_sent_while_the_model_listens():
    h = Harness()
    h.client(append(np.zeros(4800)))
    decision = LiveDecisionEvent(**STAMP, chunk=0, token_id=1, decision="keep_silence", audio_time_s=0.4)
    assert h.session(decision) == []
    # At the decision to reply: the audio it was made on becomes the user's item; the response itself
    # is announced at its first token.
    frames = h.session(LiveTurnBeginEvent(**STAMP, turn=0, chunk=1, audio_time_s=0.8))
    assert [frame["type"] for frame in frames] == COMMIT_TYPES


# ---- replies ------------------------------------------------------------------------------------------------


def test_a_reply_is_the_full_realtime_sequence_in_order():
    h = Harness()
    h.client(append(np.zeros(4800)))
    frames = h.session(*reply(0, ["Hel", "lo"]))
    assert [frame["type"] for frame in frames] == COMMIT_TYPES + REPLY_TYPES
    user_item, created, done = frames[1]["item"], frames[3], frames[-1]
    response_id, item_id = created["response"]["id"], frames[4]["item"]["id"]
    assert frames[5]["previous_item_id"] == user_item["id"]
    assert all(frame.get("response_id", response_id) == response_id for frame in frames[3:])
    assert [frame["delta"] for frame in frames if frame["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert frames[-5]["text"] == "Hello" and frames[-4]["part"] == {"type": "text", "text": "Hello"}
    assert created["response"]["status"] == "in_progress" and created["response"]["metadata"] == {"emotion": "happy"}
    assert done["response"]["status"] == "completed" and done["response"]["metadata"] == {"emotion": "happy"}
    assert done["response"]["output"][0]["id"] == item_id
    assert done["response"]["output"][0]["content"] == [{"type": "output_text", "text": "Hello"}]
    assert done["response"]["usage"]["output_tokens"] == 3  # the emotion tag is a token too
    assert len({frame["event_id"] for frame in h.frames}) == len(h.frames)


def test_a_capped_reply_is_incomplete_with_reason_max_output_tokens():
    h = Harness()
    done = h.session(*reply(0, ["a", "b"], end_reason="max_tokens"))[-1]
    assert done["response"]["status"] == "incomplete"
    assert done["response"]["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}


def test_usage_totals_the_output_tokens():
    """LiveKit reads usage["total_tokens"] for its metrics (it reported 0): input tokens are not counted (docs), so
    the total is the output."""
    h = Harness()
    done = h.session(*reply(0, ["a", "b"]))[-1]  # check_frame holds usage to the SDK's RealtimeResponseUsage
    usage = done["response"]["usage"]
    assert usage["total_tokens"] == usage["output_tokens"] == 3 and usage["input_tokens"] == 0, usage


def test_response_create_forces_a_reply_carrying_the_clients_metadata_merged_with_the_emotion():
    h = Harness()
    [command] = h.client({"type": "response.create", "event_id": "r1",
                          "response": {"metadata": {"client_event_id": "r1"}, "output_modalities": ["text"]}})
    assert command == RequestReply(event_id="r1", event_type="response.create")
    [busy] = h.client({"type": "response.create", "event_id": "r2"})
    assert busy.code == "conversation_already_has_active_response" and busy.event_id == "r2"
    frames = h.session(*reply(0, ["x"], emotion="sad", requested=True))
    created = next(frame for frame in frames if frame["type"] == "response.created")
    assert created["response"]["metadata"] == {"client_event_id": "r1", "emotion": "sad"}
    later = h.session(*reply(1, ["y"], emotion=None))  # a reply the model chose: no client metadata
    assert later[0]["response"]["metadata"] is None


def test_response_create_for_audio_is_refused():
    h = Harness()
    [command] = h.client({"type": "response.create", "event_id": "r",
                          "response": {"output_modalities": ["audio"]}})
    [frame] = h.session(h.error(command))
    assert frame["error"]["code"] == "invalid_value" and frame["error"]["param"] == "response.output_modalities"
    assert isinstance(h.client({"type": "response.create"})[0], RequestReply)  # the refused one left no request


@pytest.mark.parametrize("cap, sent, reported", [
    (3, 3, 3), (1, 1, 1), (63, 63, 63),  # below the session's cap of 64: that response's own cap
    (64, 64, 64), (4096, 4096, 64), ("inf", None, 64),  # the session's cap bounds every reply
])
def test_response_create_caps_its_own_response_and_the_next_has_the_sessions_cap(cap, sent, reported):
    """response.max_output_tokens below the session's cap was refused; the Realtime API honours it for that response
    only. The engine ends the reply at that cap as at the session's (turn_end max_tokens); the response reports the
    cap in force, and a later response.create without one has the session's."""
    h = Harness()
    [command] = h.client({"type": "response.create", "event_id": "r1", "response": {"max_output_tokens": cap}})
    assert command == RequestReply(event_id="r1", event_type="response.create", max_turn_tokens=sent)
    frames = h.session(*reply(0, ["a"], end_reason="max_tokens" if reported < 64 else "text_end", requested=True))
    created, done = frames[0], frames[-1]  # no audio came: no user item before the response
    assert created["type"] == "response.created" and done["type"] == "response.done"
    assert created["response"]["max_output_tokens"] == done["response"]["max_output_tokens"] == reported
    [later] = h.client({"type": "response.create", "event_id": "r2"})
    assert later == RequestReply(event_id="r2", event_type="response.create")
    frames = h.session(*reply(1, ["b"], requested=True))
    assert frames[0]["type"] == "response.created" and frames[0]["response"]["max_output_tokens"] == 64
    assert frames[-1]["response"]["max_output_tokens"] == 64


@pytest.mark.parametrize("second", [{}, {"response": {"max_output_tokens": 5000}}])
def test_a_refused_second_request_leaves_the_first_pending(second):
    """Two response.create back to back: the codec refuses the second (or a bad value in it), and the session
    echoes that refusal. It cleared the first request too: its reply then had the session's cap and no metadata,
    and the first request had no answer at all."""
    h = Harness()
    [first] = h.client({"type": "response.create", "event_id": "r1",
                        "response": {"max_output_tokens": 3, "metadata": {"trial": "7"}}})
    assert isinstance(first, RequestReply)
    [refused] = h.client({"type": "response.create", "event_id": "r2", **second})
    assert isinstance(refused, Malformed)
    [error] = h.session(h.error(refused))
    assert error["error"]["event_id"] == "r2"
    frames = h.session(*reply(0, ["a"] * 2, end_reason="max_tokens", requested=True))
    created, done = frames[0], frames[-1]
    assert created["response"]["max_output_tokens"] == done["response"]["max_output_tokens"] == 3
    assert done["response"]["metadata"] == {"trial": "7", "emotion": "happy"}


def test_a_reply_the_model_began_before_a_request_reached_it_is_not_that_requests():
    """server_vad: the model began its own reply as a response.create was on its way. The codec matched that
    reply to the request: response.done reported the request's cap (3) and metadata on an uncapped reply, and the
    request itself was lost. The reply is the model's; the request's answer is the session's reply_in_progress,
    as the Realtime API's own refusal; after both, a new request is taken."""
    h = Harness()
    [command] = h.client({"type": "response.create", "event_id": "r1",
                          "response": {"max_output_tokens": 3, "metadata": {"topic": "weather"}}})
    assert command == RequestReply(event_id="r1", event_type="response.create", max_turn_tokens=3)
    frames = h.session(*reply(0, ["a"] * 5, requested=False))
    created, done = frames[0], frames[-1]
    assert created["type"] == "response.created" and done["type"] == "response.done"
    assert done["response"]["max_output_tokens"] == 64 and done["response"]["status"] == "completed"
    assert done["response"]["metadata"] == {"emotion": "happy"}
    [busy] = h.client({"type": "response.create", "event_id": "r2"})  # r1 still has no answer
    assert busy.code == "conversation_already_has_active_response"
    [error] = h.session(h.error(command, code="reply_in_progress", message="a reply is in progress"))
    assert error["error"]["code"] == "conversation_already_has_active_response"
    assert error["error"]["event_id"] == "r1" and error["error"]["type"] == "invalid_request_error"
    [again] = h.client({"type": "response.create", "event_id": "r3"})
    assert again == RequestReply(event_id="r3", event_type="response.create")


@pytest.mark.parametrize("cap", [0, -1, 4097])
def test_response_create_with_a_cap_out_of_range_is_refused_naming_the_field(cap):
    h = Harness()
    [command] = h.client({"type": "response.create", "event_id": "r1", "response": {"max_output_tokens": cap}})
    assert isinstance(command, Malformed) and command.code == "invalid_value", command
    [frame] = h.session(h.error(command))
    assert frame["error"]["param"] == "response.max_output_tokens" and frame["error"]["event_id"] == "r1"
    assert "1 to 4096" in frame["error"]["message"]
    assert isinstance(h.client({"type": "response.create"})[0], RequestReply)  # the refused one left no request


def test_cancel_stops_the_active_reply_and_is_refused_without_one():
    h = Harness()
    [idle] = h.client({"type": "response.cancel", "event_id": "c0"})
    assert idle.code == "response_cancel_not_active" and idle.message.startswith("Cancellation failed")
    events = reply(0, ["a", "b"], end_reason="cancelled")
    h.session(*events[:3])  # turn_begin, emotion, one delta
    [cancel] = h.client({"type": "response.cancel", "event_id": "c1"})
    assert cancel == CancelReply(event_id="c1", event_type="response.cancel")
    [wrong] = h.client({"type": "response.cancel", "response_id": "resp_other"})
    assert wrong.code == "response_cancel_not_active"
    # A second cancel of the same reply, before its response.done: the session has nothing more to do for it, and
    # it got no answer at all. It is refused as a cancel without an active response.
    [again] = h.client({"type": "response.cancel", "event_id": "c2"})
    assert isinstance(again, Malformed) and again.code == "response_cancel_not_active" and again.event_id == "c2"
    done = h.session(*events[3:])[-1]
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}


def test_a_cancel_before_the_requested_response_began_withdraws_it_and_closes_it_as_cancelled():
    """A cancel sent right after response.create (pipecat's interruption) was refused, "the requested response has
    not started yet", and the reply came all the same (realtime audit, F4). It now withdraws the request; the
    session's ReplyRequestWithdrawn closes the response the client waits for: created and done, cancelled."""
    h = Harness()
    [ask] = h.client({"type": "response.create", "event_id": "r1", "response": {"metadata": {"asked": "yes"}}})
    assert isinstance(ask, RequestReply)
    [cancel] = h.client({"type": "response.cancel", "event_id": "c1"})
    assert cancel == CancelReply(event_id="c1", event_type="response.cancel", withdraws_request=True)
    [again] = h.client({"type": "response.cancel", "event_id": "c2"})  # one cancel is on its way
    assert isinstance(again, Malformed) and again.code == "response_cancel_not_active"
    frames = h.session(ReplyRequestWithdrawn(session_id=SESSION_ID))
    assert [frame["type"] for frame in frames][0] == "response.created" and frames[-1]["type"] == "response.done"
    done = frames[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"] == {"type": "cancelled",
                                                                       "reason": "client_cancelled"}
    assert done["metadata"] == {"asked": "yes"} and done["id"] == frames[0]["response"]["id"]
    assert isinstance(h.client({"type": "response.create", "event_id": "r2"})[0], RequestReply)  # none pending


def test_a_cancel_that_meets_the_requested_reply_begun_ends_that_reply():
    """The reply began before the cancel reached the engine: the engine cuts it (its turn_end, cancelled), and a
    second cancel meanwhile is refused as one already on its way."""
    h = Harness()
    h.client({"type": "response.create", "event_id": "r1"})
    [cancel] = h.client({"type": "response.cancel", "event_id": "c1"})
    assert cancel.withdraws_request
    events = reply(0, ["a", "b"], end_reason="cancelled", requested=True)
    h.session(*events[:3])
    [again] = h.client({"type": "response.cancel", "event_id": "c2"})
    assert isinstance(again, Malformed) and again.code == "response_cancel_not_active"
    done = h.session(*events[3:])[-1]
    assert done["type"] == "response.done" and done["response"]["status"] == "cancelled"


def test_a_reply_cut_by_the_session_closing_still_ends_with_response_done():
    h = Harness()
    events = reply(0, ["a"], end_reason="session_closed", emotion=None)
    frames = h.session(*events, SessionClosedEvent(**STAMP, reason="server_shutdown", num_chunks_received=2,
                                                   num_chunks_decided=2, audio_received_s=0.8))
    assert frames[-1]["type"] == "response.done" and frames[-1]["response"]["status"] == "cancelled"


# ---- conversation items -------------------------------------------------------------------------------------


def test_conversation_items_are_acknowledged_in_event_order_with_the_clients_id():
    h = Harness()
    [ack] = h.client({"type": "conversation.item.create", "event_id": "e1", "previous_item_id": "root", "item": {
        "id": "lk_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    assert ack == AcknowledgeItem(event_id="e1", event_type="conversation.item.create")  # not a Configure
    added, done = h.session(h.acknowledged(ack))
    assert added["type"] == "conversation.item.added" and added["item"]["id"] == "lk_1"
    assert added["previous_item_id"] is None and done["type"] == "conversation.item.done"
    [ack] = h.client({"type": "conversation.item.create", "item": {
        "id": "lk_2", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}})
    assert h.session(h.acknowledged(ack))[0]["previous_item_id"] == "lk_1"
    [duplicate] = h.client({"type": "conversation.item.create", "item": {"id": "lk_1", "type": "message",
                                                                        "role": "user", "content": []}})
    assert duplicate.code == "item_create_duplicate_item_id"
    [ack] = h.client({"type": "conversation.item.delete", "item_id": "lk_2"})
    assert ack == AcknowledgeItem(event_id=None, event_type="conversation.item.delete")
    assert h.session(h.acknowledged(ack)) == [h.frames[-1]] and h.frames[-1]["type"] == "conversation.item.deleted"
    [unknown] = h.client({"type": "conversation.item.delete", "item_id": "lk_2"})
    assert unknown.code == "item_delete_invalid_item_id"
    [call] = h.client({"type": "conversation.item.create", "item": {"type": "function_call", "name": "f"}})
    assert call.code == "invalid_value"


def test_an_items_audio_part_is_echoed_with_its_transcript_not_dropped():
    """A user item's input_audio part vanished from the echo (conversation.item.added held the item without it), with
    no word: the client's history and the server's disagreed (LiveKit sends such parts for its AudioContent)."""
    h = Harness()
    audio = base64.b64encode(bytes(4800)).decode()
    [ack] = h.client({"type": "conversation.item.create", "item": {"id": "a1", "type": "message", "role": "user",
                                                                  "content": [{"type": "input_text", "text": "hi"},
                                                                              {"type": "input_audio", "audio": audio,
                                                                               "transcript": "hello"}]}})
    added, _ = h.session(h.acknowledged(ack))
    assert added["item"]["content"] == [{"type": "input_text", "text": "hi"},
                                        {"type": "input_audio", "transcript": "hello"}]


def test_an_item_the_session_refuses_is_neither_held_nor_added():
    """A closing session refuses an AcknowledgeItem with invalid_state: the item's bytes are let go and the
    item never joins the conversation, so the same id can be created again."""
    h = Harness()
    item = {"type": "conversation.item.create", "event_id": "e1", "item": {
        "id": "lk_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}
    [ack] = h.client(item)
    assert h.codec.held_bytes > 0
    [error] = h.session(h.error(ack, message="the session is closing; event ignored"))
    assert error["error"]["event_id"] == "e1" and h.codec.held_bytes == 0
    [again] = h.client(item)
    assert again == ack
    assert [frame["type"] for frame in h.session(h.acknowledged(again))] == ["conversation.item.added",
                                                                             "conversation.item.done"]


def message_item(item_id: str, previous_item_id: str | None = None, event_id: str | None = None) -> dict:
    event = {"type": "conversation.item.create", "item": {
        "id": item_id, "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}
    if previous_item_id is not None:
        event["previous_item_id"] = previous_item_id
    if event_id is not None:
        event["event_id"] = event_id
    return event


def test_an_item_after_an_unknown_item_is_refused_and_not_added():
    """SDK: "If the ID cannot be found, an error will be returned and the item will not be added." It was added
    at the tail."""
    h = Harness()
    h.session(h.acknowledged(h.client(message_item("lk_1"))[0]))
    [refused] = h.client(message_item("lk_2", previous_item_id="nope", event_id="e2"))
    assert isinstance(refused, Malformed) and refused.code == "item_create_invalid_previous_item_id", refused
    [error] = h.session(h.error(refused))
    assert error["error"]["param"] == "previous_item_id" and error["error"]["event_id"] == "e2"
    [again] = h.client(message_item("lk_2"))  # it was not added: the id is free
    assert h.session(h.acknowledged(again))[0]["previous_item_id"] == "lk_1"


def test_an_item_may_follow_one_created_in_the_same_burst():
    """LiveKit sends its history as a burst of creates, each after the one before: the earlier ones are not echoed
    yet when the later ones are read, and must count as known."""
    h = Harness()
    [first] = h.client(message_item("lk_1"))
    [second] = h.client(message_item("lk_2", previous_item_id="lk_1"))
    [deleted] = h.client({"type": "conversation.item.delete", "item_id": "lk_1"})
    [refused] = h.client(message_item("lk_3", previous_item_id="lk_1"))  # deleted in the same burst
    assert isinstance(second, AcknowledgeItem) and isinstance(deleted, AcknowledgeItem)
    assert isinstance(refused, Malformed) and refused.code == "item_create_invalid_previous_item_id"
    assert h.session(h.acknowledged(first), h.acknowledged(second))[2]["previous_item_id"] == "lk_1"


def test_an_item_inserted_before_the_tail_leaves_the_tail_where_it_was():
    """An item inserted at "root" became the tail: every later item (the client's, the user's audio, the replies)
    was announced right after it, in the middle of a mirrored history."""
    h = Harness()
    for item_id in ("lk_1", "lk_2"):
        h.session(h.acknowledged(h.client(message_item(item_id))[0]))
    first, _ = h.session(h.acknowledged(h.client(message_item("lk_0", previous_item_id="root"))[0]))
    assert first["previous_item_id"] is None
    middle, _ = h.session(h.acknowledged(h.client(message_item("lk_1b", previous_item_id="lk_1"))[0]))
    assert middle["previous_item_id"] == "lk_1"
    tail, _ = h.session(h.acknowledged(h.client(message_item("lk_3"))[0]))
    assert tail["previous_item_id"] == "lk_2"
    h.client(append(np.zeros(2400)))
    h.client({"type": "input_audio_buffer.commit"})
    committed = h.session(InputFlushedEvent(**STAMP, num_chunks=1, audio_time_s=0.4))[0]
    assert committed["previous_item_id"] == "lk_3"
    [deleted] = h.session(h.acknowledged(h.client({"type": "conversation.item.delete", "item_id": committed[
        "item_id"]})[0]))
    assert deleted["type"] == "conversation.item.deleted"
    after_delete, _ = h.session(h.acknowledged(h.client(message_item("lk_4"))[0]))
    assert after_delete["previous_item_id"] == "lk_3"  # the tail before the deleted one, not the newest insert


def test_the_item_of_the_reply_in_progress_cannot_be_deleted():
    """Deleting the streaming reply's item: its deltas went on and its conversation.item.done came after the
    conversation.item.deleted, for an item the client was told is gone."""
    h = Harness()
    events = reply(0, ["a", "b"])
    opened = h.session(*events[:3])
    item_id = next(frame["item"]["id"] for frame in opened if frame["type"] == "response.output_item.added")
    [refused] = h.client({"type": "conversation.item.delete", "event_id": "d1", "item_id": item_id})
    assert isinstance(refused, Malformed), refused
    [error] = h.session(h.error(refused))
    assert error["error"]["param"] == "item_id" and "response.cancel" in error["error"]["message"], error
    h.session(*events[3:])
    [ack] = h.client({"type": "conversation.item.delete", "event_id": "d2", "item_id": item_id})
    assert isinstance(ack, AcknowledgeItem)  # once the response is done, its item can go


def test_a_retrieve_answers_each_item_as_it_stands_in_event_order():
    """conversation.item.retrieve was answered unknown_event: pipecat (retrieve_conversation_item) takes any error it
    does not expect as fatal, ending its receive loop, and its caller waited forever."""
    h = Harness()
    [create] = h.client({"type": "conversation.item.create", "item": {
        "id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    [ask] = h.client({"type": "conversation.item.retrieve", "event_id": "r1", "item_id": "u1"})  # same burst
    assert ask == AcknowledgeItem(event_id="r1", event_type="conversation.item.retrieve")
    h.session(h.acknowledged(create))
    [retrieved] = h.session(h.acknowledged(ask))
    assert retrieved["type"] == "conversation.item.retrieved"
    assert retrieved["item"]["content"] == [{"type": "input_text", "text": "hi"}]
    events = reply(0, ["a", "b"])
    opened = h.session(*events[:3])
    item_id = next(frame["item"]["id"] for frame in opened if frame["type"] == "response.output_item.added")
    [ask] = h.client({"type": "conversation.item.retrieve", "item_id": item_id})
    [streaming] = h.session(h.acknowledged(ask))
    assert streaming["item"]["status"] == "in_progress"
    assert streaming["item"]["content"] == [{"type": "output_text", "text": "a"}]
    h.session(*events[3:])
    [ask] = h.client({"type": "conversation.item.retrieve", "item_id": item_id})
    [done] = h.session(h.acknowledged(ask))
    assert done["item"]["status"] == "completed" and done["item"]["content"][0]["text"] == "ab"
    [unknown] = h.client({"type": "conversation.item.retrieve", "event_id": "r9", "item_id": "nope"})
    [error] = h.session(h.error(unknown))
    assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (
        "item_retrieve_invalid_item_id", "item_id", "r9")  # the code pipecat's retrieve handles


def test_a_retrieve_of_an_item_older_than_the_kept_bytes_is_refused_and_its_id_still_places_items():
    h = Harness()
    h.codec.conversation.max_item_bytes = 400
    for index in range(3):
        content = [{"type": "input_text", "text": "x" * 100}]
        [create] = h.client({"type": "conversation.item.create", "item": {
            "id": f"u{index}", "type": "message", "role": "user", "content": content}})
        h.session(h.acknowledged(create))
    [ask] = h.client({"type": "conversation.item.retrieve", "event_id": "r0", "item_id": "u0"})
    [error] = h.session(h.acknowledged(ask))
    assert error["error"]["code"] == "item_retrieve_invalid_item_id" and error["error"]["event_id"] == "r0"
    [ask] = h.client({"type": "conversation.item.retrieve", "item_id": "u2"})
    assert h.session(h.acknowledged(ask))[0]["item"]["id"] == "u2"
    [create] = h.client({"type": "conversation.item.create", "previous_item_id": "u0", "item": {
        "id": "u3", "type": "message", "role": "user", "content": []}})
    assert h.session(h.acknowledged(create))[0]["previous_item_id"] == "u0"
    [delete] = h.client({"type": "conversation.item.delete", "item_id": "u2"})
    h.session(h.acknowledged(delete))
    assert "u2" not in h.codec.conversation.bodies and h.codec.conversation._body_bytes == sum(
        len(body) for body in h.codec.conversation.bodies.values())


# ---- bad frames and errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("frame, code", [
    ("not json", "invalid_json"),
    (json.dumps({"type": "output_audio_buffer.clear"}), "unknown_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_value"),
    (json.dumps({"type": "input_audio_buffer.append"}), "invalid_value"),
    (b"\x00\x01", "invalid_frame"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 70_000}), "frame_too_large"),
    ("[" * 30_000 + "]" * 30_000, "invalid_json"),  # nested deeper than any parser's recursion
    # An integer literal longer than Python's int conversion allows (4,300 digits): json.loads raises a plain
    # ValueError, which reached the transport as an exception (close 1011, or a dropped connection).
    ('{"type": "input_audio_buffer.append", "audio": "", "event_id": ' + "1" * 5000 + "}", "invalid_json"),
    # A lone surrogate escape in a text the codec echoes back: it cannot be written as JSON again.
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "a\udc00"}]}}), "invalid_json"),
    (json.dumps({"type": "response.create", "response": {"metadata": {"k\ud800": "v"}}}), "invalid_json"),
])
def test_a_bad_frame_becomes_one_error_and_nothing_else(frame, code):
    h = Harness()
    [command] = h.client(frame)
    assert isinstance(command, Malformed) and command.code == code
    [error] = h.session(h.error(command))
    assert error["type"] == "error" and error["error"]["code"] == code


def test_session_errors_keep_the_clients_event_id_and_take_the_realtime_names():
    h = Harness()
    [refused] = h.session(ErrorEvent(**STAMP, code="unauthorized", message="wrong key", is_fatal=True))
    assert refused["error"]["code"] == "invalid_api_key" and refused["error"]["type"] == "invalid_request_error"
    [failed] = h.session(ErrorEvent(**STAMP, code="model_failed", message="boom", is_fatal=True))
    assert failed["error"]["type"] == "server_error"
    [full] = h.session(ErrorEvent(**STAMP, code="audio_buffer_full", message="slow down",
                                  event_type="input_audio_buffer.append", event_id="a9"))
    assert full["error"]["event_id"] == "a9"


# ---- parsing as strictly as /v1/stream (issue 21) ----------------------------------------------------------


STRICTLY_REFUSED = {
    "duplicate key": ('{"type": "response.create", "event_id": "a", "event_id": "b"}', None),
    "duplicate nested key": ('{"type": "session.update", "session": {"instructions": "x", "instructions": "y"}}',
                             None),
    "int as a string": (json.dumps({"type": "session.update", "session": {"max_output_tokens": "100"}}),
                        "session.max_output_tokens"),
    "bool as an int": (json.dumps({"type": "session.update", "session": {"max_output_tokens": True}}),
                       "session.max_output_tokens"),
    "rate as a string": (json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {
        "type": "audio/pcm", "rate": "24000"}}}}}), "session.audio.input.format.rate"),
    "list as a string": (json.dumps({"type": "session.update", "session": {"output_modalities": "text"}}),
                         "session.output_modalities"),
    "response cap as a string": (json.dumps({"type": "response.create", "response": {"max_output_tokens": "3"}}),
                                 "response.max_output_tokens"),
    "17 metadata keys": (json.dumps({"type": "response.create", "response": {"metadata": {
        f"k{i}": "v" for i in range(17)}}}), "response.metadata"),
    "long metadata value": (json.dumps({"type": "response.create", "response": {"metadata": {"k": "v" * 513}}}),
                            "response.metadata.k"),
    "long metadata key": (json.dumps({"type": "response.create", "response": {"metadata": {"k" * 65: "v"}}}),
                          "response.metadata"),
    "long item id": (json.dumps({"type": "conversation.item.delete", "item_id": "i" * 60_000}), "item_id"),
    "long previous item id": (json.dumps({"type": "conversation.item.create", "previous_item_id": "p" * 1000,
                                          "item": {"type": "message", "role": "user", "content": []}}),
                              "previous_item_id"),
    "long response id": (json.dumps({"type": "response.cancel", "response_id": "r" * 1000}), "response_id"),
    "long call id": (json.dumps({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "c" * 1000, "output": ""}}), "item.call_id"),
}


@pytest.mark.parametrize("name", STRICTLY_REFUSED)
def test_realtime_events_are_parsed_strictly(name):
    """Duplicate keys (parsers disagree on which wins), a string or a bool where a number is meant, metadata
    past the Realtime API's 16 keys of 64/512 characters, ids past 64 characters: refused with one error event
    naming the field, as /v1/stream refuses them, never coerced or echoed."""
    frame, param = STRICTLY_REFUSED[name]
    h = Harness()
    [command] = h.client(frame)
    assert isinstance(command, Malformed) and command.code == "invalid_value", command
    [error] = h.session(h.error(command))
    assert error["error"]["param"] == param and len(error["error"]["message"]) < 300, error


@pytest.mark.parametrize("frame, code", [
    ({"type": "output_audio_buffer.clear", "event_id": "ev2"}, "unknown_event"),
    ({"type": "session.update", "event_id": "ev2", "session": {"max_output_tokens": "100"}}, "invalid_value"),
    ({"type": "input_audio_buffer.append", "event_id": "ev2"}, "invalid_value"),
    ('{"type": "session.update", "event_id": "ev2", "session": {"instructions": "x", "instructions": "y"}}',
     "invalid_value"),
])
def test_an_event_refused_as_it_is_parsed_names_its_event_id(frame, code):
    """docs/realtime.md: an error's event_id is the event_id of the client event that caused it. Events refused
    by the parser (an unknown type, a bad field, a duplicate key) answered with null."""
    h = Harness()
    [command] = h.client(frame if isinstance(frame, str) else json.dumps(frame))
    assert isinstance(command, Malformed) and command.code == code and command.event_id == "ev2", command
    [error] = h.session(h.error(command))
    assert error["error"]["event_id"] == "ev2"


@pytest.mark.parametrize("frame, field", [
    ({"type": "session.update", "session": {"output_modalities": [0] * 1000}}, "output_modalities"),
    ({"type": "session.update", "session": {"tools": [0] * 1000}}, "tools"),
    ({"type": "response.create", "response": {"output_modalities": [0] * 1000}}, "output_modalities"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [0] * 1000}},
     "content"),
])
def test_a_list_longer_than_any_client_sends_is_refused_whole(frame, field):
    """Validated item by item, a list of wrong items built one error per item (a hostile client's 49,000 took
    about 0.1 s of the event loop each frame); past its bound it is one error, saying the bound."""
    [command] = Harness().client(json.dumps({**frame, "event_id": "e1"}))
    assert isinstance(command, Malformed) and command.code == "invalid_value", command
    assert field in command.message and "at most" in command.message, command.message


@pytest.mark.parametrize("frame", [
    '{"type": "response.create", "event_id": "a", "event_id": "b"}',  # which one?
    json.dumps({"type": "nope", "event_id": "e" * 129}),  # longer than an event may carry
    json.dumps({"type": "nope", "event_id": 7}),
    json.dumps({"type": "nope", "session": {"event_id": "inner"}}),
])
def test_an_event_id_no_valid_event_could_carry_is_not_echoed(frame):
    [command] = Harness().client(frame)
    assert isinstance(command, Malformed) and command.event_id is None


def test_ids_and_types_in_error_messages_are_cut_short():
    """What a client sent is quoted in an error at most 64 characters long (an unknown event type, an item id
    the conversation does not hold), so an error never echoes a frame back."""
    h = Harness()
    [unknown] = h.client(json.dumps({"type": "x" * 60_000}))
    assert unknown.code == "unknown_event" and len(unknown.message) < 300 and len(unknown.event_type or "") <= 64
    [missing] = h.client(json.dumps({"type": "conversation.item.delete", "item_id": "i" * 64}))
    assert missing.code == "item_delete_invalid_item_id" and len(missing.message) < 200


def test_response_metadata_within_the_bounds_is_echoed_in_the_response():
    h = Harness()
    metadata = {f"k{i}": "v" * 512 for i in range(16)}
    [request] = h.client({"type": "response.create", "response": {"metadata": metadata}})
    assert isinstance(request, RequestReply)
    frames = h.session(*reply(1, ["Hi"], requested=True))
    done = next(frame for frame in frames if frame["type"] == "response.done")
    assert {key: done["response"]["metadata"][key] for key in metadata} == metadata


def test_a_flooding_client_is_told_it_is_at_fault():
    h = Harness()
    for code in ("audio_flood", "event_flood"):
        [error] = h.session(ErrorEvent(**STAMP, code=code, message="closing", is_fatal=True))
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["code"] == code


@pytest.mark.parametrize("frame", ["[0]", "[]", "[[\"event_id\", \"x\"]]", "0", "\"text\"", "null"])
def test_json_that_is_not_an_object_is_refused_as_an_event_not_an_internal_error(frame):
    """A JSON array raised inside the lookup of the refused frame's event_id, and the session ended with
    internal_error (1011), a traceback logged per frame (hostile probe, 2026-12-06); an array of pairs had its
    "event_id" echoed as if it were an object's."""
    [command] = Harness().client(frame)
    assert isinstance(command, Malformed) and command.code == "invalid_value" and command.event_id is None, command
    assert "valid dictionary or object" in command.message


def test_a_model_setting_the_session_refuses_as_a_value_names_the_field_the_client_sent():
    """An ``instructions`` too long for the context was refused with invalid_value and no ``param``, where the SDKs
    key on it (probe, round six); an item of another type said "(role None)"."""
    h = Harness()
    [command] = h.client({"type": "session.update", "event_id": "u1", "session": {"instructions": "x" * 8000}})
    [error] = h.session(h.error(command, code="invalid_value", message="max_turn_tokens 512 with a 8005-token "
                                "prompt does not fit the 4096-position context budget"))
    assert error["error"]["param"] == "session.instructions", error
    [call] = h.client({"type": "conversation.item.create", "item": {"type": "function_call", "name": "f"}})
    assert "role" not in call.message and "function_call" in call.message, call.message


def test_a_session_update_is_compared_with_the_session_as_it_stands_not_with_the_last_answer_sent():
    """Two updates in one burst, their answers not sent yet (the client has not read what came before them):
    turn_detection null, then server_vad. The second was compared with the last session.updated *sent*, which still
    said server_vad, so it changed nothing and the session stayed in manual turns while the client was told
    server_vad (hostile probe, round fourteen). The session applies each Configure as it is decoded."""
    from audio_interaction_server.api.commands import Unset
    from audio_interaction_server.api.realtime.codec import SessionNow

    codec = RealtimeCodec(max_frame_bytes=64 * 1024)
    options, audio_format = SessionOptions(), AudioFormat()
    codec.follow(lambda: 0.0, lambda: SessionNow(options, audio_format))
    codec.encode(SessionCreatedEvent(**STAMP, model="tiny", is_demo=True, audio=AudioFormat(), options=settings(),
                                     limits=SessionLimits(max_frame_bytes=1, max_buffered_audio_s=1, idle_timeout_s=1,
                                                          max_session_s=1, chunk_s=0.4)))
    asked = []
    for turn_detection in (None, {"type": "server_vad"}):
        update = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": turn_detection}}}}
        for command in codec.decode(json.dumps(update)):
            assert isinstance(command, Configure)
            if not isinstance(command.audio, Unset):
                audio_format = command.audio
            if not isinstance(command.reply_mode, Unset):  # applied at once, as the session does
                options = options.model_copy(update={"reply_mode": command.reply_mode})
                asked.append(command.reply_mode)
    assert asked == ["on_request", "model"]
    assert options.reply_mode == "model"


def test_the_items_kept_for_a_retrieve_take_the_memory_their_bound_counts():
    """The bound counted each kept item's JSON in UTF-8 bytes but kept it as a str: with one emoji in it, CPython
    stores every character in 4 bytes, and 1 MiB of items held about 4 MiB (hostile probe, round thirteen)."""
    import sys

    from audio_interaction_server.api.realtime.events import MessageItem, TextContent
    from audio_interaction_server.api.realtime.replies import Conversation

    conversation = Conversation(max_item_bytes=64 * 1024)
    for i in range(8):  # 8 x ~20 KB: the oldest are forgotten past 64 KiB
        item = MessageItem(id=f"item_{i}", role="user", content=[TextContent(type="input_text",
                                                                            text="\U0001F600" + "a" * 20_000)])
        conversation.add(item.id, item)
    held = sum(sys.getsizeof(body) for body in conversation.bodies.values())
    assert held <= conversation.max_item_bytes + 100 * len(conversation.bodies), held
    assert conversation.item("item_7").content[0].text.startswith("\U0001F600")


def test_a_request_the_models_own_reply_overtook_is_refused_in_the_realtime_dialects_words():
    """The session's refusal told a Realtime client to send the request again "after the reply's turn_end", an event
    of /v1/stream it never sees (first-hour review, round sixteen). It names the response in progress and its
    response.done."""
    from audio_interaction_server.api.session import REPLY_IN_PROGRESS_MESSAGE

    h = Harness()
    [command] = h.client({"type": "response.create", "event_id": "r1"})
    frames = h.session(*reply(0, ["a"], requested=False)[:2])  # the model's own reply has begun
    response_id = next(frame for frame in frames if frame["type"] == "response.created")["response"]["id"]
    [error] = h.session(h.error(command, code="reply_in_progress", message=REPLY_IN_PROGRESS_MESSAGE))
    message = error["error"]["message"]
    assert "turn_end" not in message and "response.done" in message and response_id in message, message
