"""Prometheus metrics of one server instance (of the package, imports only process_memory).

A private registry per instance, so several apps in one process (tests) do not
collide in prometheus_client's global one. Everything here is thread-safe: the
worker thread reports steps, the event loop reports sessions.

Memory is reported in two layers so a dashboard can tell a leak from allocator
behaviour: what the sessions hold (history tokens and chunks, queued audio,
unsent events; read at scrape time through ``set_state_source``) and what the
process holds (RSS, and glibc's split of its heap into bytes in use and free
bytes it has not returned to the OS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from audio_interaction_server.process_memory import (  # noqa: F401  (heap_stats, malloc_trim: the front's users)
    HeapStats, heap_stats, malloc_trim, open_fds, resident_bytes,
)

# No ``<name>_created`` series: prometheus_client adds one per counter and histogram (a Unix timestamp), which in
# the text format reads as a second metric: ``ais_sessions_created{reason="client_closed"} 1.79e+09`` next to
# ``ais_sessions_total`` looked like 1.8 billion sessions created, typed a gauge with the counter's help text. A
# scrape sees counter resets without it. (A process-wide switch of prometheus_client's, read at each render.)
disable_created_metrics()

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
_STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_STEP_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_ready = Gauge("ais_model_ready", "1 when the model is loaded and the worker alive", registry=r)
        self.sessions_active = Gauge("ais_sessions_active", "open streaming sessions", registry=r)
        # active / max is the load an autoscaler scales on (deploy/kubernetes/keda-scaledobject.yaml).
        self.sessions_max = Gauge("ais_sessions_max", "sessions this replica admits at once (max_sessions)",
                                  registry=r)
        self.draining = Gauge("ais_draining", "1 while the replica drains (SIGTERM or the drain call)", registry=r)
        self.drain_sessions_left = Gauge("ais_drain_sessions_left", "sessions still open since the drain began",
                                         registry=r)
        self.subscribers_active = Gauge("ais_subscribers_active", "open event subscriptions", registry=r)
        self.sessions_total = Counter("ais_sessions", "streaming sessions by how they ended", ["reason"], registry=r)
        self.refused_total = Counter("ais_connections_refused", "connections refused", ["reason"], registry=r)
        self.errors_total = Counter("ais_error_events", "error events sent to clients", ["code"], registry=r)
        self.prefill_refusals_total = Counter(
            "ais_prefill_budget_refusals", "sessions refused (rate_limited, 1013) because their client address had "
            "the engine feed more new system prompts than engine.prefill_tokens_per_s_per_ip allows", registry=r)
        self._audio_seconds = _PlainCounter("ais_audio_received_seconds", "audio accepted from clients")
        r.register(self._audio_seconds)
        # The engine's own count, as its latest step reports it (with several fronts, every front shows the engine's).
        self._prefixes_reused = _PlainCounter(
            "ais_prefix_kv_reused", "sessions the engine opened with their system prompt's keys and values copied "
            "from kept ones (engine.prefix_kv_positions) instead of feeding the prompt")
        r.register(self._prefixes_reused)
        self._model_steps = _PathCounter()
        r.register(self._model_steps)
        self._step_path = _StepPathCollector()
        r.register(self._step_path)
        self.chunks_total = Counter("ais_chunks_decided", "0.4 s chunks the model decided on", registry=r)
        self.turns_total = Counter("ais_turns", "replies by end reason", ["end_reason"], registry=r)
        self.reply_tokens_total = Counter("ais_reply_tokens", "reply tokens generated", registry=r)
        self.decision_latency = Histogram(
            "ais_decision_latency_seconds", "chunk complete (its last audio received) -> decision made; includes "
            "queueing behind the session's own reply and behind other sessions", buckets=_LATENCY_BUCKETS_S,
            registry=r)
        self.onset_latency = Histogram("ais_turn_onset_latency_seconds", "audio received -> turn_begin sent",
                                       buckets=_LATENCY_BUCKETS_S, registry=r)
        self.step_seconds = Histogram("ais_worker_step_seconds", "one batched model step",
                                      buckets=_STEP_BUCKETS_S, registry=r)
        # Up to the largest batches a GPU steps (engine.max_sessions 256 in configs/gpu-host.yaml; the GPU step is
        # built for 600 and more): buckets that stopped at 64 put every step of a busy GPU replica in +Inf.
        self.step_rows = Histogram("ais_worker_step_rows", "sessions advanced per step",
                                   buckets=_STEP_ROW_BUCKETS, registry=r)
        self.malloc_trim_seconds = Histogram(
            "ais_malloc_trim_seconds", "one periodic malloc_trim (memory_trim_interval_s), run off the event loop",
            buckets=_STEP_BUCKETS_S, registry=r)
        self._state = _StateCollector()
        r.register(self._state)
        self._process_memory = _ProcessMemoryCollector()
        r.register(self._process_memory)

    def set_state_source(self, source: Callable[[], Mapping[str, float]]) -> None:
        """``source()`` -> {name: value} for the ``SESSION_STATE`` gauges, called at each scrape."""
        self._state.source = source

    # ---- audio_interaction_server.api.session.SessionObserver ----------------------------
    def audio_received(self, seconds: float) -> None:
        self._audio_seconds.total += seconds

    def chunk_decided(self, latency_s: float | None = None) -> None:
        self.chunks_total.inc()
        if latency_s is not None:
            self.decision_latency.observe(latency_s)

    def turn_began(self, onset_latency_s: float | None) -> None:
        if onset_latency_s is not None:
            self.onset_latency.observe(onset_latency_s)

    def turn_ended(self, num_tokens: int, end_reason: str) -> None:
        self.turns_total.labels(end_reason).inc()
        self.reply_tokens_total.inc(num_tokens)

    def error_sent(self, code: str) -> None:
        self.errors_total.labels(code).inc()

    # ---- the worker's on_step (an events.StepStats) ------------------------------
    def observe_step(self, stats) -> None:
        self.step_seconds.observe(stats.total_s)
        self.step_rows.observe(stats.num_rows)
        self._prefixes_reused.total = stats.prefixes_reused_total
        self._model_steps.totals = {"graph": stats.graph_steps_total, "static": stats.static_eager_steps_total,
                                    "eager": stats.eager_batches_total}

    def set_engine_pid(self, pid: int | None) -> None:
        """The engine's own process, where it runs in one (its resident memory is shown); None: this process."""
        self._process_memory.engine_pid = pid

    def set_step_path(self, path) -> None:
        """The engine's ``events.StepPath``, once it has started (None: not known, nothing shown)."""
        self._step_path.path = path

    def render(self) -> bytes:
        return generate_latest(self.registry)


# What every open session holds, summed over sessions: these must stay bounded however long
# sessions run (docs/reliability.md). Keys of the state source's mapping -> help text.
SESSION_STATE = {
    "ais_session_kv_positions": "KV-cache positions in use, summed over sessions",
    "ais_session_history_tokens": "tokens kept for context rollover, summed over sessions",
    "ais_session_history_chunks": "audio chunks (20 KB of mel each) kept for context rollover, summed over sessions",
    "ais_session_queued_chunks": "audio chunks received but not yet consumed by the model, summed over sessions",
    "ais_session_queued_events": "events waiting to be sent to clients, summed over connections",
    "ais_sessions_detached": "sessions whose connection dropped, waiting resume_grace_s to be resumed (they hold "
                             "their slots)",
    "ais_session_replay_events": "events kept for a resume (resume_max_events per session at most), summed",
}


class _PlainCounter(Collector):
    """A counter from a plain number with one writer. ``ais_audio_received_seconds_total`` is added to for every
    accepted frame, on the event loop only (sessions live there): a prometheus_client ``Counter`` takes a lock per
    ``inc``, a few percent of the event loop at 48 real-time streams. A scrape reads it whole (a float under the
    GIL)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.total: float = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.total)


class _PathCounter(Collector):
    """``ais_model_steps_total{path}``, the engine's own counts as its latest step reports them: ``graph`` (a CUDA
    graph replayed: one fixed-shape step), ``static`` (the same step run eagerly: graphs off, refused, or the bucket
    not captured), ``eager`` (a batch of any shape: long rows, or no static path, as on the CPU)."""

    def __init__(self) -> None:
        self.totals: Mapping[str, int] = {"graph": 0, "static": 0, "eager": 0}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("ais_model_steps", "the model's steps by how they ran (graph, static, eager)",
                                     labels=["path"])
        for path, total in self.totals.items():
            family.add_metric([path], total)
        yield family


class _StepPathCollector(Collector):
    """How the engine steps, fixed at its start-up: whether CUDA graphs serve (and why not), and what capturing
    them cost in time and device memory: a dashboard tells a replica that fell back to eager steps."""

    def __init__(self) -> None:
        self.path = None  # an events.StepPath (this module does not import the engine)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        path = self.path
        if path is None:
            return
        info = GaugeMetricFamily("ais_step_path_info", "1, labelled with how the engine steps short rows: step "
                                 "static or eager; graphs on, off, refused (by the start-up self-check) or failed "
                                 "(the capture raised)", labels=["step", "graphs"])
        info.add_metric(["static" if path.static else "eager", path.graphs], 1)
        yield info
        yield GaugeMetricFamily("ais_cuda_graphs_captured", "CUDA graphs captured at start-up, one per bucket "
                                "(refused ones included)", value=path.num_graphs)
        yield GaugeMetricFamily("ais_cuda_graph_capture_seconds", "start-up time spent warming up and capturing "
                                "the CUDA graphs", value=path.capture_s)
        yield GaugeMetricFamily("ais_cuda_graph_pool_bytes", "device memory reserved by the CUDA graphs' shared "
                                "pool", value=path.pool_bytes)


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, float]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self.source() if self.source is not None else {}
        for name, documentation in SESSION_STATE.items():
            yield GaugeMetricFamily(name, documentation, value=values.get(name, 0))


class _ProcessMemoryCollector(Collector):
    def __init__(self) -> None:
        self.engine_pid: int | None = None  # the engine's process, where it has one of its own (on this host)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rss = resident_bytes()
        if rss is not None:
            yield GaugeMetricFamily("ais_process_resident_memory_bytes", "resident set size of this process "
                                    "(a front alone when the engine runs in a process of its own)",
                                    value=rss)
        engine_rss = resident_bytes(self.engine_pid) if self.engine_pid is not None else None
        if engine_rss is not None:  # the weights, the KV cache and the sessions' audio live there
            yield GaugeMetricFamily("ais_engine_process_resident_memory_bytes", "resident set size of the engine's "
                                    "own process (only where it runs in one: the CUDA default, and --fronts)",
                                    value=engine_rss)
        fds = open_fds()
        if fds is not None:
            yield GaugeMetricFamily("ais_process_open_fds", "open file descriptors (sockets included)", value=fds)
        heap = heap_stats()
        if heap is not None:
            family = GaugeMetricFamily(
                "ais_malloc_heap_bytes", "glibc malloc heap: in_use = live allocations in arenas, free = held in "
                "arenas but unused (fragmentation or not yet trimmed), mmapped = live large blocks mapped directly",
                labels=["state"])
            family.add_metric(["in_use"], heap.in_use)
            family.add_metric(["free"], heap.free)
            family.add_metric(["mmapped"], heap.mmapped)
            yield family
