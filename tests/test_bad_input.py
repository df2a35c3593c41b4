"""Bad input: one line on stderr, exit code 2, nothing in the output directory. Ctrl-C / SIGTERM: no final file."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image

from conftest import PIGGY, ROOT, run_cli


def bomb_png(path, side=30000):
    """A PNG whose header claims side x side pixels (a decompression bomb, as far as the header goes)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def damaged_model(source, target, how):
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\xff" * 64 + data[64:])
    return target


def device_map(tmp_path, where):
    path = tmp_path / f"map_{str(where).replace(':', '_')}.json"
    path.write_text(json.dumps({"": where}))
    return path


def billion_laughs(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 9):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines += ["defaults:", "  variants: *a8", "prompts:", "  - name: x", "    prompt: Hi"]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


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
        # Found by trying bad inputs on purpose:
        "layers range too large": base + ["--layers", "0-999999999"],
        "device map names no device": lambda: base + ["--device-map", device_map(tmp_path, "bogus")],
        "device map names a missing GPU": lambda: base + ["--device-map", device_map(tmp_path, "cuda:5")],
        "memory budget infinite": base + ["--memory-budget-mb", "inf"],
        "image too elongated": lambda: base + ["--image", _image(tmp_path / "strip.png", (2000, 8))],
        "image too elongated, upright": lambda: base + ["--image", _image(tmp_path / "pole.png", (8, 2000))],
        "decompression bomb": lambda: base + ["--image", bomb_png(tmp_path / "bomb.png")],
        "truncated weights": lambda: ["--model", damaged_model(model, tmp_path / "cut", "truncated"), "--prompt", "Hi"],
        "garbage weights header": lambda: ["--model", damaged_model(model, tmp_path / "junk", "header"),
                                           "--prompt", "Hi"],
        "prompt file not UTF-8": lambda: ["--model", model, "--prompt-file", _bytes(tmp_path / "p.txt",
                                                                                   b"caf\xe9 au lait")],
        "prompt file is a PNG": ["--model", model, "--prompt-file", PIGGY],
        "config with billion laughs": lambda: ["--config", billion_laughs(tmp_path)],
        "config with infinite budget": lambda: ["--config", _config(tmp_path, "memory_budget_mb: .inf")],
        "num-tokens past the model's length": base + ["--num-tokens", 40000],
    }


def _image(path, size):
    Image.new("RGB", size, (200, 100, 50)).save(path)
    return path


def _bytes(path, data):
    path.write_bytes(data)
    return path


def _config(tmp_path, line):
    path = tmp_path / "budget.yaml"
    path.write_text(f"defaults:\n  {line}\nprompts:\n  - name: a\n    prompt: Hi\n")
    return path


CASES = ["missing image", "not an image", "empty prompt", "num-tokens 0", "unknown mask mode",
         "vision mode without image", "layers out of range", "model path missing", "unwritable output dir",
         "not a number", "device map file missing", "device map with a device", "config file missing",
         "layers range too large", "device map names no device", "memory budget infinite", "image too elongated",
         "image too elongated, upright", "decompression bomb", "truncated weights", "garbage weights header",
         "prompt file not UTF-8", "prompt file is a PNG", "config with billion laughs",
         "config with infinite budget", "num-tokens past the model's length"]
if not torch.cuda.is_available():
    CASES.append("device map names a missing GPU")
MESSAGES = {  # what the one line must name
    "layers range too large": "out of range", "device map names no device": "bogus",
    "device map names a missing GPU": "CUDA is not available", "memory budget infinite": "finite",
    "image too elongated": "strip.png", "image too elongated, upright": "aspect ratio",
    "decompression bomb": "900,000,000 pixels", "truncated weights": "model.safetensors",
    "garbage weights header": "model.safetensors", "prompt file not UTF-8": "offset 3",
    "prompt file is a PNG": "(byte 0x89 at offset 0)", "config with billion laughs": "aliases expand",
    "config with infinite budget": "finite", "num-tokens past the model's length": "maximum length",
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_exit_2_and_no_file(case, tiny_vl_dir, tmp_path, out_dir):
    args = _bad_cases(tmp_path, tiny_vl_dir)[case]
    args = args() if callable(args) else args
    if "--output-dir" not in args and "--config" not in args:
        args = args + ["--output-dir", out_dir]
    proc = run_cli("mask_impact_vl.py", *args, cwd=out_dir.parent)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert case not in MESSAGES or MESSAGES[case] in lines[0], lines[0]
    assert len(lines[0]) < 400
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("data,offset", [(b"na\xefve \xff", 2), (b"\x89PNG\r\n", 0)])
def test_the_text_tool_names_a_prompt_file_that_is_not_text(data, offset, tiny_text_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(data)
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt-file", prompt,
                   "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert str(prompt) in proc.stderr and f"offset {offset}" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_name_taken_by_a_directory_writes_nothing(tiny_vl_dir, out_dir):
    (out_dir / "run.json").mkdir()
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--prompt", "Hi", "--output", "run",
                   "--output-dir", out_dir)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run.json" in proc.stderr
    assert [p.name for p in out_dir.iterdir()] == ["run.json"]


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    import errno

    import pandas as pd

    from vl_masking import results
    from vl_masking.console import cli_errors
    from vl_masking.errors import OutputError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "_write_csv", full)
    with pytest.raises(OutputError, match="disk is full"):
        results.write_results(pd.DataFrame({"a": [1]}), {}, tmp_path, "run", ("parquet", "csv", "json"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as stop, cli_errors():
        results.write_results(pd.DataFrame({"a": [1]}), {}, tmp_path, "run", ("csv",))
    assert stop.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_bad_input(tiny_vl_dir, out_dir):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--prompt", "Hi", "--device", "cuda",
                   "--output-dir", out_dir)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
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


def _start(tiny_vl_dir, out_dir, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), "--model", str(tiny_vl_dir),
                             "--image", str(PIGGY), "--prompt", "Describe.", "--mask-mode", "both",
                             "--output-dir", str(out_dir), *map(str, extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_during_a_run_leave_no_file(tiny_vl_dir, out_dir, signum, code, word):
    proc = _start(tiny_vl_dir, out_dir, "--num-tokens", 400)
    seen = b""
    while b"steps:" not in seen:  # the progress bar is drawn once analysis has started
        chunk = proc.stderr.read(1)
        assert chunk, "the run ended before it could be stopped"
        seen += chunk
    proc.send_signal(signum)
    err = (seen + proc.communicate(timeout=120)[1]).decode()
    assert proc.returncode == code, err[-2000:]
    assert f"{word}: no result file was written" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def _loading_torch(pid: int) -> bool:
    try:
        return "libtorch" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_130(tiny_vl_dir, out_dir):
    proc = _start(tiny_vl_dir, out_dir, "--num-tokens", 400)  # far longer than the signal takes to arrive
    while not _loading_torch(proc.pid):  # start-up: past the light imports, now loading torch and the model
        try:
            proc.wait(timeout=0.01)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail("the run ended before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()[-2000:]
    assert [line for line in err.decode().splitlines() if line.strip()] == ["interrupted: no result file was written"]
    assert list(out_dir.iterdir()) == []


def test_a_late_ctrl_c_does_not_disown_a_finished_run(tmp_path, capsys):
    from vl_masking import console

    console.files_written({"parquet": str(tmp_path / "run.parquet")})
    try:
        with pytest.raises(SystemExit) as stop, console.cli_errors():
            raise KeyboardInterrupt
    finally:
        console.files_written({})
    assert stop.value.code == 0
    assert "its files are complete" in capsys.readouterr().err


def test_temporary_files_left_by_a_killed_process_are_removed_by_the_next_write(tmp_path):
    import pandas as pd

    from vl_masking.results import _owner, write_results

    host = _owner().rsplit("-", 1)[0]
    stale = tmp_path / f".run.parquet.{host}-999999999.abc123.tmp"  # no such process
    other = tmp_path / f".old.run.json.{host}-999999998.x_9yz.tmp"  # another run's, killed too
    mine = tmp_path / f".run.parquet.{_owner()}.live.tmp"  # this process: still writing, kept
    for path in (stale, other, mine):
        path.write_bytes(b"half a file")
    write_results(pd.DataFrame({"a": [1]}), {}, tmp_path, "run", ("parquet",))
    assert not stale.exists() and not other.exists() and mine.exists()
    assert (tmp_path / "run.parquet").is_file()


def test_an_option_value_that_starts_with_a_dash_is_read_as_the_value(tiny_text_dir, tmp_path):
    """`--flow "->"` is a bad flow (said so), not "expected one argument"; `--prompt -x` is the prompt."""
    proc = run_cli("mask_impact_vl.py", "--prompt", "x", "--measure", "flow", "--flow", "->")
    assert proc.returncode == 2 and "bad --flow '->'" in proc.stderr, proc.stderr
    run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "-x", "--output-dir",
            tmp_path, "--formats", "parquet", "--output", "dash", check=True)
    from vl_masking.results import read_metadata

    assert read_metadata(tmp_path / "dash.parquet")["prompt"] == "-x"
    missing = run_cli("mask_impact_vl.py", "--prompt", "--model", "m")
    assert missing.returncode == 2 and "--prompt: expected one argument" in missing.stderr
