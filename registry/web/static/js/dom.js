// Building the page from data without ever parsing untrusted text as HTML: every string
// becomes a text node. (No innerHTML anywhere in this page.)

/**
 * Create an element. `attrs`: attributes, except `on*` functions (listeners), `class`,
 * and booleans (present when true). Children: nodes, strings (text), arrays, null (skipped).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (value === true) el.setAttribute(key, "");
    else if (key === "value" && "value" in el) el.value = value;
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** 1536 -> "1.5 KB" (powers of 1024, like `ls -h`). */
export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let value = n;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i += 1;
  }
  return i === 0 ? `${n} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[i]}`;
}

/** 1234567 -> "1,234,567". */
export function count(n) {
  return Number(n).toLocaleString("en-US");
}

// One formatter for every date: building an Intl formatter per call costs more than the rest
// of a table row.
const DATES = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

/** An ISO timestamp as a <time> element, shown in the reader's locale. */
export function time(iso) {
  if (!iso) return "—";
  return h("time", { datetime: iso }, DATES.format(new Date(iso)));
}

/** A long hash shortened for reading, complete in a title and for copying. */
export function hash(value, length = 12) {
  return h("code", { class: "hash", title: value }, value.length > length ? `${value.slice(0, length)}…` : value);
}

const STOP = new Set("a an and are as at be by for from in into is it of on or the this to with".split(" "));

/** The lower-case words of `query` worth highlighting (no stop words, at least 2 letters). */
export function queryTerms(query) {
  const words = (query.toLowerCase().match(/[\p{L}\p{N}]+/gu) || []).filter((w) => w.length > 1 && !STOP.has(w));
  return [...new Set(words)];
}

/** `text` as nodes with every word that shares a stem with a query term inside <mark>. */
export function highlight(text, query) {
  const terms = queryTerms(query);
  if (!terms.length) return [text];
  // A crude stem (the word less up to 3 final letters, at least 4 kept): "emails" marks "email".
  const stems = terms.map((t) => t.slice(0, Math.max(4, t.length - 3)));
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(/[\p{L}\p{N}]+/gu)) {
    const word = match[0].toLowerCase();
    const hit = terms.includes(word) || (word.length > 3 && stems.some((s) => s.length > 3 && word.startsWith(s)));
    if (!hit) continue;
    if (match.index > last) nodes.push(text.slice(last, match.index));
    nodes.push(h("mark", {}, match[0]));
    last = match.index + match[0].length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

/** A description list from [term, value] pairs (values: nodes or strings). */
export function facts(pairs, attrs = {}) {
  return h("dl", { class: "facts", ...attrs }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}
