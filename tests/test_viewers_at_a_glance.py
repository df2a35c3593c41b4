"""What a newcomer sees first in both viewers: nothing hidden under the header or off the window, colours
that mean one thing on the map and in the chart, a default scale that shows what a measure varies over,
comparisons and exports that say what they hold, and controls only where they do something."""

import json

import pytest

from conftest import PIGGY, run_cli
from vl_masking.results import read_metadata, read_table, write_results
from test_viewers import SCREENSHOTS, browser, data_files, open_viewer, runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser
PAGES = ["visualize_results.html", "visualize_vl_grid.html"]


@pytest.fixture(scope="module")
def text_only(runs, tiny_vl_dir):
    """A prompt without an image, from the same tiny model (next to the other runs)."""
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--prompt", "Name three farm animals.", "--num-tokens", 2,
            "--output-dir", runs, "--output", "text_only", check=True)
    return runs / "text_only.parquet"


def box(page, selector):
    return page.locator(selector).first.bounding_box()


def export_texts(page):
    with page.expect_download():
        page.click("#export")
    return json.loads(page.evaluate("document.body.dataset.exportTexts"))


def overlapping(texts):
    """Pairs of upright texts whose boxes overlap by more than a pixel each way."""
    upright = [t for t in texts if not t["rotated"] and t["text"].strip()]
    return [(a["text"], b["text"]) for i, a in enumerate(upright) for b in upright[i + 1:]
            if min(a["x1"], b["x1"]) - max(a["x0"], b["x0"]) > 1 and min(a["y1"], b["y1"]) - max(a["y0"], b["y0"]) > 1]


@pytest.mark.parametrize("name, series", [("text_only", None), ("flow", "question->last"), ("demo", None)])
def test_the_first_layer_is_below_the_column_labels(browser, runs, text_only, name, series):
    page = open_viewer(browser, "visualize_results.html", runs / f"{name}.parquet")
    if series:
        page.select_option("#series", series)
    labels = box(page, "#heatmap thead tr.labels th:not(.corner)")
    first_row = box(page, "#heatmap tbody tr th")
    assert first_row["y"] >= labels["y"] + labels["height"] - 0.5, (labels, first_row)
    groups = page.locator("#heatmap thead tr.groups")
    if name == "demo":  # the image row sits above the labels, not under them
        assert labels["y"] >= groups.bounding_box()["y"] + groups.bounding_box()["height"] - 0.5
    else:
        assert groups.count() == 0
    page.evaluate("document.getElementById('wrap').scrollTop = 40")
    scrolled = box(page, "#heatmap thead tr.labels th:not(.corner)")
    assert scrolled["y"] == pytest.approx(labels["y"], abs=0.5)  # the labels stay in place when the rows scroll
    if name == "text_only":
        page.evaluate("document.getElementById('wrap').scrollTop = 0")
        SCREENSHOTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "results_text_only_header.png"))
    page.close()


@pytest.mark.parametrize("page_name", PAGES)
def test_a_tooltip_near_the_bottom_of_the_window_stays_inside_it(browser, runs, page_name):
    page = open_viewer(browser, page_name, runs / "demo.parquet")
    height = 460 if page_name == PAGES[0] else 320  # short enough for the page to scroll
    page.set_viewport_size({"width": 1000, "height": height})
    selector = "#heatmap tbody tr:last-child td:nth-child(4)" if page_name == PAGES[0] else "#text-strip .tok:last-child"
    # Lay the page out for the new size first (the grid page redraws on resize), then put the last layer's
    # row, or the last chip, at the bottom edge.
    page.evaluate(f"""() => {{ window.dispatchEvent(new Event('resize'));
        window.scrollBy(0, document.querySelector('{selector}').getBoundingClientRect().bottom - innerHeight + 12); }}""")
    target = page.locator(selector)
    where = target.bounding_box()
    assert height - 40 < where["y"] + where["height"] <= height, (where, height)  # the pointer is near the bottom
    target.hover()
    tip = box(page, "#tooltip")
    assert tip["height"] > 40 and tip["y"] >= 0 and tip["y"] + tip["height"] <= height, (where, tip)
    assert tip["x"] >= 0 and tip["x"] + tip["width"] <= 1000
    page.close()


def test_the_chart_draws_image_and_text_units_in_the_colours_of_the_map(browser, runs):
    page = open_viewer(browser, "visualize_vl_grid.html", runs / "demo.parquet")
    assert json.loads(page.evaluate("document.body.dataset.chartLines")) == ["mean of image units", "mean of text units"]
    colours = json.loads(page.evaluate("document.body.dataset.chartColours"))
    image_end, text_end = page.evaluate("[MaskImpact.colour(1, 'image'), MaskImpact.colour(1, 'text')]")
    assert colours == [image_end, text_end]
    # The legend swatches as drawn, and the hottest image cell and text chip as painted.
    swatches = page.evaluate("""() => { const ctx = document.getElementById('chart').getContext('2d');
        return [0, 1].map((k) => Array.from(ctx.getImageData(568, 15 + 18 * k, 1, 1).data.slice(0, 3))); }""")
    rgb = [list(map(int, c[4:-1].split(","))) for c in colours]
    assert swatches == rgb
    blue, orange = rgb
    assert blue[2] > blue[0] and orange[0] > orange[2]  # image units blue, text units orange, in both places
    hottest = page.evaluate("""() => { const cs = [...document.querySelectorAll('#text-strip .tok')]
        .filter((c) => c.dataset.value !== '').sort((a, b) => b.dataset.value - a.dataset.value);
        return getComputedStyle(cs[0]).backgroundColor; }""")
    assert hottest == f"rgb({orange[0]}, {orange[1]}, {orange[2]})"
    page.close()


def test_a_one_column_flow_varies_across_window_centres_on_the_default_scale(browser, runs):
    page = open_viewer(browser, "visualize_results.html", runs / "flow.parquet")
    assert page.eval_on_selector("#normalise", "e => e.value") == "step"  # one scale across window centres
    page.select_option("#series", "image->question")
    colours = page.eval_on_selector_all("#heatmap tbody td", "cells => cells.map((c) => c.style.backgroundColor)")
    rows = page.locator("#heatmap tbody tr").count()
    assert len(colours) == rows and len(set(colours)) > 1, colours  # one column, a colour per window centre
    page.close()
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    assert page.eval_on_selector("#normalise", "e => e.value") == "layer"  # the layer measure: per layer
    page.close()


def test_comparing_files_whose_units_differ_says_what_matched(browser, runs, tmp_path):
    table, meta = read_table(runs / "demo.parquet"), read_metadata(runs / "demo.parquet")
    table["unit_kind"] = "word"  # the same positions as other units: nothing to match
    for unit in meta["units"]:
        unit["kind"] = "word"
    write_results(table, meta, tmp_path, "words", ("parquet",))
    page = open_viewer(browser, "visualize_results.html", runs / "demo.parquet")
    page.set_input_files("#file-b", str(tmp_path / "words.parquet"))
    page.wait_for_selector("#compare-message:has-text('Not compared')")
    message = page.inner_text("#compare-message")
    assert message.startswith("Not compared: none of A's units is a unit of B (A: 31 token; B: 31 word)"), message
    assert page.is_disabled("#compare-mode")
    page.set_input_files("#file-b", str(runs / "regions.parquet"))  # regions and words: a few tokens in common
    page.wait_for_selector("body[data-compare-cells]", state="attached")
    message = page.inner_text("#compare-message")
    matched, total = map(int, page.evaluate("document.body.dataset.compareCells").split("/"))
    assert 0 < matched < total and f"{matched} of {total} cells of A have a match in B" in message, message
    assert "the others are grey" in message and "mask_unit" in message
    page.set_input_files("#file-b", str(runs / "demo.parquet"))
    page.wait_for_selector(f"body[data-compare-cells='{total}/{total}']", state="attached")
    assert "Every cell of A has its match in B" in page.inner_text("#compare-message")
    page.close()


@pytest.mark.parametrize("page_name", PAGES)
def test_an_export_says_where_it_came_from_and_no_two_texts_run_together(browser, runs, page_name):
    page = open_viewer(browser, page_name, runs / "demo.parquet", PIGGY)
    texts = export_texts(page)
    joined = " ".join(t["text"] for t in texts)
    meta = json.loads((runs / "demo.meta.json").read_text())
    for expected in ("file demo.parquet", f"model {meta['model']}", 'prompt "Describe this image."', "step 0",
                     "Full"):
        assert expected in joined, (expected, joined)
    assert overlapping(texts) == []
    if page_name == "visualize_results.html":  # the rows are named along their axis
        axis = [t for t in texts if t["rotated"] and t["text"] == "layer"]
        assert axis and axis[0]["x1"] < 30
    else:  # both colour bars' captions, whole, side by side
        captions = [t for t in texts if "units:" in t["text"]]
        assert {t["text"].split(":")[0] for t in captions} == {"image units", "text units"}
    page.close()


def test_a_text_only_file_shows_neither_a_vision_mode_nor_picture_controls(browser, text_only):
    page = open_viewer(browser, "visualize_vl_grid.html", text_only)
    assert "vision attention" not in page.inner_text("#meta")
    for control in ("#image-file", "#opacity", "#layout", "#exclude-first", "#show-heads", "#image-choice"):
        assert not page.is_visible(control), control
    assert page.is_visible("#metric") and page.is_visible("#export")
    assert "image units" not in page.inner_text("#stats") and "text units" in page.inner_text("#stats")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "grid_text_only.png"))
    page.close()
    page = open_viewer(browser, "visualize_results.html", text_only)
    assert "vision attention" not in page.inner_text("#meta")
    page.close()
    page = open_viewer(browser, "visualize_vl_grid.html", text_only.with_name("demo.parquet"))
    assert "vision attention: bidirectional" in page.inner_text("#meta") and page.is_visible("#opacity")
    page.close()


@pytest.mark.parametrize("page_name", PAGES)
@pytest.mark.parametrize("case", ["meta alone", "meta not json", "meta a list", "json metadata a list"])
def test_a_metadata_file_alone_or_broken_is_named_in_one_message(browser, runs, tmp_path, page_name, case):
    csv, meta = data_files(runs, "demo", "csv")
    given = tmp_path / "demo.meta.json"
    given.write_text({"meta alone": meta.read_text(), "meta not json": "{not json"}.get(case, "[1, 2]"))
    files = [given] if case == "meta alone" else [csv, given]
    if case == "json metadata a list":
        document = json.loads((runs / "demo.json").read_text())
        document["metadata"] = [1, 2]
        files = [tmp_path / "demo.json"]
        files[0].write_text(json.dumps(document))
    page = open_viewer(browser, page_name, *files, wait=False)
    page.wait_for_selector("body[data-error]", state="attached")
    status = page.inner_text("#status")
    expected = {"meta alone": "demo.meta.json is the metadata of a CSV result: load the CSV together with it",
                "meta not json": "demo.meta.json is not valid JSON",
                "meta a list": "demo.meta.json is not a mask-impact metadata file: it holds a list",
                "json metadata a list": 'the "metadata" of demo.json is not a mask-impact metadata file'}[case]
    assert expected in status and not page.errors, status
    page.close()
