"""The per-connection session without sockets: the real tiny model's worker stepped in this thread,
time passed in as numbers."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest

from audio_interaction_server.audio.files import load_audio_file
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.events import EndCode, ReplyWaitsForAudio, SessionEnded, TurnBegin
from audio_interaction_server.spec import KEEP_SILENCE, TEXT_BEGIN
from audio_interaction_server.render.segmenter import Segmenter
from audio_interaction_server.protocol import CloseCode
from audio_interaction_server.api.commands import AcknowledgeItem, ClearAudio, Configure
from audio_interaction_server.api.native import NativeCodec
from audio_interaction_server.api.realtime.codec import RealtimeCodec
from audio_interaction_server.api.session import CLOSE_CODE_OF_END, ModelInfo, Session
from audio_interaction_server.config import ServerConfig
from audio_interaction_server.engine.worker import Worker

WALL_EPOCH_S = 1_800_000_000.0


class Harness:
    """A session wired to a synchronous worker: ``run()`` steps the model until it is idle."""

    def __init__(self, tiny_model, worker: Worker | None = None, session_id: str = "s1", **settings) -> None:
        settings.setdefault("session", {"max_turn_tokens": 40})
        self.config = ServerConfig(engine={"max_sessions": 2}, **settings)
        self.worker = worker or Worker(tiny_model, EngineConfig(max_sessions=2))
        self.now_s = 0.0
        self.events: list = []
        self.holding: list | None = None
        model = ModelInfo(tiny_model.name, False, tiny_model.tokenizer)
        self.session = Session(session_id, self.config, model, self.worker, self._emit, self.now_s,
                               wall_clock=lambda: WALL_EPOCH_S + self.now_s)
        self.events += self.session.start()
        self.codec = NativeCodec(self.config.max_frame_bytes)

    def _emit(self, engine_events) -> None:  # the worker calls this; here on this very thread
        if self.holding is not None:  # events on their way from the worker thread, not delivered yet
            self.holding.append(engine_events)
            return
        self.events += self.session.on_engine_events(engine_events, self.now_s)

    def send(self, event: dict | str) -> list:
        """A text frame, through the /v1/stream codec as the app decodes it."""
        return self._receive(event if isinstance(event, str) else json.dumps(event))

    def audio(self, data: bytes | np.ndarray) -> list:
        return self._receive(data if isinstance(data, bytes) else data.tobytes())

    def _receive(self, message: str | bytes) -> list:
        new = [event for command in self.codec.decode(message) for event in self.session.handle(command, self.now_s)]
        self.events += new
        return new

    def run(self) -> None:
        self.worker.run_until_idle()

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.type == kind]


@pytest.fixture(scope="module")
def speech(shared_audio) -> np.ndarray:
    """3.3 s of real audio, 16 kHz float32, on which the tiny model replies."""
    return load_audio_file(shared_audio / "01_count_bark" / "sample01_01.mp3")


def s16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def test_created_reports_model_format_options_and_limits(tiny_model):
    h = Harness(tiny_model, max_frame_bytes=4096, idle_timeout_s=7)
    (created,) = h.events
    assert created.type == "session.created" and created.session_id == "s1" and created.model == tiny_model.name
    assert created.audio.sample_format == "pcm_s16le" and created.audio.sample_rate_hz == 16_000
    assert created.options.max_turn_tokens == 40 and created.options.decision_events is False
    assert created.limits.max_frame_bytes == 4096 and created.limits.idle_timeout_s == 7
    assert created.server_time_ms == WALL_EPOCH_S * 1000


BAD_FRAMES = {
    "not json": ("{", "invalid_json"),
    "not an object": ("[1, 2]", "invalid_event"),
    "out of range": ('{"type": "input.flush", "trailing_silence_s": 60}', "invalid_event"),
    "unknown field": ('{"type": "session.configure", "colour": "blue"}', "invalid_event"),
    "bad sampling": ('{"type": "session.configure", "sampling": {"top_p": 0}}', "invalid_event"),
    "bad format": ('{"type": "session.configure", "audio": {"sample_format": "mp3"}}', "invalid_event"),
    "unknown type": ('{"type": "telepathy"}', "unknown_event"),
    "no type": ('{"kind": "input.flush"}', "invalid_event"),
    "odd bytes": (b"\x00\x00\x00", "invalid_audio"),
    "nan f32": (np.full(4, np.nan, dtype="<f4").tobytes(), "invalid_audio"),
    "big audio": (b"\x00" * 4098, "frame_too_large"),
    "big text": ("\u00e9" * 2049, "frame_too_large"),  # 2049 characters, 4098 bytes: the limit is in bytes
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_frames_get_an_error_and_the_session_goes_on(tiny_model, name):
    frame, code = BAD_FRAMES[name]
    h = Harness(tiny_model, max_frame_bytes=4096)
    if name == "nan f32":
        h.send({"type": "session.configure", "audio": {"sample_format": "pcm_f32le"}})
    out = h.audio(frame) if isinstance(frame, bytes) else h.send(frame)
    assert [(e.type, e.code, e.is_fatal) for e in out] == [("error", code, False)], out
    assert h.session.close_code is None
    assert h.send({"type": "session.configure", "decision_events": True})[0].type == "session.updated"


def test_absurd_float_samples_get_invalid_audio_and_the_session_goes_on(tiny_model, speech):
    """A pcm_f32le frame of 1e20 is no microphone's: refused as invalid_audio, not fed to the model
    (where its power spectrum overflows and the session would end with numerical_error/1011)."""
    h = Harness(tiny_model)
    h.send({"type": "session.configure", "decision_events": True, "audio": {"sample_format": "pcm_f32le"}})
    out = h.audio(np.full(6400, 1e20, dtype="<f4"))
    assert [(e.type, e.code, e.is_fatal) for e in out] == [("error", "invalid_audio", False)], out
    h.audio(speech[:12800].astype("<f4"))
    h.send({"type": "input.flush", "trailing_silence_s": 0})
    h.run()
    assert h.session.close_code is None and [e.code for e in h.of("error")] == ["invalid_audio"]
    assert h.session.audio.audio_received_s == pytest.approx(0.8)  # the refused frame is not counted as heard
    assert [d.chunk for d in h.of("decision")] == [0, 1]


def test_error_names_the_event_that_caused_it(tiny_model):
    h = Harness(tiny_model)
    h.audio(np.zeros(800, dtype="<i2"))
    (error,) = h.send({"type": "session.configure", "event_id": "c7", "system_prompt": "Be brief."})
    assert (error.code, error.event_type, error.event_id) == ("invalid_state", "session.configure", "c7")


@pytest.mark.parametrize("frame, code", [
    ('{"type": "session.configure", "event_id": "e1", "max_turn_tokens": 0}', "invalid_event"),
    ('{"type": "input.flush", "event_id": "e1", "trailing_silence_s": -1}', "invalid_event"),
    ('{"type": "session.configure", "event_id": "e1", "colour": "blue"}', "invalid_event"),
    ('{"type": "session.configure", "event_id": "e1", "decision_events": true, "decision_events": false}',
     "invalid_event"),
    ('{"type": "telepathy", "event_id": "e1"}', "unknown_event"),
])
def test_an_event_refused_as_malformed_still_has_its_event_id_echoed(tiny_model, frame, code):
    """docs/protocol.md: an event's ``event_id`` is echoed by an error it causes, a malformed event's too."""
    h = Harness(tiny_model)
    (error,) = h.send(frame)
    assert (error.code, error.event_id) == (code, "e1")


@pytest.mark.parametrize("frame", [
    '{"type": "session.configure", "event_id": "' + "x" * 65 + '", "colour": "blue"}',  # over the id's 64
    '{"type": "session.configure", "event_id": 7, "colour": "blue"}',
    '{"type": "session.configure", "event_id": "a\\udc00", "colour": "blue"}',  # no text: cannot be written back
    '["session.configure"]',
])
def test_an_event_id_that_is_itself_refused_is_not_echoed(tiny_model, frame):
    h = Harness(tiny_model)
    (error,) = h.send(frame)
    assert error.type == "error" and error.event_id is None


@pytest.mark.parametrize("frame", [
    json.dumps({"type": "y" * 250_000}),
    json.dumps({"type": "session.configure", "k" * 250_000: 1}),
])
def test_an_error_quotes_what_the_client_sent_at_most_64_characters_long(tiny_model, frame):
    """An unknown event type of 250,000 characters was quoted whole in the error's message and again as its
    event_type: 500 KB answered a 250 KB frame (probe, round eight). /v1/realtime quotes 64 characters at most;
    so does /v1/stream now, an unknown key included."""
    h = Harness(tiny_model)
    (error,) = h.send(frame)
    assert error.code in ("unknown_event", "invalid_event")
    assert len(error.message) < 400 and len(error.event_type or "") <= 64, (len(error.message), error.event_type)


def test_a_close_the_engine_never_confirms_is_closed_after_the_grace_and_logged(tiny_model, speech, caplog):
    """A close waits for the engine's last events; one the engine never confirms (its worker stalled) was closed
    after CLOSE_GRACE_S with nothing logged, and an operator had no line to tell a stalled engine from a client
    that went quiet (the resume-stall hunt of round eight: the machine was out of memory)."""
    from audio_interaction_server.api.session import CLOSE_GRACE_S

    h = Harness(tiny_model)
    h.audio(speech[:6400])  # 0.4 s: the engine's session opens
    h.send({"type": "session.close"})  # the worker is not run: nothing confirms the close
    assert not h.of("session.closed")
    with caplog.at_level(logging.WARNING, logger="audio_interaction_server.api.session"):
        assert h.session.poll(h.now_s + CLOSE_GRACE_S / 2) == []
        closed = h.session.poll(h.now_s + CLOSE_GRACE_S + 0.1)
    assert [event.type for event in closed] == ["session.closed"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "s1" in warnings[0] and "did not confirm" in warnings[0], warnings


def test_an_empty_audio_frame_changes_nothing_so_options_stay_open(tiny_model):
    """A 0-byte binary frame holds no audio: it neither opens the model's session (after which the model options
    are fixed) nor counts as audio. Likewise a flush with nothing to flush."""
    h = Harness(tiny_model)
    assert h.audio(b"") == []
    (flushed,) = h.send({"type": "input.flush", "trailing_silence_s": 0})
    assert flushed.type == "input.flushed"
    (updated,) = h.send({"type": "session.configure", "max_turn_tokens": 8})
    assert updated.type == "session.updated" and updated.options.max_turn_tokens == 8
    assert h.session.audio.audio_received_s == 0.0


def test_model_options_apply_before_audio_and_null_resets_them(tiny_model):
    h = Harness(tiny_model)
    (updated,) = h.send({"type": "session.configure", "system_prompt": "Be brief.", "max_turn_tokens": 7,
                         "sampling": {"temperature": 0.7, "seed": 3}})
    assert updated.options.system_prompt == "Be brief." and updated.options.max_turn_tokens == 7
    assert updated.options.sampling.temperature == 0.7 and updated.options.sampling.seed == 3
    (updated,) = h.send({"type": "session.configure", "system_prompt": None, "sampling": None})
    assert updated.options.system_prompt is None and updated.options.sampling.temperature == 0.0
    assert updated.options.max_turn_tokens == 7  # left out = unchanged
    assert h.session.options.max_turn_tokens == 7


def test_options_that_cannot_fit_the_context_budget_are_refused_at_configure(tiny_model):
    h = Harness(tiny_model)
    (error,) = h.send({"type": "session.configure", "max_turn_tokens": 4096})
    assert error.type == "error" and error.code == "invalid_event" and "does not fit" in error.message
    (error,) = h.send({"type": "session.configure", "max_turn_tokens": 3000})
    assert "too large for context rollover" in error.message and not error.is_fatal
    assert h.session.options.max_turn_tokens == 40  # unchanged; the session goes on
    (updated,) = h.send({"type": "session.configure", "max_turn_tokens": 1000})
    assert updated.options.max_turn_tokens == 1000


def test_decisions_turns_segments_and_flush_on_real_audio(tiny_model, speech):
    h = Harness(tiny_model)
    h.send({"type": "session.configure", "decision_events": True})
    for start in range(0, len(speech), 1600):  # 0.1 s frames
        h.audio(s16(speech[start:start + 1600]))
        h.now_s += 0.1
    h.send({"type": "input.flush"})
    h.now_s += 0.5
    h.run()
    decisions = h.of("decision")
    num_chunks = int(np.ceil((len(speech) + 16_000) / 6400))  # audio + 1 s of silence, padded to 0.4 s
    assert [d.chunk for d in decisions] == list(range(num_chunks))
    assert h.types()[-1] == "input.flushed" and h.events[-1].num_chunks == num_chunks
    turns = h.of("turn_end")
    assert turns and len(turns) == len(h.of("turn_begin"))
    for end in turns:  # segments cover the reply's text, in order, without the whitespace between them
        segments = [s.text for s in h.of("segment") if s.turn == end.turn]
        assert "".join(segments) == "".join(end.text.split()) or \
            " ".join(segments).split() == end.text.split()
        assert [s.index for s in h.of("segment") if s.turn == end.turn] == list(range(len(segments)))
    # Onset latency: from the push of the triggering chunk's last frame to the turn_begin.
    assert all(b.onset_latency_ms >= 500 for b in h.of("turn_begin"))


def test_decision_events_are_off_by_default(tiny_model, speech):
    h = Harness(tiny_model)
    h.audio(s16(speech))
    h.run()
    assert h.of("decision") == [] and h.session.num_chunks_decided > 0


def test_idle_timeout_closes_with_an_error_and_4000(tiny_model):
    h = Harness(tiny_model, idle_timeout_s=10)
    h.now_s = 9.5
    assert h.session.poll(h.now_s) == []
    h.audio(np.zeros(8000, dtype="<i2"))  # activity resets the clock, and opens the engine session
    h.now_s = 19.0
    assert h.session.poll(h.now_s) == []
    h.now_s = 19.6
    out = h.session.poll(h.now_s)
    assert [(e.type, getattr(e, "code", None), getattr(e, "is_fatal", None)) for e in out] == [
        ("error", "idle_timeout", True)]
    h.events += out
    h.run()  # the engine confirms the close; only then comes session.closed
    assert h.types()[-1] == "session.closed" and h.events[-1].reason == "idle_timeout"
    assert h.session.close_code == CloseCode.IDLE


def test_max_session_length_closes_with_4001(tiny_model):
    h = Harness(tiny_model, max_session_s=60, idle_timeout_s=1000)
    h.now_s = 61
    out = h.session.poll(h.now_s)
    assert [e.type for e in out] == ["error", "session.closed"]  # no engine session to wait for
    assert out[0].code == "session_too_long" and h.session.close_code == CloseCode.SESSION_LIMIT


def test_buffered_audio_limit_refuses_frames_until_the_model_catches_up(tiny_model):
    h = Harness(tiny_model, max_buffered_audio_s=1.0)
    frame = np.zeros(3200, dtype="<i2")  # 0.2 s
    accepted = sum(h.audio(frame) == [] for _ in range(10))
    errors = h.of("error")
    assert accepted == 5 and len(errors) == 5, "exactly 1.0 s is accepted, counting the partial chunk"
    assert all(e.code == "audio_buffer_full" and not e.is_fatal for e in errors)
    h.run()  # the model hears what is queued; audio is accepted again
    assert h.audio(frame) == [] and h.session.num_chunks_pending == 0
    h.send({"type": "session.close"})
    h.run()
    closed = h.events[-1]
    assert closed.type == "session.closed" and closed.audio_received_s == pytest.approx(0.2 * (accepted + 1))


def test_close_mid_reply_ends_the_turn_then_reports_unheard_audio(tiny_model, speech):
    h = Harness(tiny_model, session={"max_turn_tokens": 512})
    h.audio(s16(speech))
    while not h.of("turn_begin"):  # step until the model starts speaking, with audio still queued
        assert h.worker.step() is not None, "the tiny model never replied"
    h.send({"type": "session.close"})
    h.run()
    assert h.types()[-2:] == ["turn_end", "session.closed"]
    closed = h.events[-1]
    assert h.events[-2].end_reason in ("session_closed", "text_end") and closed.reason == "client_closed"
    assert closed.num_chunks_decided < closed.num_chunks_received  # cut audio is reported, not lost silently
    assert h.session.close_code == CloseCode.NORMAL
    assert h.send({"type": "input.flush"}) == [] and h.audio(b"\x00\x00") == []  # a closed session is inert


def test_abort_frees_the_engine_slot(tiny_model, speech):
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    first = Harness(tiny_model, worker=worker, session_id="a")
    first.audio(s16(speech[:16000]))
    worker.step()
    assert worker.num_sessions == 1
    assert [e.reason for e in first.session.abort()] == ["disconnected"]
    second = Harness(tiny_model, worker=worker, session_id="b")
    second.audio(s16(speech[:16000]))
    second.run()
    assert second.of("error") == [] and worker.num_sessions == 1


def test_engine_refusal_and_failure_close_with_their_codes(tiny_model, speech):
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    holder = Harness(tiny_model, worker=worker, session_id="a")
    holder.audio(s16(speech[:8000]))
    refused = Harness(tiny_model, worker=worker, session_id="b")
    refused.audio(s16(speech[:8000]))
    refused.run()
    assert [e.type for e in refused.events[1:]] == ["error", "session.closed"]
    assert refused.events[1].code == "capacity" and refused.session.close_code == CloseCode.TRY_AGAIN
    out = holder.session.on_engine_events([SessionEnded("numerical_error", "non-finite logits")], holder.now_s)
    assert [e.type for e in out] == ["error", "session.closed"] and out[0].is_fatal
    assert holder.session.close_code == CloseCode.INTERNAL


def test_changing_the_audio_format_mid_stream_continues_the_same_16k_stream(tiny_model, speech):
    """Mono, then the same samples as identical stereo channels: the model hears one unbroken stream."""
    def run(switch: bool):
        h = Harness(tiny_model)
        h.send({"type": "session.configure", "decision_events": True, "audio": {"sample_format": "pcm_f32le"}})
        half = 6400 * 3 + 1234  # mid-chunk, so the switch falls inside a chunk's samples
        h.audio(speech[:half].astype("<f4"))
        rest = speech[half:].astype("<f4")
        if switch:
            h.send({"type": "session.configure", "audio": {"sample_format": "pcm_f32le", "num_channels": 2}})
            rest = np.repeat(rest, 2)  # interleaved L R with L == R: the mean is exactly the sample
        for start in range(0, len(rest), 8000):
            h.audio(rest[start:start + 8000])
        h.send({"type": "input.flush"})
        h.run()
        assert h.of("error") == []
        return [(e.type, getattr(e, "token_id", None), getattr(e, "token_ids", None)) for e in h.events
                if e.type in ("decision", "turn_end")]

    assert run(switch=True) == run(switch=False)


def test_flush_silence_counts_against_the_buffered_audio_limit(tiny_model):
    """A flood of input.flush (tiny frames, each asking for 10 s of silence) is bounded like audio:
    a flush whose silence would take the queue past max_buffered_audio_s gets audio_buffer_full."""
    h = Harness(tiny_model, max_buffered_audio_s=3.0, flood={"event_burst": 1000})  # 601 events, none a flood
    limit_chunks = int(3.0 / 0.4)
    refused = []
    for i in range(300):
        out = h.send({"type": "input.flush", "event_id": f"f{i}", "trailing_silence_s": 10})
        refused += [e for e in out if e.type == "error"]
    assert len(refused) == 300, "10 s of silence never fits a 3 s buffer"
    assert all((e.code, e.event_type, e.is_fatal) == ("audio_buffer_full", "input.flush", False) for e in refused)
    assert refused[-1].event_id == "f299"
    for _ in range(300):  # 1 s flushes fit until the queue is full
        h.send({"type": "input.flush", "trailing_silence_s": 1.0})
    assert 0 < h.session.num_chunks_pending <= limit_chunks  # chunks handed to the engine, not yet decided
    assert h.session.buffered_audio_s <= 3.0 + 1e-9
    h.run()  # once the model has heard the queue, a flush fits again
    assert h.session.num_chunks_pending == 0
    assert [e.type for e in h.send({"type": "input.flush", "trailing_silence_s": 1.0})] == []
    h.run()
    assert h.types()[-1] == "input.flushed" and h.session.close_code is None


def test_flush_of_an_empty_stream_reports_at_once(tiny_model):
    h = Harness(tiny_model)
    (flushed,) = h.send({"type": "input.flush", "trailing_silence_s": 0})
    assert flushed.type == "input.flushed" and flushed.num_chunks == 0


def test_every_engine_end_code_has_one_close_code():
    assert set(CLOSE_CODE_OF_END) == set(EndCode)
    assert all(isinstance(code, CloseCode) for code in CLOSE_CODE_OF_END.values())


def test_on_request_mode_listens_until_a_reply_is_requested(tiny_model, speech):
    """reply_mode on_request: speech on which the model replies by itself gets no reply; response.create
    then gets exactly one, at the next chunk (one of silence: none was waiting)."""
    asked = Harness(tiny_model)
    (updated,) = asked.send({"type": "session.configure", "reply_mode": "on_request", "decision_events": True})
    assert updated.options.reply_mode == "on_request"
    asked.audio(s16(speech))
    asked.send({"type": "input.flush", "trailing_silence_s": 0})
    asked.run()
    by_itself = Harness(tiny_model)
    by_itself.audio(s16(speech))
    by_itself.send({"type": "input.flush", "trailing_silence_s": 0})
    by_itself.run()
    assert by_itself.of("turn_begin"), "the tiny model replies to this audio by itself"
    assert asked.of("turn_begin") == [] and all(d.token_id == KEEP_SILENCE for d in asked.of("decision"))
    heard = len(asked.of("decision"))
    assert asked.send({"type": "response.create", "event_id": "r1"}) == []
    asked.run()
    (begin,) = asked.of("turn_begin")
    assert begin.chunk == heard, "the reply starts at the chunk after the request"
    assert asked.of("decision")[-1].token_id == TEXT_BEGIN and asked.of("turn_end")
    assert asked.of("error") == [] and asked.session.close_code is None


def test_response_create_forces_a_reply_where_the_model_would_listen(tiny_model, speech):
    h = Harness(tiny_model, decision_events=True)
    h.audio(s16(speech[:8000]))  # one whole chunk, on which the tiny model listens, and a partial one
    h.run()
    assert [d.token_id for d in h.of("decision")] == [KEEP_SILENCE] and h.of("turn_begin") == []
    h.send({"type": "response.create"})
    h.send({"type": "response.create"})  # a second request before the reply: still one reply
    h.run()
    assert [(b.turn, b.chunk) for b in h.of("turn_begin")] == [(0, 1)]
    assert h.of("turn_end")[0].end_reason in ("text_end", "max_tokens") and h.of("error") == []


def test_a_requested_reply_begins_when_the_chunks_it_counted_on_were_decided_on_the_way(tiny_model, speech):
    """The session counts a chunk as waiting whose decision is still on its way from the worker thread; a
    request then pushes no chunk of its own while the engine's queue is empty. The engine says so
    (ReplyWaitsForAudio) and the session answers with a chunk: the reply begins (manual turns hung)."""
    h = Harness(tiny_model, decision_events=True)
    h.audio(s16(speech[:8000]))  # one whole chunk, on which the tiny model listens, and a partial one
    h.holding = []
    h.run()  # decided; the decision is held on its way to the session
    assert h.session.num_chunks_pending == 1
    assert h.send({"type": "response.create"}) == []
    h.run()
    held, h.holding = h.holding, None
    for engine_events in held:
        h._emit(engine_events)
    h.run()
    assert [(b.turn, b.chunk) for b in h.of("turn_begin")] == [(0, 1)]
    assert h.of("turn_end")[0].end_reason in ("text_end", "max_tokens") and h.of("error") == []


def test_a_request_whose_chunk_is_on_its_way_gets_no_second_chunk(tiny_model, speech):
    """The session pushed a chunk with its request; the engine read the request first and said
    ReplyWaitsForAudio. A second chunk would put silence into the model's stream that a run without the
    race does not have (the same audio must give the same replies)."""
    h = Harness(tiny_model, decision_events=True)
    h.audio(s16(speech[:8000]))
    h.run()
    h.send({"type": "response.create"})  # nothing pending: the partial chunk is padded and pushed
    assert h.session.num_chunks_pending == 1
    h.events += h.session.on_engine_events([ReplyWaitsForAudio()], h.now_s)
    assert h.session.num_chunks_pending == 1 and h.session.audio.num_chunks_pushed == 2
    h.run()
    assert [(b.turn, b.chunk) for b in h.of("turn_begin")] == [(0, 1)]


def test_a_request_the_models_own_reply_overtook_gets_reply_in_progress(tiny_model, speech):
    """The model began its own reply while response.create was on its way to the engine: the session, not yet
    told, sent the request; the engine dropped it (one reply at a time) without a word. A Realtime client then
    had its request matched to the model's reply and lost. The begun reply now says it was not requested, the
    dropped request gets ``reply_in_progress`` with its event id, and the next request after the reply works."""
    h = Harness(tiny_model, decision_events=True)
    h.audio(s16(speech))
    h.holding = []  # the model's decisions (and its turn_begin) are on their way to the session
    while not any(isinstance(e, TurnBegin) for events in h.holding for e in events):
        assert h.worker.step() is not None, "the tiny model replies to this audio by itself"
    assert h.send({"type": "response.create", "event_id": "r1"}) == []  # the session thinks the model listens
    assert h.send({"type": "response.create", "event_id": "r1b"}) == []  # the same request, to the session
    h.worker.step()  # the engine reads the request mid-reply
    held, h.holding = h.holding, None
    for engine_events in held:
        h._emit(engine_events)
    (begin,) = h.of("turn_begin")
    assert begin.requested is False
    # Each response.create gets its answer: the second was merged into the first, so it was dropped with it.
    assert [(e.code, e.event_id, e.event_type, e.is_fatal) for e in h.of("error")] == [
        ("reply_in_progress", "r1", "response.create", False), ("reply_in_progress", "r1b", "response.create", False)]
    h.run()
    assert h.of("turn_end") and h.session.close_code is None
    h.send({"type": "response.create", "event_id": "r2"})  # not taken for a duplicate of the dropped one
    h.run()
    assert [b.requested for b in h.of("turn_begin")][-1] is True and len(h.of("error")) == 2


def test_response_create_while_a_reply_runs_is_refused_with_reply_in_progress(tiny_model, speech):
    h = Harness(tiny_model)
    h.audio(s16(speech))
    h.holding = []
    while not any(isinstance(e, TurnBegin) for events in h.holding for e in events):
        assert h.worker.step() is not None
    held, h.holding = h.holding, None
    for engine_events in held:
        h._emit(engine_events)
    (refused,) = h.send({"type": "response.create", "event_id": "r1"})
    assert (refused.type, refused.code, refused.event_id, refused.is_fatal) == (
        "error", "reply_in_progress", "r1", False)


def test_a_withdrawn_request_leaves_no_error_and_the_next_one_is_taken(tiny_model, speech):
    h = Harness(tiny_model, decision_events=True, session={"max_turn_tokens": 40, "reply_mode": "on_request"})
    h.audio(s16(speech[:6400]))
    h.run()
    h.send({"type": "response.create", "event_id": "r1"})
    h.send({"type": "response.cancel", "event_id": "c1"})  # before the reply began: withdrawn
    h.run()
    assert h.of("turn_begin") == [] and h.of("error") == []
    h.send({"type": "response.create", "event_id": "r2"})
    h.run()
    assert [b.requested for b in h.of("turn_begin")] == [True] and h.of("error") == []


def test_sessions_from_one_ipv6_64_share_the_engines_prefill_budget(tiny_model):
    """An IPv6 client holds a /64: its sessions reached the engine's prefill budget by their whole address, so it
    had a fresh budget at each address it took. Another /64 is another client."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=3, prefill_token_burst_per_ip=200,
                                             prefill_tokens_per_s_per_ip=1.0))
    closed = {}
    for n, address in enumerate(["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:2::1"]):
        h = Harness(tiny_model, worker=worker, session_id=f"s{n}")
        h.session.client_address = address
        h.send({"type": "session.configure", "system_prompt": f"Prompt {n}: " + "word " * 100})
        h.audio(np.zeros(6400, dtype="<i2"))
        h.run()
        closed[address] = [e.code for e in h.of("error")]
    assert closed == {"2001:db8:0:1::1": [], "2001:db8:0:1::2": ["rate_limited"], "2001:db8:0:2::1": []}


def test_input_clear_drops_the_audio_the_model_has_not_heard(tiny_model, speech):
    h = Harness(tiny_model, decision_events=True)
    (cleared,) = h.send({"type": "input.clear"})  # nothing reached the model yet: answered at once
    assert (cleared.type, cleared.num_chunks_dropped, cleared.audio_dropped_s) == ("input.cleared", 0, 0.0)
    h.audio(s16(speech[:int(2.1 * 16000)]))  # 5 whole chunks queued, 0.1 s in the partial one
    assert h.session.num_chunks_pending == 5
    assert h.send({"type": "input.clear"}) == []  # the engine says what it dropped
    h.run()
    cleared = h.of("input.cleared")[-1]
    assert cleared.num_chunks_dropped == 5 and cleared.audio_dropped_s == pytest.approx(2.1, abs=0.02)
    assert h.of("decision") == [] and h.session.num_chunks_pending == 0 and h.session.buffered_audio_s == 0
    h.audio(s16(speech[:8000]))  # the stream goes on: later audio is heard, a flush is answered
    h.send({"type": "input.flush", "trailing_silence_s": 0})
    h.run()
    assert len(h.of("decision")) == 2 and h.types()[-1] == "input.flushed" and h.of("error") == []


def test_a_clear_that_keeps_flushed_audio_drops_only_what_came_after_the_last_flush(tiny_model, speech):
    """The Realtime dialect's clear (``keep_committed``): audio committed (flushed) before it is the conversation's, and
    the model hears it; only the audio sent after the flush goes. It dropped every chunk not heard yet, the committed
    ones too (probe, round eight)."""
    h = Harness(tiny_model, decision_events=True)
    h.audio(s16(speech[:16000]))  # 2 whole chunks, 0.2 s in the partial one
    h.send({"type": "input.flush", "trailing_silence_s": 0})  # pads it: 3 chunks to hear
    h.audio(s16(speech[16000:int(2.7 * 16000)]))  # 4 more chunks, 0.1 s in the partial one
    assert h.session.num_chunks_pending == 7
    assert h.session.handle(ClearAudio(event_type="input_audio_buffer.clear", keep_committed=True), h.now_s) == []
    h.run()
    cleared = h.of("input.cleared")[-1]
    assert cleared.num_chunks_dropped == 4 and cleared.audio_dropped_s == pytest.approx(1.7, abs=0.02)
    assert [event.chunk for event in h.of("decision")] == [0, 1, 2]
    assert [(event.num_chunks, event.audio_time_s) for event in h.of("input.flushed")] == [(3, 1.2)]
    assert h.session.num_chunks_pending == 0 and h.session.buffered_audio_s == 0 and h.of("error") == []
    h.audio(s16(speech[:8000]))  # the stream goes on
    h.send({"type": "input.flush", "trailing_silence_s": 0})
    h.send({"type": "input.clear"})  # the native clear keeps nothing: the flushed chunks not heard yet go too
    h.run()
    assert h.of("input.cleared")[-1].num_chunks_dropped == 2 and len(h.of("decision")) == 3


def test_clears_that_keep_flushed_audio_one_after_another_answer_each_flush_once_its_chunks_are_heard(
        tiny_model, speech):
    """Two commits, each followed by more audio and a clear, before the model heard any of it: the second clear keeps
    the first commit's chunks and the second's, which lie on either side of the chunks the first clear dropped."""
    h = Harness(tiny_model, decision_events=True, session={"reply_mode": "on_request"})  # no reply holds a flush
    keep = ClearAudio(event_type="input_audio_buffer.clear", keep_committed=True)
    h.audio(s16(speech[:12800]))  # chunks 0, 1
    h.send({"type": "input.flush", "trailing_silence_s": 0})
    h.audio(s16(speech[12800:27200]))  # chunks 2, 3 (and 0.1 s): dropped by the first clear
    h.session.handle(keep, h.now_s)
    h.audio(s16(speech[27200:40000]))  # chunks 4, 5
    h.send({"type": "input.flush", "trailing_silence_s": 0})
    h.audio(s16(speech[40000:54400]))  # chunks 6, 7 (and 0.1 s): dropped by the second clear
    h.session.handle(keep, h.now_s)
    held = h.holding = []  # the engine's answers, delivered one at a time below
    h.run()
    h.holding = None
    for events in held:
        h.events += h.session.on_engine_events(events, h.now_s)
        decided = len(h.of("decision"))
        # a flush is answered once the model heard its chunks, never before
        assert [e.num_chunks for e in h.of("input.flushed")] == [n for n in (2, 4) if decided >= n], h.types()
    assert [e.num_chunks_dropped for e in h.of("input.cleared")] == [2, 2] and len(h.of("decision")) == 4
    assert h.session.num_chunks_pending == 0 and h.of("error") == []


def test_audio_a_clear_dropped_unheard_holds_its_place_in_the_buffer_until_it_could_have_been_heard(tiny_model):
    """A client that filled the buffer, cleared it and filled it again at once (56 s, clear, 56 s, ...) had ~1,000 s
    of audio a second taken, decoded and pushed (with each chunk's features computed, then), and its neighbours'
    decisions came seconds late (probe round nine). Audio a clear dropped
    unheard counts against ``max_buffered_audio_s`` until the model could have heard it at
    ``engine.max_catch_up_speed`` (4x real time)."""
    h = Harness(tiny_model, max_buffered_audio_s=4.0)
    noise = s16(np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 4))
    assert h.audio(noise) == []  # 4 s: the buffer is full
    assert h.send({"type": "input.clear"}) == []
    h.run()
    assert h.of("input.cleared")[-1].num_chunks_dropped == 9  # 3.6 s had reached the model (the rest is partial)
    refused = h.audio(noise[:32000])  # 1 s more at once: the 3.6 s dropped could not have been heard yet
    assert [e.code for e in refused] == ["audio_buffer_full"] and "input.clear dropped 3.60 s" in refused[0].message
    h.now_s += 0.5  # 2 s of it could have been heard by now: 2 s fit, 3 s do not
    assert [e.code for e in h.audio(noise[:96000])] == ["audio_buffer_full"]
    assert h.audio(noise[:64000]) == []
    h.now_s += 10.0  # long since heard: the buffer holds only the 2 s accepted
    assert h.audio(noise[:64000]) == [] and h.session.buffered_audio_s == pytest.approx(4.0)


def test_flush_silence_after_a_clear_counts_the_audio_the_clear_dropped_unheard(tiny_model):
    """A frame after a clear was refused while the dropped audio could not have been heard yet, but 3.6 s of flush
    silence were taken (review of this change): silence queues for the model as audio does."""
    h = Harness(tiny_model, max_buffered_audio_s=4.0)
    h.audio(s16(np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 4)))
    h.send({"type": "input.clear"})
    h.run()
    refused = h.send({"type": "input.flush", "trailing_silence_s": 3.6})
    assert [e.code for e in refused] == ["audio_buffer_full"], refused
    h.now_s += 10.0  # long since heard
    assert h.send({"type": "input.flush", "trailing_silence_s": 3.6}) == []


def test_drain_closes_a_listening_session_with_1012_after_going_away(tiny_model):
    h = Harness(tiny_model)
    h.audio(np.zeros(8000, dtype="<i2"))
    out = h.session.begin_drain(30.0, h.now_s)
    assert [e.type for e in out] == ["session.going_away"] and out[0].deadline_s == 30.0
    h.events += out
    h.run()
    assert h.types()[-1] == "session.closed" and h.events[-1].reason == "server_draining"
    assert h.session.close_code == CloseCode.SERVICE_RESTART == 1012


def test_drain_lets_the_reply_in_progress_finish_then_closes(tiny_model, speech):
    h = Harness(tiny_model, session={"max_turn_tokens": 512})
    h.audio(s16(speech))
    while not h.of("turn_begin"):
        assert h.worker.step() is not None, "the tiny model never replied"
    h.events += h.session.begin_drain(30.0, h.now_s)
    assert h.session.close_code is None
    h.run()
    ends = h.of("turn_end")
    assert ends[0].end_reason in ("text_end", "max_tokens"), "the reply in progress is not cut"
    assert h.types()[-1] == "session.closed" and h.session.close_code == CloseCode.SERVICE_RESTART
    assert len(h.of("turn_begin")) == 1, "no new reply starts after the drain began"


def test_drain_deadline_closes_a_reply_that_runs_too_long(tiny_model, speech):
    h = Harness(tiny_model, session={"max_turn_tokens": 512})
    h.audio(s16(speech))
    while not h.of("turn_begin"):
        assert h.worker.step() is not None, "the tiny model never replied"
    h.events += h.session.begin_drain(2.0, h.now_s)
    h.now_s += 2.5
    h.events += h.session.poll(h.now_s)
    h.run()
    assert h.types()[-2:] == ["turn_end", "session.closed"] and h.session.close_code == CloseCode.SERVICE_RESTART


@pytest.mark.parametrize(("deltas", "segments"), [
    (["Hello", " there.", " How are", " you?"], ["Hello there.", "How are you?"]),
    (["It is 3", ".5 degrees", " today! Yes"], ["It is 3.5 degrees today!", "Yes"]),
    (["你好。", "今天", "天气很好！", "再见"], ["你好。", "今天天气很好！", "再见"]),
    (["line one\nline", " two"], ["line one", "line two"]),
    (["   ", "\n"], []),
])
def test_segmenter_cuts_sentences(deltas, segments):
    segmenter = Segmenter()
    out = [s for delta in deltas for s in segmenter.push(delta)]
    assert out + segmenter.finish() == segments


def test_segmenter_cuts_run_on_text_at_a_space():
    segmenter = Segmenter(max_chars=20)
    out = segmenter.push("word " * 10)
    assert out and all(len(s) <= 20 for s in out) and all(not s.endswith(" ") for s in out)
    assert " ".join(out + segmenter.finish()).split() == ["word"] * 10


# ---- floods: what one connection may make the event loop do (issue 21) -----------------------------------------


class CountingWorker(Worker):
    """The real worker, counting the option checks the event loop asks of it (each tokenises the system prompt)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_option_checks = 0

    def check_options(self, options) -> None:
        self.num_option_checks += 1
        super().check_options(options)


def counting_harness(tiny_model, **settings) -> tuple[Harness, CountingWorker]:
    worker = CountingWorker(tiny_model, EngineConfig(max_sessions=2))
    return Harness(tiny_model, worker=worker, **settings), worker


class RealtimeHarness(Harness):
    """The same session fed through the /v1/realtime codec (24 kHz PCM, base64 in JSON appends)."""

    def __init__(self, tiny_model, **settings) -> None:
        super().__init__(tiny_model, **settings)
        self.codec = RealtimeCodec(self.config.max_frame_bytes)  # type: ignore[assignment]

    def audio(self, data: bytes | np.ndarray) -> list:
        data = data if isinstance(data, bytes) else data.tobytes()
        return self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()})


FLOOD_RATE_HZ = {"stream": 16_000, "realtime": 24_000}


def flood_harness(tiny_model, protocol: str, **settings) -> Harness:
    return (RealtimeHarness if protocol == "realtime" else Harness)(tiny_model, **settings)


@pytest.mark.parametrize("protocol", ["stream", "realtime"])
def test_a_client_that_keeps_sending_into_a_full_buffer_is_cut_with_1008(tiny_model, protocol):
    """Frames refused as audio_buffer_full faster than real time spend the session's refused-audio budget
    (flood.refused_audio_burst_s at once, flood.refused_audio_speed x real time after that); the frame that
    overdraws it ends the session: a fatal audio_flood error, session.closed, close 1008. Nothing after
    that is handled."""
    h = flood_harness(tiny_model, protocol, max_buffered_audio_s=1.0,
                      flood={"refused_audio_burst_s": 2.0, "refused_audio_speed": 2.0})
    frame = np.zeros(FLOOD_RATE_HZ[protocol] // 8, "<i2")  # 0.125 s: sums are exact in binary
    accepted = [e for _ in range(8) for e in h.audio(frame)]  # 1 s fills the buffer
    assert [e.type for e in accepted if e.type != "session.updated"] == []  # (the realtime codec's 24 kHz format)
    refused = [h.audio(frame) for _ in range(16)]  # 2 s refused at once: the whole burst
    assert all([e.code for e in out] == ["audio_buffer_full"] for out in refused)
    assert h.session.close_code is None
    cut = h.audio(frame)
    assert [(e.type, getattr(e, "code", None)) for e in cut] == [("error", "audio_flood"), ("session.closed", None)]
    assert cut[0].is_fatal and "faster than real time" in cut[0].message
    assert h.session.close_code == CloseCode.POLICY and cut[1].reason == "audio_flood"
    assert h.audio(frame) == [] and h.send({"type": "input.clear"}) == []


@pytest.mark.parametrize("refused", ["not whole samples", "not finite", "empty", "after session.close"])
def test_a_client_whose_frames_are_all_refused_is_cut_once_they_come_faster_than_real_time(tiny_model, refused):
    """A frame refused because of what it holds (invalid_audio: not whole samples, NaN), an empty frame, or one
    sent while the session closes (invalid_state) spent no budget: one connection sending 1-byte frames as fast as
    its socket took them had ~60,000 invalid_audio errors a second serialised and sent, never cut, and its
    neighbours' decisions came up to 3.3 s late (a hostile-client probe). Every frame not taken spends the
    refused-audio budget (at least 10 ms a frame), as one refused for a full buffer does."""
    h = Harness(tiny_model, flood={"refused_audio_burst_s": 2.0, "refused_audio_speed": 2.0})
    if refused == "not finite":
        h.send({"type": "session.configure", "audio": {"sample_format": "pcm_f32le"}})
        frame = np.full(1600, np.nan, "<f4").tobytes()  # 0.1 s
    elif refused == "after session.close":
        h.audio(np.zeros(800, "<i2"))  # a model reply may follow: the session closes only at a listening point
        h.send({"type": "session.close"})
        frame = np.zeros(1600, "<i2").tobytes()
    else:
        frame = {"not whole samples": b"\x01", "empty": b""}[refused]
    frame_s = max(0.01, len(frame) / 2 / 16_000 if refused != "not finite" else 0.1)
    answers = [h.audio(frame) for _ in range(round(2.0 / frame_s))]  # the whole burst
    if h.session.close_code is not None and refused == "after session.close":
        pytest.skip("the session closed at once (no reply under way): no frame can come while it closes")
    assert h.session.close_code is None
    expected_code = {"after session.close": "invalid_state", "empty": None}.get(refused, "invalid_audio")
    assert all([e.code for e in out] == ([] if expected_code is None else [expected_code]) for out in answers)
    cut = h.audio(frame)
    assert [(e.type, getattr(e, "code", None)) for e in cut] == [("error", "audio_flood"), ("session.closed", None)]
    assert cut[0].is_fatal and h.session.close_code == CloseCode.POLICY


def test_one_refused_frame_longer_than_the_whole_refused_audio_burst_is_answered_not_cut(tiny_model):
    """A frame counts at most the whole burst: one long invalid frame (16 s of 8 kHz audio, within max_frame_bytes)
    gets its invalid_audio; only what comes after it, before the budget refills, is the cut."""
    h = Harness(tiny_model, flood={"refused_audio_burst_s": 10.0, "refused_audio_speed": 2.0})
    h.send({"type": "session.configure", "audio": {"sample_format": "pcm_s16le", "sample_rate_hz": 8000}})
    frame = np.zeros(8000 * 16, "<i2").tobytes() + b"\x01"  # 16 s and a byte: not whole samples
    assert [e.code for e in h.audio(frame)] == ["invalid_audio"] and h.session.close_code is None
    assert [e.code for e in h.audio(frame) if e.type == "error"] == ["audio_flood"]


def test_a_client_sending_bad_frames_at_real_time_is_told_each_time_and_never_cut(tiny_model):
    """A broken client whose every 20 ms frame is one byte short is answered invalid_audio for each, at real time
    for ever: refused, not a flood."""
    h = Harness(tiny_model, flood={"refused_audio_burst_s": 2.0, "refused_audio_speed": 2.0})
    frame = np.zeros(320, "<i2").tobytes()[:-1]
    for _ in range(1000):  # 20 s
        h.audio(frame)
        h.now_s += 0.02
    assert h.session.close_code is None and {e.code for e in h.of("error")} == {"invalid_audio"}
    assert len(h.of("error")) == 1000


def test_a_client_refused_at_real_time_is_never_cut(tiny_model):
    """A real-time client whose server fell behind gets audio_buffer_full for frame after frame, never more
    than real time: that is not a flood, and it is never cut."""
    h = Harness(tiny_model, max_buffered_audio_s=1.0, flood={"refused_audio_burst_s": 2.0, "refused_audio_speed": 2.0})
    frame = np.zeros(2000, "<i2")  # 0.125 s
    for _ in range(400):  # 50 s, the model never catching up
        h.audio(frame)
        h.now_s += 0.125
    assert h.session.close_code is None and len(h.of("error")) == 400 - 8
    assert {e.code for e in h.of("error")} == {"audio_buffer_full"}


def test_a_refused_frame_is_not_decoded(tiny_model):
    """The buffer check comes first: a frame that will be refused costs no decoding (nor a copy of its samples);
    so an odd-sized frame into a full buffer is refused as audio_buffer_full."""
    h = Harness(tiny_model, max_buffered_audio_s=0.5)
    h.audio(np.zeros(8000, "<i2"))  # 0.5 s: full
    (error,) = h.audio(b"\x01" * 3201)  # not whole s16 samples, but the buffer is full whatever it holds
    assert error.code == "audio_buffer_full"


@pytest.mark.parametrize("protocol", ["stream", "realtime"])
def test_a_client_flooding_events_is_cut_with_1008(tiny_model, protocol):
    """Text events (everything but audio; bad ones too) spend the session's event budget: flood.event_burst at
    once, flood.events_per_s after that. The event that overdraws it ends the session with event_flood, 1008."""
    h = flood_harness(tiny_model, protocol, flood={"event_burst": 50, "events_per_s": 10.0})
    clear = {"type": "input_audio_buffer.clear" if protocol == "realtime" else "input.clear"}
    num_codec_events = 1 if protocol == "realtime" else 0  # its first frame adds one: the audio format
    for _ in range(49 - num_codec_events):
        h.send(clear)
    h.send("{not json")
    assert h.session.close_code is None
    h.now_s += 0.1  # one more event's worth
    h.send(clear)
    cut = h.send(clear)
    assert [(e.type, getattr(e, "code", None)) for e in cut] == [("error", "event_flood"), ("session.closed", None)]
    assert cut[0].is_fatal and h.session.close_code == CloseCode.POLICY


def test_an_empty_configure_is_acknowledged_without_checking_the_options_again(tiny_model):
    """A session.configure that changes nothing (a client may send one to ask for session.updated): the options
    did not change, so nothing is rebuilt or tokenised for it."""
    h, worker = counting_harness(tiny_model)
    h.send({"type": "session.configure", "system_prompt": "Be brief."})
    assert worker.num_option_checks == 1
    for _ in range(20):
        (updated,) = h.session.handle(Configure(event_id="i1", event_type="conversation.item.create"), h.now_s)
        assert updated.type == "session.updated" and updated.options.system_prompt == "Be brief."
    assert worker.num_option_checks == 1


def test_system_prompt_checks_are_bounded_per_connection(tiny_model):
    """Checking a system prompt against the context budget tokenises it on the event loop (tens of ms for
    8,000 digits or CJK characters). A connection gets flood.prompt_char_burst characters checked at once and
    flood.prompt_chars_per_s after that; beyond, session.configure is refused with rate_limited before any
    tokenising, its options not applied."""
    h, worker = counting_harness(tiny_model, flood={"prompt_char_burst": 16_000, "prompt_chars_per_s": 1_000.0})
    prompts = [f"{i}:" + "7" * 7_998 for i in range(4)]  # unique, 8,000 characters, too long for the context
    codes = [h.send({"type": "session.configure", "system_prompt": p})[0].code for p in prompts[:3]]
    assert codes == ["invalid_event", "invalid_event", "rate_limited"] and worker.num_option_checks == 2
    assert "again in 8.0 s" in h.of("error")[-1].message
    h.now_s += 8.0  # 8,000 characters' worth
    assert h.send({"type": "session.configure", "system_prompt": prompts[3]})[0].code == "invalid_event"
    assert h.send({"type": "session.configure", "system_prompt": "Be brief."})[0].code == "rate_limited"
    h.now_s += 0.009
    (updated,) = h.send({"type": "session.configure", "system_prompt": "Be brief."})
    assert updated.options.system_prompt == "Be brief." and worker.num_option_checks == 4
    (updated,) = h.send({"type": "session.configure", "decision_events": True})  # no prompt: nothing to charge
    assert updated.type == "session.updated"


def test_a_realtime_item_create_reaches_the_session_as_an_acknowledgement_not_a_configure(tiny_model):
    """conversation.item.create changes nothing the session holds: it reaches the session as AcknowledgeItem
    (counted as a text event, answered in its place in the event order), never as a Configure, and the
    session's answer becomes conversation.item.added/done on the wire with the client's item."""
    h, worker = counting_harness(tiny_model)
    h.codec = RealtimeCodec(h.config.max_frame_bytes)  # type: ignore[assignment]
    h.send({"type": "input_audio_buffer.clear"})  # the codec's first frame also sets the 24 kHz format
    frames = [json.loads(frame) for event in h.events for frame in h.codec.encode(event)]
    assert [frame["type"] for frame in frames] == ["session.created", "input_audio_buffer.cleared"]
    commands = h.codec.decode(json.dumps({"type": "conversation.item.create", "event_id": "e1", "item": {
        "id": "lk_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
    assert commands == [AcknowledgeItem(event_type="conversation.item.create", event_id="e1")]
    (answer,) = h.session.handle(commands[0], h.now_s)
    assert answer.type != "session.updated" and worker.num_option_checks == 0
    frames = [json.loads(frame) for frame in h.codec.encode(answer)]
    assert [(frame["type"], frame["item"]["id"]) for frame in frames] == [("conversation.item.added", "lk_1"),
                                                                          ("conversation.item.done", "lk_1")]
    assert h.codec.held_bytes == 0
# appended to tests/api/test_session.py


def test_a_second_clear_before_the_model_heard_a_commit_still_keeps_the_commit(tiny_model, speech):
    """Commit (flush), more audio, clear, more audio, clear again, all before the model heard the commit: the second
    clear keeps the commit's chunks as the first did. The engine placed its queue by every chunk a clear ever
    dropped, the first clear's drops after the commit's chunks too, and the second clear dropped the commit."""
    h = Harness(tiny_model, decision_events=True, session={"reply_mode": "on_request"})
    keep = ClearAudio(event_type="input_audio_buffer.clear", keep_committed=True)
    h.audio(s16(speech[:12800]))  # chunks 0, 1
    h.send({"type": "input.flush", "trailing_silence_s": 0})  # the commit: 2 chunks
    h.audio(s16(speech[12800:27200]))  # chunks 2, 3 (and 0.1 s): dropped by the first clear
    h.session.handle(keep, h.now_s)
    h.audio(s16(speech[27200:41600]))  # chunks 4, 5 (and 0.1 s): dropped by the second clear
    h.session.handle(keep, h.now_s)
    h.run()
    assert [e.num_chunks_dropped for e in h.of("input.cleared")] == [2, 2]
    assert [e.chunk for e in h.of("decision")] == [0, 1]
    assert [e.num_chunks for e in h.of("input.flushed")] == [2]
    assert h.session.num_chunks_pending == 0 and h.of("error") == []
