// The captioning page: upload a photo, show its caption, alternatives and per-word attention; search.
// Plain DOM code, no framework. Text from the server is only ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SIDE = 640; // the canvas draws the photo at most this wide or high

let file = null; // the photo being captioned
let photo = null; // its decoded <img>, drawn on the canvas
let attention = null; // {grid: [H, W], words, weights: [[H*W] per word], resize}
let pinned = -1; // the clicked word: shown when no word is hovered or focused
let maxUpload = 0; // the server's upload limit in bytes, from /healthz
let similarOn = false; // whether the index has a search embedding ("more like this"), from /healthz
let latest = 0; // number of the latest caption request: older answers arriving late are dropped

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function errorText(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ");
  return `the server answered ${status}`;
}

function fillSelect(select, max, value) {
  select.replaceChildren();
  for (let n = 1; n <= max; n++) select.add(new Option(String(n), String(n), false, n === value));
}

function loadPhoto(blob) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      URL.revokeObjectURL(img.src);
      resolve(img);
    };
    img.onerror = () => resolve(null); // a format the browser cannot show can still be captioned
    img.src = URL.createObjectURL(blob);
  });
}

// "inferno"-like colours for a weight in 0..1: dark purple, red, orange, pale yellow.
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function heat(v) {
  const x = Math.min(Math.max(v, 0), 1) * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2);
  const t = x - i;
  return STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * t));
}

// Draw the photo, and over it the attention of word `index` (none if -1), upsampled smoothly.
function draw(index) {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  if (!photo) return;
  const scale = Math.min(1, MAX_SIDE / Math.max(photo.naturalWidth, photo.naturalHeight));
  canvas.width = Math.round(photo.naturalWidth * scale);
  canvas.height = Math.round(photo.naturalHeight * scale);
  ctx.drawImage(photo, 0, 0, canvas.width, canvas.height);
  document.querySelectorAll("#words button").forEach((b, i) => b.classList.toggle("shown", i === index));
  if (!attention || index < 0) {
    canvas.setAttribute("aria-label", "The photo");
    return;
  }
  const [rows, cols] = attention.grid;
  const weights = attention.weights[index];
  const top = Math.max(...weights) || 1;
  const grid = document.createElement("canvas");
  grid.width = cols;
  grid.height = rows;
  const gctx = grid.getContext("2d");
  const pixels = gctx.createImageData(cols, rows);
  weights.forEach((w, i) => pixels.data.set([...heat(w / top), Math.round(60 + 150 * (w / top))], 4 * i));
  gctx.putImageData(pixels, 0, 0);
  // The grid covers what the encoder saw: the whole photo ("squash") or its centre square ("crop").
  let [x, y, w, h] = [0, 0, canvas.width, canvas.height];
  if (attention.resize === "crop") {
    const side = Math.min(w, h);
    [x, y, w, h] = [(w - side) / 2, (h - side) / 2, side, side];
  }
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(grid, x, y, w, h);
  canvas.setAttribute("aria-label", `The photo, with where the model looked for the word "${attention.words[index]}"`);
}

function pin(index) {
  pinned = pinned === index ? -1 : index;
  document.querySelectorAll("#words button").forEach((b, i) => b.setAttribute("aria-pressed", String(i === pinned)));
  draw(pinned);
}

function showWords(words) {
  const box = $("words");
  box.replaceChildren();
  $("words-help").hidden = !attention;
  words.forEach((word, i) => {
    if (i > 0) box.append(" ");
    if (!attention) {
      box.append(word);
      return;
    }
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = word;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("mouseenter", () => draw(i));
    b.addEventListener("mouseleave", () => draw(pinned));
    b.addEventListener("focus", () => draw(i));
    b.addEventListener("blur", () => draw(pinned));
    b.addEventListener("click", () => pin(i));
    b.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
      const buttons = box.querySelectorAll("button");
      if (step) {
        e.preventDefault();
        buttons[(i + step + buttons.length) % buttons.length].focus();
      } else if (e.key === "Escape" && pinned >= 0) {
        pin(pinned);
      }
    });
    box.append(b);
  });
}

function showResult(body) {
  attention = body.attention || null;
  pinned = -1;
  showWords(body.words && body.words.length ? body.words : body.caption.split(" "));
  $("alt").value = body.caption;
  const list = $("alternatives");
  list.replaceChildren();
  for (const alt of body.captions) {
    const li = document.createElement("li");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = ` (score ${alt.score.toFixed(3)})`;
    li.append(alt.caption, score);
    list.append(li);
  }
  $("order").hidden = !body.rerank; // re-ranked: the order is not the scores' alone
  const labels = $("labels");
  labels.replaceChildren();
  for (const label of body.labels || []) {
    const li = document.createElement("li");
    li.textContent = `${label.label} ${Math.round(label.p * 100)}%`;
    labels.append(li);
  }
  if (!labels.children.length) {
    const li = document.createElement("li");
    li.textContent = "no labels: this model's encoder has no ImageNet classifier";
    labels.append(li);
  }
  const t = body.timing;
  $("timing").textContent =
    `Took ${Math.round(t.total_ms)} ms: preprocessing ${Math.round(t.preprocess_ms)}, waiting ` +
    `${Math.round(t.queue_ms)}, model ${Math.round(t.model_ms)} (batch of ${body.batch_size}).`;
  draw(-1);
  say(`Caption: ${body.caption}`);
}

async function caption() {
  if (!file) {
    say("Choose a photo first.", true);
    $("file").focus();
    return;
  }
  if (maxUpload && file.size > maxUpload) {
    const mb = (n) => (n / 2 ** 20).toFixed(1);
    say(`${file.name} is too large to upload (${mb(file.size)} MB; the limit is ${mb(maxUpload)} MB).`, true);
    return;
  }
  const ticket = ++latest;
  say(`Captioning ${file.name}…`);
  photo = await loadPhoto(file);
  attention = null; // the previous photo's words and maps do not belong to this one
  showWords([]);
  $("alt").value = "";
  $("alternatives").replaceChildren();
  $("timing").textContent = "";
  $("result").hidden = false;
  draw(-1);
  const form = new FormData();
  form.append("file", file);
  form.append("beam_size", $("beam").value);
  form.append("n_best", $("nbest").value);
  let response, body;
  try {
    response = await fetch("/api/caption", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    say(`The server did not answer (${err.message}).`, true);
    return;
  }
  if (ticket !== latest) return;
  if (!response.ok) {
    $("result").hidden = true;
    say(`Could not caption this file: ${errorText(body, response.status)}`, true);
    return;
  }
  showResult(body);
}

function choose(chosen) {
  if (!chosen) return;
  file = chosen;
  caption();
}

async function search(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  await showHits(`/api/search?${new URLSearchParams({ q, top: 12 })}`, `"${q}"`);
}

// "More like this": the photos nearest to an indexed one in the search embedding's space.
async function similar(hit) {
  await showHits(`/api/similar?${new URLSearchParams({ path: hit.path, top: 12 })}`, `photos like ${hit.name || hit.path}`);
}

async function showHits(url, what) {
  $("search-status").textContent = "Searching…";
  let response, body;
  try {
    response = await fetch(url);
    body = await response.json();
  } catch (err) {
    $("search-status").textContent = `The server did not answer (${err.message}).`;
    return;
  }
  const list = $("hits");
  list.replaceChildren();
  if (!response.ok) {
    $("search-status").textContent = `Search failed: ${errorText(body, response.status)}`;
    return;
  }
  for (const hit of body.hits) {
    const li = document.createElement("li");
    const figure = document.createElement("figure");
    const link = document.createElement("a");
    link.href = `/api/photo?${new URLSearchParams({ path: hit.path, size: "full" })}`;
    link.target = "_blank";
    const img = document.createElement("img");
    img.src = `/api/photo?${new URLSearchParams({ path: hit.path, size: "thumb" })}`;
    img.alt = `Open full size: ${hit.caption}`;
    img.loading = "lazy";
    link.append(img);
    const text = document.createElement("figcaption");
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = `${hit.name || hit.path} · score ${hit.score.toFixed(3)}`;
    path.title = hit.path;
    text.append(hit.caption, path);
    if (similarOn) {
      const more = document.createElement("button");
      more.type = "button";
      more.className = "more";
      more.textContent = "More like this";
      more.setAttribute("aria-label", `More photos like this one: ${hit.caption}`);
      more.addEventListener("click", () => similar(hit));
      text.append(more);
    }
    figure.append(link, text);
    li.append(figure);
    list.append(li);
  }
  const n = body.hits.length;
  const nearest = n === 1 ? "the nearest photo" : `the ${n} nearest photos`;
  $("search-status").textContent = !n
    ? `No photos found for ${what}.`
    : body.good_match === false // only searches have it: "more like this" always finds neighbours
      ? `No good match for ${what}; showing ${nearest}.`
      : `${n} photo${n > 1 ? "s" : ""} found for ${what}.`;
}

async function copyAlt() {
  const alt = $("alt");
  try {
    await navigator.clipboard.writeText(alt.value);
  } catch {
    alt.select(); // fallback for browsers without the async clipboard
    document.execCommand("copy");
  }
  say("Alt text copied.");
}

function setup() {
  fillSelect($("beam"), 10, 3);
  fillSelect($("nbest"), 3, 3);
  $("beam").addEventListener("change", () => {
    const beams = Number($("beam").value);
    fillSelect($("nbest"), beams, Math.min(Number($("nbest").value), beams));
    if (file) caption();
  });
  $("nbest").addEventListener("change", () => file && caption());
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  $("caption-form").addEventListener("submit", (e) => {
    e.preventDefault();
    caption();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  $("copy").addEventListener("click", copyAlt);
  $("search-form").addEventListener("submit", search);
  fetch("/healthz")
    .then((r) => r.json())
    .then((h) => {
      $("model").textContent = `Model: ${h.model} (${h.encoder} encoder, ${h.decoder} decoder)`;
      $("search-section").hidden = !h.search;
      similarOn = Boolean(h.similar);
      maxUpload = h.max_upload_bytes;
    });
}

setup();
