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
    state.rankedBy = body.ranked_by;
    state.weight = body.structural_weight;
    // nothing_close: null for a model without calibrated score bands; over all pages shown.
    const none = body.nothing_close;
    state.nothingClose = append && state.nothingClose !== null && none !== null ? state.nothingClose && none : none;
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
  const reranks = $("rerank").checked && state.weight > 0;
  $("results-note").textContent = state.path === "/search/examples"
    ? "(by examples: best positive minus best negative)"
    : reranks
      ? `(${state.rankedBy}; the global rank is shown beside each)`
      : `(${$("rerank").checked ? state.rankedBy : "ranked by global similarity only"})`;
  const none = $("nothing-close");
  none.hidden = state.nothingClose !== true;
  none.textContent = state.nothingClose === true
    ? "Nothing in the gallery is close to this image: even the best results below are only " +
      "related or unrelated by the model's calibrated score bands."
    : "";
  for (const [i, hit] of state.results.entries()) {
    const card = document.createElement("div");
    card.className = "card result";
    card.dataset.id = hit.id;
    card.tabIndex = 0;
    card.setAttribute("role", "button");
    const moved = hit.global_rank - (i + 1);
    const arrow = moved > 0 ? `<span class="up">▲${moved}</span>` : moved < 0 ? `<span class="down">▼${-moved}</span>` : "";
    const verdict = hit.verdict ? `<span class="verdict ${hit.verdict}">${hit.verdict}</span>` : "";
    card.innerHTML = `<img alt=""><span class="line"><span class="score">${hit.score.toFixed(3)}</span>${verdict}</span>
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
    const top = Math.max(0, Math.min(64, parseInt($("lines").value, 10) || 0));
    state.explanation = await (await api(`/explain?top=${top}`, { method: "POST", body: form })).json();
    const [qUrl, rUrl] = [state.query.url, await galleryImage(hit.id)];
    const [qImg, rImg] = await Promise.all([loadImage(qUrl), loadImage(rUrl)]);
    const e = state.explanation;
    $("detail-title").textContent = `Why ${hit.key} matches`;
    $("detail").hidden = false;  // shown before drawing: the labels are measured as drawn
    drawHeading(e);
    drawPair(e, qImg, rImg);
    drawScoreTable(e);
    drawMatches(e);
    $("detail").scrollIntoView({ behavior: "smooth", block: "start" });
    say(scoreLine(e));
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

const signed = (v, digits = 4) => (v < 0 ? "−" : "+") + Math.abs(v).toFixed(digits);

function scoreLine(e) {
  return `score ${e.score.toFixed(4)} = global ${e.global_similarity.toFixed(4)} + ` +
    `${e.structural_weight} × structural ${e.structural_similarity.toFixed(4)}`;
}

// What ranked this result, in words: with weight 0 the structural matching only shows which
// parts correspond; it does not rank.
function drawHeading(e) {
  const rule = $("detail-rule");
  rule.replaceChildren();
  if (e.verdict) {
    const v = document.createElement("span");
    v.className = `verdict ${e.verdict}`;
    v.textContent = e.verdict;
    rule.append(v, " ");
  }
  const words = e.ranked_by.charAt(0).toUpperCase() + e.ranked_by.slice(1);
  rule.append(e.structural_weight === 0
    ? `${words}. Structural matching (the lines) is shown as correspondence, not ranking: it adds nothing to the score.`
    : `${words}: the score adds ${e.structural_weight} × the structural similarity (the lines) to the global similarity.`);
  const line = $("score-line");
  line.textContent = scoreLine(e);
  line.dataset.score = e.score;
}

// One colour scale for both images: clear at 0, red up to the largest share, blue below 0.
function heat(value, strongest) {
  const t = Math.min(1, Math.abs(value) / (strongest || 1));
  return value < 0 ? `rgba(40, 90, 220, ${0.75 * t})` : `rgba(220, 40, 30, ${0.75 * t})`;
}

function partName(r, grid) {
  return `${r} (row ${Math.floor(r / grid) + 1}, col ${(r % grid) + 1})`;
}

function sideValues(e, side) {
  const c = e.contributions;
  return {
    total: c.total[side], structural: c.structural[side], global: c.global[side],  // global: null when not split
  };
}

function drawPair(e, qImg, rImg) {
  const svg = $("pair");
  svg.replaceChildren();
  const H = 360, gap = 40;
  const sq = H / qImg.naturalHeight, sr = H / rImg.naturalHeight;
  const wq = qImg.naturalWidth * sq, wr = rImg.naturalWidth * sr;
  const width = wq + gap + wr;
  svg.setAttribute("viewBox", `0 0 ${width} ${H}`);
  svg.append(el("image", { href: qImg.src, x: 0, y: 0, width: wq, height: H }));
  svg.append(el("image", { href: rImg.src, x: wq + gap, y: 0, width: wr, height: H }));
  const all = e.contributions.total.query.concat(e.contributions.total.result);
  const strongestValue = Math.max(...all.map(Math.abs), 1e-12);
  const w = e.structural_weight;
  const sides = [
    { name: "query", regions: e.query_regions, values: sideValues(e, "query"), s: sq, x0: 0 },
    { name: "result", regions: e.result_regions, values: sideValues(e, "result"), s: sr, x0: wq + gap },
  ];
  const centres = {};
  for (const side of sides) {
    const v = side.values;
    centres[side.name] = side.regions.map(([x0, y0, x1, y1]) => [side.x0 + side.s * (x0 + x1) / 2, side.s * (y0 + y1) / 2]);
    side.regions.forEach(([x0, y0, x1, y1], r) => {
      const g = v.global ? v.global[r] : null;
      const split = g === null ? "global not split" : `global ${signed(g)}`;
      const rect = el("rect", {
        class: "cell", x: side.x0 + side.s * x0, y: side.s * y0,
        width: side.s * (x1 - x0), height: side.s * (y1 - y0),
        fill: heat(v.total[r], strongestValue), tabindex: 0,
        "data-side": side.name, "data-region": r, "data-contribution": v.total[r],
        "data-global": g === null ? "" : g, "data-structural": v.structural[r],
        "aria-label": `${side.name} part ${r}: share of the score ${signed(v.total[r])} = ${split} + ${w} × structural ${signed(v.structural[r])}`,
      });
      rect.addEventListener("mouseenter", () => focusPart(side.name, r));
      rect.addEventListener("focus", () => focusPart(side.name, r));
      svg.append(rect);
    });
  }
  const lines = el("g", { class: "lines" });
  const labels = el("g", { class: "labels" });
  svg.append(lines, el("g", { class: "flows" }), labels);  // labels on top of every line
  const strongest = Math.max(...e.matches.map((m) => Math.abs(m.contribution)), 1e-12);
  const ends = e.matches.map((m) => [centres.query[m.query_region], centres.result[m.result_region]]);
  // Weakest first, so that the strongest lines lie on top.
  for (let i = e.matches.length - 1; i >= 0; i -= 1) {
    const m = e.matches[i];
    const [a, b] = ends[i];
    lines.append(el("line", {
      class: "match", x1: a[0], y1: a[1], x2: b[0], y2: b[1],
      stroke: "#f1c40f", "stroke-width": 1 + 5 * Math.abs(m.contribution) / strongest,
      "data-rank": i + 1, "data-contribution": m.contribution,
    }));
  }
  state.labels = placeLabels(e, ends, labels, [0, 0, width, H]);
  window.__labels = state.labels;
  state.centres = centres;
  const c = e.contributions;
  const sum = (xs) => xs.reduce((s, x) => s + x, 0);
  const part = (side) => {
    const g = c.global[side];
    return `${side} parts: ${g === null ? "global not split" : `global ${signed(sum(g))}`} + ` +
      `${w} × structural ${signed(sum(c.structural[side]))} = ${signed(sum(c.total[side]))}`;
  };
  $("heat-legend").textContent =
    `Tint: each part's share of the score, from 0 (clear) to ${signed(strongestValue)} (red)` +
    (Math.min(...all) < 0 ? "; blue: negative shares" : "") + `. ${part("query")}; ${part("result")}.`;
}

// Each line's label "rank: contribution", placed greedily, strongest first: the middle of its
// line, else further along it or beside it, wherever its box meets no other label's box and
// stays inside the picture. A label with no free place is left out (its line stays, and the
// table below lists it). Returns the placed boxes, in the SVG's coordinates.
function placeLabels(e, ends, group, bounds) {
  const placed = [];
  const margin = 2;
  e.matches.forEach((m, i) => {
    const [a, b] = ends[i];
    const label = el("g", { class: "rank-label", "data-rank": i + 1 });
    const box = el("rect", { class: "label-box", rx: 3 });
    const text = el("text", { x: 0, y: 0 });
    text.textContent = `${i + 1}: ${m.contribution.toFixed(4)}`;
    label.append(box, text);
    group.append(label);
    const bb = text.getBBox();
    const w = bb.width + 6, h = bb.height + 2;
    const length = Math.max(Math.hypot(b[0] - a[0], b[1] - a[1]), 1e-9);
    const [nx, ny] = [-(b[1] - a[1]) / length * (h + 2), (b[0] - a[0]) / length * (h + 2)];
    for (const t of [0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.18, 0.82, 0.12, 0.88]) {
      const px = a[0] + t * (b[0] - a[0]), py = a[1] + t * (b[1] - a[1]);
      for (const [cx, cy] of [[px, py], [px + nx, py + ny], [px - nx, py - ny]]) {
        const r = { x0: cx - w / 2, y0: cy - h / 2, x1: cx + w / 2, y1: cy + h / 2, rank: i + 1 };
        if (r.x0 < bounds[0] || r.y0 < bounds[1] || r.x1 > bounds[2] || r.y1 > bounds[3]) continue;
        const hit = placed.some((o) => r.x0 - margin < o.x1 && o.x0 < r.x1 + margin && r.y0 - margin < o.y1 && o.y0 < r.y1 + margin);
        if (hit) continue;
        placed.push(r);
        for (const [k, v] of Object.entries({ x: r.x0, y: r.y0, width: w, height: h })) box.setAttribute(k, v);
        text.setAttribute("x", cx);
        text.setAttribute("y", cy);
        return;
      }
    }
    label.remove();  // no free place: left out
  });
  return placed;
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
  const v = sideValues(e, side);
  const g = v.global ? `global ${signed(v.global[r])}` : "global not split";
  $("hover-info").textContent =
    `${side} part ${r} sends most flow to ${other} part ${best}: flow ${most.toFixed(4)}, ` +
    `similarity ${sims[best].toFixed(4)}, contribution ${(most * sims[best]).toFixed(5)}. ` +
    `Its share of the score: ${signed(v.total[r])} = ${g} + ${e.structural_weight} × structural ${signed(v.structural[r])}`;
}

// Rows that add up to the score printed above them: the query parts with the largest shares,
// the other parts together, and what the parts leave unexplained (only when the global term
// could not be split, or beyond float rounding).
function scoreRows(e, top = 6) {
  const v = sideValues(e, "query");
  const w = e.structural_weight;
  const order = v.total.map((t, r) => r).sort((a, b) => v.total[b] - v.total[a]);
  const row = (name, parts) => ({
    name, parts,
    global: v.global ? parts.reduce((s, r) => s + v.global[r], 0) : null,
    structural: w * parts.reduce((s, r) => s + v.structural[r], 0),
    total: parts.reduce((s, r) => s + v.total[r], 0),
  });
  const rows = order.slice(0, top).map((r) => row(partName(r, e.grid), [r]));
  if (order.length > top) rows.push(row(`other ${order.length - top} parts`, order.slice(top)));
  const residual = e.contributions.residual.query;
  if (!e.contributions.exact || Math.abs(residual) > 5e-5) {
    rows.push({ name: "not split over parts", parts: [], global: null, structural: null, total: residual });
  } else {
    rows[rows.length - 1].total += residual;  // float rounding: the rows still add up exactly
  }
  return rows;
}

function drawScoreTable(e) {
  const rows = scoreRows(e);
  const body = $("score-table").querySelector("tbody");
  body.replaceChildren();
  const fmt = (x) => (x === null ? "" : signed(x));
  const most = Math.max(...rows.map((r) => Math.abs(r.total)), 1e-12);
  const cells = (tr, values, total) => {
    for (const value of values) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(td);
    }
    const share = document.createElement("td");
    share.className = "share";
    if (total !== null) {
      const bar = document.createElement("span");
      bar.className = `bar ${total < 0 ? "negative" : ""}`;
      bar.style.width = `${(4 * Math.abs(total)) / most}rem`;
      share.append(bar, ` ${Math.round((100 * total) / (e.score || 1))}%`);
    }
    tr.append(share);
  };
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.total = r.total;
    if (r.global !== null) tr.dataset.global = r.global;
    if (r.structural !== null) tr.dataset.structural = r.structural;
    const name = document.createElement("th");
    name.textContent = r.name;
    tr.append(name);
    cells(tr, [fmt(r.global), fmt(r.structural), fmt(r.total)], r.total);
    if (r.parts.length === 1) {
      tr.tabIndex = 0;
      tr.addEventListener("mouseenter", () => focusPart("query", r.parts[0]));
      tr.addEventListener("focus", () => focusPart("query", r.parts[0]));
    }
    body.append(tr);
  }
  const w = e.structural_weight;
  $("structural-head").textContent = `+ ${w} × structural`;
  const foot = $("score-table").querySelector("tfoot tr");
  foot.replaceChildren();
  const th = document.createElement("th");
  th.textContent = "score";
  foot.append(th);
  foot.dataset.score = e.score;
  cells(foot, [e.contributions.exact ? signed(e.global_similarity) : "", signed(w * e.structural_similarity), signed(e.score)], null);
  $("score-caption").textContent = w === 0
    ? `The structural column is 0: with weight 0 the structural similarity (${e.structural_similarity.toFixed(4)}) does not enter the score.`
    : `Each part's structural share is ${w} × its contribution to the structural similarity ${e.structural_similarity.toFixed(4)}.`;
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
      caption.textContent = `${group.size} items · closest pair: global ${best.global_similarity.toFixed(3)}, structural ${best.structural_similarity.toFixed(3)}`;
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
  $("lines").addEventListener("change", () => state.current && openDetail(state.current));
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
