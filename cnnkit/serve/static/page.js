// cnnkit's page: drop, pick or paste images; each goes to the same endpoints every client uses
// (POST /predict for the top-k and the abstain decision, POST /v1/models/NAME:explain for Grad-CAM),
// so the server's limits and errors apply unchanged. No framework, no build step, no other host.
"use strict";

(() => {
  const PARALLEL = 4;  // requests in flight; the server micro-batches concurrent ones into one model call
  const EXPLAIN_BATCH = 8;  // images per :explain request: one batched Grad-CAM costs far less than eight
  const IMAGE_TYPES = /\.(jpe?g|png|bmp|gif|webp|tiff?)$/i;

  const el = (id) => document.getElementById(id);
  const model = { name: null, base: null, classNames: [], minConfidence: null, topK: 3, limits: null };
  const waiting = [];  // items to classify, queued until the model is ready and a request slot is free
  const explaining = [];  // classified items waiting for their Grad-CAM (predictions go first)
  let inFlight = 0;
  let nextId = 1;

  // -- talking to the API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function call(url, options = {}) {
    let response;
    try {
      response = await fetch(url, { ...options, headers: { accept: "application/json", ...(options.headers || {}) } });
    } catch (err) {
      throw new ApiError(0, `the server did not answer (${err.message}); is cnnkit serve still running?`);
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new ApiError(response.status, body.error || `HTTP ${response.status}`);
    return body;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function connect() {
    for (;;) {
      try {
        const ready = await fetch("/readyz").then((r) => r.json());
        if (ready.status === "ready") {
          model.name = ready.model;
          model.base = `/v1/models/${encodeURIComponent(ready.model)}`;
          el("model-title").textContent = `${ready.model}, version ${ready.version}`;
          break;
        }
        say("The model is loading…");
      } catch (err) {
        say("Cannot reach the server; retrying…");
      }
      await sleep(1000);
    }
    const [metadata, card] = await Promise.all([call(`${model.base}/metadata`),
      call(`${model.base}/card`).catch((err) => err)]);
    model.limits = card instanceof Error ? null : card.limits;
    model.classNames = metadata.cnnkit.class_names;
    model.minConfidence = metadata.cnnkit.min_confidence;
    model.topK = Math.min(5, model.classNames.length);
    say(`Ready: ${model.classNames.length} classes (${model.classNames.join(", ")}).`);
    for (const id of ["choose", "clear"]) el(id).disabled = false;
    pump();
    if (card instanceof Error) {
      el("card-status").textContent = `The model card is not available: ${card.message}`;
    } else {
      showCard(card);
    }
  }

  function say(text) { el("status").textContent = text; }

  // -- taking files in ---------------------------------------------------------------------------

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    for (const file of files) waiting.push(newItem(file));
    if (files.length) { progress(); pump(); }
  }

  function pump() {
    while (model.name && inFlight < PARALLEL && (waiting.length || explaining.length)) {
      const task = waiting.length ? classify(waiting.shift()) : explain(explainBatch());
      inFlight += 1;
      task.finally(() => { inFlight -= 1; progress(); pump(); });
    }
  }

  function newItem(file) {
    const node = el("result-template").content.firstElementChild.cloneNode(true);
    const id = `result-${nextId++}`;
    const q = (selector) => node.querySelector(selector);
    const item = { file, node, q, id, url: null };
    node.id = id;
    q(".filename").textContent = file.name || "pasted image";
    q(".filename").id = `${id}-name`;
    q("article").setAttribute("aria-labelledby", `${id}-name`);
    q(".original").alt = `${file.name || "pasted image"}, as uploaded`;
    if (looksLikeImage(file)) {
      item.url = URL.createObjectURL(file);
      q(".original").src = item.url;
      q(".original").addEventListener("error", () => { q(".original-figure").hidden = true; }, { once: true });
    } else {
      q(".original-figure").hidden = true;
    }
    el("results").append(node);
    return item;
  }

  function looksLikeImage(file) {
    return file.type ? file.type.startsWith("image/") : IMAGE_TYPES.test(file.name || "");
  }

  // -- one image: prediction, then Grad-CAM ------------------------------------------------------

  async function classify(item) {
    const { file, q } = item;
    if (!looksLikeImage(file)) {
      return showError(item, "Wrong type", `${file.type ? `"${file.type}"` : "this file"} is not an image type; ` +
        "cnnkit reads JPEG, PNG, BMP, GIF, WebP and TIFF files.");
    }
    q(".verdict").textContent = "Classifying…";
    const form = new FormData();
    form.append("file", file, file.name || "pasted.png");
    let prediction;
    try {
      prediction = (await call(`/predict?top_k=${model.topK}`, { method: "POST", body: form })).predictions[0];
    } catch (err) {
      return showError(item, errorKind(err), err.message);
    }
    showPrediction(item, prediction);
    item.prediction = prediction;
    explaining.push(item);
  }

  function errorKind(err) {
    const text = err.message.toLowerCase();
    if (err.status === 413 || text.includes("decompression bomb") || text.includes("too many pixels")) return "Too large";
    if (err.status === 415) return "Wrong type";
    if (text.includes("empty file")) return "Empty file";
    if (text.includes("corrupt") || text.includes("truncated")) return "Corrupt image";
    if (text.includes("not an image")) return "Not an image";
    if (err.status === 0) return "No answer";
    return "Not classified";
  }

  function showError(item, kind, message) {
    const { q, node } = item;
    node.dataset.state = "error";
    const box = q(".error");
    const named = `'${item.file.name}': `;  // the API names the file; here its name is just above
    box.replaceChildren(strong(`${kind}:`), ` ${message.startsWith(named) ? message.slice(named.length) : message}`);
    box.hidden = false;
    q(".verdict").hidden = true;
  }

  function showPrediction(item, p) {
    const { q, node } = item;
    const verdict = q(".verdict");
    const best = p.top_k[0];
    if (p.abstained) {
      node.dataset.state = "unknown";
      verdict.replaceChildren(span("label", "unknown"));
      const why = q(".why");
      why.textContent = `The best guess, “${best.label}”, has ${percent(p.confidence)} confidence: below this ` +
        `model's abstain threshold of ${percent(model.minConfidence)} (set by cnnkit calibrate), so it answers unknown.`;
      why.hidden = false;
    } else {
      node.dataset.state = "done";
      verdict.replaceChildren(span("label", p.label), ` ${percent(p.confidence)} confidence`);
    }
    const list = q(".topk");
    list.setAttribute("aria-label", `Top ${p.top_k.length} classes for ${item.file.name || "the pasted image"}`);
    list.replaceChildren(...p.top_k.map(({ label, probability }) => {
      const row = document.createElement("li");
      const bar = span("bar");
      bar.setAttribute("aria-hidden", "true");
      const fill = span("fill");
      fill.style.width = `${Math.max(0, Math.min(100, probability * 100))}%`;
      bar.append(fill);
      row.append(span("name", label), bar, span("value", percent(probability)));
      return row;
    }));
    list.hidden = false;
  }

  // The next few classified images, as many as fit one request under the server's limits.
  function explainBatch() {
    const batch = [explaining.shift()];
    const most = model.limits ? Math.min(EXPLAIN_BATCH, model.limits.max_instances) : 1;
    let bytes = base64Bytes(batch[0].file);
    while (explaining.length && batch.length < most &&
           bytes + base64Bytes(explaining[0].file) <= 0.9 * model.limits.max_body_bytes) {
      bytes += base64Bytes(explaining[0].file);
      batch.push(explaining.shift());
    }
    return batch;
  }

  const base64Bytes = (file) => Math.ceil(file.size / 3) * 4 + 16;

  async function explain(batch) {
    let found;
    try {
      const instances = await Promise.all(batch.map(async (item) => ({ b64: await fileBase64(item.file) })));
      found = (await call(`${model.base}:explain`, {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ instances }),
      })).explanations;
    } catch (err) {
      for (const item of batch) {
        const note = item.q(".cam-note");
        note.textContent = `No Grad-CAM: ${err.message}`;
        note.hidden = false;
        item.node.dataset.cam = "error";
      }
      return;
    }
    batch.forEach((item, i) => showOverlay(item, found[i]));
  }

  function showOverlay(item, found) {
    const { q, node, prediction } = item;
    const overlay = q(".overlay");
    overlay.src = `data:image/png;base64,${found.overlay_png_b64}`;
    const guess = prediction.abstained ? `the best guess “${found.class_name}”` : `“${found.class_name}”`;
    overlay.alt = `Grad-CAM of ${item.file.name || "the pasted image"}: where the model looked for ${guess}.`;
    q(".overlay-caption").textContent = `Grad-CAM for ${guess} (red: most, blue: least)`;
    q(".overlay-figure").hidden = false;
    q(".switch-row").hidden = false;
    const toggle = q(".cam-switch");
    toggle.setAttribute("aria-describedby", `${item.id}-name`);
    toggle.addEventListener("change", () => { q(".overlay-figure").hidden = !toggle.checked; });
    node.dataset.cam = "shown";
  }

  function fileBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(new ApiError(0, `cannot read the file (${reader.error})`));
      reader.readAsDataURL(file);
    });
  }

  // -- small helpers -----------------------------------------------------------------------------

  function percent(x) { return x == null ? "none" : `${(x * 100).toFixed(1)}%`; }

  function span(cls, text) {
    const s = document.createElement("span");
    s.className = cls;
    if (text !== undefined) s.textContent = text;
    return s;
  }

  function strong(text) {
    const s = document.createElement("strong");
    s.textContent = text;
    return s;
  }

  function progress() {
    const items = Array.from(el("results").children);
    if (!items.length) { el("progress").textContent = "No images yet."; return; }
    const count = (state) => items.filter((n) => n.dataset.state === state).length;
    const pending = count("pending");
    const parts = [`${items.length} image${items.length === 1 ? "" : "s"}`];
    if (count("done")) parts.push(`${count("done")} classified`);
    if (count("unknown")) parts.push(`${count("unknown")} unknown`);
    if (count("error")) parts.push(`${count("error")} with errors`);
    if (pending) parts.push(`${pending} waiting`);
    el("progress").textContent = parts.join(", ") + ".";
  }

  // -- the model card ----------------------------------------------------------------------------

  function showCard(card) {
    el("card-status").textContent = card.from === "registry"
      ? `From the registry (${card.registry_name}@${card.version}).`
      : `From the run's ${card.from}.`;
    const facts = [
      ["Name", card.name],
      ["Version", card.version],
      ["Stage", card.stage || "not registered"],
      ["Classes", `${card.class_names.length}: ${card.class_names.join(", ")}`],
      ["Image size", `${card.image_size.join(" × ")} px, ${card.color_mode}, ${card.resize_mode || "stretch"}`],
      ["Architecture", card.architecture],
      ["Backend", card.backend || "unknown"],
      ["Trained", date(card.trained)],
      ["Registered", card.registered ? date(card.registered) : null],
      ["Data hash", card.data_hash || "unknown", "mono"],
      ["Abstains below", card.calibration.min_confidence == null ? "never (not calibrated with a threshold)"
        : percent(card.calibration.min_confidence)],
      ["Temperature", String(Number(card.calibration.temperature.toPrecision(4)))],
      ["Request limit", `${size(card.limits.max_body_bytes)}, ${card.limits.max_instances} images`],
    ];
    el("card-facts").replaceChildren(...facts.filter(([, v]) => v != null).flatMap(([k, v, cls]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      if (cls) dd.className = cls;
      return [dt, dd];
    }));
    const { eval: evals = {}, ...training } = card.metrics || {};
    const tables = [metricsTable("Training", training)];
    for (const [name, values] of Object.entries(evals)) tables.push(metricsTable(`Evaluation: ${name}`, values));
    el("card-metrics").replaceChildren(...tables.filter(Boolean));
    const links = card.reports.map(({ name, url }) => {
      const p = document.createElement("p");
      const a = document.createElement("a");
      a.href = url;
      a.target = "_blank";
      a.rel = "noopener";
      a.textContent = `Evaluation report: ${name} (opens in a new tab)`;
      p.append(a);
      return p;
    });
    if (!links.length) {
      const p = document.createElement("p");
      p.className = "hint";
      p.textContent = "No evaluation report yet: cnnkit evaluate RUN DATA writes one.";
      links.push(p);
    }
    el("card-reports").replaceChildren(...links);
  }

  function metricsTable(title, values) {
    const rows = Object.entries(values).filter(([, v]) => typeof v === "number");
    if (!rows.length) return null;
    const table = document.createElement("table");
    table.className = "metrics";
    table.createCaption().textContent = title;
    const body = table.createTBody();
    for (const [key, value] of rows) {
      const row = body.insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = key.replaceAll("_", " ");
      const td = row.insertCell();
      td.textContent = formatMetric(key, value);
      row.prepend(th);
    }
    return table;
  }

  function formatMetric(key, value) {
    if (/accuracy|precision|recall|f1|coverage/.test(key) && value >= 0 && value <= 1) return percent(value);
    if (Number.isInteger(value)) return String(value);
    return String(Number(value.toPrecision(4)));
  }

  function size(bytes) {
    return bytes >= 1048576 ? `${Number((bytes / 1048576).toPrecision(3))} MiB` : `${Math.round(bytes / 1024)} KiB`;
  }

  function date(text) { return text ? text.replace("T", " ").replace(/\+00:00$/, " UTC") : "unknown"; }

  // -- wiring --------------------------------------------------------------------------------------

  function wire() {
    const input = el("files");
    const zone = el("dropzone");
    el("choose").addEventListener("click", () => input.click());
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    el("clear").addEventListener("click", () => {
      waiting.length = 0;
      explaining.length = 0;
      for (const node of el("results").querySelectorAll(".original")) {
        if (node.src.startsWith("blob:")) URL.revokeObjectURL(node.src);
      }
      el("results").replaceChildren();
      progress();
      el("choose").focus();
    });
    for (const type of ["dragenter", "dragover"]) {
      window.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("over"); });
    }
    window.addEventListener("dragleave", (event) => {
      if (event.relatedTarget === null) zone.classList.remove("over");
    });
    window.addEventListener("drop", (event) => {  // anywhere on the page: never navigate away to the file
      event.preventDefault();
      zone.classList.remove("over");
      addFiles(event.dataTransfer && event.dataTransfer.files);
    });
    document.addEventListener("paste", (event) => {
      const files = event.clipboardData ? event.clipboardData.files : [];
      if (files && files.length) { event.preventDefault(); addFiles(files); }
    });
  }

  wire();
  connect();
})();
