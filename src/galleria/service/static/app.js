// galleria web UI: plain JS, no dependencies (works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, upgradeTimer: null, base: "/v1" };

// several galleries on one server: /?gallery=NAME picks one (a selector lists them)
const wanted = new URLSearchParams(location.search).get("gallery");
if (wanted) state.base = "/v1/galleries/" + encodeURIComponent(wanted);
function apiPath(p) { return state.base + p; }

function token() { return $("token").value.trim() || localStorage.getItem("galleria-token") || ""; }
function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, headers: { ...headers(), ...(opts.headers || {}) } });
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const msg = body && body.message ? body.message : res.status + " " + res.statusText;
    throw new Error(msg);
  }
  return body;
}

function message(text, isError = false) {
  const m = $("message");
  m.textContent = text;
  m.className = "message" + (isError ? " error" : "");
}

function short(fp) { return fp ? fp.split("@")[0] : "-"; }

async function loadGalleries() {
  try {
    const res = await api("/v1/galleries");
    const names = res.galleries.map((g) => g.name);
    if (names.length < 2) return;
    const sel = $("gallery");
    sel.innerHTML = names.map((n) => `<option>${escapeHtml(n)}</option>`).join("");
    sel.value = wanted || names[0];
    if (!wanted) state.base = "/v1/galleries/" + encodeURIComponent(names[0]);
    $("gallery-pick").hidden = false;
    sel.addEventListener("change", () => { location.search = "?gallery=" +
      encodeURIComponent(sel.value); });
  } catch (e) { /* one gallery, or reads need a token */ }
}

async function loadInfo() {
  try {
    const info = await api(apiPath("/info"));
    state.info = info;
    const models = info.spaces.filter((s) => s.primary).map((s) =>
      `searching with <b>${escapeHtml(s.model || short(s.space))}</b>`);
    $("stats").innerHTML = `<b>${escapeHtml(info.gallery)}</b> · <b>${info.items}</b> items` +
      (models.length ? " · " + models.join("") : "") + (info.upgrade ? " · upgrading" : "");
    const f = info.payload_fields || {};
    const names = Object.keys(f).sort();
    $("fields").textContent = names.length ?
      "fields: " + names.map((n) => `${n} (${Object.keys(f[n]).join("/")})`).join(", ") :
      "no metadata to filter on";
    document.title = "galleria: " + info.gallery;
  } catch (e) {
    $("stats").textContent = "info unavailable: " + e.message;
  }
}

function whereList() {
  return $("where").value.split(";").map((s) => s.trim()).filter((s) => s);
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;" }[c]));
}

async function pollUpgrade() {
  clearTimeout(state.upgradeTimer);
  let next = 10000;
  try {
    const st = await api(apiPath("/upgrade"));
    if (st.active) {
      $("upgrade").hidden = false;
      const pct = (100 * st.fraction).toFixed(1);
      $("upgrade-fill").style.width = pct + "%";
      $("upgrade-bar").setAttribute("aria-valuenow", pct);
      $("upgrade-models").textContent = `${short(st.old_space)} → ${short(st.new_space)}`;
      const running = st.running || (st.server_run && st.server_run.running);
      const rate = st.items_per_s ? `${st.items_per_s.toFixed(1)} items/s` : "";
      const eta = running && st.eta_s != null && st.remaining ?
        `, ETA ${Math.round(st.eta_s)} s` : "";
      $("upgrade-text").textContent =
        `${pct} % (${st.done} of ${st.total} items on the new model) · ` +
        (running ? "running" : "paused: run `galleria upgrade run` or POST /v1/upgrade") +
        (rate ? ` · last run ${rate}${eta}` : "");
      if (!state.info || !state.info.upgrade) loadInfo();
      next = 1500;
    } else if (!$("upgrade").hidden) {
      $("upgrade").hidden = true;
      loadInfo();
    }
  } catch (e) { /* reads may need a token */ }
  state.upgradeTimer = setTimeout(pollUpgrade, next);
}

function itemPath(id, what) {
  return apiPath("/items/" + encodeURIComponent(id).replace(/%2F/g, "/") + what);
}

async function imageUrl(url) {
  if (!token()) return url;
  const res = await fetch(url, { headers: headers() });
  if (!res.ok) return "";
  return URL.createObjectURL(await res.blob());
}

async function openViewer(r) {
  $("viewer-title").textContent = `${r.id} · score ${r.score.toFixed(4)}`;
  $("viewer-meta").textContent = metaText(r.metadata);
  $("viewer-img").removeAttribute("src");
  $("viewer").hidden = false;
  const u = await imageUrl(itemPath(r.id, "/image"));
  if (u) $("viewer-img").src = u;
}

function closeViewer() { $("viewer").hidden = true; }

async function thumbUrl(id) {
  const url = itemPath(id, "/thumbnail?size=256");
  if (!token()) return url;
  const res = await fetch(url, { headers: headers() });
  if (!res.ok) return "";
  return URL.createObjectURL(await res.blob());
}

function metaText(meta) {
  if (!meta) return "";
  return Object.entries(meta)
    .filter(([k]) => !["uploaded", "image_size"].includes(k))
    .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ");
}

function render(resp, label) {
  const grid = $("results");
  grid.innerHTML = "";
  const filt = whereList();
  message(`${resp.results.length} results for ${label}` +
    (filt.length ? ` where ${filt.join(" and ")}` : "") +
    (resp.merge ? " · during the upgrade both models answer" : ""));
  resp.results.forEach((r, n) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = r.id;
    card.title = "more like this";
    card.innerHTML = `<div class="thumb"><img alt="" loading="lazy"></div>
      <button class="zoom" type="button" title="open full size">full size</button>
      <div class="body"><div class="id"></div>
      <div class="score" title="cosine similarity (1 = the same image)">#${n + 1} · score
        ${r.score.toFixed(3)}</div><div class="meta"></div></div>`;
    card.querySelector(".id").textContent = r.id;
    card.querySelector(".meta").textContent = metaText(r.metadata);
    thumbUrl(r.id).then((u) => { if (u) card.querySelector("img").src = u; });
    card.querySelector(".zoom").addEventListener("click", (e) => {
      e.stopPropagation(); openViewer(r);
    });
    card.addEventListener("click", () => searchById(r.id));
    grid.appendChild(card);
  });
}

async function searchFile(file) {
  if (!file) return;
  state.last = { file };
  const fd = new FormData();
  fd.append("image", file);
  fd.append("k", $("k").value);
  whereList().forEach((w) => fd.append("where", w));
  $("query-preview").src = URL.createObjectURL(file);
  $("query-preview").hidden = false;
  $("drop-text").textContent = file.name;
  $("query-label").textContent = "query: " + file.name;
  message("searching…");
  try {
    render(await api(apiPath("/search"), { method: "POST", body: fd }), file.name);
  } catch (e) { message(e.message, true); }
}

async function searchById(id) {
  $("query-label").textContent = "more like: " + id;
  $("query-preview").hidden = false;
  thumbUrl(id).then((u) => { if (u) $("query-preview").src = u; });
  $("drop-text").textContent = id;
  message("searching…");
  try {
    state.last = { id };
    const w = whereList();
    const body = JSON.stringify({ id, k: Number($("k").value), ...(w.length ? { where: w } : {}) });
    render(await api(apiPath("/search"), { method: "POST", body,
      headers: { "Content-Type": "application/json" } }), id);
  } catch (e) { message(e.message, true); }
}

function setup() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  $("token").value = localStorage.getItem("galleria-token") || "";
  $("token").addEventListener("change", () => {
    localStorage.setItem("galleria-token", $("token").value.trim());
    loadInfo(); pollUpgrade();
  });
  $("where").addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    if (state.last && state.last.file) searchFile(state.last.file);
    else if (state.last && state.last.id) searchById(state.last.id);
  });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeViewer(); });
  loadGalleries().then(() => { loadInfo(); pollUpgrade(); });
  setInterval(loadInfo, 15000);
}

setup();
