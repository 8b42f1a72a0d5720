"""The server's one validated configuration: YAML file, then ``AIS_*`` environment, then flags.

Built once at start-up by ``load_config`` and passed down; nothing reads the
environment after that. Precedence, lowest first: the model defaults below,
the package's ``default.yaml`` (or ``--config PATH``), environment variables, command-line flags.

Environment variables: ``AIS_`` + the field path in capitals, ``__`` between levels::

    AIS_PORT=9000  AIS_API_KEY=secret  AIS_ENGINE__CHECKPOINT=/models/ai  AIS_SESSION__MAX_TURN_TOKENS=256
    AIS_ALLOWED_ORIGINS=https://a.example,https://b.example      (or a JSON list)

An unknown ``AIS_*`` name is an error, so a typo cannot be silently ignored; ``AIS_LB_*`` names are the load
balancer's (``deploy/haproxy``), left to it.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from audio_interaction_server import yaml_errors
from audio_interaction_server.options import SessionOptions
from audio_interaction_server.spec import CHUNK_S, reply_fits, rollover_slack

ENV_PREFIX = "AIS_"
# deploy/haproxy's settings: a shell (or a Compose file) may set them for HAProxy and run a replica too.
LOAD_BALANCER_ENV_PREFIX = "AIS_LB_"
ENV_NESTING = "__"
# Shipped as package data, so an installed package finds its defaults without a checkout.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default.yaml"
# A replica id is a host name's characters: no "_", which separates it from the rest of a session id.
REPLICA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class ScriptedTurns(BaseModel):
    """Benchmarks only: the schedule scripted.scripted_token imposes on a random-weight model.

    Defined here, apart from the behaviour, so that the settings (and the wire schema, which uses
    them) load without the engine's state machine.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    every_chunks: int = Field(ge=2, description="a reply starts every this many chunks per session")
    reply_tokens: int = Field(ge=1, description="tokens per reply, TEXT_END excluded")


# Above the cores of any host we would run on; torch.set_num_threads(100000) ends the process with SIGSEGV.
MAX_CPU_THREADS = 1024


class EngineConfig(BaseModel):
    """What the worker needs: where the model is, where it runs, and its capacity."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint: Path | None = Field(None, description="release checkpoint directory; None = tiny demo model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    max_sessions: int = Field(16, ge=1, le=4096, description="KV-cache slots = concurrent sessions")
    max_positions: int = Field(
        4096, ge=128, le=32768, description="per-session context budget; the model was trained below 4096"
    )
    max_batch_rows: int | None = Field(None, ge=1, description="rows per step; None = max_sessions")
    cpu_threads: int | None = Field(
        None, ge=1, le=MAX_CPU_THREADS, description="torch intra-op threads (process-wide); None = torch's "
        "default. On a shared CPU host fewer threads than cores avoids oversubscription stalls"
    )
    attention: Literal["auto", "gather", "flex"] = Field(
        "auto",
        description="how attention reads the KV cache: flex = in place (compiled FlexAttention, for GPUs), "
        "gather = copy each row's slot (fast for small models on CPU); auto = gather on CPU and beside the static "
        "step (which serves every row flex could), else flex on CUDA if its start-up self-check passes",
    )
    step: Literal["auto", "eager", "static"] = Field(
        "auto",
        description="how short rows (listening blocks, reply tokens) are stepped: static = at fixed shapes per "
        "(listening rows, reply rows) bucket from preallocated buffers, padding into a reserved scratch KV slot "
        "(what CUDA graphs replay); eager = shaped by each batch; auto = static on CUDA, eager on the CPU. "
        "Rows longer than 16 tokens (first rows, rollovers) are always eager",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="with the static step on CUDA: auto = capture one CUDA graph per bucket at start-up and "
        "serve them if their self-check agrees with the static step run eagerly; off = run it eagerly. "
        "Nothing is captured on the CPU",
    )
    static_attention: Literal["auto", "triton", "gather"] = Field(
        "auto",
        description="attention inside the static step: triton = our kernel reading each row's KV slot in place "
        "(CUDA, needs the gpu extra), gather = copy each row's whole slot (the CPU path); auto = triton on "
        "CUDA when it imports, else gather",
    )
    fused_kernels: Literal["auto", "off"] = Field(
        "auto",
        description="inside the static step on CUDA: auto = RMSNorm + residual add, RoPE + KV-cache write and "
        "SiLU x up as fused Triton kernels when triton imports (fewer kernels per layer, the same math); "
        "off = the torch code. The CPU always runs the torch code",
    )
    step_max_listening_rows: int | None = Field(
        None, ge=1,
        description="listening rows (short, with their audio chunk) one step runs at most, the oldest chunks first; "
        "the rest wait for the next step. Bounds a step's work so a burst (every stream's chunk due at once) is "
        "spread over a few short steps; None = auto: 256 (a listening bucket), or max_batch_rows if smaller",
    )
    step_max_reply_rows: int | None = Field(
        None, ge=1,
        description="reply rows (one token each) one step runs at most, the longest-waiting first; None = auto: "
        "the largest reply bucket of the static step (at least 96, a quarter of max_batch_rows)",
    )
    step_max_long_tokens: int | None = Field(
        None, ge=1,
        description="tokens of long rows (a session's first row with its prompt, a context rollover) one step "
        "runs at most, the oldest chunks first; one long row always runs. Spreads a burst of new sessions; "
        "None = auto: 4096",
    )
    kv_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0,
        description="share of the accelerator memory free after loading that the KV cache may take; "
        "start-up fails with the largest max_sessions that fits when it does not",
    )
    encoder_batch_buckets: bool = Field(
        True,
        description="pad each audio-encoder call to one of a few batch sizes (1, 2, 3, 4, 6, 8, 12, ...) so "
        "the backend's per-shape kernel caches stop growing; the padding's outputs are dropped",
    )
    max_catch_up_speed: float | None = Field(
        4.0, gt=1.0,
        description="a session's audio backlog beyond catch_up_burst_s is heard at most this many times faster "
        "than real time, so a client sending audio far faster than real time cannot keep the worker busy for "
        "everybody else (docs/reliability.md, hostile clients); None = no pacing. Worker.run_until_idle "
        "(the offline runner) is never paced",
    )
    catch_up_burst_s: float = Field(
        10.0, ge=0.4, description="audio backlog a session may catch up on at full speed before pacing applies; a "
        "new session's opening backlog draws on a burst of this size that its client address shares among its "
        "sessions (engine/catch_up.py), so reconnecting does not buy another",
    )
    scripted_turns: ScriptedTurns | None = Field(
        None,
        description="benchmarks only: replace the model's decisions and reply tokens with a fixed schedule "
        "(a reply every N chunks, L tokens long) so random weights exercise the speaking path",
    )
    prompt_cache_size: int = Field(
        256, ge=0,
        description="encoded system prompts kept for reuse, least recently used dropped first; 4 bytes a "
        "token, and a prompt longer than max_positions (which cannot run) is not kept; 0 = encode at every open",
    )
    prefix_kv_positions: int = Field(
        4096, ge=0,
        description="keys and values of system-prompt prefixes kept, in positions over all prompts (least recently "
        "used dropped first): a new session with a kept prompt copies them into its slot instead of feeding its "
        "prompt, so its first row is a short one (a static step on CUDA); 0 = every session feeds its prompt",
    )
    # A client that starts a few sessions a minute, each with its own prompt (about 1,090 tokens at most with the
    # default budget and reply cap: spec.check_room), or one that reconnects, never meets these: 32,768
    # tokens are about thirty such prompts at once, and 500 a second are 30,000 a minute after that. Churning new
    # ~1,000-token prompts at connect_rate_per_ip (10 sessions a second) asks for 10,000 a second; it gets these 500.
    prefill_tokens_per_s_per_ip: float | None = Field(
        500.0, gt=0,
        description="system-prompt tokens a client address may have the engine feed per second, sustained, over "
        "every front of the engine: a new session whose prompt is not kept (prefix_kv_positions) costs its "
        "prompt's tokens, a kept one nothing. Beyond prefill_token_burst_per_ip the session is refused at its "
        "first audio with a fatal rate_limited error and close 1013, saying when to try again (docs/reliability.md, "
        "prompt churn). None = no limit",
    )
    prefill_token_burst_per_ip: int = Field(
        32_768, ge=1,
        description="system-prompt tokens one client address may have fed at once; a longer prompt runs from a "
        "full budget and is paid for by waiting",
    )
    rollover_window_positions: int | None = Field(
        2048,
        ge=0,
        description="history re-fed when a session nears max_positions (context rollover); about half of "
        "max_positions keeps rollovers rare (a window close to the budget rolls over every few chunks, and start-up "
        "warns); None = no rollover: the session ends with context_full at the budget",
    )
    transport: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="where the engine runs: thread = a thread of the server process; process = a process of its "
        "own reached over ZeroMQ, so the engine's host work and the sockets do not share one GIL "
        "(docs/engine.md); auto = process on CUDA, thread on the CPU",
    )
    hang_timeout_s: float = Field(
        10.0, ge=2.0, description="with the engine in its own process: an engine whose process is alive but has "
        "sent nothing for this many seconds (stopped, deadlocked, starved of CPU), or whose worker thread has not "
        "finished a step for this long (the engine process then exits), is lost: its sessions end with "
        "worker_failed and the server exits (docs/reliability.md). An engine process that ends is seen at once "
        "whatever this says; while it is silent for over 2 s new sessions are refused (not_ready) and /ready says 503 "
        "(so at least 2 s)",
    )


def split_list(value: Any) -> Any:
    """A list setting in the environment's comma-separated form ("a, b" -> ["a", "b"]); lists pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ConfigError(ValueError):
    """A configuration that cannot start the server; the message names every bad field and its source."""


class TransportSettings(BaseModel):
    """Limits enforced below the app, on each TCP connection (api/transport.py, docs/deployment.md).

    They hold before a request reaches a route and for traffic the app never sees (WebSocket
    pings, a peer that stops reading), so a hostile client costs the server a bounded amount.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed; empty = none, the peer address is the client's")
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's line and headers")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024,
                                  description="request line and headers; larger gets HTTP 431")
    max_headers: int = Field(100, ge=8, le=10_000, description="header lines of a request (Apache's default limit), "
                             "each query parameter (an '&' of the target) and each comma of a Connection, Upgrade or "
                             "Sec-WebSocket-Protocol value counted as one more; "
                             "more gets HTTP 431 before they are parsed, and spends the address's plain-request budget "
                             "by their number (each is ~1% of a request's parsing)")
    max_request_body_bytes: int = Field(
        64 * 1024, ge=1024, description="an HTTP request's body (every route takes a few hundred bytes of JSON at "
        "most); larger gets HTTP 413 and the connection closed: from its Content-Length before the route runs, or "
        "once a chunked body passes it (docs/deployment.md)")
    body_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's whole body once "
                                  "its headers are in; else HTTP 408 and the connection closed")
    max_pending_handshakes: int = Field(
        512, ge=1, description="connections still sending their request headers or body after a second, all "
        "clients together; beyond, the oldest of the address holding the most is closed with HTTP 503 (a new "
        "connection is never refused for the total)")
    max_pending_handshakes_per_ip: int = Field(
        16, ge=1, description="the same per client address (trusted proxies exempt); beyond, HTTP 429 at once")
    control_frames_per_s: float = Field(
        5.0, gt=0, description="WebSocket pings and pongs a client may send per second, sustained; beyond "
        "control_frame_burst the connection is closed with 1008")
    control_frame_burst: int = Field(50, ge=1, description="pings and pongs a client may send at once")
    data_frames_per_s: float = Field(
        1000.0, gt=0, description="WebSocket data frames (messages, and each fragment of one) a client may send "
        "per second, sustained; beyond data_frame_burst the connection is closed with 1008. A page sending each "
        "128-sample AudioWorklet block at 48 kHz sends 375 a second")
    data_frame_burst: int = Field(4000, ge=1, description="data frames a client may send at once (after a stall)")
    http_requests_per_s: float = Field(
        100.0, gt=0, description="plain HTTP requests (health, readiness, metrics, info; not WebSocket upgrades) one "
        "client address may make per second, sustained; beyond http_request_burst the answer is HTTP 429 and the "
        "connection is closed. A request from one of the trusted_proxies spends the budget of the client it is "
        "forwarded for, who then gets 429 request by request (the proxy's connection is kept)")
    http_request_burst: int = Field(500, ge=1, description="plain HTTP requests one client address may make at once")
    max_write_buffer_bytes: int = Field(
        1024 * 1024, ge=64 * 1024, description="bytes waiting for a client that does not read; beyond, the connection "
        "is aborted")
    write_stall_timeout_s: float = Field(
        15.0, gt=0, description="how long a client may leave the server unable to write to it before the connection "
        "is aborted and its session freed")
    close_timeout_s: float = Field(
        2.0, gt=0, description="after the server closes a connection, how long the client has to acknowledge and "
        "take the last bytes before the socket is dropped")

    _split_proxies = field_validator("trusted_proxies", mode="before")(split_list)

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses_only(cls, proxies: list[str]) -> list[str]:
        # No "*": trusting every peer would let any client choose the address the per-IP limits see.
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return proxies


class FloodLimits(BaseModel):
    """What one connection may make the event loop do (api/session.py, docs/reliability.md "Floods").

    The event loop is shared by every session and, through the GIL, by the worker thread: a client
    that keeps it busy makes everybody's decisions late. Each limit is a token bucket per session.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    events_per_s: float = Field(
        20.0, gt=0, description="text events (everything but audio, refused ones too) a client may send per "
        "second, sustained; beyond event_burst the session ends with an event_flood error and close 1008")
    event_burst: int = Field(200, ge=1, description="text events a client may send at once (a Realtime client "
                             "replaying a chat history as conversation.item.create events)")
    refused_audio_speed: float = Field(
        2.0, gt=0, description="audio refused (audio_buffer_full, invalid_audio, empty frames, frames while the "
        "session closes) a client may send, in seconds per second, "
        "sustained (a real-time client is refused at most 1x); beyond refused_audio_burst_s the session ends "
        "with an audio_flood error and close 1008. A refused frame counts at least 10 ms")
    refused_audio_burst_s: float = Field(10.0, gt=0, description="refused audio a client may send at once (a "
                                         "real-time client catching up after a network stall)")
    prompt_chars_per_s: float = Field(
        1000.0, gt=0, description="system prompt characters a client address may have checked against the "
        "context budget per second, sustained, over all its sessions (checking tokenises the prompt on the event "
        "loop; a prompt encoded before costs nothing); beyond prompt_char_burst a session.configure or "
        "session.update with a new prompt is refused with rate_limited")
    prompt_char_burst: int = Field(16_000, ge=8_000, description="system prompt characters checked at once "
                                   "(at least one prompt of the longest allowed, 8,000)")
    cut_cooldown_s: float = Field(
        10.0, ge=0, description="after a session is cut for a flood, its client address is refused new "
        "connections (HTTP 429, reason flood_cooldown) for this long, doubling (up to max_cut_cooldown_s) while "
        "it is cut again soon after: a flooder that reconnects must not get a fresh budget each time. 0 = off")
    max_cut_cooldown_s: float = Field(300.0, gt=0, description="the longest cut_cooldown_s grows to")
    resumes_per_s: float = Field(
        0.5, gt=0, description="resumes of one /v1/stream session per second, sustained (each replays what the "
        "client missed, up to resume_max_events, on the shared event loop); beyond resume_burst a resume is "
        "refused with rate_limited and close 1013, its message saying when to try again, and the session stays "
        "resumable")
    resume_burst: int = Field(5, ge=1, description="resumes of one session at once (a client on a flaky network "
                              "that drops and resumes several times in a few seconds)")


# An Origin header's value: a scheme, "://", a host and an optional port; no path, no wildcard.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s*?#@]+")


# The smallest max_buffered_audio_s: a chunk and a 100 ms frame, the largest the shipped clients send.
MIN_BUFFERED_AUDIO_S = 0.5


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 = any free port")
    # TLS by uvicorn itself: a page opened from another host gets the microphone only over https://.
    ssl_certfile: Path | None = Field(None, description="PEM certificate (chain): serve https:// and wss://; "
                                      "needs ssl_keyfile. None = plain http:// and ws://")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile (unencrypted)")
    api_key: SecretStr | None = Field(None, description="None = no authentication")
    allowed_origins: list[str] = Field(default_factory=list, description="browser Origins allowed; empty = any")
    max_sessions: int | None = Field(None, ge=1, description="concurrent streams; None = engine.max_sessions")
    max_subscribers_per_session: int = Field(4, ge=0)
    connect_rate_per_ip: float | None = Field(
        10.0, gt=0, description="WebSocket connection attempts per second per client IP, sustained (beyond "
        "connect_burst_per_ip at once); more get HTTP 429 before the handshake. None = no limit")
    connect_burst_per_ip: int = Field(100, ge=1, description="connection attempts one client IP may make at once")
    max_frame_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_buffered_audio_s: float = Field(
        60.0, description="audio accepted but not yet heard by the model; at least 0.5 s: a chunk is heard "
        "once its 0.4 s and the frame that carries its look-ahead are in, and a smaller buffer refuses every frame")
    max_queued_events: int = Field(10_000, ge=100, description="unsent events per connection before it is closed")
    max_queued_bytes: int = Field(
        8 * 1024 * 1024, ge=64 * 1024, description="bytes of unsent events per connection (as JSON, estimated), "
        "counting what the connection holds until its answer is sent (a /v1/realtime item until its echo), before "
        "the connection is closed with 4008 client_too_slow; at least twice max_frame_bytes, so one frame's answer "
        "always fits")
    idle_timeout_s: float = Field(120.0, gt=0, description="close a stream after this long without a client frame")
    max_session_s: float = Field(4 * 3600.0, gt=0)
    resume_grace_s: float = Field(
        30.0, ge=0, le=3600, description="a /v1/stream session whose connection drops without a normal close "
        "waits this long, holding its slot and context, for the client to resume it (docs/protocol.md); 0 = off")
    resume_max_events: int = Field(
        2_000, ge=10, description="events a session keeps for a resume: its newest while connected; while "
        "detached, those sent before the drop give way to new ones, and past the bound in events that arrived "
        "since the drop the session ends (resume_expired)")
    resume_max_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, description="the same bound in bytes (each event as JSON, estimated as the "
        "outbox counts it): while connected the oldest events are dropped past it; while detached, as for "
        "resume_max_events")
    max_sessions_per_ip: int | None = Field(
        None, ge=1, description="sessions (/v1/stream and /v1/realtime, connected or detached) one client address "
        "may hold; beyond, a new one is refused with too_many_sessions_from_ip and close 1013. None = no limit "
        "(clients behind one NAT share an address); set it where one client must not be able to hold every slot")
    max_detached_per_ip: int = Field(
        4, ge=1, description="detached sessions (waiting for a resume) one client address may hold; when one more "
        "detaches, the oldest of that address ends. Whatever this says, a new session takes the slot of the "
        "oldest detached one when every slot is taken (docs/protocol.md, resume)")
    memory_trim_interval_s: float | None = Field(
        60.0, gt=0, description="seconds between malloc_trim calls that return the glibc heap's free pages to "
        "the OS (docs/reliability.md); None = never. No effect off glibc")
    trailing_silence_s: float = Field(1.0, ge=0, le=10, description="input.flush default, as the offline CLI's")
    decision_events: bool = Field(False, description="default of session.configure's decision_events")
    transport: TransportSettings = TransportSettings()
    flood: FloodLimits = FloodLimits()
    session: SessionOptions = SessionOptions()
    engine: EngineConfig = EngineConfig()
    demo: bool = Field(False, description="serve the tiny random demo model whatever engine.checkpoint says")
    api_docs: bool = Field(False, description="serve the generated HTTP API docs (/docs, /redoc, /openapi.json); "
                           "off by default: they map the server for anyone who can reach it")
    log_level: str = Field("info", description="one of " + ", ".join(LOG_LEVELS) + " (any case; warn = warning)")
    log_probe_requests: bool = Field(
        False, description="write the access line of each successful /health, /ready and /metrics request (a "
        "balancer's, an orchestrator's or a scraper's probes, every few seconds); false = only failed ones, or "
        "all at log_level debug")
    log_format: Literal["text", "json"] = Field(
        "text", description="text = one readable line per record; json = one JSON object a line (time, level, "
        "logger, message, and session_id and replica_id when it is about a session) for log pipelines (logs.py)")
    # ---- running as one of several replicas behind a load balancer (docs/scaling.md) ----
    replica_id: str | None = Field(
        None, description="begins every session id (<replica_id>_<32 hex>) so a load "
        "balancer can send a subscriber to the replica holding the session; None = this host's name")
    busy_refusal: Literal["error_event", "http_503"] = Field(
        "error_event", description="how a new session is refused when all sessions are in use, the server drains "
        "or the model is not ready: error_event = accept, send an error event, close 1013 (for clients that "
        "connect directly); http_503 = refuse the handshake with HTTP 503 + Retry-After (behind a load balancer, "
        "which then retries another replica)")
    busy_retry_after_s: int = Field(1, ge=0, le=3600, description="the Retry-After of an HTTP 503 refusal")
    drain_timeout_s: float | None = Field(
        None, gt=0, description="SIGTERM (or POST /v1/admin/drain) drains: no new sessions, each open one is told "
        "session.going_away, finishes its reply and is closed with 1012, all within this many seconds; then the "
        "process exits 0. None = SIGTERM stops at once (sessions closed with 1001), no drain call")
    agent_port: int | None = Field(
        None, ge=0, le=65535, description="TCP port of the capacity agent for HAProxy's agent-check (on host); "
        "0 = any free port; None = no agent")
    fronts: int = Field(
        1, ge=1, le=64, description="front processes (sockets, sessions, audio front-end, rendering) on one engine "
        "process (docs/scaling.md, several fronts per engine): front i listens on port + i, its agent on "
        "agent_port + i (0: any free port each), its replica id is replica_id + '-f<i>'; 1 = one process as ever")
    front_hang_timeout_s: float = Field(
        15.0, ge=1.0, description="a server whose event loop has not turned for this many seconds (deadlocked, "
        "stuck in a call that never returns) hangs. With fronts > 1 the supervisor kills such a front and starts it "
        "again, as a crashed front is (docs/scaling.md); a server of one process logs where its loop stands and "
        "exits 1, for its orchestrator to restart it (docs/reliability.md). Either way its clients' connections "
        "drop. At least 1 s (the loop ticks 10 times a second, the watcher looks twice)")
    agent_probes_per_s: float = Field(
        50.0, gt=0, description="connections the capacity agent takes per second, all clients together (one at a "
        "time: each gets its line and is closed at once); more wait in the kernel's accept queue, so a flood of "
        "probes costs the server at most this many")
    agent_probes_per_s_per_ip: float = Field(
        20.0, gt=0, description="lines the agent answers one client address per second (as many at once); beyond, "
        "its connection is closed unanswered. HAProxy probes once per agent-inter per server line")

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        # An empty AIS_ALLOWED_ORIGINS is null, as for every setting: the default, any Origin.
        return [] if value is None else split_list(value)

    @field_validator("allowed_origins")
    @classmethod
    def _browser_origins(cls, origins: list[str]) -> list[str]:
        # Browsers send "https://a.example", never with a path; a trailing slash would never match. An entry no
        # browser sends (no scheme, a path, a wildcard) would refuse every page with nothing said at start-up.
        origins = [origin.rstrip("/") for origin in origins]
        for origin in origins:
            if origin != "null" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an Origin a browser sends: scheme://host[:port], e.g. "
                                 "https://app.example.com or http://localhost:8000 (leave the list empty to allow "
                                 "any; 'null' is what a page opened from a file sends)")
        return origins

    @field_validator("api_key")
    @classmethod
    def _usable_api_key(cls, key: SecretStr | None) -> SecretStr | None:
        # An empty key would be matched by a bare ``?api_key=`` while /v1/info reports auth on;
        # a blank one is a quoting slip, not a wish to turn authentication off. Only null does that.
        if key is None:
            return None
        value = key.get_secret_value()
        if not value.strip():
            raise ValueError("an empty or blank API key is not allowed; set a key, or leave api_key null "
                             "(AIS_API_KEY unset or empty) to turn authentication off")
        if value != value.strip():
            raise ValueError("the API key must not begin or end with whitespace (clients' keys are stripped "
                             "of it, so such a key could never match)")
        if not all(" " <= character <= "~" for character in value):
            raise ValueError("the API key must be printable ASCII (letters, digits, punctuation, spaces): clients "
                             "send it in an HTTP header, where other characters are read differently or end it")
        return key

    @model_validator(mode="after")
    def _a_whole_replay_fits_the_outbox(self) -> ServerConfig:
        # A resume replays up to the log's bounds at once; the connection's queue must take them and go on.
        if self.resume_grace_s > 0:
            for kept, queued in (("resume_max_events", "max_queued_events"), ("resume_max_bytes", "max_queued_bytes")):
                if getattr(self, kept) > getattr(self, queued):
                    raise ValueError(f"{kept} ({getattr(self, kept)}) must be at most {queued} "
                                     f"({getattr(self, queued)}): a resume replays up to {kept} at once")
        return self

    def flush_headroom_problem(self) -> str | None:
        """Why every default ``input.flush`` would be refused, or None. A flush queues the partial chunk and the
        trailing silence, padded to whole chunks; a buffer smaller than that refuses each one, and a client's last
        words are never heard. Said at start (a warning: tests and benchmarks run such buffers on purpose)."""
        worst_s = math.ceil(round((self.trailing_silence_s + CHUNK_S) / CHUNK_S, 9)) * CHUNK_S
        if self.max_buffered_audio_s >= worst_s - 1e-9:
            return None
        return (f"max_buffered_audio_s ({self.max_buffered_audio_s:g}) is below {worst_s:g} s, what a default "
                f"input.flush queues (the partial chunk and trailing_silence_s ({self.trailing_silence_s:g} s), in "
                f"whole {CHUNK_S:g} s chunks): every such flush will be refused with audio_buffer_full; raise "
                "max_buffered_audio_s or lower trailing_silence_s")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_in_any_case(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        level = value.lower()  # DEBUG, as most tools take it; warn, as many call it
        level = "warning" if level == "warn" else level
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level: one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("max_buffered_audio_s")
    @classmethod
    def _holds_a_chunk(cls, value: float) -> float:
        if value < MIN_BUFFERED_AUDIO_S:
            raise ValueError(f"must be at least {MIN_BUFFERED_AUDIO_S:g} s: a chunk ({CHUNK_S:g} s) is heard once it "
                             "and the frame that carries its look-ahead are in, and a smaller buffer refuses every "
                             "frame of a client streaming in real time")
        return value

    @field_validator("replica_id")
    @classmethod
    def _a_replica_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(REPLICA_ID_PATTERN, value):
            raise ValueError(f"{value!r} is not a replica id: letters, digits, '.' and '-', beginning with a letter or "
                             "digit, at most 64 characters (no '_': it separates the replica id from a session id's "
                             "own part)")
        # sess_<id> is how the Realtime API shows a session (api/realtime); a subscriber may give it so, and the
        # server and HAProxy drop the prefix: a replica of that name would have its ids read as that prefix.
        if value is not None and value.lower() == "sess":
            raise ValueError("'sess' is taken: the Realtime API's session ids begin sess_ (docs/realtime.md)")
        return value

    @model_validator(mode="after")
    def _one_frames_answer_fits_the_outbox(self) -> ServerConfig:
        if self.max_queued_bytes < 2 * self.max_frame_bytes:
            raise ValueError(f"max_queued_bytes ({self.max_queued_bytes}) must be at least twice max_frame_bytes "
                             f"({self.max_frame_bytes}): a client's largest frame and its echo must fit")
        return self

    @model_validator(mode="after")
    def _sessions_fit_the_engine(self) -> ServerConfig:
        if self.max_sessions is None:
            self.max_sessions = self.engine.max_sessions
        elif self.max_sessions > self.engine.max_sessions:
            raise ValueError(
                f"max_sessions ({self.max_sessions}) exceeds engine.max_sessions ({self.engine.max_sessions}), "
                "the number of KV-cache slots; raise engine.max_sessions too"
            )
        checkpoint = self.engine.checkpoint
        if checkpoint is not None and not self.demo and not checkpoint.is_dir():
            from audio_interaction_server.model.hub import checkpoint_source_problem

            # Fail at start-up, not minutes later in the background loader; a repo id is
            # fetched (or found in the HF cache) by the loader, see model/hub.py.
            if (problem := checkpoint_source_problem(checkpoint)) is not None:
                raise ValueError(f"engine.{problem}")
        return self

    @model_validator(mode="after")
    def _the_default_session_fits_the_context(self) -> ServerConfig:
        # The engine holds every session's options to its context budget (spec.check_room, with these same rules)
        # and refuses those that do not fit: with defaults that do not, the server said "ready" and refused every
        # session. Checked here without the system prompt, whose tokens are known once the model loads (start-up
        # checks again then).
        engine, cap, window = self.engine, self.session.max_turn_tokens, self.engine.rollover_window_positions
        if not reply_fits(0, cap, engine.max_positions):
            raise ValueError(f"engine.max_positions ({engine.max_positions}) cannot hold one reply of "
                             f"session.max_turn_tokens ({cap}) after the system prompt and an audio chunk: "
                             "raise the first or lower the second")
        if window is not None and (slack := rollover_slack(0, cap, engine.max_positions, window)) <= 0:
            largest = window + slack - 1  # the largest window that fits without a prompt
            largest_cap = cap + slack - 1  # the largest reply cap with which this window fits, without a prompt
            half = (engine.max_positions - cap) // 2
            # A window "below N less the prompt" helps only where N leaves room for a prompt (about 50 tokens).
            window_advice = (f"set a window below {largest} less the prompt" + (
                f" (about {half} keeps rollovers rare)" if 0 < half < largest else "") + ", "
                if largest > 100 else "")
            raise ValueError(f"engine.rollover_window_positions ({window}) leaves no room for a context rollover at "
                             f"engine.max_positions ({engine.max_positions}) with session.max_turn_tokens ({cap}): "
                             "the window, the system prompt, two chunks and a full reply must fit the budget; "
                             f"lower session.max_turn_tokens to at most {largest_cap} less the prompt, {window_advice}"
                             "or set the window to null (sessions end with context_full)")
        return self

    @model_validator(mode="after")
    def _fronts_ports_fit(self) -> ServerConfig:
        last = self.fronts - 1
        # Only the ports that overflow are named: agent_port null (no agent) was named all the same.
        ports = (("port", self.port), ("agent_port", self.agent_port))
        past = [f"{name} + {last} = {value + last}" for name, value in ports
                if value is not None and value + last > 65535]
        if past:
            raise ValueError(f"fronts ({self.fronts}): front {last} would listen on {' and '.join(past)}, past 65535, "
                             "the last TCP port: choose a lower port, or fewer fronts")
        if not last and self.port and self.agent_port == self.port:
            raise ValueError(f"agent_port ({self.agent_port}) must differ from port ({self.port}): the capacity "
                             "agent would take the server's connections")
        if last and self.port and self.agent_port and abs(self.agent_port - self.port) <= last:
            raise ValueError(f"fronts ({self.fronts}) listen on port..port+{last} ({self.port}..{self.port + last}) "
                             f"and their agents on agent_port..agent_port+{last} ({self.agent_port}.."
                             f"{self.agent_port + last}): the two ranges overlap")
        if last and self.replica_id is not None and len(self.replica_id) + len(f"-f{last}") > 64:
            raise ValueError(f"replica_id is too long for {self.fronts} fronts (each adds -f<i>; 64 characters in all)")
        return self

    @model_validator(mode="after")
    def _tls_needs_both_readable_files(self) -> ServerConfig:
        # Checked with the rest of the configuration (exit 2, the field named), not as a traceback from ssl.
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            given, missing = ("ssl_certfile", "ssl_keyfile") if self.ssl_keyfile is None else ("ssl_keyfile",
                                                                                                 "ssl_certfile")
            raise ValueError(f"{given} is set but {missing} is not: TLS needs the certificate and its key")
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a file")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            _check_certificate_and_key(self.ssl_certfile, self.ssl_keyfile)
        return self

    @property
    def is_demo(self) -> bool:
        return self.demo or self.engine.checkpoint is None

    @property
    def session_capacity(self) -> int:
        assert self.max_sessions is not None  # filled in by the validator
        return self.max_sessions


def _check_certificate_and_key(certfile: Path, keyfile: Path) -> None:
    """Load the pair as uvicorn will: a swapped pair, a key of another certificate, a file that is no PEM or an
    encrypted key (there is no passphrase setting, and ssl would ask for one on the terminal) fail here."""
    import ssl

    def no_passphrase() -> str:
        raise ValueError("the key is encrypted")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=no_passphrase)
    except (ssl.SSLError, ValueError) as error:
        reason = getattr(error, "reason", None) or str(error)
        raise ValueError(f"ssl_certfile {str(certfile)!r} and ssl_keyfile {str(keyfile)!r} are not a PEM certificate "
                         f"and its unencrypted private key ({reason})") from None


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sources: dict[tuple[str, ...], str] | None = None,
) -> ServerConfig:
    """Defaults < YAML (``path``, else the package's default.yaml) < ``AIS_*`` in ``environ`` < overrides.

    ``overrides`` uses nested dicts (``{"engine": {"checkpoint": ...}}``); the caller passes
    ``os.environ`` explicitly so tests and embedders control what is read. ``sources``, if given, receives where
    each setting given was read (``("engine", "device")`` -> ``"configs/gpu-host.yaml"``, ``"environment
    AIS_PORT"``, ``"command line"``), for a refusal made after loading to name it.
    """
    merged: dict[str, Any] = {}
    sources = {} if sources is None else sources
    yaml_path = path if path is not None else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None)
    if yaml_path is not None:
        _merge(merged, _read_yaml(yaml_path), sources, str(yaml_path))
    for name, value in sorted((environ or {}).items()):
        if name.startswith(ENV_PREFIX) and not name.startswith(LOAD_BALANCER_ENV_PREFIX):
            keys = tuple(part.lower() for part in name[len(ENV_PREFIX):].split(ENV_NESTING))
            _merge(merged, _nest(keys, _env_value(value)), sources, f"environment {name}")
    _merge(merged, dict(overrides or {}), sources, "command line")
    try:
        return ServerConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe(error, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: give the YAML file in it") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML{yaml_errors.where(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _refuse_duplicate_keys(node: yaml.Node | None, path: Path, at: tuple[str, ...] = ()) -> None:
    """YAML lets a mapping name a key twice (the last value wins): a pasted block would undo a setting above it
    with nothing said. Read from the composed nodes, which keep the keys' lines."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"config file {path}: {'.'.join((*at, key))} is set twice (lines {seen[key]} and "
                              f"{line})")
        seen[key] = line
        _refuse_duplicate_keys(value_node, path, (*at, key))


def _env_value(text: str) -> Any:
    """Strings stay strings (pydantic converts numbers and booleans); JSON lists/objects are parsed;
    an empty value means null, so ``AIS_API_KEY=`` turns authentication off. ``null`` is the text "null" (an API
    key of that name stays one: reading it as null would turn authentication off unasked); where a setting
    refuses it, the message says to leave the value empty. A blank value (spaces) is not empty: it goes to
    validation, which reports it against its field."""
    if not text:
        return None
    stripped = text.strip()
    if not stripped:
        return text
    if stripped[0] in "[{":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text  # let validation report it against the field
    return text


def _nest(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(keys[1:]):
        value = {key: value}
    return {keys[0]: value}


def _merge(into: dict[str, Any], update: dict[str, Any], sources: dict, source: str, at: tuple = ()) -> None:
    for key, value in update.items():
        path = (*at, key)
        if isinstance(value, dict):  # a section: each of its settings keeps its own source (a check names them)
            if not isinstance(into.get(key), dict):
                into[key] = {}
                sources[path] = source
            _merge(into[key], value, sources, source, path)
        else:
            into[key] = value
            sources[path] = source


def _describe(error: ValidationError, sources: dict[tuple[str, ...], str]) -> str:
    """What is wrong, naming where each value came from: one line for one error, else a line each."""
    described = []
    for item in error.errors():
        path = tuple(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for a check's own ValueError
        if path:
            source = next((sources[path[:n]] for n in range(len(path), 0, -1) if path[:n] in sources), None)
            if item["type"] == "extra_forbidden":  # a misspelt name, most likely: the one meant, spelt as given
                meant = _meant(path)
                message = "no such setting" + (f" (did you mean {_spelt(meant, source)}?)" if meant else "")
                if (section := _section_meant(path, item.get("input"))) is not None:
                    message = _section_hint(section, item["input"], source)
            if source is not None and source.startswith("environment ") and item.get("input") == "null":
                message += f"; for null, leave it empty ({source.removeprefix('environment ')}=)"
            described.append(f"{'.'.join(path)}: {message}" + (f" (from {source})" if source else ""))
        else:  # a check across settings: where each setting its message names came from
            described.append(message + _sources_named_in(message, sources))
    if len(described) == 1:
        return f"invalid server configuration: {described[0]}"
    return "\n".join(["invalid server configuration:", *(f"  {line}" for line in described)])


def _meant(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The setting most likely meant by ``path``, which names none: one underscore where a section's two belong
    (``AIS_ENGINE_DEVICE``), the name of a setting of another section (``hang_timeout_s`` at the top level), or a
    name close to one of its own section's."""
    section, name = path[:-1], path[-1]
    words = name.split("_")
    split = _split_into_sections(section, words)
    if split is not None:
        return split
    near: tuple[str, ...] | None = None
    for cut in range(1, len(words)):
        inner = (*section, "_".join(words[:cut]))
        close = difflib.get_close_matches("_".join(words[cut:]), _leaf_names(inner), n=1)
        near = near or ((*inner, close[0]) if close else None)
    elsewhere = [other for other in _setting_paths(()) if other[-1] == name]
    if elsewhere:
        return elsewhere[0]
    if near is not None:
        return near
    close = difflib.get_close_matches(name, _leaf_names(section), n=1)  # a setting, never a section's name
    return (*section, close[0]) if close else None


def _section_meant(path: tuple[str, ...], value: Any) -> tuple[str, ...] | None:
    """The section whose settings ``value``, given as an unknown section at ``path``, are (``()``: the top level),
    or None: ``server: {port: 9000}`` (a guess at a section the top level's own settings do not have) is ``()``."""
    if not isinstance(value, dict) or not value or not all(isinstance(key, str) for key in value):
        return None
    for section in _sections(()):
        if section != path and set(value) <= set(_leaf_names(section)):
            return section
    return None


def _section_hint(section: tuple[str, ...], value: dict, source: str | None) -> str:
    names = sorted(value)
    where = "a top-level setting" if not section else f"a setting of {'.'.join(section)}"
    if len(names) > 1:
        where = "top-level settings" if not section else f"settings of {'.'.join(section)}"
    said = f"no such section: {', '.join(names)} {'is' if len(names) == 1 else 'are'} {where}"
    if not section and not (source or "").startswith("environment "):
        return f"{said}, written without a section"
    return f"{said} (did you mean {_spelt((*section, names[0]), source)}?)"


def _sections(section: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``section`` and every section inside it, depth first."""
    found = [section]
    for name in _setting_names(section):
        if _setting_names((*section, name)):
            found += _sections((*section, name))
    return found


def _split_into_sections(section: tuple[str, ...], words: list[str]) -> tuple[str, ...] | None:
    """The setting that ``words`` spell with single underscores between sections (``session_sampling_top_k``:
    ``session.sampling.top_k``), or None."""
    for cut in range(1, len(words) + 1):
        head = "_".join(words[:cut])
        if cut == len(words):
            return (*section, head) if head in _leaf_names(section) else None
        if _setting_names((*section, head)):
            inner = _split_into_sections((*section, head), words[cut:])
            if inner is not None:
                return inner
    return None


def _leaf_names(section: tuple[str, ...]) -> list[str]:
    return [name for name in _setting_names(section) if not _setting_names((*section, name))]


def _setting_paths(section: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every setting under ``section``, sections' own settings included (depth first)."""
    paths = []
    for name in _setting_names(section):
        inner = _setting_names((*section, name))
        paths += _setting_paths((*section, name)) if inner else [(*section, name)]
    return paths


def _setting_names(path: tuple[str, ...]) -> list[str]:
    """The settings of the section at ``path`` (``()``: the top level; ``("engine",)``: engine's)."""
    model: Any = ServerConfig
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _section_model(field.annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _section_model(annotation: Any) -> Any:
    """The settings class of a section, also of one that may be null (``ScriptedTurns | None``)."""
    members = [member for member in typing.get_args(annotation) if member is not type(None)]
    return members[0] if len(members) == 1 else annotation


def _spelt(path: tuple[str, ...], source: str | None) -> str:
    """A setting as its source would name it: ``AIS_ENGINE__DEVICE`` for the environment, else ``engine.device``."""
    if source is not None and source.startswith("environment "):
        return "AIS_" + "__".join(part.upper() for part in path)
    return ".".join(path)


def _sources_named_in(message: str, sources: dict[tuple[str, ...], str]) -> str:
    """`` (port, agent_port and fronts from command line; replica_id from environment AIS_REPLICA_ID)`` for the
    settings that ``message`` names, each under the source its value came from (the package's default.yaml too)."""
    by_source: dict[str, list[str]] = {}
    for path, source in sources.items():
        name = ".".join(path)
        if re.search(rf"(?<!\w)(?<!\w\.){re.escape(name)}(?!\w|\.\w)", message):  # not inside another name
            by_source.setdefault(source, []).append(name)
    if not by_source:
        return ""
    return " (" + "; ".join(f"{_and(names)} from {source}" for source, names in by_source.items()) + ")"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
