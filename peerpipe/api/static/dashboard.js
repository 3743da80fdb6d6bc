// The dashboard: a live view of the room (Server-Sent Events from /api/events) and a chat box
// that streams answers from /v1/chat/completions. Plain DOM code, so it runs with no build step.
"use strict";

const COLORS = ["#6aa7ff", "#3fb67b", "#e0a23a", "#c58af9", "#4fd1c5", "#f27aa0", "#a3c65a", "#ff9966"];
const $ = (sel) => document.querySelector(sel);
let room = null;
let feed = null;
const history = [];

function apiKey() { return localStorage.getItem("peerpipe-key") || ""; }
function authHeaders() { const k = apiKey(); return k ? { Authorization: "Bearer " + k } : {}; }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function layers(s) { return s.end - s.start === 1 ? `layer ${s.start}` : `layers ${s.start}–${s.end - 1}`; }

// A small but real value (a phone's 0.003 TFLOPS) keeps two significant digits instead of reading 0.00.
function fmt(x, digits = 1) {
  if (x === null || x === undefined) return "–";
  const n = Number(x);
  return n !== 0 && Math.abs(n) < 10 ** -digits ? n.toPrecision(2) : n.toFixed(digits);
}

function connect() {
  if (feed) feed.close();
  const key = apiKey();
  feed = new EventSource("/api/events" + (key ? "?key=" + encodeURIComponent(key) : ""));
  feed.addEventListener("room", (e) => { room = JSON.parse(e.data); render(room); });
  feed.onerror = async () => {
    $("#state").textContent = "disconnected";
    $("#state").className = "pill waiting";
    const r = await fetch("/api/room", { headers: authHeaders() }).catch(() => null);
    if (r && r.status === 401) { feed.close(); $("#key-form").hidden = false; }
  };
}

function render(r) {
  $("#code").textContent = r.code;
  $("#model").textContent = r.model ? `${r.model.id} (${r.model.layers} layers, ${r.model.dtype})` : "none";
  $("#state").textContent = r.ready ? "ready" : "planning";
  $("#state").className = "pill " + (r.ready ? "ready" : "waiting");
  const rec = r.recovery;
  const failovers = rec && rec.failovers ? ` · failovers ${rec.failovers} (stalled ${rec.stall_s.toFixed(1)} s)` : "";
  const recovering = r.tasks.filter((t) => t.status === "recovering").length;
  const sp = r.speculation;
  // Each mode the answers asked for (the room's default is only where a request named none).
  const drafted = sp ? Object.values(sp.modes || {}).filter((m) => m.drafted).map((m) =>
    ` · ${m.mode} drafts kept ${(100 * m.acceptance).toFixed(0)}%, ${m.tokens_per_step.toFixed(2)} tokens/step`).join("") : "";
  $("#totals").textContent = `answers ${r.totals.answers} · tokens ${r.totals.tokens}${failovers}${drafted}` +
    (recovering ? ` · recovering: replaying ${recovering} answer(s)` : "");
  $("#why").textContent = r.why_not_ready || "";
  renderPipeline(r);
  renderNodes(r);
  renderLinks(r);
  renderTasks(r);
}

function renderPipeline(r) {
  const box = $("#pipeline");
  box.replaceChildren();
  if (!r.plan) { $("#plan-facts").textContent = "no plan yet"; return; }
  $("#plan-facts").textContent = `plan v${r.plan.version} · ${r.plan.stages.length} stages · ${fmt(r.plan.predicted_ms, 2)} ms/token predicted` +
    (r.plan.measured_ms == null ? "" : ` · ${fmt(r.plan.measured_ms, 2)} measured`);
  r.plan.stages.forEach((s, i) => {
    if (i > 0) {
      const wire = r.plan.stages[i - 1].wire;
      box.append(el("span", { class: "arrow", title: `hidden states as ${wire}` }, wire && wire !== "native" ? `→ ${wire}` : "→"));
    }
    const width = (100 * (s.end - s.start)) / r.plan.layers;
    box.append(el("div", {
      class: "stage" + (s.loaded ? "" : " pending"),
      style: `flex: ${width} 1 0; background: ${COLORS[i % COLORS.length]}`,
      title: `${s.name}: ${layers(s)}` + (s.loaded ? "" : " (loading)"),
      "data-node": s.name,
    }, el("span", { class: "name" }, s.name), el("span", { class: "range" }, layers(s))));
  });
}

function renderNodes(r) {
  const stages = new Map((r.plan ? r.plan.stages : []).map((s) => [s.node, s]));
  const rows = r.nodes.map((n) => {
    const s = stages.get(n.id);
    const beat = `${n.health}, ${fmt(n.heartbeat_age_ms / 1000, 1)} s ago`;
    return el("tr", { "data-node": n.name },
      el("td", {}, n.name + (n.host ? " (host)" : "")),
      el("td", {}, `${n.device} ${n.device_name}`.trim() + (n.quantize && n.quantize !== "none" ? ` · ${n.quantize} weights` : "")),
      el("td", { class: "num" }, `${fmt(n.memory_gb, 2)} GB`),
      el("td", { class: "num" }, fmt(n.tflops, 2)),
      el("td", { class: "num" }, fmt(n.gbps, 0)),
      el("td", {}, el("span", { class: "dot " + n.health }), `${n.status} · ${beat}`),
      el("td", { class: "num" }, `${Math.round(100 * n.load)} %`),
      el("td", {}, s ? layers(s).replace("layers ", "").replace("layer ", "") : "–"),
      el("td", { class: "num" }, `${s && s.predicted_ms != null ? fmt(s.predicted_ms, 2) : "–"} · ${fmt(n.ms_per_forward, 2)}`));
  });
  $("#nodes tbody").replaceChildren(...rows);
}

function renderLinks(r) {
  const ids = r.nodes.map((n) => n.id);
  const names = new Map(r.nodes.map((n) => [n.id, n.name]));
  const rtt = new Map(r.links.map((l) => [l.src + " " + l.dst, l]));
  $("#links-empty").hidden = r.links.length > 0;
  if (!r.links.length) { $("#links thead").replaceChildren(); $("#links tbody").replaceChildren(); return; }
  $("#links thead").replaceChildren(el("tr", {}, el("th", {}, "from \\ to"), ...ids.map((n) => el("th", { class: "num" }, names.get(n)))));
  $("#links tbody").replaceChildren(...ids.map((a) => el("tr", {}, el("td", {}, names.get(a)), ...ids.map((b) => {
    const l = rtt.get(a + " " + b) || rtt.get(b + " " + a);
    return el("td", { class: "num", title: l ? `${fmt(l.mib_per_s, 0)} MiB/s` : "" }, a === b ? "·" : l ? `${fmt(l.rtt_ms, 2)} ms` : "–");
  }))));
}

function renderTasks(r) {
  $("#tasks-empty").hidden = r.tasks.length > 0;
  $("#tasks tbody").replaceChildren(...r.tasks.map((t) => el("tr", {},
    el("td", {}, t.id.slice(0, 18)), el("td", {}, t.status), el("td", { class: "num" }, t.prompt_tokens),
    el("td", { class: "num" }, t.tokens), el("td", { class: "num" }, fmt(t.tok_s, 1)))));
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
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

/** Drop the oldest user turn and its answers (a system message stays); false when only the
 * message being sent is left. */
function forgetOldestTurn() {
  const first = history.findIndex((m) => m.role !== "system");
  let next = first + 1;
  while (next < history.length && history[next].role !== "user") next += 1;
  if (first < 0 || next >= history.length) return false;
  history.splice(first, next - first);
  return true;
}

async function send(text) {
  history.push({ role: "user", content: text });
  $("#messages").append(el("div", { class: "msg user" }, text));
  const answer = el("div", { class: "msg assistant" });
  $("#messages").append(answer);
  $("#chat-send").disabled = true;
  const began = performance.now();
  let pieces = 0;
  let firstAt = null;
  try {
    let response;
    let forgotten = 0;
    for (;;) {
      response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({ model: room && room.model ? room.model.id : "", messages: history, stream: true, max_tokens: 200 }),
      });
      if (response.ok) break;
      const error = (await response.json().catch(() => ({}))).error || {};
      // A conversation past the room's context goes on without its oldest turns.
      if (error.code === "context_length_exceeded" && forgetOldestTurn()) { forgotten += 1; continue; }
      throw new Error(error.message || response.statusText);
    }
    if (forgotten) {
      answer.before(el("div", { class: "msg note" }, `${forgotten} earlier turn(s) left out: the conversation is longer than the room's context`));
    }
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (delta) { answer.textContent += delta; pieces += 1; if (firstAt === null) firstAt = performance.now(); }
      $("#messages").scrollTop = $("#messages").scrollHeight;
    }
    history.push({ role: "assistant", content: answer.textContent });
    const secs = (performance.now() - (firstAt || began)) / 1000;
    $("#chat-stats").textContent = `${pieces} pieces · first after ${fmt(((firstAt || began) - began) / 1000, 2)} s · ${fmt(pieces / Math.max(secs, 1e-3), 1)} pieces/s`;
  } catch (err) {
    answer.className = "msg error";
    answer.textContent = "error: " + err.message;
    history.pop();
  } finally {
    $("#chat-send").disabled = false;
    answer.dataset.done = "1";
  }
}

$("#chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  send(text);
});
$("#chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem("peerpipe-key", $("#key").value);
  $("#key-form").hidden = true;
  connect();
});
connect();

// A one-time join link for a browser node (api/browser_nodes.py), with its QR code.
$("#lend").addEventListener("click", async () => {
  $("#lend-error").hidden = true;
  const r = await fetch("/api/browser-link", {
    method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" }, body: "{}",
  }).catch((e) => ({ ok: false, json: async () => ({ error: { message: String(e) } }) }));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    $("#lend-error").textContent = (body.error && body.error.message) || "could not make a link";
    $("#lend-error").hidden = false;
    return;
  }
  $("#lend-url").href = body.url;
  $("#lend-url").textContent = body.url;
  $("#lend-qr").innerHTML = body.qr_svg;  // made by the host from the URL: no user text in it
  $("#lend-local").hidden = !body.local_only;
  $("#lend-link").hidden = false;
});
