"""The process runtime: model load, worker lifecycle, the session registry, readiness, load and drain.

One ``Runtime`` per app, built by ``create_app`` and shared by every endpoint (``/v1/stream``, the
subscriber endpoint, ``/v1/realtime``): they mint session ids with ``new_session_id``, build sessions with
``make_session``, and ``register``/``release`` their connections here, so capacity, metrics, drain and
shutdown see every session whatever its protocol.

Threading contract: everything here runs on the event loop, except the model load (a daemon thread of
its own) and the worker's callbacks (``_on_step``, ``_on_worker_failure``), which only touch
thread-safe metrics or hop to the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from audio_interaction_server import __version__
from audio_interaction_server.api.addresses import AddressRateLimiter, client_key
from audio_interaction_server.api.flood import FLOOD_CUTS, AddressBuckets, CutCooldown, json_items_rate_and_burst
from audio_interaction_server.api.metrics import SESSION_STATE, Metrics, malloc_trim
from audio_interaction_server.api.session import CLOSE_GRACE_S, ModelInfo, Session
from audio_interaction_server.config import ServerConfig
from audio_interaction_server.engine.client import CannotServe, dtype_name
from audio_interaction_server.engine.events import EndCode
from audio_interaction_server.logs import bind_session, configure_logging
from audio_interaction_server.model.progress import LoadProgress

if TYPE_CHECKING:  # the engine and the model load on the loader thread, not at import
    from audio_interaction_server.engine.client import EngineClient, ModelSummary
    from audio_interaction_server.engine.process_client import EngineEndpoints, EngineProcessClient
    from audio_interaction_server.model.checkpoint import LoadedModel

log = logging.getLogger(__name__)

# How a detached session ends without its client (RegisteredConnection.end_detached logs each, with its time
# detached and why).
_ENDS_OF_DETACHED_SESSIONS = frozenset({"resume_expired", "detached_evicted", "detached_per_ip_limit"})


# Session ids are "<replica id>_<32 hex>": a replica id never holds "_" (settings.REPLICA_ID_PATTERN), so a
# load balancer finds the replica as the text before the first "_" (deploy/haproxy/haproxy.cfg).
SESSION_ID_SEPARATOR = "_"
_HEX_ID = re.compile(r"[0-9a-f]{32}")

# How a session the engine refused for its address's prefill budget ends (engine/prefill_budget.py).
PREFILL_REFUSED = EndCode.RATE_LIMITED.value

# Of the drain's time, what is kept back after the sessions' own deadline (Runtime._drain); at most half.
DRAIN_FINAL_CLOSE_S = 2.0
DRAIN_FORCED_CLOSE_S = 0.5  # of that, the last part: a session still open then is closed with 1001


class RegisteredConnection(Protocol):
    """What the registry needs of a connection, whatever its protocol (``StreamConnection``, realtime's)."""

    subscribers: set
    finished: asyncio.Event
    session: Session  # what its end line reports: the audio it received, the chunks the model heard

    @property
    def queued_events(self) -> int: ...

    @property
    def is_detached(self) -> bool: ...

    @property
    def has_ended(self) -> bool: ...

    @property
    def num_replay_events(self) -> int: ...

    @property
    def client_address(self) -> str: ...

    detached_since_s: float | None

    def end_detached(self, reason: str, why: str) -> None: ...

    def engine_lost(self) -> None: ...

    def shut_down(self) -> None: ...

    def drain(self, deadline_s: float) -> None: ...


@dataclass(frozen=True)
class LoadReport:
    """``GET /v1/load`` and the capacity agent: how full this replica is."""

    replica_id: str
    active: int  # open sessions, all protocols, detached ones included (they hold their slots)
    detached: int  # of those, the ones waiting for their client to resume: the oldest gives its slot to a new one
    max: int  # session_capacity
    subscribers: int
    ready: bool  # model loaded, worker alive, not stopping
    draining: bool
    engine_free: int | None = None  # one of several fronts: the shared engine's free slots (None: not shared)

    @property
    def free(self) -> int:
        own = max(0, self.max - self.active)
        return own if self.engine_free is None else min(own, self.engine_free)


def split_session_id(session_id: str) -> tuple[str, str] | None:
    """``(replica id, random part)`` of an id this server minted; None for anything else."""
    replica_id, separator, random_part = session_id.rpartition(SESSION_ID_SEPARATOR)
    if not separator or not replica_id or not _HEX_ID.fullmatch(random_part):
        return None
    return replica_id, random_part


def default_replica_id() -> str:
    """The host name (a container's id, a pod's name), in the characters a replica id may hold."""
    name = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname()).lstrip(".-")[:64]
    return name or "replica"


class Runtime:
    """Everything the app holds for its lifetime; only touched from the event loop."""

    def __init__(self, config: ServerConfig, on_fatal: Callable[[str], None] | None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.on_fatal = on_fatal
        self.model: LoadedModel | ModelSummary | None = None
        self.worker: EngineClient | None = None  # a Worker thread, or the client of an engine process
        self.load_error: str | None = None
        self.is_shutting_down = False
        self.stream_url: str | None = None  # set by whoever bound the socket; for the "ready" log line
        self.replica_id = config.replica_id or default_replica_id()
        self._loader: threading.Thread | None = None
        self.load_progress = LoadProgress()  # the download and the weight load, for /ready and the log
        self.streams: dict[str, RegisteredConnection] = {}
        self.metrics.set_state_source(self.state_totals)
        self.metrics.sessions_max.set(config.session_capacity)
        self.rate_limiter = None if config.connect_rate_per_ip is None else \
            AddressRateLimiter(config.connect_rate_per_ip, config.connect_burst_per_ip)
        self._cooled_sessions: set[str] = set()  # sessions whose flood cut already put their address on cooldown
        self._opened_at_s: dict[str, float] = {}  # when each registered session was (for its end's log line)
        self.flood_cooldown = None if config.flood.cut_cooldown_s == 0 else \
            CutCooldown(config.flood.cut_cooldown_s, config.flood.max_cut_cooldown_s)
        # System prompt characters each client address may have checked (tokenised on the event loop), over all of
        # its sessions: a session's own budget would be full again at every reconnect.
        self.prompt_checks = AddressBuckets(config.flood.prompt_chars_per_s, config.flood.prompt_char_burst)
        # The JSON items of heavy text frames each client address may have parsed, over all of its sessions (flood.py).
        self.json_item_checks = AddressBuckets(*json_items_rate_and_burst(config.flood))
        # Ephemeral client secrets (api/realtime/secrets.ClientSecrets, set by the realtime routes): admission
        # accepts a valid one wherever it accepts the API key. None = API key only.
        self.client_secrets: Any | None = None
        # Drain: set by the first drain request; the server stops itself once it is done (request_stop).
        self.drain_task: asyncio.Task | None = None
        self.drain_deadline_s: float | None = None  # time.monotonic() by which every session is closed
        self.request_stop: Callable[[], None] | None = None  # set by build_server: ends uvicorn (exit 0)
        # One of several fronts (``serve --fronts N``, api/fronts.py): set before serving, the engine process to
        # attach to instead of loading a model or starting an engine; its slots are shared with the other fronts.
        self.attach_to: EngineEndpoints | None = None
        self.shared_engine: EngineProcessClient | None = None

    # ---- sessions: ids, factory, registry --------------------------------------------------------------

    def new_session_id(self) -> str:
        """``<replica id>_<32 random hex>``: unguessable (it is also the subscription capability) and routable
        (a load balancer sends a subscriber or a resuming client to the replica that holds the session)."""
        session_id = f"{self.replica_id}{SESSION_ID_SEPARATOR}{uuid.uuid4().hex}"
        bind_session(session_id)  # what the connection's task logs from now on is about this session (logs.py)
        return session_id

    def make_session(self, session_id: str, engine_emit: Callable, observer: Any | None = None,
                     client_address: str | None = None) -> Session:
        """A session on this runtime's worker; call only while ``is_ready`` (admission checked it).
        ``client_address`` pays for its prompt's prefill in the engine (``engine.prefill_tokens_per_s_per_ip``)."""
        model = self.model
        assert model is not None and self.worker is not None, "a session before the model was loaded"
        info = ModelInfo(model.name, self.config.is_demo, model.tokenizer)
        now_s = time.monotonic()
        prompt_chars = None if client_address is None else self.prompt_checks.bucket(client_address, now_s)
        json_items = None if client_address is None else self.json_item_checks.bucket(client_address, now_s)
        return Session(session_id, self.config, info, self.worker, engine_emit, now_s,
                       observer=self.metrics if observer is None else observer, client_address=client_address,
                       prompt_chars=prompt_chars, json_items=json_items)

    def register(self, session_id: str, connection: RegisteredConnection) -> None:
        """Count a session against capacity. Call before the first await after admission, so that two
        handshakes cannot both take the last slot. With every slot taken (admission let it in because one
        is held by a detached session), the oldest detached session gives its slot up."""
        if len(self.streams) >= self.config.session_capacity or self.engine_free_slots == 0:
            oldest = next(iter(self.detached_sessions()), None)
            if oldest is not None:
                oldest.end_detached("detached_evicted", "a new session took its slot (the server was full)")
        self.streams[session_id] = connection
        self._opened_at_s[session_id] = time.monotonic()
        log.info("session %s opened for %s", session_id, connection.client_address)
        self._count_sessions()

    def release(self, session_id: str, reason: str) -> None:
        """The session ended (``reason`` labels ``ais_sessions_total``); its slot is free again. A session cut for
        a flood puts its client address on cooldown (admission refuses it for a while)."""
        self.session_closed(session_id, reason)
        stream = self.streams.pop(session_id, None)
        self._cooled_sessions.discard(session_id)
        if stream is None:
            return
        opened_at_s = self._opened_at_s.pop(session_id, None)
        if reason not in _ENDS_OF_DETACHED_SESSIONS:  # those have a line of their own (end_detached), with more
            lasted = "" if opened_at_s is None else f" after {time.monotonic() - opened_at_s:.1f} s"
            session = stream.session
            log.info("session %s ended (%s)%s: %.1f s of audio received, %d chunks heard", session_id, reason, lasted,
                     session.audio.audio_received_s, session.num_chunks_decided)
        if self.shared_engine is not None and stream.detached_since_s is not None:
            self.shared_engine.detach_ended(session_id)  # one never opened in the engine is known there only so
        self._count_sessions()
        self.metrics.sessions_total.labels(reason).inc()
        if reason == PREFILL_REFUSED:  # the engine refused its open (and logged the address)
            self.metrics.prefill_refusals_total.inc()
        if self.is_draining:
            self.metrics.drain_sessions_left.set(len(self.streams))

    def session_closed(self, session_id: str, reason: str) -> None:
        """The session ended, its socket may still be sending the last events: a flood cut puts the client's address
        on cooldown now, so a client that reconnects the moment it reads session.closed is refused already."""
        stream = self.streams.get(session_id)
        if (stream is None or reason not in FLOOD_CUTS or self.flood_cooldown is None
                or session_id in self._cooled_sessions):
            return
        self._cooled_sessions.add(session_id)
        address = stream.client_address
        now_s = time.monotonic()
        cooldown_s = self.flood_cooldown.cut(address, now_s)
        if self.shared_engine is not None:  # a cut client must not come back through another front
            self.shared_engine.address_cut(address, now_s + cooldown_s, cooldown_s)
        log.warning("session %s was cut for a flood (%s): %s may not connect for %.0f s", session_id, reason,
                    address, cooldown_s)

    def _count_sessions(self) -> None:
        self.metrics.sessions_active.set(len(self.streams))
        if self.shared_engine is not None:  # the other fronts see the slots taken before the first audio opens them
            self.shared_engine.set_num_admitted(len(self.streams))

    def num_sessions_of(self, address: str) -> int:
        """Sessions (connected or detached, either endpoint) whose client has ``address`` (an IPv6 one: its /64)."""
        client = client_key(address)
        return sum(1 for stream in self.streams.values() if client_key(stream.client_address) == client)

    def detached_sessions(self) -> list[RegisteredConnection]:
        """Sessions waiting for their client to resume them, the longest waiting first."""
        detached = [stream for stream in self.streams.values() if stream.is_detached]
        return sorted(detached, key=lambda stream: stream.detached_since_s or 0.0)

    def session_detached(self, connection: RegisteredConnection) -> None:
        """``connection`` has just detached: one client address holds at most ``max_detached_per_ip`` detached
        sessions (its oldest end beyond that), so clients that connect and drop in a loop cannot hold every
        slot's memory and context for ``resume_grace_s`` (a new session would evict them, one at a time)."""
        limit = self.config.max_detached_per_ip
        client = client_key(connection.client_address)  # an IPv6 client: its /64
        same_address = [stream for stream in self.detached_sessions() if client_key(stream.client_address) == client]
        for stream in same_address[:max(0, len(same_address) - limit)]:
            stream.end_detached("detached_per_ip_limit", f"its client address holds more than "
                                f"max_detached_per_ip ({limit}) detached sessions")
        session_id = self._id_of(connection)
        if self.shared_engine is not None and session_id is not None and connection.is_detached:
            # Its slot may go to a new session of another front (the engine decides: Runtime._evicted_by_engine).
            assert connection.detached_since_s is not None
            self.shared_engine.session_detached(session_id, connection.detached_since_s)

    def session_reattached(self, connection: RegisteredConnection) -> None:
        """``connection``'s client resumed it: its slot is its own again."""
        session_id = self._id_of(connection)
        if self.shared_engine is not None and session_id is not None:
            self.shared_engine.detach_ended(session_id)

    def _id_of(self, connection: RegisteredConnection) -> str | None:
        return next((session_id for session_id, stream in self.streams.items() if stream is connection), None)

    def _evicted_by_engine(self, session_id: str) -> None:
        """One of several fronts: the shared engine gave this detached session's slot to a new session (of this
        front or another, every slot being taken); it has closed it there already."""
        stream = self.streams.get(session_id)
        if stream is not None and stream.is_detached:
            stream.end_detached("detached_evicted", "a new session took its slot (every engine slot was taken)")

    @property
    def num_subscribers(self) -> int:
        return sum(len(stream.subscribers) for stream in list(self.streams.values()))

    def state_totals(self) -> dict[str, float]:
        """What the open sessions hold, summed (the ``ais_session_*`` gauges; event loop only).

        The engine side is a racy read of the worker's counters, good enough for monitoring.
        """
        totals: dict[str, float] = dict.fromkeys(SESSION_STATE, 0)
        for session_id, stream in list(self.streams.items()):
            totals["ais_session_queued_events"] += stream.queued_events
            totals["ais_sessions_detached"] += stream.is_detached
            totals["ais_session_replay_events"] += stream.num_replay_events
            size = self.worker.state_size(session_id) if self.worker is not None else None
            if size is not None:
                totals["ais_session_kv_positions"] += size.positions
                totals["ais_session_history_tokens"] += size.history_tokens
                totals["ais_session_history_chunks"] += size.history_chunks
                totals["ais_session_queued_chunks"] += size.queued_chunks
        return totals

    # ---- readiness and load -------------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """The model serves: loaded, its worker alive, the process not stopping (draining or full still count)."""
        return self.worker is not None and self.worker.is_alive and not self.is_shutting_down

    def engine_quiet_reason(self) -> str | None:
        """Why a new session is refused while the engine (in its own process) has not answered for a while; None
        while it answers. Its sessions go on, and resumes and subscribers are admitted: it may answer again."""
        quiet_s = self.worker.quiet_s if self.worker is not None else None
        if quiet_s is None:
            return None
        return f"the model engine has not answered for {quiet_s:.0f} s"

    @property
    def is_draining(self) -> bool:
        return self.drain_task is not None

    @property
    def engine_free_slots(self) -> int | None:
        """One of several fronts: the shared engine's free slots as of its latest heartbeat, less the sessions this
        front admitted that it did not count yet (a burst of handshakes on this front cannot overshoot; two fronts
        may still both see the last slot within ``HEARTBEAT_S``: the engine then refuses one session with
        ``capacity``); None when this process's sessions are the engine's only ones."""
        engine = self.shared_engine
        status = engine.engine_status if engine is not None else None
        if engine is None or status is None:
            return None
        return status.slots_free_for(engine.front_id, len(self.streams))

    def _detached_on_other_fronts(self) -> int:
        """Slots the shared engine's other fronts hold with detached sessions (as of its latest heartbeat): the
        engine gives one to a new session of this front when no slot is free (``EngineHost._make_room``)."""
        engine = self.shared_engine
        status = engine.engine_status if engine is not None else None
        return 0 if engine is None or status is None else status.detached_elsewhere(engine.front_id)

    @property
    def num_detached(self) -> int:
        """Sessions waiting for their client to resume (each holds its slot)."""
        return sum(stream.is_detached for stream in self.streams.values())

    @property
    def is_full(self) -> bool:
        """No room for a new session: every slot is held by a connected client (a detached session's slot
        goes to a new session: ``register``), or, one of several fronts, the shared engine has none free."""
        num_detached = self.num_detached
        if num_detached == 0 and self.engine_free_slots == 0 and self._detached_on_other_fronts() == 0:
            return True
        return len(self.streams) - num_detached >= self.config.session_capacity

    def not_ready_reason(self) -> str:
        """A plain reason for clients (``/ready``, the ``not_ready`` error); the details
        (paths, exception text) went to the log, which only the operator reads."""
        if self.is_shutting_down:
            return "shutting down"
        if self.load_error is not None:
            return "model failed to load (the server log says why)"
        if self.worker is None and self.attach_to is not None:  # one of several fronts, often started again beside an
            # engine that serves: "loading the model" sent an operator after a load that was not happening
            return "waiting for the engine process (it loads the model when it starts)"
        if self.worker is None:
            report = self.load_progress.report()
            if report is not None and report.phase == "downloading" and not report.is_finished:
                return "downloading the model"
            return "loading the model"
        return "the model worker died (the server log says why)"

    def load_progress_json(self) -> dict | None:
        """What ``/ready`` adds while the model downloads or loads (model/progress.py); None otherwise."""
        report = self.load_progress.report()
        return report.as_json() if report is not None and self.is_loading and not self.is_shutting_down else None

    def load_report(self) -> LoadReport:
        return LoadReport(replica_id=self.replica_id, active=len(self.streams),
                          detached=self.num_detached,
                          max=self.config.session_capacity,
                          subscribers=self.num_subscribers, ready=self.is_ready, draining=self.is_draining,
                          engine_free=self.engine_free_slots)

    # ---- drain ---------------------------------------------------------------------------------------------

    def begin_drain(self) -> asyncio.Task:
        """Admit nothing more, tell every session to go, stop the process once they are gone (or at
        ``drain_timeout_s``). Idempotent: a second request joins the drain under way."""
        if self.drain_task is None:
            timeout_s = self.config.drain_timeout_s or 0.0
            self.drain_deadline_s = time.monotonic() + timeout_s
            self.metrics.draining.set(1)
            self.metrics.drain_sessions_left.set(len(self.streams))
            self.drain_task = asyncio.get_running_loop().create_task(self._drain(timeout_s), name="drain")
        return self.drain_task

    def drain_seconds_left(self) -> float:
        return 0.0 if self.drain_deadline_s is None else max(0.0, self.drain_deadline_s - time.monotonic())

    async def _drain(self, timeout_s: float) -> None:
        streams = list(self.streams.values())
        # Three phases, so that the last session is gone by drain_timeout_s, the time preStop and
        # terminationGracePeriodSeconds were sized for: the sessions' own deadline (each closes with 1012 at a
        # listening point, or at this deadline); then time for that deadline close to happen (a session
        # enforces it at its next poll, up to a second late, and waits for the engine to cut its reply); then
        # a last forced close (1001) of whatever is still open, a client that never took its close.
        final_close_s = min(DRAIN_FINAL_CLOSE_S, timeout_s / 2)
        forced_close_s = min(DRAIN_FORCED_CLOSE_S, final_close_s / 2)
        session_deadline_s = timeout_s - final_close_s
        log.warning("draining: admitting no new sessions; %d open session(s) told to go within %.1f s",
                    len(streams), session_deadline_s)
        for stream in streams:
            stream.drain(session_deadline_s)
        left = await _wait_finished(streams, timeout_s - forced_close_s)
        if left:
            log.warning("draining: %d session(s) still open past their deadline; closing them", len(left))
            for stream in left:
                stream.shut_down()
            left = await _wait_finished(left, forced_close_s)
        self.metrics.drain_sessions_left.set(len(self.streams))
        log.warning("drained (%d session(s) left open); stopping", len(left))
        if self.request_stop is not None:
            self.request_stop()

    # ---- model load and worker lifecycle -------------------------------------------------------------------

    @property
    def is_loading(self) -> bool:
        return self._loader is not None and self._loader.is_alive()

    async def load(self) -> None:
        self._loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            model, self.worker = await self._on_loader_thread(self._load_blocking)
            self.worker.send_in_loop_turns()
            self.model = model
            self.metrics.model_ready.set(1)
        except Exception as error:  # a server without its model is useless: say why, then stop
            if self.is_shutting_down:
                return  # stopped while loading: whatever the load did is moot
            self.load_error = str(error) if isinstance(error, CannotServe) else f"{type(error).__name__}: {error}"
            log.error("cannot serve: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)
            return
        capacity = self.config.session_capacity
        log.info("ready: serving %s (audio-interaction %s; %s on %s, %s; up to %d session%s; replica %s; loaded in "
                 "%.1f s)", self.stream_url or "/v1/stream", __version__, model.name, model.device,
                 dtype_name(model), capacity, "" if capacity == 1 else "s", self.replica_id,
                 time.perf_counter() - started)

    async def _on_loader_thread(self, load: Callable[[], Any]) -> Any:
        """``asyncio.to_thread`` on a daemon thread of its own: ``asyncio.run`` joins the default
        executor's threads at exit, so a stop during a load (minutes for the 3B model, or a hung
        download) would wait for the load to finish; this thread is simply left behind."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()

        def settle(setter: Callable[[Any], None], value: Any) -> None:
            if not outcome.done():  # not cancelled by a stop meanwhile
                setter(value)

        def run() -> None:
            try:
                result = load()
            except Exception as error:
                setter, value = outcome.set_exception, error
            else:
                setter, value = outcome.set_result, result
            try:
                loop.call_soon_threadsafe(settle, setter, value)
            except RuntimeError:
                pass  # the event loop is gone: the server stopped while the model loaded

        self._loader = threading.Thread(target=run, name="model-loader", daemon=True)
        self._loader.start()
        return await outcome

    def _load_blocking(self) -> tuple[LoadedModel | ModelSummary, EngineClient]:
        from audio_interaction_server.demo.source import resolve_model_source
        from audio_interaction_server.engine.client import choose_transport

        engine = self.config.engine
        worker: EngineClient
        if self.attach_to is not None:  # one of several fronts: the supervisor started the engine (api/fronts.py)
            from audio_interaction_server.engine.process_client import EngineProcessClient

            log.info("attaching to the engine process at %s; /health answers meanwhile, /ready once it serves",
                     self.attach_to.commands)
            worker = self.shared_engine = EngineProcessClient(self.attach_to, hang_timeout_s=engine.hang_timeout_s)
            return self._start_worker(worker)
        checkpoint = engine.checkpoint
        log.info("loading the model (%s, device %s); /health answers meanwhile, /ready once it is loaded",
                 "the tiny demo" if self.config.is_demo else checkpoint, engine.device)
        checkpoint = resolve_model_source(checkpoint, self.config.is_demo, self.load_progress)
        if choose_transport(engine) == "process":  # the weights load there (docs/engine.md, the engine process)
            from audio_interaction_server.engine.process_client import EngineProcessClient

            worker = EngineProcessClient.spawn(checkpoint, engine, functools.partial(
                configure_logging, self.config.log_level, self.config.log_format),
                memory_trim_interval_s=self.config.memory_trim_interval_s)
        else:  # torch and the model in this process: imported here, so that a front of an engine process never does
            from audio_interaction_server.engine.worker import Worker
            from audio_interaction_server.model.checkpoint import load_model

            worker = Worker(load_model(checkpoint, engine.device, engine.dtype, self.load_progress), engine)
        return self._start_worker(worker)

    def _start_worker(self, worker: EngineClient) -> tuple[LoadedModel | ModelSummary, EngineClient]:
        if self.is_shutting_down:  # stopped while loading: no worker to start, nobody to serve
            raise RuntimeError("the server stopped while the model loaded")
        worker.on_step = self._on_step
        worker.on_failure = self._on_worker_failure
        if self.shared_engine is not None:
            self.shared_engine.on_evicted = self._on_evicted_by_engine
            self.shared_engine.on_address_cut = self._on_address_cut
        worker.start()
        assert worker.model is not None
        self.metrics.set_step_path(worker.step_path)
        self.metrics.set_engine_pid(worker.engine_pid)
        self._check_default_session(worker)
        return worker.model, worker

    def _check_default_session(self, worker: EngineClient) -> None:
        """The configuration checked the default session options against the context budget without the system
        prompt; its tokens are known now. Options that do not fit would have every session refused by a server
        that says it is ready: stop instead, saying which settings."""
        try:
            worker.check_options(self.config.session)
        except ValueError as error:
            worker.stop()
            engine = self.config.engine
            raise CannotServe(
                "the default session options do not fit the context budget (session.max_turn_tokens "
                f"{self.config.session.max_turn_tokens}, engine.max_positions {engine.max_positions}, "
                f"engine.rollover_window_positions {engine.rollover_window_positions}, the system prompt): {error}"
            ) from None

    def _on_step(self, stats) -> None:  # worker thread; prometheus_client is thread-safe
        self.metrics.observe_step(stats)

    def _on_evicted_by_engine(self, session_id: str) -> None:  # the engine client's reader thread
        try:
            self._loop.call_soon_threadsafe(self._evicted_by_engine, session_id)
        except RuntimeError:
            pass  # the event loop is already closed: the server is stopping anyway

    def _on_address_cut(self, address: str, until_s: float, cooldown_s: float) -> None:  # the engine client's reader
        try:
            self._loop.call_soon_threadsafe(self._impose_cut, address, until_s, cooldown_s)
        except RuntimeError:
            pass  # the event loop is already closed: the server is stopping anyway

    def _impose_cut(self, address: str, until_s: float, cooldown_s: float) -> None:
        if self.flood_cooldown is not None:
            self.flood_cooldown.impose(address, until_s, cooldown_s)

    def _on_worker_failure(self, error: BaseException) -> None:  # the dying worker thread
        try:
            self._loop.call_soon_threadsafe(self._worker_failed, f"the model worker died: {error!r}")
        except RuntimeError:
            pass  # the event loop is already closed: the server is stopping anyway

    def _worker_failed(self, reason: str) -> None:
        # The worker has ended every session; a server without it is useless, and only a new
        # process gets a new one, so stop (exit status 1) and let the supervisor restart us.
        self.metrics.model_ready.set(0)
        log.error("cannot serve: %s; stopping so that a supervisor can restart the server", reason)
        # The engine ended those it held; those it never heard of (no audio yet) end the same way, not as at a
        # shutdown asked for (server_shutdown, 1001), which would tell their clients nothing failed.
        for stream in list(self.streams.values()):
            stream.engine_lost()
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def trim_memory_periodically(self, interval_s: float) -> None:
        """Return the heap's free pages to the OS every ``interval_s``.

        glibc keeps freed memory in its arenas and returns only the top of each heap, so with
        sessions coming and going (their mel chunks, queued audio and events allocated on
        one thread, freed on another) free but resident pages pile up: in the 64-session load
        run of docs/reliability.md, RSS rose 1013 -> 1370 MiB over 14 minutes while the live
        heap stayed within 283-382 MiB and the free heap grew 214 -> 512 MiB; with this trim
        every 60 s RSS stayed at 1,000-1,050 MiB from minute 4 on. It runs on a thread:
        walking the arenas takes milliseconds and must not stall the event loop.
        """
        while True:
            await asyncio.sleep(interval_s)
            started = time.perf_counter()
            if not await asyncio.to_thread(malloc_trim):
                return  # not glibc: nothing to trim
            self.metrics.malloc_trim_seconds.observe(time.perf_counter() - started)

    async def shutdown(self) -> None:
        """Close every session with a final event, then stop the worker."""
        self.is_shutting_down = True
        self.metrics.model_ready.set(0)
        if self.drain_task is not None and not self.drain_task.done():
            self.drain_task.cancel()  # a stop during a drain (a second SIGTERM, SIGINT): close at once
        streams = list(self.streams.values())
        for stream in streams:
            stream.shut_down()
        await _wait_finished(streams, CLOSE_GRACE_S + 1.0)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)


async def _wait_finished(streams: list[RegisteredConnection], timeout_s: float) -> list[RegisteredConnection]:
    """Wait until every connection has finished, at most ``timeout_s``; the ones still open."""
    if not streams:
        return []
    waits = {asyncio.ensure_future(stream.finished.wait()): stream for stream in streams}
    _, pending = await asyncio.wait(waits, timeout=max(0.0, timeout_s))
    for task in pending:
        task.cancel()
    return [waits[task] for task in pending]
