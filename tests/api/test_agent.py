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
        # max_sessions + open subscribers + one session's worth of subscribers (a full replica still takes them).
        assert probe(port) == "up ready maxconn:5"
        assert probe(port, b"ais-backend\n") == "up ready maxconn:5"  # an agent-send string changes nothing
        with server.connect() as speaking:
            session_id = recv_event(speaking)["session_id"]
            with server.connect(f"/v1/sessions/{session_id}/events"):
                deadline = time.monotonic() + 5
                while probe(port) != "up ready maxconn:6":  # the subscriber registers as its handshake completes
                    assert time.monotonic() < deadline, probe(port)
                    time.sleep(0.02)
            start_a_long_reply(speaking)
            assert post(server, "/v1/admin/drain", AUTHORIZED)[0] == 202
            # Draining but up: the balancer sends no new session, use-server still reaches its sessions.
            assert probe(port) == "up drain"
        server.thread.join(15)
        with pytest.raises(OSError):  # the agent stopped with the server
            probe(port)
    finally:
        server.stop()


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
