// A brick's model card: its description rendered as a small, safe subset of Markdown
// (paragraphs, headings, lists, code, emphasis, http(s) links) built as DOM nodes, plus
// its examples, tags, license, metrics and LoRA configuration.

import { bytes, facts, h, hash } from "./dom.js";

const INLINE = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\([^)\s]+\))/g;

/** Inline Markdown of one line as nodes (text stays text; only http(s) links become links). */
export function inline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) nodes.push(text.slice(last, match.index));
    const token = match[0];
    if (match[1]) nodes.push(h("code", {}, token.slice(1, -1)));
    else if (match[2]) nodes.push(h("strong", {}, token.slice(2, -2)));
    else if (match[3]) nodes.push(h("em", {}, token.slice(1, -1)));
    else {
      const [, label, href] = token.match(/^\[([^\]]+)\]\(([^)\s]+)\)$/);
      nodes.push(/^https?:\/\//i.test(href) ? h("a", { href, rel: "noopener noreferrer nofollow" }, label) : token);
    }
    last = match.index + token.length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

/** Block Markdown (the description) as nodes. */
export function markdown(source) {
  const out = [];
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^```/.test(line)) {
      const code = [];
      i += 1;
      while (i < lines.length && !/^```/.test(lines[i])) code.push(lines[i++]);
      i += 1;
      out.push(h("pre", {}, h("code", {}, code.join("\n"))));
    } else if (/^#{1,6}\s/.test(line)) {
      // Card headings sit under the page's h2 "Model card": h3 and below.
      const level = Math.min(6, 2 + line.match(/^#+/)[0].length);
      out.push(h(`h${level}`, {}, inline(line.replace(/^#+\s*/, ""))));
      i += 1;
    } else if (/^\s*([-*]|\d+\.)\s+/.test(line)) {
      const ordered = /^\s*\d+\./.test(line);
      const items = [];
      while (i < lines.length && /^\s*([-*]|\d+\.)\s+/.test(lines[i])) {
        items.push(h("li", {}, inline(lines[i].replace(/^\s*([-*]|\d+\.)\s+/, ""))));
        i += 1;
      }
      out.push(h(ordered ? "ol" : "ul", {}, items));
    } else if (!line.trim()) {
      i += 1;
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !/^(```|#{1,6}\s|\s*([-*]|\d+\.)\s+)/.test(lines[i])) {
        para.push(lines[i++]);
      }
      out.push(h("p", {}, inline(para.join(" "))));
    }
  }
  return out;
}

/** The whole card of a brick version (a BrickOut). */
export function brickCard(brick) {
  const metrics = Object.entries(brick.metrics || {});
  const patterns = Object.entries(brick.rank_pattern || {});
  return h(
    "section",
    { class: "card", "aria-labelledby": "card-title" },
    h("h2", { id: "card-title" }, "Model card"),
    h("div", { class: "card-body" }, markdown(brick.description)),
    brick.examples.length
      ? [h("h3", {}, "Example inputs"), h("ul", { class: "examples" }, brick.examples.map((e) => h("li", {}, h("q", {}, e))))]
      : null,
    h("h3", {}, "Adapter"),
    facts([
      ["Base model", h("a", { href: `#/?base_model=${encodeURIComponent(brick.base_model)}` }, brick.base_model)],
      ["Rank", String(brick.rank)],
      ["LoRA alpha", String(brick.lora_alpha) + (brick.use_rslora ? " (rsLoRA)" : "")],
      ["Target modules", brick.target_modules.join(", ")],
      ["Adapted modules", String(brick.module_count)],
      patterns.length ? ["Rank pattern", patterns.map(([k, v]) => `${k}: ${v}`).join(", ")] : null,
      ["Size", bytes(brick.size_bytes)],
      ["Weights sha256", hash(brick.sha256, 16)],
      ["License", brick.license || "not given"],
      ["Tags", brick.tags.length ? brick.tags.map((t) => h("span", { class: "tag" }, t)) : "none"],
    ].filter(Boolean)),
    metrics.length
      ? [
          h("h3", {}, "Metrics"),
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "metric"), h("th", { scope: "col" }, "value"))),
            h("tbody", {}, metrics.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, String(v))))),
          ),
        ]
      : null,
  );
}
