"""The redirect of a path with a trailing slash (``GET /v1/info/`` -> ``/v1/info``), made safe to cache.

Starlette redirects such a path to the route without the slash (``redirect_slashes``), and writes the Location
as a whole URL built from the request's Host header: ``Host: evil.example`` got ``location:
http://evil.example/v1/info``. A cache in front that stores redirects without keying on the Host would then send
every client to the host one request named (hostile probe, round twelve). RFC 9110 (10.2.2) lets a Location be
a relative reference, so the redirect keeps its status and names the path and query alone.

Which redirect that is, is told by the Location's host: the request's own Host, which Starlette wrote it from. Not by
its path: Starlette quotes the path it writes (a space, a letter outside ASCII, a ``?`` of the path), so that path,
compared with the request's as the app reads it (percent-decoded), missed every such redirect, and those kept the
request's Host.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class PathOnlySlashRedirects:
    """ASGI middleware: a redirect answering a path that ends in ``/`` to the request's own Host (Starlette's slash
    redirect) gets a Location of the path and query alone. Every other response, and every WebSocket, passes
    untouched; so does a request without a Host (HTTP/1.0), whose redirect Starlette builds from the server's own
    address."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or len(path) < 2 or not path.endswith("/"):
            await self.app(scope, receive, send)
            return

        request_host = next((value for name, value in scope.get("headers", ()) if name == b"host"), None)

        async def send_path_only(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REDIRECT_STATUSES \
                    and request_host is not None:
                message = {**message, "headers": [(name, path_only(value, request_host) if name == b"location"
                                                   else value) for name, value in message["headers"]]}
            await send(message)

        await self.app(scope, receive, send_path_only)


def path_only(location: bytes, request_host: bytes) -> bytes:
    """``location`` as its path and query when it names the request's own host (``request_host``, its Host header,
    compared percent-decoded: Starlette quotes the URL it writes, Host included); else as it was. A path that a
    browser would read as another host's (``//evil.example``, ``/\\evil.example``) is left whole: no route answers
    one today, and a path-only Location of it would be an open redirect."""
    url = urlsplit(location.decode("latin-1"))
    if not url.scheme or unquote(url.netloc) != unquote(request_host.decode("latin-1")):
        return location
    if url.path[:2] in ("//", "/\\"):
        return location
    return (url.path + (f"?{url.query}" if url.query else "")).encode("latin-1")
