// Audio sources for the page: the microphone or a decoded file, both played in real time through
// the same AudioWorklet (pcm-worklet.js), which hands back int16 frames at the context's native rate.
// A page that is not a secure context (http:// from another host) has no AudioWorklet and no microphone: there a
// file is framed here, with the worklet's framer, and paced by the clock.

import { PcmFramer, peakLevel, samplesPerFrame } from "./pcm.js";

const WORKLET_URL = new URL("./pcm-worklet.js", import.meta.url);

export class AudioCapture {
  /**
   * @param {object} callbacks
   * @param {(pcm: Int16Array, peak: number) => void} callbacks.onFrame interleaved int16 PCM, one frame
   * @param {(format: {sampleRateHz: number, numChannels: number}) => void} callbacks.onFormat
   *   called before the first frame and whenever the layout changes
   * @param {number} [frameMs=20] frame length
   * @param {number} [maxChannels=2] more channels are down-mixed to this many (the server averages to mono)
   */
  constructor({ onFrame, onFormat, frameMs = 20, maxChannels = 2 }) {
    this.onFrame = onFrame;
    this.onFormat = onFormat;
    this.frameMs = frameMs;
    this.maxChannels = maxChannels;
    this.context = null;
    this.node = null;
    this.kind = null; // "microphone" | "file"
    this.format = null; // {sampleRateHz, numChannels} of the frames being produced
    this._stream = null;
    this._source = null;
    this._drained = null;
  }

  get isRunning() {
    return this.context !== null;
  }

  /** Captures the default microphone, unprocessed, at the browser's own rate (never forced to 16 kHz). */
  async startMicrophone() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("this page cannot use the microphone: it needs a secure context (https:// or localhost)");
    }
    // The model was trained on plain recordings; the browser's voice-call processing would alter them.
    const constraints = { audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } };
    try {
      this._stream = await navigator.mediaDevices.getUserMedia(constraints);
    } catch (error) {
      throw microphoneError(error);
    }
    try {
      await this._open("microphone");
      this._source = new MediaStreamAudioSourceNode(this.context, { mediaStream: this._stream });
      this._source.connect(this.node);
    } catch (error) {
      await this.stop();
      throw error;
    }
  }

  /**
   * Streams a file in real time through the same path as the microphone.
   * @param {Blob} file any format the browser decodes (wav, mp3, ogg, ...)
   * @param {{monitor?: boolean}} options monitor: also play it through the speakers
   * @returns {Promise<void>} resolves when the whole file has gone out as frames
   */
  async startFile(file, { monitor = false } = {}) {
    await this._open("file");
    try {
      // decodeAudioData resamples to the context's rate, so frames come out at the native rate here too.
      const buffer = await decodeFile(this.context, file);
      if (!this.node) return await this._streamDecoded(buffer, monitor);
      this._source = new AudioBufferSourceNode(this.context, { buffer });
      this._source.connect(this.node);
      if (monitor) this._source.connect(this.context.destination);
      const finished = new Promise((resolve) => {
        this._source.onended = () => this._drain().then(resolve);
      });
      this._source.start();
      return await finished;
    } catch (error) {
      await this.stop();
      throw error;
    }
  }

  /** Stops the source and releases the microphone; frames still in the worklet are dropped. */
  async stop() {
    this._stream?.getTracks().forEach((track) => track.stop());
    if (this._source) {
      this._source.onended = null;
      this._source.disconnect();
    }
    const context = this.context;
    this.context = this.node = this._source = this._stream = this.kind = this.format = null;
    if (context && context.state !== "closed") await context.close();
  }

  async _open(kind) {
    if (this.context) throw new Error("capture already running");
    // No sampleRate option: the context runs at the hardware's rate (44.1 or 48 kHz typically) and
    // the server resamples; asking the browser for 16 kHz would resample twice.
    this.context = new AudioContext({ latencyHint: "interactive" });
    this.kind = kind;
    if (!this.context.audioWorklet) {
      // Browsers offer AudioWorklet only to secure contexts (https://, or localhost), as they do the microphone.
      if (kind === "microphone") throw new Error("this page cannot use the microphone: it needs a secure context");
      if (this.context.state === "suspended") await this.context.resume();
      return; // a file is framed by _streamDecoded
    }
    await this.context.audioWorklet.addModule(WORKLET_URL);
    // No outputs: such a worklet node is pulled by the renderer without a path to the speakers.
    this.node = new AudioWorkletNode(this.context, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: this.maxChannels,
      channelCountMode: "clamped-max",
      channelInterpretation: "speakers",
      processorOptions: { frameMs: this.frameMs },
    });
    this.node.port.onmessage = (message) => this._onMessage(message.data);
    if (this.context.state === "suspended") await this.context.resume();
  }

  _onMessage(data) {
    if (data.type === "format") {
      this.format = { sampleRateHz: data.sampleRateHz, numChannels: data.numChannels };
      this.onFormat?.(this.format);
    } else if (data.type === "frame") {
      this.onFrame?.(data.pcm, data.peak);
    } else if (data.type === "drained") {
      this._drained?.();
      this._drained = null;
    }
  }

  /**
   * A decoded file without the worklet: the frames the worklet would cut (at the context's rate, more than
   * maxChannels channels averaged to one), each handed to onFrame when its last sample is due, as if played.
   * Timers of a background tab run late: the frames then go out in bursts, which the server takes.
   */
  async _streamDecoded(buffer, monitor) {
    const context = this.context;
    const planar = Array.from({ length: buffer.numberOfChannels }, (_, c) => buffer.getChannelData(c));
    const channels = planar.length <= this.maxChannels ? planar : [averaged(planar)];
    this.format = { sampleRateHz: buffer.sampleRate, numChannels: channels.length };
    this.onFormat?.(this.format);
    const frameLength = samplesPerFrame(buffer.sampleRate, this.frameMs);
    const framer = new PcmFramer(frameLength, channels.length);
    if (monitor) {
      this._source = new AudioBufferSourceNode(context, { buffer });
      this._source.connect(context.destination);
      this._source.start();
    }
    const startMs = performance.now();
    for (let start = 0; start < buffer.length; start += frameLength) {
      const end = Math.min(buffer.length, start + frameLength);
      const waitMs = startMs + (end / buffer.sampleRate) * 1000 - performance.now();
      if (waitMs > 0) await new Promise((resolve) => setTimeout(resolve, waitMs));
      if (this.context !== context) return; // stopped meanwhile
      for (const frame of framer.push(channels.map((channel) => channel.subarray(start, end)))) {
        this.onFrame?.(frame, peakLevel(frame));
      }
    }
    const partial = framer.drain();
    if (partial) this.onFrame?.(partial, peakLevel(partial));
  }

  /** Asks the worklet for its partial frame; resolves after that frame was handed to onFrame. */
  _drain() {
    if (!this.node) return Promise.resolve();
    return new Promise((resolve) => {
      this._drained = resolve;
      this.node.port.postMessage({ type: "drain" });
    });
  }
}

function averaged(planar) {
  const mono = new Float32Array(planar[0].length);
  for (const channel of planar) for (let i = 0; i < mono.length; i += 1) mono[i] += channel[i] / planar.length;
  return mono;
}

/**
 * The browser's refusal of the microphone as an Error whose message says the way out, and whose code names it
 * (the page shows both): its own message ("Permission denied") does not say what to do.
 */
function microphoneError(error) {
  const reasons = {
    NotAllowedError: ["microphone_blocked", "the browser blocks the microphone for this page: allow it (the icon " +
      "beside the address, or the site's settings) and press Start again, or choose Audio file"],
    NotFoundError: ["no_microphone", "no microphone was found: connect one and press Start again, or choose Audio file"],
    NotReadableError: ["microphone_unavailable", "the microphone cannot be read (another program may hold it): " +
      "free it and press Start again, or choose Audio file"],
  };
  const [code, message] = reasons[error?.name] ?? ["start_failed", error?.message ?? String(error)];
  return Object.assign(new Error(message), { code });
}

/**
 * ``file`` decoded at ``context``'s rate; a file the browser cannot decode (not audio, an empty WAV, a codec it
 * lacks) is an Error that names the file and says what would work, with code ``undecodable_file``.
 */
async function decodeFile(context, file) {
  try {
    return await context.decodeAudioData(await file.arrayBuffer());
  } catch (error) {
    const message = `${file.name}: this browser cannot decode it as audio (${error?.message ?? error}); ` +
      "choose a WAV, MP3, Ogg or FLAC file with sound in it";
    throw Object.assign(new Error(message), { code: "undecodable_file" });
  }
}
