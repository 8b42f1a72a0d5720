"""One session must not slow another down beyond its share: the worker's step order, the
event loop's per-frame work (real tiny model, real sessions, no sockets)."""

from __future__ import annotations

from server.config import EngineConfig, SessionOptions
from server.engine_events import Decision
from server.worker import Worker

OPTIONS = SessionOptions(max_turn_tokens=6)


def test_a_short_row_is_emitted_before_a_neighbours_long_row_runs(tiny_model, stream_chunks, monkeypatch):
    """A newcomer's first row (the whole system prompt) or a context rollover (a history of audio
    re-encoded) is a long batch of its own; a listening session in the same step gets its decision
    as soon as its short batch is done, not after the long one."""
    log: list[tuple[str, str]] = []
    real_last_hidden = tiny_model.lm.last_hidden

    def recording_last_hidden(batch, cache):
        log.append(("forward", ""))
        return real_last_hidden(batch, cache)

    monkeypatch.setattr(tiny_model.lm, "last_hidden", recording_last_hidden)
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))

    def emit_for(session_id: str):
        return lambda events: log.extend(("decision", session_id) for e in events if isinstance(e, Decision))

    chunks = stream_chunks[0]
    worker.open_session("listener", OPTIONS, emit_for("listener"))
    worker.push_audio("listener", chunks[:1])
    worker.run_until_idle()  # the listener's own long first row is behind it
    log.clear()
    worker.push_audio("listener", chunks[1:2])
    worker.open_session("newcomer", OPTIONS, emit_for("newcomer"))
    worker.push_audio("newcomer", chunks[:1])
    stats = worker.step()
    assert stats is not None and stats.num_rows == 2 and stats.num_decisions == 2
    assert log == [("forward", ""), ("decision", "listener"), ("forward", ""), ("decision", "newcomer")], log
