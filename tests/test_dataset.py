"""A dataset table as a study's examples: a GQA-shaped table (generated pictures, questions, one-word answers, a type
column) in CSV, JSON Lines and Parquet gives the same examples; --where, --sample and --limit choose them;
every problem of the table is listed at once before a model loads; --target answer reads each example's
answer."""


import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from vl_masking.dataset import load_dataset
from vl_masking.errors import UsageError
from vl_masking.results import read_table
from vl_masking.tools import TEXT, VL

COLOURS = [("red", "ChooseAttr"), ("green", "QueryAttr"), ("blue", "ChooseAttr"), ("white", "CompareAttr"),
           ("black", "ChooseAttr")]
GQA = ["--columns", "id=qid,image=img,question=q,answer=a",
       "--prompt-template", "{question} Answer the question using a single word or phrase."]


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """The same five examples as gqa.csv, gqa.jsonl and gqa.parquet, pictures in images/ beside them."""
    root = tmp_path_factory.mktemp("gqa")
    (root / "images").mkdir()
    rows = []
    for i, (colour, kind) in enumerate(COLOURS):
        Image.new("RGB", (64, 48), colour).save(root / "images" / f"{i}.png")
        rows.append({"qid": f"q{i}", "img": f"images/{i}.png", "q": "What colour is the square?", "a": colour,
                     "type": kind})
    table = pd.DataFrame(rows)
    table.to_csv(root / "gqa.csv", index=False)
    table.to_json(root / "gqa.jsonl", orient="records", lines=True)
    table.to_parquet(root / "gqa.parquet", index=False)
    return root


def examples(path, **options):
    batch = load_dataset(path, VL, {"model": "Qwen/Qwen3-VL-4B-Instruct", "output_dir": str(path.parent / "out")},
                         columns="id=qid,image=img,question=q,answer=a",
                         template="{question} Answer the question using a single word or phrase.", **options)
    return [(e.name, e.settings.prompt, e.settings.images) for e in batch.examples]


def test_the_three_formats_give_the_same_examples_and_the_rows_are_chosen_as_asked(gqa):
    csv = examples(gqa / "gqa.csv")
    assert csv == examples(gqa / "gqa.jsonl") == examples(gqa / "gqa.parquet")
    assert [name for name, _, _ in csv] == ["q0", "q1", "q2", "q3", "q4"]
    assert csv[0][1] == "What colour is the square? Answer the question using a single word or phrase."
    assert csv[2][2] == [str((gqa / "images" / "2.png").resolve())]  # relative to the table
    chosen = examples(gqa / "gqa.csv", where="type == 'ChooseAttr'")
    assert [name for name, _, _ in chosen] == ["q0", "q2", "q4"]
    assert [n for n, _, _ in examples(gqa / "gqa.csv", where="type == 'ChooseAttr'", limit=2)] == ["q0", "q2"]
    drawn = examples(gqa / "gqa.csv", sample=3, seed=7)
    assert drawn == examples(gqa / "gqa.parquet", sample=3, seed=7) and len(drawn) == 3
    assert [n for n, _, _ in drawn] == [f"q{i}" for i in pd.read_csv(gqa / "gqa.csv").sample(n=3, random_state=7).index]


def test_every_problem_of_the_table_is_listed_at_once_before_a_model_loads(gqa, tmp_path):
    table = pd.read_csv(gqa / "gqa.csv")
    table.loc[1, "img"] = "images/missing.png"
    table.loc[3, "qid"] = "q0"  # the id of row 1 again
    table.loc[4, "q"] = ""
    table.to_csv(tmp_path / "bad.csv", index=False)
    for name in ("images",):
        (tmp_path / name).symlink_to(gqa / name)
    proc = run_cli("mask_impact_vl.py", "--model", tmp_path / "no-such-model", "--dataset", tmp_path / "bad.csv",
                   *GQA, "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    message = proc.stderr
    assert message.startswith(f"error: dataset {tmp_path / 'bad.csv'} has 4 problems:"), message
    assert "row 2, column img: image not found" in message
    assert "row 4, column qid: 'q0' is also the id of row 1" in message
    assert "row 5, column q: empty, but the template uses it" in message
    assert "every row: model directory not found" in message  # said once, not once per row
    with pytest.raises(UsageError, match="the table has no column 'question_text'"):
        load_dataset(gqa / "gqa.csv", VL, {}, columns="question=question_text")
    with pytest.raises(UsageError, match="--where"):
        load_dataset(gqa / "gqa.csv", VL, {}, columns="question=q", where="no_such_column == 1")


def test_dataset_options_need_a_dataset_and_answer_needs_its_column(tiny_text_dir, tmp_path):
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "Hi", "--limit", 3)
    assert proc.returncode == 2 and "--limit needs --dataset" in proc.stderr
    (tmp_path / "t.csv").write_text("q\nHi\n")
    with pytest.raises(UsageError, match="--target answer needs the table's answer column"):
        load_dataset(tmp_path / "t.csv", TEXT, {"target": "answer"}, columns="question=q")
    with pytest.raises(UsageError, match="--only-correct .* needs --target answer"):
        load_dataset(tmp_path / "t.csv", TEXT, {}, columns="question=q", only_correct=True)
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--prompt", "Hi", "--only-correct")
    assert proc.returncode == 2 and "--only-correct needs --dataset" in proc.stderr
