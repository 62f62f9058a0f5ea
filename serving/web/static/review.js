// The review page: the queue (filters), one module (frame, grid coloured by probability, scores,
// heat maps), and the engineer's decision, saved to the append-only audit trail. Keyboard first:
// the shortcuts are listed on the page.
"use strict";
(() => {
  const DEFECT_KEYS = { 1: "crack", 2: "finger_interruption", 3: "inactive_area", 4: "soldering", 5: "other" };
  const state = {
    queue: [], // queue items (inspection summaries)
    index: -1, // open item's index in the queue
    open: null, // the reviewed inspection (inspection, labels, history)
    selected: null, // [row, col]
    changes: new Map(), // "row,col" -> {label, defect_type} not yet saved
    module: null, // "PASS" | "FAIL" chosen explicitly, or null
    warnedUnsaved: false, // j / k was pressed once with unsaved labels
    nextBefore: null,
    // what the page learned about the open module's frame beyond frame_pruned_at (null: nothing):
    // { id, url, error, gone }: url, the preview failed once and its retry succeeded (a data: URL of
    // those bytes, the page's CSP allows no blob:, shown on every redraw without downloading them
    // again); error, why it cannot be shown (the server's text); gone, why the server said 410 (the
    // frame is not stored): no heat map is asked for then
    frame: null,
    // each module opened and each heat map asked for takes a new number; an answer that arrives
    // when a newer one was asked for is dropped, or module A could be drawn over module B
    opening: 0,
    heating: 0,
  };
  const $ = (id) => document.getElementById(id);
  const key = (r, c) => `${r},${c}`;

  // -- queue ------------------------------------------------------------------------------------

  function filters() {
    const form = new FormData($("filters"));
    const params = new URLSearchParams();
    for (const [name, value] of form) {
      if (!value) continue;
      params.set(name, name === "since" || name === "until" ? new Date(value).toISOString() : value);
    }
    return params;
  }

  async function loadQueue(append = false) {
    const params = filters();
    if (append && state.nextBefore) params.set("before_id", state.nextBefore);
    const page = await pvqc.api(`/review/queue?${params}`);
    state.queue = append ? state.queue.concat(page.items) : page.items;
    state.nextBefore = page.next_before_id;
    $("more").hidden = !page.next_before_id;
    drawQueue();
  }

  function drawQueue() {
    const list = $("queue");
    list.replaceChildren();
    state.queue.forEach((item, i) => {
      const li = document.createElement("li");
      li.dataset.inspection = item.inspection_id;
      li.classList.toggle("current", state.open?.inspection.inspection_id === item.inspection_id);
      const verdict = document.createElement("span");
      verdict.className = `verdict v-${item.verdict}`;
      verdict.textContent = item.sampled ? "PASS·sample" : item.verdict;
      const text = document.createElement("span");
      text.textContent = `${item.serial} · ${item.line_id} · ${pvqc.time(item.created_at)}`;
      li.append(verdict, text);
      if (item.shadow?.disagrees) {
        const shadow = document.createElement("span");
        shadow.className = "shadow";
        shadow.title = `shadow model ${item.shadow.model_version} says ${item.shadow.verdict}`;
        shadow.textContent = `shadow ${item.shadow.verdict}`;
        li.appendChild(shadow);
      }
      if (item.reviewed) {
        const done = document.createElement("span");
        done.className = "done";
        done.textContent = `→ ${item.reviewed.verdict}`;
        li.appendChild(done);
      }
      li.addEventListener("click", () => leaveFor(i)); // unsaved labels: asks first, as j / k do
      list.appendChild(li);
    });
  }

  // moving on with unsaved labels asks once: the second j / k discards them
  async function leaveFor(i) {
    if (state.changes.size && !state.warnedUnsaved) {
      state.warnedUnsaved = true;
      $("status").textContent = `${state.changes.size} unsaved label(s): press s to save them, or j / k again to discard`;
      return;
    }
    await openAt(i);
  }

  async function openAt(i) {
    if (i < 0 || i >= state.queue.length) return;
    state.index = i;
    await openInspection(state.queue[i].inspection_id);
  }

  // -- one module ---------------------------------------------------------------------------------

  async function openInspection(id, keepSelection = false) {
    const ticket = ++state.opening;
    const open = await pvqc.api(`/review/inspections/${id}`);
    if (ticket !== state.opening) return; // j / k opened another module meanwhile
    state.open = open;
    // a reload after a save keeps what the page learned of the frame; opening a module asks afresh
    if (!keepSelection || state.frame?.id !== id) state.frame = null;
    history.replaceState(null, "", `#inspection=${id}`);
    state.changes.clear();
    state.warnedUnsaved = false;
    state.module = null;
    $("note").value = "";
    const cells = state.open.inspection.cells;
    if (!keepSelection || !state.selected) {
      const first = cells.find((c) => c.verdict !== "functional") || cells[0];
      state.selected = first ? [first.row, first.col] : null;
    }
    drawModule();
    drawQueue();
    drawSide();
    if (!keepSelection) clearHeat(); // after a save the heat map still shows the selected cell
  }

  const labelOf = (r, c) => state.changes.get(key(r, c)) || state.open.cell_labels[key(r, c)];

  function colour(p) {
    // green (0) -> amber -> red (1), the module's thresholds marked by the legend
    const hue = Math.round(120 * (1 - p));
    return `hsla(${hue}, 90%, 50%, ${0.18 + 0.4 * p})`;
  }

  function drawModule() {
    const o = state.open.inspection;
    const main = $("module");
    main.replaceChildren();
    const head = document.createElement("header");
    head.className = "module-head";
    const title = document.createElement("h2");
    title.textContent = `${o.serial} · ${o.line_id}`;
    const verdict = document.createElement("span");
    verdict.className = `verdict v-${o.verdict}`;
    verdict.textContent = o.verdict;
    const meta = document.createElement("span");
    meta.className = "meta";
    // the geometry's notes ("2 modules in view; the largest is judged") tell the reviewer which module was judged
    const said = [o.reason, ...(o.geometry_notes || [])].filter(Boolean).join(" · ");
    meta.textContent = `${new Date(o.created_at).toLocaleString()} · model ${o.model.version} · threshold ${o.model.threshold} · ${said}`;
    head.append(title, verdict, meta);
    main.appendChild(head);

    const frame = document.createElement("div");
    frame.className = "frame big-frame";
    const learned = state.frame?.id === o.inspection_id ? state.frame : null;
    if (o.frame_pruned_at) {
      // the retention policy deleted the frame: say so, and keep the grid on a blank of its shape
      frame.appendChild(frameGone(o, `Frame removed by the retention policy on ${new Date(o.frame_pruned_at).toLocaleString()}: the verdict and cell scores are kept, heat maps need the frame.`));
    } else if (learned?.error) {
      frame.appendChild(frameGone(o, `The frame could not be shown: ${learned.error}`));
    } else {
      const img = document.createElement("img");
      img.src = learned?.url || previewUrl(o);
      img.alt = `frame of ${o.serial}`;
      // a frame that cannot be shown says why (the preview's JSON error), never a broken image
      img.addEventListener("error", () => frameFailed(o, img), { once: true });
      frame.appendChild(img);
    }
    const box = { width: o.frame_width, height: o.frame_height, rows: o.rows, cols: o.cols };
    const overlay = pvqc.svg("svg", { viewBox: `0 0 ${box.width} ${box.height}`, preserveAspectRatio: "none", id: "grid" }, frame);
    for (const cell of o.cells) {
      const label = labelOf(cell.row, cell.col);
      const poly = pvqc.svg("polygon", {
        points: pvqc.cellPoints(cell, box),
        fill: colour(cell.probability),
        class: `cell label-${label.label} src-${label.source || "pending"}`,
        "data-row": cell.row,
        "data-col": cell.col,
      }, overlay);
      pvqc.svg("title", {}, poly).textContent = `row ${cell.row}, col ${cell.col}: p=${cell.probability.toFixed(3)}`;
      poly.addEventListener("click", () => select(cell.row, cell.col));
    }
    if (state.selected) {
      const cell = o.cells.find((c) => c.row === state.selected[0] && c.col === state.selected[1]);
      if (cell) pvqc.svg("polygon", { points: pvqc.cellPoints(cell, box), class: "selected" }, overlay);
    }
    main.appendChild(frame);
    main.appendChild(scoreTable(o));
    main.appendChild(historyList());
  }

  const previewUrl = (o) => `/inspections/${o.inspection_id}/preview?width=1600`;

  // the preview did not load: ask once more, by fetch, which keeps the answer. A transient failure
  // whose retry succeeds shows the image from the bytes of that retry; a real one shows the server's
  // text in place of the image, once (redraws reuse what was learned, not a new request)
  async function frameFailed(o, img) {
    if (!img.isConnected) return; // a redraw replaced it: the image on show reports for itself
    const id = o.inspection_id;
    const src = img.getAttribute("src");
    let learned;
    if (src !== previewUrl(o)) {
      // the retry's own bytes did not display: no third download
      learned = { id, error: "the browser cannot display the preview" };
    } else {
      try {
        const response = await fetch(src, { credentials: "same-origin" });
        if (response.status === 401) {
          pvqc.toSignIn();
          return;
        }
        if (response.ok) {
          learned = { id, url: await dataUrl(await response.blob()) };
        } else {
          const error = await errorText(response);
          learned = { id, error, gone: response.status === 410 ? error : null };
        }
      } catch (error) {
        learned = { id, error: error.message };
      }
    }
    if (state.open?.inspection.inspection_id !== id) return; // another module was opened meanwhile
    const known = state.frame?.id === id ? state.frame.gone : null;
    state.frame = { ...learned, gone: learned.gone || known };
    drawModule();
  }

  function dataUrl(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
  }

  // the server's JSON error text, else the status
  async function errorText(response) {
    const json = response.headers.get("content-type")?.includes("json");
    const body = json ? await response.json().catch(() => null) : null;
    return body?.error || `HTTP ${response.status}`;
  }

  // in place of the frame: a dark area of the frame's shape (the grid stays clickable) and the reason
  function frameGone(o, reason) {
    const gone = document.createElement("div");
    gone.className = "frame-gone";
    gone.style.aspectRatio = `${o.frame_width} / ${o.frame_height}`;
    const text = document.createElement("p");
    text.id = "frame-gone";
    text.textContent = reason;
    gone.appendChild(text);
    return gone;
  }

  function scoreTable(o) {
    const table = document.createElement("table");
    table.className = "scores";
    const caption = document.createElement("caption");
    caption.textContent = "defect probability per cell (rows x columns)";
    table.appendChild(caption);
    for (let r = 0; r < o.rows; r++) {
      const tr = table.insertRow();
      for (let c = 0; c < o.cols; c++) {
        const cell = o.cells.find((x) => x.row === r && x.col === c);
        const td = tr.insertCell();
        if (!cell) continue;
        td.textContent = cell.probability.toFixed(2);
        td.style.background = colour(cell.probability);
        td.classList.toggle("sel", state.selected?.[0] === r && state.selected?.[1] === c);
        td.addEventListener("click", () => select(r, c));
      }
    }
    return table;
  }

  function historyList() {
    const section = document.createElement("section");
    section.className = "history";
    const h = document.createElement("h3");
    h.textContent = "Audit trail of this module";
    section.appendChild(h);
    const list = document.createElement("ol");
    list.id = "history";
    for (const d of state.open.history) {
      const li = document.createElement("li");
      const target = d.target === "module" ? "module" : `cell ${d.row},${d.col}`;
      const before = d.before.verdict || d.before.label;
      const after = d.after.verdict || `${d.after.label}${d.after.defect_type ? ` (${d.after.defect_type})` : ""}`;
      li.textContent = `${new Date(d.created_at).toLocaleString()} · ${d.reviewer} · ${target}: ${before} → ${after}${d.note ? ` · “${d.note}”` : ""}`;
      list.appendChild(li);
    }
    if (!state.open.history.length) list.innerHTML = "<li>no decisions yet</li>";
    section.appendChild(list);
    return section;
  }

  function drawSide() {
    const panel = $("cell");
    panel.replaceChildren();
    const h = document.createElement("h2");
    h.textContent = "Cell";
    panel.appendChild(h);
    if (state.open && state.selected) {
      const [r, c] = state.selected;
      const cell = state.open.inspection.cells.find((x) => x.row === r && x.col === c);
      const saved = state.open.cell_labels[key(r, c)];
      const pending = state.changes.get(key(r, c));
      const rows = [
        ["position", `row ${r}, col ${c}`],
        ["probability", cell.probability.toFixed(3)],
        ["model", cell.verdict],
        ["label in force", `${saved.label}${saved.defect_type ? ` (${saved.defect_type})` : ""} · ${saved.source}`],
        ["unsaved", pending ? `${pending.label}${pending.defect_type ? ` (${pending.defect_type})` : ""}` : "–"],
      ];
      const dl = document.createElement("dl");
      dl.id = "cell-facts";
      for (const [k, v] of rows) {
        const dt = document.createElement("dt");
        dt.textContent = k;
        const dd = document.createElement("dd");
        dd.textContent = v;
        dl.append(dt, dd);
      }
      panel.appendChild(dl);
    }
    $("module-choice").textContent = moduleText();
    const changes = $("changes");
    changes.replaceChildren();
    for (const [k, v] of state.changes) {
      const li = document.createElement("li");
      li.textContent = `cell ${k} → ${v.label}${v.defect_type ? ` (${v.defect_type})` : ""}`;
      changes.appendChild(li);
    }
  }

  // the module decision saved earlier, if any (a model verdict is not a decision)
  const savedModule = () => (state.open?.module_label.source === "review" ? state.open.module_label.verdict : null);

  // the verdict the cell labels in force imply, once every cell has a definite label: a PASS implied
  // while uncertain cells remain would teach the next model that cells nobody looked at are functional
  function impliedVerdict() {
    const cells = state.open?.inspection.cells || [];
    if (!cells.length) return null; // nothing was cut: only the engineer can say
    const labels = cells.map((c) => labelOf(c.row, c.col).label);
    if (labels.some((l) => l !== "functional" && l !== "defective")) return null;
    return labels.includes("defective") ? "FAIL" : "PASS";
  }

  // the module verdict to save: the engineer's choice (p / x); else, if no module decision is saved yet,
  // what the cell labels imply; a saved decision is only ever changed by pressing p or x
  function moduleVerdict() {
    if (!state.open) return null;
    if (state.module) return state.module;
    return savedModule() ? null : impliedVerdict();
  }

  function moduleText() {
    if (!state.open) return "–";
    if (state.module) return `${state.module} (your choice)`;
    const saved = savedModule();
    const implied = impliedVerdict();
    if (saved) {
      return implied && implied !== saved ? `${saved} (saved; the cell labels now say ${implied}: press p or x)` : `${saved} (saved)`;
    }
    if (implied) return `${implied} (from cell labels)`;
    const cells = state.open.inspection.cells;
    if (!cells.length) return "undecided: no cells were cut; press p or x";
    const left = cells.filter((c) => !["functional", "defective"].includes(labelOf(c.row, c.col).label)).length;
    return `undecided: ${left} uncertain cell${left === 1 ? "" : "s"} left; label them or press p / x`;
  }

  function select(r, c) {
    const o = state.open?.inspection;
    if (!o) return;
    state.selected = [Math.max(0, Math.min(o.rows - 1, r)), Math.max(0, Math.min(o.cols - 1, c))];
    drawModule();
    drawSide();
  }

  function nextFlagged() {
    const cells = state.open?.inspection.cells.filter((c) => c.verdict !== "functional") || [];
    if (!cells.length) return;
    const at = cells.findIndex((c) => c.row === state.selected?.[0] && c.col === state.selected?.[1]);
    const next = cells[(at + 1) % cells.length];
    select(next.row, next.col);
  }

  function label(labelName, defectType = null) {
    if (!state.selected) return;
    state.changes.set(key(...state.selected), { label: labelName, defect_type: defectType });
    state.warnedUnsaved = false;
    drawModule();
    drawSide();
  }

  async function save() {
    if (!state.open) return;
    if (!moduleVerdict() && !state.changes.size) {
      $("status").textContent = "nothing to save: label cells (f, 1-5) or choose the module (p / x)";
      return;
    }
    const body = {
      module: moduleVerdict(),
      cells: [...state.changes].map(([k, v]) => {
        const [row, col] = k.split(",").map(Number);
        return { row, col, ...v };
      }),
      note: $("note").value.trim() || null,
    };
    const { inspection_id: id, serial } = state.open.inspection;
    const ticket = state.opening;
    try {
      const saved = await pvqc.api(`/review/inspections/${id}/decisions`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (ticket === state.opening) await openInspection(id, true); // unless j / k moved on meanwhile
      $("status").textContent = `saved ${saved.length} decision(s) for ${serial}`;
      const item = state.queue.find((q) => q.inspection_id === id);
      if (item && body.module) item.reviewed = { verdict: body.module };
      drawQueue();
    } catch (error) {
      $("status").textContent = `not saved: ${error.message}`;
    }
  }

  // -- heat map -----------------------------------------------------------------------------------

  function clearHeat() {
    state.heating++; // a heat map still on its way is for the module left
    const canvas = $("heat");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.heat;
    $("heat-note").textContent = "Press h for the selected cell.";
  }

  async function heat() {
    if (!state.open || !state.selected) return;
    // every answer below is dropped once another module is open or another heat map asked for
    const ticket = ++state.heating;
    const current = () => ticket === state.heating;
    const say = (text) => {
      if (current()) $("heat-note").textContent = text;
    };
    const [r, c] = state.selected;
    const o = state.open.inspection;
    if (o.frame_pruned_at) {
      $("heat-note").textContent = "No heat map: the frame was removed by the retention policy.";
      return;
    }
    const learned = state.frame?.id === o.inspection_id ? state.frame : null;
    if (learned?.gone) {
      // the server said the frame is not stored (its preview or an earlier heat map): not asked again
      $("heat-note").textContent = `No heat map: ${learned.gone}`;
      return;
    }
    say("computing…");
    let response;
    try {
      response = await fetch(`/review/inspections/${o.inspection_id}/cells/${r}/${c}/heatmap`, {
        credentials: "same-origin",
      });
    } catch (error) {
      say(`No heat map: ${error.message}`);
      return;
    }
    if (response.status === 401) {
      pvqc.toSignIn();
      return;
    }
    if (!response.ok) {
      const error = await errorText(response);
      if (response.status === 410 && state.open?.inspection.inspection_id === o.inspection_id) {
        // the frame went (lost, or pruned since the page read the module): remember it. A preview on
        // show stays: it was made from the frame before
        if (state.frame?.id === o.inspection_id) state.frame.gone = error;
        else state.frame = { id: o.inspection_id, gone: error };
      }
      say(`No heat map: ${error}`);
      return;
    }
    let map;
    try {
      map = await response.json();
    } catch {
      say("No heat map: the server's answer could not be read");
      return;
    }
    if (!current()) return;
    const canvas = $("heat");
    const ctx = canvas.getContext("2d");
    const img = new Image();
    img.onerror = () => say("No heat map: the cell image could not be shown");
    img.onload = () => {
      if (!current()) return;
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      const [h, w] = [map.cam.length, map.cam[0].length];
      const small = document.createElement("canvas");
      small.width = w;
      small.height = h;
      const pixels = small.getContext("2d").createImageData(w, h);
      map.cam.flat().forEach((v, i) => {
        // at most 55% opaque: the cell stays visible under the map
        pixels.data.set([255, Math.round(255 * (1 - v)), 0, Math.round(140 * v)], 4 * i);
      });
      small.getContext("2d").putImageData(pixels, 0, 0);
      ctx.drawImage(small, 0, 0, canvas.width, canvas.height); // smoothed: the map is coarse
      // a half cell is judged beside its mirror image: say so, or the doubled picture puzzles
      const half = map.views > 1 ? " (half cell beside its mirror image, as the network judged it)" : "";
      canvas.dataset.heat = `${o.inspection_id}:${r},${c}`; // what is drawn: module and cell
      say(`cell ${r},${c}: p=${map.probability.toFixed(3)}${half}; red where the network saw a defect`);
    };
    img.src = map.cell_png;
  }

  // -- keyboard -----------------------------------------------------------------------------------

  document.addEventListener("keydown", (event) => {
    if (event.target.matches("input, select, textarea")) {
      if (event.key === "Escape") event.target.blur();
      if (event.key === "Enter" && event.target.id === "note" && !event.shiftKey) {
        event.preventDefault();
        save();
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const [r, c] = state.selected || [0, 0];
    const actions = {
      j: () => leaveFor(state.index + 1),
      k: () => leaveFor(state.index - 1),
      ArrowUp: () => select(r - 1, c),
      ArrowDown: () => select(r + 1, c),
      ArrowLeft: () => select(r, c - 1),
      ArrowRight: () => select(r, c + 1),
      n: nextFlagged,
      f: () => label("functional"),
      u: () => {
        if (state.selected) state.changes.delete(key(...state.selected));
        drawModule();
        drawSide();
      },
      p: () => {
        state.module = "PASS";
        drawSide();
      },
      x: () => {
        state.module = "FAIL";
        drawSide();
      },
      h: heat,
      "/": () => $("note").focus(),
      Enter: save,
      s: save,
    };
    const action = DEFECT_KEYS[event.key] ? () => label("defective", DEFECT_KEYS[event.key]) : actions[event.key];
    if (!action) return;
    event.preventDefault();
    Promise.resolve(action()).catch((error) => {
      $("status").textContent = error.message;
    });
  });

  // -- start --------------------------------------------------------------------------------------

  async function start() {
    const me = await pvqc.api("/whoami");
    $("who").textContent = `${me.name} (${me.role})`;
    const lines = await pvqc.api("/lines");
    const select = $("filters").elements.line_id;
    for (const id of Object.keys(lines)) select.add(new Option(lines[id].name || id, id));
    $("filters").addEventListener("change", () => loadQueue());
    $("more").addEventListener("click", () => loadQueue(true));
    $("save").addEventListener("click", save);
    $("signout").addEventListener("click", async () => {
      await fetch("/signout", { method: "POST" });
      pvqc.toSignIn();
    });
    await loadQueue();
    const wanted = /inspection=(\d+)/.exec(location.hash);
    if (wanted) {
      const i = state.queue.findIndex((q) => q.inspection_id === Number(wanted[1]));
      state.index = i;
      await openInspection(Number(wanted[1]));
    }
  }
  start().catch((error) => {
    $("status").textContent = error.message;
  });
})();
