"""The engine in a process of its own (engine/process.py, process_client.py) behind the live server, and its faults.

Representative cases of the live session suite (tests/api/test_app.py) and the resume suite
(tests/api/test_resume.py) run here unchanged over the process transport: they are imported, so pytest runs
them again with this module's ``live`` and ``server`` fixtures, which serve through an engine process. One
engine process per server, shared by the module; the fault tests come last because they kill them.

Elsewhere over the process transport: the Realtime suite (tests/api/realtime/test_realtime_over_process.py,
test_realtime_clients_over_process.py) and the scale-out suite (tests/test_scale_out.py, whose replicas ais1 and
ais3 run their engines in a process and ais2 on a thread).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from websockets.sync.client import ClientConnection

from audio_interaction_server.audio.files import load_audio_file
from audio_interaction_server.engine.events import EndCode, SessionEnded, SessionStarted
from audio_interaction_server.engine.process import process_has_ended
from audio_interaction_server.engine.process_client import EngineProcessClient
from audio_interaction_server.options import SessionOptions
from benchmarks.harness import LiveServer, spawn_server, stop_server
from tests.engine.test_fronts import http_status
from tests.api.test_app import (  # noqa: F401  (imported tests run here over the process transport)
    recv_event, recv_to_close, recv_until, send_configure, send_count_bark, send_pcm, server_config,
    test_bad_input_gets_error_events_and_session_survives,
    test_cancel_mid_reply,
    test_metrics_show_what_a_session_holds_and_nothing_after_it_closes,
    test_refused_past_max_sessions_and_disconnect_mid_reply_frees_the_slot,
    test_stream_at_original_rates_gives_well_formed_events_and_subscriber_gets_same_text,
)
from tests.api.test_resume import (  # noqa: F401
    speech,
    test_a_wrong_token_is_refused_and_the_session_stays_resumable,
    test_cut_mid_listening_and_mid_reply_resumes_with_nothing_lost,
)


def process_config(checkpoint: Path, **overrides):
    return server_config(checkpoint, engine={"checkpoint": checkpoint, "max_sessions": 2, "device": "cpu",
                                             "transport": "process"}, **overrides)


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    """test_app's live server, its engine in a process of its own."""
    server = LiveServer(process_config(tiny_checkpoint)).start()
    assert isinstance(server.runtime.worker, EngineProcessClient)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def resume_server(tiny_checkpoint):
    """test_resume's server, as a real ``python -m audio_interaction_server`` with its engine in a process."""
    process, port = spawn_server(tiny_checkpoint, {"AIS_RESUME_GRACE_S": "20", "AIS_ENGINE__TRANSPORT": "process"})
    yield process, port
    if process.poll() is None:
        stop_server(process)


@pytest.fixture(scope="module")
def server(resume_server):
    return resume_server[1]


def test_the_transport_is_chosen_by_config_flag_and_device():
    import argparse

    from audio_interaction_server.__main__ import add_serve_arguments, overrides_from
    from audio_interaction_server.config import EngineConfig, load_config
    from audio_interaction_server.engine.client import choose_transport

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert load_config(None, {}, overrides_from(parser.parse_args(["--engine-process"]))).engine.transport == "process"
    assert load_config(None, {"AIS_ENGINE__TRANSPORT": "thread"}, {}).engine.transport == "thread"
    assert load_config(None, {}, {}).engine.transport == "auto"
    assert choose_transport(EngineConfig(device="cuda")) == "process"  # the host path is the ceiling on a GPU
    assert choose_transport(EngineConfig(device="cpu")) == "thread"
    assert choose_transport(EngineConfig(device="cpu", transport="process")) == "process"
    assert choose_transport(EngineConfig(device="cuda", transport="thread")) == "thread"


def stream_tokens(connect: Callable[[], ClientConnection], samples: np.ndarray) -> tuple[list, list]:
    """(decisions, replies' token ids) of ``samples`` streamed in one session on ``connect()``, then flushed."""
    with connect() as ws:
        recv_event(ws)
        send_configure(ws, audio={"sample_format": "pcm_f32le", "sample_rate_hz": 16_000}, decision_events=True)
        send_pcm(ws, samples, 16_000, frame_s=0.25)
        ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 1.0}))
        events = recv_until(ws, lambda e: e["type"] == "input.flushed")
        ws.send(json.dumps({"type": "session.close"}))
        events += recv_to_close(ws)[0]
    return ([(e["chunk"], e["token_id"]) for e in events if e["type"] == "decision"],
            [e["token_ids"] for e in events if e["type"] == "turn_end"])


def test_tokens_are_identical_over_the_thread_and_the_process_transport(live, tiny_checkpoint, shared_audio):
    samples = load_audio_file(shared_audio / "01_count_bark" / "sample01_01.mp3")  # 3.3 s
    threaded = LiveServer(server_config(tiny_checkpoint, engine={"checkpoint": tiny_checkpoint, "max_sessions": 2,
                                                                  "device": "cpu", "transport": "thread"})).start()
    try:
        assert not isinstance(threaded.runtime.worker, EngineProcessClient)
        over_thread = stream_tokens(threaded.connect, samples)
    finally:
        threaded.stop()
    over_process = stream_tokens(live.connect, samples)
    assert over_process == over_thread
    assert over_thread[0] and over_thread[1], "the tiny model neither decided nor replied: nothing was compared"


def test_session_commands_of_one_loop_turn_leave_in_one_send_and_keep_their_order(tiny_checkpoint):
    """After ``send_in_loop_turns``, what the loop's thread asks in one turn (two opens, audio for both, a reply
    request) leaves when the turn ends, as one message, and the engine applies it in order: both sessions start,
    every chunk is decided, the requested reply begins. A call from another thread leaves at once, and so does one
    from the loop's thread once its loop is closed. (Heartbeats, one message per send, go on meanwhile: the counts
    compare messages with sends.)"""
    from audio_interaction_server.audio.blocks import PaddedBlocks
    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.engine.events import Decision, TurnBegin

    client = EngineProcessClient.spawn(tiny_checkpoint, EngineConfig(device="cpu", max_sessions=2))
    client.start()

    def batched() -> int:  # messages that left in the same send as another
        return client.num_messages_sent - client.num_sends

    async def main() -> dict[str, list]:
        loop = asyncio.get_running_loop()
        received: dict[str, list] = {"a": [], "b": []}
        arrived = asyncio.Event()

        def emitter(session_id: str):
            def on_loop(events: list) -> None:
                received[session_id].extend(events)
                arrived.set()
            return lambda events: loop.call_soon_threadsafe(on_loop, events)

        def have(session_id: str, predicate) -> bool:
            return any(predicate(event) for event in received[session_id])

        async def wait_for(condition) -> None:
            async with asyncio.timeout(30):
                while not condition():
                    arrived.clear()
                    await arrived.wait()

        client.send_in_loop_turns()
        before = batched()
        blocks = PaddedBlocks(np.zeros((2, 6640), dtype=np.float32), 0)
        for session_id in ("a", "b"):
            client.open_session(session_id, SessionOptions(max_turn_tokens=2), emitter(session_id))
            client.push_audio(session_id, blocks)
        client.request_reply("b")
        assert batched() == before  # nothing has left: the turn is not over
        await asyncio.sleep(0)  # the turn ends
        assert batched() == before + 4  # five commands in one send
        await wait_for(lambda: all(have(s, lambda e: isinstance(e, Decision) and e.chunk_index == 1) for s in "ab")
                       and have("b", lambda e: isinstance(e, TurnBegin)))
        await asyncio.to_thread(client.close_session, "a")  # another thread: sent at once, alone
        assert batched() == before + 4
        await wait_for(lambda: have("a", lambda e: isinstance(e, SessionEnded)))
        return received

    try:
        received = asyncio.run(main())
        answered = threading.Event()  # on the loop's thread once its loop is closed: no turn ends, so sent now
        client.open_session("c", SessionOptions(), lambda events: answered.set())
        assert answered.wait(10), "an open made after the loop closed never reached the engine"
    finally:
        client.stop()
    assert type(received["a"][0]) is SessionStarted and type(received["b"][0]) is SessionStarted
    assert [e.chunk_index for e in received["a"] if isinstance(e, Decision)] == [0, 1]


FRONT_SCRIPT = """
import sys, threading
from audio_interaction_server.engine.events import SessionStarted
from audio_interaction_server.engine.process_client import EngineProcessClient
from audio_interaction_server.engine.wire import EngineEndpoints
from audio_interaction_server.options import SessionOptions

client = EngineProcessClient(EngineEndpoints(sys.argv[1], sys.argv[2]))
client.start()
started = threading.Semaphore(0)
for index in range(int(sys.argv[3])):
    client.open_session(f"other-front-{index}", SessionOptions(),
                        lambda events: [started.release() for e in events if isinstance(e, SessionStarted)])
for index in range(int(sys.argv[3])):
    assert started.acquire(timeout=30)
print("opened", flush=True)
threading.Event().wait()
"""


def open_probe(client: EngineProcessClient, session_id: str) -> object:
    """Open a session on ``client`` and return its first event (SessionStarted, or SessionEnded if refused)."""
    first: list = []
    arrived = threading.Event()

    def emit(events) -> None:
        first.extend(events)
        arrived.set()

    client.open_session(session_id, SessionOptions(), emit)
    assert arrived.wait(10), "the engine never answered an open"
    return first[0]


def test_a_front_starved_of_cpu_for_a_second_keeps_its_sessions(live):
    """A live front that sends no heartbeat for a while (here: stopped with SIGSTOP for 1.2 s, as a loaded host
    can starve it) keeps its sessions: only a front whose process ended, or one silent past FRONT_TIMEOUT_S, is
    cut. With the old 0.5 s heartbeat bound the engine closed its live sessions (seen under two pytest workers
    on a 2-core machine)."""
    client = live.runtime.worker
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, decision_events=True)
        ws.send(np.zeros(8000, dtype=np.int16).tobytes())  # one whole chunk: this front holds one engine slot
        recv_until(ws, lambda e: e["type"] == "decision")
        other = subprocess.Popen([sys.executable, "-c", FRONT_SCRIPT, client.endpoints.commands,
                                  client.endpoints.events, "1"], stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "opened"
            other.send_signal(signal.SIGSTOP)
            time.sleep(1.2)
            refused = open_probe(client, "probe-while-stopped")
            assert isinstance(refused, SessionEnded) and refused.error_code == EndCode.CAPACITY, refused
            other.send_signal(signal.SIGCONT)
        finally:
            other.kill()
            other.wait(10)
            other.stdout.close()
        freed = wait_for_free_slot(client)
        client.close_session(freed)


# A front attached to another's engine that opens sessions on request and says what became of them: stdin "open"
# opens one more, "report" prints the client's failure and the end codes its sessions heard (JSON).
REPORTING_FRONT_SCRIPT = """
import json, sys, threading
from audio_interaction_server.engine.events import SessionEnded, SessionStarted
from audio_interaction_server.engine.process_client import EngineProcessClient
from audio_interaction_server.engine.wire import EngineEndpoints
from audio_interaction_server.options import SessionOptions

client = EngineProcessClient(EngineEndpoints(sys.argv[1], sys.argv[2]))
client.start()
started, ended = threading.Semaphore(0), []

def emit(events):
    for event in events:
        if isinstance(event, SessionStarted):
            started.release()
        elif isinstance(event, SessionEnded):
            ended.append(str(event.error_code))

for line in sys.stdin:
    if line.strip() == "open":
        client.set_num_admitted(client.num_admitted + 1)
        client.open_session(f"reporting-front-{client.num_admitted}", SessionOptions(), emit)
        assert started.acquire(timeout=30)
        print("opened", flush=True)
    elif line.strip() == "report":
        print(json.dumps({"failure": None if client.failure is None else str(client.failure), "ended": ended}),
              flush=True)
"""


def reporting_front(client: EngineProcessClient) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", REPORTING_FRONT_SCRIPT, client.endpoints.commands,
                             client.endpoints.events], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(front: subprocess.Popen, line: str) -> str:
    front.stdin.write(line + "\n")
    front.stdin.flush()
    return front.stdout.readline().strip()


def stop_front(front: subprocess.Popen) -> None:
    if front.poll() is None:
        front.kill()
    front.wait(10)
    front.stdin.close()
    front.stdout.close()


def test_a_front_stopped_longer_than_the_engines_silence_bound_keeps_its_sessions(live):
    """A front frozen for 2.5 s (SIGSTOP: a loaded host, swap, a long pause) hears nothing meanwhile, and neither
    does its ZeroMQ thread, so the engine's statuses of those seconds are still unread when it resumes. Its
    reader judged the engine's silence from that first wake-up, ended every session with worker_failed and
    stopped the server (2 s, ENGINE_TIMEOUT_S, where the engine waits 3 s, FRONT_TIMEOUT_S, for a starved front).
    The time the front itself stood still is not the engine's silence."""
    front = reporting_front(live.runtime.worker)
    try:
        assert ask(front, "open") == "opened"
        front.send_signal(signal.SIGSTOP)
        time.sleep(2.5)
        front.send_signal(signal.SIGCONT)
        time.sleep(0.5)
        assert json.loads(ask(front, "report")) == {"failure": None, "ended": []}
    finally:
        stop_front(front)


def test_a_front_silent_past_the_engines_bound_has_its_sessions_ended_with_a_reason_and_is_watched_again(live):
    """A front frozen past FRONT_TIMEOUT_S (3 s) has its sessions ended by the engine: with front_unresponsive,
    not as if its clients had closed them (their clients were told a normal close, their audio dropped without a
    word). The front goes on; its heartbeats carry its process id, so the engine again sees it die within a
    second (it was re-registered without one, and its death then waited for 3 s of silence)."""
    client = live.runtime.worker
    front = reporting_front(client)
    try:
        assert ask(front, "open") == "opened"
        front.send_signal(signal.SIGSTOP)
        time.sleep(3.6)
        front.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while not (report := json.loads(ask(front, "report")))["ended"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert report == {"failure": None, "ended": [EndCode.FRONT_UNRESPONSIVE.value]}, report
        assert ask(front, "open") == "opened"  # both slots held now: this front's new session and ...
        held = open_probe(client, "probe-held")
        assert isinstance(held, SessionStarted)  # ... this one
        front.send_signal(signal.SIGKILL)
        front.wait(10)
        killed_s = time.monotonic()
        freed = wait_for_free_slot(client)
        freed_after_s = time.monotonic() - killed_s
        client.close_session(freed)
        client.close_session("probe-held")
    finally:
        stop_front(front)
    assert freed_after_s < 1.5, f"the dead front's slot was freed only after {freed_after_s:.2f} s"


def test_a_front_that_leaves_frees_what_it_held_at_once_even_if_a_heartbeat_follows_its_goodbye(live, monkeypatch):
    """An attached front that stops sends Goodbye; a heartbeat its reader sent just after it (before the reader
    stopped) made the engine count the front again, holding its admitted sessions' slots for FRONT_TIMEOUT_S
    (the window widened here as the review that found it did: the line logged between the two made slow)."""
    from audio_interaction_server.engine import process_client

    client = live.runtime.worker
    leaving = EngineProcessClient(client.endpoints)
    leaving.start()
    leaving.set_num_admitted(2)  # a front holding both slots for sessions it admitted
    assert wait_until_free_slots(client, 0), "the engine never counted the front's admitted sessions"
    info = process_client.log.info
    monkeypatch.setattr(process_client.log, "info", lambda *args: (time.sleep(0.3), info(*args)))
    leaving.stop()
    assert wait_until_free_slots(client, 2, timeout_s=1.0), \
        f"the engine still counts the front that left: {client.engine_status}"


def test_a_detached_session_whose_slot_goes_to_a_new_one_is_ended_with_a_reason_not_closed(live):
    """Every slot taken, one by a detached session: the engine gives that slot to the next open. It closed the
    session as if its client had asked, so a client whose resume was accepted at that very moment (its front read
    the eviction notice after the resume) got `session.closed` "closed" and 1000, a normal end it never asked for
    (seen 7 of 7 times in a review's race). The engine now ends it with detached_evicted: a fatal error and 4009,
    so the client starts a new session; a front that still holds it detached ends it as before."""
    front = EngineProcessClient(live.runtime.worker.endpoints)
    evicted: list[str] = []
    front.on_evicted = evicted.append
    front.start()
    events: dict[str, list] = {"evict-a": [], "evict-b": [], "evict-c": []}
    try:
        for session_id in ("evict-a", "evict-b"):
            front.set_num_admitted(front.num_admitted + 1)
            front.open_session(session_id, SessionOptions(), events[session_id].extend)
        wait_until(lambda: all(events[s] and isinstance(events[s][0], SessionStarted) for s in ("evict-a", "evict-b")))
        front.session_detached("evict-a", time.monotonic())
        front.open_session("evict-c", SessionOptions(), events["evict-c"].extend)
        wait_until(lambda: events["evict-c"] and any(isinstance(e, SessionEnded) for e in events["evict-a"]))
        assert isinstance(events["evict-c"][0], SessionStarted), events["evict-c"]
        assert evicted == ["evict-a"]
        ended = [e for e in events["evict-a"] if isinstance(e, SessionEnded)]
        assert ended[0].error_code == "detached_evicted", ended
    finally:
        for session_id in ("evict-b", "evict-c"):
            front.close_session(session_id)
        front.stop()


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


def wait_until_free_slots(client: EngineProcessClient, free: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.engine_status is not None and client.engine_status.free_slots == free:
            return True
        time.sleep(0.02)
    return False


def wait_for_free_slot(client: EngineProcessClient) -> str:
    """Open probe sessions until one starts (the slot a killed front held is freed); its session id."""
    for attempt in range(250):
        first = open_probe(client, f"probe-free-{attempt}")
        if isinstance(first, SessionStarted):
            return f"probe-free-{attempt}"
        assert first.error_code == EndCode.CAPACITY, first
        time.sleep(0.02)
    raise AssertionError("the killed front's slot was never freed")


def test_a_front_that_dies_has_its_slots_freed_within_a_second(live):
    """A second front attached to the live server's engine takes the slot this front's session leaves, then is
    killed (-9): the engine hears no heartbeat and closes its session, so this front opens one within a second,
    and this front's session streams on untouched."""
    client = live.runtime.worker
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, decision_events=True)
        ws.send(np.zeros(8000, dtype=np.int16).tobytes())  # 0.5 s: one whole chunk, so it holds an engine slot
        recv_until(ws, lambda e: e["type"] == "decision")
        other = subprocess.Popen([sys.executable, "-c", FRONT_SCRIPT, client.endpoints.commands,
                                  client.endpoints.events, "1"], stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "opened"
            refused = open_probe(client, "probe-full")
            assert isinstance(refused, SessionEnded) and refused.error_code == EndCode.CAPACITY, refused
            other.send_signal(signal.SIGKILL)
            other.wait(10)
            killed_s = time.monotonic()
            attempt = 0
            while True:
                attempt += 1
                first = open_probe(client, f"probe-{attempt}")
                if isinstance(first, SessionStarted):
                    break
                assert first.error_code == EndCode.CAPACITY, first
                assert time.monotonic() - killed_s < 5, "the dead front's slots were never freed"
                time.sleep(0.02)
            freed_after_s = time.monotonic() - killed_s
            client.close_session(f"probe-{attempt}")
        finally:
            if other.poll() is None:
                other.kill()
            other.stdout.close()
        assert freed_after_s < 1.0, f"the dead front's slots were freed only after {freed_after_s:.2f} s"
        ws.send(np.zeros(16000, dtype=np.int16).tobytes())
        ws.send(json.dumps({"type": "input.flush", "trailing_silence_s": 0.2}))
        after = recv_until(ws, lambda e: e["type"] == "input.flushed")
        assert [e["chunk"] for e in after if e["type"] == "decision"] == [1, 2, 3, 4]  # 1.7 s in all, padded
        assert not [e for e in after if e["type"] == "error"]


def test_a_front_that_reads_slower_than_the_engine_sends_keeps_its_sessions(live):
    """A front whose reader delivers each engine message in 20 ms (a busy process) while the engine sends one per
    step: the reader read on until the socket was empty, never got back to its heartbeat, and the engine, hearing
    nothing for 3 s from a front that had no command to send (its client done talking, a reply being made), ended
    its session with front_unresponsive (review, 2026-12-07)."""
    from audio_interaction_server.audio.blocks import PaddedBlocks

    slow = EngineProcessClient(live.runtime.worker.endpoints)
    slow.start()
    ended: list[SessionEnded] = []
    delivery_s = [0.02]  # what delivering costs this front now
    all_read = threading.Event()

    def deliver(events) -> None:
        time.sleep(delivery_s[0])
        ended.extend(event for event in events if isinstance(event, SessionEnded))
        if ended:
            all_read.set()

    try:
        slow.open_session("slow-reader", SessionOptions(max_turn_tokens=400), deliver)
        noise = np.random.default_rng(0).normal(0, 0.1, (75, 6640)).astype(np.float32)
        slow.push_audio("slow-reader", PaddedBlocks(noise, 0))  # 30 s at once: a step, and a message, per chunk
        slow.request_reply("slow-reader")  # then no command while the engine works through it
        time.sleep(6.0)
        delivery_s[0] = 0.0  # fast again: what is queued behind the backlog (an end, if any) comes through
        slow.close_session("slow-reader")
        assert all_read.wait(30), "the session's end never arrived"
        assert [event.error_code for event in ended] != [EndCode.FRONT_UNRESPONSIVE], ended
    finally:
        slow.stop()


def test_an_open_after_the_client_stopped_is_answered_at_once(live):
    """As the thread transport's Worker does: an open after stop() ends at once with server_shutdown. Over the
    process transport it went into a closed socket and was never answered (review, 2026-12-07)."""
    client = EngineProcessClient(live.runtime.worker.endpoints)
    client.start()
    client.stop()
    answered: list = []
    client.open_session("after-stop", SessionOptions(), answered.extend)
    assert [type(event) for event in answered] == [SessionEnded], answered
    assert answered[0].error_code == EndCode.SERVER_SHUTDOWN


def test_an_engine_that_cannot_load_raises_the_loaders_own_error(tiny_checkpoint, tmp_path):
    """The server says why (its ``error:`` line) as it does with the engine on a thread, not only 'exited 1'."""
    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.model.checkpoint import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shard = next(broken.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    client = EngineProcessClient.spawn(broken, EngineConfig(device="cpu", max_sessions=1))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        client.start()
    assert client.process.exitcode == 1


def test_the_front_and_engine_threads_carry_their_names_for_top_and_profilers(resume_server):
    """The threads that carry the boundary have OS names (``top -H``, py-spy, ``benchmarks.host_cost`` rows): the
    front's reader of engine events, the engine's model worker and its sender of events."""
    process, _ = resume_server

    def thread_names(pid: int) -> set[str]:
        return {(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()}

    assert "engine-events" in thread_names(process.pid)
    assert {"model-worker", "engine-sender"} <= thread_names(engine_pid_of(process.pid))


def engine_pid_of(server_pid: int) -> int:
    """The engine process the server spawned (its child running multiprocessing's spawn_main)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == server_pid and b"spawn_main" in command:
            return int(entry.name)
    raise AssertionError(f"server {server_pid} has no engine process")


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_engine_process_runs_torch_with_passive_openmp_waits_unless_told_otherwise(tiny_checkpoint, given):
    """``OMP_WAIT_POLICY=PASSIVE`` is in the environment the engine process (the one that runs torch) starts with;
    a policy the operator set is kept. OpenMP reads it as torch loads, so it must be there before, not set later."""
    env = {"AIS_ENGINE__TRANSPORT": "process"} | ({} if given is None else {"OMP_WAIT_POLICY": given})
    saved = os.environ.pop("OMP_WAIT_POLICY", None)  # the server inherits the suite's environment
    try:
        process, _ = spawn_server(tiny_checkpoint, env)
    finally:
        if saved is not None:
            os.environ["OMP_WAIT_POLICY"] = saved
    try:
        engine_env = Path(f"/proc/{engine_pid_of(process.pid)}/environ").read_bytes().split(b"\0")
        assert f"OMP_WAIT_POLICY={given or 'PASSIVE'}".encode() in engine_env
    finally:
        stop_server(process)


def wait_until_gone(pid: int | None, timeout_s: float) -> None:
    """Wait for a process that is not our child to end (a zombie counts as ended: its reaper is not ours)."""
    assert pid is not None
    deadline = time.monotonic() + timeout_s
    while not process_has_ended(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs {timeout_s:g} s on"
        time.sleep(0.02)


def stream_until_decisions(ws, shared_audio: Path) -> None:
    recv_event(ws)
    send_configure(ws, decision_events=True)
    send_count_bark(ws, shared_audio)
    recv_until(ws, lambda e: e["type"] == "decision")


def assert_closed_by_engine_failure(events: list[dict], code: int) -> None:
    assert code == 1011
    assert [e["code"] for e in events if e["type"] == "error"] == ["worker_failed"]
    assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "worker_failed"


def test_a_front_whose_engine_took_seconds_to_answer_is_not_taken_for_one_that_stopped_answering(live):
    """The engine's silence was counted from the client's construction until its reader thread first ran: a front
    whose engine loaded for over 2 s said it was ready, and its first client was refused for an engine that "has
    not answered" (the review of the engine-stall change, a tree's restarted front under load)."""
    client = EngineProcessClient(live.runtime.worker.endpoints)
    time.sleep(2.5)  # as while the engine loads
    client.start()
    try:
        assert client.quiet_s is None
    finally:
        client.stop()


def test_an_engine_stopped_for_a_few_seconds_loses_no_session(live):
    """An engine process stopped for 2 s (SIGSTOP here: a debugger, CPU starvation, a page-in, a cgroup freeze) was
    taken for dead: every session of every front ended with worker_failed and the server exited (hostile probe,
    round four). Its process lives, so its silence is a stall until engine.hang_timeout_s (10 s): meanwhile new
    sessions are refused (not_ready, 1013) and /ready answers 503; once it answers, the open session gets a decision
    for every chunk it sent, and new sessions are admitted again."""
    engine = live.runtime.worker.process.process
    chunk = np.zeros(6400, dtype=np.float32).tobytes()  # 0.4 s at 16 kHz
    with live.connect() as ws:
        recv_event(ws)
        send_configure(ws, decision_events=True)
        ws.send(chunk)
        assert recv_until(ws, lambda e: e["type"] == "decision")[-1]["chunk"] == 0
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            stopped_s = time.monotonic()
            for _ in range(7):  # at real time, through the stop
                time.sleep(0.4)
                ws.send(chunk)
            while time.monotonic() < stopped_s + 3.0:
                time.sleep(0.05)
            status, body = live.get("/ready")
            assert status == 503 and "has not answered" in json.loads(body)["reason"], body
            with live.connect() as refused:
                events, code = recv_to_close(refused, timeout=10)
            assert events[0]["code"] == "not_ready" and "has not answered" in events[0]["message"], events
            assert code == 1013
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        events = recv_until(ws, lambda e: e["type"] == "decision" and e["chunk"] == 7, timeout=30)
        assert [e["chunk"] for e in events if e["type"] == "decision"] == list(range(1, 8))
        assert not [e for e in events if e["type"] == "error"], events
    assert live.fatal == []
    deadline = time.monotonic() + 10
    while live.get("/ready")[0] != 200:
        assert time.monotonic() < deadline, live.get("/ready")
        time.sleep(0.05)
    with live.connect() as ws:
        assert recv_event(ws)["type"] == "session.created"


def test_an_engine_killed_mid_session_closes_sessions_and_takes_the_server_to_not_ready(live, shared_audio):
    engine = live.runtime.worker.process.process
    with live.connect() as ws:
        stream_until_decisions(ws, shared_audio)
        os.kill(engine.pid, signal.SIGKILL)
        assert_closed_by_engine_failure(*recv_to_close(ws))
    deadline = time.monotonic() + 10
    while not live.fatal:  # what makes `python -m audio_interaction_server` exit 1 (next test)
        assert time.monotonic() < deadline, "the engine's death did not reach on_fatal"
        time.sleep(0.02)
    assert "the engine process was killed by SIGKILL (status -9; most often the kernel's out-of-memory killer" \
        in live.fatal[0], live.fatal
    status, body = live.get("/ready")
    assert status == 503 and "worker died" in json.loads(body)["reason"]
    with live.connect() as ws:  # a new stream is refused at once, not left waiting for an engine
        events, code = recv_to_close(ws, timeout=10)
    assert events[0]["code"] == "not_ready" and code == 1013


def test_an_engine_killed_mid_session_makes_the_server_exit_1(resume_server, shared_audio):
    from websockets.sync.client import connect

    process, port = resume_server
    with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        stream_until_decisions(ws, shared_audio)
        os.kill(engine_pid_of(process.pid), signal.SIGKILL)
        assert_closed_by_engine_failure(*recv_to_close(ws))
    assert process.wait(30) == 1
    assert "engine process was killed by SIGKILL (status -9; " in process.stderr.read()


HUNG_STEP = """
# Loaded by every Python process started with this folder first on PYTHONPATH, the engine process too: once
# {trigger} exists, the worker thread's next step blocks for ever (a kernel that never returns), the rest lives.
import os
import threading

from audio_interaction_server.engine import worker

_step = worker.Worker.step


def _step_or_hang(self):
    if os.path.exists({trigger!r}):
        threading.Event().wait()
    return _step(self)


worker.Worker.step = _step_or_hang
"""


def test_an_engine_whose_worker_thread_hangs_stops_admitting_then_is_lost(tiny_checkpoint, shared_audio, tmp_path):
    """Only the worker thread hangs (a CUDA kernel that never returns, a deadlock in a torch op): the engine's
    command thread went on sending its status, so the fronts kept hearing it: no quiet, no hang verdict, /ready 200,
    new sessions admitted into a dead engine, open ones waiting for ever (review, 2026-12-07)."""
    from websockets.sync.client import connect

    trigger = tmp_path / "hang-now"
    (tmp_path / "sitecustomize.py").write_text(HUNG_STEP.format(trigger=str(trigger)))
    python_path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    process, port = spawn_server(tiny_checkpoint, {"AIS_ENGINE__TRANSPORT": "process", "PYTHONPATH": python_path,
                                                   "AIS_ENGINE__HANG_TIMEOUT_S": "5"})
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
            stream_until_decisions(ws, shared_audio)
            trigger.touch()
            hung_s = time.monotonic()
            send_count_bark(ws, shared_audio)  # the next step hangs
            # ENGINE_QUIET_S without a turn, and its fronts' ENGINE_QUIET_S without a status: about 4 s, and a
            # loaded machine's slack.
            deadline = hung_s + 9.0
            while (ready := http_status(port, "/ready")) == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ready == 503, "the front still said it was ready with the engine's worker hung"
            events, code = recv_to_close(ws, timeout=15)
        assert_closed_by_engine_failure(events, code)
        assert time.monotonic() - hung_s < 20
        assert process.wait(30) == 1
    finally:
        if process.poll() is None:
            process.kill()
    assert "the model worker has not turned for" in process.stderr.read()


def test_a_sigterm_to_the_whole_process_group_drains_before_the_engine_stops(tiny_checkpoint, shared_audio):
    """systemd (KillMode=control-group) and ``kill -TERM -PGID`` signal the engine too: the engine waits for its
    server, whose drain closes the session with 1012, then exits 0; the engine did not die mid-drain."""
    from websockets.sync.client import connect

    process, port = spawn_server(tiny_checkpoint, {"AIS_ENGINE__TRANSPORT": "process", "AIS_DRAIN_TIMEOUT_S": "2"},
                                 preexec_fn=os.setpgrp)
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
            stream_until_decisions(ws, shared_audio)
            os.killpg(process.pid, signal.SIGTERM)
            events, code = recv_to_close(ws)
        assert code == 1012 and events[-1]["type"] == "session.closed", events[-3:]
        # (Frames still on their way when the drain closed the session are refused with invalid_state.)
        assert "worker_failed" not in [e["code"] for e in events if e["type"] == "error"]
        assert process.wait(30) == 0
        assert "engine process exited" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_an_engine_orphaned_by_a_killed_server_removes_its_sockets_directory(tiny_checkpoint):
    """A server killed outright (SIGKILL, the OOM killer) cannot remove the directory of its engine's sockets; the
    engine, which ends itself once its parent is gone, removes it, so crash loops leave nothing behind in /tmp."""
    process, port = spawn_server(tiny_checkpoint, {"AIS_ENGINE__TRANSPORT": "process"})
    try:
        engine_pid = engine_pid_of(process.pid)
        directory = sockets_directory_of(engine_pid)
        assert directory.name.startswith("ais-engine-") and directory.is_dir()
        # A closing terminal's SIGHUP reaches the whole process group too: it killed the engine mid-drain (every
        # session then ended worker_failed); like SIGINT and SIGTERM, the engine's server stops it.
        assert ignored_signals(engine_pid) >= {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}
        process.kill()
        process.wait(10)
        wait_until_gone(engine_pid, 10)  # the orphaned engine ends itself, its sockets removed before it exits
        assert not directory.exists(), sorted(p.name for p in directory.iterdir())
    finally:
        if process.poll() is None:
            process.kill()


def ignored_signals(pid: int) -> set[int]:
    """The signals process ``pid`` ignores (``SigIgn`` in /proc/<pid>/status: bit n - 1 for signal n)."""
    with open(f"/proc/{pid}/status") as status:
        mask = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


def sockets_directory_of(pid: int) -> Path:
    """The directory of the Unix sockets process ``pid`` listens on (its descriptors' inodes in /proc/net/unix)."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(descriptor)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    rows = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:]]
    paths = {Path(row[7]).parent for row in rows if len(row) > 7 and row[6] in inodes}  # inode, then path
    assert len(paths) == 1, paths
    return paths.pop()


def test_an_engine_serves_where_the_temporary_folders_path_is_too_long_for_a_socket(tiny_checkpoint, tmp_path):
    """A Unix socket's path holds 107 bytes: under a long TMPDIR (a CI workspace, a pytest folder) the server said
    "cannot serve: ZMQError: File name too long" and left its socket folder behind (review, 2026-12-07). Its
    sockets now go to /tmp where $TMPDIR's path is too long."""
    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    process, port = spawn_server(tiny_checkpoint, {"AIS_ENGINE__TRANSPORT": "process", "TMPDIR": str(long_tmp)})
    try:
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    finally:
        stop_server(process)
    assert list(long_tmp.iterdir()) == []


def test_a_worker_stall_is_not_judged_across_a_stillness_of_the_engine_process_itself():
    """The whole tree frozen longer than engine.hang_timeout_s (docker pause, a host stall) while the command
    thread was busy, not waiting in its poll: on the thaw it judged the worker before the worker had a turn, and
    the engine exited, ending every session (review of the change, 2026-12-07). A look that comes late means this
    process stood still: the stall counts from then. A worker that stays still is judged hung after that."""
    from types import SimpleNamespace

    from audio_interaction_server.engine.process import WorkerStall

    worker = SimpleNamespace(last_turn_s=time.monotonic())
    stall = WorkerStall(worker, hang_timeout_s=3.0)
    now_s = time.monotonic()
    assert not stall.has_hung(now_s)
    now_s += 4.0  # frozen for 4 s: the next look is that late
    assert not stall.has_hung(now_s) and not stall.is_stalled
    for _ in range(40):  # 4 s more of looks every 0.1 s, the worker never turning: it hangs
        now_s += 0.1
        if stall.has_hung(now_s):
            break
    else:
        raise AssertionError("a worker still for 4 s after the thaw was never judged hung")


def test_the_end_of_the_engine_process_names_a_killing_signal():
    """A tree whose engine the out-of-memory killer took ended with "error: the engine process exited with status -9
    (its log says why)": a killed process logs nothing (first-hour round 10)."""
    from audio_interaction_server.engine.process_client import engine_ended

    assert engine_ended(1) == "the engine process exited with status 1 (its log says why)"
    assert engine_ended(1, log_hint=None) == "the engine process exited with status 1"
    killed = engine_ended(-signal.SIGKILL)
    assert killed.startswith("the engine process was killed by SIGKILL (status -9; most often the kernel's "
                             "out-of-memory killer") and "its log says why" not in killed, killed
    assert engine_ended(-signal.SIGSEGV) == "the engine process was killed by SIGSEGV (status -11)"
