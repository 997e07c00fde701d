// Kiln playground: the browser side of GET /.
//
// Generate mode streams POST /v1/completions (stream: true) through fetch + ReadableStream and
// appends each SSE chunk's text as it arrives. Score mode posts the prompt to /v1/perplexity with
// return_tokens and colours every token by its surprisal (-logprob, in nats). The model name comes
// from GET /v1/models; the API key field is sent as `Authorization: Bearer <key>` and kept for the
// browser tab only (sessionStorage). Nothing here talks to any other host.
"use strict";

const SURPRISAL_FULL_SCALE = 8.0; // nats: tokens this surprising or more get the hottest colour
const KEY_STORAGE = "kiln.apiKey";

const $ = (id) => document.getElementById(id);

const ui = {
  mode: "generate",
  model: null,        // served model name, from /v1/models
  controller: null,   // AbortController of the request in flight
};

// ---- requests -------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 401) message += " (enter the server's API key above)";
  return message;
}

// Server-Sent Events from a fetch body: yields each `data:` payload parsed as JSON, until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop(); // the last piece may be an incomplete line
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (!line.startsWith("data:")) continue; // blank separators and `: ping` comments
        const data = line.slice(5).trimStart();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// ---- the model ------------------------------------------------------------------------------
function setStatus(kind, name, detail) {
  $("status-dot").className = `dot ${kind}`;
  $("model-name").textContent = name;
  $("model-detail").textContent = detail || "";
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    setStatus("bad", "server unreachable", String(e));
    return;
  }
  if (response.status === 401) {
    ui.model = null;
    setStatus("bad", "API key required", "enter it at the top right");
    return;
  }
  if (!response.ok) {
    setStatus("bad", "error", await errorMessage(response));
    return;
  }
  const card = (await response.json()).data[0];
  ui.model = card.id;
  if (card.max_model_len == null) { // still loading: /health says when it is ready
    setStatus("wait", card.id, "loading…");
    setTimeout(loadModel, 1000);
    return;
  }
  setStatus("ok", card.id, `context ${card.max_model_len} tokens`);
}

// ---- output ---------------------------------------------------------------------------------
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function clearOutput() {
  $("output").replaceChildren();
  $("stats").textContent = "";
  showError("");
}

function readNumber(id, integer) {
  const input = $(id);
  // Number(), not parseInt: "1e3" or "12abc" must not quietly become 1 or 12
  const value = input.value.trim() === "" ? NaN : Number(input.value);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value)) ||
      (input.min !== "" && value < Number(input.min)) ||
      (input.max !== "" && value > Number(input.max))) {
    const range = input.max !== "" ? `[${input.min}, ${input.max}]` : `>= ${input.min}`;
    throw new Error(`${input.dataset.name} must be ${integer ? "an integer" : "a number"} in ${range}, ` +
                    `got "${input.value}"`);
  }
  return value;
}

async function generate(prompt, signal) {
  const body = {
    prompt,
    max_tokens: readNumber("max-tokens", true),
    temperature: readNumber("temperature", false),
    top_p: readNumber("top-p", false),
    top_k: readNumber("top-k", true),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (ui.model) body.model = ui.model;
  const started = performance.now();
  const response = await fetch("/v1/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));

  const output = $("output");
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt-text";
  promptSpan.textContent = prompt;
  const completion = document.createElement("span");
  completion.id = "completion";
  completion.className = "completion";
  output.replaceChildren(promptSpan, completion);

  let firstTokenAt = null;
  let finishReason = null;
  let usage = null;
  for await (const chunk of sseEvents(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.text) {
        if (firstTokenAt === null) firstTokenAt = performance.now();
        completion.append(choice.text);
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
    $("stats").textContent = `${completion.textContent.length} characters…`;
  }
  const ended = performance.now();
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (firstTokenAt !== null) parts.push(`first token ${Math.round(firstTokenAt - started)} ms`);
  if (usage && usage.completion_tokens > 1 && firstTokenAt !== null && ended > firstTokenAt) {
    parts.push(`${((usage.completion_tokens - 1) / ((ended - firstTokenAt) / 1000)).toFixed(1)} tokens/s`);
  }
  if (finishReason) parts.push(`finish: ${finishReason}`);
  $("stats").textContent = parts.join(" · ");
}

// A token's bytes: plain text, or OpenAI's `bytes:\xe4\xbd` notation for part of a UTF-8 character.
function tokenBytes(token) {
  const partial = /^bytes:((?:\\x[0-9a-fA-F]{2})+)$/.exec(token);
  if (!partial) return new TextEncoder().encode(token);
  const hex = partial[1].split("\\x").slice(1);
  return Uint8Array.from(hex, (h) => parseInt(h, 16));
}

// Tokens that only hold part of a character are joined with the token that completes it; the group's
// surprisal is the sum of its tokens' (-log p of the whole character).
function groupTokens(tokens) {
  const decoder = new TextDecoder();
  const groups = [];
  let pending = [];
  for (const token of tokens) {
    pending.push(token);
    const text = decoder.decode(tokenBytes(token.token), { stream: true });
    if (text) {
      groups.push({ text, tokens: pending });
      pending = [];
    }
  }
  const rest = decoder.decode();
  if (pending.length) groups.push({ text: rest || "\uFFFD", tokens: pending });
  for (const group of groups) {
    const scored = group.tokens.filter((t) => t.logprob !== null);
    group.surprisal = scored.length ? scored.reduce((sum, t) => sum - t.logprob, 0) : null;
  }
  return groups;
}

function surprisalColour(surprisal) {
  const t = Math.min(Math.max(surprisal / SURPRISAL_FULL_SCALE, 0), 1);
  const hue = Math.round(140 * (1 - t)); // green (expected) -> yellow -> red (surprising)
  return `hsl(${hue} 80% 50% / ${(0.12 + 0.58 * t).toFixed(3)})`;
}

function formatNumber(x) {
  return x >= 1e6 ? x.toExponential(3) : x.toFixed(x >= 100 ? 1 : 3);
}

async function score(text, signal) {
  const body = { input: text, return_tokens: true };
  if (ui.model) body.model = ui.model;
  const response = await fetch("/v1/perplexity", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const item = (await response.json()).data[0];
  const perplexity = formatNumber(item.perplexity);

  const output = $("output");
  output.replaceChildren();
  for (const group of groupTokens(item.tokens)) {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = group.text;
    const pieces = group.tokens.map((t) => JSON.stringify(t.token)).join(" + ");
    if (group.surprisal === null) {
      span.classList.add("unscored");
      span.title = `${pieces}\nfirst token: nothing before it to predict it from\ntext perplexity ${perplexity}`;
    } else {
      span.dataset.surprisal = group.surprisal.toFixed(6);
      span.style.setProperty("background-color", surprisalColour(group.surprisal));
      span.title = `${pieces}\nsurprisal ${group.surprisal.toFixed(3)} nats (p = ` +
                   `${Math.exp(-group.surprisal).toPrecision(3)})\ntext perplexity ${perplexity}`;
    }
    output.append(span);
  }
  $("stats").textContent = `perplexity ${perplexity} · mean NLL ${item.mean_nll.toFixed(4)} nats · ` +
                           `${item.num_tokens} tokens scored`;
  $("stats").dataset.perplexity = String(item.perplexity);
}

// ---- controls -------------------------------------------------------------------------------
function setMode(mode) {
  ui.mode = mode;
  for (const button of document.querySelectorAll(".mode")) {
    button.setAttribute("aria-selected", String(button.dataset.mode === mode));
  }
  $("sampling").disabled = mode === "score";
  $("sampling").hidden = mode === "score";
  $("legend").hidden = mode !== "score";
  $("run").textContent = mode === "score" ? "Score" : "Generate";
  $("prompt-label").textContent = mode === "score" ? "Text to score" : "Prompt";
}

async function run(event) {
  if (event) event.preventDefault();
  if (ui.controller) return;
  const prompt = $("prompt").value;
  clearOutput();
  if (!prompt) {
    showError(ui.mode === "score" ? "Type a text to score." : "Type a prompt.");
    return;
  }
  ui.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  document.body.classList.add("busy");
  try {
    if (ui.mode === "score") await score(prompt, ui.controller.signal);
    else await generate(prompt, ui.controller.signal);
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message || String(e));
    else $("stats").textContent = "stopped";
  } finally {
    ui.controller = null;
    $("run").disabled = false;
    $("stop").disabled = true;
    document.body.classList.remove("busy");
  }
}

function linkRange(rangeId, numberId) {
  const range = $(rangeId);
  const number = $(numberId);
  range.addEventListener("input", () => { number.value = range.value; });
  number.addEventListener("input", () => { range.value = number.value; });
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModel();
  });
  for (const button of document.querySelectorAll(".mode")) {
    button.addEventListener("click", () => setMode(button.dataset.mode));
  }
  $("form").addEventListener("submit", run);
  $("stop").addEventListener("click", () => ui.controller && ui.controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e);
  });
  linkRange("temperature-range", "temperature");
  linkRange("top-p-range", "top-p");
  setMode("generate");
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
