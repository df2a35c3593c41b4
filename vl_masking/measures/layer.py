"""The layer measure: hide each unit from one layer's attention and measure how far that layer's update at the
last position moves (the engine: knockout.py; the reference: reference.reference_error).

Variants: Full (the layer's residual update, attention + MLP), Attn (the attention block's output after
o_proj) and Head_h (head h's output before o_proj). Metrics: the L2 and cosine distance between the
unmasked and the masked vector, and the L2 distance relative to the unmasked vector's norm.
"""

from dataclasses import dataclass

from ..fields import option
from .base import Measure, Metric, register

VARIANT_GROUPS = ("Full", "Attn", "Heads")
LAYER_COLUMNS = ["generation_step", "layer", "token_position", "token_masked", "token_type", "image_index",
                 "grid_row", "grid_col", "variant", "l2_distance", "cosine_distance", "unit", "unit_kind",
                 "unit_size", "unit_positions", "grid_rows", "grid_cols", "base_norm"]


def variant_names(groups, num_heads: int) -> list:
    names = []
    for g in groups:
        names.extend([f"Head_{h}" for h in range(num_heads)] if g == "Heads" else [g])
    return names


def per_step_rows(plan, steps: int, layers: int, per_unit: int, what: str) -> str:
    """'2160 = 3 steps x 4 layers x 30 units x 6 variants' (units per step may grow with generated tokens)."""
    counts = [plan.unit_count(s) for s in range(steps)]
    total = sum(counts) * layers * per_unit
    if len(set(counts)) <= 1:
        return (f"{total} = {steps} step{'s' if steps != 1 else ''} x {layers} layers x "
                f"{counts[0] if counts else 0} units x {per_unit} {what}")
    return f"{total} = {layers} layers x {per_unit} {what} x ({' + '.join(map(str, counts))}) units over {steps} steps"


def variant_table(entries, units, names, columns):
    """The long table of a per-variant measure: entries are (step, layer, {column: (V, N) values}), V the
    variants `names` and N the step's units (a prefix of `units`); one row per (step, layer, unit, variant)."""
    import numpy as np
    import pandas as pd

    from ..units import unit_columns

    if not entries:
        return pd.DataFrame({c: [] for c in columns})
    parts = {k: [] for k in ("step", "layer", "unit", "variant")}
    values = {c: [] for c in entries[0][2]}
    for step, layer, arrays in entries:
        v, n = next(iter(arrays.values())).shape
        parts["step"].append(np.full(n * v, step, dtype=np.int32))
        parts["layer"].append(np.full(n * v, layer, dtype=np.int32))
        parts["unit"].append(np.repeat(np.arange(n), v))
        parts["variant"].append(np.tile(np.arange(v, dtype=np.int32), n))
        for column, array in arrays.items():
            values[column].append(np.asarray(array).T.reshape(-1))  # unit-major, variants within
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return pd.DataFrame({
        "generation_step": joined["step"], "layer": joined["layer"], **unit_columns(units, joined["unit"]),
        "variant": pd.Categorical.from_codes(joined["variant"], names),
        **{c: np.concatenate(v).astype(np.float32) for c, v in values.items()},
    })[columns]


def written_values(table, step: int, layer: int, columns) -> dict:
    """The inverse of variant_table for one (step, layer): {variant: {column: (N,) values}} as the table holds
    them (what --check compares with the reference is what the files say)."""
    import numpy as np

    rows = table[(table["generation_step"].to_numpy() == step) & (table["layer"].to_numpy() == layer)]
    variants = rows["variant"].astype(str).to_numpy()
    return {v: {c: np.asarray(rows[c].to_numpy()[variants == v], dtype=np.float64) for c in columns}
            for v in dict.fromkeys(variants)}


@register
class LayerMeasure(Measure):
    """Hide each unit from one layer's attention; distances of that layer's update at the last position."""

    name = "layer"
    help = "each layer's update at the last position with a unit hidden"
    columns = LAYER_COLUMNS
    series_column, series_label = "variant", "variant"
    normalise = "layer"  # each layer's update has its own size: compare units within a layer
    metrics = (Metric("l2", "L2 distance", "l2_distance"),
               Metric("cos", "cosine distance", "cosine_distance"),
               Metric("rel_l2", "relative L2 (L2 / base norm)", ratio=("l2_distance", "base_norm")))

    @dataclass
    class Options:
        variants: tuple = option(VARIANT_GROUPS, f"with --measure layer: any of {','.join(VARIANT_GROUPS)}",
                                 kind="csv", choices=VARIANT_GROUPS)

    # -- the run --------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []  # (step, layer, {group: (l2, cos)}, {group: base norm})
        self.tails = {}

    def capture_options(self) -> dict:
        return {"on_layer": True, "keep_layer_inputs": self.settings.check > 0}

    def on_layer(self, step: int, layer: int, pending: dict, length: int) -> None:
        from ..knockout import LayerTail, attention_layer, measure_layer

        attention = pending["attention"]
        if layer not in self.tails:
            self.tails[layer] = LayerTail(attention_layer(self.loaded.model, layer))
        hide = self.plan.hide_mask(step, pending["last_query"].q.device)
        values, norms = measure_layer(pending["last_query"], hide, pending["x_last"], attention, self.tails[layer],
                                      self.settings.variants, self.memory_budget_bytes)
        self.records.append((step, layer, values, norms))

    def table(self, token_map):
        """One row per (generation_step, layer, unit, variant), built without per-row Python."""
        import torch

        if not self.records:
            return variant_table([], [], [], self.columns)
        steps = max(r[0] for r in self.records) + 1
        units = self.plan.units(steps - 1, token_map.text)  # every step's units are a prefix of these
        names = variant_names(self.settings.variants, self.loaded.text_config.num_attention_heads)
        entries = []
        for step, layer, values, norms in self.records:
            groups = list(values)
            n = values[groups[0]][0].shape[-1]
            stack = lambda i: torch.cat([values[g][i].reshape(-1, n) for g in groups]).cpu().numpy()  # noqa: E731
            norm = torch.cat([norms[g].reshape(-1) for g in groups]).cpu().numpy()
            entries.append((step, layer, {"l2_distance": stack(0), "cosine_distance": stack(1),
                                          "base_norm": norm[:, None].repeat(n, axis=1)}))
        return variant_table(entries, units, names, self.columns)

    def rows_explained(self, steps: int) -> str:
        variants = len(variant_names(self.settings.variants, self.loaded.text_config.num_attention_heads))
        return per_step_rows(self.plan, steps, len(self.layers), variants, "variants")

    def metadata(self) -> dict:
        return {"variants": list(self.settings.variants)}

    def check(self, capture, k: int, table) -> dict:
        """Recompute k distinct random (step, layer, unit) results with the reference layer re-run and compare
        them with the table's rows."""
        from ..reference import check_draws, reference_error

        checked = []
        for index, unit in check_draws([self.plan.unit_count(r[0]) for r in self.records], k):
            step, layer = self.records[index][:2]
            written = written_values(table, step, layer, ("l2_distance", "cosine_distance"))
            error = reference_error(self.loaded.model, capture, self.plan, step, layer, written, [unit])
            checked.append({"step": step, "layer": layer, "unit": unit,
                            "positions": list(self.plan.units(step)[unit].positions), "max_error": error})
        return {"checked": checked, "max_error": max(c["max_error"] for c in checked)}
