// nanoseek chat page: streams /v1/chat/completions over SSE, shows reasoning_content in a collapsible
// "thinking" block above the answer, keeps the conversation (in localStorage), and reports tokens/s.
// Model text is only ever inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "nanoseek.chat.v1";
const state = { model: null, messages: [], controller: null };

function settings() {
  return {
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10) > 0 ? parseInt($("max-tokens").value, 10) : undefined,
    key: $("api-key").value.trim(),
  };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = settings().key;
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function save() {
  const s = settings();
  localStorage.setItem(STORE, JSON.stringify({
    messages: state.messages, temperature: s.temperature, max_tokens: s.max_tokens, key: s.key,
  }));
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function scrollDown() { const m = $("messages"); m.scrollTop = m.scrollHeight; }

// ---- rendering ----------------------------------------------------------------------------------
function addUser(text) {
  const box = el("div", "msg user");
  box.appendChild(el("div", "bubble", text));
  $("messages").appendChild(box);
  scrollDown();
}

function addAssistant(msg) {
  const box = el("div", "msg assistant");
  const think = el("details", "thinking");
  think.open = true;
  const summary = el("summary", null, "Thinking…");
  const thinkText = el("div", "thinking-text");
  think.append(summary, thinkText);
  think.hidden = !msg.reasoning;
  thinkText.textContent = msg.reasoning || "";
  if (msg.reasoning) summary.textContent = "Thought";
  const answer = el("div", "answer", msg.content || "");
  const stats = el("div", "stats", msg.stats || "");
  box.append(think, answer, stats);
  $("messages").appendChild(box);
  scrollDown();
  return { box, think, summary, thinkText, answer, stats };
}

function addError(text) {
  const box = el("div", "msg");
  box.appendChild(el("div", "error", text));
  $("messages").appendChild(box);
  scrollDown();
}

function renderAll() {
  $("messages").replaceChildren();
  for (const m of state.messages) {
    if (m.role === "user") addUser(m.content);
    else addAssistant(m);
  }
}

// ---- talking to the server ------------------------------------------------------------------------
async function errorText(resp) {
  try {
    const body = await resp.json();
    return `${resp.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("model").textContent = "model list: " + (await errorText(r)); return; }
    const card = (await r.json()).data[0];
    state.model = card.id;
    $("model").textContent = `${card.id} · ${card.context_length}-token context`;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// Parse an SSE byte stream into JSON payloads ("data: {...}" lines), calling onEvent for each.
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const s = settings();
  state.messages.push({ role: "user", content: text });
  addUser(text);
  const msg = { role: "assistant", content: "", reasoning: "", stats: "" };
  const view = addAssistant(msg);
  view.box.classList.add("streaming");
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, tThinkEnd = null, usage = null, finish = null;
  state.controller = new AbortController();
  // Send previous answers back without their reasoning, as DeepSeek's API asks.
  const history = state.messages.map((m) => ({ role: m.role, content: m.content }));
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model || undefined, messages: history, stream: true,
        stream_options: { include_usage: true }, temperature: s.temperature, max_tokens: s.max_tokens,
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readSSE(resp, (ev) => {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) usage = ev.usage;
      for (const ch of ev.choices || []) {
        const d = ch.delta || {};
        if (d.reasoning_content) {
          tFirst = tFirst || performance.now();
          msg.reasoning += d.reasoning_content;
          view.think.hidden = false;
          view.thinkText.textContent = msg.reasoning;
        }
        if (d.content) {
          tFirst = tFirst || performance.now();
          if (msg.reasoning && tThinkEnd === null) {
            tThinkEnd = performance.now();
            view.summary.textContent = `Thought for ${((tThinkEnd - t0) / 1000).toFixed(1)} s`;
          }
          msg.content += d.content;
          view.answer.textContent = msg.content;
        }
        if (ch.finish_reason) finish = ch.finish_reason;
      }
      scrollDown();
    });
  } catch (e) {
    if (e.name !== "AbortError") addError(String(e.message || e));
    finish = finish || "stopped";
  } finally {
    const t1 = performance.now();
    if (msg.reasoning && tThinkEnd === null) view.summary.textContent = `Thought for ${((t1 - t0) / 1000).toFixed(1)} s`;
    const n = usage ? usage.completion_tokens : null;
    const decodeS = tFirst ? (t1 - tFirst) / 1000 : 0;
    const parts = [];
    if (n !== null) parts.push(`${n} tokens`);
    if (n !== null && decodeS > 0) parts.push(`${(n / decodeS).toFixed(1)} tok/s`);
    if (tFirst) parts.push(`first token ${Math.round(tFirst - t0)} ms`);
    if (finish && finish !== "stop") parts.push(`finish: ${finish}`);
    msg.stats = parts.join(" · ");
    view.stats.textContent = msg.stats;
    view.box.classList.remove("streaming");
    state.messages.push(msg);
    state.controller = null;
    setBusy(false);
    save();
  }
}

function setBusy(busy) {
  $("send").textContent = busy ? "Stop" : "Send";
  $("send").classList.toggle("secondary", busy);
}

// ---- wiring ---------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  if (state.controller) { state.controller.abort(); return; }  // the server frees the slot
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("temperature").addEventListener("input", () => {
  $("temperature-value").textContent = parseFloat($("temperature").value).toFixed(2);
  save();
});
$("max-tokens").addEventListener("change", save);
$("api-key").addEventListener("change", () => { save(); loadModel(); });
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  renderAll();
  save();
});

(function restore() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    if (Array.isArray(saved.messages)) state.messages = saved.messages;
    if (typeof saved.temperature === "number") $("temperature").value = saved.temperature;
    if (typeof saved.max_tokens === "number") $("max-tokens").value = saved.max_tokens;  // else "auto"
    if (saved.key) $("api-key").value = saved.key;
  } catch (e) { /* a corrupt store starts a fresh chat */ }
  $("temperature-value").textContent = parseFloat($("temperature").value).toFixed(2);
  renderAll();
  loadModel();
})();
