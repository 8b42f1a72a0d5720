"""What a resumable session costs: events kept for a replay, and their memory.

A real session (the tiny demo checkpoint, the real Worker and Session, real audio from
../shared/audio) hears ``--seconds`` of audio with decision events on and, so the random model
speaks, a reply every ``--reply-every`` chunks of ``--reply-tokens`` tokens (engine.scripted_turns).
Every event it sends is numbered and kept in a ReplayLog, as a detached session keeps them;
tracemalloc measures the log's memory.

    python -m benchmarks.resume_cost [--seconds 120] [--reply-every 10] [--reply-tokens 30]
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc

import numpy as np

from audio_interaction_server.api.replay_log import ReplayLog
from audio_interaction_server.api.native import NativeCodec
from audio_interaction_server.api.session import ModelInfo, Session
from audio_interaction_server.audio.files import load_audio_file
from audio_interaction_server.config import EngineConfig, ScriptedTurns
from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint
from audio_interaction_server.engine.worker import Worker
from audio_interaction_server.model.checkpoint import load_model
from audio_interaction_server.config import ServerConfig
from benchmarks.harness import shared_audio_dir



def session_events(seconds: float, reply_every: int, reply_tokens: int) -> list:
    model = load_model(ensure_demo_checkpoint(), "cpu", "float32")
    engine = EngineConfig(max_sessions=1, scripted_turns=ScriptedTurns(every_chunks=reply_every,
                                                                      reply_tokens=reply_tokens))
    worker = Worker(model, engine)
    config = ServerConfig(decision_events=True, max_buffered_audio_s=3600, engine=engine.model_dump())
    events: list = []
    session = Session("bench", config, ModelInfo(model.name, True, model.tokenizer), worker,
                      lambda engine_events: events.extend(session.on_engine_events(engine_events, 0.0)), 0.0)
    codec = NativeCodec(config.max_frame_bytes)
    events += session.start("t" * 32, 30.0)
    clips = [load_audio_file(path) for path in sorted(shared_audio_dir().glob("*/*.*"))
             if path.suffix in (".wav", ".mp3")]
    audio = np.concatenate(clips)
    audio = np.tile(audio, int(np.ceil(seconds * 16000 / len(audio))))[:int(seconds * 16000)]
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    for start in range(0, len(pcm), 16000):
        for command in codec.decode(pcm[start:start + 16000].tobytes()):
            events += session.handle(command, 0.0)
        worker.run_until_idle()
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--reply-every", type=int, default=10)
    parser.add_argument("--reply-tokens", type=int, default=30)
    args = parser.parse_args()
    events = session_events(args.seconds, args.reply_every, args.reply_tokens)
    kinds: dict[str, int] = {}
    for event in events:
        kinds[event.type] = kinds.get(event.type, 0) + 1
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    log = ReplayLog(max_events=len(events), max_bytes=2**62)  # unbounded: what the events themselves hold
    for event in events:
        log.stamp(event, keep=True, trim=False)
    gc.collect()
    kept = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    wire_bytes = sum(len(NativeCodec.encode(event)[0]) for event in log.since(0))
    per_event = kept / len(events)
    print(json.dumps({
        "audio_s": args.seconds, "events": len(events), "events_per_minute": round(len(events) / args.seconds * 60),
        "kinds": kinds, "log_bytes": kept, "bytes_per_event": round(per_event), "wire_bytes": wire_bytes,
        "full_log_mib_at_2000_events": round(2000 * per_event / 2**20, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
