// Microphone -> 16-bit WAV, in the browser: getUserMedia -> AudioWorklet (raw samples) -> wavBlob.
import { floatToInt16, wavBlob } from "./wav.js";

export const MAX_SECONDS = 30; // the server refuses longer prompts

export class Recorder {
  constructor() {
    this.pieces = [];
    this.context = null;
    this.stream = null;
    this.node = null;
  }

  get seconds() {
    const samples = this.pieces.reduce((n, p) => n + p.length, 0);
    return this.context ? samples / this.context.sampleRate : 0;
  }

  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser gives no microphone here (it needs https or localhost)");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule("/webui/recorder-worklet.js");
    const source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, "pcm-capture");
    this.node.port.onmessage = (event) => this.pieces.push(event.data);
    source.connect(this.node);
    this.node.connect(this.context.destination); // pulls the graph; the node outputs silence
  }

  // Stops the microphone; resolves with the recording as a WAV Blob at the context's rate.
  async stop() {
    const flushed = new Promise((resolve) => {
      this.node.port.onmessage = (event) => {
        if (event.data instanceof Float32Array) {
          this.pieces.push(event.data); // a block that was on its way
        } else {
          this.pieces.push(event.data.last); // the flush's answer: nothing comes after it
          resolve();
        }
      };
    });
    this.node.port.postMessage("flush");
    await flushed;
    this.stream.getTracks().forEach((track) => track.stop());
    const rate = this.context.sampleRate;
    await this.context.close();
    const samples = this.pieces.map(floatToInt16);
    return wavBlob(samples, rate);
  }
}
