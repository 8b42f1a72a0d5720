"""audio_interaction_server.api.metrics: process memory figures and the session-state gauges, without a server."""

from __future__ import annotations

import sys

import pytest

from audio_interaction_server.api.metrics import SESSION_STATE, Metrics, heap_stats, malloc_trim, resident_bytes

MIB = 1 << 20
linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or heap_stats() is None,
                                 reason="reads /proc and glibc's mallinfo2")


def samples(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


FOLLOW_AN_ALLOCATION = """
import numpy as np
from audio_interaction_server.api.metrics import heap_stats, resident_bytes
MIB = 1 << 20
rss_before, heap_before = resident_bytes(), heap_stats()
block = np.ones(16 * MIB, dtype=np.float32)  # 64 MiB, every page touched; malloc maps it directly
rss_during, heap_during = resident_bytes(), heap_stats()
assert rss_during - rss_before >= 60 * MIB, (rss_before, rss_during)
assert heap_during.mmapped - heap_before.mmapped >= 60 * MIB, (heap_before, heap_during)
del block
assert heap_stats().mmapped - heap_before.mmapped < 4 * MIB  # a mapped block is unmapped, not kept
assert resident_bytes() - rss_before < 16 * MIB
"""


@linux_glibc
def test_rss_and_heap_follow_a_64_mib_allocation():
    """In a fresh interpreter: in this one, earlier tests (a server's threads, torch) can leave 64 MiB free
    in a malloc arena, and the block is then carved from pages already resident instead of mapped."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", FOLLOW_AN_ALLOCATION], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@linux_glibc
def test_malloc_trim_returns_free_heap_pages_to_the_os():
    # Many small blocks live in the arena; freeing all but the last leaves free pages below the top
    # that glibc does not give back by itself.
    blocks = [bytearray(b"x" * 2000) for _ in range(40_000)]  # about 80 MiB of 2 KB blocks
    keep = blocks[-1]
    del blocks
    free_before = heap_stats().free
    rss_before = resident_bytes()
    assert free_before >= 40 * MIB
    assert malloc_trim()
    assert rss_before - resident_bytes() >= 30 * MIB
    assert keep[0] == ord("x")


@linux_glibc
def test_process_gauges_are_rendered():
    values = samples(Metrics())
    assert values["ais_process_resident_memory_bytes"] > 10 * MIB
    assert values["ais_process_open_fds"] >= 3  # stdin, stdout, stderr at least
    assert values['ais_malloc_heap_bytes{state="in_use"}'] > 0
    assert {'ais_malloc_heap_bytes{state="free"}', 'ais_malloc_heap_bytes{state="mmapped"}'} <= values.keys()


def test_session_state_gauges_read_the_source_at_each_scrape():
    metrics = Metrics()
    assert all(samples(metrics)[name] == 0 for name in SESSION_STATE)  # no source yet: zeros, not missing
    state = {"ais_session_history_chunks": 7, "ais_session_queued_events": 3}
    metrics.set_state_source(lambda: state)
    values = samples(metrics)
    assert values["ais_session_history_chunks"] == 7 and values["ais_session_queued_events"] == 3
    assert values["ais_session_kv_positions"] == 0
    state["ais_session_history_chunks"] = 2  # read again at the next scrape, not cached
    assert samples(metrics)["ais_session_history_chunks"] == 2


def test_audio_received_is_counted_in_seconds_and_exposed_as_a_counter():
    metrics = Metrics()
    assert samples(metrics)["ais_audio_received_seconds_total"] == 0
    for _ in range(25):
        metrics.audio_received(0.02)  # 20 ms frames
    metrics.audio_received(0.5)
    assert samples(metrics)["ais_audio_received_seconds_total"] == pytest.approx(1.0)
    assert "# TYPE ais_audio_received_seconds_total counter" in metrics.render().decode()


def test_the_models_steps_are_counted_by_how_they_ran(tiny_model):
    """Issue 23 asks for steps by graph vs eager on /metrics; the static path counted them and nothing showed them.
    On the CPU (no static path) every batch is eager; the engine's counts reach the front with each step's figures."""
    import numpy as np

    from audio_interaction_server.audio.blocks import PaddedBlocks
    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.engine.events import StepStats
    from audio_interaction_server.engine.worker import Worker
    from audio_interaction_server.options import SessionOptions

    metrics = Metrics()
    assert samples(metrics)['ais_model_steps_total{path="eager"}'] == 0
    worker = Worker(tiny_model, EngineConfig(max_sessions=1))
    worker.on_step = metrics.observe_step
    worker.open_session("s", SessionOptions(max_turn_tokens=2, reply_mode="on_request"), lambda events: None)
    worker.push_audio("s", PaddedBlocks(np.zeros((3, 6640), np.float32), 0))
    worker.run_until_idle()
    counted = samples(metrics)
    assert counted['ais_model_steps_total{path="eager"}'] == 3  # one listening row a step, a chunk each
    assert counted['ais_model_steps_total{path="graph"}'] == counted['ais_model_steps_total{path="static"}'] == 0
    metrics.observe_step(StepStats(1, 1, 0, 1, 0.0, 0.0, 0.0, graph_steps_total=7, static_eager_steps_total=2,
                                   eager_batches_total=5))
    counted = samples(metrics)
    assert [counted[f'ais_model_steps_total{{path="{path}"}}'] for path in ("graph", "static", "eager")] == [7, 2, 5]


def test_how_the_engine_steps_is_shown_once_it_started(tiny_model):
    """Issue 23 asks for the CUDA graphs' capture time and pool bytes on /metrics; they were in the start-up log
    only. Nothing is shown before the engine says how it steps; the CPU worker's path is the eager one, or the
    static step without graphs where configured."""
    from audio_interaction_server.config import EngineConfig
    from audio_interaction_server.engine.events import StepPath
    from audio_interaction_server.engine.worker import Worker

    metrics = Metrics()
    assert not any(name.startswith(("ais_step_path", "ais_cuda_graph")) for name in samples(metrics))
    metrics.set_step_path(Worker(tiny_model, EngineConfig(max_sessions=1)).step_path)
    assert samples(metrics)['ais_step_path_info{graphs="off",step="eager"}'] == 1
    metrics.set_step_path(Worker(tiny_model, EngineConfig(max_sessions=1, step="static")).step_path)
    assert samples(metrics)['ais_step_path_info{graphs="off",step="static"}'] == 1
    metrics.set_step_path(StepPath(True, "refused", num_graphs=119, capture_s=25.5, pool_bytes=3 * 2**30))
    shown = samples(metrics)
    assert shown['ais_step_path_info{graphs="refused",step="static"}'] == 1
    assert not any(name.startswith("ais_step_path_info") and "refused" not in name for name in shown)
    assert (shown["ais_cuda_graphs_captured"], shown["ais_cuda_graph_capture_seconds"],
            shown["ais_cuda_graph_pool_bytes"]) == (119, 25.5, 3 * 2**30)


def test_no_created_series_that_read_as_a_second_metric():
    """prometheus_client's ``<name>_created`` timestamps rendered ``ais_sessions_created{reason=...} 1.79e+09`` (a
    gauge with the help text "streaming sessions by how they ended") beside ``ais_sessions_total``: a dashboard
    summing it showed billions of sessions created."""
    metrics = Metrics()
    metrics.sessions_total.labels("client_closed").inc()
    metrics.turn_ended(5, "text_end")
    metrics.chunk_decided(0.05)
    text = metrics.render().decode()
    assert 'ais_sessions_total{reason="client_closed"} 1.0' in text
    names = {line.partition("{")[0].partition(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    assert not [name for name in names if name.endswith("_created")], sorted(names)


def test_step_rows_buckets_reach_a_gpu_replicas_batches():
    """A GPU replica steps hundreds of sessions at once (configs/gpu-host.yaml: 256 slots); buckets that ended at
    64 put all of those steps in +Inf, where no quantile can be read."""
    metrics = Metrics()
    metrics.step_rows.observe(200)
    values = samples(metrics)
    assert values['ais_worker_step_rows_bucket{le="128.0"}'] == 0
    assert values['ais_worker_step_rows_bucket{le="256.0"}'] == 1
    assert values['ais_worker_step_rows_bucket{le="1024.0"}'] == 1
