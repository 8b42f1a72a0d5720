"""Token ids and the fixed prompt of the Audio-Interaction streaming protocol.

Most control tokens are ordinary, rare Qwen BPE tokens repurposed by the model
(151601-151619), so the tokenizer neither knows nor hides them: everything that
turns ids into text must filter them explicitly (see ``is_control_token``).
"""

from __future__ import annotations

from typing import Final

TEXT_END: Final = 151643  # <|endoftext|>
TEXT_BEGIN: Final = 151644  # <|im_start|>
SYSTEM: Final = 151644  # same id as TEXT_BEGIN
AUDIO_PAD: Final = 151646
AUDIO_BEGIN: Final = 151647
AUDIO_END: Final = 151648

USER: Final = 151601
ASSISTANT: Final = 151602
KEEP_SILENCE: Final = 151605
PAD: Final = 151608
ONLINE: Final = 151609
OFFLINE: Final = 151610
ENGLISH: Final = 151611

EMOTION_NAMES: Final[dict[int, str]] = {
    151614: "happy",
    151615: "sad",
    151616: "angry",
    151617: "surprise",
    151618: "normal",
    151619: "urgent",
}

# Ordinary BPE ids that the model uses as control tokens; never rendered as text.
REPURPOSED_CONTROL_IDS: Final = range(151601, 151620)
# Ids at or above this are tokenizer specials (<|endoftext|>, <|im_start|>, ...).
FIRST_SPECIAL_ID: Final = 151643

AUDIO_FRAMES_PER_CHUNK: Final = 10  # encoder outputs per 0.4 s chunk
MEL_FRAMES_PER_CHUNK: Final = 40
SAMPLE_RATE_HZ: Final = 16_000
CHUNK_SAMPLES: Final = 6_400  # 0.4 s at 16 kHz
CHUNK_S: Final = CHUNK_SAMPLES / SAMPLE_RATE_HZ  # one chunk of audio, in seconds

SYSTEM_PROMPT: Final = (
    "You are a helpful assistant. When there is no user text, if the audio contains a question, "
    "please answer it. If it is a sound effect, determine based on the sound whether help is needed."
)


def is_control_token(token_id: int) -> bool:
    """True for ids that must never reach user-visible text."""
    return token_id in REPURPOSED_CONTROL_IDS or token_id >= FIRST_SPECIAL_ID


def listening_block() -> list[int]:
    """The 12 tokens fed per audio chunk; the PAD embeddings are overwritten by audio."""
    return [AUDIO_BEGIN] + [PAD] * AUDIO_FRAMES_PER_CHUNK + [ASSISTANT]


def prompt_prefix(system_prompt_ids: list[int]) -> list[int]:
    """The session prefix that precedes the first listening block."""
    return [ONLINE, ENGLISH, SYSTEM, TEXT_BEGIN, *system_prompt_ids, TEXT_END]


# ---- the context budget: what a session's settings need of its positions ----------------------------------
# Pure arithmetic on the token layout, here (a leaf) so that the configuration can check its defaults against
# ``engine.max_positions`` when it loads, with the engine's own rule.

BLOCK_TOKENS: Final = 1 + len(listening_block())  # lead token + AUDIO_BEGIN + PADs + ASSISTANT


def rollover_point(max_positions: int, max_turn_tokens: int) -> int:
    return max_positions - max_turn_tokens - 2 * BLOCK_TOKENS


def reply_fits(prefix_tokens: int, max_turn_tokens: int, max_positions: int) -> bool:
    """Whether a session's first row (its prompt and a block) and one full reply fit the budget. A full reply feeds
    TEXT_BEGIN and every reply token (the cap-th one included) before the next block."""
    return prefix_tokens + BLOCK_TOKENS + 1 + max_turn_tokens + BLOCK_TOKENS <= max_positions


def rollover_slack(prefix_tokens: int, max_turn_tokens: int, max_positions: int, rollover_window: int) -> int:
    """Positions between a rebuilt context at its largest (prompt, window, two blocks) and the rollover point: a
    rollover fits while this is above 0."""
    return rollover_point(max_positions, max_turn_tokens) - (prefix_tokens + rollover_window + 2 * BLOCK_TOKENS)


# A session's own options (its prompt, its reply cap) may not leave fewer listening chunks than this between context
# rollovers, unless the server's default session leaves fewer (a small budget): each rollover re-feeds the prompt and
# the window as one long row that no prefill budget pays for, and a session one chunk away from its rollover point
# once made the engine re-feed 4,000 tokens every 0.8 s of its audio.
MIN_CHUNKS_BETWEEN_ROLLOVERS: Final = 30


def chunks_after_rollover(prefix_tokens: int, max_turn_tokens: int, max_positions: int, rollover_window: int) -> int:
    """Listening blocks a session's rebuilt context (its prompt, the window) takes before it rolls over again."""
    return max(0, rollover_slack(prefix_tokens, max_turn_tokens, max_positions, rollover_window) // BLOCK_TOKENS)


def chunks_between_rollovers(max_positions: int, max_turn_tokens: int, rollover_window: int | None) -> int | None:
    """Listening blocks a rebuilt context takes before it rolls over again (no prompt, no reply counted; None:
    no rollover). ``check_room`` only asks that a rollover fits; a window close to that rolls over all the time."""
    if rollover_window is None:
        return None
    return chunks_after_rollover(0, max_turn_tokens, max_positions, rollover_window)


def rollover_floor(default_prefix_tokens: int, default_max_turn_tokens: int, max_positions: int,
                   rollover_window: int | None) -> int:
    """The fewest chunks between rollovers a session's options may leave (``check_room``'s ``min_chunks``):
    ``MIN_CHUNKS_BETWEEN_ROLLOVERS``, or what the default session leaves where that is fewer."""
    if rollover_window is None:
        return 0
    return min(MIN_CHUNKS_BETWEEN_ROLLOVERS, chunks_after_rollover(default_prefix_tokens, default_max_turn_tokens,
                                                                   max_positions, rollover_window))


def largest_turn_tokens(prefix_tokens: int, max_positions: int, rollover_window: int | None,
                        min_chunks: int = 0) -> int:
    """The largest ``max_turn_tokens`` that ``check_room`` accepts with these settings (below 1: none does)."""
    largest = max_positions - prefix_tokens - 2 * BLOCK_TOKENS - 1  # reply_fits
    if rollover_window is not None:
        # rollover_slack falls by one per reply token; it must stay above 0 and hold min_chunks blocks.
        slack_needed = max(1, min_chunks * BLOCK_TOKENS)
        largest = min(largest, max_positions - prefix_tokens - rollover_window - 4 * BLOCK_TOKENS - slack_needed)
    return largest


def check_room(prefix_tokens: int, max_turn_tokens: int, max_positions: int, rollover_window: int | None,
               min_chunks: int = 0) -> None:
    """Raise ValueError if a session with these settings could not run (or could not roll over), or would roll its
    context over more often than every ``min_chunks`` listening chunks (``rollover_floor``: a client's options).
    Each message ends with the largest ``max_turn_tokens`` this prompt allows, or says that none does."""
    largest = largest_turn_tokens(prefix_tokens, max_positions, rollover_window, min_chunks)
    if largest >= 1:
        advice = f"the largest possible here is {largest}"
    else:
        advice = "no reply fits with this prompt: use a shorter system prompt"
    if not reply_fits(prefix_tokens, max_turn_tokens, max_positions):
        raise ValueError(
            f"max_turn_tokens {max_turn_tokens} with a {prefix_tokens}-token prompt does not fit the "
            f"{max_positions}-position context budget; {advice}"
        )
    if rollover_window is None:
        return
    slack = rollover_slack(prefix_tokens, max_turn_tokens, max_positions, rollover_window)
    if slack <= 0:
        rebuilt_max = prefix_tokens + rollover_window + 2 * BLOCK_TOKENS
        raise ValueError(
            f"max_turn_tokens {max_turn_tokens} is too large for context rollover: a rebuilt context "
            f"(prompt {prefix_tokens} + window {rollover_window} + 2 blocks = {rebuilt_max} positions) plus "
            f"a full reply must fit {max_positions} positions; {advice}"
        )
    chunks = chunks_after_rollover(prefix_tokens, max_turn_tokens, max_positions, rollover_window)
    if chunks < min_chunks:
        raise ValueError(
            f"a {prefix_tokens}-token prompt with max_turn_tokens {max_turn_tokens} leaves room for {chunks} chunks "
            f"of audio between context rollovers (each re-feeds the prompt and {rollover_window} positions of "
            f"history); at least {min_chunks} are needed: use a shorter system prompt or a smaller max_turn_tokens "
            f"({advice})"
        )


DEFAULT_ROLLOVER_WINDOW: Final = 2048  # engine.rollover_window_positions' default, for the default 4,096 budget


def fitting_rollover_window(max_positions: int, max_turn_tokens: int, prefix_tokens: int = 0) -> int:
    """A rollover window for a budget chosen without one (a benchmark's, the offline CLI's ``--max-positions``):
    the server's default from 4,096 positions up where it fits; else half of what a full reply and a rebuilt
    context's prompt and blocks leave, which keeps rollovers rare (the default would not fit below about 2,700)."""
    half = max(0, (max_positions - max_turn_tokens - prefix_tokens - 4 * BLOCK_TOKENS) // 2)
    if max_positions >= 4096 and rollover_slack(prefix_tokens, max_turn_tokens, max_positions,
                                                 DEFAULT_ROLLOVER_WINDOW) > 0:
        return DEFAULT_ROLLOVER_WINDOW
    return half  # below 4,096 positions, or a reply cap the default window leaves no room for
