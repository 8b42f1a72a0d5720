"""The Realtime routes: ``POST /v1/realtime/client_secrets`` (ephemeral keys) and ``WS /v1/realtime``.

``add_realtime_routes(app, runtime)`` is called by ``api/app.py``; admission (API key or a
valid client secret, origin, rate, capacity) is the app's, shared with ``/v1/stream``.
"""

from __future__ import annotations

import hmac
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from audio_interaction_server.api.realtime.secrets import DEFAULT_TTL_S, MAX_TTL_S, MIN_TTL_S, ClientSecrets


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(DEFAULT_TTL_S, ge=MIN_TTL_S, le=MAX_TTL_S)


class ClientSecretRequest(BaseModel):
    """OpenAI's ``POST /v1/realtime/client_secrets`` body; ``session`` is accepted and not stored (see docs)."""

    model_config = ConfigDict(extra="forbid")

    expires_after: ExpiresAfter = ExpiresAfter()
    session: dict[str, Any] | None = None


def client_secrets_of(runtime) -> ClientSecrets:
    """The runtime's minter; made on first use when the runtime has none, signed with the API key so that
    every replica sharing the key accepts the secrets any of them minted."""
    minter = getattr(runtime, "client_secrets", None)
    if minter is None:
        key = runtime.config.api_key
        minter = ClientSecrets(None if key is None else key.get_secret_value())
        runtime.client_secrets = minter
    return minter


def _has_api_key(runtime, request: Request) -> bool:
    """Only the API key mints secrets: a secret that could mint more would never really expire."""
    key = runtime.config.api_key
    if key is None:
        return True
    authorization = request.headers.get("authorization", "")
    offered = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    return bool(offered) and hmac.compare_digest(offered.encode(), key.get_secret_value().encode())


def _http_error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    # OpenAI's HTTP error shape, so the openai SDK raises its usual APIStatusError with the message.
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


def add_realtime_routes(app: FastAPI, runtime) -> None:
    @app.post("/v1/realtime/client_secrets")
    async def create_client_secret(request: Request) -> JSONResponse:
        if not _has_api_key(runtime, request):
            return _http_error(401, "invalid_api_key", "missing or wrong API key (a client secret cannot mint "
                               "another)")
        try:
            body = await request.body()
            parsed = ClientSecretRequest.model_validate_json(body or b"{}")
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return _http_error(400, "invalid_value", f"{where or 'body'}: {first['msg']}", where or None)
        minted = client_secrets_of(runtime).mint(parsed.expires_after.seconds)
        return JSONResponse({"value": minted.value, "expires_at": minted.expires_at_s,
                             "session": _default_session_object(runtime)})


def _default_session_object(runtime) -> dict:
    from audio_interaction_server.api.realtime.events import default_session_object

    model = runtime.model
    return default_session_object(model_name=None if model is None else model.name,
                                  max_turn_tokens=runtime.config.session.max_turn_tokens).model_dump(mode="json")
