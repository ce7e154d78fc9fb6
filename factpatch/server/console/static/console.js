// factpatch console: a page over the JSON API (/api/v1, factpatch/server/gateway.py).
// The page hides what a token may not do; the server refuses it regardless.
"use strict";

const state = { token: sessionStorage.getItem("factpatch-token") || "", scopes: [], versions: [], head: 0, edits: {}, replicas: [] };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------- the API

async function api(path, body) {
  const headers = { "content-type": "application/json" };
  if (state.token) headers.authorization = "Bearer " + state.token;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
  const res = await fetch("/api/v1/" + path, init);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error((data.error && data.error.message) || res.statusText);
    err.status = res.status;
    throw err;
  }
  return data;
}

const may = (scope) => state.scopes.includes(scope);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return new Date(seconds * 1000).toLocaleString();
}

const prob = (logprob) => {
  const p = Math.exp(logprob);
  return p >= 0.001 ? p.toFixed(3) : p.toExponential(1);
};

// ------------------------------------------------------------------------------- sign-in

async function signIn(token) {
  state.token = token;
  const me = await api("session");
  state.scopes = me.scopes;
  sessionStorage.setItem("factpatch-token", token);
  $("who").textContent = `signed in as ${me.name} (${me.scopes.join(", ")})`;
  $("model").textContent = me.model;
  $("signin").hidden = true;
  $("tabs").hidden = false;
  $("signout").hidden = !me.auth;
  for (const b of document.querySelectorAll(".write")) b.hidden = !may("edit");
  show("timeline");
  refresh();
}

function signOut() {
  sessionStorage.removeItem("factpatch-token");
  location.reload();
}

function show(view) {
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + view;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === view);
  if (view === "ask") fillVersionPickers();
}

// ------------------------------------------------------------------------------- timeline

async function editInfo(id) {
  if (!state.edits[id]) {
    const e = await api("LedgerService/GetEdit", { edit_id: id });
    state.edits[id] = { ...e, requests: JSON.parse(e.requests_json) };
  }
  return state.edits[id];
}

const factText = (r) => `${r.prompt.replace("{}", r.subject)} → ${r.target}`;

async function facts(ids) {
  const out = [];
  for (const id of ids) for (const r of (await editInfo(id)).requests) out.push({ id, text: factText(r) });
  return out;
}

// What moving the served weights from version `from` to `to` changes, in facts.
async function change(from, to) {
  const a = state.versions.find((v) => v.number === from), b = state.versions.find((v) => v.number === to);
  if (!a || !b) return { removed: [], restored: [] };  // older than the 100 versions listed
  return {
    removed: await facts(a.edit_ids.filter((e) => !b.edit_ids.includes(e))),
    restored: await facts(b.edit_ids.filter((e) => !a.edit_ids.includes(e))),
  };
}

function reportCell(v) {
  if (!v.checks_json) return "";
  const report = JSON.parse(v.checks_json);
  const items = ((report.checks.edit || {}).items || []).filter((i) => i.rule === "beat");
  return el("div", { class: "report" },
    el("span", { class: "badge " + report.outcome }, "checks " + report.outcome),
    items.map((i) => el("div", { class: i.passed ? "" : "bad" },
      `${i.prompt} → P(${i.answer.trim()}) ${prob(i.after)}` +
      (i.rival ? ` vs P(${i.rival.trim()}) ${prob(i.rival_after)}` : ""))));
}

async function factsCell(v) {
  if (v.cause === "edit") return el("ul", {}, (await facts(v.cause_json.edits)).map((f) => el("li", {}, f.text)));
  if (v.parent < 0) return el("span", { class: "muted" }, "the base weights");
  const c = await change(v.parent, v.number);
  const what = v.cause === "rollback" ? `to version ${v.cause_json.to}` : "";
  return el("div", {}, what,
    el("ul", {}, c.removed.map((f) => el("li", { class: "removed" }, "− " + f.text)),
      c.restored.map((f) => el("li", { class: "added" }, "+ " + f.text))));
}

function actions(v) {
  const buttons = [];
  if (!may("admin")) return buttons;
  const head = state.versions.find((x) => x.number === state.head);
  if (v.number !== state.head) {
    buttons.push(el("button", { class: "rollback", "data-version": v.number, onclick: () => confirmRollback(v.number) }, "Roll back to here"));
  }
  if (v.cause === "edit") {
    for (const id of v.cause_json.edits) {
      if (head && head.edit_ids.includes(id)) {
        buttons.push(el("button", { class: "revert", "data-edit": id, onclick: () => confirmRevert(id) }, "Revert this edit"));
      }
    }
  }
  return buttons;
}

async function renderVersions() {
  const body = $("versions").querySelector("tbody");
  const rows = [];
  for (const v of [...state.versions].reverse()) {
    const servers = state.replicas.filter((r) => r.version === v.number).map((r) => el("span", { class: "badge serving" }, r.server));
    rows.push(el("tr", { "data-version": v.number, class: v.number === state.head ? "head" : "" },
      el("td", {}, "v" + v.number, v.number === state.head ? el("span", { class: "badge" }, "head") : null, ...servers),
      el("td", {}, v.cause), el("td", {}, v.actor), el("td", {}, ago(v.created)),
      el("td", {}, await factsCell(v)), el("td", {}, reportCell(v)), el("td", {}, actions(v))));
  }
  body.replaceChildren(...rows);
  $("head").textContent = `head: v${state.head}`;
}

function renderReplicas() {
  const body = $("replicas").querySelector("tbody");
  body.replaceChildren(...state.replicas.map((r) => el("tr", {},
    el("td", {}, r.server), el("td", { class: "serves" }, "v" + r.version),
    el("td", {}, r.ready ? "ready" : "not ready " + r.fault), el("td", {}, ago(r.seen)))));
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const head = Number((await api("LedgerService/GetHead", {})).number);
    const start = Math.max(0, head - 99);
    const listed = (await api("LedgerService/ListVersions", { start, limit: 100 })).versions;
    const replicas = (await api("LedgerService/ListReplicas", {})).replicas;
    const changed = head !== state.head || listed.length !== state.versions.length ||
      JSON.stringify(replicas.map((r) => [r.server, r.version, r.ready])) !== JSON.stringify(state.replicas.map((r) => [r.server, r.version, r.ready]));
    state.versions = listed.map((v) => ({ ...v, number: Number(v.number), parent: Number(v.parent), cause_json: JSON.parse(v.cause_json) }));
    state.head = head;
    state.replicas = replicas.map((r) => ({ ...r, version: Number(r.version) }));
    renderReplicas();
    if (changed || !$("versions").querySelector("tbody tr")) await renderVersions();
  } catch (err) {
    if (err.status === 401) signOut();
  } finally {
    refreshing = false;
  }
}

// ------------------------------------------------------------------------------- undo

function confirmDialog(title, body, run) {
  $("confirm-title").textContent = title;
  $("confirm-body").replaceChildren(body);
  $("confirm-error").textContent = "";
  $("confirm").hidden = false;
  $("confirm-yes").onclick = async () => {
    try {
      await run();
      $("confirm").hidden = true;
      refresh();
    } catch (err) {
      $("confirm-error").textContent = err.message;
    }
  };
}

function changeList(c) {
  if (!c.removed.length && !c.restored.length) return el("p", {}, "No fact changes (the same edits are active).");
  return el("ul", {}, c.removed.map((f) => el("li", { class: "removed" }, "removed: " + f.text)),
    c.restored.map((f) => el("li", { class: "added" }, "restored: " + f.text)));
}

async function confirmRollback(to) {
  const c = await change(state.head, to);
  confirmDialog(`Roll back to version ${to}?`,
    el("div", {}, el("p", {}, `A new version will serve exactly the weights of version ${to}.`), changeList(c)),
    () => api("LedgerService/Rollback", { to }));
}

async function confirmRevert(id) {
  const f = await facts([id]);
  confirmDialog("Revert this edit?",
    el("div", {}, el("p", {}, "A new version will serve the head without this edit:"),
      el("ul", {}, f.map((x) => el("li", { class: "removed" }, "removed: " + x.text)))),
    () => api("LedgerService/RevertEdit", { edit_id: id }));
}

// ------------------------------------------------------------------------------- ask

function fillVersionPickers() {
  for (const [id, pick] of [["ask-a", state.head], ["ask-b", Math.max(0, state.head - 1)]]) {
    const select = $(id), keep = select.value;
    select.replaceChildren(...[...state.versions].reverse().map((v) => el("option", { value: v.number }, `v${v.number} (${v.cause})`)));
    select.value = keep !== "" && state.versions.some((v) => String(v.number) === keep) ? keep : String(pick);
  }
}

async function answer(prompt, version, tokens, cont) {
  const out = await api("GenerateService/Generate", { prompt, version, max_new_tokens: tokens, temperature: 0 });
  const chunks = out.messages.map((m) => m.text).filter((t) => t !== "");
  const scored = cont ? await api("GenerateService/Score", { prompt, continuation: cont, version }) : null;
  return { chunks, scored };
}

async function ask(event) {
  event.preventDefault();
  $("ask-error").textContent = "";
  const prompt = $("ask-prompt").value, tokens = Number($("ask-tokens").value), cont = $("ask-cont").value;
  const versions = [Number($("ask-a").value), Number($("ask-b").value)];
  try {
    const [a, b] = await Promise.all(versions.map((v) => answer(prompt, v, tokens, cont)));
    const column = (version, mine, other) => el("div", { class: "answer", "data-version": version },
      el("h3", {}, "v" + version),
      el("p", {}, el("span", { class: "muted" }, prompt),
        mine.chunks.map((t, i) => el("span", { class: t === other.chunks[i] ? "tok" : "tok diff" }, t))),
      mine.scored ? el("p", { class: "score" }, `P(${cont.trim()}) = ${prob(mine.scored.logprob)}`) : null);
    $("ask-out").replaceChildren(column(versions[0], a, b), column(versions[1], b, a));
  } catch (err) {
    $("ask-error").textContent = err.message;
  }
}

// ------------------------------------------------------------------------------- correct

async function follow(jobId, render) {
  for (;;) {
    const job = await api("EditService/GetJob", { job_id: jobId });
    render(job);
    if (!["QUEUED", "RUNNING"].includes(job.state)) return job;
    await new Promise((r) => setTimeout(r, 400));
  }
}

function renderJob(job) {
  const box = $("job");
  box.hidden = false;
  const pct = Math.round(100 * (job.fraction || 0));
  const parts = [el("div", {}, `job ${job.id}: `, el("b", { class: "state" }, job.state), job.phase ? ` — ${job.phase} ${pct}%` : "")];
  if (job.state === "SUCCEEDED") parts.push(el("div", { class: "committed" }, `committed as version ${job.version}`));
  if (job.error) parts.push(el("div", { class: "error" }, job.error));
  box.replaceChildren(...parts);
}

async function submitEdits(edits, method) {
  $("edit-error").textContent = "";
  try {
    const job = await api("EditService/SubmitEdits", { edits, options: { method } });
    const done = await follow(job.id, renderJob);
    if (done.state === "SUCCEEDED") refresh();
  } catch (err) {
    $("edit-error").textContent = err.message;
  }
}

function submitOne(event) {
  event.preventDefault();
  submitEdits([{ prompt: $("edit-prompt").value, subject: $("edit-subject").value, target: $("edit-target").value }], "rome");
}

async function submitBatch(event) {
  event.preventDefault();
  const file = $("batch-file").files[0];
  if (!file) { $("edit-error").textContent = "batch: choose a JSONL file"; return; }
  const lines = (await file.text()).split("\n").map((l) => l.trim()).filter(Boolean);
  let edits;
  try {
    edits = lines.map((l, i) => {
      try { return JSON.parse(l); } catch (e) { throw new Error(`line ${i + 1}: not JSON (${e.message})`); }
    });
  } catch (err) {
    $("edit-error").textContent = err.message;
    return;
  }
  submitEdits(edits, "memit");
}

// ------------------------------------------------------------------------------- locate

async function trace(event) {
  event.preventDefault();
  $("trace-error").textContent = "";
  const out = $("traces");
  out.replaceChildren();
  const base = { prompt: $("trace-prompt").value, subject: $("trace-subject").value, samples: Number($("trace-samples").value), render_png: true };
  try {
    const jobs = [];
    for (const kind of ["hidden", "mlp", "attn"]) jobs.push([kind, await api("TraceService/SubmitTrace", { ...base, kind })]);
    for (const [kind, job] of jobs) {
      const box = el("div", { class: "trace", "data-kind": kind }, el("h3", {}, kind), el("p", { class: "muted" }, job.state));
      out.append(box);
      follow(job.id, (j) => {
        if (j.state === "SUCCEEDED" && j.trace) {
          box.replaceChildren(el("h3", {}, kind), el("p", { class: "muted" }, `answer "${j.trace.answer}", version v${j.trace.version}`),
            el("img", { src: "data:image/png;base64," + j.trace.png, alt: kind + " trace" }));
        } else {
          box.querySelector("p").textContent = j.state + (j.error ? ": " + j.error : "");
        }
      }).catch((err) => { $("trace-error").textContent = err.message; });
    }
  } catch (err) {
    $("trace-error").textContent = err.message;
  }
}

// ------------------------------------------------------------------------------- start

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("token").value.trim()).catch((err) => { $("signin-error").textContent = err.message; });
  });
  $("signout").addEventListener("click", signOut);
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => show(t.dataset.view));
  $("ask-form").addEventListener("submit", ask);
  $("edit-form").addEventListener("submit", submitOne);
  $("batch-form").addEventListener("submit", submitBatch);
  $("trace-form").addEventListener("submit", trace);
  $("confirm-no").addEventListener("click", () => { $("confirm").hidden = true; });
  setInterval(() => { if (!$("tabs").hidden) refresh(); }, 1500);
  signIn(state.token).catch(() => { state.token = ""; });  // a stored token, or a server without auth
});
