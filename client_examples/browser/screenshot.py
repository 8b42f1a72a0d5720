"""Retake docs/screenshot-mid-reply.png: the browser page in headless Chromium, caught mid-reply.

    python client_examples/browser/screenshot.py [OUT.png]

Starts the server on 127.0.0.1 with a tiny random checkpoint, opens the page it serves at ``/`` in
Debian's Chromium (``/usr/bin/chromium``, driven by the ``playwright`` package; no browser download),
feeds Chromium's fake microphone a recording from ../shared/audio, and takes the picture while a
reply is streaming in. A random model almost never starts a reply with an emotion tag, so this
checkpoint's six emotion rows of ``lm_head`` are scaled up (``--emotion-boost``) to show how a tag
is rendered; its text is noise either way. To hold the picture still, a wrapper around the page's
WebSocket stops delivering server events once a reply is far enough along: the page shows exactly
the events it had received by then. *Speak replies* is on; headless Chromium has no voice, so a stand-in
answers ``speechSynthesis.speak`` (0.8 s a sentence) and the page shows a sentence of the reply before
being spoken.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_AUDIO = ROOT.parent / "shared" / "audio"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]

# Injected before the page's scripts: once window.holdEvents is set, server events stop reaching it.
HOLD_EVENTS_SCRIPT = """
(() => {
  const NativeWebSocket = window.WebSocket;
  window.holdEvents = false;
  window.WebSocket = class extends NativeWebSocket {
    set onmessage(handler) { super.onmessage = (event) => { if (!window.holdEvents) handler(event); }; }
  };
})();
"""
# A stand-in voice: each utterance "speaks" for 0.8 s, with the real start and end events.
STAND_IN_VOICE_SCRIPT = """
(() => {
  let current = null;
  const waiting = [];
  const next = () => {
    if (current || waiting.length === 0) return;
    const utterance = current = waiting.shift();
    utterance.dispatchEvent(new SpeechSynthesisEvent("start", { utterance }));
    setTimeout(() => {
      if (current !== utterance) return;
      current = null;
      utterance.dispatchEvent(new SpeechSynthesisEvent("end", { utterance }));
      next();
    }, 800);
  };
  speechSynthesis.speak = (utterance) => { waiting.push(utterance); setTimeout(next, 0); };
  speechSynthesis.cancel = () => { current = null; waiting.length = 0; };
})();
"""
# Hold once a later reply streams with an emotion tag and a line or two of text.
MID_REPLY_CONDITION = """() => {
  const turns = window.audioInteraction.turns;
  const last = turns.at(-1);
  const ready = turns.length >= 2 && window.audioInteraction.numDecisions >= %d
    && last && !last.endReason && last.emotion && last.text.length >= %d
    && window.audioInteraction.speech.speaking?.turn >= last.turn - 1;
  if (ready) window.holdEvents = true;
  return ready;
}"""


def boost_emotions(checkpoint: Path, factor: float) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from audio_interaction_server import spec as T

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = checkpoint / index["weight_map"]["lm_head.weight"]
    state = load_file(str(shard))
    rows = torch.tensor(sorted(T.EMOTION_NAMES))
    state["lm_head.weight"][rows] *= factor
    save_file(state, str(shard), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "screenshot-mid-reply.png")
    parser.add_argument("--audio", type=Path, default=SHARED_AUDIO / "01_count_bark" / "sample01_01.mp3")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random checkpoint")
    parser.add_argument("--emotion-boost", type=float, default=3.0, help="scale of the emotion rows of lm_head")
    parser.add_argument("--min-chars", type=int, default=90, help="reply text shown before the picture")
    parser.add_argument("--min-chunks", type=int, default=24, help="decisions shown before the picture")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    import soundfile
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "server"))  # the package, also where it is not pip-installed
    from audio_interaction_server.api.app import build_server, create_app
    from audio_interaction_server.config import ServerConfig
    from audio_interaction_server.demo.make_tiny_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        checkpoint = make_checkpoint(scratch_dir / "checkpoint", "tiny", seed=args.seed)
        boost_emotions(checkpoint, args.emotion_boost)
        microphone = scratch_dir / "microphone.wav"  # Chromium's fake capture reads WAV only
        samples, rate_hz = soundfile.read(args.audio, dtype="int16")
        soundfile.write(microphone, samples, rate_hz, subtype="PCM_16")

        config = ServerConfig.model_validate(dict(
            port=0, log_level="warning", engine={"checkpoint": checkpoint, "device": "cpu"},
            session={"max_turn_tokens": 120}))
        app = create_app(config)
        server = build_server(app, config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not (server.started and app.state.runtime.is_ready):
            if time.monotonic() > deadline or not thread.is_alive():
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=args.chromium, headless=True,
                    args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={microphone}"])
                page = browser.new_page(viewport={"width": 1000, "height": 1080})
                page.add_init_script(HOLD_EVENTS_SCRIPT)
                page.add_init_script(STAND_IN_VOICE_SCRIPT)
                page.goto(f"http://127.0.0.1:{port}/")
                page.check("#speak-replies")
                page.click("#start")
                condition = MID_REPLY_CONDITION % (args.min_chunks, args.min_chars)
                page.wait_for_function(condition, timeout=120_000, polling=10)
                page.wait_for_timeout(300)  # let the level meter and fonts settle
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.should_exit = True
            thread.join(30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
