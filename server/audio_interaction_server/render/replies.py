"""Renders a session's token-level engine events as wire events (emotion, text deltas, turn ends)."""

from __future__ import annotations

from audio_interaction_server import spec as T
from audio_interaction_server.render.detokenizer import StreamingDetokenizer
from audio_interaction_server.engine.events import ContextRollover, Decision, EngineEvent, TurnBegin, TurnEnd, TurnToken
from audio_interaction_server.protocol import (
    ContextRolloverEvent,
    DecisionEvent,
    EmotionEvent,
    TextDeltaEvent,
    TurnBeginEvent,
    TurnEndEvent,
    LIVE_FORMS,
    _Event,
)


class ReplyRenderer:
    """One per session; not thread-safe. Engine events without a wire form render to nothing."""

    def __init__(self, tokenizer, session_id: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.session_id = session_id
        self._detokenizer: StreamingDetokenizer | None = None
        self._num_turn_tokens = 0
        self._turn_index = 0
        self._turn_token_ids: list[int] = []  # the open turn's ids so far, for a turn_end the engine never sends

    def render(self, event: EngineEvent, stamp_ms: int | None = None) -> list[_Event]:
        """The wire events of ``event``; with ``stamp_ms``, in their stamped form (``protocol.LIVE_FORMS``) with
        that ``server_time_ms``: each built once, not built and then copied into its stamped form."""
        sid = self.session_id
        if isinstance(event, Decision):
            decision = "text_begin" if event.token_id == T.TEXT_BEGIN else "keep_silence"
            return [self._new(DecisionEvent, stamp_ms, session_id=sid, chunk=event.chunk_index, token_id=event.token_id,
                              decision=decision, audio_time_s=round((event.chunk_index + 1) * T.CHUNK_S, 3))]
        if isinstance(event, TurnBegin):
            self._detokenizer = StreamingDetokenizer(self.tokenizer)
            self._num_turn_tokens = 0
            self._turn_index, self._turn_token_ids = event.turn_index, []
            return [self._new(TurnBeginEvent, stamp_ms, session_id=sid, turn=event.turn_index, chunk=event.chunk_index,
                              audio_time_s=round((event.chunk_index + 1) * T.CHUNK_S, 3), requested=event.requested)]
        if isinstance(event, TurnToken):
            return self._token(event, stamp_ms)
        if isinstance(event, TurnEnd):
            return self._end(event, stamp_ms)
        if isinstance(event, ContextRollover):
            return [self._new(ContextRolloverEvent, stamp_ms, session_id=sid, from_positions=event.from_positions,
                              to_positions=event.to_positions, kept_chunks=event.kept_chunks)]
        return []

    @staticmethod
    def _new(form: type[_Event], stamp_ms: int | None, **fields) -> _Event:
        """A ``form`` event of ``fields``; with ``stamp_ms``, its stamped form with that ``server_time_ms``."""
        if stamp_ms is None:
            return form(**fields)
        return LIVE_FORMS[form](server_time_ms=stamp_ms, **fields)

    def _token(self, event: TurnToken, stamp_ms: int | None) -> list[_Event]:
        assert self._detokenizer is not None, "TurnToken before TurnBegin"
        is_first = self._num_turn_tokens == 0
        self._num_turn_tokens += 1
        self._turn_token_ids.append(event.token_id)
        if is_first and event.token_id in T.EMOTION_NAMES:
            self._detokenizer.push(event.token_id)  # recorded, never rendered as text
            return [self._new(EmotionEvent, stamp_ms, session_id=self.session_id, turn=event.turn_index,
                              emotion=T.EMOTION_NAMES[event.token_id], token_id=event.token_id)]
        delta = self._detokenizer.push(event.token_id)
        if not delta:
            return []
        return [self._new(TextDeltaEvent, stamp_ms, session_id=self.session_id, turn=event.turn_index, text=delta)]

    def cut(self, stamp_ms: int | None = None) -> list[_Event]:
        """End the open turn, if any, with ``end_reason`` "session_closed": for a session that ends without
        the engine's TurnEnd (its connection vanished), so every turn_begin still gets its turn_end. ``stamp_ms``
        as for ``render``."""
        if self._detokenizer is None:
            return []
        return self._end(TurnEnd(self._turn_index, tuple(self._turn_token_ids), "session_closed"), stamp_ms)

    def _end(self, event: TurnEnd, stamp_ms: int | None) -> list[_Event]:
        assert self._detokenizer is not None, "TurnEnd before TurnBegin"
        out: list[_Event] = []
        tail = self._detokenizer.finish()
        if tail:
            out.append(self._new(TextDeltaEvent, stamp_ms, session_id=self.session_id, turn=event.turn_index,
                                 text=tail))
        out.append(self._new(TurnEndEvent, stamp_ms, session_id=self.session_id, turn=event.turn_index,
                             text=self._detokenizer.text, token_ids=list(event.token_ids),
                             num_tokens=len(event.token_ids), end_reason=event.end_reason))
        self._detokenizer = None
        return out
