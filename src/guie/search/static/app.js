// guie image search page: plain JavaScript, no build step, no external resources (works offline).
// Every value from the server is put on the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("guie-api-key") || "", urls: [], busy: false,
                query: null, offset: 0, k: 10, depth: 0, shown: 0 };
const NO_CUTOFF = 2;  // the slider's right end: no cut-off (unit-length embeddings are at most 2 apart)

function headers() {
  return state.key ? { "X-API-Key": state.key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response;
}

async function loadInfo() {
  try {
    const info = await (await api("health")).json();
    if (!info.index) {
      // A keyed server answers /health with liveness only until the key is given: ask for it (once per tab).
      $("index-info").textContent = "";
      $("key-form").hidden = false;
      setStatus(state.key ? "that API key was not accepted: enter it again" : "this server needs an API key: enter it above",
                Boolean(state.key));
      return;
    }
    $("index-info").textContent = `index “${info.index}”: ${info.items} images, ${info.dim}-d, ${info.backend}`;
  } catch (e) {
    $("index-info").textContent = "";
    setStatus(e.message, true);
  }
}

function forgetImages() {
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls = [];
}

async function thumbnailInto(img, path) {
  try {
    const blob = await (await api(path)).blob();
    const url = URL.createObjectURL(blob);
    state.urls.push(url);
    img.src = url;
  } catch (e) {
    img.alt = "no thumbnail";
  }
}

function showQuery(src, caption) {
  const img = $("query-image");
  img.src = src;
  img.hidden = false;
  $("query-caption").textContent = caption;
}

function maxDistance() {
  const value = parseFloat($("max-distance").value);
  return value >= NO_CUTOFF ? null : value;
}

function showMaxDistance() {
  const value = maxDistance();
  $("max-distance-value").textContent = value == null ? "any" : value.toFixed(2);
}

// `query` makes a fresh FormData holding the query (an upload or an item); `more` asks for the next page.
async function search(query, more = false) {
  if (state.busy) return;
  state.busy = true;
  let k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 10));
  const offset = more ? state.offset + state.k : 0;
  if (more && state.depth) k = Math.max(1, Math.min(k, state.depth - offset));  // the last page stops at max_depth
  const form = query();
  form.append("k", String(k));
  form.append("offset", String(offset));
  const cutoff = maxDistance();
  if (cutoff != null) form.append("max_distance", String(cutoff));
  const where = $("where").value.trim();
  if (where) for (const cond of where.split(/\s+/)) form.append("where", cond);
  setStatus("searching…");
  const started = performance.now();
  try {
    const body = await (await api("search", { method: "POST", body: form })).json();
    const result = body.results.length ? body.results[0] : { hits: [], more: false };
    state.query = query;
    state.offset = offset;
    state.k = k;
    state.depth = body.max_depth;
    render(result.hits, more);
    $("more").hidden = !result.more;
    $("no-match").hidden = state.shown > 0 || cutoff == null;
    const within = cutoff == null ? "" : ` within distance ${cutoff.toFixed(2)}`;
    setStatus(`${state.shown} results${within} in ${Math.round(performance.now() - started)} ms`);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.busy = false;
  }
}

function render(hits, append) {
  const results = $("results");
  if (!append) {
    forgetImages();
    results.replaceChildren();
    state.shown = 0;
  }
  const first = state.shown;
  state.shown += hits.length;
  hits.forEach((hit, j) => {
    const i = first + j;
    const card = document.createElement("button");
    card.type = "button";
    card.className = "hit";
    card.dataset.id = String(hit.id);
    card.dataset.distance = String(hit.distance);
    card.dataset.label = hit.label == null ? "" : String(hit.label);
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = `result ${i + 1}`;
    thumbnailInto(img, hit.thumbnail);
    const head = document.createElement("div");
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${i + 1} `;
    const distance = document.createElement("span");
    distance.className = "distance";
    distance.textContent = `distance ${hit.distance.toFixed(3)}`;
    head.append(rank, distance);
    const meta = document.createElement("dl");
    const fields = { id: hit.id, label: hit.label, ...(hit.metadata || {}) };
    for (const [key, value] of Object.entries(fields)) {
      if (value == null || value === "") continue;
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      meta.append(dt, dd);
    }
    card.append(img, head, meta);
    card.addEventListener("click", () => {
      showQuery(img.src, `item ${hit.id}${hit.label ? ` (${hit.label})` : ""}`);
      search(() => {
        const form = new FormData();
        form.append("item", String(hit.id));
        return form;
      });
    });
    results.append(card);
  });
}

function searchFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("that is not an image", true);
    return;
  }
  const url = URL.createObjectURL(file);
  showQuery(url, file.name ? `uploaded: ${file.name}` : "pasted image");
  search(() => {
    const form = new FormData();
    form.append("files", file, file.name || "pasted.png");
    return form;
  });
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) {
    if (item.kind === "file" && item.type.startsWith("image/")) {
      searchFile(item.getAsFile());
      return;
    }
  }
});
$("file-input").addEventListener("change", (e) => {
  if (e.target.files.length) searchFile(e.target.files[0]);
  e.target.value = "";
});
$("max-distance").addEventListener("input", showMaxDistance);
$("max-distance").addEventListener("change", () => { if (state.query) search(state.query); });
$("more").addEventListener("click", () => { if (state.query) search(state.query, true); });
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("api-key").value;
  sessionStorage.setItem("guie-api-key", state.key);
  $("key-form").hidden = true;
  setStatus("");
  loadInfo();
});
showMaxDistance();
loadInfo();

