// Speaks replies aloud with the browser's own speech synthesis (the Web Speech API), one finished sentence at
// a time, as the server sends them: a `segment` event per sentence (docs/protocol.md).
//
// ReplySpeaker keeps its own queue and hands the synthesizer one utterance at a time. The browser's queue
// cannot be edited, only emptied (speechSynthesis.cancel() drops all of it), so cancelling one reply there
// would also drop the next reply's sentences already queued behind it. No DOM access: feed it a
// ProtocolClient's events (speaker.attach(client)) or call handleEvent() yourself.

// A synthesizer that never starts an utterance (no voice, and no event either) or never ends one must not
// hold up the sentences after it. The limit per character is far slower than any voice at rate 1 (about
// 15 characters a second), so only a stuck utterance reaches it.
const START_TIMEOUT_MS = 5000;
const MAX_MS_PER_CHAR = 150;
// Not failures: the events of an utterance that cancel() stopped or dropped.
const CANCEL_ERRORS = new Set(["interrupted", "canceled"]);
// A reply that ends this way is not spoken further; its finished sentences that wait are dropped.
const CANCELLED_END_REASONS = new Set(["cancelled", "session_closed"]);

export class ReplySpeaker {
  /**
   * @param {object} [options]
   * @param {SpeechSynthesis|null} [options.synthesis] the synthesizer (default: window.speechSynthesis)
   * @param {typeof SpeechSynthesisUtterance|null} [options.Utterance] (default: window.SpeechSynthesisUtterance)
   * @param {string|null} [options.lang] BCP 47 language of the utterances (default: the browser's choice)
   * @param {function(ReplySpeaker): void} [options.onChange] called whenever what is spoken or queued changes
   */
  constructor({ synthesis = globalThis.speechSynthesis ?? null,
    Utterance = globalThis.SpeechSynthesisUtterance ?? null, lang = null, onChange = () => {} } = {}) {
    this._synthesis = synthesis;
    this._Utterance = Utterance;
    this.lang = lang;
    this._onChange = onChange;
    this._isEnabled = false;
    this._queue = []; // sentences waiting, in order: {sessionId, turn, index, text}
    this._current = null; // {sentence, utterance, timer} while the synthesizer has one
    this._cancelledReplies = new Set(); // replies whose sentences still to come are not spoken
    this._nextTimer = null;
    this.lastError = null; // the synthesizer's latest failure ("synthesis-failed", "not-allowed", ...)
    this.numSpoken = 0; // sentences the synthesizer finished
  }

  /** Whether this browser has speech synthesis at all. */
  get isSupported() {
    return Boolean(this._synthesis && this._Utterance);
  }

  get isEnabled() {
    return this._isEnabled;
  }

  /** Turns speaking on (from the next sentence that arrives) or off (silent at once, nothing kept). */
  setEnabled(isEnabled) {
    this._isEnabled = Boolean(isEnabled) && this.isSupported;
    if (!this._isEnabled) this.stop();
    this._changed();
  }

  /** The sentence being spoken now, or null. */
  get speaking() {
    return this._current?.sentence ?? null;
  }

  /** The sentences waiting behind it, in order. */
  get queued() {
    return this._queue.slice();
  }

  /** Whether anything is being spoken or waits to be. */
  get isBusy() {
    return this._current !== null || this._queue.length > 0;
  }

  /** Speaks the replies of this client's sessions; returns a function that stops listening. */
  attach(client) {
    return client.on("event", (event) => this.handleEvent(event));
  }

  /** Takes a server event: a `segment` is queued; a reply that ends cancelled is not spoken further. */
  handleEvent(event) {
    if (event.type === "segment") {
      const sentence = { sessionId: event.session_id, turn: event.turn, index: event.index, text: event.text };
      if (!this._isEnabled || this._cancelledReplies.has(replyKey(sentence)) || !sentence.text.trim()) return;
      this._queue.push(sentence);
      this._speakNext();
      this._changed();
    } else if (event.type === "turn_end") {
      const key = replyKey({ sessionId: event.session_id, turn: event.turn });
      if (CANCELLED_END_REASONS.has(event.end_reason)) this._drop((sentence) => replyKey(sentence) === key);
      // A reply's segments all come before its turn_end: nothing of it is left to refuse.
      this._cancelledReplies.delete(key);
    }
  }

  /**
   * Stops speaking one reply: its sentences that wait are dropped, the one being spoken is cut, and the ones
   * still to come from the server are not spoken. Other replies' sentences keep their place.
   */
  cancelReply(sessionId, turn) {
    const key = replyKey({ sessionId, turn });
    this._cancelledReplies.add(key);
    this._drop((sentence) => replyKey(sentence) === key);
  }

  /** Silence now: everything waiting is dropped and the sentence being spoken is cut. Later sentences are spoken. */
  stop() {
    this._drop(() => true);
  }

  // ---- internals ------------------------------------------------------------------------------

  _drop(matches) {
    const before = this._queue.length;
    this._queue = this._queue.filter((sentence) => !matches(sentence));
    const isCut = this._current !== null && matches(this._current.sentence);
    if (isCut) {
      clearTimeout(this._current.timer);
      this._current = null;
      this._synthesis.cancel();
      // The next sentence a task later: the synthesizer settles the cancel (and fires the cut utterance's
      // events, which no longer match this._current) before it gets a new utterance.
      this._scheduleNext();
    }
    if (isCut || this._queue.length !== before) this._changed();
  }

  _scheduleNext() {
    if (this._nextTimer !== null) return;
    this._nextTimer = setTimeout(() => {
      this._nextTimer = null;
      this._speakNext();
    }, 0);
  }

  _speakNext() {
    if (this._current || this._nextTimer !== null || this._queue.length === 0 || !this._isEnabled) return;
    const sentence = this._queue.shift();
    const utterance = new this._Utterance(sentence.text);
    if (this.lang) utterance.lang = this.lang;
    const current = { sentence, utterance, timer: null };
    const finish = (error) => {
      if (this._current !== current) return; // cut by a cancel, or given up on: the queue has moved on
      clearTimeout(current.timer);
      this._current = null;
      if (error) this.lastError = error;
      else this.numSpoken += 1;
      this._speakNext();
      this._changed();
    };
    const giveUp = () => {
      if (this._current !== current) return;
      this.lastError = "timeout";
      this._drop((candidate) => candidate === sentence); // out of the synthesizer too, so it cannot hold the next
    };
    utterance.onstart = () => {
      if (this._current !== current) return;
      this.lastError = null;
      clearTimeout(current.timer);
      current.timer = setTimeout(giveUp, sentence.text.length * MAX_MS_PER_CHAR + START_TIMEOUT_MS);
    };
    utterance.onend = () => finish(null);
    utterance.onerror = (event) => finish(CANCEL_ERRORS.has(event.error) ? null : event.error ?? "error");
    current.timer = setTimeout(giveUp, START_TIMEOUT_MS);
    this._current = current;
    this._synthesis.speak(utterance);
  }

  _changed() {
    try {
      this._onChange(this);
    } catch (error) {
      console.error("ReplySpeaker: the onChange handler failed", error); // speaking goes on
    }
  }
}

function replyKey({ sessionId, turn }) {
  return `${sessionId}:${turn}`;
}
