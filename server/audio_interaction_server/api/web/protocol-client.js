// A browser client for the Audio-Interaction streaming protocol (docs/protocol.md, docs/browser.md).
//
// One ProtocolClient holds one logical conversation with a server: it connects, re-sends its
// configuration on every new session, streams int16 PCM frames, and reconnects with exponential
// backoff when the connection drops. No DOM access, so any front-end (or a worker) can use it.

/** Connection states reported through the "state" callback. */
export const ConnectionState = Object.freeze({
  IDLE: "idle", // not connected yet
  CONNECTING: "connecting", // WebSocket opening, session.created not received yet
  OPEN: "open", // a session is live: audio and events flow
  RECONNECTING: "reconnecting", // dropped (or the first attempt failed); waiting for the next attempt
  CLOSED: "closed", // closed for good: by close(), a refusal that retrying cannot fix, or too many failed attempts
});

// Close codes after which reconnecting cannot help: a normal close (after session.close), a refused
// key or origin (1008), an oversized frame (1009), the idle timeout (nobody is sending), a subscriber's
// unknown session. Everything else (1001 shutdown, 1006 dropped, 1011, 1013 retry later, 4001, 4008)
// is retried.
export const FINAL_CLOSE_CODES = new Set([1000, 1008, 1009, 4000, 4004]);

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

export class ProtocolClient {
  /**
   * @param {string} url ws:// or wss:// URL of /v1/stream
   * @param {object} [options]
   * @param {string|null} [options.apiKey] sent as ?api_key= (browsers cannot set WebSocket headers)
   * @param {boolean} [options.reconnect=true] reconnect after a dropped connection
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
    if (apiKey) target.searchParams.set("api_key", apiKey);
    this.url = target.toString();
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
    this._config = {}; // merged session.configure fields, re-sent on every new session
    this._configWaiters = []; // configure() promises waiting for a session to apply them
    this._sentConfigs = []; // [{eventId, waiters}] configure events sent, answer not yet received
    this._flushes = []; // [{resolve, reject}] input.flush sent, input.flushed not yet received
    this._connected = null; // {promise, resolve, reject} of connect()
    this._closed = null; // {promise, resolve} of close()
    this._nextEventId = 1;
    this.numFramesSent = 0;
    this.numFramesDropped = 0; // frames offered while no session was open
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
   * ("session.created", "decision", "turn_begin", "text_delta", "error", ...), "event" for every server
   * event, or "state" for connection state changes: {state, attempt, delayMs, code, reason, hadSession},
   * and with state "closed" also byClient (close() was called) and gaveUp (too many failed attempts; then
   * attempts is how many connections were tried since the last live session).
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
   * Sends session.configure (or keeps it for the next session while none is open). Fields are merged
   * into the client's configuration, which every new session receives before any audio, so the audio
   * format and options survive reconnects. Resolves with session.updated; rejects with the error event.
   */
  configure(fields) {
    const previous = { ...this._config };
    Object.assign(this._config, fields);
    const waiter = deferred();
    waiter.rollback = () => {
      // A refused change must not be re-sent to every later session.
      for (const key of Object.keys(fields)) {
        if (key in previous) this._config[key] = previous[key];
        else delete this._config[key];
      }
    };
    if (this._state === ConnectionState.OPEN) this._sendConfigure(fields, [waiter]);
    else this._configWaiters.push(waiter);
    return waiter.promise;
  }

  /**
   * Sends one frame of interleaved int16 PCM in the configured format. Returns false (and counts the
   * frame in numFramesDropped) when no session is open: audio cannot wait for a reconnect.
   */
  sendAudio(pcm) {
    if (this._state !== ConnectionState.OPEN) {
      this.numFramesDropped += 1;
      return false;
    }
    this._ws.send(IS_LITTLE_ENDIAN ? pcm : toLittleEndian(pcm));
    this.numFramesSent += 1;
    return true;
  }

  /** End of input (push-to-talk release, end of a file); resolves with input.flushed. */
  flush(trailingSilenceS = undefined) {
    const event = { type: "input.flush" };
    if (trailingSilenceS !== undefined) event.trailing_silence_s = trailingSilenceS;
    if (!this._send(event)) return Promise.reject(new Error("no open session"));
    const waiter = deferred();
    this._flushes.push(waiter);
    return waiter.promise;
  }

  /** Stops the reply in progress (response.cancel); returns false when no session is open. */
  cancel() {
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

  _open() {
    this._setState(this._attempt === 0 ? ConnectionState.CONNECTING : ConnectionState.RECONNECTING,
      { attempt: this._attempt, delayMs: 0 });
    const ws = new this._WebSocket(this.url);
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
    switch (event.type) {
      case "session.created":
        this._session = event;
        this._attempt = 0;
        this._hadSession = true;
        this._setState(ConnectionState.OPEN, { attempt: 0, delayMs: 0 });
        // The configuration goes out before the caller can send audio (model options only apply then).
        if (Object.keys(this._config).length > 0 || this._configWaiters.length > 0) {
          this._sendConfigure(this._config, this._configWaiters.splice(0));
        }
        this._connected?.resolve(event);
        break;
      case "session.updated":
        for (const waiter of this._sentConfigs.shift()?.waiters ?? []) waiter.resolve(event);
        break;
      case "error":
        if (event.event_id) {
          const index = this._sentConfigs.findIndex((sent) => sent.eventId === event.event_id);
          if (index >= 0) {
            for (const waiter of this._sentConfigs.splice(index, 1)[0].waiters) {
              waiter.rollback();
              waiter.reject(Object.assign(new Error(event.message), { event }));
            }
          }
        }
        break;
      case "input.flushed":
        this._flushes.shift()?.resolve(event);
        break;
      case "session.closed":
        if (this._isClosing) this._closed?.resolve(event);
        break;
      default:
        break;
    }
    this._emit(event.type, event);
    this._emit("event", event);
  }

  _onClose({ code, reason }) {
    this._ws = null;
    // Configurations sent but unanswered are applied again by the next session; flushes are lost.
    for (const sent of this._sentConfigs.splice(0)) this._configWaiters.push(...sent.waiters);
    for (const waiter of this._flushes.splice(0)) waiter.reject(new Error(`connection closed (${code})`));
    const limit = this._reachedServer ? this.maxAttempts : this.maxAttemptsBeforeFirstSession;
    const isRetryable = !this._isClosing && this.reconnect && !FINAL_CLOSE_CODES.has(code);
    if (!isRetryable || this._attempt + 1 > limit) {
      this._finish({ code, reason, gaveUp: isRetryable });
      return;
    }
    this._attempt += 1;
    const delayMs = backoffDelayMs(this._attempt, this.backoff, this._random);
    this._setState(ConnectionState.RECONNECTING, { attempt: this._attempt, delayMs, code, reason });
    this._timer = setTimeout(() => this._open(), delayMs);
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
    this._sentConfigs.push({ eventId, waiters });
    this._send({ type: "session.configure", event_id: eventId, ...fields });
  }

  _send(event) {
    if (this._state !== ConnectionState.OPEN || !this._ws) return false;
    this._ws.send(JSON.stringify(event));
    return true;
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
