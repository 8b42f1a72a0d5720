"""The per-address prefill budget (engine/prefill_budget.py): the bucket, the worker's opens, two fronts on one engine.

docs/reliability.md, prompt churn: one address opened session after session, each with a new long system prompt,
and every one of them made the engine feed its whole prompt. The budget charges an address the prompt tokens its
new sessions make the engine feed (a kept prompt costs nothing) and refuses an open past it.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest

from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.events import EndCode, SessionEnded, SessionStarted
from audio_interaction_server.engine.prefill_budget import LOG_EVERY_S, PrefillBudget
from audio_interaction_server.engine.worker import Worker
from audio_interaction_server.options import SessionOptions


def new_prompt(index: int, num_words: int = 75) -> str:
    """A system prompt no other session used: about 400 tokens of the demo model's tokenizer."""
    return f"Session {index}. " + " ".join(f"rule{index}x{n}" for n in range(num_words))


# ---- the bucket ------------------------------------------------------------------------------------------------


def test_the_burst_then_the_sustained_rate_and_a_refusal_spends_nothing():
    budget = PrefillBudget(tokens_per_s=100.0, burst_tokens=1_000)
    assert budget.charge("a", 600, 0.0) is None
    assert budget.charge("a", 400, 0.0) is None  # the whole burst at once
    refused = budget.charge("a", 300, 0.0)
    assert refused is not None and refused.retry_after_s == pytest.approx(3.0)  # 300 tokens at 100 a second
    assert budget.charge("a", 300, 1.0).retry_after_s == pytest.approx(2.0)  # the refusal took nothing
    assert budget.charge("a", 300, 3.0) is None  # refilled at the rate
    assert budget.charge("b", 1_000, 3.0) is None  # another address has its own budget
    assert budget.charge("a", 0, 3.0) is None  # a kept prompt costs nothing, even from an empty bucket
    # A long pause refills it to the burst, never beyond.
    assert budget.charge("a", 1_000, 1_000.0) is None and budget.charge("a", 1, 1_000.0) is not None


def test_a_prompt_longer_than_the_burst_runs_from_a_full_bucket_and_is_paid_for_by_waiting():
    budget = PrefillBudget(tokens_per_s=100.0, burst_tokens=1_000)
    assert budget.charge("a", 100, 0.0) is None
    assert budget.charge("a", 2_500, 0.0).retry_after_s == pytest.approx(1.0)  # needs a full bucket
    assert budget.charge("a", 2_500, 1.0) is None
    # 1,500 tokens in debt: the next prompt of 500 waits 20 s, as if the bucket had been bigger.
    assert budget.charge("a", 500, 1.0).retry_after_s == pytest.approx(20.0)


def test_remembers_a_bounded_number_of_addresses_and_logs_an_address_once_per_window():
    budget = PrefillBudget(tokens_per_s=1.0, burst_tokens=100, max_tracked=100)
    for i in range(1_000):
        budget.charge(f"10.0.{i // 256}.{i % 256}", 100, 0.0)
    assert len(budget) == 100
    first = budget.charge("10.0.3.231", 100, 0.0)  # the most recent ones still have spent theirs
    assert first is not None and first.num_refused_to_log == 1  # an address's first refusal is logged
    counts = [refused.num_refused_to_log for t in (1.0, 2.0, 3.0, LOG_EVERY_S)
              if (refused := budget.charge("10.0.3.231", 100, t)) is not None]
    assert counts == [None, None, None, 4]  # then one line per LOG_EVERY_S, counting the refusals since


# ---- the worker: where opens are charged -----------------------------------------------------------------------


def open_and_run_first_row(worker: Worker, session_id: str, prompt: str | None, address: str | None):
    """Open a session, push a chunk so its first row (its prompt) runs, close it; its first and last events."""
    events: list = []
    worker.open_session(session_id, SessionOptions(system_prompt=prompt, max_turn_tokens=6), events.extend, address)
    worker.push_audio(session_id, PaddedBlocks(np.zeros((1, 6640), np.float32), 0))
    for _ in range(3):
        worker.step()
    worker.close_session(session_id)
    worker.step()
    return events[0], events[-1]


def test_one_address_opening_sessions_with_new_prompts_is_refused_past_its_budget(tiny_model, caplog):
    worker = Worker(tiny_model, EngineConfig(max_sessions=2, prefill_tokens_per_s_per_ip=100.0,
                                             prefill_token_burst_per_ip=1_000))
    now_s = [0.0]
    worker.clock = lambda: now_s[0]
    cost = {index: worker.prompt_length(SessionOptions(system_prompt=new_prompt(index))) for index in (1, 2, 3)}
    assert all(300 <= tokens <= 500 for tokens in cost.values()), cost  # two fit the burst, three do not
    assert isinstance(open_and_run_first_row(worker, "a1", new_prompt(1), "10.0.0.1")[0], SessionStarted)
    assert isinstance(open_and_run_first_row(worker, "a2", new_prompt(2), "10.0.0.1")[0], SessionStarted)
    with caplog.at_level(logging.WARNING, logger="audio_interaction_server.engine.scheduler"):
        refused, _ = open_and_run_first_row(worker, "a3", new_prompt(3), "10.0.0.1")
    assert isinstance(refused, SessionEnded) and refused.error_code is EndCode.RATE_LIMITED, refused
    wait_s = (cost[3] - (1_000 - cost[1] - cost[2])) / 100.0
    told_s = math.ceil(wait_s * 10) / 10  # rounded up: a retry then is admitted
    assert f"in {told_s:.1f} s" in refused.message and f"({cost[3]} tokens)" in refused.message, refused.message
    assert "a3" not in worker.scheduler.sessions and len(worker.scheduler._free_slots) == 2  # nothing held
    assert "10.0.0.1" in caplog.text and "prefill budget" in caplog.text  # the address, named at warning level
    # Other addresses are not affected; opens that name no address are not budgeted.
    assert isinstance(open_and_run_first_row(worker, "b1", new_prompt(4), "10.0.0.2")[0], SessionStarted)
    assert isinstance(open_and_run_first_row(worker, "n1", new_prompt(5), None)[0], SessionStarted)
    # Kept prompts cost nothing: the trained one, and one the address had fed (its keys and values were kept).
    assert isinstance(open_and_run_first_row(worker, "a4", None, "10.0.0.1")[0], SessionStarted)
    assert isinstance(open_and_run_first_row(worker, "a5", new_prompt(1), "10.0.0.1")[0], SessionStarted)
    assert worker.scheduler.num_prefixes_reused == 2
    # The refused prompt once the budget has refilled enough, not before.
    now_s[0] = wait_s - 0.2
    assert open_and_run_first_row(worker, "a6", new_prompt(3), "10.0.0.1")[0].error_code is EndCode.RATE_LIMITED
    now_s[0] = wait_s
    assert isinstance(open_and_run_first_row(worker, "a7", new_prompt(3), "10.0.0.1")[0], SessionStarted)


def test_no_budget_when_the_rate_is_null(tiny_model):
    worker = Worker(tiny_model, EngineConfig(max_sessions=2, prefill_tokens_per_s_per_ip=None,
                                             prefill_token_burst_per_ip=1))
    worker.clock = lambda: 0.0
    for index in range(3):
        first, _ = open_and_run_first_row(worker, f"s{index}", new_prompt(index), "10.0.0.1")
        assert isinstance(first, SessionStarted), first


# ---- two fronts on one engine process --------------------------------------------------------------------------


def test_two_fronts_of_one_engine_share_one_budget_per_address(tiny_checkpoint):
    """Each front has its own sockets and per-connection limits; the budget lives in the engine, which sees the
    opens of every front with their client addresses, so N fronts do not give an address N budgets."""
    from audio_interaction_server.engine.process_client import EngineProcessClient

    config = EngineConfig(checkpoint=tiny_checkpoint, device="cpu", max_sessions=2, prefill_tokens_per_s_per_ip=1.0,
                          prefill_token_burst_per_ip=1_000)
    first = EngineProcessClient.spawn(tiny_checkpoint, config)
    first.start()
    second = EngineProcessClient(first.endpoints)
    try:
        second.start()
        results: dict[str, list] = {}

        def open_one(front: EngineProcessClient, session_id: str, prompt: str, address: str):
            results[session_id] = events = []
            front.open_session(session_id, SessionOptions(system_prompt=prompt, max_turn_tokens=6), events.extend,
                               address)
            deadline = time.monotonic() + 20
            while not events:
                assert time.monotonic() < deadline, "the engine never answered the open"
                time.sleep(0.01)
            if isinstance(events[0], SessionStarted):
                front.close_session(session_id)
                while not isinstance(events[-1], SessionEnded):
                    assert time.monotonic() < deadline, "the close was never confirmed"
                    time.sleep(0.01)
            return events[0]

        # About 400 tokens each: the burst takes two, from either front.
        assert isinstance(open_one(first, "f0-a", new_prompt(1), "10.0.0.1"), SessionStarted)
        assert isinstance(open_one(second, "f1-a", new_prompt(2), "10.0.0.1"), SessionStarted)
        for front, session_id, index in ((first, "f0-b", 3), (second, "f1-b", 4)):
            refused = open_one(front, session_id, new_prompt(index), "10.0.0.1")
            assert isinstance(refused, SessionEnded) and refused.error_code == EndCode.RATE_LIMITED, refused
        assert isinstance(open_one(second, "f1-c", new_prompt(5), "10.0.0.2"), SessionStarted)  # another address
    finally:
        second.stop()
        first.stop()


def test_a_retry_at_the_time_the_refusal_gives_is_admitted():
    """The refusal told the wait rounded to the nearest tenth of a second: a client that retried exactly then was
    up to 0.05 s early and refused again (4 of 16 retries, by hand). The wait told is rounded up."""
    for tokens_per_s, first, second in ((7.0, 90, 60), (3.0, 100, 37), (11.0, 55, 99), (500.0, 32_000, 1_234)):
        budget = PrefillBudget(tokens_per_s, burst_tokens=100 if first < 1_000 else 32_768)
        assert budget.charge("a", first, now_s=0.0) is None
        refused = budget.charge("a", second, now_s=0.0)
        assert refused is not None and refused.told_wait_s >= refused.retry_after_s
        assert refused.told_wait_s == round(refused.told_wait_s, 1)  # as the message says it
        assert budget.charge("a", second, now_s=refused.told_wait_s) is None
