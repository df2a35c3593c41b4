"""Several prompts: the per-layer mean over prompts with a percentile-bootstrap interval (the prompts resampled),
which files are one run and which sets of runs are alike enough to average.
"""

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UsageError
from .reading import Result, metric_values, pick

BOOTSTRAP = 2000  # resamples of the prompts for a mean's interval (seeded: the same figure every time)


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
