// agentpool dashboard: the fleet live (GET /v1/fleet/events), its controls (the admin API) and a
// playground (POST /v1/ask/{pool}, streamed). No framework, no build step, nothing from a CDN.
// The API key lives in sessionStorage and travels only in the X-API-Key header of fetch().
"use strict";

const KEY_ITEM = "agentpool.key";
const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_ITEM) || "",
  history: new Map(), // pool -> Map(t -> point)
  stream: null, // AbortController of the fleet stream
  retryMs: 1000,
  updates: 0,
  pools: new Map(), // pool -> its card's parts
  thread: "", // the playground's thread
  asking: null, // AbortController of the playground's request
  tab: "fleet",
};

// ---------- small helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}
function setText(node, text) {
  text = String(text);
  if (node.textContent !== text) node.textContent = text;
}
function fmtMs(ms) {
  if (!ms) return "–";
  if (ms >= 1000) return (ms / 1000).toFixed(ms >= 10000 ? 0 : 1) + " s";
  return (ms < 10 ? ms.toFixed(1) : Math.round(ms)) + " ms";
}
function fmtNum(n, digits = 0) {
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits });
}
function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleTimeString() : "–";
}
function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h["X-API-Key"] = state.key;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const message = (body && body.error) || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = (body && body.error_code) || "";
    this.details = (body && body.details) || {};
  }
  describe() {
    const field = this.details && (this.details.field || this.details.header);
    return `${this.message}${this.code ? ` (${this.status} ${this.code}${field ? `, ${field}` : ""})` : ""}`;
  }
}

async function failure(res) {
  let body = null;
  try {
    body = await res.json();
  } catch (_) {
    body = { error: `HTTP ${res.status} ${res.statusText || ""}`.trim() };
  }
  return new ApiError(res.status, body);
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { error: `the gateway did not answer (${e.message})` });
  }
  if (!res.ok) throw await failure(res);
  return res.status === 204 ? null : res.json();
}

// Server-Sent Events over fetch (EventSource cannot send the key in a header).
async function* sse(res, signal) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    while (!signal || !signal.aborted) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(buf[cut] === "\r" ? cut + 4 : cut + 2);
        const ev = { event: "message", data: "", id: "" };
        const data = [];
        for (const line of block.split(/\r?\n/)) {
          if (!line || line.startsWith(":")) continue;
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (field === "event") ev.event = val;
          else if (field === "data") data.push(val);
          else if (field === "id") ev.id = val;
        }
        if (data.length) {
          ev.data = data.join("\n");
          yield ev;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---------- messages
function showError(err) {
  const text = err instanceof ApiError ? err.describe() : String(err && err.message ? err.message : err);
  setText($("alert-text"), text);
  $("alert").hidden = false;
}
function clearError() {
  $("alert").hidden = true;
  setText($("alert-text"), "");
}
let noticeTimer = 0;
function notice(text) {
  setText($("notice"), text);
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => setText($("notice"), ""), 6000);
}

// ---------- sign-in
function showSignIn(message) {
  stopStream();
  $("sign-in").hidden = false;
  $("fleet").hidden = true;
  $("playground").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-open").hidden = true;
  setText($("who"), "");
  setText($("conn"), "");
  if (message) showError(message);
  $("api-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  const before = state.key;
  state.key = key;
  try {
    await api("GET", "/v1/fleet"); // checks the key before keeping it
  } catch (err) {
    state.key = before;
    showError(err.status === 401 ? new ApiError(401, { error: `Sign-in failed: ${err.message}`, error_code: err.code }) : err);
    $("api-key").select();
    return;
  }
  sessionStorage.setItem(KEY_ITEM, key);
  $("api-key").value = "";
  clearError();
  start();
}

function signOut() {
  sessionStorage.removeItem(KEY_ITEM);
  state.key = "";
  state.history.clear();
  for (const parts of state.pools.values()) parts.card.remove();
  state.pools.clear();
  start();
}

// ---------- the fleet stream
function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

async function start() {
  $("sign-in").hidden = true;
  showTab(state.tab);
  stopStream();
  const ctl = new AbortController();
  state.stream = ctl;
  while (state.stream === ctl) {
    let res;
    try {
      res = await fetch("/v1/fleet/events", { headers: headers({ Accept: "text/event-stream" }), signal: ctl.signal });
    } catch (e) {
      if (ctl.signal.aborted) return;
      await reconnect(`gateway unreachable (${e.message})`);
      continue;
    }
    if (res.status === 401 || res.status === 403) {
      const err = await failure(res);
      if (state.stream !== ctl) return;
      state.stream = null;
      const hadKey = !!state.key;
      if (hadKey && err.status === 401) { // revoked or expired since it was kept
        sessionStorage.removeItem(KEY_ITEM);
        state.key = "";
      }
      showSignIn(hadKey || err.status === 403 ? err : null); // a first visit needs no error
      return;
    }
    if (!res.ok) {
      const err = await failure(res);
      await reconnect(err.describe());
      continue;
    }
    state.retryMs = 1000;
    setConn("");
    try {
      for await (const ev of sse(res, ctl.signal)) {
        if (ev.event === "fleet") onView(JSON.parse(ev.data));
        else if (ev.event === "unavailable") setConn(JSON.parse(ev.data).error, true);
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    if (state.stream === ctl) await reconnect("connection lost; reconnecting");
  }
}

function setConn(text, down = false) {
  setText($("conn"), text);
  $("conn").classList.toggle("down", down);
}

async function reconnect(why) {
  setConn(why, true);
  await new Promise((r) => setTimeout(r, state.retryMs));
  state.retryMs = Math.min(state.retryMs * 2, 8000);
}

function onView(view) {
  state.updates += 1;
  document.body.dataset.updates = String(state.updates);
  const v = view.viewer;
  const who = `tenant ${v.tenant}${v.fleet_wide ? " (all tenants)" : ""} · ${v.scopes.join(", ")}` +
    (v.key_id ? ` · key ${v.key_id}` : " · open gateway, no key");
  setText($("who"), who);
  $("sign-out").hidden = !state.key;
  $("sign-in-open").hidden = !!state.key;
  mergeHistory(view);
  renderTotals(view);
  renderPools(view);
  renderPoolChoices(view);
  setText($("updated"), `updated ${new Date(view.at * 1000).toLocaleTimeString()}`);
}

function mergeHistory(view) {
  const horizon = view.at - view.window_s;
  for (const [pool, points] of Object.entries(view.history)) {
    let h = state.history.get(pool);
    if (!h) state.history.set(pool, (h = new Map()));
    for (const p of points) h.set(p[0], p);
    for (const t of h.keys()) if (t < horizon) h.delete(t);
  }
}

// ---------- rendering: totals
const TOTALS = [
  ["pools", "Pools", (t) => `${t.healthy_pools} / ${t.pools}`, "healthy / all"],
  ["agents", "Agents ready", (t) => `${t.agents_ready} / ${t.agents_desired}`, "ready / desired"],
  ["in_flight", "In flight", (t) => fmtNum(t.in_flight)],
  ["queued", "Queued", (t) => fmtNum(t.queued)],
  ["rate", "Requests/s", (t) => fmtNum(t.rate, 1)],
  ["processed", "Processed", (t) => fmtNum(t.processed)],
  ["errors", "Errors", (t) => fmtNum(t.errors)],
];
function renderTotals(view) {
  const box = $("totals");
  if (!box.childElementCount) {
    for (const [id, label, , title] of TOTALS) {
      box.append(el("div", { class: "stat", title: title || null },
        el("div", { class: "k", text: label }), el("div", { class: "v", id: `total-${id}` })));
    }
  }
  for (const [id, , value] of TOTALS) setText($(`total-${id}`), value(view.totals));
}

// ---------- rendering: pools
function renderPools(view) {
  const seen = new Set();
  const box = $("pools");
  if (!view.pools.length) {
    if (!$("no-pools")) box.append(el("p", { id: "no-pools", class: "muted", text: "No pools to show for this key." }));
  } else if ($("no-pools")) $("no-pools").remove();
  for (const pool of view.pools) {
    seen.add(pool.pool);
    let parts = state.pools.get(pool.pool);
    if (!parts) {
      parts = poolCard(pool);
      state.pools.set(pool.pool, parts);
      box.append(parts.card);
    }
    updatePool(parts, pool, view);
  }
  for (const [name, parts] of state.pools) {
    if (!seen.has(name)) {
      parts.card.remove();
      state.pools.delete(name);
    }
  }
}

const CHARTS = [
  ["rate", "Requests/s", (p) => [p[1]], (v) => fmtNum(v, 1)],
  ["latency", "Latency p50 / p99", (p) => (p[1] ? [p[2], p[3]] : [null, null]), fmtMs], // none: no line
  ["errors", "Error rate", (p) => [p[4] * 100], (v) => fmtNum(v, 1) + " %"],
  ["refused", "503s / 429s per 5 s", (p) => [p[5], p[6]], (v) => fmtNum(v)],
  ["tokens", "Tokens/s", (p, bucket) => [p[7] / bucket], (v) => fmtNum(v, 0)],
];

function poolCard(pool) {
  const id = `pool-${pool.pool}`;
  const title = el("h2", { id: `${id}-title`, text: pool.pool });
  const status = el("span", { class: "badge" });
  const meta = el("span", { class: "muted" });
  const actions = el("div", { class: "actions" });
  const restart = el("button", { type: "button", class: "restart", text: "Rolling restart",
    "aria-label": `Rolling restart of pool ${pool.pool}`, onclick: () => restartPool(pool.pool) });
  actions.append(restart);
  const depBody = el("tbody");
  const agentBody = el("tbody");
  const charts = el("div", { class: "charts" });
  const chartParts = {};
  for (const [key, label] of CHARTS) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 300 64");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${label}, last 15 minutes`);
    const base = document.createElementNS(svg.namespaceURI, "line");
    base.setAttribute("class", "base");
    for (const [k, v] of Object.entries({ x1: 0, x2: 300, y1: 63, y2: 63 })) base.setAttribute(k, v);
    const a = document.createElementNS(svg.namespaceURI, "polyline");
    a.setAttribute("class", "a");
    const b = document.createElementNS(svg.namespaceURI, "polyline");
    b.setAttribute("class", "b");
    svg.append(base, a, b);
    const now = el("span");
    charts.append(el("figure", { class: "chart", "data-chart": key }, el("figcaption", {}, el("span", { text: label }), now), svg));
    chartParts[key] = { a, b, now };
  }
  const card = el("section", { class: "pool", id, "aria-labelledby": `${id}-title`, "data-pool": pool.pool },
    el("div", { class: "pool-head" }, title, status, meta, actions),
    el("h3", { text: "Deployments" }),
    el("div", { class: "scroll" }, el("table", { class: "deployments" },
      el("thead", {}, row("th", ["Deployment", "Agent type", "Ready / desired", "Weight", "Share", "Scale"], [2, 3, 4])),
      depBody)),
    el("h3", { text: "Agents" }),
    el("div", { class: "scroll" }, el("table", { class: "agents" },
      el("thead", {}, row("th", ["Agent", "Deployment", "Status", "In flight", "Queue depth", "Processed",
        "Errors", "p50", "Build", "Started", ""], [3, 4, 5, 6, 7, 8])),
      agentBody)),
    el("h3", { text: "Last 15 minutes" }),
    charts);
  return { card, status, meta, restart, depBody, agentBody, deps: new Map(), agents: new Map(), charts: chartParts };
}

function row(cell, labels, numeric = []) {
  const tr = el("tr");
  labels.forEach((l, i) => tr.append(el(cell, { class: numeric.includes(i) ? "num" : null, text: l, scope: cell === "th" ? "col" : null })));
  return tr;
}

function updatePool(parts, pool, view) {
  const canAct = view.viewer.can_act;
  setText(parts.status, pool.status + (pool.asleep ? " (asleep)" : ""));
  parts.status.className = `badge s-${pool.status}`;
  setText(parts.meta, `tenant ${pool.tenant} · ${fmtNum(pool.requests)} requests · concurrency ${pool.concurrency}, max depth ${pool.max_depth}`);
  parts.restart.hidden = !canAct;
  syncRows(parts.deps, parts.depBody, pool.deployments, (d) => d.name, (d) => deploymentRow(pool.pool, d), (r, d) => {
    setText(r.agentType, d.agent_type);
    setText(r.ready, `${d.ready} / ${d.desired}` + (d.starting ? ` (+${d.starting} starting)` : "") +
      (d.draining ? ` (${d.draining} draining)` : "") + (d.unhealthy ? ` (${d.unhealthy} unhealthy)` : ""));
    setText(r.weight, d.weight);
    setText(r.share, `${fmtNum(d.share * 100, 1)} %`);
    r.scale.hidden = !canAct;
    setText(r.readOnly, canAct ? "" : "read-only");
    if (document.activeElement !== r.input && r.input.dataset.dirty !== "1") r.input.value = d.configured;
  });
  syncRows(parts.agents, parts.agentBody, pool.agents, (a) => a.id, (a) => agentRow(pool.pool, a), (r, a) => updateAgent(r, a, canAct));
  // charts
  const points = [...(state.history.get(pool.pool) || new Map()).values()].sort((x, y) => x[0] - y[0]);
  for (const [key, , values, fmt] of CHARTS) drawChart(parts.charts[key], points, values, fmt, view);
}

// Rows keyed by id: made once, updated in place (focus and typing survive updates), removed when gone.
function syncRows(rows, body, items, keyOf, make, update) {
  const seen = new Set();
  for (const item of items) {
    const key = keyOf(item);
    seen.add(key);
    let r = rows.get(key);
    if (!r) {
      r = make(item);
      rows.set(key, r);
      body.append(r.tr);
    }
    update(r, item);
  }
  for (const [key, r] of rows) {
    if (!seen.has(key)) {
      r.tr.remove();
      rows.delete(key);
    }
  }
}

function deploymentRow(pool, d) {
  const input = el("input", { type: "number", min: "0", max: "64", step: "1", inputmode: "numeric",
    "aria-label": `Desired agents of ${pool} / ${d.name}`, class: "replicas" });
  input.addEventListener("input", () => { input.dataset.dirty = "1"; });
  const apply = el("button", { type: "submit", class: "apply", text: "Scale", "aria-label": `Scale ${pool} / ${d.name}` });
  const scale = el("form", { class: "scale", novalidate: true }, input, apply); // the API's own errors
  scale.addEventListener("submit", (e) => {
    e.preventDefault();
    scaleDeployment(pool, d.name, input);
  });
  const readOnly = el("span", { class: "muted" });
  const cells = { name: el("td", { text: d.name }), agentType: el("td"), ready: el("td", { class: "num ready" }),
    weight: el("td", { class: "num" }), share: el("td", { class: "num" }), act: el("td", {}, scale, readOnly) };
  const tr = el("tr", { "data-deployment": d.name }, ...Object.values(cells));
  return { tr, input, scale, readOnly, ...cells };
}

function agentRow(pool, a) {
  const status = el("td", { class: "status" });
  const drain = el("button", { type: "button", class: "drain", text: "Drain",
    "aria-label": `Drain agent ${a.id} (a replacement starts first)`, onclick: () => drainAgent(pool, a.id, drain) });
  const cells = [el("td", { class: "id", text: a.id }), el("td", { text: a.deployment }), status];
  const nums = [];
  for (let i = 0; i < 6; i++) { const c = el("td", { class: "num" }); nums.push(c); cells.push(c); }
  const started = el("td");
  cells.push(started, el("td", {}, drain));
  const tr = el("tr", { "data-agent": a.id }, ...cells);
  return { tr, status, nums, started, drain, statusText: el("span"), why: el("span", { class: "why" }) };
}

function updateAgent(r, a, canAct) {
  if (!r.status.firstChild) r.status.append(r.statusText, r.why);
  setText(r.statusText, a.status);
  r.statusText.className = `s-${a.status}`;
  setText(r.why, a.status === "unhealthy" || a.detail ? a.detail : "");
  r.tr.dataset.status = a.status;
  r.tr.dataset.pid = String(a.pid);
  const values = [a.in_flight, a.depth, fmtNum(a.processed), fmtNum(a.errors), fmtMs(a.p50_latency_ms), fmtMs(a.build_ms)];
  values.forEach((v, i) => setText(r.nums[i], v));
  setText(r.started, fmtTime(a.started_at));
  r.drain.hidden = !canAct;
  r.drain.disabled = a.status === "draining";
}

function drawChart(c, points, values, fmt, view) {
  const end = view.at, start = end - view.window_s, bucket = view.bucket_s;
  const series = [[], []];
  let max = 0;
  for (const p of points) {
    const vs = values(p, bucket);
    vs.forEach((v, i) => {
      if (v === null) return;
      series[i].push([p[0] + bucket / 2, v]);
      if (v > max) max = v;
    });
  }
  for (const s of series) if (s.length === 1) s.unshift([s[0][0] - bucket, s[0][1]]); // one point: a short line
  const scale = max > 0 ? max : 1;
  const toPoints = (s) => s.map(([t, v]) => `${(((t - start) / (end - start)) * 300).toFixed(1)},${(62 - (v / scale) * 58).toFixed(1)}`).join(" ");
  const a = toPoints(series[0]), b = toPoints(series[1]);
  if (c.a.getAttribute("points") !== a) c.a.setAttribute("points", a);
  if (c.b.getAttribute("points") !== b) c.b.setAttribute("points", b);
  const last = points.length ? values(points[points.length - 1], bucket) : [];
  setText(c.now, last.length ? last.map((v) => (v === null ? "–" : fmt(v))).join(" / ") + ` · max ${fmt(max)}` : "no data");
}

// ---------- actions (admin)
async function scaleDeployment(pool, dep, input) {
  const n = Number(input.value);
  if (!Number.isInteger(n) || input.value === "") {
    showError(`Desired agents must be a whole number (got "${input.value}")`);
    return;
  }
  try {
    const res = await api("PUT", `/v1/pools/${encodeURIComponent(pool)}/deployments/${encodeURIComponent(dep)}`, { replicas: n });
    input.dataset.dirty = "";
    clearError();
    notice(`Scaling ${pool} / ${dep} to ${res.replicas}`);
  } catch (err) {
    showError(err);
  }
}

async function restartPool(pool) {
  try {
    const res = await api("POST", `/v1/pools/${encodeURIComponent(pool)}/restart`);
    clearError();
    notice(`Rolling restart of ${pool} started (generation ${res.restart_generation})`);
  } catch (err) {
    showError(err);
  }
}

async function drainAgent(pool, id, button) {
  button.disabled = true;
  try {
    await api("POST", `/v1/pools/${encodeURIComponent(pool)}/agents/${encodeURIComponent(id)}/drain`);
    clearError();
    notice(`Draining ${id}: a replacement starts first`);
  } catch (err) {
    button.disabled = false;
    showError(err);
  }
}

// ---------- playground
function renderPoolChoices(view) {
  const select = $("pg-pool");
  const names = view.pools.map((p) => p.pool);
  const have = [...select.options].map((o) => o.value);
  if (have.join("\n") === names.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (names.includes(chosen)) select.value = chosen;
}

function newThread() {
  state.thread = "";
  setText($("pg-thread"), "new thread");
  $("pg-log").replaceChildren();
}

async function ask(event) {
  event.preventDefault();
  const pool = $("pg-pool").value;
  const content = $("pg-message").value;
  if (!pool) return showError("Pick a pool first");
  if (!content.trim()) return showError("Type a message first");
  clearError();
  const log = $("pg-log");
  log.append(el("li", { class: "user" }, el("div", { class: "meta", text: "you" }), el("div", { class: "text", text: content })));
  const meta = el("div", { class: "meta", text: `${pool} · waiting for an agent…` });
  const text = el("div", { class: "text" });
  const steps = el("ul", { class: "steps" });
  const item = el("li", { class: "answer", "data-state": "streaming" }, meta, steps, text);
  log.append(item);
  const body = { content, stream: true };
  if (state.thread) body.thread_id = state.thread;
  const ctl = new AbortController();
  state.asking = ctl;
  $("pg-send").disabled = true;
  $("pg-stop").disabled = false;
  const t0 = performance.now();
  let agent = "", firstAt = 0, requestId = "";
  try {
    const res = await fetch(`/v1/ask/${encodeURIComponent(pool)}`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal: ctl.signal,
    });
    if (!res.ok) throw await failure(res);
    requestId = res.headers.get("X-Request-ID") || "";
    const thread = res.headers.get("X-Thread-ID");
    if (thread) { state.thread = thread; setText($("pg-thread"), `thread ${thread}`); }
    $("pg-message").value = "";
    for await (const ev of sse(res, ctl.signal)) {
      const d = JSON.parse(ev.data);
      if (ev.event === "start") {
        agent = d.agent_id;
        setText(meta, `${pool} · agent ${agent} · queued ${fmtMs(d.queue_wait_ms)}`);
      } else if (ev.event === "chunk") {
        if (!firstAt) firstAt = performance.now();
        text.append(d.text);
      } else if (ev.event === "restart") {
        text.textContent = "";
        steps.replaceChildren();
        agent = d.agent_id;
        setText(meta, `${pool} · agent ${agent} · attempt ${d.attempt} (the first one's agent was lost)`);
      } else if (ev.event === "tool_call") {
        steps.append(el("li", { text: `tool ${d.name}(${JSON.stringify(d.arguments)})` }));
      } else if (ev.event === "tool_result") {
        steps.append(el("li", { text: `${d.is_error ? "failed" : "result"} of ${d.name}: ${d.content.slice(0, 200)}` }));
      } else if (ev.event === "step") {
        steps.append(el("li", { text: `step ${d.name}` }));
      } else if (ev.event === "end") {
        text.textContent = d.content;
        const t = d.timings || {};
        const u = d.usage || {};
        item.dataset.state = "done";
        item.dataset.agent = d.agent_id;
        setText(meta, `${pool} · agent ${d.agent_id} · first token ${fmtMs(firstAt ? firstAt - t0 : t.ttft_ms)} · ` +
          `total ${fmtMs(t.total_ms || performance.now() - t0)} · ${u.input_tokens || 0} in / ${u.output_tokens || 0} out tokens`);
      } else if (ev.event === "interrupt") {
        item.dataset.state = "interrupted";
        setText(meta, `${pool} · agent ${d.agent_id} · paused for approval of ${d.tool_call.name} (request ${requestId})`);
      } else if (ev.event === "error") {
        item.dataset.state = "failed";
        item.classList.add("failed");
        setText(meta, `${pool}${agent ? ` · agent ${agent}` : ""} · failed: ${d.error} (${d.error_code})`);
      }
    }
    if (item.dataset.state === "streaming") {
      item.dataset.state = "failed";
      setText(meta, `${meta.textContent} · the stream ended early`);
    }
  } catch (err) {
    item.dataset.state = "failed";
    item.classList.add("failed");
    if (ctl.signal.aborted) setText(meta, `${meta.textContent} · stopped`);
    else {
      setText(meta, `${pool} · not answered`);
      showError(err);
    }
  } finally {
    state.asking = null;
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
  }
}

// ---------- tabs and start
function showTab(tab) {
  state.tab = tab;
  for (const [name, section] of [["fleet", $("fleet")], ["playground", $("playground")]]) {
    section.hidden = name !== tab;
    $(`tab-${name}`).setAttribute("aria-pressed", String(name === tab));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("sign-in-open").addEventListener("click", () => showSignIn());
  $("alert-close").addEventListener("click", clearError);
  $("tab-fleet").addEventListener("click", () => showTab("fleet"));
  $("tab-playground").addEventListener("click", () => showTab("playground"));
  $("ask-form").addEventListener("submit", ask);
  $("pg-new").addEventListener("click", newThread);
  $("pg-stop").addEventListener("click", () => state.asking && state.asking.abort());
  $("pg-message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("ask-form").requestSubmit();
  });
  newThread();
  start();
});
