"use strict";
// The playground's decoding fields: what each one is, its allowed range (read from the server's
// OpenAPI schema, the same bounds the server enforces) and the checks run before a request leaves
// the page. Error messages read like the server's: "top_p must be in (0, 1], got 1.5".

const FIELDS = [
  // kind: int | float | bool | stops | ids | json; placeholder: what the server does when empty.
  { name: "max_tokens", label: "Max length", kind: "int", placeholder: "chat: to the end of the context; completion: 16" },
  { name: "min_tokens", label: "Min length", kind: "int", placeholder: "0" },
  { name: "temperature", label: "Temperature", kind: "float", placeholder: "1.0 (0 = greedy)" },
  { name: "top_p", label: "Top-p", kind: "float", placeholder: "1.0" },
  { name: "top_k", label: "Top-k", kind: "int", placeholder: "-1 (off)" },
  { name: "min_p", label: "Min-p", kind: "float", placeholder: "0 (off)" },
  { name: "typical_p", label: "Typical-p", kind: "float", placeholder: "1.0 (off)" },
  { name: "repetition_penalty", label: "Repetition penalty", kind: "float", placeholder: "1.0 (off)" },
  { name: "presence_penalty", label: "Presence penalty", kind: "float", placeholder: "0" },
  { name: "frequency_penalty", label: "Frequency penalty", kind: "float", placeholder: "0" },
  { name: "no_repeat_ngram_size", label: "No-repeat n-gram size", kind: "int", placeholder: "0 (off)" },
  { name: "seed", label: "Seed", kind: "int", placeholder: "random" },
  { name: "n", label: "Choices (n)", kind: "int", placeholder: "1" },
  { name: "best_of", label: "Best of", kind: "int", placeholder: "= n" },
  { name: "stop", label: "Stop strings", kind: "stops", placeholder: "one per line" },
  { name: "stop_token_ids", label: "Stop token ids", kind: "ids", placeholder: "e.g. 2, 13" },
  { name: "logit_bias", label: "Logit bias", kind: "json", placeholder: '{"token id": bias in [-100, 100]}' },
  { name: "ignore_eos", label: "Ignore EOS", kind: "bool", checked: false },
  { name: "skip_special_tokens", label: "Skip special tokens", kind: "bool", checked: true },
  { name: "json_schema", label: "JSON schema (structured output)", kind: "schema",
    placeholder: '{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}' },
];
// Server error params that belong to another element than a field of the same name.
const PARAM_TARGETS = { max_completion_tokens: "max_tokens", messages: "messages", prompt: "prompt",
                        response_format: "json_schema" };

const $ = (id) => document.getElementById(id);
const fieldRanges = {};  // field name -> {minimum, exclusiveMinimum, maximum, exclusiveMaximum, not}

function rangeText(range) {
  const low = range.minimum ?? range.exclusiveMinimum;
  const high = range.maximum ?? range.exclusiveMaximum;
  if (low !== undefined && high !== undefined) {
    return `in ${range.minimum !== undefined ? "[" : "("}${low}, ${high}${range.maximum !== undefined ? "]" : ")"}`;
  }
  if (low !== undefined) return `${range.minimum !== undefined ? ">=" : ">"} ${low}`;
  if (high !== undefined) return `${range.maximum !== undefined ? "<=" : "<"} ${high}`;
  return "";
}

function buildFields() {
  const form = $("fields");
  form.replaceChildren();
  for (const field of FIELDS) {
    const wrapper = document.createElement("label");
    wrapper.className = field.kind === "bool" ? "field checkbox" : "field";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = field.label;
    const range = fieldRanges[field.name];
    // 64-bit bounds (the seed's) say nothing useful on screen; the check still applies.
    const shown = range && Math.max(...Object.values(range).filter(Number.isFinite).map(Math.abs)) < 1e9;
    if (shown && rangeText(range)) {
      const hint = document.createElement("span");
      hint.className = "range";
      hint.textContent = field.name === "top_k" ? "-1 or >= 1" : rangeText(range);
      label.append(" ", hint);
    }
    let input;
    if (field.kind === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = field.checked;
    } else if (field.kind === "stops" || field.kind === "json" || field.kind === "schema") {
      input = document.createElement("textarea");
      input.rows = field.kind === "schema" ? 4 : 2;
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.inputMode = field.kind === "int" ? "numeric" : "decimal";
    }
    input.id = `field-${field.name}`;
    input.name = field.name;
    if (field.placeholder) input.placeholder = field.placeholder;
    input.addEventListener("input", () => clearError(field.name));
    const error = document.createElement("span");
    error.className = "field-error";
    error.id = `error-${field.name}`;
    if (field.kind === "bool") wrapper.append(input, label, error);
    else wrapper.append(label, input, error);
    form.append(wrapper);
  }
}

// Returns [value or undefined when empty, error message or null]; messages match the server's.
function parseField(field) {
  const input = $(`field-${field.name}`);
  if (field.kind === "bool") return [input.checked === field.checked ? undefined : input.checked, null];
  const raw = input.value.trim();
  if (raw === "") return [undefined, null];
  const name = field.name;
  if (field.kind === "int" || field.kind === "float") {
    const value = Number(raw);
    if (!Number.isFinite(value)) return [undefined, `${name} must be a number, got '${raw}'`];
    if (field.kind === "int" && !Number.isInteger(value)) return [undefined, `${name} must be an integer, got ${raw}`];
    const range = fieldRanges[name] || {};
    const ok = (range.minimum === undefined || value >= range.minimum)
      && (range.exclusiveMinimum === undefined || value > range.exclusiveMinimum)
      && (range.maximum === undefined || value <= range.maximum)
      && (range.exclusiveMaximum === undefined || value < range.exclusiveMaximum)
      && (range.not === undefined || value !== range.not.const);
    if (!ok) {
      const allowed = range.not ? `${rangeText(range)} and not ${range.not.const}` : rangeText(range);
      return [undefined, `${name} must be ${allowed}, got ${raw}`];
    }
    return [value, null];
  }
  if (field.kind === "stops") return [raw.split("\n").filter((line) => line !== ""), null];
  if (field.kind === "ids") {
    const ids = raw.split(/[\s,]+/).filter(Boolean).map(Number);
    const bad = ids.find((id) => !Number.isInteger(id) || id < 0);
    return bad === undefined ? [ids, null] : [undefined, `${name} must hold token ids >= 0, got ${bad}`];
  }
  try {
    const value = JSON.parse(raw);
    if (value && typeof value === "object" && !Array.isArray(value)) return [value, null];
  } catch (_) { /* reported below */ }
  if (field.kind === "schema") return [undefined, `${name} must be a JSON schema object, like {"type": "object"}`];
  return [undefined, `${name} must be a JSON object of token id -> bias, like {"13": -100}`];
}

function collectOptions() {
  const options = {};
  let valid = true;
  for (const field of FIELDS) {
    const [value, error] = parseField(field);
    if (error) { showFieldError(field.name, error); valid = false; }
    else if (value !== undefined) options[field.name] = value;
  }
  if (options.min_tokens !== undefined && options.max_tokens !== undefined && options.min_tokens > options.max_tokens) {
    showFieldError("min_tokens", `min_tokens (${options.min_tokens}) must be <= max_tokens (${options.max_tokens})`);
    valid = false;
  }
  if (options.json_schema !== undefined) {  // sent as OpenAI's response_format; the server compiles it
    options.response_format = { type: "json_schema", json_schema: { name: "playground", schema: options.json_schema } };
    delete options.json_schema;
  }
  return valid ? options : null;
}

function showFieldError(param, message) {
  const target = PARAM_TARGETS[param] || param;
  const error = $(`error-${target}`);
  if (!error) return false;
  error.textContent = message;
  const input = $(`field-${target}`);
  if (input) input.classList.add("invalid");
  return true;
}

function clearError(name) {
  const error = $(`error-${name}`);
  if (error) error.textContent = "";
  const input = $(`field-${name}`);
  if (input) input.classList.remove("invalid");
}

function clearAllErrors() {
  for (const field of FIELDS) clearError(field.name);
  clearError("messages");
  clearError("prompt");
  showBanner(null);
}

async function loadRanges() {
  try {
    const schema = await (await fetch("openapi.json")).json();
    const properties = schema.components.schemas.ChatCompletionRequest.properties;
    for (const [name, property] of Object.entries(properties)) {
      const range = {};
      for (const key of ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "not"]) {
        if (property[key] !== undefined) range[key] = property[key];
      }
      if (Object.keys(range).length) fieldRanges[name] = range;
    }
  } catch (_) {
    showBanner("could not read the API schema: the server will still check every option");
  }
  buildFields();
}
