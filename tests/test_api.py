"""The Python API: the README example runs as written (against a tiny model) and writes nothing unless asked."""

import re

from conftest import PIGGY, ROOT
from vl_masking import run_vl_masking
from vl_masking.measures.layer import LAYER_COLUMNS as COLUMNS
from vl_masking.tiny_models import build_causal_lm


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    model = build_causal_lm(tmp_path / "qwen3")
    code = _readme_example()
    assert 'model="Qwen/Qwen3-0.6B"' in code
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(code.replace("Qwen/Qwen3-0.6B", str(model)), namespace)
    df = namespace["df"]
    assert list(df.columns) == COLUMNS
    assert sorted(df.layer.unique()) == [0, 1] and df.generation_step.max() == 2
    assert "token_position" in capsys.readouterr().out
    assert not (tmp_path / "output").exists()  # nothing written unless asked


def test_vl_api_returns_the_table_and_writes_when_given_an_output_name(tiny_vl_dir, tmp_path):
    df = run_vl_masking("Describe.", images=[PIGGY], model=str(tiny_vl_dir), device="cpu", mask_mode="vision",
                        output="api_run", output_dir=str(tmp_path))
    assert set(df.token_type) == {"vision"} and len(df.grid_row.unique()) == 3
    assert df.attrs["metadata"]["mask_mode"] == "vision"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "api_run.csv", "api_run.json", "api_run.meta.json", "api_run.parquet"]


def test_readme_offline_example_runs_as_written(tmp_path):
    """The README's offline commands: build a tiny text model, one prompt, the example batch, its resume."""
    import shlex
    import shutil

    from conftest import run_cli
    from vl_masking.tiny_models import main as build

    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- offline-example -->\n```\n(.*?)```", text, re.S).group(1)
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    shutil.copy(ROOT / "prompts_config.yaml", tmp_path)
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "prompt.txt", tmp_path / "examples")
    outputs = []
    for command in commands:
        assert command[0] == ".venv/bin/python"
        if command[1:3] == ["-m", "vl_masking.tiny_models"]:
            build([str(tmp_path / command[3]), *command[4:]])
            continue
        args = [str(tmp_path / a) if a == ".cache/tiny-qwen3" else a for a in command[2:]]
        outputs.append(run_cli(command[1], *args, cwd=tmp_path, check=True).stdout)
    assert "Rows: " in outputs[0]
    assert "Prompts: 3 done, 1 skipped" in outputs[1]
    assert "3 prompt(s) already done, 0 to run" in outputs[2]
    assert (tmp_path / "output" / "capital_of_france.parquet").is_file()


def test_every_picture_and_file_the_readme_links_exists():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    local = [t for t in targets if "://" not in t]
    assert any(t.endswith(".png") for t in local)
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links files that do not exist: {missing}"


def test_an_api_option_the_run_does_not_use_is_a_user_warning(tiny_vl_dir):
    import pytest

    with pytest.warns(UserWarning, match="--window is used by --measure flow only") as caught:
        run_vl_masking("Hi", model=str(tiny_vl_dir), device="cpu", window=5)
    assert caught[0].filename == __file__  # it points at the caller's line
