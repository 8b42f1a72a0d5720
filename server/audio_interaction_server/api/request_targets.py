"""Request targets in absolute form (``GET http://host:8000/health``, ``GET ws://host:8000/v1/stream``).

RFC 9112 (3.2.2) has a server accept a request target that is a whole URL, as a client speaking through a forward
proxy sends it, and use that URL's host in place of the Host header. uvicorn passes such a target on as the path,
so no route matched it (404 for HTTP, 403 for a WebSocket). ``OriginFormTargets`` wraps the app and gives it the
path and query the URL names, and the URL's authority as the Host header.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

# Lower case: a scheme is case-insensitive (RFC 3986 3.1).
URL_SCHEMES = (b"http://", b"https://", b"ws://", b"wss://")


class OriginFormTargets:
    """ASGI middleware: an absolute-form target becomes the origin form (``/health``) before any route sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            raw_path: bytes = scope.get("raw_path") or b""
            if raw_path[:1] != b"/" and raw_path[:8].lower().startswith(URL_SCHEMES):
                scope = origin_form(scope, raw_path)
        await self.app(scope, receive, send)


def origin_form(scope: dict, raw_path: bytes) -> dict:
    """``scope`` with the path, raw path and Host header of the URL in ``raw_path`` (the query is already apart:
    uvicorn splits the target at its first "?")."""
    url = urlsplit(raw_path.decode("ascii"))  # the target's bytes are ASCII: h11 and websockets check
    path = url.path or "/"
    headers = [(name, value) for name, value in scope["headers"] if name != b"host"]
    headers.append((b"host", url.netloc.encode("ascii")))
    return {**scope, "path": unquote(path), "raw_path": path.encode("ascii"), "headers": headers}
