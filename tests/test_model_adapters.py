"""The model-adapter seam: each family's image tokens are laid on the grid its vision tower read, both
measures equal the reference on every family, and Qwen3-VL's numbers are those it had before the seam."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

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
    for name, table in (("layer", layer), ("flow", flow)):
        before = read_table(DATA / f"qwen3_vl_{name}.parquet")
        assert list(table.columns) == list(before.columns) and len(table) == len(before), name
        for column in before.columns:
            a, b = table[column], before[column]
            if a.dtype.kind == "f":
                assert np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=1e-7, equal_nan=True), (name, column)
            else:
                assert a.astype(str).tolist() == b.astype(str).tolist(), (name, column)


# -- every family through the same seam -------------------------------------------------------

from conftest import all_errors, analyse_vl, run_cli, vl_settings  # noqa: E402
from test_flow import max_flow_error, sharpen  # noqa: E402
from vl_masking.inputs import load_model  # noqa: E402
from vl_masking.tiny_models import build_llava, build_qwen2_vl  # noqa: E402

FAMILIES = {
    "qwen2_vl": lambda path: build_qwen2_vl(path, model_type="qwen2_vl"),
    "qwen2_5_vl": lambda path: build_qwen2_vl(path, model_type="qwen2_5_vl"),
    "llava": build_llava,
}


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
    table = analysis.table
    assert set(table.image_index[table.token_type.astype(str) == "vision"]) == {0, 1}


def test_the_flow_measure_equals_the_reference_on_every_family(family, tall_image, tmp_path):
    _, _, loaded = family
    sharpen(loaded)
    try:
        settings = vl_settings(loaded.name, tmp_path, images=[str(PIGGY), str(tall_image)], prompt="Is it pink?",
                               measure="flow", window=3, num_tokens=2, mask_unit="region:2x2",
                               flows=("units->last", "image->question", "image:0->image:1"))
        analysis, _ = analyse_vl(loaded, settings, keep_layer_inputs=False)
        assert max_flow_error(analysis) < 1e-5
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
    assert meta["family"] == {"qwen2_vl": "Qwen-VL", "qwen2_5_vl": "Qwen-VL", "llava": "LLaVA"}[model_type]
    table = run_vl_masking("Describe this image.", images=[str(PIGGY)], model=str(path), mask_mode="vision",
                           measure="flow", window=3)
    assert (table.token_type.astype(str) == "vision").all() and len(table)
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"model": str(path), "mask_mode": "both", "output_dir": "out"},
                                      "prompts": [{"name": "one", "image": str(PIGGY), "prompt": "What is it?"}]}))
    run_cli("mask_impact_vl.py", "--config", config, check=True)
    assert len(read_table(tmp_path / "out" / "one.parquet"))


from vl_masking.results import read_metadata  # noqa: E402


# -- the grid is proven: a colour-coded picture, read back where each token's pixels come from ---------

PALETTE = [(int(40 + 13 * k) % 256, int(200 - 11 * k) % 256, int(90 + 29 * k) % 256) for k in range(64)]


def denormalise(pixels: torch.Tensor, processor) -> torch.Tensor:
    mean = torch.tensor(processor.image_mean).view(-1, *([1] * (pixels.dim() - 1)))
    std = torch.tensor(processor.image_std).view(-1, *([1] * (pixels.dim() - 1)))
    return (pixels * std + mean) * 255


def nearest(colour) -> int:
    return int(np.argmin([sum((a - b) ** 2 for a, b in zip(colour, p)) for p in PALETTE]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"], indirect=True)
def test_a_qwen_vl_token_reads_the_block_of_its_grid_cell(family, tmp_path):
    """160x96 pixels, each 32x32 block (one merged token: 2x2 patches of 16) its own colour. The merger joins
    patches 4i..4i+3 of pixel_values into image token i: their colour must be that of the recorded cell."""
    _, _, loaded = family
    from PIL import Image

    rows, cols = 3, 5
    picture = Image.new("RGB", (cols * 32, rows * 32))
    for r in range(rows):
        for c in range(cols):
            picture.paste(PALETTE[r * cols + c], (c * 32, r * 32, c * 32 + 32, r * 32 + 32))
    path = tmp_path / "blocks.png"
    picture.save(path)
    from vl_masking.api import prepare

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


@pytest.mark.browser
def test_the_grid_viewer_draws_the_cropped_part_of_the_picture_under_a_llava_grid(llava_run):
    import shutil

    from playwright.sync_api import sync_playwright

    from test_viewers import CHROMIUM_ARGS

    result, picture = llava_run
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((ROOT / "visualize_vl_grid.html").as_uri())
        page.set_input_files("#file", [str(result), str(picture)])
        page.wait_for_selector("body[data-pictures='1']", state="attached", timeout=10000)
        page.locator("#opacity").fill("0")  # the picture alone under the grid
        colours = page.evaluate("""() => {
            const canvas = document.querySelector("canvas.grid-canvas"), ctx = canvas.getContext("2d");
            const out = [];
            for (let r = 0; r < 4; r++) for (let c = 0; c < 4; c++) {
                const x = Math.floor((c + 0.5) * canvas.width / 4), y = Math.floor((r + 0.5) * canvas.height / 4);
                out.push(Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
            }
            return [out, canvas.width / canvas.height];
        }""")
        browser.close()
    cells, aspect = colours
    assert aspect == pytest.approx(1.0, abs=0.02)  # the square the grid covers, not 112:70
    assert [nearest(c) for c in cells] == list(range(16))


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
