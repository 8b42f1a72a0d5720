// The page: wires the form, an AudioCapture and a ProtocolClient together and renders the events.

import { AudioCapture } from "./audio-capture.js";
import { ConnectionState, ProtocolClient, sessionLabel } from "./protocol-client.js";
import { ReplySpeaker } from "./speech.js";

const MAX_CHUNKS_SHOWN = 75; // 30 s of 0.4 s chunks
const FRAME_MS = 20;
const EMOTION_ICONS = { happy: "😊", sad: "😢", angry: "😠", surprise: "😮", normal: "🙂", urgent: "⚠️" };
const BADGE_ERROR_MAX_CHARS = 160; // the whole message is in the Errors panel and the badge's tooltip
const SPEAK_REPLIES_KEY = "audioInteraction.speakReplies"; // the toggle, remembered by this browser

const el = (id) => document.getElementById(id);
const form = el("setup");

// What the page has seen since Start, as plain data: for debugging from the console, and for tests.
function nothingSeen() {
  return {
    sessionCreated: null,
    sessionUpdated: null,
    captureFormat: null,
    connectionStates: [],
    resumes: [], // {sessionId, numReplayed, resentS, lostS} per resumed connection
    audioSentS: 0, // audio handed to the client (sent, or kept for a resume) since Start
    numDecisions: 0, // in the current session, as the chunk strip shows them
    numReplyDecisions: 0,
    turns: [], // every reply since Start, of every session
    errors: [],
  };
}
const seen = nothingSeen();
seen.speech = { isEnabled: false, speaking: null, numQueued: 0, numSpoken: 0, lastError: null }; // kept across Start
window.audioInteraction = seen;

let client = null; // the session's ProtocolClient, from Start until Stop (or a close for good)
let capture = null; // the audio being sent now, if any
let serverUrl = ""; // the URL as typed (the client's own carries the API key)
let activeTurn = null; // {key, card, textNode, record}
let sessionReplies = null; // {sessionId, list, numReplies}: where the current session's replies go
let audioSentS = 0;
const speaker = new ReplySpeaker({ lang: navigator.language, onChange: showSpeech });
// Browsers give getUserMedia only to secure contexts: https://, or http:// from localhost/127.0.0.1.
const canUseMicrophone = window.isSecureContext && Boolean(navigator.mediaDevices?.getUserMedia);

// ---- setup ------------------------------------------------------------------------------------

function defaultServerUrl() {
  const fromQuery = new URLSearchParams(location.search).get("server");
  if (fromQuery) return fromQuery;
  if (!location.host) return "ws://127.0.0.1:8000/v1/stream";
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/stream`;
}

el("server-url").value = defaultServerUrl();
if (!canUseMicrophone) {
  // Said before anyone presses Start, with the way out; a file needs no permission.
  el("insecure-context").hidden = false;
  form.elements.source.value = "file";
}
for (const radio of form.elements.source) radio.addEventListener("change", syncControls);
syncControls();
form.addEventListener("submit", (event) => {
  event.preventDefault();
  // Our own errors carry a string code; a browser's DOMException carries a legacy number (0 for most): not ours.
  start().catch((error) => showError(typeof error.code === "string" ? error.code : "start_failed", error.message,
    { isFatal: true }));
});
el("stop").addEventListener("click", () => stop());
// Leaving the page ends the session for good (session.close): otherwise the server would keep it, waiting
// resume_grace_s for a page that cannot come back.
window.addEventListener("pagehide", () => client?.close({ timeoutMs: 0 }));
el("flush").addEventListener("click", () => flush());
el("cancel").addEventListener("click", () => cancelReply());
setUpSpeech();

// Every control's state follows from what exists now, so no sequence of events can leave a button
// enabled that would do the wrong thing (Start re-sending a file into a session, say).
function syncControls() {
  const hasSession = client !== null; // from Start until Stop, also while connecting
  const isOpen = hasSession && client.state === ConnectionState.OPEN;
  const isFile = form.elements.source.value === "file";
  el("start").disabled = hasSession; // one session at a time: Stop ends it, Start begins a new one
  el("stop").disabled = !hasSession;
  el("flush").disabled = !(isOpen && capture); // a file's end is flushed already when it finishes
  // A reply in progress can be cancelled, and so can the speaking of replies that have ended.
  el("cancel").disabled = !((isOpen && activeTurn) || speaker.isBusy);
  for (const radio of form.elements.source) {
    radio.disabled = hasSession || (radio.value === "microphone" && !canUseMicrophone);
  }
  el("audio-file").disabled = hasSession || !isFile;
  el("monitor").disabled = hasSession || !isFile;
  // Server, key and reply length belong to the session: fixed while one is open.
  for (const id of ["server-url", "api-key", "max-tokens"]) el(id).disabled = hasSession;
}

// ---- actions ----------------------------------------------------------------------------------

async function start() {
  if (client) return; // a session is open (the button is disabled; Enter in a field must not start another)
  clearView();
  const source = form.elements.source.value;
  const file = el("audio-file").files[0];
  if (source === "file" && !file) {
    showError("no_file", "Choose an audio file to stream first.");
    return;
  }
  let session;
  try {
    session = makeClient();
  } catch (error) {
    showError("invalid_server_url", error.message, { isFatal: true });
    return;
  }
  client = session;
  serverUrl = el("server-url").value.trim();
  audioSentS = 0;
  session.configure({ decision_events: true }).catch(alreadyShown);
  // Its own configure: a length the server refuses (more than its context budget) must not take the
  // decision events down with it. The refusal is an error event, shown like any other.
  const maxTokens = el("max-tokens").valueAsNumber;
  if (Number.isFinite(maxTokens)) session.configure({ max_turn_tokens: maxTokens }).catch(alreadyShown);
  syncControls();
  try {
    await session.connect();
    if (client !== session) return; // stopped meanwhile
    capture = new AudioCapture({ onFrame, onFormat, frameMs: FRAME_MS });
    syncControls();
    if (source === "microphone") {
      await capture.startMicrophone();
      setListenState("listening", "Listening");
    } else {
      setListenState("listening", `Streaming ${file.name}`);
      const running = capture;
      await capture.startFile(file, { monitor: el("monitor").checked });
      if (capture !== running) return; // stopped meanwhile
      await capture.stop();
      capture = null;
      syncControls();
      // The session stays open: the replies to the file's end are still to come. Stop ends it.
      setListenState("waiting", "File sent; waiting for the model to hear it all");
      await flush();
    }
  } catch (error) {
    if (client !== session) return; // stopped meanwhile (Stop, or a close already shown): nothing more to say
    await stop();
    throw error;
  }
}

async function stop() {
  // Both cleared at once, before any await: a close arriving meanwhile must find the session gone.
  const running = capture;
  capture = null;
  const closing = client;
  client = null;
  if (closing) speaker.stop(); // the conversation is over: nothing more of it is said
  syncControls();
  await running?.stop();
  if (closing) await closing.close();
  setListenState("idle", "Idle");
  el("level").style.width = "0%";
  if (closing) el("capture-info").textContent = `Stopped: ${audioSentS.toFixed(1)} s of audio sent.`;
}

async function flush() {
  if (!client) return;
  try {
    const flushed = await client.flush();
    el("capture-info").textContent =
      `Everything sent so far was heard: ${flushed.num_chunks} chunks, ${flushed.audio_time_s.toFixed(1)} s.`;
    if (!capture) setListenState("idle", "All audio heard");
  } catch (error) {
    showError("flush_failed", error.message);
  }
}

function makeClient() {
  const made = new ProtocolClient(el("server-url").value.trim(), { apiKey: el("api-key").value.trim() || null });
  made.on("state", onConnectionState);
  made.on("event", onServerEvent);
  return made;
}

// ---- audio --------------------------------------------------------------------------------------

function onFormat(format) {
  seen.captureFormat = format;
  // The real rate and layout; the server resamples to 16 kHz and averages channels.
  client?.configure({
    audio: { sample_format: "pcm_s16le", sample_rate_hz: format.sampleRateHz, num_channels: format.numChannels },
  }).catch(alreadyShown);
}

let pendingLevel = 0;
let isLevelScheduled = false;
let lastInfoUpdateMs = 0;

function onFrame(pcm, peak) {
  if (!client) return;
  const format = capture?.format;
  if (client.sendAudio(pcm) && format) audioSentS += pcm.length / format.numChannels / format.sampleRateHz;
  seen.audioSentS = audioSentS;
  pendingLevel = Math.max(pendingLevel, peak);
  if (!isLevelScheduled) {
    isLevelScheduled = true;
    requestAnimationFrame(drawLevel);
  }
  const nowMs = performance.now();
  if (format && nowMs - lastInfoUpdateMs > 250) {
    lastInfoUpdateMs = nowMs;
    const what = capture.kind === "microphone" ? "the microphone" : "a file";
    const channels = format.numChannels === 1 ? "1 channel" : `${format.numChannels} channels`;
    const dropped = client.numFramesDropped ? ` · ${client.numFramesDropped} frames dropped while disconnected` : "";
    el("capture-info").textContent =
      `Streaming ${what} at ${format.sampleRateHz} Hz, ${channels}, ${FRAME_MS} ms frames · ` +
      `${audioSentS.toFixed(1)} s sent${dropped}`;
  }
}

function drawLevel() {
  isLevelScheduled = false;
  // Square root: a perceptual-ish scale, so speech does not hug the left edge.
  const percent = Math.round(Math.sqrt(Math.min(1, pendingLevel)) * 100);
  pendingLevel = 0;
  el("level").style.width = `${percent}%`;
  el("level").parentElement.setAttribute("aria-valuenow", String(percent));
}

// ---- events -------------------------------------------------------------------------------------

function onConnectionState({ state, attempt, delayMs, code, reason, hadSession, byClient, gaveUp, attempts, sessionId,
  resumed, resumeFailed }) {
  seen.connectionStates.push({ state, attempt, delayMs, code, byClient, gaveUp, resumeFailed });
  const badge = el("connection");
  const badgeText = el("connection-state"); // the badge's error line stays: it is the latest error, not a state
  badge.dataset.state = state;
  // A refusal's close reason repeats the error event just before it, which the badge shows already.
  const latestError = seen.errors.at(-1);
  const isSaid = latestError && reason === `${latestError.code}: ${latestError.message}`;
  const why = code ? ` (code ${code}${reason && !isSaid ? `: ${reason}` : ""})` : "";
  if (state === ConnectionState.CONNECTING) {
    badgeText.textContent = "Connecting…";
  } else if (state === ConnectionState.OPEN) {
    if (resumed) {
      // The same session, back: the reply in progress goes on, and nothing sent or said was lost (unless lostS).
      seen.resumes.push(resumed);
      const lost = resumed.lostS > 0 ? `; ${resumed.lostS.toFixed(1)} s of audio could not be re-sent` : "";
      badgeText.textContent = `Connected · session ${sessionLabel(resumed.sessionId)} · resumed: ` +
        `${resumed.numReplayed} events replayed, re-sent ${resumed.resentS.toFixed(1)} s of audio${lost}`;
    } else {
      badgeText.textContent = "Connected";
    }
  } else if (state === ConnectionState.RESUMING) {
    // Audio and the reply in progress wait: the server keeps the session, and replays what the page missed.
    badgeText.textContent = `Connection lost${why}; resuming session ${sessionLabel(sessionId)} in ` +
      `${(delayMs / 1000).toFixed(1)} s (attempt ${attempt})…`;
  } else if (state === ConnectionState.RECONNECTING) {
    const what = resumeFailed ? "Could not resume the session; starting a new one"
      : hadSession ? "Connection lost" : "Could not connect";
    badgeText.textContent = delayMs > 0
      ? `${what}${why}. Reconnecting in ${(delayMs / 1000).toFixed(1)} s (attempt ${attempt})…`
      : `Reconnecting (attempt ${attempt})…`;
    endActiveTurn("interrupted", "connection lost");
  } else if (state === ConnectionState.CLOSED) {
    if (byClient) {
      badge.dataset.state = "stopped"; // asked for: not an error
      badgeText.textContent = "Stopped";
    } else if (gaveUp) {
      badge.dataset.state = "failed";
      badgeText.textContent = hadSession ? `Connection lost${why}` : `Could not connect${why}`;
      showError("connection_failed", connectionFailure({ hadSession, attempts, code }), { isFatal: true });
    } else {
      badgeText.textContent = code === 1000 ? "Disconnected by the server" : `Connection closed${why}`;
    }
    endActiveTurn("interrupted", "connection closed");
    if (client && client.state === ConnectionState.CLOSED) {
      // Closed for good by the server (refused key, idle timeout, unreachable...): release the microphone too.
      stop();
    }
  }
  syncControls();
}

// What failed and what to check. The browser hides why a WebSocket failed (a refused port, an unknown
// host, a rejected certificate and an HTTP refusal such as 403 or 429 all read as code 1006), so the
// list names every usual cause.
function connectionFailure({ hadSession, attempts, code }) {
  const tries = `${attempts} attempts, the last closed with code ${code}` +
    (code === 1006 ? " (no WebSocket connection was made)" : "");
  const what = hadSession
    ? `Lost the connection to ${serverUrl} and could not reconnect: ${tries}.`
    : `Could not connect to ${serverUrl}: ${tries}.`;
  const health = new URL(serverUrl);
  health.protocol = health.protocol === "wss:" ? "https:" : "http:";
  health.pathname = "/health";
  health.search = "";
  const checks = [
    `that the server is running and this browser reaches its host and port (${health} should answer)`,
    "the URL: ws:// for a plain server, wss:// for one started with --ssl-certfile, and the path /v1/stream",
  ];
  if (health.protocol === "https:") checks.push(`that this browser trusts the server's certificate (open ${health} once)`);
  checks.push(`if the server sets AIS_ALLOWED_ORIGINS, that it lists this page's origin (${location.origin})`);
  return `${what} Check: ${checks.join("; ")}. Then press Start again.`;
}

function onServerEvent(event) {
  switch (event.type) {
    case "session.created":
      seen.sessionCreated = event;
      el("session-id").textContent = sessionLabel(event.session_id);
      el("session-id").title = event.session_id;
      el("model-name").textContent = event.model;
      el("demo-warning").hidden = !event.is_demo;
      el("connection-state").textContent = `Connected · session ${sessionLabel(event.session_id)}`;
      beginSessionView(event); // a resumed session gets session.resumed instead: its view goes on
      break;
    case "session.updated": {
      seen.sessionUpdated = event;
      const audio = event.audio;
      el("audio-format").textContent =
        `${audio.sample_rate_hz} Hz · ${audio.num_channels} ch · ${audio.sample_format} (confirmed by the server)`;
      break;
    }
    case "decision":
      addDecision(event);
      break;
    case "turn_begin":
      beginTurn(event);
      break;
    case "emotion":
      if (activeTurn) setEmotion(activeTurn, event.emotion);
      break;
    case "text_delta":
      if (activeTurn) {
        activeTurn.textNode.append(event.text);
        activeTurn.record.text += event.text;
      }
      break;
    case "segment":
      speaker.handleEvent(event);
      break;
    case "turn_end":
      speaker.handleEvent(event);
      endActiveTurn(event.end_reason, null, event);
      break;
    case "context_rollover":
      el("capture-info").textContent =
        `Long session: the model's context was rebuilt (${event.kept_chunks} chunks kept).`;
      break;
    case "error":
      showError(event.code, event.message, { isFatal: event.is_fatal });
      break;
    default:
      break;
  }
}

function addDecision(event) {
  seen.numDecisions += 1;
  const isReply = event.decision === "text_begin";
  if (isReply) seen.numReplyDecisions += 1;
  const chunks = el("chunks");
  const item = document.createElement("li");
  item.className = `chunk ${isReply ? "reply" : "silence"}`;
  item.title = `chunk ${event.chunk} · ${event.audio_time_s.toFixed(1)} s · ${isReply ? "reply" : "keep listening"}`;
  chunks.append(item);
  while (chunks.childElementCount > MAX_CHUNKS_SHOWN) chunks.firstElementChild.remove();
  el("chunk-summary").textContent =
    `${seen.numDecisions} chunks heard, ${seen.numReplyDecisions} started a reply; last: ` +
    `${isReply ? "reply" : "keep listening"} at ${event.audio_time_s.toFixed(1)} s`;
  if (!isReply && !activeTurn && capture) setListenState("listening", "Listening");
}

function beginTurn(event) {
  endActiveTurn("interrupted", "a new reply began");
  sessionReplies.numReplies += 1;
  el("no-replies").hidden = true;
  const card = document.createElement("article");
  card.className = "turn";
  card.dataset.session = event.session_id;
  card.dataset.turn = String(event.turn);
  card.dataset.state = "streaming";
  card.setAttribute("aria-busy", "true");
  const head = document.createElement("header");
  const title = document.createElement("h3");
  title.textContent = `Reply ${sessionReplies.numReplies}`;
  const emotion = document.createElement("span");
  emotion.className = "emotion";
  emotion.dataset.emotion = "pending";
  emotion.textContent = "…";
  const speaking = document.createElement("span");
  speaking.className = "speaking";
  speaking.hidden = true;
  const meta = document.createElement("span");
  meta.className = "meta";
  const onset = event.onset_latency_ms;
  meta.append(chip("onset", onset == null ? "n/a" : `${Math.round(onset)} ms`, "onset-latency"),
    chip("at", `${event.audio_time_s.toFixed(1)} s`));
  head.append(title, emotion, speaking, meta);
  const text = document.createElement("p");
  text.className = "turn-text";
  const footer = document.createElement("p");
  footer.className = "turn-end muted";
  footer.textContent = "streaming…";
  card.append(head, text, footer);
  sessionReplies.list.prepend(card);
  const record = { sessionId: event.session_id, turn: event.turn, onsetLatencyMs: onset, emotion: null, text: "",
    endReason: null };
  seen.turns.push(record);
  activeTurn = { key: `${event.session_id}:${event.turn}`, card, textNode: text, emotion, footer, record };
  setListenState("replying", "Replying");
  syncControls();
}

function chip(label, value, className = "") {
  const span = document.createElement("span");
  span.className = `chip ${className}`.trim();
  const name = document.createElement("span");
  name.className = "chip-label";
  name.textContent = label;
  span.append(name, ` ${value}`);
  return span;
}

function setEmotion(turn, emotion) {
  turn.record.emotion = emotion;
  turn.emotion.dataset.emotion = emotion;
  const icon = document.createElement("span");
  icon.className = "emotion-icon";
  icon.setAttribute("aria-hidden", "true");
  icon.textContent = EMOTION_ICONS[emotion] ?? "";
  turn.emotion.replaceChildren(icon, emotion);
}

function endActiveTurn(endReason, note, event = null) {
  if (!activeTurn) return;
  const { card, footer, emotion, record } = activeTurn;
  activeTurn = null;
  record.endReason = endReason;
  card.dataset.state = endReason === "text_end" || endReason === "max_tokens" ? "done" : endReason;
  card.removeAttribute("aria-busy");
  if (emotion.dataset.emotion === "pending") {
    emotion.dataset.emotion = "none";
    emotion.textContent = "no emotion tag";
  }
  const reasons = { text_end: "finished", max_tokens: "token limit reached", cancelled: "cancelled",
    session_closed: "session closed", interrupted: note ?? "interrupted" };
  footer.textContent = reasons[endReason] ?? endReason;
  if (event) footer.textContent += ` · ${event.num_tokens} ${event.num_tokens === 1 ? "token" : "tokens"}`;
  if (capture) setListenState("listening", "Listening");
  syncControls();
}

// A refused configure comes with an `error` event and a lost connection changes the badge; both are
// on screen already, so the rejected promise itself needs no second message.
function alreadyShown() {}

function setListenState(state, text) {
  const node = el("listen-state");
  node.dataset.state = state;
  node.textContent = text;
}

function showError(code, message, { isFatal = false } = {}) {
  seen.errors.push({ code, message, isFatal });
  el("errors-panel").hidden = false;
  const item = document.createElement("li");
  item.dataset.fatal = String(isFatal);
  if (isFatal) item.setAttribute("role", "alert");
  const label = document.createElement("code");
  label.textContent = code;
  item.append(label, ` ${message}`);
  el("errors").prepend(item);
  // The Errors panel is at the bottom of the page, often below the fold: the badge, always in view, names
  // the latest error too, so it never says "Connected" alone while something went wrong.
  const badgeError = el("connection-error");
  const count = seen.errors.length === 1 ? "" : ` (${seen.errors.length} errors)`;
  const short = message.length > BADGE_ERROR_MAX_CHARS ? `${message.slice(0, BADGE_ERROR_MAX_CHARS - 1)}…` : message;
  badgeError.textContent = `${code}: ${short}${count}`;
  badgeError.title = `${code}: ${message}`;
  badgeError.dataset.fatal = String(isFatal);
  badgeError.hidden = false;
  el("connection").dataset.hasError = "true";
}

// ---- one view per Start, one group of replies per session ---------------------------------------

// Start begins a new conversation: nothing of the last one stays on screen (its replies, chunks and errors
// would read as this one's), and what the page has seen starts over.
function clearView() {
  speaker.stop();
  Object.assign(seen, nothingSeen());
  activeTurn = null;
  sessionReplies = null;
  el("replies").replaceChildren();
  el("no-replies").hidden = false;
  clearChunks();
  el("errors").replaceChildren();
  el("errors-panel").hidden = true;
  const badgeError = el("connection-error");
  badgeError.replaceChildren();
  badgeError.hidden = true;
  badgeError.removeAttribute("title");
  delete el("connection").dataset.hasError;
  for (const id of ["session-id", "model-name", "audio-format"]) el(id).textContent = "—";
  el("session-id").removeAttribute("title");
  el("demo-warning").hidden = true;
}

function clearChunks() {
  el("chunks").replaceChildren();
  el("chunk-summary").textContent = "no chunks heard yet";
  seen.numDecisions = 0;
  seen.numReplyDecisions = 0;
}

// A new session (the first of a Start, or a new one after the last was lost): its chunks start again at 0, so
// the strip starts empty; its replies go under a heading of their own, above the last session's.
function beginSessionView(event) {
  endActiveTurn("interrupted", "the session ended");
  const isFirst = sessionReplies === null;
  clearChunks();
  const group = document.createElement("section");
  group.className = "session-replies";
  group.dataset.session = event.session_id;
  const head = document.createElement("h3");
  head.className = "session-head";
  const startedAt = new Date(event.server_time_ms ?? Date.now()).toLocaleTimeString();
  head.textContent = `Session ${sessionLabel(event.session_id)} · started ${startedAt}` +
    (isFirst ? "" : " · a new session: the one below ended");
  head.title = event.session_id;
  const list = document.createElement("div");
  list.className = "session-turns";
  group.append(head, list);
  el("replies").prepend(group);
  sessionReplies = { sessionId: event.session_id, list, numReplies: 0 };
}

// ---- speaking the replies ---------------------------------------------------------------------------

function setUpSpeech() {
  const toggle = el("speak-replies");
  if (!speaker.isSupported) {
    toggle.disabled = true;
    el("speech-state").textContent = "this browser has no speech synthesis";
    return;
  }
  toggle.checked = readPreference() === "on";
  speaker.setEnabled(toggle.checked);
  toggle.addEventListener("change", () => {
    speaker.setEnabled(toggle.checked);
    writePreference(toggle.checked ? "on" : "off");
  });
}

function readPreference() {
  try {
    return localStorage.getItem(SPEAK_REPLIES_KEY);
  } catch {
    return null; // storage switched off: the toggle starts off
  }
}

function writePreference(value) {
  try {
    localStorage.setItem(SPEAK_REPLIES_KEY, value);
  } catch {
    // not remembered; it still works for this page
  }
}

// Cancel reply: the reply in progress stops on the server, and the page goes silent now (what is still queued
// of earlier replies too). The next reply is spoken.
function cancelReply() {
  if (activeTurn) {
    client?.cancel();
    speaker.cancelReply(activeTurn.record.sessionId, activeTurn.record.turn);
  }
  speaker.stop();
  syncControls();
}

function showSpeech() {
  const speaking = speaker.speaking;
  const numQueued = speaker.queued.length;
  Object.assign(seen.speech, { isEnabled: speaker.isEnabled, speaking, numQueued, numSpoken: speaker.numSpoken,
    lastError: speaker.lastError });
  let text = "";
  if (speaker.isEnabled && speaker.lastError) {
    text = `the browser could not speak (${speaker.lastError}): is a voice installed?`;
  } else if (speaking) {
    text = `speaking${numQueued ? ` · ${numQueued} more queued` : ""}`;
  }
  el("speech-state").textContent = text;
  for (const card of document.querySelectorAll(".turn[data-speaking]")) {
    delete card.dataset.speaking;
    card.querySelector(".speaking").hidden = true;
  }
  const card = speaking &&
    document.querySelector(`.turn[data-session="${CSS.escape(speaking.sessionId)}"][data-turn="${speaking.turn}"]`);
  if (card) {
    card.dataset.speaking = "true";
    const mark = card.querySelector(".speaking");
    mark.textContent = `speaking sentence ${speaking.index + 1}`;
    mark.hidden = false;
  }
  syncControls();
}
