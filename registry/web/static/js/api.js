// Talking to the REST API: one fetch wrapper that adds the token, turns RFC 9457 problems
// into ApiError, and remembers whether reads turned out to need a token.

const TOKEN_KEY = "brickyard.token";
const listeners = new Set();

/** The token of this tab (sessionStorage: gone when the tab closes, never in a URL). */
export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

/** Store (or with "" forget) the token and tell whoever listens. */
export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  for (const listener of listeners) listener(token);
}

/** Call `listener(token)` whenever the token changes. */
export function onTokenChange(listener) {
  listeners.add(listener);
}

/** An error answer of the API (problem+json), or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, title, detail, errors = []) {
    super(detail || title);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.errors = errors;
  }
}

function headers(extra = {}) {
  const token = getToken();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function problem(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's error page): the status line is all there is
  }
  return new ApiError(
    response.status,
    body.title || response.statusText || "Error",
    body.detail || "",
    Array.isArray(body.errors) ? body.errors : [],
  );
}

/** The response of a request early.js started for `path` with the current token, once. */
function early(path) {
  const started = window.brickyardEarly;
  if (!started || !(path in started.requests) || (started.token || "") !== getToken()) return null;
  const response = started.requests[path];
  delete started.requests[path];
  return response;
}

/**
 * Send a request; answers the parsed JSON body (or the Response with `raw`).
 * `body` is sent as JSON; `bodyText` as-is (already JSON).
 */
export async function request(method, path, { body, bodyText, raw = false, signal } = {}) {
  const init = { method, headers: headers({ Accept: "application/json" }), signal };
  if (body !== undefined || bodyText !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = bodyText !== undefined ? bodyText : JSON.stringify(body);
  }
  let response;
  try {
    response = (method === "GET" && (await early(path))) || (await fetch(path, init));
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Server unreachable", `${method} ${path} failed: ${error.message}`);
  }
  if (!response.ok) throw await problem(response);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

export const get = (path, options) => request("GET", path, options);
export const post = (path, body, options = {}) => request("POST", path, { ...options, body });

/** `/v1/...` with each part of `parts` URL-encoded. */
export function path(template, ...parts) {
  return template.replace(/\{\}/g, () => encodeURIComponent(String(parts.shift())));
}

/**
 * Download `url` as `filename`. Without a token a plain navigation streams it (any size);
 * with one, the bytes are fetched with the Authorization header (a link cannot carry it).
 */
export async function download(url, filename) {
  const a = document.createElement("a");
  a.download = filename;
  if (!getToken()) {
    a.href = url;
    a.click();
    return;
  }
  const response = await request("GET", url, { raw: true });
  const blobUrl = URL.createObjectURL(await response.blob());
  a.href = blobUrl;
  a.click();
  setTimeout(() => URL.revokeObjectURL(blobUrl), 60_000);
}
