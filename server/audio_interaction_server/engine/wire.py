"""What crosses between the engine process and a server's front (``engine/process.py``), over ZeroMQ.

Two ``ipc://`` sockets in a temporary directory:

* commands: each front's DEALER -> the engine's ROUTER. The typed commands (``engine/commands.py``, an open
  without its callback: ``OpenRemote``), pickled with protocol 5; a push's mel chunks travel out of band as a
  raw frame (a numpy array's buffer), never copied into the pickle;
* events: the engine's ROUTER -> each front's DEALER, in batches: ``SessionEvents`` (exactly the lists the
  worker hands a session's ``emit``), each step's ``StepStats``, and an ``EngineStatus`` when it changes (checked
  every ``HEARTBEAT_S``) or ``KEEPALIVE_S`` after the last
  (the engine is alive, and how many of its slots are free: several fronts share them).

What several fronts share goes through the engine too: which sessions wait detached for a resume
(``SessionDetached``, ``DetachEnded``; the engine gives the slot of the one detached longest to a new session
when none is free, and tells its front with ``EvictDetached``), and the client addresses cut for a flood
(``AddressCut``, passed on to every front). Each open carries its client's address: the engine charges it the
prompt tokens the session makes it feed, over every front (``prefill_budget.py``).

Both DEALERs of a front carry its front id as routing id, so the engine knows whose sessions are whose. Pickle,
not a schema'd format: both ends are our own code of one version, the messages are our frozen dataclasses, and
the bulk (mel chunks) goes as raw bytes either way. The one exception is the most frequent message, a live
stream's ``PushAudio`` of ``PaddedBlocks`` (every 0.4 s per session, on the front's event loop): it is written
out by hand in two frames (``AUDIO_BLOCKS``, the first chunk index, the array's shape and the session id; then the
samples), since pickling the dataclass and its array cost about 12 us where these cost under 1.

A front sends the session commands of one event-loop turn as one message (``encode_batch``: ``COMMAND_BATCH``,
each command's number of frames, then their frames in order): a ZeroMQ send costs the loop tens of microseconds
whatever it carries, and under load one turn reads many streams' audio. Messages go out through
``send_frames`` and come in through ``recv_frames``, not pyzmq's ``send_multipart`` and ``recv_multipart``.
"""

from __future__ import annotations

import itertools
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.client import ENGINE_QUIET_S  # noqa: F401  (the wire's bound too)
from audio_interaction_server.engine.commands import PushAudio
from audio_interaction_server.engine.events import EngineEvent, SessionStateSize, StepPath
from audio_interaction_server.options import SessionOptions

# How soon a change is told: the engine's free slots to every front, checked this often (and a front's admitted
# sessions, told as they change).
HEARTBEAT_S = 0.1
# How often each side says it is alive when nothing changed. Not every HEARTBEAT_S: an idle front's reader then woke
# 20 times a second, for about 0.3 % of a core (the engine's side as much again), which a front of a few streams
# pays per stream. Far inside both silence bounds below.
KEEPALIVE_S = 0.5
# A front silent this long is gone (stopped as a whole, or on a host whose process the engine cannot watch): its
# sessions are closed. Heartbeats come from the front's reader thread, so a front whose event loop alone hangs is
# not silent: the supervisor of several fronts kills it (``front_hang_timeout_s``). A front that dies is seen
# sooner, by its process id (engine/process.py, within a poll of 0.1 s), so this bound may be generous: at 0.5 s,
# fronts starved of CPU on a loaded 2-core machine had their live sessions cut.
FRONT_TIMEOUT_S = 3.0
# A wait of a front's reader that ends this much later than it was asked to: the front's process itself stood
# still (stopped, starved of CPU, swapped out) and heard nothing meanwhile, ZeroMQ's thread included; that time
# is not the engine's silence (``stood_still_s``).
STOOD_STILL_S = 0.5


@dataclass(frozen=True)
class EngineEndpoints:
    """Where an engine process listens; a front connects to both."""

    commands: str
    events: str

    @classmethod
    def in_directory(cls, directory: Path) -> EngineEndpoints:
        return cls(f"ipc://{directory}/commands", f"ipc://{directory}/events")


# A Unix socket's path holds at most 107 bytes on Linux (``sun_path``; 103 on macOS); ZeroMQ refuses a longer one.
MAX_SOCKET_PATH_BYTES = 107
# The longest name of a socket in the directory (``EngineEndpoints.in_directory``).
_LONGEST_SOCKET_NAME = "/commands"


def make_socket_directory() -> Path:
    """A new private directory for the engine's sockets: in the temporary folder ($TMPDIR), or in /tmp where
    that folder's path is too long for a socket's (a CI workspace, a pytest folder, macOS's /var/folders/...)."""
    directory = Path(tempfile.mkdtemp(prefix="ais-engine-"))
    if len(os.fsencode(f"{directory}{_LONGEST_SOCKET_NAME}")) <= MAX_SOCKET_PATH_BYTES:
        return directory
    directory.rmdir()
    if os.path.isdir("/tmp"):
        directory = Path(tempfile.mkdtemp(prefix="ais-engine-", dir="/tmp"))
        if len(os.fsencode(f"{directory}{_LONGEST_SOCKET_NAME}")) <= MAX_SOCKET_PATH_BYTES:
            return directory
        directory.rmdir()
    raise OSError(f"the engine's sockets need a folder whose path is under {MAX_SOCKET_PATH_BYTES - 30} bytes: "
                  f"{tempfile.gettempdir()} is too long and /tmp is not there; set TMPDIR to a shorter one")


@dataclass(frozen=True)
class Hello:
    """A front asks to be served; answered with ``EngineReady`` (sent until one arrives: the event socket may
    still be connecting). ``pid``: the front's process, which the engine watches (both on one host: ipc://)."""

    pid: int | None = None


@dataclass(frozen=True)
class Heartbeat:
    """The front is alive (every ``KEEPALIVE_S``, and as its count changes), and holds this many sessions: a
    session is admitted (counted against capacity) before its first audio opens it in the engine, and the engine's
    free slots count both.
    ``pid`` as in ``Hello``: a front the engine dropped as silent, and that comes back, is watched again."""

    num_sessions: int = 0
    pid: int | None = None


@dataclass(frozen=True)
class Goodbye:
    """The front leaves: its sessions are closed at once."""


@dataclass(frozen=True)
class Shutdown:
    """The front that started the engine stops it: open sessions end with ``server_shutdown``, then it exits."""


@dataclass(frozen=True)
class OpenRemote:
    """``OpenSession`` without its callback (a function cannot cross processes): the engine's ``emit`` for the
    session sends its events to the front the open came from."""

    session_id: str
    options: SessionOptions
    client_address: str | None = None  # charged for the prompt's prefill (engine/prefill_budget.py)


@dataclass(frozen=True)
class SessionDetached:
    """A front's session lost its client and waits to be resumed: its slot may go to a new session of any front
    (docs/protocol.md: a detached session never keeps a live client out). ``since_s``: ``time.monotonic()``, one
    clock for every process of a host, so the engine can pick the session detached longest over all fronts."""

    session_id: str
    since_s: float


@dataclass(frozen=True)
class DetachEnded:
    """The session is no longer detached: its client resumed it (its slot is its own again), or it ended (a
    session that never opened here is known to the engine only by this)."""

    session_id: str


@dataclass(frozen=True)
class EvictDetached:
    """The engine to a front: its detached session's slot went to a new session, of this front or another (the
    engine has closed it already); the front ends it with ``detached_evicted``."""

    session_id: str


@dataclass(frozen=True)
class AddressCut:
    """A front cut a session for a flood: its client address may not connect again until ``until_s``
    (``time.monotonic()``, one clock for the host's processes). The engine passes it to every front: a cut
    client that reconnected through another front of the same engine got a fresh budget there."""

    address: str
    until_s: float
    cooldown_s: float  # what this cut cost (it doubles while the address keeps being cut)


@dataclass(frozen=True)
class EngineReady:
    """The engine's answer to ``Hello``: what the front needs to describe the model and check options."""

    checkpoint: Path  # the loaded directory: the front loads the same tokenizer from it
    name: str
    device: str
    dtype: str
    config: EngineConfig
    pid: int | None = None  # the engine's process: a front that did not start it looks whether it ended
    step_path: StepPath | None = None  # how the engine steps short rows (graphs or not), for the fronts' /metrics


@dataclass(frozen=True)
class EngineFailedToLoad:
    """The engine's answer to ``Hello`` when the model did not load: the loader's own exception, so the server
    says why exactly as it does with the engine on a thread."""

    error: BaseException


@dataclass(frozen=True)
class EngineStatus:
    """The engine's heartbeat to every front (as it changes, at most every ``HEARTBEAT_S``; else every
    ``KEEPALIVE_S``): it is alive, and its slots now."""

    free_slots: int  # slots no session of any front holds or has asked for
    max_sessions: int
    # The slots counted for each front (by routing id): a front that has admitted sessions since its last heartbeat
    # takes those off ``free_slots`` itself (``slots_free_for``), or a burst of handshakes overshoots.
    held_by_front: dict[bytes, int] = field(default_factory=dict)
    # Sessions each front has said are detached: their slots go to new sessions of any front when none is free.
    detached_by_front: dict[bytes, int] = field(default_factory=dict)

    def slots_free_for(self, front_id: bytes, num_admitted: int) -> int:
        """The free slots as a front that holds ``num_admitted`` sessions now sees them."""
        return max(0, self.free_slots - max(0, num_admitted - self.held_by_front.get(front_id, 0)))

    def detached_elsewhere(self, front_id: bytes) -> int:
        """Slots held by other fronts' detached sessions: a new session of this front may have one."""
        return sum(count for front, count in self.detached_by_front.items() if front != front_id)


@dataclass(frozen=True)
class SessionEvents:
    session_id: str
    events: list[EngineEvent]
    state: SessionStateSize | None  # what the session holds as these events leave (the front's gauges)


# How the first frame of a hand-written PushAudio of PaddedBlocks starts (a pickle's starts b"\x80"); then the
# first chunk index, rows and samples per row, then the session id (UTF-8).
AUDIO_BLOCKS = b"audio-blocks"
_BLOCKS_HEADER = struct.Struct(f"<{len(AUDIO_BLOCKS)}sqqq")
# The first frame of several commands in one message; then the number of frames of each, as uint32s.
COMMAND_BATCH = b"command-batch"


def stood_still_s(waited_s: float, asked_s: float) -> float:
    """How long a process stood still during a wait of ``waited_s`` that was asked to last ``asked_s`` at most:
    all of it when it overran by ``STOOD_STILL_S`` or more, else none (a busy machine's ordinary lateness)."""
    return waited_s if waited_s - asked_s >= STOOD_STILL_S else 0.0


def encode(message: Any) -> list[Any]:
    """``message`` as frames: a pickle, then its out-of-band buffers (numpy arrays' memory, not copied)."""
    if type(message) is PushAudio and type(message.mel_chunks) is PaddedBlocks:
        blocks = message.mel_chunks
        samples = np.ascontiguousarray(blocks.samples, dtype=np.float32)
        header = _BLOCKS_HEADER.pack(AUDIO_BLOCKS, blocks.first_chunk_index, *samples.shape)
        return [header + message.session_id.encode(), samples.data]
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    return [header, *buffers]


def decode(frames: list[zmq.Frame]) -> Any:
    """What ``encode`` made, from frames received with ``copy=False``; arrays read the frames' memory."""
    first = frames[0].buffer
    if first[:len(AUDIO_BLOCKS)] == AUDIO_BLOCKS:
        _, first_chunk_index, num_rows, row_samples = _BLOCKS_HEADER.unpack_from(first)
        blocks = np.frombuffer(frames[1].buffer, dtype=np.float32).reshape(num_rows, row_samples)
        session_id = bytes(first[_BLOCKS_HEADER.size:]).decode()
        return PushAudio(session_id, PaddedBlocks(blocks, first_chunk_index))
    return pickle.loads(frames[0].buffer, buffers=[frame.buffer for frame in frames[1:]])


_SEND_MORE = int(zmq.SNDMORE)


def send_frames(socket: zmq.Socket, frames: list[Any]) -> None:
    """``frames`` as one ZeroMQ message, without copying the large ones (as ``send_multipart(frames, copy=False)``).

    Why not ``send_multipart``: per frame it checks the buffer again and ORs ``zmq.SNDMORE``, an ``IntFlag`` whose
    ``|`` runs in Python; on the front's event loop a chunk's message took about twice as long through it.
    """
    send = socket.send
    for frame in frames[:-1]:
        send(frame, _SEND_MORE, copy=False)
    send(frames[-1], 0, copy=False)


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """One ZeroMQ message's frames, not copied (as ``recv_multipart(flags, copy=False)``), asking each frame whether
    more follow rather than the socket (``recv_multipart`` reads the ``RCVMORE`` option per frame, through
    pyzmq's option enum in Python)."""
    frame = socket.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = socket.recv(flags, copy=False)
        frames.append(frame)
    return frames


def encode_batch(messages: list[Any]) -> list[Any]:
    """Several messages as the frames of one (one message as ``encode`` writes it); ``decode_batch`` splits them."""
    if len(messages) == 1:
        return encode(messages[0])
    encoded = [encode(message) for message in messages]
    counts = struct.pack(f"<{len(encoded)}I", *map(len, encoded))
    return [COMMAND_BATCH, counts, *itertools.chain.from_iterable(encoded)]


def decode_batch(frames: list[zmq.Frame]) -> list[Any]:
    """The messages of what ``encode_batch`` made (or of one ``encode`` made), in the order they were sent."""
    if frames[0].buffer != COMMAND_BATCH:
        return [decode(frames)]
    counts = struct.unpack(f"<{len(frames[1].buffer) // 4}I", frames[1].buffer)
    messages, start = [], 2
    for count in counts:
        messages.append(decode(frames[start:start + count]))
        start += count
    return messages
