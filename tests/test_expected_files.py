"""The files of a fixed set of runs (every measure on a VL and a text model, a batch, a study) equal the ones
committed under tests/data/expected/ (tests/expected_runs.py): a change meant to change no result leaves every
row, every number to float32 rounding and the metadata (minus times, ids, versions and paths) as it was."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from transformers import AutoConfig

from conftest import run_cli
from expected_runs import EXPECTED, produce, result_files
from test_model_adapters import float32_bounds
from vl_masking.results import read_metadata, read_table

VOLATILE = {"run_id", "created_utc", "timings", "torch_version", "transformers_version", "tool_version",
            "replaces", "process", "started_utc", "finished_utc"}


@pytest.fixture(scope="module")
def written(tiny_vl_dir, tiny_text_dir, tmp_path_factory):
    return produce(tiny_vl_dir, tiny_text_dir, tmp_path_factory.mktemp("expected-runs"), run_cli)


def normalised(value, work):
    """Metadata with the volatile keys left out and the runs' own directories named by role."""
    if isinstance(value, dict):
        return {k: normalised(v, work) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalised(v, work) for v in value]
    if isinstance(value, str):  # the files were written in another checkout: its directories by role too
        value = re.sub(r"[^\s'\"]*/expected-work/runs", "<work>", value.replace(str(work), "<work>"))
        value = re.sub(r"[^\s'\"<]*/(examples/[^\s'\"]*)", r"<root>/\1", value)
        return "<model>" if "tiny-qwen3" in value and "/" in value else value
    return value


def same_metadata(new, old, where="") -> list:
    """Where old's keys differ in new (new may add keys); floats to float32 rounding of a 128-term sum."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [where]
        return [d for k in old for d in (same_metadata(new[k], old[k], f"{where}.{k}") if k in new
                                         else [f"{where}.{k} missing"])]
    if isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [where]
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in same_metadata(a, b, f"{where}[{i}]")]
    if isinstance(old, float) and isinstance(new, (int, float)):
        return [] if math.isclose(new, old, rel_tol=128 * float(np.finfo(np.float32).eps), abs_tol=1e-30) \
            else [f"{where}: {new} != {old}"]
    return [] if new == old else [f"{where}: {new!r} != {old!r}"]


def sorted_table(table: pd.DataFrame) -> pd.DataFrame:
    """A study's rows in example order (ranks and chunks may interleave them)."""
    if "example_id" not in table:
        return table
    table = table.astype({c: str for c in table.columns if isinstance(table[c].dtype, pd.CategoricalDtype)})
    return table.sort_values("example_id", kind="stable").reset_index(drop=True)


def test_the_committed_result_files_are_what_the_runs_write_today(written, tiny_vl_dir, tiny_text_dir):
    expected = result_files(EXPECTED)
    assert result_files(written) == expected
    configs = {"vl": AutoConfig.from_pretrained(tiny_vl_dir).text_config,
               "text": AutoConfig.from_pretrained(tiny_text_dir)}
    for rel in expected:
        old_path, new_path = EXPECTED / rel, written / rel
        if rel.name.endswith(".meta.json"):
            old, new = (json.loads(p.read_text()) for p in (old_path, new_path))
        elif rel.suffix == ".csv":
            old, new = (pd.read_csv(p, keep_default_na=False) for p in (old_path, new_path))
        else:
            old, new = (sorted_table(read_table(p)) for p in (old_path, new_path))
        if isinstance(old, dict):
            assert same_metadata(normalised(new, written), normalised(old, EXPECTED.parent / "expected-work" / "runs"))\
                == [], rel
            continue
        if rel.suffix == ".parquet":
            diffs = same_metadata(normalised(read_metadata(new_path), written),
                                  normalised(read_metadata(old_path), EXPECTED.parent / "expected-work" / "runs"))
            assert diffs == [], (str(rel), diffs[:5])
        assert list(new.columns) == list(old.columns), rel
        assert len(new) == len(old), rel
        config = configs["vl" if rel.parts[0] == "vl" else "text"]
        bounds = float32_bounds(old, config)
        for column in old.columns:
            a, b = new[column], old[column]
            if b.dtype.kind == "f":
                a, b = a.to_numpy(np.float64), b.to_numpy(np.float64)
                bound = bounds.get(column, config.intermediate_size * float(np.finfo(np.float32).eps)
                                   * np.nanmax(np.abs(b), initial=1.0))
                assert (np.isnan(a) == np.isnan(b)).all(), (rel, column)
                error = np.nan_to_num(np.abs(a - b) / bound)
                assert error.max(initial=0) <= 1, (str(rel), column, float(error.max()))
            else:
                assert a.astype(str).tolist() == b.astype(str).tolist(), (str(rel), column)
