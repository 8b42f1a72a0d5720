"""Talk to an Audio-Interaction server through the microphone; Ctrl-C ends the session.

    pip install sounddevice
    python client_examples/microphone.py ws://127.0.0.1:8000

Captures mono s16le PCM at the input device's native rate (the server resamples), sends
it in 20 ms frames and prints replies like stream_file.py. The first Ctrl-C flushes (so
the model can answer the last words) and closes the session; a second one quits at once. SIGTERM (``kill``,
``timeout``, a process manager) closes the session at once, without the flush, prints the summary and exits 143.
A busy server (loading, full or draining) is tried again with a growing delay for up to
``--busy-retry-s`` seconds (90 by default), saying so on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from ais_client import (EXIT_USAGE, ClientError, ReplyConsole, StreamSession, add_busy_retry_argument,
                        busy_retry_problem, default_api_key, exit_status_help, run_main, run_stream)

FRAME_MS = 20


class MicrophoneSender:
    def __init__(self, sounddevice, device: int | None, info: dict) -> None:
        self.sounddevice, self.device, self.info = sounddevice, device, info

    async def __call__(self, session: StreamSession) -> None:
        info = self.info
        rate_hz = int(info["default_samplerate"])
        await session.configure(audio={"sample_format": "pcm_s16le", "sample_rate_hz": rate_hz, "num_channels": 1})
        session.console.note(f"listening on {info['name']} at {rate_hz} Hz; Ctrl-C to finish")
        loop = asyncio.get_running_loop()
        blocks: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the user is done

        def on_audio(data, num_frames: int, time_info, status) -> None:  # sounddevice's thread
            if status:
                loop.call_soon_threadsafe(session.console.note, f"audio input: {status}")
            loop.call_soon_threadsafe(blocks.put_nowait, bytes(data))

        def finish() -> None:  # the first Ctrl-C; a second one raises KeyboardInterrupt as usual
            blocks.put_nowait(None)
            if has_loop_handler:
                loop.remove_signal_handler(signal.SIGINT)
            else:
                signal.signal(signal.SIGINT, signal.default_int_handler)

        # The loop's own handler wakes it at once, whichever thread the signal lands on.
        try:
            loop.add_signal_handler(signal.SIGINT, finish)
            has_loop_handler = True
        except NotImplementedError:  # Windows event loops have no signal handlers
            signal.signal(signal.SIGINT, lambda signum, frame: loop.call_soon_threadsafe(finish))
            has_loop_handler = False
        try:
            stream = self.sounddevice.RawInputStream(
                samplerate=rate_hz, channels=1, dtype="int16", device=self.device,
                blocksize=rate_hz * FRAME_MS // 1000, callback=on_audio)
        except self.sounddevice.PortAudioError as error:
            raise ClientError(f"cannot open the input device: {error}") from None
        with stream:
            while (block := await blocks.get()) is not None:
                await session.send_pcm(block, len(block) / 2 / rate_hz)
        session.console.note("finishing: waiting for the model to hear the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Talk to an Audio-Interaction server through the microphone.",
        epilog=exit_status_help("a second Ctrl-C (the first flushes, closes the session and ends with 0)",
                                on_sigterm="SIGTERM (kill, timeout, a process manager): its session is closed at once, "
                                "without the first Ctrl-C's flush"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="server URL, e.g. ws://127.0.0.1:8000")
    parser.add_argument("--api-key", default=default_api_key(), help="the server's API key (default: $AIS_API_KEY)")
    parser.add_argument("--device", type=int, help="input device number (python -m sounddevice lists them)")
    parser.add_argument("--json", action="store_true", help="print the server's events as raw JSON lines")
    add_busy_retry_argument(parser)
    args = parser.parse_args(argv)
    if (problem := busy_retry_problem(args.busy_retry_s)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import sounddevice  # optional: only this example needs an audio device
    except ImportError:
        print("error: microphone.py needs the sounddevice package: pip install sounddevice", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # installed, but PortAudio is missing
        print(f"error: sounddevice cannot load PortAudio ({error}); on Debian/Ubuntu: apt-get install "
              "libportaudio2", file=sys.stderr)
        return EXIT_USAGE
    try:  # before connecting: a wrong device is a bad argument, not a session that opens for nothing
        info = sounddevice.query_devices(args.device, "input")
    except (ValueError, sounddevice.PortAudioError) as error:  # no such device, no input at all
        print(f"error: no usable input device: {error}", file=sys.stderr)
        return EXIT_USAGE
    console = ReplyConsole(as_json=args.json)
    sender = MicrophoneSender(sounddevice, args.device, info)
    return run_main(run_stream(args.url, args.api_key, console, sender, args.busy_retry_s))


if __name__ == "__main__":
    sys.exit(main())
