"""The sentences a reply is cut into for TTS (``segment`` events), as a streamed reply's deltas make them."""

from __future__ import annotations

import pytest

from audio_interaction_server.render.segmenter import Segmenter


def sentences(text: str, delta_chars: int) -> list[str]:
    """``text`` streamed in deltas of ``delta_chars`` characters: every sentence it is cut into, the rest included."""
    segmenter = Segmenter()
    out = [s for start in range(0, len(text), delta_chars) for s in segmenter.push(text[start:start + delta_chars])]
    return out + segmenter.finish()


# A closing quote or bracket after the punctuation is its sentence's: the CJK one opened the next sentence (a TTS
# engine reads the stray quote, or stumbles on it), the Latin one kept the sentence from ending at all, so it was
# spoken only with the next one (first-hour round 13).
@pytest.mark.parametrize(("text", "expected"), [
    ('He said "Yes." Then he left. Bye', ['He said "Yes."', "Then he left.", "Bye"]),
    ("(See the note.) Next one. x", ["(See the note.)", "Next one.", "x"]),
    ("他说：“你好。”然后他走了。", ["他说：“你好。”", "然后他走了。"]),
    ("「好吧！」他说。", ["「好吧！」", "他说。"]),
    ("等等……然后呢？", ["等等……", "然后呢？"]),
    ("Really?! Yes... ok", ["Really?!", "Yes...", "ok"]),
])
@pytest.mark.parametrize("delta_chars", [1, 3, 100])
def test_a_closing_quote_or_bracket_stays_with_its_sentence(text, expected, delta_chars):
    assert sentences(text, delta_chars) == expected


@pytest.mark.parametrize("delta_chars", [1, 100])
def test_what_is_no_sentence_end_still_is_none(delta_chars):
    assert sentences("It costs 3.5 dollars, e.g.x or 'a.b' today. ok", delta_chars) == [
        "It costs 3.5 dollars, e.g.x or 'a.b' today.", "ok"]
