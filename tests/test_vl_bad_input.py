"""Bad input: one line on stderr, exit code 2, nothing in the output directory. Ctrl-C: no final file."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import PIGGY, ROOT, run_cli


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _bad_cases(tmp_path, model):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    base = ["--model", model, "--prompt", "Hi"]
    return {
        "missing image": base + ["--image", tmp_path / "missing.png"],
        "not an image": base + ["--image", not_image],
        "empty prompt": ["--model", model, "--prompt", "   "],
        "num-tokens 0": base + ["--num-tokens", 0],
        "unknown mask mode": base + ["--mask-mode", "pixels"],
        "vision mode without image": base + ["--mask-mode", "vision"],
        "layers out of range": base + ["--layers", "0-99"],
        "model path missing": ["--model", tmp_path / "no-such-model", "--prompt", "Hi"],
        "unwritable output dir": base + ["--output-dir", a_file / "sub"],
        "not a number": base + ["--num-tokens", "three"],
        "device map file missing": base + ["--device-map", tmp_path / "map.json"],
        "device map with a device": base + ["--device-map", "auto", "--device", "cpu"],
        "config file missing": ["--config", tmp_path / "batch.yaml"],
    }


CASES = ["missing image", "not an image", "empty prompt", "num-tokens 0", "unknown mask mode",
         "vision mode without image", "layers out of range", "model path missing", "unwritable output dir",
         "not a number", "device map file missing", "device map with a device", "config file missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_exit_2_and_no_file(case, tiny_vl_dir, tmp_path, out_dir):
    args = _bad_cases(tmp_path, tiny_vl_dir)[case]
    if "--output-dir" not in args:
        args = args + ["--output-dir", out_dir]
    proc = run_cli("mask_impact_vl.py", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_bad_input(tiny_vl_dir, out_dir):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--prompt", "Hi", "--device", "cuda",
                   "--output-dir", out_dir)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_during_a_run_leaves_no_file(tiny_vl_dir, out_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), "--model", str(tiny_vl_dir),
                             "--image", str(PIGGY), "--prompt", "Describe.", "--num-tokens", "400",
                             "--mask-mode", "both", "--output-dir", str(out_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"steps:" not in seen:  # the progress bar is drawn once analysis has started
        chunk = proc.stderr.read(1)
        assert chunk, "the run ended before it could be interrupted"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, (seen + rest).decode()[-2000:]
    assert list(out_dir.iterdir()) == []


def test_interrupt_while_writing_leaves_neither_final_nor_temporary_files(tmp_path, monkeypatch):
    import pandas as pd

    from vl_masking import results

    table = pd.DataFrame({"a": [1, 2]})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "_write_csv", interrupted)  # after the Parquet body, before the JSON
    with pytest.raises(KeyboardInterrupt):
        results.write_results(table, {}, tmp_path, "run", ("parquet", "csv", "json"))
    assert list(tmp_path.iterdir()) == []
