"""A session's replies as the client sees them: rendered, stamped, cut into sentences for TTS.

``ReplyRenderer`` turns token-level engine events into wire events, built stamped with the server
clock the presenter gives (one stamp for an event and the segments its text completes, so stamps
never go back); the presenter adds the ``segment`` events of each reply, and the onset latency of
each ``turn_begin``. The session decides which events exist; this decides how they read.
"""

from __future__ import annotations

from audio_interaction_server.engine.events import Decision, EngineEvent
from audio_interaction_server.protocol import (
    LiveDecisionEvent, LiveTurnBeginEvent, SegmentEvent, TextDeltaEvent, TurnEndEvent,
)
from audio_interaction_server.render.replies import ReplyRenderer
from audio_interaction_server.render.segmenter import Segmenter

# A reply's unfinished sentence is spoken only when the reply ended by itself: after a cancel the
# client asked for silence, and a reply cut by a closing session has no one to speak to.
_SPOKEN_ENDS = ("text_end", "max_tokens")


class ReplyPresenter:
    """One per session; not thread-safe."""

    def __init__(self, tokenizer, session_id: str, decision_events: bool = False) -> None:
        self.session_id = session_id
        self.decision_events = decision_events
        self._renderer = ReplyRenderer(tokenizer, session_id)
        self._segmenter: Segmenter | None = None
        self._num_segments = 0

    def present(self, event: EngineEvent, stamp_ms: int, onset_s: float | None = None) -> list:
        """The wire events of one engine event; ``onset_s`` is the onset latency a TurnBegin reports."""
        if type(event) is Decision and not self.decision_events:
            return []  # not sent (the default), and a decision ends no reply and completes no sentence
        return [out for live in self._renderer.render(event, stamp_ms) for out in self._live(live, stamp_ms, onset_s)]

    def cut(self, stamp_ms: int) -> list:
        """The open reply's ``turn_end`` (``session_closed``) for a session that ends without the engine's."""
        return [out for live in self._renderer.cut(stamp_ms) for out in self._live(live, stamp_ms, None)]

    def _live(self, live, stamp_ms: int, onset_s: float | None) -> list:
        """A stamped event the renderer just made for this session (no one else holds it, so its onset is set on
        it) and the segments around it."""
        if type(live) is LiveDecisionEvent:
            return [live]  # most events: no reply of its own, no sentence
        before: list = []  # a reply's last segment goes before its turn_end
        after: list = []  # a delta's completed sentences go right after it
        if isinstance(live, LiveTurnBeginEvent):
            self._segmenter, self._num_segments = Segmenter(), 0
            live.onset_latency_ms = None if onset_s is None else round(onset_s * 1000, 3)
        if isinstance(live, TextDeltaEvent) and self._segmenter is not None:
            after = self._segments(live.turn, self._segmenter.push(live.text), stamp_ms)
        if isinstance(live, TurnEndEvent) and self._segmenter is not None:
            if live.end_reason in _SPOKEN_ENDS:
                before = self._segments(live.turn, self._segmenter.finish(), stamp_ms)
            self._segmenter = None
        return before + [live] + after

    def _segments(self, turn: int, texts: list[str], stamp_ms: int) -> list:
        out = []
        for text in texts:
            out.append(SegmentEvent(session_id=self.session_id, server_time_ms=stamp_ms, turn=turn,
                                    index=self._num_segments, text=text))
            self._num_segments += 1
        return out
