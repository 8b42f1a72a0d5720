"""Cuts a reply's streamed text into sentence-sized segments for text-to-speech (pure Python).

A TTS engine wants whole sentences: speaking word by word sounds choppy, waiting for
the whole reply adds latency. A segment ends at sentence punctuation followed by
whitespace (so "3.5" and "e.g.x" do not split), right after CJK sentence punctuation
(which is not followed by a space), at a line break, or, for a run-on text, at the
last space or comma before ``max_chars``. Closing quotes and brackets right after the
punctuation belong to its sentence: ``"Yes." Then`` ends after the quote, and ``“你好。”``
keeps its closing quote rather than opening the next sentence with it.
"""

from __future__ import annotations

_LATIN_ENDS = frozenset(".!?;:…")
_CJK_ENDS = frozenset("。！？；…")
_SOFT_BREAKS = " ,，、"
# What may close a sentence after its punctuation: quotes and brackets, Latin and CJK.
_CLOSERS = frozenset("\"'”’»)]}」』）】》〉")
# What may follow a sentence's punctuation within that sentence: its closers and more punctuation ("?!", "……").
_SENTENCE_TAIL = _CLOSERS | _CJK_ENDS | _LATIN_ENDS


class Segmenter:
    """One per reply; ``push`` text deltas, then ``finish`` for the remainder."""

    def __init__(self, max_chars: int = 200) -> None:
        self.max_chars = max_chars
        self._pending = ""

    def push(self, text: str) -> list[str]:
        self._pending += text
        segments: list[str] = []
        while True:
            cut = self._boundary()
            if cut is None:
                break
            segments.append(self._pending[:cut])
            self._pending = self._pending[cut:]
        return [s for s in (segment.strip() for segment in segments) if s]

    def finish(self) -> list[str]:
        rest, self._pending = self._pending.strip(), ""
        return [rest] if rest else []

    def _boundary(self) -> int | None:
        """Index just past the first segment end in the pending text, if there is one yet."""
        text = self._pending
        for index, char in enumerate(text):
            if char == "\n":
                return index + 1
            if char not in _CJK_ENDS and char not in _LATIN_ENDS:
                continue
            end = index + 1
            while end < len(text) and text[end] in _SENTENCE_TAIL:
                end += 1  # "?!", "……", ".\"" and "。」" end one sentence
            if end == len(text):
                break  # a closing quote may still come, or (Latin) the whitespace that ends the sentence
            # Latin punctuation ends a sentence only once whitespace follows it (and its closing quotes).
            if char in _CJK_ENDS or text[end].isspace():
                return end
        if len(text) >= self.max_chars:
            soft = max(text.rfind(mark, 0, self.max_chars) for mark in _SOFT_BREAKS)
            return soft + 1 if soft > 0 else self.max_chars
        return None
