"""The wire protocol: one typed model per event, a published JSON Schema, and what we emit obeys it."""

from __future__ import annotations

import functools
import json
import typing
from pathlib import Path

import numpy as np
import pytest

from audio_interaction_server import protocol as P

jsonschema = pytest.importorskip("jsonschema")  # the schema checks need a validator independent of pydantic

DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


@functools.cache
def validator(direction: str):
    schema = P.event_schema(direction)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def union_members(union) -> list[type]:
    return list(typing.get_args(typing.get_args(union)[0]))


def test_schema_is_valid_and_printed_by_the_module(capsys):
    jsonschema.Draft202012Validator.check_schema(P.json_schema())
    P.main(["--schema"])
    assert json.loads(capsys.readouterr().out) == P.json_schema()


def test_every_server_event_is_typed_stamped_and_in_the_schema():
    members = union_members(P.ServerEvent)
    assert len({m.model_fields["type"].default for m in members}) == len(members) == 15
    defs = P.json_schema()["$defs"]
    for member in members:
        assert "server_time_ms" in defs[member.__name__]["required"], member
        assert "session_id" in member.model_fields
    # Every renderer event has a stamped wire form with the same type.
    for plain, live in P.LIVE_FORMS.items():
        assert issubclass(live, plain) and live in members


@pytest.mark.parametrize("event", [
    {"type": "session.configure", "audio": {"sample_format": "pcm_f32le", "sample_rate_hz": 48000,
                                            "num_channels": 2}, "system_prompt": "Be brief.",
     "sampling": {"temperature": 0.3, "top_k": 3, "seed": 7}, "max_turn_tokens": 64, "decision_events": True,
     "event_id": "c1"},
    {"type": "session.configure", "sampling": {"temperature": 0.01, "top_p": 0.001, "top_k": 1000000,
                                               "seed": 2**63 - 1}},
    {"type": "session.configure", "sampling": {"temperature": 0, "seed": 0}},
    {"type": "session.configure"},
    {"type": "input.flush"},
    {"type": "input.flush", "trailing_silence_s": 0.0},
    {"type": "response.cancel"},
    {"type": "input.clear", "event_id": "c2"},
    {"type": "response.create"},
    {"type": "session.configure", "reply_mode": "on_request"},
    {"type": "session.close", "event_id": "bye"},
])
def test_client_events_parse_and_match_the_schema(event):
    parsed = P.CLIENT_EVENT_ADAPTER.validate_json(json.dumps(event))
    assert parsed.type == event["type"]
    validator("client").validate(event)


@pytest.mark.parametrize("event", [
    {"type": "session.configure", "audio": {"sample_rate_hz": 999}},
    {"type": "session.configure", "sampling": {"top_p": 1.5}},
    # Ranges the sampler can run: these used to be accepted and crash the model worker.
    {"type": "session.configure", "sampling": {"temperature": 1e-39}},
    {"type": "session.configure", "sampling": {"temperature": 0.005}},
    {"type": "session.configure", "sampling": {"temperature": 1.0, "top_p": 1e-46}},
    {"type": "session.configure", "sampling": {"temperature": 1.0, "seed": 2**64}},
    {"type": "session.configure", "sampling": {"temperature": 1.0, "seed": -1}},
    {"type": "session.configure", "sampling": {"temperature": 1.0, "top_k": 2**70}},
    {"type": "input.flush", "trailing_silence_s": -1},
    {"type": "response.cancel", "extra": 1},
    {"type": "session.open"},
])
def test_invalid_client_events_fail_both_pydantic_and_the_schema(event):
    with pytest.raises(Exception):
        P.CLIENT_EVENT_ADAPTER.validate_python(event)
    assert not validator("client").is_valid(event)


@pytest.mark.parametrize("event", [
    {"type": "session.configure", "max_turn_tokens": True},  # was read as a 1-token reply cap
    {"type": "session.configure", "max_turn_tokens": "7"},
    {"type": "session.configure", "sampling": {"temperature": "0.5"}},
    {"type": "session.configure", "sampling": {"temperature": 0.7, "seed": "3"}},
    {"type": "session.configure", "decision_events": "true"},
    {"type": "session.configure", "decision_events": 1},
    {"type": "session.configure", "audio": {"sample_rate_hz": "16000"}},
    {"type": "input.flush", "trailing_silence_s": "0.4"},
    {"type": "input.flush", "trailing_silence_s": False},
])
def test_fields_are_read_strictly_as_the_schema_types_them(event):
    """docs/realtime.md: /v1/stream reads its fields strictly. A string or a boolean where a number belongs (and
    a number where a boolean does) used to be converted without a word: the wire path refuses it now."""
    with pytest.raises(P.ClientEventError) as refused:
        P.parse_client_event(json.dumps({**event, "event_id": "e1"}))
    assert refused.value.code == "invalid_event" and refused.value.event_id == "e1"
    assert not validator("client").is_valid(event)


@pytest.mark.parametrize("type_value", [None, 5, True, [1], {"a": 1}])
def test_a_type_that_is_no_string_is_an_invalid_event(type_value):
    """A `type` of the wrong JSON type was answered as an unknown event named by its Python text ("None",
    "True"); it is a value of the wrong JSON type: invalid_event, no event_type."""
    with pytest.raises(P.ClientEventError) as refused:
        P.parse_client_event(json.dumps({"type": type_value, "event_id": "e1"}))
    assert (refused.value.code, refused.value.event_type, refused.value.event_id) == ("invalid_event", None, "e1")
    assert "type" in refused.value.message


def test_whole_numbers_are_numbers_where_a_float_belongs():
    event = P.parse_client_event('{"type": "input.flush", "trailing_silence_s": 1}')
    assert event.trailing_silence_s == 1.0
    configure = P.parse_client_event('{"type": "session.configure", "sampling": {"temperature": 1}}')
    assert configure.sampling.temperature == 1


def test_everything_a_session_emits_validates_against_the_schema(tiny_model, shared_audio):
    """A session run through every event kind: created, updated, errors, decisions, turns, segments,
    flushed, closed; each serialised exactly as the app sends it."""
    from tests.api.test_session import Harness, s16

    from audio_interaction_server.audio.files import load_audio_file

    speech = load_audio_file(shared_audio / "01_count_bark" / "sample01_01.mp3")
    h = Harness(tiny_model)
    h.send({"type": "session.configure", "decision_events": True, "event_id": "c1"})
    h.send("{oops")
    h.send({"type": "nope"})
    h.audio(b"\x00")
    for start in range(0, len(speech), 4000):
        h.audio(s16(speech[start:start + 4000]))
    h.send({"type": "input.flush"})
    h.run()
    h.audio(s16(np.zeros(8000, dtype=np.float32)))
    h.send({"type": "session.close"})
    h.run()
    server_validator = validator("server")
    for event in h.events:
        wire = json.loads(event.model_dump_json(exclude_none=True))
        server_validator.validate(wire)
        assert P.SERVER_EVENT_ADAPTER.validate_python(wire) == event
    kinds = set(h.types())
    assert kinds >= {"session.created", "session.updated", "error", "decision", "turn_begin", "text_delta",
                     "segment", "turn_end", "input.flushed", "session.closed"}, kinds


def test_the_documented_example_exchange_is_valid():
    """docs/protocol.md's captured exchange: every JSON line obeys the schema of its direction."""
    lines = DOCS.read_text(encoding="utf-8").splitlines()
    client = [line[2:] for line in lines if line.startswith("> {")]
    server = [line[2:] for line in lines if line.startswith("< {")]
    assert len(client) >= 3 and len(server) >= 8
    for line in client:
        validator("client").validate(json.loads(line))
    for line in server:
        validator("server").validate(json.loads(line))
        # What the server would write for it, field for field: an example missing a field the server always sends
        # (turn_begin's ``requested``, added after the capture) teaches clients a shape they never get.
        event = P.SERVER_EVENT_ADAPTER.validate_json(line)
        assert json.loads(event.model_dump_json(exclude_none=True)) == json.loads(line), line


def test_an_event_without_a_type_is_told_what_it_lacks_in_our_words():
    """pydantic's "Unable to extract tag using discriminator 'type'" reached the client (first-hour review)."""
    for frame in ('{"foo": 1}', '{}'):
        with pytest.raises(P.ClientEventError) as error:
            P.parse_client_event(frame)
        assert error.value.code == "invalid_event" and "every event needs a \"type\"" in str(error.value), frame
        assert "discriminator" not in str(error.value)
