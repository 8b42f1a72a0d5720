// A browser client for the Audio-Interaction streaming protocol (docs/protocol.md, docs/browser.md).
//
// One ProtocolClient holds one logical conversation with a server: it connects, re-sends its
// configuration on every new session, streams int16 PCM frames, and when the connection drops it
// resumes the same session (the server keeps it for resume_grace_s: the missed events are replayed and
// the audio the server did not get is sent again), or, when the session is gone, reconnects to a new
// one with exponential backoff. No DOM access, so any front-end (or a worker) can use it.

/** Connection states reported through the "state" callback. */
export const ConnectionState = Object.freeze({
  IDLE: "idle", // not connected yet
  CONNECTING: "connecting", // WebSocket opening, session.created not received yet
  OPEN: "open", // a session is live: audio and events flow
  RESUMING: "resuming", // dropped; getting the same session back: events and audio wait, nothing is lost
  RECONNECTING: "reconnecting", // dropped (or the first attempt failed); waiting for the next attempt
  CLOSED: "closed", // closed for good: by close(), a refusal that retrying cannot fix, or too many failed attempts
});

// Close codes after which reconnecting cannot help: a normal close (after session.close), a refused
// key or origin (1008), an oversized frame (1009), the idle timeout (nobody is sending), a subscriber's
// unknown session, another connection that resumed this session (4010). Everything else (1001 shutdown,
// 1006 dropped, 1011, 1012 drain, 1013 retry later, 4001, 4008, 4009 not resumable) gets a new session.
export const FINAL_CLOSE_CODES = new Set([1000, 1008, 1009, 4000, 4004, 4010]);

// Only a connection that ended without a close frame (1006: the network dropped) leaves a session the server
// may still hold; every close frame the server sends ends the session first (1012 after a drain, say).
const RESUMABLE_CLOSE_CODE = 1006;
const RESUME_FIRST_DELAY_MS = 250; // then doubling up to RESUME_MAX_DELAY_MS, within the session's grace period
const RESUME_MAX_DELAY_MS = 4000;
// An input.flush sent just before the drop is the one command whose arrival the replay cannot show: the server
// answers it only once the model has heard its silence. A server that has it is busy with it (decision events for
// its silence chunks), so a quiet this long with no reply in progress means it was lost: it is sent again.
const FLUSH_QUIET_MS = 1500;
const SAME_AUDIO_S = 1e-6; // frame durations are summed exactly as the server sums them; this only absorbs rounding
const DEFAULT_AUDIO = Object.freeze({ sample_format: "pcm_s16le", sample_rate_hz: 16000, num_channels: 1 });

const IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/**
 * Delay before reconnect attempt `attempt` (1-based): initialDelayMs * factor^(attempt-1), capped at
 * maxDelayMs, spread by +-jitter so that many clients dropped together do not return together.
 */
export function backoffDelayMs(attempt, { initialDelayMs = 500, maxDelayMs = 15000, factor = 2, jitter = 0.2 } = {},
  random = Math.random) {
  const base = Math.min(maxDelayMs, initialDelayMs * factor ** Math.max(0, attempt - 1));
  const spread = 1 - jitter + 2 * jitter * random();
  return Math.round(Math.min(maxDelayMs, base * spread));
}

/**
 * A session's short label: its replica id and the first 5 hex digits of its own part (a session id is
 * `<replica id>_<32 hex digits>`). Its first 8 characters were the replica id alone behind several fronts, in a
 * container or in a pod, the same for every session there.
 */
export function sessionLabel(sessionId) {
  const cut = sessionId.lastIndexOf("_");
  return cut < 0 ? sessionId.slice(0, 8) : sessionId.slice(0, cut + 6);
}

export class ProtocolClient {
  /**
   * @param {string} url ws:// or wss:// URL of /v1/stream
   * @param {object} [options]
   * @param {string|null|(() => string|Promise<string>)} [options.apiKey] sent as ?api_key= (browsers cannot set
   *   WebSocket headers). A function is called before every connection, a resume included, for the key to send:
   *   a page that holds a short-lived client secret fetches a fresh one from its backend there, so a resume or a
   *   new session after the secret expired is not refused (1008, which ends the client for good)
   * @param {boolean} [options.reconnect=true] resume or reconnect after a dropped connection
   * @param {number} [options.maxAttempts=10] reconnect attempts in a row, after a session was open, before
   *   giving up (about 90 s of retrying with the default backoff: a server restart fits, an outage ends)
   * @param {number} [options.maxAttemptsBeforeFirstSession=3] retries while no connection has reached the
   *   server (no WebSocket handshake completed): a wrong URL, a server that is not running or a refused
   *   handshake does not get better by waiting, so the caller hears about it after a few seconds instead
   *   of a "reconnecting" that never ends. A server that answers "try again" (1013, still loading) is
   *   reachable: maxAttempts applies.
   * @param {object} [options.backoff] {initialDelayMs, maxDelayMs, factor, jitter} for backoffDelayMs
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket implementation (tests, Node)
   */
  constructor(url, { apiKey = null, reconnect = true, maxAttempts = 10, maxAttemptsBeforeFirstSession = 3,
    backoff = {}, WebSocket: WebSocketImpl = globalThis.WebSocket, random = Math.random } = {}) {
    let target;
    try {
      target = new URL(url);
    } catch {
      throw new Error(`${JSON.stringify(url)} is not a URL; the server's is like ws://127.0.0.1:8000/v1/stream`);
    }
    if (target.protocol !== "ws:" && target.protocol !== "wss:") {
      throw new Error(`the server URL must start with ws:// or wss:// (${JSON.stringify(url)}); ` +
        "the server's is like ws://127.0.0.1:8000/v1/stream");
    }
    this._apiKey = typeof apiKey === "function" ? apiKey : null; // asked again for every connection
    if (apiKey && !this._apiKey) target.searchParams.set("api_key", apiKey);
    this.url = target.toString();
    this._keyRequest = null; // the apiKey() call the latest connection attempt waits for
    this.reconnect = reconnect;
    this.maxAttempts = maxAttempts;
    this.maxAttemptsBeforeFirstSession = maxAttemptsBeforeFirstSession;
    this.backoff = backoff;
    this._WebSocket = WebSocketImpl;
    this._random = random;
    this._handlers = new Map();
    this._ws = null;
    this._state = ConnectionState.IDLE;
    this._attempt = 0; // failed attempts since the last live session
    this._hadSession = false; // whether any session has opened: a failure before that is not a drop
    this._reachedServer = false; // whether any WebSocket handshake has completed
    this._timer = null;
    this._isClosing = false;
    this._session = null; // the current session.created event
    this._config = {}; // the session.configure fields the server accepted, merged: re-sent on every new session
    this._configWaiters = []; // configure() promises waiting for a session to apply them
    this._connected = null; // {promise, resolve, reject} of connect()
    this._closed = null; // {promise, resolve} of close()
    this._nextEventId = 1;
    // The current session, for a resume: what was sent (in order, until the server is known to have it), the
    // last event number seen, and whether the session ended on the server.
    this._outbound = new Outbound(0);
    this._format = DEFAULT_AUDIO; // the format the server reads the next frame in
    this._lastSeq = 0;
    this._sessionClosed = false;
    this._resume = null; // while resuming: {deadlineMs, attempt, replayLeft, resumed, settleTimer}
    this._lastEventMs = 0;
    this._isReplyOpen = false;
    this.numFramesSent = 0;
    this.numFramesDropped = 0; // frames offered while no session was open (or kept for one that could not resume)
    this.numResumes = 0;
  }

  /** Current ConnectionState. */
  get state() {
    return this._state;
  }

  /** The live session's session.created event (null when none). */
  get session() {
    return this._state === ConnectionState.OPEN ? this._session : null;
  }

  /** Bytes queued in the WebSocket but not yet sent (grows when the network is slower than the audio). */
  get bufferedAmount() {
    return this._ws?.bufferedAmount ?? 0;
  }

  /**
   * Registers a handler; returns a function that removes it. `type` is a server event type
   * ("session.created", "session.resumed", "decision", "turn_begin", "text_delta", "error", ...), "event" for
   * every server event, or "state" for connection state changes: {state, attempt, delayMs, code, reason,
   * hadSession}; with state "resuming" also sessionId, with state "open" after a resume also resumed
   * {sessionId, numReplayed, resentS, lostS}; with state "reconnecting" after a failed resume also
   * resumeFailed; with state "closed" also byClient (close() was called) and gaveUp (too many failed
   * attempts; then attempts is how many connections were tried since the last live session).
   */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(handler);
    return () => this._handlers.get(type)?.delete(handler);
  }

  /** Opens the connection; resolves with the first session.created, rejects if closed for good before it. */
  connect() {
    if (this._state === ConnectionState.CLOSED) return Promise.reject(new Error("client is closed"));
    if (!this._connected) {
      this._connected = deferred();
      if (this._state === ConnectionState.IDLE) this._open();
    }
    return this._connected.promise;
  }

  /**
   * Sends session.configure (or keeps it for the next session while none is open, or for the resumed one while
   * resuming). Fields the server accepts are merged into the client's configuration, which every new session
   * receives before any audio, so the audio format and options survive reconnects; refused ones are not re-sent.
   * Each call is its own event, so a refused field takes only its own call down. Resolves with session.updated;
   * rejects with the error event.
   */
  configure(fields) {
    const waiter = deferred();
    waiter.fields = { ...fields };
    waiter.accept = () => Object.assign(this._config, waiter.fields);
    if (this._state === ConnectionState.OPEN || this._state === ConnectionState.RESUMING) {
      this._sendConfigure(fields, [waiter]);
    } else {
      this._configWaiters.push(waiter);
    }
    return waiter.promise;
  }

  /**
   * Sends one frame of interleaved int16 PCM in the configured format. While resuming, the frame waits and goes
   * out once the session is back. Returns false (and counts the frame in numFramesDropped) when no session is
   * open: audio cannot wait for a new session.
   */
  sendAudio(pcm) {
    if (this._state !== ConnectionState.OPEN && this._state !== ConnectionState.RESUMING) {
      this.numFramesDropped += 1;
      return false;
    }
    // A copy: the frame is kept until the server is known to have it, and the caller may reuse its array.
    const bytes = IS_LITTLE_ENDIAN ? pcm.slice() : toLittleEndian(pcm);
    const numChannels = this._format.num_channels;
    const bytesPerSample = (this._format.sample_format === "pcm_f32le" ? 4 : 2) * numChannels;
    const frame = this._outbound.addAudio(bytes, pcm.length / numChannels / this._format.sample_rate_hz,
      this._format.sample_rate_hz, bytesPerSample);
    this._transmit(frame);
    this.numFramesSent += 1;
    return true;
  }

  /** End of input (push-to-talk release, end of a file); resolves with input.flushed. */
  flush(trailingSilenceS = undefined) {
    const event = { type: "input.flush" };
    if (trailingSilenceS !== undefined) event.trailing_silence_s = trailingSilenceS;
    if (this._state !== ConnectionState.OPEN && this._state !== ConnectionState.RESUMING) {
      return Promise.reject(new Error("no open session"));
    }
    const waiter = deferred();
    this._transmit(this._outbound.addEvent(event, [waiter]));
    return waiter.promise;
  }

  /** Stops the reply in progress (response.cancel); returns false when no session is open. */
  cancel() {
    // Not kept for a resume: a cancel sent late would stop a reply the user never saw.
    return this._send({ type: "response.cancel" });
  }

  /**
   * Ends the conversation: session.close, then the socket; no reconnect afterwards. Resolves with
   * session.closed, or null when the server did not answer within timeoutMs or no session was open.
   */
  close({ timeoutMs = 3000 } = {}) {
    if (this._closed) return this._closed.promise;
    if (this._state === ConnectionState.CLOSED) return Promise.resolve(null);
    this._closed = deferred();
    this._isClosing = true;
    clearTimeout(this._timer);
    clearTimeout(this._resume?.settleTimer);
    if (this._state === ConnectionState.OPEN && this._send({ type: "session.close" })) {
      const ws = this._ws;
      setTimeout(() => ws.close(1000), timeoutMs); // the server closes first when it answers
    } else {
      this._ws?.close(1000);
      if (!this._ws || this._ws.readyState === this._WebSocket.CLOSED) this._finish({ code: 1000, reason: "" });
    }
    return this._closed.promise;
  }

  // ---- internals ------------------------------------------------------------------------------

  _open(url = this.url) {
    if (!this._resume) {
      this._setState(this._attempt === 0 ? ConnectionState.CONNECTING : ConnectionState.RECONNECTING,
        { attempt: this._attempt, delayMs: 0 });
    }
    if (!this._apiKey) {
      this._openSocket(url);
      return;
    }
    const request = (this._keyRequest = {});
    const isCurrent = () => this._keyRequest === request && !this._isClosing && this._state !== ConnectionState.CLOSED;
    Promise.resolve().then(() => this._apiKey()).then((key) => {
      if (!isCurrent()) return;
      const target = new URL(url);
      if (key) target.searchParams.set("api_key", key);
      this._openSocket(target.toString());
    }, (error) => {
      // A backend that could not give a key now: a failed attempt, retried with the backoff like one.
      if (isCurrent()) this._onClose({ code: 1006, reason: `apiKey() failed: ${error?.message ?? error}` });
    });
  }

  _openSocket(url) {
    const ws = new this._WebSocket(url);
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    ws.onopen = () => {
      if (ws === this._ws) this._reachedServer = true;
    };
    ws.onmessage = (message) => {
      if (ws === this._ws && typeof message.data === "string") this._onEvent(JSON.parse(message.data));
    };
    ws.onclose = (closeEvent) => {
      if (ws === this._ws) this._onClose(closeEvent);
    };
  }

  _onEvent(event) {
    if (event.type === "session.created") this._lastSeq = 0; // a new session numbers its events from 1
    if (event.seq != null) {
      if (event.seq <= this._lastSeq) return; // seen already (a server replays only what follows last_seq)
      this._lastSeq = event.seq;
    }
    this._lastEventMs = Date.now();
    switch (event.type) {
      case "session.created":
        this._startSession(event);
        break;
      case "session.resumed":
        if (this._resume) Object.assign(this._resume, { resumed: event, replayLeft: event.num_replayed });
        break;
      case "session.updated":
        this._outbound.answer("session.configure", event);
        break;
      case "error":
        if (!this._outbound.answerById(event) && event.event_type in this._outbound.unanswered) {
          this._outbound.answer(event.event_type, event);
        }
        break;
      case "input.flushed":
        this._outbound.answer("input.flush", event);
        break;
      case "turn_begin":
      case "turn_end":
        this._isReplyOpen = event.type === "turn_begin";
        break;
      case "session.closed":
        this._sessionClosed = true;
        if (this._isClosing) this._closed?.resolve(event);
        break;
      default:
        break;
    }
    this._emit(event.type, event);
    this._emit("event", event);
    // The replay ends after num_replayed events: then what the server lacks goes out again.
    if (this._resume?.resumed && event.type !== "session.resumed" && event.seq != null) this._resume.replayLeft -= 1;
    if (this._resume?.resumed && this._resume.replayLeft === 0 && !this._resume.planned) this._afterReplay();
  }

  _startSession(event) {
    this._session = event;
    this._attempt = 0;
    this._hadSession = true;
    this._sessionClosed = false;
    this._isReplyOpen = false;
    this._lastSeq = event.seq ?? 0;
    const limits = event.limits ?? {};
    // A session waits resume_grace_s for its client, and takes at most max_buffered_audio_s ahead of the model:
    // audio it has not accepted is never older than both together.
    this._outbound = new Outbound((event.resume_grace_s ?? 0) + (limits.max_buffered_audio_s ?? 0));
    this._format = event.audio ?? DEFAULT_AUDIO;
    this._setState(ConnectionState.OPEN, { attempt: 0, delayMs: 0 });
    // The configuration goes out before the caller can send audio (model options only apply then): what was
    // accepted before, then each configure() call still waiting, in order.
    if (Object.keys(this._config).length > 0) this._sendConfigure({ ...this._config }, []);
    for (const waiter of this._configWaiters.splice(0)) this._sendConfigure(waiter.fields, [waiter]);
    this._connected?.resolve(event);
  }

  _afterReplay() {
    const resume = this._resume;
    resume.planned = true;
    const plan = this._outbound.planResend(resume.resumed.audio_received_s);
    if (!plan.holdsFlush) {
      this._finishResume(plan);
      return;
    }
    const flush = this._outbound.frames[0];
    const { attempt } = resume;
    this._lastEventMs = Date.now();
    const check = () => {
      // Dropped again (a later attempt plans afresh), closed, or done: this check has nothing more to do.
      if (this._resume !== resume || resume.attempt !== attempt || resume.settled) return;
      clearTimeout(resume.settleTimer);
      const quietMs = Date.now() - this._lastEventMs;
      if (flush.isAnswered) {
        this._outbound.frames.shift(); // the server had it, and everything before it
      } else if (quietMs < FLUSH_QUIET_MS || this._isReplyOpen) {
        resume.settleTimer = setTimeout(check, Math.max(50, FLUSH_QUIET_MS - quietMs));
        return;
      }
      resume.settled = true;
      this._finishResume(plan);
    };
    flush.onAnswered = check; // the answer settles it at once, not at the next look
    check();
  }

  _finishResume(plan) {
    if (!this._isSocketOpen()) return; // dropped or closing meanwhile: the next attempt plans again
    const { resumed } = this._resume;
    let resentS = 0;
    for (const frame of this._outbound.frames) {
      this._ws.send(frame.payload);
      frame.isTransmitted = true;
      resentS += frame.audioEndS - frame.audioStartS;
    }
    this._resume = null;
    this.numResumes += 1;
    this._attempt = 0;
    this._setState(ConnectionState.OPEN, { attempt: 0, delayMs: 0, resumed: { sessionId: resumed.session_id,
      numReplayed: resumed.num_replayed, resentS, lostS: plan.lostS } });
    this._outbound.trim();
  }

  _onClose({ code, reason }) {
    this._ws = null;
    clearTimeout(this._resume?.settleTimer);
    if (!this._isClosing && this.reconnect && this._canResume(code)) {
      this._scheduleResume(code, reason);
      return;
    }
    const failedResume = this._resume !== null;
    this._resume = null;
    // A new session (if any) gets the configuration again: the configure() calls still waiting for an answer
    // are answered by it. Flushes are lost with the session; audio kept for a resume was never heard.
    for (const frame of this._outbound.unanswered["session.configure"]) this._configWaiters.push(...frame.waiters);
    for (const frame of this._outbound.unanswered["input.flush"]) {
      for (const waiter of frame.waiters) waiter.reject(new Error(`connection closed (${code})`));
    }
    this.numFramesDropped += this._outbound.frames.filter((frame) => !frame.isTransmitted && !frame.eventType).length;
    this._outbound = new Outbound(0);
    const limit = this._reachedServer ? this.maxAttempts : this.maxAttemptsBeforeFirstSession;
    const isRetryable = !this._isClosing && this.reconnect && !FINAL_CLOSE_CODES.has(code);
    if (!isRetryable || this._attempt + 1 > limit) {
      this._finish({ code, reason, gaveUp: isRetryable });
      return;
    }
    this._attempt += 1;
    const delayMs = backoffDelayMs(this._attempt, this.backoff, this._random);
    this._setState(ConnectionState.RECONNECTING, { attempt: this._attempt, delayMs, code, reason,
      resumeFailed: failedResume });
    this._timer = setTimeout(() => this._open(), delayMs);
  }

  // Whether the session may still wait on the server for this client: it had one, with a resume token, that did
  // not end, the connection ended without a close frame, and the grace period (if resuming already) is not over.
  _canResume(code) {
    if (code !== RESUMABLE_CLOSE_CODE || this._sessionClosed || !this._session?.resume_token) return false;
    if (!this._resume) return this._session.resume_grace_s > 0;
    return Date.now() + this._resumeDelayMs(this._resume.attempt + 1) < this._resume.deadlineMs;
  }

  _resumeDelayMs(attempt) {
    return Math.min(RESUME_MAX_DELAY_MS, RESUME_FIRST_DELAY_MS * 2 ** (attempt - 1));
  }

  _scheduleResume(code, reason) {
    // The server started the grace period when it saw the drop, about when we did.
    this._resume ??= { deadlineMs: Date.now() + this._session.resume_grace_s * 1000, attempt: 0 };
    const resume = this._resume;
    resume.attempt += 1;
    resume.resumed = null;
    resume.planned = false;
    resume.settled = false;
    const delayMs = this._resumeDelayMs(resume.attempt);
    if (Date.now() + delayMs >= resume.deadlineMs) {
      this._onClose({ code, reason }); // no time left: a new session
      return;
    }
    this._setState(ConnectionState.RESUMING, { attempt: resume.attempt, delayMs, code, reason,
      sessionId: this._session.session_id });
    const target = new URL(this.url);
    this._timer = setTimeout(() => {
      target.searchParams.set("resume", this._session.session_id);
      target.searchParams.set("token", this._session.resume_token);
      target.searchParams.set("last_seq", String(this._lastSeq));
      this._open(target.toString());
    }, delayMs);
  }

  _finish({ code, reason, gaveUp = false }) {
    this._setState(ConnectionState.CLOSED, { attempt: this._attempt, delayMs: 0, code, reason,
      byClient: this._isClosing, gaveUp, attempts: this._attempt + 1 });
    const error = new Error(`connection closed (${code}${reason ? `: ${reason}` : ""})`);
    for (const waiter of this._configWaiters.splice(0)) waiter.reject(error);
    this._connected?.reject(error);
    this._connected?.promise.catch(() => {}); // nobody may be waiting on connect() any more
    this._closed?.resolve(null);
  }

  _sendConfigure(fields, waiters) {
    const eventId = `cfg-${this._nextEventId++}`;
    if (fields.audio) this._format = fields.audio; // the frames after this one are in that format
    this._transmit(this._outbound.addEvent({ type: "session.configure", event_id: eventId, ...fields }, waiters));
  }

  // A frame of the session: sent now when the session is open, else kept for the resume to send.
  _transmit(frame) {
    if (this._state !== ConnectionState.OPEN || !this._isSocketOpen()) return;
    this._ws.send(frame.payload);
    frame.isTransmitted = true;
    this._outbound.trim();
  }

  _send(event) {
    if (this._state !== ConnectionState.OPEN || !this._isSocketOpen()) return false;
    this._ws.send(JSON.stringify(event));
    return true;
  }

  // Between the server's close frame and onclose the socket is CLOSING while our state is still OPEN: a send
  // then goes nowhere (the browser logs an error). The frame stays kept, for a resume to send.
  // (Our state is OPEN only after session.created, which a CONNECTING socket cannot have delivered.)
  _isSocketOpen() {
    return this._ws != null && this._ws.readyState !== this._WebSocket.CLOSING
      && this._ws.readyState !== this._WebSocket.CLOSED;
  }

  _setState(state, details) {
    this._state = state;
    this._emit("state", { state, hadSession: this._hadSession, ...details });
  }

  _emit(type, payload) {
    for (const handler of this._handlers.get(type) ?? []) {
      try {
        handler(payload);
      } catch (error) {
        console.error(`ProtocolClient: a "${type}" handler failed`, error); // one bad handler must not stop the rest
      }
    }
  }
}

/**
 * What the client sent in its current session, in order, and what of it the server is known to have. The server
 * takes frames in order and accepts audio frames whole: after a drop, what it has is a prefix, measured by
 * session.resumed's audio_received_s and by the commands it answered (configure: at once).
 */
export class Outbound {
  constructor(retainS) {
    this.retainS = retainS;
    this.frames = []; // {payload, audioStartS, audioEndS, eventType, sampleRateHz, bytesPerSample, waiters, ...}
    this.audioS = 0; // audio of this session, summed frame by frame as the server sums it
    this.unanswered = { "session.configure": [], "input.flush": [] };
    this._newestAnswered = null; // for trim: it and every frame before it can go
  }

  addAudio(payload, durationS, sampleRateHz, bytesPerSample) {
    const frame = { payload, audioStartS: this.audioS, audioEndS: this.audioS + durationS, eventType: null,
      sampleRateHz, bytesPerSample, waiters: [], isAnswered: false, isTransmitted: false };
    this.audioS = frame.audioEndS;
    this.frames.push(frame);
    return frame;
  }

  addEvent(event, waiters = []) {
    const frame = { payload: JSON.stringify(event), audioStartS: this.audioS, audioEndS: this.audioS,
      eventType: event.type, eventId: event.event_id ?? null, waiters, isAnswered: false, isTransmitted: false };
    this.frames.push(frame);
    this.unanswered[event.type]?.push(frame);
    return frame;
  }

  /** The server answered the oldest unanswered command of this type (it answers them in order). */
  answer(eventType, answer) {
    this._settle(this.unanswered[eventType].shift(), answer);
  }

  /** An error that names the command's event_id answers that command; whether one did. */
  answerById(error) {
    for (const pending of Object.values(this.unanswered)) {
      const index = error.event_id ? pending.findIndex((frame) => frame.eventId === error.event_id) : -1;
      if (index >= 0) {
        this._settle(pending.splice(index, 1)[0], error);
        return true;
      }
    }
    return false;
  }

  _settle(frame, answer) {
    if (!frame) return;
    frame.isAnswered = true;
    this._newestAnswered = frame;
    frame.onAnswered?.();
    for (const waiter of frame.waiters) {
      if (answer.type === "error") {
        waiter.reject(Object.assign(new Error(answer.message), { event: answer }));
      } else {
        waiter.accept?.();
        waiter.resolve(answer);
      }
    }
  }

  /** Forgets frames the server certainly has, and audio older than a resume could ask for. */
  trim() {
    // Looked for once per answer, not on every frame sent: a resume keeps thousands of frames.
    const answered = this._newestAnswered ? this.frames.indexOf(this._newestAnswered) : -1;
    if (answered >= 0) this.frames.splice(0, answered + 1);
    this._newestAnswered = null;
    let old = 0;
    while (old < this.frames.length && this.frames[old].eventType === null &&
      this.frames[old].audioEndS < this.audioS - this.retainS) old += 1;
    this.frames.splice(0, old);
  }

  /** After session.resumed and its replay: drops what the server has; the frames left are to be sent again. */
  planResend(audioReceivedS) {
    const has = this.frames.findLastIndex((frame) => frame.isAnswered ||
      (frame.eventType === null && frame.audioEndS <= audioReceivedS + SAME_AUDIO_S));
    this.frames.splice(0, has + 1);
    const keptFromS = this.frames.length ? this.frames[0].audioStartS : this.audioS;
    const lostS = keptFromS - audioReceivedS > SAME_AUDIO_S ? keptFromS - audioReceivedS : 0;
    const first = this.frames[0];
    if (first && first.eventType === null && first.audioStartS + SAME_AUDIO_S < audioReceivedS) {
      // The server took part of this frame: re-send from the sample it stopped at.
      const skip = Math.round((audioReceivedS - first.audioStartS) * first.sampleRateHz) * first.bytesPerSample;
      first.payload = ArrayBuffer.isView(first.payload) ? first.payload.subarray(skip / first.payload.BYTES_PER_ELEMENT)
        : first.payload.slice(skip);
      first.audioStartS = audioReceivedS;
    }
    // An unanswered configure was not processed (the server answers one at once), so neither was anything after it;
    // nor was anything after audio the server did not accept. Only a flush leaves no trace until the model heard it.
    return { lostS, holdsFlush: Boolean(first && first.eventType === "input.flush" && first.isTransmitted) };
  }
}

function deferred() {
  const result = {};
  result.promise = new Promise((resolve, reject) => Object.assign(result, { resolve, reject }));
  return result;
}

function toLittleEndian(pcm) {
  const bytes = new DataView(new ArrayBuffer(pcm.length * 2));
  pcm.forEach((value, index) => bytes.setInt16(index * 2, value, true));
  return bytes.buffer;
}
