"""The client side of the Audio-Interaction streaming protocol, shared by the example scripts.

Deliberately independent of the ``server`` package (only ``websockets`` is needed), so the
examples run from any machine. The protocol is described in docs/protocol.md.

Concurrency: one task receives (``StreamSession.receive_loop``) and one sends; the sender
waits on futures and events that only the receive loop resolves, so whoever runs both must
cancel the sender when the receive loop ends (``run_stream`` does).
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import os
import random
import re
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TextIO, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# 128 + SIGPIPE, what a shell reports for a tool whose reader left (`| head`): Python ignores SIGPIPE and raises
# BrokenPipeError instead; this status keeps `set -o pipefail` scripts seeing what they would see for any other tool.
EXIT_STDOUT_CLOSED = 141
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended (`timeout`, `kill`, a process manager): the scripts
# handle SIGTERM (to close their session first) and still exit with it, as a supervisor expects of any tool.
EXIT_TERMINATED = 143


def exit_status_help(on_ctrl_c: str = "Ctrl-C (its session is closed first)",
                     also_fails: str = "",
                     on_sigterm: str = "SIGTERM (kill, timeout, a process manager): as Ctrl-C, its session is closed "
                                       "first") -> str:
    """The exit statuses, for a script's --help (argparse.RawDescriptionHelpFormatter keeps the lines);
    ``also_fails``: what else ends the script with 1."""
    return ("exit status:\n"
            "  0    the session ended normally\n"
            "  1    the server refused or ended it, or stayed busy past --busy-retry-s"
            f"{also_fails} (the last line says why)\n"
            "  2    bad arguments or input it cannot send, said before connecting (a file damaged after its header: "
            "once the audio before it was heard)\n"
            f"  130  {on_ctrl_c}\n"
            "  141  its output was closed early (| head)\n"
            f"  143  {on_sigterm}")

# What a close code means to someone running the examples (docs/protocol.md, "Close codes").
CLOSE_MEANINGS = {
    1001: "the server is shutting down",
    1008: "refused: check --api-key (or the allowed origins), or the session options",
    1011: "the model failed on the server",
    1012: "the server is draining (an update or a scale-down)",
    1013: "the server is at capacity or not ready yet: retry later",
    4000: "idle timeout: no audio or event from the client for too long",
    4001: "session limit reached (max_session_s or the model's context)",
    4004: "no open session with that id",
    4008: "this client did not read its events fast enough",
    4009: "the session could not be resumed (expired, or the server restarted)",
    4010: "another connection resumed this session",
}


# Control characters in a reply (line breaks, carriage returns, terminal escapes) would break the
# one-line-per-reply layout or drive the terminal; they are shown as spaces.
_UNPRINTABLE = {code: " " for code in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029] if code != 0x09}


def printable(text: str) -> str:
    return text.translate(_UNPRINTABLE)


class ClientError(Exception):
    """A failure the scripts report as one readable line, then exit non-zero."""


class InputError(ClientError):
    """The input failed while it streamed (a file damaged after its header): the audio sent before it is still
    heard and answered, then the session closes and the script exits 2, the line saying why last."""


class HandshakeDropped(ClientError):
    """The server closed the connection without answering the handshake: a TLS server spoken to with ws://, or a
    server in its last moments (stopping, restarting) or a proxy whose backend is gone."""


class ServerBusy(ClientError):
    """The server refused for now (loading, full or draining: close 1013, HTTP 503, or 429 for too many attempts),
    or does not listen yet (starting, restarting); it may take the client a little later."""

    def __init__(self, reason: str, retry_after_s: float = 0.0, state: str = "busy") -> None:
        super().__init__(f"server {state} ({reason})")
        self.retry_after_s = retry_after_s
        self.is_listening = state != "not listening yet"


# The server's own endpoints (and their /v1 root), at the end of a URL's path: whatever comes
# before them is a reverse-proxy prefix, so pasting any endpoint's URL works for every script.
_API_PATH = re.compile(r"(/v1(/stream|/realtime(/client_secrets)?|/info|/load|/sessions/[^/]+/events)?"
                       r"|/health|/ready)/*$")
# A resume's query names one session: a URL pasted from one does not carry it to the next connection.
_RESUME_PARAMETERS = frozenset({"resume", "token", "last_seq"})


def endpoint_url(base_url: str, path: str) -> str:
    """``ws://host:port[/prefix]`` (http(s), or any endpoint's full URL, accepted) -> that server's ``path``."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ClientError(f"not a server URL: {base_url!r} (expected ws://HOST:PORT)")
    prefix = _API_PATH.sub("", parts.path).rstrip("/")
    query = urlencode([(name, value) for name, value in parse_qsl(parts.query) if name not in _RESUME_PARAMETERS])
    return urlunsplit((scheme, parts.netloc, prefix + path, query, ""))


def default_api_key() -> str | None:
    # The server reads the same variable, so one export serves both on a demo machine,
    # and the key stays out of the process list.
    return os.environ.get("AIS_API_KEY")


def shown_url(url: str) -> str:
    """``url`` as messages show it: a resume URL's token (the session's password) redacted, like the server's logs."""
    parts = urlsplit(url)
    query = [(name, "[redacted]" if name == "token" else value) for name, value in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="[]")))


DROPPED = "the server closed the connection without answering"


def connection_hint(url: str, error: str) -> str:
    """What to check after a failed connection, for the usual mistakes ("" when there is nothing to add)."""
    if "CERTIFICATE_VERIFY_FAILED" in error and "mismatch" in error:
        return ("; the certificate is trusted but made for another name: connect with a name it has (its "
                "subjectAltName), or make one that names this host or address (docs/browser.md)")
    if "CERTIFICATE_VERIFY_FAILED" in error:
        return ("; a self-signed certificate (docs/browser.md): let Python trust it with "
                "SSL_CERT_FILE=/path/to/cert.pem")
    if url.startswith("ws://") and ("did not receive a valid HTTP response" in error or DROPPED in error):
        return "; a server with TLS (--ssl-certfile) takes wss://"
    if url.startswith("wss://") and "WRONG_VERSION_NUMBER" in error:
        return "; the server there does not speak TLS: give ws://"
    return ""


# A refusal's body is shown in the one line a retry prints, so a long one (a balancer's page of explanations) is cut.
HTTP_BODY_MAX_CHARS = 160
# Of a refusal's body, only this much is read: a proxy's page says what it has to say in its first lines.
HTTP_BODY_READ_BYTES = 16 * 1024
# Where a part of a page that is not its text begins: the head (its title repeats the heading), a script, a style,
# a comment. Each is skipped to its end by one forward scan (patterns that looked for the end from every opening met
# unclosed took time in the square of the page's length: 0.3 s for 16 KiB of "<!--").
_PAGE_HIDDEN_START = re.compile(r"<(head|script|style)\b|<!--", re.IGNORECASE)


def page_text(page: str) -> str:
    """The text of an HTML page: its hidden parts and its tags dropped (each a space), in one pass."""
    lower, pieces, at = page.lower(), [], 0
    while (hidden := _PAGE_HIDDEN_START.search(page, at)) is not None:
        pieces.append(page[at:hidden.start()])
        closing = "-->" if hidden.group(1) is None else f"</{hidden.group(1).lower()}"
        end = lower.find(closing, hidden.end())
        if end < 0:  # never closed: the rest of the page is in it
            at = len(page)
            break
        at = end + len(closing) if closing == "-->" else lower.find(">", end) + 1 or len(page)
    pieces.append(page[at:])
    visible, text = " ".join(pieces), []
    tag_start = 0
    while (opening := visible.find("<", tag_start)) >= 0:  # tags: from "<" to the next ">", dropped
        text.append(visible[tag_start:opening])
        closing_at = visible.find(">", opening)
        if closing_at < 0:
            tag_start = len(visible)
            break
        tag_start = closing_at + 1
        text.append(" ")
    text.append(visible[tag_start:])
    return "".join(text)


def http_refusal(status: int, phrase: str, body: bytes, content_type: str) -> str:
    """An HTTP refusal that is not the server's own (JSON), as one line. The server never answers with HTML: a page
    is a proxy's (HAProxy's 503 with no backend up, nginx's or a cloud balancer's 502 or 504), shown by its text,
    without the heading that repeats the status ("503 Service Unavailable")."""
    text = body[:HTTP_BODY_READ_BYTES].decode(errors="replace")
    is_page = "html" in content_type.lower() or text.lstrip().startswith("<")
    if is_page:
        text = html.unescape(page_text(text))
    text = " ".join(printable(text).split())
    if is_page:
        try:
            phrases = {phrase, HTTPStatus(status).phrase}
        except ValueError:  # a status Python does not know
            phrases = {phrase}
        for heading in (f"{status} {name}".lower() for name in phrases if name):
            if text.lower().startswith(heading) and text[len(heading):].strip(" :-"):
                text = text[len(heading):].lstrip(" :-")
                break
    if len(text) > HTTP_BODY_MAX_CHARS:  # cut at a word, "..." saying that there was more
        text = text[:HTTP_BODY_MAX_CHARS - 3].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."
    source = f"HTTP {status} from a proxy" if is_page else f"HTTP {status}"
    return f"{source}: {text}" if text else source


async def open_websocket(url: str, api_key: str | None, open_timeout_s: float = 15.0) -> ClientConnection:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        # Per-message deflate costs more than it saves on small, frequent frames.
        return await connect(url, additional_headers=headers, compression=None, max_size=None,
                             open_timeout=open_timeout_s)
    except InvalidStatus as error:
        response = error.response
        # No WebSocket route there: our server says 404 (older ones, and bare Starlette apps, an empty 403).
        if response.status_code == 404 or (response.status_code == 403 and not response.body):
            raise ClientError(f"cannot connect to {shown_url(url)}: no WebSocket endpoint at {urlsplit(url).path} "
                              f"(HTTP {response.status_code}): give the server's URL, ws://HOST:PORT") from None
        # 503: busy, refused before the handshake (behind a balancer); 500, 502, 504: a server stopping or restarting
        # (uvicorn while it shuts down, a proxy whose backend is gone): tried again as busy.
        if response.status_code not in (429, 500, 502, 503, 504):
            raise ClientError(f"cannot connect to {shown_url(url)}: {error}") from None
        try:
            refusal = json.loads(response.body or b"")  # the server's error event, as the in-band refusal says it
            reason = f"{refusal['code']}: {refusal['message']}"
        except (ValueError, TypeError, KeyError):
            reason = http_refusal(response.status_code, response.reason_phrase, response.body or b"",
                                  response.headers.get("Content-Type", ""))
        retry_after = response.headers.get("Retry-After", "")
        raise ServerBusy(reason, float(retry_after) if retry_after.isdigit() else 0.0) from None
    except InvalidURI as error:
        raise ClientError(f"bad URL {shown_url(url)!r}: {error}") from None
    except ConnectionRefusedError:  # a server starting (it imports torch before it listens) or restarting
        raise ServerBusy(f"connection refused at {shown_url(url)}", state="not listening yet") from None
    except (InvalidMessage, ConnectionResetError, ConnectionAbortedError) as error:
        if isinstance(error, InvalidMessage) and not isinstance(error.__cause__, (EOFError, ConnectionError)):
            why = str(error)  # an answer, but no HTTP: something else listens there
            raise ClientError(f"cannot connect to {shown_url(url)}: {why}{connection_hint(url, why)}") from None
        raise HandshakeDropped(f"cannot connect to {shown_url(url)}: {DROPPED}{connection_hint(url, DROPPED)}") \
            from None
    except socket.gaierror as error:  # before OSError, which it is
        raise ClientError(f"cannot connect to {shown_url(url)}: {error}; no such host name: check the host in the "
                          "URL") from None
    except (OSError, InvalidHandshake, TimeoutError) as error:
        why = str(error) or type(error).__name__
        raise ClientError(f"cannot connect to {shown_url(url)}: {why}{connection_hint(url, why)}") from None


# ---- a busy server: loading, full or draining ----------------------------------------------------------------

BUSY_FIRST_DELAY_S = 1.0  # then doubling, up to BUSY_MAX_DELAY_S, as the page does
BUSY_MAX_DELAY_S = 15.0
BUSY_JITTER = 0.2  # each delay spread by +-20 %: clients refused together (a drain, a restart) come back apart
DEFAULT_BUSY_RETRY_S = 90.0  # a restart with a model load fits; an outage ends in a message

T = TypeVar("T")


def busy_retry_problem(seconds: float) -> str | None:
    """What is wrong with ``--busy-retry-s``, or None. NaN fails every comparison: ``< 0`` let it through."""
    if math.isfinite(seconds) and seconds >= 0:
        return None
    return f"--busy-retry-s {seconds:g}: must be a finite number of seconds, 0 (exit at once) or more"


def add_busy_retry_argument(parser: Any) -> None:
    parser.add_argument("--busy-retry-s", type=float, default=DEFAULT_BUSY_RETRY_S, metavar="SECONDS",
                        help="a busy server (loading the model, full, or draining: close 1013 or HTTP 503) is tried "
                        f"again {BUSY_FIRST_DELAY_S:g} s later, then twice as long each time (at most "
                        f"{BUSY_MAX_DELAY_S:g} s apart), for up to SECONDS (default {DEFAULT_BUSY_RETRY_S:g}); "
                        "0 = exit at once")


def busy_delay_s(num_retries: int, retry_after_s: float, time_left_s: float) -> float | None:
    """The wait before retry ``num_retries + 1``: doubling from ``BUSY_FIRST_DELAY_S``, spread by ``BUSY_JITTER``, at
    most ``BUSY_MAX_DELAY_S`` (jitter included) unless the server asked for longer (``Retry-After``); the last one
    ends at the deadline, so ``--busy-retry-s 3`` tries for 3 s. None once no time is left."""
    if time_left_s < 0.05:
        return None
    # The cap before the spread, shrunk by it: clients refused together stay apart at the cap too.
    base_s = min(BUSY_MAX_DELAY_S / (1 + BUSY_JITTER), BUSY_FIRST_DELAY_S * 2 ** min(num_retries, 16))
    delay_s = base_s * random.uniform(1 - BUSY_JITTER, 1 + BUSY_JITTER)
    return min(time_left_s, max(retry_after_s, delay_s))


async def retry_while_busy(attempt: Callable[[], Awaitable[T]], retry_s: float, note: Callable[[str], None],
                           served_before: bool = False) -> T:
    """``attempt()``, again after each ``ServerBusy`` with a growing delay, for up to ``retry_s`` seconds.
    ``served_before``: the URL served this client a session a moment ago (the host and port are right)."""
    loop = asyncio.get_running_loop()
    started_s = loop.time()
    deadline_s = started_s + retry_s
    num_retries = 0
    while True:
        try:
            return await attempt()
        except ServerBusy as busy:
            delay_s = busy_delay_s(num_retries, busy.retry_after_s, deadline_s - loop.time())
            if delay_s is None:
                # A port nothing ever listened on looks like a server still starting: say what to check.
                check = "" if busy.is_listening else \
                    "; the server went away and did not come back in that time" if served_before else \
                    "; nothing listens there: check the host and port"
                raise ClientError(f"{busy}: gave up after {num_retries} retries in {loop.time() - started_s:.0f} s "
                                  f"(--busy-retry-s {retry_s:g}){check}") from None
            # The first refusal says both readings, so that a typo in the port is not waited out for a minute.
            first_hint = "" if busy.is_listening or num_retries else (
                f" (a server still starting, or the wrong host or port; trying for up to {retry_s:g} s, "
                "--busy-retry-s 0 exits at once)")
            num_retries += 1
            note(f"{busy}, retrying in {delay_s:.1f} s{first_hint}")
            await asyncio.sleep(delay_s)


# A 1008 whose reason begins so is the server's transport cutting a connection that sent too many frames.
FLOOD_CLOSE_REASON = "too many"


def describe_close(code: int | None, reason: str = "") -> str:
    meaning = CLOSE_MEANINGS.get(code or 0, "the connection ended abnormally" if code in (None, 1006) else "")
    if code == 1008 and reason.startswith(FLOOD_CLOSE_REASON):
        meaning = "cut for sending too fast: use a larger --frame-ms or a lower --speed"
    return f"connection closed with code {code}" + (f": {meaning}" if meaning else "") + \
        (f" ({reason})" if reason else "")


def describe_error(event: dict) -> str:
    fatal = " (fatal)" if event.get("is_fatal") else ""
    return f"server error {event.get('code')}{fatal}: {event.get('message')}"


def seconds_text(seconds: float) -> str:
    """Tenths of a second, or hundredths under a tenth: a 10 ms file is no "0.0 s"."""
    if seconds == 0 or seconds >= 0.1:
        return f"{seconds:.1f} s"
    return f"{seconds:.2f} s" if seconds >= 0.005 else "under 0.01 s"


class ReplyConsole:
    """Shows a session's events: each reply on one line that grows with its text, or raw JSON lines."""

    def __init__(self, as_json: bool = False, show_decisions: bool = False,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr, faster_than_real_time: bool = False) -> None:
        self.as_json, self.show_decisions = as_json, show_decisions
        # The audio goes out faster than it plays (stream_file --speed 0, or above 1): each chunk waits behind the
        # ones sent before it, and its onset says how long, not how fast the model is.
        self.faster_than_real_time = faster_than_real_time
        self.out, self.err = out, err
        self.num_turns = 0
        self.num_cut_turns = 0  # replies the user's Ctrl-C cut short
        self.num_decisions = 0  # chunks the model heard, every session together (the scripts always ask for them)
        self.num_sessions = 1
        self.onsets_ms: list[float] = []
        self.closed: dict | None = None
        self._turn: dict | None = None  # the open reply's turn_begin
        self._emotion = "-"
        self._is_line_open = False
        self._told_audio_ignored = False  # the session is closing: the server ignores each audio frame after this

    def note(self, text: str) -> None:
        """Status and diagnostics go to stderr, so ``--json`` output stays one event per line."""
        self._end_line()
        print(text, file=self.err, flush=True)

    def show(self, raw: str, event: dict) -> None:
        kind = event.get("type")
        if kind == "turn_begin":
            self._turn, self._emotion = event, "-"
            if event.get("onset_latency_ms") is not None:
                self.onsets_ms.append(event["onset_latency_ms"])
        elif kind == "emotion":
            self._emotion = event["emotion"]
        elif kind == "turn_end":
            self.num_turns += 1
        elif kind == "session.closed":
            self.closed = event
        elif kind == "decision":
            self.num_decisions += 1
        elif kind == "session.going_away":  # said when it comes, not only at the 1012 that follows
            self.note(f"the server is draining: this session ends within {event['deadline_s']:g} s (after the reply "
                      "in progress)")
        if kind == "decision" and not self.show_decisions:
            pass  # asked for by the client to pace itself, not by the user
        elif self.as_json:
            self._write(raw + "\n")
            if kind == "error":
                self._note_error(event)
        else:
            self._show_readable(kind, event)
        if kind == "turn_end":
            self._turn = None

    def _note_error(self, event: dict) -> None:
        if event.get("code") == "invalid_state" and "audio frame ignored" in str(event.get("message")):
            # A closing session (a drain, a close under way) refuses every frame the client still sends: say it
            # once, not a line per frame.
            if not self._told_audio_ignored:
                self._told_audio_ignored = True
                self.note(f"{describe_error(event)} (said once: the session is closing, the audio sent from now on "
                          "is not heard)")
            return
        self.note(describe_error(event))

    def start_session(self) -> None:
        """A new session after the last was lost: its turns count from 0 again."""
        self._end_line()
        self._turn = None
        self._told_audio_ignored = False
        self.num_sessions += 1

    def cut_reply(self) -> None:
        """The user stopped the client (Ctrl-C) during a reply: its line ends marked, and it is counted as cut."""
        if self._turn is None:
            return
        if not self.as_json:
            self._start_line()
            self._write("  [interrupted]")
            self._end_line()
        self.num_cut_turns += 1
        self._turn = None

    def print_summary(self, sent_s: float | None = None) -> None:
        if self.as_json:
            self.note(self.summary(sent_s))
        else:
            self._end_line()
            self._write(self.summary(sent_s) + "\n")

    def summary(self, sent_s: float | None = None) -> str:
        """Every session together: the chunks decided (as decision events came), the audio the client sent (the
        server's count where the client has none), the turns and their onsets."""
        if self.num_decisions or self.closed is None:
            chunks: int | str = self.num_decisions if sent_s is not None or self.num_decisions else "?"
        else:  # no decision events asked for: the last session's own count
            chunks = self.closed["num_chunks_decided"]
        if sent_s is None and self.closed is not None:
            sent_s = self.closed["audio_received_s"]
        sessions = f", {self.num_sessions} sessions" if self.num_sessions > 1 else ""
        audio = "" if sent_s is None else f" ({seconds_text(sent_s)} of audio sent{sessions})"
        onset = f"{sum(self.onsets_ms) / len(self.onsets_ms):.0f} ms" if self.onsets_ms else "n/a"
        if self.onsets_ms and self.faster_than_real_time:
            onset += " (audio sent faster than real time: onsets include the wait in the server's queue)"
        cut = f" and {self.num_cut_turns} cut short" if self.num_cut_turns else ""
        return f"summary: {chunks} chunks heard{audio}, {self.num_turns} turns{cut}, mean onset latency {onset}"

    def _show_readable(self, kind: str | None, event: dict) -> None:
        if kind == "emotion":
            self._start_line()
        elif kind == "text_delta":
            self._start_line()
            self._write(printable(event["text"]))
        elif kind == "turn_end":
            self._start_line()
            self._write("" if event["end_reason"] == "text_end" else f"  [{event['end_reason']}]")
            self._end_line()
        elif kind == "decision":
            self.note(f"chunk {event['chunk']} @ {event['audio_time_s']:.1f} s: {event['decision']}")
        elif kind == "error":
            self._note_error(event)
        elif kind == "context_rollover":
            self.note(f"context rebuilt: {event['from_positions']} -> {event['to_positions']} positions")

    def _start_line(self) -> None:
        # The line starts at the reply's first token (its emotion tag, when it has one) rather
        # than at turn_begin, so the emotion can go in the prefix.
        if self._turn is None or self._is_line_open:
            return
        onset = self._turn.get("onset_latency_ms")
        onset_text = "?" if onset is None else f"{onset:.0f}"
        self._write(f"[turn {self._turn['turn']} | {self._emotion} | onset {onset_text} ms] ")
        self._is_line_open = True

    def _end_line(self) -> None:
        if self._is_line_open:
            self._write("\n")
            self._is_line_open = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


# ---- resuming a dropped connection (docs/protocol.md, "Resuming a dropped connection: the client's side") ----

RESUME_FIRST_DELAY_S = 0.25  # then doubling, up to RESUME_MAX_DELAY_S, for as long as the server keeps the session
RESUME_MAX_DELAY_S = 4.0
NEW_SESSION_DELAY_S = 1.0  # before the first new-session attempt after "try again" (1013)
# An input.flush sent just before the drop is the one command whose arrival the replay cannot show: the
# server answers it only once the model has heard its silence. A server that had it is busy with it (its
# silence chunks produce decision events, and the client always asks for those), so one quiet this long,
# with no reply in progress, means the flush was lost and is sent again.
FLUSH_QUIET_S = 1.5
# How much audio past a chunk's end the server needs before it can decide that chunk: the log-mel's 40 samples
# (2.5 ms) of look-ahead, and a resampler's filter delay when the input is not at 16 kHz (soxr works in blocks:
# up to 0.12 s at 8 kHz, under 0.05 s at 22.05 to 48 kHz). The last chunk of a recording is decided only with
# the flush's silence, so the client never waits for that decision before it flushes.
DECIDE_LOOKAHEAD_S = 0.15
# While the client waits, a live server sends something all the time: a decision for every chunk it hears,
# text while it replies. This long without any event while connected means the answer is not coming.
SERVER_QUIET_LIMIT_S = 30.0
_SAME_AUDIO_S = 1e-6  # the client sums frame durations exactly as the server does; this only absorbs rounding


# How a resume refused for its rate says when to come back (api/admission.py).
RESUME_WAIT = re.compile(r"resume again in ([0-9.]+) s")


def _resume_url(url: str, session_id: str, token: str, last_seq: int) -> str:
    parts = urlsplit(url)
    query = "&".join(filter(None, [parts.query, urlencode({"resume": session_id, "token": token,
                                                            "last_seq": last_seq})]))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


@dataclass(eq=False)
class SentFrame:
    """One frame the client sent (or will send) in the current session, kept until the server is known to have it."""

    payload: bytes | str
    audio_start_s: float  # audio of this session before the frame (the scale of the server's audio_received_s)
    audio_end_s: float
    event_type: str | None = None  # a text frame's type; None for audio
    sample_rate_hz: int = 0  # audio: to cut a frame the server took only a part of
    bytes_per_sample: int = 0  # audio: one sample of every channel
    waiters: list[asyncio.Future] = field(default_factory=list)  # a command's callers, resolved by its answer
    is_answered: bool = False  # a command the server answered: it has this frame and every frame before it
    is_transmitted: bool = False  # handed to a socket at least once (the write may have failed)
    is_written: bool = False  # written to a socket at least once, and the write returned
    config_before: dict | None = None  # a session.configure: every earlier configure's fields, merged


@dataclass(frozen=True)
class ResendPlan:
    """What to re-send after a resume: ``Outbound.frames`` from its start, once it holds only what the server lacks."""

    lost_s: float  # audio it may not have that is no longer kept
    holds_flush: bool  # frames[0] is an input.flush the server may or may not have (see FLUSH_QUIET_S)


class Outbound:
    """What the client sent in its current session, in order, and what of it the server is known to have.

    The server takes frames in order and accepts audio frames whole: after a drop, what it has is a prefix,
    measured by ``audio_received_s`` (in ``session.resumed``) and by the commands it answered.
    """

    def __init__(self, retain_s: float) -> None:
        self.frames: deque[SentFrame] = deque()
        self.audio_s = 0.0  # audio of this session, summed frame by frame as the server sums it
        self.retain_s = retain_s
        self.unanswered: dict[str, deque[SentFrame]] = {"session.configure": deque(), "input.flush": deque()}
        self._newest_answered: SentFrame | None = None  # for trim: it and every frame before it can go

    def add_audio(self, pcm: bytes, duration_s: float, sample_rate_hz: int, bytes_per_sample: int) -> SentFrame:
        start_s = self.audio_s
        self.audio_s += duration_s
        frame = SentFrame(pcm, start_s, self.audio_s, None, sample_rate_hz, bytes_per_sample)
        self.frames.append(frame)
        return frame

    def add_event(self, event: dict, waiters: list[asyncio.Future] = ()) -> SentFrame:
        frame = SentFrame(json.dumps(event), self.audio_s, self.audio_s, event["type"], waiters=list(waiters))
        self.frames.append(frame)
        if frame.event_type in self.unanswered:
            self.unanswered[frame.event_type].append(frame)
        return frame

    def answer(self, event_type: str, answer: dict) -> None:
        """The server answered the oldest unanswered ``event_type`` command (it answers them in order)."""
        pending = self.unanswered[event_type]
        if pending:
            frame = pending.popleft()
            frame.is_answered = True
            self._newest_answered = frame
            for waiter in frame.waiters:
                _resolve(waiter, answer)

    def trim(self) -> None:
        """Forget frames the server certainly has, and audio older than a resume could ask for.

        A session waits ``resume_grace_s`` for its client and takes at most ``max_buffered_audio_s`` ahead of
        the model, so audio it has not accepted is never older than both together (``retain_s``).
        """
        # Looked for once per answer, not on every frame sent: a resume keeps thousands of frames.
        if self._newest_answered is not None and any(frame is self._newest_answered for frame in self.frames):
            while self.frames.popleft() is not self._newest_answered:
                pass
        self._newest_answered = None
        while (self.frames and self.frames[0].event_type is None
               and self.frames[0].audio_end_s < self.audio_s - self.retain_s):
            self.frames.popleft()

    def plan_resend(self, audio_received_s: float) -> ResendPlan:
        """After ``session.resumed`` and its replay: drop what the server has; where re-sending starts."""
        has = -1
        for index, frame in enumerate(self.frames):
            if frame.is_answered or (frame.event_type is None and frame.audio_end_s <= audio_received_s
                                     + _SAME_AUDIO_S):
                has = index
        for _ in range(has + 1):
            self.frames.popleft()
        kept_from_s = self.frames[0].audio_start_s if self.frames else self.audio_s
        lost_s = kept_from_s - audio_received_s if kept_from_s - audio_received_s > _SAME_AUDIO_S else 0.0
        first = self.frames[0] if self.frames else None
        if first is not None and first.event_type is None and first.audio_start_s + _SAME_AUDIO_S < audio_received_s:
            # The server took part of this frame (it accepts whole frames, so only a server that counts otherwise
            # gets here): re-send from the sample it stopped at.
            skip = round((audio_received_s - first.audio_start_s) * first.sample_rate_hz) * first.bytes_per_sample
            first.payload = first.payload[skip:]
            first.audio_start_s = audio_received_s
        # An unanswered configure was not processed (the server answers one at once), so neither was anything after
        # it; nor was anything after audio it did not accept. Only a flush leaves no trace until the model heard it.
        holds_flush = first is not None and first.event_type == "input.flush" and first.is_transmitted
        return ResendPlan(lost_s, holds_flush)


class StreamSession:
    """One conversation on ``/v1/stream`` seen from the client, across dropped connections.

    Every frame goes through an ``Outbound`` log. When the connection drops without a close frame (1006),
    ``receive_loop`` resumes the session on a new connection, reads the events the client missed, and
    re-sends what the server did not have; when the session is gone (4009, a drain's 1012, a restart's 1001,
    1013) it starts a new one with the same settings, trying a busy or restarting server for up to
    ``busy_retry_s``. Meanwhile the sender's frames wait in the log.
    """

    def __init__(self, url: str, api_key: str | None, websocket: ClientConnection, console: ReplyConsole,
                 created: dict, busy_retry_s: float = DEFAULT_BUSY_RETRY_S) -> None:
        self.url, self.api_key, self.console = url, api_key, console
        self.busy_retry_s = busy_retry_s
        self.websocket = websocket
        self.config: dict = {}  # every configure's fields, merged: what a new session is told before anything else
        self.audio_format = {"sample_format": "pcm_s16le", "sample_rate_hz": 16_000, "num_channels": 1}
        self.sent_s = 0.0  # audio handed to send_pcm, all sessions together
        self.transmitted_s = 0.0  # of it, what was written to a socket (the summary's "audio sent")
        self.heard_s = 0.0  # how far the model has heard, on the same scale
        self.is_closing = False  # session.close was sent
        self.num_resumes = 0
        self.num_new_sessions = 0
        self.gave_up = False  # a lost session could not be replaced by a new one (said so as an error)
        self.input_error: InputError | None = None  # the input failed mid-stream: what was sent is heard, then exit 2
        self._connected = True  # False while reconnecting: frames wait in the outbound log
        self._progress = asyncio.Event()  # set by every event: whoever waits looks again
        self._num_configures = 0
        self._last_event_s = 0.0
        self._settling: asyncio.Task | None = None
        self._begin(created)

    def _begin(self, created: dict) -> None:
        """A session starts (the first, or a new one after the last was lost)."""
        self.created = created
        self.session_id: str = created["session_id"]
        self.resume_token: str | None = created.get("resume_token")
        self.resume_grace_s: float = created.get("resume_grace_s") or 0.0
        # Sending more than the server buffers gets frames refused (audio_buffer_full), so the
        # sender keeps at most half of that ahead of what the model has heard; but at least two
        # chunks, or the model could never hear a chunk together with its look-ahead.
        limits = created["limits"]
        self.chunk_s = limits["chunk_s"]
        self.max_ahead_s = max(limits["max_buffered_audio_s"] / 2, 2 * self.chunk_s)
        self.outbound = Outbound(self.resume_grace_s + limits["max_buffered_audio_s"])
        self.last_seq = 0
        self.closed: dict | None = None  # this session's session.closed
        self.saw_fatal_error = False
        self._stream_base_s = self.sent_s  # the new session's stream time 0, on the sent_s scale
        self.heard_s = self.sent_s
        self._is_reply_open = False
        self._last_event_s = asyncio.get_running_loop().time()  # its session.created, just read
        self._progress.set()

    # ---- what the sender calls ---------------------------------------------------------------

    async def configure(self, **fields: Any) -> dict:
        """Send ``session.configure`` and wait for its answer; ``ClientError`` if it is refused."""
        self._num_configures += 1
        answer_future = asyncio.get_running_loop().create_future()
        previous = dict(self.config)
        self.config.update(fields)
        frame = self.outbound.add_event({"type": "session.configure", "event_id": f"configure-{self._num_configures}",
                                         **fields}, [answer_future])
        frame.config_before = previous
        await self._send(frame)
        if "audio" in fields:  # the frames after this one are in that format, whatever the answer
            self.audio_format = fields["audio"]
        answer = await self._answer(answer_future, "the answer to session.configure")
        if answer["type"] == "error":
            self.config = previous  # a refused change must not be told to a new session
            raise ClientError(f"session.configure {fields} was refused: {answer['message']}")
        return answer

    async def keep_alive(self) -> None:
        """An empty audio frame: it holds no audio, but it is a frame, so the server's idle timeout
        (``limits.idle_timeout_s``) does not close a session that waits before it streams. Not kept for a resume."""
        if self._connected:
            try:
                await self.websocket.send(b"")
            except ConnectionClosed:
                pass  # the receive loop sees the close too, and recovers

    async def send_pcm(self, pcm: bytes, duration_s: float) -> None:
        while self.sent_s - self.heard_s > self.max_ahead_s:
            await self._next_event(f"the model to hear more of the audio ({self.heard_s:.2f} s of {self.sent_s:.2f} "
                                   "s heard) before sending more")
        rate_hz, num_channels = self.audio_format["sample_rate_hz"], self.audio_format["num_channels"]
        sample_bytes = 4 if self.audio_format["sample_format"] == "pcm_f32le" else 2
        self.sent_s += duration_s
        await self._send(self.outbound.add_audio(pcm, duration_s, rate_hz, sample_bytes * num_channels))

    async def flush(self) -> dict:
        """``input.flush``, then wait until the model heard everything and its reply ended.

        The flush's silence counts against the server's audio buffer, so it is sent once the model has
        heard every chunk it can decide without it: all but the last (its decision needs the look-ahead
        that only the silence brings), or whatever it has heard when the server goes quiet (an input rate
        whose resampler holds back more than ``DECIDE_LOOKAHEAD_S``). A refusal all the same is a
        ``ClientError``; so is a server that sends nothing for ``SERVER_QUIET_LIMIT_S``.
        """
        while self.sent_s - self.heard_s >= self.chunk_s + DECIDE_LOOKAHEAD_S and not self._is_quiet(FLUSH_QUIET_S):
            await self._next_event(f"the model to hear the audio before input.flush ({self.heard_s:.2f} s of "
                                   f"{self.sent_s:.2f} s heard)", FLUSH_QUIET_S)
        answer_future = asyncio.get_running_loop().create_future()
        await self._send(self.outbound.add_event({"type": "input.flush"}, [answer_future]))
        answer = await self._answer(answer_future, "input.flushed (the model hearing the end of the audio and "
                                    "finishing its reply)")
        if answer["type"] == "error":
            raise ClientError(f"input.flush was refused: {answer['message']}")
        return answer

    def _is_quiet(self, quiet_s: float) -> bool:
        """Connected, no reply in progress, and no event for ``quiet_s``: the model has nothing more to say."""
        since_s = asyncio.get_running_loop().time() - self._last_event_s
        return self._connected and not self._is_reply_open and since_s >= quiet_s

    def check_server_alive(self, what: str) -> float:
        """Seconds the server may still stay quiet; ``ClientError`` naming ``what`` once it has been quiet too long.

        While reconnecting, the resume or the new session keeps its own deadlines: there is no limit here.
        """
        quiet_s = asyncio.get_running_loop().time() - self._last_event_s
        if not self._connected:
            return 1.0  # look again after a second
        if quiet_s >= SERVER_QUIET_LIMIT_S:
            raise ClientError(f"the server sent nothing for {quiet_s:.0f} s while this client waited for {what}")
        return SERVER_QUIET_LIMIT_S - quiet_s

    async def _next_event(self, what: str, timeout_s: float = SERVER_QUIET_LIMIT_S) -> None:
        """Until the server's next event or a new connection, at most ``timeout_s``; the caller looks again."""
        time_left_s = self.check_server_alive(what)
        self._progress.clear()
        # asyncio.wait, not wait_for: Python 3.11's wait_for returns the event's result when a cancel comes as the
        # event fires, so a sender cancelled then (its receiver died: a closed stdout) paced on until the quiet limit.
        progress = asyncio.ensure_future(self._progress.wait())
        try:
            done, _ = await asyncio.wait([progress], timeout=min(timeout_s, time_left_s))
        finally:
            progress.cancel()
        if not done:
            self.check_server_alive(what)

    async def _answer(self, answer: asyncio.Future, what: str) -> dict:
        """A command's answer, which the receive loop resolves; ``ClientError`` when the server stays quiet."""
        while not answer.done():
            await asyncio.wait([answer], timeout=self.check_server_alive(what))
        return answer.result()

    async def send_event(self, event: dict) -> None:
        if event.get("type") == "session.close":
            self.is_closing = True
            # Its answer gets a quiet limit of its own: a client that gave up on a quiet server waited its limit out.
            self._last_event_s = asyncio.get_running_loop().time()
        await self._send(self.outbound.add_event(event))

    async def _write(self, websocket: ClientConnection, frame: SentFrame) -> None:
        """``frame`` to ``websocket`` (``ConnectionClosed`` if it is gone); its audio counts as sent the first time a
        write of it returns, not when it is offered: a client whose server was gone goes on pacing into the log."""
        frame.is_transmitted = True
        await websocket.send(frame.payload)
        if not frame.is_written:
            frame.is_written = True
            self.transmitted_s += frame.audio_end_s - frame.audio_start_s

    async def _send(self, frame: SentFrame) -> None:
        if not self._connected:
            return  # kept in the log: the resume (or the new session) sends it
        websocket = self.websocket
        try:
            await self._write(websocket, frame)
        except ConnectionClosed:
            if websocket is self.websocket:  # not an old socket's send failing after a resume
                self._connected = False  # the receive loop sees the close too, and recovers
            return
        if websocket is self.websocket and self._connected:  # never while a resume re-sends the log by index
            self.outbound.trim()

    # ---- receiving, and recovering from a dropped connection -------------------------------------

    async def receive_loop(self) -> None:
        """Until the conversation ends; resolves what the sender waits on, resumes after a drop."""
        while True:
            try:
                async for raw in self.websocket:
                    if isinstance(raw, str):
                        self._on_event(raw)
            except ConnectionClosed:
                pass
            self._connected = False
            if self._settling is not None:
                self._settling.cancel()
                self._settling = None
            if not await self._recover():
                return

    def _on_event(self, raw: str) -> None:
        event = json.loads(raw)
        seq = event.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return  # seen already (a server replays only what follows last_seq; this is a safeguard)
            self.last_seq = seq
        self._last_event_s = asyncio.get_running_loop().time()
        self._progress.set()
        self.console.show(raw, event)
        kind = event.get("type")
        if kind == "decision":
            self.heard_s = self._stream_base_s + event["audio_time_s"]
        elif kind == "session.updated" or (kind == "error" and event.get("event_type") == "session.configure"):
            self.outbound.answer("session.configure", event)
        elif kind == "input.flushed" or (kind == "error" and event.get("event_type") == "input.flush"):
            self.outbound.answer("input.flush", event)
        elif kind in ("turn_begin", "turn_end"):
            self._is_reply_open = kind == "turn_begin"
        elif kind == "session.closed":
            self.closed = event
        if kind == "error" and event.get("is_fatal"):
            self.saw_fatal_error = True

    async def _recover(self) -> bool:
        """After a connection ended: whether the conversation goes on (resumed, or in a new session)."""
        code, reason = self.websocket.close_code, self.websocket.close_reason or ""
        if self.closed is not None:  # the session ended on the server; the close code says whether to go on
            if code == 1012 and not self.is_closing:  # a drain: another replica takes a new session
                return await self._new_session(f"the server drains ({describe_close(code, reason)})")
            if code == 1001 and not self.is_closing:  # a stop without a drain: a restart, or another replica
                return await self._new_session(f"the server stopped ({describe_close(code, reason)})")
            return False
        if code == 1006 and self.resume_token:  # no close frame: the network dropped, the session waits for us
            return await self._resume(code, reason)
        if code == 1013 and not self.is_closing:
            return await self._new_session(describe_close(code, reason), delay_s=NEW_SESSION_DELAY_S)
        return False  # 1000, a refusal (1008), resumed elsewhere (4010), a limit...: nothing to retry

    async def _resume(self, code: int, reason: str) -> bool:
        loop = asyncio.get_running_loop()
        # The server started its grace period when it saw the drop, about when we did.
        deadline_s = loop.time() + self.resume_grace_s
        url = _resume_url(endpoint_url(self.url, "/v1/stream"), self.session_id, self.resume_token or "",
                          self.last_seq)
        attempt, why, asked_delay_s = 0, describe_close(code, reason), None
        while True:
            attempt += 1
            delay_s = asked_delay_s or min(RESUME_MAX_DELAY_S, RESUME_FIRST_DELAY_S * 2 ** (attempt - 1))
            asked_delay_s = None
            if loop.time() + delay_s >= deadline_s:
                self.console.note(f"could not resume session {self.session_id} within its {self.resume_grace_s:g} s "
                                  "grace period")
                break
            self.console.note(f"connection lost ({why}); resuming session {self.session_id} in {delay_s:.2f} s "
                              f"(attempt {attempt})")
            await asyncio.sleep(delay_s)
            try:
                websocket = await open_websocket(url, self.api_key,
                                                 open_timeout_s=max(1.0, min(10.0, deadline_s - loop.time())))
            except ClientError as error:
                why = str(error)
                continue
            try:
                raw = await websocket.recv()
            except asyncio.CancelledError:  # this connection may have resumed the session: close it, not drop it
                await _close_on_cancel(websocket)
                raise
            except ConnectionClosed:
                why = describe_close(websocket.close_code, websocket.close_reason or "")
                continue
            first = json.loads(raw)
            if first.get("type") == "session.resumed":
                await self._resumed(websocket, raw, first)
                return True
            if first.get("code") == "rate_limited" and (wait := RESUME_WAIT.search(first.get("message", ""))):
                # Resumed too often (docs/protocol.md): the session waits for us; again when the server says.
                asked_delay_s = float(wait.group(1))
                self.console.note(f"the server asks to resume session {self.session_id} again in {asked_delay_s:g} s")
            else:
                self.console.show(raw, first)  # the refusal (an error event), shown as such
            await websocket.wait_closed()
            code = websocket.close_code
            why = describe_close(code, websocket.close_reason or "")
            if code == 4010 or first.get("code") == "session_resumed_elsewhere":
                self.console.note("another connection resumed this session: this client stops")
                return False
            if code == 4009:  # expired, refused, or a restarted server: the session is gone
                break
            if code == 1008:  # the key or origin is refused: retrying cannot help
                self.console.note(why)
                return False
        if self.is_closing:
            self.console.note("the connection dropped while the session was closing; it is over")
            return False
        return await self._new_session(f"session {self.session_id} could not be resumed")

    async def _resumed(self, websocket: ClientConnection, raw: str, resumed: dict) -> None:
        """Replay what we missed, then re-send what the server does not have."""
        self.console.show(raw, resumed)
        self.websocket = websocket
        self.num_resumes += 1
        self._last_event_s = asyncio.get_running_loop().time()
        try:
            for _ in range(resumed["num_replayed"]):
                message = await websocket.recv()
                if isinstance(message, str):
                    self._on_event(message)
        except ConnectionClosed:
            return  # dropped again: the receive loop sees it and resumes once more
        plan = self.outbound.plan_resend(resumed["audio_received_s"])
        if plan.lost_s:
            self.console.note(f"{plan.lost_s:.2f} s of audio the server did not get was no longer kept and is lost")
        done = f"resumed session {self.session_id}: {resumed['num_replayed']} events replayed"
        if plan.holds_flush:
            self.console.note(f"{done}; waiting to see whether the server got the input.flush sent before the drop")
            self._settling = asyncio.create_task(self._settle_flush(websocket, self.outbound.frames[0]))
            return
        resent_s = await self._resend(websocket)
        self.console.note(f"{done}, re-sent {resent_s:.2f} s of audio")

    async def _settle_flush(self, websocket: ClientConnection, flush: SentFrame) -> None:
        loop = asyncio.get_running_loop()
        self._last_event_s = loop.time()
        answered = loop.create_future()  # wakes us at the answer, not at the next look
        flush.waiters.append(answered)
        try:
            while not flush.is_answered:
                quiet_s = loop.time() - self._last_event_s
                if quiet_s >= FLUSH_QUIET_S and not self._is_reply_open:
                    break
                await asyncio.wait([answered], timeout=max(0.05, FLUSH_QUIET_S - quiet_s))
        finally:  # also when a new drop cancels us: the next resume plans afresh
            flush.waiters.remove(answered)
        if flush.is_answered:
            self.outbound.frames.popleft()  # answered: the server had it, and every frame before it
            what = "the server had the input.flush"
        else:
            what = "the server did not get the input.flush: sent again"
        self._settling = None
        resent_s = await self._resend(websocket)
        self.console.note(f"{what}; re-sent {resent_s:.2f} s of audio")

    async def _resend(self, websocket: ClientConnection) -> float:
        """Send every frame in the log, in order, then let the sender's frames go out directly again."""
        resent_s, index = 0.0, 0
        try:
            # By index, to the end as it is then: the sender may add frames while we send (they wait in the log).
            while index < len(self.outbound.frames):
                frame = self.outbound.frames[index]
                await self._write(websocket, frame)
                resent_s += frame.audio_end_s - frame.audio_start_s
                index += 1
        except ConnectionClosed:
            return resent_s  # dropped again: the receive loop recovers once more
        if websocket is self.websocket:
            self._connected = True  # no await since the loop saw the log's end: no frame can slip in between
            self.outbound.trim()
        return resent_s

    async def _new_session(self, why: str, delay_s: float = 0.0) -> bool:
        """The session is gone: a new one, told the same settings, then the frames the old one never got. A busy
        or restarting server (1013, 503, not listening yet) is tried again for up to ``busy_retry_s``, as at start."""
        endpoint = endpoint_url(self.url, "/v1/stream")
        self.console.note(f"{why}: starting a new session" + (f" in {delay_s:.1f} s" if delay_s else ""))
        await asyncio.sleep(delay_s)
        try:
            websocket, raw = await retry_while_busy(lambda: _open_session(endpoint, self.api_key, after_a_session=True),
                                                    self.busy_retry_s, self.console.note, served_before=True)
        except ClientError as error:
            self.console.note(f"error: no new session: {error}")
            self.gave_up = True
            return False
        created = json.loads(raw)
        self.console.show(raw, created)
        if created.get("type") != "session.created":  # a refusal that is no "try again" (the key, the origin)
            self.console.note(describe_close(websocket.close_code, websocket.close_reason or ""))
            return False
        old = self.outbound
        self.num_new_sessions += 1
        self._begin(created)
        self.websocket = websocket
        self.console.start_session()
        self.console.note(f"session: {self.session_id} (new; the old session's unheard audio is not sent again)")
        # The settings first, answering whatever configure the old session left unanswered; then the flushes it
        # left unanswered (their callers still wait); then what was never sent at all, in order.
        configures = [f for f in old.unanswered["session.configure"] if f.is_transmitted]
        # The settings as of the first frame never sent: a configure still waiting in the log (the sender blocks on
        # its answer, so it is often the log's last frame) follows audio in the format before it. Told its fields
        # first, the new session read that audio in the next file's format (16 kHz speech heard as 44.1 kHz).
        pending = next((f for f in old.frames if not f.is_transmitted and f.config_before is not None), None)
        self._num_configures += 1
        self.outbound.add_event({"type": "session.configure", "event_id": f"configure-{self._num_configures}",
                                 **(pending.config_before if pending is not None else self.config)},
                                [w for f in configures for w in f.waiters])
        for frame in old.unanswered["input.flush"]:
            if frame.is_transmitted:
                self.outbound.add_event(json.loads(frame.payload), frame.waiters)
        for frame in old.frames:
            if frame.is_transmitted:
                continue
            if frame.event_type is None:
                self.outbound.add_audio(frame.payload, frame.audio_end_s - frame.audio_start_s, frame.sample_rate_hz,
                                        frame.bytes_per_sample)
            else:
                self.outbound.add_event(json.loads(frame.payload), frame.waiters)
        # That audio was counted in sent_s when the sender offered it: the new session's stream begins before it.
        self._stream_base_s = self.heard_s = self.sent_s - self.outbound.audio_s
        await self._resend(websocket)
        return True


def _resolve(future: asyncio.Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


SendAudio = Callable[[StreamSession], Awaitable[None]]


async def run_stream(url: str, api_key: str | None, console: ReplyConsole, send_audio: SendAudio,
                     busy_retry_s: float = DEFAULT_BUSY_RETRY_S) -> int:
    """Open a session (a busy server is tried again for up to ``busy_retry_s``), run ``send_audio`` while
    receiving, flush, close; the exit status."""
    endpoint = endpoint_url(url, "/v1/stream")
    websocket, raw_first = await retry_while_busy(lambda: _open_session(endpoint, api_key), busy_retry_s,
                                                  console.note)
    first = json.loads(raw_first)
    console.show(raw_first, first)  # with --json, session.created is an event like any other
    if first.get("type") != "session.created":
        if first.get("type") != "error":  # an error was shown as one already
            console.note(f"unexpected event: {first}")
        console.note(describe_close(websocket.close_code, websocket.close_reason or ""))
        return EXIT_FAILED
    console.note(f"session: {first['session_id']}")
    demo = " (demo model: its replies are random noise)" if first.get("is_demo") else ""
    console.note(f"model: {first['model']}{demo}")
    session = StreamSession(url, api_key, websocket, console, first, busy_retry_s)
    try:
        return await _converse(session, send_audio)
    finally:
        await session.websocket.close()  # a no-op after the server's close


async def _close_on_cancel(websocket: ClientConnection) -> None:
    """Close a connection its opener was cancelled on (Ctrl-C, SIGTERM) with 1000, so that the session it opened or
    resumed ends on the server rather than waiting detached for a resume; bounded, as a second signal may be near."""
    try:
        async with asyncio.timeout(2.0):
            await websocket.close()
    except (TimeoutError, ConnectionClosed, OSError):
        pass


async def _close_once_open(opening: asyncio.Future) -> None:
    """A handshake its opener was cancelled during: the server may have accepted it and opened a session already,
    its answer on the way. One that completes within a second is closed with 1000 (``_close_on_cancel``); else it
    is given up (cancelled), and the server sees the connection drop."""
    try:
        async with asyncio.timeout(1.0):
            websocket = await asyncio.shield(opening)
    except (TimeoutError, ClientError, OSError):
        opening.cancel()
        return
    except asyncio.CancelledError:  # a second signal: no more waiting
        opening.cancel()
        raise
    await _close_on_cancel(websocket)


async def _open_session(endpoint: str, api_key: str | None, after_a_session: bool = False
                        ) -> tuple[ClientConnection, str]:
    """The connection and its first event (``session.created``, or a refusal once the server has closed);
    ``ServerBusy`` for a refusal that says "try again" (close 1013). ``after_a_session``: this URL served a
    session, so a handshake dropped unanswered is a server stopping or restarting (not TLS): tried again too."""
    opening = asyncio.ensure_future(open_websocket(endpoint, api_key))
    try:
        websocket = await asyncio.shield(opening)
    except HandshakeDropped:
        if not after_a_session:
            raise
        raise ServerBusy(f"{DROPPED} at {shown_url(endpoint)}", state="stopping or restarting") from None
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM mid-handshake: the server may have opened the session
        await _close_once_open(opening)
        raise
    try:
        raw_first = await websocket.recv()
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM before session.created: the session is ours to close
        await _close_on_cancel(websocket)
        raise
    except ConnectionClosed:
        if websocket.close_code == 1013:
            raise ServerBusy(websocket.close_reason or "close 1013") from None
        raise ClientError(describe_close(websocket.close_code, websocket.close_reason or "")) from None
    first = json.loads(raw_first)
    if first.get("type") != "session.created":  # a refusal: the close follows at once
        try:
            async with asyncio.timeout(SERVER_QUIET_LIMIT_S):  # not wait_for, which can lose a cancel on 3.11
                await websocket.wait_closed()
        except TimeoutError:
            await websocket.close()
        if websocket.close_code == 1013:
            raise ServerBusy(f"{first['code']}: {first['message']}" if first.get("type") == "error"
                             else websocket.close_reason or "close 1013")
    return websocket, raw_first


async def _converse(session: StreamSession, send_audio: SendAudio) -> int:
    console = session.console
    receiver = asyncio.create_task(session.receive_loop())
    sender = asyncio.create_task(_send_then_close(session, send_audio))
    failure: str | None = None
    try:
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels the main task first)
        for task in (receiver, sender):  # both end before the summary, so nothing they show follows it
            task.cancel()
        await asyncio.gather(receiver, sender, return_exceptions=True)
        console.cut_reply()
        console.print_summary(session.transmitted_s)  # the open line ended, and what was heard so far
        raise
    if not sender.done():  # the server ended the session first: stop sending
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    elif sender.exception() is not None:
        error = sender.exception()
        if not isinstance(error, ClientError):
            receiver.cancel()
            raise error
        failure = str(error)
        console.note(failure)  # now: why the client gives up, whatever becomes of the close
        await session.send_event({"type": "session.close"})  # end the session cleanly all the same
    while not receiver.done():  # the server answers session.close with session.closed, then closes
        try:
            time_left_s = session.check_server_alive("the server to close the session after session.close")
        except ClientError:
            receiver.cancel()
            raise
        await asyncio.wait([receiver], timeout=time_left_s)
    await receiver
    code, reason = session.websocket.close_code, session.websocket.close_reason or ""
    if code != 1000 and not session.gave_up:  # else the old close was said already, and the last word is why
        console.note(describe_close(code, reason))
    console.print_summary(session.transmitted_s)
    is_ok = code == 1000 and not session.saw_fatal_error and failure is None
    if session.input_error is not None and failure is None:  # the input's own fault: said last
        print(f"error: {session.input_error}", file=sys.stderr, flush=True)
        return EXIT_USAGE if is_ok else EXIT_FAILED  # a bad input's status, unless the server failed as well
    return EXIT_OK if is_ok else EXIT_FAILED


async def _send_then_close(session: StreamSession, send_audio: SendAudio) -> None:
    # Decision events tell the sender how far the model has heard (see StreamSession.send_pcm); after a drop,
    # they also show whether the server had a flush (FLUSH_QUIET_S).
    await session.configure(decision_events=True)
    try:
        await send_audio(session)
    except InputError as error:  # what was sent before it is the user's audio all the same: heard, then closed
        session.input_error = error
        session.console.note(f"{error}: stopped sending; the audio sent before it is heard, then the session closes")
    await session.flush()
    await session.send_event({"type": "session.close"})


class Terminated(Exception):
    """SIGTERM ended the script, after the same clean end as Ctrl-C (``until_sigterm``)."""


async def until_sigterm(coroutine: Awaitable[int], before_second_sigterm: Callable[[], None] | None = None) -> int:
    """``coroutine``, ended by SIGTERM as by the first Ctrl-C, then ``Terminated``; a second SIGTERM ends the process
    at once, as a supervisor means, ``before_second_sigterm`` run first (what must not outlive the script: a process
    of its own that no signal to the script reaches).

    Both cancel the main task: the scripts' cancel paths close what they opened (``_converse`` cuts the open reply
    line, prints the summary, and ``run_stream`` closes the socket with 1000, which ends the session on the server;
    a subscriber only closes its subscription). Unhandled, SIGTERM ended the process at once: no close frame, so
    the session stayed detached for its resume grace and its subscribers waited that long.
    """
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    is_terminated = False

    def terminate_at_once() -> None:
        try:
            if before_second_sigterm is not None:
                before_second_sigterm()
        finally:  # whatever it raised, the process ends
            loop.remove_signal_handler(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # the default action: the process ends here

    def terminate() -> None:
        nonlocal is_terminated
        is_terminated = True
        loop.add_signal_handler(signal.SIGTERM, terminate_at_once)
        main_task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError):  # Windows loops take no signal handlers; nor a thread's own loop
        return await coroutine
    try:
        result = await coroutine
    except asyncio.CancelledError:
        if is_terminated:
            raise Terminated from None
        raise  # Ctrl-C: asyncio.run makes it KeyboardInterrupt
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    if is_terminated:  # the cancel came as it ended, and was absorbed: SIGTERM stopped it all the same
        raise Terminated
    return result


def run_main(coroutine: Awaitable[int], err: TextIO = sys.stderr,
             before_second_sigterm: Callable[[], None] | None = None) -> int:
    """``asyncio.run`` with the scripts' error reporting: one line, a non-zero status (``until_sigterm`` says what
    ``before_second_sigterm`` is for)."""
    # Replies can hold any character; a console that cannot show one must not end the session.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(until_sigterm(coroutine, before_second_sigterm))
    except Terminated:
        print("terminated", file=err)
        return EXIT_TERMINATED
    except ClientError as error:
        print(f"error: {error}", file=err)
        return EXIT_FAILED
    except BrokenPipeError:  # the reader took what it wanted (`--json | head -2`): stop quietly
        # Output still buffered would raise again as the interpreter flushes it at exit: stdout now writes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_STDOUT_CLOSED
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130


if __name__ == "__main__":  # a helper module of the other scripts, not a client of its own
    print("ais_client.py is the helper the client examples share: run stream_file.py, microphone.py or "
          "tts_subscriber.py (client_examples/README.md)", file=sys.stderr)
    sys.exit(EXIT_USAGE)
