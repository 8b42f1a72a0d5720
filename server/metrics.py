"""Prometheus metrics of one server instance (imports nothing from server/).

A private registry per instance, so several apps in one process (tests) do not
collide in prometheus_client's global one. Everything here is thread-safe: the
worker thread reports steps, the event loop reports sessions.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
_STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_ready = Gauge("ais_model_ready", "1 when the model is loaded and the worker alive", registry=r)
        self.sessions_active = Gauge("ais_sessions_active", "open streaming sessions", registry=r)
        self.subscribers_active = Gauge("ais_subscribers_active", "open event subscriptions", registry=r)
        self.sessions_total = Counter("ais_sessions", "streaming sessions by how they ended", ["reason"], registry=r)
        self.refused_total = Counter("ais_connections_refused", "connections refused", ["reason"], registry=r)
        self.errors_total = Counter("ais_error_events", "error events sent to clients", ["code"], registry=r)
        self.audio_seconds_total = Counter("ais_audio_received_seconds", "audio accepted from clients", registry=r)
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
        self.step_rows = Histogram("ais_worker_step_rows", "sessions advanced per step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    # ---- server.session.SessionObserver ------------------------------------------------
    def audio_received(self, seconds: float) -> None:
        self.audio_seconds_total.inc(seconds)

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

    # ---- the worker's on_step (a server.worker.StepStats) ------------------------------
    def observe_step(self, stats) -> None:
        self.step_seconds.observe(stats.total_s)
        self.step_rows.observe(stats.num_rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
