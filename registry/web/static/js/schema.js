// Form fields generated from a merge method's parameter JSON schema (as pydantic writes it:
// GET /v1/merge-methods), and the same checks the API makes, so mistakes show before a submit.

import { h } from "./dom.js";

/** The property's schema with a nullable `anyOf: [X, {type: null}]` unwrapped. */
function unwrap(prop) {
  if (Array.isArray(prop.anyOf)) {
    const real = prop.anyOf.find((p) => p.type !== "null");
    return { ...prop, ...real, nullable: true };
  }
  return prop;
}

function bounds(prop) {
  const parts = [];
  if (prop.minimum !== undefined) parts.push(`≥ ${prop.minimum}`);
  if (prop.exclusiveMinimum !== undefined) parts.push(`> ${prop.exclusiveMinimum}`);
  if (prop.maximum !== undefined) parts.push(`≤ ${prop.maximum}`);
  if (prop.exclusiveMaximum !== undefined) parts.push(`< ${prop.exclusiveMaximum}`);
  return parts.join(", ");
}

/**
 * Check one raw field value against its property schema.
 * Returns {value} (undefined: leave it to the server's default) or {error}.
 */
export function checkValue(prop, raw, required) {
  prop = unwrap(prop);
  if (prop.type === "boolean") return { value: Boolean(raw) };
  const text = String(raw ?? "").trim();
  if (!text) return required ? { error: "is required" } : { value: undefined };
  if (prop.enum) return prop.enum.includes(text) ? { value: text } : { error: `must be one of ${prop.enum.join(", ")}` };
  if (prop.type === "integer") {
    if (!/^-?\d+$/.test(text)) return { error: "must be a whole number" };
    const big = BigInt(text);
    const fail = rangeError(prop, (limit) => BigInt(Math.trunc(Number(limit))), big);
    if (fail) return { error: fail };
    // Integers past 2^53 (a 63-bit seed) stay exact as BigInt; toJson writes them as digits.
    return { value: big <= BigInt(Number.MAX_SAFE_INTEGER) && big >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big };
  }
  if (prop.type === "number") {
    const value = Number(text);
    if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text) || !Number.isFinite(value)) {
      return { error: "must be a finite number" };
    }
    const fail = rangeError(prop, Number, value);
    return fail ? { error: fail } : { value };
  }
  if (prop.minLength !== undefined && text.length < prop.minLength) return { error: `needs at least ${prop.minLength} characters` };
  if (prop.maxLength !== undefined && text.length > prop.maxLength) return { error: `has at most ${prop.maxLength} characters` };
  if (prop.pattern && !new RegExp(prop.pattern, "u").test(text)) return { error: `must match ${prop.pattern}` };
  return { value: text };
}

function rangeError(prop, convert, value) {
  // Integers compare as BigInt. A bound past 2^53 (a seed's 2^63 - 1) arrives rounded by
  // JSON.parse, so the last few values below it are left for the server to refuse.
  const limit = (key) => convert(prop[key]);
  if (prop.minimum !== undefined && value < limit("minimum")) return `must be ≥ ${prop.minimum}`;
  if (prop.exclusiveMinimum !== undefined && value <= limit("exclusiveMinimum")) return `must be > ${prop.exclusiveMinimum}`;
  if (prop.maximum !== undefined && value > limit("maximum")) return `must be ≤ ${prop.maximum}`;
  if (prop.exclusiveMaximum !== undefined && value >= limit("exclusiveMaximum")) return `must be < ${prop.exclusiveMaximum}`;
  return null;
}

/** JSON text of `value`, writing BigInt values as plain JSON integers. */
export function toJson(value) {
  const marked = JSON.stringify(value, (_, v) => (typeof v === "bigint" ? `\u0000big:${v}` : v));
  return marked.replace(/"\\u0000big:(-?\d+)"/g, "$1");
}

/**
 * Fields for every property of `schema`. Returns {element, read()} where read() answers
 * {params, errors: ["params.x: ..."]} and marks each bad field (aria-invalid + message).
 */
export function paramFields(schema, idPrefix) {
  const props = Object.entries(schema.properties || {});
  const required = new Set(schema.required || []);
  const rows = props.map(([name, rawProp]) => {
    const prop = unwrap(rawProp);
    const id = `${idPrefix}-${name}`;
    const hintId = `${id}-hint`;
    const errorId = `${id}-error`;
    const label = prop.title || name;
    let input;
    if (prop.type === "boolean") {
      input = h("input", { id, type: "checkbox", name, "aria-describedby": hintId });
      input.checked = Boolean(prop.default);
    } else if (prop.enum) {
      input = h("select", { id, name, "aria-describedby": hintId }, prop.enum.map((v) => h("option", { value: v }, v)));
      if (prop.default !== undefined) input.value = prop.default;
    } else {
      const numeric = prop.type === "number" || prop.type === "integer";
      input = h("input", {
        id,
        name,
        type: "text",
        inputmode: prop.type === "integer" ? "numeric" : numeric ? "decimal" : null,
        value: prop.default !== undefined && prop.default !== null ? String(prop.default) : "",
        "aria-describedby": `${hintId} ${errorId}`,
        autocomplete: "off",
      });
    }
    const hint = [prop.description, bounds(prop), prop.default !== undefined ? `default ${prop.default}` : ""]
      .filter(Boolean)
      .join(" · ");
    const error = h("p", { class: "field-error", id: errorId });
    const row = h(
      "div",
      { class: prop.type === "boolean" ? "field check" : "field" },
      h("label", { for: id }, `${label}${required.has(name) ? " (required)" : ""}`),
      input,
      h("p", { class: "hint", id: hintId }, hint),
      error,
    );
    return { name, prop: rawProp, input, error, row };
  });
  function read() {
    const params = {};
    const errors = [];
    for (const { name, prop, input, error } of rows) {
      const raw = input.type === "checkbox" ? input.checked : input.value;
      const result = checkValue(prop, raw, required.has(name));
      error.textContent = result.error ? `${name} ${result.error}` : "";
      if (result.error) {
        input.setAttribute("aria-invalid", "true");
        errors.push(`params.${name}: ${result.error}`);
      } else {
        input.removeAttribute("aria-invalid");
        if (result.value !== undefined) params[name] = result.value;
      }
    }
    return { params, errors };
  }
  const element = rows.length
    ? h("div", { class: "params" }, rows.map((r) => r.row))
    : h("p", { class: "hint" }, "This method has no parameters.");
  return { element, read };
}
