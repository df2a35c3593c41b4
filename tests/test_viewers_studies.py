"""A study's part file holds many examples: both viewers show one example at a time, chosen by its example_id,
with the table's own columns beside it, and every number on screen is that example's (never a mix)."""

import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from test_viewers import browser, open_viewer, raw_value, tooltip  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser
EXAMPLES = [("wide", (160, 96), "red", "What colour is the square?", "ChooseAttr"),
            ("tall", (64, 128), "blue", "Is there a cat in this picture at all?", "QueryAttr")]


@pytest.fixture(scope="module")
def study_part(tiny_vl_dir, tmp_path_factory):
    """Two examples with pictures of other shapes (3x5 and 4x2 token grids) and prompts of other lengths."""
    root = tmp_path_factory.mktemp("study")
    rows = []
    for name, size, colour, question, kind in EXAMPLES:
        Image.new("RGB", size, colour).save(root / f"{name}.png")
        rows.append({"qid": name, "img": f"{name}.png", "q": question, "type": kind})
    pd.DataFrame(rows).to_json(root / "pictures.jsonl", orient="records", lines=True)
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", root / "pictures.jsonl", "--columns",
            "id=qid,image=img,question=q", "--num-tokens", 1, "--mask-mode", "both", "--output-dir", root,
            check=True)
    part = root / "pictures" / "part-r00000.parquet"
    return part, pd.read_parquet(part)


def rows_of(table, example, layer, pos):
    return table[(table.example_id == example) & (table.generation_step == 0) & (table.variant == "Full")
                 & (table.layer == layer) & (table.token_position == pos)]


def test_the_results_viewer_shows_one_example_at_a_time_with_its_own_numbers(browser, study_part):
    path, table = study_part
    page = open_viewer(browser, "visualize_results.html", path)
    assert page.locator("#example option").all_inner_texts() == ["wide", "tall"]
    for name, _, _, question, kind in EXAMPLES:
        page.select_option("#example", name)
        page.wait_for_function(f"document.querySelector('#example').value === '{name}'")
        assert kind in page.inner_text("#meta")
        mine = table[(table.example_id == name) & (table.generation_step == 0) & (table.variant == "Full")]
        assert page.locator("#heatmap tbody tr").first.locator("td").count() == mine.unit_positions.nunique()
        for pos in (0, int(mine.token_position.max())):
            lines = tooltip(page, 1, pos)
            assert raw_value(lines, "l2") == pytest.approx(rows_of(table, name, 1, pos).l2_distance.iloc[0], rel=1e-6)
        strip = "".join(page.locator("#heatmap thead tr.labels th div").all_inner_texts())
        assert question.split()[-1].rstrip("?") in strip  # this example's prompt, not spliced with the other's
    assert not page.errors
    page.close()


def test_the_grid_viewer_draws_each_examples_own_grid(browser, study_part):
    path, table = study_part
    page = open_viewer(browser, "visualize_vl_grid.html", path)
    for name, grid in (("wide", ("3", "5")), ("tall", ("4", "2"))):
        page.select_option("#example", name)
        page.wait_for_function(f"document.querySelector('#example').value === '{name}'")
        grids = page.locator("canvas.grid-canvas")
        assert grids.count() == 1
        assert (grids.first.get_attribute("data-rows"), grids.first.get_attribute("data-cols")) == grid
        vision = table[(table.example_id == name) & (table.token_type == "vision")]
        pos = int(vision.token_position.min())
        page.locator("#layer").fill("1")
        assert page.evaluate(f"maskImpactValue({pos})") == pytest.approx(
            rows_of(table, name, 1, pos).l2_distance.iloc[0], rel=1e-6)
    assert not page.errors
    page.close()
