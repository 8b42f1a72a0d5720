"""The WebSocket side of the transport's limits: uvicorn's websockets sans-I/O protocol with bounded pings, data
frames, writes and closes (``GuardedWebSocketProtocol``; transport.py says what each limit is for), and the two
paths that keep a real-time stream cheap: whole audio frames read past the websockets parser, and messages handed
to the app in the transport's own callback (``DIRECT_MESSAGES_EXTENSION``). Event loop only.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar, NamedTuple, cast

from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask  # the parser's own unmasking: its C helper, or its pure-Python twin
from websockets.protocol import State as WebSocketState
from websockets.streams import StreamReader

from audio_interaction_server.api.transport_guard import TransportGuard, WatchedWrites, WriteWatch

# Input is handed to the WebSocket parser this many bytes at a time, and the ping budget checked
# in between: a 256 KiB read of 6-byte pings is 43k frames and 0.35 s of CPU to parse; a slice
# is 700 frames at most.
PARSE_SLICE_BYTES = 4096
# Reading a WebSocket pauses once this much of its input waits for the app (or PAUSE_READING_QUEUED_MESSAGES
# messages), and resumes when the app has taken it all. uvicorn pauses for every message it queues instead: two
# epoll changes per audio frame, a tenth of the event loop at 48 real-time streams, for no flow control a
# client at real-time pace needs (the app takes each frame on the loop's next turn).
PAUSE_READING_QUEUED_BYTES = 64 * 1024
PAUSE_READING_QUEUED_MESSAGES = 16
# Whole, masked, unfragmented text and binary frames (the audio) skip the websockets frame parser (below,
# ``GuardedWebSocketProtocol._split_frames``): first header bytes 0x81 and 0x82 (FIN set, no reserved bits).
FAST_PATH_FIRST_BYTES = frozenset((0x81, 0x82))
# The websockets parser waits here, and only here, between frames: ``Protocol.parse`` asks the reader for EOF
# before each frame's first byte.
_BETWEEN_FRAMES_CODE = StreamReader.at_eof.__code__
# The ASGI scope extension (``scope["extensions"]``) through which an app takes whole data messages in the
# transport's own callback (``GuardedWebSocketProtocol.take_messages_with``); absent under other servers.
DIRECT_MESSAGES_EXTENSION = "ais.direct_messages"
# An app's handler for such a message: True when it took the message, False to have it queued for its receive.
DirectMessageHandler = Callable[[ASGIReceiveEvent], bool]


class DirectMessages(NamedTuple):
    """What ``DIRECT_MESSAGES_EXTENSION`` offers an app (``GuardedWebSocketProtocol``'s methods; in the scope
    a dict, as ASGI's extensions are)."""

    take_with: Callable[[DirectMessageHandler | None], None]
    send_text_now: Callable[[Callable[[], Any]], bool]
    # The flood the transport closed the socket for (1008), or None: the app asks when the socket has ended, since
    # the disconnect message that says so may never be read (a send that failed first ends the app's loops).
    cut_reason: Callable[[], str | None]
    # Lowers this connection's data-frame budget (frames a second, burst) below the transport's: for a connection
    # whose client has nothing to send (a subscriber), so that its fragments cost what its messages may.
    limit_data_frames: Callable[[float, int], None]
    # Lowers the largest message this connection may send (bytes) below the transport's (1009 past it): for the same.
    limit_message_bytes: Callable[[int], None]


def direct_messages(websocket: Any) -> DirectMessages | None:
    """The extension of ``websocket``'s connection (an ASGI scope holder, such as starlette's WebSocket), or None
    where it runs under another server (or is a test's double without a scope)."""
    extension = getattr(websocket, "scope", {}).get("extensions", {}).get(DIRECT_MESSAGES_EXTENSION)
    return None if extension is None else DirectMessages(extension["take_with"], extension["send_text_now"],
                                                         extension["cut_reason"], extension["limit_data_frames"],
                                                         extension["limit_message_bytes"])


class DeadlineOnClose:
    """The connection's transport, with a deadline on ``close()``, and writes after ``write_eof()`` dropped.

    asyncio's ``close()`` waits for the write buffer to drain, forever if the peer never reads;
    this one aborts after ``close_timeout_s``, so a closed connection always releases its socket.
    A write after our end of file is dropped, as asyncio drops one after ``close()`` (it would raise).
    """

    def __init__(self, transport: asyncio.Transport, timeout_s: float, on_timeout: Any) -> None:
        self._transport = transport
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self.deadline: asyncio.TimerHandle | None = None
        self.eof_written = False

    def close(self) -> None:
        if self.deadline is None and not self._transport.is_closing():
            self.deadline = asyncio.get_running_loop().call_later(self._timeout_s, self._on_timeout)
        self._transport.close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.eof_written:
            self._transport.write(data)

    def write_eof(self) -> None:
        self.eof_written = True
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_SHORT_TEXT_HEADER = struct.Struct("!BB")
_MEDIUM_TEXT_HEADER = struct.Struct("!BBH")
_LONG_TEXT_HEADER = struct.Struct("!BBQ")


def _server_text_frame(payload: bytes) -> bytes:
    """A whole text message as a server frames it (RFC 6455 5.2: FIN and opcode 1, no mask, the shortest length
    field that holds the payload's length)."""
    size = len(payload)
    if size < 126:
        return _SHORT_TEXT_HEADER.pack(0x81, size) + payload
    if size < 65536:
        return _MEDIUM_TEXT_HEADER.pack(0x81, 126, size) + payload
    return _LONG_TEXT_HEADER.pack(0x81, 127, size) + payload


def _frame_bounds(data: bytes | bytearray, position: int, end: int) -> tuple[int, int] | None:
    """(payload start, frame end) of the frame at ``data[position:end]`` from its header (RFC 6455 5.2; the
    frame end may lie past ``end``), or None while the header is incomplete."""
    if end - position < 2:
        return None
    second_byte = data[position + 1]
    length = second_byte & 0x7F
    header_end = position + 2
    if length == 126:
        header_end += 2
        if header_end > end:
            return None
        length = int.from_bytes(data[position + 2:header_end], "big")
    elif length == 127:
        header_end += 8
        if header_end > end:
            return None
        length = int.from_bytes(data[position + 2:header_end], "big")
    if second_byte & 0x80:  # the masking key
        header_end += 4
        if header_end > end:
            return None
    return header_end, header_end + length


def _payload_bytes(message: Mapping[str, Any]) -> int:
    """The size of a ``websocket.receive`` message as it came off the wire (0 for the other kinds)."""
    text = message.get("text")
    if text is not None:
        return len(text.encode())
    data = message.get("bytes")
    return 0 if data is None else len(data)


class GuardedWebSocketProtocol(WatchedWrites, WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (websockets sans-I/O) with bounded pings, writes and closes."""

    transport_guard: ClassVar[TransportGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.transport_guard.settings
        self.close_timeout = settings.close_timeout_s  # uvicorn waits 10 s for the client's close reply
        self.write_watch = WriteWatch(self.transport_guard, self._write_stalled)
        self._control_tokens = float(settings.control_frame_burst)
        self._control_tokens_at_s = time.monotonic()
        self._num_control_frames = 0  # received in the slice being parsed
        self._owes_pongs = False
        # Data frames (whole messages and fragments): refilled once per read, spent one a frame (_take_data_frame).
        self._data_frames_per_s = settings.data_frames_per_s
        self._data_frame_burst = float(settings.data_frame_burst)
        self._data_frame_tokens = self._data_frame_burst
        self._data_frame_tokens_at_s = time.monotonic()
        self._queued_bytes = 0  # payload bytes of the messages waiting in ``queue`` for the app
        self._partial_frame = bytearray()  # the start of a frame ``_split_frames`` waits to see whole
        self._parser_seen_between_frames = False  # since the parser was last fed (``_parse``): no need to look again
        self.num_fast_frames = 0  # frames that skipped the websockets parser (for tests)
        self._direct_handler: DirectMessageHandler | None = None
        self._may_deliver_directly = False  # one message per read may go to the handler (fairness, below)
        self.num_direct_messages = 0  # messages the app's handler took (for tests)
        self.num_texts_sent_now = 0  # text messages written by send_text_now (for tests)
        self.cut_reason: str | None = None  # the flood this socket was closed for (_fail_policy)
        self._refusal_counted = False  # a refused handshake spent its client's plain-request budget
        # Set once the socket lingers after a close (_close_once_the_client_has_read_it): reads are dropped.
        self._linger: asyncio.TimerHandle | None = None
        # The websockets parser's own limit on one frame (a fragment or a whole message, whichever is lower).
        limits = [limit for limit in (self.conn.max_message_size, self.conn.max_fragment_size) if limit is not None]
        self._max_fast_payload = min(limits, default=2**63)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = DeadlineOnClose(self.transport, self.close_timeout, self._close_timed_out)  # type: ignore
        self.transport_guard.open_connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport_guard.open_connections.discard(self)
        self.write_watch.cancel()
        if self._linger is not None:
            self._linger.cancel()
        if self.transport.deadline is not None:
            self.transport.deadline.cancel()
        super().connection_lost(exc)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code != 101:  # no WebSocket handshake (uvicorn answered it and closed)
            self._count_refusal()
        if self.response.status_code == 101:  # the app's task is created, not yet run: the scope is still ours
            self.scope["extensions"][DIRECT_MESSAGES_EXTENSION] = {"take_with": self.take_messages_with,
                                                                   "send_text_now": self.send_text_now,
                                                                   "cut_reason": lambda: self.cut_reason,
                                                                   "limit_data_frames": self.limit_data_frames,
                                                                   "limit_message_bytes": self.limit_message_bytes}

    def handle_handshake_exception(self) -> None:
        # A handshake websockets could not parse (a header h11 let through, a Transfer-Encoding): refused with 400
        # by uvicorn before any app, a refusal all the same, and as cheap to repeat as one.
        super().handle_handshake_exception()
        self._count_refusal()

    async def send(self, message: Any) -> None:
        if not self.handshake_complete and self.initial_response is None and \
                message["type"] in ("websocket.close", "websocket.http.response.start"):
            self._count_refusal()  # the app refuses the handshake (429, 404, 401, 503, ...)
        if self._linger is not None:
            # Closed (ours or the app's), the socket kept only for the client to read the close: to the app it is gone,
            # as it was once closed at once. uvicorn, the socket not lost yet, raised RuntimeError ("after sending
            # 'websocket.close'") for the events the app still sent, an 'Exception in ASGI application' in the log.
            raise ClientDisconnected()
        await super().send(message)

    def _count_refusal(self) -> None:
        """A refused handshake costs the event loop what a plain request does (the head parsed, an answer written)
        and spends a request of its client's plain-request budget, as one would: once that is spent, the address's
        next connections are answered 429 as they are made (``GuardedHttpProtocol.connection_made``), before any
        parsing. Upgrades spent nothing, so one address opening connections as fast as it could, each refused
        (429 past ``connect_rate_per_ip``, 404 on a path no WebSocket route serves), kept the loop busy: ~1,500
        a second held a real-time neighbour's decisions 2-6 s late (hostile probe, round ten). Accepted handshakes
        are bounded by ``connect_rate_per_ip`` and spend nothing here."""
        if self._refusal_counted:
            return
        self._refusal_counted = True
        scope = getattr(self, "scope", None)
        client = (scope or {}).get("client") or self.client  # a trusted proxy's client, as uvicorn resolved it
        if client:
            self.transport_guard.takes_http_request(client[0])

    def take_messages_with(self, handler: DirectMessageHandler | None) -> None:
        """Hand whole data messages to ``handler`` as they are read, instead of queueing them for ``receive``
        (None: back to the queue). The app registers it while its receive loop waits, and only then.

        Why: at real-time pace every audio frame otherwise costs a queue put, a task wake-up and the ASGI
        receive chain before the app sees it, more than the app's own work for the frame (docs/performance.md,
        "Host cost per stream"). Order is kept: the handler gets a message only when none waits in the queue,
        and the app takes queued ones through ``receive`` as before. Fairness is kept: at most one message per
        read goes to the handler; a flood's other messages queue, and ``receive`` takes them one per loop turn.
        A handler's exception is the app's failure: logged, and the connection closed with 1011 (as uvicorn does
        when an app raises), the app seeing the disconnect.
        """
        self._direct_handler = handler

    def send_text_now(self, make_texts: Callable[[], list[str]]) -> bool:
        """Write the text messages ``make_texts()`` returns now, as the ASGI ``websocket.send`` of each would;
        False, without calling it, where such a send would wait or fail (the peer is not reading, the connection
        is closing): the app sends them the ASGI way then, behind anything it already queued. ``make_texts`` is
        called only when they go (an app numbers its events as they are sent).

        Why: the app's send otherwise wakes a sender task per event and goes through the ASGI send chain, a
        sizeable share of a real-time stream's cost for a 150-byte event (docs/performance.md, "Host cost per
        stream"). The app calls it only when nothing of its own waits to be sent, so the order holds.
        """
        conn = self.conn
        if (not self.writable.is_set() or self.disconnected or self.close_sent or not self.handshake_complete
                or self.initial_response is not None or conn.state is not WebSocketState.OPEN):
            return False
        texts = make_texts()
        self.num_texts_sent_now += len(texts)
        if conn.extensions or conn.expect_continuation_frame or conn.writes:
            for text in texts:  # websockets frames them: an extension's transform, or after what it holds
                conn.send_text(text.encode())
            self.transport.write(b"".join(conn.data_to_send()))
        else:
            # A server's whole text message is one unmasked FIN frame: written here, the bytes websockets' own
            # send_text would write, without its Frame object, serialiser and write list per event.
            self.transport.write(b"".join([_server_text_frame(text.encode()) for text in texts]))
        return True

    def limit_data_frames(self, per_s: float, burst: int) -> None:
        """Hold this connection's data frames (whole messages and fragments) to ``per_s`` a second and ``burst`` at
        once, where that is below the transport's own budget (``data_frames_per_s``, ``data_frame_burst``).

        Why: a subscriber only listens; its messages are read and dropped within its event budget (20 a second),
        but the fragments of a message it never finishes reach no app at all, and the transport let each
        connection send 1,000 of them a second. One address holding 12 sessions, each with its 4 subscribers
        sending empty continuation frames, kept the event loop busy enough that a real-time neighbour's decisions
        came 0.6 s late (p50) and 1.4 s (p95) (hostile probe, round twelve)."""
        self._refill_data_frames()
        self._data_frames_per_s = min(self._data_frames_per_s, per_s)
        self._data_frame_burst = min(self._data_frame_burst, float(burst))
        self._data_frame_tokens = min(self._data_frame_tokens, self._data_frame_burst)

    def limit_message_bytes(self, max_bytes: int) -> None:
        """Close this connection with 1009 when a message (or a fragment) of its client's exceeds ``max_bytes``,
        where that is below the transport's own size (``ws_max_size``). Why: a subscriber's messages are read,
        unmasked and UTF-8 checked only to be dropped, and at 1 MiB each, 48 subscribers within their message
        budget held a real-time neighbour's p95 at 240 ms against 109 (hostile probe, round thirteen)."""
        conn = self.conn
        conn.max_message_size = min(conn.max_message_size or max_bytes, max_bytes)  # read by its parser per frame
        self._max_fast_payload = min(self._max_fast_payload, max_bytes)  # a larger frame goes to that parser

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:  # closed, lingering: what the client still sends is read and dropped
            return
        self._may_deliver_directly = True
        self._refill_data_frames()
        if self._partial_frame:
            self._partial_frame += data
            self._split_frames(self._partial_frame)
        elif self.conn.state is WebSocketState.OPEN and (self._parser_seen_between_frames
                                                         or self._parser_between_frames()):
            self._split_frames(data)
        else:
            self._parse(data)

    def _split_frames(self, data: bytes | bytearray) -> None:
        """Cut ``data`` into frames. A whole, masked, unfragmented text or binary frame, within the size limit,
        on an open connection with no extension, goes to the app directly: its header read here, its payload
        unmasked by websockets' own C helper. Every other frame (control frames, fragments, an unmasked or
        oversized frame, anything after a close) goes to the websockets parser whole, so the parser is always
        between frames when the next one comes, and does with it exactly what it would have done.

        Why: the general parser is a chain of generators run per frame, and with uvicorn's event dispatch it
        was about a sixth of the event loop at 48 real-time streams (docs/performance.md, "Host cost per
        stream"); the audio frames are almost all of the frames.
        """
        end, position = len(data), 0
        view = memoryview(data)
        try:
            while position < end:
                bounds = _frame_bounds(data, position, end)
                if bounds is None:  # not even the header yet
                    break
                payload_start, frame_end = bounds
                is_fast = self._takes_fast_path(data[position], data[position + 1], frame_end - payload_start)
                if is_fast and frame_end > end:  # wait for the rest of it
                    break
                message = self._fast_message(data[position], view, payload_start, frame_end) if is_fast else None
                if message is not None:
                    if not self._take_data_frame():
                        break
                    self._queue_for_app(message, frame_end - payload_start)
                    self.num_fast_frames += 1
                    position = frame_end
                elif frame_end > end:  # the parser takes it from here, a part now; back here between frames
                    self._parse(bytes(view[position:]))
                    position = end
                else:
                    self._parse(bytes(view[position:frame_end]))
                    position = frame_end
                    if self._has_ended():
                        break
        finally:
            view.release()
        if position >= end:
            if self._partial_frame:
                self._partial_frame = bytearray()
        elif data is self._partial_frame:
            del self._partial_frame[:position]
        else:
            self._partial_frame = bytearray(data[position:])

    def _takes_fast_path(self, first_byte: int, second_byte: int, payload_bytes: int) -> bool:
        """A whole text or binary frame (FIN, no reserved bits), masked, within the size limit, on an open
        connection with no extension and no fragmented message under way."""
        conn = self.conn
        return (first_byte in FAST_PATH_FIRST_BYTES and bool(second_byte & 0x80) and conn.state is WebSocketState.OPEN
                and conn.current_size is None and not conn.extensions and not self.close_sent
                and payload_bytes <= self._max_fast_payload)

    @staticmethod
    def _fast_message(first_byte: int, view: memoryview, payload_start: int,
                      frame_end: int) -> ASGIReceiveEvent | None:
        """The app's message for a whole fast-path frame in ``view``; None for text that is not UTF-8 (the
        parser's path closes with 1007, as for any text)."""
        payload = apply_mask(view[payload_start:frame_end], bytes(view[payload_start - 4:payload_start]))
        if first_byte == 0x82:
            return {"type": "websocket.receive", "bytes": payload}
        try:
            return {"type": "websocket.receive", "text": payload.decode()}
        except UnicodeDecodeError:
            return None

    def _parser_between_frames(self) -> bool:
        """Whether the websockets parser waits for a frame's first byte (not inside a frame's header or payload);
        remembered until ``_parse`` feeds it again, since frames of the fast path never reach it."""
        generator: Any = self.conn.parser  # a generator object: gi_yieldfrom and gi_code are CPython's
        while generator.gi_yieldfrom is not None:
            generator = generator.gi_yieldfrom
        self._parser_seen_between_frames = generator.gi_code is _BETWEEN_FRAMES_CODE
        return self._parser_seen_between_frames

    def _parse(self, data: bytes) -> None:
        """``data`` through the websockets parser, a slice at a time, the control-frame budget settled per slice."""
        self._parser_seen_between_frames = False
        for start in range(0, len(data), PARSE_SLICE_BYTES):
            super().data_received(data[start:start + PARSE_SLICE_BYTES])
            if not self._settle_control_frames() or self._has_ended():
                return
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # The handshake parser refused the request (a header line over 8 KiB, more than 128
            # headers): send its answer (431, 414) instead of leaving the client waiting.
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport_guard.closed("bad_handshake", self.client, str(self.conn.handshake_exc))
            self.transport.close()

    def handle_parser_exception(self) -> None:
        if self.conn.close_sent is not None:
            super().handle_parser_exception()
            return
        # The parser refused a frame before the handshake's answer (one a client sent with its request): websockets
        # fails such a connection without a close frame, and uvicorn's handler assumes one (an AssertionError, the
        # connection dropped unanswered). The app has not accepted yet (an accept on a closing transport is a no-op).
        detail = f"an invalid frame before the handshake's answer: {self.conn.parser_exc}"
        self.transport_guard.closed("bad_handshake", self.client, detail)
        self._fail(1002, detail)  # answered 400 in HTTP, the handshake not being answered yet

    def send_receive_event_to_app(self) -> None:
        was_paused, self.read_paused = self.read_paused, True  # keeps uvicorn from pausing for this message
        num_queued = self.queue.qsize()
        message_bytes = sum(map(len, self.frames))
        super().send_receive_event_to_app()
        self.read_paused = was_paused
        if self.queue.qsize() > num_queued:
            self._queued_bytes += message_bytes
        self._pause_for_backlog()

    def _queue_for_app(self, message: ASGIReceiveEvent, num_bytes: int) -> None:
        """A message from ``_split_frames``: to the app's direct handler when it may take it, else queued as uvicorn
        queues one, with the backlog's books."""
        if self._may_deliver_directly and self._direct_handler is not None and self.queue.empty():
            self._may_deliver_directly = False
            if self._deliver_directly(self._direct_handler, message):
                return
        self.queue.put_nowait(message)
        self._queued_bytes += num_bytes
        self._pause_for_backlog()

    def _deliver_directly(self, handler: DirectMessageHandler, message: ASGIReceiveEvent) -> bool:
        try:
            taken = handler(message)
        except Exception:
            self.logger.exception("Exception in ASGI application (a message taken from the transport)\n")
            self._direct_handler = None
            self._fail(1011, "internal error")
            return True
        self.num_direct_messages += taken
        return taken

    def _pause_for_backlog(self) -> None:
        if not self.read_paused and (self._queued_bytes >= PAUSE_READING_QUEUED_BYTES
                                     or self.queue.qsize() >= PAUSE_READING_QUEUED_MESSAGES):
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> ASGIReceiveEvent:
        if not self.queue.empty():
            # Messages a client already delivered are taken without a wait, so an app's receive loop would not
            # yield to other connections for a flood's whole backlog: one message per loop turn instead. Only
            # then: an app that finds the queue empty waits, and that wait was its turn.
            await asyncio.sleep(0)
        message = await super().receive()  # resumes reading once the queue is empty
        self._queued_bytes -= _payload_bytes(cast(Mapping[str, Any], message))
        return message

    # Data frames the websockets parser reads (fragments, and whole frames off the fast path) are spent here.
    def handle_text(self, event: Any) -> None:
        if self._take_data_frame():
            super().handle_text(event)

    def handle_bytes(self, event: Any) -> None:
        if self._take_data_frame():
            super().handle_bytes(event)

    def handle_cont(self, event: Any) -> None:
        if self._take_data_frame():
            super().handle_cont(event)

    def _refill_data_frames(self) -> None:
        """The data-frame budget's refill for the time since the last read (once per read, not per frame)."""
        now_s = time.monotonic()
        self._data_frame_tokens = min(self._data_frame_burst, self._data_frame_tokens
                                      + (now_s - self._data_frame_tokens_at_s) * self._data_frames_per_s)
        self._data_frame_tokens_at_s = now_s

    def _take_data_frame(self) -> bool:
        """One data frame from the budget (``data_frames_per_s``, ``data_frame_burst``); False when the connection
        was closed for a flood. A frame that never completes a message (empty continuations, one after another)
        reaches no session's budget, and one whose message is valid audio costs the session nothing either while
        the model keeps up; each still costs the event loop a parse. The bucket is refilled once per read
        (``data_received``), so a frame costs one subtraction."""
        self._data_frame_tokens -= 1.0
        if self._data_frame_tokens >= 0.0:
            return True
        if self._has_ended():  # cut already: what is left of the read goes nowhere
            return False
        if self.close_sent:  # it floods past our close frame (a refused client, say): no more of it is parsed
            self.transport_guard.closed("data_frame_flood", self.client, "too many WebSocket frames after the close")
            # Not aborted: that reset the connection, and the client lost the close frame it had not read yet.
            self._close_once_the_client_has_read_it()
        else:
            self._fail_policy("data_frame_flood", "too many WebSocket frames")
        return False

    def handle_ping(self) -> None:
        # websockets has queued the pong; it is written once per slice, after the budget check.
        self._num_control_frames += 1
        self._owes_pongs = True

    def handle_pong(self, event: Any) -> None:
        self._num_control_frames += 1
        super().handle_pong(event)

    def _settle_control_frames(self) -> bool:
        """Spend the slice's control frames from the budget; False when the connection was closed."""
        if self._num_control_frames:
            settings = self.transport_guard.settings
            now_s = time.monotonic()
            self._control_tokens = min(float(settings.control_frame_burst), self._control_tokens
                                       + (now_s - self._control_tokens_at_s) * settings.control_frames_per_s)
            self._control_tokens_at_s = now_s
            self._control_tokens -= self._num_control_frames
            self._num_control_frames = 0
            if self._control_tokens < 0:
                self._fail_policy("control_frame_flood", "too many ping/pong frames")
                return False
        if self._owes_pongs:
            self._owes_pongs = False
            pongs = self.conn.data_to_send()
            # After our close frame, pings go unanswered; and before the handshake's answer (pings sent with the
            # upgrade request) too: a pong written ahead of the 101 is where the client reads its answer.
            if not self.close_sent and self.handshake_complete:
                self.transport.write(b"".join(pongs))
                if self.transport.get_write_buffer_size() > self.transport_guard.settings.max_write_buffer_bytes:
                    self.transport_guard.closed("write_buffer_full", self.client, "the client does not read")
                    self.transport.abort()
                    return False
        return True

    def _fail_policy(self, reason: str, message: str) -> None:
        self.transport_guard.closed(reason, self.client, message)
        self.cut_reason = reason  # the app ends the session rather than keep it for a resume (DirectMessages)
        self._fail(1008, message)

    def _fail(self, code: int, message: str) -> None:
        """Close with ``code`` now, and tell the app (a disconnect with that code). Before the handshake's answer
        (frames sent with the upgrade request) there is no WebSocket to close: the answer is HTTP."""
        self.conn.data_to_send()  # pongs a flood asked for are not sent
        self.conn.fail(code, message)
        if self.handshake_complete or self.initial_response is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
        else:
            self.conn.data_to_send()  # the end of file websockets queued
            status = HTTPStatus.TOO_MANY_REQUESTS if code == 1008 else HTTPStatus.BAD_REQUEST
            self.transport.write(self.conn.reject(status, f"Failed to open a WebSocket connection: {message}.\n")
                                 .serialize())
        if not self.close_sent:
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": message})
        self._close_once_the_client_has_read_it()

    def _close_once_the_client_has_read_it(self) -> None:
        """Close after our last frame without resetting the connection: our end of file after it, then what the
        client still sends is read and dropped until its own end of file (asyncio then closes the socket), for at
        most ``close_timeout_s`` (``_end_linger``).

        Why: a socket closed with the client's data unread in its buffer makes the kernel reset the connection,
        and the client loses what it had not read yet, our close frame with it. A client flooding small frames
        saw 1006 (no close frame), which docs/protocol.md says to resume, instead of the 1008 that says why
        (first-hour review, round sixteen)."""
        if self._linger is not None or self.transport.is_closing():
            return
        # Closed at once as before where lingering would not help: before the handshake's answer (an HTTP refusal
        # the app's handshake still runs after), a client that does not read (writing paused: our close waits
        # behind what it left unread, and DeadlineOnClose drops it), a transport that cannot half-close.
        is_websocket = self.handshake_complete and self.initial_response is None
        if not is_websocket or not self.writable.is_set() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # sent once the close frame has been
        if self.read_paused:  # a backlog paused reading (_queue_for_app): the client's end of file must be seen
            self.read_paused = False
            self.transport.resume_reading()
        if self.close_timer is not None:  # uvicorn's wait for the client's close reply: this one replaces it
            self.close_timer.cancel()
        # As uvicorn's close_timer too, which keeps uvicorn from closing the socket when the app returns.
        self._linger = self.close_timer = asyncio.get_running_loop().call_later(self.close_timeout, self._end_linger)

    def _end_linger(self) -> None:
        if self.transport.get_write_buffer_size():  # our close frame is still unsent: the client does not read
            self._close_timed_out()
        else:  # sent: a client still sending now gets a reset, having had its time to read the close
            self.transport.close()

    def _has_ended(self) -> bool:
        """Closed, or closing: by us (lingering until the client has read our close) or by the transport."""
        return self._linger is not None or self.transport.is_closing()

    def _close_timed_out(self) -> None:
        self.transport_guard.closed("close_timeout", self.client, "the client did not take the close")
        self.transport.abort()
