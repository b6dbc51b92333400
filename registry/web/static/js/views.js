// Read-only views: browse (base models + bricks), a base model, a brick, search, and the
// "Try a model" chat. Each view gathers its data first and answers one finished node, so
// nothing moves on screen while data arrives.

import { ApiError, download, get, getToken, path, post, request } from "./api.js";
import { brickCard } from "./card.js";
import { bytes, count, facts, h, hash, highlight, replace, time } from "./dom.js";
import { sessionCompositions } from "./compose.js";

const PAGE = 50;
const CHAT_MAX_TOKENS = 128;

function brickLink(brick, withVersion = true) {
  const label = withVersion ? `${brick.name}@${brick.version}` : brick.name;
  return h("a", { href: `#/bricks/${encodeURIComponent(brick.name)}/${brick.version}` }, label);
}

function table(caption, columns, rows, attrs = {}) {
  return h(
    "table",
    { class: "responsive", ...attrs },
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows),
  );
}

function cells(columns, values) {
  // One wrapper per cell: on phones each cell is a two-column grid (label, value).
  return h("tr", {}, values.map((v, i) => h("td", { "data-label": columns[i] }, h("div", {}, v))));
}

/** The first paragraph of a Markdown description as plain text (for one-line summaries). */
function summary(markdown) {
  const first = markdown.trim().split(/\n\s*\n/)[0];
  return first.replace(/[*`#]+/g, "").replace(/\s+/g, " ").trim();
}

const BRICK_COLUMNS = ["Brick", "Base model", "Description", "Tags", "Rank", "Size", "Updated"];

function brickRow(brick) {
  return cells(BRICK_COLUMNS, [
    brickLink(brick),
    brick.base_model,
    h("span", { class: "clip", title: summary(brick.description) }, summary(brick.description)),
    brick.tags.map((t) => h("span", { class: "tag" }, t)),
    String(brick.rank),
    bytes(brick.size_bytes),
    time(brick.updated_at),
  ]);
}

/** Browse: base models, then bricks filtered by base model and tag, a page at a time. */
export async function browseView({ query, signal, say, explain }) {
  const baseFilter = query.get("base_model") || "";
  const tagFilter = query.get("tag") || "";
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (baseFilter) params.set("base_model", baseFilter);
  if (tagFilter) params.set("tag", tagFilter);
  const [bases, page] = await Promise.all([get("/v1/base-models", { signal }), get(`/v1/bricks?${params}`, { signal })]);

  const baseColumns = ["Name", "Architecture", "Parameters", "dtype", "Size", "Fingerprint", "Aliases"];
  const baseRows = bases.map((b) =>
    cells(baseColumns, [
      h("a", { href: `#/base-models/${encodeURIComponent(b.name)}` }, b.name),
      b.architecture,
      count(b.parameter_count),
      b.dtype,
      bytes(b.size_bytes),
      hash(b.fingerprint),
      b.aliases.length ? b.aliases.join(", ") : "—",
    ]),
  );

  const tbody = h("tbody", {}, page.items.map(brickRow));
  let cursor = page.next_cursor;
  const more = h("button", { type: "button", hidden: !cursor }, "Load more bricks");
  more.addEventListener("click", async () => {
    more.disabled = true;
    try {
      const next = await get(`/v1/bricks?${params}&cursor=${encodeURIComponent(cursor)}`);
      const rows = next.items.map(brickRow);
      tbody.append(...rows);
      cursor = next.next_cursor;
      more.hidden = !cursor;
      rows[0]?.querySelector("a")?.focus();
    } catch (error) {
      say(explain(error));
    } finally {
      more.disabled = false;
    }
  });

  const baseSelect = h(
    "select",
    { id: "filter-base", name: "base_model" },
    h("option", { value: "" }, "any base model"),
    bases.map((b) => h("option", { value: b.name, selected: b.name === baseFilter }, b.name)),
  );
  const tagInput = h("input", { id: "filter-tag", name: "tag", value: tagFilter, autocomplete: "off", spellcheck: "false" });
  const filters = h(
    "form",
    {
      class: "filters",
      role: "search",
      "aria-label": "Filter bricks",
      onsubmit: (event) => {
        event.preventDefault();
        const next = new URLSearchParams();
        if (baseSelect.value) next.set("base_model", baseSelect.value);
        if (tagInput.value.trim()) next.set("tag", tagInput.value.trim().toLowerCase());
        location.hash = `#/?${next}`;
      },
    },
    h("div", { class: "field" }, h("label", { for: "filter-base" }, "Base model"), baseSelect),
    h("div", { class: "field" }, h("label", { for: "filter-tag" }, "Tag"), tagInput),
    h("button", { type: "submit" }, "Filter"),
    baseFilter || tagFilter ? h("a", { href: "#/", class: "reset" }, "Clear filters") : null,
  );

  const brickTable = h(
    "table",
    { class: "responsive", id: "bricks" },
    h("caption", { class: "visually-hidden" }, "Bricks"),
    h("thead", {}, h("tr", {}, BRICK_COLUMNS.map((c) => h("th", { scope: "col" }, c)))),
    tbody,
  );
  return {
    title: "Browse",
    node: h(
      "div",
      {},
      h("h1", {}, "Browse the registry"),
      h(
        "section",
        { "aria-labelledby": "bases-title" },
        h("h2", { id: "bases-title" }, `Base models (${bases.length})`),
        bases.length ? table("Base models", baseColumns, baseRows, { id: "base-models" }) : h("p", {}, "No base model is registered yet."),
      ),
      h(
        "section",
        { "aria-labelledby": "bricks-title" },
        h("h2", { id: "bricks-title" }, "Bricks"),
        filters,
        page.items.length ? brickTable : h("p", { class: "empty" }, baseFilter || tagFilter ? "No brick matches these filters." : "No brick is registered yet."),
        more,
      ),
    ),
  };
}

/** One base model with the shape of every linear module. */
export async function baseModelView({ args: [name], signal }) {
  const base = await get(path("/v1/base-models/{}", name), { signal });
  const modules = Object.entries(base.linear_modules);
  const columns = ["Module", "Out", "In", "Fan-in-fan-out"];
  return {
    node: h(
      "div",
      {},
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Browse"), " / base model"),
      h("h1", {}, base.name),
      base.description ? h("p", {}, base.description) : null,
      facts([
        ["Architecture", base.architecture],
        ["Parameters", count(base.parameter_count)],
        ["dtype", base.dtype],
        ["Size", bytes(base.size_bytes)],
        ["Fingerprint", h("code", { class: "wrap" }, base.fingerprint)],
        ["Aliases", base.aliases.length ? base.aliases.join(", ") : "none"],
        ["Path on the server", h("code", { class: "wrap" }, base.path)],
        ["Registered", [time(base.created_at), base.created_by ? ` by ${base.created_by}` : ""]],
      ]),
      h("p", {}, h("a", { href: `#/?base_model=${encodeURIComponent(base.name)}` }, `Bricks for ${base.name}`)),
      h(
        "section",
        { "aria-labelledby": "modules-title" },
        h("h2", { id: "modules-title" }, `Linear modules (${modules.length})`),
        table("Linear modules", columns, modules.map(([m, s]) => cells(columns, [h("code", {}, m), String(s.out_features), String(s.in_features), s.fan_in_fan_out ? "yes" : "no"]))),
      ),
    ),
  };
}

function downloadLink(url, filename, label, say, explain) {
  return h(
    "a",
    {
      href: url,
      download: filename,
      onclick: (event) => {
        if (!getToken()) return; // a plain link streams the file
        event.preventDefault();
        download(url, filename).catch((error) => say(explain(error)));
      },
    },
    label,
  );
}

/** A brick version: model card, files with checksums, every version, history. */
export async function brickView({ args: [name, version], signal, say, explain }) {
  // One round of requests, not two: the files of the latest version are asked for by the
  // name "latest" instead of waiting for the brick to learn its number.
  const [brick, versions, files, history] = await Promise.all([
    get(version ? path("/v1/bricks/{}/versions/{}", name, version) : path("/v1/bricks/{}", name), { signal }),
    get(`${path("/v1/bricks/{}/versions", name)}?limit=100`, { signal }),
    get(path("/v1/bricks/{}/versions/{}/files", name, version || "latest"), { signal }),
    get(`${path("/v1/bricks/{}/history", name)}?limit=50`, { signal }),
  ]);
  const fileColumns = ["File", "Size", "sha256", "Download"];
  const versionColumns = ["Version", "Description", "Rank", "Created", "By"];
  const historyColumns = ["When", "Who", "What", "Subject"];
  return {
    title: `${brick.name}@${brick.version}`,
    node: h(
      "div",
      {},
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Browse"), " / brick"),
      h("h1", {}, `${brick.name}@${brick.version}`),
      h(
        "p",
        { class: "lead" },
        `For ${brick.base_model} · registered `,
        time(brick.created_at),
        brick.created_by ? ` by ${brick.created_by}` : "",
        " · ",
        h("a", { href: `#/compose?base_model=${encodeURIComponent(brick.base_model)}&brick=${encodeURIComponent(`${brick.name}@${brick.version}`)}` }, "Compose with this brick"),
      ),
      brickCard(brick),
      h(
        "section",
        { "aria-labelledby": "files-title" },
        h("h2", { id: "files-title" }, "Files"),
        table(
          "Files",
          fileColumns,
          files.map((f) =>
            cells(fileColumns, [
              h("code", {}, f.filename),
              bytes(f.size_bytes),
              h("code", { class: "wrap" }, f.sha256),
              downloadLink(path("/v1/bricks/{}/versions/{}/files/{}", brick.name, brick.version, f.filename), f.filename, `Download ${f.filename}`, say, explain),
            ]),
          ),
          { id: "files" },
        ),
      ),
      h(
        "section",
        { "aria-labelledby": "versions-title" },
        h("h2", { id: "versions-title" }, `Versions (${versions.items.length})`),
        table(
          "Versions",
          versionColumns,
          versions.items.map((v) =>
            cells(versionColumns, [
              v.version === brick.version ? h("span", { "aria-current": "true" }, `${v.version} (shown)`) : brickLink(v),
              h("span", { class: "clip" }, summary(v.description)),
              String(v.rank),
              time(v.created_at),
              v.created_by || "—",
            ]),
          ),
          { id: "versions" },
        ),
      ),
      h(
        "section",
        { "aria-labelledby": "history-title" },
        h("h2", { id: "history-title" }, "History"),
        table(
          "History",
          historyColumns,
          history.map((e) => cells(historyColumns, [time(e.at), e.actor || "—", e.action, e.subject])),
          { id: "history" },
        ),
      ),
    ),
  };
}

let focusResults = false; // set by a submit from the form: move focus to what it found

function hitItem(hit, q) {
  return h(
    "li",
    { class: "hit" },
    h(
      "div",
      { class: "hit-head" },
      h("h3", {}, brickLink(hit.brick)),
      h("span", { class: "score", title: `cosine similarity ${hit.similarity.toFixed(3)}` }, `score ${hit.score.toFixed(3)}`),
      h("span", { class: `badge ${hit.matched}` }, `matched ${hit.matched}`),
    ),
    h("blockquote", { class: "matched" }, highlight(hit.text, q)),
    hit.matched === "example" ? h("p", { class: "hint" }, hit.brick.description) : null,
    h("p", { class: "meta" }, `${hit.brick.base_model} · `, hit.brick.tags.map((t) => h("span", { class: "tag" }, t))),
  );
}

/**
 * Search: the query is a task description or an example input; hits best first. The page
 * renders at once; the hits fill a region whose space is reserved, so nothing moves.
 */
export async function searchView({ query, signal, say, explain }) {
  const q = query.get("q") || "";
  const mode = query.get("mode") === "example" ? "example" : "description";
  const baseFilter = query.get("base_model") || "";
  const bases = await get("/v1/base-models", { signal });

  const field =
    mode === "example"
      ? h("textarea", { id: "search-query", name: "q", rows: 4, required: true, placeholder: "Paste an input the model should handle, e.g. an email to translate" }, q)
      : h("input", { id: "search-query", name: "q", type: "search", required: true, value: q, placeholder: "e.g. classify the sentiment of a review", autocomplete: "off" });
  const modes = h(
    "fieldset",
    { class: "toggle" },
    h("legend", {}, "I am typing"),
    ["description", "example"].map((m) =>
      h(
        "label",
        {},
        h("input", {
          type: "radio",
          name: "mode",
          value: m,
          checked: m === mode,
          onchange: () => {
            // Switch the field between a one-line description and a multi-line input.
            const params = new URLSearchParams({ mode: m });
            const current = document.getElementById("search-query").value;
            if (current) params.set("q", current);
            location.hash = `#/search?${params}`;
          },
        }),
        m === "description" ? " a task description" : " an example input",
      ),
    ),
  );
  const baseSelect = h(
    "select",
    { id: "search-base", name: "base_model" },
    h("option", { value: "" }, "any base model"),
    bases.map((b) => h("option", { value: b.name, selected: b.name === baseFilter }, b.name)),
  );
  const form = h(
    "form",
    {
      role: "search",
      "aria-label": "Search bricks",
      class: "search-form",
      onsubmit: (event) => {
        event.preventDefault();
        const params = new URLSearchParams({ q: field.value.trim(), mode });
        if (baseSelect.value) params.set("base_model", baseSelect.value);
        focusResults = true;
        location.hash = `#/search?${params}`;
      },
    },
    modes,
    h("div", { class: "field grow" }, h("label", { for: "search-query" }, mode === "example" ? "Example input" : "Task description"), field),
    h("div", { class: "field" }, h("label", { for: "search-base" }, "Base model"), baseSelect),
    h("button", { type: "submit", class: "primary" }, "Search"),
  );
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });

  const results = h(
    "section",
    { class: "results", "aria-labelledby": "results-title", "aria-busy": q ? "true" : null },
    h("h2", { id: "results-title", tabindex: "-1" }, q ? "Searching…" : "Results"),
    q ? null : h("p", { class: "hint" }, "Describe a task or paste an example input; bricks are ranked best first."),
  );

  async function run() {
    const wantFocus = focusResults;
    focusResults = false;
    let content;
    try {
      const body = { query: q, k: 10, ...(baseFilter ? { base_model: baseFilter } : {}) };
      const result = await post("/v1/search", body, { signal });
      const n = result.hits.length;
      content = [
        h("h2", { id: "results-title", tabindex: "-1" }, `${n} result${n === 1 ? "" : "s"} for “${q}”`),
        n ? h("ol", { class: "hits", id: "hits" }, result.hits.map((hit) => hitItem(hit, q))) : h("p", {}, "No brick matched."),
      ];
    } catch (error) {
      if (error.name === "AbortError") return;
      content = [h("h2", { id: "results-title", tabindex: "-1" }, "Search failed"), h("div", { class: "message error" }, explain(error))];
    }
    replace(results, content);
    results.removeAttribute("aria-busy");
    performance.mark("brickyard:results");
    if (wantFocus) results.querySelector("h2").focus();
  }

  return {
    title: q ? `Search: ${q}` : "Search",
    after: q ? run : null,
    node: h("div", {}, h("h1", {}, "Search bricks"), form, results),
  };
}

/** Which bricks answered, from the response's `brickyard` record (registry.serve.gateway). */
function answeredBy(body) {
  const used = body.brickyard;
  if (!used) return null;
  const bricks = used.bricks || [];
  if (!bricks.length) return `answered by the base model ${used.base_model}${used.note ? ` (${used.note})` : ""}`;
  return `answered by ${bricks.map((b) => `${b.name}@${b.version} (${b.weight})`).join(", ")}`;
}

/** "Try a model": a chat box against /v1/chat/completions, when the server serves models. */
export async function chatView({ signal, say, explain }) {
  // GET on a POST-only route answers 405 when it exists and 404 when it does not.
  const [probe, models] = await Promise.all([
    request("GET", "/v1/chat/completions", { raw: true, signal }).catch((error) => error),
    get("/v1/models", { signal }).catch(() => null),
  ]);
  const absent = probe instanceof ApiError && probe.status === 404;
  if (absent) {
    return {
      title: "Try a model",
      node: h(
        "div",
        {},
        h("h1", {}, "Try a model"),
        h("div", { class: "message info", role: "status" }, "This server does not serve models yet: it has no ", h("code", {}, "/v1/chat/completions"), " route. Compose a model and download it to run it yourself, or update Brickyard to a version with serving."),
      ),
    };
  }
  // The server's own list: it offers plain "auto" only when one base model makes it valid
  // (with several, "auto:<base>" names the base). Routing choices first, then the rest.
  const listed = models && Array.isArray(models.data) ? models.data.map((m) => m.id) : ["auto"];
  const isAuto = (id) => id === "auto" || id.startsWith("auto:");
  const choices = [...listed.filter(isAuto), ...listed.filter((id) => !isAuto(id)), ...sessionCompositions().map((c) => c.id)];
  const label = (id) => (id === "auto" ? "auto (pick bricks for each message)" : id.startsWith("auto:") ? `${id} (pick bricks of ${id.slice(5)})` : id);
  const select = h("select", { id: "chat-model" }, [...new Set(choices)].map((c) => h("option", { value: c }, label(c))));
  const input = h("textarea", { id: "chat-input", rows: 3, required: true });
  // Sampling as the API takes it; temperature 0 is greedy (the same answer every time), and a
  // bound on the answer's length keeps a small model from talking until its context is full.
  const temperature = h("input", { id: "chat-temperature", type: "number", min: "0", max: "2", step: "0.1", value: "1", required: true, inputmode: "decimal" });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: "1", step: "1", value: String(CHAT_MAX_TOKENS), required: true, inputmode: "numeric" });
  const log = h("ol", { class: "chat-log", role: "log", "aria-live": "polite", "aria-label": "Conversation" });
  const messages = [];
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const form = h(
    "form",
    {
      class: "chat-form",
      onsubmit: async (event) => {
        event.preventDefault();
        const text = input.value.trim();
        if (!text) return;
        messages.push({ role: "user", content: text });
        log.append(h("li", { class: "you" }, h("span", { class: "who" }, "You"), h("p", {}, text)));
        input.value = "";
        send.disabled = true;
        try {
          const body = await post("/v1/chat/completions", { model: select.value, messages, temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) });
          const content = body.choices?.[0]?.message?.content ?? "";
          messages.push({ role: "assistant", content });
          const by = answeredBy(body);
          log.append(
            h(
              "li",
              { class: "model" },
              h("span", { class: "who" }, body.model || select.value),
              h("p", {}, content),
              by ? h("p", { class: "meta" }, by) : null,
            ),
          );
        } catch (error) {
          messages.pop();
          if (error instanceof ApiError && (error.status === 404 || error.status === 405)) say("The server stopped serving models (no /v1/chat/completions).");
          else say(explain(error));
        } finally {
          send.disabled = false;
          input.focus();
        }
      },
    },
    h("div", { class: "field" }, h("label", { for: "chat-model" }, "Model"), select),
    h("div", { class: "field grow" }, h("label", { for: "chat-input" }, "Message"), input),
    h("div", { class: "field narrow" }, h("label", { for: "chat-temperature" }, "Temperature"), temperature),
    h("div", { class: "field narrow" }, h("label", { for: "chat-max-tokens" }, "Max tokens"), maxTokens),
    send,
  );
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  return {
    title: "Try a model",
    node: h("div", {}, h("h1", {}, "Try a model"), h("p", { class: "hint" }, "Ctrl+Enter sends."), log, form),
  };
}
