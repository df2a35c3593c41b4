"""The measure is the only extension point: a measure declared in one class (here, in this file) runs from the
command line, a batch and a study, writes every format with its schema and its own metadata, and the figures read
it; nothing outside the measures' own modules names a measure, its options or its metadata."""

import ast
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import PIGGY, ROOT, run_cli
from vl_masking import figures
from vl_masking.fields import option
from vl_masking.measures import MEASURES, Measure, Metric, register
from vl_masking.results import read_metadata, read_table


class ValueNorm(Measure):
    """A fourth measure, for this test only: ||sum of the unit's value vectors|| per key-value head."""

    name = "value_norm"
    help = "the norm of the sum of each unit's value vectors"
    columns = ["generation_step", "layer", "token_position", "token_type", "image_index", "grid_row", "grid_col",
               "unit", "unit_kind", "unit_size", "unit_positions", "grid_rows", "grid_cols", "kv_head", "value_norm"]
    series_column, series_label = "kv_head", "key-value head"
    normalise = "global"
    metrics = (Metric("value_norm", "norm of the summed values", "value_norm"),)

    @dataclass
    class Options:
        scale: float = option(1.0, "a factor the norms are multiplied by", type=float)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def capture_options(self):
        return {"on_layer": True}

    def on_layer(self, step, layer, pending, length):
        v = pending["last_query"].v  # (KVH, S, d)
        member = self.plan.hide_mask(step, v.device).float()  # (N, S)
        self.records.append((step, layer, self.settings.scale * (member @ v).norm(dim=-1).cpu().numpy()))  # (KVH, N)

    def metadata(self):
        return {"value_norm_scale": self.settings.scale}

    def table(self, token_map):
        import pandas as pd

        from vl_masking.units import unit_columns

        parts = []
        for step, layer, norms in self.records:
            units = self.plan.units(step, token_map.text)
            kv, n = norms.shape
            index = np.tile(np.arange(n), kv)
            parts.append(pd.DataFrame({"generation_step": step, "layer": layer, **unit_columns(units, index),
                                       "kv_head": np.repeat([f"KV_{k}" for k in range(kv)], n),
                                       "value_norm": norms.reshape(-1).astype(np.float32)}))
        return pd.concat(parts, ignore_index=True)[self.columns]

    def rows_explained(self, steps):
        return f"{sum(r[2].size for r in self.records)} = every (step, layer, key-value head, unit)"


@pytest.fixture
def fourth_measure(monkeypatch):
    """ValueNorm registered, and its options in the run's settings (as a measure module imported with the others
    would have them)."""
    from vl_masking import options

    register(ValueNorm)
    monkeypatch.setattr(options, "RunSettings", options.settings_class())
    yield ValueNorm
    MEASURES.pop(ValueNorm.name)


def test_a_fourth_measure_is_one_class_and_runs_end_to_end(fourth_measure, tiny_vl_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("mask_impact_vl.py", "--model", tiny_vl_dir, "--image", PIGGY, "--prompt", "Describe this image.",
                   "--mask-mode", "both", "--mask-unit", "region:2x2", "--measure", "value_norm,attention",
                   "--num-tokens", 2, "--output-dir", out, "--output", "four")
    assert proc.returncode == 0, proc.stderr
    assert "Rows (value_norm):" in proc.stdout
    table, meta = read_table(out / "four.value_norm.csv"), read_metadata(out / "four.value_norm.json")
    assert meta["schema"]["series"] == {"column": "kv_head", "label": "key-value head", "order": ["KV_0", "KV_1"]}
    assert meta["schema"]["options"] == ["scale"] and meta["measures"] == ["value_norm", "attention"]
    assert meta["value_norm_scale"] == 1.0
    assert set(table.kv_head) == {"KV_0", "KV_1"} and (table.value_norm > 0).all()
    written = figures.main([str(out / "four.value_norm.parquet"), "--out", str(tmp_path / "figs")],
                           log=lambda line: None)
    assert {p.rsplit("/", 1)[1] for p in written} == {"four.value_norm_heatmap.png", "four.value_norm_layers.png"}
    # the help of --measure lists it, from its declaration
    from vl_masking.options import build_parser
    from vl_masking.tools import VL

    assert "value_norm: the norm of the sum of each unit's value vectors" in " ".join(
        build_parser(VL).format_help().split())


def test_a_fourth_measure_runs_in_a_batch_and_a_study_with_its_own_options_and_metadata(fourth_measure, tiny_text_dir,
                                                                                      tmp_path):
    import yaml

    from vl_masking.study import read_study

    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"model": str(tiny_text_dir), "measure": "value_norm,layer",
                                                   "scale": 2.0},
                                      "prompts": [{"name": "one", "prompt": "The capital of France is"},
                                                  {"name": "two", "prompt": "Rivers flow", "scale": 3.0}]}))
    proc = run_cli("mask_impact_analysis.py", "--config", config, "--output-dir", tmp_path / "batch")
    assert proc.returncode == 0, proc.stderr
    one, two = (read_table(tmp_path / "batch" / f"{n}.value_norm.parquet") for n in ("one", "two"))
    assert [read_metadata(tmp_path / "batch" / f"{n}.value_norm.parquet")["value_norm_scale"] for n in ("one", "two")] \
        == [2.0, 3.0]
    assert (one.value_norm > 0).all() and (two.value_norm > 0).all()

    table = tmp_path / "facts.jsonl"
    table.write_text("".join(json.dumps({"id": f"f{i}", "question": q}) + "\n"
                             for i, q in enumerate(["Paris is in", "Tokyo is in"])))
    proc = run_cli("mask_impact_analysis.py", "--model", tiny_text_dir, "--dataset", table, "--columns",
                   "id=id,question=question", "--measure", "layer,value_norm", "--scale", "4", "--output-dir",
                   tmp_path / "study", "--output", "facts")
    assert proc.returncode == 0, proc.stderr
    study = read_study(tmp_path / "study" / "facts.value_norm")
    assert set(study.example_id) == {"f0", "f1"} and (study.value_norm > 0).all()
    part = next((tmp_path / "study" / "facts.value_norm").glob("part-*.parquet"))
    meta = read_metadata(part)
    assert meta["value_norm_scale"] == 4.0 and meta["schema"]["measure"] == "value_norm"
    assert "value_norm_scale" not in read_metadata(next((tmp_path / "study" / "facts.layer").glob("part-*.parquet")))


# A measure's name compared with a string, outside the measures' own modules and engines: a branch on it.
BRANCH = re.compile(r"""(measure|kind|\.flow\b)\s*(==|!=|===|!==)\s*["'](layer|flow|attention)["']"""
                    r"""|["'](layer|flow|attention)["']\s*(==|!=|===|!==)\s*\w*(measure|kind)"""
                    r"""|result\.flow\b|["']flow["']\s+in\s+\w+\.(table\.)?columns""")
OWN = {"vl_masking/measures", "vl_masking/flow.py", "vl_masking/knockout.py"}


def test_nothing_outside_the_measures_branches_on_a_measures_name():
    files = [*sorted((ROOT / "vl_masking").rglob("*.py")), ROOT / "viewer" / "common.js",
             ROOT / "visualize_results.html", ROOT / "visualize_vl_grid.html"]
    found = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        if any(relative == own or relative.startswith(own + "/") for own in OWN):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
    # the pattern finds what it is for
    assert BRANCH.search('if settings.measure == "flow":') and BRANCH.search('ds.kind === "layer"')


# The general modules (runners, studies, batches, results, figures, viewers) do not name a measure, one of its
# options or one of its own metadata keys in their code; the measures' modules, their engines and references do,
# and so may experiments that use measures (planted.py). "layer" is also every table's column: not a name here.
GENERAL_EXEMPT = {"vl_masking/measures", "vl_masking/flow.py", "vl_masking/flow_groups.py", "vl_masking/knockout.py",
                  "vl_masking/reference.py", "vl_masking/capture.py", "vl_masking/planted.py"}


def measure_owned_names() -> set:
    """The measures' names (but layer), their options, and the metadata keys only one measure's file holds."""
    from vl_masking.results import read_metadata as meta_of

    expected = ROOT / "tests" / "data" / "expected" / "vl"
    keys = {m: set(meta_of(expected / f"vl.{m}.parquet")) for m in ("layer", "attention", "flow")}
    common = set.intersection(*keys.values())
    own = {k for m in keys for k in keys[m] - common}
    return ({n for n in MEASURES if n != "layer"} | {o for m in MEASURES.values() for o in m.option_names()} | own
            | {"example_flows"})


def code_strings(path) -> list:
    """(line, text) of the string literals in a Python file's code (not its docstrings)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_general_module_names_a_measure_its_options_or_its_metadata():
    names = measure_owned_names()
    assert {"flow", "attention", "flows", "window", "windows", "variants", "attention_variants"} <= names
    found = []
    for path in sorted((ROOT / "vl_masking").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if any(relative == own or relative.startswith(own + "/") for own in GENERAL_EXEMPT):
            continue
        found += [f"{relative}:{line}: {text!r}" for line, text in code_strings(path) if text in names]
    for path in [ROOT / "viewer" / "common.js", ROOT / "visualize_results.html", ROOT / "visualize_vl_grid.html"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "const LEGACY_SCHEMA = " in line:  # the layer schema for files before schemas, tested equal to it
                continue
            found += [f"{path.name}:{number}: {m}" for m in re.findall(r"""["'`]([a-z_]+)["'`]""", line) if m in names]
    assert not found, "\n".join(found)
