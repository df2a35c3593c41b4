"""Input that used to end in a traceback or in a misleading line: one clear line on stderr, exit code 2, nothing
left behind; and each problem said once."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from conftest import PIGGY, ROOT, Completed, run_cli
from test_real_model import gguf_path  # noqa: F401 - the fixture of the real checkpoint

FACTS = pd.DataFrame({"case": ["eiffel", "colosseum"], "prompt": ["The Eiffel Tower is in", "The Colosseum is in"],
                      "attribute": ["Paris", "Rome"]})


def figures(*args):
    proc = subprocess.run([sys.executable, "-m", "vl_masking.figures", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)
    return Completed(proc.returncode, proc.stdout, proc.stderr)


def one_line(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.mark.parametrize("template,words", [("Q: {} {prompt}", "{} is not a column's name"),
                                            ("{prompt", "expected '}'"),
                                            ("{prompt!x}", "takes no conversion or format"),
                                            ("{prompt:d}", "takes no conversion or format"),
                                            ("{prompt.__class__}", "is not a column's name")])
def test_a_malformed_prompt_template_is_one_line(tiny_text_dir, tmp_path, template, words):
    FACTS.to_json(tmp_path / "facts.jsonl", orient="records", lines=True)
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", tmp_path / "facts.jsonl",
                   "--columns", "id=case", "--prompt-template", template, "--output-dir", tmp_path / "out")
    one_line(proc, "--prompt-template", words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["mask_impact_analysis.py", "mask_impact_vl.py"])
def test_a_chat_template_that_is_not_utf8_is_one_line(tiny_text_dir, tiny_vl_dir, tmp_path, script):
    template = tmp_path / "template.jinja"
    template.write_bytes("{{ messages[0]['content'] }} caf\xe9".encode("latin-1"))
    model = tiny_text_dir if script == "mask_impact_analysis.py" else tiny_vl_dir
    proc = run_cli(script, "--model", model, "--prompt", "Hi", "--chat-template", template,
                   "--output-dir", tmp_path / "out")
    one_line(proc, "--chat-template", "not UTF-8")
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_raises_is_refused_before_a_study_loads_or_writes(tiny_text_dir, tmp_path):
    FACTS.to_json(tmp_path / "facts.jsonl", orient="records", lines=True)
    template = tmp_path / "raises.jinja"
    template.write_text("{{ raise_exception('no system prompts here') }}")
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", tmp_path / "facts.jsonl",
                   "--columns", "id=case,question=prompt", "--chat-template", template, "--output-dir", tmp_path / "out")
    one_line(proc, "example eiffel (row 1)", "no system prompts here")
    assert "Model:" not in proc.stdout and not (tmp_path / "out").exists()


def test_an_id_too_long_for_a_file_name_is_a_problem_of_its_row(tiny_vl_dir, tmp_path):
    import io

    import datasets

    picture = io.BytesIO()
    Image.open(PIGGY).save(picture, format="PNG")
    table = datasets.Dataset.from_dict({"qid": ["x" * 300], "q": ["What is it?"],
                                        "img": [{"bytes": picture.getvalue(), "path": None}]})
    table.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "pictures"))
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", tmp_path / "pictures",
                   "--columns", "id=qid,image=img,question=q", "--output-dir", tmp_path / "out")
    one_line(proc, "row 1, column qid: the id has 300 characters; at most 200")
    assert not (tmp_path / "out").exists()


def test_each_problem_of_a_table_is_said_once(tiny_text_dir, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "a b", "q": ""}) + "\n" + json.dumps({"id": "ok", "q": "Hi"})
                                      + "\n")
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", tmp_path / "t.jsonl",
                   "--columns", "id=id,question=q", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: dataset {tmp_path / 't.jsonl'} has 2 problems:", proc.stderr
    assert sorted(line.strip() for line in lines[1:]) == [
        "row 1, column id: 'a b' is not a plain name (letters, digits, '.', '_', '-')",
        "row 1, column q: the prompt is empty"]


@pytest.fixture(scope="module")
def study_dir(tiny_text_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    FACTS.to_json(root / "facts.jsonl", orient="records", lines=True)
    run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", root / "facts.jsonl", "--columns",
            "id=case,question=prompt", "--measure", "layer", "--num-tokens", 2, "--output-dir", root, check=True)
    return root / "facts"


@pytest.mark.parametrize("args,words", [(["--step", 7], "--step 7: the examples have steps 0-1"),
                                        (["--metric", "kl"], "--metric kl does not fit"),
                                        (["--layers", "9"], "--layers 9: the examples have layers 0-2")])
def test_figures_of_a_study_refuse_what_does_not_fit(study_dir, tmp_path, args, words):
    proc = figures(study_dir, *args, "--out", tmp_path / "figs")
    one_line(proc, words)
    assert not (tmp_path / "figs").exists()  # a failed run leaves no --out it made


def test_figures_into_a_directory_that_cannot_be_written_is_one_line(study_dir):
    proc = figures(study_dir, "--out", "/proc/self")  # exists, takes no files (even root)
    one_line(proc, "--out /proc/self: cannot write there")


def test_figures_of_a_file_resaved_by_pandas_say_the_metadata_is_gone_unless_it_has_the_layer_columns(study_dir,
                                                                                                       tmp_path):
    """A copy without metadata is read as a file written before schemas (the layer measure) where its columns are
    the layer's; otherwise one line says the metadata is gone."""
    table = pd.read_parquet(study_dir)
    table[table.example_id == "eiffel"].to_parquet(tmp_path / "copy.parquet")
    assert figures(tmp_path / "copy.parquet", "--out", tmp_path / "figs").returncode == 0
    table.drop(columns=["l2_distance", "cosine_distance"]).to_parquet(tmp_path / "other.parquet")
    proc = figures(tmp_path / "other.parquet", "--out", tmp_path / "figs2")
    one_line(proc, "holds no mask-impact metadata", "re-saved by pandas")


def test_a_study_figure_says_when_a_panel_has_no_interval_and_names_the_model(study_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    from vl_masking.figures import main
    from vl_masking.figures.averages import interval_words

    assert interval_words(pd.Series([1, 1])) == "no interval (one value per point)"
    assert interval_words(pd.Series([1, 3])) == "95% bootstrap interval (none where n = 1)"
    assert interval_words(pd.Series([2, 3])) == "95% bootstrap interval"
    titles, saved = [], matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        titles.append(" ".join(fig._suptitle.get_text().split()))  # the title as read, wrapped or not
        return saved(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    main([str(study_dir), "--group-by", "attribute", "--out", str(tmp_path / "figs")], log=lambda _: None)
    model = json.loads((study_dir / "_study.json").read_text())["overrides"]["model"]
    assert titles[0].startswith(model) and "no interval (one value per point)" in titles[0], titles
    assert "95%" not in titles[0]


def test_an_all_excluded_study_says_it_wrote_no_rows(tiny_text_dir, tmp_path):
    facts = FACTS.assign(attribute=["zzzz", "qqqq"])
    facts.to_json(tmp_path / "facts.jsonl", orient="records", lines=True)
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", tmp_path / "facts.jsonl",
                   "--columns", "id=case,question=prompt,answer=attribute", "--target", "answer", "--only-correct",
                   "--num-tokens", 1, "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "holds no rows: no example was written" in proc.stdout and "pd.read_parquet" not in proc.stdout


@pytest.mark.real_model
@pytest.mark.parametrize("cut", ["1 MB", "60 MB", "432 bytes short"])
def test_a_truncated_gguf_is_called_damaged_not_missing_from_the_hub(gguf_path, tmp_path, cut):
    data = gguf_path.read_bytes()
    size = {"1 MB": 1_000_000, "60 MB": 60_000_000, "432 bytes short": len(data) - 432}[cut]
    (tmp_path / "cut.gguf").write_bytes(data[:size])
    proc = run_cli("mask_impact_analysis.py", "--model", tmp_path / "cut.gguf", "--prompt", "Hi",
                   "--output-dir", tmp_path / "out")
    one_line(proc, "damaged GGUF file")
    assert "hub" not in proc.stderr
