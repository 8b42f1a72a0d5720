"""Follow a live session's replies and speak each sentence with a text-to-speech command.

    python client_examples/tts_subscriber.py ws://127.0.0.1:8000 SESSION_ID
    python client_examples/tts_subscriber.py ws://127.0.0.1:8000 SESSION_ID --out-dir replies/

Subscribes to ``/v1/sessions/{id}/events`` (a second device, e.g. a speaker box, following
someone else's stream) and runs the TTS command once per ``segment`` event, in order. The
command is a template: ``{text}`` becomes the sentence and ``{wav}`` the output file, each
inside its own argument; it runs without a shell, so nothing in a reply is ever interpreted (a template that puts
``{text}`` inside code a shell or an interpreter runs, ``sh -c "... {text} ..."``, is refused).
With ``--out-dir`` every segment is written to ``SESSION_ID/turn{N}_seg{M}.wav`` there instead of
spoken: a folder of its own per session, which must not exist yet, so nothing is ever overwritten.
A reply cut short (``turn_end`` with ``end_reason: "cancelled"``: the user talked over it;
``"session_closed"``: the session ended mid-reply, closed by its client or ended by the server) is not spoken on:
its segment being spoken is stopped, and its segments still queued are dropped.
A busy server (loading, or the session has its maximum of subscribers) is tried again with a
growing delay for up to ``--busy-retry-s`` seconds (90 by default), saying so on stderr.
A connection that drops (no close from the server: a Wi-Fi blip, a proxy restarting) is subscribed
again, for as long, while the session goes on; a subscription is live-only, so the replies in between
are missed, and it says how long that was.
Exits when the session closes: 0 if it closed normally and every command succeeded, 1 if the server ended it (a
drain or a stop: the streaming client goes on in a new session, with a new id, that this subscriber does not follow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import soundfile
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ais_client import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, RESUME_FIRST_DELAY_S, RESUME_MAX_DELAY_S, ClientError,
                        ServerBusy, add_busy_retry_argument, busy_retry_problem, default_api_key, describe_close,
                        describe_error, endpoint_url, exit_status_help, open_websocket, printable, retry_while_busy,
                        run_main)

# A TTS command runs in a process group of its own where the platform has them, so that it is stopped whole.
HAS_PROCESS_GROUPS = hasattr(os, "killpg")
SPEAK_COMMAND = "espeak-ng -- {text}"
WAV_COMMAND = "espeak-ng -w {wav} -- {text}"  # "--": a sentence starting with "-" is not an option
TTS_TIMEOUT_S = 60.0
PONG_TIMEOUT_S = 15.0
ABNORMAL_CLOSURE = 1006  # the connection ended without a close frame: the network, not the server, ended it
_PLACEHOLDER = re.compile(r"\{(text|wav)\}")


# Programs that run one of their arguments as code (sh -c SCRIPT, python -c CODE, perl -e CODE): a sentence substituted
# into that argument would be run, not read (a pipeline to a player, e.g. sh -c "espeak-ng --stdout {text} | aplay",
# is the natural way to write one).
@dataclass(frozen=True)
class _Runner:
    code_letters: str  # the option letters that take the code
    code_options: frozenset[str] = frozenset()  # long options that take it (node --eval CODE)
    value_letters: str = ""  # option letters with a value of their own, attached or next (bash -o pipefail, ruby -r x)
    value_options: frozenset[str] = frozenset()  # long options with a value of their own, = or next
    attached_letters: str = ""  # option letters whose value is the rest of their argument (perl -Mstrict)
    is_shell: bool = False  # the code is the first argument past the options (bash -c -e SCRIPT)


_SHELL = _Runner("c", value_letters="oO", value_options=frozenset({"--rcfile", "--init-file"}), is_shell=True)
_PYTHON = _Runner("c", value_letters="WX", value_options=frozenset({"--check-hash-based-pycs"}))
_RUNNERS = {
    **dict.fromkeys(("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "fish"), _SHELL),
    "python": _PYTHON, "pypy": _PYTHON,
    "perl": _Runner("eE", attached_letters="MmIxiDdCF"),
    "ruby": _Runner("e", value_letters="rICE", value_options=frozenset({"--encoding"})),
    "node": _Runner("ep", code_options=frozenset({"--eval", "--print"}), value_letters="rC",
                    value_options=frozenset({"--require", "--import", "--loader", "--experimental-loader",
                                             "--conditions", "--input-type", "--title"})),
}


def _runner_name(arg: str) -> str | None:
    """The shell or interpreter ``arg`` names (a path too, a versioned name such as python3.11 or pypy3), or None."""
    name = Path(arg).name
    for candidate in (name, re.sub(r"[0-9.]+$", "", name)):
        if candidate in _RUNNERS:
            return candidate
    return None


def _code_of(argv: list[str]) -> tuple[str, str] | None:
    """(the program, the argument it runs as code) for a shell or an interpreter anywhere in ``argv``: at its start,
    or after whatever starts it (env NAME=value, timeout 30, nice -n 10, busybox, ...); else None."""
    found = []
    for start, arg in enumerate(argv):
        name = _runner_name(arg)
        code = None if name is None else _code_argument_of(_RUNNERS[name], argv[start + 1:])
        if code is not None:
            found.append((name, code))
    # sh -c 'exec "$@"' sh python -c CODE: a script may start another that runs its own code
    return next((each for each in found if "{text}" in each[1]), found[0] if found else None)


def _code_argument_of(runner: _Runner, args: list[str]) -> str | None:
    """The argument of ``args`` (what follows the program's name) that ``runner`` runs as code, or None."""
    takes_code = False  # a shell's -c seen: its script is the first argument past the options
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--" or len(arg) < 2 or arg[0] not in "-+":  # the options end
            index += arg == "--"
            return args[index] if takes_code and index < len(args) else None
        if arg.startswith("--"):
            option, has_value, value = arg.partition("=")
            if option in runner.code_options:
                return value if has_value else (args[index + 1] if index + 1 < len(args) else None)
            index += 2 if option in runner.value_options and not has_value else 1
            continue
        letters, index = arg[1:], index + 1
        for position, letter in enumerate(letters):
            rest = letters[position + 1:]
            if letter in runner.attached_letters:
                break
            if letter in runner.value_letters:
                index += not rest  # -W ignore; -Wignore carries its value
                break
            if letter in runner.code_letters and arg[0] == "-":
                if runner.is_shell:
                    takes_code = True
                    continue
                # python -cCODE, perl -e'CODE'; else the next argument
                return rest if rest else (args[index] if index < len(args) else None)
    return None


def code_argument(argv: list[str]) -> str | None:
    """The argument that a shell or an interpreter in ``argv`` runs as code (the SCRIPT of ``sh -c SCRIPT``, of
    ``bash -lc SCRIPT``, of ``timeout 30 bash -o pipefail -c SCRIPT``, ...), or None."""
    found = _code_of(argv)
    return None if found is None else found[1]


def code_runner(argv: list[str]) -> str:
    """How ``code_argument``'s code is run, in words (``sh -c``, ``perl -e``)."""
    name = (_code_of(argv) or ("sh", ""))[0]
    return f"{name} -{_RUNNERS[name].code_letters[0]}"


# A session as the Realtime API shows it: sess_ and the session's own id, <replica id>_<32 hex digits> (no replica is
# called "sess", so this reads one way only).
_REALTIME_SESSION_ID = re.compile(r"sess_(.+_[0-9a-f]{32})")


def session_folder(session_id: str) -> str:
    """The --out-dir folder of a session: its own id, whether it was named as ``/v1/stream`` shows it or as
    ``/v1/realtime`` does (``sess_<id>``), so the same session followed both ways lands in one folder."""
    realtime = _REALTIME_SESSION_ID.fullmatch(session_id)
    return realtime.group(1) if realtime else session_id


class TtsCommand:
    """A command template, checked once, expanded per segment."""

    def __init__(self, template: str, writes_wav: bool) -> None:
        try:
            self.argv = shlex.split(template)
        except ValueError as error:  # an unbalanced quote: an apostrophe in a voice name or an option is enough
            raise ClientError(f"--tts-command {template!r} cannot be split into arguments ({error}): it is split as "
                              "a shell splits a command line, so an apostrophe goes inside double quotes or after a "
                              "backslash") from None
        if not self.argv:
            default = WAV_COMMAND if writes_wav else SPEAK_COMMAND
            raise ClientError(f"--tts-command is empty: give a command line with {{text}}, or leave the flag out for "
                              f"the default, {default!r}")
        placeholders = set(_PLACEHOLDER.findall(template))
        if "text" not in placeholders:
            raise ClientError(f"--tts-command must contain {{text}}: {template!r}")
        if writes_wav != ("wav" in placeholders):
            need = "must contain {wav} with --out-dir" if writes_wav else "has {wav}: pass --out-dir"
            raise ClientError(f"--tts-command {need}: {template!r}")
        if (code := code_argument(self.argv)) is not None and "{text}" in code:
            raise ClientError(f"--tts-command {template!r}: {{text}} is inside the code that {code_runner(self.argv)} "
                              "runs, so a reply would be run as code ($(...), ; or a quote in it runs commands): pass "
                              "the sentence as an argument of its own, e.g. sh -c 'espeak-ng --stdout -- \"$1\" | "
                              "aplay' sh {text}")
        if shutil.which(self.argv[0]) is None:
            hint = " (apt-get install espeak-ng, or pass --tts-command)" if self.argv[0] == "espeak-ng" else ""
            raise ClientError(f"TTS program {self.argv[0]!r} not found{hint}")

    def expand(self, text: str, wav: Path | None) -> list[str]:
        # One substitution pass per argument, so a sentence containing "{wav}" stays literal text.
        values = {"text": text, "wav": str(wav)}
        return [_PLACEHOLDER.sub(lambda match: values[match.group(1)], arg) for arg in self.argv]


class Speaker:
    """Runs the command for each queued segment, one at a time, in arrival order; with ``out_dir`` (the session's
    own folder, which main() found absent), the command writes each segment's wav file there."""

    def __init__(self, command: TtsCommand, out_dir: Path | None) -> None:
        self.command, self.out_dir = command, out_dir
        self.queue: asyncio.Queue[dict | None] = asyncio.Queue()  # None: the session ended
        self.num_done = self.num_failed = 0
        self.num_cancelled = 0  # segments of replies cut short not spoken (or stopped while spoken)
        self._stderr_shown: str | None = None  # what the command last wrote to stderr, shown once while it repeats
        self._out_dir_problem: str | None = None  # why out_dir could not be made; "" once made
        self.is_speaking = False  # a segment's command is running
        self._speaking: dict | None = None  # the segment whose command runs
        self._process: asyncio.subprocess.Process | None = None  # that command
        self._cancelled_turns: set[int] = set()  # replies cut short: none of theirs is spoken

    def _make_out_dir(self) -> str:
        """Why the segment cannot be written ("" when it can). The folder is made at the first segment, not at the
        start: a subscription that is refused (a wrong key, a mistyped id) leaves nothing that would refuse the next
        try. Made exclusively: one that appeared since main() looked is another subscriber's, and is left alone."""
        if self._out_dir_problem is None:
            try:
                self.out_dir.mkdir()
                self._out_dir_problem = ""
            except FileExistsError:
                self._out_dir_problem = (f"{self.out_dir} was made since this subscriber started (another one "
                                         "following this session there?): nothing is overwritten")
            except OSError as error:
                self._out_dir_problem = f"cannot make {self.out_dir}: {error.strerror or error}"
        return self._out_dir_problem

    async def run(self) -> None:
        while (segment := await self.queue.get()) is not None:
            self.is_speaking, self._speaking = True, segment
            try:
                await self._speak(segment)
            finally:
                self.is_speaking, self._speaking = False, None

    def cancel_turn(self, turn: int) -> int:
        """Reply ``turn`` was cut short (cancelled, or its session closed): stop speaking it. Its segment being
        spoken is stopped and its queued ones dropped (sentences arrive faster than they are spoken, so a cancelled
        reply could go on for many seconds over the user who cut it, or to a user who has left). Returns how many
        segments go unspoken, the stopped one included."""
        self._cancelled_turns.add(turn)
        kept, num_dropped = [], 0
        while not self.queue.empty():
            segment = self.queue.get_nowait()
            if segment is not None and segment["turn"] == turn:
                num_dropped += 1
            else:
                kept.append(segment)
        for segment in kept:
            self.queue.put_nowait(segment)
        if self._speaking is not None and self._speaking["turn"] == turn:
            num_dropped += 1
            self.stop_at_once()
        self.num_cancelled += num_dropped
        return num_dropped

    def stop_at_once(self) -> None:
        """Stop the command being spoken, if one runs: its reply was cut short, or the subscriber ends now (a second
        SIGTERM), and the command, in a process group no signal to the subscriber reaches, would speak on."""
        if self._process is not None and self._process.returncode is None:
            stop_command(self._process)

    def num_left(self) -> int:
        """Segments received and not yet spoken, the one being spoken included."""
        return self.queue.qsize() + self.is_speaking

    async def _speak(self, segment: dict) -> None:
        name = f"turn{segment['turn']}_seg{segment['index']}"
        wav = None if self.out_dir is None else self.out_dir / f"{name}.wav"
        if wav is not None and (problem := self._make_out_dir()):
            self.num_failed += 1
            print(f"{name}: not written: {problem}", file=sys.stderr, flush=True)
            return
        failure, said = await self._run(self.command.expand(segment["text"], wav))
        if segment["turn"] in self._cancelled_turns:
            print(f"{name}: stopped: the reply was cut short", flush=True)
            return
        if failure is None and said and said != self._stderr_shown:
            # A command may succeed and still say that nothing was heard: espeak-ng on a machine without a sound
            # card prints ALSA errors and exits 0.
            self._stderr_shown = said
            hint = "" if wav is not None else " (no sound on this machine? --out-dir writes WAV files instead)"
            print(f"{name}: the TTS command wrote to stderr{hint}:\n{said}", file=sys.stderr, flush=True)
        done = "spoken" if not said else "TTS command ran but wrote to stderr: perhaps not heard"
        if failure is None and wav is not None:
            try:
                done = f"wrote {wav} ({soundfile.info(str(wav)).duration:.2f} s)"
            except RuntimeError as error:  # the command succeeded but left no readable wav
                failure = f"no readable wav at {wav}: {error}"
        if failure is None:
            self.num_done += 1
            print(f"{name}: {done}", flush=True)
        else:
            self.num_failed += 1
            print(f"{name}: TTS command failed: {failure}", file=sys.stderr, flush=True)

    async def _run(self, argv: list[str]) -> tuple[str | None, str]:
        """Run one command to the end (or until its reply is cancelled): (what went wrong, or None; what it wrote to
        stderr)."""
        try:
            # A process group of its own (POSIX): a command such as sh -c 'espeak-ng ... | aplay' runs its player as
            # a child, which a kill of the shell alone left playing, holding the stderr this reads open.
            process = self._process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=HAS_PROCESS_GROUPS)
        except OSError as error:
            return str(error), ""
        try:
            async with asyncio.timeout(TTS_TIMEOUT_S):  # not wait_for: see confirm_subscription
                _, stderr = await process.communicate()
        except TimeoutError:
            stop_command(process)
            await process.wait()
            return f"took over {TTS_TIMEOUT_S:g} s", ""
        except BaseException:
            # Ctrl-C or SIGTERM cancelled the subscriber: its own group no longer being the terminal's, the command
            # hears neither, and is stopped here.
            stop_command(process)
            raise
        said = stderr.decode(errors="replace").strip()
        if process.returncode != 0:
            why = f": {said}" if said else " (it wrote nothing to stderr)"
            return f"exit status {process.returncode}{why}", said
        return None, said


def stop_command(process: asyncio.subprocess.Process) -> None:
    """Kill a TTS command and every process it started (its process group), or the command alone where there are no
    process groups (Windows)."""
    try:
        if HAS_PROCESS_GROUPS:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:  # it ended meanwhile
        pass


async def confirm_subscription(websocket: ClientConnection) -> bool:
    """Whether the server kept the subscription open.

    It registers a subscriber before completing the handshake, so once open no event is missed;
    but an unknown session (or a bad key) is accepted too, then refused with an error and a
    close sent right after the handshake, ahead of anything the server answers later. A ping's
    pong therefore arrives only on a subscription that stands.
    """
    try:
        pong = await websocket.ping()
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the pong when a cancel (Ctrl-C) comes in
        # the same turn of the loop, and the cancel is lost.
        async with asyncio.timeout(PONG_TIMEOUT_S):
            await pong
    except (ConnectionClosed, TimeoutError):
        return False
    return websocket.state is State.OPEN


async def subscribe(endpoint: str, api_key: str | None) -> tuple[ClientConnection, bool]:
    """The connection, and whether the subscription stands; ``ServerBusy`` for a refusal that says "try again"
    (close 1013). Any other refusal is left on the connection for ``follow`` to read and report."""
    websocket = await open_websocket(endpoint, api_key)
    if await confirm_subscription(websocket):
        return websocket, True
    if websocket.close_code == 1013:
        raise ServerBusy(websocket.close_reason or "close 1013")
    return websocket, False


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def follow(url: str, session_id: str, api_key: str | None, speaker: Speaker, busy_retry_s: float) -> int:
    endpoint = endpoint_url(url, f"/v1/sessions/{session_id}/events")
    websocket, is_subscribed = await retry_while_busy(lambda: subscribe(endpoint, api_key), busy_retry_s, note)
    if is_subscribed:
        print(f"subscribed to session {session_id}", flush=True)
    worker = asyncio.create_task(speaker.run())
    is_fatal, closed_reason = False, None
    try:
        while True:
            fatal, reason = await read_events(websocket, speaker)
            is_fatal, closed_reason = is_fatal or fatal, reason or closed_reason
            if not is_subscribed or websocket.close_code != ABNORMAL_CLOSURE:
                break  # the server closed it: the session ended, or refused this subscriber
            loop = asyncio.get_running_loop()
            dropped_s = loop.time()
            again = await subscribe_again(endpoint, api_key, busy_retry_s)
            if again is None:
                break
            websocket, is_subscribed = again
            if is_subscribed:
                print(f"subscribed to session {session_id} again after {loop.time() - dropped_s:.1f} s: replies in "
                      "that time were missed", flush=True)
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM: said at once, since speaking what is left can take minutes
        if left := speaker.num_left():
            note(f"stopped following; speaking the {left} segment{'s' if left != 1 else ''} already received "
                 "first (Ctrl-C again, or a second SIGTERM, stops at once)")
        raise
    finally:
        speaker.queue.put_nowait(None)
        await worker  # the segments already received are still spoken
    code = websocket.close_code
    cancelled = f", {speaker.num_cancelled} not spoken (replies cut short)" if speaker.num_cancelled else ""
    print(f"{speaker.num_done} segments done, {speaker.num_failed} failed{cancelled}", flush=True)
    if code != 1000:
        print(describe_close(code, websocket.close_reason or ""), file=sys.stderr)
    if closed_reason in SERVER_ENDS:
        print(f"the server ended the session it followed ({closed_reason}: {SERVER_ENDS[closed_reason]}); a client "
              "that goes on does so in a new session, with a new id (stream_file.py and microphone.py print it as "
              "'session: ID (new; ...)'), which this subscriber does not follow: start it again with that id",
              file=sys.stderr)
    is_normal = code == 1000 and not is_fatal and closed_reason not in SERVER_ENDS
    return EXIT_OK if is_normal and speaker.num_failed == 0 else EXIT_FAILED


# Sessions the server ended on its own (docs/deployment.md, ais_sessions_total reasons): during a rolling update the
# streaming client goes on in a new session elsewhere, and its replies are no longer this subscriber's.
SERVER_ENDS = {"server_draining": "its server drains, for an update or a scale-down",
               "server_shutdown": "its server stopped"}


# Replies cut short, by their turn_end's end_reason, and what is said of them: the user talked over the reply
# (response.cancel), or the session ended mid-reply (the user closed it, or the server ended it: a drain, a stop, a
# limit): either way no one waits for the rest.
REPLY_CUTS = {"cancelled": "cancelled by the streaming client", "session_closed": "cut short: the session closed"}


async def read_events(websocket: ClientConnection, speaker: Speaker) -> tuple[bool, str | None]:
    """The subscription's events until its connection ends, each segment queued for the speaker; whether a fatal
    error came, and why the session closed (its session.closed reason; None when none came)."""
    is_fatal, closed_reason = False, None
    try:
        async with websocket:
            while True:
                event = json.loads(await websocket.recv())
                kind = event.get("type")
                if kind == "segment":
                    print(f"turn{event['turn']}_seg{event['index']}: {printable(event['text'])}", flush=True)
                    speaker.queue.put_nowait(event)
                elif kind == "turn_end" and (cut := REPLY_CUTS.get(event.get("end_reason"))) is not None:
                    if num_unspoken := speaker.cancel_turn(event["turn"]):
                        print(f"turn{event['turn']}: {cut}: {num_unspoken} segment"
                              f"{'s' if num_unspoken != 1 else ''} not spoken", flush=True)
                elif kind == "error":
                    is_fatal |= bool(event.get("is_fatal"))
                    print(describe_error(event), file=sys.stderr, flush=True)
                elif kind == "session.closed":
                    closed_reason = event["reason"]
                    print(f"session closed ({closed_reason})", flush=True)
    except ConnectionClosed:
        pass
    return is_fatal, closed_reason


async def subscribe_again(endpoint: str, api_key: str | None, retry_s: float
                          ) -> tuple[ClientConnection, bool] | None:
    """A new subscription after a dropped connection, tried with a growing delay for up to ``retry_s`` seconds
    (the network may stay down a while); None when it never came back (said on stderr)."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + retry_s
    delay_s = RESUME_FIRST_DELAY_S
    note(f"{describe_close(ABNORMAL_CLOSURE)}; subscribing again in {delay_s:.2f} s")
    while True:
        await asyncio.sleep(delay_s)
        try:
            return await subscribe(endpoint, api_key)
        except ClientError as error:  # busy, refused, dropped again, unreachable: the URL served a moment ago
            why = str(error)
        delay_s = min(2 * delay_s, RESUME_MAX_DELAY_S)
        if loop.time() + delay_s > deadline_s:
            note(f"{why}: gave up subscribing again after {retry_s:g} s (--busy-retry-s)")
            return None
        note(f"{why}; subscribing again in {delay_s:.2f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Speak a live session's replies with a TTS command.",
        epilog=exit_status_help("Ctrl-C (it stops following; the session goes on)", also_fails=", or a TTS "
                                "command failed", on_sigterm="SIGTERM (kill, timeout, a process manager): it stops "
                                "following, as on Ctrl-C; the session goes on"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="server URL, e.g. ws://127.0.0.1:8000")
    parser.add_argument("session_id", help="the id stream_file.py / microphone.py print as 'session: ID'")
    parser.add_argument("--api-key", default=default_api_key(), help="the server's API key (default: $AIS_API_KEY)")
    parser.add_argument("--tts-command", help=f"template with {{text}} (and {{wav}} with --out-dir); default "
                                              f"{SPEAK_COMMAND!r}, or {WAV_COMMAND!r} with --out-dir")
    parser.add_argument("--out-dir", type=Path, help="write the replies to OUT_DIR/SESSION_ID/turn{N}_seg{M}.wav "
                        "instead of speaking them (a folder per session, refused if it exists: nothing is overwritten)")
    add_busy_retry_argument(parser)
    return parser


# What a session id is made of: "<replica id>_<32 hex>", a replica id being letters, digits, '.' and '-'.
SESSION_ID_CHARACTERS = re.compile(r"[A-Za-z0-9._-]+")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (problem := busy_retry_problem(args.busy_retry_s)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not SESSION_ID_CHARACTERS.fullmatch(args.session_id):  # else it lands in the URL's path, and the server's
        # answer (no such endpoint, a bad request) would point at the URL
        print(f"error: {args.session_id!r} is not a session id (letters, digits, '.', '-' and '_'): copy the id "
              "stream_file.py or microphone.py prints after 'session:'", file=sys.stderr)
        return EXIT_USAGE
    # Only a missing flag takes the default: an empty one is a mistake TtsCommand says (it was silently replaced).
    template = args.tts_command if args.tts_command is not None else \
        SPEAK_COMMAND if args.out_dir is None else WAV_COMMAND
    try:
        command = TtsCommand(template, writes_wav=args.out_dir is not None)
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.out_dir is not None:
        try:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.out_dir):  # a folder that exists may still refuse new files
                pass
        except OSError as error:  # a file of that name, no permission, a read-only place: before connecting
            print(f"error: --out-dir {args.out_dir}: {error.strerror or error}", file=sys.stderr)
            return EXIT_USAGE
        # Files named by turn alone, in one folder, were overwritten by the next session followed there: each session
        # has a folder of its own, and one that exists (the same session followed there before) is kept as it is.
        session_dir = args.out_dir / session_folder(args.session_id)
        if os.path.lexists(session_dir):
            print(f"error: --out-dir {args.out_dir}: {session_dir} exists already (this session was followed into it "
                  "before): give another --out-dir, or move it away; nothing is overwritten", file=sys.stderr)
            return EXIT_USAGE
    print(f"TTS command: {shlex.join(command.argv)}", flush=True)
    speaker = Speaker(command, None if args.out_dir is None else args.out_dir / session_folder(args.session_id))
    return run_main(follow(args.url, args.session_id, args.api_key, speaker, args.busy_retry_s),
                    before_second_sigterm=speaker.stop_at_once)


if __name__ == "__main__":
    sys.exit(main())
