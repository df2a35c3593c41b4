/* Shared by both viewers: reading the three result formats into columns, the metadata
 * header, tooltips and colour scales. A classic script (no modules) so the pages open from
 * file:// by double-click. Data text is only ever inserted with textContent. */
"use strict";

const $ = (id) => document.getElementById(id);

const MaskImpact = (() => {
  const COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index",
    "grid_row", "grid_col", "variant", "l2_distance", "cosine_distance"];

  /* ---------- reading ---------- */

  // Columnar dataset: typed arrays for numbers, codes for variants, one token record per position.
  function buildDataset(columns, meta) {
    const n = columns.layer.length;
    const ds = {
      n, meta: meta || null,
      step: Int32Array.from(columns.generation_step, Number),
      layer: Int32Array.from(columns.layer, Number),
      pos: Int32Array.from(columns.token_position, Number),
      l2: Float64Array.from(columns.l2_distance, Number),
      cos: Float64Array.from(columns.cosine_distance, Number),
      variantCode: new Int32Array(n), variants: [], tokens: new Map(), cache: new Map(),
    };
    const codes = new Map();
    for (let i = 0; i < n; i++) {
      const v = String(columns.variant[i]);
      let c = codes.get(v);
      if (c === undefined) { c = ds.variants.length; codes.set(v, c); ds.variants.push(v); }
      ds.variantCode[i] = c;
      const p = ds.pos[i];
      if (!ds.tokens.has(p)) {
        ds.tokens.set(p, {
          position: p, text: String(columns.token_masked[i]), type: String(columns.token_type[i]),
          image: Number(columns.image_index[i]), row: Number(columns.grid_row[i]), col: Number(columns.grid_col[i]),
        });
      }
    }
    ds.steps = uniqueSorted(ds.step);
    ds.layers = uniqueSorted(ds.layer);
    ds.positions = [...ds.tokens.keys()].sort((a, b) => a - b);
    ds.variants.sort(variantOrder);
    return ds;
  }

  function uniqueSorted(arr) {
    return [...new Set(arr)].sort((a, b) => a - b);
  }

  function variantOrder(a, b) {
    const rank = (v) => (v === "Full" ? -2 : v === "Attn" ? -1 : Number(v.replace("Head_", "")));
    return rank(a) - rank(b);
  }

  async function readParquet(buffer) {
    const meta = hyparquet.parquetMetadata(buffer);
    const kv = (meta.key_value_metadata || []).find((e) => e.key === "mask_impact");
    const columns = {};
    for (const name of COLUMNS) columns[name] = new Array(Number(meta.num_rows));
    await hyparquet.parquetRead({
      file: buffer, columns: COLUMNS,
      onChunk: ({ columnName, columnData, rowStart }) => {
        const target = columns[columnName];
        for (let i = 0; i < columnData.length; i++) target[rowStart + i] = columnData[i];
      },
    });
    return buildDataset(columns, kv ? JSON.parse(kv.value) : null);
  }

  function readJson(text) {
    const doc = JSON.parse(text);
    const rows = doc.data || [];
    const columns = {};
    for (const name of COLUMNS) columns[name] = rows.map((r) => r[name]);
    return buildDataset(columns, doc.metadata || null);
  }

  // RFC 4180 CSV: quoted fields may hold commas, quotes ("") and newlines.
  function parseCsv(text) {
    const rows = [];
    let row = [], field = "", i = 0, quoted = false;
    while (i < text.length) {
      const ch = text[i];
      if (quoted) {
        if (ch === '"') {
          if (text[i + 1] === '"') { field += '"'; i += 2; continue; }
          quoted = false; i++; continue;
        }
        field += ch; i++; continue;
      }
      if (ch === '"') { quoted = true; i++; continue; }
      if (ch === ",") { row.push(field); field = ""; i++; continue; }
      if (ch === "\n" || ch === "\r") {
        if (ch === "\r" && text[i + 1] === "\n") i++;
        row.push(field); rows.push(row); row = []; field = ""; i++; continue;
      }
      field += ch; i++;
    }
    if (field !== "" || row.length) { row.push(field); rows.push(row); }
    return rows;
  }

  function readCsv(text, meta) {
    const rows = parseCsv(text);
    const header = rows.shift();
    const columns = {};
    header.forEach((name, j) => { columns[name] = rows.map((r) => r[j]); });
    return buildDataset(columns, meta);
  }

  // Files from a picker or a drop: one result file, plus NAME.meta.json for a CSV, plus an image.
  async function loadFiles(fileList) {
    const files = [...fileList];
    const byName = (re) => files.find((f) => re.test(f.name));
    const metaFile = byName(/\.meta\.json$/i);
    const image = byName(/\.(png|jpe?g|gif|webp|bmp)$/i);
    const data = byName(/\.parquet$/i) || files.find((f) => /\.json$/i.test(f.name) && f !== metaFile) ||
      byName(/\.csv$/i);
    let dataset = null;
    if (data) {
      if (/\.parquet$/i.test(data.name)) dataset = await readParquet(await data.arrayBuffer());
      else if (/\.json$/i.test(data.name)) dataset = readJson(await data.text());
      else dataset = readCsv(await data.text(), metaFile ? JSON.parse(await metaFile.text()) : null);
      dataset.fileName = data.name;
    }
    return { dataset, image };
  }

  function wireFileInputs(input, onLoaded, onError) {
    const handle = async (files) => {
      try { onLoaded(await loadFiles(files)); } catch (err) { onError(err); }
    };
    input.addEventListener("change", () => handle(input.files));
    document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
    document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      document.body.classList.remove("dragging");
      handle(e.dataTransfer.files);
    });
  }

  /* ---------- views ---------- */

  // values[layerIndex * P + positionIndex] for one (step, variant, metric); NaN where no row exists.
  function view(ds, step, variant, metric) {
    const key = `${step}|${variant}|${metric}`;
    if (ds.cache.has(key)) return ds.cache.get(key);
    const P = ds.positions.length;
    const layerIndex = new Map(ds.layers.map((l, i) => [l, i]));
    const posIndex = new Map(ds.positions.map((p, i) => [p, i]));
    const values = new Float64Array(ds.layers.length * P).fill(NaN);
    const code = ds.variants.indexOf(variant);
    const src = metric === "cos" ? ds.cos : ds.l2;
    for (let i = 0; i < ds.n; i++) {
      if (ds.step[i] !== step || ds.variantCode[i] !== code) continue;
      values[layerIndex.get(ds.layer[i]) * P + posIndex.get(ds.pos[i])] = src[i];
    }
    const result = { values, P };
    ds.cache.set(key, result);
    return result;
  }

  function scale(value, lo, hi, mode, sorted) {
    if (!Number.isFinite(value)) return NaN;
    if (mode === "percentile" && sorted && sorted.length) {
      let a = 0, b = sorted.length;
      while (a < b) { const m = (a + b) >> 1; if (sorted[m] < value) a = m + 1; else b = m; }
      return sorted.length > 1 ? a / (sorted.length - 1) : 1;
    }
    const t = hi > lo ? Math.min(1, Math.max(0, (value - lo) / (hi - lo))) : 0;
    return mode === "sqrt" ? Math.sqrt(t) : t;
  }

  // t in [0, 1] -> colour; two palettes so image and text tokens read as different scales.
  // Looked up from 256 precomputed entries: redrawing tens of thousands of cells stays cheap.
  const PALETTES = {};
  for (const [name, stops] of Object.entries({
    text: [[255, 255, 255], [255, 190, 80], [200, 60, 0]],
    image: [[255, 255, 255], [120, 170, 255], [20, 40, 160]],
  })) {
    PALETTES[name] = Array.from({ length: 256 }, (_, k) => {
      const x = (k / 255) * 2, i = Math.min(1, Math.floor(x)), f = x - i;
      const c = stops[i].map((v, j) => Math.round(v + (stops[i + 1][j] - v) * f));
      return `rgb(${c[0]},${c[1]},${c[2]})`;
    });
  }

  function colour(t, palette) {
    if (!Number.isFinite(t)) return "#eeeeee";
    return PALETTES[palette === "text" ? "text" : "image"][Math.round(t * 255)];
  }

  /* ---------- page furniture ---------- */

  function header(el, ds) {
    el.replaceChildren();
    const m = ds.meta || {};
    const items = [
      ["file", ds.fileName || ""], ["model", m.model], ["prompt", m.prompt], ["generated", m.generated_text],
      ["mask mode", m.mask_mode], ["vision attention", m.vision_attention],
      ["steps", ds.steps.length], ["layers", ds.layers.length], ["rows", ds.n],
    ];
    if (!ds.meta) items.push(["metadata", "none (load NAME.meta.json together with a CSV)"]);
    for (const [k, v] of items) {
      if (v === undefined || v === null) continue;
      const span = document.createElement("span");
      const b = document.createElement("b");
      b.textContent = `${k}: `;
      span.append(b, String(v));
      el.append(span);
    }
  }

  function tooltip() {
    let tip = document.getElementById("tooltip");
    if (!tip) {
      tip = document.createElement("div");
      tip.id = "tooltip";
      document.body.append(tip);
    }
    return {
      show(evt, lines) {
        tip.textContent = lines.join("\n");
        tip.style.display = "block";
        tip.style.left = `${evt.clientX + 14}px`;
        tip.style.top = `${evt.clientY + 14}px`;
      },
      hide() { tip.style.display = "none"; },
    };
  }

  // Every number at full precision: what the file holds.
  function describe(ds, token, layer, step, variant, pos) {
    const l2 = valueAt(ds, step, variant, "l2", layer, pos);
    const cos = valueAt(ds, step, variant, "cos", layer, pos);
    return [`position ${pos}  token ${JSON.stringify(token.text)} (${token.type}` +
      (token.image >= 0 ? `, image ${token.image} row ${token.row} col ${token.col})` : ")"),
      `layer ${layer}  step ${step}  variant ${variant}`, `l2_distance ${l2}`, `cosine_distance ${cos}`];
  }

  function valueAt(ds, step, variant, metric, layer, pos) {
    const v = view(ds, step, variant, metric);
    return v.values[ds.layers.indexOf(layer) * v.P + ds.positions.indexOf(pos)];
  }

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fillSelect(select, values, label = (v) => String(v)) {
    select.replaceChildren(...values.map((v) => { const o = el("option", { value: String(v) }, label(v)); return o; }));
  }

  return { COLUMNS, tip: tooltip(), loadFiles, wireFileInputs, view, scale, colour, header, tooltip, describe, valueAt, el,
    fillSelect, readParquet, readJson, readCsv, parseCsv };
})();
