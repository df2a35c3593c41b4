"""Studies: a dataset table -> one directory of Parquet parts (example_id and the table's columns on every row)
and a manifest -> the grouped figure; the answer as the target, --only-correct, resume after a kill, two
processes equal to one, the API equal to the command line."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, run_cli, run_cli_process
from vl_masking.study import data_files, read_study
from vl_masking.study_run import RankWriter

COLOURS = [("red", "ChooseAttr"), ("green", "QueryAttr"), ("blue", "ChooseAttr"), ("white", "CompareAttr"),
           ("black", "ChooseAttr")]
TEMPLATE = "{question} Answer the question using a single word or phrase."
GQA = ["--columns", "id=qid,image=img,question=q,answer=a", "--prompt-template", TEMPLATE]
FLOWS = ["--measure", "flow", "--flow", "image->last", "--flow", "question->last", "--window", 1]


def gqa_table(root, answers=None):
    """Five GQA-shaped examples (generated pictures, one question, one-word answers, a type column)."""
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i, (colour, kind) in enumerate(COLOURS):
        Image.new("RGB", (64, 48), colour).save(root / "images" / f"{i}.png")
        rows.append({"qid": f"q{i}", "img": f"images/{i}.png", "q": "What colour is the square?",
                     "a": (answers or {}).get(f"q{i}", colour), "type": kind, "difficulty": i % 2})
    path = root / "gqa.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def study(script, *args):
    proc = run_cli(script, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def sorted_rows(table):
    table = table.astype({c: str for c in table.columns if isinstance(table[c].dtype, pd.CategoricalDtype)})
    return table.sort_values(["example_id", "flow", "layer"], kind="stable").reset_index(drop=True)


def test_a_gqa_study_goes_from_the_table_to_one_directory_and_the_grouped_figure(tiny_vl_dir, tmp_path):
    """--target answer reads each answer's first token; --only-correct keeps the examples whose greedy first
    token is it (here two answers are set to the model's own prediction); every row carries example_id and
    the table's columns, and equals a single run of the same prompt; the figure has a panel per type."""
    from transformers import AutoTokenizer

    from vl_masking import run_vl_masking

    table = gqa_table(tmp_path)
    study("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", table, *GQA, "--measure", "layer", "--layers",
          "0", "--output-dir", tmp_path, "--output", "probe")
    manifest = json.loads((tmp_path / "probe" / "_manifest.json").read_text())
    predicted = {e["name"]: e["target"]["predicted_token"] for e in manifest["examples"]}
    probe = read_study(tmp_path / "probe")  # the layer measure records the target too (here the prediction)
    assert probe.correct.all() and (probe.target_token.astype(str) == probe.predicted_token.astype(str)).all()
    assert ((probe.base_prob > 0) & (probe.base_prob <= 1)).all()
    tokenizer = AutoTokenizer.from_pretrained(tiny_vl_dir)
    answers = {name: predicted[name] for name in ("q0", "q3")}  # the model "answers" these two right
    for name, text in answers.items():
        first = tokenizer.encode(text, add_special_tokens=False)[0]
        assert tokenizer.decode([first]) == text  # the answer's first token is the prediction itself
    table = gqa_table(tmp_path, answers)

    proc = study("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", table, *GQA, *FLOWS,
                 "--target", "answer", "--only-correct", "--output-dir", tmp_path / "out")
    assert "--only-correct: kept 2 of 5 examples" in proc.stdout
    assert "examples: 5/5" in proc.stdout and "examples/hour, ETA" in proc.stdout
    directory = tmp_path / "out" / "gqa"
    rows = pd.read_parquet(directory)  # the directory is one table
    assert sorted(rows.example_id.astype(str).unique()) == ["q0", "q3"]
    assert rows.correct.all() and set(rows.type.astype(str)) == {"ChooseAttr", "CompareAttr"}
    assert list(rows.columns[:2]) == ["example_id", "generation_step"] and "difficulty" in rows.columns
    for name, text in answers.items():
        assert (rows[rows.example_id == name].target_token.astype(str) == text).all()
    manifest = json.loads((directory / "_manifest.json").read_text())
    status = {e["name"]: e["status"] for e in manifest["examples"]}
    assert status == {"q0": "done", "q1": "excluded", "q2": "excluded", "q3": "done", "q4": "excluded"}
    assert "predicted" in next(e for e in manifest["examples"] if e["name"] == "q1")["reason"]

    # the study's rows of one example are the rows of a single run of its prompt
    single = run_vl_masking(TEMPLATE.format(question="What colour is the square?"), [tmp_path / "images" / "3.png"],
                            model=str(tiny_vl_dir), measure="flow", flows=["image->last", "question->last"],
                            window=1, target=f'text:"{answers["q3"]}"')
    mine = rows[rows.example_id == "q3"].reset_index(drop=True)
    for column in ("layer", "rel_change_pct", "kl", "prob", "base_prob"):
        assert np.array_equal(mine[column].to_numpy(), single[column].to_numpy()), column

    from vl_masking.figures import main as figures_main

    written = figures_main([str(directory), "--group-by", "type", "--out", str(tmp_path / "figs")], log=lambda _: None)
    assert sorted(os.path.basename(p) for p in written) == ["gqa_by_type.summary.csv", "gqa_by_type.summary.parquet",
                                                            "gqa_by_type_curves.png"]
    summary = pd.read_csv(tmp_path / "figs" / "gqa_by_type.summary.csv")
    assert set(summary.type) == {"ChooseAttr", "CompareAttr"} and set(summary.group) == {"image->last",
                                                                                        "question->last"}
    one = summary[(summary.type == "ChooseAttr") & (summary.group == "question->last") & (summary.layer == 1)]
    expected = rows[(rows.example_id == "q0") & (rows.flow == "question->last") & (rows.layer == 1)].rel_change_pct
    assert one["mean"].item() == pytest.approx(float(expected.mean())) and one.n.item() == 1


def test_a_datasets_directory_with_the_pictures_as_bytes_gives_the_study_of_the_same_table(tiny_vl_dir, tmp_path):
    """save_to_disk with the Image feature (the pictures' bytes in the Arrow files): each picture is written
    once into the study's _images/, and the rows equal those of the Parquet table with image paths."""
    import datasets

    table = pd.read_parquet(gqa_table(tmp_path))
    table["img"] = [{"bytes": (tmp_path / p).read_bytes(), "path": None} for p in table.img]
    saved = datasets.Dataset.from_pandas(table).cast_column("img", datasets.Image())
    saved.save_to_disk(str(tmp_path / "gqa_hf"))
    args = [*GQA, *FLOWS, "--target", "answer", "--where", "type == 'ChooseAttr'"]
    study("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", tmp_path / "gqa.parquet", *args,
          "--output-dir", tmp_path / "paths")
    # the directory's Arrow files hold the bytes; the files they came from are gone
    for picture in (tmp_path / "images").iterdir():
        picture.unlink()
    study("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", tmp_path / "gqa_hf", *args,
          "--output-dir", tmp_path / "bytes")
    assert sorted(p.name for p in (tmp_path / "bytes" / "gqa_hf" / "_images").iterdir()) == ["q0.png", "q2.png",
                                                                                             "q4.png"]
    a, b = read_study(tmp_path / "paths" / "gqa"), read_study(tmp_path / "bytes" / "gqa_hf")
    assert "img" not in b.columns  # bytes are not carried into every row
    pd.testing.assert_frame_equal(sorted_rows(a.drop(columns=["img"])), sorted_rows(b), check_categorical=False)

    datasets.DatasetDict({"validation": saved}).save_to_disk(str(tmp_path / "gqa_splits"))
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", tmp_path / "gqa_splits", *args)
    assert proc.returncode == 2 and "give one split's directory" in proc.stderr and "validation" in proc.stderr
    broken = datasets.Dataset.from_dict({"qid": ["x"], "q": ["Hi?"], "a": ["no"], "img": [b"not a picture"]})
    broken.save_to_disk(str(tmp_path / "broken"))
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", tmp_path / "broken", *args[:4],
                   "--output-dir", tmp_path / "none")
    assert proc.returncode == 2 and "row 1, column img: the image bytes are not a picture" in proc.stderr
    assert not (tmp_path / "none").exists()


def test_a_text_study_of_known_facts_names_each_rows_subject_under_one_flow(tiny_text_dir, tmp_path):
    """Bare answers ("Rome", as the ROME set has them) read the token that follows the prompt (" Rome"); every
    example's subject flow is the study's one flow 'text:"{subject}"->last', its unit the row's own subject."""
    facts = pd.DataFrame({"case": ["eiffel", "colosseum"], "subject": ["The Eiffel Tower", "The Colosseum"],
                          "attribute": ["Paris", "Rome"]})
    facts["prompt"] = [f"{s} is located in the city of" for s in facts.subject]
    facts.to_json(tmp_path / "facts.jsonl", orient="records", lines=True)
    study("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", tmp_path / "facts.jsonl",
          "--columns", "id=case,question=prompt,answer=attribute", "--measure", "flow", "--window", 1,
          "--flow", 'text:"{subject}"->last', "--flow", "last->last", "--target", "answer",
          "--output-dir", tmp_path)
    rows = read_study(tmp_path / "facts")
    rome = rows[rows.example_id == "colosseum"]
    assert (rome.target_token.astype(str) == " Rome").all() and (rome.subject.astype(str) == "The Colosseum").all()
    assert set(rows.flow.astype(str)) == {'text:"{subject}"->last', "last->last"}
    subject_rows = rows[rows.flow.astype(str) == 'text:"{subject}"->last']
    assert set(zip(subject_rows.example_id.astype(str), subject_rows.unit.astype(str))) == {
        ("eiffel", 'text:"The Eiffel Tower"'), ("colosseum", 'text:"The Colosseum"')}
    bad = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", tmp_path / "facts.jsonl",
                  "--columns", "id=case,question=prompt", "--measure", "flow", "--flow", 'text:"{object}"->last',
                  "--output-dir", tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr  # said once, not once per row
    assert "--flow text:\"{object}\"->last: no column 'object' for its placeholder" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_terminated_study_keeps_what_finished_and_resume_equals_an_uninterrupted_one(tiny_vl_dir, tmp_path):
    table = gqa_table(tmp_path)
    args = ["--model", tiny_vl_dir, "--dataset", table, *GQA, *FLOWS, "--num-tokens", 2, "--target", "answer"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_vl.py"), *map(str, args), "--output-dir",
                             str(tmp_path / "cut")], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = ""
    while "examples: 2/5" not in seen:
        line = proc.stdout.readline()
        assert line, "the study ended before it could be stopped"
        seen += line
    proc.send_signal(signal.SIGTERM)  # a cluster's preemption
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "--resume" in err
    kept = set(read_study(tmp_path / "cut" / "gqa").example_id.astype(str))
    assert {"q0", "q1"} <= kept and len(kept) < 5  # what finished was written

    refused = run_cli("mask_impact_vl.py", *args, "--output-dir", tmp_path / "cut")
    assert refused.returncode == 2 and "already holds results" in refused.stderr and "--resume" in refused.stderr
    other = run_cli("mask_impact_vl.py", *args, "--window", 3, "--output-dir", tmp_path / "cut", "--resume")
    assert other.returncode == 2 and "made with other options" in other.stderr

    proc = study("mask_impact_vl.py", *args, "--output-dir", tmp_path / "cut", "--resume")
    assert f"resume: {len(kept)} example(s) already done, {5 - len(kept)} to run" in proc.stdout
    study("mask_impact_vl.py", *args, "--output-dir", tmp_path / "straight")
    cut, straight = read_study(tmp_path / "cut" / "gqa"), read_study(tmp_path / "straight" / "gqa")
    pd.testing.assert_frame_equal(sorted_rows(cut), sorted_rows(straight), check_categorical=False)
    assert list((tmp_path / "cut" / "gqa").glob("*.parquet")) == [tmp_path / "cut" / "gqa" / "part-r00000.parquet"]
    manifest = json.loads((tmp_path / "cut" / "gqa" / "_manifest.json").read_text())
    assert manifest["counts"] == {"done": 5}


def test_a_merge_cut_short_counts_each_example_once(tmp_path):
    """The part is in place but its chunks are not yet removed (a kill between the two): readers skip the
    chunks the part names as replaced, so no example is counted twice."""
    import pyarrow as pa

    writer = RankWriter(tmp_path, 0, {})
    for name in ("a", "b", "c"):
        writer.add(name, pa.table({"example_id": [name] * 2, "layer": [0, 1], "v": [1.0, 2.0]}),
                   {"measure": "layer"})
        writer.flush()
    chunks = sorted(tmp_path.glob("chunk-*.parquet"))
    saved = {c: c.read_bytes() for c in chunks}
    writer.merge()
    assert [p.name for p, _ in data_files(tmp_path)] == ["part-r00000.parquet"]
    for chunk, data in saved.items():  # as if the process died right after the part was renamed into place
        chunk.write_bytes(data)
    assert [p.name for p, _ in data_files(tmp_path)] == ["part-r00000.parquet"]
    rows = read_study(tmp_path)
    assert sorted(rows.example_id) == ["a", "a", "b", "b", "c", "c"]


@pytest.mark.sharding
def test_two_processes_write_what_one_process_writes(tiny_vl_dir, tmp_path, monkeypatch):
    """Under accelerate launch each rank runs examples i mod 2 and writes its own part and manifest part (no
    file shared; each rank holds only its own lock); the merged study equals a single process's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each launched process has one thread: the same float sums
    table = gqa_table(tmp_path)
    args = ["--model", tiny_vl_dir, "--dataset", table, *GQA, *FLOWS, "--target", "answer", "--device", "cpu"]
    run_cli_process("mask_impact_vl.py", *args, "--output-dir", tmp_path / "single", check=True)
    env = dict(os.environ, TQDM_DISABLE="1")
    from test_batch import free_port

    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(ROOT / "mask_impact_vl.py"),
                           *map(str, args), "--output-dir", str(tmp_path / "sharded")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2: 3 of 5 examples" in proc.stdout and "process 2 of 2: 2 of 5 examples" in proc.stdout
    sharded = tmp_path / "sharded" / "gqa"
    assert sorted(p.name for p in sharded.glob("*.parquet")) == ["part-r00000.parquet", "part-r00001.parquet"]
    assert sorted(p.name for p in (sharded / "_manifest").iterdir()) == ["rank-00000.json", "rank-00000.lock",
                                                                         "rank-00001.json", "rank-00001.lock"]
    single, both = read_study(tmp_path / "single" / "gqa"), read_study(sharded)
    pd.testing.assert_frame_equal(sorted_rows(single), sorted_rows(both), check_categorical=False)
    manifest = json.loads((sharded / "_manifest.json").read_text())
    assert manifest["counts"] == {"done": 5} and manifest["processes"] == 2
    assert {e["process"] for e in manifest["examples"]} == {0, 1}


def test_the_api_runs_a_study_as_the_command_line_does(tiny_vl_dir, tmp_path):
    from vl_masking import run_study

    table = gqa_table(tmp_path)
    study("mask_impact_vl.py", "--model", tiny_vl_dir, "--dataset", table, *GQA, *FLOWS, "--target", "answer",
          "--where", "type == 'ChooseAttr'", "--output-dir", tmp_path / "cli")
    rows = run_study(table, model=str(tiny_vl_dir), columns={"id": "qid", "image": "img", "question": "q",
                                                             "answer": "a"},
                     prompt_template=TEMPLATE, measure="flow", flow=["image->last", "question->last"], window=1,
                     target="answer", where="type == 'ChooseAttr'", output_dir=str(tmp_path / "api"))
    assert sorted(rows.example_id.astype(str).unique()) == ["q0", "q2", "q4"]
    assert rows.attrs["manifest"]["counts"] == {"done": 3}
    pd.testing.assert_frame_equal(sorted_rows(rows), sorted_rows(read_study(tmp_path / "cli" / "gqa")),
                                  check_categorical=False)
