"""The redirect of a path with a trailing slash (``GET /v1/info/`` -> ``/v1/info``), made safe to cache.

Starlette redirects such a path to the route without the slash (``redirect_slashes``), and writes the Location
as a whole URL built from the request's Host header: ``Host: evil.example`` got ``location:
http://evil.example/v1/info``. A cache in front that stores redirects without keying on the Host would then send
every client to the host one request named (hostile probe, round twelve). RFC 9110 (10.2.2) lets a Location be
a relative reference, so the redirect keeps its status and names the path and query alone.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class PathOnlySlashRedirects:
    """ASGI middleware: a redirect answering a path that ends in ``/`` with that path without it gets a Location of
    the path and query alone. Every other response, and every WebSocket, passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or len(path) < 2 or not path.endswith("/"):
            await self.app(scope, receive, send)
            return

        async def send_path_only(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REDIRECT_STATUSES:
                message = {**message, "headers": [(name, path_only(value, path.rstrip("/")) if name == b"location"
                                                   else value) for name, value in message["headers"]]}
            await send(message)

        await self.app(scope, receive, send_path_only)


def path_only(location: bytes, expected_path: str) -> bytes:
    """``location`` as its path and query when it names ``expected_path`` (the slash redirect's); else as it was."""
    url = urlsplit(location.decode("latin-1"))
    if url.path != expected_path:
        return location
    return (url.path + (f"?{url.query}" if url.query else "")).encode("latin-1")
