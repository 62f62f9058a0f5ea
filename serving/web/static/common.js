// Helpers both pages use: JSON fetches that send people to sign in on 401, formatting, SVG.
"use strict";
const pvqc = (() => {
  const SVG = "http://www.w3.org/2000/svg";

  function toSignIn() {
    location.href = `/signin?next=${encodeURIComponent(location.pathname + location.hash)}`;
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { credentials: "same-origin", ...options });
    if (response.status === 401) {
      toSignIn();
      throw new Error("signed out");
    }
    const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
    if (!response.ok) throw new Error(body?.error || `${path}: ${response.status}`);
    return body;
  }

  const pct = (x, digits = 1) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`);

  function ago(iso) {
    if (!iso) return "–";
    const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s ago`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
  }

  const time = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "–");

  function svg(name, attributes = {}, parent = null) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  // a cell's outline in frame pixels: the stored polygon, else its rectangle of an even grid
  function cellPoints(cell, inspection) {
    if (cell.polygon) return cell.polygon.map((p) => p.join(",")).join(" ");
    const w = inspection.width / inspection.cols;
    const h = inspection.height / inspection.rows;
    const [x0, y0] = [cell.col * w, cell.row * h];
    return `${x0},${y0} ${x0 + w},${y0} ${x0 + w},${y0 + h} ${x0},${y0 + h}`;
  }

  return { api, pct, ago, time, svg, cellPoints, toSignIn };
})();
