// Small SVG line charts for the consortium dashboard (no dependencies, no CDN).
// lineChart(el, {title, series:[{name, points:[[x,y],...], color, dashed}], refs:[{name, y, color}],
//               xFormat, yMin, yMax})
// Every plotted point is an SVG <circle> inside <g class="series" data-series="NAME">, so the page's
// tests (and people) can inspect exactly what is drawn.
"use strict";
(function (global) {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
                   "#7f7f7f", "#bcbd22"];
  function el(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toFixed(10));
    return ticks;
  }
  function fmt(v) {
    if (Math.abs(v) >= 1000) return v.toFixed(0);
    return (+v.toPrecision(3)).toString();
  }
  function lineChart(container, opts) {
    container.textContent = "";
    const series = (opts.series || []).filter(s => s.points && s.points.length);
    const refs = (opts.refs || []).filter(r => Number.isFinite(r.y));
    const W = 400, H = 190, m = {l: 40, r: 10, t: 18, b: 34};
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart",
                           preserveAspectRatio: "none"}, container);
    el("text", {x: m.l, y: 12, "font-size": 12, "font-weight": 600}, svg).textContent = opts.title || "";
    if (!series.length) {
      el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7482", "font-size": 11}, svg)
        .textContent = opts.empty || "no data yet";
      return svg;
    }
    const xs = series.flatMap(s => s.points.map(p => p[0]));
    const ys = series.flatMap(s => s.points.map(p => p[1])).concat(refs.map(r => r.y));
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    let y0 = opts.yMin ?? Math.min(...ys), y1 = opts.yMax ?? Math.max(...ys);
    if (opts.yMin === undefined || opts.yMax === undefined) {
      const pad = (y1 - y0) * 0.08 || 0.05;
      if (opts.yMin === undefined) y0 -= pad;
      if (opts.yMax === undefined) y1 += pad;
    }
    const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
    const axis = el("g", {class: "axis"}, svg);
    for (const t of niceTicks(y0, y1, 4)) {
      el("line", {x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t)}, axis);
      el("text", {x: m.l - 4, y: Y(t) + 3, "text-anchor": "end"}, axis).textContent = fmt(t);
    }
    const xf = opts.xFormat || fmt;
    const xt = opts.integerX ? niceTicks(x0, x1, 5).filter(t => Number.isInteger(t)) : niceTicks(x0, x1, 4);
    for (const t of xt) el("text", {x: X(t), y: H - m.b + 12, "text-anchor": "middle"}, axis).textContent = xf(t);
    if (opts.xLabel) el("text", {x: (W + m.l) / 2, y: H - m.b + 23, "text-anchor": "middle"}, axis)
      .textContent = opts.xLabel;
    const legend = [];
    refs.forEach((r, i) => {
      const color = r.color || "#555";
      const g = el("g", {class: "ref", "data-ref": r.name}, svg);
      el("line", {x1: m.l, x2: W - m.r, y1: Y(r.y), y2: Y(r.y), stroke: color, "stroke-dasharray": "5 3",
                  "stroke-width": 1.2}, g);
      el("title", {}, g).textContent = `${r.name}: ${fmt(r.y)}`;
      legend.push([r.name, color, true]);
    });
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const g = el("g", {class: "series", "data-series": s.name}, svg);
      const pts = s.points.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
      el("polyline", {points: pts, fill: "none", stroke: color, "stroke-width": s.width || 1.8,
                      "stroke-dasharray": s.dashed ? "4 3" : "none"}, g);
      if (s.markers !== false) {
        for (const p of s.points) {
          const c = el("circle", {cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: s.width ? 1.6 : 2.6,
                                  fill: color, "data-x": p[0], "data-y": p[1]}, g);
          el("title", {}, c).textContent = `${s.name} @ ${xf(p[0])}: ${fmt(p[1])}`;
        }
      }
      legend.push([s.name, color, !!s.dashed]);
    });
    const lg = el("g", {class: "legend"}, svg);
    let lx = m.l, ly = H - 4;
    for (const [name, color, dashed] of legend.slice(0, 8)) {
      el("line", {x1: lx, x2: lx + 12, y1: ly - 3, y2: ly - 3, stroke: color, "stroke-width": 2,
                  "stroke-dasharray": dashed ? "3 2" : "none"}, lg);
      const t = el("text", {x: lx + 15, y: ly, "font-size": 9}, lg);
      t.textContent = name;
      lx += 20 + Math.min(name.length, 22) * 5;
      if (lx > W - 60) break;
    }
    return svg;
  }
  global.ConsortiumCharts = {lineChart, PALETTE};
})(window);
