// cad-node status page: fetches /api/overview and renders it with textContent only
// (every string may come from a peer). No framework, no build step, no CDN.
"use strict";

const STATE = { timer: null, refreshMs: 2000 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

function fmtTime(epoch) {
  if (epoch === null || epoch === undefined) return "-";
  return new Date(epoch * 1000).toISOString().slice(11, 19);
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "unknown";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(1)} ${units[i]}`;
}

function token() { return document.getElementById("token").value.trim(); }

function say(text, bad) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = bad ? "bad" : "ok";
}

async function post(path) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const rsp = await fetch(path, { method: "POST", headers });
  let body = null;
  try { body = await rsp.json(); } catch (e) { body = { detail: rsp.statusText }; }
  if (!rsp.ok) {
    say(`${path}: ${rsp.status} ${body.detail || JSON.stringify(body)}`, true);
    return null;
  }
  return body;
}

function actionButton(label, path, done) {
  return el("button", {
    type: "button",
    onclick: async () => {
      const body = await post(path);
      if (body !== null) { say(done(body), false); refresh(); }
    },
  }, label);
}

function timelineCell(timeline) {
  const cell = el("td", { class: "timeline" });
  for (const st of timeline) {
    const cls = st.error ? "stage failed" : (st.at === null ? "stage missing" : "stage");
    const text = st.at === null ? st.stage : `${st.stage}: ${fmtSeconds(st.duration_s)}`;
    cell.append(el("span", { class: cls, title: st.error || fmtTime(st.at),
                             "data-stage": st.stage }, text));
  }
  return cell;
}

function instancesCell(s) {
  const cell = el("td", {}, s.instances);
  if (s.uid_flagged) {
    cell.append(" ", el("span", {
      class: "flagged", "data-uid-flagged": s.uid_flagged,
      title: "stored with a tolerated UID defect (e.g. a leading-zero component); " +
             `details: /api/studies/${s.study_instance_uid}/uid-defects`,
    }, `(${s.uid_flagged} UID-flagged)`));
  }
  return cell;
}

function renderStudies(studies) {
  fill("studies", studies.map((s) => {
    const job = s.job;
    const state = s.state;
    const actions = el("td", {});
    if (job) {
      actions.append(actionButton("retry", `/api/jobs/${job.job_id}/retry`,
                                  (b) => `job ${b.job_id}: retry queued`));
      actions.append(actionButton("resend", `/api/jobs/${job.job_id}/resend`,
                                  (b) => `job ${b.job_id}: resend queued`));
    }
    const err = job ? (job.not_routed_reason ? `not routed: ${job.not_routed_reason}`
                                             : (job.error || "")) : "";
    return el("tr", { "data-study-uid": s.study_instance_uid, class: `state-${state.replace(/ /g, "-")}` },
      el("td", { class: "uid" }, s.study_instance_uid),
      el("td", {}, s.patient_id),
      instancesCell(s),
      el("td", {}, job ? job.job_id : "-"),
      el("td", { class: "state" }, state),
      timelineCell(s.timeline),
      el("td", { class: "error" }, err),
      actions);
  }));
}

function render(data) {
  STATE.refreshMs = Math.max(500, (data.refresh_s || 2) * 1000);
  document.getElementById("node-ae").textContent = data.node.ae_title;
  document.getElementById("node-info").textContent =
    `DICOM ${data.node.host}:${data.node.port} · storage ${data.node.storage_dir} · ` +
    `configuration generation ${data.node.config_generation}` +
    (data.writes_enabled ? "" : " · write actions disabled (no token configured)");
  document.getElementById("warnings").replaceChildren(
    ...data.warnings.map((w) => el("li", {}, w)));
  renderStudies(data.studies);
  fill("queues", Object.entries(data.queues).map(([q, n]) =>
    el("tr", {}, el("td", {}, q), el("td", {}, n === null ? "unreachable" : n))));
  fill("jobcounts", Object.entries(data.jobs).map(([s, n]) =>
    el("tr", {}, el("td", {}, s), el("td", {}, n))));
  fill("workers", data.workers.map((w) => el("tr", {},
    el("td", {}, `${w.hostname} (pid ${w.pid})`),
    el("td", { class: w.alive ? "ok" : "bad" }, w.alive ? "yes" : "no"),
    el("td", {}, w.device), el("td", {}, w.queues),
    el("td", {}, w.current_job === null ? "-" : `job ${w.current_job}`),
    el("td", {}, fmtTime(w.last_seen)))));
  const d = data.disk;
  document.getElementById("disk").replaceChildren(el("span", { class: d.ok ? "ok" : "bad" },
    `${fmtBytes(d.free_bytes)} free; watermark ${fmtBytes(d.watermark_bytes)}` +
    (d.ok ? "" : " — BELOW WATERMARK: C-STORE is refused")));
  fill("peers", data.peers.map((p) => el("tr", {}, el("td", {}, p.ae_title), el("td", {}, p.host))));
  fill("destinations", data.destinations.map((dst) => el("tr", {},
    el("td", {}, dst.name), el("td", {}, dst.ae_title), el("td", {}, `${dst.host}:${dst.port}`),
    el("td", {}, dst.objects.join(", ")),
    el("td", {}, actionButton("C-ECHO", `/api/destinations/${encodeURIComponent(dst.name)}/echo`,
      (b) => b.ok ? `${b.destination}: C-ECHO Success in ${b.elapsed_ms} ms`
                  : `${b.destination}: C-ECHO failed: ${b.error || b.status}`)))));
  document.getElementById("routing").replaceChildren(...(data.routing.length
    ? data.routing.map((r) => el("li", {}, `${r.name} → ${r.pipeline}`))
    : [el("li", { class: "bad" }, "no routing rule: nothing is analysed")]));
  document.getElementById("updated").textContent = fmtTime(data.time);
}

function renderModels(models) {
  const box = document.getElementById("models");
  box.replaceChildren(...models.map((m) => {
    if (m.error) return el("p", { class: "bad" }, `${m.path}: ${m.error}`);
    const metrics = Object.entries(m.metrics || {}).slice(0, 8)
      .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join("; ");
    return el("details", {},
      el("summary", {}, `${m.name} ${m.version} — ${m.task} — ${m.intended_use}`),
      el("p", { class: "muted" }, `licence: ${m.license}; metrics: ${metrics || "none"}`),
      el("pre", {}, m.card || "(no model card)"));
  }));
}

async function refresh() {
  clearTimeout(STATE.timer);
  try {
    const rsp = await fetch("/api/overview", { cache: "no-store" });
    if (!rsp.ok) throw new Error(`overview: HTTP ${rsp.status}`);
    render(await rsp.json());
  } catch (e) {
    say(`cannot reach the node: ${e.message}`, true);
  }
  STATE.timer = setTimeout(refresh, STATE.refreshMs);
}

async function loadModels() {
  try {
    const rsp = await fetch("/api/models", { cache: "no-store" });
    if (rsp.ok) renderModels(await rsp.json());
  } catch (e) {
    say(`cannot list model bundles: ${e.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const saved = sessionStorage.getItem("cad-node-token");
  if (saved) document.getElementById("token").value = saved;
  document.getElementById("token").addEventListener("change", () =>
    sessionStorage.setItem("cad-node-token", token()));
  document.getElementById("reload").addEventListener("click", async () => {
    const b = await post("/api/reload");
    if (b !== null) { say(`reloaded (generation ${b.generation}): ${b.changes.join("; ") || "no change"}`, false); refresh(); }
  });
  document.getElementById("replay").addEventListener("click", async () => {
    const b = await post("/api/dead-letter/replay");
    if (b !== null) { say(`replayed jobs: ${b.replayed.join(", ") || "none"}`, false); refresh(); }
  });
  loadModels();
  refresh();
});
