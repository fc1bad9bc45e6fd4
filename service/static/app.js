// The explanation page: search by image, see ranked results, open why a result matches.
// Plain JavaScript, no build step, no external requests: everything comes from this server.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = {
  query: null, results: [], current: null, explanation: null, page: 0, pageSize: 24,
  next: null, path: null, options: null, marks: new Map(),  // marks: gallery id -> "like" | "unlike"
};

// ---- talking to the API ------------------------------------------------------------------

function headers() {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem("diml-key", key);
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  } catch (e) {
    throw new Error("the server could not be reached");
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error.message} (${response.status} ${body.error.code})`;
  } catch (e) { /* not JSON */ }
  return `the server answered ${response.status}`;
}

// Gallery images may need the API key, which an <img src> cannot send: fetch them as blobs.
const imageCache = new Map();
async function galleryImage(id) {
  if (!imageCache.has(id)) {
    imageCache.set(id, api(`/gallery/${id}/image`).then((r) => r.blob()).then((b) => URL.createObjectURL(b)));
  }
  return imageCache.get(id);
}

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.className = isError ? "error" : "";
  status.setAttribute("role", isError ? "alert" : "status");
}

// ---- search ------------------------------------------------------------------------------

function labelList(id) {
  return $(id).value.split(",").map((l) => l.trim()).filter((l) => l);
}

function searchParams() {
  const k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 12));
  const rerank = $("rerank").checked ? 100 : 0;
  const params = new URLSearchParams({ k, rerank_k: rerank, explain: "true", matches: 8 });
  for (const label of labelList("labels")) params.append("label", label);
  for (const label of labelList("exclude-labels")) params.append("exclude_label", label);
  const min = $("min-score").value.trim();
  if (min !== "" && Number.isFinite(Number(min))) params.set("min_score", min);
  return params;
}

async function searchFile(file) {
  if (!file) { say("Choose an image first.", true); return; }
  state.query = { kind: "upload", file, url: URL.createObjectURL(file), name: file.name };
  await runSearch("/search", () => { const f = new FormData(); f.append("image", file); return f; });
}

async function searchById(id) {
  state.query = { kind: "item", id, url: await galleryImage(id), name: `gallery item ${id}` };
  await runSearch(`/search/by-id/${id}`, null);
}

// More like the query and the results marked "like", less like those marked "unlike".
async function searchExamples() {
  const params = searchParams();
  for (const [id, mark] of state.marks) params.append(mark === "like" ? "positive_id" : "negative_id", id);
  const query = state.query;
  if (query.kind === "item" && !state.marks.has(query.id)) params.append("positive_id", query.id);
  const path = "/search/examples";
  const form = () => { const f = new FormData(); if (query.kind === "upload") f.append("positive", query.file); return f; };
  state.marks = new Map();
  await runSearch(path, form, params);
}

// One search: the first page, then "More results" continues the same ranking (next_offset).
async function runSearch(path, form, params = searchParams(), append = false) {
  say("Searching…");
  if (!append) $("detail").hidden = true;
  try {
    const options = { method: "POST" };
    if (form) options.body = form();
    const body = await (await api(`${path}?${params}`, options)).json();
    state.path = path; state.form = form; state.params = params; state.next = body.next_offset;
    state.results = append ? state.results.concat(body.results) : body.results;
    const note = params.has("min_score") ? ` scoring at least ${params.get("min_score")}` : "";
    say(`${state.results.length} results${note} for ${state.query.name}.`);
    await showResults();
  } catch (e) {
    say(`Search failed: ${e.message}`, true);
  }
}

async function moreResults() {
  if (state.next === null) return;
  const params = new URLSearchParams(state.params);
  params.set("offset", state.next);
  await runSearch(state.path, state.form, params, true);
}

function toggleMark(id, mark, buttons) {
  if (state.marks.get(id) === mark) state.marks.delete(id); else state.marks.set(id, mark);
  for (const b of buttons) b.setAttribute("aria-pressed", String(state.marks.get(id) === b.dataset.mark));
  const likes = [...state.marks.values()].filter((m) => m === "like").length;
  $("examples-bar").hidden = state.marks.size === 0;
  $("examples-note").textContent = `${likes} more like this, ${state.marks.size - likes} less like this`;
}

async function showResults() {
  const grid = $("results");
  grid.replaceChildren();
  $("results-section").hidden = false;
  $("more-results").hidden = state.next === null;
  $("examples-bar").hidden = state.marks.size === 0;
  $("results-note").textContent = state.path === "/search/examples"
    ? "(by examples: best positive minus best negative)"
    : $("rerank").checked
      ? "(re-ranked by structural matching; the global rank is shown beside each)"
      : "(global ranking only)";
  for (const [i, hit] of state.results.entries()) {
    const card = document.createElement("div");
    card.className = "card result";
    card.dataset.id = hit.id;
    card.tabIndex = 0;
    card.setAttribute("role", "button");
    const moved = hit.global_rank - (i + 1);
    const arrow = moved > 0 ? `<span class="up">▲${moved}</span>` : moved < 0 ? `<span class="down">▼${-moved}</span>` : "";
    card.innerHTML = `<img alt=""><span class="score">${hit.score.toFixed(3)}</span>
      <span class="rank">rank ${i + 1} · global rank ${hit.global_rank} ${arrow}</span>
      <span class="label"></span>
      <span class="marks"><button type="button" class="like" data-mark="like" aria-pressed="false">more like this</button>
      <button type="button" class="unlike" data-mark="unlike" aria-pressed="false">less like this</button></span>`;
    card.querySelector(".label").textContent = hit.label ? `${hit.label} · ${hit.key}` : hit.key;
    card.querySelector("img").alt = hit.key;
    const buttons = [...card.querySelectorAll(".marks button")];
    for (const b of buttons) {
      b.setAttribute("aria-pressed", String(state.marks.get(hit.id) === b.dataset.mark));
      b.addEventListener("click", (e) => { e.stopPropagation(); toggleMark(hit.id, b.dataset.mark, buttons); });
    }
    card.addEventListener("click", () => openDetail(hit));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target === card) openDetail(hit); });
    grid.append(card);
    galleryImage(hit.id).then((url) => { card.querySelector("img").src = url; }).catch(() => {});
  }
}

// ---- one explanation -------------------------------------------------------------------

async function openDetail(hit) {
  state.current = hit;
  say(`Explaining ${hit.key}…`);
  const form = new FormData();
  if (state.query.kind === "upload") form.append("a", state.query.file);
  else form.append("a_id", state.query.id);
  form.append("b_id", hit.id);
  try {
    state.explanation = await (await api("/explain?top=8", { method: "POST", body: form })).json();
    const [qUrl, rUrl] = [state.query.url, await galleryImage(hit.id)];
    const [qImg, rImg] = await Promise.all([loadImage(qUrl), loadImage(rUrl)]);
    drawPair(state.explanation, qImg, rImg);
    drawBars(state.explanation);
    drawMatches(state.explanation);
    $("detail-title").textContent = `Why ${hit.key} matches`;
    $("detail").hidden = false;
    $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
    const e = state.explanation;
    say(`score ${e.score.toFixed(4)} = global ${e.global_similarity.toFixed(4)} + ${e.structural_weight} × structural ${e.structural_similarity.toFixed(4)}`);
  } catch (e) {
    say(`Could not explain: ${e.message}`, true);
  }
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("an image could not be shown"));
    image.src = url;
  });
}

function el(name, attributes) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  return node;
}

function heat(value, low, high) {
  if (value < 0) return `rgba(40, 90, 220, ${Math.min(1, value / (low || -1)) * 0.7})`;
  const floor = Math.max(low, 0);
  const t = high > floor ? (value - floor) / (high - floor) : 1;
  return `rgba(220, 40, 30, ${0.1 + 0.6 * Math.max(0, Math.min(1, t))})`;
}

function drawPair(e, qImg, rImg) {
  const svg = $("pair");
  svg.replaceChildren();
  const H = 360, gap = 40;
  const sq = H / qImg.naturalHeight, sr = H / rImg.naturalHeight;
  const wq = qImg.naturalWidth * sq, wr = rImg.naturalWidth * sr;
  svg.setAttribute("viewBox", `0 0 ${wq + gap + wr} ${H}`);
  svg.append(el("image", { href: qImg.src, x: 0, y: 0, width: wq, height: H }));
  svg.append(el("image", { href: rImg.src, x: wq + gap, y: 0, width: wr, height: H }));
  const all = e.contributions.query.concat(e.contributions.result);
  const low = Math.min(...all), high = Math.max(...all);
  const lines = el("g", { class: "lines" });
  const sides = [
    { name: "query", regions: e.query_regions, values: e.contributions.query, s: sq, x0: 0 },
    { name: "result", regions: e.result_regions, values: e.contributions.result, s: sr, x0: wq + gap },
  ];
  const centres = {};
  for (const side of sides) {
    centres[side.name] = side.regions.map(([x0, y0, x1, y1]) => [side.x0 + side.s * (x0 + x1) / 2, side.s * (y0 + y1) / 2]);
    side.regions.forEach(([x0, y0, x1, y1], r) => {
      const rect = el("rect", {
        class: "cell", x: side.x0 + side.s * x0, y: side.s * y0,
        width: side.s * (x1 - x0), height: side.s * (y1 - y0),
        fill: heat(side.values[r], low, high), tabindex: 0,
        "data-side": side.name, "data-region": r, "data-contribution": side.values[r],
        "aria-label": `${side.name} part ${r}: contribution ${side.values[r].toFixed(4)}`,
      });
      rect.addEventListener("mouseenter", () => focusPart(side.name, r));
      rect.addEventListener("focus", () => focusPart(side.name, r));
      svg.append(rect);
    });
  }
  const strongest = Math.max(...e.matches.map((m) => Math.abs(m.contribution)), 1e-12);
  e.matches.forEach((m, i) => {
    const [a, b] = [centres.query[m.query_region], centres.result[m.result_region]];
    lines.append(el("line", {
      class: "match", x1: a[0], y1: a[1], x2: b[0], y2: b[1],
      stroke: "#f1c40f", "stroke-width": 1 + 5 * Math.abs(m.contribution) / strongest,
      "data-rank": i + 1, "data-contribution": m.contribution,
    }));
    const label = el("text", { class: "rank-label", x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4 });
    label.textContent = `${i + 1}: ${m.contribution.toFixed(4)}`;
    lines.append(label);
  });
  svg.append(lines);
  svg.append(el("g", { class: "flows" }));
  state.centres = centres;
}

function focusPart(side, r) {
  const e = state.explanation;
  const svg = $("pair");
  svg.querySelectorAll(".cell.active").forEach((c) => c.classList.remove("active"));
  svg.querySelector(`.cell[data-side="${side}"][data-region="${r}"]`).classList.add("active");
  const flows = svg.querySelector(".flows");
  flows.replaceChildren();
  const other = side === "query" ? "result" : "query";
  const row = side === "query" ? e.plan[r] : e.plan.map((p) => p[r]);
  const sims = side === "query" ? e.similarity[r] : e.similarity.map((s) => s[r]);
  const most = Math.max(...row, 1e-12);
  const from = state.centres[side][r];
  row.forEach((flow, j) => {
    if (flow < most * 0.05) return;
    const to = state.centres[other][j];
    flows.append(el("line", {
      class: "flow", x1: from[0], y1: from[1], x2: to[0], y2: to[1], stroke: "#00e5ff",
      "stroke-width": 1 + 6 * flow / most, opacity: 0.3 + 0.7 * flow / most, "data-target": j,
    }));
  });
  const best = row.indexOf(most);
  const total = row.reduce((s, f, j) => s + f * sims[j], 0);
  $("hover-info").textContent =
    `${side} part ${r} sends most flow to ${other} part ${best}: flow ${most.toFixed(4)}, ` +
    `similarity ${sims[best].toFixed(4)}, contribution ${(most * sims[best]).toFixed(5)}; ` +
    `this part contributes ${total.toFixed(5)} in all`;
}

function drawBars(e) {
  const bars = $("bars");
  bars.replaceChildren();
  // Each part's share of the score: its contribution times the model's structural weight.
  const w = e.structural_weight;
  const parts = e.contributions.query.map((v, r) => ({ v: w * v, r })).sort((a, b) => b.v - a.v);
  const total = Math.abs(e.global_similarity) + parts.reduce((s, p) => s + Math.abs(p.v), 0) || 1;
  const add = (cls, value, title) => {
    const bar = document.createElement("div");
    bar.className = `bar ${cls}`;
    bar.style.width = `${(100 * Math.abs(value)) / total}%`;
    bar.dataset.value = value;
    bar.title = title;
    bars.append(bar);
  };
  add("global", e.global_similarity, `global similarity ${e.global_similarity.toFixed(4)}`);
  for (const p of parts) add("part", p.v, `query part ${p.r}: ${p.v.toFixed(5)}`);
  $("bars-caption").textContent =
    `grey: global similarity ${e.global_similarity.toFixed(4)}; red: the ${parts.length} query parts' ` +
    `contributions times the structural weight ${w}, largest first, summing to ` +
    `${(w * e.structural_similarity).toFixed(4)}; ` +
    `together the score ${e.score.toFixed(4)}`;
}

function drawMatches(e) {
  const body = $("matches").querySelector("tbody");
  body.replaceChildren();
  e.matches.forEach((m, i) => {
    const tr = document.createElement("tr");
    for (const v of [i + 1, m.query_region, m.result_region, m.flow.toFixed(4), m.similarity.toFixed(4), m.contribution.toFixed(5)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.append(td);
    }
    body.append(tr);
  });
}

// ---- gallery -----------------------------------------------------------------------------

async function showGallery() {
  try {
    const offset = state.page * state.pageSize;
    const body = await (await api(`/gallery?offset=${offset}&limit=${state.pageSize}`)).json();
    const pages = Math.max(1, Math.ceil(body.total / state.pageSize));
    $("gallery-count").textContent = `(${body.total} images)`;
    $("page-label").textContent = `page ${state.page + 1} of ${pages}`;
    $("prev-page").disabled = state.page === 0;
    $("next-page").disabled = state.page + 1 >= pages;
    const grid = $("gallery");
    grid.replaceChildren();
    for (const item of body.items) {
      const card = document.createElement("button");
      card.type = "button";
      card.className = "card item";
      card.title = `more like ${item.key}`;
      card.innerHTML = `<img alt=""><span class="label"></span>`;
      card.querySelector(".label").textContent = item.label || item.key;
      card.querySelector("img").alt = item.key;
      card.addEventListener("click", () => searchById(item.id));
      grid.append(card);
      galleryImage(item.id).then((url) => { card.querySelector("img").src = url; }).catch(() => {});
    }
  } catch (e) {
    say(`The gallery could not be listed: ${e.message}`, true);
  }
}

async function showLabels() {
  try {
    const labels = await (await api("/gallery/labels")).json();
    $("label-list").replaceChildren(...labels.map((l) => {
      const option = document.createElement("option");
      option.value = l.label;
      option.textContent = `${l.count} items`;
      return option;
    }));
  } catch (e) { /* the filters still take typed labels */ }
}

async function showDuplicates() {
  const box = $("duplicates");
  say("Looking for near-duplicates…");
  try {
    const body = await (await api("/duplicates?limit=50")).json();
    box.replaceChildren();
    box.hidden = false;
    const title = document.createElement("h3");
    title.textContent = `${body.total} groups of near-copies` + (body.total > 50 ? " (the 50 largest shown)" : "");
    box.append(title);
    for (const group of body.groups) {
      const section = document.createElement("div");
      section.className = "dup-group";
      const best = group.pairs[0];
      const caption = document.createElement("p");
      caption.className = "hint";
      caption.textContent = `${group.items.length} items · closest pair: global ${best.global_similarity.toFixed(3)}, structural ${best.structural_similarity.toFixed(3)}`;
      const grid = document.createElement("div");
      grid.className = "grid small";
      for (const item of group.items) {
        const card = document.createElement("button");
        card.type = "button";
        card.className = "card item";
        card.innerHTML = `<img alt=""><span class="label"></span>`;
        card.querySelector(".label").textContent = item.key;
        card.querySelector("img").alt = item.key;
        card.addEventListener("click", () => searchById(item.id));
        grid.append(card);
        galleryImage(item.id).then((url) => { card.querySelector("img").src = url; }).catch(() => {});
      }
      section.append(caption, grid);
      box.append(section);
    }
    say(`${body.total} groups of near-duplicates.`);
  } catch (e) {
    say(`Near-duplicates could not be found: ${e.message}`, true);
  }
}

function addImages(event) {
  event.preventDefault();
  const files = $("add-files").files;
  if (!files.length) { say("Choose images to add first.", true); return; }
  const form = new FormData();
  for (const f of files) form.append("images", f);
  if ($("add-label").value.trim()) form.append("label", $("add-label").value.trim());
  const xhr = new XMLHttpRequest();
  const progress = $("add-progress");
  progress.hidden = false;
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = e.loaded / e.total; };
  xhr.onload = async () => {
    progress.hidden = true;
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 201 && body) {
      const skipped = body.skipped.map((s) => `${s.filename}: ${s.reason}`).join("; ");
      say(`Added ${body.added.length} image(s); ${body.count} in the gallery.` + (skipped ? ` Skipped ${skipped}` : ""));
      $("add-form").reset();
      await showGallery();
      showLabels();
    } else {
      const why = body && body.error ? `${body.error.message} (${xhr.status} ${body.error.code})` : `the server answered ${xhr.status}`;
      say(`Adding failed: ${why}`, true);
    }
  };
  xhr.onerror = () => { progress.hidden = true; say("Adding failed: the server could not be reached", true); };
  xhr.open("POST", "/gallery");
  for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
  xhr.send(form);
}

// ---- wiring ------------------------------------------------------------------------------

function init() {
  $("api-key").value = localStorage.getItem("diml-key") || "";
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchFile($("file").files[0]); });
  $("file").addEventListener("change", () => searchFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
  });
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
  $("more-like-this").addEventListener("click", () => state.current && searchById(state.current.id));
  $("prev-page").addEventListener("click", () => { state.page -= 1; showGallery(); });
  $("next-page").addEventListener("click", () => { state.page += 1; showGallery(); });
  $("add-form").addEventListener("submit", addImages);
  $("more-results").addEventListener("click", moreResults);
  $("examples-search").addEventListener("click", searchExamples);
  $("examples-clear").addEventListener("click", () => { state.marks = new Map(); showResults(); });
  $("find-duplicates").addEventListener("click", showDuplicates);
  showGallery();
  showLabels();
}

document.addEventListener("DOMContentLoaded", init);
