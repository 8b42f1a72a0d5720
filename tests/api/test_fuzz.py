"""Bad-input fuzzing of one session (sans-I/O, the real tiny model's worker in this thread).

Every input gets a defined outcome: the session never raises; every event it
returns is a valid server event; bad input yields an ``error`` event; audio
the session accepted is either heard by the model or reported as unheard at
close. Hypothesis draws the inputs; the number of cases is printed with
``pytest -s`` (``FUZZ_CASES`` below is what each property is given).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audio_interaction_server.protocol import CLIENT_EVENT_ADAPTER, SERVER_EVENT_ADAPTER
from tests.api.test_session import Harness

FUZZ_CASES = 150
FUZZ = settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
event_types = st.sampled_from(["session.configure", "input.flush", "response.cancel", "session.close",
                               "session.update", "", "audio", None])
control_messages = st.one_of(
    st.text(max_size=200),  # arbitrary text, mostly not JSON
    json_values.map(json.dumps),  # JSON of any shape
    st.fixed_dictionaries({"type": event_types}, optional={
        "audio": st.fixed_dictionaries({}, optional={
            "sample_format": st.sampled_from(["pcm_s16le", "pcm_f32le", "mp3", 7]),
            "sample_rate_hz": st.integers(-10, 10**7) | st.floats(allow_nan=True),
            "num_channels": st.integers(-2, 300)}),
        "max_turn_tokens": st.integers(-5, 10**6) | st.none(),
        "sampling": json_values,
        "system_prompt": st.text(max_size=50) | st.none(),
        "trailing_silence_s": st.floats(allow_nan=True, allow_infinity=True),
        "decision_events": json_values,
        "event_id": json_values,
    }).map(json.dumps),
)


def is_valid_client_event(text: str) -> bool:
    try:
        CLIENT_EVENT_ADAPTER.validate_json(text)
    except ValueError:
        return False
    return True


def check_events(events: list) -> None:
    for event in events:
        SERVER_EVENT_ADAPTER.validate_python(event.model_dump())


def pcm_frames():
    s16 = st.binary(max_size=3000)
    f32_bad = st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 1e30]), min_size=1, max_size=64).map(
        lambda xs: np.array(xs, dtype="<f4").tobytes())
    return st.one_of(s16, f32_bad, st.integers(1, 2000).map(lambda n: b"\x01" * (2 * n + 1)))  # odd byte counts


@pytest.fixture(scope="module")
def harness_factory(tiny_model):
    def make():
        return Harness(tiny_model, max_frame_bytes=4096, max_buffered_audio_s=2.0)
    return make


@FUZZ
@given(messages=st.lists(control_messages, min_size=1, max_size=6))
def test_random_control_messages_get_defined_outcomes(harness_factory, messages):
    h = harness_factory()
    for message in messages:
        was_closed = h.session.is_closed
        out = h.send(message)
        check_events(out)
        if not was_closed and not is_valid_client_event(message):
            assert any(e.type == "error" for e in out), f"invalid {message!r} got no error"
        h.run()
    check_events(h.session.abort("test over"))


@FUZZ
@given(frames=st.lists(pcm_frames(), min_size=1, max_size=5), f32=st.booleans())
def test_random_audio_frames_before_and_after_configuration(harness_factory, frames, f32):
    h = harness_factory()
    if f32:  # binary before any configuration is s16 by default; after it, f32
        h.send({"type": "session.configure", "audio": {"sample_format": "pcm_f32le", "sample_rate_hz": 48000,
                                                        "num_channels": 2}})
    for frame in frames:
        out = h.audio(frame)
        check_events(out)
        frame_size = 8 if f32 else 2  # bytes per stereo-f32 / mono-s16 sample frame
        if len(frame) > 4096 or len(frame) % frame_size or (f32 and not np.isfinite(
                np.frombuffer(frame[: len(frame) // 4 * 4], dtype="<f4")).all()):
            assert any(e.type == "error" for e in out), "bad frame accepted silently"
        h.run()
    closing = h.send({"type": "session.close"})
    h.run()
    closed = [e for e in h.events if e.type == "session.closed"]
    assert closed, "session.close must end with session.closed"
    # No accepted audio is lost silently: what was not heard is reported.
    assert closed[-1].num_chunks_received >= closed[-1].num_chunks_decided
    check_events(closing)


@FUZZ
@given(message=control_messages | pcm_frames())
def test_events_after_close_are_harmless(harness_factory, message):
    h = harness_factory()
    h.send({"type": "session.close"})
    h.run()
    out = h.send(message) if isinstance(message, str) else h.audio(message)
    check_events(out)
    assert all(e.type in ("error", "session.closed") for e in out)


@pytest.mark.parametrize("rate", [0, -1, 1, 999, 384_001, 10**9])
def test_absurd_sample_rates_are_refused_with_an_error(harness_factory, rate):
    h = harness_factory()
    (event,) = h.send({"type": "session.configure",
                       "audio": {"sample_format": "pcm_s16le", "sample_rate_hz": rate, "num_channels": 1}})
    assert event.type == "error" and not event.is_fatal
    assert h.session.audio.format.sample_rate_hz == 16000  # unchanged


@FUZZ
@given(steps=st.lists(st.tuples(control_messages | pcm_frames(), st.sampled_from([0.0, 0.0, 0.001, 0.05, 1.0])),
                      min_size=1, max_size=60))
def test_floods_end_in_a_defined_cut(tiny_model, steps):
    """Any mix of events, frames and pauses against small flood budgets: the session either goes on or is cut
    once, with a fatal audio_flood/event_flood error, session.closed and close 1008; after that nothing is
    answered (what the client still sends is not handled)."""
    h = Harness(tiny_model, max_frame_bytes=4096, max_buffered_audio_s=0.5,
                flood={"event_burst": 8, "events_per_s": 4.0, "refused_audio_burst_s": 0.2, "refused_audio_speed": 1.0})
    for message, pause_s in steps:
        h.now_s += pause_s
        was_closed = h.session.is_closed
        out = h.send(message) if isinstance(message, str) else h.audio(message)
        check_events(out)
        if was_closed:
            assert out == []
    cuts = [e for e in h.events if e.type == "error" and e.code in ("audio_flood", "event_flood")]
    assert len(cuts) <= 1
    if cuts:
        assert cuts[0].is_fatal and h.session.close_code == 1008
        assert h.events[-1].type == "session.closed" and h.events[-1].reason == cuts[0].code
