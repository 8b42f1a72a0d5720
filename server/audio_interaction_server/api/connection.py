"""The I/O around one WebSocket: a stream (client audio in, events out) or a subscriber (events out).

Each connection runs its loops in one task group; the first loop to finish cancels
the others. Only the receive loop ends on a client disconnect, and only the send loop
ends on a server-side close, after it has sent every event queued before the close,
so a closing session's last events are never cut off by the cancellation.

Threading contract: everything runs on the event loop except the ``emit`` of ``engine_emitter``,
which the worker calls on its thread and which only schedules work onto the loop.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from fastapi import WebSocket
from starlette import websockets as _starlette_ws
from starlette.websockets import WebSocketDisconnect

from audio_interaction_server.api.addresses import peer_address
from audio_interaction_server.api.commands import Command
from audio_interaction_server.api.flood import JSON_ITEMS_PER_EVENT, FloodGuard, TokenBucket
from audio_interaction_server.api.native import NativeCodec
from audio_interaction_server.api.outbox import Outbox, Unnumbered
from audio_interaction_server.api.replay_log import ReplayLog, ResumePolicy
from audio_interaction_server.api.session import Session
from audio_interaction_server.api.websocket_guard import direct_messages
from audio_interaction_server.config import FloodLimits
from audio_interaction_server.engine.events import WORKER_FAILED_MESSAGE, EndCode, EngineEvent, SessionEnded
from audio_interaction_server.protocol import CloseCode, ErrorEvent

log = logging.getLogger(__name__)

# What a client leaving looks like from the app: a disconnect while receiving, an OSError or
# (Starlette >= 1.0) WebSocketDisconnected while sending. Anything else is a bug and propagates.
CLIENT_GONE: tuple[type[BaseException], ...] = (WebSocketDisconnect, OSError) + tuple(
    getattr(_starlette_ws, name) for name in ("WebSocketDisconnected",) if hasattr(_starlette_ws, name))

# What a subscriber of /v1/sessions/{id}/events receives.
SUBSCRIBED_TYPES = frozenset({"turn_begin", "emotion", "text_delta", "segment", "turn_end", "session.closed"})


class Codec(Protocol):
    """One wire protocol: client messages -> session commands, session events -> text frames.

    ``encode`` runs at send time, in event order, so a stateful codec (``/v1/realtime`` builds
    its reply items from the events) sees exactly what the client gets.
    """

    held_bytes: int  # client input kept until the events that answer it are sent (the outbox counts it)

    def decode(self, message: str | bytes) -> list[Command]: ...
    def encode(self, event) -> list[str]: ...


async def run_first_exit(*loops: Coroutine) -> None:
    """Run the loops in one task group until the first of them returns (or raises)."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(loop) for loop in loops]

        def cancel_others(finished: asyncio.Task) -> None:
            for task in tasks:
                if task is not finished:
                    task.cancel()

        for task in tasks:
            task.add_done_callback(cancel_others)


def engine_emitter(loop: asyncio.AbstractEventLoop, on_events: Callable[[list[EngineEvent]], None]
                   ) -> Callable[[list[EngineEvent]], None]:
    """The ``emit`` a session hands the worker: called on the worker thread, it hops to the loop (the session is
    not thread-safe) and calls ``on_events``, a bound method held weakly (events for a freed connection are
    dropped)."""
    target = weakref.WeakMethod(on_events)

    def emit(events: list[EngineEvent]) -> None:
        loop.call_soon_threadsafe(_call_if_alive, target, events)

    return emit


def _call_if_alive(target: weakref.WeakMethod, events: list[EngineEvent]) -> None:
    method = target()
    if method is not None:
        method(events)


def fatal_error(session_id: str | None, code: str, message: str) -> ErrorEvent:
    """The ``error`` event that ends a connection, stamped now (a connection-level answer, not the session's)."""
    return ErrorEvent(session_id=session_id, server_time_ms=int(time.time() * 1000), code=code, message=message,
                      is_fatal=True)


async def send_and_close(websocket: WebSocket, events: list, code: int,
                         encode: Callable[[object], list[str]] = NativeCodec.encode, reason: str | None = None) -> None:
    """For refusals: a few events, then the close code (and ``reason``, at most 123 bytes, in the close frame)."""
    try:
        for event in events:
            for frame in encode(event):
                await websocket.send_text(frame)
        await websocket.close(code, reason)
    except CLIENT_GONE:
        pass  # the client left first


# The largest message a subscriber may send (it only listens: what it sends is read and dropped). A streaming client
# may send 1 MiB; past this a subscriber is closed with 1009.
SUBSCRIBER_MAX_MESSAGE_BYTES = 4096


class Subscriber:
    """A client following another's session (``/v1/sessions/{id}/events``): it only listens. What it sends is read
    and dropped, at most as many messages as a streaming client's text events (``flood``): past that it is cut."""

    def __init__(self, websocket: WebSocket, max_events: int, max_bytes: int, session_id: str,
                 flood: FloodLimits) -> None:
        self.outbox = Outbox(websocket, max_events, max_bytes)
        self.session_id = session_id
        self._flood = FloodGuard(flood, time.monotonic())
        # The frames of a message it never finishes (empty continuations) reach no receive, so the budget above never
        # sees them: its transport holds its data frames to twice that budget (whole messages still meet this one
        # first, and its event_flood error), not to the 1,000 a second a streaming client's audio may need.
        extension = direct_messages(websocket)
        if extension is not None:
            extension.limit_data_frames(2 * flood.events_per_s, 2 * flood.event_burst)
            extension.limit_message_bytes(SUBSCRIBER_MAX_MESSAGE_BYTES)

    def deliver(self, events: list) -> None:
        wanted = [event for event in events if event.type in SUBSCRIBED_TYPES]
        if not self.outbox.put(wanted):
            self.outbox.abandon(CloseCode.TOO_SLOW, [])
            return
        if any(event.type == "session.closed" for event in wanted):
            self.outbox.close(CloseCode.NORMAL)

    async def run(self) -> None:
        await run_first_exit(self._receive_loop(), self.outbox.send_loop())

    async def _receive_loop(self) -> None:
        while True:
            message = await self.outbox.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if not self._flood.allows_event(time.monotonic()):
                error = fatal_error(self.session_id, "event_flood", self._flood.event_flood_message())
                self.outbox.abandon(CloseCode.POLICY, [error])
                # Read nothing more; the send loop writes the error and the close, and its end ends the run.
                await asyncio.Event().wait()


class StreamConnection:
    """One streaming client (``/v1/stream``, or ``/v1/realtime`` with its codec): feeds its ``Session`` the
    commands its codec decodes and sends what the session returns, encoded by the same codec.

    With a ``ResumePolicy`` the session outlives its socket: a connection that drops without a
    normal close detaches (the engine goes on with the audio it has; its events are numbered and
    kept) and ``resume`` attaches a new socket, replaying what the client missed. Each socket is
    one "generation": a socket's loops ending matter only while it is the current one.
    """

    def __init__(self, websocket: WebSocket, make_session: Callable[[Callable], Session], max_events: int,
                 poll_interval_s: float, on_closed: Callable[[str], None], codec: Codec | None = None,
                 resume: ResumePolicy | None = None,
                 on_detached: Callable[[StreamConnection], None] | None = None,
                 on_reattached: Callable[[StreamConnection], None] | None = None,
                 on_session_closed: Callable[[str], None] | None = None) -> None:
        self.websocket = websocket
        self._loop = asyncio.get_running_loop()
        # The session hands this to the worker. It holds the connection weakly: a strong reference would make
        # connection -> session -> emit -> connection a cycle, and a closed connection (its outbox, its codec's
        # items: megabytes for a client that did not read) would wait for the cyclic GC to be freed.
        self.session = make_session(engine_emitter(self._loop, self._on_engine_events))
        self.codec = codec if codec is not None else NativeCodec(self.session.config.max_frame_bytes)
        self.max_events = max_events
        self.max_bytes = self.session.config.max_queued_bytes
        self.outbox: Outbox | None = None  # None while detached
        self.subscribers: set[Subscriber] = set()
        self.poll_interval_s = poll_interval_s
        self._on_closed = on_closed  # the connection is done: its socket ended too
        self._on_session_closed = on_session_closed  # the session ended; its last events may still be sending
        self.finished = asyncio.Event()
        self._end_reason = "disconnected"
        self.resume_policy = resume if resume is not None and resume.grace_s > 0 else None
        self.resume_token = secrets.token_urlsafe(24) if self.resume_policy else None
        policy = self.resume_policy
        self._log = ReplayLog(policy.max_events if policy else 0, policy.max_bytes if policy else 0)
        self._resumes = TokenBucket(policy.resumes_per_s, policy.resume_burst, time.monotonic()) if policy else None
        self._generation = 0
        self._client_said_goodbye = False  # the socket ended with a close frame saying the client is done
        self._expiry: asyncio.TimerHandle | None = None
        self.detached_since_s: float | None = None  # time.monotonic() of the drop, while detached
        self._on_detached = on_detached  # the registry's bound on detached sessions (Runtime.session_detached)
        self._on_reattached = on_reattached  # and its slot its own again (Runtime.session_reattached)
        self._attach(websocket)

    def _attach(self, websocket: WebSocket) -> Outbox:
        self.websocket = websocket
        codec = self.codec  # referenced by the outbox, not through self: no cycle back to the connection
        self.outbox = Outbox(websocket, self.max_events, self.max_bytes, codec.encode, log=self._log,
                             keeps_sent=self.resume_policy is not None, held_bytes=lambda: codec.held_bytes)
        return self.outbox

    @property
    def is_detached(self) -> bool:
        return self.outbox is None and not self.finished.is_set()

    @property
    def has_ended(self) -> bool:
        """The session has closed (``session.closed`` is out or queued); the socket may still be sending."""
        return self.session.is_closed

    @property
    def client_address(self) -> str:
        """The address of the client on the latest socket (a trusted proxy's client, as the transport says)."""
        return peer_address(self.websocket) or "unknown"

    @property
    def num_replay_events(self) -> int:
        return len(self._log)

    @property
    def queued_events(self) -> int:
        """Events waiting to be sent to this client and its subscribers."""
        return (len(self.outbox) if self.outbox else 0) + sum(len(sub.outbox) for sub in self.subscribers)

    def _on_engine_events(self, events: list[EngineEvent]) -> None:
        self.deliver(self.session.on_engine_events(events, time.monotonic()))

    def deliver(self, events: list) -> None:
        if not events or self.finished.is_set():
            return
        for subscriber in list(self.subscribers):
            subscriber.deliver(events)
        if self.outbox is None:  # detached: the log holds them for the client's return, up to its bound
            for event in events:
                self._log.stamp(event, keep=True, trim=False)
            if not self._log.make_room(keep_after_seq=self._sent_before_detach_seq):
                log.warning("session %s: detached past its event buffer; ending it", self.session.session_id)
                self._end_now("resume_buffer_full")
            elif self.session.is_closed:
                self._finish(next((e.reason for e in events if e.type == "session.closed"), self._end_reason))
            return
        if not self.outbox.put(events):
            log.warning("session %s: client does not read its events; closing", self.session.session_id)
            self.outbox.abandon(CloseCode.TOO_SLOW, self._abort_with_error(
                "client_too_slow", "the client does not read: too many unsent events or bytes"))
        elif self.session.close_code is not None:
            self.outbox.close(self.session.close_code)
            self._end_reason = next((e.reason for e in events if e.type == "session.closed"), self._end_reason)
            if self._on_session_closed is not None:
                self._on_session_closed(self._end_reason)

    def engine_lost(self) -> None:
        """The model worker or engine process is gone: the session ends as the engine ends the sessions it holds
        (``worker_failed``, close 1011), also one that has not reached it yet; one already ended stays as it is."""
        self._on_engine_events([SessionEnded(EndCode.WORKER_FAILED, WORKER_FAILED_MESSAGE)])

    def shut_down(self) -> None:
        """Server shutdown: close like a client's session.close would, with code 1001."""
        self.deliver(self.session.begin_close("server_shutdown", CloseCode.GOING_AWAY, time.monotonic()))

    def drain(self, deadline_s: float) -> None:
        """The replica drains: ``session.going_away``, the reply in progress finishes, then close 1012 at the
        next listening point, within ``deadline_s`` (the poll loop enforces it)."""
        if self.is_detached:  # nobody would hear the going-away, and a resume would come back to a closing replica
            self._end_now("server_draining")
            return
        self.deliver(self.session.begin_drain(deadline_s, time.monotonic()))
        # On time, not at the next poll (up to poll_interval_s late): the runtime's drain has a deadline too.
        self._loop.call_later(deadline_s, lambda: self.deliver(self.session.poll(time.monotonic())))

    async def run(self) -> None:
        self.deliver(self.session.start(self.resume_token, self.resume_policy.grace_s if self.resume_policy else None))
        assert self.outbox is not None, "run() is the first attachment"
        await self._serve(self.outbox, self._generation)

    def holds_token(self, token: str) -> bool:
        """Whether ``token`` is this session's resume token (constant time: a guess learns nothing of it)."""
        return self.resume_token is not None and hmac.compare_digest(token.encode(), self.resume_token.encode())

    def resume_wait_s(self, now_s: float) -> float:
        """0, and one resume spent, if the session may be resumed now; else the seconds until it may be."""
        assert self._resumes is not None, "only a resumable session is asked"
        return self._resumes.take_or_wait_s(1.0, now_s)

    @property
    def last_seq_sent(self) -> int:
        """The seq of the newest event numbered for this session's client."""
        return self._log.last_seq

    def can_replay_since(self, last_seq: int) -> bool:
        """Whether a client that saw events up to ``last_seq`` can be given everything after it (not when its socket
        was cut for a flood and has not quite ended yet: the session ends with it)."""
        return not self.session.is_closed and self._transport_cut() is None and self._log.since(last_seq) is not None

    async def resume(self, websocket: WebSocket, last_seq: int) -> bool:
        """A client back with the last ``seq`` it saw (its token checked by admission.admit_resume): replay what
        it missed, go on live. False, with nothing done, when the session can no longer be replayed from there
        (it changed since the check, while the handshake completed); the caller refuses the client.

        The newest connection wins: a client that changed networks may still look connected on its
        old socket, which is closed with 4010.
        """
        missed = self._log.since(last_seq) if self.can_replay_since(last_seq) else None
        if missed is None:
            return False
        if self.outbox is not None:  # still attached on an older socket: what it has not sent is kept
            missed += self._keep_unsent(self.outbox)
            error = fatal_error(self.session.session_id, "session_resumed_elsewhere",
                                "another connection resumed this session")
            self.outbox.log = None  # the old socket's last words are not the session's
            self.outbox.abandon(CloseCode.RESUMED_ELSEWHERE, [error])
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        was_detached, self.detached_since_s = self.detached_since_s is not None, None
        if was_detached and self._on_reattached is not None:
            self._on_reattached(self)
        self._generation += 1
        self._client_said_goodbye = False
        outbox = self._attach(websocket)
        outbox.put([Unnumbered(self.session.resumed(last_seq, len(missed), time.monotonic())), *missed], bounded=False)
        log.info("session %s resumed after seq %d; %d events replayed", self.session.session_id, last_seq,
                 len(missed))
        await self._serve(outbox, self._generation)
        return True

    async def _serve(self, outbox: Outbox, generation: int) -> None:
        try:
            await run_first_exit(self._receive_loop(outbox), outbox.send_loop(), self._poll_loop())
        except* CLIENT_GONE:
            pass  # the client left while we were sending; the finally frees its slot
        finally:
            if generation == self._generation:  # not displaced by a resume meanwhile
                self._socket_ended()

    def _socket_ended(self) -> None:
        cut = None if self.session.is_closed else self._transport_cut()
        if cut is not None:
            # The transport closed the socket for a flood: the session ends with it, as a flood the session itself
            # sees ends it, and is not kept for a resume (the client would resume and flood again); its address
            # cools down as after any flood cut (Runtime.session_closed).
            self._end_reason = cut
            if self._on_session_closed is not None:
                self._on_session_closed(cut)
        if self.session.is_closed:
            self._finish(self._end_reason)
        elif self.resume_policy is not None and not self._client_said_goodbye and cut is None:
            assert self.outbox is not None, "a socket ended: it was attached"
            # What the socket sent is the window a connected log keeps; what it had not sent, and what comes
            # while detached, must all be kept for the client's return.
            self._sent_before_detach_seq = self._log.last_seq
            self._keep_unsent(self.outbox)
            self.outbox = None  # detached: events go to the log until the client resumes or the grace ends
            self.detached_since_s = time.monotonic()
            self._expiry = self._loop.call_later(self.resume_policy.grace_s, self.end_detached, "resume_expired",
                                                 "its resume grace expired")
            log.info("session %s detached; resumable for %g s", self.session.session_id, self.resume_policy.grace_s)
            if self._on_detached is not None:
                self._on_detached(self)
        else:  # the client vanished: free the engine slot now
            self._end_now(self._end_reason)

    def end_detached(self, reason: str, why: str) -> None:
        """End a detached session (its client, if it comes back, gets ``resume_expired``); one log line says
        ``why`` and how long it waited. Never the token: the log is not for secrets."""
        if not self.is_detached or self.detached_since_s is None:
            return
        log.info("session %s ended after %.1f s detached: %s", self.session.session_id,
                 time.monotonic() - self.detached_since_s, why)
        self._end_now(reason)

    def _keep_unsent(self, outbox: Outbox) -> list:
        """Number and keep the events the socket did not send, so a replay includes them. A replay's own events,
        numbered and kept already, are left as they are: numbered again, they came twice in the next replay,
        under numbers a client could not tell from new ones."""
        return [self._log.stamp(event, keep=True, trim=False) for event in outbox.take_unsent() if event.seq is None]

    def _abort(self, reason: str) -> list:
        """End the session now (the engine slot is freed); its last events, the cut reply's turn_end and
        session.closed, go to the subscribers here and are returned for the client."""
        closed = self.session.abort(reason)
        for subscriber in list(self.subscribers):
            subscriber.deliver(closed)
        return closed

    def _abort_with_error(self, reason: str, message: str) -> list:
        """End the session now for ``reason``, which its release counts (``ais_sessions_total``); the fatal error
        (counted) and the closing events, for the client (subscribers get the closing events)."""
        self._end_reason = reason
        last = self.session.abort_with_error(reason, message)
        for subscriber in list(self.subscribers):
            subscriber.deliver(last)  # an error is not among what subscribers receive
        return last

    def _end_now(self, reason: str) -> None:
        """For a session with no socket to tell: end it and release its registration."""
        if self.finished.is_set():
            return
        self._abort(reason)
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.finished.is_set():
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._on_closed(reason)
        self.finished.set()

    async def _receive_loop(self, outbox: Outbox) -> None:
        websocket = outbox.websocket
        # Under our transport, a message that arrives while this loop waits is taken in the transport's callback
        # (no queue, no task wake-up: most of a real-time frame's cost); the rest still come through receive.
        extension = direct_messages(websocket)
        if extension is not None:
            extension.take_with(functools.partial(self._take_directly, outbox))  # a partial: no Python frame of its own
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    # A close frame saying the client is done (1000) or leaving (1001: a page navigated away) ends
                    # the session; a dropped network sends none (1006), and any other code may be a client's error.
                    self._client_said_goodbye = message.get("code") in (CloseCode.NORMAL, CloseCode.GOING_AWAY)
                    if self._client_said_goodbye and not self.session.is_closed:
                        self._end_reason = "client_closed"  # as session.close (how a /v1/realtime client ends)
                    return
                if outbox.is_closing:
                    # Once this socket closes, nothing more is taken from it: the transport stops reading once
                    # PAUSE_READING_QUEUED_BYTES wait (api/websocket_guard.py), so a client cut for a flood (or
                    # closed as too slow) that goes on sending costs a bounded parse at most; the send loop ends it.
                    await asyncio.Event().wait()
                self._take(message)
                # No yield here for a flood's backlog: the transport's receive takes one queued message per loop
                # turn (api/websocket_guard.py, GuardedWebSocketProtocol.receive), so frames at real-time pace cost no
                # extra turn.
        finally:
            if extension is not None:
                extension.take_with(None)

    def _transport_cut(self) -> str | None:
        """The flood the transport closed the attached socket for (``DirectMessages.cut_reason``), or None."""
        extension = direct_messages(self.websocket) if self.outbox is not None else None
        return None if extension is None else extension.cut_reason()

    def _take_directly(self, outbox: Outbox, message: Mapping[str, Any]) -> bool:
        """A message from the transport's callback while the receive loop waits; refused (queued for the loop,
        which stops there) once the socket closes."""
        if outbox.is_closing:
            return False
        self._take(message)
        return True

    def _take(self, message: Mapping[str, Any]) -> None:
        """A client's data message: its commands through the session, the answers delivered."""
        payload = message["bytes"] if message.get("bytes") is not None else message.get("text")
        if payload is not None:
            now_s = time.monotonic()
            try:
                # A frame heavy in JSON items spends its cost before it is parsed (api/flood.py).
                num_items = payload.count(",") + payload.count(":") if isinstance(payload, str) else 0
                if num_items >= JSON_ITEMS_PER_EVENT and (cut := self.session.take_json_items(num_items, now_s)):
                    self.deliver(cut)
                    return
                for command in self.codec.decode(payload):
                    answers = self.session.handle(command, now_s)
                    if answers:  # most frames are answered by nothing
                        self.deliver(answers)
            except Exception:
                self._failed_on_a_message()

    def _failed_on_a_message(self) -> None:
        """Decoding or handling a client's message raised (a bug: bad input has error events of its own). The
        session's state may be half changed, so it ends, and only it: an ``internal_error``, its last events, close
        1011. Not left to the transport, which closed a message taken in its callback without a word and tore a
        queued one's connection down without a close frame."""
        session_id = self.session.session_id
        log.exception("session %s: a message from its client could not be handled; the session ends", session_id)
        last = self._abort_with_error("internal_error", "the server failed on a message of this session (its log "
                                      "says why); the session is ended")
        if self.outbox is not None:
            self.outbox.close(CloseCode.INTERNAL, last)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self.deliver(self.session.poll(time.monotonic()))
