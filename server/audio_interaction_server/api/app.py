"""FastAPI app, routes only: the streaming WebSocket, the subscriber WebSocket, health, readiness, info, load,
metrics and the drain call. What they share lives beside it: ``runtime.py`` (model load, worker, the session
registry, readiness, drain), ``admission.py`` (who may connect, and how a refusal is said), ``agent.py`` (the
load balancer's capacity agent).

``create_app(config)`` builds the app; its lifespan loads the model once (on a thread,
so ``/health`` answers while a large checkpoint loads and ``/ready`` says 503 until it
is done), starts the worker, and on shutdown closes every open session with a final
``session.closed`` before stopping the worker. ``build_server`` wraps it in uvicorn
with per-message deflate off (frames are small and frequent; compressing PCM gains
little and costs latency), a shutdown that closes sessions before uvicorn drops sockets,
and SIGTERM as a drain when ``drain_timeout_s`` is set.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse

from audio_interaction_server import __version__
from audio_interaction_server import spec as T
from audio_interaction_server.api import admission
from audio_interaction_server.api.addresses import peer_address
from audio_interaction_server.api.agent import CapacityAgent
from audio_interaction_server.api.connection import CLIENT_GONE, StreamConnection, Subscriber
from audio_interaction_server.api.replay_log import ResumePolicy
from audio_interaction_server.api.log_redaction import UVICORN_REQUEST_LOGGERS, keep_secrets_out_of
from audio_interaction_server.api.runtime import Runtime
from audio_interaction_server.api.session import CHUNK_S, CLOSE_GRACE_S
from audio_interaction_server.api.slash_redirects import PathOnlySlashRedirects
from audio_interaction_server.api.static_pages import router as static_pages_router
from audio_interaction_server.api.transport import uvicorn_options
from audio_interaction_server.api.transport_guard import TransportGuard
from audio_interaction_server.engine.client import dtype_name
from audio_interaction_server.logs import bind_session
from audio_interaction_server.protocol import PROTOCOL_VERSION, CloseCode
from audio_interaction_server.config import ServerConfig

if TYPE_CHECKING:
    from audio_interaction_server.api.liveness import LoopHeartbeat

log = logging.getLogger(__name__)

_UVICORN_NO_HANDSHAKE = "ASGI callable returned without completing handshake."
_UVICORN_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."


class _ClientNoiseFilter(logging.Filter):
    """uvicorn logs two things a client causes at ERROR, one with a traceback, once per connection:
    our own HTTP refusals (429, 503) and text frames that are not UTF-8 (closed with 1007, as the
    WebSocket RFC says). Neither is a server fault: the first is dropped (the app logs or counts its
    refusals), the second becomes a warning without traceback, which log_bursts' limiter on uvicorn's
    logger (transport_guard.py) then writes once per burst with a count."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _UVICORN_NO_HANDSHAKE and admission.refused_before_handshake.get():
            return False
        if record.msg == _UVICORN_INVALID_UTF8:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info, record.exc_text, record.args = None, None, ()
            record.msg = "a client sent a text frame that is not UTF-8; closed it with 1007"
        return True


_CLIENT_NOISE_FILTER = _ClientNoiseFilter()


def create_app(config: ServerConfig, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    runtime = Runtime(config, on_fatal)
    agent = CapacityAgent(runtime, config.host, config.agent_port) if config.agent_port is not None else None
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _CLIENT_NOISE_FILTER not in uvicorn_log.filters:  # process-wide, like the logger: added once
        uvicorn_log.addFilter(_CLIENT_NOISE_FILTER)
    keep_secrets_out_of(UVICORN_REQUEST_LOGGERS)  # ?token= (a resume), ?api_key=, and the handshake's headers

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if agent is not None:
            await agent.start()  # before the load: it answers "down" meanwhile, so the balancer waits
        loader = asyncio.create_task(runtime.load())
        trimmer = None
        if config.memory_trim_interval_s is not None:
            trimmer = asyncio.create_task(runtime.trim_memory_periodically(config.memory_trim_interval_s))
        try:
            yield
        finally:
            if trimmer is not None:
                trimmer.cancel()
            await runtime.shutdown()
            if agent is not None:
                await agent.stop()
            if not loader.done():
                loader.cancel()

    # The generated docs map every route for anyone who can reach the port: only when asked for.
    docs = dict(docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json") if config.api_docs else \
        dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="Audio-Interaction server", version=PROTOCOL_VERSION, lifespan=lifespan, **docs)
    app.add_middleware(PathOnlySlashRedirects)  # no Location built from a request's Host (api/slash_redirects.py)
    app.state.runtime = runtime
    app.state.agent = agent
    app.include_router(static_pages_router)  # the browser front-end at / (web/)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: uptime checkers, some balancers
    async def health() -> dict:
        return {"status": "ok"}

    @app.api_route("/ready", methods=["GET", "HEAD"])
    async def ready(capacity: str | None = None) -> Response:
        """200 when a new session would be admitted. ``?capacity=ignore``: full still counts as ready (for a
        Kubernetes readinessProbe, where 'not ready' would stall rollouts and evictions: docs/scaling.md)."""
        if not runtime.is_ready:
            answer: dict[str, Any] = {"status": "not_ready", "reason": runtime.not_ready_reason()}
            if (progress := runtime.load_progress_json()) is not None:  # downloading or loading: how far
                answer["progress"] = progress
            return JSONResponse(answer, status_code=503)
        if (quiet := runtime.engine_quiet_reason()) is not None:  # it may answer again: not_ready, for now
            return JSONResponse({"status": "not_ready", "reason": quiet}, status_code=503)
        if runtime.is_draining:
            return JSONResponse({"status": "draining", "reason": "draining: no new sessions"}, status_code=503)
        if runtime.is_full and capacity != "ignore":
            return JSONResponse({"status": "full", "reason": "all sessions are in use"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.api_route("/v1/info", methods=["GET", "HEAD"])
    async def info(request: Request) -> dict:
        # The model, device and load only for the API key: a client secret opens sessions, nothing more.
        return _info(runtime, is_authorized=admission.is_api_key(runtime, admission.offered_key(request)))

    @app.api_route("/v1/load", methods=["GET", "HEAD"])
    async def load(request: Request) -> Response:
        """How full this replica is; needs the API key (when one is set: a client secret is not enough)."""
        if not admission.is_api_key(runtime, offered := admission.offered_key(request)):
            return JSONResponse({"error": admission.wrong_key_message(runtime, offered)}, status_code=401)
        report = runtime.load_report()
        return JSONResponse({"replica_id": report.replica_id, "active": report.active, "detached": report.detached,
                             "max": report.max, "free": report.free, "subscribers": report.subscribers,
                             "ready": report.ready, "draining": report.draining})

    @app.post("/v1/admin/drain")
    async def drain(request: Request) -> Response:
        """Drain, then stop (exit 0). Never from a browser; with an API key set, it takes the key itself; without
        one, only a client on this machine, not through a proxy, may (``admission.admin_refusal``; the balancer
        refuses /v1/admin/ too: deploy/haproxy/haproxy.cfg)."""
        refusal = admission.admin_refusal(runtime, request)
        if refusal is not None:
            status, message = refusal
            return JSONResponse({"error": message}, status_code=status)
        if config.drain_timeout_s is None:
            return JSONResponse({"error": "drain is off: set drain_timeout_s (AIS_DRAIN_TIMEOUT_S)"}, status_code=409)
        runtime.begin_drain()
        return JSONResponse({"draining": True, "deadline_s": round(runtime.drain_seconds_left(), 3),
                             "sessions_left": len(runtime.streams)}, status_code=202)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> Response:
        runtime.metrics.model_ready.set(1 if runtime.is_ready else 0)
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        await _serve_stream(runtime, websocket)

    @app.websocket("/v1/sessions/{session_id}/events")
    async def events(websocket: WebSocket, session_id: str) -> None:
        await _serve_subscriber(runtime, websocket, session_id)

    _add_realtime_routes(app, runtime)
    _add_wrong_path_answers(app, config)
    return app


# The WebSocket endpoints, as a plain GET names them (curl, a browser tab): 426 says how to connect.
WEBSOCKET_PATHS = ("/v1/stream", "/v1/realtime", "/v1/sessions/{session_id}/events")


API_DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def _add_wrong_path_answers(app: FastAPI, config: ServerConfig) -> None:
    """After every other route: a plain GET on a WebSocket endpoint gets 426 Upgrade Required (not 404, which
    reads as "no such endpoint"), a WebSocket on a path no route serves gets 404 (not Starlette's 403, which
    reads as a refused key), and the API docs' paths, while they are off, a 404 that says how to turn them on."""
    async def upgrade_required(request: Request) -> Response:
        doc = "docs/realtime.md" if request.url.path == "/v1/realtime" else "docs/protocol.md"
        return PlainTextResponse(f"{request.url.path} is a WebSocket endpoint: connect with ws:// (or wss://), "
                                 f"as {doc} shows\n", status_code=426, headers={"Upgrade": "websocket"})

    for path in WEBSOCKET_PATHS:
        app.add_api_route(path, upgrade_required, methods=["GET", "HEAD"], include_in_schema=False)

    async def api_docs_off(request: Request) -> Response:
        return PlainTextResponse(f"the API docs are off: set api_docs: true (AIS_API_DOCS=true) to serve "
                                 f"{', '.join(API_DOC_PATHS)}\n", status_code=404)

    if not config.api_docs:
        for path in API_DOC_PATHS:
            app.add_api_route(path, api_docs_off, methods=["GET", "HEAD"], include_in_schema=False)

    @app.websocket("/{path:path}")
    async def no_such_endpoint(websocket: WebSocket, path: str) -> None:
        text = (f"no WebSocket endpoint at /{path}: the server's are /v1/stream, /v1/realtime and "
                "/v1/sessions/<id>/events\n")
        if not await admission.deny_upgrade(websocket, PlainTextResponse(text, status_code=404)):
            await websocket.close(CloseCode.POLICY)  # no denial-response extension: a plain refusal (HTTP 403)


def _add_realtime_routes(app: FastAPI, runtime: Runtime) -> None:
    """``/v1/realtime`` (api/realtime/, the OpenAI Realtime codec) when its routes are present."""
    try:
        present = importlib.util.find_spec("audio_interaction_server.api.realtime.routes") is not None
    except ModuleNotFoundError:  # no api/realtime/ package at all
        present = False
    if not present:
        return
    from audio_interaction_server.api.realtime.routes import add_realtime_routes

    add_realtime_routes(app, runtime)


def build_server(app: FastAPI, config: ServerConfig, heartbeat: LoopHeartbeat | None = None) -> uvicorn.Server:
    """``heartbeat``: a front's, beaten at each tick of the server's loop for its supervisor (api/fronts.py)."""
    runtime = app.state.runtime
    # Connection limits below the app (pings, headers, stuck readers, proxies): transport.py.
    transport_guard = TransportGuard(config.transport, runtime.metrics.registry)
    uv_config = uvicorn.Config(
        transport_guard.wrap(app), host=config.host, port=config.port, log_level=config.log_level, lifespan="on",
        # uvloop (a dependency off Windows: less event-loop CPU per stream), else asyncio's loop: the same code on
        # both, and the start-up log names the one chosen. The HTTP parser stays http_guard.py's guarded h11
        # (httptools would bypass its limits), and it only reads handshakes.
        loop="auto",
        ws_per_message_deflate=False,
        # Above max_frame_bytes so an oversized frame still reaches the session and gets an
        # error event; past this the transport itself closes with 1009.
        ws_max_size=max(4 * config.max_frame_bytes, 1 << 20),
        timeout_graceful_shutdown=int(CLOSE_GRACE_S + 5),
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,  # https/wss when both are set
        **uvicorn_options(transport_guard),
    )
    return _SessionClosingServer(uv_config, runtime, transport_guard, heartbeat)


def event_loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.22.1`` or ``asyncio (_UnixSelectorEventLoop)``: which loop uvicorn's ``loop="auto"`` chose."""
    if type(loop).__module__.partition(".")[0] == "uvloop":
        import uvloop

        return f"uvloop {uvloop.__version__}"
    return f"asyncio ({type(loop).__name__})"


class _SessionClosingServer(uvicorn.Server):
    """uvicorn drops WebSockets (code 1012) before the lifespan shutdown; close sessions first.

    With ``drain_timeout_s`` set, the first SIGTERM drains instead of stopping at once (a second SIGTERM,
    or SIGINT, stops at once); a drain, however started, stops the server when it is done.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime, transport_guard: TransportGuard,
                 loop_heartbeat: LoopHeartbeat | None) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.transport_guard = transport_guard
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_signalled = False
        runtime.request_stop = self._stop_after_drain
        self.loop_heartbeat = loop_heartbeat

    def _stop_after_drain(self) -> None:
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        log.info("event loop: %s", event_loop_name(self._loop))
        self.transport_guard.start()
        if not self.config.is_ssl:
            await super().startup(sockets)
            return
        # transport.py's limits start once TLS is up: until then only the loop's TLS handshake timeout bounds a
        # client that connects and never says hello, 60 s by default. uvicorn does not pass one on, so the
        # listening sockets get the request head's deadline for it, set on the loop for as long as uvicorn creates
        # them.
        create_server = self._loop.create_server
        self._loop.create_server = functools.partial(  # type: ignore[method-assign]
            create_server, ssl_handshake_timeout=self.transport_guard.settings.header_timeout_s)
        try:
            await super().startup(sockets)
        finally:
            del self._loop.create_server  # the loop's own method again

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler on the loop's thread, possibly in the middle of a loop callback: only
        # schedule the drain. The signal is recorded as uvicorn would, so that it is re-raised after the
        # shutdown and the process ends as a SIGTERM always ended it (status 0, __main__.py).
        # The first SIGTERM drains, or joins a drain the drain call began (a Kubernetes preStop hook makes that
        # call, then the kubelet sends SIGTERM); only a second SIGTERM stops at once.
        if sig == signal.SIGTERM and self.runtime.config.drain_timeout_s is not None and not self.should_exit \
                and self._loop is not None and not self._drain_signalled:
            self._drain_signalled = True
            self._captured_signals.append(sig)
            self._loop.call_soon_threadsafe(self.runtime.begin_drain)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.loop_heartbeat is not None:  # 10 a second while the server runs: this loop turns
            self.loop_heartbeat.beat()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: Any = None) -> None:
        # The ticks have ended: the heartbeat goes on from a task, so a loop that hangs in the shutdown (closing
        # sessions, the engine's goodbye) is seen as one that hangs while serving.
        beating = None if self.loop_heartbeat is None else asyncio.create_task(self._beat(self.loop_heartbeat))
        try:
            self.transport_guard.begin_shutdown()  # before the drain: a client that does not read cannot hold it
            await self.runtime.shutdown()
            await super().shutdown(sockets)
            self.transport_guard.stop()
        finally:
            if beating is not None:
                beating.cancel()

    @staticmethod
    async def _beat(heartbeat: LoopHeartbeat) -> None:
        while True:
            heartbeat.beat()
            await asyncio.sleep(0.1)


# ---- WebSocket handlers ---------------------------------------------------------------------


async def _serve_stream(runtime: Runtime, websocket: WebSocket) -> None:
    resume_of = websocket.query_params.get("resume")
    if resume_of is not None:
        await _resume_stream(runtime, websocket, resume_of)
        return
    if await admission.refused(runtime, websocket):
        return
    config = runtime.config
    session_id = runtime.new_session_id()

    # Whose prefill budget the engine charges for the session's prompt (the same address the per-IP limits see).
    address = peer_address(websocket)

    def make_session(engine_emit: Callable):
        return runtime.make_session(session_id, engine_emit, client_address=address)

    def on_closed(reason: str) -> None:
        runtime.release(session_id, reason)

    connection = StreamConnection(websocket, make_session, config.max_queued_events,
                                  min(1.0, config.idle_timeout_s / 4), on_closed,
                                  resume=ResumePolicy(config.resume_grace_s, config.resume_max_events,
                                                      config.resume_max_bytes, config.flood.resumes_per_s,
                                                      config.flood.resume_burst),
                                  on_detached=runtime.session_detached,
                                  on_reattached=runtime.session_reattached,
                                  on_session_closed=lambda reason: runtime.session_closed(session_id, reason))
    # Registered before the first await, so the capacity check above cannot be raced.
    runtime.register(session_id, connection)
    try:
        await admission.accept(websocket)
    except Exception:
        on_closed("handshake_failed")
        raise
    await connection.run()


async def _resume_stream(runtime: Runtime, websocket: WebSocket, session_id: str) -> None:
    """``/v1/stream?resume=<session id>&token=<resume_token>&last_seq=<n>``: a client back after a dropped
    connection takes its detached session over again (docs/protocol.md, resume)."""
    if await admission.rate_limited(runtime, websocket):
        return
    decision = admission.admit_resume(runtime, websocket, session_id)
    if isinstance(decision, admission.Refusal):
        await admission.refuse(runtime, websocket, decision)
        return
    await admission.accept(websocket)
    if not await decision.stream.resume(websocket, decision.last_seq):  # the session ended during the handshake
        await admission.refuse(runtime, websocket, admission.resume_expired(
            session_id, "this session can no longer be resumed: start a new one"))


async def _serve_subscriber(runtime: Runtime, websocket: WebSocket, session_id: str) -> None:
    if await admission.rate_limited(runtime, websocket):
        return
    session_id = admission.registered_session_id(session_id)
    refusal = admission.admit_subscriber(runtime, websocket, session_id)
    if refusal is not None:
        await admission.refuse(runtime, websocket, refusal)
        return
    stream = runtime.streams[session_id]
    config = runtime.config
    subscriber = Subscriber(websocket, config.max_queued_events, config.max_queued_bytes, session_id, config.flood)
    # What this task logs from here is about the session it follows (uvicorn's line of the handshake too): an
    # operator sees who followed a session, and when.
    bind_session(session_id)
    address, joined_s = peer_address(websocket) or "unknown", time.monotonic()
    # Subscribed before the handshake completes: once the client sees it open, no event is missed.
    stream.subscribers.add(subscriber)
    runtime.metrics.subscribers_active.inc()
    log.info("session %s: a subscriber from %s follows it (%d in all)", session_id, address, len(stream.subscribers))
    try:
        await admission.accept(websocket)
        await subscriber.run()
    except* CLIENT_GONE:
        pass  # the subscriber left; nothing to clean up beyond the registration
    finally:
        stream.subscribers.discard(subscriber)
        runtime.metrics.subscribers_active.dec()
        log.info("session %s: a subscriber from %s left after %.1f s", session_id, address,
                 time.monotonic() - joined_s)


def _info(runtime: Runtime, is_authorized: bool) -> dict:
    """What a client needs to connect; the model, device and load only for a client with the key
    (when a key is configured), as they tell an outsider what the hardware is and how busy it is."""
    config, model = runtime.config, runtime.model
    info: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "server_version": __version__,
        "is_demo": config.is_demo,
        "ready": runtime.is_ready,
        "audio": {"sample_formats": ["pcm_s16le", "pcm_f32le"], "model_rate_hz": T.SAMPLE_RATE_HZ,
                  "chunk_s": CHUNK_S},
        "limits": {"max_frame_bytes": config.max_frame_bytes, "max_buffered_audio_s": config.max_buffered_audio_s,
                   "idle_timeout_s": config.idle_timeout_s, "max_session_s": config.max_session_s},
        "auth": "api_key" if config.api_key is not None else "none",
        "endpoints": {"stream": "/v1/stream", "subscribe": "/v1/sessions/{session_id}/events",
                      "realtime": "/v1/realtime", "client_secrets": "/v1/realtime/client_secrets", "load": "/v1/load"},
        "resume_grace_s": config.resume_grace_s,
    }
    if runtime.worker is not None and runtime.is_ready:
        # With the server's default system prompt: a longer one leaves less (the refusal says how much).
        info["limits"]["max_turn_tokens"] = runtime.worker.largest_turn_tokens(config.session)
    if is_authorized:
        info.update({
            "model": None if model is None else model.name,
            "device": None if model is None else str(model.device),
            "dtype": None if model is None else dtype_name(model),
            "sessions": {"active": len(runtime.streams), "max": config.session_capacity},
            "replica_id": runtime.replica_id,
        })
    return info
