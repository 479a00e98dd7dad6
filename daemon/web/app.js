// wanbox status page: polls /api/status every second and redraws. Plain DOM, no build step.
// Every user-supplied string (job names, errors) goes in as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const $ = (selector) => document.querySelector(selector);
let controls = false;
let shownOutputs = "";
let shownFailures = "";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined || child === "") continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "no estimate yet";
  const s = Math.max(0, Math.round(value));
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function ago(iso) {
  if (!iso) return "–";
  return seconds((Date.now() - Date.parse(iso)) / 1000) + " ago";
}

function action(verb, job) {
  if (!controls) return "";
  return el("button", { type: "button", onclick: () => act(verb, job) }, verb);
}

async function act(verb, job) {
  const token = $("#token").value;
  sessionStorage.setItem("wanbox-token", token);
  const reply = await fetch(`/api/jobs/${encodeURIComponent(job)}/${verb}`, {
    method: "POST", headers: { Authorization: `Bearer ${token}` },
  });
  const body = await reply.json();
  $("#message").textContent = reply.ok ? `${verb}: ${body.id} done` : `${verb} refused: ${body.error}`;
}

function renderDaemon(status) {
  const badge = $("#daemon");
  const d = status.daemon;
  if (!d) {
    badge.className = "badge none";
    badge.textContent = "no daemon has run on this ledger";
    return;
  }
  badge.className = `badge ${d.verdict === "alive" ? "alive" : d.verdict}`;
  badge.textContent = d.verdict === "gone" ? `daemon GONE: ${d.reason}` : `${d.state} on ${d.host_id} · ${d.reason}`;
  const p = d.pool;
  $("#pool").textContent = `pool ${p.state || "stopped"}${p.model ? " · " + p.model : ""}${p.pid ? " (pid " + p.pid + ")" : ""}`
    + `${p.job ? " · job " + p.job : ""}${p.heartbeat_at ? " · last message " + ago(p.heartbeat_at) : ""}`;
  const rows = (d.gpus || []).map((g) => el("tr", {},
    el("td", {}, g.index), el("td", {}, g.name), el("td", {}, `${g.utilization_percent}%`),
    el("td", {}, `${(g.memory_used_bytes / 2 ** 30).toFixed(1)} / ${(g.memory_total_bytes / 2 ** 30).toFixed(1)} GiB`)));
  $("#gpus tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 4, class: "none" }, "no GPU readings (a CPU host, or no NVIDIA driver)"))]));
  const outage = $("#outage");
  outage.hidden = !d.inbox_outage;
  outage.textContent = d.inbox_outage ? `INBOX OUTAGE: ${d.inbox_outage}` : "";
}

function renderRunning(jobs) {
  const cards = jobs.map((j) => {
    const p = j.progress;
    return el("div", { class: `job running${j.stale ? " stale" : ""}`, "data-job": j.id },
      el("div", { class: "title" }, j.name, " ", el("code", {}, j.id)),
      el("div", { class: "phase" }, j.stale ? "STALE: the daemon is gone, nothing runs this job · " : "",
        !p.phase || p.phase === j.state ? j.state : `${j.state} · ${p.phase}`),
      el("progress", { max: p.total || 1, value: p.step || 0 }),
      el("span", { class: "steps" }, el("span", { class: "step" }, p.step ?? 0), "/", el("span", { class: "total" }, p.total ?? "?")),
      el("span", { class: "eta" }, j.stale ? "" : `phase ETA ${seconds(j.eta_seconds)} · done in ${seconds(j.job_eta_seconds)}`),
      " ", action("cancel", j.id));
  });
  $("#running").replaceChildren(...(cards.length ? cards : [el("p", { class: "none" }, "nothing is running")]));
}

function renderQueue(jobs) {
  const rows = jobs.map((j) => el("tr", { "data-job": j.id },
    el("td", {}, j.queue_position ?? "–"), el("td", {}, j.priority), el("td", {}, j.name), el("td", {}, el("code", {}, j.id)),
    el("td", {}, j.state),
    el("td", {}, j.waiting || (j.retry_after ? `retry after ${new Date(j.retry_after).toLocaleTimeString()}` : "")),
    el("td", {}, ago(j.created_at)), el("td", {}, seconds(j.job_eta_seconds)), el("td", {}, action("cancel", j.id))));
  $("#queue tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 9, class: "none" }, "the queue is empty"))]));
}

function renderOutputs(jobs) {
  const signature = jobs.map((j) => j.id).join();
  if (signature === shownOutputs) return; // keep loaded posters instead of fetching them every second
  shownOutputs = signature;
  const cards = jobs.map((j) => el("figure", { class: "output", "data-job": j.id },
    j.files.poster ? el("a", { href: j.files.video }, el("img", { class: "poster", src: j.files.poster, alt: j.name })) : "",
    el("figcaption", {}, el("strong", {}, j.name), el("br"),
      j.files.video ? el("a", { href: j.files.video, class: "video" }, "video") : "",
      j.files.sidecar ? el("a", { href: j.files.sidecar, class: "sidecar" }, "sidecar") : "",
      j.files.preview ? el("a", { href: j.files.preview }, "preview") : "",
      el("br"), `${ago(j.updated_at)}${j.gpu_seconds ? " · " + seconds(j.gpu_seconds) + " GPU" : ""}`)));
  $("#recent").replaceChildren(...(cards.length ? cards : [el("p", { class: "none" }, "no video delivered yet")]));
}

function renderFailures(jobs) {
  const signature = jobs.map((j) => `${j.id}:${j.state}`).join() + controls;
  if (signature === shownFailures) return;
  shownFailures = signature;
  const rows = jobs.map((j) => el("tr", { "data-job": j.id },
    el("td", {}, j.name), el("td", {}, el("code", {}, j.id)), el("td", {}, j.state), el("td", {}, j.error_kind || ""),
    el("td", { class: "reason" }, j.error || ""), el("td", {}, ago(j.updated_at)),
    el("td", {}, j.state === "failed" ? action("retry", j.id) : "")));
  $("#failures tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 7, class: "none" }, "no failures"))]));
}

function render(status) {
  controls = status.controls;
  $("#controls").hidden = !controls;
  renderDaemon(status);
  renderRunning(status.running);
  renderQueue(status.queue);
  renderOutputs(status.recent);
  renderFailures(status.failures);
  $("#counts").textContent = Object.entries(status.counts).filter(([, n]) => n).map(([s, n]) => `${s} ${n}`).join(" · ");
  $("#updated").textContent = `updated ${new Date(status.generated_at).toLocaleTimeString()}`;
}

async function poll() {
  try {
    const reply = await fetch("/api/status", { cache: "no-store" });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    render(await reply.json());
  } catch (error) {
    $("#daemon").className = "badge gone";
    $("#daemon").textContent = `the page cannot reach wanbox serve: ${error.message}`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token").value = sessionStorage.getItem("wanbox-token") || "";
  poll();
});
