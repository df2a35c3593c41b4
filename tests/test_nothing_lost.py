"""What a run keeps is what it measured: every row in every format (NaN and inf included), no file of an
earlier run left beside it, and repeated options refused before any work."""

import numpy as np
import pytest
import torch

from conftest import run_cli
from vl_masking.results import read_metadata, read_table, write_results
from test_writers import awkward_table

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def overflowing_dir(tmp_path_factory):
    """A tiny text model whose layer 1 MLP output overflows float16 (so layers 1-2 measure NaN in float16)."""
    from transformers import AutoModelForCausalLM

    from vl_masking.tiny_models import build_causal_lm

    path = build_causal_lm(tmp_path_factory.mktemp("models") / "overflowing", model_type="qwen3", layers=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e7)
    model.save_pretrained(path)
    return path


def test_a_float16_overflow_keeps_every_row_in_every_format_and_warns_once(overflowing_dir, tmp_path):
    proc = run_cli("mask_impact_analysis.py", "--model", overflowing_dir, "--prompt", PROMPT, "--dtype", "float16",
                   "--device", "cpu", "--num-tokens", 2, "--output", "f16", "--output-dir", tmp_path, check=True)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "not finite" in warnings[0] and "layers 1-2" in warnings[0], proc.stderr
    assert "Full" in warnings[0] and "float16" in warnings[0]
    tables = {fmt: read_table(tmp_path / f"f16.{fmt}") for fmt in ("parquet", "csv", "json")}
    meta = read_metadata(tmp_path / "f16.parquet")
    rows = int(meta["rows_explained"].split(" = ")[0])
    nan = tables["parquet"].l2_distance.isna()
    assert 0 < nan.sum() < rows and meta["non_finite"]["rows"] == nan.sum()
    assert meta["non_finite"]["columns"]["l2_distance"] == nan.sum()
    for fmt, table in tables.items():
        assert len(table) == rows, fmt
        assert table.l2_distance.dtype.kind == "f", fmt
        assert table.l2_distance.isna().tolist() == nan.tolist(), fmt
        full = table[table.variant.astype(str) == "Full"]
        assert len(full) == rows // 6, fmt  # every Full row is there (they are the ones that overflow first)


def test_nan_and_inf_are_spelled_so_that_every_format_reads_them_back(tmp_path):
    table = awkward_table(12)
    table.loc[[2, 3, 4], "l2_distance"] = [np.nan, np.inf, -np.inf]
    table.loc[5, "cosine_distance"] = np.nan
    write_results(table, {}, tmp_path, "t", ("parquet", "csv", "json"))
    assert "nan" in (tmp_path / "t.csv").read_text() and ",inf," in (tmp_path / "t.csv").read_text()
    for fmt in ("parquet", "csv", "json"):
        back = read_table(tmp_path / f"t.{fmt}")
        assert len(back) == 12, fmt
        for column in ("l2_distance", "cosine_distance"):
            assert np.array_equal(back[column].to_numpy(np.float32), table[column].to_numpy(), equal_nan=True), fmt
        assert "NaN" in set(back.token_masked.astype(str)), fmt  # a token spelled NaN stays text


def test_a_rerun_with_fewer_formats_removes_the_earlier_runs_other_files(tmp_path):
    table = awkward_table(8)
    write_results(table, {"run": 1}, tmp_path, "r", ("parquet", "csv", "json"))
    write_results(table, {"run": 1}, tmp_path, "keep", ("csv",))  # another name is another run's
    assert {p.name for p in tmp_path.iterdir()} == {"r.parquet", "r.csv", "r.meta.json", "r.json", "keep.csv",
                                                    "keep.meta.json"}
    write_results(table, {"run": 2}, tmp_path, "r", ("parquet",))
    assert {p.name for p in tmp_path.iterdir()} == {"r.parquet", "keep.csv", "keep.meta.json"}
    assert read_metadata(tmp_path / "r.parquet")["run"] == 2


@pytest.mark.parametrize("flags,named", [
    (["--measure", "flow", "--flow", "units->last", "--flow", " units -> last"], "--flow"),
    (["--measure", "flow", "--flow", "0-1->last", "--flow", "units->last", "--flow", "0-1->last"], "--flow"),
    (["--mask-span", "1-2", "--mask-span", "1-2"], "--mask-span"),
    (["--mask-span", 'text:"capital"', "--mask-span", "text:'capital'"], "--mask-span"),
])
def test_a_repeated_flow_or_span_is_refused_before_the_model_loads(tiny_text_dir, tmp_path, flags, named):
    out = tmp_path / "out"
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", PROMPT, *flags, "--output-dir",
                   out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {named}") and "twice" in proc.stderr
    assert "Model:" not in proc.stdout and not out.exists()


def test_a_batch_prompt_with_a_repeated_flow_is_refused(tiny_text_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"defaults: {{model: {tiny_text_dir}, measure: flow}}\n"
                      "prompts:\n  - {name: a, prompt: Hi there, flows: [units->last, units->last]}\n")
    proc = run_cli("mask_impact_analysis.py", "--config", config)
    assert proc.returncode == 2 and "--flow units->last is given twice" in proc.stderr, proc.stderr
