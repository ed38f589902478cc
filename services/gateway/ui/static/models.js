// Models: every version of every model name side by side (GET /v1/models): the numbers in their metrics,
// every plot their cards list, which one is active; promotion and rollback behind a confirmation; the
// activation history and who downloaded which files.
"use strict";

(() => {
  const { api, el, clear, notice, when, number, statusBadge, confirmAction, may } = xrayq;

  // Every number in a version's metrics, by its dotted path ("evaluation.roc_auc"); lists (curves,
  // confusion matrices, history) are what the plots show.
  function scalars(value, path = "", into = new Map()) {
    if (typeof value === "number" || typeof value === "boolean") into.set(path, value);
    else if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [key, child] of Object.entries(value)) scalars(child, path ? `${path}.${key}` : key, into);
    }
    return into;
  }

  function versionHead(model, version) {
    const actions = el("div", { class: "actions" },
      el("a", { href: `/v1/models/${encodeURIComponent(model.name)}/versions/${version.version}/weights`, download: "", class: "button quiet", text: "weights" }),
      el("a", { href: `/v1/models/${encodeURIComponent(model.name)}/versions/${version.version}/card`, download: "", class: "button quiet", text: "card" }));
    if (may("train") && !version.is_active) {
      actions.append(el("button", { type: "button", class: "primary promote", dataset: { version: version.version },
        text: "Promote…", onclick: () => promote(model, version) }));
    }
    return el("th", { class: version.is_active ? "active-version" : "" },
      el("div", { class: "version-title" }, el("span", { text: `v${version.version}` }),
        version.is_active ? el("span", { class: "badge status-succeeded", text: "active" }) : null),
      el("div", { class: "muted", text: `${version.architecture} · ${when(version.created_at)}` }),
      actions);
  }

  // The figures a reader compares versions by, in words; every other number is one click further down.
  const HEADLINE = [
    ["accuracy", "evaluation.accuracy"],
    ["ROC-AUC", "evaluation.roc_auc"],
    ["sensitivity", "evaluation.sensitivity"],
    ["specificity", "evaluation.specificity"],
    ["calibration error (ECE)", "evaluation.calibration.ece"],
    ["ECE before calibration", "evaluation.calibration.before.ece"],
    ["temperature", "evaluation.calibration.temperature"],
    ["under corruptions: mean ROC-AUC", "evaluation.robustness.proxy.mean_roc_auc"],
    ["under corruptions: mean specificity", "evaluation.robustness.proxy.mean_specificity"],
    ["under corruptions: worst specificity", "evaluation.robustness.proxy.worst_specificity"],
    ["share flagged uncertain", "evaluation.uncertainty.flagged_share"],
    ["images evaluated", "evaluation.n"],
  ];

  function metricRows(columns, rows) {
    return rows.map(([label, path]) => el("tr", {}, el("th", { class: label === path ? "mono" : "", title: path, text: label }),
      columns.map((c) => el("td", { class: "num", text: c.has(path) ? number(c.get(path)) : "" }))));
  }

  function metricsTable(model) {
    const columns = model.versions.map((v) => scalars(v.metrics));
    const paths = [...new Set(columns.flatMap((c) => [...c.keys()]))];
    // The test split's figures first, then validation, then the rest.
    const rank = (p) => (p.startsWith("evaluation.") ? 0 : p.startsWith("validation.") ? 1 : 2);
    paths.sort((a, b) => rank(a) - rank(b));
    const headline = HEADLINE.filter(([, path]) => columns.some((c) => c.has(path)));
    return el("div", {},
      el("table", { class: "grid metrics" },
        el("thead", {}, el("tr", {}, el("th", { text: "metric" }), model.versions.map((v) => versionHead(model, v)))),
        el("tbody", {}, metricRows(columns, headline))),
      el("details", { class: "all-metrics" },
        el("summary", { text: `All figures (${paths.length})` }),
        el("table", { class: "grid metrics-all" },
          el("tbody", {}, metricRows(columns, paths.map((path) => [path, path]))))));
  }

  function plotsRow(model) {
    return el("div", { class: "plot-columns" }, model.versions.map((v) =>
      el("div", { class: "plot-column" }, el("h4", { text: `v${v.version}` }),
        Object.keys(v.plots).length ? Object.entries(v.plots).map(([name, url]) =>
          el("figure", {}, el("img", { src: url, alt: `${model.name} v${v.version} ${name}` }),
            el("figcaption", { text: name.replaceAll("_", " ") }))) : el("p", { class: "muted", text: "no plots" }))));
  }

  async function promote(model, version) {
    const current = model.active_version ? `v${model.active_version}` : "no version";
    if (!(await confirmAction(`Make v${version.version} the version that answers ${model.name}? (now: ${current})`, `Promote v${version.version}`))) return;
    try {
      await api("POST", `/v1/models/${encodeURIComponent(model.name)}/versions/${version.version}/promote`);
      notice(`${model.name} v${version.version} is active.`, "ok");
    } catch (failure) {
      notice(`${failure.code}: ${failure.message}`);
    }
    load();
  }

  async function rollback(model) {
    if (!(await confirmAction(`Undo the last promotion of ${model.name}? The version active before it answers again.`, "Roll back"))) return;
    try {
      const version = await api("POST", `/v1/models/${encodeURIComponent(model.name)}/rollback`);
      notice(`${model.name} v${version.version} is active again.`, "ok");
    } catch (failure) {
      notice(`${failure.code}: ${failure.message}`);
    }
    load();
  }

  async function history(section, model) {
    const name = encodeURIComponent(model.name);
    const [activations, downloads] = await Promise.all([
      api("GET", `/v1/models/${name}/activations`), api("GET", `/v1/models/${name}/downloads`)]);
    const activationRows = clear(section.querySelector(".activations tbody"));
    for (const a of activations) {
      activationRows.append(el("tr", {}, el("td", { text: when(a.created_at) }), el("td", { text: `v${a.version}` }),
        el("td", { text: a.previous_version ? `v${a.previous_version}` : "–" }), el("td", { text: a.reason }),
        el("td", { text: a.actor ?? a.actor_organisation ?? "" })));
    }
    const downloadRows = clear(section.querySelector(".downloads tbody"));
    for (const d of downloads) {
      downloadRows.append(el("tr", {}, el("td", { text: when(d.created_at) }), el("td", { text: `v${d.version}` }),
        el("td", { text: d.file }), el("td", { text: d.organisation ?? "" }), el("td", { class: "mono", text: d.api_key_id ?? "bootstrap" })));
    }
  }

  async function load() {
    const container = document.getElementById("models");
    let models;
    try { models = await api("GET", "/v1/models"); } catch (failure) { notice(failure.message); return; }
    clear(container);
    if (!models.length) container.append(el("p", { class: "muted", text: "No model has been registered yet." }));
    const template = document.getElementById("model-template");
    for (const model of models) {
      const section = template.content.firstElementChild.cloneNode(true);
      section.dataset.model = model.name;
      section.querySelector(".model-name").textContent = model.name;
      section.querySelector(".model-owner").textContent =
        `${model.owner ? `owned by ${model.owner}` : "shared"} · classes ${model.classes.join(", ")} · active ${model.active_version ? `v${model.active_version}` : "none"}`;
      section.querySelector(".rollback")?.addEventListener("click", () => rollback(model));
      section.querySelector(".versions").append(el("div", { class: "scroll" }, metricsTable(model)), plotsRow(model));
      container.append(section);
      history(section, model).catch((failure) => notice(failure.message));
    }
  }

  document.addEventListener("DOMContentLoaded", load);
})();
