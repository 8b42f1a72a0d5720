"""Hostile clients below the app (server/audio_interaction_server/api/transport.py): a real server, raw sockets
speaking the wire protocol.

Each test drives what a hostile client does (half-sent headers, oversized headers, ping floods,
never reading) against the live server of test_app.py, with short transport limits so the
suite stays fast, and checks the server bounds it without affecting anyone else.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import struct
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from audio_interaction_server.api.log_bursts import BurstLimiter
from audio_interaction_server.api.transport_guard import TransportGuard
from audio_interaction_server.config import TransportSettings
from benchmarks.harness import LiveServer
from tests.api.test_app import API_KEY, metric_samples, recv_event, recv_until, server_config

FAST_LIMITS = dict(header_timeout_s=0.5, close_timeout_s=0.5, write_stall_timeout_s=1.0, body_timeout_s=1.0)
TRUSTED_PROXY = "127.0.0.2"  # a second loopback address: Linux routes all of 127/8 to lo


def start(checkpoint, transport: dict | None = None, **overrides) -> LiveServer:
    return LiveServer(server_config(checkpoint, transport={**FAST_LIMITS, **(transport or {})}, **overrides)).start()


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    # No cooldown after a flood cut: the flooding tests here share this server and its one client address (the
    # cooldown has a test of its own, test_a_session_whose_socket_is_cut_for_a_frame_flood_ends_...).
    server = start(tiny_checkpoint, flood={"cut_cooldown_s": 0})
    yield server
    server.stop()


# ---- raw client side: sockets and frames written out by hand, so nothing is hidden by a client library


def open_socket(port: int, source: str = "127.0.0.1", receive_buffer_bytes: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer_bytes is not None:  # before connect, so the TCP window starts small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def upgrade_request(path: str = "/v1/stream", key: str | None = API_KEY, extra: str = "") -> bytes:
    nonce = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {key}\r\n" if key is not None else ""
    return (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n{auth}{extra}\r\n").encode()


def read_response_head(sock: socket.socket, timeout_s: float = 5.0) -> tuple[bytes, bytes]:
    """(status line and headers, bytes after them)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def open_websocket(port: int, key: str | None = API_KEY, **socket_options) -> tuple[socket.socket, bytes]:
    sock = open_socket(port, **socket_options)
    sock.sendall(upgrade_request(key=key))
    head, rest = read_response_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A masked frame, as a client must send (RFC 6455 5.3); payloads up to 125 bytes."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the complete unmasked frames in ``data``."""
    frames, at = [], 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = struct.unpack("!H", data[at:at + 2])[0], at + 2
        elif length == 127:
            length, at = struct.unpack("!Q", data[at:at + 8])[0], at + 8
        if at + length > len(data):
            break
        frames.append((opcode, data[at:at + length]))
        at += length
    return frames


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection: (data, whether it closed in time)."""
    sock.settimeout(0.1)
    data, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    closes = [payload for opcode, payload in frames if opcode == CLOSE]
    return struct.unpack("!H", closes[0][:2])[0] if closes else None


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- headers


def test_half_sent_headers_are_answered_408_and_dropped_after_the_header_timeout(guarded):
    silent = open_socket(guarded.port)
    partial = open_socket(guarded.port)
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
    for sock in (silent, partial):
        data, closed = read_until_closed(sock, timeout_s=3.0)  # header_timeout_s is 0.5
        sock.close()
        assert closed and data.startswith(b"HTTP/1.1 408"), data
    assert guarded.get("/health")[0] == 200
    assert metric_samples(guarded)['ais_transport_closes_total{reason="header_timeout"}'] >= 2


@pytest.mark.parametrize("extra", [
    "X-Big: " + "a" * 9000 + "\r\n",                            # one line over websockets' 8 KiB per header
    "".join(f"X-Header-{i}: 1\r\n" for i in range(200)),         # over its 128 headers
    "X-Big: " + "a" * 20000 + "\r\n",                           # the whole head over max_header_bytes (16 KiB)
], ids=["long_line", "many_headers", "large_head"])
def test_oversized_upgrade_headers_get_431(guarded, extra):
    sock = open_socket(guarded.port)
    sock.sendall(upgrade_request(extra=extra))
    data, closed = read_until_closed(sock, timeout_s=3.0)
    sock.close()
    assert closed and data.startswith(b"HTTP/1.1 431"), data[:100]


def test_oversized_headers_of_a_plain_request_get_431(guarded):
    sock = open_socket(guarded.port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    data, closed = read_until_closed(sock, timeout_s=3.0)
    sock.close()
    assert closed and data.startswith(b"HTTP/1.1 431"), data[:100]



def refuses_heavy_heads_with_431_and_spends_the_budget(server, heavy: bytes, pipelined_heavy: bytes, plain: bytes,
                                                       first: str, second: str, num_plain_left: int) -> None:
    """``heavy`` from ``first`` is refused 431 unparsed; ``pipelined_heavy`` behind a ``plain`` request from ``second``
    (h11 parsed it) is refused before the app; then ``first`` has ``num_plain_left`` plain requests of its budget."""
    with open_socket(server.port, source=first) as sock:
        sock.sendall(heavy)
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert closed and data.startswith(b"HTTP/1.1 431"), data[:100]
    with open_socket(server.port, source=second) as sock:
        sock.sendall(plain + pipelined_heavy)
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert closed and re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200", b"431"], data[:300]
    with open_socket(server.port, source=first) as sock:
        sock.sendall(plain * (num_plain_left + 1))
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200"] * num_plain_left + [b"429"], data[-300:]


def test_a_request_of_too_many_header_lines_gets_431_unparsed_and_spends_the_budget_by_their_number(tiny_checkpoint):
    """h11 parses a header line in ~3 us, a hundredth of a plain request's cost, and the plain-request budget counted
    requests alone: a /health of 1,900 tiny headers (16 KB, within max_header_bytes) took 6.5 ms of the loop against
    0.33 ms, and one address's budget of them held a real-time neighbour's decisions at p95 0.9 s (hostile probe,
    round twelve). Past max_headers (100) a request is refused 431 before it is parsed, a pipelined one (which h11
    parsed) before the app, and each spends the address's budget by its number of lines."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.01, "http_request_burst": 40})
    heavy = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"a%d:b\r\n" % i for i in range(1_900)) + b"\r\n"
    try:
        # 19.01 requests' worth (1,901 lines with Host's, / 100): 127.0.0.7 has 20.99 of its 40 left.
        refuses_heavy_heads_with_431_and_spends_the_budget(
            server, heavy, heavy, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.7", "127.0.0.8",
            num_plain_left=20)
        assert metric_samples(server)['ais_transport_closes_total{reason="too_many_headers"}'] == 2
    finally:
        server.stop()


def test_a_handshake_of_too_many_subprotocols_gets_431_unparsed_and_spends_the_budget_by_their_number(tiny_checkpoint):
    """websockets reads Sec-WebSocket-Protocol element by element in Python: 7,800 elements in two 8 KB lines took
    13.5 ms of a refused upgrade (0.5 ms without), counted as one request, and one address's budget of such upgrades
    held a real-time neighbour's decisions at p50 / p95 229 / 769 ms (hostile probe, round twelve). Each comma of it
    (and of Connection and Upgrade) counts as a header line toward max_headers, before any parsing; an upgrade
    pipelined behind a plain request is refused before the app."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.01, "http_request_burst": 40})
    protocols = "Sec-WebSocket-Protocol: " + ",".join(["a"] * 1_900) + "\r\n"
    try:
        # 1,906 elements (7 header lines, 1,899 commas): 19.06 of the first address's 40 requests spent.
        refuses_heavy_heads_with_431_and_spends_the_budget(
            server, upgrade_request("/v1/stream", extra=protocols), upgrade_request("/nope", key=None, extra=protocols),
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.9", "127.0.0.10", num_plain_left=20)
        with connect(f"ws://127.0.0.1:{server.port}/v1/realtime", subprotocols=["realtime", "openai-beta.realtime-v1"],
                     additional_headers={"Authorization": f"Bearer {API_KEY}"}) as client:  # a few are a client's
            assert json.loads(client.recv(timeout=5))["type"] == "session.created"
    finally:
        server.stop()


def test_a_request_of_too_many_query_parameters_gets_431_before_the_app(tiny_checkpoint):
    """Starlette parses a query parameter by parameter and the log's redaction looks at each: /v1/info with 3,900
    of them (16 KB) took 10 ms of the loop against 0.5 ms, counted as one request, and one address's budget of them
    held a real-time neighbour's decisions at p50 / p95 210 / 746 ms (hostile probe, round twelve). Each "&" of the
    target counts as a header line toward max_headers; a pipelined request is refused before the app."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.01, "http_request_burst": 40})
    heavy = b"GET /v1/info?" + b"&".join([b"a=1"] * 1_900) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        # 1,900 elements (1 header line, 1,899 "&"): 19 of the first address's 40 requests spent.
        refuses_heavy_heads_with_431_and_spends_the_budget(
            server, heavy, heavy, b"GET /health?capacity=ignore&b=2 HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.11",
            "127.0.0.12", num_plain_left=21)
    finally:
        server.stop()


def test_a_refusal_before_the_app_that_spends_the_last_of_the_budget_is_the_connections_last_answer(
        tiny_checkpoint):
    """A pipelined request refused before the app (431 here; 413 and 400 alike) is answered with "Connection: close"
    and the connection closed; counting that answer against a budget it had just spent wrote a 429 after it on the
    closed connection: two answers to one request, and a second close counted."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.01, "http_request_burst": 15})
    heavy = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"a%d:b\r\n" % i for i in range(1_900)) + b"\r\n"
    plain = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with open_socket(server.port, source="127.0.0.13") as sock:
            sock.sendall(plain + heavy)  # 1 request, then 19 of a budget of 15
            data, closed = read_until_closed(sock, timeout_s=3.0)
        assert closed and re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200", b"431"], data[-300:]
        samples = metric_samples(server)
        assert samples['ais_transport_closes_total{reason="too_many_headers"}'] == 1
        assert 'ais_transport_closes_total{reason="http_request_flood"}' not in samples, samples
        with open_socket(server.port, source="127.0.0.13") as sock:  # the budget was spent all the same
            sock.sendall(plain)
            data, closed = read_until_closed(sock, timeout_s=3.0)
        assert data.startswith(b"HTTP/1.1 429"), data[:100]
    finally:
        server.stop()


def test_a_pipelined_request_of_too_many_folded_header_lines_gets_431_unparsed(tiny_checkpoint):
    """h11 makes a folded header line (obs-fold: a line that begins with a space or tab) part of the line above, so a
    pipelined request's lines, counted once h11 has parsed it, missed its folded ones: a /health of 3,900 folded
    lines pipelined behind a plain one cost ~5 ms of the loop, counted as one request, and three addresses' budgets
    of them held a real-time neighbour's decisions at p50 / p95 159 / 272 ms (hostile probe, round thirteen). A
    pipelined head is counted raw, as a first one is, before h11 parses it."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.01, "http_request_burst": 40})
    heavy = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n" + b" b\r\n" * 1_900 + b"\r\n"
    try:
        # 1,902 lines (Host, X-Folded and its 1,900 folds): 19.02 of the first address's 40 requests spent.
        refuses_heavy_heads_with_431_and_spends_the_budget(
            server, heavy, heavy, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.13", "127.0.0.14",
            num_plain_left=20)
        # The second address spent its budget by the pipelined head's lines too: 1 + 19.02 of its 40.
        with open_socket(server.port, source="127.0.0.14") as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
            data, _ = read_until_closed(sock, timeout_s=3.0)
        assert re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200"] * 19 + [b"429"], data[-300:]
        # A head that came in two parts of 82 and 80 lines, the first pipelined, is counted whole.
        half = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n" + b" b\r\n" * 80
        with open_socket(server.port, source="127.0.0.15") as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + half)
            read_response_head(sock)
            time.sleep(0.2)
            sock.sendall(b" b\r\n" * 80 + b"\r\n")
            data, closed = read_until_closed(sock, timeout_s=3.0)
        assert closed and re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"431"], data[:300]
    finally:
        server.stop()


def test_a_chunked_body_of_too_many_lines_gets_400_before_h11_reads_it(tiny_checkpoint):
    """h11 reads a chunked body chunk by chunk, and its trailer fields line by line, in Python, and uvicorn handles
    each chunk as an event: a /health with a body of 10,000 one-byte chunks (60 KB) took 57 ms of the loop against
    1.1 ms, counted as one request, and one address sending 16 of them a second (a sixth of its budget) held a
    real-time neighbour's decisions at p50 / p95 256 / 437 ms; 1,900 trailer lines cost as much as 1,900 header
    lines (hostile probe, round thirteen). A chunked body of more than max_headers line ends is refused 400 before
    h11 reads them, a pipelined one too; one of a few chunks is served."""
    server = start(tiny_checkpoint)
    chunked = b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    plain = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with open_socket(server.port, source="127.0.0.16") as sock:
            sock.sendall(chunked + b"5\r\nhello\r\n4\r\n you\r\n0\r\nX-Trailer: 1\r\n\r\n" + plain[:-2]
                         + b"Connection: close\r\n\r\n")
            data, _ = read_until_closed(sock, timeout_s=3.0)
        assert re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"200", b"200"], data[:300]
        for source, request in [("127.0.0.17", chunked + b"1\r\na\r\n" * 1_000 + b"0\r\n\r\n"),
                                ("127.0.0.18", chunked + b"0\r\n" + b"".join(b"t%d: b\r\n" % i for i in range(150))
                                 + b"\r\n"),
                                ("127.0.0.19", plain + chunked + b"1\r\na\r\n" * 1_000 + b"0\r\n\r\n")]:
            with open_socket(server.port, source=source) as sock:
                sock.sendall(request)
                data, closed = read_until_closed(sock, timeout_s=3.0)
            statuses = re.findall(rb"HTTP/1.1 (\d{3}) ", data)
            assert closed and statuses[-1] == b"400" and b"chunked request body" in data, (source, data[:300])
            assert statuses[:-1] == ([b"200"] if request.startswith(plain) else []), (source, data[:300])
        assert metric_samples(server)['ais_transport_closes_total{reason="too_many_chunks"}'] == 3
    finally:
        server.stop()


# ---- request bodies


def post_head(length_header: str, path: str = "/v1/realtime/client_secrets") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\n{length_header}\r\n").encode()


def test_a_body_over_the_limit_is_refused_413_from_its_content_length_without_being_read(guarded):
    sock = open_socket(guarded.port)
    sock.sendall(post_head("Content-Length: 300000000\r\n") + b'{"expires_after"')  # and never the other 300 MB
    data, closed = read_until_closed(sock, timeout_s=3.0)
    sock.close()
    assert closed and data.startswith(b"HTTP/1.1 413"), data[:100]
    assert guarded.get("/health")[0] == 200
    assert metric_samples(guarded)['ais_transport_closes_total{reason="body_too_large"}'] >= 1


def test_a_chunked_body_is_counted_as_it_arrives_and_cut_at_the_limit(guarded):
    sock = open_socket(guarded.port)
    sock.sendall(post_head("Transfer-Encoding: chunked\r\n"))
    chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
    sock.settimeout(3.0)
    try:
        for _ in range(64):  # 512 KiB in all, eight times the 64 KiB limit
            sock.sendall(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass  # cut while sending: the answer may already be lost with the reset, the metric says why
    data, closed = read_until_closed(sock, timeout_s=3.0)
    sock.close()
    assert closed and (data == b"" or data.startswith(b"HTTP/1.1 413")), data[:100]
    assert metric_samples(guarded)['ais_transport_closes_total{reason="body_too_large"}'] >= 1


def test_a_trickled_body_is_cut_at_the_body_timeout_while_others_are_served(guarded):
    sock = open_socket(guarded.port)
    sock.sendall(post_head("Content-Length: 1000\r\n"))
    sock.settimeout(0.1)
    data, started_s = b"", time.monotonic()
    while time.monotonic() - started_s < 4.0 and not data:  # one byte every 0.1 s: 100 s for the whole body
        try:
            sock.sendall(b" ")
            data = sock.recv(65536)
        except socket.timeout:
            assert guarded.get("/health")[0] == 200  # the server answers others meanwhile
        except (ConnectionResetError, BrokenPipeError):
            break
    rest, closed = read_until_closed(sock, timeout_s=2.0)
    sock.close()
    assert closed and (data + rest).startswith(b"HTTP/1.1 408"), (data + rest)[:100]
    assert time.monotonic() - started_s < 3.0  # body_timeout_s is 1.0
    assert metric_samples(guarded)['ais_transport_closes_total{reason="body_timeout"}'] >= 1


def test_connections_trickling_a_body_count_as_slow_ones_per_address(tiny_checkpoint):
    """A connection whose head came at once and whose body trickles held a descriptor for body_timeout_s, and no cap
    counted it: one address held 800 at once (hostile probe, round five). Now it counts as a slow header does."""
    server = start(tiny_checkpoint, {"body_timeout_s": 30.0, "max_pending_handshakes_per_ip": 3})
    slow = []
    try:
        for _ in range(5):
            sock = open_socket(server.port)
            sock.sendall(post_head("Content-Length: 1000\r\n") + b'{"expires')
            slow.append(sock)
        time.sleep(1.5)
        cut = [read_until_closed(sock, timeout_s=0.2) for sock in slow]
        assert sorted(data[:12] for data, closed in cut if closed) == [b"HTTP/1.1 429"] * 2, cut
        over_address = open_socket(server.port)
        head, _ = read_response_head(over_address, timeout_s=3.0)
        over_address.close()
        assert head.startswith(b"HTTP/1.1 429"), head
    finally:
        for sock in slow:
            sock.close()
        server.stop()


def test_a_kept_alive_connections_next_head_counts_as_slow_while_it_trickles(tiny_checkpoint):
    """Only a connection's first head was watched: the next request of a kept-alive connection could trickle
    uncounted until header_timeout_s, about 1,500 of them from one address (review of the slow-body change)."""
    server = start(tiny_checkpoint, {"header_timeout_s": 30.0, "max_pending_handshakes_per_ip": 1})
    try:
        sock = open_socket(server.port)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _ = read_response_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        time.sleep(1.5)
        over_address = open_socket(server.port)  # the address's one slow connection is that one
        head, _ = read_response_head(over_address, timeout_s=3.0)
        over_address.close()
        sock.close()
        assert head.startswith(b"HTTP/1.1 429"), head
    finally:
        server.stop()


def test_a_pipelined_requests_body_has_the_first_ones_limits(tiny_checkpoint):
    """A request whose head came in one packet with the request before it got no body deadline and no length check:
    its body never came and the connection was held past body_timeout_s (review of the slow-body change)."""
    server = start(tiny_checkpoint, {"body_timeout_s": 1.0})
    try:
        sock = open_socket(server.port)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" + post_head("Content-Length: 100\r\n"))
        started_s = time.monotonic()
        data, closed = read_until_closed(sock, timeout_s=5.0)
        sock.close()
        assert closed and time.monotonic() - started_s < 4.0, data
        assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data, data
        too_long = open_socket(server.port)
        too_long.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" + post_head("Content-Length: 99999999\r\n"))
        data, closed = read_until_closed(too_long, timeout_s=5.0)
        too_long.close()
        assert closed and b"HTTP/1.1 413" in data, data
    finally:
        server.stop()


def test_a_body_cut_at_its_timeout_is_no_server_error_in_the_log(guarded, caplog):
    """The route still awaiting the body got starlette's ClientDisconnect when the 408 closed the connection, and
    uvicorn logged 'Exception in ASGI application' at ERROR with a 55-line traceback, once per connection (hostile
    probe, round five: '990 more like this in 10 s' under a flood of trickled bodies)."""
    sock = open_socket(guarded.port)
    sock.sendall(post_head("Content-Length: 100\r\n") + b'{"expires_a')
    data, closed = read_until_closed(sock, timeout_s=5.0)
    sock.close()
    assert closed and data.startswith(b"HTTP/1.1 408"), data[:100]
    time.sleep(0.3)  # the route's end, after the close
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text[-3000:]


def test_a_websocket_session_outlives_the_body_timeout(guarded):
    # An upgrade request has no body, but h11 still waits for its end of message: no 408 may be written into
    # the WebSocket stream body_timeout_s (1.0 here) after the handshake.
    with guarded.connect() as ws:
        assert recv_event(ws)["type"] == "session.created"
        time.sleep(1.5)
        ws.send('{"type": "session.configure", "decision_events": true}')
        assert recv_event(ws)["type"] == "session.updated"


# ---- WebSocket control frames


def test_pings_are_answered_but_a_ping_flood_is_closed_with_1008(guarded):
    sock, _ = open_websocket(guarded.port)
    with sock:
        sock.sendall(client_frame(PING, b"one") + client_frame(PING, b"two"))  # a normal client's pings
        data = b""
        while len([f for f in server_frames(data) if f[0] == PONG]) < 2:
            data += sock.recv(65536)
        assert [payload for opcode, payload in server_frames(data) if opcode == PONG] == [b"one", b"two"]
        sock.sendall(client_frame(PING) * 5000)
        rest, closed = read_until_closed(sock, timeout_s=5.0)
    frames = server_frames(data + rest)
    assert closed and close_code(frames) == 1008
    assert sum(opcode == PONG for opcode, _ in frames) <= 2 + 50  # the flood is not answered
    assert wait_until(lambda: not guarded.runtime.streams)  # its session ended with it
    assert metric_samples(guarded)['ais_transport_closes_total{reason="control_frame_flood"}'] == 1


def data_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked data frame (text 0x1, binary 0x2, continuation 0x0), FIN or not; payloads up to 125 bytes."""
    frame = client_frame(opcode, payload)
    return frame if fin else bytes([frame[0] & 0x7F]) + frame[1:]


def test_endless_empty_continuation_frames_are_closed_with_1008(guarded):
    """A message begun and never finished, continued by empty frames as fast as the socket takes them: nothing
    reached the app, so no session budget saw them; the loop parsed ~200k frames a second for the idle timeout's
    two minutes, and uvicorn kept a list entry per frame (hostile probe, 2026-12-06)."""
    sock, _ = open_websocket(guarded.port)
    with sock:
        sock.sendall(data_frame(TEXT, b"x", fin=False) + data_frame(0x0, fin=False) * 20_000)
        rest, closed = read_until_closed(sock, timeout_s=5.0)
    assert closed and close_code(server_frames(rest)) == 1008
    assert wait_until(lambda: not guarded.runtime.streams)
    assert metric_samples(guarded)['ais_transport_closes_total{reason="data_frame_flood"}'] >= 1


def test_a_subscribers_unfinished_message_is_held_to_its_event_budget_not_the_audio_frame_budget(guarded):
    """A subscriber only listens, and its whole messages meet its event budget (20 a second, 200 at once); the
    fragments of a message it never finishes reached no receive, and the transport took 1,000 of them a second per
    connection: 48 subscribers of 12 sessions from one address, sending empty continuations, held a real-time
    neighbour's decisions 0.6 s late (p50) and 1.4 s (p95) (hostile probe, round twelve). Now its data frames are
    held to twice its event budget; the session it follows goes on."""
    import websockets.sync.client as ws_client

    with ws_client.connect(f"ws://127.0.0.1:{guarded.port}/v1/stream",
                           additional_headers={"Authorization": f"Bearer {API_KEY}"}) as stream:
        session_id = recv_event(stream, timeout=5)["session_id"]
        sock = open_socket(guarded.port)
        with sock:
            sock.sendall(upgrade_request(f"/v1/sessions/{session_id}/events"))
            head, _ = read_response_head(sock)
            assert head.startswith(b"HTTP/1.1 101"), head
            sock.sendall(data_frame(TEXT, b"x", fin=False) + data_frame(0x0, fin=False) * 1_000)  # a quarter of 4,000
            rest, closed = read_until_closed(sock, timeout_s=3.0)
        assert closed and close_code(server_frames(rest)) == 1008, server_frames(rest)[-3:]
        stream.send(json.dumps({"type": "input.flush"}))  # the session it followed still answers
        assert recv_until(stream, lambda event: event["type"] in ("input.flushed", "error"), timeout=5)[-1]["type"] \
            == "input.flushed"


def test_a_subscribers_message_is_held_to_a_few_kilobytes_not_the_streams_megabyte(guarded):
    """A subscriber takes nothing from what it sends, but each message could be 1 MiB (the transport's size for a
    streaming client), read, unmasked and UTF-8 checked to be dropped: 48 subscribers sending 1 MB messages within
    their message budget held a real-time neighbour's p95 at 240 ms against 109 (hostile probe, round thirteen).
    A small message is read and dropped as before; one past SUBSCRIBER_MAX_MESSAGE_BYTES closes it with 1009."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import ConnectionClosed

    from audio_interaction_server.api.connection import SUBSCRIBER_MAX_MESSAGE_BYTES

    headers = {"Authorization": f"Bearer {API_KEY}"}
    with ws_client.connect(f"ws://127.0.0.1:{guarded.port}/v1/stream", additional_headers=headers) as stream:
        session_id = recv_event(stream, timeout=5)["session_id"]
        with ws_client.connect(f"ws://127.0.0.1:{guarded.port}/v1/sessions/{session_id}/events",
                               additional_headers=headers) as subscriber:
            subscriber.send("x" * 100)
            subscriber.send(b"\0" * SUBSCRIBER_MAX_MESSAGE_BYTES)
            subscriber.ping().wait(5)  # both read and dropped: the connection stands
            subscriber.send("x" * (SUBSCRIBER_MAX_MESSAGE_BYTES + 1))
            with pytest.raises(ConnectionClosed):
                while True:
                    subscriber.recv(timeout=5)
            assert subscriber.close_code == 1009, (subscriber.close_code, subscriber.close_reason)
        stream.send(json.dumps({"type": "input.flush"}))  # the session it followed still answers
        assert recv_until(stream, lambda event: event["type"] in ("input.flushed", "error"), timeout=5)[-1]["type"] \
            == "input.flushed"


def test_a_flood_of_one_sample_audio_frames_is_closed_with_1008(guarded):
    """Each frame is valid audio and the tiny model keeps up, so the buffer never fills and no refused-audio
    budget is spent: the frame count is what costs the loop."""
    sock, _ = open_websocket(guarded.port)
    with sock:
        rest, closed = b"", False
        for _ in range(10):
            try:
                sock.sendall(data_frame(0x2, b"\x01\x00") * 2_000)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        more, closed_now = read_until_closed(sock, timeout_s=5.0)
        rest += more
    assert closed or closed_now
    assert close_code(server_frames(rest)) == 1008
    assert wait_until(lambda: not guarded.runtime.streams)
    assert metric_samples(guarded)['ais_transport_closes_total{reason="data_frame_flood"}'] >= 1


def test_a_flood_cut_with_answers_still_to_send_is_no_server_error_in_the_log(guarded, caplog):
    """A flood of invalid events read at once is cut (1008) with 4,000 of them queued ahead of the disconnect, and
    the app answers each it takes with an error event. The transport now waits for the client to read the close
    (close_timeout_s) rather than closing at once, so the socket was not gone when those answers were sent: uvicorn's
    send raised RuntimeError ("after sending 'websocket.close'") instead of ClientDisconnected, and logged 'Exception
    in ASGI application' at ERROR with a 70-line traceback, once per such cut (hostile probe, round sixteen)."""
    sock, _ = open_websocket(guarded.port)
    with sock:
        try:
            sock.sendall(data_frame(TEXT, b"{}") * 6_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        rest, closed = read_until_closed(sock, timeout_s=5.0)
    assert closed and close_code(server_frames(rest)) == 1008
    assert wait_until(lambda: not guarded.runtime.streams)
    time.sleep(0.3)  # the app's end, after the close
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text[-3000:]


@pytest.mark.parametrize("path, frame, reason", [
    # 7 samples of 44.1 kHz stereo a frame: the transport's cut (1008 with its reason)
    ("/v1/stream", b"\x01\x00" * 14, "too many WebSocket frames"),
    # Realtime appends: the app's own flood cut (event_flood) closes first, and the frames that go on coming after
    # its close spent the transport's budget: it reset the connection at once (hostile probe, round sixteen)
    ("/v1/realtime", json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), ""),
], ids=["transport_cut", "app_cut"])
def test_a_client_library_flooding_small_frames_reads_the_1008_close(guarded, path, frame, reason):
    """The close frame reaches a flooding client: the server wrote it and closed the socket with the client's
    frames still unread, so the kernel reset the connection and the client, its close frame lost, saw 1006, which
    docs/protocol.md says to resume (refused for the cut's cooldown) (first-hour review, round sixteen)."""
    import asyncio

    from websockets.asyncio.client import connect as connect_async
    from websockets.exceptions import ConnectionClosed

    async def flood() -> tuple[int | None, str | None]:
        async with connect_async(f"ws://127.0.0.1:{guarded.port}{path}",
                                 additional_headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            await client.recv()  # session.created
            try:
                # As fast as the library sends, reading nothing meanwhile: past the burst (4,000 frames) within a
                # second at any speed that floods at all, and over long before the close timeout (2 s) for the
                # client to read the close.
                for _ in range(8_000):
                    await client.send(frame)
            except ConnectionClosed:
                pass
            try:
                async for _ in client:
                    pass
            except ConnectionClosed:
                pass
            return client.close_code, client.close_reason

    assert asyncio.run(flood()) == (1008, reason)


def test_small_frames_at_a_browsers_rate_and_a_burst_of_them_are_taken(guarded):
    """128-sample frames at 48 kHz (what an AudioWorklet hands a page, 375 a second), two seconds of them at
    once after a stall, and fragmented messages a client library may send, are not a flood."""
    import websockets.sync.client as ws_client

    flood_cuts = 'ais_transport_closes_total{reason="data_frame_flood"}'
    cuts_before = metric_samples(guarded).get(flood_cuts, 0)
    with ws_client.connect(f"ws://127.0.0.1:{guarded.port}/v1/stream",
                           additional_headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        client.recv(timeout=5)  # session.created
        client.send(json.dumps({"type": "session.configure", "audio": {"sample_rate_hz": 48000}}))
        frame = b"\x00\x01" * 128
        for _ in range(750):
            client.send(frame)
        client.send([b"\x00\x01" * 16] * 8)  # one message in eight fragments
        for _ in range(100):
            client.send(frame)
            time.sleep(128 / 48000)
        client.send('{"type": "input.flush"}')
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            event = json.loads(client.recv(timeout=10))
            if event["type"] == "input.flushed":
                break
            assert event["type"] not in ("error", "session.closed"), event
        else:
            raise AssertionError("no flushed event")
    assert metric_samples(guarded).get(flood_cuts, 0) == cuts_before


def test_a_refused_client_is_closed_promptly_and_its_pings_go_unanswered(guarded):
    sock, rest = open_websocket(guarded.port, key="wrong")
    with sock:
        data, started = rest, time.monotonic()
        while close_code(server_frames(data)) is None:  # the error event, then close 1008
            data += sock.recv(65536)
        assert close_code(server_frames(data)) == 1008
        pings_until = started + 3.0
        sock.settimeout(0.05)
        closed = False
        after_close = b""
        while not closed and time.monotonic() < pings_until:  # never answer the close; keep pinging
            try:
                sock.sendall(client_frame(PING))
                chunk = sock.recv(65536)
                closed = not chunk
                after_close += chunk
            except socket.timeout:
                pass
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        elapsed_s = time.monotonic() - started
    assert closed and elapsed_s < 2.0, elapsed_s  # close_timeout_s is 0.5 (uvicorn's own: 10 s)
    assert not any(opcode == PONG for opcode, _ in server_frames(after_close))


# ---- clients that do not read


def flood_without_reading(sock: socket.socket, max_bytes: int, timeout_s: float) -> bool:
    """Send pings (full 125-byte payloads, so the pongs are large) without reading; True once the server drops us."""
    frames = client_frame(PING, b"p" * 125) * 500
    sock.settimeout(0.5)
    sent, deadline = 0, time.monotonic() + timeout_s
    while sent < max_bytes and time.monotonic() < deadline:
        try:
            sock.sendall(frames)
            sent += len(frames)
        except socket.timeout:
            continue  # the server stopped reading us (and still holds the connection)
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_a_client_that_never_reads_is_dropped_and_its_session_slot_freed(tiny_checkpoint):
    unlimited_pings = dict(control_frames_per_s=1e9, control_frame_burst=10**9, max_write_buffer_bytes=256 * 1024)
    server = start(tiny_checkpoint, unlimited_pings, max_sessions=1)
    try:
        sock, _ = open_websocket(server.port, receive_buffer_bytes=4096)
        with sock:
            assert flood_without_reading(sock, max_bytes=64 << 20, timeout_s=15.0), "the server kept the reader"
        assert wait_until(lambda: not server.runtime.streams, 3.0), "its session still holds the only slot"
        with server.connect() as ws:
            assert recv_event(ws)["type"] == "session.created"
        closes = metric_samples(server)
        assert closes.get('ais_transport_closes_total{reason="write_buffer_full"}', 0) \
            + closes.get('ais_transport_closes_total{reason="write_stall"}', 0) == 1
    finally:
        server.stop()


def test_a_closed_connection_whose_client_does_not_read_is_dropped_after_the_close_timeout(tiny_checkpoint):
    # A ping budget the flood exhausts only once the server's write buffer is full of pongs: the
    # 1008 close then waits behind them, and asyncio's close() would wait for ever.
    budget = dict(control_frames_per_s=1.0, control_frame_burst=60_000, max_write_buffer_bytes=64 << 20,
                  write_stall_timeout_s=120.0)
    server = start(tiny_checkpoint, budget)
    try:
        sock, _ = open_websocket(server.port, receive_buffer_bytes=4096)
        with sock:
            flood_without_reading(sock, max_bytes=80_000 * 131, timeout_s=10.0)

            def dropped_after_its_close() -> bool:
                closes = metric_samples(server)
                return closes.get('ais_transport_closes_total{reason="close_timeout"}') == 1

            assert wait_until(dropped_after_its_close, 3.0), "the closed connection was kept"  # close_timeout_s 0.5
            sock.settimeout(3.0)
            with pytest.raises(ConnectionResetError):  # aborted: the unread pongs were dropped, not sent
                while sock.recv(1 << 20):
                    pass
        assert metric_samples(server)['ais_transport_closes_total{reason="control_frame_flood"}'] == 1
    finally:
        server.stop()


def test_shutdown_is_not_held_by_a_client_that_stops_reading(tiny_checkpoint):
    # Nothing aborts the reader before shutdown: the buffer cap and the stall timeout are far away.
    patient = dict(control_frames_per_s=1e9, control_frame_burst=10**9, max_write_buffer_bytes=64 << 20,
                   write_stall_timeout_s=120.0)
    server = start(tiny_checkpoint, patient)
    sock, _ = open_websocket(server.port, receive_buffer_bytes=4096)
    try:
        assert not flood_without_reading(sock, max_bytes=12 << 20, timeout_s=10.0)  # kernel buffers full, then more
        time.sleep(0.3)
        started = time.monotonic()
        server.stop()
        assert not server.thread.is_alive()
        assert time.monotonic() - started < 4.0  # close_timeout_s is 0.5; uvicorn alone took about 16 s
    finally:
        sock.close()
        server.stop()


# ---- who the client is, and how many may be half-connected


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(tiny_checkpoint):
    server = start(tiny_checkpoint, {"trusted_proxies": [TRUSTED_PROXY]}, connect_rate_per_ip=0.01,
                   connect_burst_per_ip=2)

    def attempt(source: str, forwarded_for: str) -> int:
        sock = open_socket(server.port, source=source)
        try:
            with connect(f"ws://127.0.0.1:{server.port}/v1/stream", sock=sock, open_timeout=10, compression=None,
                         additional_headers={"Authorization": f"Bearer {API_KEY}",
                                             "X-Forwarded-For": forwarded_for}) as ws:
                assert recv_event(ws)["type"] == "session.created"
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    try:
        # A direct client naming a new address each time is still one address: its third attempt is refused.
        assert [attempt("127.0.0.1", f"10.0.0.{i}") for i in range(3)] == [101, 101, 429]
        # Through the trusted proxy, each forwarded client has its own budget.
        assert [attempt(TRUSTED_PROXY, f"10.0.1.{i}") for i in range(3)] == [101, 101, 101]
        assert [attempt(TRUSTED_PROXY, "10.0.1.0") for _ in range(2)] == [101, 429]
    finally:
        server.stop()


def test_connections_slow_to_send_headers_are_capped_per_address_and_in_total(tiny_checkpoint):
    server = start(tiny_checkpoint, {"trusted_proxies": [TRUSTED_PROXY], "header_timeout_s": 30.0,
                                     "max_pending_handshakes_per_ip": 3, "max_pending_handshakes": 5})
    held = []
    try:
        # Many clients connecting at once from one address are not "slow": all are served.
        burst = [open_socket(server.port) for _ in range(12)]
        for sock in burst:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        for sock in burst:
            head, _ = read_response_head(sock)
            sock.close()
            assert head.startswith(b"HTTP/1.1 200"), head
        # Five slow ones at once from one address: once they have been slow for a second, the
        # two beyond the cap of 3 are answered 429 and closed; then a new one is refused at once.
        slow = [open_socket(server.port) for _ in range(5)]
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        time.sleep(1.5)
        cut = []
        for sock in slow:
            data, closed = read_until_closed(sock, timeout_s=0.2)
            if closed:
                cut.append(data)
                sock.close()
            else:
                held.append(sock)
        assert len(held) == 3 and [data[:12] for data in cut] == [b"HTTP/1.1 429"] * 2, cut
        over_address = open_socket(server.port)
        head, _ = read_response_head(over_address, timeout_s=3.0)
        assert head.startswith(b"HTTP/1.1 429"), head
        # The trusted proxy carries many clients: not limited per address, only by the total (5 now held).
        held += [open_socket(server.port, source=TRUSTED_PROXY) for _ in range(2)]
        time.sleep(1.5)
        # The total reached refuses no one: 32 addresses each holding its share kept every other client out
        # (hostile probe, round five). A client whose request comes at once is served.
        fresh = open_socket(server.port, source="127.0.0.9")
        fresh.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, _ = read_response_head(fresh, timeout_s=3.0)
        fresh.close()
        assert head.startswith(b"HTTP/1.1 200"), head
        # One more slow connection past the total: the address holding the most (127.0.0.1, 3) loses its oldest.
        late = open_socket(server.port, source="127.0.0.9")
        late.sendall(b"GET /health HTTP/1.1\r\n")
        oldest = held.pop(0)
        head, _ = read_response_head(oldest, timeout_s=3.0)
        oldest.close()
        assert head.startswith(b"HTTP/1.1 503"), head
        held.append(late)
        assert all(not read_until_closed(sock, timeout_s=0.1)[1] for sock in held)  # the others are kept
        for sock in held:
            sock.close()
        held = []
        assert wait_until(lambda: server.get("/health")[0] == 200, 3.0)
        closes = metric_samples(server)
        assert closes['ais_transport_closes_total{reason="too_many_handshakes_from_ip"}'] == 3
        assert closes['ais_transport_closes_total{reason="too_many_handshakes"}'] == 1
    finally:
        for sock in held:
            sock.close()
        server.stop()


# ---- logs


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_burst_of_the_same_warning_is_logged_once_then_counted(tiny_checkpoint):
    server = start(tiny_checkpoint)
    records = _Records()
    logging.getLogger("uvicorn.error").addHandler(records)
    try:
        for _ in range(20):  # each is a warning in uvicorn's log, with or without a guard
            sock = open_socket(server.port)
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            read_until_closed(sock, timeout_s=2.0)
            sock.close()
        server.stop()  # the count of a burst is written when its window closes, or at the latest on stop
    finally:
        logging.getLogger("uvicorn.error").removeHandler(records)
        server.stop()
    lines = [record.getMessage() for record in records.records if "Invalid HTTP request" in record.getMessage()]
    assert len(lines) == 2, lines
    assert lines[1].startswith("19 more like this")


def test_the_log_lines_of_refused_websocket_handshakes_are_folded_into_bursts(tiny_checkpoint):
    """uvicorn writes two INFO lines for each refused WebSocket handshake ('"WebSocket /nope" 404' and 'connection
    rejected (404 Not Found)'), outside the burst limiter that folds warnings: one address opening connections as
    fast as it could, each refused, grew the log by ~100 KB a second (hostile probe, round ten). They are now folded
    like warnings: the first of each kind per window, then a count. An accepted handshake's lines are kept."""
    server = start(tiny_checkpoint)
    records = _Records()
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    uvicorn_log.setLevel(logging.INFO)  # as the server's default log_level has it
    uvicorn_log.addHandler(records)
    upgrade = (b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    try:
        for _ in range(20):
            with open_socket(server.port) as sock:
                sock.sendall(upgrade)
                data, _ = read_until_closed(sock, timeout_s=2.0)
            assert data.startswith(b"HTTP/1.1 404"), data[:100]
        with connect(f"ws://127.0.0.1:{server.port}/v1/stream",
                     additional_headers={"Authorization": f"Bearer {API_KEY}"}):
            pass
        server.stop()  # the counts are written when their windows close, or at the latest on stop
    finally:
        uvicorn_log.removeHandler(records)
        uvicorn_log.setLevel(level)
        server.stop()
    lines = [record.getMessage() for record in records.records]
    rejected = [line for line in lines if "connection rejected" in line]
    access = [line for line in lines if '"WebSocket /nope" 404' in line]
    assert len(rejected) == 2 and rejected[1].startswith("19 more like this"), rejected
    assert len(access) == 2 and access[1].startswith("19 more like this"), access
    assert any('"WebSocket /v1/stream" [accepted]' in line for line in lines), lines


def test_the_count_of_a_burst_is_written_when_its_window_ends():
    limiter = BurstLimiter(window_s=10.0)
    logger = logging.getLogger("test_transport.burst")
    logger.setLevel(logging.INFO)
    records = _Records()
    logger.addHandler(records)
    logger.addFilter(limiter)
    try:
        for i in range(5):
            logger.warning("client %d misbehaved", i)  # one kind: the template, not the arguments
        logger.warning("another kind")
        logger.info("below WARNING: never held back")
        logger.info("below WARNING: never held back")
        assert [r.getMessage() for r in records.records] == [
            "client 0 misbehaved", "another kind", "below WARNING: never held back", "below WARNING: never held back"]
        limiter.flush(now_s=time.monotonic() + 1.0)  # the window is still open: nothing yet
        assert len(records.records) == 4
        limiter.flush(now_s=time.monotonic() + 10.0)
        assert [r.getMessage() for r in records.records[4:]] == [
            "4 more like this in 10 s (not logged one by one): client 0 misbehaved"]
        logger.warning("client %d misbehaved", 9)  # a new window: logged again
        assert records.records[-1].getMessage() == "client 9 misbehaved"
    finally:
        logger.removeFilter(limiter)
        logger.removeHandler(records)


def test_past_the_total_a_trusted_proxy_loses_a_slow_connection_only_when_nobody_else_holds_one():
    """The proxy has no share of its own, so it held the most and lost its clients' connections first while
    clients reaching the port directly held theirs (review of the shedding change)."""
    guard = TransportGuard(TransportSettings(max_pending_handshakes=3, trusted_proxies=["10.0.0.1"]))
    shed: list[str] = []

    class Connection:
        def __init__(self, host: str) -> None:
            self.host = host

        def shed(self) -> None:
            shed.append(self.host)
            guard.uncount_slow(self, self.host)

    for host in ("10.0.0.1", "10.0.0.1", "192.0.2.7"):
        guard.count_slow(Connection(host), host)
    guard.count_slow(Connection("192.0.2.8"), "192.0.2.8")
    assert shed == ["192.0.2.7"] and guard.num_slow == 3
    guard.count_slow(Connection("192.0.2.9"), "192.0.2.9")
    assert shed == ["192.0.2.7", "192.0.2.8"]
    only_proxy = TransportGuard(TransportSettings(max_pending_handshakes=2, trusted_proxies=["10.0.0.1"]))
    shed.clear()
    guard = only_proxy
    for _ in range(3):
        guard.count_slow(Connection("10.0.0.1"), "10.0.0.1")
    assert shed == ["10.0.0.1"] and guard.num_slow == 2


def test_pending_handshakes_are_counted_per_ipv6_64():
    """One IPv6 client holds a /64: per address, it could hold a pending handshake from every one of them."""
    guard = TransportGuard(TransportSettings(max_pending_handshakes=100, max_pending_handshakes_per_ip=2))
    first, second = object(), object()  # connections, as far as the count goes
    guard.count_slow(first, "2001:db8:0:1::1")
    guard.count_slow(second, "2001:db8:0:1::2")
    assert guard.handshake_refusal("2001:db8:0:1::3") == (429, "too_many_handshakes_from_ip")
    assert guard.handshake_refusal("2001:db8:0:2::1") is None
    guard.uncount_slow(first, "2001:db8:0:1::1")
    guard.uncount_slow(second, "2001:db8:0:1::2")
    assert guard.handshake_refusal("2001:db8:0:1::3") is None and guard.num_slow == 0


def pipelined_statuses(port: int, request: bytes, count: int, source: str = "127.0.0.1") -> tuple[list[int], bool]:
    """``count`` copies of ``request`` written at once on one connection: the statuses of the answers, and whether
    the server closed the connection within 5 s."""
    with open_socket(port, source=source) as sock:
        sock.sendall(request * count)
        data, closed = read_until_closed(sock, timeout_s=5.0)
    return [int(status) for status in re.findall(rb"HTTP/1.1 (\d{3}) ", data)], closed


def test_a_pipelined_flood_of_plain_requests_is_answered_429_and_closed_and_other_addresses_are_served(
        tiny_checkpoint):
    """One keep-alive connection with ~64 pipelined GET /health in flight made ~3,500 requests a second, and the
    loop (and through the GIL the worker thread) had no time left: neighbours' decisions up to 6 s late (hostile
    probe, 2026-12-06). Plain requests now spend a per-address budget; upgrades do not."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 5.0, "http_request_burst": 20})
    try:
        statuses, closed = pipelined_statuses(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200)
        assert closed and statuses.count(200) <= 21 and statuses[-1] == 429, statuses
        with open_socket(server.port) as sock:  # the same address, a new connection: refused at once
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data, closed = read_until_closed(sock, timeout_s=5.0)
        assert closed and data.startswith(b"HTTP/1.1 429"), data[:100]
        with open_socket(server.port, source="127.0.0.3") as sock:  # another client is served
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data, _ = read_until_closed(sock, timeout_s=5.0)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        with connect(f"ws://127.0.0.1:{server.port}/v1/stream", sock=open_socket(server.port, source="127.0.0.3"),
                     additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        time.sleep(0.5)  # the flooding address (this test's own) earns a request back: 5 a second
        assert metric_samples(server)['ais_transport_closes_total{reason="http_request_flood"}'] >= 2
    finally:
        server.stop()


def test_plain_requests_through_a_trusted_proxy_spend_the_budget_of_the_client_it_forwards_for(tiny_checkpoint):
    """Behind the shipped HAProxy configs every request comes from the balancer, a trusted proxy, which is exempt:
    a flood of /health or /metrics through it was never refused (hostile probe, round 4: a neighbour's p95 224 ms).
    A forwarded request spends the budget of the client it is forwarded for; past it that client gets 429 without
    the proxy's connection being closed (its next request may be another client's), and other clients are served."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 5.0, "http_request_burst": 20,
                                               "trusted_proxies": ["127.0.0.9"]})
    try:
        def forwarded(client: str) -> bytes:
            return f"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n\r\n".encode()

        with open_socket(server.port, source="127.0.0.9") as sock:
            statuses = []
            for _ in range(40):
                sock.sendall(forwarded("203.0.113.7"))
                statuses.append(read_response_status(sock))
            assert statuses.count(200) <= 21 and statuses[-1] == 429, statuses
            sock.sendall(forwarded("198.51.100.1"))  # another client, on the same proxy connection
            assert read_response_status(sock) == 200
    finally:
        server.stop()


def test_websocket_upgrades_through_a_trusted_proxy_of_a_client_past_its_budget_are_refused(tiny_checkpoint):
    """A refused upgrade spends its client's plain-request budget so that the address's next connections are answered
    429 before the app (a0695a4); a direct client's are, at connection_made. Through a trusted proxy the client's
    plain requests were refused past it, but its upgrades still reached the app, each one routed and refused at full
    cost (review of a0695a4). They are refused with 429 too; other clients of the proxy are not."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.1, "http_request_burst": 5,
                                               "trusted_proxies": ["127.0.0.9"]})
    upgrade = ("GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               "X-Forwarded-For: {client}\r\n\r\n")

    def status(client: str) -> tuple[int, bytes]:
        with open_socket(server.port, source="127.0.0.9") as sock:
            sock.sendall(upgrade.format(client=client).encode())
            data, _ = read_until_closed(sock, timeout_s=5.0)
        return int(data.split()[1]), data

    try:
        statuses = [status("203.0.113.7")[0] for _ in range(8)]
        assert statuses == [404] * 5 + [429] * 3, statuses
        assert b"no WebSocket endpoint" not in status("203.0.113.7")[1]  # refused before the app
        assert status("198.51.100.1")[0] == 404  # another client of the same proxy
    finally:
        server.stop()


def test_a_metrics_scrape_spends_what_it_costs(tiny_checkpoint):
    """/metrics renders every counter, about 20 times the work of /health (5-6 ms on the event loop), and counted
    as one request: one address inside its budget could spend half the loop on scrapes (hostile probe, round 4). A
    scrape now costs METRICS_REQUEST_COST requests of the budget."""
    from audio_interaction_server.api.http_guard import METRICS_REQUEST_COST

    server = start(tiny_checkpoint, transport={"http_requests_per_s": 1.0, "http_request_burst": 100})
    try:
        statuses, closed = pipelined_statuses(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 20)
        assert closed and statuses.count(200) <= 100 // METRICS_REQUEST_COST + 1 and statuses[-1] == 429, statuses
    finally:
        server.stop()


def test_a_client_secret_request_spends_the_budget_by_its_json_items(tiny_checkpoint):
    """POST /v1/realtime/client_secrets parses its body with pydantic, which builds an error per wrong item: a 60 KB
    body of 30,000 wrong list items took ~0.2 s of the loop to refuse and counted as one request, so a server without
    an API key let three keep-alive connections hold a real-time neighbour's decisions 3-5 s late (hostile probe,
    round ten). Such a request now costs one more request of its client's budget per 256 JSON items."""
    body = b'{"session": {"output_modalities": [' + b",".join([b"0"] * 3_000) + b"]}}"  # 3,000 items: 12 requests
    request = (b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 1.0, "http_request_burst": 100})
    try:
        statuses, closed = pipelined_statuses(server.port, request, 20)
        assert closed and statuses.count(400) <= 100 // 12 + 1 and statuses[-1] == 429, statuses
    finally:
        server.stop()


def test_refused_websocket_handshakes_spend_the_plain_request_budget(tiny_checkpoint):
    """A refused handshake (429 past connect_rate_per_ip, 404 on a path no WebSocket route serves, 401) costs the
    loop what a plain request does, and spent nothing: one address opening connections as fast as it could, each
    refused, held a real-time neighbour's decisions 2-6 s late (hostile probe, round ten). It now spends a request
    of its client's plain-request budget, so that address's next connections are answered 429 as they are made."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.1, "http_request_burst": 5},
                   connect_rate_per_ip=0.1, connect_burst_per_ip=1)
    upgrade = ("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

    def status(request: str, source: str = "127.0.0.1") -> int:
        with open_socket(server.port, source=source) as sock:
            sock.sendall(request.encode())
            data, _ = read_until_closed(sock, timeout_s=5.0)
        return int(data.split()[1])

    try:
        statuses = [status(upgrade.format(path="/nope")) for _ in range(3)]
        statuses += [status(upgrade.format(path="/v1/stream")) for _ in range(3)]  # 101 (in-band 401), then 429
        assert statuses[:3] == [404] * 3 and statuses[4:] == [429] * 2, statuses
        # Five refusals spent the burst: a plain request of that address is refused as its connection is made.
        assert status("GET /health HTTP/1.1\r\nHost: x\r\n\r\n") == 429
        assert status("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.3") == 200
    finally:
        server.stop()


def test_handshakes_the_websockets_parser_refuses_spend_the_plain_request_budget(tiny_checkpoint):
    """An upgrade h11 reads but websockets' parser does not (a control character in a header value, a
    Transfer-Encoding) is answered 400 by uvicorn before any app; it spent nothing, so a flood of them went round the
    refused-handshake cost (review of a0695a4)."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.1, "http_request_burst": 5})
    upgrade = ("GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n")

    def status(request: str, source: str) -> int:
        with open_socket(server.port, source=source) as sock:
            sock.sendall(request.encode())
            data, _ = read_until_closed(sock, timeout_s=5.0)
        return int(data.split()[1])

    try:
        for source, extra in (("127.0.0.4", "X: \x01\r\n"), ("127.0.0.5", "Transfer-Encoding: chunked\r\n")):
            statuses = [status(upgrade.format(extra=extra), source) for _ in range(6)]
            assert statuses == [400] * 5 + [429], (extra, statuses)
            assert status("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", source) == 429
        assert status("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.6") == 200
    finally:
        server.stop()


def test_a_session_whose_socket_is_cut_for_a_frame_flood_ends_and_its_address_cools_down(tiny_checkpoint):
    """The transport's flood cuts (data_frame_flood, control_frame_flood) closed the socket with 1008 and the session
    then waited for a resume like one whose network dropped: a client sending audio in 1 ms frames resumed, flooded
    and was cut again, round and round (first-hour review, round 4). The session now ends with the cut, as a
    session's own flood cut ends it, and the address is refused for flood.cut_cooldown_s."""
    server = start(tiny_checkpoint, transport={"data_frames_per_s": 100.0, "data_frame_burst": 50},
                   resume_grace_s=30)
    try:
        sock, _ = open_websocket(server.port)
        with sock:
            sock.sendall(data_frame(0x2, b"\x00\x00") * 200)  # binary: one sample each
            rest, closed = read_until_closed(sock, timeout_s=5.0)
        assert closed and close_code(server_frames(rest)) == 1008, server_frames(rest)[-3:]
        assert wait_until(lambda: not server.runtime.streams), "the cut session waits for a resume"
        samples = metric_samples(server)
        assert samples['ais_sessions_total{reason="data_frame_flood"}'] == 1, samples
        with open_socket(server.port) as again:  # the address is cooling down: refused before the handshake
            again.sendall(upgrade_request())
            head, _ = read_response_head(again)
        assert head.startswith(b"HTTP/1.1 429"), head
    finally:
        server.stop()


def test_a_frame_flood_cut_ends_the_session_even_while_its_events_are_going_out(tiny_checkpoint):
    """The cut was noted only where the receive loop read the disconnect; a session with events going out had its
    send fail first, the loops ended without reading it, and the session was kept for a resume: 12 of 15 cut sessions
    resumed (review of this change, cut_race.py). Each trial here floods while decisions flow, then resumes."""
    import asyncio

    import numpy as np
    import websockets

    server = start(tiny_checkpoint, resume_grace_s=30, flood={"cut_cooldown_s": 0})
    noise = (np.random.default_rng(0).standard_normal(16) * 3000).astype("<i2").tobytes()  # 1 ms at 16 kHz

    async def trial() -> str:
        url = f"ws://127.0.0.1:{server.port}/v1/stream"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with websockets.connect(url, additional_headers=headers) as ws:
            created = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session.configure", "decision_events": True}))
            last_seq = 1

            async def read() -> None:
                nonlocal last_seq
                try:
                    async for text in ws:
                        last_seq = max(last_seq, json.loads(text).get("seq") or last_seq)
                except websockets.ConnectionClosed:
                    pass

            reader = asyncio.create_task(read())
            try:
                for _ in range(8000):
                    await ws.send(noise)
            except websockets.ConnectionClosed:
                pass
            await reader
        query = f"resume={created['session_id']}&token={created['resume_token']}&last_seq={last_seq}"
        async with websockets.connect(f"{url}?{query}", additional_headers=headers) as again:
            first = json.loads(await again.recv())
        return first.get("code") or first["type"]

    try:
        outcomes = [asyncio.run(trial()) for _ in range(5)]
        assert outcomes == ["resume_expired"] * 5, outcomes
        # The refusal can reach the client before the last cut session's end is counted: both follow the cut.
        assert wait_until(lambda: metric_samples(server)['ais_sessions_total{reason="data_frame_flood"}'] == 5)
    finally:
        server.stop()


def test_a_direct_client_in_debt_gets_one_429_for_its_next_request_and_the_connection_closes(tiny_checkpoint):
    """After a /metrics scrape left a direct keep-alive connection's budget in debt, its next request was answered
    429 by the app's check and then a second, unrequested 429 followed (review of this change)."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 1.0, "http_request_burst": 20})
    try:
        with open_socket(server.port) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response_status(sock) == 200  # 20 of 20: the budget is spent to the last request
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data, closed = read_until_closed(sock, timeout_s=5.0)
        assert closed and re.findall(rb"HTTP/1.1 (\d{3}) ", data) == [b"429"], data
    finally:
        server.stop()


def read_response_status(sock) -> int:
    """One whole response with a Content-Length from ``sock``: its status."""
    head, body = read_response_head(sock)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == length, "more than one response at once: the test reads them one by one"
    return int(head.split()[1])


def test_a_burst_of_data_frames_after_a_quiet_spell_is_held_to_data_frame_burst(tiny_checkpoint):
    """Tokens spent without a clock read were refilled, once they ran out, with all the time since the last refill
    on top of what was left: after a quiet spell a client could send up to twice data_frame_burst at once. A
    steady stream at half the rate, more frames in all than the burst, is never cut."""
    server = start(tiny_checkpoint, transport={"data_frames_per_s": 100.0, "data_frame_burst": 50})
    try:
        sock, _ = open_websocket(server.port)
        with sock:
            frame = data_frame(TEXT, b'{"type": "input.clear"}')
            for _ in range(120):  # 2.4 s at 50 a second
                sock.sendall(frame)
                time.sleep(0.02)
            time.sleep(1.0)  # 100 tokens' worth of quiet, the bucket full at 50 all along
            assert server.runtime.streams, "the steady stream was cut"
            sock.sendall(frame * 75)
            rest, closed = read_until_closed(sock, timeout_s=5.0)
        assert closed and close_code(server_frames(rest)) == 1008, server_frames(rest)[-3:]
        assert metric_samples(server)['ais_transport_closes_total{reason="data_frame_flood"}'] == 1
    finally:
        server.stop()


def test_a_content_length_of_thousands_of_digits_is_answered_413(tiny_checkpoint, caplog):
    """Python refuses to read an integer of over 4,300 digits: the transport's check raised in the protocol's
    callback, the connection was dropped without an answer, uncounted, with an ERROR traceback, outside the
    request budget (probe, round six)."""
    server = start(tiny_checkpoint)
    try:
        for digits in ("9" * 5000, "1" + "0" * 40, "0" * 5000 + "7"):
            with open_socket(server.port) as sock:
                sock.sendall(post_head(f"Content-Length: {digits}\r\n") + b"{}")
                data, closed = read_until_closed(sock, timeout_s=3.0)
            assert closed and data.startswith(b"HTTP/1.1 413"), (digits[:8], data[:100])
        assert metric_samples(server)['ais_transport_closes_total{reason="body_too_large"}'] == 3
        assert server.get("/health")[0] == 200
    finally:
        server.stop()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_pipelined_requests_without_a_body_are_not_taken_for_the_first_ones_body(guarded):
    """2,000 pipelined GET /health (70 KB in one write) were answered "413 request body over 65536 bytes", the
    bytes after the first head counted as its body; and a WebSocket's first frames sent with its upgrade
    request likewise (probe, round six). A request without Content-Length or Transfer-Encoding has no body."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    # From addresses of their own: the pipelined flood spends its address's request budget.
    statuses, _ = pipelined_statuses(guarded.port, request, 70_000 // len(request) + 1, source="127.0.0.4")
    assert statuses[:10] == [200] * 10, statuses[:10]
    # Nor a small body taken for more than its length: the GETs after it are requests of their own (review).
    body = b'{"expires_after": {"anchor": "created_at", "seconds": 60}}'
    with open_socket(guarded.port, source="127.0.0.6") as sock:
        sock.sendall(post_head(f"Content-Length: {len(body)}\r\n") + body + request * (70_000 // len(request)))
        data, _ = read_until_closed(sock, timeout_s=5.0)
    assert [int(status) for status in re.findall(rb"HTTP/1.1 (\d{3}) ", data)][:3] == [200] * 3, data[:300]
    with open_socket(guarded.port, source="127.0.0.5") as sock:
        # A WebSocket's first frames (70 KB of audio, then a close) sent with its upgrade request: never a 413.
        sock.sendall(upgrade_request() + data_frame(0x2, b"\x00" * 124) * 540
                     + client_frame(0x1, b'{"type": "session.close"}'))
        data, _ = read_until_closed(sock, timeout_s=5.0)
    assert data.startswith(b"HTTP/1.1 101"), data[:200]
    assert session_closed_event(data)["audio_received_s"] == pytest.approx(540 * 62 / 16_000, abs=0.001)


def session_closed_event(data: bytes) -> dict:
    """The ``session.closed`` event among the text frames after a 101 in ``data``."""
    _, _, frames = data.partition(b"\r\n\r\n")
    events = [json.loads(payload) for opcode, payload in server_frames(frames) if opcode == TEXT]
    closed = [event for event in events if event["type"] == "session.closed"]
    assert closed, [event["type"] for event in events]
    return closed[0]


@pytest.mark.parametrize("cut", ["whole", "in_a_frame"])
def test_frames_sent_with_the_upgrade_request_reach_the_session(guarded, caplog, cut):
    """A client's first frames in the same read as its upgrade request were dropped: uvicorn hands the WebSocket
    protocol the request rebuilt from its head, not the bytes read after it. The session never saw that audio,
    nor the close that followed it (the connection hung open); and a frame cut by the read's end left the parser
    reading the frame's second part as a header, which uvicorn met with an AssertionError ("Fatal error on
    transport") and a dropped connection. RFC 6455 4.1 has a client wait for the 101; a client that does not has
    its frames taken in order, as websockets' own server takes them."""
    audio = data_frame(0x2, b"\x00" * 124) * 5
    close = client_frame(0x1, b'{"type": "session.close"}')
    with open_socket(guarded.port, source="127.0.0.7") as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cut == "whole":
            sock.sendall(upgrade_request() + audio + close)
        else:  # the server's first read ends inside the second frame
            sock.sendall(upgrade_request() + audio[:200])
            time.sleep(0.3)
            sock.sendall(audio[200:] + close)
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert closed and data.startswith(b"HTTP/1.1 101"), data[:200]
    event = session_closed_event(data)
    assert event["reason"] == "client_closed" and event["audio_received_s"] == pytest.approx(5 * 62 / 16_000, abs=0.001)
    assert close_code(server_frames(data.partition(b"\r\n\r\n")[2])) == 1000
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_a_ping_sent_with_the_upgrade_request_is_not_answered_before_the_101(guarded):
    """Frames sent with the upgrade request are parsed before the handshake's answer: a ping's pong was written
    first, and the client read it where its 101 should be, failing its handshake (review of 80bc35e). A pong
    before the 101 is no frame a client can read: such pings go unanswered."""
    with open_socket(guarded.port, source="127.0.0.9") as sock:
        sock.sendall(upgrade_request() + client_frame(PING, b"hi"))
        time.sleep(0.5)
        sock.sendall(client_frame(TEXT, b'{"type": "session.close"}'))
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert closed and data.startswith(b"HTTP/1.1 101"), data[:200]
    assert session_closed_event(data)["reason"] == "client_closed"


def test_a_frame_flood_sent_with_the_upgrade_request_is_answered_in_http(guarded, caplog):
    """A flood of frames sent with the upgrade request was cut before the handshake's answer, where websockets
    writes no close frame: the client got nothing at all (review of 80bc35e). It gets an HTTP answer saying why."""
    with open_socket(guarded.port, source="127.0.0.10") as sock:
        sock.sendall(upgrade_request() + data_frame(0x2, b"\x00\x00") * 5000)
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert closed and data.startswith(b"HTTP/1.1 429"), data[:200]
    assert b"too many WebSocket frames" in data, data[:400]
    assert guarded.get("/health")[0] == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_an_invalid_frame_sent_with_the_upgrade_request_is_answered_400(guarded, caplog):
    """A frame the WebSocket parser refuses before the handshake's answer (here unmasked, which a client's may not
    be) failed the connection where websockets sends no close frame, and uvicorn's handler of a parser error
    assumes one: an AssertionError logged as "Fatal error on transport" and the connection dropped unanswered."""
    before = metric_samples(guarded).get('ais_transport_closes_total{reason="bad_handshake"}', 0)
    unmasked = bytes([0x82, 4]) + b"\x00" * 4
    with open_socket(guarded.port, source="127.0.0.8") as sock:
        sock.sendall(upgrade_request() + unmasked)
        data, closed = read_until_closed(sock, timeout_s=3.0)
    assert closed and data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"before the handshake" in data, data
    assert metric_samples(guarded)['ais_transport_closes_total{reason="bad_handshake"}'] == before + 1
    assert guarded.get("/health")[0] == 200
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_closed(guarded):
    """Two framings of one body: h11 reads the chunked one and kept the connection open, where a proxy in front
    that reads Content-Length sees another request in the rest: the shape of request smuggling. RFC 9112 6.1:
    the connection must close; here the request is refused 400 (probe, round six)."""
    body = b'{"expires_after": {"anchor": "created_at", "seconds": 60}}'
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    for pipelined in (False, True):
        with open_socket(guarded.port) as sock:
            first = smuggled if pipelined else b""  # the second request of a connection, pipelined after the first
            sock.sendall(first + post_head(f"Content-Length: {len(chunked) + len(smuggled)}\r\n"
                                           "Transfer-Encoding: chunked\r\n") + chunked + smuggled)
            data, closed = read_until_closed(sock, timeout_s=3.0)
        statuses = [int(status) for status in re.findall(rb"HTTP/1.1 (\d{3}) ", data)]
        assert closed and statuses == ([200, 400] if pipelined else [400]), (pipelined, data[:300])


def test_a_pipelined_request_with_two_body_lengths_never_reaches_the_app_however_its_head_arrives(tiny_checkpoint):
    """The 400 for a pipelined request with both lengths came after uvicorn had begun it: a POST /v1/admin/drain
    so sent was answered 400 and the server drained all the same; and a pipelined head split over two reads was
    never looked at, served 200 on a connection kept open (review of the change, 2026-12-07)."""
    server = start(tiny_checkpoint, drain_timeout_s=30.0)
    try:
        first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        drain = (f"POST /v1/admin/drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()
        for split_at in (None, len(first) + 20):  # the second head whole with the first, or cut in two reads
            with open_socket(server.port) as sock:
                if split_at is None:
                    sock.sendall(first + drain)
                else:
                    sock.sendall((first + drain)[:split_at])
                    time.sleep(0.2)
                    sock.sendall((first + drain)[split_at:])
                data, closed = read_until_closed(sock, timeout_s=3.0)
            statuses = [int(status) for status in re.findall(rb"HTTP/1.1 (\d{3}) ", data)]
            assert closed and statuses == [200, 400], (split_at, data[:300])
            assert server.get("/ready")[0] == 200, "the refused request drained the server"
        assert metric_samples(server)['ais_transport_closes_total{reason="two_body_lengths"}'] == 2
    finally:
        server.stop()


def test_a_malformed_url_as_a_request_target_is_400_not_a_server_error(guarded, caplog):
    """``GET http://[/x`` raised inside the target's rewrite: a 500 and an ERROR traceback, for HTTP and for a
    WebSocket (review of the change, 2026-12-07)."""
    for extra in ("", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"):
        with open_socket(guarded.port) as sock:
            sock.sendall(f"GET http://[/x HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
            data, _ = read_until_closed(sock, timeout_s=3.0)
        assert data.startswith(b"HTTP/1.1 400 "), (extra, data[:200])
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_absolute_form_targets_spend_what_their_path_costs(tiny_checkpoint):
    """``GET http://host/metrics`` was charged as one request, not the twenty a /metrics answer costs: the cost was
    read from the target as uvicorn gave it (review of the change, 2026-12-07)."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 1.0, "http_request_burst": 100})
    try:
        request = f"GET http://127.0.0.1:{server.port}/metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        statuses, _ = pipelined_statuses(server.port, request, 20)
        assert statuses.count(200) <= 6 and statuses[-1] == 429, statuses
    finally:
        server.stop()


def test_a_body_over_the_limit_never_reaches_the_route_however_its_length_is_written(guarded):
    """A Content-Length written as "N, N" (h11 takes it as N) was not read by the connection's own check, nor the
    length of a request pipelined behind another whose body was already in: 130 KB and 100 KB bodies reached
    /v1/realtime/client_secrets (review of the change, 2026-12-07)."""
    body = b'{"x": "' + b"y" * 130_000 + b'"}'
    for length in (f"{len(body)}, {len(body)}", f"{len(body)}"):
        for first in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"):
            with open_socket(guarded.port, source="127.0.0.7") as sock:
                try:
                    sock.sendall(first + post_head(f"Content-Length: {length}\r\n") + body)
                except (ConnectionResetError, BrokenPipeError):
                    pass  # refused while sending: the answer may be lost with the reset, the statuses below say
                data, _ = read_until_closed(sock, timeout_s=3.0)
            statuses = [int(status) for status in re.findall(rb"HTTP/1.1 (\d{3}) ", data)]
            assert statuses == ([200, 413] if first else [413]), (length, first, data[:300])


def test_an_absolute_form_target_gives_the_route_its_path_and_host_never_a_users_name():
    """The rewrite itself, on a scope as uvicorn makes it: the path, the query left apart, the URL's host and port
    as the Host header, never its user and password; a URL without a host keeps the Host header sent."""
    from audio_interaction_server.api.request_targets import is_absolute_form, to_origin_form

    scope = {"type": "http", "path": "HTTP://alice:pw@example.com:81/v1/%73tream", "query_string": b"a=1",
             "raw_path": b"HTTP://alice:pw@example.com:81/v1/%73tream", "headers": [(b"host", b"sent")]}
    assert is_absolute_form(scope) and to_origin_form(scope)
    assert (scope["path"], scope["raw_path"], scope["query_string"]) == ("/v1/stream", b"/v1/%73tream", b"a=1")
    assert scope["headers"] == [(b"host", b"example.com:81")]
    bare = {"type": "http", "path": "http:///health", "raw_path": b"http:///health", "headers": [(b"host", b"sent")]}
    assert to_origin_form(bare) and bare["path"] == "/health" and bare["headers"] == [(b"host", b"sent")]
    assert not is_absolute_form({"raw_path": b"/http://x"}) and not is_absolute_form({"raw_path": b"health"})


def test_a_client_sending_a_body_over_the_limit_reads_the_413_not_a_reset(guarded):
    """The 413 was written and the socket closed at once, with the body still coming: the kernel reset the
    connection as the unread bytes arrived, and an HTTP client saw a reset or a broken pipe, never the answer
    (20 of 20 with a 10 MB body; review of the change, 2026-12-07). The rest of the body, up to 4 MiB, is now read
    and dropped for a while first."""
    import http.client

    for _ in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=10,
                                                source_address=("127.0.0.8", 0))
        try:
            connection.request("POST", "/v1/realtime/client_secrets", body=b"x" * 3_000_000,
                               headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
            answer = connection.getresponse()
            assert answer.status == 413 and b"request body over 65536 bytes" in answer.read()
        finally:
            connection.close()


def test_refused_bodies_spend_their_addresses_request_budget(tiny_checkpoint):
    """Each refused body is read and dropped for a while after its 413: a churn of them from one address must not
    be free. The refusal spends a request of the address's budget, as a served one does."""
    server = start(tiny_checkpoint, transport={"http_requests_per_s": 0.1, "http_request_burst": 3})
    try:
        statuses = []
        for _ in range(5):
            with open_socket(server.port) as sock:
                sock.sendall(post_head("Content-Length: 300000000\r\n") + b"{")
                data, _ = read_until_closed(sock, timeout_s=5.0)
            statuses.append(int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None)
        assert statuses == [413, 413, 413, 429, 429], statuses
    finally:
        server.stop()
