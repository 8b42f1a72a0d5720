"""The capacity agent (HAProxy's agent-check) on a live server: one line per connection, read as HAProxy reads it."""

from __future__ import annotations

import socket
import time

import pytest

from tests.api.test_admission import post, start_a_long_reply
from tests.api.test_app import AUTHORIZED, LiveServer, recv_event, server_config


def probe(port: int, send: bytes = b"") -> str:
    """What HAProxy does every agent-inter: connect, optionally send agent-send, read to the first line end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        if send:
            connection.sendall(send)
        data = b""
        while b"\n" not in data:
            chunk = connection.recv(256)
            if not chunk:
                break
            data += chunk
        assert connection.recv(256) == b"", "the agent must close after its line"
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    return data.decode().rstrip("\n")


def agent_port(server: LiveServer) -> int:
    port = server.app.state.agent.port
    assert port is not None and port != server.port
    return port


def test_the_agent_says_up_with_room_for_subscribers_then_drain(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint, agent_port=0, max_sessions=2, max_subscribers_per_session=3,
                                      drain_timeout_s=5.0)).start()
    try:
        port = agent_port(server)
        # The most WebSockets the replica ever holds (every session with all its subscribers): a bound that
        # tells a stranger nothing about the load.
        assert probe(port) == "up ready maxconn:8"
        assert probe(port, b"ais-backend\n") == "up ready maxconn:8"  # an agent-send string changes nothing
        with server.connect() as speaking:
            session_id = recv_event(speaking)["session_id"]
            with server.connect(f"/v1/sessions/{session_id}/events"):
                deadline = time.monotonic() + 5
                while server.runtime.load_report().subscribers != 1:  # registered as its handshake completes
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert probe(port) == "up ready maxconn:8"  # nothing about the subscriber
            start_a_long_reply(speaking)
            assert post(server, "/v1/admin/drain", AUTHORIZED)[0] == 202
            # Draining but up: the balancer sends no new session, use-server still reaches its sessions.
            assert probe(port) == "up drain"
        server.thread.join(15)
        with pytest.raises(OSError):  # the agent stopped with the server
            probe(port)
    finally:
        server.stop()


def test_the_agent_says_drain_while_the_engine_process_stalls_and_ready_once_it_answers(tiny_checkpoint):
    """A stalled engine (its process alive, silent past 2 s) refuses new sessions at /ready and at the handshake;
    the agent said 'up ready' all along, so the balancer kept sending new clients to be refused there."""
    import os
    import signal

    server = LiveServer(server_config(tiny_checkpoint, agent_port=0, engine={
        "checkpoint": tiny_checkpoint, "device": "cpu", "transport": "process"})).start()
    try:
        port = agent_port(server)
        assert probe(port).startswith("up ready")
        engine = server.runtime.worker.process.process
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while server.runtime.engine_quiet_reason() is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert probe(port) == "up drain"
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while (line := probe(port)) != "up ready maxconn:80":
            assert time.monotonic() < deadline, line
            time.sleep(0.05)
    finally:
        server.stop()


# A capacity agent on uvloop, as the server runs it, whose process runs out of descriptors while a probe waits.
AGENT_OUT_OF_DESCRIPTORS = """
import asyncio, resource, socket, sys
import uvloop
from audio_interaction_server.api.agent import CapacityAgent
from audio_interaction_server.api.runtime import Runtime
from audio_interaction_server.config import ServerConfig

async def main():
    agent = CapacityAgent(Runtime(ServerConfig(), on_fatal=None), "127.0.0.1", 0)
    await agent.start()
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    try:
        while True:
            held.append(socket.socket())
    except OSError:
        pass
    held.pop().close()  # one descriptor for the probe's own end: the agent's accept finds none
    first = socket.create_connection(("127.0.0.1", agent.port))
    await asyncio.sleep(0.5)
    for sock in held:
        sock.close()
    second = socket.create_connection(("127.0.0.1", agent.port))
    second.setblocking(False)
    for _ in range(60):
        await asyncio.sleep(0.1)
        try:
            print(second.recv(256).decode().strip(), flush=True)
            return
        except BlockingIOError:
            pass
    print("no answer", flush=True)

uvloop.run(main())
"""


def test_the_agent_answers_again_after_its_process_ran_out_of_descriptors():
    """One failed accept (EMFILE, while a flood of slow connections held every descriptor) ended the agent's task
    for good, silently: HAProxy kept its last word, a drain, a weight or down never reached it (hostile probe,
    round five)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", AGENT_OUT_OF_DESCRIPTORS], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "down#loading the model", (done.stdout, done.stderr[-2000:])
    assert "could not accept a probe ([Errno 24] Too many open files); trying again in 1 s" in done.stderr


def test_the_agent_says_down_without_a_model(tmp_path):
    server = LiveServer(server_config(tmp_path, agent_port=0)).start(wait_ready=False)  # an empty checkpoint dir
    try:
        port = agent_port(server)
        deadline = time.monotonic() + 10
        while not server.fatal:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # HAProxy shows the text after '#' on its stats page: the reason, without paths or exception text.
        line = probe(port)
        assert line == "down#model failed to load (the server log says why)" and str(tmp_path) not in line
    finally:
        server.stop()


def test_no_agent_unless_asked(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint)).start(wait_ready=False)
    try:
        assert server.app.state.agent is None
    finally:
        server.stop()


def flood(port: int, source: str, duration_s: float) -> tuple[int, int]:
    """Connections opened one after another from ``source`` for ``duration_s``: (answered, cut without a line)."""
    answered = cut = 0
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        with socket.socket() as connection:
            connection.settimeout(2)
            connection.bind((source, 0))
            connection.connect(("127.0.0.1", port))
            try:
                data = connection.recv(256)
            except (ConnectionResetError, TimeoutError):
                data = b""
        if data.endswith(b"\n"):
            answered += 1
        else:
            cut += 1
    return answered, cut


def test_a_flood_of_probes_is_answered_at_the_agents_rate_and_the_balancer_still_gets_its_line(tiny_checkpoint):
    server = LiveServer(server_config(tiny_checkpoint, agent_port=0, agent_probes_per_s=20.0,
                                      agent_probes_per_s_per_ip=5.0)).start()
    try:
        port = agent_port(server)
        started_s = time.monotonic()
        answered, cut = flood(port, "127.0.0.2", duration_s=1.5)  # a second loopback address: another client
        elapsed_s = time.monotonic() - started_s
        # At most 5 lines at once and 5 a second to one address; at most 20 connections taken a second in all.
        assert answered <= 5 + 5 * elapsed_s + 1, (answered, cut)
        assert answered + cut <= 20 + 20 * elapsed_s + 1, (answered, cut)
        assert probe(port) == "up ready maxconn:10"  # the balancer's own address still gets its line
    finally:
        server.stop()
