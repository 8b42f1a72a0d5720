"""benchmarks/realtime_latency.py still runs end to end (its figures are in docs/performance.md, not asserted)."""

from __future__ import annotations

import json


def test_realtime_latency_benchmark_times_replies_on_both_protocols(tmp_path, shared_audio):
    from benchmarks.realtime_latency import main

    out = tmp_path / "figures.json"
    # 4 s a phase: the 2 s warm-up, then one request (at 2 s) with 2 s for its reply to begin.
    main(["--streams", "1", "--seconds", "4", "--repeat", "1", "--json", str(out)])
    phases = json.loads(out.read_text())
    assert sorted(phase["protocol"] for phase in phases) == ["realtime", "stream"]
    for phase in phases:
        assert phase["requests"] >= 1 and phase["replies_timed"] >= 1 and phase["cpu_per_stream"] > 0
