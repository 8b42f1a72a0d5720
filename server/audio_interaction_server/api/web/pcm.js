// PCM helpers shared by the capture worklet and the page: float samples -> int16, framing.
// Pure functions and one small class, no DOM or Web Audio, so they run in an AudioWorklet
// scope and can be checked from a test page alike.

/** The server decodes pcm_s16le as int16 / 32768, so this is its exact inverse:
 * scale by 32768, round to nearest (truncation would bias every sample towards zero
 * and add distortion), clip to the int16 range; NaN becomes silence. */
export function floatToInt16(sample) {
  if (!(sample === sample)) return 0; // NaN
  const scaled = Math.round(sample * 32768);
  return scaled > 32767 ? 32767 : scaled < -32768 ? -32768 : scaled;
}

/** Planar float channels (as Web Audio hands them) -> interleaved int16 samples, written into
 * `out` from sample index `offset`; returns the index after the last one written. */
export function interleaveToInt16(channels, out, offset = 0, start = 0, end = channels[0].length) {
  const numChannels = channels.length;
  let write = offset;
  for (let i = start; i < end; i += 1) {
    for (let c = 0; c < numChannels; c += 1) out[write++] = floatToInt16(channels[c][i]);
  }
  return write;
}

/** Cuts a stream of planar float blocks (any length, e.g. the worklet's 128 frames) into
 * interleaved int16 frames of exactly `frameLength` sample frames; `drain()` returns the
 * partial last frame. The channel count is fixed per framer (a change needs a new framer,
 * since the server must be told the new layout before any frame in it). */
/** Samples per channel in a frame of frameMs at sampleRateHz (at least one): the worklet's and the page's frames. */
export function samplesPerFrame(sampleRateHz, frameMs) {
  return Math.max(1, Math.round((sampleRateHz * frameMs) / 1000));
}

export class PcmFramer {
  constructor(frameLength, numChannels) {
    if (!(frameLength > 0) || !(numChannels > 0)) throw new RangeError("frameLength and numChannels must be > 0");
    this.frameLength = frameLength;
    this.numChannels = numChannels;
    this._frame = new Int16Array(frameLength * numChannels);
    this._filled = 0; // sample frames in _frame
  }

  /** Adds one block (an array of per-channel Float32Arrays); returns the frames completed by it. */
  push(channels) {
    if (channels.length !== this.numChannels) throw new RangeError(`expected ${this.numChannels} channels`);
    const done = [];
    const length = channels[0].length;
    let read = 0;
    while (read < length) {
      const take = Math.min(length - read, this.frameLength - this._filled);
      interleaveToInt16(channels, this._frame, this._filled * this.numChannels, read, read + take);
      this._filled += take;
      read += take;
      if (this._filled === this.frameLength) {
        done.push(this._frame);
        this._frame = new Int16Array(this.frameLength * this.numChannels);
        this._filled = 0;
      }
    }
    return done;
  }

  /** The partial frame collected so far (null when empty); the framer starts afresh. */
  drain() {
    if (this._filled === 0) return null;
    const partial = this._frame.slice(0, this._filled * this.numChannels);
    this._filled = 0;
    return partial;
  }
}

/** Largest absolute sample of an int16 frame, as a 0..1 level for a meter. */
export function peakLevel(frame) {
  let peak = 0;
  for (let i = 0; i < frame.length; i += 1) {
    const value = frame[i] < 0 ? -frame[i] : frame[i];
    if (value > peak) peak = value;
  }
  return peak / 32768;
}
