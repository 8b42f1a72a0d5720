"""The HTTP side of the transport's limits: uvicorn's h11 protocol with deadlines and caps on what a client sends
before any route runs (``GuardedHttpProtocol``; transport.py says what each limit is for). Event loop only.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from audio_interaction_server.api.request_heads import (
    CONTENT_LENGTH, END_OF_HEAD, HTTP_PHRASES, METRICS_REQUEST_COST, REFUSED_BEFORE_THE_APP, REQUEST_COST,
    TRANSFER_ENCODING, declared_length, head_elements,
)
from audio_interaction_server.api.transport_guard import TransportGuard, WatchedWrites, WriteWatch

# A connection still without its request headers after this long counts against the handshake
# caps. Not from its first moment: 32 clients connecting at once from one host are all "pending"
# until the event loop reads them, and must not be refused for that.
SLOW_HEADERS_AFTER_S = 1.0
# After a 413 the client is most likely still sending the body it was refused for. Closed at once, the socket is
# reset as those bytes arrive, and the client sees the reset, not the answer (20 of 20 times with a 10 MB body):
# the rest is read and dropped, the socket's write side shut, for up to LINGER_S or LINGER_MAX_BYTES.
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * 1024 * 1024


class GuardedHttpProtocol(WatchedWrites, H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a header size cap and a handshake count."""

    transport_guard: ClassVar[TransportGuard]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.transport_guard
        self.write_watch = WriteWatch(guard, self._write_stalled)
        guard.open_connections.add(self)
        self._head_timer: asyncio.TimerHandle | None = None
        self._slow_timer: asyncio.TimerHandle | None = None
        self._is_counted_slow = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._chunked_lines: int | None = None  # line ends of a chunked body so far (None: no chunked body)
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingered_bytes = 0
        self._host = self.client[0] if self.client else "unknown"
        refusal = guard.handshake_refusal(self._host)
        if refusal is not None:
            status, reason = refusal
            self._answer_and_close(status, reason, "too many connections of this address slow to send their "
                                   "requests")
            return
        if not guard.takes_http_request(self._host, take=False):  # spent by plain requests: not a new connection
            self._answer_and_close(429, "http_request_flood", guard.http_flood_detail())
            return
        self._await_head()

    def _watch_slowness(self, timeout_s: float) -> None:
        """Count the connection as slow if what it is sending (headers, a body) is not in within a second."""
        if self._slow_timer is None and not self._is_counted_slow:
            self._slow_timer = self.loop.call_later(min(SLOW_HEADERS_AFTER_S, timeout_s), self._became_slow)

    def _no_longer_slow(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
            self._slow_timer = None
        if self._is_counted_slow:
            self._is_counted_slow = False
            self.transport_guard.uncount_slow(self, self._host)

    def _became_slow(self) -> None:
        self._slow_timer = None
        # Checked again now: a burst of connections opened within the last second was admitted
        # (none was slow yet); those beyond the address's share go now rather than at the timeout.
        refusal = self.transport_guard.handshake_refusal(self._host)
        if refusal is not None:
            status, reason = refusal
            self._cut(status, reason, "too many connections of this address slow to send their requests")
            return
        self._is_counted_slow = True
        self.transport_guard.count_slow(self, self._host)

    def shed(self) -> None:
        """Closed to make room: the server holds ``max_pending_handshakes`` slow connections, and this one is the
        oldest of the address holding the most."""
        self._cut(503, "too_many_handshakes", "too many connections slow to send their requests; this one was the "
                  "oldest of the address holding the most")

    def _cut(self, status: int, reason: str, detail: str) -> None:
        """Answer a connection still sending its request (headers or body) and close it."""
        self._head_received()
        self._stop_body_timer()
        self._answer_or_close(status, reason, detail)

    def _await_head(self) -> None:
        """The deadline for a request's head, the first or a kept-alive connection's next: either may trickle."""
        self._watch_slowness(self.transport_guard.settings.header_timeout_s)
        self._head_bytes = 0
        self._head_parts: list[bytes] = []  # the head so far (at most max_header_bytes), for its Content-Length
        self._head_tail = b""  # the last bytes seen, for an end of head split across reads
        self._chunked_lines = None
        self._head_timer = self.loop.call_later(self.transport_guard.settings.header_timeout_s, self._head_timed_out)

    def _head_received(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._no_longer_slow()

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:  # the rest of a refused body: dropped
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self.transport.close()
            return
        if self._head_timer is not None:
            window = self._head_tail + data
            end = END_OF_HEAD.search(window)
            head_bytes = self._head_bytes + (len(data) if end is None else end.end() - len(self._head_tail))
            max_bytes = self.transport_guard.settings.max_header_bytes
            if head_bytes > max_bytes:
                self._head_received()
                self._answer_and_close(431, "header_too_large", f"request line and headers over {max_bytes} bytes")
                return
            if end is None:
                self._head_bytes, self._head_tail = head_bytes, window[-3:]
                self._head_parts.append(data)
            else:
                self._head_received()
                head = b"".join(self._head_parts) + data[:max(0, end.end() - len(self._head_tail))]
                if self._refuses_heavy_head(head):
                    return
                declared = CONTENT_LENGTH.search(head)
                declared_bytes = None if declared is None else declared_length(declared.group(1))
                # What came with the head is its body as far as it has one: what follows a request without a
                # length or chunks, or after its declared length, is the next request (pipelined) or, after an
                # upgrade, WebSocket frames. (Both a length and chunks: refused before the app, ``wrap``.)
                after_head = len(window) - end.end()
                if TRANSFER_ENCODING.search(head) is not None:
                    self._body_bytes = after_head
                    self._chunked_lines = 0
                    if after_head and self._too_many_chunks(data[len(data) - after_head:]):
                        return
                else:
                    self._body_bytes = min(after_head, declared_bytes or 0)
                if self._body_over_limit(declared_bytes):
                    return
        elif self._body_timer is not None:
            self._body_bytes += len(data)  # chunk framing included: the limit is on what the client sends
            if self._body_over_limit() or (self._chunked_lines is not None and self._too_many_chunks(data)):
                return
        super().data_received(data)
        self._watch_body()

    def _refuses_heavy_head(self, head: bytes) -> bool:
        """Answers 431 and closes when ``head`` (as it came, before h11 parses it) costs more than ``max_headers``
        lines (``head_elements``); they are spent from the address's plain-request budget."""
        num_elements = head_elements(head)
        if num_elements <= self.transport_guard.settings.max_headers:
            return False
        self.transport_guard.too_many_headers(self._host, num_elements)
        self._answer_and_close(431, "too_many_headers", self.transport_guard.too_many_headers_detail())
        return True

    def _too_many_chunks(self, data: bytes, answer_now: bool = False) -> bool:
        """Answers 400 and closes when a chunked body's line ends (``data`` the next of its bytes) are more than
        ``max_headers``; they are spent from the address's plain-request budget as a head's lines are.

        Why: h11 reads a chunked body chunk by chunk, and its trailer fields line by line, in Python, and uvicorn
        handles each chunk as an event: a /health with a body of 10,000 one-byte chunks (60 KB, within
        ``max_request_body_bytes``) took 57 ms of the loop against 1.1, counted as one request, and one address
        sending 16 of them a second (its budget is 100) held a real-time neighbour's decisions at p50 / p95
        256 / 437 ms; 1,900 trailer lines cost as much as 1,900 header lines (hostile probe, round thirteen).
        Every line end counts (a chunk has two, a trailer field one, and a line end in the data one): the bodies
        these routes take are a few hundred bytes of JSON, which clients send with a Content-Length."""
        assert self._chunked_lines is not None
        self._chunked_lines += data.count(b"\n")
        if self._chunked_lines <= self.transport_guard.settings.max_headers:
            return False
        self.transport_guard.too_many_headers(self._host, self._chunked_lines)
        detail = (f"a chunked request body of more than {self.transport_guard.settings.max_headers} lines (chunks, "
                  "trailer fields): send a Content-Length")
        # The client may still be sending the body: what it sends is read and dropped for a while, as after a 413.
        if answer_now:  # a pipelined request's, before h11 reads it: the one before it is answered
            self._answer_and_close(400, "too_many_chunks", detail, linger=True)
        else:
            self._stop_body_timer()
            self._answer_or_close(400, "too_many_chunks", detail, linger=True)
        return True

    def _body_over_limit(self, declared_bytes: int | None = None) -> bool:
        """Answers 413 and closes when the body (as its Content-Length declares it, or as received) is over the
        limit."""
        max_bytes = self.transport_guard.settings.max_request_body_bytes
        if self._body_bytes <= max_bytes and (declared_bytes is None or declared_bytes <= max_bytes):
            return False
        self._stop_body_timer()
        # A request of its address's budget, as a served one is: a churn of refused bodies, each read and dropped
        # for a while (``LINGER_S``), is then refused with 429 at its connections' start.
        self.transport_guard.takes_http_request(self._host)
        self._answer_or_close(413, "body_too_large", f"request body over {max_bytes} bytes", linger=True)
        return True

    def _watch_body(self) -> None:
        """A deadline for the body while h11 waits for one; none once it is in, nor after a WebSocket upgrade (h11
        never reads that request's end, and a 408 written then would land inside the WebSocket stream)."""
        is_upgraded = self.transport.get_protocol() is not self
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing() and not is_upgraded:
            if self._body_timer is None:
                timeout_s = self.transport_guard.settings.body_timeout_s
                self._body_timer = self.loop.call_later(timeout_s, self._body_timed_out)
                # A trickled body holds a descriptor as a trickled head does: counted with them.
                self._watch_slowness(timeout_s)
        else:
            self._stop_body_timer()

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
            self._no_longer_slow()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        self._no_longer_slow()
        self._answer_or_close(408, "body_timeout",
                              f"no complete request body in {self.transport_guard.settings.body_timeout_s} s")

    def _answer_or_close(self, status: int, reason: str, detail: str, linger: bool = False) -> None:
        """The error answer, unless the route has begun its own (then the connection is only closed)."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._answer_and_close(status, reason, detail, linger)
        else:
            self.transport_guard.closed(reason, self.client, detail)
            self.transport.close()

    def on_response_complete(self) -> None:
        # A plain request is counted as its answer completes (an upgrade never gets here): a keep-alive or
        # pipelined connection past its address's budget is answered 429 and closed, not served its next one.
        # A trusted proxy's request is its client's: counted against it, refused by ``TransportGuard.wrap``.
        guard = self.transport_guard
        cost = cast(float, self.scope.get(REQUEST_COST) or (METRICS_REQUEST_COST if self.scope.get("path") == "/metrics"
                                                             else 1.0))
        if guard.is_trusted_proxy(self._host):
            client = self.scope.get("client")
            if client is not None:
                guard.takes_http_request(client[0], cost=cost)
        elif self.scope.get(REFUSED_BEFORE_THE_APP):  # answered 429 already (a connection in debt): closed, no more
            guard.closed("http_request_flood", self.client, guard.http_flood_detail())
            self.transport.close()
            return
        elif not guard.takes_http_request(self._host, cost=cost) and not self.transport.is_closing():
            # (An answer that closed its connection, a refusal before the app with "Connection: close", is the
            # last: a 429 written after it reached the client as a second, unasked-for response.)
            self._answer_and_close(429, "http_request_flood", guard.http_flood_detail())
            return
        pipelined = None if self.transport.is_closing() else self._pipelined_head()  # (closed: nothing follows)
        if pipelined is not None and self._refuses_heavy_head(pipelined):
            return
        self._chunked_lines = None
        if pipelined is not None and TRANSFER_ENCODING.search(pipelined) is not None:
            # Its chunked body, as far as it came with it (the rest is counted as it comes, ``data_received``).
            self._chunked_lines = 0
            if self._too_many_chunks(self.conn.trailing_data[0][len(pipelined):], answer_now=True):
                return
        super().on_response_complete()
        # A kept-alive connection's next request gets the same deadline (uvicorn's keep-alive
        # timer stops at its first byte); not when it is already in (pipelined).
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._await_head()
            if pipelined:  # the start of the next head came pipelined: what follows is counted with it
                self._head_bytes, self._head_tail, self._head_parts = len(pipelined), pipelined[-3:], [pipelined]
        elif self.conn.their_state is h11.SEND_BODY:
            # A pipelined request whose head came with the one answered: uvicorn has just begun it, and its body
            # gets the first request's deadline and is counted while it trickles. Its declared length is checked
            # where every request's is, before the app (``wrap``): checked here as well, it was refused twice.
            self._body_bytes = 0
            self._watch_body()

    def _pipelined_head(self) -> bytes | None:
        """The next request's head (or as much of it as came), when it came pipelined behind the one just answered:
        h11 holds it unparsed, and parses it as the next cycle starts. Read raw here, as ``data_received`` reads a
        first head: h11 makes a folded header line (obs-fold, RFC 9112 5.2) part of the line above, so the parsed
        request (``TransportGuard.wrap``) no longer shows how many lines it had; 3,900 folded lines cost a
        pipelined /health ~5 ms of the loop, counted as one request (hostile probe, round thirteen)."""
        if self.conn.their_state is not h11.DONE:
            return None
        pending, _ = self.conn.trailing_data
        if not pending:
            return None
        max_bytes = self.transport_guard.settings.max_header_bytes  # (h11 refuses a longer head itself)
        end = END_OF_HEAD.search(pending, 0, max_bytes + 2)
        return pending[:max_bytes] if end is None else pending[:end.end()]

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        self._head_received()
        self._answer_and_close(408, "header_timeout",
                               f"no complete request headers in {self.transport_guard.settings.header_timeout_s} s")

    def _answer_and_close(self, status: int, reason: str, detail: str, linger: bool = False) -> None:
        """Answer and close; with ``linger``, what the client still sends is read and dropped first (LINGER_S)."""
        self.transport_guard.closed(reason, self.client, detail)
        phrase = HTTP_PHRASES[status]
        body = f"{phrase}: {detail}\n".encode()
        retry = b"Retry-After: 1\r\n" if status in (429, 503) else b""
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n%s\r\n%s" % (status, phrase.encode(), len(body), retry, body))
        if not linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the answer is whole: the client reads it, then the end
        self.transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_received()
        self._stop_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self.write_watch.cancel()
        self.transport_guard.open_connections.discard(self)
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._head_received()
        self.write_watch.cancel()  # the WebSocket protocol watches from here on
        self.transport_guard.open_connections.discard(self)
        super().handle_websocket_upgrade(event)
        # uvicorn hands the WebSocket protocol the request rebuilt from its head, not what was read after it: a
        # client's first frames that came in the same read (RFC 6455 has a client wait for the 101; not every
        # client does) were dropped, or, cut by the read's end, left the parser reading a frame's middle as a header.
        frames, _ = self.conn.trailing_data
        if frames and not self.transport.is_closing():
            self.transport.get_protocol().data_received(bytes(frames))
