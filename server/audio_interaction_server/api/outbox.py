"""The events waiting for one client (``Outbox``): bounded in events and bytes, a slow reader's text deltas merged,
numbered (and kept for a resume) as they go out, and written by its send loop or, under our transport, at once.
Event loop only.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketState

from audio_interaction_server.api.native import NativeCodec
from audio_interaction_server.api.replay_log import ReplayLog, event_bytes
from audio_interaction_server.api.websocket_guard import direct_messages


class _Close:
    def __init__(self, code: int) -> None:
        self.code = code


class Unnumbered:
    """An event about the connection rather than the session (``session.resumed``): sent without a seq."""

    def __init__(self, event) -> None:
        self.event = event


def queued_bytes(item) -> int:
    """What one queued item costs: an event's ``event_bytes``, a close nothing."""
    if isinstance(item, Unnumbered):
        item = item.event
    if isinstance(item, _Close):
        return 0
    return event_bytes(item)


class Outbox:
    """Events waiting for one client, bounded in events and in bytes so a client that stops reading cannot eat
    the memory.

    While a client is behind, consecutive unsent text deltas of one reply merge into one
    event (same text, fewer events), so a slow reader costs memory per reply, not per
    token; only a client that stays behind until ``max_events`` events or ``max_bytes`` bytes
    wait for it is disconnected. ``held_bytes`` (a codec's) adds what the connection keeps
    elsewhere until these events are sent: the realtime codec's items awaiting their echo.

    ``log`` numbers each event as it goes out (after any merge, so the numbers the client
    sees never skip), and with ``keeps_sent`` keeps it for a resume; an event that already has its
    number (a replay) is sent as it is.
    """

    def __init__(self, websocket: WebSocket, max_events: int, max_bytes: int,
                 encode: Callable[[object], list[str]] = NativeCodec.encode,
                 log: ReplayLog | None = None, keeps_sent: bool = False,
                 held_bytes: Callable[[], int] | None = None) -> None:
        self.websocket = websocket
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._encode = encode
        self.log = log
        self._keeps_sent = keeps_sent
        self._held_bytes = held_bytes
        self._items: deque[tuple[Any, int]] = deque()  # (event, its queued_bytes)
        self.num_bytes = 0
        self._has_items = asyncio.Event()
        self.is_closing = False
        self.num_coalesced = 0
        # Under our transport an event with nothing queued before it is written in the caller's turn, without a
        # wake-up of the send loop (api/websocket_guard.py, send_text_now); elsewhere every event goes through it.
        extension = direct_messages(websocket)
        self._send_now = None if extension is None else extension.send_text_now
        self._is_sending = False  # the send loop holds an event it took from the queue: later ones wait behind it
        self.num_sent_now = 0

    def put(self, events: list, *, bounded: bool = True) -> bool:
        """False once the client is too far behind (the caller then ends the connection). Not ``bounded``: a
        resume's replay, which the session's log holds anyway, goes in whole (live events behind it are bounded)."""
        if self.is_closing:
            return True
        for event in events:
            if self._send_now is not None and not self._items and not self._is_sending and self._send_now(
                    functools.partial(self._texts_of, event, None)):
                self.num_sent_now += 1
                continue
            if not self._merge_into_last(event):
                if bounded and len(self._items) >= self.max_events:
                    return False
                self._append(event)
        self._wake()
        held_bytes = self._held_bytes() if self._held_bytes is not None else 0
        return not bounded or self.num_bytes + held_bytes <= self.max_bytes

    def _append(self, event) -> None:
        size = queued_bytes(event)
        self._items.append((event, size))
        self.num_bytes += size

    def _popleft(self) -> tuple[Any, int]:
        event, size = self._items.popleft()
        self.num_bytes -= size
        return event, size

    def _merge_into_last(self, event) -> bool:
        last = self._items[-1][0] if self._items else None
        if (getattr(event, "type", None) != "text_delta" or last is None or getattr(last, "type", None) != "text_delta"
                or last.turn != event.turn or last.seq is not None):  # a numbered event is sent as numbered
            return False
        merged = last.model_copy(update={"text": last.text + event.text})
        self._items[-1] = (merged, self._items[-1][1] + len(event.text))
        self.num_bytes += len(event.text)
        self.num_coalesced += 1
        return True

    def close(self, code: int, last_events: Sequence = ()) -> None:
        """Queue the close after everything already queued (``last_events`` go in regardless of the bound)."""
        if self.is_closing:
            return
        for event in last_events:
            self._append(event)
        self.is_closing = True
        self._append(_Close(code))
        self._wake()

    def take_unsent(self) -> list:
        """The events not sent yet (the close, if queued, stays): for a session that outlives this socket."""
        events = [item for item, _ in self._items if not isinstance(item, (_Close, Unnumbered))]
        self._clear(keep_close=True)
        return events

    def abandon(self, code: int, last_events: list) -> None:
        """Drop what is queued, send ``last_events`` and close: for a client that does not read."""
        self._clear(keep_close=False)
        self.is_closing = False
        self.close(code, last_events)

    def _clear(self, keep_close: bool) -> None:
        self._items = deque(entry for entry in self._items if keep_close and isinstance(entry[0], _Close))
        self.num_bytes = 0

    def queued_events(self) -> list:
        return [item for item, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        if self._items:
            self._has_items.set()

    async def send_loop(self) -> None:
        while True:
            while not self._items:
                self._has_items.clear()
                await self._has_items.wait()
            item, size = self._popleft()
            if isinstance(item, _Close):
                if self.websocket.application_state is not WebSocketState.DISCONNECTED:
                    await self.websocket.close(item.code)
                return
            self._is_sending = True
            try:
                for frame in self._texts_of(item, size):
                    await self.websocket.send_text(frame)
            finally:
                self._is_sending = False
            await asyncio.sleep(0)  # a send that does not block does not yield: one event per loop turn

    def _texts_of(self, item, size: int | None) -> list[str]:
        """The frames of an event as it goes out: numbered first (and kept for a resume) unless it is a replay's
        or unnumbered. ``size``: what the event counted while queued; one that was not queued (written at once)
        is counted as the text that goes out, so it is serialised once."""
        if isinstance(item, Unnumbered):
            return self._encode(item.event)
        if self.log is None or item.seq is not None:
            return self._encode(item)
        numbered = self.log.number(item)  # numbered, and kept, before the send that may fail
        texts = self._encode(numbered)
        if self._keeps_sent:
            self.log.keep(numbered, sum(map(len, texts)) if size is None else size)
        return texts
