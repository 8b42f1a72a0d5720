"""``engine_emitter``: the ``emit`` a session hands the engine, called on the engine's thread (the worker, or the
engine process client's reader) or on the loop itself, delivers on the loop, in order, and never inside the call."""

from __future__ import annotations

import asyncio
import gc
import threading

from audio_interaction_server.api.connection import engine_emitter


class Connection:
    def __init__(self) -> None:
        self.received: list[tuple[list, int]] = []

    def on_events(self, events: list) -> None:
        self.received.append((events, threading.get_ident()))


def test_events_emitted_on_the_loop_or_a_thread_arrive_on_the_loop_in_order_and_never_reentrantly():
    async def main() -> tuple[list, int, list]:
        connection = Connection()
        emit = engine_emitter(asyncio.get_running_loop(), connection.on_events)
        emit(["on the loop 1"])
        emit(["on the loop 2"])
        seen_at_once = list(connection.received)  # scheduled, not called inside emit
        await asyncio.to_thread(emit, ["from a worker thread"])
        for _ in range(100):
            if len(connection.received) == 3:
                break
            await asyncio.sleep(0.01)
        return connection.received, threading.get_ident(), seen_at_once

    received, loop_thread_id, seen_at_once = asyncio.run(main())
    assert seen_at_once == []
    assert [events for events, _ in received] == [["on the loop 1"], ["on the loop 2"], ["from a worker thread"]]
    assert {thread_id for _, thread_id in received} == {loop_thread_id}


def test_events_for_a_freed_connection_are_dropped():
    async def main() -> None:
        connection = Connection()
        emit = engine_emitter(asyncio.get_running_loop(), connection.on_events)
        del connection
        gc.collect()
        emit(["late"])
        await asyncio.to_thread(emit, ["later"])
        await asyncio.sleep(0.05)  # both calls ran by now, finding nobody: no error

    asyncio.run(main())
