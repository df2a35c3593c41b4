"""mask_impact_vl.py end to end: the three files of the output contract and their metadata."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import PIGGY, run_cli
from vl_masking.results import read_metadata, read_table
from vl_masking.measures.layer import LAYER_COLUMNS as COLUMNS

DTYPES = {"generation_step": "int", "layer": "int", "token_position": "int", "image_index": "int",
          "grid_row": "int", "grid_col": "int", "l2_distance": "float", "cosine_distance": "float"}


@pytest.fixture(scope="module")
def cli_run(tiny_vl_dir, tall_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--image", tall_image,
                   "--prompt", "What differs?", "--num-tokens", 2, "--mask-mode", "both", "--layers", "0,2",
                   "--output-dir", out, "--output", "run", "--check", 3, check=True)
    return out, proc


def test_writes_parquet_csv_json_and_meta(cli_run):
    out, proc = cli_run
    assert sorted(p.name for p in out.iterdir()) == ["run.csv", "run.json", "run.meta.json", "run.parquet"]
    for name in ("run.parquet", "run.csv", "run.json"):
        assert str(out / name) in proc.stdout


@pytest.mark.parametrize("name", ["run.parquet", "run.csv", "run.json"])
def test_every_format_opens_in_pandas_with_exactly_the_contract_columns(cli_run, name):
    out, _ = cli_run
    table = read_table(out / name)
    assert list(table.columns) == COLUMNS
    for column, kind in DTYPES.items():
        assert getattr(pd.api.types, f"is_{kind}eger_dtype" if kind == "int" else "is_float_dtype")(table[column])
    meta = read_metadata(out / name)
    per_step = meta["units_per_step"]
    variants = 2 + meta["num_heads"]
    assert len(table) == sum(per_step) * len(meta["layers"]) * variants
    assert sorted(table.layer.unique()) == [0, 2]
    assert set(table.token_type.astype(str)) == {"text", "vision"}
    assert set(table.variant.astype(str)) == {"Full", "Attn"} | {f"Head_{h}" for h in range(meta["num_heads"])}


def test_the_three_formats_hold_the_same_values(cli_run):
    out, _ = cli_run
    tables = [read_table(out / f"run.{ext}") for ext in ("parquet", "csv", "json")]
    for other in tables[1:]:
        for column in COLUMNS:
            if column in ("l2_distance", "cosine_distance", "base_norm"):
                assert (abs(tables[0][column].to_numpy() - other[column].to_numpy()) <= 1e-6 * (1 + abs(tables[0][column].to_numpy()))).all()
            else:
                assert list(tables[0][column].astype(str)) == list(other[column].astype(str)), column


def test_parquet_opens_in_pyarrow_and_carries_the_metadata(cli_run):
    out, _ = cli_run
    schema = pq.read_schema(out / "run.parquet")
    assert schema.names == COLUMNS
    meta = json.loads(schema.metadata[b"mask_impact"])
    for key in ("model", "dtype", "device", "prompt", "images", "mask_mode", "vision_attention", "final_ids",
                "final_tokens", "generated_text", "stop_reason", "num_layers", "num_heads", "timings",
                "tool_version", "torch_version", "transformers_version", "check"):
        assert key in meta, key
    assert set(meta["timings"]) == {"model_load_s", "analysis_s", "write_s"}
    assert [(i["grid_rows"], i["grid_cols"]) for i in meta["images"]] == [(3, 5), (4, 2)]
    assert meta["check"]["max_error"] < 1e-5
    assert meta == read_metadata(out / "run.json") == read_metadata(out / "run.csv")
