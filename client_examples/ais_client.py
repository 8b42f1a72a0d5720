"""The client side of the Audio-Interaction streaming protocol, shared by the example scripts.

Deliberately independent of the ``server`` package (only ``websockets`` is needed), so the
examples run from any machine. The protocol is described in docs/protocol.md.

Concurrency: one task receives (``StreamSession.receive_loop``) and one sends; the sender
waits on futures and events that only the receive loop resolves, so whoever runs both must
cancel the sender when the receive loop ends (``run_stream`` does).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# What a close code means to someone running the examples (docs/protocol.md, "Close codes").
CLOSE_MEANINGS = {
    1001: "the server is shutting down",
    1008: "refused: check --api-key (or the allowed origins), or the session options",
    1011: "the model failed on the server",
    1013: "the server is at capacity or not ready yet: retry later",
    4000: "idle timeout: no audio or event from the client for too long",
    4001: "session limit reached (max_session_s or the model's context)",
    4004: "no open session with that id",
    4008: "this client did not read its events fast enough",
}


# Control characters in a reply (line breaks, carriage returns, terminal escapes) would break the
# one-line-per-reply layout or drive the terminal; they are shown as spaces.
_UNPRINTABLE = {code: " " for code in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029] if code != 0x09}


def printable(text: str) -> str:
    return text.translate(_UNPRINTABLE)


class ClientError(Exception):
    """A failure the scripts report as one readable line, then exit non-zero."""


# The server's own endpoints (and their /v1 root), at the end of a URL's path: whatever comes
# before them is a reverse-proxy prefix, so pasting any endpoint's URL works for every script.
_API_PATH = re.compile(r"/v1(/stream|/sessions/[^/]+/events)?/*$")


def endpoint_url(base_url: str, path: str) -> str:
    """``ws://host:port[/prefix]`` (http(s), or any endpoint's full URL, accepted) -> that server's ``path``."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ClientError(f"not a server URL: {base_url!r} (expected ws://HOST:PORT)")
    prefix = _API_PATH.sub("", parts.path).rstrip("/")
    return urlunsplit((scheme, parts.netloc, prefix + path, parts.query, ""))


def default_api_key() -> str | None:
    # The server reads the same variable, so one export serves both on a demo machine,
    # and the key stays out of the process list.
    return os.environ.get("AIS_API_KEY")


async def open_websocket(url: str, api_key: str | None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        # Per-message deflate costs more than it saves on small, frequent frames.
        return await connect(url, additional_headers=headers, compression=None, max_size=None, open_timeout=15)
    except InvalidURI as error:
        raise ClientError(f"bad URL {url!r}: {error}") from None
    except (OSError, InvalidHandshake, TimeoutError) as error:
        raise ClientError(f"cannot connect to {url}: {error or type(error).__name__}") from None


def describe_close(code: int | None, reason: str = "") -> str:
    meaning = CLOSE_MEANINGS.get(code or 0, "the connection ended abnormally" if code in (None, 1006) else "")
    return f"connection closed with code {code}" + (f": {meaning}" if meaning else "") + \
        (f" ({reason})" if reason else "")


def describe_error(event: dict) -> str:
    fatal = " (fatal)" if event.get("is_fatal") else ""
    return f"server error {event.get('code')}{fatal}: {event.get('message')}"


class ReplyConsole:
    """Shows a session's events: each reply on one line that grows with its text, or raw JSON lines."""

    def __init__(self, as_json: bool = False, show_decisions: bool = False,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.as_json, self.show_decisions = as_json, show_decisions
        self.out, self.err = out, err
        self.num_turns = 0
        self.onsets_ms: list[float] = []
        self.closed: dict | None = None
        self._turn: dict | None = None  # the open reply's turn_begin
        self._emotion = "-"
        self._is_line_open = False

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
        if kind == "decision" and not self.show_decisions:
            pass  # asked for by the client to pace itself, not by the user
        elif self.as_json:
            self._write(raw + "\n")
            if kind == "error":
                self.note(describe_error(event))
        else:
            self._show_readable(kind, event)
        if kind == "turn_end":
            self._turn = None

    def print_summary(self) -> None:
        if self.as_json:
            self.note(self.summary())
        else:
            self._end_line()
            self._write(self.summary() + "\n")

    def summary(self) -> str:
        chunks = "?" if self.closed is None else self.closed["num_chunks_decided"]
        audio = "" if self.closed is None else f" ({self.closed['audio_received_s']:.1f} s of audio sent)"
        onset = f"{sum(self.onsets_ms) / len(self.onsets_ms):.0f} ms" if self.onsets_ms else "n/a"
        return f"summary: {chunks} chunks heard{audio}, {self.num_turns} turns, mean onset latency {onset}"

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
            self.note(describe_error(event))
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


class StreamSession:
    """One ``/v1/stream`` session seen from the client."""

    def __init__(self, websocket: ClientConnection, console: ReplyConsole, created: dict) -> None:
        self.websocket, self.console, self.created = websocket, console, created
        self.session_id: str = created["session_id"]
        # Sending more than the server buffers gets frames refused (audio_buffer_full), so the
        # sender keeps at most half of that ahead of what the model has heard; but at least two
        # chunks, or the model could never hear a chunk together with its look-ahead.
        limits = created["limits"]
        self.chunk_s = limits["chunk_s"]
        self.max_ahead_s = max(limits["max_buffered_audio_s"] / 2, 2 * self.chunk_s)
        self.sent_s = 0.0
        self.heard_s = 0.0
        self.saw_fatal_error = False
        self._progress = asyncio.Event()
        self._configure_answer: asyncio.Future | None = None
        self._flushed: asyncio.Future | None = None
        self._num_configures = 0

    async def configure(self, **fields: Any) -> dict:
        """Send ``session.configure`` and wait for its answer; ``ClientError`` if it is refused."""
        self._num_configures += 1
        event_id = f"configure-{self._num_configures}"
        self._configure_answer = asyncio.get_running_loop().create_future()
        await self.send_event({"type": "session.configure", "event_id": event_id, **fields})
        answer = await self._configure_answer
        if answer["type"] == "error":
            raise ClientError(f"session.configure {fields} was refused: {answer['message']}")
        return answer

    async def send_pcm(self, pcm: bytes, duration_s: float) -> None:
        while self.sent_s - self.heard_s > self.max_ahead_s:
            self._progress.clear()
            await self._progress.wait()
        await self.websocket.send(pcm)
        self.sent_s += duration_s

    async def flush(self) -> dict:
        """``input.flush``, then wait until the model heard everything and its reply ended.

        The flush's silence counts against the server's audio buffer, so it is sent once the model
        has heard every whole chunk already sent; a refusal all the same is a ``ClientError``.
        """
        while self.sent_s - self.heard_s >= self.chunk_s - 1e-6:
            self._progress.clear()
            await self._progress.wait()
        self._flushed = asyncio.get_running_loop().create_future()
        await self.send_event({"type": "input.flush"})
        answer = await self._flushed
        if answer["type"] == "error":
            raise ClientError(f"input.flush was refused: {answer['message']}")
        return answer

    async def send_event(self, event: dict) -> None:
        await self.websocket.send(json.dumps(event))

    async def receive_loop(self) -> None:
        """Until the server closes the connection; resolves what the sender waits on."""
        try:
            while True:
                raw = await self.websocket.recv()
                if isinstance(raw, str):
                    self._on_event(raw)
        except ConnectionClosed:
            return

    def _on_event(self, raw: str) -> None:
        event = json.loads(raw)
        self.console.show(raw, event)
        kind = event.get("type")
        if kind == "decision":
            self.heard_s = event["audio_time_s"]
            self._progress.set()
        elif kind == "session.updated" or (kind == "error" and event.get("event_type") == "session.configure"):
            _resolve(self._configure_answer, event)
        elif kind == "input.flushed" or (kind == "error" and event.get("event_type") == "input.flush"):
            _resolve(self._flushed, event)
        if kind == "error" and event.get("is_fatal"):
            self.saw_fatal_error = True


def _resolve(future: asyncio.Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


SendAudio = Callable[[StreamSession], Awaitable[None]]


async def run_stream(url: str, api_key: str | None, console: ReplyConsole, send_audio: SendAudio) -> int:
    """Open a session, run ``send_audio`` while receiving, flush, close; the exit status."""
    websocket = await open_websocket(endpoint_url(url, "/v1/stream"), api_key)
    async with websocket:
        try:
            raw_first = await websocket.recv()
        except ConnectionClosed:
            raise ClientError(describe_close(websocket.close_code, websocket.close_reason or "")) from None
        first = json.loads(raw_first)
        console.show(raw_first, first)  # with --json, session.created is an event like any other
        if first.get("type") != "session.created":
            if first.get("type") != "error":  # an error was shown as one already
                console.note(f"unexpected event: {first}")
            await websocket.wait_closed()
            console.note(describe_close(websocket.close_code, websocket.close_reason or ""))
            return EXIT_FAILED
        console.note(f"session: {first['session_id']}")
        demo = " (demo model: its replies are random noise)" if first.get("is_demo") else ""
        console.note(f"model: {first['model']}{demo}")
        session = StreamSession(websocket, console, first)
        receiver = asyncio.create_task(session.receive_loop())
        sender = asyncio.create_task(_send_then_close(session, send_audio))
        failure: str | None = None
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if not sender.done():  # the server ended the session first: stop sending
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        elif sender.exception() is not None:
            error = sender.exception()
            if not isinstance(error, (ClientError, ConnectionClosed)):
                raise error
            failure = str(error) if isinstance(error, ClientError) else None
            if failure is not None:  # end the session cleanly all the same
                await asyncio.gather(session.send_event({"type": "session.close"}), return_exceptions=True)
        await receiver
    code, reason = websocket.close_code, websocket.close_reason or ""
    if failure:
        console.note(failure)
    if code != 1000:
        console.note(describe_close(code, reason))
    console.print_summary()
    is_ok = code == 1000 and not session.saw_fatal_error and failure is None
    return EXIT_OK if is_ok else EXIT_FAILED


async def _send_then_close(session: StreamSession, send_audio: SendAudio) -> None:
    # Decision events tell the sender how far the model has heard (see StreamSession.send_pcm).
    await session.configure(decision_events=True)
    await send_audio(session)
    await session.flush()
    await session.send_event({"type": "session.close"})


def run_main(coroutine: Awaitable[int], err: TextIO = sys.stderr) -> int:
    """``asyncio.run`` with the scripts' error reporting: one line, a non-zero status."""
    # Replies can hold any character; a console that cannot show one must not end the session.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(coroutine)
    except ClientError as error:
        print(f"error: {error}", file=err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return 130
