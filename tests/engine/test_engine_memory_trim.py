"""memory_trim_interval_s reaches the engine process (first-hour operator review): the periodic malloc_trim ran
only in the front's process, while with the engine in a process of its own (engine.transport process, the default
on CUDA, and always with --fronts) the mel chunks, histories and queued audio the trim is for (docs/reliability.md,
"Load: 64 sessions") live in the engine's, whose freed heap glibc then never returned."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.process import MEMORY_TRIM_THREAD, EngineProcess, trim_memory_periodically


def test_the_trimmer_trims_every_interval_until_stopped():
    calls: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=trim_memory_periodically, args=(0.02, lambda: calls.append(1) or True, stop))
    thread.start()
    time.sleep(0.2)
    stop.set()
    thread.join(2)
    assert not thread.is_alive() and 3 <= len(calls) <= 12


def test_the_trimmer_ends_where_there_is_nothing_to_trim():
    calls: list[int] = []
    thread = threading.Thread(target=trim_memory_periodically, args=(0.01, lambda: calls.append(1) or False))
    thread.start()
    thread.join(2)
    assert not thread.is_alive() and calls == [1]


def thread_names(pid: int) -> set[str]:
    names = set()
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        try:
            names.add(comm.read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
@pytest.mark.parametrize("interval_s", [0.5, None])
def test_the_engine_process_trims_its_own_heap_as_the_server_is_told(tiny_checkpoint, interval_s):
    engine = EngineProcess(tiny_checkpoint, EngineConfig(device="cpu", max_sessions=1),
                           memory_trim_interval_s=interval_s)
    engine.start()
    try:
        deadline_s = time.monotonic() + 90
        while time.monotonic() < deadline_s and "model-worker" not in thread_names(engine.process.pid):
            assert engine.process.is_alive(), "the engine process ended"
            time.sleep(0.2)
        time.sleep(0.5)  # the trimmer starts beside the worker, once the model is loaded
        names = thread_names(engine.process.pid)
        assert (MEMORY_TRIM_THREAD in names) == (interval_s is not None), names
    finally:
        engine.stop()
