"""Figures from result files (never by re-running a model): matplotlib, headless.

    python -m vl_masking.figures output/demo.parquet --image examples/piggy.png --out figs/
    python -m vl_masking.figures output/*.parquet --out figs/ --name batch     # several prompts: aggregate

For one file: (1) the image under its heat for every layer (small multiples, one colour
bar), (2) the layer x unit heatmap, (3) for flow files the curves of every flow across
layers, (4) one layer's heads. For several files: the per-layer mean over prompts with a
95% percentile-bootstrap interval (the prompts resampled) for text and image units, or for
each flow, and the table NAME.summary.parquet / .csv (layer, group, mean, low, high, n).
Every figure carries a caption line: model, prompt, step, variant or flow, metric,
normalisation.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UsageError
from .measures import MEASURES, schema_of
from .reader_rules import ratio, short_label, show_text, spearman
from .results import NoMetadata, read_metadata, read_table

DPI = 100
BOOTSTRAP = 2000  # resamples of the prompts for a mean's interval (seeded: the same figure every time)


@dataclass
class Result:
    """One result file: its table, its metadata, and the schema of its measure (from the metadata)."""

    path: Path
    table: pd.DataFrame
    meta: dict
    schema: dict

    @property
    def measure(self) -> str:
        return self.schema["measure"]

    @property
    def series_column(self) -> str:
        return self.schema["series"]["column"]

    @property
    def metrics(self) -> dict:
        return {m["key"]: m for m in self.schema["metrics"]}

    def metric(self, key: str) -> dict:
        return self.metrics[key]

    @property
    def short_labels(self) -> dict:
        """kind|positions -> the unit's short label, as the tool wrote it into the metadata's unit list."""
        return {f"{u['kind']}|{','.join(map(str, u['positions']))}": u["short"]
                for u in self.meta.get("units") or [] if "short" in u}

    @property
    def rows_label(self) -> str:
        return self.schema["rows"]["label"]

    @property
    def curves_per_series(self) -> bool:
        """Curves across layers: one per series (every flow), or the chosen series' image and text units."""
        return self.schema.get("curves") == "series"

    @property
    def name(self) -> str:
        """The file's name without its format: `demo`, or `run.layer` for one measure of several."""
        name = self.path.name
        for suffix in (".parquet", ".json", ".csv"):
            name = name.removesuffix(suffix)
        return name


def load(path) -> Result:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"result file not found: {path}")
    try:
        table = read_table(path)
        meta = _metadata_or_none(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise UsageError(f"cannot read {path} as a mask-impact result ({type(exc).__name__}: {exc})") from None
    if meta is None:  # the seed's CSV, a copy re-saved by pandas: read as a file before schemas if it has its columns
        legacy = schema_of({})
        if legacy is None or not {"generation_step", "layer", legacy["series"]["column"]} <= set(table) or not any(
                all(c in table for c in (m["ratio"] or [m["column"]])) for m in legacy["metrics"]):
            raise UsageError(f"{path}: the file holds no mask-impact metadata (a copy re-saved by pandas or another "
                             "tool drops it), and not the layer measure's columns: use the file the tool wrote")
        meta = {}
    return checked(path, table, meta)


def _metadata_or_none(path: Path) -> dict | None:
    """The file's metadata; None where it has none (a Parquet re-saved by pandas, a CSV without its .meta.json)."""
    try:
        return read_metadata(path)
    except NoMetadata:
        return None
    except FileNotFoundError:
        if path.suffix == ".csv":
            return None
        raise


def load_study(directory) -> list:
    """A study directory (--dataset): one Result per example, in the order of the table."""
    from .study import read_study

    directory = Path(directory)
    table = read_study(directory)
    meta = table.attrs.pop("metadata")
    table.attrs.pop("manifest", None)
    if "example_id" not in table.columns:
        raise UsageError(f"{directory}: no example_id column: not a study directory")
    return [checked(directory / str(name), rows.reset_index(drop=True), meta)
            for name, rows in table.groupby(table.example_id.astype(str), sort=False)]


def checked(path: Path, table: pd.DataFrame, meta: dict) -> Result:
    """A result file's table and metadata as a Result: its schema known, where each row sits whole numbers."""
    if "unit" not in table.columns:  # files written before units: one token per unit
        table["unit"] = table["token_masked"].astype(str)
        table["unit_kind"] = "token"
        table["unit_positions"] = table["token_position"].astype(str)
        table["grid_rows"] = np.where(table.token_type.astype(str) == "vision", 1, -1)
        table["grid_cols"] = table["grid_rows"]
    if not len(table):
        raise UsageError(f"{path}: the file has no rows (nothing to draw)")
    schema = schema_of(meta)
    if schema is not None and "schema" not in meta:  # a file written before schemas: the metrics its columns hold
        schema = {**schema, "metrics": [m for m in schema["metrics"]
                                        if all(c in table.columns for c in (m["ratio"] or [m["column"]]))]}
    if schema is None:
        raise UsageError(f"{path}: its measure '{meta.get('measure')}' is not one this version knows "
                         f"({', '.join(MEASURES)})")
    missing = [c for c in ("generation_step", "layer", schema["series"]["column"]) if c not in table.columns]
    if missing:
        raise UsageError(f"{path}: no column {', '.join(missing)}, which its {schema['measure']} schema names")
    for column in WHOLE_NUMBER_COLUMNS:  # where a row sits: an empty field there leaves it nowhere
        if column not in table.columns:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() | (values.to_numpy() % 1 != 0))
        if len(bad):
            raise UsageError(f"{path}: row {bad[0] + 1}: {column} is {_shown(table[column].iloc[bad[0]])}, not a "
                             f"whole number ({len(bad)} such row{'s' if len(bad) > 1 else ''}); a missing value is "
                             "allowed in the metric columns only")
        table[column] = values.astype(np.int64)
    return Result(path, table, meta, schema)


WHOLE_NUMBER_COLUMNS = ("generation_step", "layer", "token_position", "image_index", "grid_row", "grid_col",
                        "grid_rows", "grid_cols", "window_start", "window_end")


def _shown(value) -> str:
    return "an empty field" if pd.isna(value) or str(value).strip() == "" else repr(str(value)[:40])


def metric_values(result: Result, metric: str) -> pd.Series:
    spec = result.metric(metric)
    if spec["ratio"]:  # a ratio of two columns: 0 / 0 reads 0, x / 0 missing
        top = result.table[spec["ratio"][0]].to_numpy(np.float64)
        bottom = result.table[spec["ratio"][1]].to_numpy(np.float64)
        return pd.Series(ratio(top, bottom), index=result.table.index)
    return result.table[spec["column"]].astype(np.float64)


def metric_columns(result: Result, metric: str) -> list:
    spec = result.metric(metric)
    return list(spec["ratio"]) if spec["ratio"] else [spec["column"]]


def pick(result: Result, step: int, series: str, metric: str) -> pd.DataFrame:
    """The rows of one step and one series (a variant, a flow), with a `value` column."""
    table = result.table
    column = result.series_column
    rows = table[(table.generation_step == step) & (table[column].astype(str) == series)].copy()
    if rows.empty:
        raise UsageError(f"{result.path}: no rows for step {step} and {column} {series}")
    rows["value"] = metric_values(result, metric)[rows.index]
    return rows


def caption(result: Result, step: int, series: str, metric: str, normalise: str, what: str | None = None) -> str:
    meta = result.meta
    prompt = " ".join(str(meta.get("prompt", "")).split())
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    what = what or result.schema["series"]["label"]
    return (f"{meta.get('model', '?')} | \"{prompt}\" | step {step} | {what} {series} | "
            f"{result.metric(metric)['label']} | {normalise}")


def set_title(fig, text: str, fontsize: float = 8) -> None:
    """The caption line, wrapped to the figure's width (a narrow figure never cuts it off)."""
    import textwrap

    per_line = max(20, int(fig.get_figwidth() * 72 / (fontsize * 0.6)))  # a character is about 0.6 em wide
    fig.suptitle("\n".join(textwrap.wrap(text, per_line, break_long_words=True)), fontsize=fontsize)


def unit_label(row, result: "Result") -> str:
    """The short label the tool wrote for this row's unit (reader_rules.short_label); for a unit the metadata does
    not list (a flow's group source) or a file written before labels, the same rule on the row."""
    key = f"{row.unit_kind}|{row.unit_positions}"
    if key in result.short_labels:
        return result.short_labels[key]
    unit = {"kind": str(row.unit_kind), "label": str(row.unit), "token_type": str(row.token_type),
            "image_index": int(row.image_index), "grid_row": int(row.grid_row), "grid_col": int(row.grid_col),
            "grid_rows": int(row.grid_rows), "grid_cols": int(row.grid_cols)}
    views = {v.get("index"): v for v in result.meta.get("images") or []}
    return short_label(unit, views.get(unit["image_index"]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _norm(values: np.ndarray, signed: bool, mode: str):
    from matplotlib import colors

    finite = values[np.isfinite(values)]
    if not finite.size:
        return colors.Normalize(0, 1)
    lo, hi = float(finite.min()), float(finite.max())
    if signed:
        m = max(abs(lo), abs(hi)) or 1.0
        return colors.TwoSlopeNorm(0.0, -m, m) if mode == "linear" else colors.SymLogNorm(m / 100, vmin=-m, vmax=m)
    if hi <= lo:
        hi = lo + 1e-12
    return colors.PowerNorm(0.5, lo, hi) if mode == "sqrt" else colors.Normalize(lo, hi)


def _cmap(signed: bool):
    return "RdBu_r" if signed else "viridis"


# -- (2) the layer x unit heatmap ---------------------------------------------------------------

def heatmap(result: Result, step: int, series: str, metric: str, normalise: str = "global", scaling: str = "linear"):
    """Rows = layers (window centres), columns = units; returns (figure, the drawn matrix, its axes)."""
    plt = _pyplot()
    rows = pick(result, step, series, metric)
    units = rows.drop_duplicates(["unit_kind", "unit_positions"]).sort_values("token_position", kind="stable")
    key = units.unit_kind.astype(str) + "|" + units.unit_positions.astype(str)
    order = {k: i for i, k in enumerate(key)}
    layers = sorted(rows.layer.unique())
    matrix = np.full((len(layers), len(units)), np.nan)
    at = (rows.unit_kind.astype(str) + "|" + rows.unit_positions.astype(str)).map(order).to_numpy()
    matrix[np.searchsorted(layers, rows.layer.to_numpy()), at] = rows.value.to_numpy()
    signed = result.metric(metric)["signed"]
    shown = matrix.copy()
    if normalise == "layer" and not signed:  # each row from its own minimum to its maximum
        lo, hi = np.nanmin(shown, axis=1, keepdims=True), np.nanmax(shown, axis=1, keepdims=True)
        shown = (shown - lo) / np.where(hi > lo, hi - lo, 1)
    width = min(24, max(6, 0.22 * len(units) + 2))
    height = min(14, max(3, 0.3 * len(layers) + 2.2))
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI, constrained_layout=True)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=_cmap(signed),
                      norm=_norm(shown, signed, scaling))
    labels = [unit_label(r, result) for r in units.itertuples()]
    ax.set_xticks(range(len(units)), labels, rotation=90, fontsize=7, fontfamily="monospace")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel(result.rows_label)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(result.metric(metric)["label"] + (" (each layer min..max)" if normalise == "layer" and not signed
                                                    else ""))
    set_title(fig, caption(result, step, series, metric, _normalise_text(normalise)))
    return fig, matrix, ax


def _normalise_text(normalise: str) -> str:
    return {"layer": "normalised per layer", "step": "one scale for this step", "global": "one scale for the figure"}[
        normalise]


# -- (1) the image under its heat, every layer --------------------------------------------------

def image_grid(rows: pd.DataFrame, image: dict, layer: int) -> np.ndarray:
    """(grid rows, grid cols) values of one layer's units over one image's merged token grid."""
    grid = np.full((image["grid_rows"], image["grid_cols"]), np.nan)
    vision = rows.token_type.astype(str) == "vision"
    mine = rows[(rows.layer == layer) & (rows.image_index == image["index"]) & vision]
    spans = mine[mine.unit_kind.astype(str).isin(["span", "group"])]
    regular = mine[~mine.index.isin(spans.index)]
    for r in regular.itertuples():
        grid[r.grid_row: r.grid_row + max(1, r.grid_rows), r.grid_col: r.grid_col + max(1, r.grid_cols)] = r.value
    return grid


def mapped_view(images: list) -> dict:
    """The grid the image maps draw: the first picture's, or where it was cut into tiles, its thumbnail
    (the view that covers all of it)."""
    first = [v for v in images if v.get("picture", v["index"]) == images[0].get("picture", images[0]["index"])]
    whole = [v for v in first if not v.get("region")]
    return whole[0] if len(first) > 1 and whole else images[0]


def load_picture(result: Result, image_path, image: dict | None = None):
    """The picture under a view's grid (the first image's by default), from --image or the metadata's path: as
    the tool saw it (EXIF orientation applied), and only the part the grid covers where the processor cut it
    (the region: a crop, or a tile)."""
    from .inputs import open_image

    image = image or (result.meta.get("images") or [{}])[0]
    path = image_path or image.get("path")
    if not path or not Path(path).is_file():
        return None
    picture = open_image(str(path))
    region = image.get("region")
    if region:
        scale_x, scale_y = picture.width / (image.get("width") or picture.width), picture.height / (
            image.get("height") or picture.height)
        box = tuple(int(round(v * s)) for v, s in zip(region, (scale_x, scale_y, scale_x, scale_y)))
        picture = picture.crop(box)  # outside the picture (padding): black, as Pillow fills it
    return np.asarray(picture)


def covered_aspect(image: dict) -> float:
    """Height over width of what the grid covers: its region, else the picture, else the grid."""
    region = image.get("region")
    if region:
        return (region[3] - region[1]) / (region[2] - region[0])
    return (image.get("height") or image["grid_rows"]) / (image.get("width") or image["grid_cols"])


PICTURE_MODES = ("outline", "grey", "colour")


def underlay(picture: np.ndarray | None, mode: str) -> tuple:
    """(what is drawn under the heat, the heat's opacity, what is drawn over it) for one --picture mode.

    outline (the default): the heat opaque, so every cell has exactly its colour-bar colour, and the
    picture's edges drawn over it in black; grey: the picture in light greys under a 60 % heat, so
    that no hue of the picture mixes with the palette (a pink animal under a blue scale reads as
    neither); colour: the picture as it is under a 60 % heat.
    """
    if picture is None:
        return None, 1.0, None
    if mode == "colour":
        return dict(X=picture), 0.6, None
    rgb = picture[..., :3].astype(float) if picture.ndim == 3 else np.repeat(picture[..., None], 3, -1).astype(float)
    luminance = (rgb @ np.array([0.299, 0.587, 0.114])) / 255.0  # ITU-R 601, as Pillow's "L"
    if mode == "grey":
        return dict(X=0.45 + 0.55 * luminance, cmap="gray", vmin=0, vmax=1), 0.6, None
    dy, dx = np.gradient(luminance)
    edges = np.hypot(dx, dy)
    strong = edges > max(0.04, np.quantile(edges, 0.9))  # the sharpest tenth, never flat noise
    over = np.zeros(edges.shape + (4,))
    over[..., 3] = np.where(strong, 0.85, 0.0)  # black where the picture has an edge, clear elsewhere
    return None, 1.0, dict(X=over)


def small_multiples(result: Result, image: dict, panels: list, signed: bool, scaling: str, image_path, columns: int,
                    inches: float, label: str, title: str, picture_mode: str = PICTURE_MODES[0], marks=()):
    """One image's grids as small multiples (the picture under each), one shared colour bar. panels: [(title, grid)];
    marks: (row, col) cells outlined on every panel (--mark: where the evidence is)."""
    plt = _pyplot()
    norm = _norm(np.concatenate([grid.ravel() for _, grid in panels]), signed, scaling)
    under, alpha, over = underlay(load_picture(result, image_path, image), picture_mode)
    columns = min(columns, len(panels))
    lines = math.ceil(len(panels) / columns)
    aspect = covered_aspect(image)
    fig, axes = plt.subplots(lines, columns, figsize=(inches * columns + 1.2, inches * aspect * lines + 0.9), dpi=DPI,
                             squeeze=False, constrained_layout=True)
    extent = (0, image["grid_cols"], image["grid_rows"], 0)
    # a cell's height over its width on the picture: 1 for Qwen-VL's square patches, not for a grid that a
    # processor stretched over the picture (Gemma 3's 16 x 16 on any shape): the picture keeps its shape
    cell = aspect * image["grid_cols"] / image["grid_rows"]
    for ax, (name, grid) in zip(axes.ravel(), panels):
        if under is not None:
            ax.imshow(**under, extent=extent, interpolation="bilinear", aspect=cell)
        drawn = ax.imshow(grid, extent=extent, cmap=_cmap(signed), norm=norm, alpha=alpha, interpolation="nearest",
                          aspect=cell)
        if over is not None:
            ax.imshow(**over, extent=extent, interpolation="nearest", aspect=cell)
        for row, col in marks:
            ax.add_patch(plt.Rectangle((col, row), 1, 1, fill=False, edgecolor="#00c853", linewidth=2.5))
        ax.set_title(name, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.colorbar(drawn, ax=axes, shrink=0.8, label=label)
    set_title(fig, title)
    return fig


def layer_multiples(result: Result, step: int, series: str, metric: str, image_path=None, layers=None,
                    scaling: str = "linear", picture_mode: str = PICTURE_MODES[0], marks=()):
    """Every layer's map of the first image (the picture under it), small multiples with one colour bar."""
    images = result.meta.get("images") or []
    if not images:
        raise UsageError(f"{result.path}: the run has no image (a text-only prompt): no image maps to draw")
    rows = pick(result, step, series, metric)
    rows = rows[rows.unit_kind.astype(str) != "group"]
    layers = [x for x in sorted(rows.layer.unique()) if layers is None or x in layers]
    name = result.schema["rows"]["short"]
    view = mapped_view(images)
    panels = [(f"{name} {layer}", image_grid(rows, view, layer)) for layer in layers]
    spec = result.metric(metric)
    return small_multiples(result, view, panels, spec["signed"], scaling, image_path, 6, 2.2, spec["label"],
                           caption(result, step, series, metric, "one scale for every layer"), picture_mode, marks)


# -- (4) one layer's heads ---------------------------------------------------------------------

def heads(result: Result, step: int, layer: int, metric: str, image_path=None, scaling: str = "linear",
          picture_mode: str = PICTURE_MODES[0]):
    images = result.meta.get("images") or []
    variants = sorted({str(v) for v in result.table.variant.unique() if str(v).startswith("Head_")},
                      key=lambda v: int(v.split("_")[1]))
    if not images or not variants:
        raise UsageError(f"{result.path}: the heads figure needs an image and Head_h variants")
    view = mapped_view(images)
    panels = [(v.replace("_", " "), image_grid(pick(result, step, v, metric), view, layer)) for v in variants]
    return small_multiples(result, view, panels, result.metric(metric)["signed"], scaling, image_path, 8, 1.8,
                           result.metric(metric)["label"], caption(result, step, f"heads of layer {layer}", metric, "one scale for every head"),
                           picture_mode)


# -- (3) curves of every series (flow files: every flow) ------------------------------------------

def series_groups(result: Result, step: int, metric: str) -> pd.DataFrame:
    """Per (series, layer): the value of a group source, or the mean over the series' image and text units."""
    table = result.table[result.table.generation_step == step].copy()
    table["value"] = metric_values(result, metric)[table.index]
    out = []
    for flow, rows in table.groupby(table[result.series_column].astype(str), sort=False):
        if (rows.unit_kind.astype(str) == "group").all():
            part = rows.groupby("layer").value.mean().rename("value").reset_index()
            part["group"] = flow
            out.append(part)
        else:
            for kind, label in (("vision", "image units"), ("text", "text units")):
                own = rows[rows.token_type.astype(str) == kind]
                if len(own):
                    part = own.groupby("layer").value.mean().rename("value").reset_index()
                    part["group"] = f"{flow}: mean of {label}"
                    out.append(part)
    return pd.concat(out, ignore_index=True)


def series_curves(result: Result, step: int, metric: str):
    plt = _pyplot()
    groups = series_groups(result, step, metric)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=DPI, constrained_layout=True)
    for name, rows in groups.groupby("group", sort=False):
        ax.plot(rows.layer, rows.value, marker="o", markersize=3, label=name)
    spec = result.metric(metric)
    if spec["signed"]:
        ax.axhline(0, color="#888", linewidth=0.8)
    ax.set_xlabel(result.rows_label)
    ax.set_ylabel(spec["label"])
    _integer_layers(ax)
    ax.legend(fontsize=8)
    settings = ", ".join(f"{k} {result.meta[k]}" for k in result.schema.get("options", ()) if
                         isinstance(result.meta.get(k), (int, float, str)))
    set_title(fig, caption(result, step, settings, metric, "values as measured",
                           what=f"every {result.schema['series']['label']},"))
    return fig


def _integer_layers(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- several files: aggregate over prompts ------------------------------------------------------

def mean_interval(x: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP) -> tuple:
    """(mean, low, high): the mean of the prompts' values and its percentile-bootstrap interval (the prompts
    resampled with replacement). A bootstrap mean lies inside the values' own range, so the interval never
    crosses a value the metric cannot take (a negative KL, a probability above one, a change below -100%),
    as a t interval can for a skewed metric. NaN bounds for fewer than two values."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(0)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def per_prompt_means(result: Result, step: int, series: str, metric: str, evidence=None) -> pd.DataFrame:
    """(layer, group, value): a prompt's own mean per layer, for text and image units or for each flow. evidence:
    (row column, col column) of the table naming a cell per example (pictures.jsonl's evidence_row and
    evidence_col): the image units split into that cell and the other cells."""
    if result.curves_per_series and series is None:
        return series_groups(result, step, metric)
    rows = pick(result, step, series, metric)
    vision = rows.token_type.astype(str) == "vision"
    rows["group"] = np.where(vision, "image units", "text units")
    if evidence is not None:
        cell = (rows.grid_row.to_numpy() == rows[evidence[0]].to_numpy()) & \
               (rows.grid_col.to_numpy() == rows[evidence[1]].to_numpy())
        rows["group"] = np.where(vision & cell, "the evidence cell", np.where(vision, "other image cells",
                                                                               "text units"))
    return rows.groupby(["layer", "group"]).value.mean().rename("value").reset_index()


def summarise(results: list, step: int, series: str, metric: str, evidence=None) -> pd.DataFrame:
    """(layer, group, mean, low, high, n): mean over prompts with a 95% percentile-bootstrap interval."""
    parts = []
    for k, result in enumerate(results):
        if evidence is not None and (result.table[evidence[0]] < 0).all():
            continue  # no evidence in this example (the asked object is absent)
        part = per_prompt_means(result, step, series, metric, evidence)
        part["prompt"] = k
        parts.append(part)
    values = pd.concat(parts, ignore_index=True)
    out = []
    for (layer, group), rows in values.groupby(["layer", "group"], sort=True):
        x = rows.value.to_numpy(np.float64)
        mean, low, high = mean_interval(x)
        out.append({"layer": int(layer), "group": group, "mean": mean, "low": low, "high": high,
                    "n": int(np.isfinite(x).sum())})
    return pd.DataFrame(out)


def interval_words(n) -> str:
    """What the shaded band is, said so that a panel of one example does not claim an interval it lacks."""
    if n.max() < 2:
        return "no interval (one value per point)"
    return "95% bootstrap interval" + (" (none where n = 1)" if n.min() < 2 else "")


def aggregate_curves(summary: pd.DataFrame, spec: dict, title: str, x_label: str = "layer", over: str = "prompts",
                     by: str | None = None):
    """The mean curves with their intervals; with `by` (a column of the summary) one panel per value of it."""
    plt = _pyplot()
    panels = [(None, summary)] if by is None else list(summary.groupby(by, sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 4.2 * len(panels)), 4.5), dpi=DPI, sharey=True,
                             constrained_layout=True, squeeze=False)
    for ax, (value, rows) in zip(axes[0], panels):
        for group, part in rows.groupby("group", sort=False):
            line, = ax.plot(part.layer, part["mean"], marker="o", markersize=3, label=f"{group} (n={part.n.max()})")
            ax.fill_between(part.layer, part.low, part.high, color=line.get_color(), alpha=0.2, linewidth=0)
        if spec["signed"]:
            ax.axhline(0, color="#888", linewidth=0.8)
        if value is not None:
            ax.set_title(f"{by} = {show_text(str(value))}", fontsize=9)
        ax.set_xlabel(x_label)
        _integer_layers(ax)
        ax.legend(fontsize=7)
    band = interval_words(summary.n)
    axes[0][0].set_ylabel(f"{spec['label']}: mean over {over},\n{band}"
                          + (f" ({BOOTSTRAP} resamples)" if summary.n.max() >= 2 else ""))
    set_title(fig, title)
    return fig


# -- the command line ---------------------------------------------------------------------------

class Staged:
    """Figures and tables written under temporary names, renamed into place only when every one is done:
    a run of the figures that fails half-way (exit 2) leaves nothing behind, not even the --out directory it
    made."""

    def __init__(self, out: Path):
        self.out, self.pending = out, []
        self.made = not out.exists()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()  # writable: said now, not after the drawing
        except OSError as exc:
            self.discard()
            raise UsageError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})") from None

    def path(self, name: str) -> Path:
        final = self.out / name
        temp = final.with_name(f".{final.name}.figures-tmp")
        self.pending.append((temp, final))
        return temp

    def commit(self) -> list:
        for temp, final in self.pending:
            os.replace(temp, final)
        written, self.pending = [str(final) for _, final in self.pending], []
        self.made = False
        return written

    def discard(self) -> None:
        for temp, _ in self.pending:
            temp.unlink(missing_ok=True)
        self.pending = []
        if self.made:
            try:
                self.out.rmdir()  # made by this run and left empty
            except OSError:
                pass

    @contextmanager
    def writing(self):
        """The figures' writes: an OSError (a full disk, a read-only file system) is one line; on any failure
        nothing is left."""
        try:
            yield self
        except OSError as exc:
            raise UsageError(f"--out {self.out}: cannot write the figures ({exc.strerror or type(exc).__name__})") \
                from None
        finally:
            self.discard()


def save(fig, staged: Staged, stem: str, formats) -> None:
    for fmt in formats:
        fig.savefig(staged.path(f"{stem}.{fmt}"), format=fmt, dpi=DPI)
    _pyplot().close(fig)


@dataclass
class Run:
    """One run, however many of its formats were given: the first file read stands for the others."""

    result: Result
    files: list

    @property
    def measure(self) -> str:
        return self.result.measure

    def describe(self) -> str:
        also = f" (also {', '.join(str(f) for f in self.files[1:])})" if len(self.files) > 1 else ""
        return f"{self.files[0]}{also}"


def run_identity(result: Result) -> str:
    """The run and measure a file belongs to: its run id (one generation, shared by the files of several
    measures) and measure, or for older files the whole metadata (the same in every format)."""
    meta = result.meta
    if meta.get("run_id"):
        return f"{meta['run_id']}|{result.measure}"
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def distinct_runs(results: list) -> list:
    runs = {}
    for result in results:
        key = run_identity(result)
        if key in runs:
            runs[key].files.append(result.path)
        else:
            runs[key] = Run(result, [result.path])
    return list(runs.values())


# What must agree for an average over prompts to mean something (the prompts and images may differ), besides
# the measure's own options (its schema names them).
ALIKE = ("model", "measure", "mask_mode", "mask_unit", "text_unit", "vision_attention", "num_layers")


def alike(run: Run) -> tuple:
    return ALIKE + tuple(run.result.schema.get("options", ()))


def settings_of(run: Run) -> tuple:
    return tuple(json.dumps(run.result.meta.get(key), sort_keys=True) for key in alike(run))


def sets_to_average(runs: list, log) -> dict:
    """measure -> the runs averaged together: those of one measure made with the same settings.

    A run that differs from the others is drawn on its own and not averaged (said in a line); two or
    more sets of like runs of one measure are refused, since one summary of them would mix them.
    """
    sets = {}
    for run in runs:
        sets.setdefault(run.measure, {}).setdefault(settings_of(run), []).append(run)
    chosen = {}
    for measure, by_settings in sets.items():
        groups = [g for g in by_settings.values() if len(g) > 1]
        if len(groups) > 1:
            a, b = groups[0][0], groups[1][0]
            key = next(k for k, x, y in zip(alike(a), settings_of(a), settings_of(b)) if x != y)
            raise UsageError(f"the {measure} runs form {len(groups)} sets made with different settings ({key}: "
                             f"{a.files[0]} has {a.result.meta.get(key)}, {b.files[0]} has {b.result.meta.get(key)}); "
                             "averaging them together has no meaning: give one set per figures call")
        if groups:
            chosen[measure] = groups[0]
        alone = [g[0] for g in by_settings.values() if len(g) == 1]
        if len(alone) + sum(len(g) for g in groups) < 2:
            continue  # a single run of this measure: nothing to average
        for run in alone:
            other = groups[0][0] if groups else next(r for r in alone if r is not run)
            key = next(k for k, x, y in zip(alike(run), settings_of(run), settings_of(other)) if x != y)
            log(f"not averaged (its {key} differs from the other {measure} runs'): {run.describe()}")
    return chosen


def parse_args(argv, prog: str = "python -m vl_masking.figures"):
    from .options import _OneLineParser

    parser = _OneLineParser(prog=prog, description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="result files (.parquet, .json, .csv), or globs; the formats of "
                                                 "one run count once; or a study directory (--dataset)")
    parser.add_argument("--group-by", metavar="COLUMN", help="with a study directory: one panel per value of this "
                        "column of the table (type, say), and the summary per value")
    parser.add_argument("--image", help="the picture (default: the path recorded in the metadata)")
    parser.add_argument("--evidence", metavar="ROW_COLUMN,COL_COLUMN",
                        help="with a study directory: the columns naming each example's evidence cell (planted "
                             "pictures: evidence_row,evidence_col); the curves split the image units into that "
                             "cell and the others")
    parser.add_argument("--picture", default=PICTURE_MODES[0], choices=PICTURE_MODES,
                        help="the picture in the image maps: its edges over an opaque heat (every cell keeps its "
                             "colour-bar colour), in greys under the heat, or in colour under it")
    parser.add_argument("--layers", help="layers of the small multiples, e.g. 0-3,8 (default: all)")
    parser.add_argument("--mark", action="append", metavar="ROW,COL",
                        help="outline this cell of the image maps (repeatable): where the evidence is")
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--variant", default=None, help="the series of the maps: a variant (Full, Attn, Head_h; "
                                                        "attention files Mean, Block, Head_h) or a flow (default: the first)")
    parser.add_argument("--metric", default=None, help="; ".join(
        f"{m.name} files: {', '.join(x.key for x in m.metrics)} (default {m.metrics[0].key})"
        for m in MEASURES.values()))
    parser.add_argument("--heads-layer", type=int, default=None, help="the layer of the heads figure (default: middle)")
    parser.add_argument("--normalise", default="global", choices=("layer", "step", "global"),
                        help="heatmap colours: each layer on its own, or one scale")
    parser.add_argument("--scaling", default="linear", choices=("linear", "sqrt"))
    parser.add_argument("--format", default="png", help="any of png,svg,pdf")
    parser.add_argument("--out", default="output/figures", help="output directory (made if missing)")
    parser.add_argument("--name", default=None, help="with several runs: base name of the summary (default: "
                        "aggregate, or the study directory's name)")
    return parser.parse_args(argv)


def main(argv=None, log=None, prog: str = "python -m vl_masking.figures") -> list:
    """Draw every figure; returns the paths written. Nothing is written unless everything succeeds."""
    from .options import layer_ranges

    log = log or (lambda line: print(line, file=sys.stderr))
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    studies = [Path(p) for p in args.files if Path(p).is_dir()]
    if studies:
        return draw_studies(studies, args, log)
    if args.group_by:
        raise UsageError("--group-by groups the examples of a study: give a study directory (--dataset's output)")
    files = []
    for pattern in args.files:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        matches = [m for m in matches if not m.endswith(".meta.json")]
        if not matches:
            raise UsageError(f"no result files match '{pattern}'")
        files += matches
    formats = output_formats(args)
    if not files:
        raise UsageError("no result files given")
    if args.image and not Path(args.image).is_file():
        raise UsageError(f"--image {args.image}: file not found")
    wanted = None
    if args.layers:
        wanted = {x for lo, hi in layer_ranges(args.layers) for x in range(lo, hi + 1)}
    runs = distinct_runs([load(f) for f in files])
    groups = sets_to_average(runs, log)
    with Staged(Path(args.out)).writing() as staged:
        for run in runs:
            figures_of(run.result, args, formats, staged, wanted)
        scatters(runs, args, formats, staged)
        for index, (measure, group) in enumerate(groups.items()):  # with several measures, each its own name
            aggregate(group, measure, args, formats, staged, name_suffix=f"_{measure}" if index else "", log=log,
                      wanted=wanted)
        return staged.commit()


def draw_studies(directories: list, args, log) -> list:
    """Study directories: the mean over the examples of each (one panel per --group-by value) and the summary
    tables; no figure per example (a study has hundreds)."""
    if len(args.files) != len(directories):
        raise UsageError("give study directories or result files, not both")
    from .options import layer_ranges

    formats = output_formats(args)
    wanted = {x for lo, hi in layer_ranges(args.layers) for x in range(lo, hi + 1)} if args.layers else None
    with Staged(Path(args.out)).writing() as staged:
        for directory in directories:
            results = load_study(directory)
            by = args.group_by
            if by is not None and by not in results[0].table.columns:
                raise UsageError(f"--group-by {by}: {directory} has no column '{by}' (the table's columns are "
                                 "carried under their own names, or dataset_NAME where the measure has NAME)")
            runs = [Run(r, [r.path]) for r in results]
            name = args.name or directory.name
            aggregate(runs, results[0].measure, args, formats, staged, name_suffix="", log=log, name=name, by=by,
                      over="examples", wanted=wanted)
        return staged.commit()


def output_formats(args) -> list:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise UsageError(f"bad --format '{args.format}' (any of png,svg,pdf)")
    return formats


def aggregate(group: list, measure: str, args, formats, staged: Staged, name_suffix: str, log, name=None, by=None,
              over: str = "prompts", wanted=None) -> None:
    """Several prompts' runs of one measure: the mean curves and the summary table; says which files went in.
    by: a column of the tables; each value its own summary rows and panel. wanted: --layers, the layers drawn."""
    first = group[0].result
    name = (name or args.name or "aggregate") + name_suffix
    if args.metric is not None and args.metric not in first.metrics and over == "examples":
        raise UsageError(f"--metric {args.metric} does not fit {Path(group[0].files[0]).parent} (use "
                         f"{', '.join(first.metrics)})")
    metric = args.metric if args.metric in first.metrics else first.schema["metrics"][0]["key"]
    steps = sorted({int(s) for run in group for s in run.result.table.generation_step.unique()})
    if args.step not in steps:
        raise UsageError(f"--step {args.step}: the {over} have steps {_layer_list(steps)}")
    layers = sorted({int(x) for run in group for x in run.result.table.layer.unique()})
    if wanted is not None and not wanted & set(layers):
        raise UsageError(f"--layers {args.layers}: the {over} have layers {_layer_list(layers)}")
    evidence = evidence_columns(args, first, over)
    every = first.curves_per_series and evidence is None
    series = None if every else (args.variant or default_series(first))
    if by is None:
        summary = summarise([run.result for run in group], args.step, series, metric, evidence)
    else:
        parts = []
        for value, members in _grouped(group, by):
            part = summarise([run.result for run in members], args.step, series, metric, evidence)
            part.insert(0, by, value)
            parts.append(part)
        summary = pd.concat(parts, ignore_index=True)
        name = f"{name}_by_{by}"
    if wanted is not None:
        summary = summary[summary.layer.isin(wanted)].reset_index(drop=True)
    summary.to_parquet(staged.path(f"{name}.summary.parquet"), index=False)
    summary.to_csv(staged.path(f"{name}.summary.csv"), index=False)
    label = first.schema["series"]["label"]
    title = (f"{first.meta.get('model', '?')} | {len(group)} {over} | step {args.step} | "
             f"{f'every {label}' if every else f'{label} {series}'} | {first.metric(metric)['label']} | "
             f"mean and {interval_words(summary.n)} over the {over}" + (f" | by {by}" if by else ""))
    save(aggregate_curves(summary, first.metric(metric), title, x_label=first.rows_label, over=over, by=by), staged,
         f"{name}_curves", formats)
    if over == "examples":
        log(f"{name}: the mean over the {len(group)} examples of {Path(group[0].files[0]).parent}")
        return
    log(f"{name}: the mean over {len(group)} {measure} runs:")
    for run in group:
        log(f"  {run.describe()}")


def evidence_columns(args, first: Result, over: str):
    """--evidence ROW_COLUMN,COL_COLUMN: the study's columns that name each example's evidence cell."""
    if not args.evidence:
        return None
    names = [n.strip() for n in args.evidence.split(",")]
    if over != "examples" or len(names) != 2:
        raise UsageError("--evidence ROW_COLUMN,COL_COLUMN splits a study's image units into each example's evidence "
                         "cell and the others: give a study directory and two column names")
    missing = [n for n in names if n not in first.table.columns]
    if missing:
        raise UsageError(f"--evidence: the study has no column '{missing[0]}'")
    return tuple(names)


def _grouped(group: list, by: str) -> list:
    """[(value, runs)]: the examples by their value of a column (one value per example)."""
    members = {}
    for run in group:
        values = run.result.table[by].dropna().unique()
        if len(values) != 1:
            raise UsageError(f"--group-by {by}: example {run.result.path.name} has {len(values)} values of it "
                             "(a column to group by holds one value per example)")
        members.setdefault(values[0], []).append(run)
    return sorted(members.items(), key=lambda item: str(item[0]))


def default_series(result: Result) -> str:
    """The first series (in the schema's order) whose rows are units, not one group: Full, Mean, the first flow."""
    table = result.table
    present = [str(s) for s in table[result.series_column].unique()]
    order = [s for s in result.schema["series"]["order"] if s in present] or present
    with_units = set(table[table.unit_kind.astype(str) != "group"][result.series_column].astype(str))
    return next((s for s in order if s in with_units), order[0])


def figures_of(result: Result, args, formats, staged: Staged, wanted) -> None:
    metric = args.metric or result.schema["metrics"][0]["key"]
    if metric not in result.metrics:
        raise UsageError(f"--metric {metric} does not fit {result.path} (use {', '.join(result.metrics)})")
    missing = [c for c in metric_columns(result, metric) if c not in result.table.columns]
    if missing:
        raise UsageError(f"{result.path}: no column {', '.join(missing)} (the --metric {metric} reads it)")
    series_column = result.series_column
    available = [str(s) for s in result.table[series_column].unique()]
    with_units = [str(s) for s in result.table[result.table.unit_kind.astype(str) != "group"][series_column].unique()]
    series = args.variant or default_series(result)
    if series not in available:
        raise UsageError(f"{result.path}: no {series_column} '{series}' (it has {', '.join(available[:8])})")
    layers = sorted(int(x) for x in result.table.layer.unique())
    if wanted is not None and not wanted & set(layers):
        raise UsageError(f"--layers {args.layers}: {result.path} has layers {_layer_list(layers)}")
    heads_layer = None
    if result.meta.get("images") and any(str(v).startswith("Head_") for v in available):
        heads_layer = middle_layer(result, args)
    if result.meta.get("images"):
        check_picture(result, args.image)
    fig, _, _ = heatmap(result, args.step, series, metric, args.normalise, args.scaling)
    save(fig, staged, f"{result.name}_heatmap", formats)
    if result.meta.get("images") and series in with_units:  # a group-only flow has no cells to map
        save(layer_multiples(result, args.step, series, metric, args.image, wanted, args.scaling, args.picture,
                             marks(args, result)), staged, f"{result.name}_layers", formats)
        if heads_layer is not None:
            save(heads(result, args.step, heads_layer, metric, args.image, args.scaling, args.picture), staged,
                 f"{result.name}_heads_layer{heads_layer}", formats)
    if result.curves_per_series:
        save(series_curves(result, args.step, metric), staged, f"{result.name}_{series_column}s", formats)


def marks(args, result: Result) -> list:
    """--mark ROW,COL cells (outlined on the image maps), each inside the first image's grid."""
    images = result.meta.get("images") or []
    image = mapped_view(images) if images else {}
    out = []
    for text in args.mark or ():
        try:
            row, col = (int(x) for x in text.split(","))
        except ValueError:
            raise UsageError(f"--mark {text}: give ROW,COL of a cell, e.g. --mark 2,3") from None
        if not (0 <= row < image.get("grid_rows", 0) and 0 <= col < image.get("grid_cols", 0)):
            raise UsageError(f"--mark {text}: outside the {image.get('grid_rows')}x{image.get('grid_cols')} grid of "
                             f"{result.path}")
        out.append((row, col))
    return out


def middle_layer(result: Result, args) -> int:
    """--heads-layer, or the middle one of the file's layers."""
    layers = sorted(int(x) for x in result.table.layer.unique())
    layer = args.heads_layer if args.heads_layer is not None else layers[len(layers) // 2]
    if layer not in layers:
        raise UsageError(f"--heads-layer {layer}: {result.path} has layers {_layer_list(layers)}")
    return layer


# -- two measures of one run: a scatter per unit ------------------------------------------------

def unit_values(result: Result, step: int, layer: int, series: str, metric: str) -> pd.DataFrame:
    """One layer's value and token type per unit (indexed by kind|positions), the group sources left out."""
    rows = pick(result, step, series, metric)
    rows = rows[(rows.layer == layer) & (rows.unit_kind.astype(str) != "group")]
    keyed = rows.set_index(rows.unit_kind.astype(str) + "|" + rows.unit_positions.astype(str))
    return pd.DataFrame({"value": keyed.value, "vision": keyed.token_type.astype(str) == "vision"})


def scatter(a: Result, b: Result, step: int, layer: int, metrics=(None, None), series=(None, None)):
    """Per unit, one file's default metric against another's, at one layer of one run (say knockout impact
    against attention weight); returns (figure, Spearman's rho, number of units)."""
    plt = _pyplot()
    picked = []
    for result, metric, chosen in ((a, metrics[0], series[0]), (b, metrics[1], series[1])):
        metric = metric if metric in result.metrics else result.schema["metrics"][0]["key"]
        chosen = chosen or default_series(result)
        picked.append((result, metric, chosen, unit_values(result, step, layer, chosen, metric)))
    x, y = picked[0][3], picked[1][3]
    common = x.index.intersection(y.index)
    if not len(common):
        raise UsageError(f"{a.path} and {b.path} share no units at layer {layer}")
    xs, ys = x.value[common].to_numpy(np.float64), y.value[common].to_numpy(np.float64)
    rho = spearman(xs, ys)
    vision = x.vision[common].to_numpy(bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=DPI, constrained_layout=True)
    for mask, colour, label in ((vision, "#2166ac", "image units"), (~vision, "#d6604d", "text units")):
        if mask.any():
            ax.scatter(xs[mask], ys[mask], s=14, color=colour, label=f"{label} ({int(mask.sum())})")
    (ra, ma, sa, _), (rb, mb, sb, _) = picked
    ax.set_xlabel(f"{ra.measure}: {ra.metric(ma)['label']} ({sa})")
    ax.set_ylabel(f"{rb.measure}: {rb.metric(mb)['label']} ({sb})")
    ax.legend(fontsize=8)
    set_title(fig, f"{a.meta.get('model', '?')} | step {step} | layer {layer} | {len(common)} units | "
                   f"Spearman rho {rho:.3f}")
    return fig, rho, len(common)


def scatters(runs: list, args, formats, staged: Staged) -> None:
    """For the files of one run (one run id) with two measures: the scatter of the first against the others."""
    by_run = {}
    for run in runs:
        if run.result.meta.get("run_id"):
            by_run.setdefault(run.result.meta["run_id"], []).append(run)
    for same in by_run.values():
        for other in same[1:]:
            a, b = same[0].result, other.result
            layer = middle_layer(a, args)
            fig, _, _ = scatter(a, b, args.step, layer)
            save(fig, staged, f"{a.name}_vs_{b.measure}_layer{layer}", formats)


def _layer_list(layers: list) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ", ".join(
        map(str, layers))


def check_picture(result: Result, image_path) -> None:
    """The picture drawn under the grid must have the shape of the one the run saw (never stretched)."""
    image = result.meta["images"][0]
    if not image_path or not image.get("width") or not image.get("height"):
        return
    from .inputs import open_image

    try:
        width, height = open_image(str(image_path)).size
    except Exception as exc:  # noqa: BLE001 - any unreadable picture is one line
        raise UsageError(f"--image {image_path}: not a readable image ({type(exc).__name__})") from None
    if abs(width / height - image["width"] / image["height"]) > 0.02 * image["width"] / image["height"]:
        raise UsageError(f"--image {image_path} is {width}x{height} px, but image 0 of {result.path} was "
                         f"{image['width']}x{image['height']} px: another shape would be stretched over the grid")


def command(argv=None, prog: str = "python -m vl_masking.figures") -> None:
    """The figures command: the paths written on stdout; bad input one line on stderr, exit 2."""
    from .console import cli_errors

    with cli_errors():
        for path in main(argv, prog=prog):
            print(path)


if __name__ == "__main__":
    command()
