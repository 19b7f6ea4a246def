// 16-bit mono PCM <-> what the page needs: WAV files and float samples for Web Audio.

// A 44-byte PCM WAV header followed by the samples (Int16Array pieces, in order).
export function wavBlob(pieces, sampleRate) {
  const dataBytes = pieces.reduce((n, p) => n + p.byteLength, 0);
  const header = new DataView(new ArrayBuffer(44));
  const ascii = (offset, text) => [...text].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  header.setUint32(4, 36 + dataBytes, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  header.setUint32(16, 16, true); // fmt chunk size
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, sampleRate, true);
  header.setUint32(28, sampleRate * 2, true); // byte rate
  header.setUint16(32, 2, true); // block align
  header.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  header.setUint32(40, dataBytes, true);
  return new Blob([header, ...pieces.map(littleEndianBytes)], { type: "audio/wav" });
}

export function pcmBlob(pieces) {
  return new Blob(pieces.map(littleEndianBytes), { type: "application/octet-stream" });
}

// Float samples in [-1, 1] (the microphone) -> s16, clipped.
export function floatToInt16(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) {
    const x = Math.max(-1, Math.min(1, floats[i]));
    out[i] = Math.round(x * 32767);
  }
  return out;
}

export function int16ToFloat(samples) {
  const out = new Float32Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = samples[i] / 32768;
  return out;
}

// s16le bytes (what the server sends) -> Int16Array, independent of the machine's byte order.
export function int16FromLittleEndian(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Int16Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true);
  return out;
}

function littleEndianBytes(samples) {
  const view = new DataView(new ArrayBuffer(samples.length * 2));
  for (let i = 0; i < samples.length; i++) view.setInt16(2 * i, samples[i], true);
  return view;
}
