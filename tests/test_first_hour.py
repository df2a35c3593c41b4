"""A new user's first hour: install, API names, chat templates, images as seen, a quiet console."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import PIGGY, ROOT, analyse_vl, run_cli, vl_settings
from vl_masking.api import prepare
from vl_masking.pictures import open_image
from vl_masking.options import RunSettings
from vl_masking.tiny_models import build_qwen3_vl

OUTSIDE = ("import vl_masking, os\n"
           "from vl_masking import run_vl_masking, run_masking_experiment\n"
           "from vl_masking.tiny_models import TOKENIZER_DIR, VL_CHAT_TEMPLATE\n"
           "assert TOKENIZER_DIR.joinpath('tokenizer.json').is_file() and VL_CHAT_TEMPLATE.is_file()\n"
           "import vl_masking.measures, vl_masking.models\n"
           "assert all(os.path.dirname(m.__file__).startswith(os.path.dirname(vl_masking.__file__))\n"
           "           for m in (vl_masking.measures, vl_masking.models)), 'a subpackage comes from elsewhere'\n"
           "print(os.path.dirname(vl_masking.__file__))\n")


def package_sources(tmp_path):
    """What `pip install .` builds from, copied (building leaves files beside the sources): the package, its
    metadata and the viewer pages it ships as data files."""
    import shutil

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "visualize_results.html", "visualize_vl_grid.html"):
        shutil.copy(ROOT / name, source / name)
    for name in ("vl_masking", "viewer"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def test_the_api_imports_from_outside_the_repository_after_pip_install(tmp_path):
    """make install runs `pip install -e .`; `pip install .` ships the package with its assets."""
    source, target = package_sources(tmp_path), tmp_path / "site"  # a copy: building leaves files beside them
    editable = subprocess.Popen([sys.executable, "-c", OUTSIDE], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    installed = subprocess.run([sys.executable, "-c", OUTSIDE], cwd=tmp_path, capture_output=True, text=True, env=env)
    out, err = editable.communicate(timeout=120)
    assert editable.returncode == 0, err
    assert out.strip() == str(ROOT / "vl_masking")
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == str(target / "vl_masking")
    for command in ("mask-impact-vl", "mask-impact", "mask-impact-figures"):  # the console scripts
        helped = subprocess.run([str(target / "bin" / command), "--help"], cwd=tmp_path, capture_output=True,
                                text=True, env=env)
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: {command} "), (command, helped.stderr)
    module = subprocess.run([sys.executable, "-m", "vl_masking", "text", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env=env)
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m vl_masking text ")


def test_python_m_vl_masking_names_its_commands_and_refuses_an_unknown_one():
    known = subprocess.run([sys.executable, "-m", "vl_masking"], capture_output=True, text=True, cwd=ROOT)
    assert known.returncode == 2 and all(name in known.stderr for name in ("vl", "text", "figures"))
    figures = subprocess.run([sys.executable, "-m", "vl_masking", "figures", "nothing-*.parquet"],
                             capture_output=True, text=True, cwd=ROOT)
    assert figures.returncode == 2 and figures.stderr.strip() == "error: no result files match 'nothing-*.parquet'"


def test_both_api_functions_take_model_and_the_old_name_still_works(tiny_text_dir):
    from vl_masking import run_masking_experiment

    df = run_masking_experiment("Hi there", model=str(tiny_text_dir), device="cpu", num_tokens=1, layers="0")
    assert len(df) > 0
    with pytest.warns(DeprecationWarning, match="model_name"):
        old = run_masking_experiment("Hi there", model_name=str(tiny_text_dir), device="cpu", num_tokens=1,
                                     layers="0")
    assert old.l2_distance.equals(df.l2_distance)


# -- chat templates ---------------------------------------------------------------------------

DEFAULT_SYSTEM = ("{%- if messages[0].role != 'system' %}"
                  "{{- '<|im_start|>system\\nYou are a careful assistant.<|im_end|>\\n' }}{%- endif %}")
LOOP = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.content is string %}{{- m.content }}"
        "{%- else %}{%- for c in m.content %}{%- if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{%- elif 'text' in c %}{{- c.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
        "{%- endfor %}")
THINKING = LOOP + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
FINE_TUNE = DEFAULT_SYSTEM + LOOP + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"


def _with_template(model_dir, tmp_path, name, template):
    import shutil

    target = tmp_path / name
    shutil.copytree(model_dir, target)
    (target / "chat_template.jinja").write_text(template)
    return target


def _prompt_text(model_dir, tmp_path, **overrides):
    from vl_masking.inputs import load_model

    values = dict(model=str(model_dir), prompt="Describe this image.", images=[str(PIGGY)], device="cpu",
                  dtype="float32", output_dir=str(tmp_path))
    values.update(overrides)
    settings = RunSettings(**values)
    inputs, _ = prepare(load_model(settings, weights=False), settings)
    return inputs


def test_the_official_qwen3_vl_template_gives_the_ids_of_the_built_in_format(tiny_vl, tall_image, tmp_path):
    from transformers import AutoTokenizer

    settings = vl_settings(tiny_vl.name, tmp_path, images=[str(PIGGY), str(tall_image)], prompt="Compare them.")
    inputs, _ = prepare(tiny_vl, settings)
    assert inputs.prompt_format == "chat template"
    tok = AutoTokenizer.from_pretrained(tiny_vl.name)
    builtin = tiny_vl.adapter.builtin_prompt("Compare them.", 2, None)
    pads = [int(t.prod()) // 4 for t in inputs.model_kwargs["image_grid_thw"]]
    pieces = builtin.split("<|image_pad|>")
    builtin = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(pads, pieces[1:]))
    assert inputs.input_ids[0].tolist() == tok(builtin, add_special_tokens=False)["input_ids"]
    system = vl_settings(tiny_vl.name, tmp_path, prompt="Compare them.", images=[], system="Be brief.")
    text = prepare(tiny_vl, system)[0].layout.text
    assert text == tiny_vl.adapter.builtin_prompt("Compare them.", 0, "Be brief.")


def test_a_checkpoint_without_a_template_uses_the_built_in_format(tiny_vl_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_vl_dir, bare)
    (bare / "chat_template.jinja").unlink()
    inputs = _prompt_text(bare, tmp_path)
    assert inputs.prompt_format == "built-in Qwen-VL chat"
    assert inputs.layout.text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")


def test_a_thinking_template_appends_think_after_the_assistant_header(tiny_vl_dir, tmp_path):
    inputs = _prompt_text(_with_template(tiny_vl_dir, tmp_path, "thinking", THINKING), tmp_path)
    assert inputs.layout.text.endswith("<|im_start|>assistant\n<think>\n")
    assert inputs.tokens.text[-2:] == ["<think>", "\n"]


def test_a_fine_tune_default_system_prompt_comes_out_as_the_template_says(tiny_vl_dir, tmp_path):
    model = _with_template(tiny_vl_dir, tmp_path, "tuned", FINE_TUNE)
    inputs = _prompt_text(model, tmp_path)
    assert inputs.layout.text.startswith("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n")
    own = _prompt_text(model, tmp_path, system="Answer in French.")
    assert own.layout.text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    assert "careful" not in own.layout.text
    question = [own.tokens.text[p] for p in np.flatnonzero(own.tokens.in_question)]
    assert "".join(question) == "Describe this image."


def test_the_metadata_records_the_prompt_format_and_system_prompt(tiny_vl_dir, tmp_path):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--prompt", "Hi", "--system", "Be brief.",
                   "--output-dir", tmp_path, "--formats", "json", check=True)
    from vl_masking.results import read_metadata

    meta = read_metadata(tmp_path / "vl_masking_results.json")
    assert meta["prompt_format"] == "chat template" and meta["system"] == "Be brief."
    assert meta["final_tokens"][:3] == ["<|im_start|>", "system", "\n"]
    assert "Prompt:" in proc.stdout


# -- images as seen ---------------------------------------------------------------------------

def test_a_16_bit_grayscale_image_keeps_its_grays(tmp_path):
    path = tmp_path / "gray16.png"
    values = np.full((32, 32), 32768, dtype=np.uint16)
    values[:, :16] = 8192
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_image(str(path)))
    assert rgb.shape == (32, 32, 3)
    assert abs(int(rgb[0, 20, 0]) - 128) <= 1 and abs(int(rgb[0, 0, 0]) - 32) <= 1


def test_exif_orientation_is_applied_and_the_grid_follows_the_picture_as_seen(tiny_vl, tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.open(PIGGY).convert("RGB").save(path, exif=exif)  # stored 160 x 96, seen 96 x 160
    analysis, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, images=[str(path)], num_tokens=1))
    image = analysis.metadata["images"][0]
    assert (image["width"], image["height"]) == (96, 160)
    assert (image["grid_rows"], image["grid_cols"]) == (5, 3)


def test_special_token_text_in_the_prompt_gives_one_warning_line(tiny_vl_dir, tmp_path):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--prompt", "Hi<|im_end|><|im_start|>assistant",
                   "--output-dir", tmp_path, "--formats", "parquet", check=True)
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "<|im_end|>" in warning[0] and "<|im_start|>" in warning[0]


# -- the console ------------------------------------------------------------------------------

def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tiny_vl_dir, tmp_path):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
                   "--num-tokens", 2, "--measure", "flow", "--window", 1, "--output-dir", tmp_path,
                   "--formats", "parquet", check=True, progress=True)
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert "steps: 2/2 step" in lines
    assert any(line.startswith("flow windows: ") and line.endswith(" window") for line in lines), lines


def test_the_console_shows_our_bars_only_and_the_rows_with_their_factors(tiny_vl_dir, tmp_path):
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
                   "--num-tokens", 2, "--layers", "0,2", "--variants", "Full,Attn", "--output-dir", tmp_path,
                   check=True, progress=True)
    assert "Loading weights" not in proc.stderr and "Writing model shards" not in proc.stderr
    assert "steps" in proc.stderr  # ours
    rows = next(line for line in proc.stdout.splitlines() if line.startswith("Rows:"))
    # mask mode text: 14 text tokens at step 0, one more (the generated token) at step 1
    assert rows == "Rows: 116 = 2 layers x 2 variants x (14 + 15) units over 2 steps"


def test_the_tiny_model_builder_makes_text_models_too(tmp_path):
    from vl_masking.tiny_models import main

    path = main([str(tmp_path / "llama"), "--kind", "llama", "--layers", "2"])
    assert (path / "config.json").is_file() and '"llama"' in (path / "config.json").read_text()
    proc = run_cli("mask_impact_analysis.py", "--model", path, "--prompt", "One, two, three,", "--num-tokens", 2,
                   "--output-dir", tmp_path / "out", check=True)
    assert "Rows: " in proc.stdout


def test_base_norm_is_the_norm_of_the_unmasked_vector(tiny_vl, tmp_path):
    import torch

    from vl_masking.reference import base_allowed, reference_variants

    analysis, _ = analyse_vl(tiny_vl, vl_settings(tiny_vl.name, tmp_path, num_tokens=1))
    hidden, pe = analysis.capture.sequence_input(1, 0)
    base = reference_variants(tiny_vl.model, 1, hidden, pe, base_allowed(hidden.shape[1],
                                                                        analysis.capture.vision_blocks))
    rows = analysis.table[(analysis.table.layer == 1)]
    for variant, vector in (("Full", base["Full"]), ("Attn", base["Attn"]), ("Head_1", base["Heads"][1])):
        norms = rows[rows.variant == variant].base_norm.to_numpy()
        assert np.allclose(norms, float(torch.linalg.vector_norm(vector)), rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # relative L2 is defined wherever the base is not zero
        assert np.isfinite((rows.l2_distance / rows.base_norm).to_numpy()).all()


def test_build_qwen3_vl_writes_the_vl_chat_template(tmp_path):
    path = build_qwen3_vl(tmp_path / "m", layers=1)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in (path / "chat_template.jinja").read_text()


TEXT_ONLY = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_text_only_template_on_a_vl_checkpoint_says_so_and_chat_template_builtin_or_file_runs(tiny_vl_dir,
                                                                                               tmp_path):
    """A fine-tune that shipped a text model's template (message content must be a string) is named as such in
    one line; --chat-template builtin uses the family's format, --chat-template FILE a template the user gives."""
    import json

    from vl_masking.tiny_models import TOKENIZER_DIR

    qwen3_text = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]
    for name, template, message in (("qwen3-text", qwen3_text, "is text-only"),  # fails on a list content
                                    ("plain", TEXT_ONLY, "does not place images")):  # renders, without images
        model = _with_template(tiny_vl_dir, tmp_path, name, template)
        proc = run_cli("mask_impact_vl.py", "--model", model, "--image", PIGGY, "--prompt", "What is it?",
                       "--output-dir", tmp_path / "out")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr and "--chat-template builtin" in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
    common = ["--model", model, "--image", PIGGY, "--prompt", "What is it?", "--output-dir", tmp_path / "out",
              "--formats", "parquet"]
    run_cli("mask_impact_vl.py", *common, "--chat-template", "builtin", "--output", "builtin", check=True)
    from vl_masking.results import read_metadata

    assert read_metadata(tmp_path / "out" / "builtin.parquet")["prompt_format"] == "built-in Qwen-VL chat"
    official = ROOT / "vl_masking" / "assets" / "qwen3_vl_instruct_chat_template.jinja"
    run_cli("mask_impact_vl.py", *common, "--chat-template", official, "--output", "file", check=True)
    meta = read_metadata(tmp_path / "out" / "file.parquet")
    assert meta["prompt_format"] == f"chat template {official}"
    assert meta["final_ids"][:meta["prompt_length"]] == read_metadata(tmp_path / "out" / "builtin.parquet")[
        "final_ids"][:meta["prompt_length"]]  # the official template gives the built-in format's ids


def test_chat_template_options_that_cannot_work_are_refused_before_loading(tiny_text_dir, tmp_path):
    missing = run_cli("mask_impact_vl.py", "--model", "any/model", "--image", PIGGY, "--prompt", "x",
                      "--chat-template", tmp_path / "none.jinja")
    assert missing.returncode == 2 and "--chat-template" in missing.stderr and "file not found" in missing.stderr
    builtin = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "x", "--chat-template", "builtin")
    assert builtin.returncode == 2 and "no built-in chat format" in builtin.stderr
    template = tmp_path / "plain.jinja"
    template.write_text(TEXT_ONLY)
    run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "Hello", "--chat-template", template,
            "--output-dir", tmp_path / "out", "--formats", "parquet", "--output", "t", check=True)
    from vl_masking.results import read_metadata

    meta = read_metadata(tmp_path / "out" / "t.parquet")
    assert meta["prompt_format"] == f"chat template {template}" and meta["final_tokens"][0] == "<|im_start|>"


def test_pip_install_ships_both_viewers_and_says_where_they_are(tmp_path):
    """`pip install .` puts the two pages, their script, stylesheet and Parquet reader under PREFIX/share/mask-impact;
    `mask-impact-viewers` (python -m vl_masking.viewers) prints where; in a checkout, the repository's pages."""
    source = package_sources(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    # --ignore-installed: pip would otherwise uninstall this environment's own (editable) install first
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--prefix",
                    str(prefix),
                    *map(str, (tmp_path / "wheel").glob("*.whl"))], check=True, capture_output=True)
    shown = subprocess.run([str(prefix / "bin" / "python"), "-m", "vl_masking.viewers"], cwd=tmp_path,
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert shown.returncode == 0, shown.stderr
    share = prefix / "share" / "mask-impact"
    assert shown.stdout.split() == [(share / p).as_uri() for p in ("visualize_results.html", "visualize_vl_grid.html")]
    for name in ("viewer/common.js", "viewer/common.css", "viewer/vendor/hyparquet.js"):
        assert (share / name).read_bytes() == (ROOT / name).read_bytes(), name
    here = subprocess.run([sys.executable, "-m", "vl_masking", "viewers"], cwd=ROOT, capture_output=True, text=True)
    assert here.stdout.split()[0] == (ROOT / "visualize_results.html").as_uri()
