"""A client's address, and what one client's per-address limits count under.

Every per-address limit (connection attempts, pending handshakes, detached sessions, a flood cut's cooldown, the
engine's prefill budget) counts a client by its address. An IPv4 client has one. An IPv6 client has a whole
network: an ISP gives each customer at least a /64 (RFC 6177), and any host on it may take a new address per
connection (RFC 8981's temporary addresses do it on their own). Counted per IPv6 address, one client would meet no
limit at all; counted per /64, it meets them as an IPv4 client behind one address does.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from audio_interaction_server.recent import RecentTable

IPV6_CLIENT_PREFIX_BITS = 64  # the smallest network an ISP gives one customer


def peer_address(connection: Any) -> str | None:
    """The address of a request's or WebSocket's client (Starlette's ``connection.client``), as the transport gives
    it: a trusted proxy's client, read from its ``X-Forwarded-For``. None when the server has none (a test client)."""
    return connection.client.host if connection.client is not None else None


@functools.lru_cache(maxsize=4096)  # the same few addresses connect again and again: parse each once
def client_key(address: str) -> str:
    """``address`` itself for IPv4; the /64 network for IPv6 (``2001:db8:1:2::/64``); an IPv4-mapped IPv6 address
    (an IPv4 client on a dual-stack socket) as IPv4; loopback ``::1`` as itself. Anything that is no IP address
    (a Unix socket's peer, ``unknown``) is returned as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ip.is_loopback:
            return str(ip)
        return str(ipaddress.IPv6Network((int(ip), IPV6_CLIENT_PREFIX_BITS), strict=False))  # int(): no zone
    return str(ip)


class AddressRateLimiter:
    """Attempts per client IP (WebSocket connections, plain HTTP requests, agent probes): a token bucket of
    ``burst`` attempts refilled at ``rate_per_s``.

    Sessions are long and reconnects rare, so a client that opens connections in a tight
    loop (a reconnect bug, a flood) is refused before the handshake, at the cost of a dict
    lookup. Memory is bounded: at most ``max_tracked`` addresses are remembered, least
    recently seen forgotten first (forgetting an address only gives it a full bucket again).
    Event loop only.
    """

    def __init__(self, rate_per_s: float, burst: int, max_tracked: int = 65_536) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: RecentTable[tuple[float, float]] = RecentTable(max_tracked)  # client key -> (tokens, at time)

    def retry_after_s(self, address: str, now_s: float, take: bool = True, cost: float = 1.0) -> float | None:
        """None (and ``cost`` attempts counted, unless ``take`` is False) when ``address`` may make one now; else
        seconds until it may. An attempt is allowed while a whole one is left, and one that costs more leaves the
        bucket in debt, paid back before the next (what a request cost is known once it is answered). An IPv6
        address counts with its /64 (``client_key``)."""
        key = client_key(address)
        tokens, at_s = self._buckets.get(key) or (float(self.burst), now_s)
        tokens = min(float(self.burst), tokens + (now_s - at_s) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets.put(key, (tokens - cost if allowed and take else tokens, now_s))
        return None if allowed else (1.0 - tokens) / self.rate_per_s

    def __len__(self) -> int:
        return len(self._buckets)
