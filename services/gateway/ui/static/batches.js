// Batches & jobs: GET /v1/batches and GET /v1/jobs with the page's filters, refreshed while anything is
// still running; cancelling a queued job is DELETE /v1/jobs/{id}.
"use strict";

(() => {
  const { api, el, clear, notice, when, percent, progressBar, statusBadge, confirmAction, sleep } = xrayq;
  let batchId = null; // jobs of one batch, when chosen

  function filters() {
    const form = new FormData(document.getElementById("filters"));
    const query = new URLSearchParams();
    for (const name of ["model", "client_ref"]) {
      const value = (form.get(name) || "").trim();
      if (value) query.set(name, value);
    }
    // Dates are the person's local days.
    const after = form.get("created_after");
    const before = form.get("created_before");
    if (after) query.set("created_after", new Date(`${after}T00:00:00`).toISOString());
    if (before) {
      const end = new Date(`${before}T00:00:00`);
      end.setDate(end.getDate() + 1);
      query.set("created_before", end.toISOString());
    }
    return { query, status: form.get("status") || "" };
  }

  async function refresh() {
    const { query, status } = filters();
    const batchQuery = new URLSearchParams(query);
    if (status) batchQuery.set("state", ["queued", "running"].includes(status) ? "active" : "finished");
    const jobQuery = new URLSearchParams(query);
    if (status) jobQuery.set("status", status);
    if (batchId) jobQuery.set("batch_id", batchId);
    jobQuery.set("limit", "200");
    const [batches, jobs] = await Promise.all([
      api("GET", `/v1/batches?${batchQuery}`), api("GET", `/v1/jobs?${jobQuery}`)]);
    showBatches(batches);
    showJobs(jobs);
    return batches.some((b) => ["queued", "running", "collecting"].includes(b.status)) ||
      jobs.some((j) => ["queued", "running"].includes(j.status));
  }

  function showBatches(batches) {
    const body = clear(document.querySelector("#batches tbody"));
    document.getElementById("batches-empty").hidden = batches.length > 0;
    for (const batch of batches) {
      const c = batch.counts;
      const done = c.succeeded + c.failed + c.cancelled;
      const kind = batch.study_instance_uid ? `study ${batch.study_instance_uid}` : batch.id.slice(0, 8);
      body.append(el("tr", { dataset: { batchId: batch.id }, class: batch.id === batchId ? "chosen" : "" },
        el("td", { text: when(batch.created_at) }),
        el("td", { class: "mono", text: kind, title: batch.id }),
        el("td", { text: batch.client_ref ?? "" }),
        el("td", { text: batch.model.name }),
        el("td", {}, statusBadge(batch.status)),
        el("td", {}, progressBar(batch.progress, `${done} / ${batch.total}`)),
        el("td", { class: "counts", text: `${c.succeeded} ok · ${c.failed} failed · ${c.cancelled} cancelled · ${c.queued + c.running} waiting` }),
        el("td", { class: "actions" },
          el("button", { type: "button", class: "quiet", text: "Jobs", onclick: () => { batchId = batch.id; update(); } }),
          c.queued > 0 ? el("button", { type: "button", class: "danger", text: "Cancel queued", onclick: () => cancelBatch(batch) }) : null)));
    }
  }

  function showJobs(jobs) {
    document.getElementById("jobs-scope").textContent = batchId ? `of batch ${batchId.slice(0, 8)}` : "";
    const body = clear(document.querySelector("#jobs tbody"));
    document.getElementById("jobs-empty").hidden = jobs.length > 0;
    for (const job of jobs) {
      const result = job.result
        ? `${job.result.label} ${percent(job.result.probabilities[job.result.label])} · v${job.result.model.version ?? "?"}`
        : "";
      body.append(el("tr", { dataset: { jobId: job.id } },
        el("td", { text: when(job.created_at) }),
        el("td", { class: "filename", text: job.filename, title: job.id }),
        el("td", { text: job.client_ref ?? "" }),
        el("td", { text: job.model.name }),
        el("td", {}, statusBadge(job.status), job.warnings?.length ? el("span", { class: "badge warning", text: `${job.warnings.length} warning${job.warnings.length > 1 ? "s" : ""}`,
          title: job.warnings.map((w) => w.code).join(", ") }) : null),
        el("td", { text: result }),
        el("td", { class: "error", text: job.error ? job.error.code : "", title: job.error?.detail ?? "" }),
        el("td", {}, job.status === "queued" ? el("button", { type: "button", class: "danger", text: "Cancel", onclick: () => cancelJob(job) }) : null)));
    }
  }

  async function cancelJob(job) {
    if (!(await confirmAction(`Cancel job ${job.filename}?`, "Cancel job"))) return;
    try { await api("DELETE", `/v1/jobs/${encodeURIComponent(job.id)}`); } catch (failure) { notice(failure.message); }
    update();
  }

  async function cancelBatch(batch) {
    if (!(await confirmAction(`Cancel the ${batch.counts.queued} queued jobs of this batch? Running ones finish.`, "Cancel jobs"))) return;
    const queued = await api("GET", `/v1/jobs?batch_id=${encodeURIComponent(batch.id)}&status=queued&limit=500`);
    for (const job of queued) {
      try { await api("DELETE", `/v1/jobs/${encodeURIComponent(job.id)}`); } catch (failure) {
        if (failure.code !== "job_not_cancellable") notice(failure.message); // a worker took it meanwhile
      }
    }
    update();
  }

  let busy = false;
  async function update() {
    if (busy) return false;
    busy = true;
    try { return await refresh(); } catch (failure) { notice(failure.message); return false; } finally { busy = false; }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    document.getElementById("filters").addEventListener("submit", (event) => { event.preventDefault(); batchId = null; update(); });
    for (;;) {
      const moving = await update();
      await sleep(moving ? 1500 : 8000);
    }
  });
})();
