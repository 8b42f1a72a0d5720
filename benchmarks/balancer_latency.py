"""What HAProxy adds to a session's latency: the same replica, reached directly and through the balancer, in one run.

    python -m benchmarks.balancer_latency [--streams 2 8] [--seconds 20] [--checkpoint DIR]

One ``python -m audio_interaction_server`` replica (configured as behind a balancer: busy_refusal http_503,
the capacity agent) and Debian's ``haproxy`` running the project's deploy/haproxy/haproxy.cfg, every server
line of it pointing at that replica. For each stream count, half the streams connect directly and half through
HAProxy, all at once, so both halves share the same server load; streams come in pairs, one per route, that
send the same audio (the shared recordings in real time, 16 kHz mono, 100 ms frames, staggered over one chunk)
with decision events on, so both routes wait behind the same replies. Two clocks per route:

decision  the frame completing a chunk sent -> its ``decision`` event received (as benchmarks.server_latency)
connect   the WebSocket handshake started -> ``session.created`` received

Prints a Markdown table (docs/performance.md, "Behind a load balancer").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from audio_interaction_server.spec import CHUNK_S, SAMPLE_RATE_HZ
from benchmarks.harness import REPO_ROOT, free_port, spawn_server
from benchmarks.served import audio_loop, stream_audio, stream_timing_decisions

HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
MAX_TURN_TOKENS = 4  # short replies, as benchmarks.server_latency: the figure is about the path, not the reply


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def start_haproxy(replica_port: int, agent_port: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = free_port()
    env = {**os.environ, "AIS_LB_BIND": f"127.0.0.1:{port}", "AIS_LB_STATS_BIND": f"127.0.0.1:{free_port()}",
           "AIS_LB_ADMIN_SOCKET": str(workdir / "admin.sock"), "AIS_LB_AGENT_INTER": "200ms"}
    for number in (1, 2, 3):  # the file names three servers: all are the one replica here
        env[f"AIS{number}_ADDR"] = f"127.0.0.1:{replica_port}"
        env[f"AIS{number}_AGENT_PORT"] = str(agent_port)
    process = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not all_servers_up(workdir / "admin.sock"):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("haproxy did not bring its servers up")
        time.sleep(0.1)
    return process, port


def all_servers_up(admin_socket: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as admin:
            admin.connect(str(admin_socket))
            admin.sendall(b"show stat\n")
            data = b""
            while chunk := admin.recv(65536):
                data += chunk
    except OSError:
        return False
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    servers = [row for row in rows if row["pxname"] == "replicas" and row["svname"].startswith("ais")]
    return len(servers) == 3 and all(row["status"] == "UP" for row in servers)


async def time_connect(url: str) -> float:
    import websockets

    started = time.perf_counter()
    async with websockets.connect(url, compression=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        elapsed = time.perf_counter() - started
        await ws.send(json.dumps({"type": "session.close"}))
        async for _ in ws:
            pass
    return elapsed


def run(urls: dict[str, str], num_streams: int, seconds: float, loop: np.ndarray) -> dict[str, dict]:
    """``num_streams`` real-time streams at once, alternating between the routes, in pairs that stream the same
    audio (so both routes see the same replies, which decisions wait behind); then connect timings."""
    routes = list(urls)
    latencies: dict[str, list[float]] = {route: [] for route in routes}
    num_samples = int(seconds * SAMPLE_RATE_HZ)

    async def main() -> dict[str, list[float]]:
        start = time.perf_counter() + 1.0
        await asyncio.gather(*(
            stream_timing_decisions(urls[routes[i % len(routes)]], stream_audio(loop, i // len(routes), num_samples),
                                    start + i * CHUNK_S / num_streams, latencies[routes[i % len(routes)]],
                                    MAX_TURN_TOKENS, timeout_s=60)
            for i in range(num_streams)))
        connects: dict[str, list[float]] = {route: [] for route in routes}
        for _ in range(20):  # one at a time, alternating: handshake, session.created, close
            for route in routes:
                connects[route].append(await time_connect(urls[route]))
        return connects

    connects = asyncio.run(main())
    return {route: {"decisions": latencies[route], "connects": connects[route]} for route in routes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: the tiny demo model")
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 8], help="streams per run (half per route)")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per stream (streamed in real time)")
    args = parser.parse_args()
    agent_port = free_port()
    env = {"AIS_ENGINE__MAX_SESSIONS": str(max(args.streams)), "AIS_REPLICA_ID": "ais1",
           "AIS_BUSY_REFUSAL": "http_503", "AIS_AGENT_PORT": str(agent_port),
           "AIS_TRANSPORT__TRUSTED_PROXIES": "127.0.0.1", "AIS_CONNECT_RATE_PER_IP": ""}
    replica, replica_port = spawn_server(args.checkpoint, env, log_to_file=True)
    loop = audio_loop()
    with tempfile.TemporaryDirectory() as workdir:
        balancer, balancer_port = start_haproxy(replica_port, agent_port, Path(workdir))
        urls = {"direct": f"ws://127.0.0.1:{replica_port}/v1/stream",
                "haproxy": f"ws://127.0.0.1:{balancer_port}/v1/stream"}
        version = subprocess.run([shutil.which("haproxy") or "/usr/sbin/haproxy", "-v"], capture_output=True,
                                 text=True).stdout.split("\n")[0]
        print(f"# {os.cpu_count()} CPUs, {version}, one replica (tiny model unless --checkpoint), "
              f"{args.seconds:g} s of audio per stream, 100 ms frames, real time; half the streams per route\n")
        print("| streams | route | decisions | decision p50 ms | decision p95 ms | connect p50 ms | connect p95 ms |")
        print("|---|---|---|---|---|---|---|")
        try:
            for num_streams in args.streams:
                results = run(urls, num_streams, args.seconds, loop)
                for route, result in results.items():
                    decisions, connects = result["decisions"], result["connects"]
                    print(f"| {num_streams} | {route} | {len(decisions)} | {percentile(decisions, 50) * 1e3:.1f} | "
                          f"{percentile(decisions, 95) * 1e3:.1f} | {statistics.median(connects) * 1e3:.2f} | "
                          f"{percentile(connects, 95) * 1e3:.2f} |", flush=True)
                direct, through = results["direct"], results["haproxy"]
                added = [(percentile(through["decisions"], q) - percentile(direct["decisions"], q)) * 1e3
                         for q in (50, 95)]
                connect_added = (statistics.median(through["connects"]) - statistics.median(direct["connects"])) * 1e3
                print(f"| {num_streams} | added by HAProxy | | {added[0]:+.1f} | {added[1]:+.1f} | "
                      f"{connect_added:+.2f} | |", flush=True)
        finally:
            balancer.terminate()
            balancer.wait(timeout=10)
            replica.terminate()
            replica.wait(timeout=30)


if __name__ == "__main__":
    main()
