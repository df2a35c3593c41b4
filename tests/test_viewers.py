"""Both viewers in real Chromium, opened from file:// (Debian chromium, launched by Playwright)."""

import shutil

import pytest
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.browser

from conftest import PIGGY, ROOT, run_cli
from vl_masking.results import read_metadata, read_table, write_results

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "test-output"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is required (make test installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def runs(tiny_vl_dir, tall_image, tmp_path_factory):
    """The make-demo run (one image) and a two-image run, in all three formats."""
    out = tmp_path_factory.mktemp("viewer-data")
    common = ["--model", tiny_vl_dir, "--mask-mode", "both", "--num-tokens", 3, "--output-dir", out]
    run_cli("mask_impact_vl.py", *common, "--image", PIGGY, "--prompt", "Describe this image.", "--output", "demo",
            check=True)
    run_cli("mask_impact_vl.py", *common, "--image", PIGGY, "--image", tall_image, "--prompt", "Compare.",
            "--output", "two", check=True)
    table = read_table(out / "demo.parquet")
    table["token_masked"] = table["token_masked"].astype(str)
    table.loc[table.token_position == 1, "token_masked"] = XSS
    write_results(table, read_metadata(out / "demo.parquet"), out, "xss", ("parquet",))
    return out


def open_viewer(browser, page_name, *files):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.errors, page.dialogs, page.requests = [], [], []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto((ROOT / page_name).as_uri())
    page.set_input_files("#file", [str(f) for f in files])
    page.wait_for_selector("body[data-loaded=true]", state="attached", timeout=10000)
    return page


def tooltip_value(page, layer, pos, metric):
    """The number a reader sees when hovering a heatmap cell."""
    page.locator(f'#heatmap td[data-layer="{layer}"][data-pos="{pos}"]').hover()
    line = [line for line in page.inner_text("#tooltip").splitlines() if line.startswith(metric)][0]
    return float(line.split()[1])


def data_files(out, name, fmt):
    return [out / f"{name}.csv", out / f"{name}.meta.json"] if fmt == "csv" else [out / f"{name}.{fmt}"]


@pytest.mark.parametrize("fmt", ["parquet", "json", "csv"])
def test_heatmap_loads_every_format_with_its_metadata(browser, runs, fmt):
    page = open_viewer(browser, "visualize_results.html", *data_files(runs, "demo", fmt))
    meta = read_metadata(runs / "demo.parquet")
    table = read_table(runs / "demo.parquet")
    assert page.locator("#heatmap td").count() == meta["num_layers"] * table.token_position.nunique()
    header = page.inner_text("#meta")
    assert meta["model"] in header and "bidirectional" in header and meta["generated_text"].strip()[:3] in header
    expected = table[(table.generation_step == 0) & (table.layer == 2) & (table.token_position == 5)
                     & (table.variant == "Full")].l2_distance.iloc[0]
    assert tooltip_value(page, 2, 5, "l2_distance") == pytest.approx(expected, rel=1e-6)
    assert "layer 2  step 0  variant Full" in page.inner_text("#tooltip")
    assert not page.errors and all(u.startswith(("file:", "blob:", "data:")) for u in page.requests)
    page.close()


def test_heatmap_controls_change_what_is_shown(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    table = read_table(runs / "demo.parquet")
    page.select_option("#step", "2")
    page.select_option("#variant", "Head_1")
    page.select_option("#metric", "cos")
    row = table[(table.generation_step == 2) & (table.layer == 0) & (table.token_position == 30)
                & (table.variant == "Head_1")]
    assert tooltip_value(page, 0, 30, "cosine_distance") == pytest.approx(row.cosine_distance.iloc[0], rel=1e-6)
    page.check("#exclude0")
    assert "excluded" in page.locator('#heatmap td[data-layer="0"][data-pos="0"]').get_attribute("class")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.select_option("#metric", "l2")
    page.select_option("#variant", "Full")
    page.screenshot(path=str(SCREENSHOTS / "visualize_results.png"))
    page.close()


@pytest.mark.parametrize("fmt", ["parquet", "json", "csv"])
def test_grid_viewer_draws_one_grid_per_image_with_its_shape(browser, runs, fmt):
    page = open_viewer(browser, "visualize_vl_grid.html", *data_files(runs, "two", fmt))
    grids = page.locator(".grid")
    assert grids.count() == 2
    assert [(grids.nth(i).get_attribute("data-rows"), grids.nth(i).get_attribute("data-cols")) for i in range(2)] == [
        ("3", "5"), ("4", "2")]
    assert page.locator(".grid").nth(0).locator(".cell").count() == 15
    assert page.locator(".grid").nth(1).locator(".cell").count() == 8
    assert page.locator("#text-strip .tok").count() > 5
    assert not page.errors
    page.close()


def test_grid_viewer_keys_change_layer_step_metric_and_scaling_and_numbers_match_the_file(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet")
    table = read_table(runs / "demo.parquet")

    def shown(pos):
        return float(page.locator(f'[data-pos="{pos}"]').first.get_attribute("data-value"))

    def expected(step, layer, pos, column):
        rows = table[(table.generation_step == step) & (table.layer == layer) & (table.token_position == pos)
                     & (table.variant == "Full")]
        return rows[column].iloc[0]

    assert "layer 0" in page.inner_text("#state") and shown(6) == pytest.approx(expected(0, 0, 6, "l2_distance"))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    state = page.inner_text("#state")
    assert "layer 2" in state and "step 1" in state
    assert shown(6) == pytest.approx(expected(1, 2, 6, "l2_distance"), rel=1e-6)
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("m")
    assert "cosine" in page.inner_text("#state")
    assert shown(21) == pytest.approx(expected(1, 1, 21, "cosine_distance"), rel=1e-6)
    for scaling in ("sqrt", "percentile", "linear"):
        page.keyboard.press("s")
        assert f"scaling {scaling}" in page.inner_text("#state")
    page.keyboard.press("ArrowUp")
    assert "step 0" in page.inner_text("#state")
    page.locator('.cell[data-pos="10"]').click()
    assert page.evaluate("document.getElementById('chart').toDataURL().length") > 2000
    assert float(page.inner_text("#stats").split("max")[1].split()[0]) > 0
    page.close()


def test_grid_viewer_lays_the_original_image_under_the_grid_and_exports_png(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet", PIGGY)
    image = page.locator("#background")
    image.wait_for(state="attached")
    page.wait_for_function("document.getElementById('background').naturalWidth > 0")
    assert page.evaluate("document.getElementById('background').naturalWidth") == 160
    box_img, box_grid = image.bounding_box(), page.locator(".grid").first.bounding_box()
    assert abs(box_img["x"] - box_grid["x"]) < 1 and abs(box_img["width"] - box_grid["width"]) < 1
    page.uncheck("#overlay")
    assert "overlay" not in page.locator(".grid").first.get_attribute("class")
    page.check("#overlay")
    with page.expect_download() as download:
        page.click("#export")
    assert download.value.suggested_filename.endswith(".png")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.locator('.cell[data-pos="12"]').click()
    page.screenshot(path=str(SCREENSHOTS / "visualize_vl_grid.png"))
    page.close()


@pytest.mark.parametrize("page_name", ["visualize_results.html", "visualize_vl_grid.html"])
def test_token_text_is_rendered_as_text_and_no_script_runs(browser, runs, page_name):
    page = open_viewer(browser, page_name, runs / "xss.parquet")
    assert XSS in page.inner_text("body")
    assert page.locator("img[src='x']").count() == 0
    assert page.dialogs == [] and not page.errors
    page.close()


def test_viewer_reads_the_text_tool_output(browser, tmp_path):
    from vl_masking.tiny_models import build_causal_lm

    model = build_causal_lm(tmp_path / "qwen3")
    run_cli("mask_impact_analysis.py", "--model", model, "--prompt", "The capital of France is", "--num-tokens", 2,
            "--output-dir", tmp_path, check=True)
    for page_name in ("visualize_results.html", "visualize_vl_grid.html"):
        page = open_viewer(browser, page_name, tmp_path / "masking_results.parquet")
        assert not page.errors
        if page_name == "visualize_vl_grid.html":
            assert page.locator(".grid").count() == 0 and page.locator("#text-strip .tok").count() >= 5
        else:
            assert page.locator("#heatmap td").count() == 3 * 6
        page.close()

