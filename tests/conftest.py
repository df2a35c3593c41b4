"""Fixtures: tiny random-weight models saved to disk and loaded through the users' --model path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vl_masking.inputs import load_model
from vl_masking.options import RunSettings
from vl_masking.tiny_models import build_causal_lm, build_qwen3_vl

ROOT = Path(__file__).resolve().parent.parent
PIGGY = ROOT / "examples" / "piggy.png"  # 160x96 -> a 3x5 token grid


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    return build_qwen3_vl(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl", layers=3)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp("models") / "tiny-qwen3", model_type="qwen3")


@pytest.fixture(scope="session")
def tall_image(tmp_path_factory):
    """64x128 pixels -> a 4x2 token grid: a second image of another size and shape."""
    path = tmp_path_factory.mktemp("images") / "tall.png"
    gradient = Image.linear_gradient("L").resize((64, 128))
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_vl(tiny_vl_dir):
    """The tiny model loaded once, as the command line loads it (float32, CPU)."""
    return load_model(RunSettings(model=str(tiny_vl_dir), prompt="-", device="cpu", dtype="float32"))


def vl_settings(model_dir, tmp_path, **overrides) -> RunSettings:
    values = dict(model=str(model_dir), prompt="Describe this image.", images=[str(PIGGY)], num_tokens=3,
                  mask_mode="both", device="cpu", dtype="float32", output_dir=str(tmp_path))
    values.update(overrides)
    return RunSettings(**values)


def analyse_vl(loaded, settings, keep_layer_inputs=True):
    """Run in-process on an already loaded model (what the CLI does after loading)."""
    from vl_masking.analysis import analyse
    from vl_masking.api import prepare

    inputs, plan = prepare(loaded, settings)
    return analyse(loaded, inputs, plan, settings, progress=False, keep_layer_inputs=keep_layer_inputs), inputs


def all_errors(analysis):
    """Largest error of every (step, layer) record of a layer-measure analysis against the reference."""
    from vl_masking.reference import reference_error

    return max(reference_error(analysis.measure.loaded.model, analysis.capture, analysis.plan, record)
               for record in analysis.measure.records)


def run_cli(script, *args, cwd=ROOT, check=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc

