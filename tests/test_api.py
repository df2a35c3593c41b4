"""The Python API: the README example runs as written (against a tiny model) and writes nothing unless asked."""

import re

from conftest import PIGGY, ROOT
from vl_masking import run_vl_masking
from vl_masking.measures.layer import LAYER_COLUMNS as COLUMNS
from vl_masking.tiny_models import build_causal_lm


def _readme_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
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
    """The offline commands of docs/models.md: build a tiny text model, one prompt, the example batch, its resume."""
    import shlex
    import shutil

    from conftest import run_cli
    from vl_masking.tiny_models import main as build

    text = (ROOT / "docs" / "models.md").read_text()
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


def anchors(path) -> set:
    """The anchors of a Markdown page's headings, as GitHub makes them (code blocks left out)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        fenced = fenced != line.startswith("```")
        heading = None if fenced or line.startswith("```") else re.match(r"#+ (.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_every_link_of_the_readme_and_the_docs_pages_leads_somewhere():
    """Every file, picture and #anchor the README and docs/*.md link exists; every docs page is linked from the
    README; no page points to a file outside the repository."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems, linked = [], set()
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or ROOT not in dest.parents:
                problems.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}: {target} (no such heading)")
            if page.name == "README.md":
                linked.add(dest)
    assert not problems, problems
    assert any(t.endswith(".png") for p in pages for t in re.findall(r"\]\(([^)\s]+)\)", p.read_text()))
    assert set(pages[1:]) <= linked, "docs pages the README does not link"


def test_an_api_option_the_run_does_not_use_is_a_user_warning(tiny_vl_dir):
    import pytest

    with pytest.warns(UserWarning, match="--window is used by --measure flow only") as caught:
        run_vl_masking("Hi", model=str(tiny_vl_dir), device="cpu", window=5)
    assert caught[0].filename == __file__  # it points at the caller's line
