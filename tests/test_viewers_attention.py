"""Attention files in both viewers, read through the schema in the file; a layer file and an attention file of
one run side by side with their rank correlation per layer, the same numbers the figures compute."""

import json

import numpy as np
import pytest

from conftest import PIGGY, run_cli
from test_viewers import browser, open_viewer, raw_value, tooltip  # noqa: F401 - fixtures
from vl_masking.figures import load, spearman, unit_values
from vl_masking.results import read_metadata, read_table

pytestmark = pytest.mark.browser
PAGES = ["visualize_results.html", "visualize_vl_grid.html"]


@pytest.fixture(scope="module")
def both(tiny_vl_dir, tmp_path_factory):
    """One run of the layer and the attention measure (one generation, two files)."""
    out = tmp_path_factory.mktemp("both")
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
            "--mask-mode", "both", "--num-tokens", 2, "--measure", "layer,attention", "--output-dir", out,
            "--output", "run", "--formats", "parquet", check=True)
    return out


@pytest.mark.parametrize("page_name", PAGES)
def test_an_attention_file_opens_with_its_heads_and_metrics_from_its_schema(browser, both, page_name):
    page = open_viewer(browser, page_name, both / "run.attention.parquet")
    assert not page.errors
    options = page.eval_on_selector_all("#series option", "o => o.map(x => x.value)")
    assert options[:3] == ["Mean", "Head_0", "Head_1"]
    metrics = page.eval_on_selector_all("#metric option", "o => o.map(x => x.textContent)")
    assert metrics == ["attention weight", "attention contribution norm"]
    assert page.input_value("#normalise") == "step"
    assert "measure: attention" in page.inner_text("#meta")
    if page_name == PAGES[0]:
        table = read_table(both / "run.attention.parquet")
        row = table[(table.generation_step == 0) & (table.variant.astype(str) == "Mean") & (table.layer == 1)
                    & (table.token_position == 5)]
        lines = tooltip(page, 1, 5)
        assert raw_value(lines, "attention") == pytest.approx(float(row.attention.iloc[0]), rel=1e-6)
        assert "layer 1  step 0  head Mean" in lines[2]
    else:  # the heat over the picture per layer and head, and the chart across layers
        page.check("#show-heads")
        assert page.locator("#heads .multiple").count() == read_metadata(both / "run.attention.parquet")["num_heads"]
        assert page.locator("#multiples .multiple").count() == 3  # every layer
    page.close()


@pytest.mark.parametrize("page_name", PAGES)
def test_a_layer_and_an_attention_file_of_one_run_compare_with_their_rank_correlation(browser, both, page_name):
    page = open_viewer(browser, page_name, both / "run.layer.parquet")
    page.set_input_files("#file-b", [str(both / "run.attention.parquet")])
    page.wait_for_selector("#compare-mode:not([disabled])", state="attached")
    message = page.inner_text("#compare-message")
    assert "A is a layer result, B a attention result (one run)" in message, message
    assert page.input_value("#compare-mode") == "B"
    assert page.locator('#compare-mode option[value="A-B"]').is_disabled()
    page.wait_for_selector("body[data-spearman]", state="attached")
    shown = json.loads(page.get_attribute("body", "data-spearman"))
    line = page.inner_text("#rank-correlation")
    assert "A L2 distance (Full) vs B attention weight (Mean), step 0" in line, line
    layer, attention = load(both / "run.layer.parquet"), load(both / "run.attention.parquet")
    for entry in shown:
        x = unit_values(layer, 0, entry["layer"], "Full", "l2")
        y = unit_values(attention, 0, entry["layer"], "Mean", "attention")
        common = x.index.intersection(y.index)
        keep = np.isfinite(x.value[common]) & np.isfinite(y.value[common])
        assert entry["n"] == int(keep.sum()) and entry["n"] > 10
        assert entry["rho"] == pytest.approx(spearman(x.value[common].to_numpy(), y.value[common].to_numpy()),
                                             abs=1e-9)
        assert f"{entry['layer']}: {entry['rho']:.3f} ({entry['n']})" in line
    # heads of the same name in both files are matched
    page.select_option("#series", "Head_1")
    assert "(Head_1) vs B attention weight (Head_1)" in page.inner_text("#rank-correlation")
    page.close()



def test_the_pages_rank_correlation_ranks_ties_as_the_figures_do(browser, both):
    page = open_viewer(browser, PAGES[0], both / "run.layer.parquet")
    for xs, ys in (([1, 2, 2, 3, 5], [10, 30, 20, 20, 40]), ([0, 0, 0, 1], [3, 1, 2, 4]), ([4, 1, 3, 2], [1, 2, 3, 4])):
        shown = page.evaluate(f"MaskImpact.spearman({xs}, {ys})")
        assert shown == pytest.approx(spearman(np.array(xs, float), np.array(ys, float)), abs=1e-12), (xs, ys)
    page.close()
