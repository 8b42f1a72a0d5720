"""audio_interaction_server.recent: the bounded table every per-address limit keeps its addresses in."""

from __future__ import annotations

from audio_interaction_server.recent import RecentTable


def test_the_least_recently_used_key_is_forgotten_first():
    table: RecentTable[list[int]] = RecentTable(max_tracked=2)
    a = table.use("a", list)
    a.append(1)
    table.use("b", list)
    assert table.use("a", list) == [1]  # kept, and now the most recently used
    table.put("c", [3])
    assert len(table) == 2 and table.get("b") is None  # b was the least recently used
    assert table.get("a") == [1] and table.get("c") == [3]


def test_a_look_does_not_count_as_a_use():
    table: RecentTable[int] = RecentTable(max_tracked=2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1
    table.put("c", 3)
    assert table.get("a") is None and table.get("b") == 2  # a looked at, not used: still the oldest


def test_put_replaces_and_refreshes_an_entry():
    table: RecentTable[int] = RecentTable(max_tracked=2)
    table.put("a", 1)
    table.put("b", 2)
    table.put("a", 10)
    table.put("c", 3)
    assert (table.get("a"), table.get("b"), len(table)) == (10, None, 2)
