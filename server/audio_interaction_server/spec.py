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
