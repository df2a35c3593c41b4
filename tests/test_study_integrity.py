"""A study keeps every row once, whatever its table holds and whatever happens to its processes: nulls and
mixed types, a second process, a kill between two measures' writes, a second SIGTERM during the first one's
flush. Faults are real signals to real processes (tests/faults.py puts them at an exact point)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_cli, run_cli_process
from vl_masking.study import read_study

FACTS = [("eiffel", "The Eiffel Tower is located in the city of", "Paris", "place", 1, True, "x"),
         ("colosseum", "The Colosseum is located in the city of", "Rome", None, 2, False, ""),
         ("louvre", "The Louvre is located in the city of", "Paris", "museum", None, None, 3),
         ("bigben", "Big Ben is located in the city of", "London", "place", 4, True, None),
         ("prado", "The Prado is located in the city of", "Madrid", "", 5, False, "y")]
COLUMNS = ["--columns", "id=case,question=prompt,answer=attribute"]


def facts_table(path, rows=FACTS):
    """JSON Lines with a null in every carried column, a column mixing text and numbers, and empty strings."""
    with open(path, "w") as f:
        for case, prompt, attribute, kind, rank, famous, note in rows:
            f.write(json.dumps({"case": case, "prompt": prompt, "attribute": attribute, "kind": kind, "rank": rank,
                                "famous": famous, "note": note}) + "\n")
    return path


def sorted_rows(table):
    table = table.astype({c: str for c in table.columns if isinstance(table[c].dtype, pd.CategoricalDtype)})
    keys = [c for c in ("example_id", "flow", "variant", "layer", "unit", "generation_step") if c in table.columns]
    return table.sort_values(keys, kind="stable").reset_index(drop=True)


def test_nulls_mixed_types_and_empty_strings_in_the_table_keep_every_row_with_one_type_per_column(tiny_text_dir,
                                                                                                   tmp_path):
    table = facts_table(tmp_path / "facts.jsonl")
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", table, *COLUMNS,
                   "--measure", "layer", "--layers", "0", "--variants", "Full", "--num-tokens", 1,
                   "--output-dir", tmp_path, "--output", "facts")
    assert proc.returncode == 0, proc.stderr
    schema = pq.read_schema(tmp_path / "facts" / "part-r00000.parquet")
    assert str(schema.field("rank").type) == "int64" and str(schema.field("famous").type) == "bool"
    assert str(schema.field("note").type) == "dictionary<values=string, indices=int32, ordered=0>"
    rows = pd.read_parquet(tmp_path / "facts", dtype_backend="numpy_nullable")
    assert sorted(rows.example_id.astype(str).unique()) == sorted(f[0] for f in FACTS)
    first = rows.drop_duplicates("example_id").set_index("example_id").loc[[f[0] for f in FACTS]]
    assert first["rank"].tolist()[:2] == [1, 2] and pd.isna(first.loc["louvre", "rank"])
    assert pd.isna(first.loc["louvre", "famous"]) and first.loc["colosseum", "famous"] == False  # noqa: E712
    assert first["note"].astype(object).fillna("-").tolist() == ["x", "", "3", "-", "y"]  # text and a number: text
    assert pd.isna(first.loc["colosseum", "kind"]) and first.loc["prado", "kind"] == ""


def test_a_null_question_is_a_problem_of_its_row_not_the_prompt_nan(tiny_text_dir, tmp_path):
    rows = list(FACTS)
    rows[2] = ("louvre", None, "Paris", "museum", 3, True, "z")
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset",
                   facts_table(tmp_path / "facts.jsonl", rows), *COLUMNS, "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and "row 3, column prompt: the prompt is empty" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_problems_name_the_tables_row_after_where_and_sample(tiny_text_dir, tmp_path):
    rows = list(FACTS)
    rows[2] = ("louvre", "", "Paris", "museum", 3, True, "z")
    table = facts_table(tmp_path / "facts.jsonl", rows)
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", table, *COLUMNS,
                   "--where", "case in ['colosseum', 'louvre']", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and "row 3, column prompt: the prompt is empty" in proc.stderr, proc.stderr
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", table, *COLUMNS,
                   "--measure", "layer", "--layers", "0", "--num-tokens", 1, "--where", "case != 'louvre'",
                   "--sample", 2, "--seed", 3, "--output-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    described = json.loads((tmp_path / "out" / "facts" / "_study.json").read_text())
    position = {f[0]: i + 1 for i, f in enumerate(FACTS)}
    assert all(e["row"] == position[e["example_id"]] for e in described["examples"]), described["examples"]


def test_a_templated_target_reads_each_rows_own_answer(tiny_text_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_dir)
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset",
                   facts_table(tmp_path / "facts.jsonl"), "--columns", "id=case,question=prompt", "--measure", "flow",
                   "--flow", "last->last", "--window", 1, "--num-tokens", 1, "--target", 'text:"{attribute}"',
                   "--output-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = read_study(tmp_path / "facts").drop_duplicates("example_id").set_index("example_id")
    for case, _, attribute, *_ in FACTS:
        assert rows.loc[case, "target_token"] == tokenizer.decode(tokenizer.encode(" " + attribute)[:1]), case


@pytest.mark.parametrize("where", [
    "prompt.__class__.__init__.__globals__.get('sys').modules.get('os').system('touch pwned') == 0",
    "__import__('os').system('touch pwned')", "@pwned", "rank == (lambda: __import__('os').system('touch pwned'))()",
    "kind.str.contains('a', regex=True)"])
def test_where_is_parsed_never_run(tiny_text_dir, tmp_path, where):
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset",
                   facts_table(tmp_path / "facts.jsonl"), *COLUMNS, "--where", where, "--output-dir", tmp_path / "out",
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --where") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_where_keeps_the_rows_its_filter_names():
    from vl_masking.where import apply_where

    table = pd.DataFrame({"kind": ["place", None, "museum", "place", ""], "rank": [1, 2, np.nan, 4, 5],
                          "my col": ["a", "b", "c", "d", "e"]})
    kept = lambda text: apply_where(table, text).index.tolist()  # noqa: E731
    assert kept("kind == 'place'") == [0, 3]
    assert kept("kind == 'place' and rank > 1 or `my col` in ['b']") == [1, 3]
    assert kept("~kind.str.startswith('pl') & rank.notna()") == [1, 4]
    assert kept("not kind.str.startswith('pl') & rank.notna()") == [1, 2, 4]  # not binds looser than &
    assert kept("kind == None") == [1] and kept("rank.isna()") == [2]
    assert kept("1 < rank <= 4") == [1, 3] and kept("kind not in ['place', '']") == [1, 2]
    assert kept("kind.str.contains('.')") == []  # plain text, not a regular expression


def test_a_second_resume_while_the_first_runs_is_refused(tiny_text_dir, tmp_path):
    table = facts_table(tmp_path / "facts.jsonl")
    args = ["--model", tiny_text_dir, "--dataset", table, *COLUMNS, "--measure", "layer", "--num-tokens", 2,
            "--output-dir", tmp_path]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "mask_impact_analysis.py"), *map(str, args)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "examples: 1/5" not in seen:
            line = first.stdout.readline()
            assert line, "the study ended before the second process could start"
            seen += line
        first.send_signal(signal.SIGSTOP)  # it holds its rank while the second one starts
        second = run_cli_process("mask_impact_analysis.py", *args, "--resume")
        assert second.returncode == 2 and "is already running" in second.stderr, second.stderr
        assert f"process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    rows = read_study(tmp_path / "facts")
    assert not rows.duplicated(["example_id", "generation_step", "layer", "unit", "variant"]).any()
    assert rows.example_id.nunique() == 5
    again = run_cli_process("mask_impact_analysis.py", *args, "--resume")  # the lock went with the process
    assert again.returncode == 0 and "5 example(s) already done, 0 to run" in again.stdout, again.stderr


def fault(name, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), name, *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def test_a_kill_between_two_measures_writes_then_resume_equals_an_uninterrupted_study(tiny_text_dir, tmp_path):
    table = facts_table(tmp_path / "facts.jsonl")
    args = ["mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", table, *COLUMNS, "--measure",
            "layer,attention", "--num-tokens", 2]
    killed = fault("kill-before-second-measure-chunk", *args, "--output-dir", tmp_path / "cut")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((tmp_path / "cut" / "facts.layer").glob("chunk-*.parquet"))  # one measure's rows only
    assert not list((tmp_path / "cut" / "facts.attention").glob("*.parquet"))
    resumed = run_cli_process(*args, "--output-dir", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0 and "0 example(s) already done, 5 to run" in resumed.stdout, resumed.stderr
    run_cli_process(*args, "--output-dir", tmp_path / "straight", check=True)
    for measure in ("layer", "attention"):
        cut = read_study(tmp_path / "cut" / f"facts.{measure}")
        straight = read_study(tmp_path / "straight" / f"facts.{measure}")
        pd.testing.assert_frame_equal(sorted_rows(cut), sorted_rows(straight), check_categorical=False)


def test_a_second_sigterm_during_the_first_ones_flush_loses_nothing(tiny_text_dir, tmp_path):
    table = facts_table(tmp_path / "facts.jsonl")
    args = ["mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", table, *COLUMNS, "--measure", "layer",
            "--num-tokens", 2, "--output-dir", tmp_path]
    proc = fault("term-twice", *args)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "terminated: the examples that finished are written" in proc.stderr
    assert sorted(read_study(tmp_path / "facts").example_id.astype(str).unique()) == ["colosseum", "eiffel"]


def test_a_sigterm_between_two_measures_writes_leaves_one_runs_files(tiny_text_dir, tmp_path):
    """The measures of one run are renamed into place together: never one measure's new files beside another's
    old ones; the signal is taken after the files are complete, and the message says so."""
    from vl_masking.results import read_metadata

    common = ["mask_impact_analysis.py", "--model", tiny_text_dir, "--measure", "layer,attention", "--num-tokens",
              1, "--output-dir", tmp_path, "--output", "r"]
    run_cli(*common, "--prompt", "An old prompt", check=True)
    proc = fault("term-between-measure-writes", *common, "--prompt", "The new prompt")
    assert proc.returncode == 0 and "terminated after the run finished: its files are complete" in proc.stderr, \
        proc.stderr[-2000:]
    metas = [read_metadata(tmp_path / f"r.{m}.{fmt}") for m in ("layer", "attention")
             for fmt in ("parquet", "json", "csv")]
    assert {m["prompt"] for m in metas} == {"The new prompt"} and len({m["run_id"] for m in metas}) == 1
