"""--measure deepstack: Qwen3-VL's DeepStack features removed per level at each picture unit and at every image
position, read at the prediction, and each level's norm relative to the residual stream. Exact against full
forward passes with the level's rows zeroed in the language model's call; refused for families without DeepStack."""

import numpy as np
import pytest

from conftest import PIGGY, run_cli, vl_settings
from test_encoder import painted
from test_flow import TOLERANCE, sharpen
from vl_masking.api import run
from vl_masking.inputs import load_model
from vl_masking.tiny_models import build_qwen2_vl


def analysed(model, tmp_path, **overrides):
    settings = vl_settings(model, tmp_path, **{"measure": ("deepstack",), "mask_mode": "vision", "num_tokens": 1,
                                               **overrides})
    loaded = sharpen(load_model(settings))  # a peaked prediction, so that the changes mean something
    return run(settings, loaded=loaded, save=False, progress=False, log=lambda *a: None).analysis


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_every_deepstack_row_equals_full_forwards_with_the_levels_rows_zeroed(tiny_vl_dir, tmp_path, attention):
    """Two pictures, 2x2 regions: every (level, unit) and every level at all image positions, against one full
    forward each (prob, log-prob, KL and the injection ratio read from that forward's own residual stream)."""
    picture = str(tmp_path / "cells.png")
    painted(picture)
    analysis = analysed(tiny_vl_dir, tmp_path, images=[str(PIGGY), picture], mask_unit="region:2x2",
                        vision_attention=attention, check=1000)
    table, check = analysis.table, analysis.metadata["check"]
    assert len(check["checked"]) == len(table) and check["max_error"] < TOLERANCE, check["max_error"]
    units = table[table.flow.astype(str) == "removed at the unit"]
    every = table[table.flow.astype(str) == "removed at every image position"]
    assert sorted(set(table.layer)) == [0, 1] and (table.vision_block == table.layer).all()  # the tiny config
    assert len(units) == 2 * 12 and len(every) == 2 and (every.unit.astype(str) == "image").all()
    assert (every.unit_size == 15 + 15).all()
    assert (table.kl > 0).all() and (table.injection_ratio > 0).all()
    # all positions removed move the prediction more than any one region does
    for layer, part in units.groupby("layer"):
        assert float(every[every.layer == layer].kl.iloc[0]) > part.kl.max()


def test_one_unit_of_the_whole_picture_is_the_row_of_every_image_position(tiny_vl_dir, tmp_path):
    table = analysed(tiny_vl_dir, tmp_path, mask_unit="image").table
    series = table.flow.astype(str)
    for column in ("prob", "kl", "injection_ratio"):
        np.testing.assert_array_equal(table[series == "removed at the unit"][column].to_numpy(),
                                      table[series == "removed at every image position"][column].to_numpy())


def test_deepstack_is_refused_in_one_line_for_a_model_without_it(tiny_text_dir, tmp_path):
    model = build_qwen2_vl(tmp_path / "qwen2-vl")
    for tool, given in (("mask_impact_vl.py", model), ("mask_impact_analysis.py", tiny_text_dir)):
        extra = ["--image", PIGGY] if tool == "mask_impact_vl.py" else []
        proc = run_cli(tool, "--model", given, "--prompt", "Hi", *extra, "--measure", "deepstack", "--device", "cpu",
                       "--output-dir", tmp_path / "out")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "DeepStack" in proc.stderr and not (tmp_path / "out").exists()
