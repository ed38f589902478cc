// Training: datasets (POST/GET /v1/datasets) with their class counts, training runs (POST/GET
// /v1/training-runs) with live progress and loss/metric curves from each run's history, cancellation.
"use strict";

(() => {
  const { api, el, clear, notice, when, number, percent, progressBar, statusBadge, confirmAction, sleep, may } = xrayq;
  const ACTIVE = new Set(["queued", "running"]);
  const drawn = new Map(); // run id -> JSON last drawn (redraw only what changed)

  function countsText(counts) {
    return Object.entries(counts).map(([split, classes]) =>
      `${split}: ${Object.entries(classes).map(([name, n]) => `${name} ${n}`).join(", ")}`).join(" · ");
  }

  async function loadDatasets() {
    const datasets = await api("GET", "/v1/datasets");
    const body = clear(document.querySelector("#datasets tbody"));
    const select = document.getElementById("run-dataset");
    const chosen = select.value;
    clear(select);
    for (const d of datasets) {
      body.append(el("tr", { dataset: { datasetId: d.id } }, el("td", { text: d.name }), el("td", { text: `v${d.version}` }),
        el("td", { text: d.files }), el("td", { class: "counts", text: countsText(d.counts) }), el("td", { text: when(d.created_at) })));
      select.append(el("option", { value: d.id, text: `${d.name} v${d.version} (${d.files} files)`, selected: d.id === chosen }));
    }
  }

  async function uploadDataset(event) {
    event.preventDefault();
    const file = document.getElementById("dataset-file").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    const name = document.getElementById("dataset-name").value.trim();
    const classes = document.getElementById("dataset-classes").value.trim();
    if (name) form.append("name", name);
    if (classes) form.append("classes", classes);
    notice(`Uploading ${file.name}…`, "ok");
    try {
      const dataset = await api("POST", "/v1/datasets", { form });
      notice(`Dataset ${dataset.name} v${dataset.version}: ${dataset.files} files — ${countsText(dataset.counts)}`, "ok");
      await loadDatasets();
      document.getElementById("run-dataset").value = dataset.id;
    } catch (failure) {
      const files = failure.files ? ` (${failure.files.length} files)` : "";
      notice(`Dataset refused (${failure.code})${files}: ${failure.message}`);
    }
  }

  async function startRun(event) {
    event.preventDefault();
    const value = (id) => document.getElementById(id).value.trim();
    const body = { dataset: value("run-dataset"), promotion: value("run-promotion") };
    const optional = { model_name: "run-model", architecture: "run-architecture" };
    for (const [key, id] of Object.entries(optional)) if (value(id)) body[key] = value(id);
    const numbers = { epochs: "run-epochs", batch_size: "run-batch-size", learning_rate: "run-lr",
      image_size: "run-image-size", max_per_class: "run-max-per-class" };
    for (const [key, id] of Object.entries(numbers)) if (value(id)) body[key] = Number(value(id));
    try {
      const run = await api("POST", "/v1/training-runs", { json: body });
      notice(`Run ${run.id.slice(0, 8)} queued for ${run.model_name}.`, "ok");
      update();
    } catch (failure) {
      notice(`Run refused (${failure.code}): ${failure.message}`);
    }
  }

  function curves(history, keys) {
    return keys.map((key) => ({ name: key, points: history.filter((h) => typeof h[key] === "number").map((h) => [h.epoch ?? 0, h[key]]) }))
      .filter((s) => s.points.length);
  }

  function runCard(run) {
    const p = run.progress || {};
    const epochs = p.epochs ? `epoch ${p.epoch ?? 0} / ${p.epochs}` : "";
    const step = p.steps ? ` · step ${p.step ?? 0} / ${p.steps}` : "";
    const eta = p.eta_seconds ? ` · about ${Math.round(p.eta_seconds)} s left` : "";
    // A run that outlived its trainer: where it continued from (its last epoch's checkpoint).
    const comebacks = (run.resumes ?? 0) + (run.handbacks ?? 0);
    const resumed = comebacks ? ` · resumed ${comebacks}× (checkpoint: epoch ${run.checkpoint_epoch ?? "none"})` : "";
    const history = run.history || [];
    const lossChart = el("div", { class: "chart loss-chart" });
    const metricChart = el("div", { class: "chart metric-chart" });
    const charts = history.length
      ? el("div", { class: "columns" }, lossChart, metricChart)
      : el("p", { class: "muted", text: ACTIVE.has(run.status) ? "Curves appear after the first epoch." : "No epoch finished." });
    const card = el("article", { class: `card run status-${run.status}`, dataset: { runId: run.id, status: run.status } },
      el("header", { class: "run-head" },
        el("strong", { text: run.model_name }), statusBadge(run.status),
        el("span", { class: "muted mono", text: run.id.slice(0, 8), title: run.id }),
        el("span", { class: "muted", text: `${run.config.architecture ?? ""} · ${run.promotion} · ${when(run.created_at)}` }),
        el("span", { class: "spacer" }),
        ACTIVE.has(run.status) && !run.cancel_requested
          ? el("button", { type: "button", class: "danger cancel", text: "Cancel", onclick: () => cancel(run) }) : null),
      el("div", { class: "run-progress" }, el("span", { class: "phase", text: p.phase ?? run.status }),
        progressBar((p.percent ?? (run.status === "succeeded" ? 100 : 0)) / 100, `${number(p.percent ?? 0, 0)}%`),
        el("span", { class: "muted", text: `${epochs}${step}${eta}${resumed}` })),
      charts);
    if (run.error) card.append(el("p", { class: "error" }, el("strong", { text: run.error.code }), ` — ${run.error.detail ?? ""}`));
    if (run.model) card.append(el("p", { text: `Registered ${run.model.name} v${run.model.version}.` }));
    const decision = run.promotion_decision;
    if (decision) {
      const verdict = decision.promote === undefined ? "" : decision.promote ? "promoted" : "not promoted";
      card.append(el("p", { class: "muted", text: `Promotion (${decision.policy ?? run.promotion}): ${verdict}${decision.reason ? ` — ${decision.reason}` : ""}` }));
    }
    if (!history.length) return card;
    lineChart(lossChart, curves(history, ["train_loss", "val_loss"]), { xLabel: "epoch", yLabel: "loss" });
    lineChart(metricChart, curves(history, ["val_accuracy", "val_roc_auc"]), { xLabel: "epoch", yLabel: "validation" });
    return card;
  }

  async function cancel(run) {
    if (!(await confirmAction(`Cancel training run ${run.id.slice(0, 8)} of ${run.model_name}?`, "Cancel run"))) return;
    try { await api("POST", `/v1/training-runs/${encodeURIComponent(run.id)}/cancel`); } catch (failure) { notice(failure.message); }
    update();
  }

  async function refreshRuns() {
    const runs = await api("GET", "/v1/training-runs");
    const container = document.getElementById("runs");
    if (!runs.length && !container.querySelector(".run")) container.replaceChildren(el("p", { class: "muted", text: "No training runs yet." }));
    const order = runs.map((r) => r.id);
    for (const run of runs) {
      const json = JSON.stringify(run);
      if (drawn.get(run.id) === json) continue;
      drawn.set(run.id, json);
      const fresh = runCard(run);
      const old = container.querySelector(`[data-run-id="${CSS.escape(run.id)}"]`);
      if (old) old.replaceWith(fresh); else container.append(fresh);
    }
    for (const node of [...container.children]) if (node.dataset.runId && !order.includes(node.dataset.runId)) node.remove();
    if (runs.length) container.querySelector(":scope > p.muted")?.remove();
    [...container.querySelectorAll(".run")].sort((a, b) => order.indexOf(a.dataset.runId) - order.indexOf(b.dataset.runId))
      .forEach((node) => container.append(node));
    return runs.some((r) => ACTIVE.has(r.status));
  }

  let busy = false;
  async function update() {
    if (busy) return false;
    busy = true;
    try { return await refreshRuns(); } catch (failure) { notice(failure.message); return false; } finally { busy = false; }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    if (!may("train")) return; // the API would refuse every call: nothing to show or do
    document.getElementById("dataset-form").addEventListener("submit", uploadDataset);
    document.getElementById("run-form").addEventListener("submit", startRun);
    loadDatasets().catch((failure) => notice(failure.message));
    for (;;) {
      const moving = await update();
      await sleep(moving ? 1000 : 8000);
    }
  });
})();
