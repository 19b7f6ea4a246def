// One synthesis over the WebSocket duplex API: run-task, then the text (continue-task), then finish-task;
// result-generated chunks stream in until task-finished. Closing the socket cancels the task at once.
import { ApiError, call, webSocketProtocols, webSocketUrl } from "./api.js";
import { int16FromLittleEndian } from "./wav.js";

const WS_PATH = "/api-ws/v1/audio/speech";

function message(action, taskId, payload) {
  return JSON.stringify({ header: { action, task_id: taskId, streaming: "duplex" }, payload });
}

function decodeBase64(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// handlers: onChunk(Int16Array), onFinished(), onFailed(ApiError). Returns { cancel() }.
export function synthesize(parameters, text, handlers) {
  const taskId = crypto.randomUUID();
  const socket = new WebSocket(webSocketUrl(WS_PATH), webSocketProtocols());
  let opened = false;
  let done = false;
  const finish = (fn, arg) => {
    if (done) return;
    done = true;
    socket.close();
    fn(arg);
  };

  socket.onopen = () => {
    opened = true;
    socket.send(message("run-task", taskId, {
      task_group: "audio", task: "tts", function: "SpeechSynthesizer", model: "cosyvoice-v2",
      parameters, input: {},
    }));
  };
  socket.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    const name = msg.header.event;
    if (name === "task-started") {
      socket.send(message("continue-task", taskId, { input: { text } }));
      socket.send(message("finish-task", taskId, { input: {} }));
    } else if (name === "result-generated") {
      handlers.onChunk(int16FromLittleEndian(decodeBase64(msg.payload.output.audio.data)));
    } else if (name === "task-finished") {
      finish(handlers.onFinished);
    } else if (name === "task-failed") {
      finish(handlers.onFailed, new ApiError(msg.header.error_message, 0, msg.header.error_code));
    }
  };
  socket.onclose = async () => {
    if (done) return;
    // A refused upgrade shows the page nothing but a close: ask the API over HTTP for its words.
    finish(handlers.onFailed, opened ? new ApiError("the connection closed before the task finished")
      : await refusalReason());
  };
  return {
    cancel() {
      done = true;
      socket.close(); // the server cancels the running task when the client goes
    },
  };
}

async function refusalReason() {
  try {
    await call("/api/v1/audio/reference_audio?limit=1");
  } catch (err) {
    return err;
  }
  return new ApiError("the server refused the WebSocket connection");
}
