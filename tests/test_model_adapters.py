"""The model-adapter seam: each family's image tokens are laid on the grid its vision tower read, both
measures equal the reference on every family, and Qwen3-VL's numbers are those it had before the seam."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from conftest import PIGGY, ROOT
from vl_masking.api import run
from vl_masking.options import RunSettings
from vl_masking.results import read_table
from vl_masking.tiny_models import build_qwen3_vl

DATA = ROOT / "tests" / "data"


def test_qwen3_vl_outputs_equal_the_files_written_before_the_adapter_seam(tmp_path):
    """tests/data/qwen3_vl_*.parquet were written by the code before vl_masking/models/ existed (same
    tiny model, seed 0, one thread): both measures must give the same rows and numbers."""
    model = build_qwen3_vl(tmp_path / "tiny-qwen3-vl", layers=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = dict(model=str(model), prompt="Describe this image.", images=[str(PIGGY)], num_tokens=2,
                      mask_mode="both", device="cpu", dtype="float32", output_dir=str(tmp_path),
                      formats=("parquet",))
        layer = run(RunSettings(**common, output="layer"), save=False, progress=False, log=lambda *a: None).table
        flow = run(RunSettings(**common, output="flow", measure="flow", flows=("units->last", "image->question"),
                               window=3, mask_unit="region:2x2"), save=False, progress=False, log=lambda *a: None).table
    finally:
        torch.set_num_threads(threads)
    config = AutoConfig.from_pretrained(model).text_config
    for name, table in (("layer", layer), ("flow", flow)):
        before = read_table(DATA / f"qwen3_vl_{name}.parquet")
        # columns added since (the flow's predicted_token and correct) come on top of the ones compared
        assert [c for c in table.columns if c in before.columns] == list(before.columns), name
        assert len(table) == len(before), name
        bounds = float32_bounds(before, config)
        for column in before.columns:
            a, b = table[column], before[column]
            if a.dtype.kind == "f":
                error = np.abs(a.to_numpy(np.float64) - b.to_numpy(np.float64))
                assert (np.isnan(a) == np.isnan(b)).all(), (name, column)
                assert np.nanmax(error / bounds[column]) <= 1, (name, column, float(np.nanmax(error / bounds[column])))
            else:
                assert a.astype(str).tolist() == b.astype(str).tolist(), (name, column)


def float32_bounds(table, config) -> dict:
    """Per float column, how far another x86-64 CPU may move a stored value: the files were written on one
    machine, and another one's kernels (AVX2, AVX-512, none) sum the same float32 products in another order.
    A float32 sum of n terms may move by n * eps * (the size of what it sums); the longest sums of a layer run
    over the MLP's intermediate size, so n = intermediate_size, times the size each quantity is measured
    against: a distance against the vector it measures (base_norm), a cosine distance and the KL divergence
    against 1, a probability against itself, a change of the log-probability against 1, rel_change_pct (in
    percent of base_prob) against 100 * prob / base_prob."""
    eps = float(np.finfo(np.float32).eps)
    n = config.intermediate_size
    one = np.ones(len(table))
    scale = {"l2_distance": table.get("base_norm", one), "base_norm": table.get("base_norm", one),
             "cosine_distance": one, "kl": one, "delta_logprob": one,
             "prob": table.get("prob", one), "base_prob": table.get("base_prob", one),
             "rel_change_pct": 100 * table.get("prob", one) / table.get("base_prob", one)}
    return {c: n * eps * np.asarray(scale[c], dtype=np.float64) for c in table.columns if c in scale}


# -- every family through the same seam -------------------------------------------------------

from conftest import all_errors, analyse_vl, run_cli, vl_settings  # noqa: E402
from test_flow import max_flow_error, sharpen  # noqa: E402
from vl_masking.inputs import load_model  # noqa: E402
from vl_masking.tiny_models import (build_gemma3, build_idefics3, build_internvl, build_llava,  # noqa: E402
                                    build_llava_next, build_llava_onevision, build_qwen2_vl)

FAMILIES = {
    "qwen2_vl": lambda path: build_qwen2_vl(path, model_type="qwen2_vl"),
    "qwen2_5_vl": lambda path: build_qwen2_vl(path, model_type="qwen2_5_vl"),
    "llava": build_llava,
    "llava_next": build_llava_next,  # a base image and a mosaic of 56-pixel tiles, a newline after each row
    "llava_onevision": build_llava_onevision,  # as LLaVA-NeXT, the mosaic resampled to at most a tile's cells
    # a sliding window (10) shorter than an image (16 tokens): its tokens see each other only inside it
    "gemma3": lambda path: build_gemma3(path, sliding_window=10),
    # tiles: up to 4 of 64 px and a thumbnail
    "internvl": lambda path: build_internvl(path, max_patches=4),
    # sub-images of 32 px between marker tokens, each its own run of image tokens, and the global image
    "idefics3": build_idefics3,
    "smolvlm": lambda path: build_idefics3(path, model_type="smolvlm"),
}
FAMILY_NAMES = {"qwen2_vl": "Qwen-VL", "qwen2_5_vl": "Qwen-VL", "llava": "LLaVA", "llava_next": "LLaVA-NeXT",
                "llava_onevision": "LLaVA-OneVision", "gemma3": "Gemma 3", "internvl": "InternVL",
                "idefics3": "Idefics3", "smolvlm": "SmolVLM"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, directory, the model loaded as the command line loads it) of each new family."""
    path = FAMILIES[request.param](tmp_path_factory.mktemp("families") / request.param)
    return request.param, path, load_model(RunSettings(model=str(path), prompt="-", device="cpu", dtype="float32"))


@pytest.mark.parametrize("vision_attention", ["bidirectional", "causal"])
def test_the_layer_measure_equals_the_reference_on_every_family(family, tall_image, tmp_path, vision_attention):
    _, _, loaded = family
    settings = vl_settings(loaded.name, tmp_path, images=[str(PIGGY), str(tall_image)], prompt="Compare them.",
                           vision_attention=vision_attention, num_tokens=2)
    analysis, _ = analyse_vl(loaded, settings)
    assert all_errors(analysis) < 1e-5
    table, views = analysis.table, analysis.metadata["images"]
    assert set(table.image_index[table.token_type.astype(str) == "vision"]) == {v["index"] for v in views}
    assert {v.get("picture", v["index"]) for v in views} == {0, 1}  # two pictures, in one view or several


def test_the_flow_measure_equals_the_reference_on_every_family(family, tall_image, tmp_path):
    _, _, loaded = family
    sharpen(loaded)
    try:
        settings = vl_settings(loaded.name, tmp_path, images=[str(PIGGY), str(tall_image)], prompt="Is it pink?",
                               measure="flow", window=3, num_tokens=2, mask_unit="region:2x2",
                               flows=("units->last", "image->question", "image:0->image:1"))
        analysis, _ = analyse_vl(loaded, settings)
        assert max_flow_error(analysis, per_window=6) < 1e-5
        assert analysis.table.rel_change_pct.abs().max() > 1
    finally:
        sharpen(loaded, 1 / 20)


def test_every_family_runs_from_the_cli_the_api_and_a_batch(family, tmp_path):
    import yaml

    from vl_masking import run_vl_masking

    model_type, path, _ = family
    proc = run_cli("mask_impact_vl.py", "--model", path, "--image", PIGGY, "--prompt", "Describe this image.",
                   "--mask-mode", "both", "--mask-unit", "region:2x2", "--num-tokens", 2, "--check", 20,
                   "--output", "cli", "--output-dir", tmp_path, check=True)
    assert "max error" in proc.stdout
    meta = read_metadata(tmp_path / "cli.parquet")
    assert meta["check"]["max_error"] < 1e-5 and len(meta["check"]["checked"]) == 20
    assert meta["family"] == FAMILY_NAMES[model_type]
    table = run_vl_masking("Describe this image.", images=[str(PIGGY)], model=str(path), mask_mode="vision",
                           measure="flow", window=3)
    assert (table.token_type.astype(str) == "vision").all() and len(table)
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"model": str(path), "mask_mode": "both", "output_dir": "out"},
                                      "prompts": [{"name": "one", "image": str(PIGGY), "prompt": "What is it?"}]}))
    run_cli("mask_impact_vl.py", "--config", config, check=True)
    assert len(read_table(tmp_path / "out" / "one.parquet"))


from vl_masking.results import read_metadata  # noqa: E402


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
@pytest.mark.parametrize("vision_attention", ["bidirectional", "causal"])
def test_gemma3_prompt_attention_is_the_models_own_in_both_modes(family, tmp_path, tall_image, vision_attention):
    """Gemma 3's own mask (transformers builds it from token_type_ids) lets an image's tokens see each
    other, inside the sliding window on local layers. The default mode must be that mask: the tool's
    base probability of each step's token equals a fresh sdpa model's forward with token_type_ids, and
    in causal mode the forward without them; the two differ, so the comparison can fail."""
    from transformers import AutoModelForImageTextToText

    from vl_masking.tools import VL

    _, path, loaded = family
    assert VL.default_vision_attention == "bidirectional"
    settings = vl_settings(loaded.name, tmp_path, images=[str(PIGGY), str(tall_image)], prompt="Compare them.",
                           measure="flow", window=1, flows=("image->last",), layers="0", num_tokens=3,
                           vision_attention=vision_attention)
    analysis, inputs = analyse_vl(loaded, settings)
    assert analysis.metadata["model_vision_attention"] == "bidirectional"
    assert analysis.metadata["vision_attention"] == vision_attention
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    kwargs = {k: v for k, v in inputs.model_kwargs.items() if k != "attention_mask"}
    final = torch.tensor(analysis.metadata["final_ids"])[None]
    prompt_length = inputs.prompt_length
    image = torch.zeros_like(final)
    image[0, :prompt_length] = (inputs.input_ids[0] == loaded.adapter.image_token_id).long()
    table = analysis.table
    for step, token in enumerate(analysis.metadata["generated_ids"]):
        ids = final[:, : prompt_length + step]
        with torch.no_grad():
            own = model(**{**kwargs, "input_ids": ids}, token_type_ids=image[:, : ids.shape[1]]).logits[0, -1]
            plain = model(**{**kwargs, "input_ids": ids}).logits[0, -1]
        expected = own if vision_attention == "bidirectional" else plain
        other = plain if vision_attention == "bidirectional" else own
        base = float(table.base_prob[table.generation_step == step].iloc[0])
        assert abs(np.log(base) - float(expected.double().log_softmax(-1)[token])) < 1e-5, step
        assert abs(np.log(base) - float(other.double().log_softmax(-1)[token])) > 1e-4, step


# -- the grid is proven: a colour-coded picture, read back where each token's pixels come from ---------

PALETTE = [(int(40 + 13 * k) % 256, int(200 - 11 * k) % 256, int(90 + 29 * k) % 256) for k in range(64)]


def denormalise(pixels: torch.Tensor, processor) -> torch.Tensor:
    mean = torch.tensor(processor.image_mean).view(-1, *([1] * (pixels.dim() - 1)))
    std = torch.tensor(processor.image_std).view(-1, *([1] * (pixels.dim() - 1)))
    return (pixels * std + mean) * 255


def block_picture(path, rows, cols, block_width, block_height):
    """A picture of rows x cols blocks, block (r, c) of colour PALETTE[r * cols + c]."""
    from PIL import Image

    picture = Image.new("RGB", (cols * block_width, rows * block_height))
    for r in range(rows):
        for c in range(cols):
            x, y = c * block_width, r * block_height
            picture.paste(PALETTE[r * cols + c], (x, y, x + block_width, y + block_height))
    picture.save(path)
    return path


def nearest(colour) -> int:
    return int(np.argmin([sum((a - b) ** 2 for a, b in zip(colour, p)) for p in PALETTE]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"], indirect=True)
def test_a_qwen_vl_token_reads_the_block_of_its_grid_cell(family, tmp_path):
    """160x96 pixels, each 32x32 block (one merged token: 2x2 patches of 16) its own colour. The merger joins
    patches 4i..4i+3 of pixel_values into image token i: their colour must be that of the recorded cell."""
    from vl_masking.api import prepare

    _, _, loaded = family
    rows, cols = 3, 5
    path = block_picture(tmp_path / "blocks.png", rows, cols, 32, 32)

    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision"))
    tokens = inputs.tokens
    pixels = inputs.model_kwargs["pixel_values"]  # (patches, 3 * 2 * 16 * 16)
    patches = denormalise(pixels.view(len(pixels), 3, -1).transpose(0, 1), loaded.image_processor)  # (3, n, 512)
    start = tokens.images[0].start
    assert (tokens.images[0].grid_rows, tokens.images[0].grid_cols) == (rows, cols)
    for i in range(rows * cols):
        colours = [tuple(patches[:, 4 * i + j].mean(-1).tolist()) for j in range(4)]
        block = {nearest(colour) for colour in colours}
        assert block == {tokens.grid_row[start + i] * cols + tokens.grid_col[start + i]}, (i, block)


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_a_llava_token_reads_the_patch_of_its_grid_cell_and_the_region_the_crop_kept(family, tmp_path):
    """A 112x70 picture: CLIP's processor resizes it to 90x56 and keeps the centre 56x56 (x 21-91 of the
    picture). Each 14x14 patch of that square gets its own colour (the cut sides are grey). The colour of
    patch (r, c) in pixel_values, the tower's patch order (its embedding i is the convolution of patch
    (i // 4, i % 4)), and the recorded cell of image token i must agree; the metadata's region is the crop."""
    _, _, loaded = family
    from PIL import Image

    width, height, x0, x1, n = 112, 70, 21, 91, 4
    picture = Image.new("RGB", (width, height), (128, 128, 128))
    for y in range(height):
        for x in range(x0, x1):
            u, v = int((x - x0) / (x1 - x0) * n), int(y / height * n)
            picture.putpixel((x, y), PALETTE[v * n + u])
    path = tmp_path / "patches.png"
    picture.save(path)
    from vl_masking.api import prepare

    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision"))
    tokens, span = inputs.tokens, inputs.tokens.images[0]
    assert span.region == (x0, 0, x1, height) and (span.grid_rows, span.grid_cols) == (n, n)
    pixels = inputs.model_kwargs["pixel_values"]  # (1, 3, 56, 56)
    seen = denormalise(pixels[0], loaded.image_processor)
    for r in range(n):
        for c in range(n):
            assert nearest(seen[:, r * 14 + 7, c * 14 + 7].tolist()) == r * n + c, (r, c)
    tower = loaded.model.model.vision_tower.embeddings
    captured = {}
    hook = tower.patch_embedding.register_forward_hook(lambda m, a, out: captured.__setitem__("conv", out))
    try:
        with torch.no_grad():
            embedded = tower(pixels)
    finally:
        hook.remove()
    position = tower.position_embedding.weight
    for i in range(n * n):
        r, c = tokens.grid_row[span.start + i], tokens.grid_col[span.start + i]
        assert torch.allclose(embedded[0, 1 + i] - position[1 + i], captured["conv"][0, :, r, c], atol=1e-5), i


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_a_gemma3_token_reads_the_pooled_block_of_its_grid_cell(family, tmp_path):
    """A 160x96 picture of 4x4 colour blocks (40x24 px each): the processor stretches it to the tower's
    64x64, whose 8x8 patches the projector average-pools 2x2 into 4x4 tokens. Each patch's tower output is
    replaced by its mean colour (patches in the convolution's row-major order); the projector's own pooling
    then gives every image token a colour, which must be that of its recorded cell."""
    from vl_masking.api import prepare

    _, _, loaded = family
    n = 4
    path = block_picture(tmp_path / "blocks.png", n, n, 40, 24)
    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision"))
    tokens, span = inputs.tokens, inputs.tokens.images[0]
    assert (span.grid_rows, span.grid_cols) == (n, n) and span.region is None
    seen = denormalise(inputs.model_kwargs["pixel_values"][0], loaded.image_processor)  # (3, 64, 64)
    patch = loaded.config.vision_config.patch_size
    colours = seen.unfold(1, patch, patch).unfold(2, patch, patch).mean((-1, -2))  # (3, 8, 8)
    projector = loaded.model.model.multi_modal_projector
    features = torch.zeros(1, colours[0].numel(), loaded.config.vision_config.hidden_size)
    features[0, :, :3] = colours.flatten(1).T  # patch p = (p // 8, p % 8), as the convolution flattens
    pooled = {}
    hook = projector.avg_pool.register_forward_hook(lambda m, a, out: pooled.__setitem__("out", out))
    try:
        with torch.no_grad():
            projector(features)
    finally:
        hook.remove()
    per_token = pooled["out"].flatten(2).transpose(1, 2)[0]  # (16, hidden): the projector's token order
    for i in range(n * n):
        r, c = tokens.grid_row[span.start + i], tokens.grid_col[span.start + i]
        assert nearest(per_token[i, :3].tolist()) == r * n + c, (i, r, c)


@pytest.mark.parametrize("family", ["internvl"], indirect=True)
def test_an_internvl_token_reads_the_patches_of_its_tile_and_cell(family, tmp_path):
    """A 128x64 picture of 16x16 colour blocks: cut into two 64x64 tiles (side by side) and a thumbnail (the
    whole picture stretched to 64x64). Each tile's 8x8 patches are pixel-shuffled 2x2 into 4x4 tokens by the
    model's own pixel_shuffle; the 4 patches each token reads must be those of its recorded cell of its view,
    placed on the picture through the view's region (a tile's, or all of it for the thumbnail)."""
    from vl_masking.api import prepare

    _, _, loaded = family
    path = block_picture(tmp_path / "blocks.png", 4, 8, 16, 16)
    picture = np.asarray(Image.open(path).convert("RGB"))
    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision"))
    tokens = inputs.tokens
    assert [(v.name, v.region, v.picture) for v in tokens.images] == [
        ("tile 0,0", (0, 0, 64, 64), 0), ("tile 0,1", (64, 0, 128, 64), 0), ("thumbnail", None, 0)]
    pixels = denormalise(inputs.model_kwargs["pixel_values"].transpose(0, 1), loaded.image_processor)  # (3, V, 64, 64)
    patch = loaded.config.vision_config.patch_size[0]
    centres = pixels[:, :, patch // 2::patch, patch // 2::patch].permute(1, 2, 3, 0).contiguous()  # (V, 8, 8, 3)
    shuffled = loaded.model.model.pixel_shuffle(centres, scale_factor=0.5).reshape(len(centres), -1, 4, 3)
    for view in tokens.images:
        x0, y0, x1, y1 = view.region or (0, 0, picture.shape[1], picture.shape[0])
        for i in range(view.start, view.end):
            r, c = tokens.grid_row[i], tokens.grid_col[i]
            read = sorted(nearest(colour) for colour in shuffled[view.index, i - view.start].tolist())
            expected = sorted(nearest(picture[int(y0 + (2 * r + dr + 0.5) / 8 * (y1 - y0)),
                                              int(x0 + (2 * c + dc + 0.5) / 8 * (x1 - x0))].tolist())
                              for dr in (0, 1) for dc in (0, 1))
            assert read == expected, (view.name, r, c, read, expected)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"], indirect=True)
@pytest.mark.parametrize("split", [True, False])
def test_an_idefics3_prompt_is_the_processors_and_a_token_reads_the_patches_of_its_tile_and_cell(family, tmp_path,
                                                                                                 split):
    """The prompt's ids equal those of the family's own processor (markers, row/col tokens, line breaks, the
    global image), for a picture split into 2 x 2 tiles and without splitting (the global image only).
    A picture of colour blocks stretched to the tiles: the 4 patches that the connector's own
    pixel_shuffle gives each image token are those of its recorded cell of its view, through the view's region."""
    import transformers

    from vl_masking.api import prepare

    model_type, _, loaded = family
    width, height = 160, 96
    loaded.image_processor.do_image_splitting = split
    # blocks of 20 x 24 px: a patch centre of the resampled tiles lies at least 3 px from a block's edge
    path = block_picture(tmp_path / "blocks.png", 4, 8, 20, 24)
    picture = np.asarray(Image.open(path).convert("RGB"))
    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision",
                                            prompt="Describe."))
    prompt = loaded.adapter.builtin_prompt("Describe.", 1, None)
    try:
        if model_type == "smolvlm":  # its processor needs torchvision and num2words (for videos): its own
            from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string  # expansion

            info = loaded.image_processor(images=[Image.open(path).convert("RGB")], return_row_col_info=True)
            text = prompt.replace("<image>", get_image_prompt_string(
                info["rows"][0][0], info["cols"][0][0], 16, "<fake_token_around_image>", "<image>", "<global-img>"))
            theirs = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            processor = transformers.Idefics3Processor(loaded.image_processor, loaded.tokenizer, image_seq_len=16)
            theirs = processor(text=prompt, images=[Image.open(path).convert("RGB")])["input_ids"][0]
    finally:
        loaded.image_processor.do_image_splitting = True
    assert inputs.input_ids[0].tolist() == list(theirs)
    tokens = inputs.tokens
    names = [v.name for v in tokens.images]
    assert names == (["tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1", "global"] if split else [""])
    pixels = inputs.model_kwargs["pixel_values"].flatten(0, 1)
    pixels = pixels[(pixels != 0).flatten(1).any(1)]  # the real images (the processor pads with zeros)
    pixels = denormalise(pixels.transpose(0, 1), loaded.image_processor)  # (3, V, 32, 32)
    patch = loaded.config.vision_config.patch_size
    centres = pixels[:, :, patch // 2::patch, patch // 2::patch].permute(1, 2, 3, 0).flatten(1, 2).contiguous()
    shuffled = loaded.model.model.connector.pixel_shuffle(centres, loaded.config.scale_factor)  # (V, 16, 12)
    shuffled = shuffled.reshape(len(centres), -1, 4, 3)
    for view in tokens.images:
        x0, y0, x1, y1 = view.region or (0, 0, width, height)
        for i in range(view.start, view.end):
            r, c = tokens.grid_row[i], tokens.grid_col[i]
            read = sorted(nearest(colour) for colour in shuffled[view.index, i - view.start].tolist())
            want = sorted(nearest(picture[int(y0 + (2 * r + dr + 0.5) / 8 * (y1 - y0)),
                                          int(x0 + (2 * c + dc + 0.5) / 8 * (x1 - x0))].tolist())
                          for dr in (0, 1) for dc in (0, 1))
            assert read == want, (view.name, r, c, read, want)


def llava_next_packed(loaded, model_type, inputs) -> torch.Tensor:
    """(tokens of the image, 4): the model's own pack_image_features of per-patch features made of the colour
    at each patch's centre in pixel_values (3 channels) and 0, with the newline vector (0, 0, 0, 1)."""
    pixels = denormalise(inputs.model_kwargs["pixel_values"][0].transpose(0, 1), loaded.image_processor)
    patch = loaded.config.vision_config.patch_size
    centres = pixels[:, :, patch // 2::patch, patch // 2::patch].flatten(2).permute(1, 2, 0)  # (tiles, cells, 3)
    features = torch.cat([centres, torch.zeros(*centres.shape[:2], 1)], -1)
    marker, model, sizes = torch.tensor([0.0, 0, 0, 1]), loaded.model.model, inputs.model_kwargs["image_sizes"]
    if model_type == "llava_next":
        packed, _ = model.pack_image_features([features], sizes, "default", image_newline=marker)
    else:
        packed, _ = model.pack_image_features([features], sizes, image_newline=marker,
                                              vision_aspect_ratio=loaded.config.vision_aspect_ratio)
    return packed[0]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"], indirect=True)
@pytest.mark.parametrize("size", [(160, 96), (96, 160), (120, 120)])
def test_a_llava_next_cell_reads_the_place_of_the_picture_its_view_maps_it_to(family, tmp_path, size):
    """A picture whose colour says where it is (red: x, green: y, blue 200 inside): the colour each image token
    reads through the model's own packing (base image, unpadded and, for OneVision, bilinearly resampled
    mosaic) decodes to the centre of its recorded cell on the picture, through its view's region."""
    from vl_masking.api import prepare

    model_type, _, loaded = family
    width, height = size
    ramp = np.zeros((height, width, 3), np.uint8)
    ramp[..., 0] = (np.arange(width)[None, :] + 0.5) * 255 / width
    ramp[..., 1] = (np.arange(height)[:, None] + 0.5) * 255 / height
    ramp[..., 2] = 200
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)
    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision"))
    tokens = inputs.tokens
    base, tiles = tokens.images
    packed = llava_next_packed(loaded, model_type, inputs)
    checked = 0
    for view in (base, tiles):
        x0, y0, x1, y1 = view.region or (0, 0, width, height)
        for p in range(view.start, view.end):
            r, c = tokens.grid_row[p], tokens.grid_col[p]
            red, green, blue, newline = packed[p - base.start].tolist()
            if c < 0:
                assert newline == 1
                continue
            if blue < 196:  # on or next to the padding: no place of the picture
                continue
            x, y = x0 + (c + 0.5) / view.grid_cols * (x1 - x0), y0 + (r + 0.5) / view.grid_rows * (y1 - y0)
            assert red * width / 255 == pytest.approx(x, abs=0.03 * width), (view.name, r, c)
            assert green * height / 255 == pytest.approx(y, abs=0.03 * height), (view.name, r, c)
            checked += 1
    assert checked >= base.grid_rows * base.grid_cols + tiles.grid_rows * tiles.grid_cols // 2


@pytest.mark.parametrize("family", ["llava_next"], indirect=True)
@pytest.mark.parametrize("size", [(160, 96), (96, 160), (120, 120)])
def test_a_llava_next_token_reads_the_patch_of_its_cell_in_the_base_image_or_the_unpadded_mosaic(family, tmp_path,
                                                                                                  size):
    """Pictures of 4 x 4 colour blocks, wide, tall and square. Each patch's tower feature is replaced by the
    colour at its centre in pixel_values; the model's own pack_image_features then lays out base image, tiles
    (unpadded) and newlines. Every image token must carry the colour of the picture at the centre of its
    recorded cell, placed through its view's region (padding is black), and the newline vectors must sit
    exactly at the recorded separators."""
    from vl_masking.api import prepare

    model_type, _, loaded = family
    width, height = size
    path = block_picture(tmp_path / "blocks.png", 4, 4, width // 4, height // 4)
    picture = np.asarray(Image.open(path).convert("RGB"))
    inputs, _ = prepare(loaded, vl_settings(loaded.name, tmp_path, images=[str(path)], mask_mode="vision"))
    tokens = inputs.tokens
    base, tiles = tokens.images
    assert (base.name, base.region, tiles.name, tiles.separators) == ("base", None, "tiles", True)
    packed = llava_next_packed(loaded, model_type, inputs)
    assert len(packed) == tiles.end - base.start
    checked = {"base": 0, "tiles": 0}
    for view in (base, tiles):
        x0, y0, x1, y1 = view.region or (0, 0, width, height)
        for p in range(view.start, view.end):
            got = packed[p - base.start]
            r, c = tokens.grid_row[p], tokens.grid_col[p]
            if c < 0:  # a separator: the model's newline vector, at the end of row r
                assert got[3] == 1 and p == view.position(r, 0) + view.grid_cols, (view.name, p)
                assert tokens.text[p] == "<image_newline>"
                continue
            x, y = x0 + (c + 0.5) / view.grid_cols * (x1 - x0), y0 + (r + 0.5) / view.grid_rows * (y1 - y0)
            inside = 0 <= x < width and 0 <= y < height
            expected = nearest(picture[int(y), int(x)].tolist()) if inside else nearest((0, 0, 0))
            assert got[3] == 0 and nearest(got[:3].tolist()) == expected, (view.name, r, c, x, y)
            checked[view.name] += 1
    assert checked == {"base": base.grid_rows * base.grid_cols, "tiles": tiles.grid_rows * tiles.grid_cols}


def llava_patch_picture(path, n=4, width=112, height=70, x0=21, x1=91):
    """The 112x70 picture whose centre square (x 21-91, what CLIP's crop keeps) is n x n patches of PALETTE."""
    from PIL import Image

    picture = Image.new("RGB", (width, height), (128, 128, 128))
    for y in range(height):
        for x in range(x0, x1):
            picture.putpixel((x, y), PALETTE[int(y / height * n) * n + int((x - x0) / (x1 - x0) * n)])
    picture.save(path)
    return path


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava-run")
    model = build_llava(out / "tiny-llava")
    picture = llava_patch_picture(out / "patches.png")
    run_cli("mask_impact_vl.py", "--model", model, "--image", picture, "--prompt", "What is it?", "--mask-mode",
            "vision", "--output", "llava", "--output-dir", out, "--formats", "parquet", check=True)
    return out / "llava.parquet", picture


def test_figures_draw_the_cropped_part_of_the_picture_under_a_llava_grid(llava_run):
    from vl_masking import figures

    result, picture = llava_run
    drawn = figures.load_picture(figures.load(result), None)
    assert drawn.shape[:2] == (70, 70)  # the centre square, not the 112x70 picture squeezed into it
    for r in range(4):
        for c in range(4):
            assert nearest(drawn[int((r + 0.5) * 70 / 4), int((c + 0.5) * 70 / 4)].tolist()) == r * 4 + c


def grid_viewer_cells(result, picture, n, canvas=0, cols=None) -> tuple:
    """The grid viewer's canvas (the first image's, or the canvas-th view's) with the picture alone under the
    grid (opacity 0): the colour at the centre of each of n x n (or n x cols) equal cells, row-major, and its
    width over height."""
    import shutil

    from playwright.sync_api import sync_playwright

    from test_viewers import CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((ROOT / "visualize_vl_grid.html").as_uri())
        page.set_input_files("#file", [str(result), str(picture)])
        page.wait_for_selector("body[data-pictures='1']", state="attached", timeout=10000)
        page.select_option("#picture-mode", "colour")  # the picture under the heat
        page.locator("#opacity").fill("0")
        cells, aspect = page.evaluate("""([n, m, k]) => {
            const canvas = document.querySelectorAll("canvas.grid-canvas")[k], ctx = canvas.getContext("2d");
            const out = [];
            for (let r = 0; r < n; r++) for (let c = 0; c < m; c++) {
                const x = Math.floor((c + 0.5) * canvas.width / m), y = Math.floor((r + 0.5) * canvas.height / n);
                out.push(Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
            }
            return [out, canvas.width / canvas.height];
        }""", [n, cols or n, canvas])
        browser.close()
    return [nearest(c) for c in cells], aspect


@pytest.mark.browser
def test_the_grid_viewer_draws_the_cropped_part_of_the_picture_under_a_llava_grid(llava_run):
    cells, aspect = grid_viewer_cells(*llava_run, 4)
    assert aspect == pytest.approx(1.0, abs=0.02)  # the square the grid covers, not 112:70
    assert cells == list(range(16))


@pytest.mark.browser
@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_the_grid_viewer_keeps_the_pictures_shape_under_a_gemma3_grid(family, tmp_path):
    """Gemma 3's 4x4 grid stretched over a 160x96 picture of 4x4 colour blocks: the viewer draws the picture
    160:96 and the colour under each cell is that cell's block."""
    _, path, _ = family
    picture = block_picture(tmp_path / "blocks.png", 4, 4, 40, 24)
    run_cli("mask_impact_vl.py", "--model", path, "--image", picture, "--prompt", "What is it?",
            "--mask-mode", "vision", "--output", "gemma", "--output-dir", tmp_path, "--formats", "parquet", check=True)
    cells, aspect = grid_viewer_cells(tmp_path / "gemma.parquet", picture, 4)
    assert aspect == pytest.approx(160 / 96, abs=0.03)
    assert cells == list(range(16))


def package_imports() -> dict:
    """module -> the vl_masking modules it imports (at the top or inside functions), from the source."""
    import ast

    root = ROOT / "vl_masking"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - node.level + 1])
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
                found.update(n for n in names if n)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vl_masking."):
                found.add(node.module.removeprefix("vl_masking."))
        graph[name] = {m for m in found if m != name}
    return graph


def test_the_package_has_no_import_circle_and_the_reference_imports_no_engine():
    graph = package_imports()
    assert graph["reference"] <= {"anatomy", "errors"}, graph["reference"]
    visiting, done = [], set()

    def visit(module):
        if module in done or module not in graph:
            return
        assert module not in visiting, " -> ".join(visiting[visiting.index(module):] + [module])
        visiting.append(module)
        for other in sorted(graph[module]):
            visit(other)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize("family", ["gemma3"], indirect=True)
def test_figures_keep_the_pictures_shape_under_a_grid_stretched_over_it(family, tmp_path):
    """Gemma 3 stretches any picture to its square input: the 4x4 grid of a 160x96 picture has cells 40x24 px,
    and the figure draws the picture 160x96 (not squeezed into a square) with the cells on it."""
    from vl_masking import figures

    _, path, _ = family
    run_cli("mask_impact_vl.py", "--model", path, "--image", PIGGY, "--prompt", "What is it?", "--mask-mode", "vision",
            "--output", "gemma", "--output-dir", tmp_path, "--formats", "parquet", check=True)
    fig = figures.layer_multiples(figures.load(tmp_path / "gemma.parquet"), 0, "Full", "l2", str(PIGGY))
    fig.canvas.draw()
    box = fig.axes[0].get_window_extent()
    assert abs(box.height / box.width - 96 / 160) < 0.02


# -- what the engine cannot reproduce is refused from the config, before the weights load ---------------

def _checkpoint_without_weights(path, config, processor=None):
    """A model directory holding only its config, tokenizer (and image processor): refusals must not read weights."""
    from vl_masking.tiny_models import _copy_tokenizer

    path.mkdir(parents=True)
    config.save_pretrained(path)
    _copy_tokenizer(path)
    if processor:
        (path / "preprocessor_config.json").write_text(__import__("json").dumps(processor))
    return path


@pytest.mark.parametrize("model_type, reason", [
    ("qwen3_5_text", "layers of type linear_attention have no softmax attention"),
    ("gemma4_text", "hands keys and values from layer to layer"),
    ("gemma2", "soft-capping"),
])
def test_newer_text_decoders_the_engine_cannot_reproduce_are_refused_in_one_line(model_type, reason, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=1000, hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    path = _checkpoint_without_weights(tmp_path / model_type, config)
    proc = run_cli("mask_impact_analysis.py", "--model", path, "--prompt", "Hello", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and reason in proc.stderr and model_type in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, reason", [
    ("paligemma", "not a vision-language family this tool knows"),
    ("qwen3_5", "layers of type linear_attention have no softmax attention"),
    ("gemma4", "hands keys and values from layer to layer"),
])
def test_vision_language_families_without_an_adapter_or_with_unreproducible_layers_are_refused(model_type, reason,
                                                                                              tmp_path):
    from transformers import AutoConfig

    from vl_masking.tiny_models import clip_processor_config

    path = _checkpoint_without_weights(tmp_path / model_type, AutoConfig.for_model(model_type),
                                       clip_processor_config())
    proc = run_cli("mask_impact_vl.py", "--model", path, "--image", PIGGY, "--prompt", "Hi",
                   "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.browser
@pytest.mark.parametrize("family", ["internvl"], indirect=True)
def test_the_grid_viewer_draws_each_internvl_tile_over_its_part_of_the_picture(family, tmp_path):
    """A 128x64 picture of 4 x 8 colour blocks (16 px): tile 0,0 is its left half, tile 0,1 its right half
    (a block per cell), the thumbnail all of it (two blocks per cell); the figures draw the thumbnail."""
    from vl_masking import figures

    _, path, _ = family
    picture = block_picture(tmp_path / "blocks.png", 4, 8, 16, 16)
    run_cli("mask_impact_vl.py", "--model", path, "--image", picture, "--prompt", "What is it?",
            "--mask-mode", "vision", "--output", "tiles", "--output-dir", tmp_path, "--formats", "parquet", check=True)
    result = tmp_path / "tiles.parquet"
    for canvas, first_column, cols in ((0, 0, 4), (1, 4, 4), (2, 0, 8)):  # the thumbnail: every block
        cells, aspect = grid_viewer_cells(result, picture, 4, canvas, cols)
        assert aspect == pytest.approx(cols / 4, abs=0.03), canvas
        assert cells == [r * 8 + first_column + c for r in range(4) for c in range(cols)], canvas
    loaded = figures.load(result)
    view = figures.mapped_view(loaded.meta["images"])
    assert view["view"] == "thumbnail" and figures.load_picture(loaded, None, view).shape[:2] == (64, 128)


@pytest.mark.parametrize("family", ["internvl"], indirect=True)
def test_a_whole_image_unit_and_image_k_cover_every_view_of_their_picture(family, tmp_path, tall_image):
    from vl_masking.api import prepare
    from vl_masking.flow_groups import Group

    _, _, loaded = family
    settings = vl_settings(loaded.name, tmp_path, images=[str(PIGGY), str(tall_image)], mask_mode="vision",
                           mask_unit="image")
    inputs, plan = prepare(loaded, settings)
    tokens = inputs.tokens
    pictures = [[v for v in tokens.images if v.picture == k] for k in (0, 1)]
    assert all(len(views) > 1 for views in pictures)  # both pictures cut into tiles and a thumbnail
    units = plan.prompt_units
    assert [u.label for u in units] == ["image 0", "image 1"]
    for unit, views in zip(units, pictures):
        assert unit.positions == tuple(p for v in views for p in range(v.start, v.end))
        assert unit.positions == Group.parse(f"image:{views[0].picture}").positions(tokens, 0)


@pytest.mark.browser
@pytest.mark.parametrize("family", ["llava_next", "idefics3"], indirect=True)
def test_both_viewers_open_every_view_of_a_tiled_family_and_show_its_separators_as_tokens(family, tmp_path):
    """One grid canvas per view, titled by picture and view; LLaVA-NeXT's newline tokens in the strip of
    tokens (never on a grid); the results page has a column per unit under one header per view."""
    import shutil

    from playwright.sync_api import sync_playwright

    from test_viewers import CHROMIUM_ARGS

    model_type, path, _ = family
    run_cli("mask_impact_vl.py", "--model", path, "--image", PIGGY, "--prompt", "What is it?", "--mask-mode", "both",
            "--output", "views", "--output-dir", tmp_path, "--formats", "parquet", check=True)
    views = read_metadata(tmp_path / "views.parquet")["images"]
    table = read_table(tmp_path / "views.parquet")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        for page_name in ("visualize_vl_grid.html", "visualize_results.html"):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((ROOT / page_name).as_uri())
            page.set_input_files("#file", [str(tmp_path / "views.parquet"), str(PIGGY)])
            page.wait_for_selector("body[data-loaded=true]", state="attached", timeout=10000)
            assert not errors, errors
            if page_name == "visualize_vl_grid.html":
                titles = page.locator(".image-panel h3").all_inner_texts()
                assert [t.split(":")[0] for t in titles] == [f"image 0 {v['view']}" for v in views]
                strip = page.inner_text("#text-strip")
                newlines = int((table.token_masked.astype(str) == "<image_newline>").sum() // len(
                    table[["generation_step", "layer", "variant"]].drop_duplicates()))
                assert strip.count("<image_newline>") == newlines and (newlines > 0) == (model_type == "llava_next")
            else:
                headers = [h.split(" · ")[0] for h in page.locator("#heatmap thead tr.groups th").all_inner_texts()]
                assert [h for h in headers if h.startswith("image")] == [f"image 0 {v['view']}" for v in views]
            page.close()
        browser.close()


def test_the_text_group_holds_exactly_the_prompts_words_in_every_familys_format(family, tmp_path):
    """The flow group `text` is the system's and the user's words, never the template's markup (`user\\n` after
    <|im_start|>, Gemma's <start_of_turn>user, LLaVA's USER:, Idefics3's User:), in each family's format."""
    from vl_masking.api import prepare
    from vl_masking.flow_groups import Group

    _, _, loaded = family
    settings = vl_settings(loaded.name, tmp_path, prompt="Is the pig pink?", system="Answer briefly.", num_tokens=1)
    tokens = prepare(loaded, settings)[0].tokens
    words = "".join(tokens.text[p] for p in Group.parse("text").positions(tokens, 0))
    assert "".join(words.split()) == "Answerbriefly.Isthepigpink?", (words, tokens.text)
