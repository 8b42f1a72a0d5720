"""G.711 decoding (audio/g711.py) against the standard library's independent implementation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from audio_interaction_server.audio.g711 import ALAW_TO_S16, MULAW_TO_S16, alaw_to_s16le, mulaw_to_s16le

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # removed in Python 3.13: the reference is only there before
    except ImportError:
        audioop = None

ALL_CODES = bytes(range(256))


@pytest.mark.skipif(audioop is None, reason="audioop (the reference G.711 decoder) is gone in Python >= 3.13")
def test_mulaw_table_matches_the_standard_library_for_every_code():
    expected = np.frombuffer(audioop.ulaw2lin(ALL_CODES, 2), dtype="<i2")
    assert np.array_equal(np.frombuffer(mulaw_to_s16le(ALL_CODES), dtype="<i2"), expected)


@pytest.mark.skipif(audioop is None, reason="audioop (the reference G.711 decoder) is gone in Python >= 3.13")
def test_alaw_table_matches_the_standard_library_for_every_code():
    expected = np.frombuffer(audioop.alaw2lin(ALL_CODES, 2), dtype="<i2")
    assert np.array_equal(np.frombuffer(alaw_to_s16le(ALL_CODES), dtype="<i2"), expected)


def test_known_codes_from_the_g711_tables():
    # Silence codes, and the extremes of each law (ITU-T G.711 tables 1a/2a).
    assert MULAW_TO_S16[0xFF] == 0 and MULAW_TO_S16[0x7F] == 0
    assert MULAW_TO_S16[0x80] == 32124 and MULAW_TO_S16[0x00] == -32124
    assert ALAW_TO_S16[0xD5] == 8 and ALAW_TO_S16[0x55] == -8
    assert ALAW_TO_S16[0xAA] == 32256 and ALAW_TO_S16[0x2A] == -32256


@pytest.mark.parametrize("table", [MULAW_TO_S16, ALAW_TO_S16], ids=["mulaw", "alaw"])
def test_each_law_is_symmetric_and_has_distinct_levels(table):
    values = table.astype(np.int32)
    positives = sorted(set(values[values > 0]))
    negatives = sorted(set(-values[values < 0]))
    assert positives == negatives  # the same magnitudes on both sides of zero
    assert len(set(values)) >= 255  # mu-law has two zeros, A-law none: every other code is its own level


def test_decoding_keeps_the_length_and_byte_order():
    data = bytes([0x80, 0xFF, 0x00])
    assert mulaw_to_s16le(data) == np.array([32124, 0, -32124], dtype="<i2").tobytes()
    assert alaw_to_s16le(b"") == b""
