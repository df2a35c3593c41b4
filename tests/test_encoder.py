"""--measure encoder: a picture unit hidden from one vision-tower block's attention, every query of the picture
read. Exact against the tower's own block re-run with an additive key mask; the tower tokens under each
language-model token checked with a picture painted one colour per cell; refusals before the weights load."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, vl_settings
from test_figures import run_figures
from vl_masking.api import run
from vl_masking.reference import reference_encoder
from vl_masking.tower import picture_views
from vl_masking.tiny_models import (build_gemma3, build_idefics3, build_internvl, build_llava, build_llava_next,
                                     build_llava_onevision, build_qwen2_vl, build_qwen3_vl)

FAMILIES = {"qwen2_vl": lambda out: build_qwen2_vl(out), "qwen3_vl": lambda out: build_qwen3_vl(out, layers=2),
            # windows of 64 px: a 160x96 picture is 6 windows, the last block attends to the whole picture
            "qwen2_5_vl": lambda out: build_qwen2_vl(out, model_type="qwen2_5_vl"),
            # CLIP: a CLS token first, each picture a batch entry, the last block never reaches the language model
            "llava": lambda out: build_llava(out),
            # SigLIP: no CLS token, 4x4 patches pooled under each soft token by the projector
            "gemma3": lambda out: build_gemma3(out),
            # tiles (and a thumbnail or a global image), each a batch entry; the connector's pixel shuffle
            "internvl": lambda out: build_internvl(out),
            "idefics3": lambda out: build_idefics3(out),
            "smolvlm": lambda out: build_idefics3(out, model_type="smolvlm"),
            # a base image and tiles laid into an unpadded mosaic with a newline token after each row
            "llava_next": lambda out: build_llava_next(out),
            "llava_onevision": lambda out: build_llava_onevision(out, most_tiles=9)}  # SigLIP; not resampled


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tower_model(request, tmp_path_factory):
    return request.param, FAMILIES[request.param](tmp_path_factory.mktemp("towers") / request.param)


def painted(path, rows=3, cols=5, cell=32):
    """A picture whose language-model cells (cell x cell pixels at merge 2, patch 16) each have their own
    colour; returns the colours, row-major."""
    colours = [((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256) for i in range(rows * cols)]
    pixels = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        r, c = divmod(i, cols)
        pixels[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = colour
    Image.fromarray(pixels).save(path)
    return colours


def every_reference_error(analysis, per_block: int | None = None) -> float:
    """The largest difference from the reference re-run, as a share of its float32 bound: n eps times the size of
    the quantity (n: the longest float32 sum in a block, eps: float32's). Every row of the table, or, with
    per_block, every block's rows of that many units: the first, the last and others drawn with a fixed seed (a
    wrong cell map or mask is wrong for whole blocks; the tiled families' token units are hundreds of re-runs)."""
    measure, table = analysis.measure, analysis.table
    widest = max(max(p.shape) for p in measure.tower.blocks[0].parameters())  # the MLP's intermediate size
    n = max(widest, max(sum(len(c) for c in picture) for picture in measure.tower.cells))
    eps = float(np.finfo(np.float32).eps)
    rng = np.random.default_rng(0)
    worst = 0.0
    for block, _ in measure.records:
        rows = table[table["layer"] == block]
        chosen = range(len(measure.cells))
        if per_block is not None and len(measure.cells) > per_block:
            inner = rng.choice(np.arange(1, len(measure.cells) - 1), per_block - 2, replace=False)
            chosen = [0, *sorted(int(i) for i in inner), len(measure.cells) - 1]
        for u in chosen:
            cells = measure.cells[u]
            expected = reference_encoder(measure.tower, measure.record, block, cells)
            for name, (l2, cos) in expected.items():
                row = rows[(rows["variant"].astype(str) == name) & (rows.token_position == measure.units[u].first)]
                assert len(row) == 1, (block, u, name)
                row = row.iloc[0]
                worst = max(worst, abs(row.l2_distance - l2) / (n * eps * max(row.base_norm, 1e-30)),
                            abs(row.cosine_distance - cos) / (n * eps))
    return worst


@pytest.mark.parametrize("unit", ["token", "region:2x2", "image"])
def test_the_encoder_measure_equals_the_tower_block_rerun_with_a_key_mask(tower_model, tmp_path, unit):
    family, model = tower_model
    painted(tmp_path / "cells.png")
    picture = str(tmp_path / "cells.png")
    settings = vl_settings(model, tmp_path, images=[picture, picture], measure=("encoder",), mask_unit=unit,
                           mask_mode="vision", num_tokens=1)
    analysis = run(settings, save=False, progress=False, log=lambda *a: None).analysis
    table = analysis.table
    assert set(table.generation_step) == {0} and len(table) > 0
    heads = analysis.measure.tower.num_heads
    assert set(table.variant.astype(str)) == {f"{v}{s}" for v in ["Full", "Attn", *(f"Head_{h}" for h in range(heads))]
                                              for s in ("", " outside")}
    assert every_reference_error(analysis, per_block=12 if unit == "token" else None) <= 1.0
    whole = table[table.unit_kind.astype(str) == "image"]
    if len(whole):  # outside a unit that holds every cell: only tokens under no cell (CLIP's CLS), if any
        tower = analysis.measure.tower
        extra = sum(e - s for s, e in tower.pictures) - sum(len(c) for cells in tower.cells for c in cells)
        outside = whole[whole.variant.astype(str).str.endswith(" outside")]
        assert (outside.l2_distance == 0).all() if extra == 0 else (outside.l2_distance > 0).all()


def tower_of(model, picture) -> tuple:
    """(loaded model, prompt inputs, its tower) for one picture."""
    from vl_masking.inputs import build_inputs, load_model
    from vl_masking.options import RunSettings

    settings = RunSettings(model=str(model), prompt="What is it?", images=[str(picture)], device="cpu",
                           dtype="float32", tool="vl", measure=("encoder",))
    loaded = load_model(settings)
    inputs = build_inputs(loaded, settings)
    return loaded, inputs, loaded.adapter.tower(loaded.model, inputs.model_kwargs, picture_views(inputs.tokens))


def test_gemma3s_soft_tokens_stand_over_the_patches_of_their_own_cell(tmp_path):
    """Gemma 3's projector pools k x k patches into one soft token: the picture painted one colour per soft
    token's cell (at the tower's input size, so that nothing is resampled), every patch under token j is j's."""
    model = FAMILIES["gemma3"](tmp_path / "gemma3")
    loaded, _, _ = tower_of(model, "examples/piggy.png")
    vision = loaded.config.vision_config
    side = int(round(loaded.config.mm_tokens_per_image ** 0.5))
    colours = painted(tmp_path / "cells.png", rows=side, cols=side, cell=vision.image_size // side)
    _, inputs, tower = tower_of(model, tmp_path / "cells.png")
    pixels = inputs.model_kwargs["pixel_values"][0].numpy()  # (3, H, W), normalised
    mean, std = np.array(loaded.image_processor.image_mean), np.array(loaded.image_processor.image_std)
    size, per_side = vision.patch_size, vision.image_size // vision.patch_size
    assert len(tower.cells[0]) == len(colours)
    for j, cells in enumerate(tower.cells[0]):
        assert len(cells) == (per_side // side) ** 2
        for patch in cells.tolist():
            r, c = divmod(patch, per_side)
            block = pixels[:, r * size:(r + 1) * size, c * size:(c + 1) * size].reshape(3, -1)
            seen = np.rint((block * std[:, None] + mean[:, None]) * 255)
            assert np.all(seen == np.array(colours[j])[:, None]), (j, patch)


@pytest.mark.parametrize("family", ["internvl", "idefics3", "smolvlm"])
def test_the_patches_a_pixel_shuffle_gathers_under_a_token_are_that_tokens_part_of_its_tile(family, tmp_path):
    """A 64 x 64 picture painted one colour per language-model cell of its tiles (InternVL: one tile; Idefics3
    and SmolVLM: 2 x 2 tiles, cut without resampling): every patch under the token of cell (r, c) of a tile,
    read from the tower's input, is that cell's colour. The global image, resampled, is not read."""
    model = FAMILIES[family](tmp_path / family)
    loaded, inputs, _ = tower_of(model, "examples/piggy.png")
    views = picture_views(inputs.tokens)[0]
    side_rows, side_cols = views[0].grid_rows, views[0].grid_cols
    probe = Image.new("RGB", (64, 64))
    probe.save(tmp_path / "probe.png")
    _, inputs, _ = tower_of(model, tmp_path / "probe.png")
    tiles = [tuple(map(int, v.name.split()[1].split(","))) for v in picture_views(inputs.tokens)[0] if v.name.startswith("tile")]
    tile_rows, tile_cols = (max(r for r, _ in tiles) + 1, max(c for _, c in tiles) + 1) if tiles else (1, 1)
    colours = painted(tmp_path / "cells.png", rows=tile_rows * side_rows, cols=tile_cols * side_cols,
                      cell=64 // (tile_cols * side_cols))
    _, inputs, tower = tower_of(model, tmp_path / "cells.png")
    pixels = inputs.model_kwargs["pixel_values"]
    pixels = pixels.reshape(-1, *pixels.shape[-3:]).numpy()  # (entries, 3, H, W), normalised
    size = pixels.shape[-1] // (side_cols * int(round(len(tower.cells[0][0]) ** 0.5)))  # a patch's pixels
    per_side = pixels.shape[-1] // size
    start, end = tower.pictures[0]
    length = (end - start) // len(pixels)
    first = length - per_side * per_side  # a CLS token before the patches
    mean, std = np.array(loaded.image_processor.image_mean), np.array(loaded.image_processor.image_std)
    read = 0
    for v, view in enumerate(picture_views(inputs.tokens)[0]):
        if tiles and not view.name.startswith("tile"):
            continue
        tr, tc = tuple(map(int, view.name.split()[1].split(","))) if tiles else (0, 0)
        for j in range(side_rows * side_cols):
            r, c = divmod(j, side_cols)
            colour = colours[(tr * side_rows + r) * tile_cols * side_cols + tc * side_cols + c]
            cells = tower.cells[0][v * side_rows * side_cols + j]
            assert len(cells) == (per_side // side_cols) ** 2
            for token in cells.tolist():
                entry, patch = divmod(token - start, length)
                pr, pc = divmod(patch - first, per_side)
                block = pixels[entry, :, pr * size:(pr + 1) * size, pc * size:(pc + 1) * size].reshape(3, -1)
                seen = np.rint((block * std[:, None] + mean[:, None]) * 255)
                assert np.all(seen == np.array(colour)[:, None]), (v, j, token)
                read += 1
    assert read == 64 * 64 // (size * size) and (len(tiles) == 4) == (family != "internvl")


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_each_mosaic_token_is_the_projector_of_the_tower_token_under_it(family, tmp_path):
    """The base image and the tiles' unpadded mosaic: every image token the language model receives (from the
    model's own get_image_features) is the projector's output of the one tower token the tower maps under it,
    taken from the tower's own hidden states, and each newline token has none."""
    import torch

    model = FAMILIES[family](tmp_path / family)
    loaded, inputs, tower = tower_of(model, "examples/piggy.png")
    inner, kwargs = loaded.model.model, inputs.model_kwargs
    with torch.no_grad():
        out = inner.get_image_features(kwargs["pixel_values"], kwargs["image_sizes"],
                                       **loaded.adapter.image_feature_kwargs(), output_hidden_states=True)
        packed = out.pooler_output
        packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
        hidden = out.hidden_states[loaded.config.vision_feature_layer]
        projected = inner.multi_modal_projector(hidden.reshape(-1, hidden.shape[-1]))  # every tower token
    cells = tower.cells[0]
    assert len(cells) == len(packed)
    views = picture_views(inputs.tokens)[0]
    newlines = [p - views[0].start for v in views for p in range(v.start, v.end)
                if inputs.tokens.grid_col[p] < 0]
    assert newlines and all(len(cells[j]) == 0 for j in newlines)
    for j, under in enumerate(cells):
        if j in newlines:
            continue
        assert len(under) == 1
        # the same rows through the same projector, in other batch shapes: float32 sums of `width` terms may round
        # differently on another CPU's kernels, by at most width eps times the size of the values
        bound = hidden.shape[-1] * float(np.finfo(np.float32).eps) * float(projected.abs().max())
        torch.testing.assert_close(packed[j], projected[int(under[0])], rtol=0, atol=bound)


def processor_order(family, visual, grid, patches: int):
    """order[g]: the processor's patch at the blocks' position g, from transformers' own window index (Qwen2.5-VL
    reorders its tokens into windows before the blocks; the others keep the processor's order)."""
    import torch

    if family != "qwen2_5_vl":
        return torch.arange(patches)
    vision_utils = pytest.importorskip("transformers.vision_utils")
    window, _ = vision_utils.get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                    window_size=visual.window_size, patch_size=visual.patch_size)
    merge = visual.spatial_merge_size ** 2
    return (window[:, None] * merge + torch.arange(merge)).reshape(-1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_tower_tokens_under_each_cell_hold_that_cells_pixels(family, tmp_path):
    """Each language-model token's tower tokens are the patches of its own cell: the picture painted one colour
    per cell, every patch under cell j (in the blocks' order, mapped back to the processor's rows) is cell j's
    colour."""
    model = FAMILIES[family](tmp_path / family)
    colours = painted(tmp_path / "cells.png")
    loaded, inputs, tower = tower_of(model, tmp_path / "cells.png")
    pixels = inputs.model_kwargs["pixel_values"].numpy()  # one row per patch: C x T x P x P, normalised
    order = processor_order(family, tower.module, inputs.model_kwargs["image_grid_thw"], len(pixels)).numpy()
    if family == "qwen2_5_vl":
        assert not np.array_equal(order, np.arange(len(pixels)))  # the windows do reorder this picture
    mean, std = np.array(loaded.image_processor.image_mean), np.array(loaded.image_processor.image_std)
    assert len(tower.cells[0]) == len(colours)
    for j, cells in enumerate(tower.cells[0]):
        patches = pixels[order[cells.numpy()]].reshape(len(cells), 3, -1)
        seen = np.rint((patches * std[None, :, None] + mean[None, :, None]) * 255)
        assert np.all(seen == np.array(colours[j])[None, :, None]), j


def test_the_encoder_measure_is_refused_in_one_line_before_the_weights_load(tiny_text_dir, tmp_path):
    stacked = build_llava(tmp_path / "stacked")  # features of two blocks concatenated
    config = json.loads((stacked / "config.json").read_text())
    (stacked / "config.json").write_text(json.dumps({**config, "vision_feature_layer": [-2, -1]}))
    llava = build_llava(tmp_path / "llava")
    picture = ["--image", "examples/piggy.png"]
    resampled = build_llava_onevision(tmp_path / "resampled")  # anyres_max_1: the piglet's mosaic is resampled
    for model, extra, said in [(stacked, picture, "features concatenated from several blocks"),
                               (resampled, picture, "resamples the grid of image 0 tiles"),
                               (llava, [*picture, "--encoder-layers", "1"], "block 1 never reach"),
                               (build_qwen3_vl(tmp_path / "q3", layers=2), [], "give an --image")]:
        (model / "model.safetensors").write_bytes(b"not weights")  # read only if the refusal came too late
        proc = run_cli("mask_impact_vl.py", "--model", model, "--prompt", "Hi", *extra, "--measure", "encoder",
                       "--device", "cpu", "--output-dir", tmp_path / "out")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and said in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "Hi", "--measure", "encoder",
                   "--device", "cpu", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and "vision-language model" in proc.stderr, proc.stderr


def test_an_encoder_file_gets_the_maps_per_block_and_the_heads_figure(tiny_vl_dir, tmp_path):
    run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", "examples/piggy.png", "--prompt", "What is it?",
            "--mask-mode", "vision", "--measure", "encoder", "--encoder-layers", "1", "--output-dir", tmp_path,
            "--output", "tower", "--formats", "parquet", check=True)
    proc = run_figures(tmp_path / "tower.parquet", "--image", "examples/piggy.png", "--out", tmp_path / "figures")
    assert proc.returncode == 0, proc.stderr
    # the heads are Head_h exactly: "Head_0 outside" is a series of its own
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "tower_heads_layer1.png", "tower_heatmap.png", "tower_layers.png"], proc.stdout


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_encoder_flow_equals_one_full_forward_per_configuration(tower_model, tmp_path, attention):
    """(window, unit) knockouts and units replaced after the projector (mean, zero), 16 drawn at random, against
    one full forward of the model each, the window's vision attention through the reference's own float64 key
    mask."""
    from test_flow import TOLERANCE, sharpen
    from vl_masking.inputs import load_model

    family, model = tower_model
    picture = str(tmp_path / "cells.png")
    painted(picture)
    settings = vl_settings(model, tmp_path, images=[picture, picture], measure=("encoder-flow",),
                           mask_unit="region:2x2", mask_mode="vision", num_tokens=1, vision_attention=attention,
                           check=16)
    loaded = sharpen(load_model(settings))  # a peaked prediction, so that the changes mean something
    analysis = run(settings, loaded=loaded, save=False, progress=False, log=lambda *a: None).analysis
    table, measure = analysis.table, analysis.measure
    check = analysis.metadata["check"]
    assert len(check["checked"]) == min(16, len(table)) and check["max_error"] < TOLERANCE, check["max_error"]
    depth = len(measure.tower.blocks)
    assert list(table.flow.cat.categories) == ["knockout", "mean after projector", "zero after projector"]
    knockout = table[table.flow == "knockout"]
    assert sorted(set(knockout.layer)) == measure.tower.measured
    assert ((knockout.window_start <= knockout.layer) & (knockout.layer <= knockout.window_end)).all()
    assert (table[table.flow != "knockout"].layer == depth).all()
    assert (table.kl > 0).any() and (table.generation_step == 0).all()


@pytest.mark.parametrize("family,build,blocks", [
    # DeepStack taps after blocks 0 and 1: read from replayed outputs when the window starts later
    ("qwen3_vl", lambda out: build_qwen3_vl(out, layers=2, vision_depth=4), "model.visual.blocks"),
    ("qwen2_5_vl", lambda out: build_qwen2_vl(out, model_type="qwen2_5_vl", vision_depth=4),  # windowed order
     "model.visual.blocks"),
    ("llava", lambda out: build_llava(out, vision_layers=4),  # CLS token, pictures a batch, the last block unread
     "model.vision_tower.encoder.layers")])
def test_encoder_flow_does_not_rerun_the_blocks_before_its_window_and_stays_exact(family, build, blocks, tmp_path):
    """With one-block windows, the window at block b replays blocks 0 .. b - 1 from the recorded pass, and the
    ablation after the projector replays every block: block b runs b + 3 times in the whole run (the generation,
    the recorded pass, the windows at blocks 0 .. b in one batch each; with no reuse every block would run equally
    often), and every configuration still equals one full forward of the model."""
    from test_flow import TOLERANCE
    from vl_masking.inputs import load_model

    picture = str(tmp_path / "cells.png")
    painted(picture)
    settings = vl_settings(build(tmp_path / family), tmp_path, images=[picture], measure=("encoder-flow",),
                           mask_unit="region:2x2", mask_mode="vision", num_tokens=1, encoder_window=1)
    loaded = load_model(settings)
    calls = {}  # block -> how often its MLP ran
    handles = [block.mlp.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
               for i, block in enumerate(loaded.model.get_submodule(blocks))]
    try:
        analysis = run(settings, loaded=loaded, save=False, progress=False, log=lambda *a: None).analysis
    finally:
        for handle in handles:
            handle.remove()
    measure, table = analysis.measure, analysis.table
    assert len(measure.tower.measured) >= 3
    assert [calls[b] for b in measure.tower.measured] == [b + 3 for b in measure.tower.measured], calls
    check = measure.check(None, len(table), table)
    assert len(check["checked"]) == len(table) and check["max_error"] < TOLERANCE, check["max_error"]
