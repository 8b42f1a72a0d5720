"""The browser front-end (server/audio_interaction_server/api/web/) in a real headless Chromium against the real server.

Chromium's fake capture device plays a WAV made from ../shared/audio as the microphone; Playwright
clicks through the page served at ``/`` by uvicorn on 127.0.0.1 with the tiny model. What the page
rendered is checked against the frames that really crossed the WebSocket (Playwright sees them) and
against the server's own session state. Needs Debian's /usr/bin/chromium and the ``playwright``
package (its bundled driver only; no browser download): skipped, saying why, without them.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import soundfile

# Not an AIS_ name: the servers the tests spawn take the environment, and refuse AIS_ names they do not know.
CHROMIUM = Path(os.environ.get("TEST_CHROMIUM_PATH", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:
    pytest.skip("browser tests need the playwright package (pip install playwright; no browser download)",
                allow_module_level=True)

from audio_interaction_server.config import ServerConfig  # noqa: E402
from benchmarks.harness import CHROMIUM_FLAGS, LiveServer, free_port  # noqa: E402

API_KEY = "browser-key"
MAX_TURN_TOKENS = 40
INSECURE_HOST = "insecure.test"
CHROMIUM_ARGS = [*CHROMIUM_FLAGS,
                 # A name other than localhost for 127.0.0.1: a page opened from "another host", which browsers
                 # do not treat as a secure context (no microphone) unless it comes over https.
                 f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1"]


def browser_config(checkpoint: Path, port: int = 0, resume_grace_s: float = 20.0) -> ServerConfig:
    return ServerConfig.model_validate(dict(
        port=port, api_key=API_KEY, log_level="warning", resume_grace_s=resume_grace_s,
        engine={"checkpoint": checkpoint, "max_sessions": 2, "device": "cpu"},
        session={"max_turn_tokens": MAX_TURN_TOKENS}))


class WireLog:
    """Every frame of the page's WebSockets, as Playwright saw it cross the wire."""

    def __init__(self, page: Page) -> None:
        self.received: list[dict] = []
        self.sent_events: list[dict] = []
        self.num_audio_bytes_sent = 0
        page.on("websocket", self._on_socket)

    def _on_socket(self, socket) -> None:
        socket.on("framereceived", lambda payload: self.received.append(json.loads(payload)))
        socket.on("framesent", self._on_sent)

    def _on_sent(self, payload) -> None:
        if isinstance(payload, (bytes, bytearray)):
            self.num_audio_bytes_sent += len(payload)
        else:
            self.sent_events.append(json.loads(payload))

    def of_type(self, kind: str) -> list[dict]:
        return [event for event in list(self.received) if event["type"] == kind]


def session_label(session_id: str) -> str:
    """The page's label of a session (protocol-client.js ``sessionLabel``, tested on its own below)."""
    replica, _, own = session_id.rpartition("_")
    return f"{replica}_{own[:5]}"


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    server = LiveServer(browser_config(tiny_checkpoint)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake_microphone(shared_audio, tmp_path_factory) -> Path:
    """A WAV for Chromium's fake capture device (it reads WAV only): 48 kHz stereo cough and music."""
    samples, rate_hz = soundfile.read(shared_audio / "03_cough_music" / "sample03_01.wav", dtype="int16")
    path = tmp_path_factory.mktemp("fake_microphone") / "microphone.wav"
    soundfile.write(path, samples, rate_hz, subtype="PCM_16")
    return path  # looped by Chromium: the "microphone" never runs dry while a test waits


@pytest.fixture(scope="module")
def browser(fake_microphone):
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={fake_microphone}"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser):
    context = browser.new_context(viewport={"width": 1000, "height": 1000})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("console", lambda message: problems.append(f"console error: {message.text}")
              if message.type == "error" else None)
    opened.expected_console_errors = ()  # substrings a test expects, e.g. a refused reconnect attempt
    yield opened
    context.close()
    unexpected = [p for p in problems if not any(part in p for part in opened.expected_console_errors)]
    assert not unexpected, unexpected


def seen(page: Page) -> dict:
    """The page's own record of what it received (window.audioInteraction)."""
    return page.evaluate("window.audioInteraction")


def button_states(page: Page) -> dict:
    """Which of the four buttons are disabled (True = disabled), read in one go with whether a reply streams."""
    return page.evaluate("""() => ({
        start: document.querySelector("#start").disabled, stop: document.querySelector("#stop").disabled,
        flush: document.querySelector("#flush").disabled, cancel: document.querySelector("#cancel").disabled,
        replyStreaming: document.querySelector('.turn[data-state="streaming"]') !== null })""")


def record_badge_texts(page) -> None:
    """From now on ``window.badgeTexts`` lists every text the connection badge shows, however briefly."""
    page.evaluate("""() => {
        window.badgeTexts = [];
        const badge = document.querySelector("#connection");
        new MutationObserver(() => window.badgeTexts.push(badge.textContent))
            .observe(badge, {childList: true, characterData: true, subtree: true});
    }""")


def wait_for_badge(page, prefix: str, timeout_ms: int) -> None:
    """Wait until the connection badge has shown a text starting with ``prefix``; past the timeout, fail with
    every text it showed and the page's connection states (one run under load timed out here with no clue)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("(prefix) => window.badgeTexts.some((t) => t.startsWith(prefix))", arg=prefix,
                               timeout=timeout_ms)
    except PlaywrightTimeout:
        seen_so_far = page.evaluate("() => [window.badgeTexts, window.audioInteraction.connectionStates]")
        raise AssertionError(f"the badge never said {prefix!r}; it said {seen_so_far[0]}, the connection went "
                             f"{seen_so_far[1]}") from None


def test_root_serves_the_page_and_its_modules(live):
    import urllib.request

    with urllib.request.urlopen(live.url, timeout=10) as response:
        html = response.read().decode()
        assert response.headers["content-type"].startswith("text/html")
    assert '<base href="/static/">' in html and 'src="app.js"' in html
    for name in ("app.js", "protocol-client.js", "audio-capture.js", "pcm-worklet.js", "pcm.js", "style.css"):
        with urllib.request.urlopen(f"{live.url}static/{name}", timeout=10) as response:
            assert response.status == 200 and response.read()
            expected = "text/css" if name.endswith(".css") else "text/javascript"
            assert response.headers["content-type"].startswith(expected)
    for missing in ("static/nope.js", "static/..%2Fapp.py", "static/%2E%2E%2Fstatic_pages.py"):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(live.url + missing, timeout=10)
        assert error.value.code == 404


def test_pcm_conversion_rounds_clips_and_frames(live, page: Page):
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const pcm = await import("/static/pcm.js");
        const samples = [0, 1, -1, 2, -2, 0.5, -0.5, 1 / 65536, -1 / 65536, 0.4 / 32768, 0.6 / 32768, NaN];
        const framer = new pcm.PcmFramer(3, 2);
        const block = (values) => [Float32Array.from(values), Float32Array.from(values.map((v) => -v))];
        const frames = [...framer.push(block([0.1, 0.2])), ...framer.push(block([0.3, 0.4, 0.5, 0.6, 0.7]))];
        return {
            converted: samples.map(pcm.floatToInt16),
            frames: frames.map((frame) => Array.from(frame)),
            rest: Array.from(framer.drain() ?? []),
            empty: framer.drain(),
        };
    }""")
    # x * 32768 rounded to nearest (the server divides by 32768), clipped to int16, NaN -> 0.
    assert result["converted"] == [0, 32767, -32768, 32767, -32768, 16384, -16384, 1, 0, 0, 1, 0]
    as_int = [round(v * 32768) for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]
    interleaved = [s for v in as_int for s in (v, -v)]
    assert result["frames"] == [interleaved[0:6], interleaved[6:12]]  # 3 stereo sample frames each
    assert result["rest"] == interleaved[12:14] and result["empty"] is None


def test_a_session_is_labelled_by_its_replica_and_its_own_part(live, page: Page):
    """The page labelled a session by its first 8 characters: behind --fronts, in a container or a pod (replica ids
    such as ais1-f0, a container's 12 hex digits, a pod's address) that is the replica id alone, the same for every
    session (first-hour review, round eight)."""
    page.goto(live.url)
    labels = page.evaluate("""async () => {
        const { sessionLabel } = await import("/static/protocol-client.js");
        return ["ais1-f0_7328f0a1b2c3d4e5f60718293a4b5c6d", "vm_7328f0a1b2c3d4e5f60718293a4b5c6d",
                "10.4.2.1_0a1b2c3d4e5f60718293a4b5c6d7e8f", "no-underscore"].map(sessionLabel);
    }""")
    assert labels == ["ais1-f0_7328f", "vm_7328f", "10.4.2.1_0a1b2", "no-under"]


def test_protocol_client_resends_configuration_and_stops_on_final_close_codes(live, page: Page):
    """ProtocolClient against a scripted socket: the cases a live server does not produce on demand."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ProtocolClient } = await import("/static/protocol-client.js");
        class FakeSocket {
            static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
            static made = [];
            constructor(url) { this.url = url; this.sent = []; this.readyState = 0; FakeSocket.made.push(this); }
            send(data) { this.sent.push(typeof data === "string" ? JSON.parse(data) : Array.from(data)); }
            close(code = 1000) { this.drop(code); }
            deliver(event) { this.onmessage({ data: JSON.stringify(event) }); }
            drop(code, reason = "") {
              if (this.readyState !== 3) { this.readyState = 3; this.onclose({ code, reason }); }
            }
        }
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const created = (id) => ({ type: "session.created", session_id: id });
        const client = new ProtocolClient("ws://server.example/v1/stream", { apiKey: "k y", WebSocket: FakeSocket,
            backoff: { initialDelayMs: 5, maxDelayMs: 20, factor: 2, jitter: 0 } });
        const states = [];
        client.on("state", (s) => states.push([s.state, s.attempt, s.delayMs, s.code ?? null]));
        const configured = client.configure({ decision_events: true });
        const connected = client.connect();
        const first = FakeSocket.made[0];
        const sentBeforeOpen = client.sendAudio(new Int16Array([1, 2]));
        first.deliver(created("s1"));
        await connected;
        first.deliver({ type: "session.updated", session_id: "s1" });
        await configured;
        const refused = client.configure({ max_turn_tokens: 5 }).then(() => "resolved", (e) => e.event.code);
        first.deliver({ type: "error", code: "invalid_state", event_id: first.sent.at(-1).event_id });
        const refusedCode = await refused;
        client.configure({ audio: { sample_format: "pcm_s16le", sample_rate_hz: 48000, num_channels: 2 } });
        first.deliver({ type: "session.updated", session_id: "s1" });
        const sentWhileOpen = client.sendAudio(new Int16Array([3, -4]));
        const flush = client.flush().then(() => "flushed", (e) => e.message);
        first.drop(1006);
        const flushOutcome = await flush;
        await sleep(40);
        FakeSocket.made[1].drop(1006);  // the next attempt fails too: a longer wait
        await sleep(40);
        const third = FakeSocket.made[2];
        third.deliver(created("s2"));
        third.drop(1013);  // at capacity: retried; a session opened since, so the wait starts over
        await sleep(40);
        const fourth = FakeSocket.made[3];
        fourth.deliver(created("s3"));
        fourth.drop(1008);  // a refused key cannot get better by retrying
        await sleep(40);
        return { url: first.url, sentBeforeOpen, sentWhileOpen, dropped: client.numFramesDropped, refusedCode,
                 flushOutcome, firstSent: first.sent, thirdSent: third.sent, fourthSent: fourth.sent,
                 numSockets: FakeSocket.made.length, states, finalState: client.state };
    }""")
    assert result["url"] == "ws://server.example/v1/stream?api_key=k+y"
    assert result["sentBeforeOpen"] is False and result["dropped"] == 1 and result["sentWhileOpen"] is True
    assert result["firstSent"][0] == {"type": "session.configure", "event_id": "cfg-1", "decision_events": True}
    assert result["refusedCode"] == "invalid_state"
    assert result["firstSent"][3] == [3, -4] and result["firstSent"][4] == {"type": "input.flush"}
    assert result["flushOutcome"] == "connection closed (1006)"
    # Every new session gets the accepted configuration (not the refused max_turn_tokens) before anything else.
    resent = {"decision_events": True, "audio": {"sample_format": "pcm_s16le", "sample_rate_hz": 48000,
                                                 "num_channels": 2}}
    for sent in (result["thirdSent"], result["fourthSent"]):
        assert len(sent) == 1 and {k: v for k, v in sent[0].items() if k not in ("type", "event_id")} == resent
    assert result["numSockets"] == 4 and result["finalState"] == "closed"
    assert [s for s in result["states"] if s[0] != "open"] == [  # [state, attempt, delayMs, close code]
        ["connecting", 0, 0, None],
        ["reconnecting", 1, 5, 1006], ["reconnecting", 1, 0, None],
        ["reconnecting", 2, 10, 1006], ["reconnecting", 2, 0, None],
        ["reconnecting", 1, 5, 1013], ["reconnecting", 1, 0, None],
        ["closed", 0, 0, 1008],
    ]


def test_protocol_client_gives_up_on_a_server_it_never_reached_but_not_on_try_again(live, page: Page):
    """Scripted sockets: never opened (a wrong URL) -> a few attempts, then closed with gaveUp; opened and
    closed with 1013 (the server is loading or full) -> the server is there, the longer limit applies."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ProtocolClient } = await import("/static/protocol-client.js");
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const run = async ({ opens, code, drops }) => {
            const made = [];
            class FakeSocket {
                static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
                constructor(url) { this.readyState = 0; made.push(this); }
                send() {}
                close() {}
            }
            const client = new ProtocolClient("ws://server.example/v1/stream", { WebSocket: FakeSocket,
                backoff: { initialDelayMs: 2, maxDelayMs: 4, factor: 2, jitter: 0 } });
            const states = [];
            client.on("state", (s) => states.push(s));
            const connected = client.connect().then(() => "connected", (e) => e.message);
            for (let i = 0; i < drops && made[i]; i++) {
                if (opens) made[i].onopen?.();
                made[i].onclose({ code, reason: "" });
                await sleep(15);
            }
            const last = states.at(-1);
            return { numSockets: made.length, state: client.state, gaveUp: last.gaveUp ?? null,
                     attempts: last.attempts ?? null, hadSession: last.hadSession,
                     connected: client.state === "closed" ? await connected : null };
        };
        return { unreachable: await run({ opens: false, code: 1006, drops: 6 }),
                 busy: await run({ opens: true, code: 1013, drops: 6 }) };
    }""")
    assert result["unreachable"] == {"numSockets": 4, "state": "closed", "gaveUp": True, "attempts": 4,
                                     "hadSession": False, "connected": "connection closed (1006)"}
    busy = result["busy"]
    assert busy["numSockets"] == 7 and busy["state"] == "reconnecting", busy  # still trying after 6 refusals



# A scripted WebSocket for ProtocolClient (its ``WebSocket`` option): every socket made lands in ``made``; ``sent``
# holds what the client sent (JSON events parsed, binary frames as arrays), ``deliver`` plays a server event,
# ``drop`` ends the socket with a close code.
FAKE_SOCKET_JS = """
        const made = [];
        class FakeSocket {
            static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
            constructor(url) {
              this.url = url; this.sent = []; this.sentNotOpen = 0; this.readyState = 0; made.push(this);
            }
            send(data) {  // as a browser: a send on a socket that is not open goes nowhere
              if (this.readyState !== 1) { this.sentNotOpen += 1; return; }
              this.sent.push(typeof data === "string" ? JSON.parse(data) : Array.from(data));
            }
            close(code = 1000) { this.drop(code); }
            deliver(event) {
              if (this.readyState === 0) { this.readyState = 1; this.onopen?.(); }
              this.onmessage({ data: JSON.stringify(event) });
            }
            closing() { this.readyState = 2; }  // the server's close frame came; onclose has not fired yet
            drop(code, reason = "") {
              if (this.readyState !== 3) { this.readyState = 3; this.onclose({ code, reason }); }
            }
        }
"""

def test_protocol_client_sends_each_waiting_configure_on_its_own(live, page: Page):
    """Scripted sockets: two configure() calls made before the session opens go out as two events, so the server
    refusing one (a max_turn_tokens beyond its context budget) leaves the other applied; the next session gets
    what was accepted, not what was refused."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ProtocolClient } = await import("/static/protocol-client.js");
        """ + FAKE_SOCKET_JS + """
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const client = new ProtocolClient("ws://server.example/v1/stream", { WebSocket: FakeSocket,
            backoff: { initialDelayMs: 5, maxDelayMs: 20, factor: 2, jitter: 0 } });
        const outcome = (promise) => promise.then(() => "accepted", (e) => e.event.code);
        const events = outcome(client.configure({ decision_events: true }));
        const tokens = outcome(client.configure({ max_turn_tokens: 4096 }));
        const connected = client.connect();
        made[0].deliver({ type: "session.created", session_id: "s1" });
        await connected;
        const sent = made[0].sent.slice();
        made[0].deliver({ type: "session.updated", session_id: "s1" });
        made[0].deliver({ type: "error", code: "invalid_event", event_id: sent.at(-1).event_id });
        const outcomes = [await events, await tokens];
        made[0].drop(1013);
        await sleep(40);
        made[1].deliver({ type: "session.created", session_id: "s2" });
        return { sent, outcomes, resent: made[1].sent };
    }""")
    without_ids = [{k: v for k, v in event.items() if k != "event_id"} for event in result["sent"]]
    assert without_ids == [{"type": "session.configure", "decision_events": True},
                           {"type": "session.configure", "max_turn_tokens": 4096}], result["sent"]
    assert result["outcomes"] == ["accepted", "invalid_event"]
    assert [{k: v for k, v in event.items() if k != "event_id"} for event in result["resent"]] == [
        {"type": "session.configure", "decision_events": True}]


def test_protocol_client_sends_nothing_on_a_closing_socket_and_resends_it_after_the_resume(live, page: Page):
    """Scripted sockets: between the server's close frame and onclose the socket is CLOSING while the client is
    still open. Audio offered then is not sent into the closing socket (a browser drops it with a console error)
    but kept, and the resume sends it."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ProtocolClient } = await import("/static/protocol-client.js");
        """ + FAKE_SOCKET_JS + """
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const client = new ProtocolClient("ws://server.example/v1/stream", { apiKey: "k", WebSocket: FakeSocket,
            backoff: { initialDelayMs: 5, maxDelayMs: 20, factor: 2, jitter: 0 } });
        client.configure({ audio: { sample_format: "pcm_s16le", sample_rate_hz: 10, num_channels: 1 } });
        const connected = client.connect();
        made[0].deliver({ type: "session.created", session_id: "s1", seq: 1, resume_token: "t", resume_grace_s: 5,
            audio: { sample_format: "pcm_s16le", sample_rate_hz: 10, num_channels: 1 } });
        await connected;
        client.sendAudio(new Int16Array([1, 1]));
        made[0].closing();
        client.sendAudio(new Int16Array([2, 2]));
        const wrongSends = made[0].sentNotOpen;
        made[0].drop(1006);
        await sleep(350);
        made[1].deliver({ type: "session.resumed", session_id: "s1", last_seq: 1, num_replayed: 0,
                          audio_received_s: 0.2, num_chunks_decided: 0 });
        return { wrongSends, first: made[0].sent.length, resent: made[1].sent };
    }""")
    assert result["wrongSends"] == 0
    assert result["resent"][-1] == [2, 2], result["resent"]  # the frame offered while closing, resent


def test_protocol_client_resumes_a_dropped_session_and_resends_what_the_server_lacks(live, page: Page):
    """Scripted sockets: a drop without a close frame (1006) -> the same session again with its token and the last
    seq; the replay is taken as events; the frames after audio_received_s (and the flush after them, and a frame
    offered while resuming) go out again in order. A refused resume (4009) starts a new session with the settings;
    4010, 1000 and 1008 are never resumed."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ProtocolClient } = await import("/static/protocol-client.js");
        """ + FAKE_SOCKET_JS + """
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const created = (id, seq) => ({ type: "session.created", session_id: id, seq, resume_token: `token-${id}`,
            resume_grace_s: 5, audio: { sample_format: "pcm_s16le", sample_rate_hz: 16000, num_channels: 1 },
            limits: { max_buffered_audio_s: 10 } });
        const client = new ProtocolClient("ws://server.example/v1/stream", { apiKey: "k", WebSocket: FakeSocket,
            backoff: { initialDelayMs: 5, maxDelayMs: 20, factor: 2, jitter: 0 } });
        const states = [];
        client.on("state", (s) => states.push(s));
        const seen = [];
        client.on("event", (e) => seen.push(e.type));
        const audio = { sample_format: "pcm_s16le", sample_rate_hz: 10, num_channels: 1 };
        client.configure({ decision_events: true, audio });
        const connected = client.connect();
        const first = made[0];
        first.deliver(created("s1", 1));
        await connected;
        first.deliver({ type: "session.updated", seq: 2 });
        for (let i = 0; i < 5; i++) client.sendAudio(new Int16Array([i, i]));  // 0.2 s each at 10 Hz
        const flushed = client.flush().then((e) => e.type, (e) => e.message);
        first.deliver({ type: "decision", seq: 3 });
        first.drop(1006);
        const resumingState = states.at(-1);
        const keptWhileResuming = client.sendAudio(new Int16Array([9, 9]));
        await sleep(350);  // the first resume attempt waits 250 ms
        const second = made[1];
        second.deliver({ type: "session.resumed", session_id: "s1", last_seq: 3, num_replayed: 1,
                         audio_received_s: 0.6000000000000001, num_chunks_decided: 1 });
        second.deliver({ type: "decision", seq: 4 });  // the one replayed event
        const resentSent = second.sent.slice();
        const resumedState = states.at(-1);
        second.deliver({ type: "decision", seq: 4 });  // a repeat is ignored
        second.deliver({ type: "input.flushed", seq: 5 });
        const flushOutcome = await flushed;
        second.drop(1006);
        await sleep(350);
        const third = made[2];
        third.deliver({ type: "error", code: "resume_expired", is_fatal: true });
        third.drop(4009);
        const failedState = states.at(-1);
        await sleep(50);
        const fourth = made[3];
        fourth.deliver(created("s2", 1));
        const newSessionSent = fourth.sent.slice();
        fourth.drop(1006);
        await sleep(350);
        made[4].drop(4010);  // another connection resumed s2
        await sleep(50);
        const after4010 = { numSockets: made.length, state: client.state };
        const runFinal = async (code) => {
            const before = made.length;
            const other = new ProtocolClient("ws://server.example/v1/stream", { WebSocket: FakeSocket,
                backoff: { initialDelayMs: 5, maxDelayMs: 20, factor: 2, jitter: 0 } });
            const opened = other.connect();
            made.at(-1).deliver(created("s3", 1));
            await opened;
            made.at(-1).drop(code);
            await sleep(350);
            return { newSockets: made.length - before, state: other.state };
        };
        return { secondUrl: second.url, fourthUrl: made[4].url, resentSent, keptWhileResuming, flushOutcome,
                 resumingState: [resumingState.state, resumingState.attempt, resumingState.delayMs,
                                 resumingState.sessionId],
                 resumed: [resumedState.state, resumedState.resumed], seen,
                 failed: [failedState.state, failedState.code, failedState.resumeFailed], newSessionSent,
                 after4010, on1000: await runFinal(1000), on1008: await runFinal(1008),
                 numResumes: client.numResumes, dropped: client.numFramesDropped };
    }""")
    assert result["secondUrl"] == "ws://server.example/v1/stream?api_key=k&resume=s1&token=token-s1&last_seq=3"
    assert result["resumingState"] == ["resuming", 1, 250, "s1"]
    assert result["keptWhileResuming"] is True
    # Frames 0..2 (0.6 s) were taken; 3 and 4, the flush and the frame offered meanwhile go again, in order.
    assert result["resentSent"] == [[3, 3], [4, 4], {"type": "input.flush"}, [9, 9]]
    state, resumed = result["resumed"]
    assert state == "open" and resumed["sessionId"] == "s1" and resumed["numReplayed"] == 1
    assert resumed["resentS"] == pytest.approx(0.6) and resumed["lostS"] == 0
    assert result["seen"].count("decision") == 2, "a replayed event was taken twice"
    assert result["flushOutcome"] == "input.flushed"
    assert result["failed"] == ["reconnecting", 4009, True]
    assert len(result["newSessionSent"]) == 1 and result["newSessionSent"][0]["type"] == "session.configure"
    assert {k: v for k, v in result["newSessionSent"][0].items() if k not in ("type", "event_id")} == {
        "decision_events": True, "audio": {"sample_format": "pcm_s16le", "sample_rate_hz": 10, "num_channels": 1}}
    assert "resume=s2&token=token-s2&last_seq=1" in result["fourthUrl"]
    assert result["after4010"] == {"numSockets": 5, "state": "closed"}
    assert result["on1000"] == {"newSockets": 1, "state": "closed"}
    assert result["on1008"] == {"newSockets": 1, "state": "closed"}
    assert result["numResumes"] == 1


def test_protocol_client_holds_a_flush_in_doubt_until_its_answer_or_a_quiet_server(live, page: Page):
    """Scripted sockets: all audio taken, the flush unanswered after the replay. Its answer arriving later: only the
    frame offered meanwhile goes out. No answer and a quiet server (1.5 s): the flush goes again, then that frame."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ProtocolClient } = await import("/static/protocol-client.js");
        const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const run = async (answered) => {
            const made = [];
            class FakeSocket {
                static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
                constructor(url) { this.url = url; this.sent = []; this.readyState = 0; made.push(this); }
                send(data) { this.sent.push(typeof data === "string" ? JSON.parse(data) : Array.from(data)); }
                close(code = 1000) { this.drop(code); }
                deliver(event) { this.onopen?.(); this.onmessage({ data: JSON.stringify(event) }); }
                drop(code) { if (this.readyState !== 3) { this.readyState = 3; this.onclose({ code, reason: "" }); } }
            }
            const client = new ProtocolClient("ws://server.example/v1/stream", { WebSocket: FakeSocket });
            client.configure({ audio: { sample_format: "pcm_s16le", sample_rate_hz: 10, num_channels: 1 } });
            const connected = client.connect();
            made[0].deliver({ type: "session.created", session_id: "s", seq: 1, resume_token: "t", resume_grace_s: 5,
                              limits: { max_buffered_audio_s: 10 } });
            await connected;
            made[0].deliver({ type: "session.updated", seq: 2 });
            client.sendAudio(new Int16Array([1, 1]));
            client.sendAudio(new Int16Array([2, 2]));
            const flushed = client.flush().then((e) => e.type);
            made[0].drop(1006);
            await sleep(350);
            made[1].deliver({ type: "session.resumed", session_id: "s", last_seq: 2, num_replayed: 0,
                              audio_received_s: 0.4, num_chunks_decided: 0 });
            client.sendAudio(new Int16Array([9, 9]));
            const duringDoubt = made[1].sent.slice();
            if (answered) made[1].deliver({ type: "input.flushed", seq: 3 });
            else await sleep(1700);
            return { duringDoubt, after: made[1].sent.slice(), state: client.state,
                     flushed: answered ? await flushed : null };
        };
        return { answered: await run(true), unanswered: await run(false) };
    }""")
    assert result["answered"] == {"duringDoubt": [], "after": [[9, 9]], "state": "open", "flushed": "input.flushed"}
    assert result["unanswered"] == {"duringDoubt": [], "after": [{"type": "input.flush"}, [9, 9]], "state": "open",
                                    "flushed": None}


def test_page_resumes_after_the_connection_drops_and_says_so(live, page: Page):
    """The page talks to the server through a TCP relay that the test cuts (no close frame either way): it resumes
    the same session by itself, says so, and in the end the server has every sample the page captured."""
    from tests.cut_proxy import CutProxy

    relay = CutProxy(live.port)
    wire = WireLog(page)
    try:
        page.goto(live.url)
        record_badge_texts(page)
        page.fill("#server-url", f"ws://127.0.0.1:{relay.port}/v1/stream")
        page.fill("#api-key", API_KEY)
        page.click("#start")
        page.wait_for_function("() => window.audioInteraction.numDecisions >= 3", timeout=15_000)
        assert relay.cut() == 1
        page.wait_for_function("() => window.audioInteraction.resumes.length === 1"
                               " && window.audioInteraction.connectionStates.at(-1).state === 'open'", timeout=15_000)
        session_id = seen(page)["sessionCreated"]["session_id"]
        badge_texts = page.evaluate("window.badgeTexts")
        lost = f"Connection lost (code 1006); resuming session {session_label(session_id)} in 0.3 s (attempt 1)"
        assert any(text.startswith(lost) for text in badge_texts), badge_texts
        assert page.locator("#connection").text_content().startswith(
            f"Connected · session {session_label(session_id)} · resumed: "), page.locator("#connection").text_content()
        decided = seen(page)["numDecisions"]
        page.wait_for_function(f"() => window.audioInteraction.numDecisions >= {decided + 3}", timeout=15_000)
        page.click("#stop")
        page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")
    finally:
        relay.close()
    state = seen(page)
    assert len(wire.of_type("session.created")) == 1 and len(wire.of_type("session.resumed")) == 1
    assert relay.num_connections == 2
    seqs = [event["seq"] for event in wire.received if "seq" in event]
    assert seqs == list(range(1, len(seqs) + 1)), "an event lost, repeated or out of order across the resume"
    chunks = [event["chunk"] for event in wire.of_type("decision")]
    assert chunks == list(range(len(chunks))), "every chunk decided once, in order"
    assert not [turn for turn in state["turns"] if turn["endReason"] == "interrupted"], state["turns"]
    closed = wire.of_type("session.closed")[-1]
    assert closed["session_id"] == session_id and closed["reason"] == "client_closed"
    # Nothing the page captured was lost: what it sent before the cut, during it and after, the server has.
    assert closed["audio_received_s"] == pytest.approx(state["audioSentS"], abs=1e-3)


def minted_secret(live) -> str:
    """A client secret of the default lifetime, minted as a page's backend would (``/v1/realtime/client_secrets``)."""
    import urllib.request

    request = urllib.request.Request(f"{live.url}v1/realtime/client_secrets", method="POST", data=b"{}", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["value"]


def test_protocol_client_asks_for_a_fresh_key_to_resume_after_its_client_secret_expired(live, page: Page):
    """docs/realtime.md: a page whose session dropped after its client secret expired "mints a fresh secret from its
    backend first, then resumes with it". ProtocolClient took one key for good, so its resume was refused (1008) and
    the conversation ended; ``apiKey`` as a function is asked before every connection (first-hour review, round
    twelve). Real secrets, a real drop (a relay cut), a real server."""
    from audio_interaction_server.api.realtime.secrets import MIN_TTL_S, ClientSecrets
    from tests.cut_proxy import CutProxy

    # The shortest a secret may live is 10 s: this one was minted (with the server's signing key) as if 5 s ago, so
    # the test waits 5-6 s for it to expire, not 10 (expiries are whole seconds).
    expires_at_s = int(time.time()) + 6
    short_lived = ClientSecrets(API_KEY).mint(MIN_TTL_S, now_s=expires_at_s - MIN_TTL_S).value
    fresh = minted_secret(live)
    relay = CutProxy(live.port)
    try:
        page.goto(live.url)
        page.evaluate("""async ({ url, keys }) => {
            const { ProtocolClient } = await import("/static/protocol-client.js");
            window.keysGiven = 0;
            const client = new ProtocolClient(url, { apiKey: async () => keys[Math.min(window.keysGiven++, 1)] });
            window.states = [];
            client.on("state", (state) => window.states.push(state));
            await client.connect();
            client.sendAudio(new Int16Array(6400));  // 0.4 s at 16 kHz
            window.client = client;
        }""", {"url": f"ws://127.0.0.1:{relay.port}/v1/stream", "keys": [short_lived, fresh]})
        time.sleep(max(0.0, expires_at_s + 0.1 - time.time()))  # the first secret has expired
        assert relay.cut() == 1
        page.wait_for_function("() => window.states.at(-1).state === 'open' && window.states.at(-1).resumed "
                               "|| window.states.at(-1).state === 'closed'", timeout=15_000)
        states = page.evaluate("window.states.map((s) => ({ state: s.state, code: s.code ?? null }))")
        result = page.evaluate("({ keysGiven: window.keysGiven, numResumes: window.client.numResumes, "
                               "state: window.client.state })")
        page.evaluate("window.client.close()")
    finally:
        relay.close()
    assert result == {"keysGiven": 2, "numResumes": 1, "state": "open"}, (result, states)
    assert relay.num_connections == 2


def test_leaving_the_page_ends_its_session_instead_of_leaving_it_to_wait_for_a_resume(live, page: Page):
    """A page that goes away cannot resume: it ends its session (session.close), so the server frees the slot now
    rather than keeping the session detached for resume_grace_s."""
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.click("#start")
    page.wait_for_function("() => window.audioInteraction.numDecisions >= 1", timeout=15_000)
    session_id = seen(page)["sessionCreated"]["session_id"]
    assert session_id in live.runtime.streams
    page.goto("about:blank")
    deadline = time.monotonic() + 5
    while session_id in live.runtime.streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert session_id not in live.runtime.streams, "the session waits for a resume that cannot come"


def test_microphone_streams_at_the_browser_rate_and_replies_render(live, page: Page):
    wire = WireLog(page)
    page.goto(live.url)
    page.fill("#api-key", API_KEY)  # goes out as ?api_key= (browsers cannot set WebSocket headers)
    page.click("#start")
    page.wait_for_function("() => window.audioInteraction.sessionUpdated?.audio.sample_rate_hz !== 16000"
                           " && window.audioInteraction.sessionUpdated?.audio", timeout=15_000)
    state = seen(page)
    session_id = state["sessionCreated"]["session_id"]
    native_rate_hz = page.evaluate("(() => { const c = new AudioContext(); const r = c.sampleRate; c.close();"
                                   " return r; })()")
    # (a) The page declared the context's own rate and the real channel count, and the server took it.
    capture = state["captureFormat"]
    assert capture["sampleRateHz"] == native_rate_hz and native_rate_hz in (44_100, 48_000)
    assert state["sessionUpdated"]["audio"] == {"sample_format": "pcm_s16le", "sample_rate_hz": native_rate_hz,
                                                "num_channels": capture["numChannels"]}
    server_audio = live.session_audio(session_id)
    assert server_audio.format.sample_rate_hz == native_rate_hz
    assert server_audio.format.num_channels == capture["numChannels"]
    # ... and the audio really is at that rate: it arrives at one second of audio per wall-clock second.
    start_audio_s, start_s = server_audio.audio_received_s, time.monotonic()
    page.wait_for_function("() => window.audioInteraction.numDecisions >= 6"
                           " && window.audioInteraction.turns.some((t) => t.endReason)", timeout=30_000)
    time.sleep(max(0.0, 3.0 - (time.monotonic() - start_s)))
    audio_per_wall_s = (server_audio.audio_received_s - start_audio_s) / (time.monotonic() - start_s)
    # 44.1 kHz audio declared as 48 kHz (or the reverse) would be 8.8 % off; 6 % leaves room for jitter.
    assert 0.94 < audio_per_wall_s < 1.06, f"declared rate off by {audio_per_wall_s:.3f}x"
    configure = [event for event in wire.sent_events if event["type"] == "session.configure"]
    assert configure[0]["decision_events"] is True
    assert configure[-1]["audio"]["sample_rate_hz"] == native_rate_hz

    # (b) decision and reply events crossed the wire, and (c) the page rendered them.
    state = seen(page)
    decisions = wire.of_type("decision")
    assert len(decisions) >= state["numDecisions"] >= 6
    # Read in one evaluate: the microphone keeps streaming, so a decision may render between two reads.
    items, reply_items, num_decisions, num_reply_decisions = page.evaluate(
        "() => [document.querySelectorAll('#chunks li').length, document.querySelectorAll('#chunks li.reply').length,"
        " window.audioInteraction.numDecisions, window.audioInteraction.numReplyDecisions]")
    assert items == min(num_decisions, 75)
    assert reply_items <= num_reply_decisions
    assert "chunks heard" in page.inner_text("#chunk-summary")
    ended = {(e["session_id"], e["turn"]): e for e in wire.of_type("turn_end")}
    begun = {(e["session_id"], e["turn"]): e for e in wire.of_type("turn_begin")}
    emotions = {(e["session_id"], e["turn"]): e["emotion"] for e in wire.of_type("emotion")}
    rendered = [turn for turn in state["turns"] if turn["endReason"]]
    assert rendered
    for turn in rendered:
        key = (turn["sessionId"], turn["turn"])
        card = page.locator(f'.turn[data-session="{key[0]}"][data-turn="{key[1]}"]')
        assert card.locator(".turn-text").text_content() == ended[key]["text"] == turn["text"]
        onset_ms = begun[key]["onset_latency_ms"]
        # JavaScript's Math.round takes halves up where Python's round takes them to even (6.5 ms: 7 against 6).
        assert card.locator(".onset-latency").text_content() == f"onset {math.floor(onset_ms + 0.5)} ms"
        assert card.locator(".emotion").text_content().endswith(emotions.get(key, "no emotion tag"))
        assert card.get_attribute("data-state") in ("done", "cancelled")
    assert page.locator("#connection").text_content().startswith("Connected")
    assert page.locator("#audio-format").text_content().startswith(f"{native_rate_hz} Hz")
    assert not page.locator("#demo-warning").is_visible()  # the tiny checkpoint is configured, not the demo

    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")
    closed = wire.of_type("session.closed")
    assert closed and closed[-1]["reason"] == "client_closed"
    assert page.locator("#connection").text_content() == "Stopped"


def test_file_is_streamed_in_real_time_and_flushed(live, page: Page, shared_audio):
    path = shared_audio / "02_translate" / "sample02_04.wav"  # 16 kHz mono: the browser decodes to its own rate
    duration_s = soundfile.info(path).duration
    wire = WireLog(page)
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.check('input[name="source"][value="file"]')
    page.set_input_files("#audio-file", str(path))
    page.uncheck("#monitor")
    started_s = time.monotonic()
    page.click("#start")
    page.wait_for_function("() => /was heard/.test(document.querySelector('#capture-info').textContent)",
                           timeout=20_000)
    elapsed_s = time.monotonic() - started_s
    assert elapsed_s > duration_s * 0.9, "a file goes out in real time, not as fast as possible"
    flushed = wire.of_type("input.flushed")
    assert len(flushed) == 1
    session_id = flushed[0]["session_id"]
    state = seen(page)
    assert state["captureFormat"]["numChannels"] == 1
    server_audio = live.session_audio(session_id)
    assert server_audio.format.sample_rate_hz == state["captureFormat"]["sampleRateHz"] != 16_000
    assert server_audio.audio_received_s == pytest.approx(duration_s, abs=0.03)
    # 3.2 s + 1 s of flush silence, all decided, and shown.
    assert flushed[0]["num_chunks"] == len(wire.of_type("decision")) == page.locator("#chunks li").count() >= 10
    assert page.locator("#listen-state").text_content() == "All audio heard"
    # The session stays open for the replies, and the buttons say what is possible now: Start would send
    # the file again into this session, and the file's end was already flushed.
    buttons = button_states(page)
    assert buttons["start"] and buttons["flush"] and not buttons["stop"], buttons
    assert buttons["cancel"] == (not buttons["replyStreaming"]), buttons
    audio_bytes = wire.num_audio_bytes_sent
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")
    buttons = button_states(page)
    assert not buttons["start"] and buttons["stop"] and buttons["flush"] and buttons["cancel"], buttons
    assert wire.num_audio_bytes_sent == audio_bytes and len(wire.of_type("session.created")) == 1


def test_a_file_the_browser_cannot_decode_is_named_with_what_would_work(live, page: Page, tmp_path):
    """A text file (or an empty WAV) chosen as the audio: the badge read '0: Unable to decode audio data', the
    browser's DOMException code 0 taken for ours (first-hour review, round five)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio at all\n")
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.check('input[name="source"][value="file"]')
    page.set_input_files("#audio-file", str(notes))
    page.click("#start")
    page.wait_for_function("() => document.querySelectorAll('#errors li').length > 0", timeout=20_000)
    shown = page.locator("#errors li").first.text_content()
    assert shown.startswith("undecodable_file") and "notes.txt" in shown and "WAV, MP3, Ogg or FLAC" in shown, shown
    page.wait_for_function("() => !document.querySelector('#start').disabled")  # the session was stopped


def test_folder_served_elsewhere_connects_to_the_server_named_in_the_url(live, page: Page):
    """server/audio_interaction_server/api/web/ from a plain static server (as ``python -m http.server`` serves it),
    ``?server=`` in the URL."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from audio_interaction_server.api.static_pages import WEB_DIR

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    static = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(WEB_DIR)))
    threading.Thread(target=static.serve_forever, daemon=True).start()
    try:
        stream_url = f"ws://127.0.0.1:{live.port}/v1/stream"
        page.goto(f"http://127.0.0.1:{static.server_address[1]}/?server={stream_url}")
        assert page.input_value("#server-url") == stream_url
        page.fill("#api-key", API_KEY)
        page.click("#start")
        page.wait_for_function("() => window.audioInteraction.numDecisions >= 1", timeout=15_000)
        assert page.locator("#connection").text_content().startswith("Connected")
        page.click("#stop")
    finally:
        static.shutdown()


def test_a_page_of_another_origin_imports_the_client_from_the_server(live, page: Page):
    """docs/browser.md: ``import { ProtocolClient } from "http://127.0.0.1:8000/static/protocol-client.js"``. A module
    (and an AudioWorklet's module) is fetched in CORS mode, and /static/ answered without Access-Control-Allow-Origin:
    "Failed to fetch dynamically imported module" from any other origin (first-hour review, round twelve)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    folder = Path(__file__).parent  # any page of another origin will do: its own files are not used
    static = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=static.serve_forever, daemon=True).start()
    page.expected_console_errors = ("blocked by CORS policy", "Failed to load resource")  # the old server's answer
    try:
        page.goto(f"http://localhost:{static.server_address[1]}/")
        result = page.evaluate("""async (server) => {
            try {
                const { ProtocolClient } = await import(`${server}static/protocol-client.js`);
                const { AudioCapture } = await import(`${server}static/audio-capture.js`);
                const context = new AudioContext();
                await context.audioWorklet.addModule(`${server}static/pcm-worklet.js`);
                await context.close();
                return [typeof ProtocolClient, typeof AudioCapture];
            } catch (error) {
                return String(error);
            }
        }""", live.url)
    finally:
        static.shutdown()
    assert result == ["function", "function"], result


def test_wrong_api_key_is_shown_and_not_retried(live, page: Page):
    wire = WireLog(page)
    page.goto(live.url)
    page.fill("#api-key", "not-the-key")
    page.click("#start")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'closed'")
    # The close reason repeats the error event, which the badge's error line shows: said once.
    assert page.locator("#connection-state").text_content() == "Connection closed (code 1008)"
    assert page.locator("#connection-error").text_content() == "unauthorized: missing or wrong API key"
    assert page.locator("#errors li").first.text_content().startswith("unauthorized")
    assert page.locator("#errors li").first.get_attribute("role") == "alert"
    page.wait_for_timeout(800)  # longer than the first backoff step: no second attempt
    assert len(wire.of_type("error")) == 1 and not page.locator("#start").is_disabled()


def test_a_blocked_microphone_says_how_to_allow_it_or_use_a_file(live, page: Page):
    """The browser refuses the microphone (the user blocked it: getUserMedia rejects with NotAllowedError, as
    Chromium does without a grant). The page said only "start_failed: Permission denied"."""
    page.add_init_script("""navigator.mediaDevices.getUserMedia = () =>
        Promise.reject(new DOMException("Permission denied", "NotAllowedError"));""")
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.click("#start")
    page.wait_for_function("() => window.audioInteraction.errors.length > 0")
    error = seen(page)["errors"][0]
    assert error["code"] == "microphone_blocked", error
    assert "allow" in error["message"] and "Audio file" in error["message"]
    page.wait_for_function("() => !document.querySelector('#start').disabled")


def test_page_reconnects_with_backoff_after_the_server_restarts(tiny_checkpoint, page: Page):
    first = LiveServer(browser_config(tiny_checkpoint)).start()
    port = first.port
    wire = WireLog(page)
    page.expected_console_errors = ("ERR_CONNECTION_REFUSED",)  # Chromium logs each refused attempt
    try:
        page.goto(first.url)
        record_badge_texts(page)
        page.fill("#api-key", API_KEY)
        page.click("#start")
        page.wait_for_function("() => window.audioInteraction.numDecisions >= 2", timeout=15_000)
    finally:
        first.stop()  # every session gets session.closed (server_shutdown), then close 1001
    wait_for_badge(page, "Connection lost (code 1001). Reconnecting in", timeout_ms=10_000)
    # The page was served by the server that went away; it keeps its own copy and comes back on its own.
    second = LiveServer(browser_config(tiny_checkpoint, port=port)).start()
    try:
        page.wait_for_function("() => window.audioInteraction.sessionCreated && window.audioInteraction"
                               ".connectionStates.at(-1).state === 'open' && window.audioInteraction"
                               ".connectionStates.some((s) => s.state === 'reconnecting')", timeout=20_000)
        state = seen(page)
        sessions = wire.of_type("session.created")
        assert len(sessions) == 2 and state["sessionCreated"]["session_id"] == sessions[1]["session_id"]
        waits = [s["delayMs"] for s in state["connectionStates"] if s["state"] == "reconnecting" and s["delayMs"]]
        assert waits and all(later > earlier for earlier, later in zip(waits, waits[1:])), waits  # backing off
        # The new session got the configuration again (the audio format first of all) before any audio.
        page.wait_for_function("() => window.audioInteraction.numDecisions >= 4", timeout=15_000)
        server_audio = second.session_audio(sessions[1]["session_id"])
        assert server_audio.format.sample_rate_hz == state["captureFormat"]["sampleRateHz"]
        assert page.locator("#connection").text_content().startswith("Connected")
        # The new session's view: its own heading above the lost one's, and a chunk strip of its own chunks.
        groups = page.locator(".session-replies")
        assert groups.count() == 2 and groups.first.get_attribute("data-session") == sessions[1]["session_id"]
        counts = page.evaluate("() => [document.querySelectorAll('#chunks li').length,"
                               " window.audioInteraction.numDecisions]")
        new_decisions = [e for e in wire.of_type("decision") if e["session_id"] == sessions[1]["session_id"]]
        assert counts[0] == counts[1] <= len(new_decisions), (counts, len(new_decisions))
        badge_texts = page.evaluate("window.badgeTexts")
        assert any(text.startswith("Reconnecting (attempt ") for text in badge_texts), badge_texts
        page.click("#stop")
    finally:
        second.stop()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once to find it, then released)."""
    return free_port()


def test_wrong_server_url_gives_up_and_says_what_to_check(live, page: Page):
    """A server that never answers: a few attempts, then a stop with an error that names the URL and what to
    check, not "Reconnecting…" forever with an empty Errors panel."""
    attempts: list[str] = []
    page.on("websocket", lambda socket: attempts.append(socket.url))
    page.expected_console_errors = ("ERR_CONNECTION_REFUSED",)  # Chromium logs each refused attempt
    wrong_url = f"ws://127.0.0.1:{closed_port()}/v1/stream"
    page.goto(live.url)
    page.fill("#server-url", wrong_url)
    page.fill("#api-key", API_KEY)
    page.click("#start")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'failed'",
                           timeout=15_000)
    num_attempts = len(attempts)
    assert 2 <= num_attempts <= 5 and set(attempts) == {f"{wrong_url}?api_key={API_KEY}"}, attempts
    error = page.locator("#errors li").first
    assert error.get_attribute("role") == "alert" and page.locator("#errors-panel").is_visible()
    message = error.text_content()
    assert message.startswith("connection_failed") and wrong_url in message, message
    assert f"{num_attempts} attempts" in message and "check" in message.lower(), message
    assert page.locator("#connection").text_content().startswith("Could not connect")
    assert seen(page)["errors"][-1]["code"] == "connection_failed"
    buttons = button_states(page)
    assert not buttons["start"] and buttons["stop"] and buttons["flush"] and buttons["cancel"], buttons
    assert not page.locator("#server-url").is_disabled()  # to correct it
    page.wait_for_timeout(2500)  # longer than the last backoff step: no further attempt
    assert len(attempts) == num_attempts


def test_stop_is_neutral_and_a_one_token_reply_says_token(live, page: Page):
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.fill("#max-tokens", "1")  # every reply ends after its first token
    page.click("#start")
    page.wait_for_function("() => window.audioInteraction.turns.some((t) => t.endReason)", timeout=30_000)
    footers = page.locator('.turn[data-state="done"] .turn-end').all_text_contents()
    assert footers and all(text.endswith(" · 1 token") for text in footers), footers
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")
    assert page.locator("#connection").text_content() == "Stopped"
    # The badge's dot: the error colour is for connections that failed or were refused, not for Stop.
    dot = page.evaluate("""() => ({
        stopped: getComputedStyle(document.querySelector("#connection"), "::before").backgroundColor,
        bad: (() => { const probe = document.createElement("span"); probe.style.color = "var(--bad)";
                      document.body.append(probe); const color = getComputedStyle(probe).color; probe.remove();
                      return color; })() })""")
    assert dot["stopped"] != dot["bad"], dot
    assert not page.locator("#errors-panel").is_visible()


def test_a_browser_offering_its_key_as_a_subprotocol_is_answered_on_both_endpoints_refusals_included(live, page: Page):
    """A browser cannot set headers on a WebSocket, so docs/realtime.md has a page offer its client secret as the
    subprotocol ``openai-insecure-api-key.<secret>`` beside ``realtime``, for /v1/realtime and /v1/stream. A browser
    drops a handshake whose answer selects none of the subprotocols it offered: /v1/stream took no subprotocol key
    and selected nothing, and a refusal on either endpoint selected nothing, so the page saw code 1006 and no word,
    an expired secret looking like a network failure (first-hour review, round twelve)."""
    secret = minted_secret(live)
    page.goto(live.url)
    results = page.evaluate("""async ({ port, secret }) => {
        const open = (path, key) => new Promise((resolve) => {
            const offered = ["realtime", `openai-insecure-api-key.${key}`];
            const socket = new WebSocket(`ws://127.0.0.1:${port}${path}`, offered);
            const events = [];
            socket.onmessage = (message) => {
                events.push(JSON.parse(message.data).type);
                if (events.length === 1) socket.close(1000);
            };
            socket.onclose = (closed) => resolve({ protocol: socket.protocol, code: closed.code, reason: closed.reason,
                                                   events });
        });
        return {
            stream: await open("/v1/stream", secret),
            realtime: await open("/v1/realtime", secret),
            streamRefused: await open("/v1/stream", "ek_1_expired_0"),
            realtimeRefused: await open("/v1/realtime", "ek_1_expired_0"),
        };
    }""", {"port": live.port, "secret": secret})
    page.expected_console_errors = ("WebSocket connection to",)  # the old server's answers, should they come back
    assert results["stream"] == {"protocol": "realtime", "code": 1000, "reason": "", "events": ["session.created"]}
    assert results["realtime"] == {"protocol": "realtime", "code": 1000, "reason": "", "events": ["session.created"]}
    for refused in (results["streamRefused"], results["realtimeRefused"]):
        assert refused["code"] == 1008 and refused["reason"].startswith("unauthorized"), results
        assert refused["events"] == ["error"], results


def test_page_from_another_host_explains_the_microphone_needs_https(live, page: Page):
    """http:// from a name other than localhost is not a secure context: no getUserMedia. The page says so
    before anyone presses Start, offers the file source instead, and names the TLS option."""
    page.goto(f"http://{INSECURE_HOST}:{live.port}/")
    assert page.evaluate("window.isSecureContext") is False
    notice = page.locator("#insecure-context")
    assert notice.is_visible()
    text = notice.text_content()
    assert "https://" in text and "--ssl-certfile" in text and "localhost" in text, text
    assert page.locator('input[name="source"][value="microphone"]').is_disabled()
    assert page.locator('input[name="source"][value="file"]').is_checked()
    assert not page.locator("#audio-file").is_disabled()
    page.goto(live.url)  # 127.0.0.1 is a secure context: no notice, the microphone is the default
    assert not page.locator("#insecure-context").is_visible()
    assert page.locator('input[name="source"][value="microphone"]').is_checked()


def test_a_file_streams_from_a_page_that_is_not_a_secure_context(live, page: Page, shared_audio):
    """The page from another host over http:// says "Audio files still work" and selects the file source, but the
    file went through an AudioWorklet, which browsers also keep from such pages: Start ended at once in
    "start_failed: Cannot read properties of undefined (reading 'addModule')" (first-hour review, round twelve)."""
    path = shared_audio / "02_translate" / "sample02_04.wav"  # 16 kHz mono, 3.2 s
    duration_s = soundfile.info(path).duration
    wire = WireLog(page)
    page.goto(f"http://{INSECURE_HOST}:{live.port}/")
    assert page.evaluate("window.isSecureContext || 'audioWorklet' in AudioContext.prototype") is False
    page.fill("#api-key", API_KEY)
    page.set_input_files("#audio-file", str(path))
    page.uncheck("#monitor")
    started_s = time.monotonic()
    page.click("#start")
    page.wait_for_function("() => /was heard/.test(document.querySelector('#capture-info').textContent) || "
                           "window.audioInteraction.errors.length > 0", timeout=20_000)
    assert seen(page)["errors"] == []
    assert time.monotonic() - started_s > duration_s * 0.9, "a file goes out in real time, not as fast as possible"
    flushed = wire.of_type("input.flushed")
    assert len(flushed) == 1
    state = seen(page)
    assert state["captureFormat"]["numChannels"] == 1
    server_audio = live.session_audio(flushed[0]["session_id"])
    assert server_audio.format.sample_rate_hz == state["captureFormat"]["sampleRateHz"]
    assert server_audio.audio_received_s == pytest.approx(duration_s, abs=0.03)
    assert page.locator("#listen-state").text_content() == "All audio heard"
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")


def in_viewport(page: Page, selector: str) -> bool:
    """Whether the element is wholly inside the window as it is scrolled now (not below the fold)."""
    return page.evaluate("""(selector) => {
        const box = document.querySelector(selector).getBoundingClientRect();
        return box.height > 0 && box.top >= 0 && box.bottom <= window.innerHeight;
    }""", selector)


def test_a_new_session_starts_with_a_clean_view_and_the_badge_shows_the_latest_error(live, page: Page):
    """Start after Stop shows only the new session: no chunks, replies or errors of the last one. The badge at the
    top names the latest error while the Errors panel is below the fold, and stays in view when scrolled."""
    page.set_viewport_size({"width": 1000, "height": 700})
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.fill("#max-tokens", "4096")  # more than this server's context budget holds: refused, the session goes on
    page.click("#start")
    page.wait_for_function("() => window.audioInteraction.errors.some((e) => e.code === 'invalid_event')"
                           " && window.audioInteraction.turns.some((t) => t.endReason)"
                           " && window.audioInteraction.numDecisions >= 3", timeout=30_000)
    first_session = seen(page)["sessionCreated"]["session_id"]
    assert not in_viewport(page, "#errors-panel"), "the scenario needs the error below the fold"
    badge = page.locator("#connection").text_content()
    assert badge.startswith(f"Connected · session {session_label(first_session)}") and "invalid_event" in badge, badge
    assert page.locator("#connection").get_attribute("data-has-error") == "true"
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    assert in_viewport(page, "#errors-panel") and in_viewport(page, "#connection"), "the badge scrolled away"
    page.evaluate("window.scrollTo(0, 0)")
    # The replies are grouped under their session.
    assert page.locator(f'.session-replies[data-session="{first_session}"] .session-head').text_content() \
        .startswith(f"Session {session_label(first_session)} ")
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")

    page.fill("#max-tokens", "")
    page.fill("#api-key", "not-the-key")
    page.click("#start")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'closed'")
    # Nothing of the first session is left: its chunks, replies, counts and errors went with it.
    assert page.locator("#chunks li").count() == 0 and page.locator(".turn").count() == 0
    assert page.locator("#chunk-summary").text_content() == "no chunks heard yet"
    assert page.locator("#no-replies").is_visible()
    assert page.locator("#session-id").text_content() == "—"
    errors = page.locator("#errors li").all_text_contents()
    assert len(errors) == 1 and errors[0].startswith("unauthorized"), errors
    state = seen(page)
    assert state["numDecisions"] == 0 and state["turns"] == [] and [e["code"] for e in state["errors"]] == [
        "unauthorized"], state
    badge = page.locator("#connection").text_content()
    assert badge.startswith("Connection closed (code 1008)") and "unauthorized" in badge, badge
    assert in_viewport(page, "#connection")

    page.fill("#api-key", API_KEY)
    page.click("#start")
    page.wait_for_function("() => window.audioInteraction.numDecisions >= 2", timeout=15_000)
    # A clean start: the refused key of the attempt before is history, the badge says only how things stand.
    assert not page.locator("#errors-panel").is_visible() and seen(page)["errors"] == []
    assert page.locator("#connection").get_attribute("data-has-error") != "true"
    assert "unauthorized" not in page.locator("#connection").text_content()
    counts = page.evaluate("() => [document.querySelectorAll('#chunks li').length,"
                           " window.audioInteraction.numDecisions]")
    assert counts[0] == min(counts[1], 75), counts
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'stopped'")


def test_reply_speaker_speaks_sentences_in_order_and_a_cancel_drops_only_its_reply(live, page: Page):
    """ReplySpeaker (speech.js) with a scripted synthesizer whose utterances end when the test says: one sentence at
    a time, in order; a cancelled reply's waiting and late sentences are dropped while the next reply's keep their
    place; a failed utterance does not stop the queue; a reply the server ends cancelled is not spoken further."""
    page.goto(live.url)
    result = page.evaluate("""async () => {
        const { ReplySpeaker } = await import("/static/speech.js");
        class FakeUtterance { constructor(text) { this.text = text; } }
        const synth = {
            log: [], current: null,
            speak(utterance) { this.log.push(utterance.text); this.current = utterance; utterance.onstart?.(); },
            cancel() { this.log.push("<cancel>"); const cut = this.current; this.current = null;
                       cut?.onerror?.({ error: "interrupted" }); },
            end() { const done = this.current; this.current = null; done.onend?.(); },
            fail(error) { const failed = this.current; this.current = null; failed.onerror?.({ error }); },
        };
        const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
        const speaker = new ReplySpeaker({ synthesis: synth, Utterance: FakeUtterance });
        const segment = (turn, index, text) => ({ type: "segment", session_id: "s", turn, index, text });
        const turnEnd = (turn, end_reason) => ({ type: "turn_end", session_id: "s", turn, end_reason });
        speaker.handleEvent(segment(0, 0, "Not spoken: the toggle is off."));
        speaker.setEnabled(true);
        speaker.handleEvent(segment(0, 0, "A0."));
        speaker.handleEvent(segment(0, 1, "A1."));
        speaker.handleEvent(segment(0, 2, "A2."));
        const waitingBehindA0 = speaker.queued.map((s) => s.text);
        synth.end();  // A0 done: A1 starts
        speaker.handleEvent(segment(1, 0, "B0."));  // the next reply, behind A2
        speaker.cancelReply("s", 0);  // A1 cut, A2 dropped; B0 keeps its place
        const afterCancel = { speaking: speaker.speaking, queued: speaker.queued.map((s) => s.text) };
        await tick();  // the next utterance goes to the synthesizer a task after the cut
        speaker.handleEvent(segment(0, 3, "A3, late."));  // reply 0 was cancelled: not spoken
        speaker.handleEvent(turnEnd(0, "cancelled"));
        synth.fail("synthesis-failed");  // B0 failed: the sentences after it still go
        const errorAfterFailure = speaker.lastError;
        speaker.handleEvent(segment(1, 1, "B1."));
        const errorWhileB1Speaks = speaker.lastError;  // a sentence spoken again: the failure is history
        synth.end();  // B1 done
        speaker.handleEvent(turnEnd(1, "text_end"));
        speaker.handleEvent(segment(2, 0, "C0."));
        speaker.handleEvent(segment(3, 0, "D0."));
        speaker.handleEvent(segment(3, 1, "D1."));
        speaker.handleEvent(turnEnd(2, "text_end"));
        speaker.handleEvent(turnEnd(3, "cancelled"));  // cancelled by the server: D0 and D1 are dropped
        synth.end();  // C0 done
        speaker.handleEvent(segment(4, 0, "E0."));
        speaker.setEnabled(false);  // off: E0 cut, nothing more
        speaker.handleEvent(segment(4, 1, "E1."));
        await tick();
        return { log: synth.log, waitingBehindA0, afterCancel, errorAfterFailure, errorWhileB1Speaks,
                 numSpoken: speaker.numSpoken,
                 isBusy: speaker.isBusy };
    }""")
    assert result["waitingBehindA0"] == ["A1.", "A2."]
    assert result["afterCancel"] == {"speaking": None, "queued": ["B0."]}
    assert result["log"] == ["A0.", "A1.", "<cancel>", "B0.", "B1.", "C0.", "E0.", "<cancel>"]
    assert result["errorAfterFailure"] == "synthesis-failed" and result["errorWhileB1Speaks"] is None
    assert result["numSpoken"] == 3 and result["isBusy"] is False  # A0, B1, C0


# Stands in for the browser's voice (headless Chromium has none): speechSynthesis.speak and cancel are replaced by a
# synthesizer that takes SPEAK_MS per utterance and fires the real event types, and every call is logged in order.
FAKE_SPEECH_SCRIPT = """
(() => {
  const SPEAK_MS = %d;
  window.speechLog = [];
  let current = null;
  const waiting = [];
  const startNext = () => {
    if (current || waiting.length === 0) return;
    const utterance = current = waiting.shift();
    utterance.dispatchEvent(new SpeechSynthesisEvent("start", { utterance }));
    utterance.fakeTimer = setTimeout(() => {
      if (current !== utterance) return;
      current = null;
      utterance.dispatchEvent(new SpeechSynthesisEvent("end", { utterance }));
      startNext();
    }, SPEAK_MS);
  };
  speechSynthesis.speak = (utterance) => {
    window.speechLog.push({ kind: "speak", text: utterance.text });
    waiting.push(utterance);
    setTimeout(startNext, 0);
  };
  speechSynthesis.cancel = () => {
    window.speechLog.push({ kind: "cancel" });
    const cut = current;
    current = null;
    if (cut) {
      clearTimeout(cut.fakeTimer);
      cut.dispatchEvent(new SpeechSynthesisErrorEvent("error", { utterance: cut, error: "interrupted" }));
    }
    for (const dropped of waiting.splice(0)) {
      dropped.dispatchEvent(new SpeechSynthesisErrorEvent("error", { utterance: dropped, error: "canceled" }));
    }
  };
})();
"""
# Holds server events back from the page while window.holdEvents is set (they wait, in order, and arrive on
# window.releaseEvents()); window.deliveredEvents lists, in order, what the page was given.
HOLD_EVENTS_SCRIPT = """
(() => {
  const NativeWebSocket = window.WebSocket;
  const held = [];
  window.holdEvents = false;
  window.deliveredEvents = [];
  window.releaseEvents = () => {
    window.holdEvents = false;
    while (held.length > 0 && !window.holdEvents) held.shift()();
  };
  window.WebSocket = class extends NativeWebSocket {
    set onmessage(handler) {
      super.onmessage = (message) => {
        const deliver = () => {
          if (typeof message.data === "string") window.deliveredEvents.push(JSON.parse(message.data));
          handler(message);
        };
        if (window.holdEvents || held.length > 0) held.push(deliver);
        else deliver();
      };
    }
  };
})();
"""


def test_page_speaks_each_finished_sentence_in_order_and_none_is_lost_across_a_cancel(live, page: Page):
    """Speak replies on, the microphone streaming to the real server: every `segment` the page gets is handed to
    speechSynthesis.speak in order. Cancel reply, clicked while a reply streams and sentences wait, silences what
    is queued and the cancelled reply's later sentences; every sentence of the replies after it is spoken."""
    wire = WireLog(page)
    page.add_init_script(FAKE_SPEECH_SCRIPT % 1500)  # slower than the tiny model talks: sentences queue up
    page.add_init_script(HOLD_EVENTS_SCRIPT)
    page.goto(live.url)
    page.fill("#api-key", API_KEY)
    page.fill("#max-tokens", "120")
    page.check("#speak-replies")
    page.click("#start")
    # Held once a reply streams while sentences wait to be spoken: the click below lands mid-reply, whatever the
    # server does meanwhile (its events wait until released).
    page.wait_for_function("""() => {
        const seen = window.audioInteraction;
        const ready = seen.turns.length > 0 && !seen.turns.at(-1).endReason && seen.speech.numQueued >= 1;
        if (ready) window.holdEvents = true;
        return ready;
    }""", timeout=60_000, polling=10)
    cancelled = seen(page)["turns"][-1]
    num_delivered_at_click = page.evaluate("window.deliveredEvents.length")
    assert page.locator(f'.turn[data-turn="{cancelled["turn"]}"]').get_attribute("data-state") == "streaming"
    page.click("#cancel")
    page.evaluate("window.releaseEvents()")
    # Held again once a later reply has ended with a sentence, so that the queue can run dry.
    page.wait_for_function("""(cancelledTurn) => {
        const ready = window.deliveredEvents.some((e) => e.type === "turn_end" && e.turn > cancelledTurn)
            && window.deliveredEvents.some((e) => e.type === "segment" && e.turn > cancelledTurn);
        if (ready) window.holdEvents = true;
        return ready;
    }""", arg=cancelled["turn"], timeout=60_000, polling=10)
    page.wait_for_function("() => !window.audioInteraction.speech.speaking"
                           " && window.audioInteraction.speech.numQueued === 0", timeout=60_000)
    log = page.evaluate("window.speechLog")
    delivered = page.evaluate("window.deliveredEvents")
    page.click("#stop")

    session_id = cancelled["sessionId"]
    segments = [e for e in delivered if e["type"] == "segment"]
    assert [e["text"] for e in segments] == [e["text"] for e in wire.of_type("segment")][:len(segments)]
    assert all(e["session_id"] == session_id for e in segments)
    before_click = [e["text"] for e in delivered[:num_delivered_at_click] if e["type"] == "segment"]
    after_click = [e["text"] for e in delivered[num_delivered_at_click:]
                   if e["type"] == "segment" and e["turn"] > cancelled["turn"]]
    cut_at = log.index({"kind": "cancel"})  # the click cut the sentence being spoken
    spoken_before = [entry["text"] for entry in log[:cut_at]]
    spoken_after = [entry["text"] for entry in log[cut_at + 1:]]
    # Up to the click: the sentences in the order they came, none twice; the ones still waiting were dropped.
    assert spoken_before == before_click[:len(spoken_before)] and len(spoken_before) < len(before_click), (
        spoken_before, before_click)
    # After it: every sentence of the later replies, in order, and nothing of the cancelled reply or before.
    assert spoken_after == after_click and after_click, (spoken_after, after_click)
    assert {"kind": "cancel"} not in log[cut_at + 1:]
