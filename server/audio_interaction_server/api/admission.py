"""Who may open a WebSocket: rate, key, origin, readiness, drain, capacity; and how a refusal is said.

Every WebSocket endpoint (``/v1/stream``, the subscriber endpoint, ``/v1/realtime``) runs the same checks
through ``admit_session`` / ``admit_subscriber`` and refuses through ``refuse``:

- over the per-IP connection rate: HTTP 429 + ``Retry-After`` before the handshake (``rate_limited``);
- no key (nor valid client secret), a foreign Origin: the handshake completes, then an ``error`` event and
  close 1008, so a browser's script can read why (a browser hides a refused handshake's status);
- *busy* (all sessions in use, draining, model not ready): by ``busy_refusal``. ``error_event`` (the default)
  completes the handshake and sends an ``error`` event + close 1013, which a client that connects directly
  can read; ``http_503`` refuses the upgrade itself with HTTP 503 + ``Retry-After``, before the WebSocket
  exists, which is what a load balancer can act on (HAProxy's ``retry-on 503`` retries another replica;
  it cannot retry a WebSocket that was accepted). Replicas behind a balancer use ``http_503``
  (deploy/, docs/scaling.md).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Response, WebSocket
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketState

from audio_interaction_server.api.addresses import peer_address
from audio_interaction_server.api.connection import StreamConnection, fatal_error, send_and_close
from audio_interaction_server.protocol import REALTIME_SESSION_ID_PREFIX, CloseCode

if TYPE_CHECKING:  # admission reads the runtime it is given; the runtime never imports admission
    from audio_interaction_server.api.runtime import Runtime

log = logging.getLogger(__name__)

# Set in a connection's task when the app refused it with an HTTP response before the handshake:
# uvicorn then logs "returned without completing handshake" at ERROR, which here is no fault.
refused_before_handshake: ContextVar[bool] = ContextVar("refused_before_handshake", default=False)

# The refusals a balancer may retry on another replica: this one cannot serve now, another may.
BUSY_CODES = frozenset({"capacity", "draining", "not_ready"})


@dataclass(frozen=True)
class Refusal:
    """Why a WebSocket may not open: ``code`` is the ``error`` event's code (docs/protocol.md)."""

    code: str
    message: str
    close_code: int
    session_id: str | None = None  # a subscriber's session, echoed in its error

    @property
    def is_busy(self) -> bool:
        return self.code in BUSY_CODES


# ---- the checks ----------------------------------------------------------------------------------------------


# A browser cannot set headers on a WebSocket: the Realtime API lets it offer the key (or an ephemeral client secret)
# as the subprotocol ``openai-insecure-api-key.<key>``, beside ``realtime``; both session endpoints take it.
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
# The one subprotocol the server selects when a client offers it. A browser that offered subprotocols drops a
# handshake whose answer selects none of them (code 1006, nothing said), refusals included.
SELECTED_SUBPROTOCOL = "realtime"


def offered_subprotocols(connection: HTTPConnection) -> list[str]:
    return [name.strip() for name in connection.headers.get("sec-websocket-protocol", "").split(",") if name.strip()]


def chosen_subprotocol(connection: HTTPConnection) -> str | None:
    """What the handshake's answer selects, for every WebSocket endpoint and for a refusal too. Never the key's:
    echoing it would put the key in a response header for nothing."""
    return SELECTED_SUBPROTOCOL if SELECTED_SUBPROTOCOL in offered_subprotocols(connection) else None


async def accept(websocket: WebSocket) -> None:
    """Complete ``websocket``'s handshake, as every endpoint does: selecting ``chosen_subprotocol``."""
    await websocket.accept(subprotocol=chosen_subprotocol(websocket))


def subprotocol_key(connection: HTTPConnection) -> str | None:
    for name in offered_subprotocols(connection):
        if name.startswith(KEY_SUBPROTOCOL_PREFIX) and len(name) > len(KEY_SUBPROTOCOL_PREFIX):
            return name[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


def offered_key(connection: HTTPConnection) -> str | None:
    """The key a client offers: a bearer header of its own first, then the subprotocol (any other Authorization, a
    proxy's HTTP basic auth that a browser adds by itself, is not a key), then ``X-API-Key``, then ``?api_key=``."""
    authorization = connection.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    if (key := subprotocol_key(connection)) is not None:
        return key
    # Browsers cannot set headers on a WebSocket, hence the query parameter.
    return connection.headers.get("x-api-key") or connection.query_params.get("api_key")


def is_api_key(runtime: Runtime, offered: str | None) -> bool:
    """The API key itself (or no key configured): what the operator's endpoints take (the drain call, the load,
    the full ``/v1/info``, subscribers). A client secret is never enough for them: a page that holds one must
    not be able to stop a replica or read how busy it is."""
    config = runtime.config
    if config.api_key is None:
        return True
    if not offered:
        return False
    return hmac.compare_digest(offered.encode(), config.api_key.get_secret_value().encode())


def opens_sessions(runtime: Runtime, offered: str | None) -> bool:
    """The API key, or (where the realtime routes installed them) a valid ephemeral client secret: what the two
    session endpoints, ``/v1/stream`` (with its resume) and ``/v1/realtime``, take (docs/realtime.md)."""
    if is_api_key(runtime, offered):
        return True
    return runtime.client_secrets is not None and runtime.client_secrets.is_valid(offered, time.time())


# What an endpoint that takes the API key itself tells a valid client secret: "missing or wrong API key" alone sent
# a browser's developer, whose secret had just opened /v1/stream, to check a key that was right for what it opens.
# Short enough for the whole refusal to fit a close frame's reason.
SECRET_NOT_ENOUGH = "a client secret opens only /v1/stream and /v1/realtime; this needs the API key"


def wrong_key_message(runtime: Runtime, offered: str | None, takes_secrets: bool = False) -> str:
    """Why ``offered`` is refused: by an endpoint a client secret opens (``takes_secrets``: the session endpoints),
    or by one that needs the API key itself (a subscriber, /v1/load, the admin calls)."""
    secrets = runtime.client_secrets
    if offered is not None and secrets is not None:
        if takes_secrets:
            if (expired_s := secrets.expired_since(offered, time.time())) is not None:
                # "missing or wrong API key", as for a forged secret, sent the page's developer (and the operator
                # reading the refusal's log line) to check a key, when the page had only to mint a fresh secret.
                return f"client secret expired {expired_s:.0f} s ago: mint a new one with the API key"
        elif secrets.signed_expiry(offered) is not None:  # one of ours, expired or not: a fresh one is refused too
            return f"missing or wrong API key ({SECRET_NOT_ENOUGH})"
    return "missing or wrong API key"


def origin_refusal(runtime: Runtime, connection: HTTPConnection) -> Refusal | None:
    origin = connection.headers.get("origin")
    allowed = runtime.config.allowed_origins
    # Origin is what a browser cannot forge; other clients may omit it (the API key guards them).
    if allowed and origin is not None and origin.rstrip("/") not in allowed:
        return Refusal("origin_not_allowed", f"origin {origin!r} is not allowed", CloseCode.POLICY)
    return None


def _client_refusal(runtime: Runtime, connection: HTTPConnection,
                    is_accepted: Callable[[Runtime, str | None], bool] = opens_sessions) -> Refusal | None:
    # The key first: a client without it gets the same answer whatever its Origin, so the
    # allowed list cannot be probed one origin at a time.
    if not is_accepted(runtime, offered := offered_key(connection)):
        return Refusal("unauthorized", wrong_key_message(runtime, offered, takes_secrets=is_accepted is opens_sessions),
                       CloseCode.POLICY)
    return origin_refusal(runtime, connection)


def admit_session(runtime: Runtime, connection: HTTPConnection) -> Refusal | None:
    """None when a new session may open now (then ``runtime.register`` it before any await); else why not."""
    refusal = _client_refusal(runtime, connection)
    if refusal is not None:
        return refusal
    if not runtime.is_ready:
        return Refusal("not_ready", f"the server is not ready: {runtime.not_ready_reason()}", CloseCode.TRY_AGAIN)
    if (quiet := runtime.engine_quiet_reason()) is not None:
        return Refusal("not_ready", f"the server is not ready: {quiet}; connect again", CloseCode.TRY_AGAIN)
    if runtime.is_draining:
        return Refusal("draining", "this server is draining (restarting or scaling down); connect again",
                       CloseCode.TRY_AGAIN)
    if runtime.is_full:
        capacity = runtime.config.session_capacity
        return Refusal("capacity", f"all {capacity} sessions are in use; retry later", CloseCode.TRY_AGAIN)
    limit = runtime.config.max_sessions_per_ip
    if limit is not None and (held := runtime.num_sessions_of(peer_address(connection) or "")) >= limit:
        return Refusal("too_many_sessions_from_ip", f"this client address holds {held} sessions, as many as "
                       f"max_sessions_per_ip ({limit}) allows; end one, then connect again", CloseCode.TRY_AGAIN)
    return None


def registered_session_id(session_id: str) -> str:
    """The id a subscriber named, as the registry knows it: ``sess_<id>``, as the Realtime API shows a session, is
    ``<id>`` (only where ``<id>`` is itself one of our ids: a replica may not be called "sess", config.py)."""
    from audio_interaction_server.api.runtime import split_session_id

    bare = session_id.removeprefix(REALTIME_SESSION_ID_PREFIX)
    return bare if bare != session_id and split_session_id(bare) is not None else session_id


def admit_subscriber(runtime: Runtime, connection: HTTPConnection, session_id: str) -> Refusal | None:
    """None when a subscriber may join ``session_id`` (a draining replica still serves its sessions' subscribers).
    Only with the API key: a client secret opens the session endpoints alone (docs/realtime.md)."""
    refusal = _client_refusal(runtime, connection, is_api_key)
    if refusal is None and not runtime.is_ready:
        refusal = Refusal("not_ready", f"the server is not ready: {runtime.not_ready_reason()}", CloseCode.TRY_AGAIN)
    if refusal is not None:
        return Refusal(refusal.code, refusal.message, refusal.close_code, session_id)
    stream = runtime.streams.get(session_id)
    # A session that has ended stays registered until its last events are out (a client that does not read: up to
    # the write stall's bound); a subscriber would hear nothing of it, its session.closed gone already.
    if stream is None or stream.has_ended:
        return Refusal("unknown_session",
                       opened_elsewhere(runtime, session_id, connection) or f"no open session {session_id!r}",
                       CloseCode.NOT_FOUND, session_id)
    if len(stream.subscribers) >= runtime.config.max_subscribers_per_session:
        return Refusal("too_many_subscribers", "this session has its maximum of subscribers", CloseCode.TRY_AGAIN,
                       session_id)
    return None


# A seq as a client may write it: ASCII digits only (str.isdigit also takes "²", which int() refuses) and few enough
# of them for int() (which refuses over 4,300) and for any session's count of events.
SEQ_PATTERN = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True)
class ResumeGranted:
    """A resume admitted: the detached (or still attached) session's connection, and the last seq its client saw."""

    stream: StreamConnection
    last_seq: int


def opened_elsewhere(runtime: Runtime, session_id: str, connection: HTTPConnection | None = None) -> str | None:
    """What to tell a client that asks this replica for a session another replica opened (its id names it): a
    resume or a subscriber sent past the balancer's routing by session id (another front of the host, another pod).
    One that came through a proxy was most likely routed right: a balancer that routes by the session id (the
    shipped HAProxy configurations) sends it elsewhere only when that replica is down or gone."""
    from audio_interaction_server.api.runtime import split_session_id

    parts = split_session_id(session_id)
    if parts is None or parts[0] == runtime.replica_id:
        return None
    where = f"session {session_id!r} was opened on replica {parts[0]}, not on this one ({runtime.replica_id})"
    if connection is not None and came_through_a_proxy(connection):
        return (f"{where}, and the load balancer sent this here: replica {parts[0]} is most likely down or gone, and "
                "its sessions with it (or the balancer does not route by the session id: docs/scaling.md)")
    return f"{where}: connect to that replica (a load balancer routes by the session id, docs/scaling.md)"


def resume_expired(session_id: str, message: str) -> Refusal:
    return Refusal("resume_expired", message, CloseCode.RESUME_FAILED, session_id)


def admit_resume(runtime: Runtime, connection: HTTPConnection, session_id: str) -> Refusal | ResumeGranted:
    """``/v1/stream?resume=<session id>&token=<resume_token>&last_seq=<n>``: the key and Origin as for any
    connection, but no capacity or drain check (the session holds its slot; a draining replica has already ended
    its detached sessions, so the resume then finds nothing); then the session, its token, the seq. A refusal
    closes with 4009, and the client starts a new session."""
    refusal = _client_refusal(runtime, connection)
    if refusal is not None:
        return Refusal(refusal.code, refusal.message, refusal.close_code, session_id)
    stream = runtime.streams.get(session_id)
    if not isinstance(stream, StreamConnection) or stream.resume_policy is None:
        return resume_expired(session_id, opened_elsewhere(runtime, session_id, connection) or (
            "no session to resume: it ended, expired, gave its slot to a new session, or this server restarted; "
            "start a new session"))
    # The token before anything else of the session: a wrong one gets the same answer whatever its state, so a
    # stranger who knows the session id learns nothing of what it holds. That it exists is no secret from a client
    # with the key (the subscriber endpoint says as much), so one that does not is resume_expired above.
    if not stream.holds_token(connection.query_params.get("token", "")):
        return Refusal("resume_refused", "wrong resume token", CloseCode.RESUME_FAILED, session_id)
    last_seq = connection.query_params.get("last_seq", "0")
    if not SEQ_PATTERN.fullmatch(last_seq):
        return Refusal("invalid_event", "last_seq must be the seq of the last event seen", CloseCode.RESUME_FAILED,
                       session_id)
    if int(last_seq) > stream.last_seq_sent:  # no client saw it: a bug, or another session's number
        return Refusal("invalid_event", f"last_seq {last_seq} is beyond the last event this session sent "
                       f"({stream.last_seq_sent}): resume with the seq of the last event received",
                       CloseCode.RESUME_FAILED, session_id)
    if not stream.can_replay_since(int(last_seq)):
        return resume_expired(session_id, "this session can no longer be resumed: start a new one")
    # Last: only a resume that would be served spends one, and a refused one leaves the session as it was.
    wait_s = stream.resume_wait_s(time.monotonic())
    if wait_s > 0:
        return Refusal("rate_limited", f"this session was resumed too often (more than "
                       f"{stream.resume_policy.resume_burst} times at once); resume again in "
                       f"{math.ceil(wait_s * 10) / 10:.1f} s", CloseCode.TRY_AGAIN, session_id)
    return ResumeGranted(stream, int(last_seq))


# Headers a proxy adds to say whom it forwards for (the replica reads those only from trusted proxies) or that it
# is one (Via; Apache's X-Forwarded-Host and -Server; a CDN's client address): their mere presence says the peer
# is a proxy, and its loopback address is not a person on this machine. Every X-Forwarded-* header counts.
FORWARDING_HEADERS = ("forwarded", "via", "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip")


def is_local_client(connection: HTTPConnection, trusted_proxies: Sequence[str] = ()) -> bool:
    """The peer is this machine, and not a proxy forwarding someone else's request: a balancer on the same host
    connects from loopback too, and a path it did not recognise as ``/v1/admin/`` (``/v1/admin%2Fdrain``) would
    otherwise reach the drain call as a local one. (The transport has already replaced a trusted proxy's
    address by its client's; a trusted proxy's own address is never local, since it forwards for others.)"""
    return not_local_because(connection, trusted_proxies) is None


def came_through_a_proxy(connection: HTTPConnection) -> str | None:
    """The first header a proxy adds that the request carries (its name), or None."""
    return next((header for header in connection.headers
                 if header in FORWARDING_HEADERS or header.startswith("x-forwarded-")), None)


def not_local_because(connection: HTTPConnection, trusted_proxies: Sequence[str] = ()) -> str | None:
    """Why the peer is not a local client (``is_local_client``), in words for the one refused; None when it is."""
    if (header := came_through_a_proxy(connection)) is not None:
        return f"this request came through a proxy (it carries {header})"
    host = peer_address(connection) or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"its peer ({host or 'unknown'}) is no address of this machine"
    if not address.is_loopback:  # first: a trusted proxy's network (10.0.0.0/8) is no balancer on this host
        return f"{host} is not this machine"
    trusted = [proxy for proxy in trusted_proxies if address in ipaddress.ip_network(proxy, strict=False)]
    if trusted:
        # An operator's curl on the balancer's own host: from loopback, which the replica trusts as a proxy.
        return (f"{host} is in transport.trusted_proxies ({trusted[0]}), so a request from it may be a proxy's "
                "(a balancer on this host): drain by SIGTERM, or set an API key and send it")
    return None


# Headers only a browser sends with a request a page makes (fetch, a form, an image): the drain call is for an
# operator's tool (curl, a preStop hook), and a page open on the server's machine must not reach it.
BROWSER_HEADERS = ("origin", "sec-fetch-site", "sec-fetch-mode", "sec-fetch-dest")


def is_from_a_browser(connection: HTTPConnection) -> bool:
    return any(header in connection.headers for header in BROWSER_HEADERS)


def admin_refusal(runtime: Runtime, connection: HTTPConnection) -> tuple[int, str] | None:
    """(HTTP status, why) when ``connection`` may not call an admin endpoint (``/v1/admin/drain``), else None.
    Never from a browser's page; with an API key set, only with that key (a client secret is not enough);
    without one, only from this machine and not through a proxy."""
    if is_from_a_browser(connection):
        return 403, "the drain call is not for browsers: a request with Origin or Sec-Fetch-* headers is refused"
    if runtime.config.api_key is not None:
        if not is_api_key(runtime, offered_key(connection)):
            return 401, "the drain call needs the API key (a client secret is not enough)"
        return None
    if (why := not_local_because(connection, runtime.config.transport.trusted_proxies)) is not None:
        return 403, ("without an API key the drain call is only for a client on this machine, not through a proxy: "
                     f"{why}")
    return None


# ---- saying no -----------------------------------------------------------------------------------------------


def native_error_events(refusal: Refusal) -> list:
    """``/v1/stream``'s in-band refusal: one fatal ``error`` event."""
    return [fatal_error(refusal.session_id, refusal.code, refusal.message)]


async def refuse(runtime: Runtime, websocket: WebSocket, refusal: Refusal,
                 in_band: Callable[[Refusal], list] = native_error_events,
                 encode: Callable[[object], list[str]] | None = None) -> None:
    """Say ``refusal`` to a client whose handshake is pending: HTTP 503 before the handshake when it is busy
    and ``busy_refusal`` is ``http_503``; else accept, send ``in_band(refusal)`` and close with its code.
    ``in_band``/``encode`` let another protocol (``/v1/realtime``) word the error its own way."""
    runtime.metrics.refused_total.labels(refusal.code).inc()
    # A warning, so a full server's storm of retries is one line per code and window (api/log_bursts.py).
    log.warning(f"refused a connection ({refusal.code}) from %s: %s", peer_address(websocket) or "?",
                refusal.message)
    if refusal.is_busy and runtime.config.busy_refusal == "http_503":
        body = json.dumps({"type": "error", "code": refusal.code, "message": refusal.message}) + "\n"
        if await deny_upgrade(websocket, Response(body, status_code=503, media_type="application/json",
                                                  headers={"Retry-After": str(runtime.config.busy_retry_after_s)})):
            return
    if websocket.application_state is WebSocketState.CONNECTING:  # a resume is refused after its handshake too
        await accept(websocket)
    if encode is None:
        await send_and_close(websocket, in_band(refusal), refusal.close_code, reason=close_reason(refusal))
    else:
        await send_and_close(websocket, in_band(refusal), refusal.close_code, encode, reason=close_reason(refusal))


# A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5: a control frame's payload is 125 bytes).
MAX_CLOSE_REASON_BYTES = 123


def close_reason(refusal: Refusal) -> str:
    """The close frame's reason: the code and message, short. A client that shows only the close (the OpenAI SDK's
    error, a browser's ``CloseEvent``) still learns why, without reading the ``error`` event first."""
    reason = f"{refusal.code}: {refusal.message}".encode()
    if len(reason) > MAX_CLOSE_REASON_BYTES:
        reason = reason[:MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore").encode() + b"..."
    return reason.decode()


async def rate_limited(runtime: Runtime, websocket: WebSocket) -> bool:
    """Refuse with HTTP 429, before the handshake, a client IP on cooldown after a flood cut or over its
    connection-attempt rate."""
    address = peer_address(websocket) or "unknown"
    if runtime.flood_cooldown is not None:
        cooldown_left_s = runtime.flood_cooldown.retry_after_s(address, time.monotonic())
        if cooldown_left_s is not None:
            runtime.metrics.refused_total.labels("flood_cooldown").inc()
            await _refuse_with_429(websocket, "this address was cut for a flood; retry later\n", cooldown_left_s)
            return True
    if runtime.rate_limiter is None:
        return False
    retry_after_s = runtime.rate_limiter.retry_after_s(address, time.monotonic())
    if retry_after_s is None:
        return False
    runtime.metrics.refused_total.labels("rate_limited").inc()
    # One line per burst however many attempts are refused: this logger is under log_bursts' limiter
    # (transport_guard.py).
    config = runtime.config
    log.warning("refused connection attempts from %s with HTTP 429: over connect_rate_per_ip (%g/s, burst %d)",
                address, config.connect_rate_per_ip, config.connect_burst_per_ip)
    await _refuse_with_429(websocket, "too many connection attempts from this address; retry later\n", retry_after_s)
    return True


async def _refuse_with_429(websocket: WebSocket, text: str, retry_after_s: float) -> None:
    if not await deny_upgrade(websocket, Response(text, status_code=429, media_type="text/plain",
                                                  headers={"Retry-After": str(math.ceil(retry_after_s))})):
        await websocket.close(CloseCode.TRY_AGAIN)  # no denial-response extension: a plain refusal (HTTP 403)


async def deny_upgrade(websocket: WebSocket, response: Response) -> bool:
    """An HTTP response instead of the upgrade; False where the ASGI server cannot send one."""
    refused_before_handshake.set(True)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # an ASGI server without the denial-response extension
        refused_before_handshake.set(False)
        return False
    return True


async def refused(runtime: Runtime, websocket: WebSocket, in_band: Callable[[Refusal], list] = native_error_events,
                  encode: Callable[[object], list[str]] | None = None) -> bool:
    """The whole gate for a new session, for any protocol's endpoint: rate limit, then ``admit_session``; True
    when the client was refused (and told). After False, register the session before the next await."""
    if await rate_limited(runtime, websocket):
        return True
    refusal = admit_session(runtime, websocket)
    if refusal is None:
        return False
    await refuse(runtime, websocket, refusal, in_band, encode)
    return True
