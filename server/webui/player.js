// Gapless streaming playback of s16 PCM chunks with Web Audio.
//
// The context runs at the stream's own sample rate, so no chunk is resampled on its own, and each
// AudioBuffer starts exactly where the previous one ends (`next`, in context time). A chunk that arrives
// after the scheduled audio has run out is an underrun: counted, and played after a short lead.
import { int16ToFloat } from "./wav.js";

const LEAD_S = 0.05; // first chunk / after an underrun: room to schedule before it must sound

export class PcmPlayer {
  // onState(state): "buffering" | "playing" | "ended" | "stopped"
  constructor(sampleRate, onState) {
    this.context = new AudioContext({ sampleRate });
    this.onState = onState;
    this.next = 0; // context time where the next chunk starts
    this.startedAt = 0; // ... and where the first one did
    this.started = false;
    this.finished = false; // no more chunks will come
    this.underruns = 0;
    this.seconds = 0; // audio scheduled so far
    this.sources = new Set();
    this.state = "";
    this.setState("buffering");
  }

  // Call from the user's click: a context may only start sounding after a gesture.
  resume() {
    this.context.resume().catch(() => {}); // fails only once closed: nothing left to play then
  }

  push(samples) {
    if (this.state === "stopped" || samples.length === 0) return;
    const buffer = this.context.createBuffer(1, samples.length, this.context.sampleRate);
    buffer.copyToChannel(int16ToFloat(samples), 0);
    const now = this.context.currentTime;
    if (!this.started) {
      this.next = now + LEAD_S;
      this.startedAt = this.next;
      this.started = true;
    } else if (this.next < now) {
      this.underruns += 1; // everything scheduled already played: the listener heard a gap
      this.next = now + LEAD_S;
    }
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    source.onended = () => {
      this.sources.delete(source);
      this.maybeEnded();
    };
    source.start(this.next);
    this.sources.add(source);
    this.next += buffer.duration;
    this.seconds += buffer.duration;
    this.setState("playing");
  }

  // No more chunks: "ended" once the last scheduled one has played.
  end() {
    this.finished = true;
    this.maybeEnded();
  }

  stop() {
    if (this.state === "ended" || this.state === "stopped") return;
    for (const source of this.sources) {
      source.onended = null;
      source.stop();
    }
    this.sources.clear();
    this.setState("stopped");
    this.close();
  }

  close() {
    if (this.context.state !== "closed") this.context.close();
  }

  maybeEnded() {
    if (this.finished && this.sources.size === 0 && this.state !== "stopped") {
      this.setState("ended");
      this.close();
    }
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.onState(state);
  }
}
