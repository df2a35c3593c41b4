"""Fixtures: tiny random-weight models saved to disk and loaded through the users' --model path."""

import io
import os
import runpy
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from vl_masking.inputs import load_model
from vl_masking.options import RunSettings
from vl_masking.tiny_models import build_causal_lm, build_qwen3_vl

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist the cores are shared among the workers. Every Python process a test starts
# gets the same thread count as this one, so that its float sums run in the same order.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
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


def analyse_vl(loaded, settings):
    """Run in-process on an already loaded model (what the CLI does after loading), with --check 1 (at least),
    which keeps what the reference re-runs from (every layer's input)."""
    from dataclasses import replace

    from vl_masking.analysis import analyse
    from vl_masking.api import prepare

    settings = replace(settings, check=max(settings.check, 1))
    inputs, plan = prepare(loaded, settings)
    return analyse(loaded, inputs, plan, settings, progress=False), inputs


def all_errors(analysis):
    """Largest error of every (step, layer) record of a layer-measure analysis against the reference."""
    from vl_masking.measures.tables import written_values
    from vl_masking.reference import reference_error

    columns = ("l2_distance", "cosine_distance")
    return max(reference_error(analysis.measure.loaded.model, analysis.capture, analysis.plan, step, layer,
                               written_values(analysis.table, step, layer, columns))
               for step, layer, *_ in analysis.measure.records)


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_cli(script, *args, cwd=ROOT, check=False, progress=False):
    """Run an entry script in this process, as `python SCRIPT ARGS` runs it, without the start-up of a
    new interpreter (seconds of imports per call). Tests of signals, start-up time and imports use
    run_cli_process."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    code = 0
    try:
        if not progress:
            os.environ.update(TQDM_DISABLE="1")
        os.chdir(cwd)
        sys.argv = [str(ROOT / script), *map(str, args)]
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # noqa: BLE001 - what the interpreter would print, and its exit code
        err.write(traceback.format_exc())
        code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    proc = Completed(code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_cli_process(script, *args, cwd=ROOT, check=False):
    """The entry script in a new Python process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc



# -- the planted-evidence models train beside the tests ---------------------------------------------------

def planted_tests_selected(config) -> bool:
    """Whether this run holds tests/test_planted.py: named, or a folder above it, and not left out by -m."""
    if "not planted" in (config.option.markexpr or ""):
        return False
    target = ROOT / "tests" / "test_planted.py"
    here = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (here / arg.split("::")[0]).resolve()
        if path == target or (path.is_dir() and target.is_relative_to(path)):
            return True
    return False


def pytest_configure(config):
    """The first process of a run (not a pytest-xdist worker) starts a trainer per planted model (one returns at
    once where its model is cached): a training takes minutes on one core, and a worker whose test needs it
    would wait for it; trained beside the other tests from the start, it is ready when they come."""
    if hasattr(config, "workerinput") or not planted_tests_selected(config):
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    config.planted_trainers = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "planted_models.py"), *args], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for args in (["llava"], ["qwen3_vl", "--clips"])]


def pytest_unconfigure(config):
    """A trainer still running when the run ends (its tests deselected or interrupted) is stopped; its model is
    not marked trained (planted.json comes last), so the next run trains it again."""
    for trainer in getattr(config, "planted_trainers", []):
        if trainer.poll() is None:
            trainer.terminate()
        trainer.wait()
