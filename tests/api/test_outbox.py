"""The per-client outbox: text deltas of a reply coalesce while the client is behind; the bound still holds."""

from __future__ import annotations

from audio_interaction_server.api.connection import Outbox
from audio_interaction_server.protocol import LiveTextDeltaEvent, LiveTurnEndEvent


def delta(turn: int, text: str) -> LiveTextDeltaEvent:
    return LiveTextDeltaEvent(session_id="s", server_time_ms=0, turn=turn, text=text)


def end(turn: int) -> LiveTurnEndEvent:
    return LiveTurnEndEvent(session_id="s", server_time_ms=0, turn=turn, text="", token_ids=[], num_tokens=0,
                            end_reason="text_end")


def test_deltas_of_one_reply_coalesce_while_unsent():
    outbox = Outbox(websocket=None, max_events=3)
    for i in range(1000):  # a reader that is far behind: memory per reply, not per token
        assert outbox.put([delta(0, f"{i} ")])
    assert len(outbox._items) == 1 and outbox._items[0].text == "".join(f"{i} " for i in range(1000))
    assert outbox.num_coalesced == 999
    assert outbox.put([end(0), delta(1, "a"), delta(1, "b")])  # a new reply starts a new delta
    assert [e.type for e in outbox._items] == ["text_delta", "turn_end", "text_delta"]
    assert outbox._items[-1].text == "ab"


def test_a_reader_that_stays_behind_hits_the_bound():
    outbox = Outbox(websocket=None, max_events=3)
    assert outbox.put([end(0), end(1), end(2)])
    assert not outbox.put([end(3)])
