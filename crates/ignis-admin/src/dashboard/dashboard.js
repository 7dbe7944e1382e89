// The Ignis dashboard: polls /v1/stats every second with the admin token
// and turns each pair of documents into rates, percentiles and shares.
// No dependencies, no build step. The token comes from the URL fragment
// (#token=...), which browsers never send to the server, or from the form;
// it is kept in sessionStorage for this tab only.
"use strict";

const HISTORY = 60; // samples (seconds) kept per chart
let token = null;
let kept = []; // the last documents read, oldest first
const series = new Map(); // target key -> [{rate, p50, p99, errors}]

function el(tag, attrs, ...children) {
  const svg = tag === "svg" || tag === "polyline";
  const e = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

// The quantile q of the requests counted in `delta` (per-bucket counts
// over `bounds`, the last bucket unbounded), by linear interpolation inside
// the bucket, as Prometheus's histogram_quantile does.
function quantile(q, delta, bounds) {
  const total = delta.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  let rank = q * total, seen = 0;
  for (let i = 0; i < delta.length; i++) {
    if (seen + delta[i] >= rank) {
      const lower = i === 0 ? 0 : bounds[i - 1];
      const upper = i < bounds.length ? bounds[i] : bounds[bounds.length - 1];
      const within = delta[i] === 0 ? 0 : (rank - seen) / delta[i];
      return lower + (upper - lower) * within;
    }
    seen += delta[i];
  }
  return bounds[bounds.length - 1];
}

function ms(seconds) {
  if (seconds === null) return "–";
  const v = seconds * 1000;
  return v < 1 ? v.toFixed(2) + " ms" : v < 100 ? v.toFixed(1) + " ms" : v.toFixed(0) + " ms";
}

function chart(samples) {
  const w = 300, h = 60;
  const maxRate = Math.max(1, ...samples.map((s) => s.rate));
  const maxP99 = Math.max(1e-6, ...samples.map((s) => s.p99 || 0));
  const x = (i) => ((i + HISTORY - samples.length) / (HISTORY - 1)) * w;
  const line = (cls, f) =>
    el("polyline", {
      class: cls,
      "data-points": String(samples.length),
      points: samples.map((s, i) => `${x(i).toFixed(1)},${(h - 2 - f(s) * (h - 4)).toFixed(1)}`).join(" "),
    });
  return el("svg", { class: "chart", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img",
                     "aria-label": "requests per second (blue) and p99 latency (red), last minute" },
    line("rate", (s) => s.rate / maxRate),
    line("p99", (s) => (s.p99 || 0) / maxP99));
}

function render(now) {
  document.getElementById("version").textContent = "version " + now.version;
  const state = document.getElementById("state");
  state.dataset.state = now.ready ? "live" : "not-ready";
  state.textContent = now.ready ? "live" : "not ready (draining)";
  // Figures are over the last second: against the newest document at
  // least a second older, else the oldest kept (a page polled faster, or
  // just opened, still shows rates over the time it has).
  let previous = null;
  for (const d of kept) if (d.time_ms <= now.time_ms - 1000) previous = d;
  if (previous === null && kept.length > 0) previous = kept[0];
  const dt = previous ? (now.time_ms - previous.time_ms) / 1000 : 0;
  const before = new Map((previous ? previous.targets : []).map((t) => [t.kind + "/" + t.name, t]));

  const targets = document.getElementById("targets");
  targets.replaceChildren();
  for (const t of now.targets) {
    const key = t.kind + "/" + t.name;
    const old = before.get(key);
    let sample = { rate: 0, p50: null, p99: null, errors: 0 };
    if (old && dt > 0) {
      const delta = t.duration.map((n, i) => n - (old.duration[i] || 0));
      const done = t.requests - old.requests;
      sample = {
        rate: done / dt,
        p50: quantile(0.5, delta, now.duration_bounds),
        p99: quantile(0.99, delta, now.duration_bounds),
        errors: done > 0 ? (t.errors - old.errors) / done : 0,
      };
    }
    const samples = series.get(key) || [];
    if (old && dt > 0) samples.push(sample);
    while (samples.length > HISTORY) samples.shift();
    series.set(key, samples);
    if (t.kind === "edge" && t.requests === 0) continue;
    const figures = el("div", { class: "figures" },
      el("span", {}, el("b", { "data-figure": "rate" }, sample.rate.toFixed(sample.rate < 10 ? 1 : 0)), "req/s"),
      el("span", {}, el("b", { "data-figure": "p50" }, ms(sample.p50)), "p50"),
      el("span", {}, el("b", { "data-figure": "p99" }, ms(sample.p99)), "p99"),
      el("span", {}, el("b", { "data-figure": "errors" }, (sample.errors * 100).toFixed(1) + "%"), "errors"));
    const extra = t.active === null ? "" :
      ` · ${t.active} running, ${t.queued} queued, ${t.shed} shed, ${t.requests} served`;
    targets.append(el("article", {
        "data-target": key, "data-requests": String(t.requests), "data-samples": String(samples.length),
        "data-errors": sample.errors > 0 ? "yes" : "no" },
      el("h3", {}, t.name === "-" ? "edge (no route, malformed)" : t.name,
         el("span", {}, ` ${t.kind}${t.tenant !== "-" ? ", tenant " + t.tenant : ""}${extra}`)),
      figures, chart(samples)));
  }

  const tenants = document.getElementById("tenants");
  tenants.replaceChildren();
  const cpuBefore = new Map((previous ? previous.tenants : []).map((t) => [t.name, t.cpu_seconds]));
  const used = now.tenants.map((t) => ({ ...t, used: Math.max(0, t.cpu_seconds - (cpuBefore.get(t.name) ?? t.cpu_seconds)) }));
  const sum = used.reduce((a, t) => a + t.used, 0);
  for (const t of used) {
    const share = sum > 0 ? t.used / sum : 0;
    const fill = el("span", { class: "fill" });
    fill.style.width = Math.round(share * 200) + "px"; // CSSOM: allowed by the CSP, unlike a style attribute
    tenants.append(el("div", { class: "bar", "data-tenant": t.name, "data-share": share.toFixed(3) },
      el("span", {}, `${t.name} (weight ${t.weight})`), fill,
      el("span", {}, (share * 100).toFixed(0) + "%")));
  }

  const actors = document.getElementById("actors");
  const a = now.actors;
  actors.replaceChildren(el("p", { "data-actors-active": String(a.active) },
    `${a.active} live activations; ${a.activations} started, ${a.evictions} evicted`),
    ...a.classes.map(([name, messages]) => el("p", {}, `${name}: ${messages} messages`)));

  const cron = document.getElementById("cron");
  cron.replaceChildren(now.cron.length === 0 ? el("p", {}, "none") :
    el("table", {}, el("tr", {}, el("th", {}, "trigger"), el("th", {}, "schedule"), el("th", {}, "ok"),
                      el("th", {}, "failed"), el("th", {}, "skipped")),
      ...now.cron.map((c) => el("tr", { "data-cron": c.name }, el("td", {}, c.name), el("td", {}, c.schedule),
        el("td", {}, String(c.ok)), el("td", {}, String(c.failed)), el("td", {}, String(c.skipped))))));

  document.getElementById("deploys").replaceChildren(
    el("table", {}, el("tr", {}, el("th", {}, "when"), el("th", {}, "what"), el("th", {}, "action"),
                      el("th", {}, "version"), el("th", {}, "by")),
      ...now.deploys.slice(0, 10).map((d) => el("tr", { "data-deploy": d.name },
        el("td", {}, new Date(d.time_ms).toLocaleTimeString()), el("td", {}, (d.kind ? d.kind + " " : "") + d.name),
        el("td", {}, d.action), el("td", {}, String(d.version)), el("td", {}, d.by)))));
  kept.push(now);
  while (kept.length > 10) kept.shift();
}

async function poll() {
  const state = document.getElementById("state");
  try {
    const resp = await fetch("/v1/stats", { headers: { authorization: "Bearer " + token }, cache: "no-store" });
    if (resp.status === 401) {
      sessionStorage.removeItem("ignis-admin-token");
      showLogin("That token was refused.");
      return;
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    document.getElementById("board").hidden = false;
  } catch (e) {
    state.dataset.state = "error";
    state.textContent = "cannot reach the node (" + e.message + ")";
  }
  setTimeout(poll, 1000);
}

function showLogin(message) {
  document.getElementById("board").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

function start() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("ignis-admin-token", fromHash);
    window.history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem("ignis-admin-token");
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = document.getElementById("token").value.trim();
    sessionStorage.setItem("ignis-admin-token", token);
    document.getElementById("login").hidden = true;
    poll();
  });
  if (token) poll(); else showLogin();
}

start();
