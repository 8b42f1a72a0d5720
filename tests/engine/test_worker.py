"""The batched worker on the tiny real model: batched == alone, isolation, capacity, close/cancel."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.engine.events import (
    AudioCleared, ContextRollover, Decision, EndCode, ReplyRequestDropped, SessionEnded, SessionStarted, TurnBegin,
    TurnEnd, TurnToken,
)
from audio_interaction_server.engine.worker import WORKER_FAILED_MESSAGE, Worker

OPTIONS = SessionOptions(max_turn_tokens=6)
STRING_END_CODES: list[SessionEnded] = []


@pytest.fixture(autouse=True)
def check_end_codes():
    STRING_END_CODES.clear()
    yield
    assert STRING_END_CODES == [], "the worker ended a session with a plain string, not an EndCode"


class Recorder:
    def __init__(self) -> None:
        self.events = []

    def __call__(self, events) -> None:
        self.events.extend(events)
        # Every end the worker emits names an EndCode member (None: the client's close). Checked after the
        # test (check_end_codes): an assertion raised here, inside the worker's emit, would be caught by it.
        STRING_END_CODES.extend(e for e in events if isinstance(e, SessionEnded)
                                and e.error_code is not None and type(e.error_code) is not EndCode)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def protocol(self):
        """Everything but the slot number, which legitimately depends on who else is connected."""
        return [e for e in self.events if not isinstance(e, SessionStarted)]


def run_joining_sessions(tiny_model, stream_chunks, session_ids, **engine):
    """Sessions join at different times, so rows sit at different positions in one step."""
    streams = stream_chunks[:4]
    join_after_steps = [0, 0, 3, 7]
    worker = Worker(tiny_model, EngineConfig(max_sessions=4, **engine))
    recorders = {}
    steps = 0
    while True:
        for i in session_ids:
            if i not in recorders and steps >= join_after_steps[i]:
                recorders[i] = Recorder()
                worker.open_session(f"s{i}", OPTIONS, recorders[i])
                worker.push_audio(f"s{i}", streams[i])
        if worker.step() is None and len(recorders) == len(session_ids):
            return recorders
        steps += 1


def test_sessions_batched_together_equal_each_alone(tiny_model, stream_chunks):
    streams = stream_chunks[:4]

    def run(session_ids):
        return run_joining_sessions(tiny_model, stream_chunks, session_ids)

    together = run([0, 1, 2, 3])
    speaking = 0
    for i in range(4):
        alone = run([i])[i]
        assert together[i].protocol == alone.protocol, f"session {i} differs when batched"
        assert len(alone.of(Decision)) == len(streams[i])
        speaking += len(alone.of(TurnBegin))
    assert speaking > 0, "the tiny model never replied: the speaking path went untested"


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_in_place_attention_gives_the_same_events_as_gather(tiny_model, stream_chunks):
    """The GPU attention path (compiled FlexAttention over the cache in place), run on CPU."""
    gather = run_joining_sessions(tiny_model, stream_chunks, [0, 1, 2, 3], attention="gather")
    flex = run_joining_sessions(tiny_model, stream_chunks, [0, 1, 2, 3], attention="flex")
    for i in range(4):
        assert flex[i].protocol == gather[i].protocol, f"session {i} differs with in-place attention"
    assert any(flex[i].of(TurnBegin) for i in range(4))


def test_nan_in_one_session_ends_only_that_session(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=3))
    good, bad = Recorder(), Recorder()
    worker.open_session("good", OPTIONS, good)
    worker.open_session("bad", OPTIONS, bad)
    poisoned = stream_chunks[1][:3].clone()
    poisoned[1] = float("nan")
    worker.push_audio("good", stream_chunks[0])
    worker.push_audio("bad", poisoned)
    worker.run_until_idle()
    assert bad.of(SessionEnded)[0].error_code == "numerical_error"
    assert len(bad.of(Decision)) == 1
    assert good.of(SessionEnded) == [] and len(good.of(Decision)) == len(stream_chunks[0])
    # The freed slot is reusable and the survivor's results equal a clean run.
    alone = Recorder()
    solo = Worker(tiny_model, EngineConfig(max_sessions=1))
    solo.open_session("good", OPTIONS, alone)
    solo.push_audio("good", stream_chunks[0])
    solo.run_until_idle()
    assert good.protocol == alone.protocol


def test_capacity_is_refused_with_a_clear_error(tiny_model):
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    recorders = [Recorder() for _ in range(3)]
    for i, rec in enumerate(recorders):
        worker.open_session(f"s{i}", OPTIONS, rec)
    worker.step()
    assert [type(e) for e in recorders[2].events] == [SessionEnded]
    assert recorders[2].events[0].error_code == "capacity"
    worker.close_session("s0")
    late = Recorder()
    worker.open_session("s3", OPTIONS, late)
    worker.step()
    assert late.of(SessionStarted)[0].slot == 0  # the closed session's slot was freed


def speak_until_reply(worker, rec, session_id, chunks):
    """Feed chunks one at a time until the session starts a reply."""
    for chunk in chunks:
        worker.push_audio(session_id, chunk[None])
        worker.step()
        if rec.of(TurnBegin):
            return True
    return False


def test_close_mid_reply_ends_the_turn_and_frees_the_slot(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", SessionOptions(max_turn_tokens=50), rec)
    assert speak_until_reply(worker, rec, "s", torch.cat(stream_chunks))
    worker.step()  # one reply token
    worker.close_session("s")
    worker.step()
    end = rec.of(TurnEnd)[-1]
    assert end.end_reason == "session_closed" and rec.events[-1] == SessionEnded(None, "closed by the client")
    assert worker.num_sessions == 0


def test_cancel_mid_reply_returns_to_listening(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", SessionOptions(max_turn_tokens=50), rec)
    chunks = torch.cat(stream_chunks)
    assert speak_until_reply(worker, rec, "s", chunks)
    worker.step()
    worker.cancel("s")
    worker.push_audio("s", chunks[:2])
    worker.run_until_idle()
    cancelled = rec.of(TurnEnd)[0]
    assert cancelled.end_reason == "cancelled" and len(cancelled.token_ids) == 1
    decisions_after = [e for e in rec.events[rec.events.index(cancelled):] if isinstance(e, Decision)]
    assert len(decisions_after) == 2


def test_turn_cap_ends_replies(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", SessionOptions(max_turn_tokens=3), rec)
    worker.push_audio("s", torch.cat(stream_chunks))
    worker.run_until_idle()
    ends = rec.of(TurnEnd)
    assert ends and all(len(e.token_ids) <= 3 for e in ends)
    assert all(e.end_reason in ("text_end", "max_tokens") for e in ends)
    for e in ends:
        assert T.TEXT_END not in e.token_ids and T.TEXT_BEGIN not in e.token_ids
    assert len(rec.of(TurnToken)) == sum(len(e.token_ids) for e in ends)


def test_context_budget_ends_one_session_cleanly(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=2, max_positions=128, rollover_window_positions=None))
    short, normal = Recorder(), Recorder()
    worker.open_session("short", OPTIONS, short)
    worker.push_audio("short", stream_chunks[0])
    worker.run_until_idle()
    assert short.of(SessionEnded)[0].error_code == "context_full"
    worker.open_session("next", OPTIONS, normal)
    worker.push_audio("next", stream_chunks[1][:2])
    worker.run_until_idle()
    assert len(normal.of(Decision)) == 2


def test_worker_thread_serves_sessions_and_stops(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    done = threading.Event()
    rec = Recorder()

    def emit(events):
        rec(events)
        if len(rec.of(Decision)) == 3:
            done.set()

    worker.start()
    try:
        worker.open_session("s", OPTIONS, emit)
        worker.push_audio("s", stream_chunks[0][:3])
        assert done.wait(30)
    finally:
        started = time.monotonic()
        worker.stop()
    assert time.monotonic() - started < 5
    assert not worker._thread.is_alive() and worker.failure is None
    assert rec.events[-1] == SessionEnded("server_shutdown", "the server is shutting down")


def test_a_dead_worker_answers_every_open_with_worker_failed(tiny_model, stream_chunks):
    """Opens still in the inbox when the step loop dies, and opens posted afterwards, are all refused."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    queued, late = Recorder(), Recorder()
    worker.open_session("queued", OPTIONS, queued)
    worker.push_audio("queued", stream_chunks[0][:2])

    def crash():
        raise RuntimeError("simulated worker crash")

    worker.step = crash  # _run calls self.step(): the loop dies before it applies the queued open
    worker.start()
    worker._thread.join(10)
    assert not worker.is_alive and isinstance(worker.failure, RuntimeError)
    worker.open_session("late", OPTIONS, late)
    worker.push_audio("late", stream_chunks[1][:2])  # dropped: there is no session to feed
    for recorder in (queued, late):
        assert recorder.events == [SessionEnded("worker_failed", WORKER_FAILED_MESSAGE)]  # details: the log


def test_opens_queued_when_the_worker_stops_or_posted_after_are_answered_with_server_shutdown(tiny_model):
    """An open still in the inbox when the step loop stops (a front's first audio racing the shutdown), and one
    posted after, got neither SessionStarted nor SessionEnded: the client waited for the front's own timeout."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    queued, late = Recorder(), Recorder()
    worker.open_session("queued", OPTIONS, queued)  # never applied: the worker never steps
    worker.stop()
    worker.open_session("late", OPTIONS, late)
    for recorder in (queued, late):
        assert recorder.events == [SessionEnded("server_shutdown", "the server is shutting down")]


def test_a_refused_open_whose_first_audio_came_with_it_leaves_nothing_behind(tiny_model):
    """The server posts a session's open and its first audio together: a refused open (here: no free slot) had
    that audio's features computed and their running maximum kept, one entry per refused session, for ever."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    blocks = PaddedBlocks(np.random.default_rng(0).standard_normal((1, 6640)).astype(np.float32) * 0.1, 0)
    worker.open_session("holder", OPTIONS, Recorder())
    worker.push_audio("holder", blocks)
    worker.step()
    refused = [Recorder() for _ in range(20)]
    for index, recorder in enumerate(refused):
        worker.open_session(f"refused-{index}", OPTIONS, recorder)
        worker.push_audio(f"refused-{index}", blocks)
        worker.step()
    assert all(recorder.events[0].error_code == "capacity" for recorder in refused)
    assert "holder" in worker.features and not any(f"refused-{i}" in worker.features for i in range(20))
    duplicate = Recorder()  # a refused duplicate of a live session keeps that session's running maximum
    worker.open_session("holder", OPTIONS, duplicate)
    worker.step()
    assert duplicate.events[0].error_code == "duplicate_session" and "holder" in worker.features


def test_audio_the_model_never_hears_costs_no_features(tiny_model, monkeypatch):
    """The worker computed every pushed chunk's log-mel as it arrived, heard or not: a client that sent 56 s and
    cleared it (or left), again and again, had it compute about a thousand seconds of features a second, and its
    neighbours' decisions came seconds late (probe, round nine). A chunk's features are computed when it is next to
    be heard."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    noise = np.random.default_rng(0).standard_normal((140, 6640)).astype(np.float32) * 0.1  # 56 s of chunks
    stft_rows: list[int] = []
    real_stft = torch.stft

    def counting_stft(signal, *args, **kwargs):
        stft_rows.append(signal.shape[0] if signal.dim() == 2 else 1)
        return real_stft(signal, *args, **kwargs)

    monkeypatch.setattr(torch, "stft", counting_stft)
    clears, leaves = Recorder(), Recorder()
    worker.open_session("clears", OPTIONS, clears)
    worker.open_session("leaves", OPTIONS, leaves)
    worker.push_audio("clears", PaddedBlocks(noise, 0))
    worker.clear_audio("clears")
    worker.push_audio("leaves", PaddedBlocks(noise, 0))
    worker.close_session("leaves")
    worker.run_until_idle()
    assert clears.of(AudioCleared) == [AudioCleared(140)] and leaves.events[-1].error_code is None
    assert sum(stft_rows) == 0
    worker.push_audio("clears", PaddedBlocks(noise[:3], 0))  # audio heard: each chunk's features, once
    worker.run_until_idle()
    assert len(clears.of(Decision)) == 3 and sum(stft_rows) == 3


def test_emit_failure_ends_only_that_session(tiny_model, stream_chunks):
    worker = Worker(tiny_model, EngineConfig(max_sessions=2))
    good = Recorder()

    def broken(events):
        if any(isinstance(e, Decision) for e in events):
            raise RuntimeError("client went away")

    worker.open_session("broken", OPTIONS, broken)
    worker.open_session("good", OPTIONS, good)
    worker.push_audio("broken", stream_chunks[0][:2])
    worker.push_audio("good", stream_chunks[0][:2])
    worker.run_until_idle()
    assert worker.num_sessions == 1 and len(good.of(Decision)) == 2


@pytest.mark.parametrize("seed", [1, 2])
def test_sampling_with_a_seed_is_reproducible(tiny_model, stream_chunks, seed):
    from audio_interaction_server.options import SamplingOptions

    options = SessionOptions(max_turn_tokens=5, sampling=SamplingOptions(temperature=1.0, top_k=50, seed=seed))
    runs = []
    for _ in range(2):
        worker = Worker(tiny_model, EngineConfig(max_sessions=1))
        rec = Recorder()
        worker.open_session("s", options, rec)
        worker.push_audio("s", torch.cat(stream_chunks[:2]))
        worker.run_until_idle()
        runs.append(rec.protocol)
    assert runs[0] == runs[1]


def test_rollover_keeps_a_long_session_inside_its_budget(tiny_model, stream_chunks):
    config = EngineConfig(max_sessions=2, max_positions=400, rollover_window_positions=120)
    worker = Worker(tiny_model, config)
    long_session, neighbour = Recorder(), Recorder()
    worker.open_session("long", OPTIONS, long_session)
    worker.open_session("neighbour", OPTIONS, neighbour)
    audio = torch.cat(stream_chunks)  # ~60 chunks: several rollovers at this budget
    worker.push_audio("long", audio)
    worker.push_audio("neighbour", audio[:10])
    worker.run_until_idle()
    rollovers = long_session.of(ContextRollover)
    assert len(rollovers) >= 2 and not long_session.of(SessionEnded)
    assert len(long_session.of(Decision)) == len(audio)
    for event in rollovers:
        assert event.from_positions <= 400 and event.to_positions <= 46 + 120 + 2 * 13
    assert len(neighbour.of(Decision)) == 10


def test_scripted_turns_follow_their_schedule(tiny_model, stream_chunks):
    """The benchmark override: a reply every 5 chunks (staggered by slot), each exactly 3 tokens."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=2, scripted_turns={"every_chunks": 5, "reply_tokens": 3}))
    recorders = [Recorder(), Recorder()]
    for i, recorder in enumerate(recorders):
        worker.open_session(f"s{i}", OPTIONS, recorder)
        worker.push_audio(f"s{i}", torch.cat([stream_chunks[0], stream_chunks[1]])[:12])
    worker.run_until_idle()
    for slot, recorder in enumerate(recorders):
        assert len(recorder.of(Decision)) == 12
        begins = [e.chunk_index for e in recorder.of(TurnBegin)]
        assert begins == [k for k in range(12) if (k + slot) % 5 == 4]
        ends = recorder.of(TurnEnd)
        assert len(ends) == len(begins) and all(len(e.token_ids) == 3 and e.end_reason == "text_end" for e in ends)
        assert all(not T.is_control_token(t) for e in ends for t in e.token_ids)


# ---- replies on request and clearing queued audio ----------------------------------------------------------

def decisions_alone(tiny_model, chunks, options=OPTIONS):
    """The session's protocol when the model decides every chunk by itself (greedy, no requests)."""
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", options, rec)
    worker.push_audio("s", chunks)
    worker.run_until_idle()
    return rec


def first_silent_chunk(rec) -> int:
    """The first chunk the model, listening, decided to stay silent on."""
    speaking_until = -1
    for event in rec.events:
        if isinstance(event, Decision) and event.chunk_index > speaking_until and event.token_id == T.KEEP_SILENCE:
            return event.chunk_index
        if isinstance(event, TurnBegin):
            speaking_until = event.chunk_index  # a reply's own decision; audio queued meanwhile comes after
    raise AssertionError("the tiny model never stayed silent: nothing to force")


@pytest.mark.parametrize("reply_mode", ["model", "on_request"])
def test_a_requested_reply_starts_at_the_next_decided_chunk(tiny_model, stream_chunks, reply_mode):
    chunks = stream_chunks[2]
    silent_at = first_silent_chunk(decisions_alone(tiny_model, chunks))
    options = SessionOptions(max_turn_tokens=6, reply_mode=reply_mode)
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", options, rec)
    worker.push_audio("s", chunks[:silent_at])
    worker.run_until_idle()
    begins_before = len(rec.of(TurnBegin))
    worker.request_reply("s")
    worker.request_reply("s")  # a second request before the reply starts: still one reply
    worker.push_audio("s", chunks[silent_at:silent_at + 1])
    worker.run_until_idle()
    decision = rec.of(Decision)[-1]
    assert decision == Decision(silent_at, T.TEXT_BEGIN), "the model said KEEP_SILENCE here: the request forced it"
    begins = rec.of(TurnBegin)
    assert len(begins) == begins_before + 1 and begins[-1].chunk_index == silent_at
    end = rec.of(TurnEnd)[-1]
    assert end.turn_index == begins[-1].turn_index and end.end_reason in ("text_end", "max_tokens")
    assert len(rec.of(TurnToken)) >= 1 or end.end_reason == "text_end"  # a normal reply, fed and generated
    # Consumed by that reply: what follows is the model's own choice again (or silence in on_request mode).
    worker.push_audio("s", chunks[silent_at + 1:])
    worker.run_until_idle()
    assert len(rec.of(Decision)) == len(chunks) and not rec.of(SessionEnded)
    if reply_mode == "on_request":
        assert len(rec.of(TurnBegin)) == 1


def test_on_request_mode_never_replies_unasked(tiny_model, stream_chunks):
    audio = torch.cat(stream_chunks[:3])
    by_itself = decisions_alone(tiny_model, audio)
    assert by_itself.of(TurnBegin), "the model replies to this audio by itself: nothing to hold back"
    asked = decisions_alone(tiny_model, audio, SessionOptions(max_turn_tokens=6, reply_mode="on_request"))
    assert len(asked.of(Decision)) == len(audio)
    assert all(d.token_id == T.KEEP_SILENCE for d in asked.of(Decision)) and not asked.of(TurnBegin)


def test_a_cancel_withdraws_a_requested_reply_that_has_not_begun(tiny_model, stream_chunks):
    """A client that asks for a reply and cancels it before it starts gets none (OpenAI Realtime's
    response.create then response.cancel): in on_request mode the session only listens."""
    audio = torch.cat(stream_chunks[:2])
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", SessionOptions(max_turn_tokens=6, reply_mode="on_request"), rec)
    worker.request_reply("s")
    worker.cancel("s")
    worker.push_audio("s", audio)
    worker.run_until_idle()
    assert len(rec.of(Decision)) == len(audio) and not rec.of(TurnBegin)


def test_a_request_while_a_reply_runs_is_dropped_and_changes_nothing_else(tiny_model, stream_chunks):
    chunks = torch.cat(stream_chunks)
    options = SessionOptions(max_turn_tokens=50)
    plain = Worker(tiny_model, EngineConfig(max_sessions=1))
    expected = Recorder()
    plain.open_session("s", options, expected)
    assert speak_until_reply(plain, expected, "s", chunks)
    replied_at = len(expected.of(Decision))
    plain.push_audio("s", chunks[replied_at:replied_at + 8])
    plain.run_until_idle()

    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    rec = Recorder()
    worker.open_session("s", options, rec)
    assert speak_until_reply(worker, rec, "s", chunks)
    worker.request_reply("s")  # mid-reply: must not start another reply once this one ends
    worker.push_audio("s", chunks[replied_at:replied_at + 8])
    worker.run_until_idle()
    dropped = [e for e in rec.protocol if isinstance(e, ReplyRequestDropped)]
    assert dropped == [ReplyRequestDropped("reply_in_progress")]  # said, so the session can tell its client
    assert [e for e in rec.protocol if e not in dropped] == expected.protocol


def test_clear_drops_exactly_the_queued_chunks_and_later_audio_is_decided(tiny_model, stream_chunks):
    chunks = stream_chunks[1]
    worker = Worker(tiny_model, EngineConfig(max_sessions=1, max_catch_up_speed=None))
    rec = Recorder()
    worker.open_session("s", OPTIONS, rec)
    worker.push_audio("s", chunks[:2])
    worker.run_until_idle()
    worker.push_audio("s", chunks[2:7])
    worker.clear_audio("s")  # applied after the push, before any step: all 5 are queued, none decided
    worker.run_until_idle()
    assert rec.of(AudioCleared) == [AudioCleared(5)]
    assert [d.chunk_index for d in rec.of(Decision)] == [0, 1]
    assert worker.state_size("s").queued_chunks == 0
    worker.push_audio("s", chunks[7:10])
    worker.run_until_idle()
    assert [d.chunk_index for d in rec.of(Decision)] == [0, 1, 2, 3, 4]  # the model's own count: chunks heard
    worker.clear_audio("s")
    worker.run_until_idle()
    assert rec.of(AudioCleared) == [AudioCleared(5), AudioCleared(0)]  # nothing queued: still answered
    assert not rec.of(SessionEnded)


def test_a_chunk_in_the_running_step_is_not_cleared(tiny_model, stream_chunks):
    """Commands apply between steps: a clear posted while a step runs leaves that step's chunk decided."""
    chunks = stream_chunks[1]
    worker = Worker(tiny_model, EngineConfig(max_sessions=1, max_catch_up_speed=None))
    rec = Recorder()

    def emit(events):
        rec(events)
        if len(rec.of(Decision)) == 1 and not rec.of(AudioCleared):
            worker.clear_audio("s")  # posted from inside the step that decided chunk 0

    worker.open_session("s", OPTIONS, emit)
    worker.push_audio("s", chunks[:4])
    worker.run_until_idle()
    assert [d.chunk_index for d in rec.of(Decision)] == [0]
    assert rec.of(AudioCleared) == [AudioCleared(3)]


def test_clear_while_speaking_drops_the_audio_queued_behind_the_reply(tiny_model, stream_chunks):
    chunks = torch.cat(stream_chunks)
    worker = Worker(tiny_model, EngineConfig(max_sessions=1, max_catch_up_speed=None))
    rec = Recorder()
    worker.open_session("s", SessionOptions(max_turn_tokens=50), rec)
    assert speak_until_reply(worker, rec, "s", chunks)
    decided = len(rec.of(Decision))
    worker.push_audio("s", chunks[decided:decided + 4])  # waits behind the reply
    worker.clear_audio("s")
    worker.push_audio("s", chunks[decided + 4:decided + 6])
    worker.run_until_idle()
    assert rec.of(AudioCleared) == [AudioCleared(4)]
    assert len(rec.of(Decision)) == decided + 2 and rec.of(TurnEnd)


# ---- commands and end codes ----------------------------------------------------------------------------------

def test_commands_are_frozen_and_the_public_methods_post_them(tiny_model):
    import dataclasses
    import inspect

    from audio_interaction_server.engine import commands

    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    posted = []
    worker._post = posted.append
    worker.open_session("s", OPTIONS, print)
    worker.push_audio("s", torch.zeros(1, 128, 40))
    worker.cancel("s")
    worker.request_reply("s")
    worker.clear_audio("s")
    worker.close_session("s")
    assert [type(c) for c in posted] == [commands.OpenSession, commands.PushAudio, commands.CancelReply,
                                         commands.RequestReply, commands.ClearAudio, commands.CloseSession]
    for command in posted:
        assert dataclasses.is_dataclass(command) and command.session_id == "s"
        with pytest.raises(dataclasses.FrozenInstanceError):
            command.session_id = "other"
    # The api calls these: their signatures stay as they were.
    assert str(inspect.signature(Worker.open_session)) == "(self, session_id: 'str', options: 'SessionOptions', " \
        "emit: 'EmitFn', client_address: 'str | None' = None) -> 'None'"  # the address: engine/prefill_budget.py
    for name in ("cancel", "close_session"):
        assert list(inspect.signature(getattr(Worker, name)).parameters) == ["self", "session_id"]
    # keep_before: what a Realtime commit keeps of a clear (defaults to keeping nothing, as before)
    assert str(inspect.signature(Worker.clear_audio)) == "(self, session_id: 'str', keep_before: 'int' = 0) -> 'None'"
    # The reply's own cap (a Realtime response.create's max_output_tokens), optional.
    assert str(inspect.signature(Worker.request_reply)) == "(self, session_id: 'str', max_turn_tokens: 'int | None' " \
        "= None) -> 'None'"


def engine_sources():
    from pathlib import Path

    import audio_interaction_server.engine as engine_package

    return sorted(Path(engine_package.__file__).parent.glob("*.py"))


def test_every_session_end_the_engine_can_emit_uses_an_end_code():
    """No string code anywhere in engine/: each SessionEnded / end() gets an EndCode member (or None), every
    member named exists (a typo fails here, not as a 1011 in production), and every member is used."""
    import ast

    from audio_interaction_server.engine.events import EndCode

    used = set()
    for path in engine_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "EndCode":
                assert node.attr in EndCode.__members__, f"{path.name}:{node.lineno}: EndCode.{node.attr}"
                used.add(node.attr)
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            code_at = {"SessionEnded": 0, "OpenRefused": 0, "_end": 1, "end": 1}.get(name)  # the code's position
            if code_at is None:
                continue
            codes = node.args[code_at:code_at + 1] + [k.value for k in node.keywords if k.arg in ("error_code", "code")]
            assert not [c for c in codes if isinstance(c, ast.Constant) and isinstance(c.value, str)], \
                f"{path.name}:{node.lineno}: a string where an EndCode belongs"
    assert used == set(EndCode.__members__), f"members no path ends a session with: {set(EndCode.__members__) - used}"


def test_every_end_code_has_a_docstring_and_its_wire_string():
    import ast
    import inspect

    from audio_interaction_server.engine.events import EndCode

    source = ast.parse(inspect.getsource(EndCode))
    body = source.body[0].body
    documented = {stmt.targets[0].id for stmt, after in zip(body, body[1:])
                  if isinstance(stmt, ast.Assign) and isinstance(after, ast.Expr)
                  and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}
    assert documented == set(EndCode.__members__)
    assert {code.value for code in EndCode} == {"capacity", "duplicate_session", "invalid_options", "context_full",
                                                "server_shutdown", "numerical_error", "internal_error",
                                                "front_unresponsive", "detached_evicted", "rate_limited",
                                                "worker_failed"}
    assert EndCode.CAPACITY == "capacity" and f"{EndCode.CONTEXT_FULL}" == "context_full"  # a str on the wire


def test_a_rollover_window_that_leaves_little_room_between_rollovers_is_warned_of(tiny_model, caplog):
    """A window near the largest the budget allows (3,485 positions at the defaults) is accepted, and a session
    then rolls over every few chunks, each time re-feeding the whole window as a long row (44 rollovers in 130
    chunks at 3,480, 2 at the default 2,048): the start-up log now says so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="audio_interaction_server.engine.worker"):
        Worker(tiny_model, EngineConfig(max_sessions=1, rollover_window_positions=2048))
        assert "rollover_window_positions" not in caplog.text
        Worker(tiny_model, EngineConfig(max_sessions=1, rollover_window_positions=3480))
    assert "rollover_window_positions 3480 leaves room for" in caplog.text
