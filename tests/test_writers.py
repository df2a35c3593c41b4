"""The writers: every format holds exactly the table's values and text, whatever the token text."""

import json

import numpy as np
import pandas as pd
import pytest

from vl_masking.results import read_metadata, read_table, write_results
from vl_masking.measures.layer import LAYER_COLUMNS as COLUMNS

AWKWARD_TEXTS = ["plain", ' say "hi",', "two\nlines", "<img src=x onerror=alert(1)>", "é漢字", "NaN", "", "\\"]


def awkward_table(rows=64) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    codes = np.arange(rows) % len(AWKWARD_TEXTS)
    return pd.DataFrame({
        "generation_step": np.zeros(rows, np.int32), "layer": (np.arange(rows) // 8).astype(np.int32),
        "token_position": np.arange(rows, dtype=np.int32),
        "token_masked": pd.Categorical.from_codes(codes, AWKWARD_TEXTS),
        "token_type": pd.Categorical.from_codes((codes == 1).astype(np.int8), ["text", "vision"]),
        "image_index": np.full(rows, -1, np.int32), "grid_row": np.full(rows, -1, np.int32),
        "grid_col": np.full(rows, -1, np.int32),
        "variant": pd.Categorical.from_codes(np.arange(rows) % 3, ["Full", "Attn", "Head_0"]),
        # Values across many magnitudes, including exact zeros and float32's extremes.
        "l2_distance": (rng.random(rows) * 10.0 ** rng.integers(-30, 30, rows)).astype(np.float32),
        "cosine_distance": np.r_[0.0, np.finfo(np.float32).tiny, np.finfo(np.float32).max,
                                 rng.random(rows - 3)].astype(np.float32),
        "unit": pd.Categorical.from_codes(codes, AWKWARD_TEXTS),
        "unit_kind": pd.Categorical.from_codes(np.arange(rows) % 2, ["token", "word"]),
        "unit_size": (np.arange(rows) % 2 + 1).astype(np.int32),
        "unit_positions": [f"{p},{p + 1}" if p % 2 else str(p) for p in range(rows)],
        "grid_rows": np.full(rows, -1, np.int32), "grid_cols": np.full(rows, -1, np.int32),
        "base_norm": rng.random(rows).astype(np.float32),
    })[COLUMNS]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_every_format_round_trips_text_and_float32_values_exactly(tmp_path, fmt):
    table = awkward_table()
    write_results(table, {"model": "m"}, tmp_path, "t", (fmt,))
    back = read_table(tmp_path / f"t.{fmt}")
    assert list(back.columns) == COLUMNS
    assert list(back.token_masked.astype(str)) == list(table.token_masked.astype(str))
    for column in ("l2_distance", "cosine_distance"):
        assert np.array_equal(back[column].to_numpy().astype(np.float32), table[column].to_numpy())
    for column in ("generation_step", "layer", "token_position", "grid_row"):
        assert np.array_equal(back[column].to_numpy(), table[column].to_numpy())
    assert read_metadata(tmp_path / f"t.{fmt}")["model"] == "m"


def test_json_is_standard_json_with_table_schema_records_and_metadata(tmp_path):
    table = awkward_table(10)
    table.loc[[3, 4, 5], "l2_distance"] = [np.nan, np.inf, -np.inf]  # JSON has no NaN / Infinity literals
    write_results(table, {"model": "m"}, tmp_path, "t", ("json",))
    text = (tmp_path / "t.json").read_text(encoding="utf-8")
    doc = json.loads(text, parse_constant=pytest.fail)  # standard JSON: no NaN / Infinity constants
    assert [f["name"] for f in doc["schema"]["fields"]] == COLUMNS
    assert len(doc["data"]) == 10 and doc["data"][1]["token_masked"] == ' say "hi",'
    assert [doc["data"][k]["l2_distance"] for k in (3, 4, 5)] == [None, np.inf, -np.inf]
    assert '"l2_distance":1e999' in text and '"l2_distance":-1e999' in text
    assert doc["metadata"]["model"] == "m"


def test_text_formats_are_written_in_blocks_without_losing_rows(tmp_path, monkeypatch):
    import vl_masking.results as results

    monkeypatch.setattr(results, "TEXT_BLOCK_ROWS", 7)  # 64 rows -> 10 blocks, the last one partial
    table = awkward_table()
    write_results(table, {}, tmp_path, "t", ("csv", "json"))
    for fmt in ("csv", "json"):
        back = read_table(tmp_path / f"t.{fmt}")
        assert list(back.token_position) == list(range(64))


def test_an_empty_table_writes_valid_files(tmp_path):
    write_results(awkward_table().head(0), {}, tmp_path, "t", ("parquet", "csv", "json"))
    for fmt in ("parquet", "csv", "json"):
        assert len(read_table(tmp_path / f"t.{fmt}")) == 0
