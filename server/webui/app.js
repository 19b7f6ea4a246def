// The page's wiring: token, voice library, synthesis with streaming playback, download.
import { token } from "./api.js";
import { resultBlob } from "./download.js";
import { PcmPlayer } from "./player.js";
import { MAX_SECONDS, Recorder } from "./recorder.js";
import { synthesize } from "./synth.js";
import { deleteVoice, listVoices, uploadVoice } from "./voices.js";

const $ = (id) => document.getElementById(id);

// ---- errors: shown as the API worded them ----
function showError(err) {
  $("error").textContent = err.message || String(err);
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

// Runs an async UI action; any failure lands in the error line.
async function guarded(action) {
  clearError();
  try {
    await action();
  } catch (err) {
    showError(err);
  }
}

// ---- token ----
let tokenTimer = 0;
$("token").value = token.get();
$("token").addEventListener("input", () => {
  token.set($("token").value);
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(() => guarded(refreshVoices), 300);
});

// ---- voice library ----
// The API does not serve stored audio back: voices added in this tab keep their local file to play.
const localAudio = new Map(); // voice id -> blob URL
let recorded = null; // { blob, name } from the microphone, waiting for its transcript

async function refreshVoices(selectId) {
  const voices = await listVoices();
  const select = $("voice-select");
  const keep = selectId || select.value;
  select.replaceChildren(...voices.map((v) => new Option(`${v.text} (${v.filename})`, v.id)));
  if (voices.length === 0) select.append(new Option("no voices yet: add one above", ""));
  if (voices.some((v) => v.id === keep)) select.value = keep;
  $("voice-info").textContent = `${voices.length} voice${voices.length === 1 ? "" : "s"}`;
}

$("voice-refresh").addEventListener("click", () => guarded(refreshVoices));

$("voice-file").addEventListener("change", () => {
  recorded = null; // a chosen file replaces a recording
  const file = $("voice-file").files[0];
  showPreview(file || null);
});

function showPreview(blob) {
  const preview = $("voice-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !blob;
  if (blob) preview.src = URL.createObjectURL(blob);
  else preview.removeAttribute("src");
}

$("voice-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(async () => {
    const file = recorded ? recorded.blob : $("voice-file").files[0];
    const name = recorded ? recorded.name : file && file.name;
    const text = $("voice-text").value.trim();
    if (!file) throw new Error("choose an audio file or record one first");
    if (!text) throw new Error("type the transcript: exactly what the audio says");
    $("voice-submit").disabled = true;
    try {
      const voice = await uploadVoice(file, name, text);
      localAudio.set(voice.id, URL.createObjectURL(file));
      $("voice-form").reset();
      recorded = null;
      showPreview(null);
      $("record-state").textContent = "";
      await refreshVoices(voice.id);
    } finally {
      $("voice-submit").disabled = false;
    }
  });
});

let recorder = null;
let recordTimer = 0;
$("voice-record").addEventListener("click", () => guarded(async () => {
  const button = $("voice-record");
  if (!recorder) {
    recorder = new Recorder();
    try {
      await recorder.start();
    } catch (err) {
      recorder = null;
      throw err;
    }
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Stop recording";
    recordTimer = setInterval(() => {
      $("record-state").textContent = `recording… ${recorder.seconds.toFixed(1)} s`;
      if (recorder.seconds >= MAX_SECONDS - 0.5) button.click();
    }, 200);
    return;
  }
  clearInterval(recordTimer);
  const active = recorder;
  recorder = null;
  button.setAttribute("aria-pressed", "false");
  button.textContent = "Record from microphone";
  const seconds = active.seconds;
  const blob = await active.stop();
  recorded = { blob, name: `recording-${new Date().toISOString().replace(/[:.]/g, "-")}.wav` };
  $("voice-file").value = "";
  showPreview(blob);
  $("record-state").textContent = `recorded ${seconds.toFixed(1)} s: type its transcript and upload`;
}));

const voicePlayer = new Audio();
$("voice-play").addEventListener("click", () => guarded(async () => {
  const id = $("voice-select").value;
  if (!id) throw new Error("no voice selected");
  const url = localAudio.get(id);
  if (!url) {
    $("voice-info").textContent = "The server keeps this voice's audio to itself (the API does not serve it " +
      "back); voices added in this tab can be played.";
    return;
  }
  voicePlayer.src = url;
  await voicePlayer.play();
}));

$("voice-delete").addEventListener("click", () => guarded(async () => {
  const select = $("voice-select");
  const id = select.value;
  if (!id) throw new Error("no voice selected");
  const label = select.selectedOptions[0].textContent;
  if (!confirm(`Delete the voice "${label}"?`)) return;
  await deleteVoice(id);
  if (localAudio.has(id)) URL.revokeObjectURL(localAudio.get(id));
  localAudio.delete(id);
  await refreshVoices();
}));

// ---- synthesis ----
$("mode").addEventListener("change", () => {
  $("instruct").disabled = $("mode").value !== "natural_language_replication";
});

$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("speak-form").requestSubmit();
});

let run = null; // the current or last run: { job, player, pieces, sampleRate }

function setStat(id, value) {
  $(id).textContent = value;
}

function parameters(sampleRate) {
  const mode = $("mode").value;
  const params = {
    mode, reference_audio_id: $("voice-select").value, output_format: "pcm", sample_rate: sampleRate,
    volume: Number($("volume").value), speed: Number($("speed").value),
  };
  if (mode === "natural_language_replication") params.instruct = $("instruct").value.trim();
  return params;
}

$("speak-form").addEventListener("submit", (event) => {
  event.preventDefault();
  guarded(async () => {
    const text = $("text").value.trim();
    if (!$("voice-select").value) throw new Error("add or choose a voice first");
    if (!text) throw new Error("type something to say");
    // All of this runs within the click (no await before the socket opens): the context may sound, and
    // the previous run's stats and download are gone before anything else can look at them.
    if (run) stopRun(); // a new run replaces the one still playing
    resetStats();
    const started = performance.now();
    const sampleRate = Number($("sample-rate").value);
    const player = new PcmPlayer(sampleRate, onPlayerState);
    player.resume();
    const current = { player, pieces: [], sampleRate, active: true, job: null };
    run = current;
    setRunning(true);
    current.job = synthesize(parameters(sampleRate), text, {
      onChunk(samples) {
        if (current.pieces.length === 0) setStat("ttfp-ms", String(Math.round(performance.now() - started)));
        current.pieces.push(samples);
        player.push(samples);
        setStat("chunks", String(current.pieces.length));
        setStat("audio-seconds", player.seconds.toFixed(2));
        setStat("underruns", String(player.underruns));
      },
      onFinished() {
        const wallSeconds = (performance.now() - started) / 1000;
        if (player.seconds > 0) setStat("rtf", (wallSeconds / player.seconds).toFixed(2));
        current.active = false;
        player.end();
        setRunning(false);
        prepareDownload();
      },
      onFailed(err) {
        current.active = false;
        player.stop();
        setStat("player-state", "failed");
        setRunning(false);
        showError(err);
      },
    });
  });
});

// Stop: cancels the task if it is still generating (closing the socket cancels it on the server) and
// silences what is scheduled; what arrived before stays downloadable.
function stopRun() {
  if (!run) return;
  const wasActive = run.active;
  run.active = false;
  if (wasActive) run.job.cancel();
  run.player.stop();
  setRunning(false);
  if (wasActive) prepareDownload();
}

function onPlayerState(state) {
  setStat("player-state", state);
  if (state === "ended" || state === "stopped") $("stop").disabled = true;
}

$("stop").addEventListener("click", stopRun);

function resetStats() {
  for (const [id, value] of [["ttfp-ms", "–"], ["rtf", "–"], ["chunks", "0"], ["audio-seconds", "0.00"],
    ["underruns", "0"]]) setStat(id, value);
  disableDownload();
}

// Speak waits for the generation to end; Stop stays usable until the audio has played out.
function setRunning(running) {
  $("speak").disabled = running;
  if (running) $("stop").disabled = false;
}

// ---- download ----
let downloadGeneration = 0;

function disableDownload() {
  downloadGeneration += 1; // an encode still in flight must not enable the link
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.removeAttribute("href");
  link.setAttribute("aria-disabled", "true");
  link.textContent = `Download ${$("format").value}`;
}

async function prepareDownload() {
  disableDownload();
  if (!run || run.active || run.pieces.length === 0) return;
  const generation = downloadGeneration;
  const format = $("format").value;
  try {
    const blob = await resultBlob(format, run.pieces, run.sampleRate, $("bit-rate").value);
    if (generation !== downloadGeneration) return;
    const link = $("download");
    link.href = URL.createObjectURL(blob);
    link.download = `cosyserve-${new Date().toISOString().replace(/[:.]/g, "-")}.${format}`;
    link.setAttribute("aria-disabled", "false");
    link.textContent = `Download ${format}`;
  } catch (err) {
    showError(err);
  }
}

$("format").addEventListener("change", prepareDownload);
$("bit-rate").addEventListener("change", prepareDownload);

if (token.get()) guarded(refreshVoices);
