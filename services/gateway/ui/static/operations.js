// Operations: GET /v1/operations (the /metrics registry, summarised) every 3 s. Throughput is the change
// of finished jobs between two snapshots, as Prometheus's rate() would compute it.
"use strict";

(() => {
  const { api, el, clear, notice, percent, seconds, number, sleep } = xrayq;
  const samples = []; // [time s, jobs finished]
  const KEEP = 100;

  function rows(tbody, entries) {
    clear(tbody);
    for (const cells of entries) tbody.append(el("tr", {}, cells.map((c) => el("td", { text: c }))));
  }

  function show(ops) {
    const now = Date.now() / 1000;
    samples.push([now, ops.jobs_finished]);
    if (samples.length > KEEP) samples.shift();
    const points = [];
    for (let i = 1; i < samples.length; i++) {
      const [t0, n0] = samples[i - 1];
      const [t1, n1] = samples[i];
      points.push([t1 - samples[0][0], Math.max(0, (n1 - n0) / (t1 - t0))]);
    }
    document.getElementById("throughput").textContent = points.length ? number(points[points.length - 1][1], 2) : "…";
    lineChart(document.getElementById("throughput-chart"), [{ name: "jobs finished / s", points }], { xLabel: "seconds on this page", yLabel: "jobs/s" });
    document.getElementById("job-error-rate").textContent = percent(ops.job_error_rate);
    document.getElementById("http-error-rate").textContent = percent(ops.http_error_rate);
    const workers = Object.entries(ops.workers);
    document.getElementById("workers").textContent = String(workers.reduce((n, [, c]) => n + c, 0));
    document.getElementById("workers-detail").textContent = workers.map(([q, c]) => `${q} ${c}`).join(" · ") || "none answering";
    const depths = Object.entries(ops.queue_depths);
    document.getElementById("queue-depth").textContent = String(depths.reduce((n, [, c]) => n + c, 0));
    document.getElementById("queue-detail").textContent = depths.map(([q, c]) => `${q} ${c}`).join(" · ") || "messages waiting";
    rows(document.querySelector("#jobs-by-status tbody"), Object.entries(ops.jobs_by_status).map(([s, n]) => [s, number(n)]));
    rows(document.querySelector("#latency tbody"), ops.latency.map((r) => [`${r.method} ${r.route}`, number(r.count), seconds(r.p50), seconds(r.p90), seconds(r.p99)]));
    rows(document.querySelector("#active-versions tbody"), ops.active_versions.map((v) => [v.model, `v${v.version}`, v.architecture]));
  }

  document.addEventListener("DOMContentLoaded", async () => {
    for (;;) {
      try { show(await api("GET", "/v1/operations")); notice(""); } catch (failure) { notice(failure.message); }
      await sleep(3000);
    }
  });
})();
