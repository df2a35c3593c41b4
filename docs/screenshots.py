"""The README's pictures, from `make demo`'s outputs: viewer screenshots and two of the figures.

    make demo && .venv/bin/python docs/screenshots.py

Opens both viewers from file:// in Debian's chromium (as the browser tests do), loads the
demo's files and the bundled picture, and saves the screenshots next to this script; copies
four figures from output/figures/ (two of them of the real SmolLM2 checkpoint) and the planted model's figures.
"""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OUTPUT = ROOT / "output"
PIGGY = ROOT / "examples" / "piggy.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = [  # (file name, viewer, result, with the picture, what to do before the screenshot)
    ("visualize_results.png", "visualize_results.html", "demo.parquet", False, ["layer:1"]),
    ("visualize_results_regions.png", "visualize_results.html", "demo_regions.layer.parquet", False, []),
    ("visualize_results_flow.png", "visualize_results.html", "demo_flow.parquet", False, []),
    ("visualize_vl_grid.png", "visualize_vl_grid.html", "demo.parquet", True, ["layer:1", "select:10"]),
    ("visualize_vl_grid_regions.png", "visualize_vl_grid.html", "demo_regions.layer.parquet", True, ["layer:1"]),
    ("visualize_vl_grid_flow.png", "visualize_vl_grid.html", "demo_flow.parquet", True, []),
]
FIGURES = ["demo_layers.png", "demo_flow_flows.png", "demo_smollm2_flow_heatmap.png", "demo_smollm2_layer_heatmap.png"]
PLANTED_FIGURES = {  # the demo's planted-evidence figures -> their names under docs/
    "demo.flow_layers.png": "figure_planted_flow_layers.png",
    "demo.encoder_layers.png": "figure_planted_encoder_layers.png",
    "demo.encoder-flow_layers.png": "figure_planted_encoder_flow_layers.png",
    "demo.deepstack_layers.png": "figure_planted_deepstack_layers.png",
    "demo_video.flow_frames.png": "figure_planted_video_frames.png",
}


def main() -> None:
    for name, copy in PLANTED_FIGURES.items():
        shutil.copy(OUTPUT / "figures" / name, DOCS / copy)
        print(DOCS / copy)
    missing = [name for _, _, name, _, _ in SHOTS if not (OUTPUT / name).is_file()]
    if missing:
        sys.exit(f"run make demo first (missing: {', '.join(missing)})")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        for name, viewer, result, picture, actions in SHOTS:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((ROOT / viewer).as_uri())
            page.set_input_files("#file", [str(OUTPUT / result)] + ([str(PIGGY)] if picture else []))
            page.wait_for_selector("body[data-loaded=true]", state="attached")
            if picture:
                page.wait_for_selector("body[data-pictures='1']", state="attached")
            for action in actions:
                what, value = action.split(":")
                if what == "layer":
                    page.locator("#layer").fill(value)
                else:
                    page.evaluate(f"maskImpactSelect({value})")
            page.screenshot(path=str(DOCS / name), full_page=viewer.endswith("grid.html"))
            page.close()
            print(DOCS / name)
        browser.close()
    for name in FIGURES:
        shutil.copy(OUTPUT / "figures" / name, DOCS / f"figure_{name}")
        print(DOCS / f"figure_{name}")


if __name__ == "__main__":
    main()
