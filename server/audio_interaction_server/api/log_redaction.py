"""Secrets out of the log: uvicorn writes each request's path with its query string, and ours carry two.

A resume is ``/v1/stream?resume=<id>&token=<resume_token>&last_seq=<n>`` and a browser, which cannot set
headers on a WebSocket, sends its key as ``?api_key=``. uvicorn logs the first as a WebSocket line
(``uvicorn.error``: ``"WebSocket /v1/stream?..." [accepted]``) and plain HTTP requests as access lines
(``uvicorn.access``); whoever reads the log could resume another's session or use the key. At ``log_level:
debug`` the websockets protocol also writes every handshake header to ``uvicorn.error``, one ``< name: value``
line each: the key (``Authorization``, ``X-API-Key``) and a Realtime client secret (the
``openai-insecure-api-key.<secret>`` subprotocol). ``SecretFilter`` replaces those values with ``[redacted]``
in every line of the loggers it is added to, before any handler writes it. Thread-safe (it keeps no state).

It also shortens what a client chose to make long: a request target (up to ``max_header_bytes``, 16 KB) is
logged up to ``MAX_LOGGED_TARGET_CHARS``, with its length. uvicorn writes an access line for every request, and a
client inside its request budget could otherwise make the server write 1.5 MB of log a second.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

# Query parameters whose value is a secret; a name is compared as the app reads it (percent-decoded).
SECRET_QUERY_PARAMETERS = frozenset({"token", "api_key"})
# Request headers whose value is a secret (names compared in lower case).
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
REDACTED = "[redacted]"
# How websockets logs a handshake header (its logger is uvicorn.error): "< name: value" in, "> name: value" out.
_HEADER_LINES = frozenset({"< %s: %s", "> %s: %s"})
# A key or client secret offered as a WebSocket subprotocol (api/admission.py), in any header or line; as a client
# spells it, spaces and tabs after the dot included (a typo websockets refuses, after its debug log showed the
# header). Not a line break, which no header value holds: a logged exception's text that ended a line with the bare
# prefix lost the break and the next line's first word.
_SUBPROTOCOL_SECRET = re.compile(r"(openai-insecure-api-key\.)[ \t]*[^\s,]+", re.IGNORECASE)

# How much of a string argument (a request target, a header's value) a line shows; the rest is counted.
MAX_LOGGED_TARGET_CHARS = 256

# The loggers that write request paths with their query.
UVICORN_REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error")

# One "name=value" of a query: after "?" or "&", the value up to the next "&" or whitespace. Not up to a "#" or
# a quote: sent raw (no browser does, a hand-written client may), they are part of the query the app reads, and
# of a key it accepts. A name holds no "?": every "?" is a place a name may start, and a name that could run over
# them made each of them scan to the line's end (16,000 "?" took 3 s of the event loop, probe round eight); a
# name that is cut at a "?" is redacted as if it began there (more than the app reads as a secret, never less).
_QUERY_PARAMETER = re.compile(r"(?<=[?&])([^=&?\s\"#]+)=([^&\s]*)")


def redact_query_secrets(text: str) -> str:
    """``text`` with the value of every secret query parameter in it replaced."""
    if "=" not in text:
        return text

    def redact(parameter: re.Match) -> str:
        name, value = parameter.group(1, 2)
        if unquote_plus(name) not in SECRET_QUERY_PARAMETERS:
            return parameter.group(0)
        return f"{name}={REDACTED}" + ('"' if value.endswith('"') else "")  # the quote that closes a logged line

    return _QUERY_PARAMETER.sub(redact, text)


def shortened(text: str) -> str:
    """``text``, or its first ``MAX_LOGGED_TARGET_CHARS`` characters and how many it had."""
    if len(text) <= MAX_LOGGED_TARGET_CHARS:
        return text
    return f"{text[:MAX_LOGGED_TARGET_CHARS]}...({len(text)} characters)"


# A URL's user and password (``http://alice:s3cret@host/``), as a request target in absolute form may carry them;
# to the last "@" before the path. A scheme of any length made every word of a long line scan to its end.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]{0,31}://)[^/\s\"]*@")
# websockets refuses a header it cannot read with an exception that quotes it without its name (at debug level the
# refusal is logged): whichever header it was, the quoted part is redacted.
_REFUSED_HEADER = re.compile(r"(invalid HTTP header (?:line|name|value): ).*")


def redact_secrets(text: str) -> str:
    """``text`` with its secret query values, a URL's user and password, subprotocol secrets and headers websockets
    refused replaced. Every pattern takes time in proportion to ``text``'s length: this runs on the event loop for
    every request line, before any authentication (tests/api/test_log_redaction.py's adversarial lines)."""
    text = redact_query_secrets(text)
    if "@" in text:
        text = _URL_USERINFO.sub(rf"\g<1>{REDACTED}@", text)
    if "invalid HTTP header" in text:
        text = _REFUSED_HEADER.sub(rf"\g<1>{REDACTED}", text)
    return _SUBPROTOCOL_SECRET.sub(rf"\g<1>{REDACTED}", text) if "-api-key." in text.lower() else text


class SecretFilter(logging.Filter):
    """Rewrites a record's message and string arguments (uvicorn passes the path as an argument, websockets a
    header's name and value): secrets redacted, then long arguments shortened. A record's exception is written
    out here, redacted, as the text formatters write (websockets logs a refused handshake with its exception,
    whose text quotes the header)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            # Formatters write a record's exception from ``exc_text`` once it is set (logging's own cache of it).
            text = record.exc_text or _EXCEPTION_FORMATTER.formatException(record.exc_info)  # type: ignore[arg-type]
            record.exc_text = redact_secrets(text)
        if isinstance(record.msg, str):
            record.msg = redact_secrets(record.msg)
        if isinstance(record.args, tuple):
            args = record.args
            if record.msg in _HEADER_LINES and len(args) == 2 and str(args[0]).lower() in SECRET_HEADERS:
                args = (args[0], REDACTED)
            record.args = tuple(shortened(redact_secrets(arg)) if isinstance(arg, str) else arg for arg in args)
        return True


_SECRET_FILTER = SecretFilter()
_EXCEPTION_FORMATTER = logging.Formatter()


def keep_secrets_out_of(logger_names: tuple[str, ...] = UVICORN_REQUEST_LOGGERS) -> None:
    """Add the filter to each logger, once (loggers are process-wide, and so is the filter)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if _SECRET_FILTER not in logger.filters:
            logger.addFilter(_SECRET_FILTER)
