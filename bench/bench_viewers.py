"""Benchmark: the viewers on a full-size result file, in headless Chromium from file://.

Generates a result of the shape of a full Qwen3-VL-4B run on a 1024x1024 image (1040
positions, 36 layers, 34 variants, 3 steps: about 3.8 million rows), writes it with the
tool's own writer, then times in each viewer: file chosen -> first view drawn, and the
redraw after a layer change and a step change. Prints JSON.

    .venv/bin/python bench/bench_viewers.py [--json bench/results/viewers_cpu.json]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vl_masking.results import write_results  # noqa: E402
from vl_masking.measures.layer import LAYER_COLUMNS as COLUMNS  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def synthetic_table(positions=1040, layers=36, heads=32, steps=3, grid=(32, 32), image_start=4):
    variants = ["Full", "Attn"] + [f"Head_{h}" for h in range(heads)]
    v = len(variants)
    rng = np.random.default_rng(0)
    step = np.repeat(np.arange(steps, dtype=np.int32), layers * positions * v)
    layer = np.tile(np.repeat(np.arange(layers, dtype=np.int32), positions * v), steps)
    pos = np.tile(np.repeat(np.arange(positions, dtype=np.int32), v), steps * layers)
    variant = np.tile(np.arange(v, dtype=np.int32), steps * layers * positions)
    n_vision = grid[0] * grid[1]
    is_vision = (pos >= image_start) & (pos < image_start + n_vision)
    i = pos - image_start
    texts = np.array([f"tok{p}" for p in range(positions)], dtype=object)
    texts[image_start:image_start + n_vision] = "<|image_pad|>"
    n = len(step)
    kinds = np.array(["token"], dtype=object)

    def vision_at(p):
        return image_start <= p < image_start + n_vision

    return pd.DataFrame({
        "generation_step": step, "layer": layer, "token_position": pos,
        "token_masked": pd.Categorical(texts[pos]), "unit": pd.Categorical(texts[pos]),
        "unit_kind": pd.Categorical(kinds[np.zeros(n, dtype=np.int64)]),
        "unit_size": np.ones(n, dtype=np.int32),
        "unit_positions": pd.Categorical.from_codes(pos, [str(p) for p in range(positions)]),
        "grid_rows": np.where(is_vision, 1, -1).astype(np.int32),
        "grid_cols": np.where(is_vision, 1, -1).astype(np.int32),
        "base_norm": np.ones(n, dtype=np.float32),
        "token_type": pd.Categorical.from_codes(is_vision.astype(np.int8), ["text", "vision"]),
        "image_index": np.where(is_vision, 0, -1).astype(np.int32),
        "grid_row": np.where(is_vision, i // grid[1], -1).astype(np.int32),
        "grid_col": np.where(is_vision, i % grid[1], -1).astype(np.int32),
        "variant": pd.Categorical.from_codes(variant, variants),
        "l2_distance": rng.random(n, dtype=np.float32), "cosine_distance": rng.random(n, dtype=np.float32) / 10,
    })[COLUMNS], {"model": "synthetic", "images": [{"index": 0, "grid_rows": grid[0], "grid_cols": grid[1],
                                                  "token_start": image_start, "token_end": image_start + n_vision}],
                  "units": [{"label": str(texts[p]), "kind": "token", "positions": [p],
                             "token_type": "vision" if vision_at(p) else "text",
                             "image_index": 0 if vision_at(p) else -1,
                             "grid_row": (p - image_start) // grid[1] if vision_at(p) else -1,
                             "grid_col": (p - image_start) % grid[1] if vision_at(p) else -1,
                             "grid_rows": 1, "grid_cols": 1, "from_step": 0} for p in range(positions)],
                  "mask_mode": "both", "vision_attention": "bidirectional", "num_layers": layers, "num_heads": heads}


def time_viewer(browser, page_name, data_file, change_keys):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto((ROOT / page_name).as_uri())
    started = time.perf_counter()
    page.set_input_files("#file", str(data_file))
    page.wait_for_selector("body[data-loaded=true]", state="attached", timeout=120000)
    first_view = time.perf_counter() - started
    print(page_name, page.evaluate("JSON.stringify(ds.timings)"), file=sys.stderr)
    redraws = {}
    for name, action in change_keys.items():
        action(page)
        redraws[name] = round(float(page.get_attribute("body", "data-render-ms")), 1)
    page.close()
    return {"first_view_s": round(first_view, 2), "redraw_ms": redraws}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    table, meta = synthetic_table()
    result = {"rows": len(table)}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_results(table, meta, tmp, "full", ("parquet",))
        result["parquet_write_s"] = round(time.perf_counter() - started, 2)
        data = Path(tmp) / "full.parquet"
        result["parquet_mb"] = round(data.stat().st_size / 2**20, 1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            result["visualize_results"] = time_viewer(browser, "visualize_results.html", data, {
                "step": lambda pg: pg.keyboard.press("ArrowDown"),
                "variant": lambda pg: pg.select_option("#series", "Attn"),
                "layer": lambda pg: pg.keyboard.press("ArrowRight"),
                "normalise global": lambda pg: pg.select_option("#normalise", "global"),
                "metric": lambda pg: pg.select_option("#metric", "rel_l2"),
            })
            result["visualize_vl_grid"] = time_viewer(browser, "visualize_vl_grid.html", data, {
                "layer": lambda pg: pg.keyboard.press("ArrowRight"),
                "step": lambda pg: pg.keyboard.press("ArrowDown"),
                "normalise global": lambda pg: pg.select_option("#normalise", "global"),
                "heads": lambda pg: pg.keyboard.press("h"),
            })
            browser.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
