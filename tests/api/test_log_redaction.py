"""Secret query parameters are redacted from log lines, however the query spells them (as the app reads them)."""

from __future__ import annotations

import logging

import pytest

from audio_interaction_server.api.log_redaction import SecretFilter, redact_query_secrets


@pytest.mark.parametrize("line, expected", [
    ('"WebSocket /v1/stream?resume=vm_1&token=s3cret&last_seq=4" [accepted]',
     '"WebSocket /v1/stream?resume=vm_1&token=[redacted]&last_seq=4" [accepted]'),
    ('"GET /v1/info?api_key=k3y HTTP/1.1" 200', '"GET /v1/info?api_key=[redacted] HTTP/1.1" 200'),
    ("/v1/stream?t%6Fken=s3cret&api%5Fkey=k3y#x", "/v1/stream?t%6Fken=[redacted]&api%5Fkey=[redacted]"),
    # Sent raw, a "#" or '"' is part of the query the app reads (a key "abc#TAIL"Q" was accepted): a secret's value
    # runs to the next "&" or space; a quote that closes the logged request line is kept.
    ('/v1/load?api_key=abc#TAILSECRET"Q', "/v1/load?api_key=[redacted]"),
    ('"GET /v1/load?api_key=abc#TAIL%22Q HTTP/1.1" 200', '"GET /v1/load?api_key=[redacted] HTTP/1.1" 200'),
    ('"WebSocket /v1/stream?token=s3#c" [accepted]', '"WebSocket /v1/stream?token=[redacted]" [accepted]'),
    ('/v1/stream?a=b#c&token=s3cret', "/v1/stream?a=b#c&token=[redacted]"),
    ("/v1/stream?last_seq=4&tokens=kept&my_token=kept", "/v1/stream?last_seq=4&tokens=kept&my_token=kept"),
    ("no query at all: token=plain text", "no query at all: token=plain text"),
])
def test_secret_query_values_are_redacted_and_nothing_else(line, expected):
    assert redact_query_secrets(line) == expected


def test_the_filter_rewrites_the_arguments_uvicorn_logs_with():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/v1/load?api_key=k3y", "1.1", 200), None)
    assert SecretFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /v1/load?api_key=[redacted] HTTP/1.1" 200'


@pytest.mark.parametrize("name, value, shown", [
    ("authorization", "Bearer k3y", "[redacted]"),
    ("Authorization", "Basic dXNlcjpwYXNz", "[redacted]"),
    ("x-api-key", "k3y", "[redacted]"),
    ("sec-websocket-protocol", "realtime, openai-insecure-api-key.ek_1_abc",
     "realtime, openai-insecure-api-key.[redacted]"),
    # Spaces after the dot (a typo websockets refuses with 400, after logging the header): still the key (hostile
    # probe, round fourteen).
    ("sec-websocket-protocol", "realtime, openai-insecure-api-key. \tk3y",
     "realtime, openai-insecure-api-key.[redacted]"),
    ("user-agent", "python-websockets/17", "python-websockets/17"),
])
def test_secret_headers_are_redacted_from_the_handshake_lines_of_debug_logging(name, value, shown):
    """At log_level debug the websockets protocol (through uvicorn.error) writes every handshake header, one line
    each: the API key and a Realtime client secret went to the log in clear."""
    record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, "< %s: %s", (name, value), None)
    assert SecretFilter().filter(record)
    assert record.getMessage() == f"< {name}: {shown}"


def test_a_long_request_target_is_logged_shortened_with_its_length():
    """uvicorn's access line carries the whole target: a client sending 95 requests a second of 16 KB targets,
    inside its request budget, wrote 1.5 MB of log a second (probe, round six). A target is logged up to
    MAX_LOGGED_TARGET_CHARS, with its length; a secret in it is redacted first, wherever it stands."""
    from audio_interaction_server.api.log_redaction import MAX_LOGGED_TARGET_CHARS

    target = "/ready?capacity=ignore&" + "x" * 16_000 + "&api_key=k3y"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", target, "1.1", 200), None)
    assert SecretFilter().filter(record)
    shown = record.args[2]
    assert shown.startswith("/ready?capacity=ignore&xxx") and len(shown) < MAX_LOGGED_TARGET_CHARS + 40, shown
    assert shown.endswith(f"...({len(target) - len('k3y') + len('[redacted]')} characters)"), shown
    assert "k3y" not in record.getMessage()
    # A WebSocket line gives the path in its message's arguments too; short ones are as they were.
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" %s',
                               ("127.0.0.1:5000", "/v1/sessions/" + "a" * 4000 + "/events", "[accepted]"), None)
    assert SecretFilter().filter(record) and len(record.getMessage()) < MAX_LOGGED_TARGET_CHARS + 80
    assert record.args[0] == "127.0.0.1:5000" and record.args[2] == "[accepted]"


def test_a_urls_user_and_password_are_redacted():
    """A request target in absolute form may carry ``user:password@``; a refused one is logged as sent (review of
    the change, 2026-12-07)."""
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "http://alice:s3cret@[/x", "1.1", 400), None)
    assert SecretFilter().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET http://[redacted]@[/x HTTP/1.1" 400'
    assert redact_query_secrets("no url: alice@example.com") == "no url: alice@example.com"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s", ("http://alice:p@ss@host/x",), None)
    assert SecretFilter().filter(record) and record.getMessage() == "http://[redacted]@host/x"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_secret_in_a_logged_exceptions_text_is_redacted(log_format):
    """At debug level websockets logs a refused handshake with its exception, whose text quotes the header: a
    client secret offered as a subprotocol (one with "/" or "=", as base64 keys have, is no valid token) reached
    the log whole in the traceback's last line, though the header's own line was redacted (probe, round seven)."""
    from websockets.datastructures import Headers
    from websockets.headers import parse_subprotocol

    from audio_interaction_server.logs import JsonFormatter

    try:
        parse_subprotocol(Headers({"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.s3cret/x="})
                          ["Sec-WebSocket-Protocol"])
    except Exception:
        import sys

        record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, "! invalid handshake", None,
                                   sys.exc_info())
    assert "s3cret" in logging.Formatter().format(logging.makeLogRecord(record.__dict__))  # the exception says it
    assert SecretFilter().filter(record)
    assert record.exc_info is not None  # kept for handlers that read the exception itself
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter()
    line = formatter.format(record)
    assert "s3cret" not in line and "invalid Sec-WebSocket-Protocol header" in line, line
    assert "openai-insecure-api-key.[redacted]" in line, line


def test_a_subprotocol_secret_is_redacted_however_its_prefix_is_cased():
    """A client offering ``OpenAI-Insecure-API-Key.<secret>`` had it logged whole: the pattern was matched in one
    case only (review, round seven)."""
    from audio_interaction_server.api.log_redaction import redact_secrets

    line = "< sec-websocket-protocol: realtime, OpenAI-Insecure-API-Key.s3cret"
    assert redact_secrets(line) == "< sec-websocket-protocol: realtime, OpenAI-Insecure-API-Key.[redacted]"


def test_a_bare_subprotocol_prefix_at_a_lines_end_leaves_the_next_line_alone():
    """Spaces after ``openai-insecure-api-key.`` are part of the key a client wrote (c83ccdb), but a newline is not:
    a header value holds none. A logged exception's text ending a line with the bare prefix lost the line break and
    the next line's first word ("Traceback", "File") to ``[redacted]``."""
    from audio_interaction_server.api.log_redaction import redact_secrets

    text = "invalid Sec-WebSocket-Protocol header: openai-insecure-api-key.\nTraceback (most recent call last):"
    assert redact_secrets(text) == text
    assert redact_secrets("openai-insecure-api-key. \tk3y\nnext") == "openai-insecure-api-key.[redacted]\nnext"


@pytest.mark.parametrize("header", [b"X-API-Key: k3y\x7f", b"Authorization: Bearer k3y\x1b", b"X-API-Key k3y\x01"])
def test_a_header_websockets_refuses_is_not_quoted_in_the_log(header):
    """websockets refuses a header value with a control character, and its exception quotes the value without the
    header's name: at debug level a key with a DEL or an ESC in it reached the log whole (probe, round eight).
    Every value (or line) it refuses is redacted from the exception's text: nothing says which header it was."""
    import sys

    from websockets.http11 import parse_headers
    from websockets.streams import StreamReader

    reader = StreamReader()
    reader.feed_data(header + b"\r\n\r\n")
    try:
        next(parse_headers(reader.read_line))
    except ValueError:
        record = logging.LogRecord("uvicorn.error", logging.DEBUG, __file__, 1, "! no valid HTTP request", None,
                                   sys.exc_info())
    assert "k3y" in logging.Formatter().format(logging.makeLogRecord(record.__dict__))  # the exception says it
    assert SecretFilter().filter(record)
    line = logging.Formatter().format(record)
    assert "k3y" not in line and "invalid HTTP header" in line and "[redacted]" in line, line


# Lines whose redaction took time in the square of their length (each start position scanned to the line's end):
# an unauthenticated request target of 16,000 "?" held the event loop, and the GIL, for about 3 s (probe, round
# eight: with the engine in its own process, long enough for the engine to end the front's sessions).
ADVERSARIAL_LINES = [
    "/health?=" + "?" * 16_000,
    "/health?" + "?a" * 8_000 + "=",
    "/health?" + "?" * 8_000 + " =",
    "/health?" + "a" * 16_000 + "?=",
    "/health@" + "a." * 8_000,
    "/x?" + "a://" * 4_000 + "@",
    "x" + "openai-insecure-api-key." * 600,
]


def test_redaction_is_linear_in_a_lines_length():
    """Each pattern is linear: the lines above took 2.7 s together on the 2-core VM before (the first 2.1 s), and
    take 4 ms now. The bound (1 s for all) only catches a pattern that is quadratic again."""
    import time

    from audio_interaction_server.api.log_redaction import redact_secrets

    started = time.perf_counter()
    for line in ADVERSARIAL_LINES:
        redact_secrets(line)
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:5000", "GET", line, "1.1", 200), None)
        SecretFilter().filter(record)
    assert time.perf_counter() - started < 1.0
