"""The rules both readers of result files apply (the figures in Python, the viewers in JavaScript) give the outputs
of one shared fixture, tests/data/reader_rules.json; the viewers read a file written before schemas as the layer
measure, with the schema the tool writes for it, and open the seed's plain CSV as the figures do."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from test_viewers import browser, open_viewer, runs  # noqa: F401 - fixtures
from vl_masking import figures, reader_rules
from vl_masking.measures import schema_of

RULES = json.loads((ROOT / "tests" / "data" / "reader_rules.json").read_text())
SEED_COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index", "grid_row",
                "grid_col", "variant", "l2_distance", "cosine_distance"]  # the seed's CSV, with no metadata


def nan(value):
    return math.nan if value is None else value


def same(a, b) -> bool:
    return (b is None and math.isnan(a)) or (b is not None and a == pytest.approx(b, abs=1e-9))


def test_the_python_rules_give_the_fixtures_outputs():
    for text, shown in RULES["show_text"]:
        assert reader_rules.show_text(text) == shown, text
    for unit, view, label in RULES["short_label"]:
        assert reader_rules.short_label(unit, view) == label, unit
    for top, bottom, value in RULES["ratio"]:
        assert same(float(reader_rules.ratio(nan(top), nan(bottom))), value), (top, bottom)
    for xs, ys, rho in RULES["spearman"]:
        assert same(reader_rules.spearman(list(map(nan, xs)), list(map(nan, ys))), rho), (xs, ys)
    for values, signed, positions in RULES["colour_positions"]:
        got = reader_rules.colour_positions(list(map(nan, values)), signed)
        assert all(same(g, e) for g, e in zip(got, positions)), (values, signed, got)


@pytest.mark.browser
def test_the_viewers_rules_give_the_fixtures_outputs(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    for text, shown in RULES["show_text"]:
        assert page.evaluate("t => MaskImpact.showText(t)", text) == shown, text
    for unit, view, label in RULES["short_label"]:
        u = {"kind": unit["kind"], "label": unit["label"], "type": unit["token_type"], "image": unit["image_index"],
             "row": unit["grid_row"], "col": unit["grid_col"], "rows": unit["grid_rows"], "cols": unit["grid_cols"],
             "picture": (view or {}).get("picture"), "view": (view or {}).get("name", ""),
             "video": (view or {}).get("video", -1)}
        assert page.evaluate("u => MaskImpact.unitLabel(u)", u) == label, unit
    for top, bottom, value in RULES["ratio"]:
        shown = page.evaluate("([a, b]) => MaskImpact.ratio(a === null ? NaN : a, b === null ? NaN : b)", [top, bottom])
        assert same(shown if shown is not None else math.nan, value), (top, bottom)
    for xs, ys, rho in RULES["spearman"]:
        shown = page.evaluate("([a, b]) => MaskImpact.spearman(a.map((v) => v === null ? NaN : v), "
                              "b.map((v) => v === null ? NaN : v))", [xs, ys])
        assert same(shown if shown is not None else math.nan, rho), (xs, ys)
    for values, signed, positions in RULES["colour_positions"]:  # the pages' scale over one layer's cells
        shown = page.evaluate("""([vs, signed]) => { const v = vs.map((x) => x === null ? NaN : x);
            const r = MaskImpact.centred(MaskImpact.rangeOf(v, v.map((_, i) => i)), signed);
            return v.map((x) => MaskImpact.position(x, r, "linear")); }""", [values, signed])
        assert all(same(g if g is not None else math.nan, e) for g, e in zip(shown, positions)), (values, shown)
    page.close()


def test_the_viewers_schema_for_files_before_schemas_is_the_one_the_tool_writes():
    text = (ROOT / "viewer" / "common.js").read_text()
    legacy = json.loads(re.search(r"const LEGACY_SCHEMA = (\{.*\});", text).group(1))
    assert legacy == schema_of({})


def seed_csv(path, runs) -> pd.DataFrame:
    """The demo's layer rows with the seed's columns only, and no .meta.json."""
    table = figures.load(runs / "demo.parquet").table
    table[SEED_COLUMNS].to_csv(path, index=False)
    return table


def test_the_figures_open_the_seeds_csv_as_the_layer_measure(runs, tmp_path):
    seed_csv(tmp_path / "seed.csv", runs)
    result = figures.load(tmp_path / "seed.csv")
    assert result.measure == "layer" and set(result.metrics) == {"l2", "cos"}
    written = figures.main([str(tmp_path / "seed.csv"), "--out", str(tmp_path / "figs")], log=lambda line: None)
    assert written


@pytest.mark.browser
@pytest.mark.parametrize("page_name", ["visualize_results.html", "visualize_vl_grid.html"])
def test_the_viewers_open_the_seeds_csv_as_the_layer_measure(browser, runs, tmp_path, page_name):
    table = seed_csv(tmp_path / "seed.csv", runs)
    page = open_viewer(browser, page_name, tmp_path / "seed.csv")
    assert not page.errors
    assert "L2 distance" in page.inner_html("#metric") and "relative L2" not in page.inner_html("#metric")
    assert np.isfinite(table.l2_distance).all()
    page.close()
