"""The scheduler alone: registry and slots, round robin, batches, pacing, and the turn policy of update().

Real conversations and the real prompt encoder of the tiny model; the runner's results are built by hand
where the point is what the scheduler does with a given model token (its turn policy), and come from the
real runner where the point is the whole step.
"""

from __future__ import annotations

import pytest
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.conversation import Phase
from audio_interaction_server.spec import BLOCK_TOKENS
from audio_interaction_server.engine.events import (
    AudioCleared, Decision, EndCode, ReplyRequestDropped, SessionEnded, TurnBegin, TurnEnd,
)
from audio_interaction_server.engine.prompt import PromptEncoder
from audio_interaction_server.engine.runner import BatchResult, RowResult
from audio_interaction_server.engine.scheduler import LONG_ROW_TOKENS, OpenRefused, Scheduler
from audio_interaction_server.model.lm import FLEX_QUERY_ROWS

OPTIONS = SessionOptions(max_turn_tokens=6)
CHUNK = torch.zeros(128, 40)


def make_scheduler(tiny_model, *, max_batch_rows=None, **config):
    config = EngineConfig(**{"max_sessions": 3, "max_catch_up_speed": None, **config})
    cleared: list[int] = []

    def prepare_slot(slot: int, prefix: list[int]) -> bool:
        cleared.append(slot)
        return False

    scheduler = Scheduler(config, max_batch_rows or config.max_sessions, PromptEncoder(tiny_model.tokenizer, 4),
                          prepare_slot, clock=lambda: 0.0)
    return scheduler, cleared


def answered(batch, *tokens) -> BatchResult:
    return BatchResult(tuple(RowResult(token) for token in tokens), 0.0, 0.0)


def test_slots_lowest_first_refusals_name_their_code_and_an_end_frees_its_slot(tiny_model):
    scheduler, cleared = make_scheduler(tiny_model, max_sessions=2)
    a = scheduler.open("a", OPTIONS, print)
    b = scheduler.open("b", OPTIONS, print)
    assert (a.slot, b.slot) == (0, 1) and cleared == [0, 1]  # each slot is reset for its new session
    with pytest.raises(OpenRefused) as duplicate:
        scheduler.open("a", OPTIONS, print)
    with pytest.raises(OpenRefused) as full:
        scheduler.open("c", OPTIONS, print)
    assert duplicate.value.code is EndCode.DUPLICATE_SESSION and full.value.code is EndCode.CAPACITY
    assert scheduler.end(a, EndCode.INTERNAL_ERROR, "x") == [SessionEnded(EndCode.INTERNAL_ERROR, "x")]
    assert scheduler.end(a, None, "again") is None  # already ended: nothing twice
    assert scheduler.open("c", OPTIONS, print).slot == 0


def test_options_that_do_not_fit_are_refused_and_keep_no_slot(tiny_model):
    scheduler, _ = make_scheduler(tiny_model, max_sessions=1, max_positions=128, rollover_window_positions=None)
    with pytest.raises(OpenRefused) as refused:
        scheduler.open("a", SessionOptions(max_turn_tokens=100), print)
    assert refused.value.code is EndCode.INVALID_OPTIONS and "max_turn_tokens" in str(refused.value)
    assert scheduler.open("b", OPTIONS, print).slot == 0


def test_long_rows_run_in_a_batch_of_their_own_after_the_short_ones(tiny_model):
    scheduler, _ = make_scheduler(tiny_model)
    old = scheduler.open("old", OPTIONS, print)
    scheduler.add_audio(old, [CHUNK])
    (first,) = scheduler.schedule().batches  # a session's first row holds its whole prompt: long
    assert first[0].num_tokens > LONG_ROW_TOKENS
    scheduler.update(first, answered(first, T.KEEP_SILENCE))
    new = scheduler.open("new", OPTIONS, print)
    scheduler.add_audio(old, [CHUNK])
    scheduler.add_audio(new, [CHUNK])
    short, long = scheduler.schedule().batches
    assert [r.session_id for r in short] == ["old"] and [r.session_id for r in long] == ["new"]
    assert short[0].num_tokens == BLOCK_TOKENS


def test_every_ordinary_row_fits_the_in_place_attention_path():
    """The short batch is what FlexAttention serves: its bound is the kernel's query rows, not a copy of it."""
    assert LONG_ROW_TOKENS == FLEX_QUERY_ROWS
    # The longest ordinary row: a cancelled reply's last token, TEXT_END, then a listening block.
    assert 1 + BLOCK_TOKENS <= LONG_ROW_TOKENS


def test_more_ready_sessions_than_rows_take_turns(tiny_model):
    scheduler, _ = make_scheduler(tiny_model, max_sessions=3, max_batch_rows=2)
    sessions = [scheduler.open(f"s{i}", OPTIONS, print) for i in range(3)]
    for session in sessions:
        scheduler.add_audio(session, [CHUNK] * 3)
    seen = []
    for _ in range(3):
        plan = scheduler.schedule()
        ids = [row.session_id for row in plan.rows]
        assert len(ids) == 2
        seen += ids
        for batch in plan.batches:
            scheduler.update(batch, answered(batch, *[T.KEEP_SILENCE] * len(batch)))
    assert sorted(seen) == ["s0", "s0", "s1", "s1", "s2", "s2"]  # nobody starves, nobody runs ahead


def test_pacing_lets_a_backlog_through_at_its_burst_then_at_the_catch_up_speed(tiny_model):
    now = [0.0]
    scheduler, _ = make_scheduler(tiny_model, max_sessions=1, max_catch_up_speed=2.0, catch_up_burst_s=0.8)
    scheduler.clock = lambda: now[0]
    session = scheduler.open("s", OPTIONS, print)
    scheduler.add_audio(session, [CHUNK] * 10)

    def run_step() -> int:
        plan = scheduler.schedule()
        for batch in plan.batches:
            scheduler.update(batch, answered(batch, *[T.KEEP_SILENCE] * len(batch)))
        return len(plan.rows)

    assert [run_step() for _ in range(3)] == [1, 1, 0]  # a burst of 0.8 s = 2 chunks
    now[0] = 0.2  # at 2x real time, 0.2 s earns one chunk
    assert [run_step() for _ in range(2)] == [1, 0]
    scheduler.is_paced = False  # run_until_idle: everything queued, at once
    assert run_step() == 1


def test_an_addresss_sessions_share_one_opening_burst(tiny_model):
    """Connection churn (probe round 7): every session started with a full catch-up burst, so a client that
    opened connection after connection, each sending 10 s of audio at once, had it all heard at full speed. A
    session with a client address starts with no credits of its own: its opening backlog comes from its address's
    burst, shared by the address's sessions; what a session earns while connected stays its own."""
    now = [0.0]
    scheduler, _ = make_scheduler(tiny_model, max_sessions=3, max_catch_up_speed=2.0, catch_up_burst_s=0.8)
    scheduler.clock = lambda: now[0]

    def run_step() -> list[str]:
        plan = scheduler.schedule()
        for batch in plan.batches:
            scheduler.update(batch, answered(batch, *[T.KEEP_SILENCE] * len(batch)))
        return [row.session_id for row in plan.rows]

    first = scheduler.open("first", OPTIONS, print, client_address="203.0.113.7")
    scheduler.add_audio(first, [CHUNK] * 10)
    assert [run_step() for _ in range(3)] == [["first"], ["first"], []]  # the address's burst: 2 chunks
    scheduler.end(first, None, "closed")
    again = scheduler.open("again", OPTIONS, print, client_address="203.0.113.7")  # reconnects at once
    other = scheduler.open("other", OPTIONS, print, client_address="198.51.100.1")
    scheduler.add_audio(again, [CHUNK] * 10)
    scheduler.add_audio(other, [CHUNK] * 10)
    assert [run_step() for _ in range(3)] == [["other"], ["other"], []]  # a burst of its own for another address
    # At 2x real time, 0.2 s earns each session one chunk of its own; an address's burst refills at real time, half
    # a chunk in 0.2 s, so neither address pays one more yet.
    now[0] = 0.2
    assert [sorted(run_step()) for _ in range(3)] == [["again", "other"], [], []]
    # 0.4 s more: the address of "again" pays one chunk; "other" has drawn a whole burst from its address already (a
    # session draws at most one: the address pays an opening backlog, not a second catch-up speed).
    now[0] = 0.6
    assert [sorted(run_step()) for _ in range(4)] == [["again", "other"], ["again", "other"], ["again"], []]
    scheduler.end(again, None, "closed")
    scheduler.end(other, None, "closed")
    anonymous = scheduler.open("anonymous", OPTIONS, print)  # no client address (a Unix socket): its own burst
    scheduler.add_audio(anonymous, [CHUNK] * 10)
    assert [run_step() for _ in range(3)] == [["anonymous"], ["anonymous"], []]


def first_decision(scheduler, session, model_token):
    scheduler.add_audio(session, [CHUNK])
    (batch,) = scheduler.schedule().batches
    update = scheduler.update(batch, answered(batch, model_token))
    assert not update.failures
    ((_, events),) = update.events
    return events


def test_turn_policy_forces_a_requested_reply_once_and_on_request_stays_silent(tiny_model):
    scheduler, _ = make_scheduler(tiny_model)
    model = scheduler.open("model", OPTIONS, print)
    manual = scheduler.open("manual", SessionOptions(max_turn_tokens=6, reply_mode="on_request"), print)
    assert first_decision(scheduler, manual, T.TEXT_BEGIN) == [Decision(0, T.KEEP_SILENCE)]  # the model wanted to
    assert first_decision(scheduler, model, T.KEEP_SILENCE) == [Decision(0, T.KEEP_SILENCE)]
    assert scheduler.request_reply(model) == []
    events = first_decision(scheduler, model, T.KEEP_SILENCE)
    assert events == [Decision(1, T.TEXT_BEGIN), TurnBegin(0, 1, requested=True)] and model.requested_reply is None
    assert model.conversation.phase is Phase.SPEAKING
    assert scheduler.request_reply(model) == [ReplyRequestDropped("reply_in_progress")]  # mid-reply: dropped
    assert model.requested_reply is None
    scheduler.end(model, None, "done")  # its reply row would share the next step
    scheduler.request_reply(manual)
    assert first_decision(scheduler, manual, T.KEEP_SILENCE)[0] == Decision(1, T.TEXT_BEGIN)


def decide_queued(scheduler, session, model_token) -> list:
    """Decide every chunk the session has queued, the model choosing ``model_token`` each time; the events."""
    events = []
    while session.conversation.audio_queue:
        (batch,) = scheduler.schedule().batches
        update = scheduler.update(batch, answered(batch, model_token))
        assert not update.failures
        events += [event for _, batch_events in update.events for event in batch_events]
    return events


@pytest.mark.parametrize("reply_mode", ["model", "on_request"])
def test_a_requested_reply_answers_the_audio_queued_before_the_request(tiny_model, reply_mode):
    """A push-to-talk client sent its utterance faster than real time, then input.flush and response.create: the reply
    began at the first queued chunk, after 0.4 s of a 10.8 s utterance (first-hour review). It begins at the last
    chunk queued when the request came, once the model has heard everything sent before it."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=6, reply_mode=reply_mode), print)
    scheduler.add_audio(session, [CHUNK] * 3)
    assert scheduler.request_reply(session) == []
    scheduler.add_audio(session, [CHUNK])  # after the request: heard after the reply
    events = decide_queued(scheduler, session, T.KEEP_SILENCE)
    assert events[:4] == [Decision(0, T.KEEP_SILENCE), Decision(1, T.KEEP_SILENCE), Decision(2, T.TEXT_BEGIN),
                          TurnBegin(0, 2, requested=True)], events


def test_a_reply_the_model_begins_on_audio_queued_before_a_request_comes_first_and_the_request_follows(tiny_model):
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=2), print)
    scheduler.add_audio(session, [CHUNK] * 3)
    scheduler.request_reply(session)
    (batch,) = scheduler.schedule().batches  # chunk 0: the model begins a reply of its own
    ((_, events),) = scheduler.update(batch, answered(batch, T.TEXT_BEGIN)).events
    assert events == [Decision(0, T.TEXT_BEGIN), TurnBegin(0, 0, requested=False)]
    assert session.requested_reply is not None  # still pending: its audio is not all heard
    events = decide_queued(scheduler, session, T.KEEP_SILENCE)
    begins = [event for event in events if isinstance(event, TurnBegin)]
    assert begins == [TurnBegin(1, 2, requested=True)] and session.requested_reply is None, events


def test_cancelling_the_models_own_reply_keeps_a_request_waiting_for_its_chunk(tiny_model):
    """response.cancel during a reply the model began of its own withdrew a request that waited for its chunk too,
    and said so with nothing a client hears: the Realtime codec then refused every later response.create (review of
    e6c3154). A cancel ends the reply in progress; only while the model listens does it withdraw a request."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=6), print)
    scheduler.add_audio(session, [CHUNK] * 3)
    scheduler.request_reply(session)
    (batch,) = scheduler.schedule().batches
    scheduler.update(batch, answered(batch, T.TEXT_BEGIN))  # chunk 0: the model's own reply begins
    cancelled = scheduler.cancel(session)
    assert not any(isinstance(event, ReplyRequestDropped) for event in cancelled), cancelled
    assert session.requested_reply is not None
    events = decide_queued(scheduler, session, T.KEEP_SILENCE)
    assert [e for e in events if isinstance(e, TurnBegin)] == [TurnBegin(1, 2, requested=True)], events


def test_a_requested_reply_whose_audio_was_cleared_begins_at_the_next_chunk(tiny_model):
    """input.clear drops the audio a pending request was to answer: the request stays, for the audio that follows."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=6, reply_mode="on_request"), print)
    scheduler.add_audio(session, [CHUNK] * 3)
    scheduler.request_reply(session)
    assert scheduler.clear_audio(session) == [AudioCleared(3)]
    assert first_decision(scheduler, session, T.KEEP_SILENCE)[:2] == [Decision(0, T.TEXT_BEGIN),
                                                                      TurnBegin(0, 0, requested=True)]


def test_every_reply_request_is_answered_once_begun_or_dropped(tiny_model):
    """A request the model's own reply overtook was dropped without a word: the Realtime codec then matched the
    model's reply to it (the request's cap and metadata on a reply it never asked for) and the request was lost.
    The engine now answers each request: the reply it begins says it was requested, or the request is dropped."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", OPTIONS, print)
    events = first_decision(scheduler, session, T.TEXT_BEGIN)  # the model's own reply
    assert events == [Decision(0, T.TEXT_BEGIN), TurnBegin(0, 0, requested=False)]
    assert scheduler.request_reply(session, 3) == [ReplyRequestDropped("reply_in_progress")]
    scheduler.cancel(session)
    assert scheduler.request_reply(session, 3) == []  # listening: taken ...
    assert scheduler.cancel(session) == [ReplyRequestDropped("cancelled")]  # ... and withdrawn before it began
    assert session.requested_reply is None and scheduler.cancel(session) == []


def test_clear_audio_counts_what_it_drops(tiny_model):
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", OPTIONS, print)
    scheduler.add_audio(session, [CHUNK] * 4)
    assert scheduler.clear_audio(session) == [AudioCleared(4)]
    assert scheduler.schedule().batches == ()


def test_a_clear_keeps_the_chunks_pushed_before_its_bound_and_drops_the_newest(tiny_model):
    """A Realtime commit's chunks outlive a clear after it (``ClearAudio.keep_before``, counted over every chunk the
    session pushed: decided, dropped and queued); the chunks after them go, with their tickets, and a pending
    request answers the last chunk kept."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=6, reply_mode="on_request"), print)
    scheduler.add_audio(session, [CHUNK] * 2)  # pushed 0, 1
    assert scheduler.clear_audio(session) == [AudioCleared(2)]
    assert first_decision(scheduler, session, T.KEEP_SILENCE) == [Decision(0, T.KEEP_SILENCE)]  # pushed 2
    scheduler.add_audio(session, [CHUNK] * 4)  # pushed 3 to 6
    oldest = session.waiting_since()
    scheduler.request_reply(session)  # due at the last chunk queued: pushed 6
    assert scheduler.clear_audio(session, keep_before=5) == [AudioCleared(2, 2)]  # 3 and 4 stay, 5 and 6 go
    assert len(session.conversation.audio_queue) == 2 and session.waiting_since() == oldest
    events = decide_queued(scheduler, session, T.KEEP_SILENCE)
    assert events[:3] == [Decision(1, T.KEEP_SILENCE), Decision(2, T.TEXT_BEGIN), TurnBegin(0, 2, requested=True)]
    assert scheduler.clear_audio(session, keep_before=5) == [AudioCleared(0, 0)]  # nothing queued: still answered
    scheduler.add_audio(session, [CHUNK] * 2)  # pushed 7, 8: a bound below them keeps none
    assert scheduler.clear_audio(session, keep_before=7) == [AudioCleared(2, 0)]


def test_a_normal_close_ends_the_running_reply_first(tiny_model):
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", OPTIONS, print)
    first_decision(scheduler, session, T.TEXT_BEGIN)
    events = scheduler.end(session, None, "closed by the client")
    assert events == [TurnEnd(0, (), "session_closed"), SessionEnded(None, "closed by the client")]


def test_a_failed_row_and_a_failed_commit_are_reported_for_their_session_only(tiny_model):
    scheduler, _ = make_scheduler(tiny_model)
    a, b, c = (scheduler.open(name, OPTIONS, print) for name in "abc")
    for session in (a, b, c):
        scheduler.add_audio(session, [CHUNK])
    (batch,) = scheduler.schedule().batches
    result = BatchResult((RowResult(T.KEEP_SILENCE), RowResult.failed(FloatingPointError("nan")),
                          RowResult(12345)), 0.0, 0.0)  # c: a decision token that is neither choice
    update = scheduler.update(batch, result)
    assert [(f.session.session_id, type(f.error)) for f in update.failures] == [("b", FloatingPointError),
                                                                               ("c", ValueError)]
    assert [(s.session_id, events) for s, events in update.events] == [("a", [Decision(0, T.KEEP_SILENCE)])]


def test_a_second_clear_with_the_same_bound_keeps_the_chunks_the_first_one_kept(tiny_model):
    """A Realtime commit (the session's flush: chunks 0 and 1), then audio, a clear, more audio and a clear again
    before the model heard anything: each clear keeps the committed chunks. The first clear's drops (2, 3) lie after
    the bound, so they say nothing of where the queue starts; the second clear dropped the commit's chunks too."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=6, reply_mode="on_request"), print)
    scheduler.add_audio(session, [CHUNK] * 4)  # pushed 0, 1 (flushed: a commit), 2, 3
    assert scheduler.clear_audio(session, keep_before=2) == [AudioCleared(2, 2)]  # 0 and 1 stay, 2 and 3 go
    scheduler.add_audio(session, [CHUNK] * 2)  # pushed 4, 5
    assert scheduler.clear_audio(session, keep_before=2) == [AudioCleared(2, 2)]  # 0 and 1 stay, 4 and 5 go
    assert len(session.conversation.audio_queue) == 2
    scheduler.add_audio(session, [CHUNK] * 2)  # pushed 6, 7 (flushed: a second commit at 8)
    scheduler.add_audio(session, [CHUNK] * 1)  # pushed 8
    assert scheduler.clear_audio(session, keep_before=8) == [AudioCleared(1, 4)]  # 0, 1, 6, 7 stay; 8 goes


def test_the_numbers_of_decided_chunks_are_let_go_at_the_next_push(tiny_model):
    """Without a clear, a long session's decided chunks leave nothing behind."""
    scheduler, _ = make_scheduler(tiny_model)
    session = scheduler.open("s", SessionOptions(max_turn_tokens=6, reply_mode="on_request"), print)
    for _ in range(5):
        scheduler.add_audio(session, [CHUNK] * 2)
        decide_queued(scheduler, session, T.KEEP_SILENCE)
    scheduler.add_audio(session, [CHUNK])
    assert [chunk.number for chunk in session.queued_chunks] == [10]
