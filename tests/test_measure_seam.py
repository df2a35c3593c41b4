"""The measure is the only extension point: a measure declared in one class (here, in this file) runs from the
command line and the API, writes every format with its schema, and the figures read it; nothing outside the
measures' own modules tests a measure's name."""

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
    class Options:  # not part of RunSettings (registered after it was made): only the declaration is tested
        scale: float = option(1.0, "a factor", type=float)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def capture_options(self):
        return {"on_layer": True}

    def on_layer(self, step, layer, pending, length):
        v = pending["last_query"].v  # (KVH, S, d)
        member = self.plan.hide_mask(step, v.device).float()  # (N, S)
        self.records.append((step, layer, (member @ v).norm(dim=-1).cpu().numpy()))  # (KVH, N)

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
def fourth_measure():
    register(ValueNorm)
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
    assert set(table.kv_head) == {"KV_0", "KV_1"} and (table.value_norm > 0).all()
    written = figures.main([str(out / "four.value_norm.parquet"), "--out", str(tmp_path / "figs")],
                           log=lambda line: None)
    assert {p.rsplit("/", 1)[1] for p in written} == {"four.value_norm_heatmap.png", "four.value_norm_layers.png"}
    # the help of --measure lists it, from its declaration
    from vl_masking.options import build_parser
    from vl_masking.tools import VL

    assert "value_norm: the norm of the sum of each unit's value vectors" in " ".join(
        build_parser(VL).format_help().split())


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
