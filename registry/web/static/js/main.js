// The page shell: hash routes -> views, the token dialog, messages, and the render mark
// the browser tests read ("brickyard:rendered", Performance API).

import { ApiError, getToken, onTokenChange, setToken } from "./api.js";
import { compositionsView, compositionView, composeView } from "./compose.js";
import { h, replace } from "./dom.js";
import { baseModelView, brickView, browseView, chatView, searchView } from "./views.js";

const ROUTES = [
  [/^\/?$/, browseView],
  [/^\/base-models\/([^/]+)$/, baseModelView],
  [/^\/bricks\/([^/]+)(?:\/(\d+))?$/, brickView],
  [/^\/search$/, searchView],
  [/^\/compose$/, composeView],
  [/^\/compositions$/, compositionsView],
  [/^\/compositions\/([0-9a-f]{64})$/, compositionView],
  [/^\/chat$/, chatView],
];

const main = document.getElementById("main");
const notice = document.getElementById("notice");
const busy = document.getElementById("busy");
const tokenButton = document.getElementById("token-button");
const tokenDialog = document.getElementById("token-dialog");
const tokenInput = document.getElementById("token-input");
const tokenWhy = document.getElementById("token-why");
const defaultWhy = tokenWhy.textContent;

let generation = 0;
let controller = null;
let firstRender = true;

/** Show `message` (a string or nodes) in the page's alert region; "" clears it. */
export function say(message, kind = "error") {
  replace(notice, message ? h("div", { class: `message ${kind}` }, message) : null);
}

/** A message for an API error: what happened, and for 401/403 what to do about it. */
export function explain(error) {
  if (!(error instanceof ApiError)) return `Unexpected error: ${error.message}`;
  const details = error.errors.length ? h("ul", {}, error.errors.map((e) => h("li", {}, e))) : null;
  if (error.status === 401 || error.status === 403) {
    const what =
      error.status === 401
        ? getToken()
          ? "The server did not accept your token"
          : "This needs an API token"
        : "Your token's scope does not allow this";
    return [
      h("strong", {}, `${error.status} ${error.title}: `),
      `${what}${error.detail ? ` (${error.detail})` : ""}. `,
      h("button", { type: "button", class: "link", onclick: () => askToken() }, "Set a token"),
      details,
    ];
  }
  return [h("strong", {}, error.status ? `${error.status} ${error.title}` : error.title), error.detail ? `: ${error.detail}` : "", details];
}

/** Open the token dialog, optionally saying why; resolves when it closes. */
export function askToken(why) {
  tokenWhy.textContent = why || defaultWhy;
  tokenInput.value = getToken();
  tokenDialog.showModal();
  tokenInput.focus();
  return new Promise((resolve) => tokenDialog.addEventListener("close", () => resolve(getToken()), { once: true }));
}

tokenDialog.addEventListener("close", () => {
  if (tokenDialog.returnValue === "save") setToken(tokenInput.value.trim());
  else if (tokenDialog.returnValue === "clear") setToken("");
  tokenInput.value = "";
  tokenButton.focus();
});
tokenButton.addEventListener("click", () => askToken());
// The skip link must not change the hash: the hash is the route.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

function showToken() {
  tokenButton.textContent = getToken() ? "Token: set" : "Token: none";
}
onTokenChange(() => {
  showToken();
  say("");
  render();
});
showToken();

function parseHash() {
  const raw = decodeURI(location.hash.replace(/^#/, "")) || "/";
  const [route, search = ""] = raw.split("?");
  return { route, query: new URLSearchParams(search) };
}

function markCurrent(route) {
  for (const link of document.querySelectorAll("nav a")) {
    const target = link.getAttribute("href").slice(1);
    const current = target === "/" ? route === "/" || route.startsWith("/bricks") || route.startsWith("/base-models") : route.startsWith(target);
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

/** Render the view of the current hash; the view's whole DOM replaces <main> at once. */
async function render() {
  const mine = ++generation;
  controller?.abort();
  controller = new AbortController();
  const { route, query } = parseHash();
  markCurrent(route);
  main.setAttribute("aria-busy", "true");
  const timer = setTimeout(() => (busy.hidden = false), 150);
  let view;
  try {
    const match = ROUTES.find(([pattern]) => pattern.test(route));
    if (!match) {
      view = { node: h("div", {}, h("h1", {}, "Not found"), h("p", {}, "No page at this address. "), h("a", { href: "#/" }, "Browse bricks")) };
    } else {
      const args = route.match(match[0]).slice(1).map((part) => (part === undefined ? undefined : decodeURIComponent(part)));
      view = await match[1]({ args, query, signal: controller.signal, say, explain, askToken });
    }
  } catch (error) {
    if (error.name === "AbortError") return;
    view = { node: h("div", {}, h("h1", {}, "Could not load this page"), h("div", { class: "message error", role: "alert" }, explain(error))) };
  } finally {
    clearTimeout(timer);
  }
  if (mine !== generation) return;
  busy.hidden = true;
  replace(main, view.node);
  main.removeAttribute("aria-busy");
  main.querySelector("h1")?.setAttribute("tabindex", "-1");
  document.title = `${view.title || main.querySelector("h1")?.textContent || "Brickyard"} · Brickyard`;
  if (!firstRender) (view.focus || main.querySelector("h1") || main).focus({ preventScroll: false });
  firstRender = false;
  view.after?.();
  performance.mark("brickyard:rendered", { detail: { route } });
}

window.addEventListener("hashchange", () => {
  say("");
  render();
});
render();
