"""The Realtime routes: ``POST /v1/realtime/client_secrets`` (ephemeral keys) and ``WS /v1/realtime``.

``add_realtime_routes(app, runtime)`` is called by ``api/app.py``. Admission (API key or a valid
client secret, origin, rate, drain, capacity) is ``api/admission.py``'s, the same as ``/v1/stream``'s;
the session, its connection and the engine are the same too: only the codec differs.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from audio_interaction_server.api import admission
from audio_interaction_server.api.addresses import peer_address
from audio_interaction_server.api.flood import JSON_ITEMS_PER_EVENT
from audio_interaction_server.api.realtime.codec import RealtimeCodec, SessionNow, session_refusal
from audio_interaction_server.api.realtime.events import SessionIn
from audio_interaction_server.api.realtime.secrets import DEFAULT_TTL_S, MAX_TTL_S, MIN_TTL_S, ClientSecrets
from audio_interaction_server.api.http_guard import REQUEST_COST
from audio_interaction_server.protocol import CloseCode

class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # ``true`` is no number of seconds

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(DEFAULT_TTL_S, ge=MIN_TTL_S, le=MAX_TTL_S)


class ClientSecretRequest(BaseModel):
    """OpenAI's ``POST /v1/realtime/client_secrets`` body. ``session`` is checked as a ``session.update``'s would be
    (a setting this server cannot run is refused now rather than ignored) and not stored (see docs)."""

    model_config = ConfigDict(extra="forbid")

    expires_after: ExpiresAfter = ExpiresAfter()
    session: SessionIn | None = None


def client_secrets_of(runtime) -> ClientSecrets:
    """The runtime's minter; made on first use when the runtime has none, signed with the API key so that
    every replica sharing the key accepts the secrets any of them minted."""
    minter = getattr(runtime, "client_secrets", None)
    if minter is None:
        key = runtime.config.api_key
        minter = ClientSecrets(None if key is None else key.get_secret_value())
        runtime.client_secrets = minter
    return minter


def _http_error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    # OpenAI's HTTP error shape, so the openai SDK raises its usual APIStatusError with the message.
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


def add_realtime_routes(app: FastAPI, runtime) -> None:
    # Installed now, not at the first mint: admission accepts a secret wherever it accepts the API key.
    client_secrets_of(runtime)

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket) -> None:
        await serve_realtime(runtime, websocket)

    @app.post("/v1/realtime/client_secrets")
    async def create_client_secret(request: Request) -> Response:
        # Only the API key mints secrets (taken as every endpoint takes it): a secret that could mint more would
        # never really expire.
        if not admission.is_api_key(runtime, admission.offered_key(request)):
            return _http_error(401, "invalid_api_key", "missing or wrong API key (a client secret cannot mint "
                               "another)")
        try:
            body = await request.body()
            # Its parse grows with its JSON items (a body of 30,000 wrong list items took ~0.2 s of the event loop
            # to refuse): one request more per 256 of them, of the client's plain-request budget, as an event does.
            request.scope[REQUEST_COST] = 1.0 + (body.count(b",") + body.count(b":")) // JSON_ITEMS_PER_EVENT
            parsed = ClientSecretRequest.model_validate_json(body or b"{}")
        except ClientDisconnect:
            # Gone before its body was whole: the transport's body timeout answered 408 and closed it (or the client
            # left). Nobody reads an answer; a client's trickle is no server error for the log.
            return Response(status_code=408)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return _http_error(400, "invalid_value", f"{where or 'body'}: {first['msg']}", where or None)
        refusal = None if parsed.session is None else session_refusal(parsed.session)
        if refusal is not None:
            return _http_error(400, "invalid_value", *refusal)
        minted = client_secrets_of(runtime).mint(parsed.expires_after.seconds)
        return JSONResponse({"value": minted.value, "expires_at": minted.expires_at_s,
                             "session": _default_session_object(runtime)})


async def serve_realtime(runtime, websocket: WebSocket) -> None:
    from audio_interaction_server.api.connection import StreamConnection

    config = runtime.config
    codec = RealtimeCodec(config.max_frame_bytes)
    if await admission.rate_limited(runtime, websocket):
        return
    refusal = admission.admit_session(runtime, websocket)
    if refusal is None and websocket.query_params.get("intent") == "transcription":
        refusal = admission.Refusal("invalid_value", "transcription sessions are not supported: the model does "
                                    "not transcribe", CloseCode.POLICY)
    if refusal is not None:
        await admission.refuse(runtime, websocket, refusal, encode=codec.encode)
        return
    session_id = runtime.new_session_id()

    # Whose prefill budget the engine charges for the session's prompt (the same address the per-IP limits see).
    address = peer_address(websocket)

    def make_session(engine_emit):
        session = runtime.make_session(session_id, engine_emit, client_address=address)
        # What a commit commits (the audio it took), and what decoding reads of the session as it stands.
        codec.follow(lambda: session.audio.audio_received_s, lambda: SessionNow(session.options, session.audio.format))
        return session

    def on_closed(reason: str) -> None:
        runtime.release(session_id, reason)

    # No resume: a Realtime client that loses its socket opens a new session (the SDKs reconnect that way).
    connection = StreamConnection(websocket, make_session, config.max_queued_events,
                                  min(1.0, config.idle_timeout_s / 4), on_closed, codec=codec,
                                  on_session_closed=lambda reason: runtime.session_closed(session_id, reason))
    runtime.register(session_id, connection)  # before the first await: the capacity check cannot be raced
    try:
        await admission.accept(websocket)
    except Exception:
        on_closed("handshake_failed")
        raise
    await connection.run()


def _default_session_object(runtime) -> dict:
    from audio_interaction_server.api.realtime.events import default_session_object

    model = runtime.model
    return default_session_object(model_name=None if model is None else model.name,
                                  max_turn_tokens=runtime.config.session.max_turn_tokens).model_dump(mode="json")
