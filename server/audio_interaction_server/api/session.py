"""One streaming connection's state, sans-I/O: frames and engine events in, wire events out.

The app feeds it what arrives (``receive_text``, ``receive_audio``, ``on_engine_events``,
``poll`` for the clock) and sends back the events each call returns; ``close_code``
turns non-None when the connection must close after sending them. Time is an
argument (``now_s``, monotonic), so tests drive timeouts without sleeping.

Audio path: PCM bytes -> ``decode_pcm`` -> ``StreamingResampler`` -> ``StreamingLogMel``
-> ``engine.push_audio``. A frame is either accepted whole (it reaches the model, or
``session.closed`` counts it as cut) or refused with an ``error`` event; nothing is
dropped silently.

Threading contract: not thread-safe. The app calls every method from its event loop;
the engine's ``emit`` (worker thread) must hop there before calling ``on_engine_events``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import ValidationError

from audio_interaction_server.audio.frontend import AudioFormatError
from audio_interaction_server.audio.stream import CHUNK_S, AudioInput
from audio_interaction_server.config import SessionOptions
from audio_interaction_server.engine.events import Decision, EngineEvent, SessionEnded, TurnBegin, TurnEnd
from audio_interaction_server.protocol import (
    LIVE_FORMS, AudioFormat, ClientEvent, ClientEventError, CloseCode, ErrorEvent, InputFlushedEvent,
    InputFlushEvent, ResponseCancelEvent, SegmentEvent, SessionClosedEvent, SessionCloseEvent,
    SessionConfigureEvent, SessionCreatedEvent, SessionLimits, SessionSettings, SessionUpdatedEvent,
    TextDeltaEvent, TurnBeginEvent, TurnEndEvent, parse_client_event, summarize,
)
from audio_interaction_server.render.replies import ReplyRenderer
from audio_interaction_server.render.segmenter import Segmenter
from audio_interaction_server.settings import ServerConfig

CLOSE_GRACE_S = 5.0  # how long a close waits for the engine's last events before giving up on them


# Engine end codes that are not the server's fault; any other engine error closes with 1011.
_ENGINE_CLOSE_CODES = {"capacity": CloseCode.TRY_AGAIN, "context_full": CloseCode.SESSION_LIMIT,
                       "invalid_options": CloseCode.POLICY, "server_shutdown": CloseCode.GOING_AWAY}


class Engine(Protocol):
    """The part of ``audio_interaction_server.engine.worker.Worker`` a session uses (thread-safe, non-blocking)."""

    def open_session(self, session_id: str, options: SessionOptions, emit: Callable) -> None: ...
    def push_audio(self, session_id: str, mel_chunks) -> None: ...
    def cancel(self, session_id: str) -> None: ...
    def close_session(self, session_id: str) -> None: ...
    def check_options(self, options: SessionOptions) -> None: ...


class SessionObserver(Protocol):
    """Where a session reports what it measures (``audio_interaction_server.api.metrics.Metrics`` in the app)."""

    def audio_received(self, seconds: float) -> None: ...
    def chunk_decided(self, latency_s: float | None = None) -> None: ...
    def turn_began(self, onset_latency_s: float | None) -> None: ...
    def turn_ended(self, num_tokens: int, end_reason: str) -> None: ...
    def error_sent(self, code: str) -> None: ...


class _NullObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    is_demo: bool
    tokenizer: object  # a tokenizers.Tokenizer


class Session:
    def __init__(self, session_id: str, config: ServerConfig, model: ModelInfo, engine: Engine,
                 engine_emit: Callable[[list[EngineEvent]], None], now_s: float,
                 observer: SessionObserver | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        self.session_id = session_id
        self.config = config
        self.model = model
        self.engine = engine
        self._engine_emit = engine_emit
        self._observer = observer or _NullObserver()
        self._wall_clock = wall_clock
        self.audio = AudioInput(lambda chunks: engine.push_audio(session_id, chunks))
        self.options: SessionOptions = config.session
        self.decision_events = config.decision_events
        self.close_code: int | None = None
        self._started_s = self._last_frame_s = now_s
        self._closing_since_s: float | None = None
        self._close_reason = ""
        self._close_code_pending = CloseCode.NORMAL
        self._is_engine_open = False
        self._is_speaking = False
        self._renderer = ReplyRenderer(model.tokenizer, session_id)
        self._segmenter: Segmenter | None = None
        self._num_segments = 0
        self._num_chunks_decided = 0
        self._chunk_push_s: deque[float] = deque()  # push time of each undecided chunk, for onset latency
        self._last_decided_push_s: float | None = None
        self._flush_targets: deque[int] = deque()  # chunk counts that end each input.flush

    # ---- properties ------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self.close_code is not None

    @property
    def num_chunks_pending(self) -> int:
        """Chunks given to the model that it has not decided on yet."""
        return self.audio.num_chunks_pushed - self._num_chunks_decided

    @property
    def num_chunks_decided(self) -> int:
        return self._num_chunks_decided

    @property
    def buffered_audio_s(self) -> float:
        """Audio accepted but not heard yet: queued chunks plus the partial chunk in the front-end."""
        return max(0.0, self.audio.stream_s - self._num_chunks_decided * CHUNK_S)

    # ---- inputs ----------------------------------------------------------------------
    def start(self) -> list:
        return [SessionCreatedEvent(
            session_id=self.session_id, server_time_ms=self._now_ms(), model=self.model.name,
            is_demo=self.model.is_demo, audio=self.audio.format, options=self._settings(), limits=self._limits(),
        )]

    def receive_text(self, text: str, now_s: float) -> list:
        if self.is_closed:
            return []
        self._last_frame_s = now_s
        if len(text.encode()) > self.config.max_frame_bytes:
            return self._error("frame_too_large", f"text frame over {self.config.max_frame_bytes} bytes; ignored")
        try:
            event = parse_client_event(text)
        except ClientEventError as error:
            return self._error(error.code, error.message, event_type=error.event_type)
        if self._closing_since_s is not None:
            return self._error("invalid_state", "the session is closing", event)
        if isinstance(event, SessionConfigureEvent):
            return self._configure(event, now_s)
        if isinstance(event, InputFlushEvent):
            return self._flush(event, now_s)
        if isinstance(event, ResponseCancelEvent):
            if self._is_engine_open:
                self.engine.cancel(self.session_id)  # its turn_end (end_reason "cancelled") follows
            return []
        assert isinstance(event, SessionCloseEvent)
        return self.begin_close("client_closed", CloseCode.NORMAL, now_s)

    def receive_audio(self, data: bytes, now_s: float) -> list:
        if self.is_closed:
            return []
        self._last_frame_s = now_s
        if self._closing_since_s is not None:
            return self._error("invalid_state", "the session is closing; audio frame ignored")
        if len(data) > self.config.max_frame_bytes:
            return self._error("frame_too_large",
                               f"audio frame of {len(data)} bytes is over {self.config.max_frame_bytes}; ignored")
        try:
            samples = self.audio.decode(data)
        except AudioFormatError as error:
            return self._error("invalid_audio", f"{error}; frame ignored")
        frame_s = self.audio.duration_s(samples)
        if self.buffered_audio_s + frame_s > self.config.max_buffered_audio_s + 1e-9:
            return self._error("audio_buffer_full", (
                f"{self.buffered_audio_s:.2f} s of audio wait for the model (limit "
                f"{self.config.max_buffered_audio_s:g} s); this frame of {frame_s:.3f} s was not accepted: "
                "send audio no faster than real time"))
        self._observer.audio_received(frame_s)
        self._open_engine()
        self._note_pushed(self.audio.accept(samples), now_s)
        return []

    def on_engine_events(self, events: list[EngineEvent], now_s: float) -> list:
        if self.is_closed:
            return []  # late events of a session already gone
        out: list = []
        for event in events:
            if isinstance(event, SessionEnded):  # always the engine's last event: session.closed goes last
                return out + self._flushed_events() + self._engine_ended(event)
            if isinstance(event, Decision):
                self._num_chunks_decided += 1
                self._last_decided_push_s = self._chunk_push_s.popleft() if self._chunk_push_s else None
                pushed_s = self._last_decided_push_s
                self._observer.chunk_decided(None if pushed_s is None else max(0.0, now_s - pushed_s))
            elif isinstance(event, TurnBegin):
                self._is_speaking = True
                self._segmenter, self._num_segments = Segmenter(), 0
            elif isinstance(event, TurnEnd):
                self._is_speaking = False
                self._observer.turn_ended(len(event.token_ids), event.end_reason)
            for wire in self._renderer.render(event):
                out += self._live(wire, now_s)
        # After the whole batch: a decision and the turn it starts arrive together.
        return out + self._flushed_events()

    def poll(self, now_s: float) -> list:
        """Clock-driven limits; call about once a second."""
        if self.is_closed:
            return []
        if self._closing_since_s is not None:
            if now_s - self._closing_since_s > CLOSE_GRACE_S:  # the engine never confirmed; close anyway
                return self._closed(self._close_reason, self._close_code_pending)
            return []
        if now_s - self._last_frame_s > self.config.idle_timeout_s:
            return (self._error("idle_timeout", f"no frame from the client for {self.config.idle_timeout_s:g} s",
                                is_fatal=True)
                    + self.begin_close("idle_timeout", CloseCode.IDLE, now_s))
        if now_s - self._started_s > self.config.max_session_s:
            return (self._error("session_too_long", f"sessions last at most {self.config.max_session_s:g} s",
                                is_fatal=True)
                    + self.begin_close("max_session_length", CloseCode.SESSION_LIMIT, now_s))
        return []

    def begin_close(self, reason: str, code: int, now_s: float) -> list:
        """End the session: the engine cuts any reply (its turn_end still comes), then ``session.closed``."""
        if self.is_closed or self._closing_since_s is not None:
            return []
        self._close_reason, self._close_code_pending = reason, code
        if not self._is_engine_open:
            return self._closed(reason, code)
        self._closing_since_s = now_s
        self.engine.close_session(self.session_id)
        return []

    def abort(self, reason: str = "disconnected") -> list:
        """The connection is gone: free the engine slot now. Returns the events for subscribers: the cut
        reply's turn_end (the engine's own comes too late, after the session is closed), then the close."""
        if self.is_closed:
            return []
        if self._is_engine_open:
            self.engine.close_session(self.session_id)
            self._is_engine_open = False
        cut = [live for wire in self._renderer.cut() for live in self._live(wire, time.monotonic())]
        for turn_end in (event for event in cut if event.type == "turn_end"):
            self._observer.turn_ended(turn_end.num_tokens, turn_end.end_reason)
        self._is_speaking = False
        return cut + self._closed(reason, CloseCode.NORMAL)

    # ---- client events ---------------------------------------------------------------
    def _configure(self, event: SessionConfigureEvent, now_s: float) -> list:
        given = event.model_fields_set - {"type", "event_id"}
        model_fields = given & {"system_prompt", "sampling", "max_turn_tokens"}
        if model_fields and self._is_engine_open:
            return self._error("invalid_state", f"{sorted(model_fields)} can only change before the first audio "
                               "frame; open a new session for other model options", event)
        # An explicit null resets a field to the server's default.
        defaults = self.config.session
        update = {}
        if "system_prompt" in given:
            update["system_prompt"] = event.system_prompt
        if "max_turn_tokens" in given:
            update["max_turn_tokens"] = event.max_turn_tokens or defaults.max_turn_tokens
        try:
            if "sampling" in given:
                update["sampling"] = (event.sampling if event.sampling is not None
                                      else defaults.sampling)
            options = SessionOptions(**{**self.options.model_dump(), **update})
        except ValidationError as error:
            return self._error("invalid_event", summarize(error), event)
        try:
            self.engine.check_options(options)
        except ValueError as error:  # fits the schema but not this server's context budget
            return self._error("invalid_event", str(error), event)
        if "audio" in given:
            self._note_pushed(self.audio.set_format(event.audio or AudioFormat()), now_s)
        if "decision_events" in given:
            self.decision_events = self.config.decision_events if event.decision_events is None \
                else event.decision_events
        self.options = options
        return [SessionUpdatedEvent(session_id=self.session_id, server_time_ms=self._now_ms(),
                                    audio=self.audio.format, options=self._settings())]

    def _flush(self, event: InputFlushEvent, now_s: float) -> list:
        silence_s = self.config.trailing_silence_s if event.trailing_silence_s is None else event.trailing_silence_s
        # Synthesized silence queues for the model like audio does, so it counts against the same limit:
        # otherwise a stream of tiny flush events queues unbounded chunks (and memory).
        queued_after_s = self.audio.stream_s_after_flush(silence_s) - self._num_chunks_decided * CHUNK_S
        if queued_after_s > self.config.max_buffered_audio_s + 1e-9:
            return self._error("audio_buffer_full", (
                f"{self.buffered_audio_s:.2f} s of audio wait for the model (limit "
                f"{self.config.max_buffered_audio_s:g} s); this flush with {silence_s:g} s of silence would "
                f"queue {queued_after_s:.2f} s and was not applied: send it again once the model has caught up"),
                event)
        self._open_engine()
        self._note_pushed(self.audio.flush(silence_s), now_s)
        self._flush_targets.append(self.audio.num_chunks_pushed)
        return self._flushed_events()

    # ---- helpers ---------------------------------------------------------------------
    def _open_engine(self) -> None:
        """The engine session opens at the first audio, so model options can be configured before it."""
        if not self._is_engine_open:
            self._is_engine_open = True
            self.engine.open_session(self.session_id, self.options, self._engine_emit)

    def _note_pushed(self, num_chunks: int, now_s: float) -> None:
        self._chunk_push_s.extend([now_s] * num_chunks)  # for the onset latency of a reply they trigger

    def _live(self, wire, now_s: float) -> list:
        """A renderer event in its stamped wire form, plus the segments its text completes."""
        before: list = []  # a reply's last segment goes before its turn_end
        after: list = []
        stamp_ms = self._now_ms()  # one stamp for the event and its segments, so stamps never go back
        if isinstance(wire, TextDeltaEvent) and self._segmenter is not None:
            after = self._segments(wire.turn, self._segmenter.push(wire.text), stamp_ms)
        if isinstance(wire, TurnEndEvent) and self._segmenter is not None:
            # A cancelled reply's tail is not spoken: the client asked for silence.
            if wire.end_reason in ("text_end", "max_tokens"):
                before = self._segments(wire.turn, self._segmenter.finish(), stamp_ms)
            self._segmenter = None
        fields = dict(wire.__dict__, server_time_ms=stamp_ms)
        if isinstance(wire, TurnBeginEvent):
            onset_s = None if self._last_decided_push_s is None else max(0.0, now_s - self._last_decided_push_s)
            fields["onset_latency_ms"] = None if onset_s is None else round(onset_s * 1000, 3)
            self._observer.turn_began(onset_s)
        live = LIVE_FORMS[type(wire)](**fields)
        if isinstance(wire, TextDeltaEvent) and after:
            after[0:0] = [live]
            return before + after
        return before + ([live] if live.type != "decision" or self.decision_events else []) + after

    def _segments(self, turn: int, texts: list[str], stamp_ms: int) -> list:
        out = []
        for text in texts:
            out.append(SegmentEvent(session_id=self.session_id, server_time_ms=stamp_ms, turn=turn,
                                    index=self._num_segments, text=text))
            self._num_segments += 1
        return out

    def _flushed_events(self) -> list:
        out = []
        while self._flush_targets and self._num_chunks_decided >= self._flush_targets[0] and not self._is_speaking:
            self._flush_targets.popleft()
            out.append(InputFlushedEvent(session_id=self.session_id, server_time_ms=self._now_ms(),
                                         num_chunks=self._num_chunks_decided,
                                         audio_time_s=round(self._num_chunks_decided * CHUNK_S, 3)))
        return out

    def _engine_ended(self, event: SessionEnded) -> list:
        self._is_engine_open = False
        if event.error_code is None:  # the close we asked for
            return self._closed(self._close_reason or "closed", self._close_code_pending)
        code = _ENGINE_CLOSE_CODES.get(event.error_code, CloseCode.INTERNAL)
        return self._error(event.error_code, event.message, is_fatal=True) + self._closed(event.error_code, code)

    def _closed(self, reason: str, code: int) -> list:
        self.close_code = code
        self._closing_since_s = None
        return [SessionClosedEvent(
            session_id=self.session_id, server_time_ms=self._now_ms(), reason=reason,
            num_chunks_received=self.audio.num_chunks_pushed, num_chunks_decided=self._num_chunks_decided,
            audio_received_s=round(self.audio.audio_received_s, 3),
        )]

    def _error(self, code: str, message: str, event: ClientEvent | None = None, *, is_fatal: bool = False,
               event_type: str | None = None) -> list:
        self._observer.error_sent(code)
        return [ErrorEvent(session_id=self.session_id, server_time_ms=self._now_ms(), code=code, message=message,
                           is_fatal=is_fatal, event_type=event.type if event is not None else event_type,
                           event_id=event.event_id if event is not None else None)]

    def _settings(self) -> SessionSettings:
        return SessionSettings(system_prompt=self.options.system_prompt, max_turn_tokens=self.options.max_turn_tokens,
                               sampling=self.options.sampling,
                               decision_events=self.decision_events)

    def _limits(self) -> SessionLimits:
        c = self.config
        return SessionLimits(max_frame_bytes=c.max_frame_bytes, max_buffered_audio_s=c.max_buffered_audio_s,
                             idle_timeout_s=c.idle_timeout_s, max_session_s=c.max_session_s, chunk_s=CHUNK_S)

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

