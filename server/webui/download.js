// The download of a run, from the samples that were played: wav and pcm are assembled here; mp3 is
// encoded by the server's own encoder from those same samples (a second synthesis would differ).
import { call } from "./api.js";
import { pcmBlob, wavBlob } from "./wav.js";

export async function resultBlob(format, pieces, sampleRate, bitRate) {
  if (format === "wav") return wavBlob(pieces, sampleRate);
  if (format === "pcm") return pcmBlob(pieces);
  const query = new URLSearchParams({ sample_rate: String(sampleRate), bit_rate: bitRate });
  const response = await call(`/webui/encode/mp3?${query}`, {
    method: "POST", body: pcmBlob(pieces), headers: { "Content-Type": "application/octet-stream" },
  });
  return new Blob([await response.blob()], { type: "audio/mpeg" });
}
