"""Per-connection limits below the app: uvicorn's HTTP and WebSocket protocols, with bounds.

Why here and not in the app: what a hostile client uses never reaches a route. uvicorn's
WebSocket protocol answers pings itself (one pong per ping, written as it parses, however fast
they come), a half-sent request header is held in uvicorn's HTTP parser before any app code
runs, and a peer that stops reading blocks uvicorn's writes and ``transport.close()`` (asyncio
waits for the write buffer to drain first) where the app's timeouts cannot reach. So the limits
live in small subclasses of the two protocol classes ``python -m audio_interaction_server`` runs (h11 and the
websockets sans-I/O implementation), handed to ``uvicorn.Config`` as ``http=`` and ``ws=``:

* request line and headers within ``header_timeout_s``, ``max_header_bytes`` and ``max_headers`` (else 408/431),
  the body within ``body_timeout_s`` once the headers are in and ``max_request_body_bytes`` (else
  408/413: from the Content-Length before any body is read, or as a chunked body arrives; the
  route never runs for a body refused by its length),
  and at most ``max_pending_handshakes`` connections (per address: ``..._per_ip``) that have
  been sending their headers, or a body, for over ``SLOW_HEADERS_AFTER_S``. Past an address's share, a new
  connection of that address gets 429 at once, and one that turns slow is answered so and closed; past the
  total, the address holding the most slow connections loses its oldest (503), never a connection that has not
  been slow: a burst of fast clients never counts (their requests arrive in milliseconds), and a few dozen
  addresses holding their shares cannot keep everyone else out;
* WebSocket pings and pongs from a client within a token bucket (``control_frames_per_s``,
  ``control_frame_burst``); beyond, close 1008 without answering the flood; input is parsed in
  slices so a flood is cut off after a few kilobytes, not after a 256 KiB read;
* data frames (messages and their fragments) within another (``data_frames_per_s``, ``data_frame_burst``):
  beyond, close 1008; a message begun and continued by empty fragments forever reaches no session's budget;
* no pongs once the server has sent its close frame, and ``close_timeout_s`` (not uvicorn's 10 s)
  for the client to answer it; a closing transport still not gone after that is aborted;
* unsent bytes bounded (``max_write_buffer_bytes``) and a write stall (the transport paused
  because the peer does not read) limited to ``write_stall_timeout_s``: the connection is
  aborted, so its session ends and its slot is freed; on shutdown a stalled connection gets only
  ``close_timeout_s``, so one stuck reader cannot hold the drain;
* plain HTTP requests (not upgrades) per client address within a token bucket (``http_requests_per_s``,
  ``http_request_burst``; a trusted proxy's requests spend their clients' budgets, ``TransportGuard.wrap``): beyond,
  429 and the connection closed (a proxy's kept); a pipelined flood of
  ``/health`` kept the loop, and through the GIL the worker thread, busy;
* ``X-Forwarded-For`` believed only from ``trusted_proxies`` (uvicorn trusts 127.0.0.1 by default,
  which lets any local client, or a proxy that forwards the header unchecked, pick its address).

Every limit closes one connection and counts it in ``ais_transport_closes_total{reason}``; the
warnings go through ``BurstLimiter`` (log_bursts.py). Event loop only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import struct
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar, NamedTuple, cast

import h11
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask  # the parser's own unmasking: its C helper, or its pure-Python twin
from websockets.protocol import State as WebSocketState
from websockets.streams import StreamReader

from audio_interaction_server.api.addresses import AddressRateLimiter, client_key
from audio_interaction_server.api.log_bursts import SharedBurstLimiter
from audio_interaction_server.api.request_targets import has_two_body_lengths, is_absolute_form, to_origin_form
from audio_interaction_server.config import TransportSettings

log = logging.getLogger(__name__)

# Input is handed to the WebSocket parser this many bytes at a time, and the ping budget checked
# in between: a 256 KiB read of 6-byte pings is 43k frames and 0.35 s of CPU to parse; a slice
# is 700 frames at most.
PARSE_SLICE_BYTES = 4096
# A connection still without its request headers after this long counts against the handshake
# caps. Not from its first moment: 32 clients connecting at once from one host are all "pending"
# until the event loop reads them, and must not be refused for that.
SLOW_HEADERS_AFTER_S = 1.0
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


def direct_messages(websocket: Any) -> DirectMessages | None:
    """The extension of ``websocket``'s connection (an ASGI scope holder, such as starlette's WebSocket), or None
    where it runs under another server (or is a test's double without a scope)."""
    extension = getattr(websocket, "scope", {}).get("extensions", {}).get(DIRECT_MESSAGES_EXTENSION)
    return None if extension is None else DirectMessages(extension["take_with"], extension["send_text_now"],
                                                         extension["cut_reason"], extension["limit_data_frames"])
END_OF_HEAD = re.compile(rb"\n\r?\n")  # h11 accepts bare LF line ends too
CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([0-9]+)[ \t]*\r?\n", re.IGNORECASE)
TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding:", re.IGNORECASE)
# The headers of a handshake the websockets library reads element by element with its pure-Python tokenizer
# (``websockets.headers.parse_connection``, ``parse_upgrade``, ``parse_subprotocol``): their values' commas.
TOKENIZED_HEADERS = re.compile(rb"\n(?:connection|upgrade|sec-websocket-protocol):([^\n]*)", re.IGNORECASE)
TOKENIZED_HEADER_NAMES = frozenset((b"connection", b"upgrade", b"sec-websocket-protocol"))
# A declared length of more digits is over any limit (and Python would refuse to read one of over 4,300).
MAX_LENGTH_DIGITS = 18
# The loggers a flood of connections can make write: one line per burst, with a count. The session's too: a stalled
# engine leaves every closing session's close unconfirmed at once.
LOG_LIMITER = SharedBurstLimiter(("uvicorn.error", "asyncio", __name__, "audio_interaction_server.api.admission",
                                  "audio_interaction_server.api.session"), window_s=10.0)


# After a 413 the client is most likely still sending the body it was refused for. Closed at once, the socket is
# reset as those bytes arrive, and the client sees the reset, not the answer (20 of 20 times with a 10 MB body):
# the rest is read and dropped, the socket's write side shut, for up to LINGER_S or LINGER_MAX_BYTES.
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * 1024 * 1024
# The reason phrases of the answers the transport makes itself.
HTTP_PHRASES = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 429: "Too Many Requests",
                431: "Request Header Fields Too Large", 503: "Service Unavailable"}
# Set in a plain request's scope that ``TransportGuard.wrap`` answered 429 before the app.
REFUSED_BEFORE_THE_APP = "ais.refused_before_the_app"
# What a /metrics answer costs of its client's plain-request budget: it renders every counter, about 20 times the work
# of /health (5-6 ms of the event loop on the 2-core VM), and a scrape counted as one request let one address spend
# half the loop inside its budget. A Prometheus scrape every few seconds is still far inside it.
METRICS_REQUEST_COST = 20.0
# Set in a plain request's scope by a route whose work grows with what the client sent (a JSON body: pydantic's error
# per wrong item), as a count of requests: what the answer costs of its client's plain-request budget.
REQUEST_COST = "ais.request_cost"


class TransportGuard:
    """The limits and the state every connection of one server shares."""

    def __init__(self, settings: TransportSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self._trusted = [ipaddress.ip_network(proxy, strict=False) for proxy in settings.trusted_proxies]
        # Connections slow to send their headers or body (SLOW_HEADERS_AFTER_S), per client key, oldest first.
        self._slow_by_address: dict[str, dict[GuardedHttpProtocol, None]] = {}
        self.num_slow = 0
        self.open_connections: set[GuardedHttpProtocol | GuardedWebSocketProtocol] = set()
        self._http_requests = AddressRateLimiter(settings.http_requests_per_s, settings.http_request_burst)
        self.closes_total = Counter("ais_transport_closes", "connections closed by a transport limit "
                                    "(transport.py)", ["reason"], registry=registry)
        self.refusals_total = Counter("ais_transport_refusals", "plain requests answered 429 by a transport limit "
                                      "before the app (a trusted proxy's connection is kept) (transport.py)",
                                      ["reason"], registry=registry)
        self._flusher: asyncio.TimerHandle | None = None

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``uvicorn.Config``."""
        guard = self

        class HttpProtocol(GuardedHttpProtocol):
            transport_guard = guard

        class WebSocketProtocol(GuardedWebSocketProtocol):
            transport_guard = guard

        return dict(http=HttpProtocol, ws=WebSocketProtocol, proxy_headers=bool(self._trusted),
                    forwarded_allow_ips=list(self.settings.trusted_proxies),
                    h11_max_incomplete_event_size=self.settings.max_header_bytes)

    # ---- server life cycle

    def start(self) -> None:
        """At server start-up, on the event loop: limit the loggers hostile traffic can reach."""
        LOG_LIMITER.acquire()
        self._flush_log_counts()

    def _flush_log_counts(self) -> None:
        LOG_LIMITER.limiter.flush()
        self._flusher = asyncio.get_running_loop().call_later(LOG_LIMITER.limiter.window_s, self._flush_log_counts)

    def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        LOG_LIMITER.release()

    def begin_shutdown(self) -> None:
        """A connection the server cannot write to gets only ``close_timeout_s`` more."""
        for protocol in list(self.open_connections):
            protocol.write_watch.shorten(self.settings.close_timeout_s)

    # ---- what connections ask

    def is_trusted_proxy(self, host: str | None) -> bool:
        if host is None or not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def handshake_refusal(self, host: str) -> tuple[int, str] | None:
        """(HTTP status, reason) when a connection from ``host`` must be refused (its address holds its share of
        slow connections), else None. The total is never a reason to refuse one: ``count_slow`` sheds instead."""
        num_held = len(self._slow_by_address.get(client_key(host), ()))
        if num_held >= self.settings.max_pending_handshakes_per_ip and not self.is_trusted_proxy(host):
            return 429, "too_many_handshakes_from_ip"
        return None

    def takes_http_request(self, host: str, take: bool = True, cost: float = 1.0) -> bool:
        """Whether ``host`` may make a plain HTTP request now (``cost`` requests counted unless ``take`` is False);
        trusted proxies always may."""
        if self.is_trusted_proxy(host):
            return True
        return self._http_requests.retry_after_s(host, time.monotonic(), take, cost) is None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind what is settled before any route runs: a request target in absolute form is rewritten
        to its path, and one that is no URL refused (400, ``request_targets.py``); a request with two body lengths
        (400) or a declared body over ``max_request_body_bytes`` (413) is refused and its connection closed; and
        the per-client check of plain requests that came through a trusted proxy.

        A proxy's connection carries many clients' requests, so it is neither refused nor closed for one of them
        (``GuardedHttpProtocol``); each request it forwards spends the budget of the client it names
        (``X-Forwarded-For``: uvicorn has made it the scope's client by the time a request gets here), and a
        client past its budget gets 429 here, request by request. A direct client's requests were checked by
        its connection already; looking again costs a dictionary lookup."""
        guard = self

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] not in ("http", "websocket"):
                await app(scope, receive, send)
                return
            if is_absolute_form(scope) and not to_origin_form(scope):
                await refuse(scope, send, 400, "bad_target", "a request target that is no URL nor path")
                return
            if scope["type"] == "http" and has_two_body_lengths(scope):
                await refuse(scope, send, 400, "two_body_lengths",
                             "a request with both Content-Length and Transfer-Encoding")
                return
            # The length as h11 read it ("N, N" and a folded line made one number), for every request: the
            # connection's own check sees only a first request's head, and only a length written plainly.
            declared = dict(scope.get("headers", ())).get(b"content-length", b"") if scope["type"] == "http" else b""
            max_bytes = guard.settings.max_request_body_bytes
            if declared.isdigit() and declared_length(declared) > max_bytes:
                await refuse(scope, send, 413, "body_too_large", f"request body over {max_bytes} bytes")
                return
            client = scope.get("client")
            if (num_elements := request_elements(scope)) > guard.settings.max_headers:
                # A pipelined request's head (h11 parsed it, unseen by the connection's own check): refused all the
                # same, its parsing paid for.
                if client is not None:
                    guard.too_many_headers(client[0], num_elements)
                await refuse(scope, send, 431, "too_many_headers", guard.too_many_headers_detail())
                return
            if client is not None and not guard.takes_http_request(client[0], take=False):
                guard.refused_request(client[0])
                if scope["type"] == "websocket":
                    # An upgrade of a client past its budget (spent by its requests and refused upgrades): refused
                    # as its direct connection would have been (``GuardedHttpProtocol.connection_made``); one that
                    # came through a trusted proxy was let through, so its refused upgrades went on at full cost.
                    await refuse(scope, send, 429, "http_request_flood", guard.http_flood_detail())
                    return
                scope[REFUSED_BEFORE_THE_APP] = True  # its connection knows it was answered (on_response_complete)
                body = f"Too Many Requests: {guard.http_flood_detail()}\n".encode()
                await send({"type": "http.response.start", "status": 429,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)

        async def refuse(scope: Scope, send: Send, status: int, reason: str, detail: str) -> None:
            """Answer ``status`` without the app and close the connection (an HTTP request's, or a WebSocket's
            handshake: by the denial-response extension where the server has it, else a plain refusal)."""
            guard.closed(reason, scope.get("client"), detail)
            body = f"{HTTP_PHRASES[status]}: {detail}\n".encode()
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif "websocket.http.response" in scope.get("extensions", {}):
                await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1008})

        return guarded

    def too_many_headers(self, host: str, num_elements: int) -> None:
        """A request of ``num_elements`` header elements (``header_elements``), over ``max_headers``, refused: it
        spends ``host``'s plain-request budget by their number. Why: h11 parses a header line in ~3 us, a hundredth
        of what a plain request costs the loop, and the budget counted requests alone; a /health request of 1,900
        tiny headers (16 KB) took 6.5 ms against 0.33, and one address's budget of them (500 at once, 100 a second)
        held a real-time neighbour's decisions at p95 0.9 s (hostile probe, round twelve). The same for the elements
        of a handshake's Sec-WebSocket-Protocol (7,800 of them in two lines took 13.5 ms of a refused upgrade) and
        the parameters of a query (3,900 took a /v1/info request 10 ms: Starlette parses them, the log's redaction
        looks at each)."""
        self.takes_http_request(host, cost=max(1.0, num_elements / self.settings.max_headers))

    def too_many_headers_detail(self) -> str:
        return (f"more than {self.settings.max_headers} header lines, query parameters and elements of Connection, "
                "Upgrade and Sec-WebSocket-Protocol")

    def http_flood_detail(self) -> str:
        return (f"more than {self.settings.http_request_burst} HTTP requests at once or "
                f"{self.settings.http_requests_per_s:g} a second from this address")

    def refused_request(self, client: str) -> None:
        self.refusals_total.labels("http_request_flood").inc()
        log.warning("refused a request (http_request_flood) of %s: %s", client, self.http_flood_detail())

    def count_slow(self, connection: GuardedHttpProtocol, host: str) -> None:
        """``connection`` (of ``host``) has turned slow. Past the total, the address holding the most slow
        connections loses its oldest: refusing new connections instead let 32 addresses, each within its share,
        keep every other client out (hostile probe, round five)."""
        if self.num_slow >= self.settings.max_pending_handshakes:
            # A trusted proxy carries many clients and has no share of its own: it loses one only when nobody
            # else holds any, or clients reaching the port directly would have the proxy's clients shed.
            holders = [held for key, held in self._slow_by_address.items() if not self.is_trusted_proxy(key)]
            holder = max(holders or self._slow_by_address.values(), key=len)
            next(iter(holder)).shed()  # leaves the count through uncount_slow
        self._slow_by_address.setdefault(client_key(host), {})[connection] = None  # an IPv6 client: its /64
        self.num_slow += 1

    def uncount_slow(self, connection: GuardedHttpProtocol, host: str) -> None:
        key = client_key(host)
        held = self._slow_by_address.get(key)
        if held is not None and connection in held:
            del held[connection]
            self.num_slow -= 1
            if not held:
                del self._slow_by_address[key]

    def closed(self, reason: str, peer: tuple[str, int] | None, detail: str) -> None:
        self.closes_total.labels(reason).inc()
        # The reason is part of the template: one burst (and one count) per reason.
        log.warning(f"closed a connection ({reason}) from %s: %s", peer[0] if peer else "?", detail)


class WriteWatch:
    """Aborts a transport that stays unable to write (its peer not reading) for too long.

    asyncio pauses a transport's protocol when its write buffer passes the high-water mark and
    resumes it when the buffer drains; a deadline between the two is the write-stall timeout.
    """

    def __init__(self, guard: TransportGuard, on_stall: Any) -> None:
        self.timeout_s = guard.settings.write_stall_timeout_s
        self.on_stall = on_stall
        self.is_paused = False
        self._deadline: asyncio.TimerHandle | None = None

    def paused(self) -> None:
        self.is_paused = True
        self._arm(self.timeout_s)

    def resumed(self) -> None:
        self.is_paused = False
        self.cancel()

    def shorten(self, timeout_s: float) -> None:
        if self.is_paused and self._deadline is not None and self._deadline.when() - _loop_time() > timeout_s:
            self._arm(timeout_s)

    def cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _arm(self, timeout_s: float) -> None:
        self.cancel()
        self._deadline = asyncio.get_running_loop().call_later(timeout_s, self.on_stall)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class _WatchedWrites:
    """Write-stall handling shared by both protocols: asyncio's flow control drives a ``WriteWatch``.

    Mixed in before uvicorn's protocol class, so ``super()`` reaches uvicorn's own flow control.
    A subclass sets ``write_watch`` when its connection starts.
    """

    transport_guard: ClassVar[TransportGuard]
    write_watch: WriteWatch
    transport: Any
    client: tuple[str, int] | None

    def shutdown(self) -> None:
        self.write_watch.shorten(self.transport_guard.settings.close_timeout_s)
        super().shutdown()  # type: ignore[misc]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self.write_watch.paused()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self.write_watch.resumed()

    def _write_stalled(self) -> None:
        self.transport_guard.closed("write_stall", self.client, "the client stopped reading")
        self.transport.abort()


def head_elements(head: bytes) -> int:
    """What parsing a request head costs, in header lines: one a line, one more for each comma of a header the
    websockets library tokenizes element by element (``TOKENIZED_HEADERS``), and one for each "&" of the request
    target (Starlette parses a query parameter by parameter, and the log's redaction looks at each). ``head``: the
    request line, the headers and the empty line that ends them."""
    num_lines = head.count(b"\n") - 2  # the request line and the empty line
    num_parameters = head.count(b"&", 0, head.find(b"\n"))
    return num_lines + num_parameters + sum(value.count(b",") for value in TOKENIZED_HEADERS.findall(head))


def request_elements(scope: Scope) -> int:
    """``head_elements`` of a request as h11 parsed it (its scope: headers with lowercase names, folded lines; the
    query string apart)."""
    headers = scope.get("headers", ())
    return len(headers) + scope.get("query_string", b"").count(b"&") + sum(
        value.count(b",") for name, value in headers if name in TOKENIZED_HEADER_NAMES)


def declared_length(digits: bytes) -> int:
    """A Content-Length's value; one of more than ``MAX_LENGTH_DIGITS`` digits (leading zeros too) as the largest
    such number, over every limit."""
    return int(digits) if len(digits) <= MAX_LENGTH_DIGITS else 10 ** MAX_LENGTH_DIGITS


class GuardedHttpProtocol(_WatchedWrites, H11Protocol):
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
                num_elements = head_elements(head)
                if num_elements > self.transport_guard.settings.max_headers:
                    self.transport_guard.too_many_headers(self._host, num_elements)
                    self._answer_and_close(431, "too_many_headers", self.transport_guard.too_many_headers_detail())
                    return
                declared = CONTENT_LENGTH.search(head)
                declared_bytes = None if declared is None else declared_length(declared.group(1))
                # What came with the head is its body as far as it has one: what follows a request without a
                # length or chunks, or after its declared length, is the next request (pipelined) or, after an
                # upgrade, WebSocket frames. (Both a length and chunks: refused before the app, ``wrap``.)
                after_head = len(window) - end.end()
                if TRANSFER_ENCODING.search(head) is not None:
                    self._body_bytes = after_head
                else:
                    self._body_bytes = min(after_head, declared_bytes or 0)
                if self._body_over_limit(declared_bytes):
                    return
        elif self._body_timer is not None:
            self._body_bytes += len(data)  # chunk framing included: the limit is on what the client sends
            if self._body_over_limit():
                return
        super().data_received(data)
        self._watch_body()

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
        elif not guard.takes_http_request(self._host, cost=cost):
            self._answer_and_close(429, "http_request_flood", guard.http_flood_detail())
            return
        super().on_response_complete()
        # A kept-alive connection's next request gets the same deadline (uvicorn's keep-alive
        # timer stops at its first byte); not when it is already in (pipelined).
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self._head_timer is None:
            self._await_head()
        elif self.conn.their_state is h11.SEND_BODY:
            # A pipelined request whose head came with the one answered: uvicorn has just begun it, and its body
            # gets the first request's deadline and is counted while it trickles. Its declared length is checked
            # where every request's is, before the app (``wrap``): checked here as well, it was refused twice.
            self._body_bytes = 0
            self._watch_body()

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

class _DeadlineOnClose:
    """The connection's transport, with a deadline on ``close()``.

    asyncio's ``close()`` waits for the write buffer to drain, forever if the peer never reads;
    this one aborts after ``close_timeout_s``, so a closed connection always releases its socket.
    """

    def __init__(self, transport: asyncio.Transport, timeout_s: float, on_timeout: Any) -> None:
        self._transport = transport
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self.deadline: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.deadline is None and not self._transport.is_closing():
            self.deadline = asyncio.get_running_loop().call_later(self._timeout_s, self._on_timeout)
        self._transport.close()

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


class GuardedWebSocketProtocol(_WatchedWrites, WebSocketsSansIOProtocol):
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
        # The websockets parser's own limit on one frame (a fragment or a whole message, whichever is lower).
        limits = [limit for limit in (self.conn.max_message_size, self.conn.max_fragment_size) if limit is not None]
        self._max_fast_payload = min(limits, default=2**63)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = _DeadlineOnClose(self.transport, self.close_timeout, self._close_timed_out)  # type: ignore
        self.transport_guard.open_connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport_guard.open_connections.discard(self)
        self.write_watch.cancel()
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
                                                                   "limit_data_frames": self.limit_data_frames}

    def handle_handshake_exception(self) -> None:
        # A handshake websockets could not parse (a header h11 let through, a Transfer-Encoding): refused with 400
        # by uvicorn before any app, a refusal all the same, and as cheap to repeat as one.
        super().handle_handshake_exception()
        self._count_refusal()

    async def send(self, message: Any) -> None:
        if not self.handshake_complete and self.initial_response is None and \
                message["type"] in ("websocket.close", "websocket.http.response.start"):
            self._count_refusal()  # the app refuses the handshake (429, 404, 401, 503, ...)
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

    def data_received(self, data: bytes) -> None:
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
                    if self.transport.is_closing():
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
            if not self._settle_control_frames() or self.transport.is_closing():
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
        if self.transport.is_closing():  # cut already: what is left of the read goes nowhere
            return False
        if self.close_sent:  # it floods past our close frame (a refused client, say): no more of it is parsed
            self.transport_guard.closed("data_frame_flood", self.client, "too many WebSocket frames after the close")
            self.transport.abort()
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
        self.transport.close()

    def _close_timed_out(self) -> None:
        self.transport_guard.closed("close_timeout", self.client, "the client did not take the close")
        self.transport.abort()
