// AudioWorklet processor: the audio it receives, at the context's own rate, leaves as int16 frames.
// Runs on the audio rendering thread, so it only converts and frames; the page does the I/O.
//
// Messages to the page: {type: "format", numChannels, sampleRateHz} before the first frame and
// whenever the channel count changes; {type: "frame", pcm: Int16Array (transferred), peak};
// {type: "drained"} after a "drain" request has pushed out the partial frame.

import { PcmFramer, peakLevel, samplesPerFrame } from "./pcm.js";

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const frameMs = options.processorOptions?.frameMs ?? 20;
    this.frameLength = samplesPerFrame(sampleRate, frameMs); // sampleRate: the worklet global scope's
    this.framer = null;
    this.port.onmessage = (message) => {
      if (message.data?.type === "drain") {
        this._drain();
        this.port.postMessage({ type: "drained" });
      }
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // nothing connected (yet): no samples, no frames
    if (this.framer === null || this.framer.numChannels !== channels.length) {
      this._drain(); // frames in the old layout go out before the new layout is announced
      this.framer = new PcmFramer(this.frameLength, channels.length);
      this.port.postMessage({ type: "format", numChannels: channels.length, sampleRateHz: sampleRate });
    }
    for (const frame of this.framer.push(channels)) this._post(frame);
    return true;
  }

  _drain() {
    const partial = this.framer?.drain();
    if (partial) this._post(partial);
  }

  _post(frame) {
    this.port.postMessage({ type: "frame", pcm: frame, peak: peakLevel(frame) }, [frame.buffer]);
  }
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
