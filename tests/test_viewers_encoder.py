"""An encoder file (vision blocks x picture units) in both viewers: rows named from its schema, its variants,
and on-screen numbers equal to the file's."""

import pytest

from conftest import PIGGY, run_cli
from test_viewers import browser, open_viewer, raw_value, tooltip  # noqa: F401 - fixtures
from vl_masking.results import read_metadata, read_table

pytestmark = pytest.mark.browser
PAGES = ["visualize_results.html", "visualize_vl_grid.html"]


@pytest.fixture(scope="module")
def tower_file(tiny_vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tower")
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
            "--mask-mode", "vision", "--measure", "encoder", "--output-dir", out, "--output", "tower",
            "--formats", "parquet", check=True)
    return out / "tower.parquet"


@pytest.mark.parametrize("page_name", PAGES)
def test_an_encoder_file_opens_with_its_blocks_and_variants_and_the_files_numbers(browser, tower_file, page_name):
    page = open_viewer(browser, page_name, tower_file)
    assert not page.errors
    options = page.eval_on_selector_all("#series option", "o => o.map(x => x.value)")
    assert options[:2] == ["Full", "Attn"] and "Full outside" in options
    assert "measure: encoder" in page.inner_text("#meta")
    table = read_table(tower_file)
    blocks = read_metadata(tower_file)["vision_blocks"]
    if page_name == PAGES[0]:
        position = int(table.token_position.iloc[0])
        row = table[(table.variant.astype(str) == "Full") & (table.layer == 1) & (table.token_position == position)]
        lines = tooltip(page, 1, position)
        assert raw_value(lines, "l2") == pytest.approx(float(row.l2_distance.iloc[0]), rel=1e-6)
        assert "block 1" in lines[2] or "vision block 1" in " ".join(lines), lines
    else:  # one map over the picture per vision block
        assert page.locator("#multiples .multiple").count() == blocks
        assert "block" in page.inner_text("#multiples")
    page.close()
