"use strict";
// The ondo playground: a chat tab and a completion tab over the server's OpenAI-compatible API.
// The decoding fields and their checks live in fields.js; a 400 from the server is shown next to
// the field it names. Model output is only ever inserted as text (append / textContent), never as HTML.

const state = { mode: "chat", history: [], modelName: null, controller: null, ready: false };

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

// ---- talking to the server -----------------------------------------------------------------------

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` } : { "Content-Type": "application/json" };
}

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

// Sends one request and streams its choices into `view` (see replyView). Returns usage or null.
async function run(path, body, view) {
  const controller = new AbortController();
  state.controller = controller;
  const started = performance.now();
  let firstTokenAt = null;
  let chunks = 0;
  let usage = null;
  setBusy(true);
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const payload = await response.json().catch(() => ({ error: { message: `HTTP ${response.status}` } }));
      const error = payload.error || { message: `HTTP ${response.status}` };
      if (!showFieldError(error.param, error.message)) showBanner(error.message);
      view.fail();
      return null;
    }
    if (!body.stream) {
      const payload = await response.json();
      firstTokenAt = performance.now();
      for (const choice of payload.choices) {
        if (choice.message && choice.message.reasoning_content) view.reason(choice.index, choice.message.reasoning_content);
        view.append(choice.index, choice.message ? choice.message.content || toolCallsText(choice.message.tool_calls) : choice.text,
                    choice.finish_reason);
      }
      usage = payload.usage;
    } else {
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) { showBanner(chunk.error.message); break; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.reasoning_content) view.reason(choice.index, choice.delta.reasoning_content);
          const text = choice.delta ? choice.delta.content || toolCallsText(choice.delta.tool_calls) : choice.text;
          if (text && firstTokenAt === null) firstTokenAt = performance.now();
          if (text) chunks += 1;
          view.append(choice.index, text || "", choice.finish_reason);
        }
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") showBanner(`request failed: ${error.message}`);
  } finally {
    const stopped = controller.signal.aborted;
    state.controller = null;
    setBusy(false);
    view.done(stopped);
    showStats(started, firstTokenAt, performance.now(), usage ? usage.completion_tokens : chunks, stopped);
  }
  return usage;
}

function showStats(started, firstTokenAt, ended, tokens, stopped) {
  if (firstTokenAt === null) { $("stats").textContent = stopped ? "stopped before the first token" : ""; return; }
  const ttft = firstTokenAt - started;
  const decodeSeconds = (ended - firstTokenAt) / 1000;
  const rate = tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : tokens / ((ended - started) / 1000);
  $("stats").textContent = `${tokens} tokens · ${rate.toFixed(1)} tokens/s · first token ${ttft.toFixed(0)} ms${stopped ? " · stopped" : ""}`;
}

function setBusy(busy) {
  $("send").disabled = busy || !state.ready;
  $("stop").disabled = !busy;
}

// Tool calls shown as text: a call's name when it starts, then its argument chunks.
function toolCallsText(calls) {
  return (calls || []).map((call) => (call.function.name ? `${call.function.name}(` : "") + (call.function.arguments || "")).join("");
}

// A reply area holding one block per choice; text goes in with append(), which never parses HTML.
function replyView(container) {
  const choices = new Map();
  container.classList.add("streaming");
  const block = (index) => {
    if (!choices.has(index)) {
      const element = document.createElement("div");
      element.className = "choice";
      element.dataset.index = String(index);
      const reasoning = document.createElement("span");
      reasoning.className = "reasoning";
      const content = document.createElement("span");
      content.className = "content";
      const finish = document.createElement("span");
      finish.className = "finish";
      element.append(reasoning, content, finish);
      container.append(element);
      choices.set(index, { element, reasoning, content, finish, text: "" });
    }
    return choices.get(index);
  };
  return {
    append(index, text, finishReason) {
      const choice = block(index);
      choice.text += text;
      choice.content.append(text);
      if (finishReason) choice.finish.textContent = finishReason === "length" ? "max length reached" : finishReason === "stop" ? "" : finishReason;
      container.scrollIntoView({ block: "end" });
    },
    reason(index, text) { block(index).reasoning.append(text); },  // the model's <think> part, shown muted
    fail() { container.classList.add("failed"); },
    done(stopped) {
      container.classList.remove("streaming");
      if (stopped) for (const choice of choices.values()) choice.finish.textContent = "stopped";
    },
    text(index) { return choices.has(index) ? choices.get(index).text : ""; },
  };
}

// ---- the two tabs --------------------------------------------------------------------------------

function addMessage(role, text) {
  const list = $("messages");
  list.querySelector(".empty")?.remove();
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  if (text !== undefined) body.textContent = text;
  message.append(who, body);
  list.append(message);
  return { message, body };
}

async function sendChat(options) {
  const input = $("chat-input");
  const text = input.value;
  if (!text.trim()) { showFieldError("messages", "type a message first"); return; }
  const system = $("system-prompt").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, { role: "user", content: text }];
  const user = addMessage("user", text);
  input.value = "";
  const reply = addMessage("assistant");
  const view = replyView(reply.body);
  const stream = !(options.best_of > (options.n || 1));
  const body = { model: state.modelName, messages, stream, ...options };
  if (stream) body.stream_options = { include_usage: true };
  await run("v1/chat/completions", body, view);
  if (reply.body.classList.contains("failed")) {
    user.message.remove();
    reply.message.remove();
    input.value = text;  // give the message back so it can be sent again once fixed
    return;
  }
  state.history.push({ role: "user", content: text }, { role: "assistant", content: view.text(0) });
}

async function sendCompletion(options) {
  const prompt = $("completion-prompt").value;
  if (!prompt) { showFieldError("prompt", "write a prompt first"); return; }
  const output = $("completion-output");
  output.replaceChildren();
  output.classList.remove("failed", "streaming");
  const echo = $("completion-echo").checked;
  const stream = !(options.best_of > (options.n || 1));
  const body = { model: state.modelName, prompt, echo, stream, ...options };
  if (stream) body.stream_options = { include_usage: true };
  await run("v1/completions", body, replyView(output));
}

async function send() {
  if (state.controller || !state.ready) return;
  clearAllErrors();
  $("stats").textContent = "";
  const options = collectOptions();
  if (!options) return;
  if (state.mode === "chat") await sendChat(options);
  else await sendCompletion(options);
}

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.mode === mode;
    tab.classList.toggle("active", active);
    tab.setAttribute("aria-selected", String(active));
  }
  $("chat-panel").hidden = mode !== "chat";
  $("completion-panel").hidden = mode !== "completion";
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  state.history = [];
  const list = $("messages");
  const empty = document.createElement("p");
  empty.className = "empty";
  empty.textContent = "Ask something. Answers stream in token by token.";
  list.replaceChildren(empty);
  $("completion-output").replaceChildren();
  $("stats").textContent = "";
  clearAllErrors();
}

// ---- start-up: health and model name ---------------------------------------------------------------

async function watchHealth() {
  const status = $("status");
  let healthy = false;
  try { healthy = (await fetch("health")).ok; } catch (_) { healthy = false; }
  if (healthy && !state.modelName) {
    const response = await fetch("v1/models", { headers: headers() });
    if (response.ok) state.modelName = (await response.json()).data[0].id;
    else if (response.status === 401) showBanner("this server needs an API key: enter it under Connection");
  }
  state.ready = healthy && Boolean(state.modelName);
  $("model-name").textContent = state.modelName || "";
  status.textContent = state.ready ? "ready" : healthy ? "needs API key" : "loading model…";
  status.className = `status ${state.ready ? "ready" : "loading"}`;
  setBusy(Boolean(state.controller));
  setTimeout(watchHealth, state.ready ? 10000 : 1000);
}

function init() {
  $("api-key").value = localStorage.getItem("ondo-api-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("ondo-api-key", $("api-key").value.trim()); state.modelName = null; });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", clearConversation);
  $("chat-input").addEventListener("input", () => clearError("messages"));
  $("completion-prompt").addEventListener("input", () => clearError("prompt"));
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  $("completion-prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(); }
  });
  loadRanges();
  watchHealth();
}

init();
