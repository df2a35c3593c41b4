"""Files of the measures inside and beside the vision tower (encoder, encoder-flow, DeepStack) in both viewers:
rows named from their schema, their series, and on-screen numbers equal to the file's."""

import pytest

from conftest import PIGGY, run_cli
from test_viewers import browser, open_viewer, raw_value, tooltip  # noqa: F401 - fixtures
from vl_masking.results import read_metadata, read_table

pytestmark = pytest.mark.browser
PAGES = ["visualize_results.html", "visualize_vl_grid.html"]


def written(model, out, measure, *options):
    """The parquet file of one run of `measure` on the bundled picture."""
    run_cli("mask_impact_vl.py", "--model", model, "--image", PIGGY, "--prompt", "Describe this image.",
            "--mask-mode", "vision", "--measure", measure, *options, "--output-dir", out, "--output", measure,
            "--formats", "parquet", check=True)
    return out / f"{measure}.parquet"


@pytest.fixture(scope="module")
def tower_file(tiny_vl_dir, tmp_path_factory):
    return written(tiny_vl_dir, tmp_path_factory.mktemp("tower"), "encoder")


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


@pytest.fixture(scope="module")
def flow_file(tiny_vl_dir, tmp_path_factory):
    return written(tiny_vl_dir, tmp_path_factory.mktemp("tower-flow"), "encoder-flow", "--mask-unit", "region:2x2")


@pytest.mark.parametrize("page_name", PAGES)
def test_an_encoder_flow_file_opens_with_its_ablations_and_the_files_numbers(browser, flow_file, page_name):
    page = open_viewer(browser, page_name, flow_file)
    assert not page.errors
    options = page.eval_on_selector_all("#series option", "o => o.map(x => x.value)")
    assert options == ["knockout", "mean after projector", "zero after projector"]
    assert "measure: encoder-flow" in page.inner_text("#meta")
    if page_name == PAGES[0]:
        table = read_table(flow_file)
        row = table[(table.flow.astype(str) == "knockout")].iloc[0]
        lines = tooltip(page, int(row.layer), int(row.token_position))
        assert raw_value(lines, "rel_change") == pytest.approx(float(row.rel_change_pct), rel=1e-5, abs=1e-6)
    page.close()


@pytest.fixture(scope="module")
def deepstack_file(tiny_vl_dir, tmp_path_factory):
    return written(tiny_vl_dir, tmp_path_factory.mktemp("deepstack"), "deepstack", "--mask-unit", "token")


@pytest.mark.parametrize("page_name", PAGES)
def test_a_deepstack_file_opens_with_its_levels_and_the_injection_ratio_of_the_file(browser, deepstack_file,
                                                                                     page_name):
    page = open_viewer(browser, page_name, deepstack_file)
    assert not page.errors
    options = page.eval_on_selector_all("#series option", "o => o.map(x => x.value)")
    assert options == ["removed at the unit", "removed at every image position"]
    assert "measure: deepstack" in page.inner_text("#meta")
    page.select_option("#metric", "injection")
    table = read_table(deepstack_file)
    levels = sorted(set(table.layer))
    if page_name == PAGES[0]:
        row = table[(table.flow.astype(str) == "removed at the unit") & (table.layer == levels[-1])].iloc[3]
        lines = tooltip(page, int(row.layer), int(row.token_position))
        assert raw_value(lines, "injection") == pytest.approx(float(row.injection_ratio), rel=1e-6)
    else:  # a map of the picture per level
        assert page.locator("#multiples .multiple").count() == len(levels)
        assert "level" in page.inner_text("#multiples")
    page.close()


def test_vision_blocks_and_decoder_layers_of_one_run_are_not_compared_number_by_number(browser, tiny_vl_dir,
                                                                                     tmp_path):
    """Block 1 of the tower is not layer 1 of the language model: the viewers refuse the pair and say why, and
    the figures draw no scatter of them."""
    from test_figures import run_figures

    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
            "--mask-mode", "vision", "--num-tokens", 1, "--measure", "layer,encoder", "--output-dir", tmp_path,
            "--output", "run", "--formats", "parquet", check=True)
    for page_name in PAGES:
        page = open_viewer(browser, page_name, tmp_path / "run.layer.parquet")
        page.set_input_files("#file-b", [str(tmp_path / "run.encoder.parquet")])
        page.wait_for_selector("#compare-message:has-text('Not compared')")
        message = page.inner_text("#compare-message")
        assert "A's rows are decoder layers and B's vision blocks" in message, message
        assert not page.errors
        page.close()
    proc = run_figures(tmp_path / "run.layer.parquet", tmp_path / "run.encoder.parquet", "--out", tmp_path / "fig")
    assert proc.returncode == 0 and not any("_vs_" in p.name for p in (tmp_path / "fig").iterdir()), proc.stdout
