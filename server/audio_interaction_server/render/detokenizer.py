"""Incremental, UTF-8-safe detokenization of a generated token stream.

Byte-level BPE tokens are byte strings, and a multi-byte character (CJK, emoji)
is often split across tokens, so decoding token by token would print U+FFFD
halves. ``StreamingDetokenizer`` keeps the raw bytes of the last, still
incomplete UTF-8 sequence (at most 3 bytes) and releases text only up to the
last point where the UTF-8 decoder is between sequences. Cutting there is exact:
lossy UTF-8 decoding (U+FFFD per maximal invalid subpart, as both Python's
``errors="replace"`` and Rust's ``from_utf8_lossy`` do) of ``a + b`` equals the
decoding of ``a`` followed by that of ``b`` whenever ``a`` does not end inside
a sequence that could still be completed. Hence the concatenated deltas plus
``finish()`` equal ``tokenizer.decode(non-control ids)``, with O(token length)
work and O(1) held-back state per token, also for invalid byte sequences that
a "hold back while the text ends in U+FFFD" rule would hold forever.

Control ids (``audio_interaction_server.spec.is_control_token``) are recorded but never
rendered: 151601-151619 are ordinary BPE tokens the tokenizer would happily
print as CJK characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from tokenizers import Tokenizer, decoders

from audio_interaction_server.spec import is_control_token

_MAX_INCOMPLETE_BYTES = 3  # a 4-byte sequence minus its final byte


@lru_cache(maxsize=1)
def byte_level_chars() -> tuple[str, ...]:
    """The byte-level BPE alphabet: ``byte_level_chars()[b]`` is the char standing for byte ``b``.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space,
    0x7F-0xA0, 0xAD) are shifted to U+0100 and up, in byte order, so every
    token string is printable and whitespace-free.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    next_code_point = 0x100
    for b in range(0x100):
        if b not in chars:
            chars[b] = chr(next_code_point)
            next_code_point += 1
    return tuple(chars[b] for b in range(0x100))


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_level_chars())}


def _sequence_length(lead: int) -> int:
    """Bytes in a well-formed sequence starting with ``lead``; 0 if it cannot start one."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _second_byte_range(lead: int) -> tuple[int, int]:
    # Unicode Table 3-7: these leads restrict the second byte to rule out
    # overlong forms, surrogates and code points above U+10FFFF.
    return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
        lead, (0x80, 0xBF)
    )


def incomplete_tail_start(data: bytes | bytearray) -> int:
    """Index where a trailing, still completable UTF-8 sequence starts; ``len(data)`` if none.

    Only such a tail can decode differently once more bytes arrive; everything
    before it is final.
    """
    n = len(data)
    for k in range(1, min(_MAX_INCOMPLETE_BYTES, n) + 1):
        lead = data[n - k]
        if 0x80 <= lead <= 0xBF:
            continue  # continuation byte: keep looking for the lead
        # A non-continuation byte always starts a new sequence, so it is the only candidate.
        if _sequence_length(lead) <= k:
            return n
        if k > 1:
            low, high = _second_byte_range(lead)
            if not low <= data[n - k + 1] <= high:
                return n
        return n - k
    return n


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas; one instance per generated reply.

    Requires a byte-level BPE tokenizer (Qwen's): token bytes are read from the
    vocabulary, not from ``decode``, because ``decode`` of a partial character
    is already lossy.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise TypeError(
                f"StreamingDetokenizer needs a ByteLevel decoder, got {type(tokenizer.decoder).__name__}"
            )
        self._tokenizer = tokenizer
        self._token_bytes: dict[int, bytes] = {}  # memo: a reply reuses few distinct ids
        self._token_ids: list[int] = []
        self._pending = b""  # incomplete UTF-8 tail, at most 3 bytes
        self._parts: list[str] = []
        self._is_finished = False

    def push(self, token_id: int) -> str:
        """Records ``token_id`` and returns the text it completes (often "")."""
        if self._is_finished:
            raise RuntimeError("push() after finish(); start a new StreamingDetokenizer")
        if token_id < 0:
            raise ValueError(f"negative token id {token_id}")
        self._token_ids.append(token_id)
        if is_control_token(token_id):
            return ""
        data = self._pending + self._bytes_of(token_id)
        cut = incomplete_tail_start(data)
        self._pending = data[cut:]
        delta = data[:cut].decode("utf-8", errors="replace")
        if delta:
            self._parts.append(delta)
        return delta

    def finish(self) -> str:
        """Ends the stream and returns the held-back tail.

        A dangling incomplete sequence renders as one U+FFFD, exactly as
        ``tokenizer.decode`` renders it, so that streaming equals offline.
        """
        self._is_finished = True
        delta = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text released so far (held-back bytes excluded until ``finish``)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def token_ids(self) -> Sequence[int]:
        """Every id pushed, control ids included (a copy)."""
        return tuple(self._token_ids)

    @property
    def pending_bytes(self) -> bytes:
        """The held-back incomplete UTF-8 tail (0-3 bytes); exposed for tests and debugging."""
        return self._pending

    def _bytes_of(self, token_id: int) -> bytes:
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        token = self._tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        char_to_byte = _char_to_byte()
        data = bytes(char_to_byte[c] for c in token)
        self._token_bytes[token_id] = data
        return data
