"""What every connection of one server shares below the app (``TransportGuard``): the plain-request budget per
client address, the count of connections slow to send their requests, the limits' metrics and log throttle, the
checks made before any route runs (``wrap``), and the write-stall watch both protocols use (``WatchedWrites``).
transport.py says what each limit is for; http_guard.py and websocket_guard.py hold the two protocols. Event loop
only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any, ClassVar, Protocol

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from audio_interaction_server.api.addresses import AddressRateLimiter, client_key
from audio_interaction_server.api.request_heads import (
    HTTP_PHRASES, REFUSED_BEFORE_THE_APP, declared_length, request_elements,
)
from audio_interaction_server.api.log_bursts import SharedBurstLimiter
from audio_interaction_server.api.request_targets import has_two_body_lengths, is_absolute_form, to_origin_form
from audio_interaction_server.config import TransportSettings

log = logging.getLogger(__name__)
# The loggers a flood of connections can make write: one line per burst, with a count. The session's too: a stalled
# engine leaves every closing session's close unconfirmed at once.
LOG_LIMITER = SharedBurstLimiter(("uvicorn.error", "asyncio", __name__, "audio_interaction_server.api.admission",
                                  "audio_interaction_server.api.session"), window_s=10.0)





class SlowConnection(Protocol):
    """A connection still sending its request (``GuardedHttpProtocol``) that the guard may close to make room."""

    def shed(self) -> None: ...


class TransportGuard:
    """The limits and the state every connection of one server shares."""

    def __init__(self, settings: TransportSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self._trusted = [ipaddress.ip_network(proxy, strict=False) for proxy in settings.trusted_proxies]
        # Connections slow to send their headers or body (SLOW_HEADERS_AFTER_S), per client key, oldest first.
        self._slow_by_address: dict[str, dict[SlowConnection, None]] = {}
        self.num_slow = 0
        self.open_connections: set[WatchedWrites] = set()  # either protocol (http_guard.py, websocket_guard.py)
        self._http_requests = AddressRateLimiter(settings.http_requests_per_s, settings.http_request_burst)
        self.closes_total = Counter("ais_transport_closes", "connections closed by a transport limit "
                                    "(transport.py)", ["reason"], registry=registry)
        self.refusals_total = Counter("ais_transport_refusals", "plain requests answered 429 by a transport limit "
                                      "before the app (a trusted proxy's connection is kept) (transport.py)",
                                      ["reason"], registry=registry)
        self._flusher: asyncio.TimerHandle | None = None

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
                # A head the connection's own check did not read (it reads a first head and each pipelined one raw,
                # ``GuardedHttpProtocol``): refused all the same, its parsing paid for.
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

    def count_slow(self, connection: SlowConnection, host: str) -> None:
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

    def uncount_slow(self, connection: SlowConnection, host: str) -> None:
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


class WatchedWrites:
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
