// The API as the page uses it: every call carries the token; errors surface as the API words them.

const TOKEN_KEY = "cosyserve.token";

export class ApiError extends Error {
  constructor(message, status = 0, code = "") {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// sessionStorage: the token lives as long as the tab, never in the URL or on disk beyond it.
export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || "",
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
};

// A browser WebSocket cannot send headers: the token rides in the subprotocol offer as base64url
// (the server answers with "cosyserve" alone, never echoing this entry).
export function webSocketProtocols() {
  const bytes = new TextEncoder().encode(token.get());
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  const b64url = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return ["cosyserve", `bearer.${b64url}`];
}

export function webSocketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

// fetch with the bearer token; a non-2xx answer becomes an ApiError carrying the body's `message`.
export async function call(path, { method = "GET", body, headers = {} } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method, body, headers: { ...headers, Authorization: `Bearer ${token.get()}` },
    });
  } catch (err) {
    throw new ApiError(`the server cannot be reached (${err.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") {
      return new ApiError(body.message, response.status, body.code || "");
    }
  } catch {
    // not the API's JSON error (a proxy's page, say): fall through to the status line
  }
  return new ApiError(`HTTP ${response.status} ${response.statusText}`.trim(), response.status);
}
