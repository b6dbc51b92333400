// Compose: the request form (bricks + weights, or an instruction + k; a method with fields
// generated from its parameter schema; output kind), a composition's live progress and
// downloads, and the compositions of this browser session.

import { ApiError, download, get, getToken, path, request } from "./api.js";
import { bytes, facts, h, hash, replace, time } from "./dom.js";
import { paramFields, toJson } from "./schema.js";

const SESSION_KEY = "brickyard.compositions";
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;
const POLL_MS = 400;

/** Compositions requested from this tab: [{id, at, summary}], newest first. */
export function sessionCompositions() {
  try {
    return JSON.parse(sessionStorage.getItem(SESSION_KEY) || "[]");
  } catch {
    return [];
  }
}

function remember(composition) {
  const recipe = composition.recipe || {};
  const bricks = (recipe.bricks || []).map((b) => `${b.name}@${b.version}`).join(", ");
  const entry = { id: composition.id, at: new Date().toISOString(), summary: `${composition.method} · ${composition.output} · ${bricks}` };
  const list = [entry, ...sessionCompositions().filter((c) => c.id !== composition.id)].slice(0, 50);
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(list));
}

/** Parse "name" or "name@3" into {name, version}. */
function brickRef(text) {
  const [name, version] = text.split("@");
  return { name, version: version ? Number(version) : undefined };
}

/**
 * Check the form's request like the API does (ComposeRequest); answers {body, errors}.
 * Pure: `form` is plain data, so the rules are easy to follow.
 */
export function buildRequest(form) {
  const errors = [];
  const body = { base_model: form.base_model, method: form.method, params: form.params, output: form.output };
  if (!NAME.test(form.base_model || "")) errors.push("base_model: choose a base model");
  const weight = (text, where) => {
    const value = Number(text);
    if (text === "" || !Number.isFinite(value)) errors.push(`${where}: must be a number`);
    else if (value < -100 || value > 100) errors.push(`${where}: must be between -100 and 100`);
    return value;
  };
  if (form.source === "bricks") {
    if (!form.bricks.length) errors.push("bricks: add at least one brick");
    if (form.bricks.length > 32) errors.push("bricks: at most 32");
    body.bricks = form.bricks.map((b, i) => {
      if (!NAME.test(b.name || "")) errors.push(`bricks.${i}.name: ${b.name ? "not a valid brick name" : "choose a brick"}`);
      const choice = { name: b.name, weight: weight(String(b.weight).trim(), `bricks.${i}.weight`) };
      if (b.version) choice.version = b.version;
      return choice;
    });
  } else {
    const instruction = (form.instruction || "").trim();
    if (!instruction) errors.push("instruction: describe the task");
    if (instruction.length > 4000) errors.push("instruction: at most 4000 characters");
    body.instruction = instruction;
    const k = Number(form.k);
    if (!Number.isInteger(k) || k < 1 || k > 16) errors.push("k: a whole number from 1 to 16");
    body.k = k;
    const weights = (form.weights || "").split(",").map((w) => w.trim()).filter(Boolean);
    if (weights.length) {
      if (weights.length > 16) errors.push("weights: at most 16");
      body.weights = weights.map((w, i) => weight(w, `weights.${i}`));
    }
  }
  if (form.output === "adapter" && String(form.rank || "").trim()) {
    const rank = Number(form.rank);
    if (!Number.isInteger(rank) || rank < 1 || rank > 8192) errors.push("rank: a whole number from 1 to 8192");
    body.rank = rank;
  }
  return { body, errors };
}

/** The compose form. `?base_model=&brick=name@v` preselect. */
export async function composeView({ query, signal, say, explain, askToken }) {
  const [bases, methods, page] = await Promise.all([
    get("/v1/base-models", { signal }),
    get("/v1/merge-methods", { signal }),
    get("/v1/bricks?limit=200", { signal }),
  ]);
  if (!bases.length) {
    return { title: "Compose", node: h("div", {}, h("h1", {}, "Compose a model"), h("p", {}, "Register a base model and bricks first.")) };
  }
  const preset = query.get("brick");
  const baseSelect = h("select", { id: "compose-base", name: "base_model" }, bases.map((b) => h("option", { value: b.name }, b.name)));
  baseSelect.value = query.get("base_model") || bases[0].name;

  // Bricks: one row per chosen brick (select, version, weight), added and removed by buttons.
  const rows = h("ol", { class: "brick-rows", id: "brick-rows" });
  let rowCounter = 0;
  const bricksOfBase = () => page.items.filter((b) => b.base_model === baseSelect.value);
  function addRow(ref) {
    const n = ++rowCounter;
    // A text field with suggestions, not a select: any brick name is accepted, also one
    // beyond the first page of bricks the suggestions come from.
    const select = h("input", { id: `brick-${n}`, class: "brick-name", list: "brick-names", autocomplete: "off", spellcheck: "false", placeholder: "brick name" });
    const version = h("input", { id: `brick-${n}-version`, class: "brick-version", inputmode: "numeric", placeholder: "latest", autocomplete: "off", size: 6 });
    const weight = h("input", { id: `brick-${n}-weight`, class: "brick-weight", inputmode: "decimal", value: "1", autocomplete: "off", size: 6 });
    if (ref) {
      select.value = ref.name;
      if (ref.version) version.value = String(ref.version);
    }
    const row = h(
      "li",
      { class: "brick-row" },
      h("div", { class: "field grow" }, h("label", { for: select.id }, `Brick ${n}`), select),
      h("div", { class: "field" }, h("label", { for: version.id }, "Version"), version),
      h("div", { class: "field" }, h("label", { for: weight.id }, "Weight"), weight),
      h("button", { type: "button", class: "remove", "aria-label": `Remove brick ${n}`, onclick: () => { row.remove(); addButton.focus(); } }, "Remove"),
    );
    rows.append(row);
    return select;
  }
  const addButton = h("button", { type: "button", onclick: () => addRow().focus() }, "Add a brick");
  const suggestions = h("datalist", { id: "brick-names" });
  const suggest = () =>
    replace(suggestions, bricksOfBase().map((b) => h("option", { value: b.name }, `${b.name} (latest v${b.version}): ${b.description.slice(0, 60)}`)));
  suggest();
  addRow(preset ? brickRef(preset) : null);
  baseSelect.addEventListener("change", suggest);

  const instruction = h("textarea", { id: "compose-instruction", rows: 3, placeholder: "e.g. classify the sentiment of product reviews" });
  const k = h("input", { id: "compose-k", inputmode: "numeric", value: "3", size: 4, autocomplete: "off" });
  const weights = h("input", { id: "compose-weights", placeholder: "softmax of the scores", autocomplete: "off", "aria-describedby": "weights-hint" });
  const bricksPanel = h("div", { id: "source-bricks" }, rows, addButton, suggestions);
  const instructionPanel = h(
    "div",
    { id: "source-instruction", hidden: true },
    h("div", { class: "field" }, h("label", { for: "compose-instruction" }, "Instruction"), instruction),
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "compose-k" }, "k (bricks to merge, 1-16)"), k),
      h("div", { class: "field grow" }, h("label", { for: "compose-weights" }, "Weights (optional, comma separated, in rank order)"), weights, h("p", { class: "hint", id: "weights-hint" }, "Leave empty to weight the found bricks by the softmax of their scores."))),
  );
  const sourceRadios = ["bricks", "instruction"].map((value) =>
    h("label", {}, h("input", {
      type: "radio", name: "source", value, checked: value === "bricks",
      onchange: () => {
        bricksPanel.hidden = value !== "bricks";
        instructionPanel.hidden = value === "bricks";
      },
    }), value === "bricks" ? " Named bricks" : " An instruction (search picks the bricks)"),
  );

  // Method: its parameters' fields come from the JSON schema the API publishes.
  const methodSelect = h("select", { id: "compose-method" }, methods.map((m) => h("option", { value: m.name }, m.name)));
  methodSelect.value = methods.some((m) => m.name === "linear") ? "linear" : methods[0]?.name;
  const methodHint = h("p", { class: "hint", id: "method-hint" });
  const paramsBox = h("div", { id: "method-params" });
  let fields = null;
  function showMethod() {
    const method = methods.find((m) => m.name === methodSelect.value);
    methodHint.textContent = method.description;
    fields = paramFields(method.params, `param-${method.name}`);
    replace(paramsBox, fields.element);
  }
  methodSelect.setAttribute("aria-describedby", "method-hint");
  methodSelect.addEventListener("change", showMethod);
  showMethod();

  const rank = h("input", { id: "compose-rank", inputmode: "numeric", placeholder: "keep all", size: 6, autocomplete: "off" });
  const rankField = h("div", { class: "field", hidden: true }, h("label", { for: "compose-rank" }, "Rank (adapter output)"), rank);
  const outputRadios = [["full", " Full model (base + merged delta)"], ["adapter", " One LoRA adapter"]].map(([value, label]) =>
    h("label", {}, h("input", { type: "radio", name: "output", value, checked: value === "full", onchange: () => (rankField.hidden = value !== "adapter") }), label),
  );

  const errorList = h("div", { id: "compose-errors", class: "form-errors", "aria-live": "polite" });
  const submit = h("button", { type: "submit", class: "primary" }, "Compose");
  const form = h(
    "form",
    { class: "compose", novalidate: true, "aria-label": "Compose a model" },
    h("div", { class: "field" }, h("label", { for: "compose-base" }, "Base model"), baseSelect),
    h("fieldset", {}, h("legend", {}, "Bricks from"), h("div", { class: "toggle" }, sourceRadios), bricksPanel, instructionPanel),
    h("fieldset", {}, h("legend", {}, "Merge method"), h("div", { class: "field" }, h("label", { for: "compose-method" }, "Method"), methodSelect, methodHint), paramsBox),
    h("fieldset", {}, h("legend", {}, "Output"), h("div", { class: "toggle" }, outputRadios), rankField),
    errorList,
    submit,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const source = form.querySelector("input[name=source]:checked").value;
    const output = form.querySelector("input[name=output]:checked").value;
    const { params, errors: paramErrors } = fields.read();
    const { body, errors } = buildRequest({
      base_model: baseSelect.value,
      source,
      bricks: [...rows.querySelectorAll(".brick-row")].map((row) => ({
        name: row.querySelector(".brick-name").value.trim(),
        version: row.querySelector(".brick-version").value.trim() ? Number(row.querySelector(".brick-version").value) : undefined,
        weight: row.querySelector(".brick-weight").value,
      })),
      instruction: instruction.value,
      k: k.value,
      weights: weights.value,
      method: methodSelect.value,
      params,
      output,
      rank: rank.value,
    });
    const all = [...errors, ...paramErrors];
    replace(errorList, all.length ? [h("p", {}, "Please fix:"), h("ul", {}, all.map((e) => h("li", {}, e)))] : null);
    if (all.length) {
      errorList.setAttribute("tabindex", "-1");
      errorList.focus();
      return;
    }
    if (!getToken()) {
      const token = await askToken("Composing is a write: it needs a token with scope write.");
      if (!token) {
        say("Not composed: composing needs a write token.");
        return;
      }
    }
    submit.disabled = true;
    try {
      const composition = await request("POST", "/v1/compositions", { bodyText: toJson(body) });
      remember(composition);
      location.hash = `#/compositions/${composition.id}`;
    } catch (error) {
      if (error instanceof ApiError && error.errors.length) {
        replace(errorList, [h("p", {}, `The server refused: ${error.detail || error.title}`), h("ul", {}, error.errors.map((e) => h("li", {}, e)))]);
      }
      say(explain(error));
    } finally {
      submit.disabled = false;
    }
  });
  return { title: "Compose", node: h("div", {}, h("h1", {}, "Compose a model"), form) };
}

function recipeFacts(composition) {
  const recipe = composition.recipe || {};
  const params = Object.entries(recipe.params || {});
  return facts([
    ["Base model", `${recipe.base_model?.name ?? "?"}`],
    ["Base fingerprint", recipe.base_model?.fingerprint ? hash(recipe.base_model.fingerprint, 16) : "—"],
    ["Method", `${composition.method}${params.length ? ` (${params.map(([k, v]) => `${k}=${v}`).join(", ")})` : ""}`],
    ["Output", `${composition.output}${recipe.rank ? `, rank ${recipe.rank}` : ""}`],
    [
      "Bricks",
      h("ul", { class: "plain" }, (recipe.bricks || []).map((b) => h("li", {}, h("a", { href: `#/bricks/${encodeURIComponent(b.name)}/${b.version}` }, `${b.name}@${b.version}`), ` weight ${b.weight}`))),
    ],
  ]);
}

/** A composition: status with live progress, recipe, and its files once ready. */
export async function compositionView({ args: [id], signal, say, explain }) {
  // The files are asked for with the composition (one round of requests): a composition that
  // is not ready yet answers an error for them, and they are asked for again once it is.
  const filesPath = path("/v1/compositions/{}/files", id);
  let [composition, prefetched] = await Promise.all([get(path("/v1/compositions/{}", id), { signal }), get(filesPath, { signal }).catch(() => null)]);
  const status = h("p", { class: "status", id: "composition-status", role: "status", "aria-live": "polite" });
  const bar = h("progress", { id: "composition-progress", max: "1", value: "0", "aria-label": "Build progress" });
  const files = h("section", { class: "files-box", "aria-labelledby": "cfiles-title" }, h("h2", { id: "cfiles-title" }, "Files"), h("p", { class: "hint" }, "Available when the build is ready."));

  async function showFiles() {
    const list = prefetched || (await get(filesPath, { signal }));
    prefetched = null;
    const columns = ["File", "Size", "Download"];
    const link = (url, name, label) =>
      h("a", { href: url, download: name, onclick: (event) => {
        if (!getToken()) return;
        event.preventDefault();
        download(url, name).catch((error) => say(explain(error)));
      } }, label);
    replace(
      files,
      h("h2", { id: "cfiles-title" }, "Files"),
      h("p", {}, link(composition.archive_url, `${id}.tar`, "Download everything (.tar)"), ` · ${bytes(composition.size_bytes)}`),
      h("table", { class: "responsive", id: "composition-files" },
        h("caption", { class: "visually-hidden" }, "Files"),
        h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, list.map((f) => h("tr", {},
          h("td", { "data-label": "File" }, h("div", {}, h("code", {}, f.path))),
          h("td", { "data-label": "Size" }, h("div", {}, bytes(f.size_bytes))),
          h("td", { "data-label": "Download" }, h("div", {}, link(`${path("/v1/compositions/{}/files", id)}/${f.path.split("/").map(encodeURIComponent).join("/")}`, f.path.split("/").pop(), `Download ${f.path}`))))))),
    );
  }

  function show() {
    bar.value = composition.progress;
    const pct = `${Math.round(composition.progress * 100)}%`;
    status.textContent =
      composition.status === "failed"
        ? `Failed: ${composition.error || composition.message}`
        : `${composition.status} · ${pct}${composition.message && composition.message !== composition.status ? ` · ${composition.message}` : ""}`;
    status.className = `status ${composition.status}`;
  }
  show();
  if (composition.status === "ready") await showFiles();
  else prefetched = null;

  async function poll() {
    while (!signal.aborted && (composition.status === "queued" || composition.status === "running")) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (signal.aborted) return;
      try {
        composition = await get(path("/v1/compositions/{}", id), { signal });
      } catch (error) {
        if (error.name !== "AbortError") say(explain(error));
        return;
      }
      show();
      if (composition.status === "ready") await showFiles().catch((error) => say(explain(error)));
    }
  }

  return {
    title: `Composition ${id.slice(0, 12)}`,
    after: () => poll(),
    node: h(
      "div",
      {},
      h("p", { class: "crumbs" }, h("a", { href: "#/compositions" }, "Compositions"), " / composition"),
      h("h1", {}, "Composition ", h("code", { class: "hash", title: id }, id.slice(0, 12))),
      h("div", { class: "progress-box" }, bar, status),
      h("p", { class: "meta" }, "Requested ", time(composition.created_at), composition.finished_at ? [" · finished ", time(composition.finished_at)] : null),
      h("section", { "aria-labelledby": "recipe-title" }, h("h2", { id: "recipe-title" }, "Recipe"), recipeFacts(composition), h("p", { class: "meta" }, "Id (sha256 of the recipe): ", h("code", { class: "wrap" }, id))),
      files,
    ),
  };
}

/** Past compositions: the server's list when it has one, else those of this tab. */
export async function compositionsView({ signal }) {
  const listed = await get("/v1/compositions?limit=50", { signal }).catch(() => null);
  const serverList = Array.isArray(listed) ? listed : listed && Array.isArray(listed.items) ? listed.items : null;
  const items = serverList
    ? serverList.map((c) => ({ id: c.id, at: c.created_at, summary: `${c.method} · ${c.output} · ${c.status}` }))
    : sessionCompositions();
  const idInput = h("input", { id: "open-id", pattern: "[0-9a-f]{64}", required: true, autocomplete: "off", spellcheck: "false" });
  const open = h(
    "form",
    { class: "filters", onsubmit: (event) => { event.preventDefault(); location.hash = `#/compositions/${idInput.value.trim()}`; } },
    h("div", { class: "field grow" }, h("label", { for: "open-id" }, "Open a composition by id"), idInput),
    h("button", { type: "submit" }, "Open"),
  );
  return {
    title: "Compositions",
    node: h(
      "div",
      {},
      h("h1", {}, "Compositions"),
      serverList ? null : h("p", { class: "hint" }, "This server has no list of compositions (GET /v1/compositions), so this page shows the ones requested from this browser tab."),
      items.length
        ? h("ul", { class: "plain compositions", id: "composition-list" }, items.map((c) => h("li", {}, h("a", { href: `#/compositions/${c.id}` }, h("code", {}, c.id.slice(0, 12))), ` · ${c.summary} · `, time(c.at))))
        : h("p", {}, "None yet. ", h("a", { href: "#/compose" }, "Compose a model")),
      open,
    ),
  };
}
