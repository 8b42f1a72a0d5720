"""Per-connection limits below the app: uvicorn's HTTP and WebSocket protocols, with bounds.

Why here and not in the app: what a hostile client uses never reaches a route. uvicorn's
WebSocket protocol answers pings itself (one pong per ping, written as it parses, however fast
they come), a half-sent request header is held in uvicorn's HTTP parser before any app code
runs, and a peer that stops reading blocks uvicorn's writes and ``transport.close()`` (asyncio
waits for the write buffer to drain first) where the app's timeouts cannot reach. So the limits
live in small subclasses of the two protocol classes ``python -m audio_interaction_server`` runs (h11 and the
websockets sans-I/O implementation: ``http_guard.py``, ``websocket_guard.py``; the write-stall watch both use,
``WriteWatch``, is in ``transport_guard.py``), handed to ``uvicorn.Config`` as ``http=`` and ``ws=`` by
``uvicorn_options`` here, bound to the ``TransportGuard`` (transport_guard.py) that holds what every connection of
one server shares (the budgets per address, the counts, the metrics):

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

from typing import Any

from audio_interaction_server.api.http_guard import GuardedHttpProtocol
from audio_interaction_server.api.transport_guard import TransportGuard
from audio_interaction_server.api.websocket_guard import GuardedWebSocketProtocol


def uvicorn_options(guard: TransportGuard) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``: the two guarded protocols, bound to ``guard``."""

    class HttpProtocol(GuardedHttpProtocol):
        transport_guard = guard

    class WebSocketProtocol(GuardedWebSocketProtocol):
        transport_guard = guard

    return dict(http=HttpProtocol, ws=WebSocketProtocol, proxy_headers=bool(guard.settings.trusted_proxies),
                forwarded_allow_ips=list(guard.settings.trusted_proxies),
                h11_max_incomplete_event_size=guard.settings.max_header_bytes)
