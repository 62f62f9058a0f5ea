// The shop-floor screen: one tile per line, updated from the /events stream (Server-Sent Events).
// Each event is a whole line snapshot, so a tile is redrawn from the event alone; the browser's
// EventSource reconnects by itself and sends Last-Event-ID, the service resumes from there.
"use strict";
(() => {
  const tiles = new Map(); // line id -> tile element
  const snapshots = new Map(); // line id -> latest snapshot
  const conn = document.getElementById("conn");

  function tileFor(lineId) {
    if (tiles.has(lineId)) return tiles.get(lineId);
    const tile = document.getElementById("tile").content.firstElementChild.cloneNode(true);
    tile.dataset.line = lineId;
    tile.id = `line-${lineId}`;
    const all = [...tiles.keys(), lineId].sort();
    const before = tiles.get(all[all.indexOf(lineId) + 1]);
    document.getElementById("lines").insertBefore(tile, before || null);
    tiles.set(lineId, tile);
    return tile;
  }

  const field = (tile, name) => tile.querySelector(`[data-field="${name}"]`);

  function render(s) {
    const tile = tileFor(s.line_id);
    snapshots.set(s.line_id, s);
    tile.dataset.state = s.alarm.state;
    tile.dataset.eventId = s.event_id;
    tile.querySelector(".name").textContent = s.name;
    tile.querySelector(".badge").textContent = { ok: "OK", idle: "IDLE", alarm: "ALARM" }[s.alarm.state];
    tile.querySelector(".last-n").textContent = s.last_n;
    field(tile, "rate-last").textContent = pvqc.pct(s.windows.last.pass_rate);
    field(tile, "rate-hour").textContent = pvqc.pct(s.windows.hour.pass_rate);
    field(tile, "rate-shift").textContent = pvqc.pct(s.windows.shift.pass_rate);
    field(tile, "floor").textContent = pvqc.pct(s.pass_rate_floor, 0);
    field(tile, "modules").textContent = s.windows.shift.modules;
    field(tile, "fails").textContent = s.windows.shift.counts.FAIL;
    field(tile, "pending").textContent = s.reviews_pending;
    field(tile, "shift").textContent = pvqc.time(s.shift_start);
    tile.querySelector(".alarm-text").textContent = s.alarm.reasons.map((r) => r.message).join(" · ");
    drawTrend(tile.querySelector(".trend"), s);
    drawThumbs(tile.querySelector(".thumbs"), s.failed);
    tick();
  }

  // pass rate per time bucket since the shift began; the floor as a dashed line
  function drawTrend(svg, s) {
    svg.replaceChildren();
    const [W, H, left, bottom] = [600, 170, 46, 18];
    const start = Date.parse(s.shift_start);
    const end = Date.parse(s.shift_end); // the whole shift: the line shows how far the shift has got
    const rates = s.trend.map((p) => p.pass_rate);
    const low = Math.max(0, Math.min(s.pass_rate_floor - 0.05, ...rates) - 0.02);
    const x = (t) => left + ((t - start) / (end - start)) * (W - left - 6);
    const y = (r) => 6 + ((1 - r) / (1 - low || 1)) * (H - bottom - 6);
    for (const r of [low, (low + 1) / 2, 1]) {
      pvqc.svg("line", { x1: left, x2: W, y1: y(r), y2: y(r), class: "grid" }, svg);
      pvqc.svg("text", { x: left - 4, y: y(r) + 5, class: "axis", "text-anchor": "end" }, svg).textContent =
        `${Math.round(100 * r)}%`;
    }
    pvqc.svg("line", { x1: left, x2: W, y1: y(s.pass_rate_floor), y2: y(s.pass_rate_floor), class: "floor" }, svg);
    pvqc.svg("text", { x: left + 2, y: H - 2, class: "axis" }, svg).textContent = pvqc.time(s.shift_start);
    pvqc.svg("text", { x: W - 2, y: H - 2, class: "axis", "text-anchor": "end" }, svg).textContent = pvqc.time(s.shift_end);
    const now = x(Math.min(Date.now(), end));
    pvqc.svg("line", { x1: now, x2: now, y1: 6, y2: H - bottom, class: "now" }, svg);
    // each bucket at its middle, but never past now (the current bucket is still filling)
    const half = (s.bucket_seconds * 1000) / 2;
    const points = s.trend.map((p) => [x(Math.min(Date.parse(p.t) + half, Date.now())), y(p.pass_rate), p]);
    if (points.length > 1) {
      pvqc.svg("polyline", { points: points.map(([a, b]) => `${a},${b}`).join(" "), class: "rate" }, svg);
    }
    for (const [a, b, p] of points) {
      const dot = pvqc.svg("circle", { cx: a, cy: b, r: 5, class: p.pass_rate < s.pass_rate_floor ? "low" : "ok" }, svg);
      pvqc.svg("title", {}, dot).textContent = `${pvqc.time(p.t)}: ${pvqc.pct(p.pass_rate)} of ${p.modules}`;
    }
  }

  // the last failed modules, defective cells outlined; redrawn only when the list changes
  function drawThumbs(box, failed) {
    const key = failed.map((f) => f.inspection_id).join(",");
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren();
    for (const f of failed) {
      const link = document.createElement("a");
      link.className = "thumb";
      link.href = `/review#inspection=${f.inspection_id}`;
      link.title = `${f.serial}: ${f.defective.length} defective cell(s)`;
      const frame = document.createElement("div");
      frame.className = "frame";
      const img = document.createElement("img");
      img.src = `/inspections/${f.inspection_id}/preview?width=360`;
      img.alt = `module ${f.serial}`;
      frame.appendChild(img);
      const overlay = pvqc.svg("svg", { viewBox: `0 0 ${f.width} ${f.height}`, preserveAspectRatio: "none" }, frame);
      for (const cell of f.defective) {
        pvqc.svg("polygon", { points: pvqc.cellPoints(cell, f), class: "defect" }, overlay);
      }
      link.appendChild(frame);
      const label = document.createElement("span");
      label.textContent = `${f.serial} · ${pvqc.time(f.created_at)}`;
      link.appendChild(label);
      box.appendChild(link);
    }
  }

  // once a second: the clock and "last frame … ago" (the service only sends changes)
  function tick() {
    document.getElementById("clock").textContent = new Date().toLocaleTimeString();
    for (const [lineId, s] of snapshots) field(tiles.get(lineId), "ago").textContent = pvqc.ago(s.last_at);
  }
  setInterval(tick, 1000);

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("open", () => {
      conn.dataset.state = "live";
      conn.textContent = "live";
    });
    source.addEventListener("line", (event) => render(JSON.parse(event.data)));
    source.addEventListener("error", async () => {
      conn.dataset.state = "lost";
      conn.textContent = "reconnecting…";
      if (source.readyState === EventSource.CLOSED) {
        // the service refused the stream (signed out, or too many screens): check, then retry
        await pvqc.api("/whoami").catch(() => null);
        setTimeout(connect, 5000);
      }
    });
  }
  connect();
})();
