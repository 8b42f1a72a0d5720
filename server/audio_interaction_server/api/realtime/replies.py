"""One reply of the model as the Realtime API's response: the event sequence around its text.

A ``ReplyBuilder`` follows the session's reply events (``turn_begin``, ``emotion``,
``text_delta``, ``turn_end``) and produces, in the order clients expect:

    input_audio_buffer.committed + conversation.item.added/done   (the user's audio, when uncommitted)
    response.created -> response.output_item.added -> conversation.item.added -> response.content_part.added
    response.output_text.delta ...
    response.output_text.done -> response.content_part.done -> response.output_item.done
    -> conversation.item.done -> response.done

The response opens at the reply's first token (its emotion tag), not at ``turn_begin``: the
emotion then rides in ``response.created``'s metadata as well as ``response.done``'s, and the
first text delta is not delayed by it (it comes after the emotion token anyway).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from itertools import count

from pydantic import TypeAdapter

from audio_interaction_server.api.realtime.events import (
    ConversationItemAdded, ConversationItemDone, InputAudioBufferCommitted, InputAudioContent, Item, MessageItem,
    OutputTokenDetails, ResponseContentPartAdded, ResponseContentPartDone, ResponseCreated, ResponseDone,
    ResponseObject, ResponseOutputItemAdded, ResponseOutputItemDone, ResponseOutputTextDelta, ResponseOutputTextDone,
    StatusDetails, TextContent, TextPart, Usage,
)


class Ids:
    """Unique ids for one connection: a random prefix (unique across connections) and a counter."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(5)
        self._counter = count(1)

    def new(self, kind: str) -> str:
        return f"{kind}_{self._prefix}{next(self._counter):x}"


# How a reply ended (the session's turn_end end_reason) -> response status, status_details.
_ENDINGS: dict[str, tuple[str, StatusDetails | None]] = {
    "text_end": ("completed", None),
    "max_tokens": ("incomplete", StatusDetails(type="incomplete", reason="max_output_tokens")),
    "cancelled": ("cancelled", StatusDetails(type="cancelled", reason="client_cancelled")),
    "session_closed": ("cancelled", StatusDetails(type="cancelled")),
}


_ITEM_ADAPTER: TypeAdapter[Item] = TypeAdapter(Item)


@dataclass
class Conversation:
    """The items this connection announced, in conversation order: what ``previous_item_id`` refers to, and what
    ``conversation.item.retrieve`` answers with (each item as last announced, kept as its UTF-8 JSON)."""

    item_ids: dict[str, None] = field(default_factory=dict)  # an ordered set, in conversation order
    max_items: int = 4096  # a long session must not grow without bound: old ids are forgotten first
    # The items themselves, oldest announced first, within ``max_item_bytes`` of JSON: a client's items may be long
    # (up to a frame each), so the oldest are forgotten first (their ids stay, for previous_item_id).
    # Bytes, not str: a str holding one character beyond Latin-1 takes 2 or 4 bytes for each of its characters, so
    # the bound counted in UTF-8 bytes held up to 4 MiB (hostile probe, round thirteen).
    bodies: dict[str, bytes] = field(default_factory=dict)
    max_item_bytes: int = 1 << 20
    _body_bytes: int = 0

    @property
    def last_item_id(self) -> str | None:
        return next(reversed(self.item_ids), None)

    def add(self, item_id: str, item: Item | None = None) -> str | None:
        """Record ``item_id`` as the newest item, at the tail; returns the item it follows."""
        previous = self.last_item_id
        self.item_ids[item_id] = None
        self.keep(item)
        self._forget_the_oldest()
        return previous

    def insert(self, item_id: str, after: str | None, item: Item | None = None) -> None:
        """Record ``item_id`` right after ``after`` (None: first of all). The tail moves only when ``after`` is
        the tail: later items still go after the newest, not after an item a client placed in its history."""
        if after is not None and (after == self.last_item_id or after not in self.item_ids):
            self.add(item_id, item)  # not held: forgotten past ``max_items`` since the client named it
            return
        # A client's insertion into its own history, rare: rebuilding the order costs one pass.
        ordered = list(self.item_ids)
        ordered.insert(0 if after is None else ordered.index(after) + 1, item_id)
        self.item_ids = dict.fromkeys(ordered)
        self.keep(item)
        self._forget_the_oldest()

    def keep(self, item: Item | None) -> None:
        """Keep ``item`` as the latest state of its item (one the conversation holds), for a retrieve."""
        if item is None or item.id not in self.item_ids:
            return
        self._drop_body(item.id)
        body = _ITEM_ADAPTER.dump_json(item)
        self.bodies[item.id] = body
        self._body_bytes += len(body)
        while self._body_bytes > self.max_item_bytes:
            self._drop_body(next(iter(self.bodies)))

    def item(self, item_id: str) -> Item | None:
        """The item as last announced; None when the conversation does not hold it, or no longer keeps its body."""
        body = self.bodies.get(item_id)
        return None if body is None else _ITEM_ADAPTER.validate_json(body)

    def remove(self, item_id: str) -> None:
        self.item_ids.pop(item_id, None)
        self._drop_body(item_id)

    def _drop_body(self, item_id: str) -> None:
        body = self.bodies.pop(item_id, None)
        if body is not None:
            self._body_bytes -= len(body)

    def _forget_the_oldest(self) -> None:
        while len(self.item_ids) > self.max_items:
            oldest = next(iter(self.item_ids))
            del self.item_ids[oldest]
            self._drop_body(oldest)


@dataclass
class Reply:
    """One response in progress."""

    turn: int
    response_id: str
    item_id: str
    max_output_tokens: int
    client_metadata: dict[str, str] | None = None
    emotion: str | None = None
    text: str = ""
    is_open: bool = False  # response.created sent


class ReplyBuilder:
    def __init__(self, ids: Ids, conversation: Conversation) -> None:
        self.ids = ids
        self.conversation = conversation
        self.reply: Reply | None = None
        self._previous: str | None = None  # the item the open reply's item follows

    @property
    def response_id(self) -> str | None:
        return None if self.reply is None else self.reply.response_id

    @property
    def _open_reply(self) -> Reply:
        """The reply these events belong to (the codec calls the event methods only between begin and end)."""
        if self.reply is None:
            raise RuntimeError("a reply event without a reply in progress")
        return self.reply

    def begin(self, turn: int, max_output_tokens: int, client_metadata: dict[str, str] | None) -> None:
        self.reply = Reply(turn=turn, response_id=self.ids.new("resp"), item_id=self.ids.new("item"),
                           max_output_tokens=max_output_tokens, client_metadata=client_metadata)

    def commit_user_audio(self) -> list:
        """The audio heard so far becomes a user item (no transcript: the model does not transcribe)."""
        item = MessageItem(id=self.ids.new("item"), role="user", content=[InputAudioContent()])
        previous = self.conversation.add(item.id, item)
        return [
            InputAudioBufferCommitted(event_id=self.ids.new("event"), previous_item_id=previous, item_id=item.id),
            ConversationItemAdded(event_id=self.ids.new("event"), previous_item_id=previous, item=item),
            ConversationItemDone(event_id=self.ids.new("event"), previous_item_id=previous, item=item),
        ]

    def emotion(self, emotion: str) -> list:
        self._open_reply.emotion = emotion
        return self._open()

    def delta(self, text: str) -> list:
        out = self._open()
        self._open_reply.text += text
        return out + [ResponseOutputTextDelta(event_id=self.ids.new("event"), delta=text, **self._part_ids())]

    def end(self, end_reason: str, text: str, num_tokens: int) -> list:
        """The reply's last events; ``text`` is the session's whole reply text (the deltas joined)."""
        out = self._open()
        reply = self._open_reply
        status, details = _ENDINGS.get(end_reason, ("cancelled", StatusDetails(type="cancelled")))
        item = self._item("completed" if status == "completed" else "incomplete", text)
        self.conversation.keep(item)
        part = TextPart(text=text)
        response = self._response(status, output=[item])
        response.status_details = details
        response.usage = Usage(total_tokens=num_tokens, output_tokens=num_tokens,
                               output_token_details=OutputTokenDetails(text_tokens=num_tokens))
        out += [
            ResponseOutputTextDone(event_id=self.ids.new("event"), text=text, **self._part_ids()),
            ResponseContentPartDone(event_id=self.ids.new("event"), part=part, **self._part_ids()),
            ResponseOutputItemDone(event_id=self.ids.new("event"), response_id=reply.response_id, output_index=0,
                                   item=item),
            ConversationItemDone(event_id=self.ids.new("event"), previous_item_id=self._previous_of(reply.item_id),
                                 item=item),
            ResponseDone(event_id=self.ids.new("event"), response=response),
        ]
        self.reply = None
        return out

    def item(self, item_id: str) -> Item | None:
        """An item as a retrieve shows it: the open reply's with its text so far, any other as last announced."""
        reply = self.reply
        if reply is not None and reply.is_open and item_id == reply.item_id:
            return self._item("in_progress", reply.text or None)
        return self.conversation.item(item_id)

    # ---- helpers ---------------------------------------------------------------------
    def _open(self) -> list:
        reply = self._open_reply
        if reply.is_open:
            return []
        reply.is_open = True
        item = self._item("in_progress", None)
        previous = self.conversation.add(reply.item_id, item)
        self._previous = previous
        return [
            ResponseCreated(event_id=self.ids.new("event"), response=self._response("in_progress", output=[])),
            ResponseOutputItemAdded(event_id=self.ids.new("event"), response_id=reply.response_id, output_index=0,
                                    item=item),
            ConversationItemAdded(event_id=self.ids.new("event"), previous_item_id=previous, item=item),
            ResponseContentPartAdded(event_id=self.ids.new("event"), part=TextPart(text=""), **self._part_ids()),
        ]

    def _previous_of(self, item_id: str) -> str | None:
        return self._previous if item_id == self._open_reply.item_id else None

    def _item(self, status: str, text: str | None) -> MessageItem:
        content = [] if text is None else [TextContent(type="output_text", text=text)]
        return MessageItem(id=self._open_reply.item_id, role="assistant", status=status, content=content)

    def _response(self, status: str, output: list) -> ResponseObject:
        reply = self._open_reply
        metadata = dict(reply.client_metadata or {})
        if reply.emotion is not None:
            metadata["emotion"] = reply.emotion  # the model's emotion tag: metadata, never text
        return ResponseObject(id=reply.response_id, status=status, output=output,
                              max_output_tokens=reply.max_output_tokens, metadata=metadata or None)

    def _part_ids(self) -> dict:
        reply = self._open_reply
        return dict(response_id=reply.response_id, item_id=reply.item_id, output_index=0, content_index=0)
