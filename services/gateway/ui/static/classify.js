// Classify: drop images, DICOM files or a ZIP; each becomes a job (one file: POST /v1/jobs; several or a
// ZIP: POST /v1/batches), and its card fills in when the job finishes (long-poll for a single job, the
// batch's page of jobs for a batch). With "Explain", each job asks for its Grad-CAM heatmap too, shown
// beside the input once the worker has made it (GET /v1/jobs/{id}/explanation, same origin).
"use strict";

(() => {
  const { api, el, clear, notice, percent, statusBadge, warningList, sleep, number } = xrayq;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const FINISHED_BATCH = new Set(["succeeded", "partially_failed", "failed", "cancelled"]);
  const cards = new Map(); // job id -> card element
  const explaining = new Set(); // job ids whose explanation is being followed or shown
  const results = document.getElementById("results");

  async function loadModels() {
    const select = document.getElementById("model");
    try {
      for (const model of await api("GET", "/v1/models")) {
        const active = model.active_version ? ` (v${model.active_version} active)` : " (none active)";
        select.append(el("option", { value: model.name, text: model.name + active }));
      }
    } catch (failure) {
      notice(`Models could not be listed: ${failure.message}`);
    }
  }

  function isZip(file) {
    return /\.zip$/i.test(file.name) || file.type === "application/zip" || file.type === "application/x-zip-compressed";
  }

  async function submit(files) {
    if (!files.length) return;
    notice("");
    const form = new FormData();
    const model = document.getElementById("model").value;
    const clientRef = document.getElementById("client-ref").value.trim();
    if (model) form.append("model", model);
    if (clientRef) form.append("client_ref", clientRef);
    if (document.getElementById("explain").checked) form.append("explain", "true");
    const previews = new Map(files.map((f) => [f.name, f]));
    try {
      if (files.length === 1 && !isZip(files[0])) {
        form.append("file", files[0]);
        const accepted = await api("POST", "/v1/jobs", { form });
        addCard(accepted, previews.get(accepted.filename));
        followJob(accepted.id);
      } else {
        for (const file of files) form.append("files", file);
        const accepted = await api("POST", "/v1/batches", { form });
        for (const job of accepted.jobs) addCard(job, previews.get(job.filename));
        followBatch(accepted.id);
      }
    } catch (failure) {
      notice(`Not accepted (${failure.code}): ${failure.message}`);
    }
  }

  function addCard(job, file) {
    const preview = el("div", { class: "preview" });
    if (file && /^image\/(png|jpeg)$/.test(file.type)) {
      const img = el("img", { alt: `Input ${job.filename}`, src: URL.createObjectURL(file) });
      img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
      preview.append(img);
    } else {
      preview.append(el("span", { class: "muted", text: file && !/^image\//.test(file.type) ? "DICOM / other" : "in archive" }));
    }
    // Where an explanation (a Grad-CAM overlay) will stand beside the input once the API offers one.
    const explanation = el("div", { class: "explanation", hidden: true, dataset: { jobId: job.id } });
    const card = el("article", { class: "result pending", dataset: { jobId: job.id } },
      el("header", {}, el("span", { class: "filename", text: job.filename, title: job.filename }), statusBadge(job.status)),
      el("div", { class: "figures" }, preview, explanation),
      el("div", { class: "details" }, el("p", { class: "muted", text: "waiting for a worker…" })));
    results.prepend(card);
    cards.set(job.id, card);
    document.getElementById("results-count").textContent = `(${cards.size})`;
  }

  function render(job) {
    const card = cards.get(job.id);
    if (!card) return;
    card.className = `result status-${job.status}`;
    card.querySelector("header .badge").replaceWith(statusBadge(job.status));
    const details = clear(card.querySelector(".details"));
    const result = job.result;
    if (result) {
      details.append(el("p", { class: "label" }, el("span", { class: "muted", text: "label " }), el("strong", { text: result.label })));
      const probabilities = Object.entries(result.probabilities || {}).sort((a, b) => b[1] - a[1]);
      details.append(el("div", { class: "probabilities" }, probabilities.map(([name, p]) =>
        el("div", { class: "probability" }, el("span", { class: "class-name", text: name }), xrayq.progressBar(p, percent(p))))));
      details.append(el("p", { class: "model-ref muted", text: `answered by ${result.model.name} v${result.model.version ?? "?"}` }));
      // Anything else the result carries (confidence, uncertainty, ...), shown as it comes.
      const extra = Object.entries(result).filter(([key]) => !["label", "probabilities", "model"].includes(key));
      if (extra.length) details.append(keyValues(extra, "result-extra"));
    }
    if (job.error) {
      details.append(el("p", { class: "error" }, el("strong", { text: job.error.code }), job.error.detail ? ` — ${job.error.detail}` : ""));
    }
    const warnings = warningList(job.warnings);
    if (warnings) {
      card.classList.add("has-warnings");
      details.append(warnings);
    }
    if (job.dicom && Object.keys(job.dicom).length) {
      details.append(el("details", {}, el("summary", { text: "DICOM tags" }), keyValues(Object.entries(job.dicom), "dicom-tags")));
    }
    if (job.client_ref) details.append(el("p", { class: "muted", text: `client reference: ${job.client_ref}` }));
    if (job.timings?.total_ms !== undefined) details.append(el("p", { class: "muted", text: `${number(job.timings.total_ms, 0)} ms end to end` }));
    if (job.explanation && job.status === "succeeded") followExplanation(job.id, job.explanation);
  }

  // The heatmap beside the input: asked for once the answer is there, until it is made (or why not).
  async function followExplanation(id, state) {
    if (explaining.has(id)) return;
    explaining.add(id);
    const box = clear(cards.get(id).querySelector(".explanation"));
    box.hidden = false;
    if (state.status === "failed") return showExplanationError(box, state.error);
    box.append(el("span", { class: "muted", text: "explaining…" }));
    const url = `/v1/jobs/${encodeURIComponent(id)}/explanation?format=json`;
    for (let tries = 0; tries < 120; tries++) {
      try {
        const explanation = await api("GET", url);
        if (explanation.status === "succeeded") return showExplanation(id, box, explanation);
      } catch (failure) {
        return showExplanationError(box, { code: failure.code, detail: failure.message });
      }
      await sleep(1000);
    }
    clear(box).append(el("span", { class: "muted", text: "no heatmap yet" }));
  }

  function showExplanation(id, box, explanation) {
    const what = `Grad-CAM heatmap for ${explanation.label} (${explanation.model.name} v${explanation.model.version}, layer ${explanation.target_layer})`;
    clear(box).append(el("img", { alt: what, title: what, src: explanation.overlay.location }));
    cards.get(id).querySelector(".details").append(el("p", { class: "explanation-note muted", text: `heatmap: ${what}` }));
  }

  function showExplanationError(box, error) {
    clear(box).append(el("span", { class: "error", text: error?.code || "no heatmap", title: error?.detail || "" }));
  }

  function keyValues(entries, className) {
    return el("table", { class: `kv ${className}` }, el("tbody", {}, entries.map(([key, value]) =>
      el("tr", {}, el("th", { text: key }), el("td", { text: typeof value === "object" ? JSON.stringify(value) : number(value) })))));
  }

  // Long-polls hold a connection each; a browser keeps six per host, so at most four at once.
  let polling = 0;
  const waiting = [];
  async function followJob(id) {
    if (polling >= 4) await new Promise((resolve) => waiting.push(resolve));
    polling++;
    try {
      for (;;) {
        const job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}?wait=20`);
        render(job);
        if (TERMINAL.has(job.status)) return;
      }
    } catch (failure) {
      notice(`Job ${id}: ${failure.message}`);
    } finally {
      polling--;
      waiting.shift()?.();
    }
  }

  async function followBatch(id) {
    const shown = new Map();
    for (;;) {
      let cursor = null;
      let batch;
      try {
        do {
          const query = new URLSearchParams({ limit: "500", ...(cursor ? { cursor } : {}) });
          batch = await api("GET", `/v1/batches/${encodeURIComponent(id)}?${query}`);
          for (const job of batch.jobs) {
            if (shown.get(job.id) !== job.status) {
              shown.set(job.id, job.status);
              render(job);
            }
          }
          cursor = batch.next_cursor;
        } while (cursor);
      } catch (failure) {
        notice(`Batch ${id}: ${failure.message}`);
        return;
      }
      if (FINISHED_BATCH.has(batch.status)) return;
      await sleep(1000);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    loadModels();
    const zone = document.getElementById("drop-zone");
    const input = document.getElementById("file-input");
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      submit([...event.dataTransfer.files]);
    });
    zone.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") input.click(); });
    input.addEventListener("change", () => { submit([...input.files]); input.value = ""; });
  });
})();
