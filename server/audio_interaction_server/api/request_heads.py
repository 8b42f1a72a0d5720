"""What the transport reads in a request's head before h11 or the app does, and the answers it makes itself: the
end of the head, its declared body length, what parsing it costs (``head_elements``), the reason phrases, and the
scope keys a route or ``TransportGuard.wrap`` leave for the connection (``REQUEST_COST``,
``REFUSED_BEFORE_THE_APP``). A leaf: plain bytes and ASGI scopes in, numbers out.
"""

from __future__ import annotations

import re

from starlette.types import Scope

END_OF_HEAD = re.compile(rb"\n\r?\n")  # h11 accepts bare LF line ends too
CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*([0-9]+)[ \t]*\r?\n", re.IGNORECASE)
TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding:", re.IGNORECASE)
# The headers of a handshake the websockets library reads element by element with its pure-Python tokenizer
# (``websockets.headers.parse_connection``, ``parse_upgrade``, ``parse_subprotocol``): their values' commas.
TOKENIZED_HEADERS = re.compile(rb"\n(?:connection|upgrade|sec-websocket-protocol):([^\n]*)", re.IGNORECASE)
TOKENIZED_HEADER_NAMES = frozenset((b"connection", b"upgrade", b"sec-websocket-protocol"))
# A declared length of more digits is over any limit (and Python would refuse to read one of over 4,300).
MAX_LENGTH_DIGITS = 18

# The reason phrases of the answers the transport makes itself.
HTTP_PHRASES = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 429: "Too Many Requests",
                431: "Request Header Fields Too Large", 503: "Service Unavailable"}
# Set in a plain request's scope that ``TransportGuard.wrap`` answered 429 before the app.
REFUSED_BEFORE_THE_APP = "ais.refused_before_the_app"
# What a /metrics answer costs of its client's plain-request budget: it renders every counter, about 20 times the work
# of /health (5-6 ms of the event loop on the 2-core VM), and a scrape counted as one request let one address spend
# half the loop inside its budget. A Prometheus scrape every few seconds is still far inside it.
METRICS_REQUEST_COST = 20.0
# Set in a plain request's scope by a route whose work grows with what the client sent (a JSON body: pydantic's error
# per wrong item), as a count of requests: what the answer costs of its client's plain-request budget.
REQUEST_COST = "ais.request_cost"


def head_elements(head: bytes) -> int:
    """What parsing a request head costs, in header lines: one a line, one more for each comma of a header the
    websockets library tokenizes element by element (``TOKENIZED_HEADERS``), and one for each "&" of the request
    target (Starlette parses a query parameter by parameter, and the log's redaction looks at each). ``head``: the
    request line, the headers and the empty line that ends them."""
    num_lines = head.count(b"\n") - 2  # the request line and the empty line
    num_parameters = head.count(b"&", 0, head.find(b"\n"))
    return num_lines + num_parameters + sum(value.count(b",") for value in TOKENIZED_HEADERS.findall(head))


def request_elements(scope: Scope) -> int:
    """``head_elements`` of a request as h11 parsed it (its scope: headers with lowercase names, folded lines; the
    query string apart)."""
    headers = scope.get("headers", ())
    return len(headers) + scope.get("query_string", b"").count(b"&") + sum(
        value.count(b",") for name, value in headers if name in TOKENIZED_HEADER_NAMES)


def declared_length(digits: bytes) -> int:
    """A Content-Length's value; one of more than ``MAX_LENGTH_DIGITS`` digits (leading zeros too) as the largest
    such number, over every limit."""
    return int(digits) if len(digits) <= MAX_LENGTH_DIGITS else 10 ** MAX_LENGTH_DIGITS
