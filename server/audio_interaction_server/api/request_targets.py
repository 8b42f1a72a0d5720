"""What the transport's ASGI wrapper (``TransportGuard.wrap``) settles about a request before any route sees it.

* Request targets in absolute form (``GET http://host:8000/health``, ``GET ws://host:8000/v1/stream``): RFC 9112
  (3.2.2) has a server accept a target that is a whole URL, as a client speaking through a forward proxy sends it,
  and take that URL's host in place of the Host header. uvicorn passes such a target on as the path, so no route
  matched it (404 for HTTP, 403 for a WebSocket). ``to_origin_form`` rewrites the scope in place: the path and
  query the URL names, its host as the Host header. In place, because the connection's protocol reads the same
  scope after the answer (``/metrics`` costs more of a client's request budget than other paths).
* Two framings of one body (``Content-Length`` and ``Transfer-Encoding``): h11 reads the chunks, where a proxy in
  front that reads the length sees another request in the rest (request smuggling). RFC 9112 (6.1) has the
  connection closed; ``has_two_body_lengths`` finds such a request, whatever the reads its head came in.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

# Lower case: a scheme is case-insensitive (RFC 3986 3.1).
URL_SCHEMES = (b"http://", b"https://", b"ws://", b"wss://")


def is_absolute_form(scope: MutableMapping[str, Any]) -> bool:
    raw_path: bytes = scope.get("raw_path") or b""
    return raw_path[:1] != b"/" and raw_path[:8].lower().startswith(URL_SCHEMES)


def to_origin_form(scope: MutableMapping[str, Any]) -> bool:
    """Rewrite ``scope`` (an absolute-form target: ``is_absolute_form``) to the path, raw path and Host header of
    the URL it names (the query is apart already: uvicorn splits the target at its first "?"). False, and the
    scope as it was, for a target that is no URL (``http://[/x``)."""
    try:
        url = urlsplit(scope["raw_path"].decode("ascii"))  # the target's bytes are ASCII: h11 and websockets check
        url.port  # noqa: B018  (parsed only when asked: a port that is no number raises here)
    except ValueError:
        return False
    path = url.path or "/"
    host = url.netloc.rpartition("@")[2]  # never a user's name or password in the Host header
    headers = scope["headers"]
    if host:
        headers = [(name, value) for name, value in headers if name != b"host"] + [(b"host", host.encode("ascii"))]
    scope.update(path=unquote(path), raw_path=path.encode("ascii"), headers=headers)
    return True


def has_two_body_lengths(scope: MutableMapping[str, Any]) -> bool:
    names = {name for name, _ in scope.get("headers", ())}
    return b"content-length" in names and b"transfer-encoding" in names
