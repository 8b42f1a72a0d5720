"""Three replicas behind Debian's HAProxy on loopback, run from the project's own deploy/haproxy/haproxy.cfg.

The replicas are ``python -m audio_interaction_server`` processes on the tiny real model, configured as
docs/scaling.md says (busy_refusal http_503, the capacity agent, a drain time, replica ids ais1..ais3);
HAProxy gets loopback addresses through the environment variables the file reads. ais1 and ais3 run their
engines in a process of their own (``engine.transport: process``, as on a GPU), ais2 on a thread: every test here
runs over both transports, for two engine processes more rather than a second cluster. The tests run in file
order on one cluster: the drain ends ais1 and the kill ends ais3, so they come last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from benchmarks.harness import free_port, spawn_server
from tests.engine.test_process_transport import engine_pid_of, stream_tokens, wait_until_gone

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = ("ais1", "ais2", "ais3")
MAX_SESSIONS = 2  # per replica: small, so "every replica full" takes six sessions
DRAIN_TIMEOUT_S = 4.0
AGENT_INTER = "100ms"  # the file's default is 1s; a test should not wait seconds for each agent probe
ENGINE_TRANSPORTS = {"ais1": "process", "ais2": "thread", "ais3": "process"}

pytestmark = [
    pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                       reason="Debian's haproxy is not installed (apt-get install haproxy; .ci/run does)"),
    # Sessions here outlive a `with` block (several are open at once); each is closed explicitly.
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
]


class Replica:
    def __init__(self, replica_id: str, checkpoint: Path) -> None:
        self.replica_id = replica_id
        self.agent_port = free_port()
        env = {"AIS_REPLICA_ID": replica_id, "AIS_BUSY_REFUSAL": "http_503", "AIS_AGENT_PORT": str(self.agent_port),
               "AIS_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S), "AIS_MAX_SESSIONS": str(MAX_SESSIONS),
               "AIS_ENGINE__MAX_SESSIONS": str(MAX_SESSIONS), "AIS_TRANSPORT__TRUSTED_PROXIES": "127.0.0.1",
               "AIS_ENGINE__TRANSPORT": ENGINE_TRANSPORTS[replica_id]}
        self.process, self.port = spawn_server(checkpoint, env)
        self.engine_pid = engine_pid_of(self.process.pid) if ENGINE_TRANSPORTS[replica_id] == "process" else None
        self.log: list[str] = []
        # The rest of its log, read on a thread: a full pipe would stall the replica.
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


class Balancer:
    """Debian's haproxy with the project's configuration file; ``reload`` is ``haproxy -sf <old pid>``."""

    def __init__(self, replicas: list[Replica], workdir: Path) -> None:
        self.port = free_port()
        self.admin_socket = workdir / "haproxy-admin.sock"
        self.env = {**os.environ, "AIS_LB_BIND": f"127.0.0.1:{self.port}",
                    "AIS_LB_STATS_BIND": f"127.0.0.1:{free_port()}", "AIS_LB_ADMIN_SOCKET": str(self.admin_socket),
                    "AIS_LB_AGENT_INTER": AGENT_INTER}
        for number, replica in enumerate(replicas, start=1):
            self.env[f"AIS{number}_ADDR"] = f"127.0.0.1:{replica.port}"
            self.env[f"AIS{number}_AGENT_PORT"] = str(replica.agent_port)
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        self._start()

    def _start(self, *extra: str) -> subprocess.Popen:
        check = subprocess.run([HAPROXY, "-c", "-f", str(HAPROXY_CFG)], env=self.env, capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(self.workdir / f"haproxy-{len(self.processes)}.log", "w")
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(HAPROXY_CFG), *extra], env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        log.close()
        self.processes.append(process)
        return process

    @property
    def process(self) -> subprocess.Popen:
        return self.processes[-1]

    def reload(self) -> subprocess.Popen:
        """A new haproxy takes the port over; the old one finishes the connections it holds, then exits."""
        old = self.process
        self._start("-sf", str(old.pid))
        return old

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the replicas backend, by server name (status: UP, DRAIN, DOWN, ...)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as admin:
                    admin.connect(str(self.admin_socket))
                    admin.sendall(b"show stat\n")
                    data = b""
                    while chunk := admin.recv(65536):
                        data += chunk
                break
            except OSError:  # the socket is being replaced by a reload
                assert time.monotonic() < deadline
                time.sleep(0.05)
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas" and row["svname"] in REPLICAS}

    def wait_for(self, condition, what: str, timeout_s: float = 20) -> dict:
        deadline = time.monotonic() + timeout_s
        while not condition(servers := self.servers()):
            assert time.monotonic() < deadline, f"{what}: {[(n, s['status'], s['slim']) for n, s in servers.items()]}"
            time.sleep(0.05)
        return servers

    def connect(self, path: str = "/v1/stream") -> ClientConnection:
        return connect(f"ws://127.0.0.1:{self.port}{path}", compression=None, open_timeout=10, max_size=None)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    with ThreadPoolExecutor(len(REPLICAS)) as pool:  # the replicas load their models side by side
        replicas = list(pool.map(lambda replica_id: Replica(replica_id, tiny_checkpoint), REPLICAS))
    balancer = Balancer(replicas, tmp_path_factory.mktemp("haproxy"))
    try:
        # Up by the health check, and the agent's "maxconn" applied: every session with its 4 subscribers.
        balancer.wait_for(lambda servers: len(servers) == 3 and all(
            s["status"] == "UP" and s["slim"] == str(MAX_SESSIONS * 5) for s in servers.values()), "replicas not up")
        yield balancer, {replica.replica_id: replica for replica in replicas}
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()


def open_session(balancer: Balancer) -> tuple[ClientConnection, dict]:
    ws = balancer.connect()
    created = json.loads(ws.recv(timeout=10))
    assert created["type"] == "session.created", created
    return ws, created


def replica_of(created: dict) -> str:
    return created["session_id"].split("_")[0]


def recv_until(ws: ClientConnection, kind: str, timeout_s: float = 30) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout_s
    while not events or events[-1]["type"] != kind:
        events.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    return events


def recv_to_close(ws: ClientConnection, timeout_s: float = 30) -> tuple[list[dict], int | None]:
    events = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=timeout_s)))
    except ConnectionClosed as closed:
        return events, None if closed.rcvd is None else closed.rcvd.code


def close_session(ws: ClientConnection) -> None:
    ws.send(json.dumps({"type": "session.close"}))
    assert recv_to_close(ws)[1] == 1000


def stream_decisions(ws: ClientConnection, num_chunks: int, first: bool = False) -> list[int]:
    """Send ``num_chunks`` chunks of silence (the first with its 40-sample look-ahead); their decisions' numbers."""
    ws.send(np.zeros(6400 * num_chunks + (1600 if first else 0), dtype=np.int16).tobytes())
    decided = []
    while len(decided) < num_chunks:
        decided += [e["chunk"] for e in recv_until(ws, "decision")[-1:]]
    return decided


def test_sessions_spread_by_least_connections_and_a_full_cluster_refuses_at_once(cluster):
    balancer, replicas = cluster
    sessions = [open_session(balancer) for _ in range(3)]
    # Least connections: with every replica empty, three sessions take three replicas.
    assert sorted(replica_of(created) for _, created in sessions) == list(REPLICAS)
    sessions += [open_session(balancer) for _ in range(3)]
    assert sorted(replica_of(created) for _, created in sessions) == sorted(REPLICAS * 2)
    for replica in replicas.values():
        assert replica.get("/v1/load")[1] | {"subscribers": 0} == {
            "replica_id": replica.replica_id, "active": 2, "detached": 0, "max": 2, "free": 0, "subscribers": 0,
            "ready": True, "draining": False}
        assert replica.get("/ready")[0] == 503 and replica.get("/ready?capacity=ignore")[0] == 200

    # Every replica full: each refuses the upgrade with 503, HAProxy retries the others, then answers 503.
    refusals_ms = []
    for _ in range(5):
        started = time.perf_counter()
        with pytest.raises(InvalidStatus) as refused:
            balancer.connect()
        refusals_ms.append((time.perf_counter() - started) * 1000)
        response = refused.value.response
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert json.loads(response.body)["code"] == "capacity"
    print(f"\nall replicas full: refused in {', '.join(f'{ms:.1f}' for ms in refusals_ms)} ms "
          f"(median {statistics.median(refusals_ms):.1f} ms)")
    assert statistics.median(refusals_ms) < 100, refusals_ms

    # A subscriber reaches the replica that holds its session, whichever replica the balancer would pick; also
    # when it names the session as the Realtime API shows one, sess_<id>.
    for number, (ws, created) in enumerate(sessions[:3]):
        named = f"sess_{created['session_id']}" if number % 2 else created["session_id"]
        with balancer.connect(f"/v1/sessions/{named}/events") as subscriber:
            close_session(ws)
            events, code = recv_to_close(subscriber)
        assert code == 1000 and events[-1]["type"] == "session.closed", events
        assert events[-1]["session_id"] == created["session_id"]
    for ws, _ in sessions[3:]:
        close_session(ws)


def test_the_same_audio_gives_the_same_tokens_on_every_replica_whatever_its_transport(cluster, shared_audio):
    """ais1 and ais3 decode through an engine process, ais2 on a thread: the same samples, the same decisions and
    replies (each session opened on its replica directly, so that each transport is sure to serve one)."""
    from audio_interaction_server.audio.files import load_audio_file

    _, replicas = cluster
    samples = load_audio_file(shared_audio / "01_count_bark" / "sample01_01.mp3")  # 3.3 s

    def tokens_of(replica: Replica) -> tuple[list, list]:
        return stream_tokens(lambda: connect(f"ws://127.0.0.1:{replica.port}/v1/stream", compression=None,
                                             open_timeout=10), samples)

    with ThreadPoolExecutor(len(replicas)) as pool:
        tokens = dict(zip(replicas, pool.map(tokens_of, replicas.values())))
    assert tokens["ais1"] == tokens["ais2"] == tokens["ais3"]
    assert tokens["ais2"][0] and tokens["ais2"][1], "the tiny model neither decided nor replied: nothing was compared"


# Every spelling of the drain call's path that the replica decodes to /v1/admin/drain (uvicorn unquotes the path,
# %2F included), and the case and dot forms a client may send.
ADMIN_PATH_SPELLINGS = ("/v1/admin/drain", "/v1/admin%2Fdrain", "/v1/admin%2fdrain", "/v1/%61dmin/drain",
                        "/v1/%61%64%6D%69%6E/drain", "/v1%2Fadmin%2Fdrain", "/v1//admin/drain", "/v1/./admin/drain",
                        "/v1/x/../admin/drain", "/V1/ADMIN/drain")


def test_the_balancer_refuses_the_drain_call_however_its_path_is_spelled(cluster):
    """HAProxy answers 403 itself (its own page, not a replica's JSON) for every spelling; no replica drains."""
    balancer, replicas = cluster
    for path in ADMIN_PATH_SPELLINGS:
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as raw:  # sent as written
            raw.sendall(f"POST {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .encode())
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        head, _, body = answer.decode(errors="replace").partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 403") and "Request forbidden by administrative rule" in body, (path, answer)
    assert not any(replica.get("/v1/load")[1]["draining"] for replica in replicas.values())


def test_the_balancer_keeps_the_replicas_metrics_to_the_inside(cluster):
    """/metrics needs no key and is the dearest plain request there is (every counter rendered): the public side
    could scrape it through the balancer as fast as it liked (hostile probe, round 4). Prometheus scrapes each
    replica directly; through the balancer, /metrics is refused however it is spelled, and /health is served."""
    balancer, replicas = cluster
    for path in ("/metrics", "/Metrics", "/%6detrics", "//metrics", "/metrics/"):
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as raw:
            raw.sendall(f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 403"), (path, answer[:200])
    with urllib.request.urlopen(f"http://127.0.0.1:{balancer.port}/health", timeout=10) as response:
        assert response.status == 200
    assert "ais_sessions_active" in replicas["ais1"].metrics()  # the replica's own port still serves it


def test_the_balancer_answers_a_request_flood_from_one_address_429_before_any_replica_works(cluster):
    """Behind the balancer every request reaches a replica as the balancer's own: a client flooding /health through
    it kept a replica's event loop busy whatever the replica answered (hostile probe, round 4: a neighbour's
    decisions up to 7 s late). HAProxy counts requests per client address (AIS_LB_REQUESTS_PER_10S, 1,000) and
    answers 429 itself past it; another address is served meanwhile."""
    balancer, replicas = cluster
    statuses = []
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10, source_address=("127.0.0.2", 0)) as raw:
        reader = raw.makefile("rb")
        for _ in range(1100):
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: lb\r\n\r\n")
            status_line = reader.readline()
            statuses.append(int(status_line.split()[1]))
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            if statuses[-1] == 429:
                break
    assert statuses[-1] == 429 and 900 <= statuses.count(200) <= 1001, (len(statuses), statuses[-3:])
    with urllib.request.urlopen(f"http://127.0.0.1:{balancer.port}/health", timeout=10) as response:
        assert response.status == 200  # this test's other address (127.0.0.1)


def open_direct_session(replica: Replica) -> ClientConnection:
    """A session the balancer does not carry (as one opened through another balancer, or detached and awaiting
    its client's resume): it holds a slot HAProxy cannot count."""
    ws = connect(f"ws://127.0.0.1:{replica.port}/v1/stream", compression=None, open_timeout=10)
    assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    return ws


@pytest.mark.parametrize("skew", ["subscribers", "sessions_it_does_not_carry"])
def test_a_new_session_finds_the_one_free_slot_whatever_the_connection_counts_say(cluster, skew):
    """One replica has a free slot, the two others are full; HAProxy's connection counts say otherwise. With
    ``subscribers``: the free one holds one session and two subscribers (three connections), each full one two
    sessions (two). With ``sessions_it_does_not_carry``: the full ones' sessions were opened around the balancer
    (zero connections each, against the free one's one). A new session must get the free slot every time, not a
    503 after retries that go back and forth between the two full replicas."""
    balancer, replicas = cluster
    first = [open_session(balancer) for _ in range(3)]
    assert sorted(replica_of(created) for _, created in first) == list(REPLICAS)
    free_ws, free_created = first[0]
    free_replica = replica_of(free_created)
    held: list[ClientConnection] = [ws for ws, _ in first]
    subscribers: list[ClientConnection] = []
    try:
        if skew == "subscribers":
            subscribers = [balancer.connect(f"/v1/sessions/{free_created['session_id']}/events") for _ in range(2)]
            # Through the balancer until the two others are full; one that lands on the free replica is closed.
            while any(replica.get("/v1/load")[1]["free"] for name, replica in replicas.items() if name != free_replica):
                ws, created = open_session(balancer)
                if replica_of(created) == free_replica:
                    close_session(ws)
                else:
                    held.append(ws)
        else:
            for ws, created in first[1:]:
                close_session(ws)
                held.remove(ws)
            held += [open_direct_session(replica) for name, replica in replicas.items() if name != free_replica
                     for _ in range(MAX_SESSIONS)]
        loads = {name: replica.get("/v1/load")[1]["free"] for name, replica in replicas.items()}
        assert loads == {name: 1 if name == free_replica else 0 for name in REPLICAS}, loads
        for _ in range(5):  # every time, not by luck of the order HAProxy tries the replicas in
            ws, created = open_session(balancer)
            assert replica_of(created) == free_replica, created
            close_session(ws)
    finally:
        for ws in held:
            close_session(ws)
        for subscriber in subscribers:
            recv_to_close(subscriber)


def test_an_haproxy_reload_keeps_live_sessions_streaming(cluster):
    balancer, _ = cluster
    sessions = [open_session(balancer) for _ in range(3)]
    for ws, _ in sessions:
        ws.send(json.dumps({"type": "session.configure", "decision_events": True}))
        recv_until(ws, "session.updated")
        assert stream_decisions(ws, 1, first=True) == [0]
    old = balancer.reload()
    # The new process answers new connections (it holds the port once the old one let go of it) ...
    balancer.wait_for(lambda servers: all(s["status"] == "UP" for s in servers.values()), "new haproxy not up")
    with balancer.connect() as newcomer:
        assert json.loads(newcomer.recv(timeout=10))["type"] == "session.created"
    # ... while the old one still carries the sessions opened through it: they stream on, nothing lost.
    for ws, _ in sessions:
        assert stream_decisions(ws, 2) == [1, 2]
    assert old.poll() is None, "the old haproxy left before its sessions ended"
    for ws, _ in sessions:
        close_session(ws)
    assert old.wait(timeout=10) == 0  # its last connection gone, the old process ends


def test_a_resume_through_the_balancer_reaches_the_replica_that_holds_the_session(cluster):
    """A dropped connection resumed through HAProxy: the session id in ?resume= routes it to its replica (any
    other replica would answer resume_expired), and the stream goes on where it was."""
    balancer, _ = cluster
    sessions = [open_session(balancer) for _ in range(3)]
    assert sorted(replica_of(created) for _, created in sessions) == list(REPLICAS)
    last_seq = {}
    for ws, created in sessions:
        ws.send(json.dumps({"type": "session.configure", "decision_events": True}))
        events = recv_until(ws, "session.updated")
        ws.send(np.zeros(6400 + 1600, dtype=np.int16).tobytes())
        events += recv_until(ws, "decision")
        last_seq[created["session_id"]] = events[-1]["seq"]
        ws.socket.close()  # vanish without a close frame: the network dropped
    time.sleep(0.5)
    # In the reverse order, each held open: least connections alone would send them elsewhere.
    resumed_sessions = []
    for _, created in reversed(sessions):
        session_id = created["session_id"]
        ws = balancer.connect(f"/v1/stream?resume={session_id}&token={created['resume_token']}"
                              f"&last_seq={last_seq[session_id]}")
        resumed = json.loads(ws.recv(timeout=10))
        assert resumed["type"] == "session.resumed" and resumed["session_id"] == session_id, resumed
        assert resumed["audio_received_s"] == 0.5 and resumed["num_chunks_decided"] == 1
        resumed_sessions.append(ws)
    for ws in resumed_sessions:
        assert stream_decisions(ws, 2) == [1, 2]
        close_session(ws)
    # The balancer logs each request's path, never its query string: a resume token there would let anyone who
    # reads the log take the session over (the replicas redact it from their own logs).
    time.sleep(0.2)
    balancer_log = "".join(path.read_text() for path in balancer.workdir.glob("haproxy-*.log"))
    assert "/v1/stream" in balancer_log
    for _, created in sessions:
        assert created["resume_token"] not in balancer_log and "token=" not in balancer_log


def test_a_draining_replica_takes_no_new_session_and_ends_its_own_with_1012(cluster):
    balancer, replicas = cluster
    sessions = [open_session(balancer) for _ in range(3)]
    draining = next(ws for ws, created in sessions if replica_of(created) == "ais1")
    # Keep ais1 busy with a reply: the drain lets a reply finish (up to the deadline) before closing.
    # At temperature 2 the tiny random model ran to 512 tokens with each of seeds 0-11 (about 3.5 s here); at
    # temperature 1, 7 replies in 12 ended early, after 68-397 tokens: too soon for the checks below, at times.
    draining.send(json.dumps({"type": "session.configure", "reply_mode": "on_request", "max_turn_tokens": 512,
                              "sampling": {"temperature": 2.0, "seed": 0}}))
    recv_until(draining, "session.updated")
    draining.send(json.dumps({"type": "response.create"}))  # the reply starts at the next chunk decided
    draining.send(np.zeros(8000, dtype=np.int16).tobytes())
    recv_until(draining, "turn_begin")

    ais1 = replicas["ais1"]
    signalled = time.monotonic()
    ais1.process.send_signal(signal.SIGTERM)
    going_away = recv_until(draining, "session.going_away", timeout_s=5)[-1]
    assert 0 < going_away["deadline_s"] <= DRAIN_TIMEOUT_S
    # Draining, with its session still open: the agent says so, and HAProxy stops balancing onto it.
    assert ais1.get("/v1/load")[1] | {"subscribers": 0} == {
        "replica_id": "ais1", "active": 1, "detached": 0, "max": 2, "free": 1, "subscribers": 0, "ready": True,
        "draining": True}
    assert ais1.get("/ready")[0] == 503
    metrics = ais1.metrics()
    assert "ais_draining 1.0" in metrics and "ais_drain_sessions_left 1.0" in metrics
    balancer.wait_for(lambda servers: servers["ais1"]["status"] == "DRAIN (agent)", "HAProxy never saw the drain",
                      timeout_s=DRAIN_TIMEOUT_S / 2)
    assert ais1.process.poll() is None
    # ais1 has a free slot, yet new sessions go to the others (ais2 and ais3 each have one free).
    newcomers = [open_session(balancer) for _ in range(2)]
    assert sorted(replica_of(created) for _, created in newcomers) == ["ais2", "ais3"]

    try:
        events, code = recv_to_close(draining)
        closed_s = time.monotonic() - signalled
        assert code == 1012, (code, events[-3:])
        assert closed_s < DRAIN_TIMEOUT_S
        assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "server_draining"
        assert [e["type"] for e in events if e["type"] in ("turn_end",)] == ["turn_end"]  # the reply ended first
        status = ais1.process.wait(timeout=DRAIN_TIMEOUT_S + 20)
        exited_s = time.monotonic() - signalled
        drained = [line for line in ais1.log if "drained" in line]
        print(f"\ndrain: session closed with 1012 {closed_s:.2f} s and the process exited {status} {exited_s:.2f} s "
              f"after SIGTERM (drain_timeout_s {DRAIN_TIMEOUT_S})")
        assert status == 0 and drained, ais1.log[-20:]
        wait_until_gone(ais1.engine_pid, timeout_s=5)  # its engine process stopped with it
        # The drain ends by its deadline; then the process stops (uvicorn, the worker, the interpreter with torch:
        # 3-4 s alone, 9.5 s once on a loaded 2-core machine).
        assert exited_s < DRAIN_TIMEOUT_S + 15
    finally:  # the sessions on the other replicas end whatever happened here: the next test needs their slots
        for ws, _ in sessions + newcomers:
            if ws is not draining:
                close_session(ws)


def test_a_killed_replica_ends_its_streams_and_new_sessions_land_on_the_others(cluster):
    balancer, replicas = cluster
    if replicas["ais1"].process.poll() is None:
        pytest.skip("runs after the drain test, which ends ais1")
    victim_ws, victim = open_session(balancer)
    other_ws, other = open_session(balancer)
    assert {replica_of(victim), replica_of(other)} == {"ais2", "ais3"}
    if replica_of(victim) != "ais3":  # the one with an engine process: that process must not outlive its server
        (victim_ws, victim), (other_ws, other) = (other_ws, other), (victim_ws, victim)
    killed = replicas["ais3"]
    survivor = "ais2"
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(timeout=10)
    wait_until_gone(killed.engine_pid, timeout_s=5)  # orphaned, the engine process ends itself
    # Its client's stream ends without a close frame from the server (the process is gone).
    _, code = recv_to_close(victim_ws, timeout_s=10)
    assert code is None
    # The client reconnects at once: HAProxy's connection to the dead replica fails and is retried elsewhere,
    # before any health check has noticed.
    reconnected_ws, reconnected = open_session(balancer)
    assert replica_of(reconnected) == survivor
    close_session(reconnected_ws)
    # The other replica's session never noticed.
    other_ws.send(json.dumps({"type": "session.configure", "decision_events": True}))
    recv_until(other_ws, "session.updated")
    assert stream_decisions(other_ws, 1, first=True) == [0]
    close_session(other_ws)
