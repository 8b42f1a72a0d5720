"""The CUDA-graph self-check's own power, on the CPU: ``StepGraphs.self_check`` with stand-in graphs.

The self-check runs the static step eagerly, then replays the bucket's graph on the same buffers and compares.
A replay that writes nothing (a graph captured empty, on another stream, or into buffers rebound since) must
be refused, not pass on the eager run's leftovers in ``outputs``/``hidden``.
"""

from __future__ import annotations

import torch

from audio_interaction_server.engine.buckets import BucketSet
from audio_interaction_server.engine.sampling import DECISION_TOKENS
from audio_interaction_server.engine.static_path import StaticPath
from audio_interaction_server.engine.step_graphs import GraphCaptureError, StepGraphs, StepSnapshot
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.static_step import StaticStep


class DoesNothing:
    """A graph whose replay launches nothing."""

    def replay(self) -> None:
        pass


class RunsTheStep:
    """A graph whose replay is the step itself: what a correct capture replays."""

    def __init__(self, step: StaticStep, bucket) -> None:
        self.step, self.bucket = step, bucket

    def replay(self) -> None:
        self.step.run(self.bucket)


def graphs_on_the_cpu(tiny_model, make_graph):
    cache = tiny_model.lm.new_cache(8, 256, scratch_slot=True)
    buckets = BucketSet.for_rows(8, 8)
    step = StaticStep(tiny_model.lm, AudioEncoder(tiny_model.encoder_tower), cache, buckets.largest, DECISION_TOKENS)
    path = StaticPath(step, buckets, graphs=False)
    graphs = StepGraphs.__new__(StepGraphs)  # __init__ refuses a CPU step; the self-check itself is device-neutral
    graphs.step, graphs.staging = step, path.staging
    graphs.buckets = sorted(buckets.all(), key=lambda b: (b.num_tokens, b.num_rows), reverse=True)
    graphs.graphs = {bucket: make_graph(step, bucket) for bucket in graphs.buckets}
    return graphs, cache


def test_the_self_check_refuses_replays_that_write_nothing(tiny_model):
    graphs, cache = graphs_on_the_cpu(tiny_model, lambda step, bucket: DoesNothing())
    problems = graphs.self_check(cache.num_slots, cache.max_positions, tiny_model.lm.cfg.vocab_size)
    assert problems and all("expected" in p or "non-finite" in p for p in problems), problems


def test_the_self_check_passes_replays_that_run_the_step(tiny_model):
    graphs, cache = graphs_on_the_cpu(tiny_model, RunsTheStep)
    assert graphs.self_check(cache.num_slots, cache.max_positions, tiny_model.lm.cfg.vocab_size) == []
    assert torch.isfinite(graphs.step.hidden).any()


def test_a_capture_that_raises_leaves_the_static_step_running_eagerly(tiny_model, monkeypatch):
    """Issue 23's eager fallback: a bucket that cannot be captured (an operation CUDA graphs refuse, the pool out
    of memory) must not stop the worker from starting; the static step serves eagerly and says why."""
    from audio_interaction_server.engine import static_path

    class CannotCapture:
        def __init__(self, *args) -> None:
            pass

        def capture(self):
            raise GraphCaptureError("operation not permitted when stream is capturing")

    monkeypatch.setattr(static_path, "StepGraphs", CannotCapture)
    cache = tiny_model.lm.new_cache(8, 256, scratch_slot=True)
    buckets = BucketSet.for_rows(8, 8)
    step = StaticStep(tiny_model.lm, AudioEncoder(tiny_model.encoder_tower), cache, buckets.largest, DECISION_TOKENS)
    path = StaticPath(step, buckets, graphs=True)
    assert path.graphs is None and "not permitted when stream is capturing" in path.capture_error
    assert (path.describe().graphs, path.describe().capture_error) == ("failed", path.capture_error)


def test_the_step_path_says_whether_graphs_serve_and_what_they_cost(tiny_model, monkeypatch):
    """What /metrics shows (``ais_step_path_info``, capture seconds, pool bytes): graphs that passed the self-check
    serve (``on``); graphs it refused were captured, cost their time and memory, and do not serve (``refused``)."""
    from audio_interaction_server.engine import static_path
    from audio_interaction_server.engine.step_graphs import CaptureStats

    problems: list[str] = []

    class Captures:
        def __init__(self, *args) -> None:
            pass

        def capture(self):
            return CaptureStats(3, 1.5, 4096)

        def self_check(self, *args):
            return problems

    monkeypatch.setattr(static_path, "StepGraphs", Captures)
    cache = tiny_model.lm.new_cache(8, 256, scratch_slot=True)
    buckets = BucketSet.for_rows(8, 8)
    step = StaticStep(tiny_model.lm, AudioEncoder(tiny_model.encoder_tower), cache, buckets.largest, DECISION_TOKENS)
    assert StaticPath(step, buckets, graphs=False).describe() == static_path.StepPath(True, "off")
    serving = StaticPath(step, buckets, graphs=True).describe()
    assert (serving.graphs, serving.num_graphs, serving.capture_s, serving.pool_bytes) == ("on", 3, 1.5, 4096)
    problems.append("bucket (1, 0): tokens differ")
    refused = StaticPath(step, buckets, graphs=True).describe()
    assert (refused.graphs, refused.num_graphs, refused.capture_error) == ("refused", 3, None)


def test_the_self_check_replays_listening_rows_alone_and_reply_rows_alone_too():
    """At start-up it replayed the largest bucket, the smallest and some between: at 256 and 1,024 rows never a
    bucket of listening rows alone, whose capture takes a branch of its own (GPU pre-flight review)."""
    for max_listening, max_reply in [(1024, 384), (256, 96), (768, 192), (8, 8)]:
        graphs = StepGraphs.__new__(StepGraphs)  # the choice needs only the buckets, in the order the engine keeps
        buckets = BucketSet.for_rows(max_listening, max_reply).all()
        graphs.buckets = sorted(buckets, key=lambda b: (b.num_tokens, b.num_rows), reverse=True)
        picks = graphs.buckets_to_check(4)
        assert len(picks) == min(4, len(buckets)) and picks[0] == graphs.buckets[0], picks
        assert any(bucket.reply == 0 for bucket in picks) and any(bucket.listening == 0 for bucket in picks), picks
        assert graphs.buckets[-1] in picks and picks == sorted(picks, key=graphs.buckets.index)


class FakeCuda:
    """Just enough of torch.cuda for ``StepGraphs.capture`` on the CPU: streams, and a ``torch.cuda.graph`` that
    behaves as torch's does when the body raises: ``capture_end`` raises too (the capture is invalidated) and its
    ``__exit__`` then never restores the stream it switched to."""

    def __init__(self, monkeypatch) -> None:
        fake = self

        class Stream:
            def __init__(self, device=None, name: str = "side") -> None:
                self.name = name

            def wait_stream(self, other) -> None:
                pass

        self.current = Stream(name="default")
        capture_stream = Stream(name="capture")

        class StreamContext:
            def __init__(self, stream) -> None:
                self.stream = stream

            def __enter__(self):
                self.before, fake.current = fake.current, self.stream
                return self

            def __exit__(self, *exc) -> None:
                fake.current = self.before

        class CUDAGraph:
            def pool(self):
                return "pool"

            def replay(self) -> None:
                raise AssertionError("not reached: the capture failed")

        class Graph:
            def __init__(self, graph, pool=None) -> None:
                pass

            def __enter__(self):
                self.before, fake.current = fake.current, capture_stream

            def __exit__(self, exc_type, *rest) -> None:
                if exc_type is not None:  # capture_end() raises before stream_ctx.__exit__ restores the stream
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                fake.current = self.before

        def set_stream(stream) -> None:
            fake.current = stream

        for name, value in dict(synchronize=lambda device=None: None, memory_reserved=lambda device=None: 0,
                                Stream=Stream, stream=StreamContext, current_stream=lambda device=None: fake.current,
                                CUDAGraph=CUDAGraph, graph=Graph, set_stream=set_stream).items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)


def static_path_with_fake_cuda(tiny_model, monkeypatch, run):
    """A StaticPath whose start-up runs the real StepGraphs.capture (on FakeCuda) with ``run`` as its step."""
    from audio_interaction_server.engine import static_path

    class CpuStepGraphs(StepGraphs):
        def __init__(self, step, staging, buckets) -> None:  # StepGraphs refuses a CPU step; capture does not care
            self.step, self.staging = step, staging
            self.buckets = sorted(buckets, key=lambda b: (b.num_tokens, b.num_rows), reverse=True)
            self.graphs = {}

    cuda = FakeCuda(monkeypatch)
    monkeypatch.setattr(static_path, "StepGraphs", CpuStepGraphs)
    cache = tiny_model.lm.new_cache(8, 256, scratch_slot=True)
    buckets = BucketSet.for_rows(8, 8)
    step = StaticStep(tiny_model.lm, AudioEncoder(tiny_model.encoder_tower), cache, buckets.largest, DECISION_TOKENS)
    eager = step.run
    step.run = lambda bucket: run(cuda, eager, bucket)
    return cuda, step, buckets


def test_a_refused_capture_falls_back_on_the_stream_it_started_from(tiny_model, monkeypatch):
    """An operation CUDA graphs refuse, inside the capture only: the static step serves eagerly, on the worker's own
    stream (torch.cuda.graph leaves the capture stream current when capture_end raises)."""

    def run(cuda, eager, bucket):
        if cuda.current.name == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        return eager(bucket)

    cuda, step, buckets = static_path_with_fake_cuda(tiny_model, monkeypatch, run)
    path = StaticPath(step, buckets, graphs=True)
    assert path.graphs is None and path.capture_error is not None, path.capture_error
    assert cuda.current.name == "default"  # the eager fallback does not run on the abandoned capture stream
    # capture_end's error, and the one that invalidated the capture (what the report should name)
    assert "during capture" in path.capture_error and "not permitted when stream is capturing" in path.capture_error


def test_an_eager_step_that_fails_at_start_up_is_not_a_capture_failure(tiny_model, monkeypatch):
    """The capture's warm-up runs the static step eagerly; if that fails (a kernel that does not compile, out of
    memory at the largest bucket), serving it eagerly would fail every short batch: the start-up must fail, loudly,
    instead of 'falling back' to the same step."""
    import pytest

    def run(cuda, eager, bucket):
        raise RuntimeError("triton: out of resources")

    cuda, step, buckets = static_path_with_fake_cuda(tiny_model, monkeypatch, run)
    with pytest.raises(RuntimeError, match="out of resources"):
        StaticPath(step, buckets, graphs=True)


def test_poisoned_outputs_read_as_no_step_ever_gave_them(tiny_model):
    """Between an eager run and a replay the outputs are poisoned; the finite flag was poisoned to -1, which reads
    as True (finite), so two replays that wrote nothing compared as equal and finite (GPU patch review)."""
    graphs, _ = graphs_on_the_cpu(tiny_model, RunsTheStep)
    graphs.step.poison_outputs()
    poisoned = StepSnapshot.of(graphs.step, list(range(graphs.step.outputs.shape[0])))
    assert set(poisoned.tokens) == {-1} and not any(poisoned.finite) and torch.isnan(poisoned.hidden).all()
