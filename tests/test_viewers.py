"""Both viewers in real Chromium, opened from file:// (Debian chromium, launched by Playwright)."""

import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from conftest import PIGGY, ROOT, run_cli
from vl_masking.results import read_metadata, read_table, write_results

pytestmark = pytest.mark.browser

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
    """The make-demo runs (token units, 2x2 regions, flow), a two-image run, another prompt, in all three formats."""
    out = tmp_path_factory.mktemp("viewer-data")
    common = ["--model", tiny_vl_dir, "--mask-mode", "both", "--num-tokens", 3, "--output-dir", out]
    piggy = ["--image", PIGGY, "--prompt", "Describe this image."]
    run_cli("mask_impact_vl.py", *common, *piggy, "--output", "demo", check=True)
    run_cli("mask_impact_vl.py", *common, *piggy, "--mask-unit", "region:2x2", "--output", "regions", check=True)
    run_cli("mask_impact_vl.py", *common, *piggy, "--measure", "flow", "--flow", "units->last", "--flow",
            "image->question", "--flow", "question->last", "--window", 3, "--output", "flow", check=True)
    run_cli("mask_impact_vl.py", *common, "--image", PIGGY, "--prompt", "What colour is it?", "--output", "other",
            check=True)
    run_cli("mask_impact_vl.py", *common, "--image", PIGGY, "--image", tall_image, "--prompt", "Compare.",
            "--output", "two", check=True)
    table, meta = read_table(out / "demo.parquet"), read_metadata(out / "demo.parquet")
    for column in ("token_masked", "unit"):
        table[column] = table[column].astype(str)
        table.loc[table.token_position == 1, column] = XSS
    for unit in meta["units"]:  # the viewers take unit labels from the metadata's unit list
        if unit["positions"] == [1]:
            unit["label"] = unit["short"] = XSS
    write_results(table, meta, out, "xss", ("parquet",))
    return out


def open_viewer(browser, page_name, *files, wait=True, timeout_ms=10000):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.errors, page.dialogs, page.requests, page.downloads = [], [], [], []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto((ROOT / page_name).as_uri())
    page.set_input_files("#file", [str(f) for f in files])
    if wait:
        page.wait_for_selector("body[data-loaded=true]", state="attached", timeout=timeout_ms)
    return page


def data_files(out, name, fmt):
    return [out / f"{name}.csv", out / f"{name}.meta.json"] if fmt == "csv" else [out / f"{name}.{fmt}"]


def tooltip(page, layer, pos):
    page.locator(f'#heatmap td[data-layer="{layer}"][data-pos="{pos}"]').first.hover()
    return page.inner_text("#tooltip").splitlines()


def raw_value(lines, key):
    raw = next(line for line in lines if line.startswith("raw:"))
    return float(next(part.split("=")[1] for part in raw.split()[1:] if part.startswith(key + "=")))


def bar(page, holder="#bar"):
    lo, mid, hi = (page.inner_text(f"{holder} .{k}") for k in ("lo", "mid", "hi"))
    return float(page.get_attribute(holder, "data-lo")), float(page.get_attribute(holder, "data-hi")), (lo, mid, hi)


def frame(table, step=0, variant="Full"):
    return table[(table.generation_step == step) & (table.variant.astype(str) == variant)]


# -- the heatmap -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["parquet", "json", "csv"])
def test_heatmap_loads_every_format_and_shows_the_files_numbers(browser, runs, fmt):
    page = open_viewer(browser, "visualize_results.html", *data_files(runs, "demo", fmt))
    meta = read_metadata(runs / "demo.parquet")
    table = read_table(runs / "demo.parquet")
    assert page.locator("#heatmap td").count() == meta["num_layers"] * table.unit_positions.nunique()
    header = page.inner_text("#meta")
    assert meta["model"] in header and "bidirectional" in header
    row = frame(table)[(frame(table).layer == 2) & (frame(table).token_position == 5)]
    lines = tooltip(page, 2, 5)
    assert raw_value(lines, "l2") == pytest.approx(row.l2_distance.iloc[0], rel=1e-6)
    shown = next(line for line in lines if line.startswith("L2 distance:")).split(": ")[1]
    assert len(shown.replace(".", "").replace("-", "").lstrip("0")) <= 4  # four significant digits on screen
    assert "layer 2  step 0  variant Full" in lines[2] and lines[1].startswith("positions 5")
    assert not page.errors and all(u.startswith(("file:", "blob:", "data:")) for u in page.requests)
    page.close()


def test_the_colour_bar_shows_the_range_of_each_normalisation(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    full = read_table(runs / "demo.parquet")
    full = full[full.variant.astype(str) == "Full"]
    page.locator("#layer").fill("1")  # the slider moves the current layer
    assert page.inner_text("#layer-value") == "1"
    layer1 = frame(full)[frame(full).layer == 1].l2_distance
    step0 = frame(full).l2_distance
    expected = {"layer": (layer1.min(), layer1.max()), "step": (step0.min(), step0.max()),
                "global": (full.l2_distance.min(), full.l2_distance.max())}
    for norm, (lo, hi) in expected.items():
        page.select_option("#normalise", norm)
        shown_lo, shown_hi, labels = bar(page)
        assert shown_lo == pytest.approx(lo, rel=1e-6) and shown_hi == pytest.approx(hi, rel=1e-6), norm
        assert float(labels[0]) == pytest.approx(lo, rel=1e-3) and float(labels[2]) == pytest.approx(hi, rel=1e-3)
        assert {"layer": "per layer", "step": "per step", "global": "over all steps"}[norm] in page.inner_text("#bar")
    page.close()


def test_keys_work_right_after_choosing_a_file(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    page.focus("#file")  # where focus sits after choosing a file with the picker
    assert page.evaluate("document.activeElement.id") == "file"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    assert page.inner_text("#layer-value") == "1" and page.inner_text("#step-value") == "1"
    assert "current" in page.locator("#heatmap tbody tr").nth(1).get_attribute("class")
    page.keyboard.press("n")
    assert page.input_value("#normalise") == "step"
    page.close()


def test_a_file_minus_itself_is_zero_on_a_zero_centred_bar(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    page.set_input_files("#file-b", [str(runs / "demo.parquet")])
    page.wait_for_selector("#compare-mode:not([disabled])", state="attached")
    assert page.input_value("#compare-mode") == "A-B"
    assert "The metadata agree" in page.inner_text("#compare-message")
    lo, hi, labels = bar(page)
    assert lo == 0 and hi == 0 and labels == ("0", "0", "0")
    colours = page.eval_on_selector_all("#heatmap td", "cells => cells.map(c => c.style.backgroundColor)")
    missing = "rgb(228, 228, 228)"  # units not yet generated at this step
    assert set(colours) - {missing} == {"rgb(247, 247, 247)"}  # the diverging scale's zero
    assert colours.count(missing) < len(colours) / 4
    page.close()


def test_two_prompts_are_compared_with_their_differences_listed_and_other_grids_refused(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    page.set_input_files("#file-b", [str(runs / "other.parquet")])
    page.wait_for_selector("#compare-mode:not([disabled])", state="attached")
    message = page.inner_text("#compare-message")
    assert "prompt: A \"Describe this image.\" / B \"What colour is it?\"" in message
    assert "−" in page.inner_text("#bar")  # A − B in the caption
    page.close()
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet")
    page.set_input_files("#file-b", [str(runs / "two.parquet")])
    page.wait_for_selector("#compare-message:not(:empty)", state="attached")
    assert "Not compared: image grids differ" in page.inner_text("#compare-message")
    assert page.locator("#compare-mode").is_disabled()
    page.close()


def test_unit_files_show_one_column_per_unit_with_its_label(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "regions.parquet")
    table = read_table(runs / "regions.parquet")
    assert page.locator("#heatmap tbody tr").first.locator("td").count() == table.unit_positions.nunique()
    labels = page.locator("#heatmap thead tr.labels th div").all_inner_texts()
    assert "img0 r0-1 c0-1" in labels and "img0 r2 c4" in labels and "·image." in labels
    assert "image 0 · 3 x 5" in page.inner_text("#heatmap thead tr.groups")
    first = int(table[table.unit.astype(str) == "image 0 rows 0-1 cols 0-1"].token_position.iloc[0])
    lines = tooltip(page, 0, first)
    assert lines[0].startswith("img0 r0-1 c0-1  (region")
    assert lines[1] == f"positions {first},{first + 1},{first + 5},{first + 6}"
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "heatmap_regions.png"))
    with page.expect_download() as download:
        page.click("#export")
    png = Image.open(download.value.path()).convert("RGB")
    assert png.width >= 1200 and png.width % 2 == 0 and png.height % 2 == 0  # drawn at twice the size
    gradient = np.asarray(png)[:, :, :].reshape(-1, 3)
    assert len({tuple(p) for p in gradient[::7]}) > 60  # the heat and the colour bar
    page.close()


def test_flow_files_show_window_centres_on_a_diverging_scale(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "flow.parquet")
    table = read_table(runs / "flow.parquet")
    assert page.inner_text("h1") == "mask-impact: " + read_metadata(runs / "flow.parquet")["schema"]["question"]
    assert "matters" in page.inner_text("h1") or "carry" in page.inner_text("h1")  # not "does each layer use"
    assert page.input_value("#metric") == "rel_change" and page.input_value("#series") == "units->last"
    units = table[table.flow.astype(str) == "units->last"]
    assert page.locator("#heatmap tbody tr").count() == units.layer.nunique()
    assert page.locator("#heatmap tbody tr").first.locator("td").count() == units.unit_positions.nunique()
    lo, hi, labels = bar(page)
    assert lo == -hi and labels[1] == "0"
    assert "window centre" in page.inner_text("#heatmap thead")
    page.select_option("#series", "image->question")
    assert page.locator("#heatmap tbody tr").first.locator("td").count() == 1
    page.close()


# -- the grid viewer ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["parquet", "json", "csv"])
def test_grid_viewer_draws_one_grid_per_image_with_its_shape(browser, runs, fmt):
    page = open_viewer(browser, "visualize_vl_grid.html", *data_files(runs, "two", fmt))
    grids = page.locator("canvas.grid-canvas")
    assert grids.count() == 2
    assert [(grids.nth(i).get_attribute("data-rows"), grids.nth(i).get_attribute("data-cols")) for i in range(2)] == [
        ("3", "5"), ("4", "2")]
    assert page.locator("#text-strip .tok").count() > 5 and not page.errors
    page.close()


def test_grid_viewer_keys_and_sliders_change_what_is_shown_and_numbers_match_the_file(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet")
    table = read_table(runs / "demo.parquet")

    def expected(step, layer, pos, column):
        rows = frame(table, step)
        return rows[(rows.layer == layer) & (rows.token_position == pos)][column].iloc[0]

    shown = lambda pos: page.evaluate(f"maskImpactValue({pos})")  # noqa: E731
    page.focus("#file")  # where focus sits after choosing a file with the picker
    assert "layer 0" in page.inner_text("#state") and shown(6) == pytest.approx(expected(0, 0, 6, "l2_distance"))
    page.keyboard.press("ArrowRight")  # focus is still on the file input
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    state = page.inner_text("#state")
    assert "layer 2" in state and "step 1" in state
    assert shown(6) == pytest.approx(expected(1, 2, 6, "l2_distance"), rel=1e-6)
    page.locator("#layer").fill("1")
    page.keyboard.press("m")
    assert "layer 1" in page.inner_text("#state") and "cosine" in page.inner_text("#state")
    assert shown(21) == pytest.approx(expected(1, 1, 21, "cosine_distance"), rel=1e-6)
    for scaling in ("sqrt", "percentile", "linear"):
        page.keyboard.press("s")
        assert f"scaling {scaling}" in page.inner_text("#state")
    stats = page.inner_text("#stats")
    assert "NaN" not in stats and float(stats.split("max")[1].split()[0]) > 0
    # units at step 1: every prompt unit plus the one generated token (not the later ones)
    meta = read_metadata(runs / "demo.parquet")
    counted = sum(int(n) for n in re.findall(r"^\s+units (\d+)", stats, re.M))
    assert counted == meta["units_per_step"][1] - 1  # the first image token is left out of the scale
    page.close()


def test_grid_viewer_shows_the_picture_large_small_multiples_heads_and_a_labelled_chart(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet", PIGGY)
    page.wait_for_selector("body[data-pictures='1']", state="attached")
    box = page.locator("canvas.grid-canvas").first.bounding_box()
    assert box["width"] >= 600 and box["width"] / box["height"] == pytest.approx(160 / 96, rel=0.02)
    meta = read_metadata(runs / "demo.parquet")
    assert page.locator("#multiples .multiple").count() == meta["num_layers"]
    page.locator("#multiples .multiple").nth(2).click()
    assert "layer 2" in page.inner_text("#state")
    page.keyboard.press("h")
    assert page.locator("#heads .multiple").count() == meta["num_heads"]
    page.evaluate("maskImpactSelect(10)")
    assert page.evaluate("document.getElementById('chart').toDataURL().length") > 5000
    page.select_option("#layout", "side")
    box = page.locator("canvas.grid-canvas").first.bounding_box()
    assert box["width"] / box["height"] == pytest.approx(2 * 160 / 96, rel=0.02)
    page.select_option("#layout", "overlay")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "grid_demo.png"), full_page=True)
    page.close()


def test_export_png_holds_the_picture_the_text_strip_and_the_colour_bars_at_twice_the_size(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet", PIGGY)
    page.wait_for_selector("body[data-pictures='1']", state="attached")
    page.select_option("#picture-mode", "colour")  # the picture under the heat
    page.locator("#opacity").fill("0")  # the picture alone under a transparent heat
    with page.expect_download() as download:
        page.click("#export")
    png = Image.open(io.BytesIO(open(download.value.path(), "rb").read())).convert("RGB")
    layout = json.loads(page.evaluate("document.body.dataset.exportLayout"))
    assert png.size == (layout["width"] * 2, layout["height"] * 2)
    pixels = np.asarray(png)

    def band(name):
        top, bottom = layout[name]
        return pixels[top * 2: bottom * 2].reshape(-1, 3)

    strip = band("strip")
    orange = (strip[:, 0] > 200) & (strip[:, 1] > 120) & (strip[:, 1] < 230) & (strip[:, 2] < 150)
    assert orange.sum() > 500  # text units in the text palette
    bars = band("bars")
    assert len({tuple(p) for p in bars[::3]}) > 100  # two gradients
    picture = band("images")
    pink = (picture[:, 0] > 180) & (picture[:, 2] > 120) & (picture[:, 1] < 170)
    assert pink.sum() > 1000  # the piglet under the heat
    page.close()


def test_flow_files_in_the_grid_viewer_map_units_and_chart_every_group_flow(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "flow.parquet", PIGGY)
    assert "window centre 0" in page.inner_text("#state")
    lines = json.loads(page.evaluate("document.body.dataset.chartLines"))
    assert lines == ["image->question", "question->last"]
    lo, hi, labels = bar(page, "#bar-image")
    assert lo == -hi and labels[1] == "0"
    assert page.evaluate("maskImpactValue(6)") == pytest.approx(
        read_table(runs / "flow.parquet").query("flow == 'units->last' and generation_step == 0 and layer == 0 "
                                                "and token_position == 6").rel_change_pct.iloc[0], rel=1e-5)
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "grid_flow.png"), full_page=True)
    page.close()


def test_region_units_are_painted_as_one_block_and_words_as_one_chip(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "regions.parquet")
    canvas = page.locator("canvas.grid-canvas").first
    data = page.evaluate("""() => { const c = document.querySelector('canvas.grid-canvas');
        const ctx = c.getContext('2d'), w = c.width / 5, h = c.height / 3;
        const at = (r, k) => Array.from(
          ctx.getImageData(Math.floor((k + 0.5) * w), Math.floor((r + 0.5) * h), 1, 1).data);
        return [at(0, 0), at(1, 1), at(0, 2), at(2, 4)]; }""")
    assert data[0] == data[1]  # one 2x2 block, one colour
    assert canvas.get_attribute("data-rows") == "3"
    chips = page.locator("#text-strip .tok").all_inner_texts()
    assert "·image." in chips and "↵" in chips  # a word as one chip; line breaks visible
    page.close()


# -- text, safety, errors -------------------------------------------------------------------------

@pytest.mark.parametrize("page_name", ["visualize_results.html", "visualize_vl_grid.html"])
def test_token_text_is_rendered_as_text_and_no_script_runs(browser, runs, page_name):
    page = open_viewer(browser, page_name, runs / "xss.parquet")
    if page_name == "visualize_results.html":
        assert XSS in page.inner_text("#heatmap thead")
    else:
        assert XSS in page.inner_text("#text-strip")
    assert page.locator("img[src='x']").count() == 0
    assert page.dialogs == [] and not page.errors
    page.close()


def test_text_only_files_show_no_nan_and_say_there_is_no_image(browser, tmp_path):
    from vl_masking.tiny_models import build_causal_lm

    model = build_causal_lm(tmp_path / "qwen3")
    run_cli("mask_impact_analysis.py", "--model", model, "--prompt", "The capital of France is\nParis, and",
            "--num-tokens", 2, "--output-dir", tmp_path, check=True)
    for page_name in ("visualize_results.html", "visualize_vl_grid.html"):
        page = open_viewer(browser, page_name, tmp_path / "masking_results.parquet")
        text = page.inner_text("body")
        assert "NaN" not in text and not page.errors
        if page_name == "visualize_vl_grid.html":
            assert page.locator("canvas.grid-canvas").count() == 0 and "has no image" in text
            assert "↵" in page.inner_text("#text-strip")
        else:
            assert "↵" in page.inner_text("#heatmap thead")
        page.close()


@pytest.mark.parametrize("page_name", ["visualize_results.html", "visualize_vl_grid.html"])
@pytest.mark.parametrize("case,content,message", [
    ("bare.csv", "generation_step,layer\n0,0\n", "holds no measure schema in its metadata"),
    ("empty.csv", "", "is empty"),
    ("norows.json", '{"schema": {"fields": []}, "data": [], "metadata": {}}', "holds no rows"),
])
def test_a_broken_file_gets_one_clear_message(browser, tmp_path, page_name, case, content, message):
    path = tmp_path / case
    path.write_text(content)
    page = open_viewer(browser, page_name, path, wait=False)
    page.wait_for_selector("body[data-error]", state="attached")
    status = page.inner_text("#status")
    assert message in status and case in status and not page.errors
    page.close()


@pytest.mark.parametrize("page_name", ["visualize_results.html", "visualize_vl_grid.html"])
def test_a_file_without_the_columns_its_schema_names_gets_one_clear_message(browser, runs, tmp_path, page_name):
    (tmp_path / "missing.csv").write_text("generation_step,layer\n0,0\n")
    (tmp_path / "missing.meta.json").write_text((runs / "demo.meta.json").read_text())
    page = open_viewer(browser, page_name, tmp_path / "missing.csv", tmp_path / "missing.meta.json", wait=False)
    page.wait_for_selector("body[data-error]", state="attached")
    status = page.inner_text("#status")
    assert "missing.csv is not a mask-impact layer result: it lacks the columns token_position" in status, status
    assert not page.errors
    page.close()


def test_a_phone_photo_is_drawn_in_its_exif_orientation_under_the_grid(browser, tiny_vl_dir, tmp_path):
    """Stored 96 wide and 160 high with Orientation 6 (seen 160 x 96): red on top as seen, blue below."""
    seen = Image.new("RGB", (160, 96), (200, 0, 0))
    seen.paste((0, 0, 200), (0, 48, 160, 96))
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer must turn it 90 degrees clockwise
    seen.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", path, "--prompt", "Hi", "--output-dir", tmp_path,
            "--formats", "parquet", "--mask-mode", "vision", check=True)
    page = open_viewer(browser, "visualize_vl_grid.html", tmp_path / "vl_masking_results.parquet", path)
    page.wait_for_selector("body[data-pictures='1']", state="attached")
    page.select_option("#picture-mode", "colour")  # the picture under the heat
    page.locator("#opacity").fill("0")
    canvas = page.locator("canvas.grid-canvas").first
    assert (canvas.get_attribute("data-rows"), canvas.get_attribute("data-cols")) == ("3", "5")
    box = canvas.bounding_box()
    assert box["width"] / box["height"] == pytest.approx(160 / 96, rel=0.02)
    top, bottom = page.evaluate("""() => { const c = document.querySelector('canvas.grid-canvas');
        const ctx = c.getContext('2d');
        const at = (y) => Array.from(ctx.getImageData(Math.floor(c.width / 2), Math.floor(y * c.height), 1, 1).data);
        return [at(0.2), at(0.8)]; }""")
    assert top[0] > 150 and top[2] < 80 and bottom[2] > 150 and bottom[0] < 80
    page.close()


CELL_CENTRES = """() => {
    const canvas = document.querySelector("canvas.grid-canvas"), ctx = canvas.getContext("2d");
    const rows = Number(canvas.dataset.rows), cols = Number(canvas.dataset.cols), out = [];
    const w = canvas.width / cols, h = canvas.height / rows;
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
        out.push([...ctx.getImageData(Math.floor((c + 0.5) * w), Math.floor((r + 0.5) * h), 1, 1).data].slice(0, 3));
    }
    return out;
}"""


def test_the_grid_viewer_draws_the_picture_as_edges_over_an_opaque_heat_by_default(browser, runs):
    """As in the figures: every cell keeps its colour bar's colour (no hue of the picture mixed in: a white cell
    over grass must not read green), and the picture shows as black edges only."""
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet")
    heat = page.evaluate(CELL_CENTRES)
    page.set_input_files("#file", [str(PIGGY)])
    page.wait_for_selector("body[data-pictures='1']", state="attached")
    assert page.input_value("#picture-mode") == "outline" and page.is_disabled("#opacity")
    drawn = page.evaluate(CELL_CENTRES)
    same = [a == b for a, b in zip(heat, drawn)]
    edges = [all(x <= 0.15 * y + 2 for x, y in zip(b, a)) for a, b in zip(heat, drawn)]  # 85 % black over the heat
    assert all(s or e for s, e in zip(same, edges)) and sum(same) >= len(same) // 2, (heat, drawn)
    page.select_option("#picture-mode", "colour")
    assert not page.is_disabled("#opacity")
    blended = page.evaluate(CELL_CENTRES)
    assert sum(a != b for a, b in zip(heat, blended)) > len(heat) // 2  # the picture's colours under a 60 % heat
    assert "(1 first token left out)" in page.inner_text("#stats")  # left out of max and mean: said so
    page.uncheck("#exclude-first")
    assert "left out" not in page.inner_text("#stats")
    assert not page.errors
    page.close()
