"""Figures from result files: every kind renders, hot cells look hot, the summary is the mean over prompts."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import PIGGY, ROOT, run_cli
from vl_masking import figures
from vl_masking.results import read_metadata, read_table

FLOWS = ["--measure", "flow", "--flow", "units->last", "--flow", "image->question", "--flow", "question->last",
         "--window", "3"]


@pytest.fixture(scope="module")
def demo(tiny_vl_dir, tmp_path_factory):
    """The make-demo outputs: token units, 2x2 regions and a flow run on the bundled image."""
    out = tmp_path_factory.mktemp("figure-data")
    common = ["--model", tiny_vl_dir, "--image", PIGGY, "--prompt-file", ROOT / "examples" / "prompt.txt",
              "--mask-mode", "both", "--num-tokens", 2, "--output-dir", out, "--formats", "parquet"]
    run_cli("mask_impact_vl.py", *common, "--output", "demo", check=True)
    run_cli("mask_impact_vl.py", *common, "--mask-unit", "region:2x2", "--output", "regions", check=True)
    run_cli("mask_impact_vl.py", *common, *FLOWS, "--output", "flow", check=True)
    return out


@pytest.fixture(scope="module")
def batch(tiny_vl_dir, tmp_path_factory):
    """Three prompts run as a batch, once with the layer measure and once with the flow measure."""
    root = tmp_path_factory.mktemp("figure-batch")
    prompts = [{"name": f"p{k}", "image": str(PIGGY), "prompt": text}
               for k, text in enumerate(["Describe this image.", "What colour is the animal?", "Is it outside?"])]
    for name, extra in (("layer", {}), ("flow", {"measure": "flow", "flows": ["units->last", "image->question"],
                                                  "window": 3})):
        config = root / f"{name}.yaml"
        defaults = dict(model=str(tiny_vl_dir), mask_mode="both", num_tokens=1, device="cpu", formats="parquet",
                        output_dir=name, **extra)
        config.write_text(yaml.safe_dump({"defaults": defaults, "prompts": prompts}))
        run_cli("mask_impact_vl.py", "--config", config, check=True)
    return root


def run_figures(*args):
    return subprocess.run([sys.executable, "-m", "vl_masking.figures", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_every_figure_kind_renders_from_the_demo_outputs(demo, tmp_path):
    out = tmp_path / "figs"
    proc = run_figures(demo / "demo.parquet", demo / "regions.parquet", demo / "flow.parquet", "--image", PIGGY,
                       "--out", out, "--format", "png,svg")
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    for stem in ("demo_heatmap", "demo_layers", "demo_heads_layer1", "regions_heatmap", "regions_layers",
                 "flow_heatmap", "flow_layers", "flow_flows"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names, stem
    # Token units and 2x2 regions are not averaged together: each is drawn alone, and the run says so.
    assert not any(n.startswith("aggregate") for n in names) and not any(n.startswith(".") for n in names)
    assert "not averaged (its mask_unit differs" in proc.stderr
    result = figures.load(demo / "demo.parquet")
    fig, _, _ = figures.heatmap(result, 0, "Full", "l2")
    expected = tuple(int(round(x)) for x in fig.get_size_inches() * figures.DPI)
    assert png_size(out / "demo_heatmap.png") == expected
    fig = figures.series_curves(figures.load(demo / "flow.parquet"), 0, "rel_change")
    assert png_size(out / "flow_flows.png") == (800, 450)
    caption = " ".join(fig._suptitle.get_text().split())  # wrapped where the model path makes it long
    assert "tiny-qwen3-vl" in caption and "step 0" in caption and "relative change of p" in caption
    assert "every flow, window 3" in caption


def test_a_long_caption_is_wrapped_inside_a_narrow_figure(demo):
    result = figures.load(demo / "demo.parquet")
    result.meta["model"] = "/a/long/path/to/some/checkpoint/directory/" * 3
    fig, _, _ = figures.heatmap(result, 0, "Full", "l2")
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert fig._suptitle.get_text().count("\n") >= 1
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)


@pytest.mark.parametrize("name,series,metric", [("demo", "Full", "l2"), ("flow", "units->last", "rel_change")])
def test_a_hot_cell_is_drawn_in_another_colour_than_a_cold_one(demo, name, series, metric):
    result = figures.load(demo / f"{name}.parquet")
    fig, matrix, ax = figures.heatmap(result, 0, series, metric)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=figures.DPI)
    pixels = np.asarray(Image.open(buffer).convert("RGB"))
    height = pixels.shape[0]

    def colour_at(index):
        row, col = np.unravel_index(index, matrix.shape)
        x, y = ax.transData.transform((col, row))
        return tuple(pixels[int(round(height - y)), int(round(x))])

    hot, cold = colour_at(np.nanargmax(matrix)), colour_at(np.nanargmin(matrix))
    assert hot != cold
    assert sum(abs(int(a) - int(b)) for a, b in zip(hot, cold)) > 100


def test_several_prompts_give_mean_curves_and_a_summary_equal_to_a_groupby(batch, tmp_path):
    files = sorted((batch / "layer").glob("p*.parquet"))
    out = tmp_path / "figs"
    proc = run_figures(*files, "--out", out, "--name", "batch")
    assert proc.returncode == 0, proc.stderr
    assert png_size(out / "batch_curves.png") == (800, 450)
    summary = pd.read_parquet(out / "batch.summary.parquet")
    assert list(summary.columns) == ["layer", "group", "mean", "low", "high", "n"]
    per_prompt = []
    for path in files:
        table = read_table(path)
        rows = table[(table.generation_step == 0) & (table.variant.astype(str) == "Full")]
        per_prompt.append(rows.groupby(["layer", rows.token_type.astype(str)]).l2_distance.mean())
    expected = pd.concat(per_prompt).groupby(level=[0, 1]).mean()
    got = summary.assign(group=summary.group.map({"image units": "vision", "text units": "text"})).set_index(
        ["layer", "group"])["mean"]
    assert np.allclose(got.sort_index().to_numpy(), expected.sort_index().to_numpy(), rtol=1e-6)
    assert (summary.n == 3).all() and (summary.low <= summary["mean"]).all() and (summary["mean"] <= summary.high).all()
    assert pd.read_csv(out / "batch.summary.csv").shape == summary.shape


def test_flow_prompts_aggregate_per_flow(batch, tmp_path):
    files = sorted((batch / "flow").glob("p*.parquet"))
    out = tmp_path / "figs"
    proc = run_figures(*files, "--out", out, "--name", "flows", "--format", "pdf")
    assert proc.returncode == 0, proc.stderr
    assert (out / "flows_curves.pdf").read_bytes().startswith(b"%PDF")
    summary = pd.read_parquet(out / "flows.summary.parquet")
    assert "image->question" in set(summary.group)
    group = summary[summary.group == "image->question"].set_index("layer")["mean"]
    values = [read_table(p).query("flow == 'image->question' and generation_step == 0").set_index("layer")
              .rel_change_pct.astype(float) for p in files]
    assert np.allclose(group.sort_index().to_numpy(), pd.concat(values, axis=1).mean(axis=1).sort_index().to_numpy(),
                       rtol=1e-5)


def test_a_file_that_is_not_a_result_is_one_line_and_exit_2(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    proc = run_figures(junk, "--out", tmp_path / "figs")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "junk.parquet" in proc.stderr
    proc = run_figures(junk, "--format", "gif")
    assert proc.returncode == 2 and "--format" in proc.stderr


@pytest.fixture(scope="module")
def two_runs(tiny_text_dir, tmp_path_factory):
    """Two prompts of the text tool, each written in all three formats; a third made with word units."""
    out = tmp_path_factory.mktemp("figure-formats")
    common = ["--model", tiny_text_dir, "--num-tokens", 1, "--output-dir", out]
    for name, prompt, unit in (("a", "The capital of France is", "token"), ("b", "Two plus two is", "token"),
                               ("w1", "The capital of France is", "word"), ("w2", "Two plus two is", "word")):
        run_cli("mask_impact_analysis.py", *common, "--prompt", prompt, "--mask-unit", unit, "--output", name,
                check=True)
    return out


def test_every_format_of_two_runs_is_counted_as_two_runs(two_runs, tmp_path):
    files = [two_runs / f"{name}.{fmt}" for name in ("a", "b") for fmt in ("parquet", "csv", "json")]
    out = tmp_path / "figs"
    proc = run_figures(*files, "--out", out, "--name", "two")
    assert proc.returncode == 0, proc.stderr
    summary = pd.read_parquet(out / "two.summary.parquet")
    assert (summary.n == 2).all()
    assert f"{two_runs / 'a.parquet'} (also {two_runs / 'a.csv'}, {two_runs / 'a.json'})" in proc.stderr
    direct = pd.concat([read_table(two_runs / f"{n}.parquet").query("variant == 'Full' and generation_step == 0")
                        .groupby("layer").l2_distance.mean() for n in ("a", "b")], axis=1).mean(axis=1)
    assert np.allclose(summary.set_index("layer")["mean"].sort_index(), direct.sort_index(), rtol=1e-6)


def test_two_sets_of_unlike_runs_are_refused_and_nothing_is_written(two_runs, tmp_path):
    out = tmp_path / "figs"
    proc = run_figures(*(two_runs / f"{n}.parquet" for n in ("a", "b", "w1", "w2")), "--out", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "mask_unit" in proc.stderr, proc.stderr
    assert not out.exists()


def test_figure_arguments_that_do_not_fit_are_one_line_and_leave_nothing(demo, tmp_path):
    square = tmp_path / "square.png"
    Image.new("RGB", (120, 120), "red").save(square)
    out = tmp_path / "figs"
    cases = [
        (["--image", tmp_path / "missing.png"], "file not found"),
        (["--image", square], "another shape"),
        (["--heads-layer", 99], "--heads-layer 99"),
        # The layer file's figures are drawn first; the flow file then fails: neither may stay.
        (["--variant", "Attn"], "no flow 'Attn'"),
    ]
    for flags, message in cases:
        proc = run_figures(demo / "demo.parquet", demo / "flow.parquet", *flags, "--out", out)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, (flags, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not out.exists() or not any(out.iterdir()), (flags, list(out.iterdir()))


def test_results_and_places_the_figures_cannot_use_are_one_line_and_leave_nothing(demo, tmp_path):
    """An empty result, a result lacking the metric's column, layers the file does not have, an --out that
    cannot be made, a glob matching nothing, a CSV row with an empty layer: one line naming the file or pattern, exit 2, nothing written."""
    import pyarrow.parquet as pq

    table = pq.read_table(demo / "demo.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    pq.write_table(table.drop(["l2_distance"]), tmp_path / "no_l2.parquet")
    out = tmp_path / "figs"
    (tmp_path / "a_file").write_text("")
    cases = [
        ([tmp_path / "empty.parquet"], "empty.parquet: the file has no rows"),
        ([tmp_path / "no_l2.parquet"], "no_l2.parquet: no column l2_distance"),
        ([demo / "demo.parquet", "--layers", "50-60"], "--layers 50-60: "),
        ([demo / "demo.parquet", "--out", tmp_path / "a_file" / "sub"], "cannot write there"),
        ([tmp_path / "none-*.parquet"], "no result files match"),
        ([tmp_path / "blank.csv"], "blank.csv: row 4: layer is an empty field, not a whole number (2 such rows)"),
    ]
    csv = table.to_pandas()
    csv.loc[:5, "l2_distance"] = np.nan  # allowed: drawn as missing
    csv.loc[3:4, "layer"] = np.nan  # not allowed: the row would belong to no layer
    csv.to_csv(tmp_path / "blank.csv", index=False)
    (tmp_path / "blank.meta.json").write_text(json.dumps(read_metadata(demo / "demo.parquet")))
    for args, message in cases:
        proc = run_figures(*args, *([] if "--out" in args else ["--out", out]))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and (not out.exists() or not any(out.iterdir())), args


def test_a_flow_file_whose_first_flow_is_a_group_draws_its_heatmap_and_curves(demo, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(demo / "flow.parquet")
    pq.write_table(table.filter(pc.not_equal(pc.cast(table["flow"], "string"), "units->last")),
                   tmp_path / "groups.parquet")
    proc = run_figures(tmp_path / "groups.parquet", "--image", PIGGY, "--out", tmp_path / "figs")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["groups_flows.png", "groups_heatmap.png"]


def _layer_maps(result, picture, mode):
    fig = figures.layer_multiples(result, 0, "Full", "l2", picture, picture_mode=mode)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=figures.DPI)
    return np.asarray(Image.open(buffer).convert("RGB")).astype(int)


def test_the_heat_reads_the_same_over_a_picture_of_any_hue_by_default(demo, tmp_path):
    """Two pictures of one lightness, red and green: the default maps (edges over an opaque heat) and the grey
    ones are the same for both; only --picture colour lets the picture's hue into the cells."""
    result = figures.load(demo / "demo.parquet")
    size = Image.open(PIGGY).size
    red, green = tmp_path / "red.png", tmp_path / "green.png"
    Image.new("RGB", size, (200, 0, 0)).save(red)
    Image.new("RGB", size, (0, 102, 0)).save(green)  # the luminance of (200, 0, 0)
    assert figures.PICTURE_MODES[0] == "outline"
    for mode in ("outline", "grey"):
        assert np.abs(_layer_maps(result, red, mode) - _layer_maps(result, green, mode)).max() <= 2, mode
    assert np.abs(_layer_maps(result, red, "colour") - _layer_maps(result, green, "colour")).max() > 60
    # Over the bundled picture, the outlines are black lines over cells that keep their colour-bar colour.
    maps = _layer_maps(result, PIGGY, "outline")
    plain = _layer_maps(result, red, "outline")
    differ = np.abs(maps - plain).sum(-1) > 30
    assert 0.002 < differ.mean() < 0.15 and (maps[differ].sum(-1) < plain[differ].sum(-1)).mean() > 0.9


def test_the_readme_figures_commands_run_as_written(demo, tiny_vl_dir, tmp_path):
    """The figures block of docs/figures.md, line by line, in a directory laid out as after `make demo`."""
    import re
    import shlex

    block = re.search(r"# Figures\n.*?```\n(.*?)```", (ROOT / "docs" / "figures.md").read_text(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.startswith(".venv/bin/python")]
    assert len(commands) == 4
    (tmp_path / "output").mkdir()
    for ours, theirs in (("demo", "demo"), ("flow", "demo_flow")):
        (tmp_path / "output" / f"{theirs}.parquet").write_bytes((demo / f"{ours}.parquet").read_bytes())
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "tiny-qwen3-vl").symlink_to(tiny_vl_dir)
    (tmp_path / "mask_impact_vl.py").symlink_to(ROOT / "mask_impact_vl.py")
    for command in commands:
        argv = shlex.split(command)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    written = {p.name for p in (tmp_path / "output" / "figures").iterdir()}
    assert {"demo_layers.png", "demo_heatmap.png", "demo_flow_flows.svg", "demo_flow_heatmap.pdf",
            "batch_curves.png", "batch.summary.csv"} <= written, written
    summary = pd.read_csv(tmp_path / "output" / "figures" / "batch.summary.csv")
    assert set(summary.n) == {3}  # the three like prompts, averaged
    assert not (ROOT / "figs").exists() and not (ROOT / "figures").exists()


# -- two measures of one run ------------------------------------------------------------------

def test_a_layer_and_an_attention_file_of_one_run_draw_a_scatter_with_spearmans_rho(tiny_vl_dir, tmp_path):
    out = tmp_path / "runs"
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
            "--mask-mode", "both", "--num-tokens", 1, "--measure", "layer,attention", "--output-dir", out,
            "--output", "both", "--formats", "parquet", check=True)
    layer, attention = figures.load(out / "both.layer.parquet"), figures.load(out / "both.attention.parquet")
    fig, rho, n = figures.scatter(layer, attention, step=0, layer=1)
    # the same units and numbers as the files: pandas' own Spearman on the file's rows
    a = read_table(out / "both.layer.parquet")
    b = read_table(out / "both.attention.parquet")
    pick = lambda t, v: t[(t.generation_step == 0) & (t.layer == 1) & (t.variant.astype(str) == v)].set_index(
        "unit_positions")
    x, y = pick(a, "Full").l2_distance, pick(b, "Mean").attention
    assert n == len(x) == len(y) > 10
    # Spearman's rho: Pearson's correlation of the ranks (ties at their mean rank)
    assert rho == pytest.approx(x.rank().corr(y[x.index].rank()), abs=1e-12)
    assert f"Spearman rho {rho:.3f}" in fig.texts[0].get_text() and "layer 1" in fig.texts[0].get_text()
    written = figures.main([str(out / "both.layer.parquet"), str(out / "both.attention.parquet"), "--out",
                            str(tmp_path / "figs"), "--heads-layer", "1"], log=lambda line: None)
    names = {os.path.basename(p) for p in written}
    assert "both.layer_vs_attention_layer1.png" in names
    assert {"both.layer_heatmap.png", "both.attention_heatmap.png", "both.attention_layers.png"} <= names
    with Image.open(tmp_path / "figs" / "both.layer_vs_attention_layer1.png") as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((33, 102, 172), (214, 96, 77)):  # image and text units' points
        assert (np.abs(pixels - colour).max(axis=1) <= 12).sum() > 20, colour


def test_spearman_ranks_ties_by_their_mean_and_refuses_too_few_pairs():
    assert figures.spearman(np.array([1.0, 2, 2, 3]), np.array([10.0, 20, 20, 30])) == pytest.approx(1.0)
    x, y = np.array([3.0, 1, 2, 5, 4]), np.array([1.0, 2, 3, 4, 5])
    assert figures.spearman(x, y) == pytest.approx(1 - 6 * ((x - y) ** 2).sum() / (5 * (25 - 1)))  # no ties
    assert np.isnan(figures.spearman(np.array([1.0, 2]), np.array([2.0, 1])))
    assert np.isnan(figures.spearman(np.array([1.0, 1, 1]), np.array([2.0, 1, 3])))


def test_the_interval_of_a_mean_over_prompts_never_crosses_what_the_metric_can_take():
    """A skewed metric (a KL: one prompt far above the others) gets a bootstrap interval inside the values'
    range, where a t interval goes below zero; the interval is the same every time (seeded)."""
    kl = np.array([0.0, 0.01, 0.02, 0.0, 3.0])
    mean, low, high = figures.mean_interval(kl)
    t_low = kl.mean() - 2.776 * kl.std(ddof=1) / np.sqrt(len(kl))  # Student's t, 4 degrees of freedom
    assert t_low < 0 <= low <= mean <= high <= kl.max() and mean == pytest.approx(kl.mean())
    assert figures.mean_interval(kl) == (mean, low, high)
    # on well-behaved values it is close to the t interval
    x = np.random.default_rng(1).normal(5, 1, size=200)
    _, low, high = figures.mean_interval(x)
    half = 1.972 * x.std(ddof=1) / np.sqrt(len(x))
    assert abs(low - (x.mean() - half)) < 0.1 * half and abs(high - (x.mean() + half)) < 0.1 * half
    assert all(np.isnan(v) for v in figures.mean_interval(np.array([1.0]))[1:])


def test_mark_outlines_the_evidence_cell_on_every_image_map(demo, tmp_path):
    """--mark ROW,COL draws a green box around that cell on each layer's map (where the evidence is); a cell off
    the grid is one line."""
    from vl_masking.figures import main

    def green(out):
        picture = np.asarray(Image.open(out / "demo_layers.png").convert("RGB")).astype(int)
        return int(((abs(picture[..., 0] - 0) < 40) & (abs(picture[..., 1] - 200) < 40)
                    & (abs(picture[..., 2] - 83) < 40)).sum())

    main([str(demo / "demo.parquet"), "--out", str(tmp_path / "plain")], log=lambda _: None)
    main([str(demo / "demo.parquet"), "--mark", "1,2", "--out", str(tmp_path / "marked")], log=lambda _: None)
    assert green(tmp_path / "marked") > green(tmp_path / "plain") + 200
    proc = run_figures(demo / "demo.parquet", "--mark", "3,0", "--out", tmp_path / "off")
    assert proc.returncode == 2 and "--mark 3,0: outside the 3x5 grid" in proc.stderr
