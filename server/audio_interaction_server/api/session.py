"""One streaming connection's state, sans-I/O: commands and engine events in, wire events out.

The connection feeds it what arrives (``handle`` for the typed commands of api/commands.py,
which a protocol codec made from the client's frames; ``on_engine_events``; ``poll`` for the
clock) and sends back the events each call returns; ``close_code`` turns non-None when the
connection must close after sending them. The events are ``audio_interaction_server.protocol``'s;
a codec encodes (``/v1/stream``) or translates (``/v1/realtime``) them. Time is an argument
(``now_s``, monotonic), so tests drive timeouts without sleeping.

Audio path: PCM bytes, checked as they arrive (``check_pcm``), decoded once they could complete a chunk
-> ``StreamingResampler`` -> ``blocks.BlockCutter.push``
-> ``engine.push_audio`` (``PaddedBlocks``: the engine computes the log-mel, see audio/stream.py).
A frame is either accepted whole (it reaches the model, or ``session.closed`` counts it as cut)
or refused with an ``error`` event; nothing is dropped silently. What a client may make the
event loop do is bounded (api/flood.py): a client that floods is cut with a fatal
``event_flood``/``audio_flood`` error and close 1008.

Threading contract: not thread-safe. The app calls every method from its event loop;
the engine's ``emit`` (worker thread) must hop there before calling ``on_engine_events``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import ValidationError

from audio_interaction_server.api.commands import (
    AcknowledgeItem, AppendAudio, CancelReply, ClearAudio, CloseSession, Command, Configure, Flush, ItemAcknowledged,
    Malformed, ReplyRequestWithdrawn, RequestReply, Unset,
)
from audio_interaction_server.api.addresses import client_key
from audio_interaction_server.api.flood import FloodGuard, TokenBucket, json_items_rate_and_burst
from audio_interaction_server.audio.pcm import AudioFormatError
from audio_interaction_server.audio.stream import CHUNK_S, AudioInput
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.events import (
    AudioCleared, Decision, EndCode, EngineEvent, ReplyRequestDropped, ReplyWaitsForAudio, SessionEnded, TurnBegin,
    TurnEnd,
)
from audio_interaction_server.protocol import (
    AudioFormat, CloseCode, ErrorEvent, InputClearedEvent, InputFlushedEvent, SessionClosedEvent, SessionCreatedEvent,
    SessionGoingAwayEvent, SessionLimits, SessionResumedEvent, SessionSettings, SessionUpdatedEvent, summarize,
)
from audio_interaction_server.render.presenter import ReplyPresenter
from audio_interaction_server.config import ServerConfig

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 5.0  # how long a close waits for the engine's last events before giving up on them
REPLY_IN_PROGRESS_MESSAGE = ("a reply is in progress (the model may have begun its own as this request arrived): "
                             "this request was not applied; send it again after the reply's turn_end")


# How each way the engine can end a session closes the WebSocket: one entry per EndCode (a test checks it).
CLOSE_CODE_OF_END: dict[EndCode, CloseCode] = {
    EndCode.CAPACITY: CloseCode.TRY_AGAIN,
    EndCode.DUPLICATE_SESSION: CloseCode.INTERNAL,  # ids are the server's own: a repeat is a server bug
    EndCode.INVALID_OPTIONS: CloseCode.POLICY,
    EndCode.CONTEXT_FULL: CloseCode.SESSION_LIMIT,
    EndCode.SERVER_SHUTDOWN: CloseCode.GOING_AWAY,
    EndCode.NUMERICAL_ERROR: CloseCode.INTERNAL,
    EndCode.INTERNAL_ERROR: CloseCode.INTERNAL,
    EndCode.FRONT_UNRESPONSIVE: CloseCode.INTERNAL,
    EndCode.DETACHED_EVICTED: CloseCode.RESUME_FAILED,  # as a resume that came too late: start a new session
    EndCode.RATE_LIMITED: CloseCode.TRY_AGAIN,  # its address's prefill budget: a new session later (the message: when)
    EndCode.WORKER_FAILED: CloseCode.INTERNAL,
}


class Engine(Protocol):
    """The part of ``audio_interaction_server.engine.worker.Worker`` a session uses (thread-safe, non-blocking)."""

    def open_session(self, session_id: str, options: SessionOptions, emit: Callable,
                     client_address: str | None = None) -> None: ...
    def push_audio(self, session_id: str, mel_chunks) -> None: ...
    def cancel(self, session_id: str) -> None: ...
    def request_reply(self, session_id: str, max_turn_tokens: int | None = None) -> None: ...
    def clear_audio(self, session_id: str, keep_before: int = 0) -> None: ...
    def close_session(self, session_id: str) -> None: ...
    def check_options(self, options: SessionOptions) -> None: ...
    def checks_without_tokenising(self, system_prompt: str | None) -> bool: ...


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
                 observer: SessionObserver | None = None, wall_clock: Callable[[], float] = time.time,
                 client_address: str | None = None, prompt_chars: TokenBucket | None = None,
                 json_items: TokenBucket | None = None) -> None:
        """``prompt_chars``, ``json_items``: the client address's budgets of system prompt characters checked and of
        the JSON items of heavy frames parsed (``flood.py``)."""
        self.session_id = session_id
        self.client_address = client_address  # the engine charges it for the prompt's prefill (None: nobody)
        self.config = config
        self.model = model
        self.engine = engine
        self._engine_emit = engine_emit
        self._observer = observer or _NullObserver()
        self._wall_clock = wall_clock
        self.audio = AudioInput(functools.partial(engine.push_audio, session_id))  # a chunk's call: no lambda frame
        self.options: SessionOptions = config.session
        self.decision_events = config.decision_events
        self.close_code: int | None = None
        self._started_s = self._last_frame_s = now_s
        self._closing_since_s: float | None = None
        self._close_reason = ""
        self._close_code_pending: int = CloseCode.NORMAL
        self._is_engine_open = False
        self._is_speaking = False
        # The reply request sent to the engine and not answered yet (by the reply it begins, or its drop), with the
        # ones that came before that answer, merged into it: the engine's answer is theirs too.
        self._reply_requests: list[RequestReply] = []
        self._reply_request_chunks = 0  # the chunks pushed when the pending request came: the last is its to answer
        self._withdrawal_asked = False  # a CancelReply that withdraws_request waits for the engine's answer
        self._presenter = ReplyPresenter(model.tokenizer, session_id, self.decision_events)
        self._num_chunks_decided = 0
        self._chunk_push_s: deque[float] = deque()  # push time of each undecided chunk, for onset latency
        self._last_decided_push_s: float | None = None
        self._flush_targets: deque[int] = deque()  # chunk counts that end each input.flush
        self._num_chunks_dropped = 0  # queued chunks input.clear dropped before the model heard them
        # Every chunk pushed before this one was decided or dropped (a flush is answered once it passes the flush's
        # chunks). Not ``_num_chunks_resolved``: a clear that keeps flushed chunks drops the ones after them, which
        # it counts at once, so the count runs ahead of the chunks done with until the kept ones are decided.
        self._chunks_done_through = 0
        self._drops_ahead: deque[tuple[int, int]] = deque()  # (first chunk, how many) dropped behind kept ones
        self._clears_waiting: deque[float] = deque()  # partial-chunk seconds of each clear the engine has not done
        # Audio input.clear dropped unheard still holds its place in the buffer until the model could have heard it
        # at max_catch_up_speed: else a client sending 56 s, clearing and sending again had the server take a
        # thousand seconds of audio a second and more, all of it decoded, resampled and cut (probe round nine).
        self._dropped_unheard_s = 0.0
        self._dropped_unheard_at_s = now_s
        self._drain_deadline_s: float | None = None
        self._flood = FloodGuard(config.flood, now_s, prompt_chars, json_items)

    # ---- properties ------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self.close_code is not None

    @property
    def num_chunks_pending(self) -> int:
        """Chunks given to the model that it has not decided on yet."""
        return self.audio.num_chunks_pushed - self._num_chunks_resolved

    @property
    def _num_chunks_resolved(self) -> int:
        """Chunks the model decided on or ``input.clear`` dropped (not all of them the first ones pushed: see
        ``_chunks_done_through``)."""
        return self._num_chunks_decided + self._num_chunks_dropped

    @property
    def num_chunks_decided(self) -> int:
        return self._num_chunks_decided

    @property
    def buffered_audio_s(self) -> float:
        """Audio accepted but not heard yet: queued chunks plus the partial chunk in the front-end."""
        return max(0.0, self.audio.stream_s - self._num_chunks_resolved * CHUNK_S)

    # ---- inputs ----------------------------------------------------------------------
    def start(self, resume_token: str | None = None, resume_grace_s: float | None = None) -> list:
        return [SessionCreatedEvent(
            session_id=self.session_id, server_time_ms=self._now_ms(), model=self.model.name,
            is_demo=self.model.is_demo, audio=self.audio.format, options=self._settings(), limits=self._limits(),
            resume_token=resume_token, resume_grace_s=resume_grace_s,
        )]

    def resumed(self, last_seq: int, num_replayed: int, now_s: float) -> SessionResumedEvent:
        """What a resuming client needs to go on: where its audio stands (it re-sends from there)."""
        self._last_frame_s = now_s  # the idle clock restarts with the client's return
        return SessionResumedEvent(session_id=self.session_id, server_time_ms=self._now_ms(), last_seq=last_seq,
                                   num_replayed=num_replayed, audio_received_s=self.audio.audio_received_s,
                                   num_chunks_decided=self._num_chunks_decided)

    def handle(self, command: Command, now_s: float) -> list:
        """One client command (from any protocol's codec) -> the events that answer it."""
        if type(command) is AppendAudio and self._closing_since_s is None and self.close_code is None:
            self._last_frame_s = now_s  # a live stream's audio frame, most of all commands: straight to its work
            return self._append_audio(command, now_s)
        if self.is_closed:
            return []
        self._last_frame_s = now_s
        if not isinstance(command, AppendAudio) and not self._flood.allows_event(now_s):
            return self._cut_off("event_flood", self._flood.event_flood_message(), command)
        if isinstance(command, Malformed):
            return self._error(command.code, command.message, command)
        if self._closing_since_s is not None:
            if isinstance(command, AppendAudio):
                return self._refused_audio(command, self.audio.seconds_in(command.data), now_s, lambda: self._error(
                    "invalid_state", "the session is closing; audio frame ignored", command))
            return self._error("invalid_state", "the session is closing; event ignored", command)
        match command:
            case AppendAudio():
                return self._append_audio(command, now_s)
            case Configure():
                return self._configure(command, now_s)
            case AcknowledgeItem():  # nothing of the session changes: the answer keeps its place in the order
                return [ItemAcknowledged(session_id=self.session_id, event_type=command.event_type,
                                         event_id=command.event_id)]
            case Flush():
                return self._flush(command, now_s)
            case ClearAudio():
                return self._clear(command)
            case RequestReply():
                return self._request_reply(command, now_s)
            case CancelReply():
                if self._is_engine_open:
                    # A reply in progress ends with its turn_end (end_reason "cancelled"); a request not yet begun
                    # is dropped, and the engine says so (ReplyRequestDropped, "cancelled").
                    self._withdrawal_asked = command.withdraws_request and bool(self._reply_requests)
                    self.engine.cancel(self.session_id)
                return []
            case CloseSession():
                return self.begin_close("client_closed", CloseCode.NORMAL, now_s)
        raise TypeError(f"not a session command: {command!r}")

    def take_json_items(self, num_items: int, now_s: float) -> list:
        """A text frame's JSON items, counted before it is decoded (api/flood.py): nothing; or, and the frame is then
        not decoded, the cut for a flood, or ``rate_limited`` while the client address's budget of items is spent
        (over all of its connections: a new connection's own event budget is a full one)."""
        if self.is_closed:
            return []
        if not self._flood.allows_json_items(num_items, now_s):
            return self._cut_off("event_flood", self._flood.event_flood_message(), Malformed("event_flood", ""))
        wait_s = self._flood.json_items_wait_s(num_items, now_s)
        if not wait_s:
            return []
        rate_per_s, burst = json_items_rate_and_burst(self.config.flood)
        return self._error("rate_limited", f"a text frame of {num_items} JSON items (commas and colons) was not "
                           f"parsed: frames heavy in them are budgeted per client address, over all its connections "
                           f"({burst:.0f} items at once, then {rate_per_s:g} a second); send it again in "
                           f"{wait_s:.1f} s")

    def on_engine_events(self, events: list[EngineEvent], now_s: float) -> list:
        if self.is_closed:
            return []  # late events of a session already gone
        out: list = []
        for event in events:
            if isinstance(event, SessionEnded):  # always the engine's last event: session.closed goes last
                return out + self._flushed_events() + self._engine_ended(event)
            if isinstance(event, AudioCleared):
                out += self._cleared(event, now_s)
                continue
            if isinstance(event, ReplyRequestDropped):
                out += self._reply_request_dropped(event)
                continue
            if isinstance(event, ReplyWaitsForAudio):
                # Every decision the engine made before saying this has arrived (events come in order): with
                # nothing pending now, no chunk is on its way to the engine either. One that is (pushed with the
                # request, read by the engine just after this) needs no second chunk.
                if self.num_chunks_pending == 0:
                    self._push_a_chunk_to_reply_at(now_s)
                continue
            if isinstance(event, Decision):
                self._num_chunks_decided += 1
                self._pass_chunks(1)
                self._last_decided_push_s = self._chunk_push_s.popleft() if self._chunk_push_s else None
                pushed_s = self._last_decided_push_s
                self._observer.chunk_decided(None if pushed_s is None else max(0.0, now_s - pushed_s))
            onset_s = None
            if isinstance(event, TurnBegin):
                self._is_speaking = True
                if event.requested:
                    self._reply_requests = []
                    self._withdrawal_asked = False  # the cancel, if one is on its way, ends this reply instead
                pushed_s = self._last_decided_push_s  # the chunk whose decision began the reply
                onset_s = None if pushed_s is None else max(0.0, now_s - pushed_s)
                self._observer.turn_began(onset_s)
            elif isinstance(event, TurnEnd):
                self._is_speaking = False
                self._observer.turn_ended(len(event.token_ids), event.end_reason)
            out += self._presenter.present(event, self._now_ms(), onset_s)
        # After the whole batch: a decision and the turn it starts arrive together.
        out += self._flushed_events()
        if self._drain_deadline_s is not None and not self._is_speaking:
            out += self._close_for_drain(now_s)  # the reply it was finishing has ended: a listening point
        return out

    def poll(self, now_s: float) -> list:
        """Clock-driven limits; call about once a second."""
        if self.is_closed:
            return []
        if self._closing_since_s is not None:
            if now_s - self._closing_since_s > CLOSE_GRACE_S:  # the engine never confirmed; close anyway
                # Said, so a stalled engine (its worker stuck, the host swapping) is told apart from a quiet client.
                log.warning("session %s: the engine did not confirm its close within %g s (is the model worker "
                            "stalled?); closed without the engine's last events", self.session_id, CLOSE_GRACE_S)
                return self._closed(self._close_reason, self._close_code_pending)
            return []
        if self._drain_deadline_s is not None and now_s >= self._drain_deadline_s:
            return self._close_for_drain(now_s)
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

    def begin_drain(self, deadline_s: float, now_s: float) -> list:
        """The server drains: say so, let the reply in progress finish, close with 1012 at the next listening
        point (now, if the model listens), and at ``deadline_s`` from now at the latest."""
        if self.is_closed or self._closing_since_s is not None or self._drain_deadline_s is not None:
            return []
        self._drain_deadline_s = now_s + deadline_s
        going_away = [SessionGoingAwayEvent(session_id=self.session_id, server_time_ms=self._now_ms(),
                                            deadline_s=round(deadline_s, 3))]
        return going_away + ([] if self._is_speaking else self._close_for_drain(now_s))

    def _close_for_drain(self, now_s: float) -> list:
        return self.begin_close("server_draining", CloseCode.SERVICE_RESTART, now_s)

    def abort(self, reason: str = "disconnected") -> list:
        """The connection is gone: free the engine slot now. Returns the events for subscribers: the cut
        reply's turn_end (the engine's own comes too late, after the session is closed), then the close."""
        return self._end_now(reason, CloseCode.NORMAL)

    def abort_with_error(self, code: str, message: str) -> list:
        """The connection ends the session for ``code`` (its client does not read, a message failed): the fatal
        ``error`` (counted like every error the session sends), then what ``abort`` returns."""
        return self._error(code, message, is_fatal=True) + self.abort(code)

    def _cut_off(self, code: str, message: str, command: Command) -> list:
        """A flooding client: a fatal error, the session ended now (its reply cut), close 1008. Nothing it
        sends after this is handled (and the connection stops reading it once the close is sent)."""
        return self._error(code, message, command, is_fatal=True) + self._end_now(code, CloseCode.POLICY)

    def _end_now(self, reason: str, code: int) -> list:
        if self.is_closed:
            return []
        if self._is_engine_open:
            self.engine.close_session(self.session_id)
            self._is_engine_open = False
        cut = self._presenter.cut(self._now_ms())
        for turn_end in (event for event in cut if event.type == "turn_end"):
            self._observer.turn_ended(turn_end.num_tokens, turn_end.end_reason)
        self._is_speaking = False
        return cut + self._closed(reason, code)

    # ---- client commands -------------------------------------------------------------
    def _append_audio(self, command: AppendAudio, now_s: float) -> list:
        if not command.data:  # no audio: not the first audio frame either, after which the model options are fixed
            return self._refused_audio(command, 0.0, now_s, list)
        # The buffer is checked before anything is decoded: a client sending into a full buffer makes each of
        # its frames cost a comparison and an error event, and its refused audio is budgeted (api/flood.py).
        audio = self.audio
        frame_s = audio.seconds_in(command.data)
        queued_s = self.buffered_audio_s + (self._unheard_dropped_s(now_s) if self._dropped_unheard_s else 0.0)
        if queued_s + frame_s > self.config.max_buffered_audio_s + 1e-9:
            return self._refuse_frame(command, frame_s, now_s)
        try:
            frame = audio.check_frame(command.data)
        except AudioFormatError as error:
            why = f"{error}; frame ignored"
            return self._refused_audio(command, frame_s, now_s, lambda: self._error("invalid_audio", why, command))
        self._observer.audio_received(frame_s)
        if not self._is_engine_open:
            self._open_engine()  # before accept_frame, which may push chunks to the engine
        num_pushed = audio.accept_frame(frame)
        if num_pushed:
            self._note_pushed(num_pushed, now_s)
        return []

    def _refuse_frame(self, command: AppendAudio, frame_s: float, now_s: float) -> list:
        """A frame that would overfill the buffer: ``audio_buffer_full``, or the cut for a flood of them."""
        dropped_s = self._unheard_dropped_s(now_s)
        cleared = f" (input.clear dropped {dropped_s:.2f} s of it unheard just now)" if dropped_s > 0.005 else ""
        return self._refused_audio(command, frame_s, now_s, lambda: self._buffer_full(
            self.buffered_audio_s + dropped_s + frame_s, command,
            lambda: f"this frame of {frame_s:.3f} s was not accepted{cleared}: send audio no faster than real time",
            queued_s=self.buffered_audio_s + dropped_s))

    def _unheard_dropped_s(self, now_s: float) -> float:
        """The audio ``input.clear`` dropped that the model could not have heard by now at
        ``engine.max_catch_up_speed``: it holds its place in the buffer (none without pacing)."""
        speed = self.config.engine.max_catch_up_speed
        if speed is None:
            return 0.0
        self._dropped_unheard_s = max(0.0, self._dropped_unheard_s - (now_s - self._dropped_unheard_at_s) * speed)
        self._dropped_unheard_at_s = max(self._dropped_unheard_at_s, now_s)
        return self._dropped_unheard_s

    def _refused_audio(self, command: AppendAudio, frame_s: float, now_s: float, answer: Callable[[], list]) -> list:
        """``answer()`` to an audio frame not taken (a full buffer, not valid audio, empty, the session closing):
        each spends the refused-audio budget, or, once that is spent, the session is cut (``audio_flood``). A frame
        refused for what it holds is refused at socket speed: counted, as one refused for a full buffer, a flood
        of them cannot keep the event loop busy (api/flood.py)."""
        if not self._flood.allows_refused_audio(frame_s, now_s):
            return self._cut_off("audio_flood", self._flood.audio_flood_message(), command)
        return answer()

    def _configure(self, command: Configure, now_s: float) -> list:
        given = command.given()
        model_fields = given & {"system_prompt", "sampling", "max_turn_tokens", "reply_mode"}
        if model_fields and self._is_engine_open:
            return self._error("invalid_state", f"{', '.join(sorted(model_fields))} can only change before the first "
                               "audio frame; open a new session for other model options", command)
        if model_fields:
            refused = self._apply_model_options(command, model_fields, now_s)
            if refused:
                return refused
        # Without model fields the options stand as checked: an empty Configure only reports them.
        if not isinstance(command.audio, Unset):
            self._note_pushed(self.audio.set_format(command.audio or AudioFormat()), now_s)
        if not isinstance(command.decision_events, Unset):
            self.decision_events = (self.config.decision_events if command.decision_events is None
                                    else command.decision_events)
            self._presenter.decision_events = self.decision_events
        return [SessionUpdatedEvent(session_id=self.session_id, server_time_ms=self._now_ms(),
                                    audio=self.audio.format, options=self._settings())]

    def _apply_model_options(self, command: Configure, model_fields: set[str], now_s: float) -> list:
        """Check the new model options against the engine and keep them; an error event if they are refused."""
        # An explicit None resets a field to the server's default.
        defaults = self.config.session
        update = {name: getattr(command, name) for name in model_fields}
        for name, value in update.items():
            if value is None and name != "system_prompt":  # a None system prompt is the model's trained one
                update[name] = getattr(defaults, name)
        try:
            options = SessionOptions(**{**self.options.model_dump(), **update})
        except ValidationError as error:
            return self._error("invalid_event", summarize(error), command)
        prompt = update.get("system_prompt")
        if prompt and not self.engine.checks_without_tokenising(prompt):
            # The check below tokenises the prompt on the event loop: its characters are budgeted per client address.
            wait_s = self._flood.prompt_wait_s(len(prompt), now_s)
            if wait_s:
                return self._error("rate_limited", f"new system prompts of {self._flood.limits.prompt_char_burst} "
                                   f"characters at once, then {self._flood.limits.prompt_chars_per_s:g} a second, "
                                   f"are checked per client address; this one was not applied: send it again in "
                                   f"{wait_s:.1f} s", command)
        try:
            self.engine.check_options(options)
        except ValueError as error:  # fits the schema but not this server's context budget
            return self._error("invalid_event", str(error), command)
        self.options = options
        return []

    def _flush(self, command: Flush, now_s: float) -> list:
        silence_s = self.config.trailing_silence_s if command.trailing_silence_s is None \
            else command.trailing_silence_s
        # Synthesized silence queues for the model like audio does, so it counts against the same limit:
        # otherwise a stream of tiny flush events queues unbounded chunks (and memory).
        queued_after_s = self.audio.stream_s_after_flush(silence_s) - self._num_chunks_resolved * CHUNK_S
        # Audio a clear just dropped holds its place, as it does for frames (``_unheard_dropped_s``).
        dropped_s = self._unheard_dropped_s(now_s)
        refused = self._buffer_full(queued_after_s + dropped_s, command,
                                    lambda: f"this flush with {silence_s:g} s of silence would queue "
                                    f"{queued_after_s:.2f} s and was not applied: send it again once the model has "
                                    "caught up", queued_s=self.buffered_audio_s + dropped_s)
        if refused:
            return refused
        if queued_after_s > 0:  # a flush of nothing (no audio, no silence) does not open the model's session
            self._open_engine()
        self._note_pushed(self.audio.flush(silence_s), now_s)
        self._flush_targets.append(self.audio.num_chunks_pushed)
        return self._flushed_events()

    def _buffer_full(self, queued_after_s: float, command: Command, what_happened: Callable[[], str],
                     queued_s: float | None = None) -> list:
        """``audio_buffer_full`` when accepting would leave ``queued_after_s`` of audio waiting for the model,
        past ``max_buffered_audio_s`` (frames and flush silence count alike); else nothing. ``what_happened`` is
        formatted only then (a flush passes here whatever happens; a frame only once it is over the limit, which
        ``_append_audio`` checks inline, per frame)."""
        limit_s = self.config.max_buffered_audio_s
        if queued_after_s <= limit_s + 1e-9:
            return []
        queued_s = self.buffered_audio_s if queued_s is None else queued_s
        return self._error("audio_buffer_full", f"{queued_s:.2f} s of audio wait for the model (limit "
                           f"{limit_s:g} s); {what_happened()}", command)

    def _clear(self, command: ClearAudio) -> list:
        partial_s = self.audio.clear()
        if not self._is_engine_open:  # nothing reached the engine: only the partial chunk goes
            return [self._cleared_event(0, partial_s)]
        self._clears_waiting.append(partial_s)
        # The chunks of the last flush not answered yet stay queued, when kept: a flush pads its partial chunk, so
        # they are whole chunks, the first ``_flush_targets[-1]`` the session pushed. So do those a pending reply
        # request answers: dropped, the reply answered the chunk after the clear, not the audio the client asked about.
        keep_before = 0
        if command.keep_committed:
            keep_before = max(self._flush_targets[-1] if self._flush_targets else 0,
                              self._reply_request_chunks if self._reply_requests else 0)
        self.engine.clear_audio(self.session_id, keep_before)  # its AudioCleared, with the chunks dropped, answers
        return []

    def _pass_chunks(self, num_chunks: int) -> None:
        """``num_chunks`` more of the first chunks not done with are done with, and dropped ones right after them."""
        self._chunks_done_through += num_chunks
        while self._drops_ahead and self._drops_ahead[0][0] <= self._chunks_done_through:
            self._chunks_done_through += self._drops_ahead.popleft()[1]

    def _after_chunks_not_done(self, num_chunks: int) -> int:
        """The chunk after the first ``num_chunks`` not done with (those an earlier clear kept come before the chunks
        it dropped, and those after them)."""
        position, left = self._chunks_done_through, num_chunks
        for start, count in self._drops_ahead:
            if left < start - position:
                break
            left -= start - position
            position = start + count
        return position + left

    def _cleared(self, event: AudioCleared, now_s: float) -> list:
        self._num_chunks_dropped += event.num_chunks
        # What was dropped before has drained up to now; these chunks join it.
        self._dropped_unheard_s = self._unheard_dropped_s(now_s) + event.num_chunks * CHUNK_S
        if event.num_chunks:  # every decision made before the clear has come (in order): the kept chunks are next
            self._drops_ahead.append((self._after_chunks_not_done(event.num_kept), event.num_chunks))
            self._pass_chunks(0)
        # The engine dropped the newest of the chunks it had queued, after the ones it kept; chunks pushed since the
        # clear left come after those.
        kept = [self._chunk_push_s.popleft() for _ in range(min(event.num_kept, len(self._chunk_push_s)))]
        for _ in range(min(event.num_chunks, len(self._chunk_push_s))):
            self._chunk_push_s.popleft()
        self._chunk_push_s.extendleft(reversed(kept))
        partial_s = self._clears_waiting.popleft() if self._clears_waiting else 0.0
        return [self._cleared_event(event.num_chunks, partial_s)]

    def _cleared_event(self, num_chunks: int, partial_s: float) -> InputClearedEvent:
        dropped_s = round(num_chunks * CHUNK_S + partial_s, 3)
        return InputClearedEvent(session_id=self.session_id, server_time_ms=self._now_ms(),
                                 num_chunks_dropped=num_chunks, audio_dropped_s=dropped_s)

    def _request_reply(self, command: RequestReply, now_s: float) -> list:
        if self._is_speaking:
            return self._error("reply_in_progress", REPLY_IN_PROGRESS_MESSAGE, command)  # one reply at a time
        self._reply_requests.append(command)
        if len(self._reply_requests) > 1:
            return []  # already asked for: the next chunk's reply answers both
        self._open_engine()
        # The request goes first: the worker may decide a pushed chunk before it reads a later command, and a
        # request that arrives after its chunk was decided waits for one that may never come.
        self.engine.request_reply(self.session_id, command.max_turn_tokens)
        if self.num_chunks_pending == 0:
            self._push_a_chunk_to_reply_at(now_s)
        self._reply_request_chunks = self.audio.num_chunks_pushed
        # Else chunks wait for the model, as far as this session knows: their decisions may already be on their
        # way here, with nothing left in the engine's queue; the engine then says ReplyWaitsForAudio.
        return []

    def _reply_request_dropped(self, event: ReplyRequestDropped) -> list:
        requests, self._reply_requests = self._reply_requests, []
        withdrawn, self._withdrawal_asked = self._withdrawal_asked, False
        if event.reason == "cancelled":
            # The client withdrew it: a protocol that promised the client a response for it closes that one.
            return [ReplyRequestWithdrawn(session_id=self.session_id)] if withdrawn and requests else []
        # The model began its own reply before the request reached it (this session sent it not knowing yet).
        return [error for request in requests for error in self._error("reply_in_progress", REPLY_IN_PROGRESS_MESSAGE,
                                                                       request)]

    def _push_a_chunk_to_reply_at(self, now_s: float) -> None:
        """The forced decision needs a chunk to decide on: the partial chunk padded, or one of silence."""
        if self.is_closed or self._closing_since_s is not None or self._is_speaking:
            return
        self._note_pushed(self.audio.flush(0.0) or self.audio.flush(CHUNK_S), now_s)

    # ---- helpers ---------------------------------------------------------------------
    def _open_engine(self) -> None:
        """The engine session opens at the first audio, so model options can be configured before it."""
        if not self._is_engine_open:
            self._is_engine_open = True
            # The engine's prefill budget counts a client by its key: an IPv6 client is its /64 (api/addresses.py).
            address = None if self.client_address is None else client_key(self.client_address)
            self.engine.open_session(self.session_id, self.options, self._engine_emit, address)

    def _note_pushed(self, num_chunks: int, now_s: float) -> None:
        self._chunk_push_s.extend([now_s] * num_chunks)  # for the onset latency of a reply they trigger

    def _flushed_events(self) -> list:
        out = []
        while self._flush_targets and self._chunks_done_through >= self._flush_targets[0] and not self._is_speaking:
            self._flush_targets.popleft()
            out.append(InputFlushedEvent(session_id=self.session_id, server_time_ms=self._now_ms(),
                                         num_chunks=self._num_chunks_decided,
                                         audio_time_s=round(self._num_chunks_decided * CHUNK_S, 3)))
        return out

    def _engine_ended(self, event: SessionEnded) -> list:
        self._is_engine_open = False
        if event.error_code is None:  # the close we asked for
            return self._closed(self._close_reason or "closed", self._close_code_pending)
        code = CLOSE_CODE_OF_END[EndCode(event.error_code)]
        return self._error(event.error_code, event.message, is_fatal=True) + self._closed(event.error_code, code)

    def _closed(self, reason: str, code: int) -> list:
        self.close_code = code
        self._closing_since_s = None
        return [SessionClosedEvent(
            session_id=self.session_id, server_time_ms=self._now_ms(), reason=reason,
            num_chunks_received=self.audio.num_chunks_pushed, num_chunks_decided=self._num_chunks_decided,
            audio_received_s=round(self.audio.audio_received_s, 3),
        )]

    def _error(self, code: str, message: str, command: Command | None = None, *, is_fatal: bool = False) -> list:
        """An ``error`` event naming the client event that caused it, when there was one."""
        self._observer.error_sent(code)
        return [ErrorEvent(session_id=self.session_id, server_time_ms=self._now_ms(), code=code, message=message,
                           is_fatal=is_fatal, event_type=getattr(command, "event_type", None),
                           event_id=getattr(command, "event_id", None))]

    def _settings(self) -> SessionSettings:
        return SessionSettings(system_prompt=self.options.system_prompt, max_turn_tokens=self.options.max_turn_tokens,
                               sampling=self.options.sampling, reply_mode=self.options.reply_mode,
                               decision_events=self.decision_events)

    def _limits(self) -> SessionLimits:
        c = self.config
        return SessionLimits(max_frame_bytes=c.max_frame_bytes, max_buffered_audio_s=c.max_buffered_audio_s,
                             idle_timeout_s=c.idle_timeout_s, max_session_s=c.max_session_s, chunk_s=CHUNK_S)

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

