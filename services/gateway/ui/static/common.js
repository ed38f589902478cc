// What every page shares: calling the API (with the session's CSRF token), building DOM from data
// (text only: every value a client sent is set as textContent, never parsed as HTML), and small formatters.
"use strict";

const xrayq = (() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
  const csrf = meta("xrayq-csrf");
  const csrfHeader = meta("xrayq-csrf-header") || "X-Xrayq-CSRF";
  const roles = new Set((document.body.dataset.roles || "").split(" ").filter(Boolean));

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || problem.title || `HTTP ${status}`);
      this.status = status;
      this.code = problem.code || "http_" + status;
      this.files = problem.files;
    }
  }

  // fetch with the session cookie (same origin) and, for state changes, the CSRF token.
  async function api(method, url, { json, form, headers = {} } = {}) {
    const options = { method, credentials: "same-origin", headers: { Accept: "application/json", ...headers } };
    if (method !== "GET" && csrf) options.headers[csrfHeader] = csrf;
    if (json !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(json);
    } else if (form !== undefined) {
      options.body = form;
    }
    const response = await fetch(url, options);
    if (response.status === 204) return null;
    const type = response.headers.get("Content-Type") || "";
    const body = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) {
      if (response.status === 401 && body.code === "session_expired") location.reload();
      throw new ApiError(response.status, typeof body === "object" ? body : { detail: body });
    }
    return body;
  }

  // el("td", {class: "x", text: value, title: ...}, child, ...): values become text, never markup.
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function notice(message, kind = "error") {
    const box = document.getElementById("notice");
    if (!box) return;
    box.textContent = message;
    box.className = `notice ${kind}`;
    box.hidden = !message;
  }

  // The page's own confirmation dialog (not window.confirm): resolves true when confirmed.
  function confirmAction(text, okLabel = "Confirm") {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-ok").textContent = okLabel;
    dialog.returnValue = "";
    dialog.showModal();
    return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
  }

  const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
  const number = (x, digits = 3) =>
    typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(digits)) : x === null || x === undefined ? "–" : String(x);
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const seconds = (s) => (s === null || s === undefined ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);

  function progressBar(fraction, label) {
    const bar = el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": Math.round(100 * (fraction || 0)) });
    const fill = el("div", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`; // CSSOM: allowed by the CSP
    bar.append(fill, el("span", { class: "progress-label", text: label ?? percent(fraction) }));
    return bar;
  }

  function statusBadge(status) {
    return el("span", { class: `badge status-${status}`, text: status });
  }

  // Warnings a job carries ({code, detail}), flagged so they cannot be missed.
  function warningList(warnings) {
    if (!warnings || !warnings.length) return null;
    return el("ul", { class: "warnings" }, warnings.map((w) =>
      el("li", { class: "warning" }, el("strong", { text: w.code || "warning" }), w.detail ? ` — ${w.detail}` : "")));
  }

  // Sleep that a hidden tab does not spin through.
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("sign-out")?.addEventListener("click", async () => {
      try { await api("DELETE", "/v1/session"); } finally { location.href = "/"; }
    });
  });

  return { api, el, clear, notice, confirmAction, percent, number, when, seconds, progressBar, statusBadge,
    warningList, sleep, may: (role) => roles.has(role) || roles.has("admin"), ApiError };
})();
