"""G.711 decoding (mu-law ``audio/pcmu``, A-law ``audio/pcma``): 8-bit telephony codes -> 16-bit PCM.

Each of the 256 codes stands for one fixed sample value, so decoding is one table lookup per
sample; the two tables are computed once from the ITU-T G.711 segment formulas below.
"""

from __future__ import annotations

import numpy as np

MULAW_BIAS = 0x84  # mu-law adds 132 before the logarithmic segments so that zero sits on a segment edge


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF  # mu-law codes are sent with every bit inverted
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + MULAW_BIAS) << exponent) - MULAW_BIAS
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55  # A-law inverts the even bits, for line density
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    # Segment 0 is linear (no implicit leading bit); the others carry one, each doubling the step.
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)  # A-law's sign bit set = positive


MULAW_TO_S16 = _mulaw_table()
ALAW_TO_S16 = _alaw_table()


def mulaw_to_s16le(data: bytes) -> bytes:
    """mu-law bytes -> the same number of little-endian int16 samples."""
    return MULAW_TO_S16[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def alaw_to_s16le(data: bytes) -> bytes:
    """A-law bytes -> the same number of little-endian int16 samples."""
    return ALAW_TO_S16[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()
