"""A table of per-client state that forgets: at most ``max_tracked`` keys, the least recently used first.

Every per-address limit (connection attempts, flood budgets and cut cooldowns, the prefill budget, catch-up pacing)
remembers its addresses in one: what a client with many addresses can make the server hold stays bounded, and
forgetting an address only gives it a fresh entry (a full bucket, no cooldown). Not thread-safe: each table has one
owner thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


class RecentTable(Generic[V]):
    def __init__(self, max_tracked: int) -> None:
        self.max_tracked = max_tracked
        self._entries: OrderedDict[str, V] = OrderedDict()

    def use(self, key: str, make: Callable[[], V]) -> V:
        """``key``'s entry (``make()`` where it has none), now the most recently used."""
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = make()
        self.put(key, entry)
        return entry

    def put(self, key: str, value: V) -> None:
        """Set ``key``'s entry, the most recently used; the least recently used beyond ``max_tracked`` are forgotten."""
        self._entries.pop(key, None)
        self._entries[key] = value
        while len(self._entries) > self.max_tracked:
            self._entries.popitem(last=False)

    def get(self, key: str) -> V | None:
        """``key``'s entry without counting it as used (None: none)."""
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)
