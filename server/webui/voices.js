// The voice library over the reference-audio API.
import { call } from "./api.js";

const REFERENCE = "/api/v1/audio/reference_audio";

export async function listVoices() {
  const response = await call(`${REFERENCE}?limit=100&order=desc`);
  return response.json();
}

export async function uploadVoice(file, filename, text) {
  const form = new FormData();
  form.append("file", file, filename);
  form.append("text", text);
  const response = await call(REFERENCE, { method: "POST", body: form });
  return response.json();
}

export async function deleteVoice(id) {
  await call(`${REFERENCE}/${encodeURIComponent(id)}`, { method: "DELETE" });
}
