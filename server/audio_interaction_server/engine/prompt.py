"""A session's system prompt -> the token prefix it starts with: encoded as plain text, cached, bounded.

Control tokens cannot be injected through the prompt. Two ways in exist (docs/model-notes.md §1.6):
the tokenizer parses special-token strings in text (``<|im_start|>`` -> TEXT_BEGIN, ``<|AUDIO|>``, ...),
and most of the model's control ids (USER, ASSISTANT, KEEP_SILENCE, PAD, the emotions) are ordinary BPE
tokens of single characters such as "ຂ" or "ㄍ". We encode rather than refuse: those characters are
everyday letters of Lao, Bopomofo and Hangul prompts, and a prompt that quotes ``<|im_start|>`` is
harmless text, so refusing would turn away legitimate prompts. Instead special-token strings are
tokenized as the text they are, and a character whose token is a control id is fed as its UTF-8 bytes
(byte-level BPE has a token for every byte), so the model reads the same text and never a control id.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from typing import Any

from audio_interaction_server import spec as T
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.spec import check_room, largest_turn_tokens, rollover_floor


class PromptEncoder:
    """Thread-safe: the event loop checks a prompt's length while the worker encodes prefixes."""

    def __init__(self, tokenizer: Any, max_cached_prompts: int, max_cached_tokens: int | None = None) -> None:
        """``max_cached_tokens``: longer prefixes are encoded but not kept (the worker passes its context
        budget: such a prompt cannot run, and keeping it would let the cache grow with what clients send)."""
        self._tokenizer = tokenizer  # a tokenizers.Tokenizer
        self._max_cached = max_cached_prompts
        self._max_cached_tokens = max_cached_tokens
        # Least recently used first; None stands for the model's trained prompt. Ids are kept as 4-byte
        # unsigned ints: a tuple of Python ints costs about 36 bytes a token, 9 times more.
        self._cache: OrderedDict[str | None, array] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, tokenizer: Any, config: EngineConfig) -> PromptEncoder:
        """Bounded by ``prompt_cache_size``: every distinct system prompt a client sends would otherwise stay in
        memory for good."""
        return cls(tokenizer, config.prompt_cache_size, max_cached_tokens=config.max_positions)

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def cached_prompts(self) -> list[str | None]:
        """The cached prompts, least recently used first (for monitoring and tests)."""
        with self._lock:
            return list(self._cache)

    def is_cached(self, system_prompt: str | None) -> bool:
        """Whether ``prefix`` would find this prompt's encoding kept (no tokenising)."""
        with self._lock:
            return system_prompt in self._cache

    def prefix(self, system_prompt: str | None) -> list[int]:
        """The session prefix for this prompt (None = the trained prompt); raises ValueError if unencodable."""
        with self._lock:
            cached = self._cache.get(system_prompt)
            if cached is not None:
                self._cache.move_to_end(system_prompt)
                return cached.tolist()
        text = T.SYSTEM_PROMPT if system_prompt is None else system_prompt
        prefix = T.prompt_prefix(self.encode(text))  # outside the lock: long prompts take a while
        if self._max_cached_tokens is not None and len(prefix) > self._max_cached_tokens:
            return prefix
        with self._lock:
            if self._max_cached > 0:
                self._cache[system_prompt] = array("I", prefix)
                self._cache.move_to_end(system_prompt)
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
        return prefix

    def encode(self, text: str) -> list[int]:
        """``text`` as ordinary tokens only: the tokenizer's own pipeline minus its special-token parsing."""
        tokenizer = self._tokenizer
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # lone surrogates (a config file can hold them; JSON cannot)
                raise ValueError(f"system_prompt: not valid Unicode text ({error.reason} at {error.start})") from None
        # normalizer -> pre-tokenizer -> model is exactly what ``Tokenizer.encode`` runs between splitting out
        # added tokens and post-processing; skipping that split is what makes "<|im_start|>" plain text.
        normalized = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer is not None else text
        if tokenizer.pre_tokenizer is not None:
            pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized)]
        else:
            pieces = [normalized]
        ids: list[int] = []
        for piece in pieces:
            for token in tokenizer.model.tokenize(piece):
                ids.extend(self._as_text(token.id) if T.is_control_token(token.id) else (token.id,))
        return ids

    def _as_text(self, control_id: int) -> list[int]:
        """A control id's characters as byte tokens (each char of a byte-level token string is one byte)."""
        byte_ids = [self._tokenizer.token_to_id(char) for char in self._tokenizer.id_to_token(control_id)]
        if any(i is None or T.is_control_token(i) for i in byte_ids):
            raise ValueError(f"system_prompt: the text of token {control_id} cannot be encoded without control "
                             "tokens by this tokenizer")
        return byte_ids


class SessionFit:
    """Whether a session's options fit an engine's context budget: the engine's own check, which each front of an
    engine process runs too, before a session's first audio (``spec.check_room``; its rollover-rate floor comes
    from the default session's, worked out once). Thread-safe, as ``PromptEncoder``."""

    def __init__(self, prompts: PromptEncoder, config: EngineConfig) -> None:
        self.prompts = prompts
        self._config = config
        self._rollover_floor = rollover_floor(len(prompts.prefix(None)), SessionOptions().max_turn_tokens,
                                              config.max_positions, config.rollover_window_positions)

    def prompt_length(self, options: SessionOptions) -> int:
        """Tokens of the prefix a session with these options starts with."""
        return len(self.prompts.prefix(options.system_prompt))

    def check(self, options: SessionOptions) -> None:
        """Raise ValueError if a session with these options could not run on this engine."""
        check_room(self.prompt_length(options), options.max_turn_tokens, self._config.max_positions,
                   self._config.rollover_window_positions, self._rollover_floor)

    def largest_turn_tokens(self, options: SessionOptions) -> int:
        """The largest ``max_turn_tokens`` that ``check`` accepts with these options' system prompt."""
        return largest_turn_tokens(self.prompt_length(options), self._config.max_positions,
                                   self._config.rollover_window_positions, self._rollover_floor)
