"""FastAPI app: the streaming WebSocket, the subscriber WebSocket, health, info and metrics.

``create_app(config)`` builds the app; its lifespan loads the model once (on a thread,
so ``/health`` answers while a large checkpoint loads and ``/ready`` says 503 until it
is done), starts the worker, and on shutdown closes every open session with a final
``session.closed`` before stopping the worker. ``build_server`` wraps it in uvicorn
with per-message deflate off (frames are small and frequent; compressing PCM gains
little and costs latency) and a shutdown that closes sessions before uvicorn drops sockets.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from audio_interaction_server import tokens as T
from audio_interaction_server.api.connection import (
    CLIENT_GONE, ConnectionRateLimiter, StreamConnection, Subscriber, send_and_close,
)
from audio_interaction_server.api.metrics import SESSION_STATE, Metrics, malloc_trim
from audio_interaction_server.protocol import PROTOCOL_VERSION, CloseCode, ErrorEvent
from audio_interaction_server.api.session import CHUNK_S, CLOSE_GRACE_S, ModelInfo, Session
from audio_interaction_server.settings import ServerConfig
from audio_interaction_server.api.static_pages import router as static_pages_router
from audio_interaction_server.api.transport import TransportGuard

log = logging.getLogger(__name__)

# Set in a connection's task when the app refused it with an HTTP response before the handshake:
# uvicorn then logs "returned without completing handshake" at ERROR, which here is no fault.
_refused_before_handshake: ContextVar[bool] = ContextVar("refused_before_handshake", default=False)
_UVICORN_NO_HANDSHAKE = "ASGI callable returned without completing handshake."
_UVICORN_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."


class _Throttle:
    """One log line per ``window_s`` for a cause a client can repeat thousands of times a second;
    the lines in between are counted, and the next line that passes says how many."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._window_start_s = -math.inf
        self._num_suppressed = 0
        self._lock = threading.Lock()  # uvicorn's loggers may be called from any thread

    def admit(self, now_s: float) -> int | None:
        """None: leave this one out; else how many were left out since the last one that passed."""
        with self._lock:
            if now_s - self._window_start_s < self.window_s:
                self._num_suppressed += 1
                return None
            self._window_start_s = now_s
            suppressed, self._num_suppressed = self._num_suppressed, 0
            return suppressed


def _more(suppressed: int) -> str:
    return f"; {suppressed} more since the last such line" if suppressed else ""


class _ClientNoiseFilter(logging.Filter):
    """uvicorn logs two things a client causes at ERROR, one with a traceback, once per connection:
    our own HTTP refusals (429) and text frames that are not UTF-8 (closed with 1007, as the
    WebSocket RFC says). Neither is a server fault: the first is dropped (the app logs its
    refusals), the second becomes a warning without traceback, at most one a minute."""

    def __init__(self) -> None:
        super().__init__()
        self._invalid_utf8 = _Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _UVICORN_NO_HANDSHAKE and _refused_before_handshake.get():
            return False
        if record.msg == _UVICORN_INVALID_UTF8:
            suppressed = self._invalid_utf8.admit(time.monotonic())
            if suppressed is None:
                return False
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.exc_info, record.exc_text, record.args = None, None, ()
            record.msg = f"a client sent a text frame that is not UTF-8; closed it with 1007{_more(suppressed)}"
        return True


_CLIENT_NOISE_FILTER = _ClientNoiseFilter()


class Runtime:
    """Everything the app holds for its lifetime; only touched from the event loop."""

    def __init__(self, config: ServerConfig, on_fatal: Callable[[str], None] | None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.on_fatal = on_fatal
        self.model = None
        self.worker = None
        self.load_error: str | None = None
        self.is_shutting_down = False
        self.stream_url: str | None = None  # set by whoever bound the socket; for the "ready" log line
        self._loader: threading.Thread | None = None
        self.streams: dict[str, StreamConnection] = {}
        self.metrics.set_state_source(self.state_totals)
        self.rate_limiter = None if config.connect_rate_per_ip is None else \
            ConnectionRateLimiter(config.connect_rate_per_ip, config.connect_burst_per_ip)
        self.rate_limited_log = _Throttle()

    def state_totals(self) -> dict[str, float]:
        """What the open sessions hold, summed (the ``ais_session_*`` gauges; event loop only).

        The engine side is a racy read of the worker's counters, good enough for monitoring.
        """
        totals = dict.fromkeys(SESSION_STATE, 0)
        for session_id, stream in list(self.streams.items()):
            totals["ais_session_queued_events"] += stream.queued_events
            size = self.worker.state_size(session_id) if self.worker is not None else None
            if size is not None:
                totals["ais_session_kv_positions"] += size.positions
                totals["ais_session_history_tokens"] += size.history_tokens
                totals["ais_session_history_chunks"] += size.history_chunks
                totals["ais_session_queued_chunks"] += size.queued_chunks
        return totals

    @property
    def is_ready(self) -> bool:
        return self.worker is not None and self.worker.is_alive and not self.is_shutting_down

    def not_ready_reason(self) -> str:
        """A plain reason for clients (``/ready``, the ``not_ready`` error); the details
        (paths, exception text) went to the log, which only the operator reads."""
        if self.is_shutting_down:
            return "shutting down"
        if self.load_error is not None:
            return "model failed to load (the server log says why)"
        if self.worker is None:
            return "loading the model"
        return "the model worker died (the server log says why)"

    @property
    def is_loading(self) -> bool:
        return self._loader is not None and self._loader.is_alive()

    async def load(self) -> None:
        self._loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            self.model, self.worker = await self._on_loader_thread(self._load_blocking)
            self.metrics.model_ready.set(1)
        except Exception as error:  # a server without its model is useless: say why, then stop
            if self.is_shutting_down:
                return  # stopped while loading: whatever the load did is moot
            self.load_error = f"{type(error).__name__}: {error}"
            log.error("cannot serve: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)
            return
        model = self.model
        log.info("ready: serving %s (%s on %s, %s; up to %d sessions; loaded in %.1f s)",
                 self.stream_url or "/v1/stream", model.name, model.device, str(model.dtype).removeprefix("torch."),
                 self.config.session_capacity, time.perf_counter() - started)

    async def _on_loader_thread(self, load: Callable[[], Any]) -> Any:
        """``asyncio.to_thread`` on a daemon thread of its own: ``asyncio.run`` joins the default
        executor's threads at exit, so a stop during a load (minutes for the 3B model, or a hung
        download) would wait for the load to finish; this thread is simply left behind."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()

        def settle(setter: Callable[[Any], None], value: Any) -> None:
            if not outcome.done():  # not cancelled by a stop meanwhile
                setter(value)

        def run() -> None:
            try:
                result = load()
            except Exception as error:
                setter, value = outcome.set_exception, error
            else:
                setter, value = outcome.set_result, result
            try:
                loop.call_soon_threadsafe(settle, setter, value)
            except RuntimeError:
                pass  # the event loop is gone: the server stopped while the model loaded

        self._loader = threading.Thread(target=run, name="model-loader", daemon=True)
        self._loader.start()
        return await outcome

    def _load_blocking(self):
        from audio_interaction_server.model.checkpoint import load_model
        from audio_interaction_server.engine.worker import Worker

        engine = self.config.engine
        checkpoint = engine.checkpoint
        log.info("loading the model (%s, device %s); /health answers meanwhile, /ready once it is loaded",
                 "the tiny demo" if self.config.is_demo else checkpoint, engine.device)
        if self.config.is_demo:
            from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

            log.warning("=" * 72)
            log.warning("DEMO MODE: serving the tiny RANDOM model; its replies are noise.")
            log.warning("Set engine.checkpoint (AIS_ENGINE__CHECKPOINT) to serve the real model.")
            log.warning("=" * 72)
            checkpoint = ensure_demo_checkpoint()
        else:
            from audio_interaction_server.model.hub import resolve_checkpoint_source

            checkpoint = resolve_checkpoint_source(checkpoint)  # a directory, or a Hub repo id to fetch
        model = load_model(checkpoint, engine.device, engine.dtype)
        if self.is_shutting_down:  # stopped while loading: no worker to start, nobody to serve
            raise RuntimeError("the server stopped while the model loaded")
        worker = Worker(model, engine)
        worker.on_step = self._on_step
        worker.on_failure = self._on_worker_failure
        worker.start()
        return model, worker

    def _on_step(self, stats) -> None:  # worker thread; prometheus_client is thread-safe
        self.metrics.observe_step(stats)

    def _on_worker_failure(self, error: BaseException) -> None:  # the dying worker thread
        try:
            self._loop.call_soon_threadsafe(self._worker_failed, f"the model worker died: {error!r}")
        except RuntimeError:
            pass  # the event loop is already closed: the server is stopping anyway

    def _worker_failed(self, reason: str) -> None:
        # The worker has ended every session; a server without it is useless, and only a new
        # process gets a new one, so stop (exit status 1) and let the supervisor restart us.
        self.metrics.model_ready.set(0)
        log.error("cannot serve: %s; stopping so that a supervisor can restart the server", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def trim_memory_periodically(self, interval_s: float) -> None:
        """Return the heap's free pages to the OS every ``interval_s``.

        glibc keeps freed memory in its arenas and returns only the top of each heap, so with
        sessions coming and going (their mel chunks, queued audio and events allocated on
        one thread, freed on another) free but resident pages pile up: in the 64-session load
        run of docs/reliability.md, RSS rose 1013 -> 1370 MiB over 14 minutes while the live
        heap stayed within 283-382 MiB and the free heap grew 214 -> 512 MiB; with this trim
        every 60 s RSS stayed at 1,000-1,050 MiB from minute 4 on. It runs on a thread:
        walking the arenas takes milliseconds and must not stall the event loop.
        """
        while True:
            await asyncio.sleep(interval_s)
            started = time.perf_counter()
            if not await asyncio.to_thread(malloc_trim):
                return  # not glibc: nothing to trim
            self.metrics.malloc_trim_seconds.observe(time.perf_counter() - started)

    async def shutdown(self) -> None:
        """Close every session with a final event, then stop the worker."""
        self.is_shutting_down = True
        self.metrics.model_ready.set(0)
        streams = list(self.streams.values())
        for stream in streams:
            stream.shut_down()
        if streams:
            waits = [asyncio.create_task(stream.finished.wait()) for stream in streams]
            _, pending = await asyncio.wait(waits, timeout=CLOSE_GRACE_S + 1.0)
            for task in pending:
                task.cancel()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)


def create_app(config: ServerConfig, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    runtime = Runtime(config, on_fatal)
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _CLIENT_NOISE_FILTER not in uvicorn_log.filters:  # process-wide, like the logger: added once
        uvicorn_log.addFilter(_CLIENT_NOISE_FILTER)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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
            if not loader.done():
                loader.cancel()

    # The generated docs map every route for anyone who can reach the port: only when asked for.
    docs = dict(docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json") if config.api_docs else \
        dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="Audio-Interaction server", version=PROTOCOL_VERSION, lifespan=lifespan, **docs)
    app.state.runtime = runtime
    app.include_router(static_pages_router)  # the browser front-end at / (web/)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if runtime.is_ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not_ready", "reason": runtime.not_ready_reason()}, status_code=503)

    @app.get("/v1/info")
    async def info(request: Request) -> dict:
        return _info(runtime, is_authorized=_is_authorized(runtime.config, _offered_key(request)))

    @app.get("/metrics")
    async def metrics() -> Response:
        runtime.metrics.model_ready.set(1 if runtime.is_ready else 0)
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        await _serve_stream(runtime, websocket)

    @app.websocket("/v1/sessions/{session_id}/events")
    async def events(websocket: WebSocket, session_id: str) -> None:
        await _serve_subscriber(runtime, websocket, session_id)

    return app


def build_server(app: FastAPI, config: ServerConfig) -> uvicorn.Server:
    runtime = app.state.runtime
    # Connection limits below the app (pings, headers, stuck readers, proxies): transport.py.
    transport_guard = TransportGuard(config.transport, runtime.metrics.registry)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, lifespan="on",
        ws_per_message_deflate=False,
        # Above max_frame_bytes so an oversized frame still reaches the session and gets an
        # error event; past this the transport itself closes with 1009.
        ws_max_size=max(4 * config.max_frame_bytes, 1 << 20),
        timeout_graceful_shutdown=CLOSE_GRACE_S + 5,
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile,  # https/wss when both are set
        **transport_guard.uvicorn_options(),
    )
    return _SessionClosingServer(uv_config, runtime, transport_guard)


class _SessionClosingServer(uvicorn.Server):
    """uvicorn drops WebSockets (code 1012) before the lifespan shutdown; close sessions first."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, transport_guard: TransportGuard) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.transport_guard = transport_guard

    async def startup(self, sockets: Any = None) -> None:
        self.transport_guard.start()
        await super().startup(sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        self.transport_guard.begin_shutdown()  # before the drain: a client that does not read cannot hold it
        await self.runtime.shutdown()
        await super().shutdown(sockets)
        self.transport_guard.stop()


# ---- WebSocket handlers ---------------------------------------------------------------------


def _refusal(runtime: Runtime, websocket: WebSocket) -> tuple[str, str, int] | None:
    """(error code, message, close code) when this client may not connect."""
    config = runtime.config
    # The key first: a client without it gets the same answer whatever its Origin, so the
    # allowed list cannot be probed one origin at a time.
    if not _is_authorized(config, _offered_key(websocket)):
        return "unauthorized", "missing or wrong API key", CloseCode.POLICY
    origin = websocket.headers.get("origin")
    # Origin is what a browser cannot forge; other clients may omit it (the API key guards them).
    if config.allowed_origins and origin is not None and origin.rstrip("/") not in config.allowed_origins:
        return "origin_not_allowed", f"origin {origin!r} is not allowed", CloseCode.POLICY
    if not runtime.is_ready:
        return "not_ready", f"the server is not ready: {runtime.not_ready_reason()}", CloseCode.TRY_AGAIN
    return None


def _is_authorized(config: ServerConfig, offered: str | None) -> bool:
    if config.api_key is None:
        return True
    expected = config.api_key.get_secret_value()
    return bool(offered) and hmac.compare_digest(offered.encode(), expected.encode())


def _offered_key(connection: HTTPConnection) -> str | None:
    authorization = connection.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    # Browsers cannot set headers on a WebSocket, hence the query parameter.
    return connection.headers.get("x-api-key") or connection.query_params.get("api_key")


def _error(code: str, message: str, session_id: str | None = None) -> ErrorEvent:
    return ErrorEvent(session_id=session_id, server_time_ms=int(time.time() * 1000), code=code, message=message,
                      is_fatal=True)


async def _rate_limited(runtime: Runtime, websocket: WebSocket) -> bool:
    """Refuse a client IP over its connection-attempt rate with HTTP 429, before the handshake."""
    if runtime.rate_limiter is None:
        return False
    address = websocket.client.host if websocket.client is not None else "unknown"
    retry_after_s = runtime.rate_limiter.retry_after_s(address, time.monotonic())
    if retry_after_s is None:
        return False
    runtime.metrics.refused_total.labels("rate_limited").inc()
    _refused_before_handshake.set(True)
    suppressed = runtime.rate_limited_log.admit(time.monotonic())
    if suppressed is not None:  # a flood must not become a flood of log lines
        log.warning("refused connection attempts from %s with HTTP 429: over connect_rate_per_ip (%g/s, burst %d)%s",
                    address, runtime.config.connect_rate_per_ip, runtime.config.connect_burst_per_ip, _more(suppressed))
    try:
        await websocket.send_denial_response(Response(
            "too many connection attempts from this address; retry later\n", status_code=429,
            headers={"Retry-After": str(math.ceil(retry_after_s))}, media_type="text/plain"))
    except RuntimeError:  # an ASGI server without the denial-response extension: a plain refusal (HTTP 403)
        await websocket.close(CloseCode.TRY_AGAIN)
    return True


async def _serve_stream(runtime: Runtime, websocket: WebSocket) -> None:
    config, metrics = runtime.config, runtime.metrics
    if await _rate_limited(runtime, websocket):
        return
    refusal = _refusal(runtime, websocket)
    if refusal is None and len(runtime.streams) >= config.session_capacity:
        refusal = "capacity", f"all {config.session_capacity} sessions are in use; retry later", CloseCode.TRY_AGAIN
    if refusal is not None:
        code, message, close_code = refusal
        metrics.refused_total.labels(code).inc()
        await websocket.accept()
        await send_and_close(websocket, [_error(code, message)], close_code)
        return
    session_id = uuid.uuid4().hex  # unguessable: it is also the subscription capability
    model = runtime.model
    info = ModelInfo(model.name, runtime.config.is_demo, model.tokenizer)

    def on_closed(reason: str) -> None:
        runtime.streams.pop(session_id, None)
        metrics.sessions_active.set(len(runtime.streams))
        metrics.sessions_total.labels(reason).inc()

    def make_session(engine_emit: Callable) -> Session:
        return Session(session_id, config, info, runtime.worker, engine_emit, time.monotonic(), observer=metrics)

    connection = StreamConnection(websocket, make_session, config.max_queued_events,
                                  min(1.0, config.idle_timeout_s / 4), on_closed)
    # Registered before the first await, so the capacity check above cannot be raced.
    runtime.streams[session_id] = connection
    metrics.sessions_active.set(len(runtime.streams))
    try:
        await websocket.accept()
    except Exception:
        on_closed("handshake_failed")
        raise
    await connection.run()


async def _serve_subscriber(runtime: Runtime, websocket: WebSocket, session_id: str) -> None:
    if await _rate_limited(runtime, websocket):
        return
    refusal = _refusal(runtime, websocket)
    stream = runtime.streams.get(session_id)
    if refusal is None and stream is None:
        refusal = "unknown_session", f"no open session {session_id!r}", CloseCode.NOT_FOUND
    if refusal is None and len(stream.subscribers) >= runtime.config.max_subscribers_per_session:
        refusal = "too_many_subscribers", "this session has its maximum of subscribers", CloseCode.TRY_AGAIN
    if refusal is not None:
        code, message, close_code = refusal
        runtime.metrics.refused_total.labels(code).inc()
        await websocket.accept()
        await send_and_close(websocket, [_error(code, message, session_id)], close_code)
        return
    subscriber = Subscriber(websocket, runtime.config.max_queued_events)
    # Subscribed before the handshake completes: once the client sees it open, no event is missed.
    stream.subscribers.add(subscriber)
    runtime.metrics.subscribers_active.inc()
    try:
        await websocket.accept()
        await subscriber.run()
    except* CLIENT_GONE:
        pass  # the subscriber left; nothing to clean up beyond the registration
    finally:
        stream.subscribers.discard(subscriber)
        runtime.metrics.subscribers_active.dec()


def _info(runtime: Runtime, is_authorized: bool) -> dict:
    """What a client needs to connect; the model, device and load only for a client with the key
    (when a key is configured), as they tell an outsider what the hardware is and how busy it is."""
    config, model = runtime.config, runtime.model
    info: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "is_demo": config.is_demo,
        "ready": runtime.is_ready,
        "audio": {"sample_formats": ["pcm_s16le", "pcm_f32le"], "model_rate_hz": T.SAMPLE_RATE_HZ,
                  "chunk_s": CHUNK_S},
        "limits": {"max_frame_bytes": config.max_frame_bytes, "max_buffered_audio_s": config.max_buffered_audio_s,
                   "idle_timeout_s": config.idle_timeout_s, "max_session_s": config.max_session_s},
        "auth": "api_key" if config.api_key is not None else "none",
        "endpoints": {"stream": "/v1/stream", "subscribe": "/v1/sessions/{session_id}/events"},
    }
    if is_authorized:
        info.update({
            "model": None if model is None else model.name,
            "device": None if model is None else str(model.device),
            "dtype": None if model is None else str(model.dtype).removeprefix("torch."),
            "sessions": {"active": len(runtime.streams), "max": config.session_capacity},
        })
    return info
