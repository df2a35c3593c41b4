"""Batch mode: --config YAML for both tools, the manifest, --resume, Ctrl-C, sharding, device maps."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import PIGGY, ROOT, run_cli, run_cli_process
from vl_masking.results import read_table
from vl_masking.tools import VL

VOLATILE = ("timings", "started_utc", "finished_utc", "updated_utc", "process")


def write_config(directory, prompts, **defaults):
    path = directory / "batch.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, "prompts": prompts}, sort_keys=False))
    return path


def manifest(out_dir, name="batch"):
    return json.loads((out_dir / f"{name}.batch.json").read_text())


def entries(out_dir, name="batch"):
    return {e["name"]: e for e in manifest(out_dir, name)["prompts"]}


def stable(entry):
    return {k: v for k, v in entry.items() if k not in VOLATILE}


def assert_same_results(out_a, out_b, names):
    for name in names:
        a, b = read_table(out_a / f"{name}.parquet"), read_table(out_b / f"{name}.parquet")
        assert a.drop(columns=["l2_distance", "cosine_distance"]).equals(
            b.drop(columns=["l2_distance", "cosine_distance"])), name
        assert np.array_equal(a.l2_distance, b.l2_distance) and np.array_equal(a.cosine_distance, b.cosine_distance)


@pytest.fixture()
def images(tmp_path):
    """The bundled image and a corrupt one, next to the config (paths are relative to it)."""
    shutil.copy(PIGGY, tmp_path / "piggy.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return tmp_path


def test_a_corrupt_image_fails_its_prompt_the_batch_goes_on_and_resume_runs_only_it(tiny_vl_dir, images):
    config = write_config(images, [
        {"name": "first", "image": "piggy.png", "prompt": "Describe this image."},
        {"name": "broken", "images": ["broken.png"], "prompt": "What is it?"},
        {"name": "text_only", "prompt": "Hello there", "mask_mode": "text", "num_tokens": 1},
        {"name": "later", "prompt": "Not tonight", "enabled": False},
    ], model=str(tiny_vl_dir), num_tokens=2, mask_mode="both", device="cpu", output_dir="out")
    out = images / "out"
    proc = run_cli("mask_impact_vl.py", "--config", config)
    assert proc.returncode == 1, proc.stderr[-2000:]
    found = entries(out)
    assert [(n, e["status"]) for n, e in found.items()] == [
        ("first", "done"), ("broken", "failed"), ("text_only", "done"), ("later", "skipped")]
    assert "not a readable image" in found["broken"]["error"] and "broken.png" in found["broken"]["error"]
    assert found["first"]["rows"] == len(read_table(out / "first.parquet"))
    assert not list(out.glob("broken.*")) and not list(out.glob(".*"))
    assert "broken" in proc.stdout and "failed" in proc.stdout and "Prompts: 2 done, 1 failed, 1 skipped" in proc.stdout

    shutil.copy(PIGGY, images / "broken.png")  # the fix
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("batch.batch")}
    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 prompt(s) already done" not in proc.stdout and "2 prompt(s) already done, 1 to run" in proc.stdout
    resumed = entries(out)
    assert [e["status"] for e in resumed.values()] == ["done", "done", "done", "skipped"]
    assert resumed["first"] == found["first"] and resumed["text_only"] == found["text_only"]
    assert {n: t for n, t in before.items()} == {n: (out / n).stat().st_mtime_ns for n in before}
    assert (out / "broken.parquet").exists()


def test_resume_reruns_a_prompt_whose_settings_changed(tiny_vl_dir, images):
    prompts = [{"name": "a", "prompt": "One", "num_tokens": 1}, {"name": "b", "prompt": "Two", "num_tokens": 1}]
    config = write_config(images, prompts, model=str(tiny_vl_dir), device="cpu", output_dir="out",
                          formats="parquet")
    run_cli("mask_impact_vl.py", "--config", config, check=True)
    first = entries(images / "out")
    prompts[1]["num_tokens"] = 2
    write_config(images, prompts, model=str(tiny_vl_dir), device="cpu", output_dir="out", formats="parquet")
    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume", check=True)
    second = entries(images / "out")
    assert "1 prompt(s) already done, 1 to run" in proc.stdout
    assert second["a"] == first["a"]
    assert second["b"]["settings_hash"] != first["b"]["settings_hash"]
    assert read_table(images / "out" / "b.parquet").generation_step.max() == 1


def test_a_config_with_five_mistakes_reports_all_five_at_once_and_writes_nothing(tiny_vl_dir, images):
    config = write_config(images, [
        {"name": "sub/dir", "prompt": "Path separator in the name"},     # 1 unsafe name
        {"name": "twice", "prompt": "One", "num_tokens": "three"},      # 2 wrong type
        {"name": "twice", "prompt": "Duplicate name"},                  # 3 duplicate name
        {"name": "lost", "images": ["missing.png"], "prompt": "Hi"},    # 4 missing image file
        {"name": "odd", "prompt": "Hi", "mask_mode": "pixels", "colour": "red"},  # 5 bad enum, 6 unknown key
        {"name": "silent", "image": "piggy.png"},                       # 7 missing prompt
    ], model=str(tiny_vl_dir), device="cpu", output_dir="out")
    proc = run_cli("mask_impact_vl.py", "--config", config)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: config") and "7 problems" in lines[0]
    for expected in ["prompt #1: name: 'sub/dir' is not a plain file name",
                     "prompt 'twice': num_tokens: expected a whole number, got 'three'",
                     "prompt 'twice': name: duplicate",
                     "prompt 'lost': image: image not found",
                     "prompt 'odd': mask_mode: unknown --mask-mode 'pixels'",
                     "prompt 'odd': colour: unknown key",
                     "prompt 'silent': prompt: missing"]:
        assert any(expected in line for line in lines), (expected, lines)
    assert "Traceback" not in proc.stderr
    assert not (images / "out").exists()


def test_prompt_keys_override_defaults_and_the_command_line_overrides_both(tiny_vl_dir, images, monkeypatch):
    from vl_masking.batch_config import load_batch

    (images / "default_prompt.txt").write_text("From the file.")
    config = write_config(images, [
        {"name": "a", "image": "piggy.png", "num_tokens": 5},
        {"name": "b", "prompt": "Own text.", "mask_mode": "text", "variants": ["Full", "Attn"]},
    ], model=str(tiny_vl_dir), prompt_file="default_prompt.txt", num_tokens=2, mask_mode="both", output_dir="out")
    monkeypatch.chdir(ROOT)  # paths in the file are relative to the file, not to the working directory
    a, b = (p.settings for p in load_batch(config, VL).prompts)
    assert (a.prompt, a.num_tokens, a.mask_mode, a.images) == ("From the file.", 5, "both", [str(images / "piggy.png")])
    assert (b.prompt, b.num_tokens, b.mask_mode, b.variants) == ("Own text.", 2, "text", ("Full", "Attn"))
    assert a.output == "a" and a.output_dir == str(images / "out")
    a, b = (p.settings for p in load_batch(config, VL, overrides={"num_tokens": 1}).prompts)
    assert a.num_tokens == b.num_tokens == 1


def test_config_and_command_line_prompts_do_not_mix(tiny_vl_dir, images):
    config = write_config(images, [{"name": "a", "prompt": "Hi"}], model=str(tiny_vl_dir))
    proc = run_cli("mask_impact_vl.py", "--config", config, "--prompt", "Other")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--prompt cannot be combined" in proc.stderr
    proc = run_cli("mask_impact_vl.py", "--prompt", "Hi", "--resume")
    assert proc.returncode == 2 and "--resume needs --config" in proc.stderr


def test_each_model_loads_once_for_the_prompts_that_share_it(tiny_vl_dir, images, monkeypatch):
    from vl_masking import batch, inputs
    from vl_masking.batch_config import load_batch

    loads = []
    real_load = inputs.load_model
    monkeypatch.setattr(inputs, "load_model", lambda s: loads.append((s.model, s.dtype)) or real_load(s))
    config = write_config(images, [
        {"name": "a", "prompt": "One"}, {"name": "b", "prompt": "Two", "dtype": "float32"},
        {"name": "c", "prompt": "Three"}, {"name": "d", "prompt": "Four", "dtype": "float32"},
    ], model=str(tiny_vl_dir), device="cpu", output_dir="out", formats="parquet")
    code = batch.run_batch(load_batch(config, VL), log=lambda *a: None)
    assert code == 0
    assert loads == [(str(tiny_vl_dir), "auto"), (str(tiny_vl_dir), "float32")]
    assert [e["status"] for e in entries(images / "out").values()] == ["done"] * 4


def test_out_of_memory_fails_one_prompt_frees_the_model_and_the_batch_goes_on(tiny_vl_dir, images, monkeypatch):
    import torch

    from vl_masking import api, batch, inputs
    from vl_masking.batch_config import load_batch

    loads, real_load, real_run = [], inputs.load_model, api.run
    monkeypatch.setattr(inputs, "load_model", lambda s: loads.append(s.model) or real_load(s))

    def run(settings, *args, **kwargs):
        if settings.output == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_run(settings, *args, **kwargs)

    monkeypatch.setattr(api, "run", run)
    config = write_config(images, [{"name": "small", "prompt": "One"}, {"name": "huge", "prompt": "Two"},
                                   {"name": "after", "prompt": "Three"}],
                          model=str(tiny_vl_dir), device="cpu", output_dir="out", formats="parquet")
    assert batch.run_batch(load_batch(config, VL), log=lambda *a: None) == 1
    found = entries(images / "out")
    assert [e["status"] for e in found.values()] == ["done", "failed", "done"]
    assert found["huge"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "Traceback" in found["huge"]["traceback"]
    assert len(loads) == 2  # dropped after the out-of-memory error, loaded again for the next prompt


def test_ctrl_c_mid_prompt_leaves_no_file_and_resume_equals_an_uninterrupted_run(tiny_vl_dir, images):
    prompts = [{"name": "quick", "image": "piggy.png", "prompt": "Describe this image.", "num_tokens": 2},
               # long enough (300 steps, a second or two) to be interrupted while it runs
               {"name": "long", "prompt": "Tell a long story.", "num_tokens": 300, "layers": "0",
                "variants": "Full"},
               {"name": "after", "prompt": "And then?", "num_tokens": 2}]
    common = dict(model=str(tiny_vl_dir), device="cpu", formats=["parquet", "csv", "json"])
    config = write_config(images, prompts, output_dir="interrupted", **common)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "[long]" not in seen:  # logged as the prompt starts
        line = proc.stdout.readline()
        assert line, "the batch ended before it could be interrupted"
        seen += line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    out = images / "interrupted"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["batch.batch", "batch.batch.json", "quick.parquet", "quick.csv", "quick.meta.json", "quick.json"])
    assert [e["status"] for e in entries(out).values()] == ["done", "interrupted", "pending"]
    assert "--resume" in err

    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume", check=True)
    assert "1 prompt(s) already done, 2 to run" in proc.stdout
    assert [e["status"] for e in entries(out).values()] == ["done", "done", "done"]

    write_config(images, prompts, output_dir="straight", **common)
    run_cli("mask_impact_vl.py", "--config", config, check=True)
    assert_same_results(out, images / "straight", ["quick", "long", "after"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.sharding
def test_two_processes_under_accelerate_launch_write_what_one_process_writes(tiny_vl_dir, images, monkeypatch):
    # accelerate gives each CPU process one thread; the single run gets the same, so that float
    # sums run in the same order and the values agree to the bit.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prompts = [{"name": "p1", "image": "piggy.png", "prompt": "Describe this image."},
               {"name": "p2", "prompt": "Hello there", "mask_mode": "text"},
               {"name": "p3", "image": "piggy.png", "prompt": "What colour is it?", "num_tokens": 3},
               {"name": "p4", "prompt": "Count to three.", "mask_mode": "text"}]
    common = dict(model=str(tiny_vl_dir), num_tokens=2, mask_mode="both", device="cpu")
    config = write_config(images, prompts, output_dir="single", **common)
    run_cli_process("mask_impact_vl.py", "--config", config, check=True)
    write_config(images, prompts, output_dir="sharded", **common)
    env = dict(os.environ, TQDM_DISABLE="1")
    # On a machine without GPUs, accelerate's --cpu starts one process (MPI aside); --multi_gpu
    # starts K processes through torchrun, and each runs on the CPU.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(ROOT / "mask_impact_vl.py"),
                           "--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2: 2 of 4 prompts" in proc.stdout and "process 2 of 2: 2 of 4 prompts" in proc.stdout
    single, sharded = manifest(images / "single"), manifest(images / "sharded")
    assert {e["process"] for e in sharded["prompts"]} == {0, 1} and sharded["processes"] == 2
    assert sharded["counts"] == single["counts"] == {"done": 4}
    for a, b in zip(single["prompts"], sharded["prompts"]):
        a, b = stable(a), stable(b)
        assert a.pop("paths") == {k: v.replace("/sharded/", "/single/") for k, v in b.pop("paths").items()}
        a["settings"].pop("output_dir"), b["settings"].pop("output_dir")
        assert a == b
    assert_same_results(images / "single", images / "sharded", ["p1", "p2", "p3", "p4"])


def test_layers_split_across_devices_by_a_device_map_give_the_numbers_of_one_device(tiny_vl_dir, tmp_path):
    # On a CPU machine accelerate places modules on the CPU or on disk (loaded layer by layer as
    # it runs); on a GPU machine the same map can name cuda:0 and cuda:1.
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
                  "model.language_model.layers.2": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    args = ["--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.", "--num-tokens", 2,
            "--mask-mode", "both", "--dtype", "float32", "--formats", "parquet"]
    run_cli("mask_impact_vl.py", *args, "--device", "cpu", "--output-dir", tmp_path / "one", check=True)
    proc = run_cli("mask_impact_vl.py", *args, "--device-map", tmp_path / "map.json", "--output-dir",
                   tmp_path / "split", check=True)
    assert "cpu" in proc.stdout
    one = read_table(tmp_path / "one" / "vl_masking_results.parquet")
    split = read_table(tmp_path / "split" / "vl_masking_results.parquet")
    assert len(one) == len(split) > 0
    assert np.array_equal(one.l2_distance, split.l2_distance)
    assert np.array_equal(one.cosine_distance, split.cosine_distance)


def test_the_example_configs_run_with_a_tiny_model(tiny_vl_dir, tiny_text_dir, tmp_path):
    for script, config, model in (("mask_impact_vl.py", "prompts_config_vl.yaml", tiny_vl_dir),
                                  ("mask_impact_analysis.py", "prompts_config.yaml", tiny_text_dir)):
        proc = run_cli(script, "--config", ROOT / config, "--model", model, "--device", "cpu",
                       "--output-dir", tmp_path, "--num-tokens", 1, "--formats", "parquet", check=True)
        done = entries(tmp_path, config.removesuffix(".yaml"))
        assert done and {e["status"] for e in done.values()} <= {"done", "skipped"}, proc.stdout
        assert "done" in {e["status"] for e in done.values()}


def test_a_model_that_cannot_load_fails_its_prompts_once_and_the_batch_goes_on(tiny_vl_dir, images, monkeypatch):
    config = write_config(images, [
        {"name": "lost_a", "prompt": "One", "model": "nobody/no-such-model"},
        {"name": "here", "prompt": "Two"},
        {"name": "lost_b", "prompt": "Three", "model": "nobody/no-such-model"},
    ], model=str(tiny_vl_dir), device="cpu", output_dir="out", formats="parquet", num_tokens=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: the hub is not asked
    proc = run_cli("mask_impact_vl.py", "--config", config)
    assert proc.returncode == 1, proc.stderr[-2000:]
    found = entries(images / "out")
    assert [e["status"] for e in found.values()] == ["failed", "done", "failed"]
    assert found["lost_a"]["error"] == found["lost_b"]["error"]
    assert "local model directory" in found["lost_a"]["error"]
    assert proc.stdout.count("could not be loaded") == 1


def test_an_unreachable_hub_switches_to_the_local_cache_at_once(monkeypatch):
    import socket

    from vl_masking import inputs

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    inputs.go_offline_if_hub_unreachable("owner/model")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    message = inputs.load_failure("owner/model", OSError("We couldn't connect"))
    assert "local model directory" in message and "connect" in message


def test_yaml_words_that_version_1_1_reads_as_booleans_stay_the_text_written(tiny_vl_dir, images):
    from vl_masking.batch_config import load_batch

    config = images / "words.yaml"
    config.write_text("defaults:\n  model: " + str(tiny_vl_dir) + "\n  output_dir: out\nprompts:\n"
                      "  - name: off\n    prompt: yes\n  - name: no\n    prompt: on\n    system: off\n"
                      "  - name: 'on'\n    prompt: '007'\n    enabled: yes\n")
    prompts = load_batch(config, VL).prompts
    assert [(p.name, p.settings.prompt) for p in prompts] == [("off", "yes"), ("no", "on"), ("on", "007")]
    assert prompts[1].settings.system == "off" and prompts[2].enabled is True


def test_resume_warns_about_a_damaged_manifest_and_refuses_another_configs(tiny_vl_dir, images):
    config = write_config(images, [{"name": "a", "prompt": "One"}], model=str(tiny_vl_dir), device="cpu",
                          output_dir="out", formats="parquet", num_tokens=1)
    out = images / "out"
    out.mkdir()
    (out / "batch.batch.json").write_text("[1]")  # valid JSON, not a manifest
    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume", check=True)
    assert proc.stdout.count("warning: the manifest") == 1 and "damaged" in proc.stdout
    assert entries(out)["a"]["status"] == "done"
    (out / "batch.batch.json").write_text("{not json")
    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume", check=True)
    assert "warning: the manifest" in proc.stdout
    other = images / "elsewhere"
    other.mkdir()
    write_config(other, [{"name": "b", "prompt": "Two"}], model=str(tiny_vl_dir), device="cpu",
                 output_dir=str(out), formats="parquet", num_tokens=1)
    proc = run_cli("mask_impact_vl.py", "--config", other / "batch.yaml")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert str(config) in proc.stderr and str(other / "batch.yaml") in proc.stderr
    assert manifest(out)["config"] == str(config)


def test_sigterm_during_a_batch_marks_the_prompt_interrupted_and_exits_143(tiny_vl_dir, images):
    prompts = [{"name": "long", "prompt": "Tell a long story.", "num_tokens": 600, "layers": "0",
                "variants": "Full"}, {"name": "after", "prompt": "And then?", "num_tokens": 1}]
    config = write_config(images, prompts, model=str(tiny_vl_dir), device="cpu", output_dir="out")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "Prompt:" not in proc.stdout.readline():
        assert proc.poll() is None, "the batch ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert [e["status"] for e in entries(images / "out").values()] == ["interrupted", "pending"]
    assert "terminated" in err and "long" in err  # the table and the message
    assert sorted(p.name for p in (images / "out").iterdir()) == ["batch.batch", "batch.batch.json"]


def test_every_flow_problem_of_a_prompt_is_listed_with_its_window(tiny_vl_dir, images):
    config = write_config(images, [
        {"name": "flows", "prompt": "Hi", "measure": "flow", "window": 0,
         "flows": ["image->last", "nowhere->last", "units->last", "units->last"]},
    ], model=str(tiny_vl_dir), device="cpu", output_dir="out")
    proc = run_cli("mask_impact_vl.py", "--config", config)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "4 problems" in lines[0], lines
    for expected in ["window: --window must be at least 1 (got 0)",
                     "flows: --flow image->last names image tokens but the prompt has no --image",
                     "flows: unknown --flow group 'nowhere'",
                     "flows: --flow units->last is given twice"]:
        assert any(expected in line for line in lines), (expected, lines)


def test_options_that_no_prompt_uses_are_named_once_with_their_prompts(tiny_vl_dir, images):
    config = write_config(images, [
        {"name": "a", "prompt": "One"}, {"name": "b", "prompt": "Two"},
        {"name": "c", "prompt": "Three", "measure": "flow", "flow": "question->last", "mask_unit": "word"},
    ], model=str(tiny_vl_dir), device="cpu", output_dir="out", window=5, formats="parquet")
    proc = run_cli("mask_impact_vl.py", "--config", config, check=True)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --window is used by --measure flow only; ignored with --measure layer (prompts a, b)",
        "warning: --mask-unit makes the units of a flow from units, and no --flow has units as its source; "
        "ignored (prompt c)"], proc.stderr


def test_a_second_process_on_a_running_batch_is_refused_and_a_killed_one_does_not_block(tiny_vl_dir, images):
    prompts = [{"name": "long", "prompt": "Tell a long story.", "num_tokens": 300, "layers": "0",
                "variants": "Full"}, {"name": "after", "prompt": "And then?", "num_tokens": 1}]
    config = write_config(images, prompts, model=str(tiny_vl_dir), device="cpu", output_dir="out",
                          formats="parquet")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), "--config", str(config)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "[long]" not in first.stdout.readline():
            assert first.poll() is None, "the batch ended before a second process could start"
        first.send_signal(signal.SIGSTOP)  # it holds its rank while the second one starts
        second = run_cli("mask_impact_vl.py", "--config", config, "--resume")
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"already running (process {first.pid} on {socket.gethostname()}" in second.stderr
        assert "--resume" in second.stderr
    finally:
        first.kill()  # SIGKILL: no handler runs, nothing is tidied
        first.communicate(timeout=60)
    assert [e["status"] for e in json.loads((images / "out" / "batch.batch" / "rank-00000.json").read_text())[
        "prompts"]] == ["running", "pending"]
    proc = run_cli("mask_impact_vl.py", "--config", config, "--resume")  # the kernel dropped its lock
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 prompt(s) already done, 2 to run" in proc.stdout
    assert manifest(images / "out")["counts"] == {"done": 2}


def test_a_resume_with_nothing_to_do_answers_without_importing_torch(tiny_vl_dir, images):
    config = write_config(images, [{"name": "a", "prompt": "One"}], model=str(tiny_vl_dir), device="cpu",
                          output_dir="out", formats="parquet")
    run_cli("mask_impact_vl.py", "--config", config, check=True)
    code = ("import sys; from vl_masking.cli import main; from vl_masking.tools import VL\n"
            "try:\n    main(VL, ['--config', sys.argv[1], '--resume'])\nexcept SystemExit as e:\n    assert not e.code\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"
    assert "0 to run" in proc.stdout and "prompts:" not in proc.stderr  # no empty progress
