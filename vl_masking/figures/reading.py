"""Reading result files: a file's table, metadata and schema as a Result (a file written before schemas read as
the layer measure), checked where each row sits; a metric's values and one step's rows of one series.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UsageError
from ..measures import MEASURES, schema_of
from ..reader_rules import ratio, short_label
from ..results import NoMetadata, read_metadata, read_table

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
    def rows_axis(self) -> str:
        """What a row's number counts (files written before the axis was declared: decoder layers)."""
        return self.schema["rows"].get("axis", "decoder layer")

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
    from ..study import read_study

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


def default_series(result: Result) -> str:
    """The first series (in the schema's order) whose rows are units, not one group: Full, Mean, the first flow."""
    table = result.table
    present = [str(s) for s in table[result.series_column].unique()]
    order = [s for s in result.schema["series"]["order"] if s in present] or present
    with_units = set(table[table.unit_kind.astype(str) != "group"][result.series_column].astype(str))
    return next((s for s in order if s in with_units), order[0])


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


def _layer_list(layers: list) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ", ".join(
        map(str, layers))
