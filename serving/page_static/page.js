// The page's script (serving/page.py serves it; the content security policy allows no other).
// Every label and message is rendered with textContent: nothing from an answer becomes HTML.
"use strict";

const state = { config: { max_files: 8, max_file_bytes: 10485760, default_topk: 3 }, models: [], cards: [] };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function size(bytes) {
  return bytes < 1048576 ? `${Math.round(bytes / 1000)} kB` : `${(bytes / 1048576).toFixed(1)} MiB`;
}

function banner(message) {
  const b = $("banner");
  b.textContent = message || "";
  b.hidden = !message;
}

async function getJSON(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error("The page's server is not reachable: is `make page` still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = { error: response.statusText }; }
  if (!response.ok) {
    const error = new Error((body && (body.error || body.message)) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function selected() {
  return { model: $("model").value, version: $("version").value, topk: $("topk").value };
}

function fillVersions() {
  const model = state.models.find((m) => m.name === $("model").value);
  const select = $("version");
  select.replaceChildren();
  for (const v of model ? model.versions : []) {
    const option = el("option", null, v === model.default ? `${v} (default)` : v);
    option.value = v;
    option.selected = v === model.default;
    select.append(option);
  }
}

async function loadModels() {
  try {
    state.models = await getJSON("/api/models");
  } catch (err) {
    banner(err.message);
    return;
  }
  const select = $("model");
  select.replaceChildren();
  for (const m of state.models) {
    const option = el("option", null, m.name);
    option.value = m.name;
    select.append(option);
  }
  fillVersions();
  if (!state.models.length) banner("TorchServe serves no model yet: register one (README, Model lifecycle).");
}

async function loadExamples() {
  let examples = [];
  try { examples = await getJSON("/api/examples"); } catch (err) { return; }
  const gallery = $("gallery");
  for (const ex of examples) {
    const button = el("button");
    button.type = "button";
    button.title = ex.label ? `${ex.name} (${ex.label})` : ex.name;
    const img = el("img");
    img.src = `/examples/${ex.id}`;
    img.alt = ex.name;
    button.append(img, el("span", null, ex.label || ex.name));
    button.addEventListener("click", async () => {
      const blob = await (await fetch(`/examples/${ex.id}`)).blob();
      addFiles([new File([blob], ex.name, { type: blob.type })]);
    });
    gallery.append(button);
  }
}

function drawBars(card, records) {
  card.bars.replaceChildren();
  for (const r of records) {
    const row = el("div", "bar");
    const track = el("div", "track");
    const fill = el("div", "fill");
    fill.style.width = `${(100 * r.probability).toFixed(1)}%`;
    track.append(fill);
    row.append(el("span", "label", r.label), track, el("span", "pct", `${(100 * r.probability).toFixed(1)} %`));
    row.title = `${r.label}: ${r.probability}`;
    card.bars.append(row);
  }
}

function drawSaliency(card, answer) {
  // the map covers the model's centre crop: a square of crop_fraction x the shorter side
  const img = card.img;
  const w = img.naturalWidth, h = img.naturalHeight;
  const side = Math.min(w, h) * (answer.crop_fraction || 1);
  const grid = answer.saliency.length;
  const small = document.createElement("canvas");
  small.width = grid;
  small.height = grid;
  const ctx = small.getContext("2d");
  const pixels = ctx.createImageData(grid, grid);
  answer.saliency.forEach((row, y) => row.forEach((v, x) => {
    const i = 4 * (y * grid + x);
    // yellow (little) to red (most), more opaque where it matters more
    pixels.data[i] = 255; pixels.data[i + 1] = Math.round(220 * (1 - v)); pixels.data[i + 2] = 0;
    pixels.data[i + 3] = Math.round(200 * v);
  }));
  ctx.putImageData(pixels, 0, 0);
  const overlay = card.overlay;
  overlay.width = w;
  overlay.height = h;
  const octx = overlay.getContext("2d");
  octx.clearRect(0, 0, w, h);
  octx.imageSmoothingEnabled = true;
  octx.drawImage(small, (w - side) / 2, (h - side) / 2, side, side);
  overlay.hidden = false;
  overlay.dataset.label = answer.label;
}

function form(card) {
  const body = new FormData();
  const s = selected();
  body.append("image", card.file, card.file.name);
  body.append("model", s.model);
  if (s.version) body.append("version", s.version);
  body.append("topk", s.topk);
  return body;
}

async function classify(card) {
  card.status.textContent = "classifying...";
  card.error.textContent = "";
  try {
    const answers = await getJSON("/api/predict", { method: "POST", body: form(card) });
    drawBars(card, answers[0]);
    card.status.textContent = `${selected().model} ${selected().version}`;
    card.explain.disabled = false;
    banner("");
  } catch (err) {
    card.bars.replaceChildren();
    card.status.textContent = "";
    card.error.textContent = err.message;
    if (err.status === 502 || err.status === undefined) banner(err.message);
  }
}

async function explain(card) {
  card.explain.disabled = true;
  card.status.textContent = "working out where the model looked...";
  try {
    const answers = await getJSON("/api/explain", { method: "POST", body: form(card) });
    drawSaliency(card, answers[0]);
    card.status.textContent = `shaded: what pushed the model towards "${answers[0].label}"`;
  } catch (err) {
    card.error.textContent = err.message;
    card.status.textContent = "";
  } finally {
    card.explain.disabled = false;
  }
}

function addCard(file) {
  const card = { file, root: el("article", "card") };
  card.root.append(el("h3", null, file.name || "pasted image"));
  const photo = el("div", "photo");
  card.img = el("img");
  card.img.alt = file.name || "pasted image";
  card.overlay = el("canvas", "overlay");
  card.overlay.hidden = true;
  photo.append(card.img, card.overlay);
  card.bars = el("div", "bars");
  card.error = el("p", "error");
  card.status = el("p", "status");
  card.explain = el("button", "explain", "Where did it look?");
  card.explain.type = "button";
  card.explain.disabled = true;
  card.explain.addEventListener("click", () => explain(card));
  card.root.append(photo, card.bars, card.error, card.status, card.explain);
  $("results").prepend(card.root);
  return card;
}

function addFiles(files) {
  const { max_files: maxFiles, max_file_bytes: maxBytes } = state.config;
  files = Array.from(files);
  if (files.length > maxFiles) {
    banner(`${files.length} files: at most ${maxFiles} at once.`);
    files = files.slice(0, maxFiles);
  } else {
    banner("");
  }
  for (const file of files) {
    const card = addCard(file);
    if (file.size > maxBytes) {  // checked before upload: nothing is sent
      card.error.textContent = `${file.name} is ${size(file.size)}: at most ${size(maxBytes)} per photo.`;
      continue;
    }
    card.img.src = URL.createObjectURL(file);
    state.cards.push(card);
    classify(card);
  }
}

async function start() {
  try {
    state.config = await getJSON("/api/config");
  } catch (err) {
    banner(err.message);
  }
  const { max_files: maxFiles, max_file_bytes: maxBytes, default_topk: k } = state.config;
  $("limits").textContent = `JPEG, PNG, WebP, BMP, GIF or TIFF; up to ${maxFiles} photos at once, ${size(maxBytes)} each.`;
  $("topk").value = k;
  $("topk-value").textContent = k;
  $("topk").addEventListener("input", () => { $("topk-value").textContent = $("topk").value; });
  $("topk").addEventListener("change", () => state.cards.forEach(classify));
  $("model").addEventListener("change", () => { fillVersions(); state.cards.forEach(classify); });
  $("version").addEventListener("change", () => state.cards.forEach(classify));
  $("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData ? e.clipboardData.files : []);
    if (files.length) addFiles(files);
  });
  await Promise.all([loadModels(), loadExamples()]);
}

document.addEventListener("DOMContentLoaded", start);
