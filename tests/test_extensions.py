"""The extension cases of docs/layout.md, each done here in the test file with no edit of the package: a unit kind,
a vision-language family's adapter, and a column (with its metric) of a measure. (An option: test_options_stated_
once.py; a measure: test_measure_seam.py.) Each runs from the command line and its files carry what it added."""

import numpy as np
import pytest

from conftest import PIGGY, run_cli
from vl_masking.measures import MEASURES, Metric, register
from vl_masking.measures.layer import LayerMeasure
from vl_masking.models import ADAPTERS
from vl_masking.models.qwen_vl import QwenVL
from vl_masking.results import read_metadata, read_table
from vl_masking.units import UNIT_KINDS, Unit, UnitKind
from vl_masking.units import register as register_unit_kind


class PairUnits(UnitKind):
    """Two neighbouring text tokens at a time (the last one alone when their number is odd)."""

    covers = ("text",)

    def units(self, tokens, positions):
        positions = [int(p) for p in positions]
        return [Unit("".join(tokens.text[p] for p in pair), "pair", tuple(pair))
                for pair in (positions[i:i + 2] for i in range(0, len(positions), 2))]


@pytest.fixture()
def pair_units():
    register_unit_kind("pair")(PairUnits)
    yield
    UNIT_KINDS.pop("pair")


def test_a_unit_kind_declared_in_a_test_file_runs_from_the_command_line(pair_units, tiny_text_dir, tmp_path):
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "The capital of France is",
                   "--mask-unit", "pair", "--output-dir", tmp_path, "--output", "pairs", "--formats", "parquet")
    assert proc.returncode == 0, proc.stderr
    table, meta = read_table(tmp_path / "pairs.parquet"), read_metadata(tmp_path / "pairs.parquet")
    prompt_units = [u for u in meta["units"] if u["from_step"] == 0]
    assert {u["kind"] for u in prompt_units} == {"pair"} and all(1 <= len(u["positions"]) <= 2 for u in prompt_units)
    assert sum(len(u["positions"]) for u in prompt_units) == meta["prompt_length"]
    assert set(table.unit_kind.astype(str)) == {"pair"}
    assert "pair" in run_cli("mask_impact_analysis.py", "--help").stdout


class Qwen3VLPlain(QwenVL):
    """Qwen3-VL under another name and another built-in prompt: a family's adapter declared in a test file."""

    family = "Qwen-VL (plain prompt)"
    stop_tokens = ("<|endoftext|>",)

    def builtin_prompt(self, prompt, num_images, system):
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
        return f"{vision}Question: {prompt}\nAnswer:"


@pytest.fixture()
def plain_family(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "qwen3_vl", Qwen3VLPlain)


def test_a_family_adapter_declared_in_a_test_file_runs_from_the_command_line(plain_family, tiny_vl_dir, tmp_path):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Is it pink?",
                   "--chat-template", "builtin", "--mask-mode", "both", "--measure", "flow", "--flow", "text->last",
                   "--window", 1, "--output-dir", tmp_path, "--output", "plain", "--formats", "parquet")
    assert proc.returncode == 0, proc.stderr
    meta = read_metadata(tmp_path / "plain.parquet")
    assert meta["family"] == "Qwen-VL (plain prompt)" and meta["final_tokens"][0] == "<|vision_start|>"
    positions = read_table(tmp_path / "plain.parquet").unit_positions.astype(str).iloc[0].split(",")
    words = "".join(meta["final_tokens"][int(p)] for p in positions)  # the text group: the prompt, not its markup
    assert "".join(words.split()) == "Isitpink?", words


class LayerWithSquares(LayerMeasure):
    """The layer measure with one more column, the squared L2 distance, and a metric that reads it."""

    name = "layer_squares"
    Options = None  # the layer measure's own (--variants), which it reads
    columns = [*LayerMeasure.columns, "l2_squared"]
    metrics = (*LayerMeasure.metrics, Metric("l2_squared", "squared L2 distance", "l2_squared"))

    def table(self, token_map):
        self.columns = LayerMeasure.columns  # the layer measure's table, then the new column
        try:
            table = super().table(token_map)
        finally:
            del self.columns
        table["l2_squared"] = (table["l2_distance"].astype(np.float64) ** 2).astype(np.float32)
        return table[self.columns]


@pytest.fixture()
def squares_measure(monkeypatch):
    from vl_masking import options

    register(LayerWithSquares)
    monkeypatch.setattr(options, "RunSettings", options.settings_class())
    yield
    MEASURES.pop(LayerWithSquares.name)


def test_a_column_and_its_metric_declared_in_a_test_file_reach_the_files_and_the_figures(squares_measure,
                                                                                         tiny_text_dir, tmp_path):
    from vl_masking import figures

    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "The capital of France is",
                   "--measure", "layer_squares", "--output-dir", tmp_path, "--output", "squares")
    assert proc.returncode == 0, proc.stderr
    for fmt in ("parquet", "csv", "json"):
        table = read_table(tmp_path / f"squares.{fmt}")
        assert np.allclose(table.l2_squared, table.l2_distance.astype(float) ** 2, rtol=1e-6), fmt
    meta = read_metadata(tmp_path / "squares.parquet")
    assert "l2_squared" in meta["schema"]["columns"] and meta["schema"]["metrics"][-1]["key"] == "l2_squared"
    written = figures.main([str(tmp_path / "squares.parquet"), "--metric", "l2_squared", "--out",
                            str(tmp_path / "figs")], log=lambda line: None)
    assert any(p.endswith("squares_heatmap.png") for p in written)
