/* Shared by both viewers: reading result files (layer or flow measure, any of the three formats),
 * the columnar dataset and its views, colour scales and colour bars, number and token formatting,
 * comparing two runs, tooltips, keys and sliders, and PNG export helpers.
 * A classic script (no modules) so the pages open from file:// by double-click. Text from the data
 * is only ever inserted with textContent or drawn on a canvas, never parsed as HTML. */
"use strict";

const $ = (id) => document.getElementById(id);

const MaskImpact = (() => {
  /* ---------- what a file must hold ---------- */

  // Every result file carries its measure's schema in its metadata (written by the measure's class): the
  // series column, what a row is, the metrics (label, sign, ratio), the detail columns, the default
  // normalisation. The pages read it; they never test a measure's name.
  const KEY_COLUMNS = ["generation_step", "layer", "token_position", "token_type", "image_index", "grid_row", "grid_col"];
  const OPTIONAL = ["token_masked", "unit", "unit_kind", "unit_size", "unit_positions", "grid_rows", "grid_cols"];

  // A file written before schemas (no schema in its metadata, or no metadata: the seed's CSV) is read as the
  // layer measure, with the metrics its columns hold; the figures do the same (measures.base.schema_of).
  // tests/test_reader_rules.py checks that this is the layer measure's schema as the tool writes it.
  const LEGACY_SCHEMA = {"measure": "layer", "question": "which prompt units does each layer use?", "series": {"column": "variant", "label": "variant", "order": []}, "rows": {"label": "layer", "short": "layer", "axis": "decoder layer"}, "normalise": "layer", "metrics": [{"key": "l2", "label": "L2 distance", "column": "l2_distance", "unit": "", "signed": false, "ratio": null}, {"key": "cos", "label": "cosine distance", "column": "cosine_distance", "unit": "", "signed": false, "ratio": null}, {"key": "rel_l2", "label": "relative L2 (L2 / base norm)", "column": null, "unit": "", "signed": false, "ratio": ["l2_distance", "base_norm"]}], "details": [], "curves": "units", "units_listed": true, "options": ["variants"], "columns": ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index", "grid_row", "grid_col", "variant", "l2_distance", "cosine_distance", "unit", "unit_kind", "unit_size", "unit_positions", "grid_rows", "grid_cols", "base_norm"]};

  function schemaOf(meta, name, names = null) {
    let schema = meta && meta.schema;
    if (schema === undefined || schema === null) {
      const has = (m) => !names || (m.ratio || [m.column]).every((c) => names.includes(c));
      schema = { ...LEGACY_SCHEMA, metrics: LEGACY_SCHEMA.metrics.filter(has) };
      const columns = [...KEY_COLUMNS, schema.series.column];
      if (!schema.metrics.length || (names && !columns.every((c) => names.includes(c)))) {
        throw new Error(`${name} holds no measure schema in its metadata and not the layer measure's columns (a ` +
          "file written by mask-impact carries one; for a CSV load its .meta.json too)");
      }
    }
    const fine = schema && typeof schema === "object" && schema.series && typeof schema.series.column === "string" &&
      Array.isArray(schema.metrics) && schema.metrics.length && schema.rows;
    if (!fine) throw new Error(`${name} holds a measure schema this page cannot read`);
    const metrics = schema.metrics.map((m) => ({ key: String(m.key), label: String(m.label), column: m.column || null,
      signed: Boolean(m.signed), ratio: Array.isArray(m.ratio) ? m.ratio.map(String) : null, unit: m.unit || "" }));
    return {
      measure: String(schema.measure), series: schema.series.column, seriesLabel: String(schema.series.label),
      order: Array.isArray(schema.series.order) ? schema.series.order.map(String) : [],
      rows: { label: String(schema.rows.label), short: String(schema.rows.short || schema.rows.label),
        axis: String(schema.rows.axis || "decoder layer") },  // files before the axis: decoder layers
      normalise: ["layer", "step", "global"].includes(schema.normalise) ? schema.normalise : "global",
      metrics, details: Array.isArray(schema.details) ? schema.details.map((d) => [String(d[0]), String(d[1])]) : [],
      curves: schema.curves === "series" ? "series" : "units", unitsListed: schema.units_listed !== false,
      options: Array.isArray(schema.options) ? schema.options.map(String) : [],
      columns: Array.isArray(schema.columns) ? schema.columns.map(String) : [],
      question: typeof schema.question === "string" ? schema.question : "which prompt units does each layer use?",
    };
  }

  // The columns a result must hold under its schema: where a row sits, its series, its metrics' columns.
  function requiredColumns(spec) {
    const metricColumns = spec.metrics.flatMap((m) => (m.ratio ? m.ratio : [m.column]));
    return [...new Set([...KEY_COLUMNS, spec.series, ...metricColumns])];
  }

  function checkColumns(names, spec, where) {
    const missing = requiredColumns(spec).filter((c) => !names.includes(c));
    if (missing.length) {
      throw new Error(`${where} is not a mask-impact ${spec.measure} result: it lacks the ` +
        `column${missing.length > 1 ? "s" : ""} ${missing.join(", ")}`);
    }
  }

  /* ---------- reading ---------- */

  // Per-unit columns: in a layer file with a unit list in its metadata they are read from there, so
  // that only the columns each row needs are decoded (a full-size file has millions of rows).
  function numericColumns(spec) {
    return new Set(["generation_step", "layer", ...spec.metrics.flatMap((m) => (m.ratio ? m.ratio : [m.column]))]);
  }
  const UNIT_COLUMNS = ["token_position", "token_masked", "token_type", "image_index", "grid_row", "grid_col",
    "unit", "unit_size", "grid_rows", "grid_cols"];

  async function readParquet(buffer, name) {
    const meta = hyparquet.parquetMetadata(buffer);
    const names = meta.schema.slice(1).map((s) => s.name);
    const kv = (meta.key_value_metadata || []).find((e) => e.key === "mask_impact");
    const info = kv ? readMeta(kv.value, `${name}'s mask_impact metadata`) : null;
    const spec = schemaOf(info, name, names);
    checkColumns(names, spec, name);
    const n = Number(meta.num_rows);
    if (!n) throw new Error(`${name} holds no rows`);
    // The units of a layer or attention file are the metadata's unit list (a flow's group sources are not).
    const fromMeta = spec.unitsListed && info && Array.isArray(info.units) && names.includes("unit_positions");
    let wanted = [...requiredColumns(spec), ...OPTIONAL.filter((c) => names.includes(c)),
      ...spec.details.map((d) => d[0]).filter((c) => names.includes(c))];
    if (names.includes("example_id")) wanted.push("example_id", ...carriedColumns(names, spec));
    wanted = [...new Set(wanted)];
    if (fromMeta) wanted = wanted.filter((c) => !UNIT_COLUMNS.includes(c));
    const numeric = numericColumns(spec);
    const columns = {};
    const started = performance.now();
    for (const c of wanted) columns[c] = numeric.has(c) ? new Float64Array(n) : new Array(n);
    await hyparquet.parquetRead({
      file: buffer, columns: wanted,
      onChunk: ({ columnName, columnData, rowStart }) => {
        const target = columns[columnName];
        if (target instanceof Float64Array && columnData instanceof Float64Array) { target.set(columnData, rowStart); return; }
        // Any other width (int64 as BigInt, unsigned, float32) and nulls (missing values): one by one.
        if (target instanceof Float64Array) {
          for (let i = 0; i < columnData.length; i++) target[rowStart + i] = number(columnData[i]);
          return;
        }
        for (let i = 0; i < columnData.length; i++) {
          const v = columnData[i];
          target[rowStart + i] = typeof v === "bigint" ? Number(v) : v;
        }
      },
    });
    const decoded = performance.now();
    const ds = datasetOf(spec, columns, n, info, fromMeta ? unitsFromMeta(info.units) : null);
    ds.timings = { decode_ms: decoded - started, build_ms: performance.now() - decoded };
    return ds;
  }

  // kind|positions -> the unit's attributes, from the metadata's unit list.
  function unitsFromMeta(list) {
    const known = new Map();
    for (const u of list) {
      const vision = u.token_type === "vision";
      known.set(`${u.kind}|${u.positions.join(",")}`, {
        kind: u.kind, label: u.label, short: u.short, type: u.token_type, positions: u.positions, first: u.positions.length ? u.positions[0] : -1,
        image: u.image_index, row: u.grid_row, col: u.grid_col, rows: vision ? u.grid_rows : -1, cols: vision ? u.grid_cols : -1,
      });
    }
    return known;
  }

  function readJson(text, name) {
    let doc;
    try { doc = JSON.parse(text); } catch (err) { throw new Error(`${name} is not valid JSON (${err.message})`); }
    const rows = Array.isArray(doc && doc.data) ? doc.data : null;
    if (!rows) throw new Error(`${name} is not a mask-impact result: it has no "data" list of rows`);
    if (!rows.length) throw new Error(`${name} holds no rows`);
    const names = doc.schema && doc.schema.fields ? doc.schema.fields.map((f) => f.name) : Object.keys(rows[0]);
    const meta = doc.metadata === undefined || doc.metadata === null ? null :
      readMeta(JSON.stringify(doc.metadata), `the "metadata" of ${name}`);
    const spec = schemaOf(meta, name, names);
    checkColumns(names, spec, name);
    const columns = {};
    for (const c of names) columns[c] = rows.map((r) => r[c]);
    return datasetOf(spec, columns, rows.length, meta);
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

  function readCsv(text, meta, name) {
    const rows = parseCsv(text);
    if (!rows.length || (rows.length === 1 && rows[0].length === 1 && rows[0][0] === "")) {
      throw new Error(`${name} is empty`);
    }
    const header = rows.shift();
    const spec = schemaOf(meta, name, header);
    checkColumns(header, spec, name);
    if (!rows.length) throw new Error(`${name} holds no rows`);
    const columns = {};
    header.forEach((c, j) => { columns[c] = rows.map((r) => r[j]); });
    return datasetOf(spec, columns, rows.length, meta);
  }

  /* ---------- the dataset ---------- */

  // A study's file holds many examples (its example_id column): each is a dataset of its own, chosen by its
  // id, never a mix of several prompts' rows. The table's own columns (a question's type, its answer) are
  // shown with the example; the measure's columns and the per-step target columns are not the table's.
  const STUDY_COLUMNS = ["example_id", "target_token", "predicted_token", "correct", "base_prob"];

  function carriedColumns(names, spec) {
    const measured = new Set([...KEY_COLUMNS, ...OPTIONAL, ...spec.columns, ...requiredColumns(spec), ...STUDY_COLUMNS,
      ...spec.details.map((d) => d[0])]);
    return names.filter((c) => !measured.has(c));
  }

  function datasetOf(spec, columns, n, meta, known = null) {
    const ids = columns.example_id;
    if (!ids) return buildDataset(spec, columns, n, meta, known);
    const rowsOf = new Map();
    for (let i = 0; i < n; i++) {
      const id = String(ids[i]);
      let rows = rowsOf.get(id);
      if (!rows) rowsOf.set(id, rows = []);
      rows.push(i);
    }
    const carried = carriedColumns(Object.keys(columns), spec);
    const examples = [...rowsOf].map(([id, rows]) => ({
      id, rows: rows.length, values: carried.map((c) => [c, columns[c][rows[0]]]),
    }));
    const pick = (id) => {
      const rows = rowsOf.get(id);
      if (!rows) throw new Error(`the file has no example ${id}`);
      const part = {};
      for (const [c, values] of Object.entries(columns)) {
        part[c] = values instanceof Float64Array ? Float64Array.from(rows, (i) => values[i]) : rows.map((i) => values[i]);
      }
      const ds = buildDataset(spec, part, rows.length, meta, known);
      ds.example = examples.find((e) => e.id === id);
      ds.examples = examples;
      ds.exampleDataset = pick;
      return ds;
    };
    return pick(examples[0].id);
  }

  // Typed arrays per row; one record per unit; series codes (variants or flows); one array per metric;
  // and the rows ordered by (step, series), so that a view reads only its own rows.
  function buildDataset(spec, columns, n, meta, known = null) {
    const ds = {
      kind: spec.measure, spec, n, meta: meta || null,
      step: toInt32(columns.generation_step, "generation_step"), layer: toInt32(columns.layer, "layer"),
      unitOf: new Int32Array(n), seriesOf: new Int32Array(n),
      series: [], units: [], values: {}, columns, cache: new Map(),
    };
    const seriesCodes = new Map();
    const firstKind = new Map(), otherKinds = new Map();  // positions -> unit (the usual case), kind|positions -> unit
    const seriesColumn = columns[spec.series];
    const positionsColumn = columns.unit_positions, kindColumn = columns.unit_kind;
    for (let i = 0; i < n; i++) {
      const s = seriesColumn[i];
      let code = seriesCodes.get(s);
      if (code === undefined) { code = ds.series.length; seriesCodes.set(s, code); ds.series.push(String(s)); }
      ds.seriesOf[i] = code;
      const positions = positionsColumn ? positionsColumn[i] : columns.token_position[i];
      const unitKind = kindColumn ? kindColumn[i] : "token";
      let u = firstKind.get(positions);
      if (u === undefined || ds.units[u].kind !== unitKind) {
        const key = `${unitKind}|${positions}`;
        u = u === undefined ? undefined : otherKinds.get(key);
        if (u === undefined) {
          u = ds.units.length;
          const record = known ? known.get(key) : null;
          ds.units.push(record ? { ...record, index: u, key, firstStep: ds.step[i] }
            : makeUnit(columns, i, u, String(positions), String(unitKind), ds.step[i]));
          if (!firstKind.has(positions)) firstKind.set(positions, u); else otherKinds.set(key, u);
        }
      }
      ds.unitOf[i] = u;
    }
    if (spec.order.length) sortSeries(ds, (a, b) => rankIn(spec.order, a) - rankIn(spec.order, b));
    ds.metrics = spec.metrics;
    for (const m of spec.metrics) {
      if (!m.ratio) { ds.values[m.key] = toFloat64(columns[m.column]); continue; }
      const top = toFloat64(columns[m.ratio[0]]), bottom = toFloat64(columns[m.ratio[1]]), out = new Float64Array(n);
      for (let i = 0; i < n; i++) out[i] = ratio(top[i], bottom[i]);
      ds.values[m.key] = out;
    }
    ds.notFinite = countNotFinite(ds, spec.metrics.filter((m) => !m.ratio));
    ds.steps = uniqueSorted(ds.step);
    ds.layers = uniqueSorted(ds.layer);
    const layerIndex = new Map(ds.layers.map((l, i) => [l, i]));
    ds.layerAt = Int32Array.from(ds.layer, (l) => layerIndex.get(l));  // sized by the rows, not by layer numbers
    orderRows(ds);
    ds.images = imageSpans(ds);
    return ds;
  }

  // A ratio of two columns (relative L2 = L2 / base norm): 0 / 0 reads 0, x / 0 (or x / negative) missing.
  function ratio(top, bottom) {
    return bottom > 0 ? top / bottom : (top === 0 ? 0 : NaN);
  }

  // The units each series has rows for (a flow's sources), one pass over the rows.
  function seriesUnits(ds) {
    const sets = ds.series.map(() => new Set());
    for (let i = 0; i < ds.n; i++) sets[ds.seriesOf[i]].add(ds.unitOf[i]);
    return sets;
  }

  // Series in their reading order (Full, Attn, Head_0, ...), and every row's code moved with its name.
  function sortSeries(ds, order) {
    const sorted = [...ds.series].sort(order);
    const newCode = Int32Array.from(ds.series, (name) => sorted.indexOf(name));
    for (let i = 0; i < ds.n; i++) ds.seriesOf[i] = newCode[ds.seriesOf[i]];
    ds.series = sorted;
  }

  // Rows whose metric values are missing (NaN, null, an empty field) or infinite.
  function countNotFinite(ds, metrics) {
    let missing = 0, infinite = 0;
    for (let i = 0; i < ds.n; i++) {
      let nan = false, inf = false;
      for (const m of metrics) {
        const v = ds.values[m.key][i];
        if (Number.isNaN(v)) nan = true; else if (!Number.isFinite(v)) inf = true;
      }
      if (nan) missing++;
      if (inf) infinite++;
    }
    return { missing, infinite };
  }

  // Counting sort of the rows by (step, series): ds.blocks[stepIndex * S + code] = [start, end) in ds.order.
  function orderRows(ds) {
    const S = ds.series.length, stepIndex = new Map(ds.steps.map((s, i) => [s, i]));
    const keyOf = new Int32Array(ds.n);
    const counts = new Int32Array(ds.steps.length * S + 1);
    for (let i = 0; i < ds.n; i++) { const k = stepIndex.get(ds.step[i]) * S + ds.seriesOf[i]; keyOf[i] = k; counts[k + 1]++; }
    for (let k = 1; k < counts.length; k++) counts[k] += counts[k - 1];
    ds.blockStart = counts.slice();
    ds.order = new Int32Array(ds.n);
    const next = counts.slice(0, -1);
    for (let i = 0; i < ds.n; i++) ds.order[next[keyOf[i]]++] = i;
    ds.stepIndex = stepIndex;
  }

  // A column of small non-negative integers (steps, layers): anything else is refused, never wrapped.
  function toInt32(values, name) {
    const out = new Int32Array(values.length);
    for (let i = 0; i < values.length; i++) {
      const x = number(values[i]);
      if (!Number.isInteger(x) || x < 0 || x > 1e6) {
        throw new Error(`row ${i + 1} has ${name} ${JSON.stringify(String(values[i]))}: not a ${name} number`);
      }
      out[i] = x;
    }
    return out;
  }

  // A value as a number: null, undefined and empty fields are missing (NaN), never 0; the writers'
  // spellings of NaN and infinity (CSV nan / inf / -inf; JSON null / 1e999) read back as such.
  function number(v) {
    if (typeof v === "number") return v;
    if (v === null || v === undefined || v === "") return NaN;
    if (typeof v === "bigint") return Number(v);
    const t = String(v).trim().toLowerCase();
    if (t === "inf" || t === "+inf" || t === "infinity") return Infinity;
    if (t === "-inf" || t === "-infinity") return -Infinity;
    return t === "" ? NaN : Number(t);
  }

  function toFloat64(values) {
    if (values instanceof Float64Array) return values;
    return Float64Array.from(values, number);
  }

  // Largest / smallest of a long list without spreading it into arguments (a call stack has no room for 150k).
  function maxOf(values) {
    let m = -Infinity;
    for (const v of values) if (v > m) m = v;
    return m;
  }

  function minOf(values) {
    let m = Infinity;
    for (const v of values) if (v < m) m = v;
    return m;
  }

  function makeUnit(columns, i, index, positions, kind, step) {
    const type = columns.token_type ? String(columns.token_type[i]) : "text";
    const vision = type === "vision";
    const rows = columns.grid_rows ? Number(columns.grid_rows[i]) : (vision ? 1 : -1);
    const cols = columns.grid_cols ? Number(columns.grid_cols[i]) : (vision ? 1 : -1);
    const label = columns.unit ? String(columns.unit[i]) : String(columns.token_masked ? columns.token_masked[i] : "");
    return {
      index, key: `${kind}|${positions}`, kind, label, type,
      positions: positions.split(",").filter((p) => p !== "").map(Number),
      first: columns.token_position ? Number(columns.token_position[i]) : Number(positions.split(",")[0]),
      firstStep: step,
      image: columns.image_index ? Number(columns.image_index[i]) : -1,
      row: columns.grid_row ? Number(columns.grid_row[i]) : -1, col: columns.grid_col ? Number(columns.grid_col[i]) : -1,
      rows, cols,
    };
  }

  function uniqueSorted(arr) {
    return [...new Set(arr)].sort((a, b) => a - b);
  }

  // A series' place in the schema's order; one the order does not name comes after it.
  function rankIn(order, name) {
    const at = order.indexOf(name);
    return at < 0 ? order.length : at;
  }

  // Image grids from the metadata (image_grid_thw), else from the largest cells the units cover.
  function imageSpans(ds) {
    const spans = new Map();
    for (const u of ds.units) {
      if (u.type !== "vision" || u.image < 0) continue;
      const s = spans.get(u.image) || { index: u.image, rows: 0, cols: 0, start: Infinity };
      s.rows = Math.max(s.rows, u.row + Math.max(1, u.rows));
      s.cols = Math.max(s.cols, u.col + Math.max(1, u.cols));
      s.start = Math.min(s.start, u.kind === "token" ? u.first : Infinity);
      spans.set(u.image, s);
    }
    // A grid holds one cell per image token, and the tokens are positions of the sequence: no grid can
    // have more cells than the sequence has positions (the metadata's ids, or the largest position in the rows).
    let positions = 0;
    for (const u of ds.units) for (const p of u.positions) if (p + 1 > positions) positions = p + 1;
    const ids = ds.meta && Array.isArray(ds.meta.final_ids) ? ds.meta.final_ids.length : 0;
    const limit = Math.max(positions, ids);
    const images = (ds.meta && Array.isArray(ds.meta.images)) ? ds.meta.images : [];
    for (const img of images) {
      const rows = Number(img.grid_rows), cols = Number(img.grid_cols);
      const tokens = Number(img.token_end) - Number(img.token_start);
      const separators = img.row_separators === true ? rows : 0;  // a token after each row that is no cell
      const trailer = typeof img.trailer === "string" && img.trailer ? 1 : 0;  // one after the last row (no cell)
      const fits = Number.isInteger(rows) && Number.isInteger(cols) && rows > 0 && cols > 0 && rows * cols <= limit &&
        (!Number.isFinite(tokens) || tokens === rows * cols + separators + trailer);
      if (!fits) {
        throw new Error(`its metadata gives image ${img.index} a ${img.grid_rows} x ${img.grid_cols} grid, which ` +
          `does not fit the ${limit} positions of the sequence`);
      }
      const s = spans.get(img.index) || { index: img.index };
      if (s.rows > rows || s.cols > cols) {
        throw new Error(`its rows place units of image ${img.index} outside the ${rows} x ${cols} grid of its metadata`);
      }
      // The part of the picture the grid covers, where the processor cut it (LLaVA's centre crop).
      const region = Array.isArray(img.region) && img.region.length === 4 && img.region.every(Number.isFinite) &&
        img.region[2] > img.region[0] && img.region[3] > img.region[1] ? img.region.map(Number) : null;
      // A picture cut into tiles has a view per tile and a thumbnail: each view is one grid here.
      const picture = Number.isInteger(img.picture) ? img.picture : img.index;
      Object.assign(s, { rows, cols, start: img.token_start, path: img.path, width: img.width, height: img.height,
        region, picture, view: typeof img.view === "string" ? img.view : "", rowWidth: cols + (separators ? 1 : 0),
        // a temporal patch of a video: which video, its time and its source frames
        video: Number.isInteger(img.video) ? img.video : -1, time: Number.isFinite(img.time) ? img.time : null,
        frames: Array.isArray(img.frames) ? img.frames.filter(Number.isInteger) : [] });
      spans.set(img.index, s);
    }
    for (const s of spans.values()) {
      if (s.rows * s.cols > limit) {
        throw new Error(`its rows place image ${s.index}'s units on a ${s.rows} x ${s.cols} grid, more cells than ` +
          `the ${limit} positions of the sequence`);
      }
    }
    const sorted = [...spans.values()].sort((a, b) => a.index - b.index);
    for (const span of sorted) {
      if (span.picture === undefined) span.picture = span.index;
      span.label = span.video >= 0 ? `video ${span.video} ${span.view}${span.time === null ? "" : ` (${Number(span.time.toFixed(3))} s)`}`
        : `image ${span.picture}${span.view ? ` ${span.view}` : ""}`;
    }
    const byIndex = new Map(sorted.map((span) => [span.index, span]));
    for (const u of ds.units) {  // each image unit knows its view's picture and name (its label says them)
      const span = byIndex.get(u.image);
      if (u.type === "vision" && span) { u.picture = span.picture; u.view = span.view; u.video = span.video; }
    }
    return sorted;
  }

  // Width over height of what an image's grid covers: its region, else the picture, else the grid.
  function aspectOf(span) {
    if (span.region) return (span.region[2] - span.region[0]) / (span.region[3] - span.region[1]);
    return span.width && span.height ? span.width / span.height : span.cols / span.rows;
  }

  /* ---------- views ---------- */

  // values[layerIndex * U + unitIndex] and the row each came from, for one (step, series, metric).
  function view(ds, step, series, metric) {
    const key = `${step}|${series}|${metric}`;
    if (ds.cache.has(key)) return ds.cache.get(key);
    const U = ds.units.length;
    const values = new Float64Array(ds.layers.length * U).fill(NaN);
    const rows = new Int32Array(ds.layers.length * U).fill(-1);
    const code = ds.series.indexOf(series), si = ds.stepIndex.get(step);
    const src = ds.values[metric];
    if (code >= 0 && si !== undefined) {
      const block = si * ds.series.length + code;
      for (let k = ds.blockStart[block]; k < ds.blockStart[block + 1]; k++) {
        const i = ds.order[k];
        const at = ds.layerAt[i] * U + ds.unitOf[i];
        values[at] = src[i];
        rows[at] = i;
      }
    }
    const result = { values, rows, U, signed: isSigned(ds, metric) };
    ds.cache.set(key, result);
    return result;
  }

  function isSigned(ds, metric) {
    const m = ds.metrics.find((x) => x.key === metric);
    return Boolean(m && m.signed);
  }

  // What B shows against A's series and metric: the same, or for another measure (a layer file against an
  // attention file of the same run) the series of that name if B has it (Head_h), else B's first, and B's
  // metric of that key if it has one, else its first.
  function counterpart(a, b, series, metric) {
    const bSeries = b.series.includes(series) ? series : b.series[0];
    const bMetric = b.metrics.some((m) => m.key === metric) ? metric : b.metrics[0].key;
    return { series: bSeries, metric: bMetric, same: a.kind === b.kind };
  }

  // A second run matched on (step, layer, unit, series): A, B, or A - B, in A's layout.
  function compareView(a, b, step, series, metric, mode) {
    const va = view(a, step, series, metric);
    if (mode === "A") return va;
    const key = `cmp|${mode}|${step}|${series}|${metric}`;
    if (a.cache.has(key)) return a.cache.get(key);
    const there = counterpart(a, b, series, metric);
    const vb = view(b, step, there.series, there.metric);
    const bUnit = new Map(b.units.map((u) => [u.key, u.index]));
    const bLayer = new Map(b.layers.map((l, i) => [l, i]));
    const values = new Float64Array(va.values.length).fill(NaN);
    a.layers.forEach((layer, li) => {
      const lb = bLayer.get(layer);
      if (lb === undefined) return;
      a.units.forEach((u, ui) => {
        const ub = bUnit.get(u.key);
        if (ub === undefined) return;
        const x = va.values[li * va.U + ui], y = vb.values[lb * vb.U + ub];
        values[li * va.U + ui] = mode === "B" ? y : x - y;
      });
    });
    const result = { values, rows: va.rows, U: va.U, signed: mode === "A-B" || (mode === "B" ? vb.signed : va.signed) };
    a.cache.set(key, result);
    return result;
  }

  // Spearman's rank correlation of A and B over the units both hold, per layer of A (ties: mean ranks).
  function rankCorrelations(a, b, step, series, metric) {
    const va = view(a, step, series, metric), there = counterpart(a, b, series, metric);
    const vb = view(b, step, there.series, there.metric);
    const bUnit = new Map(b.units.map((u) => [u.key, u.index])), bLayer = new Map(b.layers.map((l, i) => [l, i]));
    return a.layers.map((layer, li) => {
      const lb = bLayer.get(layer), xs = [], ys = [];
      if (lb !== undefined) {
        a.units.forEach((u, ui) => {
          const ub = bUnit.get(u.key);
          if (ub === undefined || u.kind === "group") return;
          const x = va.values[li * va.U + ui], y = vb.values[lb * vb.U + ub];
          if (Number.isFinite(x) && Number.isFinite(y)) { xs.push(x); ys.push(y); }
        });
      }
      return { layer, n: xs.length, rho: spearman(xs, ys) };
    });
  }

  function ranks(values) {
    const order = values.map((v, i) => [v, i]).sort((p, q) => p[0] - q[0]);
    const out = new Array(values.length);
    for (let i = 0; i < order.length;) {
      let j = i;
      while (j + 1 < order.length && order[j + 1][0] === order[i][0]) j++;
      for (let k = i; k <= j; k++) out[order[k][1]] = (i + j) / 2 + 1;
      i = j + 1;
    }
    return out;
  }

  function spearman(xs0, ys0) {
    const keep = xs0.map((x, i) => Number.isFinite(x) && Number.isFinite(ys0[i]));
    const xs = xs0.filter((_, i) => keep[i]), ys = ys0.filter((_, i) => keep[i]);
    if (xs.length < 3) return NaN;
    const rx = ranks(xs), ry = ranks(ys), n = xs.length;
    const mx = rx.reduce((s, v) => s + v, 0) / n, my = ry.reduce((s, v) => s + v, 0) / n;
    let sxy = 0, sxx = 0, syy = 0;
    for (let i = 0; i < n; i++) { sxy += (rx[i] - mx) * (ry[i] - my); sxx += (rx[i] - mx) ** 2; syy += (ry[i] - my) ** 2; }
    return sxx > 0 && syy > 0 ? sxy / Math.sqrt(sxx * syy) : NaN;
  }

  // The rank correlation line under the comparison message: per layer, at this step, series and metric.
  function showRankCorrelation(a, b, step, series, metric) {
    let line = $("rank-correlation");
    if (!line) {
      line = el("div", { id: "rank-correlation", class: "message" });
      $("compare-message").after(line);
    }
    if (!b) { line.textContent = ""; delete document.body.dataset.spearman; return; }
    const there = counterpart(a, b, series, metric);
    const rows = rankCorrelations(a, b, step, series, metric);
    const am = a.metrics.find((m) => m.key === metric), bm = b.metrics.find((m) => m.key === there.metric);
    line.textContent = `Spearman rank correlation, A ${am.label} (${series}) vs B ${bm.label} (${there.series}), ` +
      `step ${step}, per ${a.spec.rows.label}: ` +
      rows.map((r) => `${r.layer}: ${Number.isFinite(r.rho) ? r.rho.toFixed(3) : "n/a"} (${r.n})`).join(", ");
    document.body.dataset.spearman = JSON.stringify(rows);
  }

  // What differs between two runs' metadata (model, prompt, images, modes), one line each.
  function metadataDifferences(a, b) {
    const ma = a.meta || {}, mb = b.meta || {};
    const keys = ["model", "prompt", "system", "measure", "mask_mode", "mask_unit", "vision_attention",
      ...new Set([...a.spec.options, ...b.spec.options]), "num_layers", "dtype"];
    const lines = [];
    for (const k of keys) {
      const x = JSON.stringify(ma[k] ?? null), y = JSON.stringify(mb[k] ?? null);
      if (x !== y) lines.push(`${k}: A ${short(x)} / B ${short(y)}`);
    }
    const images = (m) => JSON.stringify((m.images || []).map((i) => [i.path, i.grid_rows, i.grid_cols]));
    if (images(ma) !== images(mb)) lines.push(`images: A ${short(images(ma))} / B ${short(images(mb))}`);
    return lines;
  }

  // Files whose image grids differ cannot be matched cell by cell.
  function gridsDiffer(a, b) {
    const grids = (ds) => ds.images.map((s) => `${s.rows}x${s.cols}`).join(",");
    return grids(a) !== grids(b) ? `image grids differ: A ${grids(a) || "none"}, B ${grids(b) || "none"}` : "";
  }

  function short(text, limit = 60) {
    return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
  }

  /* ---------- scales ---------- */

  // The value range over the cells `indices` of a view (finite values only); sorted on demand (percentiles).
  function rangeOf(values, indices) {
    let lo = Infinity, hi = -Infinity;
    const finite = [];
    for (let k = 0; k < indices.length; k++) {
      const v = values[indices[k]];
      if (Number.isFinite(v)) { finite.push(v); if (v < lo) lo = v; if (v > hi) hi = v; }
    }
    return lazyRange(finite, finite.length ? lo : NaN, finite.length ? hi : NaN);
  }

  function lazyRange(values, lo, hi) {
    let sorted = null;
    return { lo, hi, values, get sorted() { return sorted || (sorted = Float64Array.from(values).sort()); } };
  }

  function mergeRanges(ranges) {
    const values = ranges.flatMap((r) => r.values);
    const finite = ranges.filter((r) => Number.isFinite(r.lo));
    return lazyRange(values, finite.length ? Math.min(...finite.map((r) => r.lo)) : NaN,
      finite.length ? Math.max(...finite.map((r) => r.hi)) : NaN);
  }

  // Cell indices of a view: every layer (row = null) or one layer, for the units in `units`.
  function cellsOf(units, U, layers, row = null) {
    const rows = row === null ? Array.from({ length: layers }, (_, i) => i) : [row];
    const out = new Int32Array(rows.length * units.length);
    let k = 0;
    for (const r of rows) for (const u of units) out[k++] = r * U + u;
    return out;
  }

  // A signed metric is drawn on a diverging scale centred at 0: the range becomes [-m, m].
  function centred(range, signed) {
    if (!signed) { range.signed = false; return range; }
    const m = Math.max(Math.abs(range.lo), Math.abs(range.hi));
    let abs = null;
    return { lo: -m, hi: m, values: range.values, signed: true,
      get absSorted() { return abs || (abs = Float64Array.from(range.values, Math.abs).sort()); } };
  }

  function rank(sorted, value) {
    let a = 0, b = sorted.length;
    while (a < b) { const m = (a + b) >> 1; if (sorted[m] < value) a = m + 1; else b = m; }
    return sorted.length > 1 ? a / (sorted.length - 1) : 1;
  }

  // value -> position t in [0, 1] on the colour scale (0.5 is zero on a diverging scale).
  function position(value, range, mode) {
    if (Number.isNaN(value) || !Number.isFinite(range.lo)) return NaN;
    if (!Number.isFinite(value)) return value > 0 ? 1 : 0;  // an infinity: the end of the scale
    if (range.signed) {
      const m = range.hi;
      if (!(m > 0)) return 0.5;
      const x = Math.min(1, Math.abs(value) / m);
      const s = mode === "sqrt" ? Math.sqrt(x) : mode === "percentile" ? rank(range.absSorted, Math.abs(value)) : x;
      return 0.5 + 0.5 * Math.sign(value) * s;
    }
    if (mode === "percentile") return rank(range.sorted, value);
    const t = range.hi > range.lo ? Math.min(1, Math.max(0, (value - range.lo) / (range.hi - range.lo))) : 0;
    return mode === "sqrt" ? Math.sqrt(t) : t;
  }

  // t in [0, 1] -> the value there (for colour-bar ticks).
  function valueAtPosition(t, range, mode) {
    if (!Number.isFinite(range.lo)) return NaN;
    if (range.signed) {
      const x = Math.abs(2 * t - 1), sign = Math.sign(2 * t - 1);
      const sorted = range.absSorted;
      const mag = mode === "sqrt" ? x * x * range.hi : mode === "percentile" && sorted.length ?
        sorted[Math.round(x * (sorted.length - 1))] : x * range.hi;
      return sign * mag;
    }
    if (mode === "percentile" && range.sorted.length) return range.sorted[Math.round(t * (range.sorted.length - 1))];
    return range.lo + (mode === "sqrt" ? t * t : t) * (range.hi - range.lo);
  }

  // Palettes of 255 entries (entry 127 is exactly the middle stop, zero on a diverging scale):
  // sequential for image and text units, diverging for signed values.
  const STOPS = {
    image: [[255, 255, 255], [120, 170, 255], [20, 40, 160]],
    text: [[255, 255, 255], [255, 190, 80], [200, 60, 0]],
    diverging: [[33, 102, 172], [247, 247, 247], [178, 24, 43]],
  };
  const PALETTES = {}, RGB = {};
  for (const [name, stops] of Object.entries(STOPS)) {
    RGB[name] = Array.from({ length: 255 }, (_, k) => {
      const x = (k / 254) * 2, i = Math.min(1, Math.floor(x)), f = x - i;
      return stops[i].map((v, j) => Math.round(v + (stops[i + 1][j] - v) * f));
    });
    PALETTES[name] = RGB[name].map((c) => `rgb(${c[0]},${c[1]},${c[2]})`);
  }
  const MISSING = [228, 228, 228];

  function colour(t, palette) {
    if (!Number.isFinite(t)) return "#e4e4e4";
    return PALETTES[palette][Math.round(Math.min(1, Math.max(0, t)) * 254)];
  }

  // The same colour as [r, g, b] (MISSING where there is no value), for ImageData.
  function rgb(t, palette) {
    if (!Number.isFinite(t)) return MISSING;
    return RGB[palette][Math.round(Math.min(1, Math.max(0, t)) * 254)];
  }

  /* ---------- colour bars ---------- */

  // A colour bar: gradient plus min / middle / max values and a caption; the same drawing serves the export.
  function colourBar(holder, range, mode, palette, caption) {
    holder.replaceChildren();
    holder.classList.add("colourbar");
    const canvas = el("canvas", { width: "240", height: "12" });
    drawGradient(canvas.getContext("2d"), 0, 0, 240, 12, palette);
    const ticks = el("div", { class: "ticks" });
    const labels = barLabels(range, mode);
    ticks.append(el("span", { class: "lo" }, labels[0]), el("span", { class: "mid" }, labels[1]),
      el("span", { class: "hi" }, labels[2]));
    const missing = el("span", { class: "missing-key" }, "missing");
    missing.title = "no value: NaN or empty in the file, or no row for this cell";
    holder.append(el("div", { class: "bar-caption" }, caption), canvas, ticks, missing);
    holder.dataset.lo = String(range.lo);
    holder.dataset.hi = String(range.hi);
  }

  function barLabels(range, mode) {
    return [0, 0.5, 1].map((t) => fmt(valueAtPosition(t, range, mode)));
  }

  function drawGradient(ctx, x, y, w, h, palette) {
    for (let i = 0; i < w; i++) {
      ctx.fillStyle = colour(i / (w - 1), palette);
      ctx.fillRect(x + i, y, 1, h);
    }
  }

  // The colour bar drawn onto an export canvas, its caption wrapped to the bar's width; returns its height.
  function drawColourBar(ctx, x, y, range, mode, palette, caption) {
    ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textBaseline = "top";
    const lines = caption ? wrapText(ctx, caption, 280) : [];
    lines.forEach((line, k) => ctx.fillText(line, x, y + 15 * k));
    const top = y + 15 * lines.length + 2;
    drawGradient(ctx, x, top, 240, 12, palette);
    ctx.strokeStyle = "#888"; ctx.strokeRect(x - 0.5, top - 0.5, 241, 13);
    const labels = barLabels(range, mode);
    ctx.fillStyle = "#222";
    ctx.fillText(labels[0], x, top + 16);
    ctx.textAlign = "center"; ctx.fillText(labels[1], x + 120, top + 16);
    ctx.textAlign = "right"; ctx.fillText(labels[2], x + 240, top + 16);
    ctx.textAlign = "left";
    return top + 32 - y;
  }

  // The height drawColourBar will take for a caption.
  function colourBarHeight(ctx, caption) {
    ctx.save();
    ctx.font = "12px sans-serif";
    const n = caption ? wrapText(ctx, caption, 280).length : 0;
    ctx.restore();
    return 15 * n + 34;
  }

  /* ---------- text ---------- */

  // 4 significant digits; never "NaN" (a missing value is a dash; see value() for data).
  function fmt(x) {
    if (x === Infinity || x === -Infinity) return x > 0 ? "inf" : "-inf";
    if (!Number.isFinite(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e-3 && a < 1e5 ? String(Number(x.toPrecision(4))) : x.toExponential(3);
  }

  // A value of the file as text: "missing" where the file holds NaN or nothing.
  function value(x) {
    return Number.isNaN(x) ? "missing" : fmt(x);
  }

  // Token text as a reader expects it (reader_rules.show_text): line breaks as ↵, a carriage return as ␍, tabs
  // as ⇥, the other control characters as their pictures (␀ ␛ ␡), spaces at the ends as ·.
  function showText(text) {
    let t = String(text).replace(/\r\n|\n/g, "↵").replace(/\r/g, "␍").replace(/\t/g, "⇥");
    t = t.replace(/[\x00-\x1f]/g, (c) => String.fromCharCode(0x2400 + c.charCodeAt(0))).replace(/\x7f/g, "␡");
    if (t === "") return "∅";
    const lead = t.length - t.replace(/^ +/, "").length, trail = t.length - t.replace(/ +$/, "").length;
    if (lead === t.length) return "·".repeat(t.length);
    return "·".repeat(lead) + t.slice(lead, t.length - trail) + "·".repeat(trail);
  }

  // A unit's short label: the one the tool wrote into the metadata (reader_rules.short_label); for a unit the
  // metadata does not list (a flow's group source) or a file written before labels, the same rule here.
  function unitLabel(u) {
    if (u.short) return u.short;
    if (u.type === "vision" && u.image >= 0) {
      const picture = u.picture ?? u.image, view = u.view ? ` ${u.view}` : "";
      const where = u.video >= 0 ? `vid${u.video}` : `img${picture}`;  // a frame of a video, or an image
      if (u.kind === "image") return `image ${picture}`;
      const span = (a, n) => (n > 1 ? `${a}-${a + n - 1}` : `${a}`);
      if (u.kind === "token" && u.col < 0) return `${where}${view} ${showText(u.label)} r${u.row}`;  // a row's separator
      if (u.kind === "token" || u.kind === "region") return `${where}${view} r${span(u.row, u.rows)} c${span(u.col, u.cols)}`;
    }
    return showText(u.label);
  }

  function positionsText(u, limit = 16) {
    const p = u.positions;
    if (!p.length) return "none";
    return p.length <= limit ? p.join(",") : `${p.slice(0, limit).join(",")},… (${p.length} positions)`;
  }

  // Tooltip lines: the unit, where it sits, the numbers at 4 digits, then every number at full precision.
  function describe(ds, u, layer, step, series, row) {
    const lines = [`${unitLabel(u)}  (${u.kind}, ${u.type}${u.image >= 0 ? `, image ${u.picture ?? u.image}${u.view ? ` ${u.view}` : ""}` : ""})`,
      `positions ${positionsText(u)}`, `${ds.spec.rows.label} ${layer}  step ${step}  ${ds.spec.seriesLabel} ${series}`];
    if (row < 0) return [...lines, "no value at this step"];
    const raw = [];
    for (const m of ds.metrics) {
      const v = ds.values[m.key][row];
      lines.push(`${m.label}: ${value(v)}`);
      raw.push(`${m.key}=${v}`);
    }
    const c = ds.columns;
    for (const [column, label] of ds.spec.details) {  // the schema's detail columns: token texts as text
      if (!c[column]) continue;
      const v = c[column][row];
      lines.push(`${label}: ${typeof v === "number" ? fmt(v) : JSON.stringify(String(v))}`);
    }
    for (const m of ds.metrics) {
      for (const column of m.ratio || []) if (c[column] && !ds.metrics.some((x) => x.column === column)) {
        raw.push(`${column}=${number(c[column][row])}`);
      }
    }
    lines.push(`raw: ${raw.join(" ")}`);
    return lines;
  }

  /* ---------- page furniture ---------- */

  async function loadFiles(fileList) {
    const files = [...fileList];
    const byName = (re) => files.find((f) => re.test(f.name));
    const metaFile = byName(/\.meta\.json$/i);
    const image = byName(/\.(png|jpe?g|gif|webp|bmp)$/i);
    const data = byName(/\.parquet$/i) || files.find((f) => /\.json$/i.test(f.name) && f !== metaFile) ||
      byName(/\.csv$/i);
    let dataset = null;
    if (!data && metaFile) {
      throw new Error(`${metaFile.name} is the metadata of a CSV result: load the CSV together with it ` +
        `(${metaFile.name.replace(/\.meta\.json$/i, ".csv")})`);
    }
    if (!data && !image) {
      throw new Error(`none of the files given (${files.map((f) => f.name).join(", ")}) is a result: ` +
        "load a .parquet, a .json, or a .csv with its .meta.json");
    }
    if (data) {
      try {
        if (/\.parquet$/i.test(data.name)) dataset = await readParquet(await data.arrayBuffer(), data.name);
        else if (/\.json$/i.test(data.name)) dataset = readJson(await data.text(), data.name);
        else dataset = readCsv(await data.text(), metaFile ? readMeta(await metaFile.text(), metaFile.name) : null, data.name);
      } catch (err) {  // every message names the file
        throw new Error(err.message.includes(data.name) ? err.message : `${data.name}: ${err.message}`);
      }
      dataset.fileName = data.name;
    }
    return { dataset, image };
  }

  // A CSV's metadata file: a JSON object, said with the file's name when it is not.
  function readMeta(text, name) {
    let meta;
    try { meta = JSON.parse(text); } catch (err) { throw new Error(`${name} is not valid JSON (${err.message})`); }
    if (!meta || typeof meta !== "object" || Array.isArray(meta)) {
      throw new Error(`${name} is not a mask-impact metadata file: it holds ${Array.isArray(meta) ? "a list" :
        meta === null ? "null" : `a ${typeof meta}`}, not an object of run settings`);
    }
    return meta;
  }

  function wireFileInput(input, onLoaded, onError, dropTarget) {
    const show = (result) => {
      const ds = result.dataset;
      if (ds && ds.examples) {  // another example of the same file: shown as a file of its own
        ds.choose = (id) => {
          const other = ds.exampleDataset(id);
          other.fileName = ds.fileName;
          show({ dataset: other });
        };
      }
      onLoaded(result);
    };
    const handle = async (files) => {
      try { show(await loadFiles(files)); } catch (err) { onError(err); }
    };
    input.addEventListener("change", () => handle(input.files));
    if (!dropTarget) return;
    dropTarget.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
    dropTarget.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
    dropTarget.addEventListener("drop", (e) => {
      e.preventDefault();
      document.body.classList.remove("dragging");
      handle(e.dataTransfer.files);
    });
  }

  function header(holder, ds) {
    holder.replaceChildren();
    const m = ds.meta || {};
    const items = [
      ["file", ds.fileName || ""], ["measure", ds.kind], ["model", m.model], ["prompt", m.prompt],
      ["generated", m.generated_text], ["mask mode", m.mask_mode], ["unit", m.mask_unit],
      ["vision attention", ds.images.length ? m.vision_attention : ""],
      ...(ds.spec.options || []).map((k) => [k, Array.isArray(m[k]) ? m[k].join(", ") : m[k]]),
      ["steps", ds.steps.length], ["layers", ds.layers.length], ["rows", ds.n],
      ["missing values", ds.notFinite.missing ? `${ds.notFinite.missing} rows (NaN or empty)` : ""],
      ["infinite values", ds.notFinite.infinite ? `${ds.notFinite.infinite} rows` : ""],
    ];
    if (!ds.meta) items.push(["metadata", "none (load NAME.meta.json together with a CSV)"]);
    if (ds.example) {
      items.splice(1, 0, ...ds.example.values.map(([k, v]) => [k, v === null || v === undefined ? "(missing)" : v]));
      const label = document.createElement("label");
      label.append(`example (${ds.examples.length} in the file): `);
      const select = document.createElement("select");
      select.id = "example";
      for (const e of ds.examples) {
        const option = document.createElement("option");
        option.value = e.id;
        option.textContent = e.id;  // text, never HTML
        select.append(option);
      }
      select.value = ds.example.id;
      select.disabled = !ds.choose;
      select.addEventListener("change", () => ds.choose && ds.choose(select.value));
      label.append(select);
      holder.append(label);
    }
    for (const [k, v] of items) {
      if (v === undefined || v === null || v === "") continue;
      const span = document.createElement("span");
      const b = document.createElement("b");
      b.textContent = `${k}: `;
      span.append(b, String(v));
      span.title = String(v);
      holder.append(span);
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
        // Below right of the pointer; above it, or left of it, where the window ends.
        const below = evt.clientY + 14, above = evt.clientY - 8 - tip.offsetHeight;
        const x = Math.min(evt.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
        const y = below + tip.offsetHeight > window.innerHeight - 4 ? above : below;
        tip.style.left = `${Math.max(0, x)}px`;
        tip.style.top = `${Math.max(0, Math.min(y, window.innerHeight - tip.offsetHeight - 4))}px`;
      },
      hide() { tip.style.display = "none"; },
    };
  }

  // Arrow keys (and letters) whenever focus is not in a text field; sliders keep their own arrows.
  function wireKeys(handlers) {
    document.addEventListener("keydown", (e) => {
      const t = e.target;
      const typing = t.isContentEditable || t.tagName === "TEXTAREA" ||
        (t.tagName === "INPUT" && !["checkbox", "radio", "file", "button", "submit", "range", "color"].includes(t.type));
      if (typing || (t.tagName === "INPUT" && t.type === "range" && e.key.startsWith("Arrow"))) return;
      const handler = handlers[e.key] || handlers[e.key.toLowerCase()];
      if (!handler || e.ctrlKey || e.metaKey || e.altKey) return;
      e.preventDefault();
      handler();
    }, true);
  }

  // A slider over a list of values, with the value shown next to it.
  function slider(input, output, values, onChange) {
    input.min = "0";
    input.max = String(Math.max(0, values.length - 1));
    input.step = "1";
    input.disabled = values.length <= 1;
    const show = () => { output.textContent = String(values[Number(input.value)] ?? "–"); };
    input.oninput = () => { show(); onChange(Number(input.value)); };
    return {
      set(index) { input.value = String(index); show(); },
    };
  }

  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fillSelect(select, values, label = (v) => String(v)) {
    const previous = select.value;
    select.replaceChildren(...values.map((v) => el("option", { value: String(v) }, label(v))));
    if (values.map(String).includes(previous)) select.value = previous;
  }

  // The next option of a select (wrapping round); false when there is nothing to change.
  function nextOption(select) {
    if (select.disabled || !select.options.length) return false;
    select.selectedIndex = (select.selectedIndex + 1) % select.options.length;
    return true;
  }

  // A newly loaded result on either page: header, metric and series choices, the two sliders (by id).
  function showDataset(ds, state, render) {
    $("compare-mode").disabled = true;
    $("compare-message").textContent = "";
    showRankCorrelation(ds, null);
    header($("meta"), ds);
    if ($("question")) $("question").textContent = ds.spec.question;  // what this file's measure answers
    $("series-label").textContent = ds.spec.seriesLabel;
    $("layer-label").textContent = ds.spec.rows.label;
    fillSelect($("metric"), ds.metrics.map((m) => m.key), (k) => ds.metrics.find((m) => m.key === k).label);
    fillSelect($("series"), ds.series);
    $("normalise").value = ds.spec.normalise;
    state.layerIndex = 0;
    state.stepIndex = 0;
    const sliders = {
      layer: slider($("layer"), $("layer-value"), ds.layers, (i) => { state.layerIndex = i; render(); }),
      step: slider($("step"), $("step-value"), ds.steps, (i) => { state.stepIndex = i; render(); }),
    };
    sliders.layer.set(0);
    sliders.step.set(0);
    $("export").disabled = false;
    return sliders;
  }

  // Whether a second result can be compared with the first; says why not, what matched, and what differs.
  function acceptComparison(a, b) {
    const match = matchOf(a, b);
    const axes = a.spec.rows.axis === b.spec.rows.axis ? "" :
      `A's rows are ${a.spec.rows.axis}s and B's ${b.spec.rows.axis}s: one number is not the same place in both`;
    const refusal = axes || gridsDiffer(a, b) || (match.cells ? "" : match.why);
    if (refusal) {
      $("compare-message").textContent = `Not compared: ${refusal}.`;
      return false;
    }
    // Two measures' numbers have no common unit: A and B side by side and their rank correlation, no A - B.
    const same = a.kind === b.kind;
    $("compare-mode").disabled = false;
    for (const option of $("compare-mode").options) option.disabled = option.value === "A-B" && !same;
    $("compare-mode").value = same ? "A-B" : "B";
    const differences = metadataDifferences(a, b);
    const matched = match.cells === match.total ? `Every cell of A has its match in B (${match.total}).` :
      `${match.cells} of ${match.total} cells of A have a match in B (units ${match.units} of ${a.units.length}, ` +
      `layers ${match.layers} of ${a.layers.length}); the others are grey.`;
    const run = a.meta && b.meta && a.meta.run_id && a.meta.run_id === b.meta.run_id ? " (one run)" : "";
    const measures = same ? "" : `A is a ${a.kind} result, B a ${b.kind} result${run}. `;
    $("compare-message").textContent = `A: ${a.fileName}, B: ${b.fileName}. ${measures}${matched} ` +
      (differences.length ? `What differs: ${differences.join("; ")}` : "The metadata agree.");
    document.body.dataset.compareCells = `${match.cells}/${match.total}`;
    return true;
  }

  // Cells of A (layer x unit) that B holds too: units match on kind and positions, layers on their number.
  function matchOf(a, b) {
    const bUnits = new Set(b.units.map((u) => u.key)), bLayers = new Set(b.layers);
    const units = a.units.filter((u) => bUnits.has(u.key)).length, layers = a.layers.filter((l) => bLayers.has(l)).length;
    const kinds = (ds) => {
      const count = new Map();
      for (const u of ds.units) count.set(u.kind, (count.get(u.kind) || 0) + 1);
      return [...count].map(([k, n]) => `${n} ${k}`).join(", ");
    };
    const why = !units ? `none of A's units is a unit of B (A: ${kinds(a)}; B: ${kinds(b)})` :
      `no layer of A is a layer of B (A: ${a.layers[0]}-${a.layers[a.layers.length - 1]}, ` +
      `B: ${b.layers[0]}-${b.layers[b.layers.length - 1]})`;
    return { units, layers, cells: units * layers, total: a.units.length * a.layers.length, why };
  }

  // Where an exported picture came from: the file(s), model and prompt (step and series are in the caption).
  function provenance(ds, other) {
    const m = ds.meta || {};
    const parts = [`file ${ds.fileName || "?"}${other ? ` (B: ${other.fileName || "?"})` : ""}`];
    if (m.model) parts.push(`model ${m.model}`);
    if (m.prompt) parts.push(`prompt "${short(showText(m.prompt), 90)}"`);
    if (m.run_id) parts.push(`run ${m.run_id}`);
    return parts.join("  ·  ");
  }

  // An export canvas at 2x whose texts are recorded (text, box in the picture's pixels): the tests read them.
  function exportCanvas(width, height) {
    const canvas = document.createElement("canvas");
    canvas.width = width * 2; canvas.height = height * 2;
    const ctx = canvas.getContext("2d");
    ctx.scale(2, 2);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    const texts = [], fillText = ctx.fillText.bind(ctx);
    ctx.fillText = (text, x, y) => {
      fillText(text, x, y);
      const t = ctx.getTransform(), w = ctx.measureText(text).width, size = Number((/(\d+)px/.exec(ctx.font) || [0, 12])[1]);
      const dx = ctx.textAlign === "right" ? -w : ctx.textAlign === "center" ? -w / 2 : 0;
      const dy = ctx.textBaseline === "middle" ? -size / 2 : ctx.textBaseline === "top" ? 0 : -size;
      const corners = [[x + dx, y + dy], [x + dx + w, y + dy + size]]
        .map(([px, py]) => [(t.a * px + t.c * py + t.e) / 2, (t.b * px + t.d * py + t.f) / 2]);
      texts.push({ text: String(text), x0: Math.min(corners[0][0], corners[1][0]), x1: Math.max(corners[0][0], corners[1][0]),
        y0: Math.min(corners[0][1], corners[1][1]), y1: Math.max(corners[0][1], corners[1][1]), rotated: t.b !== 0 });
    };
    return { canvas, ctx, texts };
  }

  // Words laid into lines no wider than `width` (in ctx's font).
  function wrapText(ctx, text, width) {
    const lines = [];
    let line = "";
    for (const word of String(text).split(/\s+/)) {
      const next = line ? `${line} ${word}` : word;
      if (line && ctx.measureText(next).width > width) { lines.push(line); line = word; } else line = next;
    }
    if (line) lines.push(line);
    return lines;
  }

  // Save a canvas as a PNG download.
  function download(canvas, name) {
    const link = document.createElement("a");
    link.download = name;
    link.href = canvas.toDataURL("image/png");
    link.click();
  }

  return {
    tip: tooltip(), ratio, seriesUnits, counterpart, rankCorrelations, showRankCorrelation, spearman, maxOf, minOf, value, number, aspectOf, loadFiles, wireFileInput, view, compareView, metadataDifferences, gridsDiffer, rangeOf,
    mergeRanges, cellsOf, centred, position, valueAtPosition, colour, rgb, colourBar, drawColourBar, drawGradient, barLabels, fmt,
    showText, unitLabel, positionsText, describe, header, wireKeys, slider, el, fillSelect, download, readParquet,
    showDataset, acceptComparison, nextOption, provenance, exportCanvas, wrapText, colourBarHeight,
    readJson, readCsv, parseCsv, short,
  };
})();
