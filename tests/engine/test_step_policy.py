"""The step policy: a step's rows are bounded per kind, the longest-waiting go first, nothing starves,
and every session's tokens are the ones an unbounded step gives (the tiny real model, real recordings)."""

from __future__ import annotations

import random

import pytest
import torch

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig, ScriptedTurns
from audio_interaction_server.engine.events import Decision, SessionStarted, TurnBegin, TurnToken
from audio_interaction_server.engine.prompt import PromptEncoder
from audio_interaction_server.engine.runner import BatchResult, RowResult
from audio_interaction_server.engine.scheduler import Scheduler
from audio_interaction_server.engine.step_policy import Candidate, StepLimits, choose_rows
from audio_interaction_server.engine.worker import Worker
from audio_interaction_server.options import SessionOptions

OPTIONS = SessionOptions(max_turn_tokens=6)
CHUNK = torch.zeros(128, 40)


def candidate(name: str, num_tokens: int, is_decision: bool = True) -> Candidate[str]:
    return Candidate(name, num_tokens, is_decision)


def test_each_kind_is_bounded_and_the_longest_waiting_go_first():
    limits = StepLimits(listening_rows=2, reply_rows=1, long_tokens=100, total_rows=10)
    rows = [candidate("listen-a", 13), candidate("reply-a", 1, False), candidate("first-a", 60),
            candidate("listen-b", 13), candidate("reply-b", 1, False), candidate("first-b", 60),
            candidate("listen-c", 13)]
    short, long = choose_rows(iter(rows), limits)
    assert short == ["listen-a", "reply-a", "listen-b"] and long == ["first-a"]  # first-b: 120 tokens > 100


def test_the_oldest_long_row_always_runs_and_younger_ones_never_overtake_it():
    limits = StepLimits(listening_rows=4, reply_rows=4, long_tokens=100, total_rows=10)
    short, long = choose_rows(iter([candidate("rollover", 900), candidate("first", 60)]), limits)
    assert long == ["rollover"] and short == []
    short, long = choose_rows(iter([candidate("first", 60), candidate("rollover", 900),
                                    candidate("first-2", 30)]), limits)
    assert long == ["first"]  # first-2 would fit, but waits behind the rollover


def test_total_rows_bound_all_kinds_together_in_ticket_order():
    limits = StepLimits(listening_rows=5, reply_rows=5, long_tokens=1000, total_rows=2)
    rows = [candidate("reply", 1, False), candidate("first", 60), candidate("listen", 13)]
    assert choose_rows(iter(rows), limits) == (["reply"], ["first"])


def test_auto_limits_come_from_the_bucket_set():
    assert StepLimits.from_config(EngineConfig(max_sessions=800), 800) == StepLimits(256, 200, 4096, 800)
    assert StepLimits.from_config(EngineConfig(max_sessions=64), 64) == StepLimits(64, 64, 4096, 64)
    config = EngineConfig(max_sessions=8, step_max_listening_rows=3, step_max_reply_rows=2, step_max_long_tokens=50)
    assert StepLimits.from_config(config, 8) == StepLimits(3, 2, 50, 8)


def test_every_due_chunk_is_decided_within_a_bounded_number_of_steps(tiny_model):
    """Bursty arrivals, a flooding session and replies under tight bounds: the scheduler alone, the model's
    tokens given by hand (a reply starts at every 4th decision). A chunk at depth d of its session's queue
    when it arrives waits at most (d + 1) rounds of ceil(sessions / listening rows) steps, plus the reply
    that may run before it (a reply row waits at most ceil(sessions / reply rows) steps per token)."""
    num_sessions, listening_rows, reply_rows = 9, 2, 1
    config = EngineConfig(max_sessions=num_sessions, max_catch_up_speed=None, step_max_listening_rows=listening_rows,
                          step_max_reply_rows=reply_rows, step_max_long_tokens=1)
    scheduler = Scheduler(config, num_sessions, PromptEncoder(tiny_model.tokenizer, 4), lambda slot, prefix: False,
                          clock=lambda: 0.0)
    sessions = [scheduler.open(f"s{i}", OPTIONS, print) for i in range(num_sessions)]
    rng = random.Random(0)
    added: dict[tuple[int, int], tuple[int, int]] = {}  # (session, chunk index) -> (step added, queue depth)
    decided: dict[tuple[int, int], int] = {}
    num_added = [0] * num_sessions
    max_rows_seen = 0
    rounds = -(-num_sessions // listening_rows)
    turn_steps = (OPTIONS.max_turn_tokens + 1) * -(-num_sessions // reply_rows)
    for step in range(700):
        if step < 300:
            for i, session in enumerate(sessions):
                count = 20 if (i == 0 and step == 5) else int(rng.random() < 0.1)  # s0 floods once
                for _ in range(count):
                    added[(i, num_added[i])] = (step, len(session.conversation.audio_queue))
                    num_added[i] += 1
                    scheduler.add_audio(session, [CHUNK])
        plan = scheduler.schedule()
        assert not plan.failures
        short = [row for row in plan.batches[0] if row.num_tokens <= 16] if plan.batches else []
        assert sum(row.is_decision for row in short) <= listening_rows
        assert sum(not row.is_decision for row in short) <= reply_rows
        max_rows_seen = max(max_rows_seen, len(plan.rows))
        for batch in plan.batches:
            tokens = []
            for row in batch:
                session = scheduler.sessions[row.session_id]
                if row.is_decision:
                    i = int(row.session_id[1:])
                    decided[(i, session.conversation.num_chunks_consumed)] = step
                    tokens.append(T.TEXT_BEGIN if session.conversation.num_chunks_consumed % 4 == 3
                                  else T.KEEP_SILENCE)
                else:
                    tokens.append(1350)
            update = scheduler.update(batch, BatchResult(tuple(RowResult(t) for t in tokens), 0.0, 0.0))
            assert not update.failures
    assert set(decided) == set(added), "every chunk is decided"
    assert max_rows_seen <= listening_rows + reply_rows + 1
    for key, (step_added, depth) in added.items():
        waited = decided[key] - step_added
        assert waited <= (depth + 1) * (rounds + turn_steps), f"chunk {key} waited {waited} steps"


@pytest.fixture(scope="module")
def bounded_and_unbounded(tiny_model, stream_chunks):
    """The same sessions run with tight step bounds and without (an unbounded step), per step kind."""

    def run(step: str, bounded: bool) -> tuple[dict[str, list], int]:
        limits = dict(step_max_listening_rows=2, step_max_reply_rows=1, step_max_long_tokens=1) if bounded else \
            dict(step_max_listening_rows=64, step_max_reply_rows=64, step_max_long_tokens=10**6)
        worker = Worker(tiny_model, EngineConfig(max_sessions=6, step=step, max_catch_up_speed=None,
                                                 scripted_turns=ScriptedTurns(every_chunks=3, reply_tokens=4),
                                                 **limits))
        events: dict[str, list] = {}
        for i, chunks in enumerate(stream_chunks):
            events[f"s{i}"] = []
            worker.open_session(f"s{i}", OPTIONS, events[f"s{i}"].extend)
            worker.push_audio(f"s{i}", chunks[:6])
        max_rows = 0

        def count(stats) -> None:
            nonlocal max_rows
            max_rows = max(max_rows, stats.num_rows)

        worker.on_step = count
        worker.run_until_idle()
        return {name: [e for e in got if not isinstance(e, SessionStarted)] for name, got in events.items()}, max_rows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a shared 2-core machine two intra-op threads only contend
    try:
        return {(step, bounded): run(step, bounded) for step in ("eager", "static") for bounded in (True, False)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("step", ["eager", "static"])
def test_bounded_steps_give_every_session_the_same_tokens(bounded_and_unbounded, stream_chunks, step):
    bounded, bounded_max_rows = bounded_and_unbounded[(step, True)]
    unbounded, unbounded_max_rows = bounded_and_unbounded[(step, False)]
    assert bounded_max_rows <= 2 + 1 + 1 < unbounded_max_rows  # the bounds did cut the steps
    for name, chunks in zip(unbounded, stream_chunks):
        assert len([e for e in unbounded[name] if isinstance(e, Decision)]) == len(chunks[:6])
        assert bounded[name] == unbounded[name], f"session {name} differs when its steps are bounded"
    assert any(isinstance(e, TurnBegin) for got in unbounded.values() for e in got)
    assert any(isinstance(e, TurnToken) for got in unbounded.values() for e in got)
