// ichscan viewer: plain JavaScript, no build step, nothing loaded from elsewhere.
// Research software, not a medical device.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "ichscan-token";
const WAIT_S = 20; // long poll: GET /api/scans/{id}?wait=20
const WORKLIST_MS = 15000;
const IMAGE_CACHE = 400; // rendered slices kept as object URLs

const state = {
  health: null,
  scan: null, // the open scan's record
  index: 0,
  window: "brain",
  overlay: false,
  overlayLabel: null,
  images: new Map(), // key -> object URL (insertion order = age)
  inflight: new Map(), // key -> Promise<url>
  wheel: 0,
  pollTimer: null,
};

// -- API -------------------------------------------------------------------------------

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    return JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...authHeaders(), ...(options.headers || {}) },
  });
  if (response.status === 401) askForToken();
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  $("#token-note").textContent = ""; // the token (or none) was accepted
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

function askForToken() {
  $("#token-note").textContent = "This server needs a token: enter it here.";
  $("#token").focus();
}

// -- upload ----------------------------------------------------------------------------

function setUploadStatus(text, isError = false) {
  const el = $("#upload-status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const progress = $("#upload-progress");
  progress.hidden = false;
  progress.value = 0;
  setUploadStatus(`Uploading ${files.length} file(s)…`);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/scans");
  for (const [key, value] of Object.entries(authHeaders())) xhr.setRequestHeader(key, value);
  xhr.upload.onprogress = (event) => {
    if (event.lengthComputable) progress.value = Math.round((100 * event.loaded) / event.total);
  };
  xhr.upload.onload = () => {
    progress.value = 100;
    setUploadStatus("Uploaded; checking the scan…");
  };
  xhr.onerror = () => {
    progress.hidden = true;
    setUploadStatus("Upload failed: the server could not be reached.", true);
  };
  xhr.onload = () => {
    progress.hidden = true;
    let body = null;
    try {
      body = JSON.parse(xhr.responseText);
    } catch {
      body = null;
    }
    if (xhr.status === 401) askForToken();
    if (xhr.status !== 201 || !body) {
      const detail = body && typeof body.detail === "string" ? body.detail : `HTTP ${xhr.status}`;
      setUploadStatus(`Not accepted (${xhr.status}): ${detail}`, true);
      return;
    }
    setUploadStatus(body.status === "done" ? "Done." : "Queued for analysis…");
    refreshScanList();
    openScan(body.id, body);
  };
  xhr.send(form);
}

function setUpDropzone() {
  const zone = $("#dropzone");
  const input = $("#file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    upload([...input.files]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    upload([...event.dataTransfer.files]);
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// -- earlier scans -------------------------------------------------------------------------

function verdictBadge(item) {
  const badge = document.createElement("span");
  badge.className = "badge";
  if (item.status !== "done") {
    badge.textContent = item.status;
  } else if (item.suspected_ich === true) {
    badge.textContent = "suspected ICH";
    badge.classList.add("suspected");
  } else if (item.suspected_ich === false) {
    badge.textContent = "no ICH suspected";
    badge.classList.add("clear");
  } else {
    badge.textContent = "no model";
  }
  return badge;
}

async function refreshScanList() {
  let scans;
  try {
    scans = (await apiJson("/api/scans")).scans;
  } catch (error) {
    $("#scan-list-empty").textContent = `Cannot list scans: ${error.message}`;
    $("#scan-list-empty").hidden = false;
    return;
  }
  const list = $("#scan-list");
  list.replaceChildren();
  $("#scan-list-empty").hidden = scans.length > 0;
  $("#scan-list-empty").textContent = "No scans yet.";
  for (const item of scans) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "scan-item";
    button.dataset.id = item.id;
    const name = document.createElement("span");
    name.className = "scan-name";
    name.textContent = item.name;
    const sub = document.createElement("span");
    sub.className = "scan-sub";
    const when = item.created_at ? new Date(item.created_at).toLocaleString() : "";
    sub.append(`${when} · ${item.n_slices ?? "?"} slices `, verdictBadge(item));
    if (item.trained_on_synthetic) {
      const badge = document.createElement("span");
      badge.className = "badge synthetic";
      badge.textContent = "synthetic-trained model";
      sub.append(" ", badge);
    }
    button.append(name, sub);
    if (state.scan && state.scan.id === item.id) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => openScan(item.id));
    li.append(button);
    list.append(li);
  }
}

// -- worklist ------------------------------------------------------------------------------

function triageText(study) {
  let text = study.status;
  if (study.suspected_ich === true) text = "Suspected ICH";
  else if (study.suspected_ich === false) text = "No ICH suspected";
  if (study.partial) text += " (PARTIAL: transfer aborted, not final)";
  return text;
}

async function refreshWorklist() {
  let data;
  try {
    data = await apiJson("/api/worklist");
  } catch (error) {
    $("#worklist-status").textContent = `Cannot read the worklist: ${error.message}`;
    return;
  }
  const body = $("#worklist tbody");
  body.replaceChildren();
  for (const study of data.studies) {
    const row = document.createElement("tr");
    row.className = "study";
    row.dataset.study = study.study_instance_uid;
    if (study.suspected_ich === true) row.classList.add("suspected");
    const triage = document.createElement("td");
    triage.className = "triage";
    triage.textContent = triageText(study);
    if (study.trained_on_synthetic) {
      const badge = document.createElement("span");
      badge.className = "badge synthetic";
      badge.textContent = "synthetic-trained model";
      badge.title = trainedOnText(study.trained_on, true);
      triage.append(" ", badge);
    }
    if (study.partial) row.classList.add("partial");
    const who = document.createElement("td");
    who.className = "patient";
    const patient = study.patient_name || study.patient_id || "(no name)";
    who.textContent = `${patient} ${study.patient_id ? `(${study.patient_id})` : ""}`;
    const what = document.createElement("div");
    what.className = "scan-sub";
    what.textContent = [study.study_description, study.accession_number].filter(Boolean).join(" · ");
    who.append(what);
    const arrived = document.createElement("td");
    arrived.textContent = new Date(study.arrived_at).toLocaleString();
    const ttr = document.createElement("td");
    ttr.textContent = study.time_to_result_s == null ? "–" : `${study.time_to_result_s.toFixed(1)} s`;
    const series = document.createElement("td");
    for (const s of study.series) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "open-series";
      button.dataset.study = study.study_instance_uid;
      button.dataset.series = s.series_instance_uid;
      button.textContent = `Open ${s.series_description || s.series_instance_uid.slice(-12)} (${s.instances ?? "?"})`;
      button.addEventListener("click", () => openFromStore(study.study_instance_uid, s.series_instance_uid));
      series.append(button);
    }
    row.append(triage, who, arrived, ttr, series);
    body.append(row);
  }
  const problems = data.problems.length ? ` ${data.problems.length} result file(s) could not be read.` : "";
  $("#worklist-status").textContent = `${data.studies.length} studies.${problems}`;
}

async function openFromStore(study, series) {
  $("#worklist-status").textContent = "Opening the series…";
  try {
    const record = await apiJson(`/api/worklist/${study}/${series}/open`, { method: "POST" });
    $("#worklist-status").textContent = "";
    refreshScanList();
    openScan(record.id, record);
  } catch (error) {
    $("#worklist-status").textContent = `Cannot open it: ${error.message}`;
  }
}

// -- viewer --------------------------------------------------------------------------------

function clearImages() {
  for (const url of state.images.values()) URL.revokeObjectURL(url);
  state.images.clear();
  state.inflight.clear();
}

async function openScan(id, record = null) {
  clearTimeout(state.pollTimer);
  if (!state.scan || state.scan.id !== id) clearImages();
  try {
    record = record || (await apiJson(`/api/scans/${id}`));
  } catch (error) {
    setUploadStatus(`Cannot open the scan: ${error.message}`, true);
    return;
  }
  state.scan = record;
  history.replaceState(null, "", `#scan=${id}`);
  $("#viewer").hidden = false;
  $("#scan-title").textContent = record.name;
  for (const button of document.querySelectorAll("#scan-list button")) {
    button.setAttribute("aria-current", String(button.dataset.id === id));
  }
  if (record.status === "queued" || record.status === "processing") {
    $("#scan-status").textContent = record.status === "queued" ? "Queued…" : "Analysing…";
    $("#stage").hidden = true;
    // The server holds the request until the scan is done (or WAIT_S passes).
    state.pollTimer = setTimeout(async () => {
      let next;
      try {
        next = await apiJson(`/api/scans/${id}?wait=${WAIT_S}`);
      } catch (error) {
        $("#scan-status").textContent = `Lost track of the scan: ${error.message}`;
        return;
      }
      if (state.scan && state.scan.id === id) openScan(id, next);
    }, 0);
    return;
  }
  if (record.status === "failed") {
    $("#scan-status").textContent = `Could not be analysed: ${record.error}`;
    $("#scan-status").classList.add("error");
    $("#stage").hidden = true;
    setUploadStatus(`Failed: ${record.error}`, true);
    refreshScanList();
    return;
  }
  $("#scan-status").textContent = "";
  $("#scan-status").classList.remove("error");
  $("#stage").hidden = false;
  if ($("#upload-status").textContent.startsWith("Queued")) setUploadStatus("Done.");
  renderScan(record);
  refreshScanList();
}

function renderScan(record) {
  const series = record.series || {};
  const n = series.n_slices || 0;
  const parts = [
    series.patient_id && `patient ${series.patient_id}`,
    series.description,
    `${n} slices of ${series.rows}×${series.cols}`,
    series.resliced_mm && `resliced from ${series.source_slices} slices to ${series.resliced_mm} mm, as the model reads it`,
  ];
  $("#scan-meta").textContent = parts.filter(Boolean).join(" · ");

  const verdict = $("#verdict");
  verdict.classList.toggle("suspected", record.suspected_ich === true);
  if (!record.labels.length) verdict.textContent = "No model loaded: slices only.";
  else if (record.suspected_ich) verdict.textContent = `Suspected ICH (${record.headline_label} at or above its threshold)`;
  else verdict.textContent = `No ICH suspected (${record.headline_label} below its threshold)`;
  renderTraining(record);

  // Windows: a PNG/JPEG upload is already in one window and cannot be re-windowed.
  const windowed = record.windowed;
  for (const button of document.querySelectorAll("#window-buttons button")) {
    button.disabled = Boolean(windowed);
  }
  $("#window-note").hidden = !windowed;
  $("#window-note").textContent = windowed
    ? `This slice was uploaded as an image in the ${windowed} window: other windows cannot be recovered from it.`
    : "";
  if (windowed) state.window = "brain";
  setPressedWindow();

  const hasModel = record.labels.length > 0;
  $("#overlay-toggle").disabled = !hasModel;
  if (!hasModel) state.overlay = false;
  $("#overlay-toggle").checked = state.overlay;
  const select = $("#overlay-label");
  select.replaceChildren(...record.labels.map((label) => new Option(label, label)));
  if (!record.labels.includes(state.overlayLabel)) state.overlayLabel = record.headline_label || null;
  if (state.overlayLabel) select.value = state.overlayLabel;
  select.disabled = !hasModel;

  renderFindings(record);
  renderStrip(record);
  const warnings = $("#scan-warnings");
  warnings.replaceChildren(
    ...(record.warnings || []).map((w) => {
      const li = document.createElement("li");
      li.textContent = w;
      return li;
    }),
  );

  const slider = $("#slice-slider");
  slider.max = Math.max(0, n - 1);
  const start = record.key_slice ?? Math.floor(n / 2);
  showSlice(Math.min(Math.max(0, start), Math.max(0, n - 1)));
}

// What the model rests on, beside every result; loudly when it never saw real CT.
function trainedOnText(words, synthetic) {
  if (!words) return "";
  return synthetic
    ? `Model trained on ${words}. It has never seen real CT: its findings on a real scan mean nothing.`
    : `Model trained on ${words}.`;
}

function renderTraining(record) {
  const note = $("#trained-on");
  note.textContent = trainedOnText(record.trained_on, record.trained_on_synthetic === true);
  note.classList.toggle("synthetic", record.trained_on_synthetic === true);
  note.hidden = !note.textContent;
  // A store series the receiver analysed from a transfer its sender aborted.
  const store = record.store_result || {};
  const partial = $("#partial-note");
  partial.hidden = store.completion !== "PARTIAL";
  partial.textContent = partial.hidden
    ? ""
    : `Not final: the receiver's result is PARTIAL (${(store.warnings || []).join("; ") || "transfer aborted"}).`;
}

function renderFindings(record) {
  const body = $("#findings tbody");
  body.replaceChildren();
  for (const finding of record.findings) {
    const row = document.createElement("tr");
    row.dataset.label = finding.label;
    if (finding.positive) row.classList.add("positive");
    const cells = [
      finding.label,
      finding.probability.toFixed(3),
      finding.threshold.toFixed(3),
      finding.positive ? "positive" : "negative",
    ];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      row.append(td);
    }
    row.title = "Show the heatmap of this finding";
    row.addEventListener("click", () => {
      state.overlayLabel = finding.label;
      $("#overlay-label").value = finding.label;
      setOverlay(true);
    });
    body.append(row);
  }
  $("#findings").hidden = record.findings.length === 0;
}

function headlineProbs(record) {
  return (record.slice_probabilities || []).map((row) => row[0]);
}

function stripColour(p) {
  // Dark blue-grey at 0 to saturated red at 1.
  const t = Math.max(0, Math.min(1, p));
  const r = Math.round(31 + t * (230 - 31));
  const g = Math.round(42 + t * (40 - 42));
  const b = Math.round(54 + t * (40 - 54));
  return `rgb(${r}, ${g}, ${b})`;
}

function renderStrip(record) {
  const strip = $("#prob-strip");
  strip.replaceChildren();
  const n = record.series?.n_slices || 0;
  const probs = headlineProbs(record);
  const threshold = record.findings[0]?.threshold;
  for (let k = 0; k < n; k += 1) {
    const cell = document.createElement("button");
    cell.type = "button";
    cell.tabIndex = -1; // the slider is the keyboard control; the strip is for the mouse
    cell.dataset.index = String(k);
    const p = probs[k];
    if (p != null) {
      cell.style.background = stripColour(p);
      if (threshold != null && p >= threshold) cell.classList.add("positive");
      cell.setAttribute("aria-label", `Slice ${k + 1}: ${record.headline_label} ${p.toFixed(3)}`);
    } else {
      cell.setAttribute("aria-label", `Slice ${k + 1}`);
    }
    cell.addEventListener("click", () => showSlice(k));
    strip.append(cell);
  }
}

function setPressedWindow() {
  for (const button of document.querySelectorAll("#window-buttons button")) {
    button.setAttribute("aria-pressed", String(button.dataset.window === state.window));
  }
}

function imageKey(index) {
  const layer = state.overlay ? `cam-${state.overlayLabel}` : "plain";
  return `${state.scan.id}/${index}/${state.window}/${layer}`;
}

function imageUrl(index) {
  const params = new URLSearchParams({ window: state.window, overlay: state.overlay ? "1" : "0" });
  if (state.overlay && state.overlayLabel) params.set("label", state.overlayLabel);
  return `/api/scans/${state.scan.id}/slices/${index}.png?${params}`;
}

function fetchImage(index) {
  const key = imageKey(index);
  if (state.images.has(key)) return Promise.resolve(state.images.get(key));
  if (state.inflight.has(key)) return state.inflight.get(key);
  const promise = api(imageUrl(index))
    .then((response) => response.blob())
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      state.images.set(key, url);
      if (state.images.size > IMAGE_CACHE) {
        const [oldest] = state.images.keys();
        URL.revokeObjectURL(state.images.get(oldest));
        state.images.delete(oldest);
      }
      return url;
    })
    .finally(() => state.inflight.delete(key));
  state.inflight.set(key, promise);
  return promise;
}

function showSlice(index) {
  const record = state.scan;
  if (!record || record.status !== "done") return;
  const n = record.series.n_slices;
  index = Math.min(Math.max(0, index), n - 1);
  state.index = index;
  $("#slice-slider").value = String(index);
  $("#slice-index").textContent = `Slice ${index + 1} / ${n}`;
  const probs = headlineProbs(record);
  $("#slice-prob").textContent =
    probs[index] != null ? `· ${record.headline_label} ${probs[index].toFixed(3)} (threshold ${record.findings[0].threshold.toFixed(3)})` : "";
  for (const cell of document.querySelectorAll("#prob-strip button.current")) cell.classList.remove("current");
  const cell = document.querySelector(`#prob-strip button[data-index="${index}"]`);
  if (cell) cell.classList.add("current");

  const key = imageKey(index);
  const img = $("#slice-image");
  img.alt = `Slice ${index + 1} of ${n}, ${state.window} window${state.overlay ? `, ${state.overlayLabel} heatmap` : ""}`;
  fetchImage(index)
    .then((url) => {
      if (imageKey(state.index) !== key) return; // the user has moved on
      $("#image-error").hidden = true;
      const mark = () => {
        img.dataset.index = String(index);
        img.dataset.window = state.window;
        img.dataset.overlay = state.overlay ? "1" : "0";
        img.dataset.key = key;
      };
      if (img.src === url && img.complete) {
        mark();
      } else {
        img.onload = mark;
        img.src = url;
      }
      prefetch(index);
    })
    .catch((error) => {
      $("#image-error").textContent = `Cannot show slice ${index + 1}: ${error.message}`;
      $("#image-error").hidden = false;
    });
}

function prefetch(index) {
  // Neighbours first, so scrolling does not wait; heatmaps are left to be asked for.
  if (state.overlay) return;
  const n = state.scan.series.n_slices;
  for (const k of [index + 1, index - 1, index + 2, index - 2]) {
    if (k >= 0 && k < n) fetchImage(k).catch(() => {});
  }
}

function setWindow(name) {
  if (state.scan?.windowed) return;
  state.window = name;
  setPressedWindow();
  showSlice(state.index);
}

function setOverlay(on) {
  if (!state.scan || !state.scan.labels.length) return;
  state.overlay = on;
  $("#overlay-toggle").checked = on;
  showSlice(state.index);
}

function setUpViewer() {
  for (const button of document.querySelectorAll("#window-buttons button")) {
    button.addEventListener("click", () => setWindow(button.dataset.window));
  }
  $("#overlay-toggle").addEventListener("change", (event) => setOverlay(event.target.checked));
  $("#overlay-label").addEventListener("change", (event) => {
    state.overlayLabel = event.target.value;
    if (state.overlay) showSlice(state.index);
  });
  $("#slice-slider").addEventListener("input", (event) => showSlice(Number(event.target.value)));
  $("#image-box").addEventListener(
    "wheel",
    (event) => {
      if (!state.scan) return;
      event.preventDefault();
      // Lines (Firefox) and pages count as whole notches; pixels accumulate (touchpads).
      const scale = event.deltaMode === 0 ? 1 : 100;
      state.wheel += event.deltaY * scale;
      if (Math.abs(state.wheel) >= 50) {
        showSlice(state.index + Math.sign(state.wheel));
        state.wheel = 0;
      }
    },
    { passive: false },
  );
  document.addEventListener("keydown", (event) => {
    if ($("#viewer").hidden || !state.scan || state.scan.status !== "done") return;
    const tag = event.target.tagName;
    const typing = tag === "INPUT" && !["checkbox", "range"].includes(event.target.type);
    if (tag === "TEXTAREA" || tag === "SELECT" || typing) return;
    const steps = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 5, PageUp: -5 };
    if (event.key in steps) {
      event.preventDefault();
      showSlice(state.index + steps[event.key]);
    } else if (event.key === "Home") {
      event.preventDefault();
      showSlice(0);
    } else if (event.key === "End") {
      event.preventDefault();
      showSlice(state.scan.series.n_slices - 1);
    } else if (event.key === "o" || event.key === "O") {
      setOverlay(!state.overlay);
    }
  });
}

// -- start -----------------------------------------------------------------------------------

function setUpToken() {
  const input = $("#token");
  input.value = sessionStorage.getItem(TOKEN_KEY) || "";
  // Enter in the field fires "change" (below); the form itself must not reload the page.
  $("#token-box").addEventListener("submit", (event) => event.preventDefault());
  input.addEventListener("change", () => {
    const value = input.value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("#token-note").textContent = "";
    clearImages();
    loadLists();
    openFromHash();
  });
}

let worklistTimer = null;

function loadLists() {
  refreshScanList();
  if (state.health?.worklist) {
    $("#worklist-section").hidden = false;
    refreshWorklist();
    clearInterval(worklistTimer);
    worklistTimer = setInterval(refreshWorklist, WORKLIST_MS);
  }
}

async function start() {
  setUpToken();
  setUpDropzone();
  setUpViewer();
  try {
    state.health = await (await fetch("/api/health")).json();
  } catch {
    setUploadStatus("The server does not answer.", true);
    return;
  }
  if (!state.health.model) setUploadStatus("No model loaded: uploads are shown without predictions.");
  if (state.health.token_required && !sessionStorage.getItem(TOKEN_KEY)) {
    askForToken(); // the lists load once it is given (the field's change handler)
    return;
  }
  loadLists();
  openFromHash();
}

function openFromHash() {
  // A reload, or a link to a scan: #scan=<id>.
  const match = location.hash.match(/^#scan=([0-9a-f]{32})$/);
  if (match && !state.scan) openScan(match[1]);
}

start();
