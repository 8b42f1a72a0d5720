"""Keys and values of session prefixes (the system prompt), kept so a new session starts without feeding its prompt.

Every session's context starts with the same few dozen tokens (``[ONLINE, ENGLISH, SYSTEM, TEXT_BEGIN] + prompt +
[TEXT_END]``, 46 with the trained prompt), and under causal attention their keys and values at positions
0..P-1 depend on those tokens alone. So once one session has fed a prefix, the next session with the same
prompt copies its P positions of every layer into its own slot and feeds only its first block from position P:
a 12-token row that a static step (a graph replay on CUDA) takes, where ``prefix + block`` (58 tokens) is a long
row for the eager path. When hundreds of streams start within a second, their first rows are what the step runs.

The store keeps the prefixes least recently used last, bounded in positions (``engine.prefix_kv_positions``);
the worker fills it with the trained prompt's prefix at start-up, and any row that fed a prefix from position 0
(a session's first row, a rollover) adds its own prompt's.

Threading: the worker thread only (it owns the cache).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from audio_interaction_server.model.lm import SlotKVCache


@dataclass(frozen=True)
class KeptPrefix:
    keys: torch.Tensor  # (layers, groups, P, head_size), the slot layout's positions 0..P-1
    values: torch.Tensor


class PrefixKVStore:
    def __init__(self, cache: SlotKVCache, max_positions: int) -> None:
        """``max_positions``: the most positions kept over every prefix (0 = keep none)."""
        self.cache = cache
        self.max_positions = max_positions
        self._kept: OrderedDict[tuple[int, ...], KeptPrefix] = OrderedDict()

    @property
    def positions(self) -> int:
        """Positions kept now, over every prefix (a handful of prefixes: summed when asked)."""
        return sum(map(len, self._kept))

    def __contains__(self, prefix: tuple[int, ...]) -> bool:
        return prefix in self._kept

    def can_keep(self, prefix: tuple[int, ...]) -> bool:
        """Whether ``prefix`` fits the bound at all (alone, with every other prefix dropped)."""
        return 0 < len(prefix) <= self.max_positions

    def load(self, slot: int, prefix: tuple[int, ...]) -> bool:
        """Copy ``prefix``'s keys and values into positions 0..P-1 of ``slot``; False if it is not kept."""
        kept = self._kept.get(prefix)
        if kept is None:
            return False
        self._kept.move_to_end(prefix)
        self.cache.write_positions(slot, kept.keys, kept.values)
        return True

    def keep(self, slot: int, prefix: tuple[int, ...]) -> None:
        """Keep what ``slot`` holds at positions 0..P-1, which a row has just fed with ``prefix``."""
        if prefix in self._kept:
            self._kept.move_to_end(prefix)
            return
        if not self.can_keep(prefix):
            return
        while self.positions + len(prefix) > self.max_positions:
            self._kept.popitem(last=False)
        keys, values = self.cache.read_positions(slot, len(prefix))
        self._kept[prefix] = KeptPrefix(keys, values)
