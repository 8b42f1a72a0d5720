"""``serve --fronts N`` (api/fronts.py): one engine process, several front processes, and their faults.

One real tree (``python -m audio_interaction_server --fronts 2``, the tiny model, 2 engine slots) is shared by the
module's first three tests, in file order: the third kills its engine. The last test drains and stops a tree of
its own.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import tempfile
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from audio_interaction_server.audio.files import load_audio_file
from audio_interaction_server.engine.process import process_has_ended
from audio_interaction_server.engine.wire import EngineEndpoints
from benchmarks.harness import LiveServer
from tests.api.test_agent import probe
from tests.api.test_app import recv_event, recv_to_close, recv_until, send_configure, send_pcm, server_config

READY = re.compile(r"ready: serving ws://127\.0\.0\.1:(\d+)/v1/stream .*; replica (\S+);")
AGENT = re.compile(r"capacity agent \(HAProxy agent-check\) of replica (\S+) on 127\.0\.0\.1:(\d+)")
ENGINE = re.compile(r"engine process (\d+) started \((\S+)\)")
FRONT = re.compile(r"front (\d+) \(replica (\S+)\) started as process (\d+)")
# uvloop is a dependency off Windows (pyproject.toml): every front runs on it, not merely where it happens to be.
EVENT_LOOP = re.compile("event loop: " + (f"uvloop {importlib.metadata.version('uvloop')}" if sys.platform != "win32"
                                          else "asyncio"))


@dataclass
class Tree:
    """The spawned tree and what its log said: each front's port, agent port and pid by replica id."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self.read_log, daemon=True)

    def read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern, count: int = 1, since: int = 0, timeout_s: float = 60) -> list:
        """The first ``count`` matches of ``pattern`` in the log from line ``since`` on, waiting for them."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                found = [m for line in self.lines[since:] if (m := pattern.search(line))]
                if len(found) >= count:
                    return found[:count]
                left_s = deadline - time.monotonic()
                assert left_s > 0 and self.process.poll() is None, "".join(self.lines[-30:])
                self.changed.wait(left_s)

    def ports(self, since: int = 0, count: int = 2) -> dict[str, int]:
        return {m.group(2): int(m.group(1)) for m in self.wait_for(READY, count, since)}

    def latest_ports(self) -> dict[str, int]:
        """Each front's port as its latest ready line says: a front an earlier test of the module killed was
        started again, on a port of its own. Any test may run first or alone."""
        self.wait_for(READY, 2)
        with self.changed:
            return {m.group(2): int(m.group(1)) for line in self.lines if (m := READY.search(line))}

    def agents(self, since: int = 0, count: int = 2) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for m in self.wait_for(AGENT, count, since)}

    def front_pids(self) -> dict[str, int]:
        return {m.group(2): int(m.group(3)) for m in self.wait_for(FRONT, 2)}

    def engine(self) -> tuple[int, EngineEndpoints]:
        found = self.wait_for(ENGINE)[0]
        commands = found.group(2)
        return int(found.group(1)), EngineEndpoints(commands, commands.removesuffix("commands") + "events")


def spawn_tree(checkpoint: Path, **settings: str) -> Tree:
    """``python -m audio_interaction_server --fronts 2`` on free ports, 2 engine slots, its log read as it comes."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIS_")}
    env.update(AIS_LOG_LEVEL="info", AIS_ENGINE__DEVICE="cpu", AIS_ENGINE__MAX_SESSIONS="2", AIS_REPLICA_ID="box",
               AIS_RESUME_GRACE_S="0", **settings)
    process = subprocess.Popen([sys.executable, "-m", "audio_interaction_server", "--fronts", "2", "--port", "0",
                                "--checkpoint", str(checkpoint)], env=env, stderr=subprocess.PIPE, text=True)
    spawned = Tree(process)
    spawned.reader.start()
    return spawned


@pytest.fixture(scope="module")
def tree(tiny_checkpoint):
    spawned = spawn_tree(tiny_checkpoint, AIS_AGENT_PORT="0", AIS_AGENT_PROBES_PER_S_PER_IP="1000",
                         AIS_AGENT_PROBES_PER_S="1000")  # probed in a loop here
    yield spawned
    if spawned.process.poll() is None:
        spawned.process.kill()
    spawned.process.wait()


def open_session(port: int) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None)


def start_session(ws: ClientConnection) -> str:
    """The session's id, once configured for f32 audio and decision events."""
    created = recv_event(ws)
    assert created["type"] == "session.created", created
    send_configure(ws, audio={"sample_format": "pcm_f32le", "sample_rate_hz": 16_000}, decision_events=True)
    return created["session_id"]


def wait_until(condition, timeout_s: float = 10.0) -> float:
    """Seconds until ``condition()`` held (polled every 10 ms)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "never happened"
        time.sleep(0.01)
    return time.monotonic() - started


def http_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_two_fronts_share_the_engine_stream_real_audio_and_report_its_free_slots(tree, shared_audio):
    ports, agents = tree.ports(), tree.agents()
    assert set(ports) == set(agents) == {"box-f0", "box-f1"}
    tree.wait_for(EVENT_LOOP, 2)  # one line from each front's loop
    samples = load_audio_file(shared_audio / "01_count_bark" / "sample01_01.mp3")  # 3.3 s
    assert probe(agents["box-f0"]).startswith("up ready 100% maxconn:")
    with open_session(ports["box-f0"]) as ws0, open_session(ports["box-f1"]) as ws1:
        id0, id1 = start_session(ws0), start_session(ws1)
        # Session ids carry their front's replica id, so a balancer routes subscribers and resumes to it.
        assert id0.startswith("box-f0_") and id1.startswith("box-f1_")
        # One session each: each front alone has room for two, but the engine's two slots are taken. Each front
        # hears it from the engine's next status (within HEARTBEAT_S of the change): wait for both, not one then
        # the other.
        wait_until(lambda: all(probe(agents[front]).startswith("up ready 0% maxconn:") for front in agents))
        assert http_status(ports["box-f0"], "/ready") == 503 and http_status(ports["box-f1"], "/ready") == 503
        decisions = []
        for ws in (ws0, ws1):
            send_pcm(ws, samples, 16_000, frame_s=0.25)
            ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.4}))
        for ws in (ws0, ws1):
            events = recv_until(ws, lambda e: e["type"] == "input.flushed")
            assert not [e for e in events if e["type"] == "error"], events
            decisions.append([(e["chunk"], e["token_id"]) for e in events if e["type"] == "decision"])
            ws.send(json.dumps({"type": "session.close"}))
            assert recv_to_close(ws)[1] == 1000
    # The same recording, the same model: the same decisions on both fronts, every chunk in order.
    assert decisions[0] == decisions[1] and [chunk for chunk, _ in decisions[0]] == list(range(len(decisions[0])))
    # Neither front imported torch (each front's share of a host's memory: ~370 MB with it, ~170 without, on the
    # 2-core VM); only the engine process did.
    if Path("/proc/self/maps").exists():
        engine_pid = tree.engine()[0]
        for replica, pid in tree.front_pids().items():
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), f"front {replica} loaded torch"
        assert "libtorch" in Path(f"/proc/{engine_pid}/maps").read_text()
    assert len(decisions[0]) >= 9
    # Both fronts hear the freed slots from the engine's next status, each on its own reader: wait for both (front 1
    # answered 503 once, on a loaded machine, while front 0 had heard already).
    wait_until(lambda: all(probe(agents[front]).startswith("up ready 100% maxconn:") for front in agents))
    assert http_status(ports["box-f0"], "/ready") == http_status(ports["box-f1"], "/ready") == 200


def test_every_line_of_the_tree_says_which_process_wrote_it(tree):
    """The processes of a tree write one log: each line names its process, uvicorn's access lines included (two
    fronts' requests looked the same)."""
    ports = tree.ports()
    since = len(tree.lines)
    for replica, port in ports.items():
        assert http_status(port, f"/no-such-page-{replica}") == 404
    for replica in ports:
        front = rf"^INFO \[{replica.removeprefix('box-')}\] uvicorn"
        tree.wait_for(re.compile(front + rf'\.access: 127\.0\.0\.1:\d+ - "GET /no-such-page-{replica} '), since=since)
        tree.wait_for(re.compile(front + rf"\.error: Uvicorn running on http://127\.0\.0\.1:{ports[replica]} "))
    package = "audio_interaction_server"
    tree.wait_for(re.compile(rf"^INFO \[engine\] {package}\.engine\.process: engine process \d+ serving "))
    tree.wait_for(re.compile(rf"^INFO \[supervisor\] {package}\.api\.fronts: front 1 \(replica box-f1\)"))


def test_a_killed_front_frees_its_slots_within_a_second_and_is_started_again(tree):
    ports, pids = tree.ports(), tree.front_pids()
    with open_session(ports["box-f0"]) as ws0, open_session(ports["box-f1"]) as ws1:
        for ws in (ws0, ws1):  # a whole chunk each, so both hold an engine slot
            start_session(ws)
            ws.send(np.zeros(8000, dtype=np.float32).tobytes())
            recv_until(ws, lambda e: e["type"] == "decision")
        wait_until(lambda: http_status(ports["box-f0"], "/ready") == 503)  # the engine is full (as last heard)
        since = len(tree.lines)
        os.kill(pids["box-f1"], signal.SIGKILL)
        killed_s = time.monotonic()
        # Its port stays the supervisor's: another process that took it made the restart fail and ended the tree.
        wait_until(lambda: process_has_ended(pids["box-f1"]))  # its own socket is closed by now
        with socket.socket() as thief, pytest.raises(OSError, match="Address already in use"):
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            thief.bind(("127.0.0.1", ports["box-f1"]))
        freed_s = wait_until(lambda: http_status(ports["box-f0"], "/ready") == 200)
        assert time.monotonic() - killed_s < 1.0, f"the dead front's slot was freed after {freed_s:.2f} s"
        ws0.send(np.zeros(16000, dtype=np.float32).tobytes())  # the other front's session goes on
        ws0.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.2}))
        after = recv_until(ws0, lambda e: e["type"] == "input.flushed")
        assert [e["chunk"] for e in after if e["type"] == "decision"] == [1, 2, 3, 4]
        assert not [e for e in after if e["type"] == "error"]
    # The supervisor starts the front again, with its replica id, on its port (even with --port 0).
    restarted = tree.ports(since, count=1)
    assert restarted == {"box-f1": ports["box-f1"]}
    with open_session(restarted["box-f1"]) as ws:
        assert start_session(ws).startswith("box-f1_")
    assert probe(tree.agents(since, count=1)["box-f1"]).startswith("up ready ")


def attach_front(tree: Tree, checkpoint: Path, **settings) -> LiveServer:
    """A front of the tree's engine in this process, as the tree's are, to look at it from inside."""
    _, endpoints = tree.engine()
    front = LiveServer(server_config(checkpoint, engine={"checkpoint": checkpoint, "device": "cpu", "max_sessions": 2},
                                     replica_id="probe", **{"api_key": None, **settings}))
    front.runtime.attach_to = endpoints
    return front.start()


def test_a_burst_of_handshakes_takes_no_more_slots_than_the_engine_has(tree, tiny_checkpoint):
    """A front weighed new sessions by the engine's free slots as last heard: the sessions it admitted since were
    not in them (they reach the engine in its next heartbeat, their count comes back in the next status), so a
    burst took more slots than there were, and the extra sessions were created and then refused by the engine.
    Each status now says how many slots it counted for the front it goes to, and the front takes off the
    sessions it admitted beyond those."""
    ports = tree.latest_ports()
    front = attach_front(tree, tiny_checkpoint)
    try:
        with open_session(ports["box-f1"]) as held:
            start_session(held)  # one of the engine's two slots
            wait_until(lambda: front.runtime.engine_free_slots == 1)
            created: list[str] = []

            def handshake() -> None:
                with open_session(front.port) as ws:
                    first = recv_event(ws)
                    created.append(first["type"] if first["type"] == "session.created" else first["code"])
                    time.sleep(0.5)  # hold it while the other handshake is answered

            burst = [threading.Thread(target=handshake) for _ in range(3)]
            for thread in burst:
                thread.start()
            for thread in burst:
                thread.join(20)
        assert sorted(created) == ["capacity", "capacity", "session.created"], created
    finally:
        front.stop()


def test_the_front_holding_a_detached_session_tells_its_balancer_it_has_room(tree, tiny_checkpoint):
    """Every slot taken, one by a detached session: only the front that holds it can admit (it gives the new
    session that slot, docs/protocol.md), and its agent said 0% like every other front's, so HAProxy refused
    every client itself while the slot waited out its grace. Its agent now says what its /ready says."""
    import asyncio

    from tests.api.test_resume import connect_and_drop

    ports = tree.latest_ports()
    front = attach_front(tree, tiny_checkpoint, resume_grace_s=30, agent_port=0)
    try:
        with open_session(ports["box-f1"]) as held:
            start_session(held)
            asyncio.run(connect_and_drop(front.port))  # the engine's other slot, now held by a detached session
            wait_until(lambda: front.runtime.engine_free_slots == 0 and front.runtime.detached_sessions())
            assert http_status(front.port, "/ready") == 200
            assert probe(front.app.state.agent.port).startswith("up ready 100%")
            with open_session(front.port) as ws:  # it takes the detached session's slot
                assert recv_event(ws)["type"] == "session.created"
    finally:
        front.stop()


def test_a_detached_session_on_one_front_gives_its_slot_to_a_new_client_of_another(tree, tiny_checkpoint):
    """Every engine slot taken, one by a session detached on front A: a client of front B was refused with
    `capacity` and B's /ready said full for the whole grace, though docs/protocol.md promises that a detached
    session never keeps a live client out. Fronts now tell the engine which of their sessions are detached; a
    front admits while any front holds one, and the engine, asked to open a session with every slot taken,
    has the session detached longest give its slot up (it ends with detached_evicted on its own front)."""
    import asyncio

    from tests.api.test_resume import connect_and_drop

    ports = tree.latest_ports()
    front = attach_front(tree, tiny_checkpoint, resume_grace_s=30)
    try:
        with open_session(ports["box-f1"]) as held:
            start_session(held)
            send_pcm(held, np.zeros(8_000, "<f4"), 16_000)  # open in the engine: a slot of the worker's own
            recv_until(held, lambda e: e["type"] == "decision")
            asyncio.run(connect_and_drop(front.port))  # the engine's other slot, held by a detached session on A
            wait_until(lambda: front.runtime.engine_free_slots == 0 and front.runtime.detached_sessions())
            assert http_status(ports["box-f0"], "/ready") == 200  # front B: a slot can be had
            with open_session(ports["box-f0"]) as ws:
                session_id = start_session(ws)
                send_pcm(ws, np.zeros(16_000, "<f4"), 16_000)  # its first chunks open it in the engine
                decision = recv_until(ws, lambda e: e["type"] in ("decision", "error"))[-1]
                assert decision["type"] == "decision", decision
                assert decision["session_id"] == session_id
            wait_until(lambda: not front.runtime.streams)  # A's detached session gave its slot up
            metrics = front.get("/metrics")[1].decode()
            assert 'ais_sessions_total{reason="detached_evicted"} 1.0' in metrics
            # The same for a session that dropped before its first audio (admitted, never opened in the engine):
            # front B was still locked out for the whole grace.
            wait_until(lambda: front.runtime.engine_free_slots == 1)  # B's session closed, and the engine said so
            asyncio.run(drop_before_any_audio(front.port))
            wait_until(lambda: front.runtime.engine_free_slots == 0 and front.runtime.detached_sessions())
            assert http_status(ports["box-f0"], "/ready") == 200
            with open_session(ports["box-f0"]) as ws:
                start_session(ws)
                send_pcm(ws, np.zeros(16_000, "<f4"), 16_000)
                assert recv_until(ws, lambda e: e["type"] in ("decision", "error"))[-1]["type"] == "decision"
            wait_until(lambda: not front.runtime.streams)
            assert 'ais_sessions_total{reason="detached_evicted"} 2.0' in front.get("/metrics")[1].decode()
    finally:
        front.stop()


async def drop_before_any_audio(port: int) -> None:
    """A session whose connection drops, without a close frame, before it sent any audio: detached, and never
    opened in the engine (a session opens there at its first audio)."""
    import asyncio

    import websockets

    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/stream")
    await ws.recv()  # session.created
    ws.transport.abort()
    await asyncio.sleep(0.3)


def test_an_address_cut_for_a_flood_on_one_front_is_refused_by_every_front(tree, tiny_checkpoint):
    """The flood cut's cooldown was each front's own: a client cut on front A reconnected at once through front B
    of the same engine, with a fresh budget and a fresh backlog for the engine they share (docs/reliability.md:
    its address is refused new connections for flood.cut_cooldown_s). A cut now reaches every front through
    the engine."""
    import socket

    from websockets.exceptions import InvalidStatus

    ports = tree.latest_ports()
    front = attach_front(tree, tiny_checkpoint, flood={"event_burst": 3, "events_per_s": 0.1, "cut_cooldown_s": 30.0})

    def connect_from_127_0_0_2(port: int) -> ClientConnection:  # loopback too, and no other test's address
        sock = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        return connect(f"ws://127.0.0.1:{port}/v1/stream", sock=sock, max_size=None)

    try:
        with connect_from_127_0_0_2(front.port) as flooder:
            recv_event(flooder)
            for _ in range(5):
                try:
                    flooder.send(json.dumps({"type": "input.clear"}))
                except ConnectionClosed:  # cut already, before this client sent all five (a loaded machine)
                    break
            closing = recv_until(flooder, lambda e: e["type"] == "session.closed")
            assert any(e.get("code") == "event_flood" for e in closing), closing
        time.sleep(0.5)  # the cut crosses to the other fronts through the engine (one message each way)
        for port in (ports["box-f0"], ports["box-f1"]):
            with pytest.raises(InvalidStatus) as refused:
                connect_from_127_0_0_2(port).close()
            response = refused.value.response
            assert response.status_code == 429 and b"flood" in response.body, (response.status_code, response.body)
            assert 20 <= int(response.headers["Retry-After"]) <= 30  # the cut's own cooldown
        with open_session(ports["box-f0"]) as other:  # 127.0.0.1 connects as before
            assert recv_event(other)["type"] == "session.created"
        # A front that starts while the cut holds (one restarted after a crash) learns it from the engine too.
        late = attach_front(tree, tiny_checkpoint)
        try:
            with pytest.raises(InvalidStatus) as refused:
                connect_from_127_0_0_2(late.port).close()
            assert refused.value.response.status_code == 429
        finally:
            late.stop()
    finally:
        front.stop()


def test_a_dead_engine_ends_every_fronts_sessions_with_worker_failed_and_the_tree_exits_1(tree, tiny_checkpoint):
    engine_pid, endpoints = tree.engine()
    ports = tree.latest_ports()
    # A third front attached in this process, as the tree's are, to look at it from inside.
    attached = LiveServer(server_config(tiny_checkpoint, engine={"checkpoint": tiny_checkpoint, "device": "cpu",
                                                                  "max_sessions": 2}, replica_id="probe"))
    attached.runtime.attach_to = endpoints
    attached.start()
    # A front that has attached knows the engine's free slots at once (its agent and /ready weigh by them), not
    # only from the engine's next heartbeat: a probe right after the start once got no weight under load.
    from audio_interaction_server.engine.process_client import EngineProcessClient

    client = EngineProcessClient(endpoints)
    client.start()
    try:
        assert client.engine_status is not None and client.engine_status.free_slots >= 0
    finally:
        client.stop()
    try:
        with open_session(ports["box-f0"]) as ws0, open_session(ports["box-f1"]) as ws1:
            start_session(ws0)  # open in the engine: its first chunk decided
            ws0.send(np.zeros(8000, dtype=np.float32).tobytes())
            recv_until(ws0, lambda e: e["type"] == "decision")
            # Not open in the engine yet (no audio): it was closed as at a shutdown (server_shutdown, 1001), as if
            # the server had stopped as asked, not failed.
            start_session(ws1)
            os.kill(engine_pid, signal.SIGKILL)
            for ws in (ws0, ws1):
                events, code = recv_to_close(ws)
                assert code == 1011, events
                assert [e["code"] for e in events if e["type"] == "error"] == ["worker_failed"]
                assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "worker_failed"
        wait_until(lambda: bool(attached.fatal))
        assert "engine process is gone" in attached.fatal[0]
        status, body = attached.get("/ready")
        assert status == 503 and "worker died" in json.loads(body)["reason"]
    finally:
        attached.stop()
    assert tree.process.wait(30) == 1
    # Told by the supervisor, which sees the engine's process end at once: the fronts end their sessions then, not
    # seconds later on the engine's silence (meanwhile /ready said 200 and new sessions were admitted).
    tree.reader.join(10)
    log = "".join(tree.lines)
    assert log.count("the engine process ended (the supervisor saw it); every session is ended") == 2, log[-3000:]
    assert "nothing heard from it" not in log


def test_a_drain_of_one_front_leaves_the_other_alone_and_sigterm_drains_every_front_then_the_engine(
        tiny_checkpoint):
    import urllib.request

    tree = spawn_tree(tiny_checkpoint, AIS_DRAIN_TIMEOUT_S="2")
    try:
        ports = tree.ports()
        with open_session(ports["box-f0"]) as ws0, open_session(ports["box-f1"]) as ws1:
            for ws in (ws0, ws1):
                start_session(ws)
                ws.send(np.zeros(8000, dtype=np.float32).tobytes())
                recv_until(ws, lambda e: e["type"] == "decision")
            since = len(tree.lines)
            drain = urllib.request.Request(f"http://127.0.0.1:{ports['box-f1']}/v1/admin/drain", method="POST")
            with urllib.request.urlopen(drain, timeout=5) as answer:
                assert answer.status == 202
            events, code = recv_to_close(ws1)  # front 1 alone drains: going away, then 1012
            assert code == 1012 and "session.going_away" in [e["type"] for e in events], events[-3:]
            wait_until(lambda: http_status(ports["box-f0"], "/ready") == 200)  # the slot it left is free again
            ws0.send(np.zeros(6400, dtype=np.float32).tobytes())  # front 0's session goes on
            assert recv_until(ws0, lambda e: e["type"] == "decision")[-1]["chunk"] == 1
            # Its drain done, front 1 exits 0 and the supervisor starts it again; a SIGTERM meanwhile stops all.
            tree.wait_for(re.compile(r"front 1 exited with status 0; .* starting it again"), since=since)
            tree.process.send_signal(signal.SIGTERM)
            events, code = recv_to_close(ws0)
            assert code == 1012 and events[-1]["type"] == "session.closed", events[-3:]
            assert "worker_failed" not in [e.get("code") for e in events]
        assert tree.process.wait(30) == 0
        tree.reader.join(10)  # the whole log
        log = "".join(tree.lines)
        assert "Traceback" not in log and "did not stop" not in log
        assert "engine process exited" not in log and "is gone" not in log  # stopped, not lost
    finally:
        if tree.process.poll() is None:
            tree.process.kill()
        tree.process.wait()


def test_fronts_that_stop_by_themselves_are_started_again_without_limit_and_crashes_are_counted(tmp_path, monkeypatch):
    """A front that exits 0 stopped as asked (its own drain, a SIGTERM to it alone): drained one after another,
    the sixth drain within a minute took the whole tree down (exit 1, every other front's sessions cut) as if
    fronts kept crashing. Only crashes count towards MAX_FRONT_RESTARTS."""
    from audio_interaction_server.api import fronts
    from audio_interaction_server.config import load_config

    supervisor = fronts.Supervisor(load_config(None, {"AIS_FRONTS": "3"}), tmp_path)
    started: list[int] = []
    monkeypatch.setattr(supervisor, "start_front", started.append)
    for drain in range(3 * fronts.MAX_FRONT_RESTARTS):
        assert supervisor._front_ended(1 + drain % 2, 0) is None
    assert len(started) == 3 * fronts.MAX_FRONT_RESTARTS and not supervisor.stopping
    for crash in range(fronts.MAX_FRONT_RESTARTS):
        assert supervisor._front_ended(2, -9) is None  # killed
    assert supervisor._front_ended(2, -9) == fronts.EXIT_CANNOT_SERVE and supervisor.stopping


def test_a_front_whose_main_raised_is_restarted_and_one_that_cannot_serve_ends_the_tree(tmp_path, monkeypatch):
    """Python ends a process whose main raised with status 1, which the supervisor read as "its engine is lost":
    one front's uncaught exception took every other front's sessions down and the tree with it (exit 1, the
    engine healthy). A front that cannot serve has a status of its own; a front's 1 is a crash, restarted."""
    from audio_interaction_server.api import fronts
    from audio_interaction_server.config import load_config

    supervisor = fronts.Supervisor(load_config(None, {"AIS_FRONTS": "2"}), tmp_path)
    started: list[int] = []
    monkeypatch.setattr(supervisor, "start_front", started.append)
    taken_down: list[tuple] = []
    monkeypatch.setattr(supervisor, "_take_down", lambda status, signum, **how: taken_down.append((status, how))
                        or status)
    assert supervisor._front_ended(1, 1) is None and started == [1] and not taken_down
    assert len(supervisor.restarts_s) == 1  # a crash: counted towards MAX_FRONT_RESTARTS
    assert supervisor._front_ended(1, fronts.EXIT_FRONT_CANNOT_SERVE) == fronts.EXIT_CANNOT_SERVE
    # The other fronts are given the time to tell their clients; an engine still running then hangs: killed soon.
    assert taken_down == [(fronts.EXIT_CANNOT_SERVE, {"wait_s": fronts._lost_engine_wait_s(), "engine_hangs": True})]


def test_a_hang_up_stops_the_tree_as_sigterm_does(tmp_path, monkeypatch):
    """A SIGHUP (the terminal that started ``serve`` closed) ended the supervisor outright, and with it every
    front's clients' connections (1006). It is one of the signals the supervisor handles, and what it passes on to
    each front is a SIGTERM (a front's own SIGHUP would end it at once)."""
    from audio_interaction_server.api import fronts
    from audio_interaction_server.config import load_config

    supervisor = fronts.Supervisor(load_config(None, {"AIS_FRONTS": "2"}), tmp_path / "stand-in")
    seen: list[int] = []
    monkeypatch.setattr(supervisor, "run", lambda: seen.append(signal.getsignal(signal.SIGHUP)) or 0)
    monkeypatch.setattr(fronts, "Supervisor", lambda config, directory: supervisor)
    before = signal.getsignal(signal.SIGHUP)
    made: list[str] = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix, dir=None: made.append(str(tmp_path / "m" / prefix)) or
                        Path(made[-1]).mkdir(parents=True) or made[-1])
    assert fronts.supervise(load_config(None, {"AIS_FRONTS": "2"})) == 0
    # The folder supervise made for the engine's sockets is gone, though this stand-in supervisor never used it
    # (one was left in /tmp by every run of this test: hostile probe, round 4).
    assert made and not Path(made[0]).exists()
    assert seen == [supervisor.on_signal] and signal.getsignal(signal.SIGHUP) == before
    ordered: list[tuple[int, int]] = []
    monkeypatch.setattr(supervisor, "_order", lambda index, order: ordered.append((index, order)))
    supervisor.fronts = {0: _Running(), 1: _Running()}
    supervisor.on_signal(signal.SIGHUP, None)
    assert supervisor.stopping and ordered == [(0, signal.SIGTERM), (1, signal.SIGTERM)]
    # A closing terminal hangs up more than once: a second SIGTERM would cut the fronts' drains short.
    supervisor.on_signal(signal.SIGHUP, None)
    assert ordered == [(0, signal.SIGTERM), (1, signal.SIGTERM)]
    supervisor.on_signal(signal.SIGINT, None)  # an operator's second signal still is one
    assert ordered[2:] == [(0, signal.SIGINT), (1, signal.SIGINT)]


def test_a_supervisor_that_stood_still_itself_judges_no_front_hung_until_its_next_look(tmp_path, monkeypatch):
    """A pause of the whole tree (docker pause, a VM or host stall) longer than front_hang_timeout_s: CLOCK_MONOTONIC
    went on, and on waking the supervisor saw every front's heartbeat that old, before the fronts' loops had their
    turn, and killed them all as hung (each a crash: with six fronts the tree then exited 1)."""
    from audio_interaction_server.api import fronts
    from audio_interaction_server.config import load_config

    supervisor = fronts.Supervisor(load_config(None, {"AIS_FRONTS": "2"}), tmp_path)
    killed: list[int] = []
    supervisor.fronts = {0: _Killable(0, killed), 1: _Killable(1, killed)}
    supervisor.heartbeats = {0: fronts.LoopHeartbeat(), 1: fronts.LoopHeartbeat()}
    now_s = [1000.0]
    monkeypatch.setattr(fronts.time, "monotonic", lambda: now_s[0])
    for heartbeat in supervisor.heartbeats.values():
        heartbeat.beat()
    supervisor._kill_hung_fronts()
    now_s[0] += 60.0  # the pause
    supervisor._kill_hung_fronts()
    assert killed == []
    supervisor.heartbeats[0].beat()  # front 0's loop had its turn since; front 1's did not
    now_s[0] += 0.5
    supervisor._kill_hung_fronts()
    assert killed == []  # stillness counts from the end of the pause: a whole front_hang_timeout_s from there
    for _ in range(round(supervisor.config.front_hang_timeout_s / 0.5)):
        now_s[0] += 0.5
        supervisor.heartbeats[0].beat()
        supervisor._kill_hung_fronts()
    assert killed == [1]


class _Killable:
    exitcode = None

    def __init__(self, index: int, killed: list[int]) -> None:
        self.index, self.killed, self.pid = index, killed, 100 + index

    def kill(self) -> None:
        self.killed.append(self.index)


class _Running:
    exitcode = None
