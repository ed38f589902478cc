// A small SVG line chart: lineChart(container, [{name, points: [[x, y], ...]}], {xLabel, yLabel}).
// Drawn from the data it is given (no library, nothing fetched): axes with a few ticks, one coloured
// line and dot per point for each series, and a legend.
"use strict";

const lineChart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLOURS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
  const svg = (tag, attrs = {}, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  };
  const ticks = (lo, hi, n = 4) => Array.from({ length: n + 1 }, (_, i) => lo + ((hi - lo) * i) / n);
  const label = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toFixed(2));

  return function lineChart(container, series, { xLabel = "", yLabel = "", width = 520, height = 220 } = {}) {
    while (container.firstChild) container.removeChild(container.firstChild);
    const drawn = series.filter((s) => s.points.length);
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "line-chart", role: "img",
      "aria-label": drawn.map((s) => s.name).join(", ") || "no data yet" });
    container.append(root);
    if (!drawn.length) {
      root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" }, "no data yet"));
      return root;
    }
    const m = { left: 48, right: 12, top: 24, bottom: 40 };
    const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
    const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
    if (x0 === x1) x1 = x0 + 1;
    if (y0 === y1) y1 = y0 + 1;
    const X = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
    const Y = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);
    for (const t of ticks(y0, y1)) {
      root.append(svg("line", { x1: m.left, x2: width - m.right, y1: Y(t), y2: Y(t), class: "grid-line" }));
      root.append(svg("text", { x: m.left - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, label(t)));
    }
    // Whole numbers on the x axis (epochs) get whole ticks.
    const xTicks = xs.every(Number.isInteger) && x1 - x0 <= 12 ? Array.from({ length: x1 - x0 + 1 }, (_, i) => x0 + i) : ticks(x0, x1);
    for (const t of xTicks) {
      root.append(svg("text", { x: X(t), y: height - m.bottom + 16, "text-anchor": "middle", class: "tick" }, label(t)));
    }
    root.append(svg("text", { x: width - m.right, y: height - 6, "text-anchor": "end", class: "axis-label" }, xLabel));
    root.append(svg("text", { x: 4, y: 12, class: "axis-label" }, yLabel));
    drawn.forEach((s, i) => {
      const colour = COLOURS[i % COLOURS.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
      root.append(svg("path", { d, fill: "none", stroke: colour, "stroke-width": 2, class: "series", "data-name": s.name }));
      for (const p of s.points) root.append(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: colour }));
      const lx = m.left + 8 + i * 120;
      root.append(svg("rect", { x: lx, y: height - 10, width: 10, height: 3, fill: colour }));
      root.append(svg("text", { x: lx + 14, y: height - 6, class: "legend" }, s.name));
    });
    return root;
  };
})();
