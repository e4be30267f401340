// The consortium dashboard page: fetches JSON from /api/..., renders panels, follows /api/stream (SSE).
"use strict";
(function () {
  const {lineChart, PALETTE} = window.ConsortiumCharts;
  const MAX_ALERTS = 200, MAX_EVENTS = 100;
  const state = {me: null, runs: [], run: null, rounds: null, alerts: [], alertTotal: 0, fleet: new Map(),
                 events: [], traffic: [], models: [], privacy: null, institutions: new Set()};
  const $ = sel => document.querySelector(sel);

  async function api(path) {
    const r = await fetch(path, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (r.status === 401) { location.reload(); throw new Error("unauthorised"); }
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }
  function td(text, cls) { const c = document.createElement("td"); c.textContent = text ?? "–"; if (cls) c.className = cls; return c; }
  function badge(text, cls) { const c = document.createElement("td"); const s = document.createElement("span");
    s.className = "badge " + (cls || text); s.textContent = text; c.appendChild(s); return c; }
  function num(v, digits) { return (v === null || v === undefined || !Number.isFinite(v)) ? "–" : v.toFixed(digits ?? 3); }
  function time(ts) { return new Date(ts * 1000).toLocaleTimeString([], {hour12: false}); }
  function ago(ts) { if (!ts) return "–"; const s = Date.now() / 1000 - ts; return s < 60 ? `${Math.max(0, s).toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`; }
  function throttle(fn, ms) { let t = null; return () => { if (!t) t = setTimeout(() => { t = null; fn(); }, ms); }; }
  function noteInstitution(name) {
    if (!name || state.institutions.has(name)) return;
    state.institutions.add(name);
    const sel = $("#alert-institution"), o = document.createElement("option");
    o.value = name; o.textContent = name; sel.appendChild(o);
  }

  // ------------------------------------------------------------------ federation
  const METRIC = {auprc: ["auprc"], "roc-auc": ["roc-auc", "roc_auc"], recall: ["recall-at-1pct-fpr", "recall_at_1pct_fpr"]};
  function metric(m, key) { for (const k of METRIC[key]) if (m && Number.isFinite(m[k])) return m[k]; return null; }

  async function loadRuns() {
    state.runs = await api("/api/runs");
    const sel = $("#run-select"), keep = sel.value;
    sel.textContent = "";
    for (const r of state.runs) {
      const o = document.createElement("option");
      o.value = r.run_id; o.textContent = `${r.name} · ${r.created_at.slice(0, 19).replace("T", " ")} · ${r.status}`;
      sel.appendChild(o);
    }
    if (keep && state.runs.some(r => r.run_id === keep)) sel.value = keep;
    else if (state.runs.length) sel.value = state.runs[0].run_id;
    await loadRun();
  }
  async function loadRun() {
    const id = $("#run-select").value;
    if (!id) { renderFederation(); return; }
    state.rounds = await api(`/api/runs/${encodeURIComponent(id)}/rounds`);
    renderFederation();
    await loadPrivacy();
  }
  function renderFederation() {
    const data = state.rounds;
    const body = $("#round-table tbody"); body.textContent = "";
    if (!data) { for (const k of ["auprc", "roc-auc", "recall"]) lineChart($(`#plot-${k}`), {title: k, series: [], empty: "no runs in the store yet"}); return; }
    const run = data.run, rounds = data.rounds;
    $("#run-status").textContent = `${run.status} · ${run.institutions.length} institutions`;
    const last = rounds[rounds.length - 1];
    $("#round-info").textContent = last
      ? `round ${last.round}${run.status === "running" ? " (running)" : ""} · ${last.participants.length} participating, ${last.dropped.length} dropped`
      : "no round completed yet";
    for (const r of rounds.slice().reverse()) {
      const tr = document.createElement("tr");
      tr.append(td(r.round, "num"), td(r.participants.join(", ")), td(r.dropped.join(", ") || "–"),
                td(num(metric(r.global_metrics, "auprc")), "num"), td(num(metric(r.global_metrics, "roc-auc")), "num"),
                td(num(metric(r.global_metrics, "recall")), "num"), td(num(r.duration_s, 1), "num"));
      body.appendChild(tr);
    }
    const titles = {auprc: "AUPRC per round", "roc-auc": "ROC-AUC per round", recall: "Recall @ 1% FPR per round"};
    for (const key of Object.keys(titles)) {
      const series = [{name: "global", color: "#111", points: rounds.map(r => [r.round, metric(r.global_metrics, key)]).filter(p => p[1] !== null)}];
      const insts = [...new Set(rounds.flatMap(r => Object.keys(r.institution_metrics)))].sort();
      insts.forEach((inst, i) => series.push({name: inst, color: PALETTE[i % PALETTE.length], width: 1,
        points: rounds.filter(r => r.institution_metrics[inst]).map(r => [r.round, metric(r.institution_metrics[inst], key)]).filter(p => p[1] !== null)}));
      const refs = [];
      const central = data.baselines.find(b => b.kind === "centralized");
      if (central && metric(central.metrics, key) !== null) refs.push({name: "centralized", y: metric(central.metrics, key), color: "#2ca02c"});
      const local = data.baselines.filter(b => b.kind === "local_only").map(b => metric(b.metrics, key)).filter(v => v !== null);
      if (local.length) refs.push({name: "local-only mean", y: local.reduce((a, b) => a + b, 0) / local.length, color: "#d62728"});
      lineChart($(`#plot-${key}`), {title: titles[key], series, refs, integerX: true, xLabel: "round"});
    }
  }

  // ------------------------------------------------------------------ privacy
  async function loadPrivacy() {
    const id = $("#run-select").value;
    state.privacy = await api("/api/privacy" + (id ? `?run_id=${encodeURIComponent(id)}` : ""));
    renderPrivacy();
  }
  function renderPrivacy() {
    const p = state.privacy, body = $("#privacy-table tbody"); body.textContent = "";
    if (!p) return;
    $("#privacy-note").textContent = p.available ? (p.charges.length ? "" : "no charges for this run (no DP)") : "privacy ledger not installed";
    const by = new Map();
    for (const c of p.charges) { if (!by.has(c.institution)) by.set(c.institution, []); by.get(c.institution).push(c); }
    const series = [], refs = [], budgets = new Set();
    [...by.keys()].sort().forEach((inst, i) => {
      const cs = by.get(inst), last = cs[cs.length - 1];
      series.push({name: inst, color: PALETTE[i % PALETTE.length], points: cs.filter(c => c.epsilon !== null).map(c => [c.round, c.epsilon])});
      if (last.budget_epsilon !== null && !budgets.has(last.budget_epsilon)) { budgets.add(last.budget_epsilon); refs.push({name: `budget ε=${last.budget_epsilon}`, y: last.budget_epsilon, color: "#b26a00"}); }
      const tr = document.createElement("tr");
      const used = (last.budget_epsilon && last.epsilon !== null) ? ` (${(100 * last.epsilon / last.budget_epsilon).toFixed(0)} %)` : "";
      tr.append(td(inst), td(last.mechanism), td(num(last.epsilon, 3) + used, "num"), td(num(last.budget_epsilon, 2), "num"), td(last.delta === null ? "–" : last.delta.toExponential(1), "num"));
      body.appendChild(tr);
    });
    lineChart($("#plot-privacy"), {title: "ε spent per institution", series, refs, integerX: true, xLabel: "round", yMin: 0,
                                   empty: p.available ? "no privacy charges" : "privacy ledger not installed"});
  }

  // ------------------------------------------------------------------ models
  async function loadModels() {
    try { const m = await api("/api/models"); state.models = Array.isArray(m) ? m : (m.models || []); }
    catch (e) { state.models = []; }
    renderModels();
  }
  function renderModels() {
    const body = $("#model-table tbody"); body.textContent = "";
    const running = new Map();
    for (const a of state.fleet.values()) { if (!a.model_version) continue; if (!running.has(a.model_version)) running.set(a.model_version, []); running.get(a.model_version).push(`${a.institution}/${a.agent}`); }
    const versions = state.models.map(m => m.model_version);
    for (const m of state.models) {
      const tr = document.createElement("tr");
      tr.append(td(m.model_version), td(m.channel), td(m.kind), m.promoted ? badge("promoted", "ok") : td(""),
                td(num(m.metrics ? metric(m.metrics, "auprc") : null), "num"), td((running.get(m.model_version) || []).join(", ") || "–"));
      body.appendChild(tr);
    }
    for (const [v, agents] of running) if (!versions.includes(v)) {
      const tr = document.createElement("tr");
      tr.append(td(v), td("–"), td("–"), td("not in registry"), td("–"), td(agents.join(", ")));
      body.appendChild(tr);
    }
  }

  // ------------------------------------------------------------------ fleet
  function renderFleet() {
    const body = $("#fleet-table tbody"); body.textContent = "";
    const agents = [...state.fleet.values()].sort((a, b) => (a.institution + a.agent).localeCompare(b.institution + b.agent));
    for (const a of agents) {
      const tr = document.createElement("tr");
      tr.dataset.agent = `${a.institution}/${a.agent}`;
      tr.append(td(a.institution), td(a.agent), a.stale && a.state === "online" ? badge("stale") : badge(a.state),
        td(a.model_version || "–"), td(num(a.throughput_per_s, 1), "num"), td(num(a.alerts_per_s, 2), "num"),
        td(num(a.latency_p50_ms, 2), "num"), td(num(a.latency_p99_ms, 2), "num"), td(a.queue_backlog ?? "–", "num"),
        badge(a.drift_status), td(ago(a.last_seen)));
      body.appendChild(tr);
    }
    $("#fleet-count").textContent = `${agents.filter(a => a.state === "online").length} online of ${agents.length}`;
  }
  const renderFleetSoon = throttle(() => { renderFleet(); renderModels(); }, 250);

  // ------------------------------------------------------------------ alerts
  async function loadAlerts() {
    const inst = $("#alert-institution").value;
    state.alerts = await api("/api/alerts?limit=" + MAX_ALERTS + (inst ? `&institution=${encodeURIComponent(inst)}` : ""));
    state.alerts.forEach(a => noteInstitution(a.institution));
    renderAlerts(new Set());
  }
  function renderAlerts(fresh) {
    const inst = $("#alert-institution").value, body = $("#alert-table tbody");
    const rows = document.createDocumentFragment();
    for (const a of state.alerts) {
      if (inst && a.institution !== inst) continue;
      const tr = document.createElement("tr");
      tr.dataset.transaction = a.transaction_id;
      if (fresh.has(a.id)) tr.className = "fresh";
      tr.append(td(time(a.ts)), td(a.institution), td(a.agent), td(a.transaction_id), td(num(a.score, 3), "num"), td(a.model_version));
      rows.appendChild(tr);
    }
    body.textContent = ""; body.appendChild(rows);
    $("#alert-count").textContent = state.alertTotal ? `${state.alertTotal} live since page load` : "";
  }
  let pendingAlerts = [];
  function onAlerts(items) {
    pendingAlerts.push(...items);
    if (pendingAlerts.length === items.length) requestAnimationFrame(flushAlerts);
  }
  function flushAlerts() {
    const items = pendingAlerts; pendingAlerts = [];
    if (!items.length) return;
    const known = new Set(state.alerts.map(a => a.id));
    const fresh = items.filter(a => !known.has(a.id));
    state.alertTotal += fresh.length;
    fresh.forEach(a => noteInstitution(a.institution));
    state.alerts = fresh.reverse().concat(state.alerts).slice(0, MAX_ALERTS);
    renderAlerts(new Set(fresh.map(a => a.id)));
  }

  // ------------------------------------------------------------------ events and traffic
  async function loadEvents() { state.events = await api("/api/events?limit=" + MAX_EVENTS); renderEvents(); }
  function renderEvents() {
    const body = $("#event-table tbody"); body.textContent = "";
    for (const e of state.events) {
      const tr = document.createElement("tr");
      const detail = e.kind === "drift" ? `drift status ${e.name}` : e.name + (e.payload.detail && Object.keys(e.payload.detail).length ? " " + JSON.stringify(e.payload.detail).slice(0, 80) : "");
      tr.append(td(time(e.ts)), td(e.institution), td(e.agent), e.kind === "drift" ? badge(e.name) : td("event"), td(detail));
      body.appendChild(tr);
    }
  }
  async function loadTraffic() { state.traffic = await api("/api/traffic?limit=2000"); renderTraffic(); }
  function renderTraffic() {
    const by = new Map();
    for (const t of state.traffic) for (const [cls, n] of Object.entries(t.totals)) {
      const key = `${t.institution}/${t.agent} ${cls}`;
      if (!by.has(key)) by.set(key, []);
      by.get(key).push([t.ts, n]);
    }
    const series = [...by.keys()].sort().map((k, i) => ({name: k, color: PALETTE[i % PALETTE.length], points: by.get(k)}));
    $("#traffic-note").textContent = state.traffic.length ? `${state.traffic.length} intervals` : "";
    lineChart($("#plot-traffic"), {title: "Vehicles per interval, per intersection and class", series, yMin: 0,
      xFormat: time, empty: "no traffic counts (no vision agent reporting)"});
  }
  const renderTrafficSoon = throttle(renderTraffic, 500);

  // ------------------------------------------------------------------ live stream
  function connect() {
    const es = new EventSource("/api/stream");
    const live = $("#live");
    es.onopen = () => { live.textContent = "live"; live.className = "badge live"; };
    es.onerror = () => { live.textContent = "reconnecting"; live.className = "badge off"; };
    es.addEventListener("alerts", ev => onAlerts(JSON.parse(ev.data)));
    es.addEventListener("fleet", ev => { for (const a of JSON.parse(ev.data)) { state.fleet.set(`${a.institution}/${a.agent}`, a); noteInstitution(a.institution); } renderFleetSoon(); });
    es.addEventListener("events", ev => { state.events = JSON.parse(ev.data).reverse().concat(state.events).slice(0, MAX_EVENTS); renderEvents(); });
    es.addEventListener("traffic", ev => { state.traffic.push(...JSON.parse(ev.data)); if (state.traffic.length > 4000) state.traffic.splice(0, state.traffic.length - 4000); renderTrafficSoon(); });
    es.addEventListener("store", () => refreshStore());
  }
  const refreshStore = throttle(() => { loadRuns().catch(console.error); loadModels().catch(console.error); }, 500);

  async function main() {
    state.me = await api("/api/me");
    $("#whoami").textContent = state.me.auth ? `${state.me.user}${state.me.institution ? " · " + state.me.institution : " · all institutions"}` : "";
    $("#logout").hidden = !state.me.auth;
    if (state.me.institution) noteInstitution(state.me.institution);
    $("#run-select").addEventListener("change", () => loadRun().catch(console.error));
    $("#alert-institution").addEventListener("change", () => loadAlerts().catch(console.error));
    connect();
    const fleet = await api("/api/fleet");
    fleet.forEach(a => { state.fleet.set(`${a.institution}/${a.agent}`, a); noteInstitution(a.institution); });
    renderFleet();
    await Promise.all([loadRuns(), loadModels(), loadAlerts(), loadEvents(), loadTraffic()]);
    setInterval(renderFleet, 5000);  // keeps "seen ... ago" and staleness current
    document.body.dataset.ready = "1";
  }
  main().catch(e => { console.error(e); });
})();
